//! Choosing a release among several verified ones: a chunk store (a USB stick, a
//! directory) may hold the manifests of several releases, and which one a device
//! installs is a decision the simulator makes the same way, so it is the engine's.
//! Reading and verifying the manifests is the driver's.

use shoal_artifact::Manifest;

use super::Engine;

/// Why no release was picked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    /// Nothing was asked for by name and no release lists this device type.
    #[error("no compatible release (this device is {device_type:?})")]
    NoneCompatible {
        /// This device's type.
        device_type: String,
    },
    /// No release has the name (and version) asked for.
    #[error("no matching release ({want})")]
    NoneMatching {
        /// What was asked for: `NAME` or `NAME@VERSION`.
        want: String,
    },
    /// Several different releases qualify and share the highest security counter.
    #[error("several releases ({}); pick one with --release NAME@VERSION", .candidates.join(", "))]
    Ambiguous {
        /// The tied releases, `NAME@VERSION`.
        candidates: Vec<String>,
    },
}

/// A release to pick from, as much of it as the choice needs: its name, version,
/// device types and security counter, and the hash of its signed manifest (the
/// release's id, which tells two releases with the same fields apart). A driver
/// that read a stored manifest's fields without its chunk lists (a chunk store's
/// `ChunkStore::release_head`) gives these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// The release's name.
    pub name: &'a str,
    /// The release's version.
    pub version: &'a str,
    /// The device types it may be installed on.
    pub device_types: &'a [String],
    /// Its anti-rollback counter.
    pub security_counter: u64,
    /// BLAKE3 of its signed manifest.
    pub hash: [u8; 32],
}

impl<'a> Candidate<'a> {
    /// The candidate of a whole manifest whose signed bytes hash to `hash`.
    pub fn of(m: &'a Manifest, hash: [u8; 32]) -> Candidate<'a> {
        Candidate {
            name: &m.name,
            version: &m.version,
            device_types: &m.device_types,
            security_counter: m.security_counter,
            hash,
        }
    }
}

impl Engine {
    /// Picks the release to install among `manifests` (verified by the driver):
    /// with `want` (`NAME` or `NAME@VERSION`) the one of that name and version,
    /// whatever its device types (an offer of a release for another device type is
    /// refused with [`OfferError::DeviceType`](crate::OfferError::DeviceType),
    /// which says more than "not found"); without it, among the releases for this
    /// device type. Of several, the one with the highest security counter; a tie
    /// between different releases is [`PickError::Ambiguous`]. Returns its index.
    pub fn pick_release(
        &self,
        manifests: &[&Manifest],
        want: Option<&str>,
    ) -> Result<usize, PickError> {
        let releases: Vec<Candidate<'_>> = manifests
            .iter()
            .map(|&m| Candidate::of(m, m.hash()))
            .collect();
        self.pick_candidate(&releases, want)
    }

