use super::*;
use crate::Deployment;
use crate::policy::PhaseSpec;

fn t(ms: u64) -> Instant {
    Instant::from_millis(ms)
}

fn ids(n: usize) -> Vec<DeviceId> {
    (0..n).map(|i| DeviceId::new(format!("d{i:03}"))).collect()
}

fn phase(size: Size, successes: Option<Threshold>, delay_ms: Option<u64>) -> PhaseSpec {
    PhaseSpec {
        size,
        proceed: Proceed {
            successes,
            delay_ms,
        },
    }
}

fn rest() -> PhaseSpec {
    phase(Size::Rest, None, None)
}

fn policy(phases: Vec<PhaseSpec>) -> Policy {
    Policy {
        phases,
        failures_max: None,
        retries: 0,
        seed: 1,
    }
}

fn deploy(p: Policy, n: usize) -> Deployment {
    Deployment::new(p, ids(n), t(0)).expect("plan").0
}

/// Devices of `phase`, in id order.
fn members(d: &Deployment, phase: u32) -> Vec<DeviceId> {
    d.entries()
        .filter(|e| e.phase == phase)
        .map(|e| e.device.clone())
        .collect()
}

fn succeed(d: &mut Deployment, dev: &DeviceId, now: u64) -> Vec<Effect> {
    d.report(dev, Status::Downloading, t(now)).unwrap();
    d.report(dev, Status::Success, t(now)).unwrap()
}

fn fail(d: &mut Deployment, dev: &DeviceId, now: u64) -> Vec<Effect> {
    d.report(dev, Status::Downloading, t(now)).unwrap();
    d.report(dev, Status::Failure, t(now)).unwrap()
}

fn opened(effects: &[Effect]) -> Vec<usize> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::PhaseOpened { phase, .. } => Some(*phase),
            _ => None,
        })
        .collect()
}

#[test]
fn plan_cuts_phases_by_count_percent_and_rest() {
    let p = policy(vec![
        phase(Size::Count(2), Some(Threshold::Count(2)), None),
        phase(Size::Percent(30), None, Some(1000)),
        rest(),
    ]);
    let (d, effects) = Deployment::new(p, ids(10), t(5)).unwrap();
    let sizes: Vec<u32> = d.rollout().phases().iter().map(|p| p.size).collect();
    assert_eq!(sizes, [2, 3, 5]);
    assert_eq!(
        effects,
        [Effect::PhaseOpened {
            phase: 0,
            devices: 2
        }]
    );
    assert_eq!(d.rollout().open_phases(), 1);
    assert_eq!(d.rollout().phases()[0].opened_at, Some(t(5)));
    assert_eq!(d.rollout().phases()[1].opened_at, None);
    assert_eq!(d.rollout().admissible(), 2);
    assert_eq!(d.rollout().phases()[2].counts.pending, 5);
    d.check_invariants().unwrap();
}

#[test]
fn percentages_round_up_and_are_clamped_to_what_is_left() {
    let p = policy(vec![
        phase(Size::Percent(1), None, Some(1)),
        phase(Size::Percent(100), None, None),
    ]);
    let d = deploy(p, 50);
    let sizes: Vec<u32> = d.rollout().phases().iter().map(|p| p.size).collect();
    assert_eq!(sizes, [1, 49]);
    let p = policy(vec![
        phase(Size::Count(7), None, Some(1)),
        phase(Size::Count(100), None, None),
    ]);
    let sizes: Vec<u32> = deploy(p, 10)
        .rollout()
        .phases()
        .iter()
        .map(|p| p.size)
        .collect();
    assert_eq!(sizes, [7, 3]);
}

