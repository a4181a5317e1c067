//! Sync over impaired links (the relay of `care_sync_server::demo::link`): delay, loss, bursts,
//! a bandwidth cap, outages and a cut mid-round. Each cold sync completes with every document
//! once, and the impairment really happened: the relay counted losses (3G, EDGE), and no sync is
//! faster than its round trips or its bytes at the link's rate allow. `flaky-wifi`'s outages come
//! every 30 s, after a short sync ends: the cut and the address change below come mid-round on
//! purpose.

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
        let profile = Profile::named(name).unwrap();
        let rtt = profile.delay * 2;
        assert!(report.duration > rtt * 2, "{name}: {:?} is faster than two round trips", report.duration);
        // And the cap: the bytes that came down took at least their time at the link's rate.
        let rate = profile.rate_bps.expect("a capped link") as f64;
        let floor = Duration::from_secs_f64(report.udp_bytes_received as f64 * 8.0 / rate);
        assert!(report.duration >= floor, "{name}: {:?} beat the link's rate ({floor:?})", report.duration);
    }
}

/// A cold sync of 200 over `relay` with `disturb` done to the link once documents are arriving;
/// checks that the round completed with every document once, and that documents arrived after
/// the disturbance (it came mid-round).
async fn sync_disturbed_mid_round(
    relay: &Relay,
    mut device: TestDevice,
    disturb: impl FnOnce(&Relay),
    what: &str,
) {
    let (landed_tx, mut landed) = tokio::sync::mpsc::unbounded_channel();
    let applied = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let applied_now = applied.clone();
    let sync = tokio::spawn(async move {
        let mut progress = move |s: &care_node::sync::SyncStats| {
            applied_now.fetch_max(s.round_applied, std::sync::atomic::Ordering::SeqCst);
            let _ = landed_tx.send(s.round_applied);
        };
        let report = care_node::client::sync_with_progress(&mut device.store, &mut progress).await;
        (device, report)
    });
    while within(60, landed.recv()).await.expect("progress") == 0 {}
    disturb(relay);
    // What the device had applied when the link was disturbed: the rest arrived after it.
    let before = applied.load(std::sync::atomic::Ordering::SeqCst);
    let (device, report) = within(120, sync).await.unwrap();
    let report = report.unwrap_or_else(|e| panic!("the round completes despite {what}: {e}"));
    assert_eq!(report.stats.documents_received, 200, "each document once");
    assert_eq!(device.store.document_count().unwrap(), 200);
    assert!(before > 0 && before < 200, "{what} came mid-round ({before} of 200 applied before it)");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_three_second_cut_mid_round_is_ridden_out_and_nothing_arrives_twice() {
    let server = TestServer::start(200).await;
    let relay = Relay::start(server.addr, Profile::named("3g").unwrap(), 7).await.unwrap();
    let device = device_behind(&server, &relay, "crew-cut", 200).await;
    // The idle timeout is 30 s: the same connection carries on after the cut.
    sync_disturbed_mid_round(&relay, device, |relay| relay.cut_for(Duration::from_secs(3)), "a 3 s cut")
        .await;
    assert!(relay.stats().cut > 0, "packets were dropped by the cut: {:?}", relay.stats());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_address_change_mid_round_keeps_the_connection_and_nothing_arrives_twice() {
    let server = TestServer::start(200).await;
    let relay = Relay::start(server.addr, Profile::named("3g").unwrap(), 11).await.unwrap();
    let device = device_behind(&server, &relay, "crew-moving", 200).await;
    // From the move the server's packets to the old address are lost: only a server that
    // follows the connection to its new address (QUIC migration) completes this round.
    sync_disturbed_mid_round(&relay, device, Relay::rebind, "an address change").await;
}
