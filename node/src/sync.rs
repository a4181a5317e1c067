//! The device half of the sync protocol, as a sans-IO state machine.
//!
//! [`SyncSession::start`] gives the first frames to send; [`SyncSession::handle`] takes each
//! frame the server sends and returns the frames to send back. The session reads and writes the
//! [`DeviceStore`] but never touches a socket, so the protocol is tested without a network (see
//! the server crate's `session` tests, which drive both halves against each other).
//!
//! Uploads are pipelined: up to [`UPLOAD_WINDOW`] batches are in flight, and a local change is
//! forgotten only when the server says it is durable.

use crate::clock::Now;
use crate::protocol::{AccessKind, ClientMessage, DocChanges, ServerMessage, TARGET_BATCH_BYTES};
use crate::store::{DeviceStore, StoreError};

/// How many upload batches may wait for their acknowledgement at once.
pub const UPLOAD_WINDOW: usize = 4;
/// View log entries per `ViewLog` frame.
pub const VIEWS_PER_FRAME: usize = 500;

/// Access to ask for at the start of a session.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessRequest {
    pub nhs_number: String,
    pub kind: AccessKind,
    pub reason: String,
}

/// The kind of access only: the NHS number and the clinician's reason are patient data.
impl std::fmt::Debug for AccessRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessRequest").field("kind", &self.kind).finish_non_exhaustive()
    }
}

/// The server's answer to an [`AccessRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct AccessDecision {
    pub granted: bool,
    pub message: String,
    pub until_ms: i64,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the server refused the session: {0}")]
    Refused(String),
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
}

/// What a session moved, for progress and for the figures the demo prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct SyncStats {
    pub uploaded_changes: u64,
    pub documents_received: u64,
    pub documents_purged: u64,
    pub changes_received: u64,
    pub documents_in_scope: u64,
    pub left_out: u64,
    pub views_uploaded: u64,
    /// Notifications this sync produced (admissions, discharges, attendances…).
    pub notifications: u64,
    /// Items (documents, changes, purges) in the current round, as the server said, and how many
    /// of them are applied: progress for a bar.
    pub round_items: u64,
    pub round_applied: u64,
    /// Local changes the server refused (write policy): kept on this device, see
    /// [`DeviceStore::diverged`].
    pub refused_changes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitWelcome,
    /// Live: between rounds, waiting for the server to push the next one.
    Watching,
    Uploading,
    Downloading,
    Done,
}

/// One sync session of a device.
#[derive(Debug)]
pub struct SyncSession {
    phase: Phase,
    /// Outbox position of the last batch sent.
    upload_sent_through: u64,
    upload_in_flight: usize,
    upload_finished: bool,
    round: Option<u64>,
    stats: SyncStats,
    server: Option<ServerView>,
    decisions: Vec<AccessDecision>,
    wiped: bool,
    /// Stay connected for live rounds after the first.
    watching: bool,
    rounds_completed: u64,
    /// The server said it was restored from a backup.
    restored: bool,
}

/// Who the server says this device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerView {
    pub device_name: String,
    pub role: String,
    pub server_time_ms: i64,
    pub lease_ms: u64,
    /// The device's clock and its monotonic clock when the Welcome (and its server time)
    /// arrived: later times of the session are these plus monotonic time elapsed, so a wall
    /// clock set mid-session moves neither the lease's start nor the measured offset.
    pub welcomed_at_ms: i64,
    pub welcomed_at_monotonic_ms: i64,
}

impl ServerView {
    /// The device's and the server's clocks now, from the Welcome and monotonic time since.
    fn clocks_now(&self, monotonic_ms: i64) -> (i64, i64) {
        let elapsed = (monotonic_ms - self.welcomed_at_monotonic_ms).max(0);
        (self.welcomed_at_ms + elapsed, self.server_time_ms + elapsed)
    }
}

impl SyncSession {
    /// Starts a session: `Hello`, any access requests, the pending view log and the first
    /// upload batches.
    pub fn start(store: &DeviceStore) -> Result<(Self, Vec<ClientMessage>), SyncError> {
        Self::start_with(store, Vec::new())
    }

