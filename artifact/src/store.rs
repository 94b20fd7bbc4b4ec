//! Chunk stores: a plain directory that any static file server can serve.
//!
//! ```text
//! STORE/chunks/<2 hex>/<64 hex>        a chunk's stored form (zstd frame or raw)
//! STORE/manifests/<64 hex>.envelope    a signed manifest envelope, named by the
//!                                      BLAKE3 of its manifest CBOR
//! STORE/dictionaries/<8 hex>           a zstd dictionary chunks were compressed
//!                                      with, named by its (content-derived) zstd id
//! ```
//!
//! Files are written to a temporary name in the same directory and renamed, so a
//! reader (or a crash) never sees half a chunk under its final name; a manifest is
//! written only after every chunk it lists is in the store.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use shoal_signing::{
    ENVELOPE_SIZE_MAX, Envelope, EnvelopeLayout, EnvelopeRef, RoleName, TrustRoot,
};

use crate::chunk::{self, ChunkError, DICTIONARY_SIZE_MAX, Dictionary, DictionaryError};
use crate::manifest::{CHUNK_SIZE_MAX, ChunkId, ChunkRef, Manifest, stored_size_max};
use crate::read::{ArtifactReader, ReadError, chunk_path};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A store file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The artifact being added was refused.
    #[error(transparent)]
    Artifact(#[from] ReadError),
    /// A chunk the store should hold is not there.
    #[error("chunk {id} (listed by manifest {manifest}) is missing from the store")]
    MissingChunk {
        /// The chunk.
        id: ChunkId,
        /// The manifest file naming it.
        manifest: String,
    },
    /// A chunk file is corrupt.
    #[error("chunk file {path}: {source}")]
    BadChunk {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: ChunkError,
    },
    /// A chunk file is larger than any chunk's stored form may be.
    #[error("chunk file {path} is {size} bytes, more than any chunk may be")]
    ChunkFileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A file in the store that does not belong there.
    #[error("unexpected file in the store: {0}")]
    UnexpectedFile(PathBuf),
    /// A stored manifest is refused (bad envelope, signatures, or manifest).
    #[error("manifest {path}: {source}")]
    BadManifest {
        /// The file.
        path: PathBuf,
        /// Why.
        source: ReadError,
    },
    /// A stored manifest's path names something else than a regular file (a
    /// FIFO, a device, a directory; through a symlink or not): not read.
    #[error("manifest {0} is not a regular file")]
    NotAFile(PathBuf),
    /// A stored manifest's file name is not the hash of its manifest.
    #[error("manifest {0} is not named by its hash")]
    MisnamedManifest(PathBuf),
    /// A dictionary file is not a usable zstd dictionary.
    #[error("dictionary file {path}: {source}")]
    BadDictionary {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: DictionaryError,
    },
    /// A thin artifact whose base release is not in the store.
    #[error("thin artifact: its base release {base} is not in the store; add that first")]
    BaseMissing {
        /// The base, `name version`.
        base: String,
    },
}

/// What adding an artifact did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddReport {
    /// The release added.
    pub manifest: Manifest,
    /// Chunks written (new to the store).
    pub chunks_added: u64,
    /// Chunks the store already had.
    pub chunks_present: u64,
    /// Where the signed manifest was written.
    pub manifest_path: PathBuf,
}

/// What verifying a store checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Manifests verified.
    pub manifests: u64,
    /// Chunk files verified.
    pub chunks: u64,
    /// Stored bytes of the chunk files.
    pub stored_bytes: u64,
}

