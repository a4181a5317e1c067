//! `care-sync-bench`: sync figures on this machine, printed as tables.
//!
//! The server runs in a child process (this binary again, in its server role), so the server's
//! and the device's peak memory are measured apart. Both talk QUIC over 127.0.0.1.
//!
//! For each N (default 1,000 and 10,000; give others on the command line, e.g. `100000`) the
//! server holds N synthetic patients, all in one device's scope, and the device measures: the cold
//! sync; reconnects with 0, 1 and 100 documents changed (time split into handshake, exchange and
//! close; frame and UDP bytes); its store's size against plain Automerge; the per-document floor
//! (Automerge load and save, XChaCha20-Poly1305, SQLite insert) that the cold sync is compared
//! with; and both processes' peak memory.
//!
//! Then the live test (`--live D`, default 1,000, `--live 0` to skip): D devices, each with the
//! same "hot" patient and two of its own in scope, keep live sessions open; the server changes the
//! hot patient 20 times; the bench records when each device has applied each change: p50, p99 and
//! max of the propagation latency.
//!
//! Run it optimised: `cargo run --release -p care-sync-server --bin care-sync-bench [N...]`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use care_node::client::{self, SyncReport};
use care_node::crypto::{DataKey, KdfParams, PassphraseWrapper};
use care_node::store::DeviceStore;
use care_node::summary::{Allergy, PatientId, PatientSummary, Provenance};
use care_sync_server::population::Population;
use care_sync_server::sqlite::SqliteStore;
use care_sync_server::store::{Role, ServerStore};

/// The population seed of every run, so runs are comparable.
const SEED: u64 = 7;
/// Changes made to the hot patient in the live test.
const LIVE_CHANGES: usize = 20;

fn peak_rss_mb(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn file_size(path: &std::path::Path) -> u64 {
    let wal = path.with_extension("db-wal");
    std::fs::metadata(path).map_or(0, |m| m.len()) + std::fs::metadata(wal).map_or(0, |m| m.len())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------- server role (child process)

/// The server role: `care-sync-bench --server-role DIR N`. Generates N patients, serves, and
/// answers commands on stdin, one line each: `devices K` (K tokens, each device gets patient 0 and
/// two of its own), `change K` (K documents changed), `touch` (patient 0 changed), `peak`, `quit`.
fn server_role(dir: &str, n: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let store: Arc<dyn ServerStore> = Arc::new(SqliteStore::open(std::path::Path::new(dir)).expect("store"));
    let actor = care_sync_server::server_actor(&store.server_identity().expect("identity"));
    let t = Instant::now();
    let mut population = Population::new(SEED, actor.clone());
    let mut plain_bytes = 0u64;
    let mut made = 0;
    while made < n {
        let batch = (n - made).min(1_000);
        let mut summaries: Vec<PatientSummary> =
            (0..batch).map(|_| population.next_patient(0).expect("patient")).collect();
        plain_bytes += summaries.iter_mut().map(|s| s.save().len() as u64).sum::<u64>();
        store.insert_patients(&mut summaries).expect("insert");
        made += batch;
    }
    let generation = t.elapsed();
    let ids: Vec<PatientId> = store.patient_ids().expect("ids").into_iter().map(|(id, _)| id).collect();
    let running = runtime
        .block_on(care_sync_server::server::start(store.clone(), "127.0.0.1:0".parse().expect("addr")))
        .expect("server");
    let addr = running.addr;
    let token = |name: &str| {
        care_sync_server::ops::issue_token(
            store.as_ref(),
            name,
            Role::AmbulanceCrew,
            addr,
            care_sync_server::ops::DEFAULT_TOKEN_TTL,
        )
        .expect("token")
    };
    let device = token("tablet");
    let device_id = store.device_by_name("tablet").expect("device").expect("device").id;
    for id in &ids {
        store.caseload_add(device_id, id).expect("caseload");
    }
    store.set_device_budget(device_id, Some(n as u64 + 1)).expect("budget");
    println!("ready {addr} {device} {} {plain_bytes}", generation.as_millis());
    let change = |id: &PatientId, label: &str| {
        let mut s = PatientSummary::load(&store.load_document(id).expect("doc").expect("doc")).expect("load");
        s.set_actor(actor.to_bytes());
        let before = s.heads();
        s.add(&Allergy::new(label, Provenance::new("server", "bench", "gp-feed", 1))).expect("add");
        store.apply_server_changes(id, &s.changes_since(&before)).expect("apply");
    };
    let mut touches = 0;
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("command");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["change", k] => {
                let k: usize = k.parse().expect("count");
                for (i, id) in ids.iter().step_by((n / k).max(1)).take(k).enumerate() {
                    change(id, &format!("Bench allergen {i}"));
                }
                println!("changed {k}");
            }
            ["devices", k] => {
                let k: usize = k.parse().expect("count");
                for d in 0..k {
                    let name = format!("live-{d}");
                    let t = token(&name);
                    let id = store.device_by_name(&name).expect("device").expect("device").id;
                    for p in [0, 1 + 2 * d % (n - 1), 2 + 2 * d % (n - 2)] {
                        store.caseload_add(id, &ids[p]).expect("caseload");
                    }
                    println!("token {t}");
                }
            }
            ["touch"] => {
                touches += 1;
                let at = unix_ms();
                change(&ids[0], &format!("Live allergen {touches}"));
                println!("touched {at}");
            }
            ["peak"] => println!("peak {:.0}", peak_rss_mb("self")),
            ["quit"] => break,
            other => panic!("unknown command {other:?}"),
        }
        std::io::stdout().flush().expect("stdout");
    }
    runtime.block_on(running.shutdown());
}

