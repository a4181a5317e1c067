//! The change log and device progress in PostgreSQL.

use super::*;

/// Log entries one compaction step deletes.
const COMPACTION_STEP: i64 = 10_000;

/// Round bookkeeping is committed without waiting for the disk (as on SQLite: lost in a crash,
/// it only makes the server send some documents again).
const BOOKKEEPING: &str = "SET LOCAL synchronous_commit = off";

async fn below(c: &impl tokio_postgres::GenericClient, seq: u64) -> Result<Compacted, StoreError> {
    let row = c
        .query_one(
            "SELECT count(*), coalesce(sum(octet_length(body)), 0)::BIGINT FROM changes WHERE seq <= $1",
            &[&(seq as i64)],
        )
        .await?;
    Ok(Compacted { entries: row.try_get::<_, i64>(0)? as u64, bytes: row.try_get::<_, i64>(1)? as u64 })
}

impl SyncLog for PostgresStore {
    fn commit_device_changes(
        &self,
        device: &DeviceRecord,
        docs: &[CheckedChanges],
    ) -> Result<UploadOutcome, UploadError> {
        self.run_tx(async |c| {
            let mut tx = logging(c).await?;
            // Every document of the upload is read and locked in one statement, in id order (as
            // every writer locks several documents), so two uploads never wait on each other.
            let ids: Vec<&[u8]> = docs.iter().map(|d| d.doc.as_bytes().as_slice()).collect();
            let mut locked: HashMap<PatientId, Vec<u8>> = tx
                .query(
                    "SELECT id, doc FROM patients WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
                    &[&ids],
                )
                .await
                .map_err(StoreError::from)?
                .iter()
                .map(|r| Ok((patient_id(r.try_get(0)?)?, r.try_get(1)?)))
                .collect::<Result<_, StoreError>>()?;
            let (mut accepted, mut merged) = (0, Vec::new());
            for CheckedChanges { doc, changes, checked_at } in docs {
                let doc_id = short_hex(doc.as_bytes());
                let saved: Vec<u8> = match locked.remove(doc) {
                    Some(saved) => saved,
                    // Named twice in one upload: read again, as the first one left it.
                    None => tx
                        .query_opt(
                            "SELECT doc FROM patients WHERE id = $1 FOR NO KEY UPDATE",
                            &[&doc.as_bytes().as_slice()],
                        )
                        .await
                        .map_err(StoreError::from)?
                        .ok_or_else(|| UploadError::NotHeld(doc_id.clone()))?
                        .try_get(0)
                        .map_err(StoreError::from)?,
                };
                let mut summary = PatientSummary::load(&saved)
                    .map_err(|e| StoreError::Document(doc_id.clone(), Box::new(e)))?;
                let mut heads = summary.heads();
                let mut expected = checked_at.clone();
                heads.sort();
                expected.sort();
                if heads != expected {
                    return Err(UploadError::Moved(doc_id));
                }
                let new: Vec<_> =
                    changes.iter().filter(|c| !summary.has_change(&c.hash())).cloned().collect();
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
                log_changes(&mut tx, doc, Some(device.id), &new, &mut summary).await?;
                if let Ok(Some(into)) = summary.merged_into() {
                    merged.push((*doc, into));
                }
            }
            tx.commit().await?;
            Ok(UploadOutcome { accepted, merged })
        })
    }

    fn max_seq(&self) -> Result<u64, StoreError> {
        self.run(async |c| {
            // The log head is the last number given to a committed change (a writer's own
            // update of it is invisible until it commits).
            let row = c
                .query_one(
                    "SELECT GREATEST((SELECT seq FROM log_head WHERE id = 1), (SELECT seq FROM log_horizon WHERE id = 1))",
                    &[],
                )
                .await?;
            Ok(row.try_get::<_, i64>(0)? as u64)
        })
    }

    fn log_horizon(&self) -> Result<u64, StoreError> {
        self.run(async |c| {
            Ok(c.query_one("SELECT seq FROM log_horizon WHERE id = 1", &[]).await?.try_get::<_, i64>(0)?
                as u64)
        })
    }

    fn held_changed_since(&self, device: i64, after: u64) -> Result<HashSet<PatientId>, StoreError> {
        self.run(async |c| {
            let rows = c
                .query(
                    "SELECT d.patient_id FROM device_docs d JOIN patients p ON p.id = d.patient_id
                     WHERE d.device_id = $1 AND d.state = $2 AND p.last_seq > $3",
                    &[&device, &HELD, &(after as i64)],
                )
                .await?;
            patient_ids(&rows)
        })
    }

