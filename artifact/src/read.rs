//! The streaming artifact reader: verifies, then yields.
//!
//! [`ArtifactReader::open`] reads the first tar member (the envelope), checks its
//! signatures against the `release` role of a trust root and decodes the manifest;
//! nothing is returned before that succeeded. Then each call to
//! [`ArtifactReader::next_chunk`] reads one chunk member, checks that it is the chunk
//! the manifest says comes next, decodes it (bounded by its declared size) and checks
//! its hash before returning a byte of it. Works on any `Read`, a pipe included, and
//! holds one chunk at a time; [`ArtifactReader::next_wanted`] skips the chunks a
//! caller does not want without reading them when the source can skip ([`Skip`]);
//! it still reads and checks every member header (one per data member, the default
//! layout; one and a count per pack), as `verify` does.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::sync::Arc;

use rayon::prelude::*;
use shoal_signing::{
    DecodeError, ENVELOPE_SIZE_MAX, Envelope, RoleName, SIGNATURES_MAX, TrustRoot, VerifyError,
};

use crate::chunk::{self, ChunkError, DICTIONARY_SIZE_MAX, Dictionary, DictionaryError};
use crate::manifest::{
    BaseRelease, ChunkId, ChunkRef, Manifest, ManifestError, Reference, ReferenceBytes,
};
use crate::manifest_delta::{
    HeldManifests, MANIFEST_DELTA_MEMBER, ManifestDelta, ManifestDeltaError, NoManifests,
};
use crate::ustar::{self, BLOCK, Block, HeaderError};

/// Path of the first member: the signed manifest envelope (canonical CBOR).
pub const ENVELOPE_MEMBER: &str = "manifest.envelope";

/// Path of a chunk's file in a chunk store.
pub fn chunk_path(id: &ChunkId) -> String {
    let hex = id.to_hex();
    format!("chunks/{}/{hex}", &hex[..2])
}

/// Path of the optional zstd dictionary member, right after the envelope.
pub const DICTIONARY_MEMBER: &str = "dictionary";

/// Path of the optional contents member, after the envelope and the dictionary: one
/// bit per distinct chunk of the manifest (in first-occurrence payload order, bit
/// `i % 8` of byte `i / 8`) saying whether the artifact holds that chunk.
pub const CONTENTS_MEMBER: &str = "contents";

/// The contents member's data for `distinct` (the manifest's distinct chunks in
/// order): bit `i` set when `holds(distinct[i])`.
pub fn contents_bitmap(distinct: &[ChunkRef], holds: impl Fn(&ChunkId) -> bool) -> Vec<u8> {
    let mut bits = vec![0u8; distinct.len().div_ceil(8)];
    for (i, c) in distinct.iter().enumerate() {
        if holds(&c.id) {
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    bits
}

/// Path of the `seq`th pack member (from 0) of an artifact.
pub fn pack_path(seq: u64) -> String {
    format!("packs/{seq:08}")
}

/// Most chunks in one pack.
pub const PACK_CHUNKS_MAX: usize = 4096;

/// Path of the `seq`th data member (from 0) of an artifact laid out in data members
/// (`write::Layout::Data`): the stored chunks concatenated, no count, no table.
pub fn data_path(seq: u64) -> String {
    format!("data/{seq:08}")
}

/// Path of the pack table member, after the envelope, dictionary and contents and
/// before the first pack: the chunk count of each pack, in order, so a reader knows
/// where every pack and chunk is without reading the packs' headers.
pub const PACK_TABLE_MEMBER: &str = "packs.table";

/// Bytes per pack in the pack table: its chunk count (u32 little-endian).
pub const PACK_TABLE_ENTRY_LEN: usize = 4;

/// The pack table member's data for packs of `counts` chunks, in order.
pub fn pack_table(counts: &[u32]) -> Vec<u8> {
    counts.iter().flat_map(|c| c.to_le_bytes()).collect()
}

/// Bytes of a pack member before its chunks: the chunk count (u32 little-endian).
pub const PACK_HEADER_LEN: usize = 4;

/// The distinct chunks of a verified manifest in artifact order (each id at its
/// first occurrence), kept by someone else: the engine's chunk table. A reader bound
/// to one ([`ArtifactReader::bind_to`]) reads its packs against it instead of a
/// list of its own (40 bytes a chunk for as long as the packs are read).
pub trait ChunkList: Send + Sync + std::fmt::Debug {
    /// BLAKE3 of the signed manifest bytes the list is of.
    fn manifest_hash(&self) -> [u8; 32];
    /// How many distinct chunks.
    fn distinct_len(&self) -> usize;
    /// The `k`-th distinct chunk.
    fn distinct_chunk(&self, k: usize) -> ChunkRef;
}

/// `n` bytes, in words: "1 byte", "2 bytes".
fn count_bytes(n: u64) -> String {
    match n {
        1 => "1 byte".into(),
        n => format!("{n} bytes"),
    }
}

/// The chunks the packs hold, in order, and how many came already.
#[derive(Debug)]
enum Expected {
    /// Listed here.
    Owned { chunks: Vec<ChunkRef>, next: usize },
    /// The distinct chunks of `list` whose bit is set in `bits` (all of them
    /// without bits); `cursor` is the index in `list` of the next one to come.
    Shared {
        list: Arc<dyn ChunkList>,
        bits: Option<Vec<u8>>,
        len: usize,
        taken: usize,
        cursor: usize,
    },
}

impl Expected {
    fn owned(chunks: Vec<ChunkRef>) -> Expected {
        Expected::Owned { chunks, next: 0 }
    }

    /// How many chunks the packs hold.
    fn len(&self) -> usize {
        match self {
            Expected::Owned { chunks, .. } => chunks.len(),
            Expected::Shared { len, .. } => *len,
        }
    }

    /// How many are still to come.
    fn left(&self) -> usize {
        match self {
            Expected::Owned { chunks, next } => chunks.len() - next,
            Expected::Shared { len, taken, .. } => len - taken,
        }
    }

    /// The next chunk to come, if any.
    fn peek(&self) -> Option<ChunkRef> {
        match self {
            Expected::Owned { chunks, next } => chunks.get(*next).copied(),
            Expected::Shared {
                list, bits, cursor, ..
            } => Self::held_from(list.as_ref(), bits.as_deref(), *cursor)
                .map(|k| list.distinct_chunk(k)),
        }
    }

    /// The index of the first held chunk at or after `from`.
    fn held_from(list: &dyn ChunkList, bits: Option<&[u8]>, from: usize) -> Option<usize> {
        let n = list.distinct_len();
        match bits {
            None => (from < n).then_some(from),
            Some(bits) => (from..n).find(|&k| bits[k / 8] & (1 << (k % 8)) != 0),
        }
    }

    /// Takes the next `count` chunks (at most [`Expected::left`]).
    fn take(&mut self, count: usize) -> Vec<ChunkRef> {
        assert!(count <= self.left(), "taking past the expected chunks");
        match self {
            Expected::Owned { chunks, next } => {
                let out = chunks[*next..*next + count].to_vec();
                *next += count;
                out
            }
            Expected::Shared {
                list,
                bits,
                taken,
                cursor,
                ..
            } => {
                let mut out = Vec::with_capacity(count);
                for _ in 0..count {
                    let k = Self::held_from(list.as_ref(), bits.as_deref(), *cursor)
                        .expect("counted as left");
                    out.push(list.distinct_chunk(k));
                    *cursor = k + 1;
                }
                *taken += count;
                out
            }
        }
    }

    /// Checks that `size` bytes are the stored forms of a run of the chunks still
    /// to come, whole (as a data member must be), without taking them: what is
    /// wrong, as [`ReadError::BadDataMember`] says it, if not.
    fn fits(&self, size: u64) -> Result<(), String> {
        let mut sum = 0u64;
        let mut check = |c: ChunkRef| -> Option<Result<(), String>> {
            if sum == size {
                return Some(Ok(()));
            }
            let next = sum + u64::from(c.stored_size);
            if next > size {
                return Some(Err(format!(
                    "ends {} into chunk {} of {} stored bytes",
                    count_bytes(size - sum),
                    c.id,
                    c.stored_size
                )));
            }
            sum = next;
            None
        };
        match self {
            Expected::Owned { chunks, next } => {
                for &c in &chunks[*next..] {
                    if let Some(out) = check(c) {
                        return out;
                    }
                }
            }
            Expected::Shared {
                list, bits, cursor, ..
            } => {
                let mut k = *cursor;
                while let Some(at) = Self::held_from(list.as_ref(), bits.as_deref(), k) {
                    if let Some(out) = check(list.distinct_chunk(at)) {
                        return out;
                    }
                    k = at + 1;
                }
            }
        }
        match size - sum {
            0 => Ok(()),
            rest => Err(format!("{} after the last chunk", count_bytes(rest))),
        }
    }

    /// The ids of every chunk the packs hold, in order.
    fn ids(&self) -> Vec<ChunkId> {
        match self {
            Expected::Owned { chunks, .. } => chunks.iter().map(|c| c.id).collect(),
            Expected::Shared { list, bits, .. } => {
                let mut out = Vec::with_capacity(self.len());
                let mut k = 0;
                while let Some(at) = Self::held_from(list.as_ref(), bits.as_deref(), k) {
                    out.push(list.distinct_chunk(at).id);
                    k = at + 1;
                }
                out
            }
        }
    }
}

/// A pack member (or a data member) being read.
#[derive(Debug)]
struct Pack {
    seq: u64,
    /// The chunks of the member, or of a data member's window (at most
    /// [`PACK_CHUNKS_MAX`] at a time: a data member may hold every chunk).
    chunks: Vec<ChunkRef>,
    next: usize,
    padding: usize,
    /// A data member's bytes after its window; always 0 for a pack.
    rest: u64,
}

/// How the chunks of an artifact are laid out, as its first member after the
/// members before them says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `packs/N` members, each with its count (and, since it exists, the table).
    Packs,
    /// `data/N` members: the stored chunks alone.
    Data,
}

/// Why an artifact was refused. Nothing read from an artifact is used after one.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Reading the source failed.
    #[error("reading the artifact: {0}")]
    Io(#[from] io::Error),
    /// The file is empty.
    #[error("the artifact is empty")]
    Empty,
    /// The first block is not a tar header.
    #[error("not a .shoal artifact (not a tar file: {0})")]
    NotTar(HeaderError),
    /// A later header block is corrupt.
    #[error("corrupt tar header at byte {offset}: {reason}")]
    BadHeader {
        /// Byte offset of the header.
        offset: u64,
        /// What is wrong with it.
        reason: HeaderError,
    },
    /// The file ends before the archive does.
    #[error("the artifact is truncated (ends inside {what})")]
    Truncated {
        /// Where it ends: "the envelope", "chunk <id>", "a header", "the chunk list".
        what: String,
    },
    /// A member path is absolute or contains `..`.
    #[error("tar member {path:?} has an unsafe path")]
    UnsafePath {
        /// The path.
        path: String,
    },
    /// The first member is not the manifest envelope (or its delta).
    #[error("the first member is {path:?}, not {ENVELOPE_MEMBER:?} or {MANIFEST_DELTA_MEMBER:?}")]
    MissingEnvelope {
        /// What came first.
        path: String,
    },
    /// The envelope member is larger than envelopes may be.
    #[error("the envelope member is {size} bytes, more than the limit of {max}")]
    EnvelopeTooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: usize,
    },
    /// The envelope bytes are malformed.
    #[error("bad manifest envelope: {0}")]
    Envelope(#[from] DecodeError),
    /// The envelope carries no signature at all (found before its signed bytes
    /// were read: see [`check_envelope_signers`]).
    #[error("the manifest envelope ({size} bytes) carries no signature")]
    Unsigned {
        /// Size of the envelope member.
        size: u64,
    },
    /// Fewer distinct release keys of the trust root signed the envelope than its
    /// threshold asks (counted by key id before the signed bytes were read; the
    /// signatures themselves are checked after).
    #[error(
        "the manifest envelope ({size} bytes) is signed by {found} of the trust root's release keys; it needs {threshold}"
    )]
    TooFewSigners {
        /// Size of the envelope member.
        size: u64,
        /// Distinct release keys among the signers.
        found: u32,
        /// The release role's threshold.
        threshold: u32,
    },
    /// The manifest travels as a delta that cannot be rebuilt (malformed, against a
    /// manifest not held here).
    #[error(transparent)]
    ManifestDelta(#[from] ManifestDeltaError),
    /// The envelope's signatures do not satisfy the trust root.
    #[error("manifest signature check failed: {0}")]
    Signature(#[from] VerifyError),
    /// The signed manifest is malformed.
    #[error("bad manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// A pack's index is malformed (no chunks, too many, larger than the member).
    #[error("pack {seq}: {reason}")]
    BadPack {
        /// The pack's sequence number.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// A pack member's size is not its index plus the signed stored sizes it names.
    #[error("pack {seq} is {found} bytes, its index and the manifest say {expected}")]
    PackSizeMismatch {
        /// The pack's sequence number.
        seq: u64,
        /// Size from the index and manifest.
        expected: u64,
        /// Member size.
        found: u64,
    },
    /// A data member does not end where a chunk ends: it is empty, ends inside a
    /// chunk (the next chunk's signed stored size is more than it has left), or goes
    /// on after the last chunk the artifact holds.
    #[error("data member {seq}: {reason}")]
    BadDataMember {
        /// The member's sequence number.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// A member that is not the next pack or data member (or not a regular file), a
    /// data member after packs or a pack table, a pack after data members.
    #[error("unexpected tar member {path:?}")]
    UnexpectedMember {
        /// The member's path.
        path: String,
    },
    /// The pack table member's size is not a whole number of 4-byte entries.
    #[error(
        "the pack table member is {found} bytes, not a multiple of {PACK_TABLE_ENTRY_LEN} (one u32 per pack)"
    )]
    PackTableLength {
        /// Its size.
        found: u64,
    },
    /// The pack table lists more packs than the artifact holds chunks (every pack
    /// holds at least one), checked before it is read.
    #[error(
        "the pack table member is {found} bytes, more than the {max} bytes of one entry per chunk the artifact holds ({chunks} chunks)"
    )]
    PackTableTooLarge {
        /// Its size.
        found: u64,
        /// The most it may be.
        max: u64,
        /// Chunks the artifact holds.
        chunks: usize,
    },
    /// A pack table entry is not a possible pack's chunk count.
    #[error("the pack table gives pack {seq} {count} chunks (a pack holds 1 to {PACK_CHUNKS_MAX})")]
    PackTableCount {
        /// The pack's sequence number.
        seq: u64,
        /// The count the table gives.
        count: u32,
    },
    /// The pack table's counts do not add up to the chunks the artifact holds.
    #[error("the pack table counts {sum} chunks, but the artifact holds {chunks}")]
    PackTableSum {
        /// The sum of the table's counts.
        sum: u64,
        /// Chunks the artifact holds (from the manifest and contents member).
        chunks: usize,
    },
    /// A pack's header counts other chunks than the pack table says it holds.
    #[error("pack {seq} holds {found} chunks, the pack table says {table}")]
    PackCountMismatch {
        /// The pack's sequence number.
        seq: u64,
        /// The count in the pack table.
        table: u32,
        /// The count in the pack's header.
        found: u32,
    },
    /// The dictionary member is not a usable zstd dictionary.
    #[error("bad dictionary member: {0}")]
    Dictionary(#[from] DictionaryError),
    /// The dictionary (the artifact's member, or one held for an artifact that
    /// reuses its base's) is not the one the signed manifest names.
    #[error(
        "the {} dictionary {found} is not the one the manifest names ({expected})",
        if *held { "kept" } else { "artifact's" }
    )]
    DictionaryMismatch {
        /// BLAKE3 of the dictionary the manifest names.
        expected: ChunkId,
        /// BLAKE3 of the dictionary at hand.
        found: ChunkId,
        /// Whether it was a held dictionary (else the artifact's member).
        held: bool,
    },
    /// A chunk that is not where the payload's order puts it (when assembling a
    /// payload: the artifact holds a chunk where its base's should be used).
    #[error("chunk {0} is out of order")]
    OutOfOrder(ChunkId),
    /// The contents member is not one bit per distinct chunk of the manifest.
    #[error(
        "the contents member is {found} bytes; the manifest's {chunks} distinct chunks need {expected}"
    )]
    ContentsLength {
        /// Bytes it must have.
        expected: u64,
        /// Bytes it has.
        found: u64,
        /// Distinct chunks in the manifest.
        chunks: usize,
    },
    /// The contents member marks chunks past the manifest's last distinct chunk.
    #[error("the contents member marks chunks past the manifest's {chunks} distinct chunks")]
    ContentsPadding {
        /// Distinct chunks in the manifest.
        chunks: usize,
    },
    /// A thin artifact without a contents member, read without its base release:
    /// which chunks its packs hold is unknown.
    #[error("the thin artifact has no contents member and its base release is not at hand")]
    MissingContents,
    /// The chunk list a reader opened without its own is bound to
    /// ([`ArtifactReader::bind_to`]) counts other distinct chunks than the reader
    /// found in the same manifest.
    #[error("the chunk list bound counts {list} distinct chunks, the manifest read {found}")]
    ChunkListLength {
        /// Distinct chunks the reader found in the manifest.
        found: usize,
        /// Distinct chunks the list holds.
        list: usize,
    },
    /// A chunk the artifact should hold but does not.
    #[error("chunk {0} is missing from the artifact")]
    MissingChunk(ChunkId),
    /// A chunk's bytes are bad (hash mismatch, zstd bomb, corrupt frame).
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// The bytes a delta-encoded chunk is encoded against could not be read from
    /// where the base release's payload was given.
    #[error("chunk {id}: reading its reference bytes {ranges} of the base release: {source}")]
    ReferenceRead {
        /// The chunk.
        id: ChunkId,
        /// The reference's ranges (`offset+len`, comma separated).
        ranges: String,
        /// Why the read failed.
        source: io::Error,
    },
}

