//! Exporting a patient's summary as an HL7 FHIR International Patient Summary document Bundle.
//!
//! Over 600 lines because it is one builder per IPS section and resource, in document order.
//!
//! The Composition (LOINC 60591-5) has the three required sections (medications, allergies,
//! problems), each with entries or, when empty, an IPS absent/unknown entry saying "none known"
//! or "no information"; then alerts, plan of care, results, letters and encounters when present.
//! Entered-in-error entries are left out, as the IPS requires. Every resource carries its
//! care-sync entry id and provenance, so importing the export reproduces the record.

use care_node::summary::{
    self as s, Code, PatientSummary, Provenance, Section, SectionEntry, SectionState, SummaryError,
};
use serde_json::json;
use uuid::Uuid;

use super::model::{self as f, Resource};
use super::*;

/// Marks a required FHIR element we have no value for; import reads it as "absent".
pub const UNSPECIFIED_SYSTEM: &str = "https://care-sync.example/fhir/CodeSystem/unspecified";

fn concept(code: &Option<Code>, text: &str) -> f::CodeableConcept {
    f::CodeableConcept {
        coding: code
            .iter()
            .map(|c| f::Coding {
                system: Some(c.system.clone()),
                code: Some(c.code.clone()),
                display: Some(c.display.clone()),
            })
            .collect(),
        text: Some(text.to_string()),
    }
}

fn status_concept(system: &str, code: &str) -> f::CodeableConcept {
    f::CodeableConcept {
        coding: vec![f::Coding { system: Some(system.into()), code: Some(code.into()), display: None }],
        text: None,
    }
}

fn text(value: &Option<String>) -> Option<f::CodeableConcept> {
    value.as_ref().map(|t| f::CodeableConcept { coding: Vec::new(), text: Some(t.clone()) })
}

fn string_ext(url: &str, value: &str) -> f::Extension {
    f::Extension { url: url.into(), value_string: Some(value.into()), ..Default::default() }
}

fn provenance_ext(p: &Provenance) -> f::Extension {
    let mut parts = vec![
        string_ext("device", &p.device),
        string_ext("deviceName", &p.device_name),
        string_ext("role", &p.role),
        string_ext("recordedAtMs", &p.recorded_at_ms.to_string()),
    ];
    if let Some(o) = p.clock_offset_ms {
        parts.push(string_ext("clockOffsetMs", &o.to_string()));
    }
    if let Some(x) = &p.person {
        parts.push(string_ext("person", x));
    }
    if let Some(x) = &p.source {
        parts.push(string_ext("source", x));
    }
    f::Extension { url: PROVENANCE_EXT.into(), extension: parts, ..Default::default() }
}

fn common(id: Uuid, provenance: &Provenance) -> f::Common {
    f::Common {
        id: Some(id.to_string()),
        identifier: vec![f::Identifier {
            system: Some(ENTRY_SYSTEM.into()),
            value: Some(id.to_string()),
            extension: Vec::new(),
        }],
        extension: vec![provenance_ext(provenance)],
    }
}

/// A FHIR `instant`: a date and time to the second, with a time zone.
fn is_instant(value: &str) -> bool {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339).is_ok()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

struct Builder {
    patient_ref: f::Reference,
    entries: Vec<f::BundleEntry>,
}

impl Builder {
    fn push(&mut self, resource: Resource) -> f::Reference {
        let id = resource.common().id.clone().unwrap_or_else(|| Uuid::new_v4().to_string());
        let url = format!("urn:uuid:{id}");
        self.entries.push(f::BundleEntry { full_url: Some(url.clone()), resource });
        f::Reference { reference: Some(url), ..Default::default() }
    }

    fn subject(&self) -> f::Reference {
        self.patient_ref.clone()
    }
}

fn section_code(loinc: &str, display: &str) -> f::CodeableConcept {
    f::CodeableConcept {
        coding: vec![f::Coding {
            system: Some(care_node::summary::LOINC.into()),
            code: Some(loinc.into()),
            display: Some(display.into()),
        }],
        text: None,
    }
}

fn section_of(
    title: &str,
    loinc: &str,
    display: &str,
    lines: Vec<String>,
    entry: Vec<f::Reference>,
) -> f::CompositionSection {
    let items: String = lines.iter().map(|l| format!("<li>{}</li>", html_escape(l))).collect();
    f::CompositionSection {
        title: title.into(),
        code: section_code(loinc, display),
        text: Some(f::Narrative {
            status: "generated".into(),
            div: format!("<div xmlns=\"http://www.w3.org/1999/xhtml\"><ul>{items}</ul></div>"),
        }),
        entry,
        empty_reason: None,
    }
}

