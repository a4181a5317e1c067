//! `care-sync-server demo`: the whole path, end to end, on this machine.
//!
//! A server on 127.0.0.1 with a synthetic population; an ambulance tablet and a community
//! nurse's device enrolled with one-time tokens, each with its own encrypted store; caseloads;
//! a cold sync over real QUIC; both devices offline record an allergy for the same patient; they
//! reconnect; both entries are on both devices. It prints what the crew sees and the figures.
//!
//! Beside it, what demonstrations and benchmarks share: [`population`], the deterministic
//! synthetic population, [`bench`], the harness of `care-sync-bench`, and [`link`], a UDP relay
//! that makes loopback behave like a 3G, EDGE or flaky Wi-Fi link.

pub mod bench;
pub mod link;
pub mod population;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use care_node::client::{self, ClientError, SyncReport};
use care_node::crypto::PassphraseWrapper;
use care_node::nhs::NhsNumber;
use care_node::store::{DeviceStore, StoreError as DeviceStoreError};
use care_node::summary::{Alert, Allergy};

use crate::demo::population::Population;
use crate::operator::ops::{self, OpsError};
use crate::store::sqlite::SqliteStore;
use crate::store::{Role, ServerStore};
use crate::transport;

/// The passphrase of the demo's device stores (a real device asks its user or its keystore).
pub const DEMO_PASSPHRASE: &str = "demo passphrase, not for real use";
/// The seed of the demo's synthetic population.
pub const DEMO_SEED: u64 = 2026;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    #[error(transparent)]
    Server(#[from] transport::ServerError),
    #[error(transparent)]
    ServerStore(#[from] crate::store::StoreError),
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error(transparent)]
    Device(#[from] DeviceStoreError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("could not create the demo directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("synthetic patient could not be made: {0}")]
    Summary(#[from] care_node::summary::SummaryError),
    #[error("the demo's check failed: {0}")]
    Check(String),
}

pub struct DemoOptions {
    pub patients: usize,
    /// Where to keep the stores; a temporary directory (deleted afterwards) when `None`.
    pub data_dir: Option<PathBuf>,
}

/// What the demo measured, for the caller (and the tests) to check.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub patients: usize,
    pub ambulance_documents: u64,
    pub nurse_documents: u64,
    pub cold_sync: Vec<SyncReport>,
    pub reconnect: Vec<SyncReport>,
    /// Allergies of the shared patient on each device after reconnecting.
    pub shared_allergies_ambulance: Vec<String>,
    pub shared_allergies_nurse: Vec<String>,
}

struct Device {
    name: &'static str,
    store: DeviceStore,
}

fn open_device(root: &Path, name: &str) -> Result<DeviceStore, DemoError> {
    let dir = root.join("devices").join(name);
    std::fs::create_dir_all(&dir)?;
    Ok(DeviceStore::open(&dir.join("store.db"), &PassphraseWrapper::new(DEMO_PASSPHRASE))?)
}

fn figures(report: &SyncReport) -> String {
    format!(
        "{:>5} documents, {:>4} changes in, {:>3} changes out, {:>9} bytes of frames, {:>9} bytes of UDP, {:>7.1} ms",
        report.stats.documents_received,
        report.stats.changes_received,
        report.stats.uploaded_changes,
        report.frame_bytes(),
        report.udp_bytes(),
        report.duration.as_secs_f64() * 1000.0
    )
}

/// Runs the demo, printing as it goes.
pub async fn run(options: DemoOptions, out: &mut dyn Write) -> Result<DemoReport, DemoError> {
    let temp;
    let root = match &options.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&root)?;
    let started = Instant::now();
    let store: Arc<dyn ServerStore> = Arc::new(SqliteStore::open(&root.join("server"))?);
    let _ = writeln!(out, "care-sync demo in {}", root.display());

    // 1. The regional server and its population.
    let identity = store.server_identity()?;
    let existing = store.patient_count()? as usize;
    if existing < options.patients {
        let t = Instant::now();
        let mut population = Population::new(DEMO_SEED, crate::server_actor(&identity));
        let now = care_node::now_ms();
        // Skip the people already made by an earlier run in this directory.
        for _ in 0..existing {
            population.next_patient(now)?;
        }
        let mut made = existing;
        while made < options.patients {
            let batch = (options.patients - made).min(500);
            let mut summaries =
                (0..batch).map(|_| population.next_patient(now)).collect::<Result<Vec<_>, _>>()?;
            store.insert_patients(&mut summaries)?;
            made += batch;
        }
        let _ = writeln!(
            out,
            "server: created {} synthetic patients in {:.2} s",
            made - existing,
            t.elapsed().as_secs_f64()
        );
    }
    let running = transport::start(store.clone(), "127.0.0.1:0".parse().expect("valid address")).await?;
    let addr: SocketAddr = running.addr;
    let _ = writeln!(out, "server: listening on {addr} (QUIC, ALPN care-sync/1)");

    // 2. Two devices, enrolled with one-time tokens.
    let mut devices = Vec::new();
    for (name, role) in [("ambulance-1", Role::AmbulanceCrew), ("nurse-1", Role::CommunityNurse)] {
        let mut device = open_device(&root, name)?;
        if device.enrolment()?.is_none() {
            let token = ops::issue_token(store.as_ref(), name, role, addr, ops::DEFAULT_TOKEN_TTL)?;
            client::enrol(&mut device, &token).await?;
            let _ = writeln!(out, "{name}: enrolled as {} with a one-time token", role.as_str());
        } else {
            // A re-run in the same directory: the server has a new port; the device keeps its
            // enrolment (and its pinned key) and learns the new address.
            device.update_server_addr(&addr.to_string())?;
        }
        devices.push(Device { name, store: device });
    }

    // 3. Caseloads: the crew covers the first half of the population, the nurse every third
    //    person; the shared patient (the first with an alert) is on both.
    let mut population = Population::new(DEMO_SEED, crate::server_actor(&identity));
    let now = care_node::now_ms();
    let mut shared: Option<NhsNumber> = None;
    for i in 0..options.patients {
        let mut patient = population.next_patient(now)?;
        let nhs = patient.nhs_number()?;
        let on_ambulance = i < options.patients.div_ceil(2);
        let on_nurse = i % 3 == 0;
        if on_ambulance {
            ops::caseload_add(store.as_ref(), "ambulance-1", nhs.as_str())?;
        }
        if on_nurse {
            ops::caseload_add(store.as_ref(), "nurse-1", nhs.as_str())?;
        }
        if shared.is_none() && on_ambulance && on_nurse && !patient.entries::<Alert>()?.is_empty() {
            shared = Some(nhs);
        }
    }
    let shared = match shared {
        Some(nhs) => nhs,
        None => NhsNumber::from_stem(999_000_001).expect("the first test stem is valid"),
    };

    // 4. Cold sync over QUIC.
    let mut cold = Vec::new();
    for device in &mut devices {
        let report = client::sync(&mut device.store).await?;
        let _ = writeln!(out, "{}: first sync  {}", device.name, figures(&report));
        cold.push(report);
    }

    // 5. Offline: the server goes away, and both devices record an allergy for the same patient.
    running.shutdown().await;
    let _ = writeln!(out, "\nserver: stopped — both devices are offline now");
    let offline =
        [("ambulance-1", "Chlorhexidine", "anaphylaxis"), ("nurse-1", "Adhesive dressings", "blistering")];
    for (device, (_, substance, reaction)) in devices.iter_mut().zip(offline) {
        let mut allergy = Allergy::new(substance, device.store.provenance()?);
        allergy.reaction = Some(reaction.into());
        allergy.severity = Some("severe".into());
        device.store.add_entry(&shared, &allergy)?;
        let _ = writeln!(
            out,
            "{}: recorded an allergy offline ({} change waiting)",
            device.name,
            device.store.pending_count()?
        );
    }

    // 6. Back online (same address): both upload, and each receives the other's entry.
    let running = transport::start(store.clone(), addr).await?;
    let _ = writeln!(out, "server: back on {addr}\n");
    let mut reconnect = Vec::new();
    for i in [0, 1, 0] {
        let device = &mut devices[i];
        let report = client::sync(&mut device.store).await?;
        let _ = writeln!(out, "{}: reconnect  {}", device.name, figures(&report));
        reconnect.push(report);
    }
    running.shutdown().await;

    let allergies = |store: &DeviceStore| -> Result<Vec<String>, DemoError> {
        let mut patient = store
            .find_by_nhs(&shared)?
            .ok_or_else(|| DemoError::Check("the shared patient is missing".into()))?;
        Ok(patient.summary.clinical_entries::<Allergy>()?.into_iter().map(|e| e.data.substance).collect())
    };
    let on_ambulance = allergies(&devices[0].store)?;
    let on_nurse = allergies(&devices[1].store)?;
    let crew = &mut devices[0].store;
    // A clinician's view: lease checked, and written to the device's signed view log.
    let mut patient = crew.view_patient(&shared, "show")?;
    let _ = writeln!(out, "\nWhat the crew of ambulance-1 sees:\n");
    let _ = writeln!(
        out,
        "{}",
        care_node::view::render(&mut patient, &crew.sync_state()?, &crew.diverged()?, care_node::now_ms())?
    );
    let both = ["Chlorhexidine", "Adhesive dressings"];
    let converged = on_ambulance == on_nurse && both.iter().all(|a| on_ambulance.iter().any(|x| x == a));
    let _ = writeln!(
        out,
        "Both offline entries on both devices: {}",
        if converged { "yes — nothing lost, the replicas converged" } else { "NO" }
    );
    let report = DemoReport {
        patients: options.patients,
        ambulance_documents: devices[0].store.document_count()?,
        nurse_documents: devices[1].store.document_count()?,
        cold_sync: cold,
        reconnect,
        shared_allergies_ambulance: on_ambulance,
        shared_allergies_nurse: on_nurse,
    };
    let _ = writeln!(
        out,
        "Figures: {} patients on the server; ambulance-1 holds {}, nurse-1 holds {}; {} bytes of UDP in all; {:.2} s in all.",
        report.patients,
        report.ambulance_documents,
        report.nurse_documents,
        report.cold_sync.iter().chain(&report.reconnect).map(SyncReport::udp_bytes).sum::<u64>(),
        started.elapsed().as_secs_f64()
    );
    if !converged {
        return Err(DemoError::Check("the devices did not converge".into()));
    }
    Ok(report)
}
