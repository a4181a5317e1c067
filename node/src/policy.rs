//! The write policy: what a device may do to a patient document. One table, read by both
//! halves: the server checks every uploaded change with [`check`] before anything is committed,
//! and the device checks its own edits with the same function before it stores them, so a
//! well-behaved device never produces a change the server refuses.
//!
//! Over 600 lines because it is the whole table, every rule in one place (and about 230 lines
//! are its tests): split, there would be two places to read what a device may write.
//!
//! A device may, on a patient it holds:
//! - **add** a new entry to a clinical section its role may write ([`sections_for_role`]), under a
//!   fresh entry id, with provenance naming itself (its key, enrolled name and role);
//! - **mark** an entry it recorded itself as entered-in-error, with a reason (the marker, like
//!   every provenance, is never changed afterwards);
//! - **edit** an entry it recorded itself, within [`EDIT_WINDOW_MS`] of recording it (after that,
//!   mark it entered-in-error and record it again);
//! - **assert** "none known" for a required section (allergies, medications, problems), with its
//!   own provenance; entries always win over such an assertion;
//! - **name itself** once in the document's `actors` map, as enrolled.
//!
//! Everything else is refused: demographics, identity (`patient_id`, `merged_into`, the NHS
//! number), the schema version, the section maps themselves, another author's entries (GP and
//! hospital facts included), provenance and entered-in-error markers once written, deletions of
//! any kind, changes by another actor, and changes larger than [`MAX_CHANGE_BYTES`].
//!
//! The check reads the document *after* the changes were applied to a copy, and the heads from
//! *before* them: each operation's target is resolved to its path in the document, and anything
//! the batch created itself is judged by the operation that created it.

use std::collections::HashSet;

use automerge::legacy::{Key, ObjectId, OpType};
use automerge::{ActorId, AutoCommit, Change, ChangeHash, ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value};

use crate::summary::{ENTERED_IN_ERROR, Section};

/// How long after recording an entry its author may still edit it (24 hours: a long shift and a
/// margin). Measured between the two changes' own times, both from the author's clock.
pub const EDIT_WINDOW_MS: i64 = 24 * 3600 * 1000;
/// The largest change a device may send, once inflated.
pub const MAX_CHANGE_BYTES: usize = 256 * 1024;
/// The most operations one change may hold.
pub const MAX_OPS_PER_CHANGE: usize = 20_000;
/// The largest a patient document may become through a device's changes (saved size). Below a
/// frame ([`crate::protocol::MAX_FRAME_LEN`]), so the server never stores what it cannot send.
pub const MAX_DOCUMENT_BYTES: usize = 6 * 1024 * 1024;
/// How much one upload of a device's changes may grow a document (saved size): a large record
/// from the feeds still takes a device's entries; a device cannot bloat it.
pub const MAX_DOCUMENT_GROWTH: usize = 1024 * 1024;

/// Which rule a refused change broke. The names are stable: they appear in the protocol, the
/// quarantine and the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rule {
    /// The change is authored by another actor than the device sending it.
    ForeignActor,
    /// The change deletes something.
    Deletes,
    /// The change is too large, or would make the document too large.
    TooLarge,
    /// The bytes are not a valid change.
    Malformed,
    /// The change touches the patient's identity (`patient_id`, `merged_into`, schema version).
    Identity,
    /// The change touches the demographics (name, NHS number, date of birth, address).
    Demographics,
    /// The change touches the document's structure (section maps, unknown keys).
    Structure,
    /// The change edits or marks an entry another author recorded.
    ForeignEntry,
    /// The change edits the device's own entry after the edit window.
    EditWindow,
    /// The change adds an entry to a section the device's role may not write.
    SectionNotForRole,
    /// The change rewrites provenance or an entered-in-error marker.
    Immutable,
    /// The provenance of a new entry, marker or assertion does not name the device.
    Provenance,
    /// An entered-in-error marker without a reason.
    NoReason,
    /// The device does not hold the document, or the patient is no longer in its scope.
    NotInScope,
    /// The changes depend on changes the server does not have.
    MissingDependencies,
}

