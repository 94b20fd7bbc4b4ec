//! The storage seam: every byte bootctl reads or writes goes through [`Storage`].
//!
//! The trait is deliberately small (`len/read_at/write_at/set_len/sync`, like redb's
//! `StorageBackend`) so a crash backend can stand in for a disk in tests
//! (`testing::CrashDisk`) and every write can be counted and interrupted.
//!
//! [`FileStorage`] reads with `O_DIRECT` (see [`ReadMode`]): the bytes a slot is
//! indexed, served and verified from are the medium's, not the page cache's. A
//! block device's page cache is shared with a file system mounted from it, and a
//! journaled ext4 mounted read-only changes cached blocks it never writes back.
//! A regular file's direct reads go through an `io_uring`, one at a time: a
//! blocking direct read holds the file's lock (`i_rwsem` on ext4 and XFS) until the
//! medium answers, and a buffered write to the file waits that long, so a slot
//! file read back while it is written (the install's verifier) stalled its
//! writer (150 ms of the bench's delta install, session 16); queued through a ring
//! the read holds the lock only while it is queued.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A byte-addressed storage object: a file, a block device, a region of one, or a
/// simulated disk.
///
/// Writes are not durable until [`Storage::sync`] returns. Every power-safety
/// argument in this crate assumes exactly that and nothing more: a write that was not
/// followed by a completed `sync` may be lost or torn.
pub trait Storage: std::fmt::Debug + Send {
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether [`Storage::len`] is zero.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Fills `buf` from `offset`; reading past the end is an
    /// [`io::ErrorKind::UnexpectedEof`] error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes all of `data` at `offset`, extending the storage if it can grow.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Makes `len` bytes at `offset` read as zeros, extending the storage if it can
    /// grow; like [`Storage::write_at`] of zeros (and as durable: only after a
    /// sync). The default writes zeros; [`FileStorage`] asks the file system or
    /// device to zero the range without transferring the bytes.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        write_zero_bytes(self, offset, len)
    }

    /// Truncates or extends to `len` bytes. Fixed-size storage (a block device or a
    /// region) accepts only its own length.
    fn set_len(&mut self, len: u64) -> io::Result<()>;

    /// Makes every completed write durable.
    fn sync(&mut self) -> io::Result<()>;
}

/// Writes `len` zero bytes at `offset` of `storage`, a block at a time. The block
/// is allocated zeroed (untouched pages), not a static: a 64 KiB array of zeros
/// would be 64 KiB of the device binary.
fn write_zero_bytes<S: Storage + ?Sized>(storage: &mut S, offset: u64, len: u64) -> io::Result<()> {
    const BLOCK: u64 = 64 * 1024;
    let zeros = vec![0u8; len.min(BLOCK) as usize];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(BLOCK);
        storage.write_at(offset + at, &zeros[..n as usize])?;
        at += n;
    }
    Ok(())
}

impl<S: Storage + ?Sized> Storage for Box<S> {
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_at(offset, data)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn sync(&mut self) -> io::Result<()> {
        (**self).sync()
    }
}

/// Reads the whole storage into memory.
pub fn read_all(storage: &dyn Storage) -> io::Result<Vec<u8>> {
    let len = storage.len()?;
    let len = usize::try_from(len).map_err(|_| io::Error::other("storage too large to read"))?;
    let mut buf = vec![0; len];
    storage.read_at(0, &mut buf)?;
    Ok(buf)
}

/// How a [`FileStorage`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// `O_DIRECT`: every read goes to the medium, bypassing the page cache, in
    /// aligned blocks of `align` bytes (the requested bytes are copied out of them).
    /// Always the mode of a block device.
    Direct {
        /// Alignment of offsets, lengths and buffers, in bytes.
        align: usize,
    },
    /// Through the page cache: a regular file on a file system that refuses
    /// `O_DIRECT` (e.g. overlayfs over one without it). Writes and reads of such a
    /// file share one cache, so there is no stale view to avoid.
    Buffered,
}

