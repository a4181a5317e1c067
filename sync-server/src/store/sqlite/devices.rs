//! Devices, enrolment tokens and the server identity in SQLite.

use super::*;

impl DeviceRegistry for SqliteStore {
    fn server_identity(&self) -> Result<Identity, StoreError> {
        let conn = self.conn();
        let seed: Option<Vec<u8>> = conn
            .prepare_cached("SELECT value FROM meta WHERE name = 'identity'")?
            .query_row([], |r| r.get(0))
            .optional()?;
        if let Some(seed) = seed {
            return Ok(Identity::from_seed(&fixed_bytes("server identity", seed)?));
        }
        let identity = Identity::generate();
        conn.prepare_cached("INSERT INTO meta VALUES ('identity', ?1)")?
            .execute([identity.seed().as_slice()])?;
        Ok(identity)
    }

    fn renew_incarnation(&self) -> Result<(), StoreError> {
        new_incarnation(&self.conn())?;
        Ok(())
    }

    fn incarnation(&self) -> Result<[u8; 16], StoreError> {
        let conn = self.conn();
        let value: Option<Vec<u8>> = conn
            .prepare_cached("SELECT value FROM meta WHERE name = 'incarnation'")?
            .query_row([], |r| r.get(0))
            .optional()?;
        if let Some(value) = value {
            return Ok(fixed_bytes("store incarnation", value)?);
        }
        Ok(new_incarnation(&conn)?)
    }

    fn next_server_identity(&self) -> Result<Option<Identity>, StoreError> {
        let seed: Option<Vec<u8>> = self
            .conn()
            .prepare_cached("SELECT value FROM meta WHERE name = 'next_identity'")?
            .query_row([], |r| r.get(0))
            .optional()?;
        Ok(seed
            .map(|s| fixed_bytes("staged server identity", s))
            .transpose()?
            .map(|s| Identity::from_seed(&s)))
    }

    fn stage_server_key(&self) -> Result<Identity, StoreError> {
        if let Some(next) = self.next_server_identity()? {
            return Ok(next);
        }
        let identity = Identity::generate();
        self.conn()
            .prepare_cached("INSERT INTO meta VALUES ('next_identity', ?1)")?
            .execute([identity.seed().as_slice()])?;
        Ok(identity)
    }

