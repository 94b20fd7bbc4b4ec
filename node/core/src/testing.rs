//! An in-memory device that drives the engine, with power cuts: for the engine's own
//! tests and for the fleet simulator.
//!
//! [`SimDevice`] keeps two images of each slot, *live* (what reads see) and *durable*
//! (what survives a power cut: the live image as of the last sync), an in-memory
//! device store ([`MemStore`]) that applies each [`Output::Persist`] atomically, and
//! bootctl's bootloader model ([`Board`]: the boot variables, the decisions the real
//! GRUB and U-Boot scripts make at boot, and the driver's bootloader steps, the same
//! code the device and `shoal demo` run). Every durable step
//! (slot write, sync, store transaction, bootloader update) counts as one operation;
//! [`SimDevice::crash_at`] cuts the power right before operation N, and unsynced slot
//! writes then survive or vanish by a seeded coin each (both are what a real disk may
//! do).
//!
//! Request sources answer at once unless given a [`Link`]: then each answers its
//! requests one after the other on the virtual clock (a latency, a time per chunk),
//! or never (a silent source), so timeouts, backoff and the choice between sources
//! play out as on a network. [`Engine::check_invariants`] runs after every step.

use std::collections::BTreeMap;

use shoal_artifact::{ChunkId, ChunkRef, Chunking, Manifest, Payload, PayloadKind};
use shoal_bootctl::model::{Board, Bootloader};
use shoal_bootctl::scheme::{Flavor, Scheme};
use shoal_signing::{Envelope, SecretKey, TrustRoot};

use crate::engine::{Boot, Engine, Event, Input, Output};
use crate::source::{FetchFailure, Origin, RequestId, SourceId};
use crate::state::{DeviceState, Record, Release, Slot, SlotIndex, slot_ordinal};
use crate::time::{Instant, Rng};

/// The device store, in memory: what a driver keeps in redb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemStore {
    /// Everything but the per-slot indexes.
    pub state: DeviceState,
    /// Each slot's chunk index.
    pub indexes: [Option<SlotIndex>; 2],
    /// Chunks written for a slot by [`MemStore::write_index`], not yet its index
    /// ([`Record::SlotIndexWritten`] makes them so).
    pub written: [Option<SlotIndex>; 2],
    /// Transactions applied.
    pub transactions: u64,
}

impl MemStore {
    /// A store of a device Shoal never touched, running `active`.
    pub fn fresh(active: Slot, slot_capacity: [u64; 2]) -> MemStore {
        MemStore {
            state: DeviceState::fresh(active, slot_capacity),
            indexes: [None, None],
            written: [None, None],
            transactions: 0,
        }
    }

    /// Writes `index`'s chunks for `slot` as a driver writes them before
    /// [`Input::SlotIndexWritten`](crate::Input::SlotIndexWritten): the slot's
    /// old index is dropped, the new one is not the slot's index until
    /// [`Record::SlotIndexWritten`].
    pub fn write_index(&mut self, slot: Slot, index: SlotIndex) {
        self.indexes[slot_ordinal(slot)] = None;
        self.written[slot_ordinal(slot)] = Some(index);
    }

    /// Applies one transaction.
    pub fn apply(&mut self, records: &[Record]) {
        self.transactions += 1;
        let s = &mut self.state;
        for r in records {
            match r {
                Record::Deployment(d) => s.deployment = d.clone(),
                Record::Envelope(e) => s.envelope = e.clone(),
                // The driver stored it (a test that uses `verify_stored` keeps
                // the bytes itself); this store holds bytes it was given only.
                Record::EnvelopeStored(_) => s.envelope = None,
                Record::WanSpent(b) => s.wan_spent_bytes = *b,
                Record::ClearProgress => s.journaled.clear(),
                Record::Journaled(list) => s.journaled.extend_from_slice(list),
                Record::SlotRelease { slot, release } => {
                    s.releases[slot_ordinal(*slot)] = release.clone()
                }
                Record::SlotIndex { slot, index } => {
                    self.indexes[slot_ordinal(*slot)] = index.clone()
                }
                Record::SlotIndexWritten { slot, chunking, .. } => {
                    self.indexes[slot_ordinal(*slot)] = self.written[slot_ordinal(*slot)]
                        .take()
                        .filter(|i| i.chunking == *chunking);
                }
                Record::ReleaseIndex { slot, release } => {
                    self.indexes[slot_ordinal(*slot)] = Some(release.slot_index())
                }
                Record::Unindex { slot, id } => {
                    if let Some(index) = self.indexes[slot_ordinal(*slot)].as_mut() {
                        index.chunks.retain(|c| c.id != *id);
                    }
                }
                Record::Active(slot) => s.active = *slot,
                Record::Floor(f) => s.floor = *f,
                Record::Last(o) => s.last = Some(o.clone()),
            }
        }
    }

    /// What [`Engine::new`] is given after a (re)start.
    pub fn load(&self) -> DeviceState {
        let mut state = self.state.clone();
        state.active_index = self.indexes[slot_ordinal(state.active)]
            .as_ref()
            .map(|i| i.chunking);
        state.indexes = Some(crate::IndexStore(std::sync::Arc::new(
            crate::MemIndexes::new(&self.indexes),
        )));
        state
    }
}

/// How a request source answers on the virtual clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Link {
    /// Round trip, in microseconds: half before the source starts on a request,
    /// half after each chunk leaves it.
    pub rtt_us: u64,
    /// Time the source spends per chunk, in microseconds (its bandwidth).
    pub per_chunk_us: u64,
    /// Its bandwidth in bytes per second, on top of `per_chunk_us` (0: no limit):
    /// a chunk of `n` bytes takes `n / bytes_per_s` more.
    pub bytes_per_s: u64,
    /// It never answers.
    pub silent: bool,
}

/// An answer on its way to the engine.
#[derive(Debug)]
struct Delivery {
    source: SourceId,
    request: RequestId,
    input: Input,
}

/// A stream source: its id and the chunks it pushes, in order.
pub type Stream = (SourceId, std::vec::IntoIter<(ChunkId, Vec<u8>)>);

/// The power went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crashed;

