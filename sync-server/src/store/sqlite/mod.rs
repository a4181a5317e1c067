//! The embedded default store: one SQLite file in WAL mode.
//!
//! One file per part of the store: [`devices`], [`patients`], [`governance`], [`sync`].

pub mod backup;
mod devices;
mod governance;
mod migrations;
mod patients;
mod sync;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use care_node::identity::{Identity, PublicKey, short_hex};
use care_node::nhs::NhsNumber;
use care_node::summary::{PatientId, PatientSummary, SCHEMA_VERSION};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::store::prelude::*;
use crate::store::{
    AlertRecord, AuditFilter, AuditRecord, BatchWrite, ChangesByDoc, CheckedChanges, Compacted, ConsentFlags,
    Derived, DeviceRecord, EnrolError, Grant, GrantKind, ImportProgress, LogEntry, MergeOutcome, NewDocument,
    QuarantineRecord, QuarantineReview, Role, RoundOutcome, StoreError, UploadError, UploadOutcome,
};
use crate::store::{decode_listing, encode_listing};

const FORMAT: &str = "care-sync-server/1";

/// Held documents.
const HELD: i64 = 0;
/// Sent whole in the pending round, not yet confirmed.
const SENDING: i64 = 1;
/// Purged in the pending round, not yet confirmed.
const PURGING: i64 = 2;
/// Sent whole in the priority part of the pending round, not yet confirmed.
const SENDING_FIRST: i64 = 3;

/// Read-only connections beside the one that writes: in WAL mode readers see the last commit
/// and never wait for the writer, so planning rounds and loading documents for many devices do
/// not queue behind an import or an upload (nor behind each other, up to this many at once).
const READERS: usize = 4;

pub struct SqliteStore {
    /// The one connection that writes (SQLite has one writer at a time anyway), and reads that
    /// belong with a write.
    conn: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => Self::StorageFull,
            _ => Self::Backend(Box::new(e)),
        }
    }
}

fn patient_id(bytes: Vec<u8>) -> rusqlite::Result<PatientId> {
    PatientId::from_slice(&bytes)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e)))
}

/// A stored value outside the set this server knows (a damaged store, or one written by a newer
/// release): reading it is an error that names the column and the value.
pub(super) fn unknown_stored(column: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("the store holds {column} `{value}`, which this server does not know").into(),
    )
}

/// A stored key, seed or hash of `N` bytes; any other length is a damaged store, said so (a
/// server that quietly made a new identity or incarnation would cut off every device).
pub(super) fn fixed_bytes<const N: usize>(column: &str, value: Vec<u8>) -> rusqlite::Result<[u8; N]> {
    let len = value.len();
    value.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            format!("the store holds a {column} of {len} bytes where {N} belong: the store is damaged")
                .into(),
        )
    })
}

fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRecord> {
    let role: String = r.get("role")?;
    let key: Option<Vec<u8>> = r.get("public_key")?;
    Ok(DeviceRecord {
        id: r.get("id")?,
        name: r.get("name")?,
        // A role this server does not know is a damaged or newer store: said so, never guessed.
        role: role.parse().map_err(|_| unknown_stored("role", &role))?,
        // A damaged key refuses that device (it cannot authenticate), said at error level; one
        // bad row must not stop the listing that revocations and compaction read.
        public_key: key.and_then(|k| match fixed_bytes("device key", k) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::error!(device = r.get::<_, i64>("id").unwrap_or(-1), error = %e, "device refused");
                None
            }
        }),
        enrolled_at_ms: r.get("enrolled_at_ms")?,
        revoked_at_ms: r.get("revoked_at_ms")?,
        acked_cursor: r.get::<_, i64>("acked_cursor")? as u64,
        last_sync_ms: r.get("last_sync_ms")?,
        wipe_requested_at_ms: r.get("wipe_requested_at_ms")?,
        wiped_at_ms: r.get("wiped_at_ms")?,
        left_out: r.get::<_, i64>("left_out")? as u64,
    })
}

thread_local! {
    /// Set while this thread runs inside [`SqliteStore::group_commit_in`].
    static GROUPED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The writing connection, held: inside a group commit its commits do not wait for the disk
/// (`synchronous=NORMAL`) until the group's last; outside, every commit is synced (`FULL`).
struct Writer<'c>(std::sync::MutexGuard<'c, Connection>, bool);

impl<'c> Writer<'c> {
    fn new(conn: std::sync::MutexGuard<'c, Connection>) -> Self {
        let grouped = GROUPED.with(|g| g.get());
        if grouped && let Err(e) = conn.pragma_update(None, "synchronous", "NORMAL") {
            tracing::error!(error = %e, "could not defer a grouped commit; it is synced");
        }
        Writer(conn, grouped)
    }
}

