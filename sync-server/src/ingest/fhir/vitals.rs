//! A crew's observations as FHIR vital-sign `Observation`s, and back.
//!
//! Each parameter recorded is one Observation with the code of the FHIR vital-signs profiles
//! (LOINC, category `vital-signs`, UCUM units) where there is one, and the UK Core SNOMED CT code
//! where NHS England defines it (ACVPU, NEWS2 total, both category `survey`). Every Observation
//! points at its Encounter (`Observation.encounter`), is dated at the encounter's start, and goes
//! in the IPS Vital Signs section (LOINC 8716-3). When there is no NEWS2 total, the NEWS2
//! Observation has a `dataAbsentReason` saying why (not applicable under 16 or in pregnancy, or
//! observations incomplete), with a care-sync code that keeps which.
//!
//! Import folds these Observations back into their Encounter's vitals, so export → import is
//! lossless. Codes not listed here stay ordinary results.

use care_node::summary::{LOINC, SNOMED, Vitals};
use uuid::Uuid;

use super::model as f;

/// FHIR's observation categories.
pub const CATEGORY_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
/// UCUM units.
pub const UCUM: &str = "http://unitsofmeasure.org";
/// FHIR's data-absent reasons.
pub const ABSENT_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/data-absent-reason";
/// care-sync's codes for what FHIR and UK Core do not code: the SpO2 scale in use, and why a
/// NEWS2 total is absent.
pub const NEWS2_SYSTEM: &str = "https://care-sync.example/fhir/CodeSystem/news2";

const RESPIRATORY_RATE: &str = "9279-1";
const OXYGEN_SATURATION: &str = "59408-5";
const OXYGEN_SATURATION_ARTERIAL: &str = "2708-6";
const SYSTOLIC_BP: &str = "8480-6";
const HEART_RATE: &str = "8867-4";
const BODY_TEMPERATURE: &str = "8310-5";
const PREGNANCY_STATUS: &str = "82810-3";
/// UK Core: Alert Confusion Voice Pain Unresponsive scale score.
const ACVPU: &str = "1104441000000107";
/// UK Core: Royal College of Physicians NEWS2 (National Early Warning Score 2) total score.
const NEWS2_TOTAL: &str = "1104051000000101";
/// UK Core's NEWS2 "air or oxygen" parameter: a finding, on oxygen or on air.
const AIR_OR_OXYGEN: &str = "air-or-oxygen";
const ON_OXYGEN: &str = "371825009";
const ON_AIR: &str = "722742002";
const PREGNANT: &str = "77386006";
const NOT_PREGNANT: &str = "60001007";

/// The ACVPU letters and their SNOMED CT findings (UK Core's ACVPU value set).
const ACVPU_VALUES: [(&str, &str, &str); 5] = [
    ("A", "248234008", "Mentally alert"),
    ("C", "130987000", "Acute confusion"),
    ("V", "300202002", "Responds to voice"),
    ("P", "450847001", "Responds to pain"),
    ("U", "422768004", "Unresponsive"),
];

fn coding(system: &str, code: &str, display: &str) -> f::Coding {
    f::Coding { system: Some(system.into()), code: Some(code.into()), display: Some(display.into()) }
}

fn concept(codings: Vec<f::Coding>, text: &str) -> f::CodeableConcept {
    f::CodeableConcept { coding: codings, text: Some(text.into()) }
}

fn category(code: &str, display: &str) -> Vec<f::CodeableConcept> {
    vec![f::CodeableConcept { coding: vec![coding(CATEGORY_SYSTEM, code, display)], text: None }]
}

fn quantity(value: f64, unit: &str, ucum: &str) -> f::Quantity {
    f::Quantity {
        value: Some(value),
        unit: Some(unit.into()),
        system: Some(UCUM.into()),
        code: Some(ucum.into()),
    }
}

/// What every Observation of one encounter's vitals shares: the encounter, the patient and the
/// time.
struct ObservationBase<'a> {
    encounter_id: Uuid,
    encounter: &'a f::Reference,
    subject: &'a f::Reference,
    effective: Option<&'a str>,
}

