//! Signed trust roots (`SignedRoot::from_bytes`): the file every device trusts first,
//! and every rotation it is offered.
//!
//! Properties: decoding never panics; an accepted root is canonical (file bytes and
//! signed bytes re-encode to themselves) and validates; self-verification and
//! rotation from the seeds' root return a result, never panic, and a rotation that
//! succeeds yields the offered root with a higher version.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shoal_signing::{SignedRoot, TrustRoot};

fn seed_root() -> &'static TrustRoot {
    static ROOT: OnceLock<TrustRoot> = OnceLock::new();
    ROOT.get_or_init(|| {
        SignedRoot::from_bytes(include_bytes!("../seeds/root.shoal"))
            .expect("fuzz/seeds/root.shoal is a valid root")
            .root
    })
}

fuzz_target!(|data: &[u8]| {
    match SignedRoot::from_bytes(data) {
        Ok(signed) => {
            assert_eq!(
                signed.to_bytes(),
                data,
                "an accepted root file is canonical"
            );
            assert_eq!(signed.root.to_cbor(), signed.envelope.signed);
            signed.root.validate().expect("an accepted root validates");
            for now in [None, Some(0), Some(u64::MAX)] {
                let _ = signed.verify_self(now);
                let _ = signed.root.check_expiry(now);
                if let Ok(next) = seed_root().rotate(&signed, now) {
                    assert_eq!(next, signed.root);
                    assert!(next.version > seed_root().version);
                }
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