#[test]
fn bad_plans_are_refused_with_specific_errors() {
    let plan = |phases: Vec<PhaseSpec>, n: usize| {
        Rollout::plan(policy(phases), ids(n), t(0))
            .map(|_| ())
            .unwrap_err()
    };
    assert_eq!(plan(vec![], 3), PlanError::NoPhases);
    assert_eq!(plan(vec![rest()], 0), PlanError::NoDevices);
    assert_eq!(
        plan(vec![rest(); PHASES_MAX + 1], 3),
        PlanError::TooManyPhases { max: PHASES_MAX }
    );
    let mut most = vec![phase(Size::Count(1), None, Some(1)); PHASES_MAX - 1];
    most.push(rest());
    let (r, _, _) = Rollout::plan(policy(most), ids(PHASES_MAX), t(0)).unwrap();
    assert_eq!(r.phases().len(), PHASES_MAX);
    assert_eq!(
        plan(vec![phase(Size::Count(0), None, Some(1)), rest()], 3),
        PlanError::ZeroSize { phase: 0 }
    );
    assert_eq!(
        plan(vec![phase(Size::Percent(0), None, Some(1)), rest()], 3),
        PlanError::ZeroSize { phase: 0 }
    );
    assert_eq!(
        plan(vec![phase(Size::Percent(101), None, Some(1)), rest()], 3),
        PlanError::PercentOver100 {
            phase: 0,
            percent: 101
        }
    );
    assert_eq!(
        plan(vec![rest(), rest()], 3),
        PlanError::RestNotLast { phase: 0 }
    );
    assert_eq!(
        plan(vec![phase(Size::Rest, None, Some(5))], 3),
        PlanError::ProceedOnLastPhase { phase: 0 }
    );
    assert_eq!(
        plan(
            vec![
                phase(Size::Count(1), Some(Threshold::Count(0)), None),
                rest()
            ],
            3
        ),
        PlanError::ZeroCondition { phase: 0 }
    );
    assert_eq!(
        plan(
            vec![
                phase(Size::Count(1), Some(Threshold::Percent(0)), None),
                rest()
            ],
            3
        ),
        PlanError::ZeroCondition { phase: 0 }
    );
    assert_eq!(
        plan(
            vec![
                phase(Size::Count(1), Some(Threshold::Percent(101)), None),
                rest()
            ],
            3
        ),
        PlanError::PercentOver100 {
            phase: 0,
            percent: 101
        }
    );
    assert_eq!(
        plan(vec![phase(Size::Count(1), None, Some(0)), rest()], 3),
        PlanError::ZeroCondition { phase: 0 }
    );
    assert_eq!(
        plan(vec![phase(Size::Count(3), None, Some(1)), rest()], 3),
        PlanError::EmptyPhase {
            phase: 1,
            devices: 3
        }
    );
    assert_eq!(
        plan(
            vec![
                phase(Size::Count(1), None, Some(1)),
                phase(Size::Count(1), None, None)
            ],
            3
        ),
        PlanError::Uncovered {
            covered: 2,
            devices: 3
        }
    );
    assert_eq!(
        plan(
            vec![
                phase(Size::Count(2), Some(Threshold::Count(3)), None),
                rest()
            ],
            5
        ),
        PlanError::UnreachableThreshold {
            phase: 0,
            size: 2,
            needed: 3
        }
    );
    let mut p = policy(vec![rest()]);
    p.failures_max = Some(Threshold::Percent(100));
    assert!(
        Rollout::plan(p.clone(), ids(3), t(0)).is_ok(),
        "100% is a (lax) limit"
    );
    p.failures_max = Some(Threshold::Percent(101));
    assert_eq!(
        Rollout::plan(p, ids(3), t(0)).map(|_| ()).unwrap_err(),
        PlanError::FailuresPercentOver100 { percent: 101 }
    );
    // The error messages number phases from 1, as the UI does.
    assert_eq!(
        PlanError::EmptyPhase {
            phase: 1,
            devices: 3
        }
        .to_string(),
        "phase 2 would be empty: the earlier phases take all 3 devices"
    );
}

#[test]
fn only_devices_of_open_phases_are_served() {
    let p = policy(vec![phase(Size::Count(2), None, Some(10)), rest()]);
    let d = deploy(p, 5);
    for dev in members(&d, 0) {
        assert_eq!(d.admission(&dev), Some(Admission::Serve));
    }
    for dev in members(&d, 1) {
        assert_eq!(
            d.admission(&dev),
            Some(Admission::NotYet(Wait::PhaseNotOpen { phase: 1 }))
        );
    }
    assert_eq!(d.admission(&DeviceId::new("stranger")), None);
}

#[test]
fn a_device_that_was_not_admitted_cannot_start() {
    let p = policy(vec![phase(Size::Count(2), None, Some(10)), rest()]);
    let mut d = deploy(p, 5);
    let later = members(&d, 1)[0].clone();
    assert_eq!(
        d.report(&later, Status::Downloading, t(1)),
        Err(ReportError::NotAdmitted(Wait::PhaseNotOpen { phase: 1 }))
    );
    assert_eq!(d.entry(&later).unwrap().status, Status::Pending);
    assert_eq!(
        d.report(&DeviceId::new("stranger"), Status::Downloading, t(1)),
        Err(ReportError::NotInDeployment)
    );
}