    /// [`SyncSession::start`] with access requests for patients outside the device's scope.
    pub fn start_with(
        store: &DeviceStore,
        requests: Vec<AccessRequest>,
    ) -> Result<(Self, Vec<ClientMessage>), SyncError> {
        let state = store.sync_state()?;
        let mut session = Self {
            phase: Phase::AwaitWelcome,
            upload_sent_through: 0,
            upload_in_flight: 0,
            upload_finished: false,
            round: None,
            stats: SyncStats::default(),
            server: None,
            decisions: Vec::new(),
            wiped: false,
            watching: false,
            rounds_completed: 0,
            restored: false,
        };
        let mut out = vec![ClientMessage::Hello {
            cursor: state.cursor,
            resume: state.resume,
            staged_server_key: store.staged_server_key()?,
            incarnation: store.server_incarnation()?,
        }];
        for r in requests {
            out.push(ClientMessage::AccessRequest {
                nhs_number: r.nhs_number,
                kind: r.kind,
                reason: r.reason,
            });
        }
        let views = store.pending_views(10 * VIEWS_PER_FRAME)?;
        session.stats.views_uploaded = views.len() as u64;
        for chunk in views.chunks(VIEWS_PER_FRAME) {
            out.push(ClientMessage::ViewLog { entries: chunk.to_vec() });
        }
        session.fill_upload_window(store, &mut out)?;
        Ok((session, out))
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    pub fn stats(&self) -> &SyncStats {
        &self.stats
    }

    /// Starts a live session: like [`SyncSession::start`], but after the first round the session
    /// stays open and applies every round the server pushes.
    pub fn start_watching(store: &DeviceStore) -> Result<(Self, Vec<ClientMessage>), SyncError> {
        let (mut session, mut out) = Self::start_with(store, Vec::new())?;
        session.watching = true;
        out.insert(1, ClientMessage::Watch);
        Ok((session, out))
    }

    /// How many rounds this session has completed (live sessions complete many).
    pub fn rounds_completed(&self) -> u64 {
        self.rounds_completed
    }

    /// The server's answers to this session's access requests, in order.
    pub fn decisions(&self) -> &[AccessDecision] {
        &self.decisions
    }

    /// The server said it was restored from a backup; this device queued its changes again.
    pub fn server_restored(&self) -> bool {
        self.restored
    }

    /// The server told this device to wipe, and its patient data is gone.
    pub fn wiped(&self) -> bool {
        self.wiped
    }

    fn fill_upload_window(
        &mut self,
        store: &DeviceStore,
        out: &mut Vec<ClientMessage>,
    ) -> Result<(), SyncError> {
        while !self.upload_finished && self.upload_in_flight < UPLOAD_WINDOW {
            let mut pending = store.pending_changes(self.upload_sent_through, TARGET_BATCH_BYTES)?;
            // Within the server's batch bounds: distinct documents and changes.
            let mut seen = std::collections::HashSet::new();
            let fits = pending
                .iter()
                .take_while(|c| {
                    seen.insert(c.doc);
                    seen.len() <= crate::protocol::MAX_UPLOAD_DOCS
                })
                .count()
                .min(crate::protocol::MAX_UPLOAD_CHANGES);
            pending.truncate(fits);
            let Some(last) = pending.last() else {
                self.upload_finished = true;
                out.push(ClientMessage::UploadDone);
                break;
            };
            self.upload_sent_through = last.outbox_id;
            let mut docs: Vec<DocChanges> = Vec::new();
            for change in pending {
                self.stats.uploaded_changes += 1;
                let bytes = serde_bytes::ByteBuf::from(change.change);
                match docs.last_mut() {
                    Some(d) if d.doc == change.doc => d.changes.push(bytes),
                    _ => docs.push(DocChanges { doc: change.doc, changes: vec![bytes] }),
                }
            }
            out.push(ClientMessage::Upload { through: self.upload_sent_through, docs });
            self.upload_in_flight += 1;
        }
        Ok(())
    }

    /// Handles one server frame that arrived at `now` (the device's clock: [`DeviceStore::now`]);
    /// returns the frames to send back.
    pub fn handle(
        &mut self,
        message: ServerMessage,
        store: &mut DeviceStore,
        now: Now,
    ) -> Result<Vec<ClientMessage>, SyncError> {
        self.handle_reporting(message, store, now, &mut |_| {})
    }

    /// [`SyncSession::handle`], calling `progress` as the items of a round are applied: at every
    /// hundredth of the round (and at least once per page, after it is committed), so a bar moves
    /// smoothly however the server pages. Mid-page calls count the page's items applied so far
    /// (the page commits as a whole); the other totals are those of the pages committed.
    pub fn handle_reporting(
        &mut self,
        message: ServerMessage,
        store: &mut DeviceStore,
        now: Now,
        progress: &mut dyn FnMut(&SyncStats),
    ) -> Result<Vec<ClientMessage>, SyncError> {
        match (self.phase, message) {
            (_, ServerMessage::Refused { message }) => {
                self.phase = Phase::Done;
                Err(SyncError::Refused(message))
            }
            (
                Phase::AwaitWelcome,
                ServerMessage::Welcome {
                    device_name,
                    role,
                    server_time_ms,
                    lease_ms,
                    wipe,
                    server_key,
                    next_server_key,
                    incarnation,
                    restored,
                },
            ) => {
                let view = ServerView {
                    device_name,
                    role,
                    server_time_ms,
                    lease_ms,
                    welcomed_at_ms: now.wall_ms,
                    welcomed_at_monotonic_ms: now.monotonic_ms,
                };
                store.follow_server_key(server_key, next_server_key)?;
                self.welcomed(view, store, incarnation, restored, wipe)
            }
            (Phase::Uploading, ServerMessage::AccessDecision { granted, message, until_ms }) => {
                self.decisions.push(AccessDecision { granted, message, until_ms });
                Ok(Vec::new())
            }
            (Phase::Uploading, ServerMessage::ViewLogAck { through }) => {
                store.acknowledge_views(through)?;
                Ok(Vec::new())
            }
            (Phase::Uploading, ServerMessage::UploadAck { through, refused }) => {
                self.upload_acknowledged(through, &refused, store, now)
            }
            (
                Phase::Uploading | Phase::Downloading | Phase::Watching,
                ServerMessage::Docs { round, priority, round_items, items },
            ) => self.page((round, priority, round_items), &items, store, now, progress),
            (
                Phase::Uploading | Phase::Downloading | Phase::Watching,
                ServerMessage::RoundDone { round, documents_in_scope, left_out },
            ) => self.round_done(round, documents_in_scope, left_out, store, now),
            (phase, other) => {
                Err(SyncError::Protocol(format!("unexpected {} while {phase:?}", message_name(&other))))
            }
        }
    }

    /// The server's Welcome: who it says this device is, whether it was restored from a backup
    /// (this device's changes are queued again), and whether this device must wipe.
    fn welcomed(
        &mut self,
        view: ServerView,
        store: &mut DeviceStore,
        incarnation: [u8; 16],
        restored: bool,
        wipe: bool,
    ) -> Result<Vec<ClientMessage>, SyncError> {
        self.server = Some(view);
        if restored {
            self.restored = true;
            let queued = store.follow_server_restore(incarnation)?;
            tracing::warn!(
                queued,
                "the server was restored from a backup; sending this device's changes again"
            );
        } else if store.server_incarnation()? != Some(incarnation) {
            store.set_server_incarnation(incarnation)?;
        }
        if wipe {
            store.wipe_patient_data()?;
            self.wiped = true;
            self.phase = Phase::Done;
            return Ok(vec![ClientMessage::WipeConfirmed]);
        }
        self.phase = Phase::Uploading;
        Ok(Vec::new())
    }

    /// An upload batch is durable on the server: what it refused stays on this device, set aside
    /// for review; the next batches go up.
    fn upload_acknowledged(
        &mut self,
        through: u64,
        refused: &[crate::protocol::RefusedDoc],
        store: &mut DeviceStore,
        now: Now,
    ) -> Result<Vec<ClientMessage>, SyncError> {
        if through > self.upload_sent_through || self.upload_in_flight == 0 {
            return Err(SyncError::Protocol("acknowledgement of an upload never sent".into()));
        }
        if !refused.is_empty() {
            for r in refused {
                tracing::warn!(rule = %r.rule, place = %r.place, "the server refused this device's changes to a document; kept on this device");
            }
            self.stats.refused_changes += store.diverge(refused, now.wall_ms)?;
        }
        store.acknowledge_uploads(through)?;
        self.upload_in_flight -= 1;
        let mut out = Vec::new();
        self.fill_upload_window(store, &mut out)?;
        Ok(out)
    }

    /// A page of a round: applied and committed as a whole, then acknowledged (the server paces
    /// the round by these acknowledgements).
    fn page(
        &mut self,
        (round, priority, round_items): (u64, bool, u64),
        items: &[crate::protocol::DocItem],
        store: &mut DeviceStore,
        now: Now,
        progress: &mut dyn FnMut(&SyncStats),
    ) -> Result<Vec<ClientMessage>, SyncError> {
        if self.upload_in_flight > 0 || !self.upload_finished {
            return Err(SyncError::Protocol("documents before the uploads were acknowledged".into()));
        }
        if self.round.is_none() {
            self.stats.round_applied = 0; // a new round (live sessions have many)
        }
        if *self.round.get_or_insert(round) != round {
            return Err(SyncError::Protocol("documents of two rounds in one session".into()));
        }
        self.phase = Phase::Downloading;
        self.stats.round_items = round_items;
        let step = (round_items / 100).max(1);
        let mut during = self.stats.clone();
        let page = items.len();
        let on_item = &mut |done: usize| {
            during.round_applied = self.stats.round_applied + done as u64;
            if done < page && during.round_applied.is_multiple_of(step) {
                progress(&during);
            }
        };
        let notified = store.apply_items(round, priority, items, now.wall_ms, on_item)?;
        self.stats.notifications += notified;
        self.stats.round_applied += page as u64;
        for item in items {
            match &item.body {
                crate::protocol::DocBody::Whole { .. } => self.stats.documents_received += 1,
                crate::protocol::DocBody::Changes(c) => self.stats.changes_received += c.len() as u64,
                crate::protocol::DocBody::Purge => self.stats.documents_purged += 1,
            }
        }
        progress(&self.stats);
        Ok(vec![ClientMessage::PageApplied { round }])
    }

    /// The round is complete: the cursor, the lease and the clock offset are recorded, and the
    /// round acknowledged.
    fn round_done(
        &mut self,
        round: u64,
        documents_in_scope: u64,
        left_out: u64,
        store: &mut DeviceStore,
        at: Now,
    ) -> Result<Vec<ClientMessage>, SyncError> {
        if self.upload_in_flight > 0 || self.round.is_some_and(|r| r != round) {
            return Err(SyncError::Protocol("round finished out of order".into()));
        }
        let now = at.wall_ms;
        let ((carried, server_now), lease) =
            self.server.as_ref().map_or(((now, 0), 0), |s| (s.clocks_now(at.monotonic_ms), s.lease_ms));
        // The lease runs from the earlier of the clock as it reads now and as carried from the
        // Welcome: a clock set forward during the sync cannot stretch it, and one set back (a
        // correction) starts it at the true moment in the clock's new frame. The server's time
        // is taken at that same moment, so the difference of the two is the offset the clock
        // has now.
        let synced_at = now.min(carried);
        let server_at = server_now - (now - synced_at);
        store.finish_round(round, server_at, synced_at, now, lease, left_out)?;
        self.stats.documents_in_scope = documents_in_scope;
        self.stats.left_out = left_out;
        self.rounds_completed += 1;
        self.round = None;
        self.phase = if self.watching { Phase::Watching } else { Phase::Done };
        Ok(vec![ClientMessage::RoundAck { round }])
    }
}

fn message_name(message: &ServerMessage) -> &'static str {
    match message {
        ServerMessage::Welcome { .. } => "Welcome",
        ServerMessage::UploadAck { .. } => "UploadAck",
        ServerMessage::Docs { .. } => "Docs",
        ServerMessage::RoundDone { .. } => "RoundDone",
        ServerMessage::Refused { .. } => "Refused",
        ServerMessage::AccessDecision { .. } => "AccessDecision",
        ServerMessage::ViewLogAck { .. } => "ViewLogAck",
    }
}
