//! Anonymised planning exports: counts of patients by condition, age band and postcode district,
//! or by any of them the operator chooses ([`Grouping`]: district only gives useful counts for a
//! small population; condition × age band × district needs a region).
//!
//! Patients with the national data opt-out are excluded; merged-away records are not counted
//! twice. Counts of 1–7 are shown as `*` and every other count is rounded to the nearest 5, so no
//! row identifies anyone; the export says how many cells were suppressed. No identifiable field is
//! ever written.

use std::collections::BTreeMap;

use care_node::summary::{self as s, PatientSummary};

use crate::store::{ServerStore, StoreError};

/// Age bands of the export.
pub const AGE_BANDS: &[(i32, i32, &str)] =
    &[(0, 17, "0-17"), (18, 44, "18-44"), (45, 64, "45-64"), (65, 79, "65-79"), (80, 200, "80+")];

/// A key of the export: SNOMED code and display, age band, postcode district (each empty when
/// not grouped by).
type Key = (String, String, &'static str, String);

/// What the counts are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grouping {
    pub condition: bool,
    pub age_band: bool,
    pub district: bool,
}

impl Grouping {
    /// Condition × age band × district.
    pub const ALL: Grouping = Grouping { condition: true, age_band: true, district: true };
    /// The names [`Grouping::parse`] takes.
    pub const NAMES: &str = "condition, age-band, district";

    /// A comma-separated list of `condition`, `age-band`, `district` (at least one).
    pub fn parse(spec: &str) -> Result<Grouping, String> {
        let mut g = Grouping { condition: false, age_band: false, district: false };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "condition" => g.condition = true,
                "age-band" => g.age_band = true,
                "district" => g.district = true,
                _ => return Err(format!("cannot group by `{part}`: choose from {}", Grouping::NAMES)),
            }
        }
        if g == (Grouping { condition: false, age_band: false, district: false }) {
            return Err(format!("group by at least one of {}", Grouping::NAMES));
        }
        Ok(g)
    }
}

/// What one export produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanningExport {
    pub csv: String,
    pub patients_counted: u64,
    pub patients_opted_out: u64,
    /// Rows written, and how many of them show `*` (a count of 1–7).
    pub cells: u64,
    pub suppressed_cells: u64,
}

fn age_band(date_of_birth: &str, today: time::Date) -> Option<&'static str> {
    let dob =
        time::Date::parse(date_of_birth, time::macros::format_description!("[year]-[month]-[day]")).ok()?;
    let mut age = today.year() - dob.year();
    if (today.month() as u8, today.day()) < (dob.month() as u8, dob.day()) {
        age -= 1;
    }
    AGE_BANDS.iter().find(|(lo, hi, _)| age >= *lo && age <= *hi).map(|(_, _, band)| *band)
}

/// Small-number suppression: 1–7 become `*`; the rest round to the nearest 5 (halves up).
pub fn suppress(count: u64) -> String {
    match count {
        0 => "0".into(),
        1..=7 => "*".into(),
        n => (((n + 2) / 5) * 5).to_string(),
    }
}

