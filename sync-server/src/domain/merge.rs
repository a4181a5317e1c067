//! Merging two records of one person (an operator's decision, never automatic): when it may be
//! done, and the changes that do it. A backend loads both documents in one transaction, calls
//! [`merge`], and commits its changes with the caseload move and the audit line.

use automerge::{ActorId, Change};
use care_node::summary::{PatientId, PatientSummary, Provenance, SummaryError};

/// Why a merge was not done.
#[derive(Debug)]
pub enum MergeError {
    /// The merge is not allowed; the reason is for the operator (it names no patient).
    Refused(&'static str),
    /// One of the two documents does not read.
    Document(PatientId, Box<SummaryError>),
}

/// The changes a merge makes, in the order they must be logged: the merged record's first
/// (it gives its NHS number up, so the kept one may take it), then the kept record's.
pub struct Merge {
    pub merged_changes: Vec<Change>,
    pub kept_changes: Vec<Change>,
    pub entries_moved: usize,
}

/// Refused before anything is read: a record merged into itself.
pub fn check_pair(keep: &PatientId, merged: &PatientId) -> Result<(), MergeError> {
    if keep == merged {
        return Err(MergeError::Refused("a record cannot be merged into itself"));
    }
    Ok(())
}

/// Merges `gone` (record `merged`) into `kept` (record `keep`): `kept` absorbs every entry, as
/// the server's `actor` for `operator`; `gone` is marked merged into `keep`. Merging again into
/// the same record (a retried command) moves only what is new.
pub fn merge(
    keep: &PatientId,
    kept: &mut PatientSummary,
    merged: &PatientId,
    gone: &mut PatientSummary,
    actor: &ActorId,
    operator: &str,
    now_ms: i64,
) -> Result<Merge, MergeError> {
    check_pair(keep, merged)?;
    let on = |id: &PatientId| {
        let id = *id;
        move |e| MergeError::Document(id, Box::new(e))
    };
    if kept.merged_into().map_err(on(keep))?.is_some() {
        return Err(MergeError::Refused("the record to keep was itself merged away"));
    }
    let already = gone.merged_into().map_err(on(merged))?;
    if already.is_some_and(|into| into != *keep) {
        return Err(MergeError::Refused("that record was already merged into another one"));
    }
    let (a, b) = (kept.demographics().map_err(on(keep))?, gone.demographics().map_err(on(merged))?);
    if let (Some(x), Some(y)) = (&a.nhs_number, &b.nhs_number)
        && x != y
    {
        return Err(MergeError::Refused("the two records have different NHS numbers"));
    }
    kept.set_actor(actor.to_bytes());
    gone.set_actor(actor.to_bytes());
    let (kept_before, gone_before) = (kept.heads(), gone.heads());
    let mut provenance = Provenance::new("server", "regional server", "server", now_ms);
    provenance.clock_offset_ms = Some(0);
    provenance.person = Some(operator.to_string());
    if already.is_none() {
        gone.mark_merged_into(*keep, now_ms).map_err(on(merged))?;
    }
    let entries_moved = kept.absorb(gone, &provenance).map_err(on(keep))?;
    Ok(Merge {
        merged_changes: gone.changes_since(&gone_before),
        kept_changes: kept.changes_since(&kept_before),
        entries_moved,
    })
}

/// The audit line's detail (opaque ids and counts only).
pub fn audit_detail(merged: &PatientId, entries_moved: usize, caseloads_moved: usize) -> String {
    format!(
        "merged record {} into this one; {entries_moved} entries moved; {caseloads_moved} caseload(s) moved",
        care_node::identity::short_hex(merged.as_bytes())
    )
}
