//! The device's view audit: every view of a patient is an entry in a hash-chained, ed25519-signed
//! log that syncs to the server.
//!
//! Entry `n` carries the hash of entry `n-1`; the device signs each entry's hash with its key.
//! The server checks each signature against the device's enrolled key and the chain against the
//! last entry it accepted: a missing stretch is a *gap*, an entry that does not follow the head
//! is a *fork* (or a tampered or replayed entry). Both raise an alert; neither is silently fixed.

use serde::{Deserialize, Serialize};

use crate::identity::{Identity, PublicKey, verify};
use crate::summary::PatientId;

/// One view of one patient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewEntry {
    /// 1, 2, 3, ... per device.
    pub seq: u64,
    /// Hash of the previous entry (zeros for the first).
    pub prev_hash: [u8; 32],
    /// Device clock.
    pub at_ms: i64,
    pub patient: PatientId,
    /// `show`, `search-open`, `ffi-read`, `permission-to-view`, `break-glass`, ...
    pub action: String,
    /// Opaque detail (never patient data), e.g. the reason code of a break glass.
    pub detail: String,
}

impl ViewEntry {
    pub fn hash(&self) -> [u8; 32] {
        let bytes = postcard::to_allocvec(self).expect("view entries always serialize");
        *blake3::keyed_hash(&blake3::hash(b"care-sync view log v1").into(), &bytes).as_bytes()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedView {
    pub entry: ViewEntry,
    pub signature: serde_bytes::ByteBuf,
}

impl SignedView {
    pub fn sign(identity: &Identity, entry: ViewEntry) -> Self {
        let signature = identity.sign(&entry.hash());
        Self { entry, signature: serde_bytes::ByteBuf::from(signature.to_vec()) }
    }

    pub fn verify(&self, key: &PublicKey) -> bool {
        <[u8; 64]>::try_from(self.signature.as_slice()).is_ok_and(|sig| verify(key, &self.entry.hash(), &sig))
    }
}

/// What the server concluded about a batch of entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainCheck {
    /// Entries with valid signatures, to record.
    pub accepted: Vec<ViewEntry>,
    /// Human-readable problems (no patient data): gaps, forks, bad signatures.
    pub problems: Vec<String>,
    /// The new head: `(seq, hash)` of the last accepted entry.
    pub head: (u64, [u8; 32]),
}

/// Checks a batch against the last accepted head.
/// The largest gap in a view log that is recorded as a gap; an entry further ahead is refused
/// (a device records far fewer views between two syncs).
pub const MAX_GAP: u64 = 100_000;

pub fn check_chain(key: &PublicKey, head: (u64, [u8; 32]), entries: &[SignedView]) -> ChainCheck {
    let mut check = ChainCheck { head, ..Default::default() };
    for signed in entries {
        let e = &signed.entry;
        if !signed.verify(key) {
            check.problems.push(format!("view log entry {} has an invalid signature (tampered)", e.seq));
            continue;
        }
        let (seq, hash) = check.head;
        if e.seq <= seq {
            check.problems.push(format!("view log entry {} repeats or rewrites history (fork)", e.seq));
            continue;
        }
        if e.seq > seq.saturating_add(MAX_GAP) || e.seq > i64::MAX as u64 {
            check.problems.push(format!("view log entry {} jumps implausibly far ahead of {seq}", e.seq));
            continue;
        }
        if e.seq > seq + 1 {
            check.problems.push(format!("view log entries {} to {} are missing (gap)", seq + 1, e.seq - 1));
        } else if e.prev_hash != hash {
            check.problems.push(format!("view log entry {} does not follow entry {seq} (fork)", e.seq));
        }
        check.head = (e.seq, e.hash());
        check.accepted.push(e.clone());
    }
    check
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(identity: &Identity, n: u64) -> Vec<SignedView> {
        let mut prev = [0; 32];
        (1..=n)
            .map(|seq| {
                let entry = ViewEntry {
                    seq,
                    prev_hash: prev,
                    at_ms: seq as i64,
                    patient: PatientId::from_bytes([1; 16]),
                    action: "show".into(),
                    detail: String::new(),
                };
                prev = entry.hash();
                SignedView::sign(identity, entry)
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_passes() {
        let id = Identity::generate();
        let c = check_chain(&id.public_key(), (0, [0; 32]), &chain(&id, 5));
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!((c.accepted.len(), c.head.0), (5, 5));
    }

    #[test]
    fn tampering_gaps_and_forks_are_flagged() {
        let id = Identity::generate();
        let mut entries = chain(&id, 5);
        entries[1].entry.action = "nothing to see".into();
        let c = check_chain(&id.public_key(), (0, [0; 32]), &entries);
        assert!(c.problems.iter().any(|p| p.contains("invalid signature")));
        assert!(c.problems.iter().any(|p| p.contains("missing (gap)")), "{:?}", c.problems);

        let entries = chain(&id, 5);
        let truncated = [entries[0].clone(), entries[3].clone()];
        let c = check_chain(&id.public_key(), (0, [0; 32]), &truncated);
        assert!(c.problems.iter().any(|p| p.contains("2 to 3 are missing")));

        let c = check_chain(&id.public_key(), (3, [0; 32]), &entries[3..]);
        assert!(c.problems.iter().any(|p| p.contains("does not follow")), "{:?}", c.problems);
        let c = check_chain(&id.public_key(), (5, entries[4].entry.hash()), &entries[2..3]);
        assert!(c.problems.iter().any(|p| p.contains("fork")));

        let other = Identity::generate();
        let c = check_chain(&other.public_key(), (0, [0; 32]), &entries);
        assert_eq!(c.accepted.len(), 0);
    }
}
