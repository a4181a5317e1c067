//! What the server stores, as a trait: the sync session, enrolment and the operator commands
//! use only [`ServerStore`], so another backend (a shared PostgreSQL) can replace the embedded
//! SQLite one ([`crate::store::sqlite::SqliteStore`]) without touching them.
//!
//! Over 600 lines because it is the whole contract a backend implements (the four traits and
//! the types they exchange), in one file to read before writing another backend.
//!
//! The change log: every accepted Automerge change gets a global, increasing sequence number.
//! A device's cursor names a position in it; a round sends only what lies after the cursor.

pub mod postgres;
mod schema;
pub mod sqlite;

pub use crate::domain::device::{DeviceRecord, Role};
pub use crate::domain::grant::GrantKind;
use crate::domain::settings::{Applied, Setting, Source};
pub use crate::domain::upload::CheckedChanges;

use std::collections::{BTreeMap, HashMap, HashSet};

use care_node::identity::{Identity, PublicKey};
use care_node::nhs::NhsNumber;
use care_node::summary::{Listing, PatientId, PatientSummary};

/// How long a claim on a feed message holds off another process ([`Governance`]'s
/// `hl7_claim`), by the database's clock on PostgreSQL (instances' clocks may differ): far
/// longer than applying one message takes.
pub const HL7_CLAIM_LEASE_MS: i64 = 30_000;

/// What [`Governance::hl7_claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hl7Claim {
    /// This writer holds the message now: apply it, then record it, or release it with this
    /// claim (the time it was taken, by the store's clock).
    Claimed(i64),
    /// It was applied before: a duplicate.
    Done,
    /// Another writer is applying it now.
    Busy,
}

/// Opens the server's store: PostgreSQL when `url` is a `postgres://` (or `postgresql://`) URL,
/// with `password` if given apart from it; SQLite in `data_dir` when there is none.
pub fn open(
    url: Option<&str>,
    password: Option<&str>,
    data_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn ServerStore>, StoreError> {
    match url {
        None => Ok(std::sync::Arc::new(sqlite::SqliteStore::open(data_dir)?)),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(std::sync::Arc::new(postgres::PostgresStore::open_with_password(url, password)?))
        }
        Some(url) => Err(StoreError::Backend(
            format!(
                "store.url `{}` is not a postgres:// URL (leave it out for the embedded SQLite store in the data directory)",
                redact_url(url)
            )
            .into(),
        )),
    }
}

/// `url` with any password replaced by `***`, for showing it. PostgreSQL takes the user and
/// password up to the first `@` (a password may hold `/` or `?` unescaped), and a password may
/// also come as a `password=` option; a `key=value` connection string is not shown at all.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(a connection string, not shown)".into();
    };
    let rest = match rest.split_once('@') {
        Some((user, host)) if user.contains(':') => {
            format!("{}:***@{host}", user.split(':').next().unwrap_or_default())
        }
        _ => rest.to_string(),
    };
    let rest = match rest.split_once('?') {
        Some((path, query)) => {
            let options: Vec<String> = query
                .split('&')
                .map(|option| match option.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                    _ => option.to_string(),
                })
                .collect();
            format!("{path}?{}", options.join("&"))
        }
        None => rest,
    };
    format!("{scheme}://{rest}")
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database under the store failed (its own error, from whichever backend).
    #[error("the server database failed: {0}")]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// The disk under the store is full: the write was rolled back whole (nothing acknowledged
    /// is lost) and works again once there is space.
    #[error(
        "the server's storage is full: the write was rolled back (nothing acknowledged was lost); free disk space"
    )]
    StorageFull,
    #[error("could not create the data directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("patient document {0} is invalid: {1}")]
    Document(String, Box<care_node::summary::SummaryError>),
    #[error("no device named `{0}`")]
    UnknownDevice(String),
    #[error(
        "device `{0}` is already enrolled; revoke it first to give its name to a new device, or choose another name"
    )]
    AlreadyEnrolled(String),
    #[error("no patient with that NHS number on this server")]
    UnknownPatient,
    #[error("a patient with that NHS number already exists; merge the two records with merge-patients")]
    DuplicatePatient,
    #[error("cannot merge: {0}")]
    Merge(String),
    #[error("server key rotation: {0}")]
    KeyRotation(String),
    #[error("the server database is from a newer care-sync-server")]
    UnknownFormat,
    /// A newer session of the device began (on this instance or another): this one's writes of
    /// the device's session state are refused, and it ends.
    #[error("a newer sync session of this device has taken over")]
    Superseded,
    /// A stored value that this server cannot read (settings are checked when written, so
    /// this is a damaged store, or one written by another program): said, never defaulted.
    #[error("the store holds an unreadable {0}: {1}")]
    Unreadable(&'static str, String),
}

impl From<crate::domain::merge::MergeError> for StoreError {
    fn from(e: crate::domain::merge::MergeError) -> Self {
        use crate::domain::merge::MergeError;
        match e {
            MergeError::Refused(why) => StoreError::Merge(why.into()),
            MergeError::Document(id, e) => {
                StoreError::Document(care_node::identity::short_hex(id.as_bytes()), e)
            }
        }
    }
}

