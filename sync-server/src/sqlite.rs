//! The embedded default store: one SQLite file in WAL mode.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use care_node::identity::{Identity, PublicKey, short_hex};
use care_node::nhs::NhsNumber;
use care_node::protocol::DocChanges;
use care_node::summary::{PatientId, PatientSummary, SCHEMA_VERSION};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::store::{
    AuditRecord, ChangesByDoc, DeviceRecord, EnrolError, MergeOutcome, Role, RoundOutcome, ServerStore,
    StoreError, UploadError, UploadOutcome,
};

const FORMAT: &str = "care-sync-server/1";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS patients (
    id BLOB PRIMARY KEY,
    nhs_number TEXT UNIQUE, -- NULL for a provisional record
    doc BLOB NOT NULL,
    last_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    patient_id BLOB NOT NULL,
    author_device INTEGER,
    hash BLOB NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_patient ON changes (patient_id, seq);
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    public_key BLOB UNIQUE,
    enrolled_at_ms INTEGER,
    revoked_at_ms INTEGER,
    acked_cursor INTEGER NOT NULL DEFAULT 0,
    last_sync_ms INTEGER,
    pending_round INTEGER
);
CREATE TABLE IF NOT EXISTS enrolment_tokens (
    secret_hash BLOB PRIMARY KEY,
    device_id INTEGER NOT NULL REFERENCES devices (id),
    expires_at_ms INTEGER NOT NULL,
    used_at_ms INTEGER
);
CREATE TABLE IF NOT EXISTS caseload (
    device_id INTEGER NOT NULL REFERENCES devices (id),
    patient_id BLOB NOT NULL REFERENCES patients (id),
    PRIMARY KEY (device_id, patient_id)
);
-- Append-only: rows are never updated or deleted.
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    patient_id BLOB,
    detail TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'the audit is append-only'); END;
-- state: 0 held (confirmed), 1 sent whole in the pending round, 2 purged in the pending round
CREATE TABLE IF NOT EXISTS device_docs (
    device_id INTEGER NOT NULL REFERENCES devices (id),
    patient_id BLOB NOT NULL,
    state INTEGER NOT NULL,
    PRIMARY KEY (device_id, patient_id)
);
";

/// Held documents.
const HELD: i64 = 0;
/// Sent whole in the pending round, not yet confirmed.
const SENDING: i64 = 1;
/// Purged in the pending round, not yet confirmed.
const PURGING: i64 = 2;

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

fn patient_id(bytes: Vec<u8>) -> rusqlite::Result<PatientId> {
    PatientId::from_slice(&bytes)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e)))
}

fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRecord> {
    let role: String = r.get("role")?;
    let key: Option<Vec<u8>> = r.get("public_key")?;
    Ok(DeviceRecord {
        id: r.get("id")?,
        name: r.get("name")?,
        role: role.parse().unwrap_or(Role::AmbulanceCrew),
        public_key: key.and_then(|k| k.try_into().ok()),
        enrolled_at_ms: r.get("enrolled_at_ms")?,
        revoked_at_ms: r.get("revoked_at_ms")?,
        acked_cursor: r.get::<_, i64>("acked_cursor")? as u64,
        last_sync_ms: r.get("last_sync_ms")?,
    })
}

