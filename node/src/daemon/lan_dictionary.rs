//! A deployment's zstd dictionaries from the LAN first (issue 13): a device that
//! needs a dictionary to decode the chunks it fetches from the server asks the
//! peers that install or run the same release; one device of the site (the HRW
//! owner of the dictionary among them, the engine's [`ManifestPlan`] decision)
//! fetches it from the server while the others wait up to [`WAIT`] for a peer to
//! have it.
//!
//! A peer's dictionary is checked as far as it can be before use (its zstd id is
//! derived from its bytes, and is the one asked for), and every chunk decoded with
//! it is hashed: one that decodes a chunk wrong is dropped, the server's is
//! fetched, and the peer that sent it is blocked ([`PeerDictionaries::refuse`]).
//! A manifest of format 2 names its dictionary's BLAKE3: a peer's dictionary is
//! then used only if it hashes to it (checked in `fetch::dictionary`, for every
//! peer); chunks are never trusted without their hash either way.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libp2p_identity::PeerId;
use shoal_artifact::chunk::Dictionary;
use shoal_engine::{ManifestPlan, ManifestStep};
use tracing::{debug, info, warn};

use super::fetch::PeerDictionaries;
use crate::lan::Lan;
use crate::lan::proto::ManifestId;

/// How long a device waits for a LAN peer to have a dictionary before it asks the
/// server itself.
const WAIT: Duration = Duration::from_secs(5);
/// How often the peers are asked again while waiting.
const ASK_EVERY: Duration = Duration::from_millis(250);
/// Peers asked per round at most.
const ASKED_PER_ROUND: usize = 3;

/// The LAN peers of one deployment as a dictionary source.
pub(super) struct LanDictionaries {
    lan: Lan,
    manifest: ManifestId,
    data_dir: PathBuf,
    timeout: Duration,
    /// Which peer sent each dictionary taken from the LAN.
    sent_by: Mutex<HashMap<u32, PeerId>>,
}

impl LanDictionaries {
    pub(super) fn new(
        lan: Lan,
        manifest: ManifestId,
        data_dir: PathBuf,
        timeout: Duration,
    ) -> Self {
        LanDictionaries {
            lan,
            manifest,
            data_dir,
            timeout,
            sent_by: Mutex::new(HashMap::new()),
        }
    }
}

impl PeerDictionaries for LanDictionaries {
    fn fetch(&self, zstd_id: u32) -> Option<Dictionary> {
        let start = Instant::now();
        let now = || shoal_engine::Instant::from_millis(start.elapsed().as_millis() as u64);
        let me = crate::lan::node_key(&self.lan.peer_id());
        let mut key = *blake3::hash(&self.manifest.0).as_bytes();
        key[..4].copy_from_slice(&zstd_id.to_le_bytes());
        let plan = ManifestPlan::new(me, key, now(), WAIT);
        let mut skipped: HashSet<PeerId> = HashSet::new();
        loop {
            let holders: Vec<(shoal_engine::NodeKey, PeerId)> = self
                .lan
                .peers()
                .snapshot()
                .into_iter()
                .filter(|(p, s)| {
                    !skipped.contains(p)
                        && (s.running == Some(self.manifest)
                            || s.installing
                                .as_ref()
                                .is_some_and(|i| i.manifest == self.manifest))
                })
                .map(|(p, _)| (crate::lan::node_key(&p), p))
                .collect();
            let mut keys: Vec<_> = holders.iter().map(|(k, _)| *k).collect();
            // The owner (the one fetching it from the server) first, then peers in
            // the plan's order for this device (different peers first on different
            // devices: those that got it from the owner pass it on).
            let owner = plan.owner(&keys);
            let mut asked = 0;
            while asked < ASKED_PER_ROUND {
                let k = match owner.filter(|o| asked == 0 && keys.contains(o)) {
                    Some(o) => o,
                    None => match plan.step(now(), &keys, &[]) {
                        ManifestStep::Peer(k) => k,
                        _ => break,
                    },
                };
                keys.retain(|x| *x != k);
                let Some(&(_, peer)) = holders.iter().find(|(h, _)| *h == k) else {
                    break;
                };
                asked += 1;
                match self
                    .lan
                    .dictionary(peer, self.manifest, zstd_id, self.timeout)
                {
                    Ok(Some(bytes)) => match Dictionary::from_bytes(bytes) {
                        Ok(d) if d.zstd_id == zstd_id => {
                            info!(%peer, zstd_id = %format!("{zstd_id:08x}"), bytes = d.bytes().len(), "a zstd dictionary came from a LAN peer");
                            if let Ok(mut s) = self.sent_by.lock() {
                                s.insert(zstd_id, peer);
                            }
                            return Some(d);
                        }
                        Ok(d) => {
                            warn!(%peer, asked = %format!("{zstd_id:08x}"), sent = %format!("{:08x}", d.zstd_id), "a LAN peer sent another dictionary");
                            self.lan.block_because(
                                peer,
                                "it sent a dictionary that is not the one asked for",
                            );
                            skipped.insert(peer);
                        }
                        Err(e) => {
                            warn!(%peer, zstd_id = %format!("{zstd_id:08x}"), error = %e, "a LAN peer's dictionary was refused");
                            self.lan
                                .block_because(peer, "it sent a dictionary that is not one");
                            skipped.insert(peer);
                        }
                    },
                    Ok(None) => {}
                    Err(why) => {
                        debug!(%peer, why, "no dictionary from a LAN peer");
                        skipped.insert(peer);
                    }
                }
            }
            let all: Vec<_> = holders.iter().map(|(k, _)| *k).collect();
            if let Some(why) = plan.server_why(now(), &all) {
                info!(zstd_id = %format!("{zstd_id:08x}"), ?why, holders = all.len(), "fetching a zstd dictionary from the server");
                return None;
            }
            std::thread::sleep(ASK_EVERY);
        }
    }

    fn refuse(&self, zstd_id: u32) {
        let peer = self
            .sent_by
            .lock()
            .ok()
            .and_then(|mut s| s.remove(&zstd_id));
        if let Some(peer) = peer {
            self.lan
                .block_because(peer, "it sent a dictionary that decodes chunks wrong");
        }
    }

    fn keep(&self, dict: &Dictionary) {
        if let Err(e) = crate::lan::serve::save_dictionary(&self.data_dir, dict) {
            warn!(error = %format!("{e:#}"), "cannot keep the dictionary for peers");
        }
    }
}
