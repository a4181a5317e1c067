//! `care-mobile-ffi`: the one small, stable API the Android and iOS apps call, generated for
//! Kotlin and Swift (and Python, which the tests use) with UniFFI proc-macros.
//!
//! The bridging layer is not API and holds no logic: each function converts its arguments,
//! calls `care-node`, and maps the error into [`CareError`] — one flat enum whose messages never
//! contain patient data. Panics are caught here and become [`CareError::Internal`]. I/O runs on
//! one shared multi-threaded tokio runtime (UniFFI's own async support is single-threaded).
//!
//! - [`error`]: the flat error and its mapping from `care-node`'s errors.
//! - [`view`]: the records a patient view is made of.

mod error;
mod view;

use std::sync::{Arc, OnceLock};

use care_node::client;
use care_node::crypto::{CryptoError, DataKey, KeyWrapper, PassphraseWrapper};
use care_node::news2::{Assessment, Observations};
use care_node::nhs::NhsNumber;
use care_node::notify::Notification;
use care_node::protocol::AccessKind;
use care_node::record::NewEntry;
use care_node::store::{DeviceStore, PatientCard};
use care_node::summary::Section;
use care_node::sync::{AccessRequest, SyncStats};

pub use error::{CareError, KeystoreError};
pub use view::*;

uniffi::setup_scaffolding!();

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("care-ffi")
            .enable_all()
            .build()
            .expect("the FFI's tokio runtime starts")
    })
}

/// Runs `f`, turning a panic into [`CareError::Internal`] so none crosses the boundary.
fn guarded<T>(f: impl FnOnce() -> Result<T, CareError>) -> Result<T, CareError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| Err(CareError::internal()))
}

/// The platform keystore: wraps and unwraps the store's data key (Android Keystore, iOS
/// Keychain/Secure Enclave). Implemented by the app.
#[uniffi::export(with_foreign)]
pub trait KeyProvider: Send + Sync {
    fn wrap_key(&self, key: Vec<u8>) -> Result<Vec<u8>, KeystoreError>;
    fn unwrap_key(&self, wrapped: Vec<u8>) -> Result<Vec<u8>, KeystoreError>;
}

/// Progress and live updates from syncs.
#[uniffi::export(with_foreign)]
pub trait SyncListener: Send + Sync {
    /// After each batch from the server: items (documents, changes, purges) of the current round
    /// applied so far, and how many the round has — for a progress bar.
    fn on_progress(&self, applied: u64, total: u64);
    /// New data arrived for patients on this device (documents, changes or purges), with how
    /// many notifications it produced (read them with `notifications`).
    fn on_new_data(&self, changed: u64, notifications: u64);
}

struct PlatformKeystore(Arc<dyn KeyProvider>);

impl KeyWrapper for PlatformKeystore {
    fn kind(&self) -> &'static str {
        "platform-keystore"
    }

    fn wrap(&self, key: &DataKey) -> Result<Vec<u8>, CryptoError> {
        self.0.wrap_key(key.as_bytes().to_vec()).map_err(|e| CryptoError::Keystore(e.to_string()))
    }

    fn unwrap(&self, wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        let key = self.0.unwrap_key(wrapped.to_vec()).map_err(|e| CryptoError::Keystore(e.to_string()))?;
        let key: [u8; 32] = key.try_into().map_err(|_| CryptoError::MalformedWrappedKey)?;
        Ok(DataKey::from_bytes(key))
    }
}

/// A search of the patients on this device. Give an NHS number, or any of the others.
#[derive(Debug, Clone, Default, uniffi::Record)]
pub struct SearchQuery {
    #[uniffi(default = None)]
    pub nhs_number: Option<String>,
    #[uniffi(default = None)]
    pub name: Option<String>,
    #[uniffi(default = None)]
    pub date_of_birth: Option<String>,
    #[uniffi(default = None)]
    pub postcode: Option<String>,
}

/// What enrolment told the device.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Enrolled {
    pub device_name: String,
    pub role: String,
    pub server_address: String,
}

/// What a sync did.
#[derive(Debug, Clone, uniffi::Record)]
pub struct SyncOutcome {
    pub stats: SyncStats,
    pub bytes: u64,
    pub duration_ms: u64,
}

/// The server's answer to permission to view or break glass.
#[derive(Debug, Clone, uniffi::Record)]
pub struct AccessOutcome {
    pub granted: bool,
    pub message: String,
    pub until_ms: i64,
}

/// An attendance recorded with what NEWS2 says of its observations: a score, or why there is
/// none (under 16, pregnancy, or which observations are missing).
#[derive(Debug, Clone, uniffi::Record)]
pub struct Attendance {
    pub entry_id: String,
    pub assessment: Assessment,
}

/// One entry of this device's signed view log.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ViewRecord {
    pub seq: u64,
    pub at_ms: i64,
    pub patient_id: String,
    pub action: String,
    /// The server has recorded it.
    pub uploaded: bool,
}

