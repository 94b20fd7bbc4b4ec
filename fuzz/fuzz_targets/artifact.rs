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
//! - bits 3-7: which chunks `next_wanted` wants (by the low bits of their ids).
//!
//! Properties: no panic, and every read ends in `Ok(None)` or a `ReadError` with a
//! message; the chunks a successful read returns are exactly, and in order, those
//! `holds` announced (`next_wanted`: the wanted subsequence of them); after the end,
//! the reader stays at the end.

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

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
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
    let mut reader = match opened {
        Ok(r) => r,
        Err(e) => return check_err(&e),
    };
    if mode & 4 != 0 && reader.is_thin() {
        reader.set_base(base());
    }
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
            let pick = mode >> 3;
            let want = |id: &ChunkId| (id.0[0] ^ pick) & 1 == 0 || pick & 0x10 != 0;
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
