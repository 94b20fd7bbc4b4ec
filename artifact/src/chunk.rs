//! Chunks: content-defined cutting (FastCDC), hashing, and the stored form
//! (zstd frame or raw bytes) with bounded, verifying decoding.
//!
//! The stored form is self-describing: it is a zstd frame exactly when it starts with
//! the zstd magic number. A chunk is stored raw only when compression does not make it
//! smaller *and* its bytes do not start with that magic (such a chunk is stored as a
//! zstd frame even when that is a few bytes larger). So a stored chunk decodes the
//! same way wherever it comes from: an artifact, a chunk store, a peer.

use std::cell::RefCell;
use std::io::{self, Read};
use std::sync::Arc;

use crate::manifest::{CHUNK_SIZE_MAX, ChunkId, ChunkRef, Chunking, stored_size_max};

/// The zstd frame magic number, little-endian, as it starts a frame.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Default chunking, chosen by measurement on Debian root filesystem images (see
/// `artifact/DESIGN.md`).
pub const CHUNKING_DEFAULT: Chunking = Chunking {
    min_size: 4 * 1024,
    avg_size: 16 * 1024,
    max_size: 64 * 1024,
};

/// Chunking of `--fast` builds: bigger chunks, fewer per-chunk costs.
pub const CHUNKING_FAST: Chunking = Chunking {
    min_size: 16 * 1024,
    avg_size: 64 * 1024,
    max_size: 256 * 1024,
};

/// How many of the chunks a sampled check reads ([`sample_positions`]): at least
/// 2, the first and the last of those it samples from (checked when the constant
/// is made).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample(usize);

impl Sample {
    /// A sample of `k` chunks. Panics (at compile time in a constant) below 2.
    pub const fn new(k: usize) -> Sample {
        assert!(
            k >= 2,
            "a sample reads the first and the last chunk: at least 2"
        );
        Sample(k)
    }

    /// How many chunks it reads.
    pub const fn get(self) -> usize {
        self.0
    }
}

/// The positions (of `0..n`) a sample of `k` chunks reads: `k` of them spread
/// evenly, the first and the last included (`i * (n - 1) / (k - 1)`, increasing);
/// every position when `n <= k`.
pub fn sample_positions(n: usize, k: Sample) -> impl Iterator<Item = usize> {
    let k = k.get();
    let picks = if n > k { k } else { n };
    (0..picks).map(move |i| if n > k { i * (n - 1) / (k - 1) } else { i })
}

/// Default zstd level, chosen by measurement (see `artifact/DESIGN.md`).
pub const ZSTD_LEVEL_DEFAULT: i32 = 9;

/// zstd level of `--fast` builds.
pub const ZSTD_LEVEL_FAST: i32 = 5;

/// Highest zstd level of delta-encoded chunks (a build's level caps it). zstd
/// indexes the whole reference (up to 512 KiB) for each chunk, which at level 9
/// cost 3× a plain build's CPU; level 6 takes 15 % less CPU than level 9 for
/// +0.11 % bytes, level 5 +0.30 %, level 3 (zstd's `dfast`) 36 % less than level 6
/// for +0.59 % (bench v1 → v2, see `artifact/DESIGN.md`). Level 3 since session 6:
/// the manifest delta saved 10× what it costs, and the build-time goal (≤ 2× the
/// plain thin build) was missed at level 6.
pub const ZSTD_LEVEL_DELTA_MAX: i32 = 3;

/// One chunk cut from a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the chunk in the payload.
    pub offset: u64,
    /// The uncompressed bytes.
    pub data: Vec<u8>,
}

/// Cuts any reader into content-defined chunks with the given parameters, streaming:
/// it holds at most `max_size` bytes of the input (plus the chunk it yields).
///
/// A device uses this to index the payload in its active slot, so it must cut exactly
/// as the builder did: FastCDC 2020, normalization level 1, seed 0.
pub struct Chunker<R: Read> {
    inner: fastcdc::v2020::StreamCDC<R>,
}

impl<R: Read> std::fmt::Debug for Chunker<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunker").finish_non_exhaustive()
    }
}

impl<R: Read> Chunker<R> {
    /// A chunker over `source`. The parameters must be valid
    /// ([`Chunking::validate`]); they are asserted.
    pub fn new(source: R, chunking: Chunking) -> Self {
        assert!(chunking.validate().is_ok(), "invalid chunking {chunking:?}");
        Chunker {
            inner: fastcdc::v2020::StreamCDC::new(
                source,
                chunking.min_size as usize,
                chunking.avg_size as usize,
                chunking.max_size as usize,
            ),
        }
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = io::Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next().map(|r| {
            r.map(|c| Chunk {
                offset: c.offset,
                data: c.data,
            })
            .map_err(io::Error::from)
        })
    }
}

