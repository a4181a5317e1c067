//! The server half of the sync protocol, as a state machine over a [`ServerStore`].
//!
//! It never touches a socket: [`ServerSession::handle`] takes a device frame and returns the
//! replies; [`ServerSession::next_page`] yields the round's pages one at a time, so a round over
//! ten thousand documents is streamed with bounded memory; the device answers each page with
//! `PageApplied`, and the session counts what is unapplied, by which the transport paces it.
//!
//! A round at sequence number `M` sends, in ascending patient order: whole documents newly in
//! scope, the changes in `(cursor, M]` of held documents (minus the device's own), and purges of
//! documents that left scope. New documents of priority patients (active alerts, incidents,
//! grants) come first, in a part of their own, so that a new tablet has the DNACPR decisions and
//! the incident patients before the rest. Before a page goes out the store records what it sends
//! whole or purges; the device's next `Hello` (or its `RoundAck`) settles that record.

pub mod enrol;
pub mod governance;
mod round;
pub mod scope;

use std::collections::HashSet;

use care_node::identity::{PublicKey, short_hex};
use care_node::protocol::{ClientMessage, RefusedDoc, Resume, ServerMessage, close};
use care_node::summary::PatientId;

use crate::domain::limits::Limits;
use crate::domain::settings::Setting;
use crate::domain::upload::RefusedUpload;
use crate::store::{DeviceRecord, LogEntry, RoundOutcome, ScopeCache, ServerStore, StoreError, UploadError};
use round::Round;

/// Most items in one `Docs` frame.
pub const MAX_ITEMS_PER_PAGE: usize = 1_000;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("upload refused: {0}")]
    Upload(UploadError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SessionError {
    /// The close code a session that failed with this error ends with
    /// ([`care_node::protocol::close`]): a refused upload is `REFUSED`, a store failure (a full
    /// disk, say) `INTERNAL` (the device may try again), anything else the device's `PROTOCOL`
    /// violation.
    pub fn close_code(&self) -> u32 {
        match self {
            SessionError::Upload(_) => close::REFUSED,
            SessionError::Store(_) => close::INTERNAL,
            SessionError::Protocol(_) => close::PROTOCOL,
        }
    }

    /// The frame that tells the device why, before the session closes: a refused upload is
    /// answered with `Refused` and its reason (the device keeps its changes and shows why); the
    /// rest end with the close code and reason alone.
    pub fn refusal(&self) -> Option<ServerMessage> {
        match self {
            SessionError::Upload(reason) => Some(ServerMessage::Refused { message: reason.to_string() }),
            _ => None,
        }
    }
}

/// The store failing while an upload is checked is the server's failure (a full disk, say),
/// not a refusal of the device's changes: the device is told to try again, not that it may not.
impl From<UploadError> for SessionError {
    fn from(e: UploadError) -> Self {
        match e {
            UploadError::Store(e) => SessionError::Store(e),
            refusal => SessionError::Upload(refusal),
        }
    }
}

/// What a change in the store means for a watching session ([`ServerSession::live_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveStep {
    /// Nothing to send.
    Nothing,
    /// A round made without the store, ready to send.
    Round,
    /// The round must be planned from the store ([`ServerSession::plan_live_round`]).
    Plan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    /// Live: the round is acknowledged and the device waits for the next one.
    Watching,
    /// The device was told to wipe; everything but its confirmation is ignored.
    AwaitWipe,
    Uploading,
    Downloading,
    AwaitAck,
    Done,
}

