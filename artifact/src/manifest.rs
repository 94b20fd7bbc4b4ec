//! The release manifest: what a `.shoal` artifact (or a chunk store) holds, in
//! canonical CBOR.
//!
//! The manifest is the *signed* part of an artifact: an envelope's signed bytes are
//! exactly [`Manifest::to_cbor`]. Its encoding is RFC 8949 §4.2.1 "core deterministic"
//! CBOR: definite lengths, shortest-form integers, map keys sorted by their encoded
//! bytes (so shorter text keys first). [`Manifest::from_cbor`] accepts only that one
//! encoding: it decodes, validates, re-encodes and compares byte for byte, so one
//! manifest has exactly one byte string and one hash.
//!
//! Decoding untrusted bytes is bounded: the input is at most [`MANIFEST_SIZE_MAX`]
//! bytes, strings, lists and maps have limits (see the `*_MAX` constants), nesting is
//! bounded by the fixed schema (and cbor4ii's depth limit), and every payload's chunk
//! list is checked against its declared size and chunking parameters before anyone
//! sees the manifest.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::Deserializer;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

/// The manifest format of a release without delta-encoded chunks (every manifest
/// before issue 12, and every full artifact since): readers of version 1 read it.
///
/// A reader refuses versions it does not know instead of guessing.
pub const FORMAT_VERSION: u32 = 1;

/// The manifest format of a thin release with chunks encoded against bytes of its
/// base release ([`Payload::references`]). A manifest is version 2 exactly when one of
/// its payloads has references, so a reader of version 1 refuses what it could not
/// install, and reads everything else.
pub const FORMAT_VERSION_REFERENCES: u32 = 2;

/// Most bytes one [`Reference`] covers: the device holds one reference per chunk
/// being decoded, so this bounds its memory (see `artifact/DESIGN.md`).
pub const REFERENCE_LEN_MAX: u32 = 2 * 1024 * 1024;
/// Most byte ranges one [`Reference`] concatenates.
pub const REFERENCE_RANGES_MAX: usize = 4;

/// Largest manifest accepted, in bytes of CBOR (about 800 000 chunks: see
/// `shoal_signing::ENVELOPE_SIZE_MAX`).
pub const MANIFEST_SIZE_MAX: usize = 32 * 1024 * 1024;
/// Most payloads in one manifest.
pub const PAYLOADS_MAX: usize = 64;
/// Longest name, version, device type, provides/depends key or value, in bytes.
pub const STRING_LEN_MAX: usize = 256;
/// Most compatible device types.
pub const DEVICE_TYPES_MAX: usize = 256;
/// Most provides (and, separately, depends) entries.
pub const KEY_VALUES_MAX: usize = 256;
/// Largest `max_size` of the chunking parameters (and so the largest chunk), in bytes.
pub const CHUNK_SIZE_MAX: u32 = 4 * 1024 * 1024;
/// Smallest `min_size` of the chunking parameters, in bytes (FastCDC's own minimum).
pub const CHUNK_SIZE_MIN: u32 = 64;

/// A chunk's id: the BLAKE3 hash of its *uncompressed* bytes.
///
/// `Display`/`FromStr` are lowercase hex (64 characters); serde as a 32-byte string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `bytes` (BLAKE3).
    pub fn of(bytes: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(bytes).as_bytes())
    }

    /// The bytes of the id.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<blake3::Hash> for ChunkId {
    fn from(h: blake3::Hash) -> Self {
        ChunkId(*h.as_bytes())
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

/// Text that is not 64 hex characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a chunk id is 64 hex characters")]
pub struct ParseChunkIdError;

impl FromStr for ChunkId {
    type Err = ParseChunkIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseChunkIdError)?;
        Ok(ChunkId(out))
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::Bytes::new(&self.0).serialize(s)
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b = serde_bytes::ByteArray::<32>::deserialize(d)?;
        Ok(ChunkId(b.into_array()))
    }
}

/// One release: the signed description of an artifact's content.
///
/// Field order is the canonical CBOR key order (shorter keys first, then bytewise);
/// keep it that way when adding fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Set for a *thin* artifact: the release whose chunks this artifact leaves out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRelease>,
    /// Release name, e.g. `"acme-os"`.
    pub name: String,
    /// What this release needs the device to have (Mender's `depends`): for each key,
    /// the acceptable values; the device's provides must hold one of them, for every key.
    #[serde(serialize_with = "ser_canonical_map")]
    pub depends: BTreeMap<String, Vec<String>>,
    /// Release version, free-form text (e.g. `"2.0.0"`).
    pub version: String,
    /// The FastCDC parameters every payload was cut with.
    pub chunking: Chunking,
    /// The payloads, in install order.
    pub payloads: Vec<Payload>,
    /// What the device has once this release is installed (Mender's `provides`).
    #[serde(serialize_with = "ser_canonical_map")]
    pub provides: BTreeMap<String, String>,
    /// BLAKE3 of the zstd dictionary the release's chunks were compressed with
    /// ([`crate::chunk::Dictionary::id`]), when a thin build names it (format
    /// version 2 only): the artifact's `dictionary` member must hash to it, and a
    /// thin artifact that reuses its base's dictionary carries none, so the reader
    /// takes it from whoever kept it (a device: with the base's manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dictionary: Option<ChunkId>,
    /// Device types this release may be installed on (at least one).
    pub device_types: Vec<String>,
    /// The manifest format version, [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Anti-rollback counter: a device refuses a release whose counter is lower than
    /// the highest it has committed.
    pub security_counter: u64,
}

/// The release a thin artifact was built against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseRelease {
    /// The base release's name.
    pub name: String,
    /// The base release's version.
    pub version: String,
    /// BLAKE3 of the base release's manifest CBOR ([`Manifest::hash`]).
    #[serde(with = "serde_bytes")]
    pub manifest_hash: [u8; 32],
}

/// What a payload is, so the installer knows where it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadKind {
    /// A whole root filesystem image, written to the inactive A/B slot.
    #[serde(rename = "rootfs-image")]
    RootfsImage,
    /// A single file (its `name` is the destination path). Reserved: the format
    /// carries it, installers refuse it until a later issue implements it.
    #[serde(rename = "file")]
    File,
}

impl fmt::Display for PayloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PayloadKind::RootfsImage => "rootfs-image",
            PayloadKind::File => "file",
        })
    }
}

/// One payload: a byte string cut into content-defined chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// BLAKE3 of the whole payload.
    #[serde(with = "serde_bytes")]
    pub hash: [u8; 32],
    /// What the payload is.
    pub kind: PayloadKind,
    /// A name unique within the manifest (`"rootfs"` for the root filesystem; the
    /// destination path for a `file`).
    pub name: String,
    /// Size of the payload in bytes; equals the sum of its chunks' sizes.
    pub size: u64,
    /// The chunks, in payload order. A chunk id may repeat (e.g. zero blocks).
    #[serde(deserialize_with = "de_chunk_list")]
    pub chunks: Vec<ChunkRef>,
    /// Only in a thin release ([`FORMAT_VERSION_REFERENCES`]): bytes of the base
    /// release's payload of the same name, each naming the chunks whose stored form is
    /// a zstd frame compressed against them (as a raw prefix). Empty otherwise, and
    /// then not encoded at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<Reference>,
}

/// Bytes of the base release a device already holds, against which chunks were
/// compressed: the concatenation of `ranges` of the base payload, which must hash to
/// `hash`. Encoded as a CBOR array `[ranges, hash, chunks]`, `ranges` as `[offset,
/// len]` pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Byte ranges `(offset, len)` of the base payload, concatenated in this order.
    pub ranges: Vec<(u64, u32)>,
    /// BLAKE3 of the concatenated bytes: a device checks the bytes it read from its
    /// running slot against it before it decodes a chunk with them.
    pub hash: [u8; 32],
    /// Positions in the payload's `chunks` of the chunks encoded against these
    /// bytes, ascending; each the first occurrence of its id in the manifest.
    pub chunks: Vec<u32>,
}

