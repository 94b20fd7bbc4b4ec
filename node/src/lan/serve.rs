//! What this device serves to its peers: the release it runs (every chunk, from the
//! running slot) and the one it installs (the verified part of the slot being
//! written). A chunk is read at its position in the slot and hashed; only bytes that
//! hash to the id asked for leave the device (a slot region not yet written, or
//! changed under us, is answered "not here").

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow};
use shoal_artifact::ChunkId;
use shoal_bootctl::BootControl;
use shoal_engine::{Bitfield, Slot, VerifiedRelease};

use super::proto::{CHUNK_ANSWER_DATA_MAX, ChunkData, ManifestId};

/// A release this device can serve chunks of.
#[derive(Debug)]
pub struct Served {
    /// Its id.
    pub manifest: ManifestId,
    /// Where its signed manifest envelope is read (for [`super::proto::MANIFEST`]).
    pub envelope: EnvelopeAt,
    /// The slot holding (or receiving) its root filesystem payload.
    pub slot: Slot,
    /// The release, verified once: its chunk table (positions, offsets, lookups
    /// by id), shared with the install; no list or map of its own.
    pub release: Arc<VerifiedRelease>,
}

/// Where a served release's signed envelope is read from when a peer asks for it:
/// a file (the device store's, or a kept manifest), so it is not held in memory
/// while it is served, or bytes (a store without envelope files).
#[derive(Debug, Clone)]
pub enum EnvelopeAt {
    /// A file holding exactly the envelope: the handle it was verified from (or
    /// opened by once), read by offset, so a file renamed over `path` later is
    /// not what is served.
    File {
        /// Where it was opened (for messages, and to tell a kept manifest).
        path: PathBuf,
        /// The open file.
        file: Arc<std::fs::File>,
        /// The envelope's length.
        len: u64,
    },
    /// The envelope.
    Bytes(Arc<[u8]>),
}

/// Reads `file` from `at` to `end` by offset (no shared cursor).
struct ReadFrom<'a> {
    file: &'a std::fs::File,
    at: u64,
    end: u64,
}

impl std::io::Read for ReadFrom<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt as _;
        let n = (self.end - self.at).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..n], self.at)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.at += n as u64;
        Ok(n)
    }
}

impl EnvelopeAt {
    /// The envelope of `release`, read from `file` (its path, the open file and
    /// the envelope's length) if there is one.
    pub fn of(
        release: &VerifiedRelease,
        file: Option<(PathBuf, std::fs::File, u64)>,
    ) -> anyhow::Result<EnvelopeAt> {
        match (file, release.envelope()) {
            (Some((path, file, len)), _) => Ok(EnvelopeAt::File {
                path,
                file: Arc::new(file),
                len,
            }),
            (None, Some(bytes)) => Ok(EnvelopeAt::Bytes(bytes)),
            (None, None) => Err(anyhow!("the release's signed manifest is not at hand")),
        }
    }

    /// A reader of its bytes.
    pub fn open(&self) -> anyhow::Result<Box<dyn std::io::Read + '_>> {
        match self {
            EnvelopeAt::File { file, len, .. } => Ok(Box::new(ReadFrom {
                file,
                at: 0,
                end: *len,
            })),
            EnvelopeAt::Bytes(b) => Ok(Box::new(&b[..])),
        }
    }

    /// Its bytes (bounded by the envelope size limit).
    pub fn read(&self) -> anyhow::Result<Vec<u8>> {
        use std::io::Read as _;
        let mut bytes = Vec::new();
        self.open()?
            .take(shoal_signing::ENVELOPE_SIZE_MAX as u64 + 1)
            .read_to_end(&mut bytes)
            .with_context(|| match self {
                EnvelopeAt::File { path, .. } => format!("cannot read {}", path.display()),
                EnvelopeAt::Bytes(_) => "cannot read the signed manifest".into(),
            })?;
        if bytes.len() > shoal_signing::ENVELOPE_SIZE_MAX {
            return Err(anyhow!(
                "the kept signed manifest is larger than any envelope"
            ));
        }
        Ok(bytes)
    }
}

impl Served {
    /// `release` (verified), its payload in `slot`.
    pub fn new(release: Arc<VerifiedRelease>, envelope: EnvelopeAt, slot: Slot) -> Served {
        Served {
            manifest: ManifestId(release.release().manifest_hash),
            envelope,
            slot,
            release,
        }
    }

    /// Positions in the payload's chunk list.
    pub fn positions(&self) -> u32 {
        self.release.chunk_count()
    }

    /// A chunk's first position.
    pub fn position(&self, id: &ChunkId) -> Option<u32> {
        self.release.first_position(id).map(|(p, _, _)| p)
    }

    /// A chunk's first offset and length in the payload.
    pub fn chunk(&self, id: &ChunkId) -> Option<(u64, u32)> {
        self.release
            .first_position(id)
            .map(|(_, offset, len)| (offset, len))
    }

