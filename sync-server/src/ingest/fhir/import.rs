//! Importing FHIR Bundles: one patient per Bundle, validated whole, applied atomically.
//!
//! The whole Bundle is parsed and mapped before anything is written; the first problem ends the
//! import with an error naming the entry, the resource and the field, and nothing is stored.

use std::collections::HashMap;

use care_node::nhs::NhsNumber;
use care_node::summary::{self as s, Demographics, PatientId, PatientSummary};

use super::import_map::{Ctx, Mapped, map_resource};
use super::model::{self as f, Resource};
use super::*;
use crate::store::{BatchWrite, NewDocument, ServerStore, StoreError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    #[error("not a valid FHIR Bundle: {0}")]
    NotABundle(String),
    #[error("entry {index} ({resource}): {reason}")]
    Invalid { index: usize, resource: String, reason: String },
    #[error("the Bundle is too large: {0}")]
    TooLarge(String),
    #[error("the Bundle has no Patient resource")]
    NoPatient,
    #[error("the Bundle holds more than one Patient; import one patient per Bundle")]
    SeveralPatients,
    #[error("patient document invalid: {0}")]
    Summary(#[from] s::SummaryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one Bundle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOutcome {
    pub patient: PatientId,
    pub created: bool,
    /// Entries created or changed.
    pub entries_written: usize,
    /// Entries already present with the same content.
    pub entries_unchanged: usize,
}

/// The largest Bundle accepted (one patient's summary is kilobytes; this leaves room for years
/// of history).
pub const MAX_BUNDLE_BYTES: usize = 16 * 1024 * 1024;
/// The most entries in one Bundle.
pub const MAX_BUNDLE_ENTRIES: usize = 5_000;

/// Parses a Bundle, naming the entry and field of the first problem.
pub fn parse_bundle(json: &str) -> Result<f::Bundle, ImportError> {
    if json.len() > MAX_BUNDLE_BYTES {
        return Err(ImportError::TooLarge(format!("{} bytes (the limit is {MAX_BUNDLE_BYTES})", json.len())));
    }
    parse_bundle_value(serde_json::from_str(json).map_err(not_json)?)
}

/// serde_json's messages can quote the offending value: keep its kind and position only.
pub(super) fn not_json(e: serde_json::Error) -> ImportError {
    ImportError::NotABundle(format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column()))
}

/// [`parse_bundle`] of JSON already read (a Bundle assembled from NDJSON lines, say).
pub fn parse_bundle_value(raw: serde_json::Value) -> Result<f::Bundle, ImportError> {
    if raw.get("resourceType").and_then(|v| v.as_str()) != Some("Bundle") {
        return Err(ImportError::NotABundle("resourceType is not Bundle".into()));
    }
    let mut raw = raw;
    let entries = match raw.get_mut("entry").map(serde_json::Value::take) {
        None => Vec::new(),
        Some(serde_json::Value::Array(entries)) if entries.len() > MAX_BUNDLE_ENTRIES => {
            return Err(ImportError::TooLarge(format!(
                "{} entries (the limit is {MAX_BUNDLE_ENTRIES}; one patient per Bundle)",
                entries.len()
            )));
        }
        Some(serde_json::Value::Array(entries)) => entries,
        Some(_) => return Err(ImportError::NotABundle("entry is not an array".into())),
    };
    let mut parsed = Vec::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        let mut entry = entry;
        let resource = entry.get_mut("resource").map(serde_json::Value::take).ok_or_else(|| {
            ImportError::Invalid { index, resource: "?".into(), reason: "the entry has no resource".into() }
        })?;
        // Named by entry number and type only: a sender's resource id may itself be identifying.
        let name =
            resource.get("resourceType").and_then(|v| v.as_str()).unwrap_or("?").chars().take(40).collect();
        let resource = Resource::from_json(resource).map_err(|reason| ImportError::Invalid {
            index,
            resource: name,
            reason,
        })?;
        let full_url = entry.get("fullUrl").and_then(|v| v.as_str()).map(str::to_string);
        parsed.push(f::BundleEntry { full_url, resource });
    }
    let mut bundle: f::Bundle = serde_json::from_value(serde_json::json!({
        "resourceType": "Bundle",
        "type": raw.get("type").cloned().unwrap_or(serde_json::Value::String("collection".into())),
    }))
    .map_err(|e| ImportError::NotABundle(e.to_string()))?;
    bundle.id = raw.get("id").and_then(|v| v.as_str()).map(str::to_string);
    bundle.timestamp = raw.get("timestamp").and_then(|v| v.as_str()).map(str::to_string);
    bundle.entry = parsed;
    Ok(bundle)
}

