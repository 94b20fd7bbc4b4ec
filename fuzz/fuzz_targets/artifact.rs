//! The `.shoal` reader (`ArtifactReader`): tar framing, the envelope member, the
//! dictionary, contents and pack table members, pack headers, data members (the
//! default layout: seeds `data-*`) and chunk frames, through all three ways the
//! binary reads an artifact.
//!
//! The first input byte picks the way, the rest is the artifact:
//! - bits 0-1: 0 sequential (`next_chunk`, as `extract`), 1 batched (`verify_rest`,
//!   as `verify`), 2 seeking (`next_wanted` over a seekable source, as `install`
//!   from a file), 3 signature-checked `open` against the seeds' trust root, then
//!   sequential;
//! - bit 2: tell a thin artifact its base (the seeds' base manifest), and hold the
//!   manifests a `manifest.delta` member may be against (`base.manifest`,
//!   `delta-base.manifest`), as a device holds its running release's;
//! - bits 3 and 7: which chunks `next_wanted` wants (bit 3 against the low bit of
//!   their ids; bit 7: all of them);
//! - bit 6: first recompute the checksum of every 512-byte block that looks like a
//!   ustar header (`ustar` at its magic), so that a mutated header (a member's
//!   size, path or type) reaches the framing checks instead of failing its checksum.
//!
//! Properties: no panic, and every read ends in `Ok(None)` or a `ReadError` with a
//! message; the chunks a successful read returns are exactly, and in order, those
//! `holds` announced (`next_wanted`: the wanted subsequence of them); after the end,
//! the reader stays at the end. Then all three readers are run on the input, and
//! they agree: the sequential and batched readers accept and refuse the same inputs
//! (unless chunks are delta-encoded, which `verify_rest` leaves undecoded), and the
//! seeking reader refuses what the sequential one refuses, except where the
//! sequential reader's error is a chunk's (one the seeking reader may have skipped).

#![no_main]

use std::io::{self, Cursor, Read, Seek, SeekFrom};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shoal_artifact::read::Skip;
use shoal_artifact::{ArtifactReader, ChunkId, Manifest, ReadError};
use shoal_signing::{SignedRoot, TrustRoot};

/// Reads at most this many chunks per input, so one input stays fast.
const CHUNKS_MAX: usize = 4096;

fn root() -> &'static TrustRoot {
    static ROOT: OnceLock<TrustRoot> = OnceLock::new();
    ROOT.get_or_init(|| {
        SignedRoot::from_bytes(include_bytes!("../seeds/root.shoal"))
            .expect("fuzz/seeds/root.shoal is a valid root")
            .root
    })
}

/// The manifest of the release the seeds' thin artifacts are built against.
fn base() -> &'static Manifest {
    static BASE: OnceLock<Manifest> = OnceLock::new();
    BASE.get_or_init(|| {
        Manifest::from_cbor(include_bytes!("../seeds/base.manifest"))
            .expect("fuzz/seeds/base.manifest is a valid manifest")
    })
}

/// A seekable in-memory artifact, as a file is to `install`.
struct Src<'a>(Cursor<&'a [u8]>);

impl Read for Src<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Skip for Src<'_> {
    fn skip(&mut self, n: u64) -> io::Result<()> {
        let delta = i64::try_from(n)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "skip too far"))?;
        self.0.seek(SeekFrom::Current(delta)).map(|_| ())
    }
}

fn check_err(e: &ReadError) {
    assert!(!e.to_string().is_empty());
}

/// Recomputes the checksum of every block that looks like a ustar header.
fn fix_checksums(bytes: &mut [u8]) {
    for block in bytes.chunks_exact_mut(512) {
        if &block[257..262] != b"ustar" {
            continue;
        }
        block[148..156].copy_from_slice(b"        ");
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }
}

/// How one reader ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    Accepted,
    /// Refused; `chunk`: by a chunk's own error (its bytes, not the framing).
    Refused {
        chunk: bool,
    },
    /// Stopped at [`CHUNKS_MAX`]: no verdict.
    Unfinished,
}

fn refused(e: &ReadError) -> Outcome {
    check_err(e);
    Outcome::Refused {
        chunk: matches!(e, ReadError::Chunk(_)),
    }
}

/// Opens `bytes` as `mode` says.
fn open(bytes: &[u8], mode: u8) -> Result<ArtifactReader<Src<'_>>, ReadError> {
    let src = Src(Cursor::new(bytes));
    let held: Vec<Vec<u8>> = if mode & 4 != 0 {
        vec![
            include_bytes!("../seeds/base.manifest").to_vec(),
            include_bytes!("../seeds/delta-base.manifest").to_vec(),
        ]
    } else {
        Vec::new()
    };
    let opened = if mode & 3 == 3 {
        ArtifactReader::open_held(src, root(), None, None, &held)
    } else {
        ArtifactReader::open_unverified_held(src, &held)
    };
    let mut reader = opened?;
    if mode & 4 != 0 && reader.is_thin() {
        reader.set_base(base());
    }
    Ok(reader)
}

