//! Patient documents on the device: reading, searching, and local edits (each queued for upload).

use super::*;

impl DeviceStore {
    /// Patients matching a search: an NHS number, or any of name (part, any case), date of
    /// birth (exact) and postcode (prefix). Refused when the lease has expired.
    pub fn search(
        &self,
        nhs: Option<&NhsNumber>,
        name: Option<&str>,
        date_of_birth: Option<&str>,
        postcode: Option<&str>,
    ) -> Result<Vec<PatientCard>, StoreError> {
        let normalise = |s: &str| s.split_whitespace().collect::<String>().to_ascii_uppercase();
        let cards = self.list()?;
        Ok(cards
            .into_iter()
            .filter(|c| nhs.is_none_or(|n| c.nhs_number.as_deref() == Some(n.as_str())))
            .filter(|c| name.is_none_or(|n| c.name.to_lowercase().contains(&n.trim().to_lowercase())))
            .filter(|c| date_of_birth.is_none_or(|d| c.date_of_birth.as_deref() == Some(d.trim())))
            .filter(|c| {
                postcode.is_none_or(|p| {
                    c.postcode.as_deref().is_some_and(|x| normalise(x).starts_with(&normalise(p)))
                })
            })
            .collect())
    }

    /// The number of patient documents held.
    pub fn document_count(&self) -> Result<u64, StoreError> {
        Ok(self.conn.query_row("SELECT count(*) FROM documents", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Every patient on the device, ordered by name (refused when the lease has expired).
    pub fn list(&self) -> Result<Vec<PatientCard>, StoreError> {
        self.check_lease(self.now_ms())?;
        let mut stmt = self.conn.prepare_cached("SELECT doc_key, nhs_key, version, card FROM documents")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        let mut cards = Vec::new();
        for row in rows {
            let (doc_key, nhs_key, version, card) = row?;
            cards.push(self.open_row::<PatientCard>(
                "card",
                &document_row(&doc_key, &nhs_key),
                version,
                &card,
            )?);
        }
        cards.sort_by(|a, b| a.name.cmp(&b.name).then(a.patient_id.cmp(&b.patient_id)));
        Ok(cards)
    }

    /// The patient with this NHS number, if the device holds them.
    pub fn find_by_nhs(&self, nhs: &NhsNumber) -> Result<Option<StoredPatient>, StoreError> {
        read_document(&self.conn, &self.key, &self.lookup, "nhs_key", &self.nhs_key(nhs))
    }

    /// The patient document with this id, if the device holds it.
    pub fn get(&self, doc: &PatientId) -> Result<Option<StoredPatient>, StoreError> {
        read_document(&self.conn, &self.key, &self.lookup, "doc_key", &self.doc_key(doc))
    }

    /// Adds an entry to a patient's summary on this device (works offline).
    pub fn add_entry<T: SectionEntry>(
        &mut self,
        nhs: &NhsNumber,
        entry: &T,
    ) -> Result<crate::summary::EntryId, StoreError> {
        self.edit(nhs, |summary| summary.add(entry))
    }

    /// Records a clinician's entry of any section (works offline): checked, given this
    /// device's provenance, and stored under the write policy like every local edit.
    pub fn record(
        &mut self,
        nhs: &NhsNumber,
        entry: &crate::record::NewEntry,
    ) -> Result<crate::summary::EntryId, StoreError> {
        entry.check()?;
        let provenance = self.provenance()?;
        self.edit(nhs, |summary| entry.add_to(summary, provenance))
    }

    /// Marks an entry as entered in error on this device (works offline).
    pub fn mark_entered_in_error(
        &mut self,
        nhs: &NhsNumber,
        section: crate::summary::Section,
        entry: crate::summary::EntryId,
        reason: &str,
    ) -> Result<(), StoreError> {
        let provenance = self.provenance()?;
        self.edit(nhs, |summary| summary.mark_entered_in_error(section, entry, reason, &provenance))
    }

    /// Records a crew attendance with the observations taken (any may be missing) and what NEWS2
    /// says of them for this patient: a score, or why there is none (under 16, pregnant,
    /// incomplete). Works offline.
    pub fn record_attendance(
        &mut self,
        nhs: &NhsNumber,
        observations: &crate::news2::Observations,
        reason: Option<&str>,
    ) -> Result<(crate::summary::EntryId, crate::news2::Assessment), StoreError> {
        let provenance = self.provenance()?;
        let at_ms = provenance.corrected_time_ms();
        let mut encounter = crate::summary::Encounter::new("attendance", "finished", provenance);
        encounter.class = Some("emergency".into());
        encounter.start = crate::clock::iso_time(at_ms);
        encounter.reason = reason.map(str::to_string);
        self.edit(nhs, |summary| {
            let born = summary.demographics()?.date_of_birth;
            let assessment =
                crate::news2::assess(observations, born.and_then(|d| crate::news2::age_years(&d, at_ms)));
            encounter.vitals = Some(observations.to_vitals(&assessment));
            Ok((summary.add(&encounter)?, assessment))
        })
    }

    /// Runs a local edit on a patient's summary as this device: the changes it makes are stored
    /// with the document and queued for upload, in one transaction.
    pub fn edit<R>(
        &mut self,
        nhs: &NhsNumber,
        change: impl FnOnce(&mut PatientSummary) -> Result<R, SummaryError>,
    ) -> Result<R, StoreError> {
        let lookup = self.nhs_key(nhs);
        self.edit_patient("nhs_key", lookup, change)
    }

    /// [`DeviceStore::edit`] for a patient found by id (e.g. a provisional record).
    pub fn edit_by_id<R>(
        &mut self,
        id: &PatientId,
        change: impl FnOnce(&mut PatientSummary) -> Result<R, SummaryError>,
    ) -> Result<R, StoreError> {
        let lookup = self.doc_key(id);
        self.edit_patient("doc_key", lookup, change)
    }

    /// The document is read inside the write transaction, so a sync applying the server's changes
    /// on another connection is never overwritten by an edit of the version before them.
    fn edit_patient<R>(
        &mut self,
        column: &str,
        lookup: [u8; 32],
        change: impl FnOnce(&mut PatientSummary) -> Result<R, SummaryError>,
    ) -> Result<R, StoreError> {
        let identity = self.identity()?;
        let enrolment = self.enrolment()?;
        let key = identity.public_key();
        let tx = write_tx(&mut self.conn)?;
        let mut patient = read_document(&tx, &self.key, &self.lookup, column, &lookup)?
            .ok_or(StoreError::UnknownPatient)?;
        patient.summary.set_actor(&key);
        let before = patient.summary.heads();
        let result = change(&mut patient.summary)?;
        let changes = patient.summary.changes_since(&before);
        // The server's write policy, checked here first: a refused edit is never stored.
        if !changes.is_empty() {
            let enrolment = enrolment.ok_or(StoreError::NotEnrolled)?;
            let writer = crate::policy::Writer {
                actor: &key,
                device_name: &enrolment.device_name,
                role: &enrolment.role,
            };
            crate::policy::check_summary(&mut patient.summary, &before, &changes, &writer)?;
        }
        let patient_id = patient.summary.patient_id()?;
        write_document(&tx, &self.key, &self.lookup, &mut patient.summary, patient.received_at_ms, None)?;
        for change in changes {
            queue_upload(&tx, &self.key, patient_id, change.raw_bytes())?;
        }
        tx.commit()?;
        Ok(result)
    }

    /// After the server was restored from a backup (a new `incarnation`): queues every change
    /// this device authored on every document it holds, so that the server gets back what it had
    /// acknowledged after the backup was taken (a change it already has is a no-op), and starts
    /// the device's cursor again from the beginning — in one transaction, so a cut session
    /// resumes the same recovery. Returns the changes queued.
    pub fn follow_server_restore(&mut self, incarnation: [u8; 16]) -> Result<u64, StoreError> {
        let actor = automerge::ActorId::from(self.identity()?.public_key().as_slice());
        let rows: Vec<SealedDocumentRow> = {
            let mut stmt =
                self.conn.prepare_cached(&format!("SELECT {SEALED_DOCUMENT_COLUMNS} FROM documents"))?;
            stmt.query_map([], sealed_document_row)?.collect::<Result<_, _>>()?
        };
        let tx = write_tx(&mut self.conn)?;
        let mut queued = 0;
        for row in rows {
            // Checked as any opening is (a document stored as received is parsed first here).
            let mut summary = open_sealed_document(&self.key, &self.lookup, row)?.summary;
            let patient_id = summary.patient_id()?;
            for change in summary.changes_since(&[]) {
                if change.actor_id() == &actor {
                    queue_upload(&tx, &self.key, patient_id, change.raw_bytes())?;
                    queued += 1;
                }
            }
        }
        let mut state: SyncState = get_secret(&tx, &self.key, "sync")?.unwrap_or_default();
        state.cursor = 0;
        state.resume = None;
        put_secret(&tx, &self.key, "sync", &state)?;
        put_secret(&tx, &self.key, "server_incarnation", &incarnation)?;
        tx.commit()?;
        Ok(queued)
    }
}

/// Adds one local change to the outbox (sealed, bound to its row id).
fn queue_upload(
    tx: &Transaction<'_>,
    key: &DataKey,
    patient_id: PatientId,
    change: &[u8],
) -> Result<(), StoreError> {
    let outbox = OutboxBody { patient_id, change: change.to_vec() };
    tx.execute("INSERT INTO outbox (body) VALUES (x'')", [])?;
    let id = tx.last_insert_rowid();
    let sealed = seal_row(key, "outbox", &id.to_be_bytes(), 0, &outbox)?;
    tx.execute("UPDATE outbox SET body = ?1 WHERE id = ?2", params![sealed, id])?;
    Ok(())
}
