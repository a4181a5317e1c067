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
    #[error("the change claims more than {limit} items in one column")]
    TooManyItems { limit: u64 },
}

/// The most items (operations, predecessors, …) one column of a change may claim. Automerge
/// expands run-length-encoded counts as it parses, so a change of a few bytes could otherwise
/// claim billions of operations.
pub const MAX_COLUMN_ITEMS: u64 = 100_000;

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
        CHANGE if bytes.len() <= limit => {
            count_items(body)?;
            Ok(bytes.len())
        }
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
            count_items(&inflated)?;
            Ok(inflated.len() + 19)
        }
        _ => Err(ChunkError::NotAChange),
    }
}

/// Reads a change chunk's body (Automerge's layout: dependencies, actor, seq, start op, time,
/// message, other actors, column metadata, column data, extra bytes) and refuses it if any column
/// claims more than [`MAX_COLUMN_ITEMS`] items, counting run lengths without expanding them.
fn count_items(body: &[u8]) -> Result<(), ChunkError> {
    let mut r = Reader(body);
    let deps = r.uleb()?;
    r.skip(deps.checked_mul(32).ok_or(ChunkError::BadLength)?)?;
    let actor = r.uleb()?;
    r.skip(actor)?;
    r.uleb()?; // seq
    r.uleb()?; // start op
    r.uleb()?; // time (signed; the same number of bytes)
    let message = r.uleb()?;
    r.skip(message)?;
    let others = r.uleb()?;
    for _ in 0..others.min(body.len() as u64) {
        let len = r.uleb()?;
        r.skip(len)?;
    }
    let columns = r.uleb()?;
    let mut specs = Vec::new();
    for _ in 0..columns.min(body.len() as u64) {
        specs.push((r.uleb()?, r.uleb()?));
    }
    for (spec, len) in specs {
        let data = r.take(len)?;
        if spec & 0b1000 != 0 {
            return Err(ChunkError::NotAChange); // Automerge refuses compressed columns in changes
        }
        let items = match spec & 0b111 {
            4 => boolean_items(data)?,
            7 => 0, // raw values, sized by the metadata column
            typ => rle_items(data, typ)?,
        };
        if items > MAX_COLUMN_ITEMS {
            return Err(ChunkError::TooManyItems { limit: MAX_COLUMN_ITEMS });
        }
    }
    Ok(())
}

/// Items of a run-length-encoded column: runs (`n > 0`, one value), literals (`n < 0`, `|n|`
/// values) and null runs (`0`, then a count).
fn rle_items(data: &[u8], typ: u64) -> Result<u64, ChunkError> {
    let mut r = Reader(data);
    let mut items = 0u64;
    while !r.0.is_empty() {
        let n = r.sleb()?;
        let values = match n {
            0 => {
                items = items.saturating_add(r.uleb()?);
                0
            }
            n if n > 0 => {
                items = items.saturating_add(n as u64);
                1
            }
            n => {
                items = items.saturating_add(n.unsigned_abs());
                n.unsigned_abs()
            }
        };
        if items > MAX_COLUMN_ITEMS {
            return Ok(items);
        }
        for _ in 0..values {
            if typ == 5 {
                let len = r.uleb()?;
                r.skip(len)?;
            } else {
                r.uleb()?; // unsigned and signed numbers take the same bytes
            }
        }
    }
    Ok(items)
}

