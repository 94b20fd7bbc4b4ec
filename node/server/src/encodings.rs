//! Per-base encodings (issue 12): a release's changed chunks delta-encoded against
//! the bytes of a base release devices run, so a device on that base downloads
//! about what a thin delta artifact holds instead of every changed chunk whole.
//!
//! **Where they come from.** The server queues them itself when a release is
//! uploaded or deployed, against the releases its devices run, and encodes them in
//! the background ([`crate::encode_jobs`]); an operator may also ask for them
//! (`POST /api/management/v1/releases/{id}/encodings` with `{"base": ID}`, or
//! `shoal admin release encode ID --base BASE`), typically for each release the
//! fleet runs (the delta preview lists them). The server rebuilds the base's
//! rootfs payload from its own chunk store into an unnamed temporary file, opens
//! it with the artifact crate's reference rules ([`shoal_artifact::delta::RefBase`]:
//! locality and similarity windows, the same as `shoal artifact build --base-image`),
//! and encodes each chunk the release has and the base lacks against its reference
//! at [`ZSTD_LEVEL_DELTA_MAX`]. A record is kept only when it is smaller than the
//! plain stored chunk. CPU is bounded: one encoding runs at a time per server
//! process ([`ENCODING`]); a second request waits its turn. Asking again is cheap:
//! records already stored are kept.
//!
//! **How they are stored.** Beside the plain chunks, in the same store (directory or
//! bucket): `deltas/<base>/<2 hex>/<64 hex>` holds a chunk's record
//! ([`shoal_artifact::delta_record`]), keyed by (base, chunk id), so releases that
//! share a chunk share its record; `deltas/<base>/index/<release>` lists, for one
//! release, the chunks that have a record and each record's length, written last
//! (a release has encodings against a base exactly when its index exists).
//!
//! **How they are served.** See `device::chunks`: a batch request that names the
//! base the device runs gets version-2 frames, each plain or delta.

use std::collections::HashMap;
use std::io::{BufWriter, Seek, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use shoal_artifact::chunk::{self, Dictionary, ZSTD_LEVEL_DELTA_MAX};
use shoal_artifact::delta::RefBase;
use shoal_artifact::delta_record::DeltaRecord;
use shoal_artifact::manifest::{ChunkId, ChunkRef, PayloadKind};

use crate::chunks::{Chunks, ChunksError};
use crate::release_cache::Release;

/// Held while an encoding runs: one at a time per server process.
pub static ENCODING: Mutex<()> = Mutex::new(());

/// Chunks encoded together (fetched, then encoded on all cores).
const BATCH: usize = 64;

/// Why a release could not be encoded against a base.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The release has no rootfs-image payload, or the base none of that name.
    #[error("{0}")]
    NoPayload(String),
    /// The store lacks a chunk (or its dictionary) a manifest lists.
    #[error("chunk {0} is missing from the store")]
    Missing(String),
    /// A stored chunk does not decode to its id.
    #[error("stored chunk {id}: {error}")]
    Corrupt {
        /// The chunk.
        id: ChunkId,
        /// Why.
        error: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] ChunksError),
    /// The temporary base image failed.
    #[error("the base image: {0}")]
    Io(#[from] std::io::Error),
    /// The base image is not the base (a store whose chunks changed).
    #[error("the base image: {0}")]
    Base(#[from] shoal_artifact::delta::BaseImageError),
}

/// What an encoding did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Encoded {
    /// Distinct chunks of the release that the base lacks.
    pub chunks: u64,
    /// Of those, the ones with a delta record (smaller than plain).
    pub chunks_delta: u64,
    /// Their plain stored bytes.
    pub plain_bytes: u64,
    /// What a device on the base downloads for them: records where there is one,
    /// plain chunks elsewhere.
    pub encoded_bytes: u64,
}