/// Cuts `source` and returns `(offset, id, length)` of every chunk, without keeping
/// chunk bytes: what a device needs to index its active slot.
pub fn index<R: Read + Send>(
    source: R,
    chunking: Chunking,
) -> io::Result<Vec<(u64, ChunkId, u32)>> {
    use rayon::prelude::*;
    // Batches of about 1 MiB: one is hashed on the other cores while the next is cut.
    const BATCH: usize = 1024 * 1024;
    let mut chunker = Chunker::new(source, chunking);
    let mut cut = move || -> io::Result<Vec<Chunk>> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while bytes < BATCH {
            match chunker.next() {
                Some(chunk) => {
                    let chunk = chunk?;
                    bytes += chunk.data.len();
                    batch.push(chunk);
                }
                None => break,
            }
        }
        Ok(batch)
    };
    let mut out = Vec::new();
    let mut batch = cut()?;
    while !batch.is_empty() {
        let (ids, next) = rayon::join(
            || {
                batch
                    .par_iter()
                    .map(|c| ChunkId::of(&c.data))
                    .collect::<Vec<_>>()
            },
            &mut cut,
        );
        for (chunk, id) in batch.iter().zip(ids) {
            let len = u32::try_from(chunk.data.len()).expect("chunk is at most max_size");
            out.push((chunk.offset, id, len));
        }
        batch = next?;
    }
    Ok(out)
}

/// Largest zstd dictionary accepted, in bytes.
pub const DICTIONARY_SIZE_MAX: usize = 1024 * 1024;

/// Size of the dictionaries the builder trains.
pub const DICTIONARY_SIZE: usize = 112 * 1024;

/// Most sample bytes the builder reads to train a dictionary (bounds its memory and
/// the training time).
pub const DICTIONARY_SAMPLE_BYTES_MAX: usize = 32 * 1024 * 1024;

/// The zstd dictionary magic number, as it starts a dictionary.
const DICTIONARY_MAGIC: [u8; 4] = [0x37, 0xa4, 0x30, 0xec];

/// A zstd dictionary the chunks of a release were compressed with. Small chunks
/// compress much better with one (see `artifact/DESIGN.md`). zstd frames name it by
/// its 32-bit zstd dictionary id, which Shoal derives from its content
/// ([`derived_zstd_id`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Dictionary {
    /// BLAKE3 of the dictionary bytes.
    pub id: ChunkId,
    /// The zstd dictionary id (from its header), as zstd frames name it.
    pub zstd_id: u32,
    bytes: Arc<Vec<u8>>,
}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dictionary")
            .field("id", &self.id)
            .field("zstd_id", &self.zstd_id)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// Bytes that are not a usable zstd dictionary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DictionaryError {
    /// Larger than [`DICTIONARY_SIZE_MAX`].
    #[error("dictionary is {0} bytes, more than the limit of {DICTIONARY_SIZE_MAX}")]
    TooLarge(usize),
    /// No zstd dictionary header, or a zero dictionary id.
    #[error("not a zstd dictionary")]
    NotADictionary,
    /// The dictionary's zstd id is not the one derived from its content.
    #[error("dictionary id {0} is not derived from its content")]
    IdNotDerived(u32),
}

impl Dictionary {
    /// Checks and wraps dictionary bytes (as found in an artifact or a store).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Dictionary, DictionaryError> {
        if bytes.len() > DICTIONARY_SIZE_MAX {
            return Err(DictionaryError::TooLarge(bytes.len()));
        }
        if !bytes.starts_with(&DICTIONARY_MAGIC) {
            return Err(DictionaryError::NotADictionary);
        }
        let zstd_id = zstd::zstd_safe::get_dict_id_from_dict(&bytes)
            .ok_or(DictionaryError::NotADictionary)?
            .get();
        if zstd_id != derived_zstd_id(&bytes) {
            return Err(DictionaryError::IdNotDerived(zstd_id));
        }
        Ok(Dictionary {
            id: ChunkId::of(&bytes),
            zstd_id,
            bytes: Arc::new(bytes),
        })
    }

    /// Trains a dictionary of about `size` bytes on sample chunks (`data` holds them
    /// back to back, `sizes` their lengths); `None` when zstd finds nothing worth a
    /// dictionary (too few or too random samples).
    pub fn train(data: &[u8], sizes: &[usize], size: usize) -> Option<Dictionary> {
        if sizes.len() < 8 {
            return None;
        }
        let mut bytes = zstd::dict::from_continuous(data, sizes, size).ok()?;
        if bytes.len() < 8 || !bytes.starts_with(&DICTIONARY_MAGIC) {
            return None;
        }
        let id = derived_zstd_id(&bytes);
        bytes[4..8].copy_from_slice(&id.to_le_bytes());
        Dictionary::from_bytes(bytes).ok()
    }

    /// The dictionary's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// The zstd dictionary id Shoal gives a dictionary: derived from its content (BLAKE3
