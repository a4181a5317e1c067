//! The patient summary: one Automerge document per patient.
//!
//! Over 600 lines because it is the document's one typed API (36 public functions), so the
//! layout below is decided here only; entry types are in `entries.rs`, schema migrations in
//! `migrate.rs`, merging records in `merge.rs`, tests in `tests.rs`.
//!
//! Layout (schema version 2; version 1 lacked `actors`, `assertions` and the last four sections):
//! ```text
//! ROOT { schema_version, patient_id, demographics: {...},
//!        actors: {<actor hex>: {device_name, role}},
//!        assertions: {<section>: {status, provenance}},
//!        alerts | allergies | medications | problems | care_plans | contacts | encounters | results:
//!            {<entry uuid>: {...fields, entered_in_error?}} }
//! ```
//! Safety rules this module enforces:
//! - every entry lives in a map keyed by its own UUID, never a list, so concurrent additions all
//!   survive; the server creates every map once, so replicas share them;
//! - nothing is deleted: a mistaken entry gets an `entered_in_error` record, which nothing can
//!   remove, and disappears from the default clinical view but stays in the record;
//! - concurrent writes to one field are surfaced as [`FieldConflict`]s with authors and times;
//! - entries are ordered by the Lamport counter of the operation that created them (causal order,
//!   identical on every replica), never by device clocks alone.

mod entries;
mod merge;
pub mod migrate;
mod vitals;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, Change, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use autosurgeon::{Hydrate, Reconcile, hydrate_prop, reconcile_prop};
use uuid::Uuid;

pub use entries::*;
pub use vitals::vitals_line;

use crate::nhs::NhsNumber;

/// The schema version this code writes.
pub const SCHEMA_VERSION: u64 = 2;

/// The server's opaque id of a patient (and of the patient's document). Not identifiable.
pub type PatientId = Uuid;

/// The id of one clinical entry, stable for its whole life.
pub type EntryId = Uuid;

/// Namespace for entry ids derived from source identifiers (UUID v5).
const ENTRY_NAMESPACE: Uuid = Uuid::from_u128(0x6b1f_3c2e_9a0d_4f6e_8c7b_2d1e_0f3a_5b49);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SummaryError {
    #[error("not a valid Automerge document: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    #[error("the document does not have the patient-summary layout: {0}")]
    Layout(String),
    #[error("the document's schema version {0} is newer than this software understands")]
    TooNew(u64),
    #[error("the NHS number is invalid")]
    InvalidNhsNumber,
    #[error("this patient has no NHS number (provisional record)")]
    NoNhsNumber,
    #[error("no entry {0} in this section")]
    UnknownEntry(String),
    #[error("this document predates section {0}; it is migrated by the server at the next sync")]
    NeedsMigration(&'static str),
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

/// The clinical sections of a summary, in the order a crew reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
// The command line's spelling (`care-plans`); only with the `cli` feature, so the mobile
// library does not link clap.
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Section {
    Alerts,
    Allergies,
    Medications,
    Problems,
    CarePlans,
    Contacts,
    Encounters,
    Results,
}

impl Section {
    pub const ALL: [Section; 8] = [
        Section::Alerts,
        Section::Allergies,
        Section::Medications,
        Section::Problems,
        Section::CarePlans,
        Section::Contacts,
        Section::Encounters,
        Section::Results,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Section::Alerts => "alerts",
            Section::Allergies => "allergies",
            Section::Medications => "medications",
            Section::Problems => "problems",
            Section::CarePlans => "care_plans",
            Section::Contacts => "contacts",
            Section::Encounters => "encounters",
            Section::Results => "results",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.key() == key)
    }

    /// The IPS sections that must say "none known" or "no information" when empty.
    pub fn requires_assertion(self) -> bool {
        matches!(self, Section::Allergies | Section::Medications | Section::Problems)
    }
}

/// A type of clinical entry and the section map it lives in.
pub trait SectionEntry: Reconcile + Hydrate + Clone {
    const SECTION: Section;
    fn provenance(&self) -> &Provenance;
    /// The FHIR verification status as recorded in this value.
    fn verification_status(&self) -> &str;
    /// One line for a clinician.
    fn summary_line(&self) -> String;
}

macro_rules! section_entry {
    ($ty:ty, $section:expr, |$e:ident| $line:expr) => {
        impl SectionEntry for $ty {
            const SECTION: Section = $section;
            fn provenance(&self) -> &Provenance {
                &self.provenance
            }
            fn verification_status(&self) -> &str {
                &self.verification_status
            }
            fn summary_line(&self) -> String {
                let $e = self;
                $line
            }
        }
    };
}

fn join(parts: &[Option<&str>]) -> String {
    parts.iter().flatten().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join(", ")
}

section_entry!(Problem, Section::Problems, |p| format!("{} ({})", p.description, p.clinical_status));
section_entry!(Allergy, Section::Allergies, |a| {
    let mut line = a.substance.clone();
    if let Some(r) = &a.reaction {
        line.push_str(&format!(" — {r}"));
    }
    let extra = join(&[
        a.severity.as_deref(),
        a.criticality.as_deref().map(|c| if c == "high" { "high criticality" } else { c }),
    ]);
    if !extra.is_empty() {
        line.push_str(&format!(" ({extra})"));
    }
    line
});
section_entry!(Medication, Section::Medications, |m| {
    let details = join(&[m.dose.as_deref(), m.route.as_deref(), m.frequency.as_deref()]);
    if details.is_empty() {
        format!("{} [{}]", m.name, m.status)
    } else {
        format!("{}, {details} [{}]", m.name, m.status)
    }
});
section_entry!(Alert, Section::Alerts, |a| {
    let mut line = format!("{}: {}", a.kind, a.description);
    if let Some(d) = &a.decision_date {
        line.push_str(&format!(
            " (decided {d}{})",
            a.author.as_ref().map(|x| format!(" by {x}")).unwrap_or_default()
        ));
    }
    line
});
section_entry!(CarePlan, Section::CarePlans, |c| format!("{} [{}]", c.title, c.status));
section_entry!(Contact, Section::Contacts, |c| {
    format!(
        "{}: {}{}",
        c.relationship,
        c.name,
        c.phone.as_ref().map(|p| format!(", {p}")).unwrap_or_default()
    )
});
section_entry!(Encounter, Section::Encounters, |e| {
    let mut line = format!("{} [{}]", e.kind, e.status);
    let place = join(&[e.location.as_deref(), e.facility.as_deref()]);
    if !place.is_empty() {
        line.push_str(&format!(" at {place}"));
    }
    if let Some(s) = &e.start {
        line.push_str(&format!(", from {s}"));
    }
    if let Some(s) = &e.end {
        line.push_str(&format!(" to {s}"));
    }
    if let Some(v) = &e.vitals {
        line.push_str(&format!(": {}", vitals_line(v)));
    }
    line
});
section_entry!(Report, Section::Results, |r| {
    let value = join(&[r.value.as_deref(), r.unit.as_deref()]);
    if value.is_empty() {
        format!("{}: {} [{}]", r.kind, r.title, r.status)
    } else {
        format!("{}: {} = {value} [{}]", r.kind, r.title, r.status)
    }
});

/// The demographics a device lists and searches by (see [`PatientSummary::listing`]). The
/// server sends it with each document newly in a device's scope, so the device can store the
/// document as received without parsing it (see `DocBody::Whole`).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Listing {
    pub nhs_number: Option<String>,
    pub name: String,
    pub date_of_birth: Option<String>,
    pub postcode: Option<String>,
}

