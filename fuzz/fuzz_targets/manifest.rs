//! Release manifests (`Manifest::from_cbor`): the signed bytes of every artifact.
//!
//! Properties: decoding never panics; an accepted manifest is canonical (re-encodes
//! to exactly the input), passes `validate`, and its payloads' chunk offsets tile
//! each payload exactly; a rejected one is a `ManifestError` with a message.
//! The streamed decode (`Manifest::from_cbor_streaming`, and `from_file_streaming`
//! of the same bytes behind others, as in an envelope file, then `finish`: the
//! install's offer) accepts exactly what `from_cbor` accepts, with the same
//! manifest once its streamed list is put back, and refuses what it refuses with
//! the same error (from a file, a decoding error's words may differ).

#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use shoal_artifact::{ChunkId, Manifest, ManifestError};
use shoal_artifact::{ChunkIdSink, StreamedError, StreamedIds};

/// A sink keeping the streamed ids (shared, so they are read back).
struct Ids(Arc<Mutex<Vec<ChunkId>>>);

impl ChunkIdSink for Ids {
    fn push(&mut self, id: &ChunkId) -> Result<(), String> {
        self.0.lock().unwrap().push(*id);
        Ok(())
    }
}

/// The streamed ids, with their first occurrences.
struct Kept(Vec<ChunkId>);

impl StreamedIds for Kept {
    fn positions(&self) -> u32 {
        self.0.len() as u32
    }
    fn is_first(&self, pos: u32) -> bool {
        let id = self.0[pos as usize];
        self.0.iter().position(|i| *i == id) == Some(pos as usize)
    }
    fn id(&self, pos: u32) -> ChunkId {
        self.0[pos as usize]
    }
}

/// The streamed decode of `data` (from memory, or from a "file" holding it
/// behind 5 other bytes), with its list put back into the manifest.
fn streamed(data: &[u8], file: bool) -> Result<Manifest, ManifestError> {
    let ids = Arc::new(Mutex::new(Vec::new()));
    let unwrap = |e| match e {
        StreamedError::Manifest(e) => e,
        e => panic!("reading from memory failed: {e}"),
    };
    let padded = [&[1u8, 2, 3, 4, 5][..], data].concat();
    let file_bytes: &[u8] = &padded;
    let hash = *blake3::hash(data).as_bytes();
    let (mut s, _) = if file {
        Manifest::from_file_streaming(&file_bytes, 5, data.len() as u64, &hash, Ids(ids.clone()))
    } else {
        Manifest::from_cbor_streaming(data, Ids(ids.clone()))
    }
    .map_err(unwrap)?;
    let sizes = std::mem::take(&mut s.sizes);
    let ids = std::mem::take(&mut *ids.lock().unwrap());
    let mut m = s.finish(&Kept(ids.clone())).map_err(unwrap)?;
    assert!(m.payloads[0].chunks.is_empty(), "the list was streamed out");
    m.payloads[0].chunks = sizes.chunk_refs(&ids);
    Ok(m)
}

fuzz_target!(|data: &[u8]| {
    let whole = Manifest::from_cbor(data);
    assert_eq!(streamed(data, false), whole, "the streamed decode agrees");
    match (streamed(data, true), &whole) {
        (Err(ManifestError::Decode(_)), Err(ManifestError::Decode(_))) => {}
        (got, want) => assert_eq!(&got, want, "the streamed decode from a file agrees"),
    }
    match whole {
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