/// Smallest alignment of direct reads: a multiple of every common logical block
/// size (512, 4096) and of the usual DMA alignment.
const DIRECT_ALIGN_MIN: usize = 4096;
/// Largest single direct read; larger requests are split (bounds the bounce buffer).
const DIRECT_IO_MAX: usize = 1024 * 1024;

/// A second descriptor of the same file, opened `O_RDONLY | O_DIRECT`.
#[derive(Debug)]
struct DirectReader {
    file: File,
    align: usize,
    /// An `io_uring` the reads of a regular file go through, waited for one at a
    /// time (see [`DirectReader::read_at`]); `None` for a block device, or when
    /// the kernel refused a ring (then `pread`).
    ring: std::sync::Mutex<Option<Ring>>,
}

/// An `io_uring` (its `Debug` says nothing).
struct Ring(io_uring::IoUring);

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ring")
    }
}

impl DirectReader {
    /// Opens `path` for direct reads. `Ok(None)` when a regular file's file
    /// system refuses `O_DIRECT` (at open or at the first read, both `EINVAL`); a
    /// block device must accept it.
    fn open(path: &Path, file: &File) -> io::Result<Option<DirectReader>> {
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let refused = |e: &io::Error| !block_device && e.raw_os_error() == Some(libc::EINVAL);
        let direct = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(direct) => direct,
            Err(e) if refused(&e) => {
                tracing::debug!(path = %path.display(), "O_DIRECT refused at open; reading through the page cache");
                return Ok(None);
            }
            Err(e) => return Err(direct_error(path, e)),
        };
        let align = if block_device {
            block_device_alignment(meta.rdev())
        } else {
            DIRECT_ALIGN_MIN
        };
        // A regular file's direct read holds the file's lock until the medium
        // answers when it is a blocking `pread` (ext4, XFS: `i_rwsem`, shared), and
        // every buffered write to the file (the slot being written, while its
        // written part is read back) waits for it; through a ring the lock is held
        // only while the read is queued. Block devices take no such lock.
        let ring = (!block_device)
            .then(|| io_uring::IoUring::new(2).ok())
            .flatten()
            .map(Ring);
        let ring = std::sync::Mutex::new(ring);
        let reader = DirectReader {
            file: direct,
            align,
            ring,
        };
        // Some file systems accept the flag at open and refuse the reads.
        let mut probe = AlignedBuf::new(align, align);
        match reader.read_full(probe.as_mut_slice(), 0) {
            Ok(_) => Ok(Some(reader)),
            Err(e) if refused(&e) => {
                tracing::debug!(path = %path.display(), "O_DIRECT refused at read; reading through the page cache");
                Ok(None)
            }
            Err(e) => Err(direct_error(path, e)),
        }
    }

    /// Reads into `buf` (aligned, a multiple of `align` long) from the aligned
    /// `pos` until it is full or the file ends; returns the bytes read.
    fn read_full(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.read_at(&mut buf[got..], pos + got as u64) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    // Only the end of a file gives a partial block; the next
                    // read would be unaligned.
                    if n % self.align != 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    /// One read of up to `buf.len()` bytes at `pos`, like `pread`: through the
    /// ring when there is one (it is given up for `pread` when it fails).
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = ring.as_mut() {
            match ring_read(&mut r.0, &self.file, buf, pos) {
                Ok(n) => return Ok(n),
                Err(RingError::Read(e)) => return Err(e),
                Err(RingError::Ring(e)) => {
                    // Given up: a read it did not take must never be submitted.
                    tracing::debug!(error = %e, "io_uring refused a read; reading with pread");
                    *ring = None;
                }
            }
        }
        drop(ring);
        self.file.read_at(buf, pos)
    }

    /// Fills `out` from byte `pos` of the file, reading the aligned blocks that
    /// cover it.
    fn read_exact_at(&self, mut out: &mut [u8], mut pos: u64) -> io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let align = self.align as u64;
        // An aligned buffer at an aligned offset is read into directly.
        if pos.is_multiple_of(align)
            && out.len().is_multiple_of(self.align)
            && out.as_ptr().addr().is_multiple_of(self.align)
        {
            let got = self.read_full(out, pos)?;
            if got < out.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "end of file at byte {} before the read ended",
                        pos + got as u64
                    ),
                ));
            }
            return Ok(());
        }
        let head_max = self.align - 1;
        let cover = (head_max + out.len())
            .next_multiple_of(self.align)
            .min(DIRECT_IO_MAX.max(self.align));
        let mut bounce = AlignedBuf::new(cover, self.align);
        while !out.is_empty() {
            let start = pos - pos % align;
            let head = (pos - start) as usize;
            let want = (head + out.len())
                .next_multiple_of(self.align)
                .min(bounce.len);
            let got = self.read_full(&mut bounce.as_mut_slice()[..want], start)?;
            if got <= head {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "end of file at byte {} before the read ended",
                        start + got as u64
                    ),
                ));
            }
            let take = (got - head).min(out.len());
            out[..take].copy_from_slice(&bounce.as_mut_slice()[head..head + take]);
            out = &mut out[take..];
            pos += take as u64;
        }
        Ok(())
    }
}

