//! The device's QUIC client: enrolment and sync sessions over real connections.
//!
//! This module only moves frames between a QUIC stream and the sans-IO [`crate::sync::SyncSession`]
//! ([`crate::sync`]); what a device does around a session (sync again after a restore, shred
//! after a wipe, log a granted access) is [`crate::driver`]'s, for every link alike.

use std::net::SocketAddr;
use std::time::Duration;

pub use crate::driver::{ClientError, SyncReport};
use crate::driver::{Connect, Link, Moved, Opening};
use crate::identity::Identity;
use crate::protocol::{
    ALPN_ENROL, ALPN_SYNC, ClientMessage, EnrolRequest, EnrolResponse, ServerMessage, close,
};
use crate::store::{DeviceStore, Enrolment};
use crate::sync::{AccessDecision, AccessRequest, SyncStats};
use crate::tls::{SERVER_NAME, client_config};
use crate::token::EnrolmentToken;
use crate::wire::{WireError, read_frame, write_frame};

/// How long a device waits for the server before giving up on a step.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long closing a connection waits for the close to leave (draining goes on in the background).
pub const CLOSE_GRACE: Duration = Duration::from_millis(5);
/// How long a device tries to reach the server before saying it is unreachable, unless
/// [`set_connect_timeout`] says otherwise.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The connect timeout in force, in milliseconds (process-wide).
static CONNECT_TIMEOUT_MS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(CONNECT_TIMEOUT.as_millis() as u64);

/// Sets how long connecting waits for the server (for every connection this process opens
/// from now on; at least 100 ms). QUIC runs over UDP, where a server that is down and a slow
/// link look the same until the time runs out: a crew that knows it has no signal can ask for
/// a short wait.
pub fn set_connect_timeout(timeout: Duration) {
    let ms = timeout.as_millis().clamp(100, u128::from(u32::MAX)) as u64;
    CONNECT_TIMEOUT_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// How long connecting waits for the server now.
pub fn connect_timeout() -> Duration {
    Duration::from_millis(CONNECT_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed))
}

/// An open connection with one session stream: the low-level handle tests use to speak the
/// protocol frame by frame.
pub struct DeviceConnection {
    endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    sent: u64,
    received: u64,
}

