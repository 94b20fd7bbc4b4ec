//! What LAN peers say to each other: three versioned request-response protocols,
//! each message canonical CBOR in one length-capped stream.
//!
//! - [`STATE`] (`/shoal/state/2`): "here is what I run and what I install, with a
//!   have-bitfield over its chunk positions and a fetching-bitfield of the positions
//!   I have asked the server for"; answered with the same about the other side. Sent
//!   when a connection opens and whenever what a device holds or fetches changes.
//!   [`STATE_V1`] (`/shoal/state/1`, without the fetching-bitfield) is still spoken
//!   with peers that know no better: its messages decode as a state that fetches
//!   nothing, and a fetching-bitfield is left out of what is written on it.
//! - [`MANIFEST`] (`/shoal/manifest/1`): the signed manifest envelope of a release,
//!   by its id (BLAKE3 of the manifest CBOR, as the envelope's verified payload
//!   hashes); the asker verifies it against its trust root like any offer.
//! - [`CHUNK`] (`/shoal/chunk/1`): a batch of chunk ids of one release; answered with
//!   each chunk's bytes or "not here". The asker hashes every chunk.
//! - [`DICTIONARY`] (`/shoal/dictionary/1`, session 7): a zstd dictionary the chunks
//!   of a release were compressed with, by its zstd id; answered with its bytes or
//!   "not here". The asker checks the id is derived from the bytes, and drops the
//!   dictionary (and blocks the peer) when a chunk decoded with it does not hash to
//!   its id. Peers of session 6 do not speak it: asking them fails at once.
//!
//! Every message is read with a size cap before it is decoded, and checked after
//! ([`WireError`] names what was wrong): a peer is untrusted.

use std::io;

use futures_util::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p_swarm::StreamProtocol;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use shoal_artifact::ChunkId;
use shoal_engine::Bitfield;

/// The state protocol.
pub const STATE: StreamProtocol = StreamProtocol::new("/shoal/state/2");
/// The state protocol of session 5's daemons: no fetching-bitfield.
pub const STATE_V1: StreamProtocol = StreamProtocol::new("/shoal/state/1");
/// The manifest protocol.
pub const MANIFEST: StreamProtocol = StreamProtocol::new("/shoal/manifest/1");
/// The chunk protocol.
pub const CHUNK: StreamProtocol = StreamProtocol::new("/shoal/chunk/1");
/// The dictionary protocol.
pub const DICTIONARY: StreamProtocol = StreamProtocol::new("/shoal/dictionary/1");

/// Most chunk positions a release may have on the wire (a 4 GiB image of 1 KiB
/// chunks): bounds a have-bitfield to 512 KiB.
pub const POSITIONS_MAX: u32 = 4 * 1024 * 1024;
/// Most chunk ids in one chunk request.
pub const CHUNK_IDS_MAX: usize = 1024;
/// Largest state message (two full bitfields plus a credential).
pub const STATE_BYTES_MAX: usize = 2 * (POSITIONS_MAX as usize / 8) + 16 * 1024;
/// Largest manifest request (an id).
pub const MANIFEST_REQUEST_BYTES_MAX: usize = 128;
/// Largest manifest answer (an envelope).
pub const ENVELOPE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Largest dictionary request (an id and a zstd id).
pub const DICTIONARY_REQUEST_BYTES_MAX: usize = 128;
/// Largest dictionary answer (the largest dictionary and framing).
pub const DICTIONARY_RESPONSE_BYTES_MAX: usize = shoal_artifact::chunk::DICTIONARY_SIZE_MAX + 1024;
/// Largest chunk request.
pub const CHUNK_REQUEST_BYTES_MAX: usize = CHUNK_IDS_MAX * 40 + 128;
/// Chunk bytes a server puts in one answer; chunks past this are answered "not
/// now" ([`ChunkData::Later`]) and asked again.
pub const CHUNK_ANSWER_DATA_MAX: usize = 4 * 1024 * 1024;
/// Largest chunk answer (the data cap, one chunk past it at most, and framing).
pub const CHUNK_RESPONSE_BYTES_MAX: usize = 2 * CHUNK_ANSWER_DATA_MAX + 64 * 1024;

/// A release on the LAN: BLAKE3 of its manifest CBOR (`Release::manifest_hash`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ManifestId(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl std::fmt::Debug for ManifestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", hex::encode(&self.0[..8]))
    }
}

