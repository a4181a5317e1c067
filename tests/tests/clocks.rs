//! Device clocks are set by users and networks: hours ahead, hours behind, or jumping in the
//! middle of a sync. None of that may reorder clinical facts or stretch the offline lease
//! (hazards H8 and H14). Each device here runs on its own [`Clock`]; the server on the system's.

use care_node::clock::Clock;
use care_node::store::StoreError;
use care_node::summary::Allergy;
use care_sync_e2e::{TestDevice, TestServer, within};
use care_sync_server::store::Role;

const HOUR: i64 = 3_600_000;
const MINUTE: i64 = 60_000;

/// A device enrolled as a community nurse whose clock is `offset_ms` from the true one.
async fn device_with_clock(server: &TestServer, name: &str, offset_ms: i64) -> (TestDevice, Clock) {
    let mut device = TestDevice::new(name);
    let clock = Clock::offset(offset_ms);
    device.store.set_clock(clock.clone());
    device.enrol(server, &server.token(name, Role::CommunityNurse)).await.expect("enrol");
    (device, clock)
}

/// The allergies of a patient as the device shows them: substance and corrected time.
fn shown(device: &TestDevice, nhs: &care_node::nhs::NhsNumber) -> Vec<(String, i64)> {
    let mut patient = device.store.find_by_nhs(nhs).unwrap().expect("patient on device");
    let entries = patient.summary.clinical_entries::<Allergy>().unwrap();
    entries.into_iter().map(|e| (e.data.substance, e.data.provenance.corrected_time_ms())).collect()
}

