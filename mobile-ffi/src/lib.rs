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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use care_node::client;
use care_node::crypto::{CryptoError, DataKey, KeyWrapper, PassphraseWrapper};
use care_node::news2::{Assessment, Observations};
use care_node::nhs::NhsNumber;
use care_node::notify::Notification;
use care_node::protocol::AccessKind;
use care_node::record::NewEntry;
pub use care_node::store::DeviceStatus;
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

/// Progress and live updates from syncs and watches.
///
/// Callbacks arrive on the library's own thread (`care-ffi-callbacks`), never the app's main
/// thread, one at a time and in order; post to the UI thread to update views. Every callback of
/// a `sync` has arrived before `sync` returns. A callback may call the local methods (reads,
/// entries, `notifications`, `status`): they use their own connection to the store. It must not
/// wait for a network call (`sync`, `enrol`, `breakGlass`…) of the same `CareNode` (`wipe` from
/// a callback is `Busy`).
#[uniffi::export(with_foreign)]
pub trait SyncListener: Send + Sync {
    /// Items (documents, changes, purges) of the current round applied so far, and how many the
    /// round has, for a progress bar: at every hundredth of the round and after each page, never
    /// before the first item (`total` is known from the first call).
    fn on_progress(&self, applied: u64, total: u64);
    /// New data arrived for patients on this device (documents, changes or purges), with how
    /// many notifications it produced (read them with `notifications`). Once per sync; once per
    /// round the server pushes during a watch.
    fn on_new_data(&self, changed: u64, notifications: u64);
}

/// A listener's callbacks, queued to one thread of their own: none runs while the store is
/// locked or a page is being applied, and a slow one never slows the sync.
enum Event {
    Progress { applied: u64, total: u64 },
    NewData { changed: u64, notifications: u64 },
}

struct Callbacks {
    queue: Option<std::sync::mpsc::Sender<Event>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Callbacks {
    fn new(listener: Option<Arc<dyn SyncListener>>) -> Self {
        let Some(listener) = listener else { return Self { queue: None, thread: None } };
        let (queue, events) = std::sync::mpsc::channel::<Event>();
        let thread = std::thread::Builder::new()
            .name("care-ffi-callbacks".into())
            .spawn(move || {
                for event in events {
                    // An app's callback that throws must not take the library down.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match event {
                        Event::Progress { applied, total } => listener.on_progress(applied, total),
                        Event::NewData { changed, notifications } => {
                            listener.on_new_data(changed, notifications)
                        }
                    }));
                }
            })
            .ok();
        Self { queue: thread.as_ref().map(|_| queue), thread }
    }

    fn sender(&self) -> Option<std::sync::mpsc::Sender<Event>> {
        self.queue.clone()
    }

    /// Waits until every callback queued so far has run. Every handle from [`Callbacks::sender`]
    /// must be dropped first: the thread ends when the queue closes.
    async fn finish(mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// New data in a session's totals since `before`: (items changed, notifications).
fn new_data(before: &SyncStats, now: &SyncStats) -> (u64, u64) {
    let items = |s: &SyncStats| s.documents_received + s.changes_received + s.documents_purged;
    (items(now).saturating_sub(items(before)), now.notifications.saturating_sub(before.notifications))
}

struct PlatformKeystore(Arc<dyn KeyProvider>);

impl KeyWrapper for PlatformKeystore {
    fn kind(&self) -> &'static str {
        "platform-keystore"
    }

    fn wrap(&self, key: &DataKey) -> Result<Vec<u8>, CryptoError> {
        self.0.wrap_key(key.as_bytes().to_vec()).map_err(KeystoreError::into_crypto)
    }

    fn unwrap(&self, wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        let key = self.0.unwrap_key(wrapped.to_vec()).map_err(KeystoreError::into_crypto)?;
        let key: [u8; 32] = key.try_into().map_err(|_| CryptoError::MalformedWrappedKey)?;
        Ok(DataKey::from_bytes(key))
    }
}

/// A search of the patients on this device. Give an NHS number, or any of the others.
#[derive(Clone, Default, uniffi::Record)]
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

care_node::redacted_debug!(SearchQuery);

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