/// A device in memory. See the module documentation.
#[derive(Debug)]
pub struct SimDevice {
    /// Live slot images.
    pub live: [Vec<u8>; 2],
    /// Durable slot images.
    pub durable: [Vec<u8>; 2],
    /// Unsynced writes per slot: (offset, len).
    unsynced: [Vec<(u64, usize)>; 2],
    /// The durable store.
    pub store: MemStore,
    /// The board's bootloader and its environment: bootctl's model (the one
    /// checked against the real GRUB and U-Boot), Shoal's scheme on the file
    /// backend's semantics unless a test picks another ([`SimDevice::with_bootloader`]).
    pub boot: Board,
    /// Durable operations so far.
    pub ops: u64,
    /// Cut the power right before this operation.
    pub crash_at: Option<u64>,
    /// Events the engine reported.
    pub events: Vec<Event>,
    /// Reboots asked for.
    pub reboots: u32,
    /// Answers for [`Output::RunHealthChecks`].
    pub health: Result<(), String>,
    /// Request sources: chunk bytes by id. A source answers only ids it holds.
    pub stores: BTreeMap<SourceId, BTreeMap<ChunkId, Vec<u8>>>,
    /// Requests sources ignore (to exercise timeouts): how many requests to drop.
    pub drop_requests: u32,
    /// Bytes written to slots, over the device's life.
    pub bytes_written: u64,
    /// Request sources with a link: answered on the virtual clock.
    pub links: BTreeMap<SourceId, Link>,
    /// Requests each source was sent, and chunks asked.
    pub requests_sent: BTreeMap<SourceId, (u64, u64)>,
    /// When `Some`, every request's chunk ids, in the order sent.
    pub requests_log: Option<Vec<Vec<ChunkId>>>,
    /// Cancels received.
    pub cancels: u64,
    /// Sources that answer every request with [`Input::FetchFailed`].
    pub fail_requests: BTreeMap<SourceId, FetchFailure>,
    /// Run [`Engine::check_invariants`] after every step.
    pub check: bool,
    /// Liveness: most outputs and timeouts one [`SimDevice::run_until`] carries
    /// out before it fails the test (an engine that asks the same thing forever,
    /// such as a source for a chunk it said it lacks, or sets a timer again and
    /// again, never settles).
    pub steps_max: u64,
    /// Cut the active slot as a device's driver does ([`Output::IndexSlot`]): in
    /// slot order, handing over the needed chunks met ([`Engine::needed_chunks`])
    /// and telling the engine every this many bytes how far the cut is
    /// ([`Input::IndexProgress`]), stopping when it asks ([`Output::StopIndex`]).
    /// `None`: the whole index at once, nothing handed over.
    pub cut_progress: Option<u64>,
    /// The cuts stopped by the engine, and where.
    pub cuts_stopped: Vec<u64>,
    /// The cuts resumed by the engine ([`Output::CutRest`]), and from where.
    pub rest_cuts: Vec<u64>,
    /// A resumed cut starts and then tells nothing (a stalled read): it ends only
    /// when the engine stops it.
    pub stall_cuts: bool,
    /// The stalled cut, from where.
    stalled: Option<u64>,
    /// Reads of a slot carried out ([`Output::Read`]).
    pub slot_reads: u64,
    /// [`Output::StopIndex`]es carried out and not yet followed by their
    /// [`Event::IndexStopped`] (each event comes with exactly one).
    stops_told: u32,
    /// How far the slot's cut is while the engine judges it (a `StopIndex` then
    /// stops it there).
    cut_at: Option<u64>,
    /// Outputs carried out by the current run.
    steps: u64,
    /// When each linked source is free again, in microseconds.
    busy_until_us: BTreeMap<SourceId, u64>,
    /// Answers in flight, by (delivery time in ms, sequence).
    deliveries: BTreeMap<(u64, u64), Delivery>,
    seq: u64,
    rng: Rng,
    now: u64,
}

impl SimDevice {
    /// A device running slot A with `image_a` in it (not installed by Shoal), slot B
    /// zeroed, both of `capacity` bytes.
    pub fn new(image_a: &[u8], capacity: u64, seed: u64) -> SimDevice {
        let cap = usize::try_from(capacity).expect("test capacity fits usize");
        let mut a = vec![0u8; cap];
        a[..image_a.len()].copy_from_slice(image_a);
        let b = vec![0u8; cap];
        SimDevice {
            live: [a.clone(), b.clone()],
            durable: [a, b],
            unsynced: [Vec::new(), Vec::new()],
            store: MemStore::fresh(Slot::A, [capacity, capacity]),
            boot: Board::new(Bootloader::new(Scheme::Shoal, Flavor::File), Slot::A),
            ops: 0,
            crash_at: None,
            events: Vec::new(),
            reboots: 0,
            health: Ok(()),
            stores: BTreeMap::new(),
            drop_requests: 0,
            bytes_written: 0,
            links: BTreeMap::new(),
            requests_sent: BTreeMap::new(),
            requests_log: None,
            cancels: 0,
            fail_requests: BTreeMap::new(),
            check: true,
            steps_max: 200_000,
            cut_progress: None,
            cuts_stopped: Vec::new(),
            rest_cuts: Vec::new(),
            stall_cuts: false,
            stalled: None,
            slot_reads: 0,
            stops_told: 0,
            cut_at: None,
            steps: 0,
            busy_until_us: BTreeMap::new(),
            deliveries: BTreeMap::new(),
            seq: 0,
            rng: Rng::new(seed),
            now: 0,
        }
    }

    /// The same device with another bootloader (scheme and semantics), freshly
    /// provisioned to run slot A.
    pub fn with_bootloader(mut self, bootloader: Bootloader) -> SimDevice {
        self.boot = Board::new(bootloader, Slot::A);
        self
    }

    /// The engine as it restarts on this device.
    pub fn engine(&self, config: crate::Config) -> Engine {
        Engine::new(config, self.store.load())
    }

    /// The monotonic clock.
    pub fn now(&self) -> Instant {
        Instant::from_millis(self.now)
    }

    fn op(&mut self) -> Result<(), Crashed> {
        self.ops += 1;
        if self.crash_at == Some(self.ops) {
            self.power_cut();
            return Err(Crashed);
        }
        Ok(())
    }

    /// Cuts the power: each unsynced write survives or not, by the seeded coin. The
    /// device is off until [`SimDevice::reboot`].
    pub fn power_cut(&mut self) {
        for s in 0..2 {
            for &(off, len) in &self.unsynced[s] {
                let o = usize::try_from(off).expect("offset fits usize");
                if self.rng.below(2) == 0 {
                    let live = self.live[s][o..o + len].to_vec();
                    self.durable[s][o..o + len].copy_from_slice(&live);
                }
            }
            self.unsynced[s].clear();
            self.live[s] = self.durable[s].clone();
        }
        self.crash_at = None;
    }

    /// A reboot: the bootloader model picks the slot (consuming a try of an armed
    /// trial, falling back once the tries are used up).
    pub fn reboot(&mut self) {
        self.boot.reboot();
    }

    /// What [`Engine::boot`] is told.
    pub fn boot_info(&self) -> Boot {
        Boot::from_bootloader(self.boot.running, &self.boot.state())
    }

    /// Carries out every output, feeding the stream (if any) whenever the engine is
    /// idle, until nothing is left to do.
    pub fn run(&mut self, engine: &mut Engine, stream: Option<Stream>) -> Result<(), Crashed> {
        self.run_until(engine, stream, u64::MAX)
    }

