//! Where each entry (distinct chunk) of the plan is, in one byte per entry: the
//! state code by entry, the request of each entry being fetched in a small map
//! (only chunks in flight), and the two queues (reads of the active slot, fetches)
//! as the entries in that state, taken in entry order from a cursor. No per-entry
//! queue memory: a 30,000-chunk install keeps 30 KB here, whatever is queued.

// Lookups only, never iterated, with a deterministic hasher: neither iteration
// order nor OS randomness (what the crate's ban on `HashMap` guards against) can
// reach a decision through it.
#[allow(clippy::disallowed_types)]
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The map of chunks in flight to their request (see the `use` above).
#[allow(clippy::disallowed_types)]
type Claims = HashMap<u32, u32, BuildHasherDefault<EntryHasher>>;

/// Where one entry of the plan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Written (all its positions), or never needed.
    Done,
    /// Needed, in no queue: left to an open stream, or no source can serve it now.
    Idle,
    /// In the queue of reads of the active slot.
    QueuedRead,
    /// Being read from the active slot; `guess`: at its own payload offset, not
    /// from the slot's index.
    Reading { guess: bool },
    /// In the queue of fetches.
    QueuedFetch,
    /// Asked of a source, in the request in this slab slot.
    Fetching { req: u32 },
    /// Waiting for a LAN peer: another swarm member owns it and no peer has it yet.
    Lan,
}

const DONE: u8 = 0;
const IDLE: u8 = 1;
const QUEUED_READ: u8 = 2;
const READING: u8 = 3;
const READING_GUESS: u8 = 4;
const QUEUED_FETCH: u8 = 5;
const FETCHING: u8 = 6;
const LAN: u8 = 7;

/// Hashes entry numbers for the map of chunks in flight (deterministic: no OS
/// randomness in the engine; lookups only, never iterated for a decision).
#[derive(Debug, Default)]
pub(crate) struct EntryHasher(u64);

impl Hasher for EntryHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// See the module documentation.
#[derive(Debug)]
#[cfg_attr(test, derive(PartialEq))]
pub(crate) struct NeedTable {
    codes: Vec<u8>,
    /// Entry → request slab slot, for the entries in [`Need::Fetching`].
    claims: Claims,
    /// Entries in [`Need::QueuedRead`], and no such entry is below `read_cursor`.
    queued_reads: u32,
    read_cursor: u32,
    /// Entries in [`Need::QueuedFetch`], and no such entry is below `fetch_cursor`.
    queued_fetches: u32,
    fetch_cursor: u32,
}

impl NeedTable {
    /// `n` entries, all [`Need::Done`].
    pub(crate) fn new(n: u32) -> NeedTable {
        NeedTable {
            codes: vec![DONE; n as usize],
            claims: Claims::with_capacity_and_hasher(256, BuildHasherDefault::default()),
            queued_reads: 0,
            read_cursor: n,
            queued_fetches: 0,
            fetch_cursor: n,
        }
    }

    /// `n` entries, all [`Need::Idle`]: [`NeedTable::new`] then
    /// [`NeedTable::set`] of each to `Idle`, without the walk.
    pub(crate) fn all_idle(n: u32) -> NeedTable {
        let mut t = NeedTable::new(0);
        t.codes = vec![IDLE; n as usize];
        (t.read_cursor, t.fetch_cursor) = (n, n);
        t
    }

    pub(crate) fn get(&self, e: u32) -> Need {
        match self.codes[e as usize] {
            DONE => Need::Done,
            IDLE => Need::Idle,
            QUEUED_READ => Need::QueuedRead,
            READING => Need::Reading { guess: false },
            READING_GUESS => Need::Reading { guess: true },
            QUEUED_FETCH => Need::QueuedFetch,
            FETCHING => Need::Fetching {
                req: *self.claims.get(&e).expect("a fetching entry has a claim"),
            },
            _ => Need::Lan,
        }
    }

