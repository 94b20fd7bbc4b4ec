//! The rollout state machine: which devices may take a deployment now, what their
//! reports do, when phases open, when the rollout halts.
//!
//! The state is cut in two so a server touches little per request: one [`Rollout`]
//! per deployment (policy, phases with their counts, state, halt reason; a few hundred
//! bytes) and one [`Entry`] per device in it. A device's poll or report needs the
//! rollout and that device's entry only; the rollout's counts are kept in step with the
//! entries, so phases, halts and summaries never scan the devices. Operations that change
//! many devices at once ([`Rollout::abort`], [`Rollout::retry_failed`]) take the entries
//! they change. [`Deployment`](crate::Deployment) holds both halves for callers that
//! keep everything in memory (the simulator, tests).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::policy::{Policy, Proceed, Size, Threshold};
use crate::select;
use crate::status::{Counts, Status};
use crate::{DeviceId, Instant};

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Admitting devices of the open phases; phases open as their conditions hold.
    Running,
    /// An operator paused it: no device starts, no phase opens, the soak clock stops.
    /// Devices already installing carry on.
    Paused,
    /// It halted by itself ([`Rollout::halt_reason`] says why); like paused until an
    /// operator resumes or aborts it.
    Halted,
    /// An operator aborted it; every unfinished device is [`Status::Aborted`]. Final.
    Aborted,
    /// Every device reached a final status.
    Finished,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Halted => "halted",
            State::Aborted => "aborted",
            State::Finished => "finished",
        })
    }
}

/// Why a rollout halted by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HaltReason {
    /// More devices failed than [`Policy::failures_max`] allows.
    Failures {
        /// Devices whose failure is final.
        failed: u32,
        /// Devices in the phases opened so far (the base of a percentage).
        devices: u32,
        /// The limit that was passed.
        limit: Threshold,
    },
    /// The newest open phase can no longer reach its success threshold, so the next
    /// phase would never open.
    SuccessUnreachable {
        /// The phase (0-based).
        phase: usize,
        /// Successes it can still reach: those so far plus its unfinished devices.
        possible: u32,
        /// Successes it needs.
        needed: u32,
    },
}

impl fmt::Display for HaltReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            HaltReason::Failures {
                failed,
                devices,
                limit,
            } => {
                let permille = if devices == 0 {
                    0
                } else {
                    u64::from(failed) * 1000 / u64::from(devices)
                };
                write!(
                    f,
                    "{failed} of {devices} devices in the open phases failed ({}.{}%), more than \
                     the {limit} allowed",
                    permille / 10,
                    permille % 10
                )
            }
            HaltReason::SuccessUnreachable {
                phase,
                possible,
                needed,
            } => write!(
                f,
                "phase {} can reach at most {possible} successes but needs {needed} to proceed",
                phase + 1
            ),
        }
    }
}

/// One device's place in one deployment: the row a server stores per device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The device.
    pub device: DeviceId,
    /// Its phase (0-based).
    pub phase: u32,
    /// Its status.
    pub status: Status,
    /// Failures retried so far (at most [`Policy::retries`]).
    pub attempts: u32,
}

/// One phase's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    /// Devices in it.
    pub size: u32,
    /// When it opened (`None`: not yet).
    pub opened_at: Option<Instant>,
    /// Its devices per status; they add up to `size`.
    pub counts: Counts,
}

/// The soak clock of the newest open phase: time counts only while running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Soak {
    /// Running time accumulated before `since`.
    elapsed_ms: u64,
    /// When the clock last started; `None` while stopped.
    since: Option<Instant>,
    /// The phase's delay was seen to have run (its timer fired); no timer is due.
    #[serde(default)]
    delay_done: bool,
}

impl Soak {
    fn started(now: Instant) -> Soak {
        Soak {
            elapsed_ms: 0,
            since: Some(now),
            delay_done: false,
        }
    }

    fn elapsed_ms(&self, now: Instant) -> u64 {
        let running = self.since.map_or(0, |s| now.saturating_since_ms(s));
        self.elapsed_ms.saturating_add(running)
    }

    fn stop(&mut self, now: Instant) {
        self.elapsed_ms = self.elapsed_ms(now);
        self.since = None;
    }

    fn start(&mut self, now: Instant) {
        if self.since.is_none() {
            self.since = Some(now);
        }
    }
}

