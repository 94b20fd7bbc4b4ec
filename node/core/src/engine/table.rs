//! The chunk table of a release payload: its distinct chunks ("entries", numbered in
//! order of first appearance) and its positions (the manifest's chunk list, where an
//! entry may appear several times), in dense arrays.
//!
//! Sizes and sizes on the wire are kept by position, 8 bytes a chunk. The ids (32
//! bytes a chunk: 13.8 MB for an 8 GiB image) are kept where the release was
//! verified: in memory ([`Ids::Memory`], one copy a fleet of simulated devices
//! shares), or in a file the driver wrote as the manifest was decoded and reads by
//! position ([`ChunkIdFile`], through a small block cache): a device's memory then
//! does not grow with the image's ids. Lookups by id stay in memory (the first 4
//! bytes of each entry's id, sorted); a full id is read only where a prefix matches.

use std::sync::{Arc, Mutex, OnceLock};

use shoal_artifact::ChunkId;
#[cfg(test)]
use shoal_artifact::ChunkRef;

/// No next position.
const NONE: u32 = u32::MAX;

/// Positions between two kept offsets: a position's offset is the last kept one
/// plus the sizes of the positions between (at most 15 additions), so the table
/// keeps half a byte a position for offsets instead of 8 (3.4 MB at 8 GiB).
const OFFSET_STRIDE: usize = 16;

/// Ids a block of the cache holds (8 KiB): reads in position order (the artifact
/// stream, the fetch plan) cost one read a block; a lookup in id order (the slot
/// index written after an install, the plan's merge with the stored index) reads
/// its one id (32 bytes) and keeps no block, so it neither reads 8 KiB for an id
/// nor evicts the blocks of a pass in position order.
const BLOCK_IDS: u32 = 256;

/// Blocks the cache keeps (128 KiB).
const BLOCKS: usize = 16;

/// The first 4 bytes of an id, big-endian (so prefixes sort as the ids do).
pub(crate) fn prefix(id: &ChunkId) -> u32 {
    u32::from_be_bytes([id.0[0], id.0[1], id.0[2], id.0[3]])
}

/// Marks, in a list of positions, an entry standing for every position it has
/// (positions are below it).
pub(crate) const WHOLE_ENTRY: u32 = 1 << 31;

/// A release's chunk ids by position, kept by the driver (a device: a file it
/// wrote from the verified manifest, read with `pread`).
pub trait ChunkIdFile: Send + Sync + std::fmt::Debug {
    /// Fills `out` with the ids at positions `from..from + out.len()`.
    fn read_ids(&self, from: u32, out: &mut [ChunkId]) -> std::io::Result<()>;
    /// What it is, for an error message (a device: the file's path).
    fn describe(&self) -> String;
}

/// Takes a release's chunk ids in position order while its manifest is decoded
/// ([`VerifiedRelease::verify_file`](crate::VerifiedRelease::verify_file)),
/// then gives them back to be read by position.
pub trait ChunkIdWriter: Send {
    /// The id at the next position. The error says what failed, naming the file.
    fn push(&mut self, id: &ChunkId) -> Result<(), String>;
    /// Every id was pushed: the ids, to be read by position.
    fn finish(self: Box<Self>) -> Result<Arc<dyn ChunkIdFile>, String>;
}

/// Where the table's ids are.
#[derive(Debug)]
pub(crate) enum Ids {
    /// In memory, by position.
    Memory(Box<[ChunkId]>),
    /// In the driver's file.
    File(FileIds),
}

impl Ids {
    #[inline]
    fn get(&self, p: u32) -> ChunkId {
        match self {
            Ids::Memory(ids) => ids[p as usize],
            Ids::File(f) => f.get(p),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Ids::Memory(ids) => ids.len() * 32,
            Ids::File(f) => {
                let c = f
                    .cache
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                c.ids.len() * 32 + c.tags.len() * 4
            }
        }
    }
}