/// A chunk store directory.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    dir: PathBuf,
    /// The store's zstd dictionaries by zstd dictionary id, loaded on first need.
    dictionaries: Arc<Mutex<HashMap<u32, Dictionary>>>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ChunkStore {
    /// Opens the store at `dir`, creating its directories if missing.
    pub fn open(dir: &Path) -> Result<ChunkStore, StoreError> {
        for sub in ["chunks", "manifests", "dictionaries"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(ChunkStore {
            dir: dir.to_path_buf(),
            dictionaries: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Path of a zstd dictionary file, named by its zstd dictionary id (8 hex digits),
    /// which is what a chunk's zstd frame names. Shoal derives that id from the
    /// dictionary's content ([`Dictionary::from_bytes`] checks it).
    pub fn dictionary_file(&self, zstd_id: u32) -> PathBuf {
        self.dir.join("dictionaries").join(format!("{zstd_id:08x}"))
    }

    /// The store's dictionary with this zstd id, if it has one.
    pub fn dictionary(&self, zstd_id: u32) -> Result<Option<Dictionary>, StoreError> {
        let mut cache = self.dictionaries.lock().expect("dictionary cache lock");
        if let Some(d) = cache.get(&zstd_id) {
            return Ok(Some(d.clone()));
        }
        let path = self.dictionary_file(zstd_id);
        if !path.is_file() {
            return Ok(None);
        }
        let bytes = read_bounded(&path, DICTIONARY_SIZE_MAX as u64)?;
        let d = Dictionary::from_bytes(bytes).map_err(|source| StoreError::BadDictionary {
            path: path.clone(),
            source,
        })?;
        if d.zstd_id != zstd_id {
            return Err(StoreError::UnexpectedFile(path));
        }
        cache.insert(zstd_id, d.clone());
        Ok(Some(d))
    }

    /// Decodes a stored chunk with the store's dictionary its frame names (if any);
    /// `size` is the declared size, when known.
    fn decode(&self, stored: &[u8], id: ChunkId, size: Option<u32>) -> Result<Vec<u8>, StoreError> {
        let dict = match chunk::frame_dictionary_id(stored) {
            None => None,
            Some(z) => self.dictionary(z)?,
        };
        let r = match size {
            Some(size) => chunk::decode_with(
                stored,
                &ChunkRef {
                    id,
                    size,
                    stored_size: 0,
                },
                dict.as_ref(),
            ),
            None => chunk::decode_any_size(stored, id, dict.as_ref()),
        };
        r.map_err(|source| StoreError::BadChunk {
            path: self.chunk_file(&id),
            source,
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a chunk's file.
    pub fn chunk_file(&self, id: &ChunkId) -> PathBuf {
        self.dir.join(chunk_path(id))
    }

    /// Path of a manifest envelope file, named by the manifest's hash.
    pub fn manifest_file(&self, manifest_hash: &[u8; 32]) -> PathBuf {
        self.dir
            .join("manifests")
            .join(format!("{}.envelope", hex::encode(manifest_hash)))
    }

    /// Whether the store has a file for this chunk (not verified).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.chunk_file(id).is_file()
    }

    /// The chunk's stored form as in the store, bounded in size but **not verified**:
    /// what a server sends. Decode with [`chunk::decode`] before use.
    pub fn get_stored(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let path = self.chunk_file(id);
        let file = File::open(&path).map_err(io_err(&path))?;
        let max = u64::from(stored_size_max(CHUNK_SIZE_MAX));
        let size = file.metadata().map_err(io_err(&path))?.len();
        if size > max {
            return Err(StoreError::ChunkFileTooLarge { path, size });
        }
        let mut buf = Vec::with_capacity(size as usize);
        file.take(max + 1)
            .read_to_end(&mut buf)
            .map_err(io_err(&path))?;
        if buf.len() as u64 > max {
            return Err(StoreError::ChunkFileTooLarge {
                path,
                size: buf.len() as u64,
            });
        }
        Ok(buf)
    }

    /// The chunk's uncompressed bytes, decoded (bounded by `chunk.size`) and verified.
    pub fn get(&self, chunk: &ChunkRef) -> Result<Vec<u8>, StoreError> {
        let stored = self.get_stored(&chunk.id)?;
        self.decode(&stored, chunk.id, Some(chunk.size))
    }

    /// [`ChunkStore::get`] as a [`VerifiedChunk`](crate::VerifiedChunk), the proof
    /// the update engine takes (the bytes are hashed once, here).
    pub fn get_verified(&self, chunk: &ChunkRef) -> Result<crate::VerifiedChunk, StoreError> {
        let data = self.get(chunk)?;
        Ok(crate::VerifiedChunk::proven(*chunk, data))
    }

    /// Writes a chunk's stored form under its id (atomically; no-op if present).
    /// The caller must have verified it. Returns whether it was new.
    pub fn put_stored(&self, id: &ChunkId, stored: &[u8]) -> Result<bool, StoreError> {
        let path = self.chunk_file(id);
        if path.is_file() {
            return Ok(false);
        }
        write_atomic(&path, stored, false)?;
        Ok(true)
    }

    /// Verifies an artifact against `root` and adds its chunks and signed manifest.
    /// A thin artifact needs its base release's chunks in the store already.
    pub fn add_artifact<R: Read>(
        &self,
        src: R,
        root: &TrustRoot,
        now_unix_s: Option<u64>,
    ) -> Result<AddReport, StoreError> {
        // A manifest that travels as a delta is rebuilt against the store's.
        let mut reader = ArtifactReader::open_held(src, root, now_unix_s, None, self)?;
        if let Some(b) = reader.manifest().base.clone() {
            // Refuse a thin artifact up front, before writing anything, unless its base
            // is here; then the reader can check it holds exactly what the base lacks.
            let path = self.manifest_file(&b.manifest_hash);
            if !path.is_file() {
                return Err(StoreError::BaseMissing {
                    base: format!("{} {}", b.name, b.version),
                });
            }
            let base = self.load_manifest(&path, root, now_unix_s)?;
            reader.set_base(&base);
        }
        let (mut added, mut present) = (0u64, 0u64);
        let mut new_files = Vec::new();
        let mut have_dictionary = false;
        while let Some(raw) = reader.next_raw()? {
            if !have_dictionary && let Some(d) = reader.dictionary() {
                // The dictionary comes before every chunk that needs it.
                let path = self.dictionary_file(d.zstd_id);
                if !path.is_file() {
                    write_atomic(&path, d.bytes(), true)?;
                }
                have_dictionary = true;
            }
            let id = raw.chunk.id;
            if self.contains(&id) {
                present += 1;
                // Still verify: the artifact as a whole must be sound.
                raw.verify().map_err(ReadError::from)?;
                continue;
            }
            raw.verify().map_err(ReadError::from)?;
            if self.put_stored(&id, raw.stored())? {
                new_files.push(self.chunk_file(&id));
            }
            added += 1;
        }
        // Chunks are durable before the manifest that names them appears.
        for path in &new_files {
            File::open(path)
                .and_then(|f| f.sync_all())
                .map_err(io_err(path))?;
        }
        let manifest = reader.manifest().clone();
        let name = format!("{} {}", manifest.name, manifest.version);
        if let Some(c) = manifest
            .distinct_chunks()
            .into_iter()
            .find(|c| !self.contains(&c.id))
        {
            return Err(StoreError::MissingChunk {
                id: c.id,
                manifest: name,
            });
        }
        let manifest_path = self.manifest_file(&manifest.hash());
        write_atomic(&manifest_path, &reader.envelope().to_bytes(), true)?;
        Ok(AddReport {
            manifest,
            chunks_added: added,
            chunks_present: present,
            manifest_path,
        })
    }

    /// Verifies the store: every manifest against `root`, every chunk it lists present
    /// and intact, every chunk file named by the hash of its content.
    pub fn verify(
        &self,
        root: &TrustRoot,
        now_unix_s: Option<u64>,
    ) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport {
            manifests: 0,
            chunks: 0,
            stored_bytes: 0,
        };
        let mut checked: HashSet<ChunkId> = HashSet::new();
        let mdir = self.dir.join("manifests");
        for entry in sorted_dir(&mdir)? {
            let name = entry
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let Some(hash) = name
                .strip_suffix(".envelope")
                .and_then(|h| h.parse::<ChunkId>().ok())
            else {
                return Err(StoreError::UnexpectedFile(entry));
            };
            let manifest = self.load_manifest(&entry, root, now_unix_s)?;
            if manifest.hash() != hash.0 {
                return Err(StoreError::MisnamedManifest(entry));
            }
            for c in manifest.distinct_chunks() {
                if !checked.insert(c.id) {
                    continue;
                }
                if !self.contains(&c.id) {
                    return Err(StoreError::MissingChunk {
                        id: c.id,
                        manifest: name,
                    });
                }
                let stored = self.get_stored(&c.id)?;
                self.decode(&stored, c.id, Some(c.size))?;
                report.chunks += 1;
                report.stored_bytes += stored.len() as u64;
            }
            report.manifests += 1;
        }
        // Dictionaries: each valid and named by its (content-derived) zstd id.
        for path in sorted_dir(&self.dir.join("dictionaries"))? {
            let zstd_id = path
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| n.len() == 8)
                .and_then(|n| u32::from_str_radix(n, 16).ok())
                .filter(|z| self.dictionary_file(*z) == path);
            let Some(zstd_id) = zstd_id else {
                return Err(StoreError::UnexpectedFile(path));
            };
            self.dictionary(zstd_id)?;
        }
        // Chunk files no manifest lists: still named by the hash of their content.
        let cdir = self.dir.join("chunks");
        for sub in sorted_dir(&cdir)? {
            let ok = sub.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.len() == 2
                    && n.bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            });
            if !ok || !sub.is_dir() {
                return Err(StoreError::UnexpectedFile(sub));
            }
            for file in sorted_dir(&sub)? {
                let id = file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.parse::<ChunkId>().ok())
                    .filter(|id| self.chunk_file(id) == file);
                let Some(id) = id else {
                    return Err(StoreError::UnexpectedFile(file));
                };
                if checked.contains(&id) {
                    continue;
                }
                let stored = self.get_stored(&id)?;
                self.decode(&stored, id, None)?;
                report.chunks += 1;
                report.stored_bytes += stored.len() as u64;
            }
        }
        Ok(report)
    }

    /// Reads a stored manifest envelope and verifies it against `root`.
    pub fn load_manifest(
        &self,
        path: &Path,
        root: &TrustRoot,
        now_unix_s: Option<u64>,
    ) -> Result<Manifest, StoreError> {
        let (file, len) = open_envelope_file(path)?;
        // Its length read first (it may still grow: bounded below).
        let mut bytes = Vec::with_capacity(len.min(ENVELOPE_SIZE_MAX as u64 + 1) as usize);
        file.take(ENVELOPE_SIZE_MAX as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err(path))?;
        if bytes.len() > ENVELOPE_SIZE_MAX {
            return Err(StoreError::BadManifest {
                path: path.to_path_buf(),
                source: ReadError::EnvelopeTooLarge {
                    size: bytes.len() as u64,
                    max: ENVELOPE_SIZE_MAX,
                },
            });
        }
        verified_manifest(&bytes, path, root, now_unix_s)
    }

    /// A release of the store as its signed manifest describes it, read from the
    /// envelope file at `path` without holding it or its chunk list: the
    /// signatures are checked against `root` as the signed bytes are read (once,
    /// [`TrustRoot::verify_streamed`]), then the manifest is decoded from the file
    /// with its chunk list streamed past (sizes checked against the chunking and
    /// the payload, ids dropped), every field checked as
    /// [`Manifest::from_cbor`] checks it, with the same errors
    /// ([`StoreError::BadManifest`]). Returns its [`ReleaseHead`], enough to
    /// choose a release among the store's (name, version, device types, security
    /// counter, base, the manifest's hash), the rest dropped. Its canonical
    /// form is checked too ([`crate::ManifestError::NotCanonical`], as a whole
    /// decode refuses it); its references, which need its ids, are checked
    /// where the one chosen is verified whole, at its install.
    /// An envelope not laid out canonically is read once, exactly its length
    /// (bounded by [`ENVELOPE_SIZE_MAX`] before a byte is read), and decoded in
    /// place for the decoder's own error. A path that is not a regular file
    /// (a FIFO, a device, through a symlink or not) is [`StoreError::NotAFile`],
    /// nothing read from it.
    pub fn release_head(
        &self,
        path: &Path,
        root: &TrustRoot,
        now_unix_s: Option<u64>,
    ) -> Result<ReleaseHead, StoreError> {
        use std::os::unix::fs::FileExt as _;
        let bad = |source: ReadError| StoreError::BadManifest {
            path: path.to_path_buf(),
            source,
        };
        let (file, len) = open_envelope_file(path)?;
        if len > ENVELOPE_SIZE_MAX as u64 {
            return Err(bad(ReadError::EnvelopeTooLarge {
                size: len,
                max: ENVELOPE_SIZE_MAX,
            }));
        }
        let layout = EnvelopeLayout::locate(len, &mut |at, buf| file.read_exact_at(buf, at))
            .map_err(io_err(path))?;
        let Some(layout) = layout else {
            // Not laid out as a canonical envelope: the decoder's own error,
            // from exactly the file's bytes (at most the bound checked above),
            // read once and borrowed, not copied.
            let mut bytes = vec![0u8; len as usize];
            file.read_exact_at(&mut bytes, 0).map_err(io_err(path))?;
            // Decoded after all (`locate` and the decoder disagree): checked as
            // any envelope is.
            let manifest = verified_manifest(&bytes, path, root, now_unix_s)?;
            let manifest_hash = manifest.hash();
            let envelope_hash = *blake3::hash(&bytes).as_bytes();
            return Ok(ReleaseHead::of(
                path,
                manifest,
                manifest_hash,
                envelope_hash,
            ));
        };
        let mut signed = blake3::Hasher::new();
        // The whole file's hash too, as the signed bytes are read (what is
        // around them, the map's head and the signatures, is small).
        let mut envelope = blake3::Hasher::new();
        let signed_end = layout.signed_at + layout.signed_len;
        let verdict = root
            .verify_streamed(
                RoleName::Release,
                &layout.signatures,
                now_unix_s,
                |feed| -> io::Result<()> {
                    let mut head = vec![0u8; layout.signed_at as usize];
                    file.read_exact_at(&mut head, 0)?;
                    envelope.update(&head);
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut done = 0;
                    while done < layout.signed_len {
                        let n = (layout.signed_len - done).min(buf.len() as u64) as usize;
                        file.read_exact_at(&mut buf[..n], layout.signed_at + done)?;
                        signed.update(&buf[..n]);
                        envelope.update(&buf[..n]);
                        feed(&buf[..n]);
                        done += n as u64;
                    }
                    let mut tail = vec![0u8; (len - signed_end) as usize];
                    file.read_exact_at(&mut tail, signed_end)?;
                    envelope.update(&tail);
                    Ok(())
                },
            )
            .map_err(io_err(path))?;
        verdict.map_err(|e| bad(e.into()))?;
        let manifest_hash = *signed.finalize().as_bytes();
        let (streamed, crate::Discard) = Manifest::from_file_streaming(
            &file,
            layout.signed_at,
            layout.signed_len,
            &manifest_hash,
            crate::Discard,
        )
        .map_err(|e| bad(crate::read::manifest_error(e)))?;
        // Refused here as a whole decode refuses it, not only at the copy: one
        // manifest in two encodings is two hashes, which would look like two
        // releases to the pick.
        streamed
            .check_canonical()
            .map_err(|e| bad(crate::read::manifest_error(e)))?;
        Ok(ReleaseHead::of(
            path,
            streamed.into_manifest(),
            manifest_hash,
            *envelope.finalize().as_bytes(),
        ))
    }
}

/// The manifest of the envelope `bytes` (the file at `path`), its signatures
/// verified against `root`, decoded whole; borrowed, not copied (the signed
/// bytes are a slice of `bytes`).
fn verified_manifest(
    bytes: &[u8],
    path: &Path,
    root: &TrustRoot,
    now_unix_s: Option<u64>,
) -> Result<Manifest, StoreError> {
    let bad = |source: ReadError| StoreError::BadManifest {
        path: path.to_path_buf(),
        source,
    };
    let env = EnvelopeRef::from_bytes(bytes).map_err(|e| bad(e.into()))?;
    let signed = root
        .verify_ref(RoleName::Release, &env, now_unix_s)
        .map_err(|e| bad(e.into()))?;
    Manifest::from_cbor(signed).map_err(|e| bad(e.into()))
}

/// A release in a chunk store, from its signed manifest
/// ([`ChunkStore::release_head`]): what choosing among the store's releases
/// reads, and no more (no chunk list, no references, no payloads: a store may
/// hold many releases, each read before one is picked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseHead {
    /// The envelope file it was read from.
    pub path: PathBuf,
    /// The release's name.
    pub name: String,
    /// The release's version.
    pub version: String,
    /// The device types it may be installed on.
    pub device_types: Vec<String>,
    /// Its anti-rollback counter.
    pub security_counter: u64,
    /// For a thin release, the release it was built against.
    pub base: Option<crate::BaseRelease>,
    /// BLAKE3 of the signed manifest: the release's id.
    pub manifest_hash: [u8; 32],
    /// BLAKE3 of the whole envelope file as it was read: a copy of it made
    /// later is the file that was read if it hashes the same.
    pub envelope_hash: [u8; 32],
}

