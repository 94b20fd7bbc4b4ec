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
//!
//! Fetching (the contract network drivers and the simulator build on):
//! - **Sources** ([`SourceInfo`]) come with the offer or at any time
//!   ([`Engine::add_source`], [`Engine::update_source`], [`Engine::add_holds`],
//!   [`Engine::remove_source`]); each has a kind (a [`SourceKind::Stream`] pushes, a
//!   [`SourceKind::Requests`] source is asked), a cost class ([`SourceClass`]: the
//!   cheapest class that holds a chunk is asked), what it holds ([`Holds`]: ids or a
//!   bitfield over the payload's chunk positions) and request limits
//!   ([`SourceLimits`]). Streams and request sources work at the same time.
//! - **Requests** ([`Output::Fetch`]) carry many chunk ids, sized in bytes for the
//!   transport, and a [`RequestId`]; the driver answers each chunk ([`Input::Chunk`],
//!   [`Input::Corrupt`], [`Input::Unavailable`]) or the request ([`Input::FetchFailed`] with a
//!   [`FetchFailure`]: retry later, not there, drop the source). The engine cancels
//!   ([`Output::Cancel`]) what it gave up on. A source silent past its timeout
//!   ([`RetryConfig`], plus the time its requests' next answers take at its
//!   measured rate) loses its requests to the others and backs off; a source that
//!   sends a corrupt chunk is banned ([`Event::SourceBanned`]); one source's failure
//!   never fails the install while another can serve ([`InstallError::SourcesFailed`]
//!   when none can).
//! - **LAN cooperation** ([`Engine::set_swarm`]): rendezvous hashing over the LAN
//!   peers on the same release names one owner per chunk, the only one that fetches
//!   it over the WAN; the others take it from a peer that has it, and ownership moves
//!   on when an owner stalls, fails or leaves.
//! - **Budgets and pacing**: [`Config::wan_budget_bytes`] (a plan over budget is
//!   refused before any fetch, [`InstallError::OverBudget`]; WAN requests never
//!   exceed it) and [`Config::wan_rate_bytes_per_s`] (a token bucket with its own
//!   timer). Byte counters by class are in [`Progress`] and per source in
//!   [`Engine::sources`].
//! - **Completions**: [`Input::Written`] bounds the writes in flight
//!   ([`Config::writing_bytes_max`]); [`Input::Synced`] releases the journal record of
//!   the batch it covers, so "journal only after the sync" is the engine's rule.
//!
//! - **Proofs, not bytes**: chunks arrive only as [`VerifiedChunk`]s, which the
//!   driver builds (it hashes; the engine never takes unverified bytes). The fleet
//!   simulator passes ids and lengths only, through
//!   `VerifiedChunk::simulated`, which exists only with the `sim` cargo feature
//!   (never in the `shoal` binary: `.ci/check-no-sim`).
//! - **State for 100,000 devices**: a [`VerifiedRelease`] (signature checked,
//!   manifest decoded, chunk table built, once) is shared behind an `Arc` by every
//!   engine it is offered to ([`Engine::offer_verified`]); per install the engine
//!   keeps one byte per distinct chunk and a few bitfields; the active slot's index
//!   is a dense array or the shared table of its release
//!   ([`Engine::share_active_index`]); the envelope is persisted once per deployment
//!   ([`Record::Envelope`]).
//!
//! - **Lifecycle decisions** the simulator makes the same way as a device: a slot
//!   switched outside Shoal ([`Engine::observe_running`]), an operator's commit
//!   without a boot check ([`Engine::commit_running`]), whether a failure is worth
//!   retrying ([`InstallError::worth_retrying`], from the driver's [`SourceFault`]),
//!   which release of a chunk store to install ([`Engine::pick_candidate`]), and what
//!   the bootloader's state means at boot ([`Boot::from_bootloader`]); bootloader
//!   outputs map to the steps of bootctl's one bootloader model
//!   ([`Output::boot_step`], `shoal_bootctl::model`).
//!
//! Every wait has a named timer ([`Engine::poll_timeout`]: silence, backoff, LAN
//! owner, pacing). In tests, `check_invariants` runs after every step.

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
mod index_tests;
#[cfg(test)]
mod lan_tests;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

pub use bits::Bitfield;
pub use engine::{
    Boot, Candidate, ChunkIdFile, ChunkIdWriter, Config, DeploymentStatus, Engine, Event,
    INDEX_FOUND_PART, INDEX_SAMPLE_PART, IndexReadError, IndexReader, IndexStore, Input,
    ManifestPlan, ManifestStep, MemIndexes, NeededChunks, NodeKey, Offer, Offsets, Output,
    PeerRelease, PickError, Progress, ServerWhy, Status, Swarm, VerifiedRelease, compare_versions,
    peer_busy, peer_release,
};
pub use error::{
    CommitError, InstallError, IoOp, OfferError, RollbackError, SourceError, SourceFault,
};
pub use shoal_artifact::VerifiedChunk;
pub use source::{
    FetchFailure, Gone, Holds, Origin, RequestId, RetryConfig, SourceClass, SourceId, SourceInfo,
    SourceKind, SourceLimits, SourceStatus,
};
pub use state::{
    Deployment, DeviceState, IndexedChunk, Outcome, Phase, Record, Release, Slot, SlotIndex,
    Verdict, slot_ordinal,
};
pub use time::Instant;
