//! The device side of Shoal: the engine driven with real files, the bootloader and
//! the device store.
//!
//! [`Device`] opens the configuration's pieces (trust root, redb store, bootctl) and
//! runs [`shoal_engine::Engine`]'s outputs synchronously: slot reads and writes go
//! through bootctl's storage seam, journal records into the redb [`store::Store`],
//! bootloader outputs into [`shoal_bootctl::BootControl`]. Sources are an artifact
//! stream (a `.shoal` file or stdin, chunks decoded in parallel batches), a chunk
//! store directory (answered per request), or a [`Requests`] source answering on
//! threads of its own (the daemon's server: several requests in flight).

mod chunk_ids;

/// The `Storage` methods a test wrapper passes to its `inner` storage as they are
/// (all but `read_at`, which each wrapper watches, slows or breaks).
#[cfg(test)]
macro_rules! forward_storage {
    () => {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.inner.write_at(offset, data)
        }
        fn set_len(&mut self, len: u64) -> std::io::Result<()> {
            self.inner.set_len(len)
        }
        fn sync(&mut self) -> std::io::Result<()> {
            self.inner.sync()
        }
    };
}

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod cut_wait_tests;
pub mod health;
pub mod idle_index;
mod slotio;
pub mod store;
mod write_behind;

use std::collections::HashSet;
use std::io::{self, BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use rayon::prelude::*;
use shoal_artifact::read::{ArtifactReader, CopyError, EnvelopeHead};
use shoal_artifact::{
    ChunkError, ChunkId, ChunkStore, Manifest, ReadError, Reference, ReferenceBytes,
};
use shoal_bootctl::BootControl;
use shoal_bootctl::storage::Storage;
use shoal_engine::{
    Boot, Candidate, Engine, Event, FetchFailure, Holds, Input, IoOp, Origin, Output, Phase,
    Progress, RequestId, Slot, SourceClass, SourceFault, SourceId, SourceInfo, SourceKind,
    SourceLimits, Status, slot_ordinal,
};
use shoal_signing::{SignedRoot, TrustRoot};
use tracing::{info, warn};

use crate::cmd::{Exit, chain};
use crate::config::Config;
use store::Store;

/// Bytes of wanted chunks (uncompressed, so a highly compressible stretch cannot
/// balloon) read from an artifact before they are decoded together, in parallel.
/// Bounds the memory of a streaming install.
const DECODE_BATCH_BYTES: usize = 2 * 1024 * 1024;
/// How often a [`Requests`] source is told the journaled ranges (LAN peers).
const JOURNALED_EVERY: Duration = Duration::from_millis(250);
/// Needed chunks met while indexing the running slot, waiting for the engine.
const MET_QUEUE: usize = 32;
/// While a cut of the running slot runs, about how often the driver serves the
/// request source (its answers, the engine's timers, a withdrawn deployment)
/// between what the cut meets (a write or sync the engine asks for meanwhile may
/// make a turn longer).
const CUT_SERVES_EVERY: Duration = Duration::from_millis(10);
/// Read buffer of artifact sources and of slot indexing.
const READ_BUFFER: usize = 256 * 1024;
/// Slot reads are read ahead, and contiguous slot writes gathered, up to this size.
const IO_WINDOW: usize = 512 * 1024;
/// Wall-clock times before this (2024-01-01) mean the device has no real clock: the
/// trust root expiry is not checked rather than checked against 1970.
const CLOCK_SANE_UNIX_S: u64 = 1_704_067_200;

/// Where `shoal install` takes a release from.
pub enum Source {
    /// A `.shoal` artifact (full or thin) read as a stream: a file or stdin.
    Artifact {
        /// For messages: the path, or `-`.
        name: String,
        /// The bytes.
        reader: ArtifactInput,
    },
    /// A request source that answers asynchronously (the daemon's server, LAN
    /// peers), with the release it serves, verified once by the caller
    /// ([`Device::verify_envelope`]); the offer does not verify it again.
    Remote {
        /// For messages: the server.
        name: String,
        /// The release (its envelope stored by this device's store).
        release: Arc<shoal_engine::VerifiedRelease>,
        /// How many requests, bytes and chunks at once.
        limits: SourceLimits,
        /// The source.
        requests: Box<dyn Requests>,
    },
    /// A chunk store directory; `release` picks among its manifests
    /// (`NAME` or `NAME@VERSION`), default: the only compatible one, or the one with
    /// the highest security counter.
    Store {
        /// The directory.
        dir: PathBuf,
        /// Which release.
        release: Option<String>,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Artifact { name, .. } => f
                .debug_struct("Artifact")
                .field("name", name)
                .finish_non_exhaustive(),
            Source::Remote { name, limits, .. } => f
                .debug_struct("Remote")
                .field("name", name)
                .field("limits", limits)
                .finish_non_exhaustive(),
            Source::Store { dir, release } => f
                .debug_struct("Store")
                .field("dir", dir)
                .field("release", release)
                .finish(),
        }
    }
}

/// A request source whose requests run elsewhere (threads, a network): the driver
/// sends the engine's [`Output::Fetch`] requests and collects the answers.
pub trait Requests: Send {
    /// Starts one request; must not block on the network.
    fn send(&mut self, request: RequestId, ids: Vec<ChunkId>);
    /// The engine no longer wants a request's answers; stop it if it still runs.
    fn cancel(&mut self, request: RequestId);
    /// Waits up to `timeout` for answers; empty when none came.
    fn wait(&mut self, timeout: Duration) -> Vec<Answer>;
    /// Bytes read from the source so far (as transferred).
    fn bytes_read(&self) -> u64;
    /// Why the install must stop now (the server aborted the deployment), if so.
    fn stop_reason(&self) -> Option<String> {
        None
    }

    // LAN hooks (crate::lan::requests): a source that also carries other sources
    // (LAN peers). The defaults fit a source that carries none.

    /// Whether requests for `source` (not this one's own) go through it.
    fn carries(&self, _source: SourceId) -> bool {
        false
    }
    /// Starts one request to a carried source.
    fn send_to(&mut self, _source: SourceId, request: RequestId, ids: Vec<ChunkId>) {
        self.send(request, ids);
    }
    /// Cancels a request to a carried source.
    fn cancel_to(&mut self, _source: SourceId, request: RequestId) {
        self.cancel(request);
    }
    /// The engine banned a carried source (it sent a corrupt chunk).
    fn banned(&mut self, _source: SourceId) {}
    /// The target slot's byte ranges written, synced and journaled so far
    /// (`Engine::journaled_ranges`), given every few hundred milliseconds.
    fn journaled(&mut self, _ranges: &[(u64, u64)]) {}
}

/// An answer of a [`Requests`] source.
#[derive(Debug)]
pub enum Answer {
    /// A chunk, decoded and hashed to its id by the source's reader.
    Chunk(shoal_artifact::VerifiedChunk),
    /// Bytes sent as this chunk do not decode or do not hash to its id (the
    /// engine bans the source).
    Corrupt(ChunkId),
    /// The source does not hold this chunk.
    Unavailable(ChunkId),
    /// The whole request failed.
    Failed {
        /// The request.
        request: RequestId,
        /// How it failed.
        failure: FetchFailure,
    },
    // LAN hooks: what a source carrying other sources (LAN peers) says of them.
    /// An answer of a carried source.
    From {
        /// The carried source.
        source: SourceId,
        /// Its answer (a chunk, unavailable, failed).
        answer: Box<Answer>,
    },
    /// A carried source appeared.
    Added(SourceInfo),
    /// A carried source holds more.
    Holds {
        /// The source.
        source: SourceId,
        /// What it holds now.
        holds: Holds,
    },
    /// A carried source (a LAN swarm member) says it has asked the server for
    /// these chunks and does not hold them yet.
    Fetching {
        /// The source.
        source: SourceId,
        /// What it fetches now.
        fetching: Holds,
    },
    /// A carried source went away.
    Removed(SourceId),
    /// The LAN peers installing the same release changed.
    Swarm(shoal_engine::Swarm),
}

/// Where an artifact's bytes come from.
pub enum ArtifactInput {
    /// A regular file: the chunks the device does not need are seeked over, never
    /// read, and the rest is read in large unbuffered reads.
    File(std::fs::File),
    /// A pipe (stdin) or anything else read front to back: skipped chunks are read
    /// and dropped.
    Stream(Box<dyn Read + Send>),
}

/// An [`ArtifactInput`] that counts the bytes it read (not those it skipped).
/// Where an artifact's envelope went before it is verified.
enum Stored {
    /// The device store's envelope file of that hash.
    File([u8; 32]),
    /// In memory: a store that keeps no envelope files (a test backend).
    Memory(Vec<u8>),
}

struct CountingInput {
    inner: CountingInner,
    /// Bytes read from a stream.
    bytes: u64,
}

enum CountingInner {
    File(Replayed),
    Stream(BufReader<Box<dyn Read + Send>>),
}

/// A file the install reads front to back, some of whose bytes were read before
/// (the envelope's first bytes and its signatures, by the signer check before the
/// copy): those are served again from memory, so no byte of the source is read
/// twice. `pos` is the reader's position; after a replayed read or a skip the
/// file's own is `stale`, and is sought to `pos` before the next real read.
struct Replayed {
    file: std::fs::File,
    pos: u64,
    stale: bool,
    /// Bytes read before, at their offsets (the envelope's head: up to ~33 KB
    /// with 256 signatures).
    seen: Vec<(u64, Vec<u8>)>,
    /// Bytes read from the file, those read before included.
    read: u64,
}

/// A `Read + Seek` over a file that keeps what is read through it, with offsets:
/// what [`Replayed`] serves again.
struct Recording<'a> {
    file: &'a mut std::fs::File,
    seen: Vec<(u64, Vec<u8>)>,
}

impl Read for Recording<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let at = self.file.stream_position()?;
        let n = self.file.read(buf)?;
        if n > 0 {
            self.seen.push((at, buf[..n].to_vec()));
        }
        Ok(n)
    }
}

impl Seek for Recording<'_> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

impl Replayed {
    /// `file`, to be read from `pos` on, of which `seen` was read already.
    fn new(file: std::fs::File, pos: u64, seen: Vec<(u64, Vec<u8>)>) -> Replayed {
        let read = seen.iter().map(|(_, b)| b.len() as u64).sum();
        Replayed {
            file,
            pos,
            stale: true,
            seen,
            read,
        }
    }
}

impl Read for Replayed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let pos = self.pos;
        if let Some((at, bytes)) = self
            .seen
            .iter()
            .find(|(at, b)| *at <= pos && pos - at < b.len() as u64)
        {
            let from = usize::try_from(pos - at).expect("within a short read");
            let n = buf.len().min(bytes.len() - from);
            buf[..n].copy_from_slice(&bytes[from..from + n]);
            self.pos += n as u64;
            self.stale = true;
            return Ok(n);
        }
        if self.stale {
            self.file.seek(io::SeekFrom::Start(pos))?;
            self.stale = false;
        }
        // Up to the next piece read before, so it is not read again.
        let len = self
            .seen
            .iter()
            .filter(|(at, _)| *at > pos)
            .map(|(at, _)| at - pos)
            .min()
            .map_or(buf.len(), |gap| {
                usize::try_from(gap).map_or(buf.len(), |g| g.min(buf.len()))
            });
        let n = self.file.read(&mut buf[..len])?;
        self.pos += n as u64;
        self.read += n as u64;
        Ok(n)
    }
}

impl CountingInput {
    fn new(input: ArtifactInput) -> CountingInput {
        match input {
            ArtifactInput::File(f) => CountingInput::file(Replayed::new(f, 0, Vec::new())),
            ArtifactInput::Stream(r) => CountingInput {
                inner: CountingInner::Stream(BufReader::with_capacity(READ_BUFFER, r)),
                bytes: 0,
            },
        }
    }

    fn file(f: Replayed) -> CountingInput {
        CountingInput {
            inner: CountingInner::File(f),
            bytes: 0,
        }
    }

    /// Bytes read from the source (each once).
    fn bytes_read(&self) -> u64 {
        match &self.inner {
            CountingInner::File(f) => f.read,
            CountingInner::Stream(_) => self.bytes,
        }
    }
}

impl Read for CountingInput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.inner {
            CountingInner::File(f) => f.read(buf),
            CountingInner::Stream(r) => {
                let n = r.read(buf)?;
                self.bytes += n as u64;
                Ok(n)
            }
        }
    }
}

impl shoal_artifact::read::Skip for CountingInput {
    fn skip(&mut self, n: u64) -> io::Result<()> {
        match &mut self.inner {
            CountingInner::File(f) => {
                f.pos = f
                    .pos
                    .checked_add(n)
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "skip too far"))?;
                f.stale = true;
                Ok(())
            }
            CountingInner::Stream(r) => {
                let copied = io::copy(&mut r.by_ref().take(n), &mut io::sink())?;
                self.bytes += copied;
                if copied < n {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                Ok(())
            }
        }
    }
}

/// How reboots asked for by the engine are carried out.
pub enum Reboot {
    /// Run the configured `reboot_command` (if any).
    Command,
    /// Call this (the demo simulates the bootloader).
    Hook(Box<dyn FnMut() -> anyhow::Result<()>>),
}

impl std::fmt::Debug for Reboot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reboot::Command => f.write_str("Reboot::Command"),
            Reboot::Hook(_) => f.write_str("Reboot::Hook"),
        }
    }
}

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstallReport {
    /// Release name.
    pub release: String,
    /// Release version.
    pub version: String,
    /// The slot written.
    pub slot: Slot,
    /// Payload size.
    pub total_bytes: u64,
    /// Bytes the journal already had (an interrupted install resumed).
    pub resumed_bytes: u64,
    /// Bytes written to the slot by this run.
    pub written_bytes: u64,
    /// Of those, copied from the active slot.
    pub reused_bytes: u64,
    /// Of those, from the source (uncompressed).
    pub fetched_bytes: u64,
    /// Of the fetched bytes, distinct chunk bytes (uncompressed) that came from LAN
    /// peers (each counted once, as installed; the engine's count).
    pub peer_bytes: u64,
    /// Of the fetched bytes, distinct chunk bytes (uncompressed) from the WAN.
    pub wan_bytes: u64,
    /// Bytes read from the source (as stored: compressed, with framing).
    pub source_bytes_read: u64,
    /// Whether a reboot into the trial was started.
    pub rebooting: bool,
}

/// What `boot-check` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum BootCheck {
    /// No deployment was waiting for this boot.
    Nothing,
    /// The trial was armed but not attempted yet.
    TrialPending {
        /// The slot that boots next.
        slot: Slot,
    },
    /// The install had not finished; rerun it.
    InstallUnfinished,
    /// Health checks passed; the release is committed.
    Committed {
        /// `name version`.
        release: String,
        /// Its slot.
        slot: Slot,
    },
    /// The release was rolled back.
    RolledBack {
        /// `name version`.
        release: String,
        /// Its slot.
        slot: Slot,
        /// Why.
        reason: String,
    },
}

/// A device: configuration, trust root, store and bootloader.
#[derive(Debug)]
pub struct Device {
    config: Config,
    root: TrustRoot,
    store: Arc<Store>,
    boot: BootControl,
    capacity: [u64; 2],
    reboot: Reboot,
    /// Read-ahead and write-gathering size.
    io_window: usize,
    /// A WAN data budget below `[network] budget_per_deployment_mib` for the next
    /// installs (the daemon's monthly budget: what is left of the month).
    wan_budget_max: Option<u64>,
}

/// Runs `device.reboot_command` (the standalone install and the daemon both reboot
/// through it); an empty command only says the device needs a reboot.
pub fn run_reboot_command(config: &Config) -> anyhow::Result<()> {
    let cmd = &config.device.reboot_command;
    let Some((prog, args)) = cmd.split_first() else {
        warn!("a reboot is needed; device.reboot_command is empty, so reboot the device yourself");
        return Ok(());
    };
    info!(command = ?cmd, "rebooting");
    let status = std::process::Command::new(prog)
        .args(args)
        .status()
        .with_context(|| format!("cannot run the reboot command {prog}"))?;
    if !status.success() {
        bail!("the reboot command {prog} failed ({status})");
    }
    Ok(())
}

/// Unix seconds for the trust root expiry check, `None` without a sane clock.
pub fn wall_clock() -> Option<u64> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    (now >= CLOCK_SANE_UNIX_S).then_some(now)
}

impl Device {
    /// A device from already opened parts (tests: slots and bootloader on a crash
    /// disk).
    #[cfg(test)]
    pub(crate) fn from_parts(
        config: Config,
        root: TrustRoot,
        store: Store,
        boot: BootControl,
    ) -> anyhow::Result<Device> {
        let mut capacity = [0u64; 2];
        for slot in Slot::ALL {
            capacity[slot_ordinal(slot)] = boot.open_reader(slot)?.len()?;
        }
        Ok(Device {
            config,
            root,
            store: Arc::new(store),
            boot,
            capacity,
            reboot: Reboot::Command,
            // Small, so a crash test meets many slot writes.
            io_window: 16 * 1024,
            wan_budget_max: None,
        })
    }

    /// Opens the device described by `config`.
    pub fn open(config: Config, reboot: Reboot) -> anyhow::Result<Device> {
        let (signed, boot, capacity) = open_parts(&config, true)?;
        let store = Store::open(&config.device.data_dir).map_err(|e| match e {
            store::StoreError::Busy { .. } => Exit::tempfail(e.to_string()),
            other => anyhow!(other),
        })?;
        Ok(Device {
            root: signed.root,
            config,
            store: Arc::new(store),
            boot,
            capacity,
            reboot,
            io_window: IO_WINDOW,
            wan_budget_max: None,
        })
    }

    /// Lowers the WAN data budget of the next installs to at most `bytes` (the engine
    /// enforces the lower of it and `[network] budget_per_deployment_mib`).
    pub fn limit_wan_budget(&mut self, bytes: u64) {
        self.wan_budget_max = Some(bytes);
    }

    fn boot_info(&self) -> anyhow::Result<Boot> {
        let status = self.boot.status().context("cannot read the boot state")?;
        Ok(Boot::from_bootloader(status.active, &status.state))
    }

    /// The engine, restored from the store. On a device Shoal sees for the first
    /// time, records the running slot.
    fn engine(&self) -> anyhow::Result<Engine> {
        self.engine_with(|dev, active| {
            if dev.store.is_fresh()? {
                info!(slot = %active, "first run on this device");
                dev.store.init_active(active)?;
            }
            Ok(())
        })
    }

    fn engine_with(
        &self,
        first: impl FnOnce(&Device, Slot) -> anyhow::Result<()>,
    ) -> anyhow::Result<Engine> {
        let active = self
            .boot
            .active()
            .context("cannot determine the running slot")?;
        first(self, active)?;
        let mut config = engine_config(&self.config, &self.root);
        if let Some(max) = self.wan_budget_max {
            config.wan_budget_bytes = Some(config.wan_budget_bytes.map_or(max, |b| b.min(max)));
        }
        let mut engine = Engine::new(config.clone(), self.store.load(active, self.capacity)?);
        // The engine decides whether a slot change needs recording (one made
        // outside Shoal); once recorded, the state is loaded again for the running
        // slot's index.
        if engine.observe_running(shoal_engine::Instant::default(), active) {
            while let Some(out) = engine.poll_output() {
                if let Output::Persist(records) = out {
                    self.store.apply(&records)?;
                }
            }
            engine = Engine::new(config, self.store.load(active, self.capacity)?);
        }
        Ok(engine)
    }

    /// The engine's status and the bootloader's (the crash tests' view; commands use
    /// [`read_status`], which does not take the store).
    #[cfg(test)]
    pub fn status(&self) -> anyhow::Result<(Status, shoal_bootctl::Status)> {
        let engine = self.engine()?;
        let boot = self.boot.status().context("cannot read the boot state")?;
        Ok((engine.status(), boot))
    }

    /// Verifies a signed envelope received as bytes (the server's, a LAN
    /// peer's, a rebuilt manifest delta) for an install by this device, once:
    /// stored first as a file of the device store ([`Store::put_envelope_bytes`]),
    /// the bytes dropped, then verified from the file
    /// ([`Device::verify_stored_file`]: its chunk ids to `<hash>.ids`, read by
    /// position). The `Arc` goes to [`Source::Remote`], whose offer does not
    /// verify it again, and its table serves the fetcher's and the LAN's lookups.
    /// A release refused leaves no file behind; one verified but not installed
    /// is given back with [`Device::forget_release`]. A refusal's error holds
    /// the engine's [`OfferError`](shoal_engine::OfferError) (its
    /// `ChunkIds`/`StoredEnvelope` variants: the device's trouble, not the
    /// release's).
    pub fn verify_envelope(
        &self,
        envelope: Vec<u8>,
    ) -> anyhow::Result<Arc<shoal_engine::VerifiedRelease>> {
        self.verify_envelope_at(envelope, wall_clock())
    }

    fn verify_envelope_at(
        &self,
        envelope: Vec<u8>,
        wall_unix_s: Option<u64>,
    ) -> anyhow::Result<Arc<shoal_engine::VerifiedRelease>> {
        let stored = self
            .store
            .put_envelope_bytes(&envelope)
            .context("cannot store the signed manifest")?;
        let Some(hash) = stored else {
            // A store without envelope files (the crash tests' backend): the
            // release keeps the bytes.
            return shoal_engine::VerifiedRelease::verify(&self.root, envelope, wall_unix_s)
                .map_err(|e| anyhow!(e).context("the release was refused"));
        };
        drop(envelope);
        self.verify_stored_or_forget(&hash, wall_unix_s)
    }

