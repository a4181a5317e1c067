//! Scopes, grants, consent, settings, alerts, feeds, quarantine and the audit in PostgreSQL.

use super::*;
use crate::store::{HL7_CLAIM_LEASE_MS, Hl7Claim};

fn bytes(p: &PatientId) -> &[u8] {
    p.as_bytes().as_slice()
}

impl PostgresStore {
    /// Runs one statement and returns the rows it changed.
    fn execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        self.run(async |c| Ok(c.execute(sql, params).await?))
    }

    /// Quarantined uploads matching `filter` (on `q`, with one BIGINT parameter), newest first.
    fn quarantine_rows(&self, filter: &str, param: Option<i64>) -> Result<Vec<QuarantineRecord>, StoreError> {
        self.run(async |c| {
            let rows = c
                .query(
                    &format!(
                        "SELECT q.id, q.at_ms, d.name, q.patient_id, q.rule, q.place, q.changes, r.at_ms, r.note
                         FROM quarantine q JOIN devices d ON d.id = q.device_id
                         LEFT JOIN quarantine_reviews r ON r.quarantine_id = q.id
                         {filter} ORDER BY q.id DESC"
                    ),
                    &[&param],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let changes: Vec<u8> = r.try_get(6)?;
                    Ok(QuarantineRecord {
                        id: r.try_get(0)?,
                        at_ms: r.try_get(1)?,
                        device: r.try_get(2)?,
                        patient: patient_id(r.try_get(3)?)?,
                        rule: r.try_get(4)?,
                        place: r.try_get(5)?,
                        changes: postcard::from_bytes(&changes).map_err(|_| StoreError::UnknownFormat)?,
                        reviewed: match r.try_get::<_, Option<i64>>(7)? {
                            Some(at_ms) => Some(QuarantineReview { at_ms, note: r.try_get(8)? }),
                            None => None,
                        },
                    })
                })
                .collect()
        })
    }
}

impl Governance for PostgresStore {
    fn append_audit(
        &self,
        actor: &str,
        action: &str,
        patient: Option<&PatientId>,
        detail: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.run(async |c| {
            let tx = c.transaction().await?;
            audit_in(&tx, actor, action, patient, detail, now_ms).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn audit_entries(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let patient = filter.patient.map(|p| p.as_bytes().to_vec());
        self.run(async |c| {
            let rows = c
                .query(
                    "SELECT seq, at_ms, actor, action, patient_id, detail FROM audit
                     WHERE ($1::BYTEA IS NULL OR patient_id = $1) AND ($2::TEXT IS NULL OR actor = $2)
                       AND ($3::BIGINT IS NULL OR at_ms >= $3)
                     ORDER BY seq",
                    &[&patient, &filter.actor, &filter.since_ms],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let patient: Option<Vec<u8>> = r.try_get(4)?;
                    Ok(AuditRecord {
                        seq: r.try_get(0)?,
                        at_ms: r.try_get(1)?,
                        actor: r.try_get(2)?,
                        action: r.try_get(3)?,
                        patient: patient.map(patient_id).transpose()?,
                        detail: r.try_get(5)?,
                    })
                })
                .collect()
        })
    }

    fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.run(async |c| {
            let row = c.query_opt("SELECT value FROM settings WHERE name = $1", &[&name]).await?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
    }

    fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            &[&name, &value],
        )
        .map(drop)
    }

    fn device_budget(&self, device: i64) -> Result<Option<u64>, StoreError> {
        self.run(async |c| {
            let row = c.query_opt("SELECT budget FROM devices WHERE id = $1", &[&device]).await?;
            let budget: Option<i64> =
                row.ok_or_else(|| StoreError::UnknownDevice(device.to_string()))?.try_get(0)?;
            Ok(budget.map(|b| b.max(0) as u64))
        })
    }

    fn set_device_budget(&self, device: i64, budget: Option<u64>) -> Result<(), StoreError> {
        self.execute("UPDATE devices SET budget = $1 WHERE id = $2", &[&budget.map(|b| b as i64), &device])
            .map(drop)
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
        self.run(async |c| {
            Ok(c.query_one(
                "INSERT INTO grants (device_id, patient_id, kind, reason, created_at_ms, expires_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                &[&device, &bytes(patient), &kind.as_str(), &reason, &now_ms, &expires_at_ms],
            )
            .await?
            .try_get(0)?)
        })
    }

    fn close_grants(
        &self,
        device: i64,
        patient: &PatientId,
        kind: GrantKind,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        Ok(self.execute(
            "UPDATE grants SET closed_at_ms = $1 WHERE device_id = $2 AND patient_id = $3 AND kind = $4
             AND closed_at_ms IS NULL AND expires_at_ms > $1",
            &[&now_ms, &device, &bytes(patient), &kind.as_str()],
        )? as usize)
    }

    fn grants(&self, device: Option<i64>, now_ms: i64) -> Result<Vec<Grant>, StoreError> {
        self.run(async |c| {
            let rows = c
                .query(
                    "SELECT id, device_id, patient_id, kind, reason, created_at_ms, expires_at_ms FROM grants
                     WHERE ($1::BIGINT IS NULL OR device_id = $1) AND closed_at_ms IS NULL AND expires_at_ms > $2
                     ORDER BY id",
                    &[&device, &now_ms],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let kind: String = r.try_get(3)?;
                    Ok(Grant {
                        id: r.try_get(0)?,
                        device: r.try_get(1)?,
                        patient: patient_id(r.try_get(2)?)?,
                        kind: GrantKind::parse(&kind).ok_or_else(|| unknown_stored("grant kind", &kind))?,
                        reason: r.try_get(4)?,
                        created_at_ms: r.try_get(5)?,
                        expires_at_ms: r.try_get(6)?,
                    })
                })
                .collect()
        })
    }