impl ObservationBase<'_> {
    /// A final Observation of this encounter, its id derived from the encounter's and `part`.
    fn observation(
        &self,
        part: &str,
        category: Vec<f::CodeableConcept>,
        code: f::CodeableConcept,
    ) -> f::Observation {
        f::Observation {
            common: f::Common {
                id: Some(Uuid::new_v5(&self.encounter_id, part.as_bytes()).to_string()),
                ..Default::default()
            },
            status: "final".into(),
            category,
            code,
            subject: Some(self.subject.clone()),
            encounter: Some(self.encounter.clone()),
            effective_date_time: self.effective.map(str::to_string),
            ..Default::default()
        }
    }

    /// A vital-signs Observation with a LOINC code and a measured quantity.
    fn measured(&self, part: &str, code: &str, display: &str, value: f::Quantity) -> f::Observation {
        let mut o = self.observation(part, vital(), loinc(code, display));
        o.value_quantity = Some(value);
        o
    }
}

/// The `vital-signs` category.
fn vital() -> Vec<f::CodeableConcept> {
    category("vital-signs", "Vital Signs")
}

/// The `survey` category.
fn survey() -> Vec<f::CodeableConcept> {
    category("survey", "Survey")
}

/// A LOINC code, its display also the text.
fn loinc(code: &str, display: &str) -> f::CodeableConcept {
    concept(vec![coding(LOINC, code, display)], display)
}

/// The vital-sign Observations of one encounter's vitals: one per parameter recorded, then the
/// NEWS2 total (or why there is none). Ids are derived from the encounter's, so a re-export
/// names the same resources.
pub fn export(
    vitals: &Vitals,
    encounter_id: Uuid,
    encounter: &f::Reference,
    subject: &f::Reference,
    effective: Option<&str>,
) -> Vec<f::Observation> {
    let base = ObservationBase { encounter_id, encounter, subject, effective };
    let mut out = Vec::new();
    if let Some(rr) = vitals.respiration_rate {
        out.push(base.measured(
            "rr",
            RESPIRATORY_RATE,
            "Respiratory rate",
            quantity(rr.into(), "breaths/minute", "/min"),
        ));
    }
    out.extend(oxygen_saturation(&base, vitals));
    out.push(air_or_oxygen(&base, vitals.on_oxygen));
    if let Some(bp) = vitals.systolic_bp {
        out.push(base.measured(
            "sbp",
            SYSTOLIC_BP,
            "Systolic blood pressure",
            quantity(bp.into(), "mmHg", "mm[Hg]"),
        ));
    }
    if let Some(pulse) = vitals.pulse {
        out.push(base.measured(
            "pulse",
            HEART_RATE,
            "Heart rate",
            quantity(pulse.into(), "beats/minute", "/min"),
        ));
    }
    out.extend(acvpu(&base, vitals));
    if let Some(t) = vitals.temperature_c {
        out.push(base.measured("temp", BODY_TEMPERATURE, "Body temperature", quantity(t, "°C", "Cel")));
    }
    if let Some(pregnant) = vitals.pregnant {
        let mut o = base.observation("pregnancy", survey(), loinc(PREGNANCY_STATUS, "Pregnancy status"));
        let (code, display) = if pregnant { (PREGNANT, "Pregnant") } else { (NOT_PREGNANT, "Not pregnant") };
        o.value_codeable_concept = Some(concept(vec![coding(SNOMED, code, display)], display));
        out.push(o);
    }
    out.extend(news2_total(&base, vitals));
    out
}

