//! Resumability against a real server process: kill it (SIGKILL) in the middle of a device's
//! cold sync, start it again, and the next sync completes with nothing lost and nothing that was
//! already applied sent again.

mod common;
use common::{free_port, server, token};

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use care_node::crypto::{KdfParams, PassphraseWrapper};
use care_node::store::DeviceStore;

const PATIENTS: usize = 3_000;

fn serve(data: &Path, port: u16) -> Child {
    let child = server(
        data,
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--mllp-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
    )
    .stdout(Stdio::null())
    .spawn()
    .expect("server starts");
    std::thread::sleep(Duration::from_millis(500));
    child
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_server_loses_nothing_and_resends_nothing_applied() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    assert!(server(&data, &["generate", "--patients", &PATIENTS.to_string()]).status().unwrap().success());
    let port = free_port();
    let token = token(&data, "tablet", port);
    let mut server_process = serve(&data, port);

    let wrapper =
        PassphraseWrapper::with_params("p", KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 });
    let mut device = DeviceStore::open(&dir.path().join("device.db"), &wrapper).unwrap();
    care_node::client::enrol(&mut device, &token).await.expect("enrol");
    // Every patient on the tablet's caseload (the store is shared safely in WAL mode).
    {
        let store = care_sync_server::store::sqlite::SqliteStore::open(&data).unwrap();
        use care_sync_server::store::{DeviceRegistry, Governance, PatientRecords};
        let id = store.device_by_name("tablet").unwrap().unwrap().id;
        for (patient, _) in store.patient_ids().unwrap() {
            store.caseload_add(id, &patient).unwrap();
        }
    }

    // Kill the server as soon as the first documents have landed on the device.
    let (first_page, mut landed) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let sync = tokio::spawn(async move {
        let mut progress = move |s: &care_node::sync::SyncStats| {
            let _ = first_page.send(s.documents_received);
        };
        let result = care_node::client::sync_with_progress(&mut device, &mut progress).await;
        (device, result)
    });
    loop {
        let received = tokio::time::timeout(Duration::from_secs(60), landed.recv()).await.unwrap().unwrap();
        if received > 0 {
            break;
        }
    }
    server_process.kill().unwrap();
    server_process.wait().unwrap();
    let (mut device, result) = tokio::time::timeout(Duration::from_secs(90), sync).await.unwrap().unwrap();
    assert!(result.is_err(), "the cut sync reports an error");
    let applied = device.document_count().unwrap();
    assert!(applied > 0 && (applied as usize) < PATIENTS, "the cut came mid-sync ({applied} applied)");

    let mut server_process = serve(&data, port);
    let report = care_node::client::sync(&mut device).await.expect("the next sync completes");
    server_process.kill().unwrap();
    server_process.wait().unwrap();
    assert_eq!(device.document_count().unwrap() as usize, PATIENTS, "nothing lost");
    assert_eq!(
        report.stats.documents_received as usize,
        PATIENTS - applied as usize,
        "documents applied before the kill are not sent again"
    );
}

/// Patients in the store at `data`, and how many distinct NHS numbers they hold.
fn patients_in(data: &Path) -> (usize, usize) {
    use care_sync_server::store::PatientRecords;
    let store = care_sync_server::store::sqlite::SqliteStore::open(data).unwrap();
    let ids = store.patient_ids().unwrap();
    let numbers: std::collections::HashSet<_> = ids.iter().filter_map(|(_, nhs)| nhs.clone()).collect();
    (ids.len(), numbers.len())
}

#[test]
fn an_import_killed_half_way_and_run_again_holds_every_patient_exactly_once() {
    const N: usize = 800;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fhir");
    let generated = server(
        &dir.path().join("generator"),
        &["generate", "--patients", &N.to_string(), "--fhir-out", out.to_str().unwrap(), "--ndjson"],
    )
    .stderr(Stdio::piped())
    .output()
    .unwrap();
    assert!(generated.status.success(), "{}", String::from_utf8_lossy(&generated.stderr));
    let file = out.join("patients.ndjson");
    let data = dir.path().join("server");

    // Small transactions, killed (SIGKILL) once some of them are committed.
    let mut import = server(&data, &["import-fhir", "--batch", "4", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(import.try_wait().unwrap().is_none(), "the import ended before it could be killed");
        assert!(std::time::Instant::now() < deadline, "the import committed nothing in two minutes");
        if data.join("server.db").exists() && patients_in(&data).0 >= 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    import.kill().unwrap();
    import.wait().unwrap();
    let (killed_at, _) = patients_in(&data);
    assert!(killed_at < N, "killed half-way: {killed_at} of {N} committed");

    let rerun =
        server(&data, &["import-fhir", file.to_str().unwrap()]).stderr(Stdio::piped()).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&rerun.stdout), String::from_utf8_lossy(&rerun.stderr));
    assert!(rerun.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("resuming after"), "{stderr}");
    // Every patient once: as many records as patients, each its own NHS number.
    assert_eq!(patients_in(&data), (N, N));
    // The rerun read on from the last commit (with at most the patients of one uncommitted batch
    // after it), instead of everything again.
    let again: usize = stdout.split_whitespace().next().unwrap().parse().unwrap();
    assert!(again <= N - killed_at + 4, "{stdout}");
}