impl Reference {
    /// Total bytes of the ranges.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|&(_, l)| u64::from(l)).sum()
    }

    /// Whether the ranges are empty (never, in a validated manifest).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks bytes read for this reference (the ranges, concatenated): their length
    /// and hash, now.
    pub fn check(&self, bytes: Vec<u8>) -> Result<ReferenceBytes, ReferenceError> {
        let r = self.read(bytes)?;
        r.check()?;
        Ok(r)
    }

    /// Takes bytes read for this reference (the ranges, concatenated), checking
    /// only their length now: the hash is checked once, before the first chunk is
    /// decoded with them ([`ReferenceBytes::check`], which
    /// [`crate::RawChunk::verify_against`] calls), so a reader can hand the hashing
    /// to the threads that decode rather than do it while it reads.
    pub fn read(&self, bytes: Vec<u8>) -> Result<ReferenceBytes, ReferenceError> {
        if bytes.len() as u64 != self.len() {
            return Err(ReferenceError::Length {
                expected: self.len(),
                found: bytes.len() as u64,
            });
        }
        Ok(ReferenceBytes {
            inner: std::sync::Arc::new(ReferenceInner {
                hash: self.hash,
                bytes,
                checked: std::sync::OnceLock::new(),
            }),
        })
    }

    /// The ranges as text, `offset+len` joined by commas (for messages).
    pub fn describe(&self) -> String {
        self.ranges
            .iter()
            .map(|(o, l)| format!("{o}+{l}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Bytes read for a [`Reference`]: their length matched, and their hash is checked
/// at most once, by [`Reference::check`] or [`ReferenceBytes::check`]. Made only by
/// [`Reference::read`] and [`Reference::check`]; cheap to clone (shared).
#[derive(Clone)]
pub struct ReferenceBytes {
    inner: std::sync::Arc<ReferenceInner>,
}

struct ReferenceInner {
    hash: [u8; 32],
    bytes: Vec<u8>,
    /// The outcome of the hash check, once done.
    checked: std::sync::OnceLock<Result<(), ReferenceError>>,
}

impl PartialEq for ReferenceBytes {
    fn eq(&self, other: &Self) -> bool {
        self.inner.hash == other.inner.hash && self.inner.bytes == other.inner.bytes
    }
}

impl Eq for ReferenceBytes {}

impl fmt::Debug for ReferenceBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReferenceBytes")
            .field("hash", &hex::encode(self.inner.hash))
            .field("len", &self.inner.bytes.len())
            .finish()
    }
}

impl ReferenceBytes {
    /// The hash the manifest names for them.
    pub fn hash(&self) -> &[u8; 32] {
        &self.inner.hash
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.inner.bytes
    }

    /// Whether the bytes hash to the manifest's hash (computed once, then
    /// remembered).
    pub fn check(&self) -> Result<(), ReferenceError> {
        self.inner
            .checked
            .get_or_init(|| {
                let actual = *blake3::hash(&self.inner.bytes).as_bytes();
                if actual == self.inner.hash {
                    Ok(())
                } else {
                    Err(ReferenceError::Hash {
                        expected: hex::encode(self.inner.hash),
                        actual: hex::encode(actual),
                    })
                }
            })
            .clone()
    }
}

/// Why bytes read for a [`Reference`] were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Fewer or more bytes than the ranges cover.
    #[error("reference is {expected} bytes, {found} were read")]
    Length {
        /// The ranges' total.
        expected: u64,
        /// Bytes given.
        found: u64,
    },
    /// The bytes are not the base release's (the slot changed, or holds another
    /// release).
    #[error("reference bytes hash to {actual}, the manifest says {expected}")]
    Hash {
        /// The manifest's hash (hex).
        expected: String,
        /// The hash of the bytes read (hex).
        actual: String,
    },
}

impl Serialize for Reference {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (
            &self.ranges,
            serde_bytes::Bytes::new(&self.hash),
            &self.chunks,
        )
            .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Reference {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (ranges, hash, chunks) =
            <(Vec<(u64, u32)>, serde_bytes::ByteArray<32>, Vec<u32>)>::deserialize(d)?;
        Ok(Reference {
            ranges,
            hash: hash.into_array(),
            chunks,
        })
    }
}

/// What is wrong with a [`Reference`] of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReferenceProblem {
    /// No ranges, more than [`REFERENCE_RANGES_MAX`], an empty range, or a range
    /// whose end overflows.
    Ranges,
    /// The ranges cover more than [`REFERENCE_LEN_MAX`] bytes.
    TooLong,
    /// No chunk is encoded against it.
    NoChunks,
    /// A chunk position is past the payload's chunks.
    ChunkOutOfRange,
    /// Chunk positions are not strictly ascending.
    NotAscending,
    /// A chunk's id occurs earlier in the manifest: only a first occurrence carries
    /// the encoding, so every occurrence of an id has one stored form.
    NotFirstOccurrence,
    /// Another reference names the same chunk.
    Twice,
}

impl fmt::Display for ReferenceProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReferenceProblem::Ranges => "its byte ranges are empty, too many or overflow",
            ReferenceProblem::TooLong => "it covers more bytes than the limit",
            ReferenceProblem::NoChunks => "no chunk is encoded against it",
            ReferenceProblem::ChunkOutOfRange => "it names a chunk past the payload's end",
            ReferenceProblem::NotAscending => "its chunk positions are not strictly ascending",
            ReferenceProblem::NotFirstOccurrence => {
                "it names a chunk that is not the first occurrence of its id"
            }
            ReferenceProblem::Twice => "it names a chunk another reference names too",
        })
    }
}

/// FastCDC (2020 variant, normalization level 1, seed 0) parameters, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunking {
    /// Target average chunk size.
    pub avg_size: u32,
    /// Largest chunk.
    pub max_size: u32,
    /// Smallest chunk (except the last chunk of a payload).
    pub min_size: u32,
}

impl Chunking {
    /// Checks the parameters are within FastCDC's and this format's bounds.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let Chunking {
            min_size,
            avg_size,
            max_size,
        } = *self;
        let ok = (CHUNK_SIZE_MIN..=1024 * 1024).contains(&min_size)
            && (256..=CHUNK_SIZE_MAX).contains(&avg_size)
            && (1024..=CHUNK_SIZE_MAX).contains(&max_size)
            && min_size <= avg_size
            && avg_size <= max_size
            && min_size % 2 == 0
            && avg_size % 2 == 0
            && max_size % 2 == 0;
        if ok {
            Ok(())
        } else {
            Err(ManifestError::BadChunking(*self))
        }
    }
}

/// One chunk of a payload.
///
/// Encoded as a 3-element CBOR array `[id, size, stored_size]` to keep manifests of
/// big images small. The room for chunks encoded against data the device already
/// holds is here: a later format version appends an element naming the reference
/// (see DESIGN.md); this version refuses any other array length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// BLAKE3 of the uncompressed chunk.
    pub id: ChunkId,
    /// Uncompressed size in bytes.
    pub size: u32,
    /// Size of the chunk's stored form (zstd frame, or raw) in the artifact it was
    /// built into, in bytes: what a device downloads for it from that artifact.
    pub stored_size: u32,
}

impl Serialize for ChunkRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (
            serde_bytes::Bytes::new(&self.id.0),
            self.size,
            self.stored_size,
        )
            .serialize(s)
    }
}

impl<'de> Deserialize<'de> for ChunkRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (id, size, stored_size) = <(serde_bytes::ByteArray<32>, u32, u32)>::deserialize(d)?;
        Ok(ChunkRef {
            id: ChunkId(id.into_array()),
            size,
            stored_size,
        })
    }
}

/// The fewest bytes a [`ChunkRef`] encodes in: an array header, a 32-byte string
/// with its 2-byte header, two one-byte integers.
pub(crate) const CHUNK_REF_ENCODED_MIN: usize = 1 + 2 + 32 + 1 + 1;

