//! Signed envelopes, through both decoders (`Envelope::from_bytes`, and
//! `EnvelopeRef::from_bytes`, which borrows the signed bytes: the install's offer),
//! then signature checks against the trust root the seed artifacts were signed with.
//!
//! Properties: decoding never panics; the two decoders accept exactly the same
//! inputs, decode them to the same envelope, and verify them alike; an accepted
//! envelope is canonical (it re-encodes to exactly the input, and decodes again to
//! itself) and within the signature limit; a rejected one is a `DecodeError` with a
//! message. Locating an envelope file's parts without reading its signed bytes
//! (`EnvelopeLayout::locate`: the install's stored envelope) finds them exactly
//! where the decoders do, and only in what they accept.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shoal_signing::{
    DecodeError, Envelope, EnvelopeLayout, EnvelopeRef, RoleName, SIGNATURES_MAX, SignedRoot,
    TrustRoot,
};

/// The trust root of `fuzz/seeds/`: seeds carry real signatures by its keys, so the
/// verifying code runs on well-formed and on mutated signatures.
fn root() -> &'static TrustRoot {
    static ROOT: OnceLock<TrustRoot> = OnceLock::new();
    ROOT.get_or_init(|| {
        SignedRoot::from_bytes(include_bytes!("../seeds/root.shoal"))
            .expect("fuzz/seeds/root.shoal is a valid root")
            .root
    })
}

fuzz_target!(|data: &[u8]| {
    let borrowed = EnvelopeRef::from_bytes(data);
    let located = EnvelopeLayout::locate(data.len() as u64, &mut |at, buf| {
        let at = at as usize;
        buf.copy_from_slice(&data[at..at + buf.len()]);
        Ok(())
    })
    .expect("reads from memory");
    match (&located, &borrowed) {
        (Some(l), Ok(r)) => {
            let at = l.signed_at as usize;
            assert_eq!(&data[at..at + l.signed_len as usize], r.signed);
            assert_eq!(l.signatures, r.signatures);
        }
        (None, Err(_)) => {}
        (l, r) => panic!("locate and the decoder disagree: {l:?} vs {r:?}"),
    }
    match Envelope::from_bytes(data) {
        Ok(env) => {
            let r = borrowed.expect("both decoders accept the same envelopes");
            assert_eq!(r.signed, env.signed.as_slice());
            assert_eq!(r.signatures, env.signatures);
            assert!(env.signatures.len() <= SIGNATURES_MAX);
            let bytes = env.to_bytes();
            assert_eq!(bytes, data, "an accepted envelope is canonical");
            assert_eq!(Envelope::from_bytes(&bytes), Ok(env.clone()));
            for role in [RoleName::Root, RoleName::Release] {
                for now in [None, Some(0), Some(u64::MAX)] {
                    let verified = root().verify(role, &env, now);
                    assert_eq!(verified, root().verify_ref(role, &r, now));
                    if let Ok(signed) = verified {
                        assert_eq!(signed, env.signed.as_slice());
                    }
                }
            }
        }
        Err(e) => {
            assert!(borrowed.is_err(), "both decoders refuse the same inputs");
            assert!(!e.to_string().is_empty());
            if data.is_empty() {
                assert_eq!(e, DecodeError::Empty);
            }
        }
    }
});
