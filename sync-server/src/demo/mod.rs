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
pub mod feeds;
pub mod link;
pub mod population;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use care_node::client::{self, ClientError, SyncReport};
use care_node::crypto::PassphraseWrapper;
use care_node::identity::Identity;
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
    populate(store.as_ref(), &identity, options.patients, out)?;
    let running = transport::start(store.clone(), "127.0.0.1:0".parse().expect("valid address")).await?;
    let addr: SocketAddr = running.addr;
    let _ = writeln!(out, "server: listening on {addr} (QUIC, ALPN care-sync/1)");

    // 2. Two devices, enrolled with one-time tokens.
    let mut devices = enrol_devices(store.as_ref(), &root, addr, out).await?;

    // 3. Caseloads: the crew covers the first half of the population, the nurse every third
    //    person; the shared patient (the first with an alert) is on both.
    let shared = assign_caseloads(store.as_ref(), &identity, options.patients)?;

    // 4. Cold sync over QUIC.
    let cold = sync_in_turn(&mut devices, &[0, 1], "first sync", out).await?;

    // 5. Offline: the server goes away, and both devices record an allergy for the same patient.
    running.shutdown().await;
    let _ = writeln!(out, "\nserver: stopped — both devices are offline now");
    record_offline(&mut devices, &shared, out)?;

    // 6. Back online (same address): both upload, and each receives the other's entry.
    let running = transport::start(store.clone(), addr).await?;
    let _ = writeln!(out, "server: back on {addr}\n");
    let reconnect = sync_in_turn(&mut devices, &[0, 1, 0], "reconnect", out).await?;
    running.shutdown().await;

    // 7. What the crew sees, and whether both offline entries are on both devices.
    let (report, converged) = conclude(&mut devices, &shared, options.patients, cold, reconnect, out)?;
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

/// Fills the server up to `patients` synthetic people, in batches.
fn populate(
    store: &dyn ServerStore,
    identity: &Identity,
    patients: usize,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    let existing = store.patient_count()? as usize;
    if existing < patients {
        let t = Instant::now();
        let mut population = Population::new(DEMO_SEED, crate::server_actor(identity));
        let now = care_node::now_ms();
        // Skip the people already made by an earlier run in this directory.
        for _ in 0..existing {
            population.next_patient(now)?;
        }
        let mut made = existing;
        while made < patients {
            let batch = (patients - made).min(500);
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
    Ok(())
}

/// Opens both devices' stores and enrols those not enrolled yet.
async fn enrol_devices(
    store: &dyn ServerStore,
    root: &Path,
    addr: SocketAddr,
    out: &mut dyn Write,
) -> Result<Vec<Device>, DemoError> {
    let mut devices = Vec::new();
    for (name, role) in [("ambulance-1", Role::AmbulanceCrew), ("nurse-1", Role::CommunityNurse)] {
        let mut device = open_device(root, name)?;
        if device.enrolment()?.is_none() {
            let token = ops::issue_token(store, name, role, addr, ops::DEFAULT_TOKEN_TTL)?;
            client::enrol(&mut device, &token).await?;
            let _ = writeln!(out, "{name}: enrolled as {} with a one-time token", role.as_str());
        } else {
            // A re-run in the same directory: the server has a new port; the device keeps its
            // enrolment (and its pinned key) and learns the new address.
            device.update_server_addr(&addr.to_string())?;
        }
        devices.push(Device { name, store: device });
    }
    Ok(devices)
}

/// Puts the population on the devices' caseloads (the same people `populate` made, from the
/// same seed) and returns the patient both devices share.
fn assign_caseloads(
    store: &dyn ServerStore,
    identity: &Identity,
    patients: usize,
) -> Result<NhsNumber, DemoError> {
    let mut population = Population::new(DEMO_SEED, crate::server_actor(identity));
    let now = care_node::now_ms();
    let mut shared: Option<NhsNumber> = None;
    for i in 0..patients {
        let mut patient = population.next_patient(now)?;
        let nhs = patient.nhs_number()?;
        let on_ambulance = i < patients.div_ceil(2);
        let on_nurse = i % 3 == 0;
        if on_ambulance {
            ops::caseload_add(store, "ambulance-1", nhs.as_str())?;
        }
        if on_nurse {
            ops::caseload_add(store, "nurse-1", nhs.as_str())?;
        }
        if shared.is_none() && on_ambulance && on_nurse && !patient.entries::<Alert>()?.is_empty() {
            shared = Some(nhs);
        }
    }
    let shared = match shared {
        Some(nhs) => nhs,
        None => NhsNumber::from_stem(999_000_001).expect("the first test stem is valid"),
    };
    Ok(shared)
}

/// Syncs the devices in this order (indices into `devices`), printing each one's figures.
async fn sync_in_turn(
    devices: &mut [Device],
    order: &[usize],
    label: &str,
    out: &mut dyn Write,
) -> Result<Vec<SyncReport>, DemoError> {
    let mut reports = Vec::new();
    for &i in order {
        let device = &mut devices[i];
        let report = client::sync(&mut device.store).await?;
        let _ = writeln!(out, "{}: {label}  {}", device.name, figures(&report));
        reports.push(report);
    }
    Ok(reports)
}

/// Each device records a different allergy for the shared patient while the server is away.
fn record_offline(devices: &mut [Device], shared: &NhsNumber, out: &mut dyn Write) -> Result<(), DemoError> {
    let offline =
        [("ambulance-1", "Chlorhexidine", "anaphylaxis"), ("nurse-1", "Adhesive dressings", "blistering")];
    for (device, (_, substance, reaction)) in devices.iter_mut().zip(offline) {
        let mut allergy = Allergy::new(substance, device.store.provenance()?);
        allergy.reaction = Some(reaction.into());
        allergy.severity = Some("severe".into());
        device.store.add_entry(shared, &allergy)?;
        let _ = writeln!(
            out,
            "{}: recorded an allergy offline ({} change waiting)",
            device.name,
            device.store.pending_count()?
        );
    }
    Ok(())
}

/// Prints what the crew sees and whether both offline entries are on both devices; returns the
/// report and whether they are.
fn conclude(
    devices: &mut [Device],
    shared: &NhsNumber,
    patients: usize,
    cold: Vec<SyncReport>,
    reconnect: Vec<SyncReport>,
    out: &mut dyn Write,
) -> Result<(DemoReport, bool), DemoError> {
    let on_ambulance = shared_allergies(&devices[0].store, shared)?;
    let on_nurse = shared_allergies(&devices[1].store, shared)?;
    let crew = &mut devices[0].store;
    // A clinician's view: lease checked, and written to the device's signed view log.
    let mut patient = crew.view_patient(shared, "show")?;
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
        patients,
        ambulance_documents: devices[0].store.document_count()?,
        nurse_documents: devices[1].store.document_count()?,
        cold_sync: cold,
        reconnect,
        shared_allergies_ambulance: on_ambulance,
        shared_allergies_nurse: on_nurse,
    };
    Ok((report, converged))
}

/// The substances of the shared patient's allergies on one device.
fn shared_allergies(store: &DeviceStore, shared: &NhsNumber) -> Result<Vec<String>, DemoError> {
    let mut patient =
        store.find_by_nhs(shared)?.ok_or_else(|| DemoError::Check("the shared patient is missing".into()))?;
    Ok(patient.summary.clinical_entries::<Allergy>()?.into_iter().map(|e| e.data.substance).collect())
}