/// of the dictionary with the id field zeroed), in zstd's private range
/// `32768..2^31`. So a chunk's frame header names its dictionary's file in a store,
/// and two different dictionaries share an id only by a 31-bit accident.
pub fn derived_zstd_id(dict: &[u8]) -> u32 {
    let mut h = blake3::Hasher::new();
    h.update(&dict[..4.min(dict.len())]);
    h.update(&[0u8; 4]);
    h.update(dict.get(8..).unwrap_or_default());
    let n = u32::from_le_bytes(h.finalize().as_bytes()[..4].try_into().expect("4 bytes"));
    32768 + n % (0x8000_0000 - 32768)
}

/// The zstd dictionary id a stored chunk's frame names, if any.
pub fn frame_dictionary_id(stored: &[u8]) -> Option<u32> {
    if !stored.starts_with(&ZSTD_MAGIC) {
        return None;
    }
    zstd::zstd_safe::get_dict_id_from_frame(stored).map(|n| n.get())
}

type CompressorSlot = Option<(i32, Option<ChunkId>, zstd::bulk::Compressor<'static>)>;
type DecompressorSlot = Option<(Option<ChunkId>, zstd::bulk::Decompressor<'static>)>;

thread_local! {
    static COMPRESSOR: RefCell<CompressorSlot> = const { RefCell::new(None) };
    /// One context for frames without a dictionary and one for the last
    /// dictionary: an artifact's chunks mix both, and a context with a
    /// dictionary loaded again at every switch cost a context and a dictionary
    /// load per switch (830 of them on the bench's delta install).
    static DECOMPRESSOR: RefCell<[DecompressorSlot; 2]> = const { RefCell::new([None, None]) };
    /// The context delta-encoded chunks are decoded with, reused: a context per
    /// chunk cost ~22 µs each on the bench's VM, most of it zstd probing the CPU
    /// (`cpuid`, which traps to the hypervisor), 2 % of the delta install's CPU.
    static REFERENCE_DECOMPRESSOR: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> =
        const { RefCell::new(None) };
}

/// The first bytes of a zstd dictionary (`ZSTD_MAGIC_DICTIONARY`, little-endian).
const ZSTD_DICTIONARY_MAGIC: [u8; 4] = [0x37, 0xa4, 0x30, 0xec];

/// The stored form of `data` at zstd `level` (see the module doc for the rule).
pub fn encode(data: &[u8], level: i32) -> Vec<u8> {
    encode_with(data, level, None)
}

/// The stored form of `data` at zstd `level`, compressed with `dict` if given.
pub fn encode_with(data: &[u8], level: i32, dict: Option<&Dictionary>) -> Vec<u8> {
    let dict_id = dict.map(|d| d.id);
    let compressed = COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot
            .as_ref()
            .is_none_or(|(l, d, _)| *l != level || *d != dict_id)
        {
            let mut c = match dict {
                None => zstd::bulk::Compressor::new(level),
                Some(d) => zstd::bulk::Compressor::with_dictionary(level, d.bytes()),
            }
            .expect("zstd context");
            // A chunk is one frame; its size in the header lets readers check it early.
            c.include_contentsize(true).expect("zstd parameter");
            c.include_checksum(false).expect("zstd parameter");
            // Frames name their dictionary, so a store can pick the right one.
            c.include_dictid(true).expect("zstd parameter");
            *slot = Some((level, dict_id, c));
        }
        let (_, _, c) = slot.as_mut().expect("set above");
        c.compress(data)
            .expect("compressing into a sized buffer cannot fail")
    });
    if compressed.len() < data.len() || data.starts_with(&ZSTD_MAGIC) {
        compressed
    } else {
        data.to_vec()
    }
}

/// A zstd dictionary digested once for one level ([`zstd::dict::EncoderDictionary`]),
/// shared by the threads of a build: an encoder made from it ([`PlainEncoder`]) costs
/// no digestion, where loading the dictionary's bytes into a context digests them
/// again every time the context is made.
pub struct PreparedDictionary {
    dict: zstd::dict::EncoderDictionary<'static>,
}

