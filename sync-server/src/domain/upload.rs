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
use care_node::policy::{MAX_CHANGE_BYTES, MAX_DOCUMENT_BYTES, MAX_DOCUMENT_GROWTH, Refusal, Rule, Writer};
use care_node::protocol::DocChanges;
use care_node::summary::{PatientId, PatientSummary};

use crate::domain::device::DeviceRecord;
use crate::domain::limits::Limits;

/// A device's changes to one document that passed the write policy, and the document's heads
/// they were checked against.
#[derive(Debug, Clone)]
pub struct CheckedChanges {
    pub doc: PatientId,
    pub changes: Vec<automerge::Change>,
    pub checked_at: Vec<automerge::ChangeHash>,
}

/// Why a batch could not be judged (nothing of it is committed; the device keeps it). `E` is
/// the error of whatever loads the stored documents.
#[derive(Debug)]
pub enum CheckError<E> {
    /// Over the batch's bounds: the session ends.
    TooMany { docs: usize, changes: usize, limits: Limits },
    /// The device has no key on record (never enrolled): named.
    NoKey(String),
    /// A stored document does not load.
    Unreadable(PatientId, Box<care_node::summary::SummaryError>),
    /// Loading a stored document failed.
    Load(E),
}

impl<E> From<E> for CheckError<E> {
    fn from(e: E) -> Self {
        CheckError::Load(e)
    }
}

/// The changes of a batch that passed, by document, with what was refused.
#[derive(Debug, Default)]
pub struct CheckedUpload {
    pub accepted: Vec<CheckedChanges>,
    pub refused: Vec<RefusedUpload>,
}

/// A document's changes refused by a rule: only those the server did not have, kept for the
/// quarantine (except unparseable or oversized bytes, which are counted, not kept).
#[derive(Debug)]
pub struct RefusedUpload {
    pub doc: PatientId,
    pub refusal: Refusal,
    pub changes: Vec<RefusedChange>,
}

/// Checks a batch from `device`, which may write only to `writable` (held and in scope).
pub fn check<E>(
    mut load: impl FnMut(&PatientId) -> Result<Option<Vec<u8>>, E>,
    device: &DeviceRecord,
    docs: &[DocChanges],
    writable: &HashSet<PatientId>,
    limits: &Limits,
) -> Result<CheckedUpload, CheckError<E>> {
    let changes: usize = docs.iter().map(|d| d.changes.len()).sum();
    let distinct = docs.iter().map(|d| d.doc).collect::<HashSet<_>>().len();
    if distinct > limits.upload_docs || docs.len() > limits.upload_changes || changes > limits.upload_changes
    {
        return Err(CheckError::TooMany { docs: distinct, changes, limits: *limits });
    }
    let key = device.public_key.ok_or_else(|| CheckError::NoKey(device.name.clone()))?;
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
        match check_doc(&mut load, &doc, &changes, writable, &writer)? {
            Judged::Passed(changes, checked_at) => {
                out.accepted.push(CheckedChanges { doc, changes, checked_at })
            }
            Judged::Nothing => {} // everything in it was already applied
            Judged::Refused(refusal, changes) => out.refused.push(RefusedUpload { doc, refusal, changes }),
        }
    }
    Ok(out)
}

/// What became of one document's uploaded changes.
enum Judged {
    /// The new changes passed; the heads they were checked against.
    Passed(Vec<automerge::Change>, Vec<automerge::ChangeHash>),
    /// Nothing new: every change was already applied (a resend after a lost acknowledgement).
    Nothing,
    /// Refused: only the changes the server does not have (never one it already accepted).
    Refused(Refusal, Vec<RefusedChange>),
}

/// One refused change: its bytes as uploaded and, when it parses, its hash.
#[derive(Debug, Clone)]
pub struct RefusedChange {
    pub bytes: Vec<u8>,
    pub hash: Option<automerge::ChangeHash>,
}

