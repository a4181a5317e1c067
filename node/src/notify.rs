//! Notifications: what changed for a patient, in words, derived on the device from received
//! changes (so they come the same way from hospital feeds, imports and other devices).

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};

use crate::summary::{Encounter, PatientId, PatientSummary, Section, SummaryError};

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

fn place(e: &Encounter) -> String {
    let parts: Vec<&str> = [e.location.as_deref(), e.facility.as_deref()].into_iter().flatten().collect();
    if parts.is_empty() { "hospital".into() } else { parts.join(", ") }
}

/// The notifications that the changes since `before` (the document's heads before they were
/// applied) call for: the encounters they created or changed, each compared with what it was.
pub fn changes(before: &[ChangeHash], after: &mut PatientSummary) -> Result<Vec<String>, SummaryError> {
    let mut out = Vec::new();
    for id in after.entries_changed_since(Section::Encounters, before)? {
        let Some(e) = after.clinical_entry::<Encounter>(id)? else { continue };
        let e = &e;
        let previous = after.clinical_text_at(Section::Encounters, id, "status", before)?;
        let when = |t: &Option<String>| t.as_ref().map(|t| format!(" ({t})")).unwrap_or_default();
        let text = match (e.kind.as_str(), e.status.as_str(), previous.as_deref()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::tests::{demographics, provenance};
    use crate::summary::{EntryId, PatientSummary};

    fn visit(kind: &str, status: &str, ward: &str) -> Encounter {
        Encounter {
            kind: kind.into(),
            status: status.into(),
            class: None,
            location: Some(ward.into()),
            facility: Some("Wessex General".into()),
            start: None,
            end: None,
            reason: None,
            visit: None,
            vitals: None,
            verification_status: "confirmed".into(),
            provenance: provenance("pas", 1),
        }
    }

    #[test]
    fn news_is_told_for_the_encounters_a_change_touched_and_only_for_them() {
        let mut summary = PatientSummary::create(
            uuid::Uuid::from_bytes([1; 16]),
            &demographics(),
            "aa".try_into().unwrap(),
            0,
        )
        .unwrap();
        let id = |n: u8| EntryId::from_bytes([n; 16]);
        // Twenty earlier admissions, ten still in progress: news already told.
        for n in 0..20 {
            let status = if n % 2 == 0 { "in-progress" } else { "finished" };
            summary.upsert(id(n + 100), &visit("admission", status, "Ward 1")).unwrap();
        }
        summary.upsert(id(1), &visit("admission", "in-progress", "Ward 7")).unwrap();
        summary.upsert(id(2), &visit("admission", "in-progress", "Ward 8")).unwrap();
        summary.upsert(id(3), &visit("transfer", "in-progress", "Ward 9")).unwrap();
        let before = summary.heads();
        assert!(changes(&before, &mut summary).unwrap().is_empty(), "no change, no news");

        // One new admission, one discharge, one cancellation, one entered in error, and a field
        // of an old admission corrected without its status changing.
        summary.upsert(id(4), &visit("admission", "in-progress", "Ward 4")).unwrap();
        summary.upsert(id(1), &visit("admission", "finished", "Ward 7")).unwrap();
        let mut cancelled = visit("transfer", "cancelled", "Ward 9");
        cancelled.provenance.device_name = "PAS".into();
        summary.upsert(id(3), &cancelled).unwrap();
        summary
            .mark_entered_in_error(Section::Encounters, id(2), "wrong patient", &provenance("pas", 2))
            .unwrap();
        summary.upsert(id(100), &visit("admission", "in-progress", "Ward 1, bay 2")).unwrap();

        // Exactly the five entries written, none of the twenty untouched, in the order the
        // record lists them (creation order); news in that order too.
        assert_eq!(
            summary.entries_changed_since(Section::Encounters, &before).unwrap(),
            vec![id(100), id(1), id(2), id(3), id(4)]
        );
        assert_eq!(
            changes(&before, &mut summary).unwrap(),
            vec![
                "discharged from Ward 7, Wessex General".to_string(),
                "transfer cancelled by PAS".to_string(),
                "admitted to Ward 4, Wessex General".to_string(),
            ]
        );
        // From the start, the news is every admission still shown (entered in error is not).
        let from_start = changes(&[], &mut summary).unwrap();
        assert_eq!(from_start.iter().filter(|t| t.starts_with("admitted to")).count(), 11);
        assert_eq!(from_start.iter().filter(|t| t.starts_with("discharged from")).count(), 11);
        assert!(!from_start.iter().any(|t| t.contains("Ward 8")), "entered in error is never news");
    }

    #[test]
    fn news_of_changes_from_several_authors_applied_at_once_is_told_for_each() {
        let mut server = PatientSummary::create(
            uuid::Uuid::from_bytes([2; 16]),
            &demographics(),
            "aa".try_into().unwrap(),
            0,
        )
        .unwrap();
        let id = |n: u8| EntryId::from_bytes([n; 16]);
        server.upsert(id(1), &visit("admission", "in-progress", "Ward 7")).unwrap();
        let mut receiver = PatientSummary::load(&server.save()).unwrap();
        let mut device = PatientSummary::load(&server.save()).unwrap();
        device.set_actor(&[0xbb; 32]);
        let base = server.heads();

        // Concurrently: the hospital discharges, a crew records an attendance.
        server.upsert(id(1), &visit("admission", "finished", "Ward 7")).unwrap();
        let mut attended = visit("attendance", "finished", "home");
        attended.provenance.device_name = "ambulance-7".into();
        device.upsert(id(2), &attended).unwrap();

        let mut received = server.changes_since(&base);
        received.extend(device.changes_since(&base));
        let before = receiver.heads();
        receiver.apply_changes(received).unwrap();
        let mut told = changes(&before, &mut receiver).unwrap();
        told.sort();
        assert_eq!(
            told,
            vec!["attended by ambulance-7".to_string(), "discharged from Ward 7, Wessex General".to_string()]
        );
    }

    #[test]
    fn a_change_that_replaces_the_encounters_map_tells_the_news_of_what_it_now_shows() {
        let patient = uuid::Uuid::from_bytes([3; 16]);
        let id = |n: u8| EntryId::from_bytes([n; 16]);
        let mut receiver =
            PatientSummary::create(patient, &demographics(), "aa".try_into().unwrap(), 0).unwrap();
        receiver.upsert(id(1), &visit("admission", "in-progress", "Ward 1")).unwrap();
        // A second creation of the record (another actor, its own section maps): merged in, its
        // encounters map wins the conflict at the root, so what is shown is all new.
        let mut other =
            PatientSummary::create(patient, &demographics(), "ff".try_into().unwrap(), 0).unwrap();
        other.upsert(id(9), &visit("admission", "in-progress", "Ward 9")).unwrap();
        let before = receiver.heads();
        receiver.merge_saved(&other.save()).unwrap();
        assert_eq!(receiver.entries_changed_since(Section::Encounters, &before).unwrap(), vec![id(9)]);
        assert_eq!(
            changes(&before, &mut receiver).unwrap(),
            vec!["admitted to Ward 9, Wessex General".to_string()]
        );
    }
}
