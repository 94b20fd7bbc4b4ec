//! Choosing references for delta-encoded chunks (issue 12): which bytes of the base
//! release a new chunk is compressed against.
//!
//! Two rules, measured on the bench's Debian images (`examples/ref_probe.rs`, see
//! `artifact/DESIGN.md`), and a reference is both windows concatenated:
//! - **locality**: the base bytes around where the chunk would be if the stretch
//!   since the previous chunk both releases hold had kept its place (file systems
//!   and package managers mostly rewrite in place or append nearby);
//! - **similarity**: the base bytes around the base chunk that shares the most
//!   min-hash features with the chunk (a file that moved, a library rebuilt
//!   elsewhere in the image).
//!
//! Windows are quantized so that neighbouring chunks share a reference (the manifest
//! names each reference once, and a device reads and checks it once).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;

use rayon::prelude::*;

use crate::manifest::{ChunkId, Manifest};

/// Bytes of base data in each window (so a reference is at most two of them).
pub const WINDOW: u64 = 256 * 1024;
/// Windows start on multiples of this (before the lead-in): neighbours share them.
const QUANTUM: u64 = WINDOW / 4;
/// Min-hash features kept per chunk.
const FEATURES: usize = 8;
/// A feature shared by more base chunks than this says nothing (zeros, padding).
const FEATURE_CHUNKS_MAX: usize = 64;
/// Features a base chunk must share with a chunk to be called similar.
const VOTES_MIN: u32 = 2;