/// Something the driver must act on or record (audit log, device history, UI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// A device's status changed; store its entry.
    Status {
        /// The device.
        device: DeviceId,
        /// Its status before.
        from: Status,
        /// Its status now.
        to: Status,
    },
    /// A failed device is offered the deployment again (its entry is pending again).
    Retrying {
        /// The device.
        device: DeviceId,
        /// Which retry this is (1 for the first).
        attempt: u32,
    },
    /// A phase opened; its devices may start.
    PhaseOpened {
        /// The phase (0-based).
        phase: usize,
        /// Its devices.
        devices: u32,
    },
    /// The rollout halted by itself.
    Halted(HaltReason),
    /// Every device reached a final status.
    Finished,
}

/// Why a phase plan was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The policy has no phases.
    #[error("a rollout needs at least one phase")]
    NoPhases,
    /// The policy has more phases than [`PHASES_MAX`].
    #[error("a rollout has at most {max} phases")]
    TooManyPhases {
        /// The limit.
        max: usize,
    },
    /// The target resolved to no devices.
    #[error("the deployment targets no devices")]
    NoDevices,
    /// More devices than a rollout can count.
    #[error("a rollout holds at most {max} devices")]
    TooManyDevices {
        /// The limit.
        max: u32,
    },
    /// A phase of `count 0` or `percent 0`.
    #[error("phase {} has size zero", .phase + 1)]
    ZeroSize {
        /// The phase (0-based).
        phase: usize,
    },
    /// A percentage above 100.
    #[error("phase {}: {percent}% is more than 100%", .phase + 1)]
    PercentOver100 {
        /// The phase (0-based).
        phase: usize,
        /// The percentage.
        percent: u8,
    },
    /// [`Policy::failures_max`] is a percentage above 100.
    #[error("failures_max: {percent}% is more than 100%")]
    FailuresPercentOver100 {
        /// The percentage.
        percent: u8,
    },
    /// [`Size::Rest`] before the last phase.
    #[error("phase {} takes the rest, but only the last phase may", .phase + 1)]
    RestNotLast {
        /// The phase (0-based).
        phase: usize,
    },
    /// The last phase has a proceed condition, which would never be used.
    #[error("the last phase (phase {}) has a proceed condition, but no phase follows it", .phase + 1)]
    ProceedOnLastPhase {
        /// The phase (0-based).
        phase: usize,
    },
    /// A success threshold of zero, or a delay of zero (leave it out instead).
    #[error("phase {}: a proceed condition of zero; leave it out instead", .phase + 1)]
    ZeroCondition {
        /// The phase (0-based).
        phase: usize,
    },
    /// Earlier phases already took every device.
    #[error("phase {} would be empty: the earlier phases take all {devices} devices", .phase + 1)]
    EmptyPhase {
        /// The phase (0-based).
        phase: usize,
        /// The target's devices.
        devices: u32,
    },
    /// The phases leave devices out.
    #[error(
        "the phases hold {covered} of the {devices} devices; end with a phase of size `rest` \
         or make the sizes add up"
    )]
    Uncovered {
        /// Devices in phases.
        covered: u32,
        /// The target's devices.
        devices: u32,
    },
    /// A success threshold larger than its phase.
    #[error("phase {} holds {size} devices but needs {needed} successes to proceed", .phase + 1)]
    UnreachableThreshold {
        /// The phase (0-based).
        phase: usize,
        /// Its size.
        size: u32,
        /// The successes it would need.
        needed: u32,
    },
}

/// The most phases a rollout may have.
pub const PHASES_MAX: usize = 64;

/// Why a rollout will not let a device start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wait {
    /// The device's phase has not opened.
    PhaseNotOpen {
        /// The device's phase (0-based).
        phase: usize,
    },
    /// An operator paused the rollout.
    Paused,
    /// The rollout halted by itself.
    Halted,
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wait::PhaseNotOpen { phase } => write!(f, "phase {} has not opened", phase + 1),
            Wait::Paused => f.write_str("the rollout is paused"),
            Wait::Halted => f.write_str("the rollout halted"),
        }
    }
}

/// What a device polling for its next deployment gets from this one.
///
/// A device can be in several deployments; the server asks each (oldest first, as
/// Mender does) and answers with the first that serves it, or 204.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Hand it this deployment (it is admitted, or already on its way).
    Serve,
    /// Nothing now (204); maybe later.
    NotYet(Wait),
    /// Nothing: the device is done with this deployment (204).
    Done(Status),
}