/// Where a reader gets the base-release bytes delta-encoded chunks are decoded with
/// (e.g. [`crate::base_image::BaseImage`], the base payload as a file). The bytes'
/// length is checked; their hash when a chunk does not decode to its id
/// ([`Reference::read`]).
pub trait ReferenceSource {
    /// The bytes of `r`'s ranges, concatenated.
    fn reference(&mut self, r: &Reference) -> io::Result<ReferenceBytes>;
}

/// Decodes and verifies `raw` with the reference bytes `source` gives for it (a
/// delta-encoded chunk) or as a plain chunk; a delta-encoded chunk without a source
/// is [`ChunkError::NeedsReference`].
fn resolve(
    raw: &RawChunk,
    source: Option<&mut (dyn ReferenceSource + '_)>,
) -> Result<Option<ReferenceBytes>, ReadError> {
    match (raw.reference(), source) {
        (Some(r), Some(src)) => {
            src.reference(r)
                .map(Some)
                .map_err(|source| ReadError::ReferenceRead {
                    id: raw.chunk.id,
                    ranges: r.describe(),
                    source,
                })
        }
        _ => Ok(None),
    }
}

/// A chunk read from the artifact, checked against the manifest's order and
/// size, but **not yet verified**: call [`RawChunk::verify`].
#[derive(Debug, Clone)]
pub struct RawChunk {
    /// The manifest's entry for it.
    pub chunk: ChunkRef,
    stored: Vec<u8>,
    dictionary: Option<Dictionary>,
    reference: Option<Arc<Reference>>,
}

impl RawChunk {
    /// Decodes (bounded by the declared size) and checks the hash. A delta-encoded
    /// chunk ([`RawChunk::reference`]) is refused with
    /// [`ChunkError::NeedsReference`]: use [`RawChunk::verify_against`].
    pub fn verify(&self) -> Result<Vec<u8>, ChunkError> {
        if self.reference.is_some() {
            return Err(ChunkError::NeedsReference { id: self.chunk.id });
        }
        chunk::decode_with(&self.stored, &self.chunk, self.dictionary.as_ref())
    }

    /// The base release bytes this chunk is encoded against, as the signed manifest
    /// names them; `None` for a plain chunk.
    pub fn reference(&self) -> Option<&Arc<Reference>> {
        self.reference.as_ref()
    }

    /// Decodes a delta-encoded chunk with `reference` (bytes read for this chunk's
    /// [`RawChunk::reference`]; [`ChunkError::WrongReference`] for other ones) and
    /// checks the hash. Bytes that fail the reference's hash (checked here once per
    /// [`ReferenceBytes`], whichever chunk comes first) are
    /// [`ChunkError::BadReference`]: nothing is decoded with them. A plain chunk decodes as [`RawChunk::verify_chunk`]
    /// does.
    pub fn verify_against(&self, reference: &ReferenceBytes) -> Result<VerifiedChunk, ChunkError> {
        let Some(r) = &self.reference else {
            return self.verify_chunk();
        };
        if r.hash != *reference.hash() {
            return Err(ChunkError::WrongReference { id: self.chunk.id });
        }
        // Checked once per reference, by the first chunk decoded with it.
        reference
            .check()
            .map_err(|source| ChunkError::BadReference {
                id: self.chunk.id,
                source,
            })?;
        Ok(VerifiedChunk {
            chunk: self.chunk,
            data: chunk::decode_against(&self.stored, &self.chunk, reference.bytes())?,
        })
    }

    /// Like [`RawChunk::verify`], returning the bytes as a [`VerifiedChunk`], which
    /// proves the check to whoever receives them.
    pub fn verify_chunk(&self) -> Result<VerifiedChunk, ChunkError> {
        Ok(VerifiedChunk {
            chunk: self.chunk,
            data: self.verify()?,
        })
    }

    /// The stored form as read. Only trust it after [`RawChunk::verify`] succeeded.
    pub fn stored(&self) -> &[u8] {
        &self.stored
    }
}

/// Uncompressed chunk bytes that hash to their id: the proof a consumer (the update
/// engine) takes instead of bytes, so it never hashes them again and never sees
/// unverified ones. Made only by [`RawChunk::verify_chunk`] (a stored chunk decoded
/// within its declared size), [`VerifiedChunk::check`] (bytes read or received
/// uncompressed) and [`VerifiedChunk::hash_keeping`] (bytes hashed for their id);
/// with the `sim` cargo feature also by
/// [`VerifiedChunk::simulated`], which carries an id and a length and no bytes (the
/// fleet simulator's; production builds never enable it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChunk {
    chunk: ChunkRef,
    data: Vec<u8>,
}

impl VerifiedChunk {
    /// Hashes `data` and proves it is chunk `id`. The proof's
    /// [`chunk`](VerifiedChunk::chunk) has the data's length as both its size and
    /// its stored size (what was stored is not known here).
    pub fn check(id: ChunkId, data: Vec<u8>) -> Result<VerifiedChunk, ChunkError> {
        let actual = ChunkId::of(&data);
        if actual != id {
            return Err(ChunkError::HashMismatch { id, actual });
        }
        let size = u32::try_from(data.len()).map_err(|_| ChunkError::SizeMismatch {
            id,
            size: u32::MAX,
            found: data.len(),
        })?;
        Ok(VerifiedChunk {
            chunk: ChunkRef {
                id,
                size,
                stored_size: size,
            },
            data,
        })
    }

    /// Hashes `bytes` for their id and, when `keep` says so of it, proves a copy of
    /// them as that chunk: one hash for a reader that needs the id of every chunk
    /// and the bytes of a few (the cut of a running slot hands over the chunks an
    /// install needs). The bytes are borrowed for the call, so the copy is of what
    /// was hashed. No proof of more than `u32::MAX` bytes (no chunk is that long).
    pub fn hash_keeping(
        bytes: &[u8],
        keep: impl FnOnce(&ChunkId) -> bool,
    ) -> (ChunkId, Option<VerifiedChunk>) {
        let id = ChunkId::of(bytes);
        let proof = match u32::try_from(bytes.len()) {
            Ok(size) if keep(&id) => Some(VerifiedChunk {
                chunk: ChunkRef {
                    id,
                    size,
                    stored_size: size,
                },
                data: bytes.to_vec(),
            }),
            _ => None,
        };
        (id, proof)
    }

    /// Decodes a stored chunk expected to be `expected` (bounded by its declared
    /// size; `dict` for a frame made with a zstd dictionary) and proves it: one
    /// hash, as [`chunk::decode_with`].
    pub fn decode(
        stored: &[u8],
        expected: &ChunkRef,
        dict: Option<&chunk::Dictionary>,
    ) -> Result<VerifiedChunk, ChunkError> {
        Ok(VerifiedChunk {
            chunk: *expected,
            data: chunk::decode_with(stored, expected, dict)?,
        })
    }

    /// Wraps bytes this crate already decoded and hashed to `chunk.id`.
    #[cfg(feature = "fs")]
    pub(crate) fn proven(chunk: ChunkRef, data: Vec<u8>) -> VerifiedChunk {
        VerifiedChunk { chunk, data }
    }

    /// A proof without bytes, for the fleet simulator (which models chunks by id
    /// and length): its [`data`](VerifiedChunk::data) is empty and its
    /// [`len`](VerifiedChunk::len) is `size`. Exists only with the `sim` feature,
    /// which the `shoal` binary's dependency tree must not enable (`.ci/run`
    /// checks it).
    #[cfg(feature = "sim")]
    pub fn simulated(id: ChunkId, size: u32) -> VerifiedChunk {
        VerifiedChunk {
            chunk: ChunkRef {
                id,
                size,
                stored_size: size,
            },
            data: Vec::new(),
        }
    }

