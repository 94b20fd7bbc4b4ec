//! Manifest deltas served to devices (issue 12): a device names the manifests it
//! keeps (`GET .../deployments/{id}/manifest?held=HASH,HASH`, its running release's
//! first), and the server answers with the release's signed manifest as a
//! [`ManifestDelta`] against the first of them it also holds, when that is smaller
//! than the envelope: the same member a thin artifact carries, so the device
//! rebuilds it with the install path's code and verifies the whole signed manifest
//! before it trusts a byte of it.
//!
//! Deltas are computed on first use (zstd level 19 with the base manifest as a raw
//! prefix; `zstd -19 --patch-from` on the bench's v1 and v2 envelopes, 0.6 MB each,
//! takes 0.6 s and 38 MB and gives 85 KB; not measured at 17 MB), one at a time
//! per server process (the devices of a rollout ask for the same pair at once: the
//! first computes, the others wait and find it), and kept in memory, least recently
//! used first out, within [`CACHE_BYTES_MAX`]. A pair whose delta is not smaller is
//! remembered as such (the envelope is sent). Manifests are content-addressed, so a
//! kept delta is never stale: a deleted release only leaves an entry that ages out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use shoal_artifact::manifest_delta::ManifestDelta;
use shoal_signing::Envelope;

use crate::release_cache::Release;

/// The most manifests a device may name (its two slots' releases and a thin
/// artifact's base, with room to spare).
pub const HELD_MAX: usize = 4;
/// Memory the kept deltas may use, in bytes.
pub const CACHE_BYTES_MAX: usize = 64 << 20;
/// What a remembered "not smaller" verdict counts as.
const VERDICT_BYTES: usize = 64;

/// The delta of one (release, base) pair, or `None` when it is not smaller than
/// the release's envelope.
pub type Answer = Option<Arc<Vec<u8>>>;

/// The kept deltas.
#[derive(Debug, Default)]
pub struct ManifestDeltas {
    map: Mutex<Lru>,
    /// Held while a delta is computed.
    computing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Lru {
    entries: HashMap<([u8; 32], [u8; 32]), (Answer, u64)>,
    bytes: usize,
    tick: u64,
}

fn cost(a: &Answer) -> usize {
    a.as_ref()
        .map_or(VERDICT_BYTES, |d| d.len() + VERDICT_BYTES)
}

impl ManifestDeltas {
    /// The kept answer for `release` against `base`, if any.
    pub fn get(&self, release: &[u8; 32], base: &[u8; 32]) -> Option<Answer> {
        let mut lru = self.map.lock().unwrap_or_else(|p| p.into_inner());
        lru.tick += 1;
        let tick = lru.tick;
        let (answer, used) = lru.entries.get_mut(&(*release, *base))?;
        *used = tick;
        Some(answer.clone())
    }

    /// Keeps `answer`, dropping the least recently used ones beyond
    /// [`CACHE_BYTES_MAX`] (an answer larger than that is not kept).
    pub fn insert(&self, release: [u8; 32], base: [u8; 32], answer: Answer) {
        let size = cost(&answer);
        if size > CACHE_BYTES_MAX {
            return;
        }
        let mut lru = self.map.lock().unwrap_or_else(|p| p.into_inner());
        lru.tick += 1;
        let tick = lru.tick;
        if let Some((old, _)) = lru.entries.insert((release, base), (answer, tick)) {
            lru.bytes -= cost(&old);
        }
        lru.bytes += size;
        while lru.bytes > CACHE_BYTES_MAX {
            let Some(oldest) = lru
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some((old, _)) = lru.entries.remove(&oldest) {
                lru.bytes -= cost(&old);
            }
        }
    }

    /// How many bytes the kept answers count for.
    pub fn bytes(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// The delta of `release`'s manifest against `base`'s, computed once (one
    /// computation at a time) and kept; `None` when it is not smaller than the
    /// envelope or the stored envelopes do not decode (the envelope is sent).
    pub async fn delta(&self, release: Arc<Release>, base: Arc<Release>) -> Answer {
        let (r, b) = (release.manifest.hash(), base.manifest.hash());
        if let Some(a) = self.get(&r, &b) {
            return a;
        }
        let _computing = self.computing.lock().await;
        if let Some(a) = self.get(&r, &b) {
            return a;
        }
        let answer = tokio::task::spawn_blocking(move || compute(&release, &base))
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "computing a manifest delta failed");
                None
            });
        self.insert(r, b, answer.clone());
        answer
    }
}

