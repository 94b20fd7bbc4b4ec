//! `shoal daemon`: managed mode on the device.
//!
//! The daemon authenticates with the device key (generated on first start in
//! `data_dir`), polls the server for a deployment (with jitter; exponential,
//! bounded backoff after failures and while the device is pending), verifies the
//! deployment's signed manifest against the device's trust root, and installs it
//! through the engine with the server as a request source ([`fetch`]): only the
//! chunks the device lacks, in the engine's batches, several requests in flight.
//! It reports Mender's states (downloading, installing, rebooting, success,
//! failure, already-installed), stops when the server answers 409, reboots with
//! `device.reboot_command`, and after the reboot settles the trial boot through the
//! same [`Device::boot_check`] as standalone installs, then reports the outcome.
//!
//! What a deployment has reached is kept in `data_dir/daemon-deployment.json`
//! (written atomically), so a restart or a power cut picks it up where it was;
//! the install itself resumes from the engine's journal without fetching
//! verified chunks again.

pub mod api;
mod credential;
pub mod deliver;
pub mod fetch;
pub mod inventory;
mod lan_dictionary;
mod lan_manifest;
mod lan_peers;
pub mod month;
mod offline;

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use serde::{Deserialize, Serialize};
use shoal_engine::{Phase, SourceClass, SourceLimits, Verdict};
use shoal_signing::{SecretKey, SignedRoot};
use tracing::{info, warn};

use crate::cmd::{EXIT_TEMPFAIL, Exit, chain, exit_code};
use crate::config::{Config, Server};
use crate::device::{BootCheck, Device, Reboot, Source, wall_clock};
use api::{Api, ApiError, NextDeployment};

/// The device key's file in `data_dir`.
pub const KEY_FILE: &str = "device-key.pem";
/// The deployment in flight, in `data_dir`.
const RECORD_FILE: &str = "daemon-deployment.json";
/// The first wait after a failure (doubled each time, up to `retry_max_s`).
const BACKOFF_FIRST: Duration = Duration::from_secs(1);

/// Loads the device key from `data_dir`, or makes one (mode 0600) on first start.
pub fn device_key(data_dir: &Path) -> anyhow::Result<SecretKey> {
    let path = data_dir.join(KEY_FILE);
    match SecretKey::load(&path) {
        Ok(k) => return Ok(k),
        Err(shoal_signing::KeyError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(anyhow!(
                "the device key {} cannot be read: {}",
                path.display(),
                chain(&e)
            ));
        }
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let key = SecretKey::generate().map_err(|e| anyhow!("cannot make a device key: {e}"))?;
    // Written whole under another name, then renamed: a power cut leaves either
    // no key or the whole key.
    let tmp = data_dir.join(format!("{KEY_FILE}.new"));
    let _ = std::fs::remove_file(&tmp);
    key.save(&tmp)
        .map_err(|e| anyhow!("cannot write the device key: {}", chain(&e)))?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("cannot write the device key {}", path.display()))?;
    sync_dir(data_dir)?;
    info!(path = %path.display(), id = %hex::encode(key.public().id().0), "made the device key");
    Ok(key)
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

/// How far the daemon got with a deployment; survives restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// The deployment's id.
    deployment: String,
    /// Release name.
    name: String,
    /// Release version.
    version: String,
    /// The last state the daemon reached (`downloading` or `rebooting`).
    state: String,
}

fn record_path(config: &Config) -> PathBuf {
    config.device.data_dir.join(RECORD_FILE)
}

fn load_record(config: &Config) -> anyhow::Result<Option<Record>> {
    let path = record_path(config);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is corrupt", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!(e).context(format!("cannot read {}", path.display()))),
    }
}

fn save_record(config: &Config, record: Option<&Record>) -> anyhow::Result<()> {
    let path = record_path(config);
    let dir = &config.device.data_dir;
    match record {
        None => match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow!(e).context(format!("cannot remove {}", path.display()))),
        },
        Some(r) => {
            std::fs::create_dir_all(dir)?;
            let tmp = path.with_extension("json.new");
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            f.write_all(&serde_json::to_vec(r)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            sync_dir(dir)
        }
    }
}

/// The deployment the daemon is working on, when it is for `release` (a report made
/// outside the daemon, e.g. by `boot-check` at boot, then names it).
pub(crate) fn deployment_of(
    config: &Config,
    release: Option<&shoal_fleet::report::Release>,
) -> Option<String> {
    let record = load_record(config).ok().flatten()?;
    let release = release?;
    (record.name == release.name && record.version == release.version).then_some(record.deployment)
}

/// Random numbers for jitter (the OS-seeded hasher; no simulator replays this).
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