    /// The chunk's uncompressed length (of the bytes, or the simulated length).
    pub fn len(&self) -> u32 {
        self.chunk.size
    }

    /// Whether the chunk is empty (never, for a chunk of a valid manifest).
    pub fn is_empty(&self) -> bool {
        self.chunk.size == 0
    }

    /// The manifest entry the bytes match (id and size).
    pub fn chunk(&self) -> &ChunkRef {
        &self.chunk
    }

    /// The bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The bytes, owned.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }
}

/// A streaming, verifying `.shoal` reader. See the module doc.
#[derive(Debug)]
pub struct ArtifactReader<R: Read> {
    src: R,
    offset: u64,
    envelope: Envelope,
    envelope_len: u64,
    /// The manifest the first member is a delta against, when it is one.
    delta_base: Option<[u8; 32]>,
    manifest: Manifest,
    /// The chunks the packs hold, in order, once the members before the first pack
    /// were read ([`ArtifactReader::bind`]).
    expected: Option<Expected>,
    /// Chunks of the base release, when told ([`ArtifactReader::set_base`]).
    base_held: Option<HashSet<ChunkId>>,
    /// Verified chunks read ahead by [`ArtifactReader::next_wanted`].
    ready: std::collections::VecDeque<RawChunk>,
    pack: Option<Pack>,
    packs_read: u64,
    /// The layout, once the first pack or data member was read.
    layout: Option<Layout>,
    dictionary: Option<Dictionary>,
    /// A dictionary the caller keeps, for an artifact that reuses its base's
    /// ([`ArtifactReader::hold_dictionary`]): used when the artifact has no member.
    held_dictionary: Option<Dictionary>,
    /// The contents member's bits (one a distinct chunk of the manifest, in order),
    /// from when it was read until the packs' chunks are bound: a bit a chunk, not
    /// a set of ids (40 bytes a chunk, 17 MiB for an 8 GiB image).
    contents: Option<Vec<u8>>,
    /// Whether a contents member was read (the dictionary must come before it).
    contents_read: bool,
    /// BLAKE3 of the signed manifest bytes (the manifest's id).
    manifest_hash: [u8; 32],
    /// The manifest's distinct chunk count, once its chunk lists were shed
    /// without binding ([`ArtifactReader::shed_chunk_lists_unbound`]).
    unbound_distinct: Option<usize>,
    /// The distinct chunk count of a manifest decoded without its chunk list
    /// ([`ArtifactReader::open_held_unbound`]).
    streamed_distinct: Option<usize>,
    /// Chunk count of each pack, from the pack table member, once it was read.
    table: Option<Vec<u32>>,
    /// The reference of each delta-encoded chunk, from the manifest.
    references: HashMap<ChunkId, Arc<Reference>>,
    /// Whether the members before the first pack were read.
    preamble_done: bool,
    /// A header block the preamble read that is not a preamble member (an artifact
    /// without a pack table): the first pack's header, or what stands in its place.
    peeked: Option<Block>,
    done: bool,
}

/// How many chunks the packs hold, as known when the pack table is read.
#[derive(Clone, Copy)]
enum HeldCount {
    /// Exactly these.
    Exact(usize),
    /// At most these (a thin artifact without contents opened without its chunk
    /// list: the exact count is known when it is bound, `bind_to`).
    AtMost(usize),
}

impl HeldCount {
    fn chunks(self) -> usize {
        match self {
            HeldCount::Exact(n) | HeldCount::AtMost(n) => n,
        }
    }
}

impl<R: Read> ArtifactReader<R> {
    /// Reads the envelope, verifies it against `root`'s `release` role (and its
    /// expiry, when `now_unix_s` is known) and decodes the manifest. A thin artifact
    /// read this way is checked against its contents member; use
    /// [`ArtifactReader::open_with_base`] when the base release is at hand to also
    /// check that it holds every chunk the base lacks.
    pub fn open(src: R, root: &TrustRoot, now_unix_s: Option<u64>) -> Result<Self, ReadError> {
        Self::open_with_base(src, root, now_unix_s, None)
    }

    /// Like [`ArtifactReader::open`]; for a thin artifact, `base` (the base release's
    /// manifest) tells exactly which chunks it must hold.
    pub fn open_with_base(
        src: R,
        root: &TrustRoot,
        now_unix_s: Option<u64>,
        base: Option<&Manifest>,
    ) -> Result<Self, ReadError> {
        Self::open_held(src, root, now_unix_s, base, &NoManifests)
    }

    /// Like [`ArtifactReader::open_with_base`], for an artifact whose manifest may
    /// travel as a delta ([`crate::manifest_delta`]) against one of `held`: the whole
    /// manifest is rebuilt, then its signatures are verified as an envelope's.
    pub fn open_held(
        mut src: R,
        root: &TrustRoot,
        now_unix_s: Option<u64>,
        base: Option<&Manifest>,
        held: &dyn HeldManifests,
    ) -> Result<Self, ReadError> {
        let (envelope, envelope_len, delta_base) = read_envelope(&mut src, held)?;
        let signed = root.verify(RoleName::Release, &envelope, now_unix_s)?;
        let manifest = Manifest::from_cbor(signed)?;
        Ok(Self::from_parts(
            src,
            envelope,
            envelope_len,
            delta_base,
            manifest,
            base,
        ))
    }

    /// [`ArtifactReader::open_held`] for a caller that binds the packs to the
    /// chunk list it keeps ([`ArtifactReader::shed_chunk_lists_unbound`], then
    /// [`ArtifactReader::bind_to`]: the installer, whose engine decodes the list
    /// into its own table): the manifest, full or thin, is decoded with its chunk
    /// list streamed out and dropped, so the list (40 bytes a chunk: 17.2 MB for
    /// an 8 GiB image) is never held beside the envelope here. Its distinct chunk
    /// count (the contents member's length) is found from the ids' first 4 bytes,
    /// and the full ids of the positions whose first 4 bytes repeat and of those
    /// a reference names (a thin artifact's delta-encoded chunks), in a second
    /// decode. A thin artifact whose base is told ([`ArtifactReader::set_base`])
    /// is checked against it when bound. (A manifest of several payloads is
    /// decoded whole.) The same checks and errors as [`ArtifactReader::open_held`],
    /// but one: a thin artifact told its base whose pack table adds up to what the
    /// base lacks and not to what its contents member marks fails with
    /// [`ReadError::PackTableSum`] (the table is checked against the contents
    /// member first), where `open_held` gives [`ReadError::MissingChunk`].
    pub fn open_held_unbound(
        mut src: R,
        root: &TrustRoot,
        now_unix_s: Option<u64>,
        held: &dyn HeldManifests,
    ) -> Result<Self, ReadError> {
        let (envelope, envelope_len, delta_base) = read_envelope(&mut src, held)?;
        let signed = root.verify(RoleName::Release, &envelope, now_unix_s)?;
        Ok(match decode_unlisted(Signed::Slice(signed))? {
            Some(u) => {
                let mut reader =
                    Self::from_parts(src, envelope, envelope_len, delta_base, u.manifest, None);
                reader.unlisted(u.distinct, u.references);
                reader
            }
            None => {
                let manifest = Manifest::from_cbor(signed)?;
                Self::from_parts(src, envelope, envelope_len, delta_base, manifest, None)
            }
        })
    }

    /// [`ArtifactReader::open_held_unbound`] for an installer that copied the
    /// envelope out of `src` ([`read_envelope_head`], [`copy_envelope_member`])
    /// and had it verified where it lies (the device store's file, `file`,
    /// `len` bytes; `member_len` is the first member's size, `delta_base` the
    /// manifest it is a delta against): the manifest is decoded from the file
    /// as it is read, its signed bytes checked against `manifest_hash`, the
    /// BLAKE3 the verifier checked the signatures over, so nothing here is
    /// trusted that the verdict did not cover. The envelope is never in memory
    /// ([`ArtifactReader::envelope`] is empty), and its chunk list is streamed
    /// out and dropped, a full artifact's or a thin one's (bind the packs with
    /// [`ArtifactReader::bind_to`]): only the ids its references name are kept.
    pub fn open_stored(
        src: R,
        file: &dyn crate::ReadAt,
        len: u64,
        manifest_hash: &[u8; 32],
        member_len: u64,
        delta_base: Option<[u8; 32]>,
    ) -> Result<Self, ReadError> {
        let layout =
            shoal_signing::EnvelopeLayout::locate(len, &mut |at, buf| file.read_at(at, buf))?;
        // Not laid out canonically (verified all the same): decoded in memory.
        let in_memory;
        let signed = match &layout {
            Some(l) => Signed::File {
                file,
                at: l.signed_at,
                len: l.signed_len,
                hash: manifest_hash,
            },
            None => {
                let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
                file.read_at(0, &mut bytes)?;
                in_memory = Envelope::from_vec(bytes)?;
                if *blake3::hash(&in_memory.signed).as_bytes() != *manifest_hash {
                    return Err(ReadError::Io(io::Error::other(
                        "the stored envelope changed after it was verified",
                    )));
                }
                Signed::Slice(&in_memory.signed)
            }
        };
        let unlisted = decode_unlisted(signed)?;
        let (manifest, unlisted) = match unlisted {
            Some(u) => (u.manifest, Some((u.distinct, u.references))),
            None => (decode_whole(signed)?, None),
        };
        let mut reader = Self::from_parts_hashed(
            src,
            Envelope::new(Vec::new()),
            *manifest_hash,
            member_len,
            delta_base,
            manifest,
            None,
        );
        if let Some((distinct, references)) = unlisted {
            reader.unlisted(distinct, references);
        }
        Ok(reader)
    }

    /// Reads the envelope and decodes the manifest **without checking any
    /// signature**, for `inspect` and for adding signatures. Never install from it.
    pub fn open_unverified(src: R) -> Result<Self, ReadError> {
        Self::open_unverified_held(src, &NoManifests)
    }

    /// Like [`ArtifactReader::open_unverified`], rebuilding a manifest delta against
    /// one of `held`.
    pub fn open_unverified_held(mut src: R, held: &dyn HeldManifests) -> Result<Self, ReadError> {
        let (envelope, envelope_len, delta_base) = read_envelope(&mut src, held)?;
        let manifest = Manifest::from_cbor(&envelope.signed)?;
        Ok(Self::from_parts(
            src,
            envelope,
            envelope_len,
            delta_base,
            manifest,
            None,
        ))
    }

    fn from_parts(
        src: R,
        envelope: Envelope,
        envelope_len: u64,
        delta_base: Option<[u8; 32]>,
        manifest: Manifest,
        base: Option<&Manifest>,
    ) -> Self {
        let manifest_hash = *blake3::hash(&envelope.signed).as_bytes();
        Self::from_parts_hashed(
            src,
            envelope,
            manifest_hash,
            envelope_len,
            delta_base,
            manifest,
            base,
        )
    }

    fn from_parts_hashed(
        src: R,
        envelope: Envelope,
        manifest_hash: [u8; 32],
        envelope_len: u64,
        delta_base: Option<[u8; 32]>,
        manifest: Manifest,
        base: Option<&Manifest>,
    ) -> Self {
        let offset = BLOCK as u64 + envelope_len + ustar::padding(envelope_len) as u64;
        let mut references = HashMap::new();
        for p in &manifest.payloads {
            references_by_id(&mut references, &p.references, |pos| {
                p.chunks.get(pos as usize).map(|c| c.id)
            });
        }
        let mut reader = ArtifactReader {
            src,
            offset,
            envelope,
            envelope_len,
            delta_base,
            manifest,
            expected: None,
            base_held: None,
            ready: std::collections::VecDeque::new(),
            pack: None,
            packs_read: 0,
            layout: None,
            dictionary: None,
            held_dictionary: None,
            contents: None,
            contents_read: false,
            manifest_hash,
            unbound_distinct: None,
            streamed_distinct: None,
            table: None,
            references,
            preamble_done: false,
            peeked: None,
            done: false,
        };
        if let Some(base) = base {
            reader.set_base(base);
        }
        reader
    }

    /// Records what a decode without the chunk list ([`decode_unlisted`]) found
    /// in its place: the distinct chunk count, and the references by chunk id.
    fn unlisted(&mut self, distinct: usize, references: HashMap<ChunkId, Arc<Reference>>) {
        self.streamed_distinct = Some(distinct);
        self.references = references;
    }

