//! Delta preview: what a device running one release must download to get another.

use std::collections::HashSet;

use serde::Serialize;

use crate::manifest::{ChunkId, Manifest};

/// How much of a new release a device running an old one already has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diff {
    /// Payload bytes of the new release.
    pub new_payload_bytes: u64,
    /// Chunks in the new release's payloads (with repeats).
    pub chunks_total: u64,
    /// Distinct chunks in the new release.
    pub chunks_distinct: u64,
    /// Distinct chunks of the new release the old one lacks.
    pub chunks_needed: u64,
    /// Uncompressed bytes of the chunks needed.
    pub needed_raw_bytes: u64,
    /// Stored (compressed) bytes of the chunks needed.
    pub needed_stored_bytes: u64,
    /// Bytes of the new release's signed manifest envelope.
    pub manifest_bytes: u64,
    /// Bytes of the zstd dictionary the new release's chunks need (0 without one).
    pub dictionary_bytes: u64,
    /// What the device downloads: manifest, dictionary and needed chunks.
    pub download_bytes: u64,
    /// Stored bytes of all distinct chunks of the new release (a full download).
    pub full_stored_bytes: u64,
}

/// Compares `new` (whose envelope is `new_envelope_len` bytes and whose dictionary is
/// `new_dictionary_len` bytes) against what a device running `old` holds: every chunk
/// of `old`'s payloads. The dictionary is counted only when a chunk is needed.
pub fn diff(
    old: &Manifest,
    new: &Manifest,
    new_envelope_len: u64,
    new_dictionary_len: u64,
) -> Diff {
    let have: HashSet<ChunkId> = old
        .payloads
        .iter()
        .flat_map(|p| p.chunks.iter().map(|c| c.id))
        .collect();
    let distinct = new.distinct_chunks();
    let needed: Vec<_> = distinct.iter().filter(|c| !have.contains(&c.id)).collect();
    let needed_stored_bytes = needed.iter().map(|c| u64::from(c.stored_size)).sum();
    let dictionary_bytes = if needed.is_empty() {
        0
    } else {
        new_dictionary_len
    };
    Diff {
        new_payload_bytes: new.payloads.iter().map(|p| p.size).sum(),
        chunks_total: new.payloads.iter().map(|p| p.chunks.len() as u64).sum(),
        chunks_distinct: distinct.len() as u64,
        chunks_needed: needed.len() as u64,
        needed_raw_bytes: needed.iter().map(|c| u64::from(c.size)).sum(),
        needed_stored_bytes,
        manifest_bytes: new_envelope_len,
        dictionary_bytes,
        download_bytes: new_envelope_len + dictionary_bytes + needed_stored_bytes,
        full_stored_bytes: distinct.iter().map(|c| u64::from(c.stored_size)).sum(),
    }
}
