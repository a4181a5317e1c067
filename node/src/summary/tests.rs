//! Merge-safety scenarios across replicas.

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, ObjType, ROOT};

use super::*;

pub(crate) fn demographics() -> Demographics {
    Demographics {
        nhs_number: Some("9990000018".into()),
        nhs_number_status: Some("number-present-and-verified".into()),
        name: "Test Patient".into(),
        family: Some("Patient".into()),
        given: Some("Test".into()),
        date_of_birth: Some("1930-01-01".into()),
        sex: Some("female".into()),
        address_lines: Some(vec!["1 Test Street".into()]),
        city: Some("Southampton".into()),
        postcode: Some("SO16 6YD".into()),
        gp_practice_code: Some("J82001".into()),
        gp_practice_name: Some("Test Surgery".into()),
    }
}

pub(crate) fn provenance(device: &str, at: i64) -> Provenance {
    Provenance {
        device: device.into(),
        device_name: device.into(),
        role: "ambulance-crew".into(),
        recorded_at_ms: at,
        clock_offset_ms: None,
        person: None,
        source: None,
    }
}

pub(crate) fn allergy(substance: &str, device: &str, at: i64) -> Allergy {
    Allergy {
        substance: substance.into(),
        code: None,
        reaction: Some("rash".into()),
        reaction_code: None,
        severity: Some("mild".into()),
        criticality: None,
        kind: Some("allergy".into()),
        category: Some("medication".into()),
        clinical_status: Some("active".into()),
        verification_status: CONFIRMED.into(),
        onset: None,
        provenance: provenance(device, at),
    }
}

/// Three replicas of one new patient: the server's and two devices'.
fn replicas() -> (PatientSummary, PatientSummary, PatientSummary) {
    let mut server =
        PatientSummary::create(Uuid::new_v4(), &demographics(), ActorId::from(&[0u8; 16][..]), 0).unwrap();
    let saved = server.save();
    let mut a = PatientSummary::load(&saved).unwrap();
    let mut b = PatientSummary::load(&saved).unwrap();
    a.set_actor(&[1; 32]);
    b.set_actor(&[2; 32]);
    (server, a, b)
}

/// Full exchange of everything between the replicas.
fn converge(all: &mut [&mut PatientSummary]) {
    let changes: Vec<Vec<Change>> = all.iter_mut().map(|s| s.all_changes()).collect();
    for s in all.iter_mut() {
        for c in &changes {
            s.apply_changes(c.clone()).unwrap();
        }
    }
}

fn substances(s: &mut PatientSummary) -> Vec<String> {
    s.clinical_entries::<Allergy>().unwrap().into_iter().map(|e| e.data.substance).collect()
}

#[test]
fn concurrent_additions_on_three_replicas_all_survive_in_one_order() {
    let (mut server, mut a, mut b) = replicas();
    a.add(&allergy("penicillin", "a", 5_000)).unwrap();
    // b's clock is an hour behind; order must not depend on it.
    b.add(&allergy("latex", "b", 5_000 - 3_600_000)).unwrap();
    server.add(&allergy("codeine", "server", 1)).unwrap();
    converge(&mut [&mut server, &mut a, &mut b]);
    let order = substances(&mut a);
    assert_eq!(order.len(), 3);
    assert_eq!(order, substances(&mut b));
    assert_eq!(order, substances(&mut server));
    // The same additions with b's clock an hour ahead instead: the same order.
    let (mut server2, mut a2, mut b2) = replicas();
    a2.add(&allergy("penicillin", "a", 5_000)).unwrap();
    b2.add(&allergy("latex", "b", 5_000 + 3_600_000)).unwrap();
    server2.add(&allergy("codeine", "server", 1)).unwrap();
    converge(&mut [&mut server2, &mut a2, &mut b2]);
    assert_eq!(substances(&mut a2), order, "b's clock moved nothing");
}

#[test]
fn causal_order_beats_device_clocks() {
    let (mut server, mut a, mut b) = replicas();
    a.add(&allergy("first", "a", 10_000_000)).unwrap();
    converge(&mut [&mut server, &mut a, &mut b]);
    // b saw "first", then adds "second" with a clock far in the past.
    b.add(&allergy("second", "b", 1)).unwrap();
    converge(&mut [&mut server, &mut a, &mut b]);
    assert_eq!(substances(&mut a), vec!["first", "second"]);
}

