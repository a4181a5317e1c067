//! The typed content of a patient summary (schema version 2), aligned with the HL7 FHIR
//! International Patient Summary and the NHS Summary Care Record.
//!
//! Every field added after schema version 1 is optional, so a version-1 document reads as a
//! version-2 one with those fields absent (see `migrate.rs`). Coded fields carry a [`Code`]
//! (SNOMED CT, dm+d or LOINC) with its display text; free text stays in the `text`-like fields.

use autosurgeon::{Hydrate, Reconcile};

/// SNOMED CT's FHIR system URI.
pub const SNOMED: &str = "http://snomed.info/sct";
/// The NHS Dictionary of Medicines and Devices' FHIR system URI.
pub const DMD: &str = "https://dmd.nhs.uk";
/// LOINC's FHIR system URI.
pub const LOINC: &str = "http://loinc.org";

/// FHIR verification status that marks an entry as recorded by mistake. Sticky: see
/// [`EnteredInError`].
pub const ENTERED_IN_ERROR: &str = "entered-in-error";
/// The usual verification status of a recorded fact.
pub const CONFIRMED: &str = "confirmed";

/// A coded concept: system URI, code, and the display text clinicians read.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Reconcile, Hydrate)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct Code {
    pub system: String,
    pub code: String,
    pub display: String,
}

impl Code {
    pub fn snomed(code: &str, display: &str) -> Self {
        Self { system: SNOMED.into(), code: code.into(), display: display.into() }
    }

    pub fn dmd(code: &str, display: &str) -> Self {
        Self { system: DMD.into(), code: code.into(), display: display.into() }
    }
}

/// Who recorded an entry, from which device or feed, and when.
#[derive(Debug, Clone, PartialEq, Eq, Reconcile, Hydrate)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct Provenance {
    /// Opaque id of the device (first bytes of its public key, hex), or `server`.
    pub device: String,
    /// The device's enrolled name, or the feed's name (e.g. `GP record`).
    pub device_name: String,
    /// The recording role, e.g. `ambulance-crew`, `community-nurse`, `gp-feed`.
    pub role: String,
    /// Milliseconds since the Unix epoch by the recording device's clock.
    pub recorded_at_ms: i64,
    /// The recording device's clock minus the server's, as measured at its last sync, if known.
    /// Views correct times by it; ordering never depends on device clocks alone.
    #[autosurgeon(missing = "Option::default")]
    pub clock_offset_ms: Option<i64>,
    /// The person who recorded it, when known (e.g. a paramedic's name or a GP).
    #[autosurgeon(missing = "Option::default")]
    pub person: Option<String>,
    /// The source record this entry came from (e.g. `Condition/abc` of a GP bundle).
    #[autosurgeon(missing = "Option::default")]
    pub source: Option<String>,
}

impl Provenance {
    /// The recording time corrected to the server's clock where the offset is known.
    pub fn corrected_time_ms(&self) -> i64 {
        self.recorded_at_ms - self.clock_offset_ms.unwrap_or(0)
    }
}

/// Marks an entry as recorded by mistake. Once present it never goes away: the API has no way to
/// remove it, the server refuses changes that delete anything, and merges keep it.
#[derive(Clone, PartialEq, Eq, Reconcile, Hydrate)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct EnteredInError {
    pub reason: String,
    pub provenance: Provenance,
}

#[derive(Clone, PartialEq, Eq, Reconcile, Hydrate)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct Demographics {
    /// Ten digits, validated; `None` for a patient known only by a provisional local id.
    #[autosurgeon(missing = "Option::default")]
    pub nhs_number: Option<String>,
    /// NHS number verification status, e.g. `number-present-and-verified` (PDS code 01).
    #[autosurgeon(missing = "Option::default")]
    pub nhs_number_status: Option<String>,
    /// The name as displayed, e.g. `Ada Lovelace`.
    pub name: String,
    #[autosurgeon(missing = "Option::default")]
    pub family: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub given: Option<String>,
    /// ISO 8601 date, `YYYY-MM-DD`.
    #[autosurgeon(missing = "Option::default")]
    pub date_of_birth: Option<String>,
    /// FHIR administrative gender: `male`, `female`, `other`, `unknown`.
    #[autosurgeon(missing = "Option::default")]
    pub sex: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub address_lines: Option<Vec<String>>,
    #[autosurgeon(missing = "Option::default")]
    pub city: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub postcode: Option<String>,
    /// Registered GP practice: ODS code and name.
    #[autosurgeon(missing = "Option::default")]
    pub gp_practice_code: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub gp_practice_name: Option<String>,
}

