//! The sync protocol's messages and framing, shared by device and server.
//!
//! A sync session is one bidirectional QUIC stream on a connection with ALPN [`ALPN_SYNC`].
//! Every frame is `u32 length (big-endian) | u8 protocol version | postcard message`; the length
//! counts the version byte and the message and may not exceed [`MAX_FRAME_LEN`]. A frame that is
//! too long, of another version, or not a valid message ends that connection with a clear error.
//!
//! The exchange (see `docs/protocol.md`):
//! ```text
//! device: Hello{cursor, resume}         server: Welcome{device name, role, time}
//! device: Upload{through, docs}...      server: UploadAck{through}...   (durable before acked)
//! device: UploadDone                    server: Docs{round, items}... RoundDone{round}
//! device: PageApplied{round}... (one per Docs frame, once it is durable)
//! device: RoundAck{round}
//! ```
//! `cursor` is the server change sequence number up to which the device holds every change of
//! every document it holds; a round sends only what lies after it.

use serde::{Deserialize, Serialize};

use crate::identity::PublicKey;
use crate::summary::PatientId;

/// ALPN of sync connections; the device must present an enrolled key.
pub const ALPN_SYNC: &[u8] = b"care-sync/1";
/// ALPN of enrolment connections; the device presents no certificate, only its token.
pub const ALPN_ENROL: &[u8] = b"care-enrol/1";
/// Version byte carried by every frame.
pub const PROTOCOL_VERSION: u8 = 5;
/// The largest frame either side accepts (version byte and message).
pub const MAX_FRAME_LEN: usize = 8 * 1024 * 1024;
/// The most distinct documents, and the most changes, a device puts in one upload batch (the
/// server's `[limits]` default to these; a lower setting there makes larger batches refused).
pub const MAX_UPLOAD_DOCS: usize = 1_000;
pub const MAX_UPLOAD_CHANGES: usize = 10_000;
/// The largest frame of an enrolment exchange, and of any peer that has not authenticated.
pub const MAX_ENROL_FRAME_LEN: usize = 4 * 1024;
/// Soft target for the size of one `Docs` or `Upload` frame.
pub const TARGET_BATCH_BYTES: usize = 512 * 1024;

/// QUIC application close codes.
pub mod close {
    /// The session ended normally.
    pub const DONE: u32 = 0;
    /// A frame was malformed, oversized, unexpected or of another version.
    pub const PROTOCOL: u32 = 1;
    /// The peer is not allowed to do this (unknown device, foreign actor, bad token).
    pub const REFUSED: u32 = 2;
    /// Something failed on this side; the peer may retry later.
    pub const INTERNAL: u32 = 3;
}

/// Where an interrupted round stopped: every document up to and including `through` (in the
/// round's order) was applied at `round`. A round has two parts, each in ascending patient id
/// order: the priority part first (new documents of patients with alerts, incidents or grants),
/// then the rest; `priority` says which part `through` is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub round: u64,
    pub priority: bool,
    pub through: PatientId,
}

/// Changes of one document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocChanges {
    pub doc: PatientId,
    pub changes: Vec<serde_bytes::ByteBuf>,
}

/// Access a clinician asks for at the point of care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
pub enum AccessKind {
    /// The patient gave permission to view their record.
    PermissionToView,
    /// Emergency access in the patient's best interest, with a reason; raises an alert.
    BreakGlass,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// `staged_server_key`: the next server key the device has learnt (key rotation), if any.
    /// `incarnation`: the server store's incarnation the device last synced with.
    Hello {
        cursor: u64,
        resume: Option<Resume>,
        staged_server_key: Option<PublicKey>,
        incarnation: Option<[u8; 16]>,
    },
    /// Asks for a patient outside the device's scope (after `Hello`, before `UploadDone`).
    AccessRequest {
        nhs_number: String,
        kind: AccessKind,
        reason: String,
    },
    /// Entries of the device's view log, in order.
    ViewLog {
        entries: Vec<crate::viewlog::SignedView>,
    },
    /// Offline changes; `through` is the device's outbox position this batch reaches.
    Upload {
        through: u64,
        docs: Vec<DocChanges>,
    },
    UploadDone,
    RoundAck {
        round: u64,
    },
    /// The device destroyed its patient data as told.
    WipeConfirmed,
    /// Keep the session open after the round: the server pushes a new round whenever something
    /// in the device's scope changes (sent right after `Hello`).
    Watch,
    /// The oldest `Docs` frame of `round` not yet acknowledged is applied and durable here (one
    /// per frame, in order). The server keeps only a link's worth of a round unapplied, so a
    /// link lost mid-round costs about that much sent again (protocol version 4).
    PageApplied {
        round: u64,
    },
}