impl Rule {
    pub const ALL: [Rule; 15] = [
        Rule::ForeignActor,
        Rule::Deletes,
        Rule::TooLarge,
        Rule::Malformed,
        Rule::Identity,
        Rule::Demographics,
        Rule::Structure,
        Rule::ForeignEntry,
        Rule::EditWindow,
        Rule::SectionNotForRole,
        Rule::Immutable,
        Rule::Provenance,
        Rule::NoReason,
        Rule::NotInScope,
        Rule::MissingDependencies,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::ForeignActor => "foreign-actor",
            Rule::Deletes => "deletes",
            Rule::TooLarge => "too-large",
            Rule::Malformed => "malformed",
            Rule::Identity => "identity",
            Rule::Demographics => "demographics",
            Rule::Structure => "structure",
            Rule::ForeignEntry => "foreign-entry",
            Rule::EditWindow => "edit-window",
            Rule::SectionNotForRole => "section-not-for-role",
            Rule::Immutable => "immutable",
            Rule::Provenance => "provenance",
            Rule::NoReason => "no-reason",
            Rule::NotInScope => "not-in-scope",
            Rule::MissingDependencies => "missing-dependencies",
        }
    }

    pub fn parse(s: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// One line for a clinician or an operator.
    pub fn explain(self) -> &'static str {
        match self {
            Rule::ForeignActor => "the change is authored by another device",
            Rule::Deletes => "clinical facts are marked entered-in-error, never deleted",
            Rule::TooLarge => "the change is too large",
            Rule::Malformed => "the change is not a valid Automerge change",
            Rule::Identity => "only an operator changes a patient's identity or merges records",
            Rule::Demographics => "demographics come from the patient's GP record and feeds only",
            Rule::Structure => "the change alters the record's structure",
            Rule::ForeignEntry => {
                "an entry may be edited or marked in error only by the device that recorded it"
            }
            Rule::EditWindow => {
                "the edit window has passed: mark the entry entered-in-error and record it again"
            }
            Rule::SectionNotForRole => "this device's role may not record entries in that section",
            Rule::Immutable => "provenance and entered-in-error markers are never rewritten",
            Rule::Provenance => "the provenance must name the recording device as enrolled",
            Rule::NoReason => "marking an entry entered-in-error needs a reason",
            Rule::NotInScope => "the patient is not in this device's scope",
            Rule::MissingDependencies => "the change builds on a change the server does not have",
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused change: the rule, and where in the document (opaque ids only, never content).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused by rule `{rule}`: {} ({})", rule.explain(), self.place())]
pub struct Refusal {
    pub rule: Rule,
    pub section: Option<Section>,
    /// The entry's id (a UUID), when the change touched one.
    pub entry: Option<String>,
}

impl Refusal {
    pub fn new(rule: Rule) -> Self {
        Self { rule, section: None, entry: None }
    }

    fn at(rule: Rule, section: Section, entry: &str) -> Self {
        Self { rule, section: Some(section), entry: Some(entry.to_string()) }
    }

    /// Where the refused change wrote, e.g. `alerts/1b4e…`; `document` when not in an entry.
    pub fn place(&self) -> String {
        match (&self.section, &self.entry) {
            (Some(s), Some(e)) => format!("{}/{e}", s.key()),
            (Some(s), None) => s.key().to_string(),
            _ => "document".into(),
        }
    }
}

/// The device whose changes are checked, as the server enrolled it.
#[derive(Debug, Clone, Copy)]
pub struct Writer<'a> {
    /// Its Automerge actor: its 32-byte public key.
    pub actor: &'a [u8],
    pub device_name: &'a str,
    pub role: &'a str,
}

/// The sections a role may add entries to. Unknown roles may write nothing.
pub fn sections_for_role(role: &str) -> &'static [Section] {
    match role {
        // Crews record what they find and do; care plans are the community team's.
        "ambulance-crew" => &[
            Section::Alerts,
            Section::Allergies,
            Section::Medications,
            Section::Problems,
            Section::Contacts,
            Section::Encounters,
            Section::Results,
        ],
        "community-nurse" => &Section::ALL,
        _ => &[],
    }
}

/// What a batch created that is judged after it was applied.
enum Created {
    Entry(Section, String),
    Marker(Section, String),
    Status(Section, String),
    Actor(String),
    Assertion(Section),
    /// An entry of its own the device edited.
    Edited(Section, String),
}

/// [`check`] on a patient summary: its changes, already applied, against the policy; `before`
/// are the document's heads from before them.
pub fn check_summary(
    summary: &mut crate::summary::PatientSummary,
    before: &[ChangeHash],
    changes: &[Change],
    writer: &Writer<'_>,
) -> Result<(), Refusal> {
    check(summary.doc_mut(), before, changes, writer)
}

