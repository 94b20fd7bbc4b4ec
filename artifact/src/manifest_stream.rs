//! The manifest decoded with its first payload's chunk list streamed out
//! ([`Manifest::from_cbor_streaming`]): the ids go to a sink as they are decoded
//! (a device writes them to a file it reads by position), the sizes to two
//! compact arrays, so the list is never a `Vec<ChunkRef>` (40 bytes a chunk:
//! 17.2 MB for an 8 GiB image).
//!
//! Every check [`Manifest::from_cbor`] makes is made, with the same errors in the
//! same order: the sizes against the chunking and the payload size
//! ([`Payload::validate`](crate::Payload::validate)'s code over the arrays), the
//! references' positions against the streamed list's first occurrences (which
//! the caller knows from its own index of the ids: [`StreamedIds`]), and the
//! canonical form: the manifest re-encoded with an empty first list must match
//! the bytes outside the list, and the list's bytes must hash to the canonical
//! encoding of what was decoded from them.

use std::cell::RefCell;

use serde::de::{Deserializer, Error as _};

use crate::manifest::{CHUNK_REF_ENCODED_MIN, MANIFEST_SIZE_MAX};
use crate::{ChunkId, ChunkRef, Manifest, ManifestError};

/// Takes a streamed chunk list's ids, in position order.
pub trait ChunkIdSink: std::any::Any {
    /// The id at the next position. An error (the sink's storage failed) stops
    /// the decode with [`StreamedError::Sink`].
    fn push(&mut self, id: &ChunkId) -> Result<(), String>;
    /// About `positions` ids are coming (the list's declared length, trusted
    /// only up to what the manifest's bytes can hold).
    fn reserve(&mut self, positions: usize) {
        let _ = positions;
    }
}

/// The first payload's chunk sizes, by position, as streamed out of the decoder.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StreamedSizes {
    /// Uncompressed sizes.
    pub sizes: Vec<u32>,
    /// Sizes on the wire (the chunks' stored forms).
    pub stored_sizes: Vec<u32>,
}

impl StreamedSizes {
    /// The chunk list again, from the streamed ids (by position) and these sizes.
    pub fn chunk_refs(&self, ids: &[ChunkId]) -> Vec<ChunkRef> {
        ids.iter()
            .zip(self.sizes.iter().zip(&self.stored_sizes))
            .map(|(&id, (&size, &stored_size))| ChunkRef {
                id,
                size,
                stored_size,
            })
            .collect()
    }
}

/// The streamed list's ids, as the caller keeps them, for the references' checks.
pub trait StreamedIds {
    /// Positions in the list.
    fn positions(&self) -> u32;
    /// Whether `pos` (below [`StreamedIds::positions`]) is the first position of its id.
    fn is_first(&self, pos: u32) -> bool;
    /// The id at `pos` (asked only of a manifest with several payloads whose later
    /// payloads have references).
    fn id(&self, pos: u32) -> ChunkId;
}

/// Bytes read by offset (an envelope file), for [`Manifest::from_file_streaming`].
pub trait ReadAt {
    /// Fills `buf` with the bytes at `at`.
    fn read_at(&self, at: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

/// A file, read by position (`pread`): a stored envelope.
impl ReadAt for std::fs::File {
    fn read_at(&self, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, at)
    }
}

/// Drops the streamed ids: for a caller that needs none of them (choosing a
/// release by its fields).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Discard;

impl ChunkIdSink for Discard {
    fn push(&mut self, _: &ChunkId) -> Result<(), String> {
        Ok(())
    }
}

/// Bytes in memory (an envelope on a store that keeps no files).
impl ReadAt for &[u8] {
    fn read_at(&self, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let found = usize::try_from(at)
            .ok()
            .and_then(|at| self.get(at..at.checked_add(buf.len())?));
        match found {
            Some(b) => {
                buf.copy_from_slice(b);
                Ok(())
            }
            None => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
        }
    }
}

/// Where the manifest's bytes are.
#[derive(Clone, Copy)]
enum Source<'a> {
    Slice(&'a [u8]),
    /// `len` bytes at `at` of a file.
    File {
        file: &'a dyn ReadAt,
        at: u64,
        len: u64,
    },
}

impl std::fmt::Debug for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Slice(b) => write!(f, "{} bytes", b.len()),
            Source::File { at, len, .. } => write!(f, "{len} bytes at {at} of a file"),
        }
    }
}