/// `base` plus or minus up to a tenth.
fn jitter(base: Duration) -> Duration {
    let tenth = base.as_millis() as u64 / 10;
    if tenth == 0 {
        return base;
    }
    let offset = random_u64() % (2 * tenth + 1);
    Duration::from_millis(base.as_millis() as u64 - tenth + offset)
}

/// Exponential backoff, bounded.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            next: BACKOFF_FIRST.min(max),
            max,
        }
    }

    /// The next wait (jittered), doubling the one after.
    fn step(&mut self) -> Duration {
        let wait = jitter(self.next);
        self.next = (self.next * 2).min(self.max);
        wait
    }

    fn reset(&mut self) {
        self.next = BACKOFF_FIRST.min(self.max);
    }
}

/// The daemon.
#[derive(Debug)]
pub struct Daemon {
    config: Config,
    server: Server,
    api: Api,
    /// LAN peers (`[lan] enabled`).
    lan: Option<crate::lan::Lan>,
    /// The peers' releases considered for offline propagation.
    offers: offline::Offers,
    /// When the fleet credential is fetched again ([`credential`]).
    credential_next: Option<std::time::Instant>,
    /// The running slot's index, made at idle time.
    idle: IdleIndex,
}

/// Where the running slot's idle-time index is
/// ([`crate::device::idle_index`]).
#[derive(Debug, Default)]
enum IdleIndex {
    /// To be checked (at start, and after anything the daemon did).
    #[default]
    Unchecked,
    /// Being cut on a thread of its own; the daemon goes on polling.
    Cutting(std::thread::JoinHandle<anyhow::Result<crate::device::idle_index::CutIndex>>),
    /// Checked or cut since.
    Ready,
}

/// What handling a deployment came to.
#[derive(Debug, PartialEq, Eq)]
enum Handled {
    /// Done with it (reported, or the server ended it).
    Done,
    /// The device is rebooting into the trial.
    Rebooting,
    /// A temporary failure: try again after a backoff.
    Retry,
}

impl Daemon {
    /// A daemon for `config`, which must have `[server]`.
    pub fn new(config: Config) -> anyhow::Result<Daemon> {
        let server = config.server.clone().ok_or_else(|| {
            Exit::usage("the device configuration has no [server] table; shoal daemon needs one")
        })?;
        let key = device_key(&config.device.data_dir)?;
        // LAN hook: the same key is the device's peer id.
        let lan = if config.lan.enabled {
            Some(crate::lan::Lan::start(&config, &key)?)
        } else {
            None
        };
        let api = Api::new(&server, key)?;
        Ok(Daemon {
            config,
            server,
            api,
            lan,
            offers: offline::Offers::default(),
            credential_next: None,
            idle: IdleIndex::Unchecked,
        })
    }

    /// LAN hook: serves the running release to peers, when its signed manifest was
    /// kept (it was installed by this daemon) and still verifies.
    fn lan_serve_running(&self) {
        let Some(lan) = &self.lan else { return };
        let served = (|| -> anyhow::Result<Option<crate::lan::serve::Served>> {
            let (status, _) = crate::device::read_status(&self.config)?;
            let Some(release) = &status.releases[shoal_engine::slot_ordinal(status.active)] else {
                return Ok(None);
            };
            // Verified once from the kept file (never whole in memory), its chunk
            // ids on disk beside it: the table serves the peers' lookups, and the
            // envelope is read from the file it was verified from (the handle,
            // not the path) when a peer asks for it.
            let Some((verified, file)) = crate::device::KeptManifests::verify(
                &self.config.device.data_dir,
                &self.trust_root()?,
                &release.manifest_hash,
                wall_clock(),
            )?
            else {
                return Ok(None);
            };
            let envelope = crate::lan::serve::EnvelopeAt::of(&verified, Some(file))?;
            Ok(Some(crate::lan::serve::Served::new(
                verified,
                envelope,
                status.active,
            )))
        })();
        match served {
            Ok(Some(s)) => {
                info!(release = %s.manifest, "serving the running release to LAN peers");
                lan.serve_running(Some(std::sync::Arc::new(s)));
            }
            Ok(None) => {}
            Err(e) => {
                warn!(error = %crate::cmd::one_line(&e), "cannot serve the running release to LAN peers")
            }
        }
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_secs(self.server.poll_interval_s)
    }