/// Ids read from a [`ChunkIdFile`] through a cache of [`BLOCKS`] blocks, filled
/// by reads in position order: a miss at most two blocks' worth of positions
/// after the last miss reads its block; any other miss reads only its id (so a
/// pass in order reads each block once, or its first id alone and then the
/// block when it starts or resumes, or when an id-order lookup came between). A read
/// that fails is remembered (the first failure, sticky): the id it should have
/// given is all zeros, which no chunk hashes to, and the engine ends the install
/// with [`InstallError::ChunkIds`](crate::InstallError::ChunkIds) naming the file.
#[derive(Debug)]
pub(crate) struct FileIds {
    file: Arc<dyn ChunkIdFile>,
    len: u32,
    cache: Mutex<BlockCache>,
    error: OnceLock<String>,
}

#[derive(Debug)]
struct BlockCache {
    /// The block in each slot (`NONE`: empty): [`BLOCKS`] slots, fewer for a
    /// release with fewer blocks.
    tags: Box<[u32]>,
    /// The slots' ids, [`BLOCK_IDS`] a slot.
    ids: Box<[ChunkId]>,
    /// The slot the next miss replaces.
    hand: usize,
    /// The position of the last miss (`NONE`: none yet).
    last_miss: u32,
}

impl FileIds {
    pub(crate) fn new(file: Arc<dyn ChunkIdFile>, len: u32) -> FileIds {
        let slots = BLOCKS.min(len.div_ceil(BLOCK_IDS) as usize).max(1);
        FileIds {
            file,
            len,
            cache: Mutex::new(BlockCache {
                tags: vec![NONE; slots].into_boxed_slice(),
                ids: vec![ChunkId([0; 32]); slots * BLOCK_IDS as usize].into_boxed_slice(),
                hand: 0,
                last_miss: NONE,
            }),
            error: OnceLock::new(),
        }
    }

    fn get(&self, p: u32) -> ChunkId {
        debug_assert!(p < self.len, "a position of the table");
        let block = p / BLOCK_IDS;
        let mut c = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(slot) = c.tags.iter().position(|&t| t == block) {
            return c.ids[slot * BLOCK_IDS as usize + (p % BLOCK_IDS) as usize];
        }
        // A pass in position order misses a little after its last miss (the
        // first position of the block it then read); a lookup in id order, at a
        // random position, rarely does.
        let in_order = c.last_miss != NONE && p > c.last_miss && p - c.last_miss <= 2 * BLOCK_IDS;
        c.last_miss = p;
        if !in_order {
            let mut one = [ChunkId([0; 32])];
            return match self.file.read_ids(p, &mut one) {
                Ok(()) => one[0],
                Err(e) => self.failed(e),
            };
        }
        let slot = c.hand;
        c.hand = (slot + 1) % c.tags.len();
        let from = block * BLOCK_IDS;
        let n = BLOCK_IDS.min(self.len - from) as usize;
        let at = slot * BLOCK_IDS as usize;
        match self.file.read_ids(from, &mut c.ids[at..at + n]) {
            Ok(()) => {
                c.tags[slot] = block;
                c.ids[at + (p % BLOCK_IDS) as usize]
            }
            Err(e) => {
                c.tags[slot] = NONE;
                self.failed(e)
            }
        }
    }

