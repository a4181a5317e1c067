//! Importing FHIR Bundles: one patient per Bundle, validated whole, applied atomically.
//!
//! The whole Bundle is parsed and mapped before anything is written; the first problem ends the
//! import with an error naming the entry, the resource and the field, and nothing is stored.

use std::collections::HashMap;

use care_node::nhs::NhsNumber;
use care_node::summary::{
    self as s, Code, Demographics, EntryId, PatientId, PatientSummary, Provenance, Section, SectionEntry,
};

use super::model::{self as f, Resource};
use super::*;
use crate::store::{ServerStore, StoreError};

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
    // serde_json's messages can quote the offending value: keep its kind and position only.
    let raw: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        ImportError::NotABundle(format!(
            "{:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    if raw.get("resourceType").and_then(|v| v.as_str()) != Some("Bundle") {
        return Err(ImportError::NotABundle("resourceType is not Bundle".into()));
    }
    let entries = match raw.get("entry") {
        None => Vec::new(),
        Some(serde_json::Value::Array(entries)) if entries.len() > MAX_BUNDLE_ENTRIES => {
            return Err(ImportError::TooLarge(format!(
                "{} entries (the limit is {MAX_BUNDLE_ENTRIES}; one patient per Bundle)",
                entries.len()
            )));
        }
        Some(serde_json::Value::Array(entries)) => entries.clone(),
        Some(_) => return Err(ImportError::NotABundle("entry is not an array".into())),
    };
    let mut parsed = Vec::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        let resource = entry.get("resource").cloned().ok_or_else(|| ImportError::Invalid {
            index,
            resource: "?".into(),
            reason: "the entry has no resource".into(),
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

struct Ctx<'a> {
    index: usize,
    resource: String,
    feed: &'a str,
    now_ms: i64,
}

impl Ctx<'_> {
    /// The text a clinician reads for a required coded element.
    fn text(&self, cc: &f::CodeableConcept) -> Result<String, ImportError> {
        text_of(cc).ok_or_else(|| self.err("code has no text, display or code"))
    }

    fn err(&self, reason: impl Into<String>) -> ImportError {
        ImportError::Invalid { index: self.index, resource: self.resource.clone(), reason: reason.into() }
    }

    fn provenance(&self, common: &f::Common) -> Result<Provenance, ImportError> {
        if let Some(ext) = common.extension.iter().find(|e| e.url == PROVENANCE_EXT) {
            let get = |name: &str| {
                ext.extension.iter().find(|e| e.url == name).and_then(|e| e.value_string.clone())
            };
            let number = |name: &str| -> Result<Option<i64>, ImportError> {
                get(name)
                    .map(|v| {
                        v.parse::<i64>().map_err(|_| self.err(format!("provenance {name} is not a number")))
                    })
                    .transpose()
            };
            return Ok(Provenance {
                device: get("device").ok_or_else(|| self.err("provenance extension lacks device"))?,
                device_name: get("deviceName")
                    .ok_or_else(|| self.err("provenance extension lacks deviceName"))?,
                role: get("role").ok_or_else(|| self.err("provenance extension lacks role"))?,
                recorded_at_ms: number("recordedAtMs")?
                    .ok_or_else(|| self.err("provenance extension lacks recordedAtMs"))?,
                clock_offset_ms: number("clockOffsetMs")?,
                person: get("person"),
                source: get("source"),
            });
        }
        let mut p = Provenance::new("server", self.feed, "feed", self.now_ms);
        p.clock_offset_ms = Some(0);
        p.source = Some(self.resource.clone());
        Ok(p)
    }
}

fn code_of(cc: &f::CodeableConcept) -> Option<Code> {
    let coding = cc.coding.iter().find(|c| c.code.is_some())?;
    Some(Code {
        system: coding.system.clone().unwrap_or_default(),
        code: coding.code.clone().unwrap_or_default(),
        display: coding.display.clone().or_else(|| cc.text.clone()).unwrap_or_default(),
    })
}

fn text_of(cc: &f::CodeableConcept) -> Option<String> {
    cc.text
        .clone()
        .or_else(|| cc.coding.iter().find_map(|c| c.display.clone()))
        .or_else(|| cc.coding.iter().find_map(|c| c.code.clone()))
}

fn is_unspecified(cc: &f::CodeableConcept) -> bool {
    cc.text.is_none()
        && cc.coding.iter().all(|c| c.system.as_deref() == Some(super::export::UNSPECIFIED_SYSTEM))
}

fn status_of(cc: &Option<f::CodeableConcept>) -> Option<String> {
    cc.as_ref().and_then(|c| c.coding.iter().find_map(|x| x.code.clone()))
}

fn absent_unknown(cc: &Option<f::CodeableConcept>) -> Option<String> {
    cc.as_ref()?
        .coding
        .iter()
        .find(|c| c.system.as_deref() == Some(ABSENT_UNKNOWN_SYSTEM))
        .and_then(|c| c.code.clone())
}

/// An IPS absent/unknown entry ("no known allergies", "no allergy information") maps to an
/// assertion or to nothing, never to an entry.
fn absent_entry(
    code: &Option<f::CodeableConcept>,
    none_known: &str,
    section: Section,
    common: &f::Common,
    ctx: &Ctx<'_>,
) -> Result<Option<Mapped>, ImportError> {
    Ok(match absent_unknown(code) {
        Some(c) if c == none_known => Some(Mapped::NoneKnown(section, ctx.provenance(common)?)),
        Some(_) => Some(Mapped::Nothing),
        None => None,
    })
}

/// Writes one mapped entry under its id; returns whether anything changed.
type EntryWriter = Box<dyn FnOnce(&mut PatientSummary, EntryId) -> Result<bool, s::SummaryError>>;

/// One mapped resource, ready to write.
enum Mapped {
    Entry(Section, Option<EntryId>, String, EntryWriter),
    NoneKnown(Section, Provenance),
    Nothing,
}

fn entry<T: SectionEntry + 'static>(id: Option<EntryId>, source: String, value: T) -> Mapped {
    let in_error = value.verification_status() == s::ENTERED_IN_ERROR;
    let provenance = value.provenance().clone();
    Mapped::Entry(
        T::SECTION,
        id,
        source,
        Box::new(move |summary, id| {
            let changed = summary.upsert(id, &value)?;
            if in_error && !summary.entries::<T>()?.iter().any(|e| e.id == id && e.entered_in_error.is_some())
            {
                summary.mark_entered_in_error(
                    T::SECTION,
                    id,
                    "entered in error at the source",
                    &provenance,
                )?;
                return Ok(true);
            }
            Ok(changed)
        }),
    )
}

