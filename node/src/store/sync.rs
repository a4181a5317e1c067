//! What the sync session reads and writes: the outbox, received pages, round progress.

use std::collections::HashSet;

use super::*;
use crate::summary::{EntryId, Section};

impl DeviceStore {
    /// Local changes after outbox position `after`, oldest first, up to about `max_bytes`.
    pub fn pending_changes(&self, after: u64, max_bytes: usize) -> Result<Vec<PendingChange>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT id, body FROM outbox WHERE id > ?1 ORDER BY id")?;
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

    /// The server refused some of this device's changes to `refused` documents: moves those
    /// changes, and every queued change of this device's that builds on them, from the outbox
    /// into the diverged list (sealed, kept for the clinician), and rebuilds each document
    /// without them, so the device holds the server's version and later rounds apply cleanly.
    /// Changes the server accepted stay queued for their acknowledgement. One transaction.
    /// Returns how many changes were moved.
    pub fn diverge(
        &mut self,
        refused: &[crate::protocol::RefusedDoc],
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        // The outbox is read inside the transaction: an entry recorded meanwhile on another
        // connection is either seen here or recorded after the rebuild, never lost between.
        let tx = write_tx(&mut self.conn)?;
        let queued: Vec<(i64, OutboxBody)> = {
            let mut stmt = tx.prepare_cached("SELECT id, body FROM outbox ORDER BY id")?;
            let rows: Vec<(i64, Vec<u8>)> =
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(id, body)| Ok((id, open_row(&self.key, "outbox", &id.to_be_bytes(), 0, &body)?)))
                .collect::<Result<_, StoreError>>()?
        };
        let mut moved = 0;
        for refusal in refused {
            // The refused changes and every later one of this device's that builds on them; the
            // server accepted the rest, and they stay queued for their acknowledgement.
            let mut dropped: HashSet<automerge::ChangeHash> =
                refusal.changes.iter().map(|h| automerge::ChangeHash(*h)).collect();
            let all = refusal.changes.is_empty();
            let mut moving = Vec::new();
            for (id, body) in queued.iter().filter(|(_, b)| b.patient_id == refusal.doc) {
                let change = automerge::Change::try_from(body.change.as_slice()).ok();
                let refused_here = all
                    || change.as_ref().is_none_or(|c| {
                        dropped.contains(&c.hash()) || c.deps().iter().any(|d| dropped.contains(d))
                    });
                if refused_here {
                    if let Some(c) = &change {
                        dropped.insert(c.hash());
                    }
                    moving.push((*id, body));
                }
            }
            // The server's version: every change but the refused ones and what builds on them;
            // what it lacks of the device's version is the clinician's text of the refused
            // entries. (A document no longer on the device keeps its refused changes all the same.)
            let mut entries = Vec::new();
            if let Some(mut patient) = read_patient(&tx, &self.key, &self.lookup, &refusal.doc)? {
                let mut kept = Vec::new();
                for change in patient.summary.all_changes() {
                    if dropped.contains(&change.hash()) || change.deps().iter().any(|d| dropped.contains(d)) {
                        dropped.insert(change.hash());
                    } else {
                        kept.extend_from_slice(change.raw_bytes());
                    }
                }
                let mut rebuilt = PatientSummary::load(&kept)?;
                entries = lost_entries(&mut patient.summary, &mut rebuilt);
                write_document(&tx, &self.key, &self.lookup, &mut rebuilt, patient.received_at_ms, None)?;
            }
            for (id, body) in moving {
                let diverged = DivergedBody {
                    patient_id: refusal.doc,
                    rule: refusal.rule.clone(),
                    place: refusal.place.clone(),
                    at_ms: now_ms,
                    change: body.change.clone(),
                    entries: entries.clone(),
                };
                tx.execute("INSERT INTO diverged (body) VALUES (x'')", [])?;
                let row = tx.last_insert_rowid();
                let sealed = seal_row(&self.key, "diverged", &row.to_be_bytes(), 0, &diverged)?;
                tx.execute("UPDATE diverged SET body = ?1 WHERE id = ?2", params![sealed, row])?;
                tx.execute("DELETE FROM outbox WHERE id = ?1", [id])?;
                moved += 1;
            }
        }
        tx.commit()?;
        Ok(moved)
    }

    /// This device's entries the server refused, by patient and rule (newest last).
    pub fn diverged(&self) -> Result<Vec<Diverged>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT id, body FROM diverged ORDER BY id")?;
        let rows: Vec<(i64, Vec<u8>)> =
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        let mut out: Vec<Diverged> = Vec::new();
        for (id, body) in rows {
            let body: DivergedBody = self.open_row("diverged", &id.to_be_bytes(), 0, &body)?;
            match out.last_mut() {
                Some(d)
                    if d.doc == body.patient_id
                        && d.rule == body.rule
                        && d.place == body.place
                        && d.at_ms == body.at_ms =>
                {
                    d.changes += 1
                }
                _ => out.push(Diverged {
                    doc: body.patient_id,
                    rule: body.rule,
                    place: body.place,
                    at_ms: body.at_ms,
                    changes: 1,
                    entries: body.entries,
                }),
            }
        }
        Ok(out)
    }

    /// Applies a page of a sync round in one transaction together with the round's progress
    /// (the last item applied), so a cut link or a crash leaves every document of the page and
    /// the marker that covers it applied, or none of them. Returns how many notifications
    /// (admissions, discharges, attendances…) the page produced. `on_applied` hears how many
    /// items of the page are applied so far, after each (for progress; nothing is committed yet).
    pub fn apply_items(
        &mut self,
        round: u64,
        priority: bool,
        items: &[DocItem],
        now_ms: i64,
        on_applied: &mut dyn FnMut(usize),
    ) -> Result<u64, StoreError> {
        let Some(last) = items.last() else { return Ok(0) };
        let tx = write_tx(&mut self.conn)?;
        let mut notified = 0;
        for (i, item) in items.iter().enumerate() {
            notified += apply_one(&tx, &self.key, &self.lookup, item, now_ms)?;
            on_applied(i + 1);
        }
        let mut state: SyncState = get_secret(&tx, &self.key, "sync")?.unwrap_or_default();
        state.resume = Some(Resume { round, priority, through: last.doc });
        put_secret(&tx, &self.key, "sync", &state)?;
        tx.commit()?;
        Ok(notified)
    }

    /// Completes a round: the cursor moves to `round` and the interrupted-round marker goes.
    /// `synced_at_ms` and `server_time_ms` are the device's and the server's clocks at the same
    /// moment (the lease runs from it, and their difference is the clock offset views correct
    /// by); `now_ms` is the device's wall clock as it reads now, which may have been set since.
    pub fn finish_round(
        &mut self,
        round: u64,
        server_time_ms: i64,
        synced_at_ms: i64,
        now_ms: i64,
        lease_ms: u64,
        left_out: u64,
    ) -> Result<(), StoreError> {
        let tx = write_tx(&mut self.conn)?;
        let mut state: SyncState = get_secret(&tx, &self.key, "sync")?.unwrap_or_default();
        state.cursor = round;
        state.lease_ms = Some(lease_ms);
        state.left_out = left_out;
        state.resume = None;
        state.last_sync_ms = Some(synced_at_ms);
        state.last_sync_server_ms = Some(server_time_ms);
        put_secret(&tx, &self.key, "sync", &state)?;
        // A sync re-establishes the clock against the server's: the high-water mark starts again
        // at the clock as it reads now (a clock set forward during the sync, then back, locks
        // until the next sync; one set back during the sync does not).
        put_secret(&tx, &self.key, super::audit::CLOCK_HIGH_WATER, &now_ms)?;
        tx.commit()?;
        Ok(())
    }
}

