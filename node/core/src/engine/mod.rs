//! The engine state machine, by concern: this module holds the contract (inputs,
//! outputs, events, status) and the entry points; `lifecycle` the deployment's
//! phases (offer, verify, arm, boot, commit, rollback, a slot changed outside
//! Shoal, a commit without a boot check); `pick` the choice of a release among
//! several; `scheduler` the chunk plan and the fetch scheduler with its source
//! registry (and the data budget); `lan` the LAN cooperation; `need`, `table` and
//! `index` the per-chunk state, the release's chunk table and the active slot's
//! index in dense arrays. Timers are named in [`crate::timer`], the WAN rate cap is
//! [`crate::pacing`]; which failures are worth retrying is
//! [`InstallError::worth_retrying`].

use std::collections::{BTreeMap, VecDeque};

use shoal_artifact::{ChunkId, Chunking, VerifiedChunk};
use shoal_signing::TrustRoot;
use tracing::{info, warn};

use crate::error::{InstallError, IoOp, SourceError};
use crate::source::{
    FetchFailure, Gone, Holds, Origin, RequestId, RetryConfig, SourceId, SourceInfo, SourceStatus,
};
use crate::state::{DeviceState, Outcome, Phase, Record, Release, Slot, SlotIndex, Verdict};
use crate::time::{Instant, Rng};
use crate::timer::TimerTable;

pub(crate) mod adopt;
mod budget;
mod index;
mod lan;
mod lan_manifest;
mod lifecycle;
mod need;
mod pick;
mod release;
mod scheduler;
mod table;

pub use adopt::{PeerRelease, compare_versions, peer_busy, peer_release};
pub use index::{IndexReadError, IndexReader, IndexStore, MemIndexes};
pub use lan::{NodeKey, Swarm};
pub use lan_manifest::{ManifestPlan, ManifestStep, ServerWhy};
pub use lifecycle::{INDEX_FOUND_PART, INDEX_SAMPLE_PART};
pub use pick::{Candidate, PickError};
pub use release::VerifiedRelease;
pub use table::{ChunkIdFile, ChunkIdWriter};

use scheduler::{Job, Need, Step};

/// What the engine is told about the device and how it should pace itself.
#[derive(Debug, Clone)]
pub struct Config {
    /// This device's type; a release must list it.
    pub device_type: String,
    /// What the device provides besides what its running release provides (Mender's
    /// provides), checked against a release's `depends`.
    pub provides: BTreeMap<String, String>,
    /// The trust root releases must be signed under.
    pub trust_root: TrustRoot,
    /// Bytes written between two progress journal commits (each is a slot sync plus
    /// one store transaction). Work lost to a power cut is at most this much.
    pub journal_batch_bytes: u64,
    /// Longest time a written chunk waits for its journal commit. Only journaled
    /// chunks are announced to LAN peers, and a swarm member that announces nothing
    /// for [`Config::lan_timeout`] loses its chunks to the others: on a slow link a
    /// batch of [`Config::journal_batch_bytes`] takes longer than that to fill, so a
    /// batch is also committed once its first chunk is this old.
    pub journal_batch_age: std::time::Duration,
    /// Reads of the active slot asked for at once.
    pub reads_in_flight_max: usize,
    /// Timeouts and backoff of request sources (their request limits are per
    /// source: [`SourceInfo::limits`]).
    pub retry: RetryConfig,
    /// How long a LAN swarm member may make no progress (announce no new chunk)
    /// before the chunks it owns are fetched by their next owner
    /// ([`Engine::set_swarm`]).
    pub lan_timeout: std::time::Duration,
    /// Bytes of writes asked for and not yet [`Input::Written`] beyond which no more
    /// chunks are read or fetched (how a slow disk slows the install down).
    pub writing_bytes_max: u64,
    /// How far (in payload bytes) reads of the active slot may run ahead of the
    /// position of the stream they keep pace with ([`Input::StreamAt`]). 256 KiB.
    pub stream_read_lead_bytes: u64,
    /// A data budget per deployment: most wire bytes (the manifest's stored sizes)
    /// asked of WAN sources. A plan that needs more is refused before anything is
    /// fetched ([`InstallError::OverBudget`]); an install never asks for more.
    /// Counted per deployment: the bytes asked are persisted with the journal
    /// ([`Record::WanSpent`](crate::Record::WanSpent)) and when an install stops, so
    /// a resumed install is checked against what it still needs plus what it spent.
    pub wan_budget_bytes: Option<u64>,
    /// A WAN rate cap in wire bytes per second (a token bucket with a burst of a
    /// tenth of a second, and at least one chunk).
    pub wan_rate_bytes_per_s: Option<u64>,
    /// Seeds every random choice (which source serves a chunk).
    pub seed: u64,
    /// The bytes of the active slot cut for an install, at least (and at least an
    /// [`INDEX_SAMPLE_PART`]th of the slot), before the engine judges whether the
    /// rest is worth cutting ([`Engine::index_pays`]). 64 MiB.
    pub index_sample_min_bytes: u64,
    /// How long a resumed cut of the active slot ([`Output::CutRest`]) may
    /// tell no progress ([`Input::IndexProgress`]) before it is given up
    /// ([`Output::StopIndex`]; not resumed again during the install) and the
    /// network fetches paused for it go ahead. 5 s.
    pub cut_silence: std::time::Duration,
}

impl Config {
    /// A configuration with default pacing.
    pub fn new(device_type: impl Into<String>, trust_root: TrustRoot) -> Config {
        Config {
            device_type: device_type.into(),
            provides: BTreeMap::new(),
            trust_root,
            journal_batch_bytes: 4 * 1024 * 1024,
            journal_batch_age: std::time::Duration::from_secs(1),
            reads_in_flight_max: 4,
            retry: RetryConfig::default(),
            lan_timeout: std::time::Duration::from_secs(5),
            writing_bytes_max: 16 * 1024 * 1024,
            stream_read_lead_bytes: 256 * 1024,
            wan_budget_bytes: None,
            wan_rate_bytes_per_s: None,
            seed: 0,
            index_sample_min_bytes: 64 * 1024 * 1024,
            cut_silence: std::time::Duration::from_secs(5),
        }
    }
}

