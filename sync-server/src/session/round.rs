//! Rounds: where a device's round starts (its cursor, or where a cut round stopped), what it
//! sends (whole documents newly in scope, changes of held ones, purges), in which order (the
//! priority part first), and its pages, one at a time within a byte and item budget.

use std::collections::{HashMap, HashSet};

use care_node::identity::short_hex;
use care_node::protocol::{DocBody, DocItem, Resume, ServerMessage, TARGET_BATCH_BYTES};
use care_node::summary::PatientId;
use serde_bytes::ByteBuf;

use super::{MAX_ITEMS_PER_PAGE, Phase, ServerSession, SessionError, scope};
use crate::store::{ChangesByDoc, RoundOutcome, ScopeCache, ServerStore};

#[derive(Debug)]
pub(super) struct Round {
    pub(super) seq: u64,
    /// Documents with something to send: the first `priority` of them (the priority part)
    /// ascending, then the rest ascending.
    pub(super) order: Vec<PatientId>,
    pub(super) priority: usize,
    pub(super) next: usize,
    pub(super) scope: HashSet<PatientId>,
    pub(super) held: HashSet<PatientId>,
    pub(super) changes: ChangesByDoc,
    /// Held documents whose changes since the device's cursor compaction dropped: sent whole
    /// (the device merges them), and not recorded as newly sent, since the device holds them.
    pub(super) rewhole: HashSet<PatientId>,
    /// The scope the round is for: the epoch and earliest grant end it was decided at, how many
    /// documents it holds and how many the budget left out.
    pub(super) decided: ScopeCache,
    /// The round decided the scope afresh: recorded when the device acknowledges it (`false`:
    /// the round reused the recorded scope, which stays true).
    pub(super) establishes: bool,
    /// Documents read ahead for the pages to come, in one call to the store each few pages.
    pub(super) ahead: ReadAhead,
}

impl Round {
    /// A round of `changes` to documents the device holds, in the scope it holds (`decided`).
    pub(super) fn of_changes(seq: u64, changes: ChangesByDoc, decided: ScopeCache) -> Self {
        let order: Vec<PatientId> = changes.keys().copied().collect(); // ascending: a BTreeMap's keys
        let docs: HashSet<PatientId> = order.iter().copied().collect();
        Round {
            seq,
            order,
            priority: 0,
            next: 0,
            scope: docs.clone(),
            held: docs,
            changes,
            rewhole: HashSet::new(),
            decided,
            establishes: false,
            ahead: ReadAhead::default(),
        }
    }
}

/// Whole documents read ahead of the page that sends them ([`crate::store::PatientRecords::load_listed_many`]:
/// one round trip to the store for [`READ_AHEAD`] of them, not one each). `Debug` counts them:
/// they are patient data.
#[derive(Default)]
pub(super) struct ReadAhead(HashMap<PatientId, crate::store::Listed>);

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadAhead({} documents)", self.0.len())
    }
}

/// How many whole documents a round reads from the store at once.
const READ_AHEAD: usize = 64;

/// The fewest items a page at a round's end is cut down to (see [`tail_page_items`]).
const MIN_TAIL_ITEMS: usize = 8;

/// At most half of what is left of the round goes in one page (and at least
/// [`MIN_TAIL_ITEMS`]): a round's last pages shrink, so the device, which applies whole pages,
/// has a few documents left to apply when the last byte arrives instead of a full page (on
/// `flaky-wifi` a full page is a quarter of a second of the link, about 500 documents and
/// 130 ms of applying after the link went quiet). The device applies faster than any link
/// here delivers, so it keeps up with the smaller pages; each costs it one commit.
fn tail_page_items(left: usize) -> usize {
    (left / 2).max(MIN_TAIL_ITEMS)
}