/// Why a read through a ring failed: the read itself (as `pread` would have), or
/// the ring (the read was not made; `pread` does it).
enum RingError {
    Read(io::Error),
    Ring(io::Error),
}

/// One read of up to `buf.len()` bytes at `pos` of `file` through `ring`, waited
/// for before returning.
fn ring_read(
    ring: &mut io_uring::IoUring,
    file: &File,
    buf: &mut [u8],
    pos: u64,
) -> Result<usize, RingError> {
    use std::os::fd::AsRawFd;
    // At most 4 GiB - 4 KiB at once (aligned); `read_full` reads on.
    let len = u32::try_from(buf.len()).unwrap_or(!0xfff);
    let read =
        io_uring::opcode::Read::new(io_uring::types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), len)
            .offset(pos)
            .build();
    #[allow(unsafe_code)]
    // SAFETY: the kernel writes into `buf` and reads `file`'s descriptor until the
    // read completes; both are borrowed for this whole function, which returns
    // only once the completion is taken, or once it is known that the kernel
    // never took the read (it is then still queued, and the ring is not
    // submitted again: the caller gives it up).
    let pushed = unsafe { ring.submission().push(&read) };
    pushed.map_err(|_| RingError::Ring(io::Error::other("the submission queue is full")))?;
    loop {
        let waited = ring.submit_and_wait(1);
        if let Some(done) = ring.completion().next() {
            let n = done.result();
            return match usize::try_from(n) {
                Ok(n) => Ok(n),
                Err(_) if matches!(-n, libc::EINVAL | libc::EOPNOTSUPP | libc::EAGAIN) => {
                    Err(RingError::Ring(io::Error::from_raw_os_error(-n)))
                }
                Err(_) => Err(RingError::Read(io::Error::from_raw_os_error(-n))),
            };
        }
        match waited {
            Ok(_) => {}
            Err(e) if ring.submission().is_empty() => {
                // Taken by the kernel: its completion must be waited for.
                if e.kind() != io::ErrorKind::Interrupted {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(RingError::Ring(e)),
        }
    }
}

fn direct_error(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot read {} with O_DIRECT: {e}", path.display()),
    )
}

/// The alignment for direct reads of the block device `rdev`: its logical block
/// size from sysfs (a partition's is its disk's), at least [`DIRECT_ALIGN_MIN`].
fn block_device_alignment(rdev: u64) -> usize {
    let dev = format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev));
    let logical = [
        format!("{dev}/queue/logical_block_size"),
        format!("{dev}/../queue/logical_block_size"),
    ]
    .iter()
    .find_map(|p| {
        std::fs::read_to_string(p)
            .ok()?
            .trim()
            .parse::<usize>()
            .ok()
    })
    .filter(|n| n.is_power_of_two());
    logical.map_or(DIRECT_ALIGN_MIN, |n| n.max(DIRECT_ALIGN_MIN))
}