impl std::fmt::Display for ManifestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", hex::encode(&self.0[..8]))
    }
}

/// The release a device is installing and which of its chunk positions it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installing {
    /// The release.
    pub manifest: ManifestId,
    /// How many chunk positions its payload has.
    pub positions: u32,
    /// Bit `i` (byte `i / 8`, bit `i % 8`) set: position `i` is written and verified.
    #[serde(with = "serde_bytes")]
    pub have: Vec<u8>,
    /// Bit `i` set: the chunk at position `i` is asked of the server and not held
    /// yet (the peers leave it to this device). Empty: nothing is (and always so
    /// on [`STATE_V1`]); otherwise as long as `have`.
    #[serde(with = "serde_bytes", default)]
    pub fetching: Vec<u8>,
}

impl Installing {
    /// The message for `have`, fetching nothing.
    pub fn new(manifest: ManifestId, have: &Bitfield) -> Installing {
        Installing {
            manifest,
            positions: have.len(),
            have: to_bytes(have),
            fetching: Vec::new(),
        }
    }

    /// The same, saying the positions `fetching` (over as many positions as
    /// `have`) are asked of the server.
    pub fn fetching(mut self, fetching: &Bitfield) -> Installing {
        assert_eq!(fetching.len(), self.positions, "one position count");
        self.fetching = to_bytes(fetching);
        self
    }

    /// The have-bitfield (checked by [`State::check`]).
    pub fn bitfield(&self) -> Bitfield {
        from_bytes(self.positions, &self.have)
    }

    /// The fetching-bitfield (checked by [`State::check`]).
    pub fn fetching_bitfield(&self) -> Bitfield {
        from_bytes(self.positions, &self.fetching)
    }
}

fn to_bytes(bits: &Bitfield) -> Vec<u8> {
    let mut bytes = vec![0u8; (bits.len() as usize).div_ceil(8)];
    for i in bits.iter() {
        bytes[(i / 8) as usize] |= 1 << (i % 8);
    }
    bytes
}

fn from_bytes(positions: u32, bytes: &[u8]) -> Bitfield {
    let members = bytes.iter().enumerate().flat_map(|(byte, &b)| {
        (0..8u32).filter_map(move |bit| (b & (1 << bit) != 0).then_some(byte as u32 * 8 + bit))
    });
    Bitfield::from_members(positions, members)
}

/// What a device says about itself ([`STATE`], both ways).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct State {
    /// The release it runs (verified, whole: every chunk can be served).
    pub running: Option<ManifestId>,
    /// The release it installs, and how far.
    pub installing: Option<Installing>,
    /// Its fleet membership credential (`shoal_signing::Credential`, signed), if it
    /// has one.
    pub credential: Option<serde_bytes::ByteBuf>,
}

/// Asks for a release's signed manifest ([`MANIFEST`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRequest {
    /// Which release.
    pub manifest: ManifestId,
}

/// The answer to a [`ManifestRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManifestResponse {
    /// The signed envelope.
    Envelope(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The peer does not have it.
    NotHere,
    /// The peer does not serve the asker (not a member of its fleet).
    Refused,
}

/// Asks for a zstd dictionary the chunks of a release were compressed with
/// ([`DICTIONARY`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DictionaryRequest {
    /// The release.
    pub manifest: ManifestId,
    /// The dictionary's zstd id, as the chunks' frames name it.
    pub zstd_id: u32,
}

/// The answer to a [`DictionaryRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DictionaryResponse {
    /// The dictionary's bytes (the asker checks them).
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The peer does not have it (yet).
    NotHere,
    /// The peer does not serve the asker (not a member of its fleet).
    Refused,
}

/// Asks for chunks of one release ([`CHUNK`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    /// The release the chunks belong to.
    pub manifest: ManifestId,
    /// Their ids, at most [`CHUNK_IDS_MAX`].
    pub ids: Vec<ChunkId>,
}

/// One chunk of a [`ChunkResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkData {
    /// Its bytes, uncompressed (the asker hashes them).
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The peer does not hold it.
    NotHere,
    /// Past the answer's size cap: ask again.
    Later,
}

/// The answer to a [`ChunkRequest`]: one entry per id, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkResponse {
    /// The chunks.
    Chunks(Vec<ChunkData>),
    /// The peer does not serve the asker.
    Refused,
}