/// Whether a new document can be filed under the NHS number its listing names: the number is
/// valid and no other document is filed under it (a listing that claimed a held patient's
/// number would otherwise hide that patient's record).
fn takes_a_free_place(
    tx: &Transaction<'_>,
    lookup: &LookupHasher,
    doc: &PatientId,
    listing: &Listing,
) -> Result<bool, StoreError> {
    let Ok(nhs_key) = nhs_lookup(lookup, doc, listing) else { return Ok(false) };
    let taken =
        tx.prepare_cached("SELECT 1 FROM documents WHERE nhs_key = ?1")?.exists([nhs_key.as_slice()])?;
    Ok(!taken)
}

/// A held patient, read inside the caller's transaction.
fn read_patient(
    tx: &Transaction<'_>,
    key: &DataKey,
    lookup: &LookupHasher,
    doc: &PatientId,
) -> Result<Option<StoredPatient>, StoreError> {
    read_document(tx, key, lookup, "doc_key", &lookup.hash("doc", &doc.to_string()))
}

fn read_body(
    tx: &Transaction<'_>,
    key: &DataKey,
    doc_key: &[u8; 32],
) -> Result<Option<DocumentBody>, StoreError> {
    let row = tx
        .prepare_cached("SELECT nhs_key, version, body FROM documents WHERE doc_key = ?1")?
        .query_row([doc_key.as_slice()], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?))
        })
        .optional()?;
    row.map(|(nhs_key, version, body)| {
        open_row(key, "body", &document_row(doc_key, &nhs_key), version, &body)
    })
    .transpose()
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
            let version: Option<i64> = tx
                .prepare_cached("SELECT version FROM documents WHERE doc_key = ?1")?
                .query_row([doc_key.as_slice()], |r| r.get(0))
                .optional()?;
            if let Some(version) = version {
                tx.execute("DELETE FROM documents WHERE doc_key = ?1", [doc_key.as_slice()])?;
                adjust_rows_root(tx, key, &[row_mark(lookup, &doc_key, version)])?;
            }
        }
        DocBody::Whole { saved, listing } => match (read_body(tx, key, &doc_key)?, listing) {
            // A document this device holds, sent whole because the changes it lacked were
            // compacted away on the server: merged, and its news told as changes would be.
            (Some(existing), _) => {
                let mut summary = PatientSummary::load(&existing.automerge)?;
                let before = summary.heads();
                summary.merge_saved(saved)?;
                check_received(&mut summary, &item.doc)?;
                notified += notify(tx, key, &item.doc, &before, &mut summary, now_ms)?;
                write_document(tx, key, lookup, &mut summary, now_ms, None)?;
            }
            // A new document with its listing is stored as received, unparsed: it is checked
            // when it is opened (`read_document`), so receiving costs its bytes, whatever its
            // history.
            (None, Some(listing)) if takes_a_free_place(tx, lookup, &item.doc, listing)? => {
                let body =
                    DocumentBody { patient_id: item.doc, received_at_ms: now_ms, automerge: saved.to_vec() };
                write_row(tx, key, lookup, item.doc, listing.clone(), body)?;
            }
            // One the server has no listing for is parsed for it, and stored as saved; so is one
            // whose listing names a place another document holds (its own listing decides).
            (None, _) => {
                let mut summary = PatientSummary::load(saved)?;
                check_received(&mut summary, &item.doc)?;
                write_document(tx, key, lookup, &mut summary, now_ms, Some(saved))?;
            }
        },
        DocBody::Changes(changes) => {
            let existing = read_body(tx, key, &doc_key)?
                .ok_or_else(|| StoreError::MissingDependencies { doc: short_hex(item.doc.as_bytes()) })?;
            let mut summary = PatientSummary::load(&existing.automerge)?;
            let before = summary.heads();
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
            notified += notify(tx, key, &item.doc, &before, &mut summary, now_ms)?;
            write_document(tx, key, lookup, &mut summary, now_ms, None)?;
        }
    }
    Ok(notified)
}

