//! Operator commands about who gets what: incidents, areas, consent, budgets, settings, wipes,
//! alerts, audit and planning exports.

use std::path::PathBuf;

use care_sync_server::operator::ops;
use care_sync_server::store::{AuditFilter, ServerStore};
use clap::Subcommand;

use crate::CliResult;

#[derive(Subcommand)]
pub enum IncidentAction {
    /// Grants a device a patient for an incident; it lapses after `--hours`.
    Open {
        /// The device, by its enrolled name (e.g. ambulance-7).
        #[arg(long)]
        device: String,
        /// The patient's NHS number (10 digits; spaces allowed).
        #[arg(long)]
        nhs: String,
        /// How long the grant lasts, in hours.
        #[arg(long, default_value_t = ops::DEFAULT_INCIDENT_HOURS)]
        hours: f64,
    },
    /// Ends the incident now; the device purges the record at its next sync.
    Close {
        /// The device, by its enrolled name (e.g. ambulance-7).
        #[arg(long)]
        device: String,
        /// The patient's NHS number (10 digits; spaces allowed).
        #[arg(long)]
        nhs: String,
    },
}

#[derive(Subcommand)]
pub enum AreaAction {
    /// Adds a postcode district whose high-risk patients the device prefetches.
    Add {
        /// The device, by its enrolled name (e.g. ambulance-7).
        #[arg(long)]
        device: String,
        /// A postcode district (the outward code), e.g. SO16.
        #[arg(long)]
        district: String,
    },
    /// Gives devices many districts from a CSV file of `device,district` lines, all or nothing,
    /// with every bad line named.
    Import {
        /// The CSV file (a `device,district` header, blank lines and `#` comments are skipped).
        file: std::path::PathBuf,
    },
    /// Stops prefetching a district for the device.
    Remove {
        /// The device, by its enrolled name (e.g. ambulance-7).
        #[arg(long)]
        device: String,
        /// A postcode district (the outward code), e.g. SO16.
        #[arg(long)]
        district: String,
    },
    /// Lists the districts the device prefetches.
    List {
        /// The device, by its enrolled name (e.g. ambulance-7).
        #[arg(long)]
        device: String,
    },
}

#[derive(Subcommand)]
pub enum ConsentAction {
    /// Records the patient's objection to sharing (no caseload or prefetch delivery).
    Object {
        /// The patient's NHS number (10 digits; spaces allowed).
        #[arg(long)]
        nhs: String,
    },
    /// Withdraws the objection.
    Withdraw {
        /// The patient's NHS number (10 digits; spaces allowed).
        #[arg(long)]
        nhs: String,
    },
    /// Records the national data opt-out (planning exports only).
    OptOut {
        /// The patient's NHS number (10 digits; spaces allowed).
        #[arg(long)]
        nhs: String,
    },
    /// Clears the national data opt-out.
    OptIn {
        /// The patient's NHS number (10 digits; spaces allowed).
        #[arg(long)]
        nhs: String,
    },
    /// Shows the patient's consent flags.
    Show {
        /// The patient's NHS number (10 digits; spaces allowed).
        #[arg(long)]
        nhs: String,
    },
}

#[derive(Subcommand)]
pub enum AlertAction {
    /// Lists open alerts (break glass, view-log problems); `--all` includes acknowledged ones.
    List {
        /// Include acknowledged ones.
        #[arg(long)]
        all: bool,
    },
    /// Acknowledges an alert with a note.
    Ack {
        /// The id, from the list.
        id: i64,
        /// What was decided, for the audit.
        #[arg(long)]
        note: String,
    },
    /// Shows one alert's reason: a clinician's free text (break glass, permission to view) is
    /// sealed in the list, and reading it here is audited.
    Reason {
        /// The alert's id, from the list.
        id: i64,
    },
}

#[derive(Subcommand)]
pub enum QuarantineAction {
    /// Records that a quarantined upload was reviewed, with a note (audited). Reviewed items
    /// leave the default list and no longer count towards the device's quarantine limit.
    Review {
        /// The item's id, from the list.
        id: i64,
        /// What was decided (e.g. "re-recorded by the GP practice", "device reset").
        #[arg(long)]
        note: String,
    },
}

