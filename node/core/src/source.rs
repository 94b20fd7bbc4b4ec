//! Sources: where chunks come from. The active slot is always one; the others (an
//! artifact file or stdin, a chunk store directory, USB sticks, LAN peers, the server
//! or a CDN) are registered with the offer or at any time during an install
//! ([`Engine::add_source`](crate::Engine::add_source)), and may change what they hold
//! or go away. The scheduler decides per chunk which one is asked.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use shoal_artifact::ChunkId;

use crate::bits::Bitfield;

/// Names a source within one deployment (chosen by the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceId(pub u32);

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "source {}", self.0)
    }
}

/// How a source hands out chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// Pushes chunks by itself, in artifact order, each once (an artifact file or a
    /// pipe). The engine never asks it for anything; the driver feeds
    /// [`Input::Chunk`](crate::Input::Chunk) then [`Input::SourceEnded`](crate::Input::SourceEnded).
    /// While it is open, chunks it holds (or may hold, when it does not say) are left
    /// to it; the others are asked of request sources at the same time.
    Stream,
    /// Answers requests by chunk id ([`Output::Fetch`](crate::Output::Fetch)): a chunk
    /// store directory, the server, a LAN peer. May be silent; may not hold a chunk.
    Requests,
}

/// What asking a source costs. The scheduler asks the cheapest class that can serve
/// a chunk; a pricier class only when no cheaper source holds the chunk or every
/// cheaper one is failing (busy cheaper sources are waited for). The active slot is
/// cheaper than all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceClass {
    /// On the device or plugged into it: an artifact file, a USB stick, a local
    /// chunk store.
    Local,
    /// Another device on the LAN.
    Peer,
    /// The server or a CDN, over the WAN (the link whose bytes are counted against
    /// a data budget).
    Wan,
}

impl SourceClass {
    /// Rank for "cheapest first": local sources and LAN peers cost alike.
    pub fn cost(self) -> u8 {
        match self {
            SourceClass::Local | SourceClass::Peer => 1,
            SourceClass::Wan => 2,
        }
    }
}

impl fmt::Display for SourceClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceClass::Local => "local",
            SourceClass::Peer => "peer",
            SourceClass::Wan => "wan",
        })
    }
}

/// Which chunks of the release a source holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Holds {
    /// It does not say (a chunk store, the server, a pipe): it may hold any.
    #[default]
    Unknown,
    /// Every chunk of the release.
    All,
    /// These chunk ids (an artifact's contents member); ids not in the release are
    /// ignored.
    Ids(BTreeSet<ChunkId>),
    /// A bitfield over the positions of the release payload's chunk list ("peer P
    /// now has these chunks"): bit `i` set means it holds the chunk at position `i`.
    /// A chunk that appears at several positions is held when any of its bits is set.
    Positions(Bitfield),
}

impl Holds {
    /// Whether it says what it holds.
    pub fn is_known(&self) -> bool {
        !matches!(self, Holds::Unknown)
    }
}

/// How much a request source is asked at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLimits {
    /// Requests ([`Output::Fetch`](crate::Output::Fetch)) in flight at once.
    pub requests_max: u32,
    /// Chunk bytes (uncompressed) in one request: sized for the transport.
    pub request_bytes_max: u32,
    /// Chunks in one request.
    pub request_chunks_max: u32,
}

impl SourceLimits {
    /// Limits suited to a source class: a local source answers at once and is asked
    /// a little at a time (memory); peers and the WAN get larger, pipelined requests.
    pub fn for_class(class: SourceClass) -> SourceLimits {
        match class {
            SourceClass::Local => SourceLimits {
                requests_max: 2,
                request_bytes_max: 512 * 1024,
                request_chunks_max: 64,
            },
            SourceClass::Peer => SourceLimits {
                requests_max: 4,
                request_bytes_max: 1024 * 1024,
                request_chunks_max: 256,
            },
            SourceClass::Wan => SourceLimits {
                requests_max: 4,
                request_bytes_max: 4 * 1024 * 1024,
                request_chunks_max: 1024,
            },
        }
    }
}