/// An update offered to the device.
#[derive(Debug, Clone)]
pub struct Offer {
    /// The signed manifest envelope (bytes as in the artifact or chunk store).
    pub envelope: Vec<u8>,
    /// Wall-clock Unix seconds for the trust root expiry check; `None` when the device
    /// has no trustworthy clock.
    pub wall_unix_s: Option<u64>,
    /// Where the chunks can come from, besides the active slot (more can be added
    /// later: [`Engine::add_source`]).
    pub sources: Vec<SourceInfo>,
    /// Reboot into the trial as soon as it is armed.
    pub reboot: bool,
}

/// What the bootloader says at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boot {
    /// The slot the device booted from.
    pub slot: Slot,
    /// Whether this boot is a trial (not yet committed).
    pub trial: bool,
    /// The slot the bootloader will try on the next boot, if a trial is armed and not
    /// yet attempted.
    pub pending: Option<Slot>,
}

impl Boot {
    /// What the engine is told at boot, from the running slot and what the
    /// bootloader's environment holds (the device's `BootControl`, or a simulated
    /// [`Board`](shoal_bootctl::model::Board)): a trial of the running slot makes
    /// this boot a trial; a trial of the other slot with tries left is pending.
    pub fn from_bootloader(active: Slot, state: &shoal_bootctl::BootState) -> Boot {
        let trial = state.trial;
        Boot {
            slot: active,
            trial: trial.is_some_and(|t| t.slot == active),
            pending: trial
                .filter(|t| t.slot != active && t.tries_left > 0)
                .map(|t| t.slot),
        }
    }
}

/// Something the driver tells the engine: the result of an [`Output`], or data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The slot asked for by [`Output::IndexSlot`] was cut into chunks.
    SlotIndexed {
        /// The slot.
        slot: Slot,
        /// Its chunks.
        index: SlotIndex,
    },
    /// The slot asked for by [`Output::IndexSlot`] was cut, and the driver wrote
    /// its chunks to the device store as it went, in batches (its old index
    /// cleared first), without recording the chunking: [`DeviceState::indexes`]
    /// reads them. The engine takes them as the slot's index (read by id, never
    /// loaded) and persists [`Record::SlotIndexWritten`], which makes them the
    /// slot's index; entries written without that record (a power cut while they
    /// were written, or an index the engine did not take) are no index.
    ///
    /// A `partial` index lists only chunks the install waiting for it needs (the
    /// driver checked those where it expected them: [`Engine::awaited_chunks`]):
    /// the engine takes it for that install only. It is not recorded (the slot has
    /// no index for a later run) and is dropped when the install ends, so another
    /// install, or this one resumed, indexes the slot again.
    ///
    /// A `sampled` index (partial too) lists the needed chunks where the release
    /// the slot should hold puts them, but the driver read and hashed only a
    /// sample of them: the rest are hashed when read as any slot read is. One of
    /// them that does not hash to its id, and that no source holds, makes the
    /// engine cut the whole slot by content ([`Output::CutRest`] from 0): the
    /// slot may hold it elsewhere.
    SlotIndexWritten {
        /// The slot.
        slot: Slot,
        /// How it was cut.
        chunking: Chunking,
        /// Entries written (distinct ids).
        chunks: u64,
        /// Whether it lists only chunks the waiting install needs.
        partial: bool,
        /// Whether only a sample of its entries was checked (see above).
        sampled: bool,
    },
    /// The driver cutting the active slot for the install waiting for its index
    /// ([`Output::IndexSlot`]) has cut the slot's first `cut` bytes and handed over
    /// every needed chunk it met in them ([`Engine::needed_chunks`]). The driver
    /// sends it after each block it cuts (1 MiB), after the chunks that block
    /// covers; the engine judges the cut only at the end of each window (tens of
    /// MiB), so a driver may send it less often. The engine may answer
    /// [`Output::StopIndex`]: the index does not pay (see
    /// [`Engine::index_pays`]).
    ///
    /// The same for a resumed cut ([`Output::CutRest`]): `cut` still counts
    /// from offset 0 of the slot.
    IndexProgress {
        /// The slot.
        slot: Slot,
        /// Bytes of the slot cut so far, from offset 0.
        cut: u64,
    },
    /// The cut asked for by [`Output::CutRest`] reached its end, or could not
    /// go on (a read of the slot failed: the device says so in its log, and the
    /// install goes on from the sources): every needed chunk it met was handed
    /// over before this. It is no index of the slot (the
    /// part before the stop was not kept); the engine records nothing.
    CutRestEnded {
        /// The slot.
        slot: Slot,
    },
    /// A chunk, verified by the driver: the answer to [`Output::Read`] or
    /// [`Output::Fetch`], or pushed by a stream source. The engine never takes
    /// unverified bytes: the driver hashes what it read or received against the id
    /// it asked for ([`VerifiedChunk::check`], or [`Input::checked`], which also
    /// builds the [`Input::Corrupt`] answer) or decodes a stored chunk
    /// ([`shoal_artifact::RawChunk::verify_chunk`]). The engine checks it is a chunk
    /// it needs, of the manifest's size.
    Chunk {
        /// Where it came from.
        origin: Origin,
        /// The proof (its bytes, or in the simulator only its id and length).
        chunk: VerifiedChunk,
    },
    /// The bytes the driver read or received for chunk `id` do not hash to it (or
    /// do not decode). From a source, the source is banned for the deployment;
    /// from the active slot, the chunk is fetched instead (and, if the slot's index
    /// named it there, dropped from the index).
    Corrupt {
        /// Where they came from.
        origin: Origin,
        /// The chunk they should have been.
        id: ChunkId,
    },
    /// A request failed as a whole; the driver says what kind of failure it is.
    /// One source's failure never fails the install while another can serve.
    FetchFailed {
        /// The source.
        source: SourceId,
        /// The request ([`Output::Fetch::request`]).
        request: RequestId,
        /// Retry later, not there, or drop the source.
        failure: FetchFailure,
    },
    /// A request source does not hold a chunk.
    Unavailable {
        /// The source.
        source: SourceId,
        /// The chunk.
        id: ChunkId,
    },
    /// A stream source has read chunk `id` and is about to hand it over (or
    /// decode it): it has reached the payload offset where `id` first lies.
    /// While the stream is the only source open, reads of the active slot keep
    /// to that position (up to [`Config::stream_read_lead_bytes`] ahead), so a
    /// driver that sends this before it reads the references of a delta-encoded
    /// chunk gets the reads of the chunks around them first. Optional: without
    /// it, the position is the end of the last chunk the stream handed over.
    StreamAt {
        /// The stream.
        source: SourceId,
        /// The chunk it reached.
        id: ChunkId,
    },
    /// A stream source has no more chunks.
    SourceEnded {
        /// The source.
        source: SourceId,
    },
    /// An [`Output::Write`] was carried out (or queued in order behind the writes
    /// before it): its bytes no longer count against
    /// [`Config::writing_bytes_max`].
    Written {
        /// The slot.
        slot: Slot,
        /// The bytes written (data length times offsets).
        bytes: u64,
    },
    /// An [`Output::Sync`] returned: every write before it is durable. Only then
    /// does the engine journal the chunks it covers.
    Synced {
        /// The slot.
        slot: Slot,
    },
    /// The answer to [`Output::HashSlot`].
    SlotHashed {
        /// The slot.
        slot: Slot,
        /// BLAKE3 of its first `len` bytes.
        hash: [u8; 32],
    },
    /// The answer to [`Output::RunHealthChecks`]: `Err` says which check failed, why.
    HealthChecked(Result<(), String>),
    /// The driver stopped reading a source (a stream it cannot go on reading, or
    /// a source whose deployment was withdrawn) and says why; the install stops
    /// with [`InstallError::Source`], and [`InstallError::worth_retrying`] tells
    /// whether a rerun can do better. The journal is kept.
    SourceFailed {
        /// The source.
        source: SourceId,
        /// Why, as the driver classified it.
        fault: crate::error::SourceFault,
    },
    /// The driver could not carry out an output. The engine stops what it was
    /// doing; the driver should restore it from its store ([`Engine::new`]) before
    /// going on. A failed request of a request source is [`Input::FetchFailed`]
    /// instead, and a source the driver cannot go on reading
    /// [`Input::SourceFailed`].
    Failed {
        /// What failed.
        op: IoOp,
        /// What the OS said.
        message: String,
    },
}

