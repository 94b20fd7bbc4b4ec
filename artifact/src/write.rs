//! Building `.shoal` artifacts from a payload image, and adding signatures to one.
//!
//! The build streams: a chunker thread cuts the image and hashes the whole payload,
//! batches of chunks are hashed and compressed on all cores (rayon), and each new
//! distinct chunk is appended to a spool file (as is, for data members; in a pack
//! member, for packs). Only when the image is done is the manifest known; the
//! artifact is then written as the envelope member followed by a copy of the spool
//! (under data member headers, for data members). Memory is bounded by a few batches, whatever the
//! image size.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::Path;
use std::sync::mpsc;

use rayon::prelude::*;
use shoal_signing::{Envelope, SecretKey};

use crate::chunk::Dictionary;
use crate::chunk::{self, Chunker};
use crate::delta::{BaseImageError, RefBase};
use crate::manifest::{
    BaseRelease, ChunkId, ChunkRef, Chunking, Manifest, ManifestError, Payload, PayloadKind,
    Reference, check_text,
};
use crate::manifest_delta::{HeldManifests, MANIFEST_DELTA_MEMBER, ManifestDelta};
use crate::read::{
    CONTENTS_MEMBER, DICTIONARY_MEMBER, ENVELOPE_MEMBER, PACK_CHUNKS_MAX, PACK_HEADER_LEN,
    PACK_TABLE_ENTRY_LEN, PACK_TABLE_MEMBER, contents_bitmap, data_path, pack_path, pack_table,
};
use crate::ustar;

/// Raw payload bytes per batch handed from the chunker to the compressors.
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Release name.
    pub name: String,
    /// Release version.
    pub version: String,
    /// Compatible device types.
    pub device_types: Vec<String>,
    /// Anti-rollback counter.
    pub security_counter: u64,
    /// Provides (Mender-style).
    pub provides: BTreeMap<String, String>,
    /// Depends: key to acceptable values.
    pub depends: BTreeMap<String, Vec<String>>,
    /// Name of the single payload (`"rootfs"`).
    pub payload_name: String,
    /// Kind of the payload.
    pub payload_kind: PayloadKind,
    /// FastCDC parameters.
    pub chunking: Chunking,
    /// zstd level.
    pub zstd_level: i32,
    /// How the chunks are laid out in the archive (see [`Layout`]).
    pub layout: Layout,
    /// Train a zstd dictionary on a sample of the chunks and compress with it (one
    /// more read of the image; see DESIGN.md for what it buys).
    pub dictionary: bool,
    /// A thin artifact's manifest travels as a delta against its base's manifest
    /// ([`crate::manifest_delta`]) when that is smaller than the envelope: a device
    /// running the base keeps that manifest.
    pub manifest_delta: bool,
}

/// Default stored bytes per pack member of [`Layout::Packs`]: big enough that tar's
/// per-member cost (a 512-byte header and padding) is noise, small enough to stay a
/// streaming unit.
pub const PACK_BYTES_DEFAULT: usize = 1024 * 1024;

/// Stored bytes after which a data member of [`Layout::Data`] is closed: a member is
/// at most this plus one chunk's stored form, under the 8 GiB a ustar size field
/// holds in octal.
pub const DATA_MEMBER_BYTES: u64 = 4 << 30;

/// How an artifact lays out the stored chunks after the members before them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// The default: the chunks concatenated in `data/00000000`, `data/00000001`, …
    /// members of about [`DATA_MEMBER_BYTES`] each (one for any image under 4 GiB of
    /// stored chunks), with no count and no pack table: which chunks a member holds
    /// follows from its size and the signed stored sizes. A reader reads one tar
    /// header per member, so a device that needs a few chunks of a full artifact reads
    /// no framing it would not read from the thin one.
    #[default]
    Data,
    /// Pack members of about `bytes` stored bytes, each with its chunk count, and
    /// the pack table: the layout before data members, which is all that readers
    /// from before them read (`shoal artifact build --packs`, for a fleet still
    /// running such a release).
    Packs {
        /// Stored bytes after which a pack is closed.
        bytes: usize,
    },
}

/// Where packs (or data members) close: after `limit` stored bytes or `chunks_max`
/// chunks. The writer packs with it, and [`artifact_len`] sizes artifacts with it,
/// so a size computed from a manifest is the size a build writes.
#[derive(Debug, Clone)]
pub struct Packer {
    limit: u64,
    chunks_max: usize,
    count: usize,
    bytes: u64,
}

impl Packer {
    /// Packs closed after `limit` stored bytes or [`PACK_CHUNKS_MAX`] chunks.
    pub fn new(limit: usize) -> Packer {
        Packer {
            limit: limit as u64,
            chunks_max: PACK_CHUNKS_MAX,
            count: 0,
            bytes: 0,
        }
    }

    /// How `layout` closes its members.
    pub fn of(layout: Layout) -> Packer {
        match layout {
            Layout::Packs { bytes } => Packer::new(bytes),
            Layout::Data => Packer {
                limit: DATA_MEMBER_BYTES,
                chunks_max: usize::MAX,
                count: 0,
                bytes: 0,
            },
        }
    }