/// Why an upload batch was refused as a whole (the session ends; nothing of it is applied and
/// the device keeps its changes). Refusals of single documents by the write policy are not
/// errors: they are quarantined and reported in the acknowledgement (see `domain::upload`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UploadError {
    #[error(
        "an upload batch may hold at most {} documents and {} changes (got {docs} and {changes})",
        limits.upload_docs,
        limits.upload_changes
    )]
    TooMany { docs: usize, changes: usize, limits: crate::domain::limits::Limits },
    #[error(
        "this device had too many refused changes in the last 24 hours; it keeps them, and an operator reviews the quarantine"
    )]
    QuarantineFull,
    #[error("document {0} is not on this device; changes to it are not accepted")]
    NotHeld(String),
    #[error("a change for document {0} is malformed: {1}")]
    Malformed(String, String),
    #[error("document {0} changed while its upload was checked")]
    Moved(String),
    #[error("changes for document {0} depend on changes the server does not have")]
    MissingDependencies(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<crate::domain::upload::CheckError<StoreError>> for UploadError {
    fn from(e: crate::domain::upload::CheckError<StoreError>) -> Self {
        use crate::domain::upload::CheckError;
        match e {
            CheckError::TooMany { docs, changes, limits } => UploadError::TooMany { docs, changes, limits },
            CheckError::NoKey(device) => UploadError::Store(StoreError::UnknownDevice(device)),
            CheckError::Unreadable(doc, e) => {
                UploadError::Store(StoreError::Document(care_node::identity::short_hex(doc.as_bytes()), e))
            }
            CheckError::Load(e) => UploadError::Store(e),
        }
    }
}

/// Why an enrolment token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnrolError {
    #[error("unknown enrolment token")]
    UnknownToken,
    #[error("this enrolment token was already used")]
    AlreadyUsed,
    #[error("this enrolment token has expired; ask the operator for a new one")]
    Expired,
    #[error("the device this token was made for has been revoked")]
    Revoked,
    #[error("this device key is already enrolled")]
    KeyInUse,
    #[error("the proof of key possession is invalid")]
    BadSignature,
    #[error("the server could not record the enrolment")]
    Internal,
}

/// How a device stands with respect to its last round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundOutcome {
    /// The device applied the whole round.
    Complete,
    /// The device applied the round up to and including this patient.
    Through { priority: bool, through: PatientId },
    /// The device applied nothing of the round.
    Nothing,
}

/// What an accepted upload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadOutcome {
    pub accepted: usize,
    /// Documents that had been merged into another record: `(merged, kept)`. Their new entries
    /// must be carried over to the kept record.
    pub merged: Vec<(PatientId, PatientId)>,
}

/// One line of the server's append-only audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: i64,
    pub at_ms: i64,
    /// Who: an operator's name, a device's name, or `server`.
    pub actor: String,
    /// What, e.g. `enrol-device`, `merge-patients`, `import-fhir`.
    pub action: String,
    pub patient: Option<PatientId>,
    /// Opaque details (ids, counts); never patient data.
    pub detail: String,
}

/// An active grant. `Debug` leaves out the reason (a clinician's words).
#[derive(Clone, PartialEq, Eq)]
pub struct Grant {
    pub id: i64,
    pub device: i64,
    pub patient: PatientId,
    pub kind: GrantKind,
    pub reason: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

/// An alert for operators and the privacy officer (break glass, audit chain problems). `Debug`
/// leaves out the reason and the note (a clinician's or operator's words).
#[derive(Clone, PartialEq, Eq)]
pub struct AlertRecord {
    pub id: i64,
    pub at_ms: i64,
    pub kind: String,
    pub device: Option<String>,
    pub patient: Option<PatientId>,
    pub reason: String,
    pub acknowledged_at_ms: Option<i64>,
    pub note: Option<String>,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("id", &self.id)
            .field("device", &self.device)
            .field("patient", &self.patient)
            .field("kind", &self.kind)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for AlertRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertRecord")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("device", &self.device)
            .field("patient", &self.patient)
            .field("acknowledged_at_ms", &self.acknowledged_at_ms)
            .finish_non_exhaustive()
    }
}

/// A patient's consent flags, kept on the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsentFlags {
    /// The patient objects to sharing: no caseload or prefetch delivery.
    pub objection: bool,
    /// The national data opt-out: excluded from planning exports only.
    pub opt_out: bool,
}

/// After a complete round, the device holds exactly its scope. While the scope epoch stays
/// `epoch` and no grant lapses (before `valid_until_ms`), the next round needs only the changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeCache {
    pub epoch: u64,
    pub valid_until_ms: i64,
    pub in_scope: u64,
    pub left_out: u64,
}