    /// [`SimDevice::run`], stopping before the virtual clock passes `until_ms`.
    pub fn run_until(
        &mut self,
        engine: &mut Engine,
        mut stream: Option<Stream>,
        until_ms: u64,
    ) -> Result<(), Crashed> {
        // What the caller did before (an offer, a source added) was a step too.
        if self.check {
            engine.check_invariants();
        }
        self.steps = 0;
        loop {
            while let Some(out) = engine.poll_output() {
                self.execute(engine, out)?;
            }
            if let Some((source, chunks)) = stream.as_mut() {
                let source = *source;
                match chunks.next() {
                    Some((id, data)) => {
                        if engine.wants(&id) {
                            // As a driver does before it reads a chunk's
                            // references: the reads up to it go first.
                            engine.handle(self.now(), Input::StreamAt { source, id });
                            while let Some(out) = engine.poll_output() {
                                self.execute(engine, out)?;
                            }
                            if engine.wants(&id) {
                                engine.handle(
                                    self.now(),
                                    Input::checked(Origin::Source(source), id, data),
                                );
                            }
                        }
                    }
                    None => {
                        stream = None;
                        engine.handle(self.now(), Input::SourceEnded { source });
                    }
                }
                continue;
            }
            let delivery = self.deliveries.first_key_value().map(|(k, _)| k.0);
            let next = match (delivery, engine.poll_timeout()) {
                (Some(d), Some(t)) => Some(d.min(t.as_millis())),
                (d, t) => d.or(t.map(Instant::as_millis)),
            };
            if next.is_some_and(|n| n > until_ms) {
                self.now = self.now.max(until_ms);
                return Ok(());
            }
            match (delivery, engine.poll_timeout()) {
                (Some(d), t) if t.is_none_or(|t| d <= t.as_millis()) => {
                    self.now = self.now.max(d);
                    let (_, delivery) = self.deliveries.pop_first().expect("one is due");
                    engine.handle(self.now(), delivery.input);
                }
                (_, Some(t)) => {
                    // A timer that is set again and again without the engine
                    // settling counts as outputs do.
                    self.steps += 1;
                    assert!(
                        self.steps <= self.steps_max,
                        "the engine did not settle: {} outputs and timeouts in one run, the last a timeout at {t:?}",
                        self.steps
                    );
                    self.now = self.now.max(t.as_millis());
                    engine.handle_timeout(self.now());
                }
                (Some(_), None) => unreachable!("a delivery is handled by the first arm"),
                (None, None) => return Ok(()),
            }
            if self.check {
                engine.check_invariants();
            }
        }
    }

    /// Hands `input` to the engine at the device's clock (a test stepping the engine
    /// by hand), then checks its invariants as `run` does after every step.
    pub fn handle(&mut self, engine: &mut Engine, input: Input) {
        engine.handle(self.now(), input);
        if self.check {
            engine.check_invariants();
        }
    }

    /// Carries out one output (as `run` does), then checks the engine's invariants.
    pub fn execute(&mut self, engine: &mut Engine, out: Output) -> Result<(), Crashed> {
        self.steps += 1;
        assert!(
            self.steps <= self.steps_max,
            "the engine did not settle: {} outputs in one run, the last {out:?}",
            self.steps
        );
        self.carry_out(engine, out)?;
        if self.check {
            engine.check_invariants();
        }
        Ok(())
    }