#[test]
fn reports_move_forward_only() {
    let mut d = deploy(policy(vec![rest()]), 2);
    let dev = DeviceId::new("d000");
    let fx = d.report(&dev, Status::Downloading, t(1)).unwrap();
    assert_eq!(
        fx,
        [Effect::Status {
            device: dev.clone(),
            from: Status::Pending,
            to: Status::Downloading
        }]
    );
    // A resent report changes nothing.
    assert_eq!(d.report(&dev, Status::Downloading, t(2)), Ok(vec![]));
    d.report(&dev, Status::Rebooting, t(3)).unwrap(); // skipping installing is fine
    assert_eq!(
        d.report(&dev, Status::Installing, t(4)),
        Err(ReportError::Backwards {
            from: Status::Rebooting,
            to: Status::Installing
        })
    );
    for s in [Status::Pending, Status::Aborted, Status::NoArtifact] {
        assert_eq!(d.report(&dev, s, t(4)), Err(ReportError::NotReportable(s)));
    }
    d.report(&dev, Status::Success, t(5)).unwrap();
    assert_eq!(d.report(&dev, Status::Success, t(6)), Ok(vec![]));
    assert_eq!(
        d.report(&dev, Status::Failure, t(6)),
        Err(ReportError::AlreadyFinished {
            status: Status::Success,
            reported: Status::Failure
        })
    );
    assert_eq!(
        d.report(&dev, Status::Downloading, t(6)),
        Err(ReportError::AlreadyFinished {
            status: Status::Success,
            reported: Status::Downloading
        })
    );
    assert_eq!(d.admission(&dev), Some(Admission::Done(Status::Success)));
    d.check_invariants().unwrap();
}

#[test]
fn a_success_threshold_opens_the_next_phase() {
    let p = policy(vec![
        phase(Size::Count(3), Some(Threshold::Count(2)), None),
        rest(),
    ]);
    let mut d = deploy(p, 6);
    let first = members(&d, 0);
    assert_eq!(opened(&succeed(&mut d, &first[0], 1)), Vec::<usize>::new());
    let fx = succeed(&mut d, &first[1], 2);
    assert_eq!(opened(&fx), [1]);
    assert!(fx.contains(&Effect::PhaseOpened {
        phase: 1,
        devices: 3
    }));
    assert_eq!(d.rollout().phases()[1].opened_at, Some(t(2)));
    assert_eq!(d.admission(&members(&d, 1)[0]), Some(Admission::Serve));
}

#[test]
fn already_installed_counts_as_a_success_percentage_of_the_phase() {
    let p = policy(vec![
        phase(Size::Count(4), Some(Threshold::Percent(50)), None),
        rest(),
    ]);
    let mut d = deploy(p, 8);
    let first = members(&d, 0);
    assert!(opened(&d.report(&first[0], Status::AlreadyInstalled, t(1)).unwrap()).is_empty());
    assert_eq!(opened(&succeed(&mut d, &first[1], 2)), [1]);
}

#[test]
fn a_delay_is_a_timer_and_does_not_count_time_paused() {
    let p = policy(vec![phase(Size::Count(1), None, Some(1000)), rest()]);
    let (mut d, _) = Deployment::new(p, ids(3), t(100)).unwrap();
    assert_eq!(d.poll_timeout(), Some(t(1100)));
    assert!(d.handle_timeout(t(1099)).is_empty());
    d.pause(t(400)).unwrap(); // 300 ms ran
    assert_eq!(d.poll_timeout(), None);
    assert!(
        d.handle_timeout(t(5000)).is_empty(),
        "no phase opens while paused"
    );
    d.resume(t(10_000)).unwrap();
    assert_eq!(d.poll_timeout(), Some(t(10_700)));
    let s = d.summary(t(10_100));
    assert_eq!(s.next_phase.unwrap().delay_remaining_ms, Some(600));
    assert!(d.handle_timeout(t(10_699)).is_empty());
    assert_eq!(opened(&d.handle_timeout(t(10_700))), [1]);
    assert_eq!(d.poll_timeout(), None, "the last phase has no timer");
}

