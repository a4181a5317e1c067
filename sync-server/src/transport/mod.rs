//! The regional QUIC server: accepts devices, runs enrolment and sync sessions.
//!
//! One task per connection (inside a span naming the device, never a patient), one session
//! stream per connection, size-capped frame reads, and a deadline on every read. A malformed
//! frame ends only that connection. Store work runs on the blocking pool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use care_node::clock::Clock;
use care_node::identity::{PublicKey, short_hex};
use care_node::protocol::{
    ALPN_ENROL, ALPN_SYNC, ClientMessage, EnrolRequest, EnrolResponse, MAX_ENROL_FRAME_LEN, ServerMessage,
    close,
};
use care_node::tls::{DeviceKeyPolicy, certificate_key, server_config};
use care_node::wire::{WireError, read_frame, read_frame_within, write_frame};
use tracing::Instrument;

use crate::domain::limits::Limits;
use crate::operator::metrics::{OutcomeLabel, RECEIVED, SENT, metrics};
use crate::session::{ServerSession, SessionError};
use crate::store::{DeviceRecord, ServerStore};

/// How long the server waits for a device to close after the session ended.
pub const LINGER: Duration = Duration::from_secs(10);
/// Connections beyond this are refused.
pub const MAX_CONNECTIONS: usize = 20_000;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("could not listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error(transparent)]
    Tls(#[from] care_node::tls::TlsError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Admits enrolled, unrevoked device keys, and revoked ones with a wipe pending (to be told to
/// wipe), asking the store at every handshake so that a revocation takes effect at once.
#[derive(Debug)]
struct StorePolicy(Arc<dyn ServerStore>);

impl std::fmt::Debug for dyn ServerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerStore")
    }
}

impl DeviceKeyPolicy for StorePolicy {
    fn is_allowed(&self, key: &PublicKey) -> bool {
        match self.0.device_by_key(key) {
            Ok(Some(device)) => device.admitted(),
            Ok(None) => false,
            Err(e) => {
                tracing::error!(error = %e, "device lookup failed during handshake");
                false
            }
        }
    }
}

struct Shared {
    store: Arc<dyn ServerStore>,
    /// The newest change sequence number, published whenever it moves (live sessions wait on it).
    changes: tokio::sync::watch::Receiver<u64>,
    server_key: PublicKey,
    /// The live connection of each device, with when it was admitted; a newer one supersedes it.
    live: Mutex<HashMap<i64, (quinn::Connection, i64)>>,
    /// Enrolment connections open now (peers that have not authenticated).
    enrolling: std::sync::atomic::AtomicUsize,
    /// Each device's upload allowance.
    rates: Mutex<HashMap<i64, Allowance>>,
    limits: Limits,
    /// The server's wall clock, passed to the sessions and the store.
    clock: Clock,
}

/// A token bucket of upload bytes (`Limits::upload_bytes_per_minute`), so a device back from a
/// long shift offline can still send its backlog at once.
#[derive(Debug)]
struct Allowance {
    tokens: f64,
    at: std::time::Instant,
}

impl Allowance {
    fn full(per_minute: u64) -> Self {
        Allowance { tokens: per_minute as f64, at: std::time::Instant::now() }
    }

    fn take(&mut self, cost: u64, per_minute: u64) -> bool {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() / 60.0 * per_minute as f64;
        self.tokens = (self.tokens + refill).min(per_minute as f64);
        self.at = now;
        if self.tokens < cost as f64 {
            return false;
        }
        self.tokens -= cost as f64;
        true
    }
}

/// How often the server looks for revocations and wipes of connected devices.
pub const REVOCATION_POLL: Duration = Duration::from_millis(250);

