//! The WAN's data budget and rate cap for one deployment: what the scheduler may
//! still ask of WAN sources (server, CDN), in *wire* bytes (compressed sizes from the
//! manifest), and when.
//!
//! - **Budget** ([`Config::wan_budget_bytes`](crate::Config::wan_budget_bytes)): a plan
//!   whose WAN bytes exceed it is refused before anything is read, written or fetched
//!   ([`WanBudget::refuses_plan`]); afterwards no request that would pass it is made
//!   ([`WanBudget::allows`]), and a chunk only the WAN could serve ends the install
//!   with the same error ([`WanBudget::blocked_error`]). What every run of the
//!   deployment asked counts ([`WanBudget::asked`], persisted with each journal batch).
//! - **Rate cap** ([`Config::wan_rate_bytes_per_s`](crate::Config::wan_rate_bytes_per_s)):
//!   a token bucket ([`Pacer`]) with its own timer ([`WanBudget::ready_at`]).

use crate::error::InstallError;
use crate::pacing::Pacer;
use crate::time::Instant;

/// The data budget and rate cap of one deployment's WAN requests.
#[derive(Debug)]
pub(crate) struct WanBudget {
    /// The most wire bytes the deployment may ask of WAN sources.
    allowed: Option<u64>,
    /// Wire bytes asked of WAN sources during this deployment, by every run.
    asked: u64,
    /// A chunk was not asked of the WAN because of the budget.
    blocked: bool,
    /// The rate cap, once the plan is made.
    pacer: Option<Pacer>,
}

impl WanBudget {
    /// A budget of `allowed` wire bytes of which earlier runs asked `asked`.
    pub(crate) fn new(allowed: Option<u64>, asked: u64) -> WanBudget {
        WanBudget {
            allowed,
            asked,
            blocked: false,
            pacer: None,
        }
    }

    /// Whether a data budget is set.
    pub(crate) fn limited(&self) -> bool {
        self.allowed.is_some()
    }

    /// Wire bytes asked of WAN sources so far, by every run of the deployment.
    pub(crate) fn asked(&self) -> u64 {
        self.asked
    }

    /// The refusal of a plan that needs `wan_needed` more wire bytes from the WAN,
    /// if it would pass the budget with what earlier runs asked.
    pub(crate) fn refuses_plan(&self, wan_needed: u64) -> Option<InstallError> {
        let needed = wan_needed.saturating_add(self.asked);
        let allowed = self.allowed?;
        (needed > allowed).then_some(InstallError::OverBudget { needed, allowed })
    }

    /// Starts the rate cap of `rate` bytes a second, if any: its bucket holds a tenth
    /// of a second's bytes, or the largest chunk's (`largest_wire`) if larger.
    pub(crate) fn start_pacing(&mut self, rate: Option<u64>, largest_wire: u64, now: Instant) {
        self.pacer = rate.map(|rate| Pacer::new(rate, (rate / 10).max(largest_wire), now));
    }

    /// Whether asking the WAN for `wire` more bytes stays within the budget.
    pub(crate) fn allows(&self, wire: u64) -> bool {
        self.allowed
            .is_none_or(|b| self.asked.saturating_add(wire) <= b)
    }

    /// Whether the rate cap makes a WAN request of `wire` bytes wait at `now`.
    pub(crate) fn paced(&self, wire: u64, now: Instant) -> bool {
        self.pacer.as_ref().is_some_and(|p| !p.has(wire, now))
    }

    /// When a WAN request of `wire` bytes may go, if the rate cap holds it back now.
    pub(crate) fn ready_at(&self, wire: u64, now: Instant) -> Option<Instant> {
        let p = self.pacer.as_ref()?;
        (!p.has(wire, now)).then(|| p.ready_at(wire))
    }

    /// `wire` bytes were asked of a WAN source at `now` (the scheduler checked
    /// [`WanBudget::allows`] and [`WanBudget::paced`] first).
    pub(crate) fn spend(&mut self, wire: u64, now: Instant) {
        self.asked += wire;
        if let Some(p) = self.pacer.as_mut() {
            let taken = p.try_take(wire, now);
            assert!(taken, "a paced chunk was assigned");
        }
    }

    /// A chunk only the WAN could serve was not asked because of the budget.
    pub(crate) fn block(&mut self) {
        self.blocked = true;
    }

    /// The error that ends an install the budget blocked, with `left` wire bytes
    /// still to fetch (not yet asked).
    pub(crate) fn blocked_error(&self, left: u64) -> Option<InstallError> {
        let allowed = self.allowed.filter(|_| self.blocked)?;
        Some(InstallError::OverBudget {
            needed: self.asked + left,
            allowed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_is_refused_with_what_earlier_runs_asked() {
        let b = WanBudget::new(Some(1000), 300);
        assert_eq!(b.refuses_plan(700), None);
        assert_eq!(
            b.refuses_plan(701),
            Some(InstallError::OverBudget {
                needed: 1001,
                allowed: 1000
            })
        );
        assert_eq!(WanBudget::new(None, 300).refuses_plan(u64::MAX), None);
    }

    #[test]
    fn requests_stay_within_the_budget_and_a_block_names_what_was_left() {
        let mut b = WanBudget::new(Some(1000), 0);
        let now = Instant::from_millis(0);
        assert!(b.allows(1000));
        b.spend(600, now);
        assert!(b.allows(400) && !b.allows(401));
        assert_eq!(b.blocked_error(500), None, "nothing was blocked");
        b.block();
        assert_eq!(
            b.blocked_error(500),
            Some(InstallError::OverBudget {
                needed: 1100,
                allowed: 1000
            })
        );
        assert_eq!(b.asked(), 600);
    }

    #[test]
    fn the_rate_cap_holds_requests_back_until_its_tokens_are_there() {
        let mut b = WanBudget::new(None, 0);
        let now = Instant::from_millis(0);
        assert!(!b.paced(u64::MAX, now), "no cap, no wait");
        b.start_pacing(Some(1000), 100, now);
        assert!(!b.paced(100, now), "a full bucket");
        b.spend(100, now);
        assert!(b.paced(100, now));
        let at = b.ready_at(100, now).expect("held back");
        assert!(at > now);
        assert!(!b.paced(100, at));
        assert_eq!(b.ready_at(100, at), None);
    }
}