    fn carry_out(&mut self, engine: &mut Engine, out: Output) -> Result<(), Crashed> {
        let now = self.now();
        match out {
            Output::IndexSlot {
                slot,
                chunking,
                len,
            } => {
                let end = usize::try_from(len)
                    .expect("fits")
                    .min(self.live[slot_ordinal(slot)].len());
                let index = index_fixed(&self.live[slot_ordinal(slot)][..end], chunking);
                if let Some(step) = self.cut_progress.filter(|_| engine.is_indexing())
                    && self.hand_over(engine, slot, &index.chunks, 0, step)?
                {
                    return Ok(());
                }
                engine.handle(now, Input::SlotIndexed { slot, index });
            }
            Output::CutRest {
                slot,
                chunking,
                from,
                len,
            } => {
                // From the block (here: fixed chunk) boundary at or before `from`,
                // as a device's driver may.
                let from = from - from % u64::from(chunking.avg_size);
                let image = &self.live[slot_ordinal(slot)];
                let end = usize::try_from(len).expect("fits").min(image.len());
                let start = usize::try_from(from).expect("fits").min(end);
                let mut index = index_fixed(&image[start..end], chunking);
                for c in &mut index.chunks {
                    c.offset += from;
                }
                self.rest_cuts.push(from);
                if self.stall_cuts {
                    self.stalled = Some(from);
                    return Ok(());
                }
                let step = self.cut_progress.unwrap_or(64 * 1024);
                if !self.hand_over(engine, slot, &index.chunks, from, step)? {
                    engine.handle(now, Input::CutRestEnded { slot });
                }
            }
            // The cut it stops ends when this is carried out (above).
            // A stop with no cut running (an install that failed with a resumed
            // cut queued, then dropped its job: two stops) is ignored, as the
            // device ignores it.
            Output::StopIndex { .. } => {
                if let Some(cut) = self.cut_at.or(self.stalled.take()) {
                    self.cuts_stopped.push(cut);
                    self.stops_told += 1;
                }
            }
            Output::Read {
                slot,
                id,
                offset,
                len,
            } => {
                self.slot_reads += 1;
                let o = usize::try_from(offset).expect("fits");
                let data = self.live[slot_ordinal(slot)][o..o + len as usize].to_vec();
                engine.handle(now, Input::checked(Origin::Slot(slot), id, data));
            }
            Output::Fetch {
                source,
                request,
                ids,
            } => {
                let sent = self.requests_sent.entry(source).or_default();
                sent.0 += 1;
                sent.1 += ids.len() as u64;
                if let Some(log) = self.requests_log.as_mut() {
                    log.push(ids.clone());
                }
                if self.drop_requests > 0 {
                    self.drop_requests -= 1;
                    return Ok(());
                }
                if let Some(&failure) = self.fail_requests.get(&source) {
                    engine.handle(
                        now,
                        Input::FetchFailed {
                            source,
                            request,
                            failure,
                        },
                    );
                    return Ok(());
                }
                let link = self.links.get(&source).copied();
                if link.is_some_and(|l| l.silent) {
                    return Ok(());
                }
                let now_us = self.now * 1000;
                let mut at_us = match link {
                    Some(l) => {
                        let free = self.busy_until_us.get(&source).copied().unwrap_or(0);
                        free.max(now_us + l.rtt_us / 2)
                    }
                    None => now_us,
                };
                for id in ids {
                    let data = self.stores.get(&source).and_then(|s| s.get(&id)).cloned();
                    let len = data.as_ref().map_or(0, Vec::len) as u64;
                    let input = match data {
                        Some(data) => Input::checked(Origin::Source(source), id, data),
                        None => Input::Unavailable { source, id },
                    };
                    match link {
                        None => engine.handle(now, input),
                        Some(l) => {
                            at_us += l.per_chunk_us;
                            at_us += (len * 1_000_000).checked_div(l.bytes_per_s).unwrap_or(0);
                            let due_ms = (at_us + l.rtt_us / 2).div_ceil(1000);
                            self.seq += 1;
                            self.deliveries.insert(
                                (due_ms, self.seq),
                                Delivery {
                                    source,
                                    request,
                                    input,
                                },
                            );
                        }
                    }
                }
                if link.is_some() {
                    self.busy_until_us.insert(source, at_us);
                }
            }
            Output::Cancel { source, request } => {
                self.cancels += 1;
                self.deliveries
                    .retain(|_, d| !(d.source == source && d.request == request));
            }
            Output::Write {
                slot,
                offsets,
                data,
                ..
            } => {
                for off in offsets.iter() {
                    self.op()?;
                    let o = usize::try_from(off).expect("fits");
                    self.live[slot_ordinal(slot)][o..o + data.len()].copy_from_slice(&data);
                    self.unsynced[slot_ordinal(slot)].push((off, data.len()));
                    self.bytes_written += data.len() as u64;
                    engine.handle(
                        now,
                        Input::Written {
                            slot,
                            bytes: data.len() as u64,
                        },
                    );
                }
            }
            Output::Sync { slot } => {
                self.op()?;
                self.durable[slot_ordinal(slot)] = self.live[slot_ordinal(slot)].clone();
                self.unsynced[slot_ordinal(slot)].clear();
                engine.handle(now, Input::Synced { slot });
            }
            Output::Persist(records) => {
                self.op()?;
                self.store.apply(&records);
            }
            Output::HashSlot { slot, len } => {
                let end = usize::try_from(len).expect("fits");
                let hash = *blake3::hash(&self.live[slot_ordinal(slot)][..end]).as_bytes();
                engine.handle(now, Input::SlotHashed { slot, hash });
            }
            out @ (Output::DisarmTrial { .. }
            | Output::ArmTrial { .. }
            | Output::Commit { .. }
            | Output::Rollback { .. }) => {
                // One environment update, as the device driver makes it.
                self.op()?;
                let step = out.boot_step().expect("a bootloader output");
                if let Err(e) = self.boot.apply(step) {
                    engine.handle(
                        now,
                        Input::Failed {
                            op: crate::IoOp::Bootloader,
                            message: e.to_string(),
                        },
                    );
                }
            }
            Output::Reboot => {
                self.reboots += 1;
            }
            Output::RunHealthChecks => {
                engine.handle(now, Input::HealthChecked(self.health.clone()));
            }
            Output::Event(e) => {
                if let Event::IndexStopped { .. } = e {
                    assert_eq!(
                        self.stops_told, 1,
                        "an IndexStopped event without exactly one StopIndex before it"
                    );
                }
                // A resumed cut stopped because every chunk is written has no
                // event: the count starts again with the next cut.
                if let Event::IndexStopped { .. }
                | Event::CutResumed { .. }
                | Event::Accepted { .. } = e
                {
                    self.stops_told = 0;
                }
                self.events.push(e)
            }
        }
        Ok(())
    }

    /// Hands over what a cut of `slot` meets, as the device's driver does: in slot
    /// order, the needed chunks ([`Engine::needed_chunks`]) and how far the cut is
    /// every `step` bytes past `from` ([`Input::IndexProgress`]), each carried out
    /// at once (and what the engine asks meanwhile too). The engine may stop the
    /// cut ([`Output::StopIndex`]): returns whether it did.
    fn hand_over(
        &mut self,
        engine: &mut Engine,
        slot: Slot,
        chunks: &[crate::IndexedChunk],
        from: u64,
        step: u64,
    ) -> Result<bool, Crashed> {
        let now = self.now();
        let needed = engine.needed_chunks();
        let told_before = self.cuts_stopped.len();
        let mut sent = std::collections::BTreeSet::new();
        let mut told = from;
        self.cut_at = Some(from);
        let stopped = |dev: &SimDevice| dev.cuts_stopped.len() > told_before;
        for c in chunks {
            if needed.contains(&c.id) && sent.insert(c.id) {
                let o = usize::try_from(c.offset).expect("fits");
                let data = self.live[slot_ordinal(slot)][o..o + c.len as usize].to_vec();
                engine.handle(now, Input::checked(Origin::Slot(slot), c.id, data));
                self.drain_nested(engine)?;
                if stopped(self) {
                    break;
                }
            }
            let cut = c.offset + u64::from(c.len);
            if cut >= told + step {
                told = cut;
                self.cut_at = Some(cut);
                engine.handle(now, Input::IndexProgress { slot, cut });
                self.drain_nested(engine)?;
                if stopped(self) {
                    break;
                }
            }
        }
        self.cut_at = None;
        Ok(stopped(self))
    }

    /// Carries out every output the engine has, as the device's driver does
    /// after each input it hands over while it cuts the slot.
    fn drain_nested(&mut self, engine: &mut Engine) -> Result<(), Crashed> {
        while let Some(out) = engine.poll_output() {
            self.execute(engine, out)?;
        }
        Ok(())
    }

    /// The release whose payload the slot holds, by hashing it against `candidates`.
    pub fn holds(&self, slot: Slot, candidates: &[&Release]) -> Option<Release> {
        candidates
            .iter()
            .find(|r| {
                let len = usize::try_from(r.payload_size).expect("fits");
                *blake3::hash(&self.live[slot_ordinal(slot)][..len]).as_bytes() == r.payload_hash
            })
            .map(|r| (*r).clone())
    }
}

/// Cuts `data` into fixed-size chunks of `chunking.avg_size` (tests only need stable,
/// valid chunks; the device cuts with FastCDC).
pub fn index_fixed(data: &[u8], chunking: Chunking) -> SlotIndex {
    let size = chunking.avg_size as usize;
    let chunks = data
        .chunks(size)
        .enumerate()
        .map(|(i, c)| crate::IndexedChunk {
            id: ChunkId::from(blake3::hash(c)),
            offset: (i * size) as u64,
            len: u32::try_from(c.len()).expect("chunk fits u32"),
        })
        .collect();
    SlotIndex { chunking, chunks }
}

/// Chunking used by the test releases: fixed 4 KiB chunks are within its bounds.
pub const TEST_CHUNKING: Chunking = Chunking {
    min_size: 1024,
    avg_size: 4096,
    max_size: 16384,
};

