//! The kinds of grant that put a patient outside its caseload on a device (the scope's tiers,
//! [`crate::domain::scope::grant_tier`]; how long each lasts, [`crate::domain::governance`]).

/// Why a device was granted a patient outside its caseload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrantKind {
    /// Assigned to an incident (lapses after its grace period, or when closed).
    Incident,
    /// A clinician recorded the patient's permission to view at the point of care.
    PermissionToView,
    /// Emergency access without permission (reason required; raises an alert).
    BreakGlass,
}

impl GrantKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::Incident => "incident",
            GrantKind::PermissionToView => "permission-to-view",
            GrantKind::BreakGlass => "break-glass",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [GrantKind::Incident, GrantKind::PermissionToView, GrantKind::BreakGlass]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}
