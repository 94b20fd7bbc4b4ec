//! Offline propagation (`[lan] accept_releases`): a release that reached one device
//! of a site (from the server, or a USB stick through `shoal install`) spreads to
//! the others over the LAN, with no server.
//!
//! When the server cannot be reached, the daemon looks at what its LAN peers run
//! (a server that answers is the authority: with no deployment for this device,
//! its phase of a rollout has not opened, and a peer's release is left alone). For a release it does not run, it asks the peer
//! for the signed manifest envelope, verifies it against the trust root and checks
//! it is the release the peer named; the engine's [`shoal_engine::peer_release`]
//! decides whether it is an update for this device (newer, same name, not rolled
//! back). The install then goes through the engine's ordinary offer (trust root,
//! device type, depends, slot size, anti-rollback: the same checks as a server's
//! deployment) with the LAN peers as the only chunk sources. Its status reports go
//! to the offline report queue (origin `lan`, no deployment) and reach the server
//! once one is reachable.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::anyhow;
use libp2p_identity::PeerId;
use shoal_artifact::ChunkId;
use shoal_engine::{FetchFailure, PeerRelease, RequestId, SourceClass, SourceLimits};
use tracing::{debug, info, warn};

use super::{Daemon, Handled};
use crate::cmd::{EXIT_TEMPFAIL, exit_code};
use crate::device::{Answer, Device, Reboot, Requests, Source};
use crate::lan::proto::ManifestId;

/// How long a peer may take to send a manifest envelope.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the daemon remembers of the peers' releases between rounds.
#[derive(Debug, Default)]
pub(super) struct Offers {
    /// The running release these decisions were made against.
    running: Option<[u8; 32]>,
    /// Releases decided against (not an update, or their install failed).
    decided: HashSet<ManifestId>,
    /// Peers whose envelope for a release did not verify or was another release.
    refused: HashSet<(PeerId, ManifestId)>,
}

/// The engine's WAN source during an install from peers: there is no server, so
/// every request to it fails at once and the engine drops it; the LAN peers
/// ([`crate::lan::requests::LanRequests`]) carry the install.
#[derive(Debug, Default)]
struct NoServer {
    failed: Vec<RequestId>,
}

impl Requests for NoServer {
    fn send(&mut self, request: RequestId, _ids: Vec<ChunkId>) {
        self.failed.push(request);
    }

    fn cancel(&mut self, _request: RequestId) {}

    fn wait(&mut self, timeout: Duration) -> Vec<Answer> {
        if self.failed.is_empty() {
            std::thread::sleep(timeout);
            return Vec::new();
        }
        self.failed
            .drain(..)
            .map(|request| Answer::Failed {
                request,
                failure: FetchFailure::DropSource,
            })
            .collect()
    }

    fn bytes_read(&self) -> u64 {
        0
    }
}