/// Closes the connections of devices revoked or told to wipe since they connected, so a
/// revocation (from the CLI in another process or the admin API) ends a live session at once.
/// A wipe ends the session too; the device's next connection is told to wipe.
async fn watch_revocations(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(REVOCATION_POLL).await;
        let live: Vec<(i64, i64, usize)> = shared
            .live
            .lock()
            .expect("live map")
            .iter()
            .map(|(id, (conn, since))| (*id, *since, conn.stable_id()))
            .collect();
        if live.is_empty() {
            continue;
        }
        let store = shared.store.clone();
        let devices = match tokio::task::spawn_blocking(move || store.devices()).await {
            Ok(Ok(devices)) => devices,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the devices to apply revocations and wipes to live sessions");
                continue;
            }
            Err(_) => continue,
        };
        for (id, since, stable) in live {
            let Some(d) = devices.iter().find(|d| d.id == id) else { continue };
            let revoked = d.revoked_at_ms.is_some_and(|at| at >= since)
                || (d.revoked_at_ms.is_some() && !d.wipe_pending());
            let wipe = d.wipe_pending() && d.wipe_requested_at_ms.is_some_and(|at| at >= since);
            if !(revoked || wipe) {
                continue;
            }
            // Only the connection looked at: a newer one (the reconnect after a wipe) stays.
            let conn = {
                let mut live = shared.live.lock().expect("live map");
                match live.get(&id) {
                    Some((c, _)) if c.stable_id() == stable => live.remove(&id),
                    _ => None,
                }
            };
            if let Some((conn, _)) = conn {
                tracing::warn!(device = %d.name, "closing the live session of a revoked or wiped device");
                let reason: &[u8] = if wipe {
                    b"reconnect: the operator asked this device to wipe"
                } else {
                    b"this device has been revoked"
                };
                conn.close(close::REFUSED.into(), reason);
            }
        }
    }
}

/// A server running on a tokio runtime.
pub struct RunningServer {
    pub addr: SocketAddr,
    endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
    watcher: tokio::task::JoinHandle<()>,
    revocations: tokio::task::JoinHandle<()>,
    connections: Arc<Mutex<tokio::task::JoinSet<()>>>,
}

impl RunningServer {
    /// Stops accepting, closes every connection and waits for them to go; when it returns, the
    /// address is free again.
    pub async fn shutdown(self) {
        self.watcher.abort();
        self.revocations.abort();
        self.task.abort();
        let _ = self.task.await;
        self.endpoint.close(close::DONE.into(), b"server shutting down");
        self.endpoint.wait_idle().await;
        // Connection tasks hold the endpoint's socket until they end.
        let mut connections = std::mem::take(&mut *self.connections.lock().expect("connection set"));
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

/// Starts the server on `listen` (port 0 picks a free port), with the default [`Limits`].
pub async fn start(store: Arc<dyn ServerStore>, listen: SocketAddr) -> Result<RunningServer, ServerError> {
    start_with(store, listen, Limits::default()).await
}

/// [`start`] bounded by `limits` (the configuration file's `[limits]`).
pub async fn start_with(
    store: Arc<dyn ServerStore>,
    listen: SocketAddr,
    limits: Limits,
) -> Result<RunningServer, ServerError> {
    start_with_clock(store, listen, limits, Clock::system()).await
}

/// [`start_with`] on `clock` instead of the system's (tests: a server months ahead).
pub async fn start_with_clock(
    store: Arc<dyn ServerStore>,
    listen: SocketAddr,
    limits: Limits,
    clock: Clock,
) -> Result<RunningServer, ServerError> {
    let identity = store.server_identity()?;
    let config = server_config(&identity, Arc::new(StorePolicy(store.clone())))?;
    let endpoint = quinn::Endpoint::server(config, listen).map_err(|e| ServerError::Bind(listen, e))?;
    let addr = endpoint.local_addr().map_err(|e| ServerError::Bind(listen, e))?;
    let (changed, changes) = tokio::sync::watch::channel(store.max_seq()?);
    let shared = Arc::new(Shared {
        store: store.clone(),
        changes,
        server_key: identity.public_key(),
        live: Mutex::new(HashMap::new()),
        enrolling: std::sync::atomic::AtomicUsize::new(0),
        rates: Mutex::new(HashMap::new()),
        limits,
        clock,
    });
    let revocations = tokio::spawn(watch_revocations(shared.clone()));
    let watcher = tokio::spawn(watch_changes(store, changed));
    let accept = endpoint.clone();
    let connections = Arc::new(Mutex::new(tokio::task::JoinSet::new()));
    let tasks = connections.clone();
    let task = tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            if accept.open_connections() > MAX_CONNECTIONS {
                incoming.refuse();
                continue;
            }
            let shared = shared.clone();
            let remote = incoming.remote_address();
            let mut tasks = tasks.lock().expect("connection set");
            while tasks.try_join_next().is_some() {}
            tasks.spawn(
                async move {
                    if let Err(e) = handle_connection(incoming, shared).await {
                        tracing::info!(error = %e, "connection ended with an error");
                    }
                }
                .instrument(tracing::info_span!("connection", %remote)),
            );
        }
    });
    tracing::info!(%addr, server_key = %short_hex(&identity.public_key()), "care-sync server listening");
    Ok(RunningServer { addr, endpoint, task, watcher, revocations, connections })
}

