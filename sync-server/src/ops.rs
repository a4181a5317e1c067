//! Operator actions shared by the CLI, the demo and the tests.

use std::net::SocketAddr;
use std::time::Duration;

use care_node::nhs::NhsNumber;
use care_node::token::EnrolmentToken;

use crate::store::{DeviceRecord, Role, ServerStore, StoreError};

/// How long an enrolment token is valid unless the operator says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid NHS number: {0}")]
    NhsNumber(#[from] care_node::nhs::NhsNumberError),
    #[error("device `{0}` has not enrolled yet")]
    NotEnrolled(String),
}

/// Creates a one-time enrolment token for a named device; the token carries `server_addr` and
/// the server key's fingerprint.
pub fn issue_token(
    store: &dyn ServerStore,
    name: &str,
    role: Role,
    server_addr: SocketAddr,
    ttl: Duration,
) -> Result<String, OpsError> {
    let identity = store.server_identity()?;
    let token = EnrolmentToken::new(server_addr.to_string(), identity.fingerprint());
    let expires = care_node::now_ms() + ttl.as_millis() as i64;
    store.create_enrolment(name, role, EnrolmentToken::secret_hash(&token.secret), expires)?;
    Ok(token.encode())
}

fn device(store: &dyn ServerStore, name: &str) -> Result<DeviceRecord, OpsError> {
    store.device_by_name(name)?.ok_or_else(|| StoreError::UnknownDevice(name.to_string()).into())
}

/// Puts a patient on a device's caseload; returns false if already there.
pub fn caseload_add(store: &dyn ServerStore, device_name: &str, nhs: &str) -> Result<bool, OpsError> {
    let device = device(store, device_name)?;
    let nhs = NhsNumber::parse(nhs)?;
    let patient = store.patient_by_nhs(&nhs)?.ok_or(StoreError::UnknownPatient)?;
    Ok(store.caseload_add(device.id, &patient)?)
}

/// Takes a patient off a device's caseload; the device purges the record at its next sync.
pub fn caseload_remove(store: &dyn ServerStore, device_name: &str, nhs: &str) -> Result<bool, OpsError> {
    let device = device(store, device_name)?;
    let nhs = NhsNumber::parse(nhs)?;
    let patient = store.patient_by_nhs(&nhs)?.ok_or(StoreError::UnknownPatient)?;
    Ok(store.caseload_remove(device.id, &patient)?)
}

/// A patient named by NHS number (ten digits) or by care-sync patient id (a UUID).
pub fn find_patient(store: &dyn ServerStore, key: &str) -> Result<care_node::summary::PatientId, OpsError> {
    if let Ok(id) = key.trim().parse::<care_node::summary::PatientId>() {
        return match store.load_document(&id)? {
            Some(_) => Ok(id),
            None => Err(StoreError::UnknownPatient.into()),
        };
    }
    let nhs = NhsNumber::parse(key)?;
    Ok(store.patient_by_nhs(&nhs)?.ok_or(StoreError::UnknownPatient)?)
}

/// Merges two records of one person (an operator's decision, audited): `keep` absorbs `merge`.
pub fn merge_patients(
    store: &dyn ServerStore,
    keep: &str,
    merge: &str,
    operator: &str,
) -> Result<crate::store::MergeOutcome, OpsError> {
    let keep = find_patient(store, keep)?;
    let merge = find_patient(store, merge)?;
    Ok(store.merge_patients(&keep, &merge, operator, care_node::now_ms())?)
}

/// Revokes a device: its next handshake fails.
pub fn revoke(store: &dyn ServerStore, name: &str) -> Result<(), OpsError> {
    Ok(store.revoke_device(name, care_node::now_ms())?)
}