/// Imports one Bundle for one patient, atomically: all of it or, on any error, nothing.
pub fn import_bundle(
    store: &dyn ServerStore,
    bundle: &f::Bundle,
    feed: &str,
    now_ms: i64,
) -> Result<ImportOutcome, ImportError> {
    let prepared = prepare_bundle(store, bundle, feed, now_ms)?;
    let outcome = prepared.outcome.clone();
    store.write_batch(&mut prepared.into_writes())?;
    Ok(outcome)
}

/// A Bundle mapped onto its patient's document, not yet written: its writes commit with others
/// in one transaction ([`crate::store::PatientRecords::write_batch`]).
pub struct Prepared {
    pub outcome: ImportOutcome,
    /// The new document, or the changes to the stored one (none when nothing changed).
    write: Option<BatchWrite>,
    audit: BatchWrite,
    /// What names this patient (NHS number, care-sync id): two Bundles in one import that share
    /// any of these are the same person, and the second is prepared after the first is written.
    pub keys: Vec<String>,
}

impl Prepared {
    /// The writes, in order: the document, then its audit entry.
    pub fn into_writes(self) -> Vec<BatchWrite> {
        self.write.into_iter().chain([self.audit]).collect()
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").field("outcome", &self.outcome).finish_non_exhaustive()
    }
}

/// Maps a Bundle onto its patient's document (read from the store, or created), writing
/// nothing: the first problem is an error naming the entry and nothing is prepared.
pub fn prepare_bundle(
    store: &dyn ServerStore,
    bundle: &f::Bundle,
    feed: &str,
    now_ms: i64,
) -> Result<Prepared, ImportError> {
    let ctx_for =
        |index: usize, r: &Resource| Ctx { index, resource: r.type_name().to_string(), feed, now_ms };
    // The patient, first.
    let (patient_index, patient) = the_patient(bundle)?;
    let patient_ctx = ctx_for(patient_index, &bundle.entry[patient_index].resource);
    let demographics = demographics_of(patient, &patient_ctx)?;
    // Map every resource before touching the store.
    let mapped = map_entries(bundle, ctx_for)?;

    let (mut summary, created) = open_document(store, patient, &demographics, now_ms)?;
    let patient_id = summary.patient_id()?;
    let before = summary.heads();
    if !created && summary.demographics()? != demographics {
        summary.set_demographics(&demographics, now_ms)?;
    }
    // One change for the whole Bundle, not one per entry.
    summary.defer_commits();
    let applied = apply_entries(&mut summary, &patient_id, mapped);
    summary.commit_deferred();
    let (written, unchanged) = applied?;
    let write = if created {
        Some(BatchWrite::NewPatient(Box::new(NewDocument::of(&mut summary)?)))
    } else {
        let changes = summary.changes_since(&before);
        (!changes.is_empty()).then_some(BatchWrite::Changes(patient_id, changes))
    };
    let audit = BatchWrite::Audit {
        actor: feed.to_string(),
        action: "import-fhir",
        patient: Some(patient_id),
        detail: format!(
            "{} record; {written} entries written, {unchanged} unchanged",
            if created { "new" } else { "existing" }
        ),
        at_ms: now_ms,
    };
    let mut keys = vec![format!("id:{patient_id}")];
    keys.extend(demographics.nhs_number.map(|n| format!("nhs:{n}")));
    keys.extend(care_sync_patient_id(patient).map(|id| format!("id:{id}")));
    Ok(Prepared {
        outcome: ImportOutcome {
            patient: patient_id,
            created,
            entries_written: written,
            entries_unchanged: unchanged,
        },
        write,
        audit,
        keys,
    })
}

/// The Bundle's one Patient, with its entry index.
fn the_patient(bundle: &f::Bundle) -> Result<(usize, &f::Patient), ImportError> {
    let mut patients = bundle.entry.iter().enumerate().filter_map(|(i, e)| match &e.resource {
        Resource::Patient(p) => Some((i, p)),
        _ => None,
    });
    let found = patients.next().ok_or(ImportError::NoPatient)?;
    if patients.next().is_some() {
        return Err(ImportError::SeveralPatients);
    }
    Ok(found)
}

