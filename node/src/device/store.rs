//! The device store: the engine's index and journal in one redb file.
//!
//! Only metadata lives here — chunk data stays in the slots (redb files grow to about
//! twice the data for 64 KiB values). Tables:
//!
//! | table   | key                         | value                                   |
//! |---------|-----------------------------|-----------------------------------------|
//! | `meta`  | `active`, `floor`, `deployment`, `last`, `release.A/B`, `chunking.A/B` | CBOR or fixed-width bytes |
//! | `done`  | payload chunk index (`u32`) | `()` — the progress journal              |
//! | `index` | slot byte + chunk id (33 B) | `(offset u64, len u32)`                  |
//!
//! Every [`Output::Persist`](shoal_engine::Output::Persist) is one write transaction
//! with redb's default (immediate) durability: after `apply` returns the records
//! survive a power cut, and a cut during `apply` leaves none of them.
//!
//! The deployment's signed envelope (about 82 bytes a chunk: 35 MB for an 8 GiB
//! image) is not a redb value: redb holds a transaction's pages in memory until it
//! commits, which would be a second copy of it. It is a file,
//! `envelopes/<BLAKE3 of its bytes>.envelope` beside the store, written and synced
//! before the transaction that names it (`meta` key `envelope.file`) commits; a
//! file no record names (a cut between the two) is removed by the next envelope
//! record. Its hash is checked when it is read back.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_artifact::{ChunkId, Chunking};
use shoal_engine::{DeviceState, IndexReadError, IndexReader, Record, Slot, slot_ordinal};
#[cfg(test)]
use shoal_engine::{IndexedChunk, SlotIndex};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const DONE: TableDefinition<u32, ()> = TableDefinition::new("done");
const INDEX: TableDefinition<&[u8], (u64, u32)> = TableDefinition::new("index");

/// redb cache size.
const CACHE_BYTES: usize = 1024 * 1024;

/// Chunks of a slot index written in one transaction.
pub(super) const INDEX_BATCH: usize = 16 * 1024;

/// File name of the store in the data directory.
pub const FILE_NAME: &str = "shoal.redb";

/// Why the device store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another process has the store open.
    #[error("the device store {path} is in use by another shoal process")]
    Busy {
        /// The store file.
        path: PathBuf,
    },
    /// redb failed.
    #[error("device store {path}: {message}")]
    Db {
        /// The store file.
        path: PathBuf,
        /// redb's message.
        message: String,
    },
    /// A record in the store does not decode (the store is corrupt or from a newer
    /// version).
    #[error("device store {path}: record {key:?} is unreadable: {message}")]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// The record key.
        key: String,
        /// The decoder's message.
        message: String,
    },
}

/// The device store. See the module documentation.
#[derive(Debug)]
pub struct Store {
    db: Arc<Db>,
    /// The index readers' cached read snapshot ([`StoreIndexes`]): dropped by
    /// every commit, so that it neither goes stale nor keeps redb from reusing
    /// the pages later commits free.
    index_table: SharedIndexTable,
    path: PathBuf,
    /// Where envelopes are kept as files (`None`: a store on a test backend keeps
    /// them in redb).
    envelopes: Option<PathBuf>,
}

/// Directory of the envelope files, in the data directory.
const ENVELOPE_DIR: &str = "envelopes";

/// The redb database, opened for writing or (`shoal status`) only for reading.
enum Db {
    ReadWrite(Database),
    ReadOnly(redb::ReadOnlyDatabase),
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Db::ReadWrite(_) => "Db::ReadWrite",
            Db::ReadOnly(_) => "Db::ReadOnly",
        })
    }
}

impl Db {
    fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        match self {
            Db::ReadWrite(db) => db.begin_read(),
            Db::ReadOnly(db) => db.begin_read(),
        }
    }
}

fn slot_name(slot: Slot) -> &'static str {
    slot.as_str()
}

