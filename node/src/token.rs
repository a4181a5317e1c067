//! Enrolment tokens: the one string an operator hands to a device.
//!
//! `care-enrol1.<base64url>` where the payload (postcard) holds the server's address, the
//! fingerprint of the server's key (which the device pins) and a 256-bit one-time secret. The
//! server keeps only a hash of the secret, with the device's name, role and an expiry.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

const PREFIX: &str = "care-enrol1.";

#[derive(Clone, Serialize, Deserialize)]
pub struct EnrolmentToken {
    pub server_addr: String,
    pub server_fingerprint: [u8; 32],
    pub secret: [u8; 32],
}

impl std::fmt::Debug for EnrolmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EnrolmentToken({}, secret [redacted])", self.server_addr)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    #[error("not an enrolment token (it should start with `{PREFIX}`)")]
    WrongPrefix,
    #[error("the enrolment token is damaged (was it copied completely?)")]
    Damaged,
}

impl EnrolmentToken {
    pub fn new(server_addr: String, server_fingerprint: [u8; 32]) -> Self {
        Self { server_addr, server_fingerprint, secret: rand::random() }
    }

    /// The hash under which the server stores this token's secret.
    pub fn secret_hash(secret: &[u8]) -> [u8; 32] {
        *blake3::hash(secret).as_bytes()
    }

    pub fn encode(&self) -> String {
        let bytes = Zeroizing::new(postcard::to_allocvec(self).expect("tokens always serialize"));
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes.as_slice()))
    }

    pub fn decode(token: &str) -> Result<Self, TokenError> {
        let payload = token.trim().strip_prefix(PREFIX).ok_or(TokenError::WrongPrefix)?;
        let bytes = Zeroizing::new(URL_SAFE_NO_PAD.decode(payload).map_err(|_| TokenError::Damaged)?);
        let (token, rest) = postcard::take_from_bytes::<Self>(&bytes).map_err(|_| TokenError::Damaged)?;
        if !rest.is_empty() {
            return Err(TokenError::Damaged);
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_damage() {
        let token = EnrolmentToken::new("127.0.0.1:7400".into(), [7; 32]);
        let text = token.encode();
        let back = EnrolmentToken::decode(&text).unwrap();
        assert_eq!(back.secret, token.secret);
        assert_eq!(back.server_addr, "127.0.0.1:7400");
        assert_eq!(EnrolmentToken::decode("hello").unwrap_err(), TokenError::WrongPrefix);
        assert_eq!(EnrolmentToken::decode(&text[..text.len() - 5]).unwrap_err(), TokenError::Damaged);
        assert!(!format!("{token:?}").contains(&URL_SAFE_NO_PAD.encode(token.secret)));
    }
}