fn demographics_of(p: &f::Patient, ctx: &Ctx<'_>) -> Result<Demographics, ImportError> {
    let nhs = match p.common.identifier.iter().find(|i| i.system.as_deref() == Some(NHS_NUMBER_SYSTEM)) {
        Some(i) => {
            let value = i.value.as_deref().ok_or_else(|| ctx.err("identifier (NHS number) has no value"))?;
            Some(NhsNumber::parse(value).map_err(|e| ctx.err(format!("identifier (NHS number): {e}")))?)
        }
        None => None,
    };
    let status = p
        .common
        .identifier
        .iter()
        .find(|i| i.system.as_deref() == Some(NHS_NUMBER_SYSTEM))
        .and_then(|i| i.extension.iter().find(|e| e.url == NHS_STATUS_EXT))
        .and_then(|e| e.value_codeable_concept.as_ref())
        .and_then(|c| c.coding.first())
        .and_then(|c| c.display.clone().or(c.code.clone()));
    let name = p.name.first().ok_or_else(|| ctx.err("name is required"))?;
    let given = (!name.given.is_empty()).then(|| name.given.join(" "));
    let display = name
        .text
        .clone()
        .or_else(|| {
            let full = [given.clone().unwrap_or_default(), name.family.clone().unwrap_or_default()]
                .join(" ")
                .trim()
                .to_string();
            (!full.is_empty()).then_some(full)
        })
        .ok_or_else(|| ctx.err("name has neither text nor family/given"))?;
    if let Some(g) = &p.gender
        && !matches!(g.as_str(), "male" | "female" | "other" | "unknown")
    {
        return Err(ctx.err("gender is not male, female, other or unknown"));
    }
    if let Some(b) = &p.birth_date
        && time::Date::parse(b, time::macros::format_description!("[year]-[month]-[day]")).is_err()
    {
        return Err(ctx.err("birthDate is not a date (YYYY-MM-DD)"));
    }
    let address = p.address.first();
    let gp = p.general_practitioner.first();
    Ok(Demographics {
        nhs_number: nhs.map(|n| n.as_str().to_string()),
        nhs_number_status: status,
        name: display,
        family: name.family.clone(),
        given,
        date_of_birth: p.birth_date.clone(),
        sex: p.gender.clone(),
        address_lines: address.map(|a| a.line.clone()).filter(|l| !l.is_empty()),
        city: address.and_then(|a| a.city.clone()),
        postcode: address.and_then(|a| a.postal_code.clone()),
        gp_practice_code: gp.and_then(|g| g.identifier.as_ref()).and_then(|i| i.value.clone()),
        gp_practice_name: gp.and_then(|g| g.display.clone()),
    })
}

/// Maps every entry, in Bundle order, resolving medication references and folding vital signs
/// into their encounters first.
fn map_entries<'a>(
    bundle: &f::Bundle,
    ctx_for: impl Fn(usize, &Resource) -> Ctx<'a>,
) -> Result<Vec<Mapped>, ImportError> {
    let medications = medications_by_reference(bundle);
    let folded = fold_vitals(bundle, &ctx_for)?;
    let mut mapped = Vec::new();
    for (index, entry) in bundle.entry.iter().enumerate() {
        mapped.push(map_resource(&entry.resource, &medications, &folded, &ctx_for(index, &entry.resource))?);
    }
    Ok(mapped)
}

/// Each coded Medication by the references that may point at it (`Medication/{id}` and its
/// fullUrl).
fn medications_by_reference(bundle: &f::Bundle) -> HashMap<String, f::CodeableConcept> {
    bundle
        .entry
        .iter()
        .filter_map(|e| match &e.resource {
            Resource::Medication(m) => {
                let code = m.code.clone()?;
                let id = m.common.id.clone()?;
                let mut keys = vec![format!("Medication/{id}")];
                keys.extend(e.full_url.clone());
                Some(keys.into_iter().map(move |k| (k, code.clone())))
            }
            _ => None,
        })
        .flatten()
        .collect()
}

/// Vital-sign Observations folded into the vitals of the Encounter they point at, by the
/// Encounter's entry index; the Observations so folded are not imported again as results.
#[derive(Default)]
pub(super) struct Folded {
    pub(super) by_encounter: HashMap<usize, s::Vitals>,
    pub(super) consumed: std::collections::HashSet<usize>,
}

