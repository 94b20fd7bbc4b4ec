//! Measures chunking parameters and zstd levels on two real images: the size of a
//! full artifact of NEW and the download from OLD to NEW, for each combination.
//! This is how the defaults in `chunk.rs` were chosen (see `artifact/DESIGN.md`).
//!
//! `cargo run --release -p shoal-artifact --example tune -- OLD.img NEW.img [AVG_KIB...]`
//!
//! Full sizes are estimated from a deterministic third of the distinct chunks (by
//! id), scaled up; download sizes are exact.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::time::Instant;

use rayon::prelude::*;
use shoal_artifact::chunk::{self, Chunker};
use shoal_artifact::{ChunkId, Chunking};

const LEVELS: [i32; 6] = [1, 3, 6, 9, 15, 19];
/// Bytes per chunk in the manifest (id, size, stored size) and the tar header+padding.
const MANIFEST_PER_CHUNK: u64 = 45;
const TAR_PER_CHUNK: u64 = 512 + 256;

fn cut(path: &str, c: Chunking) -> Vec<(ChunkId, Vec<u8>)> {
    let f = BufReader::with_capacity(1 << 20, File::open(path).expect("image"));
    Chunker::new(f, c)
        .map(|r| {
            let ch = r.expect("read");
            (ChunkId::of(&ch.data), ch.data)
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (old, new) = (&args[1], &args[2]);
    let avgs: Vec<u32> = if args.len() > 3 {
        args[3..]
            .iter()
            .map(|a| a.parse::<u32>().expect("KiB") * 1024)
            .collect()
    } else {
        vec![16 * 1024, 32 * 1024, 64 * 1024, 128 * 1024]
    };
    println!("avg_KiB\tchunks\tdistinct\tlevel\tfull_MB\tdownload_MB\tcompress_s_per_GB_1core");
    for avg in avgs {
        let c = Chunking {
            min_size: avg / 4,
            avg_size: avg,
            max_size: avg * 4,
        };
        let old_ids: HashSet<ChunkId> = cut(old, c).into_iter().map(|(id, _)| id).collect();
        let chunks = cut(new, c);
        let total = chunks.len() as u64;
        let mut distinct: HashMap<ChunkId, Vec<u8>> = HashMap::new();
        for (id, d) in chunks {
            distinct.entry(id).or_insert(d);
        }
        let n_distinct = distinct.len() as u64;
        let sample: Vec<&Vec<u8>> = distinct
            .iter()
            .filter(|(id, _)| id.0[0] % 3 == 0)
            .map(|(_, d)| d)
            .collect();
        let sample_raw: u64 = sample.iter().map(|d| d.len() as u64).sum();
        let all_raw: u64 = distinct.values().map(|d| d.len() as u64).sum();
        let needed: Vec<&Vec<u8>> = distinct
            .iter()
            .filter(|(id, _)| !old_ids.contains(id))
            .map(|(_, d)| d)
            .collect();
        if std::env::var_os("TUNE_DICT").is_some() {
            dict_trial(&distinct, &old_ids, total, n_distinct, all_raw);
            continue;
        }
        for level in LEVELS {
            let t = Instant::now();
            let stored: u64 = sample
                .par_iter()
                .map(|d| chunk::encode(d, level).len() as u64)
                .sum();
            let secs = t.elapsed().as_secs_f64() * 2.0; // two cores
            let full_stored = stored as f64 * all_raw as f64 / sample_raw as f64;
            let full = full_stored as u64 + n_distinct * TAR_PER_CHUNK + total * MANIFEST_PER_CHUNK;
            let down: u64 = needed
                .par_iter()
                .map(|d| chunk::encode(d, level).len() as u64)
                .sum();
            let down = down + total * MANIFEST_PER_CHUNK;
            println!(
                "{}\t{}\t{}\t{}\t{:.2}\t{:.2}\t{:.1}",
                avg / 1024,
                total,
                n_distinct,
                level,
                full as f64 / 1e6,
                down as f64 / 1e6,
                secs / (sample_raw as f64 / 1e9),
            );
        }
    }
}

/// The same measurement with a zstd dictionary trained on a sample of the chunks.
fn dict_trial(
    distinct: &HashMap<ChunkId, Vec<u8>>,
    old_ids: &HashSet<ChunkId>,
    total: u64,
    n_distinct: u64,
    all_raw: u64,
) {
    let samples: Vec<&Vec<u8>> = distinct
        .iter()
        .filter(|(id, _)| id.0[1] % 4 == 0)
        .map(|(_, d)| d)
        .take(3000)
        .collect();
    for dict_kib in [64usize, 112] {
        let t = Instant::now();
        let dict = zstd::dict::from_samples(&samples, dict_kib * 1024).expect("train");
        let train_s = t.elapsed().as_secs_f64();
        for level in [6, 9, 12] {
            let t = Instant::now();
            let enc = |d: &Vec<u8>| {
                let mut c = zstd::bulk::Compressor::with_dictionary(level, &dict).unwrap();
                let z = c.compress(d).unwrap();
                z.len().min(d.len()) as u64
            };
            let stored: u64 = distinct
                .values()
                .collect::<Vec<_>>()
                .par_iter()
                .map(|d| enc(d))
                .sum();
            let secs = t.elapsed().as_secs_f64() * 2.0;
            let full = stored + dict.len() as u64 + n_distinct * 40 + total * MANIFEST_PER_CHUNK;
            let down: u64 = distinct
                .iter()
                .filter(|(id, _)| !old_ids.contains(id))
                .map(|(_, d)| d)
                .collect::<Vec<_>>()
                .par_iter()
                .map(|d| enc(d))
                .sum();
            let down = down + dict.len() as u64 + total * MANIFEST_PER_CHUNK;
            println!(
                "dict{}K train {:.1}s\tlevel {}\tfull(pack) {:.2} MB\tdownload {:.2} MB\t{:.1} s/GB/core",
                dict_kib,
                train_s,
                level,
                full as f64 / 1e6,
                down as f64 / 1e6,
                secs / (all_raw as f64 / 1e9)
            );
        }
    }
}
