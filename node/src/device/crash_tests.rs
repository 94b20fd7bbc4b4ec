//! The real driver (engine + redb store + bootctl) against bootctl's crash disk: the
//! power is cut at every write of an install, with torn writes and with either disk
//! image surviving; after each cut the bootloader still picks a slot holding a
//! complete verified image, and rerunning the install completes without rewriting
//! what the journal recorded. The redb store lives on the same crash disk (a file
//! "store" behind redb's `StorageBackend`), so the cuts hit its writes too.

use std::io::Cursor;
use std::sync::Mutex;

use shoal_artifact::{BuildOptions, Chunking, PayloadKind};
use shoal_bootctl::control::Detect;
use shoal_bootctl::scheme::{Flavor, Scheme};
use shoal_bootctl::storage::Storage as _;
use shoal_bootctl::testing::{Backend, CrashDisk, CrashSlots, CrashStorage, Image, Tear};
use shoal_bootctl::{BootControl, Slot};
use shoal_signing::{SecretKey, TrustRoot};

use super::store::Store;
use super::{Device, InstallReport, Source};
use crate::config::Config;

const SIZE: usize = 1024 * 1024;
const SLOT: usize = SIZE + 64 * 1024;
const CHUNKING: Chunking = Chunking {
    min_size: 2048,
    avg_size: 8192,
    max_size: 32768,
};

/// Pseudo-random (xorshift) bytes.
pub(crate) fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub(super) struct Fixture {
    pub(super) root: TrustRoot,
    pub(super) factory: Vec<u8>,
    pub(super) v2: Vec<u8>,
    pub(super) artifact: Vec<u8>,
}

pub(super) fn fixture() -> Fixture {
    let key = SecretKey::from_seed(&[9; 32]);
    let root = TrustRoot::new(1, u64::MAX, &[key.public()], 1, &[key.public()], 1).expect("root");
    let factory = bytes(1, SIZE);
    let mut v2 = factory.clone();
    v2[200_000..500_000].copy_from_slice(&bytes(2, 300_000));
    let opts = BuildOptions {
        name: "acme-os".into(),
        version: "2.0".into(),
        device_types: vec!["board".into()],
        security_counter: 2,
        provides: Default::default(),
        depends: Default::default(),
        payload_name: "rootfs".into(),
        payload_kind: PayloadKind::RootfsImage,
        chunking: CHUNKING,
        zstd_level: 3,
        layout: shoal_artifact::write::Layout::Data,
        dictionary: false,
        manifest_delta: false,
    };
    let spool = tempfile::tempdir().expect("tempdir");
    let mut artifact = Vec::new();
    shoal_artifact::build(
        Cursor::new(&v2),
        &opts,
        std::slice::from_ref(&key),
        None,
        spool.path(),
        &mut artifact,
        |_| {},
    )
    .expect("build");
    Fixture {
        root,
        factory,
        v2,
        artifact,
    }
}

fn config() -> Config {
    let text = r#"
        [device]
        type = "board"
        data_dir = "/unused"
        trust_root = "/unused"
        reboot_command = []
        [install]
        journal_batch_mib = 1
        [slots]
        a = { path = "/unused/a" }
        b = { path = "/unused/b" }
        [bootloader]
        type = "file"
        path = "/unused/env"
    "#;
    Config::parse(text, std::path::Path::new("test.toml")).expect("config")
}

/// A fresh disk: the factory image in A, B zeroed, the file bootloader on A.
pub(super) fn fresh_disk(f: &Fixture) -> CrashDisk {
    let disk = CrashDisk::new();
    let mut a = f.factory.clone();
    a.resize(SLOT, 0);
    disk.put("a", &a);
    disk.put("b", &vec![0u8; SLOT]);
    let mut env = Backend::File.open(&disk);
    env.store(&Scheme::Shoal.initial(Flavor::File, Slot::A))
        .expect("provision");
    // The store file exists before any cut, as on a device (it is created whole,
    // under a temporary name, then renamed: `Store::open`).
    drop(
        Store::open_with_backend(StoreFile::new(&disk), "crash-disk/store".into())
            .expect("create the store"),
    );
    disk
}

/// Power cuts that landed on a write of the device store (the redb file), over the
/// whole test run.
static STORE_CUTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The device store's file on the crash disk, for redb. Counts the power cuts that
/// land on its own writes ([`STORE_CUTS`]), so the test shows they do.
#[derive(Debug)]
struct StoreFile {
    file: Mutex<CrashStorage>,
    disk: CrashDisk,
}

impl StoreFile {
    fn new(disk: &CrashDisk) -> StoreFile {
        StoreFile {
            file: Mutex::new(disk.storage("store")),
            disk: disk.clone(),
        }
    }

