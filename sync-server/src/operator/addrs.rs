//! Where devices reach a region's instances, as written into enrolment tokens.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Where devices reach the region: one `host:port`, or several separated by commas (the
/// instances of a region, or a name that resolves to several). Written into enrolment tokens;
/// a device tries the next when one does not answer (`care_node::client`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServerAddrs(String);

impl ServerAddrs {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ServerAddrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<SocketAddr> for ServerAddrs {
    fn from(addr: SocketAddr) -> Self {
        ServerAddrs(addr.to_string())
    }
}

impl From<ServerAddrs> for String {
    fn from(addrs: ServerAddrs) -> String {
        addrs.0
    }
}

impl TryFrom<String> for ServerAddrs {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::str::FromStr for ServerAddrs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        for part in &parts {
            let port = part.rsplit_once(':').map(|(host, port)| (host.trim_matches(['[', ']']), port));
            match port {
                Some((host, port))
                    if !host.is_empty()
                        && port.parse::<u16>().is_ok_and(|p| p != 0)
                        && !host.chars().any(|c| c.is_whitespace() || c.is_control()) => {}
                _ => {
                    return Err(format!(
                        "`{part}` is not a host and port (e.g. 192.0.2.1:7400 or sync.example.nhs.uk:7400; several separated by commas)"
                    ));
                }
            }
        }
        Ok(ServerAddrs(parts.join(",")))
    }
}
