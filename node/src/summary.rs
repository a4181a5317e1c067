//! The patient summary: one Automerge document per patient.
//!
//! Layout (schema version 1):
//! ```text
//! ROOT { schema_version, patient_id, demographics: {nhs_number, name, date_of_birth, postcode},
//!        problems: {<uuid>: Problem}, allergies: {<uuid>: Allergy},
//!        medications: {<uuid>: Medication}, alerts: {<uuid>: Alert} }
//! ```
//! Every clinical entry lives in a map keyed by its own UUID, never in a list, so entries added
//! concurrently on two devices both survive a merge. The section maps are created once, by the
//! server, when the patient is created; devices only add to them. Nothing here deletes an entry.

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, Change, ObjType, ROOT, ReadDoc};
use autosurgeon::{Hydrate, Reconcile, hydrate_prop, reconcile_prop};
use uuid::Uuid;

use crate::nhs::NhsNumber;

/// The schema version this code writes. Older documents are migrated on load (none yet).
pub const SCHEMA_VERSION: u64 = 1;

/// The server's opaque id of a patient (and of the patient's document). Not identifiable.
pub type PatientId = Uuid;

/// The id of one clinical entry, stable for its whole life.
pub type EntryId = Uuid;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SummaryError {
    #[error("not a valid Automerge document: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    #[error("the document does not have the patient-summary layout: {0}")]
    Layout(String),
    #[error("the document's schema version {0} is newer than this software understands")]
    TooNew(u64),
    #[error("the document's NHS number is invalid")]
    InvalidNhsNumber,
}

impl From<autosurgeon::HydrateError> for SummaryError {
    fn from(e: autosurgeon::HydrateError) -> Self {
        Self::Layout(e.to_string())
    }
}

impl From<autosurgeon::ReconcileError> for SummaryError {
    fn from(e: autosurgeon::ReconcileError) -> Self {
        Self::Layout(e.to_string())
    }
}

/// Who recorded an entry, and when (the recording device's clock; see the hazard log).
#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate)]
pub struct Provenance {
    /// Opaque id of the device (the first bytes of its public key, in hex), or `server`.
    pub device: String,
    /// The device's enrolled name, e.g. `ambulance-7`.
    pub device_name: String,
    /// The device's role, e.g. `ambulance-crew`.
    pub role: String,
    /// Milliseconds since the Unix epoch, as the recording device's clock said.
    pub recorded_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate)]
pub struct Demographics {
    pub nhs_number: String,
    pub name: String,
    /// ISO 8601 date, `YYYY-MM-DD`.
    pub date_of_birth: String,
    pub postcode: String,
}

/// FHIR verification status: `confirmed`, `unconfirmed`, ..., or `entered-in-error`.
pub const CONFIRMED: &str = "confirmed";

#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate)]
pub struct Problem {
    pub description: String,
    pub clinical_status: String,
    pub verification_status: String,
    pub provenance: Provenance,
}

#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate)]
pub struct Allergy {
    pub substance: String,
    pub reaction: Option<String>,
    pub severity: Option<String>,
    pub verification_status: String,
    pub provenance: Provenance,
}

#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate)]
pub struct Medication {
    pub name: String,
    pub dose: Option<String>,
    pub status: String,
    pub verification_status: String,
    pub provenance: Provenance,
}

#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate)]
pub struct Alert {
    /// e.g. `respect-dnacpr`, `safeguarding`, `communication`, `access`.
    pub kind: String,
    pub description: String,
    pub verification_status: String,
    pub provenance: Provenance,
}

/// A type of clinical entry and the section map it lives in.
pub trait SectionEntry: Reconcile + Hydrate + Clone {
    const SECTION: Section;
    fn provenance(&self) -> &Provenance;
}

/// The clinical sections of a summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Section {
    Problems,
    Allergies,
    Medications,
    Alerts,
}

impl Section {
    pub const ALL: [Section; 4] =
        [Section::Alerts, Section::Allergies, Section::Medications, Section::Problems];

    pub fn key(self) -> &'static str {
        match self {
            Section::Problems => "problems",
            Section::Allergies => "allergies",
            Section::Medications => "medications",
            Section::Alerts => "alerts",
        }
    }
}

