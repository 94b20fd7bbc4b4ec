//! Building `.shoal` artifacts from a payload image, and adding signatures to one.
//!
//! The build streams: a chunker thread cuts the image and hashes the whole payload,
//! batches of chunks are hashed and compressed on all cores (rayon), and each new
//! distinct chunk is appended to a pack member in a spool file. Only when the image is
//! done is the manifest known; the artifact is then written as the envelope member
//! followed by a copy of the spool. Memory is bounded by a few batches, whatever the
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
use crate::manifest::{
    BaseRelease, ChunkId, ChunkRef, Chunking, FORMAT_VERSION, Manifest, ManifestError, Payload,
    PayloadKind,
};
use crate::read::{
    CONTENTS_MEMBER, DICTIONARY_MEMBER, ENVELOPE_MEMBER, PACK_CHUNKS_MAX, contents_bitmap,
    pack_path,
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
    /// Stored bytes after which a pack member is closed.
    pub pack_bytes: usize,
    /// Train a zstd dictionary on a sample of the chunks and compress with it (one
    /// more read of the image; see DESIGN.md for what it buys).
    pub dictionary: bool,
}

/// Default stored bytes per pack member: big enough that tar's per-member cost (a
/// 512-byte header and padding) is noise, small enough to stay a streaming unit.
pub const PACK_BYTES_DEFAULT: usize = 1024 * 1024;

/// A pack member being filled.
#[derive(Debug, Default)]
struct PackWriter {
    ids: Vec<ChunkId>,
    data: Vec<u8>,
    seq: u64,
}

impl PackWriter {
    fn push<W: Write>(
        &mut self,
        out: &mut W,
        id: ChunkId,
        stored: &[u8],
        limit: usize,
    ) -> io::Result<()> {
        self.ids.push(id);
        self.data.extend_from_slice(stored);
        if self.data.len() >= limit || self.ids.len() == PACK_CHUNKS_MAX {
            self.flush(out)?;
        }
        Ok(())
    }

    fn flush<W: Write>(&mut self, out: &mut W) -> io::Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let member = pack_member(&self.ids, &self.data);
        ustar::write_member(out, &pack_path(self.seq), &member)?;
        self.seq += 1;
        self.ids.clear();
        self.data.clear();
        Ok(())
    }
}

/// The data of a pack member: a little-endian u32 count, the chunk ids, then their
/// stored forms concatenated (`stored` is that concatenation).
pub fn pack_member(ids: &[ChunkId], stored: &[u8]) -> Vec<u8> {
    assert!(!ids.is_empty() && ids.len() <= PACK_CHUNKS_MAX);
    let mut out = Vec::with_capacity(4 + 32 * ids.len() + stored.len());
    out.extend_from_slice(&u32::try_from(ids.len()).expect("bounded").to_le_bytes());
    for id in ids {
        out.extend_from_slice(&id.0);
    }
    out.extend_from_slice(stored);
    out
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
            pack_bytes: PACK_BYTES_DEFAULT,
            dictionary: true,
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
    /// Size of the envelope member's data.
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
}

/// A batch of chunks cut by the chunker thread.
struct Batch {
    chunks: Vec<Vec<u8>>,
}

/// Builds an artifact from `image` into `out`, spooling chunk members in a
/// temporary file in `spool_dir`. `base` makes a thin artifact. `progress` is called
/// with payload bytes done.
pub fn build<R: Read + Seek + Send, W: Write>(
    mut image: R,
    opts: &BuildOptions,
    keys: &[SecretKey],
    base: Option<&Manifest>,
    spool_dir: &Path,
    out: W,
    mut progress: impl FnMut(u64),
) -> Result<BuildReport, BuildError> {
    if keys.is_empty() {
        return Err(BuildError::NoKey);
    }
    opts.chunking.validate()?;
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

    let dictionary = if opts.dictionary {
        let d = train_dictionary(&mut image, opts.chunking)?;
        image.rewind()?;
        d
    } else {
        None
    };
    let dict = dictionary.as_ref();
    let mut spool = BufWriter::with_capacity(1 << 20, tempfile::tempfile_in(spool_dir)?);
    let mut refs: Vec<ChunkRef> = Vec::new();
    let mut stored_of: HashMap<ChunkId, u32> = HashMap::new();
    let mut written: HashSet<ChunkId> = HashSet::new();
    let mut stored_bytes = 0u64;
    let mut pack = PackWriter::default();
    let level = opts.zstd_level;
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
            let mut batch_new = HashSet::new();
            for (i, id) in ids.iter().enumerate() {
                if !stored_of.contains_key(id) && !held.contains_key(id) && batch_new.insert(*id) {
                    todo.push(i);
                }
            }
            let encoded: Vec<Vec<u8>> = todo
                .par_iter()
                .map(|&i| chunk::encode_with(&batch.chunks[i], level, dict))
                .collect();
            for (&i, stored) in todo.iter().zip(&encoded) {
                let id = ids[i];
                pack.push(&mut spool, id, stored, opts.pack_bytes)?;
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
        Ok(cutter.join().expect("chunker thread panicked"))
    })?;
    if size == 0 {
        return Err(BuildError::EmptyImage);
    }

    let chunks_total = refs.len() as u64;
    let chunks_distinct = refs.iter().map(|c| c.id).collect::<HashSet<_>>().len() as u64;
    let manifest = Manifest {
        base: base.map(|b| BaseRelease {
            name: b.name.clone(),
            version: b.version.clone(),
            manifest_hash: b.hash(),
        }),
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
        }],
        provides: opts.provides.clone(),
        device_types: opts.device_types.clone(),
        format_version: FORMAT_VERSION,
        security_counter: opts.security_counter,
    };
    manifest.validate()?;
    let mut envelope = Envelope::new(manifest.to_cbor());
    for key in keys {
        envelope.sign(key);
    }
    let env_bytes = envelope.to_bytes();

    let mut spool = spool.into_inner().map_err(|e| e.into_error())?;
    spool.rewind()?;
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let mut artifact_len = ustar::write_member(&mut out, ENVELOPE_MEMBER, &env_bytes)?;
    if let Some(d) = dict {
        artifact_len += ustar::write_member(&mut out, DICTIONARY_MEMBER, d.bytes())?;
    }
    if base.is_some() {
        // Which chunks a thin artifact holds, so a device can tell before it writes
        // anything whether it has the rest.
        let bits = contents_bitmap(&manifest.distinct_chunks(), |id| written.contains(id));
        artifact_len += ustar::write_member(&mut out, CONTENTS_MEMBER, &bits)?;
    }
    artifact_len += io::copy(&mut BufReader::with_capacity(1 << 20, spool), &mut out)?;
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
    })
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
/// members are copied unchanged. Returns the new number of signatures.
pub fn add_signatures(path: &Path, keys: &[SecretKey]) -> Result<usize, SignError> {
    let file = File::open(path)?;
    let permissions = file.metadata()?.permissions();
    let reader = crate::read::ArtifactReader::open_unverified(BufReader::new(file))?;
    let mut envelope = reader.envelope().clone();
    for key in keys {
        envelope.sign(key);
    }
    let count = envelope.signatures.len();
    let env_bytes = envelope.to_bytes();
    let rest_offset = reader.offset();
    drop(reader);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    {
        let mut out = BufWriter::with_capacity(1 << 20, tmp.as_file());
        ustar::write_member(&mut out, ENVELOPE_MEMBER, &env_bytes)?;
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
