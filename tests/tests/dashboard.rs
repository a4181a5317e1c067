//! The dashboard in a real browser: headless Chromium driven over WebDriver (chromedriver), no
//! internet. An operator signs in, enrols a device through the page (and the device really
//! enrols with the token the page shows), looks up who saw a patient, acknowledges a break-glass
//! alert, and the test saves a screenshot.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/test` installs them when missing).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use care_node::client::request_access;
use care_node::protocol::AccessKind;
use care_node::sync::AccessRequest;
use care_sync_e2e::{OPERATOR_TOKEN, TestConsole, TestDevice, TestServer, within};
use care_sync_server::store::{AuditFilter, Role};
use serde_json::{Value, json};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists()).or_else(|| {
        let name = candidates.first()?.rsplit('/').next()?;
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(|d| PathBuf::from(d).join(name))
            .find(|p| p.exists())
    })
}

/// A chromedriver process and one headless Chromium session.
struct Browser {
    driver: Child,
    session: String,
    agent: ureq::Agent,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let driver = find_program(&["/usr/bin/chromedriver"]).expect(
            "chromedriver not found: install Debian's chromium and chromium-driver \
             (`apt-get install chromium chromium-driver`; .ci/test does it)",
        );
        let chromium = find_program(&["/usr/bin/chromium", "/usr/bin/chromium-browser"])
            .expect("chromium not found: install Debian's chromium package");
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while agent.get(format!("{base}/status")).call().is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1600",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
        }}});
        let mut response =
            agent.post(format!("{base}/session")).send_json(&capabilities).expect("new session");
        let body: Value = response.body_mut().read_json().expect("session JSON");
        let session =
            body["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {body}")).to_string();
        Browser { driver: child, session: format!("{base}/session/{session}"), agent, _profile: profile }
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.session);
        let mut response = match method {
            "GET" => self.agent.get(&url).call(),
            _ => self.agent.post(&url).send_json(&body),
        }
        .expect("WebDriver call");
        let status = response.status().as_u16();
        let value: Value = response.body_mut().read_json().expect("WebDriver JSON");
        assert!(status < 300, "WebDriver {method} {path}: {status} {value}");
        value["value"].clone()
    }

    fn open(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url }));
    }

    fn find(&self, css: &str) -> String {
        let element = self.call("POST", "/element", json!({ "using": "css selector", "value": css }));
        element[ELEMENT].as_str().unwrap().to_string()
    }

    fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css);
        self.call("POST", &format!("/element/{element}/clear"), json!({}));
        self.call("POST", &format!("/element/{element}/value"), json!({ "text": text }));
    }

    fn click(&self, css: &str) {
        let element = self.find(css);
        self.call("POST", &format!("/element/{element}/click"), json!({}));
    }

    fn script(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", json!({ "script": script, "args": [] }))
    }

    /// Waits until `script` returns true in the page.
    fn wait_for(&self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.script(script) != Value::Bool(true) {
            let message = self.script("return document.querySelector('#message').textContent");
            assert!(Instant::now() < deadline, "timed out waiting for {what}; page says {message}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn text(&self, css: &str) -> String {
        let element = self.find(css);
        self.call("GET", &format!("/element/{element}/text"), json!({})).as_str().unwrap().to_string()
    }

    fn screenshot(&self) -> Vec<u8> {
        let data = self.call("GET", "/screenshot", json!({}));
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, data.as_str().unwrap()).unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.agent.delete(&self.session).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_enrols_a_device_and_acknowledges_an_alert_in_the_dashboard() {
    let server = TestServer::start(6).await;
    let mut crew = TestDevice::enrolled(&server, "ambulance-1", Role::AmbulanceCrew).await;
    server.caseload("ambulance-1", [0, 1]);
    within(30, crew.sync()).await.unwrap();
    let broken = server.patients[3].clone();
    let request = AccessRequest {
        nhs_number: broken.as_str().into(),
        kind: AccessKind::BreakGlass,
        reason: "unconscious, no carers present".into(),
    };
    assert!(within(30, request_access(&mut crew.store, request)).await.unwrap().0.granted);
    let alert = server.store.alerts(false).unwrap()[0].id;
    let mut second = TestDevice::enrolled(&server, "ambulance-2", Role::AmbulanceCrew).await;
    within(30, second.sync()).await.unwrap();
    let patient_to_add = server.patients[5].clone();
    let console = TestConsole::start(&server, Duration::from_secs(24 * 3600)).await;

    let base = console.base.clone();
    let store = server.store.clone();
    let (token, screenshot) = tokio::task::spawn_blocking(move || {
        let browser = Browser::start();
        browser.open(&format!("{base}/"));
        // Signed out: no panel is shown at all, empty or not (the CSS grid does not override
        // `hidden`), only the sign-in form.
        let shown = "return getComputedStyle(document.querySelector('#console')).display";
        assert_eq!(browser.script(shown), json!("none"));
        assert_eq!(browser.script("return getComputedStyle(document.querySelector('#devices')).display === 'none' || document.querySelector('#devices').offsetParent === null"), json!(true));
        assert_eq!(browser.script("return document.querySelector('#sign-out').hidden"), json!(true));

        // A wrong token is refused and shows nothing.
        browser.type_into("#token-input", "not-the-operator-token");
        browser.click("#token-save");
        browser.wait_for("the refusal", "return document.querySelector('#message').className === 'error'");
        assert!(browser.text("#message").contains("not accepted"));
        assert_eq!(browser.script("return document.querySelector('#console').hidden"), Value::Bool(true));

        browser.type_into("#token-input", OPERATOR_TOKEN);
        browser.click("#token-save");
        browser.wait_for("the device table", "return !!document.querySelector('tr[data-device=\"ambulance-1\"]')");
        assert!(browser.text("#status").contains("patients"));
        // Times in one form, UTC.
        let row = browser.text("tr[data-device=\"ambulance-1\"]");
        assert!(row.contains(" UTC"), "{row}");

        // Scopes: a caseload change through the page shows in the table.
        assert!(browser.text("tr[data-scope=\"ambulance-1\"]").contains("2 patient(s)"));
        browser.type_into("#scope-device", "ambulance-1");
        browser.type_into("#scope-value", patient_to_add.as_str());
        browser.click("#scope-submit");
        browser.wait_for(
            "the caseload to grow",
            "return document.querySelector('tr[data-scope=\"ambulance-1\"]').textContent.includes('3 patient(s)')",
        );
        assert!(!browser.text("#scopes").contains(patient_to_add.as_str()), "NHS numbers are not shown");

        // Settings: the source of each value, and an operator's change.
        assert!(browser.text("tr[data-setting=\"budget\"]").contains("default"));
        browser.type_into("#setting-value", "750");
        browser.click("#setting-submit");
        browser.wait_for(
            "the new budget",
            "return document.querySelector('tr[data-setting=\"budget\"]').textContent.includes('750')",
        );
        assert!(browser.text("tr[data-setting=\"budget\"]").contains("operator"));

        // A wipe asked for shows as pending (the device has not yet heard it and confirmed).
        browser.script("window.confirm = () => true; return true");
        browser.click("tr[data-device=\"ambulance-2\"] .wipe");
        browser.wait_for(
            "the pending wipe",
            "return document.querySelector('tr[data-device=\"ambulance-2\"]').textContent.includes('wipe pending')",
        );

        // Enrol a device through the page.
        browser.type_into("#enrol-name", "ambulance-9");
        browser.click("#enrol-submit");
        browser.wait_for(
            "the one-time token",
            "return document.querySelector('#enrol-token').textContent.startsWith('care-enrol1.')",
        );
        let token = browser.text("#enrol-token");
        browser.wait_for("the new device row", "return !!document.querySelector('tr[data-device=\"ambulance-9\"]')");
        assert!(browser.text("tr[data-device=\"ambulance-9\"]").contains("pending"));

        // Who saw this patient.
        browser.type_into("#audit-nhs", broken.as_str());
        browser.click("#audit-submit");
        browser.wait_for("the audit lines", "return !document.querySelector('#audit-results').hidden");
        assert!(browser.text("#audit-results").contains("break-glass"));

        // Acknowledge the break-glass alert with a note.
        // The clinician's reason is sealed in the list; showing it is an audited look.
        let row = format!("tr[data-alert=\"{alert}\"]");
        assert!(!browser.text(&row).contains("unconscious"), "the reason is not shown unasked");
        browser.click(&format!("{row} .show-reason"));
        browser.wait_for(
            "the reason",
            &format!("return document.querySelector('{}').textContent.includes('unconscious')", row.replace('\'', "\\'")),
        );
        let looked = store.audit_entries(&Default::default()).unwrap();
        assert!(looked.iter().any(|a| a.action == "alert-reason-viewed"), "the look is audited");
        assert!(browser.text("#quarantine").contains("none"), "the quarantine panel is there, empty");
        browser.type_into(&format!("{row} .ack-note"), "reviewed with the crew lead: justified");
        browser.click(&format!("{row} .ack"));
        browser.wait_for("the alert to close", &format!("return !document.querySelector('{}')", row.replace('\'', "\\'")));
        assert!(browser.text("#message").contains("acknowledged"));
        assert!(store.alerts(false).unwrap().is_empty(), "the store has the acknowledgement");
        // Acknowledged alerts are there on request, with their note.
        browser.click("#alerts-all");
        browser.wait_for("the acknowledged alert", &format!("return !!document.querySelector('{}')", row.replace('\'', "\\'")));
        assert!(browser.text(&row).contains("reviewed with the crew lead"));
        assert!(browser.text("#feed-refusals").contains("none"), "the feed refusals table is there");

        // Sign-out state aside, the page fetched nothing from the internet (no external resources).
        let external = browser.script(
            "return performance.getEntriesByType('resource').filter(e => !e.name.startsWith(location.origin)).length",
        );
        assert_eq!(external, json!(0));
        let screenshot = browser.screenshot();

        // Sign out: the token is gone and the panels with it.
        browser.click("#sign-out");
        browser.wait_for("the signed-out page", "return getComputedStyle(document.querySelector('#console')).display === 'none'");
        assert_eq!(browser.script("return sessionStorage.getItem('care-sync-token')"), Value::Null);
        assert!(browser.text("#message").contains("Signed out"));
        (token, screenshot)
    })
    .await
    .unwrap();

    // The token the page showed enrols a real device.
    let mut device = TestDevice::new("ambulance-9");
    within(30, care_node::client::enrol(&mut device.store, &token)).await.expect("the page's token enrols");
    within(30, device.sync()).await.unwrap();
    let audit = server.store.audit_entries(&AuditFilter::default()).unwrap();
    assert!(audit.iter().any(|a| a.action == "alert-acknowledged" && a.detail.contains("justified")));

    assert!(screenshot.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&path, &screenshot).unwrap();
    println!("dashboard screenshot: {} ({} bytes)", path.display(), screenshot.len());
}
