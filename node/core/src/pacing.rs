//! A token bucket that caps the WAN rate (anchor: quinn-proto
//! `connection/pacing.rs`): wire bytes are taken from it as chunks are asked of a
//! WAN source; when it runs dry, WAN requests wait for the
//! [`Timer::Pacing`](crate::timer::Timer::Pacing) timer.

use crate::time::Instant;

/// See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct Pacer {
    rate_per_s: u64,
    capacity: u64,
    tokens: u64,
    last: Instant,
}

impl Pacer {
    /// A full bucket refilling at `rate_per_s` bytes per second, holding at most
    /// `capacity` bytes (at least one largest chunk, so every chunk can pass).
    pub(crate) fn new(rate_per_s: u64, capacity: u64, now: Instant) -> Pacer {
        let rate_per_s = rate_per_s.max(1);
        Pacer {
            rate_per_s,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed_ms = now.as_millis().saturating_sub(self.last.as_millis());
        let add = u128::from(elapsed_ms) * u128::from(self.rate_per_s) / 1000;
        if add == 0 {
            return; // Keep the fraction for later.
        }
        self.tokens = self.capacity.min(
            self.tokens
                .saturating_add(u64::try_from(add).unwrap_or(u64::MAX)),
        );
        self.last = now;
    }

    /// Takes `bytes` if the bucket holds them now.
    pub(crate) fn try_take(&mut self, bytes: u64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= bytes {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }

    /// Whether `bytes` could be taken now (without taking them).
    pub(crate) fn has(&self, bytes: u64, now: Instant) -> bool {
        let elapsed_ms = now.as_millis().saturating_sub(self.last.as_millis());
        let add = u128::from(elapsed_ms) * u128::from(self.rate_per_s) / 1000;
        let tokens = u128::from(self.tokens) + add;
        tokens.min(u128::from(self.capacity)) >= u128::from(bytes)
    }

    /// When the bucket will hold `bytes` (at most its capacity).
    pub(crate) fn ready_at(&self, bytes: u64) -> Instant {
        let deficit = bytes.min(self.capacity).saturating_sub(self.tokens);
        let ms = (u128::from(deficit) * 1000).div_ceil(u128::from(self.rate_per_s));
        Instant::from_millis(
            self.last
                .as_millis()
                .saturating_add(u64::try_from(ms).unwrap_or(u64::MAX)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_at_its_rate_up_to_its_capacity() {
        let t = Instant::from_millis;
        let mut p = Pacer::new(1000, 500, t(0));
        assert!(p.try_take(500, t(0)));
        assert!(!p.try_take(1, t(0)));
        assert_eq!(p.ready_at(100), t(100));
        assert!(!p.try_take(100, t(99)));
        assert!(p.try_take(100, t(100)));
        // Capped at the capacity however long it rested.
        assert!(!p.try_take(501, t(1_000_000)));
        assert!(p.try_take(500, t(1_000_000)));
    }
}
