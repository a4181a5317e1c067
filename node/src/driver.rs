//! Sync sessions over any link: what happens around the [`SyncSession`] state machine, decided
//! once for every way a device talks to its server.
//!
//! The decisions here are the device's, not the network's: sync again when the server says it
//! was restored from a backup (the changes queued again go up at once), shred the data key once
//! a wipe is confirmed, log a granted access as a view of the record, check the key a server
//! answers an enrolment with against the token's fingerprint. [`crate::client`] runs them over
//! QUIC ([`crate::client::Quic`]); the end-to-end tests run the same code over an in-memory
//! pair with the server's session (`tests/src/pair.rs`), so governance and clinical scenarios
//! need no sockets. A [`Link`] only carries frames.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use crate::protocol::{ClientMessage, EnrolRequest, EnrolResponse, ServerMessage, close, enrol_signed_bytes};
use crate::store::{DeviceStore, Enrolment, StoreError};
use crate::sync::{AccessDecision, AccessRequest, SyncError, SyncSession, SyncStats};
use crate::tls::TlsError;
use crate::token::{EnrolmentToken, TokenError};

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
    #[error("the server address `{0}` is not an address and port (or several, separated by commas)")]
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

impl ClientError {
    /// What the server meant by closing a session with `code` (see [`close`]) and `reason`.
    pub fn closed_by_server(code: u64, reason: String) -> Self {
        if code == u64::from(close::REFUSED) {
            ClientError::Refused(reason)
        } else if code == u64::from(close::DONE) {
            // The server shutting down, or a newer connection of this device taking over.
            ClientError::Unreachable(format!("the server closed the connection: {reason}"))
        } else if code == u64::from(close::INTERNAL) {
            ClientError::ServerUnavailable(reason)
        } else {
            ClientError::Connection(format!("closed by the server: {reason}"))
        }
    }
}

/// What one sync did, with the bytes that crossed the network.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    pub stats: SyncStats,
    /// Protocol frame bytes sent and received after the handshake.
    pub frame_bytes_sent: u64,
    pub frame_bytes_received: u64,
    /// UDP payload bytes of the whole connection, handshake included (0 off the network).
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

    /// Two sessions' figures together (a sync that had to run twice), with the later's stats.
    fn then(self, again: SyncReport) -> SyncReport {
        SyncReport {
            frame_bytes_sent: self.frame_bytes_sent + again.frame_bytes_sent,
            frame_bytes_received: self.frame_bytes_received + again.frame_bytes_received,
            udp_bytes_sent: self.udp_bytes_sent + again.udp_bytes_sent,
            udp_bytes_received: self.udp_bytes_received + again.udp_bytes_received,
            duration: self.duration + again.duration,
            handshake: self.handshake + again.handshake,
            exchange: self.exchange + again.exchange,
            stats: SyncStats {
                uploaded_changes: self.stats.uploaded_changes + again.stats.uploaded_changes,
                documents_received: self.stats.documents_received + again.stats.documents_received,
                changes_received: self.stats.changes_received + again.stats.changes_received,
                ..again.stats
            },
        }
    }
}

/// The bytes a link carried.
#[derive(Debug, Clone, Copy, Default)]
pub struct Moved {
    pub frame_bytes_sent: u64,
    pub frame_bytes_received: u64,
    pub udp_bytes_sent: u64,
    pub udp_bytes_received: u64,
}

/// One session's frames, both ways.
pub trait Link: Send {
    /// Sends one message.
    fn send(&mut self, message: &ClientMessage) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// The next message, waiting at most a step's time; `None` when the server finished.
    fn recv(&mut self) -> impl Future<Output = Result<Option<ServerMessage>, ClientError>> + Send;
    /// The next message with no deadline (a live session may be quiet for hours).
    fn recv_live(&mut self) -> impl Future<Output = Result<Option<ServerMessage>, ClientError>> + Send;
    /// Finishes this side, waits for the server to finish its side, and closes.
    fn finish(self) -> impl Future<Output = Result<Moved, ClientError>> + Send;
    /// Closes at once (leaving a live session, where a frame may be half read).
    fn close(self) -> impl Future<Output = Moved> + Send;
}

