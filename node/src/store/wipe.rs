//! Remote wipe: destroying patient data, then the data key (crypto-shredding).

use super::*;

impl DeviceStore {
    /// Destroys every patient document, pending change, view and sync position, and compacts
    /// the file so their (already encrypted) bytes are gone too. The identity stays, so the
    /// device can still tell the server.
    pub fn wipe_patient_data(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch(
            "BEGIN IMMEDIATE; DELETE FROM documents; DELETE FROM outbox; DELETE FROM diverged; DELETE FROM view_log; DELETE FROM notifications;
             DELETE FROM secrets WHERE name IN ('sync', 'view_head', 'rows_root'); COMMIT;",
        )?;
        compact(&self.conn)?;
        Ok(())
    }

    /// Crypto-shredding: destroys the wrapped data key and every secret, so nothing left in the
    /// file can be decrypted, and marks the store as wiped.
    pub fn shred(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch(
            "BEGIN IMMEDIATE; DELETE FROM secrets; DELETE FROM documents; DELETE FROM outbox; DELETE FROM diverged; DELETE FROM view_log;
             DELETE FROM notifications; DELETE FROM meta WHERE name = 'wrapped_key'; COMMIT;",
        )?;
        self.conn.execute(
            "INSERT INTO meta (name, value) VALUES ('wiped_at', ?1) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            [self.now_ms().to_string().as_bytes()],
        )?;
        compact(&self.conn)?;
        Ok(())
    }

    /// Moves the last sync back in time, to test lease expiry without waiting.
    #[doc(hidden)]
    pub fn backdate_last_sync_for_test(&self, by_ms: i64) -> Result<(), StoreError> {
        let mut state = self.sync_state()?;
        state.last_sync_ms = state.last_sync_ms.map(|t| t - by_ms);
        self.put_secret("sync", &state)
    }
}

/// Rewrites the file without the deleted pages and empties the write-ahead log, so no old page
/// (an encrypted document, the wrapped key) is left in either. Another connection reading at
/// that moment can make the checkpoint stop short; it is retried until the log is empty.
/// Each try waits at most 100 ms for the other connection, about 15 s in all.
fn compact(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch("VACUUM")?;
    conn.busy_timeout(std::time::Duration::from_millis(100))?;
    let emptied = checkpoint(conn);
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    emptied
}

fn checkpoint(conn: &Connection) -> Result<(), StoreError> {
    for _ in 0..100 {
        let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        if busy == 0 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(StoreError::Busy)
}