/// Non-error entries of a section with their ids.
fn live<T: SectionEntry>(summary: &mut PatientSummary) -> Result<Vec<(Uuid, T)>, SummaryError> {
    Ok(summary.clinical_entries::<T>()?.into_iter().map(|e| (e.id, e.data)).collect())
}

fn absent(code: &str, display: &str) -> f::CodeableConcept {
    f::CodeableConcept {
        coding: vec![f::Coding {
            system: Some(ABSENT_UNKNOWN_SYSTEM.into()),
            code: Some(code.into()),
            display: Some(display.into()),
        }],
        text: Some(display.into()),
    }
}

/// The patient's summary as an IPS document Bundle (JSON value).
pub fn export_ips(summary: &mut PatientSummary, now_ms: i64) -> Result<serde_json::Value, SummaryError> {
    let patient_id = summary.patient_id()?;
    let d = summary.demographics()?;
    let patient = patient_resource(patient_id, &d);
    let composition_id = Uuid::new_v4();
    let mut b = Builder { patient_ref: f::Reference::default(), entries: Vec::new() };
    // The Composition goes first; it is filled in once the sections are known.
    let placeholder = Resource::Organization(f::Ignored::default());
    b.entries
        .push(f::BundleEntry { full_url: Some(format!("urn:uuid:{composition_id}")), resource: placeholder });
    b.patient_ref = b.push(Resource::Patient(patient));

    let mut sections = vec![
        medications_section(summary, &mut b)?,
        allergies_section(summary, &mut b)?,
        problems_section(summary, &mut b)?,
    ];
    sections.extend(alerts_section(summary, &mut b)?);
    sections.extend(care_plan_section(summary, &mut b)?);
    let (results, letters) = report_sections(summary, &mut b)?;
    sections.extend(results);
    sections.extend(letters);
    let (vital_signs, encounters) = encounter_sections(summary, &mut b)?;
    sections.extend(vital_signs);
    sections.extend(encounters);
    push_contacts(summary, &mut b)?;

    let date = care_node::view::iso_time(now_ms).unwrap_or_default();
    b.entries[0].resource = Resource::Composition(composition(composition_id, b.subject(), &date, sections));
    let bundle = document_bundle(date, b.entries);
    Ok(serde_json::to_value(bundle).unwrap_or_else(|_| json!({})))
}

/// The Patient resource: identifiers, name, gender, birth date, address and GP practice.
fn patient_resource(patient_id: s::PatientId, d: &s::Demographics) -> f::Patient {
    f::Patient {
        common: f::Common {
            id: Some(patient_id.to_string()),
            identifier: patient_identifiers(patient_id, d),
            extension: Vec::new(),
        },
        name: vec![f::HumanName {
            text: Some(d.name.clone()),
            family: d.family.clone(),
            given: d.given.iter().cloned().collect(),
        }],
        gender: d.sex.clone(),
        birth_date: d.date_of_birth.clone(),
        address: if d.address_lines.is_some() || d.city.is_some() || d.postcode.is_some() {
            vec![f::Address {
                line: d.address_lines.clone().unwrap_or_default(),
                city: d.city.clone(),
                postal_code: d.postcode.clone(),
            }]
        } else {
            Vec::new()
        },
        general_practitioner: if d.gp_practice_code.is_some() || d.gp_practice_name.is_some() {
            vec![f::Reference {
                reference: None,
                identifier: d.gp_practice_code.as_ref().map(|c| f::Identifier {
                    system: Some(ODS_SYSTEM.into()),
                    value: Some(c.clone()),
                    extension: Vec::new(),
                }),
                display: d.gp_practice_name.clone(),
            }]
        } else {
            Vec::new()
        },
    }
}

