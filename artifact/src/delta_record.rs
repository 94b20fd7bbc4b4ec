//! A **per-base delta encoding** of one chunk, as a chunk store keeps it beside the
//! plain chunks (`deltas/<base manifest hash>/<2 hex>/<64 hex>`) and as the server
//! sends it to a device that runs the base (kind-1 frames of
//! `application/vnd.shoal.chunks.v2`, see the server's OpenAPI document).
//!
//! Unlike a thin artifact's delta-encoded chunks, nothing here is signed: the release
//! a device installs is the plain release, whose manifest names each chunk by id. A
//! record only says which bytes of the base release's payload (the running slot,
//! from offset 0) the frame was compressed against and what those bytes hash to.
//! The device checks the bytes it read against that hash (a slot that does not hold
//! the base fails here, with a clear error, before anything is decoded) and checks
//! the decoded chunk against its id, so a lying server can waste bytes but never
//! get a wrong byte written.
//!
//! ```text
//! "shd1"                                  4 bytes, the magic and version
//! count: u8                               1..=4 ranges
//! count × (offset: u64 BE, len: u32 BE)   ranges of the base payload, concatenated in order
//! hash: [u8; 32]                          BLAKE3 of the concatenated range bytes
//! frame                                   the rest: a zstd frame, no dictionary id,
//!                                         compressed with those bytes as a raw prefix
//! ```
//!
//! The ranges obey the manifest's rules for references: none empty, none past
//! `u64::MAX`, at most [`REFERENCE_LEN_MAX`] bytes in all.

use crate::chunk::ZSTD_MAGIC;
use crate::manifest::{REFERENCE_LEN_MAX, Reference};

/// The record's first four bytes.
pub const MAGIC: [u8; 4] = *b"shd1";

/// Ranges a record may name (as a manifest's reference).
pub const RANGES_MAX: usize = 4;

/// Bytes of a record before its ranges: the magic and the count.
const HEAD: usize = 5;

/// Bytes of one range.
const RANGE: usize = 12;

/// Why a delta record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaRecordError {
    /// Shorter than its header says.
    #[error("the delta record ends after {len} bytes, inside its header")]
    Truncated {
        /// The record's length.
        len: usize,
    },
    /// Not a record of this version.
    #[error("the delta record does not start with \"shd1\"")]
    Magic,
    /// No range, or more than [`RANGES_MAX`].
    #[error("the delta record names {0} ranges (1 to 4 allowed)")]
    RangeCount(u8),
    /// A range of no bytes.
    #[error("range {index} of the delta record is empty")]
    EmptyRange {
        /// The range's position.
        index: usize,
    },
    /// A range whose end is past `u64::MAX`.
    #[error("range {index} of the delta record overflows")]
    RangeOverflow {
        /// The range's position.
        index: usize,
    },
    /// The ranges cover more than [`REFERENCE_LEN_MAX`].
    #[error("the delta record's reference is {len} bytes (at most {REFERENCE_LEN_MAX})")]
    TooLong {
        /// Their total length.
        len: u64,
    },
    /// What follows the header is not a zstd frame.
    #[error("the delta record's frame is not a zstd frame")]
    NotAFrame,
}

/// One chunk delta-encoded against bytes of a base release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaRecord {
    /// Ranges `(offset, len)` of the base payload, concatenated in this order.
    pub ranges: Vec<(u64, u32)>,
    /// BLAKE3 of the concatenated bytes.
    pub hash: [u8; 32],
    /// The zstd frame.
    pub frame: Vec<u8>,
}

