//! Time as the engine sees it: given, never read.
//!
//! Two kinds, never mixed: [`Instant`] is the driver's monotonic clock (timers,
//! timeouts); wall-clock Unix seconds appear only where expiry is checked
//! ([`Offer::wall_unix_s`](crate::Offer::wall_unix_s)), and may be unknown (boards boot
//! in 1970).

use std::time::Duration;

/// A point on the driver's monotonic clock, in milliseconds since an origin the driver
/// picked (process start for the device, zero for the simulator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
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

    /// `self + d`, saturating at the end of time.
    pub fn saturating_add(self, d: Duration) -> Instant {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_add(ms))
    }
}

/// A small deterministic generator (SplitMix64): all the engine's randomness comes from
/// the seed in its [`Config`](crate::Config), so one seed replays a run exactly.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "below(0)");
        let n = n as u64;
        // Multiply-shift: unbiased enough for picking among a handful of sources.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_replays_from_seed_and_stays_in_range() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<usize> = (0..100).map(|_| a.below(5)).collect();
        let ys: Vec<usize> = (0..100).map(|_| b.below(5)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| x < 5));
        assert!((0..5).all(|v| xs.contains(&v)), "all values drawn: {xs:?}");
    }

    #[test]
    fn instant_saturates() {
        let t = Instant::from_millis(u64::MAX - 1).saturating_add(Duration::from_secs(1));
        assert_eq!(t.as_millis(), u64::MAX);
        assert_eq!(
            Instant::from_millis(5)
                .saturating_add(Duration::from_millis(7))
                .as_millis(),
            12
        );
    }
}
