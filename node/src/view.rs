//! What a clinician sees: the one-glance text view of a summary, always with its "as of" time.

use std::fmt::Write;

use crate::nhs::NhsNumber;
use crate::store::{StoredPatient, SyncState};
use crate::summary::{Alert, Allergy, Medication, Problem, Provenance, SectionEntry, SummaryError};

/// Formats milliseconds since the epoch as `2026-11-25 17:04 UTC`.
pub fn format_time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC")).ok()
        })
        .unwrap_or_else(|| "unknown time".into())
}

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
    format!("{} ({}), {}", p.device_name, p.role, format_time(p.recorded_at_ms))
}

fn section<T: SectionEntry>(
    out: &mut String,
    title: &str,
    entries: Vec<(uuid::Uuid, T)>,
    line: impl Fn(&T) -> String,
) {
    let _ = writeln!(out, "{title}:");
    if entries.is_empty() {
        let _ = writeln!(out, "  (none recorded)");
    }
    for (_, entry) in entries {
        let _ = writeln!(out, "  - {}   [{}]", line(&entry), by(entry.provenance()));
    }
}

/// The summary as a crew sees it: alerts first, then allergies, medications, problems.
pub fn render(patient: &StoredPatient, sync: &SyncState, now_ms: i64) -> Result<String, SummaryError> {
    let s = &patient.summary;
    let d = s.demographics()?;
    let nhs = NhsNumber::parse(&d.nhs_number).map_err(|_| SummaryError::InvalidNhsNumber)?;
    let mut out = String::new();
    let _ = writeln!(out, "{}   NHS {}   born {}   {}", d.name, nhs.formatted(), d.date_of_birth, d.postcode);
    let _ = writeln!(
        out,
        "As of {} ({}); last sync {}",
        format_time(patient.received_at_ms),
        age_text(now_ms, patient.received_at_ms),
        sync.last_sync_ms.map_or("never".into(), |t| format!("{} ({})", format_time(t), age_text(now_ms, t)))
    );
    section(&mut out, "ALERTS", s.entries::<Alert>()?, |a| format!("{}: {}", a.kind, a.description));
    section(&mut out, "Allergies", s.entries::<Allergy>()?, |a| {
        let mut t = a.substance.clone();
        if let Some(r) = &a.reaction {
            let _ = write!(t, " — {r}");
        }
        if let Some(sev) = &a.severity {
            let _ = write!(t, " ({sev})");
        }
        t
    });
    section(&mut out, "Medications", s.entries::<Medication>()?, |m| {
        format!("{}{}", m.name, m.dose.as_ref().map(|d| format!(", {d}")).unwrap_or_default())
    });
    section(&mut out, "Problems", s.entries::<Problem>()?, |p| {
        format!("{} ({})", p.description, p.clinical_status)
    });
    Ok(out)
}