/// Stores a notification for each piece of news between `before` and `after` (admissions,
/// discharges, attendances…); returns how many.
fn notify(
    tx: &Transaction<'_>,
    key: &DataKey,
    doc: &PatientId,
    before: &[automerge::ChangeHash],
    after: &mut PatientSummary,
    now_ms: i64,
) -> Result<u64, StoreError> {
    let mut notified = 0;
    for text in crate::notify::changes(before, after)? {
        let note = crate::notify::Notification { patient_id: *doc, at_ms: now_ms, text };
        tx.execute("INSERT INTO notifications (body) VALUES (x'')", [])?;
        let id = tx.last_insert_rowid();
        let sealed = seal_row(key, "notifications", &id.to_be_bytes(), 0, &note)?;
        tx.execute("UPDATE notifications SET body = ?1 WHERE id = ?2", params![sealed, id])?;
        notified += 1;
    }
    Ok(notified)
}

/// The entries' lines (`section: line`) the device's version shows and the rebuilt one does
/// not, or shows otherwise: what the refused changes recorded. Unreadable versions give none.
fn lost_entries(device: &mut PatientSummary, rebuilt: &mut PatientSummary) -> Vec<String> {
    let kept: HashSet<(Section, EntryId, String)> =
        rebuilt.entry_lines().unwrap_or_default().into_iter().collect();
    device
        .entry_lines()
        .unwrap_or_default()
        .into_iter()
        .filter(|line| !kept.contains(line))
        .map(|(section, _, line)| format!("{}: {line}", section.key()))
        .collect()
}
