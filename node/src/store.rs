//! The device's encrypted replica: one SQLite file.
//!
//! Tables (see `docs/architecture.md`):
//! - `meta`: plaintext, nothing identifiable: format version and the wrapped data key.
//! - `secrets`: sealed values by name: the device identity, the enrolment, the sync state.
//! - `documents`: one row per patient; `doc_key` and `nhs_key` are keyed BLAKE3 hashes; `card`
//!   (name, NHS number, date of birth, postcode for listing) and `body` (the Automerge document
//!   and its sync bookkeeping) are sealed, bound to the row's key and version.
//! - `outbox`: local changes the server has not acknowledged yet, sealed.
//!
//! Every value is sealed with the store's [`DataKey`]; a value copied to another row, tampered
//! with or read under another key is an error ([`StoreError::Tampered`]), never silently used.
//! `secure_delete` is on, so purged documents are overwritten in the file.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{CryptoError, DataKey, KeyWrapper, LookupHasher};
use crate::identity::{Identity, short_hex};
use crate::nhs::NhsNumber;
use crate::protocol::{DocBody, DocItem, Resume};
use crate::summary::{PatientId, PatientSummary, SectionEntry, SummaryError};

const FORMAT_VERSION: &str = "care-node-store/1";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("the store database failed: {0}")]
    Sqlite(Box<rusqlite::Error>),
    #[error("the file is not a care-node store (or is corrupt)")]
    NotAStore,
    #[error("the store was made by a newer care-node ({0})")]
    UnknownFormat(String),
    #[error("the store's data key could not be unwrapped: {0}")]
    Key(#[source] CryptoError),
    #[error("stored row {row} failed authentication: tampered, corrupt or swapped with another row")]
    Tampered { row: String },
    #[error("stored row {row} could not be decoded: {reason}")]
    Decode { row: String, reason: String },
    #[error("patient document is invalid: {0}")]
    Summary(Box<SummaryError>),
    #[error("this device is not enrolled yet; run `care-node enrol TOKEN`")]
    NotEnrolled,
    #[error("this device is already enrolled")]
    AlreadyEnrolled,
    #[error("no patient with that NHS number is on this device")]
    UnknownPatient,
    #[error("received document {doc} lacks changes it depends on")]
    MissingDependencies { doc: String },
    #[error(
        "patient data is locked: this device last synced {hours_ago} h ago and its lease is {lease_hours} h; \
         connect and sync to unlock"
    )]
    LeaseExpired { hours_ago: i64, lease_hours: i64 },
    #[error("this device was wiped on the operator's instruction; its data key is destroyed")]
    Wiped,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(Box::new(e))
    }
}

impl From<SummaryError> for StoreError {
    fn from(e: SummaryError) -> Self {
        Self::Summary(Box::new(e))
    }
}

/// What the device learnt when it enrolled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    pub server_addr: String,
    pub server_key: [u8; 32],
    pub device_name: String,
    pub role: String,
    pub enrolled_at_ms: i64,
}

/// The device's progress through the server's change sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    /// Every document held is complete up to this server sequence number.
    pub cursor: u64,
    /// Where an interrupted round stopped, if one did.
    pub resume: Option<Resume>,
    /// When the last complete sync finished (device clock) and what the server's clock said.
    pub last_sync_ms: Option<i64>,
    pub last_sync_server_ms: Option<i64>,
    /// How long patient data may be shown without a sync, as the server last said.
    pub lease_ms: Option<u64>,
    /// Patients in scope that the budget left out at the last round.
    pub left_out: u64,
}

impl SyncState {
    /// This device's clock minus the server's, as measured at the last sync.
    pub fn clock_offset_ms(&self) -> Option<i64> {
        Some(self.last_sync_ms? - self.last_sync_server_ms?)
    }
}

/// One local change waiting for the server's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingChange {
    pub outbox_id: u64,
    pub doc: PatientId,
    pub change: Vec<u8>,
}

/// What `list` shows of a patient without opening the document.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct PatientCard {
    pub patient_id: PatientId,
    /// `None` for a provisional record.
    pub nhs_number: Option<String>,
    pub name: String,
    pub date_of_birth: Option<String>,
    pub postcode: Option<String>,
}

