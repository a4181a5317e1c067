//! A device left in a drawer for 400 days (a spare vehicle's tablet) comes back: it sends what
//! it recorded before it went quiet, receives what changed meanwhile, resurrects nothing that
//! was marked entered in error, and needs no reset (no re-enrolment, no second cold sync).
//! Time is injected: the server and the devices run on clocks set 400 days back, then brought
//! forward to now.

use care_node::clock::Clock;
use care_node::store::StoreError;
use care_node::summary::{Allergy, Section};
use care_sync_e2e::{TestDevice, TestServer, within};
use care_sync_server::operator::ops;
use care_sync_server::store::Role;

const DAY: i64 = 86_400_000;

/// Each substance of a patient's allergies on a device, with whether it is entered in error.
fn allergies(device: &TestDevice, nhs: &care_node::nhs::NhsNumber) -> Vec<(String, bool)> {
    let mut patient = device.store.find_by_nhs(nhs).unwrap().expect("patient on device");
    let mut all: Vec<(String, bool)> = patient
        .summary
        .entries::<Allergy>()
        .unwrap()
        .into_iter()
        .map(|e| (e.data.substance, e.entered_in_error.is_some()))
        .collect();
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_offline_for_400_days_sends_its_entries_and_receives_what_changed() {
    let server = TestServer::in_memory(3);
    let nhs = server.patients.clone();
    // Day 0 is 400 days ago: the server and both devices run there.
    server.clock.set_offset(-400 * DAY);
    let drawer_clock = Clock::offset(-400 * DAY);
    let colleague_clock = Clock::offset(-400 * DAY);
    let mut drawer = TestDevice::new("tablet-in-a-drawer");
    drawer.store.set_clock(drawer_clock.clone());
    let mut colleague = TestDevice::new("nurse-colleague");
    colleague.store.set_clock(colleague_clock.clone());
    for (device, name) in [(&mut drawer, "tablet-in-a-drawer"), (&mut colleague, "nurse-colleague")] {
        device.enrol(&server, &server.token(name, Role::CommunityNurse)).await.unwrap();
        server.caseload(name, 0..3);
        within(60, device.sync()).await.expect("day 0 sync");
    }
    let shared = colleague.add_allergy(&nhs[0], "Penicillin");
    within(60, colleague.sync()).await.unwrap();
    within(60, drawer.sync()).await.unwrap();
    // The tablet records on day 0 and is put away before it syncs again.
    drawer.add_allergy(&nhs[0], "Recorded on day 0");
    let mistaken = drawer.add_allergy(&nhs[1], "Recorded in error on day 0");
    drawer.store.mark_entered_in_error(&nhs[1], Section::Allergies, mistaken, "wrong patient").unwrap();
    let waiting = drawer.store.pending_count().unwrap();
    assert!(waiting > 0);
    let documents = drawer.store.document_count().unwrap();

    // Day 200: the colleague marks the shared allergy entered in error and records another;
    // patient 2's record does not change.
    server.clock.set_offset(-200 * DAY);
    colleague_clock.set_offset(-200 * DAY);
    within(60, colleague.sync()).await.unwrap();
    colleague.store.mark_entered_in_error(&nhs[0], Section::Allergies, shared, "not this patient's").unwrap();
    colleague.add_allergy(&nhs[1], "Latex");
    within(60, colleague.sync()).await.unwrap();

    // Day 400 (now): the log is compacted on the usual schedule (a 30-day hold), and the
    // tablet, 400 days silent, is below the horizon.
    server.clock.set_offset(0);
    colleague_clock.set_offset(0);
    drawer_clock.set_offset(0);
    let compaction = ops::compact_log(server.store.as_ref(), ops::DEFAULT_COMPACTION_HOLD, false).unwrap();
    assert!(compaction.below.contains(&"tablet-in-a-drawer".to_string()), "{compaction:?}");
    assert!(compaction.dropped.entries > 0);
    // Its lease ran out long ago: patient data stays locked until it syncs.
    let locked = drawer.store.view_patient(&nhs[0], "view");
    assert!(
        matches!(locked, Err(StoreError::LeaseExpired { hours_ago, .. }) if hours_ago >= 400 * 24),
        "{locked:?}"
    );

    let report = within(60, drawer.sync()).await.expect("the sync after 400 days");
    assert_eq!(drawer.store.pending_count().unwrap(), 0, "what it recorded on day 0 is uploaded");
    assert!(report.stats.uploaded_changes >= waiting, "{:?}", report.stats);
    assert_eq!(report.stats.documents_received, 2, "the two changed records, whole; not a new cold sync");
    assert_eq!(drawer.store.document_count().unwrap(), documents, "the same records, no reset");
    assert!(drawer.store.enrolment().unwrap().is_some(), "still enrolled");
    assert!(drawer.store.view_patient(&nhs[0], "view").is_ok(), "unlocked by the sync");

    within(60, colleague.sync()).await.unwrap();
    let expected0 = vec![("Penicillin".to_string(), true), ("Recorded on day 0".to_string(), false)];
    let expected1 = vec![("Latex".to_string(), false), ("Recorded in error on day 0".to_string(), true)];
    for device in [&drawer, &colleague] {
        let (got0, got1) = (allergies(device, &nhs[0]), allergies(device, &nhs[1]));
        for want in &expected0 {
            assert_eq!(got0.iter().filter(|g| *g == want).count(), 1, "{want:?} once: {got0:?}");
        }
        for want in &expected1 {
            assert_eq!(got1.iter().filter(|g| *g == want).count(), 1, "{want:?} once: {got1:?}");
        }
    }
}
