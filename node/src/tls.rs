//! TLS for care-sync: TLS 1.3 only, ed25519 keys only, both ends authenticated by key.
//!
//! Each side presents a self-signed certificate made from its ed25519 identity; nothing in the
//! certificate but the key matters. The device pins the server key's fingerprint learnt from its
//! enrolment token ([`PinnedServerVerifier`]); the server accepts a client key only if its
//! [`DeviceKeyPolicy`] says it is enrolled and not revoked ([`EnrolledDeviceVerifier`]), so an
//! unknown or revoked key fails inside the handshake. Enrolment connections present no client
//! certificate at all; the server then allows only the enrolment ALPN.
//!
//! Both verifiers check the TLS 1.3 handshake signature against the very key they compared, so a
//! certificate that carries one key but was signed with another cannot pass.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{Identity, PublicKey, SPKI_ED25519_PREFIX, ed25519_key_from_spki, fingerprint};

/// The name devices ask for; the pinned key, not the name, identifies the server.
pub const SERVER_NAME: &str = "care-sync";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("could not build the TLS certificate: {0}")]
    Certificate(String),
    #[error("could not configure TLS: {0}")]
    Config(String),
}

/// Decides, at each handshake, whether a device key may connect.
pub trait DeviceKeyPolicy: Send + Sync + std::fmt::Debug {
    fn is_allowed(&self, key: &PublicKey) -> bool;
}

/// The ed25519 key of a certificate, parsed properly (not by pattern matching).
pub fn certificate_key(cert: &CertificateDer<'_>) -> Option<PublicKey> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    ed25519_key_from_spki(parsed.subject_public_key_info().as_ref())
}

fn self_signed(identity: &Identity) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
    let der = identity.pkcs8_der();
    let pkcs8 = PrivatePkcs8KeyDer::from(der.to_vec());
    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    let cert = params.self_signed(&key_pair).map_err(|e| TlsError::Certificate(e.to_string()))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(pkcs8)))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn verify_ed25519_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    expected: Option<&PublicKey>,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoSignatureSchemesInCommon));
    }
    let key = certificate_key(cert)
        .ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
    if expected.is_some_and(|e| *e != key) {
        return Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ));
    }
    let mut spki = SPKI_ED25519_PREFIX.to_vec();
    spki.extend_from_slice(&key);
    rustls::crypto::verify_tls13_signature_with_raw_key(
        message,
        &SubjectPublicKeyInfoDer::from(spki.as_slice()),
        dss,
        &provider().signature_verification_algorithms,
    )
}

/// The device's view of the server: exactly a key whose fingerprint it pinned (the enrolled
/// one, and during a key rotation the announced next one).
#[derive(Debug)]
pub struct PinnedServerVerifier {
    fingerprints: Vec<[u8; 32]>,
}

impl PinnedServerVerifier {
    fn pinned(&self, key: &PublicKey) -> bool {
        self.fingerprints.contains(&fingerprint(key))
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match certificate_key(end_entity) {
            Some(key) if self.pinned(&key) => Ok(ServerCertVerified::assertion()),
            Some(_) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            None => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let key = certificate_key(cert).filter(|k| self.pinned(k)).ok_or(
            rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure),
        )?;
        verify_ed25519_tls13(message, cert, dss, Some(&key))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The server's view of devices: enrolled, unrevoked keys only; no certificate is allowed too
/// (for enrolment), and the server then permits only the enrolment ALPN.
#[derive(Debug)]
pub struct EnrolledDeviceVerifier {
    policy: Arc<dyn DeviceKeyPolicy>,
}

impl ClientCertVerifier for EnrolledDeviceVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let key = certificate_key(end_entity)
            .ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        if self.policy.is_allowed(&key) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::info!(device_key = %crate::identity::short_hex(&key), "refused unknown or revoked device key");
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519_tls13(message, cert, dss, None)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Transport limits shared by both ends (the same on both, as quinn expects).
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    // Keep-alives matter in live sessions only: they hold the NAT binding and let a dead peer be
    // noticed within the idle timeout; every 10 s (not 5) lets a phone's radio leave its
    // high-power state between them and still allows two lost pings (docs/protocol.md).
    transport
        .max_idle_timeout(Some(Duration::from_secs(30).try_into().expect("30 s is a valid idle timeout")))
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .max_concurrent_bidi_streams(4u32.into())
        .max_concurrent_uni_streams(0u32.into());
    // BBR: on a lossy mobile link Cubic takes random loss for congestion and crawls (docs/benchmarks.md:
    // a cold sync of 1,000 over `3g` took 2.6x the link's bandwidth time with Cubic, 1.1x with BBR).
    // `CARE_SYNC_CONGESTION=cubic` picks Cubic instead (for comparisons; both ends read it).
    if *CUBIC {
        transport.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
    } else {
        transport.congestion_controller_factory(Arc::new(crate::bbr::BbrConfig::default()));
    }
    Arc::new(transport)
}

/// `CARE_SYNC_CONGESTION`, read once: `cubic` or `bbr` (the default); anything else is said and
/// ignored.
static CUBIC: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
    match std::env::var("CARE_SYNC_CONGESTION").map(|v| v.to_ascii_lowercase()).as_deref() {
        Ok("cubic") => {
            tracing::info!("QUIC congestion control: Cubic (CARE_SYNC_CONGESTION)");
            true
        }
        Ok("bbr") | Err(_) => false,
        Ok(other) => {
            tracing::warn!(value = other, "CARE_SYNC_CONGESTION is `cubic` or `bbr`; using BBR");
            false
        }
    }
});

/// A device's QUIC client configuration. `identity` is `None` for enrolment. The server must
/// prove a key with one of `server_fingerprints`.
pub fn client_config(
    identity: Option<&Identity>,
    server_fingerprints: &[[u8; 32]],
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier {
            fingerprints: server_fingerprints.to_vec(),
        }));
    let mut crypto = match identity {
        Some(identity) => {
            let (cert, key) = self_signed(identity)?;
            builder.with_client_auth_cert(vec![cert], key).map_err(|e| TlsError::Config(e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// The server's QUIC configuration: its identity, the device policy and both ALPNs.
pub fn server_config(
    identity: &Identity,
    policy: Arc<dyn DeviceKeyPolicy>,
) -> Result<quinn::ServerConfig, TlsError> {
    let (cert, key) = self_signed(identity)?;
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(EnrolledDeviceVerifier { policy }))
        .with_single_cert(vec![cert], key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    crypto.alpn_protocols = vec![crate::protocol::ALPN_SYNC.to_vec(), crate::protocol::ALPN_ENROL.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config());
    // A device whose address changes mid-round (a new NAT binding, Wi-Fi to 3G) keeps its
    // connection: quinn validates the new path and follows it (tests/tests/links.rs).
    config.migration(true);
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_carry_the_identity_key() {
        let identity = Identity::generate();
        let (cert, _) = self_signed(&identity).unwrap();
        assert_eq!(certificate_key(&cert), Some(identity.public_key()));
    }
}
