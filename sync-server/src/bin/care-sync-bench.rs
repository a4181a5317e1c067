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
//! `--link 3g` (or `edge`, `flaky-wifi`, `loopback`) puts the seeded impairment relay of
//! `care_sync_server::demo::link` between the device and the server, prints the link's figures
//! beside the sync's (cold sync against the time the link's bandwidth allows for its bytes,
//! reconnects in round trips) and skips the live test unless `--live D` is given.
//!
//! `--feeds P` adds the feeds: P patients imported from NDJSON (`import-fhir`), HL7 v2 ADT from a
//! file and over MLLP, and the ACK latency at a steady rate.
//!
//! Run it optimised: `cargo run --release -p care-sync-server --bin care-sync-bench [--link L] [N...]`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use care_node::client::{self, SyncReport};
use care_node::crypto::{DataKey, KdfParams, PassphraseWrapper};
use care_node::store::DeviceStore;
use care_node::summary::PatientSummary;
use care_sync_server::demo::bench::{self, CutKind, SEED, Server, holds_hot, ms, peak_rss_mb, unix_ms};
use care_sync_server::demo::link::{Profile, Relay};
use care_sync_server::demo::population::Records;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Changes made to the hot patient in the live test.
const LIVE_CHANGES: usize = 20;

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

/// A cold sync of `n` over `link`, cut every `every` until it completes, beside the same cold
/// sync uncut.
async fn cut(n: usize, link: Profile, every: Duration, kind: CutKind) {
    let f = bench::measure_cut(n, link.clone(), every, kind).await;
    let what = match kind {
        CutKind::Lost => "the link lost",
        CutKind::Moved => "the device's address changed",
    };
    println!(
        "\nN = {n}, cold sync over {}, {what} every {:.0} s until done ({} times)",
        link.name,
        every.as_secs_f64(),
        f.cuts
    );
    println!("  {:<28} {:>9} {:>9} {:>12} {:>12}", "", "wall s", "sessions", "UDP bytes", "queue drops");
    let (uncut_s, cut_s) = (f.uncut_wall.as_secs_f64(), f.wall.as_secs_f64());
    println!(
        "  {:<28} {uncut_s:>9.1} {:>9} {:>12} {:>12}",
        "uncut", 1, f.uncut_udp_bytes, f.uncut_queue_drops
    );
    println!("  {:<28} {cut_s:>9.1} {:>9} {:>12} {:>12}", "cut", f.sessions, f.udp_bytes, f.queue_drops);
    if f.idle_sessions > 0 {
        println!("  {} of the sessions were cut before a document arrived", f.idle_sessions);
    }
    println!(
        "  documents held at the end {} of {n}; sent whole {} ({} again); bytes cut/uncut {:.3}",
        f.documents_applied,
        f.documents_sent,
        f.documents_sent.saturating_sub(n as u64),
        f.udp_bytes as f64 / f.uncut_udp_bytes as f64
    );
}