/// A zeroed buffer of `len` bytes whose start is aligned to `align`, without
/// `unsafe`: an over-allocated `Vec` and the aligned window inside it.
struct AlignedBuf {
    backing: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> AlignedBuf {
        let backing = vec![0u8; len + align];
        let misalign = backing.as_ptr().addr() % align;
        let start = (align - misalign) % align;
        AlignedBuf {
            backing,
            start,
            len,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.backing[self.start..self.start + self.len]
    }
}

/// Starts writing back `len` bytes at `pos` of `file` without waiting for them, so
/// the medium works while the writer goes on and the next [`Storage::sync`] finds
/// little left to do: Linux's `sync_file_range(SYNC_FILE_RANGE_WRITE)` queues the
/// range's dirty pages for writeback and returns (on files and block devices
/// alike). Not `POSIX_FADV_DONTNEED`, which also starts writeback but then tries to
/// drop the range's pages: those just written are dirty or under writeback, so it
/// fails on them and drains every CPU's page lists (`lru_add_drain_all`) on each
/// call, which a writer that runs ahead of the medium pays for every write. Only a
/// hint: durability still comes from `sync` alone, and a failure here is ignored
/// (`sync` reports write errors).
fn start_writeback(file: &File, pos: u64, len: usize) {
    use std::os::fd::AsRawFd;
    let (Ok(pos), Ok(len)) = (i64::try_from(pos), i64::try_from(len)) else {
        return;
    };
    if len == 0 {
        return;
    }
    #[allow(unsafe_code)]
    // SAFETY: `sync_file_range` reads no memory of this process; the descriptor is
    // open for as long as `file` is borrowed.
    let _ =
        unsafe { libc::sync_file_range(file.as_raw_fd(), pos, len, libc::SYNC_FILE_RANGE_WRITE) };
}

/// A [`Storage`] over a file or block device, optionally restricted to the region
/// `offset..offset + size`.
///
/// A region (or a block device) has a fixed size: writes past its end fail with
/// [`io::ErrorKind::InvalidInput`] and [`Storage::set_len`] accepts only the current
/// length. A plain file without a region grows on write and can be truncated.
///
/// Reads use `O_DIRECT` ([`ReadMode::Direct`]) through a second, read-only
/// descriptor, so they return what is on the medium: for the running slot, not
/// the view of a file system mounted from it; for a slot just written and synced,
/// what reached the device. Writes stay buffered (a direct read first writes back
/// any dirty cached pages of its range, so reads see this storage's own writes).
/// A regular file whose file system refuses `O_DIRECT` is read through the page
/// cache ([`ReadMode::Buffered`]); a block device that refuses it fails to open.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    direct: Option<DirectReader>,
    path: PathBuf,
    offset: u64,
    size: Option<u64>,
    /// The file system or device refused to zero a range: write zeros instead.
    zero_range_refused: bool,
}

impl FileStorage {
    /// Opens the whole of `path`, read-only unless `writable`. A block device is
    /// fixed to its size; a regular file can grow.
    pub fn open(path: &Path, writable: bool) -> io::Result<FileStorage> {
        let mut file = OpenOptions::new().read(true).write(writable).open(path)?;
        let size = if file.metadata()?.is_file() {
            None
        } else {
            Some(file.seek(SeekFrom::End(0))?)
        };
        Ok(FileStorage {
            direct: DirectReader::open(path, &file)?,
            file,
            path: path.to_path_buf(),
            offset: 0,
            size,
            zero_range_refused: false,
        })
    }