/// Checks `changes` by `writer`, already applied to `doc`, whose state before them was
/// `before`. Cheap checks first: authorship, size and deletions, then each operation's target.
pub fn check(
    doc: &mut AutoCommit,
    before: &[ChangeHash],
    changes: &[Change],
    writer: &Writer<'_>,
) -> Result<(), Refusal> {
    let actor = ActorId::from(writer.actor);
    let batch: HashSet<ChangeHash> = changes.iter().map(|c| c.hash()).collect();
    // The actor's operations before this batch: a change must start above them, so that its
    // operation ids can never be taken for objects the device made earlier.
    let prior_max = doc
        .get_changes(&[])
        .iter()
        .filter(|c| c.actor_id() == &actor && !batch.contains(&c.hash()))
        .map(|c| c.max_op())
        .max()
        .unwrap_or(0);
    for change in changes {
        if change.actor_id() != &actor {
            return Err(Refusal::new(Rule::ForeignActor));
        }
        if change.raw_bytes().len() > MAX_CHANGE_BYTES || change.len() > MAX_OPS_PER_CHANGE {
            return Err(Refusal::new(Rule::TooLarge));
        }
        if change.start_op().get() <= prior_max {
            return Err(Refusal::new(Rule::Structure));
        }
    }
    // Objects this batch made: judged by the operation that made them.
    let mut made: HashSet<(u64, ActorId)> = HashSet::new();
    let mut decoded = Vec::with_capacity(changes.len());
    for change in changes {
        let expanded = change.decode();
        for (i, op) in expanded.operations.iter().enumerate() {
            if matches!(op.action, OpType::Make(_)) {
                made.insert((change.start_op().get() + i as u64, actor.clone()));
            }
        }
        decoded.push((change, expanded));
    }
    let created_here = |counter: u64, by: &ActorId| made.contains(&(counter, by.clone()));
    // Operations of this batch by (object, key): with the values there before the batch, the
    // only predecessors an operation may name.
    let mut batch_at = std::collections::HashMap::new();
    let mut created = Vec::new();
    let mut checked_objects: HashSet<(u64, Vec<u8>)> = HashSet::new();
    for (change, expanded) in &decoded {
        let change = *change;
        for (i, op) in expanded.operations.iter().enumerate() {
            if matches!(
                op.action,
                OpType::Delete | OpType::MarkBegin(_) | OpType::MarkEnd(_) | OpType::Increment(_)
            ) {
                return Err(Refusal::new(Rule::Deletes));
            }
            let op_id = (change.start_op().get() + i as u64, actor.clone());
            check_preds(doc, before, op, &created_here, &mut batch_at, op_id)?;
            let Key::Map(key) = &op.key else {
                // List and text insertions are allowed only inside objects this batch created.
                match &op.obj {
                    ObjectId::Id(id) if created_here(id.0, &id.1) => continue,
                    _ => return Err(Refusal::new(Rule::Structure)),
                }
            };
            let target = match &op.obj {
                ObjectId::Root => {
                    return Err(Refusal::new(match key.as_str() {
                        "demographics" => Rule::Demographics,
                        "patient_id" | "merged_into" | "schema_version" => Rule::Identity,
                        _ => Rule::Structure,
                    }));
                }
                ObjectId::Id(id) if created_here(id.0, &id.1) => continue,
                obj => object_in(obj),
            };
            let path = path_of(doc, &target)?;
            let object_key = match &target {
                ObjId::Id(counter, actor, _) => (*counter, actor.to_bytes().to_vec()),
                ObjId::Root => (0, Vec::new()),
            };
            let first_visit = checked_objects.insert(object_key);
            if let Some(c) =
                judge(doc, before, &path, &target, key.as_str(), &op.action, change, writer, first_visit)?
            {
                created.push(c);
            }
        }
    }
    let mut seen = HashSet::new();
    for c in created {
        if let Created::Edited(section, key) = &c
            && !seen.insert((*section, key.clone()))
        {
            continue;
        }
        check_created(doc, &c, writer)?;
    }
    Ok(())
}

