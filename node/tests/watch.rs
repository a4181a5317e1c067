//! `care-node sync --watch` against a real server: each notification is printed as its round
//! arrives, while the command still runs, not when it is stopped.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use care_sync_e2e::{TestServer, admit_over_mllp, within};
use care_sync_server::store::Role;

fn care_node(store: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_care-node"));
    command.arg("--store").arg(store).env("CARE_NODE_PASSPHRASE", "watch passphrase");
    command
}

/// Waits up to `secs` for a line of the running command that contains `text`.
fn line_with(lines: &std::sync::mpsc::Receiver<String>, text: &str, secs: u64) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(text) => return Some(line),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_watch_prints_a_notification_as_it_arrives() {
    let server = TestServer::start(2).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("nurse.db");
    let token = server.token("nurse-cli", Role::CommunityNurse);
    let enrol = tokio::task::spawn_blocking({
        let mut command = care_node(&store);
        move || command.arg("enrol").arg(token).output().unwrap()
    });
    let enrol = within(60, enrol).await.unwrap();
    assert!(enrol.status.success(), "{}", String::from_utf8_lossy(&enrol.stderr));
    server.caseload("nurse-cli", [0]);
    // The first sync brings the patient; notifications come of what changes afterwards.
    let first = tokio::task::spawn_blocking({
        let mut command = care_node(&store);
        move || command.arg("sync").output().unwrap()
    });
    let first = within(60, first).await.unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));

    let mut watching = care_node(&store)
        .args(["sync", "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = watching.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let started = tokio::task::block_in_place(|| line_with(&lines, "watching for changes", 30));
    assert!(started.is_some(), "the live session started");

    // A hospital admission over MLLP: the nurse's terminal shows it while the watch runs.
    let mllp =
        care_sync_server::ingest::hl7::mllp::start(server.store.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
    let ack = admit_over_mllp(mllp.addr, &server.patients[0], "CLI1").await;
    assert!(ack.contains("MSA|AA|CLI1"), "{ack}");
    let printed = tokio::task::block_in_place(|| line_with(&lines, "admitted to Ward 7", 15));
    if printed.is_none() {
        let _ = watching.kill();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut watching.stderr.take().unwrap(), &mut err).unwrap();
        panic!("the admission was not printed while the watch ran; stderr: {err}");
    }
    assert!(watching.try_wait().unwrap().is_none(), "and the command is still watching");

    // Ctrl-C ends it cleanly, with its totals.
    let interrupted = Command::new("kill").args(["-INT", &watching.id().to_string()]).status().unwrap();
    assert!(interrupted.success());
    let stopped = tokio::task::block_in_place(|| line_with(&lines, "stopped:", 30));
    assert!(
        stopped.as_deref().is_some_and(|l| l.contains(" 1 notifications")),
        "a summary on stopping: {stopped:?}"
    );
    let status = tokio::task::block_in_place(|| {
        for _ in 0..300 {
            if let Some(status) = watching.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = watching.kill();
        None
    });
    assert!(status.is_some_and(|s| s.success()), "ended cleanly within 30 s: {status:?}");
    mllp.stop();
}
