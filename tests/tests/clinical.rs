//! Clinical safety across the wire: entered-in-error is sticky, conflicts are shown, crew
//! observations with NEWS2 reach the nurse, and a merge never strands an offline entry.

use care_node::news2::{ClinicalRisk, Consciousness, Observations};
use care_node::policy::Rule;
use care_node::protocol::{ClientMessage, DocChanges, ServerMessage};
use care_node::store::StoreError;
use care_node::summary::{self as s, PatientSummary, Section};
use care_sync_e2e::{TestDevice, TestServer, within};
use care_sync_server::ingest::fhir::import::{import_bundle, parse_bundle};
use care_sync_server::operator::ops;
use care_sync_server::store::Role;

async fn three_devices(server: &TestServer) -> [TestDevice; 3] {
    let a = TestDevice::enrolled(server, "ambulance-1", Role::AmbulanceCrew).await;
    let b = TestDevice::enrolled(server, "ambulance-2", Role::AmbulanceCrew).await;
    let c = TestDevice::enrolled(server, "nurse-1", Role::CommunityNurse).await;
    for name in ["ambulance-1", "ambulance-2", "nurse-1"] {
        server.caseload(name, [0]);
    }
    [a, b, c]
}

async fn sync_all(devices: &mut [TestDevice]) {
    // Two passes: everyone uploads, then everyone receives everyone else's changes.
    for _ in 0..2 {
        for d in devices.iter_mut() {
            within(30, d.sync()).await.expect("sync");
        }
    }
}

fn summary(device: &TestDevice, nhs: &care_node::nhs::NhsNumber) -> PatientSummary {
    device.store.find_by_nhs(nhs).unwrap().expect("patient on device").summary
}

#[tokio::test(flavor = "multi_thread")]
async fn entered_in_error_on_one_device_survives_concurrent_edits_on_others() {
    let server = TestServer::in_memory(2);
    let mut devices = three_devices(&server).await;
    let nhs = server.patients[0].clone();
    sync_all(&mut devices).await;
    devices[0].add_allergy(&nhs, "Peanut");
    sync_all(&mut devices).await;
    let id = summary(&devices[2], &nhs)
        .clinical_entries::<s::Allergy>()
        .unwrap()
        .iter()
        .find(|e| e.data.substance == "Peanut")
        .unwrap()
        .id;

    // Offline: the crew that recorded it marks it in error; the others may not edit another
    // author's entry (the write policy), and their devices refuse before storing anything.
    devices[0]
        .store
        .mark_entered_in_error(&nhs, Section::Allergies, id, "recorded for the wrong patient")
        .unwrap();
    let p1 = devices[1].store.provenance().unwrap();
    let refused =
        devices[1].store.edit(&nhs, |sum| sum.set_field(Section::Allergies, id, "severity", "severe", &p1));
    assert!(matches!(&refused, Err(StoreError::Refused(r)) if r.rule == Rule::ForeignEntry), "{refused:?}");
    let p2 = devices[2].store.provenance().unwrap();
    let refused = devices[2]
        .store
        .edit(&nhs, |sum| sum.set_field(Section::Allergies, id, "verification_status", "refuted", &p2));
    assert!(matches!(refused, Err(StoreError::Refused(_))));
    assert_eq!(devices[2].store.pending_count().unwrap(), 0, "nothing of a refused edit is queued");
    // What another device may do to the same record at the same time: its own entry, merged
    // with the mark by the CRDT.
    devices[1].add_allergy(&nhs, "Latex");
    sync_all(&mut devices).await;

    for device in &devices {
        let mut sum = summary(device, &nhs);
        let entry = sum
            .entries::<s::Allergy>()
            .unwrap()
            .into_iter()
            .find(|e| e.id == id)
            .expect("kept for the record");
        assert!(entry.entered_in_error.is_some(), "{} shows it in error", device.name);
        let shown = sum.clinical_entries::<s::Allergy>().unwrap();
        assert!(shown.iter().all(|e| e.id != id), "hidden on {}", device.name);
        assert!(
            shown.iter().any(|e| e.data.substance == "Latex"),
            "the concurrent entry merged beside the mark on {}",
            device.name
        );
    }
    let saved =
        server.store.load_document(&summary(&devices[0], &nhs).patient_id().unwrap()).unwrap().unwrap();
    let mut on_server = PatientSummary::load(&saved).unwrap();
    assert!(on_server.clinical_entries::<s::Allergy>().unwrap().iter().all(|e| e.id != id));
}