    /// Adds a chunk of `stored` bytes to the open pack; returns the pack's
    /// `(chunks, stored bytes)` when it closes after this chunk.
    pub fn push(&mut self, stored: usize) -> Option<(usize, u64)> {
        self.count += 1;
        self.bytes += stored as u64;
        if self.bytes >= self.limit || self.count == self.chunks_max {
            return self.finish();
        }
        None
    }

    /// Closes the open pack, if it holds a chunk: its `(chunks, stored bytes)`.
    pub fn finish(&mut self) -> Option<(usize, u64)> {
        if self.count == 0 {
            return None;
        }
        let closed = (self.count, self.bytes);
        self.count = 0;
        self.bytes = 0;
        Some(closed)
    }
}

/// The members holding the chunks being written to a spool: pack members (whole,
/// with their tar framing) for [`Layout::Packs`] and the pack table's counts; for
/// [`Layout::Data`] the stored forms alone, and each data member's size, whose
/// headers are written when the spool is copied into the artifact.
#[derive(Debug)]
struct PackWriter {
    layout: Layout,
    packer: Packer,
    count: usize,
    data: Vec<u8>,
    seq: u64,
    counts: Vec<u32>,
    /// Data bytes of each closed data member.
    sizes: Vec<u64>,
    /// Stored bytes pushed.
    stored: u64,
}

impl PackWriter {
    fn new(layout: Layout) -> PackWriter {
        PackWriter {
            layout,
            packer: Packer::of(layout),
            count: 0,
            data: Vec::new(),
            seq: 0,
            counts: Vec::new(),
            sizes: Vec::new(),
            stored: 0,
        }
    }

    fn push<W: Write>(&mut self, out: &mut W, stored: &[u8]) -> io::Result<()> {
        self.count += 1;
        self.stored += stored.len() as u64;
        if self.layout == Layout::Data {
            out.write_all(stored)?;
        } else {
            self.data.extend_from_slice(stored);
        }
        if let Some((_, bytes)) = self.packer.push(stored.len()) {
            self.close(out, bytes)?;
        }
        Ok(())
    }

    fn flush<W: Write>(&mut self, out: &mut W) -> io::Result<()> {
        if let Some((_, bytes)) = self.packer.finish() {
            self.close(out, bytes)?;
        }
        Ok(())
    }

    fn close<W: Write>(&mut self, out: &mut W, bytes: u64) -> io::Result<()> {
        if self.layout == Layout::Data {
            self.sizes.push(bytes);
        } else {
            let member = pack_member(self.count, &self.data);
            ustar::write_member(out, &pack_path(self.seq), &member)?;
            self.counts
                .push(u32::try_from(self.count).expect("at most PACK_CHUNKS_MAX"));
            self.data.clear();
        }
        self.seq += 1;
        self.count = 0;
        Ok(())
    }

    /// Bytes the spooled chunks take in the artifact, all framing included (and the
    /// pack table).
    fn artifact_bytes(&self) -> u64 {
        match self.layout {
            Layout::Data => self.sizes.iter().map(|&s| member_len(s)).sum(),
            Layout::Packs { .. } => {
                let packs: u64 = self.counts.len().try_into().expect("a pack count fits u64");
                // Each pack: a 512-byte header, the 4-byte count, padding to 512
                // (on average half a block); the stored bytes; the table member.
                packs * (ustar::BLOCK as u64 + PACK_HEADER_LEN as u64 + ustar::BLOCK as u64 / 2)
                    + self.stored
                    + member_len(packs * PACK_TABLE_ENTRY_LEN as u64)
            }
        }
    }