/// One device's sync session on the server.
#[derive(Debug)]
pub struct ServerSession {
    device: DeviceRecord,
    phase: Phase,
    /// The device asked to stay connected for live rounds.
    watch: bool,
    /// Rounds the device acknowledged in this session.
    rounds_acknowledged: u64,
    cursor: u64,
    resume: Option<Resume>,
    round: Option<Round>,
    /// The key this connection's TLS handshake presented (None: the store's current key).
    presented_key: Option<PublicKey>,
    /// The next server key told in the Welcome; a round acknowledged after it proves the device
    /// stored it (it does so before anything else).
    announced_key: Option<PublicKey>,
    /// The documents the device may write to (held and in scope), computed at its first upload.
    writable: Option<HashSet<PatientId>>,
    limits: Limits,
    /// The sizes of the pages sent that the device has not yet said it applied, oldest first,
    /// and the bytes of those it has: the transport paces a round by them (a cut link costs
    /// what is unapplied, so it keeps that bounded).
    unapplied: std::collections::VecDeque<usize>,
    applied_bytes: u64,
    /// What a watching device holds, as of its last acknowledged round: what a change must touch
    /// to concern it.
    live: Option<LiveView>,
    rounds_planned: u64,
    /// This session's number among the device's ([`crate::store::SyncLog::begin_session`]),
    /// taken at the hello: its writes of the device's session state carry it.
    fence: u64,
}

/// A watching device as its last acknowledged round left it.
#[derive(Debug)]
struct LiveView {
    /// Changes up to this sequence number are on the device or could not concern it.
    seen: u64,
    /// The scope it holds: the epoch it was decided at and the earliest end of its grants (past
    /// it the scope must be decided again).
    decided: ScopeCache,
    holds: HashSet<PatientId>,
}

/// Log entries at most that one look at the store carries for the live sessions
/// ([`StoreMoved::entries`]); past it (a big import) each session reads its own.
const MOVED_ENTRIES: usize = 2_000;

/// What moved in the store after sequence number `after`, read once for every live session
/// ([`StoreMoved::read`]): the transport's watcher hands it to each.
#[derive(Debug, Clone, Default)]
pub struct StoreMoved {
    pub after: u64,
    pub seq: u64,
    pub scope_epoch: u64,
    /// Documents with a change in `(after, seq]`.
    pub docs: std::sync::Arc<HashSet<PatientId>>,
    /// The log's entries in `(after, seq]`, when there are at most [`MOVED_ENTRIES`]: a live
    /// round of changes only is then made from them, with no read of the store per session.
    pub entries: Option<std::sync::Arc<Vec<LogEntry>>>,
}

impl StoreMoved {
    /// What moved after `after`. If compaction dropped log entries past `after`, which documents
    /// changed is no longer known: `after` is then `u64::MAX`, which follows on from nothing, so
    /// every live session plans.
    pub fn read(store: &dyn ServerStore, after: u64) -> Result<Self, StoreError> {
        let seq = store.max_seq()?;
        let entries =
            if seq > after { store.log_entries(after, seq, MOVED_ENTRIES)? } else { Some(Vec::new()) };
        let docs = match &entries {
            Some(entries) => entries.iter().map(|e| e.doc).collect(),
            None => store.changed_docs(after, seq)?,
        };
        let after = if store.log_horizon()? > after { u64::MAX } else { after };
        Ok(Self {
            after,
            seq,
            scope_epoch: store.scope_epoch()?,
            docs: std::sync::Arc::new(docs),
            entries: entries.map(std::sync::Arc::new),
        })
    }
}

impl ServerSession {
    pub fn new(device: DeviceRecord) -> Self {
        Self {
            device,
            phase: Phase::AwaitHello,
            watch: false,
            rounds_acknowledged: 0,
            cursor: 0,
            resume: None,
            round: None,
            presented_key: None,
            announced_key: None,
            writable: None,
            limits: Limits::default(),
            unapplied: std::collections::VecDeque::new(),
            applied_bytes: 0,
            live: None,
            rounds_planned: 0,
            fence: 0,
        }
    }

    /// A session on a connection whose handshake proved `key` (which may lag the store's current
    /// key between `server-key activate` and the restart that presents it).
    pub fn presenting(mut self, key: PublicKey) -> Self {
        self.presented_key = Some(key);
        self
    }