/// How often the server looks for new changes to push to live sessions. Changes can come from
/// other processes (imports, operator commands), so the store itself is watched.
pub const CHANGE_POLL: Duration = Duration::from_millis(25);

async fn watch_changes(store: Arc<dyn ServerStore>, changed: tokio::sync::watch::Sender<u64>) {
    let mut last = *changed.borrow();
    loop {
        tokio::time::sleep(CHANGE_POLL).await;
        let store = store.clone();
        let Ok(Ok(seq)) = tokio::task::spawn_blocking(move || store.max_seq()).await else { continue };
        if seq != last {
            last = seq;
            if changed.send(seq).is_err() {
                return;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("handshake failed: {0}")]
    Handshake(#[from] quinn::ConnectionError),
    #[error("unknown application protocol")]
    UnknownAlpn,
    #[error("sync connection without an enrolled device key")]
    NoDevice,
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error("the device sent nothing for {0:?}")]
    Timeout(Duration),
    #[error("the store task failed")]
    Join,
    #[error("too many connections of this kind at once")]
    Busy,
}

/// The device closed the connection itself, saying it was done.
fn closed_by_device(e: &ConnectionError) -> bool {
    let ConnectionError::Wire(wire) = e else { return false };
    matches!(
        wire.connection_error(),
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if u64::from(c.error_code) == u64::from(care_node::protocol::close::DONE)
    )
}

async fn handle_connection(incoming: quinn::Incoming, shared: Arc<Shared>) -> Result<(), ConnectionError> {
    let conn = incoming.await.inspect_err(|_| {
        metrics().refused_handshakes.inc();
    })?;
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    let result = match alpn.as_deref() {
        Some(ALPN_SYNC) => handle_sync(conn.clone(), shared).await,
        Some(ALPN_ENROL) => handle_enrol(conn.clone(), shared).await,
        _ => {
            conn.close(close::PROTOCOL.into(), b"unknown application protocol");
            Err(ConnectionError::UnknownAlpn)
        }
    };
    let stats = conn.stats();
    metrics().bytes.get_or_create(&SENT).inc_by(stats.udp_tx.bytes);
    metrics().bytes.get_or_create(&RECEIVED).inc_by(stats.udp_rx.bytes);
    result
}

fn peer_key(conn: &quinn::Connection) -> Option<PublicKey> {
    let certs = conn.peer_identity()?.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    certificate_key(certs.first()?)
}

/// Reads an enrolment frame: small, and within `deadline`.
async fn read_with_deadline<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    deadline: Duration,
) -> Result<Option<T>, ConnectionError> {
    match tokio::time::timeout(deadline, read_frame_within::<T>(recv, MAX_ENROL_FRAME_LEN)).await {
        Ok(result) => Ok(result?.map(|(message, _)| message)),
        Err(_) => Err(ConnectionError::Timeout(deadline)),
    }
}

/// Ends a connection because of `error`, telling the device why (never with patient data).
fn close_with(conn: &quinn::Connection, error: &ConnectionError) {
    let code = match error {
        ConnectionError::Session(e) => e.close_code(),
        ConnectionError::Join => close::INTERNAL,
        _ => close::PROTOCOL,
    };
    let reason = error.to_string();
    conn.close(code.into(), &reason.as_bytes()[..reason.len().min(512)]);
}

async fn handle_sync(conn: quinn::Connection, shared: Arc<Shared>) -> Result<(), ConnectionError> {
    let device = match peer_key(&conn).map(|k| shared.store.device_by_key(&k)) {
        Some(Ok(Some(device))) if device.admitted() => device,
        _ => {
            metrics().refused_handshakes.inc();
            conn.close(close::REFUSED.into(), b"not an enrolled device");
            return Err(ConnectionError::NoDevice);
        }
    };
    let span = tracing::info_span!("sync", device = %device.name);
    async move {
        let admitted = shared.clock.now_ms();
        if let Some((old, _)) =
            shared.live.lock().expect("live map").insert(device.id, (conn.clone(), admitted))
        {
            old.close(close::DONE.into(), b"superseded by a newer connection of this device");
        }
        metrics().connected_devices.inc();
        let result = run_sync(&conn, device.clone(), &shared).await;
        metrics().connected_devices.dec();
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics().syncs.get_or_create(&OutcomeLabel { outcome }).inc();
        {
            let mut live = shared.live.lock().expect("live map");
            if live.get(&device.id).is_some_and(|(c, _)| c.stable_id() == conn.stable_id()) {
                live.remove(&device.id);
            }
        }
        match &result {
            // Only the operator can free space: that one is an error, the rest are the devices'.
            Err(e @ ConnectionError::Session(SessionError::Store(crate::store::StoreError::StorageFull))) => {
                tracing::error!(error = %e, "sync session failed: free disk space under the data directory");
            }
            Err(e) => tracing::warn!(error = %e, "sync session failed"),
            // One line per session at the default level: who synced, for how long.
            Ok(()) => tracing::info!(
                seconds = (shared.clock.now_ms() - admitted) as f64 / 1000.0,
                "sync session ended"
            ),
        }
        result
    }
    .instrument(span)
    .await
}

/// Runs a session step on the blocking pool (store work), handing the session back.
async fn on_store<T: Send + 'static>(
    session: ServerSession,
    store: Arc<dyn ServerStore>,
    step: impl FnOnce(&mut ServerSession, &dyn ServerStore) -> T + Send + 'static,
) -> Result<(ServerSession, T), ConnectionError> {
    tokio::task::spawn_blocking(move || {
        let mut session = session;
        let out = step(&mut session, store.as_ref());
        (session, out)
    })
    .await
    .map_err(|_| ConnectionError::Join)
}

