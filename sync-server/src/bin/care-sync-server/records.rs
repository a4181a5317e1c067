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
    for file in files {
        let text = crate::read_text(file)?;
        for message in care_sync_server::ingest::hl7::adt::split_messages(&text) {
            let ack =
                care_sync_server::ingest::hl7::adt::process(store, &message, care_node::now_ms(), options);
            println!("{}: MSH-10 {}: {} {}", file.display(), ack.control_id, ack.code, ack.text);
            if ack.code == "AA" { accepted += 1 } else { refused += 1 }
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
pub fn generate(store: &dyn ServerStore, patients: usize, seed: u64, fhir_out: Option<PathBuf>) -> CliResult {
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

    Ok(())
}

/// `import-fhir FILE…`: FHIR IPS Bundles, each imported whole or refused whole.
pub fn import_fhir(store: &dyn ServerStore, files: &[PathBuf], feed: &str) -> CliResult {
    let (mut ok, mut failed) = (0, 0);
    for file in files {
        // Refused before reading: a file over the limit never reaches memory.
        let size = std::fs::metadata(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?.len();
        if size > care_sync_server::ingest::fhir::import::MAX_BUNDLE_BYTES as u64 {
            eprintln!(
                "{}: refused: the Bundle is too large: {size} bytes (the limit is {})",
                file.display(),
                care_sync_server::ingest::fhir::import::MAX_BUNDLE_BYTES
            );
            failed += 1;
            continue;
        }
        let text = crate::read_text(file)?;
        let result = care_sync_server::ingest::fhir::import::parse_bundle(&text).and_then(|bundle| {
            care_sync_server::ingest::fhir::import::import_bundle(store, &bundle, feed, care_node::now_ms())
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
