//! Shared helpers of the end-to-end tests: a real server with a real store, and devices with
//! real encrypted stores, speaking real QUIC on 127.0.0.1 ([`TestServer::start`]) or joined by
//! the socket-free pair ([`TestServer::in_memory`], [`pair`]). The same test reads the same
//! either way: a device syncs with whichever server it enrolled with.

pub mod pair;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use care_node::client::{ClientError, Quic, SyncReport};
use care_node::clock::Clock;
use care_node::crypto::{KdfParams, PassphraseWrapper};
use care_node::nhs::NhsNumber;
use care_node::store::DeviceStore;
use care_node::summary::Allergy;
use care_node::sync::{AccessDecision, AccessRequest, SyncStats};
use care_sync_server::demo::population::Population;
use care_sync_server::operator::ops;
use care_sync_server::store::sqlite::SqliteStore;
use care_sync_server::store::{Role, ServerStore};
use care_sync_server::transport::{self, RunningServer};

/// The passphrase of every test device.
pub const PASSPHRASE: &str = "test passphrase";

/// Argon2id costs small enough for tests; the format records them, so stores still open.
pub fn cheap_wrapper(passphrase: &str) -> PassphraseWrapper {
    PassphraseWrapper::with_params(passphrase, KdfParams { memory_kib: 256, iterations: 1, parallelism: 1 })
}

/// A running server with its store and synthetic patients.
pub struct TestServer {
    pub store: Arc<dyn ServerStore>,
    pub running: Option<RunningServer>,
    /// The socket-free pair's server, for a server [`TestServer::in_memory`].
    pub memory: Option<pair::Memory>,
    pub addr: SocketAddr,
    pub patients: Vec<NhsNumber>,
    /// The server's clock: `clock.set_offset(…)` moves it while it runs (days offline, skew).
    pub clock: Clock,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with `patients` synthetic patients on 127.0.0.1, port 0.
    pub async fn start(patients: usize) -> Self {
        Self::start_limited(patients, care_sync_server::domain::limits::Limits::default()).await
    }

    /// As [`TestServer::start`], with the transport's bounds set to `limits`.
    pub async fn start_limited(patients: usize, limits: care_sync_server::domain::limits::Limits) -> Self {
        Self::start_on_dir(tempfile::tempdir().expect("temp dir"), patients, limits).await
    }

    /// As [`TestServer::start`], with the store in a new directory under `parent` (a small
    /// disk, say).
    pub async fn start_in(parent: &std::path::Path, patients: usize) -> Self {
        let dir = tempfile::tempdir_in(parent).expect("temp dir");
        Self::start_on_dir(dir, patients, care_sync_server::domain::limits::Limits::default()).await
    }