/// A postcode's district (outward code): everything but the inward code, which is always its
/// last three characters, written with or without the space (`SO16 1AA`, `SO161AA`).
fn outward_code(postcode: &str) -> Option<String> {
    let compact: String =
        postcode.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_ascii_uppercase();
    (5..=7).contains(&compact.len()).then(|| compact[..compact.len() - 3].to_string())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

/// Builds the export from every stored record, grouped as asked. (The caller audits it.)
pub fn export(
    store: &dyn ServerStore,
    grouping: Grouping,
    now_ms: i64,
) -> Result<PlanningExport, StoreError> {
    let today =
        time::OffsetDateTime::from_unix_timestamp(now_ms / 1000).map(|t| t.date()).unwrap_or(time::Date::MIN);
    let mut counts: BTreeMap<Key, u64> = BTreeMap::new();
    let (mut counted, mut opted_out) = (0, 0);
    for (id, _) in store.patient_ids()? {
        if store.consent(&id)?.opt_out {
            opted_out += 1;
            continue;
        }
        let Some(saved) = store.load_document(&id)? else { continue };
        let mut summary =
            PatientSummary::load(&saved).map_err(|e| StoreError::Document("planning".into(), Box::new(e)))?;
        let document = |e| StoreError::Document("planning".into(), Box::new(e));
        if summary.merged_into().map_err(document)?.is_some() {
            continue;
        }
        let d = summary.demographics().map_err(document)?;
        let band = d.date_of_birth.as_deref().and_then(|b| age_band(b, today)).unwrap_or("unknown");
        let district = d.postcode.as_deref().and_then(outward_code).unwrap_or_else(|| "unknown".into());
        counted += 1;
        let band = if grouping.age_band { band } else { "" };
        let district = if grouping.district { district } else { String::new() };
        if !grouping.condition {
            *counts.entry((String::new(), String::new(), band, district)).or_default() += 1;
            continue;
        }
        let mut seen = Vec::new();
        for problem in summary.clinical_entries::<s::Problem>().map_err(document)? {
            let Some(code) = problem.data.code.filter(|c| c.system == s::SNOMED) else { continue };
            if seen.contains(&code.code) {
                continue;
            }
            seen.push(code.code.clone());
            *counts.entry((code.code, code.display, band, district.clone())).or_default() += 1;
        }
    }
    let mut header = Vec::new();
    if grouping.condition {
        header.extend(["snomed_code", "condition"]);
    }
    if grouping.age_band {
        header.push("age_band");
    }
    if grouping.district {
        header.push("postcode_district");
    }
    header.push("patients");
    let mut csv = format!("{}\n", header.join(","));
    let (mut cells, mut suppressed) = (0, 0);
    for ((code, display, band, district), n) in counts {
        let mut row = Vec::new();
        if grouping.condition {
            row.extend([csv_field(&code), csv_field(&display)]);
        }
        if grouping.age_band {
            row.push(band.to_string());
        }
        if grouping.district {
            row.push(csv_field(&district));
        }
        let shown = suppress(n);
        cells += 1;
        suppressed += u64::from(shown == "*");
        row.push(shown);
        csv.push_str(&format!("{}\n", row.join(",")));
    }
    Ok(PlanningExport {
        csv,
        patients_counted: counted,
        patients_opted_out: opted_out,
        cells,
        suppressed_cells: suppressed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_numbers_are_suppressed_and_the_rest_rounded_to_five() {
        let cases = [
            (1, "*"),
            (7, "*"),
            (8, "10"),
            (10, "10"),
            (12, "10"),
            (13, "15"),
            (17, "15"),
            (18, "20"),
            (102, "100"),
        ];
        for (n, expected) in cases {
            assert_eq!(suppress(n), expected, "{n}");
        }
    }

    #[test]
    fn groupings_parse_and_need_at_least_one_dimension() {
        assert_eq!(Grouping::parse("condition,age-band,district"), Ok(Grouping::ALL));
        let district = Grouping::parse(" district ").unwrap();
        assert!(district.district && !district.condition && !district.age_band);
        assert!(Grouping::parse("").unwrap_err().contains("at least one"));
        assert!(Grouping::parse("postcode").unwrap_err().contains("cannot group by `postcode`"));
    }

    #[test]
    fn districts_are_outward_codes_with_or_without_the_space() {
        assert_eq!(outward_code("SO16 1AA").as_deref(), Some("SO16"));
        assert_eq!(outward_code("so161aa").as_deref(), Some("SO16"));
        assert_eq!(outward_code("PO1 2AB").as_deref(), Some("PO1"));
        assert_eq!(outward_code("W1A 1AA").as_deref(), Some("W1A"));
        assert_eq!(outward_code("SO16"), None, "not a whole postcode: unknown, never the text");
        assert_eq!(outward_code("SOMEWHERE LONG"), None);
    }

    #[test]
    fn age_bands_use_the_birthday() {
        let today = time::macros::date!(2026 - 06 - 15);
        assert_eq!(age_band("2008-06-16", today), Some("0-17"));
        assert_eq!(age_band("2008-06-15", today), Some("18-44"));
        assert_eq!(age_band("1946-01-01", today), Some("80+"));
        assert_eq!(age_band("not a date", today), None);
    }
}
