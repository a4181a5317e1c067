//! Reconnect cost is proportional to what changed, not to what a device holds: byte counts at
//! 10,000 documents in scope (bytes are deterministic; time is measured by the bench binary).

use std::sync::Arc;

use care_node::summary::{Allergy, Demographics, PatientSummary, Provenance};
use care_sync_e2e::{TestDevice, within};
use care_sync_server::store::sqlite::SqliteStore;
use care_sync_server::store::{Role, ServerStore};
use care_sync_server::transport;

const DOCUMENTS: usize = 10_000;

#[tokio::test(flavor = "multi_thread")]
async fn reconnecting_with_ten_thousand_documents_costs_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ServerStore> = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let actor = care_sync_server::server_actor(&store.server_identity().unwrap());
    // Small documents keep this test quick; the bench binary uses the full synthetic population.
    let mut stem = 999_000_000u32;
    let mut nhs_numbers = Vec::new();
    for chunk in 0..DOCUMENTS / 1_000 {
        let mut batch = Vec::new();
        while batch.len() < 1_000 {
            stem += 1;
            let Some(nhs) = care_node::nhs::NhsNumber::from_stem(stem) else { continue };
            let id = uuid::Uuid::from_u128((chunk * 1_000 + batch.len()) as u128 + 1);
            batch.push(
                PatientSummary::create(
                    id,
                    &Demographics::new("Scale Test", Some(nhs.as_str())),
                    actor.clone(),
                    0,
                )
                .unwrap(),
            );
            nhs_numbers.push(nhs);
        }
        store.insert_patients(&mut batch).unwrap();
    }
    let running = transport::start(store.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let token = care_sync_server::operator::ops::issue_token(
        store.as_ref(),
        "tablet",
        Role::AmbulanceCrew,
        running.addr,
        care_sync_server::operator::ops::DEFAULT_TOKEN_TTL,
    )
    .unwrap();
    let mut device = TestDevice::new("tablet");
    care_node::client::enrol(&mut device.store, &token).await.unwrap();
    let id = store.device_by_name("tablet").unwrap().unwrap().id;
    for (pid, _) in store.patient_ids().unwrap() {
        store.caseload_add(id, &pid).unwrap();
    }

    let mut progress = Vec::new();
    let cold = within(
        600,
        care_node::client::sync_with_progress(&mut device.store, &mut |s| {
            progress.push((s.round_applied, s.round_items))
        }),
    )
    .await
    .unwrap();
    assert!(progress.len() >= 100, "progress at every hundredth of the round: {} calls", progress.len());
    assert!(
        progress.iter().all(|(applied, total)| *total == DOCUMENTS as u64 && *applied > 0),
        "the total is known from the first call, which comes with the first item"
    );
    let step = (DOCUMENTS as u64 / 100).max(1);
    assert!(
        progress.windows(2).all(|w| w[0].0 <= w[1].0 && w[1].0 - w[0].0 <= step),
        "progress only moves forward, a hundredth at a time"
    );
    assert_eq!(cold.stats.documents_received as usize, DOCUMENTS);
    assert!(cold.frame_bytes() > 1_000_000, "a cold sync moves every document");
    assert_eq!((cold.stats.round_items, cold.stats.round_applied), (DOCUMENTS as u64, DOCUMENTS as u64));

    let idle = within(60, device.sync()).await.unwrap();
    assert_eq!(idle.stats.documents_received + idle.stats.changes_received, 0);
    assert!(idle.frame_bytes() < 400, "nothing changed: {} frame bytes", idle.frame_bytes());

    // One patient changes on the server (a feed adds an allergy).
    let patient = store.patient_by_nhs(&nhs_numbers[4_321]).unwrap().unwrap();
    let mut summary = PatientSummary::load(&store.load_document(&patient).unwrap().unwrap()).unwrap();
    summary.set_actor(actor.to_bytes());
    let before = summary.heads();
    summary.add(&Allergy::new("Penicillin", Provenance::new("server", "GP record", "gp-feed", 1))).unwrap();
    store.apply_server_changes(&patient, &summary.changes_since(&before)).unwrap();
    let one = within(60, device.sync()).await.unwrap();
    assert_eq!(one.stats.changes_received, 1);
    assert!(one.frame_bytes() < 4_096, "one change: {} frame bytes", one.frame_bytes());
    println!(
        "10,000 documents: cold {} frame bytes; reconnect, nothing changed {} bytes; one changed {} bytes",
        cold.frame_bytes(),
        idle.frame_bytes(),
        one.frame_bytes()
    );
    running.shutdown().await;
}
