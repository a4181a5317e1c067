//! The socket-free pair: a device's sync driver ([`care_node::driver`]) and the server's
//! session ([`ServerSession`]) joined in memory, every message through the real frame codec.
//!
//! Governance, clinical and protocol scenarios run on it: the same device code as over QUIC
//! (sync again after a restore, shred after a wipe, a granted access logged as a view), the same
//! server session and store, the same admission check and error codes, and no sockets, ports
//! or timers. What it leaves out is the transport's own: TLS, pacing a round to the link, rate
//! and connection limits, read deadlines, closing a revoked device's live session. Those are
//! tested over QUIC (`skeleton.rs`, `hostile.rs`, `links.rs`, `live.rs`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use care_node::clock::Clock;
use care_node::driver::{ClientError, Connect, Link, Moved, Opening};
use care_node::identity::fingerprint;
use care_node::protocol::{
    ClientMessage, EnrolRequest, EnrolResponse, ServerMessage, TARGET_BATCH_BYTES, decode_frame, encode_frame,
};
use care_node::store::DeviceStore;
use care_node::token::EnrolmentToken;
use care_sync_server::domain::limits::Limits;
use care_sync_server::session::{ServerSession, StoreMoved};
use care_sync_server::store::ServerStore;

/// How often a live session on the pair looks for changes in the device's scope.
const LIVE_POLL: Duration = Duration::from_millis(20);

/// A server in memory: its store, clock and limits; [`Connect`] for the devices that use it.
#[derive(Clone)]
pub struct Memory {
    store: Arc<dyn ServerStore>,
    clock: Clock,
    limits: Limits,
    reachable: Arc<AtomicBool>,
}

impl Memory {
    pub fn new(store: Arc<dyn ServerStore>, clock: Clock, limits: Limits) -> Self {
        Self { store, clock, limits, reachable: Arc::new(AtomicBool::new(true)) }
    }

    /// Whether devices can reach the server (`false`: as if it were down or out of signal).
    pub fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::SeqCst);
    }

    fn unreachable(&self) -> Option<ClientError> {
        (!self.reachable.load(Ordering::SeqCst)).then(|| {
            ClientError::Unreachable("no answer from the server (the pair is set unreachable)".into())
        })
    }

    fn server_key(&self) -> Result<care_node::identity::PublicKey, ClientError> {
        let identity =
            self.store.server_identity().map_err(|e| ClientError::ServerUnavailable(e.to_string()))?;
        Ok(identity.public_key())
    }

    /// What the transport's handshake decides: the server proves a pinned key, and only an
    /// admitted device key gets a session.
    fn admit(&self, store: &DeviceStore) -> Result<ServerSession, ClientError> {
        if let Some(e) = self.unreachable() {
            return Err(e);
        }
        let enrolment = store.require_enrolment()?;
        let server_key = self.server_key()?;
        let pinned = std::iter::once(enrolment.server_key).chain(store.staged_server_key()?);
        if !pinned.into_iter().any(|k| fingerprint(&k) == fingerprint(&server_key)) {
            return Err(ClientError::ServerKeyMismatch);
        }
        let key = store.identity()?.public_key();
        match self.store.device_by_key(&key) {
            Ok(Some(device)) if device.admitted() => {
                Ok(ServerSession::new(device).presenting(server_key).limited(self.limits))
            }
            Ok(_) => Err(ClientError::DeviceRefused),
            Err(e) => Err(ClientError::ServerUnavailable(e.to_string())),
        }
    }
}

impl Connect for Memory {
    type Link = MemoryLink;

    fn open(&mut self, store: &DeviceStore) -> Opening<MemoryLink> {
        let link = self.admit(store).map(|session| MemoryLink {
            session,
            server: self.clone(),
            queue: VecDeque::new(),
            ended: None,
            moved: Moved::default(),
            seen: 0,
            epoch: 0,
        });
        Box::pin(async move { link })
    }

    async fn enrol(
        &mut self,
        _token: &EnrolmentToken,
        request: EnrolRequest,
    ) -> Result<EnrolResponse, ClientError> {
        if let Some(e) = self.unreachable() {
            return Err(e);
        }
        let request = through_codec(&request);
        let now = self.clock.now_ms();
        let response =
            care_sync_server::session::enrol::enrol(self.store.as_ref(), &request, self.server_key()?, now);
        Ok(through_codec(&response))
    }
}

/// One session on the pair.
pub struct MemoryLink {
    session: ServerSession,
    server: Memory,
    /// Frames the server wrote that the device has not read.
    queue: VecDeque<ServerMessage>,
    /// The server ended the session: its close code and reason.
    ended: Option<(u32, String)>,
    moved: Moved,
    /// What the last look at the store saw, as the transport's watcher keeps it.
    seen: u64,
    epoch: u64,
}