/// Uploaded changes refused by the write policy, kept for the operator and privacy officer.
/// (`Debug` counts the changes: their bytes are patient data.)
#[derive(Clone, PartialEq, Eq)]
pub struct QuarantineRecord {
    pub id: i64,
    pub at_ms: i64,
    pub device: String,
    pub patient: PatientId,
    /// The rule's name ([`care_node::policy::Rule`]) and where the changes wrote.
    pub rule: String,
    pub place: String,
    /// The refused changes, exactly as uploaded (patient data: shown to no one by default).
    pub changes: Vec<Vec<u8>>,
    /// An operator's review, once done.
    pub reviewed: Option<QuarantineReview>,
}

impl std::fmt::Debug for QuarantineRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuarantineRecord")
            .field("id", &self.id)
            .field("at_ms", &self.at_ms)
            .field("device", &self.device)
            .field("patient", &self.patient)
            .field("rule", &self.rule)
            .field("place", &self.place)
            .field("changes", &self.changes.len())
            .field("reviewed", &self.reviewed)
            .finish()
    }
}

/// An operator's review of a quarantined upload: when, and the operator's note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineReview {
    pub at_ms: i64,
    pub note: String,
}

/// How many recent feed refusals the store keeps for operators.
pub const FEED_ERRORS_KEPT: usize = 100;

/// What the hospital feeds have done since the store was created.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FeedStatus {
    /// Messages by ACK code (AA accepted, AE/AR refused).
    pub accepted: u64,
    pub errors: u64,
    pub rejected: u64,
    pub last_message_ms: Option<i64>,
    /// The most recent refusals, newest first: `(time, code, reason)`.
    pub recent_refusals: Vec<FeedRefusal>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FeedRefusal {
    pub at_ms: i64,
    pub code: String,
    pub reason: String,
    /// The refused message's MSH-10, so an engineer can find it (empty if it had none).
    pub control_id: String,
}

/// Which audit lines to return.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub patient: Option<PatientId>,
    pub actor: Option<String>,
    pub since_ms: Option<i64>,
}

/// What merging two records did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeOutcome {
    pub entries_moved: usize,
    pub caseloads_moved: usize,
}

/// The changes in a cursor window, grouped by document, in sequence order.
pub type ChangesByDoc = BTreeMap<PatientId, Vec<(u64, Vec<u8>)>>;

/// One entry of the change log ([`SyncLog::log_entries`]). `Debug` leaves the change out: it is
/// patient data.
#[derive(Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub seq: u64,
    pub doc: PatientId,
    /// The device that uploaded the change (`None`: the server's own, from a feed or an operator).
    pub author: Option<i64>,
    pub change: Vec<u8>,
}

impl std::fmt::Debug for LogEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogEntry {{ seq: {}, author: {:?}, {} bytes }}", self.seq, self.author, self.change.len())
    }
}

/// Devices, enrolment tokens and the server's own identity.
pub trait DeviceRegistry: Send + Sync {
    /// The server's ed25519 identity, created on first use.
    fn server_identity(&self) -> Result<Identity, StoreError>;
    /// The store's incarnation: random, made with the store and made anew by a restore from
    /// backup, so that devices learn that the server may have forgotten what it acknowledged.
    fn incarnation(&self) -> Result<[u8; 16], StoreError>;
    /// Makes the incarnation anew: for a store put back from a backup by other means than
    /// `restore` (a PostgreSQL dump or point-in-time recovery).
    fn renew_incarnation(&self) -> Result<(), StoreError>;
    /// The staged next server key of a key rotation, if one is staged.
    fn next_server_identity(&self) -> Result<Option<Identity>, StoreError>;
    /// Stages a next server key (a new one, or the one already staged).
    fn stage_server_key(&self) -> Result<Identity, StoreError>;
    /// Drops the staged key; false if none was staged.
    fn cancel_server_key(&self) -> Result<bool, StoreError>;
    /// Makes the staged key the server's key (kept: the old one, as `previous_identity`).
    fn activate_server_key(&self) -> Result<Identity, StoreError>;
    /// Records which staged key a device has learnt.
    fn set_device_staged_key(&self, device: i64, key: Option<PublicKey>) -> Result<(), StoreError>;
    /// Enrolled, unrevoked devices that have not learnt the staged key.
    fn devices_without_staged_key(&self) -> Result<Vec<String>, StoreError>;

    /// Registers (or re-issues) a token for a named device that is not enrolled yet.
    fn create_enrolment(
        &self,
        name: &str,
        role: Role,
        secret_hash: [u8; 32],
        expires_at_ms: i64,
    ) -> Result<(), StoreError>;
    /// Binds a device key to the token's device, once, atomically.
    fn redeem_enrolment(
        &self,
        secret_hash: [u8; 32],
        key: PublicKey,
        now_ms: i64,
    ) -> Result<DeviceRecord, EnrolError>;
    fn device_by_name(&self, name: &str) -> Result<Option<DeviceRecord>, StoreError>;
    fn device_by_key(&self, key: &PublicKey) -> Result<Option<DeviceRecord>, StoreError>;
    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError>;
    /// Of the devices `ids`, those ever revoked or asked to wipe: what the live sessions' watch
    /// for revocations reads (by id: no clock of any instance decides what it finds).
    fn controlled_devices(&self, ids: &[i64]) -> Result<Vec<DeviceRecord>, StoreError>;
    /// Revokes a device; false if it was revoked already.
    fn revoke_device(&self, name: &str, now_ms: i64) -> Result<bool, StoreError>;
    /// Asks a device to destroy its data at its next contact (even after revocation); false if
    /// that was asked already.
    fn request_wipe(&self, name: &str, now_ms: i64) -> Result<bool, StoreError>;
    /// Records that the device confirmed its wipe, and revokes it.
    fn confirm_wipe(&self, device: i64, now_ms: i64) -> Result<(), StoreError>;
}