impl From<client::SyncReport> for SyncOutcome {
    fn from(report: client::SyncReport) -> Self {
        SyncOutcome {
            bytes: report.udp_bytes(),
            duration_ms: report.duration.as_millis() as u64,
            stats: report.stats,
        }
    }
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

/// A care-sync device: one encrypted store, held on two connections.
#[derive(uniffi::Object)]
pub struct CareNode {
    /// Network calls (enrol, sync, watch, permission to view, break glass) hold this connection
    /// for their whole exchange, one at a time.
    network: Arc<tokio::sync::Mutex<DeviceStore>>,
    /// Local calls (reads, search, entries, status) use their own connection, so they never wait
    /// for the network: at most for another local call, or for one page of a sync to commit.
    local: Mutex<DeviceStore>,
    /// A watch holds the network connection until it is stopped.
    watching: Arc<AtomicBool>,
    /// The store was wiped (here, or told by the server): every call is `Wiped`.
    wiped: Arc<AtomicBool>,
}

/// Clears a flag when dropped: a watch that ends in any way, a panic included, frees the
/// connection for the other network calls.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Marks the node wiped when a network call ends in `Wiped` (the server's order, carried out).
fn note_wipe<T>(wiped: &AtomicBool, result: Result<T, CareError>) -> Result<T, CareError> {
    if let Err(CareError::Wiped(_)) = &result {
        wiped.store(true, Ordering::SeqCst);
    }
    result
}

fn wiped_error() -> CareError {
    CareError::from(care_node::store::StoreError::Wiped)
}

type NetworkStore = tokio::sync::OwnedMutexGuard<DeviceStore>;

impl CareNode {
    fn new(store: DeviceStore) -> Result<Arc<Self>, CareError> {
        let local = store.another_connection()?;
        Ok(Arc::new(Self {
            network: Arc::new(tokio::sync::Mutex::new(store)),
            local: Mutex::new(local),
            watching: Arc::new(AtomicBool::new(false)),
            wiped: Arc::new(AtomicBool::new(false)),
        }))
    }

    fn with_store<T>(
        &self,
        f: impl FnOnce(&mut DeviceStore) -> Result<T, CareError>,
    ) -> Result<T, CareError> {
        if self.wiped.load(Ordering::SeqCst) {
            return Err(wiped_error());
        }
        // A panic inside a call leaves the store as its last transaction left it: usable.
        let result = guarded(|| f(&mut self.local.lock().unwrap_or_else(PoisonError::into_inner)));
        note_wipe(&self.wiped, result)
    }

    /// The network connection: after a running sync, refused while a watch holds it. (A sync
    /// that asks in the instant a watch starts waits for that watch to end.)
    async fn network(&self) -> Result<NetworkStore, CareError> {
        if self.wiped.load(Ordering::SeqCst) {
            return Err(wiped_error());
        }
        if self.watching.load(Ordering::SeqCst) {
            return Err(CareError::busy());
        }
        let store = self.network.clone().lock_owned().await;
        // A wipe may have run while this call waited for the connection.
        if self.wiped.load(Ordering::SeqCst) {
            return Err(wiped_error());
        }
        Ok(store)
    }

    async fn access(
        &self,
        nhs_number: String,
        kind: AccessKind,
        reason: String,
    ) -> Result<AccessOutcome, CareError> {
        let mut store = self.network().await?;
        let result = run(async move {
            let nhs = NhsNumber::parse(&nhs_number)?;
            let request = AccessRequest { nhs_number: nhs.as_str().into(), kind, reason };
            let (decision, _) = client::request_access(&mut store, request).await?;
            Ok(AccessOutcome {
                granted: decision.granted,
                message: decision.message,
                until_ms: decision.until_ms,
            })
        })
        .await;
        note_wipe(&self.wiped, result)
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
        guarded(|| Self::new(DeviceStore::open(path.as_ref(), &PlatformKeystore(keys))?))
    }

    /// Opens (or creates) the store at `path`, its data key wrapped under a passphrase (tests).
    #[uniffi::constructor]
    pub fn open_with_passphrase(path: String, passphrase: String) -> Result<Arc<Self>, CareError> {
        guarded(|| Self::new(DeviceStore::open(path.as_ref(), &PassphraseWrapper::new(passphrase))?))
    }

    /// Enrols this device with the operator's one-time token.
    pub async fn enrol(&self, token: String) -> Result<Enrolled, CareError> {
        let mut store = self.network().await?;
        let result = run(async move {
            let e = client::enrol(&mut store, &token).await?;
            Ok(Enrolled { device_name: e.device_name, role: e.role, server_address: e.server_addr })
        })
        .await;
        note_wipe(&self.wiped, result)
    }

