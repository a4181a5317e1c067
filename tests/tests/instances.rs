//! Issue 12: a region as two `care-sync-server` processes over one PostgreSQL database.
//!
//! Devices upload through both instances at once, a device watches on each and hears what
//! arrives through the other (changes, an admission, a revocation, a scope change) within a
//! second, and one instance is killed (SIGKILL) in the middle of a device's round. Afterwards
//! every acknowledged change is on every device that holds the patient, none twice, no device's
//! cursor ever moved back, and the killed instance's devices finished on the other one with the
//! enrolment they had.
//!
//! Needs a PostgreSQL cluster (`CARE_SYNC_POSTGRES_URL`, as `.ci/postgres` starts one); skipped
//! without one unless `CARE_SYNC_REQUIRE_POSTGRES=1`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use care_node::nhs::NhsNumber;
use care_node::sync::SyncStats;
use care_sync_e2e::{TestDevice, admit_over_mllp, enrolled_with_addrs, within, workspace_binary};
use care_sync_server::demo::population::Population;
use care_sync_server::store::ServerStore;
use care_sync_server::store::postgres::PostgresStore;
use care_sync_server::store::postgres::scratch::ScratchDatabase;

/// Patients everyone holds (the uploads go to these).
const SHARED: usize = 8;
/// Patients of the device whose first sync is cut by the kill: enough that its round is
/// several pages long.
const BIG: usize = 400;

/// One `care-sync-server serve` process.
struct Instance {
    child: Child,
    mllp: SocketAddr,
    _data: tempfile::TempDir,
}

impl Instance {
    fn start(url: &str, port: u16) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut child = Command::new(workspace_binary("care-sync-server"))
            .args(["--store-url", url, "--data-dir"])
            .arg(data.path())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--mllp-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("CARE_SYNC_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the server starts");
        // Its output goes on being read, so it never blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[instance :{port}] {line}");
            }
        });
        let (ready, mllp) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("HL7 v2 ADT over MLLP on ") {
                    let _ = ready.send(addr.trim().parse::<SocketAddr>().unwrap());
                }
            }
        });
        let mllp = mllp.recv_timeout(Duration::from_secs(60)).expect("the instance starts within 60 s");
        Instance { child, mllp, _data: data }
    }

    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The operator's CLI on the region's database (any machine with the URL).
fn operator(url: &str, args: &[&str]) -> String {
    let out = Command::new(workspace_binary("care-sync-server"))
        .args(["--store-url", url])
        .args(args)
        .env("CARE_SYNC_OPERATOR", "instances-test")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Syncs until a sync succeeds (an instance may be down: the device fails over), checking the
/// device's cursor never moves back.
async fn sync_until_done(device: &mut TestDevice, cursors: &mut Vec<u64>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let result = within(60, device.sync()).await;
        let cursor = device.store.sync_state().unwrap().cursor;
        assert!(cursors.last().is_none_or(|last| cursor >= *last), "{}: the cursor moved back", device.name);
        cursors.push(cursor);
        match result {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("{}: sync failed, trying again: {e}", device.name);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{}: no sync succeeded within 60 s: {e}", device.name),
        }
    }
}

/// What one pushed round brought (a session's stats add up over its rounds: these are one
/// round's share).
#[derive(Debug, Clone, Copy, Default)]
struct Round {
    changes: u64,
    notifications: u64,
    documents: u64,
}

/// What a watching device heard: each pushed round, as it came.
type Heard = tokio::sync::mpsc::UnboundedReceiver<(Instant, Round)>;

