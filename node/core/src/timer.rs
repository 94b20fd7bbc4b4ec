//! One table of named timers (anchor: quinn-proto `connection/timer.rs`): every
//! deadline the engine waits for has a name here, and [`Engine::poll_timeout`] is the
//! earliest of them.
//!
//! [`Engine::poll_timeout`]: crate::Engine::poll_timeout

use crate::time::Instant;

/// The engine's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// A request source with requests in flight has been silent for its
    /// retransmission timeout: it loses them to the other sources.
    Silence = 0,
    /// A source's backoff after a failure ends: it may be asked again.
    Backoff = 1,
    /// A LAN swarm member that owns chunks this device waits for has made no
    /// progress for the LAN timeout: the next owner takes them.
    LanOwner = 2,
    /// The WAN rate cap's token bucket holds enough for the next chunk again.
    Pacing = 3,
    /// The open journal batch's first chunk is `journal_batch_age` old: it is
    /// committed (and so announced to LAN peers) even if no chunk follows.
    JournalAge = 4,
    /// A resumed cut of the active slot
    /// ([`Output::CutRest`](crate::Output::CutRest)) told no progress for
    /// [`Config::cut_silence`](crate::Config::cut_silence): it is given up
    /// ([`Output::StopIndex`](crate::Output::StopIndex)), and the network fetches
    /// paused for it go ahead.
    CutSilence = 5,
}

impl Timer {
    const ALL: [Timer; 6] = [
        Timer::Silence,
        Timer::Backoff,
        Timer::LanOwner,
        Timer::Pacing,
        Timer::JournalAge,
        Timer::CutSilence,
    ];
}

/// The deadline of each [`Timer`], if set.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TimerTable {
    data: [Option<Instant>; Timer::ALL.len()],
}

impl TimerTable {
    /// Sets (or, with `None`, stops) a timer.
    pub(crate) fn set(&mut self, timer: Timer, at: Option<Instant>) {
        self.data[timer as usize] = at;
    }

    /// The deadline of `timer`, if set.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn get(&self, timer: Timer) -> Option<Instant> {
        self.data[timer as usize]
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.data.iter().flatten().min().copied()
    }

    /// Whether `timer` is set and due at `now`.
    pub(crate) fn is_expired(&self, timer: Timer, now: Instant) -> bool {
        self.data[timer as usize].is_some_and(|t| t <= now)
    }

    /// Stops every timer.
    pub(crate) fn clear(&mut self) {
        self.data = Default::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_the_earliest_and_expiry_is_inclusive() {
        let mut t = TimerTable::default();
        assert_eq!(t.next(), None);
        t.set(Timer::Backoff, Some(Instant::from_millis(50)));
        t.set(Timer::Silence, Some(Instant::from_millis(20)));
        assert_eq!(t.next(), Some(Instant::from_millis(20)));
        assert!(t.is_expired(Timer::Silence, Instant::from_millis(20)));
        assert!(!t.is_expired(Timer::Backoff, Instant::from_millis(49)));
        t.set(Timer::Silence, None);
        assert_eq!(t.next(), Some(Instant::from_millis(50)));
        t.clear();
        assert_eq!(t.next(), None);
    }
}
