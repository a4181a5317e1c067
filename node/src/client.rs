//! The device's QUIC client: enrolment and sync sessions over real connections.
//!
//! This module only moves frames between a QUIC stream and the sans-IO [`SyncSession`]; all
//! protocol decisions live in [`crate::sync`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::identity::Identity;
use crate::protocol::{
    ALPN_ENROL, ALPN_SYNC, ClientMessage, EnrolRequest, EnrolResponse, ServerMessage, close,
    enrol_signed_bytes,
};
use crate::store::{DeviceStore, Enrolment, StoreError};
use crate::sync::{AccessDecision, AccessRequest, SyncError, SyncSession, SyncStats};
use crate::tls::{SERVER_NAME, TlsError, client_config};
use crate::token::{EnrolmentToken, TokenError};
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

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the server address `{0}` is not a valid IP address and port")]
    BadAddress(String),
    #[error("could not reach the server: {0}")]
    Unreachable(String),
    #[error("the server did not prove the key pinned at enrolment; refusing to talk to it")]
    ServerKeyMismatch,
    #[error("the server refused this device's key: it is not enrolled or has been revoked")]
    DeviceRefused,
    #[error("enrolment refused: {0}")]
    EnrolmentRefused(String),
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("the connection failed: {0}")]
    Connection(String),
    /// The server ended the session because something failed on its side (its storage is full,
    /// say). Nothing this device holds was lost; try again later.
    #[error("the server could not do it now (nothing on this device was lost); try again later: {0}")]
    ServerUnavailable(String),
    #[error("the server sent something invalid: {0}")]
    Protocol(String),
    #[error("the server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("this patient's record is not on this device, and {0} needs a connection to the server: {1}")]
    NeedsConnection(&'static str, String),
    #[error(
        "this device was wiped on the operator's instruction: its patient data and data key are destroyed"
    )]
    Wiped,
}

/// What one sync did, with the bytes that crossed the network.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    pub stats: SyncStats,
    /// Protocol frame bytes sent and received after the handshake.
    pub frame_bytes_sent: u64,
    pub frame_bytes_received: u64,
    /// UDP payload bytes of the whole connection, handshake included.
    pub udp_bytes_sent: u64,
    pub udp_bytes_received: u64,
    /// Wall time of the whole sync: connecting (QUIC + TLS handshake), the exchange, closing.
    pub duration: Duration,
    /// Connecting: until the session stream is open (the handshake is done).
    pub handshake: Duration,
    /// The protocol exchange after the handshake, until the last frame is handled.
    pub exchange: Duration,
}

impl SyncReport {
    pub fn frame_bytes(&self) -> u64 {
        self.frame_bytes_sent + self.frame_bytes_received
    }

    pub fn udp_bytes(&self) -> u64 {
        self.udp_bytes_sent + self.udp_bytes_received
    }
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