    /// Runs until killed (or, with `once`, until the first deployment was handled
    /// or none was waiting).
    pub fn run(&mut self, once: bool) -> anyhow::Result<()> {
        info!(device = %self.api.device_id(), server = %self.server.url, "daemon started");
        self.lan_serve_running();
        let mut backoff = Backoff::new(Duration::from_secs(self.server.retry_max_s));
        let mut inventory_sent = false;
        loop {
            self.idle_index(false);
            let result = self.round(&mut inventory_sent);
            if matches!(result, Ok(Some(_))) {
                // A deployment handled or settled: the running slot's index is
                // checked again.
                self.idle_index(true);
                self.idle = IdleIndex::Unchecked;
            }
            match result {
                Ok(Some(Handled::Rebooting)) => {
                    // The reboot command was run; a real reboot ends this process.
                    std::thread::sleep(self.poll_interval());
                    if once {
                        return Ok(());
                    }
                }
                Ok(Some(Handled::Retry)) => {
                    let wait = backoff.step();
                    info!(
                        wait_ms = wait.as_millis() as u64,
                        "retrying the deployment later"
                    );
                    std::thread::sleep(wait);
                }
                Ok(handled) => {
                    backoff.reset();
                    if once {
                        return Ok(());
                    }
                    if handled.is_none() {
                        std::thread::sleep(jitter(self.poll_interval()));
                    }
                }
                Err(e) => {
                    // Configuration problems do not go away by waiting.
                    if exit_code(&e) == crate::cmd::EXIT_USAGE {
                        return Err(e);
                    }
                    let wait = backoff.step();
                    warn!(error = %crate::cmd::one_line(&e), wait_ms = wait.as_millis() as u64, "poll failed");
                    if once {
                        return Err(e);
                    }
                    std::thread::sleep(wait);
                }
            }
        }
    }

    /// The running slot's index at idle time: checked (a few recorded chunks read
    /// back), and when it is missing or no longer holds, cut on a thread of its own
    /// while the daemon goes on polling, then recorded. With `wait` (an install is
    /// about to start, and would cut the slot itself) a cut in progress is waited
    /// for (an unchecked slot is left to the install). Trouble is logged, never
    /// fatal: an install indexes the slot itself.
    fn idle_index(&mut self, wait: bool) {
        use crate::device::idle_index::Plan;
        self.idle = match std::mem::take(&mut self.idle) {
            // An install about to start cuts the slot itself, taking what it
            // reuses on the way: better than a cut first.
            IdleIndex::Unchecked if wait => IdleIndex::Unchecked,
            IdleIndex::Unchecked => {
                let plan = Device::open(self.config.clone(), Reboot::Command)
                    .and_then(|dev| dev.plan_index(None));
                match plan {
                    Ok(Plan::Valid { slot, chunks }) => {
                        info!(%slot, chunks, "the running slot's index is ready");
                        IdleIndex::Ready
                    }
                    Ok(Plan::Later) => IdleIndex::Unchecked,
                    Ok(Plan::Cut(cut)) => {
                        info!(slot = %cut.slot, len = cut.len, reason = %cut.reason, "indexing the running slot at idle time");
                        let cutting = std::thread::Builder::new()
                            .name("shoal-idle-index".into())
                            .spawn(move || cut.run());
                        match cutting {
                            Ok(handle) => IdleIndex::Cutting(handle),
                            Err(e) => {
                                warn!(error = %e, "cannot start indexing the running slot");
                                IdleIndex::Unchecked
                            }
                        }
                    }
                    Err(e) => {
                        warn!(error = %crate::cmd::one_line(&e), "cannot check the running slot's index");
                        IdleIndex::Unchecked
                    }
                }
            }
            IdleIndex::Cutting(handle) if wait || handle.is_finished() => {
                if !handle.is_finished() {
                    info!("waiting for the running slot's index");
                }
                let recorded = match handle.join() {
                    Ok(cut) => cut.and_then(|cut| {
                        Device::open(self.config.clone(), Reboot::Command)
                            .and_then(|dev| dev.record_index(cut))
                    }),
                    Err(_) => Err(anyhow!("the indexing thread panicked")),
                };
                match recorded {
                    Ok(done) => {
                        info!(slot = %done.slot, chunks = done.chunks, "the running slot's index is ready");
                        IdleIndex::Ready
                    }
                    Err(e) => {
                        warn!(error = %crate::cmd::one_line(&e), "cannot index the running slot");
                        IdleIndex::Unchecked
                    }
                }
            }
            other => other,
        };
    }

    /// One round: settle what a previous run left, then poll once; when the server
    /// cannot be reached, a release a LAN peer runs may be installed (`[lan]
    /// accept_releases`, [`offline`]). A server that answers is the authority: when
    /// it has no deployment for this device (its phase of a rollout has not opened,
    /// or the release is not meant for it), a peer's release is left alone.
    fn round(&mut self, inventory_sent: &mut bool) -> anyhow::Result<Option<Handled>> {
        if let Some(handled) = self.settle()? {
            return Ok(Some(handled));
        }
        match self.poll(inventory_sent) {
            Ok(None) => Ok(None),
            Err(e) if exit_code(&e) != crate::cmd::EXIT_USAGE => match self.lan_round()? {
                Some(handled) => Ok(Some(handled)),
                None => Err(e),
            },
            other => other,
        }
    }