/// The patient's identifiers: the NHS number with its verification status, then the care-sync id.
fn patient_identifiers(patient_id: s::PatientId, d: &s::Demographics) -> Vec<f::Identifier> {
    let mut identifiers = Vec::new();
    if let Some(nhs) = &d.nhs_number {
        let status = d.nhs_number_status.as_ref().map(|st| f::Extension {
            url: NHS_STATUS_EXT.into(),
            value_codeable_concept: Some(f::CodeableConcept {
                coding: vec![f::Coding {
                    system: Some(
                        "https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland".into(),
                    ),
                    code: (st == "number-present-and-verified").then(|| "01".to_string()),
                    display: Some(st.clone()),
                }],
                text: None,
            }),
            ..Default::default()
        });
        identifiers.push(f::Identifier {
            system: Some(NHS_NUMBER_SYSTEM.into()),
            value: Some(nhs.clone()),
            extension: status.into_iter().collect(),
        });
    }
    identifiers.push(f::Identifier {
        system: Some(PATIENT_SYSTEM.into()),
        value: Some(patient_id.to_string()),
        extension: Vec::new(),
    });
    identifiers
}

/// The Medication Summary section (required), with an absent/unknown entry when empty.
fn medications_section(
    summary: &mut PatientSummary,
    b: &mut Builder,
) -> Result<f::CompositionSection, SummaryError> {
    let (mut refs, mut lines) = (Vec::new(), Vec::new());
    for (id, m) in live::<s::Medication>(summary)? {
        lines.push(m.summary_line());
        refs.push(b.push(Resource::MedicationStatement(f::MedicationStatement {
            common: common(id, &m.provenance),
            status: m.status.clone(),
            category: text(&m.kind),
            medication_codeable_concept: Some(concept(&m.code, &m.name)),
            medication_reference: None,
            subject: b.subject(),
            dosage: if m.dose.is_some() || m.route.is_some() || m.frequency.is_some() {
                vec![f::Dosage {
                    text: m.dose.clone(),
                    route: text(&m.route),
                    timing: m.frequency.as_ref().map(|fq| f::Timing { code: text(&Some(fq.clone())) }),
                }]
            } else {
                Vec::new()
            },
        })));
    }
    if refs.is_empty() {
        let (code, display) = match summary.section_state(Section::Medications)? {
            SectionState::NoneKnown(_) => ("no-known-medications", "No known medications"),
            _ => ("no-medication-info", "No information about medications"),
        };
        lines.push(display.into());
        refs.push(b.push(Resource::MedicationStatement(f::MedicationStatement {
            common: f::Common { id: Some(Uuid::new_v4().to_string()), ..Default::default() },
            status: "unknown".into(),
            medication_codeable_concept: Some(absent(code, display)),
            subject: b.subject(),
            ..Default::default()
        })));
    }
    Ok(section_of("Medication Summary", "10160-0", "History of Medication use Narrative", lines, refs))
}

/// The Allergies and Intolerances section (required), with an absent/unknown entry when empty.
fn allergies_section(
    summary: &mut PatientSummary,
    b: &mut Builder,
) -> Result<f::CompositionSection, SummaryError> {
    let (mut refs, mut lines) = (Vec::new(), Vec::new());
    for (id, a) in live::<s::Allergy>(summary)? {
        lines.push(a.summary_line());
        let reaction = allergy_reaction(&a);
        refs.push(b.push(Resource::AllergyIntolerance(f::AllergyIntolerance {
            common: common(id, &a.provenance),
            clinical_status: a.clinical_status.as_ref().map(|c| {
                status_concept("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", c)
            }),
            verification_status: Some(status_concept(
                "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                &a.verification_status,
            )),
            kind: a.kind.clone(),
            category: a.category.iter().cloned().collect(),
            criticality: a.criticality.clone(),
            code: Some(concept(&a.code, &a.substance)),
            patient: b.subject(),
            onset_date_time: a.onset.clone(),
            reaction,
        })));
    }
    if refs.is_empty() {
        let (code, display) = match summary.section_state(Section::Allergies)? {
            SectionState::NoneKnown(_) => ("no-known-allergies", "No known allergies"),
            _ => ("no-allergy-info", "No information about allergies"),
        };
        lines.push(display.into());
        refs.push(b.push(Resource::AllergyIntolerance(f::AllergyIntolerance {
            common: f::Common { id: Some(Uuid::new_v4().to_string()), ..Default::default() },
            code: Some(absent(code, display)),
            patient: b.subject(),
            ..Default::default()
        })));
    }
    Ok(section_of(
        "Allergies and Intolerances",
        "48765-2",
        "Allergies and adverse reactions Document",
        lines,
        refs,
    ))
}

