//! The chunk batch answer the daemon reads from the server
//! (`shoal_node::wire::BatchReader`, `application/vnd.shoal.chunks` and, with
//! per-base encodings, `application/vnd.shoal.chunks.v2`, whose delta frames carry a
//! `shoal_artifact::delta_record::DeltaRecord`).
//!
//! Input: one byte `k` (its low 3 bits: the number of ids asked, 0..=7; bit 3: the
//! version-2 framing), `k` ids of 32 bytes, then the body. Properties: no panic;
//! frames come out in the order asked, each with the id asked at its position; a
//! clean end (`None`) comes only after every id asked was read and the body ended;
//! no frame is longer than the body or the cap; the reader never yields more frames
//! than were asked; a delta frame's record re-encodes to the bytes it was parsed
//! from, with 1..=4 non-empty ranges of at most 2 MiB in all and a zstd frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_artifact::ChunkId;
use shoal_artifact::delta_record::RANGES_MAX;
use shoal_artifact::manifest::REFERENCE_LEN_MAX;
use shoal_node::wire::{
    BatchError, BatchReader, FRAME_HEADER, FRAME_HEADER_V2, STORED_CHUNK_MAX, Stored,
};

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let v2 = k & 8 != 0;
    let k = usize::from(k % 8);
    if rest.len() < k * 32 {
        return;
    }
    let (ids, body) = rest.split_at(k * 32);
    let asked: Vec<ChunkId> = ids
        .chunks_exact(32)
        .map(|c| ChunkId(c.try_into().expect("32 bytes")))
        .collect();
    let mut reader = if v2 {
        BatchReader::new_v2(body, &asked)
    } else {
        BatchReader::new(body, &asked)
    };
    let header = if v2 { FRAME_HEADER_V2 } else { FRAME_HEADER };
    let mut frames = 0usize;
    let mut consumed = 0usize;
    loop {
        match reader.next_item() {
            Ok(Some((id, stored))) => {
                assert!(frames < asked.len(), "more frames than asked");
                assert_eq!(id, asked[frames], "frame {frames} out of order");
                let len = match stored {
                    Stored::Plain(b) => b.len(),
                    Stored::Delta(r) => {
                        assert!(v2, "a delta frame in a version-1 body");
                        assert!((1..=RANGES_MAX).contains(&r.ranges.len()));
                        assert!(r.ranges.iter().all(|&(_, l)| l > 0));
                        assert!(r.reference().len() <= u64::from(REFERENCE_LEN_MAX));
                        assert!(r.frame.starts_with(&shoal_artifact::chunk::ZSTD_MAGIC));
                        let bytes = r.to_bytes();
                        let start = consumed + header;
                        assert_eq!(&body[start..start + bytes.len()], &bytes[..]);
                        bytes.len()
                    }
                };
                assert!(len <= STORED_CHUNK_MAX as usize);
                consumed += header + len;
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
                match e {
                    BatchError::WrongId { index, want, .. } => {
                        assert_eq!(index, frames);
                        assert_eq!(want, asked[frames]);
                    }
                    BatchError::UnknownKind { index, .. } | BatchError::BadDelta { index, .. } => {
                        assert!(v2, "a kind byte in a version-1 body");
                        assert_eq!(index, frames);
                    }
                    _ => {}
                }
                break;
            }
        }
    }
});