/// What the server sends for one document in a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DocBody {
    /// The whole document (`save()`), for a document newly in scope (or one whose changes
    /// compaction dropped). `listing` is what the device lists and searches the document by,
    /// derived by the server from the document when it saved it (`None` for a document saved
    /// before the server recorded listings): a device that does not hold the document stores
    /// it as received under that listing and parses it when it is opened, so a cold sync costs
    /// receiving, sealing and inserting its bytes (protocol version 5).
    Whole { saved: serde_bytes::ByteBuf, listing: Option<crate::summary::Listing> },
    /// Changes after the device's cursor, in server order.
    Changes(Vec<serde_bytes::ByteBuf>),
    /// The patient left the device's scope: delete the document.
    Purge,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocItem {
    pub doc: PatientId,
    pub body: DocBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// `lease_ms`: how long the device may show patient data without syncing. `wipe`: destroy all
    /// patient data now, then confirm. `server_key`: the key this connection's TLS handshake
    /// proved; `next_server_key`: the key the server will present after a rotation, which the
    /// device pins beside the current one until the server presents it.
    Welcome {
        device_name: String,
        role: String,
        server_time_ms: i64,
        lease_ms: u64,
        wipe: bool,
        server_key: PublicKey,
        next_server_key: Option<PublicKey>,
        /// The server store's incarnation; `restored`: it differs from the device's, so the server
        /// was restored from a backup: the device queues all its own changes again, and this
        /// session's round starts from the beginning.
        incarnation: [u8; 16],
        restored: bool,
    },
    AccessDecision {
        granted: bool,
        message: String,
        until_ms: i64,
    },
    /// View log entries up to `through` are recorded on the server.
    ViewLogAck {
        through: u64,
    },
    /// Every upload up to `through` is settled on the server: durable, except the documents in
    /// `refused`, whose changes in those uploads broke the write policy and were quarantined for
    /// review (nothing of them is applied). The device keeps its own copy of what was refused and
    /// takes the server's version of those documents.
    UploadAck {
        through: u64,
        refused: Vec<RefusedDoc>,
    },
    /// Items of a round: the priority part first, then the rest, each in ascending patient id
    /// order across frames; a frame holds items of one part only.
    /// `round_items`: how many items the whole round has (for progress).
    Docs {
        round: u64,
        priority: bool,
        round_items: u64,
        items: Vec<DocItem>,
    },
    /// The round is complete: the device's cursor becomes `round`. `left_out`: patients in scope
    /// that the device's document budget left out.
    RoundDone {
        round: u64,
        documents_in_scope: u64,
        left_out: u64,
    },
    /// The server refuses the session; the message holds no patient data.
    Refused {
        message: String,
    },
}

/// A document whose uploaded changes the server refused: the rule (a [`crate::policy::Rule`]
/// name) and where they wrote (`section/entry id`, or `document`). Never content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedDoc {
    pub doc: PatientId,
    pub rule: String,
    pub place: String,
    /// The hashes of the refused changes: only changes the server does not have (one it already
    /// accepted is never refused). Empty when none parsed.
    pub changes: Vec<[u8; 32]>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolRequest {
    pub secret: serde_bytes::ByteBuf,
    pub device_key: [u8; 32],
    /// ed25519 over [`enrol_signed_bytes`], proving the device holds the key it enrols.
    pub signature: serde_bytes::ByteBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrolResponse {
    Enrolled { device_name: String, role: String, server_key: [u8; 32] },
    Refused { message: String },
}

/// The bytes a device signs to enrol: a domain tag, the token secret and its public key.
pub fn enrol_signed_bytes(secret: &[u8], device_key: &[u8; 32]) -> Vec<u8> {
    let mut m = b"care-sync enrol v1\0".to_vec();
    m.extend_from_slice(secret);
    m.extend_from_slice(device_key);
    m
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge(usize),
    #[error("frame of {0} bytes exceeds the limit of {1} bytes for this exchange")]
    TooLargeHere(usize, usize),
    #[error("frame is empty")]
    Empty,
    #[error("frame has protocol version {0}, this side speaks version {PROTOCOL_VERSION}")]
    WrongVersion(u8),
    #[error("frame is not a valid message: {0}")]
    Malformed(String),
}

/// Encodes a message as one frame, length prefix included.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    out.push(PROTOCOL_VERSION);
    let out = postcard::to_extend(message, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - 4;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let mut out = out;
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Checks a frame's announced length before anything is read.
pub fn check_frame_len(len: u32) -> Result<usize, FrameError> {
    let len = len as usize;
    match len {
        0 => Err(FrameError::Empty),
        n if n > MAX_FRAME_LEN => Err(FrameError::TooLarge(n)),
        n => Ok(n),
    }
}

/// Decodes a frame body (after the length prefix).
pub fn decode_frame<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    let (&version, message) = body.split_first().ok_or(FrameError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(FrameError::WrongVersion(version));
    }
    postcard::from_bytes(message).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let msg = ClientMessage::Hello {
            cursor: 42,
            resume: None,
            staged_server_key: None,
            incarnation: Some([7; 16]),
        };
        let frame = encode_frame(&msg).unwrap();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap());
        assert_eq!(check_frame_len(len).unwrap(), frame.len() - 4);
        assert_eq!(decode_frame::<ClientMessage>(&frame[4..]).unwrap(), msg);
    }

    #[test]
    fn bad_frames_are_refused_with_a_reason() {
        assert!(matches!(check_frame_len(u32::MAX), Err(FrameError::TooLarge(_))));
        assert!(matches!(check_frame_len(0), Err(FrameError::Empty)));
        assert!(matches!(decode_frame::<ClientMessage>(&[9, 0]), Err(FrameError::WrongVersion(9))));
        assert!(matches!(
            decode_frame::<ClientMessage>(&[PROTOCOL_VERSION, 200, 1, 2]),
            Err(FrameError::Malformed(_))
        ));
    }
}