/// An allergy's reaction, if any part of one was recorded; a reaction without a manifestation
/// gets an "unspecified" one, which FHIR requires.
fn allergy_reaction(a: &s::Allergy) -> Vec<f::Reaction> {
    if a.reaction.is_some() || a.reaction_code.is_some() || a.severity.is_some() {
        let manifestation = match (&a.reaction, &a.reaction_code) {
            (Some(r), code) => concept(code, r),
            (None, Some(c)) => concept(&Some(c.clone()), &c.display),
            (None, None) => f::CodeableConcept {
                coding: vec![f::Coding {
                    system: Some(UNSPECIFIED_SYSTEM.into()),
                    code: Some("unspecified".into()),
                    display: None,
                }],
                text: None,
            },
        };
        vec![f::Reaction { manifestation: vec![manifestation], severity: a.severity.clone() }]
    } else {
        Vec::new()
    }
}

/// The Problems section (required), with an absent/unknown entry when empty.
fn problems_section(
    summary: &mut PatientSummary,
    b: &mut Builder,
) -> Result<f::CompositionSection, SummaryError> {
    let (mut refs, mut lines) = (Vec::new(), Vec::new());
    for (id, p) in live::<s::Problem>(summary)? {
        lines.push(p.summary_line());
        refs.push(b.push(Resource::Condition(f::Condition {
            common: common(id, &p.provenance),
            clinical_status: Some(status_concept(
                "http://terminology.hl7.org/CodeSystem/condition-clinical",
                &p.clinical_status,
            )),
            verification_status: Some(status_concept(
                "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                &p.verification_status,
            )),
            code: Some(concept(&p.code, &p.description)),
            subject: b.subject(),
            onset_date_time: p.onset.clone(),
            note: p.note.iter().map(|n| f::Annotation { text: n.clone() }).collect(),
        })));
    }
    if refs.is_empty() {
        let (code, display) = match summary.section_state(Section::Problems)? {
            SectionState::NoneKnown(_) => ("no-known-problems", "No known problems"),
            _ => ("no-problem-info", "No information about problems"),
        };
        lines.push(display.into());
        refs.push(b.push(Resource::Condition(f::Condition {
            common: f::Common { id: Some(Uuid::new_v4().to_string()), ..Default::default() },
            code: Some(absent(code, display)),
            subject: b.subject(),
            ..Default::default()
        })));
    }
    Ok(section_of("Problems", "11450-4", "Problem list - Reported", lines, refs))
}

/// The Alerts section of Flags, if there are any alerts.
fn alerts_section(
    summary: &mut PatientSummary,
    b: &mut Builder,
) -> Result<Option<f::CompositionSection>, SummaryError> {
    let (mut refs, mut lines) = (Vec::new(), Vec::new());
    for (id, a) in live::<s::Alert>(summary)? {
        lines.push(a.summary_line());
        refs.push(
            b.push(Resource::Flag(f::Flag {
                common: common(id, &a.provenance),
                status: a.status.clone().unwrap_or_else(|| "active".into()),
                category: vec![status_concept(ALERT_KIND_SYSTEM, &a.kind)],
                code: concept(&a.code, &a.description),
                subject: b.subject(),
                period: (a.decision_date.is_some() || a.review_date.is_some())
                    .then(|| f::Period { start: a.decision_date.clone(), end: a.review_date.clone() }),
                author: a
                    .author
                    .as_ref()
                    .map(|x| f::Reference { display: Some(x.clone()), ..Default::default() }),
            })),
        );
    }
    Ok((!refs.is_empty()).then(|| section_of("Alerts", "104605-1", "Alert", lines, refs)))
}

/// The Plan of Care section of CarePlans, if there are any.
fn care_plan_section(
    summary: &mut PatientSummary,
    b: &mut Builder,
) -> Result<Option<f::CompositionSection>, SummaryError> {
    let (mut refs, mut lines) = (Vec::new(), Vec::new());
    for (id, c) in live::<s::CarePlan>(summary)? {
        lines.push(c.summary_line());
        refs.push(b.push(Resource::CarePlan(f::CarePlan {
            common: common(id, &c.provenance),
            status: c.status.clone(),
            intent: Some("plan".into()),
            title: Some(c.title.clone()),
            description: c.description.clone(),
            subject: b.subject(),
            period: c.period_start.as_ref().map(|p| f::Period { start: Some(p.clone()), end: None }),
            author:
                c.author.as_ref().map(|x| f::Reference { display: Some(x.clone()), ..Default::default() }),
        })));
    }
    Ok((!refs.is_empty()).then(|| section_of("Plan of Care", "18776-5", "Plan of care note", lines, refs)))
}