/// The SpO2 Observation with the NEWS2 scale in use; on scale 2 without a reading the scale is
/// still kept.
fn oxygen_saturation(base: &ObservationBase<'_>, vitals: &Vitals) -> Option<f::Observation> {
    if vitals.spo2.is_none() && vitals.spo2_scale == 1 {
        return None;
    }
    let code = concept(
        vec![
            coding(LOINC, OXYGEN_SATURATION, "Oxygen saturation in Arterial blood by Pulse oximetry"),
            coding(LOINC, OXYGEN_SATURATION_ARTERIAL, "Oxygen saturation in Arterial blood"),
        ],
        "Oxygen saturation",
    );
    let mut o = base.observation("spo2", vital(), code);
    match vitals.spo2 {
        Some(spo2) => o.value_quantity = Some(quantity(spo2.into(), "%", "%")),
        None => {
            o.data_absent_reason =
                Some(concept(vec![coding(ABSENT_SYSTEM, "not-performed", "Not Performed")], "not measured"))
        }
    }
    o.component.push(f::ObservationComponent {
        code: concept(vec![coding(NEWS2_SYSTEM, "spo2-scale", "NEWS2 SpO2 scale")], "NEWS2 SpO2 scale"),
        value_integer: Some(vitals.spo2_scale.into()),
        value_boolean: None,
    });
    Some(o)
}

/// The NEWS2 "air or oxygen" Observation, always written.
fn air_or_oxygen(base: &ObservationBase<'_>, on_oxygen: bool) -> f::Observation {
    let mut o = base.observation(
        "o2",
        survey(),
        concept(vec![coding(NEWS2_SYSTEM, AIR_OR_OXYGEN, "Air or oxygen")], "Air or oxygen"),
    );
    let (code, display) =
        if on_oxygen { (ON_OXYGEN, "Patient on oxygen") } else { (ON_AIR, "Breathing room air") };
    o.value_codeable_concept = Some(concept(vec![coding(SNOMED, code, display)], display));
    o
}

/// The ACVPU Observation, if consciousness was recorded; a letter outside UK Core's value set is
/// kept as text.
fn acvpu(base: &ObservationBase<'_>, vitals: &Vitals) -> Option<f::Observation> {
    let letter = vitals.consciousness.as_ref()?;
    let code = concept(
        vec![coding(SNOMED, ACVPU, "Alert Confusion Voice Pain Unresponsive scale score")],
        "Level of consciousness (ACVPU)",
    );
    let mut o = base.observation("acvpu", survey(), code);
    o.value_codeable_concept = Some(match ACVPU_VALUES.iter().find(|(l, _, _)| l == letter) {
        Some((l, code, display)) => concept(vec![coding(SNOMED, code, display)], l),
        None => f::CodeableConcept { coding: Vec::new(), text: Some(letter.clone()) },
    });
    Some(o)
}

/// The NEWS2 total Observation, or one with a `dataAbsentReason` saying why there is no total;
/// none when neither was recorded.
fn news2_total(base: &ObservationBase<'_>, vitals: &Vitals) -> Option<f::Observation> {
    let news2 = || {
        concept(
            vec![coding(
                SNOMED,
                NEWS2_TOTAL,
                "Royal College of Physicians NEWS2 (National Early Warning Score 2) total score",
            )],
            "NEWS2 total score",
        )
    };
    match (vitals.news2, vitals.news2_withheld.as_deref()) {
        (Some(total), _) => {
            let mut o = base.observation("news2", survey(), news2());
            o.value_quantity = Some(quantity(total.into(), "score", "{score}"));
            Some(o)
        }
        (None, Some(why)) => {
            let mut o = base.observation("news2", survey(), news2());
            let (absent, display) = match why {
                care_node::news2::WITHHELD_INCOMPLETE => ("not-performed", "Not Performed"),
                _ => ("not-applicable", "Not Applicable"),
            };
            o.data_absent_reason = Some(concept(
                vec![
                    coding(ABSENT_SYSTEM, absent, display),
                    coding(NEWS2_SYSTEM, why, care_node::news2::withheld_text(why)),
                ],
                care_node::news2::withheld_text(why),
            ));
            Some(o)
        }
        (None, None) => None,
    }
}

fn has(cc: &f::CodeableConcept, system: &str, code: &str) -> bool {
    cc.coding.iter().any(|c| c.system.as_deref() == Some(system) && c.code.as_deref() == Some(code))
}

fn code_in(cc: &Option<f::CodeableConcept>, system: &str) -> Option<String> {
    cc.as_ref()?.coding.iter().find(|c| c.system.as_deref() == Some(system)).and_then(|c| c.code.clone())
}

