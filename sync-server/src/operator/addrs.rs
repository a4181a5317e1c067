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
            if !valid(part) {
                return Err(format!(
                    "`{part}` is not a host and port (e.g. 192.0.2.1:7400, [2001:db8::1]:7400 or sync.example.nhs.uk:7400; several separated by commas)"
                ));
            }
        }
        Ok(ServerAddrs(parts.join(",")))
    }
}

/// An IP address and port, or a host name and port (letters, digits, `-` and `.`).
fn valid(part: &str) -> bool {
    if part.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0) {
        return true;
    }
    let Some((host, port)) = part.rsplit_once(':') else { return false };
    !host.is_empty()
        && host.len() <= 253
        && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !host.starts_with(['-', '.'])
        && port.parse::<u16>().is_ok_and(|p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::ServerAddrs;

    #[test]
    fn server_addresses_are_ip_or_host_names_with_ports_and_nothing_else() {
        for good in ["192.0.2.1:7400", "[2001:db8::1]:7400", "sync-a.example.nhs.uk:7400", "a:1, b:2"] {
            assert!(good.parse::<ServerAddrs>().is_ok(), "{good}");
        }
        assert_eq!("a:1 , b:2".parse::<ServerAddrs>().unwrap().as_str(), "a:1,b:2");
        for bad in [
            "",
            "192.0.2.1",
            "a:0",
            "a:1,",
            "a b:1",
            "[host]:7400",
            "[::1:7400",
            "::1]:7400",
            "a:b:7400",
            "a:99999",
            "-a:1",
        ] {
            assert!(bad.parse::<ServerAddrs>().is_err(), "{bad}");
        }
    }
}
