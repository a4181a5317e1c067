//! Live updates: a connected device receives a change made elsewhere within a second.

use std::time::{Duration, Instant};

use care_sync_e2e::{TestDevice, TestServer, admit_over_mllp, within};
use care_sync_server::store::Role;

#[tokio::test(flavor = "multi_thread")]
async fn a_watching_device_gets_changes_and_hospital_events_within_a_second() {
    let server = TestServer::start(3).await;
    let mut nurse = TestDevice::enrolled(&server, "nurse-live", Role::CommunityNurse).await;
    let mut crew = TestDevice::enrolled(&server, "crew-live", Role::AmbulanceCrew).await;
    server.caseload("nurse-live", [0]);
    server.caseload("crew-live", [0]);
    within(30, crew.sync()).await.unwrap();
    let nhs = server.patients[0].clone();

    // The nurse's device stays connected; every pushed round is reported on a channel.
    let (rounds_tx, mut rounds) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        let mut on_round = move |stats: &care_node::sync::SyncStats| {
            let _ = rounds_tx.send((stats.changes_received, stats.notifications));
        };
        let stop = async move {
            let _ = stop_rx.await;
        };
        let report = care_node::client::watch(&mut nurse.store, &mut on_round, stop).await;
        (nurse, report)
    });
    let first = within(30, rounds.recv()).await.expect("the first round");
    assert_eq!(first, (0, 0));

    // The crew records an allergy and syncs: the nurse has it within a second.
    crew.add_allergy(&nhs, "Chlorhexidine");
    within(30, crew.sync()).await.unwrap();
    let uploaded = Instant::now();
    let (changes, _) = within(5, rounds.recv()).await.expect("a pushed round");
    let latency = uploaded.elapsed();
    assert_eq!(changes, 1);
    assert!(latency < Duration::from_secs(1), "pushed after {latency:?}");

    // A hospital admission over MLLP reaches the watching nurse as a notification.
    let mllp =
        care_sync_server::ingest::hl7::mllp::start(server.store.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
    let sent = Instant::now();
    let ack = admit_over_mllp(mllp.addr, &nhs, "LIVE1").await;
    assert!(ack.contains("MSA|AA|LIVE1"), "{ack}");
    let (_, notifications) = within(5, rounds.recv()).await.expect("a pushed round");
    assert_eq!(notifications, 1, "the admission arrived as a notification");
    assert!(sent.elapsed() < Duration::from_secs(1), "admission pushed after {:?}", sent.elapsed());

    stop_tx.send(()).unwrap();
    let (nurse, report) = within(30, watcher).await.unwrap();
    report.expect("the live session ends cleanly");
    // The server counts the stopped watch as a sync that ended well (the crew's two syncs and
    // the watch), not as a failure an operator's alert would fire on.
    let count = care_sync_e2e::sync_outcomes;
    for _ in 0..50 {
        if count("ok") >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!((count("ok"), count("error")), (3, 0), "sync outcomes on the server");
    assert!(nurse.allergies(&nhs).iter().any(|a| a == "Chlorhexidine"));
    assert!(nurse.store.notifications(5).unwrap()[0].text.starts_with("admitted to Ward 7"));
    mllp.stop();
}
