//! The deployment's signed manifest from the LAN first (issue 13): when the server
//! names a deployment's release (its id is the BLAKE3 of the manifest CBOR), a
//! peer that runs or installs that release hands its envelope over the LAN, and
//! only one device of the site (the HRW owner of the manifest id, decided by the
//! engine's [`ManifestPlan`]) fetches it over the WAN while the others wait a
//! bounded time ([`WAIT`]) for it to say it has it; then they ask the server too.
//!
//! A peer's envelope is checked exactly as the server's: its signatures against the
//! trust root over the whole manifest, and it must be the manifest the server named
//! (same BLAKE3). A peer that sends anything else is blocked on the LAN; a peer
//! that does not answer is not asked again for this deployment.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p_identity::PeerId;
use shoal_engine::{ManifestPlan, ManifestStep, ServerWhy, VerifiedRelease};
use tracing::{debug, info, warn};

use super::Daemon;
use super::api::{ApiError, Manifest, NextDeployment};
use crate::lan::proto::ManifestId;
use shoal_artifact::manifest_delta::ManifestDelta;

/// How long a device waits for a LAN peer to get the manifest before it asks the
/// server itself.
pub(super) const WAIT: Duration = Duration::from_secs(10);
/// How often the peers' states are looked at while waiting.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// The manifest id the server named for a deployment, if it named a valid one.
fn named_id(dep: &NextDeployment) -> Option<ManifestId> {
    let text = dep.release.id.as_deref()?;
    let bytes: [u8; 32] = hex::decode(text).ok()?.try_into().ok()?;
    Some(ManifestId(bytes))
}

/// A deployment's signed manifest as it came.
pub(super) enum Got {
    /// Verified already, for the install (a LAN peer's envelope, or the server's
    /// delta rebuilt: checked when it came, to know whether to use it).
    Verified(Arc<VerifiedRelease>),
    /// The server's envelope, not verified yet.
    Envelope(Vec<u8>),
}

impl Daemon {
    /// The signed manifest of `dep`'s release: from a LAN peer when one has it
    /// (or gets it within [`WAIT`]), else from the server. Each envelope is
    /// verified once, where it is first checked ([`Daemon::verify_release`]),
    /// and the release handed on from there.
    pub(super) fn deployment_manifest(&self, dep: &NextDeployment) -> Result<Got, ApiError> {
        if let (Some(lan), Some(id)) = (&self.lan, named_id(dep))
            && let Some(release) = self.manifest_from_lan(lan, id)
        {
            return Ok(Got::Verified(release));
        }
        self.server_manifest(dep)
    }

    /// The signed manifest envelope of `dep`'s release from the server: asked as a
    /// delta against the manifests this device keeps (when `[server] delta`), rebuilt
    /// with the install path's code and verified whole (signatures and threshold,
    /// and the release the server named) before it is used; a delta that fails any
    /// of that is logged and the whole envelope asked for, once.
    fn server_manifest(&self, dep: &NextDeployment) -> Result<Got, ApiError> {
        let held = if self.server.delta {
            self.held_manifests()
        } else {
            Vec::new()
        };
        if !held.is_empty() {
            match self.api.manifest(&dep.id, &held)? {
                Manifest::Envelope(envelope) => {
                    info!(deployment = %dep.id, bytes = envelope.len(), held = held.len(), "the release's manifest came from the server");
                    return Ok(Got::Envelope(envelope));
                }
                Manifest::Delta(bytes) => match self.rebuild_manifest(dep, &bytes, &held) {
                    Ok((release, manifest_bytes, base)) => {
                        info!(deployment = %dep.id, bytes = bytes.len(), manifest_bytes, held = held.len(), base = %hex::encode(base), "the release's manifest came from the server as a delta");
                        return Ok(Got::Verified(release));
                    }
                    Err(e) => {
                        warn!(deployment = %dep.id, bytes = bytes.len(), error = %crate::cmd::one_line(&e), "the server's manifest delta was refused; asking for the whole manifest");
                    }
                },
            }
        }
        match self.api.manifest(&dep.id, &[])? {
            Manifest::Envelope(envelope) => {
                info!(deployment = %dep.id, bytes = envelope.len(), held = 0, "the release's manifest came from the server");
                Ok(Got::Envelope(envelope))
            }
            Manifest::Delta(_) => Err(ApiError::Malformed(
                "the server sent a manifest delta though none was asked for".into(),
            )),
        }
    }

    /// The manifests this device keeps and may name to the server: its running
    /// release's, then the other slot's (a file that is there but does not hash to
    /// its name makes the delta fail its base check, and the envelope follows).
    fn held_manifests(&self) -> Vec<[u8; 32]> {
        let status = match crate::device::read_status(&self.config) {
            Ok((status, _)) => status,
            Err(e) => {
                warn!(error = %crate::cmd::one_line(&e), "cannot read the device's status; asking for the whole manifest");
                return Vec::new();
            }
        };
        let active = status.active;
        let mut held: Vec<[u8; 32]> = Vec::new();
        for slot in [active, active.other()] {
            if let Some(r) = &status.releases[shoal_engine::slot_ordinal(slot)]
                && !held.contains(&r.manifest_hash)
                && crate::device::KeptManifests::holds(
                    &self.config.device.data_dir,
                    &r.manifest_hash,
                )
            {
                held.push(r.manifest_hash);
            }
        }
        held
    }

