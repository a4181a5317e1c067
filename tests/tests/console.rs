//! The operators' admin API against a real server: every endpoint, and auth failures that change
//! nothing.

use std::time::Duration;

use care_node::client::request_access;
use care_node::protocol::AccessKind;
use care_node::sync::AccessRequest;
use care_sync_e2e::{OPERATOR_TOKEN, TestConsole, TestDevice, TestServer, within};
use care_sync_server::store::{AuditFilter, Role};
use serde_json::{Value, json};

const HOUR: Duration = Duration::from_secs(3600);

/// A server with an enrolled, synced crew device that broke glass (one open alert).
async fn server_with_an_alert() -> (TestServer, TestDevice) {
    let server = TestServer::start(6).await;
    let mut crew = TestDevice::enrolled(&server, "ambulance-1", Role::AmbulanceCrew).await;
    server.caseload("ambulance-1", [0, 1]);
    within(30, crew.sync()).await.unwrap();
    let request = AccessRequest {
        nhs_number: server.patients[3].as_str().into(),
        kind: AccessKind::BreakGlass,
        reason: "unconscious, no carers present".into(),
    };
    let (decision, _) = within(30, request_access(&mut crew.store, request)).await.unwrap();
    assert!(decision.granted);
    (server, crew)
}

/// Everything a refused request must not have changed.
fn snapshot(server: &TestServer) -> (Vec<String>, usize, usize, usize) {
    let store = server.store.as_ref();
    let devices = store
        .devices()
        .unwrap()
        .into_iter()
        .map(|d| format!("{} {:?} {:?} {:?}", d.name, d.revoked_at_ms, d.wipe_requested_at_ms, d.public_key))
        .collect();
    let held = store.devices().unwrap().iter().map(|d| store.caseload(d.id).unwrap().len()).sum();
    (
        devices,
        store.alerts(false).unwrap().len(),
        store.audit_entries(&AuditFilter::default()).unwrap().len(),
        held,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_protected_path_refuses_a_missing_or_wrong_token_and_changes_nothing() {
    let (server, _crew) = server_with_an_alert().await;
    let console = TestConsole::start(&server, 24 * HOUR).await;
    let alert = server.store.alerts(false).unwrap()[0].id;
    let before = snapshot(&server);

    // The OpenAPI description is public and lists every path; walk all of them.
    let (status, text) = console.get_with("/openapi.json", None);
    assert_eq!(status, 200);
    let openapi: Value = serde_json::from_str(&text).unwrap();
    let paths = openapi["paths"].as_object().unwrap();
    assert!(paths.len() >= 18, "{} paths documented", paths.len());
    let body = json!({ "device": "ambulance-1", "nhs": server.patients[2].as_str(), "district": "SO16",
                       "name": "intruder", "role": "ambulance-crew", "note": "no" });
    let mut checked = 0;
    for (path, methods) in paths {
        let concrete = path.replace("{name}", "ambulance-1").replace("{id}", &alert.to_string());
        let public = matches!(path.as_str(), "/health" | "/ready");
        for method in methods.as_object().unwrap().keys() {
            for token in [None, Some("wrong-token-wrong-token"), Some(&OPERATOR_TOKEN[1..])] {
                let (status, text) = match method.as_str() {
                    "get" => console.get_with(&concrete, token),
                    "post" => console.post_with(&concrete, &body, token),
                    other => panic!("undocumented method {other}"),
                };
                if public {
                    assert_eq!(status, 200, "{method} {path} is public: {text}");
                } else {
                    assert_eq!(status, 401, "{method} {path} with {token:?}: {text}");
                    assert!(text.contains("operator token"), "{text}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 60, "{checked} requests checked");
    assert_eq!(snapshot(&server), before, "refused requests changed nothing");

    // The dashboard's static files are public and hold no data.
    let (status, page) = console.get_with("/", None);
    assert_eq!(status, 200);
    assert!(page.contains("operators' console") && !page.contains("http://") && !page.contains("https://"));
    for asset in ["/assets/dashboard.js", "/assets/dashboard.css", "/favicon.ico", "/assets/favicon.svg"] {
        let (status, text) = console.get_with(asset, None);
        assert_eq!(status, 200, "{asset}");
        assert!(!text.contains("https://"), "{asset} fetches nothing from elsewhere");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_are_enrolled_listed_revoked_and_told_to_wipe_through_the_api() {
    let (server, mut crew) = server_with_an_alert().await;
    let console = TestConsole::start(&server, 24 * HOUR).await;

    let (status, enrolled) =
        console.post("/api/devices", json!({ "name": "nurse-7", "role": "community-nurse" }));
    assert_eq!(status, 201, "{enrolled}");
    let token = enrolled["token"].as_str().unwrap();
    let mut nurse = TestDevice::new("nurse-7");
    within(30, care_node::client::enrol(&mut nurse.store, token)).await.unwrap();
    console.post("/api/caseload", json!({ "device": "nurse-7", "nhs": server.patients[4].as_str() }));
    within(30, nurse.sync()).await.unwrap();

    let devices = console.get("/api/devices");
    let find = |devices: &Value, name: &str| {
        devices["devices"].as_array().unwrap().iter().find(|d| d["name"] == name).cloned().unwrap()
    };
    let row = find(&devices, "nurse-7");
    assert_eq!(row["role"], "community-nurse");
    assert_eq!(row["state"], "enrolled");
    assert_eq!(row["lease"], "valid");
    assert_eq!(row["stale"], false);
    assert_eq!(row["documents_held"], 1);
    assert!(row["last_sync"].as_str().unwrap().starts_with("20"));
    // Caseload of 2 plus the break-glass patient.
    assert_eq!(find(&devices, "ambulance-1")["documents_held"], 3);

    // A console with a tiny stale threshold shows the same devices as stale.
    let strict = TestConsole::start(&server, Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(find(&strict.get("/api/devices"), "nurse-7")["stale"], true);

    // Refusals with reasons.
    let (status, body) =
        console.post("/api/devices", json!({ "name": "nurse-7", "role": "community-nurse" }));
    assert_eq!(status, 409, "{body}");
    let (status, body) = console.post("/api/devices", json!({ "name": "x", "role": "surgeon" }));
    assert_eq!(status, 400, "{body}");
    let (status, body) = console.post("/api/devices", json!({ "name": "", "role": "community-nurse" }));
    assert_eq!(status, 400, "{body}");
    let (status, body) = console.post("/api/devices/nobody/revoke", json!({}));
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("nobody"));

    let (status, _) = console.post("/api/devices/nurse-7/wipe", json!({}));
    assert_eq!(status, 200);
    assert_eq!(find(&console.get("/api/devices"), "nurse-7")["state"], "wipe-requested");
    let (status, _) = console.post("/api/devices/ambulance-1/revoke", json!({}));
    assert_eq!(status, 200);
    assert_eq!(find(&console.get("/api/devices"), "ambulance-1")["state"], "revoked");
    let refused = within(30, crew.sync()).await;
    assert!(
        matches!(refused, Err(care_node::client::ClientError::DeviceRefused)),
        "a revoked device is refused in the handshake: {refused:?}"
    );
    let audit = console.get("/api/audit?device=operator");
    let actions: Vec<&str> =
        audit["entries"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert!(actions.contains(&"revoke-device") && actions.contains(&"wipe-requested"), "{actions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scopes_alerts_audit_feeds_planning_and_metrics_through_the_api() {
    let (server, _crew) = server_with_an_alert().await;
    let console = TestConsole::start(&server, 24 * HOUR).await;
    let nhs = server.patients[5].as_str();

    // Scopes: caseload, incident, area.
    let (status, body) = console.post("/api/caseload", json!({ "device": "ambulance-1", "nhs": nhs }));
    assert_eq!((status, &body["changed"]), (200, &json!(true)), "{body}");
    let (status, body) =
        console.post("/api/caseload", json!({ "device": "ambulance-1", "nhs": "1234567890" }));
    assert_eq!(status, 404, "no patient has a number whose check digit fails: {body}");
    assert!(!body.to_string().contains("1234567890"), "the number is not echoed: {body}");
    let (status, body) =
        console.post("/api/caseload", json!({ "device": "ambulance-1", "nhs": "9999999999" }));
    assert!(status == 400 || status == 404, "{status} {body}");
    let (status, body) = console
        .post("/api/incidents", json!({ "device": "ambulance-1", "nhs": server.patients[2].as_str() }));
    assert_eq!(status, 200, "{body}");
    let (status, _) = console.post("/api/areas", json!({ "device": "ambulance-1", "district": "SO16" }));
    assert_eq!(status, 200);
    let scopes = console.get("/api/scopes");
    let scope = &scopes["scopes"][0];
    assert_eq!(scope["device"], "ambulance-1");
    assert_eq!(scope["caseload"].as_array().unwrap().len(), 3);
    assert_eq!(scope["incidents"].as_array().unwrap().len(), 1);
    assert_eq!(scope["areas"], json!(["SO16"]));
    assert!(!scopes.to_string().contains(nhs), "patients are shown by opaque id only");
    console.post("/api/caseload/remove", json!({ "device": "ambulance-1", "nhs": nhs }));
    console
        .post("/api/incidents/close", json!({ "device": "ambulance-1", "nhs": server.patients[2].as_str() }));
    console.post("/api/areas/remove", json!({ "device": "ambulance-1", "district": "SO16" }));
    let scope = &console.get("/api/scopes")["scopes"][0];
    assert_eq!(scope["caseload"].as_array().unwrap().len(), 2);
    assert_eq!(scope["incidents"].as_array().unwrap().len(), 0);
    assert_eq!(scope["areas"], json!([]));

    // Alerts: the break glass is open; acknowledging needs a note, then it is closed and audited.
    let alerts = console.get("/api/alerts");
    let alert = &alerts["alerts"][0];
    assert_eq!(alert["kind"], "break-glass");
    assert_eq!(alert["device"], "ambulance-1");
    let id = alert["id"].as_i64().unwrap();
    let (status, _) = console.post(&format!("/api/alerts/{id}/ack"), json!({ "note": "  " }));
    assert_eq!(status, 400);
    let (status, _) = console
        .post(&format!("/api/alerts/{id}/ack"), json!({ "note": "checked with crew lead: justified" }));
    assert_eq!(status, 200);
    assert_eq!(console.get("/api/alerts")["alerts"].as_array().unwrap().len(), 0);
    assert_eq!(console.get("/api/alerts?all=true")["alerts"][0]["note"], "checked with crew lead: justified");
    let (status, _) = console.post(&format!("/api/alerts/{id}/ack"), json!({ "note": "again" }));
    assert_eq!(status, 404, "an acknowledged alert is not open");

    // Quarantine: listed without its content; a review needs a note, and takes it off the list.
    let device = server.device_id("ambulance-1");
    let patient = server.store.patient_by_nhs(&server.patients[0]).unwrap().unwrap();
    let item = server
        .store
        .quarantine(device, &patient, "foreign-entry", "alerts/x", &[b"CLINICAL-TEXT".to_vec()], 1_000)
        .unwrap();
    let listed = console.get("/api/quarantine");
    assert_eq!(listed["quarantine"][0]["id"], item);
    assert!(!listed.to_string().contains("CLINICAL-TEXT"));
    let (status, _) = console.post(&format!("/api/quarantine/{item}/review"), json!({ "note": "" }));
    assert_eq!(status, 400);
    let (status, _) = console.post(&format!("/api/quarantine/{}/review", item + 1), json!({ "note": "x" }));
    assert_eq!(status, 404);
    let (status, _) =
        console.post(&format!("/api/quarantine/{item}/review"), json!({ "note": "entry re-recorded by GP" }));
    assert_eq!(status, 200);
    assert_eq!(console.get("/api/quarantine")["quarantine"], json!([]));
    let all = console.get("/api/quarantine?all=true");
    assert_eq!(all["quarantine"][0]["review_note"], "entry re-recorded by GP");
    assert!(all["quarantine"][0]["reviewed_at"].is_string());

    // Who saw this patient: the break glass and the grant, by the device.
    let broken = server.patients[3].as_str();
    let audit = console.get(&format!("/api/audit?nhs={broken}"));
    let entries = audit["entries"].as_array().unwrap();
    assert!(entries.iter().any(|e| e["actor"] == "ambulance-1" && e["action"] == "break-glass"), "{audit}");
    assert!(!audit.to_string().contains(broken));
    let (status, _) = console.get_with("/api/audit?since=yesterday", Some(OPERATOR_TOKEN));
    assert_eq!(status, 400);

    // Feeds: one accepted and one refused ADT message.
    let good = format!(
        "MSH|^~\\&|PAS|RHM|CARESYNC|WESSEX|20261125101500||ADT^A01|MSG-1|P|2.4\rEVN|A01|20261125101500\r\
         PID|1||{broken}^^^NHS^NH||TESTER^EDITH||19300517|F\r\
         PV1|1|I|Ward 7^Bay 2^Bed 4^Wessex General||||||||||||||||V100\r"
    );
    let options = care_sync_server::ingest::hl7::adt::AdtOptions::default();
    let ack = care_sync_server::ingest::hl7::adt::process(
        server.store.as_ref(),
        &good,
        care_node::now_ms(),
        &options,
    );
    assert_eq!(ack.code, "AA", "{}", ack.text);
    let bad = "MSH|^~\\&|PAS|RHM|CARESYNC|WESSEX|20261125101500||ADT^A01|MSG-2|P|2.4\rPID|||123^^^NHS^NH\r";
    let ack = care_sync_server::ingest::hl7::adt::process(
        server.store.as_ref(),
        bad,
        care_node::now_ms(),
        &options,
    );
    assert_ne!(ack.code, "AA");
    let feeds = console.get("/api/feeds");
    assert_eq!(feeds["mllp"]["accepted"], 1);
    assert_eq!(feeds["mllp"]["errors"].as_u64().unwrap() + feeds["mllp"]["rejected"].as_u64().unwrap(), 1);
    assert_eq!(feeds["mllp"]["last_error"]["reason"], ack.text);
    assert_eq!(feeds["mllp"]["last_error"]["control_id"], "MSG-2", "an engineer can find the message");
    assert!(feeds["mllp"]["last_message_at"].is_string());

    // Planning export: CSV, audited.
    let (status, csv) = console.get_with("/api/planning.csv", Some(OPERATOR_TOKEN));
    assert_eq!(status, 200);
    assert!(csv.lines().next().unwrap().contains("district"), "{csv}");
    let audit = console.get("/api/audit?device=operator");
    let exports =
        audit["entries"].as_array().unwrap().iter().filter(|e| e["action"] == "export-planning").count();
    assert_eq!(exports, 1, "one export, one audit line");
    let (status, csv) = console.get_with("/api/planning.csv?by=district", Some(OPERATOR_TOKEN));
    assert_eq!((status, csv.lines().next()), (200, Some("postcode_district,patients")), "{csv}");
    let (status, body) = console.get_with("/api/planning.csv?by=postcode", Some(OPERATOR_TOKEN));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("cannot group by"), "{body}");

    // Status, health and metrics.
    let status = console.get("/api/status");
    assert_eq!(status["patients"], 6);
    assert_eq!(status["open_alerts"], 0);
    assert_eq!(status["server_key_fingerprint"].as_str().unwrap().len(), 64);
    assert_eq!(console.get("/ready")["status"], "ready");
    let (code, metrics) = console.get_with("/metrics", Some(OPERATOR_TOKEN));
    assert_eq!(code, 200);
    // Prometheus's own linter reads it without a complaint (`.ci/test` installs promtool).
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian's prometheus package; .ci/test installs it)");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), metrics.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from\n{metrics}"))
    };
    assert!(value("care_sync_syncs_total{outcome=\"ok\"}") >= 2.0);
    assert!(value("care_sync_documents_total{direction=\"sent\"}") >= 3.0);
    assert!(value("care_sync_bytes_total{direction=\"received\"}") > 0.0);
    assert!(value("care_sync_access_grants_total{kind=\"break-glass\"}") >= 1.0);
    assert!(value("care_sync_mllp_messages_total{code=\"AA\"}") >= 1.0);
    assert!(value("care_sync_sync_duration_seconds_count") >= 2.0);
    assert!(value("care_sync_enrolments_total{outcome=\"ok\"}") >= 1.0);
    assert!(!metrics.contains(broken), "no patient data in metrics");
}

/// schemathesis (a third-party tool that generates requests from `/openapi.json`) finds no
/// response the document does not describe, no schema-valid input refused and no invalid one
/// accepted, with every check it has, on a bounded, seeded run. `.ci/test` installs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schemathesis_finds_the_api_as_its_openapi_document_says() {
    let (server, _crew) = server_with_an_alert().await;
    let console = TestConsole::start(&server, 24 * HOUR).await;
    let program = std::env::var("CARE_SYNC_SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into());
    let url = format!("{}/openapi.json", console.base);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&program)
            .args(["run", &url, "--checks", "all", "--max-examples", "30", "--seed", "1"])
            .args(["-H", &format!("Authorization: Bearer {OPERATOR_TOKEN}")])
            .env("NO_COLOR", "1")
            .output()
            .unwrap_or_else(|e| {
                panic!("{program} runs ({e}); .ci/test installs it and sets CARE_SYNC_SCHEMATHESIS")
            })
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    // The failures section (every failing case with its curl line), bounded.
    let start = report.find("FAILURES").unwrap_or(report.len().saturating_sub(4000));
    let tail: String = report[start..].lines().take(200).collect::<Vec<_>>().join("\n");
    assert!(out.status.success(), "schemathesis failed:\n{tail}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains(" passed"), "{tail}");
}