fn index_key(slot: Slot, id: &ChunkId) -> [u8; 33] {
    let mut key = [0u8; 33];
    key[0] = slot_name(slot).as_bytes()[0];
    key[1..].copy_from_slice(&id.0);
    key
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Dir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(FILE_NAME);
        if !path.exists() {
            create_atomically(data_dir, &path)?;
        }
        let db = match builder().open(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::Busy { path }),
            Err(e) => {
                return Err(StoreError::Db {
                    path,
                    message: e.to_string(),
                });
            }
        };
        let store = Store {
            db: Arc::new(Db::ReadWrite(db)),
            index_table: SharedIndexTable::default(),
            path,
            envelopes: Some(data_dir.join(ENVELOPE_DIR)),
        };
        // Create the tables so that readers never meet a missing one.
        store.write(|_| Ok(()))?;
        Ok(store)
    }

    /// Opens the store in `data_dir` only for reading, creating nothing: `None` when
    /// there is none yet (Shoal has not run on this device). A store left by a
    /// killed process or a power cut needs redb's repair first, which writes: then
    /// it is opened as every other command would open it, repaired, and read.
    pub fn open_read_only(data_dir: &Path) -> Result<Option<Store>, StoreError> {
        let path = data_dir.join(FILE_NAME);
        if !path.exists() {
            return Ok(None);
        }
        let db = match builder().open_read_only(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::RepairAborted) => return Store::open(data_dir).map(Some),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::Busy { path }),
            Err(e) => {
                return Err(StoreError::Db {
                    path,
                    message: e.to_string(),
                });
            }
        };
        Ok(Some(Store {
            db: Arc::new(Db::ReadOnly(db)),
            index_table: SharedIndexTable::default(),
            path,
            envelopes: Some(data_dir.join(ENVELOPE_DIR)),
        }))
    }

    /// A store kept by `backend` (tests: a disk that loses power), called `path` in
    /// errors.
    #[cfg(test)]
    pub(crate) fn open_with_backend(
        backend: impl redb::StorageBackend,
        path: PathBuf,
    ) -> Result<Store, StoreError> {
        let db = builder()
            .create_with_backend(backend)
            .map_err(|e| StoreError::Db {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let store = Store {
            db: Arc::new(Db::ReadWrite(db)),
            index_table: SharedIndexTable::default(),
            path,
            envelopes: None,
        };
        store.write(|_| Ok(()))?;
        Ok(store)
    }

    fn db_err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let Db::ReadWrite(db) = &*self.db else {
            return Err(self.db_err("opened read-only"));
        };
        let txn = db.begin_write().map_err(|e| self.db_err(e))?;
        (|| -> Result<(), redb::Error> {
            txn.open_table(META)?;
            txn.open_table(DONE)?;
            txn.open_table(INDEX)?;
            f(&txn)
        })()
        .map_err(|e| self.db_err(e))?;
        let committed = txn.commit().map_err(|e| self.db_err(e));
        // The snapshot read before this commit goes: the next lookup opens a
        // current one, and until then no read transaction holds back the pages
        // this and later commits free.
        *self
            .index_table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        committed
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(META).map_err(|e| self.db_err(e))?;
        let Some(v) = table.get(key).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        cbor4ii::serde::from_slice(v.value())
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                key: key.to_string(),
                message: shoal_signing::describe_cbor_error(&e),
            })
    }

    fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(META).map_err(|e| self.db_err(e))?;
        Ok(table
            .get(key)
            .map_err(|e| self.db_err(e))?
            .map(|v| v.value().to_vec()))
    }

    /// The deployment's signed envelope: its file, whose hash is checked, or (a
    /// store written before envelopes were files, or on a test backend) the redb
    /// value.
    fn envelope(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let (Some(dir), Some(name)) = (&self.envelopes, self.get_raw(ENVELOPE_FILE_KEY)?) else {
            return self.get_raw("envelope");
        };
        let corrupt = |message: String| StoreError::Corrupt {
            path: self.path.clone(),
            key: ENVELOPE_FILE_KEY.to_string(),
            message,
        };
        let hash: [u8; 32] = name
            .as_slice()
            .try_into()
            .map_err(|_| corrupt(format!("{} bytes, not a 32-byte hash", name.len())))?;
        let path = envelope_in(dir, &hash);
        let bytes = std::fs::read(&path)
            .map_err(|e| corrupt(format!("cannot read {}: {e}", path.display())))?;
        if *blake3::hash(&bytes).as_bytes() != hash {
            return Err(corrupt(format!(
                "{} does not hash to its name",
                path.display()
            )));
        }
        Ok(Some(bytes))
    }

    /// Writes `bytes` as the envelope file it is named by (synced, with its
    /// directory) unless it is there; returns its hash.
    fn write_envelope_file(&self, dir: &Path, bytes: &[u8]) -> Result<[u8; 32], StoreError> {
        let hash = *blake3::hash(bytes).as_bytes();
        let path = envelope_in(dir, &hash);
        let io = |source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
            return Ok(hash);
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(hash)
    }

    /// Stores a deployment's signed envelope before it is offered (synced, as a
    /// file named by the BLAKE3 of its bytes), so the engine need not hold it: a
    /// [`Record::EnvelopeStored`] with that hash then names it in the transaction
    /// that starts the deployment. A file no record names yet (a cut before the
    /// offer) is removed by the next envelope record, as after any cut between a
    /// file and its transaction. The envelope is encoded straight into the file
    /// (canonical CBOR, hashed as it is written, synced, then renamed to its
    /// hash), so its encoding is never in memory beside it: an 8 GiB image's
    /// envelope is 17.6 MB. The offer verifies it from the file
    /// ([`Store::open_stored_envelope`]) once the decoded envelope is dropped.
    /// `None` on a store that keeps no envelope files.
    pub fn put_envelope_encoded(
        &self,
        envelope: &shoal_signing::Envelope,
    ) -> Result<Option<[u8; 32]>, StoreError> {
        self.put_envelope_with(|out| {
            let mut ser = cbor4ii::serde::Serializer::new(cbor4ii::core::utils::IoWriter::new(out));
            serde::Serialize::serialize(envelope, &mut ser).map_err(|e| match e {
                cbor4ii::serde::EncodeError::Core(cbor4ii::core::error::EncodeError::Write(e)) => e,
                other => std::io::Error::other(other.to_string()),
            })
        })?
        .map(|r| r.map_err(|e| self.envelope_dir_error(e)))
        .transpose()
    }

    /// The error of an envelope file that could not be written.
    fn envelope_dir_error(&self, source: std::io::Error) -> StoreError {
        StoreError::Dir {
            path: self.envelopes.clone().unwrap_or_default(),
            source,
        }
    }

    /// [`Store::put_envelope_encoded`] for an envelope whose bytes `write` writes
    /// as it reads them (an artifact's envelope member:
    /// [`shoal_artifact::read::copy_envelope_member`]), hashed as they are
    /// written, synced, then renamed to their BLAKE3: the envelope is never in
    /// memory whole. Nothing in them is trusted: the offer verifies the file.
    /// `Ok(None)` on a store that keeps no envelope files (`write` is not
    /// called); `Ok(Some(Err(e)))` when `write` failed (no file is left).
    pub fn put_envelope_with<E>(
        &self,
        write: impl FnOnce(&mut dyn std::io::Write) -> Result<(), E>,
    ) -> Result<Option<Result<[u8; 32], E>>, StoreError> {
        let Some(dir) = &self.envelopes else {
            return Ok(None);
        };
        let io = |source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join("encoding.tmp");
        let (hash, len) = {
            let file = std::fs::File::create(&tmp).map_err(io)?;
            let mut out = HashingWriter {
                file: std::io::BufWriter::with_capacity(64 * 1024, file),
                hasher: blake3::Hasher::new(),
                len: 0,
            };
            if let Err(e) = write(&mut out) {
                drop(out);
                let _ = std::fs::remove_file(&tmp);
                return Ok(Some(Err(e)));
            }
            let file = out.file.into_inner().map_err(|e| io(e.into_error()))?;
            file.sync_all().map_err(io)?;
            (*out.hasher.finalize().as_bytes(), out.len)
        };
        let path = envelope_in(dir, &hash);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == len) {
            std::fs::remove_file(&tmp).map_err(io)?;
            return Ok(Some(Ok(hash)));
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(Some(Ok(hash)))
    }

    /// [`Store::put_envelope_encoded`] for an envelope received as bytes (from
    /// the server, a chunk store, a peer): written as they are (synced, then
    /// renamed to their BLAKE3), so the deployment names the file
    /// ([`Record::EnvelopeStored`]) instead of the store carrying a copy. Nothing
    /// in them is trusted: the offer verifies them. `None` on a store that keeps
    /// no envelope files.
    pub fn put_envelope_bytes(&self, bytes: &[u8]) -> Result<Option<[u8; 32]>, StoreError> {
        self.put_envelope_with(|out| out.write_all(bytes))?
            .map(|r| r.map_err(|e| self.envelope_dir_error(e)))
            .transpose()
    }

    /// The bytes of the envelope file [`Store::put_envelope_encoded`] wrote,
    /// checked against the hash that names it (nothing in it is trusted: they
    /// go to the offer, which verifies them).
    #[cfg(test)]
    pub fn stored_envelope(&self, hash: &[u8; 32]) -> Result<Vec<u8>, StoreError> {
        let dir = self
            .envelopes
            .as_deref()
            .expect("stored_envelope on a store that keeps envelope files");
        let path = envelope_in(dir, hash);
        let corrupt = |message: String| StoreError::Corrupt {
            path: self.path.clone(),
            key: ENVELOPE_FILE_KEY.to_string(),
            message,
        };
        let bytes = std::fs::read(&path)
            .map_err(|e| corrupt(format!("cannot read {}: {e}", path.display())))?;
        if *blake3::hash(&bytes).as_bytes() != *hash {
            return Err(corrupt(format!(
                "{} does not hash to its name",
                path.display()
            )));
        }
        Ok(bytes)
    }

    /// The envelope file [`Store::put_envelope_encoded`] wrote, open for reading,
    /// and its length: the engine verifies it as it reads it
    /// ([`shoal_engine::VerifiedRelease::verify_file`], which checks that it
    /// hashes to its name), so it is never in memory whole.
    pub fn open_stored_envelope(&self, hash: &[u8; 32]) -> Result<(File, u64), StoreError> {
        let dir = self
            .envelopes
            .as_deref()
            .expect("open_stored_envelope on a store that keeps envelope files");
        let path = envelope_in(dir, hash);
        let corrupt = |message: String| StoreError::Corrupt {
            path: self.path.clone(),
            key: ENVELOPE_FILE_KEY.to_string(),
            message,
        };
        let file = File::open(&path)
            .map_err(|e| corrupt(format!("cannot open {}: {e}", path.display())))?;
        let len = file
            .metadata()
            .map_err(|e| corrupt(format!("cannot read {}: {e}", path.display())))?
            .len();
        Ok((file, len))
    }

    /// Removes the envelope file [`Store::put_envelope_encoded`] wrote for a release that
    /// was then refused, unless a record names it (a deployment of the same
    /// release in progress). Best effort: a leftover costs disk, and the next
    /// envelope record removes it.
    pub fn forget_envelope(&self, hash: &[u8; 32]) {
        let Some(dir) = &self.envelopes else {
            return;
        };
        if let Ok(named) = self.get_raw(ENVELOPE_FILE_KEY)
            && named.as_deref() != Some(&hash[..])
        {
            let _ = std::fs::remove_file(envelope_in(dir, hash));
            let _ = std::fs::remove_file(chunk_ids_path(dir, hash));
        }
    }

    /// Where the chunk ids of the release whose stored envelope is named `hash`
    /// go while it is verified ([`shoal_engine::VerifiedRelease::verify_file`]):
    /// a file next to the envelope, `<hash>.ids`, 32 bytes a position, derived
    /// again by every offer (never trusted from an earlier run), removed with the
    /// envelope when the deployment ends. `None` on a store that keeps no
    /// envelope files.
    pub fn chunk_ids_writer(
        &self,
        hash: &[u8; 32],
    ) -> Result<Option<Box<dyn shoal_engine::ChunkIdWriter>>, StoreError> {
        let Some(dir) = &self.envelopes else {
            return Ok(None);
        };
        let writer =
            super::chunk_ids::IdsWriter::create(chunk_ids_path(dir, hash)).map_err(|source| {
                StoreError::Dir {
                    path: dir.to_path_buf(),
                    source,
                }
            })?;
        Ok(Some(Box::new(writer)))
    }

    /// Removes the envelope files other than `keep` (after the record that names
    /// `keep`, or none, committed).
    fn prune_envelope_files(dir: &Path, keep: Option<&[u8; 32]>) {
        // The envelope's chunk ids (an offer in this run wrote them) stay with it.
        let keep_ids = keep.map(|h| chunk_ids_path(dir, h));
        let keep = keep.map(|h| envelope_in(dir, h));
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if Some(&path) != keep.as_ref() && Some(&path) != keep_ids.as_ref() {
                // A leftover costs disk, not correctness: the next prune retries.
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Whether Shoal has recorded anything on this device yet.
    pub fn is_fresh(&self) -> Result<bool, StoreError> {
        Ok(self.get::<Slot>("active")?.is_none())
    }

    /// The engine's state; `active` is used when the store has not recorded one.
    pub fn load(&self, active: Slot, slot_capacity: [u64; 2]) -> Result<DeviceState, StoreError> {
        let mut state = DeviceState::fresh(active, slot_capacity);
        if let Some(a) = self.get::<Slot>("active")? {
            state.active = a;
        }
        state.floor = self.get::<u64>("floor")?.unwrap_or(0);
        for slot in Slot::ALL {
            state.releases[slot_ordinal(slot)] =
                self.get(&format!("release.{}", slot_name(slot)))?;
        }
        state.deployment = self.get("deployment")?;
        state.envelope = self.envelope()?.map(Into::into);
        state.wan_spent_bytes = self.get::<u64>("wan_spent")?.unwrap_or(0);
        state.last = self.get("last")?;
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let done = txn.open_table(DONE).map_err(|e| self.db_err(e))?;
        for entry in done.iter().map_err(|e| self.db_err(e))? {
            let (k, _) = entry.map_err(|e| self.db_err(e))?;
            state.journaled.push(k.value());
        }
        state.active_index = self.get(&format!("chunking.{}", slot_name(state.active)))?;
        state.indexes = Some(shoal_engine::IndexStore(Arc::new(self.index_reader())));
        Ok(state)
    }

    /// The slot indexes, read by id through redb read transactions (the engine
    /// holds none of them in memory).
    pub fn index_reader(&self) -> StoreIndexes {
        StoreIndexes {
            db: Arc::clone(&self.db),
            path: self.path.clone(),
            table: Arc::clone(&self.index_table),
        }
    }

    /// The chunk index recorded for `slot`, whole (tests compare it; the engine
    /// and the drivers read it by id: [`Store::index_reader`]).
    #[cfg(test)]
    pub fn slot_index(&self, slot: Slot) -> Result<Option<SlotIndex>, StoreError> {
        let Some(chunking) = self.get::<Chunking>(&format!("chunking.{}", slot_name(slot)))? else {
            return Ok(None);
        };
        let chunks = self.slot_index_entries(slot)?;
        Ok(Some(SlotIndex { chunking, chunks }))
    }

    /// The entries of `slot`'s index, by offset, whether or not its chunking
    /// was recorded (tests compare them).
    #[cfg(test)]
    pub fn slot_index_entries(&self, slot: Slot) -> Result<Vec<IndexedChunk>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(INDEX).map_err(|e| self.db_err(e))?;
        let lo = index_key(slot, &ChunkId([0; 32]));
        let hi = index_key(slot, &ChunkId([0xff; 32]));
        let mut chunks = Vec::new();
        for entry in table
            .range::<&[u8]>(&lo[..]..=&hi[..])
            .map_err(|e| self.db_err(e))?
        {
            let (k, v) = entry.map_err(|e| self.db_err(e))?;
            let key = k.value();
            let mut id = [0u8; 32];
            id.copy_from_slice(&key[1..33]);
            let (offset, len) = v.value();
            chunks.push(IndexedChunk {
                id: ChunkId(id),
                offset,
                len,
            });
        }
        chunks.sort_by_key(|c| c.offset);
        Ok(chunks)
    }

    /// Applies one [`Output::Persist`](shoal_engine::Output::Persist) atomically
    /// (a [`Record::ReleaseIndex`] is written right after it, see
    /// [`Store::write_release_index`]).
    pub fn apply(&self, records: &[Record]) -> Result<(), StoreError> {
        self.apply_one(records)?;
        for r in records {
            if let Record::ReleaseIndex { slot, release } = r {
                self.write_release_index(*slot, release)?;
            }
        }
        Ok(())
    }

    fn apply_one(&self, records: &[Record]) -> Result<(), StoreError> {
        // The envelope's file is durable before the transaction that names it.
        let mut envelope_file: Option<Option<[u8; 32]>> = None;
        if let Some(dir) = &self.envelopes {
            for r in records {
                match r {
                    Record::Envelope(e) => {
                        envelope_file = Some(match e {
                            Some(bytes) => Some(self.write_envelope_file(dir, bytes)?),
                            None => None,
                        });
                    }
                    // Stored by `put_envelope_encoded` before the offer: a record naming a
                    // file that is not there would leave a deployment without its
                    // envelope, so it is refused before the transaction.
                    Record::EnvelopeStored(hash) => {
                        let path = envelope_in(dir, hash);
                        if !path.is_file() {
                            return Err(StoreError::Corrupt {
                                path: self.path.clone(),
                                key: ENVELOPE_FILE_KEY.to_string(),
                                message: format!(
                                    "the stored envelope {} is missing",
                                    path.display()
                                ),
                            });
                        }
                        envelope_file = Some(Some(*hash));
                    }
                    _ => {}
                }
            }
        }
        self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            let mut done = txn.open_table(DONE)?;
            let mut index = txn.open_table(INDEX)?;
            let put = |meta: &mut redb::Table<&str, &[u8]>,
                       key: &str,
                       value: Option<&dyn ErasedCbor>|
             -> Result<(), redb::Error> {
                match value {
                    Some(v) => {
                        meta.insert(key, v.cbor().as_slice())?;
                    }
                    None => {
                        meta.remove(key)?;
                    }
                }
                Ok(())
            };
            for record in records {
                match record {
                    Record::Deployment(d) => put(
                        &mut meta,
                        "deployment",
                        d.as_ref().map(|d| d as &dyn ErasedCbor),
                    )?,
                    // Raw bytes (the signed envelope as offered), written once
                    // per deployment.
                    Record::Envelope(e) => match (e, &envelope_file) {
                        (_, Some(Some(hash))) => {
                            meta.remove("envelope")?;
                            meta.insert(ENVELOPE_FILE_KEY, &hash[..])?;
                        }
                        (Some(bytes), _) => {
                            meta.insert("envelope", &bytes[..])?;
                        }
                        (None, _) => {
                            meta.remove("envelope")?;
                            meta.remove(ENVELOPE_FILE_KEY)?;
                        }
                    },
                    // Checked above: its file is there (a store without envelope
                    // files never gets one: `put_envelope_encoded` returned `None`).
                    Record::EnvelopeStored(hash) => {
                        meta.remove("envelope")?;
                        meta.insert(ENVELOPE_FILE_KEY, &hash[..])?;
                    }
                    Record::WanSpent(bytes) => put(
                        &mut meta,
                        "wan_spent",
                        (*bytes != 0).then_some(bytes as &dyn ErasedCbor),
                    )?,
                    Record::ClearProgress => {
                        done.retain(|_, _| false)?;
                    }
                    Record::Journaled(list) => {
                        for &i in list {
                            done.insert(i, ())?;
                        }
                    }
                    Record::SlotRelease { slot, release } => put(
                        &mut meta,
                        &format!("release.{}", slot_name(*slot)),
                        release.as_ref().map(|r| r as &dyn ErasedCbor),
                    )?,
                    Record::SlotIndex { slot, index: new } => {
                        let lo = index_key(*slot, &ChunkId([0; 32]));
                        let hi = index_key(*slot, &ChunkId([0xff; 32]));
                        index.retain_in::<&[u8], _>(&lo[..]..=&hi[..], |_, _| false)?;
                        let key = format!("chunking.{}", slot_name(*slot));
                        match new {
                            Some(new) => {
                                put(&mut meta, &key, Some(&new.chunking))?;
                                // First occurrence of a chunk wins; inserted in key
                                // order, so the B-tree is appended to rather than
                                // written all over (its cache is small).
                                // Sorted as positions (4 bytes a chunk, not a
                                // second copy of the index); stable, so of one id
                                // the first in slot order comes first.
                                let mut order: Vec<u32> = (0..new.chunks.len() as u32).collect();
                                order.sort_by_key(|&k| new.chunks[k as usize].id);
                                order.dedup_by_key(|k| new.chunks[*k as usize].id);
                                for k in order {
                                    let c = &new.chunks[k as usize];
                                    index
                                        .insert(&index_key(*slot, &c.id)[..], (c.offset, c.len))?;
                                }
                            }
                            None => put(&mut meta, &key, None)?,
                        }
                    }
                    // Its entries were written before (`write_slot_index`).
                    Record::SlotIndexWritten { slot, chunking, .. } => put(
                        &mut meta,
                        &format!("chunking.{}", slot_name(*slot)),
                        Some(chunking),
                    )?,
                    // The slot's old index goes in this transaction; the new one
                    // is written after it (`write_release_index`).
                    Record::ReleaseIndex { slot, .. } => {
                        let lo = index_key(*slot, &ChunkId([0; 32]));
                        let hi = index_key(*slot, &ChunkId([0xff; 32]));
                        index.retain_in::<&[u8], _>(&lo[..]..=&hi[..], |_, _| false)?;
                        let key = format!("chunking.{}", slot_name(*slot));
                        put(&mut meta, &key, None)?;
                    }
                    Record::Unindex { slot, id } => {
                        index.remove(&index_key(*slot, id)[..])?;
                    }
                    Record::Active(slot) => put(&mut meta, "active", Some(slot))?,
                    Record::Floor(f) => put(&mut meta, "floor", Some(f))?,
                    Record::Last(o) => put(&mut meta, "last", Some(o))?,
                }
            }
            Ok(())
        })?;
        if let (Some(dir), Some(keep)) = (&self.envelopes, envelope_file) {
            Self::prune_envelope_files(dir, keep.as_ref());
        }
        Ok(())
    }

    /// Writes the index of a slot that now holds `release` (its chunk list, in id
    /// order, from the release's table), in transactions of [`INDEX_BATCH`]
    /// chunks: redb keeps a transaction's pages in memory until it commits, and an
    /// 8 GiB image has 430,000 chunks. The slot's chunking is recorded with the
    /// last batch, so an index cut short (a power cut between batches) is no index:
    /// the slot is cut again when it is needed (and its leftover entries are
    /// cleared then).
    fn write_release_index(
        &self,
        slot: Slot,
        release: &shoal_engine::VerifiedRelease,
    ) -> Result<(), StoreError> {
        let mut chunks = release.index_by_id().peekable();
        loop {
            let mut last = false;
            self.write(|txn| {
                let mut index = txn.open_table(INDEX)?;
                for c in chunks.by_ref().take(INDEX_BATCH) {
                    index.insert(&index_key(slot, &c.id)[..], (c.offset, c.len))?;
                }
                // An index whose ids could not all be read is no index (no
                // chunking recorded): the slot is cut again when it is needed.
                if chunks.peek().is_none() && release.chunk_ids_error().is_none() {
                    last = true;
                    let mut meta = txn.open_table(META)?;
                    let key = format!("chunking.{}", slot_name(slot));
                    meta.insert(key.as_str(), release.manifest().chunking.cbor().as_slice())?;
                }
                Ok(())
            })?;
            if let Some(message) = release.chunk_ids_error() {
                return Err(self.db_err(format!("the slot index was not written: {message}")));
            }
            if last {
                return Ok(());
            }
        }
    }

    /// Writes the chunks of a cut of `slot` (`(offset, id, len)` in slot order) as
    /// its index entries, for [`Input::SlotIndexWritten`](shoal_engine::Input::SlotIndexWritten):
    /// the slot's old index (entries and chunking) goes in the first transaction,
    /// then the chunks in transactions of [`INDEX_BATCH`] (redb keeps a
    /// transaction's pages in memory until it commits), each sorted by id so the
    /// B-tree is appended to in runs rather than written all over; of chunks with
    /// one id the first in slot order is kept. The chunking is not recorded here:
    /// the engine's [`Record::SlotIndexWritten`] does it, so entries cut short by a
    /// power cut (or that the engine did not take) are no index (and are cleared
    /// when the slot is next cut or installed to). Returns the entries written
    /// (distinct ids).
    pub fn write_slot_index(
        &self,
        slot: Slot,
        chunks: &[(u64, ChunkId, u32)],
    ) -> Result<u64, StoreError> {
        self.write_slot_index_from(slot, chunks.iter().copied())
    }

    /// [`Store::write_slot_index`] of entries as they come (from a list read by
    /// position, never whole in memory): [`INDEX_BATCH`] of them at a time.
    pub fn write_slot_index_from(
        &self,
        slot: Slot,
        chunks: impl IntoIterator<Item = (u64, ChunkId, u32)>,
    ) -> Result<u64, StoreError> {
        self.write(|txn| {
            let mut index = txn.open_table(INDEX)?;
            let lo = index_key(slot, &ChunkId([0; 32]));
            let hi = index_key(slot, &ChunkId([0xff; 32]));
            index.retain_in::<&[u8], _>(&lo[..]..=&hi[..], |_, _| false)?;
            txn.open_table(META)?
                .remove(format!("chunking.{}", slot_name(slot)).as_str())?;
            Ok(())
        })?;
        let mut written = 0u64;
        let mut order: Vec<u32> = Vec::new();
        let mut chunks = chunks.into_iter().peekable();
        let mut batch: Vec<(u64, ChunkId, u32)> = Vec::new();
        while chunks.peek().is_some() {
            batch.clear();
            batch.extend(chunks.by_ref().take(INDEX_BATCH));
            let batch = &batch[..];
            order.clear();
            order.extend(0..batch.len() as u32);
            // Stable: of one id, the first in slot order comes first.
            order.sort_by_key(|&k| batch[k as usize].1);
            self.write(|txn| {
                let mut index = txn.open_table(INDEX)?;
                for &k in &order {
                    let (offset, id, len) = batch[k as usize];
                    let key = index_key(slot, &id);
                    if index.get(&key[..])?.is_none() {
                        index.insert(&key[..], (offset, len))?;
                        written += 1;
                    }
                }
                Ok(())
            })?;
        }
        Ok(written)
    }

    /// Records the running slot of a device Shoal sees for the first time.
    pub fn init_active(&self, slot: Slot) -> Result<(), StoreError> {
        self.apply(&[Record::Active(slot)])
    }
}