/// A malformed or oversized message from a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Longer than the protocol allows; nothing past the cap was read.
    #[error("message longer than {max} bytes")]
    TooLong {
        /// The cap.
        max: usize,
    },
    /// Not the CBOR of the expected message.
    #[error("malformed message: {0}")]
    Cbor(String),
    /// A have-bitfield for more positions than any release has.
    #[error("have-bitfield over {positions} positions (at most {max})", max = POSITIONS_MAX)]
    TooManyPositions {
        /// Positions it claimed.
        positions: u32,
    },
    /// A have-bitfield whose byte length does not match its positions.
    #[error("have-bitfield of {bytes} bytes for {positions} positions")]
    BitfieldLength {
        /// Its bytes.
        bytes: usize,
        /// Its positions.
        positions: u32,
    },
    /// A have-bitfield with bits set past its positions.
    #[error("have-bitfield sets bits past position {positions}")]
    BitsPastEnd {
        /// Its positions.
        positions: u32,
    },
    /// A fetching-bitfield neither empty nor as long as the have-bitfield.
    #[error("fetching-bitfield of {bytes} bytes for {positions} positions")]
    FetchingLength {
        /// Its bytes.
        bytes: usize,
        /// The positions.
        positions: u32,
    },
    /// A fetching-bitfield with bits set past its positions.
    #[error("fetching-bitfield sets bits past position {positions}")]
    FetchingPastEnd {
        /// The positions.
        positions: u32,
    },
    /// A credential larger than any signed credential.
    #[error("credential of {bytes} bytes (at most {max})", max = shoal_signing::CREDENTIAL_SIZE_MAX)]
    CredentialTooLarge {
        /// Its bytes.
        bytes: usize,
    },
    /// A chunk request of no ids, or too many.
    #[error("chunk request of {count} ids (1 to {max})", max = CHUNK_IDS_MAX)]
    ChunkCount {
        /// How many it asked for.
        count: usize,
    },
    /// A dictionary request for zstd id 0 (no dictionary has it).
    #[error("dictionary request for zstd id 0")]
    DictionaryId,
    /// A dictionary answer larger than any dictionary may be.
    #[error("dictionary of {bytes} bytes (at most {max})", max = shoal_artifact::chunk::DICTIONARY_SIZE_MAX)]
    DictionaryTooLarge {
        /// Its bytes.
        bytes: usize,
    },
    /// A chunk answer whose entries do not match the request's ids.
    #[error("chunk answer of {got} entries for {asked} ids")]
    AnswerCount {
        /// Ids asked for.
        asked: usize,
        /// Entries answered.
        got: usize,
    },
}

impl From<WireError> for io::Error {
    fn from(e: WireError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// A message with its own consistency checks.
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Checks what CBOR decoding cannot.
    fn check(&self) -> Result<(), WireError> {
        Ok(())
    }

    /// The message as written on `protocol` (an older version of it may carry
    /// less).
    fn for_protocol(self, _protocol: &StreamProtocol) -> Self {
        self
    }
}

impl Message for State {
    fn check(&self) -> Result<(), WireError> {
        if let Some(c) = &self.credential
            && c.len() > shoal_signing::CREDENTIAL_SIZE_MAX
        {
            return Err(WireError::CredentialTooLarge { bytes: c.len() });
        }
        if let Some(i) = &self.installing {
            if i.positions > POSITIONS_MAX {
                return Err(WireError::TooManyPositions {
                    positions: i.positions,
                });
            }
            if i.have.len() != (i.positions as usize).div_ceil(8) {
                return Err(WireError::BitfieldLength {
                    bytes: i.have.len(),
                    positions: i.positions,
                });
            }
            let spare = i.positions % 8;
            if spare != 0 && i.have.last().is_some_and(|&b| b >> spare != 0) {
                return Err(WireError::BitsPastEnd {
                    positions: i.positions,
                });
            }
            if !i.fetching.is_empty() && i.fetching.len() != i.have.len() {
                return Err(WireError::FetchingLength {
                    bytes: i.fetching.len(),
                    positions: i.positions,
                });
            }
            if spare != 0 && i.fetching.last().is_some_and(|&b| b >> spare != 0) {
                return Err(WireError::FetchingPastEnd {
                    positions: i.positions,
                });
            }
        }
        Ok(())
    }

