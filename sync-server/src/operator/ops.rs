//! Operator actions shared by the CLI, the demo and the tests. Each one that changes who may
//! see what is written to the append-only audit with the operator's name: the one this process
//! acts for ([`act_as`]: the CLI's `--operator`, by default the login user; `serve`'s admin API
//! acts as `admin-api`, one shared token, until named operators sign in, issue 13).
//!
//! Over 600 lines because it is one function per operator action (29), each a few lines.

use std::time::Duration;

use care_node::nhs::NhsNumber;
use care_node::summary::PatientId;
use care_node::token::EnrolmentToken;

use crate::store::{ConsentFlags, DeviceRecord, GrantKind, MergeOutcome, Role, ServerStore, StoreError};

/// How long an enrolment token is valid unless the operator says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long an incident grant lasts unless the operator says otherwise (incident plus grace).
pub const DEFAULT_INCIDENT_HOURS: f64 = 24.0;
pub use crate::domain::governance::OPERATOR;

/// Who the audit names for operator actions in this process.
static ACTING: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Names the operator this process acts for, once, before any action: a name of 1 to 64
/// printable characters (a login, an email address). Later calls are refused.
pub fn act_as(name: &str) -> Result<(), OpsError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Err(OpsError::Invalid(
            "an operator's name is 1 to 64 printable characters (a login or an email address)".into(),
        ));
    }
    ACTING
        .set(name.to_string())
        .map_err(|_| OpsError::Invalid("this process already acts for an operator".into()))
}

/// The operator this process acts for ([`act_as`]), else [`OPERATOR`].
pub fn acting() -> &'static str {
    ACTING.get().map_or(OPERATOR, String::as_str)
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid NHS number: {0}")]
    NhsNumber(#[from] care_node::nhs::NhsNumberError),
    #[error("device `{0}` has not enrolled yet")]
    NotEnrolled(String),
    #[error("{0}")]
    Invalid(String),
}

fn now() -> i64 {
    care_node::now_ms()
}

/// Creates a one-time enrolment token for a named device; the token carries `server_addr` and
/// the server key's fingerprint.
pub fn issue_token(
    store: &dyn ServerStore,
    name: &str,
    role: Role,
    server_addr: impl Into<crate::operator::addrs::ServerAddrs>,
    ttl: Duration,
) -> Result<String, OpsError> {
    let identity = store.server_identity()?;
    let token = EnrolmentToken::new(server_addr.into().to_string(), identity.fingerprint());
    let expires = now() + ttl.as_millis() as i64;
    store.create_enrolment(name, role, EnrolmentToken::secret_hash(&token.secret), expires)?;
    store.append_audit(
        acting(),
        "enrolment-token",
        None,
        &format!("device {name} ({})", role.as_str()),
        now(),
    )?;
    Ok(token.encode())
}

/// The device with this name.
pub fn device(store: &dyn ServerStore, name: &str) -> Result<DeviceRecord, OpsError> {
    store.device_by_name(name)?.ok_or_else(|| StoreError::UnknownDevice(name.to_string()).into())
}

/// A patient named by NHS number (ten digits) or by care-sync patient id (a UUID).
pub fn find_patient(store: &dyn ServerStore, key: &str) -> Result<PatientId, OpsError> {
    if let Ok(id) = key.trim().parse::<PatientId>() {
        return match store.load_document(&id)? {
            Some(_) => Ok(id),
            None => Err(StoreError::UnknownPatient.into()),
        };
    }
    let nhs = NhsNumber::parse(key)?;
    Ok(store.patient_by_nhs(&nhs)?.ok_or(StoreError::UnknownPatient)?)
}

/// Puts a patient on a device's caseload; returns false if already there.
pub fn caseload_add(store: &dyn ServerStore, device_name: &str, patient: &str) -> Result<bool, OpsError> {
    let device = device(store, device_name)?;
    let patient = find_patient(store, patient)?;
    let added = store.caseload_add(device.id, &patient)?;
    if added {
        store.append_audit(
            acting(),
            "caseload-add",
            Some(&patient),
            &format!("device {device_name}"),
            now(),
        )?;
    }
    Ok(added)
}

/// What a caseload or area file did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkImport {
    /// Lines read (data lines: no header, blank lines or comments).
    pub lines: usize,
    pub added: usize,
    pub already: usize,
}

/// The most problems one refusal of a caseload file lists.
const MAX_LISTED_PROBLEMS: usize = 20;