#[test]
fn both_conditions_must_hold() {
    let p = policy(vec![
        phase(Size::Count(2), Some(Threshold::Count(1)), Some(500)),
        rest(),
    ]);
    let mut d = deploy(p, 4);
    assert!(
        d.handle_timeout(t(600)).is_empty(),
        "delay ran, no success yet"
    );
    assert_eq!(
        d.poll_timeout(),
        None,
        "the delay ran; only a report can open the phase now"
    );
    let first = members(&d, 0);
    assert_eq!(opened(&succeed(&mut d, &first[0], 700)), [1]);

    let p = policy(vec![
        phase(Size::Count(2), Some(Threshold::Count(1)), Some(500)),
        rest(),
    ]);
    let mut d = deploy(p, 4);
    let first = members(&d, 0);
    assert!(
        opened(&succeed(&mut d, &first[0], 100)).is_empty(),
        "success, delay not over"
    );
    let next = d.summary(t(100)).next_phase.unwrap();
    assert_eq!(
        next,
        NextPhase {
            phase: 1,
            successes: Some((1, 1)),
            delay_remaining_ms: Some(400),
            manual: false
        }
    );
    assert_eq!(opened(&d.handle_timeout(t(500))), [1]);
}

#[test]
fn a_phase_without_conditions_waits_for_an_operator() {
    let p = policy(vec![
        phase(Size::Count(1), None, None),
        phase(Size::Count(1), None, None),
        rest(),
    ]);
    let mut d = deploy(p, 3);
    let first = members(&d, 0);
    assert!(opened(&succeed(&mut d, &first[0], 1)).is_empty());
    assert_eq!(d.poll_timeout(), None);
    assert!(d.summary(t(1)).next_phase.unwrap().manual);
    assert_eq!(opened(&d.open_next_phase(t(2)).unwrap()), [1]);
    assert_eq!(opened(&d.open_next_phase(t(3)).unwrap()), [2]);
    assert_eq!(d.open_next_phase(t(4)), Err(ControlError::NoMorePhases));
    d.pause(t(5)).unwrap();
    assert_eq!(
        d.open_next_phase(t(6)),
        Err(ControlError::Illegal {
            command: Command::OpenNextPhase,
            state: State::Paused
        })
    );
}

#[test]
fn failures_past_a_count_halt_the_rollout() {
    let mut p = policy(vec![
        phase(Size::Count(6), Some(Threshold::Count(3)), None),
        rest(),
    ]);
    p.failures_max = Some(Threshold::Count(1));
    let mut d = deploy(p, 12);
    let first = members(&d, 0);
    for dev in &first[1..4] {
        d.report(dev, Status::Downloading, t(1)).unwrap();
    }
    let fx = fail(&mut d, &first[0], 2);
    assert!(
        !fx.iter().any(|e| matches!(e, Effect::Halted(_))),
        "one failure is tolerated"
    );
    assert_eq!(d.rollout().state(), State::Running);
    let fx = fail(&mut d, &first[4], 3);
    let reason = HaltReason::Failures {
        failed: 2,
        devices: 6,
        limit: Threshold::Count(1),
    };
    assert!(fx.contains(&Effect::Halted(reason)), "{fx:?}");
    assert_eq!(d.rollout().state(), State::Halted);
    assert_eq!(d.rollout().halt_reason(), Some(reason));
    assert_eq!(
        reason.to_string(),
        "2 of 6 devices in the open phases failed (33.3%), more than the 1 device(s) allowed"
    );
    // Nobody new starts.
    assert_eq!(
        d.admission(&first[5]),
        Some(Admission::NotYet(Wait::Halted))
    );
    for s in [
        Status::Downloading,
        Status::Success,
        Status::AlreadyInstalled,
    ] {
        assert_eq!(
            d.report(&first[5], s, t(4)),
            Err(ReportError::NotAdmitted(Wait::Halted))
        );
    }
    // Devices already on their way finish; their three successes would open phase 2,
    // but not while halted.
    for dev in &first[1..4] {
        assert_eq!(d.admission(dev), Some(Admission::Serve));
        assert!(opened(&d.report(dev, Status::Success, t(5)).unwrap()).is_empty());
    }
    assert_eq!(d.rollout().open_phases(), 1);
    assert_eq!(
        d.pause(t(6)),
        Err(ControlError::Illegal {
            command: Command::Pause,
            state: State::Halted
        })
    );
    // Resuming accepts the two failures, and the phase whose successes are in opens.
    assert_eq!(opened(&d.resume(t(7)).unwrap()), [1]);
    assert_eq!(d.admission(&first[5]), Some(Admission::Serve));
    // The next failure finds the limit passed again.
    let second = members(&d, 1);
    let fx = fail(&mut d, &second[0], 10);
    let reason = HaltReason::Failures {
        failed: 3,
        devices: 12,
        limit: Threshold::Count(1),
    };
    assert!(fx.contains(&Effect::Halted(reason)), "{fx:?}");
    assert_eq!(d.rollout().halt_reason(), Some(reason));
    d.check_invariants().unwrap();
}

