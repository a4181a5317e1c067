//! An uploaded change as the server judges it: the bounded chunk inspection, Automerge's parse,
//! then the write policy on a copy of a real patient document (as `domain::upload` does).
#![no_main]

use std::sync::OnceLock;

use care_node::policy::{MAX_CHANGE_BYTES, Writer};
use care_node::summary::{self as s, Demographics, PatientSummary, Provenance};
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [7; 32];

fn document() -> &'static Vec<u8> {
    static SAVED: OnceLock<Vec<u8>> = OnceLock::new();
    SAVED.get_or_init(|| {
        let server = automerge::ActorId::from(&[1u8; 16][..]);
        let mut doc =
            PatientSummary::create(uuid::Uuid::from_u128(1), &Demographics::new("Test Patient", None), server, 0)
                .unwrap();
        // A fixed entry id keeps the document the same in every run, so corpus changes apply.
        let gp = Provenance::new("server", "GP record", "gp-feed", 0);
        doc.upsert(uuid::Uuid::from_u128(2), &s::Alert::new(s::alert_kind::RESPECT_DNACPR, "DNACPR", gp)).unwrap();
        doc.save()
    })
}

fuzz_target!(|data: &[u8]| {
    if care_node::chunk::change_size(data, MAX_CHANGE_BYTES).is_err() {
        return;
    }
    let mut summary = PatientSummary::load(document()).unwrap();
    let before = summary.heads();
    // The server runs this under catch_unwind, because automerge 0.12 panics on some malformed
    // changes (see docs/security.md, Fuzzing). So does this target: a panic raised inside
    // automerge unwinds to the catch below; any other panic (ours) still aborts, as a crash.
    let writer = Writer { actor: &KEY, device_name: "ambulance-7", role: "ambulance-crew" };
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        if info.location().is_some_and(|l| l.file().contains("/automerge-")) {
            return;
        }
        eprintln!("{info}");
        std::process::abort();
    }));
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let Ok(change) = automerge::Change::try_from(data) else { return };
        if summary.apply_changes(vec![change.clone()]).is_ok() && !summary.has_missing_deps() {
            let _ = care_node::policy::check_summary(&mut summary, &before, &[change], &writer);
        }
    }));
    std::panic::set_hook(hook);
});
