//! Which FastCDC parameters and zstd level make the v1 → v2 download small?
//!
//! `cargo run --release -p shoal-bench --example chunking -- v1.img v2.img [AVG_KIB...]`
//!
//! For each average chunk size (min = avg/4, max = avg*4, FastCDC 2020, as the artifact
//! builder cuts), cuts both images, and prints: the number of v2 chunks, the bytes of
//! the distinct v2 chunks that v1 lacks (raw, and zstd-compressed per chunk at levels
//! 3, 12 and 19, stored raw when that is smaller), an estimate of the manifest's chunk
//! list (40 bytes per chunk entry), and for the full artifact: the number of distinct
//! chunks, their tar framing (a 512-byte header plus padding to 512 per member), and
//! their stored bytes at levels 12 and 19, and at level 12 when consecutive distinct
//! chunks are compressed together in groups of at least 1 MiB (one zstd frame each).
//! This is an exploration aid for choosing the defaults, not one of the goal figures.

use std::collections::HashSet;
use std::fs::File;
use std::io::BufReader;

use anyhow::{Context, Result};

const LEVELS: [i32; 3] = [3, 12, 19];
/// Approximate CBOR size of one manifest chunk entry (32-byte id + size + framing).
const ENTRY_BYTES: u64 = 40;

fn cut(path: &str, avg: usize) -> Result<impl Iterator<Item = Result<Vec<u8>>>> {
    let file = File::open(path).with_context(|| format!("cannot open {path}"))?;
    let cdc = fastcdc::v2020::StreamCDC::new(BufReader::new(file), avg / 4, avg, avg * 4);
    Ok(cdc.map(|c| c.map(|c| c.data).context("chunking failed")))
}

fn stored(data: &[u8], level: i32) -> Result<u64> {
    let z = zstd::bulk::compress(data, level)?;
    Ok(z.len().min(data.len()) as u64)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (v1, v2) = match args.as_slice() {
        [v1, v2, ..] => (v1.as_str(), v2.as_str()),
        _ => anyhow::bail!("usage: chunking V1.img V2.img [AVG_KIB...]"),
    };
    let avgs: Vec<usize> = if args.len() > 2 {
        args[2..]
            .iter()
            .map(|a| a.parse::<usize>().map(|k| k * 1024))
            .collect::<Result<_, _>>()
            .context("AVG_KIB must be integers")?
    } else {
        vec![8 * 1024, 16 * 1024, 32 * 1024, 64 * 1024]
    };
    println!(
        "| avg KiB | v2 chunks | new chunks | new raw MB | new z3 MB | new z12 MB | new z19 MB | manifest est. MB | distinct | tar framing MB | full z12 MB | full z19 MB | full z12 1 MiB groups MB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for avg in avgs {
        let mut old = HashSet::new();
        for chunk in cut(v1, avg)? {
            old.insert(*blake3::hash(&chunk?).as_bytes());
        }
        let (mut count, mut new_count, mut new_raw, mut full) = (0u64, 0u64, 0u64, 0u64);
        let (mut distinct, mut framing, mut full19, mut grouped) = (0u64, 0u64, 0u64, 0u64);
        let mut group = Vec::new();
        let mut new_z = [0u64; LEVELS.len()];
        let mut seen = HashSet::new();
        for chunk in cut(v2, avg)? {
            let chunk = chunk?;
            count += 1;
            let id = *blake3::hash(&chunk).as_bytes();
            if !seen.insert(id) {
                continue;
            }
            let z12 = stored(&chunk, 12)?;
            full += z12;
            full19 += stored(&chunk, 19)?;
            distinct += 1;
            framing += 512 + (512 - z12 % 512) % 512;
            group.extend_from_slice(&chunk);
            if group.len() >= 1 << 20 {
                grouped += stored(&group, 12)?;
                group.clear();
            }
            if old.contains(&id) {
                continue;
            }
            new_count += 1;
            new_raw += chunk.len() as u64;
            for (slot, level) in new_z.iter_mut().zip(LEVELS) {
                *slot += if level == 12 {
                    z12
                } else {
                    stored(&chunk, level)?
                };
            }
        }
        if !group.is_empty() {
            grouped += stored(&group, 12)?;
        }
        let mb = |b: u64| b as f64 / 1e6;
        println!(
            "| {} | {count} | {new_count} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {distinct} | {:.2} | {:.2} | {:.2} | {:.2} |",
            avg / 1024,
            mb(new_raw),
            mb(new_z[0]),
            mb(new_z[1]),
            mb(new_z[2]),
            mb(count * ENTRY_BYTES),
            mb(framing),
            mb(full),
            mb(full19),
            mb(grouped),
        );
    }
    Ok(())
}