/// One size's run on the current backend; returns the cold sync's and the reconnects' times.
async fn run(n: usize, link: Option<Profile>) -> Vec<(String, Duration)> {
    let figures = bench::measure(n, link).await;
    let mut population = bench::population(automerge::ActorId::random());
    let sample: Vec<Vec<u8>> =
        (0..n.min(1_000)).map(|_| population.next_patient(0).expect("patient").save()).collect();
    let f = floor(&sample);
    let floor_total = (f.load + f.save + f.seal + f.insert) * n as u32;
    println!(
        "\nN = {n} documents in scope, {} records (server generated them in {:.1} s; {:.1} KB per saved document)",
        format!("{:?}", bench::records()).to_lowercase(),
        figures.generation.as_secs_f64(),
        figures.plain_bytes as f64 / n as f64 / 1024.0
    );
    if bench::region() > n {
        println!(
            "  a region's store: {} patients in all, the other {} held by no device (written in {:.0} s)",
            bench::region(),
            bench::region() - n,
            figures.region_fill.as_secs_f64()
        );
    }
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
    row("cold sync", &figures.cold);
    row("reconnect, 0 changed", &figures.idle);
    for (k, r) in &figures.changed {
        row(&format!("reconnect, {k} changed"), r);
    }
    println!(
        "  per-document floor: load {:.0} µs + save {:.0} µs + seal {:.1} µs + insert {:.1} µs = {:.1} ms for N; cold sync / floor = {:.2}",
        f.load.as_secs_f64() * 1e6,
        f.save.as_secs_f64() * 1e6,
        f.seal.as_secs_f64() * 1e6,
        f.insert.as_secs_f64() * 1e6,
        ms(floor_total),
        figures.cold.duration.as_secs_f64() / floor_total.as_secs_f64()
    );
    // What a device pays that stores each document as received (with the listing the server
    // sends), against which the cold sync is now measured; the floor above is a device that
    // parses and saves each one.
    let bytes_floor = (f.seal + f.insert) * n as u32;
    println!(
        "  bytes-only floor (seal + insert, as received): {:.1} ms for N; cold sync / bytes-only floor = {:.2}",
        ms(bytes_floor),
        figures.cold.duration.as_secs_f64() / bytes_floor.as_secs_f64()
    );
    if let Some((link, relay)) = &figures.link {
        let rtt = link.delay * 2;
        println!(
            "  link {}: {:.0} ms round trip, {}, {:.0}% loss{}{}; relay during the cold sync {relay:?}",
            link.name,
            ms(rtt),
            link.rate_bps.map_or("no cap".to_string(), |r| format!("{:.1} Mbit/s", r as f64 / 1e6)),
            link.loss * 100.0,
            if link.burst.is_some() { " plus bursts" } else { "" },
            link.outages
                .map_or(String::new(), |(every, length)| format!(", {length:?} outage every {every:?}")),
        );
        if let Some(rate) = link.rate_bps {
            // The cap is per direction: the busier one (the documents coming down) bounds it.
            let down = figures.cold.udp_bytes_received.max(figures.cold.udp_bytes_sent);
            let wire = Duration::from_secs_f64(down as f64 * 8.0 / rate as f64);
            println!(
                "  cold sync {:.1} s against {:.1} s for its {} UDP bytes down at the link's rate: {:.2}x",
                figures.cold.duration.as_secs_f64(),
                wire.as_secs_f64(),
                down,
                figures.cold.duration.as_secs_f64() / wire.as_secs_f64()
            );
        }
        if !rtt.is_zero() {
            // Done: the data applied and the round acknowledged (handshake + exchange); the
            // close after it is the connection's, not the user's wait.
            let rtts = |d: Duration| d.as_secs_f64() / rtt.as_secs_f64();
            let line = |r: &SyncReport| {
                format!(
                    "done after {:.1} (handshake {:.1} + exchange {:.1}), closed after {:.1}",
                    rtts(r.handshake + r.exchange),
                    rtts(r.handshake),
                    rtts(r.exchange),
                    rtts(r.duration)
                )
            };
            println!("  reconnect in round trips, 0 changed: {}", line(&figures.idle));
            if let Some((_, r)) = figures.changed.first() {
                println!("  reconnect in round trips, 1 changed: {}", line(r));
            }
        }
    }
    println!(
        "  device store {:.1} MB on disk vs {:.1} MB plain Automerge ({:.2}x)",
        figures.device_store_bytes as f64 / 1e6,
        figures.plain_bytes as f64 / 1e6,
        figures.device_store_bytes as f64 / figures.plain_bytes as f64,
    );
    println!(
        "  peak memory: server process {:.0} MB, device process {:.0} MB",
        figures.server_peak_mb, figures.device_peak_mb
    );
    let mut times = vec![
        ("cold sync".to_string(), figures.cold.duration),
        ("reconnect, 0 changed".to_string(), figures.idle.duration),
    ];
    times.extend(figures.changed.iter().map(|(k, r)| (format!("reconnect, {k} changed"), r.duration)));
    times
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

/// Simulated live devices per device process: each holds a UDP socket and its store's files
/// open, and one process may hold 20,000 files on this machine.
const DEVICES_PER_PROCESS: usize = 2_000;

/// The live test: `devices` devices keep live sessions, spread over `instances` server
/// instances (one after another); `holders` of them, spread over them, hold the hot patient, which changes
/// LIVE_CHANGES times. The devices run in processes of their own ([`DeviceProcesses`]).
async fn live(devices: usize, link: Option<Profile>, instances: usize, holders: usize) {
    let (mut server, _) = Server::start(2_000);
    let others: Vec<(Server, String)> = (1..instances).map(|_| server.instance()).collect();
    let tokens = device_tokens(&mut server, devices, holders);
    let relay = start_relay(link.as_ref(), &tokens).await;
    let relay_addr = relay.as_ref().map(|r| r.addr.to_string());
    let addrs = (0..devices).map(|i| match (&relay_addr, i % instances) {
        (Some(relay), _) => Some(relay.clone()),
        (None, 0) => None,
        (None, k) => Some(others[k - 1].1.clone()),
    });
    let t = Instant::now();
    let (arrivals_tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<(usize, i64)>();
    let processes = DeviceProcesses::start(tokens.into_iter().zip(addrs).collect(), &arrivals_tx);
    // Every device reports its first round once it is live.
    let mut live = std::collections::HashSet::new();
    while live.len() < devices {
        let (i, _) = arrivals.recv().await.expect("device rounds");
        live.insert(i);
    }
    let setup = t.elapsed();
    eprintln!(
        "live: {devices} devices in live sessions after {:.1} s; measuring propagation",
        setup.as_secs_f64()
    );
    let propagation =
        measure_propagation(&mut server, &mut arrivals, (devices, holders), link.as_ref()).await;
    let mut others = others;
    let server_peaks: Vec<f64> =
        std::iter::once(&mut server).chain(others.iter_mut().map(|(s, _)| s)).map(server_peak).collect();
    let device_peak = processes.stop();
    for (other, _) in others {
        other.stop();
    }
    server.stop();
    let shape = Shape { devices, instances, holders };
    print_live(shape, link.as_ref(), relay.as_ref(), setup, propagation, &server_peaks, device_peak);
}

/// A server process's peak memory in MB.
fn server_peak(server: &mut Server) -> f64 {
    server.ask("peak").trim_start_matches("peak ").parse().expect("peak")
}

/// The one-time tokens of `devices` devices, from the server; `holders` of them
/// ([`holds_hot`]) hold the hot patient.
fn device_tokens(server: &mut Server, devices: usize, holders: usize) -> Vec<String> {
    let mut tokens = Vec::new();
    writeln!(server.stdin, "devices {devices} {holders}").expect("command");
    server.stdin.flush().expect("flush");
    for _ in 0..devices {
        tokens.push(server.line().trim_start_matches("token ").to_string());
    }
    tokens
}

/// The simulated devices' stores live in memory (tmpfs) where there is one: a thousand
/// devices sharing one disk's fsync queue is an artefact of simulating them on one machine,
/// not a cost any real device has. The server's store stays on disk.
fn device_dir() -> tempfile::TempDir {
    match std::path::Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm").expect("temp dir"),
        false => tempfile::tempdir().expect("temp dir"),
    }
}

/// Over an impaired link, every device's packets pass one relay (each device its own flow).
async fn start_relay(link: Option<&Profile>, tokens: &[String]) -> Option<Relay> {
    match link {
        Some(profile) => {
            let token = care_node::token::EnrolmentToken::decode(&tokens[0]).expect("token");
            let server = token.server_addr.parse().expect("server address");
            Some(Relay::start(server, profile.clone(), SEED).await.expect("relay"))
        }
        None => None,
    }
}

/// The processes of the live test's simulated devices (this binary again, `--device-role
/// FIRST`), [`DEVICES_PER_PROCESS`] each. Each is given its devices' tokens and addresses on
/// stdin (`enrolling N`, its share of [`ENROLLING`], so that the processes together stay under
/// the server's limit on enrolments at once; `device TOKEN [ADDR]` lines; then `go`), reports `round I MS` for every round each
/// device applies, and on `stop` ends its sessions and reports `peak MB`.
struct DeviceProcesses {
    children: Vec<(std::process::Child, std::process::ChildStdin, std::thread::JoinHandle<f64>)>,
}

impl DeviceProcesses {
    fn start(devices: Vec<(String, Option<String>)>, arrivals: &UnboundedSender<(usize, i64)>) -> Self {
        let mut children = Vec::new();
        let enrolling = (ENROLLING / devices.len().div_ceil(DEVICES_PER_PROCESS)).max(1);
        for (chunk, first) in devices.chunks(DEVICES_PER_PROCESS).zip((0..).step_by(DEVICES_PER_PROCESS)) {
            let mut child = std::process::Command::new(std::env::current_exe().expect("own path"))
                .arg("--device-role")
                .arg(first.to_string())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("device process");
            let mut stdin = child.stdin.take().expect("stdin");
            writeln!(stdin, "enrolling {enrolling}").expect("enrolling");
            for (token, addr) in chunk {
                writeln!(stdin, "device {token} {}", addr.as_deref().unwrap_or("")).expect("devices");
            }
            writeln!(stdin, "go").expect("go");
            stdin.flush().expect("flush");
            let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
            let arrivals = arrivals.clone();
            let reader = std::thread::spawn(move || {
                let mut peak = 0.0;
                for line in std::io::BufRead::lines(stdout) {
                    let line = line.expect("device process output");
                    let words: Vec<&str> = line.split_whitespace().collect();
                    match words.as_slice() {
                        ["round", i, at] => {
                            let _ = arrivals.send((i.parse().expect("device"), at.parse().expect("time")));
                        }
                        ["peak", mb] => peak = mb.parse().expect("peak"),
                        other => panic!("device process said {other:?}"),
                    }
                }
                peak
            });
            children.push((child, stdin, reader));
        }
        Self { children }
    }

    /// Ends every device's session; returns the processes' peak memory, summed, in MB.
    fn stop(self) -> f64 {
        let mut total = 0.0;
        for (mut child, mut stdin, reader) in self.children {
            let _ = writeln!(stdin, "stop");
            let _ = stdin.flush();
            total += reader.join().expect("device process reader");
            let _ = child.wait();
        }
        total
    }
}

/// The device role (`--device-role FIRST`): the devices given on stdin, numbered from FIRST,
/// in live sessions until `stop` ([`DeviceProcesses`]).
fn device_role(first: usize) {
    // Each simulated device has a QUIC endpoint whose receive buffer (3 MB) is allocated zeroed.
    // Past glibc's adaptive mmap threshold such buffers come from the heap and are zeroed by
    // hand, every page resident; with the threshold fixed they stay mapped pages the kernel
    // zeroes when touched. 2 MB a device against 0.4 MB: a cost of simulating thousands of
    // devices in one process, not of any device. The threshold is 1 MB, above the deflate
    // buffers (up to 256 KB) each document save makes: below them, every save mapped, faulted
    // in, zeroed and unmapped them again.
    // SAFETY: mallopt only changes the allocator's tuning.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * 1024);
    }
    let files = raise_file_limit();
    let mut devices = Vec::new();
    let mut enrolling = ENROLLING;
    // (The lock on stdin goes with the loop; its buffer stays with stdin for the thread below.)
    for line in std::io::stdin().lines() {
        let line = line.expect("devices");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["device", token, addr @ ..] => {
                devices.push((token.to_string(), addr.first().map(|a| a.to_string())))
            }
            ["enrolling", n] => enrolling = n.parse().expect("enrolments at once"),
            ["go"] => break,
            other => panic!("unknown command {other:?}"),
        }
    }
    assert!(
        files as usize > devices.len() * 5,
        "open-file limit {files} is too low for {} devices",
        devices.len()
    );
    // Each device applies its first sync's pages off the runtime (`block_in_place`, a thread
    // taking over the runtime's worker): with a thousand devices in one process, threads kept a
    // minute instead of ten seconds are not made again for each wave of first syncs.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_keep_alive(Duration::from_secs(60))
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let dir = device_dir();
        let (arrivals_tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<(usize, i64)>();
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let tasks = spawn_devices(devices, first, enrolling, dir.path(), &arrivals_tx, &stop);
        drop(arrivals_tx);
        // `stop` (or the bench gone) on stdin ends the sessions.
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                if line.map_or(true, |l| l.trim() == "stop") {
                    break;
                }
            }
            let _ = stop_tx.send(true);
        });
        let report = tokio::spawn(async move {
            let mut out = std::io::BufWriter::new(std::io::stdout());
            while let Some((i, at)) = arrivals.recv().await {
                writeln!(out, "round {i} {at}").expect("stdout");
                while let Ok((i, at)) = arrivals.try_recv() {
                    writeln!(out, "round {i} {at}").expect("stdout");
                }
                out.flush().expect("stdout");
            }
        });
        for task in tasks {
            let _ = task.await;
        }
        let _ = report.await;
    });
    println!("peak {:.0}", peak_rss_mb("self"));
}

