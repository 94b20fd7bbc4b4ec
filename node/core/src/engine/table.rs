//! The chunk table of a release payload: its distinct chunks ("entries", numbered in
//! order of first appearance) and its positions (the manifest's chunk list, where an
//! entry may appear several times), in dense arrays.
//!
//! The manifest's chunk list itself is the table's storage by position (an
//! entry's id and sizes are those at its first position): building the table
//! takes the list over instead of copying its ids, so a large release's list is
//! never in memory twice (40 bytes a chunk: 17 MiB for an 8 GiB image).

use std::sync::Arc;

use shoal_artifact::{ChunkId, ChunkRef};

/// No next position.
const NONE: u32 = u32::MAX;

/// Positions between two kept offsets: a position's offset is the last kept one
/// plus the sizes of the positions between (at most 15 additions), so the table
/// keeps half a byte a position for offsets instead of 8 (3.4 MB at 8 GiB).
const OFFSET_STRIDE: usize = 16;

/// The first 4 bytes of an id, big-endian (so prefixes sort as the ids do).
fn prefix(id: &ChunkId) -> u32 {
    u32::from_be_bytes([id.0[0], id.0[1], id.0[2], id.0[3]])
}

/// Marks, in a list of positions, an entry standing for every position it has
/// (positions are below it).
pub(crate) const WHOLE_ENTRY: u32 = 1 << 31;

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct ChunkTable {
    /// By position: the manifest's chunk (id, uncompressed size, size on the wire).
    list: Vec<ChunkRef>,
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
    /// matches (the search stays within this array).
    by_id: Vec<(u32, u32)>,
    /// `(entry, offsets of its positions after the first)` for each entry with
    /// several positions, sorted by entry: shared with each write of it.
    repeats: Vec<(u32, Arc<[u64]>)>,
}

impl ChunkTable {
    /// The table of a payload's chunk list (a validated manifest's, so sizes add
    /// up), which it keeps as its storage by position.
    ///
    /// Besides the table it keeps, it needs 8 bytes a position while it is built
    /// (positions sorted by id, and each position's first), so building the table
    /// of a large release does not cost a second copy of its ids.
    pub(crate) fn new(list: Vec<ChunkRef>) -> ChunkTable {
        let n = list.len();
        assert!(
            u32::try_from(n).is_ok_and(|n| n < WHOLE_ENTRY),
            "chunk count fits 31 bits"
        );
        let chunks = &list;
        let mut t = ChunkTable {
            list: Vec::new(),
            first: Vec::new(),
            entry_of: Vec::with_capacity(n),
            more: Vec::new(),
            repeated: Vec::new(),
            offsets: Vec::with_capacity(n.div_ceil(OFFSET_STRIDE)),
            by_id: Vec::new(),
            repeats: Vec::new(),
        };
        // Positions sorted by (id, position): each id's positions are a run, first
        // position first.
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_unstable_by(|&a, &b| {
            chunks[a as usize]
                .id
                .cmp(&chunks[b as usize].id)
                .then(a.cmp(&b))
        });
        // first_of[p]: the first position with p's id (linking each run).
        let mut first_of = vec![NONE; n];
        // (first position, later positions) of each id that repeats.
        let mut later: Vec<(u32, Box<[u32]>)> = Vec::new();
        for group in order.chunk_by(|&a, &b| chunks[a as usize].id == chunks[b as usize].id) {
            let first = group[0];
            if group.len() > 1 {
                later.push((first, group[1..].into()));
            }
            for &p in group {
                first_of[p as usize] = first;
            }
        }
        // Entries in order of first appearance.
        let mut offset = 0u64;
        for (p, c) in chunks.iter().enumerate() {
            let f = first_of[p] as usize;
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
            offset += u64::from(c.size);
        }
        drop(first_of);
        // The runs of `order` are in id order: their entries are the lookup array.
        order.dedup_by(|b, a| chunks[*a as usize].id == chunks[*b as usize].id);
        t.by_id = order
            .iter()
            .map(|&p| (prefix(&chunks[p as usize].id), t.entry_of[p as usize]))
            .collect();
        drop(order);
        t.list = list;
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

    /// The offsets of the entry's positions after the first, if it has several.
    pub(crate) fn repeat_offsets(&self, e: u32) -> Option<&Arc<[u64]>> {
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
        let from = self.by_id.partition_point(|&(p, _)| p < want);
        self.by_id[from..]
            .iter()
            .take_while(|&&(p, _)| p == want)
            .map(|&(_, e)| e)
            .find(|&e| self.at_first(e).id == *id)
    }

    /// The chunk at the entry's first position.
    fn at_first(&self, e: u32) -> &ChunkRef {
        &self.list[self.first[e as usize] as usize]
    }

    pub(crate) fn id(&self, e: u32) -> ChunkId {
        self.at_first(e).id
    }

    pub(crate) fn size(&self, e: u32) -> u32 {
        self.at_first(e).size
    }

    pub(crate) fn wire_size(&self, e: u32) -> u32 {
        self.at_first(e).stored_size
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
            + self.list[kept * OFFSET_STRIDE..p]
                .iter()
                .map(|c| u64::from(c.size))
                .sum::<u64>()
    }

    /// The entries in id order.
    pub(crate) fn entries_by_id(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_id.iter().map(|&(_, e)| e)
    }

    /// The entry's positions, in payload order.
    pub(crate) fn positions_of(&self, e: u32) -> impl Iterator<Item = u32> + '_ {
        let more: &[u32] = if self.repeated[e as usize / 64] >> (e % 64) & 1 == 1 {
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
        self.list.capacity() * std::mem::size_of::<ChunkRef>()
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
        // The repeats after the first position, for the entries that repeat only.
        assert_eq!(t.repeat_offsets(0).map(|r| &r[..]), Some(&[30u64, 70][..]));
        assert_eq!(t.repeat_offsets(1), None);
        assert_eq!(t.repeat_offsets(2), None);
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

    #[test]
    fn the_table_keeps_the_chunk_list_it_is_given_not_a_copy() {
        let list: Vec<ChunkRef> = (0..100u8)
            .map(|n| ChunkRef {
                id: id(n),
                size: 10,
                stored_size: 5,
            })
            .collect();
        let at = list.as_ptr();
        let t = ChunkTable::new(list);
        assert_eq!(t.list.as_ptr(), at, "the list's buffer is the table's");
        assert_eq!((t.id(7), t.size(7), t.wire_size(7)), (id(7), 10, 5));
        assert_eq!(t.entry(&id(42)), Some(42));
    }
}