    /// A session bounded by `limits` instead of the defaults.
    pub fn limited(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The key this connection presents and the key devices should stage next, if any.
    fn server_keys(&self, store: &dyn ServerStore) -> Result<(PublicKey, Option<PublicKey>), SessionError> {
        let current = store.server_identity()?.public_key();
        let presented = self.presented_key.unwrap_or(current);
        let next = if presented != current {
            Some(current) // activated, not yet presented: devices must keep following it
        } else {
            store.next_server_identity()?.map(|i| i.public_key())
        };
        Ok((presented, next))
    }

    pub fn device(&self) -> &DeviceRecord {
        &self.device
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// True while a live session waits for something to change.
    pub fn is_watching(&self) -> bool {
        self.phase == Phase::Watching
    }

    /// When a watching device's scope must be decided again though nothing moved in the store
    /// (the earliest end of its grants, server clock): the transport wakes the session then.
    pub fn live_deadline_ms(&self) -> Option<i64> {
        self.live
            .as_ref()
            .filter(|_| self.phase == Phase::Watching)
            .map(|l| l.decided.valid_until_ms)
            .filter(|&t| t < i64::MAX)
    }

    /// Live rounds planned in this session (a change that could not concern the device plans none).
    pub fn rounds_planned(&self) -> u64 {
        self.rounds_planned
    }

    /// True once a live session's first round is acknowledged: from then on the device may end
    /// it at any moment (its user stopped watching), even while a pushed round is in flight, and
    /// that is a normal end. The round it did not acknowledge stays pending, settled by its next
    /// `Hello` like any cut round.
    pub fn is_live(&self) -> bool {
        self.watch && self.rounds_acknowledged > 0
    }

    /// Starts a live round if anything in the device's scope changed since its cursor; returns
    /// whether there is something to send (then call [`ServerSession::next_page`]).
    ///
    /// A live device is not planned for at all when `moved` cannot concern it: nothing it holds
    /// changed, no scope input moved, no grant of it lapsed, and `moved` follows on from what the
    /// session last looked at (a watcher's note it missed means it plans, to be safe). Otherwise
    /// every change in the region would make every watching device plan a round.
    pub fn live_round(
        &mut self,
        store: &dyn ServerStore,
        moved: &StoreMoved,
        now_ms: i64,
    ) -> Result<bool, SessionError> {
        match self.live_step(moved, now_ms) {
            LiveStep::Nothing => Ok(false),
            LiveStep::Round => Ok(true),
            LiveStep::Plan => self.plan_live_round(store, now_ms),
        }
    }

    /// The part of [`ServerSession::live_round`] that needs no store: whether `moved` concerns
    /// the device at all, and its round when that is made from the entries `moved` carries.
    /// Most changes in a region concern few of its watching devices, so the transport asks this
    /// first, on the session's own task, and goes to the store only for [`LiveStep::Plan`].
    pub fn live_step(&mut self, moved: &StoreMoved, now_ms: i64) -> LiveStep {
        if self.phase != Phase::Watching {
            return LiveStep::Nothing;
        }
        let Some(live) = &mut self.live else { return LiveStep::Plan };
        let same_scope = moved.scope_epoch == live.decided.epoch && now_ms < live.decided.valid_until_ms;
        if moved.seq <= live.seen && same_scope {
            return LiveStep::Nothing; // nothing new
        }
        let follows = moved.after <= live.seen;
        if follows && same_scope && moved.docs.is_disjoint(&live.holds) {
            live.seen = moved.seq;
            return LiveStep::Nothing;
        }
        // Changes to documents it holds, and nothing else: the round is what moved, as the
        // store would give it (changes after what the device has, not its own).
        let Some(entries) = moved.entries.as_ref().filter(|_| follows && same_scope && self.resume.is_none())
        else {
            return LiveStep::Plan;
        };
        let mut changes = crate::store::ChangesByDoc::new();
        for e in entries.iter() {
            if e.seq > live.seen && e.author != Some(self.device.id) && live.holds.contains(&e.doc) {
                changes.entry(e.doc).or_default().push((e.seq, e.change.clone()));
            }
        }
        if changes.is_empty() {
            live.seen = moved.seq; // only its own changes came back
            return LiveStep::Nothing;
        }
        self.rounds_planned += 1;
        self.round = Some(Round::of_changes(moved.seq, changes, live.decided));
        self.phase = Phase::Downloading;
        LiveStep::Round
    }

    /// Plans a live round from the store, after [`ServerSession::live_step`] said
    /// [`LiveStep::Plan`]; returns whether there is something to send.
    pub fn plan_live_round(&mut self, store: &dyn ServerStore, now_ms: i64) -> Result<bool, SessionError> {
        self.rounds_planned += 1;
        self.plan_round(store, now_ms)?;
        let round = self.round.as_ref().expect("a round was just planned");
        if round.order.is_empty() && round.decided.left_out == 0 {
            // Nothing of this device's changed: no frame at all; the next round starts from here,
            // and the next change is looked at against what was just decided.
            self.cursor = round.seq;
            self.live = Some(self.live_view(store)?);
            return Ok(false);
        }
        self.phase = Phase::Downloading;
        Ok(true)
    }

    /// True while the session has round pages to send.
    pub fn is_downloading(&self) -> bool {
        self.phase == Phase::Downloading
    }

    /// Bytes of the pages sent that the device has not yet said it applied.
    pub fn unapplied_bytes(&self) -> usize {
        self.unapplied.iter().sum()
    }

    /// Bytes of pages the device said it applied, over the session.
    pub fn applied_bytes(&self) -> u64 {
        self.applied_bytes
    }

    /// The device applied the oldest page it had not yet acknowledged: pages are acknowledged
    /// in the order sent, each once, and only pages of the round being sent or just sent.
    /// Needs no store: the transport calls it while a round goes out.
    pub fn page_applied(&mut self, round: u64) -> Result<(), SessionError> {
        let current = self.round.as_ref().map(|r| r.seq);
        let Some(bytes) = self.unapplied.front().copied().filter(|_| current == Some(round)) else {
            return Err(SessionError::Protocol("acknowledged a page that was not sent".into()));
        };
        self.unapplied.pop_front();
        self.applied_bytes += bytes as u64;
        Ok(())
    }

    /// Handles one device frame.
    pub fn handle(
        &mut self,
        message: ClientMessage,
        store: &dyn ServerStore,
        now_ms: i64,
    ) -> Result<Vec<ServerMessage>, SessionError> {
        match (self.phase, message) {
            (phase, ClientMessage::PageApplied { round })
                if !matches!(phase, Phase::AwaitHello | Phase::AwaitWipe) =>
            {
                self.page_applied(round)?;
                Ok(Vec::new())
            }
            (
                Phase::AwaitHello,
                ClientMessage::Hello { cursor, resume, staged_server_key, incarnation: known },
            ) => Ok(vec![self.welcome(store, cursor, resume, staged_server_key, known, now_ms)?]),
            (Phase::AwaitWipe, ClientMessage::WipeConfirmed) => {
                store.confirm_wipe(self.device.id, now_ms)?;
                store.append_audit(
                    &self.device.name,
                    "wipe-confirmed",
                    None,
                    "patient data and data key destroyed",
                    now_ms,
                )?;
                self.phase = Phase::Done;
                Ok(Vec::new())
            }
            (Phase::AwaitWipe, _) => Ok(Vec::new()),
            (Phase::Uploading, ClientMessage::AccessRequest { nhs_number, kind, reason }) => {
                Ok(vec![governance::decide_access(
                    store,
                    &self.device,
                    &nhs_number,
                    kind,
                    &reason,
                    self.limits.access_requests_per_hour,
                    now_ms,
                )?])
            }
            (Phase::Uploading, ClientMessage::ViewLog { entries }) => {
                if entries.len() > care_node::sync::VIEWS_PER_FRAME {
                    return Err(SessionError::Protocol(format!(
                        "a view log frame may hold at most {} entries",
                        care_node::sync::VIEWS_PER_FRAME
                    )));
                }
                Ok(vec![governance::record_views(store, &self.device, self.fence, &entries, now_ms)?])
            }
            (Phase::Uploading, ClientMessage::Upload { through, docs }) => {
                Ok(vec![self.upload(store, through, &docs, now_ms)?])
            }
            (Phase::Uploading, ClientMessage::UploadDone) => {
                self.plan_round(store, now_ms)?;
                self.phase = Phase::Downloading;
                Ok(Vec::new())
            }
            (Phase::AwaitAck, ClientMessage::RoundAck { round }) => {
                self.round_acknowledged(store, round, now_ms)?;
                Ok(Vec::new())
            }
            (Phase::Uploading, ClientMessage::Watch) => {
                self.watch = true;
                Ok(Vec::new())
            }
            (phase, message) => {
                Err(SessionError::Protocol(format!("unexpected {} while {phase:?}", message_name(&message))))
            }
        }
    }

    /// The device's Hello answered: where its round starts (from the beginning if it last
    /// synced with another incarnation of this store), the server's keys, its lease, and
    /// whether it must wipe.
    fn welcome(
        &mut self,
        store: &dyn ServerStore,
        cursor: u64,
        resume: Option<Resume>,
        staged_server_key: Option<PublicKey>,
        known: Option<[u8; 16]>,
        now_ms: i64,
    ) -> Result<ServerMessage, SessionError> {
        let wipe = self.device.wipe_requested_at_ms.is_some();
        let incarnation = store.incarnation()?;
        // A device that synced with another incarnation holds changes this store may have
        // lost (a restore from backup): start it from the beginning, and it resends.
        let restored = known.is_some_and(|k| k != incarnation);
        let (cursor, resume) = if restored {
            tracing::warn!(device = %self.device.name, "device last synced before a restore; resyncing it from the start");
            (0, None)
        } else {
            (cursor, resume)
        };
        let (server_key, next_server_key) = self.server_keys(store)?;
        if staged_server_key.is_some() && staged_server_key == next_server_key {
            store.set_device_staged_key(self.device.id, next_server_key)?;
        } else {
            self.announced_key = next_server_key;
        }
        if wipe {
            self.phase = Phase::AwaitWipe;
        } else {
            self.hello(cursor, resume, store, now_ms)?;
            self.phase = Phase::Uploading;
        }
        Ok(ServerMessage::Welcome {
            device_name: self.device.name.clone(),
            role: self.device.role.as_str().to_string(),
            server_time_ms: now_ms,
            lease_ms: store.setting_hours_ms(Setting::LeaseHours(self.device.role))? as u64,
            wipe,
            server_key,
            next_server_key,
            incarnation,
            restored,
        })
    }

    /// An upload batch: within the device's quarantine rate, checked against what it may write
    /// ([`crate::domain::upload::check`]), committed unless a document moved meanwhile, its
    /// refusals kept for review.
    fn upload(
        &mut self,
        store: &dyn ServerStore,
        through: u64,
        docs: &[care_node::protocol::DocChanges],
        now_ms: i64,
    ) -> Result<ServerMessage, SessionError> {
        // A rate, not a total: a device is never blocked for good by its past refusals.
        let day_ago = now_ms - 24 * 3_600_000;
        if store.quarantine_count(self.device.id, day_ago)? >= self.limits.quarantine_per_device {
            return Err(UploadError::QuarantineFull.into());
        }
        if self.writable.is_none() {
            self.writable = Some(scope::writable(store, self.device.id, now_ms)?);
        }
        let writable = self.writable.as_ref().expect("just computed");
        // Checked outside the store's lock, committed only if no document moved meanwhile.
        let mut attempts = 0;
        let (checked, outcome) = loop {
            let checked = crate::domain::upload::check(
                |doc| store.load_document(doc),
                &self.device,
                docs,
                writable,
                &self.limits,
            )
            .map_err(UploadError::from)?;
            match store.commit_device_changes(&self.device, &checked.accepted) {
                Err(UploadError::Moved(_)) if attempts < 5 => attempts += 1,
                result => break (checked, result?),
            }
        };
        let refused = self.quarantine(store, checked.refused, now_ms)?;
        tracing::debug!(accepted = outcome.accepted, "upload batch durable");
        // Entries recorded offline on a record an operator has since merged away are
        // carried over to the kept record, never left behind.
        for (merged, kept) in outcome.merged {
            store.merge_patients(&kept, &merged, "server (late changes of a merged record)", now_ms)?;
        }
        Ok(ServerMessage::UploadAck { through, refused })
    }

    /// The device applied the whole round: it is settled, the scope it establishes recorded, and
    /// the device's cursor moves to it.
    fn round_acknowledged(
        &mut self,
        store: &dyn ServerStore,
        round: u64,
        now_ms: i64,
    ) -> Result<(), SessionError> {
        let expected = self.round.as_ref().map(|r| r.seq);
        if expected != Some(round) {
            return Err(SessionError::Protocol("acknowledged a round that was not sent".into()));
        }
        if !self.unapplied.is_empty() {
            return Err(SessionError::Protocol("acknowledged a round before applying all its pages".into()));
        }
        store.settle_round(self.device.id, self.fence, round, RoundOutcome::Complete, now_ms)?;
        if let Some(round) = self.round.as_ref().filter(|r| r.establishes) {
            store.set_scope_cache(self.device.id, self.fence, &round.decided)?;
        }
        if let Some(key) = self.announced_key.take() {
            store.set_device_staged_key(self.device.id, Some(key))?;
        }
        self.cursor = round;
        self.resume = None;
        self.rounds_acknowledged += 1;
        self.phase = if self.watch { Phase::Watching } else { Phase::Done };
        if self.watch {
            self.live = Some(self.live_view(store)?);
        }
        Ok(())
    }

    /// The live view the acknowledged (or empty) round leaves: a round that decided the scope
    /// holds it whole; one that reused the recorded scope left the device's holdings as they were.
    fn live_view(&mut self, store: &dyn ServerStore) -> Result<LiveView, SessionError> {
        let round = self.round.as_ref().expect("a round was planned");
        let holds = match (round.establishes, self.live.take()) {
            (true, _) => round.scope.clone(),
            (false, Some(live)) => live.holds,
            (false, None) => store.held(self.device.id)?,
        };
        Ok(LiveView { seen: round.seq, decided: round.decided, holds })
    }

    /// Keeps refused uploads for review, audits each, and raises one alert per device until an
    /// operator acknowledges it (a flood of refusals is one alert). Returns what to tell the device.
    fn quarantine(
        &mut self,
        store: &dyn ServerStore,
        refused: Vec<RefusedUpload>,
        now_ms: i64,
    ) -> Result<Vec<RefusedDoc>, SessionError> {
        let mut told = Vec::with_capacity(refused.len());
        for r in &refused {
            let (rule, place) = (r.refusal.rule.as_str(), r.refusal.place());
            let kept: Vec<Vec<u8>> = r.changes.iter().map(|c| c.bytes.clone()).collect();
            store.quarantine(self.device.id, &r.doc, rule, &place, &kept, now_ms)?;
            let detail = format!("rule {rule} at {place}; {} change(s) quarantined", r.changes.len());
            store.append_audit(&self.device.name, "write-refused", Some(&r.doc), &detail, now_ms)?;
            tracing::warn!(doc = %short_hex(r.doc.as_bytes()), rule, %place, "uploaded changes refused and quarantined");
            let changes = r.changes.iter().filter_map(|c| c.hash.map(|h| h.0)).collect();
            told.push(RefusedDoc { doc: r.doc, rule: rule.to_string(), place, changes });
        }
        if let Some(first) = refused.first() {
            let reason = || {
                format!(
                    "changes to {} document(s) refused by the write policy (first: rule {}); see the quarantine",
                    refused.len(),
                    first.refusal.rule
                )
            };
            governance::raise_alert_once(
                store,
                "write-refused",
                &self.device,
                Some(&first.doc),
                reason,
                now_ms,
            )?;
        }
        Ok(told)
    }
}

fn message_name(message: &ClientMessage) -> &'static str {
    match message {
        ClientMessage::Hello { .. } => "Hello",
        ClientMessage::Upload { .. } => "Upload",
        ClientMessage::UploadDone => "UploadDone",
        ClientMessage::RoundAck { .. } => "RoundAck",
        ClientMessage::AccessRequest { .. } => "AccessRequest",
        ClientMessage::ViewLog { .. } => "ViewLog",
        ClientMessage::WipeConfirmed => "WipeConfirmed",
        ClientMessage::Watch => "Watch",
        ClientMessage::PageApplied { .. } => "PageApplied",
    }
}