    /// Sends the inventory and the queued reports, then asks for a deployment and
    /// handles it.
    fn poll(&mut self, inventory_sent: &mut bool) -> anyhow::Result<Option<Handled>> {
        if !*inventory_sent {
            let attrs = self.inventory()?;
            match self.api.inventory(&attrs) {
                Ok(()) => *inventory_sent = true,
                Err(e) => return Err(api_error(e)),
            }
        }
        self.renew_credential();
        self.lan_peers_from_server();
        // Reports queued while offline (or by standalone installs) go first, oldest
        // first; trouble delivering them does not hold up the poll.
        match deliver::flush(&self.api, &self.config.device.data_dir) {
            Ok(_) => {}
            Err(e) => warn!(error = %e, "status reports not delivered yet"),
        }
        match self.api.next().map_err(api_error)? {
            None => Ok(None),
            Some(dep) => {
                let handled = self.deploy(&dep)?;
                if handled == Handled::Done {
                    *inventory_sent = false;
                }
                Ok(Some(handled))
            }
        }
    }

    fn inventory(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let mut attrs = match &self.server.inventory_dir {
            Some(dir) => inventory::collect(dir),
            None => BTreeMap::new(),
        };
        let (status, _) = crate::device::read_status(&self.config)?;
        attrs.insert("device_type".into(), self.config.device.device_type.clone());
        attrs.insert("shoal_version".into(), env!("CARGO_PKG_VERSION").into());
        // What the server reads for delta previews and groups.
        if let Some(r) = &status.releases[shoal_engine::slot_ordinal(status.active)] {
            attrs.insert("release_name".into(), r.name.clone());
            attrs.insert("release_version".into(), r.version.clone());
        }
        Ok(attrs)
    }

    /// After a reboot (or a restart): settles a trial boot through the same
    /// `boot-check` path as standalone installs, and reports how a deployment the
    /// daemon rebooted for ended.
    fn settle(&mut self) -> anyhow::Result<Option<Handled>> {
        let record = load_record(&self.config)?;
        let (status, _) = crate::device::read_status(&self.config)?;
        let phase = status.deployment.as_ref().map(|d| d.phase.clone());
        if matches!(
            phase,
            Some(Phase::TrialArmed | Phase::Rebooting | Phase::Trial | Phase::RollingBack { .. })
        ) {
            let mut dev = Device::open(self.config.clone(), Reboot::Command)?;
            let result = dev.boot_check()?;
            drop(dev);
            info!(?result, "checked the trial boot");
            if matches!(
                result,
                BootCheck::Committed { .. } | BootCheck::RolledBack { .. }
            ) {
                // The running release changed (or is confirmed): peers learn it.
                self.lan_serve_running();
            }
            if let Some(draft) = crate::reports::settled(&self.config, &result) {
                crate::reports::record(&self.config, draft);
            }
            if let BootCheck::TrialPending { .. } = result {
                // Armed but not rebooted yet (the reboot command did not take, or
                // the daemon restarted first): reboot again.
                if record.as_ref().is_some_and(|r| r.state == "rebooting") {
                    self.reboot()?;
                }
                return Ok(Some(Handled::Rebooting));
            }
        }
        let Some(record) = record else {
            return Ok(None);
        };
        if record.state != "rebooting" && record.state != "reporting" {
            return Ok(None);
        }
        let (status, _) = crate::device::read_status(&self.config)?;
        let outcome = status
            .last
            .as_ref()
            .filter(|o| o.release.name == record.name && o.release.version == record.version);
        let (state, substate) = match outcome.map(|o| &o.verdict) {
            Some(Verdict::Committed) => ("success", None),
            Some(Verdict::RolledBack { reason }) => {
                ("failure", Some(format!("rolled back: {reason}")))
            }
            Some(Verdict::Failed { reason }) => ("failure", Some(reason.clone())),
            None => (
                "failure",
                Some("the device does not run the release after the reboot".to_owned()),
            ),
        };
        if outcome.is_none() && record.state == "rebooting" {
            // No boot-check settled this (which would have queued the report): queue
            // it here, once.
            crate::reports::record(
                &self.config,
                crate::reports::Draft {
                    origin: shoal_fleet::report::Origin::Daemon,
                    deployment: Some(record.deployment.clone()),
                    release: Some(shoal_fleet::report::Release {
                        name: record.name.clone(),
                        version: record.version.clone(),
                    }),
                    status: shoal_fleet::Status::Failure,
                    substate: substate.clone(),
                },
            );
            save_record(
                &self.config,
                Some(&Record {
                    state: "reporting".into(),
                    ..record.clone()
                }),
            )?;
        }
        match self
            .api
            .status(&record.deployment, state, substate.as_deref())
        {
            Ok(()) | Err(ApiError::Conflict(_)) => {}
            Err(e) => return Err(api_error(e)),
        }
        info!(deployment = %record.deployment, state, "reported the outcome");
        save_record(&self.config, None)?;
        Ok(Some(Handled::Done))
    }

