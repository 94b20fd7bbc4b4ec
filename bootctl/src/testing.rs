//! Fakes for tests: a crash-injecting disk, and the environment backends over it
//! (the bootloader model is [`crate::model`]).
//!
//! # The crash model
//!
//! A [`CrashDisk`] holds named files, each with a *live* image (what reads see) and
//! a *durable* image (what survived the last [`Storage::sync`] of that file).
//! Mutating operations (`write_at`, `set_len`) are counted across the whole disk,
//! starting at 1. With [`CrashDisk::crash_at`] set to `n`, operation `n` is applied
//! to the live image only as the chosen [`Tear`] says, and from then on every
//! operation fails with "simulated power loss". [`CrashDisk::reboot`] then builds
//! the disk a rebooted machine would see: every file's durable image
//! ([`Image::Durable`], unsynced writes lost) or its live image ([`Image::Live`],
//! everything written reached the medium, the last write torn).
//!
//! Bootctl's protocols sync after every write that matters, so these two images
//! bound everything a real medium can show after power loss, except reordering of
//! unsynced writes to different sectors within one write, which the `Prefix` and
//! `Suffix` tears cover for the two-sector blocks used here.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::Slot;
use crate::control::SlotStorage;
use crate::env::Env;
use crate::env::file::FileEnv;
use crate::env::grub::GrubEnv;
use crate::env::uboot::UbootEnv;
use crate::scheme::Flavor;
use crate::storage::Storage;

/// How the operation that crashes reaches the live image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tear {
    /// Nothing of it is written.
    Lost,
    /// Only its first `n` bytes are written (at most all but one).
    Prefix(usize),
    /// Only its last `n` bytes are written (at most all but one): the medium
    /// wrote sectors out of order.
    Suffix(usize),
    /// All of it is written, but the crash comes before any sync.
    Full,
    /// Written up to the middle of the bytes it changes (from the first changed
    /// byte to the last): the adversarial tear that mixes old and new data.
    ChangedPrefix,
    /// Written from the middle of the bytes it changes to its end.
    ChangedSuffix,
}

impl Tear {
    /// The tears every crash point is tried with: in the middle of what changes,
    /// nothing, everything, and torn after 1 byte, after a CRC and flag (5 bytes),
    /// after one 512-byte sector, and the same from the end.
    pub const ALL: [Tear; 10] = [
        Tear::ChangedPrefix,
        Tear::ChangedSuffix,
        Tear::Lost,
        Tear::Full,
        Tear::Prefix(1),
        Tear::Prefix(5),
        Tear::Prefix(512),
        Tear::Suffix(1),
        Tear::Suffix(5),
        Tear::Suffix(512),
    ];

    /// The byte range of `new` that reaches the medium, where `old` is what the
    /// medium held there.
    fn range(self, old: &[u8], new: &[u8]) -> (usize, usize) {
        let len = new.len();
        let changed = || {
            let differs = |i: &usize| old.get(*i) != Some(&new[*i]);
            let first = (0..len).find(differs)?;
            let last = (0..len).rev().find(differs)?;
            Some(first + (last + 1 - first) / 2)
        };
        match self {
            Tear::ChangedPrefix => changed().map_or((0, 0), |mid| (0, mid)),
            Tear::ChangedSuffix => changed().map_or((0, 0), |mid| (mid, len)),
            Tear::Lost => (0, 0),
            Tear::Full => (0, len),
            Tear::Prefix(n) => (0, n.min(len.saturating_sub(1))),
            Tear::Suffix(n) => (len - n.min(len.saturating_sub(1)), len),
        }
    }
}

/// Which image of each file survives a reboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// What was synced: unsynced writes are lost.
    Durable,
    /// Everything written, including the torn last write.
    Live,
}

impl Image {
    /// Both images.
    pub const ALL: [Image; 2] = [Image::Durable, Image::Live];
}

#[derive(Debug, Default, Clone)]
struct File {
    live: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Debug, Default)]
struct DiskState {
    files: BTreeMap<String, File>,
    ops: u64,
    crash_at: Option<u64>,
    tear: Option<Tear>,
    crashed: bool,
}

/// A simulated disk of named files that can lose power at any write. Clones share
/// the same disk.
#[derive(Debug, Clone, Default)]
pub struct CrashDisk {
    state: Arc<Mutex<DiskState>>,
}

fn crashed() -> io::Error {
    io::Error::other("simulated power loss")
}

impl CrashDisk {
    /// An empty disk that never crashes until told to.
    pub fn new() -> CrashDisk {
        CrashDisk::default()
    }

    fn lock(&self) -> MutexGuard<'_, DiskState> {
        // A panic while holding the lock is a test failure already; keep going so the
        // panic message, not a poison error, is what the test reports.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// A storage handle for file `name` (created empty if missing).
    pub fn storage(&self, name: &str) -> CrashStorage {
        self.lock().files.entry(name.to_string()).or_default();
        CrashStorage {
            disk: self.clone(),
            name: name.to_string(),
        }
    }