impl std::ops::Deref for Writer<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.0
    }
}

impl std::ops::DerefMut for Writer<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.0
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        if self.1
            && let Err(e) = self.0.pragma_update(None, "synchronous", "FULL")
        {
            tracing::error!(error = %e, "could not restore synchronous=FULL");
        }
    }
}

/// Round bookkeeping (what a device was sent, what it confirmed) is committed without waiting for
/// the disk: lost in a crash, it only makes the server send some documents again (applying them
/// is idempotent), and the device's next `Hello` says where it is. Everything else, and every
/// acknowledged upload, is committed with `synchronous=FULL`. The guard restores FULL on drop.
struct Bookkeeping<'c>(&'c Connection);

impl<'c> Bookkeeping<'c> {
    fn new(conn: &'c Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(Self(conn))
    }
}

impl Drop for Bookkeeping<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.pragma_update(None, "synchronous", "FULL") {
            tracing::error!(error = %e, "could not restore synchronous=FULL");
        }
    }
}

impl SqliteStore {
    /// Opens (or creates) the store at `dir/server.db`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // The data directory and the database (and so its journals) are the server user's only.
        care_node::private::dir(dir)?;
        care_node::private::file(&dir.join("server.db"))?;
        let mut conn = Connection::open(dir.join("server.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.set_prepared_statement_cache_capacity(256);
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // Every write transaction takes the write lock when it begins: one that read first and
        // then wrote would fail at once ("database is locked") when another process (the CLI
        // beside `serve`, a second instance) wrote in between, instead of waiting its turn.
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        migrations::migrate(&mut conn, care_node::now_ms())?;
        let format: Option<String> = conn
            .prepare_cached("SELECT CAST(value AS TEXT) FROM meta WHERE name = 'format'")?
            .query_row([], |r| r.get(0))
            .optional()?;
        match format.as_deref() {
            None => {
                conn.prepare_cached("INSERT INTO meta VALUES ('format', ?1)")?
                    .execute([FORMAT.as_bytes()])?;
            }
            Some(FORMAT) => {}
            Some(_) => return Err(StoreError::UnknownFormat),
        }
        let readers = (0..READERS).map(|_| Self::reader(dir).map(Mutex::new)).collect::<Result<_, _>>()?;
        let store = Self { conn: Mutex::new(conn), readers, next_reader: Default::default() };
        store.migrate_documents()?;
        Ok(store)
    }

    /// The schema steps recorded in the store, in order: `(number, name)` of each file of
    /// `migrations/sqlite` applied.
    pub fn schema_steps(&self) -> Result<Vec<(u32, String)>, StoreError> {
        migrations::recorded(&self.read())
    }

    /// Brings every stored document to the current schema version, once per version, as the
    /// server's own changes (which then reach devices like any other change).
    fn migrate_documents(&self) -> Result<(), StoreError> {
        let done: Option<i64> = self
            .conn()
            .prepare_cached(
                "SELECT CAST(CAST(value AS TEXT) AS INTEGER) FROM meta WHERE name = 'doc_schema'",
            )?
            .query_row([], |r| r.get(0))
            .optional()?;
        if done.is_some_and(|v| v as u64 >= SCHEMA_VERSION) {
            return Ok(());
        }
        let actor = crate::server_actor(&self.server_identity()?);
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let ids: Vec<PatientId> = {
            let mut stmt = tx.prepare_cached("SELECT id FROM patients")?;
            stmt.query_map([], |r| patient_id(r.get(0)?))?.collect::<Result<_, _>>()?
        };
        let mut migrated = 0;
        for id in ids {
            let saved: Vec<u8> = tx
                .prepare_cached("SELECT doc FROM patients WHERE id = ?1")?
                .query_row([id.as_bytes().as_slice()], |r| r.get(0))?;
            let mut summary = PatientSummary::load(&saved)
                .map_err(|e| StoreError::Document(short_hex(id.as_bytes()), Box::new(e)))?;
            let before = summary.heads();
            if summary
                .migrate(actor.clone(), care_node::now_ms())
                .map_err(|e| StoreError::Document(short_hex(id.as_bytes()), Box::new(e)))?
            {
                let changes = summary.changes_since(&before);
                log_changes(&tx, &id, None, &changes, &mut summary)?;
                migrated += 1;
            }
        }
        tx.prepare_cached("INSERT INTO meta (name, value) VALUES ('doc_schema', ?1) ON CONFLICT (name) DO UPDATE SET value = excluded.value")?.execute([SCHEMA_VERSION.to_string().as_bytes()],
        )?;
        tx.commit()?;
        if migrated > 0 {
            tracing::info!(migrated, "patient documents migrated to schema version {SCHEMA_VERSION}");
        }
        Ok(())
    }

    fn conn(&self) -> Writer<'_> {
        let guard = self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Writer::new(guard)
    }