impl SqliteStore {
    /// Opens (or creates) the store at `dir/server.db`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let conn = Connection::open(dir.join("server.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        let format: Option<String> = conn
            .query_row("SELECT CAST(value AS TEXT) FROM meta WHERE name = 'format'", [], |r| r.get(0))
            .optional()?;
        match format.as_deref() {
            None => {
                conn.execute("INSERT INTO meta VALUES ('format', ?1)", [FORMAT.as_bytes()])?;
            }
            Some(FORMAT) => {}
            Some(_) => return Err(StoreError::UnknownFormat),
        }
        let store = Self { conn: Mutex::new(conn) };
        store.migrate_documents()?;
        Ok(store)
    }

    /// Brings every stored document to the current schema version, once per version, as the
    /// server's own changes (which then reach devices like any other change).
    fn migrate_documents(&self) -> Result<(), StoreError> {
        let done: Option<i64> = self
            .conn()
            .query_row(
                "SELECT CAST(CAST(value AS TEXT) AS INTEGER) FROM meta WHERE name = 'doc_schema'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if done.is_some_and(|v| v as u64 >= SCHEMA_VERSION) {
            return Ok(());
        }
        let actor = crate::server_actor(&self.server_identity()?);
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let ids: Vec<PatientId> = {
            let mut stmt = tx.prepare("SELECT id FROM patients")?;
            stmt.query_map([], |r| patient_id(r.get(0)?))?.collect::<Result<_, _>>()?
        };
        let mut migrated = 0;
        for id in ids {
            let saved: Vec<u8> =
                tx.query_row("SELECT doc FROM patients WHERE id = ?1", [id.as_bytes().as_slice()], |r| {
                    r.get(0)
                })?;
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
        tx.execute(
            "INSERT INTO meta (name, value) VALUES ('doc_schema', ?1) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            [SCHEMA_VERSION.to_string().as_bytes()],
        )?;
        tx.commit()?;
        if migrated > 0 {
            tracing::info!(migrated, "patient documents migrated to schema version {SCHEMA_VERSION}");
        }
        Ok(())
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
    let mut last = None;
    for change in changes {
        tx.execute(
            "INSERT INTO changes (patient_id, author_device, hash, body) VALUES (?1, ?2, ?3, ?4)",
            params![patient.as_bytes().as_slice(), author, change.hash().0.as_slice(), change.raw_bytes()],
        )?;
        last = Some(tx.last_insert_rowid());
    }
    if let Some(seq) = last {
        let document = |e| StoreError::Document(short_hex(patient.as_bytes()), Box::new(e));
        let nhs = match summary.merged_into().map_err(document)? {
            Some(_) => None,
            None => summary.demographics().map_err(document)?.nhs_number,
        };
        tx.execute(
            "UPDATE patients SET doc = ?1, last_seq = ?2, nhs_number = ?3 WHERE id = ?4",
            params![summary.save(), seq, nhs, patient.as_bytes().as_slice()],
        )
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation) => StoreError::DuplicatePatient,
            _ => StoreError::from(e),
        })?;
    }
    Ok(())
}

fn load_in(tx: &Transaction<'_>, patient: &PatientId) -> Result<PatientSummary, StoreError> {
    let saved: Vec<u8> = tx
        .query_row("SELECT doc FROM patients WHERE id = ?1", [patient.as_bytes().as_slice()], |r| r.get(0))
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
    tx.execute(
        "INSERT INTO audit (at_ms, actor, action, patient_id, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![now_ms, actor, action, patient.map(|p| p.as_bytes().to_vec()), detail],
    )?;
    Ok(())
}

impl ServerStore for SqliteStore {
    fn server_identity(&self) -> Result<Identity, StoreError> {
        let conn = self.conn();
        let seed: Option<Vec<u8>> =
            conn.query_row("SELECT value FROM meta WHERE name = 'identity'", [], |r| r.get(0)).optional()?;
        if let Some(seed) = seed.and_then(|s| <[u8; 32]>::try_from(s).ok()) {
            return Ok(Identity::from_seed(&seed));
        }
        let identity = Identity::generate();
        conn.execute("INSERT INTO meta VALUES ('identity', ?1)", [identity.seed().as_slice()])?;
        Ok(identity)
    }