/// The entry id a resource maps to: its care-sync id if it carries one, else one derived from
/// its source identifier.
fn source_key(
    common: &f::Common,
    type_name: &str,
    ctx: &Ctx<'_>,
) -> Result<(Option<EntryId>, String), ImportError> {
    if let Some(id) = common
        .identifier
        .iter()
        .find(|i| i.system.as_deref() == Some(ENTRY_SYSTEM))
        .and_then(|i| i.value.as_deref())
    {
        let id = id.parse::<EntryId>().map_err(|_| ctx.err("identifier (care-sync entry) is not a UUID"))?;
        return Ok((Some(id), String::new()));
    }
    if let Some(id) = &common.id {
        return Ok((None, format!("{type_name}/{id}")));
    }
    if let Some(i) = common.identifier.iter().find(|i| i.value.is_some()) {
        return Ok((
            None,
            format!("{type_name}|{}|{}", i.system.as_deref().unwrap_or(""), i.value.as_deref().unwrap_or("")),
        ));
    }
    Err(ctx.err("has neither id nor identifier, so it could not be re-imported without duplicating"))
}

fn require<'a, T>(value: &'a Option<T>, ctx: &Ctx<'_>, field: &str) -> Result<&'a T, ImportError> {
    value.as_ref().ok_or_else(|| ctx.err(format!("{field} is required")))
}

