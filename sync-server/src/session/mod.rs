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
pub mod scope;

use std::collections::HashSet;

use care_node::identity::{PublicKey, short_hex};
use care_node::protocol::{
    ClientMessage, DocBody, DocItem, RefusedDoc, Resume, ServerMessage, TARGET_BATCH_BYTES, close,
};
use care_node::summary::PatientId;
use serde_bytes::ByteBuf;

use crate::domain::limits::Limits;
use crate::domain::settings::Setting;
use crate::domain::upload::RefusedUpload;
use crate::store::{
    ChangesByDoc, DeviceRecord, RoundOutcome, ScopeCache, ServerStore, StoreError, UploadError,
};

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

#[derive(Debug)]
struct Round {
    seq: u64,
    /// Documents with something to send: the first `priority` of them (the priority part)
    /// ascending, then the rest ascending.
    order: Vec<PatientId>,
    priority: usize,
    next: usize,
    scope: HashSet<PatientId>,
    held: HashSet<PatientId>,
    changes: ChangesByDoc,
    /// Held documents whose changes since the device's cursor compaction dropped: sent whole
    /// (the device merges them), and not recorded as newly sent, since the device holds them.
    rewhole: HashSet<PatientId>,
    documents_in_scope: u64,
    left_out: u64,
    /// What a complete round establishes, recorded when the device acknowledges it (`None`: the
    /// round reused the recorded scope, which stays true).
    establishes: Option<ScopeCache>,
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

    /// True once a live session's first round is acknowledged: from then on the device may end
    /// it at any moment (its user stopped watching), even while a pushed round is in flight, and
    /// that is a normal end. The round it did not acknowledge stays pending, settled by its next
    /// `Hello` like any cut round.
    pub fn is_live(&self) -> bool {
        self.watch && self.rounds_acknowledged > 0
    }

