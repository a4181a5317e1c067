//! Who gets what, as a session gathers it: the inputs of [`candidates`] and [`decide`] read from
//! the store (the device's budget, the prefetch flags, its grants, caseload and areas' patients),
//! and what a device may write now. The
//! policy itself is [`crate::domain::scope`].

use std::collections::HashSet;

use care_node::summary::{PatientId, PatientSummary};

use crate::domain::scope::{Scope, candidates, decide};
use crate::domain::settings::Setting;
use crate::store::{ServerStore, StoreError};

/// The device's scope now, with the operator's settings (budget, prefetch flags).
pub fn device_scope(store: &dyn ServerStore, device: i64, now_ms: i64) -> Result<Scope, StoreError> {
    let flags = prefetch_flags(store)?;
    let budget = match store.device_budget(device)? {
        Some(b) => b,
        None => {
            let value = store.checked_setting(Setting::Budget)?;
            value.parse().map_err(|_| StoreError::Unreadable("setting", Setting::Budget.name().into()))?
        }
    };
    Ok(decide(candidates(store.scope_rows(device, &flags, now_ms)?, &flags, now_ms), budget))
}

/// The flags that make a patient prefetched (setting `prefetch-flags`, comma-separated).
pub fn prefetch_flags(store: &dyn ServerStore) -> Result<Vec<String>, StoreError> {
    let list = store.setting_value(Setting::PrefetchFlags)?;
    Ok(list.split(',').map(|f| f.trim().to_string()).filter(|f| !f.is_empty()).collect())
}

/// The documents `device` may write to now: those it holds that are in its scope, and those it
/// holds that an operator merged into another record (their late entries are carried over to the
/// kept record; see `session`).
pub fn writable(store: &dyn ServerStore, device: i64, now_ms: i64) -> Result<HashSet<PatientId>, StoreError> {
    let scope: HashSet<PatientId> = device_scope(store, device, now_ms)?.patients.into_iter().collect();
    let mut held = store.held(device)?;
    let leaving: Vec<PatientId> = held.iter().filter(|p| !scope.contains(p)).copied().collect();
    for patient in leaving {
        let merged = match store.load_document(&patient)? {
            Some(saved) => {
                PatientSummary::load(&saved).ok().and_then(|s| s.merged_into().ok().flatten()).is_some()
            }
            None => false,
        };
        if !merged {
            held.remove(&patient);
        }
    }
    Ok(held)
}