    /// Syncs with the server, reporting progress and new data to `listener` (see
    /// [`SyncListener`] for the thread they arrive on). Waits for a sync already running;
    /// `Busy` while a watch runs (it syncs already).
    pub async fn sync(&self, listener: Option<Arc<dyn SyncListener>>) -> Result<SyncOutcome, CareError> {
        let mut store = self.network().await?;
        let result = run(async move {
            let callbacks = Callbacks::new(listener);
            let queue = callbacks.sender();
            let mut progress = move |s: &SyncStats| {
                if let Some(q) = &queue {
                    let _ = q.send(Event::Progress { applied: s.round_applied, total: s.round_items });
                }
            };
            let report = client::sync_with_progress(&mut store, &mut progress).await;
            drop(progress); // its queue handle: `finish` waits for every handle to go
            if let Ok(report) = &report
                && let (changed @ 1.., notifications) = new_data(&SyncStats::default(), &report.stats)
                && let Some(q) = callbacks.sender()
            {
                let _ = q.send(Event::NewData { changed, notifications });
            }
            callbacks.finish().await;
            Ok(SyncOutcome::from(report?))
        })
        .await;
        note_wipe(&self.wiped, result)
    }

    /// Syncs, then stays connected (a live session): every round the server pushes — within
    /// about a second of a change anywhere in this device's scope — is applied, and `listener`
    /// hears `onNewData` for each. Returns at once with the session's handle: `stop()` ends it,
    /// `wait()` says how it ended (`Offline` when the connection was lost: watch again when
    /// connected). While it runs, reads and entries work as always; `sync`, `enrol`, `breakGlass`
    /// and `permissionToView` are `Busy` (stop the watch first). Entries recorded during a watch
    /// are uploaded by the next sync or watch.
    pub async fn watch(&self, listener: Arc<dyn SyncListener>) -> Result<Arc<Watch>, CareError> {
        let mut store = self.network().await?;
        if self.watching.swap(true, Ordering::SeqCst) {
            return Err(CareError::busy());
        }
        let watching = ClearOnDrop(self.watching.clone());
        let wiped = self.wiped.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let session = runtime().spawn(async move {
            let _watching = watching;
            let callbacks = Callbacks::new(Some(listener));
            let queue = callbacks.sender();
            let mut seen = SyncStats::default();
            let mut on_round = move |stats: &SyncStats| {
                if let (changed @ 1.., notifications) = new_data(&seen, stats)
                    && let Some(q) = &queue
                {
                    let _ = q.send(Event::NewData { changed, notifications });
                }
                seen = stats.clone();
            };
            let stop = async {
                let _ = stopped.await;
            };
            let report = client::watch(&mut store, &mut on_round, stop).await;
            drop(on_round);
            callbacks.finish().await;
            drop(store);
            Ok(SyncOutcome::from(note_wipe(&wiped, report.map_err(CareError::from))?))
        });
        Ok(Arc::new(Watch { stop: Mutex::new(Some(stop)), session: Mutex::new(Some(session)) }))
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
        self.with_store(|s| Ok(s.status()?))
    }

    /// Destroys every patient record and the data key on this device (crypto-shredding).
    /// `Busy` while a sync or watch runs (stop it, or wait for it, first). After it, every call
    /// is `Wiped`.
    pub fn wipe(&self) -> Result<(), CareError> {
        // Holding the network connection too, so no sync writes a page after the shredding; never
        // waiting for it, so a wipe from a callback of the running sync cannot deadlock.
        let Ok(_network) = self.network.try_lock() else {
            return Err(CareError::Busy(
                "a sync or watch is using the store; wipe when it has finished (stop a watch first)".into(),
            ));
        };
        self.with_store(|s| {
            s.wipe_patient_data()?;
            Ok(s.shred()?)
        })?;
        self.wiped.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// A live session started by [`CareNode::watch`].
#[derive(uniffi::Object)]
pub struct Watch {
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    session: Mutex<Option<tokio::task::JoinHandle<Result<SyncOutcome, CareError>>>>,
}

#[uniffi::export]
impl Watch {
    /// Ends the live session: the connection closes after the page being applied, if any (a
    /// round cut short resumes at the next sync). `wait` then returns. Stopping twice is
    /// harmless; dropping the `Watch` (the last reference to it) stops it too.
    pub fn stop(&self) {
        if let Some(stop) = self.stop.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = stop.send(());
        }
    }

    /// Waits until the session has ended — stopped, the connection lost (`Offline`), refused, or
    /// told to wipe — and every callback has arrived; then says what it moved. Once only.
    pub async fn wait(&self) -> Result<SyncOutcome, CareError> {
        let session = self.session.lock().unwrap_or_else(PoisonError::into_inner).take();
        match session {
            Some(session) => session.await.unwrap_or_else(|_| Err(CareError::internal())),
            None => Err(CareError::InvalidInput("this watch was already waited for".into())),
        }
    }
}
