//! Bootloader environments: a set of `name=value` variables stored by a backend.
//!
//! - [`uboot`]: U-Boot environments as `fw_printenv`/`fw_setenv` and `mkenvimage`
//!   read and write them (single copy, or redundant copies with a flag byte).
//! - [`grub`]: GRUB `grubenv` blocks in the two-copy, lock-file layout of Mender's
//!   GRUB integration, which keeps GRUB able to choose a bootable slot across an
//!   interrupted write.
//! - [`file`](mod@file): a plain `key=value` backend (two copies with a sequence number and a
//!   CRC) for tests and the simulator.
//!
//! Every backend implements [`Env`]: [`Env::load`] returns the variables the
//! bootloader would see right now, and [`Env::store`] replaces the whole set in a
//! power-safe sequence of writes (see `DESIGN.md` for each backend's protocol).

use std::io;
use std::path::Path;

pub mod file;
pub mod grub;
pub mod uboot;

pub use crate::scheme::Vars;

/// A bootloader environment backend.
pub trait Env: std::fmt::Debug + Send {
    /// Reads the variables the bootloader would use if it started now.
    fn load(&self) -> Result<Vars, LoadError>;

    /// Replaces the whole variable set, power-safely where the backend can be.
    fn store(&mut self, vars: &Vars) -> Result<(), StoreError>;

    /// Whether an interrupted [`Env::store`] always leaves either the old or the new
    /// variable set readable (false only for a single-copy U-Boot environment).
    fn is_power_safe(&self) -> bool;

    /// A short human description, e.g. `U-Boot environment (redundant) in /dev/mmcblk0`.
    fn describe(&self) -> String;

    /// The advisory lock file that serialises read-modify-write updates of this
    /// environment between processes (see [`EnvLock`]), if any.
    fn lock_file(&self) -> Option<&Path> {
        None
    }
}

/// An exclusive advisory lock (`flock`) on an environment's lock file, held while
/// alive. Take it around a whole read-modify-write (load, change, store) so that
/// two processes (the daemon, `shoal env set`, `fw_setenv`, which locks the same
/// `/var/lock/fw_printenv.lock`) cannot lose each other's updates. Without it the
/// environment stays consistent (every store is power-safe) but an update can be
/// lost.
#[derive(Debug)]
pub struct EnvLock {
    _file: Option<std::fs::File>,
}

impl EnvLock {
    /// Locks `env`'s lock file, waiting for other holders. When the environment has
    /// no lock file or its directory does not exist, this returns a lock that holds
    /// nothing; when the file cannot be created or locked otherwise, it also warns.
    pub fn acquire(env: &dyn Env) -> EnvLock {
        let Some(path) = env.lock_file() else {
            return EnvLock { _file: None };
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .and_then(|f| f.lock().map(|()| f));
        match file {
            Ok(f) => EnvLock { _file: Some(f) },
            // No lock directory at all (a minimal initramfs or test system): nobody
            // else can be using that lock file either.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::debug!(path = %path.display(), "no lock directory; not locking");
                EnvLock { _file: None }
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "cannot lock the environment; concurrent updates may be lost");
                EnvLock { _file: None }
            }
        }
    }
}

/// Why a block of environment bytes is not a valid environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The block does not have the size the format or configuration requires.
    #[error("environment block is {actual} bytes, expected {expected}")]
    WrongSize {
        /// The required size in bytes.
        expected: u64,
        /// The size found.
        actual: u64,
    },
    /// The stored CRC32 does not match the data.
    #[error("environment crc32 mismatch: stored {stored:08x}, computed {computed:08x}")]
    BadCrc {
        /// The CRC32 stored in the block.
        stored: u32,
        /// The CRC32 of the data as read.
        computed: u32,
    },
    /// The data runs to the end of the block without its end marker (U-Boot: an
    /// empty entry; GRUB and file: a newline after the last variable).
    #[error("environment data has no terminator")]
    NoTerminator,
    /// The same variable appears twice.
    #[error("variable {name:?} appears more than once")]
    DuplicateKey {
        /// The repeated name.
        name: String,
    },
    /// An entry is not valid UTF-8.
    #[error("entry at byte {offset} is not valid utf-8")]
    NotUtf8 {
        /// Offset of the entry in the block.
        offset: usize,
    },
    /// An entry has no `=` between name and value.
    #[error("entry at byte {offset} has no '='")]
    MissingEquals {
        /// Offset of the entry in the block.
        offset: usize,
    },
    /// An entry has an empty name.
    #[error("entry at byte {offset} has an empty name")]
    EmptyName {
        /// Offset of the entry in the block.
        offset: usize,
    },
    /// The block does not start with the header its format requires.
    #[error("environment header is invalid: {detail}")]
    BadHeader {
        /// What is wrong with the header.
        detail: String,
    },
}