/// A saved document and the listing derived from it when it was saved (`None` for one saved
/// before listings were recorded, or whose demographics do not read as a listing: a device
/// parses it for its own).
pub type Listed = (Vec<u8>, Option<Listing>);

/// What a backend stores beside a saved document: worked out once per save, from the document.
#[derive(Debug, Clone)]
pub struct Derived {
    pub saved: Vec<u8>,
    /// `None` for a record merged away (its number went to the record that absorbed it).
    pub nhs_number: Option<String>,
    pub merged: bool,
    pub index: crate::domain::scope::PatientIndex,
    /// `None` when the demographics do not read as a listing (devices then parse).
    pub listing: Option<Listing>,
}

impl Derived {
    pub fn of(patient: &PatientId, summary: &mut PatientSummary) -> Result<Self, StoreError> {
        let document =
            |e| StoreError::Document(care_node::identity::short_hex(patient.as_bytes()), Box::new(e));
        let merged = summary.merged_into().map_err(document)?.is_some();
        // Demographics that do not hydrate are refused, as every other read of them would
        // fail on a device: read once, and the NHS number and postcode taken from that read.
        let d = summary.demographics().map_err(document)?;
        let (nhs_number, postcode) = (d.nhs_number, d.postcode);
        let listing = summary.listing().ok();
        let nhs_number = if merged { None } else { nhs_number };
        let index = crate::domain::scope::PatientIndex::with_postcode(summary, postcode.as_deref())
            .map_err(document)?;
        Ok(Derived { saved: summary.save(), nhs_number, merged, index, listing })
    }

    /// The risk flags as stored: `,a,b,` (so `LIKE '%,a,%'` finds one), `,` for none.
    pub fn flags(&self) -> String {
        if self.index.flags.is_empty() {
            ",".to_string()
        } else {
            format!(",{},", self.index.flags.join(","))
        }
    }
}

/// The `listing` column's format: this byte, then the postcard `Listing` (postcard names no
/// fields, so a later `Listing` of another shape gets another byte, and older rows read as none).
const LISTING_FORMAT: u8 = 1;

pub(crate) fn encode_listing(listing: &Listing) -> Option<Vec<u8>> {
    postcard::to_extend(listing, vec![LISTING_FORMAT]).ok()
}

/// A stored listing; `None` for one of another format or unreadable (the device then parses).
pub(crate) fn decode_listing(bytes: &[u8]) -> Option<Listing> {
    match bytes.split_first() {
        Some((&LISTING_FORMAT, rest)) => postcard::from_bytes(rest).ok(),
        _ => None,
    }
}

/// A new patient's document with its changes and what is stored beside it, worked out before
/// the write (so that many threads can prepare what one writer stores).
pub struct NewDocument {
    pub patient: PatientId,
    pub nhs_number: Option<String>,
    pub changes: Vec<automerge::Change>,
    pub derived: Derived,
}

impl NewDocument {
    pub fn of(summary: &mut PatientSummary) -> Result<Self, StoreError> {
        let new = |e| StoreError::Document("new".into(), Box::new(e));
        let patient = summary.patient_id().map_err(new)?;
        let nhs_number = match summary.nhs_number() {
            Ok(nhs) => Some(nhs.as_str().to_string()),
            Err(care_node::summary::SummaryError::NoNhsNumber) => None,
            Err(e) => {
                return Err(StoreError::Document(
                    care_node::identity::short_hex(patient.as_bytes()),
                    Box::new(e),
                ));
            }
        };
        let changes = summary.all_changes();
        let derived = Derived::of(&patient, summary)?;
        Ok(NewDocument { patient, nhs_number, changes, derived })
    }
}

/// One write of a batch that commits as one ([`PatientRecords::write_batch`]).
pub enum BatchWrite {
    /// A new patient's document, stored whole with its changes logged as server-authored.
    NewPatient(Box<NewDocument>),
    /// Server-authored changes to a stored patient, applied on top of what it holds now.
    Changes(PatientId, Vec<automerge::Change>),
    /// An audit entry.
    Audit { actor: String, action: &'static str, patient: Option<PatientId>, detail: String, at_ms: i64 },
    /// How far an import has read a source, committed with what it read from it.
    Progress(ImportProgress),
}

/// How far an import has read one source file: a rerun of the same file resumes here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportProgress {
    /// The file, by its canonical path.
    pub source: String,
    /// The file's size and modification time when it was read: another file at that path (or
    /// this one rewritten) is read from the start again.
    pub fingerprint: String,
    /// Bytes read and committed (or refused).
    pub offset: u64,
    /// Lines read, for line numbers after a resume.
    pub line: u64,
    /// Patients refused in the part read.
    pub refused: u64,
}