    /// Verifies the envelope the device store keeps as `hash` from its file
    /// ([`Device::verify_stored_file`]), forgetting the file if it does not.
    fn verify_stored_or_forget(
        &self,
        hash: &[u8; 32],
        wall_unix_s: Option<u64>,
    ) -> anyhow::Result<Arc<shoal_engine::VerifiedRelease>> {
        let verified = self
            .store
            .open_stored_envelope(hash)
            .map_err(|e| anyhow!(e).context("cannot read back the signed manifest"))
            .and_then(|(file, len)| self.verify_stored_file(hash, &file, len, wall_unix_s));
        if verified.is_err() {
            self.store.forget_envelope(hash);
        }
        verified
    }

    /// [`Device::verify_envelope`] of an envelope file (a chunk store's): copied
    /// into the device store as it is read (64 KiB at a time, hashed as it is
    /// written, at most [`shoal_signing::ENVELOPE_SIZE_MAX`] bytes), then
    /// verified from the copy, never whole in memory. With the bytes copied.
    /// `picked` is the BLAKE3 of the file when a release was picked from it
    /// ([`shoal_artifact::ReleaseHead::envelope_hash`]): a copy of other bytes is
    /// refused before it is verified, as changed since the pick: what is
    /// verified is what was picked. Errors say which side failed: reading the
    /// file (`cannot read PATH`) or storing the copy (`cannot store the signed
    /// manifest`).
    fn verify_envelope_file(
        &self,
        path: &Path,
        picked: &[u8; 32],
        wall_unix_s: Option<u64>,
    ) -> anyhow::Result<(Arc<shoal_engine::VerifiedRelease>, u64)> {
        /// Which side of the copy failed.
        enum CopyError {
            Read(io::Error),
            Write(io::Error),
        }
        let max = shoal_signing::ENVELOPE_SIZE_MAX as u64;
        let cannot_read =
            |e: io::Error| anyhow!(e).context(format!("cannot read {}", path.display()));
        let too_large = || io::Error::other(format!("the envelope is more than {max} bytes"));
        let changed = |now: &[u8; 32]| {
            anyhow!(
                "{} changed since the release was picked from it (its bytes hashed {}, they now hash {}): nothing of it was installed",
                path.display(),
                hex::encode(picked),
                hex::encode(now)
            )
        };
        let file = std::fs::File::open(path).map_err(cannot_read)?;
        let mut copied = 0u64;
        let stored = self
            .store
            .put_envelope_with(|out| -> Result<(), CopyError> {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match (&file).read(&mut buf) {
                        Ok(0) => return Ok(()),
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(CopyError::Read(e)),
                    };
                    copied += n as u64;
                    if copied > max {
                        return Err(CopyError::Read(too_large()));
                    }
                    out.write_all(&buf[..n]).map_err(CopyError::Write)?;
                }
            })
            .context("cannot store the signed manifest")?;
        let hash = match stored {
            Some(Ok(hash)) => hash,
            Some(Err(CopyError::Read(e))) => return Err(cannot_read(e)),
            Some(Err(CopyError::Write(e))) => {
                return Err(anyhow!(e).context("cannot store the signed manifest"));
            }
            None => {
                // A store without envelope files (the crash tests' backend): the
                // release keeps the bytes.
                let mut bytes = Vec::new();
                std::fs::File::open(path)
                    .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
                    .map_err(cannot_read)?;
                if bytes.len() as u64 > max {
                    return Err(cannot_read(too_large()));
                }
                let now = *blake3::hash(&bytes).as_bytes();
                if *picked != now {
                    return Err(changed(&now));
                }
                let copied = bytes.len() as u64;
                let verified =
                    shoal_engine::VerifiedRelease::verify(&self.root, bytes, wall_unix_s)
                        .map_err(|e| anyhow!(e).context("the release was refused"))?;
                return Ok((verified, copied));
            }
        };
        if *picked != hash {
            self.store.forget_envelope(&hash);
            return Err(changed(&hash));
        }
        Ok((self.verify_stored_or_forget(&hash, wall_unix_s)?, copied))
    }

    /// The release picked from a chunk store ([`ChunkStore::release_head`]),
    /// copied into the device store as its envelope file is read and verified
    /// from there, once, as every install's (the chunk list to its table, the
    /// ids to `<hash>.ids`): the store's file may have changed since it was
    /// picked, so the copy must be the bytes that were picked (else refused,
    /// nothing kept). With the bytes read.
    fn copy_picked(
        &self,
        picked: &shoal_artifact::ReleaseHead,
        wall_unix_s: Option<u64>,
    ) -> anyhow::Result<(Arc<shoal_engine::VerifiedRelease>, u64)> {
        self.verify_envelope_file(&picked.path, &picked.envelope_hash, wall_unix_s)
    }

    /// Removes the stored envelope (and its chunk ids) of a release verified by
    /// [`Device::verify_envelope`] that is not installed after all, unless a
    /// deployment names it.
    pub fn forget_release(&self, release: &shoal_engine::VerifiedRelease) {
        if let Some(hash) = release.stored_hash() {
            self.store.forget_envelope(&hash);
        }
    }

    /// Verifies the envelope the device store keeps as `hash` from its file
    /// (`file`, `len` bytes: [`Store::open_stored_envelope`]) without holding it
    /// ([`VerifiedRelease::verify_file`](shoal_engine::VerifiedRelease::verify_file)),
    /// its chunk ids going to `<hash>.ids` ([`Store::chunk_ids_writer`]) and read
    /// from there by position: an 8 GiB image's 17.6 MB envelope and 13.8 MB of
    /// ids stay on disk. The file and the ids install and every store-backed
    /// install verify this way; the caller forgets the file on an error.
    fn verify_stored_file(
        &self,
        hash: &[u8; 32],
        file: &std::fs::File,
        len: u64,
        wall_unix_s: Option<u64>,
    ) -> anyhow::Result<Arc<shoal_engine::VerifiedRelease>> {
        let ids = self
            .store
            .chunk_ids_writer(hash)
            .context("cannot keep the release's chunk ids")?
            .expect("a store that keeps envelope files keeps their ids");
        shoal_engine::VerifiedRelease::verify_file(&self.root, file, len, *hash, wall_unix_s, ids)
            .map_err(|e| match e {
                shoal_engine::OfferError::ChunkIds(_) => {
                    anyhow!(e).context("cannot keep the release's chunk ids")
                }
                shoal_engine::OfferError::StoredEnvelope(_) => {
                    anyhow!(e).context("cannot read back the signed manifest")
                }
                e => anyhow!(e).context("the release was refused"),
            })
    }

    /// Installs a release into the inactive slot and arms its trial boot.
    /// `progress(done, total)` is called as bytes are done.
    pub fn install(
        &mut self,
        source: Source,
        reboot: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> anyhow::Result<InstallReport> {
        let engine = self.engine()?;
        let running = self
            .boot
            .active()
            .context("cannot determine the running slot")?;
        if engine.status().active != running {
            bail!(
                "the device runs slot {running} but its store says slot {}: a trial boot was not checked; run `shoal boot-check` first",
                engine.status().active
            );
        }
        // A release installed here is kept (its signed envelope): the next thin
        // artifact's manifest may travel as a delta against it, and, for the LAN,
        // the daemon serves and announces it after the reboot, and peers with
        // `[lan] accept_releases` install it from here.
        let data_dir = self.config.device.data_dir.clone();
        let running_hash = engine.status().releases[slot_ordinal(running)]
            .as_ref()
            .map(|r| r.manifest_hash);
        // The new release's manifest is written to the kept ones as soon as it is
        // read (a kept file is only a reference: a manifest rebuilt against it is
        // verified whole, and the LAN serves only the running release's), so no
        // copy of it stays in memory during the install; the others are pruned
        // once the install is through.
        let mut kept = NewManifest {
            data_dir: data_dir.clone(),
            hash: None,
            running: running_hash,
            base: None,
            installed: false,
        };
        let mut driver = Driver::new(self, engine, progress);
        driver.index_base = running_hash;
        let wall = wall_clock();
        match source {
            Source::Artifact { name, reader } => {
                // An unsigned (or not enough signed) envelope is refused before it
                // is copied.
                // What the check read is kept, and served again to the reader below:
                // no byte of the source is read twice.
                let mut counted = match reader {
                    ArtifactInput::File(mut f) => {
                        let at = f.stream_position().context("cannot read the artifact")?;
                        let mut recording = Recording {
                            file: &mut f,
                            seen: Vec::new(),
                        };
                        shoal_artifact::read::check_envelope_signers(
                            &mut recording,
                            Some(&driver.dev.root),
                        )
                        .map_err(|e| artifact_error(&name, e))?;
                        let seen = recording.seen;
                        CountingInput::file(Replayed::new(f, at, seen))
                    }
                    stream => CountingInput::new(stream),
                };
                // A manifest that travels as a delta is rebuilt against a kept one,
                // then verified whole.
                let held = KeptManifests::new(&data_dir);
                let head = shoal_artifact::read::read_envelope_head(&mut counted, &held)
                    .map_err(|e| artifact_error(&name, e))?;
                let (member_len, delta_base) = match &head {
                    EnvelopeHead::Member { len } => (*len, None),
                    EnvelopeHead::Rebuilt {
                        member_len, base, ..
                    } => (*member_len, Some(*base)),
                };
                // The envelope member is copied straight into the store's envelope
                // file as it is read (synced, named by its hash), never whole in
                // memory: an 8 GiB image's is 17.6 MB. (A rebuilt delta is encoded
                // there.) Nothing in it is trusted until the engine verified the
                // file; the reader's manifest is then decoded from the file, its
                // signed bytes checked against the hash the signatures were
                // verified over. A store without envelope files (a test backend)
                // keeps it in memory.
                let stored = {
                    let store = &driver.dev.store;
                    let stored = match head {
                        EnvelopeHead::Member { len } => store
                            .put_envelope_with(|out| {
                                shoal_artifact::read::copy_envelope_member(&mut counted, len, out)
                            })
                            .context("cannot store the signed manifest")?
                            .map(|put| {
                                put.map_err(|e| match e {
                                    CopyError::Read(e) => artifact_error(&name, e),
                                    CopyError::Write(e) => {
                                        anyhow!(e).context("cannot store the signed manifest")
                                    }
                                })
                            })
                            .transpose()?
                            .map(Stored::File)
                            .ok_or(len),
                        EnvelopeHead::Rebuilt { envelope, .. } => {
                            match store
                                .put_envelope_encoded(&envelope)
                                .context("cannot store the signed manifest")?
                            {
                                Some(hash) => Ok(Stored::File(hash)),
                                None => Ok(Stored::Memory(envelope.to_bytes())),
                            }
                        }
                    };
                    match stored {
                        Ok(stored) => stored,
                        Err(len) => {
                            let mut bytes = Vec::new();
                            shoal_artifact::read::copy_envelope_member(
                                &mut counted,
                                len,
                                &mut bytes,
                            )
                            .map_err(|e| match e {
                                CopyError::Read(e) => artifact_error(&name, e),
                                CopyError::Write(e) => anyhow!(e),
                            })?;
                            Stored::Memory(bytes)
                        }
                    }
                };
                // A release refused from here on leaves no envelope file behind.
                let mut source = Some(&mut counted);
                let opened = (|| -> anyhow::Result<_> {
                    let counted = source.take().expect("opened once");
                    let opened = match &stored {
                        Stored::File(hash) => {
                            let (file, len) =
                                driver.dev.store.open_stored_envelope(hash).map_err(|e| {
                                    anyhow!(e).context("cannot read back the signed manifest")
                                })?;
                            shoal_artifact::read::check_copied_envelope(&mut &file, len)
                                .map_err(|e| artifact_error(&name, e))?;
                            let release = driver.verify_stored_file(hash, &file, len, wall)?;
                            let artifact = ArtifactReader::open_stored(
                                counted,
                                &file,
                                len,
                                &release.release().manifest_hash,
                                member_len,
                                delta_base,
                            )
                            .map_err(|e| artifact_error(&name, e))?;
                            (release, artifact, Some(file))
                        }
                        Stored::Memory(bytes) => {
                            let len = bytes.len() as u64;
                            shoal_artifact::read::check_copied_envelope(
                                &mut std::io::Cursor::new(&bytes[..]),
                                len,
                            )
                            .map_err(|e| artifact_error(&name, e))?;
                            let release = shoal_engine::VerifiedRelease::verify(
                                &driver.dev.root,
                                bytes.clone(),
                                wall,
                            )
                            .map_err(|e| anyhow!(e).context("the release was refused"))?;
                            let artifact = ArtifactReader::open_stored(
                                counted,
                                &&bytes[..],
                                len,
                                &release.release().manifest_hash,
                                member_len,
                                delta_base,
                            )
                            .map_err(|e| artifact_error(&name, e))?;
                            (release, artifact, None)
                        }
                    };
                    Ok(opened)
                })();
                let offered = opened.and_then(|(release, mut artifact, file)| {
                    // A release too big for the slot is refused before its chunk list
                    // costs anything more (a signed manifest of 300,000 chunks); the
                    // engine's offer checks the same.
                    let target = running.other();
                    let capacity = driver.dev.capacity[slot_ordinal(target)];
                    if let Some(p) = artifact
                        .manifest()
                        .payloads
                        .iter()
                        .find(|p| p.kind == shoal_artifact::PayloadKind::RootfsImage)
                        && p.size > capacity
                    {
                        return Err(anyhow!(shoal_engine::OfferError::SlotTooSmall {
                            slot: target,
                            need: p.size,
                            capacity,
                        })
                        .context("the release was refused"));
                    }
                    // Chunks delta-encoded against the base release are decoded with
                    // bytes of the running slot: a device known to run another release
                    // is refused before anything is written (one with no record is
                    // checked reference by reference, by hash).
                    if let Some(base) = artifact.manifest().base.as_ref()
                        && artifact
                            .manifest()
                            .payloads
                            .iter()
                            .any(|p| !p.references.is_empty())
                        && let Some(running_release) =
                            &driver.engine.status().releases[slot_ordinal(running)]
                        && running_release.manifest_hash != base.manifest_hash
                    {
                        return Err(anyhow!(
                            "{name} holds chunks encoded against {} {}, but the running slot {running} holds {running_release}; install a full artifact or one built against {running_release}",
                            base.name,
                            base.version
                        )
                        .context("the release was refused"));
                    }
                    // A thin artifact that reuses its base's dictionary carries none:
                    // the one kept with the base's manifest is checked against the
                    // dictionary the signed manifest names (a wrong one is refused).
                    if artifact.manifest().dictionary.is_some()
                        && let Some(base) = artifact.manifest().base.as_ref()
                        && let Some(d) = KeptManifests::dictionary(&data_dir, &base.manifest_hash)
                    {
                        artifact
                            .hold_dictionary(d)
                            .map_err(|e| artifact_error(&name, e))?;
                    }
                    // The members before the first pack are read and the manifest's
                    // chunk lists dropped before the engine decodes its own copy: the
                    // packs are read against the engine's chunk table (bound below), so
                    // the chunk list is in memory once, in the table.
                    artifact
                        .shed_chunk_lists_unbound()
                        .map_err(|e| artifact_error(&name, e))?;
                    if let Some(named) = artifact.manifest().dictionary
                        && artifact.dictionary().is_none()
                    {
                        let base = artifact.manifest().base.as_ref().map_or_else(
                            || "its base release".to_owned(),
                            |b| format!("its base release {} {}", b.name, b.version),
                        );
                        return Err(anyhow!(
                            "{name} carries no dictionary: its chunks reuse dictionary {named} of {base}, which this device does not keep; install a full artifact, or keep the base's dictionary by installing the base from an artifact"
                        )
                        .context("the release was refused"));
                    }
                    // The release's dictionary is kept with its manifest (below): the
                    // next thin artifact may reuse it.
                    let dictionary = artifact.dictionary().cloned();
                    // The base release a thin artifact names runs here too (a factory
                    // image without a record in the store): its manifest stays kept.
                    kept.base = artifact.manifest().base.as_ref().map(|b| b.manifest_hash);
                    driver.index_base = driver.index_base.or(kept.base);
                    let manifest_hash = release.release().manifest_hash;
                    match (&file, &stored) {
                        (Some(file), _) => kept.save_file(manifest_hash, file),
                        (None, Stored::Memory(bytes)) => kept.save(manifest_hash, bytes),
                        (None, Stored::File(_)) => unreachable!("read from its file"),
                    }
                    if let Some(d) = &dictionary {
                        kept.save_dictionary(manifest_hash, d);
                    }
                    // A full artifact whose contents lack a chunk is refused here,
                    // before the offer.
                    artifact
                        .bind_to(Arc::clone(&release) as Arc<dyn shoal_artifact::ChunkList>)
                        .map_err(|e| artifact_error(&name, e))?;
                    // What the artifact holds (a thin one says so in its contents
                    // member), so chunks it lacks are found missing before any write.
                    // A full artifact holds every chunk: saying so costs nothing, where
                    // a list of ids costs about 80 bytes a chunk (27 MiB at 8 GiB).
                    let holds = if artifact.is_thin() {
                        Holds::Ids(
                            artifact
                                .holds()
                                .map_err(|e| artifact_error(&name, e))?
                                .into_iter()
                                .collect(),
                        )
                    } else {
                        Holds::All
                    };
                    driver.offer_verified(
                        &release,
                        vec![
                            SourceInfo::new(STREAM, SourceKind::Stream, SourceClass::Local, &name)
                                .holding(holds),
                        ],
                        reboot,
                    )?;
                    Ok(artifact)
                });
                if let (Err(_), Stored::File(hash)) = (&offered, &stored) {
                    driver.dev.store.forget_envelope(hash);
                }
                let artifact = offered?;
                driver.stream(artifact, &name)?;
                driver.source_bytes_read = counted.bytes_read();
            }
            Source::Remote {
                name,
                release,
                limits,
                requests,
            } => {
                driver.requests = Some(requests);
                kept.save_verified(driver.dev, &release);
                driver.offer_verified_owned(
                    &release,
                    vec![
                        SourceInfo::new(REMOTE, SourceKind::Requests, SourceClass::Wan, name)
                            .with_limits(limits),
                    ],
                    reboot,
                )?;
                driver.pump()?;
            }
            Source::Store { dir, release } => {
                let store = ChunkStore::open(&dir)
                    .with_context(|| format!("cannot open the chunk store {}", dir.display()))?;
                let mut found = store_manifests(&store, &driver.dev.root, wall)?;
                let picked = {
                    let releases: Vec<Candidate<'_>> = found
                        .iter()
                        .map(|r| Candidate {
                            name: &r.name,
                            version: &r.version,
                            device_types: &r.device_types,
                            security_counter: r.security_counter,
                            hash: r.manifest_hash,
                        })
                        .collect();
                    driver
                        .engine
                        .pick_candidate(&releases, release.as_deref())
                        .map_err(|e| anyhow!("the chunk store {} holds {e}", dir.display()))?
                };
                let picked = found.swap_remove(picked);
                drop(found);
                let (release, copied) = driver.dev.copy_picked(&picked, wall)?;
                // The signed manifest is read from the source too.
                driver.source_bytes_read = copied;
                kept.save_verified(driver.dev, &release);
                driver.chunk_store = Some((store, Arc::clone(&release)));
                driver.offer_verified_owned(
                    &release,
                    vec![
                        SourceInfo::new(
                            STORE,
                            SourceKind::Requests,
                            SourceClass::Local,
                            dir.display().to_string(),
                        )
                        .with_limits(STORE_LIMITS),
                    ],
                    reboot,
                )?;
            }
        }
        let report = driver.finish_install()?;
        if let Some(hash) = kept.installed() {
            // The running release's and the new one's: a rollback keeps running
            // the former, a commit the latter.
            let keep: Vec<[u8; 32]> = std::iter::once(hash)
                .chain(running_hash)
                .chain(kept.base)
                .collect();
            if let Err(e) = KeptManifests::prune(&data_dir, &keep) {
                tracing::warn!(error = %crate::cmd::one_line(&e), "cannot prune the kept manifests");
            }
        }
        Ok(report)
    }

    /// At boot: in a trial boot, runs the health checks and commits or rolls back
    /// (and reboots); after a failed trial, records the rollback.
    pub fn boot_check(&mut self) -> anyhow::Result<BootCheck> {
        let mut engine = self.engine()?;
        let info = self.boot_info()?;
        let phase = engine.status().deployment.map(|d| d.phase);
        engine.boot(shoal_engine::Instant::default(), info);
        let mut progress = |_| {};
        let mut driver = Driver::new(self, engine, &mut progress);
        driver.drain()?;
        driver.reboot_if_asked()?;
        for e in &driver.events {
            match e {
                Event::Committed { release, slot } => {
                    return Ok(BootCheck::Committed {
                        release: release.to_string(),
                        slot: *slot,
                    });
                }
                Event::RolledBack {
                    release,
                    slot,
                    reason,
                } => {
                    return Ok(BootCheck::RolledBack {
                        release: release.to_string(),
                        slot: *slot,
                        reason: reason.clone(),
                    });
                }
                Event::TrialPending { slot } => return Ok(BootCheck::TrialPending { slot: *slot }),
                Event::Failed(err) => bail!("{err}"),
                _ => {}
            }
        }
        Ok(match phase {
            Some(Phase::Fetching | Phase::Verified) => BootCheck::InstallUnfinished,
            _ => BootCheck::Nothing,
        })
    }

    /// Commits the running trial boot.
    pub fn commit(&mut self) -> anyhow::Result<BootCheck> {
        let mut engine = self.engine()?;
        let info = self.boot_info()?;
        // The engine records a trial boot the boot check has not seen yet.
        engine
            .commit_running(shoal_engine::Instant::default(), info)
            .map_err(|e| anyhow!(e))?;
        let mut progress = |_| {};
        let mut driver = Driver::new(self, engine, &mut progress);
        driver.drain()?;
        for e in &driver.events {
            if let Event::Committed { release, slot } = e {
                return Ok(BootCheck::Committed {
                    release: release.to_string(),
                    slot: *slot,
                });
            }
        }
        match driver.events.iter().find_map(|e| match e {
            Event::Failed(err) => Some(err.to_string()),
            _ => None,
        }) {
            Some(err) => bail!("the commit did not complete: {err}"),
            None => bail!("the commit did not complete"),
        }
    }

    /// Rolls back the deployment in progress (rebooting when in a trial boot).
    pub fn rollback(&mut self, reason: &str) -> anyhow::Result<BootCheck> {
        let mut engine = self.engine()?;
        engine
            .rollback(shoal_engine::Instant::default(), reason)
            .map_err(|e| anyhow!(e))?;
        let mut progress = |_| {};
        let mut driver = Driver::new(self, engine, &mut progress);
        driver.drain()?;
        driver.reboot_if_asked()?;
        for e in &driver.events {
            if let Event::RolledBack {
                release,
                slot,
                reason,
            } = e
            {
                return Ok(BootCheck::RolledBack {
                    release: release.to_string(),
                    slot: *slot,
                    reason: reason.clone(),
                });
            }
        }
        match driver.events.iter().find_map(|e| match e {
            Event::Failed(err) => Some(err.to_string()),
            _ => None,
        }) {
            Some(err) => bail!("the rollback did not complete: {err}"),
            None => bail!("the rollback did not complete"),
        }
    }
}