/// One checked line of a bulk file: the device's id and name, and the value.
type DeviceLine<T> = (i64, String, T);

/// Reads a `device,<value>` CSV file for a bulk change: a `device,<header>` header, blank lines
/// and `#` comments are skipped and fields may be quoted. Every line is checked first (the device
/// exists, `value` accepts the second field); any problem refuses the whole file with each
/// problem's line number. Returns the data lines read and (device id, device name, value) each.
fn device_lines<T>(
    store: &dyn ServerStore,
    csv: &str,
    header: &str,
    value: impl Fn(&str) -> Result<T, OpsError>,
) -> Result<(usize, Vec<DeviceLine<T>>), OpsError> {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    let mut devices: std::collections::HashMap<String, Option<i64>> = Default::default();
    let mut lines = 0;
    // A spreadsheet's export may start with a byte-order mark and quote the header.
    let csv = csv.strip_prefix('\u{feff}').unwrap_or(csv);
    let mut seen_data = false;
    for (n, line) in csv.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let is_header = line.to_ascii_lowercase().replace([' ', '"'], "") == format!("device,{header}");
        if is_header && !seen_data {
            continue;
        }
        seen_data = true;
        lines += 1;
        let unquote = |f: &str| f.trim().trim_matches('"').trim().to_string();
        let Some((name, field)) = line.split_once(',').map(|(a, b)| (unquote(a), unquote(b))) else {
            problems.push(format!("line {}: expected `device,{header}`", n + 1));
            continue;
        };
        let id = match devices.get(&name) {
            Some(id) => *id,
            None => {
                // A store failure is the store's error, never taken for an unknown device.
                let id = store.device_by_name(&name)?.map(|d| d.id);
                devices.insert(name.clone(), id);
                id
            }
        };
        let Some(id) = id else {
            problems.push(format!("line {}: no device named `{name}`", n + 1));
            continue;
        };
        match value(&field) {
            Ok(v) => entries.push((id, name, v)),
            // The store failing is the store's error; a patient it does not hold is this line's.
            Err(OpsError::Store(e)) if !matches!(e, StoreError::UnknownPatient) => {
                return Err(OpsError::Store(e));
            }
            Err(e) => problems.push(format!("line {}: {e}", n + 1)),
        }
    }
    if !problems.is_empty() {
        let more = problems.len().saturating_sub(MAX_LISTED_PROBLEMS);
        problems.truncate(MAX_LISTED_PROBLEMS);
        let mut text = format!("nothing was changed; fix these lines:\n{}", problems.join("\n"));
        if more > 0 {
            text.push_str(&format!("\n… and {more} more"));
        }
        return Err(OpsError::Invalid(text));
    }
    Ok((lines, entries))
}

/// Puts many patients on caseloads from CSV text (`device,nhs` per line, read by
/// [`device_lines`]): all or nothing, applied in one transaction, each addition audited.
pub fn caseload_import(store: &dyn ServerStore, csv: &str) -> Result<BulkImport, OpsError> {
    let (lines, entries) = device_lines(store, csv, "nhs", |nhs| find_patient(store, nhs))?;
    let pairs: Vec<(i64, PatientId)> = entries.iter().map(|(d, _, p)| (*d, *p)).collect();
    let added = store.caseload_add_many(&pairs)?;
    for (device, patient) in &added {
        store.append_audit(
            acting(),
            "caseload-add",
            Some(patient),
            &format!("device {} (caseload file)", name_of(&entries, *device)),
            now(),
        )?;
    }
    Ok(BulkImport { lines, added: added.len(), already: pairs.len() - added.len() })
}

/// Gives devices postcode districts to prefetch from CSV text (`device,district` per line, read
/// by [`device_lines`]): all or nothing, applied in one transaction, each addition audited.
pub fn area_import(store: &dyn ServerStore, csv: &str) -> Result<BulkImport, OpsError> {
    let (lines, entries) = device_lines(store, csv, "district", postcode_district)?;
    let pairs: Vec<(i64, String)> = entries.iter().map(|(d, _, district)| (*d, district.clone())).collect();
    let added = store.area_add_many(&pairs)?;
    for (device, district) in &added {
        store.append_audit(
            acting(),
            "area-add",
            None,
            &format!("device {}, district {district} (area file)", name_of(&entries, *device)),
            now(),
        )?;
    }
    Ok(BulkImport { lines, added: added.len(), already: pairs.len() - added.len() })
}

