//! `care-sync-server`: the regional authority of care-sync.
//!
//! The folders are the layers (which may use which: docs/architecture.md, checked by a test):
//!
//! - [`domain`]: the rules, with no I/O: scope tiers, objection and budget ([`domain::scope`]);
//!   grants and access refusals ([`domain::governance`]); settings; the upload check.
//! - [`store`]: what the server stores, as the [`store::ServerStore`] trait, and its backends
//!   ([`store::sqlite`], the embedded default).
//! - [`session`]: the server half of the sync protocol, as a state machine (no sockets), with
//!   the store reads the rules need (scope inputs, access, the view log, enrolment).
//! - [`transport`]: the QUIC endpoint: enrolment and sync connections.
//! - [`ingest`]: what hospitals and GPs send: FHIR R4 IPS bundles ([`ingest::fhir`], in and out)
//!   and HL7 v2 ADT over MLLP or files ([`ingest::hl7`]).
//! - [`operator`]: what operators use: actions shared by CLI and API ([`operator::ops`]),
//!   anonymised planning exports, the TOML configuration, Prometheus metrics, and the admin API
//!   with its dashboard.
//! - [`demo`] (feature `demo`, on by default): the synthetic population, the end-to-end
//!   demonstration and the benchmark harness. A deployment can build without it
//!   (`--no-default-features`).
//!
//! Logs and errors name devices and opaque document ids, never a patient.

pub mod domain;
pub mod ingest;
pub mod operator;
pub mod session;
pub mod store;
pub mod transport;

#[cfg(feature = "demo")]
pub mod demo;

#[cfg(test)]
mod layers;

use automerge::ActorId;
use care_node::identity::Identity;

/// The Automerge actor of changes the server itself authors (imports, feeds, synthetic data).
/// It is 16 bytes long, so it can never equal a device's 32-byte key.
pub fn server_actor(identity: &Identity) -> ActorId {
    let hash = blake3::derive_key("care-sync server actor v1", &identity.public_key());
    ActorId::from(&hash[..16])
}

/// The actor this process's feeds and imports edit a copy of a stored document as (the copy
/// is read before the writing transaction; within a process, a feed applies its messages one
/// after another and an import never prepares a patient while a write of it is in flight): the
/// server's key and a number drawn once per process. Two processes (two instances over one PostgreSQL, or the operator's `import-fhir`
/// beside `serve`) that each edit a copy of one document would otherwise make two different
/// changes with one actor and sequence number, which Automerge refuses when the second is
/// merged into the first. Writers that read the document inside their transaction (merges,
/// schema migrations) keep [`server_actor`]. 16 bytes, as [`server_actor`].
pub fn instance_actor(identity: &Identity) -> ActorId {
    static INSTANCE: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    let instance = INSTANCE.get_or_init(rand::random);
    let mut hasher = blake3::Hasher::new_derive_key("care-sync server instance actor v1");
    hasher.update(&identity.public_key());
    hasher.update(instance);
    ActorId::from(&hasher.finalize().as_bytes()[..16])
}
