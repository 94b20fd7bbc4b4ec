//! LAN peer messages (`shoal_node::peer_wire::decode`): everything a peer on the LAN
//! can send (`/shoal/state/2` and `/1`, `/shoal/manifest/1`, `/shoal/chunk/1`,
//! `/shoal/dictionary/1`).
//!
//! Input: one byte choosing the message type, then the message. Properties: decoding
//! never panics; an accepted message passes its own checks, and its encoding decodes
//! to the same message; an accepted state's have- and fetching-bitfields round-trip
//! through `Installing::bitfield` / `Installing::new` and
//! `Installing::fetching_bitfield` / `Installing::fetching`; a refused one is a `WireError` with a
//! message.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use shoal_node::peer_wire::{
    CHUNK_IDS_MAX, CHUNK_REQUEST_BYTES_MAX, CHUNK_RESPONSE_BYTES_MAX, ChunkRequest, ChunkResponse,
    DICTIONARY_REQUEST_BYTES_MAX, DICTIONARY_RESPONSE_BYTES_MAX, DictionaryRequest,
    DictionaryResponse, ENVELOPE_BYTES_MAX, Installing, MANIFEST_REQUEST_BYTES_MAX,
    ManifestRequest, ManifestResponse, Message, STATE_BYTES_MAX, State, decode, encode,
};

fn check<M: Message + PartialEq + Debug>(bytes: &[u8], max: usize, more: impl Fn(&M)) {
    match decode::<M>(bytes, max) {
        Ok(m) => {
            more(&m);
            let again = encode(&m);
            assert_eq!(
                decode::<M>(&again, usize::MAX).as_ref(),
                Ok(&m),
                "round trip"
            );
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 7 {
        0 => check::<State>(bytes, STATE_BYTES_MAX, |s| {
            if let Some(i) = &s.installing {
                let have = i.bitfield();
                assert_eq!(have.len(), i.positions);
                let mut back = Installing::new(i.manifest, &have);
                if !i.fetching.is_empty() {
                    let fetching = i.fetching_bitfield();
                    assert_eq!(fetching.len(), i.positions);
                    back = back.fetching(&fetching);
                }
                assert_eq!(&back, i, "bitfield round trip");
            }
        }),
        1 => check::<ManifestRequest>(bytes, MANIFEST_REQUEST_BYTES_MAX, |_| {}),
        2 => check::<ManifestResponse>(bytes, ENVELOPE_BYTES_MAX, |_| {}),
        3 => check::<ChunkRequest>(bytes, CHUNK_REQUEST_BYTES_MAX, |r| {
            assert!(!r.ids.is_empty() && r.ids.len() <= CHUNK_IDS_MAX);
        }),
        4 => check::<ChunkResponse>(bytes, CHUNK_RESPONSE_BYTES_MAX, |_| {}),
        5 => check::<DictionaryRequest>(bytes, DICTIONARY_REQUEST_BYTES_MAX, |r| {
            assert_ne!(r.zstd_id, 0);
        }),
        _ => check::<DictionaryResponse>(bytes, DICTIONARY_RESPONSE_BYTES_MAX, |r| {
            if let DictionaryResponse::Bytes(b) = r {
                assert!(b.len() <= shoal_artifact::chunk::DICTIONARY_SIZE_MAX);
            }
        }),
    }
});
