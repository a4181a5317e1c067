//! Bounded inspection of Automerge change chunks, before Automerge parses them.
//!
//! A change chunk may be DEFLATE-compressed as a whole (chunk type 2), and Automerge inflates it
//! without a limit: a 1 MB upload could become a gigabyte in memory. Automerge refuses
//! compressed columns inside a change chunk, so the chunk-level compression is the only one a
//! peer can use. [`change_size`] reads the chunk header, inflates a compressed body itself with a
//! hard limit, and says how large the change really is; callers refuse anything over their limit
//! before handing the bytes to Automerge. Written by hand because the chunk header is
//! Automerge's own format (`storage/chunk.rs` of automerge 0.12) and no crate exposes it.

use std::io::Read;

/// The four bytes every Automerge chunk starts with.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHANGE: u8 = 1;
const COMPRESSED_CHANGE: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    #[error("not an Automerge change chunk")]
    NotAChange,
    #[error("the change chunk is truncated or has bytes after its end")]
    BadLength,
    #[error("the change is larger than {limit} bytes once inflated")]
    TooLarge { limit: usize },
    #[error("the compressed change does not inflate")]
    BadCompression,
}

/// The size of the change in `bytes` once inflated, if it is at most `limit`. Inflates at most
/// `limit + 1` bytes, whatever the chunk claims.
pub fn change_size(bytes: &[u8], limit: usize) -> Result<usize, ChunkError> {
    if bytes.len() < 10 || bytes[..4] != MAGIC {
        return Err(ChunkError::NotAChange);
    }
    let chunk_type = bytes[8];
    let (len, used) = uleb128(&bytes[9..]).ok_or(ChunkError::BadLength)?;
    let body = &bytes[9 + used..];
    if body.len() as u64 != len {
        return Err(ChunkError::BadLength);
    }
    match chunk_type {
        CHANGE if bytes.len() <= limit => Ok(bytes.len()),
        CHANGE => Err(ChunkError::TooLarge { limit }),
        COMPRESSED_CHANGE => {
            let mut inflated = Vec::new();
            flate2::read::DeflateDecoder::new(body)
                .take(limit as u64 + 1)
                .read_to_end(&mut inflated)
                .map_err(|_| ChunkError::BadCompression)?;
            // The inflated change gets a header of its own (at most 9 + 10 bytes).
            if inflated.len() + 19 > limit {
                return Err(ChunkError::TooLarge { limit });
            }
            Ok(inflated.len() + 19)
        }
        _ => Err(ChunkError::NotAChange),
    }
}

/// An unsigned LEB128 number and how many bytes it took.
fn uleb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use automerge::transaction::Transactable;

    use super::*;

    fn change_of(text_len: usize) -> automerge::Change {
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, "x", "a".repeat(text_len)).unwrap();
        doc.commit();
        doc.get_last_local_change().unwrap()
    }

    #[test]
    fn a_plain_change_is_its_length() {
        let change = change_of(10);
        let bytes = change.raw_bytes();
        assert_eq!(change_size(bytes, 1 << 20), Ok(bytes.len()));
        assert_eq!(change_size(bytes, bytes.len() - 1), Err(ChunkError::TooLarge { limit: bytes.len() - 1 }));
    }

    #[test]
    fn a_compressed_change_is_measured_inflated_and_a_bomb_is_stopped_at_the_limit() {
        let mut change = change_of(100_000);
        let compressed = change.bytes().into_owned();
        assert_eq!(compressed[8], COMPRESSED_CHANGE, "automerge compressed it");
        assert!(compressed.len() < 2_000);
        let size = change_size(&compressed, 1 << 20).unwrap();
        assert!(size >= 100_000, "{size}");
        assert_eq!(change_size(&compressed, 50_000), Err(ChunkError::TooLarge { limit: 50_000 }));
        // A bomb: a gigabyte of zeros in about a megabyte; only the limit's worth is inflated.
        let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        for _ in 0..64 {
            encoder.write_all(&vec![0u8; 1 << 20]).unwrap();
        }
        let body = encoder.finish().unwrap();
        let mut bomb = MAGIC.to_vec();
        bomb.extend_from_slice(&[0, 0, 0, 0, COMPRESSED_CHANGE]);
        let mut len = body.len();
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            bomb.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                break;
            }
        }
        bomb.extend_from_slice(&body);
        assert_eq!(change_size(&bomb, 256 * 1024), Err(ChunkError::TooLarge { limit: 256 * 1024 }));
    }

    #[test]
    fn other_chunks_and_garbage_are_not_changes() {
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, "x", 1).unwrap();
        assert_eq!(change_size(&doc.save(), 1 << 20), Err(ChunkError::NotAChange));
        assert_eq!(change_size(b"hello world", 1 << 20), Err(ChunkError::NotAChange));
        let change = change_of(5);
        let bytes = change.raw_bytes();
        assert_eq!(change_size(&bytes[..bytes.len() - 1], 1 << 20), Err(ChunkError::BadLength));
    }
}
