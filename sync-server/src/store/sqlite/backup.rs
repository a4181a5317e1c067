//! Online backup and restore of the SQLite store.
//!
//! A backup is a consistent copy of `server.db` made with SQLite's online backup API, safe while
//! `serve` runs (WAL readers do not block writers), checked with `PRAGMA integrity_check` before it
//! is reported done. The server's identity (its TLS key) is in the store, so a restored server is
//! the same server to its devices: their pinned key still matches, and their cursors resume.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::FORMAT;
use crate::store::StoreError;

/// What a backup or restore copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    pub patients: u64,
    pub devices: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0} already exists; choose another file")]
    Exists(PathBuf),
    #[error("there is no server store in {0}")]
    NoStore(PathBuf),
    #[error(
        "{0} already holds a server store; stop the server and pass --force to replace it (the old one is kept beside it)"
    )]
    StoreExists(PathBuf),
    #[error("{0} is not a care-sync server backup: {1}")]
    NotABackup(PathBuf, String),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

impl From<rusqlite::Error> for BackupError {
    fn from(e: rusqlite::Error) -> Self {
        BackupError::Store(e.into())
    }
}

fn store_file(dir: &Path) -> PathBuf {
    dir.join("server.db")
}

/// Copies the store in `dir` into `out` (which must not exist yet), online.
pub fn backup(dir: &Path, out: &Path) -> Result<BackupReport, BackupError> {
    let source = store_file(dir);
    if !source.exists() {
        return Err(BackupError::NoStore(dir.into()));
    }
    if out.exists() {
        return Err(BackupError::Exists(out.into()));
    }
    let from = Connection::open_with_flags(&source, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    from.busy_timeout(Duration::from_secs(10))?;
    care_node::private::file(out).map_err(|e| BackupError::Io(out.into(), e))?;
    let mut to = Connection::open(out)?;
    {
        let copy = rusqlite::backup::Backup::new(&from, &mut to)?;
        copy.run_to_completion(256, Duration::from_millis(5), None)?;
    }
    drop(to);
    check(out)
}

/// Puts the backup `from` in place as the store of `dir`. Refuses to replace an existing store
/// unless `force`, and then keeps the old one as `server.db.replaced-<time>`.
pub fn restore(from: &Path, dir: &Path, force: bool, by: &str) -> Result<BackupReport, BackupError> {
    let report = check(from)?;
    care_node::private::dir(dir).map_err(|e| BackupError::Io(dir.into(), e))?;
    let target = store_file(dir);
    if target.exists() {
        if !force {
            return Err(BackupError::StoreExists(dir.into()));
        }
        let aside = dir.join(format!("server.db.replaced-{}", care_node::now_ms()));
        // Fold the WAL into the old file before moving it, so that it is complete on its own.
        Connection::open(&target)?.pragma_update(None, "wal_checkpoint", "TRUNCATE")?;
        std::fs::rename(&target, &aside).map_err(|e| BackupError::Io(aside.clone(), e))?;
    }
    for leftover in ["server.db-wal", "server.db-shm"] {
        let _ = std::fs::remove_file(dir.join(leftover));
    }
    let partial = dir.join("server.db.restoring");
    let _ = std::fs::remove_file(&partial);
    care_node::private::file(&partial).map_err(|e| BackupError::Io(partial.clone(), e))?;
    {
        let source = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let mut to = Connection::open(&partial)?;
        let copy = rusqlite::backup::Backup::new(&source, &mut to)?;
        copy.run_to_completion(256, Duration::from_millis(0), None)?;
    }
    // A new incarnation tells devices that this server may have forgotten what it acknowledged
    // after the backup: they resend their changes and resync from the start.
    super::devices::new_incarnation(&Connection::open(&partial)?)?;
    std::fs::rename(&partial, &target).map_err(|e| BackupError::Io(target.clone(), e))?;
    let store = super::SqliteStore::open(dir)?;
    let detail =
        format!("restored from a backup of {} patients; devices resend their changes", report.patients);
    crate::store::Governance::append_audit(&store, by, "restored", None, &detail, care_node::now_ms())?;
    Ok(report)
}

/// Checks that `file` is an intact care-sync server store and counts what it holds.
pub fn check(file: &Path) -> Result<BackupReport, BackupError> {
    let not = |why: &str| BackupError::NotABackup(file.into(), why.into());
    let conn = Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|_| not("cannot open"))?;
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|_| not("not an SQLite database"))?;
    if integrity != "ok" {
        return Err(not("the integrity check failed"));
    }
    let format: Option<String> = conn
        .query_row("SELECT CAST(value AS TEXT) FROM meta WHERE name = 'format'", [], |r| r.get(0))
        .map_err(|_| not("no care-sync store format"))?;
    if format.as_deref() != Some(FORMAT) {
        return Err(not("an unknown store format"));
    }
    let count = |table: &str| -> Result<u64, BackupError> {
        Ok(conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0))? as u64)
    };
    let bytes = std::fs::metadata(file).map_err(|e| BackupError::Io(file.into(), e))?.len();
    Ok(BackupReport { patients: count("patients")?, devices: count("devices")?, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::prelude::*;
    use crate::store::sqlite::SqliteStore;

    #[test]
    fn a_backup_restores_the_same_server_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let key = SqliteStore::open(&live).unwrap().server_identity().unwrap().public_key();
        let out = dir.path().join("backup.db");
        let report = backup(&live, &out).unwrap();
        assert_eq!(report.patients, 0);
        assert!(matches!(backup(&live, &out), Err(BackupError::Exists(_))));

        let restored = dir.path().join("restored");
        restore(&out, &restored, false, "ops").unwrap();
        let again = SqliteStore::open(&restored).unwrap();
        assert_eq!(again.server_identity().unwrap().public_key(), key, "same server key after restore");
        drop(again);
        assert!(matches!(restore(&out, &restored, false, "ops"), Err(BackupError::StoreExists(_))));
        restore(&out, &restored, true, "ops").unwrap();
        let kept = std::fs::read_dir(&restored)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("server.db.replaced-"))
            .count();
        assert_eq!(kept, 1, "the replaced store is kept");
    }

    #[test]
    fn a_file_that_is_not_a_backup_is_refused_and_nothing_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, b"not a database at all, just text").unwrap();
        let target = dir.path().join("store");
        assert!(matches!(restore(&junk, &target, true, "ops"), Err(BackupError::NotABackup(..))));
        assert!(!target.join("server.db").exists());
    }
}
