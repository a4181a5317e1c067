//! The device's encrypted replica: one SQLite file.
//!
//! Over 600 lines because opening, the data key, enrolment and the server's keys belong to one
//! type's invariants (nothing identifiable unsealed); patient records are in `records.rs`, what
//! a sync reads and writes in `sync.rs`, the lease and view log in `audit.rs`, wiping in `wipe.rs`.
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
//!
//! Parts: `records` (reading and local edits), `sync` (outbox, received pages, rounds),
//! `audit` (lease, view log, notifications), `wipe` (remote wipe).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{CryptoError, DataKey, KeyWrapper, LookupHasher};
use crate::identity::{Identity, short_hex};
use crate::nhs::NhsNumber;
use crate::protocol::{DocBody, DocItem, Resume};
use crate::summary::{Listing, PatientId, PatientSummary, SectionEntry, SummaryError};

mod audit;
mod records;
mod sync;
#[cfg(test)]
mod tests;
mod wipe;

/// Version 2 binds each document row's lookup columns into its associated data.
const FORMAT_VERSION: &str = "care-node-store/2";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("the store database failed: {0}")]
    Sqlite(Box<rusqlite::Error>),
    #[error("the file is not a care-node store (or is corrupt)")]
    NotAStore,
    #[error("the store file cannot be created or made private: {0}")]
    File(std::io::Error),
    #[error("the store was made by another version of care-node ({0}); re-enrol this device")]
    UnknownFormat(String),
    #[error("the store's data key could not be unwrapped: {0}")]
    Key(#[source] CryptoError),
    /// The store's data key is wrapped one way (a passphrase, the platform keystore) and it was
    /// opened the other way: nothing was tried or changed.
    #[error("this store is unlocked with {stored}, not with {given}")]
    WrongUnlockMethod { stored: &'static str, given: &'static str },
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
    /// Another connection to the store held it for longer than the busy timeout (5 s).
    #[error("the store is busy (another connection holds it); try again")]
    Busy,
    /// The device's disk is full: the write was rolled back whole (nothing already stored is
    /// lost) and works again once there is space.
    #[error(
        "this device's storage is full: free some space and try again (nothing already recorded was lost)"
    )]
    StorageFull,
    #[error("this device was wiped on the operator's instruction; its data key is destroyed")]
    Wiped,
    #[error(
        "patient data is locked: this device's clock went back {minutes} min since it was last used; \
         connect and sync to unlock"
    )]
    ClockWoundBack { minutes: i64 },
    #[error("this device may not make that change: {0}")]
    Refused(#[from] crate::policy::Refusal),
    #[error("the entry cannot be recorded: {0}")]
    InvalidEntry(#[from] crate::record::InvalidEntry),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy) => Self::Busy,
            Some(rusqlite::ErrorCode::DiskFull) => Self::StorageFull,
            _ => Self::Sqlite(Box::new(e)),
        }
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

/// Enrolment, sync and lease state, as an app's status screen and `care-node status` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct DeviceStatus {
    pub enrolled: bool,
    pub device_name: Option<String>,
    pub last_sync_ms: Option<i64>,
    pub lease_ms: Option<u64>,
    pub lease_expired: bool,
    pub patients: u64,
    pub pending_changes: u64,
    pub left_out_by_budget: u64,
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

impl PatientCard {
    /// The card of a patient listed so.
    fn of(patient_id: PatientId, listing: Listing) -> Self {
        let Listing { nhs_number, name, date_of_birth, postcode } = listing;
        Self { patient_id, nhs_number, name, date_of_birth, postcode }
    }
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

/// A local change the server refused, kept sealed on the device for the clinician.
#[derive(Serialize, Deserialize)]
struct DivergedBody {
    patient_id: PatientId,
    rule: String,
    place: String,
    at_ms: i64,
    #[serde(with = "serde_bytes")]
    change: Vec<u8>,
    /// The refused entries' lines as the device showed them before the refusal (patient data).
    entries: Vec<String>,
}

/// What the server refused of this device's entries on a patient: the rule, where, when, and
/// the device's own text of the entry, kept for the clinician (the refused change itself stays
/// sealed on the device).
#[derive(Clone, PartialEq, Eq)]
pub struct Diverged {
    pub doc: PatientId,
    pub rule: String,
    pub place: String,
    pub at_ms: i64,
    pub changes: u64,
    /// What the refused changes recorded, as the clinician saw it (`section: line`): patient
    /// data, shown only on request and never in `Debug`.
    pub entries: Vec<String>,
}

impl std::fmt::Debug for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Diverged")
            .field("doc", &self.doc)
            .field("rule", &self.rule)
            .field("place", &self.place)
            .field("at_ms", &self.at_ms)
            .field("changes", &self.changes)
            .field("entries", &self.entries.len())
            .finish()
    }
}