/// Reads the device's frames on its own task, so that waiting for a frame and waiting for a
/// change can be raced without ever cutting a frame in half.
async fn read_frames(mut recv: quinn::RecvStream, frames: tokio::sync::mpsc::Sender<Frame>) {
    loop {
        let frame = read_frame::<ClientMessage>(&mut recv)
            .await
            .map(|f| f.map(|(m, _)| m))
            .map_err(ConnectionError::from);
        let end = !matches!(frame, Ok(Some(_)));
        if frames.send(frame).await.is_err() || end {
            return;
        }
    }
}

/// Tells the device why its session ends, in a frame it will read, then lets it hang up first.
async fn tell_and_linger(conn: &quinn::Connection, send: &mut quinn::SendStream, why: &ServerMessage) {
    let _ = write_frame(send, why).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(LINGER, conn.closed()).await;
}

/// How long a page of a round should take to deliver on this connection: a link cut part-way
/// through a page costs what of it arrived (the device applies whole pages), so slow links get
/// small pages.
const PAGE_SECONDS: f64 = 0.25;
/// How much of a round may be sent and not yet applied on the device: this many times the
/// link's bandwidth-delay product (BBR's own in-flight cap is two; the third keeps the link busy
/// while a lost packet is sent again, when the device can apply nothing behind it), plus two
/// pages (the one the device applies while the next arrives). Two made the uncut cold sync of
/// 10,000 over `3g` 133 s against 126 s, four overflowed the link's queue (docs/benchmarks.md).
const AHEAD_BDPS: f64 = 3.0;
/// The smallest page, whatever the link (a few documents; below that, per-page costs dominate).
const MIN_PAGE_BYTES: usize = 16 * 1024;
/// The least a round may have unapplied, whatever the link.
const MIN_AHEAD_BYTES: usize = 64 * 1024;
/// The rate is what the device applied over the last this many round trips (at least
/// [`RATE_WINDOW_MIN`]): long enough that a burst of acknowledgements (pages that queued on
/// the link arrive together) does not read as a faster link.
const RATE_WINDOW_RTTS: f64 = 8.0;
const RATE_WINDOW_MIN: Duration = Duration::from_millis(500);