    /// Installs a deployment and reboots into it.
    fn deploy(&mut self, dep: &NextDeployment) -> anyhow::Result<Handled> {
        info!(deployment = %dep.id, name = %dep.name, release = %format!("{}@{}", dep.release.name, dep.release.version), "deployment");
        // The install needs the running slot's index: one being cut is finished
        // first (the install would otherwise cut the slot again).
        self.idle_index(true);
        let (status, _) = crate::device::read_status(&self.config)?;
        if let Some(r) = &status.releases[shoal_engine::slot_ordinal(status.active)]
            && r.name == dep.release.name
            && r.version == dep.release.version
            && status.deployment.is_none()
        {
            self.report(dep, "already-installed", None)?;
            return Ok(Handled::Done);
        }
        save_record(
            &self.config,
            Some(&Record {
                deployment: dep.id.clone(),
                name: dep.release.name.clone(),
                version: dep.release.version.clone(),
                state: "downloading".into(),
            }),
        )?;
        if self.report(dep, "downloading", None)? {
            return Ok(Handled::Done);
        }
        // The release is verified once (from the device store's file, its chunk
        // ids on disk), and that `Arc` serves the fetcher's lookups, the LAN and
        // the install, whose offer does not verify it again.
        let checks = shoal_signing::release_checks();
        let release = match self.deployment_manifest(dep) {
            Ok(lan_manifest::Got::Verified(r)) => r,
            Ok(lan_manifest::Got::Envelope(envelope)) => match self.verify_release(envelope)? {
                Ok(r) => r,
                Err(e) => {
                    let message = match refusal(&e) {
                        Some(why) => format!("the manifest was refused: {why}"),
                        None => crate::cmd::one_line(&e),
                    };
                    warn!(deployment = %dep.id, %message);
                    self.report(dep, "failure", Some(&message))?;
                    save_record(&self.config, None)?;
                    return Ok(Handled::Done);
                }
            },
            Err(ApiError::Conflict(m)) => return self.aborted(dep, &m),
            Err(e) => return Err(api_error(e)),
        };
        let manifest = release.manifest();
        if manifest.name != dep.release.name || manifest.version != dep.release.version {
            let message = format!(
                "the manifest is {}@{}, not the deployment's release {}@{}",
                manifest.name, manifest.version, dep.release.name, dep.release.version
            );
            self.forget_release(&release);
            self.report(dep, "failure", Some(&message))?;
            save_record(&self.config, None)?;
            return Ok(Handled::Done);
        }
        let manifest_hash = release.release().manifest_hash;
        let limits = SourceLimits::for_class(SourceClass::Wan);
        // A static chunk host the server names; one that does not parse is not
        // used (the server's own batches still work).
        let static_base = dep.chunk_base_url.as_deref().and_then(|u| {
            shoal_node::chunk_url::StaticBase::parse(u)
                .inspect_err(
                    |e| warn!(deployment = %dep.id, error = %e, "ignoring the chunk base URL"),
                )
                .ok()
        });
        // LAN hook: zstd dictionaries are asked of the peers first.
        let peer_dictionaries = self.lan.as_ref().map(|lan| {
            std::sync::Arc::new(lan_dictionary::LanDictionaries::new(
                lan.clone(),
                crate::lan::proto::ManifestId(manifest_hash),
                self.config.device.data_dir.clone(),
                Duration::from_secs(self.config.lan.request_timeout_s),
            )) as std::sync::Arc<dyn fetch::PeerDictionaries>
        });
        // Per-base encodings: the server is told the release the running slot
        // holds, so it may send changed chunks delta-encoded against it.
        let delta = match &status.releases[shoal_engine::slot_ordinal(status.active)] {
            Some(r) if self.server.delta => {
                match crate::device::running_references(
                    &self.config,
                    status.active,
                    format!("{} {}", r.name, r.version),
                ) {
                    Ok(references) => Some(fetch::DeltaBase {
                        hash: r.manifest_hash,
                        release: manifest_hash,
                        references: std::sync::Mutex::new(references),
                        off: std::sync::atomic::AtomicBool::new(false),
                    }),
                    Err(e) => {
                        warn!(error = %crate::cmd::one_line(&e), "cannot read the running slot; fetching plain chunks");
                        None
                    }
                }
            }
            _ => None,
        };
        let requests = fetch::HttpRequests::start(
            self.api.clone(),
            &dep.id,
            std::sync::Arc::clone(&release) as std::sync::Arc<dyn fetch::ChunkLookup>,
            limits.requests_max,
            self.poll_interval().min(Duration::from_secs(30)),
            static_base,
            peer_dictionaries,
            manifest.dictionary,
            delta,
        );
        let watch = requests.watch();
        // LAN hook: peers that run or install this release become sources; what
        // this device writes is served to them as it is verified.
        let mut peer_bytes = None;
        let requests: Box<dyn crate::device::Requests> = match &self.lan {
            Some(lan) => {
                let served = self.served_installing(&release, status.active.other())?;
                let r = crate::lan::requests::LanRequests::start(
                    lan.clone(),
                    Box::new(requests),
                    served,
                );
                peer_bytes = Some(r.peer_bytes());
                Box::new(r)
            }
            None => Box::new(requests),
        };
        let source = Source::Remote {
            name: self.server.url.clone(),
            release,
            limits,
            requests,
        };
        let allowance = match self.config.network.budget_per_month_mib {
            Some(mib) => {
                let ledger = month::current(&self.config.device.data_dir, wall_clock())?;
                // Written now, so a new month's ledger replaces the old one at once.
                month::save(&self.config.device.data_dir, &ledger)?;
                Some(month::Allowance {
                    ledger,
                    limit_bytes: mib.saturating_mul(1024 * 1024),
                })
            }
            None => None,
        };
        let data_dir = self.config.device.data_dir.clone();
        let result = std::thread::scope(|s| {
            // The month's count follows the bytes read while the install runs.
            let (stop, stopped) = std::sync::mpsc::channel::<()>();
            let counter = allowance.as_ref().map(|a| {
                let (watch, data_dir) = (watch.clone(), &data_dir);
                s.spawn(move || {
                    let mut saved = 0;
                    loop {
                        let done = !matches!(
                            stopped.recv_timeout(month::SAVE_EVERY),
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                        );
                        let bytes = watch.bytes();
                        if bytes != saved {
                            match month::save(data_dir, &a.after(bytes)) {
                                Ok(()) => saved = bytes,
                                Err(e) => warn!(error = %crate::cmd::one_line(&e), "cannot record the month's bytes"),
                            }
                        }
                        if done {
                            return;
                        }
                    }
                })
            });
            let result = Device::open(self.config.clone(), Reboot::Command).and_then(|mut dev| {
                if let Some(a) = &allowance {
                    info!(left = a.left_bytes(), limit = a.limit_bytes, month = %a.ledger.month, "monthly data budget");
                    dev.limit_wan_budget(a.left_bytes());
                }
                dev.install(source, false, &mut |_| {})
            });
            drop(stop);
            if let Some(c) = counter {
                let _ = c.join();
            }
            result
        });
        if watch.aborted() {
            return self.aborted(dep, "the server answered 409 to a chunk request");
        }
        match result {
            Ok(report) => {
                if let Some(lan) = &self.lan {
                    lan.have_all();
                }
                info!(
                    deployment = %dep.id,
                    resumed = report.resumed_bytes,
                    fetched = report.fetched_bytes,
                    installed_from_peers = report.peer_bytes,
                    reused = report.reused_bytes,
                    transferred = watch.bytes(),
                    from_peers = peer_bytes.map_or(0, |b| b.load(std::sync::atomic::Ordering::Relaxed)),
                    transferred_static = watch.static_bytes(),
                    delta_chunks = watch.delta_chunks(),
                    manifest_checks = shoal_signing::release_checks() - checks,
                    "installed; trial armed"
                );
                if self.report(dep, "installing", None)? {
                    return Ok(Handled::Done);
                }
                save_record(
                    &self.config,
                    Some(&Record {
                        deployment: dep.id.clone(),
                        name: dep.release.name.clone(),
                        version: dep.release.version.clone(),
                        state: "rebooting".into(),
                    }),
                )?;
                if self.report(dep, "rebooting", None)? {
                    return Ok(Handled::Done);
                }
                self.reboot()?;
                Ok(Handled::Rebooting)
            }
            Err(e) if exit_code(&e) == EXIT_TEMPFAIL => {
                warn!(deployment = %dep.id, error = %crate::cmd::one_line(&e), "install interrupted; it resumes on the next try");
                Ok(Handled::Retry)
            }
            Err(e) => {
                let mut message = crate::cmd::one_line(&e);
                if let Some(a) = &allowance
                    && a.binds(
                        self.config
                            .network
                            .budget_per_deployment_mib
                            .map(|m| m * 1024 * 1024),
                    )
                    && message.contains("but the data budget allows")
                {
                    message = format!("{}: {message}", a.describe());
                }
                warn!(deployment = %dep.id, %message, "install failed");
                self.report(dep, "failure", Some(&message))?;
                save_record(&self.config, None)?;
                Ok(Handled::Done)
            }
        }
    }

