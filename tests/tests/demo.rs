//! The main job, `care-sync-server demo`, run small: it must converge and report real figures.

use care_sync_server::demo::{self, DemoOptions};

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

    // Running it again in the same directory reuses the enrolled devices and still converges.
    let mut again = Vec::new();
    let options = DemoOptions { patients: 60, data_dir: Some(dir.path().to_path_buf()) };
    demo::run(options, &mut again).await.expect("demo runs again");
}