impl ServerSession {
    pub(super) fn hello(
        &mut self,
        cursor: u64,
        resume: Option<Resume>,
        store: &dyn ServerStore,
        now_ms: i64,
    ) -> Result<(), SessionError> {
        // From here on, a session of this device still running elsewhere (an instance that lost
        // it) can no longer write its round state: this one is the newest.
        self.fence = store.begin_session(self.device.id)?;
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
            store.settle_round(self.device.id, self.fence, pending, outcome, now_ms)?;
            self.resume =
                resume.filter(|r| r.round == pending && r.round <= max && outcome != RoundOutcome::Complete);
        }
        Ok(())
    }

    pub(super) fn after_for(&self, doc: &PatientId) -> u64 {
        match self.resume {
            // Changes of held documents are all in the second part.
            Some(r) if !r.priority && *doc <= r.through => r.round.max(self.cursor),
            _ => self.cursor,
        }
    }

    /// Held documents due whole because the changes the device lacks are below the log's
    /// horizon. Read after the changes: the horizon only moves forward, so the one read here
    /// covers whatever compaction dropped before them.
    pub(super) fn below_horizon(&self, store: &dyn ServerStore) -> Result<HashSet<PatientId>, SessionError> {
        let horizon = store.log_horizon()?;
        if self.cursor >= horizon {
            return Ok(HashSet::new());
        }
        let mut due = store.held_changed_since(self.device.id, self.cursor)?;
        due.retain(|doc| self.after_for(doc) < horizon);
        Ok(due)
    }

    pub(super) fn plan_round(&mut self, store: &dyn ServerStore, now_ms: i64) -> Result<(), SessionError> {
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
            let mut round = Round::of_changes(seq, changes, cache);
            round.order.extend(&rewhole);
            round.order.sort_unstable();
            round.scope.extend(&rewhole);
            round.held.extend(&rewhole);
            round.rewhole = rewhole;
            self.round = Some(round);
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
            decided: ScopeCache { epoch, valid_until_ms, in_scope: scope.len() as u64, left_out },
            establishes: true,
            ahead: ReadAhead::default(),
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
                documents_in_scope: round.decided.in_scope,
                left_out: round.decided.left_out,
            }));
        }
        let (mut items, mut bytes, mut whole, mut purged) = (Vec::new(), 0usize, Vec::new(), Vec::new());
        // A page holds items of one part only.
        let priority = round.next < round.priority;
        let end = if priority { round.priority } else { round.order.len() };
        let most = MAX_ITEMS_PER_PAGE.min(tail_page_items(round.order.len() - round.next));
        while round.next < end && bytes < max_bytes && items.len() < most {
            let doc = round.order[round.next];
            round.next += 1;
            let body = if !round.scope.contains(&doc) {
                purged.push(doc);
                DocBody::Purge
            } else if !round.held.contains(&doc) || round.rewhole.contains(&doc) {
                if !round.ahead.0.contains_key(&doc) {
                    // The next documents this round sends whole, from this one on, in one read.
                    let wanted: Vec<PatientId> = round.order[round.next - 1..end]
                        .iter()
                        .filter(|d| {
                            round.scope.contains(d) && (!round.held.contains(d) || round.rewhole.contains(d))
                        })
                        .take(READ_AHEAD)
                        .copied()
                        .collect();
                    round.ahead.0.extend(store.load_listed_many(&wanted)?);
                }
                let Some((saved, listing)) = round.ahead.0.remove(&doc) else {
                    tracing::warn!(doc = %short_hex(doc.as_bytes()), "patient in scope has no document");
                    continue;
                };
                if !round.held.contains(&doc) {
                    whole.push(doc);
                }
                bytes += saved.len();
                DocBody::Whole { saved: ByteBuf::from(saved), listing }
            } else {
                let list = round.changes.remove(&doc).unwrap_or_default();
                bytes += list.iter().map(|(_, c)| c.len()).sum::<usize>();
                DocBody::Changes(list.into_iter().map(|(_, c)| ByteBuf::from(c)).collect())
            };
            items.push(DocItem { doc, body });
        }
        store.record_round_page(self.device.id, self.fence, round.seq, priority, &whole, &purged)?;
        self.unapplied.push_back(bytes);
        let round_items = round.order.len() as u64;
        Ok(Some(ServerMessage::Docs { round: round.seq, priority, round_items, items }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_s_last_pages_halve_down_to_the_fewest_and_every_item_goes_once() {
        let mut left = 1_000;
        let mut pages = Vec::new();
        while left > 0 {
            let page = tail_page_items(left).min(left);
            assert!(page > 0, "a page always takes something");
            pages.push(page);
            left -= page;
        }
        assert_eq!(pages.iter().sum::<usize>(), 1_000);
        assert_eq!(&pages[..3], &[500, 250, 125], "each page half of what is left");
        assert!(*pages.last().unwrap() <= MIN_TAIL_ITEMS, "the last page is a few documents: {pages:?}");
        assert_eq!(tail_page_items(3), MIN_TAIL_ITEMS, "never fewer than the fewest");
    }
}
