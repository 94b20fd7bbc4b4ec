//! Offline propagation (`[lan] accept_releases`): whether a release a LAN peer runs
//! is one this device should offer itself.
//!
//! The decision is the engine's, so the simulator makes it the same way; the checks
//! that follow it (trust root, device type, depends, slot size, anti-rollback) are
//! the ordinary offer's, run on the peer's signed manifest exactly as on the
//! server's. This only keeps a device from installing releases that are not an
//! update: the one it runs, an older one, another product's, or one it already
//! rolled back.

use std::cmp::Ordering;

use super::Status;
use crate::state::{Release, Verdict, slot_ordinal};

/// What to do with a release a LAN peer runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRelease {
    /// Newer than the running release (or the device runs none it knows): offer it.
    Adopt,
    /// The release the device runs.
    Running,
    /// Not newer than the running release (lower security counter, or the same
    /// counter and a version that does not compare higher).
    NotNewer,
    /// A release of another name than the running one.
    OtherName,
    /// The device rolled this very release back (its health checks failed); it is
    /// not tried again from peers.
    RolledBack,
    /// The device is in the middle of another deployment.
    Busy,
}

/// Decides whether `offered` (from a peer's verified manifest) is an update for a
/// device in `state`. A deployment already in progress of the same release counts
/// as an update (the install resumes from its journal).
pub fn peer_release(state: &Status, offered: &Release) -> PeerRelease {
    if let Some(d) = &state.deployment {
        return if peer_busy(state, &offered.manifest_hash) {
            PeerRelease::Busy
        } else {
            debug_assert_eq!(d.release.manifest_hash, offered.manifest_hash);
            PeerRelease::Adopt
        };
    }
    if let Some(last) = &state.last
        && last.release.manifest_hash == offered.manifest_hash
        && matches!(last.verdict, Verdict::RolledBack { .. })
    {
        return PeerRelease::RolledBack;
    }
    let Some(running) = &state.releases[slot_ordinal(state.active)] else {
        return PeerRelease::Adopt;
    };
    if running.manifest_hash == offered.manifest_hash {
        return PeerRelease::Running;
    }
    if running.name != offered.name {
        return PeerRelease::OtherName;
    }
    let newer = match offered.security_counter.cmp(&running.security_counter) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => compare_versions(&offered.version, &running.version).is_gt(),
    };
    if newer {
        PeerRelease::Adopt
    } else {
        PeerRelease::NotNewer
    }
}

/// Whether [`peer_release`] says [`PeerRelease::Busy`] for every release whose
/// manifest hashes to `manifest_hash`: the device is in the middle of a deployment
/// that an offer of it would not resume (another release, or its own past
/// fetching). Known from the hash alone, so a device asks it before it fetches or
/// verifies (and stores) a peer's manifest.
pub fn peer_busy(state: &Status, manifest_hash: &[u8; 32]) -> bool {
    state.deployment.as_ref().is_some_and(|d| {
        d.release.manifest_hash != *manifest_hash || d.phase != crate::Phase::Fetching
    })
}