    /// A server with `patients` synthetic patients that devices reach through the socket-free
    /// pair: no transport, no port. [`TestServer::stop`] makes it unreachable.
    pub fn in_memory(patients: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, patients) = filled_store(dir.path(), patients);
        let clock = Clock::system();
        let limits = care_sync_server::domain::limits::Limits::default();
        let memory = Some(pair::Memory::new(store.clone(), clock.clone(), limits));
        // Tokens carry an address; nothing listens on this one.
        let addr = "127.0.0.1:9".parse().unwrap();
        Self { store, running: None, memory, addr, patients, clock, _dir: dir }
    }

    async fn start_on_dir(
        dir: tempfile::TempDir,
        patients: usize,
        limits: care_sync_server::domain::limits::Limits,
    ) -> Self {
        let (store, patients) = filled_store(dir.path(), patients);
        let clock = Clock::system();
        let running =
            transport::start_with_clock(store.clone(), "127.0.0.1:0".parse().unwrap(), limits, clock.clone())
                .await
                .expect("server starts");
        let addr = running.addr;
        Self { store, running: Some(running), memory: None, addr, patients, clock, _dir: dir }
    }

    /// How devices reach this server.
    pub fn net(&self) -> Net {
        self.memory.clone().map_or(Net::Quic, Net::Memory)
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// A server on an existing data directory (a restored backup, say), on `addr`.
    pub async fn open(dir: tempfile::TempDir, addr: SocketAddr) -> Self {
        let store: Arc<dyn ServerStore> = Arc::new(SqliteStore::open(dir.path()).expect("server store"));
        let clock = Clock::system();
        let running = start_on(store.clone(), addr, &clock).await;
        Self { store, running: Some(running), memory: None, addr, patients: Vec::new(), clock, _dir: dir }
    }

    /// A one-time token for a new device.
    pub fn token(&self, name: &str, role: Role) -> String {
        ops::issue_token(self.store.as_ref(), name, role, self.addr, ops::DEFAULT_TOKEN_TTL).expect("token")
    }

    /// The store's id of an enrolled device.
    pub fn device_id(&self, name: &str) -> i64 {
        self.store.device_by_name(name).unwrap().expect("a device of that name").id
    }

    /// Puts the patients with these indices on a device's caseload.
    pub fn caseload(&self, device: &str, patients: impl IntoIterator<Item = usize>) {
        for i in patients {
            ops::caseload_add(self.store.as_ref(), device, self.patients[i].as_str()).expect("caseload add");
        }
    }

    /// Stops the server (the store stays), as a crash or an outage would.
    pub async fn stop(&mut self) {
        if let Some(memory) = &self.memory {
            memory.set_reachable(false);
        }
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    /// Starts the server again on the same address.
    pub async fn restart(&mut self) {
        self.stop().await;
        match &self.memory {
            Some(memory) => memory.set_reachable(true),
            None => self.running = Some(start_on(self.store.clone(), self.addr, &self.clock).await),
        }
    }
}

/// The operator token of every test console.
pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789";

/// A running admin API and dashboard on 127.0.0.1 (port 0), with a blocking HTTP client.
pub struct TestConsole {
    pub base: String,
    agent: ureq::Agent,
    server: Option<care_sync_server::operator::admin::AdminServer>,
}

impl TestConsole {
    /// Starts the console of `server`; devices not synced for `stale_after` are stale.
    pub async fn start(server: &TestServer, stale_after: Duration) -> Self {
        let options = care_sync_server::operator::admin::AdminOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: OPERATOR_TOKEN.into(),
            stale_after_ms: stale_after.as_millis() as i64,
            sync_addr: server.addr.into(),
        };
        let console = care_sync_server::operator::admin::start(server.store.clone(), options)
            .await
            .expect("console starts");
        let agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        Self { base: format!("http://{}", console.addr), agent, server: Some(console) }
    }

    /// `GET path` with `token` (None: no Authorization header): status and body text.
    pub fn get_with(&self, path: &str, token: Option<&str>) -> (u16, String) {
        tokio::task::block_in_place(|| {
            let mut request = self.agent.get(format!("{}{path}", self.base));
            if let Some(token) = token {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            let mut response = request.call().expect("HTTP GET");
            let status = response.status().as_u16();
            (status, response.body_mut().read_to_string().expect("body"))
        })
    }

    /// `POST path` with a JSON body and `token`: status and body text.
    pub fn post_with(&self, path: &str, body: &serde_json::Value, token: Option<&str>) -> (u16, String) {
        tokio::task::block_in_place(|| {
            let mut request = self.agent.post(format!("{}{path}", self.base));
            if let Some(token) = token {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
            // A refused request may leave its body unread, and the server then closes a kept-alive
            // connection that the agent may already be reusing: try a fresh one once.
            let mut response = match request.send_json(body) {
                Ok(response) => response,
                Err(_) => {
                    let mut retry = self.agent.post(format!("{}{path}", self.base));
                    if let Some(token) = token {
                        retry = retry.header("Authorization", format!("Bearer {token}"));
                    }
                    retry.send_json(body).expect("HTTP POST")
                }
            };
            let status = response.status().as_u16();
            (status, response.body_mut().read_to_string().expect("body"))
        })
    }

    /// An authorised GET that must succeed, as JSON.
    pub fn get(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get_with(path, Some(OPERATOR_TOKEN));
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).expect("JSON")
    }

    /// An authorised POST: status and JSON body.
    pub fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let (status, text) = self.post_with(path, &body, Some(OPERATOR_TOKEN));
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }
}