fn name_of<T>(entries: &[DeviceLine<T>], device: i64) -> &str {
    entries.iter().find(|(d, _, _)| *d == device).map_or("?", |(_, n, _)| n.as_str())
}

/// A postcode district (the outward code, e.g. SO16), upper-cased.
fn postcode_district(district: &str) -> Result<String, OpsError> {
    let district = district.trim().to_ascii_uppercase();
    if district.is_empty() || district.len() > 4 || !district.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(OpsError::Invalid(format!("`{district}` is not a postcode district (e.g. SO16)")));
    }
    Ok(district)
}

/// Takes a patient off a device's caseload; the device purges the record at its next sync.
pub fn caseload_remove(store: &dyn ServerStore, device_name: &str, patient: &str) -> Result<bool, OpsError> {
    let device = device(store, device_name)?;
    let patient = find_patient(store, patient)?;
    let removed = store.caseload_remove(device.id, &patient)?;
    if removed {
        store.append_audit(
            acting(),
            "caseload-remove",
            Some(&patient),
            &format!("device {device_name}"),
            now(),
        )?;
    }
    Ok(removed)
}

/// Assigns a device to an incident: the patient is in its scope for `hours`, then lapses.
pub fn incident_open(
    store: &dyn ServerStore,
    device_name: &str,
    patient: &str,
    hours: f64,
) -> Result<i64, OpsError> {
    if !(hours > 0.0 && hours <= 24.0 * 14.0) {
        return Err(OpsError::Invalid("an incident lasts between a minute and 14 days".into()));
    }
    let device = device(store, device_name)?;
    let patient = find_patient(store, patient)?;
    let until = now() + (hours * 3_600_000.0) as i64;
    let id = store.grant(device.id, &patient, GrantKind::Incident, "incident", until, now())?;
    store.append_audit(
        acting(),
        "incident-open",
        Some(&patient),
        &format!("device {device_name}, until {}", care_node::view::format_time(until)),
        now(),
    )?;
    Ok(id)
}

/// Ends a device's incident for a patient now; the device purges the record at its next sync.
pub fn incident_close(store: &dyn ServerStore, device_name: &str, patient: &str) -> Result<usize, OpsError> {
    let device = device(store, device_name)?;
    let patient = find_patient(store, patient)?;
    let closed = store.close_grants(device.id, &patient, GrantKind::Incident, now())?;
    store.append_audit(
        acting(),
        "incident-close",
        Some(&patient),
        &format!("device {device_name}"),
        now(),
    )?;
    Ok(closed)
}

/// Adds or removes a postcode district from a device's area prefetch.
pub fn area(store: &dyn ServerStore, device_name: &str, district: &str, add: bool) -> Result<bool, OpsError> {
    let district = postcode_district(district)?;
    let device = device(store, device_name)?;
    let changed =
        if add { store.area_add(device.id, &district)? } else { store.area_remove(device.id, &district)? };
    let action = if add { "area-add" } else { "area-remove" };
    store.append_audit(
        acting(),
        action,
        None,
        &format!("device {device_name}, district {district}"),
        now(),
    )?;
    Ok(changed)
}

/// Records or withdraws a patient's objection to sharing, or their national data opt-out.
pub fn set_consent(
    store: &dyn ServerStore,
    patient: &str,
    objection: Option<bool>,
    opt_out: Option<bool>,
) -> Result<ConsentFlags, OpsError> {
    let patient = find_patient(store, patient)?;
    let mut flags = store.consent(&patient)?;
    flags.objection = objection.unwrap_or(flags.objection);
    flags.opt_out = opt_out.unwrap_or(flags.opt_out);
    store.set_consent(&patient, flags)?;
    let detail = format!("objection {}, national data opt-out {}", flags.objection, flags.opt_out);
    store.append_audit(acting(), "consent", Some(&patient), &detail, now())?;
    Ok(flags)
}

/// Sets (or clears, with `None`) a device's document budget.
pub fn set_budget(store: &dyn ServerStore, device_name: &str, budget: Option<u64>) -> Result<(), OpsError> {
    let device = device(store, device_name)?;
    store.set_device_budget(device.id, budget)?;
    let detail =
        format!("device {device_name}, budget {}", budget.map_or("default".into(), |b| b.to_string()));
    store.append_audit(acting(), "budget", None, &detail, now())?;
    Ok(())
}