impl Input {
    /// What a driver hands over for bytes it read or received as chunk `id`:
    /// [`Input::Chunk`] when they hash to it, else [`Input::Corrupt`]. (Hashing is
    /// the driver's work; this is the one line most drivers need.)
    pub fn checked(origin: Origin, id: ChunkId, data: Vec<u8>) -> Input {
        match VerifiedChunk::check(id, data) {
            Ok(chunk) => Input::Chunk { origin, chunk },
            Err(_) => Input::Corrupt { origin, id },
        }
    }
}

/// The offsets of an [`Output::Write`]: the chunk's first position in the payload
/// and any repeats, without a heap allocation: a single position is held inline,
/// and every position of a repeated chunk is the release's shared list.
#[derive(Debug, Clone)]
pub struct Offsets {
    first: u64,
    more: More,
}

/// The offsets after the first.
#[derive(Debug, Clone)]
enum More {
    /// Listed here (empty for a single position; a list only when some positions
    /// of a repeated chunk were written before, in an earlier run).
    Owned(Vec<u64>),
    /// Every repeat of the chunk: the release's chunk table's list.
    Shared(std::sync::Arc<[u64]>),
}

impl Offsets {
    /// One offset.
    pub fn one(offset: u64) -> Offsets {
        Offsets {
            first: offset,
            more: More::Owned(Vec::new()),
        }
    }

    /// `first` and the shared list of the repeats after it.
    pub(crate) fn shared(first: u64, more: std::sync::Arc<[u64]>) -> Offsets {
        Offsets {
            first,
            more: More::Shared(more),
        }
    }

    /// `first` and the listed ones after it.
    pub(crate) fn listed(first: u64, more: Vec<u64>) -> Offsets {
        Offsets {
            first,
            more: More::Owned(more),
        }
    }

    fn more(&self) -> &[u64] {
        match &self.more {
            More::Owned(v) => v,
            More::Shared(s) => s,
        }
    }

    /// How many.
    pub fn len(&self) -> usize {
        1 + self.more().len()
    }

    /// Never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The offsets, in payload order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.first).chain(self.more().iter().copied())
    }

    /// The offsets as a vector.
    pub fn into_vec(self) -> Vec<u64> {
        let mut v = Vec::with_capacity(self.len());
        v.push(self.first);
        v.extend_from_slice(self.more());
        v
    }
}

/// The same offsets, however held.
impl PartialEq for Offsets {
    fn eq(&self, other: &Offsets) -> bool {
        self.first == other.first && self.more() == other.more()
    }
}

impl Eq for Offsets {}

