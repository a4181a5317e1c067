//! View-log entries as the server verifies them.
#![no_main]

use care_node::viewlog::{SignedView, check_chain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = postcard::from_bytes::<Vec<SignedView>>(data) {
        let _ = check_chain(&[7; 32], (0, [0; 32]), &entries);
    }
});