/// The encrypted device store.
pub struct DeviceStore {
    conn: Connection,
    key: DataKey,
    lookup: LookupHasher,
    /// The device's wall clock: entries' times, the lease, the view log ([`DeviceStore::set_clock`]).
    clock: crate::clock::Clock,
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
CREATE TABLE IF NOT EXISTS diverged (
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
        // Sealed rows or not, the file itself is the owner's only (its journals follow it).
        crate::private::file(path).map_err(StoreError::File)?;
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
            let wrapping: Option<String> = conn
                .query_row("SELECT CAST(value AS TEXT) FROM meta WHERE name = 'key_wrapping'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            if let Some(stored) = wrapping.filter(|w| w != wrapper.kind()) {
                return Err(StoreError::WrongUnlockMethod {
                    stored: unlock_method(&stored),
                    given: unlock_method(wrapper.kind()),
                });
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
        let store = Self { conn, key, lookup, clock: crate::clock::Clock::system() };
        store.verify_rows()?;
        if store.get_secret::<Zeroizing<Vec<u8>>>("identity")?.is_none() {
            let identity = Identity::generate();
            store.put_secret("identity", &Zeroizing::new(identity.seed().to_vec()))?;
        }
        Ok(store)
    }

    /// Checks that the document rows add up to the sealed rows root (see [`ROWS_ROOT`]).
    fn verify_rows(&self) -> Result<(), StoreError> {
        let mut root = [0u8; 32];
        let mut stmt = self.conn.prepare_cached("SELECT doc_key, version FROM documents")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let mark = row_mark(&self.lookup, &row.get::<_, Vec<u8>>(0)?, row.get(1)?);
            for (r, m) in root.iter_mut().zip(mark) {
                *r ^= m;
            }
        }
        let sealed: [u8; 32] = self.get_secret(ROWS_ROOT)?.unwrap_or([0; 32]);
        if sealed != root {
            return Err(StoreError::Tampered {
                row: "documents (a row was rolled back, removed or added)".into(),
            });
        }
        Ok(())
    }

