//! Server-issued fleet credentials: when the server accepts a device it hands it a
//! membership credential (its key, the fleet, an expiry) signed by the server's
//! fleet key, one the trust root's `fleet` role names (`shoal server --fleet-key`).
//! The daemon fetches it once accepted, keeps it in `data_dir` (shown to peers
//! after a restart, even with no server), and renews it at half its life. With
//! it come the keys of decommissioned devices whose credentials have not expired
//! yet: the LAN layer refuses them at once.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::{info, warn};

use super::Daemon;

/// The soonest a credential is fetched again after a failure or a short life.
const RENEW_MIN: Duration = Duration::from_secs(5);

impl Daemon {
    /// Fetches a fresh credential when the last one is at half its life (or none
    /// was fetched by this process yet). Trouble is logged, never fatal: the LAN
    /// keeps the credential it has.
    pub(super) fn renew_credential(&mut self) {
        let Some(lan) = self.lan.clone() else { return };
        if self.credential_next.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.credential_next = Some(Instant::now() + RENEW_MIN);
        let issued = match self.api.credential() {
            Ok(Some(c)) => c,
            Ok(None) => {
                // This server issues none; ask again much later.
                self.credential_next = Some(Instant::now() + Duration::from_secs(3600));
                return;
            }
            Err(e) => {
                warn!(error = %e, "cannot fetch a fleet credential");
                return;
            }
        };
        let result = (|| -> anyhow::Result<(Vec<u8>, HashSet<[u8; 32]>)> {
            let credential =
                hex::decode(&issued.credential).context("the credential is not hex")?;
            let revoked = issued
                .revoked
                .iter()
                .map(|h| {
                    let mut k = [0u8; 32];
                    hex::decode_to_slice(h, &mut k).map(|()| k)
                })
                .collect::<Result<_, _>>()
                .context("a revoked key is not 64 hex digits")?;
            Ok((credential, revoked))
        })();
        let (credential, revoked) = match result {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "the server's fleet credential is malformed");
                return;
            }
        };
        if let Err(e) = self.save_credential(&credential) {
            warn!(error = %format!("{e:#}"), "cannot keep the fleet credential");
        }
        let now = crate::device::wall_clock().unwrap_or(0);
        let half = issued.expires_unix_s.saturating_sub(now) / 2;
        self.credential_next = Some(Instant::now() + Duration::from_secs(half).max(RENEW_MIN));
        info!(fleet = %issued.fleet, expires = issued.expires_unix_s, revoked = revoked.len(), renew_in_s = half, "fleet credential from the server");
        lan.renew_credential(credential, revoked);
    }

    fn save_credential(&self, credential: &[u8]) -> anyhow::Result<()> {
        let dir = &self.config.device.data_dir;
        let path = dir.join(crate::lan::CREDENTIAL_FILE);
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, credential)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
}
