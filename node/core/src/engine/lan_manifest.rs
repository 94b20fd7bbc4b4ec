//! Where a device told of a release by the server gets its signed manifest: from a
//! LAN peer that has it when one does, else one device of the LAN (the HRW owner of
//! the manifest id among the peers that may want it) fetches it over the WAN while
//! the others wait for it a bounded time, then ask the server themselves.
//!
//! The driver calls [`ManifestPlan::step`] with what its peers say (who holds the
//! release: runs or installs it; who else is on the LAN) and does what it says. A
//! peer whose envelope does not verify is the driver's to ban and leave out of
//! `holders`. Pure: the same keys, id and times give the same steps, so the
//! simulator reproduces it.

use std::time::Duration;

use shoal_artifact::ChunkId;

use super::lan::{NodeKey, score, seed};
use crate::time::Instant;

/// What to do next for a release's signed manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestStep {
    /// Ask this peer (one of the holders) for it.
    Peer(NodeKey),
    /// Fetch it from the server (over the WAN).
    Server,
    /// Wait for a peer to get it, at most until then (and look again when the
    /// peers' states change).
    Wait(Instant),
}

/// Why [`ManifestStep::Server`] was chosen (for the driver's log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerWhy {
    /// This device is the manifest's owner on its LAN (or alone on it).
    Owner,
    /// No peer came up with it within the wait.
    Waited,
}

/// One device's search for one release's manifest.
#[derive(Debug, Clone)]
pub struct ManifestPlan {
    me: NodeKey,
    id: ChunkId,
    deadline: Instant,
}

impl ManifestPlan {
    /// Starts looking at `now` for the manifest whose id (BLAKE3 of its CBOR) is
    /// `id`, waiting at most `wait` for a peer to have it.
    pub fn new(me: NodeKey, id: [u8; 32], now: Instant, wait: Duration) -> ManifestPlan {
        ManifestPlan {
            me,
            id: ChunkId(id),
            deadline: now.saturating_add(wait),
        }
    }

    /// The next step. `holders`: the peers that say they run or install the
    /// release (and have not sent a bad or no manifest); `others`: the other peers
    /// on the LAN (they may be waiting for it too).
    pub fn step(&self, now: Instant, holders: &[NodeKey], others: &[NodeKey]) -> ManifestStep {
        // The holder whose score for (this device, the release) is highest: the
        // askers spread over the holders, each always asking the same one first.
        let mine = seed(&self.me);
        if let Some(h) = holders
            .iter()
            .max_by_key(|h| (score(seed(h) ^ mine, &self.id), h.0))
        {
            return ManifestStep::Peer(*h);
        }
        if self.server_why(now, others).is_some() {
            return ManifestStep::Server;
        }
        ManifestStep::Wait(self.deadline)
    }

    /// The peer among `candidates` ranking highest for this id: the one that
    /// fetches it over the WAN, unless this device ranks higher still
    /// ([`ManifestPlan::server_why`]). Whoever waits asks it first.
    pub fn owner(&self, candidates: &[NodeKey]) -> Option<NodeKey> {
        candidates
            .iter()
            .max_by_key(|o| (score(seed(o), &self.id), o.0))
            .copied()
    }

    /// Why this device fetches from the server now, if it does (no holders).
    pub fn server_why(&self, now: Instant, others: &[NodeKey]) -> Option<ServerWhy> {
        if now >= self.deadline {
            return Some(ServerWhy::Waited);
        }
        let mine = (score(seed(&self.me), &self.id), self.me.0);
        others
            .iter()
            .all(|o| (score(seed(o), &self.id), o.0) < mine)
            .then_some(ServerWhy::Owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> NodeKey {
        NodeKey(*blake3::hash(&[n]).as_bytes())
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[test]
    fn exactly_one_device_of_a_lan_fetches_from_the_server() {
        let keys: Vec<NodeKey> = (0..10).map(key).collect();
        let t0 = Instant::from_millis(1000);
        for r in 0..50u8 {
            let id = *blake3::hash(&[r, 0xaa]).as_bytes();
            let owners: Vec<usize> = (0..10)
                .filter(|&i| {
                    let others: Vec<NodeKey> = keys
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, k)| *k)
                        .collect();
                    ManifestPlan::new(keys[i], id, t0, WAIT).step(t0, &[], &others)
                        == ManifestStep::Server
                })
                .collect();
            assert_eq!(owners.len(), 1, "release {r}: owners {owners:?}");
        }
    }

    #[test]
    fn the_others_wait_then_ask_a_holder_or_the_server() {
        let (me, a, b) = (key(1), key(2), key(3));
        let id = *blake3::hash(b"release").as_bytes();
        let t0 = Instant::from_millis(0);
        // Find an id where `me` is not the owner among {me, a}.
        let ids: Vec<[u8; 32]> = (0..64u8).map(|n| *blake3::hash(&[n]).as_bytes()).collect();
        let id_not_mine = *ids
            .iter()
            .find(|i| {
                ManifestPlan::new(me, **i, t0, WAIT)
                    .server_why(t0, &[a])
                    .is_none()
            })
            .expect("some id is another's");
        let plan = ManifestPlan::new(me, id_not_mine, t0, WAIT);
        assert_eq!(
            plan.step(t0, &[], &[a]),
            ManifestStep::Wait(t0.saturating_add(WAIT))
        );
        // A holder appears: ask it.
        assert_eq!(plan.step(t0, &[b], &[a]), ManifestStep::Peer(b));
        // The wait is over: the server.
        let late = t0.saturating_add(WAIT);
        assert_eq!(plan.step(late, &[], &[a]), ManifestStep::Server);
        assert_eq!(plan.server_why(late, &[a]), Some(ServerWhy::Waited));
        // The owner among the others is the one that outranks this device.
        assert_eq!(plan.owner(&[a]), Some(a));
        assert_eq!(plan.owner(&[]), None);
        // Alone on the LAN: the server at once.
        let alone = ManifestPlan::new(me, id, t0, WAIT);
        assert_eq!(alone.step(t0, &[], &[]), ManifestStep::Server);
        assert_eq!(alone.server_why(t0, &[]), Some(ServerWhy::Owner));
    }

    #[test]
    fn askers_spread_over_the_holders() {
        let holders: Vec<NodeKey> = (100..104).map(key).collect();
        let id = *blake3::hash(b"r").as_bytes();
        let t0 = Instant::from_millis(0);
        let mut asked = std::collections::BTreeMap::new();
        for n in 0..40 {
            let ManifestStep::Peer(h) =
                ManifestPlan::new(key(n), id, t0, WAIT).step(t0, &holders, &[])
            else {
                panic!("a holder is asked");
            };
            *asked.entry(h.0).or_insert(0) += 1;
        }
        assert!(
            asked.len() >= 3,
            "40 askers went to {} of 4 holders",
            asked.len()
        );
    }
}
