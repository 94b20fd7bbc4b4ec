//! A rollout with its device entries in memory, for drivers that keep the whole
//! deployment in one place (the fleet simulator, tests, a small server).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::Policy;
use crate::rollout::{
    Admission, ControlError, Effect, Entry, MarkError, PlanError, ReportError, Rollout, State,
    Summary,
};
use crate::status::{Counts, Status};
use crate::{DeviceId, Instant};

/// A [`Rollout`] and its devices' [`Entry`]s, addressed by device id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    rollout: Rollout,
    entries: BTreeMap<DeviceId, Entry>,
}

impl Deployment {
    /// Plan a deployment of `devices` under `policy` and open its first phase at `now`
    /// (see [`Rollout::plan`]).
    pub fn new(
        policy: Policy,
        devices: impl IntoIterator<Item = DeviceId>,
        now: Instant,
    ) -> Result<(Deployment, Vec<Effect>), PlanError> {
        let (rollout, entries, effects) = Rollout::plan(policy, devices, now)?;
        let entries = entries.into_iter().map(|e| (e.device.clone(), e)).collect();
        Ok((Deployment { rollout, entries }, effects))
    }

    /// The rollout.
    pub fn rollout(&self) -> &Rollout {
        &self.rollout
    }

    /// One device's entry.
    pub fn entry(&self, device: &DeviceId) -> Option<&Entry> {
        self.entries.get(device)
    }

    /// Every entry, in device id order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// What `device` gets when it polls (`None`: it is not in this deployment).
    pub fn admission(&self, device: &DeviceId) -> Option<Admission> {
        self.entries.get(device).map(|e| self.rollout.admission(e))
    }

    /// `device` reports `status` ([`Rollout::report`]).
    pub fn report(
        &mut self,
        device: &DeviceId,
        status: Status,
        now: Instant,
    ) -> Result<Vec<Effect>, ReportError> {
        let entry = self
            .entries
            .get_mut(device)
            .ok_or(ReportError::NotInDeployment)?;
        self.rollout.report(entry, status, now)
    }

    /// The release has no artifact for `device` ([`Rollout::no_artifact`]).
    pub fn no_artifact(
        &mut self,
        device: &DeviceId,
        now: Instant,
    ) -> Result<Vec<Effect>, MarkError> {
        let entry = self
            .entries
            .get_mut(device)
            .ok_or(MarkError::NotInDeployment)?;
        self.rollout.no_artifact(entry, now)
    }

    /// `device` was decommissioned ([`Rollout::decommissioned`]).
    pub fn decommissioned(
        &mut self,
        device: &DeviceId,
        now: Instant,
    ) -> Result<Vec<Effect>, MarkError> {
        let entry = self
            .entries
            .get_mut(device)
            .ok_or(MarkError::NotInDeployment)?;
        self.rollout.decommissioned(entry, now)
    }

    /// [`Rollout::pause`].
    pub fn pause(&mut self, now: Instant) -> Result<Vec<Effect>, ControlError> {
        self.rollout.pause(now)
    }

    /// [`Rollout::resume`].
    pub fn resume(&mut self, now: Instant) -> Result<Vec<Effect>, ControlError> {
        self.rollout.resume(now)
    }

    /// [`Rollout::open_next_phase`].
    pub fn open_next_phase(&mut self, now: Instant) -> Result<Vec<Effect>, ControlError> {
        self.rollout.open_next_phase(now)
    }

    /// [`Rollout::abort`] over every entry.
    pub fn abort(&mut self) -> Result<Vec<Effect>, ControlError> {
        self.rollout.abort(self.entries.values_mut())
    }

    /// [`Rollout::retry_failed`] over every entry.
    pub fn retry_failed(&mut self, now: Instant) -> Result<Vec<Effect>, ControlError> {
        self.rollout.retry_failed(self.entries.values_mut(), now)
    }

    /// [`Rollout::poll_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.rollout.poll_timeout()
    }

    /// [`Rollout::handle_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Effect> {
        self.rollout.handle_timeout(now)
    }

    /// [`Rollout::summary`].
    pub fn summary(&self, now: Instant) -> Summary {
        self.rollout.summary(now)
    }

    /// Check that the rollout and the entries agree; the simulator calls this after
    /// every step. Returns the first broken invariant.
    ///
    /// - each phase's counts are its entries' statuses, and add up to its size;
    /// - only devices of open phases ever started (no admission beyond the open phases);
    /// - no entry has used more retries than the policy allows;
    /// - an aborted or finished rollout has no unfinished device;
    /// - the newest open phase is the only one whose soak clock can matter, and at
    ///   least the first phase is open.
    pub fn check_invariants(&self) -> Result<(), String> {
        let r = &self.rollout;
        let phases = r.phases();
        let mut counted = vec![Counts::default(); phases.len()];
        for e in self.entries.values() {
            let Some(c) = counted.get_mut(e.phase as usize) else {
                return Err(format!(
                    "{} is in phase {} of {}",
                    e.device,
                    e.phase,
                    phases.len()
                ));
            };
            c.add(e.status, 1);
            let started = e.status.is_in_progress()
                || matches!(
                    e.status,
                    Status::Success | Status::Failure | Status::AlreadyInstalled
                );
            if started && e.phase as usize >= r.open_phases() {
                return Err(format!(
                    "{} is {} in phase {} but only {} phase(s) are open",
                    e.device,
                    e.status,
                    e.phase,
                    r.open_phases()
                ));
            }
            if e.attempts > r.policy().retries {
                return Err(format!(
                    "{} used {} retries of {}",
                    e.device,
                    e.attempts,
                    r.policy().retries
                ));
            }
        }
        for (i, (phase, counts)) in phases.iter().zip(&counted).enumerate() {
            if phase.counts != *counts {
                return Err(format!(
                    "phase {i} counts {:?} but its entries are {counts:?}",
                    phase.counts
                ));
            }
            if counts.total() != phase.size {
                return Err(format!(
                    "phase {i} holds {} of size {}",
                    counts.total(),
                    phase.size
                ));
            }
            if (i < r.open_phases()) != phase.opened_at.is_some() {
                return Err(format!("phase {i} opened_at disagrees with open phases"));
            }
        }
        if r.open_phases() == 0 {
            return Err("no phase is open".into());
        }
        let started: u32 = counted
            .iter()
            .map(|c| {
                c.downloading
                    + c.installing
                    + c.rebooting
                    + c.success
                    + c.failure
                    + c.already_installed
            })
            .sum();
        if started > r.admissible() {
            return Err(format!(
                "{started} devices started, {} admissible",
                r.admissible()
            ));
        }
        if matches!(r.state(), State::Aborted | State::Finished) && r.counts().unfinished() > 0 {
            return Err(format!(
                "{} with {} unfinished devices",
                r.state(),
                r.counts().unfinished()
            ));
        }
        if r.state() == State::Halted && r.halt_reason().is_none() {
            return Err("halted without a reason".into());
        }
        Ok(())
    }
}
