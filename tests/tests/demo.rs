//! The main job, `care-sync-server demo`, run small: it must converge and report real figures.

use care_sync_server::demo::{self, DemoOptions};
use care_sync_server::store::prelude::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_converges_and_reports_what_it_moved() {
    let dir = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    let options = DemoOptions { patients: 60, data_dir: Some(dir.path().to_path_buf()) };
    let report = demo::run(options, &mut out).await.expect("demo runs");
    let text = String::from_utf8(out).unwrap();
    assert_eq!(report.ambulance_documents, 30);
    assert_eq!(report.nurse_documents, 20);
    assert_eq!(report.shared_allergies_ambulance, report.shared_allergies_nurse);
    for substance in ["Chlorhexidine", "Adhesive dressings"] {
        assert!(report.shared_allergies_ambulance.iter().any(|s| s == substance));
    }
    assert_eq!(report.cold_sync[0].stats.documents_received, 30);
    assert!(text.contains("What the crew of ambulance-1 sees"));
    assert!(text.contains("As of "), "the view says how current it is");
    assert!(dir.path().join("server/server.db").exists());
    assert!(dir.path().join("devices/ambulance-1/store.db").exists());

    // Running it again in the same directory reuses the enrolled devices and still converges:
    // the same scopes, nothing received again on the devices' first sync, and the second
    // run's entries on both devices beside the first run's.
    let mut again = Vec::new();
    let options = DemoOptions { patients: 60, data_dir: Some(dir.path().to_path_buf()) };
    let second = demo::run(options, &mut again).await.expect("demo runs again");
    let server = care_sync_server::store::sqlite::SqliteStore::open(&dir.path().join("server")).unwrap();
    assert_eq!(server.patient_count().unwrap(), 60, "no patient made twice");
    drop(server);
    assert_eq!((second.ambulance_documents, second.nurse_documents), (30, 20));
    assert_eq!(
        second.cold_sync[0].stats.documents_received, 0,
        "the enrolled device already holds its patients"
    );
    assert_eq!(
        second.shared_allergies_ambulance, second.shared_allergies_nurse,
        "the replicas converge again"
    );
    for substance in ["Chlorhexidine", "Adhesive dressings"] {
        let recorded = second.shared_allergies_ambulance.iter().filter(|s| *s == substance).count();
        assert_eq!(recorded, 2, "{substance}: the first run's entry and the second's, each once");
    }
}
