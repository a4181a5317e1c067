//! `care-sync-server`: the operator's command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[cfg(feature = "demo")]
use care_sync_server::demo::{self, DemoOptions};
use care_sync_server::operator::config::{self, Config, LogFormat};
use care_sync_server::operator::ops;
use care_sync_server::store::{Role, ServerStore};
use clap::{Parser, Subcommand};

mod devices;
mod governance;
mod records;
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
    /// The store's database: `postgres://user@host:port/database` for PostgreSQL (every
    /// instance of a region names the same one; `?sslmode=require&sslrootcert=CA.pem` for TLS,
    /// always verified) [default: `store.url` of the configuration, else the embedded SQLite
    /// store in the data directory].
    #[arg(
        long,
        global = true,
        env = "CARE_SYNC_STORE_URL",
        value_name = "URL",
        hide_env_values = true,
        help_heading = "Global options"
    )]
    store_url: Option<String>,
    /// Log format: `text` (default) or `json` (one object per line, for log shippers).
    #[arg(long, global = true, value_parser = parse_log_format, value_name = "FORMAT", help_heading = "Global options")]
    log_format: Option<LogFormat>,
    /// Who this command acts for: the name its audit lines carry [default: the login user,
    /// `$SUDO_USER`, else `$USER`, else `$LOGNAME`; `serve` ignores it: its admin API acts as
    /// `admin-api`, its scheduled compaction as `compaction-schedule`].
    #[arg(
        long,
        global = true,
        env = "CARE_SYNC_OPERATOR",
        value_name = "NAME",
        help_heading = "Global options"
    )]
    operator: Option<String>,
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
    /// After the store's database was put back from a backup by other means than `restore`
    /// (pg_restore of a dump, point-in-time recovery): tells every device at its next sync that
    /// the server may have lost what it acknowledged since, so each sends again what it
    /// recorded and resyncs. Run once, before the instances start.
    Restored,
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
        /// The address devices reach the server on, or every instance's, separated by commas
        /// (`host:port`; a device tries the next when one does not answer) [default:
        /// `sync.advertised_addr`, else where `serve` last listened with this data directory,
        /// else `sync.listen`].
        #[arg(long, value_name = "HOST:PORT[,HOST:PORT…]")]
        server_addr: Option<care_sync_server::operator::config::ServerAddrs>,
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
        /// How full each record is.
        #[arg(long, value_enum, default_value_t = demo::population::Records::Synthetic)]
        records: demo::population::Records,
        /// With --fhir-out: write one NDJSON file (patients.ndjson: each patient's Patient line,
        /// then its resources, as a Bulk Data export grouped by patient) instead of a Bundle per
        /// patient.
        #[arg(long, requires = "fhir_out")]
        ndjson: bool,
    },
    /// Imports FHIR R4 patients: Bundles (one patient per .json file), NDJSON (.ndjson, .jsonl:
    /// one resource per line, each patient's Patient line first, as a Bulk Data export grouped by
    /// patient) and directories of them. Each patient is imported whole or refused whole; the
    /// import uses every core, commits many patients at a time, and a rerun after a crash or
    /// Ctrl-C resumes where the last commit left off.
    ImportFhir {
        /// The files and directories to read (directories recursively, in name order).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The name recorded as the source of entries without care-sync provenance.
        #[arg(long, default_value = "FHIR import")]
        feed: String,
        /// Threads that parse and build records (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
        /// Patients written per transaction.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        batch: u64,
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

/// The store the configuration names (`[store]`, `--store-url`).
fn open(config: &Config) -> Result<Arc<dyn ServerStore>, Box<dyn std::error::Error>> {
    Ok(config.store.open(&config.data_dir)?)
}

/// `backup` and `restore` copy the embedded SQLite store; a database server's store is backed
/// up with its own tools.
fn embedded_only(config: &Config, command: &str) -> CliResult {
    match &config.store.url {
        None => Ok(()),
        Some(_) => Err(format!(
            "`{command}` copies the embedded SQLite store; this server's store is PostgreSQL: back it up with pg_dump or continuous archiving (docs/operations.md, Several instances on PostgreSQL)"
        )
        .into()),
    }
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

/// A file the operator named, read whole; the error names the file.
pub(crate) fn read_text(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

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
    if let Some(url) = cli.store_url {
        config.store.url = Some(url);
    }
    let dir = config.data_dir.clone();
    match cli.command {
        Command::Serve { listen, mllp_listen, admin_listen } => {
            config.sync.listen = listen.unwrap_or(config.sync.listen);
            config.feeds.mllp_listen = mllp_listen.unwrap_or(config.feeds.mllp_listen);
            config.admin.listen = admin_listen.unwrap_or(config.admin.listen);
            serve::serve(config).await?;
        }
        Command::ServerKey { action } => devices::server_key(open(&config)?.as_ref(), action)?,
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
            embedded_only(&config, "backup")?;
            records::backup(&dir, &out)?
        }
        Command::Restored => {
            let store = open(&config)?;
            store.renew_incarnation()?;
            store.append_audit(
                ops::acting(),
                "restored",
                None,
                "the store was put back from a backup; devices resend their changes",
                care_node::now_ms(),
            )?;
            println!("recorded: every device sends again what it recorded, and resyncs, at its next sync");
        }
        Command::Restore { from, force } => {
            embedded_only(&config, "restore")?;
            records::restore(&from, &dir, force)?
        }
        Command::IngestAdt { files } => {
            records::ingest_adt(open(&config)?.as_ref(), &files, &config.feeds.adt_options())?
        }
        Command::EnrolDevice { name, role, server_addr, expires_in_hours } => {
            let store = open(&config)?;
            let addr = server_addr.or(config.sync.advertised_addr.clone()).unwrap_or_else(|| {
                std::fs::read_to_string(serve::advertised_addr_file(&dir))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or_else(|| config.sync.listen.into())
            });
            devices::enrol(store.as_ref(), &name, role, addr, expires_in_hours)?
        }
        Command::CompactLog { hold_days, dry_run } => {
            let hold = devices::hold(hold_days, config.compaction.hold())?;
            devices::compact_log(open(&config)?.as_ref(), hold, dry_run)?
        }
        Command::Devices => devices::list(open(&config)?.as_ref(), config.admin.stale_after_hours)?,
        Command::RevokeDevice { name } => devices::revoke(open(&config)?.as_ref(), &name)?,
        Command::Caseload { action } => devices::caseload(open(&config)?.as_ref(), action)?,
        #[cfg(feature = "demo")]
        Command::Generate { patients, seed, fhir_out, records, ndjson } => records::generate(
            open(&config)?.as_ref(),
            patients,
            seed,
            fhir_out.map(|dir| (dir, ndjson)),
            records,
        )?,
        Command::ImportFhir { files, feed, workers, batch } => {
            records::import_fhir(open(&config)?.as_ref(), &files, &feed, workers, batch as usize)?
        }
        Command::ExportFhir { nhs, out } => records::export_fhir(open(&config)?.as_ref(), &nhs, out)?,
        Command::MergePatients { keep, merge } => {
            records::merge(open(&config)?.as_ref(), &keep, &merge, ops::acting())?
        }
        Command::Patients { provisional } => records::patients(open(&config)?.as_ref(), provisional)?,
        Command::WipeDevice { name } => devices::wipe(open(&config)?.as_ref(), &name)?,
        Command::Incident { action } => governance::incident(open(&config)?.as_ref(), action)?,
        Command::Area { action } => governance::area(open(&config)?.as_ref(), action)?,
        Command::Consent { action } => governance::consent(open(&config)?.as_ref(), action)?,
        Command::Budget { device, documents } => {
            governance::budget(open(&config)?.as_ref(), &device, documents)?
        }
        Command::Set { name, value } => governance::set(open(&config)?.as_ref(), &name, &value)?,
        Command::Settings => governance::settings(open(&config)?.as_ref())?,
        Command::Quarantine { device, all, action } => {
            governance::quarantine(open(&config)?.as_ref(), device.as_deref(), all, action)?
        }
        Command::Alerts { action } => {
            let action = action.unwrap_or(governance::AlertAction::List { all: false });
            governance::alerts(open(&config)?.as_ref(), action)?
        }
        Command::Audit { nhs, device, since } => {
            governance::audit(open(&config)?.as_ref(), nhs, device, since)?
        }
        Command::ExportPlanning { out, by } => {
            let grouping = care_sync_server::operator::planning::Grouping::parse(&by)?;
            governance::export_planning(open(&config)?.as_ref(), out, grouping)?
        }
        #[cfg(feature = "demo")]
        Command::Demo { .. } => unreachable!("handled above"),
    }
    Ok(())
}

/// Who this command acts for: `serve`'s admin API is `admin-api` whoever started it (one shared
/// token: who used it is not known); otherwise `--operator`, else the login user (the person
/// behind `sudo` first).
fn acting_for(cli: &Cli) -> String {
    if matches!(cli.command, Command::Serve { .. }) {
        return "admin-api".into();
    }
    if let Some(name) = &cli.operator {
        return name.clone();
    }
    ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.trim().is_empty()))
        .unwrap_or_else(|| ops::OPERATOR.into())
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
    if let Err(e) = ops::act_as(&acting_for(&cli)) {
        eprintln!("error: --operator: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = care_sync_server::transport::runtime().expect("tokio runtime");
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
