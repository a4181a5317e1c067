//! The region's settings an operator may change while the server runs: one typed [`Setting`]
//! per key, with its name, default and validation, and where each effective value came from.
//!
//! Precedence: a value an operator set (`care-sync-server set`, the dashboard, `POST
//! /api/settings`) stands until the configuration file's `[policy]` value for that key changes;
//! then the file's new value is applied at the next start, and the log says it replaced the
//! operator's. A file value that has not changed since it was last applied never undoes an
//! operator's change (printing the configuration with `config` and saving it is harmless).

use crate::store::{Role, ServerStore, StoreError};

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
        use crate::domain::governance::{
            DEFAULT_BREAK_GLASS_HOURS, DEFAULT_LEASE_HOURS, DEFAULT_PERMISSION_HOURS,
        };
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

    /// The value in force (one store read: the sync path asks for it every round).
    pub fn value(self, store: &dyn ServerStore) -> Result<String, StoreError> {
        Ok(store.setting(self.name())?.unwrap_or_else(|| self.default_value()))
    }

    /// The value in force, and where it came from (for operators: two store reads).
    pub fn effective(self, store: &dyn ServerStore) -> Result<(String, Source), StoreError> {
        let Some(value) = store.setting(self.name())? else {
            return Ok((self.default_value(), Source::Default));
        };
        let from_file = store.setting(&format!("{FILE_PREFIX}{}", self.name()))?;
        let source =
            if from_file.as_deref() == Some(value.as_str()) { Source::ConfigFile } else { Source::Operator };
        Ok((value, source))
    }

    /// The value in force, checked as when it was written: a stored value that no longer
    /// passes is a damaged store, and an error (never the default in its place).
    pub fn checked_value(self, store: &dyn ServerStore) -> Result<String, StoreError> {
        let value = self.value(store)?;
        self.validate(&value).map_err(|why| StoreError::Unreadable("setting", why))?;
        Ok(value.trim().to_string())
    }

    /// A number of hours as milliseconds.
    pub fn hours_ms(self, store: &dyn ServerStore) -> Result<i64, StoreError> {
        let value = self.checked_value(store)?;
        let hours: f64 = value.parse().map_err(|_| StoreError::Unreadable("setting", self.name().into()))?;
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

/// Applies the configuration file's value of `setting`, by the precedence above. `None` when
/// nothing changed and there is nothing to say.
pub fn apply_file_value(
    store: &dyn ServerStore,
    setting: Setting,
    file_value: &str,
) -> Result<Option<Applied>, StoreError> {
    let key = format!("{FILE_PREFIX}{}", setting.name());
    let last_applied = store.setting(&key)?;
    let current = store.setting(setting.name())?;
    if last_applied.as_deref() == Some(file_value) {
        return Ok(match current {
            Some(operator) if operator != file_value => {
                Some(Applied::OperatorKept { operator, file: file_value.to_string() })
            }
            _ => None,
        });
    }
    store.set_setting(&key, file_value)?;
    if current.as_deref() == Some(file_value) {
        return Ok(None);
    }
    store.set_setting(setting.name(), file_value)?;
    // An operator's value (not one the file put there) is replaced: say so.
    let replaced = current.filter(|c| last_applied.as_deref() != Some(c.as_str()));
    Ok(Some(Applied::FromFile { value: file_value.to_string(), replaced }))
}
