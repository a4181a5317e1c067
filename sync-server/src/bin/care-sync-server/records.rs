//! Operator commands about patient records: feeds from files (FHIR IPS, HL7 v2 ADT), exports,
//! the list of records, and synthetic patients for trials.

use std::path::{Path, PathBuf};

use care_sync_server::ingest::hl7::adt::AdtOptions;
use care_sync_server::operator::ops;
use care_sync_server::store::ServerStore;

use crate::CliResult;

/// `ingest-adt FILE…`: HL7 v2 ADT messages from files, each answered as over MLLP.
pub fn ingest_adt(store: &dyn ServerStore, files: &[PathBuf], options: &AdtOptions) -> CliResult {
    let (mut accepted, mut refused) = (0, 0);
    let mut cache =
        care_sync_server::ingest::hl7::adt::DocCache::new(care_sync_server::ingest::hl7::adt::FEED_CACHE);
    for file in files {
        let text = crate::read_text(file)?;
        let messages = care_sync_server::ingest::hl7::adt::split_messages(&text);
        // Group commits of many messages; each outcome is printed once its group is on disk.
        for group in messages.chunks(500) {
            for ack in care_sync_server::ingest::hl7::adt::process_group(store, group, options, &mut cache) {
                println!("{}: MSH-10 {}: {} {}", file.display(), ack.control_id, ack.code, ack.text);
                if ack.code == "AA" { accepted += 1 } else { refused += 1 }
            }
        }
    }
    println!("{accepted} message(s) accepted, {refused} refused");
    if refused > 0 {
        return Err(format!("{refused} message(s) refused").into());
    }

    Ok(())
}