#[tokio::test(flavor = "multi_thread")]
async fn another_authors_alert_cannot_be_rewritten_by_any_device() {
    let server = TestServer::in_memory(1);
    let mut devices = three_devices(&server).await;
    let nhs = server.patients[0].clone();
    sync_all(&mut devices).await;
    let mut alert =
        s::Alert::new(s::alert_kind::RESPECT_DNACPR, "For CPR", devices[2].store.provenance().unwrap());
    alert.decision_date = Some("2026-11-01".into());
    let id = devices[2].store.add_entry(&nhs, &alert).unwrap();
    sync_all(&mut devices).await;
    for i in [0, 1] {
        let p = devices[i].store.provenance().unwrap();
        let result = devices[i].store.edit(&nhs, |sum| {
            sum.set_field(Section::Alerts, id, "description", "DNACPR: do not attempt resuscitation", &p)
        });
        assert!(
            matches!(&result, Err(StoreError::Refused(r)) if r.rule == Rule::ForeignEntry),
            "device {i}: {result:?}"
        );
    }
    // Its author may still correct it, within the edit window.
    let p = devices[2].store.provenance().unwrap();
    devices[2]
        .store
        .edit(&nhs, |sum| sum.set_field(Section::Alerts, id, "description", "For full CPR", &p))
        .unwrap();
    sync_all(&mut devices).await;
    for device in &devices {
        let mut sum = summary(device, &nhs);
        let entry = sum.clinical_entries::<s::Alert>().unwrap().into_iter().find(|e| e.id == id).unwrap();
        assert_eq!(entry.data.description, "For full CPR", "on {}", device.name);
        assert!(entry.conflicts.is_empty(), "no competing value on {}", device.name);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn crew_observations_with_news2_recorded_offline_reach_the_nurse() {
    let mut server = TestServer::in_memory(1);
    let mut devices = three_devices(&server).await;
    let nhs = server.patients[0].clone();
    sync_all(&mut devices).await;
    server.stop().await;
    let observations = Observations {
        respiration_rate: Some(24),
        spo2: Some(91),
        spo2_scale_2: false,
        on_oxygen: true,
        systolic_bp: Some(98),
        pulse: Some(118),
        consciousness: Some(Consciousness::Confusion),
        temperature_c: Some(38.6),
        pregnant: false,
    };
    let (_, assessment) =
        devices[0].store.record_attendance(&nhs, &observations, Some("fall at home")).unwrap();
    let news2 = *assessment.news2().expect("an adult with every observation is scored");
    assert_eq!(news2.total, 2 + 3 + 2 + 2 + 2 + 3 + 1);
    assert_eq!(news2.risk, ClinicalRisk::High);
    server.restart().await;
    sync_all(&mut devices).await;
    let mut on_nurse = summary(&devices[2], &nhs);
    let attendance = on_nurse
        .clinical_entries::<s::Encounter>()
        .unwrap()
        .into_iter()
        .find(|e| e.data.kind == "attendance")
        .unwrap();
    assert_eq!(attendance.data.vitals.as_ref().and_then(|v| v.news2), Some(15));
    assert_eq!(attendance.data.provenance.device_name, "ambulance-1");
    assert!(
        attendance.data.provenance.clock_offset_ms.is_some(),
        "the crew's clock offset travels with the entry"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn news2_is_not_scored_for_children_pregnancy_or_partial_observations_and_show_prints_values() {
    let server = TestServer::in_memory(1);
    let mut crew = TestDevice::enrolled(&server, "ambulance-1", Role::AmbulanceCrew).await;
    // A child of four (born on 1 January, four years ago), imported as a GP record would be.
    let child = care_node::nhs::NhsNumber::from_stem(943_476_591)
        .or_else(|| care_node::nhs::NhsNumber::from_stem(943_476_592))
        .unwrap();
    let bundle = format!(
        r#"{{"resourceType":"Bundle","type":"collection","entry":[{{"resource":{{"resourceType":"Patient","id":"c",
        "identifier":[{{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"{}"}}],
        "name":[{{"text":"Child Tester"}}],"birthDate":"{}-01-01"}}}}]}}"#,
        child.as_str(),
        care_node::view::format_time(care_node::now_ms())[..4].parse::<i32>().unwrap() - 4
    );
    import_bundle(server.store.as_ref(), &parse_bundle(&bundle).unwrap(), "GP", 1).unwrap();
    ops::caseload_add(server.store.as_ref(), "ambulance-1", child.as_str()).unwrap();
    server.caseload("ambulance-1", [0]);
    within(30, crew.sync()).await.unwrap();
    let adult = server.patients[0].clone();

    let sick = Observations {
        respiration_rate: Some(30),
        spo2: Some(88),
        spo2_scale_2: false,
        on_oxygen: true,
        systolic_bp: Some(85),
        pulse: Some(150),
        consciousness: Some(Consciousness::Pain),
        temperature_c: Some(39.5),
        pregnant: false,
    };
    // The child: observations recorded, NEWS2 not scored, the paediatric score named.
    let (_, assessment) = crew.store.record_attendance(&child, &sick, None).unwrap();
    assert!(
        matches!(assessment, care_node::news2::Assessment::NotForChildren { age_years: 4 }),
        "{assessment:?}"
    );
    assert!(care_node::view::assessment_text(&assessment).contains("paediatric early warning score"));
    // A pregnant adult: not scored either.
    let pregnant = Observations { pregnant: true, ..sick };
    let (_, assessment) = crew.store.record_attendance(&adult, &pregnant, None).unwrap();
    assert_eq!(assessment, care_node::news2::Assessment::NotInPregnancy);
    // No temperature: no partial total, the missing parameter named.
    let partial = Observations { temperature_c: None, ..sick };
    let (_, assessment) = crew.store.record_attendance(&adult, &partial, None).unwrap();
    assert_eq!(assessment, care_node::news2::Assessment::Incomplete { missing: vec!["temperature".into()] });
    // Every observation of an adult: scored.
    let (_, assessment) = crew.store.record_attendance(&adult, &sick, None).unwrap();
    assert!(assessment.news2().is_some_and(|n| n.risk == ClinicalRisk::High));

    // `show` prints the values with the score or the reason there is none.
    let sync = crew.store.sync_state().unwrap();
    let mut patient = crew.store.view_patient(&child, "show").unwrap();
    let text = care_node::view::render(&mut patient, &sync, &[], care_node::now_ms()).unwrap();
    assert!(
        text.contains("RR 30, SpO2 88% (scale 1, on oxygen), BP 85, pulse 150, ACVPU P, temp 39.5 °C"),
        "{text}"
    );
    assert!(text.contains("NEWS2 does not apply under 16"), "{text}");
    assert!(
        !(0..=9).any(|d| text.contains(&format!("; NEWS2 {d}"))),
        "no total of any value for the child: {text}"
    );
    let mut patient = crew.store.view_patient(&adult, "show").unwrap();
    let text = care_node::view::render(&mut patient, &sync, &[], care_node::now_ms()).unwrap();
    assert!(text.contains("pregnant; NEWS2 does not apply in pregnancy"), "{text}");
    assert!(
        text.contains("temp —; NEWS2 not scored: observations incomplete (missing: temperature)"),
        "{text}"
    );
    assert!(text.contains("temp 39.5 °C; NEWS2 19"), "{text}");
    // And the server takes all of them (the write policy allows a crew's observations).
    let report = within(30, crew.sync()).await.unwrap();
    assert_eq!(report.stats.refused_changes, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_entry_on_a_record_merged_meanwhile_reaches_the_kept_record() {
    let server = TestServer::in_memory(1);
    let known_nhs = server.patients[0].clone();
    let mut nurse = TestDevice::enrolled(&server, "nurse-2", Role::CommunityNurse).await;
    let bundle = r#"{"resourceType":"Bundle","type":"collection","entry":[{"resource":{"resourceType":"Patient","id":"u","name":[{"text":"Unknown male"}]}}]}"#;
    let provisional =
        import_bundle(server.store.as_ref(), &parse_bundle(bundle).unwrap(), "ED", 1).unwrap().patient;
    let device = server.store.device_by_name("nurse-2").unwrap().unwrap();
    server.store.caseload_add(device.id, &provisional).unwrap();
    within(30, nurse.sync()).await.unwrap();

    // Offline, the nurse records an allergy on the provisional record...
    assert_eq!(nurse.store.list().unwrap().len(), 1);
    let allergy = s::Allergy::new("Chlorhexidine", nurse.store.provenance().unwrap());
    // A provisional record has no NHS number to look it up by: edit it by id.
    nurse.store.edit_by_id(&provisional, |sum| sum.add(&allergy)).unwrap();
    // ...while an operator merges it into the known record.
    ops::merge_patients(server.store.as_ref(), known_nhs.as_str(), &provisional.to_string(), "dr-ops")
        .unwrap();

    within(30, nurse.sync()).await.unwrap();
    within(30, nurse.sync()).await.unwrap();
    assert!(nurse.store.get(&provisional).unwrap().is_none(), "the merged record is purged from the device");
    let on_device = nurse.allergies(&known_nhs);
    assert!(
        on_device.iter().any(|a| a == "Chlorhexidine"),
        "the offline entry reached the kept record: {on_device:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_that_deletes_is_refused() {
    let server = TestServer::in_memory(1);
    let mut crew = TestDevice::enrolled(&server, "ambulance-9", Role::AmbulanceCrew).await;
    server.caseload("ambulance-9", [0]);
    within(30, crew.sync()).await.unwrap();
    let nhs = server.patients[0].clone();
    let mut patient = crew.store.find_by_nhs(&nhs).unwrap().unwrap();
    let id = patient.summary.patient_id().unwrap();
    patient.summary.set_actor(&crew.store.identity().unwrap().public_key());
    let change = patient.summary.delete_section_for_test(Section::Allergies);
    let mut conn = care_sync_e2e::welcomed(&crew).await;
    conn.send(&ClientMessage::Upload {
        through: 1,
        docs: vec![DocChanges { doc: id, changes: vec![serde_bytes::ByteBuf::from(change)] }],
    })
    .await
    .unwrap();
    match within(30, conn.recv()).await {
        Ok(Some(ServerMessage::UploadAck { through: 1, refused })) => {
            assert_eq!(refused.len(), 1);
            assert_eq!((refused[0].doc, refused[0].rule.as_str()), (id, "deletes"));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Kept for review, with an alert; the record is untouched.
    let quarantined = server.store.quarantined(None).unwrap();
    assert_eq!((quarantined.len(), quarantined[0].rule.as_str()), (1, "deletes"));
    assert!(server.store.alerts(false).unwrap().iter().any(|a| a.kind == "write-refused"));
    let saved = server.store.load_document(&id).unwrap().unwrap();
    assert!(PatientSummary::load(&saved).unwrap().section_state(Section::Allergies).is_ok());
}
