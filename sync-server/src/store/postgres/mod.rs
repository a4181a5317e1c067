//! The PostgreSQL store: several server instances over one database (docs/storage.md).
//!
//! One file per part of the store, as for SQLite: [`devices`], [`patients`], [`governance`],
//! [`sync`]. The store traits are synchronous (the server calls them on blocking threads), so
//! the store runs its own small tokio runtime for `tokio-postgres` and a `deadpool-postgres`
//! pool, and each call blocks on it.
//!
//! What makes several writers safe:
//! - **The change log is numbered in commit order.** A writer takes its sequence numbers by
//!   updating the one row of `log_head`, and holds that row's lock until it commits, so a
//!   reader that sees number n sees every number below it (no skipped sequences: a cursor can
//!   never move past a change that commits later).
//! - **Documents are read for update.** Every read-modify-write of a patient's document locks
//!   its row (`FOR NO KEY UPDATE`, which foreign-key checks do not wait for) in the writing
//!   transaction, so two instances merging changes into one document never lose one another's.
//! - **One lock order.** A transaction that logs changes takes the log head first, then
//!   documents, then (by trigger) the scope epoch; so no two writers wait on each other in a
//!   cycle, at the cost of committing such writers one after another.
//! - **Once-only actions are conditional writes** (an enrolment token's redemption, a review,
//!   an acknowledgement) under a row lock, as the store suite checks through two instances.

mod devices;
mod governance;
mod migrations;
mod patients;
pub mod scratch;
mod sync;

use std::collections::{HashMap, HashSet};

use care_node::identity::{Identity, PublicKey, short_hex};
use care_node::nhs::NhsNumber;
use care_node::summary::{PatientId, PatientSummary};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;

use crate::store::prelude::*;
use crate::store::{
    AlertRecord, AuditFilter, AuditRecord, BatchWrite, ChangesByDoc, CheckedChanges, Compacted, ConsentFlags,
    Derived, DeviceRecord, EnrolError, Grant, GrantKind, ImportProgress, MergeOutcome, NewDocument,
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
        Self::Backend(Box::new(e))
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
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Backend(format!("the store URL: {e}").into()))?;
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
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
        );
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
            let tx = logging(c).await?;
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
                .query("SELECT id FROM patients", &[])
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
                    log_changes(&tx, &id, None, &changes, &mut summary).await?;
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

/// Appends changes to the log and saves the document, inside the caller's transaction.
async fn log_changes(
    tx: &Tx<'_>,
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

/// [`log_changes`] with the saved document and its index already worked out. Takes the
/// changes' sequence numbers from the log head, whose lock the transaction then holds until it
/// commits (numbers in commit order, no gaps).
async fn log_derived(
    tx: &Tx<'_>,
    patient: &PatientId,
    author: Option<i64>,
    changes: &[automerge::Change],
    derived: &Derived,
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let n = changes.len() as i64;
    let head: i64 = tx
        .query_one("UPDATE log_head SET seq = seq + $1 WHERE id = 1 RETURNING seq", &[&n])
        .await?
        .try_get(0)?;
    let (seqs, hashes, bodies): (Vec<i64>, Vec<Vec<u8>>, Vec<Vec<u8>>) = changes
        .iter()
        .enumerate()
        .map(|(i, c)| (head - n + 1 + i as i64, c.hash().0.to_vec(), c.raw_bytes().to_vec()))
        .fold((Vec::new(), Vec::new(), Vec::new()), |(mut s, mut h, mut b), (seq, hash, body)| {
            s.push(seq);
            h.push(hash);
            b.push(body);
            (s, h, b)
        });
    tx.execute(
        "INSERT INTO changes (seq, patient_id, author_device, hash, body)
         SELECT seq, $2, $3, hash, body FROM unnest($1::BIGINT[], $4::BYTEA[], $5::BYTEA[]) AS t (seq, hash, body)",
        &[&seqs, &patient.as_bytes().as_slice(), &author, &hashes, &bodies],
    )
    .await?;
    // A document without a readable listing is stored without one: devices parse it.
    let listing = derived.listing.as_ref().and_then(encode_listing);
    tx.execute(
        "UPDATE patients SET doc = $1, last_seq = $2, nhs_number = $3, district = $4, risk_flags = $5,
             review_date = $6, merged = $7, listing = $9 WHERE id = $8",
        &[
            &derived.saved,
            &head,
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
    Ok(())
}

/// Begins a transaction that will log changes. It takes the log head first, so that every
/// writer locks in one order (the log head, then documents, then the scope epoch by trigger)
/// and none waits on another in a cycle. Writers that log changes therefore commit one after
/// another (docs/storage.md).
async fn logging(c: &mut Client) -> Result<Tx<'_>, StoreError> {
    let tx = c.transaction().await?;
    tx.execute("SELECT 1 FROM log_head WHERE id = 1 FOR UPDATE", &[]).await?;
    Ok(tx)
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