/// Watches (reconnecting, through whichever instance answers, whenever a session ends) until
/// `stop`; returns the device and how its last session ended.
fn watch(
    mut device: TestDevice,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Heard, tokio::task::JoinHandle<(TestDevice, Vec<String>)>) {
    let (heard_tx, heard) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut ended = Vec::new();
        while !*stop.borrow() {
            let heard_tx = heard_tx.clone();
            let mut before = SyncStats::default();
            let mut on_round = move |stats: &SyncStats| {
                let round = Round {
                    changes: stats.changes_received - before.changes_received,
                    notifications: stats.notifications - before.notifications,
                    documents: stats.documents_received - before.documents_received,
                };
                before = stats.clone();
                let _ = heard_tx.send((Instant::now(), round));
            };
            let mut stopping = stop.clone();
            let stopped = async move {
                let _ = stopping.wait_for(|s| *s).await;
            };
            match device.watch(&mut on_round, stopped).await {
                Ok(_) => {}
                Err(e) => {
                    use care_node::client::ClientError;
                    let refused = matches!(e, ClientError::Refused(_) | ClientError::DeviceRefused);
                    ended.push(e.to_string());
                    if refused {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        (device, ended)
    });
    (heard, task)
}

/// Waits up to `wait` for a pushed round that `wanted` accepts (given when it came); returns
/// when it came.
async fn heard_within(
    rounds: &mut Heard,
    what: &str,
    wait: Duration,
    wanted: impl Fn(Instant, &Round) -> bool,
) -> Instant {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, rounds.recv()).await {
            Ok(Some((at, stats))) if wanted(at, &stats) => return at,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the watcher stopped before {what}"),
            Err(_) => panic!("no pushed round with {what} within {wait:?}"),
        }
    }
}

/// [`heard_within`] 10 s, judging the round alone.
async fn heard(rounds: &mut Heard, what: &str, wanted: impl Fn(&Round) -> bool) -> Instant {
    heard_within(rounds, what, Duration::from_secs(10), |_, round| wanted(round)).await
}