    /// Writes the spooled chunks into the artifact: the pack table and the spool's
    /// pack members, or each data member's header, its bytes from the spool and its
    /// padding. Returns the bytes written.
    fn copy_into<R: Read, W: Write>(&self, spool: R, out: &mut W) -> io::Result<u64> {
        let mut spool = BufReader::with_capacity(1 << 20, spool);
        match self.layout {
            Layout::Packs { .. } => {
                // Where each pack is, so a reader can seek to the chunks it wants.
                let mut n = ustar::write_member(out, PACK_TABLE_MEMBER, &pack_table(&self.counts))?;
                n += io::copy(&mut spool, out)?;
                Ok(n)
            }
            Layout::Data => {
                let mut n = 0;
                for (seq, &size) in self.sizes.iter().enumerate() {
                    let h = ustar::header(&data_path(seq as u64), size);
                    out.write_all(h.as_bytes())?;
                    let copied = io::copy(&mut (&mut spool).take(size), out)?;
                    if copied != size {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    let pad = ustar::padding(size);
                    out.write_all(&[0u8; ustar::BLOCK][..pad])?;
                    n += member_len(size);
                }
                Ok(n)
            }
        }
    }
}

/// The data of a pack member: the chunk count (u32 little-endian), then the
/// chunks' stored forms concatenated (`stored` is that concatenation). Which chunks
/// they are follows from the order: the next `count` the artifact holds.
pub fn pack_member(count: usize, stored: &[u8]) -> Vec<u8> {
    assert!(count > 0 && count <= PACK_CHUNKS_MAX);
    let mut out = Vec::with_capacity(PACK_HEADER_LEN + stored.len());
    out.extend_from_slice(&u32::try_from(count).expect("bounded").to_le_bytes());
    out.extend_from_slice(stored);
    out
}

/// Bytes of a tar member (header, data, padding) holding `len` bytes.
pub fn member_len(len: u64) -> u64 {
    ustar::BLOCK as u64 + len + ustar::padding(len) as u64
}

/// The exact size of the artifact the builder writes for these parts: an envelope
/// of `envelope_len` bytes, a dictionary member of `dictionary_len` bytes (0: none),
/// a contents member for `contents_chunks` distinct chunks (`None`: none), and
/// chunks of these stored sizes, in order, laid out as `layout` says (the pack
/// table included).
pub fn artifact_len(
    envelope_len: u64,
    dictionary_len: u64,
    contents_chunks: Option<usize>,
    stored_sizes: impl IntoIterator<Item = u32>,
    layout: Layout,
) -> u64 {
    let mut len = member_len(envelope_len);
    if dictionary_len > 0 {
        len += member_len(dictionary_len);
    }
    if let Some(n) = contents_chunks {
        len += member_len(n.div_ceil(8) as u64);
    }
    let index = match layout {
        Layout::Packs { .. } => PACK_HEADER_LEN as u64,
        Layout::Data => 0,
    };
    let mut members = 0u64;
    let mut member = |(_, bytes): (usize, u64)| {
        members += 1;
        member_len(index + bytes)
    };
    let mut packer = Packer::of(layout);
    for s in stored_sizes {
        len += packer.push(s as usize).map_or(0, &mut member);
    }
    len += packer.finish().map_or(0, &mut member);
    if let Layout::Packs { .. } = layout {
        len += member_len(members * PACK_TABLE_ENTRY_LEN as u64);
    }
    // The end of the archive: two zero blocks.
    len + 2 * ustar::BLOCK as u64
}

impl BuildOptions {
    /// Options for a root filesystem image with the default (measured) parameters.
    pub fn rootfs(name: &str, version: &str, device_types: Vec<String>, counter: u64) -> Self {
        BuildOptions {
            name: name.into(),
            version: version.into(),
            device_types,
            security_counter: counter,
            provides: BTreeMap::new(),
            depends: BTreeMap::new(),
            payload_name: "rootfs".into(),
            payload_kind: PayloadKind::RootfsImage,
            chunking: chunk::CHUNKING_DEFAULT,
            zstd_level: chunk::ZSTD_LEVEL_DEFAULT,
            layout: Layout::Data,
            dictionary: true,
            manifest_delta: false,
        }
    }