fn fold_vitals<'a>(
    bundle: &f::Bundle,
    ctx_for: impl Fn(usize, &Resource) -> Ctx<'a>,
) -> Result<Folded, ImportError> {
    let mut encounters = HashMap::new();
    for (i, e) in bundle.entry.iter().enumerate() {
        if let Resource::Encounter(enc) = &e.resource {
            encounters.extend(e.full_url.clone().map(|u| (u, i)));
            encounters.extend(enc.common.id.as_ref().map(|id| (format!("Encounter/{id}"), i)));
        }
    }
    let mut folded = Folded::default();
    // One set of observations per encounter, taken at one time (the first seen): readings at
    // other times stay results of their own, never mixed into that set.
    let mut taken_at: HashMap<usize, Option<String>> = HashMap::new();
    for (i, e) in bundle.entry.iter().enumerate() {
        let Resource::Observation(o) = &e.resource else { continue };
        let Some(at) =
            o.encounter.as_ref().and_then(|r| r.reference.as_ref()).and_then(|r| encounters.get(r))
        else {
            continue;
        };
        if !super::vitals::is_vital_sign(o) {
            continue;
        }
        if *taken_at.entry(*at).or_insert_with(|| o.effective_date_time.clone()) != o.effective_date_time {
            continue;
        }
        let vitals = folded.by_encounter.entry(*at).or_insert_with(super::vitals::empty);
        super::vitals::fold(vitals, o).map_err(|reason| ctx_for(i, &e.resource).err(reason))?;
        folded.consumed.insert(i);
    }
    Ok(folded)
}

/// The care-sync patient id the Bundle names, if any.
fn care_sync_patient_id(patient: &f::Patient) -> Option<PatientId> {
    patient
        .common
        .identifier
        .iter()
        .find(|i| i.system.as_deref() == Some(PATIENT_SYSTEM))
        .and_then(|i| i.value.as_deref())
        .and_then(|v| v.parse::<PatientId>().ok())
}

/// Finds the patient's document (by a care-sync id already stored, else by NHS number) or
/// creates one; says whether it was created. A bundle naming one stored record by its
/// care-sync id and another by its NHS number is two records of one person: refused, for an
/// operator to merge (`merge-patients`), never applied to either.
fn open_document(
    store: &dyn ServerStore,
    patient: &f::Patient,
    demographics: &Demographics,
    now_ms: i64,
) -> Result<(PatientSummary, bool), ImportError> {
    let by_id =
        match care_sync_patient_id(patient).filter(|id| store.load_document(id).ok().flatten().is_some()) {
            Some(id) => Some(kept_record(store, id)?),
            None => None,
        };
    let by_nhs = match &demographics.nhs_number {
        Some(nhs) => store.patient_by_nhs(&NhsNumber::parse(nhs).expect("validated above"))?,
        None => None,
    };
    let existing = match (by_id, by_nhs) {
        (Some(id), Some(other)) if id != other => return Err(StoreError::DuplicatePatient.into()),
        (Some(id), _) => Some(id),
        (None, by_nhs) => by_nhs,
    };
    // This process's actor: another process (an instance's feed, another import) editing the
    // same document from its own copy writes as another actor. Within the process, the bulk
    // import never prepares a patient while a write of it is in flight.
    let actor = crate::instance_actor(&store.server_identity()?);
    Ok(match existing {
        Some(id) => {
            let saved = store.load_document(&id)?.ok_or(StoreError::UnknownPatient)?;
            let mut summary = PatientSummary::load(&saved)?;
            summary.set_actor(actor.to_bytes());
            (summary, false)
        }
        None => {
            let id = care_sync_patient_id(patient).unwrap_or_else(uuid::Uuid::new_v4);
            (PatientSummary::create(id, demographics, actor.clone(), now_ms)?, true)
        }
    })
}

/// The record a stored one stands for now: itself, or the one an operator merged it into
/// (merges may chain), so an export of a merged-away record, or a feed's retry after the merge,
/// updates the kept record.
fn kept_record(store: &dyn ServerStore, id: PatientId) -> Result<PatientId, ImportError> {
    let mut id = id;
    for _ in 0..16 {
        match store.merged_into(&id)? {
            Some(kept) if kept != id => id = kept,
            _ => break,
        }
    }
    Ok(id)
}

/// Writes the mapped entries into the document; returns how many were written and how many
/// were already there unchanged.
fn apply_entries(
    summary: &mut PatientSummary,
    patient_id: &PatientId,
    mapped: Vec<Mapped>,
) -> Result<(usize, usize), ImportError> {
    let (mut written, mut unchanged) = (0, 0);
    for m in mapped {
        match m {
            Mapped::Entry(section, id, source, write) => {
                let id = id.unwrap_or_else(|| PatientSummary::source_entry_id(patient_id, section, &source));
                if write(&mut *summary, id)? {
                    written += 1;
                } else {
                    unchanged += 1;
                }
            }
            Mapped::NoneKnown(section, provenance) => {
                if summary.section_state(section)? == s::SectionState::NoInformation {
                    summary.assert_none_known(section, &provenance)?;
                }
            }
            Mapped::Nothing => {}
        }
    }
    Ok((written, unchanged))
}