/// Encodes `release` against `base` and stores the records and the index.
/// Blocking: call from `spawn_blocking` (it uses the current tokio runtime for the
/// store).
pub fn encode_blocking(
    store: &Chunks,
    base: &Release,
    release: &Release,
) -> Result<Encoded, EncodeError> {
    let _one = ENCODING.lock().unwrap_or_else(|p| p.into_inner());
    let rt = tokio::runtime::Handle::current();
    let payload = release
        .manifest
        .payloads
        .iter()
        .find(|p| p.kind == PayloadKind::RootfsImage)
        .ok_or_else(|| {
            EncodeError::NoPayload(format!(
                "release {} {} has no rootfs-image payload",
                release.manifest.name, release.manifest.version
            ))
        })?;
    let base_payload = base.manifest.payload(&payload.name).ok_or_else(|| {
        EncodeError::NoPayload(format!(
            "the base release {} {} has no payload named {:?}",
            base.manifest.name, base.manifest.version, payload.name
        ))
    })?;
    let base_hash = base.manifest.hash();
    let mut dictionaries: HashMap<u32, Arc<Dictionary>> = HashMap::new();
    // The base payload, rebuilt from the store: what a device on the base holds in
    // its running slot from offset 0.
    let mut image = tempfile::tempfile()?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, &mut image);
        for c in &base_payload.chunks {
            w.write_all(&plain(store, &rt, &mut dictionaries, c)?)?;
        }
        w.flush()?;
    }
    image.rewind()?;
    let refbase = RefBase::open(image, &base.manifest, &payload.name)?;

    // The chunks to encode, first occurrences the base lacks, with the locality
    // anchor as `shoal artifact build --base-image` computes it.
    let mut todo: Vec<(ChunkRef, Option<u64>)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut anchor: Option<(u64, u64)> = None;
    for (offset, c) in payload.chunk_offsets() {
        let len = u64::from(c.size);
        if let Some(end) = refbase.held_end(&c.id) {
            anchor = Some((offset + len, end));
        }
        if refbase.held_end(&c.id).is_none() && seen.insert(c.id) {
            todo.push((
                *c,
                anchor.map(|(new_end, base_end)| base_end + (offset - new_end)),
            ));
        }
    }
    let mut out = Encoded::default();
    let mut index = Vec::new();
    for batch in todo.chunks(BATCH) {
        // (chunk, plain stored length, its bytes, an existing record)
        let mut work = Vec::with_capacity(batch.len());
        for (c, at) in batch {
            let stored = rt
                .block_on(store.chunk(&c.id))?
                .ok_or_else(|| EncodeError::Missing(c.id.to_hex()))?;
            let existing = rt.block_on(store.delta(&base_hash, &c.id))?;
            let data = decode(&stored, c, store, &rt, &mut dictionaries)?;
            work.push((*c, *at, stored.len() as u64, data, existing));
        }
        let records: Vec<Option<Vec<u8>>> = work
            .par_iter()
            .map(|(_, at, plain_len, data, existing)| {
                if let Some(e) = existing {
                    // Kept from an earlier encoding (of this or another release).
                    return Ok(Some(e.to_vec()));
                }
                let ranges = refbase.ranges(*at, data);
                if ranges.is_empty() {
                    return Ok(None);
                }
                let reference = refbase.read(&ranges)?;
                let record = DeltaRecord {
                    hash: *blake3::hash(&reference).as_bytes(),
                    frame: chunk::encode_against(data, ZSTD_LEVEL_DELTA_MAX, &reference),
                    ranges,
                }
                .to_bytes();
                Ok((record.len() as u64) < *plain_len).map(|smaller| smaller.then_some(record))
            })
            .collect::<Result<_, std::io::Error>>()?;
        for ((c, _, plain_len, _, existing), record) in work.into_iter().zip(records) {
            out.chunks += 1;
            out.plain_bytes += plain_len;
            match record {
                Some(r) => {
                    out.chunks_delta += 1;
                    out.encoded_bytes += r.len() as u64;
                    index.extend_from_slice(c.id.as_bytes());
                    index.extend_from_slice(&(r.len() as u32).to_be_bytes());
                    if existing.is_none() {
                        store.put_delta_blocking(&base_hash, &c.id, r)?;
                    }
                }
                None => out.encoded_bytes += plain_len,
            }
        }
    }
    store.put_delta_index_blocking(&base_hash, &release.manifest.hash(), index)?;
    Ok(out)
}

/// A chunk's plain bytes from the store, checked against its id.
fn plain(
    store: &Chunks,
    rt: &tokio::runtime::Handle,
    dictionaries: &mut HashMap<u32, Arc<Dictionary>>,
    c: &ChunkRef,
) -> Result<Vec<u8>, EncodeError> {
    let stored = rt
        .block_on(store.chunk(&c.id))?
        .ok_or_else(|| EncodeError::Missing(c.id.to_hex()))?;
    decode(&stored, c, store, rt, dictionaries)
}