/// The store is a small index and journal: a small cache keeps the installer's
/// memory bounded (redb defaults to 1 GiB).
fn builder() -> redb::Builder {
    let mut b = Database::builder();
    b.set_cache_size(CACHE_BYTES);
    b
}

/// Creates an empty store (with its tables) under a temporary name and renames it
/// into place, so that a power cut while it is being created never leaves a
/// half-written store behind.
fn create_atomically(data_dir: &Path, path: &Path) -> Result<(), StoreError> {
    let tmp = data_dir.join(format!("{FILE_NAME}.new"));
    let db_err = |e: &dyn std::fmt::Display| StoreError::Db {
        path: tmp.clone(),
        message: e.to_string(),
    };
    let io_err = |source| StoreError::Dir {
        path: data_dir.to_path_buf(),
        source,
    };
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(e)),
        _ => {}
    }
    {
        let db = builder().create(&tmp).map_err(|e| db_err(&e))?;
        let txn = db.begin_write().map_err(|e| db_err(&e))?;
        txn.open_table(META).map_err(|e| db_err(&e))?;
        txn.open_table(DONE).map_err(|e| db_err(&e))?;
        txn.open_table(INDEX).map_err(|e| db_err(&e))?;
        txn.commit().map_err(|e| db_err(&e))?;
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err)?;
    std::fs::rename(&tmp, path).map_err(io_err)?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err)?;
    Ok(())
}