    /// Remembers the first failed read; the id no chunk has.
    fn failed(&self, e: std::io::Error) -> ChunkId {
        self.error.get_or_init(|| {
            format!(
                "cannot read the release's chunk ids from {}: {e}",
                self.file.describe()
            )
        });
        ChunkId([0; 32])
    }
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct ChunkTable {
    /// By position: the chunk's id.
    ids: Ids,
    /// By position: the chunk's uncompressed size.
    sizes: Vec<u32>,
    /// By position: the chunk's size on the wire.
    wire: Vec<u32>,
    /// By entry: its first position.
    first: Vec<u32>,
    /// By position: its entry.
    entry_of: Vec<u32>,
    /// `(entry, its positions after the first, in order)` for each entry with
    /// several positions, sorted by entry: most chunks appear once, so this
    /// costs 4 bytes a repeated position instead of 4 bytes every position.
    more: Vec<(u32, Box<[u32]>)>,
    /// A bit an entry: set when it is in `more` (so the entries that appear once,
    /// nearly all, are told without a search: the offer asks of every entry).
    repeated: Vec<u64>,
    /// Byte offset in the payload of every [`OFFSET_STRIDE`]th position (see
    /// [`ChunkTable::offset_at`]).
    offsets: Vec<u64>,
    /// `(first 4 bytes of the id, entry)` sorted by id, for lookups: 8 bytes an
    /// entry, not a copy of the ids; the full id is compared only where the prefix
    /// matches.
    by_id: Vec<(u32, u32)>,
    /// `(entry, offsets of its positions after the first)` for each entry with
    /// several positions, sorted by entry: shared with each write of it.
    repeats: Vec<(u32, Arc<[u64]>)>,
    /// The entries' sizes added up (each distinct chunk once), and the largest
    /// size on the wire: what every offer of a fresh install asks, worked out
    /// once for every device sharing the release.
    distinct_bytes: u64,
    wire_max: u32,
}

impl ChunkTable {
    /// The table of a payload's chunk list (a validated manifest's, so sizes add
    /// up), its ids kept in memory (tests: a release's table is built from the
    /// streamed list, [`ChunkTable::build`]).
    #[cfg(test)]
    pub(crate) fn new(list: Vec<ChunkRef>) -> ChunkTable {
        let sizes = list.iter().map(|c| c.size).collect();
        let wire = list.iter().map(|c| c.stored_size).collect();
        let prefixes = list.iter().map(|c| prefix(&c.id)).collect();
        let ids = list.iter().map(|c| c.id).collect();
        drop(list);
        ChunkTable::build(Ids::Memory(ids), sizes, wire, prefixes)
    }

    /// The table of a payload's chunks given as arrays by position (a validated
    /// manifest's, so sizes add up): its ids where they are kept, their sizes,
    /// sizes on the wire and ids' first 4 bytes ([`prefix`]).
    ///
    /// Besides the table it keeps, it needs 12 bytes a position while it is built
    /// (positions sorted by id prefix, each position's first, the prefixes); ids
    /// are read only where prefixes are equal (repeats, or one chance in 2³² a
    /// pair).
    pub(crate) fn build(
        ids: Ids,
        sizes: Vec<u32>,
        wire: Vec<u32>,
        prefixes: Vec<u32>,
    ) -> ChunkTable {
        let n = sizes.len();
        assert!(
            u32::try_from(n).is_ok_and(|n| n < WHOLE_ENTRY),
            "chunk count fits 31 bits"
        );
        assert!(wire.len() == n && prefixes.len() == n, "arrays by position");
        let mut t = ChunkTable {
            ids,
            sizes,
            wire,
            first: Vec::new(),
            entry_of: Vec::with_capacity(n),
            more: Vec::new(),
            repeated: Vec::new(),
            offsets: Vec::with_capacity(n.div_ceil(OFFSET_STRIDE)),
            by_id: Vec::new(),
            repeats: Vec::new(),
            distinct_bytes: 0,
            wire_max: 0,
        };
        // Positions sorted by (prefix, position); then, within each run of equal
        // prefixes, by (id, position): each id's positions are a run, first
        // position first.
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_unstable_by_key(|&p| (prefixes[p as usize], p));
        // first_of[p]: the first position with p's id (linking each run).
        let mut first_of = vec![NONE; n];
        // (first position, later positions) of each id that repeats.
        let mut later: Vec<(u32, Box<[u32]>)> = Vec::new();
        // The first position of each id, in id order, written over `order`'s
        // front (never ahead of what is read).
        let mut kept = 0;
        let mut i = 0;
        while i < n {
            let want = prefixes[order[i] as usize];
            let j = i + order[i..]
                .iter()
                .take_while(|&&p| prefixes[p as usize] == want)
                .count();
            if j - i == 1 {
                let p = order[i];
                first_of[p as usize] = p;
                order[kept] = p;
                kept += 1;
            } else {
                let mut group: Vec<(ChunkId, u32)> =
                    order[i..j].iter().map(|&p| (t.ids.get(p), p)).collect();
                group.sort_unstable();
                for run in group.chunk_by(|a, b| a.0 == b.0) {
                    let first = run[0].1;
                    if run.len() > 1 {
                        later.push((first, run[1..].iter().map(|&(_, p)| p).collect()));
                    }
                    for &(_, p) in run {
                        first_of[p as usize] = first;
                    }
                    order[kept] = first;
                    kept += 1;
                }
            }
            i = j;
        }
        order.truncate(kept);
        // Entries in order of first appearance.
        let mut offset = 0u64;
        for (p, &f) in first_of.iter().enumerate() {
            let f = f as usize;
            if f == p {
                t.first.push(p as u32);
            }
            // The first position of an id comes first, so its entry is known.
            let e = if f == p {
                t.first.len() as u32 - 1
            } else {
                t.entry_of[f]
            };
            t.entry_of.push(e);
            if p % OFFSET_STRIDE == 0 {
                t.offsets.push(offset);
            }
            offset += u64::from(t.sizes[p]);
        }
        drop(first_of);
        for &p in &t.first {
            t.distinct_bytes += u64::from(t.sizes[p as usize]);
            t.wire_max = t.wire_max.max(t.wire[p as usize]);
        }
        // `order` holds each id's first position in id order: the lookup array.
        t.by_id = order
            .iter()
            .map(|&p| (prefixes[p as usize], t.entry_of[p as usize]))
            .collect();
        drop(order);
        drop(prefixes);
        t.more = later
            .into_iter()
            .map(|(first, rest)| (t.entry_of[first as usize], rest))
            .collect();
        t.more.sort_unstable_by_key(|&(e, _)| e);
        t.repeated = vec![0u64; (t.entries() as usize).div_ceil(64)];
        for &(e, _) in &t.more {
            t.repeated[e as usize / 64] |= 1 << (e % 64);
        }
        t.repeats = t
            .more
            .iter()
            .map(|(e, rest)| (*e, rest.iter().map(|&p| t.offset_at(p)).collect()))
            .collect();
        t
    }