impl std::fmt::Debug for PreparedDictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedDictionary").finish_non_exhaustive()
    }
}

impl PreparedDictionary {
    /// `dict` digested for zstd `level`.
    pub fn new(dict: &Dictionary, level: i32) -> PreparedDictionary {
        PreparedDictionary {
            dict: zstd::dict::EncoderDictionary::copy(dict.bytes(), level),
        }
    }
}

/// Encodes plain stored forms (the rule of [`encode_with`]: a frame naming its
/// dictionary, or the raw bytes when that is smaller) with one context, at the level
/// of its prepared dictionary, or at `level` without one.
pub struct PlainEncoder<'d> {
    c: zstd::bulk::Compressor<'d>,
}

impl std::fmt::Debug for PlainEncoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainEncoder").finish_non_exhaustive()
    }
}

impl<'d> PlainEncoder<'d> {
    /// An encoder with `dict` (at the level it was prepared for), or without a
    /// dictionary at `level`.
    pub fn new(level: i32, dict: Option<&'d PreparedDictionary>) -> PlainEncoder<'d> {
        let mut c = match dict {
            None => zstd::bulk::Compressor::new(level),
            Some(d) => zstd::bulk::Compressor::with_prepared_dictionary(&d.dict),
        }
        .expect("zstd context");
        c.include_contentsize(true).expect("zstd parameter");
        c.include_checksum(false).expect("zstd parameter");
        c.include_dictid(true).expect("zstd parameter");
        PlainEncoder { c }
    }

    /// The stored form of `data`.
    pub fn encode(&mut self, data: &[u8]) -> Vec<u8> {
        let compressed = self
            .c
            .compress(data)
            .expect("compressing into a sized buffer cannot fail");
        if compressed.len() < data.len() || data.starts_with(&ZSTD_MAGIC) {
            compressed
        } else {
            data.to_vec()
        }
    }
}

/// Why a stored chunk was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The stored form is larger than any honest encoding of the declared size.
    #[error("chunk {id}: stored form is {stored} bytes, more than {max} for its size")]
    StoredTooLarge {
        /// The chunk.
        id: ChunkId,
        /// Stored size found.
        stored: usize,
        /// The most allowed.
        max: u32,
    },
    /// The zstd frame decompresses to more bytes than declared (a zstd bomb, or a
    /// chunk swapped for a bigger one).
    #[error("chunk {id}: decompresses to more than the declared {size} bytes")]
    DecompressedTooLarge {
        /// The chunk.
        id: ChunkId,
        /// The declared size.
        size: u32,
    },
    /// The chunk decodes to a different number of bytes than declared.
    #[error("chunk {id}: decodes to {found} bytes, declared {size}")]
    SizeMismatch {
        /// The chunk.
        id: ChunkId,
        /// The declared size.
        size: u32,
        /// Bytes found.
        found: usize,
    },
    /// The zstd frame is corrupt.
    #[error("chunk {id}: corrupt zstd frame: {reason}")]
    Corrupt {
        /// The chunk.
        id: ChunkId,
        /// zstd's reason.
        reason: String,
    },
    /// The zstd frame was made with a dictionary that was not given.
    #[error("chunk {id}: compressed with zstd dictionary {zstd_id}, which is not at hand")]
    NeedsDictionary {
        /// The chunk.
        id: ChunkId,
        /// The zstd dictionary id the frame names.
        zstd_id: u32,
    },
    /// The chunk is encoded against bytes of the base release (its manifest names a
    /// reference), and they were not given.
    #[error(
        "chunk {id}: encoded against bytes of the base release, which are not at hand (install it on a device running the base, or use a full artifact)"
    )]
    NeedsReference {
        /// The chunk.
        id: ChunkId,
    },
    /// The chunk did not decode to its id against the reference bytes given, and
    /// those bytes fail the reference's hash: they are not the base release's bytes
    /// (the running slot does not hold the base release there).
    #[error("chunk {id}: the reference bytes are not the base release's: {source}")]
    BadReference {
        /// The chunk.
        id: ChunkId,
        /// How the bytes failed their check.
        source: crate::manifest::ReferenceError,
    },
    /// Reference bytes were given that are not the ones the manifest names for this
    /// chunk.
    #[error("chunk {id}: given the wrong reference bytes")]
    WrongReference {
        /// The chunk.
        id: ChunkId,
    },
    /// The decoded bytes do not hash to the chunk id.
    #[error("chunk {id}: content hashes to {actual}, not to its id")]
    HashMismatch {
        /// The expected id.
        id: ChunkId,
        /// The hash of what was decoded.
        actual: ChunkId,
    },
}