impl std::fmt::Debug for PatientCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PatientCard({})", self.patient_id)
    }
}

/// A patient document as stored, with when the device last received server data for it.
#[derive(Debug)]
pub struct StoredPatient {
    pub summary: PatientSummary,
    /// Device time of the last sync that brought this document up to date ("as of").
    pub received_at_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct DocumentBody {
    patient_id: PatientId,
    received_at_ms: i64,
    #[serde(with = "serde_bytes")]
    automerge: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct OutboxBody {
    patient_id: PatientId,
    #[serde(with = "serde_bytes")]
    change: Vec<u8>,
}

/// The encrypted device store.
pub struct DeviceStore {
    conn: Connection,
    key: DataKey,
    lookup: LookupHasher,
}

impl std::fmt::Debug for DeviceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceStore")
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    doc_key BLOB PRIMARY KEY,
    nhs_key BLOB NOT NULL UNIQUE,
    version INTEGER NOT NULL,
    card BLOB NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS notifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS view_log (
    seq INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    uploaded INTEGER NOT NULL DEFAULT 0
);
";

impl DeviceStore {
    /// Opens the store at `path`, creating it (with a new data key and device identity) if the
    /// file does not exist. A wrong passphrase or a foreign file is an error; nothing is changed.
    pub fn open(path: &Path, wrapper: &dyn KeyWrapper) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::configure(&conn)?;
        let exists: bool = conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'meta'", [], |r| r.get::<_, i64>(0))
            .map_err(not_a_store)?
            > 0;
        let key = if exists {
            let format: Option<String> = conn
                .query_row("SELECT CAST(value AS TEXT) FROM meta WHERE name = 'format'", [], |r| r.get(0))
                .optional()?;
            let wiped: bool =
                conn.query_row("SELECT count(*) FROM meta WHERE name = 'wiped_at'", [], |r| {
                    r.get::<_, i64>(0)
                })? > 0;
            if wiped {
                return Err(StoreError::Wiped);
            }
            match format.as_deref() {
                Some(FORMAT_VERSION) => {}
                Some(other) => return Err(StoreError::UnknownFormat(other.to_string())),
                None => return Err(StoreError::NotAStore),
            }
            let wrapped: Vec<u8> = conn
                .query_row("SELECT value FROM meta WHERE name = 'wrapped_key'", [], |r| r.get(0))
                .optional()?
                .ok_or(StoreError::NotAStore)?;
            wrapper.unwrap(&wrapped).map_err(StoreError::Key)?
        } else {
            let key = DataKey::generate();
            let wrapped = wrapper.wrap(&key).map_err(StoreError::Key)?;
            conn.execute_batch(&format!("BEGIN; {SCHEMA}"))?;
            conn.execute("INSERT INTO meta VALUES ('format', ?1)", [FORMAT_VERSION.as_bytes()])?;
            conn.execute("INSERT INTO meta VALUES ('key_wrapping', ?1)", [wrapper.kind().as_bytes()])?;
            conn.execute("INSERT INTO meta VALUES ('wrapped_key', ?1)", [&wrapped])?;
            conn.execute_batch("COMMIT")?;
            key
        };
        // Tables added since a store was made are created here (every statement is idempotent).
        conn.execute_batch(SCHEMA)?;
        let lookup = key.lookup_hasher();
        let store = Self { conn, key, lookup };
        if store.get_secret::<Zeroizing<Vec<u8>>>("identity")?.is_none() {
            let identity = Identity::generate();
            store.put_secret("identity", &Zeroizing::new(identity.seed().to_vec()))?;
        }
        Ok(store)
    }

    fn configure(conn: &Connection) -> Result<(), StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL").map_err(not_a_store)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(())
    }

    /// This device's ed25519 identity.
    pub fn identity(&self) -> Result<Identity, StoreError> {
        let seed: Zeroizing<Vec<u8>> = self.get_secret("identity")?.ok_or_else(|| StoreError::NotAStore)?;
        let seed: [u8; 32] = seed.as_slice().try_into().map_err(|_| StoreError::Decode {
            row: "secrets/identity".into(),
            reason: "not a 32-byte seed".into(),
        })?;
        Ok(Identity::from_seed(&seed))
    }

