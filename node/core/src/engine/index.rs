//! The active slot's chunk index: where each chunk the running slot holds is.
//!
//! Either the index the device store records for the slot, read through an
//! [`IndexReader`] by id (never loaded whole: 430,000 chunks of an 8 GiB image are
//! 20 MiB), or one handed over whole (a slot just cut by a driver that keeps no
//! store, the chunk list of a manifest), as one dense array sorted by id, or the
//! chunk table of the verified release the slot runs, shared with every engine
//! running it (a simulated fleet on one release keeps one copy). Chunks found later
//! by a probe read, and chunks that turned out not to be where the index said, are
//! kept beside it.
//!
//! An index is a hint, never trusted for bytes: every chunk read from the active
//! slot on its word is hashed against its id before it is used, so a stale or
//! damaged index costs a fetch, not a wrong write. A store that cannot be read is
//! an error of its own ([`IndexReadError`]): the install stops and says so rather
//! than planning as though the slot held nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use shoal_artifact::{ChunkId, Chunking};

use super::release::VerifiedRelease;
use super::table::ChunkTable;
use crate::Bitfield;
use crate::state::{Slot, SlotIndex, slot_ordinal};

/// Reading a slot index from the device store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reading the slot index from the device store failed: {0}")]
pub struct IndexReadError(pub String);

/// The slot indexes the device store records, read by chunk id: what a driver
/// keeps on disk (redb), or in memory for the simulator and tests
/// ([`MemIndexes`]). `get` and `scan` return the entries the store holds for the
/// slot, recorded complete or not (a power cut may leave one half-written): the
/// engine reads a slot's entries only once [`IndexReader::chunking`] is `Some`
/// for it, the mark of a complete index, and hashes every chunk read on an
/// entry's word against its id.
pub trait IndexReader: fmt::Debug + Send + Sync {
    /// Where chunk `id` is in `slot`: `(offset, len)` (the first of the id in slot
    /// order).
    fn get(&self, slot: Slot, id: &ChunkId) -> Result<Option<(u64, u32)>, IndexReadError>;

    /// Calls `f(id, offset, len)` for the entries of `slot`'s index whose id is
    /// `>= from`, in id order, until `f` returns `false` (one range read: a plan
    /// merges it with a release's ids instead of looking each up).
    fn scan(
        &self,
        slot: Slot,
        from: &ChunkId,
        f: &mut dyn FnMut(&ChunkId, u64, u32) -> bool,
    ) -> Result<(), IndexReadError>;

    /// How `slot`'s recorded index was cut, when the store holds a complete one.
    fn chunking(&self, slot: Slot) -> Result<Option<Chunking>, IndexReadError>;
}

/// The device store's index reader, in [`DeviceState`](crate::DeviceState). Two are
/// equal when they are the same reader.
#[derive(Clone)]
pub struct IndexStore(pub Arc<dyn IndexReader>);

impl fmt::Debug for IndexStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl PartialEq for IndexStore {
    fn eq(&self, other: &IndexStore) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for IndexStore {}

/// Slot indexes held in memory (the simulator's and the tests' store): each sorted
/// by id once, the first of each id in slot order kept.
#[derive(Debug, Default)]
pub struct MemIndexes {
    slots: [Option<(Chunking, Entries)>; 2],
}

/// `(id, offset, len)` sorted by id, the first of each id in slot order.
type Entries = Vec<(ChunkId, u64, u32)>;

impl MemIndexes {
    /// The indexes of both slots, by [`slot_ordinal`].
    pub fn new(indexes: &[Option<SlotIndex>; 2]) -> MemIndexes {
        MemIndexes {
            slots: [
                indexes[0].as_ref().map(|i| (i.chunking, sorted(i))),
                indexes[1].as_ref().map(|i| (i.chunking, sorted(i))),
            ],
        }
    }
}

fn sorted(index: &SlotIndex) -> Entries {
    let mut v: Vec<(ChunkId, u64, u32)> = index
        .chunks
        .iter()
        .map(|c| (c.id, c.offset, c.len))
        .collect();
    // Stable: of chunks with one id, the first in slot order stays first.
    v.sort_by_key(|c| c.0);
    v.dedup_by_key(|c| c.0);
    v.shrink_to_fit();
    v
}

fn find(v: &[(ChunkId, u64, u32)], id: &ChunkId) -> Option<(u64, u32)> {
    v.binary_search_by(|c| c.0.cmp(id))
        .ok()
        .map(|k| (v[k].1, v[k].2))
}

impl IndexReader for MemIndexes {
    fn get(&self, slot: Slot, id: &ChunkId) -> Result<Option<(u64, u32)>, IndexReadError> {
        Ok(self.slots[slot_ordinal(slot)]
            .as_ref()
            .and_then(|(_, v)| find(v, id)))
    }