crate::redacted_debug!(Listing);

/// An entry with what the record knows around it.
#[derive(Debug, Clone)]
pub struct Entry<T> {
    pub id: EntryId,
    pub data: T,
    /// Present when the entry was marked as recorded by mistake.
    pub entered_in_error: Option<EnteredInError>,
    /// Fields that devices wrote concurrently with different values.
    pub conflicts: Vec<FieldConflict>,
}

/// Concurrent, differing values of one field: all are shown; none is silently chosen.
#[derive(Clone, PartialEq, Eq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct FieldConflict {
    pub field: String,
    pub values: Vec<ConflictValue>,
}

/// Who wrote a value and when, never the value.
impl std::fmt::Debug for ConflictValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConflictValue")
            .field("author", &self.author)
            .field("at_ms", &self.at_ms)
            .finish_non_exhaustive()
    }
}

/// The field's name and how many values, never the values (a clinician's words).
impl std::fmt::Debug for FieldConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FieldConflict")
            .field("field", &self.field)
            .field("values", &self.values.len())
            .finish()
    }
}

#[derive(Clone, PartialEq, Eq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct ConflictValue {
    pub value: String,
    /// The device (or feed) that wrote it.
    pub author: String,
    /// When the change that wrote it was committed (its author's clock), in milliseconds.
    pub at_ms: i64,
}

/// The state of an IPS section that must not be silently empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SectionState {
    /// Nothing recorded and nobody asserted "none known".
    NoInformation,
    /// A clinician or feed asserted there is none (e.g. no known allergies) and nothing since.
    NoneKnown(Provenance),
    /// There are entries (the list comes from [`PatientSummary::entries`]).
    Entries,
}

#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate)]
struct Assertion {
    status: String,
    provenance: Provenance,
}

#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate)]
struct ActorInfo {
    device_name: String,
    role: String,
}