#[test]
fn failures_past_a_percentage_of_the_open_phases_halt() {
    let mut p = policy(vec![phase(Size::Count(20), None, None), rest()]);
    p.failures_max = Some(Threshold::Percent(10));
    let mut d = deploy(p, 100);
    let first = members(&d, 0);
    fail(&mut d, &first[0], 1);
    fail(&mut d, &first[1], 2);
    assert_eq!(
        d.rollout().state(),
        State::Running,
        "2 of 20 is 10%, not more"
    );
    let fx = fail(&mut d, &first[2], 3);
    let reason = HaltReason::Failures {
        failed: 3,
        devices: 20,
        limit: Threshold::Percent(10),
    };
    assert!(fx.contains(&Effect::Halted(reason)));
    assert_eq!(
        reason.to_string(),
        "3 of 20 devices in the open phases failed (15.0%), more than the 10% allowed"
    );
}

#[test]
fn a_threshold_reachable_exactly_does_not_halt() {
    let p = policy(vec![
        phase(Size::Count(3), Some(Threshold::Count(2)), None),
        rest(),
    ]);
    let mut d = deploy(p, 6);
    let first = members(&d, 0);
    fail(&mut d, &first[0], 1);
    assert_eq!(
        d.rollout().state(),
        State::Running,
        "2 successes still possible, 2 needed"
    );
    let fx = fail(&mut d, &first[1], 2);
    assert!(fx.contains(&Effect::Halted(HaltReason::SuccessUnreachable {
        phase: 0,
        possible: 1,
        needed: 2
    })));
}

#[test]
fn the_summary_names_no_next_phase_when_none_can_open() {
    let p = policy(vec![phase(Size::Count(1), None, None), rest()]);
    let mut d = deploy(p.clone(), 3);
    assert_eq!(d.summary(t(0)).next_phase.map(|n| n.phase), Some(1));
    d.open_next_phase(t(1)).unwrap();
    let s = d.summary(t(1));
    assert_eq!(
        (s.state, s.open_phases, s.next_phase),
        (State::Running, 2, None)
    );
    let mut d = deploy(p, 3);
    d.abort().unwrap();
    assert_eq!(
        d.summary(t(1)).next_phase,
        None,
        "an aborted rollout opens nothing"
    );
}

#[test]
fn an_unreachable_success_threshold_halts() {
    let p = policy(vec![
        phase(Size::Count(3), Some(Threshold::Percent(100)), None),
        rest(),
    ]);
    let mut d = deploy(p, 6);
    let first = members(&d, 0);
    succeed(&mut d, &first[0], 1);
    let fx = d.no_artifact(&first[1], t(2)).unwrap();
    let reason = HaltReason::SuccessUnreachable {
        phase: 0,
        possible: 2,
        needed: 3,
    };
    assert!(fx.contains(&Effect::Halted(reason)), "{fx:?}");
    assert_eq!(
        reason.to_string(),
        "phase 1 can reach at most 2 successes but needs 3 to proceed"
    );
    // An operator may approve the next phase after resuming.
    d.resume(t(3)).unwrap();
    assert_eq!(opened(&d.open_next_phase(t(4)).unwrap()), [1]);
}

