//! The store held by several connections at once, as an app holds it (reads and records on one
//! while a sync runs on the other).

use super::*;
use crate::crypto::{KdfParams, PassphraseWrapper};
use crate::protocol::{DocBody, DocItem};
use crate::record::NewEntry;
use crate::summary::Allergy;
use crate::summary::tests::{allergy, demographics};

const NHS: &str = "9990000018"; // the summary tests' patient

/// An enrolled store with nothing in it.
fn enrolled_store(dir: &Path) -> DeviceStore {
    let wrapper =
        PassphraseWrapper::with_params("pass", KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 });
    let store = DeviceStore::open(&dir.join("device.db"), &wrapper).unwrap();
    store
        .set_enrolment(&Enrolment {
            server_addr: "127.0.0.1:1".into(),
            server_key: [7; 32],
            device_name: "ambulance-1".into(),
            role: "ambulance-crew".into(),
            enrolled_at_ms: 0,
        })
        .unwrap();
    store
}

/// An enrolled store holding one patient, as a first sync leaves it.
fn store_with_a_patient(dir: &Path) -> (DeviceStore, PatientSummary) {
    let mut store = enrolled_store(dir);
    let mut server = PatientSummary::create(
        uuid::Uuid::new_v4(),
        &demographics(),
        automerge::ActorId::from(&[0u8; 16][..]),
        0,
    )
    .unwrap();
    let item = DocItem {
        doc: server.patient_id().unwrap(),
        body: DocBody::Whole { saved: server.save().into(), listing: None },
    };
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

/// The server's document of the summary tests' patient with a history: allergies recorded,
/// one marked entered in error.
fn a_patient_with_history() -> PatientSummary {
    let mut server = PatientSummary::create(
        uuid::Uuid::new_v4(),
        &demographics(),
        automerge::ActorId::from(&[0u8; 16][..]),
        0,
    )
    .unwrap();
    for i in 0..30 {
        server.add(&allergy(&format!("GP substance {i}"), "gp-feed", i)).unwrap();
    }
    let first = server.entries::<Allergy>().unwrap()[0].id;
    let provenance = crate::summary::Provenance::new("gp-feed", "GP feed", "gp", 1_000);
    server
        .mark_entered_in_error(crate::summary::Section::Allergies, first, "wrong patient", &provenance)
        .unwrap();
    server
}

/// What a clinician is shown of a held patient: the entries' lines, the demographics, the heads.
fn shown(
    store: &DeviceStore,
    doc: &PatientId,
) -> (Vec<(crate::summary::Section, crate::summary::EntryId, String)>, Listing, Vec<automerge::ChangeHash>) {
    let mut held = store.get(doc).unwrap().expect("the patient is held");
    let mut lines = held.summary.entry_lines().unwrap();
    lines.sort_by(|a, b| (a.0.key(), &a.1, &a.2).cmp(&(b.0.key(), &b.1, &b.2)));
    (lines, held.summary.listing().unwrap(), held.summary.heads())
}

#[test]
fn a_document_stored_unparsed_under_its_listing_shows_exactly_what_a_parsed_one_shows() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut listed, mut parsed) = (enrolled_store(a.path()), enrolled_store(b.path()));
    let mut server = a_patient_with_history();
    let doc = server.patient_id().unwrap();
    let saved = server.save();
    let listing = server.listing().unwrap();
    let with = DocItem { doc, body: DocBody::Whole { saved: saved.clone().into(), listing: Some(listing) } };
    let without = DocItem { doc, body: DocBody::Whole { saved: saved.into(), listing: None } };
    listed.apply_items(1, false, &[with], 0, &mut |_| {}).unwrap();
    parsed.apply_items(1, false, &[without], 0, &mut |_| {}).unwrap();

    assert_eq!(listed.list().unwrap(), parsed.list().unwrap(), "the same card in the list");
    assert_eq!(listed.list().unwrap()[0].name, server.listing().unwrap().name);
    let nhs = NhsNumber::parse(NHS).unwrap();
    assert_eq!(listed.search(Some(&nhs), None, None, None).unwrap().len(), 1, "found by its NHS number");
    assert_eq!(shown(&listed, &doc), shown(&parsed, &doc), "the same record when opened");
    let (lines, _, _) = shown(&listed, &doc);
    assert_eq!(lines.len(), 30, "every entry, the one entered in error among them");
    // And it takes changes like a parsed one.
    server.set_actor(&[9; 32]);
    let before = server.heads();
    server.add(&allergy("later substance", "gp-feed", 99)).unwrap();
    let changes: Vec<_> =
        server.changes_since(&before).into_iter().map(|c| c.raw_bytes().to_vec().into()).collect();
    for store in [&mut listed, &mut parsed] {
        let item = DocItem { doc, body: DocBody::Changes(changes.clone()) };
        store.apply_items(2, false, &[item], 0, &mut |_| {}).unwrap();
    }
    assert_eq!(shown(&listed, &doc), shown(&parsed, &doc));
    assert_eq!(shown(&listed, &doc).0.len(), 31);
}

