//! The Shoal control plane's decisions, sans-IO: which device keys are admitted, which
//! devices a deployment targets, and how a deployment rolls out in phases that halt by
//! themselves when too many devices fail.
//!
//! Key design decision: every decision is a pure function of stored state, an event and
//! a time passed in, `(state, event, now) → (state, effects)`. There is no tokio, no
//! database, no clock, no OS randomness and no hash-order iteration here (see
//! `clippy.toml`). That is what lets several `shoal server` processes share one
//! PostgreSQL (each loads the state in a transaction, applies the event, stores the
//! state: no decision depends on which process made it or on memory it kept), and what
//! lets the fleet simulator run the very code the server runs for 100,000 virtual devices
//! under one seed.
//!
//! Why it is cut this way:
//! - [`auth`] decides a device key's admission (pending, accepted, rejected,
//!   preauthorized, decommissioned) as a table of legal transitions.
//! - [`filter`] is the inventory filter language behind dynamic groups; [`target`]
//!   resolves a deployment's target (devices, static group, filter) to devices.
//! - [`Rollout`] holds one deployment's policy, phases, per-phase counts and state, and
//!   [`Entry`] one device's status in it. A server stores them as one row per deployment
//!   and one per device, and a poll or report touches two rows, never the whole fleet:
//!   the counts the rollout keeps make phases, halts and summaries O(phases).
//!   [`Deployment`] holds both halves in memory for the simulator and tests, and checks
//!   that they agree ([`Deployment::check_invariants`]).
//! - Phases are chosen by a seeded hash of the device ids ([`select`]), so the same
//!   seed and devices give the same phases in any order, on any process.
//! - Timers (a phase's soak delay) are polled, as in `quinn-proto`:
//!   [`Rollout::poll_timeout`] says when, the driver calls [`Rollout::handle_timeout`].
//!
//! The rollout rules, in one place:
//! - Phases take the target's devices in seeded-hash order: [`Size::Count`], or
//!   [`Size::Percent`] of the target rounded up, and [`Size::Rest`] last. The first
//!   phase opens when the rollout is planned.
//! - A pending device is served only when its phase is open and the rollout runs; a
//!   device that started is served until it finishes, even when paused or halted. A
//!   start (first report) from a device that was not admitted is refused (409).
//! - A device moves forward only; a repeated report is accepted and changes nothing;
//!   after a final status only the same status is accepted. A failure with retries left
//!   makes the device pending again (Mender's `retries`); only a final failure counts.
//! - The newest open phase lets the next one open when its [`Proceed`] holds: at least
//!   so many successes (success and already-installed) in that phase, and/or a soak delay
//!   that does not run while paused or halted; with neither, an operator opens it.
//! - Each final failure checks [`Policy::failures_max`] against the final failures so
//!   far, a percentage being of the devices in the open phases; passing it halts the
//!   rollout with a [`HaltReason`] that gives the numbers. A newest phase that can no
//!   longer reach its success threshold also halts (rather than waiting forever).
//!   Resuming accepts the failures so far; the next final failure checks again.
//! - Abort is final: unfinished devices become aborted and their reports get 409.
//!   Retrying failed devices makes them pending with a fresh retry budget.
//!
//! A canary phase that opens the rest after 90% of it succeeded and an hour of soak,
//! halting if more than 5% of the devices let in so far fail:
//!
//! ```
//! use shoal_fleet::{
//!     Admission, Deployment, DeviceId, Effect, Instant, PhaseSpec, Policy, Proceed, Size,
//!     Status, Threshold,
//! };
//!
//! let policy = Policy {
//!     phases: vec![
//!         PhaseSpec {
//!             size: Size::Percent(10),
//!             proceed: Proceed {
//!                 successes: Some(Threshold::Percent(90)),
//!                 delay_ms: Some(3_600_000),
//!             },
//!         },
//!         PhaseSpec { size: Size::Rest, proceed: Proceed::default() },
//!     ],
//!     failures_max: Some(Threshold::Percent(5)),
//!     retries: 1,
//!     seed: 42,
//! };
//! let devices = (0..100).map(|i| DeviceId::new(format!("dev-{i}")));
//! let (mut deployment, _) = Deployment::new(policy, devices, Instant::from_millis(0)).unwrap();
//!
//! // The seeded choice of canaries: 10 devices are served, the other 90 wait (204).
//! let canaries: Vec<DeviceId> = deployment
//!     .entries()
//!     .filter(|e| deployment.admission(&e.device) == Some(Admission::Serve))
//!     .map(|e| e.device.clone())
//!     .collect();
//! assert_eq!(canaries.len(), 10);
//!
//! // All canaries succeed; the soak timer still has to run.
//! for dev in &canaries {
//!     deployment.report(dev, Status::Success, Instant::from_millis(60_000)).unwrap();
//! }
//! assert_eq!(deployment.rollout().open_phases(), 1);
//! let at = deployment.poll_timeout().unwrap();
//! assert_eq!(at, Instant::from_millis(3_600_000));
//! let effects = deployment.handle_timeout(at);
//! assert_eq!(effects, [Effect::PhaseOpened { phase: 1, devices: 90 }]);
//! ```
//!
//! What the server does with the answers (HTTP codes, tokens, SQL, audit log) and when it
//! calls in (a poll, a report, an operator's command, a timer) is the driver's business.

#![warn(missing_docs)]

pub mod auth;
mod deployment;
pub mod filter;
pub mod policy;
pub mod report;
mod rollout;
pub mod select;
mod status;
pub mod target;
mod time;

#[cfg(test)]
mod tests;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use deployment::Deployment;
pub use policy::{PhaseSpec, Policy, Proceed, Size, Threshold};
pub use rollout::{
    Admission, Command, ControlError, Effect, Entry, HaltReason, LoadError, MarkError, NextPhase,
    PHASES_MAX, Phase, PlanError, ReportError, Rollout, State, Summary, Wait,
};
pub use status::{Counts, ParseStatusError, Status};
pub use time::Instant;

/// A device's id within the control plane (the server picks it: e.g. the hex of the
/// device's public key, or a row id). Ordered, so maps of devices iterate the same way
/// everywhere.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceId(String);

impl DeviceId {
    /// An id.
    pub fn new(id: impl Into<String>) -> DeviceId {
        DeviceId(id.into())
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for DeviceId {
    fn from(id: String) -> DeviceId {
        DeviceId(id)
    }
}

impl From<&str> for DeviceId {
    fn from(id: &str) -> DeviceId {
        DeviceId(id.to_owned())
    }
}