/// Merges two records of one person (an operator's decision, audited): `keep` absorbs `merge`.
pub fn merge_patients(
    store: &dyn ServerStore,
    keep: &str,
    merge: &str,
    operator: &str,
) -> Result<MergeOutcome, OpsError> {
    let keep = find_patient(store, keep)?;
    let merge = find_patient(store, merge)?;
    // An operator's merge happens once; the store also re-merges on its own when late entries
    // of a merged record arrive, but a second operator merge is a mistake worth saying so.
    if store.merged_into(&merge)? == Some(keep) {
        return Err(OpsError::Invalid(
            "that record is already merged into the one to keep; nothing to do".into(),
        ));
    }
    Ok(store.merge_patients(&keep, &merge, operator, now())?)
}

/// Revokes a device: its next handshake fails.
pub fn revoke(store: &dyn ServerStore, name: &str) -> Result<(), OpsError> {
    // Idempotent: a second revocation changes nothing and is not audited again.
    if store.revoke_device(name, now())? {
        store.append_audit(acting(), "revoke-device", None, &format!("device {name}"), now())?;
        tracing::warn!(device = %name, "device revoked by an operator");
    }
    Ok(())
}

/// Tells a device to destroy its data key and patient data at its next contact.
pub fn wipe(store: &dyn ServerStore, name: &str) -> Result<(), OpsError> {
    if store.request_wipe(name, now())? {
        store.append_audit(acting(), "wipe-requested", None, &format!("device {name}"), now())?;
        tracing::warn!(device = %name, "wipe requested by an operator");
    }
    Ok(())
}

/// How long a device that stopped syncing keeps the change log from being compacted, unless
/// the operator says otherwise: a month covers leave, a tablet in a spare vehicle, a long
/// outage. Devices away longer receive what changed whole when they return.
pub const DEFAULT_COMPACTION_HOLD: Duration = Duration::from_secs(30 * 24 * 3600);

/// What a compaction of the change log did (or, dry, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compaction {
    /// Entries with `seq <= horizon` are gone (or would go).
    pub horizon: u64,
    /// The newest entry of the log.
    pub head: u64,
    pub dropped: crate::store::Compacted,
    /// Devices whose next sync receives documents whole (their cursor is below the horizon).
    pub below: Vec<String>,
}

/// Compacts the change log: drops the entries every device that synced within `hold` has
/// acknowledged (audited). With `dry_run`, reports what it would drop and changes nothing.
pub fn compact_log(store: &dyn ServerStore, hold: Duration, dry_run: bool) -> Result<Compaction, OpsError> {
    compact_log_by(store, hold, dry_run, acting())
}

/// [`compact_log`], audited under `by` (the server's own schedule, say).
pub fn compact_log_by(
    store: &dyn ServerStore,
    hold: Duration,
    dry_run: bool,
    by: &str,
) -> Result<Compaction, OpsError> {
    let head = store.max_seq()?;
    let horizon = crate::domain::compaction::horizon(&store.devices()?, head, now(), hold.as_millis() as i64);
    let current = store.log_horizon()?;
    let dropped = if horizon.seq <= current {
        crate::store::Compacted::default()
    } else if dry_run {
        store.log_below(horizon.seq)?
    } else {
        store.compact_log(horizon.seq)?
    };
    let horizon_seq = horizon.seq.max(current);
    if !dry_run && dropped.entries > 0 {
        let detail = format!(
            "horizon {horizon_seq}: {} entries, {} bytes; below: {}",
            dropped.entries,
            dropped.bytes,
            if horizon.below.is_empty() { "none".to_string() } else { horizon.below.join(", ") }
        );
        store.append_audit(by, "compact-log", None, &detail, now())?;
        tracing::info!(
            horizon = horizon_seq,
            entries = dropped.entries,
            bytes = dropped.bytes,
            "change log compacted"
        );
    }
    Ok(Compaction { horizon: horizon_seq, head, dropped, below: horizon.below })
}

/// Acknowledges an open alert with the operator's note (audited); false if no such open alert.
pub fn acknowledge_alert(store: &dyn ServerStore, id: i64, note: &str) -> Result<bool, OpsError> {
    if note.trim().is_empty() {
        return Err(OpsError::Invalid("an acknowledgement needs a note".into()));
    }
    if !store.acknowledge_alert(id, note, now())? {
        return Ok(false);
    }
    store.append_audit(acting(), "alert-acknowledged", None, &format!("alert {id}: {note}"), now())?;
    Ok(true)
}

