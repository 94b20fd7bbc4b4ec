//! Probes reference rules for delta-encoded chunks (issue 12):
//! `ref_probe OLD.img NEW.img [LEVEL]`.
//!
//! For every chunk of NEW that OLD lacks it prints, per rule, the total stored bytes
//! when each chunk takes the smaller of its plain form (zstd LEVEL, no dictionary)
//! and a zstd frame against a reference (a raw prefix of OLD bytes), and how many
//! distinct references the rule needs. Rules:
//! - `local W`: OLD bytes of window W around where the previous chunk both hold
//!   ended in OLD, shifted by how far the chunk is from that chunk in NEW;
//! - `sketch W`: OLD bytes of window W around the OLD chunk sharing the most
//!   min-hash features with the chunk;
//! - `both W`: the two windows concatenated.
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use rayon::prelude::*;
use shoal_artifact::ChunkId;
use shoal_artifact::chunk;

fn delta(data: &[u8], prefix: &[u8], level: i32) -> usize {
    use zstd::zstd_safe::{CCtx, CParameter};
    let mut c = CCtx::create();
    c.set_parameter(CParameter::CompressionLevel(level))
        .unwrap();
    c.set_parameter(CParameter::ContentSizeFlag(true)).unwrap();
    c.ref_prefix(prefix).unwrap();
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    c.compress2(&mut out, data).unwrap();
    out.len()
}

/// Bottom-k min-hash features of 32-byte shingles (gear rolling hash).
fn features(data: &[u8], k: usize) -> Vec<u64> {
    let mut h: u64 = 0;
    let mut all = Vec::with_capacity(data.len());
    for &b in data {
        h = (h << 1).wrapping_add(GEAR[b as usize]);
        all.push(h.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }
    all.sort_unstable();
    all.dedup();
    all.truncate(k);
    all
}

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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let old = std::fs::read(&args[1]).unwrap();
    let new = std::fs::read(&args[2]).unwrap();
    let level: i32 = args.get(3).map_or(9, |s| s.parse().unwrap());
    let t = Instant::now();
    let oi = chunk::index(&old[..], chunk::CHUNKING_DEFAULT).unwrap();
    let ni = chunk::index(&new[..], chunk::CHUNKING_DEFAULT).unwrap();
    eprintln!("indexed in {:.1}s", t.elapsed().as_secs_f64());
    let mut at: HashMap<ChunkId, (u64, u32)> = HashMap::new();
    for &(o, id, l) in &oi {
        at.entry(id).or_insert((o, l));
    }
    // New distinct chunks the old image lacks, with their anchor: where in OLD the
    // same distance from the previous shared chunk falls.
    let mut seen = HashSet::new();
    let mut todo: Vec<(u64, u32, Option<u64>)> = Vec::new();
    let mut anchor: Option<(u64, u64)> = None; // (new end, old end)
    for &(o, id, l) in &ni {
        if let Some(&(oo, ol)) = at.get(&id) {
            anchor = Some((o + u64::from(l), oo + u64::from(ol)));
            continue;
        }
        if seen.insert(id) {
            let p = anchor.map(|(ne, oe)| oe + (o - ne));
            todo.push((o, l, p));
        }
    }
    let raw: u64 = todo.iter().map(|t| u64::from(t.1)).sum();
    eprintln!("{} new chunks, {} raw bytes", todo.len(), raw);
    let data = |o: u64, l: u32| &new[o as usize..o as usize + l as usize];
    let t = Instant::now();
    let plain: Vec<usize> = todo
        .par_iter()
        .map(|&(o, l, _)| chunk::encode(data(o, l), level).len())
        .collect();
    println!(
        "plain level {level}: {} bytes ({:.1}s)",
        plain.iter().sum::<usize>(),
        t.elapsed().as_secs_f64()
    );
    let window = |p: u64, w: u64, q: u64| -> (u64, u64) {
        // Quantized so neighbouring chunks share a reference.
        let p = p / q * q;
        let start = p.saturating_sub(w / 4);
        let end = (start + w).min(old.len() as u64);
        (start.min(end), end)
    };
    // Sketch index over old chunks.
    let k = 8;
    let t = Instant::now();
    let ofeat: Vec<Vec<u64>> = oi
        .par_iter()
        .map(|&(o, _, l)| features(&old[o as usize..o as usize + l as usize], k))
        .collect();
    let mut by_feat: HashMap<u64, Vec<u32>> = HashMap::new();
    for (i, f) in ofeat.iter().enumerate() {
        for &x in f {
            by_feat.entry(x).or_default().push(i as u32);
        }
    }
    let similar: Vec<Option<u32>> = todo
        .par_iter()
        .map(|&(o, l, _)| {
            let f = features(data(o, l), k);
            let mut votes: HashMap<u32, u32> = HashMap::new();
            for x in f {
                if let Some(v) = by_feat.get(&x)
                    && v.len() < 64
                {
                    for &i in v {
                        *votes.entry(i).or_default() += 1;
                    }
                }
            }
            votes
                .into_iter()
                .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))
                .filter(|&(_, n)| n >= 2)
                .map(|(i, _)| i)
        })
        .collect();
    eprintln!(
        "sketch: {:.1}s, {} of {} chunks found a similar one",
        t.elapsed().as_secs_f64(),
        similar.iter().flatten().count(),
        todo.len()
    );
    // REF_PROBE_ONLY=both:262144 measures one rule and window only.
    let only = std::env::var("REF_PROBE_ONLY").ok();
    let dlevel: i32 = std::env::var("REF_PROBE_DELTA_LEVEL")
        .ok()
        .map_or(level, |s| s.parse().unwrap());
    for &w in &[64u64 << 10, 256 << 10, 1 << 20] {
        for rule in ["local", "sketch", "both"] {
            if only.as_deref().is_some_and(|o| o != format!("{rule}:{w}")) {
                continue;
            }
            let t = Instant::now();
            let q = w / 4;
            let refs: Vec<Vec<(u64, u64)>> = todo
                .iter()
                .zip(&similar)
                .map(|(&(_, _, p), s)| {
                    let mut r = Vec::new();
                    if rule != "sketch"
                        && let Some(p) = p
                    {
                        r.push(window(p, w, q));
                    }
                    if rule != "local"
                        && let Some(i) = s
                    {
                        let (o, _, _) = oi[*i as usize];
                        r.push(window(o, w, q));
                    }
                    r
                })
                .collect();
            let distinct: HashSet<&Vec<(u64, u64)>> = refs.iter().collect();
            let sizes: Vec<usize> = todo
                .par_iter()
                .zip(&refs)
                .zip(&plain)
                .map(|((&(o, l, _), r), &p)| {
                    if r.is_empty() {
                        return p;
                    }
                    let prefix: Vec<u8> = r
                        .iter()
                        .flat_map(|&(s, e)| old[s as usize..e as usize].iter().copied())
                        .collect();
                    delta(data(o, l), &prefix, dlevel).min(p)
                })
                .collect();
            let better = sizes.iter().zip(&plain).filter(|(s, p)| s < p).count();
            println!(
                "delta level {dlevel} {rule:6} w={:5} KiB: {:9} bytes, {:5} distinct refs, {:5} chunks better ({:.1}s)",
                w >> 10,
                sizes.iter().sum::<usize>(),
                distinct.len(),
                better,
                t.elapsed().as_secs_f64()
            );
        }
    }
}