/// A problem or condition (FHIR Condition).
#[derive(Clone, PartialEq, Eq, Reconcile, Hydrate)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct Problem {
    /// Display text (the code's display when coded).
    pub description: String,
    #[autosurgeon(missing = "Option::default")]
    pub code: Option<Code>,
    /// active, recurrence, relapse, inactive, remission, resolved.
    pub clinical_status: String,
    /// unconfirmed, provisional, differential, confirmed, refuted, entered-in-error.
    pub verification_status: String,
    /// ISO 8601 date or date-time of onset.
    #[autosurgeon(missing = "Option::default")]
    pub onset: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub note: Option<String>,
    pub provenance: Provenance,
}

/// An allergy or intolerance (FHIR AllergyIntolerance).
#[derive(Clone, PartialEq, Eq, Reconcile, Hydrate)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct Allergy {
    /// The substance as displayed.
    pub substance: String,
    #[autosurgeon(missing = "Option::default")]
    pub code: Option<Code>,
    /// Free-text reaction (manifestation display).
    #[autosurgeon(missing = "Option::default")]
    pub reaction: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub reaction_code: Option<Code>,
    /// mild, moderate, severe (of the reaction).
    #[autosurgeon(missing = "Option::default")]
    pub severity: Option<String>,
    /// low, high, unable-to-assess.
    #[autosurgeon(missing = "Option::default")]
    pub criticality: Option<String>,
    /// allergy or intolerance.
    #[autosurgeon(missing = "Option::default")]
    pub kind: Option<String>,
    /// food, medication, environment, biologic.
    #[autosurgeon(missing = "Option::default")]
    pub category: Option<String>,
    /// active, inactive, resolved.
    #[autosurgeon(missing = "Option::default")]
    pub clinical_status: Option<String>,
    /// unconfirmed, presumed, confirmed, refuted, entered-in-error.
    pub verification_status: String,
    #[autosurgeon(missing = "Option::default")]
    pub onset: Option<String>,
    pub provenance: Provenance,
}

/// A medication the patient takes or took (FHIR MedicationStatement / MedicationRequest).
#[derive(Clone, PartialEq, Eq, Reconcile, Hydrate)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct Medication {
    pub name: String,
    /// dm+d code where known.
    #[autosurgeon(missing = "Option::default")]
    pub code: Option<Code>,
    /// Dose as written, e.g. `5 mg`.
    #[autosurgeon(missing = "Option::default")]
    pub dose: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub route: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub frequency: Option<String>,
    /// active, completed, stopped, on-hold, intended, not-taken.
    pub status: String,
    /// repeat or acute (Summary Care Record).
    #[autosurgeon(missing = "Option::default")]
    pub kind: Option<String>,
    pub verification_status: String,
    pub provenance: Provenance,
}

/// Alert kinds: what a crew must see first.
pub mod alert_kind {
    pub const RESPECT_DNACPR: &str = "respect-dnacpr";
    pub const SAFEGUARDING: &str = "safeguarding";
    pub const COMMUNICATION: &str = "communication";
    pub const ACCESS: &str = "access";
    pub const END_OF_LIFE: &str = "end-of-life";
    pub const CLINICAL: &str = "clinical";
}

/// An alert: ReSPECT/DNACPR decisions, safeguarding, communication needs, access notes
/// (FHIR Flag, Consent or DocumentReference for advance directives).
#[derive(Clone, PartialEq, Eq, Reconcile, Hydrate)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct Alert {
    /// One of [`alert_kind`].
    pub kind: String,
    pub description: String,
    #[autosurgeon(missing = "Option::default")]
    pub code: Option<Code>,
    /// active or inactive.
    #[autosurgeon(missing = "Option::default")]
    pub status: Option<String>,
    /// When the decision was made (ReSPECT/DNACPR: mandatory), ISO 8601.
    #[autosurgeon(missing = "Option::default")]
    pub decision_date: Option<String>,
    /// Who made or recorded the decision (ReSPECT/DNACPR: mandatory).
    #[autosurgeon(missing = "Option::default")]
    pub author: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub review_date: Option<String>,
    pub verification_status: String,
    pub provenance: Provenance,
}

