//! U-Boot environments, byte-compatible with `fw_printenv`/`fw_setenv`
//! (libubootenv) and `mkenvimage`.
//!
//! # Layout
//!
//! A copy is `size` bytes: a little-endian CRC32 of the data area, then (redundant
//! environments only) one flag byte, then the data area: `name=value\0` entries
//! ended by an empty entry (`\0`), padded to the end. The CRC covers the whole data
//! area, padding included.
//!
//! A redundant environment has two copies. A copy whose CRC does not match is
//! absent. Of two valid copies the newer wins by U-Boot's rule for incremental flags
//! (`flag + 1` is newer, with `0` newer than `255`; equal flags: copy 1). A write
//! first zeroes the older (or invalid) copy and syncs, then writes it with the newer
//! flag and syncs: until that write is complete the old copy stays the newest valid
//! one, so a torn write is never seen as data, and zeroing first keeps a torn write
//! from completing the remnants of an earlier torn attempt (same flag) into a copy
//! that was never committed.

use std::io;
use std::path::{Path, PathBuf};

use super::{DecodeError, EncodeError, Env, LoadError, StoreError, Vars, insert_entry, validate};
use crate::storage::{FileStorage, Storage};

/// Bytes of the CRC32 at the start of every copy.
pub const CRC_LEN: usize = 4;

/// Whether an environment copy carries the redundant-environment flag byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One copy: CRC, then data.
    Single,
    /// Two copies: CRC, flag byte, then data.
    Redundant,
}

impl Layout {
    fn header_len(self) -> usize {
        match self {
            Layout::Single => CRC_LEN,
            Layout::Redundant => CRC_LEN + 1,
        }
    }
}

/// A decoded copy: its flag byte (redundant layout only) and variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The redundant-environment flag; `None` in a single-copy layout.
    pub flag: Option<u8>,
    /// The variables.
    pub vars: Vars,
}

/// Decodes one copy of `size` bytes.
pub fn decode(block: &[u8], size: usize, layout: Layout) -> Result<Copy, DecodeError> {
    if block.len() != size || size < layout.header_len() + 1 {
        return Err(DecodeError::WrongSize {
            expected: size as u64,
            actual: block.len() as u64,
        });
    }
    let stored = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    let data_start = layout.header_len();
    let data = &block[data_start..];
    let computed = crc32fast::hash(data);
    if stored != computed {
        return Err(DecodeError::BadCrc { stored, computed });
    }
    let flag = match layout {
        Layout::Single => None,
        Layout::Redundant => Some(block[CRC_LEN]),
    };
    let mut vars = Vars::new();
    let mut pos = 0;
    loop {
        match data.get(pos) {
            None => return Err(DecodeError::NoTerminator),
            Some(0) => break,
            Some(_) => {}
        }
        let len = data[pos..]
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::NoTerminator)?;
        insert_entry(&mut vars, &data[pos..pos + len], data_start + pos)?;
        pos += len + 1;
    }
    Ok(Copy { flag, vars })
}

/// Encodes `vars` as one copy of `size` bytes, padded with zeros.
pub fn encode(vars: &Vars, size: usize, flag: Option<u8>) -> Result<Vec<u8>, EncodeError> {
    validate(vars)?;
    let header = CRC_LEN + usize::from(flag.is_some());
    let mut block = Vec::with_capacity(size);
    block.extend_from_slice(&[0; CRC_LEN]);
    if let Some(flag) = flag {
        block.push(flag);
    }
    for (name, value) in vars {
        block.extend_from_slice(name.as_bytes());
        block.push(b'=');
        block.extend_from_slice(value.as_bytes());
        block.push(0);
    }
    block.push(0);
    if block.len() > size {
        return Err(EncodeError::TooLarge {
            needed: block.len() - header,
            capacity: size.saturating_sub(header),
        });
    }
    block.resize(size, 0);
    let crc = crc32fast::hash(&block[header..]);
    block[..CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(block)
}

/// Which of two valid copies U-Boot uses, by their flags: 0 or 1.
pub fn newer(flag0: u8, flag1: u8) -> usize {
    match (flag0, flag1) {
        (1, 0) => 0,
        (0, 1) => 1,
        (0xff, 0) => 1,
        (0, 0xff) => 0,
        (a, b) if a > b => 0,
        (a, b) if b > a => 1,
        _ => 0,
    }
}

/// One copy's location, as a line of `fw_env.config` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// File or device holding the copy.
    pub path: PathBuf,
    /// Byte offset of the copy in it.
    pub offset: u64,
    /// Size of the copy in bytes (the same for both copies).
    pub size: u64,
    /// Erase-sector size, if given (kept for reference; only MTD devices need it).
    pub sector_size: Option<u64>,
    /// Number of sectors, if given.
    pub sectors: Option<u64>,
}