/// Paces a round to the link and the device. Whatever is sent but not yet applied when a link
/// is cut is lost with the connection and sent again on the next one, so the round keeps no
/// more unapplied than the link needs to stay full: three times its bandwidth-delay product plus two
/// pages, from the rate the device applied pages at over the last few round trips
/// (`PageApplied`) and the lowest round trip seen. Neither the congestion window nor the
/// transport's own acknowledgements are a guide: BBR's window on 3G grew to three seconds of
/// the link behind its one-second queue, so data sent (and counted delivered) sat in the queue
/// or was dropped there, and each cut threw that away; pacing on data applied cannot overrun
/// the queue. Until pages are applied, a round starts with the least (see [`Pacer::pace`]).
struct Pacer {
    min_rtt: Duration,
    /// What the device had applied when the round began.
    applied_at_start: u64,
    /// (when, bytes the device had applied by then), oldest first, over the rate's window; the
    /// first is the round's first page applied (the round trip before it is no measure of the
    /// link).
    points: std::collections::VecDeque<(std::time::Instant, u64)>,
    /// When the first page was written, if nothing was unapplied when pacing began (otherwise
    /// pages applied next were written before it, and no first estimate is made).
    first_written: Option<std::time::Instant>,
    fresh: bool,
}

impl Pacer {
    fn new(conn: &quinn::Connection, session: &ServerSession) -> Self {
        Self {
            min_rtt: conn.rtt().max(Duration::from_micros(100)),
            applied_at_start: session.applied_bytes(),
            points: std::collections::VecDeque::new(),
            first_written: None,
            fresh: session.unapplied_bytes() == 0,
        }
    }

    /// Notes that a page was written (the first one starts the clock of the first estimate).
    fn written(&mut self) {
        if self.fresh {
            self.first_written.get_or_insert_with(std::time::Instant::now);
        }
    }

    /// The link's rate as the device applies it (bytes per second), once a page has been
    /// applied.
    fn rate(&mut self, conn: &quinn::Connection, session: &ServerSession) -> Option<f64> {
        let rtt = conn.rtt().max(Duration::from_micros(100));
        self.min_rtt = self.min_rtt.min(rtt);
        let now = std::time::Instant::now();
        let window = self.min_rtt.mul_f64(RATE_WINDOW_RTTS).max(RATE_WINDOW_MIN);
        if session.applied_bytes() == self.applied_at_start {
            return None;
        }
        let last = self.points.back().map(|p| p.0);
        if last.is_none_or(|at| now - at >= Duration::from_millis(10)) {
            self.points.push_back((now, session.applied_bytes()));
        }
        // Keep one point at least a window old, so the rate spans a whole window.
        while self.points.len() > 2 && now - self.points[1].0 >= window {
            self.points.pop_front();
        }
        let (since, from) = self.points[0];
        let span = (now - since).as_secs_f64();
        let applied = session.applied_bytes().saturating_sub(from);
        if span >= self.min_rtt.as_secs_f64() && applied > 0 {
            return Some(applied as f64 / span);
        }
        // Until a round trip of pages has been applied: what was applied since the first page
        // was written, over that time less a round trip (what remains is the pages' time on
        // the link, and their applying, so this errs low). It opens the round a round trip
        // sooner: on `flaky-wifi` that round trip at 64 KB was a tenth of a cold sync of 1,000.
        let first = self.first_written?;
        let on_link = ((now - first).saturating_sub(self.min_rtt)).max(self.min_rtt / 4);
        let applied = session.applied_bytes().saturating_sub(self.applied_at_start);
        Some(applied as f64 / on_link.as_secs_f64())
    }

