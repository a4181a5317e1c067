//! `care-node`: everything a care-sync device runs.
//!
//! - [`policy`]: the write policy: what a device may do to a patient document (both halves check it).
//! - [`chunk`]: bounded inspection of Automerge change chunks before Automerge parses them.
//! - [`nhs`]: NHS number validation; the only way an NHS number enters the system.
//! - [`news2`]: the NEWS2 early warning score (RCP 2017).
//! - [`notify`]: notifications (admitted, discharged, attended) derived from received changes.
//! - [`summary`]: the patient-summary Automerge document and its typed API.
//! - [`crypto`]: the data key, sealed values, lookup hashes and key wrapping.
//! - [`identity`]: ed25519 device and server identities.
//! - [`store`]: the encrypted SQLite replica on the device.
//! - [`private`]: files and directories only their owner can read.
//! - [`protocol`]: the sync protocol's messages and framing (shared with the server).
//! - [`sync`]: the device half of the sync protocol, as a sans-IO state machine.
//! - [`token`]: enrolment tokens.
//! - [`tls`]: rustls configuration and the ed25519 key verifiers (shared with the server).
//! - [`bbr`]: BBR congestion control (quinn's, with its first ProbeRTT at ten seconds, not at once).
//! - [`driver`]: what a device does around a sync session, over any [`driver::Link`].
//! - [`client`]: the QUIC client that moves protocol frames.
//! - [`view`]: the text view of a summary, with its "as of" time.
//! - [`viewlog`]: the hash-chained, signed log of views that syncs to the server.
//! - [`wire`]: frame reads and writes over QUIC streams.
//!
//! Nothing in this crate logs or puts in an error message a patient's name, NHS number or date of
//! birth; logs carry opaque ids only.

pub mod bbr;
pub mod chunk;
pub mod client;
pub mod clock;
pub mod crypto;
pub mod driver;
pub mod identity;
pub mod news2;
pub mod nhs;
pub mod notify;
pub mod policy;
pub mod private;
pub mod protocol;
pub mod record;
pub mod store;
pub mod summary;
pub mod sync;
pub mod tls;
pub mod token;
pub mod view;
pub mod viewlog;
pub mod wire;

#[cfg(feature = "uniffi")]
uniffi::setup_scaffolding!();

// Patient and entry ids cross the mobile boundary as strings.
#[cfg(feature = "uniffi")]
use uuid::Uuid;
#[cfg(feature = "uniffi")]
uniffi::custom_type!(Uuid, String, {
    remote,
    try_lift: |s| Ok(s.parse::<Uuid>()?),
    lower: |u| u.to_string(),
});

/// Milliseconds since the Unix epoch on this machine's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
