//! The region's settings an operator may change while the server runs: one typed [`Setting`]
//! per key, with its name, default and validation, and where each effective value came from.
//!
//! Precedence: a value an operator set (`care-sync-server set`, the dashboard, `POST
//! /api/settings`) stands until the configuration file's `[policy]` value for that key changes;
//! then the file's new value is applied at the next start, and the log says it replaced the
//! operator's. A file value that has not changed since it was last applied never undoes an
//! operator's change (printing the configuration with `config` and saving it is harmless).

use crate::domain::device::Role;

/// Default offline lease: how long a device may show patient data without reaching the server.
pub const DEFAULT_LEASE_HOURS: f64 = 72.0;
/// Default duration of a permission-to-view grant.
pub const DEFAULT_PERMISSION_HOURS: f64 = 24.0;
/// Default duration of a break-glass grant.
pub const DEFAULT_BREAK_GLASS_HOURS: f64 = 4.0;

/// A setting of the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Setting {
    /// Documents a device holds at most (its own budget, if set, wins).
    Budget,
    /// Alert kinds and flags that make a patient prefetched in a device's area (comma-separated).
    PrefetchFlags,
    /// Hours a permission-to-view grant lasts.
    PermissionHours,
    /// Hours break-glass access lasts.
    BreakGlassHours,
    /// Hours a device of this role may show patient data without reaching the server.
    LeaseHours(Role),
}

/// Where an effective value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Default,
    ConfigFile,
    Operator,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Default => "default",
            Source::ConfigFile => "config-file",
            Source::Operator => "operator",
        }
    }
}

/// What the configuration file last applied for a setting is kept under this prefix.
const FILE_PREFIX: &str = "policy-file.";

impl Setting {
    pub const ALL: [Setting; 6] = [
        Setting::Budget,
        Setting::PrefetchFlags,
        Setting::PermissionHours,
        Setting::BreakGlassHours,
        Setting::LeaseHours(Role::AmbulanceCrew),
        Setting::LeaseHours(Role::CommunityNurse),
    ];

    /// The key, as `set` and the API take it.
    pub fn name(self) -> &'static str {
        match self {
            Setting::Budget => "budget",
            Setting::PrefetchFlags => "prefetch-flags",
            Setting::PermissionHours => "permission-hours",
            Setting::BreakGlassHours => "break-glass-hours",
            Setting::LeaseHours(Role::AmbulanceCrew) => "lease-hours.ambulance-crew",
            Setting::LeaseHours(Role::CommunityNurse) => "lease-hours.community-nurse",
        }
    }

    pub fn parse(name: &str) -> Option<Setting> {
        Setting::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Every key, for error messages and help.
    pub fn names() -> String {
        Setting::ALL.map(Setting::name).join(", ")
    }

    pub fn describe(self) -> &'static str {
        match self {
            Setting::Budget => "documents a device holds at most",
            Setting::PrefetchFlags => "alert kinds that prefetch a patient in a device's area",
            Setting::PermissionHours => "hours a permission-to-view grant lasts",
            Setting::BreakGlassHours => "hours break-glass access lasts",
            Setting::LeaseHours(Role::AmbulanceCrew) => "offline lease of ambulance crews' devices, hours",
            Setting::LeaseHours(Role::CommunityNurse) => "offline lease of community nurses' devices, hours",
        }
    }

    /// The built-in value.
    pub fn default_value(self) -> String {
        match self {
            Setting::Budget => crate::domain::scope::DEFAULT_BUDGET.to_string(),
            Setting::PrefetchFlags => crate::domain::scope::DEFAULT_PREFETCH_FLAGS.join(","),
            Setting::PermissionHours => DEFAULT_PERMISSION_HOURS.to_string(),
            Setting::BreakGlassHours => DEFAULT_BREAK_GLASS_HOURS.to_string(),
            Setting::LeaseHours(_) => DEFAULT_LEASE_HOURS.to_string(),
        }
    }

    /// Checks a value: a whole number for the budget, non-negative hours, non-empty flags.
    pub fn validate(self, value: &str) -> Result<(), String> {
        let value = value.trim();
        match self {
            Setting::Budget => value
                .parse::<u64>()
                .map(|_| ())
                .map_err(|_| "`budget` takes a whole number of documents (0 or more)".to_string()),
            Setting::PrefetchFlags => {
                if value.split(',').any(|f| f.trim().is_empty()) {
                    Err("`prefetch-flags` takes a comma-separated list of non-empty flags".into())
                } else {
                    Ok(())
                }
            }
            _ => match value.parse::<f64>() {
                Ok(h) if h.is_finite() && h >= 0.0 => Ok(()),
                _ => Err(format!("`{}` takes a non-negative number of hours", self.name())),
            },
        }
    }

    /// The key under which the configuration file's last applied value is kept.
    pub fn file_key(self) -> String {
        format!("{FILE_PREFIX}{}", self.name())
    }

    /// The value in force: what is stored, else the default.
    pub fn in_force(self, stored: Option<String>) -> String {
        stored.unwrap_or_else(|| self.default_value())
    }

    /// Where a value in force came from: not stored is the default; stored and equal to what the
    /// file last applied is the file's; anything else an operator set.
    pub fn source(stored: Option<&str>, file_applied: Option<&str>) -> Source {
        match stored {
            None => Source::Default,
            Some(value) if file_applied == Some(value) => Source::ConfigFile,
            Some(_) => Source::Operator,
        }
    }

    /// A value in force, checked as when it was written: a stored value that no longer passes is
    /// a damaged store, and an error (never the default in its place).
    pub fn checked(self, value: &str) -> Result<String, String> {
        self.validate(value)?;
        Ok(value.trim().to_string())
    }

    /// A checked number of hours as milliseconds.
    pub fn hours_ms_of(self, value: &str) -> Result<i64, String> {
        let hours: f64 = self
            .checked(value)?
            .parse()
            .map_err(|_| format!("`{}` is not a number of hours", self.name()))?;
        Ok((hours * 3_600_000.0) as i64)
    }
}

