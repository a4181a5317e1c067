//! The change log and device progress in SQLite.

use super::*;

/// A device's held documents changed after a number: `?1` the device, `?2` the held state, `?3`
/// the number. The device's documents first, each looked up by id (`CROSS JOIN` keeps the order;
/// see the scope queries in `governance.rs`).
pub(super) const HELD_CHANGED_SQL: &str =
    "SELECT d.patient_id FROM device_docs d CROSS JOIN patients p ON p.id = d.patient_id
     WHERE d.device_id = ?1 AND d.state = ?2 AND p.last_seq > ?3";

impl SyncLog for SqliteStore {
    fn commit_device_changes(
        &self,
        device: &DeviceRecord,
        docs: &[CheckedChanges],
    ) -> Result<UploadOutcome, UploadError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(StoreError::from)?;
        let (mut accepted, mut merged) = (0, Vec::new());
        for CheckedChanges { doc, changes, checked_at } in docs {
            let doc_id = short_hex(doc.as_bytes());
            let saved: Vec<u8> = tx
                .query_row("SELECT doc FROM patients WHERE id = ?1", [doc.as_bytes().as_slice()], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(StoreError::from)?
                .ok_or_else(|| UploadError::NotHeld(doc_id.clone()))?;
            let mut summary = PatientSummary::load(&saved)
                .map_err(|e| StoreError::Document(doc_id.clone(), Box::new(e)))?;
            let mut heads = summary.heads();
            let mut expected = checked_at.clone();
            heads.sort();
            expected.sort();
            if heads != expected {
                return Err(UploadError::Moved(doc_id));
            }
            let new: Vec<_> = changes.iter().filter(|c| !summary.has_change(&c.hash())).cloned().collect();
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
            log_changes(&tx, doc, Some(device.id), &new, &mut summary)?;
            if let Ok(Some(into)) = summary.merged_into() {
                merged.push((*doc, into));
            }
        }
        tx.commit().map_err(StoreError::from)?;
        Ok(UploadOutcome { accepted, merged })
    }

    fn max_seq(&self) -> Result<u64, StoreError> {
        Ok(self
            .read()
            .prepare_cached(
                "SELECT max(coalesce((SELECT max(seq) FROM changes), 0), (SELECT seq FROM log_horizon WHERE id = 1))",
            )?
            .query_row([], |r| r.get::<_, i64>(0))? as u64)
    }

    fn log_horizon(&self) -> Result<u64, StoreError> {
        Ok(self
            .read()
            .prepare_cached("SELECT seq FROM log_horizon WHERE id = 1")?
            .query_row([], |r| r.get::<_, i64>(0))? as u64)
    }