impl Daemon {
    /// Offline propagation: installs a release a LAN peer runs when it is an
    /// update for this device. `None` when there is none (or `accept_releases` is
    /// off).
    pub(super) fn lan_round(&mut self) -> anyhow::Result<Option<Handled>> {
        if !self.config.lan.accept_releases {
            return Ok(None);
        }
        let Some(lan) = self.lan.clone() else {
            return Ok(None);
        };
        let (status, _) = crate::device::read_status(&self.config)?;
        let running = status.releases[shoal_engine::slot_ordinal(status.active)]
            .as_ref()
            .map(|r| r.manifest_hash);
        if self.offers.running != running {
            self.offers = super::offline::Offers {
                running,
                ..Default::default()
            };
        }
        let mut offers: Vec<(PeerId, ManifestId)> = lan
            .peers()
            .snapshot()
            .into_iter()
            .filter_map(|(p, s)| s.running.map(|m| (p, m)))
            .filter(|(p, m)| {
                Some(m.0) != running
                    && !self.offers.decided.contains(m)
                    && !self.offers.refused.contains(&(*p, *m))
            })
            .collect();
        offers.sort_by_key(|(p, m)| (m.0, p.to_bytes()));
        for (peer, id) in offers {
            if self.offers.decided.contains(&id) {
                continue;
            }
            // Known from the hash: nothing fetched, verified or stored for an offer
            // the device would only give back (every round, until the deployment
            // in progress ends).
            if shoal_engine::peer_busy(&status, &id.0) {
                debug!(release = %id, "another deployment is in progress");
                return Ok(None);
            }
            let envelope = match lan.manifest(peer, id, MANIFEST_TIMEOUT) {
                Ok(e) => e,
                Err(why) => {
                    debug!(%peer, release = %id, why, "no manifest from a LAN peer");
                    continue;
                }
            };
            // Verified once, for the install too (the stored envelope is given
            // back when it is not installed).
            let release = match self.verify_release(envelope)? {
                Ok(r) if r.release().manifest_hash == id.0 => r,
                Ok(r) => {
                    let m = r.manifest();
                    warn!(%peer, release = %id, sent = %format!("{}@{}", m.name, m.version), "a LAN peer sent the manifest of another release");
                    self.forget_release(&r);
                    self.offers.refused.insert((peer, id));
                    continue;
                }
                Err(e) => {
                    match offer_fault(&e) {
                        // Signed, but not a root filesystem release: not for this
                        // device.
                        OfferFault::NotForThisDevice => {
                            self.offers.decided.insert(id);
                        }
                        OfferFault::Peer => {
                            warn!(%peer, release = %id, error = %crate::cmd::one_line(&e), "a LAN peer's release manifest was refused");
                            self.offers.refused.insert((peer, id));
                        }
                        // Not held against the peer: tried again next round.
                        OfferFault::Device => {
                            warn!(%peer, release = %id, error = %crate::cmd::one_line(&e), "cannot check a LAN peer's release manifest");
                        }
                    }
                    continue;
                }
            };
            let offered = release.release().clone();
            match shoal_engine::peer_release(&status, &offered) {
                PeerRelease::Adopt => return self.lan_install(peer, release).map(Some),
                PeerRelease::Busy => {
                    debug!(release = %offered, "another deployment is in progress");
                    self.forget_release(&release);
                    return Ok(None);
                }
                other => {
                    info!(%peer, release = %offered, why = ?other, "not installing a LAN peer's release");
                    self.forget_release(&release);
                    self.offers.decided.insert(id);
                }
            }
        }
        Ok(None)
    }

    /// Installs `release` (verified) from the LAN peers, then reboots into it.
    fn lan_install(
        &mut self,
        peer: PeerId,
        release: std::sync::Arc<shoal_engine::VerifiedRelease>,
    ) -> anyhow::Result<Handled> {
        let lan = self
            .lan
            .clone()
            .ok_or_else(|| anyhow!("the LAN is not joined"))?;
        let id = ManifestId(release.release().manifest_hash);
        let verified = release;
        let release = shoal_fleet::report::Release {
            name: verified.manifest().name.clone(),
            version: verified.manifest().version.clone(),
        };
        info!(%peer, release = %format!("{}@{}", release.name, release.version), "installing a release a LAN peer runs");
        self.lan_report(
            &release,
            shoal_fleet::Status::Downloading,
            Some(format!("from LAN peer {peer}")),
        );
        let (status, _) = crate::device::read_status(&self.config)?;
        let served = self.served_installing(&verified, status.active.other())?;
        let requests = crate::lan::requests::LanRequests::start(
            lan.clone(),
            Box::new(NoServer::default()),
            served,
        );
        let peer_bytes = requests.peer_bytes();
        let source = Source::Remote {
            name: "LAN peers".into(),
            release: verified,
            limits: SourceLimits::for_class(SourceClass::Wan),
            requests: Box::new(requests),
        };
        let result = Device::open(self.config.clone(), Reboot::Command)
            .and_then(|mut dev| dev.install(source, false, &mut |_| {}));
        match result {
            Ok(report) => {
                lan.have_all();
                info!(
                    release = %id,
                    resumed = report.resumed_bytes,
                    fetched = report.fetched_bytes,
                    installed_from_peers = report.peer_bytes,
                    reused = report.reused_bytes,
                    from_peers = peer_bytes.load(std::sync::atomic::Ordering::Relaxed),
                    "installed from LAN peers; trial armed"
                );
                self.lan_report(&release, shoal_fleet::Status::Installing, None);
                self.lan_report(&release, shoal_fleet::Status::Rebooting, None);
                self.reboot()?;
                Ok(Handled::Rebooting)
            }
            Err(e) if exit_code(&e) == EXIT_TEMPFAIL => {
                warn!(release = %id, error = %crate::cmd::one_line(&e), "install from LAN peers interrupted; it resumes on the next try");
                Ok(Handled::Retry)
            }
            Err(e) => {
                let message = crate::cmd::one_line(&e);
                warn!(release = %id, %message, "install from LAN peers failed");
                self.offers.decided.insert(id);
                self.lan_report(&release, shoal_fleet::Status::Failure, Some(message));
                Ok(Handled::Done)
            }
        }
    }

