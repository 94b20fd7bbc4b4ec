//! LAN peers from the server: where multicast is blocked, each poll tells the
//! server where this device's LAN layer listens and dials the devices the server
//! sees behind the same public address. A hint only: what a peer is served is
//! still decided by its fleet credential.

use libp2p_core::Multiaddr;
use libp2p_identity::PeerId;
use tracing::{debug, warn};

use super::Daemon;
use super::api::LanPeer;

/// Addresses told to the server at most (the server refuses more: its
/// `ADDRS_MAX`). A device with many interfaces, or QUIC twins of each TCP
/// address, can listen on more.
const ANNOUNCED_MAX: usize = 16;

/// The listen addresses told to the server: those other devices can reach
/// first (loopback last: it only serves devices on this very host), at most
/// [`ANNOUNCED_MAX`].
fn announced(listening: &[Multiaddr]) -> Vec<String> {
    let loopback = |a: &Multiaddr| {
        a.iter().any(|p| match p {
            libp2p_core::multiaddr::Protocol::Ip4(ip) => ip.is_loopback(),
            libp2p_core::multiaddr::Protocol::Ip6(ip) => ip.is_loopback(),
            _ => false,
        })
    };
    let mut addrs: Vec<&Multiaddr> = listening.iter().collect();
    addrs.sort_by_key(|a| loopback(a));
    addrs
        .into_iter()
        .take(ANNOUNCED_MAX)
        .map(|a| a.to_string())
        .collect()
}

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
        let addrs = announced(&lan.listening());
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

    #[test]
    fn at_most_sixteen_addresses_are_announced_loopback_last() {
        let mut listening: Vec<Multiaddr> = vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap()];
        listening.extend((0..20).map(|n| format!("/ip4/10.0.0.{n}/tcp/4001").parse().unwrap()));
        let sent = announced(&listening);
        assert_eq!(sent.len(), ANNOUNCED_MAX);
        assert_eq!(sent[0], "/ip4/10.0.0.0/tcp/4001");
        assert!(!sent.iter().any(|a| a.contains("127.0.0.1")), "{sent:?}");
        let few: Vec<Multiaddr> = vec![
            "/ip4/127.0.0.1/tcp/1".parse().unwrap(),
            "/ip4/192.168.1.5/udp/1/quic-v1".parse().unwrap(),
        ];
        assert_eq!(
            announced(&few),
            ["/ip4/192.168.1.5/udp/1/quic-v1", "/ip4/127.0.0.1/tcp/1"]
        );
    }

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