    /// Positions whose byte range lies inside `ranges` (journaled `(offset, len)`).
    pub fn have_of(&self, ranges: &[(u64, u64)]) -> Bitfield {
        let mut done: Vec<(u64, u64)> = ranges.to_vec();
        done.sort_unstable();
        let mut have = Bitfield::new(self.positions());
        let mut r = 0;
        for (i, (offset, size)) in self.release.position_ranges().enumerate() {
            while r < done.len() && done[r].0 + done[r].1 <= offset {
                r += 1;
            }
            if r < done.len()
                && done[r].0 <= offset
                && offset + u64::from(size) <= done[r].0 + done[r].1
            {
                have.set(i as u32);
            }
        }
        have
    }
}

/// Opens the slots read-only for serving.
pub fn open_slots(config: &crate::config::Config) -> anyhow::Result<BootControl> {
    shoal_bootctl::config::build(&config.slots, &config.bootloader, false)
        .map_err(|e| anyhow!("[slots]/[bootloader]: {}", crate::cmd::chain(&e)))
}

/// Answers a chunk request from `release` in `boot`'s slots: each chunk read and
/// hashed; at most [`CHUNK_ANSWER_DATA_MAX`] bytes (and `budget`), the rest "later".
pub fn answer(
    boot: &Mutex<BootControl>,
    release: &Served,
    ids: &[ChunkId],
    budget: u64,
) -> Vec<ChunkData> {
    let reader = boot
        .lock()
        .map_err(|_| std::io::Error::other("the slot access lock is poisoned"))
        .and_then(|b| b.open_reader(release.slot));
    let reader = match reader {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(slot = %release.slot, error = %e, "cannot open the slot to serve peers");
            return ids.iter().map(|_| ChunkData::NotHere).collect();
        }
    };
    let mut sent = 0u64;
    let cap = (CHUNK_ANSWER_DATA_MAX as u64).min(budget);
    ids.iter()
        .map(|id| {
            let Some((offset, len)) = release.chunk(id) else {
                return ChunkData::NotHere;
            };
            if sent + u64::from(len) > cap && sent > 0 || budget < u64::from(len) {
                return ChunkData::Later;
            }
            let mut buf = vec![0u8; len as usize];
            if reader.read_at(offset, &mut buf).is_err() {
                return ChunkData::NotHere;
            }
            if blake3::hash(&buf).as_bytes() != id.as_bytes() {
                return ChunkData::NotHere;
            }
            sent += u64::from(len);
            #[cfg(feature = "test-peer-faults")]
            test_fault(&mut buf);
            ChunkData::Bytes(buf)
        })
        .collect()
}

/// A signed manifest envelope as sent to a peer: as kept (TESTS ONLY, with the
/// `test-peer-faults` feature and `SHOAL_TEST_PEER_FAULT=manifest`: the last byte
/// of its signatures flipped).
pub fn envelope_for_peer(#[allow(unused_mut)] mut envelope: Vec<u8>) -> Vec<u8> {
    #[cfg(feature = "test-peer-faults")]
    if std::env::var("SHOAL_TEST_PEER_FAULT").as_deref() == Ok("manifest")
        && let Some(b) = envelope.last_mut()
    {
        *b ^= 0xff;
    }
    envelope
}

/// TESTS ONLY (`test-peer-faults`): misbehaves as `SHOAL_TEST_PEER_FAULT` says:
/// `corrupt` flips a byte of every chunk, `wrong` sends other bytes of the same
/// length, `stall` never answers (and `manifest` sends a manifest whose signature
/// does not verify, [`envelope_for_peer`]).
#[cfg(feature = "test-peer-faults")]
fn test_fault(buf: &mut [u8]) {
    match std::env::var("SHOAL_TEST_PEER_FAULT").as_deref() {
        Ok("corrupt") => {
            if let Some(b) = buf.first_mut() {
                *b ^= 0xff;
            }
        }
        Ok("wrong") => buf.rotate_left(1),
        Ok("stall") => std::thread::sleep(std::time::Duration::from_secs(3600)),
        _ => {}
    }
}

/// Where zstd dictionaries this device decoded chunks with are kept, to serve to
/// peers (`data_dir/dictionaries/<8 hex>.dict`).
pub fn dictionary_path(data_dir: &Path, zstd_id: u32) -> PathBuf {
    data_dir
        .join("dictionaries")
        .join(format!("{zstd_id:08x}.dict"))
}