    fn area_add(&self, device: i64, district: &str) -> Result<bool, StoreError> {
        Ok(self.execute(
            "INSERT INTO device_areas (device_id, district) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&device, &district.trim().to_ascii_uppercase()],
        )? > 0)
    }

    fn area_add_many(&self, entries: &[(i64, String)]) -> Result<Vec<(i64, String)>, StoreError> {
        self.run(async |c| {
            let tx = c.transaction().await?;
            let mut added = Vec::new();
            for (device, district) in entries {
                let district = district.trim().to_ascii_uppercase();
                if tx
                    .execute(
                        "INSERT INTO device_areas (device_id, district) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                        &[device, &district],
                    )
                    .await?
                    > 0
                {
                    added.push((*device, district));
                }
            }
            tx.commit().await?;
            Ok(added)
        })
    }

    fn area_remove(&self, device: i64, district: &str) -> Result<bool, StoreError> {
        Ok(self.execute(
            "DELETE FROM device_areas WHERE device_id = $1 AND district = $2",
            &[&device, &district.trim().to_ascii_uppercase()],
        )? > 0)
    }

    fn areas(&self, device: i64) -> Result<Vec<String>, StoreError> {
        self.run(async |c| {
            let rows = c
                .query("SELECT district FROM device_areas WHERE device_id = $1 ORDER BY district", &[&device])
                .await?;
            rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
        })
    }

    fn consent(&self, patient: &PatientId) -> Result<ConsentFlags, StoreError> {
        self.run(async |c| {
            let row = c
                .query_opt("SELECT objection, opt_out FROM patients WHERE id = $1", &[&bytes(patient)])
                .await?;
            let row = row.ok_or(StoreError::UnknownPatient)?;
            Ok(ConsentFlags { objection: row.try_get(0)?, opt_out: row.try_get(1)? })
        })
    }