    fn storage(&self) -> std::sync::MutexGuard<'_, CrashStorage> {
        self.file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs a mutating operation, counting it when it is the one the power went out at.
    fn mutate(
        &self,
        op: impl FnOnce(&mut CrashStorage) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let before = self.disk.has_crashed();
        let result = op(&mut self.storage());
        if !before && self.disk.has_crashed() {
            STORE_CUTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }
}

impl redb::StorageBackend for StoreFile {
    fn len(&self) -> std::io::Result<u64> {
        self.storage().len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.storage().read_at(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.mutate(|s| s.set_len(len))
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.mutate(|s| s.sync())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.mutate(|s| s.write_at(offset, data))
    }
}

pub(super) fn device(f: &Fixture, disk: &CrashDisk, data: &std::path::Path) -> Device {
    try_device(f, disk, data).expect("device")
}

/// The device, or why it cannot open (a cut while the store is created).
fn try_device(f: &Fixture, disk: &CrashDisk, _data: &std::path::Path) -> anyhow::Result<Device> {
    try_device_with_slots(f, disk, Box::new(CrashSlots::new(disk, "a", "b")))
}

/// The device, its slots opened through `slots` (over the disk's "a" and "b").
pub(super) fn try_device_with_slots(
    f: &Fixture,
    disk: &CrashDisk,
    slots: Box<dyn shoal_bootctl::control::SlotStorage>,
) -> anyhow::Result<Device> {
    let boot = BootControl::new(
        Backend::File.open(disk),
        Scheme::Shoal,
        Flavor::File,
        slots,
        Detect::Bootloader,
    );
    let store = Store::open_with_backend(StoreFile::new(disk), "crash-disk/store".into())?;
    Device::from_parts(config(), f.root.clone(), store, boot)
}

pub(super) fn install(f: &Fixture, dev: &mut Device) -> anyhow::Result<InstallReport> {
    let source = Source::Artifact {
        name: "test.shoal".into(),
        reader: super::ArtifactInput::Stream(Box::new(Cursor::new(f.artifact.clone()))),
    };
    dev.install(source, false, &mut |_| {})
}

fn next_boot(disk: &CrashDisk) -> Slot {
    let vars = Backend::File
        .open(disk)
        .load()
        .expect("env readable after any cut");
    Scheme::Shoal
        .decode(&vars, Flavor::File)
        .expect("valid boot state")
        .next_boot()
}

#[test]
fn power_cut_at_every_write_of_an_install() {
    let f = fixture();
    // A clean run, to count the disk operations.
    let disk = fresh_disk(&f);
    let data = tempfile::tempdir().expect("tempdir");
    let before = disk.ops();
    let r = install(&f, &mut device(&f, &disk, data.path())).expect("clean install");
    assert_eq!(r.written_bytes, SIZE as u64);
    assert!(r.reused_bytes > (SIZE / 2) as u64, "{r:?}");
    let total = disk.ops() - before;
    assert!(total >= 5, "operations: {total}");
    assert_eq!(&disk.live("b")[..SIZE], &f.v2[..]);

    let mut cuts = 0;
    for n in 1..=total {
        // A torn write whose surviving image holds it, and a whole write that is lost.
        for (tear, image) in [
            (Tear::ChangedPrefix, Image::Live),
            (Tear::Full, Image::Durable),
        ] {
            let disk = fresh_disk(&f);
            let data = tempfile::tempdir().expect("tempdir");
            disk.crash_at(n, tear);
            // Whether the power went out before the install returned (and not in
            // closing the store after it: redb writes its clean-shutdown mark on
            // drop, after everything the install needed was durable).
            let mut cut_while_installing = true;
            let result = try_device(&f, &disk, data.path()).and_then(|mut dev| {
                let r = install(&f, &mut dev);
                cut_while_installing = disk.has_crashed();
                r
            });
            assert!(
                disk.has_crashed(),
                "cut {n}: the install did not reach it ({result:?})"
            );
            assert!(
                result.is_err() || !cut_while_installing,
                "cut {n}: an install that lost power reported success"
            );
            cuts += 1;
            let disk = disk.reboot(image);

            // Safety: whatever boots next holds a complete, verified image.
            match next_boot(&disk) {
                Slot::A => assert_eq!(
                    &disk.live("a")[..SIZE],
                    &f.factory[..],
                    "cut {n} {tear:?} {image:?}"
                ),
                Slot::B => assert_eq!(
                    &disk.live("b")[..SIZE],
                    &f.v2[..],
                    "cut {n} {tear:?} {image:?}"
                ),
            }

            // Liveness: the rerun completes and honours the journal.
            let mut dev = device(&f, &disk, data.path());
            let (status, _) = dev.status().expect("status");
            let journal = status.deployment.map_or(0, |d| {
                if d.phase == shoal_engine::Phase::Fetching {
                    d.journal_bytes
                } else {
                    SIZE as u64
                }
            });
            let r = install(&f, &mut dev)
                .unwrap_or_else(|e| panic!("cut {n} {tear:?} {image:?}: rerun failed: {e:#}"));
            assert!(
                r.resumed_bytes >= journal,
                "cut {n}: journal had {journal}, rerun resumed {}",
                r.resumed_bytes
            );
            assert_eq!(r.resumed_bytes + r.written_bytes, SIZE as u64);
            assert_eq!(
                &disk.live("b")[..SIZE],
                &f.v2[..],
                "cut {n} {tear:?} {image:?}"
            );
            assert_eq!(next_boot(&disk), Slot::B, "cut {n}: trial armed");
        }
    }
    let store_cuts = STORE_CUTS.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{cuts} power cuts over {total} write operations, {store_cuts} in the device store");
    assert!(cuts >= 15, "{cuts} cuts");
    // The cuts hit the redb store's own writes too (its commits and their syncs),
    // not only the slots and the bootloader environment (issue 10).
    assert!(store_cuts >= 4, "{store_cuts} cuts in the device store");
}

/// A cut of `n` chunks, each id distinct (`seed` apart), as a driver writes it.
fn cut_of(seed: u8, n: usize) -> Vec<(u64, shoal_artifact::ChunkId, u32)> {
    (0..n)
        .map(|k| {
            let mut id = [seed; 32];
            id[..8].copy_from_slice(&(k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
            (k as u64 * 8192, shoal_artifact::ChunkId(id), 8192)
        })
        .collect()
}

/// The slot's index as the store reads it: `(id, offset, len)` in id order.
fn read_index(store: &Store, slot: Slot) -> Vec<(shoal_artifact::ChunkId, u64, u32)> {
    use shoal_engine::IndexReader as _;
    let mut got = Vec::new();
    store
        .index_reader()
        .scan(slot, &shoal_artifact::ChunkId([0; 32]), &mut |id, o, l| {
            got.push((*id, o, l));
            true
        })
        .expect("scan");
    got
}

/// A slot index written in batches ([`Store::write_slot_index`], then the
/// engine's record) over a complete one, with the power cut at every few writes
/// of the store on the way: after the reboot neither the old index nor the half
/// written one is trusted (no chunking recorded: the engine takes none), and
/// writing it again leaves exactly the new one.
#[test]
fn a_slot_index_written_in_batches_is_not_trusted_half_written() {
    use shoal_engine::Record;
    let old = cut_of(1, 3000);
    let new = cut_of(2, super::store::INDEX_BATCH * 2 + 700);
    let record = |n: u64| Record::SlotIndexWritten {
        slot: Slot::A,
        chunking: CHUNKING,
        chunks: n,
    };
    let start = |disk: &CrashDisk| {
        let store = Store::open_with_backend(StoreFile::new(disk), "crash-disk/store".into())
            .expect("open");
        store.apply(&[Record::Active(Slot::A)]).expect("active");
        let n = store.write_slot_index(Slot::A, &old).expect("old index");
        store.apply(&[record(n)]).expect("record");
        store
    };
    // A clean run, to count the store's writes.
    let disk = CrashDisk::new();
    let store = start(&disk);
    assert_eq!(
        store.load(Slot::A, [0, 0]).expect("load").active_index,
        Some(CHUNKING)
    );
    disk.crash_at(u64::MAX, Tear::Full);
    let n = store.write_slot_index(Slot::A, &new).expect("new index");
    assert_eq!(n, new.len() as u64);
    let total = disk.ops();
    assert!(total >= 6, "three batches and the clearing: {total} writes");
    drop(store);
    let mut cuts = 0;
    for at in (1..=total).step_by((total as usize / 12).max(1)) {
        for (tear, image) in [
            (Tear::ChangedPrefix, Image::Live),
            (Tear::Full, Image::Durable),
        ] {
            let disk = CrashDisk::new();
            let store = start(&disk);
            disk.crash_at(at, tear);
            let written = store.write_slot_index(Slot::A, &new);
            assert!(disk.has_crashed(), "cut {at}: not reached");
            assert!(
                written.is_err(),
                "cut {at}: a write that lost power succeeded"
            );
            drop(store);
            cuts += 1;
            let disk = disk.reboot(image);
            let store = Store::open_with_backend(StoreFile::new(&disk), "crash-disk/store".into())
                .expect("reopen after the cut");
            let state = store.load(Slot::A, [0, 0]).expect("load");
            // The old index survives only when the cut came before the first
            // transaction committed; then it is whole.
            if state.active_index.is_some() {
                assert_eq!(
                    read_index(&store, Slot::A).len(),
                    old.len(),
                    "cut {at} {tear:?}: an index trusted is the old one, whole"
                );
                assert!(
                    read_index(&store, Slot::A)
                        .iter()
                        .all(|(id, _, _)| id.0[8] == 1),
                    "cut {at} {tear:?}: nothing of the new one"
                );
            }
            // Cut again: exactly the new index.
            let n = store.write_slot_index(Slot::A, &new).expect("rewrite");
            store.apply(&[record(n)]).expect("record");
            assert_eq!(
                store.load(Slot::A, [0, 0]).expect("load").active_index,
                Some(CHUNKING)
            );
            let mut want: Vec<_> = new.iter().map(|&(o, id, l)| (id, o, l)).collect();
            want.sort_by_key(|c| c.0);
            assert_eq!(read_index(&store, Slot::A), want, "cut {at} {tear:?}");
        }
    }
    assert!(cuts >= 12, "{cuts} cuts");
}
