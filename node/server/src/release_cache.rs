//! Verified manifests of accepted releases, kept in memory once loaded: the chunk
//! endpoint checks every requested id against the deployment's release, and the
//! delta preview compares chunk sets, without reading the manifest file each time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use shoal_artifact::manifest::{ChunkId, Manifest};
use shoal_signing::TrustRoot;

/// One release's manifest and its chunks.
#[derive(Debug)]
pub struct Release {
    /// The verified manifest.
    pub manifest: Manifest,
    /// The signed envelope, as served to devices.
    pub envelope: Vec<u8>,
    /// Each distinct chunk's stored (compressed) size.
    pub chunks: HashMap<ChunkId, u32>,
}

/// Why a release could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The id is not 64 hex digits.
    #[error("release id is not 64 hex digits")]
    BadId,
    /// The manifest could not be read.
    #[error(transparent)]
    Storage(#[from] crate::chunks::ChunksError),
    /// The manifest is not stored.
    #[error("the manifest of release {0} is not in the chunk store")]
    Missing(String),
    /// The stored manifest does not verify.
    #[error("the manifest of release {id}: {source}")]
    Bad {
        /// The release.
        id: String,
        /// Why.
        source: shoal_artifact::ReadError,
    },
}

/// The cache.
#[derive(Debug, Default)]
pub struct ReleaseCache {
    map: Mutex<HashMap<String, Arc<Release>>>,
}

impl ReleaseCache {
    /// The release with manifest hash `id` (hex), loading and verifying it from the
    /// store on first use. Blocking: call from `spawn_blocking` on a miss.
    pub fn load(
        &self,
        store: &crate::chunks::Chunks,
        root: &TrustRoot,
        id: &str,
    ) -> Result<Arc<Release>, LoadError> {
        if let Some(r) = self.get(id) {
            return Ok(r);
        }
        let hash: ChunkId = id.parse().map_err(|_| LoadError::BadId)?;
        let envelope = store
            .envelope_blocking(&hash.0)?
            .ok_or_else(|| LoadError::Missing(id.to_owned()))?;
        let manifest = crate::chunks::verify_envelope(&envelope, root, None).map_err(|source| {
            LoadError::Bad {
                id: id.to_owned(),
                source,
            }
        })?;
        let chunks = manifest
            .distinct_chunks()
            .into_iter()
            .map(|c| (c.id, c.stored_size))
            .collect();
        let release = Arc::new(Release {
            manifest,
            envelope,
            chunks,
        });
        self.lock().insert(id.to_owned(), release.clone());
        Ok(release)
    }

    /// The release if it is loaded.
    pub fn get(&self, id: &str) -> Option<Arc<Release>> {
        self.lock().get(id).cloned()
    }

    /// Forgets a release (after it was deleted).
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Release>>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}