/// The `meta` key naming the deployment's envelope file (its 32-byte hash).
const ENVELOPE_FILE_KEY: &str = "envelope.file";

/// A file written through a buffer, hashed and counted as it goes (an envelope
/// encoded or copied straight to disk: [`Store::put_envelope_with`]).
struct HashingWriter {
    file: std::io::BufWriter<std::fs::File>,
    hasher: blake3::Hasher,
    len: u64,
}

impl std::io::Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The envelope file named `hash` of the store in `data_dir` (which may be
/// gone: a reader opens it and takes what it finds).
pub fn envelope_file(data_dir: &Path, hash: &[u8; 32]) -> PathBuf {
    envelope_in(&data_dir.join(ENVELOPE_DIR), hash)
}

fn envelope_in(dir: &Path, hash: &[u8; 32]) -> PathBuf {
    dir.join(format!("{}.envelope", hex::encode(hash)))
}

/// The chunk ids of the stored envelope named `hash` ([`Store::chunk_ids_writer`]).
fn chunk_ids_path(dir: &Path, hash: &[u8; 32]) -> PathBuf {
    dir.join(format!("{}.ids", hex::encode(hash)))
}

/// Values stored as CBOR in the `meta` table.
trait ErasedCbor {
    fn cbor(&self) -> Vec<u8>;
}

impl<T: Serialize> ErasedCbor for T {
    fn cbor(&self) -> Vec<u8> {
        cbor4ii::serde::to_vec(Vec::new(), self).expect("encoding to a Vec cannot fail")
    }
}

/// The slot indexes of a [`Store`], read by chunk id ([`IndexReader`]): a point
/// lookup or a range scan in a read transaction of its own, on the redb the store
/// writes (its page cache is bounded: [`CACHE_BYTES`]). An index is complete when
/// its chunking is recorded ([`IndexReader::chunking`], [`Store::load`]): the
/// last batch of [`Store::write_release_index`], or the engine's
/// [`Record::SlotIndexWritten`] after [`Store::write_slot_index`]. Entries of an
/// index not recorded complete (a power cut while they were written) are read
/// only by an engine that was told they are complete, which is never (the
/// engine takes a stored index from `load`, a commit that checks `chunking`, or
/// the input that records it). And an index is a hint: every chunk read on its
/// word is hashed against its id.
/// A point lookup reads through one read snapshot of the index table, kept until
/// the store's next commit drops it (an install's reads of the running slot come
/// between journal transactions: one snapshot serves a batch of them, instead of
/// a read transaction each, and no snapshot outlives the next commit: redb reuses
/// a freed page only once no read transaction older than its freeing is alive);
/// a scan opens its own.
pub struct StoreIndexes {
    db: Arc<Db>,
    path: PathBuf,
    table: SharedIndexTable,
}

type IndexTable = redb::ReadOnlyTable<&'static [u8], (u64, u32)>;

/// The read snapshot shared by a [`Store`] (which drops it on commit) and its
/// [`StoreIndexes`] (which open it on a lookup).
type SharedIndexTable = Arc<std::sync::Mutex<Option<IndexTable>>>;

impl std::fmt::Debug for StoreIndexes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreIndexes")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl StoreIndexes {
    fn err(&self, e: impl std::fmt::Display) -> IndexReadError {
        IndexReadError(format!("{}: {e}", self.path.display()))
    }

    /// The read transaction and the slot's recorded chunking.
    fn complete(
        &self,
        slot: Slot,
    ) -> Result<(redb::ReadTransaction, Option<Chunking>), IndexReadError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let chunking = {
            let meta = match txn.open_table(META) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok((txn, None)),
                Err(e) => return Err(self.err(e)),
            };
            match meta
                .get(format!("chunking.{}", slot_name(slot)).as_str())
                .map_err(|e| self.err(e))?
            {
                Some(v) => Some(cbor4ii::serde::from_slice::<Chunking>(v.value()).map_err(
                    |e| {
                        self.err(format!(
                            "chunking.{}: {}",
                            slot_name(slot),
                            shoal_signing::describe_cbor_error(&e)
                        ))
                    },
                )?),
                None => None,
            }
        };
        Ok((txn, chunking))
    }
}