/// A key and a trust root trusting it for releases.
pub fn keys(seed: u8) -> (SecretKey, TrustRoot) {
    let key = SecretKey::from_seed(&[seed; 32]);
    let root =
        TrustRoot::new(1, u64::MAX, &[key.public()], 1, &[key.public()], 1).expect("a valid root");
    (key, root)
}

/// A release manifest for `image` (fixed 4 KiB chunks) and its chunks, each id once.
pub fn release(
    name: &str,
    version: &str,
    counter: u64,
    device_type: &str,
    image: &[u8],
) -> (Manifest, Vec<(ChunkId, Vec<u8>)>) {
    release_chunked(name, version, counter, device_type, image, TEST_CHUNKING)
}

/// [`release`] cut into fixed chunks of `chunking.avg_size`.
pub fn release_chunked(
    name: &str,
    version: &str,
    counter: u64,
    device_type: &str,
    image: &[u8],
    chunking: Chunking,
) -> (Manifest, Vec<(ChunkId, Vec<u8>)>) {
    let index = index_fixed(image, chunking);
    release_indexed(name, version, counter, device_type, image, &index)
}

/// [`release`] cut into chunks of the given sizes, in turn (repeated to the end of
/// the image), with chunking parameters that admit 1 KiB to 64 KiB.
pub fn release_cut(
    name: &str,
    version: &str,
    counter: u64,
    device_type: &str,
    image: &[u8],
    sizes: &[usize],
) -> (Manifest, Vec<(ChunkId, Vec<u8>)>) {
    let chunking = Chunking {
        min_size: 1024,
        avg_size: 16 * 1024,
        max_size: 64 * 1024,
    };
    let mut chunks = Vec::new();
    let mut offset = 0;
    for &size in sizes.iter().cycle() {
        if offset >= image.len() {
            break;
        }
        let c = &image[offset..(offset + size).min(image.len())];
        chunks.push(crate::IndexedChunk {
            id: ChunkId::from(blake3::hash(c)),
            offset: offset as u64,
            len: c.len() as u32,
        });
        offset += c.len();
    }
    let index = SlotIndex { chunking, chunks };
    release_indexed(name, version, counter, device_type, image, &index)
}

