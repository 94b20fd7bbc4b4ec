//! Shoal's artifact format: content-defined chunking, the signed release manifest,
//! the `.shoal` artifact (writer and streaming reader) and chunk stores.
//!
//! Key design decision: everything is addressed by the BLAKE3 hash of *uncompressed*
//! chunk bytes, and nothing is trusted before it is checked. A reader verifies the
//! signed manifest against a trust root before it reads a single chunk, and hashes
//! every chunk before it yields a byte of it; sizes read from the input only ever
//! bound allocations after they were checked against the signed manifest's limits.
//! See `artifact/DESIGN.md` for the byte layout.

pub mod manifest;

pub use manifest::{
    BaseRelease, ChunkId, ChunkRef, Chunking, FORMAT_VERSION, Manifest, ManifestError, Payload,
    PayloadKind,
};
