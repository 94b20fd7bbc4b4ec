//! The active slot's chunk index: where each chunk the running slot holds is.
//!
//! Either the device's own (from the store, or cut by the driver), as one dense
//! array sorted by id, or the chunk table of the verified release the slot runs,
//! shared with every engine running it (a simulated fleet on one release keeps one
//! copy). Chunks found later by a probe read, and chunks that turned out not to be
//! where the index said, are kept beside it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use shoal_artifact::{ChunkId, Chunking};

use super::release::VerifiedRelease;
use crate::state::SlotIndex;

#[derive(Debug, Default)]
enum Base {
    #[default]
    Empty,
    /// `(id, offset, len)` sorted by id, the first of each id in slot order.
    Own(Vec<(ChunkId, u64, u32)>),
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
    /// The index of a slot as recorded (or cut).
    pub(crate) fn own(index: &SlotIndex) -> ActiveIndex {
        let mut v: Vec<(ChunkId, u64, u32)> = index
            .chunks
            .iter()
            .map(|c| (c.id, c.offset, c.len))
            .collect();
        // Stable: of chunks with one id, the first in slot order stays first.
        v.sort_by_key(|c| c.0);
        v.dedup_by_key(|c| c.0);
        v.shrink_to_fit();
        ActiveIndex {
            base: Base::Own(v),
            chunking: Some(index.chunking),
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
    pub(crate) fn get(&self, id: &ChunkId) -> Option<(u64, u32)> {
        if let Some(&at) = self.found.get(id) {
            return Some(at);
        }
        if !self.dropped.is_empty() && self.dropped.contains(id) {
            return None;
        }
        match &self.base {
            Base::Empty => None,
            Base::Own(v) => v
                .binary_search_by(|c| c.0.cmp(id))
                .ok()
                .map(|k| (v[k].1, v[k].2)),
            Base::Release(r) => r
                .table
                .entry(id)
                .map(|e| (r.table.first_offset(e), r.table.size(e))),
        }
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

    /// Heap bytes of its own (not of a shared table).
    pub(crate) fn heap_bytes(&self) -> usize {
        let own = match &self.base {
            Base::Own(v) => v.capacity() * std::mem::size_of::<(ChunkId, u64, u32)>(),
            _ => 0,
        };
        own + (self.found.len() + self.dropped.len()) * 64
    }
}