    /// Sets file `name` to `bytes`, durable, without counting an operation.
    pub fn put(&self, name: &str, bytes: &[u8]) {
        let file = File {
            live: bytes.to_vec(),
            durable: bytes.to_vec(),
        };
        self.lock().files.insert(name.to_string(), file);
    }

    /// The live image of file `name` (empty if it does not exist).
    pub fn live(&self, name: &str) -> Vec<u8> {
        self.lock()
            .files
            .get(name)
            .map(|f| f.live.clone())
            .unwrap_or_default()
    }

    /// The durable image of file `name` (empty if it does not exist).
    pub fn durable(&self, name: &str) -> Vec<u8> {
        self.lock()
            .files
            .get(name)
            .map(|f| f.durable.clone())
            .unwrap_or_default()
    }

    /// Makes mutating operation number `op` (1-based, counted from now on across
    /// all files) crash with `tear`.
    pub fn crash_at(&self, op: u64, tear: Tear) {
        let mut state = self.lock();
        state.ops = 0;
        state.crash_at = Some(op);
        state.tear = Some(tear);
        state.crashed = false;
    }

    /// Mutating operations counted so far (since creation, reboot or `crash_at`).
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Whether the disk has lost power.
    pub fn has_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// The disk a rebooted machine sees: a new, independent disk holding `image` of
    /// every file, durable, with the operation counter at zero and no crash armed.
    pub fn reboot(&self, image: Image) -> CrashDisk {
        let state = self.lock();
        let files = state
            .files
            .iter()
            .map(|(name, f)| {
                let bytes = match image {
                    Image::Durable => f.durable.clone(),
                    Image::Live => f.live.clone(),
                };
                (
                    name.clone(),
                    File {
                        live: bytes.clone(),
                        durable: bytes,
                    },
                )
            })
            .collect();
        CrashDisk {
            state: Arc::new(Mutex::new(DiskState {
                files,
                ..DiskState::default()
            })),
        }
    }

    /// Counts one mutating operation and says how much of it to apply: `None` to
    /// apply it whole, `Some(tear)` when it is the crashing one. Errors once crashed.
    fn begin_op(state: &mut DiskState) -> io::Result<Option<Tear>> {
        if state.crashed {
            return Err(crashed());
        }
        state.ops += 1;
        if state.crash_at == Some(state.ops) {
            state.crashed = true;
            return Ok(Some(state.tear.unwrap_or(Tear::Lost)));
        }
        Ok(None)
    }
}

/// One file of a [`CrashDisk`].
#[derive(Debug, Clone)]
pub struct CrashStorage {
    disk: CrashDisk,
    name: String,
}

impl CrashStorage {
    /// The file's name on its disk.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Storage for CrashStorage {
    fn len(&self) -> io::Result<u64> {
        let state = self.disk.lock();
        if state.crashed {
            return Err(crashed());
        }
        Ok(state
            .files
            .get(&self.name)
            .map_or(0, |f| f.live.len() as u64))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let state = self.disk.lock();
        if state.crashed {
            return Err(crashed());
        }
        let live = state
            .files
            .get(&self.name)
            .map(|f| f.live.as_slice())
            .unwrap_or(&[]);
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let src = live.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.disk.lock();
        let tear = CrashDisk::begin_op(&mut state)?;
        let file = state.files.entry(self.name.clone()).or_default();
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start + data.len();
        let old = file
            .live
            .get(start..end.min(file.live.len()))
            .unwrap_or(&[]);
        let (from, to) = tear.unwrap_or(Tear::Full).range(old, data);
        if tear.is_none() || from < to {
            if file.live.len() < end {
                file.live.resize(end, 0);
            }
            file.live[start + from..start + to].copy_from_slice(&data[from..to]);
        }
        match tear {
            None => Ok(()),
            Some(_) => Err(crashed()),
        }
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut state = self.disk.lock();
        let tear = CrashDisk::begin_op(&mut state)?;
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        let file = state.files.entry(self.name.clone()).or_default();
        // A resize is all or nothing: only a lost one is not applied.
        if tear != Some(Tear::Lost) {
            file.live.resize(len, 0);
        }
        match tear {
            None => Ok(()),
            Some(_) => Err(crashed()),
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        let mut state = self.disk.lock();
        if state.crashed {
            return Err(crashed());
        }
        let file = state.files.entry(self.name.clone()).or_default();
        file.durable = file.live.clone();
        Ok(())
    }
}

/// The two slots as files `a_name` and `b_name` of a [`CrashDisk`]. A slot's
/// capacity is its file's length, so put each slot at its size first.
#[derive(Debug, Clone)]
pub struct CrashSlots {
    disk: CrashDisk,
    names: [String; 2],
}

impl CrashSlots {
    /// Slots A and B in files `a_name` and `b_name` of `disk`.
    pub fn new(disk: &CrashDisk, a_name: &str, b_name: &str) -> CrashSlots {
        CrashSlots {
            disk: disk.clone(),
            names: [a_name.to_string(), b_name.to_string()],
        }
    }

