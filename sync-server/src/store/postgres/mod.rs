//! The PostgreSQL store: several server instances over one database (docs/storage.md).
//!
//! One file per part of the store, as for SQLite: [`devices`], [`patients`], [`governance`],
//! [`sync`]. The store traits are synchronous (the server calls them on blocking threads), so
//! the store runs its own small tokio runtime for `tokio-postgres` and a `deadpool-postgres`
//! pool, and each call blocks on it.
//!
//! What makes several writers safe:
//! - **The change log is numbered in commit order.** A writer takes its sequence numbers by
//!   updating the one row of `log_head` as its last statement ([`Logging::commit`]), and holds
//!   that row's lock until it commits, so a reader that sees number n sees every number below
//!   it (no skipped sequences: a cursor can never move past a change that commits later).
//! - **Documents are read for update.** Every read-modify-write of a patient's document locks
//!   its row (`FOR NO KEY UPDATE`, which foreign-key checks do not wait for) in the writing
//!   transaction, so two instances merging changes into one document never lose one another's.
//! - **One lock order.** Documents first (in id order when several), then the log head, then
//!   (by deferred triggers, at commit) the scope epoch; nothing waits for a document while
//!   holding the head or the epoch, so no two writers wait on each other in a cycle through
//!   them, and writers merge and save side by side. A transaction PostgreSQL still ends to
//!   break a deadlock or a serialization conflict is tried again ([`PostgresStore::run_tx`]).
//! - **Once-only actions are conditional writes** (an enrolment token's redemption, a review,
//!   an acknowledgement) under a row lock, as the store suite checks through two instances.

mod devices;
mod governance;
mod migrations;
mod patients;
pub mod scratch;
mod sync;
mod tls;

use std::collections::{HashMap, HashSet};

use care_node::identity::{Identity, PublicKey, short_hex};
use care_node::nhs::NhsNumber;
use care_node::summary::{PatientId, PatientSummary};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;

use crate::store::prelude::*;
use crate::store::{
    AlertRecord, AuditFilter, AuditRecord, BatchWrite, ChangesByDoc, CheckedChanges, Compacted, ConsentFlags,
    Derived, DeviceRecord, EnrolError, Grant, GrantKind, ImportProgress, LogEntry, MergeOutcome, NewDocument,
    QuarantineRecord, QuarantineReview, Role, RoundOutcome, StoreError, UploadError, UploadOutcome,
    decode_listing, encode_listing,
};

type Client = deadpool_postgres::Client;
type Tx<'a> = deadpool_postgres::Transaction<'a>;

/// Held documents.
const HELD: i64 = 0;
/// Sent whole in the pending round, not yet confirmed.
const SENDING: i64 = 1;
/// Purged in the pending round, not yet confirmed.
const PURGING: i64 = 2;
/// Sent whole in the priority part of the pending round, not yet confirmed.
const SENDING_FIRST: i64 = 3;

const FORMAT: &str = "care-sync-server/1";

/// Connections each instance keeps to the database at most.
const POOL_SIZE: usize = 16;
/// How long connecting to one of the database's addresses may take (each host of a multi-host
/// URL has its own: a dead primary does not keep the standby from being tried).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a store call waits for a free connection of the pool.
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

pub struct PostgresStore {
    /// Always `Some` until dropped (a runtime dropped inside async code would panic, so `Drop`
    /// shuts it down in the background instead).
    runtime: Option<tokio::runtime::Runtime>,
    pool: deadpool_postgres::Pool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostgresStore")
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.code() {
            Some(code) if *code == SqlState::DISK_FULL => Self::StorageFull,
            _ => Self::Backend(Box::new(e)),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        if let Some(problem) = tls::certificate_problem(&e) {
            return Self::Backend(
                format!(
                    "the database's TLS certificate is not trusted ({problem}): name the authority that \
                     signed it with sslrootcert=PATH in the store URL (or sslmode=disable, on a network you trust)"
                )
                .into(),
            );
        }
        // Refused at connection (authentication, pg_hba, no such database): PostgreSQL's own
        // words, which name no data, only the user, host and database. (Errors of statements
        // stay opaque: their details may quote a row.)
        if let deadpool_postgres::PoolError::Backend(pg) = &e
            && let Some(db) = pg.as_db_error()
        {
            return Self::Backend(
                format!("the database refused the connection: {} {}", db.severity(), db.message()).into(),
            );
        }
        Self::Backend(Box::new(e))
    }
}

