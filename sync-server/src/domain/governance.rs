//! Governance decisions the server makes for devices: offline leases, access at the point of
//! care (permission to view, break glass), and the verification of device view logs.

use care_node::nhs::NhsNumber;
use care_node::protocol::{AccessKind, ServerMessage};
use care_node::viewlog::{SignedView, check_chain};

use crate::store::{DeviceRecord, GrantKind, Role, ServerStore, StoreError};

/// Default offline lease: how long a device may show patient data without reaching the server.
pub const DEFAULT_LEASE_HOURS: f64 = 72.0;
/// Default duration of a permission-to-view grant.
pub const DEFAULT_PERMISSION_HOURS: f64 = 24.0;
/// Default duration of a break-glass grant.
pub const DEFAULT_BREAK_GLASS_HOURS: f64 = 4.0;

fn hours_setting(store: &dyn ServerStore, name: &str, default: f64) -> Result<i64, StoreError> {
    let hours =
        store.setting(name)?.and_then(|v| v.parse::<f64>().ok()).filter(|h| *h >= 0.0).unwrap_or(default);
    Ok((hours * 3_600_000.0) as i64)
}

/// The offline lease of a role (setting `lease-hours.<role>`, default 72 h).
pub fn lease_ms(store: &dyn ServerStore, role: Role) -> Result<u64, StoreError> {
    Ok(hours_setting(store, &format!("lease-hours.{}", role.as_str()), DEFAULT_LEASE_HOURS)? as u64)
}

/// Grants (or refuses) access asked for at the point of care, audits it, and raises an alert for
/// break glass.
pub fn decide_access(
    store: &dyn ServerStore,
    device: &DeviceRecord,
    nhs_number: &str,
    kind: AccessKind,
    reason: &str,
    now_ms: i64,
) -> Result<ServerMessage, StoreError> {
    let refuse = |message: &str| {
        Ok(ServerMessage::AccessDecision { granted: false, message: message.into(), until_ms: 0 })
    };
    let Ok(nhs) = NhsNumber::parse(nhs_number) else { return refuse("invalid NHS number") };
    let Some(patient) = store.patient_by_nhs(&nhs)? else {
        return refuse("no patient with that NHS number on the regional server");
    };
    let (grant, hours_key, default_hours) = match kind {
        AccessKind::PermissionToView => {
            (GrantKind::PermissionToView, "permission-hours", DEFAULT_PERMISSION_HOURS)
        }
        AccessKind::BreakGlass => (GrantKind::BreakGlass, "break-glass-hours", DEFAULT_BREAK_GLASS_HOURS),
    };
    if kind == AccessKind::BreakGlass && reason.trim().len() < 5 {
        return refuse("break glass needs a reason (at least a few words)");
    }
    let until = now_ms + hours_setting(store, hours_key, default_hours)?;
    store.grant(device.id, &patient, grant, reason, until, now_ms)?;
    store.append_audit(&device.name, grant.as_str(), Some(&patient), &format!("reason: {reason}"), now_ms)?;
    crate::operator::metrics::metrics()
        .access_grants
        .get_or_create(&crate::operator::metrics::KindLabel { kind: grant.as_str() })
        .inc();
    if kind == AccessKind::BreakGlass {
        store.raise_alert("break-glass", Some(device.id), Some(&patient), reason, now_ms)?;
    }
    Ok(ServerMessage::AccessDecision {
        granted: true,
        message: format!("{} granted until {}", grant.as_str(), care_node::view::format_time(until)),
        until_ms: until,
    })
}

/// Verifies a batch of a device's view log, records the views in the audit and flags gaps,
/// forks and bad signatures with an alert. Always acknowledges: problems are recorded, not
/// bounced back to a device that cannot fix them.
pub fn record_views(
    store: &dyn ServerStore,
    device: &DeviceRecord,
    entries: &[SignedView],
    now_ms: i64,
) -> Result<ServerMessage, StoreError> {
    let Some(key) = device.public_key else { return Err(StoreError::UnknownDevice(device.name.clone())) };
    let head = store.view_head(device.id)?;
    let check = check_chain(&key, head, entries);
    for entry in &check.accepted {
        store.append_audit(
            &device.name,
            &format!("view:{}", entry.action),
            Some(&entry.patient),
            &format!("device seq {} at {}", entry.seq, care_node::view::format_time(entry.at_ms)),
            now_ms,
        )?;
    }
    for problem in &check.problems {
        tracing::warn!(device = %device.name, %problem, "view log problem");
        store.raise_alert("view-log", Some(device.id), None, problem, now_ms)?;
        store.append_audit(&device.name, "view-log-problem", None, problem, now_ms)?;
    }
    store.set_view_head(device.id, check.head.0, check.head.1)?;
    let through = entries.iter().map(|e| e.entry.seq).max().unwrap_or(head.0);
    Ok(ServerMessage::ViewLogAck { through })
}