impl MemoryLink {
    fn end(&mut self, e: care_sync_server::session::SessionError) {
        if let Some(refusal) = e.refusal() {
            self.write(&refusal);
        }
        self.ended = Some((e.close_code(), e.to_string()));
    }

    fn write(&mut self, message: &ServerMessage) {
        let frame = encode_frame(message).expect("a server frame encodes");
        self.moved.frame_bytes_received += frame.len() as u64;
        self.queue.push_back(decode_frame(&frame[4..]).expect("a server frame decodes"));
    }

    fn closed(&self) -> Option<ClientError> {
        let (code, reason) = self.ended.as_ref()?;
        Some(ClientError::closed_by_server(u64::from(*code), reason.clone()))
    }

    /// The next frame the server has for the device, as the transport would write it: replies
    /// first, then the round's next page (pages wait for the device's `PageApplied` only in
    /// that the device reads them one at a time).
    fn next(&mut self) -> Result<Option<ServerMessage>, ClientError> {
        if let Some(message) = self.queue.pop_front() {
            return Ok(Some(message));
        }
        if let Some(e) = self.closed() {
            return Err(e);
        }
        if self.session.is_downloading() {
            match self.session.next_page(self.server.store.as_ref(), TARGET_BATCH_BYTES) {
                Ok(Some(page)) => self.write(&page),
                Ok(None) => {}
                Err(e) => self.end(e),
            }
            return self.next_or_end();
        }
        Ok(None)
    }

    fn next_or_end(&mut self) -> Result<Option<ServerMessage>, ClientError> {
        match self.queue.pop_front() {
            Some(message) => Ok(Some(message)),
            None => self.closed().map_or(Ok(None), Err),
        }
    }
}

/// A message as the other side reads it: encoded and decoded by the real codec.
fn through_codec<T: serde::Serialize + serde::de::DeserializeOwned>(message: &T) -> T {
    let frame = encode_frame(message).expect("frame encodes");
    decode_frame(&frame[4..]).expect("frame decodes")
}

impl Link for MemoryLink {
    async fn send(&mut self, message: &ClientMessage) -> Result<(), ClientError> {
        if self.ended.is_some() {
            // Written after the server ended the session: lost, as on a closed connection; the
            // device reads why (a refusal frame, then the close) at its next read.
            return Ok(());
        }
        let frame = encode_frame(message).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.moved.frame_bytes_sent += frame.len() as u64;
        let message: ClientMessage = decode_frame(&frame[4..]).expect("a device frame decodes");
        let now = self.server.clock.now_ms();
        match self.session.handle(message, self.server.store.as_ref(), now) {
            Ok(replies) => replies.iter().for_each(|r| self.write(r)),
            Err(e) => self.end(e),
        }
        Ok(())
    }

    async fn recv(&mut self) -> Result<Option<ServerMessage>, ClientError> {
        match self.next()? {
            Some(message) => Ok(Some(message)),
            None if self.session.is_done() => Ok(None),
            // Over QUIC the device would wait out its step timeout here: a deadlock of the two
            // state machines, reported at once.
            None => Err(ClientError::Protocol("the server has nothing to send and is not done".into())),
        }
    }

    async fn recv_live(&mut self) -> Result<Option<ServerMessage>, ClientError> {
        loop {
            if let Some(message) = self.next()? {
                return Ok(Some(message));
            }
            if !self.session.is_watching() {
                return Ok(None);
            }
            let now = self.server.clock.now_ms();
            let store = self.server.store.as_ref();
            let moved = match StoreMoved::read(store, self.seen) {
                Ok(moved) => moved,
                Err(e) => {
                    self.end(e.into());
                    continue;
                }
            };
            let due = self.session.live_deadline_ms().is_some_and(|at| now >= at);
            if (moved.seq, moved.scope_epoch) == (self.seen, self.epoch) && !due {
                tokio::time::sleep(LIVE_POLL).await;
                continue;
            }
            (self.seen, self.epoch) = (moved.seq, moved.scope_epoch);
            match self.session.live_round(store, &moved, now) {
                Ok(true) => continue,
                Ok(false) => tokio::time::sleep(LIVE_POLL).await,
                Err(e) => self.end(e),
            }
        }
    }

    async fn finish(mut self) -> Result<Moved, ClientError> {
        while self.next()?.is_some() {}
        Ok(self.moved)
    }

    async fn close(self) -> Moved {
        self.moved
    }
}
