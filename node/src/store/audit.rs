//! The offline lease, the signed view log and notifications: what a clinician may see, and what they saw.

use super::*;

/// The sealed secret holding the latest device time seen while patient data was used.
pub(super) const CLOCK_HIGH_WATER: &str = "clock_high_water";
/// How far the device clock may step back (time-zone slips, network time corrections).
const CLOCK_TOLERANCE_MS: i64 = 10 * 60 * 1000;

impl DeviceStore {
    /// Refuses to show patient data when the device has not synced within its lease.
    pub fn check_lease(&self, now_ms: i64) -> Result<(), StoreError> {
        // The latest time this device's clock has shown while patient data was used: a clock
        // wound back past it (beyond ordinary corrections) cannot stretch the lease.
        if let Some(high) = self.get_secret::<i64>(CLOCK_HIGH_WATER)?
            && now_ms < high - CLOCK_TOLERANCE_MS
        {
            return Err(StoreError::ClockWoundBack { minutes: (high - now_ms) / 60_000 });
        }
        let state = self.sync_state()?;
        if let (Some(lease), Some(last)) = (state.lease_ms, state.last_sync_ms)
            && now_ms - last > lease as i64
        {
            return Err(StoreError::LeaseExpired {
                hours_ago: (now_ms - last) / 3_600_000,
                lease_hours: lease as i64 / 3_600_000,
            });
        }
        Ok(())
    }

    /// Opens a patient's record for a clinician to see: checks the lease and appends the view to
    /// the signed view log, in that order. Every user-facing read goes through here.
    pub fn view_patient(&mut self, nhs: &NhsNumber, action: &str) -> Result<StoredPatient, StoreError> {
        self.check_lease(self.now_ms())?;
        let patient = self.find_by_nhs(nhs)?.ok_or(StoreError::UnknownPatient)?;
        self.record_view(&patient.summary.patient_id()?, action, "")?;
        Ok(patient)
    }

    /// Appends an entry to the view log: hash-chained to the previous one and signed.
    pub fn record_view(
        &mut self,
        patient: &PatientId,
        action: &str,
        detail: &str,
    ) -> Result<u64, StoreError> {
        let identity = self.identity()?;
        let at_ms = self.now_ms();
        let tx = write_tx(&mut self.conn)?;
        let (seq, prev): (u64, [u8; 32]) = get_secret(&tx, &self.key, "view_head")?.unwrap_or((0, [0; 32]));
        let entry = crate::viewlog::ViewEntry {
            seq: seq + 1,
            prev_hash: prev,
            at_ms,
            patient: *patient,
            action: action.to_string(),
            detail: detail.to_string(),
        };
        let head = (entry.seq, entry.hash());
        let signed = crate::viewlog::SignedView::sign(&identity, entry);
        let sealed = seal_row(&self.key, "view_log", &head.0.to_be_bytes(), 0, &signed)?;
        tx.execute("INSERT INTO view_log (seq, body) VALUES (?1, ?2)", params![head.0 as i64, sealed])?;
        put_secret(&tx, &self.key, "view_head", &head)?;
        let high: Option<i64> = get_secret(&tx, &self.key, CLOCK_HIGH_WATER)?;
        put_secret(&tx, &self.key, CLOCK_HIGH_WATER, &high.unwrap_or(i64::MIN).max(at_ms))?;
        tx.commit()?;
        Ok(head.0)
    }

    /// View log entries not yet acknowledged by the server, oldest first.
    pub fn pending_views(&self, limit: usize) -> Result<Vec<crate::viewlog::SignedView>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, body FROM view_log WHERE uploaded = 0 ORDER BY seq LIMIT ?1")?;
        let mut rows = stmt.query([limit as i64])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let body: Vec<u8> = row.get(1)?;
            out.push(self.open_row("view_log", &(seq as u64).to_be_bytes(), 0, &body)?);
        }
        Ok(out)
    }

    /// Marks view log entries the server has recorded; they stay readable on the device.
    pub fn acknowledge_views(&mut self, through: u64) -> Result<(), StoreError> {
        self.conn.execute("UPDATE view_log SET uploaded = 1 WHERE seq <= ?1", [through as i64])?;
        Ok(())
    }

    /// Notifications from received changes (admitted, transferred, discharged, attended), newest
    /// first.
    pub fn notifications(&self, limit: usize) -> Result<Vec<crate::notify::Notification>, StoreError> {
        self.check_lease(self.now_ms())?;
        let mut stmt =
            self.conn.prepare_cached("SELECT id, body FROM notifications ORDER BY id DESC LIMIT ?1")?;
        let mut rows = stmt.query([limit as i64])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let body: Vec<u8> = row.get(1)?;
            out.push(self.open_row("notifications", &id.to_be_bytes(), 0, &body)?);
        }
        Ok(out)
    }

    /// The device's view log, newest first, with whether each entry reached the server.
    pub fn view_log(&self, limit: usize) -> Result<Vec<(crate::viewlog::ViewEntry, bool)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, body, uploaded FROM view_log ORDER BY seq DESC LIMIT ?1")?;
        let mut rows = stmt.query([limit as i64])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let body: Vec<u8> = row.get(1)?;
            let signed: crate::viewlog::SignedView =
                self.open_row("view_log", &(seq as u64).to_be_bytes(), 0, &body)?;
            out.push((signed.entry, row.get::<_, bool>(2)?));
        }
        Ok(out)
    }
}
