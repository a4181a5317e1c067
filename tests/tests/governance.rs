//! Who gets what, end to end: scopes, budgets, consent, break glass, wipe, lease, view audit,
//! planning exports. On the socket-free pair (`TestServer::in_memory`); the live grant lapse also
//! over QUIC, where the transport wakes the session.

use care_node::client::ClientError;
use care_node::protocol::{AccessKind, ClientMessage, ServerMessage};
use care_node::store::{DeviceStore, StoreError};
use care_node::sync::AccessRequest;
use care_node::viewlog::{SignedView, ViewEntry};
use care_sync_e2e::{PASSPHRASE, TestDevice, TestServer, cheap_wrapper, contains, within};
use care_sync_server::operator::ops;
use care_sync_server::store::{AuditFilter, Role};

#[tokio::test(flavor = "multi_thread")]
async fn an_out_of_scope_patient_never_reaches_a_device() {
    let server = TestServer::in_memory(12);
    let mut nurse = TestDevice::enrolled(&server, "nurse-1", Role::CommunityNurse).await;
    server.caseload("nurse-1", [1, 2, 3]);
    within(30, nurse.sync()).await.unwrap();
    let outside: Vec<_> = [0, 4, 5, 6, 7, 8, 9, 10, 11].iter().map(|&i| server.patients[i].clone()).collect();
    for nhs in &outside {
        assert!(nurse.store.find_by_nhs(nhs).unwrap().is_none());
    }
    let rows: i64 =
        nurse.store.connection().query_row("SELECT count(*) FROM documents", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 3, "the store file holds exactly the three caseload documents");
    // Nor is any of their NHS numbers in the file (they never arrived; sealing would hide them
    // if they had: this guards against a plaintext copy of a document that did not count).
    let raw = nurse.raw_bytes();
    for nhs in &outside {
        assert!(!contains(&raw, nhs.as_str().as_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_incident_grant_lapses_and_the_record_is_purged() {
    let server = TestServer::in_memory(3);
    let mut crew = TestDevice::enrolled(&server, "ambulance-1", Role::AmbulanceCrew).await;
    let nhs = server.patients[2].clone();
    ops::incident_open(server.store.as_ref(), "ambulance-1", nhs.as_str(), 0.0005).unwrap(); // 1.8 s
    within(30, crew.sync()).await.unwrap();
    assert!(crew.store.find_by_nhs(&nhs).unwrap().is_some(), "the incident patient arrives");
    tokio::time::sleep(std::time::Duration::from_millis(2_000)).await;
    let report = within(30, crew.sync()).await.unwrap();
    assert_eq!(report.stats.documents_purged, 1);
    assert!(crew.store.find_by_nhs(&nhs).unwrap().is_none(), "the lapsed incident's record is purged");

    // Closing an incident ends it at once.
    ops::incident_open(server.store.as_ref(), "ambulance-1", nhs.as_str(), 24.0).unwrap();
    within(30, crew.sync()).await.unwrap();
    assert!(crew.store.find_by_nhs(&nhs).unwrap().is_some());
    ops::incident_close(server.store.as_ref(), "ambulance-1", nhs.as_str()).unwrap();
    within(30, crew.sync()).await.unwrap();
    assert!(crew.store.find_by_nhs(&nhs).unwrap().is_none());
    let audit = server.store.audit_entries(&AuditFilter::default()).unwrap();
    assert!(
        audit.iter().any(|a| a.action == "incident-open")
            && audit.iter().any(|a| a.action == "incident-close")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn area_prefetch_brings_high_risk_patients_and_the_budget_keeps_priority_order() {
    let server = TestServer::in_memory(300);
    let mut crew = TestDevice::enrolled(&server, "ambulance-2", Role::AmbulanceCrew).await;
    let store = server.store.as_ref();
    // Districts of the synthetic population's high-risk patients, and who carries a prefetch flag.
    use care_sync_server::domain::scope::{DEFAULT_PREFETCH_FLAGS, PatientIndex};
    let ids = store.patient_ids().unwrap();
    let mut districts = std::collections::BTreeMap::<String, usize>::new();
    let mut flagged = std::collections::BTreeMap::<String, Vec<care_node::nhs::NhsNumber>>::new();
    for (id, nhs) in &ids {
        let mut s =
            care_node::summary::PatientSummary::load(&store.load_document(id).unwrap().unwrap()).unwrap();
        let index = PatientIndex::of(&mut s).unwrap();
        let district = index.district.clone().unwrap();
        if index.flags.iter().any(|f| f == "respect-dnacpr") {
            *districts.entry(district.clone()).or_default() += 1;
        }
        if index.flags.iter().any(|f| DEFAULT_PREFETCH_FLAGS.contains(&f.as_str())) {
            let nhs = care_node::nhs::NhsNumber::parse(nhs.as_deref().unwrap()).unwrap();
            flagged.entry(district).or_default().push(nhs);
        }
    }
    let (district, high_risk) =
        districts.iter().max_by_key(|(_, n)| **n).map(|(d, n)| (d.clone(), *n)).unwrap();
    assert!(high_risk >= 1);
    ops::area(store, "ambulance-2", &district, true).unwrap();
    let report = within(30, crew.sync()).await.unwrap();
    let expected = &flagged[&district];
    for nhs in expected {
        assert!(crew.store.find_by_nhs(nhs).unwrap().is_some(), "every flagged patient of the area arrives");
    }
    assert_eq!(
        crew.store.document_count().unwrap() as usize,
        expected.len(),
        "and no one else: not the area's unflagged patients, not other areas'"
    );
    let prefetched = report.stats.documents_received;

    // Now a budget of 3 with an incident and a caseload of 3: incident first, then caseload,
    // and no prefetch at all.
    ops::set_budget(store, "ambulance-2", Some(3)).unwrap();
    ops::incident_open(store, "ambulance-2", server.patients[10].as_str(), 24.0).unwrap();
    server.caseload("ambulance-2", [20, 21, 22]);
    let report = within(30, crew.sync()).await.unwrap();
    assert_eq!(crew.store.document_count().unwrap(), 3, "never more than the budget");
    assert!(crew.store.find_by_nhs(&server.patients[10]).unwrap().is_some(), "the incident comes first");
    let caseload_held = [20, 21, 22]
        .iter()
        .filter(|&&i| crew.store.find_by_nhs(&server.patients[i]).unwrap().is_some())
        .count();
    assert_eq!(caseload_held, 2, "then the caseload, before any prefetch");
    let own: Vec<_> = [10, 20, 21, 22].iter().map(|&i| server.patients[i].clone()).collect();
    for nhs in expected.iter().filter(|n| !own.contains(n)) {
        assert!(crew.store.find_by_nhs(nhs).unwrap().is_none(), "a prefetch-only patient was dropped");
    }
    let left_out = report.stats.left_out;
    assert_eq!(left_out, 1 + prefetched, "one caseload patient and every prefetch left out, and said so");
    assert_eq!(crew.store.sync_state().unwrap().left_out, left_out);
}

#[tokio::test(flavor = "multi_thread")]
async fn objection_withholds_a_caseload_patient_until_permission_to_view() {
    let server = TestServer::in_memory(2);
    let mut nurse = TestDevice::enrolled(&server, "nurse-3", Role::CommunityNurse).await;
    let nhs = server.patients[1].clone();
    ops::set_consent(server.store.as_ref(), nhs.as_str(), Some(true), None).unwrap();
    server.caseload("nurse-3", [0, 1]);
    within(30, nurse.sync()).await.unwrap();
    assert!(nurse.store.find_by_nhs(&nhs).unwrap().is_none(), "an objecting patient is not delivered");
    assert!(nurse.store.find_by_nhs(&server.patients[0]).unwrap().is_some());

    let request = AccessRequest {
        nhs_number: nhs.as_str().into(),
        kind: AccessKind::PermissionToView,
        reason: "asked at the visit".into(),
    };
    let (decision, _) = within(30, nurse.request_access(request)).await.unwrap();
    assert!(decision.granted, "{}", decision.message);
    assert!(nurse.store.find_by_nhs(&nhs).unwrap().is_some(), "permission to view brings the record");
    let patient = server.store.patient_by_nhs(&nhs).unwrap().unwrap();
    let audit =
        server.store.audit_entries(&AuditFilter { patient: Some(patient), ..Default::default() }).unwrap();
    assert!(audit.iter().any(|a| a.action == "permission-to-view" && a.actor == "nurse-3"));
}

#[tokio::test(flavor = "multi_thread")]
async fn break_glass_grants_for_a_while_is_audited_and_alerts_operators() {
    let mut server = TestServer::in_memory(2);
    let mut crew = TestDevice::enrolled(&server, "ambulance-4", Role::AmbulanceCrew).await;
    within(30, crew.sync()).await.unwrap();
    let nhs = server.patients[0].clone();
    assert!(crew.store.find_by_nhs(&nhs).unwrap().is_none());

    let short =
        AccessRequest { nhs_number: nhs.as_str().into(), kind: AccessKind::BreakGlass, reason: "".into() };
    let (decision, _) = within(30, crew.request_access(short)).await.unwrap();
    assert!(!decision.granted && decision.message.contains("reason"));

    let request = AccessRequest {
        nhs_number: nhs.as_str().into(),
        kind: AccessKind::BreakGlass,
        reason: "unconscious, no identification of carers".into(),
    };
    let (decision, _) = within(30, crew.request_access(request.clone())).await.unwrap();
    assert!(decision.granted);
    assert!(
        decision.until_ms > care_node::now_ms() && decision.until_ms < care_node::now_ms() + 5 * 3_600_000
    );
    let held = crew.store.find_by_nhs(&nhs).unwrap().expect("break glass brings the record");
    let alerts = server.store.alerts(false).unwrap();
    assert!(alerts.iter().any(|a| a.kind == "break-glass" && a.device.as_deref() == Some("ambulance-4")));
    // The library logs the record's first view as the access, once (not each front end its own).
    let views = crew.store.view_log(100).unwrap();
    let patient = held.summary.patient_id().unwrap();
    let logged = views.iter().filter(|(v, _)| v.action == "break-glass" && v.patient == patient).count();
    assert_eq!(logged, 1, "one break-glass view on the device's log");

    // Offline, the device says plainly that the record is not here and access needs a connection.
    server.stop().await;
    let other = AccessRequest { nhs_number: server.patients[1].as_str().into(), ..request };
    let err = within(60, crew.request_access(other)).await.unwrap_err();
    assert!(matches!(err, ClientError::NeedsConnection(..)), "{err:?}");
    assert!(err.to_string().contains("not on this device"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wiped_device_confirms_and_keeps_no_patient_data() {
    let server = TestServer::in_memory(5);
    let mut nurse = TestDevice::enrolled(&server, "nurse-5", Role::CommunityNurse).await;
    server.caseload("nurse-5", 0..5);
    within(30, nurse.sync()).await.unwrap();
    let sealed: Vec<Vec<u8>> = {
        let conn = nurse.store.connection();
        let mut stmt = conn.prepare("SELECT body FROM documents").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().map(|r| r.unwrap()).collect()
    };
    assert_eq!(sealed.len(), 5);
    ops::wipe(server.store.as_ref(), "nurse-5").unwrap();
    let err = within(30, nurse.sync()).await.unwrap_err();
    assert!(matches!(err, ClientError::Wiped), "{err:?}");

    let record = server.store.device_by_name("nurse-5").unwrap().unwrap();
    assert!(record.wiped_at_ms.is_some(), "the server recorded the confirmation");
    assert!(record.revoked_at_ms.is_some(), "and the device can no longer connect");
    let raw = nurse.raw_bytes();
    for body in &sealed {
        assert!(!contains(&raw, &body[..64]), "no sealed document survives in the file");
    }
    assert!(matches!(DeviceStore::open(&nurse.path, &cheap_wrapper(PASSPHRASE)), Err(StoreError::Wiped)));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_lease_locks_patient_data_until_a_sync() {
    let server = TestServer::in_memory(2);
    let mut crew = TestDevice::enrolled(&server, "ambulance-6", Role::AmbulanceCrew).await;
    server.caseload("ambulance-6", [0]);
    within(30, crew.sync()).await.unwrap();
    let nhs = server.patients[0].clone();
    crew.store.view_patient(&nhs, "show").expect("readable within the lease");
    crew.store.backdate_last_sync_for_test(73 * 3_600_000).unwrap();
    let err = crew.store.view_patient(&nhs, "show").unwrap_err();
    assert!(matches!(err, StoreError::LeaseExpired { lease_hours: 72, .. }), "{err:?}");
    assert!(err.to_string().contains("connect and sync"));
    assert!(matches!(crew.store.list(), Err(StoreError::LeaseExpired { .. })));
    within(30, crew.sync()).await.unwrap();
    crew.store.view_patient(&nhs, "show").expect("a sync unlocks");

    // The lease is the operator's, per role.
    ops::set_setting(server.store.as_ref(), "lease-hours.ambulance-crew", "1").unwrap();
    within(30, crew.sync()).await.unwrap();
    crew.store.backdate_last_sync_for_test(2 * 3_600_000).unwrap();
    assert!(matches!(
        crew.store.view_patient(&nhs, "show"),
        Err(StoreError::LeaseExpired { lease_hours: 1, .. })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn views_reach_the_server_audit_and_a_broken_view_log_is_flagged() {
    let server = TestServer::in_memory(2);
    let mut nurse = TestDevice::enrolled(&server, "nurse-7", Role::CommunityNurse).await;
    server.caseload("nurse-7", [0]);
    within(30, nurse.sync()).await.unwrap();
    let nhs = server.patients[0].clone();
    nurse.store.view_patient(&nhs, "show").unwrap();
    nurse.store.view_patient(&nhs, "show").unwrap();
    let report = within(30, nurse.sync()).await.unwrap();
    assert_eq!(report.stats.views_uploaded, 2);
    let patient = server.store.patient_by_nhs(&nhs).unwrap().unwrap();
    let seen = server
        .store
        .audit_entries(&AuditFilter { patient: Some(patient), actor: Some("nurse-7".into()), since_ms: None })
        .unwrap();
    assert_eq!(
        seen.iter().filter(|a| a.action == "view:show").count(),
        2,
        "who saw this patient: the nurse, twice"
    );
    assert!(server.store.alerts(false).unwrap().is_empty(), "an intact chain raises nothing");

    // A device (or someone with its key) sends a chain with a gap and a tampered entry.
    let identity = nurse.store.identity().unwrap();
    let (head_seq, _) = server.store.view_head(server.device_id("nurse-7")).unwrap();
    let entry = |seq: u64, prev: [u8; 32]| ViewEntry {
        seq,
        prev_hash: prev,
        at_ms: 1,
        patient,
        action: "show".into(),
        detail: String::new(),
    };
    let skipped = entry(head_seq + 2, [9; 32]); // entry head+1 never arrives
    let mut tampered = SignedView::sign(&identity, entry(head_seq + 3, skipped.hash()));
    tampered.entry.action = "nothing".into();
    let entries = vec![SignedView::sign(&identity, skipped), tampered];
    let mut conn = care_sync_e2e::welcomed(&nurse).await;
    conn.send(&ClientMessage::ViewLog { entries }).await.unwrap();
    assert!(matches!(within(30, conn.recv()).await.unwrap(), Some(ServerMessage::ViewLogAck { .. })));
    // One alert for the batch (a flood of problems is one alert), every problem in the audit.
    let alerts: Vec<_> =
        server.store.alerts(false).unwrap().into_iter().filter(|a| a.kind == "view-log").collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(
        alerts[0].reason.contains("missing (gap)") && alerts[0].reason.contains("2 problem(s)"),
        "{alerts:?}"
    );
    let problems: Vec<_> = server
        .store
        .audit_entries(&AuditFilter { actor: Some("nurse-7".into()), ..Default::default() })
        .unwrap()
        .into_iter()
        .filter(|a| a.action == "view-log-problem")
        .map(|a| a.detail)
        .collect();
    assert!(problems.iter().any(|p| p.contains("invalid signature")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("missing (gap)")), "{problems:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_planning_export_suppresses_small_numbers_and_respects_the_opt_out() {
    let server = TestServer::in_memory(0);
    let store = server.store.as_ref();
    let mut stem = 999_100_000u32;
    let mut add = |n: usize, dob: &str, postcode: &str| {
        let mut made = Vec::new();
        while made.len() < n {
            stem += 1;
            let Some(nhs) = care_node::nhs::NhsNumber::from_stem(stem) else { continue };
            let bundle = format!(
                r#"{{"resourceType":"Bundle","type":"collection","entry":[
                {{"resource":{{"resourceType":"Patient","id":"p","identifier":[{{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"{}"}}],"name":[{{"text":"Planning Person"}}],"birthDate":"{dob}","address":[{{"postalCode":"{postcode}"}}]}}}},
                {{"resource":{{"resourceType":"Condition","id":"c","code":{{"coding":[{{"system":"http://snomed.info/sct","code":"84114007","display":"Heart failure"}}]}},"subject":{{"reference":"Patient/p"}}}}}}]}}"#,
                nhs.as_str()
            );
            let parsed = care_sync_server::ingest::fhir::import::parse_bundle(&bundle).unwrap();
            care_sync_server::ingest::fhir::import::import_bundle(store, &parsed, "test", 0).unwrap();
            made.push(nhs);
        }
        made
    };
    let older = add(12, "1935-03-01", "SO16 1AA");
    add(3, "1990-03-01", "SO16 2BB");
    add(8, "1940-03-01", "PO30 3CC");
    for nhs in &older[..2] {
        ops::set_consent(store, nhs.as_str(), None, Some(true)).unwrap();
    }
    use care_sync_server::operator::planning::{Grouping, export};
    let all = export(store, Grouping::ALL, care_node::now_ms()).unwrap();
    assert_eq!(all.patients_opted_out, 2);
    let rows: Vec<&str> = all.csv.lines().collect();
    assert_eq!(rows[0], "snomed_code,condition,age_band,postcode_district,patients");
    assert!(rows.contains(&"84114007,Heart failure,80+,SO16,10"), "10 left after 2 opted out: {rows:?}");
    assert!(rows.contains(&"84114007,Heart failure,18-44,SO16,*"), "3 is suppressed: {rows:?}");
    assert!(rows.contains(&"84114007,Heart failure,80+,PO30,10"), "8 rounds to 10: {rows:?}");
    assert!(!all.csv.contains("Planning Person") && !all.csv.contains("999"), "nothing identifiable");
    assert_eq!((all.cells, all.suppressed_cells), (3, 1));
    // By district only: the 3 younger patients join the 10 older ones, and nothing is suppressed.
    let by_district = export(store, Grouping::parse("district").unwrap(), care_node::now_ms()).unwrap();
    let rows: Vec<&str> = by_district.csv.lines().collect();
    assert_eq!(rows, ["postcode_district,patients", "PO30,10", "SO16,15"]);
    assert_eq!((by_district.cells, by_district.suppressed_cells), (2, 0));
    let by_age = export(store, Grouping::parse("condition,age-band").unwrap(), care_node::now_ms()).unwrap();
    assert!(by_age.csv.lines().any(|l| l == "84114007,Heart failure,80+,20"), "{}", by_age.csv);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_started_with_a_wipe_pending_shreds_its_key_too() {
    let server = TestServer::in_memory(2);
    let mut crew = TestDevice::enrolled(&server, "ambulance-10", Role::AmbulanceCrew).await;
    server.caseload("ambulance-10", [0, 1]);
    within(30, crew.sync()).await.unwrap();
    ops::wipe(server.store.as_ref(), "ambulance-10").unwrap();
    let err = within(30, crew.watch(&mut |_| {}, std::future::pending::<()>())).await.unwrap_err();
    assert!(matches!(err, ClientError::Wiped), "{err:?}");
    assert!(server.store.device_by_name("ambulance-10").unwrap().unwrap().wiped_at_ms.is_some());
    assert!(matches!(DeviceStore::open(&crew.path, &cheap_wrapper(PASSPHRASE)), Err(StoreError::Wiped)));
}

/// A watching crew's incident grant lapses while nothing else moves in the store: its record is
/// purged by a live round all the same (the session wakes at the grant's end).
async fn a_grant_lapsing_during_a_live_session_purges_the_record(server: TestServer) {
    let mut crew = TestDevice::enrolled(&server, "ambulance-11", Role::AmbulanceCrew).await;
    let nhs = server.patients[1].clone();
    ops::incident_open(server.store.as_ref(), "ambulance-11", nhs.as_str(), 0.0008).unwrap(); // ~2.9 s
    let (rounds_tx, mut rounds) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        let mut on_round = move |stats: &care_node::sync::SyncStats| {
            let _ = rounds_tx.send(stats.documents_purged);
        };
        let report = crew.watch(&mut on_round, async move {
            let _ = stop_rx.await;
        });
        let report = report.await;
        (crew, report)
    });
    assert_eq!(within(30, rounds.recv()).await, Some(0), "the first round brings the incident patient");
    let purged = within(30, rounds.recv()).await.expect("a live round when the grant lapses");
    stop_tx.send(()).unwrap();
    let (crew, report) = within(30, watcher).await.unwrap();
    report.expect("the live session ends cleanly");
    assert_eq!(purged, 1);
    assert!(crew.store.find_by_nhs(&nhs).unwrap().is_none(), "the lapsed incident's record is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_lapsing_during_a_live_session_purges_the_record_on_the_pair() {
    a_grant_lapsing_during_a_live_session_purges_the_record(TestServer::in_memory(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_lapsing_during_a_live_session_purges_the_record_over_quic() {
    a_grant_lapsing_during_a_live_session_purges_the_record(TestServer::start(2).await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wipe_ordered_during_a_live_session_ends_it_and_the_next_contact_shreds() {
    // Over QUIC: closing a live session on a wipe is the transport's (the pair does not do it).
    let server = TestServer::start(2).await;
    let mut crew = TestDevice::enrolled(&server, "ambulance-12", Role::AmbulanceCrew).await;
    server.caseload("ambulance-12", [0, 1]);
    let (rounds_tx, mut rounds) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(async move {
        let mut on_round = move |_: &care_node::sync::SyncStats| {
            let _ = rounds_tx.send(());
        };
        let ended = crew.watch(&mut on_round, std::future::pending::<()>()).await;
        (crew, ended)
    });
    within(30, rounds.recv()).await.expect("the first round: the crew is watching");
    ops::wipe(server.store.as_ref(), "ambulance-12").unwrap();
    let (mut crew, ended) = within(30, watcher).await.unwrap();
    let err = ended.expect_err("the live session is ended by the wipe");
    assert!(matches!(&err, ClientError::Refused(m) if m.contains("wipe")), "{err:?}");
    assert_eq!(crew.store.document_count().unwrap(), 2, "nothing shredded before the wipe is confirmed");
    let err = within(30, crew.sync()).await.unwrap_err();
    assert!(matches!(err, ClientError::Wiped), "{err:?}");
    assert!(server.store.device_by_name("ambulance-12").unwrap().unwrap().wiped_at_ms.is_some());
    assert!(matches!(DeviceStore::open(&crew.path, &cheap_wrapper(PASSPHRASE)), Err(StoreError::Wiped)));
}