    /// The next page's size (a quarter of a second of the rate, between [`MIN_PAGE_BYTES`] and
    /// the protocol's [`TARGET_BATCH_BYTES`](care_node::protocol::TARGET_BATCH_BYTES): on
    /// loopback or a LAN the maximum) and how much of the round may be unapplied before it.
    fn pace(&mut self, conn: &quinn::Connection, session: &ServerSession) -> (usize, usize) {
        if !*PACING {
            return (care_node::protocol::TARGET_BATCH_BYTES, usize::MAX);
        }
        // Until pages are applied, the least: quinn's BBR starts with a congestion window of
        // 240 KB, two seconds of `3g`, so its window is no estimate of the link.
        let Some(rate) = self.rate(conn, session) else {
            return (MIN_PAGE_BYTES, MIN_AHEAD_BYTES);
        };
        let page =
            ((rate * PAGE_SECONDS) as usize).clamp(MIN_PAGE_BYTES, care_node::protocol::TARGET_BATCH_BYTES);
        let ahead = (rate * self.min_rtt.as_secs_f64() * AHEAD_BDPS) as usize + 2 * page;
        (page, ahead.max(MIN_AHEAD_BYTES))
    }
}

/// `CARE_SYNC_PACING=off` sends rounds unpaced (512 KB pages, as fast as the connection
/// takes them), for side-by-side comparisons; read once.
static PACING: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
    let off = std::env::var("CARE_SYNC_PACING").is_ok_and(|v| v.eq_ignore_ascii_case("off"));
    if off {
        tracing::info!("rounds unpaced (CARE_SYNC_PACING=off)");
    }
    !off
});

/// What the reader task hands over: a message, the end of the device's stream, or an error.
type Frame = Result<Option<ClientMessage>, ConnectionError>;

/// The device's frames, and one that arrived while a round went out and waits to be handled.
struct Inbox {
    frames: tokio::sync::mpsc::Receiver<Frame>,
    held: Option<Frame>,
}

impl Inbox {
    /// The next frame to handle (a held one first); `None` once the reader has ended.
    async fn next(&mut self) -> Option<Frame> {
        match self.held.take() {
            Some(frame) => Some(frame),
            None => self.frames.recv().await,
        }
    }

    /// Takes `PageApplied` frames into the session until another frame arrives (held, for
    /// the session loop) or none is waiting; with `wait`, waits for at least one frame.
    async fn take_applied(
        &mut self,
        session: &mut ServerSession,
        wait: Option<Duration>,
    ) -> Result<(), ConnectionError> {
        let mut wait = wait;
        while self.held.is_none() {
            let frame = match wait.take() {
                Some(limit) => match tokio::time::timeout(limit, self.frames.recv()).await {
                    Ok(Some(frame)) => frame,
                    // The reader ended: as the end of the device's stream.
                    Ok(None) => Ok(None),
                    Err(_) => return Err(ConnectionError::Timeout(limit)),
                },
                None => match self.frames.try_recv() {
                    Ok(frame) => frame,
                    Err(_) => return Ok(()),
                },
            };
            match frame {
                Ok(Some(ClientMessage::PageApplied { round })) => session.page_applied(round)?,
                other => self.held = Some(other),
            }
        }
        Ok(())
    }
}

/// Streams the pages of the session's current round, keeping what the device has not applied
/// within what the link needs (see [`Pacer`]). Returns early, the round unfinished, when the
/// device sends anything but `PageApplied` meanwhile: the session loop handles that frame first.
async fn send_round(
    mut session: ServerSession,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    inbox: &mut Inbox,
    shared: &Shared,
) -> Result<ServerSession, ConnectionError> {
    let mut pacer = Pacer::new(conn, &session);
    let read_timeout = Duration::from_secs(shared.limits.read_timeout_secs);
    while session.is_downloading() {
        inbox.take_applied(&mut session, None).await?;
        let (mut max_bytes, mut ahead) = pacer.pace(conn, &session);
        while inbox.held.is_none() && session.unapplied_bytes() >= ahead {
            inbox.take_applied(&mut session, Some(read_timeout)).await?;
            (max_bytes, ahead) = pacer.pace(conn, &session);
        }
        if inbox.held.is_some() {
            break;
        }
        let (back, page) =
            on_store(session, shared.store.clone(), move |s, store| s.next_page(store, max_bytes)).await?;
        session = back;
        if let Some(page) = page? {
            if let ServerMessage::Docs { items, .. } = &page {
                metrics().documents.get_or_create(&SENT).inc_by(items.len() as u64);
            }
            write_frame(send, &page).await?;
            pacer.written();
        }
    }
    Ok(session)
}