    fn cancel_server_key(&self) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n = tx.prepare_cached("DELETE FROM meta WHERE name = 'next_identity'")?.execute([])?;
        tx.prepare_cached("DELETE FROM device_staged_keys")?.execute([])?;
        tx.commit()?;
        Ok(n > 0)
    }

    fn activate_server_key(&self) -> Result<Identity, StoreError> {
        let next = self.next_server_identity()?.ok_or_else(|| {
            StoreError::KeyRotation("no next key is staged; run `server-key stage` first".into())
        })?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.prepare_cached("INSERT INTO meta (name, value) SELECT 'previous_identity', value FROM meta WHERE name = 'identity'
             ON CONFLICT (name) DO UPDATE SET value = excluded.value")?.execute([],
        )?;
        tx.prepare_cached("UPDATE meta SET value = ?1 WHERE name = 'identity'")?
            .execute([next.seed().as_slice()])?;
        tx.prepare_cached("DELETE FROM meta WHERE name = 'next_identity'")?.execute([])?;
        tx.prepare_cached("DELETE FROM device_staged_keys")?.execute([])?;
        tx.commit()?;
        Ok(next)
    }

    fn set_device_staged_key(&self, device: i64, key: Option<PublicKey>) -> Result<(), StoreError> {
        match key {
            Some(key) => self
                .conn()
                .prepare_cached(
                    "INSERT INTO device_staged_keys (device_id, key) VALUES (?1, ?2)
                 ON CONFLICT (device_id) DO UPDATE SET key = excluded.key",
                )?
                .execute(params![device, key.as_slice()])?,
            None => self
                .conn()
                .prepare_cached("DELETE FROM device_staged_keys WHERE device_id = ?1")?
                .execute([device])?,
        };
        Ok(())
    }

    fn devices_without_staged_key(&self) -> Result<Vec<String>, StoreError> {
        let Some(next) = self.next_server_identity()? else { return Ok(Vec::new()) };
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name FROM devices d
             WHERE public_key IS NOT NULL AND revoked_at_ms IS NULL AND wiped_at_ms IS NULL
               AND NOT EXISTS (SELECT 1 FROM device_staged_keys k WHERE k.device_id = d.id AND k.key = ?1)
             ORDER BY name",
        )?;
        let rows = stmt.query_map([next.public_key().as_slice()], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn create_enrolment(
        &self,
        name: &str,
        role: Role,
        secret_hash: [u8; 32],
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existing = tx
            .prepare_cached("SELECT * FROM devices WHERE name = ?1")?
            .query_row([name], device_from_row)
            .optional()?;
        let device_id = match existing {
            // A revoked device gives up its name, so a replacement tablet for the same vehicle
            // can take it: the old record stays (its key, audit and any pending wipe) as
            // `name#id`.
            Some(d) if d.revoked_at_ms.is_some() => {
                let retired = format!("{name}#{}", d.id);
                tx.prepare_cached("UPDATE devices SET name = ?1 WHERE id = ?2")?
                    .execute(params![retired, d.id])?;
                tx.prepare_cached("INSERT INTO devices (name, role) VALUES (?1, ?2)")?
                    .execute(params![name, role.as_str()])?;
                tx.last_insert_rowid()
            }
            Some(d) if d.public_key.is_some() => {
                return Err(StoreError::AlreadyEnrolled(name.to_string()));
            }
            Some(d) => {
                tx.prepare_cached("UPDATE devices SET role = ?1 WHERE id = ?2")?
                    .execute(params![role.as_str(), d.id])?;
                // A new token replaces any earlier unused one.
                tx.prepare_cached(
                    "DELETE FROM enrolment_tokens WHERE device_id = ?1 AND used_at_ms IS NULL",
                )?
                .execute([d.id])?;
                d.id
            }
            None => {
                tx.prepare_cached("INSERT INTO devices (name, role) VALUES (?1, ?2)")?
                    .execute(params![name, role.as_str()])?;
                tx.last_insert_rowid()
            }
        };
        tx.prepare_cached(
            "INSERT INTO enrolment_tokens (secret_hash, device_id, expires_at_ms) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![secret_hash.as_slice(), device_id, expires_at_ms])?;
        tx.commit()?;
        Ok(())
    }

    fn redeem_enrolment(
        &self,
        secret_hash: [u8; 32],
        key: PublicKey,
        now_ms: i64,
    ) -> Result<DeviceRecord, EnrolError> {
        let internal = |e: rusqlite::Error| {
            tracing::error!(error = %e, "enrolment failed in the store");
            EnrolError::Internal
        };
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(internal)?;
        let token = tx
            .query_row(
                "SELECT device_id, expires_at_ms, used_at_ms FROM enrolment_tokens WHERE secret_hash = ?1",
                [secret_hash.as_slice()],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<i64>>(2)?)),
            )
            .optional()
            .map_err(internal)?;
        let (device_id, expires, used) = token.ok_or(EnrolError::UnknownToken)?;
        if used.is_some() {
            return Err(EnrolError::AlreadyUsed);
        }
        if now_ms > expires {
            return Err(EnrolError::Expired);
        }
        let device = tx
            .query_row("SELECT * FROM devices WHERE id = ?1", [device_id], device_from_row)
            .map_err(internal)?;
        if device.revoked_at_ms.is_some() {
            return Err(EnrolError::Revoked);
        }
        let key_in_use: bool = tx
            .query_row("SELECT count(*) FROM devices WHERE public_key = ?1", [key.as_slice()], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(internal)?
            > 0;
        if key_in_use || device.public_key.is_some() {
            return Err(EnrolError::KeyInUse);
        }
        tx.execute(
            "UPDATE devices SET public_key = ?1, enrolled_at_ms = ?2 WHERE id = ?3",
            params![key.as_slice(), now_ms, device_id],
        )
        .map_err(internal)?;
        tx.execute(
            "UPDATE enrolment_tokens SET used_at_ms = ?1 WHERE secret_hash = ?2",
            params![now_ms, secret_hash.as_slice()],
        )
        .map_err(internal)?;
        let device = tx
            .query_row("SELECT * FROM devices WHERE id = ?1", [device_id], device_from_row)
            .map_err(internal)?;
        tx.commit().map_err(internal)?;
        Ok(device)
    }

    fn device_by_name(&self, name: &str) -> Result<Option<DeviceRecord>, StoreError> {
        Ok(self
            .read()
            .prepare_cached("SELECT * FROM devices WHERE name = ?1")?
            .query_row([name], device_from_row)
            .optional()?)
    }

    fn device_by_key(&self, key: &PublicKey) -> Result<Option<DeviceRecord>, StoreError> {
        Ok(self
            .read()
            .prepare_cached("SELECT * FROM devices WHERE public_key = ?1")?
            .query_row([key.as_slice()], device_from_row)
            .optional()?)
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached("SELECT * FROM devices ORDER BY name")?;
        let rows = stmt.query_map([], device_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn controlled_devices(&self, ids: &[i64]) -> Result<Vec<DeviceRecord>, StoreError> {
        let ids = serde_json::to_string(ids).expect("numbers");
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT * FROM devices WHERE id IN (SELECT value FROM json_each(?1))
             AND (revoked_at_ms IS NOT NULL OR wipe_requested_at_ms IS NOT NULL) ORDER BY id",
        )?;
        let rows = stmt.query_map([ids], device_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoke_device(&self, name: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.stamp_once(name, "revoked_at_ms", now_ms)
    }

    fn request_wipe(&self, name: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.stamp_once(name, "wipe_requested_at_ms", now_ms)
    }

    fn confirm_wipe(&self, device: i64, now_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.prepare_cached("UPDATE devices SET wiped_at_ms = coalesce(wiped_at_ms, ?1), revoked_at_ms = coalesce(revoked_at_ms, ?1)
             WHERE id = ?2")?.execute(params![now_ms, device],
        )?;
        tx.prepare_cached("DELETE FROM device_docs WHERE device_id = ?1")?.execute([device])?;
        tx.commit()?;
        Ok(())
    }
}

/// Gives the store at `conn` a new random incarnation (made with the store, and by a restore).
pub(super) fn new_incarnation(conn: &Connection) -> rusqlite::Result<[u8; 16]> {
    let fresh: [u8; 16] = rand::random();
    conn.prepare_cached("INSERT INTO meta (name, value) VALUES ('incarnation', ?1) ON CONFLICT (name) DO UPDATE SET value = excluded.value")?.execute([fresh.as_slice()],
    )?;
    Ok(fresh)
}

impl SqliteStore {
    /// Sets a device's time column if it is not set yet; false if it was (idempotent operator
    /// actions). `column` is one of this file's own names, never input.
    fn stamp_once(&self, name: &str, column: &str, now_ms: i64) -> Result<bool, StoreError> {
        let conn = self.conn();
        let changed = conn.execute(
            &format!("UPDATE devices SET {column} = ?1 WHERE name = ?2 AND {column} IS NULL"),
            params![now_ms, name],
        )?;
        if changed == 0 {
            let exists: i64 = conn
                .prepare_cached("SELECT count(*) FROM devices WHERE name = ?1")?
                .query_row([name], |r| r.get(0))?;
            if exists == 0 {
                return Err(StoreError::UnknownDevice(name.to_string()));
            }
        }
        Ok(changed > 0)
    }
}
