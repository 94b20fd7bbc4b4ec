//! The running slot's chunk index, made while the device is idle.
//!
//! An install reuses every chunk the running slot already holds, so it first needs
//! to know where those chunks are. A slot Shoal installed has its index recorded
//! when it is verified; a slot written some other way (flashed at the factory,
//! copied by hand) has none, and an install would first read and cut the whole slot
//! (512 MiB: seconds; 8 GiB: minutes) before fetching a byte. Here the slot is cut
//! beforehand, at idle time (the daemon does it after it starts, `shoal slot index`
//! on demand), and the cut is recorded through the engine ([`Engine::index_idle`]).
//!
//! A recorded index is only trusted while the slot still holds it: before it is
//! used here, the first and the last recorded chunk and [`SAMPLE_CHUNKS`] more at
//! random are read back and hashed. One that hashes otherwise means the slot was
//! changed outside Shoal: the engine drops the index ([`Engine::active_slot_changed`])
//! and the slot is cut again. A change too small for the sample to meet costs no
//! correctness either: an install hashes every chunk it takes from a slot and
//! fetches the ones that do not match (and unindexes them).
//!
//! The cut runs without the device store ([`Cut::run`]: the daemon keeps polling
//! meanwhile) on threads of its own (a reader, and a pool of one a core for the
//! cutting and hashing, which ends with the cut: no thread of it outlives it) at a
//! low CPU priority (nice 10) and in the idle I/O class, so a device busy with its
//! real work hardly notices it. A fresh device's first install waits for the cut,
//! so it uses every core, at that priority.
//!
//! [`Engine::index_idle`]: shoal_engine::Engine::index_idle
//! [`Engine::active_slot_changed`]: shoal_engine::Engine::active_slot_changed

use std::hash::{BuildHasher, Hasher};
use std::time::Instant;

use anyhow::{Context, bail};
use shoal_artifact::{ChunkId, Chunking};
use shoal_bootctl::storage::Storage;
use shoal_engine::{Engine, IndexReader, IndexedChunk, Input, Output, Slot};
use tracing::{info, warn};

use super::{Device, slotio};

/// Recorded chunks read back at random to check an index, beside the first and the
/// last (64 in all: about 1 MiB of reads with 16 KiB chunks).
pub const SAMPLE_CHUNKS: usize = 62;

/// Nice value of the idle cut's threads.
const IDLE_NICE: libc::c_int = 10;

/// Why the running slot is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No index is recorded for it (Shoal did not write it).
    Missing,
    /// Its recorded index no longer holds: the chunk recorded at `offset` hashes
    /// otherwise (the slot was changed outside Shoal).
    Changed {
        /// Where the chunk that no longer matches was recorded.
        offset: u64,
    },
    /// Its index was cut with other chunking parameters than asked for.
    Chunking,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Missing => f.write_str("no index recorded"),
            Reason::Changed { offset } => write!(
                f,
                "changed outside Shoal (the chunk recorded at offset {offset} hashes otherwise)"
            ),
            Reason::Chunking => f.write_str("indexed with other chunking parameters"),
        }
    }
}

/// What [`Device::plan_index`] found.
#[derive(Debug)]
pub enum Plan {
    /// The running slot's recorded index holds (every sampled chunk hashed as
    /// recorded).
    Valid {
        /// The running slot.
        slot: Slot,
        /// Chunks in its index.
        chunks: usize,
    },
    /// The running slot has to be cut: [`Cut::run`], then [`Device::record_index`].
    Cut(Cut),
    /// Not now: a deployment is past fetching (armed, or booting its slot), so
    /// the running slot may be about to change.
    Later,
}

/// A cut of the running slot to make (the engine asked for it).
#[derive(Debug)]
pub struct Cut {
    /// The running slot.
    pub slot: Slot,
    /// How to cut it.
    pub chunking: Chunking,
    /// Bytes to cut.
    pub len: u64,
    /// Why.
    pub reason: Reason,
    storage: Box<dyn Storage>,
}

/// A finished cut, for [`Device::record_index`].
#[derive(Debug)]
pub struct CutIndex {
    /// Why it was cut.
    pub reason: Reason,
    /// How long the cut took.
    pub elapsed: std::time::Duration,
    slot: Slot,
    chunking: Chunking,
    /// `(offset, id, len)` in slot order, a repeated run listed once.
    chunks: Vec<(u64, ChunkId, u32)>,
}