async fn run_sync(
    conn: &quinn::Connection,
    device: DeviceRecord,
    shared: &Shared,
) -> Result<(), ConnectionError> {
    // A failed accept is a lost connection: nothing to close.
    let (mut send, recv) = conn.accept_bi().await?;
    let result = run_session(conn, &mut send, recv, device, shared).await;
    if let Err(e) = &result {
        // Closed while the stream is still ours: a dropped stream is finished, and a device that
        // read that finish before the close would see a clean end of the session instead of the
        // reason (CI saw it once).
        close_with(conn, e);
    }
    result
}

async fn run_session(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: quinn::RecvStream,
    device: DeviceRecord,
    shared: &Shared,
) -> Result<(), ConnectionError> {
    let (frames_tx, frames) = tokio::sync::mpsc::channel(16);
    let reader = tokio::spawn(read_frames(recv, frames_tx));
    let mut inbox = Inbox { frames, held: None };
    let mut changes = shared.changes.clone();
    changes.borrow_and_update();
    let device_id = device.id;
    let mut session = ServerSession::new(device).presenting(shared.server_key).limited(shared.limits);
    // The sync's duration ends with its last round: waiting in a live session is not syncing.
    let started = std::time::Instant::now();
    let mut timed = false;
    while !session.is_done() {
        if !timed && session.is_watching() {
            metrics().sync_duration.observe(started.elapsed().as_secs_f64());
            timed = true;
        }
        let next = if session.is_watching() {
            tokio::select! {
                frame = inbox.next() => frame,
                changed = changes.changed() => {
                    if changed.is_err() {
                        break; // the server is shutting down
                    }
                    let now = shared.clock.now_ms();
                    let (back, live) = on_store(session, shared.store.clone(), move |s, store| {
                        s.live_round(store, now)
                    })
                    .await?;
                    session = back;
                    if live? {
                        session = match send_round(session, conn, send, &mut inbox, shared).await {
                            Ok(session) => session,
                            // The device stopped watching while the round went out: a normal end.
                            Err(e) if closed_by_device(&e) => return Ok(()),
                            Err(e) => return Err(e),
                        };
                    }
                    continue;
                }
            }
        } else {
            let read_timeout = Duration::from_secs(shared.limits.read_timeout_secs);
            tokio::time::timeout(read_timeout, inbox.next())
                .await
                .map_err(|_| ConnectionError::Timeout(read_timeout))?
        };
        let message = match next {
            Some(Ok(Some(message))) => message,
            // A device leaving a live session closes the connection with `DONE`: a normal end,
            // also while a pushed round is in flight (its acknowledgement may be lost with the
            // connection: the round stays pending for the next `Hello`).
            Some(Err(e)) if session.is_live() && closed_by_device(&e) => break,
            Some(Err(e)) => return Err(e),
            // The device finished its side: the normal end of a live session.
            _ if session.is_watching() => break,
            _ => return Err(SessionError::Protocol("the device ended the session early".into()).into()),
        };
        if let ClientMessage::Upload { docs, .. } = &message {
            metrics().documents.get_or_create(&RECEIVED).inc_by(docs.len() as u64);
        }
        // Per device, across its connections: one device's flood never takes the store from others.
        let cost = match &message {
            ClientMessage::Upload { docs, .. } => {
                docs.iter().flat_map(|d| &d.changes).map(|c| c.len() as u64).sum()
            }
            ClientMessage::ViewLog { entries } => entries.len() as u64 * 256,
            _ => 0,
        };
        let per_minute = shared.limits.upload_bytes_per_minute;
        if cost > 0
            && !shared
                .rates
                .lock()
                .expect("rates")
                .entry(device_id)
                .or_insert_with(|| Allowance::full(per_minute))
                .take(cost, per_minute)
        {
            let message = "upload rate limit: this device sent too much in the last minute; it keeps its changes and may sync again shortly";
            tell_and_linger(conn, send, &ServerMessage::Refused { message: message.into() }).await;
            return Err(ConnectionError::Busy);
        }
        let now = shared.clock.now_ms();
        let (back, replies) =
            on_store(session, shared.store.clone(), move |s, store| s.handle(message, store, now)).await?;
        session = back;
        let replies = match replies {
            Ok(replies) => replies,
            Err(e) => {
                if let Some(refusal) = e.refusal() {
                    tell_and_linger(conn, send, &refusal).await;
                }
                return Err(e.into());
            }
        };
        for reply in &replies {
            write_frame(send, reply).await?;
        }
        session = send_round(session, conn, send, &mut inbox, shared).await?;
    }
    if !timed {
        metrics().sync_duration.observe(started.elapsed().as_secs_f64());
    }
    // Finish our side and let the device hang up first (close is not delivery).
    let _ = send.finish();
    let _ = tokio::time::timeout(LINGER, async {
        while inbox.frames.recv().await.is_some() {}
        conn.closed().await
    })
    .await;
    reader.abort();
    Ok(())
}