/// Something the engine wants done. Carry them out in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Cut the slot's first `len` bytes into chunks with `chunking`; answer
    /// [`Input::SlotIndexed`] (and persist it as the slot's index).
    IndexSlot {
        /// The slot.
        slot: Slot,
        /// FastCDC parameters.
        chunking: Chunking,
        /// Bytes to cut.
        len: u64,
    },
    /// Stop the cut of the active slot asked for by [`Output::IndexSlot`]: the
    /// install waiting for it goes on without it (it took the needed chunks met so
    /// far, and found too few of them for the rest of the slot to be worth
    /// reading: [`Engine::index_pays`]). Hand over nothing more from the cut, and
    /// answer nothing: the slot has no index from it (what was cut is not the
    /// slot's index, and is not kept as one).
    ///
    /// Also stops a resumed cut ([`Output::CutRest`]), by the same rule, or
    /// because the install needs nothing more: answer nothing then either.
    StopIndex {
        /// The slot.
        slot: Slot,
    },
    /// Cut the active slot again from byte `from` (where a cut that
    /// [`Output::StopIndex`] stopped had got to) to `len`, while the install goes
    /// on fetching: the reason for the stop no longer holds (a WAN source or a LAN
    /// peer came, or a local source turned out to lack chunks or went away), so
    /// each needed chunk the rest of the slot holds saves a download. As for
    /// [`Output::IndexSlot`] with an install waiting: hand over every needed chunk
    /// met ([`Engine::needed_chunks`]) as [`Input::Chunk`] from the slot, tell the
    /// progress with [`Input::IndexProgress`] (bytes from offset 0), and answer
    /// [`Input::CutRestEnded`] at the end. A driver should start a few chunks
    /// before `from` (the device: at the block boundary at or before
    /// `from - 2 * max_size`), cutting as though a chunk started there: the cut
    /// from a point meets the slot's own chunk starts within a few chunks, so the
    /// chunk that straddles `from` and those after it are met. Nothing of it
    /// is recorded as the slot's index. The engine holds the fetches from the
    /// network of chunks the rest of the slot may hold meanwhile
    /// ([`Engine::index_pays`] says for how long), and may stop it again
    /// ([`Output::StopIndex`]).
    CutRest {
        /// The slot.
        slot: Slot,
        /// FastCDC parameters.
        chunking: Chunking,
        /// Where the cut resumes (bytes from offset 0).
        from: u64,
        /// Where it ends.
        len: u64,
    },
    /// Read a chunk from a slot; answer [`Input::Chunk`] with `Origin::Slot(slot)`.
    Read {
        /// The slot.
        slot: Slot,
        /// The chunk expected there.
        id: ChunkId,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Ask a request source for chunks (one request, at most the source's
    /// [`SourceLimits`](crate::SourceLimits) in bytes and count); answer each chunk
    /// with [`Input::Chunk`] or [`Input::Unavailable`], in any order, or the whole
    /// request with [`Input::FetchFailed`]. A source that stays silent past its
    /// timeout loses the request (see [`Output::Cancel`]).
    Fetch {
        /// The source.
        source: SourceId,
        /// Names the request.
        request: RequestId,
        /// The chunks.
        ids: Vec<ChunkId>,
    },
    /// The engine no longer wants the answers to a request (the source was silent,
    /// failed, or other sources brought its chunks): stop it if it still runs. May
    /// name a request that already finished; ignore it then. Answers that still
    /// arrive are accepted if a chunk is still needed.
    Cancel {
        /// The source.
        source: SourceId,
        /// The request.
        request: RequestId,
    },
    /// Write `data` at each offset of the slot (a chunk may repeat in a payload);
    /// answer [`Input::Written`] once done.
    Write {
        /// The slot.
        slot: Slot,
        /// The chunk written (so a driver can announce it to its peers).
        id: ChunkId,
        /// Byte offsets.
        offsets: Offsets,
        /// The bytes (verified; empty for a simulated chunk).
        data: Vec<u8>,
        /// The chunk's length: `data`'s, or a simulated chunk's (which carries no
        /// bytes), so a driver that models writes needs no lookup.
        len: u32,
    },
    /// Make every write to the slot so far durable; answer [`Input::Synced`] once
    /// it is (the journal records of those writes wait for it).
    Sync {
        /// The slot.
        slot: Slot,
    },
    /// Apply these records to the device store in one durable transaction.
    Persist(Vec<Record>),
    /// Hash the slot's first `len` bytes; answer [`Input::SlotHashed`].
    HashSlot {
        /// The slot.
        slot: Slot,
        /// Bytes to hash.
        len: u64,
    },
    /// Make sure the bootloader will not try `slot` (it is about to be written).
    DisarmTrial {
        /// The slot.
        slot: Slot,
    },
    /// Tell the bootloader to try `slot` once on the next boot.
    ArmTrial {
        /// The slot.
        slot: Slot,
    },
    /// Tell the bootloader that `slot`, now running in a trial, is permanent.
    Commit {
        /// The slot.
        slot: Slot,
    },
    /// Tell the bootloader to boot `to` again.
    Rollback {
        /// The slot to go back to.
        to: Slot,
    },
    /// Reboot the device.
    Reboot,
    /// Run the health checks; answer [`Input::HealthChecked`].
    RunHealthChecks,
    /// Tell the operator or the server.
    Event(Event),
}

impl Output {
    /// The bootloader step this output asks for, if it is one: a driver carries it
    /// out with the bootloader model ([`shoal_bootctl::model::Bootloader::apply`],
    /// or `BootControl::apply` on a real environment), which takes each step once
    /// however often it is asked (a rerun after a power cut).
    pub fn boot_step(&self) -> Option<shoal_bootctl::model::Step> {
        use shoal_bootctl::model::Step;
        match *self {
            Output::DisarmTrial { slot } => Some(Step::Disarm(slot)),
            Output::ArmTrial { slot } => Some(Step::Arm(slot)),
            Output::Commit { slot } => Some(Step::Commit(slot)),
            Output::Rollback { to } => Some(Step::RollbackTo(to)),
            _ => None,
        }
    }
}

/// Things worth reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An offer passed every check; writing into `target` starts (or resumes).
    Accepted {
        /// The release.
        release: Release,
        /// Its slot.
        target: Slot,
        /// Bytes the journal says are already written and verified.
        resumed_bytes: u64,
    },
    /// The active slot is being cut into chunks (first run on a device Shoal did not
    /// install, or a release with other chunking parameters).
    Indexing {
        /// The slot.
        slot: Slot,
        /// Bytes to cut.
        len: u64,
    },
    /// The cut of the active slot was stopped: what it cut held (next to) none of
    /// the release's chunks, and every chunk still needed comes from a local
    /// source that holds them all ([`Engine::index_pays`]).
    IndexStopped {
        /// The slot.
        slot: Slot,
        /// Bytes of it that were cut.
        cut: u64,
        /// Bytes of needed chunks (each once) found in them.
        found: u64,
    },
    /// The cut of the active slot that was stopped resumes ([`Output::CutRest`]):
    /// a source came or went, and some chunk still needed now comes only from the
    /// network, or a network source is open.
    CutResumed {
        /// The slot.
        slot: Slot,
        /// Where the cut resumes.
        from: u64,
    },
    /// Every chunk is written; the slot is being re-read to verify it.
    Verifying {
        /// The slot.
        slot: Slot,
    },
    /// The slot verified and the trial boot is armed.
    Armed {
        /// The release.
        release: Release,
        /// Its slot.
        slot: Slot,
    },
    /// The install stopped; offering the release again resumes it.
    Failed(InstallError),
    /// A source sent a chunk that does not hash to its id: it is not asked again
    /// during this deployment.
    SourceBanned {
        /// The source.
        source: SourceId,
    },
    /// Health checks are running in a trial boot.
    Checking {
        /// The release on trial.
        release: Release,
    },
    /// The trial boot was not attempted yet: the bootloader will try it next boot.
    TrialPending {
        /// The slot.
        slot: Slot,
    },
    /// The release is permanent.
    Committed {
        /// The release.
        release: Release,
        /// Its slot.
        slot: Slot,
    },
    /// The release was rolled back.
    RolledBack {
        /// The release.
        release: Release,
        /// Its slot.
        slot: Slot,
        /// Why.
        reason: String,
    },
}

