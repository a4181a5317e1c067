//! `care-node`: a care-sync device on the command line.
//!
//! Over 600 lines with its tests: one function per command (about 590 lines of code).
//!
//! Everything but `enrol` and `sync` works offline. The store is encrypted under a key wrapped
//! with the passphrase from `CARE_NODE_PASSPHRASE` (or asked for at the terminal).

use std::path::PathBuf;
use std::process::ExitCode;

use care_node::client;
use care_node::crypto::PassphraseWrapper;
use care_node::news2::{Consciousness, Observations};
use care_node::nhs::NhsNumber;
use care_node::protocol::AccessKind;
use care_node::record::NewEntry;
use care_node::store::DeviceStore;
use care_node::summary::Section;
use care_node::sync::AccessRequest;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "care-node",
    version,
    about = "care-sync device: encrypted offline patient summaries",
    after_help = "Environment:\n  CARE_NODE_PASSPHRASE  the store's passphrase (asked at the terminal when unset; twice for a new store)\n  CARE_NODE_STORE       the store file, as --store\n  CARE_NODE_LOG         log filter (default: warn), e.g. info or care_node=debug"
)]
struct Cli {
    /// The device's encrypted store (created on first use); before or after the command.
    #[arg(
        long,
        global = true,
        env = "CARE_NODE_STORE",
        default_value = "./care-node.db",
        value_name = "FILE",
        help_heading = "Global options"
    )]
    store: PathBuf,
    /// Seconds to wait for the server before saying it cannot be reached (sync, enrol, break
    /// glass, permission to view).
    #[arg(
        long,
        global = true,
        env = "CARE_NODE_CONNECT_TIMEOUT",
        default_value_t = 10.0,
        value_name = "SECONDS",
        allow_hyphen_values = true,
        help_heading = "Global options"
    )]
    connect_timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enrols this device with the one-time token from the operator.
    Enrol {
        /// The one-time enrolment token the operator gave (`care-enrol1.…`).
        token: String,
    },
    /// Connects to the server, exchanges changes, disconnects (`--watch`: stays connected and
    /// prints notifications as changes arrive, until Ctrl-C).
    Sync {
        /// Stay connected and print each notification as it arrives, until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Lists the patients on this device.
    List,
    /// Shows a patient's summary (with "as of" and last-sync times).
    Show {
        /// The patient's NHS number.
        nhs_number: String,
        /// Also print entry ids (to mark one entered in error).
        #[arg(long)]
        ids: bool,
    },
    /// Records an allergy (works offline).
    AddAllergy {
        /// The patient's NHS number.
        nhs_number: String,
        /// What the patient is allergic to (e.g. Penicillin).
        #[arg(long)]
        substance: String,
        /// The reaction (e.g. anaphylaxis, rash).
        #[arg(long)]
        reaction: Option<String>,
        /// mild, moderate or severe.
        #[arg(long)]
        severity: Option<String>,
    },
    /// Records an entry in any section (works offline).
    Add {
        /// The patient's NHS number.
        nhs_number: String,
        /// Which section the entry goes in.
        #[arg(long, value_enum)]
        section: SectionArg,
        /// The entry: a problem's description, a medication's name, an alert's description, a
        /// care plan's title, a contact's name, a result's title.
        #[arg(long)]
        text: String,
        /// A medication's dose; an alert's kind (respect-dnacpr, safeguarding, communication,
        /// access, end-of-life, clinical; default clinical); a care plan's description; a
        /// contact's relationship (required); a result's value.
        #[arg(long)]
        detail: Option<String>,
    },
    /// Records a crew attendance with the observations taken and prints NEWS2, or why it does
    /// not apply (under 16, pregnancy) or what is missing. Every observation is optional; works
    /// offline.
    RecordObs {
        /// The patient's NHS number.
        nhs_number: String,
        /// Respiration rate per minute.
        #[arg(long, value_name = "PER_MIN")]
        rr: Option<u32>,
        /// Oxygen saturation, %.
        #[arg(long, value_name = "PERCENT")]
        spo2: Option<u32>,
        /// Use SpO2 scale 2 (confirmed hypercapnic respiratory failure only).
        #[arg(long)]
        scale2: bool,
        /// The patient is on supplemental oxygen.
        #[arg(long)]
        oxygen: bool,
        /// Systolic blood pressure, mmHg.
        #[arg(long, value_name = "MMHG")]
        sbp: Option<u32>,
        /// Pulse per minute.
        #[arg(long, value_name = "PER_MIN")]
        pulse: Option<u32>,
        /// Consciousness: A, C (new confusion), V, P or U.
        #[arg(long, value_name = "LETTER")]
        acvpu: Option<String>,
        /// Temperature, °C.
        #[arg(long, value_name = "CELSIUS")]
        temp: Option<f64>,
        /// The patient is pregnant (NEWS2 does not apply: use the maternity early warning score).
        #[arg(long)]
        pregnant: bool,
        /// Reason for the attendance.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Marks an entry as entered in error (kept for the record, hidden from the clinical view).
    MarkError {
        /// The patient's NHS number.
        nhs_number: String,
        /// The section of the entry.
        #[arg(long, value_enum)]
        section: Section,
        /// The entry id (see `show --ids`).
        #[arg(long)]
        entry: uuid::Uuid,
        /// Why it is in error (e.g. wrong patient), kept with the marker.
        #[arg(long)]
        reason: String,
    },
    /// Emergency access to a patient outside this device's scope (online only; audited; raises
    /// an alert for the privacy officer).
    BreakGlass {
        /// The patient's NHS number.
        nhs_number: String,
        /// Why (e.g. unconscious, no carers present); a privacy officer reads it.
        #[arg(long)]
        reason: String,
    },
    /// Records that the patient in front of you gave permission to view their record (online;
    /// audited), and fetches it.
    PermissionToView {
        /// The patient's NHS number.
        nhs_number: String,
        /// What the patient agreed to, as recorded (e.g. verbal consent at the door).
        #[arg(long)]
        reason: String,
    },
    /// Shows notifications (admissions, transfers, discharges, attendances), newest first.
    Notifications {
        /// How many, newest first.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Shows enrolment, last sync and pending changes.
    Status,
    /// Lists this device's entries the server refused, with the text as recorded here (they
    /// are not in the shared record; `show` lists a patient's own under its header).
    Refused,
}

#[derive(Clone, Copy, ValueEnum)]
enum SectionArg {
    Problems,
    Medications,
    Alerts,
    CarePlans,
    Contacts,
    Results,
}

/// The store's passphrase: `CARE_NODE_PASSPHRASE`, or asked at the terminal (twice for a new
/// store, so a typing slip does not lock the data away).
fn passphrase(new_store: bool) -> Result<String, String> {
    if let Ok(p) = std::env::var("CARE_NODE_PASSPHRASE")
        && !p.is_empty()
    {
        return Ok(p);
    }
    let ask = |prompt: &str| {
        rpassword::prompt_password(prompt).map_err(|e| format!("cannot read the passphrase: {e}"))
    };
    if !new_store {
        return ask("store passphrase: ");
    }
    let first = ask("new store passphrase: ")?;
    if first.is_empty() {
        return Err("the passphrase must not be empty".into());
    }
    if ask("the same passphrase again: ")? != first {
        return Err("the two passphrases differ; nothing was created".into());
    }
    Ok(first)
}

/// Removes a store file this command created (and SQLite's companions), after a failed enrolment.
fn remove_new_store(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}

fn parse_nhs(s: &str) -> Result<NhsNumber, String> {
    NhsNumber::parse(s).map_err(|e| format!("invalid NHS number: {e}"))
}

/// Errors of the device commands, shown as one line (never with patient data).
type CliResult = Result<(), Box<dyn std::error::Error>>;

async fn run(cli: Cli) -> CliResult {
    if !(cli.connect_timeout.is_finite() && cli.connect_timeout > 0.0) {
        return Err("--connect-timeout takes a positive number of seconds".into());
    }
    client::set_connect_timeout(std::time::Duration::from_secs_f64(cli.connect_timeout.min(3600.0)));
    let new_store = !cli.store.exists();
    let secret = passphrase(new_store)?;
    let mut store = DeviceStore::open(&cli.store, &PassphraseWrapper::new(secret.clone()))?;
    match cli.command {
        Command::Enrol { token } => {
            let enrolment = match client::enrol(&mut store, &token).await {
                Ok(e) => e,
                Err(e) => {
                    // A store made only for this enrolment is not left behind.
                    if new_store {
                        drop(store);
                        remove_new_store(&cli.store);
                    }
                    return Err(e.into());
                }
            };
            println!(
                "enrolled as {} ({}) with server {}",
                enrolment.device_name, enrolment.role, enrolment.server_addr
            );
        }
        Command::Sync { watch: true } => watch(&mut store).await?,
        Command::Sync { watch: false } => sync_once(&mut store).await?,
        Command::List => list(&store)?,
        Command::Show { nhs_number, ids } => {
            let nhs = parse_nhs(&nhs_number)?;
            let mut patient = store.view_patient(&nhs, "show")?;
            let sync = store.sync_state()?;
            let refused = store.diverged()?;
            print!("{}", care_node::view::render(&mut patient, &sync, &refused, store.now_ms())?);
            if ids {
                print!("{}", care_node::view::entry_ids(&mut patient.summary)?);
            }
        }
        Command::AddAllergy { nhs_number, substance, reaction, severity } => {
            let nhs = parse_nhs(&nhs_number)?;
            let id = store.record(&nhs, &NewEntry::Allergy { substance, reaction, severity })?;
            println!("recorded allergy {id}; it will upload at the next sync");
        }
        Command::Add { nhs_number, section, text, detail } => {
            let nhs = parse_nhs(&nhs_number)?;
            let entry = new_entry(section, text, detail)?;
            let id = store.record(&nhs, &entry)?;
            println!("recorded entry {id}; it will upload at the next sync");
        }
        Command::RecordObs {
            nhs_number,
            rr,
            spo2,
            scale2,
            oxygen,
            sbp,
            pulse,
            acvpu,
            temp,
            pregnant,
            reason,
        } => {
            let nhs = parse_nhs(&nhs_number)?;
            let consciousness = acvpu
                .map(|a| {
                    Consciousness::from_letter(&a)
                        .ok_or_else(|| "consciousness must be one of A, C, V, P, U".to_string())
                })
                .transpose()?;
            let observations = Observations {
                respiration_rate: rr,
                spo2,
                spo2_scale_2: scale2,
                on_oxygen: oxygen,
                systolic_bp: sbp,
                pulse,
                consciousness,
                temperature_c: temp,
                pregnant,
            };
            let (id, assessment) = store.record_attendance(&nhs, &observations, reason.as_deref())?;
            println!("{}", care_node::view::assessment_text(&assessment));
            println!("recorded attendance {id}; it will upload at the next sync");
        }
        Command::MarkError { nhs_number, section, entry, reason } => {
            let nhs = parse_nhs(&nhs_number)?;
            store.mark_entered_in_error(&nhs, section, entry, &reason)?;
            println!("marked entered in error; kept for the record and hidden from the clinical view");
        }
        Command::BreakGlass { nhs_number, reason } => {
            access(&mut store, &nhs_number, AccessKind::BreakGlass, &reason).await?;
        }
        Command::PermissionToView { nhs_number, reason } => {
            access(&mut store, &nhs_number, AccessKind::PermissionToView, &reason).await?;
        }
        Command::Notifications { limit } => print_notifications(&store, limit)?,
        Command::Refused => refused(&mut store)?,
        Command::Status => status(&store)?,
    }
    Ok(())
}

/// `sync --watch`: a live session, printing each notification as its round is committed.
async fn watch(store: &mut DeviceStore) -> CliResult {
    println!("watching for changes (Ctrl-C to stop)…");
    // The live session holds the store; a second handle on the same file reads each
    // notification as its round is committed, and prints it at once.
    let reader = store.another_connection()?;
    let mut printed = 0u64;
    let mut on_round = move |stats: &care_node::sync::SyncStats| {
        let new = stats.notifications.saturating_sub(printed);
        if new > 0 {
            if let Err(e) = print_notifications(&reader, new as usize) {
                eprintln!("cannot show the notifications: {e}");
            }
            printed = stats.notifications;
        }
    };
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let report = client::watch(store, &mut on_round, stop).await?;
    println!(
        "stopped: {} new documents, {} changes received, {} notifications",
        report.stats.documents_received, report.stats.changes_received, report.stats.notifications
    );

    Ok(())
}

/// `sync`: one round, with a progress bar on a terminal once the round is large.
async fn sync_once(store: &mut DeviceStore) -> CliResult {
    let pending = store.pending_count()?;
    // A bar on the terminal (hidden when standard error is not one) once a round has
    // more than a page of items.
    let bar = indicatif::ProgressBar::hidden();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} items, {per_sec}, eta {eta}")
            .expect("valid template"),
    );
    let mut progress = |stats: &care_node::sync::SyncStats| {
        if stats.round_items > 1_000 && bar.is_hidden() {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        bar.set_length(stats.round_items);
        bar.set_position(stats.round_applied);
    };
    let report = client::sync_with_progress(store, &mut progress).await;
    bar.finish_and_clear();
    let report = report?;
    println!(
        "synced: {} uploaded (of {pending} pending), {} new documents, {} changes received, {} purged; \
         {} in scope; {} bytes in {:.0} ms",
        report.stats.uploaded_changes,
        report.stats.documents_received,
        report.stats.changes_received,
        report.stats.documents_purged,
        report.stats.documents_in_scope,
        report.udp_bytes(),
        report.duration.as_secs_f64() * 1000.0
    );
    if report.stats.notifications > 0 {
        print_notifications(store, report.stats.notifications as usize)?;
    }
    if report.stats.refused_changes > 0 {
        println!(
            "the server refused {} of this device's changes; they are kept on this device \
             (see `care-node status`) and an operator reviews them",
            report.stats.refused_changes
        );
    }

    Ok(())
}

/// `list`: the patients on this device, one line each.
fn list(store: &DeviceStore) -> CliResult {
    let cards = store.list()?;
    for card in &cards {
        let nhs = card
            .nhs_number
            .as_deref()
            .and_then(|n| NhsNumber::parse(n).ok())
            .map_or("provisional".to_string(), |n| n.formatted());
        println!(
            "{nhs:<13} {:<28} {:<11} {}",
            card.name,
            card.date_of_birth.as_deref().unwrap_or("-"),
            card.postcode.as_deref().unwrap_or("-")
        );
    }
    println!("{} patient(s) on this device", cards.len());

    Ok(())
}

/// `refused`: the entries the server refused, kept on this device (each patient shown is
/// written to the view log).
fn refused(store: &mut DeviceStore) -> CliResult {
    // The entries' text is patient data: the lease applies, and each patient shown is
    // written to the view log like any other read.
    store.check_lease(store.now_ms())?;
    let refused = store.diverged()?;
    let mut logged = Vec::new();
    for d in &refused {
        if !logged.contains(&d.doc) {
            store.record_view(&d.doc, "refused-entries", "")?;
            logged.push(d.doc);
        }
        println!(
            "{}  patient {}  {}  rule {}",
            care_node::view::format_time(d.at_ms),
            d.doc,
            d.place,
            d.rule
        );
        for line in &d.entries {
            println!("    - {line}");
        }
    }
    println!(
        "{} refused entr{} kept on this device",
        refused.len(),
        if refused.len() == 1 { "y" } else { "ies" }
    );

    Ok(())
}

/// `status`: enrolment, last sync, what waits for upload, the lease, refusals.
fn status(store: &DeviceStore) -> CliResult {
    match store.enrolment()? {
        Some(e) => println!("device {} ({}), server {}", e.device_name, e.role, e.server_addr),
        None => println!("not enrolled"),
    }
    let status = store.status()?;
    println!("last sync: {}", status.last_sync_ms.map_or("never".to_string(), care_node::view::format_time));
    println!("patients: {}", status.patients);
    println!("changes waiting for upload: {}", status.pending_changes);
    if let Some(lease) = status.lease_ms {
        println!(
            "offline lease: {} h{}",
            lease / 3_600_000,
            match store.check_lease(store.now_ms()) {
                Ok(()) => String::new(),
                Err(e) => format!(" — {e}"),
            }
        );
    }
    if status.left_out_by_budget > 0 {
        let left_out = status.left_out_by_budget;
        println!("{left_out} patient(s) in scope left out by this device's document budget");
    }
    // Entries the server refused stay here for the clinician; patients by opaque id
    // only (`refused` and `show` give the text).
    for d in store.diverged()? {
        println!(
            "refused by the server {}: {} change(s) to patient {} at {} — rule {}: {}",
            care_node::view::format_time(d.at_ms),
            d.changes,
            d.doc,
            d.place,
            d.rule,
            care_node::policy::Rule::parse(&d.rule).map_or("", |r| r.explain())
        );
    }

    Ok(())
}

/// The entry `add` records in a section: `text` is its main field, `detail` the second.
fn new_entry(section: SectionArg, text: String, detail: Option<String>) -> Result<NewEntry, &'static str> {
    Ok(match section {
        SectionArg::Problems => NewEntry::Problem { description: text },
        SectionArg::Medications => {
            NewEntry::Medication { name: text, dose: detail, route: None, frequency: None }
        }
        SectionArg::Alerts => NewEntry::Alert {
            kind: detail.unwrap_or_else(|| care_node::summary::alert_kind::CLINICAL.into()),
            description: text,
        },
        SectionArg::CarePlans => NewEntry::CarePlan { title: text, description: detail },
        SectionArg::Contacts => NewEntry::Contact {
            name: text,
            relationship: detail.ok_or("a contact needs --detail RELATIONSHIP (e.g. next-of-kin)")?,
            phone: None,
        },
        SectionArg::Results => NewEntry::Result { title: text, value: detail, unit: None },
    })
}