/// A parsed `fw_env.config`: one or two copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwEnvConfig {
    /// The copies, in file order: one for a single environment, two for a
    /// redundant one.
    pub copies: Vec<Location>,
}

/// Why a `fw_env.config` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A line has fewer than three fields (device, offset, size).
    #[error("line {line}: expected 'device offset size [sector-size [sectors]]'")]
    TooFewFields {
        /// 1-based line number.
        line: usize,
    },
    /// A line has more than five fields.
    #[error("line {line}: too many fields (at most 5)")]
    TooManyFields {
        /// 1-based line number.
        line: usize,
    },
    /// A numeric field is not a number (decimal, `0x` hex or `0` octal).
    #[error("line {line}: {field} {value:?} is not a number")]
    BadNumber {
        /// 1-based line number.
        line: usize,
        /// Which field.
        field: &'static str,
        /// The text found.
        value: String,
    },
    /// The size cannot hold a header and an empty environment.
    #[error("line {line}: environment size {size} is too small")]
    TooSmall {
        /// 1-based line number.
        line: usize,
        /// The size given.
        size: u64,
    },
    /// The copy would end past the largest byte offset there is.
    #[error("line {line}: offset {offset:#x} plus size {size:#x} is past the end of any device")]
    PastEnd {
        /// 1-based line number.
        line: usize,
        /// The offset given.
        offset: u64,
        /// The size given.
        size: u64,
    },
    /// More than two copies are described.
    #[error("line {line}: more than two environment copies")]
    TooManyCopies {
        /// 1-based line number of the third copy.
        line: usize,
    },
    /// No copy is described.
    #[error("no environment location in the configuration")]
    NoCopies,
    /// The two copies have different sizes.
    #[error("the two environment copies differ in size ({first} and {second} bytes)")]
    SizeMismatch {
        /// Size of copy 1.
        first: u64,
        /// Size of copy 2.
        second: u64,
    },
    /// The two copies overlap in the same file.
    #[error("the two environment copies overlap in {path}")]
    Overlap {
        /// The shared file.
        path: PathBuf,
    },
    /// The location is an MTD device, which needs erase-before-write that bootctl
    /// does not implement.
    #[error(
        "line {line}: {path} is an mtd device, which is not supported (use a block device or file)"
    )]
    MtdUnsupported {
        /// 1-based line number.
        line: usize,
        /// The device.
        path: PathBuf,
    },
}

/// Parses a number the way `strtoull(s, NULL, 0)` does: `0x` hex, leading-`0`
/// octal, else decimal; the whole field must be consumed.
fn parse_number(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// Whether `path` names an MTD device (`/dev/mtd*`), judged on its components with
/// `.` and `..` resolved, so `//dev/mtd0` or `/dev/./mtd0` is one too.
fn is_mtd(path: &Path) -> bool {
    use std::path::Component;
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    path.has_root()
        && matches!(parts.as_slice(), [dev, name, ..]
            if *dev == "dev" && name.as_encoded_bytes().starts_with(b"mtd"))
}

impl FwEnvConfig {
    /// Parses `fw_env.config` text: `device offset size [sector-size [sectors]]`
    /// per line, `#` comments, blank lines ignored.
    pub fn parse(text: &str) -> Result<FwEnvConfig, ConfigError> {
        let mut copies: Vec<Location> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            if fields.len() < 3 {
                return Err(ConfigError::TooFewFields { line });
            }
            if fields.len() > 5 {
                return Err(ConfigError::TooManyFields { line });
            }
            let number = |idx: usize, field: &'static str| -> Result<Option<u64>, ConfigError> {
                match fields.get(idx) {
                    None => Ok(None),
                    Some(v) => parse_number(v)
                        .map(Some)
                        .ok_or_else(|| ConfigError::BadNumber {
                            line,
                            field,
                            value: (*v).to_string(),
                        }),
                }
            };
            let offset = number(1, "offset")?.unwrap_or(0);
            let size = number(2, "size")?.unwrap_or(0);
            let sector_size = number(3, "sector size")?;
            let sectors = number(4, "sector count")?;
            let path = PathBuf::from(fields[0]);
            if is_mtd(&path) {
                return Err(ConfigError::MtdUnsupported { line, path });
            }
            if size < (Layout::Redundant.header_len() + 1) as u64 {
                return Err(ConfigError::TooSmall { line, size });
            }
            if offset.checked_add(size).is_none() {
                return Err(ConfigError::PastEnd { line, offset, size });
            }
            if copies.len() == 2 {
                return Err(ConfigError::TooManyCopies { line });
            }
            copies.push(Location {
                path,
                offset,
                size,
                sector_size,
                sectors,
            });
        }
        match copies.as_slice() {
            [] => Err(ConfigError::NoCopies),
            [a, b] if a.size != b.size => Err(ConfigError::SizeMismatch {
                first: a.size,
                second: b.size,
            }),
            [a, b]
                if a.path == b.path
                    && a.offset < b.offset + b.size
                    && b.offset < a.offset + a.size =>
            {
                Err(ConfigError::Overlap {
                    path: a.path.clone(),
                })
            }
            _ => Ok(FwEnvConfig { copies }),
        }
    }

    /// Reads and parses a `fw_env.config` file.
    pub fn load(path: &Path) -> Result<FwEnvConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        FwEnvConfig::parse(&text)
    }

    /// Single or redundant.
    pub fn layout(&self) -> Layout {
        if self.copies.len() == 2 {
            Layout::Redundant
        } else {
            Layout::Single
        }
    }
}