/// The delta's bytes, when smaller than `release`'s envelope.
pub fn compute(release: &Release, base: &Release) -> Answer {
    let envelope = Envelope::from_bytes(&release.envelope).ok()?;
    let base_signed = Envelope::from_bytes(&base.envelope).ok()?.signed;
    let started = std::time::Instant::now();
    let bytes = ManifestDelta::new(&envelope, &base_signed).to_bytes();
    tracing::info!(
        release = %hex::encode(release.manifest.hash()),
        base = %hex::encode(base.manifest.hash()),
        bytes = bytes.len(),
        envelope_bytes = release.envelope.len(),
        ms = started.elapsed().as_millis() as u64,
        "computed a manifest delta"
    );
    (bytes.len() < release.envelope.len()).then(|| Arc::new(bytes))
}

/// The manifest hashes of a `held` query value: comma-separated, 64 lowercase hex
/// digits each, at most [`HELD_MAX`], no repeats; empty: none.
pub fn parse_held(text: &str) -> Result<Vec<[u8; 32]>, String> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let mut out: Vec<[u8; 32]> = Vec::new();
    for part in text.split(',') {
        if out.len() == HELD_MAX {
            return Err(format!("held names at most {HELD_MAX} manifests"));
        }
        let mut hash = [0u8; 32];
        if part.len() != 64
            || !part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            || hex::decode_to_slice(part, &mut hash).is_err()
        {
            return Err(format!("held: {part:?} is not 64 lowercase hex digits"));
        }
        if out.contains(&hash) {
            return Err(format!("held names manifest {part} twice"));
        }
        out.push(hash);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_lists_parse_or_give_specific_errors() {
        let (a, b) = ("ab".repeat(32), "cd".repeat(32));
        assert_eq!(parse_held(""), Ok(vec![]));
        assert_eq!(
            parse_held(&format!("{a},{b}")),
            Ok(vec![[0xab; 32], [0xcd; 32]])
        );
        assert_eq!(
            parse_held("xyz"),
            Err("held: \"xyz\" is not 64 lowercase hex digits".into())
        );
        assert_eq!(
            parse_held(&format!("{a},")),
            Err("held: \"\" is not 64 lowercase hex digits".into())
        );
        let upper = "AB".repeat(32);
        assert_eq!(
            parse_held(&upper),
            Err(format!("held: {upper:?} is not 64 lowercase hex digits"))
        );
        assert_eq!(
            parse_held(&format!("{a},{a}")),
            Err(format!("held names manifest {a} twice"))
        );
        let five: Vec<String> = (0..5u8).map(|i| hex::encode([i; 32])).collect();
        assert_eq!(
            parse_held(&five.join(",")),
            Err("held names at most 4 manifests".into())
        );
        assert_eq!(parse_held(&five[..4].join(",")).map(|v| v.len()), Ok(4));
    }

    #[test]
    fn the_cache_keeps_recent_answers_within_its_bound() {
        let c = ManifestDeltas::default();
        let big = || Some(Arc::new(vec![0u8; CACHE_BYTES_MAX / 3]));
        c.insert([1; 32], [0; 32], big());
        c.insert([2; 32], [0; 32], big());
        c.insert([3; 32], [0; 32], None);
        // Used: [1] is now more recent than [2].
        assert!(c.get(&[1; 32], &[0; 32]).is_some());
        c.insert([4; 32], [0; 32], big());
        assert!(c.bytes() <= CACHE_BYTES_MAX, "{}", c.bytes());
        assert_eq!(c.get(&[2; 32], &[0; 32]), None, "the least recent went");
        assert!(c.get(&[1; 32], &[0; 32]).is_some());
        assert!(c.get(&[4; 32], &[0; 32]).is_some());
        assert_eq!(c.get(&[3; 32], &[0; 32]), Some(None), "a verdict is kept");
        // Too large to keep at all.
        c.insert(
            [5; 32],
            [0; 32],
            Some(Arc::new(vec![0; CACHE_BYTES_MAX + 1])),
        );
        assert_eq!(c.get(&[5; 32], &[0; 32]), None);
    }
}
