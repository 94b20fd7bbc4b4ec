//! What a slot really is on the machine: the bytes a path names, found through
//! symlinks, hard links, partitions and whole-disk device nodes.
//!
//! Two slot paths that differ as text can name the same bytes:
//! `/dev/disk/by-partlabel/rootfs-b` is a symlink to `/dev/mmcblk0p3`, a file can
//! have two names, and `/dev/mmcblk0` with an offset covers `/dev/mmcblk0p2`.
//! Writing "the other slot" through such a path destroys the running one, so slots
//! are compared by [`Extent`]: for a regular file its device and inode, for a block
//! device the whole disk it belongs to (`st_rdev`, and for a partition its parent
//! disk and sector range from `/sys/dev/block/MAJ:MIN/{partition,start,size}`), plus
//! the slot's byte range in that space.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The address space a slot's bytes live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// A regular file: its file system device and inode.
    File {
        /// `st_dev`.
        dev: u64,
        /// `st_ino`.
        ino: u64,
    },
    /// A whole disk (for a partition: the disk holding it), by device number.
    Disk {
        /// `st_rdev` of the whole-disk device.
        rdev: u64,
    },
    /// A block device whose disk is not known from sysfs: by its own device number.
    Device {
        /// `st_rdev`.
        rdev: u64,
    },
}

/// A slot's bytes: a range in a [`Space`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// The path after resolving symlinks.
    pub canonical: PathBuf,
    /// Where the bytes live.
    pub space: Space,
    /// First byte, in the space.
    pub start: u64,
    /// One past the last byte; `None`: to the end of the space.
    pub end: Option<u64>,
}

impl Extent {
    /// Whether two extents share a byte.
    pub fn overlaps(&self, other: &Extent) -> bool {
        self.space == other.space
            && other.end.is_none_or(|e| self.start < e)
            && self.end.is_none_or(|e| other.start < e)
    }
}

/// Where sysfs's block device directory is; a parameter so tests can fake it.
const SYS_DEV_BLOCK: &str = "/sys/dev/block";

/// Resolves the extent of `offset..offset + size` (to the end when `size` is
/// `None`) of `path`.
pub fn resolve(path: &Path, offset: u64, size: Option<u64>) -> io::Result<Extent> {
    resolve_in(Path::new(SYS_DEV_BLOCK), path, offset, size)
}

/// Like [`resolve`], with sysfs's `dev/block` directory at `sys_dev_block`.
pub fn resolve_in(
    sys_dev_block: &Path,
    path: &Path,
    offset: u64,
    size: Option<u64>,
) -> io::Result<Extent> {
    let canonical = std::fs::canonicalize(path)?;
    let meta = std::fs::metadata(&canonical)?;
    let region = |base: u64, len: Option<u64>| -> (u64, Option<u64>) {
        let start = base.saturating_add(offset);
        let own_end = size.map(|s| start.saturating_add(s));
        let parent_end = len.map(|l| base.saturating_add(l));
        let end = match (own_end, parent_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (start, end)
    };
    if meta.file_type().is_block_device() {
        let rdev = meta.rdev();
        let (space, base, len) = match block_place(sys_dev_block, rdev)? {
            Some(place) => (Space::Disk { rdev: place.disk }, place.start, place.len),
            None => (Space::Device { rdev }, 0, None),
        };
        let (start, end) = region(base, len);
        return Ok(Extent {
            canonical,
            space,
            start,
            end,
        });
    }
    let (start, end) = region(0, None);
    Ok(Extent {
        canonical,
        space: Space::File {
            dev: meta.dev(),
            ino: meta.ino(),
        },
        start,
        end,
    })
}

/// The extent of the block device that holds the root file system, `None` when `/`
/// is not on a block device sysfs knows (a tmpfs, an overlay, a container).
pub fn root_device() -> io::Result<Option<Extent>> {
    let dev = std::fs::metadata("/")?.dev();
    Ok(
        block_place(Path::new(SYS_DEV_BLOCK), dev)?.map(|place| Extent {
            canonical: PathBuf::from("/"),
            space: Space::Disk { rdev: place.disk },
            start: place.start,
            end: place.len.map(|l| place.start.saturating_add(l)),
        }),
    )
}

/// A block device's place on its disk.
struct Place {
    disk: u64,
    start: u64,
    len: Option<u64>,
}

/// Linux's device number layout (glibc `makedev`/`major`/`minor`).
fn major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)
}

fn minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)
}

fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0x0000_0fff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0x0000_00ff)
}

/// Reads a sysfs number file (sectors of 512 bytes for `start` and `size`).
fn read_number(path: &Path) -> io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} holds {:?}, not a number", path.display(), text.trim()),
        )
    })
}

/// Parses a sysfs `dev` file (`MAJ:MIN`).
fn read_devno(path: &Path) -> io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} holds {:?}, not MAJ:MIN", path.display(), text.trim()),
        )
    };
    let (maj, min) = text.trim().split_once(':').ok_or_else(bad)?;
    Ok(makedev(
        maj.parse().map_err(|_| bad())?,
        min.parse().map_err(|_| bad())?,
    ))
}

