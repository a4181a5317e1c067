//! Ed25519 identities: a device's key pair (generated on the device, stored encrypted) and the
//! server's. The public key is also the device's Automerge actor id, which binds every change a
//! device makes to the key the server enrolled.

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use zeroize::Zeroizing;

/// An ed25519 key pair. The secret never prints and is zeroized on drop.
pub struct Identity {
    signing: SigningKey,
}

/// A 32-byte ed25519 public key.
pub type PublicKey = [u8; 32];

/// The DER prefix of a PKCS#8 v1 ed25519 private key (RFC 8410); the 32-byte seed follows.
const PKCS8_ED25519_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// The DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410); the 32-byte key follows.
pub const SPKI_ED25519_PREFIX: [u8; 12] =
    [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

impl Identity {
    /// A new key pair seeded from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let seed: Zeroizing<[u8; 32]> = Zeroizing::new(rand::random());
        Self::from_seed(&seed)
    }

    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self { signing: SigningKey::from_bytes(seed) }
    }

    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    pub fn public_key(&self) -> PublicKey {
        self.signing.verifying_key().to_bytes()
    }

    /// The pinned form of the public key, as carried in enrolment tokens.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.public_key())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// The private key as PKCS#8 DER, for TLS.
    pub fn pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        let mut der = Zeroizing::new(PKCS8_ED25519_PREFIX.to_vec());
        der.extend_from_slice(self.signing.as_bytes());
        der
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity(public {})", short_hex(&self.public_key()))
    }
}

/// BLAKE3 of a public key: what enrolment tokens carry and devices pin.
pub fn fingerprint(public_key: &PublicKey) -> [u8; 32] {
    *blake3::keyed_hash(&blake3::hash(b"care-sync key fingerprint v1").into(), public_key).as_bytes()
}

/// Verifies an ed25519 signature by `public_key` over `message`.
pub fn verify(public_key: &PublicKey, message: &[u8], signature: &[u8; 64]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public_key) else { return false };
    key.verify(message, &ed25519_dalek::Signature::from_bytes(signature)).is_ok()
}

/// The ed25519 key inside a SubjectPublicKeyInfo, if it is one.
pub fn ed25519_key_from_spki(spki: &[u8]) -> Option<PublicKey> {
    let key = spki.strip_prefix(&SPKI_ED25519_PREFIX[..])?;
    key.try_into().ok()
}

/// Bytes in lower-case hex (key fingerprints for operators).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first eight bytes of a key or hash in hex: an opaque id fit for logs.
pub fn short_hex(bytes: &[u8]) -> String {
    hex(&bytes[..bytes.len().min(8)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_with_the_signing_key() {
        let a = Identity::generate();
        let b = Identity::generate();
        let sig = a.sign(b"enrol");
        assert!(verify(&a.public_key(), b"enrol", &sig));
        assert!(!verify(&b.public_key(), b"enrol", &sig));
        assert!(!verify(&a.public_key(), b"other", &sig));
    }

    #[test]
    fn seed_round_trips() {
        let a = Identity::generate();
        let b = Identity::from_seed(&a.seed());
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(a.pkcs8_der().len(), 48);
    }
}
