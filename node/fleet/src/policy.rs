//! How a deployment rolls out: its phases, when each proceeds, when the rollout halts,
//! how often a failed device retries, and the seed that picks the phases' devices.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A rollout's policy. [`Policy::all_at_once`] is the plain, unphased deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The phases in order; at least one. Only the last may be [`Size::Rest`], and the
    /// last has no [`Proceed`] condition (there is nothing after it).
    pub phases: Vec<PhaseSpec>,
    /// The most failed devices tolerated; the rollout halts when failures pass it.
    /// `None`: never halt for failures. A percentage is of the devices in the phases
    /// opened so far.
    #[serde(default)]
    pub failures_max: Option<Threshold>,
    /// How many times a failed device is offered the deployment again before its failure
    /// is final (Mender's `retries`).
    #[serde(default)]
    pub retries: u32,
    /// Picks which devices go into which phase; the same seed and devices give the same
    /// phases, whatever order the devices were listed in.
    #[serde(default)]
    pub seed: u64,
}

impl Policy {
    /// One phase with every device, no halt, no retries.
    pub fn all_at_once() -> Policy {
        Policy {
            phases: vec![PhaseSpec {
                size: Size::Rest,
                proceed: Proceed::default(),
            }],
            failures_max: None,
            retries: 0,
            seed: 0,
        }
    }
}

/// One phase of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseSpec {
    /// How many of the target's devices the phase holds.
    pub size: Size,
    /// When the next phase opens. Must be empty on the last phase.
    #[serde(default)]
    pub proceed: Proceed,
}

/// A phase's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    /// This many devices (fewer if fewer are left).
    Count(u32),
    /// This percentage (1 to 100) of the target's devices, rounded up, so a small
    /// canary percentage of a small fleet still holds a device.
    Percent(u8),
    /// Every device the earlier phases left; only for the last phase.
    Rest,
}

/// When the phase after this one opens. With both fields set, both must hold; with
/// neither, the next phase opens only when an operator says so
/// ([`Rollout::open_next_phase`](crate::Rollout::open_next_phase)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proceed {
    /// At least this many of this phase's devices succeeded (a percentage is of the
    /// phase's size).
    #[serde(default)]
    pub successes: Option<Threshold>,
    /// At least this long since the phase opened, not counting time paused or halted
    /// (a soak time to watch the devices that updated).
    #[serde(default)]
    pub delay_ms: Option<u64>,
}

impl Proceed {
    /// Whether only an operator opens the next phase.
    pub fn is_manual(&self) -> bool {
        self.successes.is_none() && self.delay_ms.is_none()
    }
}

/// A number of devices, absolute or relative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Threshold {
    /// This many devices.
    Count(u32),
    /// This percentage (0 to 100) of a base that depends on the use.
    Percent(u8),
}

impl Threshold {
    /// Whether `n` devices out of `base` reach the threshold (`n ≥` it).
    pub fn reached(self, n: u32, base: u32) -> bool {
        match self {
            Threshold::Count(c) => n >= c,
            Threshold::Percent(p) => u64::from(n) * 100 >= u64::from(p) * u64::from(base),
        }
    }

    /// Whether `n` devices out of `base` pass the threshold (`n >` it).
    pub fn passed(self, n: u32, base: u32) -> bool {
        match self {
            Threshold::Count(c) => n > c,
            Threshold::Percent(p) => u64::from(n) * 100 > u64::from(p) * u64::from(base),
        }
    }

    /// The fewest devices out of `base` that reach the threshold.
    pub fn needed(self, base: u32) -> u32 {
        match self {
            Threshold::Count(c) => c,
            // ceil(p * base / 100) ≤ base, so the cast is lossless.
            Threshold::Percent(p) => (u64::from(p) * u64::from(base)).div_ceil(100) as u32,
        }
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threshold::Count(c) => write!(f, "{c} device(s)"),
            Threshold::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        assert!(Threshold::Count(3).reached(3, 10));
        assert!(!Threshold::Count(3).reached(2, 10));
        assert!(!Threshold::Count(3).passed(3, 10));
        assert!(Threshold::Count(3).passed(4, 10));
        assert!(Threshold::Percent(10).reached(1, 10));
        assert!(!Threshold::Percent(10).reached(1, 11));
        assert!(!Threshold::Percent(10).passed(1, 10));
        assert!(Threshold::Percent(10).passed(2, 10));
        assert!(Threshold::Percent(0).passed(1, 1000));
        assert!(!Threshold::Percent(0).passed(0, 1000));
        assert_eq!(Threshold::Percent(10).needed(11), 2);
        assert_eq!(Threshold::Percent(10).needed(10), 1);
        assert_eq!(Threshold::Percent(100).needed(7), 7);
        assert_eq!(Threshold::Percent(100).needed(u32::MAX), u32::MAX);
        assert_eq!(Threshold::Count(5).needed(2), 5);
    }

    #[test]
    fn policy_json_is_strict() {
        let p: Policy = serde_json::from_str(
            r#"{"phases":[{"size":{"percent":10},"proceed":{"successes":{"count":5},"delay_ms":60000}},{"size":"rest"}],
                "failures_max":{"percent":5},"retries":2,"seed":7}"#,
        )
        .unwrap();
        assert_eq!(p.phases[0].size, Size::Percent(10));
        assert_eq!(p.phases[0].proceed.delay_ms, Some(60_000));
        assert!(p.phases[1].proceed.is_manual());
        assert_eq!(p.failures_max, Some(Threshold::Percent(5)));
        let unknown = serde_json::from_str::<Policy>(r#"{"phases":[],"retry":2}"#).unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `retry`"),
            "{unknown}"
        );
    }
}