    pub fn enrolment(&self) -> Result<Option<Enrolment>, StoreError> {
        self.get_secret("enrolment")
    }

    /// The enrolment, or [`StoreError::NotEnrolled`].
    pub fn require_enrolment(&self) -> Result<Enrolment, StoreError> {
        self.enrolment()?.ok_or(StoreError::NotEnrolled)
    }

    pub fn set_enrolment(&self, enrolment: &Enrolment) -> Result<(), StoreError> {
        if self.enrolment()?.is_some() {
            return Err(StoreError::AlreadyEnrolled);
        }
        self.put_secret("enrolment", enrolment)
    }

    /// Provenance for an entry this device records now.
    pub fn provenance(&self) -> Result<crate::summary::Provenance, StoreError> {
        let enrolment = self.require_enrolment()?;
        let sync = self.sync_state()?;
        Ok(crate::summary::Provenance {
            device: short_hex(&self.identity()?.public_key()),
            device_name: enrolment.device_name,
            role: enrolment.role,
            recorded_at_ms: crate::now_ms(),
            clock_offset_ms: sync.clock_offset_ms(),
            person: None,
            source: None,
        })
    }

    /// Refuses to show patient data when the device has not synced within its lease.
    pub fn check_lease(&self, now_ms: i64) -> Result<(), StoreError> {
        let state = self.sync_state()?;
        if let (Some(lease), Some(last)) = (state.lease_ms, state.last_sync_ms)
            && now_ms - last > lease as i64
        {
            return Err(StoreError::LeaseExpired {
                hours_ago: (now_ms - last) / 3_600_000,
                lease_hours: lease as i64 / 3_600_000,
            });
        }
        Ok(())
    }

    /// Opens a patient's record for a clinician to see: checks the lease and appends the view to
    /// the signed view log, in that order. Every user-facing read goes through here.
    pub fn view_patient(&mut self, nhs: &NhsNumber, action: &str) -> Result<StoredPatient, StoreError> {
        self.check_lease(crate::now_ms())?;
        let patient = self.find_by_nhs(nhs)?.ok_or(StoreError::UnknownPatient)?;
        self.record_view(&patient.summary.patient_id()?, action, "")?;
        Ok(patient)
    }

    /// Appends an entry to the view log: hash-chained to the previous one and signed.
    pub fn record_view(
        &mut self,
        patient: &PatientId,
        action: &str,
        detail: &str,
    ) -> Result<u64, StoreError> {
        let identity = self.identity()?;
        let tx = self.conn.transaction()?;
        let (seq, prev): (u64, [u8; 32]) = get_secret(&tx, &self.key, "view_head")?.unwrap_or((0, [0; 32]));
        let entry = crate::viewlog::ViewEntry {
            seq: seq + 1,
            prev_hash: prev,
            at_ms: crate::now_ms(),
            patient: *patient,
            action: action.to_string(),
            detail: detail.to_string(),
        };
        let head = (entry.seq, entry.hash());
        let signed = crate::viewlog::SignedView::sign(&identity, entry);
        let sealed = seal_row(&self.key, "view_log", &head.0.to_be_bytes(), 0, &signed)?;
        tx.execute("INSERT INTO view_log (seq, body) VALUES (?1, ?2)", params![head.0 as i64, sealed])?;
        put_secret(&tx, &self.key, "view_head", &head)?;
        tx.commit()?;
        Ok(head.0)
    }