/// Simulated devices that enrol at once (each enrolment is a handshake and a commit).
const ENROLLING: usize = 32;

/// A simulated device's store at `path` (a cheap passphrase KDF: a thousand devices on one
/// machine), enrolled with `token`.
async fn enrolled(path: &Path, token: &str) -> DeviceStore {
    let cheap = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
    let mut store = DeviceStore::open(path, &PassphraseWrapper::with_params("bench", cheap)).expect("store");
    client::enrol(&mut store, token).await.expect("enrol");
    store
}

/// One task per device (numbered from `first`): it enrols (`enrolling` at a time), points at
/// its address if it has one (a relay, or another instance), and keeps a live session, sending
/// `(device, unix ms)` for every round until `stop` turns true.
fn spawn_devices(
    devices: Vec<(String, Option<String>)>,
    first: usize,
    enrolling: usize,
    dir: &Path,
    arrivals: &UnboundedSender<(usize, i64)>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(enrolling));
    for (i, (token, addr)) in devices.into_iter().enumerate() {
        let i = first + i;
        let path = dir.join(format!("live-{i}.db"));
        let arrivals = arrivals.clone();
        let mut stop = stop.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let mut store = {
                let _permit = gate.acquire().await.expect("gate");
                let store = enrolled(&path, &token).await;
                if let Some(addr) = &addr {
                    store.update_server_addr(addr).expect("point at its address");
                }
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
    tasks
}

/// A shift change: `devices` devices, enrolled and synced, each record one entry offline, then
/// all reconnect within `window` (starts spread evenly over it), each uploading its entry and
/// receiving what changed. Prints each sync's time (p50, p99, max) and the server's CPU.
async fn storm(devices: usize, window: Duration, instances: usize) {
    let files = raise_file_limit();
    assert!(files as usize > devices * 5, "open-file limit {files} is too low for {devices} devices");
    let (mut server, _) = Server::start(2_000);
    let others: Vec<(Server, String)> = (1..instances).map(|_| server.instance()).collect();
    let tokens = device_tokens(&mut server, devices, devices);
    let dir = device_dir();
    let gate = Arc::new(tokio::sync::Semaphore::new(ENROLLING));
    let t = Instant::now();
    let mut ready = Vec::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let path = dir.path().join(format!("storm-{i}.db"));
        let gate = gate.clone();
        // Devices one after another on each instance.
        let addr = (i % instances > 0).then(|| others[i % instances - 1].1.clone());
        ready.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.expect("gate");
            let mut store = enrolled(&path, &token).await;
            if let Some(addr) = &addr {
                store.update_server_addr(addr).expect("point at its instance");
            }
            client::sync(&mut store).await.expect("first sync");
            store
        }));
    }
    let mut stores = Vec::new();
    for task in ready {
        stores.push(task.await.expect("device"));
    }
    let setup = t.elapsed();
    // Offline, each device records one allergy on the patient it shares with the fewest others
    // (every device holds patient 0, and two of its own).
    let lists: Vec<Vec<String>> = stores
        .iter()
        .map(|s| s.list().expect("list").into_iter().filter_map(|c| c.nhs_number).collect())
        .collect();
    let mut holders = std::collections::HashMap::<&str, usize>::new();
    for nhs in lists.iter().flatten() {
        *holders.entry(nhs).or_default() += 1;
    }
    for (store, list) in stores.iter_mut().zip(&lists) {
        let nhs = list.iter().min_by_key(|n| holders[n.as_str()]).expect("a patient");
        let nhs = care_node::nhs::NhsNumber::parse(nhs).expect("an NHS number");
        let entry = care_node::summary::Allergy::new(
            "Shift-change allergen",
            store.provenance().expect("provenance"),
        );
        store.add_entry(&nhs, &entry).expect("entry");
    }
    let pids: Vec<u32> = std::iter::once(server.pid()).chain(others.iter().map(|(s, _)| s.pid())).collect();
    let servers_cpu = || pids.iter().map(|&pid| cpu_seconds(pid)).sum::<f64>();
    let cpu_before = servers_cpu();
    let started = Instant::now();
    let step = window / devices as u32;
    let mut syncs = Vec::new();
    for (i, mut store) in stores.into_iter().enumerate() {
        let at = started + step * i as u32;
        syncs.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let report = client::sync(&mut store).await.expect("reconnect");
            assert_eq!(report.stats.uploaded_changes, 1);
            report.duration
        }));
    }
    let mut took = Vec::new();
    for sync in syncs {
        took.push(ms(sync.await.expect("reconnect")));
    }
    let wall = started.elapsed();
    let cpu = servers_cpu() - cpu_before;
    for (other, _) in others {
        other.stop();
    }
    server.stop();
    took.sort_by(f64::total_cmp);
    let pct = |q: f64| took[((took.len() as f64 * q).ceil() as usize).clamp(1, took.len()) - 1];
    println!(
        "\nShift change: {devices} devices over {instances} instance(s) ({:.1} s to enrol and sync them), each with one entry, reconnect within {:.0} s",
        setup.as_secs_f64(),
        window.as_secs_f64()
    );
    println!(
        "  each sync: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; all done after {:.1} s; server processes' CPU {:.1} s ({:.0}% of one core over that time; a database server's own not counted)",
        pct(0.50),
        pct(0.99),
        took.last().copied().unwrap_or(f64::NAN),
        wall.as_secs_f64(),
        cpu,
        cpu / wall.as_secs_f64() * 100.0
    );
}