/// An error that says PostgreSQL rolled the transaction back to settle a conflict with another
/// (a deadlock or a serialization failure): the same work, tried again, can succeed.
trait Contended {
    fn contended(&self) -> bool;
}

impl Contended for StoreError {
    fn contended(&self) -> bool {
        let Self::Backend(e) = self else { return false };
        e.downcast_ref::<tokio_postgres::Error>().and_then(|e| e.code()).is_some_and(|code| {
            *code == SqlState::T_R_DEADLOCK_DETECTED || *code == SqlState::T_R_SERIALIZATION_FAILURE
        })
    }
}

impl Contended for UploadError {
    fn contended(&self) -> bool {
        matches!(self, Self::Store(e) if e.contended())
    }
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/database`) and
    /// brings its schema to this release's (each step once, whichever instance starts first).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with_password(url, None)
    }

    /// [`PostgresStore::open`] with the password given apart from the URL (a file's).
    pub fn open_with_password(url: &str, password: Option<&str>) -> Result<Self, StoreError> {
        let tls::Connect { mut config, tls } = tls::Connect::parse(url)?;
        if let Some(password) = password {
            config.password(password);
        }
        if config.get_application_name().is_none() {
            config.application_name("care-sync-server");
        }
        // A database host that does not answer is an error in seconds, not at the OS's TCP
        // timeout: devices are told to try again, feeds are answered AE.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("care-sync-postgres")
            .enable_all()
            .build()?;
        let recycling =
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast };
        let manager = match tls {
            tls::Tls::Off(none) => deadpool_postgres::Manager::from_config(config, none, recycling),
            tls::Tls::Verified(rustls) => deadpool_postgres::Manager::from_config(config, rustls, recycling),
        };
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_WAIT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        let store = Self { runtime: Some(runtime), pool };
        store.run(async |c| migrations::migrate(c, care_node::now_ms()).await.map(drop))?;
        // The same format mark as a SQLite store's: a database of another program is refused.
        let format = store.meta_once("format", || FORMAT.as_bytes().to_vec())?;
        if format != FORMAT.as_bytes() {
            return Err(StoreError::UnknownFormat);
        }
        store.migrate_documents()?;
        Ok(store)
    }

    /// Runs `work` with a pooled connection, blocking the calling thread until it is done.
    ///
    /// The server calls the store on blocking threads, where this blocks on the store's own
    /// runtime. Called from async code instead (a task of a multi-threaded runtime, or a
    /// single-threaded one such as a test's), it still works rather than panicking: on a
    /// multi-threaded runtime the worker is handed over for the wait (`block_in_place`), on a
    /// single-threaded one the wait moves to a thread of its own, so the caller's runtime
    /// (which cannot block on another) is not asked to.
    fn run<T: Send, E: From<StoreError> + Send>(
        &self,
        work: impl AsyncFnOnce(&mut Client) -> Result<T, E> + Send,
    ) -> Result<T, E> {
        let runtime = self.runtime.as_ref().expect("the runtime lives as long as the store");
        let wait = || {
            runtime.block_on(async {
                let mut client = self.pool.get().await.map_err(StoreError::from)?;
                work(&mut client).await
            })
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Err(_) => wait(),
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            Ok(_) => std::thread::scope(|s| s.spawn(wait).join().expect("a store call panicked")),
        }
    }

    /// [`PostgresStore::run`] for work that is one transaction: it runs again (three tries in
    /// all) when PostgreSQL ended it to break a deadlock or a serialization conflict with
    /// another writer, which rolled it back whole. (Writers lock documents in id order and the
    /// log head last, but a batch of new patients can still meet another's in the unique index.)
    fn run_tx<T: Send, E: From<StoreError> + Contended + Send>(
        &self,
        work: impl AsyncFn(&mut Client) -> Result<T, E> + Send + Sync,
    ) -> Result<T, E> {
        const TRIES: u32 = 3;
        let mut tried = 1;
        loop {
            match self.run(async |c| work(c).await) {
                Err(e) if e.contended() && tried < TRIES => {
                    tracing::info!(tried, "a store transaction met another writer's; trying it again");
                    // Apart from the other writer's retry, which would meet it again.
                    let jitter = care_node::now_ms().rem_euclid(20) as u64;
                    std::thread::sleep(std::time::Duration::from_millis(10 * u64::from(tried) + jitter));
                    tried += 1;
                }
                done => return done,
            }
        }
    }

    /// The schema steps recorded in the store, in order: `(number, name)`.
    pub fn schema_steps(&self) -> Result<Vec<(u32, String)>, StoreError> {
        self.run(async |c| migrations::recorded(c).await)
    }

    /// Brings every stored document to the current schema version, once per version, as the
    /// server's own changes (as the SQLite store does).
    fn migrate_documents(&self) -> Result<(), StoreError> {
        use care_node::summary::SCHEMA_VERSION;
        let actor = crate::server_actor(&self.server_identity()?);
        self.run(async |c| {
            let mut tx = logging(c).await?;
            // One instance at a time migrates; the others wait here and then find it done.
            tx.execute("SELECT pg_advisory_xact_lock(7401)", &[]).await?;
            let done = tx.query_opt("SELECT value FROM meta WHERE name = 'doc_schema'", &[]).await?;
            let done: Option<u64> = match done {
                Some(row) => {
                    String::from_utf8(row.try_get::<_, Vec<u8>>(0)?).ok().and_then(|v| v.parse().ok())
                }
                None => None,
            };
            if done.is_some_and(|v| v >= SCHEMA_VERSION) {
                return Ok(());
            }
            let ids: Vec<PatientId> = tx
                .query("SELECT id FROM patients ORDER BY id", &[])
                .await?
                .iter()
                .map(|r| patient_id(r.try_get(0)?))
                .collect::<Result<_, StoreError>>()?;
            let mut migrated = 0;
            for id in ids {
                let mut summary = load_in(&tx, &id).await?;
                let before = summary.heads();
                if summary
                    .migrate(actor.clone(), care_node::now_ms())
                    .map_err(|e| StoreError::Document(short_hex(id.as_bytes()), Box::new(e)))?
                {
                    let changes = summary.changes_since(&before);
                    log_changes(&mut tx, &id, None, &changes, &mut summary).await?;
                    migrated += 1;
                }
            }
            tx.execute(
                "INSERT INTO meta (name, value) VALUES ('doc_schema', $1)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                &[&SCHEMA_VERSION.to_string().into_bytes()],
            )
            .await?;
            tx.commit().await?;
            if migrated > 0 {
                tracing::info!(migrated, "patient documents migrated to schema version {SCHEMA_VERSION}");
            }
            Ok(())
        })
    }
}

fn patient_id(bytes: Vec<u8>) -> Result<PatientId, StoreError> {
    PatientId::from_slice(&bytes).map_err(|e| StoreError::Unreadable("patient id", e.to_string()))
}

fn patient_ids(rows: &[Row]) -> Result<HashSet<PatientId>, StoreError> {
    rows.iter().map(|r| patient_id(r.try_get(0)?)).collect()
}

/// A stored key, seed or hash of `N` bytes; any other length is a damaged store, said so.
fn fixed_bytes<const N: usize>(column: &'static str, value: Vec<u8>) -> Result<[u8; N], StoreError> {
    let len = value.len();
    value.try_into().map_err(|_| {
        StoreError::Unreadable(
            column,
            format!("the store holds a {column} of {len} bytes where {N} belong: the store is damaged"),
        )
    })
}

/// A stored value outside the set this server knows (a damaged store, or a newer release's).
fn unknown_stored(column: &'static str, value: &str) -> StoreError {
    StoreError::Unreadable(
        column,
        format!("the store holds {column} `{value}`, which this server does not know"),
    )
}

fn device_from_row(r: &Row) -> Result<DeviceRecord, StoreError> {
    let role: String = r.try_get("role")?;
    let key: Option<Vec<u8>> = r.try_get("public_key")?;
    let id: i64 = r.try_get("id")?;
    Ok(DeviceRecord {
        id,
        name: r.try_get("name")?,
        role: role.parse().map_err(|_| unknown_stored("role", &role))?,
        // A damaged key refuses that device (it cannot authenticate); the others still list.
        public_key: key.and_then(|k| match fixed_bytes::<32>("device key", k) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::error!(device = id, error = %e, "device refused");
                None
            }
        }),
        enrolled_at_ms: r.try_get("enrolled_at_ms")?,
        revoked_at_ms: r.try_get("revoked_at_ms")?,
        acked_cursor: r.try_get::<_, i64>("acked_cursor")? as u64,
        last_sync_ms: r.try_get("last_sync_ms")?,
        wipe_requested_at_ms: r.try_get("wipe_requested_at_ms")?,
        wiped_at_ms: r.try_get("wiped_at_ms")?,
        left_out: r.try_get::<_, i64>("left_out")? as u64,
    })
}

/// Saves the document and queues its changes for the log, inside the caller's transaction.
async fn log_changes(
    tx: &mut Logging<'_>,
    patient: &PatientId,
    author: Option<i64>,
    changes: &[automerge::Change],
    summary: &mut PatientSummary,
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let derived = Derived::of(patient, summary)?;
    log_derived(tx, patient, author, changes, &derived).await
}

/// [`log_changes`] with the saved document and its index already worked out. The document and
/// its index are written now; the changes are numbered when the transaction commits
/// ([`Logging::commit`]).
async fn log_derived(
    tx: &mut Logging<'_>,
    patient: &PatientId,
    author: Option<i64>,
    changes: &[automerge::Change],
    derived: &Derived,
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    // A document without a readable listing is stored without one: devices parse it.
    let listing = derived.listing.as_ref().and_then(encode_listing);
    tx.execute(
        "UPDATE patients SET doc = $1, nhs_number = $2, district = $3, risk_flags = $4,
             review_date = $5, merged = $6, listing = $8 WHERE id = $7",
        &[
            &derived.saved,
            &derived.nhs_number,
            &derived.index.district,
            &derived.flags(),
            &derived.index.review_date,
            &derived.merged,
            &patient.as_bytes().as_slice(),
            &listing,
        ],
    )
    .await
    .map_err(|e| if is_unique_violation(&e) { StoreError::DuplicatePatient } else { StoreError::from(e) })?;
    tx.log.queue(patient, author, changes);
    Ok(())
}

/// A transaction that logs changes. Its changes are numbered as its last statement, by
/// updating the one row of `log_head`, whose lock it then holds only until it commits: numbers
/// are given in commit order, without gaps, and writers do their reading, merging and saving
/// side by side, waiting for one another only for that last statement and the commit.
///
/// The log head is the last lock such a transaction takes (documents before it, the scope
/// epoch after it, by deferred triggers at commit), and nothing waits for a document while
/// holding it, so no two writers wait on each other in a cycle through it.
struct Logging<'a> {
    tx: Tx<'a>,
    log: PendingLog,
}

/// Changes queued for the log in one transaction, in order.
#[derive(Default)]
struct PendingLog {
    patients: Vec<Vec<u8>>,
    authors: Vec<Option<i64>>,
    hashes: Vec<Vec<u8>>,
    bodies: Vec<Vec<u8>>,
    /// Each document's last change, by its place in the queue (from 1).
    last: HashMap<PatientId, i64>,
}

impl PendingLog {
    /// Queues `changes` to `patient`, to be numbered at commit.
    fn queue(&mut self, patient: &PatientId, author: Option<i64>, changes: &[automerge::Change]) {
        for change in changes {
            self.patients.push(patient.as_bytes().to_vec());
            self.authors.push(author);
            self.hashes.push(change.hash().0.to_vec());
            self.bodies.push(change.raw_bytes().to_vec());
        }
        if !changes.is_empty() {
            self.last.insert(*patient, self.patients.len() as i64);
        }
    }
}

impl<'a> std::ops::Deref for Logging<'a> {
    type Target = Tx<'a>;
    fn deref(&self) -> &Tx<'a> {
        &self.tx
    }
}

impl Logging<'_> {
    /// Numbers the queued changes, appends them to the log, records each document's last
    /// number, and commits; returns the log head after this transaction's changes (`None` if
    /// it logged none).
    async fn commit(self) -> Result<Option<i64>, StoreError> {
        let Self { tx, log } = self;
        let head = if log.patients.is_empty() {
            None
        } else {
            let n = log.patients.len() as i64;
            let (docs, lasts): (Vec<Vec<u8>>, Vec<i64>) =
                log.last.iter().map(|(id, last)| (id.as_bytes().to_vec(), *last)).unzip();
            let row = tx
                .query_one(
                    "WITH head AS (UPDATE log_head SET seq = seq + $1 WHERE id = 1 RETURNING seq - $1 AS base),
                     logged AS (
                         INSERT INTO changes (seq, patient_id, author_device, hash, body)
                         SELECT head.base + t.n, t.patient, t.author, t.hash, t.body
                         FROM head, unnest($2::BYTEA[], $3::BIGINT[], $4::BYTEA[], $5::BYTEA[])
                             WITH ORDINALITY AS t (patient, author, hash, body, n)),
                     numbered AS (
                         UPDATE patients p SET last_seq = head.base + l.n
                         FROM head, unnest($6::BYTEA[], $7::BIGINT[]) AS l (id, n) WHERE p.id = l.id)
                     SELECT base + $1 FROM head",
                    &[&n, &log.patients, &log.authors, &log.hashes, &log.bodies, &docs, &lasts],
                )
                .await?;
            Some(row.try_get::<_, i64>(0)?)
        };
        tx.commit().await?;
        Ok(head)
    }
}

/// Begins a transaction that will log changes ([`Logging`]).
async fn logging(c: &mut Client) -> Result<Logging<'_>, StoreError> {
    Ok(Logging { tx: c.transaction().await?, log: PendingLog::default() })
}

/// A stored patient's document, its row locked for the rest of the transaction.
async fn load_in(tx: &Tx<'_>, patient: &PatientId) -> Result<PatientSummary, StoreError> {
    let saved: Vec<u8> = tx
        .query_opt(
            "SELECT doc FROM patients WHERE id = $1 FOR NO KEY UPDATE",
            &[&patient.as_bytes().as_slice()],
        )
        .await?
        .ok_or(StoreError::UnknownPatient)?
        .try_get(0)?;
    PatientSummary::load(&saved).map_err(|e| StoreError::Document(short_hex(patient.as_bytes()), Box::new(e)))
}

async fn audit_in(
    tx: &Tx<'_>,
    actor: &str,
    action: &str,
    patient: Option<&PatientId>,
    detail: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO audit (at_ms, actor, action, patient_id, detail) VALUES ($1, $2, $3, $4, $5)",
        &[&now_ms, &actor, &action, &patient.map(|p| p.as_bytes().to_vec()), &detail],
    )
    .await?;
    Ok(())
}