/// The signed manifests of the releases in this device's slots, kept in
/// `DATA_DIR/manifests/<hash>.envelope` (written whole, then renamed): a thin
/// artifact's manifest may travel as a delta against the running release's
/// ([`shoal_artifact::manifest_delta`]), and the LAN serves the running release.
/// A kept file is only a reference: a manifest rebuilt against it is verified whole.
pub struct KeptManifests {
    data_dir: PathBuf,
}

impl KeptManifests {
    /// The manifests kept under `data_dir`.
    pub fn new(data_dir: &Path) -> KeptManifests {
        KeptManifests {
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// The directory of the manifests kept under `data_dir` (and of their ids and
    /// dictionaries).
    fn dir(data_dir: &Path) -> PathBuf {
        crate::lan::serve::manifests_dir(data_dir)
    }

    /// The file of the kept manifest hashing to `hash`.
    fn envelope_path(data_dir: &Path, hash: &[u8; 32]) -> PathBuf {
        crate::lan::serve::envelope_path(data_dir, &crate::lan::proto::ManifestId(*hash))
    }

    /// Whether a manifest hashing to `hash` is kept (its file is there; its bytes
    /// are checked when it is read).
    pub fn holds(data_dir: &Path, hash: &[u8; 32]) -> bool {
        KeptManifests::envelope_path(data_dir, hash).is_file()
    }

    /// Keeps `envelope` (whose manifest hashes to `hash`).
    pub fn save(data_dir: &Path, hash: &[u8; 32], envelope: &[u8]) -> anyhow::Result<()> {
        let id = crate::lan::proto::ManifestId(*hash);
        crate::lan::serve::save_envelope(data_dir, &id, envelope)
    }

    /// Where the dictionary of the release whose manifest hashes to `hash` is kept.
    pub fn dictionary_path(data_dir: &Path, hash: &[u8; 32]) -> PathBuf {
        KeptManifests::dir(data_dir).join(format!("{}.dictionary", hex::encode(hash)))
    }

    /// Keeps the zstd dictionary the chunks of the release `hash` were compressed
    /// with (written whole, then renamed): a thin artifact of a later release may
    /// reuse it instead of carrying it.
    pub fn save_dictionary(
        data_dir: &Path,
        hash: &[u8; 32],
        dictionary: &shoal_artifact::chunk::Dictionary,
    ) -> anyhow::Result<()> {
        let path = KeptManifests::dictionary_path(data_dir, hash);
        let dir = path.parent().expect("has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = path.with_extension("dictionary-new");
        std::fs::write(&tmp, dictionary.bytes())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// The dictionary kept with the release `hash`, if any and well formed (the
    /// reader checks it against the hash the new manifest names).
    pub fn dictionary(
        data_dir: &Path,
        hash: &[u8; 32],
    ) -> Option<shoal_artifact::chunk::Dictionary> {
        let path = KeptManifests::dictionary_path(data_dir, hash);
        let file = std::fs::File::open(&path).ok()?;
        let mut bytes = Vec::new();
        file.take(shoal_artifact::chunk::DICTIONARY_SIZE_MAX as u64 + 1)
            .read_to_end(&mut bytes)
            .ok()?;
        shoal_artifact::chunk::Dictionary::from_bytes(bytes).ok()
    }

    /// The kept envelope of the release whose manifest hashes to `hash`, verified
    /// against `root` from its file without holding it
    /// ([`VerifiedRelease::verify_file`](shoal_engine::VerifiedRelease::verify_file)):
    /// its chunk ids go to `<hash>.ids` beside it (checked against the manifest's
    /// by every call and written again only where they differ, pruned with the
    /// envelope) and are read from there by position. The file is read once
    /// (signatures and manifest), not hashed whole besides: it is named after the
    /// manifest, checked after. With the release, the file it was verified from
    /// (its path, the open file, its length): what is served of it is read from
    /// that handle, not from a file renamed over the path since. `None` when no
    /// envelope of `hash` is kept; an error when it does not verify or is
    /// another release's.
    #[allow(clippy::type_complexity)]
    pub fn verify(
        data_dir: &Path,
        root: &TrustRoot,
        hash: &[u8; 32],
        wall_unix_s: Option<u64>,
    ) -> anyhow::Result<
        Option<(
            Arc<shoal_engine::VerifiedRelease>,
            (PathBuf, std::fs::File, u64),
        )>,
    > {
        let dir = KeptManifests::dir(data_dir);
        let name = hex::encode(hash);
        let path = KeptManifests::envelope_path(data_dir, hash);
        let Some((file, len)) =
            open_with_len(&path).with_context(|| format!("cannot read {}", path.display()))?
        else {
            return Ok(None);
        };
        // The ids of an earlier verification are kept when the manifest's match
        // them (read, not written again: 13.8 MB at 8 GiB, at each start).
        let ids = chunk_ids::IdsWriter::reuse_or_create(dir.join(format!("{name}.ids")))
            .with_context(|| format!("cannot write the chunk ids of {}", path.display()))?;
        // Named after the manifest, not the file's bytes: checked below.
        let release = shoal_engine::VerifiedRelease::verify_unnamed_file(
            root,
            &file,
            len,
            wall_unix_s,
            Box::new(ids),
        )
        .map_err(|e| anyhow!(e).context(format!("{} does not verify", path.display())))?;
        if release.release().manifest_hash != *hash {
            bail!("{} is not the manifest it is named after", path.display());
        }
        Ok(Some((release, (path, file, len))))
    }

    /// Drops every kept manifest (and dictionary) not in `keep`: a device holds the
    /// manifests of its two slots (and of a thin artifact's base).
    pub fn prune(data_dir: &Path, keep: &[[u8; 32]]) -> anyhow::Result<()> {
        let dir = KeptManifests::dir(data_dir);
        let names: HashSet<String> = keep
            .iter()
            .flat_map(|h| {
                let h = hex::encode(h);
                // A kept release's `.ids.tmp` may be being written (its next
                // verification rewrites it; it goes with the release).
                [
                    format!("{h}.envelope"),
                    format!("{h}.dictionary"),
                    format!("{h}.ids"),
                    format!("{h}.ids.tmp"),
                ]
            })
            .collect();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // `.ids.tmp`: ids a verification killed midway was writing.
            if (name.ends_with(".envelope")
                || name.ends_with(".dictionary")
                || name.ends_with(".ids")
                || name.ends_with(".ids.tmp"))
                && !names.contains(&name)
            {
                let path = entry.path();
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
        Ok(())
    }
}

impl shoal_artifact::HeldManifests for KeptManifests {
    fn manifest(&self, hash: &[u8; 32]) -> Option<Vec<u8>> {
        let path = KeptManifests::envelope_path(&self.data_dir, hash);
        let file = std::fs::File::open(&path).ok()?;
        let mut bytes = Vec::new();
        file.take(shoal_signing::ENVELOPE_SIZE_MAX as u64 + 1)
            .read_to_end(&mut bytes)
            .ok()?;
        let envelope = shoal_signing::Envelope::from_bytes(&bytes).ok()?;
        (blake3::hash(&envelope.signed).as_bytes() == hash).then_some(envelope.signed)
    }
}

/// `path` opened for reading, and its length; `None` if there is no such file.
fn open_with_len(path: &Path) -> io::Result<Option<(std::fs::File, u64)>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    Ok(Some((file, len)))
}

/// The manifest of the release an install writes, kept from when it is read; an
/// install that ends in an error (a refused offer, say) drops it again, unless it is
/// the running release's or the base's.
struct NewManifest {
    data_dir: PathBuf,
    hash: Option<[u8; 32]>,
    running: Option<[u8; 32]>,
    base: Option<[u8; 32]>,
    installed: bool,
}

impl NewManifest {
    /// Keeps `envelope` (whose manifest hashes to `hash`); an install goes on
    /// without it, with a warning, when it cannot be written.
    fn save(&mut self, hash: [u8; 32], envelope: &[u8]) {
        let kept = KeptManifests::save(&self.data_dir, &hash, envelope);
        self.kept(hash, kept);
    }

    /// Keeps the envelope of `release` as verified: from the device store's file
    /// (copied, not read into memory), or the bytes it holds.
    fn save_verified(&mut self, dev: &Device, release: &shoal_engine::VerifiedRelease) {
        let hash = release.release().manifest_hash;
        match (release.envelope(), release.stored_hash()) {
            (Some(envelope), _) => self.save(hash, &envelope),
            (None, Some(stored)) => match dev.store.open_stored_envelope(&stored) {
                Ok((file, _)) => self.save_file(hash, &file),
                Err(e) => self.kept(
                    hash,
                    Err(anyhow!(e).context("cannot read back the signed manifest")),
                ),
            },
            (None, None) => {}
        }
    }

    /// [`NewManifest::save`] of an envelope in a file (the store's: copied, not
    /// read into memory).
    fn save_file(&mut self, hash: [u8; 32], envelope: &std::fs::File) {
        use std::io::Seek as _;
        let id = crate::lan::proto::ManifestId(hash);
        // From its first byte, wherever the checks before left the file's offset.
        let mut envelope = envelope;
        let kept = envelope
            .rewind()
            .context("cannot read back the signed manifest")
            .and_then(|()| crate::lan::serve::save_envelope(&self.data_dir, &id, envelope));
        self.kept(hash, kept);
    }

    fn kept(&mut self, hash: [u8; 32], kept: anyhow::Result<()>) {
        match kept {
            Ok(()) => self.hash = Some(hash),
            Err(e) => {
                tracing::warn!(error = %crate::cmd::one_line(&e), "cannot keep the release's manifest");
            }
        }
    }

    /// Keeps the release's dictionary beside its manifest (dropped with it); an
    /// install goes on without it, with a warning, when it cannot be written.
    fn save_dictionary(&mut self, hash: [u8; 32], d: &shoal_artifact::chunk::Dictionary) {
        if let Err(e) = KeptManifests::save_dictionary(&self.data_dir, &hash, d) {
            tracing::warn!(error = %crate::cmd::one_line(&e), "cannot keep the release's dictionary");
        }
    }

    /// The install went through: the manifest stays; its hash.
    fn installed(&mut self) -> Option<[u8; 32]> {
        self.installed = true;
        self.hash
    }
}

impl Drop for NewManifest {
    fn drop(&mut self) {
        if let Some(hash) = self.hash
            && !self.installed
            && Some(hash) != self.running
            && Some(hash) != self.base
        {
            let _ = std::fs::remove_file(KeptManifests::envelope_path(&self.data_dir, &hash));
            let _ = std::fs::remove_file(KeptManifests::dictionary_path(&self.data_dir, &hash));
        }
    }
}

/// The engine's configuration for this device.
fn engine_config(device: &Config, root: &TrustRoot) -> shoal_engine::Config {
    let mut config = shoal_engine::Config::new(device.device.device_type.clone(), root.clone());
    config.provides = device.device.provides.clone();
    // `[network]`: enforced by the engine on WAN sources (the daemon's server).
    config.wan_rate_bytes_per_s = device.network.rate_limit_kib_s.map(|k| k * 1024);
    config.wan_budget_bytes = device
        .network
        .budget_per_deployment_mib
        .map(|m| m * 1024 * 1024);
    config.journal_batch_bytes = device.install.journal_batch_mib * 1024 * 1024;
    // A source's first answer may wait for a busy uplink (a site's devices all
    // start a deployment at once): a request declared silent is cancelled and
    // asked again, and what was in flight crossed the WAN for nothing. The HTTP
    // client and LAN requests bound every wait themselves (IO_TIMEOUT,
    // lan.request_timeout_s); later silences use the measured round trip.
    config.retry.rto_initial = Duration::from_secs(10);
    // `[lan]`: how long a swarm member may announce nothing before its chunks move.
    config.lan_timeout = Duration::from_secs(device.lan.owner_timeout_s);
    // Local sources answer at once: a few requests in flight keep the queue of
    // chunks waiting to be written (and so memory) small.
    config.reads_in_flight_max = 2;
    config
}

/// The trust root (checked as at every start), boot control and slot capacities.
fn open_parts(
    config: &Config,
    writable: bool,
) -> anyhow::Result<(SignedRoot, BootControl, [u64; 2])> {
    let signed = SignedRoot::load(&config.device.trust_root).map_err(|e| {
        Exit::usage(format!(
            "device.trust_root {}: {}",
            config.device.trust_root.display(),
            chain(&e)
        ))
    })?;
    signed
        .verify_self(None)
        .map_err(|e| Exit::usage(format!("device.trust_root is not validly self-signed: {e}")))?;
    let boot = shoal_bootctl::config::build(&config.slots, &config.bootloader, writable)
        .map_err(|e| Exit::usage(format!("[slots]/[bootloader]: {}", chain(&e))))?;
    let mut capacity = [0u64; 2];
    for slot in Slot::ALL {
        let s = boot.open_reader(slot).with_context(|| {
            format!("cannot open slot {slot} ({})", boot.slots().describe(slot))
        })?;
        capacity[slot_ordinal(slot)] = s
            .len()
            .with_context(|| format!("cannot measure slot {slot}"))?;
    }
    Ok((signed, boot, capacity))
}

/// The running slot `active` of the device `config` describes, as the source of the
/// reference bytes per-base delta-encoded chunks from the server are decoded with
/// (the daemon's fetcher, [`crate::daemon`]); `base` names the release it runs, for
/// messages. Opened read-only.
pub(crate) fn running_references(
    config: &Config,
    active: Slot,
    base: String,
) -> anyhow::Result<References> {
    let boot = shoal_bootctl::config::build(&config.slots, &config.bootloader, false)
        .map_err(|e| Exit::usage(format!("[slots]/[bootloader]: {}", chain(&e))))?;
    References::open(&boot, active, base)
}

/// The file of the device store holding the signed envelope of a release
/// verified from it ([`Device::verify_envelope`]) while a deployment of it is in
/// progress; `None` for a release that holds its envelope in memory.
pub fn stored_envelope_path(
    config: &Config,
    release: &shoal_engine::VerifiedRelease,
) -> Option<PathBuf> {
    Some(store::envelope_file(
        &config.device.data_dir,
        &release.stored_hash()?,
    ))
}

/// The engine's status and the bootloader's, read without writing or creating
/// anything (`shoal status`): the environment is opened read-only, the store only if
/// it exists, and a device Shoal has not run on yet is shown as it would start.
pub fn read_status(config: &Config) -> anyhow::Result<(Status, shoal_bootctl::Status)> {
    let (signed, boot, capacity) = open_parts(config, false)?;
    let boot_status = boot.status().context("cannot read the boot state")?;
    let active = boot_status.active;
    let store = Store::open_read_only(&config.device.data_dir).map_err(|e| match e {
        store::StoreError::Busy { .. } => Exit::tempfail(e.to_string()),
        other => anyhow!(other),
    })?;
    let state = match store {
        Some(store) if !store.is_fresh()? => store.load(active, capacity)?,
        _ => shoal_engine::DeviceState::fresh(active, capacity),
    };
    let engine = Engine::new(engine_config(config, &signed.root), state);
    Ok((engine.status(), boot_status))
}

const STREAM: SourceId = SourceId(1);
const STORE: SourceId = SourceId(2);
const REMOTE: SourceId = SourceId(3);
/// A chunk store on this device answers at once: one small request at a time keeps
/// the queue of chunks waiting to be written (and so memory) small.
const STORE_LIMITS: SourceLimits = SourceLimits {
    requests_max: 1,
    request_bytes_max: 512 * 1024,
    request_chunks_max: 8,
};

fn artifact_error(name: &str, e: ReadError) -> anyhow::Error {
    match e {
        ReadError::Io(io) => Exit::tempfail(format!("reading {name}: {io}; safe to retry")),
        // The caller's context names the artifact; the reader's messages carry their
        // cause inline.
        other => anyhow!(other),
    }
}

/// The releases of a chunk store, each read from its envelope file as its
/// signed manifest describes it ([`ChunkStore::release_head`]: signatures checked
/// against `root` as the file is read, the manifest decoded with its chunk list
/// streamed past, neither held), sorted by name and version; which one to install
/// is the engine's choice ([`Engine::pick_candidate`]). A store manifest that
/// does not verify stops the install with its error, as before.
fn store_manifests(
    store: &ChunkStore,
    root: &TrustRoot,
    wall: Option<u64>,
) -> anyhow::Result<Vec<shoal_artifact::ReleaseHead>> {
    let dir = store.dir().join("manifests");
    let entries = std::fs::read_dir(&dir).with_context(|| {
        format!(
            "{} is not a chunk store (no manifests/ directory)",
            store.dir().display()
        )
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("envelope") {
            paths.push(path);
        }
    }
    // Directory order is the file system's: read (and reported) by file name.
    paths.sort();
    let mut found = Vec::with_capacity(paths.len());
    for path in paths {
        found.push(
            store
                .release_head(&path, root, wall)
                .map_err(|e| anyhow!("{}", chain(&e)))?,
        );
    }
    // The engine sees them by name.
    found.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
    Ok(found)
}

/// A chunk of an artifact, decoded and verified, or why not.
type Decoded = (ChunkId, Result<shoal_artifact::VerifiedChunk, String>);

/// A chunk read from an artifact, with the checked base bytes it is encoded
/// against when it is delta-encoded.
type Undecoded = (shoal_artifact::RawChunk, Option<ReferenceBytes>);
/// A batch whose references were read, or why one could not be.
type Resolved = Result<Vec<Undecoded>, String>;

/// Reads (or finds in `references`' cache) the reference of each delta-encoded
/// chunk of a batch. `Err` names the first chunk whose reference cannot be read:
/// nothing of the batch is handed over then.
fn resolve(
    raws: Vec<shoal_artifact::RawChunk>,
    mut references: Option<&mut References>,
) -> Result<Vec<Undecoded>, String> {
    if let Some(refs) = references.as_deref_mut() {
        refs.batch(raws.iter().filter_map(|r| r.reference().map(|r| &**r)));
    }
    let mut undecoded = Vec::with_capacity(raws.len());
    for raw in raws {
        let reference = match (raw.reference(), references.as_deref_mut()) {
            (Some(r), Some(refs)) => Some(
                refs.get(r)
                    .map_err(|e| format!("chunk {}: {e:#}", raw.chunk.id))?,
            ),
            _ => None,
        };
        undecoded.push((raw, reference));
    }
    Ok(undecoded)
}

/// Chunks of an artifact read for [`Driver::stream`]: up to `DECODE_BATCH_BYTES`
/// of chunks (decoded and stored sizes) or `REFERENCE_BATCH_BYTES` of distinct
/// references, whichever comes first.
struct ReadBatch {
    raws: Vec<shoal_artifact::RawChunk>,
    /// What the batch holds in memory until it is decoded: its stored chunks, and
    /// its distinct references once read.
    held: usize,
    /// Why the archive could not be read past the batch's chunks.
    failure: Option<ReadError>,
    /// The end of the archive was read (and checked).
    ended: bool,
}

/// Reads the next batch of the chunks of `artifact` that `wants` takes. Each
/// distinct reference of a batch is read (or found in the cache) once, however
/// many of its chunks the batch holds.
fn read_batch<R: shoal_artifact::read::Skip>(
    artifact: &mut ArtifactReader<R>,
    mut wants: impl FnMut(&ChunkId) -> bool,
) -> ReadBatch {
    let mut batch = ReadBatch {
        raws: Vec::new(),
        held: 0,
        failure: None,
        ended: false,
    };
    let mut bytes = 0usize;
    let mut references: HashSet<[u8; 32]> = HashSet::new();
    let mut reference_bytes = 0usize;
    while bytes < DECODE_BATCH_BYTES && reference_bytes < REFERENCE_BATCH_BYTES {
        match artifact.next_wanted(&mut wants) {
            Ok(Some(raw)) => {
                bytes += raw.chunk.size as usize + raw.stored().len();
                batch.held += raw.stored().len();
                if let Some(r) = raw.reference()
                    && references.insert(r.hash)
                {
                    reference_bytes += usize::try_from(r.len()).unwrap_or(usize::MAX);
                }
                batch.raws.push(raw);
            }
            Ok(None) => {
                batch.ended = true;
                break;
            }
            Err(e) => {
                batch.failure = Some(e);
                break;
            }
        }
    }
    batch.held = batch.held.saturating_add(reference_bytes);
    batch
}

/// Decodes a batch whose references were read ([`resolve`]) with [`decode`], which
/// checks each reference's hash (once, on the decoding threads) before decoding
/// with it. `Err` names the first chunk whose reference fails its hash (the
/// running slot, `running`: (slot, base release), is not the base release there):
/// nothing of the batch is handed over then.
fn decode_resolved(
    undecoded: &[Undecoded],
    running: &(String, String),
) -> Result<Vec<Decoded>, String> {
    let decoded = decode(undecoded);
    let mut out = Vec::with_capacity(decoded.len());
    for ((raw, _), (id, result)) in undecoded.iter().zip(decoded) {
        match result {
            Err(ChunkError::BadReference { source, .. }) => {
                return Err(wrong_base(raw, &source, running));
            }
            other => out.push((id, other.map_err(|e| e.to_string()))),
        }
    }
    Ok(out)
}

/// Checks the hash of each reference of a batch whose references were read,
/// without decoding anything (what [`decode_resolved`] would say of them): `Err`
/// names the first chunk whose reference fails.
fn check_references(undecoded: &[Undecoded], running: &(String, String)) -> Result<(), String> {
    for (raw, reference) in undecoded {
        if let Some(Err(source)) = reference.as_ref().map(ReferenceBytes::check) {
            return Err(wrong_base(raw, &source, running));
        }
    }
    Ok(())
}

/// The message of a chunk whose reference bytes, read from the running slot
/// `running` ((slot, base release)), fail their hash.
fn wrong_base(
    raw: &shoal_artifact::RawChunk,
    source: &shoal_artifact::ReferenceError,
    running: &(String, String),
) -> String {
    let (slot, base) = running;
    let id = raw.chunk.id;
    let ranges = raw.reference().map_or_else(String::new, |r| r.describe());
    format!(
        "chunk {id}: the reference bytes {ranges} of the running slot {slot} fail their hash ({source}): the slot does not hold the base release {base} there; install a full artifact instead"
    )
}

/// The chunk list of the root file system payload of the release whose kept
/// manifest hashes to `hash`, when a slot index cut with `chunking` over `len`
/// bytes can take it as the slot's first chunks (same chunking, payload within
/// `len`), read by position, not decoded as a list: the kept envelope is read
/// from its file (its signed bytes must hash to `hash`), the manifest decoded
/// as it is read with its chunk list streamed out ([`Manifest::from_file_streaming`]:
/// every check of a manifest's fields and sizes), the sizes kept (4 bytes a
/// chunk), the ids checked against (or written to) the kept manifest's own
/// `<hash>.ids` beside it ([`chunk_ids::IdsWriter::reuse_or_create`]: nothing
/// written when `KeptManifests::verify` wrote them already) and read from there
/// in blocks ([`Expected::chunks`]). Its signatures are not checked: nothing of
/// it is trusted, the index hashes every chunk it lists. `None` (the slot is cut
/// by content) when it is not kept, cannot be read (warned, with the error), or
/// does not fit.
fn expected_chunks(
    data_dir: &Path,
    hash: &[u8; 32],
    chunking: shoal_artifact::Chunking,
    len: u64,
) -> Option<Expected> {
    use std::os::unix::fs::FileExt as _;
    let dir = KeptManifests::dir(data_dir);
    let name = hex::encode(hash);
    let path = KeptManifests::envelope_path(data_dir, hash);
    // A kept manifest that cannot be read is said so (the slot is then cut by
    // content, as when none is kept): not silently.
    let unreadable = |e: &dyn std::fmt::Display| -> Option<Expected> {
        warn!(path = %path.display(), error = %e, "the kept manifest cannot be read: the running slot is indexed by content");
        None
    };
    let (file, file_len) = match open_with_len(&path) {
        Ok(Some(opened)) => opened,
        Ok(None) => return None,
        Err(e) => return unreadable(&e),
    };
    let layout = match shoal_signing::EnvelopeLayout::locate(file_len, &mut |at, buf| {
        file.read_exact_at(buf, at)
    }) {
        Ok(Some(layout)) => layout,
        Ok(None) => return unreadable(&"not a canonical envelope"),
        Err(e) => return unreadable(&e),
    };
    // The ids to the kept manifest's own `<hash>.ids` (checked, not written
    // again, when it holds them already: `KeptManifests::verify` wrote it).
    let ids = match chunk_ids::IdsWriter::reuse_or_create(dir.join(format!("{name}.ids"))) {
        Ok(ids) => ExpectedIds(Box::new(ids)),
        Err(e) => return unreadable(&e),
    };
    let decoded =
        Manifest::from_file_streaming(&file, layout.signed_at, layout.signed_len, hash, ids);
    let (mut streamed, ExpectedIds(ids)) = match decoded {
        Ok(d) => d,
        Err(e) => return unreadable(&e),
    };
    let manifest = streamed.manifest();
    // The list streamed is the first payload's: the release's only one. A
    // list that does not fit the slot is no error: the slot is cut by content.
    let payload = match &manifest.payloads[..] {
        [p] if p.kind == shoal_artifact::PayloadKind::RootfsImage => p.size,
        _ => return None,
    };
    if manifest.chunking != chunking {
        return None;
    }
    let sizes = std::mem::take(&mut streamed.sizes.sizes);
    drop(streamed);
    let total: u64 = sizes.iter().map(|&s| u64::from(s)).sum();
    if total != payload || total > len {
        return None;
    }
    let ids = match shoal_engine::ChunkIdWriter::finish(ids) {
        Ok(ids) => ids,
        Err(e) => return unreadable(&e),
    };
    Some(Expected {
        sizes,
        ids,
        error: std::sync::Mutex::new(None),
    })
}

/// The kept manifest's ids, to its `<hash>.ids` as they are decoded.
struct ExpectedIds(Box<chunk_ids::IdsWriter>);

impl shoal_artifact::ChunkIdSink for ExpectedIds {
    fn push(&mut self, id: &ChunkId) -> Result<(), String> {
        shoal_engine::ChunkIdWriter::push(&mut *self.0, id)
    }
}

/// The chunk list of the release a slot should hold ([`expected_chunks`]): the
/// sizes in memory, the ids in the kept manifest's `<hash>.ids`, read by
/// position.
struct Expected {
    sizes: Vec<u32>,
    ids: Arc<dyn shoal_engine::ChunkIdFile>,
    /// The first error reading the ids ([`Expected::read_error`]).
    error: std::sync::Mutex<Option<String>>,
}

impl Expected {
    /// Ids read at a time (8 KiB).
    const BLOCK: usize = 256;

    /// `(id, size)` by position, the ids read a block at a time. An id that
    /// cannot be read is all zeros, which no chunk hashes to, and the error is
    /// kept ([`Expected::read_error`], warned once): what a zero id was
    /// compared with says nothing, so a caller asks.
    fn chunks(&self) -> impl Iterator<Item = (ChunkId, u32)> + '_ {
        let mut block = vec![ChunkId([0; 32]); Self::BLOCK];
        self.sizes.iter().enumerate().map(move |(pos, &size)| {
            let at = pos % Self::BLOCK;
            if at == 0 {
                let n = (self.sizes.len() - pos).min(Self::BLOCK);
                if let Err(e) = self.ids.read_ids(pos as u32, &mut block[..n]) {
                    block.fill(ChunkId([0; 32]));
                    let mut first = self.error.lock().unwrap_or_else(|p| p.into_inner());
                    if first.is_none() {
                        let e = format!("cannot read {}: {e}", self.ids.describe());
                        warn!(error = %e, "cannot read the kept manifest's ids: the running slot is indexed by content");
                        *first = Some(e);
                    }
                }
            }
            (block[at], size)
        })
    }

    /// The first error reading the ids, if any: then the chunks read were not
    /// the list's, and the slot is to be cut by content.
    fn read_error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Indexes `slot` (`storage`, its first `len` bytes) along the chunk list of
/// the release it should hold, `expected`, for an install that takes nothing
/// while indexing (a thin artifact): only the chunks `wanted` gives a key are
/// read and hashed, a sample of them ([`ALONG_SAMPLE`]), where the list puts
/// them, and only their entries are written to the store (`partial`). When the
/// slot does not hold that release, or the list's ids cannot be read (on any
/// of its passes), the slot is cut by content instead and the whole index
/// written. Returns the entries written, whether the index is partial, and how
/// many chunks were sampled.
fn index_along_kept(
    store: &Store,
    slot: Slot,
    storage: &dyn Storage,
    len: u64,
    chunking: shoal_artifact::Chunking,
    expected: &Expected,
    wanted: &(dyn Fn(&ChunkId) -> Option<u32> + Sync),
) -> anyhow::Result<(u64, bool, usize)> {
    let checked = slotio::check_along(
        storage,
        len,
        || expected.chunks(),
        wanted,
        Some(ALONG_SAMPLE),
    )?;
    let held = match checked {
        // Ids that could not be read were zeros (warned by
        // `Expected::chunks`): what was held is not known.
        _ if expected.read_error().is_some() => None,
        slotio::Along::Held(positions) => Some((positions, 0)),
        slotio::Along::Sampled { positions, checked } => Some((positions, checked)),
        slotio::Along::Differs { offset, expected } => {
            tracing::debug!(
                offset,
                %expected,
                "the running slot does not hold its expected release: indexing it by content"
            );
            None
        }
    };
    let record = |chunks: &mut dyn Iterator<Item = (u64, ChunkId, u32)>| {
        store
            .write_slot_index_from(slot, chunks)
            .with_context(|| format!("cannot record the index of slot {slot}"))
    };
    // The held chunks' index entries, written as they are read
    // along the kept list (its ids read by position again).
    let along = match held {
        Some((positions, sampled)) => {
            let written = record(&mut slotio::at_positions(expected.chunks(), &positions))?;
            // An id that could not be read now was a zero in the
            // index: not the list, so cut by content after all.
            expected
                .read_error()
                .is_none()
                .then_some((written, sampled))
        }
        None => None,
    };
    // Not the release expected (or not known): cut by content,
    // which finds what the slot shares with the new release
    // wherever it lies.
    let (written, partial, sampled) = match along {
        Some((written, sampled)) => (written, true, sampled),
        None => {
            let chunks = slotio::list_chunks(storage, len, chunking, slotio::Repeats::Once)?;
            (record(&mut chunks.into_iter())?, false, 0)
        }
    };
    Ok((written, partial, sampled))
}

/// The thread cutting the active slot during an install, and the flag that stops
/// it: dropped before [`StopCut::join`] (the handover to the engine failed), it
/// stops the cut and waits for the thread to end.
struct StopCut<T> {
    stop: Arc<std::sync::atomic::AtomicBool>,
    worker: Option<std::thread::JoinHandle<T>>,
}

impl<T> StopCut<T> {
    /// What the cut returned.
    fn join(&mut self) -> T {
        let worker = self.worker.take().expect("joined once");
        worker.join().expect("the indexing thread panicked")
    }
}

impl<T> Drop for StopCut<T> {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.stop.store(true, std::sync::atomic::Ordering::Release);
            // Its result (or its panic) says nothing the install needs now.
            let _ = worker.join();
        }
    }
}

/// Whether a slot index made along `expected` (see [`slotio::index_along`]) found
/// every chunk of it: each listed at its offset with its id, or left out as the
/// repeat of the chunk before it (a run of one chunk is listed once).
fn holds_chunks(
    index: &[(u64, ChunkId, u32)],
    expected: impl IntoIterator<Item = (ChunkId, u32)>,
) -> bool {
    let mut listed = index.iter().peekable();
    let mut offset = 0u64;
    let mut last: Option<ChunkId> = None;
    for (c_id, c_size) in expected {
        match listed.peek() {
            Some(&&(at, id, len)) if at == offset => {
                if id != c_id || len != c_size {
                    return false;
                }
                listed.next();
            }
            _ if last == Some(c_id) => {}
            _ => return false,
        }
        last = Some(c_id);
        offset += u64::from(c_size);
    }
    true
}

/// Decodes and hashes chunks on all cores (each exactly once: the engine does not
/// hash [`shoal_artifact::VerifiedChunk`]s again).
fn decode(raws: &[Undecoded]) -> Vec<(ChunkId, Result<shoal_artifact::VerifiedChunk, ChunkError>)> {
    raws.par_iter()
        .map(|(r, reference)| {
            let verified = match reference {
                Some(bytes) => r.verify_against(bytes),
                None => r.verify_chunk(),
            };
            (r.chunk.id, verified)
        })
        .collect()
}

/// Bytes of the distinct references a batch's delta-encoded chunks need (each
/// counted once however many chunks share it): with [`DECODE_BATCH_BYTES`] of
/// chunks, bounds a batch. Counting them apart from the chunks keeps batches of
/// delta-encoded chunks as large as others (a reference is several times its
/// chunk), so the decoding worker is handed a few large batches, not many small.
/// When the stream's pipeline held the references of two batches (one being read,
/// one being decoded; session 10), 1 MiB each, not 2, took the bench's delta
/// install from a peak RSS of 28.8-31.0 MiB to 27.9-28.6 MiB (goal 32 MiB; 25.3-25.5
/// MiB before the pipeline), at the same speed. Since session 14 up to
/// [`REFERENCE_BATCHES_AHEAD`] batches are read ahead of the one being decoded.
const REFERENCE_BATCH_BYTES: usize = 1024 * 1024;

/// How far the reference reader of [`Driver::stream`] runs ahead of the decoding:
/// batches handed to it and not decoded yet, and the bytes they hold (stored
/// chunks and distinct references). The bytes are checked before a batch is read,
/// so the last one may go past them by a whole batch: at worst ~6 MiB in flight
/// (a batch's references reach 1 MiB plus one reference of up to 2 MiB), on the
/// bench's v1 → v2 about 2-3 MiB, most of it shared with the 2 MiB reference
/// cache. Read in lockstep (one batch ahead), a batch whose references took long
/// to read held up the writing of the one before, and one that took long to write
/// held up the reading: on the bench's v1 → v2 the main thread waited 150-200 ms
/// for the reader. Medians of 9 alternating runs (session 14, the full install
/// 0.66 s in the same minutes): one batch ahead 0.87 s; 3 batches / 2 MiB 0.81 s,
/// peak 31.2 MiB; 4 / 3 MiB 0.77 s but 31.8 MiB, too near the 32 MiB goal. Since
/// session 15 most references come from the copy's blocks ([`slotio::Recent`]);
/// 1 MiB ahead put the reading back in lockstep (the main thread waited 200-290 ms
/// for it, 40 ms at 2 MiB). Medians of 11 alternating runs (session 15, the full
/// install 0.80 s): 1 MiB 0.86 s, peak 31.1 MiB; 2 MiB 0.80 s, 31.7 MiB; 2 MiB
/// without the block the copy keeps behind 0.85 s, 31.2 MiB. Two batches ahead
/// (not three) within the 2 MiB are as fast (0.79 against 0.81 s, the full install
/// 0.80) and peak lower (31.4 against 32.4 MiB in 11 runs).
const REFERENCE_BATCHES_AHEAD: usize = 2;
const REFERENCES_AHEAD_BYTES: usize = 2 * 1024 * 1024;

/// Total reference bytes kept between batches (references of neighbouring chunks
/// repeat); with the batches in flight this bounds what delta decoding adds to an
/// install's memory (a reference is at most `REFERENCE_LEN_MAX`, 2 MiB). 1 MiB
/// since session 15: a reference assembled again from the copy's blocks costs a
/// copy in memory, not a read.
const REFERENCE_CACHE_BYTES: usize = 1024 * 1024;

/// Blocks of the running slot kept for reference reads (see
/// [`References::read_range`]): their size and how many (so 0.75 MiB, and the
/// 0.5 MiB buffer runs of them are read into; 1.25 and 1 MiB before session 15).
/// On the bench's disk a direct read costs about as much per call as per byte
/// (93 MB of slot A: 0.34-0.43 s in 64 KiB reads, 0.16-0.26 s in 256 KiB reads); a
/// reference is 256 KiB to 2 MiB of neighbouring bytes. A block missing is read
/// together with the missing blocks after it that the same range or the batch's
/// other references need, up to `SLOT_RUN_BLOCKS` in one read; the block given up
/// for a new one is the one whose next use (by the manifest's reference list) is
/// farthest. On the
/// bench's v1 → v2 (669 references, 217 MB of ranges, 78.4 MB distinct): 282 reads
/// of 120 MB instead of 471 reads of 123 MB (6 blocks kept, the least recently
/// used given up, one block a read); 6 blocks kept would read 116 MB in 272 reads
/// for 0.25 MiB more, 8 blocks 110 MB in 257 (a replay of the reads, session 12).
/// Since session 15 the blocks of the copy of kept chunks are looked in first
/// ([`References::fill_block`], [`References::read_range`]): on the bench's v1 → v2
/// 170 MB of the 221 MB of references come from them and 61-63 MB are read (119 MB
/// before), so a run is 2 blocks and 3 are kept: 0.6 MiB less at the peak
/// (median of 11 runs) for the same time.
const SLOT_BLOCK: u64 = 256 * 1024;
const SLOT_BLOCKS_KEPT: usize = 3;
const SLOT_RUN_BLOCKS: u64 = 2;

/// The base-release bytes delta-encoded chunks of an artifact are decoded with, read
/// from the running slot (which holds the base payload from offset 0). Their hash is
/// checked before any chunk is decoded with them, by the decoding threads, once per
/// reference (see [`Reference::read`]).
pub(crate) struct References {
    slot: Slot,
    storage: Box<dyn Storage>,
    /// Recently used references, most recent last.
    cache: std::collections::VecDeque<ReferenceBytes>,
    base: String,
    /// References read so far, their bytes, and the time it took.
    read: (u64, u64, Duration),
    /// Blocks of the running slot read lately (index, bytes), most recent last.
    blocks: std::collections::VecDeque<(u64, Vec<u8>)>,
    /// The running slot's length.
    slot_len: u64,
    /// Bytes read from the running slot for references, the reads, and the time
    /// they took.
    read_slot_bytes: u64,
    read_slot_calls: u64,
    read_io: Duration,
    /// Where the references ahead use each block of the running slot: (block,
    /// the span of `positions` listing the chunks decoded with a reference that
    /// reads it), sorted; from the manifest ([`References::plan`]). One entry a
    /// block a reference reads, not one a chunk: a plan's size follows the
    /// references, plus 4 bytes a delta-encoded chunk. Empty without one: blocks
    /// are then given up least recently used first.
    uses: Vec<(u64, u32, u32)>,
    /// The positions in the payload of the chunks decoded with each reference,
    /// ascending within a reference, the references one after another.
    positions: Vec<u32>,
    /// The position of the chunk whose reference was read last.
    now: u32,
    /// Blocks the references of the batch being read need, sorted
    /// ([`References::batch`]).
    wanted: Vec<u64>,
    /// The buffer a run of blocks is read into (up to `SLOT_RUN_BLOCKS`).
    run: Option<slotio::AlignedBlock>,
    /// Blocks of the running slot the copy of kept chunks read lately.
    recent: Option<slotio::Recent>,
    /// Bytes found there: whole ranges, blocks.
    recent_hits: (u64, u64),
}

impl References {
    pub(crate) fn new(
        slot: Slot,
        storage: Box<dyn Storage>,
        slot_len: u64,
        base: String,
    ) -> References {
        References {
            slot,
            storage,
            cache: std::collections::VecDeque::new(),
            base,
            read: (0, 0, Duration::ZERO),
            blocks: std::collections::VecDeque::new(),
            slot_len,
            read_slot_bytes: 0,
            read_slot_calls: 0,
            read_io: Duration::ZERO,
            uses: Vec::new(),
            positions: Vec::new(),
            now: 0,
            wanted: Vec::new(),
            run: None,
            recent: None,
            recent_hits: (0, 0),
        }
    }

    /// The blocks of the running slot `r`'s ranges lie in, ascending.
    fn blocks_of(r: &Reference) -> impl Iterator<Item = u64> + '_ {
        let mut seen = std::collections::BTreeSet::new();
        for &(offset, n) in &r.ranges {
            if n > 0 {
                seen.extend(offset / SLOT_BLOCK..=(offset + u64::from(n) - 1) / SLOT_BLOCK);
            }
        }
        seen.into_iter()
    }

    /// Learns where `references` (a manifest's, each listing the positions of the
    /// chunks decoded with it) use the running slot's blocks, so that the block
    /// given up for a new one is the one needed again last.
    pub(crate) fn plan<'a>(&mut self, references: impl IntoIterator<Item = &'a Reference>) {
        let (mut uses, mut positions) = (Vec::new(), Vec::new());
        for r in references {
            let start = positions.len() as u32;
            positions.extend_from_slice(&r.chunks);
            let end = positions.len() as u32;
            uses.extend(Self::blocks_of(r).map(|b| (b, start, end)));
        }
        uses.sort_unstable();
        self.uses = uses;
        self.positions = positions;
    }

    /// Tells which references the batch being read needs (those not in the cache):
    /// a block read for one of them brings the blocks after it they need too.
    fn batch<'a>(&mut self, references: impl IntoIterator<Item = &'a Reference>) {
        let mut wanted = Vec::new();
        for r in references {
            if !self.cache.iter().any(|b| b.hash() == &r.hash) {
                wanted.extend(Self::blocks_of(r));
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        self.wanted = wanted;
    }

    /// The position of the next chunk (from the current one on) decoded with a
    /// reference in block `b`, `u32::MAX` for none (or no plan).
    fn next_use(&self, b: u64) -> u32 {
        let i = self.uses.partition_point(|&(block, _, _)| block < b);
        self.uses[i..]
            .iter()
            .take_while(|&&(block, _, _)| block == b)
            .filter_map(|&(_, start, end)| {
                // A reference's chunks are ascending (checked by the manifest).
                let chunks = &self.positions[start as usize..end as usize];
                chunks
                    .get(chunks.partition_point(|&p| p < self.now))
                    .copied()
            })
            .min()
            .unwrap_or(u32::MAX)
    }

    /// Reads block `b` of the running slot, with the missing blocks after it up to
    /// `last` (the range being read) or that the batch wants, up to
    /// `SLOT_RUN_BLOCKS` in one read (into `run`), after giving up blocks down to
    /// `SLOT_BLOCKS_KEPT` with the run's, the one needed again last first.
    fn fill(&mut self, b: u64, last: u64) -> std::io::Result<()> {
        let held = |blocks: &std::collections::VecDeque<(u64, Vec<u8>)>, i: u64| {
            blocks.iter().any(|(j, _)| *j == i)
        };
        let start = b * SLOT_BLOCK;
        if start >= self.slot_len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "past the end of the slot",
            ));
        }
        let mut n = 1;
        while n < SLOT_RUN_BLOCKS {
            let next = b + n;
            if next * SLOT_BLOCK >= self.slot_len
                || held(&self.blocks, next)
                || !(next <= last || self.wanted.binary_search(&next).is_ok())
            {
                break;
            }
            n += 1;
        }
        // Blocks given up first (not one of the run's: none is held), their buffers
        // reused for the run's.
        let mut spare = Vec::new();
        while self.blocks.len() + n as usize > SLOT_BLOCKS_KEPT {
            match self.give_up_block() {
                Some(buf) => spare.push(buf),
                None => break,
            }
        }
        let to = (start + n * SLOT_BLOCK).min(self.slot_len);
        let run = self.run.get_or_insert_with(|| {
            slotio::AlignedBlock::new((SLOT_RUN_BLOCKS * SLOT_BLOCK) as usize)
        });
        let started = std::time::Instant::now();
        run.fill(&*self.storage, start, (to - start) as usize)?;
        self.read_io += started.elapsed();
        self.read_slot_bytes += to - start;
        self.read_slot_calls += 1;
        for (i, bytes) in (b..).zip(run.as_slice().chunks(SLOT_BLOCK as usize)) {
            let mut buf = spare
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(SLOT_BLOCK as usize));
            buf.clear();
            buf.extend_from_slice(bytes);
            self.blocks.push_back((i, buf));
        }
        Ok(())
    }

    /// Gives up the kept block needed again last (least recently used first among
    /// blocks needed equally late); its buffer, for the next.
    fn give_up_block(&mut self) -> Option<Vec<u8>> {
        let victim = self
            .blocks
            .iter()
            .enumerate()
            .max_by_key(|&(k, (j, _))| (self.next_use(*j), std::cmp::Reverse(k)))
            .map(|(k, _)| k)?;
        self.blocks.remove(victim).map(|(_, buf)| buf)
    }

    /// Puts block `b` among the blocks kept: from the copy's blocks when they hold
    /// it, else read ([`References::fill`]).
    fn fill_block(&mut self, b: u64, last: u64) -> std::io::Result<()> {
        let start = b * SLOT_BLOCK;
        let n = (self.slot_len.saturating_sub(start)).min(SLOT_BLOCK) as usize;
        // A handle of its own (a shared pointer): kept blocks are given up below.
        if n > 0
            && let Some(recent) = self.recent.clone()
            && recent.covers(start, n as u64)
        {
            let mut buf = match self.blocks.len() >= SLOT_BLOCKS_KEPT {
                true => self.give_up_block(),
                false => None,
            }
            .unwrap_or_else(|| Vec::with_capacity(SLOT_BLOCK as usize));
            buf.resize(n, 0);
            if recent.copy(start, &mut buf) {
                self.recent_hits.1 += n as u64;
                self.blocks.push_back((b, buf));
                return Ok(());
            }
        }
        self.fill(b, last)
    }

    /// The running slot `slot` of `boot`, opened read-only, as the source of
    /// references; `base` names the release it holds, for messages.
    pub(crate) fn open(boot: &BootControl, slot: Slot, base: String) -> anyhow::Result<References> {
        let storage = boot
            .open_reader(slot)
            .with_context(|| format!("cannot open the running slot {slot}"))?;
        let slot_len = storage
            .len()
            .with_context(|| format!("cannot read the size of the running slot {slot}"))?;
        Ok(References::new(slot, storage, slot_len, base))
    }

    /// Fills `buf` with the running slot's bytes from `offset`, through the cache
    /// of slot blocks: the windows of neighbouring references overlap, so most of
    /// a reference was read for the previous ones.
    fn read_range(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        if end <= self.slot_len
            && let Some(recent) = &self.recent
            && recent.copy(offset, buf)
        {
            self.recent_hits.0 += buf.len() as u64;
            return Ok(());
        }
        let mut b = offset / SLOT_BLOCK;
        while b * SLOT_BLOCK < end {
            let block_start = b * SLOT_BLOCK;
            let k = match self.blocks.iter().position(|(i, _)| *i == b) {
                Some(k) => k,
                None => {
                    self.fill_block(b, (end - 1) / SLOT_BLOCK)?;
                    self.blocks
                        .iter()
                        .position(|(i, _)| *i == b)
                        .expect("just read")
                }
            };
            // Most recently used last.
            if k + 1 != self.blocks.len()
                && let Some(hit) = self.blocks.remove(k)
            {
                self.blocks.push_back(hit);
            }
            let block = &self.blocks.back().expect("just moved").1;
            // The part of this block the range covers.
            let from = offset.max(block_start);
            let to = end.min(block_start + block.len() as u64);
            // A short block is the slot's last: the range must end in it.
            if to < end.min(block_start + SLOT_BLOCK) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "past the end of the slot",
                ));
            }
            let dst = (from - offset) as usize..(to - offset) as usize;
            let src = (from - block_start) as usize..(to - block_start) as usize;
            buf[dst].copy_from_slice(&block[src]);
            b += 1;
        }
        Ok(())
    }

    /// The bytes of `r` (length checked; the decoding checks the hash), from the
    /// cache or read now.
    pub(crate) fn get(&mut self, r: &Reference) -> anyhow::Result<ReferenceBytes> {
        if let Some(i) = self.cache.iter().position(|b| b.hash() == &r.hash) {
            let b = self.cache.remove(i).expect("found");
            self.cache.push_back(b.clone());
            return Ok(b);
        }
        let started = std::time::Instant::now();
        // The first chunk from the current one on decoded with it: uses of blocks
        // before it are past.
        if let Some(&p) = r.chunks.get(r.chunks.partition_point(|&p| p < self.now)) {
            self.now = p;
        }
        let len = usize::try_from(r.len()).context("reference too large")?;
        while !self.cache.is_empty()
            && self.cache.iter().map(|b| b.bytes().len()).sum::<usize>() + len
                > REFERENCE_CACHE_BYTES
        {
            self.cache.pop_front();
        }
        let mut bytes = vec![0u8; len];
        let mut at = 0;
        for &(offset, n) in &r.ranges {
            let n = n as usize;
            self.read_range(offset, &mut bytes[at..at + n])
                .with_context(|| {
                    format!(
                        "cannot read the reference bytes {} of the running slot {}",
                        r.describe(),
                        self.slot
                    )
                })?;
            at += n;
        }
        let read = r.read(bytes).map_err(|e| {
            anyhow!(
                "the reference bytes {} of the running slot {}: {e}",
                r.describe(),
                self.slot
            )
        })?;
        self.cache.push_back(read.clone());
        self.read.0 += 1;
        self.read.1 += len as u64;
        self.read.2 += started.elapsed();
        Ok(read)
    }
}

