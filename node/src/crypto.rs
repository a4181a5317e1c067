//! Encryption at rest on the device.
//!
//! One random 256-bit [`DataKey`] encrypts every stored value with XChaCha20-Poly1305. A sealed
//! value is `version byte || 24-byte nonce || ciphertext+tag`; the caller's associated data binds
//! the value to its row (table, key, version), so a row copied over another fails to open.
//! Lookup columns hold keyed BLAKE3 hashes ([`LookupHasher`]), never NHS numbers or names.
//!
//! The data key itself is stored only wrapped by a [`KeyWrapper`]: Argon2id over a passphrase for
//! the CLI ([`PassphraseWrapper`]); a platform keystore through the FFI later. Destroying the
//! wrapped key makes the whole store unreadable (crypto-shredding).

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

const SEALED_VERSION: u8 = 1;
const NONCE_LEN: usize = 24;

/// Errors of sealing, opening and key wrapping. Never carries plaintext.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    #[error("stored value failed authentication (tampered, corrupt or moved from another row)")]
    Tampered,
    #[error("stored value has unknown format version {0}")]
    UnknownVersion(u8),
    #[error("wrong passphrase (or the wrapped data key is corrupt)")]
    WrongPassphrase,
    #[error("the wrapped data key is malformed")]
    MalformedWrappedKey,
    #[error("key derivation failed: {0}")]
    Kdf(String),
    #[error("the platform keystore failed: {0}")]
    Keystore(String),
    /// The user dismissed the keystore's prompt (biometrics, device PIN): nothing was opened.
    #[error("unlocking was cancelled at the keystore's prompt")]
    KeystoreCancelled,
}

/// The 256-bit key that encrypts every value of a device store. Zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; 32]);

impl DataKey {
    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self(rand::random())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Encrypts `plaintext`, binding it to `aad` (the row's identity).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        seal_with(&self.0, plaintext, aad)
    }

    /// Decrypts a value sealed with [`DataKey::seal`] under the same `aad`.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        open_with(&self.0, sealed, aad)
    }

    /// The key for lookup hashes, derived so that it is independent of the encryption key.
    pub fn lookup_hasher(&self) -> LookupHasher {
        LookupHasher(blake3::derive_key("care-node lookup keys v1", &self.0))
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey([redacted])")
    }
}

fn seal_with(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let nonce: [u8; NONCE_LEN] = rand::random();
    let ciphertext = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad })
        .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
    out.push(SEALED_VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    out
}

fn open_with(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let (&version, rest) = sealed.split_first().ok_or(CryptoError::Tampered)?;
    if version != SEALED_VERSION {
        return Err(CryptoError::UnknownVersion(version));
    }
    if rest.len() < NONCE_LEN + 16 {
        return Err(CryptoError::Tampered);
    }
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    let cipher = XChaCha20Poly1305::new(key.into());
    cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad })
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Tampered)
}

/// Keyed BLAKE3 for lookup columns: equal inputs give equal hashes within one store, and the
/// hashes reveal nothing without the store's key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct LookupHasher([u8; 32]);

impl LookupHasher {
    pub fn hash(&self, domain: &str, value: &str) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(domain.as_bytes());
        hasher.update(&[0]);
        hasher.update(value.as_bytes());
        *hasher.finalize().as_bytes()
    }
}

/// Wraps and unwraps the store's data key. The CLI uses a passphrase; the mobile apps supply
/// their platform keystore through the FFI.
pub trait KeyWrapper: Send + Sync {
    /// A short name recorded beside the wrapped key, e.g. `passphrase-argon2id`.
    fn kind(&self) -> &'static str;
    fn wrap(&self, key: &DataKey) -> Result<Vec<u8>, CryptoError>;
    fn unwrap(&self, wrapped: &[u8]) -> Result<DataKey, CryptoError>;
}

/// Argon2id cost parameters. The defaults follow OWASP's recommendation for Argon2id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        Self { memory_kib: 19 * 1024, iterations: 2, parallelism: 1 }
    }
}

/// Wraps the data key under Argon2id(passphrase, random salt). The wrapped form records its salt
/// and cost parameters, so stores made with other costs still open.
pub struct PassphraseWrapper {
    passphrase: Zeroizing<String>,
    params: KdfParams,
}

const WRAP_AAD: &[u8] = b"care-node data key v1";

