//! The Shoal update engine: a sans-IO state machine that installs a signed release
//! into the inactive A/B slot, arms a trial boot, and commits or rolls back.
//!
//! Key design decision: the engine is *driven*, like `quinn-proto` under `quinn`. It
//! has no networking, no file system, no clock and no OS randomness: a driver calls
//! [`Engine::offer`], [`Engine::handle`], [`Engine::handle_timeout`] and
//! [`Engine::boot`] with a time it chose ([`Instant`]), and carries out what
//! [`Engine::poll_output`] returns ([`Output`]: read a chunk from the active slot,
//! fetch chunks from a source, write at an offset, sync, persist a journal batch, arm
//! the bootloader, reboot, report). The device's `shoal` binary turns outputs into
//! disk and bootloader I/O; the fleet simulator turns them into events on a virtual
//! clock. The only randomness (which source serves a chunk) comes from
//! [`Config::seed`].
//!
//! Lifecycle of a deployment ([`Phase`]): offered (signature against the trust root,
//! device type, depends, security counter against the anti-rollback floor) →
//! fetching (chunks the active slot has are copied, the rest come from sources;
//! progress is journaled in batches, each after a slot sync) → verified (the whole
//! payload hash re-read from the slot) → trial armed → rebooting → trial (health
//! checks) → committed (the floor rises), or rolled back with a reason. Each phase is
//! persisted ([`Output::Persist`]) before the side effect that leaves it, so a
//! restart at any instant resumes from [`DeviceState`]; the bootloader is told to not
//! try the target slot before a byte of it is written, and to try it only after it
//! verified.

mod bits;
mod engine;
mod error;
mod pacing;
mod source;
mod state;
mod time;
mod timer;

#[cfg(test)]
mod fetch_tests;
#[cfg(test)]
mod lan_tests;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

pub use bits::Bitfield;
pub use engine::{
    Boot, Config, DeploymentStatus, Engine, Event, Input, NodeKey, Offer, Output, Progress, Status,
    Swarm,
};
pub use error::{CommitError, InstallError, IoOp, OfferError, RollbackError, SourceError};
pub use source::{
    FetchFailure, Gone, Holds, Origin, RequestId, RetryConfig, SourceClass, SourceId, SourceInfo,
    SourceKind, SourceLimits, SourceStatus,
};
pub use state::{
    Deployment, DeviceState, IndexedChunk, Outcome, Phase, Record, Release, Slot, SlotIndex,
    Verdict, slot_index,
};
pub use time::Instant;
