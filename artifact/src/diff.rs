//! Delta preview: what a device running one release must download to get another.

use std::collections::HashSet;

use serde::Serialize;
use shoal_signing::Envelope;

use crate::manifest::{ChunkId, Manifest};
use crate::write::{Layout, artifact_len, thin_manifest};

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
    /// Bytes of the signed manifest envelope of the thin artifact new-against-old
    /// (of its manifest delta member when the manifest travels as a delta).
    pub manifest_bytes: u64,
    /// Bytes of the zstd dictionary the new release's chunks need (0 without one).
    pub dictionary_bytes: u64,
    /// What the device downloads: the exact size of the thin artifact of the new
    /// release against the old one (`shoal artifact build --base OLD`, default
    /// packing), all framing included. Installing it reads exactly this.
    pub download_bytes: u64,
    /// What the device downloads from a chunk store instead: the new release's
    /// envelope as given, the dictionary (when a chunk is needed) and each needed
    /// chunk file.
    pub store_download_bytes: u64,
    /// Stored bytes of all distinct chunks of the new release (a full download).
    pub full_stored_bytes: u64,
}

/// Compares `new` (signed as `new_envelope`, its chunks compressed with a dictionary
/// of `new_dictionary_len` bytes, 0 for none) against what a device running `old`
/// holds: every chunk of `old`'s payloads. The thin artifact is sized by the
/// writer's own packing ([`artifact_len`]) around the thin manifest the writer would
/// sign ([`thin_manifest`]), with `new_envelope`'s signatures; with `manifest_delta`,
/// that manifest travels as a delta against `old`'s ([`crate::manifest_delta`]) when
/// that is smaller, as the writer does; its chunks laid out as `layout` says (data
/// members by default, packs for `artifact build --packs`).
pub fn diff(
    old: &Manifest,
    new: &Manifest,
    new_envelope: &Envelope,
    new_dictionary_len: u64,
    manifest_delta: bool,
    layout: Layout,
) -> Diff {
    let have: HashSet<ChunkId> = old
        .payloads
        .iter()
        .flat_map(|p| p.chunks.iter().map(|c| c.id))
        .collect();
    let distinct = new.distinct_chunks();
    let needed: Vec<_> = distinct.iter().filter(|c| !have.contains(&c.id)).collect();
    let needed_stored_bytes = needed.iter().map(|c| u64::from(c.stored_size)).sum();

    let thin = thin_manifest(new, old);
    let thin_envelope = Envelope {
        signed: thin.to_cbor(),
        signatures: new_envelope.signatures.clone(),
    };
    // As the writer decides: the delta when asked for and smaller.
    let whole = thin_envelope.to_bytes().len() as u64;
    let manifest_bytes = if manifest_delta {
        let delta = crate::manifest_delta::ManifestDelta::new(&thin_envelope, &old.to_cbor())
            .to_bytes()
            .len() as u64;
        delta.min(whole)
    } else {
        whole
    };
    let download_bytes = artifact_len(
        manifest_bytes,
        new_dictionary_len,
        Some(distinct.len()),
        needed.iter().map(|c| c.stored_size),
        layout,
    );
    let store_dictionary = if needed.is_empty() {
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
        manifest_bytes,
        dictionary_bytes: new_dictionary_len,
        download_bytes,
        store_download_bytes: new_envelope.to_bytes().len() as u64
            + store_dictionary
            + needed_stored_bytes,
        full_stored_bytes: distinct.iter().map(|c| u64::from(c.stored_size)).sum(),
    }
}
