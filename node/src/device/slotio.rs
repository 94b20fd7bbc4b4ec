//! Reading whole slots fast: indexing the running slot and verifying the written
//! one are reads of hundreds of MiB from the medium (`O_DIRECT`, see
//! `shoal_bootctl::storage`), so they are read ahead on their own thread into
//! aligned, recycled blocks (no bounce copy, no zeroing per read), and the work on
//! what was read (cutting and hashing) runs beside the reading.
//!
//! [`Verifier`] goes further for the slot being written: it re-reads and hashes
//! each part of the payload as soon as that part is written *and synced*, while the
//! install goes on, so that at the end only the last batch is left to read.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use rayon::prelude::*;
use shoal_artifact::chunk::{Sample, sample_positions};
use shoal_artifact::{ChunkId, Chunking};
use shoal_bootctl::storage::Storage;

/// Bytes per read when a slot is read front to back.
pub const BLOCK: usize = 1024 * 1024;
/// Blocks alive at once in [`read_ahead`]: being read, waiting, being consumed.
const BLOCKS_IN_FLIGHT: usize = 3;
/// Alignment of [`AlignedBlock`]s: a multiple of every common logical block size
/// and of the usual DMA alignment, so `O_DIRECT` reads go straight into them.
const ALIGN: usize = 4096;

/// A heap buffer whose start is aligned to [`ALIGN`] (an over-allocated `Vec` and
/// the aligned window inside it; no `unsafe`).
pub struct AlignedBlock {
    backing: Vec<u8>,
    /// Where the bytes read start (aligned): after the room for bytes put before.
    start: usize,
    len: usize,
    /// Room before `start` (see [`AlignedBlock::prepend`]), and how much of it is used.
    head: usize,
    front: usize,
}

impl AlignedBlock {
    /// A zeroed block of `capacity` bytes.
    pub fn new(capacity: usize) -> AlignedBlock {
        AlignedBlock::with_head(capacity, 0)
    }

    /// A zeroed block of `capacity` bytes with room for `head` bytes (rounded up to
    /// the alignment) before them.
    fn with_head(capacity: usize, head: usize) -> AlignedBlock {
        let head = head.div_ceil(ALIGN) * ALIGN;
        let backing = vec![0u8; head + capacity + ALIGN];
        let start = head + (ALIGN - backing.as_ptr().addr() % ALIGN) % ALIGN;
        AlignedBlock {
            backing,
            start,
            len: capacity,
            head,
            front: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.backing.len() - ALIGN - self.head
    }

    /// Fills the first `len` bytes (at most the capacity) from `offset` of
    /// `storage`.
    pub fn fill(&mut self, storage: &dyn Storage, offset: u64, len: usize) -> io::Result<()> {
        assert!(len <= self.capacity(), "read larger than the block");
        self.len = len;
        self.front = 0;
        storage.read_at(offset, &mut self.backing[self.start..self.start + len])
    }

    /// The bytes read.
    pub fn as_slice(&self) -> &[u8] {
        &self.backing[self.start..self.start + self.len]
    }

    /// Puts `bytes` (at most the room before the block) right before the bytes
    /// read, so that [`AlignedBlock::window`] is the two together, without copying
    /// the block.
    fn prepend(&mut self, bytes: &[u8]) {
        assert!(
            bytes.len() <= self.head,
            "more than the room before the block"
        );
        self.backing[self.start - bytes.len()..self.start].copy_from_slice(bytes);
        self.front = bytes.len();
    }

    /// The bytes put before ([`AlignedBlock::prepend`]) and the bytes read.
    fn window(&self) -> &[u8] {
        &self.backing[self.start - self.front..self.start + self.len]
    }
}

/// Blocks for a reading thread: given back ones first, new ones up to
/// [`BLOCKS_IN_FLIGHT`], then waiting for one to come back.
struct BlockPool {
    recycled: mpsc::Receiver<AlignedBlock>,
    allocated: usize,
    /// Bytes of each block.
    capacity: usize,
    /// Room before each block ([`AlignedBlock::prepend`]).
    head: usize,
    /// Blocks alive at most.
    blocks: usize,
}

impl BlockPool {
    /// A block to read into; `None` when every block is out and whoever had them
    /// is gone.
    fn get(&mut self) -> Option<AlignedBlock> {
        match self.recycled.try_recv() {
            Ok(block) => Some(block),
            Err(_) if self.allocated < self.blocks => {
                self.allocated += 1;
                Some(AlignedBlock::with_head(self.capacity, self.head))
            }
            Err(_) => self.recycled.recv().ok(),
        }
    }
}

/// The blocks [`read_ahead`] reads, in order.
pub struct Blocks {
    rx: mpsc::Receiver<AlignedBlock>,
    recycle: mpsc::Sender<AlignedBlock>,
    /// Set by the reader before it ends on a read error.
    failed: std::sync::Arc<AtomicBool>,
}

impl Blocks {
    /// The next block, `None` at the end (or when the reading failed: the reader
    /// reports that error).
    pub fn next(&mut self) -> Option<AlignedBlock> {
        self.rx.recv().ok()
    }

    /// Whether the `None` of [`Blocks::next`] was a read error, not the end: the
    /// blocks ended before the last range.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Gives a block back for the next read.
    pub fn recycle(&mut self, block: AlignedBlock) {
        // The reader may have finished; then the block is simply freed.
        let _ = self.recycle.send(block);
    }
}

/// What the cut of a slot ([`index`]) hands over as it goes.
#[derive(Debug)]
pub enum Met {
    /// A wanted chunk, the first time the cut meets it (verified).
    Chunk(shoal_artifact::VerifiedChunk),
    /// Every chunk of the slot up to this offset (from where the cut started)
    /// was cut, hashed and handed over.
    Cut(u64),
}

/// Where the cut of a slot hands over what it meets, and the flag that stops it.
#[derive(Debug, Clone, Copy)]
pub struct Handover<'a> {
    /// The receiver of the chunks met and of the progress.
    pub tx: &'a mpsc::SyncSender<Met>,
    /// Set (by the receiver) to stop the cut at its next block.
    pub stop: &'a AtomicBool,
}

/// Reads `start..end` of `storage` in [`BLOCK`]s on this thread and hands them in
/// order to `consume`, which runs on another thread: reading the medium overlaps
/// the work on what was read. At most [`BLOCKS_IN_FLIGHT`] blocks are alive. A
/// read error wins over what `consume` made of the blocks before it.
pub fn read_ahead<T: Send>(
    storage: &dyn Storage,
    start: u64,
    end: u64,
    consume: impl FnOnce(&mut Blocks) -> T + Send,
) -> io::Result<T> {
    let ranges = (start..end).step_by(BLOCK).map(|offset| {
        (
            offset,
            usize::try_from((end - offset).min(BLOCK as u64)).unwrap_or(BLOCK),
        )
    });
    read_ranges_ahead(storage, ranges, (BLOCK, 0, BLOCKS_IN_FLIGHT), consume)
}

/// [`read_ahead`], but of the ranges `(offset, len)` of `storage`, in the order
/// given, each into one block of `capacity` bytes (a range is at most that long)
/// with room for `head` bytes before it, `blocks` alive at most.
fn read_ranges_ahead<T: Send>(
    storage: &dyn Storage,
    ranges: impl Iterator<Item = (u64, usize)>,
    (capacity, head, blocks): (usize, usize, usize),
    consume: impl FnOnce(&mut Blocks) -> T + Send,
) -> io::Result<T> {
    let (tx, rx) = mpsc::sync_channel::<AlignedBlock>(blocks - 1);
    let (recycle, recycled) = mpsc::channel::<AlignedBlock>();
    std::thread::scope(|scope| {
        let failed = std::sync::Arc::new(AtomicBool::new(false));
        let blocks_failed = std::sync::Arc::clone(&failed);
        let worker = scope.spawn(move || {
            consume(&mut Blocks {
                rx,
                recycle,
                failed: blocks_failed,
            })
        });
        let mut pool = BlockPool {
            recycled,
            allocated: 0,
            capacity,
            head,
            blocks,
        };
        let mut result = Ok(());
        for (offset, n) in ranges {
            // None: the consumer stopped early (it failed); its result says why.
            let Some(mut block) = pool.get() else { break };
            if let Err(e) = block.fill(storage, offset, n) {
                // Before the blocks end: the consumer tells this from the end.
                failed.store(true, Ordering::Release);
                result = Err(e);
                break;
            }
            if tx.send(block).is_err() {
                break;
            }
        }
        drop(tx);
        let out = worker.join().expect("the slot reading worker panicked");
        result.map(|()| out)
    })
}

/// A gap between two wanted chunks up to which [`check_along`] reads through it
/// (one larger read) rather than reading the two apart: a direct read costs a
/// request's latency, about as much as reading this much more.
const GAP_READ_MAX: u64 = 64 * 1024;

/// What [`check_along`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Along {
    /// Every wanted chunk was read and lies where the expected list puts it:
    /// the positions in that list of each wanted id's first position, ascending
    /// ([`at_positions`] gives their offsets, ids and lengths: an index of the
    /// slot that lists those chunks only).
    Held(Vec<u32>),
    /// A sample of the wanted chunks (`checked` of them) was read and lies where
    /// the list puts them; `positions` lists every wanted chunk's first position
    /// as [`Along::Held`] does, most of them unread: unproved (the caller hashes
    /// each when it reads it, and may meet one that is not there).
    Sampled {
        /// Every wanted chunk, as for [`Along::Held`].
        positions: Vec<u32>,
        /// How many of them were read and hashed.
        checked: usize,
    },
    /// The bytes at `offset` do not hash to `expected` (the first such position).
    Differs { offset: u64, expected: ChunkId },
}

/// Checks that `storage` holds, where the chunk list `expected()` (`(id,
/// length)`, from offset 0: the release the slot should hold; walked twice here,
/// as the kept manifest's ids are read from their file, and a third time by the
/// driver to write the index, [`at_positions`]) puts them, the chunks
/// `wanted` gives a key (equal keys for one id, below `u32::MAX`: an entry of
/// the new release's table), reading and hashing only those: the first position
/// of each wanted id (a repeated id is read once), neighbouring positions read
/// together (gaps up to [`GAP_READ_MAX`], reads up to [`BLOCK`] or one chunk,
/// aligned for direct reads), read ahead on this thread while another hashes
/// what was read. Stops at the first position that does not hash to its id: the
/// slot does not hold that release there (the caller then cuts it by content).
/// `expected` must fit in `len`.
///
/// What it keeps a wanted chunk is its position (4 bytes) and a bit of its key:
/// at 8 GiB, about 430,000 wanted chunks, a list of `(offset, id, length)` (48
/// bytes) and a set of their ids (about 40) were 41 MB, the peak of a thin
/// install.
///
/// With `sample`, when more chunks are wanted than it reads, only those it picks
/// are read and hashed ([`sample_positions`]: spread evenly over the wanted
/// chunks in slot order, the first and the last among them), and the answer is
/// [`Along::Sampled`]: whether the slot holds the release at all, for a few dozen
/// chunk reads instead of every wanted one. With no more wanted than the sample,
/// all are read: [`Along::Held`].
pub fn check_along<I: IntoIterator<Item = (ChunkId, u32)>>(
    storage: &dyn Storage,
    len: u64,
    expected: impl Fn() -> I,
    wanted: &(dyn Fn(&ChunkId) -> Option<u32> + Sync),
    sample: Option<Sample>,
) -> io::Result<Along> {
    let positions = positions_along(len, expected(), wanted);
    let picked: Option<Vec<u32>> = sample.filter(|k| positions.len() > k.get()).map(|k| {
        sample_positions(positions.len(), k)
            .map(|i| positions[i])
            .collect()
    });
    let targets: Vec<(u64, ChunkId, u32)> =
        at_positions(expected(), picked.as_deref().unwrap_or(&positions)).collect();
    Ok(match check_targets(storage, len, &targets)? {
        Some((offset, expected)) => Along::Differs { offset, expected },
        None => match picked {
            Some(picked) => Along::Sampled {
                positions,
                checked: picked.len(),
            },
            None => Along::Held(positions),
        },
    })
}

