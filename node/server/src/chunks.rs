//! Where the server keeps chunks, signed manifests and zstd dictionaries: a
//! [`ChunkStore`] directory (`DIR/store`, the default) or an S3 bucket through the
//! `object_store` crate (`--chunks s3://bucket/prefix`), in the same layout under
//! the prefix:
//!
//! ```text
//! PREFIX/chunks/<2 hex>/<64 hex>
//! PREFIX/manifests/<64 hex>.envelope
//! PREFIX/dictionaries/<8 hex>
//! ```
//!
//! so a static host or CDN in front of either serves it as it is (see the
//! server's `--chunk-base-url`). An upload verifies every chunk before it is
//! written, writes the chunks before the manifest that names them, and lists the
//! release only after all of it verified, whichever the backend.
//!
//! The S3 client is configured from the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` for S3-compatible
//! servers, `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint); requests are signed
//! with `ring` and TLS is rustls on `ring` (no aws-lc).

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use shoal_artifact::manifest::{ChunkId, Manifest};
use shoal_artifact::{ArtifactReader, ChunkStore, ReadError, StoreError};
use shoal_signing::{ENVELOPE_SIZE_MAX, Envelope, RoleName, TrustRoot};

/// Chunk uploads to S3 in flight at once during a release upload.
const PUTS_IN_FLIGHT: usize = 16;

/// Why a `--chunks` URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunksUrlError {
    /// Not `s3://`.
    #[error("{0:?}: only s3://BUCKET[/PREFIX] is supported (the default is DIR/store)")]
    Scheme(String),
    /// No bucket name.
    #[error("{0:?} names no bucket (s3://BUCKET[/PREFIX])")]
    NoBucket(String),
    /// The prefix is not a valid object path (empty segments, `.` or `..`).
    #[error("{url:?}: the prefix is not a valid object path: {reason}")]
    Prefix {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The S3 client could not be configured.
    #[error("configuring S3 for {url:?}: {reason}")]
    Client {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
}

/// An `s3://BUCKET[/PREFIX]` URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    /// The bucket.
    pub bucket: String,
    /// The key prefix (no leading or trailing `/`; may be empty).
    pub prefix: String,
}

