//! What hospitals and GPs send the region.
//!
//! - [`fhir`]: FHIR R4 IPS bundles in (import) and out (export).
//! - [`hl7`]: HL7 v2 ADT from hospitals, over MLLP or files.

pub mod fhir;
pub mod hl7;
