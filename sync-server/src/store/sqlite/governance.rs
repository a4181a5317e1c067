//! Scopes, consent and the audit in SQLite.

use super::*;
use crate::store::{HL7_CLAIM_LEASE_MS, Hl7Claim};

// The queries a device's scope is decided on. Each reads the device's own rows first and looks
// their patients up (by id, or by district in the partial index of flagged patients):
// `CROSS JOIN` makes SQLite keep that order. Without it, and without statistics, SQLite may walk
// every patient of the store and look each up among the device's rows, which in a region's
// store of 1,000,000 made a cold sync of 10,000 thirteen times slower (docs/benchmarks.md).

/// The patient facts a scope is decided on.
const FACTS: &str = "p.id, p.review_date, p.objection, p.risk_flags, p.merged";

/// A device's grants not yet ended (closed ones and the lapsed pile up over the years): `?1`
/// the device, `?2` now.
fn grants_sql() -> String {
    format!(
        "SELECT {FACTS}, g.kind, g.expires_at_ms, g.closed_at_ms FROM grants g CROSS JOIN patients p ON p.id = g.patient_id
         WHERE g.device_id = ?1 AND g.closed_at_ms IS NULL AND g.expires_at_ms > ?2"
    )
}

/// A device's caseload: `?1` the device.
fn caseload_sql() -> String {
    format!(
        "SELECT {FACTS} FROM caseload c CROSS JOIN patients p ON p.id = c.patient_id WHERE c.device_id = ?1"
    )
}