    /// The first failure to read the ids from the driver's file, if any (sticky):
    /// the install that met it ends with it.
    pub(crate) fn ids_error(&self) -> Option<&str> {
        match &self.ids {
            Ids::Memory(_) => None,
            Ids::File(f) => f.error.get().map(String::as_str),
        }
    }

    /// Whether position `p` is the first of its id.
    pub(crate) fn is_first(&self, p: u32) -> bool {
        self.first[self.entry_of[p as usize] as usize] == p
    }

    /// The id at position `p`.
    pub(crate) fn id_at(&self, p: u32) -> ChunkId {
        self.ids.get(p)
    }

    /// Whether the entry has several positions: told by its bit (nearly every
    /// entry appears once), without a search of the repeats.
    fn is_repeated(&self, e: u32) -> bool {
        self.repeated[e as usize / 64] >> (e % 64) & 1 == 1
    }

    /// The offsets of the entry's positions after the first, if it has several.
    pub(crate) fn repeat_offsets(&self, e: u32) -> Option<&Arc<[u64]>> {
        if !self.is_repeated(e) {
            return None;
        }
        self.repeats
            .binary_search_by_key(&e, |&(r, _)| r)
            .ok()
            .map(|k| &self.repeats[k].1)
    }

    /// Distinct chunks.
    pub(crate) fn entries(&self) -> u32 {
        self.first.len() as u32
    }

    /// Positions (chunks in the payload's list).
    pub(crate) fn positions(&self) -> u32 {
        self.entry_of.len() as u32
    }

    /// The entry of chunk `id`, if the payload has it.
    pub(crate) fn entry(&self, id: &ChunkId) -> Option<u32> {
        let want = prefix(id);
        let from = self.first_with_prefix(want);
        self.by_id[from..]
            .iter()
            .take_while(|&&(p, _)| p == want)
            .map(|&(_, e)| e)
            .find(|&e| self.id(e) == *id)
    }

    /// The index in `by_id` of the first prefix not below `want`. Ids are BLAKE3
    /// hashes, so their prefixes spread evenly over the `u32`s: the search starts
    /// where `want` would lie if they were spread exactly, and gallops from there
    /// (a few probes, against ~14 for a binary search of 10,000 entries, each a
    /// cache miss). Any order of prefixes is still searched correctly, only more
    /// slowly.
    fn first_with_prefix(&self, want: u32) -> usize {
        let v = &self.by_id;
        let n = v.len();
        if n == 0 {
            return 0;
        }
        let guess = ((u64::from(want) * n as u64) >> 32) as usize;
        // Bounds (lo, hi) with every index below lo under `want` and every index
        // from hi on not under it, widened by doubling steps from the guess.
        let (mut lo, mut hi);
        if v[guess].0 < want {
            lo = guess + 1;
            let mut step = 1;
            hi = lo;
            while hi < n && v[hi].0 < want {
                lo = hi + 1;
                hi = (hi + step).min(n);
                step *= 2;
            }
        } else {
            hi = guess;
            let mut step = 1;
            lo = hi;
            while lo > 0 && v[lo - 1].0 >= want {
                hi = lo - 1;
                lo = lo.saturating_sub(step);
                step *= 2;
            }
        }
        lo + v[lo..hi].partition_point(|&(p, _)| p < want)
    }

