//! Disk images built without loop devices or mounts: cpio archives (initramfs),
//! ext4 file systems from a directory (`mkfs.ext4 -d`), a FAT ESP filled with
//! mtools, and a GPT disk assembled in a plain file.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use crate::host::run;

/// 1 MiB.
pub const MIB: u64 = 1 << 20;

/// One entry of a cpio archive.
#[derive(Debug)]
pub enum Entry {
    /// A directory.
    Dir(String),
    /// A file with its mode bits and contents.
    File(String, u32, Vec<u8>),
    /// A symbolic link and its target.
    Symlink(String, String),
}

/// Writes a `newc` cpio archive (what the kernel unpacks as an initramfs).
/// Parents must come before their children.
pub fn cpio(entries: &[Entry]) -> Vec<u8> {
    fn pad4(out: &mut Vec<u8>) {
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    let trailer = Entry::File("TRAILER!!!".into(), 0, Vec::new());
    for (ino, entry) in entries.iter().chain([&trailer]).enumerate() {
        let (name, mode, data): (&str, u32, &[u8]) = match entry {
            Entry::Dir(name) => (name, 0o040_755, &[]),
            Entry::File(name, mode, data) if name == "TRAILER!!!" => (name, *mode, data),
            Entry::File(name, mode, data) => (name, 0o100_000 | mode, data),
            Entry::Symlink(name, target) => (name, 0o120_777, target.as_bytes()),
        };
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        let fields = [
            ino as u64 + 1,
            u64::from(mode),
            0,
            0,
            nlink,
            0,
            data.len() as u64,
            0,
            0,
            0,
            0,
            name.len() as u64 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad4(&mut out);
        out.extend_from_slice(data);
        pad4(&mut out);
    }
    out
}

/// Extra `mkfs.ext4` options: GRUB 2.06 cannot read file systems with the
/// `orphan_file` or `metadata_csum_seed` features that newer e2fsprogs enable.
fn ext4_compat_options() -> Vec<&'static str> {
    let conf = fs::read_to_string("/etc/mke2fs.conf").unwrap_or_default();
    if conf.contains("orphan_file") {
        vec!["-O", "^orphan_file,^metadata_csum_seed"]
    } else {
        Vec::new()
    }
}

/// Whether an ext4 file system gets a journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journal {
    /// A journal: the data partition and the root slots. A journaled root mounted
    /// read-only changes blocks of its block device's page cache without writing
    /// them, so buffered reads of the running slot differ from its on-disk (and
    /// released) bytes; Shoal reads slots with `O_DIRECT`, and the test checks
    /// both that the difference is there and that Shoal is not fooled by it.
    Yes,
    /// No journal (the USB stick, which nothing writes).
    No,
}

/// Makes an ext4 image of `size` bytes at `image` holding the tree under `dir`
/// (`None`: empty). Fixed UUID, hash seed and time, so two images of similar trees
/// share most of their blocks.
pub fn ext4(image: &Path, label: &str, size: u64, dir: Option<&Path>, journal: Journal) {
    let _ = fs::remove_file(image);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", label]);
    // A fixed UUID per label.
    let uuid = format!(
        "5a0a1000-0000-4000-8000-{:012x}",
        label
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(u64::from(b)))
            & 0xffff_ffff_ffff
    );
    cmd.args(["-U", &uuid]);
    cmd.args(["-E", "hash_seed=5a0a1000-0000-4000-8000-00000000cafe"]);
    cmd.args(["-b", "4096", "-m", "0", "-T", "default"]);
    cmd.args(ext4_compat_options());
    if journal == Journal::No {
        cmd.args(["-O", "^has_journal"]);
    }
    cmd.env("E2FSPROGS_FAKE_TIME", "1700000000");
    if let Some(dir) = dir {
        cmd.arg("-d").arg(dir);
    }
    cmd.arg(image).arg(format!("{}k", size / 1024));
    run(&mut cmd);
}

/// Makes a FAT ESP image of `size` bytes holding `files` (path on the ESP, data).
pub fn esp(image: &Path, size: u64, files: &[(&str, &[u8])], scratch: &Path) {
    let _ = fs::remove_file(image);
    run(Command::new("mkfs.fat")
        .args(["-F", "16", "-n", "ESP", "-C"])
        .arg(image)
        .arg((size / 1024).to_string()));
    let img = image.to_str().expect("UTF-8 path");
    let mut made: Vec<String> = Vec::new();
    for (path, data) in files {
        let mut parent = String::new();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for dir in &parts[..parts.len() - 1] {
            parent = format!("{parent}/{dir}");
            if !made.contains(&parent) {
                run(Command::new("mmd").args(["-i", img, &format!("::{parent}")]));
                made.push(parent.clone());
            }
        }
        let src = scratch.join("esp-file");
        fs::write(&src, data).expect("write ESP file");
        run(Command::new("mcopy")
            .args(["-o", "-i", img])
            .arg(&src)
            .arg(format!("::{path}")));
    }
}

/// A partition of the test disk.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    /// GPT type code for `sgdisk`.
    pub type_code: &'static str,
    /// GPT partition name.
    pub name: &'static str,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Creates a GPT disk at `disk` with `parts` (in order, numbered from 1) and copies
/// `contents[i]` (an image file, if any) into partition `i`, skipping zero blocks so
/// the disk stays sparse.
pub fn gpt_disk(disk: &Path, parts: &[Part], contents: &[Option<&Path>]) {
    let end = parts.iter().map(|p| p.offset + p.size).max().unwrap_or(0) + MIB;
    let _ = fs::remove_file(disk);
    fs::File::create(disk)
        .and_then(|f| f.set_len(end))
        .expect("create disk file");
    let mut cmd = Command::new("sgdisk");
    cmd.arg("-o");
    for (i, p) in parts.iter().enumerate() {
        let n = i + 1;
        cmd.arg(format!("-n{n}:{}:+{}K", p.offset / 512, p.size / 1024));
        cmd.arg(format!("-t{n}:{}", p.type_code));
        cmd.arg(format!("-c{n}:{}", p.name));
    }
    run(cmd.arg(disk));
    for (p, content) in parts.iter().zip(contents) {
        if let Some(image) = content {
            copy_into(image, disk, p.offset, p.size);
        }
    }
}

/// Copies the file `image` into `disk` at `offset`; it must fit in `size` bytes.
pub fn copy_into(image: &Path, disk: &Path, offset: u64, size: u64) {
    let mut src = fs::File::open(image).expect("open image");
    let len = src.metadata().expect("image metadata").len();
    assert!(
        len <= size,
        "{} ({len} bytes) does not fit in {size} bytes",
        image.display()
    );
    let mut dst = fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .expect("open disk");
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    loop {
        let n = src.read(&mut buf).expect("read image");
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(offset + at)).expect("seek disk");
            dst.write_all(&buf[..n]).expect("write disk");
        }
        at += n as u64;
    }
    dst.sync_all().expect("sync disk");
}