fn lease_ms(device: &TestDevice) -> i64 {
    device.store.sync_state().unwrap().lease_ms.expect("a lease from the server") as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn skewed_device_clocks_change_no_order_of_clinical_facts_and_no_lease_decision() {
    let server = TestServer::in_memory(2);
    let nhs = server.patients[0].clone();
    let (mut ahead, ahead_clock) = device_with_clock(&server, "nurse-ahead", 6 * HOUR).await;
    let (mut behind, behind_clock) = device_with_clock(&server, "nurse-behind", -6 * HOUR).await;
    let mut right = TestDevice::enrolled(&server, "nurse-right", Role::CommunityNurse).await;
    for name in ["nurse-ahead", "nurse-behind", "nurse-right"] {
        server.caseload(name, [0]);
    }
    for device in [&mut ahead, &mut behind, &mut right] {
        within(60, device.sync()).await.expect("first sync");
    }

    // The device six hours ahead records first; the one six hours behind sees it, then records.
    // By their clocks the second entry is twelve hours older than the first.
    let before = care_node::now_ms();
    ahead.add_allergy(&nhs, "Recorded first");
    within(60, ahead.sync()).await.unwrap();
    within(60, behind.sync()).await.unwrap();
    behind.add_allergy(&nhs, "Recorded second");
    within(60, behind.sync()).await.unwrap();
    within(60, ahead.sync()).await.unwrap();
    within(60, right.sync()).await.unwrap();
    let after = care_node::now_ms();

    let on_right = shown(&right, &nhs);
    for device in [&ahead, &behind] {
        assert_eq!(shown(device, &nhs), on_right, "every device shows the same facts in the same order");
    }
    let order: Vec<&str> = on_right.iter().map(|(s, _)| s.as_str()).collect();
    let first = order.iter().position(|s| *s == "Recorded first").expect("first entry shown");
    let second = order.iter().position(|s| *s == "Recorded second").expect("second entry shown");
    assert!(first < second, "causal order, not the devices' clocks: {order:?}");
    // The times shown are corrected by each device's measured offset to the server's clock.
    for (substance, at) in &on_right {
        if substance.starts_with("Recorded ") {
            assert!(
                before - MINUTE <= *at && *at <= after + MINUTE,
                "{substance}: shown at {at}, recorded between {before} and {after}"
            );
        }
    }

    // The lease runs for the same real time on every device, whatever its clock says.
    let lease = lease_ms(&ahead);
    assert_eq!(lease, lease_ms(&behind));
    for (device, clock, offset) in [(&ahead, &ahead_clock, 6 * HOUR), (&behind, &behind_clock, -6 * HOUR)] {
        clock.set_offset(offset + lease - 5 * MINUTE);
        assert!(device.store.check_lease(device.store.now_ms()).is_ok(), "within the lease");
        clock.set_offset(offset + lease + 5 * MINUTE);
        assert!(
            matches!(device.store.check_lease(device.store.now_ms()), Err(StoreError::LeaseExpired { .. })),
            "past the lease, by real time"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clock_that_jumps_during_a_round_never_stretches_the_lease() {
    const PATIENTS: usize = 600;
    let server = TestServer::start(PATIENTS).await;
    // One clock is set three hours back mid-round (network time correcting a fast clock, say),
    // the other three hours forward.
    for jump in [-3 * HOUR, 3 * HOUR] {
        let name = format!("nurse-jump{}", if jump < 0 { "back" } else { "forward" });
        let (mut device, clock) = device_with_clock(&server, &name, 0).await;
        server.caseload(&name, 0..PATIENTS);
        let synced_at = care_node::now_ms();
        let jumped = std::sync::atomic::AtomicBool::new(false);
        let mut progress = |stats: &care_node::sync::SyncStats| {
            if stats.round_applied > 0 && !jumped.swap(true, std::sync::atomic::Ordering::Relaxed) {
                clock.set_offset(jump);
            }
        };
        within(120, device.sync_with_progress(&mut progress)).await.expect("sync");
        assert!(jumped.into_inner(), "the clock jumped while documents arrived");
        let lease = lease_ms(&device);
        // The clock as set now: `at(t)` makes it read real time `t` in its new frame.
        let at = |real_ms: i64| clock.set_offset(jump + real_ms - care_node::now_ms());
        let check = |device: &TestDevice| device.store.check_lease(device.store.now_ms());
        // Straight after the sync the data is open, and an entry's time is corrected by the
        // offset the clock has now.
        assert!(
            check(&device).is_ok(),
            "{name}: open after a sync, the clock set as it is: {:?}",
            check(&device)
        );
        let nhs = server.patients[0].clone();
        device.add_allergy(&nhs, "Recorded after the jump");
        let corrected =
            shown(&device, &nhs).into_iter().find(|(s, _)| s == "Recorded after the jump").unwrap().1;
        assert!((corrected - care_node::now_ms()).abs() < MINUTE, "{name}: corrected time {corrected}");
        // The clock stays as set: the lease never outlasts its real length (one set back mid-sync
        // keeps its full length; one set forward ends it early, the safe side).
        if jump < 0 {
            at(synced_at + lease - 5 * MINUTE);
            assert!(check(&device).is_ok(), "{name}: within the real lease");
        }
        at(synced_at + lease + 5 * MINUTE);
        assert!(check(&device).is_err(), "{name}: past the real lease");
        // Corrected to the true time past the real lease: still locked (the forward jump used to
        // stretch the lease by three hours here).
        clock.set_offset(synced_at + lease + 5 * MINUTE - care_node::now_ms());
        let outcome = check(&device);
        assert!(
            matches!(outcome, Err(StoreError::LeaseExpired { .. } | StoreError::ClockWoundBack { .. })),
            "{name}: a lease past its real end is not stretched by the jump: {outcome:?}"
        );
        // And a sync (the clock right again) unlocks it.
        clock.set_offset(0);
        within(60, device.sync()).await.expect("sync");
        assert!(device.store.check_lease(device.store.now_ms()).is_ok(), "{name}: unlocked by a sync");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_session_keeps_the_clock_offset_it_measured() {
    // The offset is the device's clock minus the server's at one moment. A live session's later
    // rounds once paired the device's clock at the round with the server's at the Welcome, so
    // the offset grew by the session's length (and entries' times drifted with it).
    let server = TestServer::in_memory(2);
    let (mut nurse, _clock) = device_with_clock(&server, "nurse-live", 2 * HOUR).await;
    let mut crew = TestDevice::enrolled(&server, "crew-live", Role::AmbulanceCrew).await;
    server.caseload("nurse-live", [0]);
    server.caseload("crew-live", [0]);
    within(30, crew.sync()).await.unwrap();
    let (rounds_tx, mut rounds) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        let mut on_round = move |_: &care_node::sync::SyncStats| {
            let _ = rounds_tx.send(());
        };
        let report = nurse
            .watch(&mut on_round, async move {
                let _ = stop_rx.await;
            })
            .await;
        (nurse, report)
    });
    within(30, rounds.recv()).await.expect("the first round");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    crew.add_allergy(&server.patients[0], "Pushed three seconds in");
    within(30, crew.sync()).await.unwrap();
    within(10, rounds.recv()).await.expect("the pushed round");
    stop_tx.send(()).unwrap();
    let (nurse, report) = within(30, watcher).await.unwrap();
    report.expect("the live session ends cleanly");
    let offset = nurse.store.sync_state().unwrap().clock_offset_ms().expect("an offset");
    assert!((offset - 2 * HOUR).abs() < 1_500, "measured offset {offset} ms against a clock 2 h ahead");
}