/// The first position of each wanted id of `expected` (from offset 0), ascending.
fn positions_along(
    len: u64,
    expected: impl IntoIterator<Item = (ChunkId, u32)>,
    wanted: &(dyn Fn(&ChunkId) -> Option<u32> + Sync),
) -> Vec<u32> {
    // A bit a key: whether its id was met already.
    let mut seen: Vec<u64> = Vec::new();
    let mut positions: Vec<u32> = Vec::new();
    let mut offset = 0u64;
    for (pos, (id, n)) in expected.into_iter().enumerate() {
        if let Some(key) = wanted(&id) {
            let (word, bit) = (key as usize / 64, key % 64);
            if word >= seen.len() {
                seen.resize(word + 1, 0);
            }
            if seen[word] >> bit & 1 == 0 {
                seen[word] |= 1 << bit;
                positions.push(u32::try_from(pos).expect("a chunk list's positions fit a u32"));
            }
        }
        offset += u64::from(n);
    }
    assert!(offset <= len, "the expected chunks run past the slot");
    positions
}

/// `(offset, id, length)` of the chunks of `expected` (from offset 0) at
/// `positions` (ascending), in that order: the slot index [`Along`] lists.
pub fn at_positions<'a>(
    expected: impl IntoIterator<Item = (ChunkId, u32)> + 'a,
    positions: &'a [u32],
) -> impl Iterator<Item = (u64, ChunkId, u32)> + 'a {
    let mut next = positions.iter().peekable();
    let mut offset = 0u64;
    let mut expected = expected.into_iter().enumerate();
    std::iter::from_fn(move || {
        loop {
            // Nothing read past the last position asked.
            let &&want = next.peek()?;
            let (pos, (id, n)) = expected.next()?;
            let at = offset;
            offset += u64::from(n);
            if pos as u32 == want {
                next.next();
                return Some((at, id, n));
            }
        }
    })
}

/// Reads and hashes `targets` (in slot order) as [`check_along`] says; the first
/// that does not hash to its id, if any.
fn check_targets(
    storage: &dyn Storage,
    len: u64,
    targets: &[(u64, ChunkId, u32)],
) -> io::Result<Option<(u64, ChunkId)>> {
    // Reads `(start, len, targets)`: aligned, clamped to the slot.
    let align = ALIGN as u64;
    let mut reads: Vec<(u64, u64, std::ops::Range<usize>)> = Vec::new();
    for (i, &(at, _, n)) in targets.iter().enumerate() {
        let start = at / align * align;
        let end = (at + u64::from(n)).next_multiple_of(align).min(len);
        match reads.last_mut() {
            Some((s, e, t)) if start <= *e + GAP_READ_MAX && end - *s <= BLOCK as u64 => {
                *e = end.max(*e);
                t.end = i + 1;
            }
            _ => reads.push((start, end, i..i + 1)),
        }
    }
    let capacity = reads
        .iter()
        .map(|(s, e, _)| usize::try_from(e - s).expect("a read is at most a chunk or a block"))
        .max()
        .unwrap_or(0)
        .max(BLOCK);
    let ranges = reads
        .iter()
        .map(|(s, e, _)| (*s, usize::try_from(e - s).expect("checked above")));
    let reads = &reads;
    read_ranges_ahead(
        storage,
        ranges,
        (capacity, 0, BLOCKS_IN_FLIGHT),
        move |blocks| {
            for (start, _, t) in reads {
                let Some(block) = blocks.next() else {
                    // The reading failed: its error is returned.
                    return None;
                };
                let bytes = block.as_slice();
                let differs = targets[t.clone()].par_iter().find_first(|&&(at, id, n)| {
                    let from = usize::try_from(at - start).expect("inside the block");
                    ChunkId::of(&bytes[from..from + n as usize]) != id
                });
                blocks.recycle(block);
                if let Some(&(offset, expected, _)) = differs {
                    return Some((offset, expected));
                }
            }
            None
        },
    )
}

/// BLAKE3 of `0..len` of `storage`, read ahead.
pub fn hash(storage: &dyn Storage, len: u64) -> io::Result<[u8; 32]> {
    read_ahead(storage, 0, len, |blocks| {
        let mut hasher = blake3::Hasher::new();
        while let Some(block) = blocks.next() {
            hasher.update(block.as_slice());
            blocks.recycle(block);
        }
        *hasher.finalize().as_bytes()
    })
}

/// Cuts `0..len` of `storage` as the artifact builder cuts a payload (FastCDC 2020,
/// normalization level 1: the same cut points as [`shoal_artifact::chunk::index`])
/// and returns `(offset, id, length)` of every chunk.
///
/// Unlike that streaming chunker, which copies every chunk out of a sliding
/// buffer, this cuts each block where it lies (carrying only the unfinished last
/// chunk over to the next block) and hashes the chunks of one block on all cores
/// while the next one is cut.
///
/// The first time it meets a chunk in `wanted`, it sends it (verified) to `met`
/// (an install takes the chunks it needs while the slot is indexed, instead of
/// reading them again afterwards), and after the chunks of each block how far the
/// cut is ([`Met::Cut`]). A closed `met` stops the sending, not the index; `met`'s
/// `stop` flag, once set, stops the index at the next block: it returns what it cut
/// before (not an index of the whole slot).
///
/// The cutting and hashing run in `pool`, or without one in rayon's global pool
/// (started on first use, and alive from then on: an idle-time cut passes a pool
/// of its own, which ends with it).
pub fn index(
    storage: &dyn Storage,
    len: u64,
    chunking: Chunking,
    wanted: &(dyn Fn(&ChunkId) -> bool + Sync),
    met: Option<&Handover<'_>>,
    pool: Option<&rayon::ThreadPool>,
    repeats: Repeats,
) -> io::Result<Vec<(u64, ChunkId, u32)>> {
    index_with(
        storage,
        0,
        len,
        chunking,
        &[],
        wanted,
        met,
        pool,
        (repeats == Repeats::Once, true),
    )
    .map(|c| c.0)
}

/// [`index`] of the whole slot with nothing wanted, handed over or pooled: its
/// chunks, listed.
pub fn list_chunks(
    storage: &dyn Storage,
    len: u64,
    chunking: Chunking,
    repeats: Repeats,
) -> io::Result<Vec<(u64, ChunkId, u32)>> {
    index(storage, len, chunking, &|_| false, None, None, repeats)
}

/// How [`index`] lists a run of one chunk repeated back to back (the zeros of a
/// sparse or erased region: an 8 GiB sparse slot is 131,072 max-size zero chunks,
/// 6 MiB as a list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeats {
    /// Every chunk at its offset.
    Listed,
    /// The run listed once, at its first position, as it is cut: for an index that
    /// keeps the first position of each id anyway (the engine's, the store's), the
    /// list is never in memory whole.
    Once,
}

/// [`index`] with [`Repeats::Once`], but the slot is taken to begin with chunks of the lengths
/// `known` (the chunk list of the release it is expected to hold, from offset 0):
/// those are hashed where they lie, without running the content-defined chunker
/// over them (about as much CPU as the hashing); whatever lies past them is cut as
/// [`index`] cuts. When the slot does hold that release, the index lists the
/// release's chunks where [`index`] with [`Repeats::Once`] lists them (the release's chunk
/// list *is* FastCDC's cut of its payload; only past the payload's end, in a slot
/// larger than it, may the two cut elsewhere); when it does not, it is still an
/// index of what the slot holds (every id is the hash of the bytes at its
/// offset), only cut elsewhere: the caller compares the ids with the release's
/// and cuts again by content if they differ. `known` must fit in `len`.
#[allow(clippy::too_many_arguments)]
pub fn index_along(
    storage: &dyn Storage,
    len: u64,
    chunking: Chunking,
    known: &[u32],
    wanted: &(dyn Fn(&ChunkId) -> bool + Sync),
    met: Option<&Handover<'_>>,
    pool: Option<&rayon::ThreadPool>,
) -> io::Result<Vec<(u64, ChunkId, u32)>> {
    index_with(
        storage,
        0,
        len,
        chunking,
        known,
        wanted,
        met,
        pool,
        (true, true),
    )
    .map(|c| c.0)
}

/// [`index`] with [`Repeats::Once`] of `from..len` (as though a chunk started at `from`, a
/// multiple of [`BLOCK`]), handing over what it meets, but not listing the
/// chunks: only how many it cut (each run once). What a resumed cut of the
/// running slot needs, without holding a list of the slot's chunks (about 48
/// bytes a chunk: tens of MiB at 8 GiB). The progress it hands over
/// ([`Met::Cut`]) is an offset in the slot.
pub fn count_cut(
    storage: &dyn Storage,
    from: u64,
    len: u64,
    chunking: Chunking,
    wanted: &(dyn Fn(&ChunkId) -> bool + Sync),
    met: Option<&Handover<'_>>,
) -> io::Result<u64> {
    index_with(
        storage,
        from,
        len,
        chunking,
        &[],
        wanted,
        met,
        None,
        (true, false),
    )
    .map(|c| c.1)
}

/// The cut of `from..len` of `storage` (`from` a block boundary, where a chunk is
/// taken to start; the known chunks start there too): see [`index`] and
/// [`index_along`].
#[allow(clippy::too_many_arguments)]
fn index_with(
    storage: &dyn Storage,
    from: u64,
    len: u64,
    chunking: Chunking,
    known: &[u32],
    wanted: &(dyn Fn(&ChunkId) -> bool + Sync),
    met: Option<&Handover<'_>>,
    pool: Option<&rayon::ThreadPool>,
    (runs_once, list): (bool, bool),
) -> io::Result<Counted> {
    assert!(chunking.validate().is_ok(), "invalid chunking {chunking:?}");
    assert!(
        from <= len && from.is_multiple_of(BLOCK as u64),
        "a cut starts at a block boundary in the slot, not at {from} (of {len})"
    );
    assert!(
        known.iter().map(|&n| u64::from(n)).sum::<u64>() <= len - from,
        "the known chunks run past the slot"
    );
    let stop = met.map(|m| m.stop);
    let mut met = met.map(|m| m.tx);
    // Nothing is wanted without a receiver.
    let wanted: &(dyn Fn(&ChunkId) -> bool + Sync) =
        if met.is_some() { wanted } else { &|_| false };
    let hand_over = move |what: HandOver| match what {
        HandOver::Chunk(chunk) => {
            if let Some(tx) = met
                && tx.send(Met::Chunk(chunk)).is_err()
            {
                met = None;
            }
            true
        }
        HandOver::Cut(n) => {
            if let Some(tx) = met
                && tx.send(Met::Cut(n)).is_err()
            {
                met = None;
            }
            !stop.is_some_and(|s| s.load(Ordering::Acquire))
        }
    };
    let ranges = (from..len).step_by(BLOCK).map(|offset| {
        (
            offset,
            usize::try_from((len - offset).min(BLOCK as u64)).unwrap_or(BLOCK),
        )
    });
    // Room before each block for the unfinished chunk of the window before (less
    // than `max_size`); the consumer holds two blocks (one cut, one hashed).
    let layout = (BLOCK, chunking.max_size as usize, BLOCKS_IN_FLIGHT + 1);
    let mut cut = None;
    let read = read_ranges_ahead(storage, ranges, layout, |blocks| {
        // `consume` runs on a thread of read_ahead's, outside any pool: rayon's
        // calls below would start (or use) the global pool unless sent into `pool`.
        let mut body = move || {
            cut_and_hash(
                blocks,
                chunking,
                (from, known),
                (runs_once, list),
                wanted,
                hand_over,
            )
        };
        cut = Some(match pool {
            Some(pool) => pool.install(body),
            None => body(),
        });
    });
    match read {
        Ok(()) => Ok(cut.expect("the cut ran")),
        // The reader runs a few blocks ahead of the cut: a read failing after the
        // cut was stopped is of bytes nobody needs (the install went on without
        // them), not an error of the cut.
        Err(e) if stop.is_some_and(|s| s.load(Ordering::Acquire)) => {
            tracing::debug!(error = %e, "a read of the slot failed after its cut was stopped");
            Ok(cut.unwrap_or_default())
        }
        Err(e) => Err(e),
    }
}

/// The chunks a cut listed (offset, id, length; none unless asked to list them)
/// and how many it cut (each run once, if asked).
type Counted = (Vec<(u64, ChunkId, u32)>, u64);

/// What [`cut_and_hash`] hands over: a wanted chunk met for the first time, or how
/// far the cut is (the answer then says whether to go on).
enum HandOver {
    Chunk(shoal_artifact::VerifiedChunk),
    Cut(u64),
}

