//! The benchmark harness shared by `care-sync-bench` and the samod comparison
//! (`benches/samod-compare`): a server in a child process (the calling binary again, in its
//! server role) and a device in the calling process, so that each one's memory is measured apart.
//! Not used by the server itself.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use care_node::client::{self, SyncReport};
use care_node::crypto::{KdfParams, PassphraseWrapper};
use care_node::store::DeviceStore;
use care_node::summary::{Allergy, PatientId, PatientSummary, Provenance};

use crate::demo::population::{Population, Records};
use crate::store::Role;

/// The population seed of every run, so runs are comparable.
pub const SEED: u64 = 7;

/// How full the bench population's records are, for every server this process starts (and in
/// the server role itself); set once, before the first, by [`use_records`].
static RECORDS: std::sync::OnceLock<Records> = std::sync::OnceLock::new();

/// Makes every bench population of this process `records` (the default is synthetic).
pub fn use_records(records: Records) {
    let _ = RECORDS.set(records);
}

/// The bench population's records ([`use_records`]).
pub fn records() -> Records {
    RECORDS.get().copied().unwrap_or_default()
}

/// Which store every bench server of this process runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Backend {
    /// The embedded SQLite store in a temporary directory.
    #[default]
    Sqlite,
    /// A fresh database in the PostgreSQL cluster of `CARE_SYNC_POSTGRES_URL`, dropped after.
    Postgres,
}

static BACKEND: std::sync::Mutex<Backend> = std::sync::Mutex::new(Backend::Sqlite);

/// Makes the bench servers this process starts from now on use `backend`.
pub fn use_backend(backend: Backend) {
    *BACKEND.lock().unwrap_or_else(|p| p.into_inner()) = backend;
}

/// The backend of the next bench server ([`use_backend`]).
pub fn backend() -> Backend {
    *BACKEND.lock().unwrap_or_else(|p| p.into_inner())
}

/// Patients in the store of every bench server this process starts from now on, when more than
/// the size of the run: the run's N in the device's scope, the rest held by no device (a
/// region's store); 0 for none but the N.
static REGION: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

/// Makes the bench servers this process starts from now on hold `total` patients ([`REGION`]).
pub fn use_region(total: usize) {
    *REGION.lock().unwrap_or_else(|p| p.into_inner()) = total;
}

/// The region size of the next bench server ([`use_region`]).
pub fn region() -> usize {
    *REGION.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fills `store` up to `total` patients that no device holds, on two threads, each its own
/// population with NHS numbers of its own from the test range; past the range's numbers,
/// unidentified records. Progress goes to stderr. Returns how long it took.
fn fill_region(
    store: &std::sync::Arc<dyn crate::store::ServerStore>,
    actor: &automerge::ActorId,
    total: usize,
) -> Duration {
    use crate::demo::population::first_free_stem;
    const LAST_STEM: u32 = 999_999_999;
    const BATCH: usize = 1_000;
    let t = Instant::now();
    let have = store.patient_count().expect("count") as usize;
    let wanted = total.saturating_sub(have);
    let first = first_free_stem(|nhs| store.patient_by_nhs(nhs).expect("lookup").is_some());
    let mid = first + (LAST_STEM - first) / 2;
    let valid = |from: u32, to: u32| {
        (from..to).filter(|s| care_node::nhs::NhsNumber::from_stem(*s).is_some()).count()
    };
    let halves = [(first, valid(first, mid)), (mid, valid(mid, LAST_STEM + 1))];
    let identified: usize = halves.iter().map(|(_, n)| n).sum::<usize>().min(wanted);
    let unidentified = wanted - identified;
    // The numbered records split evenly between the halves, as far as each half has numbers.
    let mut first_half = halves[0].1.min(identified.div_ceil(2));
    first_half += (identified - first_half).saturating_sub(halves[1].1);
    let shares = [
        (halves[0].0, first_half, unidentified.div_ceil(2)),
        (halves[1].0, identified - first_half, unidentified / 2),
    ];
    let made = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for (half, (start, numbered, unnumbered)) in shares.into_iter().enumerate() {
            let (store, made, actor) = (store.clone(), &made, actor.clone());
            scope.spawn(move || {
                let seed = SEED ^ (0x7e61_0000 + half as u64);
                let mut numbered_people =
                    Population::starting_at(seed, actor.clone(), start).with_records(records());
                let mut unnumbered_people =
                    Population::starting_at(seed ^ 1, actor, start).with_records(records()).unidentified();
                let mut left = (numbered, unnumbered);
                while left.0 + left.1 > 0 {
                    let mut batch = Vec::with_capacity(BATCH);
                    while batch.len() < BATCH && left.0 + left.1 > 0 {
                        let people = if left.0 > 0 {
                            left.0 -= 1;
                            &mut numbered_people
                        } else {
                            left.1 -= 1;
                            &mut unnumbered_people
                        };
                        batch.push(people.next_patient(0).expect("patient"));
                    }
                    store.insert_patients(&mut batch).expect("insert");
                    let before = made.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
                    let after = before + batch.len();
                    if after / 100_000 > before / 100_000 || after == wanted {
                        let rate = after as f64 / t.elapsed().as_secs_f64().max(1e-9);
                        eprintln!("  region store: {after} of {wanted} more patients written ({rate:.0}/s)");
                    }
                }
            });
        }
    });
    t.elapsed()
}

