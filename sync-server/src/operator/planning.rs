//! Anonymised planning exports: counts of patients by condition, age band and postcode district.
//!
//! Patients with the national data opt-out are excluded; merged-away records are not counted
//! twice. Counts of 1–7 are shown as `*` and every other count is rounded to the nearest 5, so no
//! row identifies anyone. No identifiable field is ever written.

use std::collections::BTreeMap;

use care_node::summary::{self as s, PatientSummary};

use crate::store::{ServerStore, StoreError};

/// Age bands of the export.
pub const AGE_BANDS: &[(i32, i32, &str)] =
    &[(0, 17, "0-17"), (18, 44, "18-44"), (45, 64, "45-64"), (65, 79, "65-79"), (80, 200, "80+")];

/// A key of the export: SNOMED code and display, age band, postcode district.
type Key = (String, String, &'static str, String);

/// What one export produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanningExport {
    pub csv: String,
    pub patients_counted: u64,
    pub patients_opted_out: u64,
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

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

/// Builds the export from every stored record.
pub fn export(store: &dyn ServerStore, now_ms: i64) -> Result<PlanningExport, StoreError> {
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
        let district = d
            .postcode
            .as_deref()
            .and_then(|p| p.split_whitespace().next())
            .map(|p| p.to_ascii_uppercase())
            .unwrap_or_else(|| "unknown".into());
        counted += 1;
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
    let mut csv = String::from("snomed_code,condition,age_band,postcode_district,patients\n");
    for ((code, display, band, district), n) in counts {
        csv.push_str(&format!(
            "{},{},{},{},{}\n",
            csv_field(&code),
            csv_field(&display),
            band,
            csv_field(&district),
            suppress(n)
        ));
    }
    store.append_audit(
        crate::operator::ops::OPERATOR,
        "export-planning",
        None,
        &format!("{counted} patients counted, {opted_out} excluded by the national data opt-out"),
        now_ms,
    )?;
    Ok(PlanningExport { csv, patients_counted: counted, patients_opted_out: opted_out })
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
    fn age_bands_use_the_birthday() {
        let today = time::macros::date!(2026 - 06 - 15);
        assert_eq!(age_band("2008-06-16", today), Some("0-17"));
        assert_eq!(age_band("2008-06-15", today), Some("18-44"));
        assert_eq!(age_band("1946-01-01", today), Some("80+"));
        assert_eq!(age_band("not a date", today), None);
    }
}
