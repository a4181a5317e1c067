//! Devices, enrolment tokens and the server identity in PostgreSQL.

use super::*;

impl PostgresStore {
    /// A value of `meta`, made by `make` if absent: the first instance to store it wins and
    /// every instance returns the stored one.
    pub(super) fn meta_once(
        &self,
        name: &'static str,
        make: impl FnOnce() -> Vec<u8> + Send,
    ) -> Result<Vec<u8>, StoreError> {
        self.run(async |c| {
            if let Some(row) = c.query_opt("SELECT value FROM meta WHERE name = $1", &[&name]).await? {
                return Ok(row.try_get(0)?);
            }
            c.execute(
                "INSERT INTO meta (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&name, &make()],
            )
            .await?;
            Ok(c.query_one("SELECT value FROM meta WHERE name = $1", &[&name]).await?.try_get(0)?)
        })
    }

    fn meta(&self, name: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
        self.run(async |c| {
            let row = c.query_opt("SELECT value FROM meta WHERE name = $1", &[&name]).await?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
    }

    /// Sets a device's time column if it is not set yet; false if it was. `column` is one of
    /// this file's own names, never input.
    fn stamp_once(&self, name: &str, column: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.run(async |c| {
            let changed = c
                .execute(
                    &format!("UPDATE devices SET {column} = $1 WHERE name = $2 AND {column} IS NULL"),
                    &[&now_ms, &name],
                )
                .await?;
            if changed == 0 && c.query_opt("SELECT 1 FROM devices WHERE name = $1", &[&name]).await?.is_none()
            {
                return Err(StoreError::UnknownDevice(name.to_string()));
            }
            Ok(changed > 0)
        })
    }
}

impl DeviceRegistry for PostgresStore {
    fn server_identity(&self) -> Result<Identity, StoreError> {
        let seed = self.meta_once("identity", || Identity::generate().seed().to_vec())?;
        Ok(Identity::from_seed(&fixed_bytes("server identity", seed)?))
    }

    fn renew_incarnation(&self) -> Result<(), StoreError> {
        let fresh: [u8; 16] = rand::random();
        self.run(async |c| {
            c.execute(
                "INSERT INTO meta (name, value) VALUES ('incarnation', $1)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                &[&fresh.to_vec()],
            )
            .await?;
            Ok(())
        })
    }

    fn incarnation(&self) -> Result<[u8; 16], StoreError> {
        fixed_bytes(
            "store incarnation",
            self.meta_once("incarnation", || rand::random::<[u8; 16]>().to_vec())?,
        )
    }

    fn next_server_identity(&self) -> Result<Option<Identity>, StoreError> {
        Ok(self
            .meta("next_identity")?
            .map(|s| fixed_bytes("staged server identity", s))
            .transpose()?
            .map(|s| Identity::from_seed(&s)))
    }

    fn stage_server_key(&self) -> Result<Identity, StoreError> {
        let seed = self.meta_once("next_identity", || Identity::generate().seed().to_vec())?;
        Ok(Identity::from_seed(&fixed_bytes("staged server identity", seed)?))
    }

    fn cancel_server_key(&self) -> Result<bool, StoreError> {
        self.run(async |c| {
            let tx = c.transaction().await?;
            let n = tx.execute("DELETE FROM meta WHERE name = 'next_identity'", &[]).await?;
            tx.execute("DELETE FROM device_staged_keys", &[]).await?;
            tx.commit().await?;
            Ok(n > 0)
        })
    }

    fn activate_server_key(&self) -> Result<Identity, StoreError> {
        self.run(async |c| {
            let tx = c.transaction().await?;
            let next = tx
                .query_opt("SELECT value FROM meta WHERE name = 'next_identity' FOR UPDATE", &[])
                .await?
                .ok_or_else(|| {
                    StoreError::KeyRotation("no next key is staged; run `server-key stage` first".into())
                })?;
            let next = Identity::from_seed(&fixed_bytes("staged server identity", next.try_get(0)?)?);
            tx.execute(
                "INSERT INTO meta (name, value) SELECT 'previous_identity', value FROM meta WHERE name = 'identity'
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                &[],
            )
            .await?;
            tx.execute("UPDATE meta SET value = $1 WHERE name = 'identity'", &[&next.seed().as_slice()]).await?;
            tx.execute("DELETE FROM meta WHERE name = 'next_identity'", &[]).await?;
            tx.execute("DELETE FROM device_staged_keys", &[]).await?;
            tx.commit().await?;
            Ok(next)
        })
    }

    fn set_device_staged_key(&self, device: i64, key: Option<PublicKey>) -> Result<(), StoreError> {
        self.run(async |c| {
            match key {
                Some(key) => {
                    c.execute(
                        "INSERT INTO device_staged_keys (device_id, key) VALUES ($1, $2)
                         ON CONFLICT (device_id) DO UPDATE SET key = excluded.key",
                        &[&device, &key.as_slice()],
                    )
                    .await?
                }
                None => c.execute("DELETE FROM device_staged_keys WHERE device_id = $1", &[&device]).await?,
            };
            Ok(())
        })
    }

    fn devices_without_staged_key(&self) -> Result<Vec<String>, StoreError> {
        let Some(next) = self.next_server_identity()? else { return Ok(Vec::new()) };
        self.run(async |c| {
            let rows = c
                .query(
                    "SELECT name FROM devices d
                     WHERE public_key IS NOT NULL AND revoked_at_ms IS NULL AND wiped_at_ms IS NULL
                       AND NOT EXISTS (SELECT 1 FROM device_staged_keys k WHERE k.device_id = d.id AND k.key = $1)
                     ORDER BY name",
                    &[&next.public_key().as_slice()],
                )
                .await?;
            rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
        })
    }

    fn create_enrolment(
        &self,
        name: &str,
        role: Role,
        secret_hash: [u8; 32],
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        self.run(async |c| {
            let tx = c.transaction().await?;
            let existing =
                tx.query_opt("SELECT * FROM devices WHERE name = $1 FOR NO KEY UPDATE", &[&name]).await?;
            let existing = existing.as_ref().map(device_from_row).transpose()?;
            let insert = "INSERT INTO devices (name, role) VALUES ($1, $2) RETURNING id";
            let device_id: i64 = match existing {
                // A revoked device gives up its name (its record stays as `name#id`).
                Some(d) if d.revoked_at_ms.is_some() => {
                    tx.execute(
                        "UPDATE devices SET name = $1 WHERE id = $2",
                        &[&format!("{name}#{}", d.id), &d.id],
                    )
                    .await?;
                    tx.query_one(insert, &[&name, &role.as_str()]).await?.try_get(0)?
                }
                Some(d) if d.public_key.is_some() => {
                    return Err(StoreError::AlreadyEnrolled(name.to_string()));
                }
                Some(d) => {
                    tx.execute("UPDATE devices SET role = $1 WHERE id = $2", &[&role.as_str(), &d.id])
                        .await?;
                    // A new token replaces any earlier unused one.
                    tx.execute(
                        "DELETE FROM enrolment_tokens WHERE device_id = $1 AND used_at_ms IS NULL",
                        &[&d.id],
                    )
                    .await?;
                    d.id
                }
                None => tx.query_one(insert, &[&name, &role.as_str()]).await?.try_get(0)?,
            };
            tx.execute(
                "INSERT INTO enrolment_tokens (secret_hash, device_id, expires_at_ms) VALUES ($1, $2, $3)",
                &[&secret_hash.as_slice(), &device_id, &expires_at_ms],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn redeem_enrolment(
        &self,
        secret_hash: [u8; 32],
        key: PublicKey,
        now_ms: i64,
    ) -> Result<DeviceRecord, EnrolError> {
        let internal = |e: StoreError| {
            tracing::error!(error = %e, "enrolment failed in the store");
            EnrolError::Internal
        };
        let outcome: Result<Result<DeviceRecord, EnrolError>, StoreError> = self.run(async |c| {
            let tx = c.transaction().await?;
            // The token's row is locked: a second redemption through any instance waits, then
            // reads it used.
            let Some(token) = tx
                .query_opt(
                    "SELECT device_id, expires_at_ms, used_at_ms FROM enrolment_tokens WHERE secret_hash = $1 FOR UPDATE",
                    &[&secret_hash.as_slice()],
                )
                .await?
            else {
                return Ok(Err(EnrolError::UnknownToken));
            };
            let (device_id, expires, used): (i64, i64, Option<i64>) =
                (token.try_get(0)?, token.try_get(1)?, token.try_get(2)?);
            if used.is_some() {
                return Ok(Err(EnrolError::AlreadyUsed));
            }
            if now_ms > expires {
                return Ok(Err(EnrolError::Expired));
            }
            let device = device_from_row(
                &tx.query_one("SELECT * FROM devices WHERE id = $1 FOR NO KEY UPDATE", &[&device_id]).await?,
            )?;
            if device.revoked_at_ms.is_some() {
                return Ok(Err(EnrolError::Revoked));
            }
            let in_use = tx.query_opt("SELECT 1 FROM devices WHERE public_key = $1", &[&key.as_slice()]).await?;
            if in_use.is_some() || device.public_key.is_some() {
                return Ok(Err(EnrolError::KeyInUse));
            }
            let bound = tx
                .execute(
                    "UPDATE devices SET public_key = $1, enrolled_at_ms = $2 WHERE id = $3",
                    &[&key.as_slice(), &now_ms, &device_id],
                )
                .await;
            match bound {
                // The same key enrolled through another instance at this moment.
                Err(e) if is_unique_violation(&e) => return Ok(Err(EnrolError::KeyInUse)),
                other => other?,
            };
            tx.execute(
                "UPDATE enrolment_tokens SET used_at_ms = $1 WHERE secret_hash = $2",
                &[&now_ms, &secret_hash.as_slice()],
            )
            .await?;
            let device = device_from_row(&tx.query_one("SELECT * FROM devices WHERE id = $1", &[&device_id]).await?)?;
            match tx.commit().await {
                Err(e) if is_unique_violation(&e) => Ok(Err(EnrolError::KeyInUse)),
                other => {
                    other?;
                    Ok(Ok(device))
                }
            }
        });
        outcome.map_err(internal)?
    }

    fn device_by_name(&self, name: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.run(async |c| {
            c.query_opt("SELECT * FROM devices WHERE name = $1", &[&name])
                .await?
                .as_ref()
                .map(device_from_row)
                .transpose()
        })
    }

    fn device_by_key(&self, key: &PublicKey) -> Result<Option<DeviceRecord>, StoreError> {
        self.run(async |c| {
            c.query_opt("SELECT * FROM devices WHERE public_key = $1", &[&key.as_slice()])
                .await?
                .as_ref()
                .map(device_from_row)
                .transpose()
        })
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.run(async |c| {
            c.query("SELECT * FROM devices ORDER BY name", &[]).await?.iter().map(device_from_row).collect()
        })
    }

    fn controlled_devices(&self, ids: &[i64]) -> Result<Vec<DeviceRecord>, StoreError> {
        self.run(async |c| {
            c.query(
                "SELECT * FROM devices WHERE id = ANY($1)
                 AND (revoked_at_ms IS NOT NULL OR wipe_requested_at_ms IS NOT NULL) ORDER BY id",
                &[&ids],
            )
            .await?
            .iter()
            .map(device_from_row)
            .collect()
        })
    }

    fn revoke_device(&self, name: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.stamp_once(name, "revoked_at_ms", now_ms)
    }

    fn request_wipe(&self, name: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.stamp_once(name, "wipe_requested_at_ms", now_ms)
    }

    fn confirm_wipe(&self, device: i64, now_ms: i64) -> Result<(), StoreError> {
        self.run(async |c| {
            let tx = c.transaction().await?;
            tx.execute(
                "UPDATE devices SET wiped_at_ms = coalesce(wiped_at_ms, $1), revoked_at_ms = coalesce(revoked_at_ms, $1)
                 WHERE id = $2",
                &[&now_ms, &device],
            )
            .await?;
            tx.execute("DELETE FROM device_docs WHERE device_id = $1", &[&device]).await?;
            tx.commit().await?;
            Ok(())
        })
    }
}