/// A U-Boot environment in one or two copies.
#[derive(Debug)]
pub struct UbootEnv {
    copies: Vec<Box<dyn Storage>>,
    names: Vec<String>,
    size: usize,
    lock_file: Option<PathBuf>,
}

/// The lock file `fw_printenv`/`fw_setenv` (libubootenv) use.
pub const LOCK_FILE: &str = "/var/lock/fw_printenv.lock";

impl UbootEnv {
    /// An environment over `copies` (one or two storages of at least `size` bytes,
    /// each holding one copy at its offset 0), named `names` in messages.
    ///
    /// # Panics
    /// If `copies` does not hold one or two storages, or `names` is not as long.
    pub fn new(copies: Vec<Box<dyn Storage>>, names: Vec<String>, size: usize) -> UbootEnv {
        assert!(
            matches!(copies.len(), 1 | 2),
            "a U-Boot environment has one or two copies"
        );
        assert_eq!(copies.len(), names.len(), "one name per copy");
        UbootEnv {
            copies,
            names,
            size,
            lock_file: None,
        }
    }

    /// Sets the advisory lock file for read-modify-write updates
    /// ([`crate::env::EnvLock`]); [`UbootEnv::open`] uses [`LOCK_FILE`].
    pub fn with_lock_file(mut self, path: PathBuf) -> UbootEnv {
        self.lock_file = Some(path);
        self
    }

    /// Opens the copies `config` describes. Files that do not exist are created
    /// when `writable` (an empty copy is invalid until written).
    pub fn open(config: &FwEnvConfig, writable: bool) -> io::Result<UbootEnv> {
        let mut copies: Vec<Box<dyn Storage>> = Vec::new();
        let mut names = Vec::new();
        for loc in &config.copies {
            let storage =
                FileStorage::open_region(&loc.path, loc.offset, loc.size, writable, true)?;
            copies.push(Box::new(storage));
            names.push(format!(
                "{} at offset {:#x}",
                loc.path.display(),
                loc.offset
            ));
        }
        let size = usize::try_from(config.copies[0].size).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "environment size too large")
        })?;
        Ok(UbootEnv::new(copies, names, size).with_lock_file(PathBuf::from(LOCK_FILE)))
    }

    fn layout(&self) -> Layout {
        if self.copies.len() == 2 {
            Layout::Redundant
        } else {
            Layout::Single
        }
    }

    /// Reads and decodes every copy. An unreadable (too short) copy decodes as
    /// [`DecodeError::WrongSize`]; other I/O errors are returned with the copy's name.
    pub fn read_copies(&self) -> Result<Vec<Result<Copy, DecodeError>>, (String, io::Error)> {
        let layout = self.layout();
        let mut out = Vec::new();
        for (storage, name) in self.copies.iter().zip(&self.names) {
            let mut block = vec![0; self.size];
            match storage.read_at(0, &mut block) {
                Ok(()) => out.push(decode(&block, self.size, layout)),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    let actual = storage.len().unwrap_or(0);
                    out.push(Err(DecodeError::WrongSize {
                        expected: self.size as u64,
                        actual,
                    }));
                }
                Err(source) => return Err((name.clone(), source)),
            }
        }
        Ok(out)
    }

    /// Index of the copy U-Boot uses, or `None` when no copy is valid.
    fn current(copies: &[Result<Copy, DecodeError>]) -> Option<usize> {
        match copies {
            [Ok(_)] => Some(0),
            [Ok(a), Ok(b)] => Some(newer(a.flag.unwrap_or(0), b.flag.unwrap_or(0))),
            [Ok(_), Err(_)] => Some(0),
            [Err(_), Ok(_)] => Some(1),
            _ => None,
        }
    }
}

