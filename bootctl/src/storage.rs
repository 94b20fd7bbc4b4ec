//! The storage seam: every byte bootctl reads or writes goes through [`Storage`].
//!
//! The trait is deliberately small (`len/read_at/write_at/set_len/sync`, like redb's
//! `StorageBackend`) so a crash backend can stand in for a disk in tests
//! (`testing::CrashDisk`) and every write can be counted and interrupted.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
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

    /// Truncates or extends to `len` bytes. Fixed-size storage (a block device or a
    /// region) accepts only its own length.
    fn set_len(&mut self, len: u64) -> io::Result<()>;

    /// Makes every completed write durable.
    fn sync(&mut self) -> io::Result<()>;
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

/// A [`Storage`] over a file or block device, optionally restricted to the region
/// `offset..offset + size`.
///
/// A region (or a block device) has a fixed size: writes past its end fail with
/// [`io::ErrorKind::InvalidInput`] and [`Storage::set_len`] accepts only the current
/// length. A plain file without a region grows on write and can be truncated.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    offset: u64,
    size: Option<u64>,
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
            file,
            path: path.to_path_buf(),
            offset: 0,
            size,
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
            file,
            path: path.to_path_buf(),
            offset,
            size: Some(size),
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
            file,
            path: path.to_path_buf(),
            offset: 0,
            size: None,
        })
    }

    /// The path this storage was opened from.
    pub fn path(&self) -> &Path {
        &self.path
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
        self.file.read_exact_at(buf, self.offset + offset)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_bounds(offset, data.len())?;
        self.file.write_all_at(data, self.offset + offset)
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