/// A care plan (FHIR CarePlan).
#[derive(Clone, PartialEq, Eq, Reconcile, Hydrate)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct CarePlan {
    pub title: String,
    #[autosurgeon(missing = "Option::default")]
    pub description: Option<String>,
    /// draft, active, on-hold, revoked, completed.
    pub status: String,
    #[autosurgeon(missing = "Option::default")]
    pub period_start: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub author: Option<String>,
    pub verification_status: String,
    pub provenance: Provenance,
}

/// A contact: next of kin, carer, lasting power of attorney (FHIR RelatedPerson).
#[derive(Clone, PartialEq, Eq, Reconcile, Hydrate)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct Contact {
    pub name: String,
    /// e.g. `next-of-kin`, `carer`, `lpa-health-welfare`.
    pub relationship: String,
    #[autosurgeon(missing = "Option::default")]
    pub phone: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub note: Option<String>,
    pub verification_status: String,
    pub provenance: Provenance,
}

/// Crew observations with their NEWS2 score (FHIR Observation vital signs).
#[derive(Clone, PartialEq, Reconcile, Hydrate)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct Vitals {
    #[autosurgeon(missing = "Option::default")]
    pub respiration_rate: Option<u32>,
    #[autosurgeon(missing = "Option::default")]
    pub spo2: Option<u32>,
    /// 1 or 2 (scale 2 only for confirmed hypercapnic respiratory failure).
    pub spo2_scale: u32,
    pub on_oxygen: bool,
    #[autosurgeon(missing = "Option::default")]
    pub systolic_bp: Option<u32>,
    #[autosurgeon(missing = "Option::default")]
    pub pulse: Option<u32>,
    /// ACVPU: `A`, `C` (new confusion), `V`, `P`, `U`.
    #[autosurgeon(missing = "Option::default")]
    pub consciousness: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub temperature_c: Option<f64>,
    /// The NEWS2 total as computed when recorded, if every parameter was present and NEWS2
    /// applied.
    #[autosurgeon(missing = "Option::default")]
    pub news2: Option<u32>,
    /// The patient was recorded as pregnant.
    #[autosurgeon(missing = "Option::default")]
    pub pregnant: Option<bool>,
    /// Why there is no NEWS2 total ([`crate::news2::Assessment::withheld`]: `under-16`,
    /// `pregnancy`, `incomplete`).
    #[autosurgeon(missing = "Option::default")]
    pub news2_withheld: Option<String>,
}

/// An encounter: admission, transfer, discharge, crew attendance (FHIR Encounter).
#[derive(Clone, PartialEq, Reconcile, Hydrate)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct Encounter {
    /// `admission`, `attendance`, `outpatient`, `registration`, ...
    pub kind: String,
    /// planned, in-progress, finished, cancelled, entered-in-error.
    pub status: String,
    /// FHIR class: inpatient, emergency, ambulatory, home.
    #[autosurgeon(missing = "Option::default")]
    pub class: Option<String>,
    /// Ward, room, bed as the feed gives it.
    #[autosurgeon(missing = "Option::default")]
    pub location: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub facility: Option<String>,
    /// ISO 8601 date-times.
    #[autosurgeon(missing = "Option::default")]
    pub start: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub end: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub reason: Option<String>,
    /// The hospital's visit number (HL7 PV1-19), linking admission, transfers and discharge.
    #[autosurgeon(missing = "Option::default")]
    pub visit: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub vitals: Option<Vitals>,
    pub verification_status: String,
    pub provenance: Provenance,
}

/// A result or a letter (FHIR Observation, DiagnosticReport, DocumentReference).
#[derive(Clone, PartialEq, Eq, Reconcile, Hydrate)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Record))]
pub struct Report {
    /// `result` or `letter`.
    pub kind: String,
    pub title: String,
    #[autosurgeon(missing = "Option::default")]
    pub code: Option<Code>,
    #[autosurgeon(missing = "Option::default")]
    pub value: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub unit: Option<String>,
    #[autosurgeon(missing = "Option::default")]
    pub effective: Option<String>,
    /// registered, preliminary, final, amended.
    pub status: String,
    pub verification_status: String,
    pub provenance: Provenance,
}