/// Chunks of the running slot a thin install reads and hashes before it writes
/// anything, spread over the chunks it needs from the base release where its
/// manifest puts them ([`slotio::check_along`]): enough to refuse, untouched,
/// a slot that holds another release or the base's bytes elsewhere (its first
/// sampled chunk already differs), at the cost of a few dozen chunk reads instead
/// of every needed chunk read twice (once to check, once to copy). A slot that
/// holds the base but differs somewhere the sample did not look is found when that
/// chunk is copied (it is hashed before it is written): the engine then takes it
/// from a source that holds it, or has the whole slot cut by content
/// ([`Input::SlotIndexWritten`]'s `sampled`).
const ALONG_SAMPLE: shoal_artifact::chunk::Sample = shoal_artifact::chunk::Sample::new(64);

/// Runs an engine's outputs against the device.
struct Driver<'a> {
    dev: &'a mut Device,
    engine: Engine,
    start: std::time::Instant,
    /// Read-ahead window over the slot read last: (slot, start, bytes).
    window: Option<(Slot, u64, Vec<u8>)>,
    readers: [Option<Box<dyn Storage>>; 2],
    /// Writes, syncs and journals the slot being written (and reads it back) on
    /// its own thread.
    write_behind: Option<write_behind::WriteBehind>,
    /// Reads of a slot (the running one) served from a stream read ahead.
    read_ahead: Option<(Slot, slotio::ReadAhead)>,
    chunk_store: Option<(ChunkStore, Arc<shoal_engine::VerifiedRelease>)>,
    requests: Option<Box<dyn Requests>>,
    events: Vec<Event>,
    reboot_asked: bool,
    source_bytes_read: u64,
    progress: &'a mut dyn FnMut(Progress),
    /// Syncs handed to the write-behind and not yet answered, oldest first.
    syncs_owed: std::collections::VecDeque<Slot>,
    /// The manifest (kept under the data directory) of the release the running
    /// slot should hold: the running release's, or a thin artifact's base. An
    /// index of the running slot hashes that release's chunks where they lie.
    index_base: Option<[u8; 32]>,
    /// Set to stop the cut of the running slot in progress ([`Output::StopIndex`]).
    index_stop: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl<'a> Driver<'a> {
    fn new(
        dev: &'a mut Device,
        engine: Engine,
        progress: &'a mut dyn FnMut(Progress),
    ) -> Driver<'a> {
        Driver {
            dev,
            engine,
            start: std::time::Instant::now(),
            window: None,
            readers: [None, None],
            write_behind: None,
            read_ahead: None,
            chunk_store: None,
            requests: None,
            events: Vec::new(),
            reboot_asked: false,
            source_bytes_read: 0,
            progress,
            syncs_owed: std::collections::VecDeque::new(),
            index_base: None,
            index_stop: None,
        }
    }

    fn now(&self) -> shoal_engine::Instant {
        shoal_engine::Instant::from_millis(
            u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX),
        )
    }

    /// [`Driver::offer_verified`] of a release verified from a file of the
    /// device store ([`Device::verify_envelope`]): the file is forgotten when
    /// the offer is refused.
    fn offer_verified_owned(
        &mut self,
        release: &Arc<shoal_engine::VerifiedRelease>,
        sources: Vec<SourceInfo>,
        reboot: bool,
    ) -> anyhow::Result<()> {
        let offered = self.offer_verified(release, sources, reboot);
        if offered.is_err() {
            self.dev.forget_release(release);
        }
        offered
    }

    /// [`Device::verify_stored_file`].
    fn verify_stored_file(
        &self,
        hash: &[u8; 32],
        file: &std::fs::File,
        len: u64,
        wall_unix_s: Option<u64>,
    ) -> anyhow::Result<Arc<shoal_engine::VerifiedRelease>> {
        self.dev.verify_stored_file(hash, file, len, wall_unix_s)
    }

    /// Offers a release verified already.
    fn offer_verified(
        &mut self,
        release: &Arc<shoal_engine::VerifiedRelease>,
        sources: Vec<SourceInfo>,
        reboot: bool,
    ) -> anyhow::Result<()> {
        let now = self.now();
        self.engine
            .offer_verified(now, release, sources, reboot)
            .map_err(|e| anyhow!(e).context("the release was refused"))?;
        self.offered(now)
    }

    fn offered(&mut self, now: shoal_engine::Instant) -> anyhow::Result<()> {
        // LAN hook: sources a request source already knows of (LAN peers and their
        // swarm) are registered before the engine plans its first fetch.
        if let Some(r) = self.requests.as_mut() {
            let early = r.wait(Duration::ZERO);
            for answer in early {
                self.answer(now, REMOTE, answer);
            }
        }
        self.drain()
    }

    /// Feeds an artifact's chunks the engine still wants, decoded in parallel
    /// batches, in a pipeline of three: while one batch is written, the next one is
    /// decoded (on all cores), and a thread of its own reads the references of the
    /// batches after it from the running slot, running ahead of the decoding by up
    /// to `REFERENCES_AHEAD_BYTES` (so a batch that takes long to write, or whose
    /// references take long to read, does not stall the other stages). Chunks and
    /// errors still reach the engine in artifact order.
    fn stream<R: shoal_artifact::read::Skip>(
        &mut self,
        mut artifact: ArtifactReader<R>,
        name: &str,
    ) -> anyhow::Result<()> {
        let stream_started = std::time::Instant::now();
        // Delta-encoded chunks are decoded with bytes of the running slot.
        let mut references = match artifact
            .manifest()
            .payloads
            .iter()
            .any(|p| !p.references.is_empty())
        {
            false => None,
            true => {
                let slot = self.engine.status().active;
                let base = artifact
                    .manifest()
                    .base
                    .as_ref()
                    .map_or_else(String::new, |b| format!("{} {}", b.name, b.version));
                let mut refs = References::open(&self.dev.boot, slot, base)?;
                refs.recent = Some(self.read_ahead(slot)?.recent());
                refs.plan(
                    artifact
                        .manifest()
                        .payloads
                        .iter()
                        .flat_map(|p| p.references.iter()),
                );
                Some(refs)
            }
        };
        // The running slot and its base release, for messages.
        let running = references
            .as_ref()
            .map_or((String::new(), String::new()), |r| {
                (r.slot.to_string(), r.base.clone())
            });
        // Time the decoding threads and the main thread (handing chunks over, and
        // what the engine asks meanwhile: writes, reads of the running slot) took,
        // and how long the main thread waited for the decoding and the reference
        // reading.
        let (mut decode_time, mut feed_time) = (Duration::ZERO, Duration::ZERO);
        let (mut decode_wait, mut reference_wait) = (Duration::ZERO, Duration::ZERO);
        let running = &running;
        std::thread::scope(|scope| -> anyhow::Result<()> {
            // Batches handed to the reference reader and the batches it read the
            // references of, in order; without references (plain chunks) a batch
            // is resolved at once, and only one is read ahead.
            let (to_read, read_rx) = std::sync::mpsc::channel::<Vec<shoal_artifact::RawChunk>>();
            let (read_tx, resolved_rx) = std::sync::mpsc::channel::<Resolved>();
            let reading = references.is_some();
            if let Some(refs) = references.as_mut() {
                scope.spawn(move || {
                    for raws in read_rx {
                        let out = resolve(raws, Some(&mut *refs));
                        let failed = out.is_err();
                        // The stream stopped taking batches, or the reader cannot
                        // go on: nothing after a failure is read.
                        if read_tx.send(out).is_err() || failed {
                            break;
                        }
                    }
                });
            }
            let mut inline: std::collections::VecDeque<Resolved> = Default::default();
            // Batches handed over to be resolved and not taken back yet: the bytes
            // each holds (stored chunks, distinct references).
            let mut ahead: std::collections::VecDeque<usize> = Default::default();
            // Decoded, to hand over.
            let mut decoded: Vec<Decoded> = Vec::new();
            let mut ended = false;
            while self.engine.is_installing() {
                // Read batches ahead. Each chunk comes once, so what the engine
                // wants of it does not depend on the batches still to be written.
                let mut failure = None;
                while !ended
                    && (ahead.is_empty()
                        || (reading
                            && ahead.len() < REFERENCE_BATCHES_AHEAD
                            && ahead.iter().sum::<usize>() < REFERENCES_AHEAD_BYTES))
                {
                    let engine = &self.engine;
                    let batch = read_batch(&mut artifact, |id| engine.wants(id));
                    ended = batch.ended;
                    if let Some(e) = batch.failure {
                        // Nothing of a batch that ends in a bad archive is handed
                        // over: its references need not be read.
                        failure = Some(e);
                        break;
                    }
                    if batch.raws.is_empty() {
                        break;
                    }
                    ahead.push_back(batch.held);
                    // The engine paces the reads of the running slot by the
                    // stream's position in the payload: the kept chunks up to the
                    // last chunk read are copied while the batch is decoded.
                    if let Some(id) = batch.raws.last().map(|r| r.chunk.id) {
                        let input = Input::StreamAt { source: STREAM, id };
                        self.engine.handle(self.now(), input);
                    }
                    if reading {
                        // A send after the reader stopped (at a failure) fails; its
                        // failure comes out of `resolved_rx` before these batches
                        // are asked for.
                        let _ = to_read.send(batch.raws);
                    } else {
                        inline.push_back(resolve(batch.raws, None));
                    }
                }
                if let Some(e) = failure {
                    // The archive is bad (or could not be read) past this point:
                    // nothing read before it is handed over, since the last of it
                    // would let the engine arm a trial of an artifact that failed
                    // (a batch is only handed over once the next one was read
                    // without failure, so the one that completes the payload waits
                    // for the end of the archive to be read and checked). The
                    // batches read ahead are dropped (up to 3, their chunks read
                    // again by a rerun), their references only checked: one of an
                    // earlier chunk that fails comes first (errors come in
                    // artifact order). The batch decoded and not handed over is
                    // dropped too, unread: a chunk of it that failed its hash would
                    // be `Damaged` as the archive is, only named differently.
                    for _ in 0..ahead.len() {
                        let undecoded = match reading {
                            true => resolved_rx.recv().unwrap_or_else(|_| Ok(Vec::new())),
                            false => inline.pop_front().unwrap_or_else(|| Ok(Vec::new())),
                        };
                        let checked = undecoded.and_then(|u| check_references(&u, running));
                        if let Err(message) = checked {
                            return Err(self.stop_reading(STREAM, SourceFault::WrongBase(message))?);
                        }
                    }
                    let message = e.to_string();
                    let fault = match e {
                        ReadError::Io(_) => SourceFault::Unreadable(message),
                        _ => SourceFault::Damaged(message),
                    };
                    return Err(self.stop_reading(STREAM, fault)?);
                }
                // The next batch whose references were read.
                let next = match ahead.pop_front() {
                    None => None,
                    Some(_) => {
                        let waiting = std::time::Instant::now();
                        let resolved = if reading {
                            resolved_rx
                                .recv()
                                .expect("the reference reader ended early")
                        } else {
                            inline.pop_front().expect("resolved inline")
                        };
                        reference_wait += waiting.elapsed();
                        Some(resolved)
                    }
                };
                let to_decode = match next {
                    Some(Err(message)) => {
                        // The running slot is not the base the chunks were encoded
                        // against: nothing decoded with it is written (what was
                        // decoded before it is).
                        self.feed(std::mem::take(&mut decoded), name)?;
                        return Err(self.stop_reading(STREAM, SourceFault::WrongBase(message))?);
                    }
                    Some(Ok(u)) => u,
                    None if decoded.is_empty() => {
                        // Read to the end, which was checked, and all handed over.
                        self.engine
                            .handle(self.now(), Input::SourceEnded { source: STREAM });
                        self.drain()?;
                        break;
                    }
                    None => Vec::new(),
                };
                // While the batch before is written, this one is decoded.
                let previous = std::mem::take(&mut decoded);
                let decoder = scope.spawn(move || {
                    let started = std::time::Instant::now();
                    let out = decode_resolved(&to_decode, running);
                    (out, started.elapsed())
                });
                let started = std::time::Instant::now();
                let fed = self.feed(previous, name);
                feed_time += started.elapsed();
                let waiting = std::time::Instant::now();
                let (out, took) = decoder.join().expect("the decoding thread panicked");
                decode_wait += waiting.elapsed();
                decode_time += took;
                fed?;
                match out {
                    Ok(d) => decoded = d,
                    Err(message) => {
                        // A reference that fails its hash: nothing of the batch is
                        // written.
                        return Err(self.stop_reading(STREAM, SourceFault::WrongBase(message))?);
                    }
                }
            }
            Ok(())
        })?;
        if let Some(r) = &references {
            tracing::debug!(
                recent_range_bytes = r.recent_hits.0,
                recent_block_bytes = r.recent_hits.1,
                references_read = r.read.0,
                reference_bytes_read = r.read.1,
                reference_read_ms = r.read.2.as_millis() as u64,
                slot_read_ms = r.read_io.as_millis() as u64,
                slot_bytes_read = r.read_slot_bytes,
                slot_reads = r.read_slot_calls,
                decode_ms = decode_time.as_millis() as u64,
                feed_ms = feed_time.as_millis() as u64,
                decode_wait_ms = decode_wait.as_millis() as u64,
                reference_wait_ms = reference_wait.as_millis() as u64,
                stream_ms = stream_started.elapsed().as_millis() as u64,
                "delta-encoded chunks decoded"
            );
        }
        Ok(())
    }

    /// Tells the engine the driver cannot go on reading `source`, and returns the
    /// error for the caller: the source's own message, and, when the engine says a
    /// rerun can do better ([`shoal_engine::InstallError::worth_retrying`]), exit
    /// code 75 and a hint that rerunning resumes.
    fn stop_reading(
        &mut self,
        source: SourceId,
        fault: SourceFault,
    ) -> anyhow::Result<anyhow::Error> {
        let message = fault.to_string();
        self.engine
            .handle(self.now(), Input::SourceFailed { source, fault });
        self.drain()?;
        let retry = self.events.iter().rev().find_map(|e| match e {
            Event::Failed(err) => Some(err.worth_retrying()),
            _ => None,
        });
        Ok(if retry == Some(true) {
            Exit::tempfail(format!("{message}; rerunning the install resumes it"))
        } else {
            anyhow!(message)
        })
    }

    /// Runs an install from a [`Requests`] source: carries out the engine's
    /// outputs, waits for answers until the engine's next timer, and hands them
    /// over, until the install ends.
    fn pump(&mut self) -> anyhow::Result<()> {
        let mut last_journaled = std::time::Instant::now();
        while self.engine.is_installing() {
            self.drain()?;
            if !self.engine.is_installing() {
                break;
            }
            let now = self.now();
            let timeout = self
                .engine
                .poll_timeout()
                .map(|t| Duration::from_millis(t.as_millis().saturating_sub(now.as_millis())))
                .unwrap_or(Duration::from_secs(1))
                .min(if self.syncs_owed.is_empty() {
                    Duration::from_secs(1)
                } else {
                    // A sync may return meanwhile: hand it over soon.
                    Duration::from_millis(20)
                });
            if !self.serve_requests(timeout, &mut last_journaled)? {
                break;
            }
        }
        if let Some(r) = self.requests.as_ref() {
            self.source_bytes_read += r.bytes_read();
        }
        Ok(())
    }

    /// One turn of serving the [`Requests`] source, for [`Self::pump`] and, while
    /// a cut of the running slot runs, for [`Self::hand_over_cut`]: the install
    /// stops if the deployment was withdrawn (`false` then); otherwise the
    /// answers that come within `timeout` are handed to the engine, the source is
    /// told the journaled ranges every [`JOURNALED_EVERY`], and the engine's timer
    /// that is due runs.
    fn serve_requests(
        &mut self,
        timeout: Duration,
        last_journaled: &mut std::time::Instant,
    ) -> anyhow::Result<bool> {
        let answers = match self.requests.as_mut() {
            Some(r) => {
                if let Some(message) = r.stop_reason() {
                    // The journal keeps what was verified; nothing is armed.
                    self.engine.handle(
                        self.now(),
                        Input::SourceFailed {
                            source: REMOTE,
                            fault: SourceFault::Withdrawn(message),
                        },
                    );
                    self.drain()?;
                    return Ok(false);
                }
                r.wait(timeout)
            }
            None => bail!("no request source to wait for"),
        };
        let now = self.now();
        for answer in answers {
            self.answer(now, REMOTE, answer);
            self.drain()?;
        }
        // LAN hook: what the target slot holds, verified, for the peers.
        if last_journaled.elapsed() >= JOURNALED_EVERY
            && let Some(r) = self.requests.as_mut()
        {
            *last_journaled = std::time::Instant::now();
            r.journaled(&self.engine.journaled_ranges());
        }
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
            self.drain()?;
        }
        Ok(true)
    }

    /// Hands one answer of a [`Requests`] source (`source`, or a source it carries)
    /// to the engine.
    fn answer(&mut self, now: shoal_engine::Instant, source: SourceId, answer: Answer) {
        let input = match answer {
            Answer::Chunk(chunk) => Input::Chunk {
                origin: Origin::Source(source),
                chunk,
            },
            Answer::Corrupt(id) => Input::Corrupt {
                origin: Origin::Source(source),
                id,
            },
            Answer::Unavailable(id) => Input::Unavailable { source, id },
            Answer::Failed { request, failure } => Input::FetchFailed {
                source,
                request,
                failure,
            },
            Answer::From { source, answer } => return self.answer(now, source, *answer),
            Answer::Added(info) => {
                let id = info.id;
                if let Err(e) = self.engine.add_source(now, info) {
                    warn!(source = %id, error = %e, "cannot add a source");
                }
                return;
            }
            Answer::Holds { source, holds } => {
                if let Err(e) = self.engine.add_holds(now, source, &holds) {
                    warn!(%source, error = %e, "cannot update a source");
                }
                return;
            }
            Answer::Fetching { source, fetching } => {
                if let Err(e) = self.engine.set_fetching(now, source, &fetching) {
                    warn!(%source, error = %e, "cannot update a source");
                }
                return;
            }
            Answer::Removed(source) => {
                if let Err(e) = self.engine.remove_source(now, source) {
                    warn!(%source, error = %e, "cannot remove a source");
                }
                return;
            }
            Answer::Swarm(swarm) => {
                if let Err(e) = self.engine.set_swarm(now, swarm) {
                    warn!(error = %e, "cannot set the LAN swarm");
                }
                return;
            }
        };
        self.engine.handle(now, input);
    }

    /// Hands decoded chunks to the engine and carries out what it asks.
    fn feed(&mut self, decoded: Vec<Decoded>, name: &str) -> anyhow::Result<()> {
        for (id, result) in decoded {
            let input = match result {
                Ok(chunk) => Input::Chunk {
                    origin: Origin::Source(STREAM),
                    chunk,
                },
                // A corrupt chunk in an artifact is corrupt the next time too.
                Err(message) => Input::SourceFailed {
                    source: STREAM,
                    fault: SourceFault::Damaged(format!(
                        "chunk {id} in {name} is corrupt: {message}"
                    )),
                },
            };
            self.engine.handle(self.now(), input);
            self.drain()?;
        }
        Ok(())
    }

    fn finish_install(mut self) -> anyhow::Result<InstallReport> {
        self.drain()?;
        self.reboot_if_asked()?;
        let p = self.engine.progress();
        for e in &self.events {
            match e {
                Event::Failed(err) => {
                    // The engine says whether a rerun can do better (a source that
                    // could not be read) or fails the same way (bad bytes).
                    return Err(if err.worth_retrying() {
                        Exit::tempfail(format!(
                            "install stopped: {err}; rerunning the install resumes it"
                        ))
                    } else {
                        anyhow!("install stopped: {err}")
                    });
                }
                Event::Armed { release, slot } => {
                    return Ok(InstallReport {
                        release: release.name.clone(),
                        version: release.version.clone(),
                        slot: *slot,
                        total_bytes: p.total_bytes,
                        resumed_bytes: p.resumed_bytes,
                        written_bytes: p.written_bytes,
                        reused_bytes: p.reused_bytes,
                        fetched_bytes: p.fetched_bytes,
                        peer_bytes: p.peer_bytes,
                        wan_bytes: p.wan_bytes,
                        source_bytes_read: self.source_bytes_read,
                        rebooting: self.reboot_asked,
                    });
                }
                _ => {}
            }
        }
        bail!("the install ended without arming a trial boot")
    }

    fn reboot_if_asked(&mut self) -> anyhow::Result<()> {
        if !self.reboot_asked {
            return Ok(());
        }
        match &mut self.dev.reboot {
            Reboot::Hook(f) => f(),
            Reboot::Command => run_reboot_command(&self.dev.config),
        }
    }

    /// Tells the engine of the syncs that returned; with `wait`, waits for one
    /// first. Returns whether one was delivered.
    fn deliver_syncs(&mut self, wait: bool) -> bool {
        let Some(wb) = self.write_behind.as_ref() else {
            return false;
        };
        let mut done = wb.synced();
        if done == 0 && wait {
            match wb.wait_synced() {
                Ok(()) => done = 1,
                Err((op, message)) => {
                    self.syncs_owed.clear();
                    self.engine
                        .handle(self.now(), Input::Failed { op, message });
                    return false;
                }
            }
        }
        for _ in 0..done {
            if let Some(slot) = self.syncs_owed.pop_front() {
                self.engine.handle(self.now(), Input::Synced { slot });
            }
        }
        done > 0
    }

    /// Carries out outputs until the engine has none (and waits for the syncs it
    /// cannot go on without).
    fn drain(&mut self) -> anyhow::Result<()> {
        loop {
            self.drain_outputs();
            if self.deliver_syncs(false) {
                continue;
            }
            if self.engine.waiting_for_sync() && !self.syncs_owed.is_empty() {
                self.deliver_syncs(true);
                continue;
            }
            break;
        }
        (self.progress)(self.engine.progress());
        Ok(())
    }

    fn drain_outputs(&mut self) {
        while let Some(out) = self.engine.poll_output() {
            if let Err((op, e)) = self.execute(out) {
                let message = format!("{e:#}");
                warn!(%op, %message, "output failed");
                self.engine
                    .handle(self.now(), Input::Failed { op, message });
            }
            // A write, sync or journal record that failed on the writing thread.
            if let Some((op, message)) = self
                .write_behind
                .as_ref()
                .and_then(write_behind::WriteBehind::failure)
            {
                self.engine
                    .handle(self.now(), Input::Failed { op, message });
            }
            // Syncs that returned meanwhile: their batches are journaled now, even
            // while one source answers synchronously and outputs never run dry.
            self.deliver_syncs(false);
        }
    }

    /// `len` bytes at `offset` of a slot: from the stream read ahead (the chunks
    /// reused from the running slot mostly come in slot order), or for a read
    /// behind it through a window of its own.
    fn read(&mut self, slot: Slot, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
        let ahead = self.read_ahead(slot)?;
        if let Some(data) = ahead
            .read(offset, len)
            .with_context(|| format!("cannot read slot {slot}"))?
        {
            return Ok(data);
        }
        // Behind the stream: a read of its own.
        let end = offset + len as u64;
        let hit = |w: &Option<(Slot, u64, Vec<u8>)>| {
            w.as_ref().is_some_and(|(s, start, buf)| {
                *s == slot && *start <= offset && end <= start + buf.len() as u64
            })
        };
        if !hit(&self.window) {
            let mut buf = self.window.take().map(|(_, _, b)| b).unwrap_or_default();
            let window = self.dev.io_window;
            let storage = self.reader(slot)?;
            let want = (len.max(window) as u64)
                .min(storage.len()?.saturating_sub(offset))
                .max(len as u64);
            buf.resize(usize::try_from(want).unwrap_or(len), 0);
            storage.read_at(offset, &mut buf)?;
            self.window = Some((slot, offset, buf));
        }
        let (_, start, buf) = self.window.as_ref().expect("filled");
        let at = usize::try_from(offset - start).unwrap_or(0);
        Ok(buf[at..at + len].to_vec())
    }

    /// The stream of `slot` read ahead, started at its first use.
    fn read_ahead(&mut self, slot: Slot) -> anyhow::Result<&mut slotio::ReadAhead> {
        if self.read_ahead.as_ref().is_none_or(|(s, _)| *s != slot) {
            let storage = self
                .dev
                .boot
                .open_reader(slot)
                .with_context(|| format!("cannot open slot {slot}"))?;
            let len = self.dev.capacity[slot_ordinal(slot)];
            self.read_ahead = Some((slot, slotio::ReadAhead::start(storage, len)));
        }
        Ok(&mut self.read_ahead.as_mut().expect("just started").1)
    }

    fn reader(&mut self, slot: Slot) -> anyhow::Result<&dyn Storage> {
        let i = slot_ordinal(slot);
        if self.readers[i].is_none() {
            let r = self
                .dev
                .boot
                .open_reader(slot)
                .with_context(|| format!("cannot open slot {slot}"))?;
            self.readers[i] = Some(r);
        }
        Ok(&**self.readers[i].as_ref().expect("just opened"))
    }

    fn execute(&mut self, out: Output) -> Result<(), (IoOp, anyhow::Error)> {
        // What is not part of writing the slot (a bootloader change, a reboot,
        // health checks, the final hash) runs with the journal current.
        let writing = matches!(
            out,
            Output::Write { .. }
                | Output::Sync { .. }
                | Output::Persist(_)
                | Output::Read { .. }
                | Output::Fetch { .. }
                | Output::Event(_)
                | Output::HashSlot { .. }
                | Output::StopIndex { .. }
                | Output::CutRest { .. }
        );
        if !writing && let Some(wb) = self.write_behind.as_ref() {
            wb.barrier().map_err(|(op, e)| (op, anyhow!(e)))?;
        }
        let now = self.now();
        match out {
            Output::IndexSlot {
                slot,
                chunking,
                len,
            } => {
                let index = (|| -> anyhow::Result<_> {
                    // Cut on threads of their own; the needed chunks met on the way
                    // come back here and go to the engine (and on to the target
                    // slot) at once, so they are not read again after the index.
                    let storage = self
                        .dev
                        .boot
                        .open_reader(slot)
                        .with_context(|| format!("cannot open slot {slot}"))?;
                    let len = len.min(storage.len()?);
                    // The chunk list of the release the slot should hold (its kept
                    // manifest): its chunks are hashed where they lie instead of
                    // being found by the content-defined chunker again.
                    let along = self
                        .index_base
                        .and_then(|hash| expected_chunks(&self.dev.config.device.data_dir, &hash, chunking, len));
                    if let Some(expected) = &along
                        && !self.engine.takes_while_indexing()
                    {
                        // Nothing is taken while indexing (a thin artifact): the
                        // install needs from the slot only where its chunks lie, so
                        // only those are read and hashed, where the release puts
                        // them. The index lists them only: a hint, as every index
                        // (each chunk read on its word is hashed again), and after
                        // the install the device runs the other slot.
                        //
                        // Only a sample of them is read now (see
                        // [`ALONG_SAMPLE`]): the rest are hashed when they are
                        // copied, and the engine decides what to do about one
                        // that does not hash to its id (`sampled`).
                        let awaited = self.engine.awaited_chunks();
                        let (written, partial, sampled) = index_along_kept(
                            &self.dev.store,
                            slot,
                            &*storage,
                            len,
                            chunking,
                            expected,
                            &|id| awaited.key(id),
                        )?;
                        return Ok(Some((written, partial, sampled)));
                    }
                    // One bit a needed chunk, over the release's shared table.
                    let wanted = self.engine.needed_chunks();
                    // A run of one repeated chunk is listed once: the engine keeps
                    // the first position of each id.
                    let ran = self.run_cut(slot, move |tx, stopped| {
                        let chunks = slotio::index_along(
                            &*storage,
                            len,
                            chunking,
                            along.as_ref().map_or(&[][..], |e| &e.sizes[..]),
                            &|id| wanted.contains(id),
                            Some(&slotio::Handover {
                                tx: &tx,
                                stop: stopped,
                            }),
                            None,
                        )?;
                        // `tx` lives until this returns, so the driver goes on
                        // serving the request source during a cut by content
                        // below (it hands nothing over and is not stopped).
                        if stopped.load(std::sync::atomic::Ordering::Acquire) {
                            // What was cut before the stop: no index of the slot.
                            return Ok(chunks);
                        }
                        if let Some(expected) = &along
                            && !holds_chunks(&chunks, expected.chunks())
                        {
                            // Not the release expected: cut by content, which finds
                            // what the slot shares with the new release wherever it
                            // lies (the chunks met above were handed over already).
                            tracing::debug!(
                                "the running slot does not hold its expected release: indexing it by content"
                            );
                            // Stoppable (a withdrawn deployment, an install that
                            // ended), handing nothing over: its progress would
                            // restart the engine's count of the cut.
                            let (closed, _) = std::sync::mpsc::sync_channel(0);
                            return slotio::index(
                                &*storage,
                                len,
                                chunking,
                                &|_| false,
                                Some(&slotio::Handover {
                                    tx: &closed,
                                    stop: stopped,
                                }),
                                None, slotio::Repeats::Once
                            );
                        }
                        Ok(chunks)
                    })?;
                    let (chunks, handed) = (ran.cut?, ran.handed);
                    if ran.stopped {
                        // The install goes on without an index of the slot: what
                        // was cut is not one, and is neither kept nor recorded (a
                        // later install, or this one resumed, cuts the slot again).
                        info!(slot = %slot, chunks = chunks.len(), handed, "stopped indexing the active slot");
                        return Ok(None);
                    }
                    // Into the store in batches; the engine reads them by id.
                    let written = self
                        .dev
                        .store
                        .write_slot_index(slot, &chunks)
                        .with_context(|| format!("cannot record the index of slot {slot}"))?;
                    Ok(Some((written, false, 0)))
                })()
                .map_err(|e| (IoOp::IndexSlot, e))?;
                let Some((index, partial, sampled)) = index else {
                    return Ok(());
                };
                info!(slot = %slot, chunks = index, partial, sampled, "indexed the active slot");
                // The time now, not the time the cut began: the engine plans its
                // fetches at this input (a request stamped with the cut's start
                // would be past its timeout at once), and the serving during the
                // cut moved the engine's clock on already.
                self.engine.handle(
                    self.now(),
                    Input::SlotIndexWritten {
                        slot,
                        chunking,
                        chunks: index,
                        partial,
                        sampled: sampled > 0,
                    },
                );
            }
            Output::Read {
                slot,
                id,
                offset,
                len,
            } => {
                let data = self
                    .read(slot, offset, len as usize)
                    .map_err(|e| (IoOp::Read, e))?;
                self.engine
                    .handle(now, Input::checked(Origin::Slot(slot), id, data));
            }
            // Local requests are answered before the next output: nothing to cancel.
            Output::Cancel { source, request } => {
                if let Some(r) = self.requests.as_mut() {
                    if source == REMOTE {
                        r.cancel(request);
                    } else if r.carries(source) {
                        r.cancel_to(source, request);
                    }
                }
            }
            // LAN hook: a request to a source the request source carries (a peer).
            Output::Fetch {
                source,
                request,
                ids,
            } if source != REMOTE && self.requests.as_ref().is_some_and(|r| r.carries(source)) => {
                if let Some(r) = self.requests.as_mut() {
                    r.send_to(source, request, ids);
                }
            }
            Output::Fetch {
                source: REMOTE,
                request,
                ids,
            } if self.requests.is_some() => {
                if let Some(r) = self.requests.as_mut() {
                    r.send(request, ids);
                }
            }
            Output::Fetch { source, ids, .. } => {
                let Some((store, release)) = self.chunk_store.as_ref() else {
                    return Err((IoOp::Fetch, anyhow!("no request source {source}")));
                };
                let mut answers = Vec::with_capacity(ids.len());
                for id in ids {
                    let answer = match release.chunk(&id).map(|r| (r, store.get_verified(&r))) {
                        Some((r, Ok(chunk))) => {
                            self.source_bytes_read += u64::from(r.stored_size);
                            Input::Chunk {
                                origin: Origin::Source(source),
                                chunk,
                            }
                        }
                        Some((_, Err(e))) => {
                            if !matches!(&e, shoal_artifact::StoreError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
                            {
                                warn!(%id, error = %chain(&e), "chunk store cannot serve a chunk");
                            }
                            Input::Unavailable { source, id }
                        }
                        None => Input::Unavailable { source, id },
                    };
                    answers.push(answer);
                }
                for a in answers {
                    self.engine.handle(now, a);
                }
            }
            Output::Write {
                slot,
                offsets,
                data,
                ..
            } => {
                if self.write_behind.is_none() {
                    // Set from the offer's payload; no manifest parsing here.
                    let size = self.engine.progress().total_bytes;
                    let mut w = self
                        .dev
                        .boot
                        .open_writer(slot, size)
                        .map_err(|e| (IoOp::Write, anyhow!(e)))?;
                    // The engine syncs (then journals) in its own batches.
                    w.set_sync_batch_bytes(u64::MAX);
                    // The read-back hashes what the journal already holds, and each
                    // batch once synced, while the install goes on. (A payload of
                    // one piece has no tree to join: it is read at the end.)
                    let verifier = if size > slotio::PIECE {
                        let reader = self
                            .dev
                            .boot
                            .open_reader(slot)
                            .with_context(|| format!("cannot open slot {slot}"))
                            .map_err(|e| (IoOp::Write, e))?;
                        Some(slotio::Verifier::start(
                            reader,
                            size,
                            &self.engine.journaled_ranges(),
                        ))
                    } else {
                        None
                    };
                    // Synced through a second writer, on a thread of its own.
                    let sync = self
                        .dev
                        .boot
                        .open_writer(slot, size)
                        .map_err(|e| (IoOp::Write, anyhow!(e)))?;
                    self.write_behind = Some(write_behind::WriteBehind::start(
                        w,
                        sync,
                        verifier,
                        self.dev.io_window,
                    ));
                }
                let wb = self.write_behind.as_ref().expect("just started");
                let bytes = data.len() as u64 * offsets.len() as u64;
                wb.write(offsets.into_vec(), data)
                    .map_err(|(op, e)| (op, anyhow!(e)))?;
                // Queued in order behind the writes before it (the queue is bounded).
                self.engine.handle(now, Input::Written { slot, bytes });
            }
            Output::Sync { slot } => match self.write_behind.as_ref() {
                // Answered when the syncing thread says it returned (`drain`).
                Some(wb) => {
                    wb.sync().map_err(|(op, e)| (op, anyhow!(e)))?;
                    self.syncs_owed.push_back(slot);
                }
                None => self.engine.handle(now, Input::Synced { slot }),
            },
            // The engine asks for a journal batch only once its sync returned
            // (`Input::Synced`): applied at once, not queued behind later syncs.
            Output::Persist(records) => {
                self.dev
                    .store
                    .apply(&records)
                    .map_err(|e| (IoOp::Persist, anyhow!(e)))?;
                // The store holds the deployment's signed envelope now: the
                // engine need not (about 80 bytes a chunk, 35 MB at 8 GiB).
                if records.iter().any(|r| {
                    matches!(
                        r,
                        shoal_engine::Record::Envelope(Some(_))
                            | shoal_engine::Record::EnvelopeStored(_)
                    )
                }) {
                    drop(records);
                    self.engine.shed_envelope();
                }
            }
            Output::HashSlot { slot, len } => {
                // Every write is done and synced first. Most of the slot was read
                // back and hashed while it was written; otherwise (nothing written
                // by this run) it is read back now.
                let early = match self.write_behind.take() {
                    Some(wb) => wb.finish().map_err(|(op, e)| (op, anyhow!(e)))?,
                    None => None,
                };
                let hash = match early {
                    Some(hash) => hash,
                    None => self
                        .reader(slot)
                        .and_then(|r| Ok(slotio::hash(r, len)?))
                        .map_err(|e| (IoOp::HashSlot, e))?,
                };
                self.engine.handle(now, Input::SlotHashed { slot, hash });
            }
            // Carried out by bootctl's bootloader model, idempotently (a step
            // already taken before a crash is not repeated).
            out @ (Output::DisarmTrial { .. }
            | Output::ArmTrial { .. }
            | Output::Commit { .. }
            | Output::Rollback { .. }) => {
                let step = out.boot_step().expect("a bootloader output");
                self.dev
                    .boot
                    .apply(step)
                    .map_err(|e| (IoOp::Bootloader, anyhow!(e)))?;
            }
            Output::StopIndex { .. } => {
                if let Some(stop) = &self.index_stop {
                    stop.store(true, std::sync::atomic::Ordering::Release);
                }
            }
            Output::CutRest {
                slot,
                chunking,
                from,
                len,
            } => {
                // The rest of the slot is cut to save fetches, not because the
                // install needs it: a read that fails there (a bad sector past
                // the release) ends the cut, and what it did not meet comes from
                // the sources (the install fails as stuck if none holds it).
                if let Err(e) = self.cut_rest(slot, chunking, from, len) {
                    warn!(slot = %slot, from, error = %format!("{e:#}"), "the resumed cut of the active slot failed: the chunks it did not meet come from the sources");
                    self.engine.handle(self.now(), Input::CutRestEnded { slot });
                }
            }
            Output::Reboot => self.reboot_asked = true,
            Output::RunHealthChecks => {
                let h = &self.dev.config.health;
                info!(dir = %h.dir.display(), "running health checks");
                let result = health::run(&h.dir, Duration::from_secs(h.timeout_s));
                self.engine.handle(now, Input::HealthChecked(result));
            }
            Output::Event(e) => {
                info!(event = ?short(&e), "engine");
                // LAN hook: a peer that sent a corrupt chunk is blocked.
                if let Event::SourceBanned { source } = &e
                    && let Some(r) = self.requests.as_mut()
                    && r.carries(*source)
                {
                    r.banned(*source);
                }
                self.events.push(e);
            }
        }
        Ok(())
    }
}

