//! What the engine remembers across restarts: the records a driver persists and hands
//! back to [`Engine::new`](crate::Engine::new).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shoal_artifact::{ChunkId, Chunking, Manifest};

pub use shoal_bootctl::Slot;

/// Index of a slot in per-slot arrays: `0` for A, `1` for B.
pub fn slot_ordinal(slot: Slot) -> usize {
    match slot {
        Slot::A => 0,
        Slot::B => 1,
    }
}

/// A release as the device remembers it: enough to name it, check `depends` against
/// it and prove what a slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Release name.
    pub name: String,
    /// Release version.
    pub version: String,
    /// Anti-rollback counter of the release.
    pub security_counter: u64,
    /// BLAKE3 of the release's manifest CBOR.
    #[serde(with = "serde_bytes")]
    pub manifest_hash: [u8; 32],
    /// Size of the root filesystem payload in bytes.
    pub payload_size: u64,
    /// BLAKE3 of the root filesystem payload.
    #[serde(with = "serde_bytes")]
    pub payload_hash: [u8; 32],
    /// What the device has once this release runs.
    pub provides: BTreeMap<String, String>,
}

impl Release {
    /// The release described by a verified manifest whose root filesystem payload is
    /// `payload` (an index into `manifest.payloads`).
    pub fn from_manifest(manifest: &Manifest, payload: usize) -> Release {
        Release::with_hash(manifest, payload, manifest.hash())
    }

    /// The same, with the manifest's hash known (BLAKE3 of the signed bytes it was
    /// decoded from: canonical CBOR, so no need to encode it again).
    pub(crate) fn with_hash(
        manifest: &Manifest,
        payload: usize,
        manifest_hash: [u8; 32],
    ) -> Release {
        let p = &manifest.payloads[payload];
        Release {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            security_counter: manifest.security_counter,
            manifest_hash,
            payload_size: p.size,
            payload_hash: p.hash,
            provides: manifest.provides.clone(),
        }
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.version)
    }
}

/// Where a deployment is in its lifecycle. Every phase is persisted before the engine
/// asks for the side effect that leaves it, so a restart at any instant resumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Chunks are being written into the target slot; the progress journal says which.
    Fetching,
    /// The whole payload was re-read from the slot and its hash matched.
    Verified,
    /// The bootloader will try the target slot once on the next boot.
    TrialArmed,
    /// A reboot into the trial was asked for.
    Rebooting,
    /// Running from the target slot in a trial boot; health checks decide.
    Trial,
    /// The trial failed; the bootloader is being pointed back at the other slot.
    RollingBack {
        /// Why the trial failed.
        reason: String,
    },
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Fetching => f.write_str("fetching"),
            Phase::Verified => f.write_str("verified"),
            Phase::TrialArmed => f.write_str("trial-armed"),
            Phase::Rebooting => f.write_str("rebooting"),
            Phase::Trial => f.write_str("trial"),
            Phase::RollingBack { .. } => f.write_str("rolling-back"),
        }
    }
}

/// The deployment in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// The release being deployed.
    pub release: Release,
    /// The slot it is written to (the inactive slot when it started).
    pub target: Slot,
    /// Where it is.
    pub phase: Phase,
}

/// How a deployment ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The release runs and is permanent.
    Committed,
    /// The release was rolled back; the device runs the previous one.
    RolledBack {
        /// Why.
        reason: String,
    },
    /// The install stopped before the trial boot; rerunning it resumes.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The last deployment result, for `shoal status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The release concerned.
    pub release: Release,
    /// Its slot.
    pub slot: Slot,
    /// How it ended.
    pub verdict: Verdict,
}

/// One chunk found in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedChunk {
    /// Its id.
    pub id: ChunkId,
    /// Byte offset in the slot.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Which chunks a slot holds, and how it was cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotIndex {
    /// The FastCDC parameters the slot was cut with.
    pub chunking: Chunking,
    /// The chunks, in slot order (an id may repeat).
    pub chunks: Vec<IndexedChunk>,
}

