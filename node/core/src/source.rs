//! Sources: where chunks come from. The active slot is always one; the offer names
//! the others (an artifact file or stdin, a chunk store directory, later the server and
//! LAN peers). The plan decides per chunk.

use std::fmt;

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
    Stream,
    /// Answers requests by chunk id ([`Output::Fetch`](crate::Output::Fetch)): a chunk
    /// store directory, the server, a LAN peer. May time out; may not hold a chunk.
    Requests,
}

/// A source offered with a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    /// Its id.
    pub id: SourceId,
    /// How it works.
    pub kind: SourceKind,
    /// A name for people (a path, a URL, a peer id).
    pub name: String,
}

/// Where a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Read from a slot of this device.
    Slot(crate::Slot),
    /// Received from an offered source.
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
