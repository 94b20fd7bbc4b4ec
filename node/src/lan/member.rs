//! Only the fleet is served: who may get manifests and chunks from this device.
//!
//! When the trust root has a `fleet` role, a peer is admitted only when the
//! credential it shows (in its first state message on each new connection) is
//! signed by a threshold of the fleet keys, is for the key the peer's connection
//! was authenticated with (its peer id), names this device's own fleet, has not
//! expired and is not for a revoked key. Without a fleet role (trust roots made
//! before it existed) the LAN is open: any peer is served, and what it sends is
//! still checked like anything else (signed manifests, hashed chunks).

use std::collections::HashSet;

use anyhow::{Context, anyhow};
use libp2p_identity::PeerId;
use shoal_signing::{Credential, RoleName, SecretKey, TrustRoot};
use tracing::warn;

/// Why a peer was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefuseError {
    /// It showed no credential.
    #[error("the peer shows no fleet credential")]
    NoCredential,
    /// Its credential does not verify (signatures, format, expiry).
    #[error("the peer's credential is refused: {0}")]
    Invalid(#[from] shoal_signing::CredentialError),
    /// The credential is for another key than the peer's.
    #[error("the peer shows a credential of another device")]
    NotItsOwn,
    /// The credential is for another fleet.
    #[error("the peer belongs to fleet {0:?}, not this one")]
    OtherFleet(String),
    /// The peer's key is revoked.
    #[error("the peer's key is revoked")]
    Revoked,
}

/// This device's membership and the rule it admits peers by.
#[derive(Debug, Clone)]
pub struct Membership {
    /// The trust root (with its fleet role) when the fleet is closed.
    root: Option<TrustRoot>,
    /// This device's fleet (closed fleets).
    fleet: Option<String>,
    /// This device's credential, shown to its peers.
    credential: Option<Vec<u8>>,
    /// Revoked keys of `[lan] revoked_peers`.
    revoked: HashSet<[u8; 32]>,
    /// Revoked keys the server handed out with the last credential.
    server_revoked: HashSet<[u8; 32]>,
    /// This device's key.
    me: shoal_signing::PublicKey,
}

/// The peer id of a device key.
pub fn peer_of(key: &shoal_signing::PublicKey) -> Option<PeerId> {
    let ed = libp2p_identity::ed25519::PublicKey::try_from_bytes(&key.to_bytes()).ok()?;
    Some(libp2p_identity::PublicKey::from(ed).to_peer_id())
}