/// CPU seconds (user and system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) are space-separated; utime and
    // stime are the 14th and 15th of the line, in clock ticks.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

/// What the live test saw of the hot patient's changes.
struct Propagation {
    /// Milliseconds from each change to each device applying it.
    latencies: Vec<f64>,
    /// Arrivals that missed the 10 s window.
    missing: usize,
}

/// Changes the hot patient LIVE_CHANGES times and waits for each of its holders (`holders` of the
/// `devices`, spread over them: [`holds_hot`]) to apply each change.
async fn measure_propagation(
    server: &mut Server,
    arrivals: &mut UnboundedReceiver<(usize, i64)>,
    (devices, holders): (usize, usize),
    link: Option<&Profile>,
) -> Propagation {
    let mut latencies = Vec::new();
    let mut missing = 0;
    for change in 0..LIVE_CHANGES {
        let touched: i64 = server.ask("touch").trim_start_matches("touched ").parse().expect("time");
        let mut seen = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.len() < holders {
            match tokio::time::timeout_at(deadline, arrivals.recv()).await {
                Ok(Some((i, at))) => {
                    if holds_hot(i, devices, holders) && seen.insert(i) {
                        latencies.push((at - touched).max(0) as f64);
                    }
                }
                _ => break,
            }
        }
        missing += holders - seen.len();
        let last = latencies[latencies.len() - seen.len()..].iter().copied().fold(0.0, f64::max);
        eprintln!(
            "live: change {} reached {} of {holders} holders, the last after {last:.0} ms",
            change + 1,
            seen.len()
        );
        // Over a link with outages, the changes are spread over more than one outage period.
        let pause = match link {
            Some(Profile { outages: Some((every, _)), .. }) => *every / (LIVE_CHANGES as u32 / 2),
            _ => Duration::from_millis(200),
        };
        tokio::time::sleep(pause).await;
        while arrivals.try_recv().is_ok() {}
    }
    Propagation { latencies, missing }
}