/// Byte counts of the install in progress (this run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Payload size.
    pub total_bytes: u64,
    /// Bytes the journal said were done when this run started (not written again).
    pub resumed_bytes: u64,
    /// Bytes written this run.
    pub written_bytes: u64,
    /// Of those, bytes copied from the active slot.
    pub reused_bytes: u64,
    /// Of those, bytes that came from sources (uncompressed).
    pub fetched_bytes: u64,
    /// Distinct chunk bytes (uncompressed) from local sources (artifact, USB, store).
    pub local_bytes: u64,
    /// Distinct chunk bytes (uncompressed) from LAN peers.
    pub peer_bytes: u64,
    /// Distinct chunk bytes (uncompressed) from the WAN.
    pub wan_bytes: u64,
    /// Their bytes on the wire (the manifest's stored sizes).
    pub wan_wire_bytes: u64,
}

impl Progress {
    /// Bytes done: resumed plus written.
    pub fn done_bytes(&self) -> u64 {
        self.resumed_bytes + self.written_bytes
    }
}

/// A snapshot for `shoal status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The running slot.
    pub active: Slot,
    /// The anti-rollback floor.
    pub floor: u64,
    /// The release in each slot, by [`slot_ordinal`](crate::slot_ordinal).
    pub releases: [Option<Release>; 2],
    /// The deployment in progress.
    pub deployment: Option<DeploymentStatus>,
    /// The last result.
    pub last: Option<Outcome>,
    /// Byte counts of the install running in this engine (slot, local, peers, WAN).
    pub progress: Progress,
    /// The sources of the install running in this engine.
    pub sources: Vec<SourceStatus>,
}

/// The deployment part of [`Status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentStatus {
    /// The release.
    pub release: Release,
    /// Its slot.
    pub target: Slot,
    /// Its phase.
    pub phase: Phase,
    /// Bytes the journal records as written and verified.
    pub journal_bytes: u64,
}

/// The sans-IO update engine. See the crate documentation.
#[derive(Debug)]
pub struct Engine {
    config: Config,
    state: DeviceState,
    /// The active slot's chunk index.
    index: index::ActiveIndex,
    /// [`Engine::index`] lists only chunks the install in progress needs
    /// ([`Input::SlotIndexWritten`]'s `partial`): dropped when the install ends.
    index_partial: bool,
    job: Option<Job>,
    outputs: VecDeque<Output>,
    rng: Rng,
    progress: Progress,
    timers: TimerTable,
    /// Journal batches whose [`Output::Sync`] was asked for, oldest first: the
    /// slot, how many positions (the first of [`Engine::unsynced`]), their bytes.
    syncing: VecDeque<(Slot, usize, u64, std::sync::Arc<VerifiedRelease>)>,
    /// Positions written and not yet journaled, in order: those of the batches of
    /// [`Engine::syncing`] (their first `flushed`), then the open batch; an entry
    /// marked [`table::WHOLE_ENTRY`] stands for all its positions (a repeated
    /// chunk written everywhere at once). One buffer, its room kept by the store
    /// transactions, so that a chunk's write and a sync allocate nothing.
    unsynced: Vec<u32>,
    /// Positions of [`Engine::unsynced`] in the batches of [`Engine::syncing`].
    flushed: usize,
    /// The release of the deployment offered to this engine (shared).
    release: Option<std::sync::Arc<VerifiedRelease>>,
    /// Bytes the journal holds while no install runs in this engine (cached for
    /// `status()`; a running install keeps its own count).
    journal_bytes: u64,
}

impl Engine {
    /// An engine restored from what the device store holds (or
    /// [`DeviceState::fresh`]).
    pub fn new(config: Config, state: DeviceState) -> Engine {
        let mut engine = Engine {
            rng: Rng::new(config.seed),
            config,
            state,
            index: index::ActiveIndex::default(),
            index_partial: false,
            job: None,
            outputs: VecDeque::new(),
            progress: Progress::default(),
            timers: TimerTable::default(),
            syncing: VecDeque::new(),
            unsynced: Vec::new(),
            flushed: 0,
            release: None,
            journal_bytes: 0,
        };
        if engine
            .state
            .deployment
            .as_ref()
            .is_some_and(|d| d.phase == Phase::Fetching)
        {
            engine.journal_bytes =
                lifecycle::journal_bytes(engine.state.envelope.as_deref(), &engine.state.journaled);
        }
        if let Some(chunking) = engine.state.active_index.take() {
            let store = engine.state.indexes.as_ref();
            assert!(
                store.is_some(),
                "a recorded active index comes with its reader"
            );
            if let Some(store) = store {
                engine.index = index::ActiveIndex::stored(
                    engine.state.active,
                    chunking,
                    std::sync::Arc::clone(&store.0),
                );
            }
        }
        engine
    }