    fn set_consent(&self, patient: &PatientId, flags: ConsentFlags) -> Result<(), StoreError> {
        let n = self.execute(
            "UPDATE patients SET objection = $1, opt_out = $2 WHERE id = $3",
            &[&flags.objection, &flags.opt_out, &bytes(patient)],
        )?;
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
        const FACTS: &str = "p.id, p.review_date, p.objection, p.risk_flags, p.merged";
        fn facts(r: &Row) -> Result<PatientFacts, StoreError> {
            let flags: String = r.try_get(3)?;
            Ok(PatientFacts {
                patient: patient_id(r.try_get(0)?)?,
                review_date: r.try_get(1)?,
                objection: r.try_get(2)?,
                risk_flags: flags.split(',').filter(|f| !f.is_empty()).map(str::to_string).collect(),
                merged: r.try_get(4)?,
            })
        }
        self.run(async |c| {
            let mut rows = ScopeRows::default();
            // Narrowed to grants not yet ended (closed ones and the lapsed pile up over the years).
            let grants = c
                .query(
                    &format!(
                        "SELECT {FACTS}, g.kind, g.expires_at_ms, g.closed_at_ms FROM grants g
                         JOIN patients p ON p.id = g.patient_id
                         WHERE g.device_id = $1 AND g.closed_at_ms IS NULL AND g.expires_at_ms > $2"
                    ),
                    &[&device, &now_ms],
                )
                .await?;
            for r in &grants {
                let kind: String = r.try_get(5)?;
                // A kind this server does not know is a damaged or newer store: said so.
                let kind = GrantKind::parse(&kind).ok_or_else(|| unknown_stored("grant kind", &kind))?;
                rows.grants.push(GrantFacts {
                    kind,
                    expires_at_ms: r.try_get(6)?,
                    closed_at_ms: r.try_get(7)?,
                    patient: facts(r)?,
                });
            }
            let caseload = c
                .query(
                    &format!("SELECT {FACTS} FROM caseload c JOIN patients p ON p.id = c.patient_id WHERE c.device_id = $1"),
                    &[&device],
                )
                .await?;
            rows.caseload = caseload.iter().map(facts).collect::<Result<_, _>>()?;
            if !prefetch_flags.is_empty() {
                // Narrowed to patients with one of the flags: a district has thousands without.
                let area = c
                    .query(
                        &format!(
                            "SELECT {FACTS} FROM device_areas a JOIN patients p ON p.district = a.district
                             WHERE a.device_id = $1
                               AND EXISTS (SELECT 1 FROM unnest($2::TEXT[]) f WHERE strpos(p.risk_flags, ',' || f || ',') > 0)"
                        ),
                        &[&device, &prefetch_flags],
                    )
                    .await?;
                rows.area = area.iter().map(facts).collect::<Result<_, _>>()?;
            }
            Ok(rows)
        })
    }

    fn raise_alert(
        &self,
        kind: &str,
        device: Option<i64>,
        patient: Option<&PatientId>,
        reason: &str,
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        self.run(async |c| {
            Ok(c.query_one(
                "INSERT INTO alerts (at_ms, kind, device_id, patient_id, reason) VALUES ($1, $2, $3, $4, $5) RETURNING id",
                &[&now_ms, &kind, &device, &patient.map(|p| p.as_bytes().to_vec()), &reason],
            )
            .await?
            .try_get(0)?)
        })
    }

