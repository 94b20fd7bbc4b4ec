//! The engine state machine.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use shoal_artifact::{ChunkId, Chunking, Manifest, PayloadKind, VerifiedChunk};
use shoal_signing::{Envelope, RoleName, TrustRoot};
use tracing::{debug, info, warn};

use crate::error::{CommitError, InstallError, IoOp, OfferError, RollbackError};
use crate::source::{Origin, SourceId, SourceInfo, SourceKind};
use crate::state::{
    Deployment, DeviceState, IndexedChunk, Outcome, Phase, Record, Release, Slot, SlotIndex,
    Verdict, slot_index,
};
use crate::time::{Instant, Rng};

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
    /// Reads of the active slot asked for at once.
    pub reads_in_flight_max: usize,
    /// Chunks requested from request sources at once.
    pub fetch_in_flight_max: usize,
    /// Chunks per [`Output::Fetch`].
    pub fetch_batch_max: usize,
    /// How long a requested chunk may take before it is asked again.
    pub fetch_timeout: Duration,
    /// Attempts per chunk and source before that source is given up for the chunk.
    pub fetch_attempts_max: u32,
    /// Seeds every random choice (which source serves a chunk).
    pub seed: u64,
}

impl Config {
    /// A configuration with default pacing.
    pub fn new(device_type: impl Into<String>, trust_root: TrustRoot) -> Config {
        Config {
            device_type: device_type.into(),
            provides: BTreeMap::new(),
            trust_root,
            journal_batch_bytes: 4 * 1024 * 1024,
            reads_in_flight_max: 4,
            fetch_in_flight_max: 64,
            fetch_batch_max: 16,
            fetch_timeout: Duration::from_secs(30),
            fetch_attempts_max: 3,
            seed: 0,
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
    /// Where the chunks can come from, besides the active slot.
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
    /// Chunk bytes: the answer to [`Output::Read`] or [`Output::Fetch`], or pushed by a
    /// stream source. The engine hashes them before use.
    Chunk {
        /// Where they came from.
        origin: Origin,
        /// The chunk id they claim to be.
        id: ChunkId,
        /// The uncompressed bytes.
        data: Vec<u8>,
    },
    /// Chunk bytes pushed by a stream source whose reader already decoded them
    /// within their declared size and hashed them to their id (the
    /// [`VerifiedChunk`] type proves it). The engine checks they are a chunk it
    /// needs, of the right size, and does not hash them again; from a source that
    /// is not a stream of this install they are treated as [`Input::Chunk`].
    Verified {
        /// The stream source.
        source: SourceId,
        /// The verified bytes.
        chunk: VerifiedChunk,
    },
    /// A request source does not hold a chunk.
    Unavailable {
        /// The source.
        source: SourceId,
        /// The chunk.
        id: ChunkId,
    },
    /// A stream source has no more chunks.
    SourceEnded {
        /// The source.
        source: SourceId,
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
    /// The driver could not carry out an output. The engine stops what it was doing;
    /// the driver should restore it from its store ([`Engine::new`]) before going on.
    Failed {
        /// What failed.
        op: IoOp,
        /// What the OS said.
        message: String,
    },
}

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
    /// Ask a request source for chunks; answer each with [`Input::Chunk`] or
    /// [`Input::Unavailable`].
    Fetch {
        /// The source.
        source: SourceId,
        /// The chunks.
        ids: Vec<ChunkId>,
    },
    /// Write `data` at each offset of the slot (a chunk may repeat in a payload).
    Write {
        /// The slot.
        slot: Slot,
        /// Byte offsets.
        offsets: Vec<u64>,
        /// The bytes (already verified).
        data: Vec<u8>,
    },
    /// Make every write to the slot so far durable.
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
    /// Of those, bytes that came from offered sources (uncompressed).
    pub fetched_bytes: u64,
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
    /// The release in each slot, by [`Slot::index`].
    pub releases: [Option<Release>; 2],
    /// The deployment in progress.
    pub deployment: Option<DeploymentStatus>,
    /// The last result.
    pub last: Option<Outcome>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NeedState {
    Idle,
    /// Read from the active slot; `guess`: at the chunk's own payload offset, not
    /// from the index.
    Reading {
        guess: bool,
    },
    Fetching {
        source: SourceId,
        deadline: Instant,
    },
}

#[derive(Debug)]
struct Need {
    positions: Vec<u32>,
    size: u32,
    state: NeedState,
    attempts: u32,
    lacking: BTreeSet<SourceId>,
    /// Whether the active slot was already read at this chunk's payload offset.
    guessed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Indexing,
    /// Reading, at their own payload offsets in the active slot, the needed chunks
    /// that neither the slot's index nor any source holds: an absent one fails the
    /// install before anything is written.
    Probing,
    Fetching,
    Hashing,
}

#[derive(Debug)]
struct SourceState {
    info: SourceInfo,
    ended: bool,
}

/// The install in progress (memory only; rebuilt from the journal on restart).
#[derive(Debug)]
struct Job {
    manifest: Manifest,
    payload: usize,
    target: Slot,
    reboot: bool,
    step: Step,
    sources: Vec<SourceState>,
    positions: Vec<(u64, u32, ChunkId)>,
    done: Vec<bool>,
    needs: BTreeMap<ChunkId, Need>,
    reads: VecDeque<ChunkId>,
    reads_in_flight: usize,
    fetches: VecDeque<ChunkId>,
    fetch_in_flight: usize,
    deadlines: BTreeSet<(Instant, ChunkId)>,
    batch: Vec<u32>,
    batch_bytes: u64,
    /// Chunks still to probe ([`Step::Probing`]), probes in flight, and those found
    /// absent.
    probes: VecDeque<ChunkId>,
    probes_in_flight: usize,
    absent: BTreeSet<ChunkId>,
    /// Whether needed chunks met while the active slot is indexed are taken then
    /// (see [`Engine::needed_ids`]).
    take_while_indexing: bool,
}

/// The sans-IO update engine. See the crate documentation.
#[derive(Debug)]
pub struct Engine {
    config: Config,
    state: DeviceState,
    index: BTreeMap<ChunkId, (u64, u32)>,
    index_chunking: Option<Chunking>,
    job: Option<Job>,
    outputs: VecDeque<Output>,
    rng: Rng,
    progress: Progress,
}

impl Engine {
    /// An engine restored from what the device store holds (or
    /// [`DeviceState::fresh`]).
    pub fn new(config: Config, state: DeviceState) -> Engine {
        let mut engine = Engine {
            rng: Rng::new(config.seed),
            config,
            state,
            index: BTreeMap::new(),
            index_chunking: None,
            job: None,
            outputs: VecDeque::new(),
            progress: Progress::default(),
        };
        if let Some(index) = engine.state.active_index.take() {
            engine.set_index(&index);
        }
        engine
    }

    fn set_index(&mut self, index: &SlotIndex) {
        self.index.clear();
        for c in &index.chunks {
            self.index.entry(c.id).or_insert((c.offset, c.len));
        }
        self.index_chunking = Some(index.chunking);
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Engine::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.job
            .as_ref()
            .and_then(|j| j.deadlines.first().map(|(t, _)| *t))
    }

    /// Byte counts of the install in progress.
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// Whether the install in progress still needs chunk `id` (lets a driver skip
    /// decompressing stream chunks the device already has).
    pub fn wants(&self, id: &ChunkId) -> bool {
        self.job
            .as_ref()
            .is_some_and(|j| j.step == Step::Fetching && j.needs.contains_key(id))
    }

    /// The byte ranges `(offset, len)` of the target slot that the journal records
    /// as written and synced: an interrupted install's verified work, which a
    /// resumed install does not write again. Empty without an install in progress.
    pub fn journaled_ranges(&self) -> Vec<(u64, u64)> {
        let Some(job) = self.job.as_ref() else {
            return Vec::new();
        };
        self.state
            .done
            .iter()
            .filter_map(|&i| job.positions.get(i as usize))
            .map(|&(offset, len, _)| (offset, u64::from(len)))
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
    pub fn needed_ids(&self) -> Vec<ChunkId> {
        self.job
            .as_ref()
            .filter(|j| j.step == Step::Indexing && j.take_while_indexing)
            .map(|j| j.needs.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Whether an install is running (fetching, indexing or verifying).
    pub fn is_installing(&self) -> bool {
        self.job.is_some()
    }

    /// The state for `shoal status`.
    pub fn status(&self) -> Status {
        let deployment = self.state.deployment.as_ref().map(|d| {
            let journal_bytes = match (&d.phase, stored_manifest(d)) {
                (Phase::Fetching, Some((m, p))) => {
                    let sizes: Vec<u32> = m.payloads[p].chunks.iter().map(|c| c.size).collect();
                    self.state
                        .done
                        .iter()
                        .filter_map(|&i| sizes.get(i as usize))
                        .map(|&s| u64::from(s))
                        .sum()
                }
                (Phase::Fetching, None) => 0,
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
        }
    }

    /// Checks an offered release (signature against the trust root, device type,
    /// depends, anti-rollback floor, payloads, slot size) and starts or resumes
    /// installing it into the inactive slot. Nothing is written when this fails.
    pub fn offer(&mut self, now: Instant, offer: Offer) -> Result<(), OfferError> {
        let envelope = Envelope::from_bytes(&offer.envelope)?;
        let signed =
            self.config
                .trust_root
                .verify(RoleName::Release, &envelope, offer.wall_unix_s)?;
        let manifest = Manifest::from_cbor(signed)?;
        if !manifest.device_types.contains(&self.config.device_type) {
            return Err(OfferError::DeviceType {
                device_type: self.config.device_type.clone(),
                supported: manifest.device_types.clone(),
            });
        }
        for (key, wanted) in &manifest.depends {
            let have = self.provided(key);
            if !have.as_ref().is_some_and(|h| wanted.contains(h)) {
                return Err(OfferError::Depends {
                    key: key.clone(),
                    wanted: wanted.clone(),
                    have,
                });
            }
        }
        if manifest.security_counter < self.state.floor {
            return Err(OfferError::BelowFloor {
                counter: manifest.security_counter,
                floor: self.state.floor,
            });
        }
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
        let release = Release::from_manifest(&manifest, payload);

        let mut resume = false;
        if let Some(dep) = &self.state.deployment {
            match &dep.phase {
                Phase::Trial | Phase::Rebooting | Phase::RollingBack { .. } => {
                    return Err(OfferError::Busy {
                        release: dep.release.to_string(),
                        phase: dep.phase.clone(),
                    });
                }
                Phase::Verified | Phase::TrialArmed
                    if dep.release.manifest_hash == release.manifest_hash =>
                {
                    // Installed already; make sure the trial is armed (idempotent).
                    info!(release = %release, slot = %dep.target, "already installed; re-arming trial");
                    let target = dep.target;
                    self.progress = Progress {
                        total_bytes: release.payload_size,
                        resumed_bytes: release.payload_size,
                        ..Progress::default()
                    };
                    self.arm(target, offer.reboot);
                    return Ok(());
                }
                Phase::Fetching => {
                    resume = stored_manifest(dep).is_some_and(|(old, p)| {
                        dep.target == self.state.active.other()
                            && same_chunks(
                                &old.payloads[p].chunks,
                                &manifest.payloads[payload].chunks,
                            )
                    });
                }
                Phase::Verified | Phase::TrialArmed => {}
            }
        }
        let target = self.state.active.other();
        let capacity = self.state.slot_capacity[slot_index(target)];
        if release.payload_size > capacity {
            return Err(OfferError::SlotTooSmall {
                slot: target,
                need: release.payload_size,
                capacity,
            });
        }

        // Accepted. Whatever happens next, the bootloader must not try the target.
        self.outputs.push_back(Output::DisarmTrial { slot: target });
        let dep = Deployment {
            envelope: offer.envelope.clone(),
            release: release.clone(),
            target,
            phase: Phase::Fetching,
        };
        if resume {
            info!(release = %release, slot = %target, done = self.state.done.len(), "resuming install");
            self.persist(vec![Record::Deployment(Some(dep.clone()))]);
        } else {
            // A slot that already holds this payload (a release rolled back, then
            // offered again) is not written again: it is only verified.
            let held = self.state.releases[slot_index(target)]
                .as_ref()
                .is_some_and(|r| {
                    r.payload_hash == release.payload_hash && r.payload_size == release.payload_size
                });
            info!(release = %release, slot = %target, held, "starting install");
            self.state.done.clear();
            self.state.releases[slot_index(target)] = None;
            let mut records = vec![
                Record::Deployment(Some(dep.clone())),
                Record::ClearProgress,
                Record::SlotRelease {
                    slot: target,
                    release: None,
                },
                Record::SlotIndex {
                    slot: target,
                    index: None,
                },
            ];
            if held {
                let n = u32::try_from(manifest.payloads[payload].chunks.len())
                    .expect("chunk count fits u32");
                self.state.done = (0..n).collect();
                records.push(Record::Done(self.state.done.clone()));
            }
            self.persist(records);
        }
        self.state.deployment = Some(dep);

        let positions: Vec<(u64, u32, ChunkId)> = manifest.payloads[payload]
            .chunk_offsets()
            .map(|(off, c)| (off, c.size, c.id))
            .collect();
        let mut done = vec![false; positions.len()];
        for &i in &self.state.done {
            if let Some(d) = done.get_mut(i as usize) {
                *d = true;
            }
        }
        let resumed_bytes = positions
            .iter()
            .zip(&done)
            .filter(|(_, d)| **d)
            .map(|((_, size, _), _)| u64::from(*size))
            .sum();
        self.progress = Progress {
            total_bytes: release.payload_size,
            resumed_bytes,
            ..Progress::default()
        };
        self.event(Event::Accepted {
            release,
            target,
            resumed_bytes,
        });
        let chunking = manifest.chunking;
        self.job = Some(Job {
            manifest,
            payload,
            target,
            reboot: offer.reboot,
            step: Step::Indexing,
            sources: offer
                .sources
                .into_iter()
                .map(|info| SourceState { info, ended: false })
                .collect(),
            positions,
            done,
            needs: BTreeMap::new(),
            reads: VecDeque::new(),
            reads_in_flight: 0,
            fetches: VecDeque::new(),
            fetch_in_flight: 0,
            deadlines: BTreeSet::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            probes: VecDeque::new(),
            probes_in_flight: 0,
            absent: BTreeSet::new(),
            take_while_indexing: false,
        });
        // What is still needed, known before the active slot is indexed: chunks met
        // while indexing it are taken at once (`Engine::needed_ids`).
        if let Some(job) = self.job.as_mut() {
            for (i, &(_, size, id)) in job.positions.iter().enumerate() {
                if job.done[i] {
                    continue;
                }
                let need = job.needs.entry(id).or_insert_with(|| Need {
                    positions: Vec::new(),
                    size,
                    state: NeedState::Idle,
                    attempts: 0,
                    lacking: BTreeSet::new(),
                    guessed: false,
                });
                need.positions
                    .push(u32::try_from(i).expect("manifest chunk count fits u32"));
            }
            // When every source says what it holds and some needed chunk is held by
            // none, the plan checks the slot for it before anything is written (a
            // thin artifact without its base is refused untouched): then nothing is
            // taken early.
            let holds: Option<Vec<&BTreeSet<ChunkId>>> =
                job.sources.iter().map(|s| s.info.holds.as_ref()).collect();
            job.take_while_indexing = holds.is_none_or(|holds| {
                job.needs
                    .keys()
                    .all(|id| holds.iter().any(|h| h.contains(id)))
            });
        }
        if self.index_chunking == Some(chunking) {
            self.plan(now);
        } else {
            let active = self.state.active;
            let len = self.state.releases[slot_index(active)]
                .as_ref()
                .map_or(self.state.slot_capacity[slot_index(active)], |r| {
                    r.payload_size
                });
            info!(slot = %active, len, "indexing the active slot");
            self.event(Event::Indexing { slot: active, len });
            self.outputs.push_back(Output::IndexSlot {
                slot: active,
                chunking,
                len,
            });
        }
        Ok(())
    }

    fn provided(&self, key: &str) -> Option<String> {
        let running = self.state.releases[slot_index(self.state.active)].as_ref();
        running
            .and_then(|r| r.provides.get(key))
            .or_else(|| self.config.provides.get(key))
            .cloned()
    }

    /// Decides where each missing chunk comes from.
    fn plan(&mut self, now: Instant) {
        let Some(job) = self.job.as_mut() else { return };
        job.step = Step::Fetching;
        // When every source says which chunks it holds, a needed chunk that neither
        // they nor the slot's index have is looked for at its own offset in the
        // active slot now, before anything is written.
        let holds: Option<Vec<&BTreeSet<ChunkId>>> =
            job.sources.iter().map(|s| s.info.holds.as_ref()).collect();
        if let Some(holds) = holds {
            let mut queued = BTreeSet::new();
            for (_, _, id) in &job.positions {
                let Some(need) = job.needs.get(id) else {
                    continue;
                };
                let indexed = self.index.get(id).is_some_and(|&(_, len)| len == need.size);
                if !indexed && !holds.iter().any(|h| h.contains(id)) && queued.insert(*id) {
                    job.probes.push_back(*id);
                }
            }
            if !job.probes.is_empty() {
                debug!(
                    chunks = job.probes.len(),
                    "probing the active slot for chunks no source holds"
                );
                job.step = Step::Probing;
                self.pump(now);
                return;
            }
        }
        self.schedule(now);
    }

    /// Queues the needed chunks for reading from the active slot, in payload order.
    fn schedule(&mut self, now: Instant) {
        let Some(job) = self.job.as_mut() else { return };
        job.step = Step::Fetching;
        let mut from_slot = 0u64;
        // In payload order (not id order): reads of the active slot and writes of the
        // target then run mostly sequentially.
        let mut planned = BTreeSet::new();
        for (_, _, id) in &job.positions {
            let Some(need) = job.needs.get(id) else {
                continue;
            };
            if !planned.insert(*id) {
                continue;
            }
            match self.index.get(id) {
                Some(&(_, len)) if len == need.size => {
                    job.reads.push_back(*id);
                    from_slot += u64::from(need.size) * need.positions.len() as u64;
                }
                // Not indexed, but a stream that said it holds the chunk brings it:
                // no read of the active slot on the off chance.
                _ if job.sources.iter().any(|s| {
                    s.info.kind == SourceKind::Stream
                        && s.info.holds.as_ref().is_some_and(|h| h.contains(id))
                }) => {}
                // Not indexed: an image changed in place (or the last chunk of an
                // image cut with the slot's trailing bytes) may still hold it at the
                // same offset; one verified read decides before any source is asked.
                _ => job.reads.push_back(*id),
            }
        }
        debug!(
            needed = job.needs.len(),
            from_active_slot = job.reads.len(),
            from_sources = job.fetches.len(),
            from_slot_bytes = from_slot,
            "plan"
        );
        self.pump(now);
    }

    /// Issues reads and fetches within their bounds, and moves on when all is written.
    fn pump(&mut self, now: Instant) {
        let active = self.state.active;
        let Some(job) = self.job.as_mut() else { return };
        if job.step == Step::Probing {
            self.probe(now);
            return;
        }
        if job.step != Step::Fetching {
            return;
        }
        while job.reads_in_flight < self.config.reads_in_flight_max {
            let Some(id) = job.reads.pop_front() else {
                break;
            };
            let Some(need) = job.needs.get_mut(&id) else {
                continue;
            };
            if need.state != NeedState::Idle {
                continue;
            }
            let (offset, len, guess) = match self.index.get(&id) {
                Some(&(offset, len)) if len == need.size => (offset, len, false),
                _ => {
                    let offset = job.positions[need.positions[0] as usize].0;
                    let end = offset + u64::from(need.size);
                    if need.guessed || end > self.state.slot_capacity[slot_index(active)] {
                        job.fetches.push_back(id);
                        continue;
                    }
                    need.guessed = true;
                    (offset, need.size, true)
                }
            };
            need.state = NeedState::Reading { guess };
            job.reads_in_flight += 1;
            self.outputs.push_back(Output::Read {
                slot: active,
                id,
                offset,
                len,
            });
        }
        let stream_open = job
            .sources
            .iter()
            .any(|s| s.info.kind == SourceKind::Stream && !s.ended);
        if !stream_open {
            let mut batches: BTreeMap<SourceId, Vec<ChunkId>> = BTreeMap::new();
            let mut stuck = Vec::new();
            while job.fetch_in_flight < self.config.fetch_in_flight_max {
                let Some(id) = job.fetches.pop_front() else {
                    break;
                };
                let Some(need) = job.needs.get_mut(&id) else {
                    continue;
                };
                if need.state != NeedState::Idle {
                    continue;
                }
                let candidates: Vec<SourceId> = job
                    .sources
                    .iter()
                    .filter(|s| {
                        s.info.kind == SourceKind::Requests && !need.lacking.contains(&s.info.id)
                    })
                    .map(|s| s.info.id)
                    .collect();
                if candidates.is_empty() {
                    stuck.push(id);
                    continue;
                }
                let source = candidates[self.rng.below(candidates.len())];
                let deadline = now.saturating_add(self.config.fetch_timeout);
                need.state = NeedState::Fetching { source, deadline };
                job.deadlines.insert((deadline, id));
                job.fetch_in_flight += 1;
                let batch = batches.entry(source).or_default();
                batch.push(id);
                if batch.len() >= self.config.fetch_batch_max {
                    let ids = std::mem::take(batch);
                    self.outputs.push_back(Output::Fetch { source, ids });
                }
            }
            for (source, ids) in batches {
                if !ids.is_empty() {
                    self.outputs.push_back(Output::Fetch { source, ids });
                }
            }
            // Stuck chunks stay needed; they make the install fail below unless
            // something else brings them.
            drop(stuck);
        }
        if job.needs.is_empty() {
            self.flush_batch();
            let Some(job) = self.job.as_mut() else { return };
            job.step = Step::Hashing;
            let (target, len) = (job.target, job.manifest.payloads[job.payload].size);
            info!(slot = %target, len, "all chunks written; verifying the slot");
            self.event(Event::Verifying { slot: target });
            self.outputs
                .push_back(Output::HashSlot { slot: target, len });
            return;
        }
        let idle = job.reads.is_empty()
            && job.reads_in_flight == 0
            && job.fetches.is_empty()
            && job.fetch_in_flight == 0
            && !stream_open;
        if idle {
            let count = job.needs.len();
            let bytes = job.needs.values().map(|n| u64::from(n.size)).sum();
            let base = job.manifest.base.clone();
            let active = self.state.releases[slot_index(active)]
                .as_ref()
                .map(ToString::to_string);
            self.flush_batch();
            self.fail(InstallError::MissingChunks {
                count,
                bytes,
                base,
                active,
            });
        }
    }

    /// Issues probe reads within the read bound; once all are answered, fails with
    /// the chunks found absent or goes on fetching.
    fn probe(&mut self, now: Instant) {
        let active = self.state.active;
        let capacity = self.state.slot_capacity[slot_index(active)];
        let Some(job) = self.job.as_mut() else { return };
        while job.probes_in_flight < self.config.reads_in_flight_max {
            let Some(id) = job.probes.pop_front() else {
                break;
            };
            let Some(need) = job.needs.get(&id) else {
                continue;
            };
            let offset = job.positions[need.positions[0] as usize].0;
            if offset + u64::from(need.size) > capacity {
                job.absent.insert(id);
                continue;
            }
            job.probes_in_flight += 1;
            self.outputs.push_back(Output::Read {
                slot: active,
                id,
                offset,
                len: need.size,
            });
        }
        if job.probes_in_flight > 0 || !job.probes.is_empty() {
            return;
        }
        if job.absent.is_empty() {
            self.schedule(now);
            return;
        }
        let count = job.absent.len();
        let bytes = job
            .absent
            .iter()
            .filter_map(|id| job.needs.get(id))
            .map(|n| u64::from(n.size))
            .sum();
        let base = job.manifest.base.clone();
        let active = self.state.releases[slot_index(active)]
            .as_ref()
            .map(ToString::to_string);
        self.fail(InstallError::MissingChunks {
            count,
            bytes,
            base,
            active,
        });
    }

    /// A probe read came back: a chunk found at its own offset joins the index.
    fn on_probe(&mut self, now: Instant, origin: Origin, id: ChunkId, data: &[u8]) {
        let Some(job) = self.job.as_mut() else { return };
        let Origin::Slot(slot) = origin else { return };
        let Some(need) = job.needs.get(&id) else {
            return;
        };
        if slot != self.state.active || job.probes_in_flight == 0 {
            return;
        }
        job.probes_in_flight -= 1;
        let offset = job.positions[need.positions[0] as usize].0;
        if data.len() == need.size as usize && ChunkId::from(blake3::hash(data)) == id {
            self.index.insert(id, (offset, need.size));
        } else {
            job.absent.insert(id);
        }
        self.pump(now);
    }

    /// Syncs the slot and commits the batch of written chunks to the journal.
    fn flush_batch(&mut self) {
        let Some(job) = self.job.as_mut() else { return };
        if job.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut job.batch);
        job.batch_bytes = 0;
        let target = job.target;
        self.state.done.extend_from_slice(&batch);
        self.outputs.push_back(Output::Sync { slot: target });
        self.persist(vec![Record::Done(batch)]);
    }

    fn fail(&mut self, err: InstallError) {
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
            self.persist(vec![Record::Last(outcome)]);
        }
        self.job = None;
        self.event(Event::Failed(err));
    }

    /// Feeds the result of an output, or data, to the engine.
    pub fn handle(&mut self, now: Instant, input: Input) {
        match input {
            Input::SlotIndexed { slot, index } => self.on_indexed(now, slot, index),
            Input::Chunk { origin, id, data } => self.on_chunk(now, origin, id, data, false),
            Input::Verified { source, chunk } => {
                let stream = self.job.as_ref().is_some_and(|j| {
                    j.sources
                        .iter()
                        .any(|s| s.info.id == source && s.info.kind == SourceKind::Stream)
                });
                let id = chunk.chunk().id;
                self.on_chunk(now, Origin::Source(source), id, chunk.into_data(), stream);
            }
            Input::Unavailable { source, id } => {
                if let Some(job) = self.job.as_mut()
                    && let Some(need) = job.needs.get_mut(&id)
                {
                    if let NeedState::Fetching {
                        source: s,
                        deadline,
                    } = need.state
                        && s == source
                    {
                        job.deadlines.remove(&(deadline, id));
                        job.fetch_in_flight -= 1;
                        need.state = NeedState::Idle;
                        job.fetches.push_back(id);
                    }
                    need.lacking.insert(source);
                }
                self.pump(now);
            }
            Input::SourceEnded { source } => {
                if let Some(job) = self.job.as_mut() {
                    for s in job.sources.iter_mut().filter(|s| s.info.id == source) {
                        s.ended = true;
                    }
                }
                self.pump(now);
            }
            Input::SlotHashed { slot, hash } => self.on_hashed(slot, hash),
            Input::HealthChecked(result) => self.on_health(result),
            Input::Failed { op, message } => {
                warn!(%op, %message, "driver reported a failure");
                self.outputs.clear();
                let err = InstallError::Io { op, message };
                if self.job.is_some() {
                    self.fail(err);
                } else {
                    self.event(Event::Failed(err));
                }
            }
        }
    }

    /// Retries requests whose time is up.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(job) = self.job.as_mut() else { return };
        while let Some(&(deadline, id)) = job.deadlines.first() {
            if deadline > now {
                break;
            }
            job.deadlines.pop_first();
            let Some(need) = job.needs.get_mut(&id) else {
                continue;
            };
            let NeedState::Fetching { source, .. } = need.state else {
                continue;
            };
            job.fetch_in_flight -= 1;
            need.attempts += 1;
            need.state = NeedState::Idle;
            if need.attempts >= self.config.fetch_attempts_max {
                debug!(%id, %source, "giving up on source for chunk");
                need.lacking.insert(source);
                need.attempts = 0;
            }
            job.fetches.push_back(id);
        }
        self.pump(now);
    }

    fn on_indexed(&mut self, now: Instant, slot: Slot, index: SlotIndex) {
        let waiting = self.job.as_ref().is_some_and(|j| j.step == Step::Indexing);
        if !waiting || slot != self.state.active {
            return;
        }
        self.set_index(&index);
        self.persist(vec![Record::SlotIndex {
            slot,
            index: Some(index),
        }]);
        self.plan(now);
    }

    /// A chunk's bytes arrived; `hashed`: they were verified against `id` already
    /// (by the stream's reader), so only their size is checked here.
    fn on_chunk(&mut self, now: Instant, origin: Origin, id: ChunkId, data: Vec<u8>, hashed: bool) {
        let active = self.state.active;
        let Some(job) = self.job.as_mut() else { return };
        if job.step == Step::Probing {
            self.on_probe(now, origin, id, &data);
            return;
        }
        // While the active slot is indexed, a driver may hand over the needed
        // chunks it meets there: they are written now and not read again.
        let met_while_indexing =
            job.step == Step::Indexing && job.take_while_indexing && origin == Origin::Slot(active);
        if job.step != Step::Fetching && !met_while_indexing {
            return;
        }
        let Some(need) = job.needs.get_mut(&id) else {
            return; // Not needed (any more).
        };
        // Release this chunk's claim on the bounds, whoever answered.
        let mut guess = false;
        match (need.state, origin) {
            (NeedState::Reading { guess: g }, Origin::Slot(_)) => {
                job.reads_in_flight -= 1;
                need.state = NeedState::Idle;
                guess = g;
            }
            (NeedState::Fetching { source, deadline }, Origin::Source(s)) if s == source => {
                job.deadlines.remove(&(deadline, id));
                job.fetch_in_flight -= 1;
                need.state = NeedState::Idle;
            }
            _ => {}
        }
        let good = data.len() == need.size as usize
            && (hashed || ChunkId::from(blake3::hash(&data)) == id);
        if !good {
            match origin {
                Origin::Slot(_) if guess => {
                    if need.state == NeedState::Idle {
                        job.fetches.push_back(id);
                    }
                }
                Origin::Slot(slot) => {
                    warn!(%id, %slot, "chunk in the slot index does not hash as recorded; fetching it instead");
                    if need.state == NeedState::Idle {
                        job.fetches.push_back(id);
                    }
                    if slot == active {
                        self.index.remove(&id);
                    }
                    self.persist(vec![Record::Unindex { slot, id }]);
                }
                Origin::Source(source) => {
                    let stream = job
                        .sources
                        .iter()
                        .any(|s| s.info.id == source && s.info.kind == SourceKind::Stream);
                    if stream {
                        self.fail(InstallError::CorruptChunk { origin, id });
                        return;
                    }
                    warn!(%id, %source, "source sent a chunk that does not hash to its id");
                    need.lacking.insert(source);
                    if need.state == NeedState::Idle {
                        job.fetches.push_back(id);
                    }
                }
            }
            self.pump(now);
            return;
        }
        if let NeedState::Fetching { deadline, .. } = need.state {
            // Someone else answered first; forget the outstanding request.
            job.deadlines.remove(&(deadline, id));
            job.fetch_in_flight -= 1;
        } else if let NeedState::Reading { .. } = need.state {
            job.reads_in_flight -= 1;
        }
        let Some(need) = job.needs.remove(&id) else {
            return;
        };
        let offsets: Vec<u64> = need
            .positions
            .iter()
            .map(|&p| job.positions[p as usize].0)
            .collect();
        let bytes = u64::from(need.size) * need.positions.len() as u64;
        for &p in &need.positions {
            job.done[p as usize] = true;
        }
        job.batch.extend_from_slice(&need.positions);
        job.batch_bytes += bytes;
        self.progress.written_bytes += bytes;
        match origin {
            Origin::Slot(_) => self.progress.reused_bytes += bytes,
            Origin::Source(_) => self.progress.fetched_bytes += bytes,
        }
        let target = job.target;
        let flush = job.batch_bytes >= self.config.journal_batch_bytes;
        self.outputs.push_back(Output::Write {
            slot: target,
            offsets,
            data,
        });
        if flush {
            self.flush_batch();
        }
        self.pump(now);
    }

    fn on_hashed(&mut self, slot: Slot, hash: [u8; 32]) {
        let Some(job) = self.job.as_ref() else { return };
        if job.step != Step::Hashing || slot != job.target {
            return;
        }
        let payload = &job.manifest.payloads[job.payload];
        if hash != payload.hash {
            let err = InstallError::VerifyFailed {
                slot,
                expected: hex(&payload.hash),
                actual: hex(&hash),
            };
            self.state.done.clear();
            self.persist(vec![Record::ClearProgress]);
            self.fail(err);
            return;
        }
        let Some(job) = self.job.take() else { return };
        let Some(mut dep) = self.state.deployment.clone() else {
            return;
        };
        let mut seen = BTreeSet::new();
        let chunks: Vec<IndexedChunk> = job
            .positions
            .iter()
            .filter(|(_, _, id)| seen.insert(*id))
            .map(|&(offset, len, id)| IndexedChunk { id, offset, len })
            .collect();
        let index = SlotIndex {
            chunking: job.manifest.chunking,
            chunks,
        };
        dep.phase = Phase::Verified;
        self.state.releases[slot_index(slot)] = Some(dep.release.clone());
        self.state.done.clear();
        self.persist(vec![
            Record::Deployment(Some(dep.clone())),
            Record::SlotRelease {
                slot,
                release: Some(dep.release.clone()),
            },
            Record::SlotIndex {
                slot,
                index: Some(index),
            },
            Record::ClearProgress,
        ]);
        self.state.deployment = Some(dep);
        info!(slot = %slot, "slot verified");
        self.arm(slot, job.reboot);
    }

    /// Arms the trial of a verified slot (idempotent), and reboots into it if asked.
    fn arm(&mut self, slot: Slot, reboot: bool) {
        let Some(mut dep) = self.state.deployment.clone() else {
            return;
        };
        assert!(
            self.state.releases[slot_index(slot)]
                .as_ref()
                .map(|r| r.manifest_hash)
                == Some(dep.release.manifest_hash),
            "arming a slot that is not recorded as verified"
        );
        self.outputs.push_back(Output::ArmTrial { slot });
        dep.phase = Phase::TrialArmed;
        self.persist(vec![Record::Deployment(Some(dep.clone()))]);
        self.event(Event::Armed {
            release: dep.release.clone(),
            slot,
        });
        if reboot {
            dep.phase = Phase::Rebooting;
            self.persist(vec![Record::Deployment(Some(dep.clone()))]);
            self.outputs.push_back(Output::Reboot);
        }
        self.state.deployment = Some(dep);
    }

    /// Tells the engine the device has booted, and what the bootloader says. In a
    /// trial boot of the deployed slot this runs the health checks; after a trial the
    /// bootloader gave up on, it records the rollback.
    pub fn boot(&mut self, _now: Instant, boot: Boot) {
        self.job = None;
        let Some(dep) = self.state.deployment.clone() else {
            if boot.slot != self.state.active {
                info!(slot = %boot.slot, "running from the other slot; recording it as active");
                self.switch_active(boot.slot);
                self.persist(vec![Record::Active(boot.slot)]);
            }
            return;
        };
        let target = dep.target;
        match &dep.phase {
            Phase::Fetching => {
                if boot.slot == target {
                    // The slot being written booted: whatever it holds now runs.
                    let reason =
                        format!("the device booted slot {target} while it was being written");
                    self.switch_active(boot.slot);
                    self.end(
                        dep,
                        Verdict::Failed { reason },
                        vec![Record::Active(boot.slot)],
                    );
                }
            }
            Phase::Verified | Phase::TrialArmed | Phase::Rebooting | Phase::Trial => {
                // A verified slot may be armed even when the store says Verified (a
                // power cut between arming and recording it).
                if boot.slot == target && boot.trial {
                    if dep.phase != Phase::Trial {
                        let mut d = dep.clone();
                        d.phase = Phase::Trial;
                        self.persist(vec![Record::Deployment(Some(d.clone()))]);
                        self.state.deployment = Some(d);
                    }
                    info!(release = %dep.release, "trial boot; running health checks");
                    self.event(Event::Checking {
                        release: dep.release.clone(),
                    });
                    self.outputs.push_back(Output::RunHealthChecks);
                } else if boot.slot == target {
                    // The bootloader already made it permanent (a commit whose store
                    // update was cut off).
                    self.finish_commit(dep);
                } else if boot.pending == Some(target) {
                    self.event(Event::TrialPending { slot: target });
                } else if dep.phase == Phase::Verified {
                    // Not armed yet: offering the release again arms it.
                } else {
                    let reason = format!(
                        "the trial boot of slot {target} did not come up; the bootloader went back to slot {}",
                        boot.slot
                    );
                    self.outputs.push_back(Output::Rollback { to: boot.slot });
                    self.end(dep, Verdict::RolledBack { reason }, Vec::new());
                }
            }
            Phase::RollingBack { reason } => {
                if boot.slot == target {
                    self.outputs
                        .push_back(Output::Rollback { to: target.other() });
                    let reason = reason.clone();
                    self.end(dep, Verdict::RolledBack { reason }, Vec::new());
                    self.outputs.push_back(Output::Reboot);
                } else {
                    let reason = reason.clone();
                    self.end(dep, Verdict::RolledBack { reason }, Vec::new());
                }
            }
        }
    }

    fn switch_active(&mut self, slot: Slot) {
        self.state.active = slot;
        self.index.clear();
        self.index_chunking = None;
    }

    fn on_health(&mut self, result: Result<(), String>) {
        let Some(dep) = self.state.deployment.clone() else {
            return;
        };
        if dep.phase != Phase::Trial {
            return;
        }
        match result {
            Ok(()) => self.finish_commit(dep),
            Err(reason) => self.start_rollback(dep, reason),
        }
    }

    /// Commits the trial boot: the bootloader keeps the slot, the floor rises.
    pub fn commit(&mut self, _now: Instant) -> Result<(), CommitError> {
        match self.state.deployment.clone() {
            Some(dep) if dep.phase == Phase::Trial => {
                self.finish_commit(dep);
                Ok(())
            }
            other => Err(CommitError::NotInTrial {
                phase: other.map(|d| d.phase),
            }),
        }
    }

    /// Rolls back the deployment in progress: in a trial boot, points the bootloader
    /// back at the other slot and reboots; before it, cancels the install.
    pub fn rollback(
        &mut self,
        _now: Instant,
        reason: impl Into<String>,
    ) -> Result<(), RollbackError> {
        let reason = reason.into();
        let Some(dep) = self.state.deployment.clone() else {
            return Err(RollbackError::NothingToRollBack);
        };
        self.job = None;
        match dep.phase {
            Phase::Trial | Phase::RollingBack { .. } => self.start_rollback(dep, reason),
            Phase::Fetching | Phase::Verified | Phase::TrialArmed | Phase::Rebooting => {
                self.outputs
                    .push_back(Output::DisarmTrial { slot: dep.target });
                self.end(dep, Verdict::RolledBack { reason }, Vec::new());
            }
        }
        Ok(())
    }

    fn finish_commit(&mut self, dep: Deployment) {
        let slot = dep.target;
        self.outputs.push_back(Output::Commit { slot });
        let floor = self.state.floor.max(dep.release.security_counter);
        self.state.floor = floor;
        if self.state.active != slot {
            self.switch_active(slot);
            if let Some((m, p)) = stored_manifest(&dep) {
                let index = SlotIndex {
                    chunking: m.chunking,
                    chunks: m.payloads[p]
                        .chunk_offsets()
                        .map(|(offset, c)| IndexedChunk {
                            id: c.id,
                            offset,
                            len: c.size,
                        })
                        .collect(),
                };
                self.set_index(&index);
            }
        }
        info!(release = %dep.release, slot = %slot, floor, "committed");
        self.end(
            dep,
            Verdict::Committed,
            vec![Record::Floor(floor), Record::Active(slot)],
        );
    }

    fn start_rollback(&mut self, dep: Deployment, reason: String) {
        info!(release = %dep.release, %reason, "rolling back");
        let mut d = dep.clone();
        d.phase = Phase::RollingBack {
            reason: reason.clone(),
        };
        self.persist(vec![Record::Deployment(Some(d))]);
        self.outputs.push_back(Output::Rollback {
            to: dep.target.other(),
        });
        self.end(dep, Verdict::RolledBack { reason }, Vec::new());
        self.outputs.push_back(Output::Reboot);
    }

    /// Ends the deployment with a verdict, persisted with `records`.
    fn end(&mut self, dep: Deployment, verdict: Verdict, mut records: Vec<Record>) {
        let outcome = Outcome {
            release: dep.release.clone(),
            slot: dep.target,
            verdict: verdict.clone(),
        };
        records.extend([
            Record::Deployment(None),
            Record::ClearProgress,
            Record::Last(outcome.clone()),
        ]);
        self.persist(records);
        self.state.deployment = None;
        self.state.done.clear();
        self.state.last = Some(outcome);
        let (release, slot) = (dep.release, dep.target);
        match verdict {
            Verdict::Committed => self.event(Event::Committed { release, slot }),
            Verdict::RolledBack { reason } => self.event(Event::RolledBack {
                release,
                slot,
                reason,
            }),
            Verdict::Failed { reason } => {
                self.event(Event::Failed(InstallError::Abandoned { reason }))
            }
        }
    }

    fn persist(&mut self, records: Vec<Record>) {
        self.outputs.push_back(Output::Persist(records));
    }

    fn event(&mut self, event: Event) {
        self.outputs.push_back(Output::Event(event));
    }
}

/// The manifest stored with a deployment (verified when it was offered) and its
/// rootfs payload index.
fn stored_manifest(dep: &Deployment) -> Option<(Manifest, usize)> {
    let env = Envelope::from_bytes(&dep.envelope).ok()?;
    let manifest = Manifest::from_cbor(&env.signed).ok()?;
    let p = manifest
        .payloads
        .iter()
        .position(|p| p.kind == PayloadKind::RootfsImage)?;
    Some((manifest, p))
}

fn same_chunks(a: &[shoal_artifact::ChunkRef], b: &[shoal_artifact::ChunkRef]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.id == y.id && x.size == y.size)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