/// Why a base image cannot serve as the reference of a build.
#[derive(Debug, thiserror::Error)]
pub enum BaseImageError {
    /// Reading it failed.
    #[error("reading the base image: {0}")]
    Io(#[from] io::Error),
    /// The base manifest has no payload of the name being built.
    #[error("the base release has no payload named {0:?}")]
    NoPayload(String),
    /// The image is not the base release's payload.
    #[error("the base image is not the base release's payload {payload:?} (its hash differs)")]
    Mismatch {
        /// The payload's name.
        payload: String,
    },
}

/// The base release's payload, opened and checked, with what the rules need.
#[derive(Debug)]
pub struct RefBase {
    file: File,
    size: u64,
    /// Where each base chunk (first occurrence) ends in the base payload.
    held_end: HashMap<ChunkId, u64>,
    /// Start offset of each base chunk, by position.
    starts: Vec<u64>,
    /// Feature -> base chunk positions holding it.
    sketch: HashMap<u64, Vec<u32>>,
}

impl RefBase {
    /// Reads `file` once: checks it is `base`'s payload `payload` (size and BLAKE3)
    /// and computes the similarity index of its chunks. Memory: a batch of chunks and
    /// about 100 bytes per base chunk.
    pub fn open(file: File, base: &Manifest, payload: &str) -> Result<RefBase, BaseImageError> {
        let p = base
            .payload(payload)
            .ok_or_else(|| BaseImageError::NoPayload(payload.to_string()))?;
        let mut held_end = HashMap::new();
        let mut starts = Vec::with_capacity(p.chunks.len());
        for (o, c) in p.chunk_offsets() {
            starts.push(o);
            held_end.entry(c.id).or_insert(o + u64::from(c.size));
        }
        let mut reader = BufReader::with_capacity(1 << 20, &file);
        let mut hasher = blake3::Hasher::new();
        let mut sketch: HashMap<u64, Vec<u32>> = HashMap::new();
        let mut first = HashSet::new();
        const BATCH: usize = 4 << 20;
        let mut next = 0usize;
        while next < p.chunks.len() {
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            while next < p.chunks.len() && bytes < BATCH {
                let mut buf = vec![0u8; p.chunks[next].size as usize];
                reader.read_exact(&mut buf).map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        BaseImageError::Mismatch {
                            payload: payload.to_string(),
                        }
                    } else {
                        BaseImageError::Io(e)
                    }
                })?;
                hasher.update(&buf);
                bytes += buf.len();
                batch.push((next, buf));
                next += 1;
            }
            // Each distinct chunk once (an image repeats zero blocks thousands of
            // times).
            batch.retain(|(i, _)| first.insert(p.chunks[*i].id));
            let features: Vec<(usize, Vec<u64>)> = batch
                .par_iter()
                .map(|(i, data)| (*i, features(data)))
                .collect();
            for (i, fs) in features {
                for f in fs {
                    let v = sketch.entry(f).or_default();
                    if v.len() <= FEATURE_CHUNKS_MAX {
                        v.push(u32::try_from(i).expect("a manifest's chunk count fits u32"));
                    }
                }
            }
        }
        if *hasher.finalize().as_bytes() != p.hash {
            return Err(BaseImageError::Mismatch {
                payload: payload.to_string(),
            });
        }
        Ok(RefBase {
            file,
            size: p.size,
            held_end,
            starts,
            sketch,
        })
    }

    /// Where chunk `id` ends in the base payload, if the base holds it.
    pub fn held_end(&self, id: &ChunkId) -> Option<u64> {
        self.held_end.get(id).copied()
    }

    /// The reference ranges for a new chunk `data`: the locality window around
    /// `anchor` (the base offset where the chunk would be), then the similarity
    /// window; overlapping windows merge. Empty when neither rule finds base bytes.
    pub fn ranges(&self, anchor: Option<u64>, data: &[u8]) -> Vec<(u64, u32)> {
        let mut windows: Vec<(u64, u64)> = Vec::new();
        if let Some(p) = anchor {
            windows.push(self.window(p));
        }
        if let Some(i) = self.similar(data) {
            let w = self.window(self.starts[i as usize]);
            match windows.first_mut() {
                Some(first) if w.0 <= first.1 && first.0 <= w.1 => {
                    *first = (first.0.min(w.0), first.1.max(w.1));
                }
                _ => windows.push(w),
            }
        }
        windows
            .into_iter()
            .filter(|(s, e)| e > s)
            .map(|(s, e)| {
                (
                    s,
                    u32::try_from(e - s).expect("a window is at most 2 WINDOW"),
                )
            })
            .collect()
    }

    /// The quantized window around base offset `p`, within the payload.
    fn window(&self, p: u64) -> (u64, u64) {
        let p = p.min(self.size) / QUANTUM * QUANTUM;
        let start = p.saturating_sub(WINDOW / 4);
        let end = (start + WINDOW).min(self.size);
        (start.min(end), end)
    }

    /// The base chunk sharing the most features with `data` (at least
    /// [`VOTES_MIN`]; ties to the earliest).
    fn similar(&self, data: &[u8]) -> Option<u32> {
        let mut votes: HashMap<u32, u32> = HashMap::new();
        for f in features(data) {
            if let Some(v) = self.sketch.get(&f)
                && v.len() <= FEATURE_CHUNKS_MAX
            {
                for &i in v {
                    *votes.entry(i).or_default() += 1;
                }
            }
        }
        votes
            .into_iter()
            .filter(|&(_, n)| n >= VOTES_MIN)
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))
            .map(|(i, _)| i)
    }

    /// The bytes of `ranges`, concatenated.
    pub fn read(&self, ranges: &[(u64, u32)]) -> io::Result<Vec<u8>> {
        let total: usize = ranges.iter().map(|&(_, l)| l as usize).sum();
        let mut out = vec![0u8; total];
        let mut at = 0;
        for &(o, l) in ranges {
            self.file.read_exact_at(&mut out[at..at + l as usize], o)?;
            at += l as usize;
        }
        Ok(out)
    }
}

/// Bottom-k min-hash features of a chunk's 32-byte shingles (a gear rolling hash,
/// mixed), so chunks that share most of their content share most features.
fn features(data: &[u8]) -> Vec<u64> {
    // The FEATURES smallest distinct values, ascending; one compare per byte mostly.
    let mut best = [u64::MAX; FEATURES];
    let mut h: u64 = 0;
    for &b in data {
        h = (h << 1).wrapping_add(GEAR[b as usize]);
        let v = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        if v < best[FEATURES - 1] && !best.contains(&v) {
            let at = best.partition_point(|&x| x < v);
            best.copy_within(at..FEATURES - 1, at + 1);
            best[at] = v;
        }
    }
    best.into_iter().filter(|&v| v != u64::MAX).collect()
}

