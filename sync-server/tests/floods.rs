//! Floods and bombs against a real server process, with its peak memory read from the kernel
//! (`VmHWM`, not a timing): unauthenticated enrolment peers announcing huge frames, compressed
//! change bombs from an enrolled device, and a crowd of MLLP connections sending endless
//! messages. The server stays under 300 MB and a legitimate device syncs afterwards.

mod common;
use common::{free_port, server, token};

use std::process::{Child, Stdio};
use std::time::Duration;

use care_node::client::DeviceConnection;
use care_node::crypto::{KdfParams, PassphraseWrapper};
use care_node::protocol::{ClientMessage, DocChanges, ServerMessage};
use care_node::store::DeviceStore;
use care_sync_server::store::{DeviceRegistry, Governance, PatientRecords};
use tokio::io::AsyncWriteExt;

/// The process's peak resident memory, in MB.
fn peak_mb(child: &Child) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn floods_and_bombs_keep_the_server_under_300_mb_and_a_legitimate_device_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    assert!(server(&data, &["generate", "--patients", "200"]).status().unwrap().success());
    let (port, mllp) = (free_port(), free_port());
    let hostile_token = token(&data, "stolen", port);
    let legit_token = token(&data, "crew", port);
    let spare = token(&data, "spare", port);
    let mut process = server(
        &data,
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--mllp-listen",
            &format!("127.0.0.1:{mllp}"),
            "--admin-listen",
            "127.0.0.1:0",
        ],
    )
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(700));

    let wrapper =
        PassphraseWrapper::with_params("p", KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 });
    let mut hostile = DeviceStore::open(&dir.path().join("stolen.db"), &wrapper).unwrap();
    let mut crew = DeviceStore::open(&dir.path().join("crew.db"), &wrapper).unwrap();
    care_node::client::enrol(&mut hostile, &hostile_token).await.unwrap();
    care_node::client::enrol(&mut crew, &legit_token).await.unwrap();
    let target = {
        let store = care_sync_server::store::sqlite::SqliteStore::open(&data).unwrap();
        let patients = store.patient_ids().unwrap();
        for name in ["stolen", "crew"] {
            let id = store.device_by_name(name).unwrap().unwrap().id;
            for (patient, _) in patients.iter().take(20) {
                store.caseload_add(id, patient).unwrap();
            }
        }
        patients[0].0
    };
    care_node::client::sync(&mut hostile).await.unwrap();
    care_node::client::sync(&mut crew).await.unwrap();
    let before = peak_mb(&process);
    // The legitimate device's reconnect without floods, then again and again while they run.
    let mut baseline = Duration::ZERO;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        care_node::client::sync(&mut crew).await.unwrap();
        baseline = baseline.max(started.elapsed());
    }
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let beside = tokio::spawn({
        let flooding = flooding.clone();
        async move {
            let mut slowest = Duration::ZERO;
            let mut syncs = 0;
            while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                let started = std::time::Instant::now();
                care_node::client::sync(&mut crew)
                    .await
                    .expect("the legitimate device syncs during the floods");
                slowest = slowest.max(started.elapsed());
                syncs += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (crew, slowest, syncs)
        }
    });

    // 1. A hundred unauthenticated peers, each announcing an 8 MiB enrolment frame.
    let token = care_node::token::EnrolmentToken::decode(&spare).unwrap();
    let mut peers = Vec::new();
    for _ in 0..100 {
        if let Ok(mut conn) = DeviceConnection::open_enrol(&token).await {
            let _ = conn.send_raw(&[0x00, 0x7f, 0xff, 0xff]).await;
            let _ = conn.send_raw(&vec![0u8; 64 * 1024]).await;
            peers.push(conn);
        }
    }
    assert_eq!(peers.len(), 100, "every unauthenticated peer got a connection");
    // 2. Compressed change bombs (256 MiB of zeros each, in about 256 KB) from the enrolled device:
    // five uploads of eight; the first of each is inflated up to the limit and refuses the rest.
    let bomb = care_node::chunk::deflate_bomb(256); // 256 MiB of zeros
    for _ in 0..5 {
        let mut conn = DeviceConnection::open(&hostile).await.unwrap();
        let cursor = hostile.sync_state().unwrap().cursor;
        conn.send(&ClientMessage::Hello { cursor, resume: None, staged_server_key: None, incarnation: None })
            .await
            .unwrap();
        assert!(matches!(conn.recv().await.unwrap(), Some(ServerMessage::Welcome { .. })));
        let docs =
            vec![DocChanges { doc: target, changes: vec![serde_bytes::ByteBuf::from(bomb.clone()); 8] }];
        conn.send(&ClientMessage::Upload { through: 1, docs }).await.unwrap();
        match conn.recv().await.unwrap() {
            Some(ServerMessage::UploadAck { refused, .. }) => assert_eq!(refused[0].rule, "too-large"),
            other => panic!("{other:?}"),
        }
    }
    // 3. Four hundred MLLP connections, each sending a megabyte that never ends a message.
    let mut sockets = Vec::new();
    for _ in 0..400 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", mllp)).await {
            let _ = tokio::time::timeout(Duration::from_millis(50), s.write_all(&vec![b'A'; 1 << 20])).await;
            sockets.push(s);
        }
    }
    assert!(sockets.len() >= 32, "the MLLP listener took connections ({})", sockets.len());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The legitimate device synced throughout, no slower than a second beyond its baseline, and
    // syncs once more with every flood still connected.
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let (mut crew, slowest, syncs) =
        tokio::time::timeout(Duration::from_secs(60), beside).await.unwrap().unwrap();
    let report = tokio::time::timeout(Duration::from_secs(30), care_node::client::sync(&mut crew)).await;
    assert!(matches!(report, Ok(Ok(_))), "the legitimate device syncs: {report:?}");
    let peak = peak_mb(&process);
    drop((peers, sockets));
    process.kill().unwrap();
    process.wait().unwrap();
    eprintln!("server peak resident memory: {before} MB before the floods, {peak} MB after");
    eprintln!(
        "legitimate device: {syncs} syncs during the floods, slowest {slowest:?} (baseline {baseline:?})"
    );
    assert!(peak < 300, "peak {peak} MB");
    assert!(syncs >= 1, "the device synced while the floods ran");
    assert!(slowest < baseline + Duration::from_secs(1), "slowest {slowest:?}, baseline {baseline:?}");
}
