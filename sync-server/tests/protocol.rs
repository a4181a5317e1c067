//! The sync protocol without a network: the device's and the server's state machines driven
//! against each other in memory, every message through the real frame codec.

use care_sync_server::store::prelude::*;
use std::collections::VecDeque;

use care_node::crypto::{KdfParams, PassphraseWrapper};
use care_node::protocol::{ClientMessage, DocBody, ServerMessage, decode_frame, encode_frame};
use care_node::store::DeviceStore;
use care_node::summary::Allergy;
use care_node::sync::SyncSession;
use care_sync_server::demo::population::Population;
use care_sync_server::session::ServerSession;
use care_sync_server::store::sqlite::SqliteStore;
use care_sync_server::store::{DeviceRecord, Role};

struct World {
    server: SqliteStore,
    device: DeviceStore,
    record: DeviceRecord,
    patients: Vec<care_node::nhs::NhsNumber>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn world(patients: usize) -> World {
    let (sd, dd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let server = SqliteStore::open(sd.path()).unwrap();
    let identity = server.server_identity().unwrap();
    let mut population = Population::new(3, care_sync_server::server_actor(&identity));
    let mut summaries: Vec<_> = (0..patients).map(|_| population.next_patient(0).unwrap()).collect();
    let ids = server.insert_patients(&mut summaries).unwrap();
    let wrapper =
        PassphraseWrapper::with_params("p", KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 });
    let device = DeviceStore::open(&dd.path().join("d.db"), &wrapper).unwrap();
    let secret = [9u8; 32];
    server.create_enrolment("tablet", Role::AmbulanceCrew, secret, i64::MAX).unwrap();
    let record = server.redeem_enrolment(secret, device.identity().unwrap().public_key(), 0).unwrap();
    device
        .set_enrolment(&care_node::store::Enrolment {
            server_addr: "127.0.0.1:7400".into(),
            server_key: identity.public_key(),
            device_name: "tablet".into(),
            role: "ambulance-crew".into(),
            enrolled_at_ms: 0,
        })
        .unwrap();
    for id in &ids {
        server.caseload_add(record.id, id).unwrap();
    }
    let patients = summaries.iter().map(|s| s.nhs_number().unwrap()).collect();
    World { server, device, record, patients, _dirs: (sd, dd) }
}

fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(message: &T) -> T {
    let frame = encode_frame(message).unwrap();
    decode_frame(&frame[4..]).unwrap()
}

/// What the server sent in one session.
#[derive(Debug, Default)]
struct Sent {
    whole: usize,
    changes: usize,
    pages: usize,
    /// Documents sent whole with their listing (stored by the device without parsing them).
    listed: usize,
    completed: bool,
    /// Documents sent whole, in order, with the part of the round they came in.
    order: Vec<(bool, care_node::summary::PatientId)>,
}

/// Runs one session; `cut_after_pages` drops the link after that many document pages.
fn session(w: &mut World, cut_after_pages: Option<usize>) -> Sent {
    let mut sent = Sent::default();
    let (mut client, first) = SyncSession::start(&w.device).unwrap();
    let mut server = ServerSession::new(w.record.clone());
    let mut to_server: VecDeque<ClientMessage> = first.into();
    loop {
        while let Some(message) = to_server.pop_front() {
            for reply in server.handle(wire(&message), &w.server, 1).unwrap() {
                to_server.extend({
                    let now = w.device.now();
                    client.handle(wire(&reply), &mut w.device, now).unwrap()
                });
            }
        }
        while server.is_downloading() {
            let Some(page) = server.next_page(&w.server, care_node::protocol::TARGET_BATCH_BYTES).unwrap()
            else {
                break;
            };
            if let ServerMessage::Docs { items, priority, .. } = &page {
                if cut_after_pages == Some(sent.pages) {
                    return sent;
                }
                sent.pages += 1;
                for item in items {
                    match item.body {
                        DocBody::Whole { ref listing, .. } => {
                            sent.whole += 1;
                            sent.listed += usize::from(listing.is_some());
                            sent.order.push((*priority, item.doc));
                        }
                        DocBody::Changes(_) => sent.changes += 1,
                        DocBody::Purge => {}
                    }
                }
            }
            to_server.extend({
                let now = w.device.now();
                client.handle(wire(&page), &mut w.device, now).unwrap()
            });
        }
        if to_server.is_empty() {
            break;
        }
    }
    sent.completed = client.is_done() && server.is_done();
    sent
}

#[test]
fn a_cut_round_resumes_without_resending_applied_documents() {
    let mut w = world(2_500);
    let first = session(&mut w, Some(2));
    assert_eq!(first.pages, 2);
    let applied = w.device.document_count().unwrap() as usize;
    assert_eq!(applied, first.whole, "every delivered document was applied");
    assert!(applied > 0 && applied < 2_500);

    let second = session(&mut w, None);
    assert!(second.completed);
    assert_eq!(second.whole, 2_500 - applied, "nothing applied before the cut is sent again");
    assert_eq!(second.changes, 0, "nor, as changes, the history of what was sent whole");
    assert_eq!(w.device.document_count().unwrap(), 2_500);

    let third = session(&mut w, None);
    assert_eq!(
        (third.whole, third.changes, third.pages),
        (0, 0, 0),
        "an unchanged reconnect sends no documents"
    );
}

/// Whether the server's copy of a patient has an active alert.
fn alerted(w: &World, id: &care_node::summary::PatientId) -> bool {
    let saved = w.server.load_document(id).unwrap().unwrap();
    let mut summary = care_node::summary::PatientSummary::load(&saved).unwrap();
    let index = care_sync_server::domain::scope::PatientIndex::of(&mut summary).unwrap();
    index.flags.iter().any(|f| f != care_sync_server::domain::scope::FREQUENT_ATTENDER)
}

#[test]
fn patients_with_alerts_come_first_in_a_cold_sync() {
    let mut w = world(1_200);
    let sent = session(&mut w, None);
    assert!(sent.completed);
    let first = sent.order.iter().take_while(|(priority, _)| *priority).count();
    assert!(first > 0 && first < 1_200, "{first} priority documents");
    assert!(sent.order[first..].iter().all(|(priority, _)| !priority), "one priority part, at the start");
    for (priority, id) in &sent.order {
        assert_eq!(*priority, alerted(&w, id), "a document is in the priority part iff it has an alert");
    }
    let ids: Vec<_> = sent.order.iter().map(|(_, id)| *id).collect();
    assert!(ids[..first].is_sorted() && ids[first..].is_sorted(), "each part in patient order");
}

#[test]
fn a_round_cut_after_any_page_resumes_with_nothing_lost_or_sent_twice() {
    let n = 1_200;
    let pages = session(&mut world(n), None).pages;
    assert!(pages >= 3, "{pages} pages");
    for cut in 0..pages {
        let mut w = world(n);
        let first = session(&mut w, Some(cut));
        let applied = w.device.document_count().unwrap() as usize;
        assert_eq!(applied, first.whole, "cut after {cut} pages: every delivered document was applied");
        let second = session(&mut w, None);
        assert!(second.completed);
        assert_eq!(second.whole, n - applied, "cut after {cut} pages: nothing applied is sent again");
        // Documents sent whole hold their history: none of it comes again as changes (the
        // priority part's documents used to, after a cut in the rest).
        assert_eq!(second.changes, 0, "cut after {cut} pages: no history sent again as changes");
        assert_eq!(w.device.document_count().unwrap() as usize, n);
        let third = session(&mut w, None);
        assert_eq!((third.whole, third.changes), (0, 0), "cut after {cut} pages: then nothing to send");
    }
}

#[test]
fn a_purge_cut_before_it_was_applied_loses_no_change_when_the_patient_comes_back() {
    let mut w = world(3);
    assert!(session(&mut w, None).completed);
    // A feed adds an allergy to a patient the device holds; then the patient leaves the caseload
    // and the round that purges them is cut before its page is applied.
    let patient = w.server.patient_by_nhs(&w.patients[1]).unwrap().unwrap();
    let mut summary =
        care_node::summary::PatientSummary::load(&w.server.load_document(&patient).unwrap().unwrap())
            .unwrap();
    let identity = w.server.server_identity().unwrap();
    summary.set_actor(care_sync_server::server_actor(&identity).to_bytes());
    let before = summary.heads();
    let provenance = care_node::summary::Provenance::new("server", "gp", "gp-feed", 1);
    summary.add(&Allergy::new("Penicillin", provenance)).unwrap();
    w.server.apply_server_changes(&patient, &summary.changes_since(&before)).unwrap();
    w.server.caseload_remove(w.record.id, &patient).unwrap();
    let cut = session(&mut w, Some(0));
    assert!(!cut.completed);
    // Back in the caseload: the device still holds the old copy, and must get the allergy.
    w.server.caseload_add(w.record.id, &patient).unwrap();
    assert!(session(&mut w, None).completed);
    let mut held = w.device.find_by_nhs(&w.patients[1]).unwrap().expect("still on the device");
    let allergies: Vec<_> =
        held.summary.entries::<Allergy>().unwrap().into_iter().map(|a| a.data.substance).collect();
    assert!(allergies.iter().any(|s| s == "Penicillin"), "the feed's change arrived: {allergies:?}");
}

#[test]
fn a_round_cut_before_any_page_sends_everything_next_time() {
    let mut w = world(30);
    let first = session(&mut w, Some(0));
    assert_eq!(w.device.document_count().unwrap(), 0);
    assert_eq!(first.whole, 0);
    let second = session(&mut w, None);
    assert_eq!(second.whole, 30);
}

#[test]
fn an_upload_whose_ack_was_lost_is_not_applied_twice() {
    let mut w = world(5);
    assert!(session(&mut w, None).completed);
    let nhs = w.patients[2].clone();
    let entry = Allergy::new("Latex", w.device.provenance().unwrap());
    w.device.add_entry(&nhs, &entry).unwrap();

    // The server applies the upload, but the acknowledgement never reaches the device.
    let (_client, first) = SyncSession::start(&w.device).unwrap();
    let mut server = ServerSession::new(w.record.clone());
    let seq_before = w.server.max_seq().unwrap();
    for message in first {
        let done = matches!(message, ClientMessage::UploadDone);
        let _ = server.handle(wire(&message), &w.server, 1).unwrap();
        if done {
            break;
        }
    }
    assert_eq!(w.server.max_seq().unwrap(), seq_before + 1, "the change is durable on the server");
    assert_eq!(w.device.pending_count().unwrap(), 1, "the device still holds it, unacknowledged");

    let again = session(&mut w, None);
    assert!(again.completed);
    assert_eq!(w.server.max_seq().unwrap(), seq_before + 1, "uploading it again adds nothing");
    assert_eq!(w.device.pending_count().unwrap(), 0);
    assert_eq!(again.changes, 0, "the device is not sent its own change back");
}

#[test]
fn a_message_out_of_order_is_a_protocol_error() {
    let w = world(1);
    let mut server = ServerSession::new(w.record.clone());
    let err = server.handle(ClientMessage::UploadDone, &w.server, 1).unwrap_err();
    assert!(err.to_string().contains("unexpected UploadDone"), "{err}");
}

#[test]
fn pages_are_acknowledged_once_each_in_order_and_a_page_never_sent_is_a_protocol_error() {
    let w = world(40);
    let (_, first) = SyncSession::start(&w.device).unwrap();
    let mut server = ServerSession::new(w.record.clone());
    for message in first {
        server.handle(message, &w.server, 1).unwrap();
    }
    assert!(server.is_downloading());
    let not_sent = server.handle(ClientMessage::PageApplied { round: 1 }, &w.server, 1).unwrap_err();
    assert!(not_sent.to_string().contains("a page that was not sent"), "{not_sent}");

    let mut server = ServerSession::new(w.record.clone());
    let (_, first) = SyncSession::start(&w.device).unwrap();
    for message in first {
        server.handle(message, &w.server, 1).unwrap();
    }
    let Some(ServerMessage::Docs { round, .. }) = server.next_page(&w.server, 16 * 1024).unwrap() else {
        panic!("a page of documents");
    };
    let Some(ServerMessage::Docs { .. }) = server.next_page(&w.server, 16 * 1024).unwrap() else {
        panic!("a second page");
    };
    let unapplied = server.unapplied_bytes();
    assert!(unapplied > 16 * 1024, "two pages of whole documents unapplied: {unapplied}");
    let wrong_round = server.handle(ClientMessage::PageApplied { round: round + 1 }, &w.server, 1);
    assert!(wrong_round.is_err(), "a page of another round");
    server.handle(ClientMessage::PageApplied { round }, &w.server, 1).unwrap();
    assert!(server.unapplied_bytes() < unapplied && server.applied_bytes() > 0);
    server.handle(ClientMessage::PageApplied { round }, &w.server, 1).unwrap();
    assert_eq!(server.unapplied_bytes(), 0);
    assert!(
        server.handle(ClientMessage::PageApplied { round }, &w.server, 1).is_err(),
        "a third, never sent"
    );
}

#[test]
fn a_batch_over_the_configured_limits_ends_the_session_and_nothing_is_applied() {
    use care_sync_server::domain::limits::Limits;
    let mut w = world(3);
    assert!(session(&mut w, None).completed);
    // Two real entries, on two records the device may write to: acceptable but for the bound.
    for nhs in &w.patients[..2] {
        w.device.add_entry(nhs, &Allergy::new("Latex", w.device.provenance().unwrap())).unwrap();
    }
    let docs: Vec<_> = w
        .device
        .pending_changes(0, care_node::protocol::TARGET_BATCH_BYTES)
        .unwrap()
        .into_iter()
        .map(|c| care_node::protocol::DocChanges {
            doc: c.doc,
            changes: vec![serde_bytes::ByteBuf::from(c.change)],
        })
        .collect();
    assert_eq!(docs.len(), 2);
    let limits = Limits { upload_docs: 1, ..Limits::default() };
    let mut server = ServerSession::new(w.record.clone()).limited(limits);
    let cursor = w.device.sync_state().unwrap().cursor;
    let hello = ClientMessage::Hello { cursor, resume: None, staged_server_key: None, incarnation: None };
    server.handle(hello, &w.server, 1).unwrap();
    let seq = w.server.max_seq().unwrap();
    let err =
        server.handle(ClientMessage::Upload { through: 1, docs: docs.clone() }, &w.server, 1).unwrap_err();
    assert!(err.to_string().contains("at most 1 documents"), "{err}");
    assert_eq!(w.server.max_seq().unwrap(), seq, "neither entry was applied");
    // Within the bounds the same batch is applied: the refusal was the bound's.
    let mut server = ServerSession::new(w.record.clone());
    let hello = ClientMessage::Hello { cursor, resume: None, staged_server_key: None, incarnation: None };
    server.handle(hello, &w.server, 1).unwrap();
    server.handle(ClientMessage::Upload { through: 1, docs }, &w.server, 1).unwrap();
    assert_eq!(w.server.max_seq().unwrap(), seq + 2);
}

#[test]
fn a_resend_after_a_lost_ack_never_refuses_what_the_server_already_has() {
    let mut w = world(5);
    assert!(session(&mut w, None).completed);
    let nhs = w.patients[2].clone();
    w.device.add_entry(&nhs, &Allergy::new("Latex", w.device.provenance().unwrap())).unwrap();
    // The server applies the upload, but the acknowledgement never reaches the device.
    let (_client, first) = SyncSession::start(&w.device).unwrap();
    let mut server = ServerSession::new(w.record.clone());
    for message in first {
        let done = matches!(message, ClientMessage::UploadDone);
        let _ = server.handle(wire(&message), &w.server, 1).unwrap();
        if done {
            break;
        }
    }
    // Meanwhile the patient leaves the device's caseload, and the crew records a second entry.
    let patient = w.server.patient_by_nhs(&nhs).unwrap().unwrap();
    w.server.caseload_remove(w.record.id, &patient).unwrap();
    w.device.add_entry(&nhs, &Allergy::new("Penicillin", w.device.provenance().unwrap())).unwrap();
    assert_eq!(w.device.pending_count().unwrap(), 2);

    // The resend holds both: only the new one is refused; the accepted one stays accepted.
    let again = session(&mut w, None);
    assert!(again.completed);
    assert_eq!(w.device.pending_count().unwrap(), 0);
    let diverged = w.device.diverged().unwrap();
    assert_eq!((diverged.len(), diverged[0].changes, diverged[0].rule.as_str()), (1, 1, "not-in-scope"));
    let mut on_server =
        care_node::summary::PatientSummary::load(&w.server.load_document(&patient).unwrap().unwrap())
            .unwrap();
    let substances: Vec<String> =
        on_server.entries::<Allergy>().unwrap().into_iter().map(|a| a.data.substance).collect();
    assert!(
        substances.contains(&"Latex".to_string()) && !substances.contains(&"Penicillin".to_string()),
        "{substances:?}"
    );
}

#[test]
fn past_the_quarantine_limit_a_device_s_uploads_are_refused_whole() {
    use care_sync_server::domain::limits::Limits;
    let mut w = world(2);
    assert!(session(&mut w, None).completed);
    let patient = w.server.patient_by_nhs(&w.patients[0]).unwrap().unwrap();
    // A change no well-behaved device makes (a merge by document content), forged on its copy.
    let forge = |w: &World| {
        let mut held = w.device.get(&patient).unwrap().unwrap();
        held.summary.set_actor(&w.device.identity().unwrap().public_key());
        let before = held.summary.heads();
        held.summary.mark_merged_into(uuid::Uuid::new_v4(), 0).unwrap();
        let change = held.summary.changes_since(&before).remove(0);
        care_node::protocol::DocChanges {
            doc: patient,
            changes: vec![serde_bytes::ByteBuf::from(change.raw_bytes().to_vec())],
        }
    };
    let limits = Limits { quarantine_per_device: 1, ..Limits::default() };
    let mut server = ServerSession::new(w.record.clone()).limited(limits);
    let hello = ClientMessage::Hello { cursor: 0, resume: None, staged_server_key: None, incarnation: None };
    server.handle(hello, &w.server, 1).unwrap();
    let first =
        server.handle(ClientMessage::Upload { through: 1, docs: vec![forge(&w)] }, &w.server, 1).unwrap();
    assert!(matches!(&first[0], ServerMessage::UploadAck { refused, .. } if refused[0].rule == "identity"));
    let err =
        server.handle(ClientMessage::Upload { through: 2, docs: vec![forge(&w)] }, &w.server, 1).unwrap_err();
    assert!(err.to_string().contains("too many refused changes"), "{err}");
    assert_eq!(w.server.quarantined(None).unwrap().len(), 1, "the second was not even quarantined");
}

/// A live session past its first round: the device watching, the server waiting for changes.
fn watching(w: &mut World) -> (SyncSession, ServerSession) {
    let (mut client, first) = SyncSession::start_watching(&w.device).unwrap();
    let mut server = ServerSession::new(w.record.clone());
    let mut to_server: VecDeque<ClientMessage> = first.into();
    while !server.is_watching() {
        while let Some(message) = to_server.pop_front() {
            for reply in server.handle(wire(&message), &w.server, 1).unwrap() {
                to_server.extend({
                    let now = w.device.now();
                    client.handle(wire(&reply), &mut w.device, now).unwrap()
                });
            }
        }
        while let Some(page) = server.next_page(&w.server, care_node::protocol::TARGET_BATCH_BYTES).unwrap() {
            to_server.extend({
                let now = w.device.now();
                client.handle(wire(&page), &mut w.device, now).unwrap()
            });
        }
    }
    (client, server)
}

/// A patient of the world's population not on the device's caseload (`had`: the world's size).
fn one_more_patient(w: &World, had: usize) -> care_node::summary::PatientId {
    let identity = w.server.server_identity().unwrap();
    let mut population = Population::new(3, care_sync_server::server_actor(&identity));
    let mut next = (0..=had).map(|_| population.next_patient(0).unwrap()).last().unwrap();
    w.server.insert_patients(std::slice::from_mut(&mut next)).unwrap()[0]
}

/// A change written by the server's actor (as a feed would) to `patient`'s document.
fn server_change(w: &World, patient: &care_node::summary::PatientId, substance: &str) {
    let identity = w.server.server_identity().unwrap();
    let mut doc =
        care_node::summary::PatientSummary::load(&w.server.load_document(patient).unwrap().unwrap()).unwrap();
    doc.set_actor(care_sync_server::server_actor(&identity).to_bytes());
    let before = doc.heads();
    let by = care_node::summary::Provenance::new("server", "GP record", "gp-feed", 1);
    doc.add(&Allergy::new(substance, by)).unwrap();
    w.server.apply_server_changes(patient, &doc.changes_since(&before)).unwrap();
}

#[test]
fn a_live_session_plans_a_round_only_when_what_moved_can_concern_its_device() {
    use care_sync_server::session::StoreMoved;
    let mut w = world(2);
    let elsewhere = one_more_patient(&w, 2);
    let (_client, mut server) = watching(&mut w);
    let mut seen = StoreMoved::read(&w.server, 0).unwrap();

    // A change to a patient the device does not hold: no round is planned at all.
    server_change(&w, &elsewhere, "Latex");
    let moved = StoreMoved::read(&w.server, seen.seq).unwrap();
    assert!(moved.docs.contains(&elsewhere));
    assert!(!server.live_round(&w.server, &moved, 2).unwrap());
    assert_eq!(server.rounds_planned(), 0, "a change elsewhere in the region costs this device nothing");
    seen = moved;

    // A scope input moves but the device's scope does not (a consent flag of a patient it does
    // not hold): planned once, nothing to send, and what follows is looked at against it.
    let flags = care_sync_server::store::ConsentFlags { objection: true, opt_out: false };
    w.server.set_consent(&elsewhere, flags).unwrap();
    let moved = StoreMoved::read(&w.server, seen.seq).unwrap();
    assert!(!server.live_round(&w.server, &moved, 2).unwrap());
    assert_eq!(server.rounds_planned(), 1);
    seen = moved;
    server_change(&w, &elsewhere, "Nuts");
    let moved = StoreMoved::read(&w.server, seen.seq).unwrap();
    assert!(!server.live_round(&w.server, &moved, 2).unwrap());
    assert_eq!(server.rounds_planned(), 1, "an empty round leaves a view the next change is checked against");
    seen = moved;

    // A change to one it holds: planned, and something to send.
    let held = w.server.patient_by_nhs(&w.patients[0]).unwrap().unwrap();
    server_change(&w, &held, "Penicillin");
    let moved = StoreMoved::read(&w.server, seen.seq).unwrap();
    assert!(server.live_round(&w.server, &moved, 3).unwrap());
    assert_eq!(server.rounds_planned(), 2);

    // A note that does not follow on from what the session saw (one missed) plans, to be safe;
    // so does a scope input moving with no change at all (a caseload added).
    let mut w2 = world(1);
    let (_c, mut s2) = watching(&mut w2);
    // Nothing of the device's in it, the same epoch: only the gap (a note after `seen + 1`) can plan.
    let now = StoreMoved::read(&w2.server, 0).unwrap();
    let gap = StoreMoved { after: now.seq + 1, seq: now.seq + 2, docs: Default::default(), ..now };
    let _ = s2.live_round(&w2.server, &gap, 2).unwrap();
    assert_eq!(s2.rounds_planned(), 1, "a gap in the notes plans a round");
    let mut w3 = world(1);
    let newcomer = one_more_patient(&w3, 1);
    let (_c, mut s3) = watching(&mut w3);
    let before = StoreMoved::read(&w3.server, 0).unwrap();
    w3.server.caseload_add(w3.record.id, &newcomer).unwrap();
    let moved = StoreMoved::read(&w3.server, before.seq).unwrap();
    assert_ne!(moved.scope_epoch, before.scope_epoch);
    assert!(s3.live_round(&w3.server, &moved, 2).unwrap(), "the new caseload patient is pushed");
}

/// A live round of changes only is made from the entries the watcher's look carried (no read of
/// the store per session); the same round read from the store, as when there were too many
/// entries to carry, sends the same pages: the changes of the documents the device holds, and
/// nothing of the one it does not.
#[test]
fn a_live_round_made_from_the_carried_entries_sends_what_one_read_from_the_store_sends() {
    use care_sync_server::session::StoreMoved;
    let mut w = world(2);
    let elsewhere = one_more_patient(&w, 2);
    // Two sessions of the device in the same state (the second supersedes the first for writes,
    // which a round of changes only does not make before it is acknowledged).
    let (_c1, mut carried) = watching(&mut w);
    let (_c2, mut read) = watching(&mut w);
    let seen = StoreMoved::read(&w.server, 0).unwrap();
    let held = w.server.patient_by_nhs(&w.patients[0]).unwrap().unwrap();
    server_change(&w, &elsewhere, "Latex");
    server_change(&w, &held, "Penicillin");
    server_change(&w, &held, "Nuts");
    let moved = StoreMoved::read(&w.server, seen.seq).unwrap();
    assert_eq!(moved.entries.as_ref().map(|e| e.len()), Some(3), "the look carries the entries");
    let uncarried = StoreMoved { entries: None, ..moved.clone() };
    assert!(carried.live_round(&w.server, &moved, 2).unwrap());
    assert!(read.live_round(&w.server, &uncarried, 2).unwrap());
    let pages = |s: &mut ServerSession| {
        std::iter::from_fn(|| s.next_page(&w.server, care_node::protocol::TARGET_BATCH_BYTES).unwrap())
            .collect::<Vec<_>>()
    };
    let (from_entries, from_store) = (pages(&mut carried), pages(&mut read));
    assert_eq!(from_entries, from_store);
    let ServerMessage::Docs { items, .. } = &from_entries[0] else { panic!("a page first") };
    assert_eq!(items.len(), 1, "only the held document");
    assert!(matches!(&items[0].body, DocBody::Changes(c) if c.len() == 2));
}

/// What a clinician is shown of a record: its entries' lines (sorted), its demographics, its heads.
type Shown = (Vec<(&'static str, String, String)>, care_node::summary::Listing, Vec<automerge::ChangeHash>);

fn shown(summary: &mut care_node::summary::PatientSummary) -> Shown {
    let mut lines: Vec<_> = summary
        .entry_lines()
        .unwrap()
        .into_iter()
        .map(|(section, id, line)| (section.key(), id.to_string(), line))
        .collect();
    lines.sort();
    (lines, summary.listing().unwrap(), summary.heads())
}

/// Every patient as the device opens it, and as the server's own document reads.
fn held_and_served(w: &World) -> Vec<(Shown, Shown)> {
    w.patients
        .iter()
        .map(|nhs| {
            let id = w.server.patient_by_nhs(nhs).unwrap().unwrap();
            let saved = w.server.load_document(&id).unwrap().unwrap();
            let mut served = care_node::summary::PatientSummary::load(&saved).unwrap();
            let mut held = w.device.find_by_nhs(nhs).unwrap().expect("held").summary;
            (shown(&mut held), shown(&mut served))
        })
        .collect()
}

#[test]
fn a_cold_sync_stores_documents_unparsed_and_each_opens_as_the_servers_own_reads() {
    let mut w = world(300);
    // Some with a history of changes after they were first saved.
    for nhs in w.patients.iter().step_by(7) {
        let id = w.server.patient_by_nhs(nhs).unwrap().unwrap();
        let mut summary =
            care_node::summary::PatientSummary::load(&w.server.load_document(&id).unwrap().unwrap()).unwrap();
        summary.set_actor(&[3; 32]);
        let before = summary.heads();
        for i in 0..20 {
            summary
                .add(&Allergy::new(
                    &format!("substance {i}"),
                    care_node::summary::Provenance::new("gp", "GP", "gp", i),
                ))
                .unwrap();
        }
        w.server.apply_server_changes(&id, &summary.changes_since(&before)).unwrap();
    }
    let sent = session(&mut w, None);
    assert!(sent.completed);
    assert_eq!((sent.whole, sent.listed), (300, 300), "every document came with its listing");
    for (held, served) in held_and_served(&w) {
        assert_eq!(held, served);
    }
    let cards = w.device.list().unwrap();
    assert_eq!(cards.len(), 300);
    for card in cards {
        let saved = w.server.load_document(&card.patient_id).unwrap().unwrap();
        let listing = care_node::summary::PatientSummary::load(&saved).unwrap().listing().unwrap();
        assert_eq!(
            (card.nhs_number, card.name, card.date_of_birth, card.postcode),
            (listing.nhs_number, listing.name, listing.date_of_birth, listing.postcode)
        );
    }
}

#[test]
fn documents_saved_before_listings_were_recorded_are_sent_without_and_parsed_on_receipt() {
    let mut w = world(60);
    // A store written by the release before listings: the column is there, empty.
    let db = rusqlite::Connection::open(w._dirs.0.path().join("server.db")).unwrap();
    db.execute("UPDATE patients SET listing = NULL", []).unwrap();
    let sent = session(&mut w, None);
    assert!(sent.completed);
    assert_eq!((sent.whole, sent.listed), (60, 0));
    for (held, served) in held_and_served(&w) {
        assert_eq!(held, served);
    }
}