/// A link being opened; it does not borrow the store (which is not `Sync`).
pub type Opening<L> = Pin<Box<dyn Future<Output = Result<L, ClientError>> + Send + 'static>>;

/// How a device reaches its server.
pub trait Connect: Send {
    type Link: Link;
    /// Opens a sync session for the device whose store this is.
    fn open(&mut self, store: &DeviceStore) -> Opening<Self::Link>;
    /// Sends an enrolment request to the server the token names and returns its answer.
    fn enrol(
        &mut self,
        token: &EnrolmentToken,
        request: EnrolRequest,
    ) -> impl Future<Output = Result<EnrolResponse, ClientError>> + Send;
}

/// Enrols this device with the one-time token an operator gave it.
pub async fn enrol(
    store: &mut DeviceStore,
    token: &str,
    connect: &mut impl Connect,
) -> Result<Enrolment, ClientError> {
    if store.enrolment()?.is_some() {
        return Err(StoreError::AlreadyEnrolled.into());
    }
    let token = EnrolmentToken::decode(token)?;
    let request = {
        let identity = store.identity()?;
        let device_key = identity.public_key();
        let signature = identity.sign(&enrol_signed_bytes(&token.secret, &device_key));
        EnrolRequest {
            secret: serde_bytes::ByteBuf::from(token.secret.to_vec()),
            device_key,
            signature: serde_bytes::ByteBuf::from(signature.to_vec()),
        }
    };
    match connect.enrol(&token, request).await? {
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

/// Runs one sync: uploads offline changes, receives what changed, disconnects; and once more at
/// once if the server said it was restored from a backup (the session that heard it had already
/// finished uploading the changes this device then queued again). `progress` is called as the
/// round's items are applied.
pub async fn sync(
    store: &mut DeviceStore,
    connect: &mut impl Connect,
    progress: &mut (dyn FnMut(&SyncStats) + Send),
) -> Result<SyncReport, ClientError> {
    Ok(sync_requesting(store, connect, Vec::new(), progress).await?.1)
}

async fn sync_requesting(
    store: &mut DeviceStore,
    connect: &mut impl Connect,
    requests: Vec<AccessRequest>,
    progress: &mut (dyn FnMut(&SyncStats) + Send),
) -> Result<(Vec<AccessDecision>, SyncReport), ClientError> {
    let (decisions, report, restored) = sync_once(store, connect, requests, progress).await?;
    if !restored {
        return Ok((decisions, report));
    }
    let (_, again, _) = sync_once(store, connect, Vec::new(), progress).await?;
    Ok((decisions, report.then(again)))
}

async fn sync_once(
    store: &mut DeviceStore,
    connect: &mut impl Connect,
    requests: Vec<AccessRequest>,
    progress: &mut (dyn FnMut(&SyncStats) + Send),
) -> Result<(Vec<AccessDecision>, SyncReport, bool), ClientError> {
    let started = Instant::now();
    let mut link = connect.open(store).await?;
    let open = Instant::now();
    let (mut session, first) = SyncSession::start_with(store, requests)?;
    for message in &first {
        link.send(message).await?;
    }
    while !session.is_done() {
        let message = link
            .recv()
            .await?
            .ok_or_else(|| ClientError::Protocol("the server ended the session early".into()))?;
        let heavy = is_heavy(&message);
        for reply in
            off_the_runtime(heavy, || session.handle_reporting(message, store, store.now(), progress))?
        {
            link.send(&reply).await?;
        }
    }
    let decisions = session.decisions().to_vec();
    let restored = session.server_restored();
    let timing = Timing { started, open, done: Instant::now() };
    Ok((decisions, conclude(&session, link, store, timing).await?, restored))
}

/// Asks the server for a patient outside this device's scope (permission to view recorded at
/// the point of care, or break glass), then syncs so the record arrives. The request is written
/// to the signed view log first; once granted, the record's first view is logged as
/// `break-glass` or `permission-to-view`, so every front end audits it the same way.
pub async fn request_access(
    store: &mut DeviceStore,
    connect: &mut impl Connect,
    request: AccessRequest,
) -> Result<(AccessDecision, SyncReport), ClientError> {
    use crate::protocol::AccessKind;
    let (what, action) = match request.kind {
        AccessKind::BreakGlass => ("break glass", "break-glass"),
        AccessKind::PermissionToView => ("permission to view", "permission-to-view"),
    };
    let nhs = crate::nhs::NhsNumber::parse(&request.nhs_number).ok();
    let (mut decisions, report) = match sync_requesting(store, connect, vec![request], &mut |_| {}).await {
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

/// Syncs, then stays connected: every round the server pushes is applied, and `on_round` is
/// called with the session's totals after each. Returns when `stop` completes (closing at once,
/// even mid-frame); a server that ends the session unasked is [`ClientError::Unreachable`].
pub async fn watch(
    store: &mut DeviceStore,
    connect: &mut impl Connect,
    on_round: &mut (dyn FnMut(&SyncStats) + Send),
    stop: impl Future<Output = ()> + Send,
) -> Result<SyncReport, ClientError> {
    let started = Instant::now();
    let mut link = connect.open(store).await?;
    let open = Instant::now();
    let (mut session, first) = SyncSession::start_watching(store)?;
    for message in &first {
        link.send(message).await?;
    }
    let mut stop = std::pin::pin!(stop);
    let mut rounds = 0;
    let mut ended_by_server = false;
    loop {
        tokio::select! {
            message = link.recv_live() => {
                let Some(message) = message? else {
                    ended_by_server = true;
                    break;
                };
                let heavy = is_heavy(&message);
                for reply in off_the_runtime(heavy, || session.handle(message, store, store.now()))? {
                    link.send(&reply).await?;
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
                let moved = link.close().await;
                return Ok(report(&session, moved, Timing { started, open, done: Instant::now() }));
            }
        }
    }
    let report = conclude(&session, link, store, Timing { started, open, done: Instant::now() }).await?;
    if ended_by_server {
        return Err(ClientError::Unreachable("the server ended the live session (restarting?)".into()));
    }
    Ok(report)
}

/// Runs a step of store work (applying a page: parsing, sealing and committing its documents,
/// tens of milliseconds) without holding up the runtime's other tasks, among them the QUIC
/// connection's driver, whose acknowledgements pace the server: on a multi-threaded runtime
/// the worker first hands its queued tasks to another thread. Only for `heavy` work (a
/// message [`is_heavy`]): handing the worker over costs more than applying a live round's few
/// changes, or ending a round.
fn off_the_runtime<T>(heavy: bool, work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if heavy && h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Messages whose handling may take milliseconds of store work: a page of more than a few
/// documents or with a whole one (parsed when it merges into a held copy), and a Welcome (which
/// may wipe the store). A live round's page of a few changes and the messages that end a round
/// or acknowledge an upload are small commits.
fn is_heavy(message: &ServerMessage) -> bool {
    const FEW: usize = 4;
    match message {
        ServerMessage::Docs { items, .. } => {
            items.len() > FEW
                || items.iter().any(|i| matches!(i.body, crate::protocol::DocBody::Whole { .. }))
        }
        ServerMessage::Welcome { .. } => true,
        _ => false,
    }
}

/// When a session started, had its stream open (handshake done), and handled its last frame.
struct Timing {
    started: Instant,
    open: Instant,
    done: Instant,
}

/// Ends a session: finishes the link, and if the server told the device to wipe, destroys the
/// data key now that the server has the confirmation (every way of syncing ends here).
async fn conclude(
    session: &SyncSession,
    link: impl Link,
    store: &mut DeviceStore,
    timing: Timing,
) -> Result<SyncReport, ClientError> {
    let moved = link.finish().await?;
    if session.wiped() {
        store.shred()?;
        return Err(ClientError::Wiped);
    }
    Ok(report(session, moved, timing))
}

fn report(session: &SyncSession, moved: Moved, timing: Timing) -> SyncReport {
    SyncReport {
        stats: session.stats().clone(),
        frame_bytes_sent: moved.frame_bytes_sent,
        frame_bytes_received: moved.frame_bytes_received,
        udp_bytes_sent: moved.udp_bytes_sent,
        udp_bytes_received: moved.udp_bytes_received,
        duration: timing.started.elapsed(),
        handshake: timing.open - timing.started,
        exchange: timing.done - timing.open,
    }
}