/// The patients of a device's areas with one of `flags` prefetch flags (`?2`…): a district has
/// thousands without. `risk_flags != ','` is the partial index's own condition, so it is used.
fn area_sql(flags: usize) -> String {
    let flag_test = (0..flags)
        .map(|i| format!("instr(p.risk_flags, ',' || ?{} || ',') > 0", i + 2))
        .collect::<Vec<_>>()
        .join(" OR ");
    format!(
        "SELECT {FACTS} FROM device_areas a CROSS JOIN patients p ON p.district = a.district
         WHERE a.device_id = ?1 AND p.risk_flags != ',' AND ({flag_test})"
    )
}

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

    fn audit_entries(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, at_ms, actor, action, patient_id, detail FROM audit
             WHERE (?1 IS NULL OR patient_id = ?1) AND (?2 IS NULL OR actor = ?2) AND (?3 IS NULL OR at_ms >= ?3)
             ORDER BY seq",
        )?;
        let rows = stmt.query_map(
            params![filter.patient.map(|p| p.as_bytes().to_vec()), filter.actor, filter.since_ms],
            |r| {
                let patient: Option<Vec<u8>> = r.get(4)?;
                Ok(AuditRecord {
                    seq: r.get(0)?,
                    at_ms: r.get(1)?,
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    patient: patient.map(patient_id).transpose()?,
                    detail: r.get(5)?,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .read()
            .prepare_cached("SELECT value FROM settings WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?)
    }

    fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.conn().prepare_cached("INSERT INTO settings (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET value = excluded.value")?.execute(params![name, value],
        )?;
        Ok(())
    }

    fn device_budget(&self, device: i64) -> Result<Option<u64>, StoreError> {
        let budget: Option<i64> = self
            .read()
            .prepare_cached("SELECT budget FROM devices WHERE id = ?1")?
            .query_row([device], |r| r.get(0))?;
        Ok(budget.map(|b| b.max(0) as u64))
    }

    fn set_device_budget(&self, device: i64, budget: Option<u64>) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached("UPDATE devices SET budget = ?1 WHERE id = ?2")?
            .execute(params![budget.map(|b| b as i64), device])?;
        Ok(())
    }

    fn grant(
        &self,
        device: i64,
        patient: &PatientId,
        kind: GrantKind,
        reason: &str,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.prepare_cached(
            "INSERT INTO grants (device_id, patient_id, kind, reason, created_at_ms, expires_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            device,
            patient.as_bytes().as_slice(),
            kind.as_str(),
            reason,
            now_ms,
            expires_at_ms
        ])?;
        Ok(conn.last_insert_rowid())
    }

    fn close_grants(
        &self,
        device: i64,
        patient: &PatientId,
        kind: GrantKind,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(
                "UPDATE grants SET closed_at_ms = ?1 WHERE device_id = ?2 AND patient_id = ?3 AND kind = ?4
                 AND closed_at_ms IS NULL AND expires_at_ms > ?1",
            )?
            .execute(params![now_ms, device, patient.as_bytes().as_slice(), kind.as_str()])?)
    }

    fn grants(&self, device: Option<i64>, now_ms: i64) -> Result<Vec<Grant>, StoreError> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT id, device_id, patient_id, kind, reason, created_at_ms, expires_at_ms FROM grants
             WHERE (?1 IS NULL OR device_id = ?1) AND closed_at_ms IS NULL AND expires_at_ms > ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![device, now_ms], |r| {
            let kind: String = r.get(3)?;
            Ok(Grant {
                id: r.get(0)?,
                device: r.get(1)?,
                patient: patient_id(r.get(2)?)?,
                kind: GrantKind::parse(&kind).ok_or_else(|| super::unknown_stored("grant kind", &kind))?,
                reason: r.get(4)?,
                created_at_ms: r.get(5)?,
                expires_at_ms: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn area_add(&self, device: i64, district: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(
                "INSERT INTO device_areas (device_id, district) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )?
            .execute(params![device, district.trim().to_ascii_uppercase()])?
            > 0)
    }

    fn area_add_many(&self, entries: &[(i64, String)]) -> Result<Vec<(i64, String)>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut added = Vec::new();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO device_areas (device_id, district) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )?;
            for (device, district) in entries {
                let district = district.trim().to_ascii_uppercase();
                if insert.execute(params![device, district])? > 0 {
                    added.push((*device, district));
                }
            }
        }
        tx.commit()?;
        Ok(added)
    }

    fn area_remove(&self, device: i64, district: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("DELETE FROM device_areas WHERE device_id = ?1 AND district = ?2")?
            .execute(params![device, district.trim().to_ascii_uppercase()])?
            > 0)
    }

    fn areas(&self, device: i64) -> Result<Vec<String>, StoreError> {
        let conn = self.read();
        let mut stmt =
            conn.prepare_cached("SELECT district FROM device_areas WHERE device_id = ?1 ORDER BY district")?;
        let rows = stmt.query_map([device], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn consent(&self, patient: &PatientId) -> Result<ConsentFlags, StoreError> {
        self.read()
            .prepare_cached("SELECT objection, opt_out FROM patients WHERE id = ?1")?
            .query_row([patient.as_bytes().as_slice()], |r| {
                Ok(ConsentFlags { objection: r.get(0)?, opt_out: r.get(1)? })
            })
            .optional()?
            .ok_or(StoreError::UnknownPatient)
    }

    fn set_consent(&self, patient: &PatientId, flags: ConsentFlags) -> Result<(), StoreError> {
        let n = self
            .conn()
            .prepare_cached("UPDATE patients SET objection = ?1, opt_out = ?2 WHERE id = ?3")?
            .execute(params![flags.objection, flags.opt_out, patient.as_bytes().as_slice()])?;
        if n == 0 {
            return Err(StoreError::UnknownPatient);
        }
        Ok(())
    }

    fn scope_rows(
        &self,
        device: i64,
        prefetch_flags: &[String],
        now_ms: i64,
    ) -> Result<crate::domain::scope::ScopeRows, StoreError> {
        use crate::domain::scope::{GrantFacts, PatientFacts, ScopeRows};
        fn facts(r: &rusqlite::Row<'_>) -> rusqlite::Result<PatientFacts> {
            let flags: String = r.get(3)?;
            Ok(PatientFacts {
                patient: patient_id(r.get(0)?)?,
                review_date: r.get(1)?,
                objection: r.get(2)?,
                risk_flags: flags.split(',').filter(|f| !f.is_empty()).map(str::to_string).collect(),
                merged: r.get(4)?,
            })
        }
        let conn = self.read();
        let mut rows = ScopeRows::default();
        let mut grants = conn.prepare_cached(&grants_sql())?;
        let found = grants.query_map(params![device, now_ms], |r| {
            let kind: String = r.get(5)?;
            // A kind this server does not know is a damaged or newer store: said so, never
            // given the highest priority by default.
            let kind = GrantKind::parse(&kind).ok_or_else(|| super::unknown_stored("grant kind", &kind))?;
            Ok(GrantFacts { kind, expires_at_ms: r.get(6)?, closed_at_ms: r.get(7)?, patient: facts(r)? })
        })?;
        rows.grants = found.collect::<Result<_, _>>()?;
        let mut caseload = conn.prepare_cached(&caseload_sql())?;
        rows.caseload = caseload.query_map([device], facts)?.collect::<Result<_, _>>()?;
        if !prefetch_flags.is_empty() {
            let mut area = conn.prepare_cached(&area_sql(prefetch_flags.len()))?;
            let mut values: Vec<&dyn rusqlite::ToSql> = vec![&device];
            values.extend(prefetch_flags.iter().map(|f| f as &dyn rusqlite::ToSql));
            rows.area = area.query_map(values.as_slice(), facts)?.collect::<Result<_, _>>()?;
        }
        Ok(rows)
    }

    fn raise_alert(
        &self,
        kind: &str,
        device: Option<i64>,
        patient: Option<&PatientId>,
        reason: &str,
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.prepare_cached(
            "INSERT INTO alerts (at_ms, kind, device_id, patient_id, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![now_ms, kind, device, patient.map(|p| p.as_bytes().to_vec()), reason])?;
        Ok(conn.last_insert_rowid())
    }

    fn alerts(&self, include_acknowledged: bool) -> Result<Vec<AlertRecord>, StoreError> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT a.id, a.at_ms, a.kind, d.name, a.patient_id, a.reason, a.acknowledged_at_ms, a.note
             FROM alerts a LEFT JOIN devices d ON d.id = a.device_id
             WHERE ?1 OR a.acknowledged_at_ms IS NULL ORDER BY a.id",
        )?;
        let rows = stmt.query_map([include_acknowledged], |r| {
            let patient: Option<Vec<u8>> = r.get(4)?;
            Ok(AlertRecord {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                kind: r.get(2)?,
                device: r.get(3)?,
                patient: patient.map(patient_id).transpose()?,
                reason: r.get(5)?,
                acknowledged_at_ms: r.get(6)?,
                note: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn acknowledge_alert(&self, id: i64, note: &str, now_ms: i64) -> Result<bool, StoreError> {
        Ok(self.conn().prepare_cached("UPDATE alerts SET acknowledged_at_ms = ?1, note = ?2 WHERE id = ?3 AND acknowledged_at_ms IS NULL")?.execute(params![now_ms, note, id],
        )? > 0)
    }

    fn view_head(&self, device: i64) -> Result<(u64, [u8; 32]), StoreError> {
        let (seq, hash): (i64, Option<Vec<u8>>) = self
            .read()
            .prepare_cached("SELECT view_seq, view_hash FROM devices WHERE id = ?1")?
            .query_row([device], |r| Ok((r.get(0)?, r.get(1)?)))?;
        // No hash yet: the chain starts from zeroes (`viewlog`'s genesis).
        Ok((seq as u64, hash.map(|h| super::fixed_bytes("view log head", h)).transpose()?.unwrap_or([0; 32])))
    }

    fn set_view_head(&self, device: i64, session: u64, seq: u64, hash: [u8; 32]) -> Result<(), StoreError> {
        let moved = self
            .conn()
            .prepare_cached(
                "UPDATE devices SET view_seq = ?1, view_hash = ?2 WHERE id = ?3 AND session_epoch = ?4",
            )?
            .execute(params![seq as i64, hash.as_slice(), device, session as i64])?;
        if moved == 0 {
            return Err(StoreError::Superseded);
        }
        Ok(())
    }

    fn quarantine(
        &self,
        device: i64,
        patient: &PatientId,
        rule: &str,
        place: &str,
        changes: &[Vec<u8>],
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        let body = postcard::to_stdvec(changes).map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        let conn = self.conn();
        conn.prepare_cached(
            "INSERT INTO quarantine (at_ms, device_id, patient_id, rule, place, changes) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![now_ms, device, patient.as_bytes().as_slice(), rule, place, body])?;
        Ok(conn.last_insert_rowid())
    }

    fn quarantined(&self, device: Option<i64>) -> Result<Vec<QuarantineRecord>, StoreError> {
        self.quarantine_rows("WHERE ?1 IS NULL OR q.device_id = ?1", device)
    }

    fn quarantined_item(&self, id: i64) -> Result<Option<QuarantineRecord>, StoreError> {
        Ok(self.quarantine_rows("WHERE q.id = ?1", Some(id))?.pop())
    }

    fn review_quarantine(&self, id: i64, note: &str, now_ms: i64) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(
                "INSERT INTO quarantine_reviews (quarantine_id, at_ms, note)
             SELECT id, ?2, ?3 FROM quarantine WHERE id = ?1 ON CONFLICT DO NOTHING",
            )?
            .execute(params![id, now_ms, note])?
            > 0)
    }

    fn quarantine_count(&self, device: i64, since_ms: i64) -> Result<u64, StoreError> {
        Ok(self
            .read()
            .prepare_cached(
                "SELECT count(*) FROM quarantine q WHERE q.device_id = ?1 AND q.at_ms >= ?2
                 AND NOT EXISTS (SELECT 1 FROM quarantine_reviews r WHERE r.quarantine_id = q.id)",
            )?
            .query_row(params![device, since_ms], |r| r.get::<_, i64>(0))? as u64)
    }

    fn caseload_add(&self, device: i64, patient: &PatientId) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .prepare_cached(
                "INSERT INTO caseload (device_id, patient_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )?
            .execute(params![device, patient.as_bytes().as_slice()])?
            > 0)
    }

    fn caseload_add_many(&self, entries: &[(i64, PatientId)]) -> Result<Vec<(i64, PatientId)>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut added = Vec::new();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO caseload (device_id, patient_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )?;
            for (device, patient) in entries {
                if insert.execute(params![device, patient.as_bytes().as_slice()])? > 0 {
                    added.push((*device, *patient));
                }
            }
        }
        tx.commit()?;
        Ok(added)
    }

    fn caseload(&self, device: i64) -> Result<Vec<PatientId>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT patient_id FROM caseload WHERE device_id = ?1 ORDER BY patient_id")?;
        let rows = stmt.query_map([device], |r| patient_id(r.get(0)?))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn caseload_remove(&self, device: i64, patient: &PatientId) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("DELETE FROM caseload WHERE device_id = ?1 AND patient_id = ?2")?
            .execute(params![device, patient.as_bytes().as_slice()])?
            > 0)
    }

    fn hl7_seen(&self, control_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT count(*) FROM hl7_messages WHERE control_id = ?1 AND done")?
            .query_row([control_id], |r| r.get::<_, i64>(0))?
            > 0)
    }

    fn hl7_claim(&self, control_id: &str, event: &str, now_ms: i64) -> Result<Hl7Claim, StoreError> {
        let conn = self.conn();
        // One writer at a time (the claim and the look after it are one transaction).
        let tx = conn.unchecked_transaction()?;
        let claimed = tx
            .prepare_cached(
                "INSERT INTO hl7_messages (control_id, event, received_at_ms, done) VALUES (?1, ?2, ?3, 0)
                 ON CONFLICT (control_id) DO UPDATE SET received_at_ms = excluded.received_at_ms
                 WHERE NOT hl7_messages.done AND hl7_messages.received_at_ms <= ?4",
            )?
            .execute(params![control_id, event, now_ms, now_ms - HL7_CLAIM_LEASE_MS])?;
        let found = if claimed > 0 {
            Hl7Claim::Claimed(now_ms)
        } else {
            let done: bool = tx
                .prepare_cached("SELECT done FROM hl7_messages WHERE control_id = ?1")?
                .query_row([control_id], |r| r.get(0))?;
            if done { Hl7Claim::Done } else { Hl7Claim::Busy }
        };
        tx.commit()?;
        Ok(found)
    }

    fn hl7_release(&self, control_id: &str, claim: i64) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "DELETE FROM hl7_messages WHERE control_id = ?1 AND NOT done AND received_at_ms = ?2",
            )?
            .execute(params![control_id, claim])?;
        Ok(())
    }

    fn feed_record(&self, code: &str, control_id: &str, reason: &str, now_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.prepare_cached(
            "INSERT INTO feed_counts (code, n, last_at_ms) VALUES (?1, 1, ?2)
             ON CONFLICT (code) DO UPDATE SET n = n + 1, last_at_ms = excluded.last_at_ms",
        )?
        .execute(params![code, now_ms])?;
        if code != "AA" {
            tx.prepare_cached(
                "INSERT INTO feed_refusals (at_ms, code, reason, control_id) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![now_ms, code, reason, control_id])?;
            tx.prepare_cached(
                "DELETE FROM feed_refusals WHERE id <= (SELECT max(id) FROM feed_refusals) - ?1",
            )?
            .execute([crate::store::FEED_ERRORS_KEPT as i64])?;
        }
        tx.commit()?;
        Ok(())
    }

    fn feed_status(&self) -> Result<crate::store::FeedStatus, StoreError> {
        let conn = self.conn();
        let mut status = crate::store::FeedStatus::default();
        let mut counts = conn.prepare_cached("SELECT code, n, last_at_ms FROM feed_counts")?;
        for row in counts.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get(2)?)))? {
            let (code, n, at): (String, i64, i64) = row?;
            match code.as_str() {
                "AA" => status.accepted = n as u64,
                "AE" => status.errors = n as u64,
                _ => status.rejected += n as u64,
            }
            status.last_message_ms = status.last_message_ms.max(Some(at));
        }
        let mut refusals = conn
            .prepare_cached("SELECT at_ms, code, reason, control_id FROM feed_refusals ORDER BY id DESC")?;
        status.recent_refusals = refusals
            .query_map([], |r| {
                Ok(crate::store::FeedRefusal {
                    at_ms: r.get(0)?,
                    code: r.get(1)?,
                    reason: r.get(2)?,
                    control_id: r.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(status)
    }

    fn hl7_record(&self, control_id: &str, event: &str, now_ms: i64) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "INSERT INTO hl7_messages (control_id, event, received_at_ms, done) VALUES (?1, ?2, ?3, 1)
                 ON CONFLICT (control_id) DO UPDATE SET done = 1",
            )?
            .execute(params![control_id, event, now_ms])?;
        Ok(())
    }
}