impl Source<'_> {
    fn len(&self) -> u64 {
        match self {
            Source::Slice(b) => b.len() as u64,
            Source::File { len, .. } => *len,
        }
    }

    /// Whether the bytes at `at` are `want`.
    fn equals(&self, at: u64, want: &[u8]) -> std::io::Result<bool> {
        match self {
            Source::Slice(b) => Ok(b.get(at as usize..at as usize + want.len()) == Some(want)),
            Source::File { file, at: base, .. } => {
                let mut buf = [0u8; 64 * 1024];
                for (k, part) in want.chunks(buf.len()).enumerate() {
                    let b = &mut buf[..part.len()];
                    file.read_at(base + at + (k * 64 * 1024) as u64, b)?;
                    if b != part {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        }
    }

    /// BLAKE3 of `len` bytes at `at`.
    fn hash(&self, at: u64, len: u64) -> std::io::Result<[u8; 32]> {
        match self {
            Source::Slice(b) => Ok(*blake3::hash(&b[at as usize..(at + len) as usize]).as_bytes()),
            Source::File { file, at: base, .. } => {
                let mut h = blake3::Hasher::new();
                let mut buf = vec![0u8; 64 * 1024];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    file.read_at(base + at + done, &mut buf[..n])?;
                    h.update(&buf[..n]);
                    done += n as u64;
                }
                Ok(*h.finalize().as_bytes())
            }
        }
    }
}

/// Reads `len` bytes of a [`ReadAt`] from `at` on, hashing them (BLAKE3).
struct HashingReader<'a> {
    file: &'a dyn ReadAt,
    at: u64,
    left: u64,
    hasher: blake3::Hasher,
}

impl std::io::Read for HashingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        self.file.read_at(self.at, &mut buf[..n])?;
        self.hasher.update(&buf[..n]);
        self.at += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Why a streamed decode failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamedError {
    /// The bytes are not a valid manifest (the error [`Manifest::from_cbor`] gives).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The sink could not take an id.
    #[error("{0}")]
    Sink(String),
    /// The file could not be read, or its bytes changed while they were read.
    #[error("{0}")]
    Read(String),
}

/// A manifest decoded with its first payload's chunk list streamed out, not yet
/// checked against its references and its canonical form: build the index of the
/// ids, then call [`StreamedManifest::finish`].
#[derive(Debug)]
pub struct StreamedManifest<'a> {
    bytes: Source<'a>,
    manifest: Manifest,
    /// The streamed list's sizes (take them: `finish` does not need them).
    pub sizes: StreamedSizes,
    /// Positions streamed.
    count: u64,
    /// BLAKE3 of the canonical encoding of the streamed items (without the
    /// array header), and its length.
    items_hash: [u8; 32],
    items_len: u64,
}

pub(crate) struct Stream {
    ids: Box<dyn ChunkIdSink>,
    sizes: StreamedSizes,
    count: u64,
    items: blake3::Hasher,
    items_len: u64,
    buf: Vec<u8>,
    sink_error: Option<String>,
    used: bool,
}

thread_local! {
    /// The stream of the decode running on this thread, if it streams.
    static STREAM: RefCell<Option<Stream>> = const { RefCell::new(None) };
}

/// The stream for a chunk list being decoded, if this decode streams and its
/// first list is not decoded yet.
pub(crate) fn take_stream() -> Option<Stream> {
    STREAM.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_some_and(|s| !s.used) {
            c.take()
        } else {
            None
        }
    })
}