/// The database's own housekeeping after a bulk load, so that the region's figures are of a
/// store in its steady state rather than of the load's aftermath: on SQLite the write-ahead
/// log is checkpointed into the database (otherwise the next commit, a sync's, would copy
/// the gigabytes the load wrote), on PostgreSQL `VACUUM (ANALYZE)` (what autovacuum does soon
/// after a load: visibility, hint bits and the planner's statistics).
fn settle_after_fill(url: Option<&str>, dir: &std::path::Path) {
    let t = Instant::now();
    match url {
        Some(url) => crate::store::postgres::scratch::execute(url, "VACUUM (ANALYZE)").expect("vacuum"),
        None => {
            let conn = rusqlite::Connection::open(dir.join("server.db")).expect("store file");
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).expect("checkpoint");
        }
    }
    eprintln!("  region store: housekeeping after the load took {:.0} s", t.elapsed().as_secs_f64());
}

/// The bench population: seed [`SEED`], records as [`use_records`] set them.
pub fn population(actor: automerge::ActorId) -> Population {
    Population::new(SEED, actor).with_records(records())
}

pub fn peak_rss_mb(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub fn file_size(path: &std::path::Path) -> u64 {
    let wal = path.with_extension("db-wal");
    std::fs::metadata(path).map_or(0, |m| m.len()) + std::fs::metadata(wal).map_or(0, |m| m.len())
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------- server role (child process)

/// Whether bench device `d` of `devices` is one of the `holders` that hold the hot patient: one
/// in each run of `devices / holders` devices, at a different place in each run, so the holders
/// spread over the instances (devices alternate between them) and the device processes (each
/// runs a block of devices) instead of all being the first few.
pub fn holds_hot(d: usize, devices: usize, holders: usize) -> bool {
    let stride = (devices / holders.max(1)).max(1);
    let run = d / stride;
    holders > 0 && run < holders && d % stride == run % stride
}

/// The server role: `care-sync-bench --server-role DIR N`. Generates N patients, serves, and
/// answers commands on stdin, one line each: `devices K [H]` (K tokens, each device gets two
/// patients of its own, and H devices spread over the K ([`holds_hot`]), all without H, patient 0), `token NAME` (a
/// device holding every patient, as the first one), `change K` (K documents changed), `touch` (patient 0 changed), `sent` (documents sent so far),
/// `peak`, `quit`.
pub fn server_role(dir: &str, n: usize) {
    let runtime = crate::transport::runtime().expect("runtime");
    // DIR is a directory for SQLite, or a postgres:// URL.
    let url = dir.starts_with("postgres").then_some(dir);
    let store = crate::store::open(url, None, std::path::Path::new(dir)).expect("store");
    let actor = crate::server_actor(&store.server_identity().expect("identity"));
    let t = Instant::now();
    let mut population = population(actor.clone());
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
    // A region's store: the rest of the patients, held by no device.
    let filling = if region() > n {
        let filling = fill_region(&store, &actor, region());
        settle_after_fill(url, std::path::Path::new(dir));
        filling
    } else {
        Duration::ZERO
    };
    let running = runtime
        .block_on(crate::transport::start(store.clone(), "127.0.0.1:0".parse().expect("addr")))
        .expect("server");
    let addr = running.addr;
    let token = |name: &str| {
        crate::operator::ops::issue_token(
            store.as_ref(),
            name,
            Role::AmbulanceCrew,
            addr,
            crate::operator::ops::DEFAULT_TOKEN_TTL,
        )
        .expect("token")
    };
    // A device that holds every patient.
    let holding_all = |name: &str| {
        let token = token(name);
        let device_id = store.device_by_name(name).expect("device").expect("device").id;
        for id in &ids {
            store.caseload_add(device_id, id).expect("caseload");
        }
        store.set_device_budget(device_id, Some(n as u64 + 1)).expect("budget");
        token
    };
    let device = holding_all("tablet");
    println!("ready {addr} {device} {} {plain_bytes} {}", generation.as_millis(), filling.as_millis());
    let change = |id: &PatientId, label: &str| {
        let mut s = PatientSummary::load(&store.load_document(id).expect("doc").expect("doc")).expect("load");
        s.set_actor(actor.to_bytes());
        store.apply_server_changes(id, &bench_change(&mut s, label)).expect("apply");
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
            ["devices", k, holders @ ..] => {
                let k: usize = k.parse().expect("count");
                let holders: usize = holders.first().map_or(k, |h| h.parse().expect("holders"));
                for d in 0..k {
                    let name = format!("live-{d}");
                    let t = token(&name);
                    let id = store.device_by_name(&name).expect("device").expect("device").id;
                    let hot = holds_hot(d, k, holders).then_some(0);
                    for p in hot.into_iter().chain([1 + 2 * d % (n - 1), 2 + 2 * d % (n - 2)]) {
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
            ["token", name] => println!("token {}", holding_all(name)),
            ["sent"] => {
                let sent = crate::operator::metrics::metrics()
                    .documents
                    .get_or_create(&crate::operator::metrics::SENT)
                    .get();
                println!("sent {sent}");
            }
            ["peak"] => println!("peak {:.0}", peak_rss_mb("self")),
            ["quit"] => break,
            other => panic!("unknown command {other:?}"),
        }
        std::io::stdout().flush().expect("stdout");
    }
    runtime.block_on(running.shutdown());
}

/// Another instance over the database of a PostgreSQL bench server:
/// `care-sync-bench --instance-role URL`. Serves on a port of its own, prints `ready ADDR`, and
/// answers `peak` and `quit` on stdin.
pub fn instance_role(url: &str) {
    let runtime = crate::transport::runtime().expect("runtime");
    let store = crate::store::open(Some(url), None, std::path::Path::new(url)).expect("store");
    let running = runtime
        .block_on(crate::transport::start(store, "127.0.0.1:0".parse().expect("addr")))
        .expect("server");
    println!("ready {}", running.addr);
    std::io::stdout().flush().expect("stdout");
    for line in std::io::stdin().lock().lines() {
        match line.expect("command").trim() {
            "peak" => println!("peak {:.0}", peak_rss_mb("self")),
            "quit" => break,
            other => panic!("unknown command {other:?}"),
        }
        std::io::stdout().flush().expect("stdout");
    }
    runtime.block_on(running.shutdown());
}

/// The server child process and its command pipe.
pub struct Server {
    child: Child,
    pub stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The store's directory (SQLite) or URL (PostgreSQL).
    place: std::ffi::OsString,
    _dir: tempfile::TempDir,
    /// The PostgreSQL database of a `--backend postgres` server, dropped after it.
    _database: Option<crate::store::postgres::scratch::ScratchDatabase>,
}

impl Server {
    pub fn start(n: usize) -> (Server, Vec<String>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let database = match backend() {
            Backend::Sqlite => None,
            Backend::Postgres => Some(
                crate::store::postgres::scratch::ScratchDatabase::from_env()
                    .expect("--backend postgres needs a cluster: set CARE_SYNC_POSTGRES_URL"),
            ),
        };
        let place: std::ffi::OsString = match &database {
            Some(db) => db.url.clone().into(),
            None => dir.path().into(),
        };
        let mut command = Command::new(std::env::current_exe().expect("own path"));
        command
            .arg("--server-role")
            .arg(&place)
            .arg(n.to_string())
            .arg("--records")
            .arg(clap::ValueEnum::to_possible_value(&records()).expect("a named value").get_name())
            .args(if region() > n { vec!["--region".to_string(), region().to_string()] } else { Vec::new() });
        Server::spawn(command, place, dir, database)
    }

    /// Another instance over this PostgreSQL server's database ([`instance_role`]) and its
    /// address. Stop it before this server, which drops the database.
    pub fn instance(&self) -> (Server, String) {
        assert!(self._database.is_some(), "only a PostgreSQL store has several instances");
        let mut command = Command::new(std::env::current_exe().expect("own path"));
        command.arg("--instance-role").arg(&self.place);
        let dir = tempfile::tempdir().expect("temp dir");
        let (instance, mut ready) = Server::spawn(command, self.place.clone(), dir, None);
        (instance, ready.remove(0))
    }

    /// Starts `command` (a server role of this binary) with its stdin and stdout piped and
    /// waits for its `ready …` line; returns the words after `ready`.
    fn spawn(
        mut command: Command,
        place: std::ffi::OsString,
        dir: tempfile::TempDir,
        database: Option<crate::store::postgres::scratch::ScratchDatabase>,
    ) -> (Server, Vec<String>) {
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("server process");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut server = Server { child, stdin, stdout, place, _dir: dir, _database: database };
        let ready = server.line();
        let words: Vec<String> = ready.split_whitespace().map(str::to_string).collect();
        assert_eq!(words.first().map(String::as_str), Some("ready"), "{ready}");
        (server, words[1..].to_vec())
    }

    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("server answers");
        line.trim().to_string()
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("server command");
        self.stdin.flush().expect("flush");
        self.line()
    }

    pub fn stop(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

/// What one device measured against a server of N patients.
pub struct Figures {
    pub n: usize,
    pub generation: Duration,
    /// How long filling the store up to the region's size took ([`use_region`]; zero if none).
    pub region_fill: Duration,
    /// Bytes of the N documents saved plainly by Automerge.
    pub plain_bytes: u64,
    pub cold: SyncReport,
    pub idle: SyncReport,
    /// Reconnects with 1 and 100 documents changed on the server.
    pub changed: Vec<(usize, SyncReport)>,
    pub device_store_bytes: u64,
    pub device_peak_mb: f64,
    pub server_peak_mb: f64,
    /// The impaired link the device synced over, and what its relay did during the cold sync.
    pub link: Option<(crate::demo::link::Profile, crate::demo::link::RelayStats)>,
}

/// Runs the device side against a new server process of `n` patients: cold sync, then
/// reconnects with 0, 1 (the median of five) and 100 changed — over `link` when given (a relay of
/// [`crate::demo::link`] between the device and the server). The calling binary must hand
/// `--server-role DIR N` to [`server_role`].
pub async fn measure(n: usize, link: Option<crate::demo::link::Profile>) -> Figures {
    let (mut server, ready) = Server::start(n);
    let (token, generation_ms, plain_bytes): (&str, u64, u64) =
        (&ready[1], ready[2].parse().expect("ms"), ready[3].parse().expect("bytes"));
    let dir = tempfile::tempdir().expect("temp dir");
    let device_path = dir.path().join("device.db");
    let wrapper = PassphraseWrapper::with_params("bench", KdfParams::default());
    let mut device = DeviceStore::open(&device_path, &wrapper).expect("device store");
    client::enrol(&mut device, token).await.expect("enrol");
    let relay = match link {
        Some(profile) => {
            let relay = behind_relay(&mut device, profile.clone(), SEED).await;
            Some((profile, relay))
        }
        None => None,
    };

    let cold = client::sync(&mut device).await.expect("cold sync");
    let cold_relay = relay.as_ref().map(|(profile, relay)| (profile.clone(), relay.stats()));
    assert_eq!(cold.stats.documents_received as usize, n);
    let idle = client::sync(&mut device).await.expect("reconnect");
    let mut changed = Vec::new();
    for k in [1usize, 100] {
        // One change is the figure a region's store is judged by: the median of five.
        let tries = if k == 1 { 5 } else { 1 };
        let mut reports = Vec::with_capacity(tries);
        for _ in 0..tries {
            assert_eq!(server.ask(&format!("change {k}")), format!("changed {k}"));
            let report = client::sync(&mut device).await.expect("reconnect");
            assert_eq!(report.stats.changes_received as usize, k);
            reports.push(report);
        }
        reports.sort_by_key(|r| r.duration);
        changed.push((k, reports.swap_remove(tries / 2)));
    }
    let device_peak_mb = peak_rss_mb("self");
    let server_peak_mb: f64 = server.ask("peak").trim_start_matches("peak ").parse().expect("peak");
    server.stop();
    Figures {
        n,
        generation: Duration::from_millis(generation_ms),
        region_fill: Duration::from_millis(ready.get(4).and_then(|ms| ms.parse().ok()).unwrap_or(0)),
        plain_bytes,
        cold,
        idle,
        changed,
        device_store_bytes: file_size(&device_path),
        device_peak_mb,
        server_peak_mb,
        link: cold_relay,
    }
}

/// Puts a relay of `profile` between an enrolled device and its server: the device talks to
/// the relay's address from now on.
async fn behind_relay(
    device: &mut DeviceStore,
    profile: crate::demo::link::Profile,
    seed: u64,
) -> crate::demo::link::Relay {
    let server = device.require_enrolment().expect("enrolled").server_addr.parse().expect("address");
    let relay = crate::demo::link::Relay::start(server, profile, seed).await.expect("relay");
    device.update_server_addr(&relay.addr.to_string()).expect("point at the relay");
    relay
}

/// What happens to the link at each cut of [`measure_cut`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutKind {
    /// The link is lost for good: the device gives up on the connection and opens another.
    Lost,
    /// The device's address changes (a new NAT binding, Wi-Fi to 3G on the same socket): the
    /// server follows the connection to the new address (QUIC migration).
    Moved,
}

/// A cold sync whose link is cut every `every` until it completes.
#[derive(Debug)]
pub struct CutFigures {
    pub n: usize,
    pub every: Duration,
    pub kind: CutKind,
    /// Cuts made.
    pub cuts: usize,
    /// Connections it took (1 + the cuts), and how many of them were cut before a document
    /// arrived.
    pub sessions: usize,
    pub idle_sessions: usize,
    /// Documents the device holds at the end (N: none missing; a document applied twice would
    /// still be one row, so the bytes tell the resending).
    pub documents_applied: u64,
    /// Whole documents the server sent to the cut device, over all its sessions: N plus what
    /// was in flight at the cuts.
    pub documents_sent: u64,
    pub wall: Duration,
    pub udp_bytes: u64,
    /// Packets the link's queue dropped (sent faster than the link's rate).
    pub queue_drops: u64,
    /// The same cold sync on the same link without cuts, in the same run.
    pub uncut_wall: Duration,
    pub uncut_udp_bytes: u64,
    pub uncut_queue_drops: u64,
}

/// A cold sync of `n` over `profile` cut every `every` until the round completes, and, for
/// comparison, the same cold sync uncut. [`CutKind::Lost`]: the link is lost for good (the
/// relay drops everything and the device's sync is abandoned, as an app does when the OS
/// reports the network gone), then re-established at once and synced again;
/// [`CutKind::Moved`]: the device's address changes, one session throughout. UDP bytes are counted on both sides' sockets
/// (`SyncReport`), so a session cut before it could report counts what the relay delivered.
pub async fn measure_cut(
    n: usize,
    profile: crate::demo::link::Profile,
    every: Duration,
    kind: CutKind,
) -> CutFigures {
    let (mut server, ready) = Server::start(n);
    let dir = tempfile::tempdir().expect("temp dir");
    // A device enrolled with `token`, talking to the server through a relay of `profile`.
    let enrolled_behind_relay = |name: &str, token: String, seed: u64| {
        let path = dir.path().join(name);
        let profile = profile.clone();
        async move {
            let wrapper = PassphraseWrapper::with_params("bench", KdfParams::default());
            let mut device = DeviceStore::open(&path, &wrapper).expect("device store");
            client::enrol(&mut device, &token).await.expect("enrol");
            let relay = behind_relay(&mut device, profile, seed).await;
            (device, relay)
        }
    };

    // Uncut, on the same link.
    let (mut uncut, relay) = enrolled_behind_relay("uncut.db", ready[1].clone(), SEED).await;
    let before = relay.stats();
    let t = Instant::now();
    let report = client::sync(&mut uncut).await.expect("uncut cold sync");
    let uncut_wall = t.elapsed();
    let uncut_udp_bytes = relay.stats().bytes_delivered - before.bytes_delivered;
    let uncut_queue_drops = relay.stats().queue_drops - before.queue_drops;
    assert_eq!(report.stats.documents_received as usize, n);
    drop(relay);

    // Cut every `every`.
    let sent_before: u64 = server.ask("sent").trim_start_matches("sent ").parse().expect("sent");
    let token = server.ask("token cut").trim_start_matches("token ").to_string();
    let (mut device, relay) = enrolled_behind_relay("cut.db", token, SEED ^ 1).await;
    let before = relay.stats();
    let t = Instant::now();
    let (sessions, idle_sessions, cuts) = match kind {
        CutKind::Moved => (1, 0, sync_while_moving(&mut device, &relay, every).await),
        CutKind::Lost => sync_while_losing(&mut device, &relay, every).await,
    };
    assert_eq!(device.document_count().expect("count") as usize, n);
    let wall = t.elapsed();
    let udp_bytes = relay.stats().bytes_delivered - before.bytes_delivered;
    let queue_drops = relay.stats().queue_drops - before.queue_drops;
    let documents_applied = device.document_count().expect("count");
    let sent: u64 = server.ask("sent").trim_start_matches("sent ").parse().expect("sent");
    server.stop();
    CutFigures {
        n,
        every,
        kind,
        cuts,
        sessions,
        idle_sessions,
        documents_applied,
        documents_sent: sent - sent_before,
        wall,
        udp_bytes,
        queue_drops,
        uncut_wall,
        uncut_udp_bytes,
        uncut_queue_drops,
    }
}

/// One sync whose flow moves to a new address every `every` while it runs; returns the moves.
async fn sync_while_moving(
    device: &mut DeviceStore,
    relay: &crate::demo::link::Relay,
    every: Duration,
) -> usize {
    let mut cuts = 0;
    let sync = client::sync(device);
    tokio::pin!(sync);
    let mut moves = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            done = &mut sync => {
                done.expect("a sync whose address changes completes on its one connection");
                return cuts;
            }
            _ = moves.tick() => {
                relay.rebind();
                cuts += 1;
            }
        }
    }
}

/// Syncs until one completes, the link lost for good every `every`; returns the sessions, those
/// cut before a document arrived, and the cuts.
async fn sync_while_losing(
    device: &mut DeviceStore,
    relay: &crate::demo::link::Relay,
    every: Duration,
) -> (usize, usize, usize) {
    let (mut sessions, mut idle_sessions, mut cuts) = (0, 0, 0);
    loop {
        sessions += 1;
        let held_before = device.document_count().expect("count");
        match tokio::time::timeout(every, client::sync(device)).await {
            Ok(Ok(_)) => return (sessions, idle_sessions, cuts),
            Ok(Err(e)) => panic!("a sync failed other than by the cut: {e}"),
            Err(_) => {
                cuts += 1;
                // The link is lost for good: nothing more of this connection passes either way
                // (it was dropped with the future, and its close never reaches the server; the
                // server's side stays open until the next connection supersedes it), then a new
                // connection starts from another port.
                relay.lose_flows();
                tokio::time::sleep(Duration::from_millis(200)).await;
                if device.document_count().expect("count") == held_before {
                    idle_sessions += 1;
                }
            }
        }
        assert!(idle_sessions < 10, "ten sessions cut before any document arrived: the cuts come too often");
    }
}

/// The change the bench makes to a document on the server (an allergy added by a feed), as
/// Automerge changes, so that other systems can be given the very same change.
pub fn bench_change(summary: &mut PatientSummary, label: &str) -> Vec<automerge::Change> {
    let before = summary.heads();
    summary.add(&Allergy::new(label, Provenance::new("server", "bench", "gp-feed", 1))).expect("add");
    summary.changes_since(&before)
}
