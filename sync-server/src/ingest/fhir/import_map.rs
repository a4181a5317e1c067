//! What one FHIR resource becomes in a patient's summary: an entry, a "none known" assertion, or
//! nothing. Nothing here touches the store: [`super::import`] maps the whole Bundle first, then
//! applies it.

use std::collections::HashMap;

use care_node::summary::{self as s, Code, EntryId, PatientSummary, Provenance, Section, SectionEntry};

use super::import::{Folded, ImportError};
use super::model::{self as f, Resource};
use super::*;

/// The entry being mapped (named in errors), and the feed and time credited to a resource
/// that carries no provenance of its own.
pub(super) struct Ctx<'a> {
    pub(super) index: usize,
    pub(super) resource: String,
    pub(super) feed: &'a str,
    pub(super) now_ms: i64,
}

impl Ctx<'_> {
    /// The text a clinician reads for a required coded element.
    fn text(&self, cc: &f::CodeableConcept) -> Result<String, ImportError> {
        text_of(cc).ok_or_else(|| self.err("code has no text, display or code"))
    }

    pub(super) fn err(&self, reason: impl Into<String>) -> ImportError {
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
pub(super) type EntryWriter = Box<dyn FnOnce(&mut PatientSummary, EntryId) -> Result<bool, s::SummaryError>>;

/// One mapped resource, ready to write.
pub(super) enum Mapped {
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

/// A resource whose status says it was entered in error is kept, marked so.
fn in_error_by_status(status: &str, verification_status: &mut String) {
    if status == s::ENTERED_IN_ERROR {
        *verification_status = s::ENTERED_IN_ERROR.into();
    }
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

/// What one resource becomes. The Patient is read on its own and a Medication through the
/// entries that reference it; the other resources that only give context map to nothing.
pub(super) fn map_resource(
    resource: &Resource,
    medications: &HashMap<String, f::CodeableConcept>,
    folded: &Folded,
    ctx: &Ctx<'_>,
) -> Result<Mapped, ImportError> {
    match resource {
        Resource::Patient(_) | Resource::Medication(_) | Resource::Composition(_) => Ok(Mapped::Nothing),
        Resource::Practitioner(_) | Resource::PractitionerRole(_) | Resource::Organization(_) => {
            Ok(Mapped::Nothing)
        }
        Resource::Condition(c) => problem(c, ctx),
        Resource::AllergyIntolerance(a) => allergy(a, ctx),
        Resource::MedicationStatement(m) => medication_statement(m, medications, ctx),
        Resource::MedicationRequest(m) => medication_request(m, medications, ctx),
        Resource::Flag(flag) => flag_alert(flag, ctx),
        Resource::Consent(c) => consent_alert(c, ctx),
        Resource::DocumentReference(d) => document_reference(d, ctx),
        Resource::CarePlan(c) => care_plan(c, ctx),
        Resource::RelatedPerson(r) => contact(r, ctx),
        Resource::Encounter(e) => encounter(e, folded, ctx),
        Resource::Observation(_) if folded.consumed.contains(&ctx.index) => Ok(Mapped::Nothing),
        Resource::Observation(o) => observation_result(o, ctx),
        Resource::DiagnosticReport(d) => diagnostic_report(d, ctx),
    }
}

fn problem(c: &f::Condition, ctx: &Ctx<'_>) -> Result<Mapped, ImportError> {
    let common = &c.common;
    let code = require(&c.code, ctx, "code")?;
    if let Some(mapped) = absent_entry(&c.code, "no-known-problems", Section::Problems, common, ctx)? {
        return Ok(mapped);
    }
    let (id, source) = source_key(common, "Condition", ctx)?;
    let mut p = s::Problem::new(&ctx.text(code)?, ctx.provenance(common)?);
    p.code = code_of(code);
    p.clinical_status = status_of(&c.clinical_status).unwrap_or_else(|| "active".into());
    p.verification_status = status_of(&c.verification_status).unwrap_or_else(|| s::CONFIRMED.into());
    p.onset = c.onset_date_time.clone();
    p.note = c.note.first().map(|n| n.text.clone());
    Ok(entry(id, source, p))
}

fn allergy(a: &f::AllergyIntolerance, ctx: &Ctx<'_>) -> Result<Mapped, ImportError> {
    let common = &a.common;
    let code = require(&a.code, ctx, "code")?;
    if let Some(mapped) = absent_entry(&a.code, "no-known-allergies", Section::Allergies, common, ctx)? {
        return Ok(mapped);
    }
    let (id, source) = source_key(common, "AllergyIntolerance", ctx)?;
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
    Ok(entry(id, source, x))
}

fn medication_statement(
    m: &f::MedicationStatement,
    medications: &HashMap<String, f::CodeableConcept>,
    ctx: &Ctx<'_>,
) -> Result<Mapped, ImportError> {
    let common = &m.common;
    let concept =
        medication_concept(&m.medication_codeable_concept, &m.medication_reference, medications, ctx)?;
    let absent = Some(concept.clone());
    if let Some(mapped) = absent_entry(&absent, "no-known-medications", Section::Medications, common, ctx)? {
        return Ok(mapped);
    }
    let (id, source) = source_key(common, "MedicationStatement", ctx)?;
    let mut x = medication(&concept, &m.dosage, ctx.provenance(common)?, ctx)?;
    x.status = m.status.clone();
    x.kind = m.category.as_ref().and_then(text_of);
    in_error_by_status(&m.status, &mut x.verification_status);
    Ok(entry(id, source, x))
}

fn medication_request(
    m: &f::MedicationRequest,
    medications: &HashMap<String, f::CodeableConcept>,
    ctx: &Ctx<'_>,
) -> Result<Mapped, ImportError> {
    let common = &m.common;
    let concept =
        medication_concept(&m.medication_codeable_concept, &m.medication_reference, medications, ctx)?;
    let (id, source) = source_key(common, "MedicationRequest", ctx)?;
    let mut x = medication(&concept, &m.dosage_instruction, ctx.provenance(common)?, ctx)?;
    x.status = m.status.clone();
    x.kind = m
        .course_of_therapy_type
        .as_ref()
        .and_then(|c| status_of(&Some(c.clone())))
        .map(|k| if k == "continuous" { "repeat".to_string() } else { k });
    in_error_by_status(&m.status, &mut x.verification_status);
    Ok(entry(id, source, x))
}

fn flag_alert(flag: &f::Flag, ctx: &Ctx<'_>) -> Result<Mapped, ImportError> {
    let common = &flag.common;
    let (id, source) = source_key(common, "Flag", ctx)?;
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
    Ok(entry(id, source, x))
}

fn consent_alert(c: &f::Consent, ctx: &Ctx<'_>) -> Result<Mapped, ImportError> {
    let common = &c.common;
    let (id, source) = source_key(common, "Consent", ctx)?;
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
    Ok(entry(id, source, x))
}

/// An advance directive becomes an alert; any other document, a letter.
fn document_reference(d: &f::DocumentReference, ctx: &Ctx<'_>) -> Result<Mapped, ImportError> {
    let common = &d.common;
    let (id, source) = source_key(common, "DocumentReference", ctx)?;
    let advance_directive = d
        .category
        .iter()
        .chain(d.kind.iter())
        .flat_map(|c| &c.coding)
        .any(|c| c.code.as_deref() == Some("42348-3") || c.system.as_deref() == Some(ALERT_KIND_SYSTEM));
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
        Ok(entry(id, source, x))
    } else {
        let mut x = s::Report::new("letter", &title, ctx.provenance(common)?);
        x.code = d.kind.as_ref().and_then(code_of);
        x.effective = d
            .date
            .clone()
            .or_else(|| d.context.as_ref().and_then(|c| c.period.as_ref()).and_then(|p| p.start.clone()));
        x.status = if d.status == "current" { "final".into() } else { d.status.clone() };
        Ok(entry(id, source, x))
    }
}

fn care_plan(c: &f::CarePlan, ctx: &Ctx<'_>) -> Result<Mapped, ImportError> {
    let common = &c.common;
    let (id, source) = source_key(common, "CarePlan", ctx)?;
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
    Ok(entry(id, source, x))
}

fn contact(r: &f::RelatedPerson, ctx: &Ctx<'_>) -> Result<Mapped, ImportError> {
    let common = &r.common;
    let (id, source) = source_key(common, "RelatedPerson", ctx)?;
    let name = r.name.first().and_then(|n| {
        n.text.clone().or_else(|| {
            let full = [n.given.join(" "), n.family.clone().unwrap_or_default()].join(" ").trim().to_string();
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
    x.phone = r.telecom.iter().find(|t| t.system.as_deref() != Some("email")).and_then(|t| t.value.clone());
    Ok(entry(id, source, x))
}

fn encounter(e: &f::Encounter, folded: &Folded, ctx: &Ctx<'_>) -> Result<Mapped, ImportError> {
    let common = &e.common;
    let (id, source) = source_key(common, "Encounter", ctx)?;
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
    in_error_by_status(&e.status, &mut x.verification_status);
    Ok(entry(id, source, x))
}

/// An Observation not folded into an Encounter's vitals: a result of its own.
fn observation_result(o: &f::Observation, ctx: &Ctx<'_>) -> Result<Mapped, ImportError> {
    let common = &o.common;
    let (id, source) = source_key(common, "Observation", ctx)?;
    let mut x = s::Report::new("result", &ctx.text(&o.code)?, ctx.provenance(common)?);
    x.code = code_of(&o.code);
    x.value = o
        .value_string
        .clone()
        .or_else(|| o.value_quantity.as_ref().and_then(|q| q.value).map(|v| v.to_string()));
    x.unit = o.value_quantity.as_ref().and_then(|q| q.unit.clone());
    x.effective = o.effective_date_time.clone();
    x.status = o.status.clone();
    in_error_by_status(&o.status, &mut x.verification_status);
    Ok(entry(id, source, x))
}

fn diagnostic_report(d: &f::DiagnosticReport, ctx: &Ctx<'_>) -> Result<Mapped, ImportError> {
    let common = &d.common;
    let (id, source) = source_key(common, "DiagnosticReport", ctx)?;
    let mut x = s::Report::new("report", &ctx.text(&d.code)?, ctx.provenance(common)?);
    x.code = code_of(&d.code);
    x.value = d.conclusion.clone();
    x.effective = d.effective_date_time.clone();
    x.status = d.status.clone();
    in_error_by_status(&d.status, &mut x.verification_status);
    Ok(entry(id, source, x))
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