impl DeltaRecord {
    /// The record's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        assert!(
            (1..=RANGES_MAX).contains(&self.ranges.len()),
            "a delta record has 1 to 4 ranges"
        );
        let mut out = Vec::with_capacity(HEAD + RANGE * self.ranges.len() + 32 + self.frame.len());
        out.extend_from_slice(&MAGIC);
        out.push(self.ranges.len() as u8);
        for &(offset, len) in &self.ranges {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
        }
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(&self.frame);
        out
    }

    /// Parses and checks a record (untrusted bytes: from the network or a store).
    pub fn parse(bytes: &[u8]) -> Result<DeltaRecord, DeltaRecordError> {
        let truncated = DeltaRecordError::Truncated { len: bytes.len() };
        if bytes.len() < HEAD {
            return Err(if bytes.len() >= 4 && bytes[..4] != MAGIC {
                DeltaRecordError::Magic
            } else {
                truncated
            });
        }
        if bytes[..4] != MAGIC {
            return Err(DeltaRecordError::Magic);
        }
        let count = bytes[4];
        if count == 0 || usize::from(count) > RANGES_MAX {
            return Err(DeltaRecordError::RangeCount(count));
        }
        let ranges_end = HEAD + RANGE * usize::from(count);
        if bytes.len() < ranges_end + 32 {
            return Err(truncated);
        }
        let mut ranges = Vec::with_capacity(usize::from(count));
        let mut total = 0u64;
        for (index, r) in bytes[HEAD..ranges_end].chunks_exact(RANGE).enumerate() {
            let offset = u64::from_be_bytes(r[..8].try_into().expect("8 bytes"));
            let len = u32::from_be_bytes(r[8..].try_into().expect("4 bytes"));
            if len == 0 {
                return Err(DeltaRecordError::EmptyRange { index });
            }
            if offset.checked_add(u64::from(len)).is_none() {
                return Err(DeltaRecordError::RangeOverflow { index });
            }
            total += u64::from(len);
            ranges.push((offset, len));
        }
        if total > u64::from(REFERENCE_LEN_MAX) {
            return Err(DeltaRecordError::TooLong { len: total });
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[ranges_end..ranges_end + 32]);
        let frame = &bytes[ranges_end + 32..];
        if !frame.starts_with(&ZSTD_MAGIC) {
            return Err(DeltaRecordError::NotAFrame);
        }
        Ok(DeltaRecord {
            ranges,
            hash,
            frame: frame.to_vec(),
        })
    }

    /// The reference the frame was compressed against (no chunk positions: the
    /// record is of one chunk), for reading and checking its bytes.
    pub fn reference(&self) -> Reference {
        Reference {
            ranges: self.ranges.clone(),
            hash: self.hash,
            chunks: Vec::new(),
        }
    }
}

/// Bytes of one entry of a per-base encoding index: a chunk id and a record's
/// length.
pub const INDEX_ENTRY: usize = 36;

/// The shortest record: the header with one range, the hash, and a zstd frame's
/// magic.
pub const RECORD_LEN_MIN: u32 = (HEAD + RANGE + 32 + 4) as u32;

/// Why a per-base encoding index was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaIndexError {
    /// Not a whole number of entries.
    #[error("the per-base encoding index is {len} bytes, not a multiple of {INDEX_ENTRY}")]
    Length {
        /// Its length.
        len: usize,
    },
    /// More entries than the caller allows (chunks in the release).
    #[error("the per-base encoding index has {entries} entries, more than the {max} allowed")]
    TooMany {
        /// Entries in it.
        entries: usize,
        /// The bound.
        max: usize,
    },
    /// A chunk listed twice.
    #[error("the per-base encoding index lists chunk {id} twice")]
    Duplicate {
        /// The chunk.
        id: String,
    },
    /// A record length no record can have.
    #[error(
        "the per-base encoding index gives chunk {id} a record of {len} bytes ({RECORD_LEN_MIN} to {max} allowed)"
    )]
    RecordLength {
        /// The chunk.
        id: String,
        /// The length given.
        len: u32,
        /// The largest allowed.
        max: u32,
    },
}

