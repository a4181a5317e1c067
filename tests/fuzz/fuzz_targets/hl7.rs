//! HL7 v2 messages as the feed processes them, against a real store (in memory-backed storage).
#![no_main]

use std::sync::OnceLock;

use care_sync_server::store::sqlite::SqliteStore;
use libfuzzer_sys::fuzz_target;

fn store() -> &'static SqliteStore {
    static STORE: OnceLock<(SqliteStore, tempfile::TempDir)> = OnceLock::new();
    &STORE
        .get_or_init(|| {
            let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
            (SqliteStore::open(dir.path()).unwrap(), dir)
        })
        .0
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for message in care_sync_server::ingest::hl7::adt::split_messages(&text) {
        let options = care_sync_server::ingest::hl7::adt::AdtOptions::default();
        let _ = care_sync_server::ingest::hl7::adt::process(store(), &message, 1_790_000_000_000, &options);
    }
});