/// What applying the configuration file did to one setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The file's value is new (or changed since last applied): it is in force now; `replaced`
    /// is an operator's value it replaced.
    FromFile { value: String, replaced: Option<String> },
    /// The file's value has not changed since it was last applied; an operator's value stands.
    OperatorKept { operator: String, file: String },
}

/// What to write when the configuration file says `file_value` for a setting, by the
/// precedence above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileValue {
    /// Record `file_value` as the file's last applied value.
    pub record: bool,
    /// Put `file_value` in force.
    pub put_in_force: bool,
    /// What to say (`None`: nothing changed that an operator needs to hear).
    pub applied: Option<Applied>,
}

/// Decides what the file's value does, given what the file last applied and the value stored.
pub fn file_value(last_applied: Option<&str>, stored: Option<&str>, file_value: &str) -> FileValue {
    if last_applied == Some(file_value) {
        let applied = match stored {
            Some(operator) if operator != file_value => {
                Some(Applied::OperatorKept { operator: operator.to_string(), file: file_value.to_string() })
            }
            _ => None,
        };
        return FileValue { record: false, put_in_force: false, applied };
    }
    if stored == Some(file_value) {
        return FileValue { record: true, put_in_force: false, applied: None };
    }
    // An operator's value (not one the file put there) is replaced: say so.
    let replaced = stored.filter(|c| last_applied != Some(*c)).map(str::to_string);
    FileValue {
        record: true,
        put_in_force: true,
        applied: Some(Applied::FromFile { value: file_value.to_string(), replaced }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_value_applies_once_and_never_undoes_an_operator_change_until_it_changes() {
        // First start with `budget = 500` in the file, nothing stored.
        let first = file_value(None, None, "500");
        assert!(first.record && first.put_in_force);
        assert_eq!(first.applied, Some(Applied::FromFile { value: "500".into(), replaced: None }));
        // An operator set 800 since; the file still says 500: the operator's value stands.
        let kept = file_value(Some("500"), Some("800"), "500");
        assert!(!kept.record && !kept.put_in_force);
        assert_eq!(kept.applied, Some(Applied::OperatorKept { operator: "800".into(), file: "500".into() }));
        // The file changes to 600: it replaces the operator's 800, and says so.
        let changed = file_value(Some("500"), Some("800"), "600");
        assert!(changed.record && changed.put_in_force);
        assert_eq!(
            changed.applied,
            Some(Applied::FromFile { value: "600".into(), replaced: Some("800".into()) })
        );
        // The file's old value in force (no operator change) is replaced silently.
        let quiet = file_value(Some("500"), Some("500"), "600");
        assert_eq!(quiet.applied, Some(Applied::FromFile { value: "600".into(), replaced: None }));
        // The file says what is already in force: recorded, nothing to say.
        assert_eq!(
            file_value(None, Some("600"), "600"),
            FileValue { record: true, put_in_force: false, applied: None }
        );
    }

    #[test]
    fn where_a_value_came_from_and_a_damaged_one_is_an_error() {
        assert_eq!(Setting::source(None, Some("5")), Source::Default);
        assert_eq!(Setting::source(Some("5"), Some("5")), Source::ConfigFile);
        assert_eq!(Setting::source(Some("6"), Some("5")), Source::Operator);
        assert_eq!(Setting::BreakGlassHours.hours_ms_of(" 2 "), Ok(7_200_000));
        assert!(Setting::BreakGlassHours.hours_ms_of("two").is_err());
        assert!(Setting::Budget.checked("-1").is_err());
        assert_eq!(Setting::Budget.in_force(None), crate::domain::scope::DEFAULT_BUDGET.to_string());
    }
}