    fn compact_log(&self, horizon: u64) -> Result<Compacted, StoreError> {
        // In steps, each its own transaction that moves the horizon as far as it deleted: an
        // interrupted compaction keeps the steps it finished.
        let mut dropped = Compacted::default();
        loop {
            let step: Option<Compacted> = self.run::<_, StoreError>(async |c| {
                let tx = c.transaction().await?;
                let current: i64 = tx
                    .query_one("SELECT seq FROM log_horizon WHERE id = 1 FOR UPDATE", &[])
                    .await?
                    .try_get(0)?;
                if horizon as i64 <= current {
                    return Ok(None);
                }
                let step_end: i64 = tx
                    .query_opt(
                        "SELECT seq FROM changes WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT 1 OFFSET $3",
                        &[&current, &(horizon as i64), &(COMPACTION_STEP - 1)],
                    )
                    .await?
                    .map(|r| r.try_get(0))
                    .transpose()?
                    .unwrap_or(horizon as i64);
                let step = below(&*tx, step_end as u64).await?;
                tx.execute("DELETE FROM changes WHERE seq <= $1", &[&step_end]).await?;
                tx.execute("UPDATE log_horizon SET seq = $1 WHERE id = 1", &[&step_end]).await?;
                tx.commit().await?;
                Ok(Some(step))
            })?;
            match step {
                Some(step) => {
                    dropped.entries += step.entries;
                    dropped.bytes += step.bytes;
                }
                None => return Ok(dropped),
            }
        }
    }

    fn log_below(&self, seq: u64) -> Result<Compacted, StoreError> {
        self.run(async |c| below(&***c, seq).await)
    }

    fn changes_for_device(&self, device: i64, after: u64, upto: u64) -> Result<ChangesByDoc, StoreError> {
        self.run(async |c| {
            let rows = c
                .query(
                    "SELECT c.seq, c.patient_id, c.body FROM changes c
                     JOIN device_docs d ON d.device_id = $1 AND d.patient_id = c.patient_id AND d.state = 0
                     WHERE c.seq > $2 AND c.seq > d.since AND c.seq <= $3
                       AND (c.author_device IS NULL OR c.author_device <> $1)
                     ORDER BY c.seq",
                    &[&device, &(after as i64), &(upto as i64)],
                )
                .await?;
            let mut out = ChangesByDoc::new();
            for r in rows {
                let seq: i64 = r.try_get(0)?;
                out.entry(patient_id(r.try_get(1)?)?).or_default().push((seq as u64, r.try_get(2)?));
            }
            Ok(out)
        })
    }

    fn changed_docs(&self, after: u64, upto: u64) -> Result<HashSet<PatientId>, StoreError> {
        self.run(async |c| {
            let rows = c
                .query(
                    "SELECT DISTINCT patient_id FROM changes WHERE seq > $1 AND seq <= $2",
                    &[&(after as i64), &(upto as i64)],
                )
                .await?;
            patient_ids(&rows)
        })
    }

    fn log_entries(&self, after: u64, upto: u64, most: usize) -> Result<Option<Vec<LogEntry>>, StoreError> {
        self.run(async |c| {
            let rows = c
                .query(
                    "SELECT seq, patient_id, author_device, body FROM changes WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
                    &[&(after as i64), &(upto as i64), &(most as i64 + 1)],
                )
                .await?;
            if rows.len() > most {
                return Ok(None);
            }
            let entry = |r: &Row| -> Result<LogEntry, StoreError> {
                Ok(LogEntry {
                    seq: r.try_get::<_, i64>(0)? as u64,
                    doc: patient_id(r.try_get(1)?)?,
                    author: r.try_get(2)?,
                    change: r.try_get(3)?,
                })
            };
            Ok(Some(rows.iter().map(entry).collect::<Result<_, _>>()?))
        })
    }

    fn held(&self, device: i64) -> Result<HashSet<PatientId>, StoreError> {
        self.run(async |c| {
            let rows = c
                .query(
                    "SELECT patient_id FROM device_docs WHERE device_id = $1 AND state = $2",
                    &[&device, &HELD],
                )
                .await?;
            patient_ids(&rows)
        })
    }