/// A source, as registered with an offer or [`Engine::add_source`](crate::Engine::add_source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    /// Its id.
    pub id: SourceId,
    /// How it works.
    pub kind: SourceKind,
    /// What asking it costs.
    pub class: SourceClass,
    /// A name for people (a path, a URL, a peer id).
    pub name: String,
    /// The chunks it holds, when it says so. When every source of an offer says, the
    /// engine refuses before writing anything if a needed chunk is neither in the
    /// active slot nor held by a source ([`InstallError::MissingChunks`]). A hint
    /// only: chunks are still verified, and a source is not asked for chunks it says
    /// it lacks.
    ///
    /// [`InstallError::MissingChunks`]: crate::InstallError::MissingChunks
    pub holds: Holds,
    /// How much it is asked at once (request sources).
    pub limits: SourceLimits,
}

impl SourceInfo {
    /// A source of `kind` and `class` with the class's default limits, holding what
    /// it does not say.
    pub fn new(
        id: SourceId,
        kind: SourceKind,
        class: SourceClass,
        name: impl Into<String>,
    ) -> SourceInfo {
        SourceInfo {
            id,
            kind,
            class,
            name: name.into(),
            holds: Holds::Unknown,
            limits: SourceLimits::for_class(class),
        }
    }

    /// The same, saying what it holds.
    pub fn holding(mut self, holds: Holds) -> SourceInfo {
        self.holds = holds;
        self
    }

    /// The same, with other limits.
    pub fn with_limits(mut self, limits: SourceLimits) -> SourceInfo {
        self.limits = limits;
        self
    }
}

/// How the driver classifies a failed request ([`Input::FetchFailed`](crate::Input::FetchFailed)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchFailure {
    /// A transient failure (connection reset, server busy, request timed out in the
    /// transport): the source backs off and is asked again later; its chunks go to
    /// other sources meanwhile.
    RetryLater,
    /// The source does not hold any chunk of the request (as if each was answered
    /// [`Input::Unavailable`](crate::Input::Unavailable)).
    NotThere,
    /// The source cannot serve this deployment at all (protocol error, refused,
    /// gone): it is dropped, as by [`Engine::remove_source`](crate::Engine::remove_source).
    DropSource,
}

/// Names one [`Output::Fetch`](crate::Output::Fetch) request, so a driver can match
/// [`Output::Cancel`](crate::Output::Cancel) and [`Input::FetchFailed`](crate::Input::FetchFailed) to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request {}", self.0)
    }
}

/// Timeouts and backoff of request sources (per source; anchor: iroh-blobs
/// `RetryConfig`, and TCP's retransmission timer, RFC 6298).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    /// How long a source with requests in flight may stay silent before its first
    /// answer gives a round-trip estimate.
    pub rto_initial: Duration,
    /// Least silence timeout, whatever the estimate says.
    pub rto_min: Duration,
    /// Greatest silence timeout (after doubling on each failure).
    pub rto_max: Duration,
    /// Backoff after a source's first consecutive failure; it doubles with each
    /// further one.
    pub backoff_initial: Duration,
    /// Greatest backoff.
    pub backoff_max: Duration,
    /// Consecutive failures (silence, [`FetchFailure::RetryLater`]) after which a
    /// source is dropped for the deployment.
    pub failures_max: u32,
}

impl Default for RetryConfig {
    fn default() -> RetryConfig {
        RetryConfig {
            rto_initial: Duration::from_secs(3),
            rto_min: Duration::from_millis(200),
            rto_max: Duration::from_secs(60),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            failures_max: 8,
        }
    }
}

/// Where a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Read from a slot of this device.
    Slot(crate::Slot),
    /// Received from a source.
    Source(SourceId),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Slot(slot) => write!(f, "slot {slot}"),
            Origin::Source(id) => write!(f, "{id}"),
        }
    }
}

/// A source's state, for status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStatus {
    /// Its id.
    pub id: SourceId,
    /// Its name.
    pub name: String,
    /// Its class.
    pub class: SourceClass,
    /// Requests in flight.
    pub requests_in_flight: u32,
    /// The smoothed round-trip estimate, once measured.
    pub srtt: Option<Duration>,
    /// Consecutive failures.
    pub failures: u32,
    /// Chunks received from it and used.
    pub chunks: u64,
    /// Their uncompressed bytes.
    pub bytes: u64,
    /// Their bytes on the wire (the manifest's stored sizes).
    pub wire_bytes: u64,
    /// Why it is no longer asked, if it is not.
    pub gone: Option<Gone>,
}

/// Why a source is no longer asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// A stream that ended.
    Ended,
    /// Removed by the driver, or dropped after [`FetchFailure::DropSource`].
    Removed,
    /// Failed [`RetryConfig::failures_max`] times in a row.
    Failing,
    /// Sent a chunk that does not hash to its id: banned for the deployment.
    Banned,
}
