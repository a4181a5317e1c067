//! FHIR in and out: round trips, idempotent re-import, refusal of invalid Bundles (whole).

use care_node::summary::{
    self as s, Encounter, PatientSummary, Provenance, Section, SectionEntry, SectionState,
};
use care_sync_server::demo::population::Population;
use care_sync_server::ingest::fhir::export::export_ips;
use care_sync_server::ingest::fhir::import::{ImportError, import_bundle, parse_bundle};
use care_sync_server::store::prelude::*;
use care_sync_server::store::sqlite::SqliteStore;

const GP_BUNDLE: &str = include_str!("data/ips-gp-bundle.json");

fn store() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (SqliteStore::open(dir.path()).unwrap(), dir)
}

fn lines<T: SectionEntry + std::fmt::Debug>(summary: &mut PatientSummary, out: &mut Vec<String>) {
    for e in summary.entries::<T>().unwrap() {
        out.push(format!("{:?} {} {:?} error={}", T::SECTION, e.id, e.data, e.entered_in_error.is_some()));
    }
}

/// Everything a round trip must keep, in an order that does not depend on replica history.
fn snapshot(summary: &mut PatientSummary, with_errors: bool) -> Vec<String> {
    let mut out = vec![format!("{:?}", summary.demographics().unwrap())];
    lines::<s::Alert>(summary, &mut out);
    lines::<s::Allergy>(summary, &mut out);
    lines::<s::Medication>(summary, &mut out);
    lines::<s::Problem>(summary, &mut out);
    lines::<s::CarePlan>(summary, &mut out);
    lines::<s::Contact>(summary, &mut out);
    lines::<s::Encounter>(summary, &mut out);
    lines::<s::Report>(summary, &mut out);
    for section in [Section::Allergies, Section::Medications, Section::Problems] {
        let state = match summary.section_state(section).unwrap() {
            SectionState::NoneKnown(_) => "none-known",
            SectionState::NoInformation => "no-information",
            SectionState::Entries => "entries",
        };
        out.push(format!("{section:?} {state}"));
    }
    if !with_errors {
        out.retain(|l| !l.ends_with("error=true"));
    }
    out.sort();
    out
}

fn stored(store: &SqliteStore, id: &care_node::summary::PatientId) -> PatientSummary {
    PatientSummary::load(&store.load_document(id).unwrap().unwrap()).unwrap()
}

fn import(
    store: &SqliteStore,
    json: &str,
) -> Result<care_sync_server::ingest::fhir::import::ImportOutcome, ImportError> {
    import_bundle(store, &parse_bundle(json)?, "test feed", 1_000)
}

#[test]
fn a_gp_bundle_imports_every_resource_type() {
    let (store, _d) = store();
    let outcome = import(&store, GP_BUNDLE).unwrap();
    assert!(outcome.created);
    let mut p = stored(&store, &outcome.patient);
    let d = p.demographics().unwrap();
    assert_eq!(d.nhs_number.as_deref(), Some("9990000026"));
    assert_eq!(d.name, "Edith May Testwoman");
    assert_eq!(d.gp_practice_code.as_deref(), Some("Z81001"));
    let allergy = &p.clinical_entries::<s::Allergy>().unwrap()[0].data;
    assert_eq!(allergy.code.as_ref().unwrap().code, "764146007");
    assert_eq!(allergy.reaction.as_deref(), Some("Anaphylaxis"));
    assert_eq!(allergy.criticality.as_deref(), Some("high"));
    let meds: Vec<_> = p.clinical_entries::<s::Medication>().unwrap().into_iter().map(|m| m.data).collect();
    assert!(
        meds.iter().any(|m| m.name == "Warfarin"
            && m.code.is_some()
            && m.frequency.as_deref() == Some("once daily"))
    );
    assert!(meds.iter().any(|m| m.name.starts_with("Amoxicillin") && m.kind.as_deref() == Some("acute")));
    let alerts: Vec<_> = p.clinical_entries::<s::Alert>().unwrap().into_iter().map(|a| a.data).collect();
    let respect = alerts
        .iter()
        .find(|a| a.kind == s::alert_kind::RESPECT_DNACPR)
        .expect("Consent became a ReSPECT alert");
    assert_eq!(
        (respect.decision_date.as_deref(), respect.author.as_deref()),
        (Some("2026-03-14"), Some("Dr A Example"))
    );
    assert!(alerts.iter().any(|a| a.kind == s::alert_kind::ACCESS));
    assert_eq!(p.clinical_entries::<s::CarePlan>().unwrap().len(), 1);
    assert_eq!(p.clinical_entries::<s::Contact>().unwrap()[0].data.name, "Robert Testwoman");
    assert_eq!(p.clinical_entries::<Encounter>().unwrap()[0].data.location.as_deref(), Some("Ward 7"));
    let reports: Vec<_> = p.clinical_entries::<s::Report>().unwrap().into_iter().map(|r| r.data).collect();
    assert!(reports.iter().any(|r| r.kind == "result" && r.value.as_deref() == Some("2.4")));
    assert!(
        reports.iter().any(|r| r.kind == "report" && r.value.as_deref() == Some("Ejection fraction 35%"))
    );
    assert!(reports.iter().any(|r| r.kind == "letter" && r.title == "Discharge letter"));
    // The asthma entry was entered in error at the source: kept, but not clinical.
    let problems = p.entries::<s::Problem>().unwrap();
    assert_eq!(problems.len(), 2);
    assert_eq!(p.clinical_entries::<s::Problem>().unwrap().len(), 1);
}