/// The live test's figures: setup time, propagation percentiles, memory.
fn print_live(
    shape: Shape,
    link: Option<&Profile>,
    relay: Option<&Relay>,
    setup: Duration,
    propagation: Propagation,
    server_peaks: &[f64],
    device_peak: f64,
) {
    let Shape { devices, instances, holders } = shape;
    let Propagation { mut latencies, missing } = propagation;
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pct =
        |p: f64| latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)).copied();
    println!(
        "\nLive: {devices} devices with live sessions{} over {instances} server instance(s) ({:.1} s to enrol, sync and connect them all); \
         {} hold the hot patient, which changed {LIVE_CHANGES} times",
        link.map_or(String::new(), |l| format!(" over {}", l.name)),
        setup.as_secs_f64(),
        if holders == devices { "all".to_string() } else { holders.to_string() }
    );
    if let Some(relay) = relay {
        println!("  relay: {:?}", relay.stats());
    }
    println!(
        "  propagation to every device: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} arrivals; {missing} missed the 10 s window",
        pct(0.50).unwrap_or(f64::NAN),
        pct(0.99).unwrap_or(f64::NAN),
        latencies.last().copied().unwrap_or(f64::NAN),
        latencies.len()
    );
    let servers: Vec<String> = server_peaks.iter().map(|p| format!("{p:.0} MB")).collect();
    println!(
        "  peak memory: server process(es) {}, devices' processes {device_peak:.0} MB together",
        servers.join(" and ")
    );
}