/// Decodes a chunk list into `stream` (and puts it back, used).
pub(crate) fn stream_list<'de, D: Deserializer<'de>>(
    d: D,
    mut stream: Stream,
) -> Result<(), D::Error> {
    struct Visit<'a>(&'a mut Stream);
    impl<'de> serde::de::Visitor<'de> for Visit<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a chunk list")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let s = self.0;
            // Trusted only up to what the manifest's bytes can hold.
            let cap = seq
                .size_hint()
                .unwrap_or(0)
                .min(MANIFEST_SIZE_MAX / CHUNK_REF_ENCODED_MIN);
            s.sizes.sizes.reserve_exact(cap);
            s.sizes.stored_sizes.reserve_exact(cap);
            s.ids.reserve(cap);
            while let Some(c) = seq.next_element::<ChunkRef>()? {
                if let Err(e) = s.ids.push(&c.id) {
                    s.sink_error = Some(e.clone());
                    return Err(A::Error::custom(e));
                }
                s.sizes.sizes.push(c.size);
                s.sizes.stored_sizes.push(c.stored_size);
                s.count += 1;
                encode_ref(&c, &mut s.buf);
                if s.buf.len() >= 8192 {
                    s.items.update(&s.buf);
                    s.items_len += s.buf.len() as u64;
                    s.buf.clear();
                }
            }
            s.items.update(&s.buf);
            s.items_len += s.buf.len() as u64;
            s.buf.clear();
            Ok(())
        }
    }
    let r = d.deserialize_seq(Visit(&mut stream));
    stream.used = true;
    STREAM.with(|c| *c.borrow_mut() = Some(stream));
    r
}