/// Why a variable set cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The variables do not fit in the block.
    #[error("variables need {needed} bytes but the environment holds {capacity}")]
    TooLarge {
        /// Bytes the encoding needs.
        needed: usize,
        /// Bytes available.
        capacity: usize,
    },
    /// A name is empty, or contains `=`, a NUL or a newline, or starts with `#`.
    #[error("invalid variable name {name:?}")]
    InvalidName {
        /// The offending name.
        name: String,
    },
    /// A value contains a NUL byte.
    #[error("value of variable {name:?} contains a nul byte")]
    InvalidValue {
        /// The variable whose value is invalid.
        name: String,
    },
}

/// Why [`Env::load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading the storage failed.
    #[error("cannot read {what}")]
    Io {
        /// What was being read.
        what: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The (only) copy of the environment is invalid.
    #[error("{what} is not a valid environment")]
    Invalid {
        /// Which copy.
        what: String,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// No copy was ever written: the files are missing or empty (a new device).
    #[error(
        "the bootloader environment {what} has never been written (a new device): provision it with `shoal slot init SLOT`, SLOT the slot the device runs"
    )]
    NeverWritten {
        /// The copies.
        what: String,
    },
    /// Neither copy of a redundant environment is valid.
    #[error("no valid copy of the environment: copy 1: {first}; copy 2: {second}")]
    NoValidCopy {
        /// Why copy 1 is invalid.
        first: DecodeError,
        /// Why copy 2 is invalid.
        second: DecodeError,
    },
}