/// Waits until the watcher has heard nothing for 300 ms, dropping what it heard: what it hears
/// next comes from what the test does next.
async fn quiet(rounds: &mut Heard) {
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), rounds.recv()).await {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_over_one_postgres_survive_losing_one_in_the_middle_of_a_round() {
    let Some(database) = ScratchDatabase::from_env() else {
        return eprintln!("skipped: no PostgreSQL cluster (CARE_SYNC_POSTGRES_URL)");
    };
    let url = database.url.clone();
    // The region's data, made through the store as an import would.
    let store: Arc<dyn ServerStore> = Arc::new(PostgresStore::open(&url).unwrap());
    let identity = store.server_identity().unwrap();
    let mut population = Population::new(12, care_sync_server::server_actor(&identity));
    let mut summaries: Vec<_> =
        (0..BIG + 1).map(|_| population.next_patient(care_node::now_ms()).unwrap()).collect();
    let ids = store.insert_patients(&mut summaries).unwrap();
    let nhs: Vec<NhsNumber> = summaries.iter().map(|s| s.nhs_number().unwrap()).collect();

    // Each device stays on the instance its token names first while it answers (however slow
    // a handshake is on a busy machine), and goes to the other 2 s after it stops answering.
    care_node::client::set_failover_stagger(Duration::from_secs(2));
    let (port_a, port_b) = (free_port(), free_port());
    let (a_first, b_first) =
        (format!("127.0.0.1:{port_a},127.0.0.1:{port_b}"), format!("127.0.0.1:{port_b},127.0.0.1:{port_a}"));
    let mut a = Instance::start(&url, port_a);
    let b = Instance::start(&url, port_b);

    // A watcher on each instance, an uploader on each, a device to revoke (on A), and one
    // with a large caseload whose first round the kill of A will cut.
    let names = ["watch-a", "watch-b", "upload-a", "upload-b", "revoked-a", "big-a"];
    let mut devices = HashMap::new();
    for name in names {
        let addrs = if name.ends_with("-a") { &a_first } else { &b_first };
        devices.insert(name, enrolled_with_addrs(store.as_ref(), name, addrs).await);
    }
    // Which patients each holds: watch-b does not hold patients 0 and 2, watch-a not patient 1,
    // so a round a watcher hears about them can only come through the other instance.
    let holds = |name: &str, patient: usize| match name {
        "big-a" => patient < BIG,
        "watch-a" => patient < SHARED && patient != 1,
        "watch-b" => patient < SHARED && patient != 0 && patient != 2,
        _ => patient < SHARED,
    };
    let device_id = |name: &str| store.device_by_name(name).unwrap().unwrap().id;
    for name in names {
        let entries: Vec<_> =
            (0..BIG).filter(|p| holds(name, *p)).map(|p| (device_id(name), ids[p])).collect();
        store.caseload_add_many(&entries).unwrap();
    }
    let enrolled_devices = store.devices().unwrap().len();
    let mut cursors: HashMap<&str, Vec<u64>> = HashMap::new();
    for name in ["watch-a", "watch-b", "upload-a", "upload-b", "revoked-a"] {
        sync_until_done(devices.get_mut(name).unwrap(), cursors.entry(name).or_default()).await;
    }

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (mut heard_a, watcher_a) = watch(devices.remove("watch-a").unwrap(), stop.clone());
    let (mut heard_b, watcher_b) = watch(devices.remove("watch-b").unwrap(), stop.clone());
    let (_, revoked) = watch(devices.remove("revoked-a").unwrap(), stop.clone());
    heard(&mut heard_a, "the first round", |_| true).await;
    heard(&mut heard_b, "the first round", |_| true).await;

    // A change uploaded through B reaches the watcher on A within a second, and one through A
    // the watcher on B.
    let mut acknowledged: Vec<(usize, String)> = Vec::new();
    for (uploader, watcher, patient) in [("upload-b", &mut heard_a, 0), ("upload-a", &mut heard_b, 1)] {
        quiet(watcher).await;
        let device = devices.get_mut(uploader).unwrap();
        let substance = format!("live-{uploader}");
        device.add_allergy(&nhs[patient], &substance);
        sync_until_done(device, cursors.entry(uploader).or_default()).await;
        let uploaded = Instant::now();
        let at = heard(watcher, "the other instance's upload", |r| r.changes > 0).await;
        let latency = at.saturating_duration_since(uploaded);
        assert!(latency < Duration::from_secs(1), "{uploader}'s change pushed after {latency:?}");
        acknowledged.push((patient, substance));
    }

    // An admission received by B reaches the watcher on A as a notification within a second.
    quiet(&mut heard_a).await;
    let sent = Instant::now();
    let ack = admit_over_mllp(b.mllp, &nhs[2], "INSTANCES1").await;
    assert!(ack.contains("MSA|AA|INSTANCES1"), "{ack}");
    let at = heard(&mut heard_a, "the admission", |r| r.notifications > 0).await;
    assert!(at.duration_since(sent) < Duration::from_secs(1), "admission pushed after {:?}", at - sent);

    // A scope change made by an operator reaches the watcher on A within a second of the
    // command returning.
    quiet(&mut heard_a).await;
    operator(&url, &["caseload", "add", "--device", "watch-a", "--nhs", nhs[SHARED].as_str()]);
    let changed = Instant::now();
    let at = heard(&mut heard_a, "the new caseload patient", |r| r.documents > 0).await;
    let latency = at.saturating_duration_since(changed);
    assert!(latency < Duration::from_secs(1), "scope change pushed after {latency:?}");

    // A revocation ends the live session on A within a second of the command returning.
    operator(&url, &["revoke-device", "revoked-a"]);
    let revoked_at = Instant::now();
    let (_, ended) = within(10, revoked).await.unwrap();
    assert!(
        revoked_at.elapsed() < Duration::from_secs(1),
        "revoked session ended after {:?}",
        revoked_at.elapsed()
    );
    assert!(ended.last().is_some_and(|e| e.contains("revoked")), "{ended:?}");

    // Now uploads through both at once while the large first sync runs through A, and A is
    // killed when that round is under way.
    // When the large round asked for the kill, and when the killed process was reaped.
    let a_killed = Arc::new(Mutex::new(None::<Instant>));
    let a_dead = Arc::new(Mutex::new(None::<Instant>));
    let dead = a_dead.clone();
    let mut big = devices.remove("big-a").unwrap();
    let mut up_a = devices.remove("upload-a").unwrap();
    let mut up_b = devices.remove("upload-b").unwrap();
    let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        if kill_rx.recv_timeout(Duration::from_secs(60)).is_ok() {
            a.kill();
            *dead.lock().unwrap() = Some(Instant::now());
        }
        a
    });
    let killed = a_killed.clone();
    let big_sync = async move {
        let mut first_cursors = Vec::new();
        let mut progress = move |stats: &SyncStats| {
            let mut killed = killed.lock().unwrap();
            if killed.is_none() && stats.round_applied >= 20 && stats.round_items > stats.round_applied {
                *killed = Some(Instant::now());
                let _ = kill_tx.send(());
                // Give the kill a moment to land while the round is still coming in.
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        let first = within(60, big.sync_with_progress(&mut progress)).await;
        first_cursors.push(big.store.sync_state().unwrap().cursor);
        (big, first, first_cursors)
    };
    let uploads = async {
        let mut mine = Vec::new();
        for round in 0..6 {
            for (device, tag) in [(&mut up_a, "a"), (&mut up_b, "b")] {
                let patient = round % SHARED;
                let substance = format!("upload-{tag}-{round}");
                device.add_allergy(&nhs[patient], &substance);
                mine.push((patient, substance));
            }
            let (ca, cb) = (
                cursors.get_mut("upload-a").map(std::mem::take),
                cursors.get_mut("upload-b").map(std::mem::take),
            );
            let (mut ca, mut cb) = (ca.unwrap_or_default(), cb.unwrap_or_default());
            tokio::join!(sync_until_done(&mut up_a, &mut ca), sync_until_done(&mut up_b, &mut cb));
            cursors.insert("upload-a", ca);
            cursors.insert("upload-b", cb);
        }
        mine
    };
    let ((mut big, first, big_cursors), mine) = tokio::join!(big_sync, uploads);
    acknowledged.extend(mine);
    let a = killer.join().unwrap();
    assert!(a_killed.lock().unwrap().is_some(), "the large round was under way when A was killed");
    assert!(first.is_err(), "the round through A cannot finish once A is killed: {first:?}");
    let held_after_cut = big.store.list().unwrap().len();
    assert!(held_after_cut < BIG, "A was killed before the round was over: {held_after_cut} of {BIG} held");
    // The same device, with the enrolment it had, finishes on B.
    let mut cursors_big = big_cursors;
    sync_until_done(&mut big, &mut cursors_big).await;
    assert_eq!(big.store.list().unwrap().len(), BIG, "the large caseload finished on B");
    assert!(big.store.sync_state().unwrap().resume.is_none());

    // The watcher on A notices its instance is gone within the QUIC idle timeout (30 s: a
    // killed process sends nothing, and loopback's refusals do not reach QUIC), reconnects
    // through B, and hears B's changes within a second again.
    let dead_at = a_dead.lock().unwrap().expect("A was killed");
    heard_within(&mut heard_a, "a session on B", Duration::from_secs(45), |at, _| at > dead_at).await;
    quiet(&mut heard_a).await;
    up_b.add_allergy(&nhs[3], "after-failover");
    let mut trail = cursors.remove("upload-b").unwrap_or_default();
    sync_until_done(&mut up_b, &mut trail).await;
    cursors.insert("upload-b", trail);
    let uploaded = Instant::now();
    let at = heard(&mut heard_a, "B's upload after the failover", |r| r.changes > 0).await;
    assert!(
        at.saturating_duration_since(uploaded) < Duration::from_secs(1),
        "pushed after {:?}",
        at - uploaded
    );
    acknowledged.push((3, "after-failover".into()));

    // Stop watching; every device syncs until quiet (through B: A is gone), then holds every
    // acknowledged change exactly once.
    stop_tx.send(true).unwrap();
    let (mut watch_a, ended_a) = within(30, watcher_a).await.unwrap();
    let (mut watch_b, _) = within(30, watcher_b).await.unwrap();
    assert!(!ended_a.is_empty(), "the watcher on A lost its session when A was killed");
    for (name, device) in [
        ("watch-a", &mut watch_a),
        ("watch-b", &mut watch_b),
        ("upload-a", &mut up_a),
        ("upload-b", &mut up_b),
        ("big-a", &mut big),
    ] {
        let mut trail = cursors.remove(name).unwrap_or_default();
        sync_until_done(device, &mut trail).await;
        sync_until_done(device, &mut trail).await;
        for (patient, substance) in acknowledged.iter().filter(|(p, _)| holds(name, *p)) {
            let count = device.allergies(&nhs[*patient]).iter().filter(|a| *a == substance).count();
            assert_eq!(count, 1, "{name} holds {substance} of patient {patient} {count} times");
        }
        assert_eq!(device.store.enrolment().unwrap().unwrap().device_name, name);
    }
    // No device enrolled again.
    assert_eq!(store.devices().unwrap().len(), enrolled_devices);
    drop((a, b));
}
