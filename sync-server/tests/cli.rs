//! The operator's command line as a process: configuration files, JSON logs, backup and restore.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn run(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_care-sync-server"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("care-sync-server runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_printed_configuration_is_a_complete_file_and_bad_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["config"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    for key in [
        "[sync]",
        "listen",
        "[feeds]",
        "mllp_listen",
        "[admin]",
        "stale_after_hours",
        "[policy]",
        "budget",
        "lease_hours_ambulance_crew",
        "prefetch_flags",
        "[logging]",
        "[limits]",
        "upload_bytes_per_minute",
        "access_requests_per_hour",
        "[compaction]",
        "every_hours",
        "hold_days",
    ] {
        assert!(printed.contains(key), "`{key}` missing from\n{printed}");
    }
    // It reads back as a configuration file.
    let file = dir.path().join("care-sync.toml");
    std::fs::write(&file, &printed).unwrap();
    let again = run(dir.path(), &["--config", file.to_str().unwrap(), "config"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(text(&again.stdout), printed);

    // A wrong value stops with the key's name, before anything else happens.
    std::fs::write(&file, "[admin]\nlisten = \"everywhere\"\n").unwrap();
    let bad = run(dir.path(), &["--config", file.to_str().unwrap(), "serve"]);
    assert!(!bad.status.success());
    let message = text(&bad.stderr);
    assert!(message.contains("admin.listen") && message.contains("care-sync.toml"), "{message}");
    std::fs::write(&file, "[feeds]\nmllp_port = 2575\n").unwrap();
    let bad = run(dir.path(), &["--config", file.to_str().unwrap(), "config"]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("mllp_port"), "{}", text(&bad.stderr));
}

#[test]
fn serve_logs_json_lines_with_the_flag_and_policy_comes_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("care-sync.toml");
    std::fs::write(
        &file,
        "[sync]\nlisten = \"127.0.0.1:0\"\n[feeds]\nmllp_listen = \"127.0.0.1:0\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[policy]\nbudget = 1234\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_care-sync-server"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--config", file.to_str().unwrap(), "--log-format", "json", "serve"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Every line up to the listening one (the policy is applied before) is a JSON event.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("a log line saying the server listens").unwrap();
        let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(event["level"].is_string() && event["timestamp"].is_string(), "{event}");
        if event["message"] == "care-sync server listening" {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();

    let audit = run(dir.path(), &["audit"]);
    assert!(text(&audit.stdout).contains("budget = 1234"), "the file's policy is applied and audited");
}

#[test]
fn backup_refuses_to_overwrite_and_restore_refuses_to_replace_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    assert!(run(&live, &["generate", "--patients", "20"]).status.success());
    let file = dir.path().join("backup.db");
    let out = run(&live, &["backup", "--out", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("20 patients"), "{}", text(&out.stdout));
    let again = run(&live, &["backup", "--out", file.to_str().unwrap()]);
    assert!(!again.status.success() && text(&again.stderr).contains("already exists"));

    let restored = dir.path().join("restored");
    let out = run(&restored, &["restore", "--from", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let patients = run(&restored, &["patients"]);
    assert_eq!(text(&patients.stdout).lines().count(), 20);
    let refused = run(&restored, &["restore", "--from", file.to_str().unwrap()]);
    assert!(
        !refused.status.success() && text(&refused.stderr).contains("--force"),
        "{}",
        text(&refused.stderr)
    );
}

#[test]
fn quarantine_lists_refused_uploads_by_rule_and_place_never_their_content() {
    use care_sync_server::store::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["enrol-device", "--name", "ambulance-7", "--role", "ambulance-crew"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let patient = uuid::Uuid::new_v4();
    {
        let store = care_sync_server::store::sqlite::SqliteStore::open(dir.path()).unwrap();
        let device = store.device_by_name("ambulance-7").unwrap().unwrap();
        let changes = vec![b"SECRET-CLINICAL-TEXT".to_vec()];
        store.quarantine(device.id, &patient, "foreign-entry", "alerts/1234", &changes, 1_000).unwrap();
    }
    let out = run(dir.path(), &["quarantine", "--device", "ambulance-7"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(printed.contains("foreign-entry") && printed.contains("alerts/1234"), "{printed}");
    assert!(printed.contains(&patient.to_string()) && printed.contains("ambulance-7"), "{printed}");
    assert!(!printed.contains("SECRET"), "content is never printed:\n{printed}");
    let out = run(dir.path(), &["quarantine", "--device", "nobody"]);
    assert!(!out.status.success() && text(&out.stderr).contains("no device named `nobody`"));

    // A review with a note takes the item off the default list, once, audited once.
    let out = run(dir.path(), &["quarantine", "review", "1", "--note", " "]);
    assert!(!out.status.success() && text(&out.stderr).contains("needs a note"), "{}", text(&out.stderr));
    let out = run(dir.path(), &["quarantine", "review", "1", "--note", "device reset by the trust"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again = run(dir.path(), &["quarantine", "review", "1", "--note", "a second opinion"]);
    assert!(
        !again.status.success() && text(&again.stderr).contains("already reviewed"),
        "{}",
        text(&again.stderr)
    );
    let out = run(dir.path(), &["quarantine", "review", "99", "--note", "x"]);
    assert!(!out.status.success() && text(&out.stderr).contains("no quarantined upload with id 99"));
    assert!(!text(&run(dir.path(), &["quarantine"]).stdout).contains("alerts/1234"), "reviewed: not listed");
    assert!(text(&run(dir.path(), &["quarantine", "--all"]).stdout).contains("alerts/1234"));
    let audit = text(&run(dir.path(), &["audit"]).stdout);
    assert_eq!(audit.matches("quarantine-reviewed").count(), 1, "{audit}");
    let store = care_sync_server::store::sqlite::SqliteStore::open(dir.path()).unwrap();
    let device = store.device_by_name("ambulance-7").unwrap().unwrap();
    assert_eq!(store.quarantine_count(device.id, 0).unwrap(), 0, "a reviewed item no longer counts");
}

#[test]
fn generate_adds_new_patients_to_a_store_that_has_some() {
    use care_sync_server::store::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let out = run(dir.path(), &["generate", "--patients", "25"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let store = care_sync_server::store::sqlite::SqliteStore::open(dir.path()).unwrap();
    assert_eq!(store.patient_count().unwrap(), 50, "the second run added 25 with new NHS numbers");
}

#[test]
fn an_operators_setting_stands_until_the_configuration_files_value_changes() {
    use care_sync_server::domain::settings::{Applied, Setting, Source};
    use care_sync_server::operator::config::Config;
    use care_sync_server::store::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let store = care_sync_server::store::sqlite::SqliteStore::open(dir.path()).unwrap();
    let budget = |store: &dyn ServerStore| store.effective_setting(Setting::Budget).unwrap();
    assert_eq!(budget(&store), ("20000".to_string(), Source::Default));

    let file = Config::parse("[policy]\nbudget = 300\n").unwrap();
    let applied = file.apply_policy(&store).unwrap();
    assert_eq!(applied, [(Setting::Budget, Applied::FromFile { value: "300".into(), replaced: None })]);
    assert_eq!(budget(&store), ("300".to_string(), Source::ConfigFile));

    // An operator's change survives restarts with the same file, and the file `config` prints.
    care_sync_server::operator::ops::set_setting(&store, "budget", "500").unwrap();
    assert_eq!(budget(&store), ("500".to_string(), Source::Operator));
    for config in [file.clone(), Config::parse(&file.to_toml()).unwrap()] {
        let applied = config.apply_policy(&store).unwrap();
        assert!(
            applied.contains(&(
                Setting::Budget,
                Applied::OperatorKept { operator: "500".into(), file: "300".into() }
            )),
            "{applied:?}"
        );
        assert_eq!(budget(&store).0, "500");
    }
    // A changed file value wins, and says whose value it replaced.
    let changed = Config::parse("[policy]\nbudget = 400\n").unwrap();
    let applied = changed.apply_policy(&store).unwrap();
    assert_eq!(
        applied,
        [(Setting::Budget, Applied::FromFile { value: "400".into(), replaced: Some("500".into()) })]
    );
    assert_eq!(budget(&store), ("400".to_string(), Source::ConfigFile));
    let audit = store.audit_entries(&Default::default()).unwrap();
    assert!(audit.iter().any(|a| a.detail.contains("replacing 500 set by an operator")));
    drop(store);

    let out = run(dir.path(), &["settings"]);
    let printed = text(&out.stdout);
    assert!(
        printed.lines().any(|l| l.starts_with("budget") && l.contains("400") && l.ends_with("config-file")),
        "{printed}"
    );
    assert!(
        printed.lines().any(|l| l.starts_with("permission-hours") && l.ends_with("default")),
        "{printed}"
    );
    let out = run(dir.path(), &["set", "budget", "-5"]);
    assert!(!out.status.success() && text(&out.stderr).contains("whole number"), "{}", text(&out.stderr));
}

#[test]
fn operator_output_survives_a_closed_pipe_logs_to_a_file_without_colours_and_empty_lists_say_so() {
    let dir = tempfile::tempdir().unwrap();
    assert!(run(dir.path(), &["generate", "--patients", "30"]).status.success());
    // `patients | head -0`: the reader is gone before the first line.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_care-sync-server"))
        .arg("--data-dir")
        .arg(dir.path())
        .arg("patients")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!text(&out.stderr).contains("panicked"), "{}", text(&out.stderr));

    let out = run(dir.path(), &["enrol-device", "--name", "ambulance-7", "--role", "ambulance-crew"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(dir.path(), &["revoke-device", "ambulance-7"]);
    let logged = text(&out.stderr);
    assert!(logged.contains("device revoked by an operator"), "a security event is logged: {logged}");
    assert!(!logged.contains('\u{1b}'), "no colour codes when standard error is not a terminal: {logged:?}");

    let devices = text(&run(dir.path(), &["devices"]).stdout);
    assert!(devices.lines().next().unwrap().contains("LEASE") && devices.contains("DOCUMENTS"), "{devices}");
    assert!(devices.contains("ambulance-7") && devices.contains("revoked"), "{devices}");
    assert!(text(&run(dir.path(), &["alerts"]).stdout).contains("no open alerts"));
    assert!(text(&run(dir.path(), &["patients", "--provisional"]).stdout).contains("no provisional records"));
}

#[test]
fn a_caseload_file_is_applied_whole_or_refused_with_every_bad_line_named() {
    use care_sync_server::store::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    assert!(run(dir.path(), &["generate", "--patients", "5"]).status.success());
    assert!(
        run(dir.path(), &["enrol-device", "--name", "nurse-1", "--role", "community-nurse"]).status.success()
    );
    let nhs: Vec<String> = {
        let store = care_sync_server::store::sqlite::SqliteStore::open(dir.path()).unwrap();
        store.patient_ids().unwrap().into_iter().filter_map(|(_, n)| n).collect()
    };
    let file = dir.path().join("caseload.csv");
    let bad = format!(
        "device,nhs\nnurse-1,{}\n# a comment\nnurse-9,{}\nnurse-1,1234567890\nnurse-1,9434765919\n",
        nhs[0], nhs[1]
    );
    std::fs::write(&file, bad).unwrap();
    let out = run(dir.path(), &["caseload", "import", file.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("line 4: no device named `nurse-9`")
            && err.contains("line 5:")
            && err.contains("line 6:")
            && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(!err.contains("1234567890"), "the number is not echoed: {err}");
    let store = care_sync_server::store::sqlite::SqliteStore::open(dir.path()).unwrap();
    let nurse = store.device_by_name("nurse-1").unwrap().unwrap().id;
    assert!(store.caseload(nurse).unwrap().is_empty(), "nothing applied");

    let good: String = nhs.iter().map(|n| format!("nurse-1,\"{n}\"\n")).collect();
    std::fs::write(&file, good).unwrap();
    let out = run(dir.path(), &["caseload", "import", file.to_str().unwrap()]);
    assert!(
        text(&out.stdout).contains("5 line(s): 5 added to caseloads, 0 already there"),
        "{}",
        text(&out.stderr)
    );
    let out = run(dir.path(), &["caseload", "import", file.to_str().unwrap()]);
    assert!(text(&out.stdout).contains("0 added to caseloads, 5 already there"));
    assert_eq!(store.caseload(nurse).unwrap().len(), 5);
    let audit = store.audit_entries(&Default::default()).unwrap();
    assert_eq!(audit.iter().filter(|a| a.action == "caseload-add").count(), 5, "each addition audited once");

    // Areas the same way: `device,district` lines, all or nothing.
    std::fs::write(&file, "device,district\nnurse-1,so16\nnurse-1,SO99 9ZZ\nnurse-2,SO17\n").unwrap();
    let out = run(dir.path(), &["area", "import", file.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("line 3: `SO99 9ZZ` is not a postcode district"), "{err}");
    assert!(
        err.contains("line 4: no device named `nurse-2`") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(store.areas(nurse).unwrap().is_empty(), "nothing applied");
    std::fs::write(&file, "device,district\nnurse-1,so16\n\"nurse-1\",SO17\n").unwrap();
    let out = run(dir.path(), &["area", "import", file.to_str().unwrap()]);
    assert!(
        text(&out.stdout).contains("2 line(s): 2 district(s) added, 0 already covered"),
        "{}",
        text(&out.stderr)
    );
    let out = run(dir.path(), &["area", "import", file.to_str().unwrap()]);
    assert!(text(&out.stdout).contains("0 district(s) added, 2 already covered"));
    assert_eq!(store.areas(nurse).unwrap(), ["SO16", "SO17"]);
    let audit = store.audit_entries(&Default::default()).unwrap();
    assert_eq!(audit.iter().filter(|a| a.action == "area-add").count(), 2, "each addition audited once");
}

#[test]
fn compact_log_reports_what_it_drops_and_a_dry_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    assert!(run(dir.path(), &["generate", "--patients", "50"]).status.success());
    // No device has synced: nothing holds the log back, and a dry run says so.
    let dry = run(dir.path(), &["compact-log", "--hold-days", "0", "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    let said = text(&dry.stdout);
    let would: u64 = said
        .split_whitespace()
        .skip_while(|w| *w != "drop")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a count in {said}"));
    assert!(would >= 50, "every patient's first change: {said}");
    assert!(said.contains("every device that has synced is above the horizon"), "{said}");
    let done = run(dir.path(), &["compact-log"]);
    assert!(done.status.success(), "{}", text(&done.stderr));
    assert!(text(&done.stdout).contains(&format!("dropped {would} entries")), "{}", text(&done.stdout));
    let again = run(dir.path(), &["compact-log"]);
    assert!(text(&again.stdout).contains("dropped 0 entries"), "{}", text(&again.stdout));
    let bad = run(dir.path(), &["compact-log", "--hold-days=-1"]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("--hold-days"), "{}", text(&bad.stderr));
    // Refused before any store is opened: a mistyped data directory is not made a store.
    let nowhere = dir.path().join("mistyped");
    let bad = run(&nowhere, &["compact-log", "--hold-days=-1"]);
    assert!(text(&bad.stderr).contains("--hold-days"), "{}", text(&bad.stderr));
    assert!(!nowhere.exists(), "no store is made for a refused command");
}

#[test]
fn the_audit_names_the_operator_who_acted_the_login_user_by_default() {
    use care_sync_server::store::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let as_user = |user: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_care-sync-server"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .env_remove("SUDO_USER")
            .env("USER", user)
            .env_remove("CARE_SYNC_OPERATOR")
            .stdin(Stdio::null())
            .output()
            .expect("care-sync-server runs")
    };
    let named = as_user("bob", &["--operator", "alice@wessex.nhs.uk", "set", "budget", "900"]);
    assert!(named.status.success(), "{}", text(&named.stderr));
    let by_login = as_user("bob", &["set", "budget", "800"]);
    assert!(by_login.status.success(), "{}", text(&by_login.stderr));
    let refused = as_user("bob", &["--operator", "  ", "set", "budget", "700"]);
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains("1 to 64 printable characters"), "{}", text(&refused.stderr));

    // An export of a patient's record is access: it names the operator too.
    assert!(as_user("bob", &["generate", "--patients", "1"]).status.success());
    let nhs = {
        let store = care_sync_server::store::sqlite::SqliteStore::open(dir.path()).unwrap();
        store.patient_ids().unwrap()[0].1.clone().expect("an NHS number")
    };
    let out = dir.path().join("ips.json");
    let export = as_user(
        "bob",
        &["--operator", "carol", "export-fhir", "--nhs", &nhs, "--out", out.to_str().unwrap()],
    );
    assert!(export.status.success(), "{}", text(&export.stderr));

    let store = care_sync_server::store::sqlite::SqliteStore::open(dir.path()).unwrap();
    let exports: Vec<String> = store
        .audit_entries(&Default::default())
        .unwrap()
        .into_iter()
        .filter(|a| a.action == "export-fhir")
        .map(|a| a.actor)
        .collect();
    assert_eq!(exports, ["carol"]);
    let settings: Vec<(String, String)> = store
        .audit_entries(&Default::default())
        .unwrap()
        .into_iter()
        .filter(|a| a.action == "setting")
        .map(|a| (a.actor, a.detail))
        .collect();
    assert_eq!(
        settings,
        [
            ("alice@wessex.nhs.uk".to_string(), "budget = 900".to_string()),
            ("bob".to_string(), "budget = 800".to_string())
        ],
        "each change under the name of who made it; the refused one not at all"
    );
}

/// `[store]` and `--store-url`: a password in the URL is never printed, a URL that is not
/// PostgreSQL's is refused by name, `backup` and `restore` say to use PostgreSQL's own tools,
/// and the operator CLI works on a PostgreSQL store (when a cluster is there) as on SQLite.
#[test]
fn the_store_is_chosen_by_one_setting_and_its_password_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.toml");
    std::fs::write(&file, "[store]\nurl = \"postgres://care:s3cret-pass@db.example:5432/region\"\n").unwrap();
    let config = file.to_str().unwrap();
    let out = run(dir.path(), &["--config", config, "config"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(printed.contains("url = \"postgres://care:***@db.example:5432/region\""), "{printed}");
    assert!(!printed.contains("s3cret"), "{printed}");

    let out = run(dir.path(), &["--store-url", "mysql://care:s3cret-pass@db/region", "devices"]);
    assert!(!out.status.success());
    let error = text(&out.stderr);
    assert!(error.contains("is not a postgres:// URL") && !error.contains("s3cret"), "{error}");

    for args in [&["backup", "--out", "b.db"][..], &["restore", "--from", "b.db"][..]] {
        let out = run(dir.path(), &[&["--config", config][..], args].concat());
        assert!(!out.status.success());
        let error = text(&out.stderr);
        assert!(error.contains("pg_dump") && !error.contains("s3cret"), "{error}");
    }

    // An unreachable database is said so, without the password.
    let out = run(dir.path(), &["--store-url", "postgres://care:s3cret-pass@127.0.0.1:1/region", "devices"]);
    assert!(!out.status.success());
    let error = text(&out.stderr);
    assert!(error.contains("database") && !error.contains("s3cret"), "{error}");

    let Some(database) = care_sync_server::store::postgres::scratch::ScratchDatabase::from_env() else {
        return eprintln!("the PostgreSQL half skipped: no cluster (CARE_SYNC_POSTGRES_URL)");
    };
    let url = database.url.as_str();
    let on_pg = |args: &[&str]| run(dir.path(), &[&["--store-url", url][..], args].concat());
    let out = on_pg(&["generate", "--patients", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = on_pg(&[
        "enrol-device",
        "--name",
        "nurse-pg",
        "--role",
        "community-nurse",
        "--server-addr",
        "192.0.2.1:7400, sync-b.example.nhs.uk:7400",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = care_node::token::EnrolmentToken::decode(text(&out.stdout).trim()).unwrap();
    assert_eq!(token.server_addr, "192.0.2.1:7400,sync-b.example.nhs.uk:7400");
    let out = on_pg(&["patients"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    assert_eq!(listed.lines().filter(|l| !l.trim().is_empty()).count(), 3, "{listed}");
    // After a pg_restore: the store's incarnation moves (devices resend and resync), audited.
    let incarnation = || {
        use care_sync_server::store::DeviceRegistry;
        care_sync_server::store::postgres::PostgresStore::open(url).unwrap().incarnation().unwrap()
    };
    let before = incarnation();
    let out = on_pg(&["restored"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_ne!(incarnation(), before);
    let out = on_pg(&["audit"]);
    let audit = text(&out.stdout);
    assert!(audit.contains("enrolment-token") && audit.contains("restored"), "{audit}");
    // A bad address list is refused before anything is written.
    let out =
        on_pg(&["enrol-device", "--name", "x", "--role", "community-nurse", "--server-addr", "192.0.2.1"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("is not a host and port"), "{}", text(&out.stderr));
}
