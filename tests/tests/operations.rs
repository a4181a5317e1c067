//! Operating a server: rotating its key without re-enrolling devices, and restoring a backup that
//! devices keep syncing with.

use care_node::client::ClientError;
use care_sync_e2e::{TestDevice, TestServer, within};
use care_sync_server::operator::ops;
use care_sync_server::store::Role;
use care_sync_server::store::sqlite::backup;

#[tokio::test(flavor = "multi_thread")]
async fn a_server_key_rotation_keeps_devices_that_synced_and_tells_the_rest_to_re_enrol() {
    let mut server = TestServer::start(4).await;
    let mut early = TestDevice::enrolled(&server, "ambulance-1", Role::AmbulanceCrew).await;
    let mut late = TestDevice::enrolled(&server, "ambulance-2", Role::AmbulanceCrew).await;
    server.caseload("ambulance-1", [0, 1]);
    server.caseload("ambulance-2", [2]);
    within(30, early.sync()).await.unwrap();
    within(30, late.sync()).await.unwrap();
    let old_key = server.store.server_identity().unwrap().public_key();

    // Stage: the next sync of `early` learns the next key; `late` stays away.
    let next = ops::stage_server_key(server.store.as_ref()).unwrap();
    assert_eq!(
        server.store.devices_without_staged_key().unwrap(),
        vec!["ambulance-1".to_string(), "ambulance-2".to_string()]
    );
    within(30, early.sync()).await.unwrap();
    assert!(early.store.staged_server_key().unwrap().is_some());
    assert_eq!(server.store.devices_without_staged_key().unwrap(), vec!["ambulance-2".to_string()]);

    // Activation is refused while a device would be locked out, unless forced.
    let err = ops::activate_server_key(server.store.as_ref(), false).unwrap_err();
    assert!(err.to_string().contains("ambulance-2"), "{err}");
    assert_eq!(ops::activate_server_key(server.store.as_ref(), true).unwrap(), next);

    // Between activation and restart the server still presents the old key, and syncs still
    // work: the device keeps both pins.
    within(30, early.sync()).await.unwrap();
    assert_eq!(early.store.require_enrolment().unwrap().server_key, old_key);

    server.restart().await;
    within(30, early.sync()).await.expect("a device that learnt the key syncs after the rotation");
    let enrolment = early.store.require_enrolment().unwrap();
    assert_ne!(enrolment.server_key, old_key, "the device now pins the new key only");
    assert_eq!(care_node::identity::fingerprint(&enrolment.server_key), next);
    assert_eq!(early.store.staged_server_key().unwrap(), None);
    within(30, early.sync()).await.unwrap();

    let err = within(30, late.sync()).await.unwrap_err();
    assert!(matches!(err, ClientError::ServerKeyMismatch), "{err:?}");
    let audit = server.store.audit_entries(&Default::default()).unwrap();
    assert!(audit.iter().any(|a| a.action == "server-key-staged"));
    assert!(audit.iter().any(|a| a.action == "server-key-activated" && a.detail.contains("1 device(s)")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restored_backup_is_the_same_server_to_its_devices_and_they_give_back_what_it_lost() {
    let mut server = TestServer::start(5).await;
    let mut crew = TestDevice::enrolled(&server, "ambulance-1", Role::AmbulanceCrew).await;
    let mut nurse = TestDevice::enrolled(&server, "nurse-1", Role::CommunityNurse).await;
    server.caseload("ambulance-1", [0, 1, 2]);
    server.caseload("nurse-1", [1]);
    within(30, crew.sync()).await.unwrap();
    within(30, nurse.sync()).await.unwrap();
    let nhs = server.patients[1].clone();
    crew.add_allergy(&nhs, "Latex");
    within(30, crew.sync()).await.unwrap();

    // Online backup while the server runs.
    let spare = tempfile::tempdir().unwrap();
    let file = spare.path().join("nightly.db");
    let report = backup::backup(server.data_dir(), &file).unwrap();
    assert_eq!((report.patients, report.devices), (5, 2));

    // After the backup the crew records more, and the server acknowledges it.
    crew.add_allergy(&nhs, "Penicillin");
    within(30, crew.sync()).await.unwrap();
    assert_eq!(crew.store.pending_count().unwrap(), 0, "acknowledged");

    // Disaster: the server and its disk are gone; restore the older backup into a new directory.
    let addr = server.addr;
    server.stop().await;
    drop(server);
    let restored = tempfile::tempdir().unwrap();
    backup::restore(&file, restored.path(), false, "ops-on-call").unwrap();
    let server = TestServer::open(restored, addr).await;
    let allergies = |server: &TestServer| -> Vec<String> {
        let id = server.store.patient_by_nhs(&nhs).unwrap().unwrap();
        let saved = server.store.load_document(&id).unwrap().unwrap();
        let mut summary = care_node::summary::PatientSummary::load(&saved).unwrap();
        let entries = summary.entries::<care_node::summary::Allergy>().unwrap();
        entries.into_iter().map(|a| a.data.substance).collect()
    };
    let lost = allergies(&server);
    assert!(lost.contains(&"Latex".to_string()) && !lost.contains(&"Penicillin".to_string()));

    // The crew's next sync (same pinned key: no re-enrolment) gives the server back what it lost.
    within(30, crew.sync()).await.expect("the device syncs with the restored server");
    let back = allergies(&server);
    assert!(
        back.contains(&"Penicillin".to_string()),
        "the restored server got the lost entry back: {back:?}"
    );
    assert_eq!(back.len(), lost.len() + 1, "nothing duplicated: {back:?}");
    // And the nurse, who synced with the old incarnation too, resyncs and sees it.
    within(30, nurse.sync()).await.unwrap();
    assert!(nurse.allergies(&nhs).contains(&"Penicillin".to_string()));
    // A later sync is an ordinary one again.
    let report = within(30, crew.sync()).await.unwrap();
    assert_eq!((report.stats.documents_received, report.stats.uploaded_changes), (0, 0));
    let audit = server.store.audit_entries(&Default::default()).unwrap();
    assert!(audit.iter().any(|a| a.action == "restored"));
}