/// Records that an operator or privacy officer reviewed a quarantined upload, with a note
/// (audited). Reviewed items no longer count towards the device's quarantine limit. False if
/// there is no such item; an item already reviewed is an error (the first review stands).
pub fn review_quarantine(store: &dyn ServerStore, id: i64, note: &str) -> Result<bool, OpsError> {
    if note.trim().is_empty() {
        return Err(OpsError::Invalid("a review needs a note".into()));
    }
    let Some(item) = store.quarantined_item(id)? else { return Ok(false) };
    let already = |at_ms: i64| {
        OpsError::Invalid(format!(
            "quarantined upload {id} was already reviewed on {}; the first review stands",
            care_node::view::format_time(at_ms)
        ))
    };
    if let Some(review) = &item.reviewed {
        return Err(already(review.at_ms));
    }
    if !store.review_quarantine(id, note, now())? {
        return Err(already(now())); // reviewed by someone else a moment ago
    }
    let detail = format!("quarantine {id} ({} at {}, rule {}): {note}", item.device, item.place, item.rule);
    store.append_audit(acting(), "quarantine-reviewed", Some(&item.patient), &detail, now())?;
    Ok(true)
}

/// Alert kinds whose reason is a clinician's free text (patient data): listings show it sealed,
/// and reading it is an audited action of its own ([`alert_reason`]).
pub const SEALED_REASON_KINDS: [&str; 2] = ["break-glass", "permission-to-view"];

/// Whether an alert's reason is shown only on request.
pub fn reason_sealed(alert: &crate::store::AlertRecord) -> bool {
    SEALED_REASON_KINDS.contains(&alert.kind.as_str())
}

/// The reason of one alert, for an operator or privacy officer who asks for it; audited.
pub fn alert_reason(store: &dyn ServerStore, id: i64) -> Result<Option<String>, OpsError> {
    let Some(alert) = store.alerts(true)?.into_iter().find(|a| a.id == id) else { return Ok(None) };
    if reason_sealed(&alert) {
        store.append_audit(
            acting(),
            "alert-reason-viewed",
            alert.patient.as_ref(),
            &format!("alert {id}"),
            now(),
        )?;
    }
    Ok(Some(alert.reason))
}

/// Audit lines matching `filter`. Looking up who saw a patient is itself audited.
pub fn audit_search(
    store: &dyn ServerStore,
    filter: &crate::store::AuditFilter,
) -> Result<Vec<crate::store::AuditRecord>, OpsError> {
    let entries = store.audit_entries(filter)?;
    if let Some(patient) = &filter.patient {
        store.append_audit(acting(), "audit-lookup", Some(patient), "who saw this patient", now())?;
    }
    Ok(entries)
}

/// Parses a time given by an operator: RFC 3339 or a date (`2026-11-25`, midnight UTC).
pub fn parse_since(s: &str) -> Result<i64, OpsError> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let date = time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
        .map_err(|_| OpsError::Invalid(format!("`{s}` is not a date (2026-11-25) or an RFC 3339 time")))?;
    Ok(date.midnight().assume_utc().unix_timestamp() * 1000)
}

/// The anonymised planning export, grouped as asked (audited once: who took it, how it was
/// grouped, how many patients it counts and how many cells were suppressed).
pub fn planning_export(
    store: &dyn ServerStore,
    grouping: crate::operator::planning::Grouping,
) -> Result<crate::operator::planning::PlanningExport, OpsError> {
    let export = crate::operator::planning::export(store, grouping, now())?;
    let detail = format!(
        "{} patients counted, {} excluded by the national data opt-out; {} cells, {} suppressed",
        export.patients_counted, export.patients_opted_out, export.cells, export.suppressed_cells
    );
    store.append_audit(acting(), "export-planning", None, &detail, now())?;
    Ok(export)
}

/// Stages the server's next key: from now on every sync tells devices to pin it beside the
/// current one (audited). Returns its fingerprint.
pub fn stage_server_key(store: &dyn ServerStore) -> Result<[u8; 32], OpsError> {
    let next = store.stage_server_key()?;
    let detail = format!("next key {}", care_node::identity::short_hex(&next.public_key()));
    store.append_audit(acting(), "server-key-staged", None, &detail, now())?;
    Ok(next.fingerprint())
}

