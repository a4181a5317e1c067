//! `care-node`: a care-sync device on the command line.
//!
//! Everything but `enrol` and `sync` works offline. The store is encrypted under a key wrapped
//! with the passphrase from `CARE_NODE_PASSPHRASE` (or asked for at the terminal).

use std::path::PathBuf;
use std::process::ExitCode;

use care_node::client;
use care_node::crypto::PassphraseWrapper;
use care_node::nhs::NhsNumber;
use care_node::store::{DeviceStore, StoreError};
use care_node::summary::{Alert, Allergy, CONFIRMED, Medication, Problem};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "care-node", version, about = "care-sync device: encrypted offline patient summaries")]
struct Cli {
    /// The device's encrypted store (created on first use).
    #[arg(long, env = "CARE_NODE_STORE", default_value = "./care-node.db")]
    store: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enrols this device with the one-time token from the operator.
    Enrol { token: String },
    /// Connects to the server, exchanges changes, disconnects.
    Sync,
    /// Lists the patients on this device.
    List,
    /// Shows a patient's summary (with "as of" and last-sync times).
    Show { nhs_number: String },
    /// Records an allergy (works offline).
    AddAllergy {
        nhs_number: String,
        #[arg(long)]
        substance: String,
        #[arg(long)]
        reaction: Option<String>,
        #[arg(long)]
        severity: Option<String>,
    },
    /// Records an entry in any section (works offline).
    Add {
        nhs_number: String,
        #[arg(long, value_enum)]
        section: SectionArg,
        /// The entry: a problem's description, a medication's name, an alert's description.
        #[arg(long)]
        text: String,
        /// Medication dose, or alert kind (e.g. respect-dnacpr, safeguarding, access).
        #[arg(long)]
        detail: Option<String>,
    },
    /// Shows enrolment, last sync and pending changes.
    Status,
}

#[derive(Clone, Copy, ValueEnum)]
enum SectionArg {
    Problems,
    Medications,
    Alerts,
}

fn passphrase() -> Result<String, String> {
    match std::env::var("CARE_NODE_PASSPHRASE") {
        Ok(p) if !p.is_empty() => Ok(p),
        _ => rpassword::prompt_password("store passphrase: ")
            .map_err(|e| format!("cannot read the passphrase: {e}")),
    }
}

fn parse_nhs(s: &str) -> Result<NhsNumber, String> {
    NhsNumber::parse(s).map_err(|e| format!("invalid NHS number: {e}"))
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

async fn run(cli: Cli) -> Result<(), String> {
    let mut store = DeviceStore::open(&cli.store, &PassphraseWrapper::new(passphrase()?)).map_err(err)?;
    match cli.command {
        Command::Enrol { token } => {
            let enrolment = client::enrol(&store, &token).await.map_err(err)?;
            println!(
                "enrolled as {} ({}) with server {}",
                enrolment.device_name, enrolment.role, enrolment.server_addr
            );
        }
        Command::Sync => {
            let pending = store.pending_count().map_err(err)?;
            let report = client::sync(&mut store).await.map_err(err)?;
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
        }
        Command::List => {
            let cards = store.list().map_err(err)?;
            for card in &cards {
                let nhs = NhsNumber::parse(&card.nhs_number).map(|n| n.formatted()).unwrap_or_default();
                println!("{nhs:<13} {:<28} {:<11} {}", card.name, card.date_of_birth, card.postcode);
            }
            println!("{} patient(s) on this device", cards.len());
        }
        Command::Show { nhs_number } => {
            let nhs = parse_nhs(&nhs_number)?;
            let patient =
                store.find_by_nhs(&nhs).map_err(err)?.ok_or_else(|| err(StoreError::UnknownPatient))?;
            let sync = store.sync_state().map_err(err)?;
            print!("{}", care_node::view::render(&patient, &sync, care_node::now_ms()).map_err(err)?);
        }
        Command::AddAllergy { nhs_number, substance, reaction, severity } => {
            let nhs = parse_nhs(&nhs_number)?;
            let provenance = store.provenance().map_err(err)?;
            let entry =
                Allergy { substance, reaction, severity, verification_status: CONFIRMED.into(), provenance };
            let id = store.add_entry(&nhs, &entry).map_err(err)?;
            println!("recorded allergy {id}; it will upload at the next sync");
        }
        Command::Add { nhs_number, section, text, detail } => {
            let nhs = parse_nhs(&nhs_number)?;
            let provenance = store.provenance().map_err(err)?;
            let verification_status = CONFIRMED.to_string();
            let id = match section {
                SectionArg::Problems => store.add_entry(
                    &nhs,
                    &Problem {
                        description: text,
                        clinical_status: "active".into(),
                        verification_status,
                        provenance,
                    },
                ),
                SectionArg::Medications => store.add_entry(
                    &nhs,
                    &Medication {
                        name: text,
                        dose: detail,
                        status: "active".into(),
                        verification_status,
                        provenance,
                    },
                ),
                SectionArg::Alerts => store.add_entry(
                    &nhs,
                    &Alert {
                        kind: detail.unwrap_or_else(|| "clinical".into()),
                        description: text,
                        verification_status,
                        provenance,
                    },
                ),
            }
            .map_err(err)?;
            println!("recorded entry {id}; it will upload at the next sync");
        }
        Command::Status => {
            match store.enrolment().map_err(err)? {
                Some(e) => println!("device {} ({}), server {}", e.device_name, e.role, e.server_addr),
                None => println!("not enrolled"),
            }
            let sync = store.sync_state().map_err(err)?;
            println!(
                "last sync: {}",
                sync.last_sync_ms.map_or("never".to_string(), care_node::view::format_time)
            );
            println!("patients: {}", store.document_count().map_err(err)?);
            println!("changes waiting for upload: {}", store.pending_count().map_err(err)?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CARE_NODE_LOG").unwrap_or_else(|_| "warn".into()),
        )
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
