//! A verified release, shared: the signed manifest checked against a trust root
//! once, decoded once, with its chunk table, behind an [`Arc`] that every engine
//! installing it holds (a fleet of simulated devices, or one device that is offered
//! the same release again, never verifies or decodes it twice).

use std::sync::Arc;

use shoal_artifact::{
    ChunkId, ChunkIdSink, Manifest, PayloadKind, ReadAt, StreamedError, StreamedIds,
    StreamedManifest,
};
use shoal_signing::{
    DecodeError, ENVELOPE_SIZE_MAX, EnvelopeLayout, EnvelopeRef, RoleName, TrustRoot,
};

use super::table::{ChunkIdWriter, ChunkTable, FileIds, Ids, prefix};
use crate::error::OfferError;
use crate::state::{IndexedChunk, Release, SlotIndex};

/// A release whose signed manifest verified against a trust root, decoded, with
/// its chunk table. Make one with [`VerifiedRelease::verify`] and hand the `Arc`
/// to [`Engine::offer_verified`](crate::Engine::offer_verified) as often as needed.
#[derive(Debug)]
pub struct VerifiedRelease {
    /// The trust root it verified against (an engine under another root refuses it).
    pub(crate) root: TrustRoot,
    /// The signed envelope, as offered (persisted once per deployment), until a
    /// driver that persisted it sheds it ([`Engine::shed_envelope`]): an 8 GiB
    /// image's envelope is about 35 MB, which an install need not hold.
    ///
    /// [`Engine::shed_envelope`]: crate::Engine::shed_envelope
    envelope: std::sync::Mutex<Option<Arc<[u8]>>>,
    /// BLAKE3 of the envelope's bytes when the driver stored it durably before the
    /// offer ([`VerifiedRelease::verify_stored`]): the release never holds it, and
    /// a deployment names it by this hash ([`Record::EnvelopeStored`]).
    ///
    /// [`Record::EnvelopeStored`]: crate::Record::EnvelopeStored
    stored: Option<[u8; 32]>,
    /// The decoded manifest, without its payload's chunk list: that lives in
    /// `table` only (one copy per release, in dense arrays).
    pub(crate) manifest: Manifest,
    /// Index of the root filesystem payload in the manifest.
    pub(crate) payload: usize,
    pub(crate) release: Release,
    pub(crate) table: ChunkTable,
}

impl VerifiedRelease {
    /// Verifies `envelope` against `root` (signature threshold of the `release`
    /// role; the root's expiry against `wall_unix_s`, when the device has a
    /// trustworthy clock), decodes and validates its manifest, and checks it has
    /// exactly one payload, a root filesystem image. The manifest's chunk list is
    /// streamed into the chunk table as it is decoded (never a list of
    /// `ChunkRef`s); the ids stay in memory, one copy a fleet shares.
    pub fn verify(
        root: &TrustRoot,
        envelope: Vec<u8>,
        wall_unix_s: Option<u64>,
    ) -> Result<Arc<VerifiedRelease>, OfferError> {
        Self::verify_as(root, envelope, wall_unix_s, false, None)
    }

    /// [`VerifiedRelease::verify`] for a driver that stored `envelope` durably
    /// before the offer, as a file named by the BLAKE3 of its bytes: verified and
    /// decoded the same way (the chunk list streamed into the table as the
    /// manifest is decoded), but the release does not keep the bytes, and a
    /// deployment of it names the stored envelope by its hash
    /// ([`Record::EnvelopeStored`]) instead of carrying it. A driver that can read
    /// the file verifies it there instead ([`VerifiedRelease::verify_file`]: the
    /// envelope is then never in memory whole).
    ///
    /// [`Record::EnvelopeStored`]: crate::Record::EnvelopeStored
    pub fn verify_stored(
        root: &TrustRoot,
        envelope: Vec<u8>,
        wall_unix_s: Option<u64>,
    ) -> Result<Arc<VerifiedRelease>, OfferError> {
        Self::verify_as(root, envelope, wall_unix_s, true, None)
    }