impl SqliteStore {
    /// Quarantined uploads matching `filter` (on `q`, with one parameter), newest first.
    fn quarantine_rows(&self, filter: &str, param: Option<i64>) -> Result<Vec<QuarantineRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT q.id, q.at_ms, d.name, q.patient_id, q.rule, q.place, q.changes, r.at_ms, r.note
             FROM quarantine q JOIN devices d ON d.id = q.device_id
             LEFT JOIN quarantine_reviews r ON r.quarantine_id = q.id
             {filter} ORDER BY q.id DESC"
        ))?;
        let rows = stmt.query_map([param], |r| {
            let changes: Vec<u8> = r.get(6)?;
            let review = match r.get::<_, Option<i64>>(7)? {
                Some(at_ms) => Some(QuarantineReview { at_ms, note: r.get(8)? }),
                None => None,
            };
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get(4)?,
                r.get(5)?,
                changes,
                review,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at_ms, device, patient, rule, place, changes, reviewed) = row?;
            out.push(QuarantineRecord {
                id,
                at_ms,
                device,
                patient: patient_id(patient)?,
                rule,
                place,
                changes: postcard::from_bytes(&changes).map_err(|_| StoreError::UnknownFormat)?,
                reviewed,
            });
        }
        Ok(out)
    }
}

