//! A verified release, shared: the signed manifest checked against a trust root
//! once, decoded once, with its chunk table, behind an [`Arc`] that every engine
//! installing it holds (a fleet of simulated devices, or one device that is offered
//! the same release again, never verifies or decodes it twice).

use std::sync::Arc;

use shoal_artifact::{Manifest, PayloadKind};
use shoal_signing::{EnvelopeRef, RoleName, TrustRoot};

use super::table::ChunkTable;
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
    /// exactly one payload, a root filesystem image.
    pub fn verify(
        root: &TrustRoot,
        envelope: Vec<u8>,
        wall_unix_s: Option<u64>,
    ) -> Result<Arc<VerifiedRelease>, OfferError> {
        Self::verify_as(root, envelope, wall_unix_s, false)
    }

    /// [`VerifiedRelease::verify`] for a driver that stored `envelope` durably
    /// before the offer, as a file named by the BLAKE3 of its bytes: verified and
    /// decoded the same way, but the bytes are dropped as soon as the manifest is
    /// decoded, before the chunk table is built, and a deployment of it names the
    /// stored envelope by its hash ([`Record::EnvelopeStored`]) instead of
    /// carrying it. An 8 GiB image's envelope (17.6 MB) is then never in memory
    /// beside its chunk table.
    ///
    /// [`Record::EnvelopeStored`]: crate::Record::EnvelopeStored
    pub fn verify_stored(
        root: &TrustRoot,
        envelope: Vec<u8>,
        wall_unix_s: Option<u64>,
    ) -> Result<Arc<VerifiedRelease>, OfferError> {
        Self::verify_as(root, envelope, wall_unix_s, true)
    }

    fn verify_as(
        root: &TrustRoot,
        envelope: Vec<u8>,
        wall_unix_s: Option<u64>,
        stored: bool,
    ) -> Result<Arc<VerifiedRelease>, OfferError> {
        // Decoded in place (the signed bytes are not copied).
        let parsed = EnvelopeRef::from_bytes(&envelope)?;
        let signed = root.verify_ref(RoleName::Release, &parsed, wall_unix_s)?;
        let mut manifest = Manifest::from_cbor(signed)?;
        let manifest_hash = *blake3::hash(signed).as_bytes();
        drop(parsed);
        let (envelope, stored) = if stored {
            let hash = *blake3::hash(&envelope).as_bytes();
            // Dropped here, before the table is built (a shadowing `let` would
            // keep it to the end of the function: 17.6 MB at 8 GiB beside the
            // table being built, the install's peak until session 9).
            drop(envelope);
            (None, Some(hash))
        } else {
            (Some(Arc::<[u8]>::from(envelope)), None)
        };
        let rootfs: Vec<usize> = (0..manifest.payloads.len())
            .filter(|&i| manifest.payloads[i].kind == PayloadKind::RootfsImage)
            .collect();
        if rootfs.len() != 1 || manifest.payloads.len() != 1 {
            return Err(OfferError::Payloads {
                rootfs: rootfs.len(),
                other: manifest.payloads.len() - rootfs.len(),
            });
        }
        let payload = rootfs[0];
        let release = Release::with_hash(&manifest, payload, manifest_hash);
        // The table takes the chunk list over (it is the table's storage by
        // position), so the list is never held twice.
        let table = ChunkTable::new(std::mem::take(&mut manifest.payloads[payload].chunks));
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

    /// Heap bytes of its chunk table (what a fleet shares).
    pub fn table_heap_bytes(&self) -> usize {
        self.table.heap_bytes()
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
