//! Numbered schema migrations of the SQLite store: `sync-server/migrations/sqlite/NNNN_name.sql`,
//! applied in order, each once, in one transaction with the row that records it in
//! `schema_migrations` (so a crash leaves a step either wholly done and recorded, or not begun).
//!
//! A store made before steps were recorded (release 0.1 and earlier: tables, no
//! `schema_migrations`) is adopted by step 1, which is idempotent, plus the columns those
//! releases added to existing tables when they opened the store. A store that records a step
//! this server does not know is from a newer release, and is refused.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::store::StoreError;

use crate::store::schema::Migration;

/// Every step, in order; each file of `migrations/sqlite` is here (tested).
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../../../migrations/sqlite/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "hl7_claims",
        sql: include_str!("../../../migrations/sqlite/0002_hl7_claims.sql"),
    },
    Migration {
        version: 3,
        name: "session_fence",
        sql: include_str!("../../../migrations/sqlite/0003_session_fence.sql"),
    },
];

/// Brings the store to the newest step; returns the steps applied now.
pub(super) fn migrate(conn: &mut Connection, now_ms: i64) -> Result<Vec<u32>, StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY,
             name TEXT NOT NULL,
             applied_at_ms INTEGER NOT NULL
         )",
    )?;
    let newest = crate::store::schema::newest(MIGRATIONS);
    let mut done = Vec::new();
    for step in MIGRATIONS {
        // Immediate: another process opening the store at the same moment waits here, then
        // finds the step recorded and skips it.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let recorded: Vec<u32> = {
            let mut q = tx.prepare("SELECT version FROM schema_migrations ORDER BY version")?;
            q.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
        };
        if recorded.iter().any(|v| *v > newest) {
            return Err(StoreError::UnknownFormat);
        }
        if recorded.contains(&step.version) {
            continue;
        }
        let legacy = step.version == 1 && table_exists(&tx, "meta")?;
        tx.execute_batch(step.sql)?;
        if legacy {
            adopt_legacy(&tx)?;
        }
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES (?1, ?2, ?3)",
            rusqlite::params![step.version, step.name, now_ms],
        )?;
        tx.commit()?;
        tracing::info!(version = step.version, name = step.name, legacy, "store schema migrated");
        done.push(step.version);
    }
    Ok(done)
}

/// The steps recorded in the store, in order: `(version, name)`.
pub(super) fn recorded(conn: &Connection) -> Result<Vec<(u32, String)>, StoreError> {
    let mut q = conn.prepare("SELECT version, name FROM schema_migrations ORDER BY version")?;
    Ok(q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?)
}

fn table_exists(conn: &Connection, table: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")?
        .query_row([table], |_| Ok(()))
        .optional()?
        .is_some())
}

/// What releases before recorded steps added to tables that already existed, when they opened
/// a store; step 1 declares these columns in its tables, which a table made earlier lacks.
fn adopt_legacy(conn: &Connection) -> Result<(), StoreError> {
    add_column(conn, "feed_refusals", "control_id", "TEXT NOT NULL DEFAULT ''")?;
    add_column(conn, "device_docs", "since", "INTEGER NOT NULL DEFAULT 0")?;
    add_column(conn, "patients", "listing", "BLOB")?;
    Ok(())
}

fn add_column(conn: &Connection, table: &str, column: &str, declaration: &str) -> Result<(), StoreError> {
    let has: bool = conn
        .prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?
        .exists([column])?;
    if !has {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {declaration}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_of_the_migrations_folder_is_a_step_in_order() {
        crate::store::schema::assert_steps_are_the_folder("sqlite", MIGRATIONS);
    }

    #[test]
    fn each_step_runs_once_and_a_store_from_a_newer_release_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        let every: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert_eq!(migrate(&mut conn, 1).unwrap(), every);
        assert_eq!(migrate(&mut conn, 2).unwrap(), Vec::<u32>::new(), "nothing twice");
        let names: Vec<(u32, String)> = MIGRATIONS.iter().map(|m| (m.version, m.name.to_string())).collect();
        assert_eq!(recorded(&conn).unwrap(), names);
        conn.execute("INSERT INTO schema_migrations VALUES (99, 'from-the-future', 3)", []).unwrap();
        assert!(matches!(migrate(&mut conn, 4), Err(StoreError::UnknownFormat)));
    }
}
