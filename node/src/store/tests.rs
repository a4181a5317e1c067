//! The store held by several connections at once, as an app holds it (reads and records on one
//! while a sync runs on the other).

use super::*;
use crate::crypto::{KdfParams, PassphraseWrapper};
use crate::protocol::{DocBody, DocItem};
use crate::record::NewEntry;
use crate::summary::Allergy;
use crate::summary::tests::{allergy, demographics};

const NHS: &str = "9990000018"; // the summary tests' patient

/// An enrolled store holding one patient, as a first sync leaves it.
fn store_with_a_patient(dir: &Path) -> (DeviceStore, PatientSummary) {
    let wrapper =
        PassphraseWrapper::with_params("pass", KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 });
    let mut store = DeviceStore::open(&dir.join("device.db"), &wrapper).unwrap();
    store
        .set_enrolment(&Enrolment {
            server_addr: "127.0.0.1:1".into(),
            server_key: [7; 32],
            device_name: "ambulance-1".into(),
            role: "ambulance-crew".into(),
            enrolled_at_ms: 0,
        })
        .unwrap();
    let mut server = PatientSummary::create(
        uuid::Uuid::new_v4(),
        &demographics(),
        automerge::ActorId::from(&[0u8; 16][..]),
        0,
    )
    .unwrap();
    let item = DocItem { doc: server.patient_id().unwrap(), body: DocBody::Whole(server.save().into()) };
    store.apply_items(1, false, &[item], 0, &mut |_| {}).unwrap();
    (store, server)
}

#[test]
fn entries_recorded_on_one_connection_while_the_sync_applies_on_another_are_all_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sync_side, mut server) = store_with_a_patient(dir.path());
    let mut app_side = sync_side.another_connection().unwrap();
    let nhs = NhsNumber::parse(NHS).unwrap();
    let doc = server.patient_id().unwrap();
    server.set_actor(&[9; 32]);
    // The server's side: a GP's allergies, each arriving as a change while the app records.
    let mut incoming = Vec::new();
    for i in 0..40 {
        let before = server.heads();
        server.add(&allergy(&format!("GP substance {i}"), "gp-feed", i)).unwrap();
        incoming
            .push(server.changes_since(&before).into_iter().map(|c| c.raw_bytes().to_vec().into()).collect());
    }
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for (round, changes) in incoming.into_iter().enumerate() {
                let item = DocItem { doc, body: DocBody::Changes(changes) };
                sync_side.apply_items(2 + round as u64, false, &[item], 0, &mut |_| {}).unwrap();
            }
        });
        for i in 0..40 {
            let entry = NewEntry::Problem { description: format!("crew problem {i}") };
            app_side.record(&nhs, &entry).unwrap();
        }
    });
    let mut held = app_side.find_by_nhs(&nhs).unwrap().unwrap();
    let allergies = held.summary.entries::<Allergy>().unwrap();
    let problems = held.summary.entries::<crate::summary::Problem>().unwrap();
    assert_eq!(allergies.len(), 40, "every change the sync applied is still in the document");
    assert_eq!(problems.len(), 40, "every entry the app recorded is in the document");
    assert_eq!(app_side.pending_count().unwrap(), 40, "and queued for upload, once each");
}