impl Env for UbootEnv {
    fn load(&self) -> Result<Vars, LoadError> {
        let mut copies = self
            .read_copies()
            .map_err(|(what, source)| LoadError::Io { what, source })?;
        match UbootEnv::current(&copies) {
            Some(i) => match copies.swap_remove(i) {
                Ok(copy) => Ok(copy.vars),
                Err(_) => unreachable!("current() only picks a valid copy"),
            },
            None => match copies.len() {
                1 => Err(LoadError::Invalid {
                    what: self.names[0].clone(),
                    source: copies
                        .swap_remove(0)
                        .err()
                        .unwrap_or(DecodeError::NoTerminator),
                }),
                _ => {
                    let second = copies
                        .pop()
                        .and_then(Result::err)
                        .unwrap_or(DecodeError::NoTerminator);
                    let first = copies
                        .pop()
                        .and_then(Result::err)
                        .unwrap_or(DecodeError::NoTerminator);
                    Err(LoadError::NoValidCopy { first, second })
                }
            },
        }
    }

    fn store(&mut self, vars: &Vars) -> Result<(), StoreError> {
        let (target, flag) = match self.layout() {
            Layout::Single => (0, None),
            Layout::Redundant => {
                let copies = self
                    .read_copies()
                    .map_err(|(what, source)| StoreError::Io { what, source })?;
                match UbootEnv::current(&copies) {
                    Some(cur) => {
                        let flag = copies[cur].as_ref().ok().and_then(|c| c.flag).unwrap_or(0);
                        (1 - cur, Some(flag.wrapping_add(1)))
                    }
                    None => (0, Some(1)),
                }
            }
        };
        let block = encode(vars, self.size, flag)?;
        let what = self.names[target].clone();
        let io_err = |source| StoreError::Io {
            what: what.clone(),
            source,
        };
        let storage = &mut self.copies[target];
        if flag.is_some() {
            // Erase the target first. Without this, a torn write could complete the
            // remnants of an earlier torn attempt with the same flag into a valid,
            // never-committed copy.
            storage.write_at(0, &vec![0; self.size]).map_err(io_err)?;
            storage.sync().map_err(io_err)?;
        }
        storage.write_at(0, &block).map_err(io_err)?;
        storage.sync().map_err(io_err)?;
        tracing::debug!(copy = target + 1, ?flag, "u-boot environment copy written");
        Ok(())
    }

    fn is_power_safe(&self) -> bool {
        self.layout() == Layout::Redundant
    }

    fn lock_file(&self) -> Option<&Path> {
        self.lock_file.as_deref()
    }