#[test]
fn failed_devices_retry_within_their_budget() {
    let mut p = policy(vec![rest()]);
    p.retries = 2;
    p.failures_max = Some(Threshold::Count(0));
    let mut d = deploy(p, 2);
    let dev = DeviceId::new("d000");
    for attempt in 1..=2 {
        let fx = fail(&mut d, &dev, attempt.into());
        assert!(
            fx.contains(&Effect::Retrying {
                device: dev.clone(),
                attempt
            }),
            "{fx:?}"
        );
        assert_eq!(d.entry(&dev).unwrap().status, Status::Pending);
        assert_eq!(d.entry(&dev).unwrap().attempts, attempt);
        assert_eq!(d.admission(&dev), Some(Admission::Serve));
        assert_eq!(
            d.rollout().state(),
            State::Running,
            "a retried failure is not final"
        );
    }
    let fx = fail(&mut d, &dev, 3);
    assert!(!fx.iter().any(|e| matches!(e, Effect::Retrying { .. })));
    assert_eq!(d.entry(&dev).unwrap().status, Status::Failure);
    assert_eq!(
        d.rollout().state(),
        State::Halted,
        "the final failure passes failures_max 0"
    );
    d.check_invariants().unwrap();
}

#[test]
fn an_operator_retries_failed_devices_with_a_fresh_budget() {
    let mut p = policy(vec![rest()]);
    p.retries = 1;
    let mut d = deploy(p, 2);
    assert_eq!(d.retry_failed(t(0)), Err(ControlError::NothingToRetry));
    let [a, b] = [DeviceId::new("d000"), DeviceId::new("d001")];
    fail(&mut d, &a, 1);
    fail(&mut d, &a, 2);
    let fx = succeed(&mut d, &b, 3);
    assert_eq!(fx.last(), Some(&Effect::Finished));
    assert_eq!(d.rollout().state(), State::Finished);
    let fx = d.retry_failed(t(4)).unwrap();
    assert_eq!(
        fx,
        [Effect::Status {
            device: a.clone(),
            from: Status::Failure,
            to: Status::Pending
        }]
    );
    assert_eq!(d.rollout().state(), State::Running);
    assert_eq!(d.entry(&a).unwrap().attempts, 0);
    assert_eq!(d.admission(&a), Some(Admission::Serve));
    assert_eq!(d.rollout().counts().failure, 0);
    d.check_invariants().unwrap();
}

#[test]
fn abort_stops_every_unfinished_device() {
    let p = policy(vec![phase(Size::Count(2), None, Some(100)), rest()]);
    let mut d = deploy(p, 4);
    let first = members(&d, 0);
    let later = members(&d, 1);
    succeed(&mut d, &first[0], 1);
    d.report(&first[1], Status::Downloading, t(2)).unwrap();
    let fx = d.abort().unwrap();
    assert_eq!(fx.len(), 3, "{fx:?}");
    assert!(fx.contains(&Effect::Status {
        device: first[1].clone(),
        from: Status::Downloading,
        to: Status::Aborted
    }));
    assert_eq!(d.rollout().state(), State::Aborted);
    assert_eq!(
        d.report(&first[1], Status::Installing, t(3)),
        Err(ReportError::Aborted)
    );
    assert_eq!(
        d.report(&first[0], Status::Success, t(3)),
        Err(ReportError::Aborted)
    );
    assert_eq!(
        d.admission(&later[0]),
        Some(Admission::Done(Status::Aborted))
    );
    assert_eq!(
        d.entry(&first[0]).unwrap().status,
        Status::Success,
        "finished devices keep their status"
    );
    assert_eq!(
        d.abort(),
        Err(ControlError::Illegal {
            command: Command::Abort,
            state: State::Aborted
        })
    );
    assert_eq!(
        d.resume(t(4)),
        Err(ControlError::Illegal {
            command: Command::Resume,
            state: State::Aborted
        })
    );
    assert_eq!(
        d.retry_failed(t(4)),
        Err(ControlError::Illegal {
            command: Command::RetryFailed,
            state: State::Aborted
        })
    );
    assert_eq!(d.poll_timeout(), None);
    d.check_invariants().unwrap();
}

#[test]
fn abort_and_retry_refuse_entries_that_do_not_match_the_counts() {
    let (mut r, mut entries, _) = Rollout::plan(policy(vec![rest()]), ids(3), t(0)).unwrap();
    let before = r.clone();
    assert_eq!(
        r.abort(entries.iter_mut().take(2)),
        Err(ControlError::Entries {
            status: "an unfinished",
            expected: 3,
            given: 2
        })
    );
    assert_eq!(r, before, "nothing changed");
    assert!(entries.iter().all(|e| e.status == Status::Pending));
    r.report(&mut entries[0], Status::Failure, t(1)).unwrap();
    let mut stranger = Entry {
        device: DeviceId::new("x"),
        phase: 0,
        status: Status::Failure,
        attempts: 0,
    };
    assert_eq!(
        r.retry_failed([&mut stranger, &mut entries[0]], t(2)),
        Err(ControlError::Entries {
            status: "failure",
            expected: 1,
            given: 2
        })
    );
    assert_eq!(r.abort(entries.iter_mut()).unwrap().len(), 2);
}

