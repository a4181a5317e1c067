//! The `care-node` command line, offline: clear errors, nothing identifiable on screen by accident.

use std::process::Command;

fn care_node(store: &std::path::Path, passphrase: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_care-node"))
        .arg("--store")
        .arg(store)
        .args(args)
        .env("CARE_NODE_PASSPHRASE", passphrase)
        .output()
        .expect("care-node runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn the_cli_works_offline_and_explains_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("device.db");
    let (ok, text) = care_node(&store, "pass", &["status"]);
    assert!(ok, "{text}");
    assert!(text.contains("not enrolled"), "{text}");

    let (ok, text) = care_node(&store, "pass", &["list"]);
    assert!(ok && text.contains("0 patient(s)"), "{text}");

    let (ok, text) = care_node(&store, "wrong", &["list"]);
    assert!(!ok && text.contains("wrong passphrase"), "{text}");

    let (ok, text) = care_node(&store, "pass", &["show", "9990000010"]);
    assert!(!ok && text.contains("check digit"), "{text}");
    assert!(!text.contains("9990000010"), "the error does not echo the number: {text}");

    let (ok, text) = care_node(&store, "pass", &["add-allergy", "9990000018", "--substance", "Latex"]);
    assert!(!ok && text.contains("not enrolled"), "{text}");

    let (ok, text) = care_node(&store, "pass", &["sync"]);
    assert!(!ok && text.contains("not enrolled"), "{text}");

    let (ok, text) = care_node(&store, "pass", &["enrol", "not-a-token"]);
    assert!(!ok && text.contains("not an enrolment token"), "{text}");
}

#[test]
fn the_store_flag_goes_anywhere_a_failed_enrolment_leaves_no_store_and_help_names_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("after.db");
    let out = Command::new(env!("CARGO_BIN_EXE_care-node"))
        .args(["list", "--store"])
        .arg(&store)
        .env("CARE_NODE_PASSPHRASE", "pass")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(store.exists(), "--store after the command is honoured");

    let fresh = dir.path().join("never.db");
    let (ok, text) = care_node(&fresh, "pass", &["enrol", "care-enrol1.not-a-real-token"]);
    assert!(!ok, "{text}");
    assert!(!fresh.exists(), "a store made only for a failed enrolment is removed");
    // An existing store is never removed by a failed enrolment.
    let (ok, _) = care_node(&store, "pass", &["enrol", "care-enrol1.not-a-real-token"]);
    assert!(!ok && store.exists());

    let help = Command::new(env!("CARGO_BIN_EXE_care-node")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("CARE_NODE_PASSPHRASE") && help.contains("twice for a new store"), "{help}");
}

#[test]
fn the_connect_timeout_is_the_operators_to_choose() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("device.db");
    // A token for a server that is not there (nothing listens on UDP port 9 of loopback).
    let token = care_node::token::EnrolmentToken::new("127.0.0.1:9".into(), [7; 32]).encode();
    let started = std::time::Instant::now();
    let (ok, text) = care_node(&store, "pass", &["--connect-timeout", "0.5", "enrol", &token]);
    let waited = started.elapsed();
    assert!(!ok && text.contains("no answer within 500ms"), "{text}");
    assert!(waited < std::time::Duration::from_secs(5), "gave up after {waited:?}, not the default 10 s");
    let (ok, text) = care_node(&store, "pass", &["--connect-timeout", "-1", "status"]);
    assert!(!ok && text.contains("positive number of seconds"), "{text}");
}
