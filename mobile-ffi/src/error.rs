//! One small flat error for the apps: a kind (the variant) and a message that never contains
//! patient data (the messages come from `care-node`, which holds itself to that rule).

use care_node::client::ClientError;
use care_node::crypto::CryptoError;
use care_node::nhs::NhsNumberError;
use care_node::store::StoreError;
use care_node::summary::SummaryError;

#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum CareError {
    #[error("{0}")]
    NotEnrolled(String),
    #[error("{0}")]
    AlreadyEnrolled(String),
    /// Wrong passphrase (or its wrapped data key is damaged).
    #[error("{0}")]
    WrongKey(String),
    /// The user cancelled the platform keystore's prompt; ask again when they are ready.
    #[error("{0}")]
    KeystoreCancelled(String),
    /// The platform keystore could not unwrap the data key (e.g. the key was invalidated when
    /// the device's biometrics changed); the message carries the keystore's reason.
    #[error("{0}")]
    KeystoreFailed(String),
    /// A passphrase store opened with the keystore, or a keystore store with a passphrase.
    #[error("{0}")]
    WrongUnlockMethod(String),
    /// A sync or watch holds the connection to the server (stop the watch first), or the store
    /// stayed locked by the other connection for longer than 5 s: try again.
    #[error("{0}")]
    Busy(String),
    /// The device's storage is full: what was being written was rolled back whole (nothing
    /// recorded before is lost); free space and try again.
    #[error("{0}")]
    StorageFull(String),
    /// The server could not complete the sync (its storage is full, say); nothing this device
    /// holds was lost: try again later.
    #[error("{0}")]
    ServerUnavailable(String),
    /// The store is tampered with, corrupt, or not a care-sync store.
    #[error("{0}")]
    StoreDamaged(String),
    #[error("{0}")]
    LeaseExpired(String),
    #[error("{0}")]
    UnknownPatient(String),
    #[error("{0}")]
    Wiped(String),
    /// No connection to the server (the work was not done; try again when connected).
    #[error("{0}")]
    Offline(String),
    /// The server refused (revoked device, bad token, refused upload).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    InvalidInput(String),
    /// The write policy does not let this device make that change (e.g. edit another author's
    /// entry); nothing was stored. The message names the rule.
    #[error("{0}")]
    NotPermitted(String),
    #[error("{0}")]
    Internal(String),
}

impl CareError {
    pub(crate) fn internal() -> Self {
        CareError::Internal("internal error in care-sync; the operation did not complete".into())
    }

    pub(crate) fn busy() -> Self {
        CareError::Busy("a live session (watch) holds the connection to the server; stop it first".into())
    }
}

impl From<StoreError> for CareError {
    fn from(e: StoreError) -> Self {
        let message = e.to_string();
        match e {
            StoreError::NotEnrolled => CareError::NotEnrolled(message),
            StoreError::AlreadyEnrolled => CareError::AlreadyEnrolled(message),
            StoreError::Key(CryptoError::WrongPassphrase | CryptoError::MalformedWrappedKey) => {
                CareError::WrongKey(message)
            }
            // The keystore's own words, once: "the platform keystore failed: <reason>".
            StoreError::Key(e @ CryptoError::Keystore(_)) => CareError::KeystoreFailed(e.to_string()),
            StoreError::Key(e @ CryptoError::KeystoreCancelled) => {
                CareError::KeystoreCancelled(format!("{e}; nothing was opened"))
            }
            StoreError::WrongUnlockMethod { .. } => CareError::WrongUnlockMethod(message),
            StoreError::Tampered { .. }
            | StoreError::NotAStore
            | StoreError::Decode { .. }
            | StoreError::UnknownFormat(_) => CareError::StoreDamaged(message),
            StoreError::LeaseExpired { .. } | StoreError::ClockWoundBack { .. } => {
                CareError::LeaseExpired(message)
            }
            StoreError::UnknownPatient => CareError::UnknownPatient(message),
            StoreError::Wiped => CareError::Wiped(message),
            StoreError::Busy => CareError::Busy(message),
            StoreError::StorageFull => CareError::StorageFull(message),
            StoreError::Refused(_) => CareError::NotPermitted(message),
            StoreError::InvalidEntry(_) => CareError::InvalidInput(message),
            _ => CareError::Internal(message),
        }
    }
}

impl From<ClientError> for CareError {
    fn from(e: ClientError) -> Self {
        let message = e.to_string();
        match e {
            ClientError::Store(s) | ClientError::Sync(care_node::sync::SyncError::Store(s)) => s.into(),
            ClientError::ServerUnavailable(_) => CareError::ServerUnavailable(message),
            ClientError::Token(_) | ClientError::BadAddress(_) => CareError::InvalidInput(message),
            ClientError::Unreachable(_) | ClientError::Timeout(_) | ClientError::NeedsConnection(..) => {
                CareError::Offline(message)
            }
            ClientError::ServerKeyMismatch
            | ClientError::DeviceRefused
            | ClientError::EnrolmentRefused(_)
            | ClientError::Refused(_) => CareError::Refused(message),
            ClientError::Wiped => CareError::Wiped(message),
            _ => CareError::Internal(message),
        }
    }
}

impl From<NhsNumberError> for CareError {
    fn from(e: NhsNumberError) -> Self {
        CareError::InvalidInput(format!("invalid NHS number: {e}"))
    }
}

impl From<SummaryError> for CareError {
    fn from(e: SummaryError) -> Self {
        match e {
            SummaryError::UnknownEntry(_) => CareError::InvalidInput(e.to_string()),
            other => CareError::Internal(other.to_string()),
        }
    }
}

/// What a platform keystore callback reports.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum KeystoreError {
    /// The keystore could not wrap or unwrap; `message` says why (it must hold no patient data).
    #[error("{message}")]
    Failed { message: String },
    /// The user dismissed the prompt (biometrics, device PIN).
    #[error("cancelled by the user")]
    Cancelled,
}

impl KeystoreError {
    pub(crate) fn into_crypto(self) -> CryptoError {
        match self {
            KeystoreError::Failed { message } => CryptoError::Keystore(message),
            KeystoreError::Cancelled => CryptoError::KeystoreCancelled,
        }
    }
}

impl From<uniffi::UnexpectedUniFFICallbackError> for KeystoreError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        KeystoreError::Failed { message: e.reason }
    }
}