impl DeviceConnection {
    /// Connects with the device's identity and opens the session stream. The store is read
    /// before the returned future starts, so the future does not borrow it (and is `Send`).
    pub fn open(
        store: &DeviceStore,
    ) -> impl std::future::Future<Output = Result<Self, ClientError>> + Send + 'static {
        let prepared =
            store.require_enrolment().and_then(|e| Ok((e, store.identity()?, store.staged_server_key()?)));
        async move {
            let (enrolment, identity, staged) = prepared?;
            let pinned: Vec<[u8; 32]> = std::iter::once(enrolment.server_key)
                .chain(staged)
                .map(|k| crate::identity::fingerprint(&k))
                .collect();
            Self::open_with(&enrolment.server_addr, &pinned, Some(&identity), ALPN_SYNC).await
        }
    }

    /// Connects for enrolment with a one-time token (no device certificate yet).
    pub async fn open_enrol(token: &EnrolmentToken) -> Result<Self, ClientError> {
        Self::open_with(&token.server_addr, &[token.server_fingerprint], None, ALPN_ENROL).await
    }

    /// Connects to the first of the server's addresses that answers. `addrs` is one address
    /// or several separated by commas, each an IP address and port or a name and port (a name
    /// may resolve to several): the instances of one region. The one that answered last in
    /// this process is tried first, and one whose connection went quiet or could not serve
    /// (its database unreachable) last; each next one is tried when the one before fails, or
    /// [`FAILOVER_STAGGER`] (or [`set_failover_stagger`]) after it started without an answer, whichever comes first, and the
    /// first to connect is kept (the others are dropped). A server that answers and refuses
    /// (a revoked device, a closed session) is the region's answer: no other address is tried.
    async fn open_with(
        addrs: &str,
        fingerprints: &[[u8; 32]],
        identity: Option<&Identity>,
        alpn: &[u8],
    ) -> Result<Self, ClientError> {
        let mut targets = resolve(addrs).await?;
        if let Some(good) = last_good(addrs)
            && let Some(at) = targets.iter().position(|t| *t == good)
        {
            targets[..=at].rotate_right(1);
        }
        // Those that went quiet or could not serve go last, the latest last.
        for bad in demoted() {
            if let Some(at) = targets.iter().position(|t| *t == bad) {
                targets[at..].rotate_left(1);
            }
        }
        let config = client_config(identity, fingerprints, alpn)?;
        let mut waiting = targets.into_iter();
        let mut attempts = tokio::task::JoinSet::new();
        let mut failure: Option<ClientError> = None;
        loop {
            if attempts.is_empty() {
                match waiting.next() {
                    Some(addr) => {
                        attempts.spawn(Self::open_at(addr, config.clone()));
                    }
                    None => {
                        return Err(failure.unwrap_or_else(|| ClientError::BadAddress(addrs.to_string())));
                    }
                }
            }
            let more = waiting.len() > 0;
            tokio::select! {
                done = attempts.join_next() => match done {
                    Some(Ok((addr, Ok(connection)))) => {
                        remember_good(addrs, addr);
                        return Ok(connection);
                    }
                    Some(Ok((_, Err(e)))) if fails_over(&e) => {
                        // A key mismatch says more than "no answer": it is the one reported.
                        if !matches!(failure, Some(ClientError::ServerKeyMismatch)) {
                            failure = Some(e);
                        }
                        if let Some(addr) = waiting.next() {
                            attempts.spawn(Self::open_at(addr, config.clone()));
                        }
                    }
                    Some(Ok((_, Err(e)))) => return Err(e),
                    Some(Err(e)) => {
                        if failure.is_none() {
                            failure = Some(ClientError::Connection(format!("a connection attempt failed: {e}")));
                        }
                        if let Some(addr) = waiting.next() {
                            attempts.spawn(Self::open_at(addr, config.clone()));
                        }
                    }
                    None => {}
                },
                _ = tokio::time::sleep(failover_stagger()), if more => {
                    if let Some(addr) = waiting.next() {
                        attempts.spawn(Self::open_at(addr, config.clone()));
                    }
                }
            }
        }
    }

    /// One connection attempt to one address.
    async fn open_at(
        addr: SocketAddr,
        config: quinn::ClientConfig,
    ) -> (SocketAddr, Result<Self, ClientError>) {
        let attempt = async {
            let bind: SocketAddr =
                if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("valid bind address");
            let mut endpoint =
                quinn::Endpoint::client(bind).map_err(|e| ClientError::Unreachable(e.to_string()))?;
            endpoint.set_default_client_config(config);
            let connecting =
                endpoint.connect(addr, SERVER_NAME).map_err(|e| ClientError::Unreachable(e.to_string()))?;
            let wait = connect_timeout();
            let connection = tokio::time::timeout(wait, connecting)
                .await
                .map_err(|_| ClientError::Unreachable(format!("no answer within {wait:?}")))?
                .map_err(|e| match e {
                    quinn::ConnectionError::TransportError(ref t) if is_crypto_error(u64::from(t.code)) => {
                        ClientError::ServerKeyMismatch
                    }
                    quinn::ConnectionError::TimedOut => {
                        ClientError::Unreachable("no answer from the server".into())
                    }
                    other => map_connection_error(&other),
                })?;
            let (send, recv) = connection.open_bi().await.map_err(|e| map_connection_error(&e))?;
            Ok(Self { endpoint, connection, send, recv, sent: 0, received: 0 })
        };
        (addr, attempt.await)
    }

    /// Sends one message.
    pub async fn send(&mut self, message: &ClientMessage) -> Result<(), ClientError> {
        self.send_any(message).await
    }

    async fn send_any<T: serde::Serialize>(&mut self, message: &T) -> Result<(), ClientError> {
        let n = write_frame(&mut self.send, message).await.map_err(|e| self.failed(map_wire_error(&e)))?;
        self.sent += n as u64;
        Ok(())
    }

    /// Sends raw bytes, valid frames or not (for tests of the server's defences).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.send.write_all(bytes).await.map_err(|e| map_wire_error(&WireError::Write(e)))
    }

    /// Receives one message; `None` when the server finished the stream.
    pub async fn recv(&mut self) -> Result<Option<ServerMessage>, ClientError> {
        self.recv_any().await
    }

    async fn recv_any<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, ClientError> {
        let read = tokio::time::timeout(STEP_TIMEOUT, read_frame::<T>(&mut self.recv))
            .await
            .map_err(|_| self.failed(ClientError::Timeout(STEP_TIMEOUT)))?;
        match read.map_err(|e| self.failed(map_wire_error(&e)))? {
            Some((message, n)) => {
                self.received += n as u64;
                Ok(Some(message))
            }
            None => Ok(None),
        }
    }

    /// Receives one message with no deadline (a live session may be quiet for hours; QUIC
    /// keep-alives and the idle timeout notice a dead peer).
    pub async fn recv_live(&mut self) -> Result<Option<ServerMessage>, ClientError> {
        match read_frame::<ServerMessage>(&mut self.recv)
            .await
            .map_err(|e| self.failed(map_wire_error(&e)))?
        {
            Some((message, n)) => {
                self.received += n as u64;
                Ok(Some(message))
            }
            None => Ok(None),
        }
    }

    /// `e`, having noted that the server this connection reached went quiet or could not serve:
    /// the next connection of this process tries the region's other addresses first.
    fn failed(&self, e: ClientError) -> ClientError {
        if matches!(
            e,
            ClientError::Unreachable(_) | ClientError::ServerUnavailable(_) | ClientError::Timeout(_)
        ) {
            demote(self.connection.remote_address());
        }
        e
    }

    /// Closes at once, without waiting for the server's side: for leaving a live session, where
    /// a frame may be half read (everything applied so far is committed; a round cut short
    /// resumes at the next sync).
    pub async fn close(self) -> (u64, u64, quinn::ConnectionStats) {
        let stats = self.connection.stats();
        self.connection.close(close::DONE.into(), b"done");
        let _ = tokio::time::timeout(CLOSE_GRACE, self.endpoint.wait_idle()).await;
        (self.sent, self.received, stats)
    }

    /// Finishes our side, waits for the server to finish its side, and closes.
    pub async fn finish(mut self) -> Result<(u64, u64, quinn::ConnectionStats), ClientError> {
        let _ = self.send.finish();
        // The server finishes its stream only after it processed everything we sent.
        while self.recv_any::<ServerMessage>().await?.is_some() {}
        let stats = self.connection.stats();
        self.connection.close(close::DONE.into(), b"done");
        // The close goes out at once; the endpoint then drains for three probe timeouts in the
        // background. Waiting a moment lets the close leave before a short-lived process exits.
        let _ = tokio::time::timeout(CLOSE_GRACE, self.endpoint.wait_idle()).await;
        Ok((self.sent, self.received, stats))
    }
}