pub fn quarantine(
    store: &dyn ServerStore,
    device: Option<&str>,
    all: bool,
    action: Option<QuarantineAction>,
) -> CliResult {
    if let Some(QuarantineAction::Review { id, note }) = action {
        if !ops::review_quarantine(store, id, &note)? {
            return Err(format!("no quarantined upload with id {id}").into());
        }
        println!("quarantined upload {id} reviewed");
        return Ok(());
    }
    let id = match device {
        Some(name) => {
            Some(store.device_by_name(name)?.ok_or_else(|| format!("no device named `{name}`"))?.id)
        }
        None => None,
    };
    let items: Vec<_> = store.quarantined(id)?.into_iter().filter(|q| all || q.reviewed.is_none()).collect();
    println!(
        "{:>6} {:<22} {:<20} {:<38} {:<22} {:<44} {:>7} REVIEWED",
        "ID", "WHEN", "DEVICE", "PATIENT", "RULE", "PLACE", "CHANGES"
    );
    for q in &items {
        println!(
            "{:>6} {:<22} {:<20} {:<38} {:<22} {:<44} {:>7} {}",
            q.id,
            care_node::view::format_time(q.at_ms),
            q.device,
            q.patient,
            q.rule,
            q.place,
            q.changes.len(),
            q.reviewed.as_ref().map_or("-".to_string(), |r| care_node::view::format_time(r.at_ms))
        );
    }
    let what = if all { "" } else { " not yet reviewed" };
    eprintln!("{} refused upload(s) in quarantine{what}", items.len());
    Ok(())
}

pub fn incident(store: &dyn ServerStore, action: IncidentAction) -> CliResult {
    match action {
        IncidentAction::Open { device, nhs, hours } => {
            ops::incident_open(store, &device, &nhs, hours)?;
            println!("incident open: {device} has the patient for {hours} h, then it lapses");
        }
        IncidentAction::Close { device, nhs } => {
            let n = ops::incident_close(store, &device, &nhs)?;
            println!("{n} incident grant(s) closed; the device purges the record at its next sync");
        }
    }
    Ok(())
}

pub fn area(store: &dyn ServerStore, action: AreaAction) -> CliResult {
    match action {
        AreaAction::Add { device, district } => {
            let added = ops::area(store, &device, &district, true)?;
            println!("{}", if added { "district added" } else { "district already covered" });
        }
        AreaAction::Import { file } => {
            let text = crate::read_text(&file)?;
            let done = ops::area_import(store, &text)?;
            println!(
                "{} line(s): {} district(s) added, {} already covered",
                done.lines, done.added, done.already
            );
        }
        AreaAction::Remove { device, district } => {
            let removed = ops::area(store, &device, &district, false)?;
            println!("{}", if removed { "district removed" } else { "district was not covered" });
        }
        AreaAction::List { device } => {
            let d = ops::device(store, &device)?;
            println!("{}", store.areas(d.id)?.join(" "));
        }
    }
    Ok(())
}

pub fn consent(store: &dyn ServerStore, action: ConsentAction) -> CliResult {
    let flags = match action {
        ConsentAction::Object { nhs } => ops::set_consent(store, &nhs, Some(true), None)?,
        ConsentAction::Withdraw { nhs } => ops::set_consent(store, &nhs, Some(false), None)?,
        ConsentAction::OptOut { nhs } => ops::set_consent(store, &nhs, None, Some(true))?,
        ConsentAction::OptIn { nhs } => ops::set_consent(store, &nhs, None, Some(false))?,
        ConsentAction::Show { nhs } => store.consent(&ops::find_patient(store, &nhs)?)?,
    };
    println!("objection to sharing: {}; national data opt-out: {}", flags.objection, flags.opt_out);
    Ok(())
}