    /// Switches to the `--fast` parameters (bigger chunks, lower zstd level, no
    /// dictionary).
    pub fn fast(mut self) -> Self {
        self.chunking = chunk::CHUNKING_FAST;
        self.zstd_level = chunk::ZSTD_LEVEL_FAST;
        self.dictionary = false;
        self
    }
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Reading the image or writing the artifact failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The options make an invalid manifest (empty name, too many device types, ...).
    #[error("invalid release: {0}")]
    Manifest(#[from] ManifestError),
    /// No signing key was given.
    #[error("at least one signing key is needed")]
    NoKey,
    /// The image is empty.
    #[error("the image is empty")]
    EmptyImage,
    /// The base image given for delta encoding is unusable.
    #[error(transparent)]
    BaseImage(#[from] BaseImageError),
    /// The base manifest uses other chunking parameters, so no chunk could be shared.
    #[error("the base release was cut with {base:?}, this build with {this:?}")]
    ChunkingMismatch {
        /// The base's parameters.
        base: Chunking,
        /// This build's.
        this: Chunking,
    },
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The signed manifest.
    pub manifest: Manifest,
    /// Size of the envelope member's data (of the manifest delta member, when the
    /// manifest travels as one).
    pub envelope_len: u64,
    /// Size of the dictionary member's data (0 without one).
    pub dictionary_len: u64,
    /// Size of the whole artifact file.
    pub artifact_len: u64,
    /// Chunks in the payload (with repeats).
    pub chunks_total: u64,
    /// Distinct chunks in the payload.
    pub chunks_distinct: u64,
    /// Chunks written into the artifact (distinct, minus those a base holds).
    pub chunks_written: u64,
    /// Stored bytes of the chunks written.
    pub stored_bytes: u64,
    /// Chunks written delta-encoded against the base release's bytes.
    pub chunks_delta: u64,
    /// References (base byte ranges) the delta-encoded chunks use.
    pub references: u64,
}

/// A batch of chunks cut by the chunker thread.
struct Batch {
    chunks: Vec<Vec<u8>>,
}

/// Builds an artifact from `image` into `out`, spooling chunk members in a
/// temporary file in `spool_dir`. `base` makes a thin artifact. `progress` is called
/// with payload bytes done.
pub fn build<R: Read + Seek + Send, W: Write>(
    image: R,
    opts: &BuildOptions,
    keys: &[SecretKey],
    base: Option<&Manifest>,
    spool_dir: &Path,
    out: W,
    progress: impl FnMut(u64),
) -> Result<BuildReport, BuildError> {
    build_impl(image, opts, keys, base, None, spool_dir, out, progress)
}

/// Like [`build`] of a thin artifact against `base`, with `base_image` the base
/// release's payload (checked against the base manifest's size and hash first): each
/// new chunk is also compressed against bytes of it (see [`crate::delta`]) and
/// stored that way when that is smaller. The manifest names those references
/// (format version 2); a device decodes such a chunk with bytes of its running slot.
///
/// `base_dictionary` is the dictionary the base release's chunks were compressed
/// with, when the caller has it: the build then measures whether a newly trained
/// dictionary saves more than its own size over reusing it, and otherwise reuses it
/// (the artifact carries no dictionary member; the manifest names the base's, which
/// a device running the base keeps). Without it, the new dictionary is measured
/// against none.
#[allow(clippy::too_many_arguments)]
pub fn build_delta<R: Read + Seek + Send, W: Write>(
    image: R,
    opts: &BuildOptions,
    keys: &[SecretKey],
    base: &Manifest,
    base_image: File,
    base_dictionary: Option<&Dictionary>,
    spool_dir: &Path,
    out: W,
    progress: impl FnMut(u64),
) -> Result<BuildReport, BuildError> {
    build_impl(
        image,
        opts,
        keys,
        Some(base),
        Some((base_image, base_dictionary)),
        spool_dir,
        out,
        progress,
    )
}

#[allow(clippy::too_many_arguments)]
fn build_impl<R: Read + Seek + Send, W: Write>(
    mut image: R,
    opts: &BuildOptions,
    keys: &[SecretKey],
    base: Option<&Manifest>,
    base_image: Option<(File, Option<&Dictionary>)>,
    spool_dir: &Path,
    out: W,
    mut progress: impl FnMut(u64),
) -> Result<BuildReport, BuildError> {
    let (base_image, base_dictionary) = match base_image {
        Some((f, d)) => (Some(f), d),
        None => (None, None),
    };
    if keys.is_empty() {
        return Err(BuildError::NoKey);
    }
    opts.chunking.validate()?;
    // Text the manifest will carry, checked before the image is read.
    check_text("name", &opts.name)?;
    check_text("version", &opts.version)?;
    check_text("payloads[].name", &opts.payload_name)?;
    for t in &opts.device_types {
        check_text("device_types[]", t)?;
    }
    for (k, v) in &opts.provides {
        check_text("provides", k)?;
        check_text("provides[]", v)?;
    }
    for (k, values) in &opts.depends {
        check_text("depends", k)?;
        for v in values {
            check_text("depends[][]", v)?;
        }
    }
    if let Some(b) = base
        && b.chunking != opts.chunking
    {
        return Err(BuildError::ChunkingMismatch {
            base: b.chunking,
            this: opts.chunking,
        });
    }
    // Chunks the base holds, with the stored size they have there.
    let held: HashMap<ChunkId, u32> = base
        .map(|b| {
            b.payloads
                .iter()
                .flat_map(|p| p.chunks.iter().map(|c| (c.id, c.stored_size)))
                .collect()
        })
        .unwrap_or_default();
    // The base image is read and indexed while the dictionary is trained (one
    // thread each: both read a file and mostly use one core).
    let (refbase, dictionary) = std::thread::scope(|scope| -> Result<_, BuildError> {
        let indexing = match (base, base_image) {
            (Some(b), Some(f)) => {
                let payload = &opts.payload_name;
                Some(scope.spawn(move || RefBase::open(f, b, payload)))
            }
            _ => None,
        };
        let dictionary = if opts.dictionary {
            let d = train_dictionary(&mut image, opts.chunking)?;
            image.rewind()?;
            d
        } else {
            None
        };
        let refbase = match indexing {
            Some(h) => Some(h.join().expect("base image indexing panicked")?),
            None => None,
        };
        Ok((refbase, dictionary))
    })?;
    let refbase = refbase.as_ref();
    let dict = dictionary.as_ref();
    let mut spool = BufWriter::with_capacity(1 << 20, tempfile::tempfile_in(spool_dir)?);
    // A delta build also spools its chunks with the alternative to the new
    // dictionary (the plain ones compressed with the base's dictionary, which the
    // device keeps, or without one when the base's is not at hand), and keeps the new
    // dictionary only when it pays for itself: most chunks are then delta-encoded,
    // and the few plain ones may gain less than the new dictionary costs to download.
    let alt_dict = base_dictionary.filter(|_| refbase.is_some());
    let mut nodict = match (dict, refbase) {
        (Some(_), Some(_)) => Some(NoDict {
            spool: BufWriter::with_capacity(1 << 20, tempfile::tempfile_in(spool_dir)?),
            pack: PackWriter::new(opts.layout),
            stored_of: HashMap::new(),
            stored_bytes: 0,
        }),
        _ => None,
    };
    let mut refs: Vec<ChunkRef> = Vec::new();
    let mut stored_of: HashMap<ChunkId, u32> = HashMap::new();
    let mut written: HashSet<ChunkId> = HashSet::new();
    let mut stored_bytes = 0u64;
    let mut references: Vec<Reference> = Vec::new();
    let mut reference_of: HashMap<Vec<(u64, u32)>, usize> = HashMap::new();
    let mut chunks_delta = 0u64;
    // Locality anchor: (end in the new payload, end in the base) of the last chunk
    // both hold, and the new payload's offset of the batch.
    let mut anchor: Option<(u64, u64)> = None;
    let mut payload_offset = 0u64;
    let mut pack = PackWriter::new(opts.layout);
    let level = opts.zstd_level;
    // A delta build's dictionaries, digested once for all its threads.
    let prepared = refbase.map(|_| Prepared {
        level,
        plain: dict.map(|d| chunk::PreparedDictionary::new(d, level)),
        estimate: dict.map(|d| chunk::PreparedDictionary::new(d, ZSTD_LEVEL_ESTIMATE)),
        alt: nodict
            .is_some()
            .then(|| alt_dict.map(|d| chunk::PreparedDictionary::new(d, level))),
    });
    let chunking = opts.chunking;

    let (payload_hash, size) = std::thread::scope(|scope| -> Result<_, BuildError> {
        let (tx, rx) = mpsc::sync_channel::<io::Result<Batch>>(1);
        let cutter = scope.spawn(move || {
            let mut hasher = blake3::Hasher::new();
            let mut size = 0u64;
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            for c in Chunker::new(image, chunking) {
                match c {
                    Ok(c) => {
                        hasher.update(&c.data);
                        size += c.data.len() as u64;
                        batch_bytes += c.data.len();
                        batch.push(c.data);
                        if batch_bytes >= BATCH_BYTES {
                            let full = std::mem::take(&mut batch);
                            batch_bytes = 0;
                            if tx.send(Ok(Batch { chunks: full })).is_err() {
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                let _ = tx.send(Ok(Batch { chunks: batch }));
            }
            (*hasher.finalize().as_bytes(), size)
        });
        for batch in rx {
            let batch = batch?;
            let ids: Vec<ChunkId> = batch.chunks.par_iter().map(|d| ChunkId::of(d)).collect();
            // Which chunks of this batch are new: first occurrence, not in the base.
            let mut todo = Vec::new();
            let mut anchors = Vec::new();
            let mut batch_new = HashSet::new();
            let mut offset = payload_offset;
            for (i, id) in ids.iter().enumerate() {
                let len = batch.chunks[i].len() as u64;
                if let Some(end) = refbase.and_then(|r| r.held_end(id)) {
                    anchor = Some((offset + len, end));
                }
                if !stored_of.contains_key(id) && !held.contains_key(id) && batch_new.insert(*id) {
                    todo.push(i);
                    // Where this chunk would start in the base had the stretch since
                    // the anchor kept its place.
                    anchors.push(anchor.map(|(new_end, base_end)| base_end + (offset - new_end)));
                }
                offset += len;
            }
            payload_offset = offset;
            let encoded: Vec<Encoded> = match (refbase, &prepared) {
                (Some(rb), Some(prepared)) => {
                    let ranges: Vec<Vec<(u64, u32)>> = todo
                        .par_iter()
                        .zip(&anchors)
                        .map(|(&i, &at)| rb.ranges(at, &batch.chunks[i]))
                        .collect();
                    encode_deltas(rb, &batch.chunks, &todo, ranges, prepared)?
                }
                _ => todo
                    .par_iter()
                    .map(|&i| {
                        (
                            chunk::encode_with(&batch.chunks[i], level, dict),
                            None,
                            None,
                        )
                    })
                    .collect(),
            };
            let position0 = refs.len();
            for (&i, (stored, reference, alt)) in todo.iter().zip(&encoded) {
                let id = ids[i];
                if let Some((ranges, hash)) = reference {
                    let r = *reference_of.entry(ranges.clone()).or_insert_with(|| {
                        references.push(Reference {
                            ranges: ranges.clone(),
                            hash: *hash,
                            chunks: Vec::new(),
                        });
                        references.len() - 1
                    });
                    let position = u32::try_from(position0 + i)
                        .expect("a payload's chunk count fits u32 (manifest size limit)");
                    references[r].chunks.push(position);
                    chunks_delta += 1;
                }
                pack.push(&mut spool, stored)?;
                if let Some(nd) = nodict.as_mut() {
                    let other = alt.as_ref().unwrap_or(stored);
                    nd.pack.push(&mut nd.spool, other)?;
                    let n = u32::try_from(other.len()).expect("bounded by chunk size");
                    nd.stored_of.insert(id, n);
                    nd.stored_bytes += other.len() as u64;
                }
                let stored_size = u32::try_from(stored.len()).expect("bounded by chunk size");
                stored_of.insert(id, stored_size);
                written.insert(id);
                stored_bytes += stored.len() as u64;
            }
            let mut done = 0u64;
            for (data, id) in batch.chunks.iter().zip(&ids) {
                let stored_size = stored_of.get(id).or_else(|| held.get(id)).copied();
                let stored_size = stored_size.expect("every chunk is new, seen or held");
                let size = u32::try_from(data.len()).expect("bounded by max_size");
                refs.push(ChunkRef {
                    id: *id,
                    size,
                    stored_size,
                });
                done += data.len() as u64;
            }
            progress(done);
        }
        pack.flush(&mut spool)?;
        if let Some(nd) = nodict.as_mut() {
            nd.pack.flush(&mut nd.spool)?;
        }
        Ok(cutter.join().expect("chunker thread panicked"))
    })?;
    if size == 0 {
        return Err(BuildError::EmptyImage);
    }

    // The base's dictionary (or none) when that is smaller, all framing included:
    // a reused dictionary costs nothing to download.
    let (mut dict, mut spool, mut pack, mut refs, mut stored_bytes) =
        (dict, spool, pack, refs, stored_bytes);
    // What the thin delta manifest names: the dictionary its chunks need.
    let mut named = None;
    if let (Some(nd), Some(d)) = (nodict, dict) {
        let with = member_len(d.bytes().len() as u64) + pack.artifact_bytes();
        let without = nd.pack.artifact_bytes();
        tracing::debug!(
            with,
            without,
            reuse = alt_dict.is_some(),
            "thin delta build: a new dictionary, or the base's (none when not at hand)"
        );
        if without < with {
            for c in refs.iter_mut() {
                if let Some(&n) = nd.stored_of.get(&c.id) {
                    c.stored_size = n;
                }
            }
            dict = None;
            spool = nd.spool;
            pack = nd.pack;
            stored_bytes = nd.stored_bytes;
            named = alt_dict.map(|d| d.id);
        } else {
            named = Some(d.id);
        }
    }
    let chunks_total = refs.len() as u64;
    let chunks_distinct = refs.iter().map(|c| c.id).collect::<HashSet<_>>().len() as u64;
    let mut manifest = Manifest {
        base: base.map(base_release),
        name: opts.name.clone(),
        depends: opts.depends.clone(),
        version: opts.version.clone(),
        chunking: opts.chunking,
        payloads: vec![Payload {
            hash: payload_hash,
            kind: opts.payload_kind,
            name: opts.payload_name.clone(),
            size,
            chunks: refs,
            references,
        }],
        provides: opts.provides.clone(),
        dictionary: named,
        device_types: opts.device_types.clone(),
        format_version: 0,
        security_counter: opts.security_counter,
    };
    manifest.format_version = manifest.required_version();
    manifest.validate()?;
    let references_count = manifest
        .payloads
        .iter()
        .map(|p| p.references.len() as u64)
        .sum();
    let mut envelope = Envelope::new(manifest.to_cbor());
    for key in keys {
        envelope.sign(key);
    }
    // The delta only when it is smaller (a release that changes most chunks has a
    // manifest of new hashes, which no reference shrinks).
    let whole = envelope.to_bytes();
    let (first_member, env_bytes) = match base {
        Some(b) if opts.manifest_delta => {
            let delta = ManifestDelta::new(&envelope, &b.to_cbor()).to_bytes();
            if delta.len() < whole.len() {
                (MANIFEST_DELTA_MEMBER, delta)
            } else {
                (ENVELOPE_MEMBER, whole)
            }
        }
        _ => (ENVELOPE_MEMBER, whole),
    };

    let mut spool = spool.into_inner().map_err(|e| e.into_error())?;
    spool.rewind()?;
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let mut artifact_len = ustar::write_member(&mut out, first_member, &env_bytes)?;
    if let Some(d) = dict {
        artifact_len += ustar::write_member(&mut out, DICTIONARY_MEMBER, d.bytes())?;
    }
    if base.is_some() {
        // Which chunks a thin artifact holds, so a device can tell before it writes
        // anything whether it has the rest.
        let bits = contents_bitmap(&manifest.distinct_chunks(), |id| written.contains(id));
        artifact_len += ustar::write_member(&mut out, CONTENTS_MEMBER, &bits)?;
    }
    artifact_len += pack.copy_into(spool, &mut out)?;
    artifact_len += ustar::write_end(&mut out)?;
    out.flush()?;
    Ok(BuildReport {
        manifest,
        envelope_len: env_bytes.len() as u64,
        dictionary_len: dict.map_or(0, |d| d.bytes().len() as u64),
        artifact_len,
        chunks_total,
        chunks_distinct,
        chunks_written: written.len() as u64,
        stored_bytes,
        chunks_delta,
        references: references_count,
    })
}

/// Reference bytes read at once while delta-encoding a batch: bounds the builder's
/// memory whatever the batch holds (a reference is at most 512 KiB).
const GROUP_REFERENCE_BYTES: usize = 24 * 1024 * 1024;

/// zstd level of the cheap plain estimate a delta frame is first compared with.
const ZSTD_LEVEL_ESTIMATE: i32 = 1;

/// A delta frame at most 1/this of the chunk's plain estimate
/// ([`ZSTD_LEVEL_ESTIMATE`], same dictionary) is kept without compressing the chunk
/// plain at the build's level: that form would have to be under half of level 1's
/// with the same dictionary to win (on the bench's v1 -> v2 and hotfix no chunk's
/// choice changes: the artifacts are byte-identical with and without the shortcut).
const DELTA_CLEAR_WIN: usize = 2;

/// A chunk's stored form, its reference (ranges, hash) when delta-encoded, and its
/// plain form with the alternative dictionary (the base's, or none) when that spool
/// is kept.
type Encoded = (
    Vec<u8>,
    Option<(Vec<(u64, u32)>, [u8; 32])>,
    Option<Vec<u8>>,
);

/// Like [`Encoded`], with the reference as its slot in the group being encoded.
type Slotted = (Vec<u8>, Option<usize>, Option<Vec<u8>>);

/// The dictionaries of a delta build, each digested once for all threads.
struct Prepared {
    /// The build's zstd level.
    level: i32,
    /// The new dictionary at the build's level.
    plain: Option<chunk::PreparedDictionary>,
    /// The new dictionary at [`ZSTD_LEVEL_ESTIMATE`].
    estimate: Option<chunk::PreparedDictionary>,
    /// The alternative spool's dictionary (the base's; `Some(None)`: none), when that
    /// spool is kept.
    alt: Option<Option<chunk::PreparedDictionary>>,
}

/// Encodes the new chunks `todo` of a batch: delta-encoded against their reference
/// `ranges` (empty: none) at the build's level capped by
/// [`chunk::ZSTD_LEVEL_DELTA_MAX`] when that is smaller than the plain form, plain
/// otherwise (and then also with the alternative dictionary, when that spool is
/// kept). A delta frame that clearly wins ([`DELTA_CLEAR_WIN`]) skips the plain
/// form at the build's level. References are read once per group of chunks (at most
/// [`GROUP_REFERENCE_BYTES`] of them) and hashed only when a chunk uses them; each
/// thread reuses its zstd contexts.
fn encode_deltas(
    rb: &RefBase,
    chunks: &[Vec<u8>],
    todo: &[usize],
    ranges: Vec<Vec<(u64, u32)>>,
    prepared: &Prepared,
) -> io::Result<Vec<Encoded>> {
    let level = prepared.level;
    let mut out = Vec::with_capacity(todo.len());
    let mut k = 0;
    while k < todo.len() {
        // The group: chunks from k while their distinct references fit.
        let mut slot_of: HashMap<&[(u64, u32)], usize> = HashMap::new();
        let mut keys: Vec<&[(u64, u32)]> = Vec::new();
        let mut bytes = 0usize;
        let mut end = k;
        while end < todo.len() {
            let r = ranges[end].as_slice();
            if !r.is_empty() && !slot_of.contains_key(r) {
                let len: usize = r.iter().map(|&(_, l)| l as usize).sum();
                if bytes + len > GROUP_REFERENCE_BYTES && end > k {
                    break;
                }
                slot_of.insert(r, keys.len());
                keys.push(r);
                bytes += len;
            }
            end += 1;
        }
        let refs: Vec<Vec<u8>> = keys
            .par_iter()
            .map(|r| rb.read(r))
            .collect::<io::Result<_>>()?;
        let group: Vec<usize> = (k..end).collect();
        // One set of contexts per thread's share of the group (a context per chunk
        // would allocate and fault in its tables every time).
        let share = group.len().div_ceil(rayon::current_num_threads().max(1));
        let encoded: Vec<Slotted> = group
            .par_chunks(share.max(1))
            .flat_map_iter(|part| {
                let mut enc = chunk::DeltaEncoder::new(level.min(chunk::ZSTD_LEVEL_DELTA_MAX));
                let mut plain = chunk::PlainEncoder::new(level, prepared.plain.as_ref());
                let mut estimate =
                    chunk::PlainEncoder::new(ZSTD_LEVEL_ESTIMATE, prepared.estimate.as_ref());
                let mut alt = prepared
                    .alt
                    .as_ref()
                    .map(|d| chunk::PlainEncoder::new(level, d.as_ref()));
                part.iter()
                    .map(|&j| {
                        let data = &chunks[todo[j]];
                        let Some(&s) = slot_of.get(ranges[j].as_slice()) else {
                            return (
                                plain.encode(data),
                                None,
                                alt.as_mut().map(|a| a.encode(data)),
                            );
                        };
                        let delta = enc.encode(data, &refs[s]);
                        if delta.len() * DELTA_CLEAR_WIN <= estimate.encode(data).len() {
                            return (delta, Some(s), None);
                        }
                        let p = plain.encode(data);
                        if delta.len() < p.len() {
                            (delta, Some(s), None)
                        } else {
                            (p, None, alt.as_mut().map(|a| a.encode(data)))
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        // Only the references chunks use are hashed (for the manifest).
        let used: Vec<usize> = {
            let mut u: Vec<usize> = encoded.iter().filter_map(|e| e.1).collect();
            u.sort_unstable();
            u.dedup();
            u
        };
        let hashes: HashMap<usize, [u8; 32]> = used
            .par_iter()
            .map(|&s| (s, *blake3::hash(&refs[s]).as_bytes()))
            .collect();
        out.extend(
            encoded
                .into_iter()
                .zip(k..end)
                .map(|((stored, s, alt), j)| {
                    (stored, s.map(|s| (ranges[j].clone(), hashes[&s])), alt)
                }),
        );
        k = end;
    }
    Ok(out)
}

/// The chunks of a delta build spooled with the alternative to the new dictionary:
/// the base's (reused), or none.
struct NoDict {
    spool: BufWriter<File>,
    pack: PackWriter,
    stored_of: HashMap<ChunkId, u32>,
    stored_bytes: u64,
}

/// How a thin manifest names its base.
fn base_release(base: &Manifest) -> BaseRelease {
    BaseRelease {
        name: base.name.clone(),
        version: base.version.clone(),
        manifest_hash: base.hash(),
    }
}

/// The manifest a thin build of `new`'s payload against `base` signs: `new` with
/// `base` named, and each chunk the base holds with the stored size it has there.
pub fn thin_manifest(new: &Manifest, base: &Manifest) -> Manifest {
    let held: HashMap<ChunkId, u32> = base
        .payloads
        .iter()
        .flat_map(|p| p.chunks.iter().map(|c| (c.id, c.stored_size)))
        .collect();
    let mut thin = new.clone();
    thin.base = Some(base_release(base));
    for c in thin.payloads.iter_mut().flat_map(|p| p.chunks.iter_mut()) {
        if let Some(&s) = held.get(&c.id) {
            c.stored_size = s;
        }
    }
    thin
}

/// Trains a zstd dictionary on blocks of the chunking's average size read at evenly
/// spaced offsets over the whole image (distinct, not all zero), at most
/// [`chunk::DICTIONARY_SAMPLE_BYTES_MAX`] of them: a sample of what the chunks hold
/// that costs a fraction of a pass over the image.
fn train_dictionary<R: Read + Seek>(
    image: &mut R,
    chunking: Chunking,
) -> io::Result<Option<Dictionary>> {
    let len = image.seek(io::SeekFrom::End(0))?;
    let block = u64::from(chunking.avg_size);
    let count = (chunk::DICTIONARY_SAMPLE_BYTES_MAX as u64 / block).min(len / block);
    let mut seen = HashSet::new();
    let mut data = Vec::new();
    let mut sizes = Vec::new();
    let mut buf = vec![0u8; block as usize];
    for i in 0..count {
        image.seek(io::SeekFrom::Start(i * (len / count.max(1))))?;
        image.read_exact(&mut buf)?;
        if buf.iter().all(|&b| b == 0) || !seen.insert(ChunkId::of(&buf)) {
            continue;
        }
        data.extend_from_slice(&buf);
        sizes.push(buf.len());
    }
    Ok(Dictionary::train(&data, &sizes, chunk::DICTIONARY_SIZE))
}

/// Why adding a signature failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The artifact could not be read or rewritten.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The artifact's envelope or manifest is unreadable.
    #[error(transparent)]
    Read(#[from] crate::read::ReadError),
}

/// Adds `keys`' signatures to the artifact at `path`, replacing its envelope member
/// atomically (a temporary file in the same directory, fsync, rename). The chunk
/// members are copied unchanged. An artifact whose manifest travels as a delta
/// needs its base manifest among `held`, and keeps travelling as a delta. Returns
/// the new number of signatures.
pub fn add_signatures(
    path: &Path,
    keys: &[SecretKey],
    held: &dyn HeldManifests,
) -> Result<usize, SignError> {
    let file = File::open(path)?;
    let permissions = file.metadata()?.permissions();
    let reader = crate::read::ArtifactReader::open_unverified_held(BufReader::new(file), held)?;
    let mut envelope = reader.envelope().clone();
    for key in keys {
        envelope.sign(key);
    }
    let count = envelope.signatures.len();
    let (first_member, env_bytes) = match reader.manifest_delta_base() {
        Some(base) => {
            let base = held
                .manifest(base)
                .expect("the reader rebuilt the manifest against it");
            (
                MANIFEST_DELTA_MEMBER,
                ManifestDelta::new(&envelope, &base).to_bytes(),
            )
        }
        None => (ENVELOPE_MEMBER, envelope.to_bytes()),
    };
    let rest_offset = reader.offset();
    drop(reader);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    {
        let mut out = BufWriter::with_capacity(1 << 20, tmp.as_file());
        ustar::write_member(&mut out, first_member, &env_bytes)?;
        let mut src = File::open(path)?;
        src.seek(io::SeekFrom::Start(rest_offset))?;
        io::copy(&mut src, &mut out)?;
        out.flush()?;
    }
    tmp.as_file().set_permissions(permissions)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Data members close after 4 GiB of stored bytes, at a chunk boundary, so each
    /// stays under the 8 GiB an octal ustar size field holds; packs after 1 MiB or
    /// 4096 chunks. `artifact_len` frames what the packer closes.
    #[test]
    fn data_members_close_after_4_gib_and_fit_an_octal_size() {
        let chunk = 4u32 << 20;
        let mut packer = Packer::of(Layout::Data);
        let mut closed = Vec::new();
        for _ in 0..2_100 {
            closed.extend(packer.push(chunk as usize));
        }
        closed.extend(packer.finish());
        assert_eq!(
            closed,
            [(1024, 4 << 30), (1024, 4 << 30), (52, 52 * (4 << 20))]
        );
        // Not on a 4 GiB boundary: the member takes the chunk that crosses it.
        let mut packer = Packer::of(Layout::Data);
        let first = std::iter::once(1000)
            .chain(std::iter::repeat_n(chunk as usize, 1100))
            .find_map(|s| packer.push(s));
        assert_eq!(first, Some((1025, 1000 + 1024 * (4 << 20))));
        let octal_max = (1u64 << 33) - 1;
        // A member closes after DATA_MEMBER_BYTES, with the chunk that crosses
        // it, whose stored form is at most `stored_size_max` of the largest chunk.
        let stored_max = crate::manifest::stored_size_max(crate::manifest::CHUNK_SIZE_MAX);
        assert!(DATA_MEMBER_BYTES + u64::from(stored_max) < octal_max);
        let len = artifact_len(
            1000,
            0,
            None,
            std::iter::repeat_n(chunk, 2_100),
            Layout::Data,
        );
        let members = member_len(4 << 30) * 2 + member_len(52 * (4 << 20));
        assert_eq!(len, member_len(1000) + members + 1024);
        // Packs, for comparison: one per 1 MiB (here one a chunk), and the table.
        let packs = artifact_len(
            1000,
            0,
            None,
            std::iter::repeat_n(1 << 20, 3),
            Layout::Packs {
                bytes: PACK_BYTES_DEFAULT,
            },
        );
        assert_eq!(
            packs,
            member_len(1000) + 3 * member_len(4 + (1 << 20)) + member_len(12) + 1024
        );
    }
}