#[test]
fn foreign_entries_are_refused() {
    let (mut r, _, _) = Rollout::plan(policy(vec![rest()]), ids(3), t(0)).unwrap();
    let mut wrong_phase = Entry {
        device: DeviceId::new("d000"),
        phase: 5,
        status: Status::Pending,
        attempts: 0,
    };
    assert_eq!(
        r.report(&mut wrong_phase, Status::Downloading, t(1)),
        Err(ReportError::ForeignEntry {
            phase: 5,
            status: Status::Pending
        })
    );
    let mut wrong_status = Entry {
        device: DeviceId::new("d000"),
        phase: 0,
        status: Status::Installing,
        attempts: 0,
    };
    assert_eq!(
        r.report(&mut wrong_status, Status::Success, t(1)),
        Err(ReportError::ForeignEntry {
            phase: 0,
            status: Status::Installing
        })
    );
    assert_eq!(
        r.no_artifact(&mut wrong_status, t(1)),
        Err(MarkError::ForeignEntry {
            phase: 0,
            status: Status::Installing
        })
    );
}

#[test]
fn no_artifact_and_decommissioned_devices_let_the_rollout_finish() {
    let mut d = deploy(policy(vec![rest()]), 3);
    let [a, b, c] = [0, 1, 2].map(|i| DeviceId::new(format!("d{i:03}")));
    succeed(&mut d, &a, 1);
    d.report(&b, Status::Installing, t(1)).unwrap();
    assert_eq!(
        d.no_artifact(&b, t(2)),
        Err(MarkError::NotPending(Status::Installing))
    );
    d.no_artifact(&c, t(2)).unwrap();
    assert_eq!(d.rollout().state(), State::Running);
    let fx = d.decommissioned(&b, t(3)).unwrap();
    assert_eq!(
        fx,
        [
            Effect::Status {
                device: b.clone(),
                from: Status::Installing,
                to: Status::Aborted
            },
            Effect::Finished
        ]
    );
    assert_eq!(
        d.report(&b, Status::Success, t(4)),
        Err(ReportError::Aborted)
    );
    assert_eq!(
        d.decommissioned(&a, t(4)),
        Ok(vec![]),
        "a finished device keeps its status"
    );
    let s = d.summary(t(5));
    assert_eq!(
        (s.counts.success, s.counts.noartifact, s.counts.aborted),
        (1, 1, 1)
    );
    assert_eq!(s.state, State::Finished);
    assert_eq!(s.next_phase, None);
}

#[test]
fn pause_stops_new_starts_but_not_running_devices() {
    let mut d = deploy(policy(vec![rest()]), 2);
    let [a, b] = [DeviceId::new("d000"), DeviceId::new("d001")];
    d.report(&a, Status::Downloading, t(1)).unwrap();
    d.pause(t(2)).unwrap();
    assert_eq!(
        d.pause(t(2)),
        Err(ControlError::Illegal {
            command: Command::Pause,
            state: State::Paused
        })
    );
    assert_eq!(d.admission(&b), Some(Admission::NotYet(Wait::Paused)));
    assert_eq!(
        d.report(&b, Status::Downloading, t(3)),
        Err(ReportError::NotAdmitted(Wait::Paused))
    );
    assert_eq!(d.admission(&a), Some(Admission::Serve));
    d.report(&a, Status::Success, t(3)).unwrap();
    d.resume(t(4)).unwrap();
    assert_eq!(
        d.resume(t(4)),
        Err(ControlError::Illegal {
            command: Command::Resume,
            state: State::Running
        })
    );
    assert_eq!(succeed(&mut d, &b, 5).last(), Some(&Effect::Finished));
}