pub fn alerts(store: &dyn ServerStore, action: AlertAction) -> CliResult {
    match action {
        AlertAction::List { all } => {
            let alerts = store.alerts(all)?;
            if alerts.is_empty() {
                println!(
                    "{}",
                    if all {
                        "no alerts"
                    } else {
                        "no open alerts (`alerts list --all` shows acknowledged ones)"
                    }
                );
                return Ok(());
            }
            println!("{:<5} {:<22} {:<13} {:<18} {:<18} REASON", "ID", "AT", "KIND", "DEVICE", "PATIENT");
            for a in alerts {
                let patient =
                    a.patient.map(|p| care_node::identity::short_hex(p.as_bytes())).unwrap_or_default();
                let state = if a.acknowledged_at_ms.is_some() { " (acknowledged)" } else { "" };
                println!(
                    "{:<5} {:<22} {:<13} {:<18} {:<18} {}{state}",
                    a.id,
                    care_node::view::format_time(a.at_ms),
                    a.kind,
                    a.device.clone().unwrap_or_default(),
                    patient,
                    if ops::reason_sealed(&a) {
                        format!("(sealed: `alerts reason {}`)", a.id)
                    } else {
                        a.reason.clone()
                    }
                );
            }
        }
        AlertAction::Reason { id } => match ops::alert_reason(store, id)? {
            Some(reason) => println!("{reason}"),
            None => return Err(format!("no alert {id}").into()),
        },
        AlertAction::Ack { id, note } => {
            if ops::acknowledge_alert(store, id, &note)? {
                println!("alert {id} acknowledged");
            } else {
                return Err(format!("no open alert {id}").into());
            }
        }
    }
    Ok(())
}

/// Who saw this patient, when, and why.
pub fn audit(
    store: &dyn ServerStore,
    nhs: Option<String>,
    device: Option<String>,
    since: Option<String>,
) -> CliResult {
    let filter = AuditFilter {
        patient: nhs.map(|n| ops::find_patient(store, &n)).transpose()?,
        actor: device,
        since_ms: since.map(|s| ops::parse_since(&s)).transpose()?,
    };
    for a in ops::audit_search(store, &filter)? {
        let patient = a.patient.map(|p| care_node::identity::short_hex(p.as_bytes())).unwrap_or_default();
        println!(
            "{:<22} {:<18} {:<22} {:<18} {}",
            care_node::view::format_time(a.at_ms),
            a.actor,
            a.action,
            patient,
            a.detail
        );
    }
    Ok(())
}

pub fn export_planning(
    store: &dyn ServerStore,
    out: Option<PathBuf>,
    grouping: care_sync_server::operator::planning::Grouping,
) -> CliResult {
    let export = ops::planning_export(store, grouping)?;
    let summary = format!(
        "{} patients counted, {} excluded by the national data opt-out; {} cells, {} suppressed (1–7 patients)",
        export.patients_counted, export.patients_opted_out, export.cells, export.suppressed_cells
    );
    match out {
        Some(path) => {
            std::fs::write(&path, &export.csv)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            eprintln!("wrote {}: {summary}", path.display());
        }
        None => {
            print!("{}", export.csv);
            eprintln!("{summary}");
        }
    }
    Ok(())
}

/// `budget --device NAME --documents N` (0: the default budget).
pub fn budget(store: &dyn ServerStore, device: &str, documents: u64) -> CliResult {
    ops::set_budget(store, device, (documents > 0).then_some(documents))?;
    println!("budget set");
    Ok(())
}

/// `set NAME VALUE`: an operator's setting, audited.
pub fn set(store: &dyn ServerStore, name: &str, value: &str) -> CliResult {
    ops::set_setting(store, name, value)?;
    println!(
        "{name} = {} (set by an operator; it stands until the configuration file's value for it changes)",
        value.trim()
    );
    Ok(())
}

/// `settings`: every setting in force and where its value comes from.
pub fn settings(store: &dyn ServerStore) -> CliResult {
    println!("{:<30} {:<28} SOURCE", "SETTING", "VALUE");
    for setting in care_sync_server::domain::settings::Setting::ALL {
        let (value, source) = store.effective_setting(setting)?;
        println!("{:<30} {:<28} {}", setting.name(), value, source.as_str());
    }
    Ok(())
}
