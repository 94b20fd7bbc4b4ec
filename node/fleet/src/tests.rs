//! Property tests over whole rollouts: random policies, fleets and event sequences, with
//! the invariants checked after every step.

use proptest::prelude::*;

use crate::*;

#[derive(Debug, Clone)]
enum Op {
    Report(usize, Status),
    NoArtifact(usize),
    Decommission(usize),
    Pause,
    Resume,
    OpenNext,
    Abort,
    RetryFailed,
    Tick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let reportable = prop::sample::select(vec![
        Status::Downloading,
        Status::Installing,
        Status::Rebooting,
        Status::Success,
        Status::Success,
        Status::Failure,
        Status::AlreadyInstalled,
        Status::Pending,
    ]);
    prop_oneof![
        300 => (any::<usize>(), reportable).prop_map(|(d, s)| Op::Report(d, s)),
        5 => any::<usize>().prop_map(Op::NoArtifact),
        5 => any::<usize>().prop_map(Op::Decommission),
        12 => Just(Op::Pause),
        6 => Just(Op::Resume),
        8 => Just(Op::OpenNext),
        1 => Just(Op::Abort),
        5 => Just(Op::RetryFailed),
        60 => (1u64..3000).prop_map(Op::Tick),
    ]
}

fn threshold(max_count: u32, min_percent: u8) -> impl Strategy<Value = Threshold> {
    prop_oneof![
        (min_percent as u32..=max_count).prop_map(Threshold::Count),
        (min_percent..=100u8).prop_map(Threshold::Percent),
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    let early = (
        prop_oneof![
            (1u32..15).prop_map(Size::Count),
            (1u8..50).prop_map(Size::Percent)
        ],
        prop::option::of(threshold(4, 1)),
        prop::option::of(1u64..5000),
    )
        .prop_map(|(size, successes, delay_ms)| PhaseSpec {
            size,
            proceed: Proceed {
                successes,
                delay_ms,
            },
        });
    (
        prop::collection::vec(early, 0..4),
        prop::option::of(threshold(6, 0)),
        0u32..3,
        any::<u64>(),
    )
        .prop_map(|(mut phases, failures_max, retries, seed)| {
            phases.push(PhaseSpec {
                size: Size::Rest,
                proceed: Proceed::default(),
            });
            Policy {
                phases,
                failures_max,
                retries,
                seed,
            }
        })
}

fn ids(n: usize) -> Vec<DeviceId> {
    (0..n)
        .map(|i| DeviceId::new(format!("dev-{i:03}")))
        .collect()
}

/// A status change that the rules allow.
fn legal(from: Status, to: Status) -> bool {
    (!from.is_final()
        && (to.rank() > from.rank()
            || to == Status::Aborted
            || (from == Status::Pending && to == Status::NoArtifact)))
        || (from == Status::Failure && to == Status::Pending)
}

/// Plan, apply `ops`, check everything after each step; returns the effects and the
/// final state for determinism checks. `Err` when the random policy does not fit the
/// fleet (a phase would be empty or its threshold larger than it).
fn run(
    policy: &Policy,
    devices: Vec<DeviceId>,
    ops: &[Op],
) -> Result<(Vec<Effect>, Deployment, Instant), TestCaseError> {
    let now = Instant::from_millis(1_000);
    let (d, log) = match Deployment::new(policy.clone(), devices, now) {
        Ok(x) => x,
        Err(PlanError::EmptyPhase { .. } | PlanError::UnreachableThreshold { .. }) => {
            return Err(TestCaseError::reject("policy does not fit the fleet"));
        }
        Err(e) => return Err(TestCaseError::fail(format!("unexpected plan error {e}"))),
    };
    steps(policy, d, log, now, ops)
}

/// Apply `ops` to `d` from time `now` on, checking after each step.
fn steps(
    policy: &Policy,
    mut d: Deployment,
    mut log: Vec<Effect>,
    mut now: Instant,
    ops: &[Op],
) -> Result<(Vec<Effect>, Deployment, Instant), TestCaseError> {
    let all: Vec<DeviceId> = d.entries().map(|e| e.device.clone()).collect();
    d.check_invariants().map_err(TestCaseError::fail)?;
    for op in ops {
        let before = d.clone();
        let pre_summary = d.summary(now);
        let effects: Vec<Effect> = match op {
            Op::Report(i, status) => {
                let dev = &all[i % all.len()];
                let entry = before.entry(dev).expect("in deployment").clone();
                let result = d.report(dev, *status, now);
                // A device that was not admitted never starts.
                if entry.status == Status::Pending
                    && status.is_reportable()
                    && before.rollout().state() != State::Aborted
                {
                    let phase_open = (entry.phase as usize) < before.rollout().open_phases();
                    match (phase_open, before.rollout().state()) {
                        (false, _) => prop_assert_eq!(
                            &result,
                            &Err(ReportError::NotAdmitted(Wait::PhaseNotOpen {
                                phase: entry.phase as usize
                            }))
                        ),
                        (true, State::Halted) => {
                            prop_assert_eq!(&result, &Err(ReportError::NotAdmitted(Wait::Halted)))
                        }
                        (true, State::Paused) => {
                            prop_assert_eq!(&result, &Err(ReportError::NotAdmitted(Wait::Paused)))
                        }
                        (true, _) => prop_assert!(result.is_ok(), "{:?}", result),
                    }
                }
                if let Err(e) = &result {
                    prop_assert_eq!(&d, &before, "a refused report ({}) changed nothing", e);
                }
                result.unwrap_or_default()
            }
            Op::NoArtifact(i) => d.no_artifact(&all[i % all.len()], now).unwrap_or_default(),
            Op::Decommission(i) => d
                .decommissioned(&all[i % all.len()], now)
                .unwrap_or_default(),
            Op::Pause => d.pause(now).unwrap_or_default(),
            Op::Resume => d.resume(now).unwrap_or_default(),
            Op::OpenNext => d.open_next_phase(now).unwrap_or_default(),
            Op::Abort => d.abort().unwrap_or_default(),
            Op::RetryFailed => d.retry_failed(now).unwrap_or_default(),
            Op::Tick(ms) => {
                now = now.saturating_add_ms(*ms);
                let mut fx = Vec::new();
                while let Some(at) = d.poll_timeout() {
                    if at > now {
                        break;
                    }
                    fx.extend(d.handle_timeout(now));
                    // A timer that fired is not due again at the same instant.
                    prop_assert!(
                        d.poll_timeout().is_none_or(|next| next > now),
                        "timer spins at {now:?}"
                    );
                }
                fx
            }
        };
        d.check_invariants().map_err(TestCaseError::fail)?;
        let r = d.rollout();

        // Only legal status changes, and each one is reported.
        for e in &effects {
            if let Effect::Status { device, from, to } = e {
                prop_assert!(legal(*from, *to), "{device}: {from} -> {to} after {op:?}");
            }
        }
        // A halted rollout admits nobody new.
        if r.state() == State::Halted || r.state() == State::Paused {
            for e in d.entries().filter(|e| e.status == Status::Pending) {
                prop_assert_ne!(d.admission(&e.device), Some(Admission::Serve));
            }
            let started = |dep: &Deployment| {
                dep.entries()
                    .filter(|e| {
                        !matches!(
                            e.status,
                            Status::Pending | Status::Aborted | Status::NoArtifact
                        )
                    })
                    .count()
            };
            if before.rollout().state() == r.state() {
                prop_assert!(
                    started(&d) <= started(&before),
                    "a device started while {}",
                    r.state()
                );
            }
        }
        // Phases open by themselves only when their conditions held.
        if r.open_phases() > before.rollout().open_phases() && !matches!(op, Op::OpenNext) {
            let k = before.rollout().open_phases() - 1;
            let proceed = policy.phases[k].proceed;
            prop_assert!(!proceed.is_manual(), "manual phase {k} opened by {op:?}");
            let phase = &r.phases()[k];
            if let Some(t) = proceed.successes {
                prop_assert!(
                    t.reached(phase.counts.successes(), phase.size),
                    "phase {k} opened early"
                );
            }
            let next = pre_summary.next_phase.expect("a phase was waiting");
            prop_assert!(
                next.delay_remaining_ms
                    .is_none_or(|ms| ms == 0 || matches!(op, Op::Tick(_)))
            );
            prop_assert!(r.state() == State::Running);
        }
        // A halt reports the numbers that caused it.
        for e in &effects {
            if let Effect::Halted(HaltReason::Failures {
                failed,
                devices,
                limit,
            }) = e
            {
                prop_assert!(limit.passed(*failed, *devices));
                prop_assert_eq!(*failed, r.counts().failure);
                prop_assert_eq!(*devices, r.admissible());
                prop_assert_eq!(Some(*limit), policy.failures_max);
            }
        }
        // Every final failure while running checks the limit.
        if before.rollout().state() == State::Running
            && r.counts().failure > before.rollout().counts().failure
            && matches!(op, Op::Report(..))
            && let Some(limit) = policy.failures_max
        {
            let passed = limit.passed(r.counts().failure, r.admissible());
            if passed {
                prop_assert_eq!(
                    r.state(),
                    State::Halted,
                    "failures {} of {}",
                    r.counts().failure,
                    r.admissible()
                );
            } else if r.state() == State::Halted {
                let unreachable =
                    matches!(r.halt_reason(), Some(HaltReason::SuccessUnreachable { .. }));
                prop_assert!(unreachable, "{:?}", r.halt_reason());
            }
        }
        // Summaries add up.
        let s = d.summary(now);
        prop_assert_eq!(s.counts.total(), s.devices);
        prop_assert_eq!(s.devices as usize, all.len());
        log.extend(effects);
    }
    Ok((log, d, now))
}

proptest! {
    #![proptest_config(ProptestConfig { max_global_rejects: 4096, ..ProptestConfig::default() })]

    #[test]
    fn rollouts_keep_their_invariants(
        policy in policy(),
        n in 1usize..60,
        ops in prop::collection::vec(op(), 0..150),
    ) {
        run(&policy, ids(n), &ops)?;
    }

    #[test]
    fn same_seed_same_result_in_any_device_order(
        policy in policy(),
        n in 1usize..40,
        ops in prop::collection::vec(op(), 0..80),
    ) {
        let (log_a, a, _) = run(&policy, ids(n), &ops)?;
        let mut reversed = ids(n);
        reversed.reverse();
        reversed.extend(ids(n / 2)); // duplicates count once
        let (log_b, b, _) = run(&policy, reversed, &ops)?;
        prop_assert_eq!(&log_a, &log_b);
        prop_assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
    }

    #[test]
    fn stored_and_reloaded_state_decides_the_same(
        policy in policy(),
        n in 1usize..30,
        ops in prop::collection::vec(op(), 0..60),
        split in 0usize..60,
    ) {
        // A server stores the state between requests; reloading it must not change a
        // single decision.
        let split = split.min(ops.len());
        let (whole_log, whole, _) = run(&policy, ids(n), &ops)?;
        let (first_log, first, now) = run(&policy, ids(n), &ops[..split])?;
        let reloaded: Deployment = serde_json::from_str(&serde_json::to_string(&first).unwrap()).unwrap();
        prop_assert_eq!(&reloaded, &first);
        let (log, resumed, _) = steps(&policy, reloaded, first_log, now, &ops[split..])?;
        prop_assert_eq!(log, whole_log);
        prop_assert_eq!(resumed, whole);
    }
}

#[test]
fn phases_admit_exactly_their_devices_in_a_large_fleet() {
    let policy = Policy {
        phases: vec![
            PhaseSpec {
                size: Size::Percent(1),
                proceed: Proceed {
                    successes: Some(Threshold::Percent(90)),
                    delay_ms: None,
                },
            },
            PhaseSpec {
                size: Size::Percent(10),
                proceed: Proceed {
                    successes: Some(Threshold::Percent(90)),
                    delay_ms: Some(3_600_000),
                },
            },
            PhaseSpec {
                size: Size::Rest,
                proceed: Proceed::default(),
            },
        ],
        failures_max: Some(Threshold::Percent(5)),
        retries: 1,
        seed: 2026,
    };
    let devices: Vec<DeviceId> = (0..100_000)
        .map(|i| DeviceId::new(format!("{i:016x}")))
        .collect();
    let (mut d, _) = Deployment::new(policy, devices, Instant::from_millis(0)).unwrap();
    let sizes: Vec<u32> = d.rollout().phases().iter().map(|p| p.size).collect();
    assert_eq!(sizes, [1_000, 10_000, 89_000]);
    let serve = |d: &Deployment| {
        d.entries()
            .filter(|e| d.admission(&e.device) == Some(Admission::Serve))
            .count()
    };
    assert_eq!(serve(&d), 1_000);
    // 900 canaries succeed: phase 2 opens (no delay on phase 1).
    let canaries: Vec<DeviceId> = d
        .entries()
        .filter(|e| e.phase == 0)
        .map(|e| e.device.clone())
        .take(900)
        .collect();
    for dev in &canaries {
        d.report(dev, Status::Success, Instant::from_millis(10))
            .unwrap();
    }
    assert_eq!(d.rollout().open_phases(), 2);
    assert_eq!(serve(&d), 100 + 10_000);
    d.check_invariants().unwrap();
}

#[test]
fn the_random_runs_reach_every_rollout_state() {
    // Guards the property tests above: a generator that never halts, finishes or opens a
    // second phase would let them pass while checking little.
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::BTreeMap;

    let mut runner = TestRunner::deterministic();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let strategy = (policy(), 1usize..60, prop::collection::vec(op(), 0..150));
    let mut runs = 0;
    while runs < 300 {
        let (policy, n, ops) = strategy.new_tree(&mut runner).unwrap().current();
        let Ok((log, d, _)) = run(&policy, ids(n), &ops) else {
            continue;
        };
        runs += 1;
        *seen.entry(d.rollout().state().to_string()).or_default() += 1;
        for e in &log {
            let key = match e {
                Effect::Halted(HaltReason::Failures { .. }) => "halt-failures",
                Effect::Halted(HaltReason::SuccessUnreachable { .. }) => "halt-unreachable",
                Effect::PhaseOpened { phase, .. } if *phase > 0 => "later-phase-opened",
                Effect::Retrying { .. } => "retry",
                _ => continue,
            };
            *seen.entry(key.into()).or_default() += 1;
        }
    }
    for key in [
        "running",
        "paused",
        "halted",
        "aborted",
        "finished",
        "halt-failures",
        "halt-unreachable",
        "later-phase-opened",
        "retry",
    ] {
        assert!(
            seen.get(key).copied().unwrap_or(0) >= 5,
            "{key} rarely reached: {seen:?}"
        );
    }
}
