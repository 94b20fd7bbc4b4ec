//! Stored chunks (`chunk::decode_any_size`, `chunk::decode_with`): the zstd frames
//! (or raw bytes) a chunk store, a server or a peer sends, and zstd dictionaries
//! (`Dictionary::from_bytes`) as stores and artifacts carry them.
//!
//! The first input byte picks: bit 1 parses the rest as a dictionary; bit 2 decodes
//! the rest as a delta-encoded chunk (`chunk::decode_against`) with the seeds'
//! dictionary bytes as its reference; else the rest is a stored chunk, decoded with
//! the seeds' dictionary when bit 0 is set.
//!
//! Properties: no panic and bounded memory (never more than the declared size,
//! whatever a frame claims); a chunk decodes only to bytes that hash to its id;
//! decoding with the exact size gives the same bytes, and a smaller declared size
//! is refused; an accepted dictionary's zstd id is the one derived from its bytes.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shoal_artifact::chunk::{self, ChunkError, Dictionary};
use shoal_artifact::manifest::{CHUNK_SIZE_MAX, stored_size_max};
use shoal_artifact::{ChunkId, ChunkRef};

/// The dictionary the seeds' dictionary-compressed chunks were made with.
fn dictionary() -> &'static Dictionary {
    static DICT: OnceLock<Dictionary> = OnceLock::new();
    DICT.get_or_init(|| {
        Dictionary::from_bytes(include_bytes!("../seeds/dictionary").to_vec())
            .expect("fuzz/seeds/dictionary is a valid dictionary")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stored)) = data.split_first() else {
        return;
    };
    if mode & 2 != 0 {
        match Dictionary::from_bytes(stored.to_vec()) {
            Ok(d) => {
                assert_eq!(d.zstd_id, chunk::derived_zstd_id(stored));
                assert_eq!(d.id, ChunkId::of(stored));
                assert_eq!(d.bytes(), stored);
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        return;
    }
    if mode & 4 != 0 {
        // Bounded by the declared size whatever the frame says; nothing hashes to
        // the zero id, so every input is refused, with a message.
        let expected = ChunkRef {
            id: ChunkId([0; 32]),
            size: 64 * 1024,
            stored_size: u32::try_from(stored.len()).unwrap_or(u32::MAX),
        };
        match chunk::decode_against(stored, &expected, dictionary().bytes()) {
            Ok(data) => panic!("{} bytes hashed to the zero id", data.len()),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        return;
    }
    let dict = (mode & 1 != 0).then(dictionary);
    // No chunk hashes to all zeros: the frame is parsed, then the hash refuses it,
    // naming what the bytes hash to.
    let actual = match chunk::decode_any_size(stored, ChunkId([0; 32]), dict) {
        Ok(data) => panic!("{} bytes hashed to the zero id", data.len()),
        Err(ChunkError::HashMismatch { actual, .. }) => actual,
        Err(e) => return assert!(!e.to_string().is_empty()),
    };
    let data = chunk::decode_any_size(stored, actual, dict).expect("decodes under its own id");
    assert_eq!(ChunkId::of(&data), actual);
    assert!(!data.is_empty() && data.len() <= CHUNK_SIZE_MAX as usize);
    let size = u32::try_from(data.len()).expect("bounded by CHUNK_SIZE_MAX");
    let exact = ChunkRef {
        id: actual,
        size,
        stored_size: u32::try_from(stored.len()).unwrap_or(u32::MAX),
    };
    let exact_result = chunk::decode_with(stored, &exact, dict);
    if stored.len() <= stored_size_max(size) as usize {
        assert_eq!(exact_result.as_ref(), Ok(&data));
    } else {
        // A frame padded beyond any honest encoding of its size (e.g. skippable
        // frames): the exact path refuses what the any-size path bounds by the limit.
        assert!(matches!(
            exact_result,
            Err(ChunkError::StoredTooLarge { .. })
        ));
    }
    let smaller = ChunkRef {
        size: size - 1,
        ..exact
    };
    assert!(chunk::decode_with(stored, &smaller, dict).is_err());
});
