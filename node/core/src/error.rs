//! Errors, one enum per engine operation. They derive `Clone` and `PartialEq` so the
//! simulator and tests can assert on them.

use shoal_artifact::{BaseRelease, ChunkId, ManifestError};
use shoal_signing::{DecodeError, VerifyError};

use crate::source::Origin;
use crate::state::{Phase, Slot};

/// Why an offered release was refused. Nothing was written when an offer fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// The signed envelope could not be decoded.
    #[error("the manifest envelope is malformed: {0}")]
    Envelope(#[from] DecodeError),
    /// The envelope is not signed by enough keys of the device's trust root.
    #[error("the release signature does not verify against the device's trust root: {0}")]
    Signature(#[from] VerifyError),
    /// The signed bytes are not a valid manifest.
    #[error("the signed manifest is invalid: {0}")]
    Manifest(#[from] ManifestError),
    /// The driver's store of the release's chunk ids failed (a device: the file
    /// next to the stored envelope could not be written or read).
    #[error("{0}")]
    ChunkIds(String),
    /// The envelope file the driver stored could not be read, or is not the
    /// one it named ([`VerifiedRelease::verify_file`](crate::VerifiedRelease::verify_file)).
    #[error("{0}")]
    StoredEnvelope(String),
    /// A release verified against another trust root than the engine's was offered
    /// ([`Engine::offer_verified`](crate::Engine::offer_verified)).
    #[error("the release was verified against another trust root than this device's")]
    OtherTrustRoot,
    /// The release is not built for this device type.
    #[error("release is for device types {supported:?}, this device is {device_type:?}")]
    DeviceType {
        /// This device's type.
        device_type: String,
        /// The types the release supports.
        supported: Vec<String>,
    },
    /// The release depends on something the device does not provide.
    #[error("release depends on {key} being one of {wanted:?}, the device has {have:?}")]
    Depends {
        /// The depends key.
        key: String,
        /// The acceptable values.
        wanted: Vec<String>,
        /// What the device provides for that key, if anything.
        have: Option<String>,
    },
    /// The release's security counter is below the device's anti-rollback floor.
    #[error(
        "release security counter {counter} is below the device's anti-rollback floor {floor}; \
         refusing a downgrade"
    )]
    BelowFloor {
        /// The release's counter.
        counter: u64,
        /// The floor.
        floor: u64,
    },
    /// The release does not have exactly one root filesystem payload.
    #[error(
        "release has {rootfs} rootfs-image payload(s) and {other} other payload(s); this device installs exactly one rootfs-image"
    )]
    Payloads {
        /// Number of `rootfs-image` payloads.
        rootfs: usize,
        /// Number of other payloads.
        other: usize,
    },
    /// The root filesystem does not fit the inactive slot.
    #[error("the image is {need} bytes but slot {slot} holds only {capacity} bytes")]
    SlotTooSmall {
        /// The target slot.
        slot: Slot,
        /// The payload size.
        need: u64,
        /// The slot capacity.
        capacity: u64,
    },
    /// A deployment is between its trial boot and its commit or rollback.
    #[error(
        "release {release} is in phase {phase}; run `shoal boot-check`, `shoal commit` or `shoal rollback` first"
    )]
    Busy {
        /// The release in trial.
        release: String,
        /// Its phase.
        phase: Phase,
    },
}

/// An I/O operation a driver ran for an [`Output`](crate::Output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// [`Output::IndexSlot`](crate::Output::IndexSlot).
    IndexSlot,
    /// [`Output::Read`](crate::Output::Read).
    Read,
    /// Reading the active slot's index from the device store
    /// ([`IndexReader`](crate::IndexReader)).
    IndexRead,
    /// [`Output::Fetch`](crate::Output::Fetch), or reading a stream source.
    Fetch,
    /// [`Output::Write`](crate::Output::Write).
    Write,
    /// [`Output::Sync`](crate::Output::Sync).
    Sync,
    /// [`Output::Persist`](crate::Output::Persist).
    Persist,
    /// [`Output::HashSlot`](crate::Output::HashSlot).
    HashSlot,
    /// A bootloader output ([`Output::ArmTrial`](crate::Output::ArmTrial), disarm,
    /// commit, rollback).
    Bootloader,
    /// [`Output::Reboot`](crate::Output::Reboot).
    Reboot,
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoOp::IndexSlot => "indexing the active slot",
            IoOp::Read => "reading the active slot",
            IoOp::IndexRead => "reading the active slot's index",
            IoOp::Fetch => "reading the source",
            IoOp::Write => "writing the slot",
            IoOp::Sync => "syncing the slot",
            IoOp::Persist => "writing the device store",
            IoOp::HashSlot => "re-reading the slot to verify it",
            IoOp::Bootloader => "updating the bootloader",
            IoOp::Reboot => "rebooting",
        })
    }
}