#[test]
fn re_importing_the_same_bundle_never_duplicates() {
    let (store, _d) = store();
    let first = import(&store, GP_BUNDLE).unwrap();
    let before = snapshot(&mut stored(&store, &first.patient), true);
    let seq = store.max_seq().unwrap();
    let second = import(&store, GP_BUNDLE).unwrap();
    assert!(!second.created);
    assert_eq!(second.entries_written, 0);
    assert_eq!(second.patient, first.patient);
    assert_eq!(store.max_seq().unwrap(), seq, "nothing new was logged");
    assert_eq!(snapshot(&mut stored(&store, &first.patient), true), before);
    assert_eq!(store.patient_count().unwrap(), 1);
}

#[test]
fn import_export_import_is_lossless() {
    let (a, _da) = store();
    let (b, _db) = store();
    let first = import(&a, GP_BUNDLE).unwrap();
    let mut in_a = stored(&a, &first.patient);
    let exported = export_ips(&mut in_a, 2_000).unwrap();
    let again = import(&b, &exported.to_string()).unwrap();
    let mut in_b = stored(&b, &again.patient);
    assert_eq!(snapshot(&mut in_b, false), snapshot(&mut in_a, false));
    // And once more, from b: still the same.
    let (c, _dc) = store();
    let third = import(&c, &export_ips(&mut in_b, 3_000).unwrap().to_string()).unwrap();
    assert_eq!(snapshot(&mut stored(&c, &third.patient), false), snapshot(&mut in_a, false));
}

#[test]
fn the_synthetic_population_round_trips_through_fhir() {
    let (store, _d) = store();
    let mut population = Population::new(11, automerge::ActorId::from(&[7u8; 16][..]));
    for _ in 0..60 {
        let mut original = population.next_patient(5_000).unwrap();
        // A crew attendance with vitals and NEWS2, as a device records it.
        original.set_actor(&[9; 32]);
        let mut attendance = Encounter::new(
            "attendance",
            "finished",
            Provenance::new("ab12", "ambulance-1", "ambulance-crew", 6_000),
        );
        let observations = care_node::news2::Observations {
            respiration_rate: Some(22),
            spo2: Some(93),
            spo2_scale_2: false,
            on_oxygen: true,
            systolic_bp: Some(105),
            pulse: Some(112),
            consciousness: Some(care_node::news2::Consciousness::Alert),
            temperature_c: Some(38.4),
            pregnant: false,
        };
        attendance.vitals = Some(observations.to_vitals(&care_node::news2::assess(&observations, Some(70))));
        original.add(&attendance).unwrap();
        let bundle = export_ips(&mut original, 7_000).unwrap();
        let outcome = import(&store, &bundle.to_string()).unwrap();
        let mut imported = stored(&store, &outcome.patient);
        assert_eq!(snapshot(&mut imported, false), snapshot(&mut original, false));
    }
}