    /// Tells the reader of a thin artifact its base release's manifest, so it checks
    /// that exactly the chunks the base lacks are present. Call it before reading any
    /// chunk; it is a no-op for a full artifact.
    pub fn set_base(&mut self, base: &Manifest) {
        assert!(
            self.expected.is_none(),
            "set_base after reading past the envelope"
        );
        if self.manifest.base.is_some() {
            self.base_held = Some(
                base.payloads
                    .iter()
                    .flat_map(|p| p.chunks.iter().map(|c| c.id))
                    .collect(),
            );
        }
    }

    /// Decides, once the members before the first pack were read, which chunks the
    /// packs hold, in order: those the contents member marks; without one, every
    /// distinct chunk of a full artifact, or those a thin artifact's base lacks.
    fn bind(&mut self) -> Result<(), ReadError> {
        if self.expected.is_some() {
            return Ok(());
        }
        assert!(
            self.unbound_distinct.is_none(),
            "chunk lists shed unbound: bind_to must be called before the packs are read"
        );
        assert!(
            self.streamed_distinct.is_none(),
            "a reader opened without its chunk list binds with bind_to"
        );
        let distinct = self.manifest.distinct_chunks();
        let thin = self.manifest.base.is_some();
        let marked = |bits: &[u8], i: usize| bits[i / 8] & (1 << (i % 8)) != 0;
        let expected = match (self.contents.take(), &self.base_held) {
            (Some(bits), held) => {
                // Whatever the contents say, a full artifact holds every chunk and a
                // thin one every chunk its base lacks (when the base is known).
                let must =
                    |c: &ChunkRef| !thin || held.as_ref().is_some_and(|h| !h.contains(&c.id));
                if let Some((_, c)) = distinct
                    .iter()
                    .enumerate()
                    .find(|&(i, c)| must(c) && !marked(&bits, i))
                {
                    return Err(ReadError::MissingChunk(c.id));
                }
                let mut kept =
                    Vec::with_capacity(bits.iter().map(|b| b.count_ones() as usize).sum());
                kept.extend(
                    distinct
                        .into_iter()
                        .enumerate()
                        .filter(|&(i, _)| marked(&bits, i))
                        .map(|(_, c)| c),
                );
                kept
            }
            (None, _) if !thin => distinct,
            (None, Some(held)) => distinct
                .into_iter()
                .filter(|c| !held.contains(&c.id))
                .collect(),
            (None, None) => return Err(ReadError::MissingContents),
        };
        self.expected = Some(Expected::owned(expected));
        Ok(())
    }

    /// Reads the members before the first pack, then drops the manifest's chunk
    /// lists: reading the packs needs only the chunks they hold (bound from the
    /// manifest here), so a caller that keeps the chunk list elsewhere (the engine's
    /// chunk table) does not hold a second copy, 40 bytes a chunk, while it streams.
    /// [`ArtifactReader::manifest`] then has empty `chunks` lists.
    pub fn shed_chunk_lists(&mut self) -> Result<(), ReadError> {
        self.read_preamble()?;
        self.bind()?;
        for p in &mut self.manifest.payloads {
            p.chunks = Vec::new();
        }
        Ok(())
    }

    /// The BLAKE3 of the manifest the first member is a delta against, when the
    /// manifest travelled as a delta ([`crate::manifest_delta`]).
    pub fn manifest_delta_base(&self) -> Option<&[u8; 32]> {
        self.delta_base.as_ref()
    }

    /// Like [`ArtifactReader::shed_chunk_lists`], but leaves the chunks the packs
    /// hold unbound: [`ArtifactReader::bind_to`] binds them, before any chunk is
    /// read, to the distinct chunks someone else keeps (the engine's chunk table),
    /// so no list of them is ever built here. (A thin artifact whose base release
    /// was told, [`ArtifactReader::set_base`], and whose chunk list was decoded,
    /// is bound here against its own list; opened without it, it is checked
    /// against its base in [`ArtifactReader::bind_to`].)
    pub fn shed_chunk_lists_unbound(&mut self) -> Result<(), ReadError> {
        self.read_preamble()?;
        if self.manifest.base.is_some()
            && self.base_held.is_some()
            && self.streamed_distinct.is_none()
        {
            self.bind()?;
        }
        if self.expected.is_none() {
            self.unbound_distinct = Some(self.distinct_count());
        }
        for p in &mut self.manifest.payloads {
            p.chunks = Vec::new();
        }
        Ok(())
    }

    /// Binds the chunks the packs hold to `list`, the distinct chunks of this
    /// artifact's manifest kept elsewhere, after
    /// [`ArtifactReader::shed_chunk_lists_unbound`]: those the contents member
    /// marks (a full artifact must mark every one, a thin one every one its base
    /// lacks when the base was told), or without it every one of a full artifact
    /// (of a thin one, every one its base lacks). A no-op when they are bound
    /// already.
    ///
    /// A `list` of the same manifest that counts other distinct chunks than this
    /// reader found in it is refused ([`ReadError::ChunkListLength`]).
    ///
    /// # Panics
    /// When `list` is of another manifest (a caller's bug: it must come from the
    /// manifest this reader verified).
    pub fn bind_to(&mut self, list: Arc<dyn ChunkList>) -> Result<(), ReadError> {
        if self.expected.is_some() {
            return Ok(());
        }
        let n = self
            .unbound_distinct
            .expect("bind_to after shed_chunk_lists_unbound");
        assert!(
            list.manifest_hash() == self.manifest_hash,
            "bind_to a chunk list of another manifest"
        );
        if list.distinct_len() != n {
            return Err(ReadError::ChunkListLength {
                found: n,
                list: list.distinct_len(),
            });
        }
        let thin = self.manifest.base.is_some();
        // Whatever the contents say, a full artifact holds every chunk and a thin
        // one every chunk its base lacks (when the base was told).
        let held = self.base_held.as_ref().filter(|_| thin);
        let must =
            |k: usize| !thin || held.is_some_and(|h| !h.contains(&list.distinct_chunk(k).id));
        let (bits, len) = match self.contents.take() {
            Some(bits) => {
                let marked = |k: usize| bits[k / 8] & (1 << (k % 8)) != 0;
                if let Some(k) = (0..n).find(|&k| !marked(k) && must(k)) {
                    return Err(ReadError::MissingChunk(list.distinct_chunk(k).id));
                }
                let len = bits.iter().map(|b| b.count_ones() as usize).sum();
                (Some(bits), len)
            }
            None if !thin => (None, n),
            // A thin artifact without contents holds what its base lacks.
            None if held.is_some() => {
                let mut bits = vec![0u8; n.div_ceil(8)];
                for k in (0..n).filter(|&k| must(k)) {
                    bits[k / 8] |= 1 << (k % 8);
                }
                let len = bits.iter().map(|b| b.count_ones() as usize).sum();
                (Some(bits), len)
            }
            None => return Err(ReadError::MissingContents),
        };
        if let Some(table) = &self.table {
            let sum: u64 = table.iter().map(|&c| u64::from(c)).sum();
            if sum != len as u64 {
                return Err(ReadError::PackTableSum { sum, chunks: len });
            }
        }
        self.unbound_distinct = None;
        self.expected = Some(Expected::Shared {
            list,
            bits,
            len,
            taken: 0,
            cursor: 0,
        });
        Ok(())
    }

    /// The manifest's distinct chunk count.
    fn distinct_count(&self) -> usize {
        self.streamed_distinct
            .unwrap_or_else(|| self.manifest.distinct_count())
    }

    /// The verified (or, from `open_unverified`, unverified) manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The envelope as read.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Moves the envelope out of the reader (for a caller that hands it on, as the
    /// installer does to the engine), so the reader does not keep a second copy of
    /// the signed manifest while it streams the packs. [`ArtifactReader::envelope`]
    /// is an empty, unsigned envelope afterwards; reading the packs does not use it.
    pub fn take_envelope(&mut self) -> Envelope {
        std::mem::replace(&mut self.envelope, Envelope::new(Vec::new()))
    }

    /// Size of the envelope member's data, in bytes.
    pub fn envelope_len(&self) -> u64 {
        self.envelope_len
    }

    /// The base release, when this is a thin artifact.
    pub fn base(&self) -> Option<&BaseRelease> {
        self.manifest.base.as_ref()
    }

    /// Whether the artifact is thin (holds only chunks its base lacks).
    pub fn is_thin(&self) -> bool {
        self.manifest.base.is_some()
    }

    /// Bytes of the artifact consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Consumes the reader, returning the source positioned after what was read.
    pub fn into_inner(self) -> R {
        self.src
    }

    /// Reads the next chunk (from the current pack, or the next pack member), checks
    /// its place and size, but does not decode it. `Ok(None)` once the archive ended
    /// and every expected chunk was seen.
    pub fn next_raw(&mut self) -> Result<Option<RawChunk>, ReadError> {
        if !self.window()? {
            return Ok(None);
        }
        let pack = self.pack.as_mut().expect("a pack is open");
        let chunk = pack.chunks[pack.next];
        pack.next += 1;
        // Bounded: stored_size was checked against the chunk size limit by the manifest.
        let mut stored = vec![0u8; chunk.stored_size as usize];
        let mut got = 0;
        if !ustar::read_full(&mut self.src, &mut stored, &mut got)? {
            return Err(ReadError::Truncated {
                what: format!("chunk {}", chunk.id),
            });
        }
        self.offset += u64::from(chunk.stored_size);
        if pack.next == pack.chunks.len() && pack.rest == 0 {
            self.close_pack()?;
        }
        Ok(Some(RawChunk {
            chunk,
            stored,
            dictionary: self.dictionary.clone(),
            reference: self.references.get(&chunk.id).cloned(),
        }))
    }