/// Every predecessor an operation names must be a value at the same object and key: one that was
/// there before the batch, or an earlier operation of the batch there. Anything else would let a
/// put at a fresh key silently overwrite (delete) another author's value elsewhere.
fn check_preds(
    doc: &AutoCommit,
    before: &[ChangeHash],
    op: &automerge::legacy::Op,
    created_here: &dyn Fn(u64, &ActorId) -> bool,
    batch_at: &mut std::collections::HashMap<(String, String), Vec<(u64, ActorId)>>,
    op_id: (u64, ActorId),
) -> Result<(), Refusal> {
    let obj_name = match &op.obj {
        ObjectId::Root => "root".to_string(),
        ObjectId::Id(id) => format!("{}@{}", id.0, id.1),
    };
    let Key::Map(key) = &op.key else {
        // List and text operations: only inside objects of this batch, on elements of this batch.
        return if op
            .pred
            .iter()
            .all(|p| created_here(p.0, &p.1) || batch_at.values().any(|v| v.contains(&(p.0, p.1.clone()))))
        {
            Ok(())
        } else {
            Err(Refusal::new(Rule::Deletes))
        };
    };
    let slot = (obj_name, key.to_string());
    let earlier = batch_at.entry(slot).or_default();
    let existing: Vec<(u64, Vec<u8>)> = match &op.obj {
        ObjectId::Id(id) if created_here(id.0, &id.1) => Vec::new(),
        _ => doc
            .get_all_at(object_in(&op.obj), key.as_str(), before)
            .map_err(|_| Refusal::new(Rule::Structure))?
            .into_iter()
            .filter_map(|(_, id)| match id {
                ObjId::Id(c, a, _) => Some((c, a.to_bytes().to_vec())),
                ObjId::Root => None,
            })
            .collect(),
    };
    for pred in op.pred.iter() {
        let known = existing.iter().any(|(c, a)| *c == pred.0 && a.as_slice() == pred.1.to_bytes())
            || earlier.contains(&(pred.0, pred.1.clone()));
        if !known {
            return Err(Refusal::new(Rule::Deletes));
        }
    }
    earlier.push(op_id);
    Ok(())
}

/// A change's object reference as the document's id (Automerge finds it by actor, not index).
fn object_in(obj: &ObjectId) -> ObjId {
    match obj {
        ObjectId::Root => automerge::ROOT,
        ObjectId::Id(id) => ObjId::Id(id.0, id.1.clone(), usize::MAX),
    }
}

/// The keys from the root down to `obj` (the root's own key first).
fn path_of(doc: &AutoCommit, obj: &ObjId) -> Result<Vec<(ObjId, String)>, Refusal> {
    let parents = doc.parents(obj).map_err(|_| Refusal::new(Rule::Structure))?;
    let mut path = Vec::new();
    for parent in parents {
        let Prop::Map(key) = parent.prop else { return Err(Refusal::new(Rule::Structure)) };
        path.push((parent.obj, key));
    }
    path.reverse();
    if path.is_empty() {
        return Err(Refusal::new(Rule::Structure));
    }
    Ok(path)
}

/// Judges one operation on an object that existed before the batch, at `path` (root first).
#[allow(clippy::too_many_arguments)]
fn judge(
    doc: &mut AutoCommit,
    before: &[ChangeHash],
    path: &[(ObjId, String)],
    target: &ObjId,
    key: &str,
    action: &OpType,
    change: &Change,
    writer: &Writer<'_>,
    first_visit: bool,
) -> Result<Option<Created>, Refusal> {
    let root_key = path[0].1.as_str();
    match (root_key, path.len()) {
        ("actors", 1) => {
            let own = hex(writer.actor);
            if key == own
                && matches!(action, OpType::Make(ObjType::Map))
                && !existed(doc, target, key, before)
            {
                Ok(Some(Created::Actor(own)))
            } else {
                Err(Refusal::new(Rule::Structure))
            }
        }
        ("assertions", 1) => match Section::from_key(key) {
            Some(section) if section.requires_assertion() && matches!(action, OpType::Make(ObjType::Map)) => {
                Ok(Some(Created::Assertion(section)))
            }
            _ => Err(Refusal::new(Rule::Structure)),
        },
        ("demographics", _) => Err(Refusal::new(Rule::Demographics)),
        _ => {
            let Some(section) = Section::from_key(root_key) else {
                return Err(Refusal::new(Rule::Structure));
            };
            if path.len() == 1 {
                // A new entry in the section map.
                // A device's entries have random (v4) ids; derived (v5) ids belong to the feeds'
                // sources, so a device cannot claim a GP entry's id before it is imported.
                let random = uuid::Uuid::parse_str(key).is_ok_and(|u| u.get_version_num() == 4);
                if !matches!(action, OpType::Make(ObjType::Map)) || !random {
                    return Err(Refusal::at(Rule::Structure, section, key));
                }
                if existed(doc, target, key, before) {
                    return Err(Refusal::at(Rule::ForeignEntry, section, key));
                }
                if !sections_for_role(writer.role).contains(&section) {
                    return Err(Refusal::at(Rule::SectionNotForRole, section, key));
                }
                return Ok(Some(Created::Entry(section, key.to_string())));
            }
            let entry_key = path[1].1.as_str();
            let refuse = |rule| Err(Refusal::at(rule, section, entry_key));
            let (entry_obj, entry_author) = match entry_object(doc, &path[1].0, entry_key) {
                Some(found) => found,
                None => return refuse(Rule::Structure),
            };
            if entry_author != writer.actor {
                return refuse(Rule::ForeignEntry);
            }
            let field = if path.len() == 2 { key } else { path[2].1.as_str() };
            if field == "provenance" || (field == "entered_in_error" && path.len() > 2) {
                return refuse(Rule::Immutable);
            }
            if path.len() == 2 && key == "entered_in_error" {
                if existed(doc, target, key, before) {
                    return refuse(Rule::Immutable);
                }
                return match action {
                    OpType::Make(ObjType::Map) => Ok(Some(Created::Marker(section, entry_key.to_string()))),
                    _ => refuse(Rule::Structure),
                };
            }
            if path.len() == 2
                && key == "verification_status"
                && matches!(action, OpType::Put(ScalarValue::Str(s)) if s.as_str() == ENTERED_IN_ERROR)
            {
                return Ok(Some(Created::Status(section, entry_key.to_string())));
            }
            // An edit of its own entry: within the window from the change that created it.
            if first_visit || path.len() == 2 {
                let created_s = doc
                    .hash_for_opid(&entry_obj)
                    .and_then(|h| doc.get_change_meta_by_hash(&h).map(|m| m.timestamp))
                    .ok_or_else(|| Refusal::at(Rule::Structure, section, entry_key))?;
                if change.timestamp().saturating_sub(created_s).saturating_mul(1000) > EDIT_WINDOW_MS {
                    return refuse(Rule::EditWindow);
                }
            }
            Ok(Some(Created::Edited(section, entry_key.to_string())))
        }
    }
}