/// The Results and Letters sections, each if it has entries: letters as DocumentReferences,
/// reports as DiagnosticReports, other results as Observations.
fn report_sections(
    summary: &mut PatientSummary,
    b: &mut Builder,
) -> Result<(Option<f::CompositionSection>, Option<f::CompositionSection>), SummaryError> {
    let (mut results, mut result_lines, mut letters, mut letter_lines) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (id, r) in live::<s::Report>(summary)? {
        let common = common(id, &r.provenance);
        match r.kind.as_str() {
            "letter" => {
                letter_lines.push(r.summary_line());
                letters.push(b.push(Resource::DocumentReference(letter_document(common, &r, b.subject()))));
            }
            "report" => {
                result_lines.push(r.summary_line());
                results.push(b.push(Resource::DiagnosticReport(f::DiagnosticReport {
                    common,
                    status: r.status.clone(),
                    code: concept(&r.code, &r.title),
                    subject: Some(b.subject()),
                    effective_date_time: r.effective.clone(),
                    conclusion: r.value.clone(),
                })));
            }
            _ => {
                result_lines.push(r.summary_line());
                results.push(b.push(Resource::Observation(result_observation(common, &r, b.subject()))));
            }
        }
    }
    let results_section = (!results.is_empty()).then(|| {
        section_of(
            "Results",
            "30954-2",
            "Relevant diagnostic tests/laboratory data Narrative",
            result_lines,
            results,
        )
    });
    let letters_section = (!letters.is_empty())
        .then(|| section_of("Letters", "34133-9", "Summary of episode note", letter_lines, letters));
    Ok((results_section, letters_section))
}

/// A letter as a DocumentReference.
fn letter_document(common: f::Common, r: &s::Report, subject: f::Reference) -> f::DocumentReference {
    // `date` is an instant (with a time zone); a letter dated by day only keeps its
    // date as the period of care it covers.
    let instant = r.effective.as_deref().filter(|d| is_instant(d)).map(str::to_string);
    let period = r.effective.clone().filter(|_| instant.is_none());
    f::DocumentReference {
        common,
        status: "current".into(),
        kind: Some(concept(&r.code, &r.title)),
        subject: Some(subject),
        date: instant,
        description: Some(r.title.clone()),
        content: vec![f::DocumentContent {
            attachment: f::Attachment {
                content_type: Some("text/plain".into()),
                title: Some(r.title.clone()),
            },
        }],
        context: period.map(|p| f::DocumentContext { period: Some(f::Period { start: Some(p), end: None }) }),
        ..Default::default()
    }
}

/// A result as an Observation: a quantity when the value is a number that prints back the same,
/// otherwise a string.
fn result_observation(common: f::Common, r: &s::Report, subject: f::Reference) -> f::Observation {
    let numeric = r.value.as_ref().and_then(|v| v.parse::<f64>().ok().filter(|n| n.to_string() == *v));
    f::Observation {
        common,
        status: r.status.clone(),
        code: concept(&r.code, &r.title),
        subject: Some(subject),
        effective_date_time: r.effective.clone(),
        value_quantity: numeric.map(|n| f::Quantity {
            value: Some(n),
            unit: r.unit.clone(),
            ..Default::default()
        }),
        value_string: if numeric.is_some() { None } else { r.value.clone() },
        ..Default::default()
    }
}

/// The Vital Signs and Encounters sections, each if it has entries: an Encounter per encounter,
/// and the vital-sign Observations recorded at it.
fn encounter_sections(
    summary: &mut PatientSummary,
    b: &mut Builder,
) -> Result<(Option<f::CompositionSection>, Option<f::CompositionSection>), SummaryError> {
    let (mut refs, mut lines) = (Vec::new(), Vec::new());
    let (mut vital_refs, mut vital_lines) = (Vec::new(), Vec::new());
    for (id, e) in live::<s::Encounter>(summary)? {
        lines.push(e.summary_line());
        let encounter = b.push(Resource::Encounter(encounter_resource(id, &e, b.subject())));
        if let Some(v) = &e.vitals {
            vital_lines.push(format!(
                "{}: {}",
                e.start.as_deref().unwrap_or("undated"),
                care_node::summary::vitals_line(v)
            ));
            for o in super::vitals::export(v, id, &encounter, &b.subject(), e.start.as_deref()) {
                vital_refs.push(b.push(Resource::Observation(o)));
            }
        }
        refs.push(encounter);
    }
    let vital_signs_section = (!vital_refs.is_empty())
        .then(|| section_of("Vital Signs", "8716-3", "Vital signs", vital_lines, vital_refs));
    let encounters_section = (!refs.is_empty()).then(|| {
        section_of(
            "Encounters",
            "46240-8",
            "History of Hospitalizations+Outpatient visits Narrative",
            lines,
            refs,
        )
    });
    Ok((vital_signs_section, encounters_section))
}

