//! The chunk plan and the fetch scheduler: which needed chunk comes from where, when.
//!
//! Per install ([`Job`]) the engine keeps, by entry of the [`ChunkTable`] (a distinct
//! chunk), one [`Need`] state, and by position one "done" bit; a registry of sources
//! ([`SourceState`]: in-flight requests and their limit, a round-trip estimate,
//! consecutive failures and backoff, byte counters, why it is gone); and a slab of
//! requests in flight. Chunks are read from the active slot first (cheapest), then
//! requested from the cheapest class of request source that holds them, in batches
//! sized in bytes for the transport; a stream source (an artifact) is left the
//! chunks it holds while it is open.
//!
//! A source is asked one request at a time until it first answers (slow start),
//! then up to its limit.
//!
//! No source can stall an install: a source with requests in flight that is silent
//! for its retransmission timeout (RFC 6298 style, from the gaps between its
//! answers) loses them to the others, backs off exponentially and is asked one
//! request at a time until it answers again; after
//! [`RetryConfig::failures_max`](crate::RetryConfig::failures_max) failures in a row it
//! is dropped. When nothing is left to hand out, an idle source takes over the chunks
//! of a request that has waited longer than its own timeout elsewhere (end game), and
//! the loser is cancelled. A source that sends a corrupt chunk is banned for the
//! deployment. The install fails only when some needed chunk has no source left.

use std::collections::VecDeque;

use std::sync::Arc;

/// Syncs asked for at once that the engine keeps room for from the start.
pub(crate) const SYNCS_ROOM: usize = 8;

use shoal_artifact::{ChunkId, VerifiedChunk};
use tracing::{debug, info, warn};

use super::budget::WanBudget;
use crate::bits::Bitfield;
use crate::error::{InstallError, IoOp};
use crate::source::{
    FetchFailure, Gone, Holds, Origin, RequestId, SourceClass, SourceId, SourceInfo, SourceKind,
    SourceStatus,
};
use crate::state::{Record, Slot, slot_ordinal};
use crate::time::Instant;
use crate::timer::Timer;

pub(crate) use super::need::Need;
use super::need::NeedTable;
use super::release::VerifiedRelease;
use super::table::{ChunkTable, WHOLE_ENTRY};
use super::{Engine, Event, Offsets, Output};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Indexing,
    /// Reading, at their own payload offsets in the active slot, the needed chunks
    /// that neither the slot's index nor any source holds: an absent one fails the
    /// install before anything is written.
    Probing,
    Fetching,
    /// Every chunk is written; the last journal batches wait for their syncs.
    Flushing,
    Hashing,
}

/// A request source's or stream's state in the registry.
#[derive(Debug)]
pub(crate) struct SourceState {
    pub(crate) info: SourceInfo,
    /// By entry: what it holds; `None`: it does not say.
    holds: Option<Bitfield>,
    /// By entry: what it answered it does not hold (allocated on the first).
    lacks: Option<Bitfield>,
    pub(crate) gone: Option<Gone>,
    /// Slab slots of its requests in flight, oldest first.
    pub(crate) requests: Vec<u32>,
    /// The request being filled by the current pump.
    open: Option<u32>,
    srtt_ms: Option<u64>,
    rttvar_ms: u64,
    rto_ms: u64,
    last_heard: Option<Instant>,
    pub(crate) failures: u32,
    backoff_until: Option<Instant>,
    /// Wire bytes per second it delivers while it has requests in flight (a
    /// moving average of windows of at least [`RATE_WINDOW_MS`]), once measured.
    rate_bytes_per_s: Option<u64>,
    /// The window being measured: since when (it had requests in flight all
    /// along), and the wire bytes it delivered.
    window_start: Option<Instant>,
    window_bytes: u64,
    chunks: u64,
    bytes: u64,
    wire_bytes: u64,
}

impl SourceState {
    fn new(mut info: SourceInfo, table: &ChunkTable, rto_ms: u64) -> SourceState {
        // Kept as a bitfield by entry; the info keeps the rest.
        let holds = holds_by_entry(&std::mem::take(&mut info.holds), table);
        SourceState {
            info,
            holds,
            lacks: None,
            gone: None,
            requests: Vec::new(),
            open: None,
            srtt_ms: None,
            rttvar_ms: 0,
            rto_ms,
            last_heard: None,
            failures: 0,
            backoff_until: None,
            rate_bytes_per_s: None,
            window_start: None,
            window_bytes: 0,
            chunks: 0,
            bytes: 0,
            wire_bytes: 0,
        }
    }

    fn is_requests(&self) -> bool {
        self.info.kind == SourceKind::Requests && self.gone.is_none()
    }

    fn is_open_stream(&self) -> bool {
        self.info.kind == SourceKind::Stream && self.gone.is_none()
    }

    /// Whether it may hold entry `e` (holds it or does not say, and did not say it
    /// lacks it).
    fn may_hold(&self, e: u32) -> bool {
        self.holds.as_ref().is_none_or(|h| h.get(e))
            && !self.lacks.as_ref().is_some_and(|l| l.get(e))
    }

    fn in_backoff(&self, now: Instant) -> bool {
        self.backoff_until.is_some_and(|t| t > now)
    }

    /// Requests it may have in flight: one until it first answers (slow start), and
    /// one while it is on probation after a failure; its limit otherwise.
    ///
    /// Slow start (issue 11): requests piled on a source that has not answered yet
    /// share its link, so each answer's first byte comes later the more there are,
    /// and a driver that needs one more round trip before its first answer (a zstd
    /// dictionary) waits behind all of them. On a 10 Mbit/s link four 4 MiB batches
    /// kept the first answer past `rto_initial`: the live source was taken for a
    /// silent one and everything it had already sent into the link was asked again.
    /// One request costs a single round trip before pipelining starts, and a dead
    /// source holds one request rather than its whole limit.
    fn requests_limit(&self) -> usize {
        if self.failures > 0 || self.last_heard.is_none() {
            1
        } else {
            self.info.limits.requests_max.max(1) as usize
        }
    }

    fn lack(&mut self, e: u32, entries: u32) {
        self.lacks
            .get_or_insert_with(|| Bitfield::new(entries))
            .set(e);
    }

    /// When it counts as silent, if it has requests in flight: its timeout after
    /// the last sign of life, plus, once its rate is measured, the time the next
    /// answer of each request in flight takes on the wire at that rate (a chunk
    /// of `wire_max` bytes each), so a slow but live link is not taken for a dead
    /// one (issue 10: a 30 KiB/s link needs 2 s for one 64 KiB chunk).
    fn silence_deadline(&self, requests: &[Option<Request>], wire_max: u64) -> Option<Instant> {
        let oldest = self
            .requests
            .iter()
            .filter_map(|&r| requests[r as usize].as_ref())
            .map(|r| r.sent)
            .min()?;
        let since = self.last_heard.map_or(oldest, |h| h.max(oldest));
        let transfer_ms = self.rate_bytes_per_s.map_or(0, |rate| {
            (wire_max * self.requests.len() as u64).saturating_mul(1000) / rate.max(1)
        });
        Some(Instant::from_millis(
            since
                .as_millis()
                .saturating_add(self.rto_ms)
                .saturating_add(transfer_ms),
        ))
    }

    /// Counts `wire` bytes it delivered at `now` toward its rate.
    fn delivered(&mut self, wire: u64, now: Instant) {
        let Some(start) = self.window_start else {
            return;
        };
        self.window_bytes += wire;
        let elapsed = now.as_millis().saturating_sub(start.as_millis());
        if elapsed >= RATE_WINDOW_MS {
            let sample = self.window_bytes.saturating_mul(1000) / elapsed;
            self.rate_bytes_per_s = Some(match self.rate_bytes_per_s {
                None => sample,
                Some(rate) => (3 * rate + sample) / 4,
            });
            self.window_start = Some(now);
            self.window_bytes = 0;
        }
    }

    pub(crate) fn status(&self) -> SourceStatus {
        SourceStatus {
            id: self.info.id,
            name: self.info.name.clone(),
            class: self.info.class,
            requests_in_flight: self.requests.len() as u32,
            srtt: self.srtt_ms.map(std::time::Duration::from_millis),
            failures: self.failures,
            chunks: self.chunks,
            bytes: self.bytes,
            wire_bytes: self.wire_bytes,
            gone: self.gone,
        }
    }
}

/// The entries a source holds, as a bitfield over entries (`None`: unknown).
pub(crate) fn holds_by_entry(holds: &Holds, table: &ChunkTable) -> Option<Bitfield> {
    let n = table.entries();
    match holds {
        Holds::Unknown => None,
        Holds::All => Some(Bitfield::full(n)),
        Holds::Ids(ids) => Some(Bitfield::from_members(
            n,
            ids.iter().filter_map(|id| table.entry(id)),
        )),
        Holds::Positions(bits) => Some(Bitfield::from_members(
            n,
            bits.iter()
                .filter(|&p| p < table.positions())
                .map(|p| table.entry_at(p)),
        )),
    }
}

/// A request in flight.
#[derive(Debug)]
pub(crate) struct Request {
    /// Generation of its slab slot, so a stale id is recognised.
    generation: u32,
    /// Index of its source in [`Job::sources`].
    pub(crate) source: usize,
    sent: Instant,
    /// The entries asked for.
    pub(crate) entries: Vec<u32>,
    /// Of those, how many are still needed and owned by this request.
    pub(crate) left: u32,
    bytes: u64,
}