/// Where block device `rdev` is: a partition's parent disk and sector range, or a
/// whole disk. `None` when sysfs does not know the device (no sysfs mounted).
fn block_place(sys_dev_block: &Path, rdev: u64) -> io::Result<Option<Place>> {
    let link = sys_dev_block.join(format!("{}:{}", major(rdev), minor(rdev)));
    let dir = match std::fs::canonicalize(&link) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    const SECTOR: u64 = 512;
    let size = read_number(&dir.join("size"))?.saturating_mul(SECTOR);
    if dir.join("partition").exists() {
        let start = read_number(&dir.join("start"))?.saturating_mul(SECTOR);
        let parent = dir.parent().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("partition {} has no parent disk", dir.display()),
            )
        })?;
        let disk = read_devno(&parent.join("dev"))?;
        return Ok(Some(Place {
            disk,
            start,
            len: Some(size),
        }));
    }
    Ok(Some(Place {
        disk: rdev,
        start: 0,
        len: Some(size),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_round_trip() {
        for (maj, min) in [(8, 1), (179, 2), (259, 7), (7, 0), (4095, 1 << 19)] {
            let dev = makedev(maj, min);
            assert_eq!((major(dev), minor(dev)), (maj, min));
        }
        // glibc's layout for 8:1 (/dev/sda1).
        assert_eq!(makedev(8, 1), 0x801);
    }

    #[test]
    fn files_are_known_by_inode_through_symlinks_and_hard_links() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        std::fs::write(&a, [0u8; 100]).unwrap();
        let sym = dir.path().join("by-label-b");
        std::os::unix::fs::symlink(&a, &sym).unwrap();
        let hard = dir.path().join("hard.img");
        std::fs::hard_link(&a, &hard).unwrap();
        let other = dir.path().join("b.img");
        std::fs::write(&other, [0u8; 100]).unwrap();
        let whole = |p: &Path| resolve(p, 0, None).unwrap();
        assert!(whole(&a).overlaps(&whole(&sym)));
        assert!(whole(&a).overlaps(&whole(&hard)));
        assert!(!whole(&a).overlaps(&whole(&other)));
        assert_eq!(whole(&sym).canonical, std::fs::canonicalize(&a).unwrap());
        // Regions of one file: disjoint ones do not overlap, touching ones neither.
        let r = |o, s| resolve(&sym, o, s).unwrap();
        assert!(!r(0, Some(50)).overlaps(&resolve(&a, 50, None).unwrap()));
        assert!(r(0, Some(51)).overlaps(&resolve(&a, 50, None).unwrap()));
        assert!(r(60, None).overlaps(&resolve(&hard, 90, Some(1)).unwrap()));
    }

    /// A fake `/sys/dev/block` with disk 8:0 of 1000 sectors, partition 8:1 at
    /// sector 100 of 200 sectors and partition 8:2 at sector 300.
    fn fake_sysfs(root: &Path) -> PathBuf {
        let disk = root.join("devices/sda");
        for (dir, dev, size, start) in [
            (disk.clone(), "8:0", 1000, None),
            (disk.join("sda1"), "8:1", 200, Some(100)),
            (disk.join("sda2"), "8:2", 700, Some(300)),
        ] {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("dev"), format!("{dev}\n")).unwrap();
            std::fs::write(dir.join("size"), format!("{size}\n")).unwrap();
            if let Some(start) = start {
                std::fs::write(dir.join("partition"), "1\n").unwrap();
                std::fs::write(dir.join("start"), format!("{start}\n")).unwrap();
            }
        }
        let links = root.join("dev/block");
        std::fs::create_dir_all(&links).unwrap();
        for (name, target) in [("8:0", "sda"), ("8:1", "sda/sda1"), ("8:2", "sda/sda2")] {
            std::os::unix::fs::symlink(root.join("devices").join(target), links.join(name))
                .unwrap();
        }
        links
    }

    #[test]
    fn partitions_are_placed_on_their_disk() {
        let dir = tempfile::tempdir().unwrap();
        let sys = fake_sysfs(dir.path());
        let p1 = block_place(&sys, makedev(8, 1)).unwrap().unwrap();
        assert_eq!(
            (p1.disk, p1.start, p1.len),
            (makedev(8, 0), 100 * 512, Some(200 * 512))
        );
        let disk = block_place(&sys, makedev(8, 0)).unwrap().unwrap();
        assert_eq!(
            (disk.disk, disk.start, disk.len),
            (makedev(8, 0), 0, Some(1000 * 512))
        );
        assert!(block_place(&sys, makedev(8, 9)).unwrap().is_none());
        // A partition and the whole disk at an offset inside it overlap; the two
        // partitions do not.
        let on_disk = |start: u64, len: u64| Extent {
            canonical: PathBuf::new(),
            space: Space::Disk {
                rdev: makedev(8, 0),
            },
            start,
            end: Some(start + len),
        };
        let part1 = on_disk(p1.start, 200 * 512);
        let part2 = on_disk(300 * 512, 700 * 512);
        assert!(!part1.overlaps(&part2));
        assert!(part1.overlaps(&on_disk(150 * 512, 512)));
        assert!(!part1.overlaps(&on_disk(300 * 512, 512)));
    }
}