/// An encounter as an Encounter resource, with its visit number as a second identifier.
fn encounter_resource(id: Uuid, e: &s::Encounter, subject: f::Reference) -> f::Encounter {
    let mut common = common(id, &e.provenance);
    if let Some(visit) = &e.visit {
        common.identifier.push(f::Identifier {
            system: Some(VISIT_SYSTEM.into()),
            value: Some(visit.clone()),
            extension: Vec::new(),
        });
    }
    f::Encounter {
        common,
        status: e.status.clone(),
        class: Some(match &e.class {
            Some(c) => f::Coding {
                system: Some("http://terminology.hl7.org/CodeSystem/v3-ActCode".into()),
                code: Some(c.clone()),
                display: None,
            },
            None => f::Coding {
                system: Some(UNSPECIFIED_SYSTEM.into()),
                code: Some("unspecified".into()),
                display: None,
            },
        }),
        kind: vec![f::CodeableConcept { coding: Vec::new(), text: Some(e.kind.clone()) }],
        subject: Some(subject),
        period: (e.start.is_some() || e.end.is_some())
            .then(|| f::Period { start: e.start.clone(), end: e.end.clone() }),
        reason_code: text(&e.reason).into_iter().collect(),
        location: e
            .location
            .iter()
            .map(|l| f::EncounterLocation {
                location: f::Reference { display: Some(l.clone()), ..Default::default() },
            })
            .collect(),
        service_provider: e
            .facility
            .as_ref()
            .map(|x| f::Reference { display: Some(x.clone()), ..Default::default() }),
    }
}

/// Adds the contacts to the Bundle as RelatedPersons.
fn push_contacts(summary: &mut PatientSummary, b: &mut Builder) -> Result<(), SummaryError> {
    // Contacts travel in the Bundle (RelatedPerson); IPS has no section for them.
    for (id, c) in live::<s::Contact>(summary)? {
        b.push(Resource::RelatedPerson(f::RelatedPerson {
            common: common(id, &c.provenance),
            patient: b.subject(),
            relationship: vec![f::CodeableConcept {
                coding: vec![f::Coding {
                    system: Some("https://care-sync.example/fhir/CodeSystem/relationship".into()),
                    code: Some(c.relationship.clone()),
                    display: None,
                }],
                text: Some(c.relationship.clone()),
            }],
            name: vec![f::HumanName { text: Some(c.name.clone()), ..Default::default() }],
            telecom: c
                .phone
                .iter()
                .map(|p| f::ContactPoint { system: Some("phone".into()), value: Some(p.clone()) })
                .collect(),
        }));
    }
    Ok(())
}

/// The IPS Composition (LOINC 60591-5) holding the sections.
fn composition(
    id: Uuid,
    subject: f::Reference,
    date: &str,
    section: Vec<f::CompositionSection>,
) -> f::Composition {
    f::Composition {
        common: f::Common { id: Some(id.to_string()), ..Default::default() },
        status: "final".into(),
        kind: section_code("60591-5", "Patient summary Document"),
        subject,
        date: date.to_string(),
        author: vec![f::Reference {
            display: Some("care-sync regional server".into()),
            ..Default::default()
        }],
        title: format!("Patient Summary as of {date}"),
        section,
    }
}

/// The document Bundle around the entries, with a fresh id and identifier.
fn document_bundle(timestamp: String, entry: Vec<f::BundleEntry>) -> f::Bundle {
    f::Bundle {
        resource_type: "Bundle".into(),
        id: Some(Uuid::new_v4().to_string()),
        identifier: Some(f::Identifier {
            system: Some("urn:ietf:rfc:3986".into()),
            value: Some(format!("urn:uuid:{}", Uuid::new_v4())),
            extension: Vec::new(),
        }),
        kind: "document".into(),
        timestamp: Some(timestamp),
        entry,
    }
}
