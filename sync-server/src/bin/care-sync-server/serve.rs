//! `care-sync-server serve`: the QUIC sync server, the MLLP listener and the admin console,
//! configured by one [`Config`].

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use care_sync_server::operator::admin::{self, AdminOptions};
use care_sync_server::operator::config::Config;

use crate::CliResult;

/// Where `serve` records the address devices reach it on, for `enrol-device` to put in tokens.
pub fn advertised_addr_file(dir: &Path) -> PathBuf {
    dir.join("advertised-addr")
}

pub async fn serve(config: Config) -> CliResult {
    let dir = &config.data_dir;
    let store = crate::open(&config)?;
    for (setting, applied) in config.apply_policy(store.as_ref())? {
        use care_sync_server::domain::settings::Applied;
        match applied {
            Applied::FromFile { value, replaced: None } => {
                tracing::info!(setting = setting.name(), %value, "policy setting taken from the configuration file")
            }
            Applied::FromFile { value, replaced: Some(old) } => tracing::warn!(
                setting = setting.name(),
                %value,
                replaced = %old,
                "the configuration file's value changed and replaces the one an operator set"
            ),
            Applied::OperatorKept { operator, file } => tracing::info!(
                setting = setting.name(),
                value = %operator,
                file = %file,
                "an operator's setting stands (the configuration file's value has not changed since it was applied)"
            ),
        }
    }
    let running =
        care_sync_server::transport::start_with(store.clone(), config.sync.listen, config.limits).await?;
    let advertised = config.sync.advertised_addr.clone().unwrap_or_else(|| running.addr.into());
    // On PostgreSQL the data directory holds only this instance's files (the operator token,
    // the advertised address), private to the server's user as a SQLite store's is.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create the data directory {}: {e}", dir.display()))?;
    std::fs::write(advertised_addr_file(dir), advertised.to_string())?;
    let kept = match &config.store.url {
        Some(url) => format!("store {}", care_sync_server::store::redact_url(url)),
        None => format!("data in {}", dir.display()),
    };
    println!("care-sync server: QUIC sync on {} (devices are told {advertised}); {kept}", running.addr);
    let mllp = if config.feeds.mllp_enabled {
        let mllp = care_sync_server::ingest::hl7::mllp::start_with(
            store.clone(),
            config.feeds.mllp_listen,
            config.feeds.mllp_options(),
        )
        .await
        .map_err(|e| format!("cannot listen for MLLP on {}: {e}", config.feeds.mllp_listen))?;
        println!("HL7 v2 ADT over MLLP on {}", mllp.addr);
        Some(mllp)
    } else {
        None
    };
    let compaction = config.compaction.every().map(|every| {
        println!(
            "change log compacted every {:.0} h (hold {:.0} days)",
            every.as_secs_f64() / 3600.0,
            config.compaction.hold_days
        );
        tokio::spawn(compact_every(store.clone(), every, config.compaction.hold()))
    });
    let console = if config.admin.enabled {
        let token_file = config.token_file();
        let (token, created) = admin::load_or_create_token(&token_file)?;
        if created {
            println!(
                "created the operator token in {} (`care-sync-server admin-token` prints it)",
                token_file.display()
            );
        }
        let options = AdminOptions {
            listen: config.admin.listen,
            token,
            stale_after_ms: (config.admin.stale_after_hours * 3_600_000.0) as i64,
            sync_addr: advertised,
        };
        let console = admin::start(store, options).await?;
        println!("operators' console on http://{}/ (metrics at /metrics)", console.addr);
        Some(console)
    } else {
        None
    };
    shutdown_signal().await?;
    println!("shutting down");
    if let Some(compaction) = compaction {
        compaction.abort();
    }
    if let Some(console) = console {
        console.stop();
    }
    if let Some(mllp) = mllp {
        mllp.stop();
    }
    running.shutdown().await;
    Ok(())
}

/// Compacts the change log every `every`, the first time one period after start, on the
/// blocking pool (in steps of its own transactions, so syncs and feeds wait for a step at most).
async fn compact_every(
    store: std::sync::Arc<dyn care_sync_server::store::ServerStore>,
    every: std::time::Duration,
    hold: std::time::Duration,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let store = store.clone();
        let run = tokio::task::spawn_blocking(move || {
            care_sync_server::operator::ops::compact_log_by(
                store.as_ref(),
                hold,
                false,
                "compaction-schedule",
            )
        });
        match run.await {
            Ok(Ok(done)) => tracing::debug!(
                horizon = done.horizon,
                entries = done.dropped.entries,
                "scheduled compaction"
            ),
            Ok(Err(e)) => tracing::error!(error = %e, "the scheduled compaction of the change log failed"),
            Err(e) => tracing::error!(error = %e, "the scheduled compaction of the change log panicked"),
        }
    }
}

/// Ctrl-C, or SIGTERM from systemd.
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await
}
