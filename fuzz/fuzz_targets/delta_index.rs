//! The per-base encoding index a daemon reads from a static chunk host
//! (`deltas/<base>/index/<release>`, `shoal_artifact::delta_record::parse_index`):
//! untrusted bytes.
//!
//! Input: two bytes, the entry bound (u16 BE), then the index. Properties: no
//! panic; accepted exactly when the length is a multiple of 36, the entry count is
//! within the bound, no id repeats and every record length is within
//! `RECORD_LEN_MIN..=record_max`; an accepted index holds every entry once, with
//! its length.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_artifact::ChunkId;
use shoal_artifact::delta_record::{DeltaIndexError, INDEX_ENTRY, RECORD_LEN_MIN, parse_index};

const RECORD_MAX: u32 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((max, bytes)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max = usize::from(u16::from_be_bytes(*max));
    match parse_index(bytes, max, RECORD_MAX) {
        Ok(index) => {
            assert_eq!(bytes.len() % INDEX_ENTRY, 0);
            assert_eq!(index.len(), bytes.len() / INDEX_ENTRY);
            assert!(index.len() <= max);
            for e in bytes.chunks_exact(INDEX_ENTRY) {
                let id = ChunkId(e[..32].try_into().unwrap());
                let len = u32::from_be_bytes(e[32..].try_into().unwrap());
                assert_eq!(index.get(&id), Some(&len));
                assert!((RECORD_LEN_MIN..=RECORD_MAX).contains(&len));
            }
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            match e {
                DeltaIndexError::Length { len } => {
                    assert_eq!(len, bytes.len());
                    assert_ne!(len % INDEX_ENTRY, 0);
                }
                DeltaIndexError::TooMany { entries, max: m } => {
                    assert_eq!(m, max);
                    assert!(entries > max);
                }
                DeltaIndexError::RecordLength { len, .. } => {
                    assert!(!(RECORD_LEN_MIN..=RECORD_MAX).contains(&len));
                }
                DeltaIndexError::Duplicate { .. } => {}
            }
        }
    }
});