    /// Starts a live round if anything in the device's scope changed since its cursor; returns
    /// whether there is something to send (then call [`ServerSession::next_page`]).
    pub fn live_round(&mut self, store: &dyn ServerStore, now_ms: i64) -> Result<bool, SessionError> {
        if self.phase != Phase::Watching {
            return Ok(false);
        }
        self.plan_round(store, now_ms)?;
        let round = self.round.as_ref().expect("a round was just planned");
        if round.order.is_empty() && round.left_out == 0 {
            // Nothing of this device's changed: no frame at all; the next round starts from here.
            self.cursor = round.seq;
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
            ) => {
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
                Ok(vec![ServerMessage::Welcome {
                    device_name: self.device.name.clone(),
                    role: self.device.role.as_str().to_string(),
                    server_time_ms: now_ms,
                    lease_ms: store.setting_hours_ms(Setting::LeaseHours(self.device.role))? as u64,
                    wipe,
                    server_key,
                    next_server_key,
                    incarnation,
                    restored,
                }])
            }
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
                Ok(vec![governance::record_views(store, &self.device, &entries, now_ms)?])
            }
            (Phase::Uploading, ClientMessage::Upload { through, docs }) => {
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
                        &docs,
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
                    store.merge_patients(
                        &kept,
                        &merged,
                        "server (late changes of a merged record)",
                        now_ms,
                    )?;
                }
                Ok(vec![ServerMessage::UploadAck { through, refused }])
            }
            (Phase::Uploading, ClientMessage::UploadDone) => {
                self.plan_round(store, now_ms)?;
                self.phase = Phase::Downloading;
                Ok(Vec::new())
            }
            (Phase::AwaitAck, ClientMessage::RoundAck { round }) => {
                let expected = self.round.as_ref().map(|r| r.seq);
                if expected != Some(round) {
                    return Err(SessionError::Protocol("acknowledged a round that was not sent".into()));
                }
                if !self.unapplied.is_empty() {
                    return Err(SessionError::Protocol(
                        "acknowledged a round before applying all its pages".into(),
                    ));
                }
                store.settle_round(self.device.id, round, RoundOutcome::Complete, now_ms)?;
                if let Some(established) = self.round.as_ref().and_then(|r| r.establishes.as_ref()) {
                    store.set_scope_cache(self.device.id, established)?;
                }
                if let Some(key) = self.announced_key.take() {
                    store.set_device_staged_key(self.device.id, Some(key))?;
                }
                self.cursor = round;
                self.resume = None;
                self.rounds_acknowledged += 1;
                self.phase = if self.watch { Phase::Watching } else { Phase::Done };
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

    fn hello(
        &mut self,
        cursor: u64,
        resume: Option<Resume>,
        store: &dyn ServerStore,
        now_ms: i64,
    ) -> Result<(), SessionError> {
        let max = store.max_seq()?;
        self.cursor = if cursor > max {
            // A server restored from an older backup: resend from the start (applying is idempotent).
            tracing::warn!(device = %self.device.name, "device cursor is ahead of the server; resending held documents' changes");
            0
        } else {
            cursor
        };
        if let Some(pending) = store.pending_round(self.device.id)? {
            let outcome = match resume {
                _ if cursor >= pending => RoundOutcome::Complete,
                Some(r) if r.round == pending => {
                    RoundOutcome::Through { priority: r.priority, through: r.through }
                }
                _ => RoundOutcome::Nothing,
            };
            store.settle_round(self.device.id, pending, outcome, now_ms)?;
            self.resume =
                resume.filter(|r| r.round == pending && r.round <= max && outcome != RoundOutcome::Complete);
        }
        Ok(())
    }

    fn after_for(&self, doc: &PatientId) -> u64 {
        match self.resume {
            // Changes of held documents are all in the second part.
            Some(r) if !r.priority && *doc <= r.through => r.round.max(self.cursor),
            _ => self.cursor,
        }
    }

    /// Held documents due whole because the changes the device lacks are below the log's
    /// horizon. Read after the changes: the horizon only moves forward, so the one read here
    /// covers whatever compaction dropped before them.
    fn below_horizon(&self, store: &dyn ServerStore) -> Result<HashSet<PatientId>, SessionError> {
        let horizon = store.log_horizon()?;
        if self.cursor >= horizon {
            return Ok(HashSet::new());
        }
        let mut due = store.held_changed_since(self.device.id, self.cursor)?;
        due.retain(|doc| self.after_for(doc) < horizon);
        Ok(due)
    }

    fn plan_round(&mut self, store: &dyn ServerStore, now_ms: i64) -> Result<(), SessionError> {
        let seq = store.max_seq()?;
        let epoch = store.scope_epoch()?;
        // Nothing a scope depends on moved since the last complete round and no grant lapsed: the
        // device holds exactly its scope, and only changes can be due.
        if let Some(cache) = store.scope_cache(self.device.id)?.filter(|c| {
            c.epoch == epoch && now_ms < c.valid_until_ms && self.resume.is_none() && self.cursor > 0
        }) {
            let mut changes = store.changes_for_device(self.device.id, self.cursor, seq)?;
            let rewhole = self.below_horizon(store)?;
            changes.retain(|doc, list| !list.is_empty() && !rewhole.contains(doc));
            let mut order: Vec<PatientId> = changes.keys().chain(&rewhole).copied().collect();
            order.sort_unstable();
            let docs: HashSet<PatientId> = order.iter().copied().collect();
            self.round = Some(Round {
                seq,
                order,
                priority: 0,
                next: 0,
                documents_in_scope: cache.in_scope,
                left_out: cache.left_out,
                scope: docs.clone(),
                held: docs,
                changes,
                rewhole,
                establishes: None,
            });
            return Ok(());
        }
        let valid_until_ms = store
            .grants(Some(self.device.id), now_ms)?
            .iter()
            .map(|g| g.expires_at_ms)
            .min()
            .unwrap_or(i64::MAX);
        let decided = scope::device_scope(store, self.device.id, now_ms)?;
        let left_out = decided.left_out;
        let scope: HashSet<PatientId> = decided.patients.into_iter().collect();
        let held = store.held(self.device.id)?;
        let mut changes = store.changes_for_device(self.device.id, self.cursor, seq)?;
        for (doc, list) in changes.iter_mut() {
            let after = self.after_for(doc);
            list.retain(|(s, _)| *s > after);
        }
        let mut rewhole = self.below_horizon(store)?;
        rewhole.retain(|doc| scope.contains(doc));
        changes.retain(|doc, list| {
            !list.is_empty() && held.contains(doc) && scope.contains(doc) && !rewhole.contains(doc)
        });
        let (mut order, mut rest): (Vec<PatientId>, Vec<PatientId>) =
            scope.difference(&held).copied().partition(|p| decided.first.contains(p));
        order.sort_unstable();
        let priority = order.len();
        rest.extend(held.difference(&scope).chain(changes.keys()).chain(&rewhole).copied());
        rest.sort_unstable();
        rest.dedup();
        order.extend(rest);
        tracing::debug!(round = seq, items = order.len(), in_scope = scope.len(), "round planned");
        self.round = Some(Round {
            seq,
            order,
            priority,
            next: 0,
            documents_in_scope: scope.len() as u64,
            left_out,
            establishes: Some(ScopeCache { epoch, valid_until_ms, in_scope: scope.len() as u64, left_out }),
            scope,
            held,
            changes,
            rewhole,
        });
        Ok(())
    }

    /// The next frame of the round: a page of documents, then `RoundDone`, then `None`.
    /// A page holds documents up to about `max_bytes` (the transport sizes pages to the link;
    /// at most [`TARGET_BATCH_BYTES`]) and at most [`MAX_ITEMS_PER_PAGE`] items.
    pub fn next_page(
        &mut self,
        store: &dyn ServerStore,
        max_bytes: usize,
    ) -> Result<Option<ServerMessage>, SessionError> {
        let max_bytes = max_bytes.min(TARGET_BATCH_BYTES);
        if self.phase != Phase::Downloading {
            return Ok(None);
        }
        let round = self.round.as_mut().expect("a downloading session has a round");
        if round.next >= round.order.len() {
            self.phase = Phase::AwaitAck;
            return Ok(Some(ServerMessage::RoundDone {
                round: round.seq,
                documents_in_scope: round.documents_in_scope,
                left_out: round.left_out,
            }));
        }
        let (mut items, mut bytes, mut whole, mut purged) = (Vec::new(), 0usize, Vec::new(), Vec::new());
        // A page holds items of one part only.
        let priority = round.next < round.priority;
        let end = if priority { round.priority } else { round.order.len() };
        while round.next < end && bytes < max_bytes && items.len() < MAX_ITEMS_PER_PAGE {
            let doc = round.order[round.next];
            round.next += 1;
            let body = if !round.scope.contains(&doc) {
                purged.push(doc);
                DocBody::Purge
            } else if !round.held.contains(&doc) || round.rewhole.contains(&doc) {
                let Some(saved) = store.load_document(&doc)? else {
                    tracing::warn!(doc = %short_hex(doc.as_bytes()), "patient in scope has no document");
                    continue;
                };
                if !round.held.contains(&doc) {
                    whole.push(doc);
                }
                bytes += saved.len();
                DocBody::Whole(ByteBuf::from(saved))
            } else {
                let list = round.changes.remove(&doc).unwrap_or_default();
                bytes += list.iter().map(|(_, c)| c.len()).sum::<usize>();
                DocBody::Changes(list.into_iter().map(|(_, c)| ByteBuf::from(c)).collect())
            };
            items.push(DocItem { doc, body });
        }
        store.record_round_page(self.device.id, round.seq, priority, &whole, &purged)?;
        self.unapplied.push_back(bytes);
        let round_items = round.order.len() as u64;
        Ok(Some(ServerMessage::Docs { round: round.seq, priority, round_items, items }))
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