    /// View log entries not yet acknowledged by the server, oldest first.
    pub fn pending_views(&self, limit: usize) -> Result<Vec<crate::viewlog::SignedView>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT seq, body FROM view_log WHERE uploaded = 0 ORDER BY seq LIMIT ?1")?;
        let mut rows = stmt.query([limit as i64])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let body: Vec<u8> = row.get(1)?;
            out.push(self.open_row("view_log", &(seq as u64).to_be_bytes(), 0, &body)?);
        }
        Ok(out)
    }

    /// Marks view log entries the server has recorded; they stay readable on the device.
    pub fn acknowledge_views(&mut self, through: u64) -> Result<(), StoreError> {
        self.conn.execute("UPDATE view_log SET uploaded = 1 WHERE seq <= ?1", [through as i64])?;
        Ok(())
    }

    /// Notifications from received changes (admitted, transferred, discharged, attended), newest
    /// first.
    pub fn notifications(&self, limit: usize) -> Result<Vec<crate::notify::Notification>, StoreError> {
        self.check_lease(crate::now_ms())?;
        let mut stmt = self.conn.prepare("SELECT id, body FROM notifications ORDER BY id DESC LIMIT ?1")?;
        let mut rows = stmt.query([limit as i64])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let body: Vec<u8> = row.get(1)?;
            out.push(self.open_row("notifications", &id.to_be_bytes(), 0, &body)?);
        }
        Ok(out)
    }

    /// The device's view log, newest first, with whether each entry reached the server.
    pub fn view_log(&self, limit: usize) -> Result<Vec<(crate::viewlog::ViewEntry, bool)>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT seq, body, uploaded FROM view_log ORDER BY seq DESC LIMIT ?1")?;
        let mut rows = stmt.query([limit as i64])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let body: Vec<u8> = row.get(1)?;
            let signed: crate::viewlog::SignedView =
                self.open_row("view_log", &(seq as u64).to_be_bytes(), 0, &body)?;
            out.push((signed.entry, row.get::<_, bool>(2)?));
        }
        Ok(out)
    }

    /// Patients matching a search: an NHS number, or any of name (part, any case), date of
    /// birth (exact) and postcode (prefix). Refused when the lease has expired.
    pub fn search(
        &self,
        nhs: Option<&NhsNumber>,
        name: Option<&str>,
        date_of_birth: Option<&str>,
        postcode: Option<&str>,
    ) -> Result<Vec<PatientCard>, StoreError> {
        let normalise = |s: &str| s.split_whitespace().collect::<String>().to_ascii_uppercase();
        let cards = self.list()?;
        Ok(cards
            .into_iter()
            .filter(|c| nhs.is_none_or(|n| c.nhs_number.as_deref() == Some(n.as_str())))
            .filter(|c| name.is_none_or(|n| c.name.to_lowercase().contains(&n.trim().to_lowercase())))
            .filter(|c| date_of_birth.is_none_or(|d| c.date_of_birth.as_deref() == Some(d.trim())))
            .filter(|c| {
                postcode.is_none_or(|p| {
                    c.postcode.as_deref().is_some_and(|x| normalise(x).starts_with(&normalise(p)))
                })
            })
            .collect())
    }

    /// Destroys every patient document, pending change, view and sync position, and compacts
    /// the file so their (already encrypted) bytes are gone too. The identity stays, so the
    /// device can still tell the server.
    pub fn wipe_patient_data(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch(
            "BEGIN; DELETE FROM documents; DELETE FROM outbox; DELETE FROM view_log; DELETE FROM notifications;
             DELETE FROM secrets WHERE name IN ('sync', 'view_head'); COMMIT;",
        )?;
        self.conn.execute_batch("VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")?;
        Ok(())
    }

    /// Crypto-shredding: destroys the wrapped data key and every secret, so nothing left in the
    /// file can be decrypted, and marks the store as wiped.
    pub fn shred(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch(
            "BEGIN; DELETE FROM secrets; DELETE FROM documents; DELETE FROM outbox; DELETE FROM view_log;
             DELETE FROM notifications; DELETE FROM meta WHERE name = 'wrapped_key'; COMMIT;",
        )?;
        self.conn.execute(
            "INSERT INTO meta (name, value) VALUES ('wiped_at', ?1) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            [crate::now_ms().to_string().as_bytes()],
        )?;
        self.conn.execute_batch("VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")?;
        Ok(())
    }

    /// Moves the last sync back in time, to test lease expiry without waiting.
    #[doc(hidden)]
    pub fn backdate_last_sync_for_test(&self, by_ms: i64) -> Result<(), StoreError> {
        let mut state = self.sync_state()?;
        state.last_sync_ms = state.last_sync_ms.map(|t| t - by_ms);
        self.put_secret("sync", &state)
    }

    /// Points the device at a new server address (the pinned server key stays the same).
    pub fn update_server_addr(&self, addr: &str) -> Result<(), StoreError> {
        let mut enrolment = self.require_enrolment()?;
        enrolment.server_addr = addr.to_string();
        self.put_secret("enrolment", &enrolment)
    }

    pub fn sync_state(&self) -> Result<SyncState, StoreError> {
        Ok(self.get_secret("sync")?.unwrap_or_default())
    }

    fn nhs_key(&self, nhs: &NhsNumber) -> [u8; 32] {
        self.lookup.hash("nhs", nhs.as_str())
    }

    fn doc_key(&self, doc: &PatientId) -> [u8; 32] {
        self.lookup.hash("doc", &doc.to_string())
    }

    /// The number of patient documents held.
    pub fn document_count(&self) -> Result<u64, StoreError> {
        Ok(self.conn.query_row("SELECT count(*) FROM documents", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Every patient on the device, ordered by name (refused when the lease has expired).
    pub fn list(&self) -> Result<Vec<PatientCard>, StoreError> {
        self.check_lease(crate::now_ms())?;
        let mut stmt = self.conn.prepare("SELECT doc_key, version, card FROM documents")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?)))?;
        let mut cards = Vec::new();
        for row in rows {
            let (doc_key, version, card) = row?;
            cards.push(self.open_row::<PatientCard>("card", &doc_key, version, &card)?);
        }
        cards.sort_by(|a, b| a.name.cmp(&b.name).then(a.patient_id.cmp(&b.patient_id)));
        Ok(cards)
    }

    /// The patient with this NHS number, if the device holds them.
    pub fn find_by_nhs(&self, nhs: &NhsNumber) -> Result<Option<StoredPatient>, StoreError> {
        self.read_document("nhs_key", &self.nhs_key(nhs))
    }

    /// The patient document with this id, if the device holds it.
    pub fn get(&self, doc: &PatientId) -> Result<Option<StoredPatient>, StoreError> {
        self.read_document("doc_key", &self.doc_key(doc))
    }

    fn read_document(&self, column: &str, key: &[u8; 32]) -> Result<Option<StoredPatient>, StoreError> {
        let row = self
            .conn
            .query_row(
                &format!("SELECT doc_key, version, body FROM documents WHERE {column} = ?1"),
                [key.as_slice()],
                |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?)),
            )
            .optional()?;
        let Some((doc_key, version, body)) = row else { return Ok(None) };
        let body: DocumentBody = self.open_row("body", &doc_key, version, &body)?;
        let summary = PatientSummary::load(&body.automerge)?;
        Ok(Some(StoredPatient { summary, received_at_ms: body.received_at_ms }))
    }

    /// Adds an entry to a patient's summary on this device (works offline).
    pub fn add_entry<T: SectionEntry>(
        &mut self,
        nhs: &NhsNumber,
        entry: &T,
    ) -> Result<crate::summary::EntryId, StoreError> {
        self.edit(nhs, |summary| summary.add(entry))
    }

    /// Marks an entry as entered in error on this device (works offline).
    pub fn mark_entered_in_error(
        &mut self,
        nhs: &NhsNumber,
        section: crate::summary::Section,
        entry: crate::summary::EntryId,
        reason: &str,
    ) -> Result<(), StoreError> {
        let provenance = self.provenance()?;
        self.edit(nhs, |summary| summary.mark_entered_in_error(section, entry, reason, &provenance))
    }

    /// Records a crew attendance with observations and their NEWS2 score (works offline).
    pub fn record_attendance(
        &mut self,
        nhs: &NhsNumber,
        observations: &crate::news2::Observations,
        reason: Option<&str>,
    ) -> Result<(crate::summary::EntryId, crate::news2::News2), StoreError> {
        let provenance = self.provenance()?;
        let news2 = crate::news2::score(observations);
        let mut encounter = crate::summary::Encounter::new("attendance", "finished", provenance.clone());
        encounter.class = Some("emergency".into());
        encounter.start = crate::view::iso_time(provenance.corrected_time_ms());
        encounter.reason = reason.map(str::to_string);
        encounter.vitals = Some(observations.to_vitals());
        let id = self.edit(nhs, |summary| summary.add(&encounter))?;
        Ok((id, news2))
    }

    /// Runs a local edit on a patient's summary as this device: the changes it makes are stored
    /// with the document and queued for upload, in one transaction.
    pub fn edit<R>(
        &mut self,
        nhs: &NhsNumber,
        change: impl FnOnce(&mut PatientSummary) -> Result<R, SummaryError>,
    ) -> Result<R, StoreError> {
        let patient = self.find_by_nhs(nhs)?.ok_or(StoreError::UnknownPatient)?;
        self.edit_patient(patient, change)
    }

    /// [`DeviceStore::edit`] for a patient found by id (e.g. a provisional record).
    pub fn edit_by_id<R>(
        &mut self,
        id: &PatientId,
        change: impl FnOnce(&mut PatientSummary) -> Result<R, SummaryError>,
    ) -> Result<R, StoreError> {
        let patient = self.get(id)?.ok_or(StoreError::UnknownPatient)?;
        self.edit_patient(patient, change)
    }

    fn edit_patient<R>(
        &mut self,
        mut patient: StoredPatient,
        change: impl FnOnce(&mut PatientSummary) -> Result<R, SummaryError>,
    ) -> Result<R, StoreError> {
        let identity = self.identity()?;
        patient.summary.set_actor(&identity.public_key());
        let before = patient.summary.heads();
        let result = change(&mut patient.summary)?;
        let changes = patient.summary.changes_since(&before);
        let patient_id = patient.summary.patient_id()?;
        let tx = self.conn.transaction()?;
        write_document(&tx, &self.key, &self.lookup, &mut patient.summary, patient.received_at_ms, None)?;
        for change in changes {
            let outbox = OutboxBody { patient_id, change: change.raw_bytes().to_vec() };
            tx.execute("INSERT INTO outbox (body) VALUES (x'')", [])?;
            let id = tx.last_insert_rowid();
            let sealed = seal_row(&self.key, "outbox", &id.to_be_bytes(), 0, &outbox)?;
            tx.execute("UPDATE outbox SET body = ?1 WHERE id = ?2", params![sealed, id])?;
        }
        tx.commit()?;
        Ok(result)
    }

    /// Local changes after outbox position `after`, oldest first, up to about `max_bytes`.
    pub fn pending_changes(&self, after: u64, max_bytes: usize) -> Result<Vec<PendingChange>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT id, body FROM outbox WHERE id > ?1 ORDER BY id")?;
        let mut rows = stmt.query([after as i64])?;
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let body: Vec<u8> = row.get(1)?;
            let body: OutboxBody = self.open_row("outbox", &id.to_be_bytes(), 0, &body)?;
            bytes += body.change.len();
            out.push(PendingChange { outbox_id: id as u64, doc: body.patient_id, change: body.change });
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// How many local changes wait for upload.
    pub fn pending_count(&self) -> Result<u64, StoreError> {
        Ok(self.conn.query_row("SELECT count(*) FROM outbox", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Forgets local changes the server has made durable.
    pub fn acknowledge_uploads(&mut self, through: u64) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM outbox WHERE id <= ?1", [through as i64])?;
        Ok(())
    }

    /// Applies a page of a sync round in one transaction together with the round's progress
    /// (the last item applied), so a cut link or a crash leaves every document of the page and
    /// the marker that covers it applied, or none of them. Returns how many notifications
    /// (admissions, discharges, attendances…) the page produced.
    pub fn apply_items(&mut self, round: u64, items: &[DocItem], now_ms: i64) -> Result<u64, StoreError> {
        let Some(last) = items.last() else { return Ok(0) };
        let tx = self.conn.transaction()?;
        let mut notified = 0;
        for item in items {
            notified += apply_one(&tx, &self.key, &self.lookup, item, now_ms)?;
        }
        let mut state: SyncState = get_secret(&tx, &self.key, "sync")?.unwrap_or_default();
        state.resume = Some(Resume { round, through: last.doc });
        put_secret(&tx, &self.key, "sync", &state)?;
        tx.commit()?;
        Ok(notified)
    }

    /// Completes a round: the cursor moves to `round` and the interrupted-round marker goes.
    pub fn finish_round(
        &mut self,
        round: u64,
        server_time_ms: i64,
        now_ms: i64,
        lease_ms: u64,
        left_out: u64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let mut state: SyncState = get_secret(&tx, &self.key, "sync")?.unwrap_or_default();
        state.cursor = round;
        state.lease_ms = Some(lease_ms);
        state.left_out = left_out;
        state.resume = None;
        state.last_sync_ms = Some(now_ms);
        state.last_sync_server_ms = Some(server_time_ms);
        put_secret(&tx, &self.key, "sync", &state)?;
        tx.commit()?;
        Ok(())
    }

    fn get_secret<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, StoreError> {
        get_secret(&self.conn, &self.key, name)
    }

    fn put_secret<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        put_secret(&self.conn, &self.key, name, value)
    }

    fn open_row<T: for<'de> Deserialize<'de>>(
        &self,
        table: &str,
        key: &[u8],
        version: i64,
        sealed: &[u8],
    ) -> Result<T, StoreError> {
        open_row(&self.key, table, key, version, sealed)
    }

    /// Direct access to the database, for tests that tamper with the file.
    #[doc(hidden)]
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// A received document must be the one it claims to be.
fn check_received(summary: &mut PatientSummary, doc: &PatientId) -> Result<(), StoreError> {
    if summary.has_missing_deps() {
        return Err(StoreError::MissingDependencies { doc: short_hex(doc.as_bytes()) });
    }
    if summary.patient_id()? != *doc {
        return Err(StoreError::Decode {
            row: format!("document {}", short_hex(doc.as_bytes())),
            reason: "the document names another patient".into(),
        });
    }
    Ok(())
}

fn not_a_store(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => StoreError::NotAStore,
        _ => StoreError::from(e),
    }
}

