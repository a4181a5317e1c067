//! Governance as a session carries it out: access at the point of care (permission to view,
//! break glass) and the device's view log, read from and recorded in the store. The rules
//! themselves (rate, reasons, what a grant is, how long it lasts) are
//! [`domain::governance`](crate::domain::governance); this file does their I/O.

use care_node::nhs::NhsNumber;
use care_node::protocol::{AccessKind, ServerMessage};
use care_node::viewlog::{SignedView, check_chain};

use crate::domain::governance::{self as access, ACCESS_ACTIONS, AccessRefusal, UNAVAILABLE};
use crate::store::{AuditFilter, DeviceRecord, ServerStore, StoreError};

/// Raises an alert of `kind` for `device` unless one is still open (unacknowledged): a flood of
/// the same trouble is one alert for an operator, not thousands.
pub fn raise_alert_once(
    store: &dyn ServerStore,
    kind: &str,
    device: &DeviceRecord,
    patient: Option<&care_node::summary::PatientId>,
    reason: impl FnOnce() -> String,
    now_ms: i64,
) -> Result<(), StoreError> {
    let open =
        store.alerts(false)?.iter().any(|a| a.kind == kind && a.device.as_deref() == Some(&device.name));
    if !open {
        store.raise_alert(kind, Some(device.id), patient, &reason(), now_ms)?;
    }
    Ok(())
}

/// Grants (or refuses) access asked for at the point of care, audits it, and raises an alert
/// (break glass and permission to view alike). A reason is required for both.
pub fn decide_access(
    store: &dyn ServerStore,
    device: &DeviceRecord,
    nhs_number: &str,
    kind: AccessKind,
    reason: &str,
    per_hour: usize,
    now_ms: i64,
) -> Result<ServerMessage, StoreError> {
    let refuse = |message: &str| {
        Ok(ServerMessage::AccessDecision { granted: false, message: message.into(), until_ms: 0 })
    };
    // Rate: a clinician asks for a few patients in a shift; a flood is refused and raises one
    // alert until acknowledged.
    let since = now_ms - 3_600_000;
    let recent = store
        .audit_entries(&AuditFilter {
            actor: Some(device.name.clone()),
            since_ms: Some(since),
            ..Default::default()
        })?
        .iter()
        .filter(|a| ACCESS_ACTIONS.contains(&a.action.as_str()))
        .count();
    let refusal = access::refusal(recent, per_hour, reason);
    if refusal == Some(AccessRefusal::Flood) {
        raise_alert_once(
            store,
            "access-flood",
            device,
            None,
            || format!("more than {per_hour} access requests in an hour"),
            now_ms,
        )?;
        return refuse(AccessRefusal::Flood.message());
    }
    if let Some(refusal) = refusal {
        return refuse(refusal.message());
    }
    let patient = match NhsNumber::parse(nhs_number) {
        Ok(nhs) => store.patient_by_nhs(&nhs)?,
        Err(_) => None,
    };
    let Some(patient) = patient else {
        store.append_audit(&device.name, "access-refused", None, "no record available", now_ms)?;
        return refuse(UNAVAILABLE);
    };
    let (grant, hours) = access::grant_for(kind);
    let until = now_ms + store.setting_hours_ms(hours)?;
    store.grant(device.id, &patient, grant, reason, until, now_ms)?;
    // The reason is the clinician's free text: kept with the grant and the alert, never in the
    // audit's plain lines.
    store.append_audit(
        &device.name,
        grant.as_str(),
        Some(&patient),
        "reason sealed with the alert",
        now_ms,
    )?;
    crate::operator::metrics::metrics()
        .access_grants
        .get_or_create(&crate::operator::metrics::KindLabel { kind: grant.as_str() })
        .inc();
    // Both kinds reach the operators and the privacy officer: break glass as an alert to act on,
    // permission to view as one to review.
    store.raise_alert(grant.as_str(), Some(device.id), Some(&patient), reason, now_ms)?;
    // A security event at the default level (the patient by opaque id; the reason is sealed).
    tracing::warn!(
        device = %device.name,
        patient = %care_node::identity::short_hex(patient.as_bytes()),
        access = grant.as_str(),
        "access granted outside the device's scope; an alert is raised for review"
    );
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
    session: u64,
    entries: &[SignedView],
    now_ms: i64,
) -> Result<ServerMessage, StoreError> {
    let Some(key) = device.public_key else { return Err(StoreError::UnknownDevice(device.name.clone())) };
    let head = store.view_head(device.id)?;
    let mut check = check_chain(&key, head, entries);
    // A view of a patient the device does not hold now (purged since, or never sent) is still
    // recorded, flagged, so no look is lost from "who saw this patient"; a view naming no patient
    // on this server is not recorded. Either raises the batch's alert.
    let held = store.held(device.id)?;
    let (views, other): (Vec<_>, Vec<_>) = check.accepted.drain(..).partition(|e| held.contains(&e.patient));
    let mut flagged = Vec::new();
    let mut unknown = 0;
    for entry in other {
        if store.load_document(&entry.patient)?.is_some() {
            flagged.push(entry);
        } else {
            unknown += 1;
        }
    }
    if !flagged.is_empty() {
        check
            .problems
            .push(format!("{} view log entries name patients this device does not hold now", flagged.len()));
    }
    if unknown > 0 {
        check
            .problems
            .push(format!("{unknown} view log entries name no patient on this server (not recorded)"));
    }
    for entry in &flagged {
        store.append_audit(
            &device.name,
            &format!("view:{}", entry.action),
            Some(&entry.patient),
            &format!(
                "device seq {} at {} (flagged: not held by the device when uploaded)",
                entry.seq,
                care_node::view::format_time(entry.at_ms)
            ),
            now_ms,
        )?;
    }
    for entry in &views {
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
        store.append_audit(&device.name, "view-log-problem", None, problem, now_ms)?;
    }
    // One alert for a batch's problems, and none while the device already has one open.
    if let Some(first) = check.problems.first() {
        raise_alert_once(
            store,
            "view-log",
            device,
            None,
            || format!("{first} ({} problem(s) in this batch)", check.problems.len()),
            now_ms,
        )?;
    }
    store.set_view_head(device.id, session, check.head.0, check.head.1)?;
    let through = entries.iter().map(|e| e.entry.seq).max().unwrap_or(head.0);
    Ok(ServerMessage::ViewLogAck { through })
}
