//! LAN peers from the server: where multicast is blocked, each poll tells the
//! server where this device's LAN layer listens and dials the devices the server
//! sees behind the same public address. A hint only: what a peer is served is
//! still decided by its fleet credential.

use libp2p_core::Multiaddr;
use libp2p_identity::PeerId;
use tracing::{debug, warn};

use super::Daemon;
use super::api::LanPeer;

/// The peer id and addresses of one device the server named; an error names
/// what is malformed.
pub(super) fn parse(peer: &LanPeer) -> Result<(PeerId, Vec<Multiaddr>), String> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(&peer.public_key, &mut key)
        .map_err(|e| format!("public key {:?}: {e}", peer.public_key))?;
    let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(&key)
        .map_err(|e| format!("public key {}: {e}", peer.public_key))?;
    let id = libp2p_identity::PublicKey::from(key).to_peer_id();
    let addrs = peer
        .addrs
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .map_err(|e| format!("address {a:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((id, addrs))
}

impl Daemon {
    /// Tells the server where the LAN layer listens and dials the devices it sees
    /// behind the same public address. Trouble is logged, never fatal.
    pub(super) fn lan_peers_from_server(&mut self) {
        let Some(lan) = self.lan.clone() else { return };
        let addrs: Vec<String> = lan.listening().iter().map(|a| a.to_string()).collect();
        let answer = match self.api.lan_peers(&addrs) {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "cannot ask the server for LAN peers");
                return;
            }
        };
        let mut peers = Vec::with_capacity(answer.peers.len());
        for p in &answer.peers {
            match parse(p) {
                Ok(p) => peers.push(p),
                Err(e) => warn!(error = %e, "the server named a malformed LAN peer"),
            }
        }
        debug!(source_ip = %answer.source_ip, peers = peers.len(), "LAN peers from the server");
        lan.server_peers(peers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(key: &str, addrs: &[&str]) -> LanPeer {
        LanPeer {
            public_key: key.to_owned(),
            addrs: addrs.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn peers_named_by_the_server_are_parsed_and_malformed_ones_named() {
        let secret = shoal_signing::SecretKey::from_seed(&[7; 32]);
        let key = hex::encode(secret.public().to_bytes());
        let want = crate::lan::keypair(&secret).unwrap().public().to_peer_id();
        let (id, addrs) = parse(&peer(&key, &["/ip4/127.0.0.1/tcp/4001"])).unwrap();
        assert_eq!(id, want);
        assert_eq!(
            addrs,
            vec!["/ip4/127.0.0.1/tcp/4001".parse::<Multiaddr>().unwrap()]
        );

        let e = parse(&peer("zz", &[])).unwrap_err();
        assert!(e.starts_with("public key \"zz\":"), "{e}");
        let e = parse(&peer(&key[..62], &[])).unwrap_err();
        assert!(e.starts_with("public key"), "{e}");
        let e = parse(&peer(&key, &["not-an-address"])).unwrap_err();
        assert!(e.starts_with("address \"not-an-address\":"), "{e}");
    }
}
