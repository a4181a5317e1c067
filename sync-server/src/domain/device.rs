//! A device as the region's rules see it: its role, and where it stands (enrolled, revoked,
//! asked to wipe). Stored by the store, judged here.

use care_node::identity::PublicKey;

/// The roles a device can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    AmbulanceCrew,
    CommunityNurse,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::AmbulanceCrew => "ambulance-crew",
            Role::CommunityNurse => "community-nurse",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ambulance-crew" => Ok(Role::AmbulanceCrew),
            "community-nurse" => Ok(Role::CommunityNurse),
            other => Err(format!("unknown role `{other}` (expected ambulance-crew or community-nurse)")),
        }
    }
}

/// A device as the server knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub public_key: Option<PublicKey>,
    pub enrolled_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    /// The cursor the device last acknowledged, and when.
    pub acked_cursor: u64,
    pub last_sync_ms: Option<i64>,
    pub wipe_requested_at_ms: Option<i64>,
    pub wiped_at_ms: Option<i64>,
    /// Patients in scope that its budget left out at its last round.
    pub left_out: u64,
}

impl DeviceRecord {
    /// An operator asked this device to wipe and it has not confirmed yet.
    pub fn wipe_pending(&self) -> bool {
        self.wipe_requested_at_ms.is_some() && self.wiped_at_ms.is_none()
    }

    /// Whether the device may connect: enrolled and not revoked, or revoked with a wipe pending
    /// (then it is admitted only to be told to wipe).
    pub fn admitted(&self) -> bool {
        self.public_key.is_some() && (self.revoked_at_ms.is_none() || self.wipe_pending())
    }

    /// What operators see: `pending` (token issued), `enrolled`, `wipe-requested`, `revoked`,
    /// `revoked-wipe-requested` (revoked, still to be told to wipe), `wiped`.
    pub fn state(&self) -> &'static str {
        match (
            self.public_key.is_some(),
            self.revoked_at_ms.is_some(),
            self.wipe_pending(),
            self.wiped_at_ms.is_some(),
        ) {
            (_, _, _, true) => "wiped",
            (_, true, true, _) => "revoked-wipe-requested",
            (_, true, false, _) => "revoked",
            (false, ..) => "pending",
            (true, false, true, _) => "wipe-requested",
            (true, false, false, _) => "enrolled",
        }
    }
}