macro_rules! section_entry {
    ($ty:ty, $section:expr) => {
        impl SectionEntry for $ty {
            const SECTION: Section = $section;
            fn provenance(&self) -> &Provenance {
                &self.provenance
            }
        }
    };
}
section_entry!(Problem, Section::Problems);
section_entry!(Allergy, Section::Allergies);
section_entry!(Medication, Section::Medications);
section_entry!(Alert, Section::Alerts);

/// One patient's summary document.
pub struct PatientSummary {
    doc: AutoCommit,
}

impl PatientSummary {
    /// Creates a patient's document with its section maps. Only the server does this, so that
    /// every replica shares one set of section objects.
    pub fn create(
        patient_id: PatientId,
        demographics: &Demographics,
        actor: ActorId,
        now_ms: i64,
    ) -> Result<Self, SummaryError> {
        NhsNumber::parse(&demographics.nhs_number).map_err(|_| SummaryError::InvalidNhsNumber)?;
        let mut doc = AutoCommit::new().with_actor(actor);
        doc.put(ROOT, "schema_version", SCHEMA_VERSION)?;
        doc.put(ROOT, "patient_id", patient_id.to_string())?;
        reconcile_prop(&mut doc, ROOT, "demographics", demographics)?;
        for section in Section::ALL {
            doc.put_object(ROOT, section.key(), ObjType::Map)?;
        }
        doc.commit_with(CommitOptions::default().with_time(now_ms / 1000));
        Ok(Self { doc })
    }

    /// Loads a saved document (or concatenated changes) and checks its layout.
    pub fn load(bytes: &[u8]) -> Result<Self, SummaryError> {
        let summary = Self { doc: AutoCommit::load(bytes)? };
        let version = summary.schema_version()?;
        if version > SCHEMA_VERSION {
            return Err(SummaryError::TooNew(version));
        }
        Ok(summary)
    }

    /// Sets the actor for local edits: a device's public key, so the server can check authorship.
    pub fn set_actor(&mut self, actor: &[u8]) {
        self.doc.set_actor(ActorId::from(actor));
    }

    pub fn schema_version(&self) -> Result<u64, SummaryError> {
        match self.doc.get(ROOT, "schema_version")? {
            Some((automerge::Value::Scalar(s), _)) => match s.as_ref() {
                automerge::ScalarValue::Uint(v) => Ok(*v),
                automerge::ScalarValue::Int(v) if *v >= 0 => Ok(*v as u64),
                _ => Err(SummaryError::Layout("schema_version is not a number".into())),
            },
            _ => Err(SummaryError::Layout("schema_version is missing".into())),
        }
    }

    pub fn patient_id(&self) -> Result<PatientId, SummaryError> {
        let id: String = hydrate_prop(&self.doc, ROOT, "patient_id")?;
        id.parse().map_err(|_| SummaryError::Layout("patient_id is not a UUID".into()))
    }

    pub fn demographics(&self) -> Result<Demographics, SummaryError> {
        Ok(hydrate_prop(&self.doc, ROOT, "demographics")?)
    }

    /// The validated NHS number of this patient.
    pub fn nhs_number(&self) -> Result<NhsNumber, SummaryError> {
        NhsNumber::parse(&self.demographics()?.nhs_number).map_err(|_| SummaryError::InvalidNhsNumber)
    }

    /// Adds a new entry under a fresh id and commits it as one change.
    pub fn add<T: SectionEntry>(&mut self, entry: &T) -> Result<EntryId, SummaryError> {
        let id = Uuid::new_v4();
        let section = self.section_obj(T::SECTION)?;
        reconcile_prop(&mut self.doc, &section, id.to_string().as_str(), entry)?;
        self.doc.commit_with(CommitOptions::default().with_time(entry.provenance().recorded_at_ms / 1000));
        Ok(id)
    }

    /// All entries of one section, oldest first (ties broken by id, so every replica agrees).
    pub fn entries<T: SectionEntry>(&self) -> Result<Vec<(EntryId, T)>, SummaryError> {
        let section = self.section_obj(T::SECTION)?;
        let mut entries = Vec::new();
        for key in self.doc.keys(&section) {
            let id: EntryId =
                key.parse().map_err(|_| SummaryError::Layout("entry key is not a UUID".into()))?;
            let entry: T = hydrate_prop(&self.doc, &section, key.as_str())?;
            entries.push((id, entry));
        }
        entries.sort_by_key(|(id, e)| (e.provenance().recorded_at_ms, *id));
        Ok(entries)
    }

