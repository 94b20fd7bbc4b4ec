//! Shoal's artifact format: content-defined chunking, the signed release manifest,
//! the `.shoal` artifact (writer and streaming reader), chunk stores and delta previews.
//!
//! Key design decision: everything is addressed by the BLAKE3 hash of *uncompressed*
//! chunk bytes, and nothing read is trusted before it is checked. A reader verifies
//! the signed manifest against a trust root before it reads a single chunk, and
//! hashes every chunk before it yields a byte of it; sizes read from the input bound
//! allocations only after they were checked against the signed manifest and its
//! limits. See `artifact/DESIGN.md` for the byte layout.

#[cfg(feature = "fs")]
pub mod base_image;
pub mod chunk;
#[cfg(feature = "fs")]
pub mod delta;
pub mod delta_record;
#[cfg(feature = "fs")]
pub mod diff;
#[cfg(feature = "fs")]
pub mod extract;
pub mod manifest;
pub mod manifest_delta;
pub mod manifest_stream;
pub mod read;
#[cfg(feature = "fs")]
pub mod store;
pub mod ustar;
#[cfg(feature = "fs")]
pub mod write;

#[cfg(feature = "fs")]
pub use base_image::{BaseChunkError, BaseImage};
pub use chunk::{ChunkError, Chunker};
#[cfg(feature = "fs")]
pub use diff::{Diff, diff};
#[cfg(feature = "fs")]
pub use extract::{BaseChunks, ExtractError, extract};
pub use manifest::{
    BaseRelease, ChunkId, ChunkRef, Chunking, FORMAT_VERSION, FORMAT_VERSION_REFERENCES, Manifest,
    ManifestError, Payload, PayloadKind, Reference, ReferenceBytes, ReferenceError,
};
pub use manifest_delta::{HeldManifests, ManifestDelta, ManifestDeltaError, NoManifests};
pub use manifest_stream::{
    ChunkIdSink, Discard, ReadAt, StreamedError, StreamedIds, StreamedManifest, StreamedSizes,
};
pub use read::{ArtifactReader, ChunkList, RawChunk, ReadError, ReferenceSource, VerifiedChunk};
#[cfg(feature = "fs")]
pub use store::{ChunkStore, ReleaseHead, StoreError};
#[cfg(feature = "fs")]
pub use write::{
    BuildError, BuildOptions, BuildReport, SignError, add_signatures, build, build_delta,
};
