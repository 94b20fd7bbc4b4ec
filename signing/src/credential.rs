//! Fleet membership credentials: "the device with this key belongs to this fleet
//! until then", signed by the `fleet` role of the trust root. LAN peers show theirs
//! on every new connection; a device serves manifests and chunks only to peers
//! whose credential verifies against its own trust root, names its own fleet, has
//! not expired and is not revoked.

use crate::envelope::{DecodeError, Envelope, from_cbor, to_cbor};
use crate::key::{PublicKey, SecretKey};
use crate::root::{RoleName, TrustRoot, VerifyError};

/// The credential format this crate writes and reads.
const CREDENTIAL_FORMAT: u32 = 1;
/// Largest signed credential (an envelope of a few signatures).
pub const CREDENTIAL_SIZE_MAX: usize = 8 * 1024;
/// Longest fleet name.
pub const FLEET_NAME_MAX: usize = 128;

/// What a credential says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credential {
    /// Format, 1.
    pub format: u32,
    /// The member's device key (its LAN peer id).
    pub peer: PublicKey,
    /// The fleet.
    pub fleet: String,
    /// Unix time (seconds) at and after which it is expired.
    pub expires_unix_s: u64,
}

/// Why a credential was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Larger than [`CREDENTIAL_SIZE_MAX`].
    #[error("credential of {0} bytes (at most {max})", max = CREDENTIAL_SIZE_MAX)]
    TooLarge(usize),
    /// Not a signed envelope, or its payload is not a credential.
    #[error("not a fleet credential: {0}")]
    Decode(#[from] DecodeError),
    /// A format this version does not know.
    #[error("credential format {0} is not supported (this shoal knows format 1)")]
    UnknownFormat(u32),
    /// An empty or over-long fleet name.
    #[error("credential fleet name is empty or longer than {max} bytes", max = FLEET_NAME_MAX)]
    BadFleet,
    /// Not signed by a threshold of the trust root's fleet keys (or the root has no
    /// fleet role, or expired).
    #[error("credential signatures: {0}")]
    Signature(#[from] VerifyError),
    /// Past its expiry time.
    #[error("credential expired at unix time {expires_unix_s} (now {now_unix_s})")]
    Expired {
        /// When it expired.
        expires_unix_s: u64,
        /// The time passed in.
        now_unix_s: u64,
    },
}

impl Credential {
    /// A credential for `peer` in `fleet` until `expires_unix_s`.
    pub fn new(peer: PublicKey, fleet: impl Into<String>, expires_unix_s: u64) -> Credential {
        Credential {
            format: CREDENTIAL_FORMAT,
            peer,
            fleet: fleet.into(),
            expires_unix_s,
        }
    }

    /// Signs it with `keys` (fleet keys): the bytes a device shows its peers.
    pub fn issue(&self, keys: &[&SecretKey]) -> Vec<u8> {
        let mut env = Envelope::new(to_cbor(self));
        for k in keys {
            env.sign(k);
        }
        env.to_bytes()
    }

    /// Checks a signed credential against `root`'s fleet role and, when the time is
    /// known, its expiry. Says nothing about whose it is or which fleet: the caller
    /// compares [`Credential::peer`] and [`Credential::fleet`].
    pub fn verify(
        bytes: &[u8],
        root: &TrustRoot,
        now_unix_s: Option<u64>,
    ) -> Result<Credential, CredentialError> {
        if bytes.len() > CREDENTIAL_SIZE_MAX {
            return Err(CredentialError::TooLarge(bytes.len()));
        }
        let env = Envelope::from_bytes(bytes)?;
        let signed = root.verify(RoleName::Fleet, &env, now_unix_s)?;
        let c: Credential = from_cbor(signed, CREDENTIAL_SIZE_MAX)?;
        if c.format != CREDENTIAL_FORMAT {
            return Err(CredentialError::UnknownFormat(c.format));
        }
        if c.fleet.is_empty() || c.fleet.len() > FLEET_NAME_MAX {
            return Err(CredentialError::BadFleet);
        }
        if let Some(now) = now_unix_s
            && now >= c.expires_unix_s
        {
            return Err(CredentialError::Expired {
                expires_unix_s: c.expires_unix_s,
                now_unix_s: now,
            });
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed(&[n; 32])
    }

    fn root(fleet: Option<&SecretKey>) -> TrustRoot {
        let r = TrustRoot::new(
            1,
            2_000_000_000,
            &[key(1).public()],
            1,
            &[key(2).public()],
            1,
        )
        .expect("root");
        match fleet {
            Some(k) => r.with_fleet(&[k.public()], 1).expect("fleet role"),
            None => r,
        }
    }

    #[test]
    fn a_credential_verifies_against_the_fleet_role_only() {
        let fleet = key(3);
        let r = root(Some(&fleet));
        let c = Credential::new(key(9).public(), "site-a", 1_800_000_000);
        let bytes = c.issue(&[&fleet]);
        assert_eq!(
            Credential::verify(&bytes, &r, Some(1_700_000_000)),
            Ok(c.clone())
        );
        // Without a clock, expiry is not checked.
        assert_eq!(Credential::verify(&bytes, &r, None), Ok(c.clone()));
        // Expired.
        assert_eq!(
            Credential::verify(&bytes, &r, Some(1_800_000_000)),
            Err(CredentialError::Expired {
                expires_unix_s: 1_800_000_000,
                now_unix_s: 1_800_000_000
            })
        );
        // Signed by a release key: not a fleet key.
        let forged = c.issue(&[&key(2)]);
        assert!(matches!(
            Credential::verify(&forged, &r, None),
            Err(CredentialError::Signature(VerifyError::BelowThreshold {
                role: RoleName::Fleet,
                valid: 0,
                unknown: 1,
                ..
            }))
        ));
        // A root without a fleet role accepts none.
        assert_eq!(
            Credential::verify(&bytes, &root(None), None),
            Err(CredentialError::Signature(VerifyError::MissingRole(
                RoleName::Fleet
            )))
        );
    }

    #[test]
    fn malformed_credentials_are_refused_precisely() {
        let fleet = key(3);
        let r = root(Some(&fleet));
        assert_eq!(
            Credential::verify(&vec![0; CREDENTIAL_SIZE_MAX + 1], &r, None),
            Err(CredentialError::TooLarge(CREDENTIAL_SIZE_MAX + 1))
        );
        assert!(matches!(
            Credential::verify(b"\\x01garbage", &r, None),
            Err(CredentialError::Decode(_))
        ));
        // A signed envelope whose payload is not a credential.
        let mut env = Envelope::new(b"not cbor of a credential".to_vec());
        env.sign(&fleet);
        assert!(matches!(
            Credential::verify(&env.to_bytes(), &r, None),
            Err(CredentialError::Decode(_))
        ));
        // Unknown format, empty fleet.
        let mut c = Credential::new(key(9).public(), "site-a", 1_800_000_000);
        c.format = 2;
        assert_eq!(
            Credential::verify(&c.issue(&[&fleet]), &r, None),
            Err(CredentialError::UnknownFormat(2))
        );
        let c = Credential::new(key(9).public(), "", 1_800_000_000);
        assert_eq!(
            Credential::verify(&c.issue(&[&fleet]), &r, None),
            Err(CredentialError::BadFleet)
        );
        // A truncated credential.
        let bytes = Credential::new(key(9).public(), "a", 1).issue(&[&fleet]);
        assert!(matches!(
            Credential::verify(&bytes[..bytes.len() - 3], &r, None),
            Err(CredentialError::Decode(_))
        ));
    }

    #[test]
    fn roots_without_a_fleet_role_still_read_and_with_one_round_trip() {
        let plain = root(None);
        let back: TrustRoot = from_cbor(&plain.to_cbor(), 1 << 20).expect("old root");
        assert_eq!(back, plain);
        assert!(!back.roles.contains_key(&RoleName::Fleet));
        let with = root(Some(&key(3)));
        let back: TrustRoot = from_cbor(&with.to_cbor(), 1 << 20).expect("new root");
        assert_eq!(back, with);
        back.validate().expect("valid");
        // A fleet role with threshold 0 is refused like any other role.
        assert!(matches!(
            root(None).with_fleet(&[key(3).public()], 0),
            Err(crate::RootError::ZeroThreshold(RoleName::Fleet))
        ));
    }
}