    fn create_enrolment(
        &self,
        name: &str,
        role: Role,
        secret_hash: [u8; 32],
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existing =
            tx.query_row("SELECT * FROM devices WHERE name = ?1", [name], device_from_row).optional()?;
        let device_id = match existing {
            Some(d) if d.public_key.is_some() || d.revoked_at_ms.is_some() => {
                return Err(StoreError::AlreadyEnrolled(name.to_string()));
            }
            Some(d) => {
                tx.execute("UPDATE devices SET role = ?1 WHERE id = ?2", params![role.as_str(), d.id])?;
                // A new token replaces any earlier unused one.
                tx.execute(
                    "DELETE FROM enrolment_tokens WHERE device_id = ?1 AND used_at_ms IS NULL",
                    [d.id],
                )?;
                d.id
            }
            None => {
                tx.execute("INSERT INTO devices (name, role) VALUES (?1, ?2)", params![name, role.as_str()])?;
                tx.last_insert_rowid()
            }
        };
        tx.execute(
            "INSERT INTO enrolment_tokens (secret_hash, device_id, expires_at_ms) VALUES (?1, ?2, ?3)",
            params![secret_hash.as_slice(), device_id, expires_at_ms],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn redeem_enrolment(
        &self,
        secret_hash: [u8; 32],
        key: PublicKey,
        now_ms: i64,
    ) -> Result<DeviceRecord, EnrolError> {
        let internal = |e: rusqlite::Error| {
            tracing::error!(error = %e, "enrolment failed in the store");
            EnrolError::Internal
        };
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(internal)?;
        let token = tx
            .query_row(
                "SELECT device_id, expires_at_ms, used_at_ms FROM enrolment_tokens WHERE secret_hash = ?1",
                [secret_hash.as_slice()],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<i64>>(2)?)),
            )
            .optional()
            .map_err(internal)?;
        let (device_id, expires, used) = token.ok_or(EnrolError::UnknownToken)?;
        if used.is_some() {
            return Err(EnrolError::AlreadyUsed);
        }
        if now_ms > expires {
            return Err(EnrolError::Expired);
        }
        let device = tx
            .query_row("SELECT * FROM devices WHERE id = ?1", [device_id], device_from_row)
            .map_err(internal)?;
        if device.revoked_at_ms.is_some() {
            return Err(EnrolError::Revoked);
        }
        let key_in_use: bool = tx
            .query_row("SELECT count(*) FROM devices WHERE public_key = ?1", [key.as_slice()], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(internal)?
            > 0;
        if key_in_use || device.public_key.is_some() {
            return Err(EnrolError::KeyInUse);
        }
        tx.execute(
            "UPDATE devices SET public_key = ?1, enrolled_at_ms = ?2 WHERE id = ?3",
            params![key.as_slice(), now_ms, device_id],
        )
        .map_err(internal)?;
        tx.execute(
            "UPDATE enrolment_tokens SET used_at_ms = ?1 WHERE secret_hash = ?2",
            params![now_ms, secret_hash.as_slice()],
        )
        .map_err(internal)?;
        let device = tx
            .query_row("SELECT * FROM devices WHERE id = ?1", [device_id], device_from_row)
            .map_err(internal)?;
        tx.commit().map_err(internal)?;
        Ok(device)
    }

    fn device_by_name(&self, name: &str) -> Result<Option<DeviceRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT * FROM devices WHERE name = ?1", [name], device_from_row)
            .optional()?)
    }

    fn device_by_key(&self, key: &PublicKey) -> Result<Option<DeviceRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT * FROM devices WHERE public_key = ?1", [key.as_slice()], device_from_row)
            .optional()?)
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT * FROM devices ORDER BY name")?;
        let rows = stmt.query_map([], device_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoke_device(&self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE devices SET revoked_at_ms = coalesce(revoked_at_ms, ?1) WHERE name = ?2",
            params![now_ms, name],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownDevice(name.to_string()));
        }
        Ok(())
    }

    fn insert_patients(&self, summaries: &mut [PatientSummary]) -> Result<Vec<PatientId>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut ids = Vec::with_capacity(summaries.len());
        for summary in summaries.iter_mut() {
            let id = summary.patient_id().map_err(|e| StoreError::Document("new".into(), Box::new(e)))?;
            let nhs = match summary.nhs_number() {
                Ok(nhs) => Some(nhs.as_str().to_string()),
                Err(care_node::summary::SummaryError::NoNhsNumber) => None,
                Err(e) => return Err(StoreError::Document(short_hex(id.as_bytes()), Box::new(e))),
            };
            let inserted = tx.execute(
                "INSERT INTO patients (id, nhs_number, doc, last_seq) VALUES (?1, ?2, x'', 0) ON CONFLICT DO NOTHING",
                params![id.as_bytes().as_slice(), nhs],
            )?;
            if inserted == 0 {
                return Err(StoreError::DuplicatePatient);
            }
            let changes = summary.all_changes();
            log_changes(&tx, &id, None, &changes, summary)?;
            ids.push(id);
        }
        tx.commit()?;
        Ok(ids)
    }

    fn apply_server_changes(
        &self,
        patient: &PatientId,
        changes: &[automerge::Change],
    ) -> Result<(), StoreError> {
        let doc_id = short_hex(patient.as_bytes());
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let saved: Vec<u8> = tx
            .query_row("SELECT doc FROM patients WHERE id = ?1", [patient.as_bytes().as_slice()], |r| {
                r.get(0)
            })
            .optional()?
            .ok_or(StoreError::UnknownPatient)?;
        let mut summary =
            PatientSummary::load(&saved).map_err(|e| StoreError::Document(doc_id.clone(), Box::new(e)))?;
        let new: Vec<_> = changes.iter().filter(|c| !summary.has_change(&c.hash())).cloned().collect();
        summary.apply_changes(new.clone()).map_err(|e| StoreError::Document(doc_id.clone(), Box::new(e)))?;
        if summary.has_missing_deps() {
            return Err(StoreError::Document(
                doc_id,
                Box::new(care_node::summary::SummaryError::Layout("changes lack their dependencies".into())),
            ));
        }
        log_changes(&tx, patient, None, &new, &mut summary)?;
        tx.commit()?;
        Ok(())
    }

    fn merge_patients(
        &self,
        keep: &PatientId,
        merged: &PatientId,
        operator: &str,
        now_ms: i64,
    ) -> Result<MergeOutcome, StoreError> {
        if keep == merged {
            return Err(StoreError::Merge("a record cannot be merged into itself".into()));
        }
        let actor = crate::server_actor(&self.server_identity()?);
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        fn document(id: &PatientId) -> impl Fn(care_node::summary::SummaryError) -> StoreError + '_ {
            move |e| StoreError::Document(short_hex(id.as_bytes()), Box::new(e))
        }
        let mut kept = load_in(&tx, keep)?;
        let mut gone = load_in(&tx, merged)?;
        if kept.merged_into().map_err(document(keep))?.is_some() {
            return Err(StoreError::Merge("the record to keep was itself merged away".into()));
        }
        if let Some(into) = gone.merged_into().map_err(document(merged))?
            && into != *keep
        {
            return Err(StoreError::Merge("that record was already merged into another one".into()));
        }
        let (a, b) =
            (kept.demographics().map_err(document(keep))?, gone.demographics().map_err(document(merged))?);
        if let (Some(x), Some(y)) = (&a.nhs_number, &b.nhs_number)
            && x != y
        {
            return Err(StoreError::Merge("the two records have different NHS numbers".into()));
        }
        kept.set_actor(actor.to_bytes());
        gone.set_actor(actor.to_bytes());
        let (kept_before, gone_before) = (kept.heads(), gone.heads());
        let mut provenance =
            care_node::summary::Provenance::new("server", "regional server", "server", now_ms);
        provenance.clock_offset_ms = Some(0);
        provenance.person = Some(operator.to_string());
        if gone.merged_into().map_err(document(merged))?.is_none() {
            gone.mark_merged_into(*keep, now_ms).map_err(document(merged))?;
        }
        let moved = kept.absorb(&mut gone, &provenance).map_err(document(keep))?;
        // The merged record gives its NHS number up first, so the kept one may take it.
        let changes = gone.changes_since(&gone_before);
        log_changes(&tx, merged, None, &changes, &mut gone)?;
        let changes = kept.changes_since(&kept_before);
        log_changes(&tx, keep, None, &changes, &mut kept)?;
        let caseloads = tx.execute(
            "INSERT OR IGNORE INTO caseload (device_id, patient_id) SELECT device_id, ?1 FROM caseload WHERE patient_id = ?2",
            params![keep.as_bytes().as_slice(), merged.as_bytes().as_slice()],
        )?;
        tx.execute("DELETE FROM caseload WHERE patient_id = ?1", [merged.as_bytes().as_slice()])?;
        audit_in(
            &tx,
            operator,
            "merge-patients",
            Some(keep),
            &format!(
                "merged record {} into this one; {moved} entries moved; {caseloads} caseload(s) moved",
                short_hex(merged.as_bytes())
            ),
            now_ms,
        )?;
        tx.commit()?;
        Ok(MergeOutcome { entries_moved: moved, caseloads_moved: caseloads })
    }

    fn patient_ids(&self) -> Result<Vec<(PatientId, Option<String>)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, nhs_number FROM patients ORDER BY nhs_number, id")?;
        let rows = stmt.query_map([], |r| Ok((patient_id(r.get(0)?)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn append_audit(
        &self,
        actor: &str,
        action: &str,
        patient: Option<&PatientId>,
        detail: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        audit_in(&self.conn(), actor, action, patient, detail, now_ms)
    }

    fn audit_entries(&self, patient: Option<&PatientId>) -> Result<Vec<AuditRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT seq, at_ms, actor, action, patient_id, detail FROM audit
             WHERE ?1 IS NULL OR patient_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([patient.map(|p| p.as_bytes().to_vec())], |r| {
            let patient: Option<Vec<u8>> = r.get(4)?;
            Ok(AuditRecord {
                seq: r.get(0)?,
                at_ms: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                patient: patient.map(patient_id).transpose()?,
                detail: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn patient_by_nhs(&self, nhs: &NhsNumber) -> Result<Option<PatientId>, StoreError> {
        let id: Option<Vec<u8>> = self
            .conn()
            .query_row("SELECT id FROM patients WHERE nhs_number = ?1", [nhs.as_str()], |r| r.get(0))
            .optional()?;
        Ok(id.map(patient_id).transpose()?)
    }

    fn load_document(&self, patient: &PatientId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT doc FROM patients WHERE id = ?1", [patient.as_bytes().as_slice()], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn patient_count(&self) -> Result<u64, StoreError> {
        Ok(self.conn().query_row("SELECT count(*) FROM patients", [], |r| r.get::<_, i64>(0))? as u64)
    }

    fn caseload_add(&self, device: i64, patient: &PatientId) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "INSERT INTO caseload (device_id, patient_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            params![device, patient.as_bytes().as_slice()],
        )? > 0)
    }

    fn caseload_remove(&self, device: i64, patient: &PatientId) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "DELETE FROM caseload WHERE device_id = ?1 AND patient_id = ?2",
            params![device, patient.as_bytes().as_slice()],
        )? > 0)
    }

    fn scope(&self, device: i64) -> Result<Vec<PatientId>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT patient_id FROM caseload WHERE device_id = ?1 ORDER BY patient_id")?;
        let rows = stmt.query_map([device], |r| patient_id(r.get(0)?))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn apply_device_changes(
        &self,
        device: &DeviceRecord,
        docs: &[DocChanges],
    ) -> Result<UploadOutcome, UploadError> {
        let actor = device.public_key.ok_or_else(|| StoreError::UnknownDevice(device.name.clone()))?;
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(StoreError::from)?;
        let (mut accepted, mut merged) = (0, Vec::new());
        for doc in docs {
            let doc_id = short_hex(doc.doc.as_bytes());
            let held: bool = tx
                .query_row(
                    "SELECT count(*) FROM device_docs WHERE device_id = ?1 AND patient_id = ?2 AND state IN (0, 2)",
                    params![device.id, doc.doc.as_bytes().as_slice()],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(StoreError::from)?
                > 0;
            if !held {
                return Err(UploadError::NotHeld(doc_id));
            }
            let mut changes = Vec::with_capacity(doc.changes.len());
            for bytes in &doc.changes {
                let change = automerge::Change::try_from(bytes.as_slice())
                    .map_err(|e| UploadError::Malformed(doc_id.clone(), e.to_string()))?;
                if change.actor_id().to_bytes() != actor.as_slice() {
                    return Err(UploadError::ForeignActor(doc_id));
                }
                if care_node::summary::change_deletes(&change) {
                    return Err(UploadError::Deletes(doc_id));
                }
                changes.push(change);
            }
            let saved: Vec<u8> = tx
                .query_row("SELECT doc FROM patients WHERE id = ?1", [doc.doc.as_bytes().as_slice()], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(StoreError::from)?
                .ok_or_else(|| UploadError::NotHeld(doc_id.clone()))?;
            let mut summary = PatientSummary::load(&saved)
                .map_err(|e| StoreError::Document(doc_id.clone(), Box::new(e)))?;
            let new: Vec<_> = changes.into_iter().filter(|c| !summary.has_change(&c.hash())).collect();
            if new.is_empty() {
                continue;
            }
            summary
                .apply_changes(new.clone())
                .map_err(|e| UploadError::Malformed(doc_id.clone(), e.to_string()))?;
            if summary.has_missing_deps() {
                return Err(UploadError::MissingDependencies(doc_id));
            }
            accepted += new.len();
            log_changes(&tx, &doc.doc, Some(device.id), &new, &mut summary)?;
            if let Ok(Some(into)) = summary.merged_into() {
                merged.push((doc.doc, into));
            }
        }
        tx.commit().map_err(StoreError::from)?;
        Ok(UploadOutcome { accepted, merged })
    }

    fn max_seq(&self) -> Result<u64, StoreError> {
        Ok(self.conn().query_row("SELECT coalesce(max(seq), 0) FROM changes", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    fn changes_for_device(&self, device: i64, after: u64, upto: u64) -> Result<ChangesByDoc, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT c.seq, c.patient_id, c.body FROM device_docs d
             JOIN changes c ON c.patient_id = d.patient_id AND c.seq > ?2 AND c.seq <= ?3
             WHERE d.device_id = ?1 AND d.state = 0 AND (c.author_device IS NULL OR c.author_device != ?1)
             ORDER BY c.seq",
        )?;
        let mut rows = stmt.query(params![device, after as i64, upto as i64])?;
        let mut out = ChangesByDoc::new();
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            out.entry(patient_id(row.get(1)?)?).or_default().push((seq as u64, row.get(2)?));
        }
        Ok(out)
    }

    fn held(&self, device: i64) -> Result<HashSet<PatientId>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT patient_id FROM device_docs WHERE device_id = ?1 AND state = ?2")?;
        let rows = stmt.query_map(params![device, HELD], |r| patient_id(r.get(0)?))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn pending_round(&self, device: i64) -> Result<Option<u64>, StoreError> {
        let round: Option<i64> =
            self.conn()
                .query_row("SELECT pending_round FROM devices WHERE id = ?1", [device], |r| r.get(0))?;
        Ok(round.map(|r| r as u64))
    }

    fn record_round_page(
        &self,
        device: i64,
        round: u64,
        whole: &[PatientId],
        purged: &[PatientId],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("UPDATE devices SET pending_round = ?1 WHERE id = ?2", params![round as i64, device])?;
        for (ids, state) in [(whole, SENDING), (purged, PURGING)] {
            let mut stmt = tx.prepare(
                "INSERT INTO device_docs (device_id, patient_id, state) VALUES (?1, ?2, ?3)
                 ON CONFLICT (device_id, patient_id) DO UPDATE SET state = excluded.state",
            )?;
            for id in ids {
                stmt.execute(params![device, id.as_bytes().as_slice(), state])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn settle_round(
        &self,
        device: i64,
        round: u64,
        outcome: RoundOutcome,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let pending: Option<i64> =
            tx.query_row("SELECT pending_round FROM devices WHERE id = ?1", [device], |r| r.get(0))?;
        if pending == Some(round as i64) {
            // Confirmed rows: `sending` becomes held and `purging` goes; unconfirmed rows revert.
            let (confirmed_sql, unconfirmed_sql) = ("patient_id <= ?2", "patient_id > ?2");
            let through: Vec<u8> = match outcome {
                RoundOutcome::Complete => vec![0xff; 17],
                RoundOutcome::Through(p) => p.as_bytes().to_vec(),
                RoundOutcome::Nothing => Vec::new(),
            };
            tx.execute(
                &format!("UPDATE device_docs SET state = {HELD} WHERE device_id = ?1 AND state = {SENDING} AND {confirmed_sql}"),
                params![device, through],
            )?;
            tx.execute(
                &format!(
                    "DELETE FROM device_docs WHERE device_id = ?1 AND state = {PURGING} AND {confirmed_sql}"
                ),
                params![device, through],
            )?;
            tx.execute(
                &format!(
                    "DELETE FROM device_docs WHERE device_id = ?1 AND state = {SENDING} AND {unconfirmed_sql}"
                ),
                params![device, through],
            )?;
            tx.execute(
                &format!("UPDATE device_docs SET state = {HELD} WHERE device_id = ?1 AND state = {PURGING} AND {unconfirmed_sql}"),
                params![device, through],
            )?;
            tx.execute("UPDATE devices SET pending_round = NULL WHERE id = ?1", [device])?;
        }
        if outcome == RoundOutcome::Complete {
            tx.execute(
                "UPDATE devices SET acked_cursor = max(acked_cursor, ?1), last_sync_ms = ?2 WHERE id = ?3",
                params![round as i64, now_ms, device],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}