/// The stored form of `data` as a zstd frame at `level` compressed against
/// `reference`, a raw prefix (bytes of the base release the device holds). Always a
/// frame: the caller keeps it only when it is smaller than the plain stored form.
/// The frame names no dictionary.
pub fn encode_against(data: &[u8], level: i32, reference: &[u8]) -> Vec<u8> {
    DeltaEncoder::new(level).encode(data, reference)
}

/// Compresses chunks against references (see [`encode_against`]) with one zstd
/// context, reused from frame to frame: a context per chunk costs its tables'
/// allocation every time. The references must outlive the encoder.
pub struct DeltaEncoder<'p> {
    cctx: zstd::zstd_safe::CCtx<'p>,
}

impl std::fmt::Debug for DeltaEncoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaEncoder").finish_non_exhaustive()
    }
}

impl<'p> DeltaEncoder<'p> {
    /// An encoder at zstd `level`.
    pub fn new(level: i32) -> DeltaEncoder<'p> {
        use zstd::zstd_safe::CParameter;
        let mut cctx = zstd::zstd_safe::CCtx::create();
        for p in [
            CParameter::CompressionLevel(level),
            CParameter::ContentSizeFlag(true),
            CParameter::ChecksumFlag(false),
            CParameter::DictIdFlag(false),
        ] {
            cctx.set_parameter(p).expect("zstd parameter");
        }
        DeltaEncoder { cctx }
    }

    /// One chunk's frame against `reference` (used for this frame only).
    pub fn encode(&mut self, data: &[u8], reference: &'p [u8]) -> Vec<u8> {
        self.cctx.ref_prefix(reference).expect("zstd prefix");
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
        self.cctx
            .compress2(&mut out, data)
            .expect("compressing into a sized buffer cannot fail");
        out
    }
}

/// Decodes a delta-encoded chunk: a zstd frame compressed against `reference`
/// (checked bytes of the base release), bounded by the declared size, then checks
/// the hash, like [`decode`]. Memory: the reference (borrowed) and the chunk.
pub fn decode_against(
    stored: &[u8],
    expected: &ChunkRef,
    reference: &[u8],
) -> Result<Vec<u8>, ChunkError> {
    use zstd::zstd_safe::{DCtx, DParameter};
    let id = expected.id;
    let size = expected.size.min(CHUNK_SIZE_MAX);
    let max = stored_size_max(size);
    if stored.len() > max as usize {
        return Err(ChunkError::StoredTooLarge {
            id,
            stored: stored.len(),
            max,
        });
    }
    if !stored.starts_with(&ZSTD_MAGIC) {
        return Err(ChunkError::Corrupt {
            id,
            reason: "a delta-encoded chunk must be a zstd frame".into(),
        });
    }
    if let Some(zstd_id) = frame_dictionary_id(stored) {
        return Err(ChunkError::Corrupt {
            id,
            reason: format!(
                "the frame names zstd dictionary {zstd_id}; a delta-encoded chunk has only its reference"
            ),
        });
    }
    let context = || {
        let mut d = DCtx::create();
        // The window is the reference plus the chunk; refuse frames asking for
        // more than the largest of those (a one-shot decode allocates no window).
        d.set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX_REFERENCE))
            .expect("zstd parameter");
        d
    };
    let mut out = Vec::with_capacity(size as usize);
    // `decompress_using_dict` takes the reference for this frame only, as raw
    // content (no copy), unless it starts like a zstd dictionary: such bytes it
    // would parse as tables, while the encoder used them as a raw prefix. Those
    // get a context of their own with the reference as a prefix.
    let result = if reference.len() >= 8 && reference.starts_with(&ZSTD_DICTIONARY_MAGIC) {
        let mut d = context();
        d.ref_prefix(reference).expect("zstd prefix");
        d.decompress(&mut out, stored)
    } else {
        REFERENCE_DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            slot.get_or_insert_with(context)
                .decompress_using_dict(&mut out, stored, reference)
        })
    };
    if let Err(code) = result {
        let reason = zstd::zstd_safe::get_error_name(code).to_string();
        let too_large = reason.contains("Destination buffer is too small")
            || zstd::zstd_safe::get_frame_content_size(stored)
                .ok()
                .flatten()
                .is_some_and(|n| n > u64::from(size));
        return Err(if too_large {
            ChunkError::DecompressedTooLarge { id, size }
        } else {
            ChunkError::Corrupt { id, reason }
        });
    }
    check_decoded(out, id, size, true)
}

/// zstd window log a delta-encoded frame may ask for: enough for the largest
/// reference plus the largest chunk (2 + 4 MiB < 8 MiB).
const WINDOW_LOG_MAX_REFERENCE: u32 = 23;

