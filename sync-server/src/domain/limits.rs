//! The server's bounds on what one peer may cost it, as plain data with their defaults. They are
//! the `[limits]` section of the configuration file (`care-sync-server config` prints them), and
//! each is checked before the work it protects (docs/security.md, Bounds). The bounds that both
//! halves must agree on (a change's size, a frame's) are protocol constants in `care-node`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Documents in one upload batch; a bigger batch ends the session.
    pub upload_docs: usize,
    /// Changes in one upload batch.
    pub upload_changes: usize,
    /// Bytes one device may upload a minute (a token bucket; view-log entries count 256 bytes).
    pub upload_bytes_per_minute: u64,
    /// Refused (quarantined) uploads one device may have in 24 hours before its uploads are
    /// refused whole for the rest of that time (it keeps its changes, and still receives).
    pub quarantine_per_device: u64,
    /// Access requests (permission to view, break glass) one device may make in an hour.
    pub access_requests_per_hour: usize,
    /// Enrolment connections (peers without a certificate) open at once.
    pub enrol_connections: usize,
    /// Seconds an enrolment connection may take to send its request.
    pub enrol_timeout_secs: u64,
    /// Seconds the server waits for a syncing device's next frame.
    pub read_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            upload_docs: care_node::protocol::MAX_UPLOAD_DOCS,
            upload_changes: care_node::protocol::MAX_UPLOAD_CHANGES,
            upload_bytes_per_minute: 64 * 1024 * 1024,
            quarantine_per_device: 1_000,
            access_requests_per_hour: 20,
            enrol_connections: 64,
            enrol_timeout_secs: 10,
            read_timeout_secs: 60,
        }
    }
}
