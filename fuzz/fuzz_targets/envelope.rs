//! Signed envelopes (`Envelope::from_bytes`), then signature checks against the
//! trust root the seed artifacts were signed with.
//!
//! Properties: decoding never panics; an accepted envelope is canonical (it
//! re-encodes to exactly the input, and decodes again to itself) and within the
//! signature limit; a rejected one is a `DecodeError` with a message.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shoal_signing::{DecodeError, Envelope, RoleName, SIGNATURES_MAX, SignedRoot, TrustRoot};

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
    match Envelope::from_bytes(data) {
        Ok(env) => {
            assert!(env.signatures.len() <= SIGNATURES_MAX);
            let bytes = env.to_bytes();
            assert_eq!(bytes, data, "an accepted envelope is canonical");
            assert_eq!(Envelope::from_bytes(&bytes), Ok(env.clone()));
            for role in [RoleName::Root, RoleName::Release] {
                for now in [None, Some(0), Some(u64::MAX)] {
                    if let Ok(signed) = root().verify(role, &env, now) {
                        assert_eq!(signed, env.signed.as_slice());
                    }
                }
            }
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            if data.is_empty() {
                assert_eq!(e, DecodeError::Empty);
            }
        }
    }
});
