//! What a clinician sees: the one-glance text view of a summary, always with its "as of" time,
//! alerts first, conflicts spelled out, and required sections never silently empty.

use std::fmt::Write;

use crate::nhs::NhsNumber;
use crate::store::{Diverged, StoredPatient, SyncState};
use crate::summary::{
    Alert, Allergy, CarePlan, Contact, Encounter, Medication, PatientSummary, Problem, Provenance, Report,
    SectionEntry, SectionState, SummaryError,
};

pub use crate::clock::{format_time, iso_time};

fn age_text(now_ms: i64, then_ms: i64) -> String {
    let minutes = (now_ms - then_ms).max(0) / 60_000;
    match minutes {
        0 => "just now".into(),
        m if m < 120 => format!("{m} min ago"),
        m if m < 48 * 60 => format!("{} h ago", m / 60),
        m => format!("{} days ago", m / (24 * 60)),
    }
}

fn by(p: &Provenance) -> String {
    let clock = if p.clock_offset_ms.is_some() { "" } else { " device time" };
    format!("{} ({}), {}{clock}", p.device_name, p.role, format_time(p.corrected_time_ms()))
}

fn section<T: SectionEntry>(
    out: &mut String,
    summary: &mut PatientSummary,
    title: &str,
) -> Result<(), SummaryError> {
    let (shown, hidden) = summary.shown_entries::<T>()?;
    let state = if T::SECTION.requires_assertion() { Some(summary.section_state(T::SECTION)?) } else { None };
    if shown.is_empty() && state.is_none() && hidden == 0 {
        return Ok(());
    }
    let _ = writeln!(out, "{title}:");
    match state {
        Some(SectionState::NoInformation) => {
            let _ = writeln!(out, "  no information recorded");
        }
        Some(SectionState::NoneKnown(p)) => {
            let _ = writeln!(out, "  none known   [{}]", by(&p));
        }
        _ => {}
    }
    for entry in shown {
        let _ = writeln!(out, "  - {}   [{}]", entry.data.summary_line(), by(entry.data.provenance()));
        for conflict in entry.conflicts {
            let _ = writeln!(out, "    ! CONFLICTING {}:", conflict.field);
            for v in conflict.values {
                let _ = writeln!(out, "      {} — {}, {}", v.value, v.author, format_time(v.at_ms));
            }
        }
    }
    if hidden > 0 {
        let _ = writeln!(out, "  ({hidden} entered in error, hidden)");
    }
    Ok(())
}

/// The summary as a crew sees it: identity and currency, alerts, allergies, medications,
/// problems, then plans, contacts, encounters and results.
///
/// `refused` lists what the server refused of this device's entries (see
/// [`crate::store::DeviceStore::diverged`]); those of this patient are shown under the header,
/// with the clinician's own text, because they are on this device only.
pub fn render(
    patient: &mut StoredPatient,
    sync: &SyncState,
    refused: &[Diverged],
    now_ms: i64,
) -> Result<String, SummaryError> {
    let patient_id = patient.summary.patient_id()?;
    let s = &mut patient.summary;
    let d = s.demographics()?;
    let nhs = match &d.nhs_number {
        Some(n) => NhsNumber::parse(n).map_err(|_| SummaryError::InvalidNhsNumber)?.formatted(),
        None => "none (provisional record)".into(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}   NHS {}   born {}   {}",
        d.name,
        nhs,
        d.date_of_birth.as_deref().unwrap_or("unknown"),
        d.postcode.as_deref().unwrap_or("")
    );
    let _ = writeln!(
        out,
        "As of {} ({}); last sync {}",
        format_time(patient.received_at_ms),
        age_text(now_ms, patient.received_at_ms),
        sync.last_sync_ms.map_or("never".into(), |t| format!("{} ({})", format_time(t), age_text(now_ms, t)))
    );
    let refused: Vec<_> = refused.iter().filter(|d| d.doc == patient_id).collect();
    if !refused.is_empty() {
        let _ = writeln!(out, "NOT IN THE SHARED RECORD (refused by the server; kept on this device only):");
        for d in refused {
            let why = crate::policy::Rule::parse(&d.rule).map_or("", |r| r.explain());
            let _ = writeln!(out, "  refused {} at {}: {} — {why}", format_time(d.at_ms), d.place, d.rule);
            for line in &d.entries {
                let _ = writeln!(out, "    - {line}");
            }
        }
    }
    section::<Alert>(&mut out, s, "ALERTS")?;
    section::<Allergy>(&mut out, s, "Allergies")?;
    section::<Medication>(&mut out, s, "Medications")?;
    section::<Problem>(&mut out, s, "Problems")?;
    section::<CarePlan>(&mut out, s, "Care plans")?;
    section::<Contact>(&mut out, s, "Contacts")?;
    section::<Encounter>(&mut out, s, "Encounters")?;
    section::<Report>(&mut out, s, "Results and letters")?;
    Ok(out)
}

/// What NEWS2 says of a set of observations, in words: the total and what it calls for, or why
/// there is none.
pub fn assessment_text(assessment: &crate::news2::Assessment) -> String {
    use crate::news2::{Assessment, WITHHELD_PREGNANCY, WITHHELD_UNDER_16, withheld_text};
    match assessment {
        Assessment::Scored { news2, age_known: true } => {
            format!("NEWS2 {} — {}", news2.total, risk_text(news2))
        }
        Assessment::Scored { news2, age_known: false } => format!(
            "NEWS2 {} — {} (no date of birth on record: NEWS2 assumes an adult of 16 or over, not pregnant)",
            news2.total,
            risk_text(news2)
        ),
        Assessment::NotForChildren { age_years } => {
            format!("no NEWS2 (patient is {age_years}): {}", withheld_text(WITHHELD_UNDER_16))
        }
        Assessment::NotInPregnancy => format!("no NEWS2: {}", withheld_text(WITHHELD_PREGNANCY)),
        Assessment::Incomplete { missing } => {
            format!(
                "no NEWS2: observations incomplete (missing: {}); a partial set is not scored",
                missing.join(", ")
            )
        }
    }
}

/// What a NEWS2 score calls for, in words.
pub fn risk_text(news2: &crate::news2::News2) -> &'static str {
    match news2.risk {
        crate::news2::ClinicalRisk::Low => "low risk",
        crate::news2::ClinicalRisk::LowMediumSingleParameter => "a single parameter scores 3: urgent review",
        crate::news2::ClinicalRisk::Medium => "medium risk: urgent response",
        crate::news2::ClinicalRisk::High => "high risk: emergency response",
    }
}

/// Every entry's id by section (entered-in-error ones marked), for `show --ids`.
pub fn entry_ids(summary: &mut PatientSummary) -> Result<String, SummaryError> {
    let mut out = String::from("Entry ids:\n");
    for (section, id, line) in summary.entry_lines()? {
        let _ = writeln!(out, "  {:<12} {id}  {line}", section.key());
    }
    Ok(out)
}
