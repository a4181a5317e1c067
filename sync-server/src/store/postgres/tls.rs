//! TLS to the database, as libpq says it in a connection URL: `sslmode` (`disable`, `prefer`
//! by default, or `require`) and `sslrootcert` (a PEM file of the certificate authorities the
//! database's certificate must chain to, or `system`). Unlike libpq's `prefer` and `require`,
//! the certificate is always verified, and for the host the URL names: against `sslrootcert`,
//! or the system's roots without it. `prefer` uses TLS whenever the database offers it;
//! `require` refuses a database that does not. TLS 1.3 only, rustls with ring (as the QUIC side).
//!
//! tokio-postgres reads `sslmode` itself but not `sslrootcert`, which is taken out of the URL
//! here before it is parsed, so one URL serves the store, `psql` and `pg_dump` alike. libpq's
//! `verify-ca` and `verify-full` are read as `require` (which verifies as `verify-full` does).
//! As in libpq, a Unix socket never uses TLS: a URL whose hosts are all sockets connects without.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::{Host, SslMode};

use crate::store::StoreError;

/// How to connect: the parsed URL, and TLS as it says.
pub(super) struct Connect {
    pub config: tokio_postgres::Config,
    pub tls: Tls,
}

/// The TLS side of a connection: none (`sslmode=disable`), or rustls verifying the database.
#[derive(Clone)]
pub(super) enum Tls {
    Off(tokio_postgres::NoTls),
    Verified(tokio_postgres_rustls::MakeRustlsConnect),
}

/// Where the database's certificate must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    System,
    File(PathBuf),
}

impl Connect {
    /// Reads `url` (a `postgres://` URL; its password is never shown in an error).
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let (url, roots) = take_root_cert(url)?;
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Backend(format!("the store URL: {e}").into()))?;
        let sockets_only = !config.get_hosts().is_empty()
            && config.get_hosts().iter().all(|h| matches!(h, Host::Unix(_)))
            && config.get_hostaddrs().is_empty();
        let tls = match (config.get_ssl_mode(), roots) {
            _ if sockets_only => Tls::Off(tokio_postgres::NoTls),
            (SslMode::Disable, Some(_)) => {
                return Err(StoreError::Backend(
                    "the store URL names sslrootcert but says sslmode=disable: leave one out".into(),
                ));
            }
            (SslMode::Disable, None) => Tls::Off(tokio_postgres::NoTls),
            (_, roots) => Tls::Verified(tokio_postgres_rustls::MakeRustlsConnect::new(client_config(
                &roots.unwrap_or(Roots::System),
            )?)),
        };
        Ok(Self { config, tls })
    }
}

/// `url` without its `sslrootcert` parameter, and what it named.
fn take_root_cert(url: &str) -> Result<(String, Option<Roots>), StoreError> {
    let Some((base, query)) = url.split_once('?') else { return Ok((url.to_string(), None)) };
    let mut roots = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("sslrootcert", "")) => {
                return Err(StoreError::Backend(
                    "the store URL's sslrootcert is empty: name a PEM file".into(),
                ));
            }
            Some(("sslrootcert", "system")) => roots = Some(Roots::System),
            Some(("sslrootcert", path)) => roots = Some(Roots::File(PathBuf::from(percent_decoded(path)?))),
            Some(("sslmode", "verify-ca" | "verify-full")) => kept.push("sslmode=require"),
            _ => kept.push(pair),
        }
    }
    let url = match kept.is_empty() {
        true => base.to_string(),
        false => format!("{base}?{}", kept.join("&")),
    };
    Ok((url, roots))
}

/// A URL parameter's value with its `%XX` escapes decoded, as libpq reads it.
fn percent_decoded(value: &str) -> Result<String, StoreError> {
    let bad = || StoreError::Backend("the store URL's sslrootcert has a malformed %-escape".into());
    let mut bytes = Vec::with_capacity(value.len());
    let mut rest = value.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = tail.get(..2).and_then(|h| std::str::from_utf8(h).ok()).ok_or_else(bad)?;
            bytes.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).map_err(|_| bad())
}