/// Why an install stopped before its trial boot was armed. The progress journal is
/// kept: offering the release again resumes where it stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstallError {
    /// A chunk from a source that cannot be asked again (an artifact stream) did not
    /// hash to its id.
    #[error("chunk {id} from {origin} is corrupt (its hash does not match); the source is damaged")]
    CorruptChunk {
        /// Where it came from.
        origin: Origin,
        /// The chunk id.
        id: ChunkId,
    },
    /// Chunks are in no source and not on the device.
    #[error("{}", missing_message(*.count, *.bytes, .base, .active.as_deref()))]
    MissingChunks {
        /// How many distinct chunks are missing.
        count: usize,
        /// Their total size.
        bytes: u64,
        /// The release a thin artifact was built against: it holds them.
        base: Option<BaseRelease>,
        /// The release the active slot runs, when known.
        active: Option<String>,
    },
    /// Chunks are still needed and every source that could serve them failed
    /// (silent or erroring past the retry limit), was removed or was banned.
    #[error(
        "{count} chunk(s) ({bytes} bytes) are still needed and every source that could serve them failed or was banned; rerun the install to resume"
    )]
    SourcesFailed {
        /// How many distinct chunks are still needed.
        count: usize,
        /// Their total size.
        bytes: u64,
    },
    /// The release's chunk ids could not be read from the driver's file (a
    /// device: the file next to its stored envelope); nothing was written for a
    /// chunk whose id was not read.
    #[error(
        "{message}; rerun the install to resume (the ids are derived again from the signed manifest)"
    )]
    ChunkIds {
        /// What failed, naming the file.
        message: String,
    },
    /// The install needs more bytes over the WAN than the data budget allows.
    #[error(
        "this install needs {needed} bytes over the WAN but the data budget allows {allowed}; nothing more was fetched"
    )]
    OverBudget {
        /// Wire bytes it needs over the WAN (those asked already included).
        needed: u64,
        /// The budget.
        allowed: u64,
    },
    /// The slot, re-read after writing, does not hash to the payload hash.
    #[error(
        "slot {slot} does not verify after writing: expected hash {expected}, read {actual}; the journal was reset, rerun the install"
    )]
    VerifyFailed {
        /// The slot.
        slot: Slot,
        /// Expected BLAKE3, hex.
        expected: String,
        /// BLAKE3 read back, hex.
        actual: String,
    },
    /// The deployment was abandoned (e.g. the slot being written was booted).
    #[error("the install was abandoned: {reason}")]
    Abandoned {
        /// Why.
        reason: String,
    },
    /// The driver failed to carry out an output.
    #[error("{op} failed: {message}")]
    Io {
        /// What failed.
        op: IoOp,
        /// What the OS said.
        message: String,
    },
    /// The driver stopped reading a source ([`Input::SourceFailed`](crate::Input::SourceFailed)),
    /// for the reason it gave.
    #[error("reading {id} failed: {fault}")]
    Source {
        /// The source.
        id: crate::SourceId,
        /// Why.
        fault: SourceFault,
    },
}

impl InstallError {
    /// Whether running the same install again can succeed where this run stopped
    /// (the journal keeps what was verified, so a rerun resumes): a source that
    /// could not be read or sources that went silent may answer later; bytes that
    /// are bad, chunks no source holds, a budget, a slot that does not verify or a
    /// withdrawn deployment fail the same way every time. A driver turns this into
    /// its exit code (`shoal install`: 75 when worth retrying, else 1).
    pub fn worth_retrying(&self) -> bool {
        match self {
            // A read error of a file the rerun derives again.
            InstallError::SourcesFailed { .. } | InstallError::ChunkIds { .. } => true,
            InstallError::Io { op, .. } => *op == IoOp::Fetch,
            InstallError::Source { fault, .. } => matches!(fault, SourceFault::Unreadable(_)),
            InstallError::CorruptChunk { .. }
            | InstallError::MissingChunks { .. }
            | InstallError::OverBudget { .. }
            | InstallError::VerifyFailed { .. }
            | InstallError::Abandoned { .. } => false,
        }
    }
}

/// Why a driver stopped reading a source, as the driver saw it; the engine decides
/// from it whether the install is worth retrying ([`InstallError::worth_retrying`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceFault {
    /// Reading failed (an I/O error, a connection that broke): the same bytes may
    /// read fine next time.
    #[error("{0}")]
    Unreadable(String),
    /// The source's bytes are bad (a malformed archive, a chunk that does not
    /// decode or hash to its id): they are bad the next time too.
    #[error("{0}")]
    Damaged(String),
    /// The source's chunks are delta-encoded against bytes the running slot does
    /// not hold (it does not run the base release).
    #[error("{0}")]
    WrongBase(String),
    /// Whoever offered the deployment withdrew it (the server aborted it).
    #[error("the deployment was withdrawn: {0}")]
    Withdrawn(String),
}

fn missing_message(
    count: usize,
    bytes: u64,
    base: &Option<BaseRelease>,
    active: Option<&str>,
) -> String {
    let running = active.map_or_else(|| "an unknown release".to_string(), str::to_string);
    match base {
        Some(base) => format!(
            "{count} chunk(s) ({bytes} bytes) are missing: this thin artifact leaves out the \
             chunks of base release {} {}, and the active slot (running {running}) does not \
             hold them; install the full artifact or use a chunk store",
            base.name, base.version
        ),
        None => format!(
            "{count} chunk(s) ({bytes} bytes) are in none of the sources and not in the active \
             slot (running {running})"
        ),
    }
}

/// Why `commit` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// There is no trial boot to commit.
    #[error("there is no trial boot to commit (deployment phase: {})", .phase.as_ref().map_or("none".to_string(), ToString::to_string))]
    NotInTrial {
        /// The deployment's phase, if there is one.
        phase: Option<Phase>,
    },
}

/// Why `rollback` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RollbackError {
    /// No deployment is in progress.
    #[error("there is no deployment in progress to roll back")]
    NothingToRollBack,
}

/// Why a source could not be added, updated or removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// No install is in progress (sources belong to one).
    #[error("no install is in progress")]
    NoInstall,
    /// A source with this id is already registered.
    #[error("{0} is already registered")]
    Duplicate(crate::SourceId),
    /// No source with this id is registered.
    #[error("{0} is not registered")]
    Unknown(crate::SourceId),
}