/// Why a device's status report was refused. Nothing changed.
///
/// For the device API: [`ReportError::Aborted`] and [`ReportError::NotAdmitted`] mean
/// "stop this deployment" (409, as Mender's); [`ReportError::NotReportable`],
/// [`ReportError::Backwards`] and [`ReportError::AlreadyFinished`] are a bad request
/// (400); [`ReportError::NotInDeployment`] is 404; [`ReportError::ForeignEntry`] is the
/// server's bug (500).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// The deployment was aborted (or the device decommissioned out of it): the server
    /// answers 409 and the device stops.
    #[error("the deployment was aborted")]
    Aborted,
    /// The device reported a status only the server sets.
    #[error(
        "a device cannot report {0}; it reports downloading, installing, rebooting, success, failure or already-installed"
    )]
    NotReportable(Status),
    /// The report goes back (e.g. downloading after installing).
    #[error("the device is {from} and cannot go back to {to}")]
    Backwards {
        /// Its current status.
        from: Status,
        /// The status reported.
        to: Status,
    },
    /// The device already finished with a different final status.
    #[error("the device already finished as {status}; {reported} is refused")]
    AlreadyFinished {
        /// Its final status.
        status: Status,
        /// The status reported.
        reported: Status,
    },
    /// A device that was not admitted tried to start (the server answers 409).
    #[error("the device may not start this deployment now: {0}")]
    NotAdmitted(Wait),
    /// The device is not part of this deployment.
    #[error("the device is not part of this deployment")]
    NotInDeployment,
    /// The entry does not belong to this rollout (stored state out of step: a bug).
    #[error("the device entry does not belong to this rollout (phase {phase}, status {status})")]
    ForeignEntry {
        /// The entry's phase.
        phase: u32,
        /// The entry's status.
        status: Status,
    },
}

/// Why marking a device by the server ([`Rollout::no_artifact`]) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkError {
    /// The deployment was aborted.
    #[error("the deployment was aborted")]
    Aborted,
    /// Only a pending device can be marked as having no artifact.
    #[error("the device is {0}, not pending")]
    NotPending(Status),
    /// The device is not part of this deployment.
    #[error("the device is not part of this deployment")]
    NotInDeployment,
    /// The entry does not belong to this rollout (stored state out of step: a bug).
    #[error("the device entry does not belong to this rollout (phase {phase}, status {status})")]
    ForeignEntry {
        /// The entry's phase.
        phase: u32,
        /// The entry's status.
        status: Status,
    },
}

/// Why an operator's command was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The command does not apply in this state (e.g. pausing a finished rollout).
    #[error("cannot {command} a rollout that is {state}")]
    Illegal {
        /// The command.
        command: Command,
        /// The rollout's state.
        state: State,
    },
    /// Every phase is already open.
    #[error("every phase is already open")]
    NoMorePhases,
    /// No device has failed, so there is nothing to retry.
    #[error("no device failed; nothing to retry")]
    NothingToRetry,
    /// The entries passed are not the rollout's: the counts expect a different number.
    #[error("expected the {expected} entries in {status} status, got {given}")]
    Entries {
        /// The status the command changes.
        status: &'static str,
        /// How many the rollout counts.
        expected: u32,
        /// How many were passed.
        given: u32,
    },
}

/// An operator's command, for [`ControlError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// [`Rollout::pause`].
    Pause,
    /// [`Rollout::resume`].
    Resume,
    /// [`Rollout::abort`].
    Abort,
    /// [`Rollout::open_next_phase`].
    OpenNextPhase,
    /// [`Rollout::retry_failed`].
    RetryFailed,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Abort => "abort",
            Command::OpenNextPhase => "open the next phase of",
            Command::RetryFailed => "retry the failed devices of",
        })
    }
}

/// What the newest open phase waits for before the next one opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextPhase {
    /// The phase that opens next (0-based).
    pub phase: usize,
    /// Successes needed in the newest open phase and had so far, if that is a condition.
    pub successes: Option<(u32, u32)>,
    /// Soak time still to run, if that is a condition (0 once it ran).
    pub delay_remaining_ms: Option<u64>,
    /// Only an operator opens it.
    pub manual: bool,
}

/// A deployment's status at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The rollout's state.
    pub state: State,
    /// Why it last halted by itself, if it ever did.
    pub halt_reason: Option<HaltReason>,
    /// Devices in the deployment.
    pub devices: u32,
    /// Devices per status, all phases.
    pub counts: Counts,
    /// Phases opened so far.
    pub open_phases: usize,
    /// Each phase.
    pub phases: Vec<Phase>,
    /// What the next phase waits for (`None`: every phase is open, or the rollout is over).
    pub next_phase: Option<NextPhase>,
}

/// The rollout of one deployment: policy, phases with their counts, state, halt reason.
///
/// A few hundred bytes however many devices: a server stores it as one row, beside one
/// [`Entry`] row per device, and hands both to each call. Calls that concern one device
/// take its entry; [`Rollout::abort`] and [`Rollout::retry_failed`] take the entries
/// they change. The counts kept here always equal the entries' statuses, so phases,
/// halts and summaries never scan the devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Stored")]
pub struct Rollout {
    policy: Policy,
    phases: Vec<Phase>,
    open: usize,
    state: State,
    halt_reason: Option<HaltReason>,
    soak: Soak,
}

