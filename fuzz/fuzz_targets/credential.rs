//! Fleet membership credentials (`shoal_signing::Credential::verify`): what every
//! LAN peer shows on a new connection.
//!
//! The input is tried twice: as the credential bytes themselves (a signed envelope),
//! and as the payload of an envelope signed by the root's fleet key, so the fuzzer
//! reaches the credential decoding behind the signature check. Properties: no
//! panic; an accepted credential has format 1 and a fleet name within bounds, is
//! refused once expired, and its re-issue verifies to the same credential; a refused
//! one is a `CredentialError` with a message.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use shoal_signing::{Credential, Envelope, FLEET_NAME_MAX, SecretKey, TrustRoot};

static FLEET: LazyLock<SecretKey> = LazyLock::new(|| SecretKey::from_seed(&[3; 32]));
static ROOT: LazyLock<TrustRoot> = LazyLock::new(|| {
    TrustRoot::new(
        1,
        2_000_000_000,
        &[SecretKey::from_seed(&[1; 32]).public()],
        1,
        &[SecretKey::from_seed(&[2; 32]).public()],
        1,
    )
    .expect("root")
    .with_fleet(&[FLEET.public()], 1)
    .expect("fleet role")
});

fn accepted(c: &Credential) {
    assert_eq!(c.format, 1);
    assert!(!c.fleet.is_empty() && c.fleet.len() <= FLEET_NAME_MAX);
    let again = c.issue(&[&*FLEET]);
    assert_eq!(Credential::verify(&again, &ROOT, None).as_ref(), Ok(c));
    if c.expires_unix_s < u64::MAX {
        assert!(Credential::verify(&again, &ROOT, Some(c.expires_unix_s)).is_err());
    }
}

fuzz_target!(|data: &[u8]| {
    match Credential::verify(data, &ROOT, None) {
        Ok(c) => accepted(&c),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let mut env = Envelope::new(data.to_vec());
    env.sign(&FLEET);
    match Credential::verify(&env.to_bytes(), &ROOT, None) {
        Ok(c) => accepted(&c),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