#[test]
fn entered_in_error_is_never_resurrected_by_a_concurrent_edit() {
    let (mut server, mut a, mut b) = replicas();
    let id = a.add(&allergy("peanut", "a", 1_000)).unwrap();
    converge(&mut [&mut server, &mut a, &mut b]);
    // Offline: a marks it in error while b confirms and edits it.
    a.mark_entered_in_error(Section::Allergies, id, "wrong patient", &provenance("a", 2_000)).unwrap();
    b.set_field(Section::Allergies, id, "verification_status", "confirmed", &provenance("b", 2_100)).unwrap();
    b.set_field(Section::Allergies, id, "severity", "severe", &provenance("b", 2_100)).unwrap();
    converge(&mut [&mut server, &mut a, &mut b]);
    for replica in [&mut server, &mut a, &mut b] {
        let all = replica.entries::<Allergy>().unwrap();
        assert_eq!(all.len(), 1, "kept for the record");
        assert!(all[0].entered_in_error.is_some(), "still in error");
        assert!(replica.clinical_entries::<Allergy>().unwrap().is_empty(), "hidden from the clinical view");
        assert_eq!(replica.section_state(Section::Allergies).unwrap(), SectionState::NoInformation);
    }
    // A later, sequential edit cannot bring it back either.
    b.set_field(Section::Allergies, id, "verification_status", "confirmed", &provenance("b", 3_000)).unwrap();
    assert!(b.entries::<Allergy>().unwrap()[0].entered_in_error.is_some());
    assert!(b.clinical_entries::<Allergy>().unwrap().is_empty());
    // Nor can re-importing the same fact from its source.
    b.upsert(id, &allergy("peanut", "server", 4_000)).unwrap();
    assert!(b.clinical_entries::<Allergy>().unwrap().is_empty());
}

#[test]
fn concurrent_values_of_one_field_are_surfaced_with_their_authors() {
    let (mut server, mut a, mut b) = replicas();
    let alert = Alert {
        kind: alert_kind::RESPECT_DNACPR.into(),
        description: "For CPR".into(),
        code: None,
        status: Some("active".into()),
        decision_date: Some("2026-01-01".into()),
        author: Some("Dr Test".into()),
        review_date: None,
        verification_status: CONFIRMED.into(),
        provenance: provenance("server", 0),
    };
    let id = server.add(&alert).unwrap();
    let saved = server.save();
    a.merge_saved(&saved).unwrap();
    b.merge_saved(&saved).unwrap();
    a.register_actor(&provenance("ambulance-1", 0)).unwrap();
    b.register_actor(&provenance("nurse-1", 0)).unwrap();
    a.set_field(Section::Alerts, id, "description", "DNACPR", &provenance("ambulance-1", 10_000)).unwrap();
    b.set_field(Section::Alerts, id, "description", "For full escalation", &provenance("nurse-1", 20_000))
        .unwrap();
    converge(&mut [&mut server, &mut a, &mut b]);
    for replica in [&mut server, &mut a, &mut b] {
        let entries = replica.entries::<Alert>().unwrap();
        let conflict =
            entries[0].conflicts.iter().find(|c| c.field == "description").expect("conflict surfaced");
        let mut values: Vec<_> = conflict.values.iter().map(|v| v.value.as_str()).collect();
        values.sort();
        assert_eq!(values, vec!["DNACPR", "For full escalation"]);
        assert!(conflict.values.iter().any(|v| v.author.starts_with("ambulance-1") && v.at_ms == 10_000));
        assert!(conflict.values.iter().any(|v| v.author.starts_with("nurse-1") && v.at_ms == 20_000));
        assert_eq!(replica.conflicts().unwrap().len(), 1);
    }
}

#[test]
fn none_known_differs_from_no_information_and_yields_to_entries() {
    let (mut server, _, _) = replicas();
    assert_eq!(server.section_state(Section::Allergies).unwrap(), SectionState::NoInformation);
    server.assert_none_known(Section::Allergies, &provenance("gp", 1)).unwrap();
    assert!(matches!(server.section_state(Section::Allergies).unwrap(), SectionState::NoneKnown(_)));
    server.add(&allergy("latex", "a", 2)).unwrap();
    assert_eq!(server.section_state(Section::Allergies).unwrap(), SectionState::Entries);
}

#[test]
fn re_importing_a_source_fact_never_duplicates() {
    let (mut server, _, _) = replicas();
    let patient = server.patient_id().unwrap();
    let id = PatientSummary::source_entry_id(&patient, Section::Allergies, "AllergyIntolerance/gp-1");
    assert!(server.upsert(id, &allergy("latex", "server", 1)).unwrap());
    assert!(
        !server.upsert(id, &allergy("latex", "server", 1)).unwrap(),
        "identical re-import changes nothing"
    );
    assert_eq!(server.entries::<Allergy>().unwrap().len(), 1);
    assert_eq!(id, PatientSummary::source_entry_id(&patient, Section::Allergies, "AllergyIntolerance/gp-1"));
}