impl Drop for TestConsole {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
    }
}

/// A new server store in `dir` with `patients` synthetic patients, and their NHS numbers.
fn filled_store(dir: &std::path::Path, patients: usize) -> (Arc<dyn ServerStore>, Vec<NhsNumber>) {
    let store: Arc<dyn ServerStore> = Arc::new(SqliteStore::open(dir).expect("server store"));
    let identity = store.server_identity().expect("server identity");
    let mut population = Population::new(1, care_sync_server::server_actor(&identity));
    let mut summaries = (0..patients)
        .map(|_| population.next_patient(care_node::now_ms()).expect("patient"))
        .collect::<Vec<_>>();
    store.insert_patients(&mut summaries).expect("insert patients");
    let patients = summaries.iter().map(|s| s.nhs_number().expect("nhs")).collect();
    (store, patients)
}

/// How a test device reaches its server.
#[derive(Clone)]
pub enum Net {
    /// QUIC to the address it enrolled with.
    Quic,
    /// The socket-free pair.
    Memory(pair::Memory),
}

/// Runs a [`care_node::driver`] call over the device's [`Net`].
macro_rules! over_net {
    ($device:expr, |$store:ident, $connect:ident| $call:expr) => {{
        let device = $device;
        let $store = &mut device.store;
        match &mut device.net {
            Net::Quic => {
                let $connect = &mut Quic;
                $call.await
            }
            Net::Memory(memory) => {
                let $connect = memory;
                $call.await
            }
        }
    }};
}

/// Starts a server on an address a stopped server used: the old socket closes when its endpoint's
/// driver task ends, a moment after `shutdown` returns.
async fn start_on(store: Arc<dyn ServerStore>, addr: SocketAddr, clock: &Clock) -> RunningServer {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let limits = care_sync_server::domain::limits::Limits::default();
        match transport::start_with_clock(store.clone(), addr, limits, clock.clone()).await {
            Ok(running) => return running,
            Err(transport::ServerError::Bind(..)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("server restarts: {e}"),
        }
    }
}

/// A device with its own encrypted store in a temporary directory.
pub struct TestDevice {
    pub name: String,
    pub store: DeviceStore,
    pub path: PathBuf,
    /// How it reaches its server: set by enrolment.
    pub net: Net,
    _dir: tempfile::TempDir,
}

impl TestDevice {
    /// A new, unenrolled device.
    pub fn new(name: &str) -> Self {
        Self::with_dir(name, tempfile::tempdir().expect("temp dir"))
    }

    /// A new, unenrolled device whose store is in a new directory under `parent`.
    pub fn new_in(name: &str, parent: &std::path::Path) -> Self {
        Self::with_dir(name, tempfile::tempdir_in(parent).expect("temp dir"))
    }

    fn with_dir(name: &str, dir: tempfile::TempDir) -> Self {
        let path = dir.path().join("store.db");
        let store = DeviceStore::open(&path, &cheap_wrapper(PASSPHRASE)).expect("device store");
        Self { name: name.to_string(), store, path, net: Net::Quic, _dir: dir }
    }

    /// A device enrolled with `server` under `name` and `role`.
    pub async fn enrolled(server: &TestServer, name: &str, role: Role) -> Self {
        let mut device = Self::new(name);
        device.enrol(server, &server.token(name, role)).await.expect("enrolment");
        device
    }

    /// Enrols with `server` using `token`; the device then syncs the way that server is reached.
    pub async fn enrol(
        &mut self,
        server: &TestServer,
        token: &str,
    ) -> Result<care_node::store::Enrolment, ClientError> {
        self.net = server.net();
        over_net!(self, |store, connect| care_node::driver::enrol(store, token, connect))
    }

    pub async fn sync(&mut self) -> Result<SyncReport, ClientError> {
        over_net!(self, |store, connect| care_node::driver::sync(store, connect, &mut |_| {}))
    }

    /// [`TestDevice::sync`], calling `progress` as the round's items are applied.
    pub async fn sync_with_progress(
        &mut self,
        progress: &mut (dyn FnMut(&SyncStats) + Send),
    ) -> Result<SyncReport, ClientError> {
        over_net!(self, |store, connect| care_node::driver::sync(store, connect, progress))
    }