/// Decodes a chunk list into a vector of its length, allocated once: grown by
/// doubling, the list of a large image would reserve up to twice its 40 bytes a
/// chunk while it is decoded (and keep 1.3 × on average). The length a
/// manifest declares is trusted only up to what [`MANIFEST_SIZE_MAX`] bytes can
/// hold.
fn de_chunk_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ChunkRef>, D::Error> {
    if let Some(stream) = crate::manifest_stream::take_stream() {
        return crate::manifest_stream::stream_list(d, stream).map(|()| Vec::new());
    }
    struct List;
    impl<'de> serde::de::Visitor<'de> for List {
        type Value = Vec<ChunkRef>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a chunk list")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<ChunkRef>, A::Error> {
            let cap = seq
                .size_hint()
                .unwrap_or(0)
                .min(MANIFEST_SIZE_MAX / CHUNK_REF_ENCODED_MIN);
            let mut list = Vec::with_capacity(cap);
            while let Some(c) = seq.next_element()? {
                list.push(c);
            }
            Ok(list)
        }
    }
    d.deserialize_seq(List)
}

/// Serializes a string map with keys in canonical CBOR order (length, then bytes).
fn ser_canonical_map<S: Serializer, V: Serialize>(
    map: &BTreeMap<String, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let mut entries: Vec<(&String, &V)> = map.iter().collect();
    entries.sort_by(|a, b| (a.0.len(), a.0.as_bytes()).cmp(&(b.0.len(), b.0.as_bytes())));
    let mut m = s.serialize_map(Some(entries.len()))?;
    for (k, v) in entries {
        m.serialize_entry(k, v)?;
    }
    m.end()
}

/// Why manifest bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The manifest is larger than [`MANIFEST_SIZE_MAX`].
    #[error("manifest is {size} bytes, more than the limit of {max}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a CBOR manifest of this schema.
    #[error("manifest is not valid CBOR for this schema: {0}")]
    Decode(String),
    /// The manifest's format version is not one this build reads.
    #[error(
        "manifest format version {found} is not supported (this build reads {FORMAT_VERSION} and {FORMAT_VERSION_REFERENCES})"
    )]
    UnsupportedVersion {
        /// The version found.
        found: u64,
    },
    /// The format version does not match the content: version 2 exactly when a
    /// payload has references or the manifest names its dictionary.
    #[error(
        "manifest format version {found} does not match its content (version {expected} for a manifest {} references or a named dictionary)",
        if *expected == FORMAT_VERSION_REFERENCES { "with" } else { "without" }
    )]
    VersionMismatch {
        /// The version found.
        found: u32,
        /// The version the content needs.
        expected: u32,
    },
    /// A payload has references but the manifest names no base release.
    #[error("payload {payload:?} has chunks encoded against a base release, but names no base")]
    ReferenceWithoutBase {
        /// The payload's name.
        payload: String,
    },
    /// A reference is malformed.
    #[error("payload {payload:?}: reference {reference} is invalid: {problem}")]
    BadReference {
        /// The payload's name.
        payload: String,
        /// Index of the reference in the payload.
        reference: usize,
        /// What is wrong.
        problem: ReferenceProblem,
    },
    /// The CBOR is valid but not in canonical form (so its hash would be ambiguous).
    #[error("manifest CBOR is not in canonical form")]
    NotCanonical,
    /// A string, list or map is longer than its limit, or a required list is empty.
    #[error("manifest field {field} has {len} entries or bytes (allowed {min}..={max})")]
    FieldLength {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The least allowed.
        min: usize,
        /// The most allowed.
        max: usize,
    },
    /// A payload of 0 bytes (no chunks): an install would write nothing and report
    /// success.
    #[error("payload {payload:?} is empty (0 bytes, no chunks): there is nothing to install")]
    EmptyPayload {
        /// The payload's name.
        payload: String,
    },
    /// A text field holds a control character (terminal escapes, newlines): names,
    /// versions, device types, provides and depends are printed to people.
    #[error("manifest field {field} holds a control character: {value:?}")]
    ControlCharacter {
        /// The field.
        field: &'static str,
        /// The value (printed escaped).
        value: String,
    },
    /// Two payloads share a name.
    #[error("two payloads are named {0:?}")]
    DuplicatePayload(String),
    /// The chunking parameters are out of bounds.
    #[error("chunking parameters {0:?} are out of bounds")]
    BadChunking(Chunking),
    /// A payload's chunk sizes do not add up to its size.
    #[error("payload {payload:?}: chunk sizes add up to {sum}, but its size is {size}")]
    SizeMismatch {
        /// The payload's name.
        payload: String,
        /// Sum of chunk sizes.
        sum: u64,
        /// Declared payload size.
        size: u64,
    },
    /// A chunk is empty, larger than `max_size`, or smaller than `min_size` without
    /// being the payload's last chunk.
    #[error("payload {payload:?}: chunk {index} has size {size}, outside the chunking bounds")]
    ChunkSize {
        /// The payload's name.
        payload: String,
        /// Index of the chunk in the payload.
        index: usize,
        /// Its size.
        size: u32,
    },
    /// A chunk's stored size is zero or more than zstd's worst case for its size.
    #[error("payload {payload:?}: chunk {index} has stored size {stored_size} for size {size}")]
    StoredSize {
        /// The payload's name.
        payload: String,
        /// Index of the chunk in the payload.
        index: usize,
        /// Its uncompressed size.
        size: u32,
        /// Its stored size.
        stored_size: u32,
    },
}

/// Largest stored form a chunk of `size` bytes may have: zstd's worst case.
pub fn stored_size_max(size: u32) -> u32 {
    let bound = zstd::zstd_safe::compress_bound(size as usize);
    u32::try_from(bound).unwrap_or(u32::MAX)
}

/// Refuses control characters in a text field (see [`ManifestError::ControlCharacter`]).
pub fn check_text(field: &'static str, value: &str) -> Result<(), ManifestError> {
    if value.chars().any(char::is_control) {
        return Err(ManifestError::ControlCharacter {
            field,
            value: value.to_string(),
        });
    }
    Ok(())
}

fn check_len(field: &'static str, len: usize, min: usize, max: usize) -> Result<(), ManifestError> {
    if len < min || len > max {
        return Err(ManifestError::FieldLength {
            field,
            len,
            min,
            max,
        });
    }
    Ok(())
}

/// Only the version, decoded first so that a newer manifest gets a clear error.
#[derive(Deserialize)]
pub(crate) struct VersionProbe {
    pub(crate) format_version: u64,
}

/// Refuses a format version this build does not read.
pub(crate) fn check_version(found: u64) -> Result<(), ManifestError> {
    if found != u64::from(FORMAT_VERSION) && found != u64::from(FORMAT_VERSION_REFERENCES) {
        return Err(ManifestError::UnsupportedVersion { found });
    }
    Ok(())
}

impl Manifest {
    /// The canonical CBOR encoding: the bytes that are signed.
    pub fn to_cbor(&self) -> Vec<u8> {
        cbor4ii::serde::to_vec(Vec::new(), self).expect("encoding to a Vec cannot fail")
    }

    /// BLAKE3 of [`Manifest::to_cbor`]: names this exact release.
    pub fn hash(&self) -> [u8; 32] {
        *blake3::hash(&self.to_cbor()).as_bytes()
    }

    /// Decodes and validates untrusted manifest bytes (bounded; canonical form only).
    pub fn from_cbor(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        Manifest::check_size_and_version(bytes)?;
        let manifest: Manifest = cbor4ii::serde::from_slice(bytes)
            .map_err(|e| ManifestError::Decode(shoal_signing::describe_cbor_error(&e)))?;
        manifest.validate()?;
        // Compared as it is encoded: a copy would be 82 bytes a chunk.
        if !shoal_signing::encodes_to(&manifest, bytes) {
            return Err(ManifestError::NotCanonical);
        }
        Ok(manifest)
    }

    /// The size limit, then the format version alone (so a newer manifest gets
    /// a clear error).
    pub(crate) fn check_size_and_version(bytes: &[u8]) -> Result<(), ManifestError> {
        if bytes.len() > MANIFEST_SIZE_MAX {
            return Err(ManifestError::TooLarge {
                size: bytes.len(),
                max: MANIFEST_SIZE_MAX,
            });
        }
        let probe: VersionProbe = cbor4ii::serde::from_slice(bytes)
            .map_err(|e| ManifestError::Decode(shoal_signing::describe_cbor_error(&e)))?;
        check_version(probe.format_version)
    }

