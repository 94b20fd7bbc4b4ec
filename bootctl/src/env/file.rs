//! A plain `key=value` environment in two files, for tests and the simulator.
//!
//! # Format
//!
//! Each copy is text:
//!
//! ```text
//! # shoal-env v1 seq=<decimal u64> len=<decimal body bytes> crc32=<8 hex digits>
//! name=value
//! ...
//! ```
//!
//! The body is the `len` bytes after the header line: `name=value` lines with a
//! value's `\` and newline escaped by `\` (as in GRUB blocks); `crc32` covers the
//! body. Bytes after the body are ignored.
//!
//! # Power safety
//!
//! The same discipline as a redundant U-Boot environment: the valid copy with the
//! higher `seq` wins; a write empties the other copy (synced), then writes it with
//! `seq + 1` (synced); a torn or missing copy fails its length or CRC check and is
//! ignored. Emptying first means a torn write cannot combine with the remnants of an
//! earlier torn attempt (same `seq`) into a copy that was never committed.

use std::io;
use std::path::{Path, PathBuf};

use super::{DecodeError, EncodeError, Env, LoadError, StoreError, Vars, lines, validate};
use crate::storage::{FileStorage, Storage, read_all};

const MAGIC: &str = "# shoal-env v1 ";

/// A decoded copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The copy's sequence number; higher is newer.
    pub seq: u64,
    /// The variables.
    pub vars: Vars,
}

fn bad_header(detail: &str) -> DecodeError {
    DecodeError::BadHeader {
        detail: detail.to_string(),
    }
}

/// Decodes one copy.
pub fn decode(bytes: &[u8]) -> Result<Copy, DecodeError> {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(DecodeError::NoTerminator)?;
    let header =
        std::str::from_utf8(&bytes[..nl]).map_err(|_| DecodeError::NotUtf8 { offset: 0 })?;
    let fields = header
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad_header("missing '# shoal-env v1'"))?;
    let mut seq = None;
    let mut len = None;
    let mut crc = None;
    for field in fields.split(' ') {
        match field.split_once('=') {
            Some(("seq", v)) => seq = v.parse::<u64>().ok(),
            Some(("len", v)) => len = v.parse::<usize>().ok(),
            Some(("crc32", v)) if v.len() == 8 => crc = u32::from_str_radix(v, 16).ok(),
            _ => return Err(bad_header(&format!("unexpected field {field:?}"))),
        }
    }
    let seq = seq.ok_or_else(|| bad_header("seq missing or not a number"))?;
    let len = len.ok_or_else(|| bad_header("len missing or not a number"))?;
    let stored = crc.ok_or_else(|| bad_header("crc32 missing or not 8 hex digits"))?;
    let start = nl + 1;
    let available = bytes.len() - start;
    if available < len {
        return Err(DecodeError::WrongSize {
            expected: (start + len) as u64,
            actual: bytes.len() as u64,
        });
    }
    let body = &bytes[start..start + len];
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(DecodeError::BadCrc { stored, computed });
    }
    let vars = lines::decode(body, start)?;
    Ok(Copy { seq, vars })
}