    fn set_index(&mut self, index: &SlotIndex) {
        self.index = index::ActiveIndex::own(index);
        self.index_partial = false;
    }

    /// Takes the install's job away (it ended); a partial index of the active slot
    /// (made for that install only) goes with it.
    fn take_job(&mut self) -> Option<Job> {
        if self.index_partial {
            self.index_partial = false;
            self.index = index::ActiveIndex::default();
        }
        self.job.take()
    }

    /// Shares `release`'s chunk table as the active slot's index, when the active
    /// slot is recorded as holding that release (for a simulated fleet: one copy of
    /// the index for every device running it). Returns whether it did.
    pub fn share_active_index(&mut self, release: &std::sync::Arc<VerifiedRelease>) -> bool {
        let holds = self.state.releases[crate::state::slot_ordinal(self.state.active)]
            .as_ref()
            .is_some_and(|r| r.manifest_hash == release.release.manifest_hash);
        if holds {
            self.index = index::ActiveIndex::release(std::sync::Arc::clone(release));
            self.index_partial = false;
        }
        holds
    }

    /// Heap bytes of the active slot's index held by this engine alone (none when
    /// it shares a release's table).
    pub fn active_index_bytes(&self) -> usize {
        if self.index.is_shared() {
            0
        } else {
            self.index.heap_bytes()
        }
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Engine::handle_timeout`] should next be called: the earliest of the
    /// named timers (a silent source's timeout, the end of a backoff).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Byte counts of the install in progress.
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// Whether the install in progress still needs chunk `id` (lets a driver skip
    /// decompressing stream chunks the device already has).
    pub fn wants(&self, id: &ChunkId) -> bool {
        self.job.as_ref().is_some_and(|j| {
            j.step == Step::Fetching
                && j.rel
                    .table
                    .entry(id)
                    .is_some_and(|e| j.need.get(e) != Need::Done)
        })
    }

    /// The byte ranges `(offset, len)` of the target slot that the journal records
    /// as written and synced: an interrupted install's verified work, which a
    /// resumed install does not write again. Empty without an install in progress.
    pub fn journaled_ranges(&self) -> Vec<(u64, u64)> {
        let Some(job) = self.job.as_ref() else {
            return Vec::new();
        };
        job.journaled
            .iter()
            .map(|p| {
                let e = job.rel.table.entry_at(p);
                (job.rel.table.offset_at(p), u64::from(job.rel.table.size(e)))
            })
            .collect()
    }

    /// The chunks the install in progress still needs. While the active slot is
    /// being indexed ([`Output::IndexSlot`]), [`Input::Chunk`] from the active slot
    /// is taken for any of them (hashed, then written like a chunk read from the
    /// slot later), so a driver that cuts the slot can hand over what it meets and
    /// the plan that follows the index leaves those chunks out.
    ///
    /// Empty when nothing may be written before the index is complete: every source
    /// says what it holds and some needed chunk is held by none, so the plan first
    /// checks the slot for it (a thin artifact whose base the device lacks is
    /// refused before a byte is written).
    ///
    /// While a resumed cut runs ([`Output::CutRest`]) the same: the chunks it
    /// may hand over.
    pub fn needed_chunks(&self) -> NeededChunks {
        if self.takes_while_indexing() || self.job.as_ref().is_some_and(|j| j.cutting_rest) {
            self.awaited_chunks()
        } else {
            NeededChunks::default()
        }
    }

    /// Whether the install waiting for the active slot's index takes the needed
    /// chunks met while the slot is indexed ([`Engine::needed_chunks`] is then not
    /// empty). `false` with no install waiting for an index, and when nothing may be
    /// written before the index is complete (a thin artifact: its missing chunks
    /// must all be found in the slot first).
    pub fn takes_while_indexing(&self) -> bool {
        self.job
            .as_ref()
            .is_some_and(|j| j.step == Step::Indexing && j.take_while_indexing)
    }

    /// The chunks the install waiting for the active slot's index still needs,
    /// whether or not it takes them while indexing: an index that lists where in the
    /// slot each of them lies serves this install as well as a whole one (a driver
    /// that knows what the slot holds may check only those chunks where it expects
    /// them). Empty with no install waiting for an index.
    pub fn awaited_chunks(&self) -> NeededChunks {
        self.job
            .as_ref()
            .filter(|j| j.cut_running())
            .map(|j| NeededChunks {
                bits: crate::Bitfield::from_members(j.rel.table.entries(), j.needed_entries()),
                rel: Some(std::sync::Arc::clone(&j.rel)),
            })
            .unwrap_or_default()
    }

    /// Whether the engine waits for an [`Input::Synced`] before it can go on (every
    /// chunk is written; the last journal batches wait for their syncs). A driver
    /// that answers syncs as they complete blocks for one only then.
    pub fn waiting_for_sync(&self) -> bool {
        !self.syncing.is_empty() && self.job.as_ref().is_some_and(|j| j.step == Step::Flushing)
    }

    /// Whether an install waits for the cut of the active slot it asked for
    /// ([`Output::IndexSlot`]): `false` once the cut was taken or stopped
    /// ([`Output::StopIndex`]).
    pub fn is_indexing(&self) -> bool {
        self.job.as_ref().is_some_and(|j| j.step == Step::Indexing)
    }

    /// Whether an install is running (fetching, indexing or verifying).
    pub fn is_installing(&self) -> bool {
        self.job.is_some()
    }

    /// The state for `shoal status`, from cached counters.
    pub fn status(&self) -> Status {
        let deployment = self.state.deployment.as_ref().map(|d| {
            let journal_bytes = match (&d.phase, self.job.as_ref()) {
                (Phase::Fetching, Some(job)) => job.journal_bytes,
                (Phase::Fetching, None) => self.journal_bytes,
                _ => d.release.payload_size,
            };
            DeploymentStatus {
                release: d.release.clone(),
                target: d.target,
                phase: d.phase.clone(),
                journal_bytes,
            }
        });
        Status {
            active: self.state.active,
            floor: self.state.floor,
            releases: self.state.releases.clone(),
            deployment,
            last: self.state.last.clone(),
            progress: self.progress,
            sources: self.sources(),
        }
    }

    /// The sources of the install in progress, with their state and byte counters.
    pub fn sources(&self) -> Vec<SourceStatus> {
        self.job
            .as_ref()
            .map(|j| j.sources.iter().map(|s| s.status()).collect())
            .unwrap_or_default()
    }

    /// Registers a source during the install in progress (a LAN peer appeared, the
    /// server became reachable, a USB stick was plugged in). Its chunks are asked
    /// for at once if it is the best source for them.
    pub fn add_source(&mut self, now: Instant, info: SourceInfo) -> Result<(), SourceError> {
        let job = self.job.as_ref().ok_or(SourceError::NoInstall)?;
        if job.source_index(info.id).is_some() {
            return Err(SourceError::Duplicate(info.id));
        }
        info!(source = %info.id, name = %info.name, class = %info.class, "source added");
        self.register(info);
        self.rescan(now);
        Ok(())
    }

    /// Replaces what a source says it holds ("peer P now has these chunks").
    pub fn update_source(
        &mut self,
        now: Instant,
        id: SourceId,
        holds: Holds,
    ) -> Result<(), SourceError> {
        let job = self.job.as_mut().ok_or(SourceError::NoInstall)?;
        let i = job.source_index(id).ok_or(SourceError::Unknown(id))?;
        job.set_holds(i, &holds);
        self.rescan(now);
        Ok(())
    }

    /// Forgets a source (it went away): its requests in flight go to the others.
    pub fn remove_source(&mut self, now: Instant, id: SourceId) -> Result<(), SourceError> {
        let job = self.job.as_ref().ok_or(SourceError::NoInstall)?;
        let i = job.source_index(id).ok_or(SourceError::Unknown(id))?;
        self.drop_source(i, Gone::Removed, now);
        self.pump(now);
        Ok(())
    }

    /// Feeds the result of an output, or data, to the engine.
    pub fn handle(&mut self, now: Instant, input: Input) {
        match input {
            Input::SlotIndexed { slot, index } => self.on_indexed(now, slot, index),
            Input::SlotIndexWritten {
                slot,
                chunking,
                chunks,
                partial,
                sampled,
            } => self.on_index_written(now, slot, chunking, chunks, partial, sampled),
            Input::IndexProgress { slot, cut } => self.on_index_progress(now, slot, cut),
            Input::CutRestEnded { slot } => self.on_cut_rest_ended(now, slot),
            Input::Chunk { origin, chunk } => self.on_chunk(now, origin, chunk),
            Input::Corrupt { origin, id } => self.on_corrupt(now, origin, id),
            Input::Unavailable { source, id } => self.on_unavailable(now, source, id),
            Input::FetchFailed {
                source,
                request,
                failure,
            } => self.on_fetch_failed(now, source, request, failure),
            Input::StreamAt { source, id } => self.on_stream_at(now, source, &id),
            Input::SourceEnded { source } => {
                if let Some(i) = self.job.as_ref().and_then(|j| j.source_index(source)) {
                    self.drop_source(i, Gone::Ended, now);
                }
                self.pump(now);
            }
            Input::Written { bytes, .. } => self.on_written(now, bytes),
            Input::Synced { slot } => self.on_synced(slot),
            Input::SlotHashed { slot, hash } => self.on_hashed(slot, hash),
            Input::HealthChecked(result) => self.on_health(result),
            Input::Failed { op, message } => {
                warn!(%op, %message, "driver reported a failure");
                self.stop(InstallError::Io { op, message });
            }
            Input::SourceFailed { source, fault } => {
                warn!(%source, %fault, "driver stopped reading a source");
                self.stop(InstallError::Source { id: source, fault });
            }
        }
        self.check_ids();
    }

    /// Runs the timers that are due ([`Engine::poll_timeout`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.job.is_some() {
            self.on_timeout(now);
        }
        self.check_ids();
    }

    /// Ends the install when its release's ids could not be read from the
    /// driver's file ([`VerifiedRelease::chunk_ids_error`]): what this step asked
    /// for is dropped (it may name an id read as zeros).
    fn check_ids(&mut self) {
        if let Some(message) = self.job.as_ref().and_then(|j| j.rel.table.ids_error()) {
            let message = message.to_owned();
            self.stop(InstallError::ChunkIds { message });
        }
    }

    /// Whether a cut of `slot` is taken: it is the active slot, and no install is
    /// past its indexing (cut for an install waiting for it, or at idle time:
    /// `index_idle`). `Some(waiting)`: taken, and an install waits for it.
    fn takes_cut(&self, slot: Slot) -> Option<bool> {
        if slot != self.state.active {
            return None;
        }
        match &self.job {
            None => Some(false),
            Some(j) if j.step == Step::Indexing => Some(true),
            Some(_) => None,
        }
    }

    fn on_indexed(&mut self, now: Instant, slot: Slot, index: SlotIndex) {
        let Some(waiting) = self.takes_cut(slot) else {
            return;
        };
        self.set_index(&index);
        self.persist(vec![Record::SlotIndex {
            slot,
            index: Some(index),
        }]);
        if waiting {
            self.plan(now);
        }
    }

    fn on_index_written(
        &mut self,
        now: Instant,
        slot: Slot,
        chunking: Chunking,
        chunks: u64,
        partial: bool,
        sampled: bool,
    ) {
        let Some(waiting) = self.takes_cut(slot) else {
            return;
        };
        if partial && !waiting {
            // Made for an install that is gone: no index of the slot.
            return;
        }
        let store = self.state.indexes.as_ref();
        assert!(
            store.is_some(),
            "an index written to the store comes from a driver that gave its reader"
        );
        let Some(store) = store else { return };
        self.index = index::ActiveIndex::stored(slot, chunking, std::sync::Arc::clone(&store.0));
        self.index_partial = partial;
        if let Some(job) = self.job.as_mut().filter(|_| waiting) {
            job.index_unproved = sampled && partial;
        }
        if !partial {
            self.persist(vec![Record::SlotIndexWritten {
                slot,
                chunking,
                chunks,
            }]);
        }
        if waiting {
            self.plan(now);
        }
    }

    /// A failure the driver reported: what it was asked to do is dropped, and the
    /// install in progress (if any) stops with `err`.
    fn stop(&mut self, err: InstallError) {
        // A cut of the active slot asked to stop is still stopped: the driver
        // would otherwise read the rest of the slot for nobody.
        self.outputs
            .retain(|o| matches!(o, Output::StopIndex { .. }));
        if self.job.is_some() {
            self.fail(err);
        } else {
            self.event(Event::Failed(err));
        }
    }

    /// Stops the install with `err` (the journal is kept); with the release's
    /// ids unreadable, that failure is the cause (what else failed read an id no
    /// chunk has).
    fn fail(&mut self, err: InstallError) {
        let err = match self.job.as_ref().and_then(|j| j.rel.table.ids_error()) {
            Some(message) => InstallError::ChunkIds {
                message: message.to_owned(),
            },
            None => err,
        };
        info!(error = %err, "install stopped");
        if let Some(dep) = &self.state.deployment {
            let outcome = Outcome {
                release: dep.release.clone(),
                slot: dep.target,
                verdict: Verdict::Failed {
                    reason: err.to_string(),
                },
            };
            self.state.last = Some(outcome.clone());
            let mut records = vec![Record::Last(outcome)];
            // What this run asked of the WAN counts when the deployment resumes.
            if let Some(asked) = self.job.as_ref().map(|j| j.budget.asked())
                && asked != self.state.wan_spent_bytes
            {
                records.push(Record::WanSpent(asked));
            }
            self.persist(records);
        }
        // The cut of the active slot that failed is over already; any other is
        // stopped with the install.
        let cut_failed = matches!(
            err,
            InstallError::Io {
                op: IoOp::IndexSlot,
                ..
            }
        );
        self.drop_job_stopping_cut(!cut_failed);
        self.timers.clear();
        self.event(Event::Failed(err));
    }

    /// Ends the install in memory; the journal it kept (a bitfield while it ran)
    /// goes back to the device state. A cut of the active slot it waits for (the
    /// first, or a resumed one) is stopped ([`Output::StopIndex`]): nobody is left
    /// to take what it meets.
    fn drop_job(&mut self) {
        self.drop_job_stopping_cut(true);
    }

    /// [`Engine::drop_job`]; `stop_cut` false when the cut itself failed (it is
    /// not running).
    fn drop_job_stopping_cut(&mut self, stop_cut: bool) {
        let cutting = self.job.as_ref().is_some_and(Job::cut_running);
        if stop_cut && cutting {
            let slot = self.state.active;
            info!(%slot, "the install ended: the cut of the active slot stops");
            self.outputs.push_back(Output::StopIndex { slot });
        }
        if let Some(job) = self.take_job() {
            self.state.journaled = job.journaled.iter().collect();
            self.journal_bytes = job.journal_bytes;
            self.state.wan_spent_bytes = job.budget.asked();
        }
    }

    fn persist(&mut self, records: Vec<Record>) {
        self.outputs.push_back(Output::Persist(records));
    }

    fn event(&mut self, event: Event) {
        self.outputs.push_back(Output::Event(event));
    }

    /// Heap bytes of per-install state beyond the release (the chunk table and
    /// manifest, which a fleet shares): for the memory goal.
    pub fn install_state_bytes(&self) -> usize {
        self.job.as_ref().map_or(0, |j| {
            j.state_heap_bytes() + self.unsynced.capacity() * std::mem::size_of::<u32>()
        })
    }

    /// Drops the engine's copies of the deployment's signed envelope (its own and
    /// the offered release's) once the driver applied the [`Output::Persist`] that
    /// holds it: the store has it, and nothing the install does needs it again
    /// (35 MB for an 8 GiB image). Offering the same release again for the same
    /// deployment resumes without it; a new deployment needs a release that still
    /// has its envelope.
    pub fn shed_envelope(&mut self) {
        self.state.envelope = None;
        if let Some(rel) = &self.release {
            rel.shed_envelope();
        }
    }

    /// Heap bytes of the release's chunk table.
    pub fn release_table_bytes(&self) -> usize {
        self.job.as_ref().map_or(0, |j| j.rel.table.heap_bytes())
    }
}

/// The chunks an install still needed when [`Engine::needed_chunks`] was called: a
/// set a driver can hand to the thread that cuts a slot. It shares the release's
/// chunk table and holds one bit a chunk (not a copy of the ids).
#[derive(Debug, Clone, Default)]
pub struct NeededChunks {
    rel: Option<std::sync::Arc<VerifiedRelease>>,
    /// By entry of the release's table.
    bits: crate::Bitfield,
}

impl NeededChunks {
    /// Whether chunk `id` is needed.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.rel
            .as_ref()
            .and_then(|r| r.table.entry(id))
            .is_some_and(|e| self.bits.get(e))
    }

    /// The key of chunk `id` when it is needed: its entry in the release's
    /// table (one for each distinct chunk, below the table's entry count), so a
    /// caller keeps a bit a chunk it met, not a set of ids.
    pub fn key(&self, id: &ChunkId) -> Option<u32> {
        self.rel
            .as_ref()
            .and_then(|r| r.table.entry(id))
            .filter(|&e| self.bits.get(e))
    }

    /// How many distinct chunks are needed.
    pub fn len(&self) -> u32 {
        self.bits.count()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The needed chunk ids, in the order of their first position in the payload.
    pub fn ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.rel
            .iter()
            .flat_map(|r| self.bits.iter().map(|e| r.table.id(e)))
    }
}