/// A document exactly as schema version 1 wrote it.
fn version_1_document() -> Vec<u8> {
    let mut doc = AutoCommit::new().with_actor(ActorId::from(&[0u8; 16][..]));
    doc.put(ROOT, "schema_version", 1u64).unwrap();
    doc.put(ROOT, "patient_id", Uuid::new_v4().to_string()).unwrap();
    let d = doc.put_object(ROOT, "demographics", ObjType::Map).unwrap();
    for (k, v) in [
        ("nhs_number", "9990000018"),
        ("name", "Old Format"),
        ("date_of_birth", "1940-02-03"),
        ("postcode", "PO30 1AA"),
    ] {
        doc.put(&d, k, v).unwrap();
    }
    for section in ["problems", "allergies", "medications", "alerts"] {
        doc.put_object(ROOT, section, ObjType::Map).unwrap();
    }
    let allergies = match doc.get(ROOT, "allergies").unwrap() {
        Some((_, id)) => id,
        None => unreachable!(),
    };
    let entry = doc.put_object(&allergies, Uuid::new_v4().to_string(), ObjType::Map).unwrap();
    doc.put(&entry, "substance", "Penicillin").unwrap();
    doc.put(&entry, "reaction", "anaphylaxis").unwrap();
    doc.put(&entry, "severity", "severe").unwrap();
    doc.put(&entry, "verification_status", "confirmed").unwrap();
    let p = doc.put_object(&entry, "provenance", ObjType::Map).unwrap();
    for (k, v) in [("device", "server"), ("device_name", "GP"), ("role", "gp-feed")] {
        doc.put(&p, k, v).unwrap();
    }
    doc.put(&p, "recorded_at_ms", 0i64).unwrap();
    doc.commit();
    doc.save()
}

#[test]
fn a_version_1_document_opens_and_migrates() {
    let mut old = PatientSummary::load(&version_1_document()).unwrap();
    assert_eq!(old.schema_version().unwrap(), 1);
    assert_eq!(old.demographics().unwrap().name, "Old Format");
    let allergies = old.clinical_entries::<Allergy>().unwrap();
    assert_eq!(allergies[0].data.substance, "Penicillin");
    assert_eq!(allergies[0].data.code, None);
    assert!(old.entries::<Encounter>().unwrap().is_empty(), "a section it lacks reads as empty");
    assert!(matches!(
        old.add(&Contact {
            name: "x".into(),
            relationship: "carer".into(),
            phone: None,
            note: None,
            verification_status: CONFIRMED.into(),
            provenance: provenance("a", 0),
        }),
        Err(SummaryError::NeedsMigration("contacts"))
    ));

    assert!(old.migrate(ActorId::from(&[0u8; 16][..]), 0).unwrap());
    assert_eq!(old.schema_version().unwrap(), SCHEMA_VERSION);
    assert!(!old.migrate(ActorId::from(&[0u8; 16][..]), 0).unwrap(), "migrating twice changes nothing");
    let reloaded = &mut PatientSummary::load(&old.save()).unwrap();
    assert_eq!(reloaded.clinical_entries::<Allergy>().unwrap()[0].data.substance, "Penicillin");
    reloaded.set_actor(&[1; 32]);
    reloaded
        .add(&Contact {
            name: "Sam Carer".into(),
            relationship: "carer".into(),
            phone: None,
            note: None,
            verification_status: CONFIRMED.into(),
            provenance: provenance("a", 0),
        })
        .unwrap();
}

#[test]
fn deleting_changes_are_detected() {
    let (mut server, mut a, _) = replicas();
    a.add(&allergy("x", "a", 1)).unwrap();
    assert!(!change_deletes(&a.last_local_change().unwrap()));
    let doc = server.doc_mut();
    doc.delete(ROOT, "allergies").unwrap();
    doc.commit();
    assert!(change_deletes(&server.last_local_change().unwrap()));
}

#[test]
fn invalid_nhs_numbers_are_refused_and_provisional_records_allowed() {
    let mut d = demographics();
    d.nhs_number = Some("9990000010".into());
    assert!(matches!(
        PatientSummary::create(Uuid::new_v4(), &d, ActorId::random(), 0),
        Err(SummaryError::InvalidNhsNumber)
    ));
    d.nhs_number = None;
    let provisional = PatientSummary::create(Uuid::new_v4(), &d, ActorId::random(), 0).unwrap();
    assert!(matches!(provisional.nhs_number(), Err(SummaryError::NoNhsNumber)));
}

