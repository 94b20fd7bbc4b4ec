//! Probes dictionary training on an image: `dict_probe IMAGE STRIDE`.
use std::collections::HashSet;
use std::io::BufReader;
use std::time::Instant;

use shoal_artifact::ChunkId;
use shoal_artifact::chunk::{self, Chunker, Dictionary};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let stride: usize = args[2].parse().unwrap();
    let f = BufReader::new(std::fs::File::open(&args[1]).unwrap());
    let mut seen = HashSet::new();
    let mut samples = Vec::new();
    let mut all = Vec::new();
    let mut all_seen = HashSet::new();
    for (i, c) in Chunker::new(f, chunk::CHUNKING_DEFAULT).enumerate() {
        let c = c.unwrap();
        let id = ChunkId::of(&c.data);
        if all_seen.insert(id) {
            all.push(c.data.clone());
        }
        if i % stride == 0 && seen.insert(id) {
            samples.push(c.data);
        }
    }
    use rayon::prelude::*;
    let base: usize = all
        .par_iter()
        .map(|d| chunk::encode_with(d, 9, None).len())
        .sum();
    println!("no dict: {base} stored bytes");
    let bytes: usize = samples.iter().map(Vec::len).sum();
    for size in [16 * 1024, 32 * 1024, 64 * 1024] {
        let t = Instant::now();
        let sizes: Vec<usize> = samples.iter().map(Vec::len).collect();
        let d = Dictionary::train(&samples.concat(), &sizes, size);
        let secs = t.elapsed().as_secs_f64();
        let stored: usize = all
            .par_iter()
            .map(|x| chunk::encode_with(x, 9, d.as_ref()).len())
            .sum();
        println!(
            "stride {stride}: {} samples, {bytes} bytes -> dict {:?} in {secs:.2}s: {stored} stored",
            samples.len(),
            d.map(|d| d.bytes().len()),
        );
    }
}
