//! The Linux backend of Shoal's vendored copy: instead of subscribing to the rtnetlink
//! address groups (upstream's `linux.rs`, which links rtnetlink, netlink-packet-route,
//! netlink-proto and netlink-sys: ~260 KB of the device binary), the watcher reads the
//! interface addresses with `getifaddrs(3)` (the `if-addrs` crate) on the first poll and
//! then every [`POLL_INTERVAL`] on a tokio interval timer, and reports the difference
//! from the previous reading as [`IfEvent::Down`]/[`IfEvent::Up`]. An address added or
//! removed is therefore reported within [`POLL_INTERVAL`] (netlink: at once); an address
//! added and removed again between two readings is not reported at all.
//!
//! The public API is upstream's: `tokio::IfWatcher::new`, `iter`, `poll_if_event`, and a
//! never-ending `Stream<Item = io::Result<IfEvent>>`. The timer is created on the first
//! poll, so, like upstream's tokio watcher, it must be polled inside a tokio runtime (with
//! the time driver enabled).

use crate::{IfEvent, IpNet, Ipv4Net, Ipv6Net};
use fnv::FnvHashSet;
use futures::stream::{FusedStream, Stream};
use if_addrs::IfAddr;
use std::collections::VecDeque;
use std::io::Result;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// How often the addresses are read again after the first reading: the longest an
/// interface address change goes unnoticed.
pub const POLL_INTERVAL: Duration = Duration::from_secs(3);

#[cfg(feature = "tokio")]
pub mod tokio {
    //! An interface watcher that reads the addresses on a tokio interval timer.

    /// Watches for interface changes.
    pub type IfWatcher = super::IfWatcher;
}

/// An address set/watcher
#[derive(Debug)]
pub struct IfWatcher {
    addrs: FnvHashSet<IpNet>,
    queue: VecDeque<IfEvent>,
    /// Created on the first poll (inside the runtime); its first tick is immediate.
    ticker: Option<::tokio::time::Interval>,
}

impl IfWatcher {
    /// Create a watcher.
    pub fn new() -> Result<Self> {
        Ok(Self {
            addrs: FnvHashSet::default(),
            queue: VecDeque::new(),
            ticker: None,
        })
    }

    /// Iterate over current networks.
    pub fn iter(&self) -> impl Iterator<Item = &IpNet> {
        self.addrs.iter()
    }

    fn resync(&mut self) -> Result<()> {
        let current = if_addrs::get_if_addrs()?
            .into_iter()
            .map(|interface| ifaddr_to_ipnet(interface.addr))
            .collect();
        self.queue.extend(diff(&self.addrs, &current));
        self.addrs = current;
        Ok(())
    }

    /// Poll for an address change event.
    pub fn poll_if_event(&mut self, cx: &mut Context) -> Poll<Result<IfEvent>> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Poll::Ready(Ok(event));
            }
            let ticker = self.ticker.get_or_insert_with(|| {
                let mut ticker = ::tokio::time::interval(POLL_INTERVAL);
                ticker.set_missed_tick_behavior(::tokio::time::MissedTickBehavior::Delay);
                ticker
            });
            if ticker.poll_tick(cx).is_pending() {
                return Poll::Pending;
            }
            if let Err(err) = self.resync() {
                return Poll::Ready(Err(err));
            }
        }
    }
}

/// The events that turn the address set `old` into `new`: `Down` for each network only
/// in `old`, then `Up` for each network only in `new` (each group sorted, so the order
/// does not depend on hashing). A network whose prefix length changed is a `Down` of the
/// old one and an `Up` of the new one, as rtnetlink reports it.
fn diff(old: &FnvHashSet<IpNet>, new: &FnvHashSet<IpNet>) -> Vec<IfEvent> {
    let mut down: Vec<IpNet> = old.difference(new).copied().collect();
    let mut up: Vec<IpNet> = new.difference(old).copied().collect();
    down.sort_unstable();
    up.sort_unstable();
    down.into_iter()
        .map(IfEvent::Down)
        .chain(up.into_iter().map(IfEvent::Up))
        .collect()
}

fn ifaddr_to_ipnet(addr: IfAddr) -> IpNet {
    match addr {
        IfAddr::V4(ip) => {
            IpNet::V4(Ipv4Net::new(ip.ip, ip.prefixlen).unwrap_or_else(|_| Ipv4Net::from(ip.ip)))
        }
        IfAddr::V6(ip) => {
            IpNet::V6(Ipv6Net::new(ip.ip, ip.prefixlen).unwrap_or_else(|_| Ipv6Net::from(ip.ip)))
        }
    }
}

impl Stream for IfWatcher {
    type Item = Result<IfEvent>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::into_inner(self).poll_if_event(cx).map(Some)
    }
}

impl FusedStream for IfWatcher {
    fn is_terminated(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    // Not `super::*`: that would bring this file's `tokio` module into scope, and
    // `#[tokio::test]` expands to paths that must name the tokio crate.
    use super::{diff, IfWatcher};
    use crate::{IfEvent, IpNet};
    use fnv::FnvHashSet;
    use futures::StreamExt;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn set(nets: &[&str]) -> FnvHashSet<IpNet> {
        nets.iter().map(|s| net(s)).collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_first_poll_reports_the_loopback_address_up() {
        let mut watcher = IfWatcher::new().unwrap();
        assert_eq!(
            watcher.iter().count(),
            0,
            "nothing is known before the first poll"
        );
        // The first reading is immediate: every event it queues is ready without waiting
        // for the timer, and 127.0.0.1/8 is among them.
        let mut first_reading = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_millis(500), watcher.next()).await {
                Ok(Some(event)) => first_reading.push(event.unwrap()),
                Ok(None) => unreachable!("the stream never ends"),
                Err(_) => break,
            }
        }
        assert!(
            first_reading.contains(&IfEvent::Up(net("127.0.0.1/8"))),
            "loopback not reported Up: {first_reading:?}"
        );
        assert!(first_reading.iter().all(|e| matches!(e, IfEvent::Up(_))));
        assert!(watcher
            .iter()
            .any(|n| n.addr() == IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }

    #[test]
    fn a_removed_address_is_reported_down_and_an_added_one_up() {
        let old = set(&["127.0.0.1/8", "10.0.0.5/24", "fe80::1/64"]);
        let new = set(&["127.0.0.1/8", "fe80::1/64", "192.168.1.7/24"]);
        assert_eq!(
            diff(&old, &new),
            vec![
                IfEvent::Down(net("10.0.0.5/24")),
                IfEvent::Up(net("192.168.1.7/24"))
            ]
        );
        assert_eq!(diff(&new, &new), vec![]);
        assert_eq!(
            diff(&set(&["10.0.0.5/24"]), &set(&[])),
            vec![IfEvent::Down(net("10.0.0.5/24"))]
        );
    }

    #[test]
    fn a_changed_prefix_length_is_down_then_up() {
        assert_eq!(
            diff(&set(&["10.0.0.5/24"]), &set(&["10.0.0.5/16"])),
            vec![
                IfEvent::Down(net("10.0.0.5/24")),
                IfEvent::Up(net("10.0.0.5/16"))
            ]
        );
    }

    #[test]
    fn the_watcher_is_send_and_unpin() {
        fn is_send_unpin<T: Send + Unpin>(_: &T) {}
        is_send_unpin(&IfWatcher::new().unwrap());
    }
}