/// `generate`: synthetic patients into the store, or as FHIR IPS Bundles into a folder.
#[cfg(feature = "demo")]
pub fn generate(
    store: &dyn ServerStore,
    patients: usize,
    seed: u64,
    fhir_out: Option<(PathBuf, bool)>,
    records: care_sync_server::demo::population::Records,
) -> CliResult {
    use std::io::Write;
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
    )
    .with_records(records);
    let now = care_node::now_ms();
    let mut ndjson = None;
    if let Some((out, lines)) = &fhir_out {
        std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
        if *lines {
            let path = out.join("patients.ndjson");
            let file =
                std::fs::File::create(&path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            ndjson = Some((path, std::io::BufWriter::new(file)));
        }
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
            Some((out, _)) => {
                for summary in &mut summaries {
                    let bundle = care_sync_server::ingest::fhir::export::export_ips(summary, now)?;
                    match &mut ndjson {
                        Some((path, file)) => {
                            let lines = care_sync_server::ingest::fhir::bulk::ndjson_of(
                                &serde_json::to_value(&bundle)?,
                            );
                            for line in lines {
                                writeln!(file, "{line}")
                                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                            }
                        }
                        None => {
                            let path = out.join(format!("patient-{:06}.json", made + 1));
                            let text = serde_json::to_string_pretty(&bundle)?;
                            std::fs::write(&path, text)
                                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                        }
                    }
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
    if let Some((path, mut file)) = ndjson {
        file.flush().map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }

    Ok(())
}

/// `import-fhir FILE…`: FHIR patients from Bundles, NDJSON and directories, each imported whole
/// or refused whole, with progress on a terminal.
pub fn import_fhir(
    store: &dyn ServerStore,
    files: &[PathBuf],
    feed: &str,
    workers: Option<usize>,
    batch: usize,
) -> CliResult {
    use care_sync_server::ingest::fhir::bulk::{self, BulkOptions, Event};
    use std::io::IsTerminal;
    let mut options = BulkOptions { feed: feed.to_string(), batch, ..BulkOptions::default() };
    if let Some(workers) = workers {
        options.workers = workers.max(1);
    }
    let terminal = std::io::stderr().is_terminal();
    let mut shown = std::time::Instant::now();
    let mut last_line = false;
    let result = bulk::import(store, files, &options, &mut |event| match event {
        Event::Refused { at, reason } => {
            if std::mem::take(&mut last_line) {
                eprintln!();
            }
            eprintln!("{at}: refused, nothing of this patient imported: {reason}");
        }
        Event::Resumed { source, bytes, refused_then } => eprintln!(
            "{}: resuming after the {bytes} bytes an earlier run committed ({refused_then} patient(s) refused then)",
            source.display()
        ),
        Event::Progress(p) => {
            let every = if terminal {
                std::time::Duration::from_millis(250)
            } else {
                std::time::Duration::from_secs(10)
            };
            if shown.elapsed() < every {
                return;
            }
            shown = std::time::Instant::now();
            let eta = p
                .eta()
                .map_or("–".to_string(), |d| format!("{}:{:02}", d.as_secs() / 60, d.as_secs() % 60));
            let line = format!(
                "{} patients imported, {} refused; {:.1}% of {} MB; {:.0} patients/s; {} left",
                p.imported,
                p.refused,
                100.0 * p.bytes_done as f64 / p.bytes_total.max(1) as f64,
                p.bytes_total / 1_000_000,
                p.rate(),
                eta
            );
            if terminal {
                eprint!("\r{line}\x1b[K");
                last_line = true;
            } else {
                eprintln!("{line}");
            }
        }
    });
    if last_line {
        eprintln!();
    }
    let p = result?;
    println!(
        "{} patient(s) imported ({} new), {} refused, in {:.1} s ({:.0} patients/s){}",
        p.imported,
        p.created,
        p.refused,
        p.elapsed.as_secs_f64(),
        p.rate(),
        if p.bytes_resumed > 0 {
            format!("; {} bytes skipped, committed by an earlier run", p.bytes_resumed)
        } else {
            String::new()
        }
    );
    if p.refused > 0 {
        return Err(format!("{} patient(s) refused", p.refused).into());
    }

    Ok(())
}

/// `export-fhir`: one patient's record as a FHIR IPS Bundle (audited).
pub fn export_fhir(store: &dyn ServerStore, nhs: &str, out: Option<PathBuf>) -> CliResult {
    let nhs = care_node::nhs::NhsNumber::parse(nhs).map_err(|e| format!("invalid NHS number: {e}"))?;
    let id = store.patient_by_nhs(&nhs)?.ok_or("no patient with that NHS number on this server")?;
    let saved = store.load_document(&id)?.ok_or("the patient has no document")?;
    let mut summary = care_node::summary::PatientSummary::load(&saved)?;
    let bundle = care_sync_server::ingest::fhir::export::export_ips(&mut summary, care_node::now_ms())?;
    store.append_audit(
        ops::acting(),
        "export-fhir",
        Some(&id),
        "IPS bundle exported",
        care_node::now_ms(),
    )?;
    let text = serde_json::to_string_pretty(&bundle)?;
    match out {
        Some(path) => {
            std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => println!("{text}"),
    }

    Ok(())
}

/// `patients`: every record by opaque id and NHS number (or provisional, or merged).
pub fn patients(store: &dyn ServerStore, provisional: bool) -> CliResult {
    let mut shown = 0;
    for (id, nhs) in store.patient_ids()? {
        let label = match nhs {
            Some(nhs) if !provisional => nhs,
            Some(_) => continue,
            // Without an NHS number: provisional, or merged away (its number went to the
            // record that absorbed it). Merged records are not provisional any more.
            None => match store.merged_into(&id)? {
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

    Ok(())
}

/// `merge-patients`: two records of one person made one (audited; the merged one is kept).
pub fn merge(store: &dyn ServerStore, keep: &str, merge: &str, operator: &str) -> CliResult {
    let outcome = ops::merge_patients(store, keep, merge, operator)?;
    println!(
        "merged: {} entries moved, {} caseload(s) moved; the merged record is kept for the record and \
         devices purge it at their next sync",
        outcome.entries_moved, outcome.caseloads_moved
    );

    Ok(())
}

/// `backup`: a consistent copy of the store, checked.
pub fn backup(dir: &Path, out: &Path) -> CliResult {
    let report = care_sync_server::store::sqlite::backup::backup(dir, out)?;
    println!(
        "backed up {} patients and {} devices to {} ({} bytes); integrity check ok",
        report.patients,
        report.devices,
        out.display(),
        report.bytes
    );

    Ok(())
}

/// `restore`: a backup made the store (the devices resend their own changes).
pub fn restore(from: &Path, dir: &Path, force: bool) -> CliResult {
    let report = care_sync_server::store::sqlite::backup::restore(from, dir, force, ops::acting())?;
    println!(
        "restored {} patients and {} devices from {} into {}",
        report.patients,
        report.devices,
        from.display(),
        dir.display()
    );

    Ok(())
}