/// Gear table: fixed pseudo-random values (xorshift from a constant seed).
static GEAR: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut i = 0;
    while i < 256 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        t[i] = x;
        i += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similar_chunks_share_features_and_unrelated_ones_do_not() {
        let a: Vec<u8> = (0..16384u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut b = a.clone();
        b[100..140].fill(7);
        let c: Vec<u8> = (0..16384u32)
            .map(|i| (i.wrapping_mul(40_503) >> 5) as u8 ^ 0x5a)
            .collect();
        let (fa, fb, fc) = (features(&a), features(&b), features(&c));
        assert_eq!(fa.len(), FEATURES);
        let shared = |x: &[u64], y: &[u64]| x.iter().filter(|f| y.contains(f)).count();
        assert!(shared(&fa, &fb) >= 6, "{}", shared(&fa, &fb));
        assert_eq!(shared(&fa, &fc), 0);
    }
    /// A base of `size` bytes (the file is not read by `ranges`), its chunks
    /// starting at `starts`, and the features of `similar` as those of base chunk
    /// `i` (nothing else in the sketch).
    fn base(size: u64, starts: Vec<u64>, similar: Option<(&[u8], u32)>) -> RefBase {
        let mut sketch: HashMap<u64, Vec<u32>> = HashMap::new();
        if let Some((data, i)) = similar {
            for f in features(data) {
                sketch.entry(f).or_default().push(i);
            }
        }
        RefBase {
            file: tempfile::tempfile().expect("a temporary file"),
            size,
            held_end: HashMap::new(),
            starts,
            sketch,
        }
    }

    #[test]
    fn the_locality_window_lies_around_the_anchor_quantized_and_within_the_payload() {
        const MIB: u64 = 1024 * 1024;
        let b = base(4 * MIB, vec![0], None);
        let chunk = vec![1u8; 4096];
        // A quarter window before the anchor's quantum, a window long.
        let around = (1_000_000 / QUANTUM * QUANTUM - WINDOW / 4, WINDOW as u32);
        assert_eq!(b.ranges(Some(1_000_000), &chunk), vec![around]);
        // Anchors in one quantum share the reference (read and checked once).
        assert_eq!(b.ranges(Some(1_040_000), &chunk), vec![around]);
        assert_ne!(b.ranges(Some(1_050_000), &chunk), vec![around]);
        // Clipped at the payload's start and end.
        assert_eq!(b.ranges(Some(10_000), &chunk), vec![(0, WINDOW as u32)]);
        assert_eq!(
            b.ranges(Some(4 * MIB + 5), &chunk),
            vec![(4 * MIB - WINDOW / 4, (WINDOW / 4) as u32)]
        );
        // No anchor (the chunk follows nothing the base holds), nothing similar.
        assert_eq!(b.ranges(None, &chunk), Vec::<(u64, u32)>::new());
    }

    #[test]
    fn the_similar_chunks_window_follows_the_locality_one_or_merges_with_it() {
        const MIB: u64 = 1024 * 1024;
        let data: Vec<u8> = (0..16384u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        // Base chunk 1, which shares the chunk's features, starts at 3 MiB.
        let b = base(4 * MIB, vec![0, 3 * MIB], Some((&data, 1)));
        let at_3 = (3 * MIB - WINDOW / 4, WINDOW as u32);
        // Alone, when there is no anchor.
        assert_eq!(b.ranges(None, &data), vec![at_3]);
        // After the locality window, far from it.
        let at_1 = (MIB - WINDOW / 4, WINDOW as u32);
        assert_eq!(b.ranges(Some(MIB), &data), vec![at_1, at_3]);
        // One window where the two overlap.
        assert_eq!(
            b.ranges(Some(3 * MIB + QUANTUM), &data),
            vec![(3 * MIB - WINDOW / 4, (WINDOW + QUANTUM) as u32)]
        );
    }
}