/// A cut recorded as the running slot's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed {
    /// The running slot.
    pub slot: Slot,
    /// Chunks in its index.
    pub chunks: usize,
    /// Why it was cut.
    pub reason: Reason,
    /// How long the cut took.
    pub elapsed: std::time::Duration,
}

impl CutIndex {
    /// Chunks in the index.
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }
}

impl Cut {
    /// Cuts the slot (no device store needed: run it on any thread), on threads
    /// of low CPU and I/O priority that end with it.
    pub fn run(self) -> anyhow::Result<CutIndex> {
        let started = Instant::now();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            )
            .thread_name(|_| "shoal-idle-index".into())
            .start_handler(|_| lower_priority())
            .build()
            .context("cannot start the indexing threads")?;
        let Cut {
            slot,
            chunking,
            len,
            reason,
            storage,
        } = self;
        let len = len.min(storage.len()?);
        // The slot is read on a thread of low priority too (the caller's is left
        // as it is); the cutting and hashing run in `pool` (never in rayon's
        // global pool, whose threads would outlive the cut).
        let pool_ref = &pool;
        let chunks = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("shoal-idle-read".into())
                .spawn_scoped(scope, move || {
                    lower_priority();
                    slotio::index(
                        &*storage,
                        len,
                        chunking,
                        &|_| false,
                        None,
                        Some(pool_ref),
                        slotio::Repeats::Listed,
                    )
                })
                .context("cannot start the slot reading thread")?
                .join()
                .map_err(|_| anyhow::anyhow!("the slot reading thread panicked"))?
                .with_context(|| format!("cannot read slot {slot} to index it"))
        })?;
        drop(pool);
        Ok(CutIndex {
            reason,
            elapsed: started.elapsed(),
            slot,
            chunking,
            chunks,
        })
    }
}

/// Nice 10 and the idle I/O class for the calling thread (and the threads it
/// starts). Best effort: a kernel that refuses leaves the priority as it was.
#[allow(unsafe_code)]
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread (who = 0), no memory passed.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, IDLE_NICE);
        // IOPRIO_WHO_PROCESS = 1, IOPRIO_CLASS_IDLE = 3 << IOPRIO_CLASS_SHIFT (13).
        libc::syscall(libc::SYS_ioprio_set, 1, 0, 3 << 13);
    }
}

/// Random numbers for the sample (the OS-seeded hasher: no simulator replays this).
fn random_u64(seed: u64) -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(seed);
    h.finish()
}

/// The offset of the first recorded chunk of `slot`'s index that `storage` no
/// longer holds, of the first, the last and [`SAMPLE_CHUNKS`] at random; and how
/// many chunks the index has. Two passes over the store's index (one to count and
/// find the first and the last, one to pick the sample): nothing of it is held
/// but the sample.
fn first_changed(
    storage: &dyn Storage,
    reader: &dyn IndexReader,
    slot: Slot,
) -> anyhow::Result<(Option<u64>, usize)> {
    let mut n = 0usize;
    let mut first: Option<IndexedChunk> = None;
    let mut last: Option<IndexedChunk> = None;
    reader.scan(slot, &ChunkId([0; 32]), &mut |id, offset, len| {
        n += 1;
        let c = IndexedChunk {
            id: *id,
            offset,
            len,
        };
        if first.is_none_or(|f| offset < f.offset) {
            first = Some(c);
        }
        if last.is_none_or(|l| offset > l.offset) {
            last = Some(c);
        }
        true
    })?;
    if n == 0 {
        return Ok((None, 0));
    }
    let mut ranks: Vec<usize> = (0..SAMPLE_CHUNKS as u64)
        .map(|i| (random_u64(i) % n as u64) as usize)
        .collect();
    ranks.sort_unstable();
    ranks.dedup();
    let mut picks: Vec<IndexedChunk> = first.into_iter().chain(last).collect();
    let mut rank = 0usize;
    let mut next = ranks.iter().copied().peekable();
    reader.scan(slot, &ChunkId([0; 32]), &mut |id, offset, len| {
        if next.peek() == Some(&rank) {
            next.next();
            picks.push(IndexedChunk {
                id: *id,
                offset,
                len,
            });
        }
        rank += 1;
        next.peek().is_some()
    })?;
    picks.sort_by_key(|c| c.offset);
    picks.dedup();
    let slot_len = storage.len()?;
    let mut buf = Vec::new();
    for c in picks {
        if c.offset + u64::from(c.len) > slot_len {
            return Ok((Some(c.offset), n));
        }
        buf.resize(c.len as usize, 0);
        storage.read_at(c.offset, &mut buf)?;
        if ChunkId::of(&buf) != c.id {
            return Ok((Some(c.offset), n));
        }
    }
    Ok((None, n))
}