/// How the live test's devices are spread.
#[derive(Clone, Copy)]
struct Shape {
    devices: usize,
    instances: usize,
    /// Devices holding the hot patient.
    holders: usize,
}

/// Sync figures on this machine, printed as tables (docs/benchmarks.md has the published ones).
///
/// For each size N the server (a child process) holds N synthetic patients in one device's
/// scope; the device measures the cold sync, reconnects with 0, 1 and 100 changed, its store's
/// size and the per-document floor. Then D devices keep live sessions while one patient changes
/// 20 times: propagation p50, p99 and max. Run it optimised:
/// `cargo run --release -p care-sync-server --bin care-sync-bench -- [OPTIONS] [N]...`
#[derive(clap::Parser)]
#[command(name = "care-sync-bench", version)]
struct Args {
    /// Patients in each cold-sync run, one run per size, at least 100 (a reconnect changes 100)
    /// [default: 1000 10000].
    #[arg(value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(100..))]
    sizes: Vec<usize>,
    /// Devices with live sessions in the propagation run; 0 skips it [default: 1000, or 0 with
    /// --link].
    #[arg(long, value_name = "D")]
    live: Option<usize>,
    /// Puts the seeded impairment relay between the device and the server, with this link's
    /// delay, loss, bandwidth and outages; cold syncs are then compared with the time the
    /// link's bandwidth allows for their bytes and reconnects are counted in round trips.
    #[arg(long, value_name = "PROFILE", value_parser = clap::builder::PossibleValuesParser::new(Profile::NAMES))]
    link: Option<String>,
    /// Instead of the cold-sync runs: a cold sync cut (its connection lost) every SECONDS until
    /// done, beside an uncut one, over --link (loopback if none): time, connections, bytes and
    /// documents sent again.
    #[arg(long, value_name = "SECONDS", value_parser = positive_seconds)]
    cut_every: Option<f64>,
    /// What each cut of --cut-every is: `lost` (the connection is lost for good and the device
    /// connects again) or `moved` (the device's address changes and the connection follows it).
    #[arg(long, value_name = "KIND", default_value = "lost", requires = "cut_every", value_parser = ["lost", "moved"])]
    cut_kind: String,
    /// How full each patient's record is: `synthetic` (a handful of coded entries, about 1.2 KB
    /// saved: every figure before session 12) or `realistic` (at least 15 entries and 20
    /// hospital events each, one in 200 with a history of 500 changes).
    #[arg(long, value_name = "RECORDS", value_enum, default_value_t = Records::Synthetic)]
    records: Records,
    /// Also bench the feeds with this many patients: `import-fhir` of them as NDJSON, then HL7
    /// v2 ADT from a file (group commits against one commit per message) and over MLLP from 10
    /// senders, and the ACK latency at 200 messages/s (0: skip).
    #[arg(long, value_name = "PATIENTS", default_value_t = 0)]
    feeds: usize,
    /// The store of the bench servers: `sqlite`, `postgres` (a fresh database in the cluster of
    /// `CARE_SYNC_POSTGRES_URL`, dropped after), or both, each scenario run on each, side by
    /// side with the ratios (the feeds bench runs on SQLite only).
    #[arg(long, value_name = "BACKEND", value_enum, value_delimiter = ',', default_value = "sqlite")]
    backend: Vec<bench::Backend>,
    /// Server instances over one PostgreSQL database in the live and shift-change runs, devices
    /// spread over them one after another; the hot patient changes through the first (needs
    /// `--backend postgres`; SQLite runs use one).
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=8))]
    instances: u16,
    /// Of the --live devices, how many hold the hot patient (the first ones, spread over the
    /// instances like the rest) [default: all].
    #[arg(long, value_name = "H")]
    live_holders: Option<usize>,
    /// A shift change: this many devices, enrolled and synced, each record one entry and all
    /// reconnect within 10 s: each sync's p50/p99 and the server's CPU (0: skip).
    #[arg(long, value_name = "DEVICES", default_value_t = 0)]
    storm: usize,
    /// Also runs each N on a region's store: this many patients in the database (at least
    /// 1,000,000 is a region), N of them in the device's scope and the rest held by no device,
    /// beside the run on a store of N, with the ratios (0: skip). Past the test range's NHS
    /// numbers (about 909,000), records are of unidentified patients.
    #[arg(long, value_name = "PATIENTS", default_value_t = 0)]
    region: usize,
    /// The server's role, started by the bench itself: `--server-role DIR N`.
    #[arg(long, hide = true, num_args = 2, value_names = ["DIR", "N"])]
    server_role: Option<Vec<String>>,
    /// Another server instance's role, started by the bench itself: `--instance-role URL`.
    #[arg(long, hide = true, value_name = "URL")]
    instance_role: Option<String>,
    /// Simulated live devices' role, started by the bench itself: `--device-role FIRST`.
    #[arg(long, hide = true, value_name = "FIRST")]
    device_role: Option<usize>,
}

