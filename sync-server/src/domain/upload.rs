//! Where an upload gets checked. Every change a device sends passes here before anything is
//! committed, in this order, cheapest first:
//!
//! 1. the batch's bounds ([`Limits`]`::upload_docs`, `upload_changes`): a batch over them ends
//!    the session (a well-behaved device never sends one);
//! 2. per document: the device holds it and the patient is in its scope now;
//! 3. per change: its size once inflated and the item counts its columns claim
//!    ([`care_node::chunk`], before Automerge sees it), then Automerge's own parse;
//! 4. per document: the changes applied to a copy of the stored document, and the copy judged by
//!    the write policy ([`care_node::policy`], the same rules the device checks itself) and by
//!    its size ([`care_node::policy::MAX_DOCUMENT_BYTES`]).
//!
//! A document that fails 2–4 is refused whole and its changes go to the quarantine; the rest of
//! the batch is committed. All of this runs outside the store's write lock: the store reads it
//! needs take the lock only for a moment each, and the commit afterwards does only the cheap part
//! (apply the checked changes to the current document and log them). The commit refuses a
//! document whose heads moved since it was checked (a feed or another device wrote meanwhile);
//! the session then checks the batch again (see `session`).

use std::collections::HashSet;

use care_node::chunk::{ChunkError, change_size};
use care_node::policy::{MAX_CHANGE_BYTES, MAX_DOCUMENT_BYTES, Refusal, Rule, Writer};
use care_node::protocol::DocChanges;
use care_node::summary::{PatientId, PatientSummary};

use crate::domain::limits::Limits;
use crate::store::{CheckedChanges, DeviceRecord, ServerStore, StoreError, UploadError};

/// The changes of a batch that passed, by document, with what was refused.
#[derive(Debug, Default)]
pub struct CheckedUpload {
    pub accepted: Vec<CheckedChanges>,
    pub refused: Vec<RefusedUpload>,
}

/// A document's changes refused by a rule, kept whole for the quarantine.
#[derive(Debug)]
pub struct RefusedUpload {
    pub doc: PatientId,
    pub refusal: Refusal,
    pub changes: Vec<Vec<u8>>,
}

/// Checks a batch from `device`, which may write only to `writable` (held and in scope).
pub fn check(
    store: &dyn ServerStore,
    device: &DeviceRecord,
    docs: &[DocChanges],
    writable: &HashSet<PatientId>,
    limits: &Limits,
) -> Result<CheckedUpload, UploadError> {
    let changes: usize = docs.iter().map(|d| d.changes.len()).sum();
    if docs.len() > limits.upload_docs || changes > limits.upload_changes {
        return Err(UploadError::TooMany { docs: docs.len(), changes, limits: *limits });
    }
    let key = device.public_key.ok_or_else(|| StoreError::UnknownDevice(device.name.clone()))?;
    let writer = Writer { actor: &key, device_name: &device.name, role: device.role.as_str() };
    // A batch may name a document more than once (changes in outbox order): judge each
    // document's changes together, in order.
    let mut grouped: Vec<(PatientId, Vec<&[u8]>)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for doc in docs {
        let at = *index.entry(doc.doc).or_insert_with(|| {
            grouped.push((doc.doc, Vec::new()));
            grouped.len() - 1
        });
        grouped[at].1.extend(doc.changes.iter().map(|c| c.as_slice()));
    }
    let mut out = CheckedUpload::default();
    for (doc, changes) in grouped {
        match check_doc(store, &doc, &changes, writable, &writer)? {
            Ok(Some((changes, checked_at))) => out.accepted.push(CheckedChanges { doc, changes, checked_at }),
            Ok(None) => {} // everything in it was already applied
            Err(refusal) => out.refused.push(RefusedUpload {
                doc,
                refusal,
                changes: changes.iter().map(|c| c.to_vec()).collect(),
            }),
        }
    }
    Ok(out)
}

/// What passed for one document: the new changes and the heads they were checked against.
type Passed = Option<(Vec<automerge::Change>, Vec<automerge::ChangeHash>)>;

/// One document's changes: the new ones if they pass, the refusal if not.
fn check_doc(
    store: &dyn ServerStore,
    doc: &PatientId,
    uploaded: &[&[u8]],
    writable: &HashSet<PatientId>,
    writer: &Writer<'_>,
) -> Result<Result<Passed, Refusal>, StoreError> {
    let refuse = |rule| Ok(Err(Refusal::new(rule)));
    if !writable.contains(doc) {
        return refuse(Rule::NotInScope);
    }
    let mut changes = Vec::with_capacity(uploaded.len());
    for bytes in uploaded {
        match change_size(bytes, MAX_CHANGE_BYTES) {
            Ok(_) => {}
            Err(ChunkError::TooLarge { .. } | ChunkError::TooManyItems { .. }) => {
                return refuse(Rule::TooLarge);
            }
            Err(_) => return refuse(Rule::Malformed),
        }
        // Automerge's parse panics on some malformed columns (found by fuzzing).
        match std::panic::catch_unwind(|| automerge::Change::try_from(*bytes)) {
            Ok(Ok(change)) => changes.push(change),
            _ => return refuse(Rule::Malformed),
        }
    }
    let Some(saved) = store.load_document(doc)? else { return refuse(Rule::NotInScope) };
    let mut summary = PatientSummary::load(&saved)
        .map_err(|e| StoreError::Document(care_node::identity::short_hex(doc.as_bytes()), Box::new(e)))?;
    let before = summary.heads();
    let new: Vec<_> = changes.into_iter().filter(|c| !summary.has_change(&c.hash())).collect();
    if new.is_empty() {
        return Ok(Ok(None));
    }
    // Authorship first: a change by another actor is not even applied to the copy.
    if new.iter().any(|c| c.actor_id().to_bytes() != writer.actor) {
        return refuse(Rule::ForeignActor);
    }
    // Automerge 0.12 panics on some malformed changes, while applying them or reading the
    // document afterwards (found by fuzzing, docs/security.md): on this copy, a panic is just a
    // malformed upload.
    let judged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), Refusal> {
        summary.apply_changes(new.clone()).map_err(|_| Refusal::new(Rule::Malformed))?;
        if summary.has_missing_deps() {
            return Err(Refusal::new(Rule::MissingDependencies));
        }
        summary.check_writes(&before, &new, writer)?;
        if summary.save().len() > MAX_DOCUMENT_BYTES {
            return Err(Refusal::new(Rule::TooLarge));
        }
        Ok(())
    }));
    match judged {
        Ok(Ok(())) => {}
        Ok(Err(refusal)) => return Ok(Err(refusal)),
        Err(_) => return refuse(Rule::Malformed),
    }
    Ok(Ok(Some((new, before))))
}

/// The documents `device` may write to now: those it holds that are in its scope, and those it
/// holds that an operator merged into another record (their late entries are carried over to the
/// kept record; see `session`).
pub fn writable(store: &dyn ServerStore, device: i64, now_ms: i64) -> Result<HashSet<PatientId>, StoreError> {
    let scope: HashSet<PatientId> =
        crate::domain::scope::device_scope(store, device, now_ms)?.patients.into_iter().collect();
    let mut held = store.held(device)?;
    let leaving: Vec<PatientId> = held.iter().filter(|p| !scope.contains(p)).copied().collect();
    for patient in leaving {
        let merged = match store.load_document(&patient)? {
            Some(saved) => {
                PatientSummary::load(&saved).ok().and_then(|s| s.merged_into().ok().flatten()).is_some()
            }
            None => false,
        };
        if !merged {
            held.remove(&patient);
        }
    }
    Ok(held)
}