    /// Checks every invariant a reader relies on. [`Manifest::from_cbor`] calls it;
    /// writers call it before signing.
    pub fn validate(&self) -> Result<(), ManifestError> {
        self.validate_fields(None)?;
        self.validate_references(None)
    }

    /// Every check of [`Manifest::validate`] but the references', the first
    /// payload's chunk list taken from `streamed` when it was streamed out.
    pub(crate) fn validate_fields(
        &self,
        streamed: Option<&crate::manifest_stream::StreamedSizes>,
    ) -> Result<(), ManifestError> {
        if self.format_version != FORMAT_VERSION && self.format_version != FORMAT_VERSION_REFERENCES
        {
            return Err(ManifestError::UnsupportedVersion {
                found: self.format_version.into(),
            });
        }
        let expected = self.required_version();
        if self.format_version != expected {
            return Err(ManifestError::VersionMismatch {
                found: self.format_version,
                expected,
            });
        }
        check_len("name", self.name.len(), 1, STRING_LEN_MAX)?;
        check_text("name", &self.name)?;
        check_len("version", self.version.len(), 1, STRING_LEN_MAX)?;
        check_text("version", &self.version)?;
        check_len("device_types", self.device_types.len(), 1, DEVICE_TYPES_MAX)?;
        for t in &self.device_types {
            check_len("device_types[]", t.len(), 1, STRING_LEN_MAX)?;
            check_text("device_types[]", t)?;
        }
        check_len("provides", self.provides.len(), 0, KEY_VALUES_MAX)?;
        for (k, v) in &self.provides {
            check_len("provides", k.len(), 1, STRING_LEN_MAX)?;
            check_text("provides", k)?;
            check_len("provides[]", v.len(), 0, STRING_LEN_MAX)?;
            check_text("provides[]", v)?;
        }
        check_len("depends", self.depends.len(), 0, KEY_VALUES_MAX)?;
        for (k, values) in &self.depends {
            check_len("depends", k.len(), 1, STRING_LEN_MAX)?;
            check_text("depends", k)?;
            check_len("depends[]", values.len(), 1, KEY_VALUES_MAX)?;
            for v in values {
                check_len("depends[][]", v.len(), 0, STRING_LEN_MAX)?;
                check_text("depends[][]", v)?;
            }
        }
        if let Some(base) = &self.base {
            check_len("base.name", base.name.len(), 1, STRING_LEN_MAX)?;
            check_text("base.name", &base.name)?;
            check_len("base.version", base.version.len(), 1, STRING_LEN_MAX)?;
            check_text("base.version", &base.version)?;
        }
        self.chunking.validate()?;
        check_len("payloads", self.payloads.len(), 1, PAYLOADS_MAX)?;
        let mut names = std::collections::BTreeSet::new();
        for (pi, p) in self.payloads.iter().enumerate() {
            check_len("payloads[].name", p.name.len(), 1, STRING_LEN_MAX)?;
            check_text("payloads[].name", &p.name)?;
            if !names.insert(p.name.as_str()) {
                return Err(ManifestError::DuplicatePayload(p.name.clone()));
            }
            match streamed {
                Some(s) if pi == 0 => check_chunk_sizes(
                    &p.name,
                    p.size,
                    &self.chunking,
                    s.sizes.len(),
                    s.sizes.iter().copied().zip(s.stored_sizes.iter().copied()),
                )?,
                _ => p.validate(&self.chunking)?,
            }
        }
        Ok(())
    }

    /// The format version this content needs: [`FORMAT_VERSION_REFERENCES`] when a
    /// payload has references or the manifest names its dictionary, else
    /// [`FORMAT_VERSION`]. Writers set it.
    pub fn required_version(&self) -> u32 {
        if self.dictionary.is_some() || self.payloads.iter().any(|p| !p.references.is_empty()) {
            FORMAT_VERSION_REFERENCES
        } else {
            FORMAT_VERSION
        }
    }

    /// The references' checks of [`Manifest::validate`]; the first payload's
    /// chunk ids from `streamed` when its list was streamed out (its positions'
    /// first occurrences are the streamed list's own: it is the first payload).
    pub(crate) fn validate_references(
        &self,
        streamed: Option<&dyn crate::manifest_stream::StreamedIds>,
    ) -> Result<(), ManifestError> {
        if self.payloads.iter().all(|p| p.references.is_empty()) {
            return Ok(());
        }
        // Where each id first occurs: (payload, position). With the first list
        // streamed, needed only for the other payloads' references (a manifest
        // a device refuses anyway: it installs one payload).
        let mut first: std::collections::HashMap<ChunkId, (usize, u32)> =
            std::collections::HashMap::new();
        let need_map = streamed.is_none()
            || self
                .payloads
                .iter()
                .skip(1)
                .any(|p| !p.references.is_empty());
        for (pi, p) in self.payloads.iter().enumerate().filter(|_| need_map) {
            match streamed {
                Some(s) if pi == 0 => {
                    for i in 0..s.positions() {
                        first.entry(s.id(i)).or_insert((0, i));
                    }
                }
                _ => {
                    for (i, c) in p.chunks.iter().enumerate() {
                        // Bounded by the manifest size: positions fit a u32.
                        first.entry(c.id).or_insert((pi, i as u32));
                    }
                }
            }
        }
        for (pi, p) in self.payloads.iter().enumerate() {
            if p.references.is_empty() {
                continue;
            }
            if self.base.is_none() {
                return Err(ManifestError::ReferenceWithoutBase {
                    payload: p.name.clone(),
                });
            }
            let mut claimed = std::collections::HashSet::new();
            for (ri, r) in p.references.iter().enumerate() {
                let bad = |problem| ManifestError::BadReference {
                    payload: p.name.clone(),
                    reference: ri,
                    problem,
                };
                if r.ranges.is_empty()
                    || r.ranges.len() > REFERENCE_RANGES_MAX
                    || r.ranges
                        .iter()
                        .any(|&(o, l)| l == 0 || o.checked_add(u64::from(l)).is_none())
                {
                    return Err(bad(ReferenceProblem::Ranges));
                }
                if r.len() > u64::from(REFERENCE_LEN_MAX) {
                    return Err(bad(ReferenceProblem::TooLong));
                }
                if r.chunks.is_empty() {
                    return Err(bad(ReferenceProblem::NoChunks));
                }
                let mut last = None;
                for &pos in &r.chunks {
                    let is_first = match streamed {
                        Some(s) if pi == 0 => {
                            if pos >= s.positions() {
                                return Err(bad(ReferenceProblem::ChunkOutOfRange));
                            }
                            s.is_first(pos)
                        }
                        _ => {
                            let Some(c) = p.chunks.get(pos as usize) else {
                                return Err(bad(ReferenceProblem::ChunkOutOfRange));
                            };
                            first.get(&c.id) == Some(&(pi, pos))
                        }
                    };
                    if last.is_some_and(|l| pos <= l) {
                        return Err(bad(ReferenceProblem::NotAscending));
                    }
                    last = Some(pos);
                    if !is_first {
                        return Err(bad(ReferenceProblem::NotFirstOccurrence));
                    }
                    if !claimed.insert(pos) {
                        return Err(bad(ReferenceProblem::Twice));
                    }
                }
            }
        }
        Ok(())
    }

    /// The reference each delta-encoded chunk (by id) is encoded against.
    pub fn references_by_chunk(&self) -> std::collections::HashMap<ChunkId, &Reference> {
        let mut out = std::collections::HashMap::new();
        for p in &self.payloads {
            for r in &p.references {
                for &pos in &r.chunks {
                    if let Some(c) = p.chunks.get(pos as usize) {
                        out.insert(c.id, r);
                    }
                }
            }
        }
        out
    }

    /// The payload named `name`.
    pub fn payload(&self, name: &str) -> Option<&Payload> {
        self.payloads.iter().find(|p| p.name == name)
    }

