//! Keys, key ids, signed envelopes and TUF-style trust roots for Shoal.
//!
//! Everything a device believes about a release comes through an [`Envelope`]: some
//! signed bytes plus any number of `(key id, signature)` pairs. An envelope is trusted
//! when a threshold of distinct keys of a *role* of the device's [`TrustRoot`] signed
//! it. The trust root itself is rotated by a new root signed by a threshold of the old
//! root's `root` keys *and* of its own.
//!
//! Key design decisions:
//! - Keys are plain ed25519 (ed25519-dalek 3), stored as PKCS#8 / SPKI PEM so keys
//!   made with `openssl genpkey -algorithm ed25519` work as they are. A [`KeyId`] is
//!   the BLAKE3 hash of the raw 32-byte public key, so it is derived, never trusted.
//! - Signatures are made over a domain-separated message (`shoal-envelope-v1\0` then
//!   the signed bytes), so a Shoal signature can never be replayed as a signature of
//!   some other protocol that uses the same key.
//! - Wall-clock time is passed in (`Option<u64>` Unix seconds). Devices may boot in
//!   1970; `None` means "no trustworthy clock" and the caller, not this crate, decided
//!   to skip the expiry check.
//! - All encodings are canonical CBOR; decoders are bounded and reject non-canonical
//!   input, so one value has exactly one encoding and signed bytes are unambiguous.

mod credential;
mod envelope;
mod key;
mod root;

pub use credential::{CREDENTIAL_SIZE_MAX, Credential, CredentialError, FLEET_NAME_MAX};
pub use envelope::{
    DecodeError, ENVELOPE_SIZE_MAX, Envelope, EnvelopeLayout, EnvelopeRef, SIGNATURES_MAX,
    SIGNING_CONTEXT, Signature, describe_cbor_error, encodes_to,
};
pub use key::{KeyError, KeyId, PublicKey, SecretKey, StreamVerifier, pem_label};
pub use root::{
    ROOT_KEYS_MAX, Role, RoleName, RootError, RotateError, SignedRoot, TrustRoot, VerifyError,
    release_checks,
};
