//! The wire format of a chunk batch (`application/vnd.shoal.chunks`): the answer of
//! `POST /api/devices/v1/deployments/{id}/chunks`, untrusted bytes from the network.
//!
//! Each chunk asked for is one frame, in the order asked: its 32-byte id, a
//! big-endian `u32` length, then that many stored (compressed) bytes. The reader
//! checks every frame against the ids asked and bounds every length before it
//! allocates; the bytes are decoded and hashed by the caller. It lives in the
//! library so the fuzz target `chunk_batch` (`fuzz/`) can feed it.

use shoal_artifact::ChunkId;

/// Framing of each chunk in a batch: its 32-byte id and a big-endian `u32` length.
pub const FRAME_HEADER: usize = 36;

/// The longest stored form of one chunk accepted: the largest chunk, plus zstd's
/// worst-case growth and headers with room to spare.
pub const STORED_CHUNK_MAX: u32 = shoal_artifact::manifest::CHUNK_SIZE_MAX + 1024 * 1024;

/// Why a batch answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The body ends inside a frame header.
    #[error("the batch ends inside the header of chunk {index}")]
    TruncatedHeader {
        /// The frame's position.
        index: usize,
    },
    /// The body ends inside a chunk's bytes.
    #[error("the batch ends inside chunk {index} ({declared} bytes declared)")]
    TruncatedChunk {
        /// The frame's position.
        index: usize,
        /// The length its header declares.
        declared: u32,
    },
    /// A frame carries another chunk than the one asked for at its position.
    #[error("chunk {index} of the batch is {got}, not {want} as asked")]
    WrongId {
        /// The frame's position.
        index: usize,
        /// The id asked for.
        want: ChunkId,
        /// The id in the frame.
        got: ChunkId,
    },
    /// A frame declares more bytes than any stored chunk can have.
    #[error("chunk {index} of the batch declares {declared} bytes (at most {STORED_CHUNK_MAX})")]
    TooLong {
        /// The frame's position.
        index: usize,
        /// The length its header declares.
        declared: u32,
    },
    /// More bytes follow the last chunk asked for.
    #[error("bytes follow the last chunk of the batch")]
    Trailing,
    /// Reading the body failed (cut connection, timeout).
    #[error("reading the batch: {0}")]
    Io(String),
}

impl BatchError {
    /// Whether the transfer failed (retry later) rather than the bytes being wrong.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            BatchError::Io(_)
                | BatchError::TruncatedHeader { .. }
                | BatchError::TruncatedChunk { .. }
        )
    }
}

/// Reads a batch answer frame by frame as it arrives, in the order asked, so each
/// chunk reaches the engine without waiting for the rest of the batch.
#[derive(Debug)]
pub struct BatchReader<'a, R> {
    body: R,
    asked: &'a [ChunkId],
    index: usize,
}

impl<'a, R: std::io::Read> BatchReader<'a, R> {
    /// A reader of `body`, the answer to a request for `asked`.
    pub fn new(body: R, asked: &'a [ChunkId]) -> BatchReader<'a, R> {
        BatchReader {
            body,
            asked,
            index: 0,
        }
    }

    /// Fills `buf`; `Ok(false)` when the body ended before it was full.
    fn fill(&mut self, buf: &mut [u8]) -> Result<bool, BatchError> {
        let mut done = 0;
        while done < buf.len() {
            match self.body.read(&mut buf[done..]) {
                Ok(0) => return Ok(false),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BatchError::Io(e.to_string())),
            }
        }
        Ok(true)
    }

    /// The next chunk's id and stored bytes; `None` after the last one asked (and
    /// the end of the body) was read.
    pub fn next_frame(&mut self) -> Result<Option<(ChunkId, Vec<u8>)>, BatchError> {
        let index = self.index;
        let Some(want) = self.asked.get(index).copied() else {
            let mut probe = [0u8; 1];
            return match self.fill(&mut probe)? {
                false => Ok(None),
                true => Err(BatchError::Trailing),
            };
        };
        let mut head = [0u8; FRAME_HEADER];
        if !self.fill(&mut head)? {
            return Err(BatchError::TruncatedHeader { index });
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&head[..32]);
        let got = ChunkId(id);
        if got != want {
            return Err(BatchError::WrongId { index, want, got });
        }
        let declared = u32::from_be_bytes([head[32], head[33], head[34], head[35]]);
        if declared > STORED_CHUNK_MAX {
            return Err(BatchError::TooLong { index, declared });
        }
        let mut stored = vec![0u8; declared as usize];
        if !self.fill(&mut stored)? {
            return Err(BatchError::TruncatedChunk { index, declared });
        }
        self.index += 1;
        Ok(Some((got, stored)))
    }
}