#[test]
fn garbage_is_not_a_summary() {
    assert!(PatientSummary::load(b"not automerge").is_err());
    let mut empty = AutoCommit::new();
    empty.put(ROOT, "x", 1).unwrap();
    assert!(matches!(PatientSummary::load(&empty.save()), Err(SummaryError::Layout(_))));
}

#[test]
fn records_print_no_patient_data_in_debug_output() {
    let shown = format!("{:?}", demographics());
    for secret in ["Test Patient", "9990000018", "1930-01-01", "SO16 6YD", "Test Street"] {
        assert!(!shown.contains(secret), "{shown}");
    }
    let (_, mut a, _) = replicas();
    a.add(&allergy("Penicillin", "ambulance-1", 5)).unwrap();
    let listing = a.listing().unwrap();
    let conflict = FieldConflict {
        field: "reaction".into(),
        values: vec![ConflictValue { value: "anaphylaxis".into(), author: "ambulance-1".into(), at_ms: 1 }],
    };
    let shown = format!(
        "{:?} {:?} {listing:?} {conflict:?}",
        a.entries::<Allergy>().unwrap(),
        a.demographics().unwrap()
    );
    assert!(!shown.contains("anaphylaxis") && !shown.contains("SO16"), "{shown}");
    assert!(shown.contains("Allergy { .. }"), "{shown}");
    assert!(
        !shown.contains("Penicillin") && !shown.contains("rash") && !shown.contains("Test Patient"),
        "{shown}"
    );
}

#[test]
fn a_new_entry_written_in_one_batch_is_the_document_field_by_field_writing_makes() {
    let mut entry = allergy("penicillin", "device-a", 5);
    entry.onset = None;
    entry.code = Some(Code::snomed("91936005", "Allergy to penicillin"));
    let actor = ActorId::from(&[0u8; 16][..]);
    let id = Uuid::new_v4();
    let mut batch = PatientSummary::create(id, &demographics(), actor.clone(), 0).unwrap();
    let mut fields = PatientSummary::create(id, &demographics(), actor, 0).unwrap();
    let entry_id = Uuid::new_v4();
    assert!(batch.upsert(entry_id, &entry).unwrap());
    // The same steps as `upsert`, reconciling field by field.
    fields.register_actor(entry.provenance()).unwrap();
    let section = fields.section_obj(Allergy::SECTION).unwrap();
    reconcile_prop(&mut fields.doc, &section, entry_id.to_string().as_str(), &entry).unwrap();
    fields.commit(5);
    assert_eq!(batch.doc.hydrate(ROOT, None).unwrap(), fields.doc.hydrate(ROOT, None).unwrap());
    let data = |s: &mut PatientSummary| {
        s.entries::<Allergy>().unwrap().into_iter().map(|e| (e.id, e.data)).collect::<Vec<_>>()
    };
    assert_eq!(data(&mut batch), data(&mut fields));
    // Written again with a change, the batch-made entry merges field by field like any other.
    entry.severity = Some("severe".into());
    assert!(batch.upsert(entry_id, &entry).unwrap());
    assert_eq!(batch.entries::<Allergy>().unwrap()[0].data.severity.as_deref(), Some("severe"));
}

#[test]
fn the_clinical_count_of_a_section_is_the_entries_a_clinician_sees() {
    let (mut s, _, _) = replicas();
    let ids: Vec<EntryId> = (0..3).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        s.upsert(*id, &allergy(&format!("substance {i}"), "device-a", i as i64)).unwrap();
    }
    s.mark_entered_in_error(Section::Allergies, ids[1], "wrong patient", &provenance("device-a", 9)).unwrap();
    assert_eq!(s.clinical_count(Section::Allergies).unwrap(), 2);
    assert_eq!(s.clinical_count(Section::Allergies).unwrap(), s.clinical_entries::<Allergy>().unwrap().len());
    assert_eq!(s.clinical_count(Section::Problems).unwrap(), 0);
}

#[test]
fn one_entry_read_by_id_is_the_entry_that_entries_list() {
    let (mut s, _, _) = replicas();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    s.upsert(a, &allergy("penicillin", "device-a", 1)).unwrap();
    s.upsert(b, &allergy("latex", "device-a", 2)).unwrap();
    let listed = s.entries::<Allergy>().unwrap().into_iter().find(|e| e.id == b).unwrap().data;
    assert_eq!(s.entry_data::<Allergy>(b).unwrap(), Some(listed));
    assert_eq!(s.entry_data::<Allergy>(Uuid::new_v4()).unwrap(), None);
    assert_eq!(s.entry_data::<Problem>(a).unwrap(), None);
}
