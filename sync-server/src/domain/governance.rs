//! Governance rules the server applies to devices, with no I/O: the setting that says how long
//! each kind of grant lasts, and when a request for access at the point of care
//! (permission to view, break glass) is refused before any record is looked up. The session
//! carries them out against the store ([`crate::session::governance`]).

use care_node::protocol::AccessKind;

use crate::domain::settings::Setting;

/// Who an operator action is attributed to when the caller does not say.
pub const OPERATOR: &str = "operator";

pub use crate::domain::grant::GrantKind;

/// Audited actions that count as access requests for the rate limit.
pub const ACCESS_ACTIONS: [&str; 3] = ["permission-to-view", "break-glass", "access-refused"];

/// The one answer for an invalid, unknown or unavailable NHS number: it never tells a device
/// whether someone is registered.
pub const UNAVAILABLE: &str = "no record available for that NHS number";

/// Why a request for access is refused before any record is looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessRefusal {
    /// More requests in the last hour than the `[limits]` allow (raises one alert).
    Flood,
    /// No reason, or one too short to be read as a reason.
    NoReason,
}

impl AccessRefusal {
    /// What the device is told.
    pub fn message(self) -> &'static str {
        match self {
            AccessRefusal::Flood => {
                "too many access requests from this device in the last hour; ask the operator"
            }
            AccessRefusal::NoReason => "a reason is needed (at least a few words)",
        }
    }
}

/// Whether a request is refused, given the device's requests in the last hour: a clinician asks
/// for a few patients in a shift, so a flood is refused first; then a reason of at least a few
/// words is required, for permission to view and break glass alike.
pub fn refusal(recent_requests: usize, per_hour: usize, reason: &str) -> Option<AccessRefusal> {
    if recent_requests >= per_hour {
        Some(AccessRefusal::Flood)
    } else if reason.trim().chars().count() < 5 {
        Some(AccessRefusal::NoReason)
    } else {
        None
    }
}

/// The grant a kind of access makes, and the setting that says how long it lasts.
pub fn grant_for(kind: AccessKind) -> (GrantKind, Setting) {
    match kind {
        AccessKind::PermissionToView => (GrantKind::PermissionToView, Setting::PermissionHours),
        AccessKind::BreakGlass => (GrantKind::BreakGlass, Setting::BreakGlassHours),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_refused_before_the_reason_is_read_and_a_short_reason_is_refused() {
        assert_eq!(refusal(20, 20, "unconscious, no carer present"), Some(AccessRefusal::Flood));
        assert_eq!(refusal(20, 20, ""), Some(AccessRefusal::Flood));
        assert_eq!(refusal(3, 20, "  ok  "), Some(AccessRefusal::NoReason));
        assert_eq!(refusal(19, 20, "unconscious, no carer present"), None);
    }

    #[test]
    fn every_grant_kind_reads_back_from_its_name() {
        for kind in [GrantKind::Incident, GrantKind::PermissionToView, GrantKind::BreakGlass] {
            assert_eq!(GrantKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(GrantKind::parse("incident "), None);
    }
}