    /// Queues a status report of an install from peers (delivered when the
    /// server is reachable).
    fn lan_report(
        &self,
        release: &shoal_fleet::report::Release,
        status: shoal_fleet::Status,
        substate: Option<String>,
    ) {
        crate::reports::record(
            &self.config,
            crate::reports::Draft {
                origin: shoal_fleet::report::Origin::Lan,
                deployment: None,
                release: Some(release.clone()),
                status,
                substate: substate.map(|mut s| {
                    let mut end = s.len().min(shoal_fleet::report::SUBSTATE_MAX);
                    while !s.is_char_boundary(end) {
                        end -= 1;
                    }
                    s.truncate(end);
                    s
                }),
            },
        );
    }
}

/// Whose fault it is that a peer's release did not verify on this device.
#[derive(Debug, PartialEq, Eq)]
enum OfferFault {
    /// A signed release, but not a root filesystem one: not for this device, from
    /// any peer.
    NotForThisDevice,
    /// The release does not verify (the peer's: it is not asked again).
    Peer,
    /// The device's own trouble while verifying it (its store, the ids file, a
    /// full disk): not held against the peer.
    Device,
}

fn offer_fault(e: &anyhow::Error) -> OfferFault {
    if matches!(
        e.downcast_ref::<shoal_engine::OfferError>(),
        Some(shoal_engine::OfferError::Payloads { .. })
    ) {
        OfferFault::NotForThisDevice
    } else if super::refusal(e).is_some() {
        OfferFault::Peer
    } else {
        OfferFault::Device
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_engine::OfferError;

    /// Only the release's faults are held against the peer that sent it; the
    /// device store's trouble while verifying it is not.
    #[test]
    fn only_the_release_s_faults_count_against_the_peer() {
        let bad = anyhow!(OfferError::Signature(
            shoal_signing::VerifyError::MissingRole(shoal_signing::RoleName::Release)
        ))
        .context("the release was refused");
        assert_eq!(offer_fault(&bad), OfferFault::Peer);
        let other = anyhow!(OfferError::Payloads {
            rootfs: 0,
            other: 1
        });
        assert_eq!(offer_fault(&other), OfferFault::NotForThisDevice);
        for mine in [
            OfferError::ChunkIds("cannot write x.ids: No space left on device".into()),
            OfferError::StoredEnvelope("cannot read the stored envelope: EIO".into()),
        ] {
            let e = anyhow!(mine).context("cannot keep the release's chunk ids");
            assert_eq!(offer_fault(&e), OfferFault::Device, "{e:#}");
        }
        let enospc = anyhow!(std::io::Error::from_raw_os_error(28))
            .context("cannot store the release's manifest");
        assert_eq!(offer_fault(&enospc), OfferFault::Device);
    }
}
