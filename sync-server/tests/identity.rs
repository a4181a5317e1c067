//! Patient identity: provisional records, and merging two records of one person — an explicit,
//! audited operator action, never automatic.

use care_node::summary::{self as s, PatientSummary};
use care_sync_server::ingest::fhir::import::{import_bundle, parse_bundle};
use care_sync_server::operator::ops;
use care_sync_server::store::prelude::*;
use care_sync_server::store::sqlite::SqliteStore;
use care_sync_server::store::{Role, StoreError};

fn bundle(patient: &str, extra: &str) -> String {
    format!(r#"{{"resourceType":"Bundle","type":"collection","entry":[{{"resource":{patient}}}{extra}]}}"#)
}

const KNOWN: &str = r#"{"resourceType":"Patient","id":"k","identifier":[{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9990000069"}],"name":[{"text":"Known Person"}],"birthDate":"1950-01-01"}"#;
const UNKNOWN: &str = r#"{"resourceType":"Patient","id":"u","name":[{"text":"Unknown female"}]}"#;
const ALLERGY: &str = r#",{"resource":{"resourceType":"AllergyIntolerance","id":"a1","code":{"text":"Latex"},"patient":{"reference":"Patient/u"}}}"#;
const CONDITION: &str = r#",{"resource":{"resourceType":"Condition","id":"c1","code":{"text":"Heart failure"},"subject":{"reference":"Patient/k"}}}"#;

fn setup() -> (SqliteStore, tempfile::TempDir, s::PatientId, s::PatientId) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let known =
        import_bundle(&store, &parse_bundle(&bundle(KNOWN, CONDITION)).unwrap(), "gp", 1).unwrap().patient;
    let unknown =
        import_bundle(&store, &parse_bundle(&bundle(UNKNOWN, ALLERGY)).unwrap(), "ed", 1).unwrap().patient;
    (store, dir, known, unknown)
}

fn load(store: &SqliteStore, id: &s::PatientId) -> PatientSummary {
    PatientSummary::load(&store.load_document(id).unwrap().unwrap()).unwrap()
}

#[test]
fn an_operator_merges_a_provisional_record_into_the_known_one() {
    let (store, _d, known, unknown) = setup();
    store.create_enrolment("nurse-1", Role::CommunityNurse, [1; 32], i64::MAX).unwrap();
    let nurse = store.redeem_enrolment([1; 32], [8; 32], 0).unwrap();
    store.caseload_add(nurse.id, &unknown).unwrap();

    let outcome = ops::merge_patients(&store, "999 000 0069", &unknown.to_string(), "dr-ops").unwrap();
    assert_eq!(outcome.caseloads_moved, 1);
    let mut kept = load(&store, &known);
    let allergies = kept.clinical_entries::<s::Allergy>().unwrap();
    assert_eq!(allergies[0].data.substance, "Latex", "the provisional record's facts moved over");
    assert_eq!(kept.clinical_entries::<s::Problem>().unwrap().len(), 1);
    let gone = load(&store, &unknown);
    assert_eq!(gone.merged_into().unwrap(), Some(known), "the merged record is kept, pointing at the other");
    let scope = care_sync_server::session::scope::device_scope(&store, nurse.id, 0).unwrap();
    assert_eq!(scope.patients, vec![known], "the nurse now has the kept record only");
    let filter = care_sync_server::store::AuditFilter { patient: Some(known), ..Default::default() };
    let audit = store.audit_entries(&filter).unwrap();
    assert!(audit.iter().any(|a| a.action == "merge-patients" && a.actor == "dr-ops"));

    // Merging again is refused (and not audited again); merging into itself is refused.
    let audited = store.audit_entries(&Default::default()).unwrap().len();
    let again = ops::merge_patients(&store, "9990000069", &unknown.to_string(), "dr-ops").unwrap_err();
    assert!(again.to_string().contains("already merged"), "{again}");
    assert_eq!(store.audit_entries(&Default::default()).unwrap().len(), audited);
    assert!(ops::merge_patients(&store, "9990000069", "9990000069", "dr-ops").is_err());
}