/// The server child process and its command pipe.
struct Server {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(n: usize) -> (Server, Vec<String>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .arg("--server-role")
            .arg(dir.path())
            .arg(n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("server process");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut server = Server { child, stdin, stdout, _dir: dir };
        let ready = server.line();
        let words: Vec<String> = ready.split_whitespace().map(str::to_string).collect();
        assert_eq!(words[0], "ready", "{ready}");
        (server, words[1..].to_vec())
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("server answers");
        line.trim().to_string()
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("server command");
        self.stdin.flush().expect("flush");
        self.line()
    }

    fn stop(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- device role (this process)

struct Floor {
    load: Duration,
    save: Duration,
    seal: Duration,
    insert: Duration,
}

/// The per-document floor, measured on `docs` saved documents.
fn floor(docs: &[Vec<u8>]) -> Floor {
    let n = docs.len() as u32;
    let t = Instant::now();
    let mut loaded: Vec<PatientSummary> =
        docs.iter().map(|d| PatientSummary::load(d).expect("load")).collect();
    let load = t.elapsed() / n;
    let t = Instant::now();
    let saved: Vec<Vec<u8>> = loaded.iter_mut().map(|d| d.save()).collect();
    let save = t.elapsed() / n;
    let key = DataKey::generate();
    let t = Instant::now();
    let sealed: Vec<Vec<u8>> = saved.iter().map(|d| key.seal(d, b"bench")).collect();
    let seal = t.elapsed() / n;
    let dir = tempfile::tempdir().expect("temp dir");
    let conn = rusqlite::Connection::open(dir.path().join("floor.db")).expect("sqlite");
    conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
    conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)").expect("table");
    let t = Instant::now();
    conn.execute_batch("BEGIN").expect("begin");
    for (i, s) in sealed.iter().enumerate() {
        conn.execute("INSERT INTO t VALUES (?1, ?2)", rusqlite::params![i as i64, s]).expect("insert");
    }
    conn.execute_batch("COMMIT").expect("commit");
    let insert = t.elapsed() / n;
    Floor { load, save, seal, insert }
}

fn wrapper() -> PassphraseWrapper {
    PassphraseWrapper::with_params("bench", KdfParams::default())
}

async fn run(n: usize) {
    let (mut server, ready) = Server::start(n);
    let (token, generation_ms, plain_bytes): (&str, u64, u64) =
        (&ready[1], ready[2].parse().expect("ms"), ready[3].parse().expect("bytes"));
    let dir = tempfile::tempdir().expect("temp dir");
    let device_path = dir.path().join("device.db");
    let mut device = DeviceStore::open(&device_path, &wrapper()).expect("device store");
    client::enrol(&mut device, token).await.expect("enrol");

    let cold = client::sync(&mut device).await.expect("cold sync");
    assert_eq!(cold.stats.documents_received as usize, n);
    let idle = client::sync(&mut device).await.expect("reconnect");
    let mut changed = Vec::new();
    for k in [1usize, 100] {
        assert_eq!(server.ask(&format!("change {k}")), format!("changed {k}"));
        let report = client::sync(&mut device).await.expect("reconnect");
        assert_eq!(report.stats.changes_received as usize, k);
        changed.push((k, report));
    }
    let device_peak = peak_rss_mb("self");
    let server_peak: f64 = server.ask("peak").trim_start_matches("peak ").parse().expect("peak");
    server.stop();

    let mut population = Population::new(SEED, automerge::ActorId::random());
    let sample: Vec<Vec<u8>> =
        (0..n.min(1_000)).map(|_| population.next_patient(0).expect("patient").save()).collect();
    let f = floor(&sample);
    let floor_total = (f.load + f.save + f.seal + f.insert) * n as u32;
    println!(
        "\nN = {n} documents in scope (server generated them in {:.1} s; {:.1} KB per saved document)",
        generation_ms as f64 / 1000.0,
        plain_bytes as f64 / n as f64 / 1024.0
    );
    println!(
        "  {:<24} {:>9} {:>10} {:>10} {:>9} {:>12} {:>11}",
        "", "total ms", "handshake", "exchange", "close", "frame bytes", "UDP bytes"
    );
    let row = |name: &str, r: &SyncReport| {
        let close = r.duration.saturating_sub(r.handshake + r.exchange);
        println!(
            "  {name:<24} {:>9.1} {:>10.1} {:>10.1} {:>9.1} {:>12} {:>11}",
            ms(r.duration),
            ms(r.handshake),
            ms(r.exchange),
            ms(close),
            r.frame_bytes(),
            r.udp_bytes()
        )
    };
    row("cold sync", &cold);
    row("reconnect, 0 changed", &idle);
    for (k, r) in &changed {
        row(&format!("reconnect, {k} changed"), r);
    }
    println!(
        "  per-document floor: load {:.0} µs + save {:.0} µs + seal {:.1} µs + insert {:.1} µs = {:.1} ms for N; cold sync / floor = {:.2}",
        f.load.as_secs_f64() * 1e6,
        f.save.as_secs_f64() * 1e6,
        f.seal.as_secs_f64() * 1e6,
        f.insert.as_secs_f64() * 1e6,
        ms(floor_total),
        cold.duration.as_secs_f64() / floor_total.as_secs_f64()
    );
    let on_disk = file_size(&device_path);
    println!(
        "  device store {:.1} MB on disk vs {:.1} MB plain Automerge ({:.2}x)",
        on_disk as f64 / 1e6,
        plain_bytes as f64 / 1e6,
        on_disk as f64 / plain_bytes as f64,
    );
    println!("  peak memory: server process {server_peak:.0} MB, device process {device_peak:.0} MB");
}

/// Raises the open-file limit to its hard maximum: each live device has a UDP socket and its
/// store's files.
fn raise_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct passed; no other memory is touched.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    limit.rlim_cur
}

/// The live test: `devices` devices keep live sessions; the hot patient changes LIVE_CHANGES times.
async fn live(devices: usize) {
    let files = raise_file_limit();
    assert!(files as usize > devices * 5, "open-file limit {files} is too low for {devices} devices");
    let (mut server, _) = Server::start(2_000);
    let mut tokens = Vec::new();
    writeln!(server.stdin, "devices {devices}").expect("command");
    server.stdin.flush().expect("flush");
    for _ in 0..devices {
        tokens.push(server.line().trim_start_matches("token ").to_string());
    }
    // The simulated devices' stores live in memory (tmpfs) where there is one: a thousand
    // devices sharing one disk's fsync queue is an artefact of simulating them on one machine,
    // not a cost any real device has. The server's store stays on disk.
    let dir = match std::path::Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm").expect("temp dir"),
        false => tempfile::tempdir().expect("temp dir"),
    };
    let cheap = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
    let t = Instant::now();
    let (arrivals_tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<(usize, i64)>();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(32));
    for (i, token) in tokens.into_iter().enumerate() {
        let path = dir.path().join(format!("live-{i}.db"));
        let arrivals = arrivals_tx.clone();
        let mut stop = stop.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let mut store = {
                let _permit = gate.acquire().await.expect("gate");
                let mut store =
                    DeviceStore::open(&path, &PassphraseWrapper::with_params("bench", cheap)).expect("store");
                client::enrol(&mut store, &token).await.expect("enrol");
                store
            };
            let mut on_round = |_: &care_node::sync::SyncStats| {
                let _ = arrivals.send((i, unix_ms()));
            };
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            client::watch(&mut store, &mut on_round, stopped).await.expect("live session");
        }));
    }
    // Every device reports its first round once it is live.
    let mut live = std::collections::HashSet::new();
    while live.len() < devices {
        let (i, _) = arrivals.recv().await.expect("device rounds");
        live.insert(i);
    }
    let setup = t.elapsed();
    let mut latencies = Vec::new();
    let mut missing = 0;
    for _ in 0..LIVE_CHANGES {
        let touched: i64 = server.ask("touch").trim_start_matches("touched ").parse().expect("time");
        let mut seen = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.len() < devices {
            match tokio::time::timeout_at(deadline, arrivals.recv()).await {
                Ok(Some((i, at))) => {
                    if seen.insert(i) {
                        latencies.push((at - touched).max(0) as f64);
                    }
                }
                _ => break,
            }
        }
        missing += devices - seen.len();
        tokio::time::sleep(Duration::from_millis(200)).await;
        while arrivals.try_recv().is_ok() {}
    }
    let server_peak: f64 = server.ask("peak").trim_start_matches("peak ").parse().expect("peak");
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    server.stop();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct =
        |p: f64| latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)).copied();
    println!(
        "\nLive: {devices} devices with live sessions ({:.1} s to enrol, sync and connect them all); \
         the hot patient changed {LIVE_CHANGES} times",
        setup.as_secs_f64()
    );
    println!(
        "  propagation to every device: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} arrivals; {missing} missed the 10 s window",
        pct(0.50).unwrap_or(f64::NAN),
        pct(0.99).unwrap_or(f64::NAN),
        latencies.last().copied().unwrap_or(f64::NAN),
        latencies.len()
    );
    println!(
        "  peak memory: server process {server_peak:.0} MB, devices' process {:.0} MB",
        peak_rss_mb("self")
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--server-role") {
        server_role(&args[1], args[2].parse().expect("N"));
        return;
    }
    let mut sizes = Vec::new();
    let mut live_devices = 1_000;
    let mut words = args.iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "--live" => live_devices = words.next().and_then(|d| d.parse().ok()).expect("--live D"),
            n => sizes.push(n.parse::<usize>().unwrap_or_else(|_| panic!("not a size: {n}"))),
        }
    }
    if sizes.is_empty() {
        sizes = vec![1_000, 10_000];
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("care-sync bench: {cpus} CPU(s); server and devices in two processes, QUIC over 127.0.0.1");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    for n in sizes {
        runtime.block_on(run(n));
    }
    if live_devices > 0 {
        runtime.block_on(live(live_devices));
    }
}
