//! Sync over impaired links (the relay of `care_sync_server::demo::link`): delay, loss, bursts,
//! a bandwidth cap, outages and a cut mid-round. Each cold sync completes with every document
//! once, and the relay's counters show the impairment really happened.

use std::time::Duration;

use care_sync_e2e::{TestDevice, TestServer, within};
use care_sync_server::demo::link::{Profile, Relay};
use care_sync_server::store::Role;

/// A crew device enrolled with the server and then pointed at `relay` instead.
async fn device_behind(server: &TestServer, relay: &Relay, name: &str, patients: usize) -> TestDevice {
    let device = TestDevice::enrolled(server, name, Role::AmbulanceCrew).await;
    device.store.update_server_addr(&relay.addr.to_string()).unwrap();
    server.caseload(name, 0..patients);
    device
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_sync_over_3g_edge_and_flaky_wifi_brings_every_document_once() {
    let server = TestServer::start(120).await;
    for (seed, (name, patients)) in [("3g", 120), ("edge", 60), ("flaky-wifi", 120)].into_iter().enumerate() {
        let relay = Relay::start(server.addr, Profile::named(name).unwrap(), seed as u64).await.unwrap();
        let mut device = device_behind(&server, &relay, &format!("crew-{name}"), patients).await;
        let report = within(120, device.sync()).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let stats = relay.stats();
        println!(
            "{name}: {patients} documents in {:?}, {} bytes; relay {stats:?}",
            report.duration,
            report.udp_bytes()
        );
        assert_eq!(report.stats.documents_received as usize, patients, "{name}: each document once");
        assert_eq!(device.store.document_count().unwrap() as usize, patients, "{name}");
        if name != "flaky-wifi" {
            assert!(stats.lost > 0, "{name}: the link lost packets ({stats:?})");
        }
        // The round trip alone bounds the time from below: the delay was really there.
        let rtt = Profile::named(name).unwrap().delay * 2;
        assert!(report.duration > rtt * 2, "{name}: {:?} is faster than two round trips", report.duration);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_three_second_cut_mid_round_is_ridden_out_and_nothing_arrives_twice() {
    let server = TestServer::start(200).await;
    let relay = Relay::start(server.addr, Profile::named("3g").unwrap(), 7).await.unwrap();
    let mut device = device_behind(&server, &relay, "crew-cut", 200).await;
    let (landed_tx, mut landed) = tokio::sync::mpsc::unbounded_channel();
    let sync = tokio::spawn(async move {
        let mut progress = move |s: &care_node::sync::SyncStats| {
            let _ = landed_tx.send(s.round_applied);
        };
        let report = care_node::client::sync_with_progress(&mut device.store, &mut progress).await;
        (device, report)
    });
    // Cut the link once documents are arriving.
    let mut at_cut = 0;
    while at_cut == 0 {
        at_cut = within(60, landed.recv()).await.expect("progress");
    }
    relay.cut_for(Duration::from_secs(3));
    let (device, report) = within(120, sync).await.unwrap();
    let report = report.expect("the sync rides out a 3 s cut (the idle timeout is 30 s)");
    assert_eq!(report.stats.documents_received, 200, "each document once");
    assert_eq!(device.store.document_count().unwrap(), 200);
    assert!(relay.stats().cut > 0, "packets were dropped by the cut: {:?}", relay.stats());
    let mut after = at_cut;
    while let Ok(applied) = landed.try_recv() {
        after = after.max(applied);
    }
    assert!(at_cut < 200 && after == 200, "documents arrived after the cut ({at_cut} before it)");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_address_change_mid_round_keeps_the_connection_and_nothing_arrives_twice() {
    let server = TestServer::start(200).await;
    let relay = Relay::start(server.addr, Profile::named("3g").unwrap(), 11).await.unwrap();
    let mut device = device_behind(&server, &relay, "crew-moving", 200).await;
    let (landed_tx, mut landed) = tokio::sync::mpsc::unbounded_channel();
    let sync = tokio::spawn(async move {
        let mut progress = move |s: &care_node::sync::SyncStats| {
            let _ = landed_tx.send(s.round_applied);
        };
        let report = care_node::client::sync_with_progress(&mut device.store, &mut progress).await;
        (device, report)
    });
    let mut at_move = 0;
    while at_move == 0 {
        at_move = within(60, landed.recv()).await.expect("progress");
    }
    // From here the server's packets to the old address are lost: only a server that follows
    // the connection to its new address (QUIC migration) completes this round.
    relay.rebind();
    let (device, report) = within(120, sync).await.unwrap();
    let report = report.expect("the round continues on the same connection from the new address");
    assert_eq!(report.stats.documents_received, 200, "each document once");
    assert_eq!(device.store.document_count().unwrap(), 200);
    let mut after = at_move;
    while let Ok(applied) = landed.try_recv() {
        after = after.max(applied);
    }
    assert!(at_move < 200 && after == 200, "documents arrived after the move ({at_move} before it)");
}