/// The install in progress (memory only; rebuilt from the journal on restart).
#[derive(Debug)]
pub(crate) struct Job {
    /// The release, shared with every engine installing it.
    pub(crate) rel: Arc<VerifiedRelease>,
    pub(crate) target: Slot,
    pub(crate) reboot: bool,
    pub(crate) step: Step,
    pub(crate) sources: Vec<SourceState>,
    /// By entry: where it is (and the read and fetch queues).
    pub(crate) need: NeedTable,
    /// By entry: already read from the active slot at its own payload offset.
    guessed: Bitfield,
    /// Entries the active slot's index holds at their size (set by the plan, from
    /// one pass over the index).
    pub(crate) indexed: Bitfield,
    /// By position: written (this run or, per the journal, before).
    pub(crate) written: Bitfield,
    /// By position: recorded in the journal (written and synced).
    pub(crate) journaled: Bitfield,
    /// Entries not [`Need::Done`].
    pub(crate) needed: u32,
    /// Uncompressed bytes of the needed entries (each once).
    needed_bytes: u64,
    pub(crate) reads_in_flight: u32,
    pub(crate) requests: Vec<Option<Request>>,
    free: Vec<u32>,
    generation: u32,
    /// Bytes of the positions written since the last journal commit (the
    /// positions are the engine's: they outlive a job that fails).
    batch_bytes: u64,
    /// When the first chunk of the open batch was written.
    batch_since: Option<Instant>,
    /// Chunks still to probe ([`Step::Probing`]), probes in flight, and entries
    /// found absent.
    probes: VecDeque<u32>,
    probes_in_flight: u32,
    absent: Vec<u32>,
    /// Whether needed chunks met while the active slot is indexed are taken then
    /// (see [`Engine::needed_chunks`]).
    pub(crate) take_while_indexing: bool,
    /// The cut of the active slot this install waits for: bytes it cuts, bytes of
    /// needed chunks (each once) taken from it so far, and where the window being
    /// judged began: bytes cut and found then ([`Engine::index_pays`]).
    pub(crate) index_len: u64,
    pub(crate) index_found: u64,
    pub(crate) index_window: (u64, u64),
    /// Whether the engine stopped the cut of the active slot
    /// ([`Output::StopIndex`](super::Output::StopIndex)): the part cut showed the
    /// slot unrelated to the release, so a chunk is not looked for at its own
    /// offset there either.
    pub(crate) index_stopped: bool,
    /// How far the cut of the active slot got (bytes from offset 0): where a
    /// stopped cut resumes ([`Output::CutRest`](super::Output::CutRest)).
    pub(crate) index_cut: u64,
    /// A resumed cut runs: asked for, not yet ended or stopped.
    pub(crate) cutting_rest: bool,
    /// A resumed cut told nothing for [`Config::cut_silence`](crate::Config::cut_silence)
    /// and was given up: the slot is not cut again during this install (a driver
    /// whose read stalled would stall again).
    pub(crate) cut_given_up: bool,
    /// While a resumed cut runs, chunks the rest of the slot may hold are not asked
    /// of a LAN peer or the WAN (only of local sources): until a window of the cut
    /// gives too little to be worth waiting for, or the cut ends, stops or tells
    /// nothing for [`Config::cut_silence`](crate::Config::cut_silence).
    pub(crate) network_paused: bool,
    /// When the resumed cut last told its progress (or was asked for).
    pub(crate) cut_heard: Instant,
    /// The request generation when the pause began (requests made since may not
    /// go to the network: the invariants check).
    pub(crate) pause_generation: u32,
    /// A source came, went, or said it lacks a chunk since the cut was stopped:
    /// whether the stop still holds is checked at the next pump (not on every
    /// pump: the check reads every needed entry).
    pub(crate) cut_recheck: bool,
    /// The active slot's index was taken from a sampled check
    /// ([`Input::SlotIndexWritten`](super::Input::SlotIndexWritten)'s `sampled`):
    /// most of its entries were never read. Until one is found bad, a bad one
    /// that no source holds makes the engine cut the whole slot by content
    /// ([`Engine::on_bad_chunk`]).
    pub(crate) index_unproved: bool,
    /// Bytes the journal holds (cached for `status()`).
    pub(crate) journal_bytes: u64,
    /// The first corrupt chunk a stream sent.
    corrupt: Option<(Origin, ChunkId)>,
    /// The LAN swarm, when the driver named one.
    pub(crate) lan: Option<super::lan::LanState>,
    /// The data budget and rate cap of WAN requests (what every run asked is
    /// persisted with each journal batch).
    pub(crate) budget: WanBudget,
    /// Cleared entry lists of ended requests, for the next ones.
    spare_entries: Vec<Vec<u32>>,
    /// The end game's list of sources that may take over a request (kept, with
    /// room for every source, so that it allocates nothing).
    takers: Vec<usize>,
    /// Bytes of [`Output::Write`] not yet answered by [`Input::Written`](crate::Input::Written).
    pub(crate) writing_bytes: u64,
    /// How reads of the active slot keep pace with an open stream.
    interleave: Interleave,
}

/// Reads of the active slot interleaved with an open stream (an artifact): a driver
/// answers reads at once, so reads issued all at once would all be carried out
/// before the stream's next chunk, and the stream's decoding would then run alone.
/// Instead, while a stream is the only source left open, the reads issued keep
/// to the stream's position in the payload: the read of an entry is issued once
/// the stream has reached, less
/// [`Config::stream_read_lead_bytes`](crate::Config::stream_read_lead_bytes), the
/// payload offset where the entry first lies. Entries are in payload order, so the
/// reads and the stream then move through the payload together (and a driver that
/// reads the references of a delta-encoded chunk from the active slot finds them
/// near what it reads for the copy). The stream's position is what it says
/// ([`Input::StreamAt`](crate::Input::StreamAt)) or else the end of the last chunk
/// it handed over; it starts at the first chunk the stream is left to bring. A
/// stream that brought all it was planned to, ends, fails or is dropped releases
/// the rest. A stream that also holds chunks planned for reading (a full artifact)
/// does not pace them.
#[derive(Debug, Default, Clone, Copy)]
struct Interleave {
    /// Bytes of the needed entries left to an open stream at the plan (0: the
    /// reads are not paced).
    stream_planned: u64,
    /// Bytes of those the stream brought since.
    stream_brought: u64,
    /// The payload offset the stream has reached.
    position: u64,
}

impl Interleave {
    /// Whether the read of an entry whose first payload offset is `offset` may be
    /// issued, `lead` bytes of payload allowed beyond the stream's position.
    fn allows_read(&self, offset: u64, lead: u64) -> bool {
        if self.stream_planned == 0 || self.stream_brought >= self.stream_planned {
            return true;
        }
        offset < self.position.saturating_add(lead)
    }

    /// The stream has reached payload offset `offset` (it never moves back).
    fn reached(&mut self, offset: u64) {
        self.position = self.position.max(offset);
    }
}

impl Job {
    /// The plan for `manifest`'s payload `payload` into `target`, with the journal's
    /// `done` positions already written.
    pub(crate) fn new(
        rel: Arc<VerifiedRelease>,
        target: Slot,
        reboot: bool,
        done_positions: &[u32],
        budget: WanBudget,
    ) -> Job {
        let table = &rel.table;
        let n = table.entries();
        let mut written = Bitfield::new(table.positions());
        for &p in done_positions {
            if p < table.positions() {
                written.set(p);
            }
        }
        let journaled = written.clone();
        // A fresh install needs every entry: no walk over them below (an offer to
        // each of a fleet's devices asks this of the shared release).
        let fresh = done_positions.is_empty();
        let mut job = Job {
            rel: Arc::clone(&rel),
            journaled,
            target,
            reboot,
            step: Step::Indexing,
            sources: Vec::new(),
            need: if fresh {
                NeedTable::all_idle(n)
            } else {
                NeedTable::new(n)
            },
            guessed: Bitfield::new(n),
            indexed: Bitfield::new(n),
            written,
            needed: 0,
            needed_bytes: 0,
            reads_in_flight: 0,
            requests: Vec::new(),
            free: Vec::new(),
            generation: 0,
            batch_bytes: 0,
            batch_since: None,
            probes: VecDeque::new(),
            probes_in_flight: 0,
            absent: Vec::new(),
            take_while_indexing: false,
            index_len: 0,
            index_found: 0,
            index_window: (0, 0),
            index_stopped: false,
            index_cut: 0,
            cutting_rest: false,
            cut_given_up: false,
            network_paused: false,
            cut_heard: Instant::from_millis(0),
            pause_generation: 0,
            cut_recheck: false,
            index_unproved: false,
            journal_bytes: 0,
            corrupt: None,
            lan: None,
            budget,
            spare_entries: Vec::new(),
            takers: Vec::new(),
            writing_bytes: 0,
            interleave: Interleave::default(),
        };
        if fresh {
            job.needed = n;
            job.needed_bytes = job.rel.table.distinct_bytes();
        } else {
            for e in 0..n {
                let all_done = job.rel.table.positions_of(e).all(|p| job.written.get(p));
                if !all_done {
                    job.need.set(e, Need::Idle);
                    job.needed += 1;
                    job.needed_bytes += u64::from(job.rel.table.size(e));
                }
            }
        }
        job.journal_bytes = job
            .journaled
            .iter()
            .map(|p| u64::from(job.rel.table.size(job.rel.table.entry_at(p))))
            .sum();
        job
    }

    /// The largest wire size of a chunk of the release.
    fn wire_max(&self) -> u64 {
        u64::from(self.rel.table.wire_max())
    }

    /// The generation of the last request made.
    pub(crate) fn generation(&self) -> u32 {
        self.generation
    }

    pub(crate) fn source_index(&self, id: SourceId) -> Option<usize> {
        self.sources.iter().position(|s| s.info.id == id)
    }

    fn request_id(&self, slot: u32) -> RequestId {
        let generation = self.requests[slot as usize]
            .as_ref()
            .map_or(0, |r| r.generation);
        RequestId(u64::from(generation) << 32 | u64::from(slot))
    }

    /// The slab slot of a live request named `id`.
    fn request_slot(&self, id: RequestId) -> Option<u32> {
        let slot = (id.0 & 0xffff_ffff) as u32;
        let generation = (id.0 >> 32) as u32;
        self.requests
            .get(slot as usize)?
            .as_ref()
            .filter(|r| r.generation == generation)
            .map(|_| slot)
    }

    /// Whether every source says what it holds.
    pub(crate) fn holds_all_known(&self) -> bool {
        self.sources.iter().all(|s| s.holds.is_some())
    }

    /// Whether some source (of any kind, gone or not) says it holds entry `e`.
    pub(crate) fn someone_holds(&self, e: u32) -> bool {
        self.sources
            .iter()
            .any(|s| s.holds.as_ref().is_some_and(|h| h.get(e)))
    }

    /// Whether a source other than the WAN says it holds entry `e`.
    fn held_off_wan(&self, e: u32) -> bool {
        self.sources.iter().any(|s| {
            !super::lan::is_wan(s.info.class) && s.holds.as_ref().is_some_and(|h| h.get(e))
        })
    }

    /// Whether an open stream holds (or may hold) entry `e`.
    fn stream_may_bring(&self, e: u32) -> bool {
        self.sources
            .iter()
            .any(|s| s.is_open_stream() && s.may_hold(e))
    }

    /// Whether an open stream says it holds entry `e`.
    fn stream_says_it_holds(&self, e: u32) -> bool {
        self.sources
            .iter()
            .any(|s| s.is_open_stream() && s.holds.as_ref().is_some_and(|h| h.get(e)))
    }

    /// Whether reads of the active slot keep pace with a stream ([`Interleave`]):
    /// a stream is open and no request source is (requests are answered later,
    /// by a network, and reads are best done while waiting for them).
    fn paces_reads(&self) -> bool {
        self.sources.iter().any(SourceState::is_open_stream)
            && !self.sources.iter().any(SourceState::is_requests)
    }

    /// Whether a cut of the active slot runs for this install: the first one
    /// (indexing) or a resumed one ([`Output::CutRest`](super::Output::CutRest)).
    pub(crate) fn cut_running(&self) -> bool {
        self.step == Step::Indexing || self.cutting_rest
    }

    /// Whether the cut's window so far, to `cut`, gave at least an
    /// [`INDEX_FOUND_PART`](super::INDEX_FOUND_PART)th of its bytes in needed chunks.
    pub(crate) fn window_gave(&self, cut: u64) -> bool {
        let (since, found_before) = self.index_window;
        (self.index_found - found_before).saturating_mul(super::INDEX_FOUND_PART)
            >= cut.saturating_sub(since)
    }

    /// Whether every needed entry comes from a local source that says it holds it,
    /// and no source of another class (a LAN peer, the WAN) is open: then reading
    /// the active slot for a needed chunk saves no download, only a local read
    /// and its decoding ([`Engine::index_pays`]).
    pub(crate) fn served_locally(&self) -> bool {
        let open = || self.sources.iter().filter(|s| s.gone.is_none());
        if open().any(|s| s.info.class != SourceClass::Local) {
            return false;
        }
        // What it said it lacks since counts against what it said it holds.
        open().any(|s| s.holds.is_some()) && self.needed_entries().all(|e| self.held_locally(e))
    }