    /// Every chunk of every payload, in artifact order, each distinct id once (the
    /// first occurrence).
    pub fn distinct_chunks(&self) -> Vec<ChunkRef> {
        let firsts = self.first_occurrences();
        let all = self.payloads.iter().flat_map(|p| p.chunks.iter());
        let mut out = Vec::with_capacity(firsts.iter().map(|w| w.count_ones() as usize).sum());
        out.extend(
            all.enumerate()
                .filter(|&(i, _)| firsts[i / 64] >> (i % 64) & 1 == 1)
                .map(|(_, c)| *c),
        );
        out
    }

    /// How many distinct chunks [`Manifest::distinct_chunks`] lists.
    pub fn distinct_count(&self) -> usize {
        self.first_occurrences()
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum()
    }

    /// A bit per chunk of every payload (in artifact order): set at the first
    /// occurrence of each id. Found by sorting positions by id (4 bytes a chunk
    /// while it runs), not with a set of ids (40 bytes a chunk and more: 34 MiB for
    /// an 8 GiB image).
    fn first_occurrences(&self) -> Vec<u64> {
        let n: usize = self.payloads.iter().map(|p| p.chunks.len()).sum();
        assert!(u32::try_from(n).is_ok(), "chunk count fits 32 bits");
        let at = |mut i: usize| -> &ChunkId {
            for p in &self.payloads {
                if i < p.chunks.len() {
                    return &p.chunks[i].id;
                }
                i -= p.chunks.len();
            }
            unreachable!("position within the chunk count")
        };
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_unstable_by(|&a, &b| at(a as usize).cmp(at(b as usize)).then(a.cmp(&b)));
        let mut firsts = vec![0u64; n.div_ceil(64)];
        for run in order.chunk_by(|&a, &b| at(a as usize) == at(b as usize)) {
            let i = run[0] as usize;
            firsts[i / 64] |= 1 << (i % 64);
        }
        firsts
    }
}

/// [`Payload::validate`] over a chunk list's `(size, stored size)` pairs (`n` of
/// them), so a list streamed out of the decoder is checked the same way.
fn check_chunk_sizes(
    payload: &str,
    declared: u64,
    chunking: &Chunking,
    n: usize,
    sizes: impl Iterator<Item = (u32, u32)>,
) -> Result<(), ManifestError> {
    if n == 0 || declared == 0 {
        return Err(ManifestError::EmptyPayload {
            payload: payload.to_owned(),
        });
    }
    let mut sum: u64 = 0;
    for (index, (size, stored_size)) in sizes.enumerate() {
        let last = index + 1 == n;
        let too_small = size == 0 || (!last && size < chunking.min_size);
        if too_small || size > chunking.max_size {
            return Err(ManifestError::ChunkSize {
                payload: payload.to_owned(),
                index,
                size,
            });
        }
        if stored_size == 0 || stored_size > stored_size_max(size) {
            return Err(ManifestError::StoredSize {
                payload: payload.to_owned(),
                index,
                size,
                stored_size,
            });
        }
        sum += u64::from(size);
    }
    if sum != declared {
        return Err(ManifestError::SizeMismatch {
            payload: payload.to_owned(),
            sum,
            size: declared,
        });
    }
    Ok(())
}

impl Payload {
    /// Checks chunk sizes against the chunking bounds and the payload size.
    pub fn validate(&self, chunking: &Chunking) -> Result<(), ManifestError> {
        check_chunk_sizes(
            &self.name,
            self.size,
            chunking,
            self.chunks.len(),
            self.chunks.iter().map(|c| (c.size, c.stored_size)),
        )
    }