    fn alerts(&self, include_acknowledged: bool) -> Result<Vec<AlertRecord>, StoreError> {
        self.run(async |c| {
            let rows = c
                .query(
                    "SELECT a.id, a.at_ms, a.kind, d.name, a.patient_id, a.reason, a.acknowledged_at_ms, a.note
                     FROM alerts a LEFT JOIN devices d ON d.id = a.device_id
                     WHERE $1::BOOLEAN OR a.acknowledged_at_ms IS NULL ORDER BY a.id",
                    &[&include_acknowledged],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let patient: Option<Vec<u8>> = r.try_get(4)?;
                    Ok(AlertRecord {
                        id: r.try_get(0)?,
                        at_ms: r.try_get(1)?,
                        kind: r.try_get(2)?,
                        device: r.try_get(3)?,
                        patient: patient.map(patient_id).transpose()?,
                        reason: r.try_get(5)?,
                        acknowledged_at_ms: r.try_get(6)?,
                        note: r.try_get(7)?,
                    })
                })
                .collect()
        })
    }

    fn acknowledge_alert(&self, id: i64, note: &str, now_ms: i64) -> Result<bool, StoreError> {
        Ok(self.execute(
            "UPDATE alerts SET acknowledged_at_ms = $1, note = $2 WHERE id = $3 AND acknowledged_at_ms IS NULL",
            &[&now_ms, &note, &id],
        )? > 0)
    }

    fn hl7_seen(&self, control_id: &str) -> Result<bool, StoreError> {
        self.run(async |c| {
            Ok(c.query_opt("SELECT 1 FROM hl7_messages WHERE control_id = $1 AND done", &[&control_id])
                .await?
                .is_some())
        })
    }

    fn hl7_record(&self, control_id: &str, event: &str, now_ms: i64) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO hl7_messages (control_id, event, received_at_ms, done) VALUES ($1, $2, $3, true)
             ON CONFLICT (control_id) DO UPDATE SET done = true",
            &[&control_id, &event, &now_ms],
        )
        .map(drop)
    }

    fn hl7_claim(&self, control_id: &str, event: &str, now_ms: i64) -> Result<Hl7Claim, StoreError> {
        // The lease is timed by the database's clock (the instances' clocks may differ), unless
        // the caller's `now_ms` is ahead of it (tests pass a time of their own).
        self.run(async |c| {
            let tx = c.transaction().await?;
            // One statement: of two instances claiming at once, one inserts and the other
            // waits for its row, then finds it claimed.
            let claimed = tx
                .query_opt(
                    "INSERT INTO hl7_messages (control_id, event, received_at_ms, done)
                     VALUES ($1, $2, GREATEST($3, (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT), false)
                     ON CONFLICT (control_id) DO UPDATE SET received_at_ms = excluded.received_at_ms
                     WHERE NOT hl7_messages.done AND hl7_messages.received_at_ms <= excluded.received_at_ms - $4
                     RETURNING received_at_ms",
                    &[&control_id, &event, &now_ms, &HL7_CLAIM_LEASE_MS],
                )
                .await?;
            let found = match claimed {
                Some(row) => Hl7Claim::Claimed(row.try_get(0)?),
                None => {
                    let done: bool = tx
                        .query_one("SELECT done FROM hl7_messages WHERE control_id = $1", &[&control_id])
                        .await?
                        .try_get(0)?;
                    if done { Hl7Claim::Done } else { Hl7Claim::Busy }
                }
            };
            tx.commit().await?;
            Ok(found)
        })
    }

    fn hl7_release(&self, control_id: &str, claim: i64) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM hl7_messages WHERE control_id = $1 AND NOT done AND received_at_ms = $2",
            &[&control_id, &claim],
        )
        .map(drop)
    }

    fn feed_record(&self, code: &str, control_id: &str, reason: &str, now_ms: i64) -> Result<(), StoreError> {
        self.run(async |c| {
            let tx = c.transaction().await?;
            tx.execute(
                "INSERT INTO feed_counts (code, n, last_at_ms) VALUES ($1, 1, $2)
                 ON CONFLICT (code) DO UPDATE SET n = feed_counts.n + 1,
                     last_at_ms = GREATEST(feed_counts.last_at_ms, excluded.last_at_ms)",
                &[&code, &now_ms],
            )
            .await?;
            if code != "AA" {
                tx.execute(
                    "INSERT INTO feed_refusals (at_ms, code, reason, control_id) VALUES ($1, $2, $3, $4)",
                    &[&now_ms, &code, &reason, &control_id],
                )
                .await?;
                tx.execute(
                    "DELETE FROM feed_refusals WHERE id < (SELECT id FROM feed_refusals ORDER BY id DESC OFFSET $1::BIGINT - 1 LIMIT 1)",
                    &[&(crate::store::FEED_ERRORS_KEPT as i64)],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn feed_status(&self) -> Result<crate::store::FeedStatus, StoreError> {
        self.run(async |c| {
            let mut status = crate::store::FeedStatus::default();
            for r in c.query("SELECT code, n, last_at_ms FROM feed_counts", &[]).await? {
                let (code, n, at): (String, i64, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
                match code.as_str() {
                    "AA" => status.accepted = n as u64,
                    "AE" => status.errors = n as u64,
                    _ => status.rejected += n as u64,
                }
                status.last_message_ms = status.last_message_ms.max(Some(at));
            }
            let refusals = c
                .query("SELECT at_ms, code, reason, control_id FROM feed_refusals ORDER BY id DESC", &[])
                .await?;
            status.recent_refusals = refusals
                .iter()
                .map(|r| {
                    Ok(crate::store::FeedRefusal {
                        at_ms: r.try_get(0)?,
                        code: r.try_get(1)?,
                        reason: r.try_get(2)?,
                        control_id: r.try_get(3)?,
                    })
                })
                .collect::<Result<_, StoreError>>()?;
            Ok(status)
        })
    }

    fn view_head(&self, device: i64) -> Result<(u64, [u8; 32]), StoreError> {
        self.run(async |c| {
            let row =
                c.query_opt("SELECT view_seq, view_hash FROM devices WHERE id = $1", &[&device]).await?;
            let row = row.ok_or_else(|| StoreError::UnknownDevice(device.to_string()))?;
            let (seq, hash): (i64, Option<Vec<u8>>) = (row.try_get(0)?, row.try_get(1)?);
            // No hash yet: the chain starts from zeroes (`viewlog`'s genesis).
            Ok((seq as u64, hash.map(|h| fixed_bytes("view log head", h)).transpose()?.unwrap_or([0; 32])))
        })
    }

    fn set_view_head(&self, device: i64, session: u64, seq: u64, hash: [u8; 32]) -> Result<(), StoreError> {
        let moved = self.execute(
            "UPDATE devices SET view_seq = $1, view_hash = $2 WHERE id = $3 AND session_epoch = $4",
            &[&(seq as i64), &hash.as_slice(), &device, &(session as i64)],
        )?;
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
        self.run(async |c| {
            Ok(c.query_one(
                "INSERT INTO quarantine (at_ms, device_id, patient_id, rule, place, changes)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                &[&now_ms, &device, &bytes(patient), &rule, &place, &body],
            )
            .await?
            .try_get(0)?)
        })
    }

    fn quarantined(&self, device: Option<i64>) -> Result<Vec<QuarantineRecord>, StoreError> {
        self.quarantine_rows("WHERE $1::BIGINT IS NULL OR q.device_id = $1", device)
    }

    fn quarantined_item(&self, id: i64) -> Result<Option<QuarantineRecord>, StoreError> {
        Ok(self.quarantine_rows("WHERE q.id = $1", Some(id))?.pop())
    }

    fn review_quarantine(&self, id: i64, note: &str, now_ms: i64) -> Result<bool, StoreError> {
        Ok(self.execute(
            "INSERT INTO quarantine_reviews (quarantine_id, at_ms, note)
             SELECT id, $2, $3 FROM quarantine WHERE id = $1 ON CONFLICT DO NOTHING",
            &[&id, &now_ms, &note],
        )? > 0)
    }

    fn quarantine_count(&self, device: i64, since_ms: i64) -> Result<u64, StoreError> {
        self.run(async |c| {
            let row = c
                .query_one(
                    "SELECT count(*) FROM quarantine q WHERE q.device_id = $1 AND q.at_ms >= $2
                     AND NOT EXISTS (SELECT 1 FROM quarantine_reviews r WHERE r.quarantine_id = q.id)",
                    &[&device, &since_ms],
                )
                .await?;
            Ok(row.try_get::<_, i64>(0)? as u64)
        })
    }

    fn caseload_add(&self, device: i64, patient: &PatientId) -> Result<bool, StoreError> {
        Ok(self.execute(
            "INSERT INTO caseload (device_id, patient_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&device, &bytes(patient)],
        )? > 0)
    }

    fn caseload_add_many(&self, entries: &[(i64, PatientId)]) -> Result<Vec<(i64, PatientId)>, StoreError> {
        self.run(async |c| {
            let tx = c.transaction().await?;
            let mut added = Vec::new();
            for (device, patient) in entries {
                if tx
                    .execute(
                        "INSERT INTO caseload (device_id, patient_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                        &[device, &bytes(patient)],
                    )
                    .await?
                    > 0
                {
                    added.push((*device, *patient));
                }
            }
            tx.commit().await?;
            Ok(added)
        })
    }

    fn caseload_remove(&self, device: i64, patient: &PatientId) -> Result<bool, StoreError> {
        Ok(self.execute(
            "DELETE FROM caseload WHERE device_id = $1 AND patient_id = $2",
            &[&device, &bytes(patient)],
        )? > 0)
    }

    fn caseload(&self, device: i64) -> Result<Vec<PatientId>, StoreError> {
        self.run(async |c| {
            let rows = c
                .query("SELECT patient_id FROM caseload WHERE device_id = $1 ORDER BY patient_id", &[&device])
                .await?;
            rows.iter().map(|r| patient_id(r.try_get(0)?)).collect()
        })
    }
}