/// Makes the staged key the server's key (audited); `serve` presents it after a restart.
/// Refused while enrolled devices have not learnt it (they could not connect any more and would
/// need re-enrolling) unless `force`.
pub fn activate_server_key(store: &dyn ServerStore, force: bool) -> Result<[u8; 32], OpsError> {
    let behind = store.devices_without_staged_key()?;
    if !behind.is_empty() && !force {
        return Err(OpsError::Invalid(format!(
            "{} device(s) have not synced since the key was staged and would have to re-enrol: {}; \
             let them sync first, or pass --force",
            behind.len(),
            behind.join(", ")
        )));
    }
    let new = store.activate_server_key()?;
    let detail = format!(
        "key {} active; {} device(s) must re-enrol",
        care_node::identity::short_hex(&new.public_key()),
        behind.len()
    );
    store.append_audit(acting(), "server-key-activated", None, &detail, now())?;
    Ok(new.fingerprint())
}

/// Drops a staged key (audited); false if none was staged.
pub fn cancel_server_key(store: &dyn ServerStore) -> Result<bool, OpsError> {
    let cancelled = store.cancel_server_key()?;
    if cancelled {
        store.append_audit(acting(), "server-key-cancelled", None, "staged key dropped", now())?;
    }
    Ok(cancelled)
}

/// Changes a server setting as an operator (audited); it stands until the configuration file's
/// value for it changes ([`crate::domain::settings`]).
pub fn set_setting(store: &dyn ServerStore, name: &str, value: &str) -> Result<(), OpsError> {
    use crate::domain::settings::Setting;
    let setting = Setting::parse(name).ok_or_else(|| {
        OpsError::Invalid(format!("unknown setting `{name}` (known: {})", Setting::names()))
    })?;
    setting.validate(value).map_err(OpsError::Invalid)?;
    let value = value.trim();
    store.set_setting(setting.name(), value)?;
    store.append_audit(acting(), "setting", None, &format!("{} = {value}", setting.name()), now())?;
    Ok(())
}

/// A device as operators see it (the CLI's `devices`, the API and the dashboard).
#[derive(Debug, Clone)]
pub struct DeviceOverview {
    pub name: String,
    pub role: crate::store::Role,
    /// `pending`, `enrolled`, `wipe-requested`, `revoked`, `revoked-wipe-requested`, `wiped`.
    pub state: &'static str,
    pub enrolled_at_ms: Option<i64>,
    pub last_sync_ms: Option<i64>,
    /// `valid`, `expired` or `never-synced`: whether the device may still show records offline.
    pub lease: &'static str,
    pub lease_expires_at_ms: Option<i64>,
    /// Admitted, and no sync for longer than `stale_after_ms`.
    pub stale: bool,
    pub documents_held: u64,
    /// Patients in scope that the device's budget left out at its last round.
    pub left_out: u64,
    pub cursor: u64,
}

/// Every device with its lease, staleness and documents held, at `now_ms`.
pub fn device_overview(
    store: &dyn ServerStore,
    stale_after_ms: i64,
    now_ms: i64,
) -> Result<Vec<DeviceOverview>, OpsError> {
    let held = store.held_counts()?;
    // Each role's lease read once, not once per device.
    let mut leases = std::collections::HashMap::new();
    let mut out = Vec::new();
    for d in store.devices()? {
        let lease_ms = match leases.get(&d.role) {
            Some(&ms) => ms,
            None => {
                let ms = store.setting_hours_ms(crate::domain::settings::Setting::LeaseHours(d.role))?;
                *leases.entry(d.role).or_insert(ms)
            }
        };
        let lease_expires = d.last_sync_ms.map(|t| t + lease_ms);
        let lease = match lease_expires {
            None => "never-synced",
            Some(until) if until > now_ms => "valid",
            Some(_) => "expired",
        };
        let stale = d.admitted() && d.last_sync_ms.is_none_or(|t| now_ms - t > stale_after_ms);
        out.push(DeviceOverview {
            state: d.state(),
            documents_held: held.get(&d.id).copied().unwrap_or(0),
            name: d.name,
            role: d.role,
            enrolled_at_ms: d.enrolled_at_ms,
            last_sync_ms: d.last_sync_ms,
            lease,
            lease_expires_at_ms: lease_expires,
            stale,
            left_out: d.left_out,
            cursor: d.acked_cursor,
        });
    }
    Ok(out)
}