fn check_decoded(
    data: Vec<u8>,
    id: ChunkId,
    size: u32,
    exact: bool,
) -> Result<Vec<u8>, ChunkError> {
    if (exact && data.len() != size as usize) || data.is_empty() {
        return Err(ChunkError::SizeMismatch {
            id,
            size,
            found: data.len(),
        });
    }
    let actual = ChunkId::of(&data);
    if actual != id {
        return Err(ChunkError::HashMismatch { id, actual });
    }
    Ok(data)
}

/// Decodes a stored chunk expected to be `expected` (its id and uncompressed size)
/// and checks its hash. Never allocates more than the declared size (bounded by
/// [`CHUNK_SIZE_MAX`]), whatever the stored bytes claim.
pub fn decode(stored: &[u8], expected: &ChunkRef) -> Result<Vec<u8>, ChunkError> {
    decode_bounded(stored, expected.id, expected.size, true, None)
}

/// Like [`decode`], for a chunk that may have been compressed with `dict`.
pub fn decode_with(
    stored: &[u8],
    expected: &ChunkRef,
    dict: Option<&Dictionary>,
) -> Result<Vec<u8>, ChunkError> {
    decode_bounded(stored, expected.id, expected.size, true, dict)
}

/// Decodes a stored chunk whose size is not known, bounded by [`CHUNK_SIZE_MAX`],
/// and checks its hash.
pub fn decode_any_size(
    stored: &[u8],
    id: ChunkId,
    dict: Option<&Dictionary>,
) -> Result<Vec<u8>, ChunkError> {
    decode_bounded(stored, id, CHUNK_SIZE_MAX, false, dict)
}