/// Encodes `vars` as a copy with sequence number `seq`.
pub fn encode(vars: &Vars, seq: u64) -> Result<Vec<u8>, EncodeError> {
    validate(vars)?;
    let mut body = Vec::new();
    lines::encode(vars, &mut body);
    let mut out = format!(
        "{MAGIC}seq={seq} len={} crc32={:08x}\n",
        body.len(),
        crc32fast::hash(&body)
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Ok(out)
}

/// The two paths of a [`FileEnv`] stored at `path`: `path` itself and `path.2`.
pub fn paths(path: &Path) -> [PathBuf; 2] {
    let mut second = path.as_os_str().to_owned();
    second.push(".2");
    [path.to_path_buf(), PathBuf::from(second)]
}

/// A two-copy `key=value` environment.
#[derive(Debug)]
pub struct FileEnv {
    copies: [Box<dyn Storage>; 2],
    names: [String; 2],
    lock_file: Option<PathBuf>,
}

impl FileEnv {
    /// An environment over two storages (each holds one copy from offset 0).
    pub fn new(copies: [Box<dyn Storage>; 2], names: [String; 2]) -> FileEnv {
        FileEnv {
            copies,
            names,
            lock_file: None,
        }
    }

    /// Sets the advisory lock file for read-modify-write updates
    /// ([`crate::env::EnvLock`]); [`FileEnv::open`] uses `PATH.lock`.
    pub fn with_lock_file(mut self, path: PathBuf) -> FileEnv {
        self.lock_file = Some(path);
        self
    }

    /// Opens (when `writable`, creates) `path` and `path.2`.
    pub fn open(path: &Path, writable: bool) -> io::Result<FileEnv> {
        let [p1, p2] = paths(path);
        let open = |p: &Path| -> io::Result<Box<dyn Storage>> {
            if writable {
                Ok(Box::new(FileStorage::create(p)?))
            } else {
                match FileStorage::open(p, false) {
                    Ok(s) => Ok(Box::new(s)),
                    // A missing copy reads as empty (invalid), like an unwritten one.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Box::new(EmptyStorage)),
                    Err(e) => Err(e),
                }
            }
        };
        let mut lock = path.as_os_str().to_owned();
        lock.push(".lock");
        Ok(FileEnv::new(
            [open(&p1)?, open(&p2)?],
            [p1.display().to_string(), p2.display().to_string()],
        )
        .with_lock_file(PathBuf::from(lock)))
    }

    fn read_copies(&self) -> Result<[Result<Copy, DecodeError>; 2], (String, io::Error)> {
        let read = |i: usize| {
            read_all(&*self.copies[i])
                .map(|bytes| decode(&bytes))
                .map_err(|e| (self.names[i].clone(), e))
        };
        Ok([read(0)?, read(1)?])
    }

    fn current(copies: &[Result<Copy, DecodeError>; 2]) -> Option<usize> {
        match copies {
            [Ok(a), Ok(b)] => Some(if b.seq > a.seq { 1 } else { 0 }),
            [Ok(_), Err(_)] => Some(0),
            [Err(_), Ok(_)] => Some(1),
            [Err(_), Err(_)] => None,
        }
    }
}

/// A read-only storage with no bytes, standing in for a copy file that does not
/// exist.
#[derive(Debug)]
struct EmptyStorage;

impl Storage for EmptyStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(0)
    }
    fn read_at(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            Ok(())
        } else {
            Err(io::ErrorKind::UnexpectedEof.into())
        }
    }
    fn write_at(&mut self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "environment opened read-only",
        ))
    }
    fn set_len(&mut self, _len: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "environment opened read-only",
        ))
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Env for FileEnv {
    fn load(&self) -> Result<Vars, LoadError> {
        let copies = self
            .read_copies()
            .map_err(|(what, source)| LoadError::Io { what, source })?;
        match FileEnv::current(&copies) {
            Some(i) => {
                let [a, b] = copies;
                let chosen = if i == 0 { a } else { b };
                Ok(chosen.map(|c| c.vars).unwrap_or_default())
            }
            None => {
                // Both copies missing or empty: never written, not corrupt.
                let empty = |i: usize| self.copies[i].len().is_ok_and(|n| n == 0);
                if empty(0) && empty(1) {
                    return Err(LoadError::NeverWritten {
                        what: format!("{} and {}", self.names[0], self.names[1]),
                    });
                }
                let [a, b] = copies;
                Err(LoadError::NoValidCopy {
                    first: a.err().unwrap_or(DecodeError::NoTerminator),
                    second: b.err().unwrap_or(DecodeError::NoTerminator),
                })
            }
        }
    }

    fn store(&mut self, vars: &Vars) -> Result<(), StoreError> {
        let copies = self
            .read_copies()
            .map_err(|(what, source)| StoreError::Io { what, source })?;
        let (target, seq) = match FileEnv::current(&copies) {
            Some(cur) => {
                let seq = copies[cur].as_ref().map(|c| c.seq).unwrap_or(0);
                (1 - cur, seq + 1)
            }
            None => (0, 1),
        };
        let bytes = encode(vars, seq)?;
        let what = self.names[target].clone();
        let io_err = |source| StoreError::Io {
            what: what.clone(),
            source,
        };
        let storage = &mut self.copies[target];
        // Empty the target first, so a torn write can never complete the remnants
        // of an earlier torn attempt with the same seq into a valid copy.
        storage.set_len(0).map_err(io_err)?;
        storage.sync().map_err(io_err)?;
        storage.write_at(0, &bytes).map_err(io_err)?;
        storage.sync().map_err(io_err)?;
        tracing::debug!(copy = %what, seq, "file environment written");
        Ok(())
    }

    fn lock_file(&self) -> Option<&Path> {
        self.lock_file.as_deref()
    }

    fn is_power_safe(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!(
            "file environment in {} and {}",
            self.names[0], self.names[1]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_and_round_trip() {
        let vars = Vars::from([("a".to_string(), "1".to_string())]);
        let bytes = encode(&vars, 7).unwrap();
        let crc = crc32fast::hash(b"a=1\n");
        assert_eq!(
            bytes,
            format!("# shoal-env v1 seq=7 len=4 crc32={crc:08x}\na=1\n").into_bytes()
        );
        let mut with_tail = bytes.clone();
        with_tail.extend_from_slice(b"garbage from an older, longer copy");
        assert_eq!(decode(&with_tail), Ok(Copy { seq: 7, vars }));
    }

    #[test]
    fn malformed_copies_give_specific_errors() {
        assert_eq!(decode(b""), Err(DecodeError::NoTerminator));
        assert!(matches!(
            decode(b"# other\n"),
            Err(DecodeError::BadHeader { .. })
        ));
        assert!(matches!(
            decode(b"# shoal-env v1 seq=x len=0 crc32=00000000\n"),
            Err(DecodeError::BadHeader { .. })
        ));
        assert_eq!(
            decode(b"# shoal-env v1 seq=1 len=10 crc32=00000000\nab"),
            Err(DecodeError::WrongSize {
                expected: 53,
                actual: 45
            })
        );
        let good = encode(&Vars::from([("a".to_string(), "1".to_string())]), 1).unwrap();
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 2] = b'2';
        assert!(matches!(decode(&bad), Err(DecodeError::BadCrc { .. })));
        let body = b"a=1\na=2\n";
        let dup = format!(
            "# shoal-env v1 seq=1 len=8 crc32={:08x}\n",
            crc32fast::hash(body)
        );
        let mut dup = dup.into_bytes();
        dup.extend_from_slice(body);
        assert_eq!(
            decode(&dup),
            Err(DecodeError::DuplicateKey { name: "a".into() })
        );
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(v in proptest::collection::btree_map(
            "[a-zA-Z_][a-zA-Z0-9_]{0,10}", "[^\\x00]{0,30}", 0..10), seq in any::<u64>()) {
            let bytes = encode(&v, seq).unwrap();
            prop_assert_eq!(decode(&bytes), Ok(Copy { seq, vars: v }));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }
}
