//! `care-sync-server`: the operator's command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "demo")]
use care_sync_server::demo::{self, DemoOptions};
use care_sync_server::operator::config::{self, Config, LogFormat};
use care_sync_server::operator::ops;
use care_sync_server::store::sqlite::SqliteStore;
use care_sync_server::store::{Role, ServerStore};
use clap::{Parser, Subcommand};

mod governance;
mod serve;

#[derive(Parser)]
#[command(name = "care-sync-server", version, about = "care-sync regional server and operator tools")]
struct Cli {
    /// The configuration file (TOML; `care-sync-server config` prints every setting and its
    /// default). Flags given on the command line win over it.
    #[arg(
        long,
        global = true,
        env = "CARE_SYNC_CONFIG",
        value_name = "FILE",
        help_heading = "Global options"
    )]
    config: Option<PathBuf>,
    /// Where the server keeps its store [default: `data_dir` of the configuration, else
    /// ./care-sync-data; for `demo`, a temporary directory removed afterwards].
    #[arg(
        long,
        global = true,
        env = "CARE_SYNC_DATA_DIR",
        value_name = "DIR",
        help_heading = "Global options"
    )]
    data_dir: Option<PathBuf>,
    /// Log format: `text` (default) or `json` (one object per line, for log shippers).
    #[arg(long, global = true, value_parser = parse_log_format, value_name = "FORMAT", help_heading = "Global options")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the QUIC sync server, the MLLP listener and the admin API/dashboard until interrupted.
    Serve {
        /// QUIC address [default: `sync.listen`, 127.0.0.1:7400].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Where hospital systems send HL7 v2 ADT over MLLP [default: `feeds.mllp_listen`,
        /// 127.0.0.1:2575].
        #[arg(long)]
        mllp_listen: Option<SocketAddr>,
        /// Admin API, dashboard and /metrics [default: `admin.listen`, 127.0.0.1:7480].
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Rotates the server's TLS key without re-enrolling devices: stage, let devices sync, activate.
    ServerKey {
        #[command(subcommand)]
        action: ServerKeyAction,
    },
    /// Prints the effective configuration (the file's settings over the defaults) as TOML.
    Config,
    /// Prints the operator token of the admin API (created by the first `serve`).
    AdminToken,
    /// Copies the store to FILE while the server runs (consistent, integrity-checked).
    Backup {
        /// Write to this file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Puts a backup in place as the store of the data directory (stop the server first).
    Restore {
        /// The backup file to restore.
        #[arg(long)]
        from: PathBuf,
        /// Replace an existing store (it is kept beside the new one as server.db.replaced-*).
        #[arg(long)]
        force: bool,
    },
    /// Processes HL7 v2 ADT messages from files (plain, one `MSH` per message, or MLLP-framed).
    IngestAdt {
        /// The files to read.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Prints a one-time enrolment token for a new device.
    EnrolDevice {
        /// The device's name: unique among devices in use (e.g. the vehicle, ambulance-7).
        #[arg(long)]
        name: String,
        /// The device's role.
        #[arg(long, value_parser = role_parser())]
        role: Role,
        /// The address devices reach the server on (default: where `serve` last listened).
        #[arg(long)]
        server_addr: Option<SocketAddr>,
        /// How long the token stays valid.
        #[arg(long, default_value_t = 24)]
        expires_in_hours: u64,
    },
    /// Lists devices with their state and last sync.
    Devices,
    /// Compacts the change log: drops the entries every device that synced within the hold has
    /// received (documents are stored whole, so nothing of a patient is lost). Devices silent
    /// for longer receive what changed whole at their next sync. `serve` also does this on a
    /// schedule (`[compaction]`). Safe while the server runs.
    CompactLog {
        /// Days a device that stopped syncing holds the log back [default: `compaction.hold_days`, 30].
        #[arg(long, value_name = "DAYS")]
        hold_days: Option<f64>,
        /// Report what would be dropped, and which devices would fall below, without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Revokes a device: its next handshake fails.
    RevokeDevice {
        /// The device, by its enrolled name.
        name: String,
    },
    /// Tells a device to destroy its data key and patient data at its next contact.
    WipeDevice {
        /// The device, by its enrolled name.
        name: String,
    },
    /// Incidents: grant a device a patient for an incident, with a grace period.
    Incident {
        #[command(subcommand)]
        action: governance::IncidentAction,
    },
    /// Area prefetch: postcode districts whose high-risk patients a device holds offline.
    Area {
        #[command(subcommand)]
        action: governance::AreaAction,
    },
    /// A patient's objection to sharing and national data opt-out.
    Consent {
        #[command(subcommand)]
        action: governance::ConsentAction,
    },
    /// Sets a device's document budget (`--documents 0` clears it back to the default).
    Budget {
        /// The device, by its enrolled name (e.g. ambulance-7).
        #[arg(long)]
        device: String,
        /// The most documents the device holds (0 clears the device's own budget).
        #[arg(long)]
        documents: u64,
    },
    /// Changes a server setting; it stands until the configuration file's [policy] value for it
    /// changes (see `settings`).
    Set {
        /// One of: budget, prefetch-flags, permission-hours, break-glass-hours,
        /// lease-hours.ambulance-crew, lease-hours.community-nurse.
        name: String,
        /// A whole number for budget, hours for the others, a comma-separated list for
        /// prefetch-flags.
        #[arg(allow_hyphen_values = true)]
        value: String,
    },
    /// Lists every setting's value in force and where it came from (default, config-file,
    /// operator).
    Settings,
    /// Break-glass and view-log alerts.
    Alerts {
        #[command(subcommand)]
        action: Option<governance::AlertAction>,
    },
    /// Uploaded changes the write policy refused, kept for review: when, which device, which
    /// patient (opaque id), the rule and where the changes wrote. Never their content. Lists the
    /// items not yet reviewed; `quarantine review ID --note …` records a review.
    #[command(args_conflicts_with_subcommands = true)]
    Quarantine {
        /// Only this device's.
        #[arg(long, value_name = "NAME")]
        device: Option<String>,
        /// Reviewed items too.
        #[arg(long)]
        all: bool,
        #[command(subcommand)]
        action: Option<governance::QuarantineAction>,
    },
    /// Who saw this patient, when, and why (and every other audited action).
    Audit {
        /// The patient's NHS number (10 digits; spaces allowed).
        #[arg(long)]
        nhs: Option<String>,
        /// Only actions by this device or operator.
        #[arg(long)]
        device: Option<String>,
        /// Only since this date (2026-11-25) or RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
    /// Anonymised CSV of patient counts by condition, age band and postcode district (or those of
    /// them `--by` names), small numbers suppressed; reports how many cells were suppressed.
    ExportPlanning {
        /// Write the CSV here (default: standard output).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// What to count by: a comma-separated list of condition, age-band, district. Fewer
        /// dimensions give larger counts, so fewer are suppressed in a small population.
        #[arg(long, value_name = "LIST", default_value = "condition,age-band,district")]
        by: String,
    },
    /// Manages community nurses' caseloads.
    Caseload {
        #[command(subcommand)]
        action: CaseloadAction,
    },
    /// Adds synthetic patients (test-range NHS numbers) to the store, or writes them as FHIR
    /// Bundles with `--fhir-out DIR`.
    #[cfg(feature = "demo")]
    Generate {
        /// How many patients.
        #[arg(long, default_value_t = 1000)]
        patients: usize,
        /// The random seed (the same seed gives the same people).
        #[arg(long, default_value_t = demo::DEMO_SEED)]
        seed: u64,
        /// Write one FHIR IPS Bundle per patient into this directory instead of the store.
        #[arg(long)]
        fhir_out: Option<PathBuf>,
    },
    /// Imports FHIR R4 Bundles (one patient each); each Bundle is applied whole or not at all.
    ImportFhir {
        /// The files to read.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The name recorded as the source of entries without care-sync provenance.
        #[arg(long, default_value = "FHIR import")]
        feed: String,
    },
    /// Writes a patient's summary as a FHIR IPS document Bundle.
    ExportFhir {
        /// The patient's NHS number (10 digits; spaces allowed).
        #[arg(long)]
        nhs: String,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Merges two records of one person: `--keep` absorbs `--merge` (NHS numbers or patient ids).
    /// Never automatic; audited.
    MergePatients {
        /// The record that stays: an NHS number or a care-sync patient id.
        #[arg(long)]
        keep: String,
        /// The record merged into it: an NHS number or a care-sync patient id.
        #[arg(long)]
        merge: String,
        /// Who decided the merge (recorded in the audit).
        #[arg(long, env = "USER", default_value = "operator")]
        operator: String,
    },
    /// Lists patients (id, NHS number or `provisional`) for operator tasks such as merging.
    Patients {
        /// Only records without an NHS number.
        #[arg(long)]
        provisional: bool,
    },
    /// Runs the end-to-end demonstration on a fresh server and two devices.
    #[cfg(feature = "demo")]
    Demo {
        /// How many patients.
        #[arg(long, default_value_t = 2000)]
        patients: usize,
    },
}

#[derive(Subcommand)]
enum ServerKeyAction {
    /// Shows the current and staged keys and the devices that have not learnt the staged one.
    Status,
    /// Creates the next key; every sync from now on tells devices to pin it too.
    Stage,
    /// Makes the staged key the server's key; restart `serve` to present it.
    Activate {
        /// Activate although some devices have not learnt the key (they must re-enrol).
        #[arg(long)]
        force: bool,
    },
    /// Drops the staged key.
    Cancel,
}

#[derive(Subcommand)]
enum CaseloadAction {
    /// Puts a patient on a device's caseload: it receives the record at its next sync.
    Add {
        /// The device, by its enrolled name (e.g. ambulance-7).
        #[arg(long)]
        device: String,
        /// The patient's NHS number (10 digits; spaces allowed).
        #[arg(long)]
        nhs: String,
    },
    /// Puts many patients on caseloads from a CSV file of `device,nhs` lines, all or nothing,
    /// with every bad line named.
    Import {
        /// The CSV file (a `device,nhs` header, blank lines and `#` comments are skipped).
        file: PathBuf,
    },
    /// Takes a patient off a device's caseload: it purges the record at its next sync.
    Remove {
        /// The device, by its enrolled name (e.g. ambulance-7).
        #[arg(long)]
        device: String,
        /// The patient's NHS number (10 digits; spaces allowed).
        #[arg(long)]
        nhs: String,
    },
}

/// `--role`, with its values listed in the help and in the error for a wrong one.
fn role_parser() -> impl clap::builder::TypedValueParser<Value = Role> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["ambulance-crew", "community-nurse"])
        .map(|s| s.parse::<Role>().expect("one of the listed roles"))
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("`text` or `json`".into()),
    }
}

fn open(dir: &std::path::Path) -> Result<Arc<dyn ServerStore>, Box<dyn std::error::Error>> {
    Ok(Arc::new(SqliteStore::open(dir)?))
}

/// `care-sync-server patients | head` ends quietly when `head` has had enough, as Unix tools
/// do, instead of panicking on the broken pipe (Rust ignores SIGPIPE by default).
fn restore_sigpipe() {
    // SAFETY: setting a signal's disposition to the default, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Errors of the operator commands, shown to the operator as one line.
pub(crate) type CliResult = Result<(), Box<dyn std::error::Error>>;

async fn run(cli: Cli, mut config: Config) -> CliResult {
    #[cfg(feature = "demo")]
    if let Command::Demo { patients } = cli.command {
        let mut stdout = std::io::stdout();
        let options = DemoOptions { patients, data_dir: cli.data_dir };
        demo::run(options, &mut stdout).await?;
        return Ok(());
    }
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    let dir = config.data_dir.clone();
    match cli.command {
        Command::Serve { listen, mllp_listen, admin_listen } => {
            config.sync.listen = listen.unwrap_or(config.sync.listen);
            config.feeds.mllp_listen = mllp_listen.unwrap_or(config.feeds.mllp_listen);
            config.admin.listen = admin_listen.unwrap_or(config.admin.listen);
            serve::serve(config).await?;
        }
        Command::ServerKey { action } => {
            let store = open(&dir)?;
            let hex = |f: [u8; 32]| care_node::identity::hex(&f);
            match action {
                ServerKeyAction::Status => {
                    println!("current key fingerprint: {}", hex(store.server_identity()?.fingerprint()));
                    match store.next_server_identity()? {
                        None => println!("no next key staged"),
                        Some(next) => {
                            println!("staged key fingerprint:  {}", hex(next.fingerprint()));
                            let behind = store.devices_without_staged_key()?;
                            if behind.is_empty() {
                                println!("every enrolled device has learnt it: ready to activate");
                            } else {
                                println!(
                                    "{} device(s) have not learnt it yet: {}",
                                    behind.len(),
                                    behind.join(", ")
                                );
                            }
                        }
                    }
                }
                ServerKeyAction::Stage => {
                    let fingerprint = ops::stage_server_key(store.as_ref())?;
                    println!("staged key fingerprint: {}", hex(fingerprint));
                    println!(
                        "devices learn it at their next sync; `server-key status` shows who has not yet"
                    );
                }
                ServerKeyAction::Activate { force } => {
                    let fingerprint = ops::activate_server_key(store.as_ref(), force)?;
                    println!("active key fingerprint: {}", hex(fingerprint));
                    println!("restart `serve` to present it; new enrolment tokens carry it");
                }
                ServerKeyAction::Cancel => {
                    let cancelled = ops::cancel_server_key(store.as_ref())?;
                    println!("{}", if cancelled { "staged key dropped" } else { "no key was staged" });
                }
            }
        }
        Command::Config => {
            // Policy keys the file leaves out are shown with the built-in defaults; a value
            // changed with `set` is kept in the store and shown by `set`'s audit line.
            config.policy = config.policy.or_defaults();
            print!("{}", config.to_toml());
        }
        Command::AdminToken => {
            let (token, created) =
                care_sync_server::operator::admin::load_or_create_token(&config.token_file())?;
            if created {
                eprintln!("created a new operator token in {}", config.token_file().display());
            }
            println!("{token}");
        }
        Command::Backup { out } => {
            let report = care_sync_server::store::sqlite::backup::backup(&dir, &out)?;
            println!(
                "backed up {} patients and {} devices to {} ({} bytes); integrity check ok",
                report.patients,
                report.devices,
                out.display(),
                report.bytes
            );
        }
        Command::Restore { from, force } => {
            let report = care_sync_server::store::sqlite::backup::restore(&from, &dir, force)?;
            println!(
                "restored {} patients and {} devices from {} into {}",
                report.patients,
                report.devices,
                from.display(),
                dir.display()
            );
        }
        Command::IngestAdt { files } => {
            let store = open(&dir)?;
            let options = config.feeds.adt_options();
            let (mut accepted, mut refused) = (0, 0);
            for file in &files {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                for message in care_sync_server::ingest::hl7::adt::split_messages(&text) {
                    let ack = care_sync_server::ingest::hl7::adt::process(
                        store.as_ref(),
                        &message,
                        care_node::now_ms(),
                        &options,
                    );
                    println!("{}: MSH-10 {}: {} {}", file.display(), ack.control_id, ack.code, ack.text);
                    if ack.code == "AA" { accepted += 1 } else { refused += 1 }
                }
            }
            println!("{accepted} message(s) accepted, {refused} refused");
            if refused > 0 {
                return Err(format!("{refused} message(s) refused").into());
            }
        }
        Command::EnrolDevice { name, role, server_addr, expires_in_hours } => {
            let store = open(&dir)?;
            let addr = server_addr.or(config.sync.advertised_addr).unwrap_or_else(|| {
                std::fs::read_to_string(serve::advertised_addr_file(&dir))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(config.sync.listen)
            });
            let ttl = Duration::from_secs(expires_in_hours * 3600);
            let token = ops::issue_token(store.as_ref(), &name, role, addr, ttl)?;
            eprintln!(
                "one-time token for {name} ({}), valid for {expires_in_hours} h, server {addr}:",
                role.as_str()
            );
            println!("{token}");
        }
        Command::CompactLog { hold_days, dry_run } => {
            let hold = match hold_days {
                Some(days) if (0.0..=config::MAX_HOLD_DAYS).contains(&days) => {
                    std::time::Duration::from_secs_f64(days * 86_400.0)
                }
                Some(_) => return Err("--hold-days must be a number of days from 0 to 3650".into()),
                None => config.compaction.hold(),
            };
            let store = open(&dir)?;
            let done = ops::compact_log(store.as_ref(), hold, dry_run)?;
            let verb = if dry_run { "would drop" } else { "dropped" };
            println!(
                "change log: {verb} {} entries ({} bytes); horizon {} of {}",
                done.dropped.entries, done.dropped.bytes, done.horizon, done.head
            );
            if done.below.is_empty() {
                println!("every device that has synced is above the horizon");
            } else {
                println!(
                    "devices below the horizon (their next sync brings changed documents whole): {}",
                    done.below.join(", ")
                );
            }
        }
        Command::Devices => {
            let store = open(&dir)?;
            let stale_after = (config.admin.stale_after_hours * 3_600_000.0) as i64;
            let devices = ops::device_overview(store.as_ref(), stale_after, care_node::now_ms())?;
            println!(
                "{:<20} {:<16} {:<24} {:<22} {:<14} {:>9}  STALE",
                "NAME", "ROLE", "STATE", "LAST SYNC", "LEASE", "DOCUMENTS"
            );
            for d in &devices {
                let last = d.last_sync_ms.map_or("never".to_string(), care_node::view::format_time);
                let documents = if d.left_out > 0 {
                    format!("{} (+{} over budget)", d.documents_held, d.left_out)
                } else {
                    d.documents_held.to_string()
                };
                println!(
                    "{:<20} {:<16} {:<24} {:<22} {:<14} {:>9}  {}",
                    d.name,
                    d.role.as_str(),
                    d.state,
                    last,
                    d.lease,
                    documents,
                    if d.stale { "stale" } else { "" }
                );
            }
            if devices.is_empty() {
                println!("no devices yet: `enrol-device --name NAME --role ROLE` issues a token");
            }
        }
        Command::RevokeDevice { name } => {
            let store = open(&dir)?;
            ops::revoke(store.as_ref(), &name)?;
            println!(
                "revoked {name}: its live sessions close within a second and its next connection is refused \
                 (unless a wipe is pending: then it is admitted only to be told to wipe)"
            );
        }
        Command::Caseload { action } => {
            let store = open(&dir)?;
            match action {
                CaseloadAction::Add { device, nhs } => {
                    let added = ops::caseload_add(store.as_ref(), &device, &nhs)?;
                    println!("{}", if added { "added to the caseload" } else { "already on the caseload" });
                }
                CaseloadAction::Import { file } => {
                    let text = std::fs::read_to_string(&file)
                        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                    let done = ops::caseload_import(store.as_ref(), &text)?;
                    println!(
                        "{} line(s): {} added to caseloads, {} already there",
                        done.lines, done.added, done.already
                    );
                }
                CaseloadAction::Remove { device, nhs } => {
                    let removed = ops::caseload_remove(store.as_ref(), &device, &nhs)?;
                    println!(
                        "{}",
                        if removed {
                            "removed; the device purges the record at its next sync"
                        } else {
                            "was not on the caseload"
                        }
                    );
                }
            }
        }
        #[cfg(feature = "demo")]
        Command::Generate { patients, seed, fhir_out } => {
            let store = open(&dir)?;
            let identity = store.server_identity()?;
            // Into a store that already has synthetic patients: new people, new NHS numbers.
            let exists = |n: &care_node::nhs::NhsNumber| store.patient_by_nhs(n).ok().flatten().is_some();
            let first = if fhir_out.is_some() {
                care_sync_server::demo::population::FIRST_STEM
            } else {
                care_sync_server::demo::population::first_free_stem(exists)
            };
            let mut population = care_sync_server::demo::population::Population::starting_at(
                seed,
                care_sync_server::server_actor(&identity),
                first,
            );
            let now = care_node::now_ms();
            if let Some(out) = &fhir_out {
                std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
            }
            let mut made = 0;
            while made < patients {
                let batch = (patients - made).min(500);
                let mut summaries = Vec::with_capacity(batch);
                while summaries.len() < batch {
                    let summary = population.next_patient(now)?;
                    // A number imported meanwhile from elsewhere is skipped, never duplicated.
                    if fhir_out.is_some() || summary.nhs_number().map_or(true, |n| !exists(&n)) {
                        summaries.push(summary);
                    }
                }
                match &fhir_out {
                    Some(out) => {
                        for summary in &mut summaries {
                            let bundle = care_sync_server::ingest::fhir::export::export_ips(summary, now)?;
                            let path = out.join(format!("patient-{:06}.json", made + 1));
                            let text = serde_json::to_string_pretty(&bundle)?;
                            std::fs::write(&path, text)
                                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                            made += 1;
                        }
                    }
                    None => {
                        store.insert_patients(&mut summaries)?;
                        made += batch;
                    }
                }
                eprint!("\rgenerated {made}/{patients}");
            }
            eprintln!();
        }
        Command::ImportFhir { files, feed } => {
            let store = open(&dir)?;
            let (mut ok, mut failed) = (0, 0);
            for file in &files {
                // Refused before reading: a file over the limit never reaches memory.
                let size = std::fs::metadata(file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?
                    .len();
                if size > care_sync_server::ingest::fhir::import::MAX_BUNDLE_BYTES as u64 {
                    eprintln!(
                        "{}: refused: the Bundle is too large: {size} bytes (the limit is {})",
                        file.display(),
                        care_sync_server::ingest::fhir::import::MAX_BUNDLE_BYTES
                    );
                    failed += 1;
                    continue;
                }
                let text = std::fs::read_to_string(file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                let result = care_sync_server::ingest::fhir::import::parse_bundle(&text).and_then(|bundle| {
                    care_sync_server::ingest::fhir::import::import_bundle(
                        store.as_ref(),
                        &bundle,
                        &feed,
                        care_node::now_ms(),
                    )
                });
                match result {
                    Ok(outcome) => {
                        ok += 1;
                        println!(
                            "{}: {} patient, {} entries written, {} unchanged",
                            file.display(),
                            if outcome.created { "new" } else { "existing" },
                            outcome.entries_written,
                            outcome.entries_unchanged
                        );
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("{}: refused, nothing imported: {e}", file.display());
                    }
                }
            }
            println!("{ok} bundle(s) imported, {failed} refused");
            if failed > 0 {
                return Err(format!("{failed} bundle(s) refused").into());
            }
        }
        Command::ExportFhir { nhs, out } => {
            let store = open(&dir)?;
            let nhs =
                care_node::nhs::NhsNumber::parse(&nhs).map_err(|e| format!("invalid NHS number: {e}"))?;
            let id = store.patient_by_nhs(&nhs)?.ok_or("no patient with that NHS number on this server")?;
            let saved = store.load_document(&id)?.ok_or("the patient has no document")?;
            let mut summary = care_node::summary::PatientSummary::load(&saved)?;
            let bundle =
                care_sync_server::ingest::fhir::export::export_ips(&mut summary, care_node::now_ms())?;
            let operator = std::env::var("USER").unwrap_or_else(|_| "operator".into());
            store.append_audit(
                &operator,
                "export-fhir",
                Some(&id),
                "IPS bundle exported",
                care_node::now_ms(),
            )?;
            let text = serde_json::to_string_pretty(&bundle)?;
            match out {
                Some(path) => {
                    std::fs::write(&path, text)
                        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
                None => println!("{text}"),
            }
        }
        Command::MergePatients { keep, merge, operator } => {
            let store = open(&dir)?;
            let outcome = ops::merge_patients(store.as_ref(), &keep, &merge, &operator)?;
            println!(
                "merged: {} entries moved, {} caseload(s) moved; the merged record is kept for the record and \
                 devices purge it at their next sync",
                outcome.entries_moved, outcome.caseloads_moved
            );
        }
        Command::Patients { provisional } => {
            let store = open(&dir)?;
            let mut shown = 0;
            for (id, nhs) in store.patient_ids()? {
                let label = match nhs {
                    Some(nhs) if !provisional => nhs,
                    Some(_) => continue,
                    // Without an NHS number: provisional, or merged away (its number went to the
                    // record that absorbed it). Merged records are not provisional any more.
                    None => match ops::merged_into(store.as_ref(), &id)? {
                        Some(_) if provisional => continue,
                        Some(into) => format!("merged into {into}"),
                        None => "provisional".into(),
                    },
                };
                println!("{id}  {label}");
                shown += 1;
            }
            if shown == 0 {
                println!("{}", if provisional { "no provisional records" } else { "no patients yet" });
            }
        }
        Command::WipeDevice { name } => {
            ops::wipe(open(&dir)?.as_ref(), &name)?;
            println!("{name} will destroy its data key and patient data at its next contact");
        }
        Command::Incident { action } => governance::incident(open(&dir)?.as_ref(), action)?,
        Command::Area { action } => governance::area(open(&dir)?.as_ref(), action)?,
        Command::Consent { action } => governance::consent(open(&dir)?.as_ref(), action)?,
        Command::Budget { device, documents } => {
            ops::set_budget(open(&dir)?.as_ref(), &device, (documents > 0).then_some(documents))?;
            println!("budget set");
        }
        Command::Set { name, value } => {
            ops::set_setting(open(&dir)?.as_ref(), &name, &value)?;
            println!(
                "{name} = {} (set by an operator; it stands until the configuration file's value for it changes)",
                value.trim()
            );
        }
        Command::Settings => {
            let store = open(&dir)?;
            println!("{:<30} {:<28} SOURCE", "SETTING", "VALUE");
            for setting in care_sync_server::domain::settings::Setting::ALL {
                let (value, source) = store.effective_setting(setting)?;
                println!("{:<30} {:<28} {}", setting.name(), value, source.as_str());
            }
        }
        Command::Quarantine { device, all, action } => {
            governance::quarantine(open(&dir)?.as_ref(), device.as_deref(), all, action)?
        }
        Command::Alerts { action } => {
            let action = action.unwrap_or(governance::AlertAction::List { all: false });
            governance::alerts(open(&dir)?.as_ref(), action)?
        }
        Command::Audit { nhs, device, since } => governance::audit(open(&dir)?.as_ref(), nhs, device, since)?,
        Command::ExportPlanning { out, by } => {
            let grouping = care_sync_server::operator::planning::Grouping::parse(&by)?;
            governance::export_planning(open(&dir)?.as_ref(), out, grouping)?
        }
        #[cfg(feature = "demo")]
        Command::Demo { .. } => unreachable!("handled above"),
    }
    Ok(())
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    let config = match &cli.config {
        Some(file) => match Config::load(file) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => Config::default(),
    };
    // `serve` reports connections and enrolments; the other commands print only warnings.
    let filter = match std::env::var("CARE_SYNC_LOG") {
        Ok(filter) => filter,
        Err(_) if matches!(cli.command, Command::Serve { .. }) => config.logging.filter.clone(),
        Err(_) => "warn".into(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(config::DEFAULT_LOG_FILTER));
    // Colours only on a terminal: a log file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match cli.log_format.unwrap_or(config.logging.format) {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand and every argument says what it is for in `--help`.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help"
                    && id != "version"
                    && arg.get_help().is_none_or(|h| h.to_string().trim().is_empty())
                {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in command.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "care-sync-server", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }
}