/// Items of a boolean column: alternating run lengths.
fn boolean_items(data: &[u8]) -> Result<u64, ChunkError> {
    let mut r = Reader(data);
    let mut items = 0u64;
    while !r.0.is_empty() {
        items = items.saturating_add(r.uleb()?);
    }
    Ok(items)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn uleb(&mut self) -> Result<u64, ChunkError> {
        let (value, used) = uleb128(self.0).ok_or(ChunkError::BadLength)?;
        self.0 = &self.0[used..];
        Ok(value)
    }

    fn sleb(&mut self) -> Result<i64, ChunkError> {
        let mut value = 0i64;
        for (i, byte) in self.0.iter().enumerate().take(10) {
            value |= i64::from(byte & 0x7f).wrapping_shl(7 * i as u32);
            if byte & 0x80 == 0 {
                if i < 9 && byte & 0x40 != 0 {
                    value |= (-1i64).wrapping_shl(7 * (i as u32 + 1));
                }
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err(ChunkError::BadLength)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], ChunkError> {
        let n = usize::try_from(n).map_err(|_| ChunkError::BadLength)?;
        if n > self.0.len() {
            return Err(ChunkError::BadLength);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn skip(&mut self, n: u64) -> Result<(), ChunkError> {
        self.take(n).map(|_| ())
    }
}

/// A compressed change chunk whose body inflates to `mib` MiB of zeros: what a hostile peer
/// sends to exhaust memory. For tests of the bounds above (not a valid change once inflated).
#[doc(hidden)]
pub fn deflate_bomb(mib: usize) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..mib {
        encoder.write_all(&zeros).expect("in memory");
    }
    let body = encoder.finish().expect("in memory");
    let mut chunk = MAGIC.to_vec();
    chunk.extend_from_slice(&[0, 0, 0, 0, COMPRESSED_CHANGE]);
    let mut len = body.len();
    while len >= 0x80 {
        chunk.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    chunk.push(len as u8);
    chunk.extend_from_slice(&body);
    chunk
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
        // A bomb: 64 MiB of zeros in about 64 KB, refused at the limit (`change_size` inflates
        // at most `limit + 1` bytes, by construction: not measured here).
        let bomb = deflate_bomb(64);
        assert_eq!(change_size(&bomb, 256 * 1024), Err(ChunkError::TooLarge { limit: 256 * 1024 }));
    }

    #[test]
    fn a_change_claiming_billions_of_operations_is_refused_unparsed() {
        // A real change, with its action column replaced by one run of 2^40 "make map" actions.
        let change = change_of(3);
        let bytes = change.raw_bytes();
        assert!(change_size(bytes, 1 << 20).is_ok(), "a real change passes the count");
        let body = &bytes[9 + uleb128(&bytes[9..]).unwrap().1..];
        let mut r = Reader(body);
        let deps = r.uleb().unwrap();
        r.skip(deps * 32).unwrap();
        let actor = r.uleb().unwrap();
        r.skip(actor).unwrap();
        for _ in 0..3 {
            r.uleb().unwrap();
        }
        let message = r.uleb().unwrap();
        r.skip(message).unwrap();
        assert_eq!(r.uleb().unwrap(), 0, "no other actors");
        let prefix_len = body.len() - r.0.len();
        let columns = r.uleb().unwrap();
        let mut specs = Vec::new();
        for _ in 0..columns {
            specs.push((r.uleb().unwrap(), r.uleb().unwrap()));
        }
        let mut data = r.0.to_vec();
        // Rebuild: same columns, but an integer column claiming 2^40 items (sleb 2^40, value 0).
        let mut huge = Vec::new();
        let mut n: i64 = 1 << 40;
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 && byte & 0x40 == 0 {
                huge.push(byte);
                break;
            }
            huge.push(byte | 0x80);
        }
        huge.push(0);
        let target = specs.iter().position(|(spec, _)| spec & 0b111 == 2).expect("an integer column");
        let offset: u64 = specs[..target].iter().map(|(_, len)| len).sum();
        let old_len = specs[target].1 as usize;
        data.splice(offset as usize..offset as usize + old_len, huge.iter().copied());
        specs[target].1 = huge.len() as u64;
        let mut new_body = body[..prefix_len].to_vec();
        let push_uleb = |v: u64, out: &mut Vec<u8>| {
            let mut v = v;
            loop {
                let byte = (v & 0x7f) as u8;
                v >>= 7;
                out.push(if v > 0 { byte | 0x80 } else { byte });
                if v == 0 {
                    break;
                }
            }
        };
        push_uleb(columns, &mut new_body);
        for (spec, len) in &specs {
            push_uleb(*spec, &mut new_body);
            push_uleb(*len, &mut new_body);
        }
        new_body.extend_from_slice(&data);
        let mut chunk = bytes[..9].to_vec();
        push_uleb(new_body.len() as u64, &mut chunk);
        chunk.extend_from_slice(&new_body);
        assert_eq!(change_size(&chunk, 1 << 20), Err(ChunkError::TooManyItems { limit: MAX_COLUMN_ITEMS }));
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