fn release_indexed(
    name: &str,
    version: &str,
    counter: u64,
    device_type: &str,
    image: &[u8],
    index: &SlotIndex,
) -> (Manifest, Vec<(ChunkId, Vec<u8>)>) {
    let chunking = index.chunking;
    let chunks: Vec<ChunkRef> = index
        .chunks
        .iter()
        .map(|c| ChunkRef {
            id: c.id,
            size: c.len,
            stored_size: c.len,
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    let data = index
        .chunks
        .iter()
        .filter(|c| seen.insert(c.id))
        .map(|c| {
            let o = usize::try_from(c.offset).expect("fits");
            (c.id, image[o..o + c.len as usize].to_vec())
        })
        .collect();
    let manifest = Manifest {
        base: None,
        name: name.into(),
        depends: BTreeMap::new(),
        version: version.into(),
        chunking,
        payloads: vec![Payload {
            hash: *blake3::hash(image).as_bytes(),
            kind: PayloadKind::RootfsImage,
            name: "rootfs".into(),
            size: image.len() as u64,
            chunks,
            references: Vec::new(),
        }],
        provides: BTreeMap::from([("rootfs-image.version".to_string(), version.to_string())]),
        dictionary: None,
        device_types: vec![device_type.into()],
        format_version: shoal_artifact::FORMAT_VERSION,
        security_counter: counter,
    };
    (manifest, data)
}

/// The signed envelope bytes of `manifest`.
pub fn sign(manifest: &Manifest, key: &SecretKey) -> Vec<u8> {
    let mut env = Envelope::new(manifest.to_cbor());
    env.sign(key);
    env.to_bytes()
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Times of the dead-source experiment.
#[derive(Debug)]
pub struct DeadSource {
    pub healthy_ms: u64,
    pub dead_ms: u64,
    pub healthy_requests: u64,
}

/// The dead-source experiment of issue 10 with `n` chunks of 256 bytes: an install
/// from one healthy request source (20 ms round trip, 150 µs per chunk), then from
/// it and a second one that never answers; virtual times and the healthy source's
/// request count. For the engine's tests and `shoal-bench engine`.
pub fn dead_source_experiment(n: usize, seed: u64) -> DeadSource {
    let (key, root) = keys(3);
    let offer = |m: &Manifest, sources: Vec<crate::SourceInfo>| crate::Offer {
        envelope: sign(m, &key),
        wall_unix_s: None,
        sources,
        reboot: false,
    };
    let chunking = Chunking {
        min_size: 64,
        avg_size: 256,
        max_size: 1024,
    };
    let image = bytes(seed, n * 256);
    let (m, chunks) = release_chunked("acme-os", "1.0", 1, "acme-board", &image, chunking);
    let healthy = Link {
        rtt_us: 20_000,
        per_chunk_us: 150,
        bytes_per_s: 0,
        silent: false,
    };
    let run = |dead: bool| -> (u64, u64) {
        let mut dev = SimDevice::new(&[], image.len() as u64, seed);
        dev.check = false;
        dev.stores
            .insert(SourceId(1), chunks.iter().cloned().collect());
        dev.links.insert(SourceId(1), healthy);
        let source = |id| {
            crate::SourceInfo::new(
                SourceId(id),
                crate::SourceKind::Requests,
                crate::SourceClass::Wan,
                format!("server {id}"),
            )
        };
        let mut sources = vec![source(1)];
        if dead {
            dev.links.insert(
                SourceId(2),
                Link {
                    silent: true,
                    ..Link::default()
                },
            );
            sources.push(source(2));
        }
        let mut config = crate::Config::new("acme-board", root.clone());
        config.journal_batch_bytes = 4 * 1024 * 1024;
        config.seed = seed;
        let mut engine = Engine::new(config, dev.store.load());
        engine.offer(dev.now(), offer(&m, sources)).expect("offer");
        dev.run(&mut engine, None).expect("no crash");
        assert_eq!(dev.boot.armed(), Some(Slot::B), "{:?}", dev.events.last());
        (
            dev.now().as_millis(),
            dev.requests_sent.get(&SourceId(1)).map_or(0, |r| r.0),
        )
    };
    let (healthy_ms, healthy_requests) = run(false);
    let (dead_ms, _) = run(true);
    DeadSource {
        healthy_ms,
        dead_ms,
        healthy_requests,
    }
}

/// One device of a [`LanSim`].
#[derive(Debug)]
pub struct LanNode {
    /// The device.
    pub dev: SimDevice,
    /// Its engine.
    pub engine: Engine,
    /// It runs (a dead one neither answers nor announces).
    pub alive: bool,
    /// It serves corrupt chunks to its peers.
    pub corrupt: bool,
    /// Each answer it serves to a peer starts this much later (a device busy
    /// serving the others, on a loaded CPU); its WAN link is unaffected.
    pub serve_delay_ms: u64,
    /// It has not started yet: its outputs and timers wait, it neither announces
    /// nor hears announcements (a device that joins late; the test sets the swarms).
    pub paused: bool,
    has: std::collections::BTreeSet<ChunkId>,
    fresh: Vec<ChunkId>,
    /// Chunks asked of the server and not answered yet.
    wan_flight: std::collections::BTreeSet<ChunkId>,
    /// `wan_flight` changed since the last announcement.
    flight_changed: bool,
}

/// An answer on its way in a [`LanSim`]: to which device, from which source, for
/// which request and chunk.
type LanDelivery = (usize, SourceId, RequestId, ChunkId, Input);

/// Several engines on one LAN on one virtual clock (a `Pair`-style harness, as
/// quinn's tests do). Each device has its own WAN link to one server (source
/// [`LanSim::WAN`]) and a peer source for every other device (source `j` is device
/// `j`), all devices are one swarm, and each announces the chunks it wrote (and,
/// with [`LanSim::announce_fetching`], those it asked the server for) every
/// [`LanSim::announce_ms`]. Devices can die (stop answering and announcing) or serve
/// corrupt chunks. [`Engine::check_invariants`] runs after every step.
#[derive(Debug)]
pub struct LanSim {
    /// The devices.
    pub nodes: Vec<LanNode>,
    /// Each device's WAN link.
    pub wan: Link,
    /// Each device's LAN link (serving its peers).
    pub lan: Link,
    /// Gossip interval.
    pub announce_ms: u64,
    /// Devices also announce the chunks they asked the server for and do not hold
    /// yet ([`Engine::set_fetching`]), as the daemon does.
    pub announce_fetching: bool,
    /// Chunks the server delivered, over all devices.
    pub wan_chunks: u64,
    /// Chunks peers delivered, over all devices.
    pub lan_chunks: u64,
    server: BTreeMap<ChunkId, Vec<u8>>,
    config: crate::Config,
    envelope: Vec<u8>,
    positions: u32,
    deliveries: BTreeMap<(u64, u64), LanDelivery>,
    busy_us: BTreeMap<(bool, usize), u64>,
    next_announce: u64,
    seq: u64,
    now: u64,
}

impl LanSim {
    /// The server's source id on every device.
    pub const WAN: SourceId = SourceId(1_000_000);

    /// `n` devices offered `manifest` (signed in `envelope`), whose chunks the server
    /// holds.
    pub fn new(
        n: usize,
        config: &crate::Config,
        manifest: &Manifest,
        envelope: &[u8],
        chunks: &[(ChunkId, Vec<u8>)],
    ) -> LanSim {
        let size = manifest.payloads[0].size;
        let positions = u32::try_from(manifest.payloads[0].chunks.len()).expect("fits");
        let mut nodes = Vec::new();
        for i in 0..n {
            let dev = SimDevice::new(&[], size, i as u64 + 1);
            let mut engine = LanSim::offered(i, n, config, envelope, positions, &dev, 0);
            let members = (0..n)
                .filter(|&j| j != i)
                .map(|j| (LanSim::key(j), SourceId(j as u32)))
                .collect();
            engine
                .set_swarm(
                    Instant::from_millis(0),
                    crate::Swarm {
                        me: LanSim::key(i),
                        members,
                    },
                )
                .expect("swarm");
            nodes.push(LanNode {
                dev,
                engine,
                alive: true,
                corrupt: false,
                serve_delay_ms: 0,
                paused: false,
                has: std::collections::BTreeSet::new(),
                fresh: Vec::new(),
                wan_flight: std::collections::BTreeSet::new(),
                flight_changed: false,
            });
        }
        LanSim {
            nodes,
            wan: Link {
                rtt_us: 40_000,
                per_chunk_us: 1_000,
                bytes_per_s: 0,
                silent: false,
            },
            lan: Link {
                rtt_us: 1_000,
                per_chunk_us: 50,
                bytes_per_s: 0,
                silent: false,
            },
            announce_ms: 20,
            announce_fetching: true,
            wan_chunks: 0,
            lan_chunks: 0,
            server: chunks.iter().cloned().collect(),
            config: config.clone(),
            envelope: envelope.to_vec(),
            positions,
            deliveries: BTreeMap::new(),
            busy_us: BTreeMap::new(),
            next_announce: 0,
            seq: 0,
            now: 0,
        }
    }

    /// Device `i`'s key on the LAN.
    fn key(i: usize) -> crate::NodeKey {
        crate::NodeKey(*blake3::hash(&(i as u64).to_le_bytes()).as_bytes())
    }

    /// Device `i` of `n`'s engine, offered the release at `now_ms` with the server
    /// and a peer source for each other device (holding nothing yet).
    fn offered(
        i: usize,
        n: usize,
        config: &crate::Config,
        envelope: &[u8],
        positions: u32,
        dev: &SimDevice,
        now_ms: u64,
    ) -> Engine {
        let mut config = config.clone();
        config.seed = i as u64;
        let mut engine = Engine::new(config, dev.store.load());
        let mut sources = vec![crate::SourceInfo::new(
            LanSim::WAN,
            crate::SourceKind::Requests,
            crate::SourceClass::Wan,
            "server",
        )];
        for j in (0..n).filter(|&j| j != i) {
            sources.push(
                crate::SourceInfo::new(
                    SourceId(j as u32),
                    crate::SourceKind::Requests,
                    crate::SourceClass::Peer,
                    format!("peer {j}"),
                )
                .holding(crate::Holds::Positions(crate::Bitfield::new(positions))),
            );
        }
        let offer = crate::Offer {
            envelope: envelope.to_vec(),
            wall_unix_s: None,
            sources,
            reboot: false,
        };
        engine
            .offer(Instant::from_millis(now_ms), offer)
            .expect("offer");
        engine
    }

    /// Every started device's swarm becomes the other started devices.
    fn reset_swarms(&mut self, now: Instant) {
        let started: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !self.nodes[i].paused)
            .collect();
        for &i in &started {
            let members = started
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| (LanSim::key(j), SourceId(j as u32)))
                .collect();
            let engine = &mut self.nodes[i].engine;
            if engine.is_installing() {
                engine
                    .set_swarm(
                        now,
                        crate::Swarm {
                            me: LanSim::key(i),
                            members,
                        },
                    )
                    .expect("swarm");
            }
        }
    }

    /// Devices `late` have not started: they wait until [`LanSim::join`], and the
    /// others' swarms leave them out meanwhile.
    pub fn hold_back(&mut self, late: &[usize]) {
        for &i in late {
            self.nodes[i].paused = true;
        }
        self.reset_swarms(Instant::from_millis(self.now));
    }

    /// Devices `late` start now: each is offered the release, hears what the
    /// started devices hold and (with [`LanSim::announce_fetching`]) fetch, as the
    /// daemon's state messages on connecting say, and every swarm becomes all the
    /// started devices.
    pub fn join(&mut self, late: &[usize]) {
        let now = Instant::from_millis(self.now);
        let n = self.nodes.len();
        for &i in late {
            let engine = LanSim::offered(
                i,
                n,
                &self.config,
                &self.envelope,
                self.positions,
                &self.nodes[i].dev,
                self.now,
            );
            self.nodes[i].engine = engine;
            self.nodes[i].paused = false;
        }
        self.reset_swarms(now);
        for &i in late {
            let started: Vec<usize> = (0..n)
                .filter(|&j| j != i && !self.nodes[j].paused)
                .collect();
            for j in started {
                let holds = crate::Holds::Ids(self.nodes[j].has.clone());
                self.nodes[i]
                    .engine
                    .add_holds(now, SourceId(j as u32), &holds)
                    .expect("a registered peer");
            }
        }
        for node in &mut self.nodes {
            node.flight_changed = true;
        }
        self.announce(now);
    }

    /// The virtual clock, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.now
    }

    /// Device `i` dies: it stops answering, announcing and installing.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
        self.deliveries.retain(|_, d| d.0 != i);
    }

    /// Runs until every live device has finished installing (armed or failed), or
    /// the clock passes `until_ms`.
    pub fn run(&mut self, until_ms: u64) {
        // What the caller did before (offers, swarms set) was a step too.
        for n in self.nodes.iter().filter(|n| n.alive) {
            n.engine.check_invariants();
        }
        loop {
            for i in 0..self.nodes.len() {
                while self.nodes[i].alive && !self.nodes[i].paused {
                    let Some(out) = self.nodes[i].engine.poll_output() else {
                        break;
                    };
                    self.execute(i, out);
                    self.nodes[i].engine.check_invariants();
                }
            }
            let installing = self
                .nodes
                .iter()
                .any(|n| n.alive && !n.paused && n.engine.is_installing());
            if !installing {
                return;
            }
            let delivery = self.deliveries.first_key_value().map(|(k, _)| k.0);
            let timer = self
                .nodes
                .iter()
                .filter(|n| n.alive && !n.paused)
                .filter_map(|n| n.engine.poll_timeout())
                .map(Instant::as_millis)
                .min();
            let next = [delivery, timer, Some(self.next_announce)]
                .into_iter()
                .flatten()
                .min()
                .expect("the announce tick is always set");
            if next > until_ms {
                self.now = self.now.max(until_ms);
                return;
            }
            self.now = self.now.max(next);
            let now = Instant::from_millis(self.now);
            if delivery == Some(next) {
                let (_, (i, source, _, id, input)) = self.deliveries.pop_first().expect("due");
                if source == LanSim::WAN && self.nodes[i].wan_flight.remove(&id) {
                    self.nodes[i].flight_changed = true;
                }
                if source == LanSim::WAN && matches!(input, Input::Chunk { .. }) {
                    self.wan_chunks += 1;
                } else if matches!(input, Input::Chunk { .. }) {
                    self.lan_chunks += 1;
                }
                self.nodes[i].engine.handle(now, input);
                self.nodes[i].engine.check_invariants();
                continue;
            } else if self.next_announce == next {
                self.announce(now);
                self.next_announce = self.now + self.announce_ms;
            } else {
                for n in self.nodes.iter_mut().filter(|n| n.alive && !n.paused) {
                    if n.engine.poll_timeout().is_some_and(|t| t <= now) {
                        n.engine.handle_timeout(now);
                    }
                }
            }
            for n in self.nodes.iter().filter(|n| n.alive && !n.paused) {
                n.engine.check_invariants();
            }
        }
    }

    fn announce(&mut self, now: Instant) {
        // What each wrote first, then what it fetches (one state message says both:
        // a chunk that arrived leaves the fetching set as it joins the held one).
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive || self.nodes[i].paused || self.nodes[i].fresh.is_empty() {
                continue;
            }
            let fresh: std::collections::BTreeSet<ChunkId> =
                std::mem::take(&mut self.nodes[i].fresh)
                    .into_iter()
                    .collect();
            let holds = crate::Holds::Ids(fresh);
            for k in (0..self.nodes.len()).filter(|&k| k != i) {
                let n = &mut self.nodes[k];
                if n.alive && !n.paused && n.engine.is_installing() {
                    n.engine
                        .add_holds(now, SourceId(i as u32), &holds)
                        .expect("a registered peer");
                }
            }
        }
        for i in 0..self.nodes.len() {
            let node = &mut self.nodes[i];
            if !self.announce_fetching || !node.alive || node.paused || !node.flight_changed {
                continue;
            }
            node.flight_changed = false;
            let fetching =
                crate::Holds::Ids(node.wan_flight.difference(&node.has).copied().collect());
            for k in (0..self.nodes.len()).filter(|&k| k != i) {
                let n = &mut self.nodes[k];
                if n.alive && !n.paused && n.engine.is_installing() {
                    n.engine
                        .set_fetching(now, SourceId(i as u32), &fetching)
                        .expect("a registered peer");
                }
            }
        }
    }

    fn execute(&mut self, i: usize, out: Output) {
        match out {
            Output::Fetch {
                source,
                request,
                ids,
            } => {
                let (wan, serving, link) = if source == LanSim::WAN {
                    (true, i, self.wan)
                } else {
                    (false, source.0 as usize, self.lan)
                };
                if !wan && (!self.nodes[serving].alive || self.nodes[serving].paused) {
                    return; // Silent.
                }
                let now_us = self.now * 1000;
                let free = self.busy_us.get(&(wan, serving)).copied().unwrap_or(0);
                let mut at_us = free.max(now_us + link.rtt_us / 2);
                if !wan {
                    at_us += self.nodes[serving].serve_delay_ms * 1000;
                }
                for id in ids {
                    if wan && self.nodes[i].wan_flight.insert(id) {
                        self.nodes[i].flight_changed = true;
                    }
                    let data = if wan {
                        self.server.get(&id).cloned()
                    } else if self.nodes[serving].has.contains(&id) {
                        self.server.get(&id).cloned().map(|mut d| {
                            if self.nodes[serving].corrupt {
                                d[0] ^= 1;
                            }
                            d
                        })
                    } else {
                        None
                    };
                    let input = match data {
                        Some(data) => Input::checked(Origin::Source(source), id, data),
                        None => Input::Unavailable { source, id },
                    };
                    at_us += link.per_chunk_us;
                    let due = (at_us + link.rtt_us / 2).div_ceil(1000);
                    self.seq += 1;
                    self.deliveries
                        .insert((due, self.seq), (i, source, request, id, input));
                }
                self.busy_us.insert((wan, serving), at_us);
            }
            Output::Cancel { source, request } => {
                let node = &mut self.nodes[i];
                self.deliveries.retain(|_, d| {
                    let cancelled = d.0 == i && d.1 == source && d.2 == request;
                    if cancelled && source == LanSim::WAN && node.wan_flight.remove(&d.3) {
                        node.flight_changed = true;
                    }
                    !cancelled
                });
            }
            out => {
                if let Output::Write { id, .. } = out
                    && self.nodes[i].has.insert(id)
                {
                    self.nodes[i].fresh.push(id);
                }
                let n = &mut self.nodes[i];
                n.dev.execute(&mut n.engine, out).expect("no power cut");
            }
        }
    }
}

