//! The demo's root file system images and its releases built from them.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::Path;

use anyhow::Context as _;
use shoal_artifact::chunk::{CHUNKING_DEFAULT, ZSTD_LEVEL_FAST};
use shoal_artifact::{BuildOptions, Manifest, PayloadKind};
use shoal_signing::SecretKey;

use crate::cmd::Ui;

/// A deterministic generator for the demo images (SplitMix64).
pub struct Gen(pub u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Bytes that look a little like a filesystem: text-ish runs, random runs, zeros.
    pub fn fill(&mut self, out: &mut [u8]) {
        const WORDS: &[&str] = &[
            "lib", "usr", "bin", "etc", "config", "shoal", "kernel", "module", "=", "\n", " ",
        ];
        let mut i = 0;
        while i < out.len() {
            let kind = self.next() % 4;
            let len = (4096 + (self.next() % 65536) as usize).min(out.len() - i);
            match kind {
                0 => out[i..i + len].fill(0),
                1 => {
                    for b in &mut out[i..i + len] {
                        *b = self.next() as u8;
                    }
                }
                _ => {
                    let mut j = i;
                    while j < i + len {
                        let w = WORDS[(self.next() % WORDS.len() as u64) as usize].as_bytes();
                        let n = w.len().min(i + len - j);
                        out[j..j + n].copy_from_slice(&w[..n]);
                        j += n;
                    }
                }
            }
            i += len;
        }
    }
}

/// `image` with `fraction` of it (in a few stretches) rewritten with new content.
pub fn change(image: &[u8], seed: u64, fraction: f64) -> Vec<u8> {
    let mut out = image.to_vec();
    let mut g = Gen(seed);
    let stretches = 4;
    let len = ((image.len() as f64 * fraction) as usize / stretches).max(1);
    for _ in 0..stretches {
        let at = (g.next() as usize) % (image.len() - len);
        g.fill(&mut out[at..at + len]);
    }
    out
}

/// Builds the full artifact of acme-os `version` from `image` into `out`, signed
/// with `key`; returns its manifest and length.
pub fn build(
    image: &[u8],
    version: &str,
    counter: u64,
    key: &SecretKey,
    work: &Path,
    out: &Path,
    ui: &Ui,
) -> anyhow::Result<(Manifest, u64)> {
    let opts = BuildOptions {
        name: "acme-os".into(),
        version: version.into(),
        device_types: vec!["demo-board".into()],
        security_counter: counter,
        provides: BTreeMap::from([("rootfs-image.version".to_string(), version.to_string())]),
        depends: BTreeMap::new(),
        payload_name: "rootfs".into(),
        payload_kind: PayloadKind::RootfsImage,
        chunking: CHUNKING_DEFAULT,
        zstd_level: ZSTD_LEVEL_FAST,
        layout: shoal_artifact::write::Layout::Data,
        dictionary: false,
        manifest_delta: false,
    };
    let file = BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?,
    );
    let bar = ui.progress(image.len() as u64, "building", false);
    let report = shoal_artifact::build(
        std::io::Cursor::new(image),
        &opts,
        std::slice::from_ref(key),
        None,
        work,
        file,
        |n| bar.inc(n),
    )
    .with_context(|| format!("building acme-os {version}"))?;
    bar.finish_and_clear();
    Ok((report.manifest, report.artifact_len))
}