    pub(crate) fn id(&self, e: u32) -> ChunkId {
        self.ids.get(self.first[e as usize])
    }

    pub(crate) fn size(&self, e: u32) -> u32 {
        self.sizes[self.first[e as usize] as usize]
    }

    pub(crate) fn wire_size(&self, e: u32) -> u32 {
        self.wire[self.first[e as usize] as usize]
    }

    /// The entries' sizes added up: each distinct chunk once.
    pub(crate) fn distinct_bytes(&self) -> u64 {
        self.distinct_bytes
    }

    /// The largest size on the wire of any entry.
    pub(crate) fn wire_max(&self) -> u32 {
        self.wire_max
    }

    /// Payload offset of the entry's first position.
    pub(crate) fn first_offset(&self, e: u32) -> u64 {
        self.offset_at(self.first[e as usize])
    }

    /// The entry at a position.
    pub(crate) fn entry_at(&self, p: u32) -> u32 {
        self.entry_of[p as usize]
    }

    /// Payload offset of a position: the kept offset at or before it plus the
    /// sizes in between.
    pub(crate) fn offset_at(&self, p: u32) -> u64 {
        let p = p as usize;
        let kept = p / OFFSET_STRIDE;
        self.offsets[kept]
            + self.sizes[kept * OFFSET_STRIDE..p]
                .iter()
                .map(|&s| u64::from(s))
                .sum::<u64>()
    }

    /// The entries in id order.
    pub(crate) fn entries_by_id(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_id.iter().map(|&(_, e)| e)
    }

    /// The entry's positions, in payload order.
    pub(crate) fn positions_of(&self, e: u32) -> impl Iterator<Item = u32> + '_ {
        let more: &[u32] = if self.is_repeated(e) {
            let k = self
                .more
                .binary_search_by_key(&e, |&(r, _)| r)
                .expect("a repeated entry is listed");
            &self.more[k].1
        } else {
            &[]
        };
        std::iter::once(self.first[e as usize]).chain(more.iter().copied())
    }

    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.ids.heap_bytes()
            + (self.sizes.capacity() + self.wire.capacity()) * 4
            + (self.first.capacity() + self.entry_of.capacity() + self.by_id.capacity() * 2) * 4
            + self.more.capacity() * std::mem::size_of::<(u32, Box<[u32]>)>()
            + self.more.iter().map(|(_, r)| r.len() * 4).sum::<usize>()
            + self.repeated.capacity() * 8
            + self.offsets.capacity() * 8
            + self.repeats.capacity() * std::mem::size_of::<(u32, Arc<[u64]>)>()
            + self
                .repeats
                .iter()
                .map(|(_, r)| 16 + r.len() * 8)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_artifact::{Payload, PayloadKind};

    fn id(n: u8) -> ChunkId {
        ChunkId::from(blake3::hash(&[n]))
    }