    fn name(&self, slot: Slot) -> &str {
        match slot {
            Slot::A => &self.names[0],
            Slot::B => &self.names[1],
        }
    }
}

impl SlotStorage for CrashSlots {
    fn open(&self, slot: Slot, _writable: bool) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(self.disk.storage(self.name(slot))))
    }

    fn describe(&self, slot: Slot) -> String {
        format!("simulated {}", self.name(slot))
    }
}

/// An environment backend laid out on a [`CrashDisk`], for crash tests and the
/// simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// U-Boot, two copies of [`Backend::UBOOT_SIZE`] bytes in files `uboot.1` and
    /// `uboot.2`.
    UbootRedundant,
    /// U-Boot, one copy in file `uboot.1` (not power-safe).
    UbootSingle,
    /// GRUB env/lock blocks in files `grub1/env`, `grub1/lock`, `grub2/env`,
    /// `grub2/lock`.
    Grub,
    /// The file backend in files `env` and `env.2`.
    File,
}

impl Backend {
    /// Every backend.
    pub const ALL: [Backend; 4] = [
        Backend::UbootRedundant,
        Backend::UbootSingle,
        Backend::Grub,
        Backend::File,
    ];
    /// Size of each simulated U-Boot copy.
    pub const UBOOT_SIZE: usize = 0x2000;

    /// Opens this backend on `disk`.
    pub fn open(self, disk: &CrashDisk) -> Box<dyn Env> {
        let st = |name: &str| -> Box<dyn Storage> { Box::new(disk.storage(name)) };
        match self {
            Backend::UbootRedundant => Box::new(UbootEnv::new(
                vec![st("uboot.1"), st("uboot.2")],
                vec!["uboot.1".into(), "uboot.2".into()],
                Backend::UBOOT_SIZE,
            )),
            Backend::UbootSingle => Box::new(UbootEnv::new(
                vec![st("uboot.1")],
                vec!["uboot.1".into()],
                Backend::UBOOT_SIZE,
            )),
            Backend::Grub => Box::new(GrubEnv::new(
                [st("grub1/env"), st("grub2/env")],
                [st("grub1/lock"), st("grub2/lock")],
                ["grub1/env".into(), "grub2/env".into()],
            )),
            Backend::File => Box::new(FileEnv::new(
                [st("env"), st("env.2")],
                ["env".into(), "env.2".into()],
            )),
        }
    }

    /// The bootloader semantics that go with this backend.
    pub fn flavor(self) -> Flavor {
        match self {
            Backend::UbootRedundant | Backend::UbootSingle => Flavor::Uboot,
            Backend::Grub => Flavor::Grub,
            Backend::File => Flavor::File,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_tears_and_reboot_images() {
        let disk = CrashDisk::new();
        let mut s = disk.storage("f");
        s.write_at(0, b"aaaa").unwrap();
        s.sync().unwrap();
        disk.crash_at(2, Tear::Prefix(2));
        s.write_at(0, b"bbbb").unwrap();
        assert!(s.write_at(0, b"cccc").is_err());
        assert!(disk.has_crashed());
        assert!(s.sync().is_err());
        assert_eq!(disk.live("f"), b"ccbb");
        assert_eq!(disk.durable("f"), b"aaaa");
        assert_eq!(disk.reboot(Image::Durable).live("f"), b"aaaa");
        let live = disk.reboot(Image::Live);
        assert_eq!(live.durable("f"), b"ccbb");
        let mut s2 = live.storage("f");
        s2.write_at(4, b"d").unwrap();
        assert_eq!(live.live("f"), b"ccbbd");
    }

    #[test]
    fn suffix_and_lost_tears() {
        for (tear, want) in [
            (Tear::Suffix(2), &b"aacc"[..]),
            (Tear::Suffix(9), b"accc"),
            (Tear::Prefix(9), b"ccca"),
            (Tear::Lost, b"aaaa"),
            (Tear::Full, b"cccc"),
        ] {
            let disk = CrashDisk::new();
            disk.put("f", b"aaaa");
            disk.crash_at(1, tear);
            let mut s = disk.storage("f");
            assert!(s.write_at(0, b"cccc").is_err());
            assert_eq!(disk.live("f"), want, "{tear:?}");
        }
    }

    #[test]
    fn changed_tears_split_the_changed_range() {
        // Bytes 1..=7 change (6 and 7 extend the file): the middle is byte 4. A torn
        // extending write leaves the file extended with zeros where nothing landed.
        for (tear, want) in [
            (Tear::ChangedPrefix, &b"axyzef\0\0"[..]),
            (Tear::ChangedSuffix, b"abcdwvuf"),
        ] {
            let disk = CrashDisk::new();
            disk.put("f", b"abcdef");
            disk.crash_at(1, tear);
            let mut s = disk.storage("f");
            assert!(s.write_at(0, b"axyzwvuf").is_err());
            assert_eq!(disk.live("f"), want, "{tear:?}");
        }
    }
}
