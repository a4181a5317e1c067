//! Notifications: what changed for a patient, in words, derived on the device from received
//! changes (so they come the same way from hospital feeds, imports and other devices).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::summary::{Encounter, EntryId, PatientId, PatientSummary, SummaryError};

/// One notification, stored sealed on the device.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct Notification {
    pub patient_id: PatientId,
    pub at_ms: i64,
    /// e.g. "admitted to Ward 7, Wessex General (2026-11-25T14:30:00Z)".
    pub text: String,
}

/// Whose and when, never the text (where the patient is, what happened).
impl std::fmt::Debug for Notification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notification")
            .field("patient_id", &self.patient_id)
            .field("at_ms", &self.at_ms)
            .finish_non_exhaustive()
    }
}

/// What a notification compares: each encounter's kind, status and location.
pub type Snapshot = HashMap<EntryId, (String, String, Option<String>)>;

pub fn snapshot(summary: &mut PatientSummary) -> Result<Snapshot, SummaryError> {
    Ok(summary
        .clinical_entries::<Encounter>()?
        .into_iter()
        .map(|e| (e.id, (e.data.kind.clone(), e.data.status.clone(), e.data.location.clone())))
        .collect())
}

fn place(e: &Encounter) -> String {
    let parts: Vec<&str> = [e.location.as_deref(), e.facility.as_deref()].into_iter().flatten().collect();
    if parts.is_empty() { "hospital".into() } else { parts.join(", ") }
}

/// The notifications that the change from `before` to `after` calls for.
pub fn changes(before: &Snapshot, after: &mut PatientSummary) -> Result<Vec<String>, SummaryError> {
    let mut out = Vec::new();
    for entry in after.clinical_entries::<Encounter>()? {
        let e = &entry.data;
        let previous = before.get(&entry.id);
        let when = |t: &Option<String>| t.as_ref().map(|t| format!(" ({t})")).unwrap_or_default();
        let text = match (e.kind.as_str(), e.status.as_str(), previous.map(|p| p.1.as_str())) {
            (_, "cancelled", Some(prev)) if prev != "cancelled" => {
                Some(format!("{} cancelled by {}", e.kind, e.provenance.device_name))
            }
            ("admission", "in-progress", None) => Some(format!("admitted to {}{}", place(e), when(&e.start))),
            ("admission", "in-progress", Some("finished")) => {
                Some(format!("discharge cancelled: still in {}", place(e)))
            }
            ("admission", "finished", Some("in-progress")) | ("admission", "finished", None) => {
                Some(format!("discharged from {}{}", place(e), when(&e.end)))
            }
            ("transfer", "in-progress", None) => {
                Some(format!("transferred to {}{}", place(e), when(&e.start)))
            }
            ("attendance", _, None) => Some(format!(
                "attended by {}{}",
                e.provenance.device_name,
                e.vitals.as_ref().and_then(|v| v.news2).map(|n| format!("; NEWS2 {n}")).unwrap_or_default()
            )),
            _ => None,
        };
        out.extend(text);
    }
    Ok(out)
}