    /// The device's trust root.
    fn trust_root(&self) -> anyhow::Result<shoal_signing::TrustRoot> {
        let signed = SignedRoot::load(&self.config.device.trust_root)
            .map_err(|e| Exit::usage(format!("device.trust_root: {}", chain(&e))))?;
        Ok(signed.root)
    }

    /// Verifies a signed envelope for an install, once
    /// ([`Device::verify_envelope`]: stored as a file of the device store,
    /// verified from there, its chunk ids on disk). The outer error: the device
    /// cannot be opened; the inner: the release was not verified ([`refusal`]
    /// says whether it was refused).
    fn verify_release(
        &self,
        envelope: Vec<u8>,
    ) -> anyhow::Result<anyhow::Result<std::sync::Arc<shoal_engine::VerifiedRelease>>> {
        let dev = Device::open(self.config.clone(), Reboot::Command)?;
        Ok(dev.verify_envelope(envelope))
    }

    /// Gives back the stored envelope of a release [`Daemon::verify_release`]
    /// verified that is not installed (best effort: a leftover file is removed
    /// with the next deployment's record).
    fn forget_release(&self, release: &shoal_engine::VerifiedRelease) {
        match Device::open(self.config.clone(), Reboot::Command) {
            Ok(dev) => dev.forget_release(release),
            Err(e) => {
                warn!(error = %crate::cmd::one_line(&e), "cannot remove a refused release's manifest")
            }
        }
    }