/// A rollout as stored, before [`Rollout`]'s invariants are checked.
#[derive(Deserialize)]
struct Stored {
    policy: Policy,
    phases: Vec<Phase>,
    open: usize,
    state: State,
    halt_reason: Option<HaltReason>,
    soak: Soak,
}

/// Why a stored rollout was refused when loaded (the row was altered or corrupted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The stored policy is not one [`Rollout::plan`] accepts.
    #[error("stored rollout has an invalid policy: {0}")]
    Policy(PlanError),
    /// The policy and the phases disagree on how many phases there are.
    #[error("stored rollout has {stored} phases but its policy has {policy}")]
    PhaseCount {
        /// Phases in the policy.
        policy: usize,
        /// Phases stored.
        stored: usize,
    },
    /// The number of open phases is zero or more than the phases.
    #[error("stored rollout has {open} open phases of {phases}")]
    OpenPhases {
        /// Open phases stored.
        open: usize,
        /// Phases.
        phases: usize,
    },
    /// A phase's counts do not add up to its size, or its opening time disagrees with
    /// the open phases.
    #[error("stored rollout's phase {} is inconsistent", .phase + 1)]
    Phase {
        /// The phase (0-based).
        phase: usize,
    },
    /// A halted rollout without a reason.
    #[error("stored rollout is halted without a reason")]
    HaltReasonMissing,
}

impl TryFrom<Stored> for Rollout {
    type Error = LoadError;

    fn try_from(s: Stored) -> Result<Rollout, LoadError> {
        validate(&s.policy).map_err(LoadError::Policy)?;
        if s.phases.len() != s.policy.phases.len() {
            return Err(LoadError::PhaseCount {
                policy: s.policy.phases.len(),
                stored: s.phases.len(),
            });
        }
        if s.open == 0 || s.open > s.phases.len() {
            return Err(LoadError::OpenPhases {
                open: s.open,
                phases: s.phases.len(),
            });
        }
        for (phase, p) in s.phases.iter().enumerate() {
            if p.counts.total() != p.size || (phase < s.open) != p.opened_at.is_some() {
                return Err(LoadError::Phase { phase });
            }
        }
        if s.state == State::Halted && s.halt_reason.is_none() {
            return Err(LoadError::HaltReasonMissing);
        }
        Ok(Rollout {
            policy: s.policy,
            phases: s.phases,
            open: s.open,
            state: s.state,
            halt_reason: s.halt_reason,
            soak: s.soak,
        })
    }
}