    fn scan(
        &self,
        slot: Slot,
        from: &ChunkId,
        f: &mut dyn FnMut(&ChunkId, u64, u32) -> bool,
    ) -> Result<(), IndexReadError> {
        let Some((_, v)) = &self.slots[slot_ordinal(slot)] else {
            return Ok(());
        };
        let start = v.partition_point(|c| c.0 < *from);
        for (id, offset, len) in &v[start..] {
            if !f(id, *offset, *len) {
                break;
            }
        }
        Ok(())
    }

    fn chunking(&self, slot: Slot) -> Result<Option<Chunking>, IndexReadError> {
        Ok(self.slots[slot_ordinal(slot)].as_ref().map(|(c, _)| *c))
    }
}

#[derive(Debug, Default)]
enum Base {
    #[default]
    Empty,
    /// `(id, offset, len)` sorted by id, the first of each id in slot order.
    Own(Entries),
    /// The store's index of `slot`, read by id.
    Stored {
        slot: Slot,
        reader: Arc<dyn IndexReader>,
    },
    /// The slot holds this release.
    Release(Arc<VerifiedRelease>),
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct ActiveIndex {
    base: Base,
    chunking: Option<Chunking>,
    found: BTreeMap<ChunkId, (u64, u32)>,
    dropped: BTreeSet<ChunkId>,
}

impl ActiveIndex {
    /// The index of a slot handed over whole (cut by a driver without a store
    /// reader, or a manifest's chunk list).
    pub(crate) fn own(index: &SlotIndex) -> ActiveIndex {
        ActiveIndex {
            base: Base::Own(sorted(index)),
            chunking: Some(index.chunking),
            ..ActiveIndex::default()
        }
    }

    /// The index the store records for `slot`, cut with `chunking`, read through
    /// `reader`.
    pub(crate) fn stored(
        slot: Slot,
        chunking: Chunking,
        reader: Arc<dyn IndexReader>,
    ) -> ActiveIndex {
        ActiveIndex {
            base: Base::Stored { slot, reader },
            chunking: Some(chunking),
            ..ActiveIndex::default()
        }
    }

    /// The index of a slot that holds `release` (its chunk table, shared).
    pub(crate) fn release(release: Arc<VerifiedRelease>) -> ActiveIndex {
        ActiveIndex {
            chunking: Some(release.manifest.chunking),
            base: Base::Release(release),
            ..ActiveIndex::default()
        }
    }

    /// How the slot was cut, when it has an index.
    pub(crate) fn chunking(&self) -> Option<Chunking> {
        self.chunking
    }

    /// Where chunk `id` is: `(offset, len)`.
    pub(crate) fn get(&self, id: &ChunkId) -> Result<Option<(u64, u32)>, IndexReadError> {
        if let Some(&at) = self.found.get(id) {
            return Ok(Some(at));
        }
        if !self.dropped.is_empty() && self.dropped.contains(id) {
            return Ok(None);
        }
        Ok(match &self.base {
            Base::Empty => None,
            Base::Own(v) => find(v, id),
            Base::Stored { slot, reader } => reader.get(*slot, id)?,
            Base::Release(r) => r
                .table
                .entry(id)
                .map(|e| (r.table.first_offset(e), r.table.size(e))),
        })
    }