async fn access(store: &mut DeviceStore, nhs_number: &str, kind: AccessKind, reason: &str) -> CliResult {
    let nhs = parse_nhs(nhs_number)?;
    let request = AccessRequest { nhs_number: nhs.as_str().to_string(), kind, reason: reason.to_string() };
    let (decision, _) = client::request_access(store, request).await?;
    if !decision.granted {
        return Err(format!("refused: {}", decision.message).into());
    }
    if store.find_by_nhs(&nhs)?.is_none() {
        return Err(format!("{}, but the record did not arrive: sync again", decision.message).into());
    }
    println!("{}; the record is on this device now (`show` it)", decision.message);
    Ok(())
}

fn print_notifications(store: &DeviceStore, limit: usize) -> CliResult {
    let cards: std::collections::HashMap<_, _> =
        store.list()?.into_iter().map(|c| (c.patient_id, c)).collect();
    for n in store.notifications(limit)? {
        let who = cards.get(&n.patient_id).map_or("a patient no longer on this device".to_string(), |c| {
            format!(
                "{} ({})",
                c.name,
                c.nhs_number
                    .as_deref()
                    .and_then(|x| NhsNumber::parse(x).ok())
                    .map_or("provisional".into(), |x| x.formatted())
            )
        });
        println!("{}  {who}: {}", care_node::view::format_time(n.at_ms), n.text);
    }
    Ok(())
}

fn main() -> ExitCode {
    // `care-node list | head` ends quietly when `head` has had enough (Rust ignores SIGPIPE).
    // SAFETY: setting a signal's disposition to the default, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CARE_NODE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
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

    /// Every command and every argument says what it is for in `--help`.
    #[test]
    fn every_command_and_argument_has_help() {
        let cli = super::Cli::command();
        let mut missing = Vec::new();
        for arg in cli.get_arguments().filter(|a| a.get_id() != "help" && a.get_id() != "version") {
            if arg.get_help().is_none() {
                missing.push(format!("care-node --{}", arg.get_id()));
            }
        }
        for sub in cli.get_subcommands().filter(|s| s.get_name() != "help") {
            if sub.get_about().is_none() {
                missing.push(format!("care-node {}", sub.get_name()));
            }
            for arg in sub.get_arguments().filter(|a| a.get_id() != "help") {
                if arg.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("care-node {} {}", sub.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "without help text: {missing:#?}");
        assert!(cli.get_after_help().is_some_and(|h| h.to_string().contains("CARE_NODE_PASSPHRASE")));
    }
}