/// One patient's summary document.
pub struct PatientSummary {
    doc: AutoCommit,
    /// While set ([`PatientSummary::defer_commits`]), writes gather into one change, to be
    /// committed at the latest time any of them was recorded.
    deferred: Option<i64>,
}

impl std::fmt::Debug for PatientSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PatientSummary([redacted])")
    }
}

impl PatientSummary {
    /// Creates a patient's document with every section map. Only the server does this, so that
    /// every replica shares one set of maps. The NHS number, when given, must be valid.
    pub fn create(
        patient_id: PatientId,
        demographics: &Demographics,
        actor: ActorId,
        now_ms: i64,
    ) -> Result<Self, SummaryError> {
        if let Some(nhs) = &demographics.nhs_number {
            NhsNumber::parse(nhs).map_err(|_| SummaryError::InvalidNhsNumber)?;
        }
        let mut doc = AutoCommit::new().with_actor(actor);
        doc.put(ROOT, "schema_version", SCHEMA_VERSION)?;
        doc.put(ROOT, "patient_id", patient_id.to_string())?;
        autosurgeon::reconcile(&mut doc, PutFresh { key: "demographics", value: demographics })?;
        doc.put_object(ROOT, "actors", ObjType::Map)?;
        doc.put_object(ROOT, "assertions", ObjType::Map)?;
        for section in Section::ALL {
            doc.put_object(ROOT, section.key(), ObjType::Map)?;
        }
        doc.commit_with(CommitOptions::default().with_time(now_ms / 1000));
        Ok(Self { doc, deferred: None })
    }