/// One document's changes, judged.
fn check_doc<E>(
    load: &mut impl FnMut(&PatientId) -> Result<Option<Vec<u8>>, E>,
    doc: &PatientId,
    uploaded: &[&[u8]],
    writable: &HashSet<PatientId>,
    writer: &Writer<'_>,
) -> Result<Judged, CheckError<E>> {
    // Parse what can be parsed (bounded first); what cannot is refused with the rest.
    let mut parsed = Vec::with_capacity(uploaded.len());
    let mut broken: Option<Rule> = None;
    let mut unparsed = Vec::new();
    for bytes in uploaded {
        let rule = match change_size(bytes, MAX_CHANGE_BYTES) {
            Ok(_) => match std::panic::catch_unwind(|| automerge::Change::try_from(*bytes)) {
                // Automerge's parse panics on some malformed columns (found by fuzzing).
                Ok(Ok(change)) => {
                    parsed.push(change);
                    continue;
                }
                _ => Rule::Malformed,
            },
            Err(ChunkError::TooLarge { .. } | ChunkError::TooManyItems { .. }) => Rule::TooLarge,
            Err(_) => Rule::Malformed,
        };
        broken.get_or_insert(rule);
        // Not kept whole: a refused bomb or junk costs the quarantine nothing.
        unparsed.push(RefusedChange { bytes: Vec::new(), hash: None });
    }
    let refused = |rule, new: &[automerge::Change], unparsed: &[RefusedChange]| {
        let mut changes: Vec<RefusedChange> = new
            .iter()
            .map(|c| RefusedChange { bytes: c.raw_bytes().to_vec(), hash: Some(c.hash()) })
            .collect();
        changes.extend_from_slice(unparsed);
        Ok(Judged::Refused(Refusal::new(rule), changes))
    };
    let Some(saved) = load(doc)? else { return refused(Rule::NotInScope, &parsed, &unparsed) };
    let mut summary = PatientSummary::load(&saved).map_err(|e| CheckError::Unreadable(*doc, Box::new(e)))?;
    let before = summary.heads();
    // What the server already has is settled, whatever else is wrong with the batch.
    let new: Vec<_> = parsed.into_iter().filter(|c| !summary.has_change(&c.hash())).collect();
    if let Some(rule) = broken {
        return refused(rule, &new, &unparsed);
    }
    if new.is_empty() {
        return Ok(Judged::Nothing);
    }
    if !writable.contains(doc) {
        return refused(Rule::NotInScope, &new, &[]);
    }
    // Authorship first: a change by another actor is not even applied to the copy.
    if new.iter().any(|c| c.actor_id().to_bytes() != writer.actor) {
        return refused(Rule::ForeignActor, &new, &[]);
    }
    // Automerge 0.12 panics on some malformed changes, while applying them or reading the
    // document afterwards (found by fuzzing, docs/security.md): on this copy, a panic is just a
    // malformed upload.
    let judged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), Refusal> {
        summary.apply_changes(new.clone()).map_err(|_| Refusal::new(Rule::Malformed))?;
        if summary.has_missing_deps() {
            return Err(Refusal::new(Rule::MissingDependencies));
        }
        care_node::policy::check_summary(&mut summary, &before, &new, writer)?;
        // A device's changes may grow a record only so far, and never past what a frame carries.
        let size = summary.save().len();
        if size > MAX_DOCUMENT_BYTES || size > saved.len() + MAX_DOCUMENT_GROWTH {
            return Err(Refusal::new(Rule::TooLarge));
        }
        Ok(())
    }));
    match judged {
        Ok(Ok(())) => Ok(Judged::Passed(new, before)),
        Ok(Err(refusal)) => {
            let changes =
                new.iter().map(|c| RefusedChange { bytes: c.raw_bytes().to_vec(), hash: Some(c.hash()) });
            Ok(Judged::Refused(refusal, changes.collect()))
        }
        Err(_) => refused(Rule::Malformed, &new, &[]),
    }
}