impl Provenance {
    /// Provenance with only the mandatory parts; the rest can be set on the result.
    pub fn new(device: &str, device_name: &str, role: &str, recorded_at_ms: i64) -> Self {
        Self {
            device: device.into(),
            device_name: device_name.into(),
            role: role.into(),
            recorded_at_ms,
            clock_offset_ms: None,
            person: None,
            source: None,
        }
    }
}

impl Demographics {
    /// Demographics with a name and (validated elsewhere) NHS number; the rest absent.
    pub fn new(name: &str, nhs_number: Option<&str>) -> Self {
        Self {
            nhs_number: nhs_number.map(str::to_string),
            nhs_number_status: None,
            name: name.into(),
            family: None,
            given: None,
            date_of_birth: None,
            sex: None,
            address_lines: None,
            city: None,
            postcode: None,
            gp_practice_code: None,
            gp_practice_name: None,
        }
    }
}

impl Problem {
    pub fn new(description: &str, provenance: Provenance) -> Self {
        Self {
            description: description.into(),
            code: None,
            clinical_status: "active".into(),
            verification_status: CONFIRMED.into(),
            onset: None,
            note: None,
            provenance,
        }
    }
}

impl Allergy {
    pub fn new(substance: &str, provenance: Provenance) -> Self {
        Self {
            substance: substance.into(),
            code: None,
            reaction: None,
            reaction_code: None,
            severity: None,
            criticality: None,
            kind: None,
            category: None,
            clinical_status: Some("active".into()),
            verification_status: CONFIRMED.into(),
            onset: None,
            provenance,
        }
    }
}

impl Medication {
    pub fn new(name: &str, provenance: Provenance) -> Self {
        Self {
            name: name.into(),
            code: None,
            dose: None,
            route: None,
            frequency: None,
            status: "active".into(),
            kind: None,
            verification_status: CONFIRMED.into(),
            provenance,
        }
    }
}

impl Alert {
    pub fn new(kind: &str, description: &str, provenance: Provenance) -> Self {
        Self {
            kind: kind.into(),
            description: description.into(),
            code: None,
            status: Some("active".into()),
            decision_date: None,
            author: None,
            review_date: None,
            verification_status: CONFIRMED.into(),
            provenance,
        }
    }
}

impl CarePlan {
    pub fn new(title: &str, provenance: Provenance) -> Self {
        Self {
            title: title.into(),
            description: None,
            status: "active".into(),
            period_start: None,
            author: None,
            verification_status: CONFIRMED.into(),
            provenance,
        }
    }
}

impl Contact {
    pub fn new(name: &str, relationship: &str, provenance: Provenance) -> Self {
        Self {
            name: name.into(),
            relationship: relationship.into(),
            phone: None,
            note: None,
            verification_status: CONFIRMED.into(),
            provenance,
        }
    }
}

impl Encounter {
    pub fn new(kind: &str, status: &str, provenance: Provenance) -> Self {
        Self {
            kind: kind.into(),
            status: status.into(),
            class: None,
            location: None,
            facility: None,
            start: None,
            end: None,
            reason: None,
            visit: None,
            vitals: None,
            verification_status: CONFIRMED.into(),
            provenance,
        }
    }
}

impl Report {
    pub fn new(kind: &str, title: &str, provenance: Provenance) -> Self {
        Self {
            kind: kind.into(),
            title: title.into(),
            code: None,
            value: None,
            unit: None,
            effective: None,
            status: "final".into(),
            verification_status: CONFIRMED.into(),
            provenance,
        }
    }
}

/// `Debug` that names the record and nothing in it: these hold who the patient is or what a
/// clinician wrote, and a panic message, a test failure or a debug log must carry neither.
#[macro_export]
macro_rules! redacted_debug {
    ($($t:ty),* $(,)?) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($t), " { .. }"))
            }
        }
    )*};
}

redacted_debug!(
    EnteredInError,
    Demographics,
    Problem,
    Allergy,
    Medication,
    Alert,
    CarePlan,
    Contact,
    Vitals,
    Encounter,
    Report
);
