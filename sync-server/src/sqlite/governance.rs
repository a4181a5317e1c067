//! Scopes, consent and the audit in SQLite.

use super::*;

impl Governance for SqliteStore {
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
}
