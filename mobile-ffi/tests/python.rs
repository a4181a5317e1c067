//! The mobile API through real generated bindings: builds on the compiled library, generates
//! Python, Kotlin and Swift bindings, starts a real server on 127.0.0.1 and runs the Python test
//! (`tests/python/test_care_ffi.py`), which enrols, syncs, reads, searches, records (on the device alone),
//! resyncs, breaks glass, reads while a second device syncs, watches live, reads the view log,
//! checks the error mapping and wipes.

use std::path::{Path, PathBuf};
use std::process::Command;

use camino::Utf8PathBuf;
use care_sync_e2e::{TestServer, within};
use care_sync_server::store::{AuditFilter, Role};
use uniffi::{GenerateOptions, TargetLanguage};

/// The freshly built shared library (the copy in `deps/`, which is never stale).
fn library() -> PathBuf {
    let deps = std::env::current_exe().expect("test binary path").parent().expect("deps dir").to_path_buf();
    let name = if cfg!(target_os = "macos") { "libcare_mobile_ffi.dylib" } else { "libcare_mobile_ffi.so" };
    let lib = deps.join(name);
    assert!(lib.exists(), "the cdylib is built next to the tests: {}", lib.display());
    lib
}

fn generate(lib: &Path, out: &Path) {
    let options = GenerateOptions {
        languages: vec![TargetLanguage::Python, TargetLanguage::Kotlin, TargetLanguage::Swift],
        source: Utf8PathBuf::from_path_buf(lib.to_path_buf()).expect("utf-8 path"),
        out_dir: Utf8PathBuf::from_path_buf(out.to_path_buf()).expect("utf-8 path"),
        config_override: None,
        format: false,
        crate_filter: None,
        metadata_no_deps: true,
    };
    uniffi::generate(options).expect("bindings generate");
}

fn files_with(dir: &Path, ext: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in walk(dir) {
        if entry.extension().is_some_and(|e| e == ext) {
            found.push(entry.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    found
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Patients on the second (nurse's) device: enough for a sync of several pages.
const NURSE_CASELOAD: usize = 1_000;

#[tokio::test(flavor = "multi_thread")]
async fn python_drives_a_device_through_the_generated_bindings() {
    let lib = library();
    // The generated modules import each other relatively, so they live in a package.
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ffi-bindings");
    let _ = std::fs::remove_dir_all(&root);
    let out = root.join("care_sync");
    generate(&lib, &out);
    std::fs::write(out.join("__init__.py"), b"").expect("package marker");
    assert!(files_with(&out, "py").contains(&"care_mobile_ffi.py".to_string()), "Python bindings");
    assert!(!files_with(&out, "kt").is_empty(), "Kotlin bindings");
    assert!(!files_with(&out, "swift").is_empty(), "Swift bindings");
    std::fs::copy(&lib, out.join(lib.file_name().unwrap())).expect("library next to the bindings");

    let server = TestServer::start(NURSE_CASELOAD).await;
    let token = server.token("tablet-py", Role::AmbulanceCrew);
    let second_token = server.token("tablet-py-2", Role::CommunityNurse);
    // The nurse's device syncs hundreds of patients: the Python test reads while it does.
    server.caseload("tablet-py-2", 0..NURSE_CASELOAD);
    let nhs = server.patients[0].clone();
    let other = server.patients[5].clone();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/test_care_ffi.py");
    let caseload = |server: &TestServer| {
        for i in [0, 1, 2] {
            care_sync_server::operator::ops::caseload_add(
                server.store.as_ref(),
                "tablet-py",
                server.patients[i].as_str(),
            )
            .ok();
        }
    };
    // Enrolment creates the device record; the caseload is assigned once it exists (the Python
    // test waits for the file the Rust side writes after assigning it).
    let ready = out.join("caseload-ready");
    let child = {
        let (root, script, nhs, other, token, second_token, ready) = (
            root.clone(),
            script.clone(),
            nhs.as_str().to_string(),
            other.as_str().to_string(),
            token,
            second_token,
            ready.clone(),
        );
        tokio::task::spawn_blocking(move || {
            Command::new("python3")
                .arg(&script)
                .env("CARE_FFI_DIR", &root)
                .env("CARE_TOKEN", token)
                .env("CARE_TOKEN_2", second_token)
                .env("CARE_NHS", nhs)
                .env("CARE_NHS_OTHER", other)
                .env("CARE_READY_FILE", ready)
                .env("CARE_NURSE_CASELOAD", NURSE_CASELOAD.to_string())
                .output()
                .expect("python3 runs")
        })
    };
    // Assign the caseload as soon as the device has enrolled (or stop waiting if Python ended).
    let mut child = child;
    let output = within(180, async { tokio::select! {
        output = &mut child => output.expect("python finished"),
        () = async {
            loop {
                if server.store.device_by_name("tablet-py").unwrap().is_some_and(|d| d.public_key.is_some()) {
                    caseload(&server);
                    std::fs::write(&ready, b"ok").unwrap();
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            std::future::pending::<()>().await
        } => unreachable!(),
    }})
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(output.status.success(), "the Python test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"));

    // What the device did reached the server: its offline attendance and its audited views.
    let patient = server.store.patient_by_nhs(&nhs).unwrap().unwrap();
    let mut summary =
        care_node::summary::PatientSummary::load(&server.store.load_document(&patient).unwrap().unwrap())
            .unwrap();
    let attendances = summary.entries::<care_node::summary::Encounter>().unwrap();
    assert!(
        attendances
            .iter()
            .any(|e| e.data.kind == "attendance" && e.data.provenance.device_name == "tablet-py")
    );
    let audit =
        server.store.audit_entries(&AuditFilter { patient: Some(patient), ..Default::default() }).unwrap();
    assert!(audit.iter().any(|a| a.action == "view:ffi-read" && a.actor == "tablet-py"), "{audit:?}");
    assert!(server.store.alerts(false).unwrap().iter().any(|a| a.kind == "break-glass"));
    assert!(server.store.device_by_name("tablet-py").unwrap().unwrap().wiped_at_ms.is_none());
}