    /// Makes sure a pack (or a data member's window) with a chunk still to read is
    /// open: opens the next member, or takes a data member's next chunks.
    /// `Ok(false)` at the (checked) end of the archive.
    fn window(&mut self) -> Result<bool, ReadError> {
        loop {
            if self.done {
                return Ok(false);
            }
            match &self.pack {
                Some(p) if p.next < p.chunks.len() => return Ok(true),
                Some(_) => self.next_window()?,
                None => {
                    if !self.open_pack()? {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Reads the padding after the open pack's last chunk and closes it.
    fn close_pack(&mut self) -> Result<(), ReadError> {
        let pack = self.pack.take().expect("a pack is open");
        let mut pad = [0u8; BLOCK];
        let pad = &mut pad[..pack.padding];
        let mut got = 0;
        if !ustar::read_full(&mut self.src, pad, &mut got)? {
            return Err(ReadError::Truncated {
                what: match self.layout {
                    Some(Layout::Data) => format!("data member {}", pack.seq),
                    _ => format!("pack {}", pack.seq),
                },
            });
        }
        self.offset += pad.len() as u64;
        Ok(())
    }

    /// Takes the next chunks of the open data member: as many as its bytes left
    /// hold (at most [`PACK_CHUNKS_MAX`] at a time), by their signed stored sizes.
    /// The member must end where a chunk ends, and hold no bytes past the last one.
    fn next_window(&mut self) -> Result<(), ReadError> {
        let pack = self.pack.as_mut().expect("a pack is open");
        let expected = self.expected.as_mut().expect("bound");
        let mut chunks = Vec::new();
        let mut bytes = 0u64;
        while chunks.len() < PACK_CHUNKS_MAX
            && let Some(c) = expected.peek()
            && bytes + u64::from(c.stored_size) <= pack.rest
        {
            bytes += u64::from(c.stored_size);
            chunks.extend(expected.take(1));
        }
        if chunks.is_empty() {
            let reason = match expected.peek() {
                Some(c) => format!(
                    "ends {} into chunk {} of {} stored bytes",
                    count_bytes(pack.rest),
                    c.id,
                    c.stored_size
                ),
                None => format!("{} after the last chunk", count_bytes(pack.rest)),
            };
            return Err(ReadError::BadDataMember {
                seq: pack.seq,
                reason,
            });
        }
        pack.rest -= bytes;
        pack.chunks = chunks;
        pack.next = 0;
        Ok(())
    }

    /// Reads the members before the first pack: the dictionary, contents and pack
    /// table members, each optional, in that order. Stops right after the pack table
    /// (so the next byte is the first pack's header); without one, at the first
    /// other header, which it keeps for [`ArtifactReader::open_pack`].
    fn read_preamble(&mut self) -> Result<(), ReadError> {
        if self.preamble_done {
            return Ok(());
        }
        while !self.preamble_done {
            let member = match self.read_header()? {
                Block::Member(m) if m.kind == b'0' || m.kind == 0 => m,
                other => {
                    self.peeked = Some(other);
                    self.preamble_done = true;
                    break;
                }
            };
            let path = member.path.as_str();
            if path == DICTIONARY_MEMBER && self.dictionary.is_none() && !self.contents_read {
                // The artifact's own dictionary wins over a held one.
                self.held_dictionary = None;
                self.read_dictionary_member(member.size)?;
            } else if path == CONTENTS_MEMBER && !self.contents_read {
                self.read_contents_member(member.size)?;
            } else if path == PACK_TABLE_MEMBER {
                self.read_table_member(member.size)?;
                self.preamble_done = true;
            } else {
                self.peeked = Some(Block::Member(member));
                self.preamble_done = true;
            }
        }
        if self.dictionary.is_none() {
            self.dictionary = self.held_dictionary.take();
        }
        Ok(())
    }

    /// Reads the next header block; the archive must go on (`Truncated` otherwise).
    fn read_header(&mut self) -> Result<Block, ReadError> {
        read_block(&mut self.src, &mut self.offset, "the chunk list")?.ok_or_else(|| {
            ReadError::Truncated {
                what: "the chunk list".into(),
            }
        })
    }

    /// After the first end-of-archive block: checks the second (so a reader consumes
    /// the whole artifact, and no more) and that every expected chunk came.
    fn read_end(&mut self) -> Result<(), ReadError> {
        let mut second = [0u8; BLOCK];
        let mut got = 0;
        if !ustar::read_full(&mut self.src, &mut second, &mut got)? {
            return Err(ReadError::Truncated {
                what: "the end of the archive".into(),
            });
        }
        if second.iter().any(|&b| b != 0) {
            return Err(ReadError::BadHeader {
                offset: self.offset,
                reason: HeaderError::NotEnd,
            });
        }
        self.offset += BLOCK as u64;
        self.done = true;
        self.bind()?;
        let expected = self.expected.as_ref().expect("bound");
        if let Some(c) = expected.peek() {
            return Err(ReadError::MissingChunk(c.id));
        }
        Ok(())
    }

    /// Reads the next member header and the pack's count, checking them against the
    /// manifest's order (and the pack table, if any). `Ok(false)` at the (checked) end.
    fn open_pack(&mut self) -> Result<bool, ReadError> {
        self.read_preamble()?;
        let block = match self.peeked.take() {
            Some(block) => block,
            None => self.read_header()?,
        };
        let member = match block {
            Block::End => {
                self.read_end()?;
                return Ok(false);
            }
            Block::Member(m) => m,
        };
        if ustar::is_unsafe_path(&member.path) {
            return Err(ReadError::UnsafePath { path: member.path });
        }
        let is_file = member.kind == b'0' || member.kind == 0;
        // The first member says the layout: data members, or packs (and only packs
        // come after a pack table).
        let layout = match self.layout {
            Some(l) => l,
            None if self.table.is_none() && member.path == data_path(0) => Layout::Data,
            None => Layout::Packs,
        };
        let path = match layout {
            Layout::Packs => pack_path(self.packs_read),
            Layout::Data => data_path(self.packs_read),
        };
        if !is_file || member.path != path {
            return Err(ReadError::UnexpectedMember { path: member.path });
        }
        self.layout = Some(layout);
        if layout == Layout::Data {
            self.bind()?;
            let seq = self.packs_read;
            self.packs_read += 1;
            if member.size == 0 {
                return Err(ReadError::BadDataMember {
                    seq,
                    reason: "no bytes".into(),
                });
            }
            // Refused as it opens, before any of its chunks is handed out, as a
            // pack whose size disagrees with its chunks is: the member holds a
            // whole run of the chunks still to come.
            self.expected
                .as_ref()
                .expect("bound")
                .fits(member.size)
                .map_err(|reason| ReadError::BadDataMember { seq, reason })?;
            self.pack = Some(Pack {
                seq,
                chunks: Vec::new(),
                next: 0,
                padding: ustar::padding(member.size),
                rest: member.size,
            });
            self.next_window()?;
            return Ok(true);
        }
        self.bind()?;
        let seq = self.packs_read;
        self.packs_read += 1;
        let bad = |reason: String| ReadError::BadPack { seq, reason };
        let truncated = || ReadError::Truncated {
            what: format!("pack {seq}"),
        };
        let mut count = [0u8; 4];
        let mut got = 0;
        if member.size < 4 {
            return Err(bad(format!("member of {} bytes has no index", member.size)));
        }
        if !ustar::read_full(&mut self.src, &mut count, &mut got)? {
            return Err(truncated());
        }
        let count = u32::from_le_bytes(count);
        let index_len = PACK_HEADER_LEN as u64;
        let left = self.expected.as_ref().expect("bound").left();
        if count == 0 || count as usize > PACK_CHUNKS_MAX {
            return Err(bad(format!(
                "{count} chunks (a pack holds 1 to {PACK_CHUNKS_MAX})"
            )));
        }
        if count as usize > left {
            return Err(bad(format!(
                "{count} chunks, but only {left} remain to come"
            )));
        }
        if let Some(table) = &self.table {
            // The table's counts add up to what the artifact holds and every pack so
            // far matched its entry, so this pack has one.
            let entry = table.get(seq as usize).copied().unwrap_or(0);
            if entry != count {
                return Err(ReadError::PackCountMismatch {
                    seq,
                    table: entry,
                    found: count,
                });
            }
        }
        let count = count as usize;
        self.offset += index_len;
        // The pack holds the next `count` chunks in order; their hashes prove it.
        let chunks = self.expected.as_mut().expect("bound").take(count);
        let data_len: u64 = chunks.iter().map(|c| u64::from(c.stored_size)).sum();
        if index_len + data_len != member.size {
            return Err(ReadError::PackSizeMismatch {
                seq,
                expected: index_len + data_len,
                found: member.size,
            });
        }
        self.pack = Some(Pack {
            seq,
            chunks,
            next: 0,
            padding: ustar::padding(member.size),
            rest: 0,
        });
        Ok(true)
    }

    /// Reads a member's `size` data bytes and its padding; the caller has bounded
    /// `size`. `what` names the member in the truncation error.
    fn read_member_data(&mut self, size: u64, what: &str) -> Result<Vec<u8>, ReadError> {
        let truncated = || ReadError::Truncated { what: what.into() };
        let mut bytes = vec![0u8; usize::try_from(size).map_err(|_| truncated())?];
        let mut got = 0;
        if !ustar::read_full(&mut self.src, &mut bytes, &mut got)? {
            return Err(truncated());
        }
        let mut pad = [0u8; BLOCK];
        let pad = &mut pad[..ustar::padding(size)];
        if !ustar::read_full(&mut self.src, pad, &mut got)? {
            return Err(truncated());
        }
        self.offset += size + pad.len() as u64;
        Ok(bytes)
    }

    /// Reads the dictionary member's data (bounded).
    fn read_dictionary_member(&mut self, size: u64) -> Result<(), ReadError> {
        if size > DICTIONARY_SIZE_MAX as u64 {
            return Err(ReadError::Dictionary(DictionaryError::TooLarge(
                usize::try_from(size).unwrap_or(usize::MAX),
            )));
        }
        let bytes = self.read_member_data(size, "the dictionary")?;
        let d = Dictionary::from_bytes(bytes)?;
        self.check_named_dictionary(&d, false)?;
        self.dictionary = Some(d);
        Ok(())
    }

    /// A dictionary must be the one the signed manifest names, when it names one.
    fn check_named_dictionary(&self, d: &Dictionary, held: bool) -> Result<(), ReadError> {
        match self.manifest.dictionary {
            Some(expected) if expected != d.id => Err(ReadError::DictionaryMismatch {
                expected,
                found: d.id,
                held,
            }),
            _ => Ok(()),
        }
    }

    /// Gives the reader the dictionary the signed manifest names, for an artifact
    /// that carries none because it reuses its base's (a device keeps it with the
    /// base's manifest; a store under its zstd id). Checked against the manifest
    /// (`DictionaryMismatch`); ignored when the manifest names none or once the
    /// artifact's own member was read.
    pub fn hold_dictionary(&mut self, d: Dictionary) -> Result<(), ReadError> {
        if self.manifest.dictionary.is_none() || self.dictionary.is_some() {
            return Ok(());
        }
        self.check_named_dictionary(&d, true)?;
        if self.preamble_done {
            self.dictionary = Some(d);
        } else {
            self.held_dictionary = Some(d);
        }
        Ok(())
    }

    /// Reads the contents member's data (bounded by the manifest's chunk count).
    fn read_contents_member(&mut self, size: u64) -> Result<(), ReadError> {
        let distinct = self.distinct_count();
        let expected = distinct.div_ceil(8) as u64;
        if size != expected {
            return Err(ReadError::ContentsLength {
                expected,
                found: size,
                chunks: distinct,
            });
        }
        let bits = self.read_member_data(size, "the contents member")?;
        let tail = distinct % 8;
        if tail != 0 && bits.last().is_some_and(|&b| b >> tail != 0) {
            return Err(ReadError::ContentsPadding { chunks: distinct });
        }
        self.contents = Some(bits);
        self.contents_read = true;
        Ok(())
    }

    /// How many chunks the packs hold, without binding them when the contents
    /// member or the kind of artifact says (a full artifact holds every distinct
    /// chunk; whether the contents member marks them all is checked when binding).
    fn held_count(&mut self) -> Result<HeldCount, ReadError> {
        if let Some(e) = &self.expected {
            return Ok(HeldCount::Exact(e.len()));
        }
        let thin = self.manifest.base.is_some();
        match &self.contents {
            // A full artifact holds every chunk: one its contents leave out is
            // refused here, as binding would.
            Some(bits) if !thin => {
                let n = self.distinct_count();
                let marked = |k: usize| bits[k / 8] & (1 << (k % 8)) != 0;
                // Opened without its chunk list, the reader finds the chunk's id
                // when it is bound (`bind_to`, before any chunk is read).
                let listed = self.streamed_distinct.is_none();
                if let Some(k) = (0..n).find(|&k| listed && !marked(k)) {
                    return Err(ReadError::MissingChunk(
                        self.manifest.distinct_chunks()[k].id,
                    ));
                }
                Ok(HeldCount::Exact(n))
            }
            // (Opened without its chunk list, a thin artifact is checked against
            // its base when it is bound: `bind_to`.)
            Some(bits) if self.base_held.is_none() || self.streamed_distinct.is_some() => Ok(
                HeldCount::Exact(bits.iter().map(|b| b.count_ones() as usize).sum()),
            ),
            None if !thin => Ok(HeldCount::Exact(self.distinct_count())),
            // A thin artifact without contents opened without its chunk list: it
            // holds what its base lacks, known only when bound (`bind_to`, which
            // checks the table's sum); until then, at most every distinct chunk.
            None if self.streamed_distinct.is_some() => match self.base_held {
                Some(_) => Ok(HeldCount::AtMost(self.distinct_count())),
                None => Err(ReadError::MissingContents),
            },
            // A thin artifact checked against its base, or without contents.
            _ => {
                self.bind()?;
                Ok(HeldCount::Exact(
                    self.expected.as_ref().expect("bound").len(),
                ))
            }
        }
    }

    /// Reads the pack table member's data: bounded by the chunks the artifact holds
    /// (every pack holds at least one) before it is read, then every count must be a
    /// possible pack's and they must add up to exactly those chunks (to at most
    /// them when only an upper count is known yet, [`HeldCount::AtMost`]: checked
    /// exactly in [`ArtifactReader::bind_to`]).
    fn read_table_member(&mut self, size: u64) -> Result<(), ReadError> {
        let held = self.held_count()?;
        let chunks = held.chunks();
        let entry = PACK_TABLE_ENTRY_LEN as u64;
        let max = chunks as u64 * entry;
        if size > max {
            return Err(ReadError::PackTableTooLarge {
                found: size,
                max,
                chunks,
            });
        }
        if !size.is_multiple_of(entry) {
            return Err(ReadError::PackTableLength { found: size });
        }
        let bytes = self.read_member_data(size, "the pack table")?;
        let table: Vec<u32> = bytes
            .chunks_exact(PACK_TABLE_ENTRY_LEN)
            .map(|b| u32::from_le_bytes(b.try_into().expect("exact chunks")))
            .collect();
        if let Some((seq, &count)) = table
            .iter()
            .enumerate()
            .find(|&(_, &c)| c == 0 || c as usize > PACK_CHUNKS_MAX)
        {
            return Err(ReadError::PackTableCount {
                seq: seq as u64,
                count,
            });
        }
        let sum: u64 = table.iter().map(|&c| u64::from(c)).sum();
        let fits = match held {
            HeldCount::Exact(_) => sum == chunks as u64,
            // Checked exactly when bound (`bind_to`).
            HeldCount::AtMost(_) => sum <= chunks as u64,
        };
        if !fits {
            return Err(ReadError::PackTableSum { sum, chunks });
        }
        self.table = Some(table);
        Ok(())
    }

    /// Which chunks the artifact holds, in artifact order, as it says before its
    /// first chunk: those its contents member marks; without one, all distinct
    /// chunks of a full artifact, or those a thin one's base lacks. Reads the members
    /// before the first pack (see [`ArtifactReader::read_dictionary`]). A hint for
    /// planning, not a proof: the chunks themselves are still hash-checked as they
    /// come, and one listed but absent fails the read at the latest at the end.
    pub fn holds(&mut self) -> Result<Vec<ChunkId>, ReadError> {
        self.read_dictionary()?;
        self.bind()?;
        Ok(self.expected.as_ref().expect("bound").ids())
    }

    /// The zstd dictionary the chunks were compressed with, once it was read (it
    /// comes before the first pack).
    pub fn dictionary(&self) -> Option<&Dictionary> {
        self.dictionary.as_ref()
    }

    /// Reads the members before the first pack (dictionary, contents, pack table)
    /// without consuming a chunk, and returns the dictionary. With a pack table it
    /// stops right after the table; an older artifact without one is read on to the
    /// first pack's tar header.
    pub fn read_dictionary(&mut self) -> Result<Option<&Dictionary>, ReadError> {
        self.read_preamble()?;
        Ok(self.dictionary.as_ref())
    }

    /// The chunk count of each pack, from the pack table member, once it was read
    /// (`None` for an artifact without one).
    pub fn pack_table(&self) -> Option<&[u32]> {
        self.table.as_deref()
    }

    /// Reads, decodes and verifies the next chunk; `Ok(None)` at the (checked) end.
    pub fn next_chunk(&mut self) -> Result<Option<(ChunkId, Vec<u8>)>, ReadError> {
        self.next_chunk_with(None)
    }

    /// Like [`ArtifactReader::next_chunk`], decoding a delta-encoded chunk with the
    /// reference bytes `references` gives.
    pub fn next_chunk_with(
        &mut self,
        references: Option<&mut (dyn ReferenceSource + '_)>,
    ) -> Result<Option<(ChunkId, Vec<u8>)>, ReadError> {
        match self.next_raw()? {
            None => Ok(None),
            Some(raw) => {
                let data = match resolve(&raw, references)? {
                    Some(bytes) => raw.verify_against(&bytes)?.into_data(),
                    None => raw.verify()?,
                };
                Ok(Some((raw.chunk.id, data)))
            }
        }
    }

    /// Reads and verifies every remaining chunk, discarding the bytes: one batch is
    /// verified on all cores while the next is read. Errors come in artifact order,
    /// as if read one chunk at a time. Returns the number of chunks verified.
    pub fn verify_rest(&mut self, progress: impl FnMut(u64)) -> Result<u64, ReadError>
    where
        R: Send,
    {
        self.verify_rest_with(None, progress)
    }

    /// Like [`ArtifactReader::verify_rest`], decoding delta-encoded chunks with the
    /// reference bytes `references` gives (without a source they are
    /// [`ChunkError::NeedsReference`]).
    pub fn verify_rest_with(
        &mut self,
        mut references: Option<&mut (dyn ReferenceSource + '_)>,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, ReadError>
    where
        R: Send,
    {
        let mut n = 0u64;
        let (mut pending, mut failure) = self.read_raw_batch(BATCH_BYTES);
        loop {
            if pending.is_empty() {
                return match failure {
                    Some(e) => Err(e),
                    None => Ok(n),
                };
            }
            let read_next = failure.is_none();
            // The batch's references, in order: the first that cannot be read is the
            // batch's error, after the chunks before it were verified.
            let mut refs: Vec<Option<ReferenceBytes>> = Vec::with_capacity(pending.len());
            let mut ref_failure = None;
            for raw in &pending {
                match resolve(raw, references.as_deref_mut()) {
                    Ok(r) => refs.push(r),
                    Err(e) => {
                        ref_failure = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = ref_failure {
                pending.truncate(refs.len());
                pending
                    .par_iter()
                    .zip(&refs)
                    .map(|(r, b)| verify_one(r, b.as_ref()))
                    .collect::<Result<(), _>>()?;
                return Err(e);
            }
            let (verified, next) = rayon::join(
                || {
                    pending
                        .par_iter()
                        .zip(&refs)
                        .map(|(r, b)| verify_one(r, b.as_ref()))
                        .collect::<Result<(), _>>()
                },
                || {
                    if read_next {
                        self.read_raw_batch(BATCH_BYTES)
                    } else {
                        (Vec::new(), None)
                    }
                },
            );
            verified?;
            n += pending.len() as u64;
            progress(pending.iter().map(|r| u64::from(r.chunk.size)).sum());
            if !read_next {
                // Everything before the structural error was sound: report it now.
                return Err(failure.take().expect("read_next is false only on failure"));
            }
            (pending, failure) = next;
        }
    }

    /// Reads chunks (not verifying them) until about `max_stored_bytes`, the end, or a
    /// structural error, which is returned beside the chunks read before it.
    fn read_raw_batch(&mut self, max_stored_bytes: usize) -> (Vec<RawChunk>, Option<ReadError>) {
        let mut raws = Vec::new();
        let mut bytes = 0;
        while bytes < max_stored_bytes {
            match self.next_raw() {
                Ok(Some(raw)) => {
                    bytes += raw.stored.len();
                    raws.push(raw);
                }
                Ok(None) => break,
                Err(e) => return (raws, Some(e)),
            }
        }
        (raws, None)
    }
}

/// Verifies one chunk, with its reference bytes when it is delta-encoded.
fn verify_one(raw: &RawChunk, reference: Option<&ReferenceBytes>) -> Result<(), ChunkError> {
    match reference {
        Some(b) => raw.verify_against(b).map(|_| ()),
        None => raw.verify().map(|_| ()),
    }
}

/// A source the reader can move forward in without reading the bytes it passes: a
/// file seeks, a pipe reads and discards.
pub trait Skip: Read {
    /// Moves `n` bytes forward.
    fn skip(&mut self, n: u64) -> io::Result<()>;
}

impl<T: Skip + ?Sized> Skip for &mut T {
    fn skip(&mut self, n: u64) -> io::Result<()> {
        (**self).skip(n)
    }
}

/// Most stored bytes [`ArtifactReader::next_wanted`] reads in one go (a run of
/// wanted chunks of one pack).
pub const RUN_BYTES_MAX: usize = 1024 * 1024;

impl<R: Skip> ArtifactReader<R> {
    /// Like [`ArtifactReader::next_raw`], but only for chunks `want` says yes to: the
    /// others are skipped over without being read (their place and size are known
    /// from the pack header and the signed manifest). Consecutive wanted chunks of a
    /// pack are read together, up to [`RUN_BYTES_MAX`].
    ///
    /// Every member header (and each pack's 4-byte count) is still read and checked
    /// exactly as `next_raw` and `verify` check it, so an artifact `verify` refuses
    /// (a `..` path, a hard link or device node, packs or data members out of order,
    /// a second dictionary, a count that disagrees with the pack table, a data member
    /// that ends inside a chunk) is refused here too, even where none of its chunks
    /// is wanted: 512 bytes per data member (one for most images), 516 per pack.
    pub fn next_wanted(
        &mut self,
        mut want: impl FnMut(&ChunkId) -> bool,
    ) -> Result<Option<RawChunk>, ReadError> {
        loop {
            if let Some(raw) = self.ready.pop_front() {
                return Ok(Some(raw));
            }
            // Every member's header (and a pack's count) is read and checked as
            // `next_raw` checks it (path, type, order, count against the table, size),
            // also of a member none of whose chunks are wanted: one reader, one set
            // of rules.
            if !self.window()? {
                return Ok(None);
            }
            let pack = self.pack.as_mut().expect("a pack is open");
            // Skip the unwanted chunks ahead.
            let mut skip = 0u64;
            while pack.next < pack.chunks.len() && !want(&pack.chunks[pack.next].id) {
                skip += u64::from(pack.chunks[pack.next].stored_size);
                pack.next += 1;
            }
            // Then take the run of wanted ones after them.
            let start = pack.next;
            let mut run = 0usize;
            while pack.next < pack.chunks.len()
                && (pack.next == start || run < RUN_BYTES_MAX)
                && want(&pack.chunks[pack.next].id)
            {
                run += pack.chunks[pack.next].stored_size as usize;
                pack.next += 1;
            }
            let end = pack.next;
            let last = pack.next == pack.chunks.len() && pack.rest == 0;
            let padding = pack.padding as u64;
            let chunks = pack.chunks[start..end].to_vec();
            if last {
                self.pack = None;
            }
            self.skip(skip)?;
            if run > 0 {
                self.read_run(chunks, run)?;
            }
            if last {
                self.skip(padding)?;
            }
        }
    }

    /// Moves `n` bytes forward without reading them.
    fn skip(&mut self, n: u64) -> Result<(), ReadError> {
        if n > 0 {
            self.src.skip(n)?;
            self.offset += n;
        }
        Ok(())
    }

    /// Reads `run` stored bytes holding `chunks` (consecutive in a pack) in one read
    /// and queues them. Bounded: at most [`RUN_BYTES_MAX`] plus one chunk's checked
    /// stored size.
    fn read_run(&mut self, chunks: Vec<ChunkRef>, run: usize) -> Result<(), ReadError> {
        let mut bytes = vec![0u8; run];
        let mut got = 0;
        if !ustar::read_full(&mut self.src, &mut bytes, &mut got)? {
            let at = chunks
                .iter()
                .scan(0usize, |sum, c| {
                    *sum += c.stored_size as usize;
                    Some((*sum, c.id))
                })
                .find(|(sum, _)| *sum > got)
                .map_or(chunks[0].id, |(_, id)| id);
            return Err(ReadError::Truncated {
                what: format!("chunk {at}"),
            });
        }
        self.offset += run as u64;
        let mut at = 0;
        for c in chunks {
            let n = c.stored_size as usize;
            self.ready.push_back(RawChunk {
                chunk: c,
                stored: bytes[at..at + n].to_vec(),
                dictionary: self.dictionary.clone(),
                reference: self.references.get(&c.id).cloned(),
            });
            at += n;
        }
        Ok(())
    }
}

/// Stored bytes read per parallel verification batch.
pub const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Reads one header block. `Ok(None)` when the source ends exactly at the boundary.
fn read_block<R: Read>(
    src: &mut R,
    offset: &mut u64,
    what: &str,
) -> Result<Option<Block>, ReadError> {
    let mut block = [0u8; BLOCK];
    let mut got = 0;
    if !ustar::read_full(src, &mut block, &mut got)? {
        if got == 0 {
            return Ok(None);
        }
        return Err(ReadError::Truncated {
            what: format!("a header in {what}"),
        });
    }
    let at = *offset;
    *offset += BLOCK as u64;
    ustar::parse(&block)
        .map(Some)
        .map_err(|reason| ReadError::BadHeader { offset: at, reason })
}

/// Checks, before an artifact's envelope is read into memory, that it is signed at
/// all (and, with `root`, by at least the threshold of the root's release keys,
/// counted by key id): an unsigned 15 MB envelope is refused after reading a few
/// hundred bytes, not after holding and decoding it. The signed bytes come first in
/// the (canonical) envelope, so the source seeks over them to the signatures and
/// back; it is left where it was. The signatures are verified later, as always;
/// anything unexpected here (not an artifact, a truncated file) is left for the
/// reader to report.
pub fn check_envelope_signers<R: Read + io::Seek>(
    src: &mut R,
    root: Option<&TrustRoot>,
) -> Result<(), ReadError> {
    let start = src.stream_position()?;
    let result = envelope_signers(src, start, root);
    src.seek(io::SeekFrom::Start(start))?;
    result
}

fn envelope_signers<R: Read + io::Seek>(
    src: &mut R,
    start: u64,
    root: Option<&TrustRoot>,
) -> Result<(), ReadError> {
    let mut block = [0u8; BLOCK];
    let mut got = 0;
    if !ustar::read_full(src, &mut block, &mut got)? {
        return Ok(());
    }
    let member = match ustar::parse(&block) {
        Ok(Block::Member(m)) if m.path == ENVELOPE_MEMBER => m,
        _ => return Ok(()),
    };
    let size = member.size;
    if size > ENVELOPE_SIZE_MAX as u64 {
        return Ok(()); // EnvelopeTooLarge, before anything is read.
    }
    member_signers(src, start + BLOCK as u64, size, root)
}

/// The signature check of [`check_envelope_signers`] on the envelope member's
/// data of `size` bytes at `data_start` in `src`.
fn member_signers<R: Read + io::Seek>(
    src: &mut R,
    data_start: u64,
    size: u64,
    root: Option<&TrustRoot>,
) -> Result<(), ReadError> {
    let mut got = 0;
    // `{ "signed": bstr(L), "signatures": [..] }`: map(2), text(6) "signed", and
    // the byte string's header (1 to 9 bytes).
    const KEY: &[u8] = b"\xa2\x66signed";
    let mut head = [0u8; 8 + 9];
    let head_len = usize::try_from(size).map_or(head.len(), |s| s.min(head.len()));
    if !ustar::read_full(src, &mut head[..head_len], &mut got)? || head[..8] != *KEY {
        return Ok(());
    }
    let (len, header) = match head[8] {
        b @ 0x40..=0x57 => (u64::from(b - 0x40), 1),
        0x58 => (u64::from(head[9]), 2),
        0x59 => (u64::from(u16::from_be_bytes([head[9], head[10]])), 3),
        0x5a => (
            u64::from(u32::from_be_bytes(head[9..13].try_into().expect("4 bytes"))),
            5,
        ),
        _ => return Ok(()),
    };
    let signed_end = 8 + header + len;
    if signed_end > size {
        return Ok(());
    }
    let tail_len = size - signed_end;
    // What follows is `"signatures": [..]`, bounded by the signature limit.
    let tail_max = 11 + 5 + SIGNATURES_MAX as u64 * 128;
    if tail_len > tail_max {
        return Ok(());
    }
    src.seek(io::SeekFrom::Start(data_start + signed_end))?;
    let mut tail = vec![0xa1u8; 1 + tail_len as usize];
    if !ustar::read_full(src, &mut tail[1..], &mut got)? {
        return Ok(());
    }
    #[derive(serde::Deserialize)]
    struct Tail {
        signatures: Vec<shoal_signing::Signature>,
    }
    let Ok(Tail { signatures }) = cbor4ii::serde::from_slice::<Tail>(&tail) else {
        return Ok(());
    };
    if signatures.is_empty() {
        return Err(ReadError::Unsigned { size });
    }
    if let Some(role) = root.and_then(|r| r.roles.get(&RoleName::Release)) {
        let signers: HashSet<_> = signatures.iter().map(|s| s.key_id).collect();
        let found = role.key_ids.iter().filter(|k| signers.contains(k)).count();
        let found = u32::try_from(found).unwrap_or(u32::MAX);
        if found < role.threshold {
            return Err(ReadError::TooFewSigners {
                size,
                found,
                threshold: role.threshold,
            });
        }
    }
    Ok(())
}

/// Where a manifest's signed bytes are: in memory, or in a stored envelope
/// file (`len` bytes at `at`, which must hash to `hash`: what the signatures
/// were verified over).
#[derive(Clone, Copy)]
enum Signed<'a> {
    Slice(&'a [u8]),
    File {
        file: &'a dyn crate::ReadAt,
        at: u64,
        len: u64,
        hash: &'a [u8; 32],
    },
}

impl<'a> Signed<'a> {
    fn stream<S: crate::ChunkIdSink>(
        self,
        ids: S,
    ) -> Result<(crate::StreamedManifest<'a>, S), crate::StreamedError> {
        match self {
            Signed::Slice(bytes) => Manifest::from_cbor_streaming(bytes, ids),
            Signed::File {
                file,
                at,
                len,
                hash,
            } => Manifest::from_file_streaming(file, at, len, hash, ids),
        }
    }
}

/// A streamed decode's error as the reader's: the manifest's own, or (the file
/// could not be read, or changed) an I/O error.
pub(crate) fn manifest_error(e: crate::StreamedError) -> ReadError {
    match e {
        crate::StreamedError::Manifest(e) => ReadError::from(e),
        crate::StreamedError::Read(e) => ReadError::Io(io::Error::other(e)),
        // The reader's sinks do not fail.
        e => ReadError::from(ManifestError::Decode(e.to_string())),
    }
}

/// The whole manifest (its chunk list included) decoded from the signed bytes
/// of a stored envelope file as they are read, for a manifest of several
/// payloads (which [`decode_unlisted`] leaves whole, and a device refuses): the
/// bytes are never whole in memory, only the list.
fn decode_whole(signed: Signed<'_>) -> Result<Manifest, ReadError> {
    use crate::{ChunkIdSink, StreamedIds};
    #[derive(Default)]
    struct Collect {
        ids: Vec<ChunkId>,
        first: HashMap<ChunkId, u32>,
    }
    impl ChunkIdSink for Collect {
        fn push(&mut self, id: &ChunkId) -> Result<(), String> {
            let at = u32::try_from(self.ids.len()).map_err(|_| "too many chunks".to_owned())?;
            self.first.entry(*id).or_insert(at);
            self.ids.push(*id);
            Ok(())
        }
    }
    impl StreamedIds for Collect {
        fn positions(&self) -> u32 {
            self.ids.len() as u32
        }
        fn is_first(&self, pos: u32) -> bool {
            self.first.get(&self.ids[pos as usize]) == Some(&pos)
        }
        fn id(&self, pos: u32) -> ChunkId {
            self.ids[pos as usize]
        }
    }
    let (mut streamed, collected) = signed.stream(Collect::default()).map_err(manifest_error)?;
    let sizes = std::mem::take(&mut streamed.sizes);
    let mut manifest = streamed.finish(&collected).map_err(manifest_error)?;
    // The map of first positions (about 40 bytes a chunk) goes before the list
    // is built: not alive with it (8 GiB thin install: 72.6 -> 57.4 MiB peak RSS).
    let Collect { ids, first } = collected;
    drop(first);
    if let Some(p) = manifest.payloads.first_mut() {
        p.chunks = sizes.chunk_refs(&ids);
    }
    Ok(manifest)
}

/// Adds to `by_id` the reference of each chunk `references` name (one shared
/// copy each), by the id `id_at` gives of its position (none: past the list,
/// which the manifest's check refuses).
fn references_by_id(
    by_id: &mut HashMap<ChunkId, Arc<Reference>>,
    references: &[Reference],
    mut id_at: impl FnMut(u32) -> Option<ChunkId>,
) {
    for r in references {
        let shared = Arc::new(r.clone());
        for &pos in &r.chunks {
            if let Some(id) = id_at(pos) {
                by_id.insert(id, Arc::clone(&shared));
            }
        }
    }
}

/// A manifest decoded without its chunk list ([`decode_unlisted`]).
struct Unlisted {
    manifest: Manifest,
    /// Distinct chunks of its payload.
    distinct: usize,
    /// The reference of each delta-encoded chunk, by its id (the ids at the
    /// references' positions, the only ones kept).
    references: HashMap<ChunkId, Arc<Reference>>,
}

/// The manifest of an artifact decoded without its chunk list, with its
/// distinct chunk count and the ids its references name
/// ([`ArtifactReader::open_held_unbound`], [`ArtifactReader::open_stored`]);
/// `None` for a manifest of several payloads (a device installs one). Neither
/// the ids (32 bytes a chunk) nor a map of their first positions (about 70
/// bytes a chunk) is ever held: the distinct count is found from the ids'
/// first 4 bytes, and a second decode keeps the full ids only at the positions
/// whose first 4 bytes repeat (their first positions, to count them and to
/// tell a reference's position is its id's first) and at the positions the
/// references name. The references are checked as a whole decode checks them,
/// with the same errors.
fn decode_unlisted(signed: Signed<'_>) -> Result<Option<Unlisted>, ReadError> {
    use crate::{ChunkIdSink, StreamedIds};
    fn prefix(id: &ChunkId) -> u32 {
        u32::from_be_bytes([id.0[0], id.0[1], id.0[2], id.0[3]])
    }
    fn bit(bits: &[u64], at: u32) -> bool {
        bits.get(at as usize / 64)
            .is_some_and(|w| w >> (at % 64) & 1 == 1)
    }
    struct Prefixes(Vec<u32>);
    impl ChunkIdSink for Prefixes {
        fn push(&mut self, id: &ChunkId) -> Result<(), String> {
            self.0.push(prefix(id));
            Ok(())
        }
        fn reserve(&mut self, positions: usize) {
            self.0.reserve_exact(positions);
        }
    }
    /// The full ids the second decode keeps.
    struct Kept {
        /// Positions whose prefix repeats.
        repeats: Vec<u64>,
        /// Positions a reference names.
        referenced: Vec<u64>,
        positions: u32,
        at: u32,
        /// Each id at a repeated prefix, at its first position.
        first: HashMap<ChunkId, u32>,
        /// The id at each referenced position.
        named: HashMap<u32, ChunkId>,
    }
    impl ChunkIdSink for Kept {
        fn push(&mut self, id: &ChunkId) -> Result<(), String> {
            if bit(&self.repeats, self.at) {
                self.first.entry(*id).or_insert(self.at);
            }
            if bit(&self.referenced, self.at) {
                self.named.insert(self.at, *id);
            }
            self.at += 1;
            Ok(())
        }
    }
    impl StreamedIds for Kept {
        fn positions(&self) -> u32 {
            self.positions
        }
        // Asked of the referenced positions only (each below `positions`).
        fn is_first(&self, pos: u32) -> bool {
            !bit(&self.repeats, pos) || self.first.get(&self.id(pos)) == Some(&pos)
        }
        // Asked of a referenced position (the only payload's).
        fn id(&self, pos: u32) -> ChunkId {
            *self
                .named
                .get(&pos)
                .expect("the ids of the referenced positions are kept")
        }
    }
    let (mut streamed, prefixes) = signed
        .stream(Prefixes(Vec::new()))
        .map_err(manifest_error)?;
    if streamed.manifest().payloads.len() != 1 {
        return Ok(None);
    }
    streamed.sizes = Default::default();
    let p = prefixes.0;
    let n = p.len();
    let positions = u32::try_from(n).expect("bounded by the manifest size");
    let mut order: Vec<u32> = (0..positions).collect();
    order.sort_unstable_by_key(|&q| p[q as usize]);
    let mut repeats = vec![0u64; n.div_ceil(64)];
    let mut distinct = 0;
    let mut any = false;
    for group in order.chunk_by(|&a, &b| p[a as usize] == p[b as usize]) {
        if group.len() == 1 {
            distinct += 1;
        } else {
            any = true;
            for &q in group {
                repeats[q as usize / 64] |= 1 << (q % 64);
            }
        }
    }
    drop(order);
    drop(p);
    let mut referenced = vec![0u64; n.div_ceil(64)];
    let references = &streamed.manifest().payloads[0].references;
    for &pos in references.iter().flat_map(|r| &r.chunks) {
        // One out of range is the references' check's to refuse.
        if pos < positions {
            referenced[pos as usize / 64] |= 1 << (pos % 64);
        }
    }
    let mut kept = Kept {
        repeats,
        referenced,
        positions,
        at: 0,
        first: HashMap::new(),
        named: HashMap::new(),
    };
    if any || !references.is_empty() {
        kept = signed.stream(kept).map_err(manifest_error)?.1;
    }
    distinct += kept.first.len();
    let manifest = streamed.finish(&kept).map_err(manifest_error)?;
    // The ids by position are drained into the map by id, the drained map
    // shrunk as it empties: not both alive whole (nor with the rest of what the
    // decode kept).
    let Kept {
        mut named,
        first,
        repeats,
        referenced,
        ..
    } = kept;
    drop((first, repeats, referenced));
    let mut by_id = HashMap::new();
    references_by_id(&mut by_id, &manifest.payloads[0].references, |pos| {
        let id = named.remove(&pos);
        if named.len() < named.capacity() / 4 {
            named.shrink_to_fit();
        }
        id
    });
    drop(named);
    Ok(Some(Unlisted {
        manifest,
        distinct,
        references: by_id,
    }))
}

/// The first member of an artifact, as [`read_envelope_head`] found it.
#[derive(Debug)]
pub enum EnvelopeHead {
    /// The envelope member, of `len` bytes, its data not read yet: copy it out
    /// with [`copy_envelope_member`] (nothing in it is decoded or trusted there).
    Member {
        /// Size of the member's data.
        len: u64,
    },
    /// A manifest delta (`member_len` bytes, read), rebuilt against the held
    /// manifest `base` into the envelope it stands for (bounded by the envelope
    /// limit, its signatures counted, not verified).
    Rebuilt {
        /// The envelope the delta stands for.
        envelope: Envelope,
        /// Size of the delta member's data.
        member_len: u64,
        /// BLAKE3 of the held manifest it was rebuilt against.
        base: [u8; 32],
    },
}

/// Why [`copy_envelope_member`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The artifact could not be read, or ends inside the member.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The writer failed.
    #[error("{0}")]
    Write(io::Error),
}

/// Reads the first member of an artifact for a caller that keeps the envelope
/// out of memory (the installer: [`copy_envelope_member`] to a file, verified
/// there, then [`ArtifactReader::open_stored`]): the envelope member's header
/// (the same checks and errors as [`ArtifactReader::open`]'s), or a manifest
/// delta read and rebuilt against one of `held`, as [`ArtifactReader::open_held`]
/// rebuilds it.
pub fn read_envelope_head<R: Read>(
    src: &mut R,
    held: &dyn HeldManifests,
) -> Result<EnvelopeHead, ReadError> {
    let (member, is_delta) = read_envelope_header(src)?;
    if !is_delta {
        return Ok(EnvelopeHead::Member { len: member.size });
    }
    let (envelope, len, base) = read_envelope_data(src, member, true, held)?;
    Ok(EnvelopeHead::Rebuilt {
        envelope,
        member_len: len,
        base: base.expect("a delta names its base"),
    })
}

/// Copies the envelope member's `len` bytes ([`EnvelopeHead::Member`]) from
/// `src` to `out` as they are read (64 KiB at a time: never whole in memory),
/// then reads its tar padding. Nothing in them is decoded: check what was copied
/// with [`check_copied_envelope`], then verify it.
pub fn copy_envelope_member<R: Read>(
    src: &mut R,
    len: u64,
    out: &mut dyn io::Write,
) -> Result<(), CopyError> {
    let truncated = || ReadError::Truncated {
        what: "the envelope".into(),
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    let mut got = 0;
    while left > 0 {
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        if !ustar::read_full(src, &mut buf[..n], &mut got).map_err(ReadError::Io)? {
            return Err(truncated().into());
        }
        out.write_all(&buf[..n]).map_err(CopyError::Write)?;
        left -= n as u64;
    }
    let mut pad = [0u8; BLOCK];
    let pad = &mut pad[..ustar::padding(len)];
    if !ustar::read_full(src, pad, &mut got).map_err(ReadError::Io)? {
        return Err(truncated().into());
    }
    Ok(())
}

/// The checks [`ArtifactReader::open`] makes of an envelope member before its
/// signatures, made of the `len` bytes [`copy_envelope_member`] copied to
/// `file`, with the same errors: signed at all ([`ReadError::Unsigned`]), and
/// laid out as an envelope ([`ReadError::Envelope`], the decoder's error: only
/// an envelope not laid out canonically is read into memory for it, bounded by
/// the envelope limit). Its signatures are not verified here.
pub fn check_copied_envelope<F: Read + io::Seek>(file: &mut F, len: u64) -> Result<(), ReadError> {
    file.seek(io::SeekFrom::Start(0))?;
    member_signers(file, 0, len, None)?;
    let layout = shoal_signing::EnvelopeLayout::locate(len, &mut |at, buf| {
        file.seek(io::SeekFrom::Start(at))?;
        file.read_exact(buf)
    })?;
    let signatures = match layout {
        Some(layout) => layout.signatures.len(),
        None => {
            let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
            file.seek(io::SeekFrom::Start(0))?;
            file.read_exact(&mut bytes)?;
            Envelope::from_vec(bytes)?.signatures.len()
        }
    };
    if signatures == 0 {
        return Err(ReadError::Unsigned { size: len });
    }
    Ok(())
}

/// Reads the first member's header: the envelope's, or a manifest delta's
/// (`true`), with the source left at its data.
fn read_envelope_header<R: Read>(src: &mut R) -> Result<(ustar::Member, bool), ReadError> {
    let mut block = [0u8; BLOCK];
    let mut got = 0;
    if !ustar::read_full(src, &mut block, &mut got)? {
        if got == 0 {
            return Err(ReadError::Empty);
        }
        // A short first block is a truncated artifact if what is there starts like
        // the envelope member's header, and not a tar at all otherwise.
        let name = ENVELOPE_MEMBER.as_bytes();
        let n = got.min(name.len());
        if block[..n] == name[..n] && (got <= name.len() || block[name.len()] == 0) {
            return Err(ReadError::Truncated {
                what: "the envelope".into(),
            });
        }
        return Err(match ustar::parse(&block) {
            Ok(_) => ReadError::Truncated {
                what: "the envelope".into(),
            },
            Err(e) => ReadError::NotTar(e),
        });
    }
    let member = match ustar::parse(&block).map_err(ReadError::NotTar)? {
        Block::End => {
            return Err(ReadError::MissingEnvelope {
                path: String::new(),
            });
        }
        Block::Member(m) => m,
    };
    if ustar::is_unsafe_path(&member.path) {
        return Err(ReadError::UnsafePath { path: member.path });
    }
    let is_delta = member.path == MANIFEST_DELTA_MEMBER;
    if (member.path != ENVELOPE_MEMBER && !is_delta) || (member.kind != b'0' && member.kind != 0) {
        return Err(ReadError::MissingEnvelope { path: member.path });
    }
    if member.size > ENVELOPE_SIZE_MAX as u64 {
        return Err(ReadError::EnvelopeTooLarge {
            size: member.size,
            max: ENVELOPE_SIZE_MAX,
        });
    }
    Ok((member, is_delta))
}

/// Reads and decodes the first member: the envelope, or a manifest delta rebuilt
/// against one of `held` into the envelope it stands for (then also the base's
/// hash).
fn read_envelope<R: Read>(
    src: &mut R,
    held: &dyn HeldManifests,
) -> Result<(Envelope, u64, Option<[u8; 32]>), ReadError> {
    let (member, is_delta) = read_envelope_header(src)?;
    read_envelope_data(src, member, is_delta, held)
}

/// The data of the first member whose header [`read_envelope_header`] read.
fn read_envelope_data<R: Read>(
    src: &mut R,
    member: ustar::Member,
    is_delta: bool,
    held: &dyn HeldManifests,
) -> Result<(Envelope, u64, Option<[u8; 32]>), ReadError> {
    let mut got = 0;
    let mut bytes = vec![0u8; member.size as usize];
    let truncated = || ReadError::Truncated {
        what: "the envelope".into(),
    };
    if !ustar::read_full(src, &mut bytes, &mut got)? {
        return Err(truncated());
    }
    let mut pad = [0u8; BLOCK];
    let pad = &mut pad[..ustar::padding(member.size)];
    if !ustar::read_full(src, pad, &mut got)? {
        return Err(truncated());
    }
    if is_delta {
        // Decoded, its signatures counted, and only then rebuilt (bounded by the
        // envelope limit) against the manifest it names: as the daemon opens one
        // from the server.
        let (envelope, base) = ManifestDelta::open(&bytes, held).map_err(|e| match e {
            ManifestDeltaError::Unsigned => ReadError::Unsigned { size: member.size },
            e => e.into(),
        })?;
        return Ok((envelope, member.size, Some(base)));
    }
    // No Shoal tool writes an envelope without a signature; every reader refuses
    // one (from a file before reading it: `check_envelope_signers`; from a pipe
    // here, before it is decoded and copied).
    member_signers(&mut io::Cursor::new(&bytes[..]), 0, member.size, None)?;
    // Decoded in place: the signed bytes keep the member's buffer (an 8 GiB
    // image's 17.6 MB envelope is not copied out of itself).
    let envelope = Envelope::from_vec(bytes)?;
    if envelope.signatures.is_empty() {
        return Err(ReadError::Unsigned { size: member.size });
    }
    Ok((envelope, member.size, None))
}

#[cfg(test)]
mod verified_tests {
    use super::*;

    /// A data member is read in windows of at most [`PACK_CHUNKS_MAX`] chunks
    /// (the reader's memory), and of exactly that many while the member holds
    /// more: invisible in what the readers yield, so looked at here.
    #[test]
    fn data_member_windows_hold_at_most_pack_chunks_max_chunks() {
        let mut o = crate::BuildOptions::rootfs("acme-os", "1.0", vec!["board".into()], 1);
        o.chunking = crate::manifest::Chunking {
            min_size: 64,
            avg_size: 256,
            max_size: 1024,
        };
        o.dictionary = false;
        let mut x = 7u64;
        let image: Vec<u8> = (0..3 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"abcdefgh"[(x >> 60) as usize % 8]
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let key = shoal_signing::SecretKey::from_seed(&[1; 32]);
        let mut bytes = Vec::new();
        crate::build(
            io::Cursor::new(&image),
            &o,
            &[key],
            None,
            dir.path(),
            &mut bytes,
            |_| {},
        )
        .unwrap();
        let mut r = ArtifactReader::open_unverified(&bytes[..]).unwrap();
        let (mut chunks, mut windows) = (0usize, Vec::new());
        while r.next_raw().unwrap().is_some() {
            if let Some(p) = &r.pack
                && p.next == 1
            {
                windows.push(p.chunks.len());
            }
            chunks += 1;
        }
        assert!(chunks > 2 * PACK_CHUNKS_MAX, "{chunks} chunks");
        assert_eq!(windows.iter().sum::<usize>(), chunks, "{windows:?}");
        assert_eq!(windows[..2], [PACK_CHUNKS_MAX; 2], "{windows:?}");
        assert!(windows[2] < PACK_CHUNKS_MAX, "{windows:?}");
    }

    #[test]
    fn check_proves_bytes_that_hash_to_the_id_and_refuses_others() {
        let data = b"chunk bytes".to_vec();
        let id = ChunkId::of(&data);
        let proof = VerifiedChunk::check(id, data.clone()).expect("hashes to its id");
        assert_eq!((proof.chunk().id, proof.len()), (id, data.len() as u32));
        assert_eq!(proof.data(), &data[..]);

        let mut bad = data;
        bad[0] ^= 1;
        let actual = ChunkId::of(&bad);
        assert_eq!(
            VerifiedChunk::check(id, bad),
            Err(ChunkError::HashMismatch { id, actual })
        );
    }

    #[test]
    fn hash_keeping_gives_the_id_and_proves_a_copy_only_when_kept() {
        let data = b"slot bytes".to_vec();
        let id = ChunkId::of(&data);
        let mut asked = None;
        let (got, proof) = VerifiedChunk::hash_keeping(&data, |i| {
            asked = Some(*i);
            false
        });
        assert_eq!((got, proof, asked), (id, None, Some(id)));
        let (got, proof) = VerifiedChunk::hash_keeping(&data, |_| true);
        let proof = proof.expect("kept");
        assert_eq!(got, id);
        assert_eq!(
            proof,
            VerifiedChunk::check(id, data).expect("hashes to its id")
        );
    }

    /// A thin manifest decoded without its chunk list keeps the full ids only of
    /// the positions its references name: its reference map holds exactly those
    /// (not a repeated id's, nor an id that shares another's first 4 bytes), and
    /// its distinct count tells ids apart by all their bytes.
    #[test]
    fn a_manifest_decoded_without_its_list_keeps_only_the_referenced_ids() {
        use crate::manifest::{BaseRelease, Reference};
        // The sample's chunks are a, b, a, c: d, whose first 4 bytes are c's,
        // comes last.
        let mut m = crate::manifest::tests::sample();
        let c = ChunkId::of(b"c");
        let mut d = ChunkId::of(b"d");
        d.0[..4].copy_from_slice(&c.0[..4]);
        let p = &mut m.payloads[0];
        assert_eq!((p.chunks[3].id, p.chunks[3].size), (c, 1));
        // (Only the last chunk may be shorter than the smallest cut.)
        p.chunks[3].size = 4000;
        p.chunks.push(ChunkRef {
            id: d,
            size: 1,
            stored_size: 1,
        });
        p.size += 4000;
        let ids: Vec<ChunkId> = p.chunks.iter().map(|c| c.id).collect();
        let reference = |at: u64, pos: u32| Reference {
            ranges: vec![(at, 1000)],
            hash: [at as u8; 32],
            chunks: vec![pos],
        };
        p.references = vec![reference(5000, 1), reference(9000, 4)];
        m.base = Some(BaseRelease {
            name: "acme-os".into(),
            version: "1.0".into(),
            manifest_hash: [3; 32],
        });
        m.format_version = crate::FORMAT_VERSION_REFERENCES;
        m.validate().unwrap();
        let cbor = m.to_cbor();
        let u = decode_unlisted(Signed::Slice(&cbor))
            .unwrap()
            .expect("one payload");
        assert!(u.manifest.payloads[0].chunks.is_empty());
        assert_eq!(u.manifest.payloads[0].references, m.payloads[0].references);
        assert_eq!(u.distinct, m.distinct_count());
        assert_eq!(u.distinct, 4);
        let mut kept: Vec<(ChunkId, Reference)> = u
            .references
            .iter()
            .map(|(id, r)| (*id, (**r).clone()))
            .collect();
        kept.sort_by_key(|(id, _)| *id == d);
        assert_eq!(
            kept,
            vec![(ids[1], reference(5000, 1)), (d, reference(9000, 4))]
        );
    }
}