impl Device {
    /// Checks the running slot's recorded index and says whether the slot has to be
    /// cut (see the module documentation). `chunking`: how to cut it; `None` keeps
    /// a recorded index however it was cut, and cuts as before, or as the other
    /// slot was cut, or with the default chunking. Records a first run and a slot
    /// switched outside Shoal, as every command does.
    pub fn plan_index(&self, chunking: Option<Chunking>) -> anyhow::Result<Plan> {
        let mut engine = self.engine()?;
        let slot = engine.status().active;
        let now = shoal_engine::Instant::default();
        let reader = self.store.index_reader();
        let recorded = reader.chunking(slot)?;
        let mut reason = Reason::Missing;
        if let Some(recorded) = recorded {
            let storage = self
                .boot
                .open_reader(slot)
                .with_context(|| format!("cannot open slot {slot}"))?;
            match first_changed(&*storage, &reader, slot)
                .with_context(|| format!("cannot read slot {slot} to check its index"))?
            {
                (None, chunks) if chunking.is_none_or(|c| c == recorded) => {
                    return Ok(Plan::Valid { slot, chunks });
                }
                (None, _) => reason = Reason::Chunking,
                (Some(offset), _) => {
                    reason = Reason::Changed { offset };
                    warn!(%slot, offset, "the running slot does not hold its recorded index; it was changed outside Shoal");
                    engine.active_slot_changed(now);
                    self.apply_persists(&mut engine, None)?;
                }
            }
        }
        let chunking = match chunking {
            Some(c) => c,
            None => match recorded {
                Some(c) => c,
                None => reader
                    .chunking(slot.other())?
                    .unwrap_or(shoal_artifact::chunk::CHUNKING_DEFAULT),
            },
        };
        if !engine.index_idle(now, chunking) {
            return Ok(Plan::Later);
        }
        let mut asked = None;
        self.apply_persists(&mut engine, Some(&mut asked))?;
        let Some((slot, chunking, len)) = asked else {
            bail!("the engine asked for no index of slot {slot}");
        };
        let storage = self
            .boot
            .open_reader(slot)
            .with_context(|| format!("cannot open slot {slot}"))?;
        Ok(Plan::Cut(Cut {
            slot,
            chunking,
            len,
            reason,
            storage,
        }))
    }

    /// Records a finished cut as the running slot's index (through the engine).
    pub fn record_index(&self, cut: CutIndex) -> anyhow::Result<Indexed> {
        let mut engine = self.engine()?;
        let active = engine.status().active;
        if active != cut.slot {
            bail!(
                "slot {} was indexed, but the device now runs slot {active}",
                cut.slot
            );
        }
        let indexed = Indexed {
            slot: cut.slot,
            chunks: cut.chunks(),
            reason: cut.reason,
            elapsed: cut.elapsed,
        };
        // Into the store in batches (the engine reads them by id); its record
        // makes them the slot's index.
        let written = self
            .store
            .write_slot_index(cut.slot, &cut.chunks)
            .with_context(|| format!("cannot record the index of slot {}", cut.slot))?;
        drop(cut.chunks);
        engine.handle(
            shoal_engine::Instant::default(),
            Input::SlotIndexWritten {
                slot: cut.slot,
                chunking: cut.chunking,
                chunks: written,
                partial: false,
                sampled: false,
            },
        );
        self.apply_persists(&mut engine, None)?;
        if engine.active_chunking().is_none() {
            bail!("the engine did not take the index of slot {active}");
        }
        info!(slot = %indexed.slot, chunks = indexed.chunks, reason = %indexed.reason, elapsed_ms = indexed.elapsed.as_millis() as u64, "indexed the running slot");
        Ok(indexed)
    }

    /// [`Device::plan_index`], [`Cut::run`] and [`Device::record_index`] in one go:
    /// `None` when the recorded index held.
    #[cfg(test)]
    pub fn index_now(&self, chunking: Option<Chunking>) -> anyhow::Result<Option<Indexed>> {
        match self.plan_index(chunking)? {
            Plan::Valid { .. } | Plan::Later => Ok(None),
            Plan::Cut(cut) => self.record_index(cut.run()?).map(Some),
        }
    }