    /// Byte offset of each chunk in the payload, in order.
    pub fn chunk_offsets(&self) -> impl Iterator<Item = (u64, &ChunkRef)> {
        let mut off = 0u64;
        self.chunks.iter().map(move |c| {
            let o = off;
            off += u64::from(c.size);
            (o, c)
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample() -> Manifest {
        let chunks = vec![
            ChunkRef {
                id: ChunkId::of(b"a"),
                size: 4000,
                stored_size: 100,
            },
            ChunkRef {
                id: ChunkId::of(b"b"),
                size: 16384,
                stored_size: 16384,
            },
            ChunkRef {
                id: ChunkId::of(b"a"),
                size: 4000,
                stored_size: 100,
            },
            ChunkRef {
                id: ChunkId::of(b"c"),
                size: 1,
                stored_size: 1,
            },
        ];
        Manifest {
            base: None,
            name: "acme-os".into(),
            depends: BTreeMap::from([(
                "rootfs-image.version".into(),
                vec!["1.0".into(), "1.0.1".into()],
            )]),
            version: "1.1".into(),
            chunking: Chunking {
                min_size: 1024,
                avg_size: 4096,
                max_size: 16384,
            },
            payloads: vec![Payload {
                hash: *blake3::hash(b"payload").as_bytes(),
                kind: PayloadKind::RootfsImage,
                name: "rootfs".into(),
                size: 4000 + 16384 + 4000 + 1,
                chunks,
                references: Vec::new(),
            }],
            provides: BTreeMap::from([
                ("zz".into(), "1".into()),
                ("rootfs-image.version".into(), "1.1".into()),
            ]),
            dictionary: None,
            device_types: vec!["qemu-x86_64".into()],
            format_version: FORMAT_VERSION,
            security_counter: 7,
        }
    }

    /// A decoded chunk list is allocated once, at its length (not grown by doubling
    /// to up to twice its size).
    #[test]
    fn a_chunk_list_is_decoded_into_a_vector_of_its_length() {
        let mut m = sample();
        let a = m.payloads[0].chunks[0];
        m.payloads[0].chunks = vec![a; 3000];
        m.payloads[0].size = 3000 * u64::from(a.size);
        let back = Manifest::from_cbor(&m.to_cbor()).expect("decodes");
        assert_eq!(back.payloads[0].chunks.len(), 3000);
        assert_eq!(back.payloads[0].chunks.capacity(), 3000);
    }

    /// A chunk list declaring 2^32 - 1 entries in a few bytes is refused as
    /// truncated, having reserved no more than a manifest can hold.
    #[test]
    fn a_chunk_list_longer_than_its_bytes_is_refused_without_reserving_it() {
        #[derive(Debug, Deserialize)]
        struct Wrapper {
            #[serde(deserialize_with = "de_chunk_list")]
            #[allow(dead_code)]
            c: Vec<ChunkRef>,
        }
        let mut bytes = vec![0xa1, 0x61, b'c', 0x9b, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        bytes.extend([0x83, 0x58, 0x20]);
        bytes.extend([7u8; 32]);
        bytes.extend([0x01, 0x01]);
        let err = cbor4ii::serde::from_slice::<Wrapper>(&bytes).expect_err("truncated");
        assert_eq!(
            shoal_signing::describe_cbor_error(&err),
            "the input ends inside array"
        );
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = m.to_cbor();
        assert_eq!(Manifest::from_cbor(&bytes).unwrap(), m);
    }

    #[test]
    fn canonical_key_order() {
        // Top-level map: 10 keys minus the absent `base` = 9, and "name" comes first.
        let bytes = sample().to_cbor();
        assert_eq!(bytes[0], 0xa9);
        assert_eq!(&bytes[1..6], b"\x64name");
    }

    #[test]
    fn non_canonical_rejected() {
        // Same content, provides keys in the wrong (BTreeMap, not length-first) order.
        #[derive(Serialize)]
        struct Loose<'a> {
            name: &'a str,
            depends: &'a BTreeMap<String, Vec<String>>,
            version: &'a str,
            chunking: Chunking,
            payloads: &'a Vec<Payload>,
            provides: &'a BTreeMap<String, String>,
            device_types: &'a Vec<String>,
            format_version: u32,
            security_counter: u64,
        }
        let m = sample();
        let loose = Loose {
            name: &m.name,
            depends: &m.depends,
            version: &m.version,
            chunking: m.chunking,
            payloads: &m.payloads,
            provides: &m.provides,
            device_types: &m.device_types,
            format_version: m.format_version,
            security_counter: m.security_counter,
        };
        let bytes = cbor4ii::serde::to_vec(Vec::new(), &loose).unwrap();
        assert_ne!(bytes, m.to_cbor());
        assert_eq!(
            Manifest::from_cbor(&bytes),
            Err(ManifestError::NotCanonical)
        );
    }

    #[test]
    fn unknown_version_rejected() {
        let mut m = sample();
        m.format_version = 3;
        let bytes = cbor4ii::serde::to_vec(Vec::new(), &m).unwrap();
        assert_eq!(
            Manifest::from_cbor(&bytes),
            Err(ManifestError::UnsupportedVersion { found: 3 })
        );
    }

    /// The sample as a thin release whose chunk "b" (position 1) is encoded against
    /// 1000 bytes at offset 5000 of the base payload.
    fn sample_with_reference() -> Manifest {
        let mut m = sample();
        m.base = Some(BaseRelease {
            name: "acme-os".into(),
            version: "1.0".into(),
            manifest_hash: [3; 32],
        });
        m.payloads[0].references = vec![Reference {
            ranges: vec![(5000, 1000)],
            hash: [4; 32],
            chunks: vec![1],
        }];
        m.format_version = FORMAT_VERSION_REFERENCES;
        m
    }

    fn encode_unchecked(m: &Manifest) -> Vec<u8> {
        cbor4ii::serde::to_vec(Vec::new(), m).unwrap()
    }

    #[test]
    fn references_round_trip_as_version_2() {
        let m = sample_with_reference();
        m.validate().unwrap();
        assert_eq!(m.required_version(), FORMAT_VERSION_REFERENCES);
        let bytes = m.to_cbor();
        let back = Manifest::from_cbor(&bytes).unwrap();
        assert_eq!(back, m);
        let by_chunk = back.references_by_chunk();
        assert_eq!(by_chunk.len(), 1);
        assert_eq!(by_chunk[&ChunkId::of(b"b")].ranges, vec![(5000, 1000)]);
        // A manifest without references stays version 1, byte for byte as before:
        // the field is not encoded at all.
        let plain = sample();
        assert_eq!(plain.required_version(), FORMAT_VERSION);
        assert!(!plain.to_cbor().windows(10).any(|w| w == b"references"));
    }

    #[test]
    fn version_must_match_references() {
        let mut m = sample_with_reference();
        m.format_version = FORMAT_VERSION;
        assert_eq!(
            Manifest::from_cbor(&encode_unchecked(&m)),
            Err(ManifestError::VersionMismatch {
                found: 1,
                expected: 2
            })
        );
        let mut m = sample();
        m.format_version = FORMAT_VERSION_REFERENCES;
        assert_eq!(
            Manifest::from_cbor(&encode_unchecked(&m)),
            Err(ManifestError::VersionMismatch {
                found: 2,
                expected: 1
            })
        );
    }

    #[test]
    fn references_need_a_base() {
        let mut m = sample_with_reference();
        m.base = None;
        assert_eq!(
            Manifest::from_cbor(&encode_unchecked(&m)),
            Err(ManifestError::ReferenceWithoutBase {
                payload: "rootfs".into()
            })
        );
    }

    #[test]
    fn named_dictionary_round_trips_as_version_2() {
        let mut m = sample_with_reference();
        m.dictionary = Some(ChunkId::of(b"dictionary"));
        m.validate().unwrap();
        let bytes = m.to_cbor();
        assert!(bytes.windows(10).any(|w| w == b"dictionary"));
        assert_eq!(Manifest::from_cbor(&bytes).unwrap(), m);
        // A dictionary alone makes a manifest version 2 (a version-1 reader would
        // not know where the chunks' dictionary comes from).
        let mut m = sample();
        m.dictionary = Some(ChunkId::of(b"dictionary"));
        assert_eq!(m.required_version(), FORMAT_VERSION_REFERENCES);
        assert_eq!(
            Manifest::from_cbor(&encode_unchecked(&m)),
            Err(ManifestError::VersionMismatch {
                found: 1,
                expected: 2
            })
        );
        m.format_version = FORMAT_VERSION_REFERENCES;
        assert_eq!(Manifest::from_cbor(&m.to_cbor()).unwrap(), m);
        // Not a 32-byte string: a decode error.
        let mut bytes = m.to_cbor();
        let at = bytes.windows(10).position(|w| w == b"dictionary").unwrap() + 10;
        assert_eq!(bytes[at], 0x58); // bytes, one-byte length
        bytes[at + 1] = 31;
        assert!(matches!(
            Manifest::from_cbor(&bytes),
            Err(ManifestError::Decode(_))
        ));
    }

    #[test]
    fn malformed_references_rejected() {
        type Edit = Box<dyn Fn(&mut Reference)>;
        let cases: Vec<(ReferenceProblem, Edit)> = vec![
            (ReferenceProblem::Ranges, Box::new(|r| r.ranges.clear())),
            (ReferenceProblem::Ranges, Box::new(|r| r.ranges[0].1 = 0)),
            (
                ReferenceProblem::Ranges,
                Box::new(|r| r.ranges = vec![(1, 1); REFERENCE_RANGES_MAX + 1]),
            ),
            (
                ReferenceProblem::Ranges,
                Box::new(|r| r.ranges[0] = (u64::MAX - 10, 100)),
            ),
            (
                ReferenceProblem::TooLong,
                Box::new(|r| r.ranges = vec![(0, REFERENCE_LEN_MAX), (0, 1)]),
            ),
            (ReferenceProblem::NoChunks, Box::new(|r| r.chunks.clear())),
            (
                ReferenceProblem::ChunkOutOfRange,
                Box::new(|r| r.chunks = vec![4]),
            ),
            (
                ReferenceProblem::NotAscending,
                Box::new(|r| r.chunks = vec![3, 1]),
            ),
            (
                ReferenceProblem::NotAscending,
                Box::new(|r| r.chunks = vec![1, 1]),
            ),
            // Position 2 repeats chunk "a" of position 0.
            (
                ReferenceProblem::NotFirstOccurrence,
                Box::new(|r| r.chunks = vec![2]),
            ),
        ];
        for (problem, edit) in cases {
            let mut m = sample_with_reference();
            edit(&mut m.payloads[0].references[0]);
            assert_eq!(
                Manifest::from_cbor(&encode_unchecked(&m)),
                Err(ManifestError::BadReference {
                    payload: "rootfs".into(),
                    reference: 0,
                    problem
                }),
                "{problem:?}"
            );
        }
        // Two references naming one chunk.
        let mut m = sample_with_reference();
        let again = m.payloads[0].references[0].clone();
        m.payloads[0].references.push(again);
        assert_eq!(
            Manifest::from_cbor(&encode_unchecked(&m)),
            Err(ManifestError::BadReference {
                payload: "rootfs".into(),
                reference: 1,
                problem: ReferenceProblem::Twice
            })
        );
        // A reference that is not a 3-element array is a decoding error.
        let mut bytes = sample_with_reference().to_cbor();
        let at = bytes.windows(10).position(|w| w == b"references").unwrap();
        // The array of references (1 element), then the reference's array header.
        assert_eq!(bytes[at + 10], 0x81);
        assert_eq!(bytes[at + 11], 0x83);
        bytes[at + 11] = 0x82;
        assert!(matches!(
            Manifest::from_cbor(&bytes),
            Err(ManifestError::Decode(_))
        ));
    }

    #[test]
    fn reference_bytes_are_checked() {
        let data = vec![9u8; 1000];
        let r = Reference {
            ranges: vec![(0, 600), (10_000, 400)],
            hash: *blake3::hash(&data).as_bytes(),
            chunks: vec![0],
        };
        let ok = r.check(data.clone()).unwrap();
        assert_eq!(ok.bytes(), &data[..]);
        assert_eq!(
            r.check(vec![9u8; 999]),
            Err(ReferenceError::Length {
                expected: 1000,
                found: 999
            })
        );
        let mut other = data;
        other[500] = 8;
        assert!(matches!(r.check(other), Err(ReferenceError::Hash { .. })));
    }

    #[test]
    fn size_mismatch_rejected() {
        let mut m = sample();
        m.payloads[0].size += 1;
        let bytes = m.to_cbor();
        assert!(matches!(
            Manifest::from_cbor(&bytes),
            Err(ManifestError::SizeMismatch { .. })
        ));
    }

    /// Regression (issue 9, item 4): a signed manifest with a 0-byte payload (no
    /// chunks) was accepted and its install reported "already written and verified".
    #[test]
    fn empty_payload_rejected() {
        let mut m = sample();
        m.payloads[0].chunks.clear();
        m.payloads[0].size = 0;
        assert_eq!(
            Manifest::from_cbor(&m.to_cbor()),
            Err(ManifestError::EmptyPayload {
                payload: "rootfs".into()
            })
        );
    }

    /// Regression (issue 9, item 5): text fields with terminal escapes were accepted
    /// and printed raw.
    #[test]
    fn control_characters_rejected_in_every_text_field() {
        let esc = "x\u{1b}]0;pwned\u{7}";
        type Edit = Box<dyn Fn(&mut Manifest)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("name", Box::new(|m| m.name = esc.into())),
            ("version", Box::new(|m| m.version = "1\n2".into())),
            (
                "device_types[]",
                Box::new(|m| m.device_types[0] = esc.into()),
            ),
            (
                "provides",
                Box::new(|m| {
                    m.provides.insert(esc.into(), "1".into());
                }),
            ),
            (
                "provides[]",
                Box::new(|m| {
                    m.provides.insert("k".into(), esc.into());
                }),
            ),
            (
                "depends[][]",
                Box::new(|m| {
                    m.depends.insert("k".into(), vec![esc.into()]);
                }),
            ),
            (
                "payloads[].name",
                Box::new(|m| m.payloads[0].name = esc.into()),
            ),
        ];
        for (field, edit) in cases {
            let mut m = sample();
            edit(&mut m);
            match Manifest::from_cbor(&m.to_cbor()) {
                Err(ManifestError::ControlCharacter { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let mut m = sample();
        m.name = esc.into();
        let message = Manifest::from_cbor(&m.to_cbor()).unwrap_err().to_string();
        assert!(!message.contains('\u{1b}'), "{message}");
        assert!(message.contains("\\u{1b}"), "{message}");
    }

    #[test]
    fn chunk_bounds_rejected() {
        let mut m = sample();
        m.payloads[0].chunks[0].size = 10; // below min, not last
        m.payloads[0].size = m.payloads[0].chunks.iter().map(|c| u64::from(c.size)).sum();
        assert!(matches!(
            Manifest::from_cbor(&m.to_cbor()),
            Err(ManifestError::ChunkSize { index: 0, .. })
        ));
        let mut m = sample();
        m.payloads[0].chunks[1].size = 16386; // above max
        m.payloads[0].size = m.payloads[0].chunks.iter().map(|c| u64::from(c.size)).sum();
        assert!(matches!(
            Manifest::from_cbor(&m.to_cbor()),
            Err(ManifestError::ChunkSize { index: 1, .. })
        ));
        let mut m = sample();
        m.payloads[0].chunks[1].stored_size = 1 << 30;
        assert!(matches!(
            Manifest::from_cbor(&m.to_cbor()),
            Err(ManifestError::StoredSize { .. })
        ));
        let mut m = sample();
        m.chunking.max_size = 64 * 1024 * 1024;
        assert!(matches!(
            Manifest::from_cbor(&m.to_cbor()),
            Err(ManifestError::BadChunking(_))
        ));
    }

    /// Regression (issue 9): decoding errors were cbor4ii's Debug text
    /// (`Core(Mismatch { name: "map", found: 90 })`).
    #[test]
    fn decoding_errors_are_words() {
        assert_eq!(
            Manifest::from_cbor(b"\x5a\x00\x00\x00\x01Z"),
            Err(ManifestError::Decode(
                "expected map, found a byte string (initial byte 0x5a)".into()
            ))
        );
    }

    #[test]
    fn garbage_and_limits_rejected() {
        assert!(matches!(
            Manifest::from_cbor(b""),
            Err(ManifestError::Decode(_))
        ));
        assert!(matches!(
            Manifest::from_cbor(b"\xff\x00garbage"),
            Err(ManifestError::Decode(_))
        ));
        let big = vec![0u8; MANIFEST_SIZE_MAX + 1];
        assert!(matches!(
            Manifest::from_cbor(&big),
            Err(ManifestError::TooLarge { .. })
        ));
        let mut m = sample();
        m.device_types.clear();
        assert!(matches!(
            Manifest::from_cbor(&m.to_cbor()),
            Err(ManifestError::FieldLength {
                field: "device_types",
                ..
            })
        ));
        let mut m = sample();
        m.payloads.push(m.payloads[0].clone());
        assert!(matches!(
            Manifest::from_cbor(&m.to_cbor()),
            Err(ManifestError::DuplicatePayload(_))
        ));
    }

    #[test]
    fn every_bit_flip_is_caught_or_changes_the_manifest() {
        let m = sample();
        let bytes = m.to_cbor();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            if let Ok(m2) = Manifest::from_cbor(&b) {
                assert_ne!(m2, m, "bit {i} flipped yet decoded to the same manifest");
            }
        }
    }

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        let chunk =
            (any::<[u8; 32]>(), 1024u32..=16384, 1u32..=16384).prop_map(|(id, size, stored)| {
                ChunkRef {
                    id: ChunkId(id),
                    size,
                    stored_size: stored.min(size),
                }
            });
        (
            "[a-z0-9.-]{1,20}",
            "[0-9.]{1,10}",
            any::<u64>(),
            prop::collection::vec("[a-z0-9_-]{1,12}", 1..4),
            prop::collection::btree_map("[a-z.-]{1,20}", "[a-z0-9.]{0,8}", 0..5),
            prop::collection::btree_map(
                "[a-z.-]{1,20}",
                prop::collection::vec("[a-z0-9.]{0,8}", 1..3),
                0..5,
            ),
            prop::collection::vec(chunk, 1..20),
            any::<[u8; 32]>(),
            prop::option::of(("[a-z]{1,5}", "[0-9]{1,5}", any::<[u8; 32]>())),
        )
            .prop_map(
                |(name, version, counter, types, provides, depends, chunks, h, base)| Manifest {
                    base: base.map(|(name, version, h)| BaseRelease {
                        name,
                        version,
                        manifest_hash: h,
                    }),
                    name,
                    depends,
                    version,
                    chunking: Chunking {
                        min_size: 1024,
                        avg_size: 4096,
                        max_size: 16384,
                    },
                    payloads: vec![Payload {
                        hash: h,
                        kind: PayloadKind::RootfsImage,
                        name: "rootfs".into(),
                        size: chunks.iter().map(|c| u64::from(c.size)).sum(),
                        chunks,
                        references: Vec::new(),
                    }],
                    provides,
                    dictionary: None,
                    device_types: types,
                    format_version: FORMAT_VERSION,
                    security_counter: counter,
                },
            )
    }

    /// A sink keeping the streamed ids (shared, so the test reads them back).
    struct Ids(std::sync::Arc<std::sync::Mutex<Vec<ChunkId>>>);

    impl crate::ChunkIdSink for Ids {
        fn push(&mut self, id: &ChunkId) -> Result<(), String> {
            self.0.lock().unwrap().push(*id);
            Ok(())
        }
    }

    /// The streamed ids, with their first occurrences.
    struct Kept(Vec<ChunkId>);

    impl crate::StreamedIds for Kept {
        fn positions(&self) -> u32 {
            self.0.len() as u32
        }
        fn is_first(&self, pos: u32) -> bool {
            let id = self.0[pos as usize];
            self.0.iter().position(|i| *i == id) == Some(pos as usize)
        }
        fn id(&self, pos: u32) -> ChunkId {
            self.0[pos as usize]
        }
    }

    impl crate::ReadAt for Vec<u8> {
        fn read_at(&self, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let at = at as usize;
            match self.get(at..at + buf.len()) {
                Some(b) => {
                    buf.copy_from_slice(b);
                    Ok(())
                }
                None => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            }
        }
    }

    /// `Manifest::from_cbor_streaming` (or `from_file_streaming` of the bytes
    /// behind 5 others, as in an envelope file), then `finish`, with the streamed
    /// list put back into the manifest (to compare with `from_cbor`).
    fn streamed_as(bytes: &[u8], file: bool) -> Result<Manifest, ManifestError> {
        let ids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let unwrap = |e| match e {
            crate::StreamedError::Manifest(e) => e,
            e => panic!("reading from memory failed: {e}"),
        };
        let padded = [&[1u8, 2, 3, 4, 5][..], bytes].concat();
        let hash = *blake3::hash(bytes).as_bytes();
        let (mut s, _) = if file {
            let n = bytes.len() as u64;
            Manifest::from_file_streaming(&padded, 5, n, &hash, Ids(ids.clone()))
        } else {
            Manifest::from_cbor_streaming(bytes, Ids(ids.clone()))
        }
        .map_err(unwrap)?;
        let sizes = std::mem::take(&mut s.sizes);
        let ids = std::mem::take(&mut *ids.lock().unwrap());
        let mut m = s.finish(&Kept(ids.clone())).map_err(unwrap)?;
        assert!(m.payloads[0].chunks.is_empty(), "the list was streamed out");
        m.payloads[0].chunks = sizes.chunk_refs(&ids);
        Ok(m)
    }

    fn streamed(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        streamed_as(bytes, false)
    }

    /// From a file, the decoder's errors are worded as a reader's: the same
    /// verdict, the same error but for a decoding error's words.
    fn assert_file_agrees(bytes: &[u8], what: &str) {
        let want = Manifest::from_cbor(bytes);
        match (streamed_as(bytes, true), want) {
            (Err(ManifestError::Decode(_)), Err(ManifestError::Decode(_))) => {}
            (got, want) => assert_eq!(got, want, "{what}: from a file"),
        }
    }

    /// Issue 10: the streamed decode accepts what `from_cbor` accepts and refuses
    /// what it refuses, with the same error: valid manifests (with references,
    /// several payloads), every bit flip of one, and targeted faults in the
    /// streamed list (non-shortest integers, a size that does not add up, a
    /// reference to a repeat).
    #[test]
    fn the_streamed_decode_agrees_with_from_cbor() {
        let mut two = sample_with_reference();
        let mut second = two.payloads[0].clone();
        second.name = "second".into();
        second.kind = PayloadKind::File;
        // Its chunk 0 repeats the first payload's chunk 0: not a first occurrence.
        second.references[0].chunks = vec![0];
        two.payloads.push(second);
        let mut refs_repeat = sample_with_reference();
        refs_repeat.payloads[0].references[0].chunks = vec![2];
        let mut out_of_range = sample_with_reference();
        out_of_range.payloads[0].references[0].chunks = vec![4];
        let mut small = sample();
        small.payloads[0].chunks[1].size = 10;
        small.payloads[0].size -= 16384 - 10;
        let mut stored = sample();
        stored.payloads[0].chunks[2].stored_size = 0;
        let mut sum = sample();
        sum.payloads[0].size += 1;
        let mut inputs: Vec<(Vec<u8>, Option<ManifestError>)> = vec![
            (sample().to_cbor(), None),
            (sample_with_reference().to_cbor(), None),
            (
                encode_unchecked(&two),
                Some(ManifestError::BadReference {
                    payload: "second".into(),
                    reference: 0,
                    problem: ReferenceProblem::NotFirstOccurrence,
                }),
            ),
            (
                encode_unchecked(&refs_repeat),
                Some(ManifestError::BadReference {
                    payload: "rootfs".into(),
                    reference: 0,
                    problem: ReferenceProblem::NotFirstOccurrence,
                }),
            ),
            (
                encode_unchecked(&out_of_range),
                Some(ManifestError::BadReference {
                    payload: "rootfs".into(),
                    reference: 0,
                    problem: ReferenceProblem::ChunkOutOfRange,
                }),
            ),
            (
                encode_unchecked(&small),
                Some(ManifestError::ChunkSize {
                    payload: "rootfs".into(),
                    index: 1,
                    size: 10,
                }),
            ),
            (
                encode_unchecked(&stored),
                Some(ManifestError::StoredSize {
                    payload: "rootfs".into(),
                    index: 2,
                    size: 4000,
                    stored_size: 0,
                }),
            ),
            (
                encode_unchecked(&sum),
                Some(ManifestError::SizeMismatch {
                    payload: "rootfs".into(),
                    sum: 24385,
                    size: 24386,
                }),
            ),
        ];
        // A chunk's size as a non-shortest integer (0x19 0x0f 0xa0 is 4000; 0x1a
        // 0x00 0x00 0x0f 0xa0 too): the values decode the same, the bytes are not
        // canonical.
        let good = sample().to_cbor();
        let at = good
            .windows(3)
            .position(|w| w == [0x19, 0x0f, 0xa0])
            .expect("a chunk size of 4000");
        let mut long = good[..at].to_vec();
        long.extend_from_slice(&[0x1a, 0x00, 0x00, 0x0f, 0xa0]);
        long.extend_from_slice(&good[at + 3..]);
        inputs.push((long, Some(ManifestError::NotCanonical)));
        // The list's head in a longer form (4 chunks, as 0x98 0x04).
        let at = good.iter().position(|&b| b == 0x84).expect("the list head");
        let mut head = good[..at].to_vec();
        head.extend_from_slice(&[0x98, 0x04]);
        head.extend_from_slice(&good[at + 1..]);
        inputs.push((head, Some(ManifestError::NotCanonical)));
        for (bytes, want) in &inputs {
            let old = Manifest::from_cbor(bytes);
            assert_eq!(old.as_ref().err(), want.as_ref(), "from_cbor's verdict");
            assert_eq!(streamed(bytes), old, "the streamed decode agrees");
            assert_file_agrees(bytes, "an input");
        }
        for i in 0..good.len() * 8 {
            let mut b = good.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert_eq!(streamed(&b), Manifest::from_cbor(&b), "bit {i} flipped");
            assert_file_agrees(&b, &format!("bit {i} flipped"));
        }
    }

    /// Issue 10: bytes of a file that are not those the signatures were checked
    /// over (the file changed between the two reads) are refused.
    #[test]
    fn a_file_whose_bytes_changed_is_refused() {
        let bytes = sample().to_cbor();
        let ids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = Manifest::from_file_streaming(&bytes, 0, bytes.len() as u64, &[0; 32], Ids(ids));
        assert_eq!(
            r.map(|_| ()).unwrap_err(),
            crate::StreamedError::Read("the signed manifest changed while it was read".into())
        );
    }

    /// A sink that cannot take an id stops the decode with its own error.
    #[test]
    fn a_failing_sink_stops_the_streamed_decode() {
        struct Full;
        impl crate::ChunkIdSink for Full {
            fn push(&mut self, _: &ChunkId) -> Result<(), String> {
                Err("no space left on the device".into())
            }
        }
        let bytes = sample().to_cbor();
        match Manifest::from_cbor_streaming(&bytes, Full) {
            Err(crate::StreamedError::Sink(e)) => assert_eq!(e, "no space left on the device"),
            other => panic!("expected the sink's error, got {:?}", other.map(|_| ())),
        }
    }

    proptest! {
        #[test]
        fn the_streamed_decode_round_trips(m in arb_manifest()) {
            let bytes = m.to_cbor();
            prop_assert_eq!(streamed(&bytes).unwrap(), m.clone());
            prop_assert_eq!(streamed_as(&bytes, true).unwrap(), m);
        }

        #[test]
        fn the_streamed_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = streamed(&bytes);
            let _ = streamed_as(&bytes, true);
        }

        #[test]
        fn decode_encode_round_trip(m in arb_manifest()) {
            let bytes = m.to_cbor();
            prop_assert_eq!(Manifest::from_cbor(&bytes).unwrap(), m);
        }

        #[test]
        fn from_cbor_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::from_cbor(&bytes);
        }
    }
}