impl S3Url {
    /// Parses `s3://BUCKET[/PREFIX]`.
    pub fn parse(url: &str) -> Result<S3Url, ChunksUrlError> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| ChunksUrlError::Scheme(url.to_owned()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(ChunksUrlError::NoBucket(url.to_owned()));
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            ObjectPath::parse(prefix).map_err(|e| ChunksUrlError::Prefix {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
            if prefix
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
            {
                return Err(ChunksUrlError::Prefix {
                    url: url.to_owned(),
                    reason: "empty, `.` or `..` segment".into(),
                });
            }
        }
        Ok(S3Url {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunksError {
    /// The directory store failed.
    #[error(transparent)]
    Dir(#[from] StoreError),
    /// A local file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The object store failed.
    #[error("object store: {0}")]
    Object(#[from] object_store::Error),
    /// An object is larger than it may be.
    #[error("{key} is {size} bytes, more than {max}")]
    TooLarge {
        /// Its key.
        key: String,
        /// Its size.
        size: u64,
        /// The bound.
        max: u64,
    },
}

/// Why an uploaded artifact was not added.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The artifact was refused (signatures, a corrupt chunk, a thin artifact
    /// whose base is not stored, ...): the client's fault.
    #[error(transparent)]
    Refused(StoreError),
    /// Storing failed: the server's fault (or its storage's).
    #[error("chunk storage: {0}")]
    Storage(String),
}

/// What adding an artifact did.
#[derive(Debug, Clone)]
pub struct Added {
    /// The release added.
    pub manifest: Manifest,
    /// Chunks written (new to the store).
    pub chunks_added: u64,
    /// Chunks the store already had.
    pub chunks_present: u64,
}

/// What pruning a release's per-base encodings removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Objects (records and indexes) removed.
    pub objects: u64,
}

/// An S3 bucket (prefix) holding the chunk store layout.
#[derive(Debug, Clone)]
pub struct ObjectChunks {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
}

/// The server's chunk storage.
#[derive(Debug, Clone)]
pub enum Chunks {
    /// A local directory (`DIR/store`).
    Dir(ChunkStore),
    /// An object store.
    Object(ObjectChunks),
}

impl ObjectChunks {
    /// Opens `s3://BUCKET[/PREFIX]`, configured from the `AWS_*` environment.
    pub fn open(url: &str) -> Result<ObjectChunks, ChunksUrlError> {
        let parsed = S3Url::parse(url)?;
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&parsed.bucket)
            .build()
            .map_err(|e| ChunksUrlError::Client {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(ObjectChunks {
            store: Arc::new(store),
            prefix: parsed.prefix,
            url: url.to_owned(),
        })
    }

    /// The store's URL, as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, rel: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn chunk_key(id: &ChunkId) -> String {
        shoal_artifact::read::chunk_path(id)
    }

    fn manifest_key(hash: &[u8; 32]) -> String {
        format!("manifests/{}.envelope", hex::encode(hash))
    }

    fn dictionary_key(zstd_id: u32) -> String {
        format!("dictionaries/{zstd_id:08x}")
    }

    /// An object's bytes (at most `max`), or `None` if there is none.
    async fn get(&self, rel: &str, max: u64) -> Result<Option<Bytes>, ChunksError> {
        let key = self.key(rel);
        match self.store.get(&key).await {
            Ok(r) => {
                if r.meta.size > max {
                    return Err(ChunksError::TooLarge {
                        key: key.to_string(),
                        size: r.meta.size,
                        max,
                    });
                }
                Ok(Some(r.bytes().await?))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn size(&self, rel: &str) -> Result<Option<u64>, ChunksError> {
        match self.store.head(&self.key(rel)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn put(&self, rel: &str, bytes: Bytes) -> Result<(), ChunksError> {
        self.store
            .put(&self.key(rel), PutPayload::from_bytes(bytes))
            .await?;
        Ok(())
    }

    async fn delete(&self, rel: &str) -> Result<(), ChunksError> {
        match self.store.delete(&self.key(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The keys (relative to the prefix) of every object under `rel` (a directory
    /// of the layout, ending in `/`).
    async fn list(&self, rel: &str) -> Result<Vec<String>, ChunksError> {
        use futures_util::TryStreamExt;
        let dir = self.key(rel.trim_end_matches('/'));
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let metas: Vec<object_store::ObjectMeta> =
            self.store.list(Some(&dir)).try_collect().await?;
        Ok(metas
            .into_iter()
            .filter_map(|m| m.location.as_ref().strip_prefix(&strip).map(str::to_owned))
            .collect())
    }

    /// Verifies an artifact against `root` and writes what the bucket lacks, chunks
    /// before the manifest. Blocking: runs the reader on this thread and the
    /// uploads on `rt`.
    fn add_artifact<R: Read>(
        &self,
        rt: &tokio::runtime::Handle,
        src: R,
        root: &TrustRoot,
        now_unix_s: Option<u64>,
    ) -> Result<Added, AddError> {
        let storage = |e: ChunksError| AddError::Storage(e.to_string());
        let refused = |e: ReadError| AddError::Refused(StoreError::Artifact(e));
        let mut reader = ArtifactReader::open(src, root, now_unix_s).map_err(refused)?;
        if let Some(b) = reader.manifest().base.clone() {
            let key = Self::manifest_key(&b.manifest_hash);
            let bytes = rt
                .block_on(self.get(&key, ENVELOPE_SIZE_MAX as u64))
                .map_err(storage)?
                .ok_or_else(|| {
                    AddError::Refused(StoreError::BaseMissing {
                        base: format!("{} {}", b.name, b.version),
                    })
                })?;
            let base = verify_envelope(&bytes, root, now_unix_s).map_err(|source| {
                AddError::Refused(StoreError::BadManifest {
                    path: PathBuf::from(self.key(&key).to_string()),
                    source,
                })
            })?;
            reader.set_base(&base);
        }
        let (mut added, mut present) = (0u64, 0u64);
        let mut seen = HashSet::new();
        let mut have_dictionary = false;
        let mut puts: std::collections::VecDeque<tokio::task::JoinHandle<Result<(), ChunksError>>> =
            std::collections::VecDeque::new();
        let wait_one = |puts: &mut std::collections::VecDeque<
            tokio::task::JoinHandle<Result<(), ChunksError>>,
        >| {
            if let Some(h) = puts.pop_front() {
                rt.block_on(h)
                    .map_err(|e| AddError::Storage(e.to_string()))?
                    .map_err(storage)?;
            }
            Ok::<(), AddError>(())
        };
        let result = (|| {
            while let Some(raw) = reader.next_raw().map_err(refused)? {
                if !have_dictionary && let Some(d) = reader.dictionary() {
                    let key = Self::dictionary_key(d.zstd_id);
                    if rt.block_on(self.size(&key)).map_err(storage)?.is_none() {
                        rt.block_on(self.put(&key, Bytes::copy_from_slice(d.bytes())))
                            .map_err(storage)?;
                    }
                    have_dictionary = true;
                }
                raw.verify().map_err(|e| refused(ReadError::from(e)))?;
                let id = raw.chunk.id;
                seen.insert(id);
                let key = Self::chunk_key(&id);
                if rt.block_on(self.size(&key)).map_err(storage)?.is_some() {
                    present += 1;
                    continue;
                }
                while puts.len() >= PUTS_IN_FLIGHT {
                    wait_one(&mut puts)?;
                }
                let this = self.clone();
                let bytes = Bytes::copy_from_slice(raw.stored());
                puts.push_back(rt.spawn(async move { this.put(&key, bytes).await }));
                added += 1;
            }
            while !puts.is_empty() {
                wait_one(&mut puts)?;
            }
            Ok::<(), AddError>(())
        })();
        if let Err(e) = result {
            // Let the uploads in flight end before answering.
            for h in puts {
                let _ = rt.block_on(h);
            }
            return Err(e);
        }
        let manifest = reader.manifest().clone();
        // A thin artifact's other chunks must be in the bucket already.
        for c in manifest.distinct_chunks() {
            if seen.contains(&c.id) {
                continue;
            }
            if rt
                .block_on(self.size(&Self::chunk_key(&c.id)))
                .map_err(storage)?
                .is_none()
            {
                return Err(AddError::Refused(StoreError::MissingChunk {
                    id: c.id,
                    manifest: format!("{} {}", manifest.name, manifest.version),
                }));
            }
        }
        rt.block_on(self.put(
            &Self::manifest_key(&manifest.hash()),
            Bytes::from(reader.envelope().to_bytes()),
        ))
        .map_err(storage)?;
        Ok(Added {
            manifest,
            chunks_added: added,
            chunks_present: present,
        })
    }
}

/// Verifies a signed manifest envelope against `root`.
pub fn verify_envelope(
    bytes: &[u8],
    root: &TrustRoot,
    now_unix_s: Option<u64>,
) -> Result<Manifest, ReadError> {
    if bytes.len() > ENVELOPE_SIZE_MAX {
        return Err(ReadError::EnvelopeTooLarge {
            size: bytes.len() as u64,
            max: ENVELOPE_SIZE_MAX,
        });
    }
    let env = Envelope::from_bytes(bytes)?;
    let signed = root.verify(RoleName::Release, &env, now_unix_s)?;
    Ok(Manifest::from_cbor(signed)?)
}

/// Where the delta record of chunk `id` against base release `base` is kept:
/// `deltas/<base hex>/<2 hex>/<64 hex>`, beside `chunks/` in the same layout.
pub fn delta_key(base: &[u8; 32], id: &ChunkId) -> String {
    let hex = id.to_hex();
    format!("deltas/{}/{}/{hex}", hex::encode(base), &hex[..2])
}

/// Where the per-base encoding index of `release` against `base` is kept.
pub fn delta_index_key(base: &[u8; 32], release: &[u8; 32]) -> String {
    format!(
        "deltas/{}/index/{}",
        hex::encode(base),
        hex::encode(release)
    )
}

impl Chunks {
    /// The largest stored chunk served.
    pub const STORED_MAX: u64 = shoal_artifact::manifest::CHUNK_SIZE_MAX as u64 + (1 << 20);

    /// What it is, for logs.
    pub fn describe(&self) -> String {
        match self {
            Chunks::Dir(s) => s.dir().display().to_string(),
            Chunks::Object(o) => o.url.clone(),
        }
    }

    /// A release's signed manifest envelope, or `None`. Blocking.
    pub fn envelope_blocking(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, ChunksError> {
        match self {
            Chunks::Dir(s) => {
                let path = s.manifest_file(hash);
                match std::fs::File::open(&path) {
                    Ok(f) => {
                        let mut buf = Vec::new();
                        f.take(ENVELOPE_SIZE_MAX as u64 + 1)
                            .read_to_end(&mut buf)
                            .map_err(|source| ChunksError::Io {
                                path: path.clone(),
                                source,
                            })?;
                        Ok(Some(buf))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(ChunksError::Io { path, source }),
                }
            }
            Chunks::Object(o) => tokio::runtime::Handle::current()
                .block_on(o.get(
                    &ObjectChunks::manifest_key(hash),
                    ENVELOPE_SIZE_MAX as u64 + 1,
                ))
                .map(|b| b.map(|b| b.to_vec())),
        }
    }

    /// A stored chunk's size in bytes, or `None` if it is not stored.
    pub async fn chunk_size(&self, id: &ChunkId) -> Result<Option<u64>, ChunksError> {
        match self {
            Chunks::Dir(s) => {
                let path = s.chunk_file(id);
                match tokio::fs::metadata(&path).await {
                    Ok(m) => Ok(Some(m.len())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(ChunksError::Io { path, source }),
                }
            }
            Chunks::Object(o) => o.size(&ObjectChunks::chunk_key(id)).await,
        }
    }

    /// A chunk's stored form, or `None`.
    pub async fn chunk(&self, id: &ChunkId) -> Result<Option<Bytes>, ChunksError> {
        match self {
            Chunks::Dir(s) => {
                let path = s.chunk_file(id);
                match tokio::fs::read(&path).await {
                    Ok(b) => Ok(Some(Bytes::from(b))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(ChunksError::Io { path, source }),
                }
            }
            Chunks::Object(o) => o.get(&ObjectChunks::chunk_key(id), Self::STORED_MAX).await,
        }
    }

    /// A zstd dictionary by its zstd id, or `None` (the directory store's
    /// `dictionaries/<8 hex>` is the object store's key too).
    pub async fn dictionary(&self, zstd_id: u32) -> Result<Option<Bytes>, ChunksError> {
        let max = shoal_artifact::chunk::DICTIONARY_SIZE_MAX as u64;
        self.read_rel(&ObjectChunks::dictionary_key(zstd_id), max)
            .await
    }

    /// The largest delta record kept or served (a frame of the largest chunk, its
    /// ranges and hash).
    pub const DELTA_MAX: u64 = Self::STORED_MAX + 128;

    /// The largest per-base encoding index read (a manifest holds at most 2^20
    /// distinct chunks; 36 bytes each).
    pub const DELTA_INDEX_MAX: u64 = 36 << 20;

    /// A per-base delta record of chunk `id` against base release `base`
    /// ([`shoal_artifact::delta_record`]), or `None`.
    pub async fn delta(&self, base: &[u8; 32], id: &ChunkId) -> Result<Option<Bytes>, ChunksError> {
        self.read_rel(&delta_key(base, id), Self::DELTA_MAX).await
    }

    /// A per-base delta record's size, or `None` if there is none.
    pub async fn delta_size(
        &self,
        base: &[u8; 32],
        id: &ChunkId,
    ) -> Result<Option<u64>, ChunksError> {
        let rel = delta_key(base, id);
        match self {
            Chunks::Dir(s) => {
                let path = s.dir().join(&rel);
                match tokio::fs::metadata(&path).await {
                    Ok(m) => Ok(Some(m.len())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(ChunksError::Io { path, source }),
                }
            }
            Chunks::Object(o) => o.size(&rel).await,
        }
    }

    /// The per-base encoding index of release `release` against base `base`: which
    /// chunks have a delta record, and each record's length (see [`DeltaIndex`]).
    pub async fn delta_index(
        &self,
        base: &[u8; 32],
        release: &[u8; 32],
    ) -> Result<Option<Bytes>, ChunksError> {
        self.read_rel(&delta_index_key(base, release), Self::DELTA_INDEX_MAX)
            .await
    }

    /// Stores a delta record (blocking).
    pub fn put_delta_blocking(
        &self,
        base: &[u8; 32],
        id: &ChunkId,
        bytes: Vec<u8>,
    ) -> Result<(), ChunksError> {
        self.write_rel_blocking(&delta_key(base, id), bytes)
    }

    /// Stores a per-base encoding index (blocking), after its records.
    pub fn put_delta_index_blocking(
        &self,
        base: &[u8; 32],
        release: &[u8; 32],
        bytes: Vec<u8>,
    ) -> Result<(), ChunksError> {
        self.write_rel_blocking(&delta_index_key(base, release), bytes)
    }

    /// An object of the store layout by its relative path (at most `max` bytes).
    async fn read_rel(&self, rel: &str, max: u64) -> Result<Option<Bytes>, ChunksError> {
        match self {
            Chunks::Dir(s) => {
                let path = s.dir().join(rel);
                match tokio::fs::read(&path).await {
                    Ok(b) if b.len() as u64 > max => Err(ChunksError::TooLarge {
                        key: path.display().to_string(),
                        size: b.len() as u64,
                        max,
                    }),
                    Ok(b) => Ok(Some(Bytes::from(b))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(ChunksError::Io { path, source }),
                }
            }
            Chunks::Object(o) => o.get(rel, max).await,
        }
    }

    /// Writes an object of the store layout (a file appears whole: written aside,
    /// synced, renamed). Blocking.
    fn write_rel_blocking(&self, rel: &str, bytes: Vec<u8>) -> Result<(), ChunksError> {
        match self {
            Chunks::Dir(s) => {
                let path = s.dir().join(rel);
                let io = |source| ChunksError::Io {
                    path: path.clone(),
                    source,
                };
                let dir = path.parent().expect("a store path has a parent");
                std::fs::create_dir_all(dir).map_err(io)?;
                let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
                std::io::Write::write_all(&mut tmp, &bytes).map_err(io)?;
                tmp.as_file().sync_all().map_err(io)?;
                tmp.persist(&path).map_err(|e| io(e.error))?;
                Ok(())
            }
            Chunks::Object(o) => {
                tokio::runtime::Handle::current().block_on(o.put(rel, Bytes::from(bytes)))
            }
        }
    }

    /// Verifies an artifact against `root` and adds its chunks and signed
    /// manifest. Blocking (call from `spawn_blocking`).
    pub fn add_artifact_blocking<R: Read>(
        &self,
        src: R,
        root: &TrustRoot,
        now_unix_s: Option<u64>,
    ) -> Result<Added, AddError> {
        match self {
            Chunks::Dir(s) => match s.add_artifact(src, root, now_unix_s) {
                Ok(r) => Ok(Added {
                    manifest: r.manifest,
                    chunks_added: r.chunks_added,
                    chunks_present: r.chunks_present,
                }),
                Err(e @ StoreError::Io { .. }) => Err(AddError::Storage(e.to_string())),
                Err(e) => Err(AddError::Refused(e)),
            },
            Chunks::Object(o) => {
                o.add_artifact(&tokio::runtime::Handle::current(), src, root, now_unix_s)
            }
        }
    }

    /// Removes every per-base encoding involving release `hash` (issue 12), as base
    /// and as target. Blocking. As a base: all of `deltas/<hash>/`. As a target,
    /// for each base B: `deltas/B/index/<hash>` first (a release has encodings
    /// exactly when its index exists), then the records it listed that no other
    /// index of B lists (records are shared by releases with the same chunk).
    pub fn prune_encodings_blocking(&self, hash: &[u8; 32]) -> Result<Pruned, ChunksError> {
        let rt = tokio::runtime::Handle::current();
        let mine = hex::encode(hash);
        let keys = self.list_rel_blocking(&rt, "deltas/")?;
        let mut out = Pruned::default();
        // deltas/<base>/... grouped by base.
        let mut by_base: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for k in &keys {
            let mut parts = k.splitn(3, '/');
            if let (Some("deltas"), Some(base), Some(_)) =
                (parts.next(), parts.next(), parts.next())
            {
                by_base.entry(base).or_default().push(k);
            }
        }
        for (base, keys) in by_base {
            if base == mine {
                for k in keys {
                    self.delete_rel_blocking(&rt, k)?;
                    out.objects += 1;
                }
                if let Chunks::Dir(s) = self {
                    let dir = s.dir().join("deltas").join(base);
                    match std::fs::remove_dir_all(&dir) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(source) => return Err(ChunksError::Io { path: dir, source }),
                    }
                }
                continue;
            }
            let index_prefix = format!("deltas/{base}/index/");
            let my_index = format!("{index_prefix}{mine}");
            if !keys.contains(&my_index.as_str()) {
                continue;
            }
            let listed = match rt.block_on(self.read_rel(&my_index, Self::DELTA_INDEX_MAX))? {
                Some(b) => crate::encodings::parse_index(&b).unwrap_or_default(),
                None => Default::default(),
            };
            self.delete_rel_blocking(&rt, &my_index)?;
            out.objects += 1;
            let mut kept = HashSet::new();
            for other in keys.iter().filter(|k| k.starts_with(&index_prefix)) {
                if *other == my_index {
                    continue;
                }
                if let Some(b) = rt.block_on(self.read_rel(other, Self::DELTA_INDEX_MAX))? {
                    match crate::encodings::parse_index(&b) {
                        Some(i) => kept.extend(i.into_keys()),
                        // Unreadable: keep every record of this base.
                        None => {
                            kept.extend(listed.keys().copied());
                        }
                    }
                }
            }
            let base_hash: [u8; 32] = match hex::decode(base).ok().and_then(|b| b.try_into().ok()) {
                Some(b) => b,
                None => continue,
            };
            for id in listed.keys().filter(|id| !kept.contains(*id)) {
                self.delete_rel_blocking(&rt, &delta_key(&base_hash, id))?;
                out.objects += 1;
            }
        }
        Ok(out)
    }

    /// Every object's relative key under `rel` (a directory of the layout ending
    /// in `/`; none if it does not exist). Blocking.
    fn list_rel_blocking(
        &self,
        rt: &tokio::runtime::Handle,
        rel: &str,
    ) -> Result<Vec<String>, ChunksError> {
        match self {
            Chunks::Dir(s) => {
                let mut out = Vec::new();
                let mut todo = vec![rel.trim_end_matches('/').to_owned()];
                while let Some(d) = todo.pop() {
                    let path = s.dir().join(&d);
                    let entries = match std::fs::read_dir(&path) {
                        Ok(e) => e,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(source) => return Err(ChunksError::Io { path, source }),
                    };
                    for e in entries {
                        let e = e.map_err(|source| ChunksError::Io {
                            path: path.clone(),
                            source,
                        })?;
                        let name = e.file_name().to_string_lossy().into_owned();
                        let child = format!("{d}/{name}");
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            todo.push(child);
                        } else {
                            out.push(child);
                        }
                    }
                }
                Ok(out)
            }
            Chunks::Object(o) => rt.block_on(o.list(rel)),
        }
    }

    /// Removes an object of the layout (absent is fine). Blocking.
    fn delete_rel_blocking(
        &self,
        rt: &tokio::runtime::Handle,
        rel: &str,
    ) -> Result<(), ChunksError> {
        match self {
            Chunks::Dir(s) => {
                let path = s.dir().join(rel);
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(source) => Err(ChunksError::Io { path, source }),
                }
            }
            Chunks::Object(o) => rt.block_on(o.delete(rel)),
        }
    }

    /// Removes a release's manifest. Blocking.
    pub fn remove_manifest_blocking(&self, hash: &[u8; 32]) -> Result<(), ChunksError> {
        match self {
            Chunks::Dir(s) => match std::fs::remove_file(s.manifest_file(hash)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ChunksError::Io {
                    path: s.manifest_file(hash),
                    source,
                }),
            },
            Chunks::Object(o) => tokio::runtime::Handle::current()
                .block_on(o.delete(&ObjectChunks::manifest_key(hash))),
        }
    }

    /// Removes chunks; returns how many were there. Blocking.
    pub fn remove_chunks_blocking<'a>(
        &self,
        ids: impl Iterator<Item = &'a ChunkId>,
    ) -> Result<usize, ChunksError> {
        let mut removed = 0;
        for id in ids {
            match self {
                Chunks::Dir(s) => {
                    if std::fs::remove_file(s.chunk_file(id)).is_ok() {
                        removed += 1;
                    }
                }
                Chunks::Object(o) => {
                    tokio::runtime::Handle::current()
                        .block_on(o.delete(&ObjectChunks::chunk_key(id)))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_parse() {
        assert_eq!(
            S3Url::parse("s3://fleet"),
            Ok(S3Url {
                bucket: "fleet".into(),
                prefix: String::new()
            })
        );
        assert_eq!(
            S3Url::parse("s3://fleet/prod/chunks/"),
            Ok(S3Url {
                bucket: "fleet".into(),
                prefix: "prod/chunks".into()
            })
        );
    }

    #[test]
    fn bad_s3_urls_are_refused_precisely() {
        assert_eq!(
            S3Url::parse("/var/lib/chunks"),
            Err(ChunksUrlError::Scheme("/var/lib/chunks".into()))
        );
        assert_eq!(
            S3Url::parse("gs://fleet"),
            Err(ChunksUrlError::Scheme("gs://fleet".into()))
        );
        assert_eq!(
            S3Url::parse("s3://"),
            Err(ChunksUrlError::NoBucket("s3://".into()))
        );
        assert_eq!(
            S3Url::parse("s3:///prefix"),
            Err(ChunksUrlError::NoBucket("s3:///prefix".into()))
        );
        assert!(matches!(
            S3Url::parse("s3://fleet/a//b"),
            Err(ChunksUrlError::Prefix { .. })
        ));
        assert!(matches!(
            S3Url::parse("s3://fleet/a/../b"),
            Err(ChunksUrlError::Prefix { .. })
        ));
    }
}

#[cfg(test)]
mod prune_tests {
    use super::*;

    fn listing(dir: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![dir.join("deltas")];
        while let Some(d) = todo.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.map(Result::unwrap) {
                if e.file_type().unwrap().is_dir() {
                    todo.push(e.path());
                } else {
                    out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
                }
            }
        }
        out.sort();
        out
    }

    fn index(ids: &[ChunkId]) -> Vec<u8> {
        ids.iter()
            .flat_map(|i| i.as_bytes().iter().copied().chain(100u32.to_be_bytes()))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn deleting_a_release_prunes_its_encodings_as_base_and_as_target() {
        let dir = tempfile::tempdir().unwrap();
        let store = Chunks::Dir(ChunkStore::open(dir.path()).unwrap());
        let (v1, v2, v3) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let (shared, only2, only3, on2) = (
            ChunkId([0xaa; 32]),
            ChunkId([0xbb; 32]),
            ChunkId([0xcc; 32]),
            ChunkId([0xdd; 32]),
        );
        let s = store.clone();
        tokio::task::spawn_blocking(move || {
            // v2 and v3 encoded against v1 (sharing a record), v3 against v2.
            for id in [shared, only2, only3] {
                s.put_delta_blocking(&v1, &id, vec![1; 9]).unwrap();
            }
            s.put_delta_index_blocking(&v1, &v2, index(&[shared, only2]))
                .unwrap();
            s.put_delta_index_blocking(&v1, &v3, index(&[shared, only3]))
                .unwrap();
            s.put_delta_blocking(&v2, &on2, vec![1; 9]).unwrap();
            s.put_delta_index_blocking(&v2, &v3, index(&[on2])).unwrap();
        })
        .await
        .unwrap();
        let before = listing(dir.path());
        assert_eq!(before.len(), 7, "{before:?}");

        // v2 goes: deltas/<v2>/ whole, its index against v1 and the record only it
        // listed; the record it shares with v3 stays.
        let s = store.clone();
        let pruned = tokio::task::spawn_blocking(move || s.prune_encodings_blocking(&v2))
            .await
            .unwrap()
            .unwrap();
        let h = hex::encode;
        let after = listing(dir.path());
        assert_eq!(
            after,
            vec![
                format!("deltas/{}/aa/{}", h(v1), shared.to_hex()),
                format!("deltas/{}/cc/{}", h(v1), only3.to_hex()),
                format!("deltas/{}/index/{}", h(v1), h(v3)),
            ],
            "{before:?}"
        );
        assert_eq!(pruned.objects, 4);
        assert!(!dir.path().join("deltas").join(h(v2)).exists());
        // v1 goes: nothing is left.
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.prune_encodings_blocking(&v1))
            .await
            .unwrap()
            .unwrap();
        assert!(listing(dir.path()).is_empty());
    }
}