    /// LAN hook: the release being installed into `slot`, served to peers from
    /// its table as it is written, its envelope read from the store's file.
    fn served_installing(
        &self,
        release: &std::sync::Arc<shoal_engine::VerifiedRelease>,
        slot: shoal_engine::Slot,
    ) -> anyhow::Result<crate::lan::serve::Served> {
        // The store's file is named after its bytes' hash, which the
        // verification checked; opened once here and served from this handle.
        let file = crate::device::stored_envelope_path(&self.config, release)
            .map(|path| -> anyhow::Result<_> {
                let file = std::fs::File::open(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let len = file
                    .metadata()
                    .with_context(|| format!("cannot read {}", path.display()))?
                    .len();
                Ok((path, file, len))
            })
            .transpose()?;
        let envelope = crate::lan::serve::EnvelopeAt::of(release, file)?;
        Ok(crate::lan::serve::Served::new(
            std::sync::Arc::clone(release),
            envelope,
            slot,
        ))
    }

    /// Reports a state; `Ok(true)` when the server ended the deployment (409).
    fn report(
        &self,
        dep: &NextDeployment,
        state: &str,
        substate: Option<&str>,
    ) -> anyhow::Result<bool> {
        match state.parse::<shoal_fleet::Status>() {
            Ok(status) => crate::reports::record(
                &self.config,
                crate::reports::Draft {
                    origin: shoal_fleet::report::Origin::Daemon,
                    deployment: Some(dep.id.clone()),
                    release: Some(shoal_fleet::report::Release {
                        name: dep.release.name.clone(),
                        version: dep.release.version.clone(),
                    }),
                    status,
                    substate: substate.map(str::to_owned),
                },
            ),
            Err(e) => warn!(state, error = %e, "not a report state"),
        }
        match self.api.status(&dep.id, state, substate) {
            Ok(()) => {
                info!(deployment = %dep.id, state, "reported");
                Ok(false)
            }
            Err(ApiError::Conflict(m)) => {
                self.aborted(dep, &m)?;
                Ok(true)
            }
            Err(e) => Err(api_error(e)),
        }
    }

    fn aborted(&self, dep: &NextDeployment, why: &str) -> anyhow::Result<Handled> {
        info!(deployment = %dep.id, why, "the server ended the deployment; stopping it");
        // A trial armed before the abort was noticed is disarmed: the device stays
        // on the release it runs.
        let (status, _) = crate::device::read_status(&self.config)?;
        if status
            .deployment
            .as_ref()
            .is_some_and(|d| matches!(d.phase, Phase::Verified | Phase::TrialArmed))
        {
            let mut dev = Device::open(self.config.clone(), Reboot::Command)?;
            let result = dev.rollback("the server aborted the deployment")?;
            info!(?result, "disarmed the aborted deployment's trial");
        }
        save_record(&self.config, None)?;
        Ok(Handled::Done)
    }

    fn reboot(&self) -> anyhow::Result<()> {
        crate::device::run_reboot_command(&self.config)
    }
}

/// Why a release was refused, when `e` (from [`Daemon::verify_release`]) is a
/// refusal of the release (its signatures, its manifest, its payloads), not
/// trouble of the device's store.
fn refusal(e: &anyhow::Error) -> Option<String> {
    match e.downcast_ref::<shoal_engine::OfferError>()? {
        shoal_engine::OfferError::ChunkIds(_) | shoal_engine::OfferError::StoredEnvelope(_) => None,
        // On one line, escaped: the manifest's text is untrusted.
        other => Some(crate::cmd::escape(&chain(other)).into_owned()),
    }
}

/// An API error as the daemon's error: transient ones are retry-safe.
fn api_error(e: ApiError) -> anyhow::Error {
    if e.is_transient() {
        Exit::tempfail(e.to_string())
    } else {
        anyhow!(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A release that does not verify is a refusal, said once on one line
    /// (reported as "the manifest was refused: ..."); the device store's own
    /// trouble while verifying it, or an error that is not the engine's, is not.
    #[test]
    fn only_the_release_s_faults_are_refusals() {
        use shoal_engine::OfferError;
        let refused = anyhow!(OfferError::Signature(
            shoal_signing::VerifyError::MissingRole(shoal_signing::RoleName::Release)
        ))
        .context("the release was refused");
        let why = refusal(&refused).expect("a refusal");
        assert!(
            why.starts_with(
                "the release signature does not verify against the device's trust root: "
            ),
            "{why}"
        );
        // A key from the signed manifest, printed as it is by the error.
        let escaped = anyhow!(OfferError::Depends {
            key: "\u{1b}[2Jrootfs".into(),
            wanted: vec!["1".into()],
            have: None,
        });
        let why = refusal(&escaped).expect("a refusal");
        assert!(!why.chars().any(char::is_control), "{why:?}");
        for mine in [
            OfferError::ChunkIds("cannot write x.ids: No space left on device".into()),
            OfferError::StoredEnvelope("cannot read the stored envelope: EIO".into()),
        ] {
            let e = anyhow!(mine).context("cannot keep the release's chunk ids");
            assert_eq!(refusal(&e), None, "{e:#}");
        }
        assert_eq!(refusal(&anyhow!("cannot open the device store")), None);
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let mut b = Backoff::new(Duration::from_secs(10));
        let waits: Vec<u64> = (0..6).map(|_| b.step().as_millis() as u64).collect();
        for (w, base) in waits
            .iter()
            .zip([1000u64, 2000, 4000, 8000, 10_000, 10_000])
        {
            assert!(
                *w >= base - base / 10 && *w <= base + base / 10,
                "{w} not within a tenth of {base}"
            );
        }
        b.reset();
        assert!(b.step() <= Duration::from_millis(1100));
    }

    #[test]
    fn device_key_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let a = device_key(&data).expect("made");
        let mode = std::fs::metadata(data.join(KEY_FILE))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = device_key(&data).expect("loaded");
        assert_eq!(a.public().to_bytes(), b.public().to_bytes());
        std::fs::write(data.join(KEY_FILE), "not a key").expect("write");
        let e = device_key(&data).expect_err("corrupt key");
        assert!(e.to_string().contains("cannot be read"), "{e}");
    }

    #[test]
    fn records_survive_and_clear() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "[device]\ntype = \"b\"\ndata_dir = \"{}\"\ntrust_root = \"r\"\n[slots]\na = {{ path = \"a\" }}\nb = {{ path = \"b\" }}\n[bootloader]\ntype = \"file\"\npath = \"e\"\n",
            dir.path().display()
        );
        let config = Config::parse(&text, Path::new("t.toml")).expect("config");
        assert_eq!(load_record(&config).expect("none"), None);
        let r = Record {
            deployment: "d1".into(),
            name: "os".into(),
            version: "2".into(),
            state: "rebooting".into(),
        };
        save_record(&config, Some(&r)).expect("save");
        assert_eq!(load_record(&config).expect("load"), Some(r));
        save_record(&config, None).expect("clear");
        assert_eq!(load_record(&config).expect("none"), None);
        std::fs::write(record_path(&config), b"{").expect("write");
        let e = load_record(&config).expect_err("corrupt");
        assert!(e.to_string().contains("is corrupt"), "{e}");
    }
}