/// Orders two free-form versions: split at `.`, `-`, `+` and `_`; numeric parts
/// compare as numbers, others as text, a numeric part above a text one; a version
/// that is a prefix of the other is lower (`2.0` < `2.0.1`).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let parts =
        |s: &str| -> Vec<String> { s.split(['.', '-', '+', '_']).map(str::to_owned).collect() };
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(&pb) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            (Ok(_), Err(_)) => Ordering::Greater,
            (Err(_), Ok(_)) => Ordering::Less,
            (Err(_), Err(_)) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeploymentStatus;
    use crate::Phase;
    use crate::state::{Outcome, Slot};

    fn release(name: &str, version: &str, counter: u64, tag: u8) -> Release {
        Release {
            name: name.into(),
            version: version.into(),
            security_counter: counter,
            manifest_hash: [tag; 32],
            payload_size: 1,
            payload_hash: [tag; 32],
            provides: Default::default(),
        }
    }

    fn running(r: Option<Release>) -> Status {
        Status {
            active: Slot::A,
            floor: 0,
            releases: [r, None],
            deployment: None,
            last: None,
            progress: Default::default(),
            sources: Vec::new(),
        }
    }

    #[test]
    fn versions_order_numerically_then_by_text() {
        assert_eq!(compare_versions("2.10", "2.9"), Ordering::Greater);
        assert_eq!(compare_versions("2.0", "2.0.1"), Ordering::Less);
        assert_eq!(compare_versions("1.0.0", "1.0.0"), Ordering::Equal);
        assert_eq!(compare_versions("1.0-rc2", "1.0-rc1"), Ordering::Greater);
        assert_eq!(compare_versions("1.1", "1.rc"), Ordering::Greater);
    }

    #[test]
    fn a_newer_release_of_the_same_name_is_adopted() {
        let s = running(Some(release("os", "1.0", 1, 1)));
        assert_eq!(
            peer_release(&s, &release("os", "1.1", 1, 2)),
            PeerRelease::Adopt
        );
        assert_eq!(
            peer_release(&s, &release("os", "0.9", 2, 2)),
            PeerRelease::Adopt
        );
        assert_eq!(
            peer_release(&running(None), &release("os", "0.1", 0, 2)),
            PeerRelease::Adopt
        );
    }

    #[test]
    fn the_running_an_older_or_another_products_release_is_not() {
        let s = running(Some(release("os", "1.0", 1, 1)));
        assert_eq!(
            peer_release(&s, &release("os", "1.0", 1, 1)),
            PeerRelease::Running
        );
        assert_eq!(
            peer_release(&s, &release("os", "0.9", 1, 2)),
            PeerRelease::NotNewer
        );
        assert_eq!(
            peer_release(&s, &release("os", "1.0", 1, 2)),
            PeerRelease::NotNewer
        );
        assert_eq!(
            peer_release(&s, &release("os", "9.0", 0, 2)),
            PeerRelease::NotNewer
        );
        assert_eq!(
            peer_release(&s, &release("other", "2.0", 5, 2)),
            PeerRelease::OtherName
        );
    }

    #[test]
    fn a_rolled_back_release_is_not_tried_again() {
        let mut s = running(Some(release("os", "1.0", 1, 1)));
        s.last = Some(Outcome {
            release: release("os", "2.0", 1, 2),
            slot: Slot::B,
            verdict: Verdict::RolledBack {
                reason: "health".into(),
            },
        });
        assert_eq!(
            peer_release(&s, &release("os", "2.0", 1, 2)),
            PeerRelease::RolledBack
        );
        assert_eq!(
            peer_release(&s, &release("os", "2.1", 1, 3)),
            PeerRelease::Adopt
        );
    }

    #[test]
    fn a_deployment_in_progress_resumes_only_for_its_own_release() {
        let mut s = running(Some(release("os", "1.0", 1, 1)));
        s.deployment = Some(DeploymentStatus {
            release: release("os", "2.0", 1, 2),
            target: Slot::B,
            phase: Phase::Fetching,
            journal_bytes: 0,
        });
        assert_eq!(
            peer_release(&s, &release("os", "2.0", 1, 2)),
            PeerRelease::Adopt
        );
        assert!(!peer_busy(&s, &[2; 32]));
        assert_eq!(
            peer_release(&s, &release("os", "3.0", 1, 3)),
            PeerRelease::Busy
        );
        assert!(peer_busy(&s, &[3; 32]));
        s.deployment.as_mut().unwrap().phase = Phase::TrialArmed;
        assert_eq!(
            peer_release(&s, &release("os", "2.0", 1, 2)),
            PeerRelease::Busy
        );
        assert!(peer_busy(&s, &[2; 32]));
        s.deployment = None;
        assert!(!peer_busy(&s, &[3; 32]));
    }
}