#[test]
fn a_failure_while_paused_halts_and_resume_finishes_a_done_rollout() {
    let mut p = policy(vec![rest()]);
    p.failures_max = Some(Threshold::Count(0));
    let mut d = deploy(p, 1);
    let a = DeviceId::new("d000");
    d.report(&a, Status::Installing, t(1)).unwrap();
    d.pause(t(2)).unwrap();
    let fx = d.report(&a, Status::Failure, t(3)).unwrap();
    assert!(
        matches!(
            fx.last(),
            Some(Effect::Halted(HaltReason::Failures {
                failed: 1,
                devices: 1,
                ..
            }))
        ),
        "{fx:?}"
    );
    assert_eq!(
        d.rollout().state(),
        State::Halted,
        "every device is final, but the halt stands"
    );
    assert_eq!(d.resume(t(4)).unwrap(), [Effect::Finished]);
    assert_eq!(d.rollout().state(), State::Finished);
}

#[test]
fn rollouts_round_trip_through_serde() {
    let mut p = policy(vec![
        phase(Size::Percent(10), Some(Threshold::Count(1)), Some(60_000)),
        rest(),
    ]);
    p.failures_max = Some(Threshold::Percent(50));
    let mut d = deploy(p, 30);
    let first = members(&d, 0);
    fail(&mut d, &first[0], 1);
    d.pause(t(2)).unwrap();
    let json = serde_json::to_string(&d).unwrap();
    let back: Deployment = serde_json::from_str(&json).unwrap();
    assert_eq!(back, d);
    let rollout_json = serde_json::to_string(d.rollout()).unwrap();
    assert!(
        rollout_json.len() < 1024,
        "a rollout row stays small: {} bytes",
        rollout_json.len()
    );
}

#[test]
fn a_resumed_rollout_halts_again_only_on_a_new_final_outcome() {
    // Regression: a non-final report after resuming an unreachable-success halt re-halted
    // at once, so the operator could never let the phase's devices carry on.
    let p = policy(vec![
        phase(Size::Count(3), Some(Threshold::Percent(100)), None),
        rest(),
    ]);
    let mut d = deploy(p, 6);
    let first = members(&d, 0);
    fail(&mut d, &first[0], 1);
    assert_eq!(d.rollout().state(), State::Halted);
    d.resume(t(2)).unwrap();
    assert_eq!(
        d.report(&first[1], Status::Downloading, t(3))
            .unwrap()
            .len(),
        1
    );
    assert_eq!(d.rollout().state(), State::Running);
    // A success does not make the threshold less reachable: no halt.
    assert_eq!(
        d.report(&first[2], Status::Downloading, t(3))
            .unwrap()
            .len(),
        1
    );
    assert_eq!(d.report(&first[2], Status::Success, t(3)).unwrap().len(), 1);
    assert_eq!(d.rollout().state(), State::Running);
    let fx = d.report(&first[1], Status::Failure, t(4)).unwrap();
    assert!(
        fx.contains(&Effect::Halted(HaltReason::SuccessUnreachable {
            phase: 0,
            possible: 1,
            needed: 3
        })),
        "{fx:?}"
    );
}

#[test]
fn a_tampered_stored_rollout_is_refused_on_load() {
    let mut p = policy(vec![phase(Size::Count(2), None, Some(10)), rest()]);
    p.failures_max = Some(Threshold::Count(0));
    let d = deploy(p, 4);
    let good = serde_json::to_value(d.rollout()).unwrap();
    let load = |v: &serde_json::Value| {
        serde_json::from_value::<Rollout>(v.clone()).map_err(|e| e.to_string())
    };
    assert_eq!(load(&good).unwrap(), *d.rollout());
    let tamper = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        load(&v).unwrap_err()
    };
    assert_eq!(
        tamper(&|v| v["open"] = 0.into()),
        "stored rollout has 0 open phases of 2"
    );
    assert_eq!(
        tamper(&|v| v["open"] = 3.into()),
        "stored rollout has 3 open phases of 2"
    );
    assert_eq!(
        tamper(&|v| v["phases"].as_array_mut().unwrap().truncate(1)),
        "stored rollout has 1 phases but its policy has 2"
    );
    assert_eq!(
        tamper(&|v| v["phases"][1]["counts"]["pending"] = 9.into()),
        "stored rollout's phase 2 is inconsistent"
    );
    assert_eq!(
        tamper(&|v| v["phases"][1]["opened_at"] = 5.into()),
        "stored rollout's phase 2 is inconsistent"
    );
    assert_eq!(
        tamper(&|v| v["state"] = "halted".into()),
        "stored rollout is halted without a reason"
    );
    assert_eq!(
        tamper(&|v| v["policy"]["phases"][0]["size"] = serde_json::json!({"count": 0})),
        "stored rollout has an invalid policy: phase 1 has size zero"
    );
}