/// A document with a GP record and four crew attendances: a complete adult set, a partial set
/// (no temperature), a child's and a pregnant woman's (neither scored), with an ADT-style visit
/// number on one.
fn with_attendances() -> PatientSummary {
    let (store, _d) = store();
    let first = import(&store, GP_BUNDLE).unwrap();
    let mut doc = stored(&store, &first.patient);
    doc.set_actor(&[9; 32]);
    let full = care_node::news2::Observations {
        respiration_rate: Some(22),
        spo2: Some(93),
        spo2_scale_2: true,
        on_oxygen: true,
        systolic_bp: Some(105),
        pulse: Some(112),
        consciousness: Some(care_node::news2::Consciousness::Voice),
        temperature_c: Some(38.4),
        pregnant: false,
    };
    let partial = care_node::news2::Observations { temperature_c: None, ..full };
    let pregnant = care_node::news2::Observations { pregnant: true, ..full };
    let sets = [(full, Some(70)), (partial, Some(30)), (full, Some(6)), (pregnant, Some(30))];
    for (i, (obs, age)) in sets.into_iter().enumerate() {
        let mut attendance = Encounter::new(
            "attendance",
            "finished",
            Provenance::new("ab12", "ambulance-1", "ambulance-crew", 6_000 + i as i64),
        );
        attendance.start = Some(format!("2026-07-01T10:5{i}:00Z"));
        attendance.visit = (i == 0).then(|| "V100".to_string());
        attendance.vitals = Some(obs.to_vitals(&care_node::news2::assess(&obs, age)));
        doc.add(&attendance).unwrap();
    }
    doc
}

