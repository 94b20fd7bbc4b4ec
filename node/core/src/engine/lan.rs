//! LAN cooperation: so that each chunk crosses a site's uplink about once.
//!
//! The driver tells the engine which LAN peers install the same release
//! ([`Engine::set_swarm`]): each is a registered [`SourceClass::Peer`] source with a
//! stable key (its public key). Rendezvous hashing (HRW) over the members and this
//! device names one *owner* per chunk: only the owner fetches it over the WAN; the
//! others get it from any peer that says it has it ([`Engine::add_holds`], "peer P now
//! has these chunks"), typically the owner once it has it. A chunk a member says it
//! has already asked the WAN for ([`Engine::set_fetching`], "peer P is fetching these
//! chunks") is left to that member whatever the HRW order says: a device that joins
//! the swarm late (its peers started alone and asked the server for chunks it would
//! own) or a member's end game would otherwise pull the same chunk over the uplink a
//! second time. A member that makes no
//! progress (announces no new chunk) for [`Config::lan_timeout`], is banned or goes
//! away loses its ownership (one that is merely slow to serve this device keeps it): the next member in the chunk's HRW order owns it,
//! down to this device, which then fetches over the WAN. Every decision is a pure
//! function of the keys, the chunk ids and the inputs, so the simulator reproduces it.
//!
//! [`SourceClass::Peer`]: crate::SourceClass::Peer
//! [`Config::lan_timeout`]: super::Config::lan_timeout

use shoal_artifact::ChunkId;
use tracing::{debug, info};

use crate::bits::Bitfield;
use crate::error::SourceError;
use crate::source::{Holds, SourceClass, SourceId};
use crate::time::Instant;
use crate::timer::Timer;

use super::scheduler::{Need, Step};
use super::{Engine, Job};

/// A device's identity on the LAN for rendezvous hashing: its public key's bytes
/// (the same on every device that sees it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeKey(pub [u8; 32]);

/// The LAN peers installing the same release, as the driver knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swarm {
    /// This device's key.
    pub me: NodeKey,
    /// The others: each one's key and the peer source it is registered as.
    pub members: Vec<(NodeKey, SourceId)>,
}

/// The swarm as the scheduler keeps it.
#[derive(Debug)]
pub(crate) struct LanState {
    me: u64,
    members: Vec<Member>,
    /// Entries in [`Need::Lan`].
    pub(crate) waiting: u32,
}

#[derive(Debug)]
struct Member {
    seed: u64,
    /// Index of its source in the job's registry.
    source: usize,
    /// The last time it announced a chunk it did not have before (or joined).
    progress: Instant,
    /// The entries it says it has asked the WAN for and does not hold yet.
    fetching: Option<Bitfield>,
}

/// The part of a key that seeds its HRW scores.
pub(crate) fn seed(key: &NodeKey) -> u64 {
    u64::from_le_bytes(key.0[..8].try_into().expect("8 bytes"))
}