    #[test]
    fn repeated_chunks_share_an_entry_and_link_their_positions() {
        let c = |n, size| ChunkRef {
            id: id(n),
            size,
            stored_size: size / 2,
        };
        let payload = Payload {
            hash: [0; 32],
            kind: PayloadKind::RootfsImage,
            name: "rootfs".into(),
            size: 10 + 20 + 10 + 30 + 10,
            chunks: vec![c(1, 10), c(2, 20), c(1, 10), c(3, 30), c(1, 10)],
            references: Vec::new(),
        };
        let t = ChunkTable::new(payload.chunks);
        assert_eq!((t.entries(), t.positions()), (3, 5));
        assert_eq!(t.entry(&id(1)), Some(0));
        assert_eq!(t.entry(&id(3)), Some(2));
        assert_eq!(t.entry(&id(9)), None);
        assert_eq!(t.positions_of(0).collect::<Vec<_>>(), vec![0, 2, 4]);
        assert_eq!(t.positions_of(1).collect::<Vec<_>>(), vec![1]);
        assert_eq!(
            (0..5).map(|p| t.offset_at(p)).collect::<Vec<_>>(),
            vec![0, 10, 30, 40, 70]
        );
        assert_eq!(
            (t.entry_at(2), t.first_offset(2), t.wire_size(1)),
            (0, 40, 10)
        );
        // Each distinct chunk's size once; the largest on the wire.
        assert_eq!((t.distinct_bytes(), t.wire_max()), (10 + 20 + 30, 15));
        // The repeats after the first position, for the entries that repeat only.
        assert_eq!(t.repeat_offsets(0).map(|r| &r[..]), Some(&[30u64, 70][..]));
        assert_eq!(t.repeat_offsets(1), None);
        assert_eq!(t.repeat_offsets(2), None);
    }