/// Patient documents: creation, server-side changes, lookups, merges.
pub trait PatientRecords: Send + Sync {
    /// Stores new patient documents in one transaction and logs their changes as server-authored.
    fn insert_patients(&self, summaries: &mut [PatientSummary]) -> Result<Vec<PatientId>, StoreError>;
    /// Applies server-authored changes (imports, feeds) to a stored patient atomically, on top of
    /// whatever the document holds now, and logs them.
    fn apply_server_changes(
        &self,
        patient: &PatientId,
        changes: &[automerge::Change],
    ) -> Result<(), StoreError>;
    fn patient_by_nhs(&self, nhs: &NhsNumber) -> Result<Option<PatientId>, StoreError>;
    fn load_document(&self, patient: &PatientId) -> Result<Option<Vec<u8>>, StoreError>;
    /// The saved document and the log position of its last change (which moves with every
    /// write of the document: a copy read at that position is the stored document).
    fn load_document_seq(&self, patient: &PatientId) -> Result<Option<(Vec<u8>, u64)>, StoreError>;
    /// The log position of the document's last change (`None`: no such patient).
    fn document_seq(&self, patient: &PatientId) -> Result<Option<u64>, StoreError>;
    /// [`PatientRecords::apply_server_changes`] for a caller that holds the document as it is
    /// after the changes, made on the stored one at `base_seq`: if the stored one is still
    /// there, `updated` is saved as it is (not read and merged again); otherwise the changes are
    /// applied on top of what is stored now. Returns the document's new log position when
    /// `updated` is what is stored now, `None` when another writer had changed it (then
    /// `updated` lacks that writer's changes and must not be used again).
    fn apply_server_changes_on(
        &self,
        patient: &PatientId,
        changes: &[automerge::Change],
        updated: &mut PatientSummary,
        base_seq: u64,
    ) -> Result<Option<u64>, StoreError>;
    /// The saved document and its listing, for sending it whole to a device.
    fn load_listed(&self, patient: &PatientId) -> Result<Option<Listed>, StoreError>;
    /// [`PatientRecords::load_listed`] of several at once, in no particular order (patients
    /// with no document are left out): one round trip to a database server for many.
    fn load_listed_many(&self, patients: &[PatientId]) -> Result<Vec<(PatientId, Listed)>, StoreError> {
        let mut found = Vec::with_capacity(patients.len());
        for patient in patients {
            if let Some(listed) = self.load_listed(patient)? {
                found.push((*patient, listed));
            }
        }
        Ok(found)
    }
    fn patient_count(&self) -> Result<u64, StoreError>;
    /// Commits every write in one transaction (one durable commit), in order: all of them, or on
    /// any error none. Feeds and bulk imports write many patients at the cost of one commit.
    fn write_batch(&self, writes: &mut [BatchWrite]) -> Result<(), StoreError>;
    /// How far an earlier import read `source` (committed with what it read).
    fn import_progress(&self, source: &str) -> Result<Option<ImportProgress>, StoreError>;
    /// Group commit: runs `work`, whose commits on this thread need not wait for the disk, then
    /// makes every one of them durable at once. Only when this returns `Ok` may what `work`
    /// wrote be acknowledged (a feed's ACKs). Each commit inside stays atomic; a crash before
    /// the end may lose some of them whole, never part of one. A backend without a cheaper way
    /// commits each durably, as here by default.
    fn group_commit(&self, work: &mut dyn FnMut()) -> Result<(), StoreError> {
        work();
        Ok(())
    }

    /// Merges `merged` into `keep` atomically: `keep` absorbs every entry, `merged` is marked
    /// and leaves every scope (devices purge it), and the audit records who did it.
    fn merge_patients(
        &self,
        keep: &PatientId,
        merged: &PatientId,
        operator: &str,
        now_ms: i64,
    ) -> Result<MergeOutcome, StoreError>;
    /// Every patient id with its NHS number (if any), for operator tools.
    fn patient_ids(&self) -> Result<Vec<(PatientId, Option<String>)>, StoreError>;

    /// The record an operator merged this one into, if it was (`None` too for no such record).
    fn merged_into(&self, patient: &PatientId) -> Result<Option<PatientId>, StoreError> {
        let Some(saved) = self.load_document(patient)? else { return Ok(None) };
        let document =
            |e| StoreError::Document(care_node::identity::short_hex(patient.as_bytes()), Box::new(e));
        PatientSummary::load(&saved).and_then(|s| s.merged_into()).map_err(document)
    }
}