    /// Whether an open local request source may hold entry `e` (what a resumed
    /// cut's hold leaves it to).
    fn local_may_hold(&self, e: u32) -> bool {
        self.sources
            .iter()
            .any(|s| s.is_requests() && s.info.class == SourceClass::Local && s.may_hold(e))
    }

    /// Whether an open local source that says what it holds may hold entry `e`
    /// (what [`Job::served_locally`] asks of each needed entry).
    fn held_locally(&self, e: u32) -> bool {
        self.sources.iter().any(|s| {
            s.gone.is_none()
                && s.info.class == SourceClass::Local
                && s.holds.is_some()
                && s.may_hold(e)
        })
    }

    /// Whether the data budget could refuse what only the network can serve: the
    /// WAN asked so far plus the wire bytes of the needed chunks no local source
    /// holds (and none asked yet) pass it. Then a chunk fetched and later met in
    /// the slot may get the install refused, and a resumed cut is waited for.
    pub(crate) fn budget_tight(&self) -> bool {
        if !self.budget.limited() {
            return false;
        }
        let wire: u64 = self
            .needed_entries()
            .filter(|&e| !matches!(self.need.get(e), Need::Fetching { .. }))
            .filter(|&e| !self.held_locally(e))
            .map(|e| u64::from(self.rel.table.wire_size(e)))
            .sum();
        !self.budget.allows(wire)
    }

    /// Whether a request of generation `g` was made since the pause began.
    #[cfg(any(test, feature = "testing"))]
    fn made_while_paused(&self, g: u32) -> bool {
        g.wrapping_sub(self.pause_generation).wrapping_sub(1) < u32::MAX / 2
    }

    /// The resumed cut of the active slot no longer runs (it ended, stopped, or
    /// was `given_up`: then it is not resumed again during this install), and no
    /// network fetch waits for it any more.
    pub(crate) fn end_cut(&mut self, given_up: bool) {
        self.cutting_rest = false;
        self.network_paused = false;
        self.cut_given_up |= given_up;
    }

    /// Source `i` said (at `now`) it lacks `entries`. If one of them is still
    /// needed and no local holder has it any more, the stopped cut may have to
    /// resume ([`Self::sources_changed`]; the check of these entries here, of
    /// all at the next pump only then).
    pub(crate) fn source_lacks(&mut self, i: usize, entries: &[u32], now: Instant) {
        let n = self.rel.table.entries();
        for &e in entries {
            self.sources[i].lack(e, n);
        }
        self.sources[i].last_heard = Some(now);
        if entries
            .iter()
            .any(|&e| self.need.get(e) != Need::Done && !self.held_locally(e))
        {
            self.sources_changed();
        }
    }

    /// A source came, went or changed: whether a stopped cut should resume is
    /// checked at the next pump.
    pub(crate) fn sources_changed(&mut self) {
        if self.index_stopped && !self.cutting_rest {
            self.cut_recheck = true;
        }
    }

    /// The entries still needed (for [`Engine::needed_chunks`]).
    pub(crate) fn needed_entries(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.rel.table.entries()).filter(|&e| self.need.get(e) != Need::Done)
    }

    /// Heap bytes held by this job beyond the chunk table and manifest.
    pub(crate) fn state_heap_bytes(&self) -> usize {
        self.need.heap_bytes()
            + self.guessed.heap_bytes()
            + self.indexed.heap_bytes()
            + self.written.heap_bytes()
            + self.journaled.heap_bytes()
            + self.probes.capacity() * 4
            + self.requests.capacity() * std::mem::size_of::<Option<Request>>()
            + self
                .requests
                .iter()
                .flatten()
                .map(|r| r.entries.capacity() * 4)
                .sum::<usize>()
            + self
                .sources
                .iter()
                .map(|s| {
                    s.holds.as_ref().map_or(0, Bitfield::heap_bytes)
                        + s.lacks.as_ref().map_or(0, Bitfield::heap_bytes)
                })
                .sum::<usize>()
    }
}

/// What the scheduler decides for a queued fetch.
enum Choice {
    /// Ask this source (index in [`Job::sources`]).
    Source(usize),
    /// A source that can serve it is busy or backing off: keep it queued.
    Wait,
    /// Like [`Choice::Wait`], and this source's open request has no room left for
    /// it (by bytes) while the source takes no further request: send that request
    /// now, rather than look on through the queue for a chunk small enough to top
    /// it up (a scan of hundreds of entries for each request filled).
    Full(usize),
    /// An open stream brings it.
    Stream,
    /// No source can serve it.
    Nobody,
    /// Another LAN member owns it and no peer has it yet: wait for the LAN.
    Lan,
    /// Only the WAN could serve it, and the data budget does not allow it.
    OverBudget,
    /// Only a LAN peer or the WAN could serve it, and a resumed cut of the active
    /// slot may meet it: wait for the cut ([`Job::network_paused`]).
    Cut,
}

/// Shortest window over which a source's delivery rate is measured.
const RATE_WINDOW_MS: u64 = 1000;

/// Most entry lists of ended requests kept for reuse.
const SPARE_LISTS_MAX: usize = 64;

/// Most queued fetches skipped over in one pump while their sources are busy.
const PARKED_MAX: usize = 1024;

impl Job {
    /// Registers a source (the caller checked its id is new).
    pub(crate) fn add(&mut self, info: SourceInfo, rto_initial: std::time::Duration) {
        let state = SourceState::new(info, &self.rel.table, ms(rto_initial));
        self.sources.push(state);
        self.takers.reserve(self.sources.len());
    }

    /// Adds to what source `i` says it holds; returns the entries it did not hold.
    pub(crate) fn add_holds(&mut self, i: usize, holds: &Holds) -> Vec<u32> {
        let Some(more) = holds_by_entry(holds, &self.rel.table) else {
            return Vec::new();
        };
        let s = &mut self.sources[i];
        let Some(have) = s.holds.as_mut() else {
            return Vec::new(); // It may hold anything already.
        };
        let new: Vec<u32> = more.iter().filter(|&e| !have.get(e)).collect();
        for &e in &new {
            have.set(e);
            if let Some(l) = s.lacks.as_mut() {
                l.clear(e);
            }
        }
        new
    }

    /// Replaces what source `i` says it holds; what it said it lacks is forgotten.
    pub(crate) fn set_holds(&mut self, i: usize, holds: &Holds) {
        let s = &mut self.sources[i];
        s.holds = holds_by_entry(holds, &self.rel.table);
        s.lacks = None;
        s.info.holds = Holds::Unknown;
        // Only what a local source holds enters whether the stop still holds
        // ([`Job::served_locally`]); a LAN peer or the WAN is open or not.
        if s.info.class == SourceClass::Local {
            self.sources_changed();
        }
    }
}

impl Engine {
    /// Registers a source added during the install.
    pub(crate) fn register(&mut self, info: SourceInfo) {
        let rto = self.config.retry.rto_initial;
        if let Some(job) = self.job.as_mut() {
            job.add(info, rto);
            job.sources_changed();
        }
    }

    /// Puts every idle needed entry back in the fetch queue (a source came, changed
    /// what it holds, or a stream ended), and pumps.
    pub(crate) fn rescan(&mut self, now: Instant) {
        if let Some(job) = self.job.as_mut()
            && job.step == Step::Fetching
        {
            for e in 0..job.rel.table.entries() {
                if job.need.get(e) == Need::Idle {
                    job.need.set(e, Need::QueuedFetch);
                }
            }
        }
        self.pump(now);
    }