/// The entry's object and the actor that created it.
fn entry_object(doc: &AutoCommit, section: &ObjId, key: &str) -> Option<(ObjId, Vec<u8>)> {
    match doc.get(section, key).ok()? {
        Some((Value::Object(ObjType::Map), ObjId::Id(counter, actor, index))) => {
            let author = actor.to_bytes().to_vec();
            Some((ObjId::Id(counter, actor, index), author))
        }
        _ => None,
    }
}

fn existed(doc: &AutoCommit, obj: &ObjId, key: &str, before: &[ChangeHash]) -> bool {
    !doc.get_all_at(obj, key, before).map(|v| v.is_empty()).unwrap_or(true)
}

/// Checks what the batch created, in the document as it now stands.
fn check_created(doc: &AutoCommit, created: &Created, writer: &Writer<'_>) -> Result<(), Refusal> {
    let device = crate::identity::short_hex(writer.actor);
    let names_writer = |obj: &ObjId| -> bool {
        matches!(text_at(doc, obj, "device"), Some(d) if d == device)
            && matches!(text_at(doc, obj, "device_name"), Some(n) if n == writer.device_name)
            && matches!(text_at(doc, obj, "role"), Some(r) if r == writer.role)
    };
    let entry = |section: Section, key: &str| -> Option<ObjId> {
        let section_obj = map_at(doc, &automerge::ROOT, section.key())?;
        map_at(doc, &section_obj, key)
    };
    match created {
        Created::Entry(section, key) => {
            let obj = entry(*section, key).ok_or_else(|| Refusal::at(Rule::Structure, *section, key))?;
            // One provenance, no competing values: a conflict could hide a forged one.
            if doc.get_all(&obj, "provenance").map(|v| v.len()).unwrap_or(0) != 1 {
                return Err(Refusal::at(Rule::Provenance, *section, key));
            }
            match map_at(doc, &obj, "provenance") {
                Some(p) if names_writer(&p) => {}
                _ => return Err(Refusal::at(Rule::Provenance, *section, key)),
            }
            well_formed(doc, *section, key)
        }
        Created::Edited(section, key) => well_formed(doc, *section, key),
        Created::Marker(section, key) => {
            let obj = entry(*section, key).ok_or_else(|| Refusal::at(Rule::Structure, *section, key))?;
            let marker = map_at(doc, &obj, "entered_in_error")
                .ok_or_else(|| Refusal::at(Rule::Structure, *section, key))?;
            if text_at(doc, &marker, "reason").is_none_or(|r| r.trim().is_empty()) {
                return Err(Refusal::at(Rule::NoReason, *section, key));
            }
            match map_at(doc, &marker, "provenance") {
                Some(p) if names_writer(&p) => well_formed(doc, *section, key),
                _ => Err(Refusal::at(Rule::Provenance, *section, key)),
            }
        }
        Created::Status(section, key) => {
            let obj = entry(*section, key).ok_or_else(|| Refusal::at(Rule::Structure, *section, key))?;
            match map_at(doc, &obj, "entered_in_error") {
                Some(_) => Ok(()),
                None => Err(Refusal::at(Rule::NoReason, *section, key)),
            }
        }
        Created::Actor(own) => {
            let actors =
                map_at(doc, &automerge::ROOT, "actors").ok_or_else(|| Refusal::new(Rule::Structure))?;
            let info = map_at(doc, &actors, own).ok_or_else(|| Refusal::new(Rule::Structure))?;
            let named = matches!(text_at(doc, &info, "device_name"), Some(n) if n == writer.device_name)
                && matches!(text_at(doc, &info, "role"), Some(r) if r == writer.role);
            if named { Ok(()) } else { Err(Refusal::new(Rule::Provenance)) }
        }
        Created::Assertion(section) => {
            let assertions =
                map_at(doc, &automerge::ROOT, "assertions").ok_or_else(|| Refusal::new(Rule::Structure))?;
            let obj = map_at(doc, &assertions, section.key()).ok_or_else(|| Refusal::new(Rule::Structure))?;
            match map_at(doc, &obj, "provenance") {
                Some(p)
                    if names_writer(&p) && text_at(doc, &obj, "status").as_deref() == Some("none-known") =>
                {
                    Ok(())
                }
                _ => Err(Refusal { rule: Rule::Provenance, section: Some(*section), entry: None }),
            }
        }
    }
}