    /// [`PatientRecords::group_commit`]: inside `work`, this thread's commits use
    /// `synchronous=NORMAL` (in WAL mode: atomic, appended to the WAL, not yet synced); then one
    /// commit with `synchronous=FULL` syncs the WAL, and with it every frame written before it.
    pub(super) fn group_commit_in(&self, work: &mut dyn FnMut()) -> Result<(), StoreError> {
        /// Puts the flag back however `work` ends (a panic included).
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                GROUPED.with(|g| g.set(self.0));
            }
        }
        let outer = GROUPED.with(|g| g.replace(true));
        {
            let _restore = Restore(outer);
            work();
        }
        if outer {
            return Ok(()); // the outermost group makes it durable
        }
        // A write, so that the commit appends a frame and syncs the WAL.
        self.conn().prepare_cached("UPDATE group_commit SET n = n + 1 WHERE id = 1")?.execute([])?;
        Ok(())
    }

    /// A read-only connection to the store (opened after the writer made the schema).
    fn reader(dir: &Path) -> Result<Connection, StoreError> {
        use rusqlite::OpenFlags;
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(dir.join("server.db"), flags)?;
        conn.set_prepared_statement_cache_capacity(256);
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(conn)
    }

    /// A free read-only connection (each reader in turn; waits for one only when all are busy).
    fn read(&self) -> std::sync::MutexGuard<'_, Connection> {
        let first = self.next_reader.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for i in 0..self.readers.len() {
            if let Ok(guard) = self.readers[(first + i) % self.readers.len()].try_lock() {
                return guard;
            }
        }
        let reader = &self.readers[first % self.readers.len()];
        reader.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Appends changes to the log and saves the document, inside the caller's transaction. The
/// NHS number column follows the document (a merged-away record gives its number up).
fn log_changes(
    tx: &Transaction<'_>,
    patient: &PatientId,
    author: Option<i64>,
    changes: &[automerge::Change],
    summary: &mut PatientSummary,
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let derived = Derived::of(patient, summary)?;
    log_derived(tx, patient, author, changes, &derived)
}

/// [`log_changes`] with the saved document and its index already worked out (by an import's
/// workers, beside the one writer).
fn log_derived(
    tx: &Transaction<'_>,
    patient: &PatientId,
    author: Option<i64>,
    changes: &[automerge::Change],
    derived: &Derived,
) -> Result<(), StoreError> {
    let mut last = None;
    for change in changes {
        tx.prepare_cached(
            "INSERT INTO changes (patient_id, author_device, hash, body) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![
            patient.as_bytes().as_slice(),
            author,
            change.hash().0.as_slice(),
            change.raw_bytes()
        ])?;
        last = Some(tx.last_insert_rowid());
    }
    if let Some(seq) = last {
        // A document without a readable listing is stored without one: devices parse it.
        let listing = derived.listing.as_ref().and_then(encode_listing);
        tx.prepare_cached(
            "UPDATE patients SET doc = ?1, last_seq = ?2, nhs_number = ?3, district = ?4, risk_flags = ?5,
                 review_date = ?6, merged = ?7, listing = ?9 WHERE id = ?8",
        )?
        .execute(params![
            derived.saved,
            seq,
            derived.nhs_number,
            derived.index.district,
            derived.flags(),
            derived.index.review_date,
            derived.merged,
            patient.as_bytes().as_slice(),
            listing
        ])
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation) => StoreError::DuplicatePatient,
            _ => StoreError::from(e),
        })?;
    }
    Ok(())
}

fn load_in(tx: &Transaction<'_>, patient: &PatientId) -> Result<PatientSummary, StoreError> {
    let saved: Vec<u8> = tx
        .prepare_cached("SELECT doc FROM patients WHERE id = ?1")?
        .query_row([patient.as_bytes().as_slice()], |r| r.get(0))
        .optional()?
        .ok_or(StoreError::UnknownPatient)?;
    PatientSummary::load(&saved).map_err(|e| StoreError::Document(short_hex(patient.as_bytes()), Box::new(e)))
}

fn audit_in(
    tx: &Connection,
    actor: &str,
    action: &str,
    patient: Option<&PatientId>,
    detail: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO audit (at_ms, actor, action, patient_id, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![now_ms, actor, action, patient.map(|p| p.as_bytes().to_vec()), detail])?;
    Ok(())
}