impl Membership {
    /// The membership of a device with `key`, trusting `root`, as `[lan]` says. A
    /// closed fleet without a (valid) credential of this device's own still starts:
    /// it can fetch from no peer and serves none, and says so.
    pub fn load(
        lan: &crate::config::Lan,
        root: &TrustRoot,
        key: &SecretKey,
        now_unix_s: Option<u64>,
    ) -> anyhow::Result<Membership> {
        let revoked = lan
            .revoked_peers
            .iter()
            .map(|h| {
                let mut k = [0u8; 32];
                hex::decode_to_slice(h, &mut k).map(|()| k)
            })
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow!("lan.revoked_peers: {e}"))?;
        if !root.roles.contains_key(&RoleName::Fleet) {
            return Ok(Membership {
                root: None,
                fleet: None,
                credential: None,
                revoked,
                server_revoked: HashSet::new(),
                me: key.public(),
            });
        }
        let mut m = Membership {
            root: Some(root.clone()),
            fleet: None,
            credential: None,
            revoked,
            server_revoked: HashSet::new(),
            me: key.public(),
        };
        let Some(path) = &lan.credential else {
            warn!(
                "the trust root has a fleet role but [lan] names no credential: no peer will serve this device"
            );
            return Ok(m);
        };
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read lan.credential {}", path.display()))?;
        match Credential::verify(&bytes, root, now_unix_s) {
            Ok(c) if c.peer == key.public() => {
                m.fleet = Some(c.fleet);
                m.credential = Some(bytes);
            }
            Ok(_) => {
                warn!(path = %path.display(), "lan.credential is another device's: no peer will serve this device")
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "lan.credential is refused: no peer will serve this device")
            }
        }
        Ok(m)
    }

    /// Takes a credential the server issued (and the keys it says are revoked):
    /// shown from now on when it verifies against the trust root and is this
    /// device's own; refused (the old one kept) otherwise.
    pub fn renew(
        &mut self,
        credential: &[u8],
        revoked: HashSet<[u8; 32]>,
        now_unix_s: Option<u64>,
    ) -> Result<(), RefuseError> {
        self.server_revoked = revoked;
        let Some(root) = &self.root else {
            return Ok(());
        };
        let c = Credential::verify(credential, root, now_unix_s)?;
        if c.peer != self.me {
            return Err(RefuseError::NotItsOwn);
        }
        self.fleet = Some(c.fleet);
        self.credential = Some(credential.to_vec());
        Ok(())
    }

    /// Whether the fleet is closed (the trust root has a fleet role).
    pub fn closed(&self) -> bool {
        self.root.is_some()
    }

    /// The credential this device shows.
    pub fn credential(&self) -> Option<&[u8]> {
        self.credential.as_deref()
    }

    /// Whether `peer`, showing `credential`, is served.
    pub fn admit(
        &self,
        peer: &PeerId,
        credential: Option<&[u8]>,
        now_unix_s: Option<u64>,
    ) -> Result<(), RefuseError> {
        let Some(root) = &self.root else {
            return Ok(());
        };
        let bytes = credential.ok_or(RefuseError::NoCredential)?;
        let c = Credential::verify(bytes, root, now_unix_s)?;
        if peer_of(&c.peer).as_ref() != Some(peer) {
            return Err(RefuseError::NotItsOwn);
        }
        if self.revoked.contains(&c.peer.to_bytes())
            || self.server_revoked.contains(&c.peer.to_bytes())
        {
            return Err(RefuseError::Revoked);
        }
        // A device without a valid credential of its own has no fleet: it admits
        // nobody.
        if self.fleet.as_deref() != Some(c.fleet.as_str()) {
            return Err(RefuseError::OtherFleet(c.fleet));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed(&[n; 32])
    }

    fn root(fleet: bool) -> TrustRoot {
        let r = TrustRoot::new(
            1,
            2_000_000_000,
            &[key(1).public()],
            1,
            &[key(2).public()],
            1,
        )
        .expect("root");
        if fleet {
            r.with_fleet(&[key(3).public()], 1).expect("fleet")
        } else {
            r
        }
    }

    fn member(n: u8, fleet: &str, revoked: Vec<String>) -> (Membership, PeerId, Vec<u8>) {
        let k = key(n);
        let cred = Credential::new(k.public(), fleet, 1_900_000_000).issue(&[&key(3)]);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c");
        std::fs::write(&path, &cred).expect("write");
        let lan = crate::config::Lan {
            credential: Some(path),
            revoked_peers: revoked,
            ..Default::default()
        };
        let m = Membership::load(&lan, &root(true), &k, Some(1_800_000_000)).expect("load");
        (m, peer_of(&k.public()).expect("peer id"), cred)
    }

    #[test]
    fn only_members_of_the_same_fleet_are_admitted() {
        let now = Some(1_800_000_000);
        let (a, a_id, a_cred) = member(10, "site", Vec::new());
        let (_, b_id, b_cred) = member(11, "site", Vec::new());
        let (_, c_id, c_cred) = member(12, "elsewhere", Vec::new());
        assert!(a.closed());
        assert_eq!(a.credential(), Some(&a_cred[..]));
        assert_eq!(a.admit(&b_id, Some(&b_cred), now), Ok(()));
        assert_eq!(a.admit(&b_id, None, now), Err(RefuseError::NoCredential));
        assert_eq!(
            a.admit(&c_id, Some(&c_cred), now),
            Err(RefuseError::OtherFleet("elsewhere".into()))
        );
        // Someone else's credential, replayed.
        assert_eq!(
            a.admit(&c_id, Some(&b_cred), now),
            Err(RefuseError::NotItsOwn)
        );
        // Expired.
        assert!(matches!(
            a.admit(&b_id, Some(&b_cred), Some(1_900_000_000)),
            Err(RefuseError::Invalid(
                shoal_signing::CredentialError::Expired { .. }
            ))
        ));
        // Revoked.
        let (r, _, _) = member(10, "site", vec![hex::encode(key(11).public().to_bytes())]);
        assert_eq!(
            r.admit(&b_id, Some(&b_cred), now),
            Err(RefuseError::Revoked)
        );
        let _ = a_id;
    }

    #[test]
    fn a_server_issued_credential_is_taken_only_when_it_is_this_devices_own() {
        let now = Some(1_800_000_000);
        let lan = crate::config::Lan::default();
        let mut m = Membership::load(&lan, &root(true), &key(10), now).expect("load");
        let (_, b_id, b_cred) = member(11, "site", Vec::new());
        // Another device's credential is refused and changes nothing.
        assert_eq!(
            m.renew(&b_cred, HashSet::new(), now),
            Err(RefuseError::NotItsOwn)
        );
        assert_eq!(m.credential(), None);
        // One signed by a key the root does not name for the fleet is refused.
        let forged = Credential::new(key(10).public(), "site", 1_900_000_000).issue(&[&key(9)]);
        assert!(matches!(
            m.renew(&forged, HashSet::new(), now),
            Err(RefuseError::Invalid(_))
        ));
        assert_eq!(m.credential(), None);
        // Its own is shown, and it admits members of its fleet.
        let own = Credential::new(key(10).public(), "site", 1_900_000_000).issue(&[&key(3)]);
        assert_eq!(m.renew(&own, HashSet::new(), now), Ok(()));
        assert_eq!(m.credential(), Some(&own[..]));
        assert_eq!(m.admit(&b_id, Some(&b_cred), now), Ok(()));
        // The server says device 11 is decommissioned: refused at once.
        let revoked = HashSet::from([key(11).public().to_bytes()]);
        assert_eq!(m.renew(&own, revoked, now), Ok(()));
        assert_eq!(
            m.admit(&b_id, Some(&b_cred), now),
            Err(RefuseError::Revoked)
        );
    }

    #[test]
    fn without_a_fleet_role_the_lan_is_open() {
        let lan = crate::config::Lan::default();
        let m = Membership::load(&lan, &root(false), &key(10), None).expect("load");
        assert!(!m.closed());
        let anyone = peer_of(&key(20).public()).expect("peer id");
        assert_eq!(m.admit(&anyone, None, None), Ok(()));
    }

    #[test]
    fn a_device_without_its_own_credential_admits_nobody() {
        let lan = crate::config::Lan::default();
        let m = Membership::load(&lan, &root(true), &key(10), None).expect("load");
        let (_, b_id, b_cred) = member(11, "site", Vec::new());
        assert_eq!(
            m.admit(&b_id, Some(&b_cred), None),
            Err(RefuseError::OtherFleet("site".into()))
        );
    }
}