/// How long a connection attempt to one of a region's addresses waits for an answer before the
/// next address is tried beside it, unless [`set_failover_stagger`] says otherwise.
pub const FAILOVER_STAGGER: Duration = Duration::from_millis(400);

static FAILOVER_STAGGER_MS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(FAILOVER_STAGGER.as_millis() as u64);

/// Sets how long an attempt on one of the region's addresses goes unanswered before the next is
/// tried beside it (process-wide; at least 10 ms). Longer keeps devices on the first address
/// through slow handshakes; shorter fails over sooner.
pub fn set_failover_stagger(stagger: Duration) {
    let ms = (stagger.as_millis() as u64).max(10);
    FAILOVER_STAGGER_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

fn failover_stagger() -> Duration {
    Duration::from_millis(FAILOVER_STAGGER_MS.load(std::sync::atomic::Ordering::Relaxed))
}

/// Whether another of the region's addresses may do better than the one that gave `e`.
fn fails_over(e: &ClientError) -> bool {
    matches!(e, ClientError::Unreachable(_) | ClientError::ServerKeyMismatch | ClientError::Connection(_))
}

/// The server's addresses, in the order given: each `host:port` (an IP address, or a name that
/// may resolve to several), separated by commas.
pub async fn resolve(addrs: &str) -> Result<Vec<SocketAddr>, ClientError> {
    let mut targets = Vec::new();
    let mut unresolved = None;
    for part in addrs.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<SocketAddr>() {
            Ok(addr) => targets.push(addr),
            Err(_) if !part.contains(':') => return Err(ClientError::BadAddress(part.to_string())),
            // A name that does not resolve (in time) is passed over: the others may answer.
            Err(_) => match tokio::time::timeout(connect_timeout(), tokio::net::lookup_host(part)).await {
                Ok(Ok(found)) => targets.extend(found),
                Ok(Err(e)) => unresolved = Some(format!("cannot resolve `{part}`: {e}")),
                Err(_) => unresolved = Some(format!("no answer resolving `{part}`")),
            },
        }
    }
    let mut seen = std::collections::HashSet::new();
    targets.retain(|t| seen.insert(*t));
    match (targets.is_empty(), unresolved) {
        (false, _) => Ok(targets),
        (true, Some(why)) => Err(ClientError::Unreachable(why)),
        (true, None) => Err(ClientError::BadAddress(addrs.to_string())),
    }
}