/// Finishes our stream and waits for the device to close the connection: dropping the
/// connection first would discard frames still in flight (close is not delivery).
async fn finish_and_linger(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    recv: &mut quinn::RecvStream,
) {
    let _ = send.finish();
    let _ = read_with_deadline::<ClientMessage>(recv, LINGER).await;
    let _ = tokio::time::timeout(LINGER, conn.closed()).await;
}

/// Counts an enrolment connection while it lasts.
struct Enrolling<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Enrolling<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn handle_enrol(conn: quinn::Connection, shared: Arc<Shared>) -> Result<(), ConnectionError> {
    let open = shared.enrolling.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let _counted = Enrolling(&shared.enrolling);
    if open >= shared.limits.enrol_connections {
        conn.close(close::INTERNAL.into(), b"too many enrolments at once; try again shortly");
        return Err(ConnectionError::Busy);
    }
    let result = enrol_exchange(&conn, &shared).await;
    if let Err(e) = &result {
        close_with(&conn, e);
    }
    result
}

async fn enrol_exchange(conn: &quinn::Connection, shared: &Shared) -> Result<(), ConnectionError> {
    let deadline = Duration::from_secs(shared.limits.enrol_timeout_secs);
    let (mut send, mut recv) = tokio::time::timeout(deadline, conn.accept_bi())
        .await
        .map_err(|_| ConnectionError::Timeout(deadline))??;
    // Close with the reason while our stream is still open: dropping it first would finish it,
    // and the device would read a clean end instead of why.
    let request = match read_with_deadline::<EnrolRequest>(&mut recv, deadline).await {
        Ok(Some(request)) => request,
        Ok(None) => return Ok(()),
        Err(e) => {
            close_with(conn, &e);
            return Err(e);
        }
    };
    let response = enrol(&request, shared).await;
    let outcome = match &response {
        EnrolResponse::Refused { message } => {
            tracing::info!(reason = %message, "enrolment refused");
            "refused"
        }
        _ => "ok",
    };
    metrics().enrolments.get_or_create(&OutcomeLabel { outcome }).inc();
    write_frame(&mut send, &response).await?;
    finish_and_linger(conn, send, &mut recv).await;
    Ok(())
}

async fn enrol(request: &EnrolRequest, shared: &Shared) -> EnrolResponse {
    let store = shared.store.clone();
    let request = request.clone();
    let (server_key, now_ms) = (shared.server_key, shared.clock.now_ms());
    // The connection's span (its address) goes with the work, so its log lines still say whose.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        span.in_scope(|| crate::session::enrol::enrol(store.as_ref(), &request, server_key, now_ms))
    })
    .await
    .unwrap_or_else(|_| EnrolResponse::Refused { message: crate::store::EnrolError::Internal.to_string() })
}
