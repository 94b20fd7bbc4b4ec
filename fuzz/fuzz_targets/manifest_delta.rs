//! Manifest deltas (`ManifestDelta::from_bytes` and `rebuild`): the `manifest.delta`
//! member of a thin artifact, which a device rebuilds against the manifest it keeps
//! before it checks a signature.
//!
//! The first input byte picks what the rest is:
//! - even: the member's bytes, decoded, then rebuilt against the seeds' base manifest
//!   (`fuzz/seeds/delta-base.manifest`) as named, and once more with the base it names
//!   replaced by that manifest's hash, so a mutated frame reaches the decoder;
//! - odd: a zstd frame, rebuilt against the base manifest (the frame's decoder alone).
//!
//! Properties: no panic; an accepted member is canonical (re-encodes to exactly the
//! input); a member naming another base is refused with `BaseMismatch`; a rebuilt
//! manifest is at most `ENVELOPE_SIZE_MAX` bytes and carries the member's signatures,
//! and the manifest decoder takes it without panicking; every refusal is a
//! `ManifestDeltaError` with a message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_artifact::{ChunkId, Manifest};
use shoal_artifact::manifest_delta::{ManifestDelta, ManifestDeltaError};
use shoal_signing::ENVELOPE_SIZE_MAX;

/// The manifest the seeds' deltas are built against (a small v1 release).
const BASE: &[u8] = include_bytes!("../seeds/delta-base.manifest");

fn rebuild(delta: &ManifestDelta) {
    match delta.rebuild(BASE) {
        Ok(envelope) => {
            assert!(envelope.signed.len() <= ENVELOPE_SIZE_MAX);
            assert_eq!(envelope.signatures, delta.signatures);
            match Manifest::from_cbor(&envelope.signed) {
                Ok(m) => {
                    let _ = m.validate();
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let base = ChunkId::of(BASE).0;
    if mode & 1 == 1 {
        rebuild(&ManifestDelta {
            base,
            frame: bytes.to_vec(),
            signatures: Vec::new(),
        });
        return;
    }
    match ManifestDelta::from_bytes(bytes) {
        Ok(mut delta) => {
            assert_eq!(delta.to_bytes(), bytes, "an accepted member is canonical");
            if delta.base != base {
                assert!(matches!(
                    delta.rebuild(BASE),
                    Err(ManifestDeltaError::BaseMismatch { .. })
                ));
                delta.base = base;
            }
            rebuild(&delta);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