/// How a cut of the active slot run by [`Driver::run_cut`] ended.
struct RanCut<T> {
    /// What the cut returned.
    cut: T,
    /// How many chunks it handed over to the engine.
    handed: u64,
    /// Whether its stop flag was set (by the engine, or as the install ended;
    /// the cut may have reached its end all the same).
    stopped: bool,
}

impl Driver<'_> {
    /// Runs `cut` (of `slot`) on a thread of its own, given where to hand over
    /// what it meets and the flag that stops it (set by [`Output::StopIndex`]),
    /// and hands what it meets to the engine meanwhile ([`Self::hand_over_cut`]),
    /// until it ends. However the handover ends (an error from `drain`, a
    /// panic), the cut stops and its thread is joined: it does not go on reading,
    /// cutting and hashing the slot for nobody.
    fn run_cut<T, F>(&mut self, slot: Slot, cut: F) -> anyhow::Result<RanCut<T>>
    where
        T: Send + 'static,
        F: FnOnce(std::sync::mpsc::SyncSender<slotio::Met>, &std::sync::atomic::AtomicBool) -> T
            + Send
            + 'static,
    {
        let (tx, met) = std::sync::mpsc::sync_channel(MET_QUEUE);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A cut started while another one winds down (a source that lacks a
        // chunk, answered while a stopped cut's last blocks are read, resumes
        // the cut from within the outer one's handover; the nested cut runs to
        // its end first) leaves the outer one's stop flag as it was.
        let outer = self.index_stop.replace(Arc::clone(&stop));
        let stopped = Arc::clone(&stop);
        let worker = std::thread::spawn(move || cut(tx, &stopped));
        let mut worker = StopCut {
            stop: Arc::clone(&stop),
            worker: Some(worker),
        };
        let handed = self.hand_over_cut(slot, met, &stop);
        self.index_stop = outer;
        let handed = handed?;
        let cut = worker.join();
        Ok(RanCut {
            cut,
            handed,
            stopped: stop.load(std::sync::atomic::Ordering::Acquire),
        })
    }

    /// Hands what the cut of `slot` meets to the engine as it comes (the chunks
    /// it needs, how far the cut is), carrying out what the engine asks
    /// meanwhile, until the cut ends; nothing more once
    /// the engine stopped it (`stop`, set by [`Output::StopIndex`]), or once the
    /// install the cut was for ended (failed: a write, sync or journal record
    /// that failed meanwhile, or the deployment withdrawn), when `stop` is set
    /// here. While a cut for an install from a [`Requests`] source runs, the
    /// source is served between what the cut meets, at least every
    /// [`CUT_SERVES_EVERY`] ([`Self::serve_requests`]): its answers reach the
    /// engine, the engine's timers run (a resumed cut that tells nothing is given
    /// up: `Timer::CutSilence`) and a withdrawn deployment stops the install,
    /// instead of all of it waiting for the cut's end (minutes on a slow disk).
    fn hand_over_cut(
        &mut self,
        slot: Slot,
        met: std::sync::mpsc::Receiver<slotio::Met>,
        stop: &std::sync::atomic::AtomicBool,
    ) -> anyhow::Result<u64> {
        use std::sync::mpsc::RecvTimeoutError;
        let mut handed = 0u64;
        // A cut made while idle (no install) runs to its end.
        let for_install = self.engine.is_installing();
        let mut last_journaled = std::time::Instant::now();
        let mut last_served = std::time::Instant::now();
        loop {
            let serving = for_install && self.requests.is_some() && self.engine.is_installing();
            let wait = if serving {
                CUT_SERVES_EVERY.saturating_sub(last_served.elapsed())
            } else {
                // Nothing else to do meanwhile.
                Duration::from_secs(3600)
            };
            let met = match met.recv_timeout(wait) {
                Ok(met) => Some(met),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if serving && last_served.elapsed() >= CUT_SERVES_EVERY {
                // As a turn of `pump`: what returned meanwhile (syncs) first.
                self.drain()?;
                self.serve_requests(Duration::ZERO, &mut last_journaled)?;
                last_served = std::time::Instant::now();
            }
            if for_install && !self.engine.is_installing() {
                stop.store(true, std::sync::atomic::Ordering::Release);
            }
            let Some(met) = met else { continue };
            if stop.load(std::sync::atomic::Ordering::Acquire) {
                // Nothing more from a cut the engine stopped (the worker ends at
                // its next block).
                continue;
            }
            let input = match met {
                // Hashed by the indexer as it cut the slot.
                slotio::Met::Chunk(chunk) => {
                    handed += 1;
                    Input::Chunk {
                        origin: Origin::Slot(slot),
                        chunk,
                    }
                }
                // The engine may stop the cut (`Output::StopIndex`).
                slotio::Met::Cut(cut) => Input::IndexProgress { slot, cut },
            };
            self.engine.handle(self.now(), input);
            self.drain()?;
        }
        Ok(handed)
    }

    /// Carries out [`Output::CutRest`]: cuts `slot` from the block boundary at
    /// or before `from` to `len` on a thread of its own, as though a chunk started
    /// there, handing the needed chunks met to the engine; then
    /// [`Input::CutRestEnded`], unless the engine stopped it. Nothing of it is
    /// recorded (what was cut before the stop was not kept: no index of the slot).
    /// Like the first cut, it is handed over by [`Driver::hand_over_cut`], which
    /// serves a request source meanwhile.
    fn cut_rest(
        &mut self,
        slot: Slot,
        chunking: shoal_artifact::Chunking,
        from: u64,
        len: u64,
    ) -> anyhow::Result<()> {
        let storage = self
            .dev
            .boot
            .open_reader(slot)
            .with_context(|| format!("cannot open slot {slot}"))?;
        let len = len.min(storage.len()?);
        // A block boundary at or before the slot's end (a cut starts at one).
        let start = rest_start(from, chunking).min(len - len % slotio::BLOCK as u64);
        let wanted = self.engine.needed_chunks();
        let ran = self.run_cut(slot, move |tx, stop| {
            // Counted, not listed: nothing of it is kept.
            slotio::count_cut(
                &*storage,
                start,
                len,
                chunking,
                &|id| wanted.contains(id),
                Some(&slotio::Handover { tx: &tx, stop }),
            )
        })?;
        let (chunks, handed) = (
            ran.cut.with_context(|| format!("cannot cut slot {slot}"))?,
            ran.handed,
        );
        if ran.stopped {
            info!(slot = %slot, from, start, chunks, handed, "stopped the resumed cut of the active slot");
            return Ok(());
        }
        info!(slot = %slot, from, start, chunks, handed, "cut the rest of the active slot");
        self.engine.handle(self.now(), Input::CutRestEnded { slot });
        Ok(())
    }
}

/// Where a resumed cut that the engine asks from `from` starts: the block boundary
/// at or before `from - 2 * max_size`. Cut as though a chunk started there, it
/// meets the slot's own chunk starts within a few chunks (a chunk ends where the
/// content says, at most `max_size` on): so by `from` it cuts where the whole
/// cut does, and the chunk that straddles `from` (where the first cut stopped)
/// and those after it are met where they lie, not fetched.
fn rest_start(from: u64, chunking: shoal_artifact::Chunking) -> u64 {
    let back = from.saturating_sub(2 * u64::from(chunking.max_size));
    back - back % slotio::BLOCK as u64
}

fn short(e: &Event) -> String {
    match e {
        Event::Accepted {
            release,
            target,
            resumed_bytes,
        } => {
            format!("accepted {release} for slot {target} ({resumed_bytes} bytes already done)")
        }
        Event::Indexing { slot, len } => format!("indexing slot {slot} ({len} bytes)"),
        Event::IndexStopped { slot, cut, found } => format!(
            "stopped indexing slot {slot} after {cut} bytes: {found} bytes of this release \
             found in them; taking the rest from the source"
        ),
        Event::CutResumed { slot, from } => format!(
            "indexing slot {slot} again from byte {from}: a chunk still needed now comes \
             from the network"
        ),
        Event::Verifying { slot } => format!("verifying slot {slot}"),
        Event::Armed { release, slot } => {
            format!("{release} armed for a trial boot of slot {slot}")
        }
        Event::Failed(err) => format!("failed: {err}"),
        Event::SourceBanned { source } => format!("{source} sent a corrupt chunk; banned"),
        Event::Checking { release } => format!("checking {release}"),
        Event::TrialPending { slot } => format!("trial of slot {slot} pending"),
        Event::Committed { release, slot } => format!("{release} committed on slot {slot}"),
        Event::RolledBack {
            release,
            slot,
            reason,
        } => format!("{release} on slot {slot} rolled back: {reason}"),
    }
}

/// `path` as an install source (`-` = stdin; a directory = chunk store).
pub fn source_from_arg(arg: &str, release: Option<String>) -> anyhow::Result<Source> {
    if arg == "-" {
        return Ok(Source::Artifact {
            name: "stdin".into(),
            reader: ArtifactInput::Stream(Box::new(io::stdin())),
        });
    }
    let path = Path::new(arg);
    let meta = std::fs::metadata(path).map_err(|e| Exit::usage(format!("{arg}: {e}")))?;
    if meta.is_dir() {
        return Ok(Source::Store {
            dir: path.to_path_buf(),
            release,
        });
    }
    if release.is_some() {
        return Err(Exit::usage(
            "--release only applies to a chunk store directory",
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| Exit::usage(format!("{arg}: {e}")))?;
    Ok(Source::Artifact {
        name: arg.to_string(),
        reader: if meta.is_file() {
            ArtifactInput::File(file)
        } else {
            ArtifactInput::Stream(Box::new(file))
        },
    })
}

#[cfg(test)]
mod reference_tests {
    use super::*;

    /// References over a file of `len` patterned bytes.
    fn references(len: usize) -> (tempfile::TempDir, Vec<u8>, References) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("slot-a.img");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let storage = shoal_bootctl::FileStorage::open(&path, false).expect("open");
        let refs = References::new(Slot::A, Box::new(storage), len as u64, "base 1".into());
        (dir, data, refs)
    }

    #[test]
    fn overlapping_ranges_are_read_from_the_slot_once() {
        let len = 5 * SLOT_BLOCK as usize + 1000;
        let (_dir, data, mut refs) = references(len);
        for (offset, n) in [(100u64, 150_000usize), (70_000, 200_000), (0, 10)] {
            let mut buf = vec![0u8; n];
            refs.read_range(offset, &mut buf).expect("read");
            assert_eq!(buf, data[offset as usize..offset as usize + n]);
        }
        // The blocks that hold both first ranges (0..270 000): each read once.
        assert_eq!(
            refs.read_slot_bytes,
            270_000u64.div_ceil(SLOT_BLOCK) * SLOT_BLOCK
        );
        // The partial last block, then past the end of the slot.
        let mut tail = vec![0u8; 1500];
        refs.read_range(len as u64 - 1500, &mut tail).expect("tail");
        assert_eq!(tail, data[len - 1500..]);
        let mut past = vec![0u8; 10];
        let err = refs
            .read_range(len as u64 - 5, &mut past)
            .expect_err("past the end");
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn only_the_latest_blocks_are_kept() {
        let blocks = SLOT_BLOCKS_KEPT + 4;
        let (_dir, data, mut refs) = references(blocks * SLOT_BLOCK as usize);
        let mut buf = vec![0u8; data.len()];
        refs.read_range(0, &mut buf).expect("read");
        assert_eq!(buf, data);
        assert_eq!(refs.blocks.len(), SLOT_BLOCKS_KEPT);
        // The first block was dropped: reading it again reads the slot again.
        let before = refs.read_slot_bytes;
        let mut first = vec![0u8; 10];
        refs.read_range(0, &mut first).expect("read");
        assert_eq!(first, data[..10]);
        assert_eq!(refs.read_slot_bytes, before + SLOT_BLOCK);
    }
    /// A reference over `blocks` (whole slot blocks) decoding the chunks at
    /// `chunks`; `tag` makes its hash its own (the decoding checks it, not this).
    fn reference(blocks: std::ops::Range<u64>, chunks: &[u32], tag: u8) -> Reference {
        Reference {
            ranges: vec![(
                blocks.start * SLOT_BLOCK,
                u32::try_from((blocks.end - blocks.start) * SLOT_BLOCK).expect("small"),
            )],
            hash: [tag; 32],
            chunks: chunks.to_vec(),
        }
    }

    /// A reference whose bytes the copy of kept chunks read lately is taken from
    /// its blocks, not read again; one outside them is read.
    #[test]
    fn references_in_the_copys_blocks_are_not_read_again() {
        let len = 12 * slotio::BLOCK;
        let (dir, data, mut refs) = references(len);
        let storage =
            shoal_bootctl::FileStorage::open(&dir.path().join("slot-a.img"), false).expect("open");
        let mut ahead = slotio::ReadAhead::start(Box::new(storage), len as u64);
        refs.recent = Some(ahead.recent());
        // The copy reads the slot's first 3 MiB.
        for at in (0..3 * slotio::BLOCK).step_by(128 * 1024) {
            ahead
                .read(at as u64, 128 * 1024)
                .expect("read")
                .expect("ahead");
        }
        let near = reference(8..12, &[0], 1);
        let got = refs.get(&near).expect("near");
        assert_eq!(
            got.bytes(),
            &data[8 * SLOT_BLOCK as usize..12 * SLOT_BLOCK as usize]
        );
        assert_eq!(
            (refs.read_slot_calls, refs.recent_hits.0),
            (0, 4 * SLOT_BLOCK)
        );
        let far = reference(40..41, &[1], 2);
        let got = refs.get(&far).expect("far");
        assert_eq!(
            got.bytes(),
            &data[40 * SLOT_BLOCK as usize..41 * SLOT_BLOCK as usize]
        );
        assert_eq!(refs.read_slot_calls, 1);
    }

    #[test]
    fn a_missing_block_is_read_with_the_blocks_after_it_the_range_needs() {
        let (_dir, data, mut refs) = references(10 * SLOT_BLOCK as usize);
        let mut buf = vec![0u8; 7 * SLOT_BLOCK as usize - 100];
        refs.read_range(50, &mut buf).expect("read");
        assert_eq!(buf, data[50..50 + buf.len()]);
        // Blocks 0..7 in runs of up to `SLOT_RUN_BLOCKS` (2: four reads), not
        // seven.
        assert_eq!(
            (refs.read_slot_calls, refs.read_slot_bytes),
            (7u64.div_ceil(SLOT_RUN_BLOCKS), 7 * SLOT_BLOCK)
        );
    }

    #[test]
    fn a_read_brings_the_blocks_the_batch_needs_next() {
        let (_dir, data, mut refs) = references(10 * SLOT_BLOCK as usize);
        let run = SLOT_RUN_BLOCKS;
        let x = reference(0..1, &[0], 1);
        let y = reference(1..run, &[1], 2);
        refs.batch([&x, &y]);
        let got = refs.get(&x).expect("x");
        assert_eq!(got.bytes(), &data[..SLOT_BLOCK as usize]);
        // Block 0 was read with the blocks after it that y needs.
        assert_eq!(
            (refs.read_slot_calls, refs.read_slot_bytes),
            (1, run * SLOT_BLOCK)
        );
        let got = refs.get(&y).expect("y");
        assert_eq!(
            got.bytes(),
            &data[SLOT_BLOCK as usize..(run * SLOT_BLOCK) as usize]
        );
        assert_eq!(refs.read_slot_calls, 1);
    }

    #[test]
    fn the_block_given_up_is_the_one_needed_again_last() {
        let (_dir, data, mut refs) = references(24 * SLOT_BLOCK as usize);
        let kept = SLOT_BLOCKS_KEPT as u64;
        // a and c need the same blocks, b one block far away between them, d the
        // same far block after c.
        let a = reference(0..kept, &[0], 1);
        let b = reference(20..21, &[1], 2);
        let c = reference(0..kept, &[2], 3);
        let d = reference(20..21, &[3], 4);
        refs.plan([&a, &b, &c, &d]);
        for r in [&a, &b, &c] {
            let got = refs.get(r).expect("read");
            let (offset, n) = r.ranges[0];
            assert_eq!(
                got.bytes(),
                &data[offset as usize..offset as usize + n as usize]
            );
        }
        // a: its blocks in runs of `SLOT_RUN_BLOCKS`; b: one block, which gives
        // up one of a's (all needed again by c); c: that one block again, giving
        // up b's block (needed last, by d) rather than one of its own. Least
        // recently used first, c would read all of its blocks again, each giving
        // up the next.
        assert_eq!(
            (refs.read_slot_calls, refs.read_slot_bytes),
            (kept.div_ceil(SLOT_RUN_BLOCKS) + 2, (kept + 2) * SLOT_BLOCK)
        );
        assert!(refs.blocks.iter().all(|(i, _)| *i < kept));
    }
}

#[cfg(test)]
mod index_along_tests {
    use super::*;
    use shoal_artifact::ChunkRef;

    fn ids(list: &[ChunkRef]) -> impl Iterator<Item = (ChunkId, u32)> + '_ {
        list.iter().map(|c| (c.id, c.size))
    }

    fn chunk(seed: u8, size: u32) -> ChunkRef {
        ChunkRef {
            id: ChunkId::of(&[seed; 8]),
            size,
            stored_size: size,
        }
    }

    /// An index made along a release's chunk list holds that release when each
    /// chunk is listed at its offset with its id and length, or left out as the
    /// repeat of the one before it; anything else sends the index back to the
    /// content cut.
    #[test]
    fn holds_chunks_accepts_the_release_and_its_collapsed_runs_only() {
        let (a, z, b) = (chunk(1, 5000), chunk(0, 8000), chunk(2, 6000));
        let expected = [a, z, z, z, b];
        let listed = |c: &ChunkRef, at: u64| (at, c.id, c.size);
        let index = vec![listed(&a, 0), listed(&z, 5000), listed(&b, 29_000)];
        assert!(holds_chunks(&index, ids(&expected)));
        // Every repeat listed too (an index that does not collapse runs).
        let mut all = index.clone();
        all.insert(2, listed(&z, 13_000));
        all.insert(3, listed(&z, 21_000));
        assert!(holds_chunks(&all, ids(&expected)));
        // Another id where the release has one.
        let mut other = index.clone();
        other[2].1 = chunk(3, 6000).id;
        assert!(!holds_chunks(&other, ids(&expected)));
        // Another length.
        let mut shorter = index.clone();
        shorter[0].2 = 4999;
        assert!(!holds_chunks(&shorter, ids(&expected)));
        // A chunk missing that is no repeat.
        assert!(!holds_chunks(&index[..2], ids(&expected)));
        assert!(!holds_chunks(&[], ids(&expected)));
    }

    /// A release's ids read by position from memory; every read from the
    /// `fail_from`th on fails.
    #[derive(Debug)]
    struct FailingIds {
        ids: Vec<ChunkId>,
        reads: std::sync::atomic::AtomicUsize,
        fail_from: usize,
    }

    impl shoal_engine::ChunkIdFile for FailingIds {
        fn read_ids(&self, from: u32, out: &mut [ChunkId]) -> io::Result<()> {
            use std::sync::atomic::Ordering::Relaxed;
            if self.reads.fetch_add(1, Relaxed) >= self.fail_from {
                return Err(io::Error::other("the ids file went away"));
            }
            out.copy_from_slice(&self.ids[from as usize..][..out.len()]);
            Ok(())
        }

        fn describe(&self) -> String {
            "the test's ids".to_owned()
        }
    }

    /// The slot holds the release its kept list names, but the list's ids
    /// cannot be read from some read on (the check's passes, or the later pass
    /// that writes the index): the index is not the partial one along the list
    /// but the slot cut by content, whole, as when no list is kept.
    #[test]
    fn ids_unreadable_on_any_pass_index_the_slot_by_content() {
        use std::sync::atomic::Ordering::Relaxed;
        let chunking = shoal_artifact::chunk::CHUNKING_FAST;
        let data = crash_tests::bytes(5, 40 * 1024 * 1024);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("slot");
        std::fs::write(&path, &data).expect("slot");
        let storage = shoal_bootctl::storage::FileStorage::open(&path, true).expect("open");
        let len = data.len() as u64;
        let list = shoal_artifact::chunk::index(&data[..], chunking).expect("cut");
        assert!(list.len() > 2 * Expected::BLOCK, "{}", list.len());
        // The new release wants every other chunk of the slot.
        let keys: std::collections::HashMap<ChunkId, u32> = list
            .iter()
            .step_by(2)
            .enumerate()
            .map(|(k, c)| (c.1, k as u32))
            .collect();
        let wanted = |id: &ChunkId| keys.get(id).copied();
        let run = |fail_from: usize| {
            let data_dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(data_dir.path()).expect("store");
            let ids = Arc::new(FailingIds {
                ids: list.iter().map(|c| c.1).collect(),
                reads: 0.into(),
                fail_from,
            });
            let expected = Expected {
                sizes: list.iter().map(|c| c.2).collect(),
                ids: ids.clone(),
                error: std::sync::Mutex::new(None),
            };
            let out =
                index_along_kept(&store, Slot::A, &storage, len, chunking, &expected, &wanted)
                    .expect("indexed");
            let index = store.slot_index_entries(Slot::A).expect("index");
            (out, index, ids.reads.load(Relaxed))
        };
        let ((written, partial, sampled), along, reads) = run(usize::MAX);
        assert!(partial);
        assert!(sampled > 0);
        assert_eq!(written, keys.len() as u64);
        assert_eq!(along.len(), keys.len());
        // The cut by content, as the driver records it.
        let content = {
            let data_dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(data_dir.path()).expect("store");
            let chunks =
                slotio::list_chunks(&storage, len, chunking, slotio::Repeats::Once).expect("cut");
            let written = store.write_slot_index_from(Slot::A, chunks).expect("write");
            (written, store.slot_index_entries(Slot::A).expect("index"))
        };
        assert!(content.1.len() > along.len());
        // Three passes over the list, each of several reads: the last fails
        // only in the pass that writes the index.
        let per_pass = list.len().div_ceil(Expected::BLOCK);
        assert_eq!(reads, 3 * per_pass);
        for fail_from in [0, 1, per_pass, 2 * per_pass, 2 * per_pass + 1, reads - 1] {
            let ((written, partial, sampled), index, _) = run(fail_from);
            assert!(!partial, "failing from read {fail_from}");
            assert_eq!(sampled, 0);
            assert_eq!((written, index), content, "failing from read {fail_from}");
        }
    }
}

#[cfg(test)]
mod expected_tests {
    use super::*;
    use shoal_engine::testing;

    /// The kept manifest's chunk list is read by position (its ids from the
    /// kept `<hash>.ids`, a block at a time: 300 chunks cross a block; an id that
    /// cannot be read is zeros with the error kept), and a kept
    /// file that cannot serve (none, another manifest under its name, a changed
    /// byte, not an envelope) or a list that does not fit the slot (another
    /// chunking, a payload larger than the slot) is `None`: the slot is then cut
    /// by content. Nothing is left in the data directory.
    #[test]
    fn the_kept_chunk_list_is_read_by_position_and_what_cannot_serve_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path();
        let (key, _) = testing::keys(1);
        let image = testing::bytes(7, 300 * 1024);
        let (manifest, _) = testing::release_cut("os", "1", 1, "board", &image, &[1024]);
        let hash = manifest.hash();
        let chunking = manifest.chunking;
        let len = image.len() as u64;
        assert!(
            expected_chunks(data, &hash, chunking, len).is_none(),
            "none kept"
        );
        let envelope = testing::sign(&manifest, &key);
        KeptManifests::save(data, &hash, &envelope).expect("kept");
        let want: Vec<(ChunkId, u32)> = manifest.payloads[0]
            .chunks
            .iter()
            .map(|c| (c.id, c.size))
            .collect();
        assert!(want.len() > Expected::BLOCK, "{}", want.len());
        let expected = expected_chunks(data, &hash, chunking, len).expect("read");
        assert_eq!(expected.chunks().collect::<Vec<_>>(), want);
        // Read twice (the check and the comparison each read it once).
        assert_eq!(expected.chunks().count(), want.len());
        assert_eq!(expected.read_error(), None);
        drop(expected);
        // The ids went to the kept manifest's own `<hash>.ids`, which a second
        // read checks and keeps (the same file, not written again).
        let ids_path = data
            .join("manifests")
            .join(format!("{}.ids", hex::encode(hash)));
        assert_eq!(
            std::fs::metadata(&ids_path).expect("ids").len(),
            want.len() as u64 * 32
        );
        let inode = |p: &Path| {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(p).expect("ids").ino()
        };
        let before = inode(&ids_path);
        let expected = expected_chunks(data, &hash, chunking, len).expect("read");
        assert_eq!(inode(&ids_path), before, "the same ids file");
        // Ids that cannot be read: zeros, and the first error kept for the
        // caller, which then cuts the slot by content.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&ids_path)
            .and_then(|f| f.set_len(32 * Expected::BLOCK as u64))
            .expect("cut short");
        let read: Vec<(ChunkId, u32)> = expected.chunks().collect();
        assert_eq!(read[..Expected::BLOCK], want[..Expected::BLOCK]);
        assert!(
            read[Expected::BLOCK..]
                .iter()
                .all(|(id, _)| id.0 == [0; 32])
        );
        assert_eq!(
            expected.read_error(),
            Some(format!(
                "cannot read {}: failed to fill whole buffer",
                ids_path.display()
            ))
        );
        drop(expected);
        std::fs::remove_file(&ids_path).expect("rm");
        // Does not fit: a slot shorter than the payload, another chunking.
        assert!(expected_chunks(data, &hash, chunking, len - 1).is_none());
        let mut other = chunking;
        other.avg_size *= 2;
        assert!(expected_chunks(data, &hash, other, len).is_none());
        // Another release's manifest under this name.
        let (another, _) = testing::release_cut("os", "2", 1, "board", &image, &[4096]);
        KeptManifests::save(data, &hash, &testing::sign(&another, &key)).expect("kept");
        assert!(expected_chunks(data, &hash, chunking, len).is_none());
        // A byte of the signed manifest changed (inside a chunk id: still laid
        // out as an envelope, no longer the bytes named).
        let mut changed = envelope.clone();
        let at = changed.len() / 2;
        changed[at] ^= 0x01;
        KeptManifests::save(data, &hash, &changed).expect("kept");
        assert!(expected_chunks(data, &hash, chunking, len).is_none());
        // Not an envelope.
        KeptManifests::save(data, &hash, b"not an envelope").expect("kept");
        assert!(expected_chunks(data, &hash, chunking, len).is_none());
        // The good one again reads; nothing but the kept files is left.
        KeptManifests::save(data, &hash, &envelope).expect("kept");
        assert!(expected_chunks(data, &hash, chunking, len).is_some());
        let left: Vec<_> = std::fs::read_dir(data)
            .expect("data dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("manifests")]);
    }
}

#[cfg(test)]
mod kept_tests {
    use super::*;
    use shoal_engine::testing;

    /// The running release's kept envelope is verified from its file, its ids
    /// written beside it and read back by position; a file named after another
    /// manifest, or one that does not verify, is an error naming the file; none
    /// kept is `None`; pruning takes the ids with their envelope.
    #[test]
    fn a_kept_envelope_verifies_from_its_file_with_its_ids_beside_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path();
        let (key, root) = testing::keys(1);
        let image = testing::bytes(5, 64 * 1024);
        let (manifest, _) = testing::release_cut("os", "1", 1, "board", &image, &[4096]);
        let envelope = testing::sign(&manifest, &key);
        let hash = manifest.hash();
        assert!(
            KeptManifests::verify(data, &root, &hash, None)
                .expect("no error")
                .is_none()
        );
        KeptManifests::save(data, &hash, &envelope).expect("kept");
        let (release, (path, file, len)) = KeptManifests::verify(data, &root, &hash, None)
            .expect("verifies")
            .expect("kept");
        assert_eq!(release.release().manifest_hash, hash);
        assert_eq!(len, envelope.len() as u64);
        assert_eq!(
            path,
            data.join("manifests")
                .join(format!("{}.envelope", hex::encode(hash)))
        );
        // What is served is read from the handle verified, not the path: an
        // envelope renamed over it later is not.
        let served =
            crate::lan::serve::EnvelopeAt::of(&release, Some((path, file, len))).expect("at hand");
        assert_eq!(release.chunk_count(), 16);
        let ids_path = data
            .join("manifests")
            .join(format!("{}.ids", hex::encode(hash)));
        assert_eq!(std::fs::metadata(&ids_path).expect("ids").len(), 16 * 32);
        let first = ChunkId::from(blake3::hash(&image[..4096]));
        assert_eq!(release.first_position(&first), Some((0, 0, 4096)));
        // Verified again (the daemon's next start): the ids on disk are the
        // manifest's, so they are read, not written again.
        let inode = |p: &Path| {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(p).expect("ids").ino()
        };
        let before = inode(&ids_path);
        let (again, _) = KeptManifests::verify(data, &root, &hash, None)
            .expect("verifies")
            .expect("kept");
        assert_eq!(again.first_position(&first), Some((0, 0, 4096)));
        assert_eq!(inode(&ids_path), before, "the same ids file");

        // Another release's envelope under this name.
        let (other, _) = testing::release_cut("os", "2", 1, "board", &image, &[8192]);
        KeptManifests::save(data, &hash, &testing::sign(&other, &key)).expect("kept");
        assert_eq!(served.read().expect("read"), envelope);
        let e = KeptManifests::verify(data, &root, &hash, None).expect_err("another's");
        assert!(
            format!("{e:#}").ends_with("is not the manifest it is named after"),
            "{e:#}"
        );
        // Signed by a key the root does not know.
        let (stranger, _) = testing::keys(2);
        KeptManifests::save(data, &hash, &testing::sign(&manifest, &stranger)).expect("kept");
        let e = KeptManifests::verify(data, &root, &hash, None).expect_err("unsigned");
        assert!(
            matches!(
                e.downcast_ref::<shoal_engine::OfferError>(),
                Some(shoal_engine::OfferError::Signature(_))
            ),
            "{e:#}"
        );

        // The temporary ids of a verification killed midway go with their
        // release: another release's now, this one's when it is dropped.
        let tmp_of = |h: &[u8; 32]| {
            data.join("manifests")
                .join(format!("{}.ids.tmp", hex::encode(h)))
        };
        std::fs::write(tmp_of(&hash), [0; 64]).expect("orphan");
        std::fs::write(tmp_of(&[7; 32]), [0; 64]).expect("orphan");
        KeptManifests::prune(data, &[hash]).expect("pruned");
        assert!(
            tmp_of(&hash).exists(),
            "a kept release's may be being written"
        );
        assert!(!tmp_of(&[7; 32]).exists());
        KeptManifests::prune(data, &[]).expect("pruned");
        assert!(!ids_path.exists());
        assert!(!tmp_of(&hash).exists());
    }

    /// The daemon's one verification (`Device::verify_envelope`) stores the
    /// envelope with its ids beside it; a refused one leaves neither;
    /// `forget_release` removes both, unless a deployment names the envelope.
    #[test]
    fn a_verified_envelope_is_stored_with_its_ids_and_forgotten_unless_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (config, _) = crate::lan::tests::device(dir.path(), 1, None, &[]);
        let dev = Device::open(config.clone(), Reboot::Command).expect("open");
        let image = testing::bytes(5, 64 * 1024);
        let (manifest, _) = testing::release_cut("os", "1", 1, "board", &image, &[4096]);
        let hash = manifest.hash();
        let envelope = testing::sign(&manifest, &crate::lan::tests::key(2));
        let stored = *blake3::hash(&envelope).as_bytes();
        let envelopes = store::envelope_file(&config.device.data_dir, &stored)
            .parent()
            .expect("a directory")
            .to_path_buf();
        let names = || {
            let mut n: Vec<String> = match std::fs::read_dir(&envelopes) {
                Ok(d) => d
                    .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                    .collect(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => panic!("{e}"),
            };
            n.sort();
            n
        };
        // Refused (a release key the root does not know): no file left.
        let stranger = testing::sign(&manifest, &crate::lan::tests::key(9));
        let e = dev.verify_envelope(stranger).expect_err("refused");
        assert!(
            matches!(
                e.downcast_ref::<shoal_engine::OfferError>(),
                Some(shoal_engine::OfferError::Signature(_))
            ),
            "{e:#}"
        );
        assert_eq!(names(), Vec::<String>::new());
        // Verified: stored, its ids beside it.
        let release = dev.verify_envelope(envelope.clone()).expect("verifies");
        assert_eq!(release.release().manifest_hash, hash);
        assert_eq!(release.stored_hash(), Some(stored));
        let h = hex::encode(stored);
        let both = [format!("{h}.envelope"), format!("{h}.ids")];
        assert_eq!(names(), both);
        // Not installed after all: both go.
        dev.forget_release(&release);
        assert_eq!(names(), Vec::<String>::new());
        // Named by a deployment: both stay.
        let release = dev.verify_envelope(envelope).expect("verifies");
        dev.store
            .apply(&[shoal_engine::Record::EnvelopeStored(stored)])
            .expect("named");
        dev.forget_release(&release);
        assert_eq!(names(), both);
    }

    /// A chunk store's release is copied as picked: a file changed between the
    /// pick and the copy is refused as changed, before it is verified, nothing
    /// of it kept in the device store; the copy's errors say which side failed
    /// (the store's file read, or the device store written).
    #[test]
    fn a_picked_store_release_changed_before_its_copy_is_refused_and_not_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (config, _) = crate::lan::tests::device(dir.path(), 1, None, &[]);
        let dev = Device::open(config.clone(), Reboot::Command).expect("open");
        let key = crate::lan::tests::key(2);
        // 2048 chunks: an envelope of more than one 64 KiB block.
        let image = testing::bytes(5, 2 << 20);
        let (v1, _) = testing::release_cut("os", "1", 1, "board", &image, &[1024]);
        let (v2, _) = testing::release_cut("os", "2", 2, "board", &image, &[2048]);
        let (e1, e2) = (testing::sign(&v1, &key), testing::sign(&v2, &key));
        assert!(e1.len() > 64 * 1024);
        let sticks = dir.path().join("stick");
        let store = ChunkStore::open(&sticks).expect("store");
        let path = sticks.join("manifests").join("one.envelope");
        std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
        std::fs::write(&path, &e1).expect("write");
        let picked = store.release_head(&path, &dev.root, None).expect("head");
        assert_eq!(picked.manifest_hash, v1.hash());
        let envelopes = store::envelope_file(&config.device.data_dir, &[0; 32])
            .parent()
            .expect("a directory")
            .to_path_buf();
        let kept = || match std::fs::read_dir(&envelopes) {
            Ok(d) => d.count(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => panic!("{e}"),
        };

        // Swapped for another release, signed as well.
        std::fs::write(&path, &e2).expect("write");
        let e = dev.copy_picked(&picked, None).expect_err("changed");
        assert_eq!(
            format!("{e:#}"),
            format!(
                "{} changed since the release was picked from it (its bytes hashed {}, they now hash {}): nothing of it was installed",
                path.display(),
                hex::encode(blake3::hash(&e1).as_bytes()),
                hex::encode(blake3::hash(&e2).as_bytes())
            )
        );
        assert_eq!(kept(), 0, "nothing kept");

        // The device store cannot be written: said so, not as a read of the
        // stick's file.
        std::fs::write(&path, &e1).expect("write");
        std::fs::create_dir_all(&envelopes).expect("dir");
        std::os::unix::fs::symlink("/dev/full", envelopes.join("encoding.tmp")).expect("link");
        let e = dev.copy_picked(&picked, None).expect_err("full");
        assert_eq!(
            format!("{e:#}"),
            "cannot store the signed manifest: No space left on device (os error 28)"
        );
        assert_eq!(kept(), 0, "nothing kept");
        // The stick's file cannot be read (a directory now).
        std::fs::remove_file(&path).expect("rm");
        std::fs::create_dir(&path).expect("dir");
        let e = dev.copy_picked(&picked, None).expect_err("a directory");
        assert_eq!(
            format!("{e:#}"),
            format!(
                "cannot read {}: Is a directory (os error 21)",
                path.display()
            )
        );
        assert_eq!(kept(), 0, "nothing kept");

        // As picked: verified from the copy, the release picked.
        std::fs::remove_dir(&path).expect("rm");
        std::fs::write(&path, &e1).expect("write");
        let (release, copied) = dev.copy_picked(&picked, None).expect("copied");
        assert_eq!(release.release().manifest_hash, v1.hash());
        assert_eq!(copied, e1.len() as u64);
    }
}

#[cfg(test)]
mod replay_tests {
    use super::*;
    use std::io::Write;

    /// The install's file source serves what the signer check read from memory:
    /// the reader gets the file's bytes, and each byte is read from the file once.
    #[test]
    fn a_replayed_file_gives_the_files_bytes_and_reads_each_once() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut file = tempfile::tempfile().expect("tempfile");
        file.write_all(&data).expect("write");
        file.rewind().expect("rewind");
        // As the signer check reads: the first block and a piece further on.
        let mut rec = Recording {
            file: &mut file,
            seen: Vec::new(),
        };
        rec.read_exact(&mut [0u8; 512]).expect("read");
        rec.seek(io::SeekFrom::Start(5_000)).expect("seek");
        rec.read_exact(&mut [0u8; 100]).expect("read");
        rec.seek(io::SeekFrom::Start(0)).expect("seek");
        let seen = rec.seen;
        let mut src = CountingInput::file(Replayed::new(file, 0, seen));
        let mut head = vec![0u8; 600];
        src.read_exact(&mut head).expect("read");
        shoal_artifact::read::Skip::skip(&mut src, 100).expect("skip");
        let mut rest = Vec::new();
        src.read_to_end(&mut rest).expect("read");
        assert_eq!(head, data[..600]);
        assert_eq!(rest, data[700..]);
        // Everything but the 100 bytes skipped, once.
        assert_eq!(src.bytes_read(), 9_900);
    }
}