/// Enrolment, sync and lease state.
#[derive(Debug, Clone, uniffi::Record)]
pub struct DeviceStatus {
    pub enrolled: bool,
    pub device_name: Option<String>,
    pub last_sync_ms: Option<i64>,
    pub lease_ms: Option<u64>,
    pub lease_expired: bool,
    pub patients: u64,
    pub pending_changes: u64,
    pub left_out_by_budget: u64,
}

/// A care-sync device: one encrypted store.
#[derive(uniffi::Object)]
pub struct CareNode {
    store: Arc<tokio::sync::Mutex<DeviceStore>>,
}

impl CareNode {
    fn new(store: DeviceStore) -> Arc<Self> {
        Arc::new(Self { store: Arc::new(tokio::sync::Mutex::new(store)) })
    }

    fn with_store<T>(
        &self,
        f: impl FnOnce(&mut DeviceStore) -> Result<T, CareError>,
    ) -> Result<T, CareError> {
        guarded(|| f(&mut self.store.blocking_lock()))
    }

    async fn access(
        &self,
        nhs_number: String,
        kind: AccessKind,
        reason: String,
    ) -> Result<AccessOutcome, CareError> {
        let store = self.store.clone();
        run(async move {
            let mut store = store.lock().await;
            let nhs = NhsNumber::parse(&nhs_number)?;
            let request = AccessRequest { nhs_number: nhs.as_str().into(), kind, reason };
            let (decision, _) = client::request_access(&mut store, request).await?;
            if decision.granted
                && let Some(patient) = store.find_by_nhs(&nhs)?
            {
                let action =
                    if kind == AccessKind::BreakGlass { "break-glass" } else { "permission-to-view" };
                store.record_view(&patient.summary.patient_id()?, action, "")?;
            }
            Ok(AccessOutcome {
                granted: decision.granted,
                message: decision.message,
                until_ms: decision.until_ms,
            })
        })
        .await
    }
}

/// Runs a future on the shared runtime; a panic inside becomes [`CareError::Internal`].
async fn run<T: Send + 'static>(
    future: impl std::future::Future<Output = Result<T, CareError>> + Send + 'static,
) -> Result<T, CareError> {
    runtime().spawn(future).await.unwrap_or_else(|_| Err(CareError::internal()))
}

#[uniffi::export]
impl CareNode {
    /// Opens (or creates) the store at `path`, its data key wrapped by the platform keystore.
    #[uniffi::constructor]
    pub fn open_with_keystore(path: String, keys: Arc<dyn KeyProvider>) -> Result<Arc<Self>, CareError> {
        guarded(|| Ok(Self::new(DeviceStore::open(path.as_ref(), &PlatformKeystore(keys))?)))
    }

    /// Opens (or creates) the store at `path`, its data key wrapped under a passphrase (tests).
    #[uniffi::constructor]
    pub fn open_with_passphrase(path: String, passphrase: String) -> Result<Arc<Self>, CareError> {
        guarded(|| Ok(Self::new(DeviceStore::open(path.as_ref(), &PassphraseWrapper::new(passphrase))?)))
    }

    /// Enrols this device with the operator's one-time token.
    pub async fn enrol(&self, token: String) -> Result<Enrolled, CareError> {
        let store = self.store.clone();
        run(async move {
            let mut store = store.lock().await;
            let e = client::enrol(&mut store, &token).await?;
            Ok(Enrolled { device_name: e.device_name, role: e.role, server_address: e.server_addr })
        })
        .await
    }

    /// Syncs with the server, reporting progress and new data to `listener`.
    pub async fn sync(&self, listener: Option<Arc<dyn SyncListener>>) -> Result<SyncOutcome, CareError> {
        let store = self.store.clone();
        run(async move {
            let mut store = store.lock().await;
            let progress_listener = listener.clone();
            let mut progress = move |s: &SyncStats| {
                if let Some(l) = &progress_listener {
                    l.on_progress(s.round_applied, s.round_items);
                }
            };
            let report = client::sync_with_progress(&mut store, &mut progress).await?;
            let changed = report.stats.documents_received
                + report.stats.changes_received
                + report.stats.documents_purged;
            if let Some(l) = &listener
                && changed > 0
            {
                l.on_new_data(changed, report.stats.notifications);
            }
            Ok(SyncOutcome {
                bytes: report.udp_bytes(),
                duration_ms: report.duration.as_millis() as u64,
                stats: report.stats,
            })
        })
        .await
    }

    /// The patients on this device (refused when the offline lease has expired).
    pub fn list_patients(&self) -> Result<Vec<PatientCard>, CareError> {
        self.with_store(|s| Ok(s.list()?))
    }

    /// Patients matching a search (refused when the offline lease has expired).
    pub fn search(&self, query: SearchQuery) -> Result<Vec<PatientCard>, CareError> {
        self.with_store(|s| {
            let nhs = query.nhs_number.as_deref().map(NhsNumber::parse).transpose()?;
            Ok(s.search(
                nhs.as_ref(),
                query.name.as_deref(),
                query.date_of_birth.as_deref(),
                query.postcode.as_deref(),
            )?)
        })
    }

