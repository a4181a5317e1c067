//! FHIR R4 in and out: International Patient Summary bundles.
//!
//! - [`bulk`]: many patients from files, directories and NDJSON, on every core, resumable.
//! - [`model`]: serde types for the resources we use.
//! - [`import`]: a Bundle for one patient, validated whole, applied atomically and idempotently.
//! - `import_map`: what each resource of an imported Bundle becomes in the summary.
//! - [`export`]: a patient's summary as an IPS document Bundle.
//! - [`vitals`]: a crew's observations as vital-sign Observations, and back.
//!
//! Entries imported from a source keep a stable id derived from the source's identifier, so a
//! re-import updates instead of duplicating. Exports carry each entry's id and provenance in
//! care-sync identifiers and extensions, so export → import is lossless.

pub mod bulk;
pub mod export;
pub mod import;
mod import_map;
pub mod model;
pub mod vitals;

/// Identifier system of care-sync entry ids (a UUID), written on export.
pub const ENTRY_SYSTEM: &str = "https://care-sync.example/fhir/id/entry";
/// Identifier system of care-sync patient ids, for patients without an NHS number.
pub const PATIENT_SYSTEM: &str = "https://care-sync.example/fhir/id/patient";
/// Extension carrying an entry's provenance.
pub const PROVENANCE_EXT: &str = "https://care-sync.example/fhir/StructureDefinition/provenance";
/// Identifier system of hospital visit numbers (HL7 PV1-19) on encounters.
pub const VISIT_SYSTEM: &str = "https://care-sync.example/fhir/id/visit";
/// Extension that carried an encounter's crew observations before they were exported as
/// vital-sign Observations ([`vitals`]); still read on import.
pub const VITALS_EXT: &str = "https://care-sync.example/fhir/StructureDefinition/vitals";
/// Code system of alert kinds (Flag.category).
pub const ALERT_KIND_SYSTEM: &str = "https://care-sync.example/fhir/CodeSystem/alert-kind";
/// Code system of report kinds (result, letter, report).
pub const REPORT_KIND_SYSTEM: &str = "https://care-sync.example/fhir/CodeSystem/report-kind";
/// NHS number identifier system.
pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
/// UK Core extension for the NHS number verification status.
pub const NHS_STATUS_EXT: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-NHSNumberVerificationStatus";
/// ODS organisation codes (GP practices).
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// IPS codes for absent and unknown data (no-known-allergies, no-allergy-info, ...).
pub const ABSENT_UNKNOWN_SYSTEM: &str = "http://hl7.org/fhir/uv/ips/CodeSystem/absent-unknown-uv-ips";
