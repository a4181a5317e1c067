//! Patient documents in PostgreSQL.

use super::*;

impl PatientRecords for PostgresStore {
    fn insert_patients(&self, summaries: &mut [PatientSummary]) -> Result<Vec<PatientId>, StoreError> {
        let documents = summaries.iter_mut().map(NewDocument::of).collect::<Result<Vec<_>, _>>()?;
        self.run_tx(async |c| {
            let mut tx = logging(c).await?;
            let ids = insert_many(&mut tx, &documents).await?;
            tx.commit().await?;
            Ok(ids)
        })
    }

    fn apply_server_changes(
        &self,
        patient: &PatientId,
        changes: &[automerge::Change],
    ) -> Result<(), StoreError> {
        self.run_tx(async |c| {
            let mut tx = logging(c).await?;
            apply_in(&mut tx, patient, changes).await?;
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
            let mut tx = logging(c).await?;
            let stored =
                tx.query_opt("SELECT last_seq FROM patients WHERE id = $1 FOR NO KEY UPDATE", &[&id]).await?;
            let stored: i64 = stored.ok_or(StoreError::UnknownPatient)?.try_get(0)?;
            let current = if stored as u64 == base_seq {
                log_changes(&mut tx, patient, None, changes, updated).await?;
                true
            } else {
                apply_in(&mut tx, patient, changes).await?;
                false
            };
            // The transaction logged this document's changes only: its last number is the head.
            let seq = tx.commit().await?.unwrap_or(stored);
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
        self.run_tx(async |c| {
            let mut tx = logging(c).await?;
            // The stored documents the batch changes are locked first, in id order, as every
            // writer locks several documents.
            let changed: Vec<&[u8]> = writes
                .iter()
                .filter_map(|w| match w {
                    BatchWrite::Changes(patient, _) => Some(patient.as_bytes().as_slice()),
                    _ => None,
                })
                .collect();
            if !changed.is_empty() {
                tx.execute(
                    "SELECT 1 FROM patients WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
                    &[&changed],
                )
                .await?;
            }
            for write in writes.iter() {
                match write {
                    BatchWrite::NewPatient(document) => {
                        insert_in(&mut tx, document).await?;
                    }
                    BatchWrite::Changes(patient, changes) => apply_in(&mut tx, patient, changes).await?,
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
        self.run_tx(async |c| {
            let mut tx = logging(c).await?;
            // Locked in id order, so two merges of the same pair never deadlock.
            let (first, second) = if keep < merged { (keep, merged) } else { (merged, keep) };
            let (a, b) = (load_in(&tx, first).await?, load_in(&tx, second).await?);
            let (mut kept, mut gone) = if first == keep { (a, b) } else { (b, a) };
            let merge = crate::domain::merge::merge(keep, &mut kept, merged, &mut gone, &actor, operator, now_ms)?;
            log_changes(&mut tx, merged, None, &merge.merged_changes, &mut gone).await?;
            log_changes(&mut tx, keep, None, &merge.kept_changes, &mut kept).await?;
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

/// Stores new patients' documents inside the caller's transaction, in one statement (an import
/// or a generated population writes thousands at a time); refuses the lot if any of them is
/// already stored, by id or NHS number.
async fn insert_many(tx: &mut Logging<'_>, documents: &[NewDocument]) -> Result<Vec<PatientId>, StoreError> {
    if documents.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Vec<u8>> = documents.iter().map(|d| d.patient.as_bytes().to_vec()).collect();
    let nhs: Vec<Option<&str>> = documents.iter().map(|d| d.derived.nhs_number.as_deref()).collect();
    let docs: Vec<&[u8]> = documents.iter().map(|d| d.derived.saved.as_slice()).collect();
    let districts: Vec<Option<&str>> =
        documents.iter().map(|d| d.derived.index.district.as_deref()).collect();
    let flags: Vec<String> = documents.iter().map(|d| d.derived.flags()).collect();
    let reviews: Vec<Option<&str>> =
        documents.iter().map(|d| d.derived.index.review_date.as_deref()).collect();
    let merged: Vec<bool> = documents.iter().map(|d| d.derived.merged).collect();
    // A document without a readable listing is stored without one: devices parse it.
    let listings: Vec<Option<Vec<u8>>> =
        documents.iter().map(|d| d.derived.listing.as_ref().and_then(encode_listing)).collect();
    let inserted = tx
        .execute(
            "INSERT INTO patients (id, nhs_number, doc, last_seq, district, risk_flags, review_date, merged, listing)
             SELECT id, nhs, doc, 0, district, flags, review, merged, listing
             FROM unnest($1::BYTEA[], $2::TEXT[], $3::BYTEA[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::BOOLEAN[], $8::BYTEA[])
                 AS t (id, nhs, doc, district, flags, review, merged, listing)
             ON CONFLICT DO NOTHING",
            &[&ids, &nhs, &docs, &districts, &flags, &reviews, &merged, &listings],
        )
        .await?;
    if inserted as usize != documents.len() {
        return Err(StoreError::DuplicatePatient);
    }
    for document in documents {
        tx.log.queue(&document.patient, None, &document.changes);
    }
    Ok(documents.iter().map(|d| d.patient).collect())
}

/// Stores a new patient's document inside the caller's transaction.
async fn insert_in(tx: &mut Logging<'_>, document: &NewDocument) -> Result<PatientId, StoreError> {
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
async fn apply_in(
    tx: &mut Logging<'_>,
    patient: &PatientId,
    changes: &[automerge::Change],
) -> Result<(), StoreError> {
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
