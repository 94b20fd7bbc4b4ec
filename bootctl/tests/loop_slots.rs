//! Slots on real block devices: a loop device with an MBR of two partitions, added
//! with `partx`, so the kernel makes `/dev/loopNp1` and `/dev/loopNp2` and sysfs places them on the disk.
//! Regression for issue 9, item 1 (a slot path naming the other slot's bytes through
//! a symlink, or the whole disk at an offset inside the other slot's partition).
//!
//! Needs root, `losetup` and `partx` (Debian package `util-linux`), as CI has; it fails, never
//! skips, without them.

use std::path::{Path, PathBuf};
use std::process::Command;

use shoal_bootctl::Slot;
use shoal_bootctl::config::{
    BootloaderConfig, BootloaderType, BuildError, DetectConfig, DetectFrom, SchemeName, SlotConfig,
    SlotsConfig, build,
};
use shoal_bootctl::env::Env;
use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::scheme::{Flavor, Scheme};

const SECTOR: u64 = 512;
/// Partition 1: sectors 2048..4096; partition 2: sectors 4096..6144; disk 8192.
const P1: (u64, u64) = (2048, 2048);
const P2: (u64, u64) = (4096, 2048);
const DISK_SECTORS: u64 = 8192;

/// A loop device over a disk image, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Drop for Loop {
    fn drop(&mut self) {
        // Partitions added with BLKPG outlive the loop binding otherwise.
        let _ = Command::new("partx")
            .arg("--delete")
            .arg(&self.dev)
            .status();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn mbr_entry(start: u64, len: u64) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[4] = 0x83; // Linux
    e[8..12].copy_from_slice(&u32::try_from(start).unwrap().to_le_bytes());
    e[12..16].copy_from_slice(&u32::try_from(len).unwrap().to_le_bytes());
    e
}

fn loop_disk(image: &Path) -> Loop {
    let mut disk = vec![0u8; (DISK_SECTORS * SECTOR) as usize];
    disk[446..462].copy_from_slice(&mbr_entry(P1.0, P1.1));
    disk[462..478].copy_from_slice(&mbr_entry(P2.0, P2.1));
    disk[510] = 0x55;
    disk[511] = 0xaa;
    std::fs::write(image, disk).unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(image)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run losetup ({e}): install the Debian package util-linux")
        });
    assert!(
        out.status.success(),
        "losetup failed (this test needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let l = Loop { dev };
    // `partx --update` tells the kernel the partitions (BLKPG), also where it does not
    // parse partition tables itself; devtmpfs makes the nodes.
    let status = Command::new("partx")
        .arg("--update")
        .arg(&l.dev)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run partx ({e}): install the Debian package util-linux")
        });
    assert!(
        status.success(),
        "partx --update {} failed",
        l.dev.display()
    );
    for _ in 0..100 {
        if part(&l, 2).exists() {
            return l;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{} did not appear", part(&l, 2).display());
}

fn part(l: &Loop, n: u32) -> PathBuf {
    PathBuf::from(format!("{}p{n}", l.dev.display()))
}

fn slot(path: &Path, offset: u64, size: Option<u64>) -> SlotConfig {
    SlotConfig {
        path: path.to_path_buf(),
        offset,
        size,
        root_aliases: vec![],
    }
}

fn try_build(dir: &Path, a: SlotConfig, b: SlotConfig) -> Result<(), BuildError> {
    let env_path = dir.join("bootenv");
    if !env_path.exists() {
        let mut env = FileEnv::open(&env_path, true).unwrap();
        env.store(&Scheme::Shoal.initial(Flavor::File, Slot::A))
            .unwrap();
    }
    let slots = SlotsConfig {
        a,
        b,
        detect: DetectConfig {
            from: DetectFrom::Bootloader,
            ..DetectConfig::default()
        },
    };
    let bootloader = BootloaderConfig {
        kind: BootloaderType::File,
        scheme: SchemeName::Shoal,
        fw_env_config: None,
        allow_single_copy: false,
        grub_dir: None,
        grub_prefix: None,
        path: Some(env_path),
        mender_part_a: None,
        mender_part_b: None,
    };
    let control = build(&slots, &bootloader, true)?;
    // Distinct slots can be written.
    control.open_writer(Slot::B, 512).unwrap();
    Ok(())
}

#[test]
fn partitions_symlinks_and_the_whole_disk_are_resolved_to_their_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let l = loop_disk(&dir.path().join("disk.img"));
    let (p1, p2) = (part(&l, 1), part(&l, 2));

    // Two partitions: distinct.
    try_build(dir.path(), slot(&p1, 0, None), slot(&p2, 0, None)).unwrap();

    // Slot B a symlink to slot A's partition (a by-partlabel link).
    let link = dir.path().join("by-partlabel-rootfs-b");
    std::os::unix::fs::symlink(&p1, &link).unwrap();
    let err = try_build(dir.path(), slot(&p1, 0, None), slot(&link, 0, None)).unwrap_err();
    assert!(matches!(err, BuildError::SlotsOverlap { .. }), "{err}");

    // Slot B the whole disk, at an offset inside partition 1.
    let inside = (P1.0 + 8) * SECTOR;
    let err = try_build(
        dir.path(),
        slot(&p1, 0, None),
        slot(&l.dev, inside, Some(SECTOR)),
    )
    .unwrap_err();
    assert!(matches!(err, BuildError::SlotsOverlap { .. }), "{err}");
    // ... or the whole disk.
    let err = try_build(dir.path(), slot(&p1, 0, None), slot(&l.dev, 0, None)).unwrap_err();
    assert!(matches!(err, BuildError::SlotsOverlap { .. }), "{err}");

    // The whole disk at partition 2's sectors does not touch partition 1.
    try_build(
        dir.path(),
        slot(&p1, 0, None),
        slot(&l.dev, P2.0 * SECTOR, Some(P2.1 * SECTOR)),
    )
    .unwrap();
    // Nor does the region just before partition 1.
    try_build(
        dir.path(),
        slot(&p1, 0, None),
        slot(&l.dev, (P1.0 - 1) * SECTOR, Some(SECTOR)),
    )
    .unwrap();
}