    /// [`VerifiedRelease::verify_stored`] with the chunk ids going to `ids` as
    /// the manifest is decoded (a device: a file next to the stored envelope),
    /// and read back from it by position: the release's ids (32 bytes a chunk)
    /// are then never in memory, nor is its chunk list decoded as a whole (40
    /// bytes a chunk). A failure of `ids` is [`OfferError::ChunkIds`]. Tests'
    /// (a driver verifies from the file: [`VerifiedRelease::verify_file`]).
    #[cfg(test)]
    pub(crate) fn verify_stored_to(
        root: &TrustRoot,
        envelope: Vec<u8>,
        wall_unix_s: Option<u64>,
        ids: Box<dyn ChunkIdWriter>,
    ) -> Result<Arc<VerifiedRelease>, OfferError> {
        Self::verify_as(root, envelope, wall_unix_s, true, Some(ids))
    }

    /// [`VerifiedRelease::verify_stored`] of the envelope in a file (the
    /// `len` bytes `file` reads) that the driver stored and named `hash` (the
    /// BLAKE3 of its bytes), read without holding it: its signatures are checked
    /// as its signed bytes are read once (with both hashes), then the manifest is
    /// decoded from it in a second read, its chunk ids going to `ids`. The
    /// errors are those of the offer of the same bytes in memory; a file that
    /// cannot be read, or whose bytes are not `hash`'s, is
    /// [`OfferError::StoredEnvelope`].
    pub fn verify_file(
        root: &TrustRoot,
        file: &dyn ReadAt,
        len: u64,
        hash: [u8; 32],
        wall_unix_s: Option<u64>,
        ids: Box<dyn ChunkIdWriter>,
    ) -> Result<Arc<VerifiedRelease>, OfferError> {
        Self::verify_file_named(root, file, len, Some(hash), wall_unix_s, ids)
    }

    /// [`VerifiedRelease::verify_file`] of a file not named after its bytes' hash
    /// (a kept manifest, named after the manifest's: the caller checks
    /// [`Release::manifest_hash`] against it): the same checks and the same one
    /// read of its signed bytes, without the whole file's hash to match.
    pub fn verify_unnamed_file(
        root: &TrustRoot,
        file: &dyn ReadAt,
        len: u64,
        wall_unix_s: Option<u64>,
        ids: Box<dyn ChunkIdWriter>,
    ) -> Result<Arc<VerifiedRelease>, OfferError> {
        Self::verify_file_named(root, file, len, None, wall_unix_s, ids)
    }

    fn verify_file_named(
        root: &TrustRoot,
        file: &dyn ReadAt,
        len: u64,
        named: Option<[u8; 32]>,
        wall_unix_s: Option<u64>,
        ids: Box<dyn ChunkIdWriter>,
    ) -> Result<Arc<VerifiedRelease>, OfferError> {
        let read_error = |e: std::io::Error| {
            OfferError::StoredEnvelope(format!("cannot read the stored envelope: {e}"))
        };
        let layout = EnvelopeLayout::locate(len, &mut |at, buf| file.read_at(at, buf))
            .map_err(read_error)?;
        let Some(layout) = layout else {
            // Not laid out as a canonical envelope: the bytes in memory, for the
            // decoder's own error (or, if they verify after all, the release);
            // a file larger than any envelope is refused before it is read.
            if len > ENVELOPE_SIZE_MAX as u64 {
                return Err(OfferError::Envelope(DecodeError::TooLarge {
                    size: usize::try_from(len).unwrap_or(usize::MAX),
                    max: ENVELOPE_SIZE_MAX,
                }));
            }
            let mut bytes = vec![0; usize::try_from(len).unwrap_or(usize::MAX)];
            file.read_at(0, &mut bytes).map_err(read_error)?;
            if let Some(hash) = &named {
                check_named(&bytes, hash)?;
            }
            return Self::verify_as(root, bytes, wall_unix_s, true, Some(ids));
        };
        // One read: the signatures over the signed bytes, their hash (the
        // manifest's id) and the whole file's (its name).
        let mut whole = blake3::Hasher::new();
        let mut signed = blake3::Hasher::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = |at: u64, n: u64, f: &mut dyn FnMut(&[u8])| -> std::io::Result<()> {
            let mut done = 0;
            while done < n {
                let k = (n - done).min(buf.len() as u64) as usize;
                file.read_at(at + done, &mut buf[..k])?;
                f(&buf[..k]);
                done += k as u64;
            }
            Ok(())
        };
        read(0, layout.signed_at, &mut |b| {
            whole.update(b);
        })
        .map_err(read_error)?;
        let verdict = root
            .verify_streamed(RoleName::Release, &layout.signatures, wall_unix_s, |feed| {
                read(layout.signed_at, layout.signed_len, &mut |b| {
                    whole.update(b);
                    signed.update(b);
                    feed(b);
                })
            })
            .map_err(read_error)?;
        let tail = layout.signed_at + layout.signed_len;
        read(tail, len - tail, &mut |b| {
            whole.update(b);
        })
        .map_err(read_error)?;
        drop(buf);
        let hash = *whole.finalize().as_bytes();
        if named.is_some_and(|named| named != hash) {
            return Err(OfferError::StoredEnvelope(
                "the stored envelope does not hash to its name".into(),
            ));
        }
        verdict?;
        let manifest_hash = *signed.finalize().as_bytes();
        let streamed = Manifest::from_file_streaming(
            file,
            layout.signed_at,
            layout.signed_len,
            &manifest_hash,
            IdSink::new(Some(ids)),
        );
        Self::from_streamed(root, streamed, manifest_hash, None, Some(hash))
    }

