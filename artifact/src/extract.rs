//! Reassembling a payload from a verified artifact stream.
//!
//! Chunks arrive in first-occurrence order, so the payload is written front to back:
//! a chunk seen before is copied from where it was already written in the output, a
//! new one is the next artifact member, and (for a thin artifact) a chunk the base
//! release holds comes from a chunk store. Memory holds one chunk; the whole-payload
//! hash is checked at the end.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::base_image::{BaseChunkError, BaseImage};
use crate::manifest::{ChunkId, ChunkRef, Manifest};
use crate::read::{ArtifactReader, ReadError, ReferenceSource};
use crate::store::{ChunkStore, StoreError};

/// Where the chunks a thin artifact leaves out come from.
#[derive(Debug, Clone, Copy)]
pub enum BaseChunks<'a> {
    /// A chunk store holding the base release.
    Store(&'a ChunkStore),
    /// An image of the base release's payload, indexed with [`BaseImage::index`].
    Image(&'a BaseImage),
}

/// Why extraction failed.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The artifact was refused.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Writing or re-reading the output failed.
    #[error("writing the payload: {0}")]
    Io(#[from] io::Error),
    /// The manifest has no payload of that name.
    #[error("the release has no payload named {0:?}")]
    NoSuchPayload(String),
    /// Extracting one payload of a multi-payload release is not supported yet.
    #[error(
        "the release has {0} payloads; extracting from multi-payload releases is not supported"
    )]
    MultiplePayloads(usize),
    /// A thin artifact's base chunk could not be had from the store.
    #[error("chunk {id} of the base release: {source}")]
    Base {
        /// The chunk.
        id: ChunkId,
        /// Why the store could not provide it.
        source: Box<StoreError>,
    },
    /// A thin artifact's base chunk could not be had from the base image.
    #[error(transparent)]
    BaseImage(#[from] BaseChunkError),
    /// A thin artifact without a chunk store or image holding its base release.
    #[error(
        "thin artifact (base {0}): extracting it needs a chunk store holding the base release, or the base release's image"
    )]
    NeedsBase(String),
    /// The reassembled payload does not hash to the signed payload hash.
    #[error("reassembled payload hash does not match the manifest")]
    PayloadHash,
}

/// Writes the single payload of the artifact read by `reader` to `out` (which must be
/// empty, readable and writable). `base` provides chunks a thin artifact leaves out;
/// the reader must then have been opened with the base manifest
/// ([`ArtifactReader::open_with_base`]) so it knows which ones. `references` gives
/// the base bytes delta-encoded chunks are decoded with (without it they are
/// [`crate::ChunkError::NeedsReference`]). Returns the payload size.
pub fn extract<R: Read, F: Read + Write + Seek>(
    mut reader: ArtifactReader<R>,
    base: Option<(BaseChunks<'_>, &Manifest)>,
    mut references: Option<&mut (dyn ReferenceSource + '_)>,
    out: &mut F,
    mut progress: impl FnMut(u64),
) -> Result<u64, ExtractError> {
    let manifest = reader.manifest().clone();
    if manifest.payloads.len() != 1 {
        return Err(ExtractError::MultiplePayloads(manifest.payloads.len()));
    }
    let payload = &manifest.payloads[0];
    let held: HashSet<ChunkId> = match (&manifest.base, base) {
        (None, _) => HashSet::new(),
        (Some(_), Some((_, m))) => m
            .payloads
            .iter()
            .flat_map(|p| p.chunks.iter().map(|c| c.id))
            .collect(),
        (Some(b), None) => {
            return Err(ExtractError::NeedsBase(format!("{} {}", b.name, b.version)));
        }
    };
    let mut written: HashMap<ChunkId, u64> = HashMap::new();
    let mut hasher = blake3::Hasher::new();
    let mut buf = Vec::new();
    out.seek(SeekFrom::Start(0))?;
    for (offset, c) in payload.chunk_offsets() {
        let data: Vec<u8> = if let Some(&at) = written.get(&c.id) {
            // Copy from our own output; come back to the end afterwards.
            buf.resize(c.size as usize, 0);
            out.seek(SeekFrom::Start(at))?;
            out.read_exact(&mut buf)?;
            out.seek(SeekFrom::Start(offset))?;
            std::mem::take(&mut buf)
        } else if held.contains(&c.id) {
            match base.expect("held is empty without a base").0 {
                BaseChunks::Store(store) => store.get(c).map_err(|e| ExtractError::Base {
                    id: c.id,
                    source: Box::new(e),
                })?,
                BaseChunks::Image(image) => image.chunk(c)?,
            }
        } else {
            next_expected(&mut reader, c, references.as_deref_mut())?
        };
        hasher.update(&data);
        out.write_all(&data)?;
        written.entry(c.id).or_insert(offset);
        progress(u64::from(c.size));
        buf = data;
    }
    // The archive must end cleanly, with nothing missing or extra.
    if let Some(raw) = reader.next_raw()? {
        return Err(ReadError::OutOfOrder(raw.chunk.id).into());
    }
    out.flush()?;
    if *hasher.finalize().as_bytes() != payload.hash {
        return Err(ExtractError::PayloadHash);
    }
    Ok(payload.size)
}

/// The next chunk of the artifact, which must be `c` (the reader enforces order).
fn next_expected<R: Read>(
    reader: &mut ArtifactReader<R>,
    c: &ChunkRef,
    references: Option<&mut (dyn ReferenceSource + '_)>,
) -> Result<Vec<u8>, ExtractError> {
    match reader.next_chunk_with(references)? {
        Some((id, data)) if id == c.id => Ok(data),
        Some((id, _)) => Err(ReadError::OutOfOrder(id).into()),
        None => Err(ReadError::MissingChunk(c.id).into()),
    }
}