#[test]
fn records_with_different_nhs_numbers_are_never_merged() {
    let (store, _d, _known, _unknown) = setup();
    let other = KNOWN.replace("9990000069", "9990000018").replace("Known Person", "Other Person");
    import_bundle(&store, &parse_bundle(&bundle(&other, "")).unwrap(), "gp", 1).unwrap();
    let err = ops::merge_patients(&store, "9990000069", "9990000018", "dr-ops").unwrap_err();
    assert!(err.to_string().contains("different NHS numbers"), "{err}");
}

#[test]
fn a_second_record_with_a_known_nhs_number_is_refused_not_merged_automatically() {
    let (store, _d, _known, unknown) = setup();
    // The emergency department learns the unknown patient's NHS number, which another record has.
    let update = format!(
        r#"{{"resourceType":"Patient","id":"u","identifier":[{{"system":"https://care-sync.example/fhir/id/patient","value":"{unknown}"}}],"name":[{{"text":"Unknown female"}}]}}"#
    );
    // Same record, no NHS number yet: an update.
    import_bundle(&store, &parse_bundle(&bundle(&update, "")).unwrap(), "ed", 2).unwrap();
    assert_eq!(store.patient_count().unwrap(), 2);
    // Through the feed: the same record, now with the NHS number the known record has.
    let learnt = update.replace(
        r#""identifier":["#,
        r#""identifier":[{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9990000069"},"#,
    );
    assert_ne!(learnt, update);
    let err = import_bundle(&store, &parse_bundle(&bundle(&learnt, "")).unwrap(), "ed", 3).unwrap_err();
    assert!(err.to_string().contains("merge-patients"), "{err}");
    assert_eq!(store.patient_count().unwrap(), 2, "no record made, none merged");
    assert!(load(&store, &unknown).demographics().unwrap().nhs_number.is_none(), "nor the number taken");
    // The operator merges them as told; the feed's retry then updates the kept record.
    ops::merge_patients(&store, "9990000069", &unknown.to_string(), "dr-ops").unwrap();
    let retry = bundle(
        &learnt,
        r#",{"resource":{"resourceType":"AllergyIntolerance","id":"a2","code":{"text":"Nuts"},"patient":{"reference":"Patient/u"}}}"#,
    );
    let outcome = import_bundle(&store, &parse_bundle(&retry).unwrap(), "ed", 4).unwrap();
    let known =
        store.patient_by_nhs(&care_node::nhs::NhsNumber::parse("9990000069").unwrap()).unwrap().unwrap();
    assert_eq!(outcome.patient, known, "the retry lands on the kept record");
    let kept: Vec<String> = load(&store, &known)
        .clinical_entries::<s::Allergy>()
        .unwrap()
        .into_iter()
        .map(|a| a.data.substance)
        .collect();
    assert!(kept.contains(&"Nuts".to_string()), "{kept:?}");
    assert_eq!(store.patient_count().unwrap(), 2);
}

#[test]
fn a_provisional_record_does_not_take_a_number_another_record_holds() {
    let (store, _d, _known, unknown) = setup();
    // Directly at the store, as any writer would:
    let mut summary = load(&store, &unknown);
    let mut d = summary.demographics().unwrap();
    d.nhs_number = Some("9990000069".into());
    summary.set_actor(care_sync_server::server_actor(&store.server_identity().unwrap()).to_bytes());
    let before = summary.heads();
    summary.set_demographics(&d, 3).unwrap();
    let changes = summary.changes_since(&before);
    let err = store.apply_server_changes(&unknown, &changes).unwrap_err();
    assert!(matches!(err, StoreError::DuplicatePatient), "{err}");
    assert!(err.to_string().contains("merge-patients"));
    assert!(load(&store, &unknown).demographics().unwrap().nhs_number.is_none(), "nothing changed");
}