fn vitals_of(common: &f::Common, ctx: &Ctx<'_>) -> Result<Option<s::Vitals>, ImportError> {
    let Some(ext) = common.extension.iter().find(|e| e.url == VITALS_EXT) else { return Ok(None) };
    let int = |name: &str| {
        ext.extension.iter().find(|e| e.url == name).and_then(|e| e.value_integer).map(|v| v as u32)
    };
    Ok(Some(s::Vitals {
        respiration_rate: int("respirationRate"),
        spo2: int("spo2"),
        spo2_scale: int("spo2Scale").unwrap_or(1),
        on_oxygen: ext
            .extension
            .iter()
            .find(|e| e.url == "onOxygen")
            .and_then(|e| e.value_boolean)
            .unwrap_or(false),
        systolic_bp: int("systolicBp"),
        pulse: int("pulse"),
        consciousness: ext
            .extension
            .iter()
            .find(|e| e.url == "consciousness")
            .and_then(|e| e.value_string.clone()),
        temperature_c: ext.extension.iter().find(|e| e.url == "temperatureC").and_then(|e| e.value_decimal),
        news2: int("news2"),
        pregnant: None,
        news2_withheld: None,
    }))
    .and_then(|v: Option<s::Vitals>| match &v {
        Some(v) if v.spo2_scale != 1 && v.spo2_scale != 2 => Err(ctx.err("vitals spo2Scale must be 1 or 2")),
        _ => Ok(v),
    })
}