/// Everything the engine needs from the device store to start (or restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// The slot the device runs from.
    pub active: Slot,
    /// The anti-rollback floor: the highest security counter ever committed.
    pub floor: u64,
    /// The verified release each slot holds, by [`slot_ordinal`].
    pub releases: [Option<Release>; 2],
    /// Capacity of each slot in bytes, by [`slot_ordinal`].
    pub slot_capacity: [u64; 2],
    /// The deployment in progress.
    pub deployment: Option<Deployment>,
    /// The signed manifest envelope of the deployment in progress, as offered
    /// (persisted once per deployment: [`Record::Envelope`]).
    pub envelope: Option<Arc<[u8]>>,
    /// Progress journal of the deployment: indexes of payload chunks written, synced
    /// and recorded.
    pub journaled: Vec<u32>,
    /// Wire bytes the deployment in progress asked of WAN sources so far (its data
    /// budget's spent part; persisted with the journal).
    pub wan_spent_bytes: u64,
    /// How the active slot's recorded index was cut, when the store holds a
    /// complete one (its entries are read through `indexes`, by id).
    pub active_index: Option<shoal_artifact::Chunking>,
    /// Where the slot indexes the store records are read ([`IndexStore`]); a
    /// state with an `active_index` has one.
    pub indexes: Option<crate::engine::IndexStore>,
    /// The last deployment result.
    pub last: Option<Outcome>,
}

impl DeviceState {
    /// A device that Shoal has never touched: running `active`, nothing recorded.
    pub fn fresh(active: Slot, slot_capacity: [u64; 2]) -> DeviceState {
        DeviceState {
            active,
            floor: 0,
            releases: [None, None],
            slot_capacity,
            deployment: None,
            envelope: None,
            journaled: Vec::new(),
            wan_spent_bytes: 0,
            active_index: None,
            indexes: None,
            last: None,
        }
    }
}

/// A change to the device store. A [`Output::Persist`](crate::Output::Persist) carries
/// several; the driver applies them in one atomic transaction, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Replace (or clear) the deployment in progress.
    Deployment(Option<Deployment>),
    /// Replace (or clear) the signed envelope of the deployment in progress
    /// (written once when a deployment starts, cleared when it ends).
    Envelope(Option<Arc<[u8]>>),
    /// The deployment's signed envelope is the one the driver stored durably
    /// before the offer, whose bytes hash (BLAKE3) to this
    /// ([`VerifiedRelease::verify_stored`](crate::VerifiedRelease::verify_stored)):
    /// the store names it as the deployment's envelope, as [`Record::Envelope`]
    /// with its bytes would, and the engine holds no copy.
    EnvelopeStored([u8; 32]),
    /// Wire bytes the deployment in progress asked of WAN sources so far.
    WanSpent(u64),
    /// Forget the progress journal.
    ClearProgress,
    /// Add payload chunk indexes to the progress journal.
    Journaled(Vec<u32>),
    /// Set (or clear) the release a slot holds.
    SlotRelease {
        /// The slot.
        slot: Slot,
        /// Its release.
        release: Option<Release>,
    },
    /// Replace (or drop) a slot's chunk index.
    SlotIndex {
        /// The slot.
        slot: Slot,
        /// Its index.
        index: Option<SlotIndex>,
    },
    /// The chunks the driver wrote to the store for `slot`
    /// ([`Input::SlotIndexWritten`](crate::Input::SlotIndexWritten)) are its
    /// index, cut with `chunking`: recording the chunking makes them so.
    SlotIndexWritten {
        /// The slot.
        slot: Slot,
        /// How it was cut.
        chunking: shoal_artifact::Chunking,
        /// Entries written (distinct ids).
        chunks: u64,
    },
    /// Replace a slot's chunk index with the chunk list of the release it now
    /// holds (verified there): the store writes it from the release's table
    /// ([`VerifiedRelease::index_by_id`](crate::VerifiedRelease::index_by_id)), so
    /// the engine builds no copy of the list (48 bytes a chunk).
    ReleaseIndex {
        /// The slot.
        slot: Slot,
        /// The release it holds.
        release: Arc<crate::VerifiedRelease>,
    },
    /// Remove one chunk from a slot's index (it did not hash as recorded).
    Unindex {
        /// The slot.
        slot: Slot,
        /// The chunk.
        id: ChunkId,
    },
    /// The slot the device runs from.
    Active(Slot),
    /// Raise the anti-rollback floor.
    Floor(u64),
    /// The last deployment result.
    Last(Outcome),
}
