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
use care_node::protocol::{ALPN_ENROL, ALPN_SYNC, close};
use care_node::tls::{DeviceKeyPolicy, certificate_key, server_config};
use care_node::wire::WireError;
use tracing::Instrument;

mod enrolment;
mod pacer;
mod sync;

use enrolment::handle_enrol;
use sync::{Allowance, handle_sync};

use crate::domain::limits::Limits;
use crate::operator::metrics::{RECEIVED, SENT, metrics};
use crate::session::{SessionError, StoreMoved};
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
            // The database cannot say now: the handshake goes on, and the session's own lookup
            // answers "unavailable, try again" (never "revoked", which is not known).
            Err(e) => {
                tracing::error!(error = %e, "device lookup failed during handshake");
                true
            }
        }
    }
}

struct Shared {
    store: Arc<dyn ServerStore>,
    /// The newest change sequence number, published whenever it moves (live sessions wait on it).
    changes: tokio::sync::watch::Receiver<StoreMoved>,
    server_key: PublicKey,
    /// The live connection of each device, with what its record said when it was admitted; a
    /// newer one supersedes it.
    live: Mutex<HashMap<i64, (quinn::Connection, Admitted)>>,
    /// Enrolment connections open now (peers that have not authenticated).
    enrolling: std::sync::atomic::AtomicUsize,
    /// Each device's upload allowance.
    rates: Mutex<HashMap<i64, Allowance>>,
    limits: Limits,
    /// The server's wall clock, passed to the sessions and the store.
    clock: Clock,
}

/// Threads the server's runtime runs store calls on, at most. Past a few dozen at once a call
/// only queues for the store's connections (16 to PostgreSQL; one writer and four readers in
/// SQLite), so more threads would only be made, wait, and be dropped again: 1,000 live rounds
/// at once over two instances made some 300 threads in each every 25 s, each a fresh stack.
const STORE_THREADS: usize = 64;

/// The server's tokio runtime (the `serve` command's, and the bench's servers'): store calls on
/// at most [`STORE_THREADS`] threads, kept a minute between bursts.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(STORE_THREADS)
        .thread_keep_alive(Duration::from_secs(60))
        .build()
}

/// How often the server looks for revocations and wipes of connected devices.
pub const REVOCATION_POLL: Duration = Duration::from_millis(250);

/// What a live session's device record said when the session was admitted (what its Welcome
/// told the device): the watch for revocations closes the session when the record moves past
/// it. No clock is compared, so another instance's or the CLI's clock cannot hide a revocation.
#[derive(Debug, Clone, Copy)]
struct Admitted {
    revoked: bool,
    wipe: bool,
}

impl Admitted {
    fn from(device: &DeviceRecord) -> Self {
        Self { revoked: device.revoked_at_ms.is_some(), wipe: device.wipe_pending() }
    }

    /// Whether a session admitted so must end now that its device's record is `now`: revoked
    /// since (even with a wipe pending: the next connection is told to wipe), revoked with no
    /// wipe pending (its wipe confirmed: never served again), or asked to wipe since.
    fn ends(self, now: &DeviceRecord) -> Option<&'static [u8]> {
        let revoked = now.revoked_at_ms.is_some() && (!self.revoked || !now.wipe_pending());
        let wipe = now.wipe_pending() && !self.wipe;
        match (revoked, wipe) {
            (_, true) => Some(b"reconnect: the operator asked this device to wipe"),
            (true, false) => Some(b"this device has been revoked"),
            (false, false) => None,
        }
    }
}

/// Closes the connections of devices revoked or told to wipe since they connected, so a
/// revocation (from the CLI in another process or the admin API) ends a live session at once.
/// A wipe ends the session too; the device's next connection is told to wipe.
async fn watch_revocations(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(REVOCATION_POLL).await;
        let live: Vec<(i64, Admitted, usize)> = shared
            .live
            .lock()
            .expect("live map")
            .iter()
            .map(|(id, (conn, admitted))| (*id, *admitted, conn.stable_id()))
            .collect();
        if live.is_empty() {
            continue;
        }
        // Only the live devices ever revoked or asked to wipe: a few, however many devices the
        // region has, each found by its id.
        let ids: Vec<i64> = live.iter().map(|(id, _, _)| *id).collect();
        let store = shared.store.clone();
        let devices = match tokio::task::spawn_blocking(move || store.controlled_devices(&ids)).await {
            Ok(Ok(devices)) => devices,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the devices to apply revocations and wipes to live sessions");
                continue;
            }
            Err(_) => continue,
        };
        let devices: HashMap<i64, _> = devices.into_iter().map(|d| (d.id, d)).collect();
        for (id, admitted, stable) in live {
            let Some(d) = devices.get(&id) else { continue };
            let Some(reason) = admitted.ends(d) else { continue };
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
    let (changed, changes) = tokio::sync::watch::channel(StoreMoved::read(store.as_ref(), store.max_seq()?)?);
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
/// other processes (imports, operator commands), so the store itself is watched: one look for
/// every session, which then plans a round only if what moved can concern its device
/// ([`ServerSession::live_round`]).
pub const CHANGE_POLL: Duration = Duration::from_millis(25);

async fn watch_changes(store: Arc<dyn ServerStore>, changed: tokio::sync::watch::Sender<StoreMoved>) {
    let mut last = changed.borrow().clone();
    loop {
        tokio::time::sleep(CHANGE_POLL).await;
        let store = store.clone();
        let after = last.seq;
        let Ok(Ok(moved)) =
            tokio::task::spawn_blocking(move || StoreMoved::read(store.as_ref(), after)).await
        else {
            continue;
        };
        if moved.seq != last.seq || moved.scope_epoch != last.scope_epoch {
            last = moved.clone();
            if changed.send(moved).is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::device::Role;

    fn record(revoked: bool, wipe_requested: bool, wiped: bool) -> DeviceRecord {
        DeviceRecord {
            id: 1,
            name: "tablet".into(),
            role: Role::AmbulanceCrew,
            public_key: None,
            enrolled_at_ms: Some(1),
            revoked_at_ms: revoked.then_some(5),
            acked_cursor: 0,
            last_sync_ms: None,
            wipe_requested_at_ms: wipe_requested.then_some(5),
            wiped_at_ms: wiped.then_some(6),
            left_out: 0,
        }
    }

    #[test]
    fn a_live_session_ends_when_its_device_s_record_moves_past_what_it_was_admitted_with() {
        let clean = Admitted::from(&record(false, false, false));
        assert_eq!(clean.ends(&record(false, false, false)), None);
        assert_eq!(clean.ends(&record(true, false, false)), Some(&b"this device has been revoked"[..]));
        let wipe = Some(&b"reconnect: the operator asked this device to wipe"[..]);
        assert_eq!(clean.ends(&record(false, true, false)), wipe, "asked to wipe during the session");
        assert_eq!(
            clean.ends(&record(true, true, false)),
            wipe,
            "revoked with a wipe: told at its next connection"
        );
        // Admitted (revoked) only to be told to wipe: served until it confirms, then never again.
        let to_wipe = Admitted::from(&record(true, true, false));
        assert_eq!(to_wipe.ends(&record(true, true, false)), None);
        assert_eq!(to_wipe.ends(&record(true, true, true)), Some(&b"this device has been revoked"[..]));
        // Told to wipe in its Welcome, not revoked: no second telling.
        let wiping = Admitted::from(&record(false, true, false));
        assert_eq!(wiping.ends(&record(false, true, false)), None);
        assert_eq!(wiping.ends(&record(true, true, false)), Some(&b"this device has been revoked"[..]));
    }
}