/// Who may see what (scopes, grants, consent) and the append-only audit.
pub trait Governance: Send + Sync {
    fn append_audit(
        &self,
        actor: &str,
        action: &str,
        patient: Option<&PatientId>,
        detail: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    fn audit_entries(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError>;

    // --- settings
    fn setting(&self, name: &str) -> Result<Option<String>, StoreError>;
    fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError>;
    /// The value of `setting` in force (one read: the sync path asks for it every round).
    fn setting_value(&self, setting: Setting) -> Result<String, StoreError> {
        Ok(setting.in_force(self.setting(setting.name())?))
    }
    /// The value of `setting` in force, and where it came from (for operators: two reads).
    fn effective_setting(&self, setting: Setting) -> Result<(String, Source), StoreError> {
        let stored = self.setting(setting.name())?;
        let source = Setting::source(stored.as_deref(), self.setting(&setting.file_key())?.as_deref());
        Ok((setting.in_force(stored), source))
    }
    /// The value of `setting` in force, checked; a stored value that fails is `Unreadable`.
    fn checked_setting(&self, setting: Setting) -> Result<String, StoreError> {
        setting.checked(&self.setting_value(setting)?).map_err(|why| StoreError::Unreadable("setting", why))
    }
    /// A setting in hours, as milliseconds.
    fn setting_hours_ms(&self, setting: Setting) -> Result<i64, StoreError> {
        setting
            .hours_ms_of(&self.setting_value(setting)?)
            .map_err(|why| StoreError::Unreadable("setting", why))
    }
    /// Applies the configuration file's value of `setting` by the precedence of
    /// [`settings::file_value`](crate::domain::settings::file_value); `None` when there is
    /// nothing to say.
    fn apply_file_setting(&self, setting: Setting, value: &str) -> Result<Option<Applied>, StoreError> {
        let key = setting.file_key();
        let decided = crate::domain::settings::file_value(
            self.setting(&key)?.as_deref(),
            self.setting(setting.name())?.as_deref(),
            value,
        );
        if decided.record {
            self.set_setting(&key, value)?;
        }
        if decided.put_in_force {
            self.set_setting(setting.name(), value)?;
        }
        Ok(decided.applied)
    }
    fn device_budget(&self, device: i64) -> Result<Option<u64>, StoreError>;
    fn set_device_budget(&self, device: i64, budget: Option<u64>) -> Result<(), StoreError>;

    // --- grants, areas, consent
    fn grant(
        &self,
        device: i64,
        patient: &PatientId,
        kind: GrantKind,
        reason: &str,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<i64, StoreError>;
    /// Ends a device's active grants of a kind for a patient; returns how many.
    fn close_grants(
        &self,
        device: i64,
        patient: &PatientId,
        kind: GrantKind,
        now_ms: i64,
    ) -> Result<usize, StoreError>;
    /// Active grants (of one device, or all).
    fn grants(&self, device: Option<i64>, now_ms: i64) -> Result<Vec<Grant>, StoreError>;
    fn area_add(&self, device: i64, district: &str) -> Result<bool, StoreError>;
    fn area_remove(&self, device: i64, district: &str) -> Result<bool, StoreError>;
    /// Adds many (device, district) pairs in one transaction; returns those that were new.
    fn area_add_many(&self, entries: &[(i64, String)]) -> Result<Vec<(i64, String)>, StoreError>;
    fn areas(&self, device: i64) -> Result<Vec<String>, StoreError>;
    fn consent(&self, patient: &PatientId) -> Result<ConsentFlags, StoreError>;
    fn set_consent(&self, patient: &PatientId, flags: ConsentFlags) -> Result<(), StoreError>;
    /// What can put patients on the device (see [`crate::domain::scope::ScopeRows`]): its grants
    /// (those ended by `now_ms` may be left out), its caseload, and the patients of its areas
    /// (those with none of `prefetch_flags` may be left out). The rules are the domain's.
    fn scope_rows(
        &self,
        device: i64,
        prefetch_flags: &[String],
        now_ms: i64,
    ) -> Result<crate::domain::scope::ScopeRows, StoreError>;

    // --- alerts
    fn raise_alert(
        &self,
        kind: &str,
        device: Option<i64>,
        patient: Option<&PatientId>,
        reason: &str,
        now_ms: i64,
    ) -> Result<i64, StoreError>;
    fn alerts(&self, include_acknowledged: bool) -> Result<Vec<AlertRecord>, StoreError>;
    fn acknowledge_alert(&self, id: i64, note: &str, now_ms: i64) -> Result<bool, StoreError>;

    // --- hospital feeds
    /// Whether an HL7 message with this control id (MSH-10) was already processed.
    /// Whether the feed message `control_id` was applied.
    fn hl7_seen(&self, control_id: &str) -> Result<bool, StoreError>;
    /// Claims the feed message `control_id` before applying it, so that two processes given
    /// one retransmission at once never both apply it: [`Hl7Claim::Claimed`] for the first (or
    /// for a claim older than [`HL7_CLAIM_LEASE_MS`], whose holder died: applying an ADT
    /// message again from the stored record updates the visit's entries rather than adding
    /// more, though an A40's alert and the audit line come again), [`Hl7Claim::Done`] when it
    /// was applied, [`Hl7Claim::Busy`] while another holds it.
    fn hl7_claim(&self, control_id: &str, event: &str, now_ms: i64) -> Result<Hl7Claim, StoreError>;
    /// Records the feed message `control_id` as applied (its claim, if any, is done).
    fn hl7_record(&self, control_id: &str, event: &str, now_ms: i64) -> Result<(), StoreError>;
    /// Gives up this writer's claim (`claim`, as [`Hl7Claim::Claimed`] gave it) on a message that
    /// was not applied (refused, or failed): a resend is applied afresh. A claim another writer
    /// took over since is left alone.
    fn hl7_release(&self, control_id: &str, claim: i64) -> Result<(), StoreError>;
    /// Counts a processed message by its ACK code; a refusal's reason (never patient data) is kept
    /// among the last [`FEED_ERRORS_KEPT`].
    fn feed_record(&self, code: &str, control_id: &str, reason: &str, now_ms: i64) -> Result<(), StoreError>;
    fn feed_status(&self) -> Result<FeedStatus, StoreError>;

    // --- device view audits
    /// The last verified entry of a device's view log: `(seq, hash)`.
    fn view_head(&self, device: i64) -> Result<(u64, [u8; 32]), StoreError>;
    /// Moves the device's view-log head, for its sync session `session` (refused with
    /// [`StoreError::Superseded`] once a newer session began, so a stale one never moves it
    /// back).
    fn set_view_head(&self, device: i64, session: u64, seq: u64, hash: [u8; 32]) -> Result<(), StoreError>;

    // --- quarantine of refused uploads
    #[allow(clippy::too_many_arguments)]
    fn quarantine(
        &self,
        device: i64,
        patient: &PatientId,
        rule: &str,
        place: &str,
        changes: &[Vec<u8>],
        now_ms: i64,
    ) -> Result<i64, StoreError>;
    /// Quarantined uploads, newest first (of one device, or all), reviewed ones included.
    fn quarantined(&self, device: Option<i64>) -> Result<Vec<QuarantineRecord>, StoreError>;
    /// One quarantined upload, reviewed or not.
    fn quarantined_item(&self, id: i64) -> Result<Option<QuarantineRecord>, StoreError>;
    /// Records an operator's review of a quarantined upload; `false` if there is no such item or
    /// it was already reviewed (the first review stands).
    fn review_quarantine(&self, id: i64, note: &str, now_ms: i64) -> Result<bool, StoreError>;
    /// How many uploads of a device were quarantined since `since_ms` and not yet reviewed.
    fn quarantine_count(&self, device: i64, since_ms: i64) -> Result<u64, StoreError>;

    fn caseload_add(&self, device: i64, patient: &PatientId) -> Result<bool, StoreError>;
    /// Adds many `(device, patient)` pairs in one transaction (all or none); returns the pairs
    /// that were not there before.
    fn caseload_add_many(&self, entries: &[(i64, PatientId)]) -> Result<Vec<(i64, PatientId)>, StoreError>;
    fn caseload_remove(&self, device: i64, patient: &PatientId) -> Result<bool, StoreError>;
    fn caseload(&self, device: i64) -> Result<Vec<PatientId>, StoreError>;
}

/// Log entries dropped (or that would be) by compaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    pub entries: u64,
    pub bytes: u64,
}

/// The change log and each device's progress through it.
pub trait SyncLog: Send + Sync {
    /// Commits a device's changes, already checked by `domain::upload`, atomically (all or
    /// nothing), on top of whatever each document holds now.
    /// Fails with [`UploadError::Moved`] (nothing committed) if a document no longer has the
    /// heads it was checked at: the caller checks again.
    fn commit_device_changes(
        &self,
        device: &DeviceRecord,
        docs: &[CheckedChanges],
    ) -> Result<UploadOutcome, UploadError>;
    /// The newest sequence number (never below the log's horizon, even when compaction has
    /// dropped every entry).
    fn max_seq(&self) -> Result<u64, StoreError>;
    /// The log's horizon: entries with `seq <= horizon` were dropped by compaction (0: none).
    /// Only ever moves forward.
    fn log_horizon(&self) -> Result<u64, StoreError>;
    /// Documents the device holds whose latest change is after `after`: what a device whose
    /// cursor fell below the horizon receives whole.
    fn held_changed_since(&self, device: i64, after: u64) -> Result<HashSet<PatientId>, StoreError>;
    /// Drops the log's entries with `seq <= horizon` and moves the horizon there, in one
    /// transaction (documents are stored whole, so nothing of a patient is lost). A horizon at
    /// or below the current one drops nothing.
    fn compact_log(&self, horizon: u64) -> Result<Compacted, StoreError>;
    /// How many log entries there are at or below `seq`, and their bytes.
    fn log_below(&self, seq: u64) -> Result<Compacted, StoreError>;
    /// Changes with `after < seq <= upto` to documents the device holds, not authored by it,
    /// by document, leaving out those at or below the round each document was last sent whole
    /// at (the whole document holds them: a round cut and resumed does not send its documents'
    /// history again as changes). Costs what changed for this device, not what changed in the
    /// region.
    fn changes_for_device(&self, device: i64, after: u64, upto: u64) -> Result<ChangesByDoc, StoreError>;
    /// The documents with a change `after < seq <= upto`, whoever wrote it.
    fn changed_docs(&self, after: u64, upto: u64) -> Result<HashSet<PatientId>, StoreError>;
    /// The log's entries `after < seq <= upto` in sequence order, whoever wrote them; `None` when
    /// there are more than `most` (then [`SyncLog::changed_docs`] says which documents moved).
    fn log_entries(&self, after: u64, upto: u64, most: usize) -> Result<Option<Vec<LogEntry>>, StoreError>;
    /// Documents the device holds for sure (its confirmed set).
    fn held(&self, device: i64) -> Result<HashSet<PatientId>, StoreError>;
    /// How many documents each device holds (devices holding none are left out).
    fn held_counts(&self) -> Result<HashMap<i64, u64>, StoreError>;
    /// The round the device was sent but has not confirmed, if any.
    fn pending_round(&self, device: i64) -> Result<Option<u64>, StoreError>;
    /// A counter that moves whenever anything a scope depends on changes (caseloads, grants,
    /// areas, settings, budgets, consent, patients' districts, flags and merges).
    fn scope_epoch(&self) -> Result<u64, StoreError>;
    /// What the device's last complete round established, if recorded.
    fn scope_cache(&self, device: i64) -> Result<Option<ScopeCache>, StoreError>;
    /// Starts a sync session of the device: its number, above every earlier session's. The
    /// writes of a session's state below take the number, and refuse with
    /// [`StoreError::Superseded`] once a newer session has begun (on any instance).
    fn begin_session(&self, device: i64) -> Result<u64, StoreError>;
    fn set_scope_cache(&self, device: i64, session: u64, cache: &ScopeCache) -> Result<(), StoreError>;
    /// Records, before a page is sent, which documents it sends whole and which it purges.
    fn record_round_page(
        &self,
        device: i64,
        session: u64,
        round: u64,
        priority: bool,
        whole: &[PatientId],
        purged: &[PatientId],
    ) -> Result<(), StoreError>;
    /// Settles the pending round with what the device says it applied.
    fn settle_round(
        &self,
        device: i64,
        session: u64,
        round: u64,
        outcome: RoundOutcome,
        now_ms: i64,
    ) -> Result<(), StoreError>;
}

/// Everything the regional server stores. Implemented by any type that implements the four
/// parts; `use care_sync_server::store::prelude::*` brings them into scope.
pub trait ServerStore: DeviceRegistry + PatientRecords + Governance + SyncLog {}

impl<T: DeviceRegistry + PatientRecords + Governance + SyncLog> ServerStore for T {}

/// The store traits, for `dyn ServerStore` callers.
pub mod prelude {
    pub use super::{DeviceRegistry, Governance, PatientRecords, ServerStore, SyncLog};
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_store_url_is_shown_without_its_password_however_it_is_written() {
        use super::redact_url;
        for (url, shown) in [
            ("postgres://care:pw@db:5432/region", "postgres://care:***@db:5432/region"),
            (
                "postgres://care:p%40x@db/region?sslmode=disable",
                "postgres://care:***@db/region?sslmode=disable",
            ),
            ("postgres://care:pa/ss?w@db/region", "postgres://care:***@db/region"),
            (
                "postgresql://care@db/region?password=pw&application_name=a",
                "postgresql://care@db/region?password=***&application_name=a",
            ),
            ("postgres://care@db/region", "postgres://care@db/region"),
            ("host=db user=care password=pw", "(a connection string, not shown)"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
    }

    use super::*;
    use automerge::{ReadDoc, transaction::Transactable};
    use care_node::summary::Demographics;

    fn demographics() -> Demographics {
        Demographics {
            nhs_number: Some("9434765919".into()),
            nhs_number_status: None,
            name: "Test Patient".into(),
            family: None,
            given: None,
            date_of_birth: Some("1950-01-01".into()),
            sex: None,
            address_lines: None,
            city: None,
            postcode: Some("so16 6yd".into()),
            gp_practice_code: None,
            gp_practice_name: None,
        }
    }

    #[test]
    fn a_record_whose_demographics_do_not_read_is_refused_even_when_its_listing_does() {
        let patient = uuid::Uuid::new_v4();
        let actor = automerge::ActorId::random();
        let mut good = PatientSummary::create(patient, &demographics(), actor, 0).unwrap();
        let derived = Derived::of(&patient, &mut good).unwrap();
        assert_eq!(derived.nhs_number.as_deref(), Some("9434765919"));
        assert_eq!(derived.index.district.as_deref(), Some("SO16"));
        assert!(derived.listing.is_some());

        // The four fields a listing reads stay well formed; `sex` becomes a number.
        let mut doc = automerge::AutoCommit::load(&good.save()).unwrap();
        let Some((_, demo)) = doc.get(automerge::ROOT, "demographics").unwrap() else { panic!() };
        doc.put(&demo, "sex", 7_i64).unwrap();
        let mut bad = PatientSummary::load(&doc.save()).unwrap();
        assert!(bad.listing().is_ok(), "the listing alone does not see the damage");
        assert!(matches!(Derived::of(&patient, &mut bad), Err(StoreError::Document(..))));
    }
}