    /// Loads a saved document (or concatenated changes) of this or an older schema version.
    pub fn load(bytes: &[u8]) -> Result<Self, SummaryError> {
        let summary = Self { doc: AutoCommit::load(bytes)?, deferred: None };
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
            Some((Value::Scalar(s), _)) => match s.as_ref() {
                ScalarValue::Uint(v) => Ok(*v),
                ScalarValue::Int(v) if *v >= 0 => Ok(*v as u64),
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

    /// What a device lists and finds a patient by, read straight from the document: the hot path
    /// of receiving thousands of documents, where hydrating all demographics would cost a third
    /// of the time. Agrees with [`PatientSummary::demographics`] (tested).
    pub fn listing(&self) -> Result<Listing, SummaryError> {
        let Some((Value::Object(ObjType::Map), demographics)) = self.doc.get(ROOT, "demographics")? else {
            return Err(SummaryError::Layout("no demographics".into()));
        };
        let text = |key: &str| -> Result<Option<String>, SummaryError> {
            match self.doc.get(&demographics, key)? {
                None => Ok(None),
                Some((Value::Scalar(s), _)) => match s.as_ref() {
                    ScalarValue::Str(t) => Ok(Some(t.to_string())),
                    ScalarValue::Null => Ok(None),
                    _ => Err(SummaryError::Layout(format!("demographics.{key} is not text"))),
                },
                Some((Value::Object(ObjType::Text), id)) => Ok(Some(self.doc.text(&id)?)),
                Some(_) => Err(SummaryError::Layout(format!("demographics.{key} is not text"))),
            }
        };
        Ok(Listing {
            nhs_number: text("nhs_number")?,
            name: text("name")?.ok_or_else(|| SummaryError::Layout("demographics.name is missing".into()))?,
            date_of_birth: text("date_of_birth")?,
            postcode: text("postcode")?,
        })
    }

    /// The validated NHS number, or [`SummaryError::NoNhsNumber`] for a provisional record.
    pub fn nhs_number(&self) -> Result<NhsNumber, SummaryError> {
        let nhs = self.demographics()?.nhs_number.ok_or(SummaryError::NoNhsNumber)?;
        NhsNumber::parse(&nhs).map_err(|_| SummaryError::InvalidNhsNumber)
    }

    /// Replaces the demographics (feeds and operators only), writing only fields that changed.
    pub fn set_demographics(&mut self, demographics: &Demographics, now_ms: i64) -> Result<(), SummaryError> {
        if let Some(nhs) = &demographics.nhs_number {
            NhsNumber::parse(nhs).map_err(|_| SummaryError::InvalidNhsNumber)?;
        }
        reconcile_prop(&mut self.doc, ROOT, "demographics", demographics)?;
        self.commit(now_ms);
        Ok(())
    }

    fn commit(&mut self, at_ms: i64) {
        match &mut self.deferred {
            Some(latest) => *latest = (*latest).max(at_ms),
            None => {
                self.doc.commit_with(CommitOptions::default().with_time(at_ms / 1000));
            }
        }
    }

    /// Gathers the writes that follow into one change (an import's many entries), until
    /// [`PatientSummary::commit_deferred`]: one change is stored, logged and sent instead of
    /// one per entry, and the document is the same.
    pub fn defer_commits(&mut self) {
        self.deferred.get_or_insert(i64::MIN);
    }

    /// Commits what was gathered since [`PatientSummary::defer_commits`] as one change.
    pub fn commit_deferred(&mut self) {
        if let Some(at_ms) = self.deferred.take()
            && self.doc.pending_ops() > 0
        {
            self.doc.commit_with(CommitOptions::default().with_time(at_ms.max(0) / 1000));
        }
    }

    fn map_at(&self, parent: &ObjId, key: &str) -> Result<Option<ObjId>, SummaryError> {
        Ok(match self.doc.get(parent, key)? {
            Some((Value::Object(ObjType::Map), id)) => Some(id),
            _ => None,
        })
    }

    fn section_obj(&self, section: Section) -> Result<ObjId, SummaryError> {
        self.map_at(&ROOT, section.key())?.ok_or(SummaryError::NeedsMigration(section.key()))
    }

    /// Records the current actor's device name and role once, so conflicts can name authors.
    fn register_actor(&mut self, provenance: &Provenance) -> Result<(), SummaryError> {
        let Some(actors) = self.map_at(&ROOT, "actors")? else { return Ok(()) };
        let actor = self.doc.get_actor().to_hex_string();
        if self.doc.get(&actors, actor.as_str())?.is_none() {
            // The server's actor writes for every feed, so it is named as the server.
            let info = if provenance.device == "server" {
                ActorInfo { device_name: "regional server".into(), role: "server".into() }
            } else {
                ActorInfo { device_name: provenance.device_name.clone(), role: provenance.role.clone() }
            };
            reconcile_prop(&mut self.doc, &actors, actor.as_str(), &info)?;
        }
        Ok(())
    }

    /// Adds a new entry under a fresh id and commits it as one change.
    pub fn add<T: SectionEntry>(&mut self, entry: &T) -> Result<EntryId, SummaryError> {
        let id = Uuid::new_v4();
        self.upsert(id, entry)?;
        Ok(id)
    }

    /// The entry id for a fact from an external source: the same source identifier always gives
    /// the same id, so re-importing never duplicates.
    pub fn source_entry_id(patient: &PatientId, section: Section, source_id: &str) -> EntryId {
        let mut name = patient.as_bytes().to_vec();
        name.extend_from_slice(section.key().as_bytes());
        name.push(0);
        name.extend_from_slice(source_id.as_bytes());
        Uuid::new_v5(&ENTRY_NAMESPACE, &name)
    }

    /// Writes an entry under `id`, creating or updating it (only changed fields are written). An
    /// entry marked entered-in-error stays so, whatever the new data says. Returns whether
    /// anything changed.
    pub fn upsert<T: SectionEntry>(&mut self, id: EntryId, entry: &T) -> Result<bool, SummaryError> {
        let section = self.section_obj(T::SECTION)?;
        let key = id.to_string();
        let before = self.doc.pending_ops();
        let existing = self.map_at(&section, &key)?;
        let existing_error = match &existing {
            Some(obj) => self.entered_in_error_of(obj)?,
            None => None,
        };
        match existing {
            Some(_) => reconcile_prop(&mut self.doc, &section, key.as_str(), entry)?,
            None => reconcile_prop(
                &mut self.doc,
                ROOT,
                T::SECTION.key(),
                PutFresh { key: key.as_str(), value: entry },
            )?,
        }
        if let Some(error) = existing_error {
            // Re-assert the sticky marker in case the incoming data carried another status.
            let obj = self.map_at(&section, &key)?.expect("entry just written");
            self.doc.put(&obj, "verification_status", ENTERED_IN_ERROR)?;
            reconcile_prop(&mut self.doc, &obj, "entered_in_error", &error)?;
        }
        // Reconciling writes only what differs: any operation is a change. The writer is named
        // only when it wrote something (a feed's re-import of what is there writes nothing, even
        // as an actor the document has not seen).
        let changed = self.doc.pending_ops() > before;
        if changed {
            self.register_actor(entry.provenance())?;
        }
        self.commit(entry.provenance().recorded_at_ms);
        Ok(changed)
    }

    fn entered_in_error_of(&self, entry: &ObjId) -> Result<Option<EnteredInError>, SummaryError> {
        let Some(id) = marker_among(self.doc.get_all(entry, "entered_in_error")?) else { return Ok(None) };
        let marker: EnteredInError = autosurgeon::hydrate_prop(&self.doc, entry, "entered_in_error")
            .or_else(|_| hydrate_obj(&self.doc, &id))?;
        Ok(Some(marker))
    }

    /// Marks an entry as recorded by mistake. It stays in the record, hidden from the clinical
    /// view, and no later or concurrent edit brings it back.
    pub fn mark_entered_in_error(
        &mut self,
        section: Section,
        id: EntryId,
        reason: &str,
        provenance: &Provenance,
    ) -> Result<(), SummaryError> {
        let section_obj = self.section_obj(section)?;
        let entry =
            self.map_at(&section_obj, &id.to_string())?.ok_or(SummaryError::UnknownEntry(id.to_string()))?;
        self.register_actor(provenance)?;
        self.doc.put(&entry, "verification_status", ENTERED_IN_ERROR)?;
        let marker = EnteredInError { reason: reason.to_string(), provenance: provenance.clone() };
        reconcile_prop(&mut self.doc, &entry, "entered_in_error", &marker)?;
        self.commit(provenance.recorded_at_ms);
        Ok(())
    }

    /// Sets one scalar field of an entry (e.g. an allergy's severity), as one change.
    pub fn set_field(
        &mut self,
        section: Section,
        id: EntryId,
        field: &str,
        value: &str,
        provenance: &Provenance,
    ) -> Result<(), SummaryError> {
        if field == "entered_in_error" || field == "provenance" {
            return Err(SummaryError::Layout(format!("field {field} cannot be set directly")));
        }
        let section_obj = self.section_obj(section)?;
        let entry =
            self.map_at(&section_obj, &id.to_string())?.ok_or(SummaryError::UnknownEntry(id.to_string()))?;
        self.register_actor(provenance)?;
        let value = if field == "verification_status" && self.entered_in_error_of(&entry)?.is_some() {
            ENTERED_IN_ERROR
        } else {
            value
        };
        self.doc.put(&entry, field, value)?;
        self.commit(provenance.recorded_at_ms);
        Ok(())
    }

    /// One entry's data by its id (entered in error or not), reading that entry alone.
    pub fn entry_data<T: SectionEntry>(&self, id: EntryId) -> Result<Option<T>, SummaryError> {
        let Some(section) = self.map_at(&ROOT, T::SECTION.key())? else { return Ok(None) };
        let key = id.to_string();
        match self.doc.get(&section, key.as_str())? {
            None => Ok(None),
            Some((Value::Object(ObjType::Map), _)) => {
                Ok(Some(hydrate_prop(&self.doc, &section, key.as_str())?))
            }
            Some(_) => Err(SummaryError::Layout("an entry is not a map".into())),
        }
    }

    /// The entries of `section` created or written since `before` (heads of this document),
    /// in the order [`PatientSummary::entries`] lists them: what a received change touched,
    /// found from the section's diff instead of reading every entry twice. A section map that
    /// did not exist at `before` (one that won a conflict at the root, say) diffs as wholly new,
    /// so all it shows is counted (tested in `notify`).
    pub fn entries_changed_since(
        &mut self,
        section: Section,
        before: &[ChangeHash],
    ) -> Result<Vec<EntryId>, SummaryError> {
        let Some(section_obj) = self.map_at(&ROOT, section.key())? else { return Ok(Vec::new()) };
        let after = self.doc.get_heads();
        let mut keys = std::collections::BTreeSet::new();
        for patch in self.doc.diff_obj(&section_obj, before, &after, true)? {
            if patch.obj == section_obj {
                if let automerge::PatchAction::PutMap { key, .. } = &patch.action {
                    keys.insert(key.clone());
                }
            } else if let Some((_, automerge::Prop::Map(key))) =
                patch.path.iter().find(|(o, _)| *o == section_obj)
            {
                keys.insert(key.clone());
            }
        }
        let mut found = Vec::new();
        for key in keys {
            let Some((Value::Object(ObjType::Map), obj)) = self.doc.get(&section_obj, key.as_str())? else {
                continue;
            };
            let id: EntryId =
                key.parse().map_err(|_| SummaryError::Layout("entry key is not a UUID".into()))?;
            let order = creation_order(&obj);
            found.push((order, id));
        }
        found.sort();
        Ok(found.into_iter().map(|(_, id)| id).collect())
    }

    /// One entry as a clinician sees it: `None` if it is not there or was entered in error.
    pub fn clinical_entry<T: SectionEntry>(&self, id: EntryId) -> Result<Option<T>, SummaryError> {
        let Some(section) = self.map_at(&ROOT, T::SECTION.key())? else { return Ok(None) };
        let key = id.to_string();
        let Some(obj) = self.map_at(&section, &key)? else { return Ok(None) };
        if self.entered_in_error_of(&obj)?.is_some() {
            return Ok(None);
        }
        Ok(Some(hydrate_prop(&self.doc, &section, key.as_str())?))
    }

    /// A text field of an entry as it stood at `heads` (an earlier version of this document),
    /// as a clinician saw it then: `None` if the entry was not there, was entered in error, or
    /// the field was empty.
    pub fn clinical_text_at(
        &self,
        section: Section,
        id: EntryId,
        field: &str,
        heads: &[ChangeHash],
    ) -> Result<Option<String>, SummaryError> {
        let map_at = |parent: &ObjId, key: &str| -> Result<Option<ObjId>, SummaryError> {
            Ok(match self.doc.get_at(parent, key, heads)? {
                Some((Value::Object(ObjType::Map), id)) => Some(id),
                _ => None,
            })
        };
        let Some(section_obj) = map_at(&ROOT, section.key())? else { return Ok(None) };
        let Some(entry) = map_at(&section_obj, &id.to_string())? else { return Ok(None) };
        if marker_among(self.doc.get_all_at(&entry, "entered_in_error", heads)?).is_some() {
            return Ok(None);
        }
        Ok(match self.doc.get_at(&entry, field, heads)? {
            Some((Value::Scalar(v), _)) => match v.as_ref() {
                ScalarValue::Str(t) => Some(t.to_string()),
                _ => None,
            },
            Some((Value::Object(ObjType::Text), text)) => Some(self.doc.text_at(&text, heads)?),
            _ => None,
        })
    }

    /// Every entry of a section, entered-in-error ones included, in causal order.
    pub fn entries<T: SectionEntry>(&mut self) -> Result<Vec<Entry<T>>, SummaryError> {
        let section = match self.map_at(&ROOT, T::SECTION.key())? {
            Some(obj) => obj,
            None => return Ok(Vec::new()),
        };
        let mut found = Vec::new();
        let keys: Vec<String> = self.doc.keys(&section).collect();
        for key in keys {
            let Some((Value::Object(ObjType::Map), obj)) = self.doc.get(&section, key.as_str())? else {
                return Err(SummaryError::Layout("an entry is not a map".into()));
            };
            let id: EntryId =
                key.parse().map_err(|_| SummaryError::Layout("entry key is not a UUID".into()))?;
            let data: T = hydrate_prop(&self.doc, &section, key.as_str())?;
            let entered_in_error = self.entered_in_error_of(&obj)?;
            let conflicts = self.conflicts_of(&obj)?;
            let order = creation_order(&obj);
            found.push((order, Entry { id, data, entered_in_error, conflicts }));
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found.into_iter().map(|(_, e)| e).collect())
    }

    /// Every entry's line for a clinician (as [`SectionEntry::summary_line`]), by section and
    /// id, in the order a crew reads them; entered-in-error ones marked so.
    pub fn entry_lines(&mut self) -> Result<Vec<(Section, EntryId, String)>, SummaryError> {
        fn lines<T: SectionEntry>(
            summary: &mut PatientSummary,
            out: &mut Vec<(Section, EntryId, String)>,
        ) -> Result<(), SummaryError> {
            for e in summary.entries::<T>()? {
                let flag = if e.entered_in_error.is_some() { " (entered in error)" } else { "" };
                out.push((T::SECTION, e.id, format!("{}{flag}", e.data.summary_line())));
            }
            Ok(())
        }
        let mut out = Vec::new();
        lines::<Alert>(self, &mut out)?;
        lines::<Allergy>(self, &mut out)?;
        lines::<Medication>(self, &mut out)?;
        lines::<Problem>(self, &mut out)?;
        lines::<CarePlan>(self, &mut out)?;
        lines::<Contact>(self, &mut out)?;
        lines::<Encounter>(self, &mut out)?;
        lines::<Report>(self, &mut out)?;
        Ok(out)
    }

    /// How many entries of a section a clinician sees (entered-in-error ones left out), without
    /// reading the entries themselves.
    pub fn clinical_count(&self, section: Section) -> Result<usize, SummaryError> {
        let Some(obj) = self.map_at(&ROOT, section.key())? else { return Ok(0) };
        let mut count = 0;
        // As `entries` reads them: the entry each key holds now (one pass over the section,
        // not a lookup per key).
        let entries: Vec<ObjId> = self
            .doc
            .map_range(&obj, ..)
            .map(|item| match item.value {
                automerge::ValueRef::Object(ObjType::Map) => Ok(item.id()),
                _ => Err(SummaryError::Layout("an entry is not a map".into())),
            })
            .collect::<Result<_, _>>()?;
        for entry in entries {
            if self.entered_in_error_of(&entry)?.is_none() {
                count += 1;
            }
        }
        Ok(count)
    }

    /// The entries a clinician sees by default: entered-in-error ones left out.
    pub fn clinical_entries<T: SectionEntry>(&mut self) -> Result<Vec<Entry<T>>, SummaryError> {
        Ok(self.shown_entries::<T>()?.0)
    }

    /// The entries a clinician sees, and how many entered-in-error ones they do not (every view
    /// says that some are hidden, so one place decides what is).
    pub fn shown_entries<T: SectionEntry>(&mut self) -> Result<(Vec<Entry<T>>, usize), SummaryError> {
        let (hidden, shown): (Vec<_>, Vec<_>) =
            self.entries::<T>()?.into_iter().partition(|e| e.entered_in_error.is_some());
        Ok((shown, hidden.len()))
    }

    fn conflicts_of(&mut self, entry: &ObjId) -> Result<Vec<FieldConflict>, SummaryError> {
        let mut conflicts = Vec::new();
        let keys: Vec<String> = self.doc.keys(entry).collect();
        for key in keys {
            if key == "entered_in_error" || key == "verification_status" {
                continue; // entered-in-error wins by rule; it is not a conflict to resolve
            }
            let values: Vec<(String, ObjId)> = self
                .doc
                .get_all(entry, key.as_str())?
                .into_iter()
                .map(|(value, id)| (self.render_value(&value, &id), id))
                .collect();
            if values.len() < 2 {
                continue;
            }
            let mut rendered = Vec::new();
            for (value, id) in values {
                rendered.push(ConflictValue {
                    value,
                    author: self.author_of(&id)?,
                    at_ms: self.time_of(&id),
                });
            }
            rendered.dedup_by(|a, b| a.value == b.value);
            if rendered.len() > 1 {
                conflicts.push(FieldConflict { field: key, values: rendered });
            }
        }
        Ok(conflicts)
    }

    fn render_value(&self, value: &Value<'_>, id: &ObjId) -> String {
        match value {
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Str(s) => s.to_string(),
                ScalarValue::Null => "(none)".into(),
                other => other.to_string(),
            },
            Value::Object(_) => ["display", "description", "name", "reason"]
                .iter()
                .find_map(|k| match self.doc.get(id, *k) {
                    Ok(Some((Value::Scalar(s), _))) => s.as_str().map(str::to_string),
                    _ => None,
                })
                .unwrap_or_else(|| "(structured value)".into()),
        }
    }

    fn author_of(&self, id: &ObjId) -> Result<String, SummaryError> {
        let ObjId::Id(_, actor, _) = id else { return Ok("unknown".into()) };
        let hex = actor.to_hex_string();
        if let Some(actors) = self.map_at(&ROOT, "actors")?
            && let Ok(info) = hydrate_prop::<_, ActorInfo, _, _>(&self.doc, &actors, hex.as_str())
        {
            return Ok(format!("{} ({})", info.device_name, info.role));
        }
        Ok(format!("actor {}", &hex[..hex.len().min(16)]))
    }

    fn time_of(&mut self, id: &ObjId) -> i64 {
        self.doc
            .hash_for_opid(id)
            .and_then(|h| self.doc.get_change_meta_by_hash(&h).map(|m| m.timestamp * 1000))
            .unwrap_or(0)
    }

    /// Every conflict in the document, by section and entry.
    pub fn conflicts(&mut self) -> Result<Vec<(Section, EntryId, FieldConflict)>, SummaryError> {
        let mut out = Vec::new();
        for section in Section::ALL {
            let Some(obj) = self.map_at(&ROOT, section.key())? else { continue };
            let keys: Vec<String> = self.doc.keys(&obj).collect();
            for key in keys {
                let Some(entry) = self.map_at(&obj, &key)? else { continue };
                let id: EntryId =
                    key.parse().map_err(|_| SummaryError::Layout("entry key is not a UUID".into()))?;
                for conflict in self.conflicts_of(&entry)? {
                    out.push((section, id, conflict));
                }
            }
        }
        Ok(out)
    }

    /// Asserts that a required IPS section has nothing to record ("no known allergies").
    pub fn assert_none_known(
        &mut self,
        section: Section,
        provenance: &Provenance,
    ) -> Result<(), SummaryError> {
        let assertions =
            self.map_at(&ROOT, "assertions")?.ok_or(SummaryError::NeedsMigration("assertions"))?;
        self.register_actor(provenance)?;
        let assertion = Assertion { status: "none-known".into(), provenance: provenance.clone() };
        reconcile_prop(&mut self.doc, &assertions, section.key(), &assertion)?;
        self.commit(provenance.recorded_at_ms);
        Ok(())
    }

    /// Whether a section has entries, was asserted empty, or has no information at all.
    /// Entries always win over an earlier "none known": a recorded allergy is never hidden.
    pub fn section_state(&mut self, section: Section) -> Result<SectionState, SummaryError> {
        let has_entries = match self.map_at(&ROOT, section.key())? {
            Some(obj) => {
                let keys: Vec<String> = self.doc.keys(&obj).collect();
                let mut any = false;
                for key in keys {
                    if let Some(entry) = self.map_at(&obj, &key)?
                        && self.entered_in_error_of(&entry)?.is_none()
                    {
                        any = true;
                        break;
                    }
                }
                any
            }
            None => false,
        };
        if has_entries {
            return Ok(SectionState::Entries);
        }
        if let Some(assertions) = self.map_at(&ROOT, "assertions")?
            && let Ok(a) = hydrate_prop::<_, Assertion, _, _>(&self.doc, &assertions, section.key())
            && a.status == "none-known"
        {
            return Ok(SectionState::NoneKnown(a.provenance));
        }
        Ok(SectionState::NoInformation)
    }

    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    /// The change made by the last local commit, to queue for upload.
    pub fn last_local_change(&mut self) -> Option<Change> {
        self.doc.get_last_local_change()
    }

    /// Changes made since `heads`, e.g. by an import, to log or upload.
    pub fn changes_since(&mut self, heads: &[automerge::ChangeHash]) -> Vec<Change> {
        self.doc.get_changes(heads)
    }

    pub fn heads(&mut self) -> Vec<automerge::ChangeHash> {
        self.doc.get_heads()
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

    /// All changes of the document, in causal order.
    pub fn all_changes(&mut self) -> Vec<Change> {
        self.doc.get_changes(&[])
    }

    /// Makes a change that deletes a section, as a broken or hostile device might; for tests of
    /// the server's refusal. Returns the change's bytes.
    #[doc(hidden)]
    pub fn delete_section_for_test(&mut self, section: Section) -> Vec<u8> {
        self.doc.delete(ROOT, section.key()).expect("delete a root key");
        self.doc.commit();
        self.doc.get_last_local_change().expect("a change").raw_bytes().to_vec()
    }

    /// The underlying document, for migrations, the write policy's check
    /// ([`crate::policy::check_summary`]) and tests.
    pub(crate) fn doc_mut(&mut self) -> &mut AutoCommit {
        &mut self.doc
    }
}

/// The entered-in-error marker among the concurrent values of an entry's `entered_in_error`:
/// any value that is a marker counts, so a merge can never hide one.
fn marker_among(values: Vec<(Value<'_>, ObjId)>) -> Option<ObjId> {
    values.into_iter().find_map(|(value, id)| matches!(value, Value::Object(ObjType::Map)).then_some(id))
}

/// The order [`PatientSummary::entries`] lists an entry in: its object's creation (counter,
/// then actor).
fn creation_order(obj: &ObjId) -> (u64, Vec<u8>) {
    match obj {
        ObjId::Id(counter, actor, _) => (*counter, actor.to_bytes().to_vec()),
        ObjId::Root => (0, Vec::new()),
    }
}

fn hydrate_obj<T: Hydrate>(doc: &AutoCommit, obj: &ObjId) -> Result<T, autosurgeon::HydrateError> {
    T::hydrate_map(doc, obj)
}

/// Whether an Automerge change deletes anything. The server refuses such changes from devices:
/// clinical facts are marked entered-in-error, never deleted.
pub fn change_deletes(change: &Change) -> bool {
    change.decode().operations.iter().any(|op| matches!(op.action, automerge::legacy::OpType::Delete))
}

/// A map, left as it is but for one key: `value` put there as a new object ([`Fresh`]).
struct PutFresh<'a, T> {
    key: &'a str,
    value: &'a T,
}

impl<T: Reconcile> Reconcile for PutFresh<'_, T> {
    type Key<'k> = autosurgeon::reconcile::NoKey;

    fn reconcile<R: autosurgeon::Reconciler>(&self, mut reconciler: R) -> Result<(), R::Error> {
        use autosurgeon::reconcile::MapReconciler;
        reconciler.map()?.put(self.key, Fresh(self.value))
    }
}

/// A value written where its key is not yet in the map, as one new object: Automerge creates it
/// in two op-set splices instead of one per field (autosurgeon's batch path, which it takes for
/// values with a key, when put into a map), and the document is the one field-by-field
/// reconciling makes. Never used over an existing object, which it would replace instead of
/// merging into.
struct Fresh<'a, T>(&'a T);

impl<T: Reconcile> Reconcile for Fresh<'_, T> {
    type Key<'k> = ();

    fn reconcile<R: autosurgeon::Reconciler>(&self, reconciler: R) -> Result<(), R::Error> {
        self.0.reconcile(reconciler)
    }

    fn hydrate_key<'k, D: autosurgeon::ReadDoc>(
        _doc: &D,
        _obj: &ObjId,
        _prop: autosurgeon::Prop<'_>,
    ) -> Result<autosurgeon::reconcile::LoadKey<Self::Key<'k>>, autosurgeon::ReconcileError> {
        Ok(autosurgeon::reconcile::LoadKey::KeyNotFound)
    }

    fn key(&self) -> autosurgeon::reconcile::LoadKey<Self::Key<'_>> {
        autosurgeon::reconcile::LoadKey::Found(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
