//! Patient documents in PostgreSQL.

use super::*;

impl PatientRecords for PostgresStore {
    fn insert_patients(&self, summaries: &mut [PatientSummary]) -> Result<Vec<PatientId>, StoreError> {
        let documents = summaries.iter_mut().map(NewDocument::of).collect::<Result<Vec<_>, _>>()?;
        self.run(async |c| {
            let tx = logging(c).await?;
            let mut ids = Vec::with_capacity(documents.len());
            for document in &documents {
                ids.push(insert_in(&tx, document).await?);
            }
            tx.commit().await?;
            Ok(ids)
        })
    }

    fn apply_server_changes(
        &self,
        patient: &PatientId,
        changes: &[automerge::Change],
    ) -> Result<(), StoreError> {
        self.run(async |c| {
            let tx = logging(c).await?;
            apply_in(&tx, patient, changes).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn patient_by_nhs(&self, nhs: &NhsNumber) -> Result<Option<PatientId>, StoreError> {
        self.run(async |c| {
            let row = c.query_opt("SELECT id FROM patients WHERE nhs_number = $1", &[&nhs.as_str()]).await?;
            row.map(|r| patient_id(r.try_get(0)?)).transpose()
        })
    }

    fn load_document(&self, patient: &PatientId) -> Result<Option<Vec<u8>>, StoreError> {
        self.run(async |c| {
            let row = c
                .query_opt("SELECT doc FROM patients WHERE id = $1", &[&patient.as_bytes().as_slice()])
                .await?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
    }

    fn load_document_seq(&self, patient: &PatientId) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        self.run(async |c| {
            let row = c
                .query_opt(
                    "SELECT doc, last_seq FROM patients WHERE id = $1",
                    &[&patient.as_bytes().as_slice()],
                )
                .await?;
            Ok(row
                .map(|r| Ok::<_, tokio_postgres::Error>((r.try_get(0)?, r.try_get::<_, i64>(1)? as u64)))
                .transpose()?)
        })
    }

    fn document_seq(&self, patient: &PatientId) -> Result<Option<u64>, StoreError> {
        self.run(async |c| {
            let row = c
                .query_opt("SELECT last_seq FROM patients WHERE id = $1", &[&patient.as_bytes().as_slice()])
                .await?;
            Ok(row.map(|r| r.try_get::<_, i64>(0).map(|s| s as u64)).transpose()?)
        })
    }

    fn apply_server_changes_on(
        &self,
        patient: &PatientId,
        changes: &[automerge::Change],
        updated: &mut PatientSummary,
        base_seq: u64,
    ) -> Result<Option<u64>, StoreError> {
        let id = patient.as_bytes().as_slice();
        self.run(async |c| {
            let tx = logging(c).await?;
            let stored =
                tx.query_opt("SELECT last_seq FROM patients WHERE id = $1 FOR NO KEY UPDATE", &[&id]).await?;
            let stored: i64 = stored.ok_or(StoreError::UnknownPatient)?.try_get(0)?;
            let current = if stored as u64 == base_seq {
                log_changes(&tx, patient, None, changes, updated).await?;
                true
            } else {
                apply_in(&tx, patient, changes).await?;
                false
            };
            let seq: i64 =
                tx.query_one("SELECT last_seq FROM patients WHERE id = $1", &[&id]).await?.try_get(0)?;
            tx.commit().await?;
            Ok(current.then_some(seq as u64))
        })
    }

    fn load_listed(&self, patient: &PatientId) -> Result<Option<crate::store::Listed>, StoreError> {
        self.run(async |c| {
            let row = c
                .query_opt(
                    "SELECT doc, listing FROM patients WHERE id = $1",
                    &[&patient.as_bytes().as_slice()],
                )
                .await?;
            let Some(row) = row else { return Ok(None) };
            let listing: Option<Vec<u8>> = row.try_get(1)?;
            // An unreadable listing is sent as none: the device then parses the document.
            Ok(Some((row.try_get(0)?, listing.and_then(|bytes| decode_listing(&bytes)))))
        })
    }

    fn load_listed_many(
        &self,
        patients: &[PatientId],
    ) -> Result<Vec<(PatientId, crate::store::Listed)>, StoreError> {
        let ids: Vec<Vec<u8>> = patients.iter().map(|p| p.as_bytes().to_vec()).collect();
        self.run(async |c| {
            let rows = c.query("SELECT id, doc, listing FROM patients WHERE id = ANY($1)", &[&ids]).await?;
            rows.iter()
                .map(|row| {
                    let listing: Option<Vec<u8>> = row.try_get(2)?;
                    Ok((
                        patient_id(row.try_get(0)?)?,
                        (row.try_get(1)?, listing.and_then(|b| decode_listing(&b))),
                    ))
                })
                .collect()
        })
    }

    fn patient_count(&self) -> Result<u64, StoreError> {
        self.run(async |c| {
            Ok(c.query_one("SELECT count(*) FROM patients", &[]).await?.try_get::<_, i64>(0)? as u64)
        })
    }

    fn write_batch(&self, writes: &mut [BatchWrite]) -> Result<(), StoreError> {
        self.run(async |c| {
            let tx = logging(c).await?;
            for write in writes.iter_mut() {
                match write {
                    BatchWrite::NewPatient(document) => {
                        insert_in(&tx, document).await?;
                    }
                    BatchWrite::Changes(patient, changes) => apply_in(&tx, patient, changes).await?,
                    BatchWrite::Audit { actor, action, patient, detail, at_ms } => {
                        audit_in(&tx, actor, action, patient.as_ref(), detail, *at_ms).await?
                    }
                    BatchWrite::Progress(p) => {
                        tx.execute(
                            "INSERT INTO import_progress (source, fingerprint, \"offset\", line, refused)
                             VALUES ($1, $2, $3, $4, $5)
                             ON CONFLICT (source) DO UPDATE SET fingerprint = excluded.fingerprint,
                                 \"offset\" = excluded.\"offset\", line = excluded.line, refused = excluded.refused",
                            &[&p.source, &p.fingerprint, &(p.offset as i64), &(p.line as i64), &(p.refused as i64)],
                        )
                        .await?;
                    }
                }
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn import_progress(&self, source: &str) -> Result<Option<ImportProgress>, StoreError> {
        self.run(async |c| {
            let row = c
                .query_opt(
                    "SELECT source, fingerprint, \"offset\", line, refused FROM import_progress WHERE source = $1",
                    &[&source],
                )
                .await?;
            let Some(r) = row else { return Ok(None) };
            Ok(Some(ImportProgress {
                source: r.try_get(0)?,
                fingerprint: r.try_get(1)?,
                offset: r.try_get::<_, i64>(2)? as u64,
                line: r.try_get::<_, i64>(3)? as u64,
                refused: r.try_get::<_, i64>(4)? as u64,
            }))
        })
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
        self.run(async |c| {
            let tx = logging(c).await?;
            // Locked in id order, so two merges of the same pair never deadlock.
            let (first, second) = if keep < merged { (keep, merged) } else { (merged, keep) };
            let (a, b) = (load_in(&tx, first).await?, load_in(&tx, second).await?);
            let (mut kept, mut gone) = if first == keep { (a, b) } else { (b, a) };
            let merge = crate::domain::merge::merge(keep, &mut kept, merged, &mut gone, &actor, operator, now_ms)?;
            log_changes(&tx, merged, None, &merge.merged_changes, &mut gone).await?;
            log_changes(&tx, keep, None, &merge.kept_changes, &mut kept).await?;
            let (k, m) = (keep.as_bytes().as_slice(), merged.as_bytes().as_slice());
            let caseloads = tx
                .execute(
                    "INSERT INTO caseload (device_id, patient_id) SELECT device_id, $1 FROM caseload WHERE patient_id = $2
                     ON CONFLICT DO NOTHING",
                    &[&k, &m],
                )
                .await? as usize;
            tx.execute("DELETE FROM caseload WHERE patient_id = $1", &[&m]).await?;
            let detail = crate::domain::merge::audit_detail(merged, merge.entries_moved, caseloads);
            audit_in(&tx, operator, "merge-patients", Some(keep), &detail, now_ms).await?;
            tx.commit().await?;
            Ok(MergeOutcome { entries_moved: merge.entries_moved, caseloads_moved: caseloads })
        })
    }

    fn patient_ids(&self) -> Result<Vec<(PatientId, Option<String>)>, StoreError> {
        self.run(async |c| {
            let rows = c.query("SELECT id, nhs_number FROM patients ORDER BY nhs_number, id", &[]).await?;
            rows.iter().map(|r| Ok((patient_id(r.try_get(0)?)?, r.try_get(1)?))).collect()
        })
    }
}

/// Stores a new patient's document inside the caller's transaction.
async fn insert_in(tx: &Tx<'_>, document: &NewDocument) -> Result<PatientId, StoreError> {
    let id = document.patient;
    let inserted = tx
        .execute(
            "INSERT INTO patients (id, nhs_number, doc, last_seq) VALUES ($1, $2, ''::BYTEA, 0) ON CONFLICT DO NOTHING",
            &[&id.as_bytes().as_slice(), &document.nhs_number],
        )
        .await?;
    if inserted == 0 {
        return Err(StoreError::DuplicatePatient);
    }
    log_derived(tx, &id, None, &document.changes, &document.derived).await?;
    Ok(id)
}

/// Applies server-authored changes to a stored document inside the caller's transaction.
async fn apply_in(tx: &Tx<'_>, patient: &PatientId, changes: &[automerge::Change]) -> Result<(), StoreError> {
    let doc_id = short_hex(patient.as_bytes());
    let mut summary = load_in(tx, patient).await?;
    let new: Vec<_> = changes.iter().filter(|c| !summary.has_change(&c.hash())).cloned().collect();
    summary.apply_changes(new.clone()).map_err(|e| StoreError::Document(doc_id.clone(), Box::new(e)))?;
    if summary.has_missing_deps() {
        return Err(StoreError::Document(
            doc_id,
            Box::new(care_node::summary::SummaryError::Layout("changes lack their dependencies".into())),
        ));
    }
    log_changes(tx, patient, None, &new, &mut summary).await
}