    /// Carries out the engine's outputs outside an install: records go to the
    /// store; an index it asks for is handed back in `asked`.
    fn apply_persists(
        &self,
        engine: &mut Engine,
        mut asked: Option<&mut Option<(Slot, Chunking, u64)>>,
    ) -> anyhow::Result<()> {
        while let Some(out) = engine.poll_output() {
            match out {
                Output::Persist(records) => self.store.apply(&records)?,
                Output::IndexSlot {
                    slot,
                    chunking,
                    len,
                } => {
                    if let Some(a) = asked.as_deref_mut() {
                        *a = Some((slot, chunking, len));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::crash_tests::{self, Fixture, device, fixture, fresh_disk, install};

    /// The index `slotio` cuts from `bytes` (the slot's content) with the default
    /// chunking.
    fn cut_of(bytes: &[u8]) -> Vec<IndexedChunk> {
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("slot");
        std::fs::write(&path, bytes).expect("write");
        let storage = shoal_bootctl::FileStorage::open(&path, false).expect("open");
        let mut chunks: Vec<IndexedChunk> = slotio::list_chunks(
            &storage,
            bytes.len() as u64,
            chunking,
            slotio::Repeats::Listed,
        )
        .expect("cut")
        .into_iter()
        .map(|(offset, id, len)| IndexedChunk { id, offset, len })
        .collect();
        // As the store gives it back: the first of each id, in slot order.
        let mut seen = std::collections::HashSet::new();
        chunks.retain(|c| seen.insert(c.id));
        chunks
    }

    fn recorded(dev: &Device, slot: Slot) -> Option<Vec<IndexedChunk>> {
        dev.store.slot_index(slot).expect("store").map(|i| i.chunks)
    }

    /// #11: a running slot Shoal did not write is cut once and recorded; checked
    /// again it holds; rewritten outside Shoal, it is found changed and cut again
    /// (its old index is not trusted); the next install runs on the recorded index.
    #[test]
    fn a_slot_without_an_index_is_cut_and_a_slot_changed_outside_shoal_is_cut_again() {
        let f: Fixture = fixture();
        let disk = fresh_disk(&f);
        let data = tempfile::tempdir().expect("tempdir");
        let dev = device(&f, &disk, data.path());
        assert_eq!(recorded(&dev, Slot::A), None, "a factory slot has no index");

        let first = dev.index_now(None).expect("index").expect("cut");
        assert_eq!((first.slot, first.reason), (Slot::A, Reason::Missing));
        let factory_cut = cut_of(&disk.live("a"));
        assert_eq!(first.chunks, factory_cut.len());
        assert_eq!(recorded(&dev, Slot::A), Some(factory_cut.clone()));
        assert!(
            dev.index_now(None).expect("check").is_none(),
            "an unchanged slot keeps its index"
        );

        // Slot A rewritten outside Shoal (another image copied over it).
        let mut other = crash_tests::bytes(77, f.factory.len());
        other.resize(disk.live("a").len(), 0);
        disk.put("a", &other);
        let again = dev.index_now(None).expect("index").expect("cut again");
        assert!(
            matches!(again.reason, Reason::Changed { offset: 0 }),
            "{:?}",
            again.reason
        );
        let other_cut = cut_of(&other);
        assert_eq!(recorded(&dev, Slot::A), Some(other_cut));
        assert!(dev.index_now(None).expect("check").is_none());

        // The factory image back; asked for other chunking, the slot is cut again.
        disk.put("a", &{
            let mut a = f.factory.clone();
            a.resize(other.len(), 0);
            a
        });
        let changed = dev.index_now(None).expect("index").expect("cut");
        assert!(matches!(changed.reason, Reason::Changed { .. }));
        let fast = shoal_artifact::chunk::CHUNKING_FAST;
        let recut = dev.index_now(Some(fast)).expect("index").expect("cut");
        assert_eq!(recut.reason, Reason::Chunking);
        assert_eq!(
            dev.store
                .slot_index(Slot::A)
                .expect("store")
                .map(|i| i.chunking),
            Some(fast)
        );

        // The install runs on it: v2 lands in slot B, most of it taken from A.
        let mut dev = dev;
        let report = install(&f, &mut dev).expect("install");
        assert_eq!(&disk.live("b")[..f.v2.len()], &f.v2[..]);
        assert!(report.reused_bytes > (f.v2.len() / 2) as u64, "{report:?}");
    }
}