impl Rollout {
    /// Plan a rollout of `devices` (duplicates count once) under `policy`, and open its
    /// first phase at `now`.
    ///
    /// Devices are ordered by a hash of the policy's seed and their id, then cut into
    /// the phases in order: the same seed and set of devices give the same phases in
    /// whatever order the devices come. Returns the rollout, one [`Entry`] per device
    /// (in phase order) and the effects (the first phase opened).
    pub fn plan(
        policy: Policy,
        devices: impl IntoIterator<Item = DeviceId>,
        now: Instant,
    ) -> Result<(Rollout, Vec<Entry>, Vec<Effect>), PlanError> {
        validate(&policy)?;
        let ordered = select::order(policy.seed, devices);
        let n = u32::try_from(ordered.len())
            .map_err(|_| PlanError::TooManyDevices { max: u32::MAX })?;
        if n == 0 {
            return Err(PlanError::NoDevices);
        }
        let sizes = phase_sizes(&policy, n)?;
        let mut entries = Vec::with_capacity(ordered.len());
        let mut devices = ordered.into_iter();
        let mut phases = Vec::with_capacity(sizes.len());
        for (index, &size) in sizes.iter().enumerate() {
            let phase = index as u32; // index < PHASES_MAX
            entries.extend(devices.by_ref().take(size as usize).map(|device| Entry {
                device,
                phase,
                status: Status::Pending,
                attempts: 0,
            }));
            let mut counts = Counts::default();
            counts.add(Status::Pending, size);
            phases.push(Phase {
                size,
                opened_at: None,
                counts,
            });
        }
        assert!(devices.next().is_none(), "phase sizes cover every device");
        let mut rollout = Rollout {
            policy,
            phases,
            open: 0,
            state: State::Running,
            halt_reason: None,
            soak: Soak::started(now),
        };
        let mut effects = Vec::new();
        rollout.open_phase(now, &mut effects);
        Ok((rollout, entries, effects))
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Why it last halted by itself, if it ever did (kept after a resume, for the record).
    pub fn halt_reason(&self) -> Option<HaltReason> {
        self.halt_reason
    }

    /// The phases.
    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    /// How many phases are open (phases `0..open_phases()`).
    pub fn open_phases(&self) -> usize {
        self.open
    }

    /// Devices in the open phases: the most that may ever have started.
    pub fn admissible(&self) -> u32 {
        self.phases[..self.open].iter().map(|p| p.size).sum()
    }

    /// Devices per status over all phases.
    pub fn counts(&self) -> Counts {
        self.phases
            .iter()
            .fold(Counts::default(), |sum, p| sum.plus(&p.counts))
    }

    /// Devices in the deployment.
    pub fn devices(&self) -> u32 {
        self.phases.iter().map(|p| p.size).sum()
    }

    /// What a device polling for its next deployment gets from this one.
    ///
    /// A device that started keeps being served while the rollout is paused or halted,
    /// so it can finish (or resume after a reboot); a pending device is served only
    /// when its phase is open and the rollout runs.
    pub fn admission(&self, entry: &Entry) -> Admission {
        if entry.status.is_final() {
            return Admission::Done(entry.status);
        }
        if self.state == State::Aborted {
            return Admission::Done(Status::Aborted);
        }
        if entry.status.is_in_progress() {
            return Admission::Serve;
        }
        match self.wait(entry) {
            Some(wait) => Admission::NotYet(wait),
            None => Admission::Serve,
        }
    }

    /// Why a pending device may not start now (`None`: it may).
    fn wait(&self, entry: &Entry) -> Option<Wait> {
        let phase = entry.phase as usize;
        if phase >= self.open {
            return Some(Wait::PhaseNotOpen { phase });
        }
        match self.state {
            State::Paused => Some(Wait::Paused),
            State::Halted => Some(Wait::Halted),
            State::Running | State::Aborted | State::Finished => None,
        }
    }

    fn check_entry(&self, entry: &Entry) -> bool {
        self.phases
            .get(entry.phase as usize)
            .is_some_and(|p| p.counts.get(entry.status) > 0)
    }

    /// A device reports `status` at `now`. On success the entry is updated; store it and
    /// the rollout, and act on the effects.
    ///
    /// Repeating the current status is accepted and changes nothing (a device resends a
    /// report whose answer it lost). A failure with retries left makes the entry pending
    /// again (the device is offered the deployment again); a final failure may halt the
    /// rollout; a success may open the next phase.
    pub fn report(
        &mut self,
        entry: &mut Entry,
        status: Status,
        now: Instant,
    ) -> Result<Vec<Effect>, ReportError> {
        if !self.check_entry(entry) {
            return Err(ReportError::ForeignEntry {
                phase: entry.phase,
                status: entry.status,
            });
        }
        if !status.is_reportable() {
            return Err(ReportError::NotReportable(status));
        }
        if self.state == State::Aborted || entry.status == Status::Aborted {
            return Err(ReportError::Aborted);
        }
        if entry.status == status {
            return Ok(Vec::new());
        }
        if entry.status.is_final() {
            return Err(ReportError::AlreadyFinished {
                status: entry.status,
                reported: status,
            });
        }
        if status.rank() < entry.status.rank() {
            return Err(ReportError::Backwards {
                from: entry.status,
                to: status,
            });
        }
        if entry.status == Status::Pending
            && let Some(wait) = self.wait(entry)
        {
            return Err(ReportError::NotAdmitted(wait));
        }
        let mut effects = Vec::new();
        self.set(entry, status, &mut effects);
        if status == Status::Failure && entry.attempts < self.policy.retries {
            entry.attempts += 1;
            effects.push(Effect::Retrying {
                device: entry.device.clone(),
                attempt: entry.attempts,
            });
            self.set(entry, Status::Pending, &mut effects);
            return Ok(effects);
        }
        if status.is_final() {
            self.after_final(status, now, &mut effects);
        }
        Ok(effects)
    }

    /// The server found no artifact of the release for this pending device's type: its
    /// status becomes [`Status::NoArtifact`] (final).
    pub fn no_artifact(
        &mut self,
        entry: &mut Entry,
        now: Instant,
    ) -> Result<Vec<Effect>, MarkError> {
        if !self.check_entry(entry) {
            return Err(MarkError::ForeignEntry {
                phase: entry.phase,
                status: entry.status,
            });
        }
        if self.state == State::Aborted {
            return Err(MarkError::Aborted);
        }
        if entry.status != Status::Pending {
            return Err(MarkError::NotPending(entry.status));
        }
        let mut effects = Vec::new();
        self.set(entry, Status::NoArtifact, &mut effects);
        self.after_final(Status::NoArtifact, now, &mut effects);
        Ok(effects)
    }

    /// The device was decommissioned: if it had not finished, it is
    /// [`Status::Aborted`] in this deployment (so the rollout can finish without it).
    pub fn decommissioned(
        &mut self,
        entry: &mut Entry,
        now: Instant,
    ) -> Result<Vec<Effect>, MarkError> {
        if !self.check_entry(entry) {
            return Err(MarkError::ForeignEntry {
                phase: entry.phase,
                status: entry.status,
            });
        }
        let mut effects = Vec::new();
        if entry.status.is_final() {
            return Ok(effects);
        }
        self.set(entry, Status::Aborted, &mut effects);
        self.after_final(Status::Aborted, now, &mut effects);
        Ok(effects)
    }

    /// Pause: no device starts and no phase opens until [`Rollout::resume`].
    pub fn pause(&mut self, now: Instant) -> Result<Vec<Effect>, ControlError> {
        if self.state != State::Running {
            return Err(ControlError::Illegal {
                command: Command::Pause,
                state: self.state,
            });
        }
        self.state = State::Paused;
        self.soak.stop(now);
        Ok(Vec::new())
    }

    /// Resume a paused or halted rollout. The failures that halted it are accepted: the
    /// next final failure checks the limit again. Phases whose conditions now hold open.
    pub fn resume(&mut self, now: Instant) -> Result<Vec<Effect>, ControlError> {
        if !matches!(self.state, State::Paused | State::Halted) {
            return Err(ControlError::Illegal {
                command: Command::Resume,
                state: self.state,
            });
        }
        self.state = State::Running;
        self.soak.start(now);
        let mut effects = Vec::new();
        self.check_finished(&mut effects);
        self.advance(now, &mut effects);
        Ok(effects)
    }

    /// Open the next phase now, whatever its conditions (an operator's approval).
    pub fn open_next_phase(&mut self, now: Instant) -> Result<Vec<Effect>, ControlError> {
        if self.state != State::Running {
            return Err(ControlError::Illegal {
                command: Command::OpenNextPhase,
                state: self.state,
            });
        }
        if self.open == self.phases.len() {
            return Err(ControlError::NoMorePhases);
        }
        let mut effects = Vec::new();
        self.open_phase(now, &mut effects);
        self.advance(now, &mut effects);
        Ok(effects)
    }

    /// Abort: every unfinished device becomes [`Status::Aborted`] and later reports get
    /// [`ReportError::Aborted`]. `entries` must hold at least every unfinished entry
    /// (others are skipped); if the count does not match the rollout's, nothing changes.
    pub fn abort<'a>(
        &mut self,
        entries: impl IntoIterator<Item = &'a mut Entry>,
    ) -> Result<Vec<Effect>, ControlError> {
        if matches!(self.state, State::Aborted | State::Finished) {
            return Err(ControlError::Illegal {
                command: Command::Abort,
                state: self.state,
            });
        }
        let mut unfinished: Vec<&mut Entry> = entries
            .into_iter()
            .filter(|e| !e.status.is_final())
            .collect();
        let expected = self.counts().unfinished();
        if !self.entries_match(&unfinished, expected) {
            return Err(ControlError::Entries {
                status: "an unfinished",
                expected,
                given: unfinished.len().try_into().unwrap_or(u32::MAX),
            });
        }
        let mut effects = Vec::new();
        for entry in unfinished.iter_mut() {
            self.set(entry, Status::Aborted, &mut effects);
        }
        self.state = State::Aborted;
        Ok(effects)
    }