    fn section_obj(&self, section: Section) -> Result<automerge::ObjId, SummaryError> {
        match self.doc.get(ROOT, section.key())? {
            Some((automerge::Value::Object(ObjType::Map), id)) => Ok(id),
            _ => Err(SummaryError::Layout(format!("section {} is missing", section.key()))),
        }
    }

    /// The time of the newest change in the document, in milliseconds (from change metadata).
    pub fn last_change_ms(&mut self) -> Option<i64> {
        let heads = self.doc.get_heads();
        heads.iter().filter_map(|h| self.doc.get_change_by_hash(h)).map(|c| c.timestamp() * 1000).max()
    }

    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    /// The change made by the last local commit, to queue for upload.
    pub fn last_local_change(&mut self) -> Option<Change> {
        self.doc.get_last_local_change()
    }

    /// Applies changes received from elsewhere; duplicates are ignored.
    pub fn apply_changes(&mut self, changes: Vec<Change>) -> Result<(), SummaryError> {
        self.doc.apply_changes(changes)?;
        Ok(())
    }

    /// Merges a whole saved document (or any concatenation of changes) into this one.
    pub fn merge_saved(&mut self, bytes: &[u8]) -> Result<(), SummaryError> {
        self.doc.load_incremental(bytes)?;
        Ok(())
    }

    /// True when some applied change waits for a dependency this replica lacks.
    pub fn has_missing_deps(&mut self) -> bool {
        !self.doc.get_missing_deps(&[]).is_empty()
    }

    /// Whether the document already contains a change.
    pub fn has_change(&mut self, hash: &automerge::ChangeHash) -> bool {
        self.doc.get_change_by_hash(hash).is_some()
    }

    /// All changes of the document, for whoever needs the full history.
    pub fn all_changes(&mut self) -> Vec<Change> {
        self.doc.get_changes(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn demographics() -> Demographics {
        Demographics {
            nhs_number: "9990000018".into(),
            name: "Test Patient".into(),
            date_of_birth: "1930-01-01".into(),
            postcode: "SO16 6YD".into(),
        }
    }

    fn provenance(device: &str, at: i64) -> Provenance {
        Provenance {
            device: device.into(),
            device_name: device.into(),
            role: "ambulance-crew".into(),
            recorded_at_ms: at,
        }
    }

    fn allergy(substance: &str, device: &str, at: i64) -> Allergy {
        Allergy {
            substance: substance.into(),
            reaction: Some("rash".into()),
            severity: None,
            verification_status: CONFIRMED.into(),
            provenance: provenance(device, at),
        }
    }

    #[test]
    fn concurrent_entries_on_two_replicas_both_survive_the_merge() {
        let id = Uuid::new_v4();
        let mut server =
            PatientSummary::create(id, &demographics(), ActorId::from(&[0u8; 4][..]), 0).unwrap();
        let saved = server.save();
        let mut a = PatientSummary::load(&saved).unwrap();
        let mut b = PatientSummary::load(&saved).unwrap();
        a.set_actor(&[1; 32]);
        b.set_actor(&[2; 32]);
        a.add(&allergy("penicillin", "a", 1_000)).unwrap();
        b.add(&allergy("latex", "b", 2_000)).unwrap();
        let change_b = b.last_local_change().unwrap();
        let change_a = a.last_local_change().unwrap();
        a.apply_changes(vec![change_b]).unwrap();
        b.apply_changes(vec![change_a]).unwrap();
        let names = |s: &PatientSummary| {
            s.entries::<Allergy>().unwrap().into_iter().map(|(_, e)| e.substance).collect::<Vec<_>>()
        };
        assert_eq!(names(&a), vec!["penicillin", "latex"]);
        assert_eq!(names(&a), names(&b));
        assert_eq!(a.patient_id().unwrap(), id);
    }

    #[test]
    fn invalid_nhs_numbers_are_refused_at_creation() {
        let mut d = demographics();
        d.nhs_number = "9990000010".into();
        assert!(matches!(
            PatientSummary::create(Uuid::new_v4(), &d, ActorId::random(), 0),
            Err(SummaryError::InvalidNhsNumber)
        ));
    }

    #[test]
    fn garbage_is_not_a_summary() {
        assert!(PatientSummary::load(b"not automerge").is_err());
        let mut empty = AutoCommit::new();
        empty.put(ROOT, "x", 1).unwrap();
        assert!(matches!(PatientSummary::load(&empty.save()), Err(SummaryError::Layout(_))));
    }
}