    /// A patient's summary for a clinician: lease checked, the view written to the signed log.
    /// `from_search` records that the record was opened from search results.
    pub fn read_patient(&self, nhs_number: String, from_search: bool) -> Result<PatientView, CareError> {
        self.with_store(|s| {
            let nhs = NhsNumber::parse(&nhs_number)?;
            let mut patient = s.view_patient(&nhs, if from_search { "search-open" } else { "ffi-read" })?;
            let sync = s.sync_state()?;
            PatientView::build(&mut patient, &sync, s.diverged()?)
        })
    }

    /// Sets how long network calls (sync, enrol, break glass, permission to view) wait for the
    /// server before `Offline` (default 10 s; at least 100 ms; for the whole process).
    pub fn set_connect_timeout_ms(&self, timeout_ms: u64) {
        care_node::client::set_connect_timeout(std::time::Duration::from_millis(timeout_ms));
    }

    /// Records an entry of any section (works offline): an allergy, problem, medication, alert,
    /// care plan, contact or result, with the same checks as the CLI. Returns the entry's id.
    /// `InvalidInput` names the field at fault; `NotPermitted` when the device's role may not
    /// write that section.
    pub fn add_entry(&self, nhs_number: String, entry: NewEntry) -> Result<String, CareError> {
        self.with_store(|s| {
            let nhs = NhsNumber::parse(&nhs_number)?;
            Ok(s.record(&nhs, &entry)?.to_string())
        })
    }

    /// Records a crew attendance with observations (works offline) and returns its NEWS2.
    pub fn record_attendance(
        &self,
        nhs_number: String,
        observations: Observations,
        reason: Option<String>,
    ) -> Result<Attendance, CareError> {
        self.with_store(|s| {
            let nhs = NhsNumber::parse(&nhs_number)?;
            let (id, assessment) = s.record_attendance(&nhs, &observations, reason.as_deref())?;
            Ok(Attendance { entry_id: id.to_string(), assessment })
        })
    }

    /// Marks an entry as entered in error (works offline): kept for the record, hidden from the
    /// clinical view, never resurrected.
    pub fn mark_entered_in_error(
        &self,
        nhs_number: String,
        section: Section,
        entry_id: String,
        reason: String,
    ) -> Result<(), CareError> {
        self.with_store(|s| {
            let nhs = NhsNumber::parse(&nhs_number)?;
            let id =
                entry_id.parse().map_err(|_| CareError::InvalidInput("the entry id is not a UUID".into()))?;
            Ok(s.mark_entered_in_error(&nhs, section, id, &reason)?)
        })
    }

    /// Records the patient's permission to view and fetches the record (needs a connection).
    pub async fn permission_to_view(&self, nhs_number: String) -> Result<AccessOutcome, CareError> {
        self.access(nhs_number, AccessKind::PermissionToView, "permission given at the point of care".into())
            .await
    }

    /// Emergency access with a reason: audited, time-limited, alerts the privacy officer.
    pub async fn break_glass(&self, nhs_number: String, reason: String) -> Result<AccessOutcome, CareError> {
        self.access(nhs_number, AccessKind::BreakGlass, reason).await
    }

    /// Notifications derived from received changes (admitted, transferred, discharged, attended),
    /// newest first (refused when the offline lease has expired).
    pub fn notifications(&self, limit: u32) -> Result<Vec<Notification>, CareError> {
        self.with_store(|s| Ok(s.notifications(limit as usize)?))
    }

    /// This device's view log, newest first.
    pub fn audit_log(&self, limit: u32) -> Result<Vec<ViewRecord>, CareError> {
        self.with_store(|s| {
            Ok(s.view_log(limit as usize)?
                .into_iter()
                .map(|(e, uploaded)| ViewRecord {
                    seq: e.seq,
                    at_ms: e.at_ms,
                    patient_id: e.patient.to_string(),
                    action: e.action,
                    uploaded,
                })
                .collect())
        })
    }

    pub fn status(&self) -> Result<DeviceStatus, CareError> {
        self.with_store(|s| {
            let enrolment = s.enrolment()?;
            let sync = s.sync_state()?;
            Ok(DeviceStatus {
                enrolled: enrolment.is_some(),
                device_name: enrolment.map(|e| e.device_name),
                last_sync_ms: sync.last_sync_ms,
                lease_ms: sync.lease_ms,
                lease_expired: s.check_lease(care_node::now_ms()).is_err(),
                patients: s.document_count()?,
                pending_changes: s.pending_count()?,
                left_out_by_budget: sync.left_out,
            })
        })
    }

    /// Destroys every patient record and the data key on this device (crypto-shredding).
    pub fn wipe(&self) -> Result<(), CareError> {
        self.with_store(|s| {
            s.wipe_patient_data()?;
            Ok(s.shred()?)
        })
    }
}