    pub(crate) fn set(&mut self, e: u32, new: Need) {
        let old = self.codes[e as usize];
        match old {
            QUEUED_READ => self.queued_reads -= 1,
            QUEUED_FETCH => self.queued_fetches -= 1,
            FETCHING => {
                self.claims.remove(&e);
            }
            _ => {}
        }
        let code = match new {
            Need::Done => DONE,
            Need::Idle => IDLE,
            Need::QueuedRead => {
                self.queued_reads += 1;
                self.read_cursor = self.read_cursor.min(e);
                QUEUED_READ
            }
            Need::Reading { guess: false } => READING,
            Need::Reading { guess: true } => READING_GUESS,
            Need::QueuedFetch => {
                self.queued_fetches += 1;
                self.fetch_cursor = self.fetch_cursor.min(e);
                QUEUED_FETCH
            }
            Need::Fetching { req } => {
                self.claims.insert(e, req);
                FETCHING
            }
            Need::Lan => LAN,
        };
        self.codes[e as usize] = code;
    }

    /// Entries.
    pub(crate) fn len(&self) -> u32 {
        self.codes.len() as u32
    }

    /// Every entry's state, by entry.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn iter(&self) -> impl Iterator<Item = Need> + '_ {
        (0..self.len()).map(|e| self.get(e))
    }

    /// Entries queued for reading.
    pub(crate) fn queued_reads(&self) -> u32 {
        self.queued_reads
    }

    /// Entries queued for fetching.
    pub(crate) fn queued_fetches(&self) -> u32 {
        self.queued_fetches
    }

    /// The next queued read (it stays queued until its state is set).
    pub(crate) fn next_read(&mut self) -> Option<u32> {
        let e = self.scan(self.read_cursor, QUEUED_READ, self.queued_reads)?;
        self.read_cursor = e + 1;
        Some(e)
    }

    /// The next queued read, without moving the cursor.
    pub(crate) fn first_read(&self) -> Option<u32> {
        self.scan(self.read_cursor, QUEUED_READ, self.queued_reads)
    }

    /// The next queued fetch after the cursor, which moves past it (it stays queued
    /// until its state is set; [`NeedTable::rewind_fetches`] brings the cursor back
    /// to an entry left queued).
    pub(crate) fn next_fetch(&mut self) -> Option<u32> {
        let e = self.scan(self.fetch_cursor, QUEUED_FETCH, self.queued_fetches)?;
        self.fetch_cursor = e + 1;
        Some(e)
    }

    /// The first queued fetch, without moving the cursor.
    pub(crate) fn first_fetch(&self) -> Option<u32> {
        self.scan(self.fetch_cursor, QUEUED_FETCH, self.queued_fetches)
    }

    /// Entries from `e` on that are still queued are taken again first.
    pub(crate) fn rewind_fetches(&mut self, e: u32) {
        self.fetch_cursor = self.fetch_cursor.min(e);
    }

    /// Whether entry `e` is where the fetch queue will find it (for the
    /// invariants check).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn fetch_reachable(&self, e: u32) -> bool {
        e >= self.fetch_cursor
    }

    fn scan(&self, from: u32, code: u8, count: u32) -> Option<u32> {
        if count == 0 {
            return None;
        }
        let from = from as usize;
        self.codes
            .get(from..)?
            .iter()
            .position(|&c| c == code)
            .map(|k| (from + k) as u32)
    }

    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.codes.capacity() + self.claims.capacity() * 12
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_the_entries_in_their_state_from_a_cursor() {
        let mut t = NeedTable::new(6);
        for e in [4, 1, 3] {
            t.set(e, Need::QueuedFetch);
        }
        t.set(2, Need::Fetching { req: 7 });
        assert_eq!(t.get(2), Need::Fetching { req: 7 });
        assert_eq!((t.queued_fetches(), t.first_fetch()), (3, Some(1)));
        assert_eq!(t.next_fetch(), Some(1));
        // Left queued (parked), then taken again after a rewind.
        assert_eq!(t.next_fetch(), Some(3));
        t.set(3, Need::Idle);
        assert_eq!(t.next_fetch(), Some(4));
        assert_eq!(t.next_fetch(), None);
        t.rewind_fetches(1);
        assert_eq!(t.next_fetch(), Some(1));
        // An entry queued behind the cursor brings the cursor back.
        t.set(0, Need::QueuedFetch);
        assert_eq!(t.next_fetch(), Some(0));
        t.set(2, Need::Done);
        assert_eq!(t.claims.len(), 0);
        assert_eq!(t.queued_fetches(), 3);
        t.set(0, Need::Reading { guess: true });
        assert_eq!(t.get(0), Need::Reading { guess: true });
        assert_eq!(t.queued_fetches(), 2);
    }
}
