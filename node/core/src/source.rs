//! Sources: where chunks come from. The active slot is always one; the offer names
//! the others (an artifact file or stdin, a chunk store directory, later the server and
//! LAN peers). The plan decides per chunk.

use std::collections::BTreeSet;
use std::fmt;

use shoal_artifact::ChunkId;

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
    /// The chunks it holds, when it says so up front (an artifact's contents);
    /// `None` when unknown (a chunk store, a peer). When every source of an offer
    /// says, the engine refuses before writing anything if a needed chunk is neither
    /// in the active slot nor held by a source ([`InstallError::MissingChunks`]). A
    /// hint only: chunks are still verified, and a chunk promised but never sent
    /// fails the install when the source ends.
    ///
    /// [`InstallError::MissingChunks`]: crate::InstallError::MissingChunks
    pub holds: Option<BTreeSet<ChunkId>>,
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