    /// Opens `size` bytes of `path` starting at `offset`, read-only unless
    /// `writable`. When `create` is set and `path` is a regular file that does not
    /// exist, it is created (empty; reads of the region then fail until it is
    /// written).
    pub fn open_region(
        path: &Path,
        offset: u64,
        size: u64,
        writable: bool,
        create: bool,
    ) -> io::Result<FileStorage> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .create(writable && create)
            .truncate(false)
            .open(path)?;
        Ok(FileStorage {
            direct: DirectReader::open(path, &file)?,
            file,
            path: path.to_path_buf(),
            offset,
            size: Some(size),
            zero_range_refused: false,
        })
    }

    /// Opens or creates the regular file `path` (whole file, growable).
    pub fn create(path: &Path) -> io::Result<FileStorage> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(FileStorage {
            direct: DirectReader::open(path, &file)?,
            file,
            path: path.to_path_buf(),
            offset: 0,
            size: None,
            zero_range_refused: false,
        })
    }

    /// The path this storage was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How this storage reads: [`ReadMode::Direct`] unless the file system of a
    /// regular file refused `O_DIRECT`.
    pub fn read_mode(&self) -> ReadMode {
        match &self.direct {
            Some(d) => ReadMode::Direct { align: d.align },
            None => ReadMode::Buffered,
        }
    }

    fn check_bounds(&self, offset: u64, len: usize) -> io::Result<()> {
        if let Some(size) = self.size {
            let end = offset.checked_add(len as u64);
            if end.is_none_or(|end| end > size) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "access at {offset}+{len} is outside the {size}-byte region of {}",
                        self.path.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Storage for FileStorage {
    fn len(&self) -> io::Result<u64> {
        match self.size {
            Some(size) => Ok(size),
            None => Ok(self.file.metadata()?.len()),
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_bounds(offset, buf.len())?;
        let pos = self
            .offset
            .checked_add(offset)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read offset overflows"))?;
        match &self.direct {
            Some(direct) => direct.read_exact_at(buf, pos),
            None => self.file.read_exact_at(buf, pos),
        }
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_bounds(offset, data.len())?;
        let pos = self.offset + offset;
        self.file.write_all_at(data, pos)?;
        start_writeback(&self.file, pos, data.len());
        Ok(())
    }

    /// `fallocate(FALLOC_FL_ZERO_RANGE)`: a file system marks the range's extents
    /// unwritten, a block device gets a write-zeroes (or discard that zeroes)
    /// command, and no zeros cross the bus. Where that is refused (an older kernel
    /// or file system, a device without the command) zeros are written, and the
    /// refusal is remembered.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_bounds(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        if len == 0 {
            return Ok(());
        }
        if !self.zero_range_refused {
            let pos = self.offset + offset;
            // A block device keeps its size (and must be told so); a file grows
            // to the end of the range like a write.
            let flags = if self.file.metadata()?.file_type().is_block_device() {
                rustix::fs::FallocateFlags::ZERO_RANGE | rustix::fs::FallocateFlags::KEEP_SIZE
            } else {
                rustix::fs::FallocateFlags::ZERO_RANGE
            };
            match rustix::fs::fallocate(&self.file, flags, pos, len) {
                Ok(()) => return Ok(()),
                Err(e)
                    if [
                        rustix::io::Errno::OPNOTSUPP,
                        rustix::io::Errno::INVAL,
                        rustix::io::Errno::NODEV,
                        rustix::io::Errno::NOSYS,
                    ]
                    .contains(&e) =>
                {
                    tracing::debug!(path = %self.path.display(), error = %e, "zeroing a range refused; writing zeros");
                    self.zero_range_refused = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        write_zero_bytes(self, offset, len)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        match self.size {
            Some(size) if size == len => Ok(()),
            Some(size) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{} is fixed at {size} bytes; cannot resize to {len}",
                    self.path.display()
                ),
            )),
            None => self.file.set_len(len),
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_of(s: &FileStorage) -> bool {
        s.direct
            .as_ref()
            .is_some_and(|d| d.ring.lock().unwrap().is_some())
    }

    /// Direct reads of a regular file go through an `io_uring` (a blocking direct
    /// read would hold the file's lock against the writes of the slot being
    /// written until the medium answers), and read what `pread` reads.
    #[test]
    fn direct_reads_of_a_regular_file_go_through_a_ring() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot");
        let data: Vec<u8> = (0..3 * 1024 * 1024 + 123)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let s = FileStorage::open(&path, false).unwrap();
        assert_eq!(
            s.read_mode(),
            ReadMode::Direct {
                align: DIRECT_ALIGN_MIN
            }
        );
        assert!(
            ring_of(&s),
            "no io_uring: the kernel refused io_uring_setup"
        );
        for (offset, len) in [
            (0, 4096),
            (1, 10),
            (4095, 2 * 1024 * 1024),
            (3 * 1024 * 1024, 123),
        ] {
            let mut buf = vec![0u8; len];
            s.read_at(offset, &mut buf).unwrap();
            assert_eq!(
                buf,
                data[offset as usize..offset as usize + len],
                "at {offset}"
            );
        }
        let mut past = vec![0u8; 200];
        let err = s.read_at(3 * 1024 * 1024, &mut past).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(ring_of(&s), "the ring is kept after a short read");
    }

    /// A read the ring fails with `EINVAL` (here a buffer `O_DIRECT` cannot take)
    /// gives the ring up, so a read it never took cannot be submitted later; the
    /// read is made with `pread`, whose answer is the read's.
    #[test]
    fn a_ring_that_refuses_a_read_is_given_up_for_pread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot");
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let s = FileStorage::open(&path, false).unwrap();
        assert!(ring_of(&s));
        let direct = s.direct.as_ref().unwrap();
        let mut buf = AlignedBuf::new(8192 + 4096, 4096);
        // One byte past an aligned start: not a buffer `O_DIRECT` reads into.
        let misaligned = &mut buf.as_mut_slice()[1..4097];
        let err = direct.read_at(misaligned, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert!(!ring_of(&s), "the ring is given up");
        let mut out = vec![0u8; 5000];
        s.read_at(100, &mut out).unwrap();
        assert_eq!(out, data[100..5100]);
    }

    #[test]
    fn region_is_bounded_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 64]).unwrap();
        let mut region = FileStorage::open_region(&path, 16, 8, true, false).unwrap();
        assert_eq!(region.len().unwrap(), 8);
        region.write_at(0, b"abcdefgh").unwrap();
        region.sync().unwrap();
        let err = region.write_at(4, b"12345").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            region.set_len(9).unwrap_err().kind(),
            io::ErrorKind::Unsupported
        );
        let all = std::fs::read(&path).unwrap();
        assert_eq!(&all[16..24], b"abcdefgh");
        assert_eq!(&all[..16], &[0u8; 16]);
        let mut buf = [0u8; 3];
        region.read_at(5, &mut buf).unwrap();
        assert_eq!(&buf, b"fgh");
    }

    /// Bytes that differ at every offset (a misplaced read cannot match).
    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ (i as u8))
            .collect()
    }

    /// A file of `len` pattern bytes in a directory on a file system that accepts
    /// `O_DIRECT`. Panics, naming what it tried, when none does: these tests must
    /// exercise direct reads, not the buffered fallback.
    fn direct_capable_file(len: usize) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let data = pattern(len);
        let mut tried = Vec::new();
        for base in [std::env::temp_dir(), PathBuf::from("/var/tmp")] {
            let Ok(dir) = tempfile::tempdir_in(&base) else {
                tried.push(format!("{}: cannot create a directory", base.display()));
                continue;
            };
            let path = dir.path().join("slot");
            std::fs::write(&path, &data).unwrap();
            match FileStorage::open(&path, false).unwrap().read_mode() {
                ReadMode::Direct { .. } => return (dir, path, data),
                ReadMode::Buffered => {
                    tried.push(format!("{}: O_DIRECT refused", base.display()));
                }
            }
        }
        panic!(
            "NO FILE SYSTEM HERE ACCEPTS O_DIRECT, so direct reads cannot be tested \
             (tried {}); run the tests with TMPDIR on ext4, xfs or btrfs",
            tried.join("; ")
        );
    }

    #[test]
    fn zeroed_ranges_read_back_as_zeros_through_direct_reads() {
        let len = 3 * DIRECT_IO_MAX;
        let (_dir, path, data) = direct_capable_file(len);
        let mut s = FileStorage::open(&path, true).unwrap();
        // Unaligned, inside the file, and reaching past its end (a file grows).
        s.write_zeroes(5000, 200_000).unwrap();
        s.write_zeroes((len - 100) as u64, 4196).unwrap();
        s.sync().unwrap();
        assert_eq!(s.len().unwrap(), (len + 4096) as u64);
        let mut expected = data.clone();
        expected[5000..205_000].fill(0);
        expected[len - 100..].fill(0);
        expected.extend_from_slice(&[0; 4096]);
        let mut back = vec![0xa5; len + 4096];
        s.read_at(0, &mut back).unwrap();
        assert!(
            back == expected,
            "zeroed ranges and nothing else read as zeros"
        );
        // A region refuses to zero past its end.
        let mut region = FileStorage::open_region(&path, 4096, 8192, true, false).unwrap();
        let err = region.write_zeroes(4096, 8192).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        region.write_zeroes(0, 8192).unwrap();
        let mut back = vec![0xa5; 8192];
        region.read_at(0, &mut back).unwrap();
        assert_eq!(back, vec![0; 8192]);
    }

    #[test]
    fn zeroing_falls_back_to_writing_zeros_where_the_file_system_refuses() {
        // tmpfs refuses FALLOC_FL_ZERO_RANGE (EOPNOTSUPP).
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            panic!("no /dev/shm (tmpfs) to test the fallback on");
        };
        let path = dir.path().join("slot");
        std::fs::write(&path, pattern(100_000)).unwrap();
        let mut s = FileStorage::open(&path, true).unwrap();
        s.write_zeroes(10, 70_000).unwrap();
        assert!(s.zero_range_refused, "tmpfs zeroed a range itself");
        s.write_zeroes(80_000, 1_000).unwrap();
        let mut expected = pattern(100_000);
        expected[10..70_010].fill(0);
        expected[80_000..81_000].fill(0);
        assert!(std::fs::read(&path).unwrap() == expected);
    }

    #[test]
    fn aligned_direct_reads_go_straight_into_the_buffer_and_stop_at_the_end() {
        let len = 3 * DIRECT_IO_MAX + 2 * DIRECT_ALIGN_MIN;
        let (_dir, path, data) = direct_capable_file(len);
        let s = FileStorage::open(&path, false).unwrap();
        assert_eq!(s.read_mode(), ReadMode::Direct { align: 4096 });
        // Larger than one bounce buffer: only the direct path reads it in one go.
        let mut buf = AlignedBuf::new(2 * DIRECT_IO_MAX + DIRECT_ALIGN_MIN, 4096);
        s.read_at(4096, buf.as_mut_slice()).unwrap();
        let n = buf.len;
        assert!(buf.as_mut_slice()[..] == data[4096..4096 + n]);
        // Reaching past the end of the file is an error, not a short read.
        let mut tail = AlignedBuf::new(2 * DIRECT_ALIGN_MIN, 4096);
        let err = s
            .read_at((len - DIRECT_ALIGN_MIN) as u64, tail.as_mut_slice())
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn direct_reads_at_unaligned_ranges_return_the_exact_bytes() {
        // Not a multiple of the alignment, and longer than one direct read.
        let len = 2 * DIRECT_IO_MAX + 3 * DIRECT_ALIGN_MIN + 1234;
        let (_dir, path, data) = direct_capable_file(len);
        let s = FileStorage::open(&path, false).unwrap();
        assert_eq!(s.read_mode(), ReadMode::Direct { align: 4096 });
        assert_eq!(s.len().unwrap(), len as u64);
        let ranges = [
            (0, 0),
            (0, 1),
            (1, 1),
            (1, 4095),
            (4095, 2),
            (4096, 4096),
            (4097, 8190),
            (5000, 70_000),
            (DIRECT_IO_MAX - 3, 7),
            (123, DIRECT_IO_MAX),
            (4096 * 7 + 11, 2 * DIRECT_IO_MAX - 40_000),
            (len - 1, 1),
            (len - 1234, 1234),
            (len - 5000, 5000),
            (0, len),
        ];
        for (offset, n) in ranges {
            let mut buf = vec![0xa5; n];
            s.read_at(offset as u64, &mut buf).unwrap();
            assert!(
                buf == data[offset..offset + n],
                "direct read of {n} bytes at {offset} differs from the file's bytes"
            );
        }
        // What a buffered read of the same file returns, through the same seam.
        let buffered = std::fs::read(&path).unwrap();
        assert!(read_all(&s).unwrap() == buffered);
        // Past the end: an error, not zeros.
        for (offset, n) in [(len - 1, 2), (len, 1), (len + 4096, 10)] {
            let mut buf = vec![0; n];
            let err = s.read_at(offset as u64, &mut buf).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{offset}+{n}");
        }
    }

    #[test]
    fn direct_reads_of_a_region_see_its_own_unsynced_writes() {
        let len = 64 * 1024 + 100;
        let (_dir, path, mut data) = direct_capable_file(len);
        let mut region = FileStorage::open_region(&path, 777, 50_000, true, false).unwrap();
        assert_eq!(region.read_mode(), ReadMode::Direct { align: 4096 });
        let mut buf = vec![0; 9000];
        region.read_at(3, &mut buf).unwrap();
        assert!(buf == data[780..9780]);
        // Not synced: the direct read must still return it (the kernel writes
        // back the dirty range before reading the medium).
        region.write_at(4000, b"written, not synced").unwrap();
        data[4777..4777 + 19].copy_from_slice(b"written, not synced");
        let mut buf = vec![0; 5000];
        region.read_at(1000, &mut buf).unwrap();
        assert!(buf == data[1777..6777]);
        let mut buf = vec![0; 2];
        assert_eq!(
            region.read_at(49_999, &mut buf).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        region.sync().unwrap();
        assert!(std::fs::read(&path).unwrap() == data);
    }

    #[test]
    fn a_file_system_without_o_direct_is_read_through_the_page_cache() {
        // procfs files refuse O_DIRECT at open (EINVAL).
        let path = Path::new("/proc/self/cmdline");
        let s = FileStorage::open(path, false).unwrap();
        assert_eq!(s.read_mode(), ReadMode::Buffered);
        let expected = std::fs::read(path).unwrap();
        let mut buf = vec![0; expected.len().min(8)];
        s.read_at(0, &mut buf).unwrap();
        assert!(buf[..] == expected[..buf.len()]);
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        for align in [512, 4096, 65536] {
            for len in [0, 1, 4096, 100_000] {
                let mut b = AlignedBuf::new(len, align);
                let slice = b.as_mut_slice();
                assert_eq!(slice.len(), len);
                assert_eq!(slice.as_ptr().addr() % align, 0);
            }
        }
    }

    #[test]
    fn whole_file_grows_and_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut s = FileStorage::create(&path).unwrap();
        assert!(s.is_empty().unwrap());
        s.write_at(10, b"xy").unwrap();
        assert_eq!(s.len().unwrap(), 12);
        s.set_len(11).unwrap();
        assert_eq!(read_all(&s).unwrap(), b"\0\0\0\0\0\0\0\0\0\0x");
    }
}