/// [`index`]'s consumer: cuts the blocks and hashes the chunks, handing over each
/// `wanted` one the first time it meets it (proved from the same hash, on the
/// hashing threads) and how far it is after each block; stops early when that
/// answer is `false`. The chunks are counted, and listed only if `list`: a
/// counting cut holds no list of the slot's chunks.
fn cut_and_hash(
    blocks: &mut Blocks,
    chunking: Chunking,
    (from, known): (u64, &[u32]),
    (runs_once, list): (bool, bool),
    wanted: &(dyn Fn(&ChunkId) -> bool + Sync),
    mut hand_over: impl FnMut(HandOver) -> bool,
) -> Counted {
    let zero = ZeroRun::of(chunking);
    let mut sent: HashSet<ChunkId> = HashSet::new();
    // The known chunks not yet cut, and where the first of them starts.
    let mut known = known;
    let mut known_at = from;
    // The chunks cut (if `list`ed) and their count, and the id of the last one
    // (a run is counted once if `runs_once`).
    let mut out: Counted = (Vec::new(), 0);
    let mut last: Option<ChunkId> = None;
    // Two windows, each a block read with the unfinished tail of the window
    // before copied in front of it (no block is copied whole): one is cut while
    // the other's chunks are hashed.
    let mut hashing: Option<AlignedBlock> = None;
    // Where the unfinished tail of `hashing`'s window starts.
    let mut tail_at = 0usize;
    // Payload offset of the window being cut.
    let mut base = from;
    // Chunks of `hashing` still to hash: (offset in payload, start in its window,
    // len).
    let mut pending: Vec<(u64, usize, usize)> = Vec::new();
    // Whether the last tail was cut (in `hashing`'s window, where it lies): only
    // its chunks are left to hash.
    let mut ended = false;
    loop {
        let mut cutting = if ended { None } else { blocks.next() };
        if !ended && cutting.is_none() && blocks.failed() {
            // Not the end of the slot: the read failed (the reader reports it).
            // The tail is not cut as a last chunk, and no position past what was
            // cut is handed over.
            return out;
        }
        let hashed = hashing.as_ref().map_or(&[][..], AlignedBlock::window);
        let tail = &hashed[tail_at..];
        if let Some(block) = cutting.as_mut() {
            block.prepend(tail);
        }
        // At the end, the last tail is cut where it lies.
        let window = cutting.as_ref().map_or(tail, AlignedBlock::window);
        let keep = |id: &ChunkId| wanted(id) && !sent.contains(id);
        let (ids, cuts) = rayon::join(
            || hash_chunks(hashed, &pending, &zero, &keep),
            || {
                if ended {
                    return Vec::new();
                }
                cut_along(
                    window,
                    base,
                    (chunking, &zero),
                    cutting.is_none(),
                    &mut known,
                    &mut known_at,
                )
            },
        );
        for ((offset, _, len), (id, proof)) in pending.iter().zip(ids) {
            if let Some(chunk) = proof
                && sent.insert(id)
            {
                hand_over(HandOver::Chunk(chunk));
            }
            if !(runs_once && last == Some(id)) {
                last = Some(id);
                out.1 += 1;
                if list {
                    let len = u32::try_from(*len).expect("a chunk is at most max_size");
                    out.0.push((*offset, id, len));
                }
            }
        }
        if let Some(&(offset, _, len)) = pending.last()
            && !hand_over(HandOver::Cut(offset + len as u64))
        {
            // Stopped: what was cut so far (dropping `blocks` stops the reads).
            return out;
        }
        if ended {
            return out;
        }
        // The finished chunks of the window just cut are hashed next: from
        // `cutting`'s window, or (the last tail) from `hashing`'s, after the
        // chunks hashed now.
        let finished: usize = cuts.iter().map(|&(_, len)| len).sum();
        let at = if cutting.is_some() { 0 } else { tail_at };
        pending = cuts
            .into_iter()
            .map(|(start, len)| (base + start as u64, at + start, len))
            .collect();
        base += finished as u64;
        match cutting {
            Some(block) => {
                if let Some(done) = hashing.replace(block) {
                    blocks.recycle(done);
                }
                tail_at = finished;
            }
            None => ended = true,
        }
    }
}

/// [`cut`], but the chunks `known` (lengths, the first starting at payload offset
/// `known_at`) are taken as they are where `window` (starting at payload offset
/// `base`) holds them whole; those taken are removed from `known`. Past the last
/// known chunk, the rest of the window is cut by content.
fn cut_along(
    window: &[u8],
    base: u64,
    (chunking, zero): (Chunking, &ZeroRun),
    end: bool,
    known: &mut &[u32],
    known_at: &mut u64,
) -> Vec<(usize, usize)> {
    if known.is_empty() {
        return cut(window, chunking, zero, end);
    }
    // Every window starts where the previous one's last finished chunk ended.
    debug_assert_eq!(base, *known_at, "a window starts at a known chunk");
    let mut cuts = Vec::new();
    let mut start = 0usize;
    while let Some((&n, rest)) = known.split_first() {
        let n = n as usize;
        if start + n > window.len() {
            return cuts;
        }
        cuts.push((start, n));
        start += n;
        *known = rest;
        *known_at += n as u64;
    }
    // The known chunks end inside this window: the rest is cut by content.
    cuts.extend(
        cut(&window[start..], chunking, zero, end)
            .into_iter()
            .map(|(s, n)| (start + s, n)),
    );
    cuts
}

/// The finished chunks `(start, len)` of `window`: every chunk whose end was
/// decided by its content or the maximum size, and at the `end` of the payload
/// the last one too. A chunk reaching the end of the window otherwise waits for
/// the next block (its cut point may lie beyond). Stretches of zeros are cut
/// without the chunker ([`chain`]).
///
/// A window of at least [`SPLIT_MIN`] chunks' worth is cut in two halves on two
/// cores: the first from its start, the second from its middle as though a chunk
/// started there; the first half's cut is then carried on from its last finished
/// chunk until it reaches a chunk start of the second's (within a few chunks: the
/// cut from a point depends only on the bytes after it, so from a common start
/// the two are one), and the second's chunks are taken from there. Without such a
/// meeting it is carried on to the end: the result is always the whole cut's.
fn cut(window: &[u8], chunking: Chunking, zero: &ZeroRun, end: bool) -> Vec<(usize, usize)> {
    if window.is_empty() {
        return Vec::new();
    }
    let max = chunking.max_size as usize;
    let mut cuts = if window.len() >= SPLIT_MIN * max {
        let mid = window.len() / 2;
        let (mut first, second) = rayon::join(
            || chain(&window[..mid], 0, chunking, zero, &[]).0,
            || chain(window, mid, chunking, zero, &[]).0,
        );
        // A chunk reaching the middle unfinished is cut again below.
        if let Some(&(start, len)) = first.last()
            && start + len == mid
            && len < max
        {
            first.pop();
        }
        let from = first.last().map_or(0, |&(start, len)| start + len);
        let starts: Vec<usize> = second.iter().map(|&(start, _)| start).collect();
        let (on, met) = chain(window, from, chunking, zero, &starts);
        first.extend(on);
        if let Some(k) = met {
            first.extend_from_slice(&second[k..]);
        }
        first
    } else {
        chain(window, 0, chunking, zero, &[]).0
    };
    if !end
        && let Some(&(start, len)) = cuts.last()
        && start + len == window.len()
        && len < max
    {
        cuts.pop();
    }
    cuts
}

/// Windows of at least this many `max_size` chunks are cut on two cores ([`cut`]).
const SPLIT_MIN: usize = 4;

/// The chunker's cuts `(start, len)` of `window` from `from` (taken as a chunk
/// start) to its end, the last one as it falls. Stops at the first chunk start
/// that is in `meet` (sorted) and says which: from there on, a cut that started
/// there goes on the same.
///
/// A stretch of zeros is not run through the chunker: where the `max_size` bytes
/// from a chunk's start are all zeros, the chunker's cut depends on those bytes
/// only (it looks no further than `max_size`), so it is the cut of a zero run,
/// [`ZeroRun::len`], found once. Checking for zeros runs at memory speed and fails
/// on the first non-zero byte, whose position is kept so no byte is checked twice.
fn chain(
    window: &[u8],
    from: usize,
    chunking: Chunking,
    zero: &ZeroRun,
    meet: &[usize],
) -> (Vec<(usize, usize)>, Option<usize>) {
    let max = chunking.max_size as usize;
    let cdc = fastcdc::v2020::FastCDC::new(
        window,
        chunking.min_size as usize,
        chunking.avg_size as usize,
        max,
    );
    let mut cuts = Vec::new();
    let mut at = from;
    // A non-zero byte at or after `at`, when one is known.
    let mut non_zero = from;
    while at < window.len() {
        if let Ok(k) = meet.binary_search(&at) {
            return (cuts, Some(k));
        }
        let remaining = window.len() - at;
        if remaining >= max && non_zero < at + max {
            non_zero = non_zero.max(at);
            match first_non_zero(&window[non_zero..at + max]) {
                None => {
                    cuts.push((at, zero.len));
                    at += zero.len;
                    continue;
                }
                Some(k) => non_zero += k,
            }
        }
        let (_, next) = cdc.cut(at, remaining);
        if next <= at {
            break;
        }
        cuts.push((at, next - at));
        at = next;
    }
    (cuts, None)
}

/// The ids of `chunks` of `window`, and a proof of each that `keep` says to keep
/// (made from the same hash: [`VerifiedChunk::hash_keeping`]); a chunk of zeros as
/// long as the chunker cuts a zero run ([`ZeroRun`]) is not hashed again: its id is
/// known.
///
/// [`VerifiedChunk::hash_keeping`]: shoal_artifact::VerifiedChunk::hash_keeping
fn hash_chunks(
    window: &[u8],
    chunks: &[(u64, usize, usize)],
    zero: &ZeroRun,
    keep: &(dyn Fn(&ChunkId) -> bool + Sync),
) -> Vec<(ChunkId, Option<shoal_artifact::VerifiedChunk>)> {
    chunks
        .par_iter()
        .map(|&(_, start, len)| {
            let bytes = &window[start..start + len];
            if len == zero.len && first_non_zero(bytes).is_none() {
                let proof = keep(&zero.id)
                    .then(|| shoal_artifact::VerifiedChunk::check(zero.id, bytes.to_vec()).ok())
                    .flatten();
                (zero.id, proof)
            } else {
                shoal_artifact::VerifiedChunk::hash_keeping(bytes, keep)
            }
        })
        .collect()
}

/// How the chunker cuts a run of zeros: every chunk that starts with `max_size`
/// zeros is `len` bytes long (the cut of `max_size` zeros), with id `id`.
#[derive(Debug, Clone, Copy)]
struct ZeroRun {
    len: usize,
    id: ChunkId,
}

impl ZeroRun {
    fn of(chunking: Chunking) -> ZeroRun {
        let zeros = vec![0u8; chunking.max_size as usize];
        let len = fastcdc::v2020::FastCDC::new(
            &zeros,
            chunking.min_size as usize,
            chunking.avg_size as usize,
            chunking.max_size as usize,
        )
        .next()
        .map_or(zeros.len(), |c| c.length);
        ZeroRun {
            len,
            id: ChunkId::of(&zeros[..len]),
        }
    }
}

/// The position of the first non-zero byte of `bytes`, checked 256 bytes at a
/// time (the words of a block or-ed together: vectorised).
fn first_non_zero(bytes: &[u8]) -> Option<usize> {
    const STEP: usize = 256;
    let mut at = 0;
    while let Some(block) = bytes.get(at..at + STEP) {
        let words = block.chunks_exact(8).fold(0u64, |a, w| {
            a | u64::from_ne_bytes(w.try_into().unwrap_or([0; 8]))
        });
        if words != 0 {
            break;
        }
        at += STEP;
    }
    bytes[at..].iter().position(|&b| b != 0).map(|i| at + i)
}

/// Coalesced byte ranges `start..end`.
#[derive(Debug, Default)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn insert(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut start = start;
        let mut end = start + len;
        // Merge with a range that starts before and reaches `start`.
        if let Some((&s, &e)) = self.0.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
            self.0.remove(&s);
        }
        // And with every range that starts inside.
        while let Some((&s, &e)) = self.0.range(start..=end).next() {
            end = end.max(e);
            self.0.remove(&s);
        }
        self.0.insert(start, end);
    }
}

/// Bytes per piece of [`Verifier`]: a power of two, so each piece is a whole
/// subtree of the BLAKE3 tree (and one read of the slot).
pub const PIECE: u64 = 1024 * 1024;