fn decode(
    stored: &[u8],
    c: &ChunkRef,
    store: &Chunks,
    rt: &tokio::runtime::Handle,
    dictionaries: &mut HashMap<u32, Arc<Dictionary>>,
) -> Result<Vec<u8>, EncodeError> {
    let dict = match chunk::frame_dictionary_id(stored) {
        None => None,
        Some(zstd_id) => Some(match dictionaries.get(&zstd_id) {
            Some(d) => Arc::clone(d),
            None => {
                let bytes = rt
                    .block_on(store.dictionary(zstd_id))?
                    .ok_or_else(|| EncodeError::Missing(format!("dictionary {zstd_id:08x}")))?;
                let d = Arc::new(Dictionary::from_bytes(bytes.to_vec()).map_err(|e| {
                    EncodeError::Corrupt {
                        id: c.id,
                        error: format!("its dictionary {zstd_id:08x}: {e}"),
                    }
                })?);
                dictionaries.insert(zstd_id, Arc::clone(&d));
                d
            }
        }),
    };
    chunk::decode_with(stored, c, dict.as_deref()).map_err(|e| EncodeError::Corrupt {
        id: c.id,
        error: e.to_string(),
    })
}

/// Which chunks of a release have a record against a base, and each record's
/// length.
pub type DeltaIndex = HashMap<ChunkId, u32>;

/// Parses an index (`deltas/<base>/index/<release>`): 36-byte entries, the chunk
/// id then the record's length (`u32` BE), with the checks a device makes
/// ([`shoal_artifact::delta_record::parse_index`]). `None` when it is malformed.
pub fn parse_index(bytes: &[u8]) -> Option<DeltaIndex> {
    shoal_artifact::delta_record::parse_index(
        bytes,
        usize::MAX,
        u32::try_from(Chunks::DELTA_MAX).unwrap_or(u32::MAX),
    )
    .ok()
}

/// How long the absence of an index is believed (another server process on the
/// same store may write one).
const ABSENT_TTL: Duration = Duration::from_secs(10);

/// A cache key: the base's and the release's manifest hashes.
type BaseRelease = ([u8; 32], [u8; 32]);

/// A cache entry: when it was read, and the index (`None`: there was none).
type Cached = (Instant, Option<Arc<DeltaIndex>>);

/// Entries the index cache keeps at most.
const CACHE_ENTRIES_MAX: usize = 1024;

/// Indexes read from the store, by (base, release).
#[derive(Debug, Default)]
pub struct IndexCache {
    map: Mutex<HashMap<BaseRelease, Cached>>,
}

impl IndexCache {
    /// The index of `release` against `base`, read once (an absent one again after
    /// a while); `None` when there is none (the device gets plain chunks).
    pub async fn get(
        &self,
        store: &Chunks,
        base: &[u8; 32],
        release: &[u8; 32],
    ) -> Result<Option<Arc<DeltaIndex>>, ChunksError> {
        let key = (*base, *release);
        if let Some((at, v)) = self.map.lock().ok().and_then(|m| m.get(&key).cloned())
            && (v.is_some() || at.elapsed() < ABSENT_TTL)
        {
            return Ok(v);
        }
        let v = match store.delta_index(base, release).await? {
            Some(b) => match parse_index(&b) {
                Some(i) => Some(Arc::new(i)),
                None => {
                    tracing::error!(base = %hex::encode(base), release = %hex::encode(release), "malformed per-base encoding index; serving plain chunks");
                    None
                }
            },
            None => None,
        };
        if let Ok(mut m) = self.map.lock() {
            // Devices choose the bases they name: absences are forgotten before
            // they add up (an index found is one per encoding an operator made).
            if m.len() >= CACHE_ENTRIES_MAX {
                m.retain(|_, (_, v)| v.is_some());
                if m.len() >= CACHE_ENTRIES_MAX {
                    m.clear();
                }
            }
            m.insert(key, (Instant::now(), v.clone()));
        }
        Ok(v)
    }

    /// Forgets what is known of `hash` as a release or as a base (a deletion).
    pub fn forget_involving(&self, hash: &[u8; 32]) {
        if let Ok(mut m) = self.map.lock() {
            m.retain(|(b, r), _| r != hash && b != hash);
        }
    }

    /// Forgets what is known of `release` (after an encoding or a deletion).
    pub fn forget(&self, release: &[u8; 32]) {
        if let Ok(mut m) = self.map.lock() {
            m.retain(|(_, r), _| r != release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_parses_and_malformed_is_refused() {
        let mut b = [1u8; 32].to_vec();
        b.extend_from_slice(&77u32.to_be_bytes());
        let i = parse_index(&b).expect("valid");
        assert_eq!(i.get(&ChunkId([1; 32])), Some(&77));
        assert_eq!(parse_index(&[]).map(|i| i.len()), Some(0));
        assert!(parse_index(&b[..35]).is_none());
    }
}