/// A CBOR head (major type `major`, argument `v`) in its shortest form.
fn head(major: u8, v: u64, out: &mut Vec<u8>) {
    let m = major << 5;
    if v < 24 {
        out.push(m | v as u8);
    } else if let Ok(v) = u8::try_from(v) {
        out.extend_from_slice(&[m | 24, v]);
    } else if let Ok(v) = u16::try_from(v) {
        out.push(m | 25);
        out.extend_from_slice(&v.to_be_bytes());
    } else if let Ok(v) = u32::try_from(v) {
        out.push(m | 26);
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// The canonical encoding of a chunk: `[id, size, stored_size]`.
fn encode_ref(c: &ChunkRef, out: &mut Vec<u8>) {
    head(4, 3, out);
    head(2, 32, out);
    out.extend_from_slice(&c.id.0);
    head(0, c.size.into(), out);
    head(0, c.stored_size.into(), out);
}

impl Manifest {
    /// [`Manifest::from_cbor`] with the first payload's chunk list streamed out:
    /// its ids to `ids`, its sizes to [`StreamedManifest::sizes`]; the decoded
    /// manifest's first payload has an empty `chunks`. Every check but the
    /// references' and the canonical form's is made here;
    /// [`StreamedManifest::finish`] makes those (the same errors as
    /// [`Manifest::from_cbor`], in the same order). Returns the sink back.
    pub fn from_cbor_streaming<S: ChunkIdSink>(
        bytes: &[u8],
        ids: S,
    ) -> Result<(StreamedManifest<'_>, S), StreamedError> {
        if bytes.len() > MANIFEST_SIZE_MAX {
            return Err(ManifestError::TooLarge {
                size: bytes.len(),
                max: MANIFEST_SIZE_MAX,
            }
            .into());
        }
        Manifest::decode_streaming(Source::Slice(bytes), ids, |_| {
            cbor4ii::serde::from_slice::<Manifest>(bytes).map_err(|e| {
                // The version read alone only when the decode fails (a manifest
                // of this version decodes, and its version is checked with its
                // fields): a newer manifest gets its clear error, as
                // `Manifest::from_cbor` gives it.
                match Manifest::check_size_and_version(bytes) {
                    Err(v) => v.into(),
                    Ok(()) => ManifestError::Decode(shoal_signing::describe_cbor_error(&e)).into(),
                }
            })
        })
    }

    /// [`Manifest::from_cbor_streaming`] of the `len` bytes at `at` of `file`
    /// (a stored envelope's signed bytes, whose signatures were checked as they
    /// were read: [`shoal_signing::TrustRoot::verify_streamed`]), read as they
    /// are decoded; they must hash (BLAKE3) to `hash`, what the signatures
    /// were checked over. The bytes are read once; when the decode fails, the
    /// version alone is read again, so a newer manifest gets
    /// [`ManifestError::UnsupportedVersion`] as from [`Manifest::from_cbor`]
    /// (the decode's errors are worded as a reader's: an input that ends early
    /// is "the input ends inside ...").
    pub fn from_file_streaming<'a, S: ChunkIdSink>(
        file: &'a dyn ReadAt,
        at: u64,
        len: u64,
        hash: &[u8; 32],
        ids: S,
    ) -> Result<(StreamedManifest<'a>, S), StreamedError> {
        if len > MANIFEST_SIZE_MAX as u64 {
            return Err(ManifestError::TooLarge {
                size: usize::try_from(len).unwrap_or(usize::MAX),
                max: MANIFEST_SIZE_MAX,
            }
            .into());
        }
        let reader = |hasher| {
            std::io::BufReader::with_capacity(
                64 * 1024,
                HashingReader {
                    file,
                    at,
                    left: len,
                    hasher,
                },
            )
        };
        let read_error = |e: &dyn std::fmt::Display| StreamedError::Read(e.to_string());
        let decode_error = |e: cbor4ii::serde::DecodeError<std::io::Error>| match e {
            cbor4ii::serde::DecodeError::Core(cbor4ii::core::error::DecodeError::Read(e)) => {
                read_error(&e)
            }
            e => ManifestError::Decode(shoal_signing::describe_cbor_error(&e)).into(),
        };
        Manifest::decode_streaming(Source::File { file, at, len }, ids, |_| {
            let mut r = reader(blake3::Hasher::new());
            let m = cbor4ii::serde::from_reader::<Manifest, _>(&mut r).map_err(|e| {
                // The version read alone (the bytes read again) only when the
                // decode fails: a manifest of this version decodes, and its
                // version is checked with its fields; a newer one gets its
                // clear error, as `Manifest::from_cbor` gives it.
                let probe = cbor4ii::serde::from_reader::<crate::manifest::VersionProbe, _>(
                    reader(blake3::Hasher::new()),
                );
                // The probe's own error when it fails too, as before.
                match probe.map(|p| crate::manifest::check_version(p.format_version)) {
                    Ok(Err(v)) => v.into(),
                    Ok(Ok(())) => decode_error(e),
                    Err(probe) => decode_error(probe),
                }
            })?;
            // What the decoder left unread is hashed too: the bytes read are
            // those the signatures were checked over, or nothing is trusted.
            let mut rest = r.into_inner();
            std::io::copy(&mut rest, &mut std::io::sink()).map_err(|e| read_error(&e))?;
            if rest.hasher.finalize().as_bytes() != hash {
                return Err(StreamedError::Read(
                    "the signed manifest changed while it was read".into(),
                ));
            }
            Ok(m)
        })
    }

    fn decode_streaming<'a, S: ChunkIdSink>(
        bytes: Source<'a>,
        ids: S,
        decode: impl FnOnce(()) -> Result<Manifest, StreamedError>,
    ) -> Result<(StreamedManifest<'a>, S), StreamedError> {
        let ids: Box<dyn ChunkIdSink> = Box::new(ids);
        let installed = Installed::install(Stream {
            ids,
            sizes: StreamedSizes::default(),
            count: 0,
            items: blake3::Hasher::new(),
            items_len: 0,
            buf: Vec::with_capacity(8192 + 64),
            sink_error: None,
            used: false,
        });
        let decoded = decode(());
        let stream = installed
            .take()
            .expect("the stream is put back after every list");
        if let Some(e) = stream.sink_error {
            return Err(StreamedError::Sink(e));
        }
        let manifest = decoded?;
        let sizes = if stream.used {
            stream.sizes
        } else {
            // No payload: the checks below refuse it (payloads, 1..).
            manifest.validate_fields(None)?;
            return Err(ManifestError::Decode("the manifest has no chunk list".into()).into());
        };
        manifest.validate_fields(Some(&sizes))?;
        Ok((
            StreamedManifest {
                bytes,
                manifest,
                sizes,
                count: stream.count,
                items_hash: *stream.items.finalize().as_bytes(),
                items_len: stream.items_len,
            },
            *(stream.ids as Box<dyn std::any::Any>)
                .downcast::<S>()
                .expect("the sink given"),
        ))
    }
}