impl IndexReader for StoreIndexes {
    fn get(&self, slot: Slot, id: &ChunkId) -> Result<Option<(u64, u32)>, IndexReadError> {
        let mut cached = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cached.is_none() {
            let txn = self.db.begin_read().map_err(|e| self.err(e))?;
            match txn.open_table(INDEX) {
                Ok(t) => *cached = Some(t),
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(self.err(e)),
            }
        }
        let Some(table) = cached.as_ref() else {
            return Ok(None);
        };
        Ok(table
            .get(&index_key(slot, id)[..])
            .map_err(|e| self.err(e))?
            .map(|v| v.value()))
    }

    fn scan(
        &self,
        slot: Slot,
        from: &ChunkId,
        f: &mut dyn FnMut(&ChunkId, u64, u32) -> bool,
    ) -> Result<(), IndexReadError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(INDEX) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(self.err(e)),
        };
        let lo = index_key(slot, from);
        let hi = index_key(slot, &ChunkId([0xff; 32]));
        for entry in table
            .range::<&[u8]>(&lo[..]..=&hi[..])
            .map_err(|e| self.err(e))?
        {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let key = k.value();
            let mut id = [0u8; 32];
            id.copy_from_slice(&key[1..33]);
            let (offset, len) = v.value();
            if !f(&ChunkId(id), offset, len) {
                break;
            }
        }
        Ok(())
    }

    fn chunking(&self, slot: Slot) -> Result<Option<Chunking>, IndexReadError> {
        Ok(self.complete(slot)?.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_engine::testing::MemStore;
    use shoal_engine::{Deployment, Outcome, Phase, Release, Verdict};

    fn release(v: &str) -> Release {
        Release {
            name: "acme-os".into(),
            version: v.into(),
            security_counter: 3,
            manifest_hash: [1; 32],
            payload_size: 4096,
            payload_hash: [2; 32],
            provides: [("k".to_string(), "v".to_string())].into(),
        }
    }

    fn index(seed: u8) -> SlotIndex {
        SlotIndex {
            chunking: Chunking {
                min_size: 1024,
                avg_size: 4096,
                max_size: 16384,
            },
            chunks: (0..10u8)
                .map(|i| IndexedChunk {
                    id: ChunkId([seed.wrapping_add(i); 32]),
                    offset: u64::from(i) * 4096,
                    len: 4096,
                })
                .collect(),
        }
    }

    /// The redb store and the engine's in-memory model agree after the same records.
    #[test]
    fn applies_records_like_the_engine_model_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dep = Deployment {
            release: release("2.0"),
            target: Slot::B,
            phase: Phase::Fetching,
        };
        let batches = vec![
            vec![Record::Active(Slot::A)],
            vec![Record::SlotIndex {
                slot: Slot::A,
                index: Some(index(0)),
            }],
            vec![
                Record::Envelope(Some(vec![9; 100].into())),
                Record::Deployment(Some(dep.clone())),
                Record::ClearProgress,
                Record::SlotRelease {
                    slot: Slot::B,
                    release: None,
                },
                Record::SlotIndex {
                    slot: Slot::B,
                    index: None,
                },
            ],
            vec![Record::Journaled(vec![0, 1, 2]), Record::WanSpent(12_345)],
            vec![Record::Journaled(vec![5])],
            vec![Record::Unindex {
                slot: Slot::A,
                id: ChunkId([3; 32]),
            }],
            vec![
                Record::SlotRelease {
                    slot: Slot::B,
                    release: Some(release("2.0")),
                },
                Record::SlotIndex {
                    slot: Slot::B,
                    index: Some(index(100)),
                },
                Record::Floor(3),
                Record::Last(Outcome {
                    release: release("2.0"),
                    slot: Slot::B,
                    verdict: Verdict::Committed,
                }),
            ],
        ];
        let mut model = MemStore::fresh(Slot::A, [8192, 8192]);
        {
            let store = Store::open(dir.path()).expect("open");
            assert!(store.is_fresh().expect("fresh"));
            for b in &batches {
                store.apply(b).expect("apply");
                model.apply(b);
            }
        }
        let store = Store::open(dir.path()).expect("reopen");
        let mut expected = model.load();
        let mut got = store.load(Slot::A, [8192, 8192]).expect("load");
        expected.journaled.sort_unstable();
        got.journaled.sort_unstable();
        // The readers differ (one reads redb, one the model); what they read is
        // compared below.
        let reader = got.indexes.take().expect("a reader of the store's indexes");
        expected.indexes = None;
        assert_eq!(got, expected);
        assert_eq!(store.slot_index(Slot::B).expect("index"), model.indexes[1]);
        let mut read = Vec::new();
        reader
            .0
            .scan(got.active, &ChunkId([0; 32]), &mut |id, offset, len| {
                read.push(IndexedChunk {
                    id: *id,
                    offset,
                    len,
                });
                true
            })
            .expect("scan");
        assert_eq!(read.len(), 9, "one chunk unindexed");
        let mut recorded = model.indexes[slot_ordinal(got.active)]
            .clone()
            .expect("an index")
            .chunks;
        recorded.sort_by_key(|c| c.id);
        assert_eq!(read, recorded, "in id order, as recorded");
        for c in &read {
            assert_eq!(
                reader.0.get(got.active, &c.id).expect("get"),
                Some((c.offset, c.len))
            );
        }
        assert_eq!(
            reader.0.get(got.active, &ChunkId([0xee; 32])).expect("get"),
            None
        );

        store
            .apply(&[
                Record::ClearProgress,
                Record::Deployment(None),
                Record::Envelope(None),
            ])
            .expect("clear");
        let got = store.load(Slot::A, [8192, 8192]).expect("load");
        assert_eq!(
            (got.journaled.len(), got.deployment, got.envelope),
            (0, None, None)
        );
    }

    /// The index reader's lookups keep one read snapshot while nothing commits,
    /// and see what a later transaction wrote (a slot cut again, a chunk unindexed).
    #[test]
    fn index_lookups_see_what_was_committed_since() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let reader = store.index_reader();
        let id = |b: u8| ChunkId([b; 32]);
        assert_eq!(reader.get(Slot::A, &id(1)).expect("read"), None);
        store
            .write_slot_index(Slot::A, &[(0, id(1), 10), (10, id(2), 20), (30, id(1), 10)])
            .expect("write");
        assert_eq!(reader.get(Slot::A, &id(1)).expect("read"), Some((0, 10)));
        assert_eq!(reader.get(Slot::A, &id(2)).expect("read"), Some((10, 20)));
        store
            .apply(&[Record::Unindex {
                slot: Slot::A,
                id: id(2),
            }])
            .expect("unindex");
        assert_eq!(reader.get(Slot::A, &id(2)).expect("read"), None);
        store
            .write_slot_index(Slot::A, &[(5, id(3), 7)])
            .expect("cut again");
        assert_eq!(reader.get(Slot::A, &id(1)).expect("read"), None);
        assert_eq!(reader.get(Slot::A, &id(3)).expect("read"), Some((5, 7)));
    }

    /// A lookup's read snapshot does not outlive the next commit: commits after
    /// the last lookup free pages redb reuses, so the file does not grow with
    /// them (a snapshot kept until the next lookup held back every page freed
    /// since, and the file grew by each rewritten index).
    #[test]
    fn commits_after_a_lookup_reuse_the_pages_they_free() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let reader = store.index_reader();
        let entries: Vec<(u64, ChunkId, u32)> = (0..2000u32)
            .map(|i| {
                let mut id = [0u8; 32];
                id[..4].copy_from_slice(&i.to_be_bytes());
                (u64::from(i) * 10, ChunkId(id), 10)
            })
            .collect();
        store.write_slot_index(Slot::A, &entries).expect("write");
        assert_eq!(
            reader.get(Slot::A, &entries[5].1).expect("read"),
            Some((50, 10))
        );
        let size = || {
            std::fs::metadata(dir.path().join(FILE_NAME))
                .expect("stat")
                .len()
        };
        for _ in 0..10 {
            store.write_slot_index(Slot::B, &entries).expect("rewrite");
        }
        let settled = size();
        for _ in 0..100 {
            store.write_slot_index(Slot::B, &entries).expect("rewrite");
        }
        assert!(
            size() < settled * 2,
            "the store grew from {settled} to {} bytes over 100 commits",
            size()
        );
        assert!(store.index_table.lock().expect("lock").is_none());
    }

    #[test]
    fn the_envelope_is_a_file_named_by_its_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let files = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir.path().join(ENVELOPE_DIR))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        let old = vec![7u8; 5000];
        let new = vec![8u8; 6000];
        store
            .apply(&[Record::Envelope(Some(old.clone().into()))])
            .expect("apply");
        // A file left by a cut before its record committed.
        std::fs::write(dir.path().join(ENVELOPE_DIR).join("stray.tmp"), b"x").expect("stray");
        store
            .apply(&[Record::Envelope(Some(new.clone().into()))])
            .expect("apply");
        let name = format!("{}.envelope", blake3::hash(&new).to_hex());
        assert_eq!(files(), vec![name.clone()]);
        assert_eq!(store.get_raw("envelope").expect("get"), None, "not in redb");
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        let got = store.load(Slot::A, [1 << 20; 2]).expect("load");
        assert_eq!(got.envelope.as_deref(), Some(&new[..]));

        std::fs::write(dir.path().join(ENVELOPE_DIR).join(&name), &old).expect("tamper");
        match store.load(Slot::A, [1 << 20; 2]) {
            Err(StoreError::Corrupt { key, message, .. }) => {
                assert_eq!(key, ENVELOPE_FILE_KEY);
                assert!(message.contains("does not hash to its name"), "{message}");
            }
            other => panic!("expected a corrupt envelope file, got {other:?}"),
        }
        store.apply(&[Record::Envelope(None)]).expect("clear");
        assert_eq!(files(), Vec::<String>::new());
        assert_eq!(
            store.load(Slot::A, [1 << 20; 2]).expect("load").envelope,
            None
        );
    }

    /// Issue 10 (memory): an envelope stored before the offer (`put_envelope_encoded`) is
    /// named by a `Record::EnvelopeStored` with its hash and loads back whole; a
    /// record naming a file that is not there is refused before anything commits;
    /// a refused release's file is forgotten, a named one is not.
    /// An envelope received as bytes (server, chunk store) is stored as they are,
    /// named by their hash, before the offer; the deployment's record names the
    /// file and a resume (a reopened store) loads it from there, not from redb.
    #[test]
    fn an_envelope_received_as_bytes_is_stored_before_the_offer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let bytes: Vec<u8> = (0..9000u32).map(|k| (k * 7) as u8).collect();
        let hash = store
            .put_envelope_bytes(&bytes)
            .expect("put")
            .expect("a store on a directory keeps envelope files");
        assert_eq!(hash, *blake3::hash(&bytes).as_bytes());
        let path = envelope_in(&dir.path().join(ENVELOPE_DIR), &hash);
        assert_eq!(std::fs::read(&path).expect("its file"), bytes);
        assert!(!dir.path().join(ENVELOPE_DIR).join("encoding.tmp").exists());
        // Again (an offer of the same release resumed): the same file.
        assert_eq!(store.put_envelope_bytes(&bytes).expect("put"), Some(hash));
        store.apply(&[Record::EnvelopeStored(hash)]).expect("apply");
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            store.get_raw("envelope").expect("read"),
            None,
            "no copy in redb"
        );
        let got = store.load(Slot::A, [1 << 20; 2]).expect("load");
        assert_eq!(got.envelope.as_deref(), Some(&bytes[..]));
        // Refused (not named): forgotten.
        let other = vec![1u8; 100];
        let h = store
            .put_envelope_bytes(&other)
            .expect("put")
            .expect("kept");
        store.forget_envelope(&h);
        assert!(!envelope_in(&dir.path().join(ENVELOPE_DIR), &h).exists());
        assert!(path.exists(), "the named one stays");
    }

    #[test]
    fn an_envelope_stored_before_the_offer_is_named_by_its_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut envelope = shoal_signing::Envelope::new(vec![5u8; 7000]);
        envelope.sign(&shoal_signing::SecretKey::from_seed(&[4; 32]));
        let bytes = envelope.to_bytes();
        let hash = store
            .put_envelope_encoded(&envelope)
            .expect("put")
            .expect("a store on a directory keeps envelope files");
        assert_eq!(hash, *blake3::hash(&bytes).as_bytes());
        let path = envelope_in(&dir.path().join(ENVELOPE_DIR), &hash);
        assert_eq!(std::fs::read(&path).expect("its file"), bytes);
        assert_eq!(store.stored_envelope(&hash).expect("read back"), bytes);
        assert!(
            !dir.path().join(ENVELOPE_DIR).join("encoding.tmp").exists(),
            "renamed to its hash"
        );
        // A file changed after it was written is refused when read back.
        let mut changed = bytes.clone();
        changed[100] ^= 1;
        std::fs::write(&path, &changed).expect("change it");
        match store.stored_envelope(&hash) {
            Err(StoreError::Corrupt { message, .. }) => {
                assert!(message.contains("does not hash to its name"), "{message}");
            }
            other => panic!("expected a changed envelope file, got {other:?}"),
        }
        std::fs::write(&path, &bytes).expect("restore it");
        // Not named yet: a refused release's file goes.
        store.forget_envelope(&hash);
        assert!(!path.exists());
        // A record naming a missing file is refused, and nothing commits.
        match store.apply(&[Record::Floor(3), Record::EnvelopeStored(hash)]) {
            Err(StoreError::Corrupt { key, message, .. }) => {
                assert_eq!(key, ENVELOPE_FILE_KEY);
                assert!(message.contains("is missing"), "{message}");
            }
            other => panic!("expected a missing envelope file, got {other:?}"),
        }
        assert_eq!(store.load(Slot::A, [1 << 20; 2]).expect("load").floor, 0);
        store.put_envelope_encoded(&envelope).expect("put again");
        store.apply(&[Record::EnvelopeStored(hash)]).expect("apply");
        // Named now: forgetting it is a no-op.
        store.forget_envelope(&hash);
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        let got = store.load(Slot::A, [1 << 20; 2]).expect("load");
        assert_eq!(got.envelope.as_deref(), Some(&bytes[..]));
        store.apply(&[Record::Envelope(None)]).expect("clear");
        assert!(!path.exists(), "the deployment's end removes it");
    }

    /// Issue 10 (memory): the chunk ids of a stored envelope go to `<hash>.ids`
    /// next to it, read back by position; a refused release's ids go with its
    /// envelope, a named one's stay while its deployment runs (another record
    /// prunes the rest) and go when it ends; an unfinished writer leaves nothing.
    #[test]
    fn a_stored_envelopes_chunk_ids_live_and_go_with_it() {
        use shoal_artifact::ChunkId;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut envelope = shoal_signing::Envelope::new(vec![6u8; 5000]);
        envelope.sign(&shoal_signing::SecretKey::from_seed(&[4; 32]));
        let hash = store
            .put_envelope_encoded(&envelope)
            .expect("put")
            .expect("kept");
        let ids_path = chunk_ids_path(&dir.path().join(ENVELOPE_DIR), &hash);
        let env_path = envelope_in(&dir.path().join(ENVELOPE_DIR), &hash);
        let ids: Vec<ChunkId> = (0..600u32).map(|k| ChunkId::of(&k.to_le_bytes())).collect();
        let write = |ids: &[ChunkId]| {
            let mut w = store
                .chunk_ids_writer(&hash)
                .expect("writer")
                .expect("kept");
            for id in ids {
                w.push(id).expect("push");
            }
            w.finish().expect("finish")
        };
        let file = write(&ids);
        assert_eq!(
            std::fs::metadata(&ids_path).expect("its file").len(),
            600 * 32
        );
        let mut got = vec![ChunkId([0; 32]); 300];
        file.read_ids(250, &mut got).expect("read");
        assert_eq!(got, ids[250..550]);
        assert_eq!(file.describe(), ids_path.display().to_string());
        // Reading past the end is an error, not a wrong id.
        assert!(file.read_ids(599, &mut got[..2]).is_err());
        // A writer dropped unfinished leaves no temporary file.
        {
            let mut w = store
                .chunk_ids_writer(&hash)
                .expect("writer")
                .expect("kept");
            w.push(&ids[0]).expect("push");
        }
        let names = || {
            let mut n: Vec<String> = std::fs::read_dir(dir.path().join(ENVELOPE_DIR))
                .expect("dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        let hex = hex::encode(hash);
        assert_eq!(names(), [format!("{hex}.envelope"), format!("{hex}.ids")]);
        // Refused: both go.
        store.forget_envelope(&hash);
        assert!(!env_path.exists() && !ids_path.exists());
        // Named by the deployment: kept by the record's prune, gone at its end.
        store.put_envelope_encoded(&envelope).expect("put again");
        drop(write(&ids));
        std::fs::write(dir.path().join(ENVELOPE_DIR).join("stale.ids"), b"x").expect("stale");
        store.apply(&[Record::EnvelopeStored(hash)]).expect("apply");
        assert_eq!(names(), [format!("{hex}.envelope"), format!("{hex}.ids")]);
        // A release still read keeps its handle when the file goes.
        let file = write(&ids);
        store.apply(&[Record::Envelope(None)]).expect("clear");
        assert!(
            !env_path.exists() && !ids_path.exists(),
            "the deployment's end removes them"
        );
        file.read_ids(0, &mut got[..1])
            .expect("the open file reads");
        assert_eq!(got[0], ids[0]);
    }

    /// A slot verified to hold a release gets the release's chunk list as its index,
    /// written from the release's table in transactions of `INDEX_BATCH` chunks
    /// (here two), replacing what the slot had.
    #[test]
    fn a_release_index_is_written_in_batches_and_reads_back_whole() {
        use shoal_engine::testing;
        let dir = tempfile::tempdir().expect("tempdir");
        let n = INDEX_BATCH + 3000;
        let image = testing::bytes(7, n * 1024);
        let (key, root) = testing::keys(1);
        let (manifest, _) = testing::release_cut("os", "1", 1, "board", &image, &[1024]);
        let rel =
            shoal_engine::VerifiedRelease::verify(&root, testing::sign(&manifest, &key), None)
                .expect("verified");
        let store = Store::open(dir.path()).expect("open");
        store
            .apply(&[Record::SlotIndex {
                slot: Slot::B,
                index: Some(index(0)),
            }])
            .expect("apply");
        store
            .apply(&[
                Record::SlotRelease {
                    slot: Slot::B,
                    release: Some(rel.release().clone()),
                },
                Record::ReleaseIndex {
                    slot: Slot::B,
                    release: rel.clone(),
                },
            ])
            .expect("apply");
        let got = store.slot_index(Slot::B).expect("read").expect("an index");
        assert_eq!(got.chunks.len(), n);
        assert_eq!(got, rel.slot_index());
        // The other slot's index is untouched.
        assert_eq!(store.slot_index(Slot::A).expect("read"), None);
        let reader = store.index_reader();
        assert_eq!(
            reader.chunking(Slot::B).expect("read"),
            Some(manifest.chunking)
        );
        let first = got.chunks[0];
        assert_eq!(
            reader.get(Slot::B, &first.id).expect("read"),
            Some((first.offset, first.len))
        );
        // The entries of an index whose chunking is not recorded (the last batch
        // never committed: a power cut) are not read.
        store
            .write(|txn| {
                txn.open_table(META)?.remove("chunking.B")?;
                Ok(())
            })
            .expect("write");
        assert_eq!(reader.chunking(Slot::B).expect("read"), None);
        assert_eq!(
            store.load(Slot::B, [0, 0]).expect("load").active_index,
            None
        );
    }

    /// Regression: a power cut while the store was first created left a half-written
    /// file that later opens refused; creation is now atomic.
    #[test]
    fn a_half_created_store_is_discarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(format!("{FILE_NAME}.new")),
            b"half a header",
        )
        .expect("write");
        let store = Store::open(dir.path()).expect("open");
        assert!(store.is_fresh().expect("fresh"));
        assert!(!dir.path().join(format!("{FILE_NAME}.new")).exists());
    }

    #[test]
    fn a_second_open_is_refused_as_busy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Store::open(dir.path()).expect("open");
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Busy { .. })
        ));
    }
}
