//! Release manifests (`Manifest::from_cbor`): the signed bytes of every artifact.
//!
//! Properties: decoding never panics; an accepted manifest is canonical (re-encodes
//! to exactly the input), passes `validate`, and its payloads' chunk offsets tile
//! each payload exactly; a rejected one is a `ManifestError` with a message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_artifact::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    match Manifest::from_cbor(data) {
        Ok(m) => {
            assert_eq!(m.to_cbor(), data, "an accepted manifest is canonical");
            assert_eq!(Manifest::from_cbor(&m.to_cbor()).ok().as_ref(), Some(&m));
            m.validate().expect("an accepted manifest validates");
            for p in &m.payloads {
                let mut end = 0u64;
                for (offset, chunk) in p.chunk_offsets() {
                    assert_eq!(offset, end, "chunks tile the payload");
                    end += u64::from(chunk.size);
                }
                assert_eq!(end, p.size, "chunks add up to the payload size");
                assert!(m.payload(&p.name).is_some());
            }
            let distinct = m.distinct_chunks();
            let total: usize = m.payloads.iter().map(|p| p.chunks.len()).sum();
            assert!(distinct.len() <= total);
            let _ = m.hash();
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