/// The entry reads as its section's type (every replica must be able to show it), and no field
/// of it holds competing values written by this device.
fn well_formed(doc: &AutoCommit, section: Section, key: &str) -> Result<(), Refusal> {
    use crate::summary as s;
    let bad = || Refusal::at(Rule::Structure, section, key);
    let section_obj = map_at(doc, &automerge::ROOT, section.key()).ok_or_else(bad)?;
    let reads = match section {
        Section::Alerts => autosurgeon::hydrate_prop::<_, s::Alert, _, _>(doc, &section_obj, key).is_ok(),
        Section::Allergies => {
            autosurgeon::hydrate_prop::<_, s::Allergy, _, _>(doc, &section_obj, key).is_ok()
        }
        Section::Medications => {
            autosurgeon::hydrate_prop::<_, s::Medication, _, _>(doc, &section_obj, key).is_ok()
        }
        Section::Problems => autosurgeon::hydrate_prop::<_, s::Problem, _, _>(doc, &section_obj, key).is_ok(),
        Section::CarePlans => {
            autosurgeon::hydrate_prop::<_, s::CarePlan, _, _>(doc, &section_obj, key).is_ok()
        }
        Section::Contacts => autosurgeon::hydrate_prop::<_, s::Contact, _, _>(doc, &section_obj, key).is_ok(),
        Section::Encounters => {
            autosurgeon::hydrate_prop::<_, s::Encounter, _, _>(doc, &section_obj, key).is_ok()
        }
        Section::Results => autosurgeon::hydrate_prop::<_, s::Report, _, _>(doc, &section_obj, key).is_ok(),
    };
    if !reads {
        return Err(bad());
    }
    if let Some(obj) = map_at(doc, &section_obj, key)
        && map_at(doc, &obj, "entered_in_error").is_some()
        && autosurgeon::hydrate_prop::<_, s::EnteredInError, _, _>(doc, &obj, "entered_in_error").is_err()
    {
        return Err(bad());
    }
    Ok(())
}

fn map_at(doc: &AutoCommit, obj: &ObjId, key: &str) -> Option<ObjId> {
    match doc.get(obj, key).ok()? {
        Some((Value::Object(ObjType::Map), id)) => Some(id),
        _ => None,
    }
}