/// The HRW score of a member for a chunk (SplitMix64 of both; chunk ids are
/// uniformly random already).
pub(crate) fn score(seed: u64, chunk: &ChunkId) -> u64 {
    let c = u64::from_le_bytes(chunk.as_bytes()[..8].try_into().expect("8 bytes"));
    let mut z = (seed ^ c).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Job {
    /// Whether a member still owns chunks: not gone (disconnected, banned) and
    /// making progress. A member that is slow to *serve* this device (its source
    /// failed: silent past its retransmission timeout, busy serving the others)
    /// keeps fetching what it owns over the WAN: its requests move to other peers,
    /// but were its chunks fetched here too, every device that timed it out would
    /// pull them over the uplink again (measured: 1.9x a release's bytes for ten
    /// devices on two loaded cores). A member that stops fetching stops announcing,
    /// and loses its chunks after the owner timeout.
    fn member_alive(&self, m: &Member, now: Instant, timeout_ms: u64) -> bool {
        let s = &self.sources[m.source];
        s.gone.is_none() && now.as_millis() < m.progress.as_millis().saturating_add(timeout_ms)
    }

    /// Whether this device owns entry `e` now (always, outside a swarm): no live
    /// member ranks higher for it, and no live member is fetching it already.
    pub(crate) fn owns(&self, e: u32, now: Instant, timeout_ms: u64) -> bool {
        let Some(lan) = self.lan.as_ref() else {
            return true;
        };
        let id = self.rel.table.id(e);
        let mine = score(lan.me, &id);
        !lan.members.iter().any(|m| {
            (score(m.seed, &id) > mine || m.fetching.as_ref().is_some_and(|f| f.get(e)))
                && self.member_alive(m, now, timeout_ms)
        })
    }

    /// When the next member loses its ownership for lack of progress.
    pub(crate) fn lan_deadline(&self, now: Instant, timeout_ms: u64) -> Option<Instant> {
        let lan = self.lan.as_ref().filter(|l| l.waiting > 0)?;
        lan.members
            .iter()
            .filter(|m| self.member_alive(m, now, timeout_ms))
            .map(|m| Instant::from_millis(m.progress.as_millis().saturating_add(timeout_ms)))
            .min()
    }
}

impl Engine {
    /// Tells the engine which LAN peers install the same release (replacing what
    /// it was told before). Each member must be a registered source; its class
    /// should be [`SourceClass::Peer`]. Chunks this device does not own are then
    /// not fetched over the WAN while their owner makes progress.
    pub fn set_swarm(&mut self, now: Instant, swarm: Swarm) -> Result<(), SourceError> {
        let job = self.job.as_mut().ok_or(SourceError::NoInstall)?;
        let mut members = Vec::with_capacity(swarm.members.len());
        for (key, id) in &swarm.members {
            let source = job.source_index(*id).ok_or(SourceError::Unknown(*id))?;
            // What a member already said it fetches stays said.
            let fetching = job
                .lan
                .as_mut()
                .and_then(|l| l.members.iter_mut().find(|m| m.source == source))
                .and_then(|m| m.fetching.take());
            members.push(Member {
                seed: seed(key),
                source,
                progress: now,
                fetching,
            });
        }
        info!(members = members.len(), "LAN swarm set");
        let waiting = job.lan.as_ref().map_or(0, |l| l.waiting);
        job.lan = Some(LanState {
            me: seed(&swarm.me),
            members,
            waiting,
        });
        self.requeue_lan();
        self.pump(now);
        Ok(())
    }

    /// Adds to what a source says it holds ("peer P now has these chunks"). A
    /// swarm member that announces a chunk it did not have keeps its ownership.
    pub fn add_holds(
        &mut self,
        now: Instant,
        source: SourceId,
        holds: &Holds,
    ) -> Result<(), SourceError> {
        let job = self.job.as_mut().ok_or(SourceError::NoInstall)?;
        let i = job
            .source_index(source)
            .ok_or(SourceError::Unknown(source))?;
        let new = job.add_holds(i, holds);
        if !new.is_empty() {
            if let Some(m) = job
                .lan
                .as_mut()
                .and_then(|l| l.members.iter_mut().find(|m| m.source == i))
            {
                m.progress = now;
            }
            // Chunks waiting for the LAN that this source now has: ask it.
            for e in new {
                if job.need.get(e) == Need::Lan {
                    job.need.set(e, Need::QueuedFetch);
                    if let Some(lan) = job.lan.as_mut() {
                        lan.waiting -= 1;
                    }
                }
            }
        }
        self.pump(now);
        Ok(())
    }

    /// Replaces what swarm member `source` says it has asked the WAN for and does
    /// not hold yet ("peer P is fetching these chunks"): while it makes progress,
    /// this device leaves those chunks to it (and gets them from it once it holds
    /// them) rather than fetch them over the WAN too. Chunks it no longer says it
    /// fetches, and does not hold, are planned again. Ignored for a source that is
    /// not a swarm member (it would own nothing).
    pub fn set_fetching(
        &mut self,
        now: Instant,
        source: SourceId,
        fetching: &Holds,
    ) -> Result<(), SourceError> {
        let job = self.job.as_mut().ok_or(SourceError::NoInstall)?;
        let i = job
            .source_index(source)
            .ok_or(SourceError::Unknown(source))?;
        let new = super::scheduler::holds_by_entry(fetching, &job.rel.table);
        let Some(m) = job
            .lan
            .as_mut()
            .and_then(|l| l.members.iter_mut().find(|m| m.source == i))
        else {
            return Ok(());
        };
        let old = std::mem::replace(&mut m.fetching, new);
        // Entries waiting for the LAN that the member dropped without holding them
        // (its request failed or was cancelled): planned again.
        if let Some(old) = old {
            let dropped: Vec<u32> = old
                .iter()
                .filter(|&e| !m.fetching.as_ref().is_some_and(|f| f.get(e)))
                .collect();
            let mut requeued = 0u32;
            for e in dropped {
                if job.need.get(e) == Need::Lan {
                    job.need.set(e, Need::QueuedFetch);
                    requeued += 1;
                }
            }
            if let Some(lan) = job.lan.as_mut() {
                lan.waiting -= requeued;
            }
        }
        self.pump(now);
        Ok(())
    }

    /// Puts every entry waiting for the LAN back in the fetch queue (ownership
    /// changed).
    pub(crate) fn requeue_lan(&mut self) {
        let Some(job) = self.job.as_mut() else { return };
        if job.step != Step::Fetching || job.lan.as_ref().is_none_or(|l| l.waiting == 0) {
            return;
        }
        let mut n = 0;
        for e in 0..job.rel.table.entries() {
            if job.need.get(e) == Need::Lan {
                job.need.set(e, Need::QueuedFetch);
                n += 1;
            }
        }
        debug!(chunks = n, "LAN ownership changed; replanning");
        if let Some(lan) = job.lan.as_mut() {
            lan.waiting = 0;
        }
    }

    /// The LAN timer fired: members without progress lose their chunks.
    pub(crate) fn on_lan_timeout(&mut self, now: Instant) {
        if self.timers.is_expired(Timer::LanOwner, now) {
            self.requeue_lan();
        }
    }

    /// Whether the WAN may be asked for entry `e` now.
    pub(crate) fn wan_allowed(&self, job: &Job, e: u32, now: Instant) -> bool {
        job.owns(e, now, ms(self.config.lan_timeout))
    }
}

/// Whether `class` is the WAN.
pub(crate) fn is_wan(class: SourceClass) -> bool {
    class == SourceClass::Wan
}

pub(crate) fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hrw_owners_spread_evenly_and_agree_across_members() {
        let keys: Vec<u64> = (0..10u8).map(|k| seed(&NodeKey([k * 7 + 1; 32]))).collect();
        let mut owned = [0u32; 10];
        for c in 0..10_000u32 {
            let id = ChunkId::from(blake3::hash(&c.to_le_bytes()));
            let best = (0..10).max_by_key(|&k| score(keys[k], &id)).expect("ten");
            owned[best] += 1;
        }
        // Each member owns about a tenth.
        assert!(owned.iter().all(|&n| (800..1200).contains(&n)), "{owned:?}");
        // Removing one member moves only its chunks.
        let id = ChunkId::from(blake3::hash(b"x"));
        let best = (0..10).max_by_key(|&k| score(keys[k], &id)).expect("ten");
        let second = (0..10)
            .filter(|&k| k != best)
            .max_by_key(|&k| score(keys[k], &id))
            .expect("nine");
        let other = (0..10).find(|&k| k != best && k != second).expect("eight");
        let without_other = (0..10)
            .filter(|&k| k != other)
            .max_by_key(|&k| score(keys[k], &id))
            .expect("nine");
        assert_eq!(without_other, best);
    }
}