#[test]
fn crew_vitals_leave_as_vital_sign_observations_and_come_back_losslessly() {
    let mut original = with_attendances();
    let bundle = export_ips(&mut original, 7_000).unwrap();
    let resources: Vec<&serde_json::Value> =
        bundle["entry"].as_array().unwrap().iter().map(|e| &e["resource"]).collect();
    assert!(
        !bundle.to_string().contains(care_sync_server::ingest::fhir::VITALS_EXT),
        "no care-sync extension"
    );
    let observations: Vec<_> = resources
        .iter()
        .filter(|r| r["resourceType"] == "Observation" && r["encounter"].is_object())
        .collect();
    let coded = |system: &str, code: &str| {
        observations
            .iter()
            .filter(|o| {
                o["code"]["coding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["system"] == system && c["code"] == code)
            })
            .collect::<Vec<_>>()
    };
    for (code, unit) in [("9279-1", "/min"), ("59408-5", "%"), ("8480-6", "mm[Hg]"), ("8867-4", "/min")] {
        let found = coded(s::LOINC, code);
        assert_eq!(found.len(), 4, "{code} once per attendance");
        assert!(found.iter().all(|o| o["category"][0]["coding"][0]["code"] == "vital-signs"), "{code}");
        assert!(found.iter().all(|o| o["valueQuantity"]["system"] == "http://unitsofmeasure.org"
            && o["valueQuantity"]["code"] == unit));
    }
    assert_eq!(coded(s::LOINC, "8310-5").len(), 3, "no temperature for the partial set");
    assert_eq!(coded(s::SNOMED, "1104441000000107").len(), 4, "ACVPU");
    assert_eq!(coded(s::LOINC, "82810-3").len(), 1, "pregnancy status");
    let news2 = coded(s::SNOMED, "1104051000000101");
    assert_eq!(news2.len(), 4);
    assert_eq!(
        news2.iter().filter(|o| o["valueQuantity"]["code"] == "{score}").count(),
        1,
        "only the adult's is scored"
    );
    let absent: Vec<String> = news2
        .iter()
        .filter_map(|o| o["dataAbsentReason"]["coding"].as_array())
        .map(|c| format!("{}/{}", c[0]["code"].as_str().unwrap(), c[1]["code"].as_str().unwrap()))
        .collect();
    assert_eq!(absent, ["not-performed/incomplete", "not-applicable/under-16", "not-applicable/pregnancy"]);
    // Every Observation points at an Encounter of the Bundle, and sits in the Vital Signs section.
    let urls: std::collections::HashSet<&str> =
        bundle["entry"].as_array().unwrap().iter().filter_map(|e| e["fullUrl"].as_str()).collect();
    assert!(observations.iter().all(|o| urls.contains(o["encounter"]["reference"].as_str().unwrap())));
    let vitals_section = resources[0]["section"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["code"]["coding"][0]["code"] == "8716-3")
        .expect("Vital Signs section");
    assert_eq!(vitals_section["entry"].as_array().unwrap().len(), observations.len());
    // The encounter keeps its visit number as an identifier.
    assert!(resources.iter().any(|r| {
        r["resourceType"] == "Encounter"
            && r["identifier"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["system"] == care_sync_server::ingest::fhir::VISIT_SYSTEM && i["value"] == "V100")
    }));

    // Back: the same vitals, visit numbers and everything else, in a store of its own.
    let (b, _db) = store();
    let again = import(&b, &bundle.to_string()).unwrap();
    let mut imported = stored(&b, &again.patient);
    assert_eq!(snapshot(&mut imported, false), snapshot(&mut original, false));
    let vitals: Vec<_> =
        imported.entries::<Encounter>().unwrap().into_iter().filter_map(|e| e.data.vitals).collect();
    assert_eq!(vitals.len(), 4);
    assert!(vitals.iter().all(|v| v.spo2_scale == 2 && v.on_oxygen));
    let withheld: Vec<_> = vitals.iter().map(|v| v.news2_withheld.as_deref()).collect();
    assert_eq!(withheld, [None, Some("incomplete"), Some("under-16"), Some("pregnancy")]);
    assert_eq!(
        imported.entries::<s::Report>().unwrap().len(),
        original.entries::<s::Report>().unwrap().len(),
        "the vital signs were folded into their encounters, not added as results"
    );
}

#[test]
fn only_current_readings_of_one_time_fold_into_an_encounter() {
    let mut original = with_attendances();
    let mut bundle = export_ips(&mut original, 7_000).unwrap();
    // Mark the first attendance's pulse entered-in-error, and move its temperature to another time.
    let entries = bundle["entry"].as_array_mut().unwrap();
    let first_encounter = entries
        .iter()
        .find(|e| {
            e["resource"]["resourceType"] == "Encounter"
                && e["resource"]["identifier"].to_string().contains("V100")
        })
        .map(|e| e["fullUrl"].as_str().unwrap().to_string())
        .unwrap();
    for e in entries.iter_mut() {
        let r = &mut e["resource"];
        if r["encounter"]["reference"] != first_encounter.as_str() {
            continue;
        }
        match r["code"]["coding"][0]["code"].as_str() {
            Some("8867-4") => r["status"] = "entered-in-error".into(),
            Some("8310-5") => r["effectiveDateTime"] = "2026-07-02T09:00:00Z".into(),
            _ => {}
        }
    }
    let (b, _db) = store();
    let again = import(&b, &bundle.to_string()).unwrap();
    let mut imported = stored(&b, &again.patient);
    let first = imported
        .entries::<Encounter>()
        .unwrap()
        .into_iter()
        .find(|e| e.data.visit.as_deref() == Some("V100"))
        .and_then(|e| e.data.vitals)
        .unwrap();
    assert_eq!((first.pulse, first.temperature_c), (None, None), "{first:?}");
    assert_eq!(first.respiration_rate, Some(22));
    // Shown as recorded, with the warning that the set is now incomplete.
    assert!(care_node::summary::vitals_line(&first).contains("do not rely on it"));
}

/// The exported Bundle, with vital signs, passes the R4B models of `fhir.resources` (installed
/// by `.ci/test`), resource by resource, with the LOINC codes of the vital-signs profile.
#[test]
fn an_ips_with_vital_signs_validates_against_the_fhir_r4b_models() {
    let bundle = export_ips(&mut with_attendances(), 7_000).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ips.json");
    std::fs::write(&path, bundle.to_string()).unwrap();
    let python = std::env::var("CARE_SYNC_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fhir_validate.py");
    let out = std::process::Command::new(&python).arg(script).arg(&path).output().expect("python runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}\n(.ci/test installs fhir.resources and sets CARE_SYNC_PYTHON)");
    assert!(text.contains("vital-sign observations: 32"), "{text}");
}

#[test]
fn entered_in_error_entries_are_left_out_of_the_ips() {
    let (store, _d) = store();
    let outcome = import(&store, GP_BUNDLE).unwrap();
    let mut p = stored(&store, &outcome.patient);
    let text = export_ips(&mut p, 0).unwrap().to_string();
    assert!(!text.contains("wrong patient"), "the entered-in-error condition is not exported");
    assert!(text.contains("Heart failure"));
    assert!(text.contains("\"type\":\"document\""));
    assert!(text.contains("60591-5"));
    for loinc in ["10160-0", "48765-2", "11450-4"] {
        assert!(text.contains(loinc), "required section {loinc}");
    }
}

#[test]
fn empty_required_sections_say_none_known_or_no_information() {
    let (store, _d) = store();
    let bundle = r#"{"resourceType":"Bundle","type":"collection","entry":[
        {"resource":{"resourceType":"Patient","id":"p","identifier":[{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9990000034"}],"name":[{"text":"Nora Example"}]}},
        {"resource":{"resourceType":"AllergyIntolerance","code":{"coding":[{"system":"http://hl7.org/fhir/uv/ips/CodeSystem/absent-unknown-uv-ips","code":"no-known-allergies"}]},"patient":{"reference":"Patient/p"}}}]}"#;
    let outcome = import(&store, bundle).unwrap();
    let mut p = stored(&store, &outcome.patient);
    assert!(matches!(p.section_state(Section::Allergies).unwrap(), SectionState::NoneKnown(_)));
    assert_eq!(p.section_state(Section::Medications).unwrap(), SectionState::NoInformation);
    let text = export_ips(&mut p, 0).unwrap().to_string();
    assert!(text.contains("no-known-allergies"));
    assert!(text.contains("no-medication-info"));
    assert!(text.contains("no-problem-info"));
}

fn with_extra_entry(resource: &str) -> String {
    let mut bundle: serde_json::Value = serde_json::from_str(GP_BUNDLE).unwrap();
    let extra: serde_json::Value = serde_json::from_str(resource).unwrap();
    bundle["entry"].as_array_mut().unwrap().push(serde_json::json!({ "resource": extra }));
    bundle.to_string()
}

#[test]
fn invalid_bundles_are_refused_whole_with_the_resource_and_field_named() {
    let (store, _d) = store();
    let cases = [
        (
            r#"{"resourceType":"Condition","id":"c9","subject":{"reference":"Patient/pat-1"}}"#,
            "(Condition)",
            "code is required",
        ),
        (r#"{"resourceType":"Condition","id":"c8","code":{"text":"x"}}"#, "(Condition)", "subject"),
        (
            r#"{"resourceType":"Observation","id":"o9","status":"final","code":{"text":"x"},"valueString":5}"#,
            "(Observation)",
            "valueString",
        ),
        (r#"{"resourceType":"Goal","id":"g1"}"#, "(Goal)", "not supported"),
        (
            r#"{"resourceType":"AllergyIntolerance","id":"a9","criticality":"extreme","code":{"text":"x"},"patient":{"reference":"Patient/pat-1"}}"#,
            "(AllergyIntolerance)",
            "criticality",
        ),
        (
            r#"{"resourceType":"MedicationStatement","id":"m9","status":"active","medicationReference":{"reference":"Medication/nope"},"subject":{"reference":"Patient/pat-1"}}"#,
            "(MedicationStatement)",
            "does not resolve",
        ),
    ];
    for (resource, name, field) in cases {
        let err = import(&store, &with_extra_entry(resource)).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains(field), "`{err}` should name {name} and {field}");
        assert!(!err.contains("/c") && !err.contains("/o9") && !err.contains("/m9"), "no resource id: {err}");
        assert_eq!(store.patient_count().unwrap(), 0, "nothing of a refused bundle is stored");
    }
    // A bad NHS number and a wrongly typed birth date.
    let bad_nhs = GP_BUNDLE.replace("9990000026", "9990000027");
    let err = import(&store, &bad_nhs).unwrap_err().to_string();
    assert!(
        err.contains("(Patient)")
            && err.contains("NHS number")
            && !err.contains("9990000027")
            && !err.contains("pat-1"),
        "{err}"
    );
    let bad_date = GP_BUNDLE.replace("\"1930-05-17\"", "19300517");
    let err = import(&store, &bad_date).unwrap_err().to_string();
    assert!(err.contains("(Patient)") && err.contains("birthDate") && !err.contains("19300517"), "{err}");
    assert_eq!(store.patient_count().unwrap(), 0);

    // Too many entries, or too many bytes: refused before anything is parsed into resources.
    let many: Vec<String> = (0..care_sync_server::ingest::fhir::import::MAX_BUNDLE_ENTRIES + 1)
        .map(|i| format!(r#"{{"resource":{{"resourceType":"Condition","id":"x{i}"}}}}"#))
        .collect();
    let huge = format!(r#"{{"resourceType":"Bundle","type":"collection","entry":[{}]}}"#, many.join(","));
    let err = parse_bundle(&huge).unwrap_err().to_string();
    assert!(err.contains("too large") && err.contains("entries"), "{err}");
    let padded =
        format!("{}{}", " ".repeat(care_sync_server::ingest::fhir::import::MAX_BUNDLE_BYTES), GP_BUNDLE);
    assert!(parse_bundle(&padded).unwrap_err().to_string().contains("bytes"));
    let garbled =
        parse_bundle(r#"{"resourceType": "Bundle", "entry": [ "SECRET-VALUE" ] "#).unwrap_err().to_string();
    assert!(!garbled.contains("SECRET"), "{garbled}");

    // For a patient that exists, a refused bundle changes nothing at all.
    let first = import(&store, GP_BUNDLE).unwrap();
    let before = snapshot(&mut stored(&store, &first.patient), true);
    let mut changed: serde_json::Value = serde_json::from_str(&with_extra_entry(
        r#"{"resourceType":"Condition","id":"c10","subject":{"reference":"Patient/pat-1"}}"#,
    ))
    .unwrap();
    changed["entry"][1]["resource"]["onsetDateTime"] = serde_json::json!("2001-01-01");
    assert!(import(&store, &changed.to_string()).is_err());
    assert_eq!(snapshot(&mut stored(&store, &first.patient), true), before);
    assert!(matches!(import(&store, "{\"resourceType\":\"Patient\"}"), Err(ImportError::NotABundle(_))));
    assert!(matches!(import(&store, "not json"), Err(ImportError::NotABundle(_))));
}

#[test]
fn a_patient_without_an_nhs_number_gets_a_provisional_record() {
    let (store, _d) = store();
    let bundle = r#"{"resourceType":"Bundle","type":"collection","entry":[
        {"resource":{"resourceType":"Patient","id":"unknown-1","name":[{"text":"Unknown male, approx 60"}],"gender":"male"}}]}"#;
    let outcome = import(&store, bundle).unwrap();
    let p = stored(&store, &outcome.patient);
    assert!(p.demographics().unwrap().nhs_number.is_none());
    // Its export carries the provisional id, so re-importing the export updates the same record.
    let mut p = p;
    let exported = export_ips(&mut p, 0).unwrap().to_string();
    let again = import(&store, &exported).unwrap();
    assert_eq!(again.patient, outcome.patient);
    assert_eq!(store.patient_count().unwrap(), 1);
}

/// Patients of the realistic population as their IPS Bundles (JSON values).
fn realistic_bundles(seed: u64, n: usize) -> (Vec<PatientSummary>, Vec<serde_json::Value>) {
    use care_sync_server::demo::population::Records;
    let mut population =
        Population::new(seed, automerge::ActorId::from(&[7u8; 16][..])).with_records(Records::Realistic);
    let mut originals = Vec::new();
    let mut bundles = Vec::new();
    for _ in 0..n {
        let mut original = population.next_patient(5_000).unwrap();
        bundles.push(serde_json::to_value(export_ips(&mut original, 7_000).unwrap()).unwrap());
        originals.push(original);
    }
    (originals, bundles)
}

fn bulk_import(
    store: &SqliteStore,
    paths: &[std::path::PathBuf],
) -> (care_sync_server::ingest::fhir::bulk::Progress, Vec<(String, String)>, usize) {
    use care_sync_server::ingest::fhir::bulk::{self, BulkOptions, Event};
    let options = BulkOptions { feed: "bulk test".into(), workers: 2, batch: 3 };
    let (mut refused, mut resumed) = (Vec::new(), 0);
    let progress = bulk::import(store, paths, &options, &mut |event| match event {
        Event::Refused { at, reason } => refused.push((at.to_string(), reason.to_string())),
        Event::Resumed { .. } => resumed += 1,
        Event::Progress(_) => {}
    })
    .unwrap();
    (progress, refused, resumed)
}

#[test]
fn a_bulk_import_reads_ndjson_and_bundles_in_directories_and_each_patient_is_its_bundle() {
    use care_sync_server::ingest::fhir::bulk::ndjson_of;
    let (store, _d) = store();
    let input = tempfile::tempdir().unwrap();
    let (mut originals, bundles) = realistic_bundles(23, 9);
    // Six patients in one NDJSON file, three as Bundle files, in nested directories.
    std::fs::create_dir_all(input.path().join("gp/ndjson")).unwrap();
    std::fs::create_dir_all(input.path().join("hospital")).unwrap();
    let lines: Vec<String> = bundles[..6].iter().flat_map(ndjson_of).collect();
    std::fs::write(input.path().join("gp/ndjson/export.ndjson"), lines.join("\n") + "\n").unwrap();
    for (i, bundle) in bundles[6..].iter().enumerate() {
        std::fs::write(input.path().join(format!("hospital/patient-{i}.json")), bundle.to_string()).unwrap();
    }
    std::fs::write(input.path().join("hospital/README.txt"), "not FHIR, not read").unwrap();

    let (progress, refused, resumed) = bulk_import(&store, &[input.path().to_path_buf()]);
    assert_eq!(refused, Vec::<(String, String)>::new());
    assert_eq!((progress.imported, progress.created, progress.refused, resumed), (9, 9, 0, 0));
    assert_eq!(progress.bytes_done, progress.bytes_total);
    assert_eq!(store.patient_count().unwrap(), 9);
    for original in &mut originals {
        let id = store.patient_by_nhs(&original.nhs_number().unwrap()).unwrap().expect("imported");
        assert_eq!(snapshot(&mut stored(&store, &id), false), snapshot(original, false));
    }

    // Run again: every source is resumed after what was committed, nothing is imported twice.
    let (again, refused, resumed) = bulk_import(&store, &[input.path().to_path_buf()]);
    assert!(refused.is_empty());
    assert_eq!((again.imported, again.created, resumed), (0, 0, 4));
    assert_eq!(store.patient_count().unwrap(), 9);
}

#[test]
fn ndjson_refusals_name_the_line_refuse_only_that_patient_and_quote_nothing() {
    use care_sync_server::ingest::fhir::bulk::ndjson_of;
    let (store, _d) = store();
    let (mut originals, bundles) = realistic_bundles(29, 4);
    let mut patients: Vec<Vec<String>> = bundles.iter().map(ndjson_of).collect();
    // Patient 1's third line is broken; patient 2 has a resource about someone else.
    patients[1][2] = r#"{"resourceType": "Condition", "subject": {"reference": "Patient/x"#.to_string();
    let other = patients[2].iter().position(|l| l.contains(r#""subject""#)).unwrap();
    let mut moved: serde_json::Value = serde_json::from_str(&patients[2][other]).unwrap();
    moved["subject"]["reference"] = "Patient/someone-else".into();
    patients[2][other] = moved.to_string();
    // A resource before any Patient, on line 1.
    let orphan = patients[0][1].clone();
    let mut lines = vec![orphan];
    let mut first_line = Vec::new();
    for p in &patients {
        first_line.push(lines.len() + 1);
        lines.extend(p.iter().cloned());
    }
    let input = tempfile::tempdir().unwrap();
    let file = input.path().join("export.ndjson");
    std::fs::write(&file, lines.join("\n")).unwrap();

    let (progress, refused, _) = bulk_import(&store, std::slice::from_ref(&file));
    let at: Vec<&str> = refused.iter().map(|(at, _)| at.rsplit(':').next().unwrap()).collect();
    let broken = (first_line[1] + 2).to_string();
    let misfiled = (first_line[2] + other).to_string();
    assert_eq!(at, ["1", broken.as_str(), misfiled.as_str()], "{refused:?}");
    assert!(refused[0].1.contains("before any Patient"), "{}", refused[0].1);
    assert!(refused[1].1.contains("not JSON"), "{}", refused[1].1);
    assert!(refused[2].1.contains("subject"), "{}", refused[2].1);
    for (_, reason) in &refused {
        for original in &mut originals {
            let name = original.demographics().unwrap().name;
            assert!(!reason.contains(&name) && !reason.contains("someone-else"), "{reason}");
        }
    }
    assert_eq!((progress.imported, progress.refused), (2, 3));
    for i in [0, 3] {
        let nhs = originals[i].nhs_number().unwrap();
        assert!(store.patient_by_nhs(&nhs).unwrap().is_some(), "patient {i} imported");
    }
    for i in [1, 2] {
        let nhs = originals[i].nhs_number().unwrap();
        assert!(store.patient_by_nhs(&nhs).unwrap().is_none(), "patient {i} refused whole");
    }
}

#[test]
fn two_bundles_of_one_person_in_one_import_make_one_record_with_both() {
    use care_sync_server::ingest::fhir::bulk::ndjson_of;
    let (store, _d) = store();
    let (mut originals, bundles) = realistic_bundles(31, 1);
    // The same person twice in a row (prepared at once by two workers), the second time with
    // one condition more.
    let first = ndjson_of(&bundles[0]);
    let mut second = first.clone();
    let mut extra: serde_json::Value =
        serde_json::from_str(second.iter().find(|l| l.contains(r#""resourceType":"Condition""#)).unwrap())
            .unwrap();
    extra["id"] = "an-extra-condition".into();
    extra["identifier"] = serde_json::json!([{ "system": "https://gp.example/id", "value": "extra-1" }]);
    extra["code"]["text"] = "Asthma".into();
    second.push(extra.to_string());
    let input = tempfile::tempdir().unwrap();
    let file = input.path().join("twice.ndjson");
    std::fs::write(&file, [first, second].concat().join("\n")).unwrap();

    let (progress, refused, _) = bulk_import(&store, &[file]);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!((progress.imported, progress.created), (2, 1));
    assert_eq!(store.patient_count().unwrap(), 1);
    let id = store.patient_by_nhs(&originals[0].nhs_number().unwrap()).unwrap().unwrap();
    let problems = stored(&store, &id).clinical_entries::<s::Problem>().unwrap().len();
    assert_eq!(problems, originals[0].clinical_entries::<s::Problem>().unwrap().len() + 1);
}

/// Two files with news of one stored patient, imported by parallel workers in one run: both
/// are applied (the second is prepared from the record as the first left it, never from a copy
/// read before the first was written).
#[test]
fn two_files_about_one_stored_patient_imported_in_parallel_both_apply() {
    let (store, _d) = store();
    let input = tempfile::tempdir().unwrap();
    let (_, bundles) = realistic_bundles(31, 1);
    let full = &bundles[0];
    let entries = full["entry"].as_array().unwrap();
    let n = entries.len();
    // The two entries each file adds are the last two, neither of them the Patient.
    assert!(n > 3 && entries[n - 2..].iter().all(|e| e["resource"]["resourceType"] != "Patient"));
    let with = |keep: &[usize]| {
        let mut b = full.clone();
        b["entry"] = keep.iter().map(|i| entries[*i].clone()).collect::<Vec<_>>().into();
        b
    };
    let base: Vec<usize> = (0..n - 2).collect();
    std::fs::write(input.path().join("base.json"), with(&base).to_string()).unwrap();
    let (first, refused, _) = bulk_import(&store, &[input.path().join("base.json")]);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(first.created, 1);
    let news = tempfile::tempdir().unwrap();
    for (file, extra) in [("one.json", n - 2), ("two.json", n - 1)] {
        let keep: Vec<usize> = base.iter().copied().chain([extra]).collect();
        std::fs::write(news.path().join(file), with(&keep).to_string()).unwrap();
    }
    let (progress, refused, _) = bulk_import(&store, &[news.path().to_path_buf()]);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!((progress.imported, progress.created, progress.refused), (2, 0, 0));
    // The stored record is the full bundle's: what each file added is there.
    std::fs::write(input.path().join("full.json"), full.to_string()).unwrap();
    let id = store.patient_ids().unwrap()[0].0;
    let held = snapshot(&mut stored(&store, &id), false);
    let (again, _, _) = bulk_import(&store, &[input.path().join("full.json")]);
    assert_eq!(again.imported, 1);
    assert_eq!(snapshot(&mut stored(&store, &id), false), held, "the full bundle adds nothing more");
}