fn text_at(doc: &AutoCommit, obj: &ObjId, key: &str) -> Option<String> {
    match doc.get(obj, key).ok()? {
        Some((Value::Scalar(s), _)) => s.as_str().map(str::to_string),
        Some((Value::Object(ObjType::Text), id)) => doc.text(&id).ok(),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    crate::identity::hex(bytes)
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;

    use super::*;
    use crate::summary::{self as s, Demographics, PatientSummary, Provenance};

    const KEY: [u8; 32] = [7; 32];
    const OTHER: [u8; 32] = [9; 32];
    const NAME: &str = "ambulance-7";
    const ROLE: &str = "ambulance-crew";
    const T0: i64 = 1_790_000_000_000;

    fn writer() -> Writer<'static> {
        Writer { actor: &KEY, device_name: NAME, role: ROLE }
    }

    fn mine(at_ms: i64) -> Provenance {
        Provenance::new(&crate::identity::short_hex(&KEY), NAME, ROLE, at_ms)
    }

    /// A server-made document with a GP's DNACPR alert; returns it and the alert's id.
    fn record() -> (PatientSummary, s::EntryId) {
        let server = ActorId::from(&[1u8; 16][..]);
        let mut doc = PatientSummary::create(
            uuid::Uuid::new_v4(),
            &Demographics::new("Test Patient", None),
            server,
            T0,
        )
        .unwrap();
        let gp = Provenance::new("server", "GP record", "gp-feed", T0);
        let alert = doc.add(&s::Alert::new(s::alert_kind::RESPECT_DNACPR, "DNACPR", gp)).unwrap();
        (doc, alert)
    }

    /// Runs `edit` as the device on a copy of `doc` and checks what it changed.
    fn as_device(
        doc: &mut PatientSummary,
        actor: &[u8],
        edit: impl FnOnce(&mut PatientSummary),
    ) -> Result<(), Refusal> {
        let mut copy = PatientSummary::load(&doc.save()).unwrap();
        copy.set_actor(actor);
        let before = copy.heads();
        edit(&mut copy);
        let changes = copy.changes_since(&before);
        assert!(!changes.is_empty(), "the edit made a change");
        // Checked as the server does: on a fresh copy with the changes applied.
        let mut server = PatientSummary::load(&doc.save()).unwrap();
        server.apply_changes(changes.clone()).unwrap();
        check_summary(&mut server, &before, &changes, &writer())
    }

    fn rule(result: Result<(), Refusal>) -> Option<Rule> {
        result.err().map(|r| r.rule)
    }

    #[test]
    fn a_device_adds_marks_and_edits_its_own_entries() {
        let (mut doc, _) = record();
        assert_eq!(
            rule(as_device(&mut doc, &KEY, |d| {
                d.add(&s::Allergy::new("Latex", mine(T0))).unwrap();
            })),
            None
        );
        // Its own entry, recorded and then edited and marked in error.
        let mut copy = PatientSummary::load(&doc.save()).unwrap();
        copy.set_actor(&KEY);
        let id = copy.add(&s::Allergy::new("Latex", mine(T0))).unwrap();
        let mut accepted = PatientSummary::load(&copy.save()).unwrap();
        assert_eq!(
            rule(as_device(&mut accepted, &KEY, |d| {
                d.set_field(Section::Allergies, id, "severity", "severe", &mine(T0 + 60_000)).unwrap();
            })),
            None
        );
        assert_eq!(
            rule(as_device(&mut accepted, &KEY, |d| {
                d.mark_entered_in_error(Section::Allergies, id, "wrong patient", &mine(T0 + 60_000)).unwrap();
            })),
            None
        );
        // After the window, an edit is refused but marking in error is still allowed.
        let late = T0 + EDIT_WINDOW_MS + 3_600_000;
        assert_eq!(
            rule(as_device(&mut accepted, &KEY, |d| {
                d.set_field(Section::Allergies, id, "severity", "mild", &mine(late)).unwrap();
            })),
            Some(Rule::EditWindow)
        );
        assert_eq!(
            rule(as_device(&mut accepted, &KEY, |d| {
                d.mark_entered_in_error(Section::Allergies, id, "duplicate", &mine(late)).unwrap();
            })),
            None
        );
        // A marker needs a reason.
        assert_eq!(
            rule(as_device(&mut accepted, &KEY, |d| {
                d.mark_entered_in_error(Section::Allergies, id, "  ", &mine(T0)).unwrap();
            })),
            Some(Rule::NoReason)
        );
    }

    #[test]
    fn a_change_of_more_operations_than_the_bound_is_too_large() {
        let (mut doc, _) = record();
        let allergy = |n: usize| {
            move |d: &mut PatientSummary| {
                // One change of `n` operations: a new entry of its own, with `n - 1` fields.
                let at = d.doc_mut().get(automerge::ROOT, "allergies").unwrap().unwrap().1;
                let entry =
                    d.doc_mut().put_object(&at, uuid::Uuid::new_v4().to_string(), ObjType::Map).unwrap();
                for i in 0..n - 1 {
                    d.doc_mut().put(&entry, format!("f{i}"), "x").unwrap();
                }
                d.doc_mut().commit();
            }
        };
        assert_eq!(rule(as_device(&mut doc, &KEY, allergy(MAX_OPS_PER_CHANGE + 1))), Some(Rule::TooLarge));
        // Just under the bound, the change is judged on its content instead (unknown fields).
        assert_ne!(rule(as_device(&mut doc, &KEY, allergy(MAX_OPS_PER_CHANGE))), Some(Rule::TooLarge));
    }

    #[test]
    fn another_authors_entry_is_neither_edited_nor_marked() {
        let (mut doc, alert) = record();
        assert_eq!(
            rule(as_device(&mut doc, &KEY, |d| {
                d.set_field(Section::Alerts, alert, "status", "inactive", &mine(T0)).unwrap();
            })),
            Some(Rule::ForeignEntry)
        );
        assert_eq!(
            rule(as_device(&mut doc, &KEY, |d| {
                d.mark_entered_in_error(Section::Alerts, alert, "not this patient", &mine(T0)).unwrap();
            })),
            Some(Rule::ForeignEntry)
        );
    }

    #[test]
    fn identity_demographics_and_structure_are_refused() {
        let (mut doc, _) = record();
        assert_eq!(
            rule(as_device(&mut doc, &KEY, |d| {
                d.mark_merged_into(uuid::Uuid::new_v4(), T0).unwrap();
            })),
            Some(Rule::Identity)
        );
        assert_eq!(
            rule(as_device(&mut doc, &KEY, |d| {
                d.set_demographics(&Demographics::new("Someone Else", Some("9990000018")), T0).unwrap();
            })),
            Some(Rule::Demographics)
        );
        assert_eq!(
            rule(as_device(&mut doc, &KEY, |d| {
                d.doc_mut().put(automerge::ROOT, "alerts", "gone").unwrap();
                d.doc_mut().commit();
            })),
            Some(Rule::Structure)
        );
        assert_eq!(
            rule(as_device(&mut doc, &KEY, |d| {
                d.delete_section_for_test(Section::Alerts);
            })),
            Some(Rule::Deletes)
        );
    }

    #[test]
    fn provenance_must_name_the_device_and_the_role_must_allow_the_section() {
        let (mut doc, _) = record();
        let forged = Provenance::new("server", "GP record", "gp-feed", T0);
        assert_eq!(
            rule(as_device(&mut doc, &KEY, |d| {
                d.add(&s::Alert::new(s::alert_kind::RESPECT_DNACPR, "For CPR", forged)).unwrap();
            })),
            Some(Rule::Provenance)
        );
        assert_eq!(
            rule(as_device(&mut doc, &KEY, |d| {
                d.add(&s::CarePlan::new("Plan", mine(T0))).unwrap();
            })),
            Some(Rule::SectionNotForRole)
        );
    }

    #[test]
    fn changes_by_another_actor_are_refused() {
        let (mut doc, _) = record();
        let result = as_device(&mut doc, &OTHER, |d| {
            d.add(&s::Allergy::new("Latex", mine(T0))).unwrap();
        });
        assert_eq!(rule(result), Some(Rule::ForeignActor));
    }

    #[test]
    fn an_entry_no_replica_could_read_is_refused() {
        let (mut doc, _) = record();
        let result = as_device(&mut doc, &KEY, |d| {
            let am = d.doc_mut();
            let (_, section) = am.get(automerge::ROOT, "allergies").unwrap().unwrap();
            let entry = am.put_object(&section, uuid::Uuid::new_v4().to_string(), ObjType::Map).unwrap();
            let p = am.put_object(&entry, "provenance", ObjType::Map).unwrap();
            am.put(&p, "device", crate::identity::short_hex(&KEY)).unwrap();
            am.put(&p, "device_name", NAME).unwrap();
            am.put(&p, "role", ROLE).unwrap();
            am.commit(); // no substance, no recording time: no device could show it
        });
        assert_eq!(rule(result), Some(Rule::Structure));
    }

    #[test]
    fn a_device_cannot_claim_the_id_of_a_future_feed_entry() {
        let (mut doc, _) = record();
        let patient = doc.patient_id().unwrap();
        let future = PatientSummary::source_entry_id(&patient, Section::Alerts, "Flag/dnacpr-1");
        let result = as_device(&mut doc, &KEY, |d| {
            d.upsert(future, &s::Alert::new(s::alert_kind::RESPECT_DNACPR, "For CPR", mine(T0))).unwrap();
        });
        assert_eq!(rule(result), Some(Rule::Structure));
    }

    #[test]
    fn rule_names_round_trip() {
        for r in Rule::ALL {
            assert_eq!(Rule::parse(r.as_str()), Some(r));
        }
    }
}