/// WAN chunks per needed chunk of the LAN experiment of issue 10: `n` devices (one
/// swarm) install a release of `chunks` chunks of 256 bytes from one server; with
/// `kill`, devices 3 and 7 die after 110 ms (between two announcements). Returns the ratio and the virtual time.
pub fn lan_experiment(n: usize, chunks: usize, kill: bool) -> (f64, u64) {
    let (key, root) = keys(5);
    let chunking = Chunking {
        min_size: 64,
        avg_size: 256,
        max_size: 1024,
    };
    let image = bytes(2, chunks * 256);
    let (m, data) = release_chunked("acme-os", "2.0", 2, "acme-board", &image, chunking);
    let mut config = crate::Config::new("acme-board", root);
    config.journal_batch_bytes = 64 * 1024;
    let mut sim = LanSim::new(n, &config, &m, &sign(&m, &key), &data);
    if kill {
        sim.run(110);
        sim.kill(3);
        sim.kill(7);
    }
    sim.run(3_600_000);
    for (i, node) in sim.nodes.iter().enumerate().filter(|(_, n)| n.alive) {
        assert_eq!(
            node.dev.boot.armed(),
            Some(Slot::B),
            "device {i} did not arm"
        );
    }
    (sim.wan_chunks as f64 / chunks as f64, sim.now_ms())
}

