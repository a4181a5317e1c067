//! End-to-end scenarios of the walking skeleton: a real server and real devices, on the
//! socket-free pair; the handshake's refusals, malformed frames, reconnect bytes and key pinning
//! over real QUIC.

use care_node::client::{ClientError, DeviceConnection};
use care_node::crypto::CryptoError;
use care_node::protocol::{ClientMessage, DocChanges, ServerMessage};
use care_node::store::{DeviceStore, Enrolment, StoreError};
use care_node::summary::Allergy;
use care_sync_e2e::{PASSPHRASE, TestDevice, TestServer, cheap_wrapper, contains, within};
use care_sync_server::operator::ops;
use care_sync_server::store::Role;

#[tokio::test(flavor = "multi_thread")]
async fn crew_reads_a_caseload_patient_after_enrolling_and_syncing() {
    let server = TestServer::in_memory(20);
    let mut crew = TestDevice::enrolled(&server, "ambulance-7", Role::AmbulanceCrew).await;
    server.caseload("ambulance-7", [0, 3, 5]);
    let report = within(30, crew.sync()).await.expect("sync");
    assert_eq!(report.stats.documents_received, 3);
    assert_eq!(crew.store.document_count().unwrap(), 3);
    let patient = crew.store.find_by_nhs(&server.patients[3]).unwrap().expect("patient 3 on the device");
    assert_eq!(patient.summary.nhs_number().unwrap(), server.patients[3]);
    assert!(crew.store.sync_state().unwrap().last_sync_ms.is_some(), "the view can say when it last synced");
    // Exactly the caseload: a patient not on it is not on the device.
    assert!(crew.store.find_by_nhs(&server.patients[1]).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_offline_entries_on_two_devices_both_survive() {
    let mut server = TestServer::in_memory(10);
    let mut crew = TestDevice::enrolled(&server, "ambulance-1", Role::AmbulanceCrew).await;
    let mut nurse = TestDevice::enrolled(&server, "nurse-1", Role::CommunityNurse).await;
    server.caseload("ambulance-1", [0, 1]);
    server.caseload("nurse-1", [1, 2]);
    within(30, crew.sync()).await.unwrap();
    within(30, nurse.sync()).await.unwrap();

    server.stop().await;
    let shared = server.patients[1].clone();
    let before = crew.allergies(&shared).len();
    crew.add_allergy(&shared, "Chlorhexidine");
    nurse.add_allergy(&shared, "Latex");
    nurse.add_allergy(&shared, "Codeine");
    // Offline, a sync fails clearly and loses nothing.
    let offline = within(60, crew.sync()).await.expect_err("no server to sync with");
    assert!(
        matches!(offline, ClientError::Unreachable(_) | ClientError::Timeout(_)),
        "a clear 'cannot reach the server', not {offline:?}"
    );
    assert_eq!(crew.store.pending_count().unwrap(), 1, "the offline entry is still queued");
    assert_eq!(crew.allergies(&shared).len(), before + 1, "and still shown");

    server.restart().await;
    within(30, crew.sync()).await.unwrap();
    let nurse_report = within(30, nurse.sync()).await.unwrap();
    assert_eq!(nurse_report.stats.uploaded_changes, 2);
    assert_eq!(nurse_report.stats.changes_received, 1, "the nurse receives only the crew's change");
    within(30, crew.sync()).await.unwrap();

    let on_crew = crew.allergies(&shared);
    let on_nurse = nurse.allergies(&shared);
    assert_eq!(on_crew.len(), before + 3);
    assert_eq!(on_crew, on_nurse, "replicas converge");
    for substance in ["Chlorhexidine", "Latex", "Codeine"] {
        assert!(on_crew.iter().any(|s| s == substance), "{substance} survived");
    }
    assert_eq!(crew.store.pending_count().unwrap(), 0);
    assert_eq!(nurse.store.pending_count().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn unenrolled_and_revoked_keys_are_refused_in_the_handshake() {
    let server = TestServer::start(3).await;
    // A device that claims an enrolment the server never made.
    let stranger = TestDevice::new("stranger");
    let server_key = server.store.server_identity().unwrap().public_key();
    stranger
        .store
        .set_enrolment(&Enrolment {
            server_addr: server.addr.to_string(),
            server_key,
            device_name: "stranger".into(),
            role: "ambulance-crew".into(),
            enrolled_at_ms: 0,
        })
        .unwrap();
    let mut stranger = stranger;
    let err = within(30, stranger.sync()).await.unwrap_err();
    assert!(matches!(err, ClientError::DeviceRefused), "got {err:?}");

    let mut crew = TestDevice::enrolled(&server, "ambulance-2", Role::AmbulanceCrew).await;
    within(30, crew.sync()).await.expect("enrolled device syncs");
    ops::revoke(server.store.as_ref(), "ambulance-2").unwrap();
    let err = within(30, crew.sync()).await.unwrap_err();
    assert!(matches!(err, ClientError::DeviceRefused), "got {err:?}");
    assert!(err.to_string().contains("revoked"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_works_once_and_expires() {
    let server = TestServer::in_memory(1);
    let token = server.token("nurse-9", Role::CommunityNurse);
    let mut first = TestDevice::new("first");
    within(30, first.enrol(&server, &token)).await.expect("first use works");
    let mut second = TestDevice::new("second");
    let err = within(30, second.enrol(&server, &token)).await.unwrap_err();
    assert!(err.to_string().contains("already used"), "got {err}");
    assert!(second.store.enrolment().unwrap().is_none());

    let expiring = ops::issue_token(
        server.store.as_ref(),
        "nurse-10",
        Role::CommunityNurse,
        server.addr,
        std::time::Duration::ZERO,
    )
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let mut late = TestDevice::new("late");
    let err = within(30, late.enrol(&server, &expiring)).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "got {err}");

    let err = within(30, late.enrol(&server, "care-enrol1.garbage")).await.unwrap_err();
    assert!(matches!(err, ClientError::Token(_)), "got {err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_device_store_never_holds_identifiable_data_in_plaintext() {
    let server = TestServer::in_memory(30);
    let mut crew = TestDevice::enrolled(&server, "ambulance-3", Role::AmbulanceCrew).await;
    server.caseload("ambulance-3", 0..30);
    within(30, crew.sync()).await.unwrap();
    crew.add_allergy(&server.patients[0], "Chlorhexidine");
    let raw = crew.raw_bytes();
    assert!(raw.len() > 30 * 1000, "the store really holds the documents");
    for card in crew.store.list().unwrap() {
        assert!(!contains(&raw, card.nhs_number.unwrap().as_bytes()), "an NHS number is in plaintext");
        assert!(!contains(&raw, card.name.as_bytes()), "a name is in plaintext");
        assert!(!contains(&raw, card.date_of_birth.unwrap().as_bytes()), "a date of birth is in plaintext");
    }
    assert!(!contains(&raw, b"Chlorhexidine"));
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_passphrase_tampering_and_swapped_rows_are_clear_errors() {
    let server = TestServer::in_memory(5);
    let mut crew = TestDevice::enrolled(&server, "ambulance-4", Role::AmbulanceCrew).await;
    server.caseload("ambulance-4", [0, 1]);
    within(30, crew.sync()).await.unwrap();
    let (a, b) = (server.patients[0].clone(), server.patients[1].clone());

    let err = DeviceStore::open(&crew.path, &cheap_wrapper("not the passphrase")).unwrap_err();
    assert!(matches!(err, StoreError::Key(CryptoError::WrongPassphrase)), "got {err:?}");

    // Swap the two documents' sealed bodies: each row's binding no longer matches.
    let conn = crew.store.connection();
    conn.execute_batch(
        "CREATE TEMP TABLE saved AS SELECT rowid AS r, body FROM documents;
         UPDATE documents SET body = (SELECT body FROM saved WHERE r != documents.rowid LIMIT 1);",
    )
    .unwrap();
    let err = crew.store.find_by_nhs(&a).expect_err("swapped row refused");
    assert!(matches!(err, StoreError::Tampered { .. }), "got {err:?}");
    assert!(!err.to_string().contains(a.as_str()));
    // Swap back, then flip one byte of a ciphertext.
    conn.execute_batch("UPDATE documents SET body = (SELECT body FROM saved WHERE r = documents.rowid);")
        .unwrap();
    assert!(crew.store.find_by_nhs(&a).unwrap().is_some());
    // Swap only the NHS-number lookup column of the two rows (ciphertexts untouched): patient a's
    // number would find b's record, but the lookups are bound into each row's associated data.
    conn.execute_batch(
        "CREATE TEMP TABLE lookups AS SELECT rowid AS r, nhs_key FROM documents;
         UPDATE documents SET nhs_key = x'00' || nhs_key;
         UPDATE documents SET nhs_key = (SELECT nhs_key FROM lookups WHERE r != documents.rowid LIMIT 1);",
    )
    .unwrap();
    let err = crew.store.find_by_nhs(&a).expect_err("a swapped lookup is refused, never b's record");
    assert!(matches!(err, StoreError::Tampered { .. }), "got {err:?}");
    assert!(
        matches!(crew.store.find_by_nhs(&b), Err(StoreError::Tampered { .. })),
        "so an entry cannot land on a"
    );
    conn.execute_batch(
        "UPDATE documents SET nhs_key = x'00' || nhs_key;
         UPDATE documents SET nhs_key = (SELECT nhs_key FROM lookups WHERE r = documents.rowid);",
    )
    .unwrap();
    assert!(crew.store.find_by_nhs(&a).unwrap().is_some());
    // Rollback: keep a copy of a's row, record an allergy (the row moves to a new version), then
    // put the old row back. Each version authenticates on its own; the store no longer adds up.
    conn.execute_batch("CREATE TEMP TABLE old_rows AS SELECT * FROM documents;").unwrap();
    let p = crew.store.provenance().unwrap();
    crew.store.add_entry(&a, &care_node::summary::Allergy::new("Latex", p)).unwrap();
    let conn = crew.store.connection();
    conn.execute_batch("DELETE FROM documents; INSERT INTO documents SELECT * FROM old_rows;").unwrap();
    let err =
        DeviceStore::open(&crew.path, &cheap_wrapper(PASSPHRASE)).expect_err("a rolled-back row is refused");
    assert!(
        matches!(err, StoreError::Tampered { .. }) && err.to_string().contains("rolled back"),
        "got {err:?}"
    );
    let (rowid, mut body): (i64, Vec<u8>) = conn
        .query_row("SELECT rowid, body FROM documents ORDER BY rowid LIMIT 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    body[40] ^= 1;
    conn.execute("UPDATE documents SET body = ?1 WHERE rowid = ?2", (body, rowid)).unwrap();
    let results = [crew.store.find_by_nhs(&a).err(), crew.store.find_by_nhs(&b).err()];
    assert!(
        results.iter().flatten().any(|e| matches!(e, StoreError::Tampered { .. })),
        "a flipped byte is detected"
    );
    // A file that is not a store at all.
    let junk = crew.path.with_file_name("junk.db");
    std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
    let err = DeviceStore::open(&junk, &cheap_wrapper(PASSPHRASE)).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore), "got {err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_cannot_upload_changes_authored_by_another_device() {
    let server = TestServer::in_memory(3);
    let mut crew = TestDevice::enrolled(&server, "ambulance-5", Role::AmbulanceCrew).await;
    let nurse = TestDevice::enrolled(&server, "nurse-5", Role::CommunityNurse).await;
    server.caseload("ambulance-5", [0]);
    within(30, crew.sync()).await.unwrap();
    let nhs = server.patients[0].clone();

    // Forge a change in the nurse's name (her key as actor) and upload it over the crew's session.
    let mut patient = crew.store.find_by_nhs(&nhs).unwrap().unwrap();
    let patient_id = patient.summary.patient_id().unwrap();
    patient.summary.set_actor(&nurse.store.identity().unwrap().public_key());
    patient.summary.add(&Allergy::new("Forged", nurse.store.provenance().unwrap())).unwrap();
    let forged = patient.summary.last_local_change().unwrap().raw_bytes().to_vec();

    let mut conn = care_sync_e2e::welcomed(&crew).await;
    let upload = ClientMessage::Upload {
        through: 1,
        docs: vec![DocChanges { doc: patient_id, changes: vec![serde_bytes::ByteBuf::from(forged)] }],
    };
    conn.send(&upload).await.unwrap();
    match within(30, conn.recv()).await {
        Ok(Some(ServerMessage::UploadAck { refused, .. })) => {
            assert_eq!(refused.len(), 1);
            assert_eq!(refused[0].rule, "foreign-actor");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let saved = server.store.load_document(&patient_id).unwrap().unwrap();
    let mut on_server = care_node::summary::PatientSummary::load(&saved).unwrap();
    assert!(on_server.entries::<Allergy>().unwrap().iter().all(|e| e.data.substance != "Forged"));
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_oversized_frames_close_only_that_connection() {
    let server = TestServer::start(40).await;
    let mut good = TestDevice::enrolled(&server, "nurse-good", Role::CommunityNurse).await;
    let bad = TestDevice::enrolled(&server, "ambulance-bad", Role::AmbulanceCrew).await;
    server.caseload("nurse-good", 0..40);

    for (raw, expected) in [
        (vec![0, 0, 0, 4, care_node::protocol::PROTOCOL_VERSION, 0xff, 0xff, 0xff], "not a valid message"),
        (vec![0xff, 0xff, 0xff, 0xff], "exceeds the limit"),
        (vec![0, 0, 0, 2, 9, 0], "protocol version 9"),
    ] {
        let mut conn = within(30, DeviceConnection::open(&bad.store)).await.unwrap();
        let (abuse, sync) = tokio::join!(
            async {
                conn.send_raw(&raw).await.unwrap();
                within(30, conn.recv()).await
            },
            good.sync()
        );
        let err = abuse.expect_err("the server closes the abusive connection");
        assert!(err.to_string().contains(expected), "expected `{expected}` in `{err}`");
        sync.expect("the other device keeps syncing");
    }
    assert_eq!(good.store.document_count().unwrap(), 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_patient_leaving_the_caseload_is_purged_and_returns_only_on_re_entry() {
    let server = TestServer::in_memory(4);
    let mut nurse = TestDevice::enrolled(&server, "nurse-6", Role::CommunityNurse).await;
    server.caseload("nurse-6", [0, 1]);
    within(30, nurse.sync()).await.unwrap();
    let leaving = server.patients[1].clone();
    assert!(nurse.store.find_by_nhs(&leaving).unwrap().is_some());

    ops::caseload_remove(server.store.as_ref(), "nurse-6", leaving.as_str()).unwrap();
    let report = within(30, nurse.sync()).await.unwrap();
    assert_eq!(report.stats.documents_purged, 1);
    assert!(nurse.store.find_by_nhs(&leaving).unwrap().is_none());
    let report = within(30, nurse.sync()).await.unwrap();
    assert_eq!(report.stats.documents_received, 0, "it does not come back by itself");
    assert!(nurse.store.find_by_nhs(&leaving).unwrap().is_none());

    server.caseload("nurse-6", [1]);
    within(30, nurse.sync()).await.unwrap();
    assert!(nurse.store.find_by_nhs(&leaving).unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnecting_with_nothing_changed_costs_a_few_hundred_bytes() {
    let server = TestServer::start(200).await;
    let mut crew = TestDevice::enrolled(&server, "ambulance-8", Role::AmbulanceCrew).await;
    server.caseload("ambulance-8", 0..200);
    let cold = within(30, crew.sync()).await.unwrap();
    assert_eq!(cold.stats.documents_received, 200);
    let again = within(30, crew.sync()).await.unwrap();
    assert_eq!(again.stats.documents_received + again.stats.changes_received, 0);
    assert!(again.frame_bytes() < 300, "reconnect moved {} frame bytes", again.frame_bytes());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_refuses_a_server_whose_key_it_did_not_pin() {
    let server = TestServer::start(2).await;
    let impostor = TestServer::start(2).await;
    let mut crew = TestDevice::enrolled(&server, "ambulance-9", Role::AmbulanceCrew).await;
    crew.store.update_server_addr(&impostor.addr.to_string()).unwrap();
    let err = within(30, crew.sync()).await.unwrap_err();
    assert!(matches!(err, ClientError::ServerKeyMismatch), "got {err:?}");
    crew.store.update_server_addr(&server.addr.to_string()).unwrap();
    within(30, crew.sync()).await.expect("the real server is accepted");
}