    fn for_protocol(mut self, protocol: &StreamProtocol) -> State {
        if *protocol == STATE_V1
            && let Some(i) = self.installing.as_mut()
        {
            i.fetching = Vec::new();
        }
        self
    }
}

impl Message for ManifestRequest {}

impl Message for DictionaryRequest {
    fn check(&self) -> Result<(), WireError> {
        if self.zstd_id == 0 {
            return Err(WireError::DictionaryId);
        }
        Ok(())
    }
}

impl Message for DictionaryResponse {
    fn check(&self) -> Result<(), WireError> {
        match self {
            DictionaryResponse::Bytes(b)
                if b.len() > shoal_artifact::chunk::DICTIONARY_SIZE_MAX =>
            {
                Err(WireError::DictionaryTooLarge { bytes: b.len() })
            }
            _ => Ok(()),
        }
    }
}
impl Message for ManifestResponse {}
impl Message for ChunkResponse {}

impl Message for ChunkRequest {
    fn check(&self) -> Result<(), WireError> {
        if self.ids.is_empty() || self.ids.len() > CHUNK_IDS_MAX {
            return Err(WireError::ChunkCount {
                count: self.ids.len(),
            });
        }
        Ok(())
    }
}

/// Decodes a message read whole (at most `max` bytes), then checks it.
pub fn decode<M: Message>(bytes: &[u8], max: usize) -> Result<M, WireError> {
    if bytes.len() > max {
        return Err(WireError::TooLong { max });
    }
    let m: M = cbor4ii::serde::from_slice(bytes)
        .map_err(|e| WireError::Cbor(shoal_signing::describe_cbor_error(&e)))?;
    m.check()?;
    Ok(m)
}

/// Encodes a message.
pub fn encode<M: Message>(m: &M) -> Vec<u8> {
    cbor4ii::serde::to_vec(Vec::new(), m).expect("encoding into memory cannot fail")
}

/// Reads one message of at most `max` bytes from a stream (to its end).
async fn read_message<M: Message, T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
) -> io::Result<M> {
    let mut buf = Vec::new();
    io.take(max as u64 + 1).read_to_end(&mut buf).await?;
    Ok(decode(&buf, max)?)
}

async fn write_message<M: Message, T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    m: &M,
) -> io::Result<()> {
    io.write_all(&encode(m)).await?;
    io.close().await
}