/// Whether an Observation is one of the vital signs [`export`] writes, and current (an
/// entered-in-error or cancelled reading is never folded into an encounter's vitals).
pub fn is_vital_sign(o: &f::Observation) -> bool {
    if !matches!(o.status.as_str(), "final" | "amended" | "corrected" | "preliminary") {
        return false;
    }
    [
        (LOINC, RESPIRATORY_RATE),
        (LOINC, OXYGEN_SATURATION),
        (LOINC, OXYGEN_SATURATION_ARTERIAL),
        (LOINC, SYSTOLIC_BP),
        (LOINC, HEART_RATE),
        (LOINC, BODY_TEMPERATURE),
        (LOINC, PREGNANCY_STATUS),
        (SNOMED, ACVPU),
        (SNOMED, NEWS2_TOTAL),
        (NEWS2_SYSTEM, AIR_OR_OXYGEN),
    ]
    .iter()
    .any(|(system, code)| has(&o.code, system, code))
}

/// Folds one vital-sign Observation into `vitals`; an error names the field, never its value.
pub fn fold(vitals: &mut Vitals, o: &f::Observation) -> Result<(), String> {
    let number = || o.value_quantity.as_ref().and_then(|q| q.value);
    let whole = |name: &str| -> Result<Option<u32>, String> {
        match number() {
            None => Ok(None),
            Some(v) if v >= 0.0 && v.fract() == 0.0 && v <= f64::from(u32::MAX) => Ok(Some(v as u32)),
            Some(_) => Err(format!("{name} valueQuantity must be a whole number")),
        }
    };
    let code = &o.code;
    if has(code, LOINC, RESPIRATORY_RATE) {
        vitals.respiration_rate = whole("respiratory rate")?;
    } else if has(code, LOINC, OXYGEN_SATURATION) || has(code, LOINC, OXYGEN_SATURATION_ARTERIAL) {
        vitals.spo2 = whole("oxygen saturation")?;
        if let Some(scale) = o
            .component
            .iter()
            .find(|c| has(&c.code, NEWS2_SYSTEM, "spo2-scale"))
            .and_then(|c| c.value_integer)
        {
            if scale != 1 && scale != 2 {
                return Err("oxygen saturation component spo2-scale must be 1 or 2".into());
            }
            vitals.spo2_scale = scale as u32;
        }
    } else if has(code, NEWS2_SYSTEM, AIR_OR_OXYGEN) {
        vitals.on_oxygen = code_in(&o.value_codeable_concept, SNOMED).as_deref() == Some(ON_OXYGEN);
    } else if has(code, LOINC, SYSTOLIC_BP) {
        vitals.systolic_bp = whole("systolic blood pressure")?;
    } else if has(code, LOINC, HEART_RATE) {
        vitals.pulse = whole("heart rate")?;
    } else if has(code, LOINC, BODY_TEMPERATURE) {
        vitals.temperature_c = number();
    } else if has(code, SNOMED, ACVPU) {
        let value = o.value_codeable_concept.as_ref();
        let by_code = code_in(&o.value_codeable_concept, SNOMED)
            .and_then(|c| ACVPU_VALUES.iter().find(|(_, code, _)| *code == c).map(|(l, _, _)| l.to_string()));
        vitals.consciousness = by_code.or_else(|| value.and_then(|v| v.text.clone()));
    } else if has(code, LOINC, PREGNANCY_STATUS) {
        vitals.pregnant = Some(code_in(&o.value_codeable_concept, SNOMED).as_deref() == Some(PREGNANT));
    } else if has(code, SNOMED, NEWS2_TOTAL) {
        vitals.news2 = whole("NEWS2 total")?;
        vitals.news2_withheld = code_in(&o.data_absent_reason, NEWS2_SYSTEM);
    }
    Ok(())
}

/// Empty vitals to fold Observations into (scale 1, on air, nothing observed).
pub fn empty() -> Vitals {
    Vitals {
        respiration_rate: None,
        spo2: None,
        spo2_scale: 1,
        on_oxygen: false,
        systolic_bp: None,
        pulse: None,
        consciousness: None,
        temperature_c: None,
        news2: None,
        pregnant: None,
        news2_withheld: None,
    }
}
