//! What the process-level tests share: the operator CLI as a command and a free port.

use std::path::Path;
use std::process::{Command, Stdio};

/// `care-sync-server --data-dir DATA ARGS…`, quiet on stderr.
pub fn server(data: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_care-sync-server"));
    command.arg("--data-dir").arg(data).args(args).stdin(Stdio::null()).stderr(Stdio::null());
    command
}

/// A port free on 127.0.0.1 now (for UDP and TCP alike on this machine).
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A one-time enrolment token for a new ambulance-crew device `name`, pointing at `port`.
pub fn token(data: &Path, name: &str, port: u16) -> String {
    let out = server(
        data,
        &[
            "enrol-device",
            "--name",
            name,
            "--role",
            "ambulance-crew",
            "--server-addr",
            &format!("127.0.0.1:{port}"),
        ],
    )
    .output()
    .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