    /// The entries of `table` the index holds at their size, one bit each: for
    /// the store's index, one range read merged with the table's ids in id order
    /// (not a lookup per chunk).
    pub(crate) fn held(&self, table: &ChunkTable) -> Result<Bitfield, IndexReadError> {
        let mut held = Bitfield::new(table.entries());
        match &self.base {
            Base::Empty => {}
            Base::Stored { slot, reader } => {
                let mut ids = table.entries_by_id().peekable();
                if let Some(&first) = ids.peek() {
                    reader.scan(*slot, &table.id(first), &mut |id, _, len| {
                        while let Some(&e) = ids.peek() {
                            match table.id(e).cmp(id) {
                                std::cmp::Ordering::Less => {
                                    ids.next();
                                }
                                std::cmp::Ordering::Equal => {
                                    if table.size(e) == len {
                                        held.set(e);
                                    }
                                    ids.next();
                                    break;
                                }
                                std::cmp::Ordering::Greater => break,
                            }
                        }
                        ids.peek().is_some()
                    })?;
                }
            }
            Base::Own(_) | Base::Release(_) => {
                for e in 0..table.entries() {
                    let at = match &self.base {
                        Base::Own(v) => find(v, &table.id(e)),
                        Base::Release(r) => r
                            .table
                            .entry(&table.id(e))
                            .map(|k| (r.table.first_offset(k), r.table.size(k))),
                        _ => None,
                    };
                    if at.is_some_and(|(_, len)| len == table.size(e)) {
                        held.set(e);
                    }
                }
            }
        }
        for id in &self.dropped {
            if let Some(e) = table.entry(id) {
                held.clear(e);
            }
        }
        for (id, &(_, len)) in &self.found {
            if let Some(e) = table.entry(id)
                && table.size(e) == len
            {
                held.set(e);
            }
        }
        Ok(held)
    }

    /// A chunk found at `at` (a probe read verified it there).
    pub(crate) fn insert(&mut self, id: ChunkId, at: (u64, u32)) {
        self.dropped.remove(&id);
        self.found.insert(id, at);
    }

    /// A chunk that is not where the index said.
    pub(crate) fn remove(&mut self, id: &ChunkId) {
        self.found.remove(id);
        self.dropped.insert(*id);
    }

    /// Whether it shares a release's table.
    pub(crate) fn is_shared(&self) -> bool {
        matches!(self.base, Base::Release(_))
    }

    /// Heap bytes of its own (not of a shared table, nor of the store's).
    pub(crate) fn heap_bytes(&self) -> usize {
        let own = match &self.base {
            Base::Own(v) => v.capacity() * std::mem::size_of::<(ChunkId, u64, u32)>(),
            _ => 0,
        };
        own + (self.found.len() + self.dropped.len()) * 64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::IndexedChunk;

    fn id(k: u32) -> ChunkId {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&k.wrapping_mul(2_654_435_761).to_be_bytes());
        b[4..8].copy_from_slice(&k.to_be_bytes());
        ChunkId(b)
    }

    /// The store's index merged with a table's ids in one range pass says what a
    /// lookup per chunk says: every id the two share at one size, and no other.
    #[test]
    fn the_merge_of_a_stored_index_agrees_with_lookups() {
        let chunking = crate::testing::TEST_CHUNKING;
        // The slot: ids 0..3000 by threes, size 100 + k % 7, one repeated.
        let mut chunks: Vec<IndexedChunk> = (0..3000)
            .step_by(3)
            .map(|k| IndexedChunk {
                id: id(k),
                offset: u64::from(k) * 1000,
                len: 100 + k % 7,
            })
            .collect();
        chunks.push(IndexedChunk {
            id: id(0),
            offset: 9_999_999,
            len: 100,
        });
        let index = SlotIndex { chunking, chunks };
        // The release: ids 0..3000 by twos (a third shared), a few at another size.
        let list: Vec<shoal_artifact::ChunkRef> = (0..3000)
            .step_by(2)
            .map(|k| shoal_artifact::ChunkRef {
                id: id(k),
                size: if k % 11 == 0 { 1 } else { 100 + k % 7 },
                stored_size: 10,
            })
            .collect();
        let table = ChunkTable::new(list);
        let reader: Arc<dyn IndexReader> = Arc::new(MemIndexes::new(&[None, Some(index.clone())]));
        let stored = ActiveIndex::stored(Slot::B, chunking, Arc::clone(&reader));
        let own = ActiveIndex::own(&index);
        let held = stored.held(&table).expect("read");
        assert_eq!(held, own.held(&table).expect("read"));
        let mut expected = 0;
        for e in 0..table.entries() {
            let at = stored.get(&table.id(e)).expect("read");
            assert_eq!(at, own.get(&table.id(e)).expect("read"));
            let want = at.is_some_and(|(_, len)| len == table.size(e));
            assert_eq!(held.get(e), want, "entry {e}");
            expected += u32::from(want);
        }
        assert!(expected > 200, "the test shares ids: {expected}");
        // The first of a repeated id in slot order.
        assert_eq!(stored.get(&id(0)).expect("read"), Some((0, 100)));
        // Slot A has no index.
        let empty = ActiveIndex::stored(Slot::A, chunking, reader);
        assert_eq!(empty.held(&table).expect("read").count(), 0);
    }
}