#[cfg(test)]
mod stop_cut_tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::StopCut;

    /// A way out of the handover before the join (an error from `drain`) stops
    /// the cut and waits for its thread: nothing goes on cutting the slot.
    #[test]
    fn leaving_before_the_join_stops_the_cut_and_waits_for_it() {
        let stop = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicBool::new(false));
        let worker = {
            let (stop, ended) = (Arc::clone(&stop), Arc::clone(&ended));
            std::thread::spawn(move || {
                let start = std::time::Instant::now();
                while !stop.load(Ordering::Acquire)
                    && start.elapsed() < std::time::Duration::from_secs(10)
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                ended.store(true, Ordering::Release);
            })
        };
        let handover = || -> anyhow::Result<()> {
            let _cut = StopCut {
                stop: Arc::clone(&stop),
                worker: Some(worker),
            };
            anyhow::bail!("the handover failed")
        };
        assert_eq!(handover().unwrap_err().to_string(), "the handover failed");
        assert!(stop.load(Ordering::Acquire), "the cut was told to stop");
        assert!(ended.load(Ordering::Acquire), "and its thread ended");
    }
}

#[cfg(test)]
mod cut_rest_tests {
    use super::*;

    /// Asked from a point just past a block boundary (where a first cut
    /// stopped), the resumed cut starts at a block boundary far enough before it
    /// to cut every chunk from there where the whole cut does: it hands over the
    /// chunk straddling the point and every one after it, and its progress as
    /// offsets in the slot, to the slot's end (from the boundary at or before the
    /// point, the first few were cut elsewhere).
    #[test]
    fn a_resumed_cut_meets_every_chunk_from_where_it_was_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("slot-a.img");
        let data = crash_tests::bytes(0x9e37_79b9_7f4a_7c15, 4 * slotio::BLOCK);
        std::fs::write(&path, &data).expect("write");
        let storage = shoal_bootctl::FileStorage::open(&path, false).expect("open");
        let len = data.len() as u64;
        let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
        let whole =
            slotio::list_chunks(&storage, len, chunking, slotio::Repeats::Listed).expect("cut");
        let block = slotio::BLOCK as u64;
        for asked in [block + 100, 2 * block + 7_000, 3 * block] {
            let start = rest_start(asked, chunking);
            assert_eq!(start % block, 0);
            assert!(start + 2 * u64::from(chunking.max_size) <= asked);
            let straddling = whole
                .iter()
                .position(|c| c.0 + u64::from(c.2) > asked)
                .expect("a chunk there");
            let wanted: HashSet<ChunkId> = whole[straddling..].iter().map(|c| c.1).collect();
            let (tx, rx) = std::sync::mpsc::sync_channel(MET_QUEUE);
            let stop = std::sync::atomic::AtomicBool::new(false);
            let (met, cuts) = std::thread::scope(|s| {
                let receiver = s.spawn(move || {
                    let (mut met, mut cuts) = (HashSet::new(), Vec::new());
                    for m in rx {
                        match m {
                            slotio::Met::Chunk(c) => {
                                met.insert(c.chunk().id);
                            }
                            slotio::Met::Cut(n) => cuts.push(n),
                        }
                    }
                    (met, cuts)
                });
                slotio::count_cut(
                    &storage,
                    start,
                    len,
                    chunking,
                    &|id| wanted.contains(id),
                    Some(&slotio::Handover {
                        tx: &tx,
                        stop: &stop,
                    }),
                )
                .expect("cut");
                drop(tx);
                receiver.join().expect("receiver")
            });
            assert_eq!(met, wanted, "asked from {asked}");
            assert!(cuts.iter().all(|&n| n > start), "{cuts:?} from {start}");
            assert_eq!(cuts.last(), Some(&len));
        }
    }
}
