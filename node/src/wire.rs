//! The wire format of a chunk batch (`application/vnd.shoal.chunks`): the answer of
//! `POST /api/devices/v1/deployments/{id}/chunks`, untrusted bytes from the network.
//!
//! Each chunk asked for is one frame, in the order asked: its 32-byte id, a
//! big-endian `u32` length, then that many stored (compressed) bytes. The reader
//! checks every frame against the ids asked and bounds every length before it
//! allocates; the bytes are decoded and hashed by the caller. It lives in the
//! library so the fuzz target `chunk_batch` (`fuzz/`) can feed it.
//!
//! **Version 2** (`application/vnd.shoal.chunks.v2`), the answer to a request that
//! names the base release the device runs (`"base"`): each frame is the id, one
//! kind byte, the `u32` length, then the body. Kind 0: the plain stored form, as in
//! version 1. Kind 1: a per-base delta encoding of the chunk
//! ([`shoal_artifact::delta_record`]: the base ranges it was compressed against,
//! their hash, the zstd frame), parsed and checked here; the device reads the
//! ranges from its running slot, checks their hash, decodes, and hashes the chunk.
//! A request without `"base"` gets version 1, so daemons from before keep working.

use shoal_artifact::ChunkId;
use shoal_artifact::delta_record::{DeltaRecord, DeltaRecordError};

/// Framing of each chunk in a batch: its 32-byte id and a big-endian `u32` length.
pub const FRAME_HEADER: usize = 36;

/// Framing of each chunk in a version-2 batch: id, kind byte, `u32` length.
pub const FRAME_HEADER_V2: usize = 37;

/// The content type of a version-1 batch.
pub const CONTENT_TYPE_V1: &str = "application/vnd.shoal.chunks";

/// The content type of a version-2 batch.
pub const CONTENT_TYPE_V2: &str = "application/vnd.shoal.chunks.v2";

/// Kind byte of a plain frame (version 2).
pub const KIND_PLAIN: u8 = 0;

/// Kind byte of a delta-encoded frame (version 2).
pub const KIND_DELTA: u8 = 1;

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
    /// A version-2 frame of a kind this reader does not know.
    #[error("chunk {index} of the batch has frame kind {kind} (0 plain or 1 delta)")]
    UnknownKind {
        /// The frame's position.
        index: usize,
        /// The kind byte.
        kind: u8,
    },
    /// A delta frame whose record is malformed.
    #[error("chunk {index} of the batch: {error}")]
    BadDelta {
        /// The frame's position.
        index: usize,
        /// What is wrong with it.
        error: DeltaRecordError,
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

/// A chunk's bytes as a batch carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// The plain stored form (zstd, possibly with the release's dictionary, or raw).
    Plain(Vec<u8>),
    /// Delta-encoded against bytes of the base release the device named.
    Delta(DeltaRecord),
}

/// Reads a batch answer frame by frame as it arrives, in the order asked, so each
/// chunk reaches the engine without waiting for the rest of the batch.
#[derive(Debug)]
pub struct BatchReader<'a, R> {
    body: R,
    asked: &'a [ChunkId],
    index: usize,
    /// Version 2 framing (a kind byte in each header).
    v2: bool,
}