    fn changed_docs(&self, after: u64, upto: u64) -> Result<HashSet<PatientId>, StoreError> {
        let conn = self.read();
        let mut stmt =
            conn.prepare_cached("SELECT DISTINCT patient_id FROM changes WHERE seq > ?1 AND seq <= ?2")?;
        let rows = stmt.query_map(params![after as i64, upto as i64], |r| patient_id(r.get(0)?))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn log_entries(&self, after: u64, upto: u64, most: usize) -> Result<Option<Vec<LogEntry>>, StoreError> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, patient_id, author_device, body FROM changes WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![after as i64, upto as i64, most as i64 + 1], |r| {
            Ok(LogEntry {
                seq: r.get::<_, i64>(0)? as u64,
                doc: patient_id(r.get(1)?)?,
                author: r.get(2)?,
                change: r.get(3)?,
            })
        })?;
        let entries: Vec<LogEntry> = rows.collect::<Result<_, _>>()?;
        Ok((entries.len() <= most).then_some(entries))
    }

    fn held_changed_since(&self, device: i64, after: u64) -> Result<HashSet<PatientId>, StoreError> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(HELD_CHANGED_SQL)?;
        let rows = stmt.query_map(params![device, HELD, after as i64], |r| patient_id(r.get(0)?))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn compact_log(&self, horizon: u64) -> Result<Compacted, StoreError> {
        self.compact_in_steps(horizon, COMPACTION_STEP)
    }

    fn log_below(&self, seq: u64) -> Result<Compacted, StoreError> {
        below(&self.conn(), seq)
    }

    fn changes_for_device(&self, device: i64, after: u64, upto: u64) -> Result<ChangesByDoc, StoreError> {
        let conn = self.read();
        // A short window (the usual reconnect) is read from the change log and each change's
        // document looked up among the device's; a long one (a device back after weeks) from the
        // device's documents. `CROSS JOIN` makes SQLite keep that order.
        let sql = if upto.saturating_sub(after) <= 50_000 {
            "SELECT c.seq, c.patient_id, c.body FROM changes c
             CROSS JOIN device_docs d ON d.device_id = ?1 AND d.patient_id = c.patient_id AND d.state = 0
             WHERE c.seq > ?2 AND c.seq > d.since AND c.seq <= ?3 AND (c.author_device IS NULL OR c.author_device != ?1)
             ORDER BY c.seq"
        } else {
            "SELECT c.seq, c.patient_id, c.body FROM device_docs d
             CROSS JOIN changes c ON c.patient_id = d.patient_id AND c.seq > ?2 AND c.seq > d.since AND c.seq <= ?3
             WHERE d.device_id = ?1 AND d.state = 0 AND (c.author_device IS NULL OR c.author_device != ?1)
             ORDER BY c.seq"
        };
        let mut stmt = conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params![device, after as i64, upto as i64])?;
        let mut out = ChangesByDoc::new();
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            out.entry(patient_id(row.get(1)?)?).or_default().push((seq as u64, row.get(2)?));
        }
        Ok(out)
    }

    fn held(&self, device: i64) -> Result<HashSet<PatientId>, StoreError> {
        let conn = self.read();
        let mut stmt =
            conn.prepare_cached("SELECT patient_id FROM device_docs WHERE device_id = ?1 AND state = ?2")?;
        let rows = stmt.query_map(params![device, HELD], |r| patient_id(r.get(0)?))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn held_counts(&self) -> Result<HashMap<i64, u64>, StoreError> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT device_id, count(*) FROM device_docs WHERE state = ?1 GROUP BY device_id",
        )?;
        let rows = stmt.query_map([HELD], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn scope_epoch(&self) -> Result<u64, StoreError> {
        let conn = self.read();
        let n: i64 =
            conn.prepare_cached("SELECT n FROM scope_epoch WHERE id = 1")?.query_row([], |r| r.get(0))?;
        Ok(n as u64)
    }

    fn scope_cache(&self, device: i64) -> Result<Option<crate::store::ScopeCache>, StoreError> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT epoch, valid_until_ms, in_scope, left_out FROM device_scope_cache WHERE device_id = ?1",
        )?;
        Ok(stmt
            .query_row([device], |r| {
                Ok(crate::store::ScopeCache {
                    epoch: r.get::<_, i64>(0)? as u64,
                    valid_until_ms: r.get(1)?,
                    in_scope: r.get::<_, i64>(2)? as u64,
                    left_out: r.get::<_, i64>(3)? as u64,
                })
            })
            .optional()?)
    }

    fn begin_session(&self, device: i64) -> Result<u64, StoreError> {
        let conn = self.conn();
        let session: Option<i64> = conn
            .prepare_cached(
                "UPDATE devices SET session_epoch = session_epoch + 1 WHERE id = ?1 RETURNING session_epoch",
            )?
            .query_row([device], |r| r.get(0))
            .optional()?;
        session.map(|s| s as u64).ok_or_else(|| StoreError::UnknownDevice(device.to_string()))
    }

    fn set_scope_cache(
        &self,
        device: i64,
        session: u64,
        cache: &crate::store::ScopeCache,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        let _bookkeeping = Bookkeeping::new(&conn)?;
        let written = conn.prepare_cached(
            "INSERT INTO device_scope_cache (device_id, epoch, valid_until_ms, in_scope, left_out)
             SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?1 AND session_epoch = ?6)
             ON CONFLICT (device_id) DO UPDATE SET epoch = excluded.epoch,
                 valid_until_ms = excluded.valid_until_ms, in_scope = excluded.in_scope, left_out = excluded.left_out",
        )?
        .execute(params![
            device,
            cache.epoch as i64,
            cache.valid_until_ms,
            cache.in_scope as i64,
            cache.left_out as i64,
            session as i64
        ])?;
        if written == 0 {
            return Err(StoreError::Superseded);
        }
        Ok(())
    }

    fn pending_round(&self, device: i64) -> Result<Option<u64>, StoreError> {
        let round: Option<i64> = self
            .read()
            .prepare_cached("SELECT pending_round FROM devices WHERE id = ?1")?
            .query_row([device], |r| r.get(0))?;
        Ok(round.map(|r| r as u64))
    }

    fn record_round_page(
        &self,
        device: i64,
        session: u64,
        round: u64,
        priority: bool,
        whole: &[PatientId],
        purged: &[PatientId],
    ) -> Result<(), StoreError> {
        if whole.is_empty() && purged.is_empty() {
            return Ok(()); // changes only: the device's cursor says what it has
        }
        let conn = self.conn();
        let _bookkeeping = Bookkeeping::new(&conn)?;
        let tx = conn.unchecked_transaction()?;
        fenced(&tx, device, session)?;
        tx.prepare_cached("UPDATE devices SET pending_round = ?1 WHERE id = ?2")?
            .execute(params![round as i64, device])?;
        let sending = if priority { SENDING_FIRST } else { SENDING };
        // A document sent whole holds every change up to the round; one purged keeps what it
        // had (if the purge is not applied it stays held, and lacks what came since).
        let upsert = format!(
            "INSERT INTO device_docs (device_id, patient_id, state, since) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (device_id, patient_id) DO UPDATE SET state = excluded.state,
                 since = CASE WHEN excluded.state = {PURGING} THEN device_docs.since ELSE excluded.since END"
        );
        for (ids, state, since) in [(whole, sending, round as i64), (purged, PURGING, 0)] {
            let mut stmt = tx.prepare_cached(&upsert)?;
            for id in ids {
                stmt.execute(params![device, id.as_bytes().as_slice(), state, since])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn settle_round(
        &self,
        device: i64,
        session: u64,
        round: u64,
        outcome: RoundOutcome,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        let _bookkeeping = Bookkeeping::new(&conn)?;
        let tx = conn.unchecked_transaction()?;
        fenced(&tx, device, session)?;
        let pending: Option<i64> = tx
            .prepare_cached("SELECT pending_round FROM devices WHERE id = ?1")?
            .query_row([device], |r| r.get(0))?;
        if pending == Some(round as i64) {
            // Confirmed rows: `sending` becomes held and `purging` goes; unconfirmed rows revert.
            // The priority part comes before the rest: a device that reached the rest confirmed
            // all of it; one cut inside it confirmed none of the rest.
            let (confirmed_sql, unconfirmed_sql) = ("patient_id <= ?2", "patient_id > ?2");
            let (first_through, through): (Vec<u8>, Vec<u8>) = match outcome {
                RoundOutcome::Complete => (vec![0xff; 17], vec![0xff; 17]),
                RoundOutcome::Through { priority: true, through } => {
                    (through.as_bytes().to_vec(), Vec::new())
                }
                RoundOutcome::Through { priority: false, through } => {
                    (vec![0xff; 17], through.as_bytes().to_vec())
                }
                RoundOutcome::Nothing => (Vec::new(), Vec::new()),
            };
            tx.execute(
                &format!("UPDATE device_docs SET state = {HELD} WHERE device_id = ?1 AND state = {SENDING_FIRST} AND {confirmed_sql}"),
                params![device, first_through],
            )?;
            tx.execute(
                &format!("DELETE FROM device_docs WHERE device_id = ?1 AND state = {SENDING_FIRST} AND {unconfirmed_sql}"),
                params![device, first_through],
            )?;
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
            tx.prepare_cached("UPDATE devices SET pending_round = NULL WHERE id = ?1")?.execute([device])?;
        }
        if outcome == RoundOutcome::Complete {
            tx.prepare_cached(
                "UPDATE devices SET acked_cursor = max(acked_cursor, ?1), last_sync_ms = ?2 WHERE id = ?3",
            )?
            .execute(params![round as i64, now_ms, device])?;
        }
        tx.commit()?;
        Ok(())
    }
}

impl SqliteStore {
    /// Compacts in steps of `step` entries, each its own transaction that moves the horizon as
    /// far as it deleted: the store's connection is free between steps, so syncs and feeds wait
    /// for one step (milliseconds), not for the whole compaction, and an interrupted compaction
    /// keeps the steps it finished.
    fn compact_in_steps(&self, horizon: u64, step: i64) -> Result<Compacted, StoreError> {
        let mut dropped = Compacted::default();
        loop {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let current: i64 =
                tx.prepare_cached("SELECT seq FROM log_horizon WHERE id = 1")?.query_row([], |r| r.get(0))?;
            if horizon as i64 <= current {
                return Ok(dropped);
            }
            // The seq of the step's last entry, or the horizon if fewer remain.
            let step_end: i64 = tx
                .prepare_cached(
                    "SELECT seq FROM changes WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT 1 OFFSET ?3",
                )?
                .query_row(params![current, horizon as i64, step - 1], |r| r.get(0))
                .optional()?
                .unwrap_or(horizon as i64);
            let step = below(&tx, step_end as u64)?;
            tx.prepare_cached("DELETE FROM changes WHERE seq <= ?1")?.execute([step_end])?;
            tx.prepare_cached("UPDATE log_horizon SET seq = ?1 WHERE id = 1")?.execute([step_end])?;
            tx.commit()?;
            dropped.entries += step.entries;
            dropped.bytes += step.bytes;
        }
    }
}

/// Log entries one compaction step deletes (a few megabytes; tens of milliseconds).
const COMPACTION_STEP: i64 = 10_000;

/// The log entries at or below `seq`, and their bytes.
fn below(conn: &rusqlite::Connection, seq: u64) -> Result<Compacted, StoreError> {
    let (entries, bytes): (i64, i64) = conn
        .prepare_cached("SELECT count(*), coalesce(sum(length(body)), 0) FROM changes WHERE seq <= ?1")?
        .query_row([seq as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(Compacted { entries: entries as u64, bytes: bytes as u64 })
}

/// Refuses a write of the device's session state by a session a newer one has replaced.
fn fenced(conn: &rusqlite::Connection, device: i64, session: u64) -> Result<(), StoreError> {
    let current: Option<i64> = conn
        .prepare_cached("SELECT session_epoch FROM devices WHERE id = ?1")?
        .query_row([device], |r| r.get(0))
        .optional()?;
    match current {
        None => Err(StoreError::UnknownDevice(device.to_string())),
        Some(current) if current as u64 != session => Err(StoreError::Superseded),
        Some(_) => Ok(()),
    }
}

#[cfg(all(test, feature = "demo"))] // patients from the synthetic population
mod tests {
    use super::*;

    #[test]
    fn readers_do_not_wait_for_the_writer_and_see_what_it_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(SqliteStore::open(dir.path()).unwrap());
        let identity = store.server_identity().unwrap();
        let mut population = crate::demo::population::Population::new(3, crate::server_actor(&identity));
        let ids = store.insert_patients(&mut [population.next_patient(0).unwrap()]).unwrap();
        // The writer is busy (held, as during a long import's commit)...
        let writing = store.conn();
        // ...and a session's reads still go through, with what was committed.
        let (done, reads) = std::sync::mpsc::channel();
        let reader = store.clone();
        std::thread::spawn(move || {
            let seen = (reader.max_seq().unwrap(), reader.load_document(&ids[0]).unwrap().is_some());
            let _ = done.send(seen);
        });
        let seen = reads.recv_timeout(std::time::Duration::from_secs(10));
        drop(writing);
        let (seq, loaded) = seen.expect("reads did not wait for the writer");
        assert!(seq > 0 && loaded, "the committed patient is visible to readers");
    }

    #[test]
    fn compaction_in_steps_drops_exactly_what_is_at_or_below_the_horizon_and_keeps_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let identity = store.server_identity().unwrap();
        let mut population = crate::demo::population::Population::new(3, crate::server_actor(&identity));
        let mut patients: Vec<_> = (0..6).map(|_| population.next_patient(0).unwrap()).collect();
        store.insert_patients(&mut patients).unwrap();
        let head = store.max_seq().unwrap();
        let all = store.log_below(head).unwrap();
        assert!(all.entries >= 12, "a log to compact: {all:?}");

        // Part-way, in steps of 5: what is at or below the horizon goes, the rest stays.
        let middle = head / 2;
        let first = store.compact_in_steps(middle, 5).unwrap();
        assert_eq!(store.log_horizon().unwrap(), middle);
        assert_eq!(store.log_below(middle).unwrap().entries, 0);
        assert_eq!(
            first.entries + store.log_below(head).unwrap().entries,
            all.entries,
            "nothing above it went"
        );
        // A lower horizon drops nothing and does not move it back.
        assert_eq!(store.compact_in_steps(middle - 1, 5).unwrap(), Compacted::default());
        assert_eq!(store.log_horizon().unwrap(), middle);
        // The rest, in steps of 1: every entry gone, the head where it was.
        let rest = store.compact_in_steps(head, 1).unwrap();
        assert_eq!(first.entries + rest.entries, all.entries);
        assert_eq!(first.bytes + rest.bytes, all.bytes);
        assert_eq!(store.log_below(head).unwrap().entries, 0);
        assert_eq!(store.max_seq().unwrap(), head, "the head stays: cursors never exceed it");
        // New changes continue above it.
        let id = store.patient_ids().unwrap()[0].0;
        let mut summary = PatientSummary::load(&store.load_document(&id).unwrap().unwrap()).unwrap();
        summary.set_actor(crate::server_actor(&identity).to_bytes());
        let before = summary.heads();
        summary
            .add(&care_node::summary::Allergy::new(
                "Latex",
                care_node::summary::Provenance::new("server", "test", "gp-feed", 1),
            ))
            .unwrap();
        store.apply_server_changes(&id, &summary.changes_since(&before)).unwrap();
        assert_eq!(store.max_seq().unwrap(), head + 1);
    }
}