    fn held_counts(&self) -> Result<HashMap<i64, u64>, StoreError> {
        self.run(async |c| {
            let rows = c
                .query(
                    "SELECT device_id, count(*) FROM device_docs WHERE state = $1 GROUP BY device_id",
                    &[&HELD],
                )
                .await?;
            rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)? as u64))).collect()
        })
    }

    fn pending_round(&self, device: i64) -> Result<Option<u64>, StoreError> {
        self.run(async |c| {
            let row = c.query_opt("SELECT pending_round FROM devices WHERE id = $1", &[&device]).await?;
            let round: Option<i64> =
                row.ok_or_else(|| StoreError::UnknownDevice(device.to_string()))?.try_get(0)?;
            Ok(round.map(|r| r as u64))
        })
    }

    fn scope_epoch(&self) -> Result<u64, StoreError> {
        self.run(async |c| {
            Ok(c.query_one("SELECT n FROM scope_epoch WHERE id = 1", &[]).await?.try_get::<_, i64>(0)? as u64)
        })
    }

    fn scope_cache(&self, device: i64) -> Result<Option<crate::store::ScopeCache>, StoreError> {
        self.run(async |c| {
            let row = c
                .query_opt(
                    "SELECT epoch, valid_until_ms, in_scope, left_out FROM device_scope_cache WHERE device_id = $1",
                    &[&device],
                )
                .await?;
            let Some(r) = row else { return Ok(None) };
            Ok(Some(crate::store::ScopeCache {
                epoch: r.try_get::<_, i64>(0)? as u64,
                valid_until_ms: r.try_get(1)?,
                in_scope: r.try_get::<_, i64>(2)? as u64,
                left_out: r.try_get::<_, i64>(3)? as u64,
            }))
        })
    }

    fn begin_session(&self, device: i64) -> Result<u64, StoreError> {
        self.run(async |c| {
            let row = c
                .query_opt(
                    "UPDATE devices SET session_epoch = session_epoch + 1 WHERE id = $1 RETURNING session_epoch",
                    &[&device],
                )
                .await?
                .ok_or_else(|| StoreError::UnknownDevice(device.to_string()))?;
            Ok(row.try_get::<_, i64>(0)? as u64)
        })
    }

    fn set_scope_cache(
        &self,
        device: i64,
        session: u64,
        cache: &crate::store::ScopeCache,
    ) -> Result<(), StoreError> {
        self.run(async |c| {
            let tx = c.transaction().await?;
            tx.batch_execute(BOOKKEEPING).await?;
            fenced(&tx, device, session).await?;
            tx.execute(
                "INSERT INTO device_scope_cache (device_id, epoch, valid_until_ms, in_scope, left_out)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (device_id) DO UPDATE SET epoch = excluded.epoch,
                     valid_until_ms = excluded.valid_until_ms, in_scope = excluded.in_scope, left_out = excluded.left_out",
                &[&device, &(cache.epoch as i64), &cache.valid_until_ms, &(cache.in_scope as i64), &(cache.left_out as i64)],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
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
        let sending = if priority { SENDING_FIRST } else { SENDING };
        self.run(async |c| {
            let tx = c.transaction().await?;
            tx.batch_execute(BOOKKEEPING).await?;
            fenced(&tx, device, session).await?;
            tx.execute("UPDATE devices SET pending_round = $1 WHERE id = $2", &[&(round as i64), &device]).await?;
            // A document sent whole holds every change up to the round; one purged keeps what
            // it had (if the purge is not applied it stays held, and lacks what came since).
            for (ids, state, since) in [(whole, sending, round as i64), (purged, PURGING, 0)] {
                if ids.is_empty() {
                    continue;
                }
                let ids: Vec<Vec<u8>> = ids.iter().map(|id| id.as_bytes().to_vec()).collect();
                tx.execute(
                    &format!(
                        "INSERT INTO device_docs (device_id, patient_id, state, since)
                         SELECT $1, id, $3, $4 FROM unnest($2::BYTEA[]) AS t (id)
                         ON CONFLICT (device_id, patient_id) DO UPDATE SET state = excluded.state,
                             since = CASE WHEN excluded.state = {PURGING} THEN device_docs.since ELSE excluded.since END"
                    ),
                    &[&device, &ids, &state, &since],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn settle_round(
        &self,
        device: i64,
        session: u64,
        round: u64,
        outcome: RoundOutcome,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.run(async |c| {
            if outcome == RoundOutcome::Complete {
                // The usual end of a round of changes only (no page recorded it as pending):
                // one round trip. The values are this server's own numbers, not input.
                let sql = format!(
                    "BEGIN; {BOOKKEEPING};
                     UPDATE devices SET acked_cursor = GREATEST(acked_cursor, {round}), last_sync_ms = {now_ms}
                      WHERE id = {device} AND session_epoch = {session} AND pending_round IS DISTINCT FROM {round};
                     COMMIT"
                );
                let done = match c.simple_query(&sql).await {
                    Ok(done) => done,
                    Err(e) => {
                        // A statement failed: the rest of the string was skipped, so the
                        // transaction is still open; end it before the connection is reused.
                        let _ = c.batch_execute("ROLLBACK").await;
                        return Err(e.into());
                    }
                };
                if done.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(1))) {
                    return Ok(());
                }
                // Superseded, pending, or no such device: the full path below says which.
            }
            let tx = c.transaction().await?;
            tx.batch_execute(BOOKKEEPING).await?;
            fenced(&tx, device, session).await?;
            let pending: Option<i64> = tx
                .query_opt("SELECT pending_round FROM devices WHERE id = $1 FOR NO KEY UPDATE", &[&device])
                .await?
                .ok_or_else(|| StoreError::UnknownDevice(device.to_string()))?
                .try_get(0)?;
            if pending == Some(round as i64) {
                // Confirmed rows: `sending` becomes held and `purging` goes; unconfirmed rows
                // revert. The priority part comes before the rest: a device that reached the
                // rest confirmed all of it; one cut inside it confirmed none of the rest.
                let (first_through, through): (Vec<u8>, Vec<u8>) = match outcome {
                    RoundOutcome::Complete => (vec![0xff; 17], vec![0xff; 17]),
                    RoundOutcome::Through { priority: true, through } => (through.as_bytes().to_vec(), Vec::new()),
                    RoundOutcome::Through { priority: false, through } => (vec![0xff; 17], through.as_bytes().to_vec()),
                    RoundOutcome::Nothing => (Vec::new(), Vec::new()),
                };
                let steps: [(String, &Vec<u8>); 6] = [
                    (format!("UPDATE device_docs SET state = {HELD} WHERE device_id = $1 AND state = {SENDING_FIRST} AND patient_id <= $2"), &first_through),
                    (format!("DELETE FROM device_docs WHERE device_id = $1 AND state = {SENDING_FIRST} AND patient_id > $2"), &first_through),
                    (format!("UPDATE device_docs SET state = {HELD} WHERE device_id = $1 AND state = {SENDING} AND patient_id <= $2"), &through),
                    (format!("DELETE FROM device_docs WHERE device_id = $1 AND state = {PURGING} AND patient_id <= $2"), &through),
                    (format!("DELETE FROM device_docs WHERE device_id = $1 AND state = {SENDING} AND patient_id > $2"), &through),
                    (format!("UPDATE device_docs SET state = {HELD} WHERE device_id = $1 AND state = {PURGING} AND patient_id > $2"), &through),
                ];
                for (sql, bound) in &steps {
                    tx.execute(sql.as_str(), &[&device, &bound.as_slice()]).await?;
                }
                tx.execute("UPDATE devices SET pending_round = NULL WHERE id = $1", &[&device]).await?;
            }
            if outcome == RoundOutcome::Complete {
                tx.execute(
                    "UPDATE devices SET acked_cursor = GREATEST(acked_cursor, $1), last_sync_ms = $2 WHERE id = $3",
                    &[&(round as i64), &now_ms, &device],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }
}

/// Refuses a write of the device's session state by a session a newer one has replaced; the
/// device's row stays locked to the end of the transaction, so a newer session begins after it
/// or is seen by it.
async fn fenced(tx: &Tx<'_>, device: i64, session: u64) -> Result<(), StoreError> {
    let row = tx
        .query_opt("SELECT session_epoch FROM devices WHERE id = $1 FOR NO KEY UPDATE", &[&device])
        .await?
        .ok_or_else(|| StoreError::UnknownDevice(device.to_string()))?;
    if row.try_get::<_, i64>(0)? as u64 != session {
        return Err(StoreError::Superseded);
    }
    Ok(())
}