/// The address of `addrs` that answered last in this process.
static LAST_GOOD: std::sync::Mutex<Option<(String, SocketAddr)>> = std::sync::Mutex::new(None);

fn last_good(addrs: &str) -> Option<SocketAddr> {
    match &*LAST_GOOD.lock().unwrap_or_else(|p| p.into_inner()) {
        Some((of, addr)) if of == addrs => Some(*addr),
        _ => None,
    }
}

fn remember_good(addrs: &str, addr: SocketAddr) {
    *LAST_GOOD.lock().unwrap_or_else(|p| p.into_inner()) = Some((addrs.to_string(), addr));
    DEMOTED.lock().unwrap_or_else(|p| p.into_inner()).retain(|a| *a != addr);
}

/// Addresses whose connections went quiet or could not serve in this process, the latest last
/// (at most [`DEMOTED_KEPT`]); one leaves the list when it answers again.
static DEMOTED: std::sync::Mutex<Vec<SocketAddr>> = std::sync::Mutex::new(Vec::new());
const DEMOTED_KEPT: usize = 16;

fn demoted() -> Vec<SocketAddr> {
    DEMOTED.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Tries `addr` after the addresses not demoted from now on (until it answers again), and no
/// longer first.
fn demote(addr: SocketAddr) {
    {
        let mut demoted = DEMOTED.lock().unwrap_or_else(|p| p.into_inner());
        demoted.retain(|a| *a != addr);
        demoted.push(addr);
        if demoted.len() > DEMOTED_KEPT {
            demoted.remove(0);
        }
    }
    let mut good = LAST_GOOD.lock().unwrap_or_else(|p| p.into_inner());
    if good.as_ref().is_some_and(|(_, a)| *a == addr) {
        *good = None;
    }
}

fn is_crypto_error(code: u64) -> bool {
    (0x100..0x200).contains(&code)
}

fn map_connection_error(e: &quinn::ConnectionError) -> ClientError {
    match e {
        quinn::ConnectionError::ConnectionClosed(close) if is_crypto_error(u64::from(close.error_code)) => {
            ClientError::DeviceRefused
        }
        quinn::ConnectionError::ApplicationClosed(close) => ClientError::closed_by_server(
            u64::from(close.error_code),
            String::from_utf8_lossy(&close.reason).into_owned(),
        ),
        quinn::ConnectionError::TimedOut => ClientError::Unreachable("the connection timed out".into()),
        // The server restarted and no longer knows the connection: gone, as if unreachable.
        quinn::ConnectionError::Reset => ClientError::Unreachable("the server reset the connection".into()),
        other => ClientError::Connection(other.to_string()),
    }
}

fn map_wire_error(e: &WireError) -> ClientError {
    match e.connection_error() {
        Some(c) => map_connection_error(c),
        None => ClientError::Protocol(e.to_string()),
    }
}

/// Sync sessions over QUIC to the server the device enrolled with.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quic;

impl Connect for Quic {
    type Link = DeviceConnection;

    fn open(&mut self, store: &DeviceStore) -> Opening<DeviceConnection> {
        Box::pin(DeviceConnection::open(store))
    }

    async fn enrol(
        &mut self,
        token: &EnrolmentToken,
        request: EnrolRequest,
    ) -> Result<EnrolResponse, ClientError> {
        let mut conn = DeviceConnection::open_enrol(token).await?;
        conn.send_any(&request).await?;
        let response: EnrolResponse = conn
            .recv_any()
            .await?
            .ok_or_else(|| ClientError::Protocol("the server closed without answering".into()))?;
        let _ = conn.finish().await;
        Ok(response)
    }
}

fn moved((sent, received, udp): (u64, u64, quinn::ConnectionStats)) -> Moved {
    Moved {
        frame_bytes_sent: sent,
        frame_bytes_received: received,
        udp_bytes_sent: udp.udp_tx.bytes,
        udp_bytes_received: udp.udp_rx.bytes,
    }
}

impl Link for DeviceConnection {
    async fn send(&mut self, message: &ClientMessage) -> Result<(), ClientError> {
        DeviceConnection::send(self, message).await
    }

    async fn recv(&mut self) -> Result<Option<ServerMessage>, ClientError> {
        DeviceConnection::recv(self).await
    }

    async fn recv_live(&mut self) -> Result<Option<ServerMessage>, ClientError> {
        DeviceConnection::recv_live(self).await
    }

    async fn finish(self) -> Result<Moved, ClientError> {
        DeviceConnection::finish(self).await.map(moved)
    }

    async fn close(self) -> Moved {
        moved(DeviceConnection::close(self).await)
    }
}

/// Enrols this device with the one-time token an operator gave it.
pub async fn enrol(store: &mut DeviceStore, token: &str) -> Result<Enrolment, ClientError> {
    crate::driver::enrol(store, token, &mut Quic).await
}

/// Runs one sync session: uploads offline changes, receives what changed, disconnects.
pub async fn sync(store: &mut DeviceStore) -> Result<SyncReport, ClientError> {
    crate::driver::sync(store, &mut Quic, &mut |_| {}).await
}

/// [`sync`], calling `progress` as the round's items are applied (see
/// [`crate::sync::SyncSession::handle_reporting`]): for progress bars.
pub async fn sync_with_progress(
    store: &mut DeviceStore,
    progress: &mut (dyn FnMut(&SyncStats) + Send),
) -> Result<SyncReport, ClientError> {
    crate::driver::sync(store, &mut Quic, progress).await
}

/// Asks the server for a patient outside this device's scope, then syncs so the record
/// arrives (see [`crate::driver::request_access`]).
pub async fn request_access(
    store: &mut DeviceStore,
    request: AccessRequest,
) -> Result<(AccessDecision, SyncReport), ClientError> {
    crate::driver::request_access(store, &mut Quic, request).await
}

/// Syncs, then stays connected: every round the server pushes (within about a second of a
/// change anywhere in this device's scope) is applied, and `on_round` is called with the
/// session's totals after each. Returns when `stop` completes (closing at once, even mid-frame);
/// a server that ends the session unasked is [`ClientError::Unreachable`]: connect again later.
pub async fn watch(
    store: &mut DeviceStore,
    on_round: &mut (dyn FnMut(&SyncStats) + Send),
    stop: impl std::future::Future<Output = ()> + Send,
) -> Result<SyncReport, ClientError> {
    crate::driver::watch(store, &mut Quic, on_round, stop).await
}