impl ReleaseHead {
    /// The head of `manifest`, moved out of it (the rest is dropped here).
    fn of(
        path: &Path,
        manifest: Manifest,
        manifest_hash: [u8; 32],
        envelope_hash: [u8; 32],
    ) -> ReleaseHead {
        let Manifest {
            base,
            name,
            version,
            device_types,
            security_counter,
            ..
        } = manifest;
        ReleaseHead {
            path: path.to_path_buf(),
            name,
            version,
            device_types,
            security_counter,
            base,
            manifest_hash,
            envelope_hash,
        }
    }
}

/// A stored envelope file opened for reading, with its length: a regular file
/// (through a symlink or not), or [`StoreError::NotAFile`]. Opened without
/// waiting (a FIFO would block the open until a writer came), then checked
/// on the open file, so what is read is what was checked.
fn open_envelope_file(path: &Path) -> Result<(File, u64), StoreError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(StoreError::NotAFile(path.to_path_buf()));
    }
    Ok((file, meta.len()))
}

/// The store's manifests (their signed bytes, found by hash; a manifest delta
/// rebuilt against one is verified as a whole).
impl crate::manifest_delta::HeldManifests for ChunkStore {
    fn manifest(&self, hash: &[u8; 32]) -> Option<Vec<u8>> {
        let bytes = read_bounded(&self.manifest_file(hash), ENVELOPE_SIZE_MAX as u64).ok()?;
        let env = Envelope::from_bytes(&bytes).ok()?;
        (blake3::hash(&env.signed).as_bytes() == hash).then_some(env.signed)
    }
}

/// Reads a whole file of at most `max` bytes.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, StoreError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut buf = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    if buf.len() as u64 > max {
        return Err(StoreError::ChunkFileTooLarge {
            path: path.to_path_buf(),
            size: buf.len() as u64,
        });
    }
    Ok(buf)
}

/// The entries of a directory, sorted, skipping our own temporary files.
fn sorted_dir(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let is_tmp = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(".tmp"));
        if !is_tmp {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `bytes` to `path` via a temporary file in the same directory and a rename.
fn write_atomic(path: &Path, bytes: &[u8], sync: bool) -> Result<(), StoreError> {
    let dir = path.parent().expect("store paths have a parent");
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    tmp.write_all(bytes).map_err(io_err(path))?;
    if sync {
        tmp.as_file().sync_all().map_err(io_err(path))?;
    }
    // Readable by a static file server, like any other file it serves.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(io_err(path))?;
    }
    tmp.persist(path).map_err(|e| StoreError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}