/// Hashes a chunk id by its first eight bytes (ids are BLAKE3 hashes: uniform),
/// deterministically (no OS randomness).
#[derive(Debug, Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(word);
    }

    fn write_usize(&mut self, _: usize) {}
}

/// Chunk sizes by id for [`LengthsOnly`]: looked up, never iterated, with a
/// deterministic hasher (so not what the crate's ban on `HashMap` guards against).
#[allow(clippy::disallowed_types)]
pub type Sizes = std::collections::HashMap<ChunkId, u32, std::hash::BuildHasherDefault<IdHasher>>;

/// A driver that models chunks by id and length only, as the fleet simulator does:
/// request sources answer with [`VerifiedChunk::simulated`](shoal_artifact::VerifiedChunk::simulated)
/// proofs (no bytes, no hashing), writes and syncs complete at once, the final hash
/// is the manifest's, the active slot holds none of the release's chunks, the
/// store is not kept. For the engine's measurements (the
/// bench) and the test that the engine installs from proofs alone.
#[derive(Debug)]
pub struct LengthsOnly {
    /// Each chunk's uncompressed size, from the manifest (what a driver knows).
    pub sizes: Sizes,
    /// The payload hash [`Output::HashSlot`] is answered with.
    pub payload_hash: [u8; 32],
    /// Answers not yet handed over, in order.
    pub pending: std::collections::VecDeque<Input>,
    /// Events seen.
    pub events: Vec<Event>,
    /// Chunks handed over.
    pub chunks: u64,
    /// Requests ([`Output::Fetch`]) and store transactions ([`Output::Persist`])
    /// seen.
    pub fetches: u64,
    /// See `fetches`.
    pub persists: u64,
}

impl LengthsOnly {
    /// A driver for installs of `manifest`'s first payload.
    pub fn new(manifest: &Manifest) -> LengthsOnly {
        let p = &manifest.payloads[0];
        LengthsOnly {
            sizes: p.chunks.iter().map(|c| (c.id, c.size)).collect(),
            payload_hash: p.hash,
            pending: std::collections::VecDeque::new(),
            events: Vec::new(),
            chunks: 0,
            fetches: 0,
            persists: 0,
        }
    }

    /// Carries out every output the engine has (answers are queued, not handed
    /// over: [`LengthsOnly::step`]).
    pub fn drain(&mut self, engine: &mut Engine) {
        while let Some(out) = engine.poll_output() {
            match out {
                Output::Persist(_) => self.persists += 1,
                Output::Fetch { source, ids, .. } => {
                    self.fetches += 1;
                    for id in ids {
                        let size = self
                            .sizes
                            .get(&id)
                            .copied()
                            .expect("asked for a chunk of the manifest");
                        self.pending.push_back(Input::Chunk {
                            origin: Origin::Source(source),
                            chunk: shoal_artifact::VerifiedChunk::simulated(id, size),
                        });
                    }
                }
                Output::Write {
                    slot, offsets, len, ..
                } => {
                    self.pending.push_back(Input::Written {
                        slot,
                        bytes: u64::from(len) * offsets.len() as u64,
                    });
                }
                Output::Sync { slot } => self.pending.push_back(Input::Synced { slot }),
                // The active slot holds none of the release's chunks.
                Output::IndexSlot { slot, chunking, .. } => {
                    self.pending.push_back(Input::SlotIndexed {
                        slot,
                        index: SlotIndex {
                            chunking,
                            chunks: Vec::new(),
                        },
                    })
                }
                Output::Read { slot, id, .. } => self.pending.push_back(Input::Corrupt {
                    origin: Origin::Slot(slot),
                    id,
                }),
                Output::HashSlot { slot, .. } => self.pending.push_back(Input::SlotHashed {
                    slot,
                    hash: self.payload_hash,
                }),
                Output::Event(e) => self.events.push(e),
                _ => {}
            }
        }
    }

    /// Hands the oldest queued answer over and carries out what follows; `false`
    /// when nothing was queued.
    pub fn step(&mut self, engine: &mut Engine, now: Instant) -> bool {
        let Some(input) = self.pending.pop_front() else {
            return false;
        };
        if matches!(input, Input::Chunk { .. }) {
            self.chunks += 1;
        }
        engine.handle(now, input);
        self.drain(engine);
        true
    }

    /// Runs until nothing is queued.
    pub fn run(&mut self, engine: &mut Engine, now: Instant) {
        self.drain(engine);
        while self.step(engine, now) {}
    }
}