/// A rustls client configuration that trusts `roots` only.
fn client_config(roots: &Roots) -> Result<rustls::ClientConfig, StoreError> {
    let refuse = |why: String| StoreError::Backend(why.into());
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            let shown = path.display();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| refuse(format!("cannot read the store URL's sslrootcert {shown}: {e}")))?
                .collect::<Result<_, _>>()
                .map_err(|e| {
                    refuse(format!("the store URL's sslrootcert {shown} is not PEM certificates: {e}"))
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(refuse(format!(
                    "the store URL's sslrootcert {shown} holds no usable certificate"
                )));
            }
        }
        Roots::System => {
            // Unreadable ones are skipped, as every TLS client does; none at all is an error
            // only when a database's certificate is checked against them.
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| refuse(format!("TLS to the database: {e}")))?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(config)
}

/// What rustls said when `e` (a failed connection) is the database's certificate not
/// verifying: then the operator is told how to name its authority as well.
pub(super) fn certificate_problem(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(e) = next {
        let rustls_error = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref())
        });
        if let Some(problem @ rustls::Error::InvalidCertificate(_)) = rustls_error {
            return Some(problem.to_string());
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslrootcert_is_taken_out_of_the_url_and_the_rest_kept_in_order() {
        let (url, roots) =
            take_root_cert("postgres://u@h:5/db?sslmode=require&sslrootcert=/etc/ca.pem&application_name=x")
                .unwrap();
        assert_eq!(url, "postgres://u@h:5/db?sslmode=require&application_name=x");
        assert_eq!(roots, Some(Roots::File("/etc/ca.pem".into())));
        let (url, roots) = take_root_cert("postgres://u@h/db?sslrootcert=system").unwrap();
        assert_eq!((url.as_str(), roots), ("postgres://u@h/db", Some(Roots::System)));
        assert_eq!(take_root_cert("postgres://u@h/db").unwrap(), ("postgres://u@h/db".into(), None));
        let (url, _) = take_root_cert("postgres://u@h/db?sslmode=verify-full&sslrootcert=system").unwrap();
        assert_eq!(url, "postgres://u@h/db?sslmode=require", "libpq's verify-full: we always verify");
        assert!(take_root_cert("postgres://u@h/db?sslrootcert=").is_err());
        let (_, roots) = take_root_cert("postgres://u@h/db?sslrootcert=%2Fetc%2Fmy%20ca.pem").unwrap();
        assert_eq!(roots, Some(Roots::File("/etc/my ca.pem".into())), "decoded as libpq decodes it");
        assert!(take_root_cert("postgres://u@h/db?sslrootcert=%2").is_err());
        assert!(take_root_cert("postgres://u@h/db?sslrootcert=%zz").is_err());
    }

    #[test]
    fn a_root_file_that_is_missing_or_holds_no_certificate_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e =
            Connect::parse(&format!("postgres://u@h/db?sslrootcert={}", missing.display())).err().unwrap();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = Connect::parse(&format!("postgres://u@h/db?sslrootcert={}", empty.display())).err().unwrap();
        assert!(e.to_string().contains("empty.pem"), "{e}");
        let e = Connect::parse("postgres://u@h/db?sslmode=disable&sslrootcert=system").err().unwrap();
        assert!(e.to_string().contains("sslmode=disable"), "{e}");
        assert!(matches!(Connect::parse("postgres://u@h/db?sslmode=disable").unwrap().tls, Tls::Off(_)));
        assert!(matches!(Connect::parse("postgres://u@h/db").unwrap().tls, Tls::Verified(_)));
        // A Unix socket, as libpq: no TLS there (tokio-postgres would name no host to verify).
        let socket = Connect::parse("postgres://u@%2Fvar%2Frun%2Fpostgresql/db?sslmode=require").unwrap();
        assert!(matches!(socket.tls, Tls::Off(_)));
    }
}