/// Why [`Env::store`] failed. The environment is left as the backend's protocol
/// guarantees: the old or the new variable set, never neither (except a single-copy
/// U-Boot environment).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A storage read, write or sync failed.
    #[error("cannot write {what}")]
    Io {
        /// What was being written or read.
        what: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The variables cannot be encoded in this backend's format.
    #[error("cannot encode the environment")]
    Encode(#[from] EncodeError),
}

/// Checks names and values common to every backend: names non-empty, without `=`,
/// NUL or newline and not starting with `#`; values without NUL.
pub fn validate(vars: &Vars) -> Result<(), EncodeError> {
    for (name, value) in vars {
        if name.is_empty() || name.starts_with('#') || name.contains(['=', '\0', '\n']) {
            return Err(EncodeError::InvalidName { name: name.clone() });
        }
        if value.contains('\0') {
            return Err(EncodeError::InvalidValue { name: name.clone() });
        }
    }
    Ok(())
}

/// Inserts `name=value` parsed from `entry` (at `offset` in its block), rejecting
/// bad UTF-8, a missing `=`, an empty name and duplicates.
fn insert_entry(vars: &mut Vars, entry: &[u8], offset: usize) -> Result<(), DecodeError> {
    let text = std::str::from_utf8(entry).map_err(|_| DecodeError::NotUtf8 { offset })?;
    let (name, value) = text
        .split_once('=')
        .ok_or(DecodeError::MissingEquals { offset })?;
    if name.is_empty() {
        return Err(DecodeError::EmptyName { offset });
    }
    if vars.insert(name.to_string(), value.to_string()).is_some() {
        return Err(DecodeError::DuplicateKey {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Line codec shared by GRUB blocks and the file backend: `name=value\n` lines,
/// where a value's `\` and newline are escaped with a `\` (as `grub-editenv` does),
/// and lines starting with `#` are comments (GRUB's padding is one long comment).
mod lines {
    use super::{DecodeError, Vars, insert_entry};

    /// Appends the encoding of `vars` to `out`.
    pub(crate) fn encode(vars: &Vars, out: &mut Vec<u8>) {
        for (name, value) in vars {
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
            for &b in value.as_bytes() {
                if b == b'\\' || b == b'\n' {
                    out.push(b'\\');
                }
                out.push(b);
            }
            out.push(b'\n');
        }
    }

    /// Decodes `text`, which starts at byte `base` of its block.
    pub(crate) fn decode(text: &[u8], base: usize) -> Result<Vars, DecodeError> {
        let mut vars = Vars::new();
        let mut pos = 0;
        while pos < text.len() {
            if text[pos] == b'#' {
                // A comment runs to the next newline or the end of the block.
                match text[pos..].iter().position(|&b| b == b'\n') {
                    Some(n) => pos += n + 1,
                    None => break,
                }
                continue;
            }
            let start = pos;
            // The name is taken as it is, up to the first '=': names are never
            // escaped (grub-editenv writes them raw and GRUB reads them raw), so a
            // '\\' in a name is a plain character, and a newline before any '=' ends
            // an entry without one.
            let eq = loop {
                match text.get(pos) {
                    None => return Err(DecodeError::NoTerminator),
                    Some(b'\n') => {
                        return Err(DecodeError::MissingEquals {
                            offset: base + start,
                        });
                    }
                    Some(b'=') => break pos,
                    Some(_) => pos += 1,
                }
            };
            let mut entry = text[start..=eq].to_vec();
            pos = eq + 1;
            // The value: '\\' escapes the next byte ('\\' or a newline).
            loop {
                match text.get(pos) {
                    None => return Err(DecodeError::NoTerminator),
                    Some(b'\n') => break,
                    Some(b'\\') => {
                        let escaped = *text.get(pos + 1).ok_or(DecodeError::NoTerminator)?;
                        entry.push(escaped);
                        pos += 2;
                    }
                    Some(&b) => {
                        entry.push(b);
                        pos += 1;
                    }
                }
            }
            pos += 1;
            if entry.contains(&0) {
                return Err(DecodeError::NotUtf8 {
                    offset: base + start,
                });
            }
            insert_entry(&mut vars, &entry, base + start)?;
        }
        Ok(vars)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_bad_names_and_values() {
        for bad in ["", "a=b", "#x", "a\nb", "a\0"] {
            let vars = Vars::from([(bad.to_string(), "v".to_string())]);
            assert_eq!(
                validate(&vars),
                Err(EncodeError::InvalidName { name: bad.into() })
            );
        }
        let vars = Vars::from([("n".to_string(), "a\0b".to_string())]);
        assert_eq!(
            validate(&vars),
            Err(EncodeError::InvalidValue { name: "n".into() })
        );
        let ok = Vars::from([("n".to_string(), "a=b\\c\nd e".to_string())]);
        assert_eq!(validate(&ok), Ok(()));
    }

    #[test]
    fn env_lock_serialises_read_modify_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env");
        file::FileEnv::open(&path, true)
            .unwrap()
            .store(&Vars::from([("n".to_string(), "0".to_string())]))
            .unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        let mut env = file::FileEnv::open(&path, true).unwrap();
                        let _lock = EnvLock::acquire(&env);
                        let mut vars = env.load().unwrap();
                        let n: u32 = vars["n"].parse().unwrap();
                        vars.insert("n".into(), (n + 1).to_string());
                        env.store(&vars).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let env = file::FileEnv::open(&path, false).unwrap();
        assert_eq!(env.load().unwrap()["n"], "40");
    }

    /// Fuzz regression (`file_env`, crash-cc6ff49a): a `\\` in a name was unescaped
    /// on decode but written raw on encode, so what was stored read back as other
    /// names (`upgs\\\\=1` decoded to `upgs\\`, written `upgs\\=1`, read back as
    /// `upgs`). Names are raw, as grub-editenv writes and GRUB reads them.
    #[test]
    fn line_names_are_raw_and_round_trip() {
        let vars = lines::decode(b"shoal_slot=a\nupgs\\\\=1\nk\\=v=2\n", 0).unwrap();
        assert_eq!(
            vars,
            Vars::from([
                ("shoal_slot".to_string(), "a".to_string()),
                ("upgs\\\\".to_string(), "1".to_string()),
                ("k\\".to_string(), "v=2".to_string()),
            ])
        );
        let mut out = Vec::new();
        lines::encode(&vars, &mut out);
        assert_eq!(lines::decode(&out, 0), Ok(vars));
    }

    /// Fuzz regression (`file_env`, crash-ea20c295): an escaped newline before the
    /// `=` made a name holding a newline, which no backend can write back, so the
    /// next store failed. An entry whose line ends before any `=` has no `=`.
    #[test]
    fn line_newline_before_equals_is_missing_equals() {
        assert_eq!(
            lines::decode(b"upgrade_available=0\nms\\\nlines\\\\=5ax\n", 40),
            Err(DecodeError::MissingEquals { offset: 60 })
        );
    }

    #[test]
    fn line_codec_escapes_and_rejects_malformed() {
        let vars = Vars::from([
            ("a".to_string(), "x\\y".to_string()),
            ("b".to_string(), "l1\nl2".to_string()),
            ("c".to_string(), String::new()),
        ]);
        let mut out = Vec::new();
        lines::encode(&vars, &mut out);
        assert_eq!(out, b"a=x\\\\y\nb=l1\\\nl2\nc=\n");
        assert_eq!(lines::decode(&out, 0), Ok(vars));
        assert_eq!(lines::decode(b"a=1", 0), Err(DecodeError::NoTerminator));
        assert_eq!(lines::decode(b"a=1\\", 0), Err(DecodeError::NoTerminator));
        assert_eq!(
            lines::decode(b"a=1\nnoeq\n", 7),
            Err(DecodeError::MissingEquals { offset: 11 })
        );
        assert_eq!(
            lines::decode(b"=1\n", 0),
            Err(DecodeError::EmptyName { offset: 0 })
        );
        assert_eq!(
            lines::decode(b"a=1\na=2\n", 0),
            Err(DecodeError::DuplicateKey { name: "a".into() })
        );
        assert_eq!(
            lines::decode(b"a=\xff\n", 0),
            Err(DecodeError::NotUtf8 { offset: 0 })
        );
        assert_eq!(
            lines::decode(b"#c\na=1\n####", 0),
            Ok(Vars::from([("a".into(), "1".into())]))
        );
    }
}