/// Hashes the payload written into a slot as it becomes durable, on its own
/// thread: the driver reports each write ([`Verifier::wrote`]) and each completed
/// sync ([`Verifier::synced`]); every [`PIECE`] of the payload that is then wholly
/// written and synced is re-read from the slot and hashed while the install goes
/// on, in whatever order the pieces complete. BLAKE3 is a tree hash: each piece is
/// a subtree whose chaining value stands alone, and [`Verifier::finish`] reads the
/// pieces still missing and joins all of them into the root, which is exactly
/// `blake3::hash` of the payload as it is on the medium.
///
/// A piece written again after it was read (which the engine never does: it writes
/// each position once) is read again after the next sync.
pub struct Verifier {
    tx: Option<mpsc::Sender<u64>>,
    worker: Option<JoinHandle<io::Result<Vec<Option<ChainingValue>>>>>,
    len: u64,
    written: Ranges,
    /// Pieces handed to the thread since they were last written.
    sent: Vec<bool>,
}

type ChainingValue = blake3::hazmat::ChainingValue;

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("len", &self.len)
            .field("sent", &self.sent.iter().filter(|s| **s).count())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Starts hashing `storage` (the slot being written with a payload of `len`
    /// bytes) on its own thread. `durable` are ranges already written and synced
    /// (an interrupted install's journaled work).
    pub fn start(storage: Box<dyn Storage>, len: u64, durable: &[(u64, u64)]) -> Verifier {
        let pieces = usize::try_from(len.div_ceil(PIECE)).expect("piece count fits usize");
        let (tx, rx) = mpsc::channel::<u64>();
        let worker = std::thread::spawn(move || {
            use blake3::hazmat::HasherExt;
            let mut cvs: Vec<Option<ChainingValue>> = vec![None; pieces];
            let index = |p: u64| usize::try_from(p).expect("piece index fits usize");
            let fill = |piece: u64, block: &mut AlignedBlock| -> io::Result<()> {
                let start = piece * PIECE;
                let n = usize::try_from((len - start).min(PIECE)).unwrap_or(0);
                block.fill(&*storage, start, n)
            };
            let cv = |piece: u64, block: &AlignedBlock| {
                blake3::Hasher::new()
                    .set_input_offset(piece * PIECE)
                    .update(block.as_slice())
                    .finalize_non_root()
            };
            // Two blocks: while one piece is hashed (on another core), the next
            // waiting one is read into the other, so a verifier left behind by
            // fast writes (chunks taken from the running slot) catches up sooner.
            let mut blocks = [
                AlignedBlock::new(PIECE as usize),
                AlignedBlock::new(PIECE as usize),
            ];
            // A piece read and not hashed yet, and its block.
            let mut read: Option<(u64, usize)> = None;
            loop {
                // Each message is a piece to (re)read; the channel closes after
                // the last. With a piece in hand, only what already waits.
                let next = match read {
                    Some(_) => rx.try_recv().ok(),
                    None => match rx.recv() {
                        Ok(piece) => Some(piece),
                        Err(_) => break,
                    },
                };
                match (read.take(), next) {
                    (Some((piece, k)), Some(then)) => {
                        let [a, b] = &mut blocks;
                        let (hashed, reading) = if k == 0 { (a, b) } else { (b, a) };
                        let mut got = None;
                        let hashed = &*hashed;
                        let filled = rayon::in_place_scope(|scope| {
                            scope.spawn(|_| got = Some(cv(piece, hashed)));
                            fill(then, reading)
                        });
                        cvs[index(piece)] = got;
                        filled?;
                        read = Some((then, 1 - k));
                    }
                    (Some((piece, k)), None) => cvs[index(piece)] = Some(cv(piece, &blocks[k])),
                    (None, Some(piece)) => {
                        fill(piece, &mut blocks[0])?;
                        read = Some((piece, 0));
                    }
                    (None, None) => break,
                }
            }
            Ok(cvs)
        });
        let mut verifier = Verifier {
            tx: Some(tx),
            worker: Some(worker),
            len,
            written: Ranges::default(),
            sent: vec![false; pieces],
        };
        for &(offset, n) in durable {
            verifier.written.insert(offset, n);
        }
        verifier.synced();
        verifier
    }

    /// `n` bytes were written at `offset` (not yet durable).
    pub fn wrote(&mut self, offset: u64, n: u64) {
        if n == 0 {
            return;
        }
        self.written.insert(offset, n);
        let first = offset / PIECE;
        let last = (offset + n - 1) / PIECE;
        for piece in first..=last {
            if let Some(sent) = usize::try_from(piece)
                .ok()
                .and_then(|i| self.sent.get_mut(i))
            {
                *sent = false;
            }
        }
    }

    /// Every write reported so far is durable: hands every piece now wholly
    /// written to the thread.
    pub fn synced(&mut self) {
        let Some(tx) = &self.tx else { return };
        for (&start, &end) in &self.written.0 {
            let end = end.min(self.len);
            let mut piece = start.div_ceil(PIECE);
            while piece * PIECE < end && (piece * PIECE + PIECE).min(self.len) <= end {
                let i = usize::try_from(piece).expect("piece index fits usize");
                if !self.sent[i] && tx.send(piece).is_ok() {
                    self.sent[i] = true;
                }
                piece += 1;
            }
        }
    }

    /// Once every write is synced: reads the pieces not read yet and returns the
    /// BLAKE3 of the payload.
    pub fn finish(mut self) -> io::Result<[u8; 32]> {
        let tx = self.tx.take().expect("finish runs once");
        for (i, sent) in self.sent.iter().enumerate() {
            if !sent {
                // A closed channel means the thread stopped on a read error: join
                // says which.
                let _ = tx.send(i as u64);
            }
        }
        drop(tx);
        let cvs = self
            .worker
            .take()
            .expect("finish runs once")
            .join()
            .expect("the verifying thread panicked")?;
        let cvs: Vec<ChainingValue> = cvs
            .into_iter()
            .map(|cv| cv.expect("every piece was sent"))
            .collect();
        Ok(*root(&cvs, self.len).as_bytes())
    }
}

/// The BLAKE3 root of a payload of `len` bytes from the chaining values of its
/// [`PIECE`]s. A payload of one piece or less has no parent node: its root is
/// not a join, so it is hashed whole instead (see [`Verifier::finish`]).
fn root(cvs: &[ChainingValue], len: u64) -> blake3::Hash {
    use blake3::hazmat::{Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root};
    // The chaining value of the subtree of `len` bytes at `start`.
    fn subtree(cvs: &[ChainingValue], start: u64, len: u64) -> ChainingValue {
        if len <= PIECE {
            return cvs[usize::try_from(start / PIECE).expect("piece index fits usize")];
        }
        // A power of two of at least one piece: the split falls between pieces.
        let left = left_subtree_len(len);
        merge_subtrees_non_root(
            &subtree(cvs, start, left),
            &subtree(cvs, start + left, len - left),
            Mode::Hash,
        )
    }
    assert!(len > PIECE, "a single piece has no parent node");
    let left = left_subtree_len(len);
    merge_subtrees_root(
        &subtree(cvs, 0, left),
        &subtree(cvs, left, len - left),
        Mode::Hash,
    )
}

impl Drop for Verifier {
    fn drop(&mut self) {
        // Stop the thread after its current read (an install that failed or
        // stopped leaves it nothing more to do).
        self.tx.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Blocks a [`ReadAhead`] read lately, shared with another reader of the same
/// slot ([`Recent::copy`]), most recent last: the references of a delta install's
/// chunks lie in the running slot around the kept chunks copied from it, and the
/// engine keeps the copy at the stream's position (`Input::StreamAt`), so most of
/// them are in these blocks and need no read of their own. The reading thread
/// puts each block in as it is read and gives up the oldest before it reads the
/// next; the other reader copies out under the lock, holding no block.
#[derive(Clone, Default)]
pub struct Recent(std::sync::Arc<std::sync::Mutex<HeldBlocks>>);

/// Blocks held in [`Recent`]: (offset, bytes), oldest first.
type HeldBlocks = std::collections::VecDeque<(u64, std::sync::Arc<AlignedBlock>)>;

impl std::fmt::Debug for Recent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recent").finish_non_exhaustive()
    }
}

/// Blocks a [`ReadAhead`] keeps in [`Recent`] besides those in flight: the one
/// before the block being served (the references of delta-encoded chunks lie
/// around where the copy reads, before as often as after). Two cost 1 MiB more
/// for about the same reads (session 15).
pub const RECENT_BEHIND: usize = 1;

impl Recent {
    /// Walks the blocks held over `len` bytes at `offset`, handing `each` the
    /// offset of each piece and its bytes, in order; `false` at the first byte no
    /// block holds.
    fn walk(&self, offset: u64, len: u64, mut each: impl FnMut(u64, &[u8])) -> bool {
        let held = self.0.lock().expect("recent blocks");
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let Some((start, block)) = held
                .iter()
                .find(|(start, b)| *start <= at && at < start + b.as_slice().len() as u64)
            else {
                return false;
            };
            let bytes = block.as_slice();
            let to = end.min(start + bytes.len() as u64);
            each(at, &bytes[(at - start) as usize..(to - start) as usize]);
            at = to;
        }
        true
    }

    /// Whether the blocks held cover `len` bytes at `offset`.
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        self.walk(offset, len, |_, _| {})
    }

    /// Fills `buf` with the bytes at `offset` when the blocks held cover all of
    /// them; `false` (and `buf` unspecified) otherwise.
    pub fn copy(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.walk(offset, buf.len() as u64, |at, bytes| {
            let from = (at - offset) as usize;
            buf[from..from + bytes.len()].copy_from_slice(bytes);
        })
    }
}

/// How far past the block being served a read may land and still be reached by
/// reading on through the stream (rather than starting it again there).
const SKIP_MAX: u64 = 4 * 1024 * 1024;

/// A block read ahead: the generation of the stream it belongs to, its offset,
/// and the bytes (or why they could not be read).
type Ahead = (u64, u64, io::Result<std::sync::Arc<AlignedBlock>>);

/// Serves reads of the running slot from a stream of [`BLOCK`]s read ahead on
/// its own thread. The chunks an install reuses from the running slot are asked
/// for in payload order, which for two releases of one image is mostly the
/// slot's own order: the stream reads the slot front to back while the driver
/// writes, and a read that lands a little ahead is reached by reading on. A read
/// far ahead moves the stream there; one behind it is not served
/// ([`ReadAhead::read`] returns `None`) and the caller reads it on its own.
pub struct ReadAhead {
    seek: mpsc::Sender<(u64, u64)>,
    blocks: mpsc::Receiver<Ahead>,
    recycle: mpsc::Sender<AlignedBlock>,
    generation: u64,
    len: u64,
    /// The block being served: its offset and bytes.
    current: Option<(u64, std::sync::Arc<AlignedBlock>)>,
    recent: Recent,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAhead")
            .field("generation", &self.generation)
            .field("at", &self.current.as_ref().map(|(at, _)| *at))
            .finish_non_exhaustive()
    }
}

impl ReadAhead {
    /// Starts the reading thread over `0..len` of `storage` (idle until the first
    /// read).
    pub fn start(storage: Box<dyn Storage>, len: u64) -> ReadAhead {
        let (seek, seeks) = mpsc::channel::<(u64, u64)>();
        let (tx, blocks) = mpsc::sync_channel::<Ahead>(1);
        let (recycle, recycled) = mpsc::channel::<AlignedBlock>();
        let recent = Recent::default();
        let shared = recent.clone();
        let worker = std::thread::spawn(move || {
            let mut generation = 0;
            let mut at: Option<u64> = None;
            let mut pool = BlockPool {
                recycled,
                allocated: 0,
                capacity: BLOCK,
                head: 0,
                blocks: BLOCKS_IN_FLIGHT + RECENT_BEHIND,
            };
            loop {
                // A new position wins over reading on; with none to read on
                // from, wait for one.
                let next = match at {
                    Some(_) => match seeks.try_recv() {
                        Ok(seek) => Some(seek),
                        Err(mpsc::TryRecvError::Empty) => None,
                        Err(mpsc::TryRecvError::Disconnected) => return,
                    },
                    None => match seeks.recv() {
                        Ok(seek) => Some(seek),
                        Err(_) => return,
                    },
                };
                if let Some((g, offset)) = next {
                    generation = g;
                    at = Some(offset);
                }
                let Some(offset) = at.filter(|&o| o < len) else {
                    at = None;
                    continue;
                };
                // One block of the pool is not shared, so one comes back.
                let mut spare = None;
                {
                    let mut held = shared.0.lock().expect("recent blocks");
                    while held.len() >= BLOCKS_IN_FLIGHT + RECENT_BEHIND {
                        if let Some((_, old)) = held.pop_front()
                            && let Some(old) = std::sync::Arc::into_inner(old)
                            && spare.replace(old).is_some()
                        {
                            // Freed: the pool may make another.
                            pool.allocated -= 1;
                        }
                    }
                }
                let Some(mut block) = spare.or_else(|| pool.get()) else {
                    return;
                };
                let n = usize::try_from((len - offset).min(BLOCK as u64)).unwrap_or(BLOCK);
                let result = block.fill(&*storage, offset, n).map(|()| {
                    let block = std::sync::Arc::new(block);
                    let mut held = shared.0.lock().expect("recent blocks");
                    held.push_back((offset, std::sync::Arc::clone(&block)));
                    block
                });
                // After an error, wait for a new position.
                at = result.is_ok().then_some(offset + n as u64);
                if tx.send((generation, offset, result)).is_err() {
                    return;
                }
            }
        });
        ReadAhead {
            seek,
            blocks,
            recycle,
            generation: 0,
            len,
            current: None,
            recent,
            worker: Some(worker),
        }
    }