    /// Decides where each missing chunk comes from.
    pub(crate) fn plan(&mut self, now: Instant) {
        let Some(job) = self.job.as_mut() else { return };
        job.step = Step::Fetching;
        match self.index.held(&job.rel.table) {
            Ok(held) => job.indexed = held,
            Err(e) => {
                self.fail(InstallError::Io {
                    op: IoOp::IndexRead,
                    message: e.0,
                });
                return;
            }
        }
        // When every source says which chunks it holds, a needed chunk that neither
        // they nor the slot's index have is looked for at its own offset in the
        // active slot now, before anything is written.
        if job.holds_all_known() {
            for e in 0..job.rel.table.entries() {
                if job.need.get(e) == Need::Done {
                    continue;
                }
                let indexed = job.indexed.get(e);
                if !indexed && !job.someone_holds(e) {
                    job.probes.push_back(e);
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

    /// Queues the needed chunks for reading from the active slot, in payload order
    /// (reads of the active slot and writes of the target then run mostly
    /// sequentially), and the rest for fetching.
    fn schedule(&mut self, now: Instant) {
        let Some(job) = self.job.as_mut() else { return };
        job.step = Step::Fetching;
        let mut from_slot = 0u64;
        // Wire bytes only the WAN can bring: neither in the slot's index, nor said
        // to be held by another source, nor possibly in an open stream (an upper
        // bound: a read at a chunk's own offset may still find it).
        let mut wan_needed = 0u64;
        for e in 0..job.rel.table.entries() {
            if job.need.get(e) != Need::Idle {
                continue;
            }
            let size = job.rel.table.size(e);
            let indexed = job.indexed.get(e);
            if !indexed && !job.held_off_wan(e) && !job.stream_may_bring(e) {
                wan_needed += u64::from(job.rel.table.wire_size(e));
            }
            match indexed {
                true => {
                    job.need.set(e, Need::QueuedRead);
                    from_slot += u64::from(size);
                }
                // Not indexed, but a stream that said it holds the chunk brings it:
                // no read of the active slot on the off chance.
                _ if job.stream_says_it_holds(e) => {}
                // The cut was stopped: the slot proved unrelated where it was cut,
                // and the sources hold every chunk still needed (a read at the
                // chunk's own offset would, but for luck, fail).
                _ if job.index_stopped => {}
                // Not indexed: an image changed in place (or the last chunk of an
                // image cut with the slot's trailing bytes) may still hold it at the
                // same offset; one verified read decides before any source is asked.
                _ => {
                    job.need.set(e, Need::QueuedRead);
                }
            }
        }
        // What the stream is left to bring, against which the reads keep pace;
        // unless the stream also holds chunks planned for reading (a full
        // artifact): it would then come to them before their reads and decode
        // them (read from the source) instead of skipping them.
        let mut interleave = Interleave::default();
        let mut overlap = false;
        let mut first = None;
        for e in 0..job.rel.table.entries() {
            let size = u64::from(job.rel.table.size(e));
            match job.need.get(e) {
                Need::QueuedRead => overlap |= job.stream_may_bring(e),
                Need::Idle if job.stream_may_bring(e) => {
                    interleave.stream_planned += size;
                    first.get_or_insert(e);
                }
                _ => {}
            }
        }
        // The stream starts at the first chunk it is left to bring (a resumed
        // install's first one still wanted).
        if let Some(e) = first {
            interleave.reached(job.rel.table.first_offset(e));
        }
        job.interleave = if overlap {
            Interleave::default()
        } else {
            interleave
        };
        debug!(
            needed = job.needed,
            from_active_slot = job.need.queued_reads(),
            from_slot_bytes = from_slot,
            wan_needed,
            "plan"
        );
        let has_wan = job
            .sources
            .iter()
            .any(|s| s.is_requests() && super::lan::is_wan(s.info.class));
        // What an interrupted run of this deployment already asked counts too.
        if let Some(refusal) = job.budget.refuses_plan(wan_needed).filter(|_| has_wan) {
            // Refused before anything is read, written or fetched.
            for e in 0..job.rel.table.entries() {
                if job.need.get(e) == Need::QueuedRead {
                    job.need.set(e, Need::Idle);
                }
            }
            self.fail(refusal);
            return;
        }
        let largest = job.wire_max();
        job.budget
            .start_pacing(self.config.wan_rate_bytes_per_s, largest, now);
        self.rescan(now);
    }

    /// Issues reads and fetches within their bounds, and moves on when all is
    /// written (or fails when some chunk has no source left).
    pub(crate) fn pump(&mut self, now: Instant) {
        let Some(job) = self.job.as_ref() else { return };
        match job.step {
            Step::Probing => {
                self.probe(now);
                return;
            }
            Step::Fetching => {}
            Step::Indexing | Step::Flushing | Step::Hashing => return,
        }
        if job.cut_recheck {
            self.cut_rest(now);
        }
        let Some(job) = self.job.as_ref() else { return };
        // Writes not yet carried out bound what is read and fetched.
        if job.writing_bytes < self.config.writing_bytes_max {
            self.pump_reads();
            self.pump_fetches(now);
            self.end_game(now);
        }
        self.update_timers(now);
        let Some(job) = self.job.as_mut() else { return };
        if job.needed == 0 {
            if job.cutting_rest {
                // Nothing more to find: the cut would read the rest for nobody.
                job.end_cut(false);
                let slot = self.state.active;
                info!(%slot, "every chunk is written: the resumed cut of the active slot stops");
                self.outputs.push_back(Output::StopIndex { slot });
            }
            self.flush_batch();
            let Some(job) = self.job.as_mut() else { return };
            job.step = Step::Flushing;
            self.timers.clear();
            if self.syncing.is_empty() {
                self.verify();
            }
            return;
        }
        let busy = job.need.queued_reads() > 0
            || job.reads_in_flight > 0
            || job.need.queued_fetches() > 0
            || job.requests.iter().any(Option::is_some)
            || job.lan.as_ref().is_some_and(|l| l.waiting > 0)
            || job.sources.iter().any(SourceState::is_open_stream)
            // Chunks paused for a resumed cut, or that the budget kept from the WAN,
            // may be met by it: wait for it.
            || job.cutting_rest;
        if !busy {
            // A sampled index may have listed a chunk where the slot no longer
            // holds it while a source said it might bring it, and that source
            // then did not: before failing, the slot is cut by content from its
            // start (once), as when no source held it at the bad read.
            if job.index_unproved && !job.cut_given_up && self.cut_slot_from_start(now) {
                return;
            }
            self.stuck();
        }
    }

    /// Every needed chunk left has no source: fail, saying why.
    fn stuck(&mut self) {
        let active = self.state.active;
        let active_release = self.state.releases[slot_ordinal(active)]
            .as_ref()
            .map(ToString::to_string);
        let Some(job) = self.job.as_ref() else { return };
        let count = job.needed as usize;
        let bytes = job
            .needed_entries()
            .map(|e| u64::from(job.rel.table.size(e)))
            .sum();
        let failed = job
            .sources
            .iter()
            .any(|s| matches!(s.gone, Some(Gone::Failing | Gone::Banned | Gone::Removed)));
        let left = || {
            job.needed_entries()
                .filter(|&e| !matches!(job.need.get(e), Need::Fetching { .. }))
                .map(|e| u64::from(job.rel.table.wire_size(e)))
                .sum()
        };
        let err = if let Some(err) = job.budget.blocked_error(left()) {
            err
        } else if let Some((origin, id)) = job.corrupt {
            InstallError::CorruptChunk { origin, id }
        } else if failed {
            InstallError::SourcesFailed { count, bytes }
        } else {
            InstallError::MissingChunks {
                count,
                bytes,
                base: job.rel.manifest.base.clone(),
                active: active_release,
            }
        };
        self.flush_batch();
        self.fail(err);
    }

    fn pump_reads(&mut self) {
        let active = self.state.active;
        let capacity = self.state.slot_capacity[slot_ordinal(active)];
        let lead = self.config.stream_read_lead_bytes;
        let Some(job) = self.job.as_mut() else { return };
        let mut failed = None;
        let paced = job.paces_reads();
        while (job.reads_in_flight as usize) < self.config.reads_in_flight_max {
            if paced {
                let Some(e) = job.need.first_read() else {
                    break;
                };
                if !job
                    .interleave
                    .allows_read(job.rel.table.first_offset(e), lead)
                {
                    break;
                }
            }
            let Some(e) = job.need.next_read() else {
                break;
            };
            if job.need.get(e) != Need::QueuedRead {
                continue;
            }
            let id = job.rel.table.id(e);
            let size = job.rel.table.size(e);
            // Only entries the plan found in the index are looked up (one read of
            // the store each); what the index says is checked by the chunk's hash
            // when it is read.
            let at = if job.indexed.get(e) {
                match self.index.get(&id) {
                    Ok(at) => at,
                    Err(err) => {
                        // `e` stays queued for a read but the queue has moved
                        // past it: no matter, the install stops below.
                        failed = Some(err);
                        break;
                    }
                }
            } else {
                None
            };
            let (offset, len, guess) = match at {
                Some((offset, len)) if len == size => (offset, len, false),
                _ => {
                    let offset = job.rel.table.first_offset(e);
                    if job.guessed.get(e) || offset + u64::from(size) > capacity {
                        job.need.set(e, Need::QueuedFetch);
                        continue;
                    }
                    job.guessed.set(e);
                    (offset, size, true)
                }
            };
            job.need.set(e, Need::Reading { guess });
            job.reads_in_flight += 1;
            self.outputs.push_back(Output::Read {
                slot: active,
                id,
                offset,
                len,
            });
        }
        if let Some(err) = failed {
            self.fail(InstallError::Io {
                op: IoOp::IndexRead,
                message: err.0,
            });
        }
    }

    /// Where a queued fetch of entry `e` goes.
    fn choose(&mut self, e: u32, now: Instant) -> Choice {
        let Some(job) = self.job.as_ref() else {
            return Choice::Nobody;
        };
        if job.stream_may_bring(e) {
            return Choice::Stream;
        }
        // A resumed cut may meet it: only a local source is asked meanwhile.
        let held = job.network_paused;
        if held && !job.local_may_hold(e) {
            return Choice::Cut;
        }
        let size = job.rel.table.size(e);
        let wan = job.lan.is_none() || self.wan_allowed(job, e, now);
        let wire = u64::from(job.rel.table.wire_size(e));
        let budget = job.budget.allows(wire);
        let paced = job.budget.paced(wire, now);
        let mut over_budget = false;
        let usable = |s: &SourceState| {
            s.is_requests()
                && s.may_hold(e)
                && (!held || s.info.class == SourceClass::Local)
                && (!super::lan::is_wan(s.info.class) || (wan && budget))
        };
        let resting =
            |s: &SourceState| s.in_backoff(now) || (paced && super::lan::is_wan(s.info.class));
        if !budget {
            over_budget = job.sources.iter().any(|s| {
                s.is_requests() && s.may_hold(e) && super::lan::is_wan(s.info.class) && wan
            });
        }
        let mut any = false;
        let mut class: Option<u8> = None;
        for s in job.sources.iter().filter(|s| usable(s)) {
            any = true;
            if !resting(s) {
                let c = s.info.class.cost();
                class = Some(class.map_or(c, |k| k.min(c)));
            }
        }
        if !any {
            return if over_budget {
                Choice::OverBudget
            } else if wan {
                Choice::Nobody
            } else {
                Choice::Lan
            };
        }
        let Some(class) = class else {
            return Choice::Wait;
        };
        // Among the cheapest class: keep filling an open request, else the one with
        // the fewest requests in flight, ties broken by the seeded generator.
        let mut best: Option<(bool, usize, usize)> = None;
        let mut ties = 0usize;
        let mut pick = None;
        let mut full = None;
        for (i, s) in job.sources.iter().enumerate() {
            if !usable(s) || resting(s) || s.info.class.cost() != class {
                continue;
            }
            let open_room = s.open.is_some_and(|r| {
                job.requests[r as usize].as_ref().is_some_and(|r| {
                    (r.entries.len() as u32) < s.info.limits.request_chunks_max
                        && r.bytes + u64::from(size) <= u64::from(s.info.limits.request_bytes_max)
                })
            });
            if !open_room && s.requests.len() >= s.requests_limit() {
                // An open request is sent once it has as many chunks as it
                // takes ([`Engine::assign`]): one still open lacks bytes.
                if s.open.is_some() {
                    full.get_or_insert(i);
                }
                continue;
            }
            let key = (!open_room, s.requests.len(), 0);
            match best {
                Some(b) if (b.0, b.1) < (key.0, key.1) => {}
                Some(b) if (b.0, b.1) == (key.0, key.1) => {
                    ties += 1;
                    if self.rng.below(ties + 1) == 0 {
                        pick = Some(i);
                    }
                }
                _ => {
                    best = Some(key);
                    ties = 0;
                    pick = Some(i);
                }
            }
        }
        match (pick, full) {
            (Some(i), _) => Choice::Source(i),
            (None, Some(i)) => Choice::Full(i),
            (None, None) => Choice::Wait,
        }
    }

    fn has_capacity(&self, now: Instant) -> bool {
        self.job.as_ref().is_some_and(|job| {
            job.sources.iter().any(|s| {
                s.is_requests()
                    && !s.in_backoff(now)
                    && (s.open.is_some() || s.requests.len() < s.requests_limit())
            })
        })
    }

    fn pump_fetches(&mut self, now: Instant) {
        // While reads of the active slot are still coming back, chunks they do not
        // find trickle into the queue one by one: wait for a full request's worth
        // rather than send one-chunk requests.
        if let Some(job) = self.job.as_ref()
            && (job.need.queued_reads() > 0 || job.reads_in_flight > 0)
        {
            let batch = job
                .sources
                .iter()
                .filter(|s| s.is_requests())
                .map(|s| s.info.limits.request_chunks_max)
                .max()
                .unwrap_or(0);
            if job.need.queued_fetches() < batch {
                return;
            }
        }
        // Entries skipped because their sources are busy stay queued; the queue's
        // cursor goes back to the first of them afterwards.
        let mut parked = 0usize;
        let mut first_parked: Option<u32> = None;
        loop {
            if !self.has_capacity(now) {
                break;
            }
            let Some(job) = self.job.as_mut() else { return };
            let Some(e) = job.need.next_fetch() else {
                break;
            };
            if job.need.get(e) != Need::QueuedFetch {
                continue;
            }
            match self.choose(e, now) {
                Choice::Source(i) => self.assign(i, e, now),
                choice @ (Choice::Wait | Choice::Full(_)) => {
                    if let Choice::Full(i) = choice
                        && let Some(job) = self.job.as_mut()
                        && let Some(slot) = job.sources[i].open.take()
                    {
                        self.emit_fetch(slot);
                    }
                    parked += 1;
                    first_parked.get_or_insert(e);
                    if parked >= PARKED_MAX {
                        break;
                    }
                }
                Choice::Stream | Choice::Nobody | Choice::Cut => {
                    if let Some(job) = self.job.as_mut() {
                        job.need.set(e, Need::Idle);
                    }
                }
                Choice::OverBudget => {
                    if let Some(job) = self.job.as_mut() {
                        job.need.set(e, Need::Idle);
                        job.budget.block();
                    }
                }
                Choice::Lan => {
                    if let Some(job) = self.job.as_mut() {
                        job.need.set(e, Need::Lan);
                        if let Some(lan) = job.lan.as_mut() {
                            lan.waiting += 1;
                        }
                    }
                }
            }
        }
        let Some(job) = self.job.as_mut() else { return };
        if let Some(e) = first_parked {
            job.need.rewind_fetches(e);
        }
        // Chunks waiting with no source that has room: mark those nobody can serve
        // idle, so an install whose sources are all gone ends.
        if !self.has_capacity(now) {
            self.settle_queue(now);
        }
        self.close_requests();
    }

    /// Marks queued fetches that no source can ever serve idle (without the bound
    /// of a pump: run when no source has room, which is rare).
    fn settle_queue(&mut self, now: Instant) {
        let Some(job) = self.job.as_ref() else { return };
        let alive = job.sources.iter().any(SourceState::is_requests);
        // Nothing queued, nothing to settle: this runs on every pump of an install
        // from a stream alone (thousands of slot reads), and a scan of every entry
        // each time made the pumps quadratic.
        if alive || job.need.queued_fetches() == 0 {
            return;
        }
        let queued: Vec<u32> = (0..job.need.len())
            .filter(|&e| job.need.get(e) == Need::QueuedFetch)
            .collect();
        for e in queued {
            if let Choice::Nobody | Choice::Stream | Choice::Lan | Choice::OverBudget | Choice::Cut =
                self.choose(e, now)
                && let Some(job) = self.job.as_mut()
                && job.need.get(e) == Need::QueuedFetch
            {
                job.need.set(e, Need::Idle);
            }
        }
    }

    /// Adds entry `e` to source `i`'s open request (opening one).
    fn assign(&mut self, i: usize, e: u32, now: Instant) {
        let Some(job) = self.job.as_mut() else { return };
        let slot = match job.sources[i].open {
            Some(slot) => slot,
            None => {
                job.generation = job.generation.wrapping_add(1);
                let request = Request {
                    generation: job.generation,
                    source: i,
                    sent: now,
                    // A cleared list of an ended request, when there is one.
                    entries: job.spare_entries.pop().unwrap_or_default(),
                    left: 0,
                    bytes: 0,
                };
                let slot = match job.free.pop() {
                    Some(slot) => {
                        job.requests[slot as usize] = Some(request);
                        slot
                    }
                    None => {
                        job.requests.push(Some(request));
                        // Room for every slot to be freed and its list kept, taken
                        // now (a request is made) rather than when a chunk ends it.
                        let n = job.requests.len();
                        job.free.reserve_exact(n - job.free.len());
                        let lists = n.min(SPARE_LISTS_MAX);
                        job.spare_entries
                            .reserve_exact(lists.saturating_sub(job.spare_entries.len()));
                        (n - 1) as u32
                    }
                };
                // A source that was idle starts a new rate window.
                if job.sources[i].requests.is_empty() {
                    job.sources[i].window_start = Some(now);
                    job.sources[i].window_bytes = 0;
                }
                job.sources[i].requests.push(slot);
                job.sources[i].open = Some(slot);
                slot
            }
        };
        let size = job.rel.table.size(e);
        if super::lan::is_wan(job.sources[i].info.class) {
            let wire = u64::from(job.rel.table.wire_size(e));
            job.budget.spend(wire, now);
        }
        let limits = job.sources[i].info.limits;
        let r = job.requests[slot as usize]
            .as_mut()
            .expect("an open request is live");
        r.entries.push(e);
        r.left += 1;
        r.bytes += u64::from(size);
        let full = r.entries.len() as u32 >= limits.request_chunks_max
            || r.bytes >= u64::from(limits.request_bytes_max);
        job.need.set(e, Need::Fetching { req: slot });
        if full {
            job.sources[i].open = None;
            self.emit_fetch(slot);
        }
    }

    /// Sends every request still being filled.
    fn close_requests(&mut self) {
        let Some(job) = self.job.as_mut() else { return };
        let open: Vec<u32> = job
            .sources
            .iter_mut()
            .filter_map(|s| s.open.take())
            .collect();
        for slot in open {
            self.emit_fetch(slot);
        }
    }

    fn emit_fetch(&mut self, slot: u32) {
        let Some(job) = self.job.as_ref() else { return };
        let Some(r) = job.requests[slot as usize].as_ref() else {
            return;
        };
        let source = job.sources[r.source].info.id;
        let ids = r.entries.iter().map(|&e| job.rel.table.id(e)).collect();
        let request = job.request_id(slot);
        self.outputs.push_back(Output::Fetch {
            source,
            request,
            ids,
        });
    }

    /// When nothing is left to hand out, an idle source takes over the chunks of a
    /// request that has waited elsewhere longer than its own timeout.
    fn end_game(&mut self, now: Instant) {
        let Some(job) = self.job.as_mut() else { return };
        if job.need.queued_fetches() > 0 || job.step != Step::Fetching {
            return;
        }
        let mut takers = std::mem::take(&mut job.takers);
        takers.clear();
        takers.extend((0..job.sources.len()).filter(|&i| {
            let s = &job.sources[i];
            s.is_requests()
                && s.failures == 0
                && !s.in_backoff(now)
                && s.requests.len() < s.requests_limit()
                && (!job.network_paused || s.info.class == SourceClass::Local)
        }));
        self.end_game_take(now, &takers);
        if let Some(job) = self.job.as_mut() {
            job.takers = takers;
        }
    }

    /// [`Engine::end_game`] for the sources `takers`, in turn.
    fn end_game_take(&mut self, now: Instant, takers: &[usize]) {
        for &taker in takers {
            let Some(job) = self.job.as_ref() else { return };
            let t = &job.sources[taker];
            // The request waiting longest past the taker's timeout.
            let victim = job
                .requests
                .iter()
                .enumerate()
                .filter_map(|(slot, r)| Some((slot as u32, r.as_ref()?)))
                .filter(|(_, r)| r.source != taker && r.left > 0)
                .filter(|(_, r)| {
                    let v = &job.sources[r.source];
                    // In a swarm the WAN never takes over what a LAN peer was asked
                    // for: that peer holds it, and a peer slow to answer (busy, a
                    // loaded CPU) would otherwise cost the uplink a second copy on
                    // every device that timed it out. A peer that keeps failing is
                    // dropped after `failures_max`, and what only it held goes back
                    // to its owner.
                    let peer_to_wan = job.lan.is_some()
                        && super::lan::is_wan(t.info.class)
                        && v.info.class == SourceClass::Peer;
                    (t.info.class.cost() <= v.info.class.cost() || v.failures > 0) && !peer_to_wan
                })
                .map(|(slot, r)| {
                    let v = &job.sources[r.source];
                    let since = v.last_heard.map_or(r.sent, |h| h.max(r.sent));
                    (slot, now.as_millis().saturating_sub(since.as_millis()))
                })
                .filter(|&(_, waited)| waited > t.rto_ms)
                .max_by_key(|&(slot, waited)| (waited, std::cmp::Reverse(slot)));
            let Some((victim, _)) = victim else { continue };
            let Some(r) = job.requests[victim as usize].as_ref() else {
                continue;
            };
            let limits = t.info.limits;
            let mut taken = Vec::new();
            let mut bytes = 0u64;
            for &e in &r.entries {
                if job.need.get(e) == (Need::Fetching { req: victim })
                    && t.may_hold(e)
                    && (taken.len() as u32) < limits.request_chunks_max
                    && (taken.is_empty()
                        || bytes + u64::from(job.rel.table.size(e))
                            <= u64::from(limits.request_bytes_max))
                {
                    bytes += u64::from(job.rel.table.size(e));
                    taken.push(e);
                }
            }
            if taken.is_empty() {
                continue;
            }
            debug!(
                chunks = taken.len(),
                from = %job.sources[r.source].info.id,
                to = %t.info.id,
                "end game: taking over a waiting request"
            );
            for &e in &taken {
                self.release_claim(e, None);
                if let Some(job) = self.job.as_mut() {
                    job.need.set(e, Need::QueuedFetch);
                }
                self.assign(taker, e, now);
            }
            self.close_requests();
        }
    }

    /// Entry `e` no longer belongs to its request: decrements the request's count,
    /// and ends the request when it owns nothing any more; with a Cancel unless the
    /// last answer came from the request's own source (`answered_by`).
    fn release_claim(&mut self, e: u32, answered_by: Option<usize>) {
        let Some(job) = self.job.as_mut() else { return };
        let Need::Fetching { req } = job.need.get(e) else {
            return;
        };
        job.need.set(e, Need::Idle);
        let Some(r) = job.requests[req as usize].as_mut() else {
            return;
        };
        r.left -= 1;
        if r.left == 0 {
            let own = answered_by == Some(r.source);
            self.end_request(req, !own);
        }
    }

    /// Removes a request from the slab and its source; `cancel`: tell the driver.
    fn end_request(&mut self, slot: u32, cancel: bool) {
        let Some(job) = self.job.as_mut() else { return };
        let id = job.request_id(slot);
        let Some(mut r) = job.requests[slot as usize].take() else {
            return;
        };
        job.free.push(slot);
        let s = &mut job.sources[r.source];
        s.requests.retain(|&x| x != slot);
        if s.requests.is_empty() {
            // Idle time is not delivery time.
            s.window_start = None;
        }
        if s.open == Some(slot) {
            s.open = None;
        }
        let source = s.info.id;
        // Entries it still owns go back to the queue (ahead of the queue's cursor).
        for &e in &r.entries {
            if job.need.get(e) == (Need::Fetching { req: slot }) {
                job.need.set(e, Need::QueuedFetch);
            }
        }
        // Its list is kept for the next request (no allocation per request).
        if job.spare_entries.len() < SPARE_LISTS_MAX {
            r.entries.clear();
            job.spare_entries.push(std::mem::take(&mut r.entries));
        }
        if cancel {
            self.outputs.push_back(Output::Cancel {
                source,
                request: id,
            });
        }
    }

    /// Ends every request of source `i` (their chunks go back to the queue).
    fn end_requests_of(&mut self, i: usize, cancel: bool) {
        let Some(job) = self.job.as_ref() else { return };
        let slots = job.sources[i].requests.clone();
        for slot in slots {
            self.end_request(slot, cancel);
        }
    }

    /// Source `i` failed (silent, or the driver said retry later): it backs off.
    fn source_failed(&mut self, i: usize, now: Instant, why: &str) {
        let retry = self.config.retry;
        let Some(job) = self.job.as_mut() else { return };
        let s = &mut job.sources[i];
        s.failures += 1;
        s.rto_ms = (s.rto_ms.saturating_mul(2)).min(ms(retry.rto_max));
        let shift = (s.failures - 1).min(20);
        let backoff = ms(retry.backoff_initial)
            .saturating_mul(1 << shift)
            .min(ms(retry.backoff_max));
        s.backoff_until = Some(Instant::from_millis(
            now.as_millis().saturating_add(backoff),
        ));
        let (id, failures) = (s.info.id, s.failures);
        warn!(source = %id, failures, backoff_ms = backoff, reason = why, "source failed; backing off");
        self.end_requests_of(i, true);
        self.requeue_lan();
        if failures >= retry.failures_max {
            self.drop_source(i, Gone::Failing, now);
        }
    }

    /// Source `i` is no longer asked.
    pub(crate) fn drop_source(&mut self, i: usize, why: Gone, now: Instant) {
        let Some(job) = self.job.as_mut() else { return };
        if job.sources[i].gone.is_some() {
            return;
        }
        let id = job.sources[i].info.id;
        info!(source = %id, reason = ?why, "source dropped");
        job.sources[i].gone = Some(why);
        job.sources_changed();
        let kind = job.sources[i].info.kind;
        self.end_requests_of(i, why != Gone::Removed);
        self.requeue_lan();
        if why == Gone::Banned {
            self.event(Event::SourceBanned { source: id });
        }
        if kind == SourceKind::Stream || why != Gone::Ended {
            self.rescan(now);
        }
    }

    /// Issues probe reads within the read bound; once all are answered, fails with
    /// the chunks found absent or goes on fetching.
    fn probe(&mut self, now: Instant) {
        let active = self.state.active;
        let capacity = self.state.slot_capacity[slot_ordinal(active)];
        let Some(job) = self.job.as_mut() else { return };
        while (job.probes_in_flight as usize) < self.config.reads_in_flight_max {
            let Some(e) = job.probes.pop_front() else {
                break;
            };
            let offset = job.rel.table.first_offset(e);
            let size = job.rel.table.size(e);
            if offset + u64::from(size) > capacity {
                job.absent.push(e);
                continue;
            }
            job.probes_in_flight += 1;
            self.outputs.push_back(Output::Read {
                slot: active,
                id: job.rel.table.id(e),
                offset,
                len: size,
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
            .map(|&e| u64::from(job.rel.table.size(e)))
            .sum();
        let base = job.rel.manifest.base.clone();
        let active = self.state.releases[slot_ordinal(active)]
            .as_ref()
            .map(ToString::to_string);
        self.fail(InstallError::MissingChunks {
            count,
            bytes,
            base,
            active,
        });
    }

    /// A probe read came back (`found`: the bytes at the chunk's own offset
    /// verified as it): a chunk found there joins the index.
    fn on_probe(&mut self, now: Instant, origin: Origin, id: ChunkId, found: Option<u32>) {
        let Some(job) = self.job.as_mut() else { return };
        let Origin::Slot(slot) = origin else { return };
        let Some(e) = job.rel.table.entry(&id) else {
            return;
        };
        if job.need.get(e) == Need::Done || slot != self.state.active || job.probes_in_flight == 0 {
            return;
        }
        job.probes_in_flight -= 1;
        let size = job.rel.table.size(e);
        if found == Some(size) {
            self.index.insert(id, (job.rel.table.first_offset(e), size));
            job.indexed.set(e);
        } else {
            job.absent.push(e);
        }
        self.pump(now);
    }

    /// Syncs the slot and commits the batch of written chunks to the journal.
    ///
    /// The journal record waits for [`Input::Synced`](crate::Input::Synced): the
    /// engine itself keeps "journal only after the sync".
    pub(crate) fn flush_batch(&mut self) {
        let Some(job) = self.job.as_mut() else { return };
        let open = self.unsynced.len() - self.flushed;
        if open == 0 {
            return;
        }
        let bytes = std::mem::take(&mut job.batch_bytes);
        job.batch_since = None;
        let target = job.target;
        self.outputs.push_back(Output::Sync { slot: target });
        let rel = Arc::clone(&job.rel);
        self.syncing.push_back((target, open, bytes, rel));
        self.flushed += open;
    }

    /// Positions a journal batch can hold: one batch's bytes of the smallest
    /// chunks the release's chunking makes, and the chunk that crosses the limit
    /// (at most every position of the payload).
    pub(crate) fn batch_room(&self) -> usize {
        let Some(job) = self.job.as_ref() else {
            return 0;
        };
        let min = u64::from(job.rel.manifest.chunking.min_size.max(1));
        let room = (self.config.journal_batch_bytes / min).saturating_add(1);
        usize::try_from(room.min(u64::from(job.rel.table.positions()))).unwrap_or(usize::MAX)
    }

    /// A sync returned: the oldest batch synced before it is journaled; once every
    /// chunk is written and journaled, the slot is verified.
    pub(crate) fn on_synced(&mut self, slot: Slot) {
        if self.syncing.front().is_none_or(|(s, ..)| *s != slot) {
            return;
        }
        let Some((_, count, bytes, rel)) = self.syncing.pop_front() else {
            return;
        };
        let count = count.min(self.flushed);
        let mut batch: Vec<u32> = Vec::with_capacity(count);
        for v in self.unsynced.drain(..count) {
            if v & WHOLE_ENTRY == 0 {
                batch.push(v);
            } else {
                batch.extend(rel.table.positions_of(v & !WHOLE_ENTRY));
            }
        }
        self.flushed -= count;
        // Room for the next two batches (and twice the syncs now asked for), taken
        // here with the store transaction rather than while chunks arrive.
        let room = self.unsynced.len() + 2 * self.batch_room();
        self.unsynced
            .reserve_exact(room.saturating_sub(self.unsynced.len()));
        self.syncing.reserve(self.syncing.len().max(SYNCS_ROOM));
        let mut records = vec![Record::Journaled(batch)];
        match self.job.as_mut() {
            Some(job) => {
                if let Record::Journaled(batch) = &records[0] {
                    for &p in batch {
                        job.journaled.set(p);
                    }
                }
                job.journal_bytes += bytes;
                if job.budget.asked() != self.state.wan_spent_bytes {
                    self.state.wan_spent_bytes = job.budget.asked();
                    records.push(Record::WanSpent(job.budget.asked()));
                }
            }
            None => {
                if let Record::Journaled(batch) = &records[0] {
                    self.state.journaled.extend_from_slice(batch);
                }
                self.journal_bytes += bytes;
            }
        }
        self.persist(records);
        let verify = self.job.as_ref().is_some_and(|j| j.step == Step::Flushing);
        if verify && self.syncing.is_empty() {
            self.verify();
        }
    }

    /// Every chunk is written and journaled: re-read the slot.
    fn verify(&mut self) {
        let Some(job) = self.job.as_mut() else { return };
        job.step = Step::Hashing;
        let (target, len) = (job.target, job.rel.release.payload_size);
        info!(slot = %target, len, "all chunks written; verifying the slot");
        self.timers.clear();
        self.event(Event::Verifying { slot: target });
        self.outputs
            .push_back(Output::HashSlot { slot: target, len });
    }

    /// A write was carried out: its bytes no longer count against the bound.
    pub(crate) fn on_written(&mut self, now: Instant, bytes: u64) {
        let Some(job) = self.job.as_mut() else { return };
        // Only a bound that held reads and fetches back needs a pump to lift it.
        let held = job.writing_bytes >= self.config.writing_bytes_max;
        job.writing_bytes = job.writing_bytes.saturating_sub(bytes);
        if held {
            self.pump(now);
        }
    }

    /// Which entry and source an answer from `origin` about chunk `id` concerns,
    /// when the engine takes it (an install is fetching, or indexing and taking
    /// chunks met in the active slot; a known source that is not banned, or a
    /// stream still open). Notes that a request source is alive.
    fn answer_of(
        &mut self,
        now: Instant,
        origin: Origin,
        id: &ChunkId,
    ) -> Option<(u32, Option<usize>)> {
        let active = self.state.active;
        let job = self.job.as_mut()?;
        // While the active slot is indexed, a driver may hand over the needed
        // chunks it meets there: they are written now and not read again.
        let met_while_indexing =
            job.step == Step::Indexing && job.take_while_indexing && origin == Origin::Slot(active);
        if job.step != Step::Fetching && !met_while_indexing {
            return None;
        }
        let e = job.rel.table.entry(id)?; // Not in the release.
        let source = match origin {
            Origin::Source(s) => match job.source_index(s) {
                Some(i)
                    if job.sources[i].info.kind != SourceKind::Stream
                        || job.sources[i].gone.is_none() =>
                {
                    Some(i)
                }
                // Unknown sources, and streams that ended or were banned.
                _ => return None,
            },
            Origin::Slot(_) => None,
        };
        if let Some(i) = source {
            if job.sources[i].gone == Some(Gone::Banned) {
                return None;
            }
            // An answer: the source is alive.
            if job.sources[i].info.kind == SourceKind::Requests {
                let sample = match job.need.get(e) {
                    Need::Fetching { req } => job.requests[req as usize]
                        .as_ref()
                        .filter(|r| r.source == i)
                        .map(|r| r.sent),
                    _ => None,
                };
                let wire = u64::from(job.rel.table.wire_size(e));
                let s = &mut job.sources[i];
                s.delivered(wire, now);
                if let Some(sent) = sample {
                    let since = s.last_heard.map_or(sent, |h| h.max(sent));
                    let rtt = now.as_millis().saturating_sub(since.as_millis());
                    observe_rtt(s, rtt, &self.config.retry);
                }
                s.last_heard = Some(now);
                s.failures = 0;
                s.backoff_until = None;
            }
        }
        Some((e, source))
    }

    /// The driver says the bytes from `origin` for chunk `id` do not verify.
    pub(crate) fn on_corrupt(&mut self, now: Instant, origin: Origin, id: ChunkId) {
        let Some(job) = self.job.as_ref() else { return };
        if job.step == Step::Probing {
            self.on_probe(now, origin, id, None);
            return;
        }
        let Some((e, source)) = self.answer_of(now, origin, &id) else {
            return;
        };
        let Some(job) = self.job.as_mut() else { return };
        let mut guess = false;
        if let (Need::Reading { guess: g }, Origin::Slot(_)) = (job.need.get(e), origin) {
            job.reads_in_flight -= 1;
            job.need.set(e, Need::Idle);
            guess = g;
        }
        if job.need.get(e) == Need::Done {
            return; // Not needed any more.
        }
        self.on_bad_chunk(now, origin, e, guess, source);
    }

    /// A verified chunk arrived.
    /// [`Input::StreamAt`](crate::Input::StreamAt): the stream's position moves
    /// to where `id` first lies, and the reads up to it (and the lead) go out.
    pub(crate) fn on_stream_at(&mut self, now: Instant, source: SourceId, id: &ChunkId) {
        let Some(job) = self.job.as_mut() else { return };
        let Some(i) = job.source_index(source) else {
            return;
        };
        if job.sources[i].info.kind != SourceKind::Stream {
            return;
        }
        let Some(e) = job.rel.table.entry(id) else {
            return;
        };
        job.interleave.reached(job.rel.table.first_offset(e));
        self.pump(now);
    }

    pub(crate) fn on_chunk(&mut self, now: Instant, origin: Origin, chunk: VerifiedChunk) {
        let id = chunk.chunk().id;
        let Some(job) = self.job.as_ref() else { return };
        if job.step == Step::Probing {
            self.on_probe(now, origin, id, Some(chunk.len()));
            return;
        }
        let Some((e, source)) = self.answer_of(now, origin, &id) else {
            return;
        };
        let Some(job) = self.job.as_mut() else { return };
        let state = job.need.get(e);
        if state == Need::Done {
            return; // Not needed any more.
        }
        let size = job.rel.table.size(e);
        if chunk.len() != size {
            // Same id, another length: the manifest and the proof disagree, which
            // only a broken driver produces. Treated like bytes that do not verify.
            warn!(%id, len = chunk.len(), size, "chunk of the wrong size");
            self.on_corrupt(now, origin, id);
            return;
        }
        // Whoever answered, the chunk is done: release a request's or a read's claim.
        match state {
            Need::Fetching { .. } => self.release_claim(e, source),
            Need::Reading { .. } => {
                if let Some(job) = self.job.as_mut() {
                    job.reads_in_flight -= 1;
                }
            }
            _ => {}
        }
        let Some(job) = self.job.as_mut() else { return };
        if state == Need::Lan
            && let Some(lan) = job.lan.as_mut()
        {
            // Met elsewhere (the slot's cut) while it waited for a LAN peer.
            lan.waiting -= 1;
        }
        job.need.set(e, Need::Done);
        job.needed -= 1;
        job.needed_bytes -= u64::from(size);
        let table = &job.rel.table;
        let repeats = table.repeat_offsets(e);
        let offsets = if let Some(more) =
            repeats.filter(|_| table.positions_of(e).all(|p| !job.written.get(p)))
        {
            // Every position of a repeated chunk, as on a first run: the table's
            // shared list of its offsets, and the entry marked whole in the batch
            // (one place for any number of positions).
            for p in table.positions_of(e) {
                job.written.set(p);
            }
            self.unsynced.push(e | WHOLE_ENTRY);
            Offsets::shared(table.first_offset(e), Arc::clone(more))
        } else {
            // A single position, or the positions of a repeated chunk not written
            // in an earlier run: listed.
            let mark = self.unsynced.len();
            for p in table.positions_of(e) {
                if !job.written.get(p) {
                    job.written.set(p);
                    self.unsynced.push(p);
                }
            }
            let Some(&p) = self.unsynced.get(mark) else {
                return; // Every position was journaled (not reachable: the entry was needed).
            };
            let more = &self.unsynced[mark + 1..];
            if more.is_empty() {
                Offsets::one(table.offset_at(p))
            } else {
                let more = more.iter().map(|&p| table.offset_at(p)).collect();
                Offsets::listed(table.offset_at(p), more)
            }
        };
        let bytes = u64::from(size) * offsets.len() as u64;
        job.batch_bytes += bytes;
        let since = *job.batch_since.get_or_insert(now);
        self.progress.written_bytes += bytes;
        // Found by the cut: not the answer to a read of the slot (`Output::Read`,
        // of a chunk an index or a guess put there), which a resumed cut runs
        // alongside.
        if source.is_none() && !matches!(state, Need::Reading { .. }) && job.cut_running() {
            job.index_found += u64::from(size);
        }
        match source {
            None => self.progress.reused_bytes += bytes,
            Some(i) => {
                let wire = u64::from(job.rel.table.wire_size(e));
                if job.sources[i].info.kind == SourceKind::Stream {
                    job.interleave.stream_brought += u64::from(size);
                    let end = job.rel.table.first_offset(e) + u64::from(size);
                    job.interleave.reached(end);
                }
                let s = &mut job.sources[i];
                s.chunks += 1;
                s.bytes += u64::from(size);
                s.wire_bytes += wire;
                self.progress.fetched_bytes += bytes;
                match s.info.class {
                    SourceClass::Local => self.progress.local_bytes += u64::from(size),
                    SourceClass::Peer => self.progress.peer_bytes += u64::from(size),
                    SourceClass::Wan => {
                        self.progress.wan_bytes += u64::from(size);
                        self.progress.wan_wire_bytes += wire;
                    }
                }
            }
        }
        let target = job.target;
        job.writing_bytes += bytes;
        let flush = job.batch_bytes >= self.config.journal_batch_bytes
            || now.as_millis().saturating_sub(since.as_millis())
                >= super::lan::ms(self.config.journal_batch_age);
        self.outputs.push_back(Output::Write {
            slot: target,
            id,
            offsets,
            len: size,
            data: chunk.into_data(),
        });
        if flush {
            self.flush_batch();
        }
        self.pump(now);
    }

    /// Chunk bytes that are not what the manifest says.
    fn on_bad_chunk(
        &mut self,
        now: Instant,
        origin: Origin,
        e: u32,
        guess: bool,
        source: Option<usize>,
    ) {
        let active = self.state.active;
        let Some(job) = self.job.as_mut() else { return };
        let id = job.rel.table.id(e);
        match (origin, source) {
            (Origin::Slot(_), _) if guess => {
                if job.need.get(e) == Need::Idle {
                    job.need.set(e, Need::QueuedFetch);
                }
            }
            (Origin::Slot(slot), _) => {
                warn!(%id, %slot, "chunk in the slot index does not hash as recorded; fetching it instead");
                if job.need.get(e) == Need::Idle {
                    job.need.set(e, Need::QueuedFetch);
                }
                if slot == active {
                    self.index.remove(&id);
                    job.indexed.clear(e);
                }
                self.persist(vec![Record::Unindex { slot, id }]);
                if slot == active {
                    self.distrust_sampled_index(now, e);
                }
            }
            (Origin::Source(sid), Some(i)) => {
                warn!(%id, source = %sid, "source sent a chunk that does not hash to its id; banning it");
                if job.sources[i].info.kind == SourceKind::Stream && job.corrupt.is_none() {
                    job.corrupt = Some((origin, id));
                }
                self.drop_source(i, Gone::Banned, now);
            }
            (Origin::Source(_), None) => {}
        }
        self.pump(now);
    }

    /// An entry `e` of the active slot's index came back bad. With the index taken
    /// from a sampled check ([`Job::index_unproved`]) the slot holds the base
    /// release where the sample looked, but not here: changed in place (bit rot, a
    /// read-write mount), perhaps with the chunk elsewhere (a repeated chunk's
    /// first position overwritten, two chunks swapped). A source that may hold it
    /// (an artifact stream that carries it, a peer, the WAN) brings it as for any
    /// bad entry; with none, the index is no longer trusted as a whole, and the
    /// slot is cut by content from its start ([`Output::CutRest`] from 0, as
    /// the full check did before the sample, which then cut it): every needed chunk
    /// it meets is taken, and what it does not find fails the install with
    /// [`InstallError::MissingChunks`](crate::InstallError::MissingChunks) when it
    /// ends. Once only: a later bad entry is fetched as any other (the cut met
    /// every chunk the slot holds).
    fn distrust_sampled_index(&mut self, now: Instant, e: u32) {
        let Some(job) = self.job.as_ref().filter(|j| j.index_unproved) else {
            return;
        };
        let held = job
            .sources
            .iter()
            .any(|s| s.gone.is_none() && s.may_hold(e));
        // A cut that runs already may meet it (the engine waits for its end).
        if held
            || job.cutting_rest
            || job.cut_given_up
            || job.need.get(e) == Need::Done
            || job.step != Step::Fetching
        {
            return;
        }
        let _ = self.cut_slot_from_start(now);
    }

    /// Whether it started the cut. The sampled index is given up as the guide to the active slot, which is
    /// cut by content from its start ([`Output::CutRest`] from 0): see
    /// [`Self::distrust_sampled_index`]; also when the install would otherwise
    /// fail as stuck with the index still unproved.
    fn cut_slot_from_start(&mut self, now: Instant) -> bool {
        let active = self.state.active;
        let Some(job) = self.job.as_mut() else {
            return false;
        };
        if !job.index_unproved || job.cutting_rest || job.step != Step::Fetching {
            return false;
        }
        job.index_unproved = false;
        // The sampled index is given up as the guide to the slot (its entries
        // still queued are read, each hashed): a cut, from the start.
        job.index_stopped = true;
        info!(
            slot = %active,
            "the sampled check of the active slot missed a change and no source brings the chunk: cutting the slot by content"
        );
        self.start_cut(now, 0, false);
        true
    }

    /// A request source does not hold a chunk.
    pub(crate) fn on_unavailable(&mut self, now: Instant, source: SourceId, id: ChunkId) {
        let Some(job) = self.job.as_mut() else { return };
        let (Some(i), Some(e)) = (job.source_index(source), job.rel.table.entry(&id)) else {
            return;
        };
        job.source_lacks(i, &[e], now);
        let owned = matches!(job.need.get(e), Need::Fetching { req }
            if job.requests[req as usize].as_ref().is_some_and(|r| r.source == i));
        if owned {
            self.release_claim(e, Some(i));
            if let Some(job) = self.job.as_mut()
                && job.need.get(e) == Need::Idle
            {
                job.need.set(e, Need::QueuedFetch);
            }
        }
        self.pump(now);
    }

    /// The driver says a request failed.
    pub(crate) fn on_fetch_failed(
        &mut self,
        now: Instant,
        source: SourceId,
        request: RequestId,
        failure: FetchFailure,
    ) {
        let Some(job) = self.job.as_mut() else { return };
        let Some(i) = job.source_index(source) else {
            return;
        };
        let slot = job.request_slot(request).filter(|&slot| {
            job.requests[slot as usize]
                .as_ref()
                .is_some_and(|r| r.source == i)
        });
        let entries: Vec<u32> = slot
            .and_then(|slot| job.requests[slot as usize].as_ref())
            .map(|r| r.entries.clone())
            .unwrap_or_default();
        debug!(%source, %request, ?failure, "request failed");
        if failure == FetchFailure::NotThere {
            job.source_lacks(i, &entries, now);
        }
        if let Some(slot) = slot {
            self.end_request(slot, false);
        }
        match failure {
            FetchFailure::NotThere => {}
            FetchFailure::RetryLater => self.source_failed(i, now, "the driver said retry later"),
            FetchFailure::DropSource => self.drop_source(i, Gone::Removed, now),
        }
        self.pump(now);
    }

    /// Timers that are due: silent sources lose their requests; backoffs end.
    pub(crate) fn on_timeout(&mut self, now: Instant) {
        if self.timers.is_expired(Timer::Silence, now) {
            let silent: Vec<usize> = self.job.as_ref().map_or(Vec::new(), |job| {
                (0..job.sources.len())
                    .filter(|&i| {
                        job.sources[i]
                            .silence_deadline(&job.requests, job.wire_max())
                            .is_some_and(|t| t <= now)
                    })
                    .collect()
            });
            for i in silent {
                self.source_failed(i, now, "silent past its timeout");
            }
        }
        self.on_lan_timeout(now);
        // A batch whose chunks stopped coming (the rest waits for LAN peers, or
        // for a slow link) is committed by age all the same: peers learn of its
        // chunks only once it is.
        if self.timers.is_expired(Timer::JournalAge, now) {
            self.flush_batch();
        }
        if self.timers.is_expired(Timer::CutSilence, now) {
            self.give_up_cut(now);
        }
        // Backoffs that ended need no action but a pump.
        self.pump(now);
    }

    /// Sets the named timers from the sources' state.
    pub(crate) fn update_timers(&mut self, now: Instant) {
        let lan = self
            .job
            .as_ref()
            .and_then(|job| job.lan_deadline(now, super::lan::ms(self.config.lan_timeout)));
        self.timers.set(Timer::LanOwner, lan);
        let pacing = self.job.as_ref().and_then(|job| {
            let e = job.need.first_fetch()?;
            job.budget
                .ready_at(u64::from(job.rel.table.wire_size(e)), now)
        });
        self.timers.set(Timer::Pacing, pacing);
        let age = super::lan::ms(self.config.journal_batch_age);
        let journal = self
            .job
            .as_ref()
            .filter(|_| self.unsynced.len() > self.flushed)
            .and_then(|job| job.batch_since)
            .map(|since| Instant::from_millis(since.as_millis().saturating_add(age)));
        self.timers.set(Timer::JournalAge, journal);
        let silence = super::lan::ms(self.config.cut_silence);
        let hold = self
            .job
            .as_ref()
            .filter(|job| job.cutting_rest)
            .map(|job| Instant::from_millis(job.cut_heard.as_millis().saturating_add(silence)));
        self.timers.set(Timer::CutSilence, hold);
        let (silence, backoff) = match self.job.as_ref() {
            Some(job) if job.step == Step::Fetching => (
                job.sources
                    .iter()
                    .filter(|s| s.gone.is_none())
                    .filter_map(|s| s.silence_deadline(&job.requests, job.wire_max()))
                    .min(),
                job.sources
                    .iter()
                    .filter(|s| s.gone.is_none())
                    .filter_map(|s| s.backoff_until)
                    .filter(|&t| t > now)
                    .min(),
            ),
            _ => (None, None),
        };
        self.timers.set(Timer::Silence, silence);
        self.timers.set(Timer::Backoff, backoff);
    }

    /// Checks the scheduler's bookkeeping (run after every step in tests; anchor:
    /// iroh-blobs `downloader/invariants.rs`).
    #[cfg(any(test, feature = "testing"))]
    pub fn check_invariants(&self) {
        let Some(job) = self.job.as_ref() else { return };
        let n = job.rel.table.entries();
        let needed = job.need.iter().filter(|s| *s != Need::Done).count() as u32;
        assert_eq!(job.needed, needed, "needed count");
        let lan = job.need.iter().filter(|s| *s == Need::Lan).count() as u32;
        assert_eq!(
            job.lan.as_ref().map_or(0, |l| l.waiting),
            lan,
            "LAN waiting"
        );
        let reading = job
            .need
            .iter()
            .filter(|s| matches!(s, Need::Reading { .. }))
            .count() as u32;
        if job.step == Step::Fetching {
            assert_eq!(job.reads_in_flight, reading, "reads in flight");
        }
        assert!(job.reads_in_flight as usize <= self.config.reads_in_flight_max);
        let mut owned = vec![0u32; job.requests.len()];
        for state in job.need.iter() {
            if let Need::Fetching { req } = state {
                owned[req as usize] += 1;
            }
        }
        let queued = job.need.iter().filter(|s| *s == Need::QueuedFetch).count() as u32;
        assert_eq!(job.need.queued_fetches(), queued, "queued fetches count");
        let queued_reads = job.need.iter().filter(|s| *s == Need::QueuedRead).count() as u32;
        assert_eq!(job.need.queued_reads(), queued_reads, "queued reads count");
        assert_eq!(n, job.need.len());
        for (slot, r) in job.requests.iter().enumerate() {
            let Some(r) = r else { continue };
            let owned = owned[slot];
            assert_eq!(
                r.left, owned,
                "request {slot} owns {owned}, counts {}",
                r.left
            );
            let listed = r
                .entries
                .iter()
                .filter(|&&e| job.need.get(e) == (Need::Fetching { req: slot as u32 }))
                .count() as u32;
            assert_eq!(
                listed, owned,
                "request {slot}: an owned entry is not listed"
            );
            assert!(r.left > 0, "request {slot} owns nothing but is live");
            let s = &job.sources[r.source];
            assert!(
                s.requests.contains(&(slot as u32)),
                "request {slot} not listed"
            );
            assert!(s.gone.is_none(), "gone source {} has a request", s.info.id);
            assert_eq!(s.info.kind, SourceKind::Requests);
            assert!(r.entries.len() as u32 <= s.info.limits.request_chunks_max.max(1));
        }
        for s in &job.sources {
            assert!(s.open.is_none(), "a request left open after a step");
            assert!(
                s.requests.len() <= s.info.limits.requests_max.max(1) as usize,
                "{} has {} requests in flight, limit {}",
                s.info.id,
                s.requests.len(),
                s.info.limits.requests_max
            );
            for &slot in &s.requests {
                assert!(
                    job.requests[slot as usize].is_some(),
                    "listed request is dead"
                );
            }
        }
        for (e, state) in job.need.iter().enumerate() {
            let e = e as u32;
            if let Need::Fetching { req } = state {
                assert!(
                    job.requests[req as usize].is_some(),
                    "a fetching entry's request is live"
                );
            }
            let all_done = job.rel.table.positions_of(e).all(|p| job.written.get(p));
            assert_eq!(state == Need::Done, all_done, "entry {e} done bits");
            if let Need::QueuedFetch = state {
                assert!(
                    job.need.fetch_reachable(e),
                    "queued entry {e} is behind the queue's cursor"
                );
            }
        }
        // A resumed cut of the active slot, and the network fetches paused for it.
        assert!(
            !job.network_paused || job.cutting_rest,
            "a pause without a cut"
        );
        if job.cutting_rest {
            assert!(!job.cut_given_up, "a cut resumed after it was given up");
            assert!(job.index_stopped, "a cut resumed that was never stopped");
            assert_eq!(job.step, Step::Fetching, "a cut resumed outside fetching");
            assert!(job.index_cut <= job.index_len, "a cut resumed past its end");
        }
        if job.step == Step::Fetching {
            assert_eq!(
                self.timers.get(Timer::CutSilence).is_some(),
                job.cutting_rest,
                "the resumed cut's silence timer"
            );
        }
        if job.network_paused {
            for (slot, r) in job.requests.iter().enumerate() {
                let Some(r) = r else { continue };
                if job.sources[r.source].info.class == SourceClass::Local {
                    continue;
                }
                for &e in &r.entries {
                    assert!(
                        job.need.get(e) != (Need::Fetching { req: slot as u32 })
                            || !job.made_while_paused(r.generation),
                        "entry {e} asked of the network while paused for the cut"
                    );
                }
            }
        }
        assert_eq!(
            job.needed_bytes,
            job.needed_entries()
                .map(|e| u64::from(job.rel.table.size(e)))
                .sum::<u64>()
        );
    }
}

/// Folds one round-trip sample (RFC 6298) into a source's estimate and timeout.
fn observe_rtt(s: &mut SourceState, rtt_ms: u64, retry: &crate::RetryConfig) {
    match s.srtt_ms {
        None => {
            s.srtt_ms = Some(rtt_ms);
            s.rttvar_ms = rtt_ms / 2;
        }
        Some(srtt) => {
            s.rttvar_ms = (3 * s.rttvar_ms + srtt.abs_diff(rtt_ms)) / 4;
            s.srtt_ms = Some((7 * srtt + rtt_ms) / 8);
        }
    }
    let srtt = s.srtt_ms.unwrap_or(rtt_ms);
    s.rto_ms = (srtt + 4 * s.rttvar_ms).clamp(ms(retry.rto_min), ms(retry.rto_max));
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    /// A fresh install's plan (nothing written yet) is made without a walk over
    /// the entries: it is the walk's, on a release with a repeated chunk, and a
    /// resumed plan still walks (a repeated chunk is done only with every one of
    /// its positions written).
    #[test]
    fn a_fresh_plan_needs_every_entry_as_the_walk_finds() {
        let (a, b, c) = (
            testing::bytes(1, 2048),
            testing::bytes(2, 3072),
            testing::bytes(3, 4096),
        );
        // Chunks a, b, a (repeated), c.
        let image = [&a[..], &b[..], &a[..], &c[..]].concat();
        let (key, root) = testing::keys(1);
        let (manifest, _) =
            testing::release_cut("os", "1", 1, "board", &image, &[2048, 3072, 2048, 4096]);
        let rel = Arc::new(
            VerifiedRelease::verify(&root, testing::sign(&manifest, &key), None).expect("verifies"),
        );
        let job = |done: &[u32]| {
            Job::new(
                Arc::clone(&rel),
                Slot::B,
                false,
                done,
                WanBudget::new(None, 0),
            )
        };
        let plan = |done: &[u32]| {
            let job = job(done);
            let needs: Vec<Need> = (0..rel.table.entries()).map(|e| job.need.get(e)).collect();
            (job.needed, job.needed_bytes, needs, job.wire_max())
        };
        // The whole table (codes, cursors, counts) as the walk leaves it.
        let walked = |done: &[u32]| job(done).need;
        assert_eq!(walked(&[]), walked(&[u32::MAX]));
        let wire_max = (0..rel.table.entries())
            .map(|e| u64::from(rel.table.wire_size(e)))
            .max()
            .expect("entries");
        let fresh = plan(&[]);
        assert_eq!(
            fresh,
            (3, 2048 + 3072 + 4096, vec![Need::Idle; 3], wire_max)
        );
        // A position past the payload is ignored: nothing written, by the walk.
        assert_eq!(plan(&[u32::MAX]), fresh);
        // One of the repeated chunk's two positions written: still needed.
        assert_eq!(plan(&[0]), fresh);
        // Both: done.
        let a_entry = rel.table.entry_at(0);
        let (needed, bytes, needs, _) = plan(&[0, 2]);
        assert_eq!((needed, bytes), (2, 3072 + 4096));
        assert_eq!(needs[a_entry as usize], Need::Done);
    }

    /// The message `check_invariants` panics with, or `None` when it passes.
    fn broken_invariant(engine: &Engine) -> Option<String> {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine.check_invariants();
        }));
        caught.err().map(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default()
        })
    }

    fn job(e: &mut Engine) -> &mut Job {
        e.job.as_mut().expect("an install in progress")
    }

    fn request(e: &mut Engine, slot: usize) -> &mut Request {
        job(e).requests[slot].as_mut().expect("the request is live")
    }

    /// The check run after every step in tests catches bookkeeping that
    /// disagrees with the need table (each corruption one a bug could make), and
    /// passes again once it is undone.
    #[test]
    fn the_invariants_check_catches_broken_bookkeeping() {
        use crate::fetch_tests::{Fixture, setup, source};
        let f = Fixture::new();
        let image = testing::bytes(5, 64 * 1024);
        let (mut dev, manifest, chunks) = setup(&image);
        let id = crate::SourceId(1);
        dev.stores.insert(id, chunks.into_iter().collect());
        // It never answers, so its requests stay in flight.
        let silent = testing::Link {
            silent: true,
            ..testing::Link::default()
        };
        dev.links.insert(id, silent);
        let mut engine = dev.engine(f.config());
        let offer = f.offer(&manifest, vec![source(1, crate::SourceClass::Wan)]);
        engine.offer(dev.now(), offer).expect("offer");
        dev.run_until(&mut engine, None, 100).expect("no crash");
        assert_eq!(broken_invariant(&engine), None, "sound after the steps");

        // The count of needed entries one off.
        job(&mut engine).needed += 1;
        let broken = broken_invariant(&engine).expect("caught");
        assert!(broken.contains("needed count"), "{broken}");
        job(&mut engine).needed -= 1;

        // A live request that counts one entry fewer than it owns.
        let slot = job(&mut engine)
            .requests
            .iter()
            .position(Option::is_some)
            .expect("a request in flight");
        assert!(request(&mut engine, slot).left > 1, "owns several chunks");
        request(&mut engine, slot).left -= 1;
        let broken = broken_invariant(&engine).expect("caught");
        assert!(broken.contains(&format!("request {slot} owns")), "{broken}");
        request(&mut engine, slot).left += 1;

        // An entry the request lists but that is not marked as fetched by it.
        let entry = request(&mut engine, slot).entries[0];
        job(&mut engine).need.set(entry, Need::Idle);
        let broken = broken_invariant(&engine).expect("caught");
        assert!(broken.contains(&format!("request {slot} owns")), "{broken}");
        job(&mut engine)
            .need
            .set(entry, Need::Fetching { req: slot as u32 });

        assert_eq!(broken_invariant(&engine), None, "sound once undone");
    }
}
