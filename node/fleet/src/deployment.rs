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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PhaseSpec, Proceed, Size};
    use serde_json::{Value, json};

    /// Two phases of 2 devices; d-phase-0 devices first.
    fn deployment() -> Deployment {
        let policy = Policy {
            phases: vec![
                PhaseSpec {
                    size: Size::Count(2),
                    proceed: Proceed {
                        successes: None,
                        delay_ms: Some(10),
                    },
                },
                PhaseSpec {
                    size: Size::Rest,
                    proceed: Proceed::default(),
                },
            ],
            failures_max: None,
            retries: 1,
            seed: 3,
        };
        let devices = (0..4).map(|i| DeviceId::new(format!("d{i}")));
        Deployment::new(policy, devices, Instant::from_millis(0))
            .unwrap()
            .0
    }

    /// The deployment with `f` applied to its stored form, loaded back.
    fn tampered(d: &Deployment, f: impl FnOnce(&mut Value)) -> Deployment {
        let mut v = serde_json::to_value(d).unwrap();
        f(&mut v);
        serde_json::from_value(v).unwrap()
    }

    fn entry_in(d: &Deployment, phase: u32) -> String {
        d.entries()
            .find(|e| e.phase == phase)
            .unwrap()
            .device
            .to_string()
    }

    #[test]
    fn a_consistent_deployment_passes() {
        let d = deployment();
        assert_eq!(d.check_invariants(), Ok(()));
        assert_eq!(d.entries().count(), 4);
        assert_eq!(d.entries().filter(|e| e.phase == 0).count(), 2);
    }

    #[test]
    fn invariants_catch_each_kind_of_disagreement() {
        let d = deployment();
        let late = entry_in(&d, 1);
        let early = entry_in(&d, 0);

        let t = tampered(&d, |v| v["entries"][&late]["status"] = json!("downloading"));
        let err = t.check_invariants().unwrap_err();
        assert_eq!(
            err,
            format!("{late} is downloading in phase 1 but only 1 phase(s) are open")
        );

        let t = tampered(&d, |v| v["entries"][&early]["status"] = json!("success"));
        let err = t.check_invariants().unwrap_err();
        assert!(err.starts_with("phase 0 counts"), "{err}");

        let t = tampered(&d, |v| v["entries"][&early]["attempts"] = json!(2));
        assert_eq!(
            t.check_invariants().unwrap_err(),
            format!("{early} used 2 retries of 1")
        );

        let t = tampered(&d, |v| v["entries"][&early]["phase"] = json!(7));
        assert_eq!(
            t.check_invariants().unwrap_err(),
            format!("{early} is in phase 7 of 2")
        );

        let t = tampered(&d, |v| {
            let entries = v["entries"].as_object_mut().unwrap();
            entries.remove(&late);
        });
        let err = t.check_invariants().unwrap_err();
        assert!(err.starts_with("phase 1 counts"), "{err}");
    }

    #[test]
    fn invariants_catch_a_state_that_contradicts_the_entries() {
        let mut d = deployment();
        let early = DeviceId::new(entry_in(&d, 0));
        d.report(&early, Status::Downloading, Instant::from_millis(1))
            .unwrap();
        // Claim the rollout finished while a device is downloading (counts agree).
        let t = tampered(&d, |v| v["rollout"]["state"] = json!("finished"));
        assert_eq!(
            t.check_invariants().unwrap_err(),
            "finished with 4 unfinished devices"
        );
        let t = tampered(&d, |v| v["rollout"]["state"] = json!("aborted"));
        assert_eq!(
            t.check_invariants().unwrap_err(),
            "aborted with 4 unfinished devices"
        );
    }

    #[test]
    fn the_wrapper_answers_for_unknown_devices() {
        let mut d = deployment();
        let stranger = DeviceId::new("stranger");
        let now = Instant::from_millis(1);
        assert_eq!(d.admission(&stranger), None);
        assert_eq!(d.entry(&stranger), None);
        assert_eq!(
            d.report(&stranger, Status::Success, now),
            Err(ReportError::NotInDeployment)
        );
        assert_eq!(
            d.no_artifact(&stranger, now),
            Err(MarkError::NotInDeployment)
        );
        assert_eq!(
            d.decommissioned(&stranger, now),
            Err(MarkError::NotInDeployment)
        );
    }

    #[test]
    fn the_wrapper_forwards_to_the_rollout() {
        let mut d = deployment();
        let early = DeviceId::new(entry_in(&d, 0));
        let late = DeviceId::new(entry_in(&d, 1));
        assert_eq!(d.poll_timeout(), Some(Instant::from_millis(10)));
        assert_eq!(d.handle_timeout(Instant::from_millis(10)).len(), 1);
        assert_eq!(d.admission(&late), Some(Admission::Serve));
        d.pause(Instant::from_millis(11)).unwrap();
        assert_eq!(d.summary(Instant::from_millis(11)).state, State::Paused);
        d.resume(Instant::from_millis(12)).unwrap();
        d.no_artifact(&late, Instant::from_millis(13)).unwrap();
        assert_eq!(d.entry(&late).unwrap().status, Status::NoArtifact);
        d.report(&early, Status::Failure, Instant::from_millis(14))
            .unwrap(); // retried
        d.report(&early, Status::Failure, Instant::from_millis(15))
            .unwrap();
        assert_eq!(d.retry_failed(Instant::from_millis(16)).unwrap().len(), 1);
        assert_eq!(
            d.open_next_phase(Instant::from_millis(17)),
            Err(ControlError::NoMorePhases)
        );
        d.decommissioned(&early, Instant::from_millis(18)).unwrap();
        assert_eq!(d.entry(&early).unwrap().status, Status::Aborted);
        assert_eq!(d.abort().unwrap().len(), 2);
        assert_eq!(d.rollout().state(), State::Aborted);
        d.check_invariants().unwrap();
    }
}