impl<'a, R: std::io::Read> BatchReader<'a, R> {
    /// A reader of `body`, the answer to a request for `asked`.
    pub fn new(body: R, asked: &'a [ChunkId]) -> BatchReader<'a, R> {
        BatchReader {
            body,
            asked,
            index: 0,
            v2: false,
        }
    }

    /// A reader of a version-2 body (`application/vnd.shoal.chunks.v2`).
    pub fn new_v2(body: R, asked: &'a [ChunkId]) -> BatchReader<'a, R> {
        BatchReader {
            body,
            asked,
            index: 0,
            v2: true,
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
    /// the end of the body) was read. A delta frame (version 2) is refused as
    /// [`BatchError::UnknownKind`]: read those with [`BatchReader::next_item`].
    pub fn next_frame(&mut self) -> Result<Option<(ChunkId, Vec<u8>)>, BatchError> {
        let index = self.index;
        match self.next_item()? {
            None => Ok(None),
            Some((id, Stored::Plain(b))) => Ok(Some((id, b))),
            Some((_, Stored::Delta(_))) => Err(BatchError::UnknownKind {
                index,
                kind: KIND_DELTA,
            }),
        }
    }

    /// The next chunk's id and bytes, plain or delta-encoded (a delta record is
    /// parsed and checked, not decoded); `None` after the last one asked (and the
    /// end of the body) was read.
    pub fn next_item(&mut self) -> Result<Option<(ChunkId, Stored)>, BatchError> {
        let index = self.index;
        let Some(want) = self.asked.get(index).copied() else {
            let mut probe = [0u8; 1];
            return match self.fill(&mut probe)? {
                false => Ok(None),
                true => Err(BatchError::Trailing),
            };
        };
        let mut head = [0u8; FRAME_HEADER_V2];
        let head = &mut head[..if self.v2 {
            FRAME_HEADER_V2
        } else {
            FRAME_HEADER
        }];
        if !self.fill(head)? {
            return Err(BatchError::TruncatedHeader { index });
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&head[..32]);
        let got = ChunkId(id);
        if got != want {
            return Err(BatchError::WrongId { index, want, got });
        }
        let (kind, len) = if self.v2 {
            (head[32], &head[33..37])
        } else {
            (KIND_PLAIN, &head[32..36])
        };
        if kind != KIND_PLAIN && kind != KIND_DELTA {
            return Err(BatchError::UnknownKind { index, kind });
        }
        let declared = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        if declared > STORED_CHUNK_MAX {
            return Err(BatchError::TooLong { index, declared });
        }
        let mut stored = vec![0u8; declared as usize];
        if !self.fill(&mut stored)? {
            return Err(BatchError::TruncatedChunk { index, declared });
        }
        self.index += 1;
        if kind == KIND_DELTA {
            let record = DeltaRecord::parse(&stored)
                .map_err(|error| BatchError::BadDelta { index, error })?;
            return Ok(Some((got, Stored::Delta(record))));
        }
        Ok(Some((got, Stored::Plain(stored))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn frame(id: ChunkId, kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = id.as_bytes().to_vec();
        out.push(kind);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn record() -> DeltaRecord {
        DeltaRecord {
            ranges: vec![(4096, 100)],
            hash: [9; 32],
            frame: shoal_artifact::chunk::encode_against(b"abcabcabc", 3, b"abc"),
        }
    }

    fn read_all(body: &[u8], asked: &[ChunkId]) -> Result<Vec<Stored>, BatchError> {
        let mut r = BatchReader::new_v2(body, asked);
        let mut out = Vec::new();
        while let Some((_, s)) = r.next_item()? {
            out.push(s);
        }
        Ok(out)
    }

    #[test]
    fn v2_parses_plain_and_delta_frames_in_order() {
        let mut body = frame(id(1), KIND_PLAIN, b"abc");
        body.extend(frame(id(2), KIND_DELTA, &record().to_bytes()));
        assert_eq!(
            read_all(&body, &[id(1), id(2)]),
            Ok(vec![
                Stored::Plain(b"abc".to_vec()),
                Stored::Delta(record())
            ])
        );
        // A version-1 reader of the same bytes would misframe them: the kind byte
        // is read as the length's first byte.
        let asked = [id(1), id(2)];
        let mut r = BatchReader::new(&body[..], &asked);
        let failed = loop {
            match r.next_frame() {
                Ok(Some(_)) => {}
                Ok(None) => break false,
                Err(_) => break true,
            }
        };
        assert!(failed, "a version-1 reader accepted a version-2 body");
    }

    #[test]
    fn v2_malformed_frames_are_refused_precisely() {
        let good = frame(id(1), KIND_DELTA, &record().to_bytes());
        assert_eq!(
            read_all(&good[..36], &[id(1)]),
            Err(BatchError::TruncatedHeader { index: 0 })
        );
        let mut bad = good.clone();
        bad[32] = 2;
        assert_eq!(
            read_all(&bad, &[id(1)]),
            Err(BatchError::UnknownKind { index: 0, kind: 2 })
        );
        // A delta frame whose record is not one: its magic, its frame.
        let mut bad = good.clone();
        bad[37] = b'x';
        assert_eq!(
            read_all(&bad, &[id(1)]),
            Err(BatchError::BadDelta {
                index: 0,
                error: DeltaRecordError::Magic
            })
        );
        let mut r = record().to_bytes();
        let frame_at = r.len() - record().frame.len();
        r[frame_at] = 0;
        assert_eq!(
            read_all(&frame(id(1), KIND_DELTA, &r), &[id(1)]),
            Err(BatchError::BadDelta {
                index: 0,
                error: DeltaRecordError::NotAFrame
            })
        );
        // A plain frame of kind 0 may hold anything.
        assert_eq!(
            read_all(&frame(id(1), KIND_PLAIN, b"shd1"), &[id(1)]),
            Ok(vec![Stored::Plain(b"shd1".to_vec())])
        );
        let mut huge = id(1).as_bytes().to_vec();
        huge.push(KIND_DELTA);
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            read_all(&huge, &[id(1)]),
            Err(BatchError::TooLong {
                index: 0,
                declared: u32::MAX
            })
        );
        assert_eq!(
            read_all(&good[..good.len() - 1], &[id(1)]),
            Err(BatchError::TruncatedChunk {
                index: 0,
                declared: (good.len() - FRAME_HEADER_V2) as u32
            })
        );
        let mut long = good.clone();
        long.push(0);
        assert_eq!(read_all(&long, &[id(1)]), Err(BatchError::Trailing));
        // A malformed delta is the server's fault, not the link's.
        assert!(
            !BatchError::BadDelta {
                index: 0,
                error: DeltaRecordError::Magic
            }
            .is_transport()
        );
    }
}