    /// Lookups by id start where the prefix would lie if prefixes were spread
    /// evenly ([`ChunkTable::first_with_prefix`]): every id is found and an id
    /// absent is not, with prefixes spread evenly (hashes), at both ends of the
    /// range, and crowded into a few values (a guess far off).
    #[test]
    fn lookups_find_every_id_however_the_prefixes_lie() {
        let with_prefix = |p: u32, n: u32| {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&p.to_be_bytes());
            b[4..8].copy_from_slice(&n.to_be_bytes());
            ChunkId(b)
        };
        let even: Vec<ChunkId> = (0..3000u32)
            .map(|n| ChunkId::from(blake3::hash(&n.to_le_bytes())))
            .collect();
        let ends: Vec<ChunkId> = (0..50)
            .flat_map(|n| {
                [
                    with_prefix(0, n),
                    with_prefix(1, n),
                    with_prefix(u32::MAX, n),
                    with_prefix(u32::MAX - 1, n),
                ]
            })
            .collect();
        let crowded: Vec<ChunkId> = (0..2000)
            .map(|n| with_prefix(0x4000_0000 + n % 7, n))
            .collect();
        for ids in [
            even,
            ends,
            crowded.clone(),
            [
                crowded,
                (0..500u32)
                    .map(|n| ChunkId::from(blake3::hash(&n.to_be_bytes())))
                    .collect(),
            ]
            .concat(),
        ] {
            let list: Vec<ChunkRef> = ids
                .iter()
                .map(|&id| ChunkRef {
                    id,
                    size: 10,
                    stored_size: 10,
                })
                .collect();
            let t = ChunkTable::new(list);
            for (k, id) in ids.iter().enumerate() {
                assert_eq!(t.entry(id), Some(k as u32), "id {k}");
            }
            for absent in [
                with_prefix(0, u32::MAX),
                with_prefix(u32::MAX, u32::MAX),
                with_prefix(0x4000_0003, u32::MAX),
                with_prefix(0x8000_0000, 7),
                ChunkId::from(blake3::hash(b"absent")),
            ] {
                assert_eq!(t.entry(&absent), None);
            }
        }
    }

    #[test]
    fn ids_sharing_their_first_bytes_are_told_apart() {
        let same = |n: u8| {
            let mut b = [7u8; 32];
            b[31] = n;
            ChunkId(b)
        };
        let c = |id| ChunkRef {
            id,
            size: 10,
            stored_size: 10,
        };
        let payload = Payload {
            hash: [0; 32],
            kind: PayloadKind::RootfsImage,
            name: "rootfs".into(),
            size: 40,
            chunks: vec![c(same(3)), c(same(1)), c(id(1)), c(same(2))],
            references: Vec::new(),
        };
        let t = ChunkTable::new(payload.chunks);
        assert_eq!(
            [same(1), same(2), same(3), id(1), same(4)].map(|i| t.entry(&i)),
            [Some(1), Some(3), Some(0), Some(2), None]
        );
    }

    /// Offsets are kept every `OFFSET_STRIDE` positions; every position's offset
    /// (at, before and after a kept one, and in the last partial stride) is the
    /// sum of the sizes before it.
    #[test]
    fn every_position_has_its_offset_from_the_kept_ones() {
        let n = OFFSET_STRIDE * 5 + 7;
        let list: Vec<ChunkRef> = (0..n)
            .map(|k| ChunkRef {
                // Repeats (k % 7 == 3 shares one id) and varied sizes.
                id: if k % 7 == 3 { id(255) } else { id(k as u8) },
                size: if k % 7 == 3 { 64 } else { 100 + k as u32 * 3 },
                stored_size: 5,
            })
            .collect();
        let mut want = Vec::with_capacity(n);
        let mut at = 0u64;
        for c in &list {
            want.push(at);
            at += u64::from(c.size);
        }
        let t = ChunkTable::new(list);
        assert_eq!(t.offsets.len(), n.div_ceil(OFFSET_STRIDE));
        let got: Vec<u64> = (0..n as u32).map(|p| t.offset_at(p)).collect();
        assert_eq!(got, want);
        let repeated = t.entry(&id(255)).expect("the repeated id");
        assert_eq!(t.first_offset(repeated), want[3]);
        let more: Vec<u64> = (10..n).step_by(7).map(|p| want[p]).collect();
        assert_eq!(t.repeat_offsets(repeated).map(|r| r.to_vec()), Some(more));
        // Its positions, from the sparse list of repeats; one that appears once.
        let positions: Vec<u32> = (3..n as u32).step_by(7).collect();
        assert_eq!(t.positions_of(repeated).collect::<Vec<_>>(), positions);
        let once = t.entry(&id(4)).expect("appears once");
        assert_eq!(t.positions_of(once).collect::<Vec<_>>(), vec![4]);
        assert_eq!(t.more.len(), 1, "only the repeated entry is listed");
    }

    /// Ids in a "file" that counts its reads and fails from a position on.
    #[derive(Debug)]
    struct Flaky {
        ids: Vec<ChunkId>,
        fail_from: u32,
        reads: std::sync::atomic::AtomicUsize,
        ids_read: std::sync::atomic::AtomicUsize,
    }

    impl ChunkIdFile for Flaky {
        fn read_ids(&self, from: u32, out: &mut [ChunkId]) -> std::io::Result<()> {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.ids_read
                .fetch_add(out.len(), std::sync::atomic::Ordering::Relaxed);
            if from as usize + out.len() > self.fail_from as usize {
                return Err(std::io::Error::other("input/output error"));
            }
            out.copy_from_slice(&self.ids[from as usize..from as usize + out.len()]);
            Ok(())
        }
        fn describe(&self) -> String {
            "/data/envelopes/ab12.ids".into()
        }
    }

    fn file_table(list: &[ChunkRef], fail_from: u32) -> (ChunkTable, Arc<Flaky>) {
        let file = Arc::new(Flaky {
            ids: list.iter().map(|c| c.id).collect(),
            fail_from,
            reads: Default::default(),
            ids_read: Default::default(),
        });
        let ids = Ids::File(FileIds::new(
            Arc::clone(&file) as Arc<dyn ChunkIdFile>,
            list.len() as u32,
        ));
        let t = ChunkTable::build(
            ids,
            list.iter().map(|c| c.size).collect(),
            list.iter().map(|c| c.stored_size).collect(),
            list.iter().map(|c| prefix(&c.id)).collect(),
        );
        (t, file)
    }

    /// Issue 10: the ids in a file give the table the in-memory one has (entries,
    /// repeats, lookups, ids sharing their first bytes), read through the block
    /// cache: a pass in position order reads each block once.
    #[test]
    fn ids_in_a_file_give_the_same_table_read_by_block() {
        let same = |n: u16| {
            let mut b = [7u8; 32];
            b[30..].copy_from_slice(&n.to_be_bytes());
            ChunkId(b)
        };
        let n = BLOCK_IDS * 3 + 17;
        let list: Vec<ChunkRef> = (0..n)
            .map(|k| ChunkRef {
                // A repeated id, ids that share their first 4 bytes, and others.
                id: match k % 5 {
                    0 => id(200),
                    1 => same(k as u16),
                    _ => ChunkId::of(&k.to_le_bytes()),
                },
                size: 100 + k % 7,
                stored_size: 50 + k % 3,
            })
            .collect();
        let mem = ChunkTable::new(list.clone());
        let (file, f) = file_table(&list, u32::MAX);
        assert_eq!((file.entries(), file.positions()), (mem.entries(), n));
        let reads = f.reads.load(std::sync::atomic::Ordering::Relaxed);
        for e in 0..mem.entries() {
            assert_eq!(
                (
                    file.id(e),
                    file.size(e),
                    file.wire_size(e),
                    file.first_offset(e)
                ),
                (
                    mem.id(e),
                    mem.size(e),
                    mem.wire_size(e),
                    mem.first_offset(e)
                )
            );
        }
        // Entries in order of first appearance: positions in order, one read a
        // block (4 blocks), the cache cold or not.
        let more = f.reads.load(std::sync::atomic::Ordering::Relaxed) - reads;
        assert!(more <= 4, "{more} reads for a pass in position order");
        for c in &list {
            assert_eq!(file.entry(&c.id), mem.entry(&c.id));
        }
        assert_eq!(file.entry(&same(9999)), None);
        assert_eq!(
            file.entries_by_id().collect::<Vec<_>>(),
            mem.entries_by_id().collect::<Vec<_>>()
        );
        assert_eq!(
            file.positions_of(0).collect::<Vec<_>>(),
            mem.positions_of(0).collect::<Vec<_>>()
        );
        assert_eq!(file.ids_error(), None);
    }

    /// Issue 10: ids looked up in id order (random positions: the slot index
    /// written after an install) are read one by one, not a block each, and keep
    /// no block; a pass in position order still reads a block at a time, also
    /// one resumed mid-file.
    #[test]
    fn lookups_in_id_order_read_one_id_and_passes_in_order_a_block() {
        use std::sync::atomic::Ordering::Relaxed;
        let n = BLOCK_IDS * 512;
        let list: Vec<ChunkRef> = (0..n)
            .map(|k| ChunkRef {
                id: ChunkId::of(&k.to_le_bytes()),
                size: 10,
                stored_size: 10,
            })
            .collect();
        let (t, f) = file_table(&list, u32::MAX);
        // (Building read the few ids that share their first 4 bytes.)
        let built = f.ids_read.load(Relaxed);
        let by_id: Vec<u32> = t.entries_by_id().collect();
        for &e in &by_id {
            assert_eq!(t.id(e), list[e as usize].id);
        }
        let read = f.ids_read.load(Relaxed) - built;
        assert!(
            read < 3 * n as usize,
            "{read} ids read for {n} lookups in id order"
        );
        // A pass in position order from mid-file: a read a block (and the
        // first position's own).
        let (reads, ids) = (f.reads.load(Relaxed), f.ids_read.load(Relaxed));
        let from = BLOCK_IDS * 10 + 3;
        for p in from..n {
            assert_eq!(t.id(p), list[p as usize].id);
        }
        let blocks = (n - from).div_ceil(BLOCK_IDS) as usize;
        assert!(f.reads.load(Relaxed) - reads <= blocks + 2);
        assert!(f.ids_read.load(Relaxed) - ids <= (blocks + 1) * BLOCK_IDS as usize);
    }

    /// Issue 10: a read of the ids' file that fails is remembered (sticky, naming
    /// the file) and gives an id no chunk has, never another chunk's id.
    #[test]
    fn a_failed_read_of_the_ids_is_sticky_and_names_the_file() {
        let list: Vec<ChunkRef> = (0..BLOCK_IDS * 2)
            .map(|k| ChunkRef {
                id: ChunkId::of(&k.to_le_bytes()),
                size: 10,
                stored_size: 10,
            })
            .collect();
        // The second block cannot be read.
        let (t, _) = file_table(&list, BLOCK_IDS + 1);
        assert_eq!(t.ids_error(), None, "building read no id (prefixes differ)");
        assert_eq!(t.id(3), list[3].id);
        let far = BLOCK_IDS + 5;
        assert_eq!(t.id(far), ChunkId([0; 32]));
        assert_eq!(t.entry(&list[far as usize].id), None);
        assert_eq!(
            t.ids_error(),
            Some(
                "cannot read the release's chunk ids from /data/envelopes/ab12.ids: input/output error"
            )
        );
        // Still readable where it can be; the error stays.
        assert_eq!(t.id(4), list[4].id);
        assert!(t.ids_error().is_some());
    }
}