    /// [`Engine::pick_release`] among releases given by the fields the choice
    /// reads and the hash of their signed bytes (the release's id), which tells
    /// two releases apart: a driver that read each manifest's fields without its
    /// chunk lists (a chunk store's `ChunkStore::release_head`) holds no more.
    pub fn pick_candidate(
        &self,
        releases: &[Candidate<'_>],
        want: Option<&str>,
    ) -> Result<usize, PickError> {
        let manifests = releases;
        let (name, version) = match want {
            Some(w) => match w.split_once('@') {
                Some((n, v)) => (Some(n), Some(v)),
                None => (Some(w), None),
            },
            None => (None, None),
        };
        let device_type = &self.config.device_type;
        let mut found: Vec<usize> = (0..manifests.len())
            .filter(|&i| {
                let m = manifests[i];
                name.is_none_or(|n| m.name == n)
                    && version.is_none_or(|v| m.version == v)
                    && (want.is_some() || m.device_types.contains(device_type))
            })
            .collect();
        // Highest counter first; among equals, the first given stays first.
        found.sort_by_key(|&i| std::cmp::Reverse(manifests[i].security_counter));
        let Some(&best) = found.first() else {
            return Err(match want {
                Some(w) => PickError::NoneMatching {
                    want: w.to_string(),
                },
                None => PickError::NoneCompatible {
                    device_type: device_type.clone(),
                },
            });
        };
        let top = manifests[best].security_counter;
        let mut tied: Vec<String> = found
            .iter()
            .filter(|&&i| manifests[i].security_counter == top)
            .map(|&i| format!("{}@{}", manifests[i].name, manifests[i].version))
            .collect();
        // The same release twice (two copies of one manifest) is no choice.
        let distinct = found
            .iter()
            .filter(|&&i| manifests[i].security_counter == top)
            .any(|&i| releases[i].hash != releases[best].hash);
        if distinct {
            tied.sort();
            tied.dedup();
            return Err(PickError::Ambiguous { candidates: tied });
        }
        Ok(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use crate::state::{DeviceState, Slot};
    use crate::testing::{bytes, keys, release};

    const DEVICE: &str = "acme-board";

    fn engine() -> Engine {
        let (_, root) = keys(1);
        Engine::new(
            Config::new(DEVICE, root),
            DeviceState::fresh(Slot::A, [1 << 20, 1 << 20]),
        )
    }

    fn manifest(name: &str, version: &str, counter: u64, device: &str) -> Manifest {
        release(name, version, counter, device, &bytes(counter, 8192)).0
    }

    #[test]
    fn the_compatible_release_with_the_highest_counter_is_picked() {
        let e = engine();
        let old = manifest("acme-os", "1.0", 1, DEVICE);
        let new = manifest("acme-os", "2.0", 2, DEVICE);
        let other = manifest("acme-os", "9.0", 9, "other-board");
        assert_eq!(e.pick_release(&[&old, &new, &other], None), Ok(1));
        assert_eq!(e.pick_release(&[&new, &old], None), Ok(0));
        // The only compatible one, whatever else the store holds.
        assert_eq!(e.pick_release(&[&other, &old], None), Ok(1));
    }

    #[test]
    fn a_release_asked_for_by_name_or_version_is_picked_whatever_its_device_type() {
        let e = engine();
        let old = manifest("acme-os", "1.0", 1, DEVICE);
        let new = manifest("acme-os", "2.0", 2, DEVICE);
        let other = manifest("other-os", "9.0", 9, "other-board");
        assert_eq!(e.pick_release(&[&old, &new], Some("acme-os@1.0")), Ok(0));
        assert_eq!(e.pick_release(&[&old, &new], Some("acme-os")), Ok(1));
        // Picked, so that the offer says why it does not fit this device.
        assert_eq!(e.pick_release(&[&old, &other], Some("other-os")), Ok(1));
    }

    #[test]
    fn nothing_to_pick_says_what_was_looked_for() {
        let e = engine();
        let other = manifest("acme-os", "1.0", 1, "other-board");
        assert_eq!(
            e.pick_release(&[&other], None),
            Err(PickError::NoneCompatible {
                device_type: DEVICE.to_string()
            })
        );
        assert_eq!(
            e.pick_release(&[], None),
            Err(PickError::NoneCompatible {
                device_type: DEVICE.to_string()
            })
        );
        assert_eq!(
            e.pick_release(&[&other], Some("acme-os@2.0")),
            Err(PickError::NoneMatching {
                want: "acme-os@2.0".to_string()
            })
        );
    }

    #[test]
    fn different_releases_tied_on_the_highest_counter_are_not_guessed() {
        let e = engine();
        let low = manifest("acme-os", "1.0", 1, DEVICE);
        let a = manifest("acme-os", "2.0", 2, DEVICE);
        let b = manifest("acme-os", "2.0-hotfix", 2, DEVICE);
        assert_eq!(
            e.pick_release(&[&low, &b, &a], None),
            Err(PickError::Ambiguous {
                candidates: vec!["acme-os@2.0".to_string(), "acme-os@2.0-hotfix".to_string()]
            })
        );
        let msg = e.pick_release(&[&a, &b], None).unwrap_err().to_string();
        assert_eq!(
            msg,
            "several releases (acme-os@2.0, acme-os@2.0-hotfix); pick one with --release NAME@VERSION"
        );
        // Two copies of one manifest are one release.
        let copy = a.clone();
        assert_eq!(e.pick_release(&[&low, &a, &copy], None), Ok(1));
    }

    /// Releases read without their chunk lists are told apart by the hash of
    /// their signed bytes, not by their fields: the same fields with other
    /// chunks are another release.
    #[test]
    fn releases_given_with_their_hashes_are_told_apart_by_them() {
        let e = engine();
        let low = manifest("acme-os", "1.0", 1, DEVICE);
        let a = manifest("acme-os", "2.0", 2, DEVICE);
        let c = Candidate::of;
        let picked = e.pick_candidate(&[c(&low, [1; 32]), c(&a, [2; 32]), c(&a, [2; 32])], None);
        assert_eq!(picked, Ok(1));
        assert_eq!(
            e.pick_candidate(&[c(&low, [1; 32]), c(&a, [2; 32]), c(&a, [3; 32])], None),
            Err(PickError::Ambiguous {
                candidates: vec!["acme-os@2.0".to_string()]
            })
        );
    }
}