fn row_aad(table: &str, key: &[u8], version: i64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(table.len() + key.len() + 10);
    aad.extend_from_slice(table.as_bytes());
    aad.push(0);
    aad.extend_from_slice(key);
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

fn row_name(table: &str, key: &[u8]) -> String {
    format!("{table}/{}", short_hex(key))
}

fn seal_row<T: Serialize>(
    key: &DataKey,
    table: &str,
    row: &[u8],
    version: i64,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    let plain = Zeroizing::new(
        postcard::to_allocvec(value)
            .map_err(|e| StoreError::Decode { row: row_name(table, row), reason: e.to_string() })?,
    );
    Ok(key.seal(&plain, &row_aad(table, row, version)))
}

fn open_row<T: for<'de> Deserialize<'de>>(
    key: &DataKey,
    table: &str,
    row: &[u8],
    version: i64,
    sealed: &[u8],
) -> Result<T, StoreError> {
    let plain = key
        .open(sealed, &row_aad(table, row, version))
        .map_err(|_| StoreError::Tampered { row: row_name(table, row) })?;
    postcard::from_bytes(&plain)
        .map_err(|e| StoreError::Decode { row: row_name(table, row), reason: e.to_string() })
}

fn get_secret<T: for<'de> Deserialize<'de>>(
    conn: &Connection,
    key: &DataKey,
    name: &str,
) -> Result<Option<T>, StoreError> {
    let sealed: Option<Vec<u8>> =
        conn.query_row("SELECT value FROM secrets WHERE name = ?1", [name], |r| r.get(0)).optional()?;
    sealed.map(|s| open_row(key, "secrets", name.as_bytes(), 0, &s)).transpose()
}

fn put_secret<T: Serialize>(
    conn: &Connection,
    key: &DataKey,
    name: &str,
    value: &T,
) -> Result<(), StoreError> {
    let sealed = seal_row(key, "secrets", name.as_bytes(), 0, value)?;
    conn.execute(
        "INSERT INTO secrets (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        params![name, sealed],
    )?;
    Ok(())
}

fn read_body(
    tx: &Transaction<'_>,
    key: &DataKey,
    doc_key: &[u8; 32],
) -> Result<Option<DocumentBody>, StoreError> {
    let row = tx
        .query_row("SELECT version, body FROM documents WHERE doc_key = ?1", [doc_key.as_slice()], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .optional()?;
    row.map(|(version, body)| open_row(key, "body", doc_key, version, &body)).transpose()
}

/// Applies one received item inside the caller's transaction; returns notifications made.
fn apply_one(
    tx: &Transaction<'_>,
    key: &DataKey,
    lookup: &LookupHasher,
    item: &DocItem,
    now_ms: i64,
) -> Result<u64, StoreError> {
    let doc_key = lookup.hash("doc", &item.doc.to_string());
    let mut notified = 0;
    match &item.body {
        DocBody::Purge => {
            tx.execute("DELETE FROM documents WHERE doc_key = ?1", [doc_key.as_slice()])?;
        }
        DocBody::Whole(bytes) => match read_body(tx, key, &doc_key)? {
            Some(existing) => {
                let mut summary = PatientSummary::load(&existing.automerge)?;
                summary.merge_saved(bytes)?;
                check_received(&mut summary, &item.doc)?;
                write_document(tx, key, lookup, &mut summary, now_ms, None)?;
            }
            None => {
                // A new document is stored as the server saved it: no second save.
                let mut summary = PatientSummary::load(bytes)?;
                check_received(&mut summary, &item.doc)?;
                write_document(tx, key, lookup, &mut summary, now_ms, Some(bytes))?;
            }
        },
        DocBody::Changes(changes) => {
            let existing = read_body(tx, key, &doc_key)?
                .ok_or_else(|| StoreError::MissingDependencies { doc: short_hex(item.doc.as_bytes()) })?;
            let mut summary = PatientSummary::load(&existing.automerge)?;
            let before = crate::notify::snapshot(&mut summary)?;
            let decoded = changes
                .iter()
                .map(|c| automerge::Change::try_from(c.as_slice()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StoreError::Decode {
                    row: format!("change for {}", short_hex(item.doc.as_bytes())),
                    reason: e.to_string(),
                })?;
            summary.apply_changes(decoded)?;
            check_received(&mut summary, &item.doc)?;
            for text in crate::notify::changes(&before, &mut summary)? {
                let note = crate::notify::Notification { patient_id: item.doc, at_ms: now_ms, text };
                tx.execute("INSERT INTO notifications (body) VALUES (x'')", [])?;
                let id = tx.last_insert_rowid();
                let sealed = seal_row(key, "notifications", &id.to_be_bytes(), 0, &note)?;
                tx.execute("UPDATE notifications SET body = ?1 WHERE id = ?2", params![sealed, id])?;
                notified += 1;
            }
            write_document(tx, key, lookup, &mut summary, now_ms, None)?;
        }
    }
    Ok(notified)
}

/// Writes a patient's document and card under a new row version.
fn write_document(
    tx: &Transaction<'_>,
    key: &DataKey,
    lookup: &LookupHasher,
    summary: &mut PatientSummary,
    received_at_ms: i64,
    saved: Option<&[u8]>,
) -> Result<(), StoreError> {
    let patient_id = summary.patient_id()?;
    let demographics = summary.demographics()?;
    let doc_key = lookup.hash("doc", &patient_id.to_string());
    // A provisional record (no NHS number yet) is found by its id only.
    let nhs_key = match &demographics.nhs_number {
        Some(nhs) => {
            lookup.hash("nhs", NhsNumber::parse(nhs).map_err(|_| SummaryError::InvalidNhsNumber)?.as_str())
        }
        None => lookup.hash("provisional", &patient_id.to_string()),
    };
    let version: i64 = tx
        .query_row("SELECT version FROM documents WHERE doc_key = ?1", [doc_key.as_slice()], |r| r.get(0))
        .optional()?
        .map_or(1, |v: i64| v + 1);
    let card = PatientCard {
        patient_id,
        nhs_number: demographics.nhs_number,
        name: demographics.name,
        date_of_birth: demographics.date_of_birth,
        postcode: demographics.postcode,
    };
    let automerge = saved.map_or_else(|| summary.save(), <[u8]>::to_vec);
    let body = DocumentBody { patient_id, received_at_ms, automerge };
    let card = seal_row(key, "card", &doc_key, version, &card)?;
    let body = seal_row(key, "body", &doc_key, version, &body)?;
    tx.execute(
        "INSERT INTO documents (doc_key, nhs_key, version, card, body) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (doc_key) DO UPDATE SET nhs_key = excluded.nhs_key, version = excluded.version,
             card = excluded.card, body = excluded.body",
        params![doc_key.as_slice(), nhs_key.as_slice(), version, card, body],
    )?;
    Ok(())
}
