//! The chunk batch answer the daemon reads from the server
//! (`shoal_node::wire::BatchReader`, `application/vnd.shoal.chunks`).
//!
//! Input: one byte `k` (the number of ids asked, 0..=7), `k` ids of 32 bytes, then
//! the body. Properties: no panic; frames come out in the order asked, each with the
//! id asked at its position; a clean end (`None`) comes only after every id asked
//! was read and the body ended; no frame is longer than the body or the cap; the
//! reader never yields more frames than were asked.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_artifact::ChunkId;
use shoal_node::wire::{BatchError, BatchReader, FRAME_HEADER, STORED_CHUNK_MAX};

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = usize::from(k % 8);
    if rest.len() < k * 32 {
        return;
    }
    let (ids, body) = rest.split_at(k * 32);
    let asked: Vec<ChunkId> = ids
        .chunks_exact(32)
        .map(|c| ChunkId(c.try_into().expect("32 bytes")))
        .collect();
    let mut reader = BatchReader::new(body, &asked);
    let mut frames = 0usize;
    let mut consumed = 0usize;
    loop {
        match reader.next_frame() {
            Ok(Some((id, stored))) => {
                assert!(frames < asked.len(), "more frames than asked");
                assert_eq!(id, asked[frames], "frame {frames} out of order");
                assert!(stored.len() <= STORED_CHUNK_MAX as usize);
                consumed += FRAME_HEADER + stored.len();
                assert!(consumed <= body.len(), "frame past the body");
                frames += 1;
            }
            Ok(None) => {
                assert_eq!(frames, asked.len(), "clean end before every id was read");
                assert_eq!(consumed, body.len(), "clean end with bytes left");
                break;
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                if let BatchError::WrongId { index, want, .. } = e {
                    assert_eq!(index, frames);
                    assert_eq!(want, asked[frames]);
                }
                break;
            }
        }
    }
});