#[cfg(all(test, feature = "demo"))] // patients from the synthetic population
mod tests {
    use super::*;
    use crate::domain::settings::Setting;
    use crate::store::prelude::*;

    #[test]
    fn a_stored_role_or_grant_kind_this_server_does_not_know_is_an_error_not_a_guess() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let addr: std::net::SocketAddr = "127.0.0.1:7400".parse().unwrap();
        crate::operator::ops::issue_token(
            &store,
            "ambulance-1",
            Role::CommunityNurse,
            addr,
            crate::operator::ops::DEFAULT_TOKEN_TTL,
        )
        .unwrap();
        let device = store.device_by_name("ambulance-1").unwrap().unwrap().id;
        let identity = store.server_identity().unwrap();
        let mut population = crate::demo::population::Population::new(1, crate::server_actor(&identity));
        let patient = store.insert_patients(&mut [population.next_patient(0).unwrap()]).unwrap()[0];
        store.grant(device, &patient, GrantKind::BreakGlass, "test", i64::MAX, 0).unwrap();
        assert_eq!(store.grants(Some(device), 1).unwrap()[0].kind, GrantKind::BreakGlass);

        store.conn().execute("UPDATE devices SET role = 'drone-pilot'", []).unwrap();
        let err = store.device_by_name("ambulance-1").unwrap_err().to_string();
        assert!(err.contains("role `drone-pilot`"), "{err}");
        store.conn().execute("UPDATE grants SET kind = 'lunch-break'", []).unwrap();
        let err = store.grants(Some(device), 1).unwrap_err().to_string();
        assert!(err.contains("grant kind `lunch-break`"), "{err}");
        // Who gets what: not a grant of the highest priority by default.
        let err = store.scope_rows(device, &[], 1).unwrap_err().to_string();
        assert!(err.contains("grant kind `lunch-break`"), "{err}");
    }

    #[test]
    fn damaged_keys_and_settings_are_errors_and_nothing_is_made_anew_in_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.server_identity().unwrap();
        store.incarnation().unwrap();
        store.stage_server_key().unwrap();
        let stored = |name: &str| -> Vec<u8> {
            store.conn().query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| r.get(0)).unwrap()
        };
        for name in ["identity", "incarnation", "next_identity"] {
            store.conn().execute("UPDATE meta SET value = x'0102' WHERE name = ?1", [name]).unwrap();
            let read = match name {
                "identity" => store.server_identity().map(drop),
                "incarnation" => store.incarnation().map(drop),
                _ => store.next_server_identity().map(drop),
            };
            let err = read.unwrap_err().to_string();
            assert!(err.contains("of 2 bytes") && err.contains("damaged"), "{name}: {err}");
            assert_eq!(stored(name), vec![1, 2], "{name}: kept as found, not replaced by a new one");
        }

        let addr: std::net::SocketAddr = "127.0.0.1:7400".parse().unwrap();
        let ttl = crate::operator::ops::DEFAULT_TOKEN_TTL;
        crate::operator::ops::issue_token(&store, "nurse-1", Role::CommunityNurse, addr, ttl).unwrap_err();
        store.conn().execute("DELETE FROM meta WHERE name = 'identity'", []).unwrap();
        crate::operator::ops::issue_token(&store, "nurse-1", Role::CommunityNurse, addr, ttl).unwrap();
        let device = store.device_by_name("nurse-1").unwrap().unwrap().id;
        store.conn().execute("UPDATE devices SET view_hash = x'00'", []).unwrap();
        assert!(store.view_head(device).unwrap_err().to_string().contains("view log head of 1 bytes"));
        // A damaged device key refuses that device; the others are still listed (revocations
        // and compaction read the list).
        let key = care_node::identity::Identity::generate().public_key();
        store.create_enrolment("ambulance-2", Role::AmbulanceCrew, [7; 32], i64::MAX).unwrap();
        store.redeem_enrolment([7; 32], key, 0).unwrap();
        store
            .conn()
            .execute("UPDATE devices SET public_key = x'0102' WHERE name = 'ambulance-2'", [])
            .unwrap();
        let listed = store.devices().unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|d| d.public_key.is_none()), "no key to authenticate with");
        assert!(store.device_by_key(&key).unwrap().is_none(), "the damaged device cannot connect");

        // Settings are checked when written; one stored past the checks is not read as the default.
        store.set_setting("budget", "lots").unwrap();
        let err = store.checked_setting(Setting::Budget).unwrap_err().to_string();
        assert!(err.contains("unreadable setting") && err.contains("budget"), "{err}");
        store.set_setting("lease-hours.community-nurse", "-3").unwrap();
        let err = store.setting_hours_ms(Setting::LeaseHours(Role::CommunityNurse)).unwrap_err().to_string();
        assert!(err.contains("lease-hours"), "{err}");
    }
}

#[cfg(test)]
mod plans {
    use super::*;

    /// SQLite's plan for `sql`, one line per step (`EXPLAIN QUERY PLAN`, parameters unbound).
    fn plan(store: &SqliteStore, sql: &str) -> Vec<String> {
        let conn = store.read();
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let mut rows = stmt.raw_query();
        let mut plan = Vec::new();
        while let Some(row) = rows.next().unwrap() {
            plan.push(row.get::<_, String>(3).unwrap());
        }
        plan
    }

    /// The plans SQLite makes for a store without statistics (a new one, or a region's store of
    /// a million patients before `ANALYZE`) are the same whatever its size: each scope query
    /// starts from the device's own rows and searches `patients`, never scans it.
    #[test]
    fn the_scope_queries_start_from_the_device_s_rows_and_never_scan_the_patients() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        for sql in
            [grants_sql(), caseload_sql(), area_sql(2), super::super::sync::HELD_CHANGED_SQL.to_string()]
        {
            let plan = plan(&store, &sql);
            assert!(!plan.iter().any(|step| step.starts_with("SCAN p")), "{plan:?} for {sql}");
            assert!(plan.iter().any(|step| step.starts_with("SEARCH p")), "{plan:?} for {sql}");
        }
    }
}
