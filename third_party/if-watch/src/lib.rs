//! IP address watching.
#![deny(missing_docs)]
#![deny(warnings)]

pub use ipnet::{IpNet, Ipv4Net, Ipv6Net};

#[cfg(target_os = "macos")]
mod apple;
#[cfg(target_os = "ios")]
mod apple;
#[cfg(not(any(
    target_os = "ios",
    target_os = "linux",
    target_os = "macos",
    target_os = "windows",
)))]
mod fallback;
// Shoal's vendored copy: Linux polls the addresses (src/poll.rs) instead of rtnetlink.
#[cfg(all(target_os = "linux", any(feature = "tokio", test)))]
mod poll;
#[cfg(target_os = "windows")]
mod win;

#[cfg(any(target_os = "macos", target_os = "ios"))]
#[cfg(feature = "tokio")]
pub use apple::tokio;

#[cfg(any(target_os = "macos", target_os = "ios"))]
#[cfg(feature = "smol")]
pub use apple::smol;

#[cfg(feature = "smol")]
#[cfg(not(any(
    target_os = "ios",
    target_os = "linux",
    target_os = "macos",
    target_os = "windows",
)))]
pub use fallback::smol;

#[cfg(feature = "tokio")]
#[cfg(not(any(
    target_os = "ios",
    target_os = "linux",
    target_os = "macos",
    target_os = "windows",
)))]
pub use fallback::tokio;

#[cfg(target_os = "windows")]
#[cfg(feature = "tokio")]
pub use win::tokio;

#[cfg(target_os = "windows")]
#[cfg(feature = "smol")]
pub use win::smol;

#[cfg(target_os = "linux")]
#[cfg(feature = "tokio")]
pub use poll::tokio;

#[cfg(target_os = "linux")]
#[cfg(feature = "smol")]
compile_error!(
    "this vendored if-watch (third_party/if-watch) polls on a tokio timer on Linux: \
     enable its `tokio` feature, not `smol`"
);

/// An address change event.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum IfEvent {
    /// A new local address has been added.
    Up(IpNet),
    /// A local address has been deleted.
    Down(IpNet),
}