#[test]
fn a_listing_that_disagrees_with_its_document_never_opens_another_patients_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = enrolled_store(dir.path());
    let mut server = a_patient_with_history();
    let doc = server.patient_id().unwrap();
    // A listing naming another (valid) NHS number than the document's own.
    let mut listing = server.listing().unwrap();
    let other = "9990000026";
    assert!(NhsNumber::parse(other).is_ok() && other != NHS);
    listing.nhs_number = Some(other.into());
    let item = DocItem { doc, body: DocBody::Whole { saved: server.save().into(), listing: Some(listing) } };
    store.apply_items(1, false, &[item], 0, &mut |_| {}).unwrap();
    let opened = store.find_by_nhs(&NhsNumber::parse(other).unwrap());
    let Err(StoreError::Decode { reason, .. }) = opened else {
        panic!("a document filed under another number opened: {opened:?}")
    };
    assert!(reason.contains("another NHS number"), "{reason}");
    assert!(store.get(&doc).is_err(), "nor by its id");

    // A listing with the document's own number but another name: listed so, never opened as.
    let dir = tempfile::tempdir().unwrap();
    let mut store = enrolled_store(dir.path());
    let mut renamed = server.listing().unwrap();
    renamed.name = "Someone Else".into();
    let item = DocItem { doc, body: DocBody::Whole { saved: server.save().into(), listing: Some(renamed) } };
    store.apply_items(1, false, &[item], 0, &mut |_| {}).unwrap();
    let opened = store.get(&doc);
    assert!(
        matches!(opened, Err(StoreError::Decode { ref reason, .. }) if reason.contains("card")),
        "{opened:?}"
    );

    // A document sent for another patient's id is refused when opened, too.
    let dir = tempfile::tempdir().unwrap();
    let mut store = enrolled_store(dir.path());
    let wrong: PatientId = uuid::Uuid::new_v4();
    let item = DocItem {
        doc: wrong,
        body: DocBody::Whole { saved: server.save().into(), listing: Some(server.listing().unwrap()) },
    };
    store.apply_items(1, false, &[item], 0, &mut |_| {}).unwrap();
    let opened = store.get(&wrong);
    assert!(
        matches!(opened, Err(StoreError::Decode { ref reason, .. }) if reason.contains("another patient")),
        "{opened:?}"
    );
}

#[test]
fn a_listing_that_claims_a_held_patients_number_never_hides_that_patient() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, held) = store_with_a_patient(dir.path());
    let nhs = NhsNumber::parse(NHS).unwrap();
    // Another patient, whose listing claims the held patient's number.
    let mut other_demographics = demographics();
    other_demographics.nhs_number = Some("9990000026".into());
    other_demographics.name = "Other Person".into();
    let mut other = PatientSummary::create(
        uuid::Uuid::new_v4(),
        &other_demographics,
        automerge::ActorId::from(&[0u8; 16][..]),
        0,
    )
    .unwrap();
    let mut claim = other.listing().unwrap();
    claim.nhs_number = Some(NHS.into());
    let doc = other.patient_id().unwrap();
    let item = DocItem { doc, body: DocBody::Whole { saved: other.save().into(), listing: Some(claim) } };
    store.apply_items(2, false, &[item], 0, &mut |_| {}).unwrap();

    let found = store.find_by_nhs(&nhs).unwrap().expect("the held patient is still found by number");
    assert_eq!(found.summary.patient_id().unwrap(), held.patient_id().unwrap());
    let filed =
        store.find_by_nhs(&NhsNumber::parse("9990000026").unwrap()).unwrap().expect("filed by its own");
    assert_eq!(filed.summary.listing().unwrap().name, "Other Person");
    assert_eq!(store.list().unwrap().len(), 2);
}