/// The thread's [`STREAM`] while a manifest is decoded: taken back when the
/// decode ends, or when this is dropped (a decode that panicked leaves no stream
/// on its thread for the next decode to find).
struct Installed;

impl Installed {
    fn install(stream: Stream) -> Installed {
        STREAM.with(|c| *c.borrow_mut() = Some(stream));
        Installed
    }

    fn take(self) -> Option<Stream> {
        STREAM.with(|c| c.borrow_mut().take())
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = STREAM.try_with(|c| c.try_borrow_mut().map(|mut s| s.take()));
    }
}

impl StreamedManifest<'_> {
    /// The decoded manifest (its first payload's `chunks` empty).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The decoded manifest, moved out (its first payload's `chunks` empty),
    /// neither its references nor its canonical form checked: for a caller that
    /// reads its fields only.
    pub fn into_manifest(self) -> Manifest {
        self.manifest
    }

    /// Checks the references against the streamed ids (`ids`) and the canonical
    /// form, and returns the manifest (its first payload's `chunks` empty).
    pub fn finish(self, ids: &dyn StreamedIds) -> Result<Manifest, StreamedError> {
        self.manifest.validate_references(Some(ids))?;
        self.check_canonical()?;
        Ok(self.manifest)
    }

    /// Checks the canonical form alone ([`ManifestError::NotCanonical`], as
    /// [`StreamedManifest::finish`] gives it): for a caller that reads the
    /// manifest's fields without its ids (and so cannot check its references),
    /// which must still refuse what a whole decode refuses as not canonical
    /// (non-shortest integers, keys out of order, bytes after the manifest).
    pub fn check_canonical(&self) -> Result<(), StreamedError> {
        match self.is_canonical() {
            Ok(true) => Ok(()),
            Ok(false) => Err(ManifestError::NotCanonical.into()),
            Err(e) => Err(StreamedError::Read(e.to_string())),
        }
    }

    /// Whether the bytes are the canonical encoding of the manifest with its
    /// streamed list: outside the list, byte for byte the re-encoding with an
    /// empty list (small: the list is the bulk); the list, the canonical
    /// encoding of what was streamed (compared by hash).
    fn is_canonical(&self) -> std::io::Result<bool> {
        let empty = self.manifest.to_cbor();
        // Where the first list starts: the first byte where the encoding with one
        // chunk in it differs (its array head, 0x80 then 0x81).
        let mut one = self.manifest.clone();
        one.payloads[0].chunks.push(ChunkRef {
            id: ChunkId([0; 32]),
            size: 0,
            stored_size: 0,
        });
        let with_one = one.to_cbor();
        let Some(at) = empty.iter().zip(&with_one).position(|(a, b)| a != b) else {
            return Ok(false);
        };
        let mut list_head = Vec::new();
        head(4, self.count, &mut list_head);
        let list_len = list_head.len() as u64 + self.items_len;
        let bytes = self.bytes;
        if bytes.len() != empty.len() as u64 - 1 + list_len {
            return Ok(false);
        }
        let at64 = at as u64;
        Ok(bytes.equals(0, &empty[..at])?
            && bytes.equals(at64, &list_head)?
            && bytes.equals(at64 + list_len, &empty[at + 1..])?
            && bytes.hash(at64 + list_head.len() as u64, self.items_len)? == self.items_hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decode that panics leaves no stream installed on its thread.
    #[test]
    fn a_decode_that_panics_leaves_no_stream_on_its_thread() {
        let panicked = std::panic::catch_unwind(|| {
            let _ = Manifest::decode_streaming(Source::Slice(&[]), Discard, |_| {
                panic!("the decoder failed")
            });
        });
        assert!(panicked.is_err());
        assert!(STREAM.with(|c| c.borrow().is_none()));
    }
}
