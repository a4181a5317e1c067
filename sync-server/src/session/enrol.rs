//! Enrolment, decided: a device proves it holds the key it presents, redeems its one-time
//! token, and the enrolment is audited. No sockets: the transport hands over the request and
//! writes back the answer.

use care_node::identity::{PublicKey, short_hex, verify};
use care_node::protocol::{EnrolRequest, EnrolResponse, enrol_signed_bytes};
use care_node::token::EnrolmentToken;

use crate::store::{EnrolError, ServerStore};

/// Answers an enrolment request: refused with the reason a device can act on, or enrolled (and
/// audited) with the server's key.
pub fn enrol(
    store: &dyn ServerStore,
    request: &EnrolRequest,
    server_key: PublicKey,
    now_ms: i64,
) -> EnrolResponse {
    let refused = |e: EnrolError| EnrolResponse::Refused { message: e.to_string() };
    let Ok(signature) = <[u8; 64]>::try_from(request.signature.as_slice()) else {
        return refused(EnrolError::BadSignature);
    };
    if !verify(&request.device_key, &enrol_signed_bytes(&request.secret, &request.device_key), &signature) {
        return refused(EnrolError::BadSignature);
    }
    let hash = EnrolmentToken::secret_hash(&request.secret);
    let key = request.device_key;
    match store.redeem_enrolment(hash, key, now_ms) {
        Ok(device) => {
            tracing::info!(device = %device.name, role = device.role.as_str(), "device enrolled");
            let detail = format!("key {}", short_hex(&key));
            if let Err(e) = store.append_audit(&device.name, "enrolled", None, &detail, now_ms) {
                tracing::error!(error = %e, "could not audit an enrolment");
            }
            EnrolResponse::Enrolled {
                device_name: device.name,
                role: device.role.as_str().to_string(),
                server_key,
            }
        }
        Err(e) => refused(e),
    }
}

#[cfg(test)]
mod tests {
    use care_node::identity::Identity;
    use care_node::protocol::{EnrolRequest, EnrolResponse, enrol_signed_bytes};
    use care_node::token::EnrolmentToken;

    use super::enrol;
    use crate::store::prelude::*;
    use crate::store::{AuditFilter, Role, sqlite::SqliteStore};

    fn request(secret: &[u8], device: &Identity, signer: &Identity) -> EnrolRequest {
        let key = device.public_key();
        EnrolRequest {
            secret: serde_bytes::ByteBuf::from(secret.to_vec()),
            device_key: key,
            signature: serde_bytes::ByteBuf::from(signer.sign(&enrol_signed_bytes(secret, &key)).to_vec()),
        }
    }

    #[test]
    fn a_token_enrols_one_proven_key_once_and_the_enrolment_is_audited() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let secret = b"one-time-secret-0123456789abcdef";
        store
            .create_enrolment("nurse-1", Role::CommunityNurse, EnrolmentToken::secret_hash(secret), i64::MAX)
            .unwrap();
        let (device, thief, server) =
            (Identity::generate(), Identity::generate(), Identity::generate().public_key());

        // A key the device cannot prove it holds is refused, and the token stays unused.
        let unproven = enrol(&store, &request(secret, &device, &thief), server, 10);
        assert!(
            matches!(&unproven, EnrolResponse::Refused { message } if message.contains("proof")),
            "{unproven:?}"
        );

        let enrolled = enrol(&store, &request(secret, &device, &device), server, 20);
        assert_eq!(
            enrolled,
            EnrolResponse::Enrolled {
                device_name: "nurse-1".into(),
                role: "community-nurse".into(),
                server_key: server
            }
        );
        let again = enrol(&store, &request(secret, &thief, &thief), server, 30);
        assert!(
            matches!(&again, EnrolResponse::Refused { message } if message.contains("already used")),
            "{again:?}"
        );
        let audit = store
            .audit_entries(&AuditFilter { actor: Some("nurse-1".into()), ..Default::default() })
            .unwrap();
        assert_eq!(audit.iter().filter(|a| a.action == "enrolled").count(), 1, "{audit:?}");
    }
}
