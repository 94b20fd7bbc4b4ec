//! The base release's payload as a file (an image of it), for reading a delta
//! artifact away from a device: the bytes its delta-encoded chunks are encoded
//! against ([`ReferenceSource`]), and the chunks a thin artifact leaves out.
//!
//! Nothing read here is trusted: a chunk decoded against these bytes is hashed
//! against its id, and so is every base chunk read.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::manifest::{ChunkId, ChunkRef, Manifest, Reference, ReferenceBytes};
use crate::read::ReferenceSource;

/// Reference bytes kept for the next chunks (neighbouring chunks share
/// references).
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// An image of a base release's payload.
#[derive(Debug)]
pub struct BaseImage {
    file: File,
    len: u64,
    /// Recently used references, most recent last.
    cache: VecDeque<ReferenceBytes>,
    /// Where each chunk of the base payload is, when the base manifest was given.
    offsets: HashMap<ChunkId, u64>,
}

/// Why a base chunk could not be had from a base image.
#[derive(Debug, thiserror::Error)]
pub enum BaseChunkError {
    /// The base manifest does not list the chunk (or was not given).
    #[error("chunk {0} is not in the base release's payload")]
    NotInBase(ChunkId),
    /// Reading it failed (or the image is shorter than the base payload).
    #[error("reading chunk {id} at byte {offset} of the base image: {source}")]
    Io {
        /// The chunk.
        id: ChunkId,
        /// Where the base manifest puts it.
        offset: u64,
        /// Why.
        source: io::Error,
    },
    /// The image's bytes there are not the chunk: it is not the base release's
    /// payload.
    #[error(
        "chunk {id} at byte {offset} of the base image hashes to {actual}: the image is not the base release's payload"
    )]
    Hash {
        /// The chunk.
        id: ChunkId,
        /// Where the base manifest puts it.
        offset: u64,
        /// What the bytes there hash to.
        actual: ChunkId,
    },
}

impl BaseImage {
    /// Opens the image at `path`.
    pub fn open(path: &Path) -> io::Result<BaseImage> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(BaseImage {
            file,
            len,
            cache: VecDeque::new(),
            offsets: HashMap::new(),
        })
    }

    /// Locates the chunks of `base`'s payload `payload` in the image, for
    /// [`BaseImage::chunk`]. `false` when the base has no such payload.
    pub fn index(&mut self, base: &Manifest, payload: &str) -> bool {
        let Some(p) = base.payload(payload) else {
            return false;
        };
        for (offset, c) in p.chunk_offsets() {
            self.offsets.entry(c.id).or_insert(offset);
        }
        true
    }

    /// The bytes of base chunk `c`, read where the base manifest puts it and
    /// checked against its id.
    pub fn chunk(&self, c: &ChunkRef) -> Result<Vec<u8>, BaseChunkError> {
        let offset = *self
            .offsets
            .get(&c.id)
            .ok_or(BaseChunkError::NotInBase(c.id))?;
        let mut data = vec![0u8; c.size as usize];
        self.read_at(offset, &mut data)
            .map_err(|source| BaseChunkError::Io {
                id: c.id,
                offset,
                source,
            })?;
        let actual = ChunkId::of(&data);
        if actual != c.id {
            return Err(BaseChunkError::Hash {
                id: c.id,
                offset,
                actual,
            });
        }
        Ok(data)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("past the end of the image ({} bytes)", self.len),
            ));
        }
        self.file.read_exact_at(buf, offset)
    }
}

impl ReferenceSource for BaseImage {
    fn reference(&mut self, r: &Reference) -> io::Result<ReferenceBytes> {
        if let Some(i) = self.cache.iter().position(|b| b.hash() == &r.hash)
            && let Some(b) = self.cache.remove(i)
        {
            self.cache.push_back(b.clone());
            return Ok(b);
        }
        let len = usize::try_from(r.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "reference too large"))?;
        let mut bytes = vec![0u8; len];
        let mut at = 0;
        for &(offset, n) in &r.ranges {
            self.read_at(offset, &mut bytes[at..at + n as usize])?;
            at += n as usize;
        }
        let read = r
            .read(bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        while !self.cache.is_empty()
            && self.cache.iter().map(|b| b.bytes().len()).sum::<usize>() + len > CACHE_BYTES
        {
            self.cache.pop_front();
        }
        self.cache.push_back(read.clone());
        Ok(read)
    }
}
