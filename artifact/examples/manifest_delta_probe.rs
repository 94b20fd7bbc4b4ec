//! Size and time of a manifest delta at several zstd levels (issue 12): the new
//! artifact's manifest compressed against the base artifact's.
//!
//! `cargo run --release -p shoal-artifact --example manifest_delta_probe -- BASE.shoal NEW.shoal`

use std::fs::File;
use std::io::BufReader;
use std::time::Instant;

use shoal_artifact::{ArtifactReader, ManifestDelta};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let open = |p: &str| {
        ArtifactReader::open_unverified_held(
            BufReader::new(File::open(p).expect("artifact")),
            &Vec::<Vec<u8>>::new(),
        )
        .or_else(|_| {
            let base = open_plain(&args[1]);
            ArtifactReader::open_unverified_held(
                BufReader::new(File::open(p).expect("artifact")),
                &vec![base],
            )
        })
        .expect("readable artifact")
        .envelope()
        .clone()
    };
    let base = open_plain(&args[1]);
    let new = open(&args[2]);
    println!(
        "base manifest {} bytes, new envelope {} bytes",
        base.len(),
        new.to_bytes().len()
    );
    for level in [3, 6, 9, 12, 15, 19] {
        let t = Instant::now();
        let mut cctx = zstd::zstd_safe::CCtx::create();
        cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))
            .unwrap();
        cctx.set_parameter(zstd::zstd_safe::CParameter::WindowLog(25))
            .unwrap();
        cctx.ref_prefix(&base).unwrap();
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(new.signed.len()));
        cctx.compress2(&mut out, &new.signed).unwrap();
        println!(
            "level {level:2}: frame {} bytes, {:.3} s",
            out.len(),
            t.elapsed().as_secs_f64()
        );
    }
    let t = Instant::now();
    let d = ManifestDelta::new(&new, &base).to_bytes();
    println!(
        "ManifestDelta::new: member {} bytes, {:.3} s",
        d.len(),
        t.elapsed().as_secs_f64()
    );
}

fn open_plain(p: &str) -> Vec<u8> {
    ArtifactReader::open_unverified(BufReader::new(File::open(p).expect("artifact")))
        .expect("base artifact")
        .envelope()
        .signed
        .clone()
}