    /// Asks for a patient outside the device's scope, then syncs.
    pub async fn request_access(
        &mut self,
        request: AccessRequest,
    ) -> Result<(AccessDecision, SyncReport), ClientError> {
        over_net!(self, |store, connect| care_node::driver::request_access(store, connect, request))
    }

    /// Syncs and stays connected until `stop` completes.
    pub async fn watch(
        &mut self,
        on_round: &mut (dyn FnMut(&SyncStats) + Send),
        stop: impl std::future::Future<Output = ()> + Send,
    ) -> Result<SyncReport, ClientError> {
        over_net!(self, |store, connect| care_node::driver::watch(store, connect, on_round, stop))
    }

    /// Records an allergy offline.
    pub fn add_allergy(&mut self, nhs: &NhsNumber, substance: &str) -> care_node::summary::EntryId {
        let entry = Allergy::new(substance, self.store.provenance().expect("provenance"));
        self.store.add_entry(nhs, &entry).expect("add allergy")
    }

    /// The allergies' substances of a patient on this device, in display order.
    pub fn allergies(&self, nhs: &NhsNumber) -> Vec<String> {
        let mut patient = self.store.find_by_nhs(nhs).expect("read").expect("patient on device");
        patient
            .summary
            .clinical_entries::<Allergy>()
            .expect("entries")
            .into_iter()
            .map(|e| e.data.substance)
            .collect()
    }

    /// The raw bytes of the store's files (database and write-ahead log).
    pub fn raw_bytes(&self) -> Vec<u8> {
        let mut bytes = std::fs::read(&self.path).expect("store file");
        if let Ok(wal) = std::fs::read(self.path.with_extension("db-wal")) {
            bytes.extend(wal);
        }
        bytes
    }
}

/// A small tmpfs of its own, to fill up: the disk under a store running out mid-round.
/// Mounting needs the right to (root, as in CI); where it is missing the tests that use it say
/// so and pass, unless `CARE_SYNC_REQUIRE_MOUNT` is set (`.ci/run` sets it), when they fail.
pub struct SmallDisk {
    mountpoint: tempfile::TempDir,
    filler: Option<PathBuf>,
}

impl SmallDisk {
    /// Mounts a tmpfs of `bytes` on a new directory, or `None` where this process may not mount.
    pub fn mount(bytes: u64) -> Option<Self> {
        let mountpoint = tempfile::tempdir().expect("temp dir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=0700"), "tmpfs"])
            .arg(mountpoint.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            assert!(
                std::env::var_os("CARE_SYNC_REQUIRE_MOUNT").is_none(),
                "CARE_SYNC_REQUIRE_MOUNT is set but this process cannot mount a tmpfs"
            );
            eprintln!("skipped: this process may not mount a tmpfs (run as root to test a full disk)");
            return None;
        }
        Some(Self { mountpoint, filler: None })
    }

    pub fn path(&self) -> &std::path::Path {
        self.mountpoint.path()
    }

    /// Takes the disk's free space until at most `leave` bytes are left.
    pub fn fill(&mut self, leave: u64) {
        use std::io::Write;
        assert!(self.filler.is_none(), "free the disk before filling it again");
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).expect("filler file");
        let chunk = vec![0xA5u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        file.set_len(written.saturating_sub(leave)).expect("leave some space");
        self.filler = Some(path);
    }

    /// Gives back what [`SmallDisk::fill`] took.
    pub fn free(&mut self) {
        if let Some(path) = self.filler.take() {
            std::fs::remove_file(path).expect("remove filler");
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.mountpoint.path()).status();
    }
}

/// A device enrolled under `name` with a token naming `addrs` (one `host:port` or several,
/// separated by commas: a region's instances), straight through the store, over real QUIC.
pub async fn enrolled_with_addrs(store: &dyn ServerStore, name: &str, addrs: &str) -> TestDevice {
    let mut device = TestDevice::new(name);
    let addrs = addrs.parse::<care_sync_server::operator::config::ServerAddrs>().expect("addresses");
    let token =
        ops::issue_token(store, name, Role::CommunityNurse, addrs, ops::DEFAULT_TOKEN_TTL).expect("token");
    within(30, care_node::driver::enrol(&mut device.store, &token, &mut Quic)).await.expect("enrolment");
    device
}