impl PassphraseWrapper {
    pub fn new(passphrase: impl Into<String>) -> Self {
        Self::with_params(passphrase, KdfParams::default())
    }

    pub fn with_params(passphrase: impl Into<String>, params: KdfParams) -> Self {
        Self { passphrase: Zeroizing::new(passphrase.into()), params }
    }

    fn derive(&self, salt: &[u8], params: KdfParams) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
        let argon_params =
            argon2::Params::new(params.memory_kib, params.iterations, params.parallelism, Some(32))
                .map_err(|e| CryptoError::Kdf(e.to_string()))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, argon_params);
        let mut kek = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(self.passphrase.as_bytes(), salt, kek.as_mut())
            .map_err(|e| CryptoError::Kdf(e.to_string()))?;
        Ok(kek)
    }
}

impl KeyWrapper for PassphraseWrapper {
    fn kind(&self) -> &'static str {
        "passphrase-argon2id"
    }

    /// Layout: memory_kib u32 | iterations u32 | parallelism u32 | 16-byte salt | sealed key.
    fn wrap(&self, key: &DataKey) -> Result<Vec<u8>, CryptoError> {
        let salt: [u8; 16] = rand::random();
        let kek = self.derive(&salt, self.params)?;
        let mut out = Vec::new();
        for v in [self.params.memory_kib, self.params.iterations, self.params.parallelism] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&salt);
        out.extend_from_slice(&seal_with(&kek, key.as_bytes(), WRAP_AAD));
        Ok(out)
    }

    fn unwrap(&self, wrapped: &[u8]) -> Result<DataKey, CryptoError> {
        if wrapped.len() < 12 + 16 {
            return Err(CryptoError::MalformedWrappedKey);
        }
        let word = |i: usize| u32::from_le_bytes(wrapped[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        let params = KdfParams { memory_kib: word(0), iterations: word(1), parallelism: word(2) };
        // A corrupt or hostile file must not make us allocate gigabytes or spin for minutes.
        if params.memory_kib > 1024 * 1024 || params.iterations > 64 || params.parallelism > 16 {
            return Err(CryptoError::MalformedWrappedKey);
        }
        let (salt, sealed) = wrapped[12..].split_at(16);
        let kek = self.derive(salt, params)?;
        let key = open_with(&kek, sealed, WRAP_AAD).map_err(|_| CryptoError::WrongPassphrase)?;
        let bytes: [u8; 32] = key.as_slice().try_into().map_err(|_| CryptoError::MalformedWrappedKey)?;
        Ok(DataKey(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> KdfParams {
        KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 }
    }

    #[test]
    fn sealed_values_open_only_with_their_row_binding() {
        let key = DataKey::generate();
        let sealed = key.seal(b"allergic to penicillin", b"documents/1/v1");
        assert_eq!(key.open(&sealed, b"documents/1/v1").unwrap().as_slice(), b"allergic to penicillin");
        assert!(matches!(key.open(&sealed, b"documents/2/v1"), Err(CryptoError::Tampered)));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(key.open(&flipped, b"documents/1/v1"), Err(CryptoError::Tampered)));
        assert!(matches!(key.open(&sealed[..10], b"documents/1/v1"), Err(CryptoError::Tampered)));
    }

    #[test]
    fn passphrase_wrapping_round_trips_and_refuses_a_wrong_passphrase() {
        let key = DataKey::generate();
        let wrapped = PassphraseWrapper::with_params("correct horse", cheap()).wrap(&key).unwrap();
        let back = PassphraseWrapper::new("correct horse").unwrap(&wrapped).unwrap();
        assert_eq!(back.as_bytes(), key.as_bytes());
        assert!(matches!(
            PassphraseWrapper::new("wrong").unwrap(&wrapped),
            Err(CryptoError::WrongPassphrase)
        ));
        assert!(matches!(
            PassphraseWrapper::new("x").unwrap(&wrapped[..5]),
            Err(CryptoError::MalformedWrappedKey)
        ));
    }

    #[test]
    fn lookup_hashes_depend_on_the_store_key() {
        let a = DataKey::generate().lookup_hasher();
        let b = DataKey::generate().lookup_hasher();
        assert_eq!(a.hash("nhs", "9990000018"), a.hash("nhs", "9990000018"));
        assert_ne!(a.hash("nhs", "9990000018"), b.hash("nhs", "9990000018"));
    }
}