    /// The release a manifest delta from the server stands for, rebuilt against
    /// the kept manifest it names (one of `held`) and verified against the trust
    /// root (once, for the install); it must be the release the server named.
    /// Also gives the envelope's size and the base's hash.
    fn rebuild_manifest(
        &self,
        dep: &NextDeployment,
        bytes: &[u8],
        held: &[[u8; 32]],
    ) -> anyhow::Result<(Arc<VerifiedRelease>, usize, [u8; 32])> {
        let kept = crate::device::KeptManifests::new(&self.config.device.data_dir);
        let (envelope, base) = ManifestDelta::open(bytes, &kept)?;
        if !held.contains(&base) {
            anyhow::bail!(
                "it is against manifest {}, which this device did not name",
                hex::encode(base)
            );
        }
        let envelope = envelope.to_bytes();
        let len = envelope.len();
        let release = self
            .verify_release(envelope)?
            .map_err(|e| e.context("the rebuilt manifest does not verify"))?;
        let hash = release.release().manifest_hash;
        if let Some(id) = named_id(dep)
            && hash != id.0
        {
            self.forget_release(&release);
            anyhow::bail!(
                "it rebuilds manifest {}, not the deployment's release {id}",
                hex::encode(hash)
            );
        }
        Ok((release, len, base))
    }

    /// The release `id` from a peer's envelope (verified, for the install), or
    /// `None` when this device is to fetch it from the server (it is the owner,
    /// or none came within the wait).
    fn manifest_from_lan(
        &self,
        lan: &crate::lan::Lan,
        id: ManifestId,
    ) -> Option<Arc<VerifiedRelease>> {
        let start = Instant::now();
        let now = || shoal_engine::Instant::from_millis(start.elapsed().as_millis() as u64);
        let me = crate::lan::node_key(&lan.peer_id());
        let plan = ManifestPlan::new(me, id.0, now(), WAIT);
        let timeout = Duration::from_secs(self.config.lan.request_timeout_s);
        let mut skipped: HashSet<PeerId> = HashSet::new();
        loop {
            let peers = lan.peers().snapshot();
            let mut holders = Vec::new();
            let mut others = Vec::new();
            for (peer, state) in &peers {
                if skipped.contains(peer) {
                    continue;
                }
                let holds = state.running == Some(id)
                    || state.installing.as_ref().is_some_and(|i| i.manifest == id);
                let key = crate::lan::node_key(peer);
                if holds {
                    holders.push((key, *peer));
                } else {
                    others.push(key);
                }
            }
            let keys: Vec<_> = holders.iter().map(|(k, _)| *k).collect();
            match plan.step(now(), &keys, &others) {
                ManifestStep::Peer(key) => {
                    let (_, peer) = *holders.iter().find(|(k, _)| *k == key)?;
                    skipped.insert(peer);
                    match lan.manifest(peer, id, timeout) {
                        Ok(envelope) => {
                            let bytes = envelope.len();
                            match self.verify_release(envelope) {
                                Ok(Ok(r)) if r.release().manifest_hash == id.0 => {
                                    info!(%peer, release = %id, bytes, "the release's manifest came from a LAN peer");
                                    return Some(r);
                                }
                                Ok(Ok(r)) => {
                                    let m = r.manifest();
                                    warn!(%peer, release = %id, sent = %format!("{}@{}", m.name, m.version), "a LAN peer sent the manifest of another release");
                                    self.forget_release(&r);
                                    lan.block_because(
                                        peer,
                                        "it sent a manifest that is not the one asked for",
                                    );
                                }
                                Ok(Err(e)) if super::refusal(&e).is_some() => {
                                    warn!(%peer, release = %id, error = %crate::cmd::one_line(&e), "a LAN peer's manifest was refused");
                                    lan.block_because(
                                        peer,
                                        "it sent a manifest that does not verify",
                                    );
                                }
                                // The device's trouble, not the peer's: the
                                // server's manifest is checked the same way.
                                Ok(Err(e)) | Err(e) => {
                                    warn!(%peer, release = %id, error = %crate::cmd::one_line(&e), "cannot check a LAN peer's manifest; asking the server");
                                    return None;
                                }
                            }
                        }
                        Err(why) => {
                            debug!(%peer, release = %id, why, "no manifest from a LAN peer")
                        }
                    }
                }
                ManifestStep::Server => {
                    match plan.server_why(now(), &others) {
                        Some(ServerWhy::Owner) => {
                            info!(release = %id, peers = peers.len(), "this device fetches the release's manifest for its LAN")
                        }
                        _ => {
                            info!(release = %id, waited_ms = start.elapsed().as_millis() as u64, "no LAN peer had the release's manifest in time")
                        }
                    }
                    return None;
                }
                ManifestStep::Wait(_) => {
                    std::thread::sleep(LOOK_EVERY);
                }
            }
        }
    }
}
