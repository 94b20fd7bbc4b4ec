//! Time as the fleet logic sees it: given, never read.

use serde::{Deserialize, Serialize};

/// A point in time, in milliseconds since an origin the driver picked.
///
/// The server passes Unix milliseconds (its processes share one database, so they need a
/// shared clock; it should be the database's `now()` or a well-synchronised host clock);
/// the simulator passes virtual time starting at zero. The fleet logic only compares
/// instants and adds durations to them, so any origin works as long as one rollout always
/// sees the same one.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Instant(u64);

impl Instant {
    /// The instant `ms` milliseconds after the origin.
    pub const fn from_millis(ms: u64) -> Instant {
        Instant(ms)
    }

    /// Milliseconds since the origin.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + ms`, saturating at the end of time.
    pub const fn saturating_add_ms(self, ms: u64) -> Instant {
        Instant(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later (a clock that
    /// stepped back never yields a negative duration).
    pub const fn saturating_since_ms(self, earlier: Instant) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(
            Instant::from_millis(u64::MAX - 1).saturating_add_ms(5),
            Instant::from_millis(u64::MAX)
        );
        assert_eq!(Instant::from_millis(5).saturating_add_ms(7).as_millis(), 12);
        assert_eq!(
            Instant::from_millis(5).saturating_since_ms(Instant::from_millis(9)),
            0
        );
        assert_eq!(
            Instant::from_millis(9).saturating_since_ms(Instant::from_millis(5)),
            4
        );
    }
}