/// Prints two runs' figures side by side, with the second's over the first's.
fn ratios(base: &[(String, Duration)], other: &[(String, Duration)]) {
    for ((name, a), (_, b)) in base.iter().zip(other) {
        println!(
            "  {name:<24} {:>9.1} ms {:>9.1} ms  {:.2}x",
            ms(*a),
            ms(*b),
            b.as_secs_f64() / a.as_secs_f64()
        );
    }
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 => Ok(secs),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    bench::use_records(args.records);
    if let Some(role) = &args.server_role {
        bench::use_region(args.region);
        let n =
            role[1].parse().unwrap_or_else(|_| panic!("--server-role DIR N: `{}` is not a size", role[1]));
        bench::server_role(&role[0], n);
        return;
    }
    if let Some(url) = &args.instance_role {
        bench::instance_role(url);
        return;
    }
    if let Some(first) = args.device_role {
        device_role(first);
        return;
    }
    let instances = usize::from(args.instances);
    if instances > 1 && !args.backend.contains(&bench::Backend::Postgres) {
        eprintln!("--instances {instances} needs --backend postgres: instances share a PostgreSQL database");
        std::process::exit(2);
    }
    if instances > 1 && args.link.is_some() {
        eprintln!("--instances and --link do not go together: the relay leads to one server");
        std::process::exit(2);
    }
    // SQLite has one instance; PostgreSQL runs as many as asked.
    let instances_on =
        |backend: bench::Backend| if backend == bench::Backend::Postgres { instances } else { 1 };
    let link = args.link.as_deref().map(|name| Profile::named(name).expect("a profile the parser accepted"));
    let cut_every = args.cut_every.map(Duration::from_secs_f64);
    let cut_kind = if args.cut_kind == "moved" { CutKind::Moved } else { CutKind::Lost };
    let sizes = if args.sizes.is_empty() { vec![1_000, 10_000] } else { args.sizes };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("care-sync bench: {cpus} CPU(s); server and devices in two processes, QUIC over 127.0.0.1");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let live_devices = args.live.unwrap_or(if link.is_some() { 0 } else { 1_000 });
    let mut backends = args.backend.clone();
    backends.dedup();
    for n in sizes {
        let mut by_backend = Vec::new();
        for backend in &backends {
            bench::use_backend(*backend);
            println!("\nstore: {backend:?}");
            match cut_every {
                Some(every) => runtime.block_on(cut(
                    n,
                    link.clone().unwrap_or_else(|| Profile::named("loopback").expect("loopback")),
                    every,
                    cut_kind,
                )),
                None => {
                    let plain = runtime.block_on(run(n, link.clone()));
                    if args.region > n {
                        bench::use_region(args.region);
                        let region = runtime.block_on(run(n, link.clone()));
                        bench::use_region(0);
                        println!(
                            "\nN = {n} on {backend:?}: a store of {} / a store of {n}, measured in this run",
                            args.region
                        );
                        ratios(&plain, &region);
                    }
                    by_backend.push((*backend, plain));
                }
            }
        }
        if let [(first, base), (second, other)] = by_backend.as_slice() {
            println!("\nN = {n}: {second:?} / {first:?}, measured in this run");
            ratios(base, other);
        }
    }
    if live_devices > 0 {
        for backend in &backends {
            bench::use_backend(*backend);
            println!("\nstore: {backend:?}");
            let holders = args.live_holders.unwrap_or(live_devices).min(live_devices);
            runtime.block_on(live(live_devices, link.clone(), instances_on(*backend), holders));
        }
    }
    if args.storm > 0 {
        for backend in &backends {
            bench::use_backend(*backend);
            println!("\nstore: {backend:?}");
            runtime.block_on(storm(args.storm, Duration::from_secs(10), instances_on(*backend)));
        }
    }
    if args.feeds > 0 {
        runtime.block_on(care_sync_server::demo::feeds::run(args.feeds));
    }
}