    /// Retry every failed device: each becomes pending with its retries restored, and is
    /// offered the deployment again when the rollout runs. A finished rollout runs again;
    /// a paused or halted one stays so until resumed. `entries` must hold at least every
    /// failed entry (others are skipped); if the count does not match, nothing changes.
    pub fn retry_failed<'a>(
        &mut self,
        entries: impl IntoIterator<Item = &'a mut Entry>,
        now: Instant,
    ) -> Result<Vec<Effect>, ControlError> {
        if self.state == State::Aborted {
            return Err(ControlError::Illegal {
                command: Command::RetryFailed,
                state: self.state,
            });
        }
        let expected = self.counts().failure;
        if expected == 0 {
            return Err(ControlError::NothingToRetry);
        }
        let mut failed: Vec<&mut Entry> = entries
            .into_iter()
            .filter(|e| e.status == Status::Failure)
            .collect();
        if !self.entries_match(&failed, expected) {
            return Err(ControlError::Entries {
                status: "failure",
                expected,
                given: failed.len().try_into().unwrap_or(u32::MAX),
            });
        }
        let mut effects = Vec::new();
        for entry in failed.iter_mut() {
            entry.attempts = 0;
            self.set(entry, Status::Pending, &mut effects);
        }
        if self.state == State::Finished {
            self.state = State::Running;
            self.soak.start(now);
        }
        Ok(effects)
    }

    /// Whether `entries` are exactly `expected` entries counted by this rollout in their
    /// phase and status.
    fn entries_match(&self, entries: &[&mut Entry], expected: u32) -> bool {
        if entries.len() != expected as usize {
            return false;
        }
        let mut seen = vec![Counts::default(); self.phases.len()];
        for e in entries {
            match seen.get_mut(e.phase as usize) {
                Some(c) => c.add(e.status, 1),
                None => return false,
            }
        }
        seen.iter().zip(&self.phases).all(|(seen, phase)| {
            Status::ALL
                .into_iter()
                .all(|s| seen.get(s) <= phase.counts.get(s))
        })
    }

    /// When [`Rollout::handle_timeout`] must next be called (`None`: no timer). Only a
    /// phase delay is timed; everything else happens on events. A server stores this
    /// beside the rollout (a `due_at` column) so any of its processes can find due
    /// rollouts with one indexed query; calling `handle_timeout` early or twice is
    /// harmless.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state != State::Running || self.open == self.phases.len() {
            return None;
        }
        let delay = self.phases_spec_proceed(self.open - 1).delay_ms?;
        if self.soak.delay_done {
            return None;
        }
        // Running, so the clock runs since `since`; the delay has not been seen to run.
        let since = self.soak.since?;
        Some(since.saturating_add_ms(delay.saturating_sub(self.soak.elapsed_ms)))
    }

    /// A timer fired: open the phases whose conditions now hold.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Effect> {
        let mut effects = Vec::new();
        self.advance(now, &mut effects);
        effects
    }

    /// A status summary.
    pub fn summary(&self, now: Instant) -> Summary {
        Summary {
            state: self.state,
            halt_reason: self.halt_reason,
            devices: self.devices(),
            counts: self.counts(),
            open_phases: self.open,
            phases: self.phases.clone(),
            next_phase: self.next_phase(now),
        }
    }

    fn next_phase(&self, now: Instant) -> Option<NextPhase> {
        if self.open == self.phases.len() || matches!(self.state, State::Aborted | State::Finished)
        {
            return None;
        }
        let current = self.open - 1;
        let proceed = self.phases_spec_proceed(current);
        let phase = &self.phases[current];
        Some(NextPhase {
            phase: self.open,
            successes: proceed
                .successes
                .map(|t| (t.needed(phase.size), phase.counts.successes())),
            delay_remaining_ms: proceed
                .delay_ms
                .map(|d| d.saturating_sub(self.soak.elapsed_ms(now))),
            manual: proceed.is_manual(),
        })
    }

    fn phases_spec_proceed(&self, phase: usize) -> Proceed {
        self.policy.phases[phase].proceed
    }

    /// Move `entry` to `to`, keeping the counts in step.
    fn set(&mut self, entry: &mut Entry, to: Status, effects: &mut Vec<Effect>) {
        let from = entry.status;
        self.phases[entry.phase as usize].counts.shift(from, to);
        entry.status = to;
        effects.push(Effect::Status {
            device: entry.device.clone(),
            from,
            to,
        });
    }

    /// After a device reached final status `status`: halt, finish, or open phases.
    fn after_final(&mut self, status: Status, now: Instant, effects: &mut Vec<Effect>) {
        if matches!(self.state, State::Running | State::Paused)
            && let Some(reason) = self.halt_check(status)
        {
            self.state = State::Halted;
            self.halt_reason = Some(reason);
            self.soak.stop(now);
            effects.push(Effect::Halted(reason));
        }
        self.check_finished(effects);
        self.advance(now, effects);
    }

    fn halt_check(&self, status: Status) -> Option<HaltReason> {
        if status == Status::Failure
            && let Some(limit) = self.policy.failures_max
        {
            let failed = self.counts().failure;
            let devices = self.admissible();
            if limit.passed(failed, devices) {
                return Some(HaltReason::Failures {
                    failed,
                    devices,
                    limit,
                });
            }
        }
        if status.is_success() || self.open == self.phases.len() {
            return None;
        }
        let current = self.open - 1;
        let threshold = self.phases_spec_proceed(current).successes?;
        let phase = &self.phases[current];
        let needed = threshold.needed(phase.size);
        let possible = phase.counts.successes() + phase.counts.unfinished();
        (possible < needed).then_some(HaltReason::SuccessUnreachable {
            phase: current,
            possible,
            needed,
        })
    }

    fn check_finished(&mut self, effects: &mut Vec<Effect>) {
        if self.state == State::Running && self.counts().unfinished() == 0 {
            self.state = State::Finished;
            effects.push(Effect::Finished);
        }
    }

    /// Open phases while the newest open phase's condition holds.
    fn advance(&mut self, now: Instant, effects: &mut Vec<Effect>) {
        self.note_delay(now);
        while self.state == State::Running && self.open < self.phases.len() && self.may_proceed(now)
        {
            self.open_phase(now, effects);
        }
    }

    /// Remember that the newest open phase's delay ran, so its timer is not due again.
    fn note_delay(&mut self, now: Instant) {
        if self.open < self.phases.len()
            && let Some(delay) = self.phases_spec_proceed(self.open - 1).delay_ms
        {
            self.soak.delay_done |= self.soak.elapsed_ms(now) >= delay;
        }
    }

    fn may_proceed(&self, now: Instant) -> bool {
        let current = self.open - 1;
        let proceed = self.phases_spec_proceed(current);
        if proceed.is_manual() {
            return false;
        }
        let phase = &self.phases[current];
        let successes_ok = proceed
            .successes
            .is_none_or(|t| t.reached(phase.counts.successes(), phase.size));
        let delay_ok = proceed
            .delay_ms
            .is_none_or(|d| self.soak.elapsed_ms(now) >= d);
        successes_ok && delay_ok
    }

    fn open_phase(&mut self, now: Instant, effects: &mut Vec<Effect>) {
        let phase = &mut self.phases[self.open];
        phase.opened_at = Some(now);
        effects.push(Effect::PhaseOpened {
            phase: self.open,
            devices: phase.size,
        });
        self.open += 1;
        self.soak = Soak::started(now);
    }
}