    fn verify_as(
        root: &TrustRoot,
        envelope: Vec<u8>,
        wall_unix_s: Option<u64>,
        stored: bool,
        writer: Option<Box<dyn ChunkIdWriter>>,
    ) -> Result<Arc<VerifiedRelease>, OfferError> {
        // Decoded in place (the signed bytes are not copied).
        let parsed = EnvelopeRef::from_bytes(&envelope)?;
        let signed = root.verify_ref(RoleName::Release, &parsed, wall_unix_s)?;
        let manifest_hash = *blake3::hash(signed).as_bytes();
        let streamed = Manifest::from_cbor_streaming(signed, IdSink::new(writer));
        let release = Self::from_streamed(root, streamed, manifest_hash, None, None)?;
        drop(parsed);
        let (envelope, stored) = if stored {
            let hash = *blake3::hash(&envelope).as_bytes();
            drop(envelope);
            (None, Some(hash))
        } else {
            (Some(Arc::<[u8]>::from(envelope)), None)
        };
        let mut release = Arc::into_inner(release).expect("the only reference");
        release.envelope = std::sync::Mutex::new(envelope);
        release.stored = stored;
        Ok(Arc::new(release))
    }

    /// The release from its manifest decoded with the chunk list streamed out:
    /// the chunk table, then the references' and the canonical form's checks
    /// against it, then the payloads'.
    fn from_streamed(
        root: &TrustRoot,
        streamed: Result<(StreamedManifest<'_>, IdSink), StreamedError>,
        manifest_hash: [u8; 32],
        envelope: Option<Arc<[u8]>>,
        stored: Option<[u8; 32]>,
    ) -> Result<Arc<VerifiedRelease>, OfferError> {
        let (mut streamed, sink) = streamed.map_err(offer_error)?;
        let sizes = std::mem::take(&mut streamed.sizes);
        let positions = u32::try_from(sizes.sizes.len()).expect("bounded by the manifest size");
        let ids = match sink.to {
            IdsTo::Memory(ids) => Ids::Memory(ids.into_boxed_slice()),
            IdsTo::Writer(w) => Ids::File(FileIds::new(
                w.finish().map_err(OfferError::ChunkIds)?,
                positions,
            )),
        };
        let table = ChunkTable::build(ids, sizes.sizes, sizes.stored_sizes, sink.prefixes);
        // The references' checks and the canonical form, against the table. An
        // id the table could not read (zeros in its place) fails them as a
        // manifest's fault: the read's failure is the error then, and also when
        // they pass.
        let checked = streamed.finish(&TableIds(&table));
        if let Some(e) = table.ids_error() {
            return Err(OfferError::ChunkIds(e.to_owned()));
        }
        let manifest = checked.map_err(offer_error)?;
        let rootfs: Vec<usize> = (0..manifest.payloads.len())
            .filter(|&i| manifest.payloads[i].kind == PayloadKind::RootfsImage)
            .collect();
        if rootfs.len() != 1 || manifest.payloads.len() != 1 {
            return Err(OfferError::Payloads {
                rootfs: rootfs.len(),
                other: manifest.payloads.len() - rootfs.len(),
            });
        }
        // The table is the first payload's: the only one.
        let payload = rootfs[0];
        let release = Release::with_hash(&manifest, payload, manifest_hash);
        Ok(Arc::new(VerifiedRelease {
            root: root.clone(),
            envelope: std::sync::Mutex::new(envelope),
            stored,
            manifest,
            payload,
            release,
            table,
        }))
    }

    /// The first failure to read the release's chunk ids from the driver's file
    /// ([`VerifiedRelease::verify_file`]), if any: sticky; an install of it
    /// ends with it ([`InstallError::ChunkIds`](crate::InstallError::ChunkIds)),
    /// and a driver that read the release's ids (the slot index, an artifact's
    /// packs) checks it before it trusts what it read.
    pub fn chunk_ids_error(&self) -> Option<&str> {
        self.table.ids_error()
    }

    /// The release, as the device records it.
    pub fn release(&self) -> &Release {
        &self.release
    }

    /// The verified manifest, without its payload's chunk list (kept only in the
    /// release's chunk table; [`VerifiedRelease::chunk_count`] is its length).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Chunks in the payload's chunk list (positions; a repeated chunk counts at
    /// each of them).
    pub fn chunk_count(&self) -> u32 {
        self.table.positions()
    }

    /// The signed envelope it was verified from, unless it was shed.
    pub fn envelope(&self) -> Option<Arc<[u8]>> {
        self.envelope
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The record that makes the store hold its envelope for a new deployment:
    /// the bytes, or (stored by the driver before the offer) their hash; `None`
    /// once a held envelope was shed.
    pub(crate) fn envelope_record(&self) -> Option<crate::state::Record> {
        match (self.envelope(), self.stored) {
            (Some(e), _) => Some(crate::state::Record::Envelope(Some(e))),
            (None, Some(hash)) => Some(crate::state::Record::EnvelopeStored(hash)),
            (None, None) => None,
        }
    }

    /// Drops the envelope (see [`Engine::shed_envelope`](crate::Engine::shed_envelope)).
    pub(crate) fn shed_envelope(&self) {
        *self
            .envelope
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// The slot index of a slot that holds this release: each distinct chunk at its
    /// first position, in id order (the store inserts them in key order), read
    /// from the table as it goes.
    pub fn index_by_id(&self) -> impl Iterator<Item = IndexedChunk> + '_ {
        self.table.entries_by_id().map(|e| IndexedChunk {
            id: self.table.id(e),
            offset: self.table.first_offset(e),
            len: self.table.size(e),
        })
    }

    /// The same index, in slot order, as one list.
    pub fn slot_index(&self) -> SlotIndex {
        SlotIndex {
            chunking: self.manifest.chunking,
            chunks: (0..self.table.entries())
                .map(|e| IndexedChunk {
                    id: self.table.id(e),
                    offset: self.table.first_offset(e),
                    len: self.table.size(e),
                })
                .collect(),
        }
    }

    /// The BLAKE3 of the envelope's bytes, when the driver stored it as a file
    /// named by it before verifying it ([`VerifiedRelease::verify_file`],
    /// [`VerifiedRelease::verify_stored`]).
    pub fn stored_hash(&self) -> Option<[u8; 32]> {
        self.stored
    }

    /// A distinct chunk of the payload by its id, read from the table (a
    /// search of the prefixes in memory, a full id read where one matches):
    /// a network driver's lookup of the chunks it is asked for, without a map
    /// of its own.
    pub fn chunk(&self, id: &ChunkId) -> Option<shoal_artifact::ChunkRef> {
        let e = self.table.entry(id)?;
        Some(shoal_artifact::ChunkRef {
            id: *id,
            size: self.table.size(e),
            stored_size: self.table.wire_size(e),
        })
    }

    /// The first position of a chunk in the payload's chunk list, with its
    /// offset and length there (a peer serving it reads it from there).
    pub fn first_position(&self, id: &ChunkId) -> Option<(u32, u64, u32)> {
        let e = self.table.entry(id)?;
        Some((
            self.table
                .positions_of(e)
                .next()
                .expect("an entry has a position"),
            self.table.first_offset(e),
            self.table.size(e),
        ))
    }

    /// Distinct chunks of the payload.
    pub fn distinct_chunks(&self) -> u32 {
        self.table.entries()
    }

    /// The chunks at the payload's positions, in order: offset and length
    /// (have-bitfields over byte ranges), read from the table as it goes.
    pub fn position_ranges(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let mut offset = 0u64;
        (0..self.table.positions()).map(move |p| {
            let size = self.table.size(self.table.entry_at(p));
            let at = offset;
            offset += u64::from(size);
            (at, size)
        })
    }

    /// Heap bytes of its chunk table (what a fleet shares).
    pub fn table_heap_bytes(&self) -> usize {
        self.table.heap_bytes()
    }
}

/// Where a streamed chunk list's ids go, with their prefixes (the table's lookup).
struct IdSink {
    prefixes: Vec<u32>,
    to: IdsTo,
}

impl IdSink {
    fn new(writer: Option<Box<dyn ChunkIdWriter>>) -> IdSink {
        IdSink {
            prefixes: Vec::new(),
            to: match writer {
                Some(w) => IdsTo::Writer(w),
                None => IdsTo::Memory(Vec::new()),
            },
        }
    }
}

fn offer_error(e: StreamedError) -> OfferError {
    match e {
        StreamedError::Manifest(e) => OfferError::Manifest(e),
        StreamedError::Sink(message) => OfferError::ChunkIds(message),
        StreamedError::Read(message) => {
            OfferError::StoredEnvelope(format!("cannot read the stored envelope: {message}"))
        }
    }
}

/// Refuses bytes read from the file named `hash` that are not its.
fn check_named(bytes: &[u8], hash: &[u8; 32]) -> Result<(), OfferError> {
    if blake3::hash(bytes).as_bytes() != hash {
        return Err(OfferError::StoredEnvelope(
            "the stored envelope does not hash to its name".into(),
        ));
    }
    Ok(())
}

enum IdsTo {
    Memory(Vec<ChunkId>),
    Writer(Box<dyn ChunkIdWriter>),
}

impl ChunkIdSink for IdSink {
    fn push(&mut self, id: &ChunkId) -> Result<(), String> {
        self.prefixes.push(prefix(id));
        match &mut self.to {
            IdsTo::Memory(ids) => {
                ids.push(*id);
                Ok(())
            }
            IdsTo::Writer(w) => w.push(id),
        }
    }

    fn reserve(&mut self, positions: usize) {
        self.prefixes.reserve_exact(positions);
        if let IdsTo::Memory(ids) = &mut self.to {
            ids.reserve_exact(positions);
        }
    }
}

/// The table's ids, for the manifest's references' checks.
struct TableIds<'a>(&'a ChunkTable);

impl StreamedIds for TableIds<'_> {
    fn positions(&self) -> u32 {
        self.0.positions()
    }
    fn is_first(&self, pos: u32) -> bool {
        self.0.is_first(pos)
    }
    fn id(&self, pos: u32) -> ChunkId {
        self.0.id_at(pos)
    }
}