    fn describe(&self) -> String {
        match self.layout() {
            Layout::Single => format!("U-Boot environment (single copy) in {}", self.names[0]),
            Layout::Redundant => format!(
                "U-Boot environment (redundant) in {} and {}",
                self.names[0], self.names[1]
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn encode_layout_is_crc_flag_entries_terminator() {
        let block = encode(&vars(&[("a", "1"), ("bb", "x y")]), 32, Some(7)).unwrap();
        assert_eq!(block.len(), 32);
        assert_eq!(block[4], 7);
        assert_eq!(&block[5..17], b"a=1\0bb=x y\0\0");
        assert_eq!(&block[..4], &crc32fast::hash(&block[5..]).to_le_bytes());
        let copy = decode(&block, 32, Layout::Redundant).unwrap();
        assert_eq!(
            copy,
            Copy {
                flag: Some(7),
                vars: vars(&[("a", "1"), ("bb", "x y")])
            }
        );
    }

    #[test]
    fn empty_environment_round_trips() {
        let block = encode(&Vars::new(), 16, None).unwrap();
        assert_eq!(
            decode(&block, 16, Layout::Single).unwrap().vars,
            Vars::new()
        );
    }

    fn with_crc(mut block: Vec<u8>, header: usize) -> Vec<u8> {
        let crc = crc32fast::hash(&block[header..]);
        block[..4].copy_from_slice(&crc.to_le_bytes());
        block
    }

    #[test]
    fn malformed_blocks_give_specific_errors() {
        let good = encode(&vars(&[("a", "1")]), 16, None).unwrap();
        assert_eq!(
            decode(&good[..15], 16, Layout::Single),
            Err(DecodeError::WrongSize {
                expected: 16,
                actual: 15
            })
        );
        let mut bad_crc = good.clone();
        bad_crc[6] ^= 1;
        assert!(matches!(
            decode(&bad_crc, 16, Layout::Single),
            Err(DecodeError::BadCrc { .. })
        ));
        // Entries fill the data area with no empty entry after them.
        let mut full = vec![0; 4];
        full.extend_from_slice(b"abc=defghij\0");
        assert_eq!(
            decode(&with_crc(full, 4), 16, Layout::Single),
            Err(DecodeError::NoTerminator)
        );
        let mut unterminated = vec![0; 4];
        unterminated.extend_from_slice(b"abc=defghijk");
        assert_eq!(
            decode(&with_crc(unterminated, 4), 16, Layout::Single),
            Err(DecodeError::NoTerminator)
        );
        let mut dup = vec![0; 4];
        dup.extend_from_slice(b"a=1\0a=2\0\0\0\0\0");
        assert_eq!(
            decode(&with_crc(dup, 4), 16, Layout::Single),
            Err(DecodeError::DuplicateKey { name: "a".into() })
        );
        let mut utf = vec![0; 4];
        utf.extend_from_slice(b"a=1\0b=\xff\0\0\0\0\0");
        assert_eq!(
            decode(&with_crc(utf, 4), 16, Layout::Single),
            Err(DecodeError::NotUtf8 { offset: 8 })
        );
        let mut noeq = vec![0; 4];
        noeq.extend_from_slice(b"abc\0\0\0\0\0\0\0\0\0");
        assert_eq!(
            decode(&with_crc(noeq, 4), 16, Layout::Single),
            Err(DecodeError::MissingEquals { offset: 4 })
        );
        let mut empty_name = vec![0; 4];
        empty_name.extend_from_slice(b"=1\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(
            decode(&with_crc(empty_name, 4), 16, Layout::Single),
            Err(DecodeError::EmptyName { offset: 4 })
        );
    }

    #[test]
    fn encode_rejects_oversize_and_bad_names() {
        assert_eq!(
            encode(&vars(&[("name", "0123456789")]), 16, None),
            Err(EncodeError::TooLarge {
                needed: 17,
                capacity: 12
            })
        );
        assert_eq!(
            encode(&vars(&[("a=b", "1")]), 64, None),
            Err(EncodeError::InvalidName { name: "a=b".into() })
        );
    }

    #[test]
    fn newer_follows_uboot_incremental_flags() {
        assert_eq!(newer(1, 0), 0);
        assert_eq!(newer(0, 1), 1);
        assert_eq!(newer(0xff, 0), 1);
        assert_eq!(newer(0, 0xff), 0);
        assert_eq!(newer(5, 4), 0);
        assert_eq!(newer(4, 5), 1);
        assert_eq!(newer(3, 3), 0);
    }

    #[test]
    fn fw_env_config_parses_and_rejects() {
        let cfg = FwEnvConfig::parse(
            "# comment\n\n/dev/mmcblk0 0x400000 0x4000 0x200 # trailing\n/dev/mmcblk0 0x404000 16384\n",
        )
        .unwrap();
        assert_eq!(cfg.layout(), Layout::Redundant);
        assert_eq!(cfg.copies[0].offset, 0x400000);
        assert_eq!(cfg.copies[0].sector_size, Some(0x200));
        assert_eq!(cfg.copies[1].size, 0x4000);
        assert_eq!(
            FwEnvConfig::parse("/x 010 0x100").unwrap().copies[0].offset,
            8
        );

        assert!(matches!(
            FwEnvConfig::parse("/x 0"),
            Err(ConfigError::TooFewFields { line: 1 })
        ));
        assert!(matches!(
            FwEnvConfig::parse("#\n/x 0 0x100 1 2 3"),
            Err(ConfigError::TooManyFields { line: 2 })
        ));
        assert!(matches!(
            FwEnvConfig::parse("/x zero 0x100"),
            Err(ConfigError::BadNumber {
                line: 1,
                field: "offset",
                ..
            })
        ));
        assert!(matches!(
            FwEnvConfig::parse("/x 0 0x1g"),
            Err(ConfigError::BadNumber { field: "size", .. })
        ));
        assert!(matches!(
            FwEnvConfig::parse("/x 0 4"),
            Err(ConfigError::TooSmall { size: 4, .. })
        ));
        assert!(matches!(
            FwEnvConfig::parse("/x 0 64\n/x 64 64\n/x 128 64"),
            Err(ConfigError::TooManyCopies { line: 3 })
        ));
        assert!(matches!(
            FwEnvConfig::parse("# nothing\n"),
            Err(ConfigError::NoCopies)
        ));
        assert!(matches!(
            FwEnvConfig::parse("/x 0 64\n/y 0 128"),
            Err(ConfigError::SizeMismatch {
                first: 64,
                second: 128
            })
        ));
        assert!(matches!(
            FwEnvConfig::parse("/x 0 64\n/x 32 64"),
            Err(ConfigError::Overlap { .. })
        ));
        assert!(matches!(
            FwEnvConfig::parse("/dev/mtd1 0 0x10000"),
            Err(ConfigError::MtdUnsupported { line: 1, .. })
        ));
    }

    /// Fuzz regression (`fw_env_config`, crash-588240e1): `//dev/mtd/...` slipped
    /// past the text prefix check for MTD devices (which need erase-before-write,
    /// so writing them as a file corrupts the environment), as did `/dev/./mtd0`
    /// and `/dev/../dev/mtd0`.
    #[test]
    fn mtd_devices_are_refused_however_spelled() {
        let crash = "/tmp/seedgen/env/fw.bin 0x0 0x800\n//dev/mtd/seedgen/env/fw.bin 0x800 0x800\n";
        assert!(matches!(
            FwEnvConfig::parse(crash),
            Err(ConfigError::MtdUnsupported { line: 2, .. })
        ));
        for path in [
            "//dev/mtd0",
            "/dev/./mtd0",
            "/dev/../dev/mtd0",
            "/dev//mtdblock1",
        ] {
            assert!(
                matches!(
                    FwEnvConfig::parse(&format!("{path} 0 0x10000")),
                    Err(ConfigError::MtdUnsupported { line: 1, .. })
                ),
                "{path}"
            );
        }
        for path in [
            "/dev/mmcblk0boot1",
            "dev/mtd0",
            "/var/dev/mtd0",
            "/dev/xmtd0",
        ] {
            assert!(
                FwEnvConfig::parse(&format!("{path} 0 0x10000")).is_ok(),
                "{path}"
            );
        }
    }

    /// Found in review while writing the `fw_env_config` fuzz target (its
    /// boundary seed, not the fuzzer, got there): two copies in one file, the
    /// second near the end of the 64-bit range, overflowed `offset + size` in the
    /// overlap check (a panic; in a release build a wrapped, wrong overlap answer).
    #[test]
    fn copy_past_the_end_of_the_address_space_is_refused() {
        assert!(matches!(
            FwEnvConfig::parse("/x 0 0x2000\n/x 0xfffffffffffff000 0x2000"),
            Err(ConfigError::PastEnd {
                line: 2,
                offset: 0xffff_ffff_ffff_f000,
                size: 0x2000
            })
        ));
        assert!(FwEnvConfig::parse("/x 0 0x1000\n/x 0xffffffffffffe000 0x1000").is_ok());
    }

    fn arb_vars() -> impl Strategy<Value = Vars> {
        proptest::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_.]{0,15}", "[^\\x00]{0,40}", 0..12)
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(v in arb_vars(), flag in proptest::option::of(any::<u8>())) {
            let layout = if flag.is_some() { Layout::Redundant } else { Layout::Single };
            let block = encode(&v, 4096, flag).unwrap();
            prop_assert_eq!(decode(&block, 4096, layout), Ok(Copy { flag, vars: v }));
        }

        #[test]
        fn fw_env_config_parse_never_panics(text in "(\\PC{0,40}\n){0,4}") {
            let _ = FwEnvConfig::parse(&text);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode(&bytes, 64, Layout::Redundant);
            let _ = decode(&bytes, 64, Layout::Single);
        }
    }
}
