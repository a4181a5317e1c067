//! Patient documents in SQLite.

use super::*;

impl PatientRecords for SqliteStore {
    fn insert_patients(&self, summaries: &mut [PatientSummary]) -> Result<Vec<PatientId>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let ids = summaries
            .iter_mut()
            .map(|summary| insert_in(&tx, &NewDocument::of(summary)?))
            .collect::<Result<_, _>>()?;
        tx.commit()?;
        Ok(ids)
    }

    fn apply_server_changes(
        &self,
        patient: &PatientId,
        changes: &[automerge::Change],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        apply_in(&tx, patient, changes)?;
        tx.commit()?;
        Ok(())
    }

    fn write_batch(&self, writes: &mut [BatchWrite]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for write in writes.iter_mut() {
            match write {
                BatchWrite::NewPatient(document) => {
                    insert_in(&tx, document)?;
                }
                BatchWrite::Changes(patient, changes) => apply_in(&tx, patient, changes)?,
                BatchWrite::Audit { actor, action, patient, detail, at_ms } => {
                    audit_in(&tx, actor, action, patient.as_ref(), detail, *at_ms)?
                }
                BatchWrite::Progress(p) => {
                    tx.prepare_cached(
                        "INSERT INTO import_progress (source, fingerprint, offset, line, refused)
                             VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (source) DO UPDATE SET fingerprint = excluded.fingerprint,
                             offset = excluded.offset, line = excluded.line, refused = excluded.refused",
                    )?
                    .execute(params![
                        p.source,
                        p.fingerprint,
                        p.offset as i64,
                        p.line as i64,
                        p.refused as i64
                    ])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn group_commit(&self, work: &mut dyn FnMut()) -> Result<(), StoreError> {
        self.group_commit_in(work)
    }

    fn import_progress(&self, source: &str) -> Result<Option<ImportProgress>, StoreError> {
        Ok(self
            .read()
            .prepare_cached(
                "SELECT fingerprint, offset, line, refused FROM import_progress WHERE source = ?1",
            )?
            .query_row([source], |r| {
                Ok(ImportProgress {
                    source: source.to_string(),
                    fingerprint: r.get(0)?,
                    offset: r.get::<_, i64>(1)? as u64,
                    line: r.get::<_, i64>(2)? as u64,
                    refused: r.get::<_, i64>(3)? as u64,
                })
            })
            .optional()?)
    }

    fn merge_patients(
        &self,
        keep: &PatientId,
        merged: &PatientId,
        operator: &str,
        now_ms: i64,
    ) -> Result<MergeOutcome, StoreError> {
        crate::domain::merge::check_pair(keep, merged)?;
        let actor = crate::server_actor(&self.server_identity()?);
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let (mut kept, mut gone) = (load_in(&tx, keep)?, load_in(&tx, merged)?);
        let merge =
            crate::domain::merge::merge(keep, &mut kept, merged, &mut gone, &actor, operator, now_ms)?;
        log_changes(&tx, merged, None, &merge.merged_changes, &mut gone)?;
        log_changes(&tx, keep, None, &merge.kept_changes, &mut kept)?;
        let moved = merge.entries_moved;
        let caseloads = tx.prepare_cached("INSERT OR IGNORE INTO caseload (device_id, patient_id) SELECT device_id, ?1 FROM caseload WHERE patient_id = ?2")?.execute(params![keep.as_bytes().as_slice(), merged.as_bytes().as_slice()],
        )?;
        tx.prepare_cached("DELETE FROM caseload WHERE patient_id = ?1")?
            .execute([merged.as_bytes().as_slice()])?;
        audit_in(
            &tx,
            operator,
            "merge-patients",
            Some(keep),
            &crate::domain::merge::audit_detail(merged, moved, caseloads),
            now_ms,
        )?;
        tx.commit()?;
        Ok(MergeOutcome { entries_moved: moved, caseloads_moved: caseloads })
    }

    fn patient_ids(&self) -> Result<Vec<(PatientId, Option<String>)>, StoreError> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached("SELECT id, nhs_number FROM patients ORDER BY nhs_number, id")?;
        let rows = stmt.query_map([], |r| Ok((patient_id(r.get(0)?)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn patient_by_nhs(&self, nhs: &NhsNumber) -> Result<Option<PatientId>, StoreError> {
        let id: Option<Vec<u8>> = self
            .read()
            .prepare_cached("SELECT id FROM patients WHERE nhs_number = ?1")?
            .query_row([nhs.as_str()], |r| r.get(0))
            .optional()?;
        Ok(id.map(patient_id).transpose()?)
    }

    fn load_document(&self, patient: &PatientId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .read()
            .prepare_cached("SELECT doc FROM patients WHERE id = ?1")?
            .query_row([patient.as_bytes().as_slice()], |r| r.get(0))
            .optional()?)
    }

    fn load_document_seq(&self, patient: &PatientId) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        Ok(self
            .read()
            .prepare_cached("SELECT doc, last_seq FROM patients WHERE id = ?1")?
            .query_row([patient.as_bytes().as_slice()], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .optional()?)
    }

    fn document_seq(&self, patient: &PatientId) -> Result<Option<u64>, StoreError> {
        Ok(self
            .read()
            .prepare_cached("SELECT last_seq FROM patients WHERE id = ?1")?
            .query_row([patient.as_bytes().as_slice()], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|seq| seq as u64))
    }

    fn apply_server_changes_on(
        &self,
        patient: &PatientId,
        changes: &[automerge::Change],
        updated: &mut PatientSummary,
        base_seq: u64,
    ) -> Result<Option<u64>, StoreError> {
        let seq_of = |tx: &Transaction<'_>| -> Result<Option<i64>, StoreError> {
            Ok(tx
                .prepare_cached("SELECT last_seq FROM patients WHERE id = ?1")?
                .query_row([patient.as_bytes().as_slice()], |r| r.get(0))
                .optional()?)
        };
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let current = match seq_of(&tx)? {
            None => return Err(StoreError::UnknownPatient),
            Some(seq) if seq as u64 == base_seq => {
                log_changes(&tx, patient, None, changes, updated)?;
                true
            }
            Some(_) => {
                apply_in(&tx, patient, changes)?;
                false
            }
        };
        let seq = seq_of(&tx)?.ok_or(StoreError::UnknownPatient)?;
        tx.commit()?;
        Ok(current.then_some(seq as u64))
    }

    fn load_listed(&self, patient: &PatientId) -> Result<Option<crate::store::Listed>, StoreError> {
        let row: Option<(Vec<u8>, Option<Vec<u8>>)> = self
            .read()
            .prepare_cached("SELECT doc, listing FROM patients WHERE id = ?1")?
            .query_row([patient.as_bytes().as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(row.map(|(doc, listing)| {
            // An unreadable listing is sent as none: the device then parses the document.
            let listing = listing.and_then(|bytes| decode_listing(&bytes));
            (doc, listing)
        }))
    }

    fn patient_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .read()
            .prepare_cached("SELECT count(*) FROM patients")?
            .query_row([], |r| r.get::<_, i64>(0))? as u64)
    }
}

/// Stores a new patient's document inside the caller's transaction.
fn insert_in(tx: &Transaction<'_>, document: &NewDocument) -> Result<PatientId, StoreError> {
    let id = document.patient;
    let inserted = tx.prepare_cached("INSERT INTO patients (id, nhs_number, doc, last_seq) VALUES (?1, ?2, x'', 0) ON CONFLICT DO NOTHING")?.execute(params![id.as_bytes().as_slice(), document.nhs_number],
    )?;
    if inserted == 0 {
        return Err(StoreError::DuplicatePatient);
    }
    log_derived(tx, &id, None, &document.changes, &document.derived)?;
    Ok(id)
}

/// Applies server-authored changes to a stored document inside the caller's transaction.
fn apply_in(
    tx: &Transaction<'_>,
    patient: &PatientId,
    changes: &[automerge::Change],
) -> Result<(), StoreError> {
    let doc_id = short_hex(patient.as_bytes());
    let mut summary = load_in(tx, patient)?;
    let new: Vec<_> = changes.iter().filter(|c| !summary.has_change(&c.hash())).cloned().collect();
    summary.apply_changes(new.clone()).map_err(|e| StoreError::Document(doc_id.clone(), Box::new(e)))?;
    if summary.has_missing_deps() {
        return Err(StoreError::Document(
            doc_id,
            Box::new(care_node::summary::SummaryError::Layout("changes lack their dependencies".into())),
        ));
    }
    log_changes(tx, patient, None, &new, &mut summary)
}
