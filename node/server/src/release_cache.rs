//! Verified manifests of accepted releases, kept in memory once loaded: the chunk
//! endpoint checks every requested id against the deployment's release, and the
//! delta preview compares chunk sets, without reading the manifest file each time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use shoal_artifact::ChunkStore;
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
    /// The manifest file could not be read or does not verify.
    #[error(transparent)]
    Store(#[from] shoal_artifact::StoreError),
    /// The manifest file could not be read.
    #[error("reading manifest {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
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
        store: &ChunkStore,
        root: &TrustRoot,
        id: &str,
    ) -> Result<Arc<Release>, LoadError> {
        if let Some(r) = self.get(id) {
            return Ok(r);
        }
        let hash: ChunkId = id.parse().map_err(|_| LoadError::BadId)?;
        let path = store.manifest_file(&hash.0);
        let manifest = store.load_manifest(&path, root, None)?;
        let envelope = std::fs::read(&path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
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