/// The same release: the same signed manifest.
impl PartialEq for VerifiedRelease {
    fn eq(&self, other: &VerifiedRelease) -> bool {
        self.release.manifest_hash == other.release.manifest_hash
    }
}

impl Eq for VerifiedRelease {}

/// The release's distinct chunks in artifact order (the table's entries are
/// numbered in order of first appearance), so an artifact reader reads its packs
/// against the table instead of a list of its own.
impl shoal_artifact::ChunkList for VerifiedRelease {
    fn manifest_hash(&self) -> [u8; 32] {
        self.release.manifest_hash
    }

    fn distinct_len(&self) -> usize {
        self.table.entries() as usize
    }

    fn distinct_chunk(&self, k: usize) -> shoal_artifact::ChunkRef {
        let e = u32::try_from(k).expect("an entry of the table");
        shoal_artifact::ChunkRef {
            id: self.table.id(e),
            size: self.table.size(e),
            stored_size: self.table.wire_size(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    /// A driver's lookups by id and by position read the table: the chunk's
    /// sizes, its first position and offset (a repeated chunk's first), and
    /// every position's range in order; an id the release lacks is `None`.
    #[test]
    fn lookups_by_id_and_position_read_the_table() {
        // Chunks of 2 KiB: 0, 1, 0 (repeated), 2.
        let a = testing::bytes(1, 2048);
        let b = testing::bytes(2, 2048);
        let c = testing::bytes(3, 2048);
        let image = [&a[..], &b[..], &a[..], &c[..]].concat();
        let (key, root) = testing::keys(1);
        let (manifest, _) = testing::release_cut("os", "1", 1, "board", &image, &[2048]);
        let release =
            VerifiedRelease::verify(&root, testing::sign(&manifest, &key), None).expect("verifies");
        lookups(&release, &a, &b, &c);
        assert_eq!(release.stored_hash(), None);
        // The same, the ids in a file (a device's): read from it.
        let file = Arc::new(IdsInFile::default());
        let envelope = testing::sign(&manifest, &key);
        let stored = *blake3::hash(&envelope).as_bytes();
        let release = VerifiedRelease::verify_stored_to(
            &root,
            envelope,
            None,
            Box::new(IdsTo(Arc::clone(&file))),
        )
        .expect("verifies");
        lookups(&release, &a, &b, &c);
        // (Four ids: one block, cached by the table's build; a lookup past the
        // cache is `fetch_tests::a_release_with_its_ids_in_a_file_installs`'.)
        assert!(
            file.reads.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "the ids are read from the file"
        );
        assert_eq!(release.stored_hash(), Some(stored));
    }

    /// Ids kept in a "file" that counts its reads.
    #[derive(Debug, Default)]
    struct IdsInFile {
        bytes: std::sync::Mutex<Vec<u8>>,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl crate::ChunkIdFile for IdsInFile {
        fn read_ids(&self, from: u32, out: &mut [ChunkId]) -> std::io::Result<()> {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let b = self.bytes.lock().expect("not poisoned");
            for (k, id) in out.iter_mut().enumerate() {
                let at = (from as usize + k) * 32;
                id.0.copy_from_slice(&b[at..at + 32]);
            }
            Ok(())
        }
        fn describe(&self) -> String {
            "ids".into()
        }
    }

    struct IdsTo(Arc<IdsInFile>);

    impl ChunkIdWriter for IdsTo {
        fn push(&mut self, id: &ChunkId) -> Result<(), String> {
            self.0
                .bytes
                .lock()
                .expect("not poisoned")
                .extend_from_slice(&id.0);
            Ok(())
        }
        fn finish(self: Box<Self>) -> Result<Arc<dyn crate::ChunkIdFile>, String> {
            Ok(self.0)
        }
    }

    fn lookups(release: &VerifiedRelease, a: &[u8], b: &[u8], c: &[u8]) {
        let id = |bytes: &[u8]| ChunkId::from(blake3::hash(bytes));
        assert_eq!(release.distinct_chunks(), 3);
        assert_eq!(release.chunk_count(), 4);
        let got = release.chunk(&id(b)).expect("b is listed");
        assert_eq!((got.id, got.size, got.stored_size), (id(b), 2048, 2048));
        assert_eq!(release.first_position(&id(a)), Some((0, 0, 2048)));
        assert_eq!(release.first_position(&id(c)), Some((3, 6144, 2048)));
        assert_eq!(release.chunk(&ChunkId([7; 32])), None);
        assert_eq!(release.first_position(&ChunkId([7; 32])), None);
        assert_eq!(
            release.position_ranges().collect::<Vec<_>>(),
            [(0, 2048), (2048, 2048), (4096, 2048), (6144, 2048)]
        );
    }
}
