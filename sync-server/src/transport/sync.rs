//! Sync connections: a device admitted by its key, its session's frames read on their own task,
//! each answered by the sans-IO [`ServerSession`] on the blocking pool, rounds paced to the link
//! ([`super::pacer`]), live rounds pushed on changes, uploads held to a per-device rate.

use std::sync::Arc;
use std::time::Duration;

use care_node::protocol::{ClientMessage, ServerMessage, close};
use care_node::wire::{read_frame, write_frame};
use tracing::Instrument;

use super::pacer::Pacer;
use super::{ConnectionError, LINGER, Shared, close_with, closed_by_device, peer_key};
use crate::operator::metrics::{OutcomeLabel, RECEIVED, SENT, metrics};
use crate::session::{LiveStep, ServerSession, SessionError, StoreMoved};
use crate::store::{DeviceRecord, ServerStore};

/// A token bucket of upload bytes (`Limits::upload_bytes_per_minute`), so a device back from a
/// long shift offline can still send its backlog at once.
#[derive(Debug)]
pub(super) struct Allowance {
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

pub(super) async fn handle_sync(conn: quinn::Connection, shared: Arc<Shared>) -> Result<(), ConnectionError> {
    let device = match peer_key(&conn).map(|k| shared.store.device_by_key(&k)) {
        Some(Ok(Some(device))) if device.admitted() => device,
        Some(Err(e)) => {
            tracing::error!(error = %e, "device lookup failed");
            conn.close(close::INTERNAL.into(), b"the server cannot reach its database now; try again");
            return Err(ConnectionError::Session(SessionError::Store(e)));
        }
        _ => {
            metrics().refused_handshakes.inc();
            conn.close(close::REFUSED.into(), b"not an enrolled device");
            return Err(ConnectionError::NoDevice);
        }
    };
    let span = tracing::info_span!("sync", device = %device.name);
    async move {
        // What the lookup said: a revocation or wipe after it (even before this line) ends the
        // session.
        let admitted = super::Admitted::from(&device);
        let started_ms = shared.clock.now_ms();
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
                seconds = (shared.clock.now_ms() - started_ms) as f64 / 1000.0,
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
            let deadline = session.live_deadline_ms().map(|at| {
                let wait = (at - shared.clock.now_ms()).clamp(0, 3_600_000);
                tokio::time::Instant::now() + Duration::from_millis(wait as u64)
            });
            tokio::select! {
                frame = inbox.next() => frame,
                // A grant of the device's ends though nothing moved in the store: its record goes.
                () = sleep_until(deadline) => {
                    let moved = changes.borrow().clone();
                    match push_round(session, moved, conn, send, &mut inbox, shared).await? {
                        Some(back) => session = back,
                        None => return Ok(()),
                    }
                    continue;
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        break; // the server is shutting down
                    }
                    let moved = changes.borrow_and_update().clone();
                    match push_round(session, moved, conn, send, &mut inbox, shared).await? {
                        Some(back) => session = back,
                        // The device stopped watching while the round went out: a normal end.
                        None => return Ok(()),
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
        session = handle_frame(session, message, conn, send, &mut inbox, shared).await?;
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

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Plans a live round on a change in the store and sends it, if the device has anything new;
/// `None` when the device stopped watching meanwhile (a normal end).
async fn push_round(
    session: ServerSession,
    moved: StoreMoved,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    inbox: &mut Inbox,
    shared: &Shared,
) -> Result<Option<ServerSession>, ConnectionError> {
    let now = shared.clock.now_ms();
    let mut session = session;
    // Without the store first: most changes concern few of the watching devices.
    let session = match session.live_step(&moved, now) {
        LiveStep::Nothing => return Ok(Some(session)),
        LiveStep::Round => session,
        LiveStep::Plan => {
            let (session, live) =
                on_store(session, shared.store.clone(), move |s, store| s.plan_live_round(store, now))
                    .await?;
            if !live? {
                return Ok(Some(session));
            }
            session
        }
    };
    match send_round(session, conn, send, inbox, shared).await {
        Ok(session) => Ok(Some(session)),
        Err(e) if closed_by_device(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Takes what a frame costs from the device's upload allowance (per device, across its
/// connections: one device's flood never takes the store from others); false when over it.
fn within_rate(shared: &Shared, device: i64, message: &ClientMessage) -> bool {
    let cost = match message {
        ClientMessage::Upload { docs, .. } => {
            docs.iter().flat_map(|d| &d.changes).map(|c| c.len() as u64).sum()
        }
        ClientMessage::ViewLog { entries } => entries.len() as u64 * 256,
        _ => 0,
    };
    let per_minute = shared.limits.upload_bytes_per_minute;
    cost == 0
        || shared
            .rates
            .lock()
            .expect("rates")
            .entry(device)
            .or_insert_with(|| Allowance::full(per_minute))
            .take(cost, per_minute)
}

/// Handles one frame of the device: the session's answer written back, then the round's pages
/// while it downloads. A refused upload or a flood is told to the device before the session ends.
async fn handle_frame(
    session: ServerSession,
    message: ClientMessage,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    inbox: &mut Inbox,
    shared: &Shared,
) -> Result<ServerSession, ConnectionError> {
    if let ClientMessage::Upload { docs, .. } = &message {
        metrics().documents.get_or_create(&RECEIVED).inc_by(docs.len() as u64);
    }
    if !within_rate(shared, session.device().id, &message) {
        let message = "upload rate limit: this device sent too much in the last minute; it keeps its changes and may sync again shortly";
        tell_and_linger(conn, send, &ServerMessage::Refused { message: message.into() }).await;
        return Err(ConnectionError::Busy);
    }
    let now = shared.clock.now_ms();
    let (session, replies) =
        on_store(session, shared.store.clone(), move |s, store| s.handle(message, store, now)).await?;
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
    send_round(session, conn, send, inbox, shared).await
}