fn decode_bounded(
    stored: &[u8],
    id: ChunkId,
    size: u32,
    exact: bool,
    dict: Option<&Dictionary>,
) -> Result<Vec<u8>, ChunkError> {
    let size = size.min(CHUNK_SIZE_MAX);
    let max = stored_size_max(size);
    if stored.len() > max as usize {
        return Err(ChunkError::StoredTooLarge {
            id,
            stored: stored.len(),
            max,
        });
    }
    let data = if stored.starts_with(&ZSTD_MAGIC) {
        // A frame made with a dictionary needs exactly that dictionary.
        let dict = match frame_dictionary_id(stored) {
            None => None,
            Some(zstd_id) => match dict {
                Some(d) if d.zstd_id == zstd_id => Some(d),
                _ => return Err(ChunkError::NeedsDictionary { id, zstd_id }),
            },
        };
        let dict_id = dict.map(|d| d.id);
        let mut out = Vec::with_capacity(size as usize);
        let result = DECOMPRESSOR.with(|cell| {
            let mut slots = cell.borrow_mut();
            let slot = &mut slots[usize::from(dict.is_some())];
            if slot.as_ref().is_none_or(|(d, _)| *d != dict_id) {
                let d = match dict {
                    None => zstd::bulk::Decompressor::new(),
                    Some(d) => zstd::bulk::Decompressor::with_dictionary(d.bytes()),
                };
                *slot = Some((dict_id, d.expect("zstd context")));
            }
            let (_, d) = slot.as_mut().expect("set above");
            d.decompress_to_buffer(stored, &mut out)
        });
        match result {
            Ok(_) => out,
            Err(e) => {
                let reason = e.to_string();
                let too_large = reason.contains("Destination buffer is too small")
                    || zstd::zstd_safe::get_frame_content_size(stored)
                        .ok()
                        .flatten()
                        .is_some_and(|n| n > u64::from(size));
                return Err(if too_large {
                    ChunkError::DecompressedTooLarge { id, size }
                } else {
                    ChunkError::Corrupt { id, reason }
                });
            }
        }
    } else {
        stored.to_vec()
    };
    check_decoded(data, id, size, exact)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn compressible_chunk_is_zstd_and_round_trips() {
        let data = vec![7u8; 100_000];
        let stored = encode(&data, 3);
        assert!(stored.starts_with(&ZSTD_MAGIC));
        assert!(stored.len() < 100);
        let r = ChunkRef {
            id: ChunkId::of(&data),
            size: 100_000,
            stored_size: 0,
        };
        assert_eq!(decode(&stored, &r).unwrap(), data);
    }

    #[test]
    fn incompressible_chunk_is_raw() {
        let data = pseudo_random(10_000, 1);
        let stored = encode(&data, 19);
        assert_eq!(stored, data);
        let r = ChunkRef {
            id: ChunkId::of(&data),
            size: 10_000,
            stored_size: 0,
        };
        assert_eq!(decode(&stored, &r).unwrap(), data);
    }

    #[test]
    fn delta_chunks_decode_in_turn_against_their_own_references() {
        // One thread's reused context decodes chunks against different
        // references, among them references that start like a zstd dictionary
        // (the encoder used them as raw bytes; read as a dictionary they fail).
        let mut decoded = 0;
        for seed in 0..6u64 {
            let mut reference = pseudo_random(50_000, 10 + seed);
            if seed % 2 == 1 {
                reference[..4].copy_from_slice(&ZSTD_DICTIONARY_MAGIC);
            }
            let mut data = reference[1_000..41_000].to_vec();
            data[20_000..20_100].copy_from_slice(&pseudo_random(100, 99 + seed));
            let stored = encode_against(&data, 3, &reference);
            assert!(
                stored.len() < 2_000,
                "{} bytes: the reference was not used",
                stored.len()
            );
            let r = ChunkRef {
                id: ChunkId::of(&data),
                size: data.len() as u32,
                stored_size: stored.len() as u32,
            };
            assert_eq!(decode_against(&stored, &r, &reference).unwrap(), data);
            // The same frame against another reference is refused, never wrong bytes.
            let other = pseudo_random(50_000, 1_000 + seed);
            assert!(decode_against(&stored, &r, &other).is_err());
            decoded += 1;
        }
        assert_eq!(decoded, 6);
    }

    #[test]
    fn raw_chunk_starting_with_magic_is_framed() {
        let mut data = pseudo_random(10_000, 2);
        data[..4].copy_from_slice(&ZSTD_MAGIC);
        let stored = encode(&data, 3);
        assert_ne!(stored, data);
        assert!(stored.starts_with(&ZSTD_MAGIC));
        let r = ChunkRef {
            id: ChunkId::of(&data),
            size: 10_000,
            stored_size: 0,
        };
        assert_eq!(decode(&stored, &r).unwrap(), data);
    }

    /// Text-like samples a dictionary can be trained on, and a chunk like them.
    fn config_text(seed: u32, lines: u32) -> Vec<u8> {
        (0..lines)
            .flat_map(|i| {
                format!(
                    "option_{}.enabled = {}\nlimit_{} = {}\n",
                    (seed * 7 + i) % 97,
                    (seed + i).is_multiple_of(2),
                    (seed * 13 + i) % 89,
                    (seed + i * 31) % 1000
                )
                .into_bytes()
            })
            .collect()
    }

    #[test]
    fn a_plain_encoder_with_a_prepared_dictionary_stores_like_encode_with() {
        let samples: Vec<Vec<u8>> = (0..200).map(|s| config_text(s, 60)).collect();
        let sizes: Vec<usize> = samples.iter().map(Vec::len).collect();
        let d = Dictionary::train(&samples.concat(), &sizes, 16 * 1024).expect("a dictionary");
        let prepared = PreparedDictionary::new(&d, 9);
        let mut enc = PlainEncoder::new(9, Some(&prepared));
        let data = config_text(1000, 400);
        let stored = enc.encode(&data);
        // The same frame as the thread-local path: it names the dictionary and decodes
        // with it.
        assert_eq!(stored, encode_with(&data, 9, Some(&d)));
        assert_eq!(frame_dictionary_id(&stored), Some(d.zstd_id));
        let r = ChunkRef {
            id: ChunkId::of(&data),
            size: u32::try_from(data.len()).unwrap(),
            stored_size: 0,
        };
        assert_eq!(decode_with(&stored, &r, Some(&d)).unwrap(), data);
        // The raw rule: incompressible bytes stay raw, unless they start with the magic.
        let noise = pseudo_random(10_000, 5);
        assert_eq!(enc.encode(&noise), noise);
        let mut magic = noise.clone();
        magic[..4].copy_from_slice(&ZSTD_MAGIC);
        assert!(enc.encode(&magic).starts_with(&ZSTD_MAGIC));
        assert_ne!(enc.encode(&magic), magic);
        // Without a dictionary: a frame that names none.
        let stored = PlainEncoder::new(9, None).encode(&data);
        assert_eq!(stored, encode(&data, 9));
        assert_eq!(frame_dictionary_id(&stored), None);
    }

    #[test]
    fn zstd_bomb_is_refused() {
        // 4 MiB of zeros compresses to a few hundred bytes; declared as 64 KiB.
        let big = vec![0u8; 4 * 1024 * 1024];
        let stored = encode(&big, 3);
        let r = ChunkRef {
            id: ChunkId::of(&big[..65536]),
            size: 65536,
            stored_size: 0,
        };
        assert_eq!(
            decode(&stored, &r),
            Err(ChunkError::DecompressedTooLarge {
                id: r.id,
                size: 65536
            })
        );
    }

    #[test]
    fn zstd_bomb_without_content_size_is_refused() {
        // A streamed frame does not declare its content size in the header.
        let big = vec![0u8; 1024 * 1024];
        let mut stored = Vec::new();
        let mut enc = zstd::stream::write::Encoder::new(&mut stored, 3).unwrap();
        enc.include_contentsize(false).unwrap();
        io::Write::write_all(&mut enc, &big).unwrap();
        enc.finish().unwrap();
        let r = ChunkRef {
            id: ChunkId::of(&big[..1000]),
            size: 1000,
            stored_size: 0,
        };
        assert_eq!(
            decode(&stored, &r),
            Err(ChunkError::DecompressedTooLarge {
                id: r.id,
                size: 1000
            })
        );
    }

    #[test]
    fn flipped_bit_and_wrong_chunk_are_refused() {
        let data = pseudo_random(50_000, 3)
            .iter()
            .map(|b| b % 4)
            .collect::<Vec<_>>();
        let stored = encode(&data, 3);
        let r = ChunkRef {
            id: ChunkId::of(&data),
            size: 50_000,
            stored_size: 0,
        };
        let mut bad = stored.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x10;
        assert!(matches!(
            decode(&bad, &r),
            Err(ChunkError::Corrupt { .. } | ChunkError::HashMismatch { .. })
        ));
        let other = vec![1u8; 50_000];
        assert!(matches!(
            decode(&encode(&other, 3), &r),
            Err(ChunkError::HashMismatch { .. })
        ));
        assert!(matches!(
            decode(&encode(&other[..40_000], 3), &r),
            Err(ChunkError::SizeMismatch { found: 40_000, .. })
        ));
        assert!(matches!(
            decode(&[], &r),
            Err(ChunkError::SizeMismatch { found: 0, .. })
        ));
    }

    #[test]
    fn oversized_stored_form_is_refused_before_decoding() {
        let r = ChunkRef {
            id: ChunkId::of(b"x"),
            size: 10,
            stored_size: 0,
        };
        assert!(matches!(
            decode(&[0u8; 1000], &r),
            Err(ChunkError::StoredTooLarge { .. })
        ));
    }

    #[test]
    fn chunker_respects_bounds() {
        let data = pseudo_random(3_000_000, 4);
        let c = Chunking {
            min_size: 4096,
            avg_size: 16384,
            max_size: 65536,
        };
        let chunks: Vec<Chunk> = Chunker::new(&data[..], c).map(Result::unwrap).collect();
        let n = chunks.len();
        assert!(n > 50, "{n} chunks");
        for (i, ch) in chunks.iter().enumerate() {
            assert!(ch.data.len() <= 65536);
            assert!(i + 1 == n || ch.data.len() >= 4096);
        }
    }

    proptest! {
        #[test]
        fn concat_of_chunks_is_input(
            seed in any::<u64>(),
            len in 0usize..400_000,
            runs in 0usize..4,
        ) {
            let mut data = pseudo_random(len, seed);
            // Add some long runs so chunks of max size and repeats occur.
            for r in 0..runs {
                let start = (r * 97_531) % (len.max(1));
                let end = (start + 70_000).min(len);
                data[start..end].fill(0);
            }
            let c = Chunking { min_size: 2048, avg_size: 8192, max_size: 32768 };
            let mut joined = Vec::new();
            let mut offset = 0u64;
            for ch in Chunker::new(&data[..], c) {
                let ch = ch.unwrap();
                prop_assert_eq!(ch.offset, offset);
                offset += ch.data.len() as u64;
                joined.extend_from_slice(&ch.data);
            }
            prop_assert_eq!(joined, data);
        }

        #[test]
        fn stored_form_round_trips(seed in any::<u64>(), len in 1usize..20_000, level in 1i32..6) {
            let data: Vec<u8> = pseudo_random(len, seed).iter().map(|b| b % 3).collect();
            let stored = encode(&data, level);
            let r = ChunkRef {
                id: ChunkId::of(&data),
                size: u32::try_from(len).unwrap(),
                stored_size: 0,
            };
            prop_assert_eq!(decode(&stored, &r).unwrap(), data);
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let r = ChunkRef { id: ChunkId::of(b"x"), size: 100, stored_size: 0 };
            let mut framed = ZSTD_MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            let _ = decode(&bytes, &r);
            let _ = decode(&framed, &r);
        }
    }
}