/// Reads `bytes` the way `how` says (0 sequential, 1 batched, 2 seeking wanting
/// what `want` says), opened as `mode` says.
fn outcome(bytes: &[u8], mode: u8, how: u8, want: impl Fn(&ChunkId) -> bool) -> Outcome {
    let mut reader = match open(bytes, mode) {
        Ok(r) => r,
        Err(e) => return refused(&e),
    };
    match how {
        0 => {
            for _ in 0..=CHUNKS_MAX {
                match reader.next_chunk() {
                    Ok(Some(_)) => {}
                    Ok(None) => return Outcome::Accepted,
                    Err(e) => return refused(&e),
                }
            }
            Outcome::Unfinished
        }
        1 => {
            match reader.holds() {
                Ok(h) if h.len() > CHUNKS_MAX => return Outcome::Unfinished,
                Ok(_) => {}
                Err(e) => return refused(&e),
            }
            match reader.verify_rest(|_| {}) {
                Ok(_) => Outcome::Accepted,
                Err(e) => refused(&e),
            }
        }
        _ => {
            for _ in 0..=CHUNKS_MAX {
                match reader.next_wanted(&want) {
                    Ok(Some(raw)) => {
                        if raw.verify_chunk().is_err() {
                            return Outcome::Refused { chunk: true };
                        }
                    }
                    Ok(None) => return Outcome::Accepted,
                    Err(e) => return refused(&e),
                }
            }
            Outcome::Unfinished
        }
    }
}

/// The three readers agree on `bytes` (see the module's doc).
fn agree(bytes: &[u8], mode: u8, want: impl Fn(&ChunkId) -> bool) {
    let sequential = outcome(bytes, mode, 0, |_| true);
    let batched = outcome(bytes, mode, 1, |_| true);
    let seeking = outcome(bytes, mode, 2, want);
    if [&sequential, &batched, &seeking].contains(&&Outcome::Unfinished) {
        return;
    }
    let delta = open(bytes, mode).is_ok_and(|r| {
        r.manifest()
            .payloads
            .iter()
            .any(|p| !p.references.is_empty())
    });
    if !delta {
        assert_eq!(
            sequential == Outcome::Accepted,
            batched == Outcome::Accepted,
            "sequential {sequential:?}, batched {batched:?}"
        );
    }
    match (&sequential, &seeking) {
        (Outcome::Accepted, Outcome::Refused { chunk: true }) if delta => {}
        (Outcome::Accepted, Outcome::Refused { .. }) => {
            panic!("the seeking reader refuses what the sequential one accepts: {seeking:?}")
        }
        (Outcome::Refused { chunk: false }, Outcome::Accepted) => {
            panic!("the seeking reader accepts what the sequential one refuses (framing)")
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let mut fixed;
    let bytes = if mode & 0x40 != 0 {
        fixed = bytes.to_vec();
        fix_checksums(&mut fixed);
        &fixed[..]
    } else {
        bytes
    };
    let pick = mode >> 3;
    let want = |id: &ChunkId| (id.0[0] ^ pick) & 1 == 0 || pick & 0x10 != 0;
    agree(bytes, mode, want);
    let mut reader = match open(bytes, mode) {
        Ok(r) => r,
        Err(e) => return check_err(&e),
    };
    let holds = match reader.holds() {
        Ok(h) => h,
        Err(e) => return check_err(&e),
    };
    if let Some(table) = reader.pack_table() {
        assert!(table.iter().map(|&c| u64::from(c)).sum::<u64>() == holds.len() as u64);
    }
    match mode & 3 {
        0 | 3 => {
            let mut got: Vec<ChunkId> = Vec::new();
            loop {
                if got.len() > CHUNKS_MAX {
                    return;
                }
                match reader.next_chunk() {
                    Ok(Some((id, data))) => {
                        assert_eq!(ChunkId::of(&data), id, "a returned chunk is verified");
                        got.push(id);
                    }
                    Ok(None) => break,
                    Err(e) => return check_err(&e),
                }
            }
            assert_eq!(got, holds, "the chunks read are those announced");
            assert!(
                matches!(reader.next_chunk(), Ok(None)),
                "the end stays the end"
            );
        }
        1 => {
            if holds.len() > CHUNKS_MAX {
                return;
            }
            match reader.verify_rest(|_| {}) {
                Ok(n) => assert_eq!(n, holds.len() as u64),
                Err(e) => check_err(&e),
            }
        }
        _ => {
            let mut got: Vec<ChunkId> = Vec::new();
            loop {
                if got.len() > CHUNKS_MAX {
                    return;
                }
                match reader.next_wanted(want) {
                    Ok(Some(raw)) => match raw.verify_chunk() {
                        Ok(chunk) => {
                            let id = chunk.chunk().id;
                            assert!(want(&id), "only wanted chunks are returned");
                            assert_eq!(ChunkId::of(chunk.data()), id);
                            got.push(id);
                        }
                        Err(e) => return assert!(!e.to_string().is_empty()),
                    },
                    Ok(None) => break,
                    Err(e) => return check_err(&e),
                }
            }
            let expected: Vec<ChunkId> = holds.into_iter().filter(|id| want(id)).collect();
            assert_eq!(got, expected, "the wanted chunks, in artifact order");
            assert!(
                matches!(reader.next_wanted(want), Ok(None)),
                "the end stays the end"
            );
        }
    }
});
