//! A patient's summary as typed records for the apps: every section with entry ids, conflicts
//! and provenance, the IPS section states, and the "as of" and last-sync times.

use care_node::store::{Diverged, StoredPatient, SyncState};
use care_node::summary::{
    self as s, Demographics, FieldConflict, PatientSummary, Section, SectionEntry, SectionState,
};

use crate::CareError;

/// "none known", "no information", or entries.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum SectionStatus {
    Entries,
    NoneKnown,
    NoInformation,
}

macro_rules! entry_record {
    ($name:ident, $ty:ty) => {
        /// One entry with its id and any conflicting concurrent values.
        #[derive(Debug, Clone, uniffi::Record)]
        pub struct $name {
            pub id: String,
            pub entry: $ty,
            pub conflicts: Vec<FieldConflict>,
        }
    };
}

entry_record!(AlertEntry, s::Alert);
entry_record!(AllergyEntry, s::Allergy);
entry_record!(MedicationEntry, s::Medication);
entry_record!(ProblemEntry, s::Problem);
entry_record!(CarePlanEntry, s::CarePlan);
entry_record!(ContactEntry, s::Contact);
entry_record!(EncounterEntry, s::Encounter);
entry_record!(ReportEntry, s::Report);

/// An entry this device recorded that the server refused: it is not in the shared record, and
/// stays on this device for the clinician, with the rule it broke.
#[derive(Clone, uniffi::Record)]
pub struct RefusedEntry {
    /// Where it was written: `section/entry-id`, or `document`.
    pub place: String,
    /// The rule's stable name, e.g. `foreign-entry`.
    pub rule: String,
    /// The rule in words, for the clinician.
    pub explanation: String,
    pub refused_at_ms: i64,
    /// What the refused changes recorded, as this device showed it (`section: line`).
    pub entries: Vec<String>,
}

impl std::fmt::Debug for RefusedEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusedEntry")
            .field("place", &self.place)
            .field("rule", &self.rule)
            .field("refused_at_ms", &self.refused_at_ms)
            .field("entries", &self.entries.len())
            .finish_non_exhaustive()
    }
}

/// The default clinical view of one patient (entered-in-error entries left out and counted).
#[derive(Debug, Clone, uniffi::Record)]
pub struct PatientView {
    pub patient_id: String,
    pub demographics: Demographics,
    /// When this device last received server data for the patient.
    pub as_of_ms: i64,
    pub last_sync_ms: Option<i64>,
    pub alerts: Vec<AlertEntry>,
    pub allergies: Vec<AllergyEntry>,
    pub allergies_status: SectionStatus,
    pub medications: Vec<MedicationEntry>,
    pub medications_status: SectionStatus,
    pub problems: Vec<ProblemEntry>,
    pub problems_status: SectionStatus,
    pub care_plans: Vec<CarePlanEntry>,
    pub contacts: Vec<ContactEntry>,
    pub encounters: Vec<EncounterEntry>,
    pub results: Vec<ReportEntry>,
    pub entered_in_error_hidden: u32,
    /// This device's entries the server refused (not in the shared record).
    pub refused: Vec<RefusedEntry>,
}

fn status(summary: &mut PatientSummary, section: Section) -> Result<SectionStatus, CareError> {
    Ok(match summary.section_state(section)? {
        SectionState::Entries => SectionStatus::Entries,
        SectionState::NoneKnown(_) => SectionStatus::NoneKnown,
        SectionState::NoInformation => SectionStatus::NoInformation,
    })
}

fn entries<T: SectionEntry, R>(
    summary: &mut PatientSummary,
    hidden: &mut u32,
    make: impl Fn(String, T, Vec<FieldConflict>) -> R,
) -> Result<Vec<R>, CareError> {
    let (shown, not_shown) = summary.shown_entries::<T>()?;
    *hidden += not_shown as u32;
    Ok(shown.into_iter().map(|e| make(e.id.to_string(), e.data, e.conflicts)).collect())
}

impl PatientView {
    pub(crate) fn build(
        patient: &mut StoredPatient,
        sync: &SyncState,
        refused: Vec<Diverged>,
    ) -> Result<Self, CareError> {
        let s = &mut patient.summary;
        let mut hidden = 0;
        let patient_id = s.patient_id()?;
        let refused = refused
            .into_iter()
            .filter(|d| d.doc == patient_id)
            .map(|d| RefusedEntry {
                explanation: care_node::policy::Rule::parse(&d.rule).map_or("", |r| r.explain()).to_string(),
                place: d.place,
                rule: d.rule,
                refused_at_ms: d.at_ms,
                entries: d.entries,
            })
            .collect();
        Ok(Self {
            patient_id: patient_id.to_string(),
            demographics: s.demographics()?,
            as_of_ms: patient.received_at_ms,
            last_sync_ms: sync.last_sync_ms,
            alerts: entries(s, &mut hidden, |id, entry, conflicts| AlertEntry { id, entry, conflicts })?,
            allergies: entries(s, &mut hidden, |id, entry, conflicts| AllergyEntry { id, entry, conflicts })?,
            allergies_status: status(s, Section::Allergies)?,
            medications: entries(s, &mut hidden, |id, entry, conflicts| MedicationEntry {
                id,
                entry,
                conflicts,
            })?,
            medications_status: status(s, Section::Medications)?,
            problems: entries(s, &mut hidden, |id, entry, conflicts| ProblemEntry { id, entry, conflicts })?,
            problems_status: status(s, Section::Problems)?,
            care_plans: entries(s, &mut hidden, |id, entry, conflicts| CarePlanEntry {
                id,
                entry,
                conflicts,
            })?,
            contacts: entries(s, &mut hidden, |id, entry, conflicts| ContactEntry { id, entry, conflicts })?,
            encounters: entries(s, &mut hidden, |id, entry, conflicts| EncounterEntry {
                id,
                entry,
                conflicts,
            })?,
            results: entries(s, &mut hidden, |id, entry, conflicts| ReportEntry { id, entry, conflicts })?,
            entered_in_error_hidden: hidden,
            refused,
        })
    }
}