    fn configure(conn: &Connection) -> Result<(), StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL").map_err(not_a_store)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.set_prepared_statement_cache_capacity(64);
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
            recorded_at_ms: self.now_ms(),
            clock_offset_ms: sync.clock_offset_ms(),
            person: None,
            source: None,
        })
    }

    /// The incarnation of the server store this device last synced with (a restore from backup
    /// makes a new one).
    pub fn server_incarnation(&self) -> Result<Option<[u8; 16]>, StoreError> {
        self.get_secret("server_incarnation")
    }

    pub fn set_server_incarnation(&self, incarnation: [u8; 16]) -> Result<(), StoreError> {
        self.put_secret("server_incarnation", &incarnation)
    }

    /// The next server key announced by the server (key rotation), pinned beside the enrolled one.
    pub fn staged_server_key(&self) -> Result<Option<[u8; 32]>, StoreError> {
        self.get_secret("staged_server_key")
    }

    /// Follows the server's key rotation as told in its Welcome over a connection that proved
    /// `presented` (a pinned key): a newly announced next key is staged; once the server presents
    /// the staged key, it becomes the only pinned key; a cancelled rotation drops the staged key.
    pub fn follow_server_key(&self, presented: [u8; 32], next: Option<[u8; 32]>) -> Result<(), StoreError> {
        let mut enrolment = self.require_enrolment()?;
        let staged = self.staged_server_key()?;
        if presented != enrolment.server_key {
            if staged != Some(presented) {
                // The handshake admitted only pinned keys; anything else is a bug, not a rotation.
                return Err(StoreError::Tampered { row: "server key".into() });
            }
            enrolment.server_key = presented;
            self.put_secret("enrolment", &enrolment)?;
            tracing::info!("the server now presents its new key; the old one is no longer trusted");
        }
        match next.filter(|n| *n != enrolment.server_key) {
            Some(next) if staged != Some(next) => self.put_secret("staged_server_key", &next)?,
            Some(_) => {}
            None if staged.is_some() => {
                self.conn.execute("DELETE FROM secrets WHERE name = 'staged_server_key'", [])?;
            }
            None => {}
        }
        Ok(())
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

    /// Enrolment, sync and lease state (no patient data: opaque counts and the device's name).
    pub fn status(&self) -> Result<DeviceStatus, StoreError> {
        let enrolment = self.enrolment()?;
        let sync = self.sync_state()?;
        Ok(DeviceStatus {
            enrolled: enrolment.is_some(),
            device_name: enrolment.map(|e| e.device_name),
            last_sync_ms: sync.last_sync_ms,
            lease_ms: sync.lease_ms,
            lease_expired: self.check_lease(self.now_ms()).is_err(),
            patients: self.document_count()?,
            pending_changes: self.pending_count()?,
            left_out_by_budget: sync.left_out,
        })
    }

    fn nhs_key(&self, nhs: &NhsNumber) -> [u8; 32] {
        self.lookup.hash("nhs", nhs.as_str())
    }

    fn doc_key(&self, doc: &PatientId) -> [u8; 32] {
        self.lookup.hash("doc", &doc.to_string())
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

    /// Another connection to the same open store, with the same key: an app reads and records
    /// on one while a sync runs on the other, so nothing local waits for the network (SQLite's
    /// write-ahead log lets readers run beside a writer; writers wait for each other's short
    /// transactions, never for a round trip).
    pub fn another_connection(&self) -> Result<Self, StoreError> {
        let path = self.conn.path().filter(|p| !p.is_empty()).ok_or(StoreError::NotAStore)?;
        let conn = Connection::open(path)?;
        Self::configure(&conn)?;
        Ok(Self { conn, key: self.key.clone(), lookup: self.lookup.clone(), clock: self.clock.clone() })
    }

    /// Uses `clock` for this device's time from now on (the system clock by default): a test's
    /// skewed or jumping device clock.
    pub fn set_clock(&mut self, clock: crate::clock::Clock) {
        self.clock = clock;
    }

    /// The device's time now, by its clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// This moment by the device's clock, wall and monotonic: what the sync session is handed.
    pub fn now(&self) -> crate::clock::Now {
        self.clock.now()
    }

    /// A monotonic time (see [`crate::clock::Clock::monotonic_ms`]).
    pub fn monotonic_ms(&self) -> i64 {
        self.clock.monotonic_ms()
    }

    /// Direct access to the database, for tests that tamper with the file.
    #[doc(hidden)]
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// A write transaction that takes the file's write lock at once (`BEGIN IMMEDIATE`): several
/// connections may hold this store (an app's reads beside its sync, a second CLI), and a
/// transaction that reads, then writes, must not find another connection's commit in between
/// (SQLite would refuse the upgrade with `SQLITE_BUSY`); this one waits for the lock instead
/// (the busy timeout), so each read-modify-write sees the latest committed rows.
fn write_tx(conn: &mut Connection) -> Result<Transaction<'_>, StoreError> {
    Ok(conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?)
}

/// How a key wrapping's kind is unlocked, in words.
fn unlock_method(kind: &str) -> &'static str {
    match kind {
        "passphrase-argon2id" => "a passphrase",
        "platform-keystore" => "the platform keystore",
        _ => "another key wrapping",
    }
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

/// The sealed secret that accumulates a keyed mark of every document row's (lookup key,
/// version): a row put back at an older version, or one removed or added behind the store's
/// back, no longer adds up, and the store refuses to open. (A whole file rolled back together
/// with this secret needs state outside the file to detect: see docs/security.md.)
const ROWS_ROOT: &str = "rows_root";

fn row_mark(lookup: &LookupHasher, doc_key: &[u8], version: i64) -> [u8; 32] {
    lookup.hash("row", &format!("{}:{version}", crate::identity::hex(doc_key)))
}

/// Toggles `marks` in the rows root (XOR: adding and removing a mark are the same step).
pub(super) fn adjust_rows_root(
    tx: &Transaction<'_>,
    key: &DataKey,
    marks: &[[u8; 32]],
) -> Result<(), StoreError> {
    let mut root: [u8; 32] = get_secret(tx, key, ROWS_ROOT)?.unwrap_or([0; 32]);
    for mark in marks {
        for (r, m) in root.iter_mut().zip(mark) {
            *r ^= m;
        }
    }
    put_secret(tx, key, ROWS_ROOT, &root)
}

/// What a document row's sealed columns are bound to: both its lookup keys, so a row whose NHS
/// number lookup was swapped with another's fails authentication instead of showing one patient
/// under another's number.
fn document_row(doc_key: &[u8], nhs_key: &[u8]) -> Vec<u8> {
    let mut row = doc_key.to_vec();
    row.extend_from_slice(nhs_key);
    row
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
    let sealed: Option<Vec<u8>> = conn
        .prepare_cached("SELECT value FROM secrets WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?;
    sealed.map(|s| open_row(key, "secrets", name.as_bytes(), 0, &s)).transpose()
}

fn put_secret<T: Serialize>(
    conn: &Connection,
    key: &DataKey,
    name: &str,
    value: &T,
) -> Result<(), StoreError> {
    let sealed = seal_row(key, "secrets", name.as_bytes(), 0, value)?;
    conn.prepare_cached(
        "INSERT INTO secrets (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![name, sealed])?;
    Ok(())
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
    let listing = summary.listing()?;
    let automerge = saved.map_or_else(|| summary.save(), <[u8]>::to_vec);
    write_row(tx, key, lookup, patient_id, listing, DocumentBody { patient_id, received_at_ms, automerge })
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

/// A stored document, opened: parsed, and checked to be what its row says. A document stored
/// as the server sent it (see `apply_one`) is parsed for the first time here, so here it must
/// hold everything it depends on, name the patient it was sent for, be filed under its own NHS
/// number (a lookup by number never opens another patient's record) and read as its card (a
/// search by name or a pick from the list never opens another person's record either).
fn open_document(
    lookup: &LookupHasher,
    nhs_key: &[u8],
    card: &PatientCard,
    body: &DocumentBody,
) -> Result<PatientSummary, StoreError> {
    let mut summary = PatientSummary::load(&body.automerge)?;
    check_received(&mut summary, &body.patient_id)?;
    let listing = summary.listing()?;
    let disagrees = |reason: &str| StoreError::Decode {
        row: format!("document {}", short_hex(body.patient_id.as_bytes())),
        reason: reason.into(),
    };
    if nhs_lookup(lookup, &body.patient_id, &listing)?.as_slice() != nhs_key {
        return Err(disagrees("the document is filed under another NHS number than its own"));
    }
    if *card != PatientCard::of(body.patient_id, listing) {
        return Err(disagrees("the document does not read as the card it is listed by"));
    }
    Ok(summary)
}

/// The lookup key of the row a patient's document is found by: its NHS number's, or for a
/// provisional record (no NHS number yet) its id's.
fn nhs_lookup(
    lookup: &LookupHasher,
    patient_id: &PatientId,
    listing: &Listing,
) -> Result<[u8; 32], StoreError> {
    Ok(match &listing.nhs_number {
        Some(nhs) => {
            lookup.hash("nhs", NhsNumber::parse(nhs).map_err(|_| SummaryError::InvalidNhsNumber)?.as_str())
        }
        None => lookup.hash("provisional", &patient_id.to_string()),
    })
}

/// Writes a document's row (its card from `listing`, its body) in the caller's transaction,
/// replacing the one it had.
fn write_row(
    tx: &Transaction<'_>,
    key: &DataKey,
    lookup: &LookupHasher,
    patient_id: PatientId,
    demographics: Listing,
    body: DocumentBody,
) -> Result<(), StoreError> {
    let doc_key = lookup.hash("doc", &patient_id.to_string());
    let nhs_key = nhs_lookup(lookup, &patient_id, &demographics)?;
    let previous: Option<i64> = tx
        .prepare_cached("SELECT version FROM documents WHERE doc_key = ?1")?
        .query_row([doc_key.as_slice()], |r| r.get(0))
        .optional()?;
    let version = previous.map_or(1, |v| v + 1);
    let mut marks = vec![row_mark(lookup, &doc_key, version)];
    marks.extend(previous.map(|v| row_mark(lookup, &doc_key, v)));
    adjust_rows_root(tx, key, &marks)?;
    let card = PatientCard::of(patient_id, demographics);
    let row = document_row(&doc_key, &nhs_key);
    let card = seal_row(key, "card", &row, version, &card)?;
    let body = seal_row(key, "body", &row, version, &body)?;
    tx.prepare_cached(
        "INSERT INTO documents (doc_key, nhs_key, version, card, body) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (doc_key) DO UPDATE SET nhs_key = excluded.nhs_key, version = excluded.version,
             card = excluded.card, body = excluded.body",
    )?
    .execute(params![doc_key.as_slice(), nhs_key.as_slice(), version, card, body])?;
    Ok(())
}

/// The patient document whose `column` (`doc_key` or `nhs_key`) is `lookup`, read on `conn` (a
/// transaction, for a read-modify-write).
pub(super) fn read_document(
    conn: &Connection,
    key: &DataKey,
    lookup_hasher: &LookupHasher,
    column: &str,
    lookup: &[u8; 32],
) -> Result<Option<StoredPatient>, StoreError> {
    let row = conn
        .query_row(
            &format!("SELECT {SEALED_DOCUMENT_COLUMNS} FROM documents WHERE {column} = ?1"),
            [lookup.as_slice()],
            sealed_document_row,
        )
        .optional()?;
    row.map(|row| open_sealed_document(key, lookup_hasher, row)).transpose()
}

/// A `documents` row as stored: doc_key, nhs_key, version, sealed body, sealed card (the
/// columns [`SEALED_DOCUMENT_COLUMNS`], read by [`sealed_document_row`]).
pub(super) type SealedDocumentRow = (Vec<u8>, Vec<u8>, i64, Vec<u8>, Vec<u8>);

pub(super) const SEALED_DOCUMENT_COLUMNS: &str = "doc_key, nhs_key, version, body, card";

pub(super) fn sealed_document_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SealedDocumentRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

/// A stored row's document, unsealed and opened ([`open_document`]'s checks).
pub(super) fn open_sealed_document(
    key: &DataKey,
    lookup: &LookupHasher,
    (doc_key, nhs_key, version, body, card): SealedDocumentRow,
) -> Result<StoredPatient, StoreError> {
    let row = document_row(&doc_key, &nhs_key);
    let body: DocumentBody = open_row(key, "body", &row, version, &body)?;
    let card: PatientCard = open_row(key, "card", &row, version, &card)?;
    let summary = open_document(lookup, &nhs_key, &card, &body)?;
    Ok(StoredPatient { summary, received_at_ms: body.received_at_ms })
}