/// A binary of the workspace (`care-node`, `care-sync-server`), beside the test's own
/// executable: `cargo test --workspace` builds every package's binaries before running tests.
pub fn workspace_binary(name: &str) -> PathBuf {
    let test = std::env::current_exe().expect("the test's executable");
    let path = test.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps").join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` (or `cargo test --workspace`)",
        path.display()
    );
    path
}

/// Sync sessions this process's server counted as ended with `outcome` (`ok` or `error`):
/// the metrics are process-wide, so a test that reads them has a test binary of its own.
pub fn sync_outcomes(outcome: &'static str) -> u64 {
    care_sync_server::operator::metrics::metrics()
        .syncs
        .get_or_create(&care_sync_server::operator::metrics::OutcomeLabel { outcome })
        .get()
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Runs a future with a deadline, so a hung test fails instead of hanging CI.
pub async fn within<T>(seconds: u64, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(seconds), future).await.expect("finished in time")
}

/// Sends an HL7 v2 ADT^A01 (admitted to Ward 7, Wessex General) for `nhs` over MLLP to `addr`
/// and returns the acknowledgement's text.
pub async fn admit_over_mllp(addr: SocketAddr, nhs: &NhsNumber, control_id: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("MLLP connects");
    let message = format!(
        "\u{0b}MSH|^~\\&|PAS|WGH|CARE|REGION|20261125143000||ADT^A01|{control_id}|P|2.4\rPID|1||{}^^^NHS^NH||TESTER^EDITH\rPV1|1|I|Ward 7^^^Wessex General||||||||||||||||V1\r\u{1c}\r",
        nhs.as_str()
    );
    socket.write_all(message.as_bytes()).await.expect("MLLP send");
    let mut ack = [0u8; 512];
    let n = socket.read(&mut ack).await.expect("MLLP acknowledgement");
    String::from_utf8_lossy(&ack[..n]).into_owned()
}

/// A session opened by hand, over the device's net: for tests that write frames themselves.
pub enum Session {
    Quic(care_node::client::DeviceConnection),
    Memory(Box<pair::MemoryLink>),
}

impl Session {
    pub async fn send(&mut self, message: &care_node::protocol::ClientMessage) -> Result<(), ClientError> {
        use care_node::driver::Link;
        match self {
            Session::Quic(conn) => conn.send(message).await,
            Session::Memory(link) => link.send(message).await,
        }
    }

    pub async fn recv(&mut self) -> Result<Option<care_node::protocol::ServerMessage>, ClientError> {
        use care_node::driver::Link;
        match self {
            Session::Quic(conn) => conn.recv().await,
            Session::Memory(link) => link.recv().await,
        }
    }

    /// The QUIC connection, for tests of the transport's defences (raw bytes).
    pub fn quic(&mut self) -> &mut care_node::client::DeviceConnection {
        match self {
            Session::Quic(conn) => conn,
            Session::Memory(_) => panic!("a QUIC session was wanted; the device is on the socket-free pair"),
        }
    }
}

/// Opens a session for `device` over its net and exchanges `Hello` for `Welcome`.
pub async fn welcomed(device: &TestDevice) -> Session {
    use care_node::driver::Connect;
    use care_node::protocol::{ClientMessage, ServerMessage};
    let mut session = match &device.net {
        Net::Quic => {
            Session::Quic(within(30, care_node::client::DeviceConnection::open(&device.store)).await.unwrap())
        }
        Net::Memory(memory) => Session::Memory(Box::new(memory.clone().open(&device.store).await.unwrap())),
    };
    let cursor = device.store.sync_state().unwrap().cursor;
    session
        .send(&ClientMessage::Hello { cursor, resume: None, staged_server_key: None, incarnation: None })
        .await
        .unwrap();
    assert!(matches!(within(30, session.recv()).await.unwrap(), Some(ServerMessage::Welcome { .. })));
    session
}