/// The request-response codec of one protocol: CBOR both ways, each direction
/// with its size cap.
#[derive(Debug)]
pub struct Codec<Req, Resp> {
    request_max: usize,
    response_max: usize,
    _types: std::marker::PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Clone for Codec<Req, Resp> {
    fn clone(&self) -> Self {
        Codec {
            request_max: self.request_max,
            response_max: self.response_max,
            _types: std::marker::PhantomData,
        }
    }
}

impl<Req, Resp> Codec<Req, Resp> {
    /// A codec refusing requests over `request_max` and answers over
    /// `response_max` bytes.
    pub fn new(request_max: usize, response_max: usize) -> Self {
        Codec {
            request_max,
            response_max,
            _types: std::marker::PhantomData,
        }
    }
}

impl<Req: Message, Resp: Message> libp2p_request_response::Codec for Codec<Req, Resp> {
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Req> {
        read_message(io, self.request_max).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Resp> {
        read_message(io, self.response_max).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
        req: Req,
    ) -> io::Result<()> {
        write_message(io, &req.for_protocol(protocol)).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
        resp: Resp,
    ) -> io::Result<()> {
        write_message(io, &resp.for_protocol(protocol)).await
    }
}

/// Checks a chunk answer against its request.
pub fn check_answer(asked: usize, chunks: &[ChunkData]) -> Result<(), WireError> {
    if chunks.len() != asked {
        return Err(WireError::AnswerCount {
            asked,
            got: chunks.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ManifestId {
        ManifestId([n; 32])
    }

    #[test]
    fn messages_round_trip() {
        let have = Bitfield::from_members(13, [0, 5, 12]);
        let state = State {
            running: Some(id(1)),
            installing: Some(Installing::new(id(2), &have)),
            credential: Some(serde_bytes::ByteBuf::from(vec![1, 2, 3])),
        };
        let back: State = decode(&encode(&state), STATE_BYTES_MAX).expect("valid");
        assert_eq!(back, state);
        assert_eq!(back.installing.expect("installing").bitfield(), have);
        let fetching = Bitfield::from_members(13, [1, 2, 12]);
        let state = State {
            installing: Some(Installing::new(id(2), &have).fetching(&fetching)),
            ..state
        };
        let back: State = decode(&encode(&state), STATE_BYTES_MAX).expect("valid");
        assert_eq!(back, state);
        let i = back.installing.expect("installing");
        assert_eq!(i.bitfield(), have);
        assert_eq!(i.fetching_bitfield(), fetching);
        let req = ChunkRequest {
            manifest: id(3),
            ids: vec![ChunkId([7; 32]); 3],
        };
        assert_eq!(
            decode::<ChunkRequest>(&encode(&req), CHUNK_REQUEST_BYTES_MAX),
            Ok(req)
        );
        let resp = ChunkResponse::Chunks(vec![
            ChunkData::Bytes(b"abc".to_vec()),
            ChunkData::NotHere,
            ChunkData::Later,
        ]);
        assert_eq!(decode::<ChunkResponse>(&encode(&resp), 1024), Ok(resp));
        let m = ManifestResponse::Envelope(vec![1, 2, 3]);
        assert_eq!(decode::<ManifestResponse>(&encode(&m), 1024), Ok(m));
        let d = DictionaryRequest {
            manifest: id(4),
            zstd_id: 0x8000_1234,
        };
        assert_eq!(
            decode::<DictionaryRequest>(&encode(&d), DICTIONARY_REQUEST_BYTES_MAX),
            Ok(d)
        );
        for d in [
            DictionaryResponse::Bytes(vec![0x37, 0xa4, 0x30, 0xec]),
            DictionaryResponse::NotHere,
            DictionaryResponse::Refused,
        ] {
            assert_eq!(
                decode::<DictionaryResponse>(&encode(&d), DICTIONARY_RESPONSE_BYTES_MAX),
                Ok(d)
            );
        }
    }

    #[test]
    fn malformed_dictionary_messages_are_refused_precisely() {
        let zero = DictionaryRequest {
            manifest: id(1),
            zstd_id: 0,
        };
        assert_eq!(
            decode::<DictionaryRequest>(&encode(&zero), DICTIONARY_REQUEST_BYTES_MAX),
            Err(WireError::DictionaryId)
        );
        // A chunk request is not a dictionary request.
        let chunk = ChunkRequest {
            manifest: id(1),
            ids: vec![ChunkId([1; 32])],
        };
        assert!(matches!(
            decode::<DictionaryRequest>(&encode(&chunk), 4096),
            Err(WireError::Cbor(_))
        ));
        // Truncated.
        let ok = encode(&DictionaryRequest {
            manifest: id(1),
            zstd_id: 77_777,
        });
        assert!(matches!(
            decode::<DictionaryRequest>(&ok[..ok.len() - 1], DICTIONARY_REQUEST_BYTES_MAX),
            Err(WireError::Cbor(_))
        ));
        // Larger than any dictionary (under a generous cap: the check still holds).
        let big =
            DictionaryResponse::Bytes(vec![0; shoal_artifact::chunk::DICTIONARY_SIZE_MAX + 1]);
        assert_eq!(
            decode::<DictionaryResponse>(&encode(&big), usize::MAX),
            Err(WireError::DictionaryTooLarge {
                bytes: shoal_artifact::chunk::DICTIONARY_SIZE_MAX + 1
            })
        );
        // Over the protocol's byte cap: refused before decoding.
        let huge = DictionaryResponse::Bytes(vec![0; DICTIONARY_RESPONSE_BYTES_MAX]);
        assert_eq!(
            decode::<DictionaryResponse>(&encode(&huge), DICTIONARY_RESPONSE_BYTES_MAX),
            Err(WireError::TooLong {
                max: DICTIONARY_RESPONSE_BYTES_MAX
            })
        );
        // An unknown answer variant.
        #[derive(Serialize)]
        enum Other {
            Maybe,
        }
        assert!(matches!(
            decode::<DictionaryResponse>(&encode_any(&Other::Maybe), DICTIONARY_RESPONSE_BYTES_MAX),
            Err(WireError::Cbor(_))
        ));
    }

    fn encode_any<T: Serialize>(t: &T) -> Vec<u8> {
        cbor4ii::serde::to_vec(Vec::new(), t).expect("encode")
    }

    #[test]
    fn malformed_messages_are_refused_precisely() {
        // Too long: refused before decoding.
        let state = State::default();
        let bytes = encode(&state);
        assert_eq!(
            decode::<State>(&bytes, bytes.len() - 1),
            Err(WireError::TooLong {
                max: bytes.len() - 1
            })
        );
        // Not CBOR of the message.
        assert!(matches!(
            decode::<State>(b"\xff\x00garbage", 1024),
            Err(WireError::Cbor(_))
        ));
        assert!(matches!(
            decode::<ChunkRequest>(&encode(&state), 1024),
            Err(WireError::Cbor(_))
        ));
        // Truncated.
        let req = ChunkRequest {
            manifest: id(3),
            ids: vec![ChunkId([7; 32])],
        };
        let bytes = encode(&req);
        assert!(matches!(
            decode::<ChunkRequest>(&bytes[..bytes.len() - 1], 1024),
            Err(WireError::Cbor(_))
        ));
        // A bitfield that lies about its size.
        let mut bad = Installing::new(id(2), &Bitfield::new(16));
        bad.have.push(0);
        let s = State {
            installing: Some(bad),
            ..State::default()
        };
        assert_eq!(
            decode::<State>(&encode(&s), STATE_BYTES_MAX),
            Err(WireError::BitfieldLength {
                bytes: 3,
                positions: 16
            })
        );
        // Bits past the end.
        let mut past = Installing::new(id(2), &Bitfield::new(10));
        past.have[1] = 0b0000_0100;
        let s = State {
            installing: Some(past),
            ..State::default()
        };
        assert_eq!(
            decode::<State>(&encode(&s), STATE_BYTES_MAX),
            Err(WireError::BitsPastEnd { positions: 10 })
        );
        // Too many positions (the bitfield bytes would be large; the check comes
        // first).
        let s = State {
            installing: Some(Installing {
                manifest: id(2),
                positions: POSITIONS_MAX + 1,
                have: Vec::new(),
                fetching: Vec::new(),
            }),
            ..State::default()
        };
        assert_eq!(
            decode::<State>(&encode(&s), STATE_BYTES_MAX),
            Err(WireError::TooManyPositions {
                positions: POSITIONS_MAX + 1
            })
        );
        // A credential no signed credential is as large as.
        let s = State {
            credential: Some(serde_bytes::ByteBuf::from(vec![
                0;
                shoal_signing::CREDENTIAL_SIZE_MAX
                    + 1
            ])),
            ..State::default()
        };
        assert_eq!(
            decode::<State>(&encode(&s), STATE_BYTES_MAX),
            Err(WireError::CredentialTooLarge {
                bytes: shoal_signing::CREDENTIAL_SIZE_MAX + 1
            })
        );
        // A fetching-bitfield neither empty nor as long as the have-bitfield.
        let mut short = Installing::new(id(2), &Bitfield::new(16)).fetching(&Bitfield::full(16));
        short.fetching.pop();
        let s = State {
            installing: Some(short),
            ..State::default()
        };
        assert_eq!(
            decode::<State>(&encode(&s), STATE_BYTES_MAX),
            Err(WireError::FetchingLength {
                bytes: 1,
                positions: 16
            })
        );
        // Fetching bits past the end.
        let mut past = Installing::new(id(2), &Bitfield::new(10)).fetching(&Bitfield::full(10));
        past.fetching[1] = 0b0000_1000;
        let s = State {
            installing: Some(past),
            ..State::default()
        };
        assert_eq!(
            decode::<State>(&encode(&s), STATE_BYTES_MAX),
            Err(WireError::FetchingPastEnd { positions: 10 })
        );
        // Chunk requests of no ids or too many.
        let none = ChunkRequest {
            manifest: id(1),
            ids: Vec::new(),
        };
        assert_eq!(
            decode::<ChunkRequest>(&encode(&none), CHUNK_REQUEST_BYTES_MAX),
            Err(WireError::ChunkCount { count: 0 })
        );
        let many = ChunkRequest {
            manifest: id(1),
            ids: vec![ChunkId([1; 32]); CHUNK_IDS_MAX + 1],
        };
        assert_eq!(
            decode::<ChunkRequest>(&encode(&many), CHUNK_REQUEST_BYTES_MAX),
            Err(WireError::ChunkCount {
                count: CHUNK_IDS_MAX + 1
            })
        );
        // Far over the byte cap: refused before decoding.
        let huge = ChunkRequest {
            manifest: id(1),
            ids: vec![ChunkId([1; 32]); 2 * CHUNK_IDS_MAX],
        };
        assert_eq!(
            decode::<ChunkRequest>(&encode(&huge), CHUNK_REQUEST_BYTES_MAX),
            Err(WireError::TooLong {
                max: CHUNK_REQUEST_BYTES_MAX
            })
        );
        // An answer that does not match its request.
        assert_eq!(
            check_answer(2, &[ChunkData::NotHere]),
            Err(WireError::AnswerCount { asked: 2, got: 1 })
        );
        assert_eq!(check_answer(1, &[ChunkData::NotHere]), Ok(()));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_codec_caps_what_it_reads() {
        use libp2p_request_response::Codec as _;
        let mut codec = Codec::<ChunkRequest, ChunkResponse>::new(CHUNK_REQUEST_BYTES_MAX, 16);
        let big = ChunkResponse::Chunks(vec![ChunkData::Bytes(vec![0; 64])]);
        let bytes = encode(&big);
        let mut io = futures_util::io::Cursor::new(bytes);
        let e = codec
            .read_response(&CHUNK, &mut io)
            .await
            .expect_err("over the cap");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            e.into_inner()
                .expect("inner")
                .downcast::<WireError>()
                .expect("a wire error")
                .as_ref(),
            &WireError::TooLong { max: 16 }
        );
        let mut out = futures_util::io::Cursor::new(Vec::new());
        let req = ChunkRequest {
            manifest: id(9),
            ids: vec![ChunkId([2; 32])],
        };
        codec
            .write_request(&CHUNK, &mut out, req.clone())
            .await
            .expect("written");
        let mut back = futures_util::io::Cursor::new(out.into_inner());
        assert_eq!(
            codec.read_request(&CHUNK, &mut back).await.expect("read"),
            req
        );
    }

    /// Session 5's `/shoal/state/1` messages (no fetching-bitfield) still decode,
    /// as a state that fetches nothing; what is written on that protocol leaves the
    /// fetching-bitfield out, and on `/shoal/state/2` keeps it.
    #[tokio::test(flavor = "current_thread")]
    async fn state_v1_is_still_understood() {
        use libp2p_request_response::Codec as _;
        // The v1 message, as session 5 encoded it: three fields in `installing`.
        #[derive(Serialize)]
        struct InstallingV1 {
            manifest: ManifestId,
            positions: u32,
            #[serde(with = "serde_bytes")]
            have: Vec<u8>,
        }
        #[derive(Serialize)]
        struct StateV1 {
            running: Option<ManifestId>,
            installing: Option<InstallingV1>,
            credential: Option<serde_bytes::ByteBuf>,
        }
        let old = StateV1 {
            running: None,
            installing: Some(InstallingV1 {
                manifest: id(4),
                positions: 9,
                have: vec![0b1000_0001, 0b1],
            }),
            credential: None,
        };
        let bytes = cbor4ii::serde::to_vec(Vec::new(), &old).expect("encode");
        let state: State = decode(&bytes, STATE_BYTES_MAX).expect("a v1 state decodes");
        let i = state.installing.clone().expect("installing");
        assert_eq!(i.bitfield(), Bitfield::from_members(9, [0, 7, 8]));
        assert_eq!(i.fetching_bitfield().count(), 0);

        let fetching = Bitfield::from_members(9, [3]);
        let mine = State {
            installing: Some(i.fetching(&fetching)),
            ..state
        };
        let mut codec = Codec::<State, State>::new(STATE_BYTES_MAX, STATE_BYTES_MAX);
        for (protocol, said) in [(STATE_V1, 0), (STATE, 1)] {
            let mut out = futures_util::io::Cursor::new(Vec::new());
            codec
                .write_request(&protocol, &mut out, mine.clone())
                .await
                .expect("written");
            let mut back = futures_util::io::Cursor::new(out.into_inner());
            let got = codec
                .read_request(&protocol, &mut back)
                .await
                .expect("read");
            let got = got.installing.expect("installing");
            assert_eq!(got.fetching_bitfield().count(), said, "on {protocol}");
            assert_eq!(got.bitfield(), Bitfield::from_members(9, [0, 7, 8]));
        }
    }
}