/// Parses a per-base encoding index (`deltas/<base>/index/<release>` in a chunk
/// store): [`INDEX_ENTRY`]-byte entries, each a chunk id then the length of its
/// record (`u32` BE), at most `entries_max` of them, each length between
/// [`RECORD_LEN_MIN`] and `record_max`. A static chunk host serves it to devices:
/// untrusted bytes (a lying index wastes requests, never a wrong byte: records
/// and chunks are checked as always).
pub fn parse_index(
    bytes: &[u8],
    entries_max: usize,
    record_max: u32,
) -> Result<std::collections::HashMap<crate::manifest::ChunkId, u32>, DeltaIndexError> {
    if !bytes.len().is_multiple_of(INDEX_ENTRY) {
        return Err(DeltaIndexError::Length { len: bytes.len() });
    }
    let entries = bytes.len() / INDEX_ENTRY;
    if entries > entries_max {
        return Err(DeltaIndexError::TooMany {
            entries,
            max: entries_max,
        });
    }
    let mut out = std::collections::HashMap::with_capacity(entries);
    for e in bytes.chunks_exact(INDEX_ENTRY) {
        let id = crate::manifest::ChunkId(e[..32].try_into().expect("32 bytes"));
        let len = u32::from_be_bytes(e[32..].try_into().expect("4 bytes"));
        if !(RECORD_LEN_MIN..=record_max).contains(&len) {
            return Err(DeltaIndexError::RecordLength {
                id: id.to_hex(),
                len,
                max: record_max,
            });
        }
        if out.insert(id, len).is_some() {
            return Err(DeltaIndexError::Duplicate { id: id.to_hex() });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> DeltaRecord {
        DeltaRecord {
            ranges: vec![(65536, 4096), (0, 10)],
            hash: [7; 32],
            frame: crate::chunk::encode_against(b"hello hello hello", 3, b"hello"),
        }
    }

    #[test]
    fn round_trips() {
        let r = record();
        let bytes = r.to_bytes();
        assert_eq!(&bytes[..4], b"shd1");
        assert_eq!(DeltaRecord::parse(&bytes), Ok(r.clone()));
        assert_eq!(r.reference().len(), 4106);
        assert_eq!(r.reference().hash, [7; 32]);
    }

    #[test]
    fn malformed_records_are_refused_precisely() {
        let good = record().to_bytes();
        assert_eq!(
            DeltaRecord::parse(&good[..3]),
            Err(DeltaRecordError::Truncated { len: 3 })
        );
        assert_eq!(
            DeltaRecord::parse(b"shd2\x01"),
            Err(DeltaRecordError::Magic)
        );
        assert_eq!(DeltaRecord::parse(b"xy\0\0"), Err(DeltaRecordError::Magic));
        // Ends inside the ranges, then inside the hash.
        assert_eq!(
            DeltaRecord::parse(&good[..20]),
            Err(DeltaRecordError::Truncated { len: 20 })
        );
        assert_eq!(
            DeltaRecord::parse(&good[..5 + 24 + 31]),
            Err(DeltaRecordError::Truncated { len: 60 })
        );
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            DeltaRecord::parse(&b)
        };
        assert_eq!(with(&|b| b[4] = 0), Err(DeltaRecordError::RangeCount(0)));
        assert_eq!(with(&|b| b[4] = 5), Err(DeltaRecordError::RangeCount(5)));
        // The second range's length is zero.
        assert_eq!(
            with(&|b| b[5 + 12 + 8..5 + 24].fill(0)),
            Err(DeltaRecordError::EmptyRange { index: 1 })
        );
        // The first range's offset is u64::MAX.
        assert_eq!(
            with(&|b| b[5..13].fill(0xff)),
            Err(DeltaRecordError::RangeOverflow { index: 0 })
        );
        // The first range is 2 MiB: with the second, over the cap.
        assert_eq!(
            with(&|b| b[13..17].copy_from_slice(&REFERENCE_LEN_MAX.to_be_bytes())),
            Err(DeltaRecordError::TooLong {
                len: u64::from(REFERENCE_LEN_MAX) + 10
            })
        );
        // No frame, or bytes that are not one.
        assert_eq!(
            DeltaRecord::parse(&good[..5 + 24 + 32]),
            Err(DeltaRecordError::NotAFrame)
        );
        assert_eq!(
            with(&|b| b[5 + 24 + 32] ^= 1),
            Err(DeltaRecordError::NotAFrame)
        );
    }

    #[test]
    fn an_index_parses_and_malformed_ones_are_refused_precisely() {
        use crate::manifest::ChunkId;
        let entry = |id: u8, len: u32| {
            let mut e = vec![id; 32];
            e.extend_from_slice(&len.to_be_bytes());
            e
        };
        let good = [entry(1, 100), entry(2, 200)].concat();
        let i = parse_index(&good, 2, 1000).unwrap();
        assert_eq!(i.len(), 2);
        assert_eq!(i.get(&ChunkId([2; 32])), Some(&200));
        assert_eq!(parse_index(&[], 0, 1000).unwrap().len(), 0);
        assert_eq!(
            parse_index(&good[..40], 2, 1000),
            Err(DeltaIndexError::Length { len: 40 })
        );
        assert_eq!(
            parse_index(&good, 1, 1000),
            Err(DeltaIndexError::TooMany { entries: 2, max: 1 })
        );
        assert_eq!(
            parse_index(&[entry(1, 100), entry(1, 90)].concat(), 2, 1000),
            Err(DeltaIndexError::Duplicate {
                id: ChunkId([1; 32]).to_hex()
            })
        );
        assert_eq!(
            parse_index(&entry(3, 1001), 1, 1000),
            Err(DeltaIndexError::RecordLength {
                id: ChunkId([3; 32]).to_hex(),
                len: 1001,
                max: 1000
            })
        );
        assert_eq!(
            parse_index(&entry(3, 0), 1, 1000),
            Err(DeltaIndexError::RecordLength {
                id: ChunkId([3; 32]).to_hex(),
                len: 0,
                max: 1000
            })
        );
    }
}