    async fn open_with(
        addr: &str,
        fingerprints: &[[u8; 32]],
        identity: Option<&Identity>,
        alpn: &[u8],
    ) -> Result<Self, ClientError> {
        let addr: SocketAddr = addr.parse().map_err(|_| ClientError::BadAddress(addr.to_string()))?;
        let bind: SocketAddr =
            if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("valid bind address");
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| ClientError::Unreachable(e.to_string()))?;
        endpoint.set_default_client_config(client_config(identity, fingerprints, alpn)?);
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
    }

    /// Sends one message.
    pub async fn send(&mut self, message: &ClientMessage) -> Result<(), ClientError> {
        self.send_any(message).await
    }

    async fn send_any<T: serde::Serialize>(&mut self, message: &T) -> Result<(), ClientError> {
        let n = write_frame(&mut self.send, message).await.map_err(|e| map_wire_error(&e))?;
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
            .map_err(|_| ClientError::Timeout(STEP_TIMEOUT))?;
        match read.map_err(|e| map_wire_error(&e))? {
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
        match read_frame::<ServerMessage>(&mut self.recv).await.map_err(|e| map_wire_error(&e))? {
            Some((message, n)) => {
                self.received += n as u64;
                Ok(Some(message))
            }
            None => Ok(None),
        }
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

fn is_crypto_error(code: u64) -> bool {
    (0x100..0x200).contains(&code)
}

fn map_connection_error(e: &quinn::ConnectionError) -> ClientError {
    match e {
        quinn::ConnectionError::ConnectionClosed(close) if is_crypto_error(u64::from(close.error_code)) => {
            ClientError::DeviceRefused
        }
        quinn::ConnectionError::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            if u64::from(close.error_code) == u64::from(close::REFUSED) {
                ClientError::Refused(reason)
            } else if u64::from(close.error_code) == u64::from(close::DONE) {
                // The server shutting down, or a newer connection of this device taking over.
                ClientError::Unreachable(format!("the server closed the connection: {reason}"))
            } else if u64::from(close.error_code) == u64::from(close::INTERNAL) {
                ClientError::ServerUnavailable(reason)
            } else {
                ClientError::Connection(format!("closed by the server: {reason}"))
            }
        }
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

/// Enrols this device with the one-time token an operator gave it.
pub async fn enrol(store: &mut DeviceStore, token: &str) -> Result<Enrolment, ClientError> {
    if store.enrolment()?.is_some() {
        return Err(StoreError::AlreadyEnrolled.into());
    }
    let token = EnrolmentToken::decode(token)?;
    let identity = store.identity()?;
    let mut conn = DeviceConnection::open_enrol(&token).await?;
    let device_key = identity.public_key();
    let signature = identity.sign(&enrol_signed_bytes(&token.secret, &device_key));
    let request = EnrolRequest {
        secret: serde_bytes::ByteBuf::from(token.secret.to_vec()),
        device_key,
        signature: serde_bytes::ByteBuf::from(signature.to_vec()),
    };
    conn.send_any(&request).await?;
    let response: EnrolResponse = conn
        .recv_any()
        .await?
        .ok_or_else(|| ClientError::Protocol("the server closed without answering".into()))?;
    let _ = conn.finish().await;
    match response {
        EnrolResponse::Enrolled { device_name, role, server_key } => {
            if crate::identity::fingerprint(&server_key) != token.server_fingerprint {
                return Err(ClientError::ServerKeyMismatch);
            }
            let enrolment = Enrolment {
                server_addr: token.server_addr.clone(),
                server_key,
                device_name,
                role,
                enrolled_at_ms: store.now_ms(),
            };
            store.set_enrolment(&enrolment)?;
            Ok(enrolment)
        }
        EnrolResponse::Refused { message } => Err(ClientError::EnrolmentRefused(message)),
    }
}

/// Runs one sync session: uploads offline changes, receives what changed, disconnects.
pub async fn sync(store: &mut DeviceStore) -> Result<SyncReport, ClientError> {
    Ok(sync_with(store, Vec::new(), &mut |_| {}).await?.1)
}

/// [`sync`], calling `progress` as the round's items are applied (see
/// [`SyncSession::handle_reporting`]): for progress bars.
pub async fn sync_with_progress(
    store: &mut DeviceStore,
    progress: &mut (dyn FnMut(&SyncStats) + Send),
) -> Result<SyncReport, ClientError> {
    Ok(sync_with(store, Vec::new(), progress).await?.1)
}

/// Asks the server for a patient outside this device's scope (permission to view recorded at
/// the point of care, or break glass), then syncs so the record arrives. The request is written
/// to the signed view log first; once granted, the record's first view is logged as
/// `break-glass` or `permission-to-view`, so every front end audits it the same way.
pub async fn request_access(
    store: &mut DeviceStore,
    request: AccessRequest,
) -> Result<(AccessDecision, SyncReport), ClientError> {
    use crate::protocol::AccessKind;
    let (what, action) = match request.kind {
        AccessKind::BreakGlass => ("break glass", "break-glass"),
        AccessKind::PermissionToView => ("permission to view", "permission-to-view"),
    };
    let nhs = crate::nhs::NhsNumber::parse(&request.nhs_number).ok();
    let (mut decisions, report) = match sync_with(store, vec![request], &mut |_| {}).await {
        Ok(result) => result,
        Err(e @ (ClientError::Unreachable(_) | ClientError::Timeout(_))) => {
            return Err(ClientError::NeedsConnection(what, e.to_string()));
        }
        Err(e) => return Err(e),
    };
    let decision = decisions
        .pop()
        .ok_or_else(|| ClientError::Protocol("the server did not answer the access request".into()))?;
    if decision.granted {
        // Access is a view of the record: logged as given, whichever front end asked. A record
        // that did not arrive (a sync cut short) is logged when it is opened.
        match nhs.map(|n| store.find_by_nhs(&n)).transpose()?.flatten() {
            Some(patient) => {
                let id = patient.summary.patient_id().map_err(StoreError::from)?;
                store.record_view(&id, action, "")?;
            }
            None => tracing::warn!("access granted but the record is not on this device yet; sync again"),
        }
    }
    Ok((decision, report))
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
    let started = Instant::now();
    let mut conn = DeviceConnection::open(store).await?;
    let open = Instant::now();
    let (mut session, first) = SyncSession::start_watching(store)?;
    for message in &first {
        conn.send(message).await?;
    }
    let mut stop = std::pin::pin!(stop);
    let mut rounds = 0;
    let mut ended_by_server = false;
    loop {
        tokio::select! {
            message = conn.recv_live() => {
                let Some(message) = message? else {
                    ended_by_server = true;
                    break;
                };
                for reply in off_the_runtime(|| session.handle(message, store))? {
                    conn.send(&reply).await?;
                }
                if session.rounds_completed() > rounds {
                    rounds = session.rounds_completed();
                    on_round(session.stats());
                }
                if session.is_done() {
                    break; // e.g. told to wipe
                }
            }
            () = &mut stop => {
                // The read just dropped may have been part-way through a frame: leave now.
                let (sent, received, udp) = conn.close().await;
                let timing = Timing { started, open, done: Instant::now() };
                return Ok(report(&session, (sent, received, udp), timing));
            }
        }
    }
    let report = conclude(&session, conn, store, Timing { started, open, done: Instant::now() }).await?;
    if ended_by_server {
        return Err(ClientError::Unreachable("the server ended the live session (restarting?)".into()));
    }
    Ok(report)
}

async fn sync_with(
    store: &mut DeviceStore,
    requests: Vec<AccessRequest>,
    progress: &mut (dyn FnMut(&SyncStats) + Send),
) -> Result<(Vec<AccessDecision>, SyncReport), ClientError> {
    let (decisions, report, restored) = sync_once(store, requests, progress).await?;
    if !restored {
        return Ok((decisions, report));
    }
    // The server was restored from a backup: the changes this device queued again on hearing it
    // go up now (the session that heard it had already finished uploading).
    let (_, again, _) = sync_once(store, Vec::new(), progress).await?;
    let report = SyncReport {
        frame_bytes_sent: report.frame_bytes_sent + again.frame_bytes_sent,
        frame_bytes_received: report.frame_bytes_received + again.frame_bytes_received,
        udp_bytes_sent: report.udp_bytes_sent + again.udp_bytes_sent,
        udp_bytes_received: report.udp_bytes_received + again.udp_bytes_received,
        duration: report.duration + again.duration,
        handshake: report.handshake + again.handshake,
        exchange: report.exchange + again.exchange,
        stats: SyncStats {
            uploaded_changes: report.stats.uploaded_changes + again.stats.uploaded_changes,
            documents_received: report.stats.documents_received + again.stats.documents_received,
            changes_received: report.stats.changes_received + again.stats.changes_received,
            ..again.stats
        },
    };
    Ok((decisions, report))
}

async fn sync_once(
    store: &mut DeviceStore,
    requests: Vec<AccessRequest>,
    progress: &mut (dyn FnMut(&SyncStats) + Send),
) -> Result<(Vec<AccessDecision>, SyncReport, bool), ClientError> {
    let started = Instant::now();
    let mut conn = DeviceConnection::open(store).await?;
    let open = Instant::now();
    let (mut session, first) = SyncSession::start_with(store, requests)?;
    for message in &first {
        conn.send(message).await?;
    }
    while !session.is_done() {
        let message = conn
            .recv()
            .await?
            .ok_or_else(|| ClientError::Protocol("the server ended the session early".into()))?;
        for reply in off_the_runtime(|| session.handle_reporting(message, store, progress))? {
            conn.send(&reply).await?;
        }
    }
    let decisions = session.decisions().to_vec();
    let restored = session.server_restored();
    let timing = Timing { started, open, done: Instant::now() };
    Ok((decisions, conclude(&session, conn, store, timing).await?, restored))
}

/// Runs a step of store work (applying a page: parsing, sealing and committing its documents,
/// tens of milliseconds) without holding up the runtime's other tasks, among them the QUIC
/// connection's driver, whose acknowledgements pace the server: on a multi-threaded runtime
/// the worker first hands its queued tasks to another thread.
fn off_the_runtime<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Ends a session: finishes the connection, and if the server told the device to wipe, destroys
/// the data key now that the server has the confirmation (every way of syncing ends here).
/// When a session started, had its stream open (handshake done), and handled its last frame.
struct Timing {
    started: Instant,
    open: Instant,
    done: Instant,
}

async fn conclude(
    session: &SyncSession,
    conn: DeviceConnection,
    store: &mut DeviceStore,
    timing: Timing,
) -> Result<SyncReport, ClientError> {
    let moved = conn.finish().await?;
    if session.wiped() {
        store.shred()?;
        return Err(ClientError::Wiped);
    }
    Ok(report(session, moved, timing))
}

fn report(session: &SyncSession, moved: (u64, u64, quinn::ConnectionStats), timing: Timing) -> SyncReport {
    let (sent, received, udp) = moved;
    SyncReport {
        stats: session.stats().clone(),
        frame_bytes_sent: sent,
        frame_bytes_received: received,
        udp_bytes_sent: udp.udp_tx.bytes,
        udp_bytes_received: udp.udp_rx.bytes,
        duration: timing.started.elapsed(),
        handshake: timing.open - timing.started,
        exchange: timing.done - timing.open,
    }
}
