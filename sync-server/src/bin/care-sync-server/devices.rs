//! Operator commands about devices and the server itself: the device list, caseloads, the
//! server key's rotation, compaction of the change log.

use std::time::Duration;

use care_sync_server::operator::{config, ops};
use care_sync_server::store::{Role, ServerStore};

use crate::{CaseloadAction, CliResult, ServerKeyAction};

/// `revoke-device NAME`.
pub fn revoke(store: &dyn ServerStore, name: &str) -> CliResult {
    ops::revoke(store, name)?;
    println!(
        "revoked {name}: its live sessions close within a second and its next connection is refused \
         (unless a wipe is pending: then it is admitted only to be told to wipe)"
    );
    Ok(())
}

/// `wipe-device NAME`.
pub fn wipe(store: &dyn ServerStore, name: &str) -> CliResult {
    ops::wipe(store, name)?;
    println!("{name} will destroy its data key and patient data at its next contact");
    Ok(())
}

/// `server-key status|stage|activate|cancel`: the server key's rotation.
pub fn server_key(store: &dyn ServerStore, action: ServerKeyAction) -> CliResult {
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
                        println!("{} device(s) have not learnt it yet: {}", behind.len(), behind.join(", "));
                    }
                }
            }
        }
        ServerKeyAction::Stage => {
            let fingerprint = ops::stage_server_key(store)?;
            println!("staged key fingerprint: {}", hex(fingerprint));
            println!("devices learn it at their next sync; `server-key status` shows who has not yet");
        }
        ServerKeyAction::Activate { force } => {
            let fingerprint = ops::activate_server_key(store, force)?;
            println!("active key fingerprint: {}", hex(fingerprint));
            println!("restart `serve` to present it; new enrolment tokens carry it");
        }
        ServerKeyAction::Cancel => {
            let cancelled = ops::cancel_server_key(store)?;
            println!("{}", if cancelled { "staged key dropped" } else { "no key was staged" });
        }
    }

    Ok(())
}

/// `compact-log --hold-days`, checked (before any store is opened), or the configured hold.
pub fn hold(hold_days: Option<f64>, default_hold: Duration) -> Result<Duration, Box<dyn std::error::Error>> {
    match hold_days {
        Some(days) if (0.0..=config::MAX_HOLD_DAYS).contains(&days) => {
            Ok(Duration::from_secs_f64(days * 86_400.0))
        }
        Some(_) => Err("--hold-days must be a number of days from 0 to 3650".into()),
        None => Ok(default_hold),
    }
}

/// `compact-log`: drops change-log entries every recently synced device has.
pub fn compact_log(store: &dyn ServerStore, hold: Duration, dry_run: bool) -> CliResult {
    let done = ops::compact_log(store, hold, dry_run)?;
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

    Ok(())
}

/// `devices`: every device, its state, last sync, lease and documents.
pub fn list(store: &dyn ServerStore, stale_after_hours: f64) -> CliResult {
    let stale_after = (stale_after_hours * 3_600_000.0) as i64;
    let devices = ops::device_overview(store, stale_after, care_node::now_ms())?;
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

    Ok(())
}

/// `caseload add|import|remove`: a community nurse's caseload.
pub fn caseload(store: &dyn ServerStore, action: CaseloadAction) -> CliResult {
    match action {
        CaseloadAction::Add { device, nhs } => {
            let added = ops::caseload_add(store, &device, &nhs)?;
            println!("{}", if added { "added to the caseload" } else { "already on the caseload" });
        }
        CaseloadAction::Import { file } => {
            let text = crate::read_text(&file)?;
            let done = ops::caseload_import(store, &text)?;
            println!(
                "{} line(s): {} added to caseloads, {} already there",
                done.lines, done.added, done.already
            );
        }
        CaseloadAction::Remove { device, nhs } => {
            let removed = ops::caseload_remove(store, &device, &nhs)?;
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

    Ok(())
}

/// `enrol-device`: a one-time enrolment token for a named device.
pub fn enrol(
    store: &dyn ServerStore,
    name: &str,
    role: Role,
    addr: care_sync_server::operator::config::ServerAddrs,
    expires_in_hours: u64,
) -> CliResult {
    let ttl = Duration::from_secs(expires_in_hours * 3600);
    let token = ops::issue_token(store, name, role, addr.clone(), ttl)?;
    eprintln!(
        "one-time token for {name} ({}), valid for {expires_in_hours} h, server {addr}:",
        role.as_str()
    );
    println!("{token}");

    Ok(())
}