fn validate(policy: &Policy) -> Result<(), PlanError> {
    let phases = &policy.phases;
    if phases.is_empty() {
        return Err(PlanError::NoPhases);
    }
    if phases.len() > PHASES_MAX {
        return Err(PlanError::TooManyPhases { max: PHASES_MAX });
    }
    if let Some(Threshold::Percent(percent)) = policy.failures_max
        && percent > 100
    {
        return Err(PlanError::FailuresPercentOver100 { percent });
    }
    let last = phases.len() - 1;
    for (phase, spec) in phases.iter().enumerate() {
        match spec.size {
            Size::Count(0) | Size::Percent(0) => return Err(PlanError::ZeroSize { phase }),
            Size::Percent(percent) if percent > 100 => {
                return Err(PlanError::PercentOver100 { phase, percent });
            }
            Size::Rest if phase != last => return Err(PlanError::RestNotLast { phase }),
            _ => {}
        }
        let proceed = spec.proceed;
        if phase == last && !proceed.is_manual() {
            return Err(PlanError::ProceedOnLastPhase { phase });
        }
        match proceed.successes {
            Some(Threshold::Count(0)) | Some(Threshold::Percent(0)) => {
                return Err(PlanError::ZeroCondition { phase });
            }
            Some(Threshold::Percent(percent)) if percent > 100 => {
                return Err(PlanError::PercentOver100 { phase, percent });
            }
            _ => {}
        }
        if proceed.delay_ms == Some(0) {
            return Err(PlanError::ZeroCondition { phase });
        }
    }
    Ok(())
}

/// Each phase's size for `n` devices.
fn phase_sizes(policy: &Policy, n: u32) -> Result<Vec<u32>, PlanError> {
    let mut left = n;
    let mut sizes = Vec::with_capacity(policy.phases.len());
    for (phase, spec) in policy.phases.iter().enumerate() {
        let want = match spec.size {
            Size::Count(c) => c,
            Size::Percent(p) => Threshold::Percent(p).needed(n),
            Size::Rest => left,
        };
        let size = want.min(left);
        if size == 0 {
            return Err(PlanError::EmptyPhase { phase, devices: n });
        }
        if let Some(t) = spec.proceed.successes {
            let needed = t.needed(size);
            if needed > size {
                return Err(PlanError::UnreachableThreshold {
                    phase,
                    size,
                    needed,
                });
            }
        }
        left -= size;
        sizes.push(size);
    }
    if left > 0 {
        return Err(PlanError::Uncovered {
            covered: n - left,
            devices: n,
        });
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests;
