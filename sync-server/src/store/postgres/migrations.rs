//! Numbered schema migrations of the PostgreSQL store: `sync-server/migrations/postgres/`,
//! applied in order, each once, in one transaction with the row that records it. Instances
//! starting together take turns on an advisory lock, so each step runs once in the region.

use crate::store::StoreError;

use crate::store::schema::Migration;

/// Every step, in order; each file of `migrations/postgres` is here (tested).
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../../../migrations/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "hl7_claims",
        sql: include_str!("../../../migrations/postgres/0002_hl7_claims.sql"),
    },
    Migration {
        version: 3,
        name: "session_fence",
        sql: include_str!("../../../migrations/postgres/0003_session_fence.sql"),
    },
    Migration {
        version: 4,
        name: "late_log_head",
        sql: include_str!("../../../migrations/postgres/0004_late_log_head.sql"),
    },
];

/// The advisory lock instances take turns on while migrating.
const MIGRATION_LOCK: i64 = 7400;

/// Brings the database to the newest step; returns the steps applied now.
pub(super) async fn migrate(c: &mut super::Client, now_ms: i64) -> Result<Vec<u32>, StoreError> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY,
             name TEXT NOT NULL,
             applied_at_ms BIGINT NOT NULL
         )",
    )
    .await?;
    let recorded: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let newest = crate::store::schema::newest(MIGRATIONS);
    if recorded.iter().any(|v| *v as u32 > newest) {
        return Err(StoreError::UnknownFormat);
    }
    let mut done = Vec::new();
    for step in MIGRATIONS.iter().filter(|m| !recorded.contains(&(m.version as i32))) {
        tx.batch_execute(step.sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES ($1, $2, $3)",
            &[&(step.version as i32), &step.name, &now_ms],
        )
        .await?;
        tracing::info!(version = step.version, name = step.name, "store schema migrated");
        done.push(step.version);
    }
    tx.commit().await?;
    Ok(done)
}

/// The steps recorded in the database, in order: `(version, name)`.
pub(super) async fn recorded(c: &mut super::Client) -> Result<Vec<(u32, String)>, StoreError> {
    let rows = c.query("SELECT version, name FROM schema_migrations ORDER BY version", &[]).await?;
    rows.iter().map(|r| Ok((r.try_get::<_, i32>(0)? as u32, r.try_get(1)?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_of_the_migrations_folder_is_a_step_in_order() {
        crate::store::schema::assert_steps_are_the_folder("postgres", MIGRATIONS);
    }
}
