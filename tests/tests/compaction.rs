//! Compaction of the server's change log: the log stops growing for ever, and a device that was
//! offline across a compaction loses nothing — it receives the documents that changed whole,
//! merges them with what it recorded offline, and hears the news it missed.

use std::time::Duration;

use care_sync_e2e::{TestDevice, TestServer, admit_over_mllp, within};
use care_sync_server::operator::ops;
use care_sync_server::store::{AuditFilter, Role, ServerStore};

fn count(list: &[String], text: &str) -> usize {
    list.iter().filter(|s| *s == text).count()
}

fn cursor(server: &TestServer, name: &str) -> u64 {
    server.store.device_by_name(name).unwrap().unwrap().acked_cursor
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_offline_across_a_compaction_loses_nothing_and_hears_the_news() {
    let server = TestServer::in_memory(3);
    let store: &dyn ServerStore = server.store.as_ref();
    let nhs = server.patients.clone();
    let mut busy = TestDevice::enrolled(&server, "nurse-busy", Role::CommunityNurse).await;
    let mut away = TestDevice::enrolled(&server, "nurse-away", Role::CommunityNurse).await;
    server.caseload("nurse-busy", 0..3);
    server.caseload("nurse-away", 0..3);
    within(60, busy.sync()).await.unwrap();
    within(60, away.sync()).await.unwrap();

    // The away nurse records offline and stays offline; meanwhile a colleague records and
    // syncs, and the hospital admits patient 1.
    away.add_allergy(&nhs[0], "Recorded away");
    for i in 0..4 {
        busy.add_allergy(&nhs[i % 2], &format!("Recorded busy {i}"));
        within(60, busy.sync()).await.unwrap();
    }
    let mllp =
        care_sync_server::ingest::hl7::mllp::start(server.store.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
    assert!(admit_over_mllp(mllp.addr, &nhs[1], "COMPACT1").await.contains("MSA|AA"));
    mllp.stop();
    within(60, busy.sync()).await.unwrap();
    let head = store.max_seq().unwrap();
    assert_eq!(cursor(&server, "nurse-busy"), head, "the busy nurse has everything");
    assert!(cursor(&server, "nurse-away") < head);

    // With the default hold, the away nurse (synced minutes ago) holds the log back.
    let held = ops::compact_log(store, ops::DEFAULT_COMPACTION_HOLD, true).unwrap();
    assert_eq!(held.horizon, cursor(&server, "nurse-away"));
    assert!(held.below.is_empty());
    // With no hold, only the busy nurse counts: a dry run says what would go, and changes nothing.
    let dry = ops::compact_log(store, Duration::ZERO, true).unwrap();
    assert_eq!(dry.horizon, head);
    assert_eq!(dry.below, vec!["nurse-away".to_string()]);
    assert!(dry.dropped.entries > 0 && dry.dropped.bytes > 0, "{dry:?}");
    assert_eq!(store.log_horizon().unwrap(), 0, "a dry run changes nothing");
    let done = ops::compact_log(store, Duration::ZERO, false).unwrap();
    assert_eq!(done.dropped, dry.dropped, "it drops what the dry run said");
    assert_eq!(store.log_horizon().unwrap(), head);
    assert_eq!(store.log_below(head).unwrap().entries, 0, "the log below the horizon is empty");
    assert_eq!(store.max_seq().unwrap(), head, "the head stays where it was");
    let audit = store.audit_entries(&AuditFilter::default()).unwrap();
    assert_eq!(audit.iter().filter(|a| a.action == "compact-log").count(), 1, "audited once");
    let again = ops::compact_log(store, Duration::ZERO, false).unwrap();
    assert_eq!(again.dropped.entries, 0, "a second compaction finds nothing to drop");

    // The away nurse returns: her entry uploads, the two changed documents arrive whole (the
    // log no longer has their changes), and the admission she missed is news on her device.
    let report = within(60, away.sync()).await.expect("the sync after the compaction");
    assert_eq!(report.stats.documents_received, 2, "patients 0 and 1 changed: {:?}", report.stats);
    assert_eq!(report.stats.changes_received, 0, "nothing from the compacted log");
    assert!(report.stats.notifications >= 1, "the admission is news: {:?}", report.stats);
    let (on_away_0, on_away_1) = (away.allergies(&nhs[0]), away.allergies(&nhs[1]));
    let expected: [(&Vec<String>, &[&str]); 2] = [
        (&on_away_0, &["Recorded away", "Recorded busy 0", "Recorded busy 2"]),
        (&on_away_1, &["Recorded busy 1", "Recorded busy 3"]),
    ];
    for (list, texts) in expected {
        for text in texts {
            assert_eq!(count(list, text), 1, "{text} once on the returning device: {list:?}");
        }
    }
    within(60, busy.sync()).await.unwrap();
    let on_busy_0 = busy.allergies(&nhs[0]);
    assert_eq!(count(&on_busy_0, "Recorded away"), 1, "the offline entry reached the colleague once");
    let mut a = on_away_0.clone();
    let mut b = on_busy_0.clone();
    a.sort();
    b.sort();
    assert_eq!(a, b, "both devices show the same allergies");

    // Above the horizon again, the returning device gets changes, not documents.
    busy.add_allergy(&nhs[2], "Recorded after");
    within(60, busy.sync()).await.unwrap();
    let report = within(60, away.sync()).await.unwrap();
    assert_eq!(report.stats.documents_received, 0, "{:?}", report.stats);
    assert!(report.stats.changes_received >= 1, "{:?}", report.stats);
    assert_eq!(count(&away.allergies(&nhs[2]), "Recorded after"), 1);
}