/// Vital-sign Observations folded into the vitals of the Encounter they point at, by the
/// Encounter's entry index; the Observations so folded are not imported again as results.
#[derive(Default)]
struct Folded {
    by_encounter: HashMap<usize, s::Vitals>,
    consumed: std::collections::HashSet<usize>,
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

fn map_resource(
    resource: &Resource,
    medications: &HashMap<String, f::CodeableConcept>,
    folded: &Folded,
    ctx: &Ctx<'_>,
) -> Result<Mapped, ImportError> {
    let common = resource.common();
    let type_name = resource.type_name();
    Ok(match resource {
        Resource::Patient(_) | Resource::Medication(_) | Resource::Composition(_) => Mapped::Nothing,
        Resource::Practitioner(_) | Resource::PractitionerRole(_) | Resource::Organization(_) => {
            Mapped::Nothing
        }
        Resource::Condition(c) => {
            let code = require(&c.code, ctx, "code")?;
            if let Some(mapped) = absent_entry(&c.code, "no-known-problems", Section::Problems, common, ctx)?
            {
                return Ok(mapped);
            }
            let (id, source) = source_key(common, type_name, ctx)?;
            let mut p = s::Problem::new(&ctx.text(code)?, ctx.provenance(common)?);
            p.code = code_of(code);
            p.clinical_status = status_of(&c.clinical_status).unwrap_or_else(|| "active".into());
            p.verification_status = status_of(&c.verification_status).unwrap_or_else(|| s::CONFIRMED.into());
            p.onset = c.onset_date_time.clone();
            p.note = c.note.first().map(|n| n.text.clone());
            entry(id, source, p)
        }
        Resource::AllergyIntolerance(a) => {
            let code = require(&a.code, ctx, "code")?;
            if let Some(mapped) =
                absent_entry(&a.code, "no-known-allergies", Section::Allergies, common, ctx)?
            {
                return Ok(mapped);
            }
            let (id, source) = source_key(common, type_name, ctx)?;
            let mut x = s::Allergy::new(&ctx.text(code)?, ctx.provenance(common)?);
            x.code = code_of(code);
            if let Some(reaction) = a.reaction.first() {
                let manifestation = reaction.manifestation.first().filter(|m| !is_unspecified(m));
                x.reaction = manifestation.and_then(text_of);
                x.reaction_code = manifestation.and_then(code_of);
                x.severity = reaction.severity.clone();
            }
            for (field, value) in [("criticality", &a.criticality), ("type", &a.kind)] {
                if let Some(v) = value
                    && !matches!(v.as_str(), "low" | "high" | "unable-to-assess" | "allergy" | "intolerance")
                {
                    // The value itself is never echoed: it is the sender's data.
                    return Err(ctx.err(format!("{field} is not a valid code")));
                }
            }
            x.criticality = a.criticality.clone();
            x.kind = a.kind.clone();
            x.category = a.category.first().cloned();
            x.clinical_status = status_of(&a.clinical_status).or(Some("active".into()));
            x.verification_status = status_of(&a.verification_status).unwrap_or_else(|| s::CONFIRMED.into());
            x.onset = a.onset_date_time.clone();
            entry(id, source, x)
        }
        Resource::MedicationStatement(m) => {
            let concept = medication_concept(
                &m.medication_codeable_concept,
                &m.medication_reference,
                medications,
                ctx,
            )?;
            let absent = Some(concept.clone());
            if let Some(mapped) =
                absent_entry(&absent, "no-known-medications", Section::Medications, common, ctx)?
            {
                return Ok(mapped);
            }
            let (id, source) = source_key(common, type_name, ctx)?;
            let mut x = medication(&concept, &m.dosage, ctx.provenance(common)?, ctx)?;
            x.status = m.status.clone();
            x.kind = m.category.as_ref().and_then(text_of);
            if m.status == s::ENTERED_IN_ERROR {
                x.verification_status = s::ENTERED_IN_ERROR.into();
            }
            entry(id, source, x)
        }
        Resource::MedicationRequest(m) => {
            let concept = medication_concept(
                &m.medication_codeable_concept,
                &m.medication_reference,
                medications,
                ctx,
            )?;
            let (id, source) = source_key(common, type_name, ctx)?;
            let mut x = medication(&concept, &m.dosage_instruction, ctx.provenance(common)?, ctx)?;
            x.status = m.status.clone();
            x.kind = m
                .course_of_therapy_type
                .as_ref()
                .and_then(|c| status_of(&Some(c.clone())))
                .map(|k| if k == "continuous" { "repeat".to_string() } else { k });
            if m.status == s::ENTERED_IN_ERROR {
                x.verification_status = s::ENTERED_IN_ERROR.into();
            }
            entry(id, source, x)
        }
        Resource::Flag(flag) => {
            let (id, source) = source_key(common, type_name, ctx)?;
            let kind = flag
                .category
                .iter()
                .flat_map(|c| &c.coding)
                .find(|c| c.system.as_deref() == Some(ALERT_KIND_SYSTEM))
                .and_then(|c| c.code.clone())
                .unwrap_or_else(|| s::alert_kind::CLINICAL.into());
            let description = ctx.text(&flag.code)?;
            let mut x = s::Alert::new(&kind, &description, ctx.provenance(common)?);
            x.code = code_of(&flag.code);
            x.status = Some(flag.status.clone());
            x.decision_date = flag.period.as_ref().and_then(|p| p.start.clone());
            x.review_date = flag.period.as_ref().and_then(|p| p.end.clone());
            x.author = flag.author.as_ref().and_then(|a| a.display.clone());
            if flag.status == s::ENTERED_IN_ERROR {
                x.verification_status = s::ENTERED_IN_ERROR.into();
                x.status = Some("inactive".into());
            }
            entry(id, source, x)
        }
        Resource::Consent(c) => {
            let (id, source) = source_key(common, type_name, ctx)?;
            let description = c
                .policy_rule
                .as_ref()
                .and_then(text_of)
                .or_else(|| c.category.first().and_then(text_of))
                .unwrap_or_else(|| "Advance directive (Consent)".into());
            let mut x = s::Alert::new(s::alert_kind::RESPECT_DNACPR, &description, ctx.provenance(common)?);
            x.code = c.policy_rule.as_ref().and_then(code_of);
            x.status = Some(if c.status == "active" { "active" } else { "inactive" }.into());
            x.decision_date = Some(require(&c.date_time, ctx, "dateTime (the decision date)")?.clone());
            x.author = Some(
                c.performer
                    .first()
                    .and_then(|p| p.display.clone())
                    .ok_or_else(|| ctx.err("performer (who decided) is required"))?,
            );
            entry(id, source, x)
        }
        Resource::DocumentReference(d) => {
            let (id, source) = source_key(common, type_name, ctx)?;
            let advance_directive = d.category.iter().chain(d.kind.iter()).flat_map(|c| &c.coding).any(|c| {
                c.code.as_deref() == Some("42348-3") || c.system.as_deref() == Some(ALERT_KIND_SYSTEM)
            });
            let title = d
                .description
                .clone()
                .or_else(|| d.kind.as_ref().and_then(text_of))
                .unwrap_or_else(|| "Document".into());
            if advance_directive {
                let mut x = s::Alert::new(s::alert_kind::RESPECT_DNACPR, &title, ctx.provenance(common)?);
                x.decision_date = d.date.clone();
                x.author = d.author.first().and_then(|a| a.display.clone());
                x.status = Some(if d.status == "current" { "active" } else { "inactive" }.into());
                entry(id, source, x)
            } else {
                let mut x = s::Report::new("letter", &title, ctx.provenance(common)?);
                x.code = d.kind.as_ref().and_then(code_of);
                x.effective = d.date.clone().or_else(|| {
                    d.context.as_ref().and_then(|c| c.period.as_ref()).and_then(|p| p.start.clone())
                });
                x.status = if d.status == "current" { "final".into() } else { d.status.clone() };
                entry(id, source, x)
            }
        }
        Resource::CarePlan(c) => {
            let (id, source) = source_key(common, type_name, ctx)?;
            let title = c
                .title
                .clone()
                .or_else(|| c.description.clone())
                .ok_or_else(|| ctx.err("title or description is required"))?;
            let mut x = s::CarePlan::new(&title, ctx.provenance(common)?);
            x.description = c.description.clone().filter(|d| *d != title);
            x.status = c.status.clone();
            x.period_start = c.period.as_ref().and_then(|p| p.start.clone());
            x.author = c.author.as_ref().and_then(|a| a.display.clone());
            entry(id, source, x)
        }
        Resource::RelatedPerson(r) => {
            let (id, source) = source_key(common, type_name, ctx)?;
            let name = r.name.first().and_then(|n| {
                n.text.clone().or_else(|| {
                    let full = [n.given.join(" "), n.family.clone().unwrap_or_default()]
                        .join(" ")
                        .trim()
                        .to_string();
                    (!full.is_empty()).then_some(full)
                })
            });
            let name = name.ok_or_else(|| ctx.err("name is required"))?;
            let relationship = r
                .relationship
                .first()
                .and_then(|c| status_of(&Some(c.clone())).or_else(|| text_of(c)))
                .unwrap_or_else(|| "contact".into());
            let mut x = s::Contact::new(&name, &relationship, ctx.provenance(common)?);
            x.phone =
                r.telecom.iter().find(|t| t.system.as_deref() != Some("email")).and_then(|t| t.value.clone());
            entry(id, source, x)
        }
        Resource::Encounter(e) => {
            let (id, source) = source_key(common, type_name, ctx)?;
            let kind = e.kind.first().and_then(text_of).unwrap_or_else(|| "encounter".into());
            let mut x = s::Encounter::new(&kind, &e.status, ctx.provenance(common)?);
            x.class = e
                .class
                .as_ref()
                .filter(|c| c.system.as_deref() != Some(super::export::UNSPECIFIED_SYSTEM))
                .and_then(|c| c.code.clone());
            x.location = e.location.first().and_then(|l| l.location.display.clone());
            x.facility = e.service_provider.as_ref().and_then(|p| p.display.clone());
            x.start = e.period.as_ref().and_then(|p| p.start.clone());
            x.end = e.period.as_ref().and_then(|p| p.end.clone());
            x.reason = e.reason_code.first().and_then(text_of);
            x.vitals = match folded.by_encounter.get(&ctx.index) {
                Some(v) => Some(v.clone()),
                None => vitals_of(common, ctx)?, // an export from before vital-sign Observations
            };
            x.visit = common
                .identifier
                .iter()
                .find(|i| i.system.as_deref() == Some(VISIT_SYSTEM))
                .and_then(|i| i.value.clone());
            if e.status == s::ENTERED_IN_ERROR {
                x.verification_status = s::ENTERED_IN_ERROR.into();
            }
            entry(id, source, x)
        }
        Resource::Observation(_) if folded.consumed.contains(&ctx.index) => Mapped::Nothing,
        Resource::Observation(o) => {
            let (id, source) = source_key(common, type_name, ctx)?;
            let mut x = s::Report::new("result", &ctx.text(&o.code)?, ctx.provenance(common)?);
            x.code = code_of(&o.code);
            x.value = o
                .value_string
                .clone()
                .or_else(|| o.value_quantity.as_ref().and_then(|q| q.value).map(|v| v.to_string()));
            x.unit = o.value_quantity.as_ref().and_then(|q| q.unit.clone());
            x.effective = o.effective_date_time.clone();
            x.status = o.status.clone();
            if o.status == s::ENTERED_IN_ERROR {
                x.verification_status = s::ENTERED_IN_ERROR.into();
            }
            entry(id, source, x)
        }
        Resource::DiagnosticReport(d) => {
            let (id, source) = source_key(common, type_name, ctx)?;
            let mut x = s::Report::new("report", &ctx.text(&d.code)?, ctx.provenance(common)?);
            x.code = code_of(&d.code);
            x.value = d.conclusion.clone();
            x.effective = d.effective_date_time.clone();
            x.status = d.status.clone();
            if d.status == s::ENTERED_IN_ERROR {
                x.verification_status = s::ENTERED_IN_ERROR.into();
            }
            entry(id, source, x)
        }
    })
}

fn medication_concept(
    concept: &Option<f::CodeableConcept>,
    reference: &Option<f::Reference>,
    medications: &HashMap<String, f::CodeableConcept>,
    ctx: &Ctx<'_>,
) -> Result<f::CodeableConcept, ImportError> {
    if let Some(c) = concept {
        return Ok(c.clone());
    }
    let reference = reference
        .as_ref()
        .and_then(|r| r.reference.clone())
        .ok_or_else(|| ctx.err("medicationCodeableConcept or medicationReference is required"))?;
    medications.get(&reference).cloned().ok_or_else(|| {
        // The reference is a sender's resource id: never echoed.
        ctx.err("medicationReference does not resolve to a Medication in the Bundle")
    })
}

fn medication(
    concept: &f::CodeableConcept,
    dosage: &[f::Dosage],
    provenance: Provenance,
    ctx: &Ctx<'_>,
) -> Result<s::Medication, ImportError> {
    let mut x = s::Medication::new(
        &text_of(concept).ok_or_else(|| ctx.err("medication has no text, display or code"))?,
        provenance,
    );
    x.code = code_of(concept);
    if let Some(d) = dosage.first() {
        x.dose = d.text.clone();
        x.route = d.route.as_ref().and_then(text_of);
        x.frequency = d.timing.as_ref().and_then(|t| t.code.as_ref()).and_then(text_of);
    }
    Ok(x)
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

/// Imports one Bundle for one patient, atomically: all of it or, on any error, nothing.
pub fn import_bundle(
    store: &dyn ServerStore,
    bundle: &f::Bundle,
    feed: &str,
    now_ms: i64,
) -> Result<ImportOutcome, ImportError> {
    let ctx_for =
        |index: usize, r: &Resource| Ctx { index, resource: r.type_name().to_string(), feed, now_ms };
    // The patient, first.
    let mut patients = bundle.entry.iter().enumerate().filter_map(|(i, e)| match &e.resource {
        Resource::Patient(p) => Some((i, p)),
        _ => None,
    });
    let (patient_index, patient) = patients.next().ok_or(ImportError::NoPatient)?;
    if patients.next().is_some() {
        return Err(ImportError::SeveralPatients);
    }
    let patient_ctx = ctx_for(patient_index, &bundle.entry[patient_index].resource);
    let demographics = demographics_of(patient, &patient_ctx)?;

    // Map every resource before touching the store.
    let medications: HashMap<String, f::CodeableConcept> = bundle
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
        .collect();
    let folded = fold_vitals(bundle, ctx_for)?;
    let mut mapped = Vec::new();
    for (index, entry) in bundle.entry.iter().enumerate() {
        mapped.push(map_resource(&entry.resource, &medications, &folded, &ctx_for(index, &entry.resource))?);
    }

    // Find or create the patient's document.
    let existing = match &demographics.nhs_number {
        Some(nhs) => store.patient_by_nhs(&NhsNumber::parse(nhs).expect("validated above"))?,
        None => patient
            .common
            .identifier
            .iter()
            .find(|i| i.system.as_deref() == Some(PATIENT_SYSTEM))
            .and_then(|i| i.value.as_deref())
            .and_then(|v| v.parse::<PatientId>().ok())
            .filter(|id| store.load_document(id).ok().flatten().is_some()),
    };
    let identity = store.server_identity()?;
    let actor = crate::server_actor(&identity);
    let (mut summary, created) = match existing {
        Some(id) => {
            let saved = store.load_document(&id)?.ok_or(StoreError::UnknownPatient)?;
            let mut summary = PatientSummary::load(&saved)?;
            summary.set_actor(actor.to_bytes());
            (summary, false)
        }
        None => {
            let id = patient
                .common
                .identifier
                .iter()
                .find(|i| i.system.as_deref() == Some(PATIENT_SYSTEM))
                .and_then(|i| i.value.as_deref())
                .and_then(|v| v.parse::<PatientId>().ok())
                .unwrap_or_else(uuid::Uuid::new_v4);
            (PatientSummary::create(id, &demographics, actor.clone(), now_ms)?, true)
        }
    };
    let patient_id = summary.patient_id()?;
    let before = summary.heads();
    if !created && summary.demographics()? != demographics {
        summary.set_demographics(&demographics, now_ms)?;
    }
    let (mut written, mut unchanged) = (0, 0);
    for m in mapped {
        match m {
            Mapped::Entry(section, id, source, write) => {
                let id = id.unwrap_or_else(|| PatientSummary::source_entry_id(&patient_id, section, &source));
                if write(&mut summary, id)? {
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
    if created {
        store.insert_patients(std::slice::from_mut(&mut summary))?;
    } else {
        let changes = summary.changes_since(&before);
        if !changes.is_empty() {
            store.apply_server_changes(&patient_id, &changes)?;
        }
    }
    store.append_audit(
        feed,
        "import-fhir",
        Some(&patient_id),
        &format!(
            "{} record; {written} entries written, {unchanged} unchanged",
            if created { "new" } else { "existing" }
        ),
        now_ms,
    )?;
    Ok(ImportOutcome { patient: patient_id, created, entries_written: written, entries_unchanged: unchanged })
}
