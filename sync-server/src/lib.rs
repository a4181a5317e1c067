//! `care-sync-server`: the regional authority of care-sync.
//!
//! - [`store`]: what the server stores, as the [`store::ServerStore`] trait.
//! - [`sqlite`]: the embedded default store (SQLite, WAL).
//! - [`session`]: the server half of the sync protocol, as a state machine (no sockets).
//! - [`server`]: the QUIC endpoint: enrolment and sync connections.
//! - [`governance`]: leases, permission to view, break glass, view-log verification.
//! - [`hl7`]: HL7 v2 ADT from hospitals, over MLLP or files.
//! - [`ops`]: operator actions (tokens, caseloads, revocation) shared by CLI, demo and tests.
//! - [`fhir`]: FHIR R4 IPS bundles in (import) and out (export).
//! - [`scope`]: who gets what: tiers, objection, budget (pure policy).
//! - [`planning`]: anonymised, suppressed planning exports (national data opt-out respected).
//! - [`population`]: the deterministic synthetic population.
//! - [`config`]: the TOML configuration file and its defaults.
//! - [`admin`]: the operators' admin API, dashboard and `/metrics` (axum).
//! - [`metrics`]: Prometheus metrics.
//! - [`bench`]: the benchmark harness (server process + device) of `care-sync-bench`.
//! - [`demo`]: the end-to-end demonstration run by `care-sync-server demo`.
//!
//! Logs and errors name devices and opaque document ids, never a patient.

pub mod admin;
pub mod bench;
pub mod config;
pub mod demo;
pub mod fhir;
pub mod governance;
pub mod hl7;
pub mod metrics;
pub mod ops;
pub mod planning;
pub mod population;
pub mod scope;
pub mod server;
pub mod session;
pub mod sqlite;
pub mod store;

use automerge::ActorId;
use care_node::identity::Identity;

/// The Automerge actor of changes the server itself authors (imports, feeds, synthetic data).
/// It is 16 bytes long, so it can never equal a device's 32-byte key.
pub fn server_actor(identity: &Identity) -> ActorId {
    let hash = blake3::derive_key("care-sync server actor v1", &identity.public_key());
    ActorId::from(&hash[..16])
}