/// Keeps a dictionary for peers (written whole, then renamed).
pub fn save_dictionary(
    data_dir: &Path,
    dict: &shoal_artifact::chunk::Dictionary,
) -> anyhow::Result<()> {
    let path = dictionary_path(data_dir, dict.zstd_id);
    let dir = path.parent().expect("has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, dict.bytes())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// A kept dictionary's bytes, if it is kept and still a dictionary of that id
/// (TESTS ONLY, with `SHOAL_TEST_PEER_FAULT=dictionary`: a forged one whose
/// content, and so its derived id, differs).
pub fn read_dictionary(data_dir: &Path, zstd_id: u32) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(dictionary_path(data_dir, zstd_id))
        .ok()?
        .take(shoal_artifact::chunk::DICTIONARY_SIZE_MAX as u64 + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    let dict = shoal_artifact::chunk::Dictionary::from_bytes(bytes).ok()?;
    if dict.zstd_id != zstd_id {
        return None;
    }
    let bytes = dict.bytes().to_vec();
    #[cfg(feature = "test-peer-faults")]
    if std::env::var("SHOAL_TEST_PEER_FAULT").as_deref() == Ok("dictionary") {
        return Some(test_lying_dictionary(bytes));
    }
    Some(bytes)
}

/// TESTS ONLY (`test-peer-faults`): with `SHOAL_TEST_PEER_FAULT=dictionary` the
/// peer says it has no chunk of the release it installs, so the others fetch
/// theirs from the server and need its zstd dictionary, which they ask of it
/// (the liar) first; `None` (advertise `have` as it is) otherwise.
#[cfg(feature = "test-peer-faults")]
pub fn test_advertised(have: &shoal_engine::Bitfield) -> Option<shoal_engine::Bitfield> {
    (std::env::var("SHOAL_TEST_PEER_FAULT").as_deref() == Ok("dictionary"))
        .then(|| shoal_engine::Bitfield::new(have.len()))
}

/// TESTS ONLY: `bytes` with their content changed past the header and the id
/// derived again from them (a forger without a 31-bit collision: another id).
#[cfg(feature = "test-peer-faults")]
fn test_lying_dictionary(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len();
    for b in &mut bytes[n.saturating_sub(4096).max(8)..] {
        *b = b.wrapping_add(1);
    }
    let id = shoal_artifact::chunk::derived_zstd_id(&bytes);
    bytes[4..8].copy_from_slice(&id.to_le_bytes());
    bytes
}

/// Where signed manifests of releases this device runs or installs are kept
/// (`data_dir/manifests/<id>.envelope`), so it serves its running release after a
/// restart and reads manifest deltas against them (`crate::device::KeptManifests`).
pub fn envelope_path(data_dir: &Path, id: &ManifestId) -> PathBuf {
    manifests_dir(data_dir).join(format!("{}.envelope", hex::encode(id.0)))
}

/// The directory of the manifests kept under `data_dir` (their envelopes, ids and
/// dictionaries; see [`envelope_path`]).
pub fn manifests_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("manifests")
}

/// Keeps the envelope `envelope` reads (copied into a `.new` file, then renamed
/// over its name; the `.new` file is removed when the copy fails): an envelope in
/// memory, or the store's file of it (copied, not read into memory).
pub fn save_envelope(
    data_dir: &Path,
    id: &ManifestId,
    mut envelope: impl std::io::Read,
) -> anyhow::Result<()> {
    let path = envelope_path(data_dir, id);
    let dir = path.parent().expect("has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("new");
    let copied = (|| -> anyhow::Result<()> {
        let mut out = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::io::copy(&mut envelope, &mut out)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        Ok(())
    })();
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An envelope is kept under its name; a copy that fails leaves neither the
    /// name nor its `.new` file.
    #[test]
    fn a_kept_envelope_is_renamed_into_place_and_a_failed_copy_leaves_nothing() {
        struct Failing(usize);
        impl std::io::Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("Input/output error (os error 5)"));
                }
                let n = self.0.min(buf.len());
                buf[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let id = ManifestId([9; 32]);
        save_envelope(dir.path(), &id, &b"envelope"[..]).expect("saved");
        let path = envelope_path(dir.path(), &id);
        assert_eq!(std::fs::read(&path).expect("read"), b"envelope");
        let other = ManifestId([8; 32]);
        let e = save_envelope(dir.path(), &other, Failing(100_000)).expect_err("fails");
        let tmp = envelope_path(dir.path(), &other).with_extension("new");
        assert_eq!(
            format!("{e:#}"),
            format!(
                "cannot write {}: Input/output error (os error 5)",
                tmp.display()
            )
        );
        let mut names: Vec<String> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [format!("{}.envelope", hex::encode([9; 32]))]);
    }

    /// A release of chunks of 1 KiB, each distinct.
    fn served(chunks: usize) -> Served {
        use shoal_engine::testing;
        let image = testing::bytes(3, chunks * 1024);
        let (key, root) = testing::keys(1);
        let (manifest, _) = testing::release_cut("os", "1", 1, "board", &image, &[1024]);
        let release =
            VerifiedRelease::verify(&root, testing::sign(&manifest, &key), None).expect("verifies");
        let envelope = EnvelopeAt::of(&release, None).expect("kept");
        Served::new(release, envelope, Slot::B)
    }

    #[test]
    fn have_covers_whole_chunks_inside_journaled_ranges() {
        let s = served(4);
        assert_eq!(s.positions(), 4);
        // Chunk 0 and 2 written; chunk 3 half-covered only.
        let have = s.have_of(&[(2048, 1024), (0, 1024), (3072, 512)]);
        assert_eq!(have.iter().collect::<Vec<_>>(), vec![0, 2]);
        // One range covering two chunks.
        let have = s.have_of(&[(1024, 2048)]);
        assert_eq!(have.iter().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(s.have_of(&[]).count(), 0);
    }
}