    /// The blocks read lately, for another reader of the slot.
    pub fn recent(&self) -> Recent {
        self.recent.clone()
    }

    fn give_back(&self, block: std::sync::Arc<AlignedBlock>) {
        if let Some(block) = std::sync::Arc::into_inner(block) {
            let _ = self.recycle.send(block);
        }
    }

    /// `len` bytes at `offset`, or `None` when that is behind the stream.
    pub fn read(&mut self, offset: u64, len: usize) -> io::Result<Option<Vec<u8>>> {
        let end = offset + len as u64;
        if end > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {len} bytes at {offset} is past the slot's {} bytes",
                    self.len
                ),
            ));
        }
        let mut out = Vec::with_capacity(len);
        loop {
            let at = offset + out.len() as u64;
            if at == end {
                return Ok(Some(out));
            }
            match &self.current {
                Some((start, block)) if *start <= at => {
                    let block_end = start + block.as_slice().len() as u64;
                    if at < block_end {
                        let from = usize::try_from(at - start).expect("inside the block");
                        let to =
                            usize::try_from(end.min(block_end) - start).expect("inside the block");
                        out.extend_from_slice(&block.as_slice()[from..to]);
                        continue;
                    }
                    if at - block_end < SKIP_MAX || !out.is_empty() {
                        self.next_block()?;
                    } else {
                        self.restart(at)?;
                    }
                }
                // Behind the stream (only the start of a read can be).
                Some(_) => return Ok(None),
                None => self.restart(at)?,
            }
        }
    }

    /// Moves the stream to the aligned block around `offset`.
    fn restart(&mut self, offset: u64) -> io::Result<()> {
        if let Some((_, block)) = self.current.take() {
            self.give_back(block);
        }
        self.generation += 1;
        let start = offset - offset % ALIGN as u64;
        self.seek
            .send((self.generation, start))
            .map_err(|_| io::Error::other("the slot reading thread stopped"))?;
        self.next_block()
    }

    /// Replaces the current block with the next one of this generation.
    fn next_block(&mut self) -> io::Result<()> {
        if let Some((_, block)) = self.current.take() {
            self.give_back(block);
        }
        loop {
            let (generation, offset, result) = self
                .blocks
                .recv()
                .map_err(|_| io::Error::other("the slot reading thread stopped"))?;
            if generation != self.generation {
                if let Ok(block) = result {
                    self.give_back(block);
                }
                continue;
            }
            self.current = Some((offset, result?));
            return Ok(());
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Closing both ends stops the thread after its current read.
        let (seek, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.seek, seek));
        let (_, blocks) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.blocks, blocks));
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_bootctl::storage::FileStorage;

    /// Incompressible bytes: content-defined cuts everywhere.
    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        crate::device::crash_tests::bytes(seed, len)
    }

    fn file_with(data: &[u8]) -> (tempfile::TempDir, Box<dyn Storage>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot");
        std::fs::write(&path, data).unwrap();
        let storage = FileStorage::open(&path, true).unwrap();
        (dir, Box::new(storage))
    }

    /// The blocks a [`ReadAhead`] read serve another reader of the slot
    /// ([`Recent::copy`]): a range inside them, across two of them, and not one
    /// that lies partly outside; no more than `BLOCKS_IN_FLIGHT + RECENT_BEHIND`
    /// are held, the oldest given up first.
    #[test]
    fn blocks_read_ahead_serve_another_reader_of_the_slot() {
        let len = 12 * BLOCK;
        let data = pattern(len, 7);
        let (_dir, storage) = file_with(&data);
        let mut ahead = ReadAhead::start(storage, len as u64);
        let recent = ahead.recent();
        let mut buf = vec![0u8; 1000];
        assert!(!recent.copy(0, &mut buf), "nothing read yet");
        // Read the slot's first 5 MiB in chunks, as the copy of kept chunks does.
        for at in (0..5 * BLOCK).step_by(64 * 1024) {
            let got = ahead.read(at as u64, 64 * 1024).unwrap().expect("ahead");
            assert_eq!(got, data[at..at + 64 * 1024]);
        }
        // Inside the block being served, and across it and the one before (kept
        // until the block after the next is read, which waits for the copy).
        let mut inside = vec![0u8; 300_000];
        assert!(recent.copy(4 * BLOCK as u64 + 10, &mut inside));
        assert_eq!(inside, data[4 * BLOCK + 10..4 * BLOCK + 300_010]);
        let mut across = vec![0u8; 200_000];
        let at = 4 * BLOCK - 100_000;
        assert!(recent.copy(at as u64, &mut across));
        assert_eq!(across, data[at..at + 200_000]);
        // The first block was given up, and the ones after 7 MiB are not read yet:
        // a range partly in them is not served.
        assert!(!recent.copy(0, &mut buf));
        let mut past = vec![0u8; 4 * BLOCK];
        assert!(!recent.copy(4 * BLOCK as u64, &mut past));
        let held = recent.0.lock().unwrap().len();
        assert!(
            held <= BLOCKS_IN_FLIGHT + RECENT_BEHIND,
            "{held} blocks held"
        );
    }

    /// Stretches of zeros are cut without the chunker (a zero run's cut, found
    /// once) and their chunks not hashed again: the index is still exactly the
    /// chunker's, for runs shorter and longer than `max_size`, a run ending one
    /// byte short of it, runs broken by single bytes, runs across block
    /// boundaries, and a slot that is zeros to its end (the last chunk short).
    #[test]
    fn index_of_zero_runs_is_exactly_the_chunkers() {
        let mut data = pattern(5 * BLOCK + 4_321, 11);
        let max = shoal_artifact::chunk::CHUNKING_FAST.max_size as usize;
        data[1_000..1_000 + max - 1].fill(0);
        data[200_000..200_000 + 3 * max + 17].fill(0);
        data[BLOCK - 70_000..2 * BLOCK + 50_000].fill(0);
        for k in (BLOCK + 1_000..2 * BLOCK).step_by(40_000) {
            data[k] = 1;
        }
        data[2 * BLOCK + 100_000..3 * BLOCK + 12].fill(0);
        data[3 * BLOCK + 300_000] = 0;
        data[4 * BLOCK - 5..].fill(0);
        let (_dir, storage) = file_with(&data);
        for chunking in [
            shoal_artifact::chunk::CHUNKING_DEFAULT,
            shoal_artifact::chunk::CHUNKING_FAST,
        ] {
            let expected = shoal_artifact::chunk::index(&data[..], chunking).unwrap();
            let zero = ZeroRun::of(chunking);
            assert!(
                expected.iter().filter(|c| c.1 == zero.id).count() >= 4,
                "{chunking:?}: zero chunks"
            );
            let got = list_chunks(&*storage, data.len() as u64, chunking, Repeats::Listed).unwrap();
            assert_eq!(got, expected, "{chunking:?}");
        }
        assert_eq!(first_non_zero(&[0; 200]), None);
        for k in [0, 63, 64, 130, 199] {
            let mut b = [0u8; 200];
            b[k] = 9;
            b[199] = 1;
            assert_eq!(first_non_zero(&b), Some(k));
        }
    }

    /// A window cut in two halves ([`cut`]) gives the cut made from its start
    /// alone, at every length around the split threshold and the middle, with and
    /// without the end of the payload, on data with zero runs and without.
    #[test]
    fn a_window_cut_in_halves_is_cut_as_a_whole() {
        let mut data = pattern(3 * BLOCK, 5);
        data[BLOCK..BLOCK + 300_000].fill(0);
        for chunking in [
            shoal_artifact::chunk::CHUNKING_DEFAULT,
            shoal_artifact::chunk::CHUNKING_FAST,
        ] {
            let zero = ZeroRun::of(chunking);
            let max = chunking.max_size as usize;
            let lens = [
                SPLIT_MIN * max - 1,
                SPLIT_MIN * max,
                BLOCK + 12_345,
                3 * BLOCK,
            ];
            for (k, &len) in lens.iter().enumerate() {
                for from in [0, BLOCK - 70_000] {
                    let window = &data[from..from + len.min(data.len() - from)];
                    for end in [false, true] {
                        let mut whole = chain(window, 0, chunking, &zero, &[]).0;
                        if !end
                            && let Some(&(s, l)) = whole.last()
                            && s + l == window.len()
                            && l < max
                        {
                            whole.pop();
                        }
                        assert_eq!(cut(window, chunking, &zero, end), whole, "{k} {from} {end}");
                    }
                }
            }
        }
    }

    #[test]
    fn index_cuts_exactly_as_the_streaming_chunker() {
        // Several blocks, an unaligned end, and a run of zeros (max-size cuts that
        // land on block boundaries).
        let mut data = pattern(3 * BLOCK + 12_345, 7);
        data[BLOCK - 100_000..BLOCK + 300_000].fill(0);
        let (_dir, storage) = file_with(&data);
        for chunking in [
            shoal_artifact::chunk::CHUNKING_DEFAULT,
            shoal_artifact::chunk::CHUNKING_FAST,
        ] {
            let expected = shoal_artifact::chunk::index(&data[..], chunking).unwrap();
            let got = list_chunks(&*storage, data.len() as u64, chunking, Repeats::Listed).unwrap();
            assert_eq!(got.len(), expected.len(), "{chunking:?}");
            assert_eq!(got, expected, "{chunking:?}");
        }
        // A prefix of the storage, ending mid-block.
        let len = BLOCK + 777;
        let expected =
            shoal_artifact::chunk::index(&data[..len], shoal_artifact::chunk::CHUNKING_DEFAULT)
                .unwrap();
        let got = list_chunks(
            &*storage,
            len as u64,
            shoal_artifact::chunk::CHUNKING_DEFAULT,
            Repeats::Listed,
        )
        .unwrap();
        assert_eq!(got, expected);
        assert!(
            list_chunks(
                &*storage,
                0,
                shoal_artifact::chunk::CHUNKING_DEFAULT,
                Repeats::Listed
            )
            .unwrap()
            .is_empty()
        );
    }

    /// Issue 10 (memory at 8 GiB): the install's cut lists a run of one chunk
    /// repeated back to back once, at its first position (a sparse slot's zeros
    /// are one entry, not 6 MiB of them); every other chunk stays, in slot order.
    #[test]
    fn index_once_lists_a_repeated_run_once_at_its_first_position() {
        let mut data = pattern(3 * BLOCK, 9);
        data[BLOCK / 2..BLOCK / 2 + 2 * BLOCK].fill(0);
        let (_dir, storage) = file_with(&data);
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let all = shoal_artifact::chunk::index(&data[..], chunking).unwrap();
        let mut expected = all.clone();
        expected.dedup_by_key(|c| c.1);
        assert!(
            all.len() > expected.len() + 4,
            "the zeros are a run: {} {}",
            all.len(),
            expected.len()
        );
        let got = list_chunks(&*storage, data.len() as u64, chunking, Repeats::Once).unwrap();
        assert_eq!(got, expected);
    }

    /// Issue 12 (install wall time): along a known chunk list, the index lists
    /// exactly what the content cut lists when the slot holds that list's
    /// release (a run of zeros once), past a block boundary and with the slot
    /// longer than the release (the rest cut by content).
    #[test]
    fn index_along_the_release_it_holds_lists_what_the_content_cut_lists() {
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let mut data = pattern(3 * BLOCK + 4_321, 11);
        data[BLOCK / 2..BLOCK / 2 + BLOCK].fill(0);
        let payload = 2 * BLOCK + 99_999;
        let release = shoal_artifact::chunk::index(&data[..payload], chunking).unwrap();
        let sizes: Vec<u32> = release.iter().map(|c| c.2).collect();
        let (_dir, storage) = file_with(&data);
        // The slot holds the release and no more.
        let got = index_along(
            &*storage,
            payload as u64,
            chunking,
            &sizes,
            &|_| false,
            None,
            None,
        )
        .unwrap();
        let mut expected = release.clone();
        expected.dedup_by_key(|c| c.1);
        assert_eq!(got, expected);
        // A longer slot: the release's chunks, then the rest cut by content from
        // where the release ends.
        let got = index_along(
            &*storage,
            data.len() as u64,
            chunking,
            &sizes,
            &|_| false,
            None,
            None,
        )
        .unwrap();
        let mut expected = release;
        expected.extend(
            shoal_artifact::chunk::index(&data[payload..], chunking)
                .unwrap()
                .into_iter()
                .map(|(o, id, n)| (o + payload as u64, id, n)),
        );
        expected.dedup_by_key(|c| c.1);
        assert_eq!(got, expected);
    }

    /// The known lengths decide the cut points (no content-defined chunker runs
    /// over them): lengths FastCDC would never cut at are listed as given, each
    /// with the hash of the bytes that lie there.
    #[test]
    fn index_along_cuts_where_the_known_lengths_say_and_hashes_what_lies_there() {
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let data = pattern(2 * BLOCK + 10_000, 12);
        let (_dir, storage) = file_with(&data);
        let min = chunking.min_size;
        let sizes = vec![min, min + 1, chunking.max_size, min + 4_093, min];
        let covered: u64 = sizes.iter().map(|&n| u64::from(n)).sum();
        let got =
            index_along(&*storage, covered, chunking, &sizes, &|_| false, None, None).unwrap();
        let mut at = 0usize;
        let expected: Vec<(u64, ChunkId, u32)> = sizes
            .iter()
            .map(|&n| {
                let c = (at as u64, ChunkId::of(&data[at..at + n as usize]), n);
                at += n as usize;
                c
            })
            .collect();
        assert_eq!(got, expected);
        assert_ne!(
            got,
            list_chunks(&*storage, covered, chunking, Repeats::Listed).unwrap(),
            "the content cut differs here"
        );
    }

    #[test]
    fn index_hands_over_each_wanted_chunk_once_with_its_bytes() {
        // A repeated stretch: some chunks occur twice.
        let mut data = pattern(2 * BLOCK, 23);
        let copy = data[100_000..400_000].to_vec();
        data.extend_from_slice(&copy);
        let (_dir, storage) = file_with(&data);
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let all = shoal_artifact::chunk::index(&data[..], chunking).unwrap();
        // Every third chunk is wanted, and an id the slot does not hold.
        let mut wanted: HashSet<ChunkId> = all.iter().step_by(3).map(|c| c.1).collect();
        wanted.insert(ChunkId::of(b"elsewhere"));
        let (tx, rx) = mpsc::sync_channel(4);
        let stop = AtomicBool::new(false);
        let (got, cuts) = std::thread::scope(|scope| {
            let receiver = scope.spawn(move || {
                let (mut chunks, mut cuts) = (Vec::new(), Vec::new());
                for met in rx {
                    match met {
                        Met::Chunk(c) => chunks.push(c),
                        Met::Cut(n) => cuts.push(n),
                    }
                }
                (chunks, cuts)
            });
            let index = index(
                &*storage,
                data.len() as u64,
                chunking,
                &|id| wanted.contains(id),
                Some(&Handover {
                    tx: &tx,
                    stop: &stop,
                }),
                None,
                Repeats::Listed,
            )
            .unwrap();
            drop(tx);
            assert_eq!(index, all);
            receiver.join().unwrap()
        });
        // How far the cut is, after each block, at the end of a chunk, to the end.
        assert!(cuts.len() >= 2, "{cuts:?}");
        assert!(cuts.windows(2).all(|w| w[0] < w[1]), "{cuts:?}");
        let ends: HashSet<u64> = all.iter().map(|c| c.0 + u64::from(c.2)).collect();
        assert!(cuts.iter().all(|n| ends.contains(n)), "{cuts:?}");
        assert_eq!(cuts.last(), Some(&(data.len() as u64)));
        let ids: HashSet<ChunkId> = got.iter().map(|c| c.chunk().id).collect();
        assert_eq!(ids.len(), got.len(), "each chunk once");
        wanted.remove(&ChunkId::of(b"elsewhere"));
        assert_eq!(ids, wanted);
        for c in &got {
            assert_eq!(ChunkId::of(c.data()), c.chunk().id);
        }
        // A receiver that went away stops the sending, not the index.
        let (tx, rx) = mpsc::sync_channel(1);
        drop(rx);
        let index = index(
            &*storage,
            data.len() as u64,
            chunking,
            &|id| wanted.contains(id),
            Some(&Handover {
                tx: &tx,
                stop: &stop,
            }),
            None,
            Repeats::Listed,
        )
        .unwrap();
        assert_eq!(index, all);
    }

    /// A cut from a block boundary (a resumed cut) reads the slot from there
    /// only, lists the chunks at their offsets in the slot, and, cut as though a
    /// chunk started there, meets the whole slot's chunk starts within a few
    /// chunks (at most 4): from then on it is the whole cut (so the chunks it hands
    /// over are where the slot holds them).
    #[test]
    fn a_cut_from_a_block_boundary_joins_the_whole_cut() {
        let data = pattern(4 * BLOCK, 11);
        let (_dir, storage) = file_with(&data);
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let len = data.len() as u64;
        let from = BLOCK as u64;
        let whole = list_chunks(&*storage, len, chunking, Repeats::Listed).unwrap();
        let watched = Watched {
            inner: storage,
            lowest: std::sync::atomic::AtomicU64::new(u64::MAX),
        };
        let (part, count) = index_with(
            &watched,
            from,
            len,
            chunking,
            &[],
            &|_| false,
            None,
            None,
            (false, true),
        )
        .unwrap();
        assert_eq!(watched.lowest.load(Ordering::Relaxed), from);
        assert_eq!(count, part.len() as u64);
        assert_eq!(part[0].0, from);
        let meet = part
            .iter()
            .position(|c| whole.contains(c))
            .expect("the cuts meet");
        assert!(meet <= 4, "met after {meet} chunks");
        let k = whole.iter().position(|c| *c == part[meet]).expect("listed");
        assert_eq!(&part[meet..], &whole[k..]);
        for (at, id, n) in &part {
            let bytes = &data[*at as usize..*at as usize + *n as usize];
            assert_eq!(*id, ChunkId::of(bytes), "the chunk at {at}");
        }
    }

    /// Two chunks of the running slot swapped in place (one before a block
    /// boundary, one after; their lengths differ, so what lies between them moves
    /// too) are not found by its content cut: FastCDC (the `fastcdc` crate's
    /// 2020 cut, as the artifact builder cuts) decides a cut point at offset `p`
    /// from a hash that takes in the byte at `p`, the first byte of the next
    /// chunk, so the chunk before a moved one ends elsewhere and runs into it. The
    /// cut joins the old one again within a few chunks of each edit: only the
    /// chunks next to them are lost. Changing only the first byte after a chunk
    /// loses that chunk (its own bytes unchanged), which is the reason.
    #[test]
    fn chunks_swapped_in_place_are_lost_as_a_cut_depends_on_the_byte_after_it() {
        let data = pattern(3 * BLOCK, 21);
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let cut = |data: &[u8]| {
            let (_dir, storage) = file_with(data);
            list_chunks(&*storage, data.len() as u64, chunking, Repeats::Listed).unwrap()
        };
        let base = cut(&data);
        let span = |c: &(u64, ChunkId, u32)| c.0 as usize..c.0 as usize + c.2 as usize;
        let i = 2;
        let j = base
            .iter()
            .position(|c| c.0 > BLOCK as u64 && c.2 != base[i].2)
            .expect("a chunk past the first block");
        let (a, b) = (base[i], base[j]);
        let mut swapped = data[..span(&a).start].to_vec();
        swapped.extend_from_slice(&data[span(&b)]);
        swapped.extend_from_slice(&data[span(&a).end..span(&b).start]);
        swapped.extend_from_slice(&data[span(&a)]);
        swapped.extend_from_slice(&data[span(&b).end..]);
        assert_eq!(swapped.len(), data.len());
        let ids: HashSet<ChunkId> = cut(&swapped).iter().map(|c| c.1).collect();
        assert!(
            !ids.contains(&a.1) && !ids.contains(&b.1),
            "a swapped chunk was found"
        );
        let lost = base.iter().filter(|c| !ids.contains(&c.1)).count();
        assert!(lost <= 8, "{lost} of {} chunks lost", base.len());
        // The chunk before `a`, its bytes unchanged, is lost when only the byte
        // after it (the first of `a`) changes.
        let before = base[i - 1];
        let mut edited = data.clone();
        edited[span(&a).start] ^= 0x5a;
        let ids: HashSet<ChunkId> = cut(&edited).iter().map(|c| c.1).collect();
        assert!(
            !ids.contains(&before.1),
            "the chunk before the edit was found"
        );
    }

    /// The counting cut (a resumed cut of the running slot) counts what the
    /// listing one lists (a run of zeros once) and hands over the same chunks,
    /// holding no list.
    #[test]
    fn count_cut_counts_what_the_index_lists_and_hands_over_the_same() {
        let mut data = pattern(3 * BLOCK + 12_345, 5);
        data[BLOCK / 2..BLOCK / 2 + BLOCK].fill(0);
        let (_dir, storage) = file_with(&data);
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let len = data.len() as u64;
        let listed = list_chunks(&*storage, len, chunking, Repeats::Once).unwrap();
        let wanted: HashSet<ChunkId> = listed.iter().step_by(3).map(|c| c.1).collect();
        let stop = AtomicBool::new(false);
        let cut = |count: bool| {
            let (tx, rx) = mpsc::sync_channel(4);
            std::thread::scope(|s| {
                let receiver = s.spawn(move || {
                    let mut ids = Vec::new();
                    for m in rx {
                        if let Met::Chunk(c) = m {
                            ids.push(c.chunk().id);
                        }
                    }
                    ids
                });
                let over = Handover {
                    tx: &tx,
                    stop: &stop,
                };
                let n = if count {
                    count_cut(
                        &*storage,
                        0,
                        len,
                        chunking,
                        &|id| wanted.contains(id),
                        Some(&over),
                    )
                    .unwrap()
                } else {
                    index(
                        &*storage,
                        len,
                        chunking,
                        &|id| wanted.contains(id),
                        Some(&over),
                        None,
                        Repeats::Once,
                    )
                    .unwrap()
                    .len() as u64
                };
                drop(tx);
                (n, receiver.join().unwrap())
            })
        };
        let (counted, counted_ids) = cut(true);
        let (n, ids) = cut(false);
        assert_eq!(counted, listed.len() as u64);
        assert_eq!(n, counted);
        assert_eq!(counted_ids, ids);
        assert_eq!(counted_ids.len(), wanted.len());
    }

    /// A storage that records the lowest offset read.
    #[derive(Debug)]
    struct Watched {
        inner: Box<dyn Storage>,
        lowest: std::sync::atomic::AtomicU64,
    }

    impl Storage for Watched {
        forward_storage!();
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.lowest.fetch_min(offset, Ordering::Relaxed);
            self.inner.read_at(offset, buf)
        }
    }

    /// A storage whose reads past `fail_at` fail, having waited for `stop` (up
    /// to 10 s) if `wait`: a read error the reader meets after the cut was
    /// stopped.
    #[derive(Debug)]
    struct FailingPast<'a> {
        inner: Box<dyn Storage>,
        fail_at: u64,
        stop: &'a AtomicBool,
        wait: bool,
    }

    impl Storage for FailingPast<'_> {
        forward_storage!();
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            if offset + buf.len() as u64 > self.fail_at {
                let start = std::time::Instant::now();
                while self.wait
                    && !self.stop.load(Ordering::Acquire)
                    && start.elapsed() < std::time::Duration::from_secs(10)
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                return Err(io::Error::other("injected read error"));
            }
            self.inner.read_at(offset, buf)
        }
    }

    /// A read error is not the end of the slot: the cut hands over no position it
    /// did not reach (no last chunk cut where the reads ended).
    #[test]
    fn a_read_error_is_not_the_end_of_the_slot() {
        let data = pattern(8 * BLOCK, 47);
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let all = shoal_artifact::chunk::index(&data[..], chunking).unwrap();
        let ends: HashSet<u64> = all.iter().map(|c| c.0 + u64::from(c.2)).collect();
        let (_dir, inner) = file_with(&data);
        let stop = AtomicBool::new(false);
        let storage = FailingPast {
            inner,
            fail_at: 3 * BLOCK as u64,
            stop: &stop,
            wait: false,
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let (got, cuts) = std::thread::scope(|scope| {
            let receiver = scope.spawn(move || {
                rx.into_iter()
                    .filter_map(|met| match met {
                        Met::Cut(n) => Some(n),
                        Met::Chunk(_) => None,
                    })
                    .collect::<Vec<u64>>()
            });
            let got = index(
                &storage,
                data.len() as u64,
                chunking,
                &|_| false,
                Some(&Handover {
                    tx: &tx,
                    stop: &stop,
                }),
                None,
                Repeats::Listed,
            );
            drop(tx);
            (got, receiver.join().unwrap())
        });
        assert_eq!(got.unwrap_err().to_string(), "injected read error");
        assert!(!cuts.is_empty());
        for n in cuts {
            assert!(
                n < 3 * BLOCK as u64 && ends.contains(&n),
                "cut {n}: not a chunk's end"
            );
        }
    }

    /// A read that fails after the receiver stopped the cut (the reader runs a
    /// few blocks ahead) does not fail the cut: it returns what it cut before.
    /// A read that fails with no stop is an error.
    #[test]
    fn a_read_error_after_the_stop_is_not_an_error_of_the_cut() {
        let data = pattern(8 * BLOCK, 43);
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let all = shoal_artifact::chunk::index(&data[..], chunking).unwrap();
        for stops in [true, false] {
            let (_dir, inner) = file_with(&data);
            let stop = AtomicBool::new(false);
            let storage = FailingPast {
                inner,
                fail_at: 2 * BLOCK as u64,
                stop: &stop,
                wait: stops,
            };
            let (tx, rx) = mpsc::sync_channel(1);
            let got = std::thread::scope(|scope| {
                let stop = &stop;
                scope.spawn(move || {
                    for met in rx {
                        if stops && matches!(met, Met::Cut(_)) {
                            stop.store(true, Ordering::Release);
                        }
                    }
                });
                let got = index(
                    &storage,
                    data.len() as u64,
                    chunking,
                    &|_| false,
                    Some(&Handover { tx: &tx, stop }),
                    None,
                    Repeats::Listed,
                );
                drop(tx);
                got
            });
            if stops {
                let got = got.expect("a read error after the stop is not the cut's");
                assert!(!got.is_empty() && got.len() < all.len(), "{}", got.len());
                assert_eq!(got[..], all[..got.len()], "a prefix of the whole index");
            } else {
                let e = got.expect_err("a read error with no stop fails the cut");
                assert_eq!(e.to_string(), "injected read error");
            }
        }
    }

    /// The stop flag, set by the receiver, ends the cut at its next block: it
    /// returns the chunks cut before (a prefix of the whole index) and reads no
    /// further than a few blocks past where it was told to stop.
    #[test]
    fn index_stops_at_the_next_block_when_told() {
        let data = pattern(8 * BLOCK, 41);
        let (_dir, storage) = file_with(&data);
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let all = shoal_artifact::chunk::index(&data[..], chunking).unwrap();
        let (tx, rx) = mpsc::sync_channel(1);
        let stop = AtomicBool::new(false);
        let (got, told_at) = std::thread::scope(|scope| {
            let stop = &stop;
            let receiver = scope.spawn(move || {
                let mut told_at = None;
                for met in rx {
                    if let Met::Cut(n) = met
                        && n >= 2 * BLOCK as u64
                        && told_at.is_none()
                    {
                        stop.store(true, Ordering::Release);
                        told_at = Some(n);
                    }
                }
                told_at
            });
            let got = index(
                &*storage,
                data.len() as u64,
                chunking,
                &|_| false,
                Some(&Handover { tx: &tx, stop }),
                None,
                Repeats::Listed,
            )
            .unwrap();
            drop(tx);
            (got, receiver.join().unwrap())
        });
        let told_at = told_at.expect("told how far the cut is");
        let end = got.last().map(|c| c.0 + u64::from(c.2)).unwrap();
        assert!(end >= told_at, "stopped at {end}, told at {told_at}");
        assert!(
            end < told_at + 3 * BLOCK as u64,
            "stopped at {end}, told at {told_at}"
        );
        assert!(end < data.len() as u64);
        assert_eq!(got[..], all[..got.len()], "a prefix of the whole index");
    }

    /// #11: given a pool, the cutting and hashing run in it (the chunks are handed
    /// over from its thread), and the same index comes out; rayon's global pool is
    /// not used (its threads would outlive an idle-time cut).
    #[test]
    fn index_in_a_pool_cuts_and_hashes_there() {
        let data = pattern(2 * BLOCK + 5_000, 31);
        let (_dir, storage) = file_with(&data);
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let in_pool = std::sync::atomic::AtomicUsize::new(0);
        let outside = std::sync::atomic::AtomicUsize::new(0);
        let (tx, rx) = mpsc::sync_channel(1);
        let stop = AtomicBool::new(false);
        let got = std::thread::scope(|scope| {
            scope.spawn(move || rx.iter().count());
            let got = index(
                &*storage,
                data.len() as u64,
                chunking,
                &|_| {
                    let n = if pool.current_thread_index().is_some() {
                        &in_pool
                    } else {
                        &outside
                    };
                    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    true
                },
                Some(&Handover {
                    tx: &tx,
                    stop: &stop,
                }),
                Some(&pool),
                Repeats::Listed,
            )
            .unwrap();
            drop(tx);
            got
        });
        assert_eq!(
            got,
            shoal_artifact::chunk::index(&data[..], chunking).unwrap()
        );
        assert_eq!(
            outside.into_inner(),
            0,
            "chunks handed over outside the pool"
        );
        assert_eq!(
            in_pool.into_inner(),
            got.len(),
            "each chunk handed over in the pool"
        );
    }

    #[test]
    fn hash_reads_the_prefix_and_reports_a_short_storage() {
        let data = pattern(2 * BLOCK + 5, 3);
        let (_dir, storage) = file_with(&data);
        let len = data.len() as u64 - 1;
        assert_eq!(
            hash(&*storage, len).unwrap(),
            *blake3::hash(&data[..data.len() - 1]).as_bytes()
        );
        let err = hash(&*storage, data.len() as u64 + 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn ranges_coalesce() {
        let mut r = Ranges::default();
        let ranges = |r: &Ranges| r.0.iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>();
        r.insert(10, 5);
        r.insert(20, 5);
        r.insert(0, 3);
        assert_eq!(ranges(&r), [(0, 3), (10, 15), (20, 25)]);
        r.insert(3, 7);
        assert_eq!(ranges(&r), [(0, 15), (20, 25)]);
        r.insert(15, 5);
        assert_eq!(ranges(&r), [(0, 25)]);
        r.insert(30, 0);
        r.insert(5, 100);
        assert_eq!(ranges(&r), [(0, 105)]);
    }

    #[test]
    fn the_root_of_piece_hashes_is_the_blake3_of_the_payload() {
        use blake3::hazmat::HasherExt;
        let data = pattern(7 * PIECE as usize + 3000, 13);
        // Sizes around piece and power-of-two boundaries.
        for len in [
            PIECE + 1,
            2 * PIECE,
            2 * PIECE + 1,
            3 * PIECE - 1,
            4 * PIECE,
            5 * PIECE + 17,
            data.len() as u64,
        ] {
            let cvs: Vec<ChainingValue> = (0..len.div_ceil(PIECE))
                .map(|p| {
                    let start = p * PIECE;
                    let end = (start + PIECE).min(len);
                    blake3::Hasher::new()
                        .set_input_offset(start)
                        .update(&data[start as usize..end as usize])
                        .finalize_non_root()
                })
                .collect();
            assert_eq!(
                root(&cvs, len),
                blake3::hash(&data[..len as usize]),
                "len {len}"
            );
        }
    }

    /// A slot file of `len` zero bytes, a writer and a reader of it.
    fn slot(len: usize) -> (tempfile::TempDir, FileStorage, Box<dyn Storage>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot");
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let writer = FileStorage::open(&path, true).unwrap();
        let reader = Box::new(FileStorage::open(&path, false).unwrap());
        (dir, writer, reader)
    }

    #[test]
    fn verifier_hashes_pieces_as_they_become_durable_in_any_order() {
        let data = pattern(5 * PIECE as usize + 999, 11);
        let len = data.len() as u64;
        let (_dir, mut writer, reader) = slot(data.len());
        // The first 1000 bytes were journaled by an earlier run.
        writer.write_at(0, &data[..1000]).unwrap();
        writer.sync().unwrap();
        let mut v = Verifier::start(reader, len, &[(0, 1000)]);
        assert!(v.sent.iter().all(|s| !s), "no whole piece yet");
        // The second half first (its pieces are read before the first half is
        // written), then the first half.
        let half = 2 * PIECE as usize + 4321;
        writer.write_at(half as u64, &data[half..]).unwrap();
        v.wrote(half as u64, len - half as u64);
        assert!(v.sent.iter().all(|s| !s), "nothing is read before a sync");
        writer.sync().unwrap();
        v.synced();
        assert_eq!(v.sent, [false, false, false, true, true, true]);
        writer.write_at(1000, &data[1000..half]).unwrap();
        v.wrote(1000, (half - 1000) as u64);
        writer.sync().unwrap();
        v.synced();
        assert!(v.sent.iter().all(|s| *s));
        assert_eq!(v.finish().unwrap(), *blake3::hash(&data).as_bytes());
    }

    #[test]
    fn verifier_rereads_a_piece_written_again_and_reads_unsent_pieces_at_the_end() {
        let data = pattern(3 * PIECE as usize, 5);
        let len = data.len() as u64;
        let (_dir, mut writer, reader) = slot(data.len());
        let mut garbage = data.clone();
        garbage[PIECE as usize + 10] ^= 0xff;
        writer.write_at(0, &garbage).unwrap();
        writer.sync().unwrap();
        let mut v = Verifier::start(reader, len, &[(0, len)]);
        assert!(v.sent.iter().all(|s| *s));
        // The bad byte is overwritten: its piece must be read again.
        writer
            .write_at(PIECE + 10, &data[PIECE as usize + 10..PIECE as usize + 11])
            .unwrap();
        v.wrote(PIECE + 10, 1);
        assert_eq!(v.sent, [true, false, true]);
        writer.sync().unwrap();
        // `finish` without `synced`: the unsent piece is read at the end.
        assert_eq!(v.finish().unwrap(), *blake3::hash(&data).as_bytes());
    }

    #[test]
    fn verifier_reports_a_read_error() {
        let (_dir, _writer, reader) = slot(1000);
        // The payload claims more than the slot holds.
        let v = Verifier::start(reader, 3 * PIECE, &[]);
        let err = v.finish().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn read_ahead_serves_forward_reads_across_blocks_and_declines_reads_behind() {
        let data = pattern(6 * BLOCK + 777, 17);
        let len = data.len() as u64;
        let (_dir, storage) = file_with(&data);
        let mut ra = ReadAhead::start(storage, len);
        let check = |ra: &mut ReadAhead, offset: usize, n: usize| {
            let got = ra.read(offset as u64, n).unwrap();
            assert!(
                got.as_deref() == Some(&data[offset..offset + n]),
                "read of {n} at {offset}"
            );
        };
        check(&mut ra, 5000, 100);
        // Straddling a block boundary.
        check(&mut ra, BLOCK - 10, 64 * 1024);
        // A little ahead: read on.
        check(&mut ra, 2 * BLOCK + 3, 10);
        // Far ahead: the stream moves.
        check(&mut ra, 5 * BLOCK + 100, 1000);
        // The very end.
        check(&mut ra, data.len() - 777, 777);
        // Behind the stream: not served.
        assert_eq!(ra.read(BLOCK as u64, 10).unwrap(), None);
        assert_eq!(ra.read(0, 0).unwrap(), Some(Vec::new()));
        let err = ra.read(data.len() as u64 - 5, 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn read_ahead_reports_a_read_past_the_storage() {
        let data = pattern(BLOCK + 10, 19);
        let (_dir, storage) = file_with(&data);
        // It believes the slot is longer than it is.
        let mut ra = ReadAhead::start(storage, 3 * BLOCK as u64);
        let err = ra.read(BLOCK as u64 + 5, 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A storage that counts the reads made of it and the bytes they read.
    #[derive(Debug)]
    struct Counting {
        inner: Box<dyn Storage>,
        reads: std::sync::atomic::AtomicU64,
        bytes: std::sync::atomic::AtomicU64,
    }

    impl Counting {
        fn new(inner: Box<dyn Storage>) -> Counting {
            Counting {
                inner,
                reads: Default::default(),
                bytes: Default::default(),
            }
        }

        fn counts(&self) -> (u64, u64) {
            use std::sync::atomic::Ordering::Relaxed;
            (self.reads.load(Relaxed), self.bytes.load(Relaxed))
        }
    }

    impl Storage for Counting {
        forward_storage!();
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            use std::sync::atomic::Ordering::Relaxed;
            self.reads.fetch_add(1, Relaxed);
            self.bytes.fetch_add(buf.len() as u64, Relaxed);
            self.inner.read_at(offset, buf)
        }
    }

    /// [`check_along`] of the first `len` bytes of `storage` along `chunks` (a
    /// cut's list: offset, id, length), wanting what `wanted` says (each wanted
    /// id keyed by its first position in `chunks`).
    fn check_cut(
        storage: &dyn Storage,
        len: u64,
        chunks: &[(u64, ChunkId, u32)],
        wanted: &(dyn Fn(&ChunkId) -> bool + Sync),
        sample: Option<Sample>,
    ) -> Along {
        let mut keys = std::collections::HashMap::new();
        for (k, c) in chunks.iter().enumerate() {
            keys.entry(c.1).or_insert(k as u32);
        }
        check_along(
            storage,
            len,
            || chunks.iter().map(|c| (c.1, c.2)),
            &|id| keys.get(id).copied().filter(|_| wanted(id)),
            sample,
        )
        .unwrap()
    }

    /// The positions in `chunks` of `wanted`'s chunks (taken from it).
    fn positions_of(chunks: &[(u64, ChunkId, u32)], wanted: &[(u64, ChunkId, u32)]) -> Vec<u32> {
        wanted
            .iter()
            .map(|w| chunks.iter().position(|c| c == w).unwrap() as u32)
            .collect()
    }

    /// The entries at `positions` are the chunks there, with their offsets, and
    /// only those: what the slot index along the list records.
    #[test]
    fn at_positions_gives_the_chunks_at_those_positions_and_stops_after_the_last() {
        let list = [
            (id(1), 10),
            (id(2), 20),
            (id(1), 10),
            (id(3), 5),
            (id(4), 7),
        ];
        let got: Vec<_> = at_positions(list, &[1, 3]).collect();
        assert_eq!(got, vec![(10, id(2), 20), (40, id(3), 5)]);
        assert_eq!(at_positions(list, &[]).count(), 0);
        // The list is read no further than the last position asked.
        let mut read = 0;
        let counted = list.iter().inspect(|_| read += 1).copied();
        assert_eq!(at_positions(counted, &[0]).count(), 1);
        assert_eq!(read, 1);
    }

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[test]
    fn check_along_reads_and_hashes_only_the_wanted_chunks() {
        let data = pattern(6 * BLOCK + 777, 21);
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let chunks = shoal_artifact::chunk::index(&data[..], chunking).unwrap();
        assert!(chunks.len() > 100, "{} chunks", chunks.len());
        // Every 10th chunk, from the second: far apart, each read alone.
        let wanted: Vec<(u64, ChunkId, u32)> = chunks.iter().copied().skip(1).step_by(10).collect();
        let wanted_ids: HashSet<ChunkId> = wanted.iter().map(|c| c.1).collect();
        let wanted_bytes: u64 = wanted.iter().map(|c| u64::from(c.2)).sum();
        // A byte changed in a chunk that is not wanted: not read, so not noticed.
        let mut slot = data.clone();
        let other = chunks[5];
        assert!(!wanted_ids.contains(&other.1));
        slot[other.0 as usize + 10] ^= 0xff;
        let (_dir, storage) = file_with(&slot);
        let counting = Counting::new(storage);
        let got = check_cut(
            &counting,
            slot.len() as u64,
            &chunks,
            &|id| wanted_ids.contains(id),
            None,
        );
        assert_eq!(got, Along::Held(positions_of(&chunks, &wanted)));
        let (reads, bytes) = counting.counts();
        assert!(
            reads <= wanted.len() as u64,
            "{reads} reads for {} chunks",
            wanted.len()
        );
        assert!(
            bytes >= wanted_bytes && bytes <= wanted_bytes + reads * 2 * ALIGN as u64,
            "{bytes} bytes read for {wanted_bytes} wanted"
        );
        assert!(
            bytes < slot.len() as u64 / 4,
            "{bytes} of {} read",
            slot.len()
        );
    }

    #[test]
    fn check_along_reports_the_first_wanted_chunk_that_differs() {
        let data = pattern(3 * BLOCK, 22);
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let chunks = shoal_artifact::chunk::index(&data[..], chunking).unwrap();
        // Two wanted chunks changed: the first in slot order is named.
        let mut slot = data.clone();
        for c in [chunks[7], chunks[30]] {
            slot[c.0 as usize + usize::try_from(c.2 / 2).unwrap()] ^= 1;
        }
        let (_dir, storage) = file_with(&slot);
        let got = check_cut(&*storage, slot.len() as u64, &chunks, &|_| true, None);
        assert_eq!(
            got,
            Along::Differs {
                offset: chunks[7].0,
                expected: chunks[7].1
            }
        );
        // The release's bytes elsewhere (shifted by a few bytes): the first chunk
        // already differs.
        let mut shifted = vec![0u8; 3];
        shifted.extend_from_slice(&data);
        let (_dir, storage) = file_with(&shifted);
        let got = check_cut(
            &*storage,
            shifted.len() as u64,
            &chunks,
            &|id| *id == chunks[40].1,
            None,
        );
        assert_eq!(
            got,
            Along::Differs {
                offset: chunks[40].0,
                expected: chunks[40].1
            }
        );
    }

    /// A sampled check reads only its sample, spread over the wanted chunks (the
    /// first and the last among them), lists every wanted chunk, and does not see a
    /// change in a wanted chunk outside the sample; a change in a sampled one (the
    /// base's bytes elsewhere: the first wanted chunk already differs) is found.
    #[test]
    fn check_along_with_a_sample_reads_the_sample_only() {
        let data = pattern(6 * BLOCK, 26);
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let chunks = shoal_artifact::chunk::index(&data[..], chunking).unwrap();
        let wanted: Vec<(u64, ChunkId, u32)> = chunks.iter().copied().step_by(2).collect();
        assert!(wanted.len() > 40, "{} wanted", wanted.len());
        let wanted_ids: HashSet<ChunkId> = wanted.iter().map(|c| c.1).collect();
        let sample = Sample::new(8);
        let n = wanted.len();
        let picked: Vec<usize> = sample_positions(n, sample).collect();
        assert_eq!(picked.len(), 8);
        assert_eq!((picked[0], picked[7]), (0, n - 1));
        let picked_bytes: u64 = picked.iter().map(|&i| u64::from(wanted[i].2)).sum();
        // A wanted chunk outside the sample changed: not read, not noticed.
        let unsampled = (1..n).find(|i| !picked.contains(i)).unwrap();
        let mut slot = data.clone();
        slot[wanted[unsampled].0 as usize + 3] ^= 1;
        let (_dir, storage) = file_with(&slot);
        let counting = Counting::new(storage);
        let got = check_cut(
            &counting,
            slot.len() as u64,
            &chunks,
            &|id| wanted_ids.contains(id),
            Some(sample),
        );
        assert_eq!(
            got,
            Along::Sampled {
                positions: positions_of(&chunks, &wanted),
                checked: 8
            }
        );
        let (reads, bytes) = counting.counts();
        assert!(reads <= 8, "{reads} reads");
        assert!(
            bytes >= picked_bytes
                && bytes <= picked_bytes + reads * (2 * ALIGN as u64 + GAP_READ_MAX),
            "{bytes} bytes read for a sample of {picked_bytes}"
        );
        // The same check of every wanted chunk finds the change.
        let got = check_cut(
            &counting,
            slot.len() as u64,
            &chunks,
            &|id| wanted_ids.contains(id),
            None,
        );
        assert_eq!(
            got,
            Along::Differs {
                offset: wanted[unsampled].0,
                expected: wanted[unsampled].1
            }
        );
        // The release's bytes elsewhere (shifted): the sample's first chunk differs.
        let mut shifted = vec![0u8; 5];
        shifted.extend_from_slice(&data);
        let (_dir, storage) = file_with(&shifted);
        let got = check_cut(
            &*storage,
            shifted.len() as u64,
            &chunks,
            &|id| wanted_ids.contains(id),
            Some(sample),
        );
        assert_eq!(
            got,
            Along::Differs {
                offset: wanted[0].0,
                expected: wanted[0].1
            }
        );
    }

    /// A sample as large as the wanted chunks (or larger) reads them all: the
    /// answer is [`Along::Held`] (every chunk proved) or the first that differs,
    /// never [`Along::Sampled`]. The picking: `k` positions, first and last.
    #[test]
    fn check_along_with_a_sample_of_all_the_wanted_chunks_checks_every_one() {
        let data = pattern(2 * BLOCK, 27);
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let chunks = shoal_artifact::chunk::index(&data[..], chunking).unwrap();
        let wanted: Vec<(u64, ChunkId, u32)> = chunks.iter().copied().step_by(3).collect();
        let n = wanted.len();
        assert!(n > 4, "{n} wanted");
        let wanted_ids: HashSet<ChunkId> = wanted.iter().map(|c| c.1).collect();
        let check = |slot: &[u8], k: usize| {
            let (_dir, storage) = file_with(slot);
            check_cut(
                &*storage,
                slot.len() as u64,
                &chunks,
                &|id| wanted_ids.contains(id),
                Some(Sample::new(k)),
            )
        };
        let held = Along::Held(positions_of(&chunks, &wanted));
        assert_eq!(check(&data, n), held);
        assert_eq!(check(&data, n + 10), held);
        let mut slot = data.clone();
        slot[wanted[n / 2].0 as usize + 1] ^= 1;
        assert_eq!(
            check(&slot, n),
            Along::Differs {
                offset: wanted[n / 2].0,
                expected: wanted[n / 2].1
            }
        );
        assert_eq!(
            sample_positions(10, Sample::new(2)).collect::<Vec<_>>(),
            vec![0, 9]
        );
        assert_eq!(
            sample_positions(3, Sample::new(5)).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
    }

    #[test]
    #[should_panic(expected = "at least 2")]
    fn a_sample_of_one_chunk_is_refused() {
        let _ = Sample::new(std::hint::black_box(1));
    }

    #[test]
    fn check_along_reads_a_repeated_chunk_once() {
        // z, x, z, y, z: z wanted, x and y not, far apart (no read spans two z).
        let z = pattern(8000, 23);
        let (x, y) = (pattern(300_000, 24), pattern(200_000, 25));
        let mut slot = Vec::new();
        for part in [&z, &x, &z, &y, &z] {
            slot.extend_from_slice(part);
        }
        let zid = ChunkId::of(&z);
        let expected = [
            (zid, 8000),
            (ChunkId::of(&x), 300_000),
            (zid, 8000),
            (ChunkId::of(&y), 200_000),
            (zid, 8000),
        ];
        // The later copies of z changed: only the first position is read.
        slot[308_000 + 5] ^= 1;
        let last = slot.len() - 5;
        slot[last] ^= 1;
        let (_dir, storage) = file_with(&slot);
        let counting = Counting::new(storage);
        let got = check_along(
            &counting,
            slot.len() as u64,
            || expected,
            &|id| (*id == zid).then_some(0),
            None,
        )
        .unwrap();
        assert_eq!(got, Along::Held(vec![0]));
        let (reads, bytes) = counting.counts();
        assert_eq!(reads, 1);
        assert_eq!(bytes, 8000_u64.next_multiple_of(ALIGN as u64));
    }
}
