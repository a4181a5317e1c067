//! FHIR Bundles as `import-fhir` parses them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = care_sync_server::ingest::fhir::import::parse_bundle(text);
    }
});
