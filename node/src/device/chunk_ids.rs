//! A release's chunk ids by position in a file next to its stored envelope
//! (`<envelope hash>.ids`, 32 bytes a position), written while the engine
//! decodes the verified manifest and read back with `pread`
//! ([`shoal_engine::ChunkIdFile`]): the ids of an 8 GiB image (13.8 MB) are not
//! kept in memory.
//!
//! The file is derived data: every offer writes it again from the envelope it
//! verifies (under a temporary name, renamed over the last one, so a release
//! still read from an earlier file keeps its own), and only the handle this
//! process wrote is read. It goes with the envelope when the deployment ends.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::Arc;

use shoal_artifact::ChunkId;

/// Ids read at a time (8 KiB).
const READ_IDS: usize = 256;

/// Writes the ids ([`shoal_engine::ChunkIdWriter`]).
#[derive(Debug)]
pub(crate) struct IdsWriter {
    path: PathBuf,
    tmp: PathBuf,
    /// `None` once finished (the temporary file is then renamed).
    out: Option<BufWriter<File>>,
    count: u64,
}

impl IdsWriter {
    /// Creates the temporary file next to `path`.
    pub(crate) fn create(path: PathBuf) -> std::io::Result<IdsWriter> {
        let tmp = path.with_extension("ids.tmp");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        Ok(IdsWriter {
            path,
            tmp,
            out: Some(BufWriter::with_capacity(64 * 1024, file)),
            count: 0,
        })
    }

    fn failed(&self, e: impl std::fmt::Display) -> String {
        format!(
            "cannot write the release's chunk ids to {}: {e}",
            self.tmp.display()
        )
    }
}

impl shoal_engine::ChunkIdWriter for IdsWriter {
    fn push(&mut self, id: &ChunkId) -> Result<(), String> {
        let out = self.out.as_mut().expect("not finished");
        match out.write_all(&id.0) {
            Ok(()) => {
                self.count += 1;
                Ok(())
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    fn finish(mut self: Box<Self>) -> Result<Arc<dyn shoal_engine::ChunkIdFile>, String> {
        let out = self.out.take().expect("not finished");
        let file = match out.into_inner() {
            Ok(file) => file,
            Err(e) => return Err(self.failed(e.error())),
        };
        // Not synced: a cut loses it, and the next offer writes it again.
        match file.metadata() {
            Ok(m) if m.len() == self.count * 32 => {}
            Ok(m) => {
                return Err(self.failed(format!(
                    "{} bytes written for {} ids",
                    m.len(),
                    self.count
                )));
            }
            Err(e) => return Err(self.failed(e)),
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.path) {
            let message = self.failed(e);
            let _ = std::fs::remove_file(&self.tmp);
            return Err(message);
        }
        Ok(Arc::new(IdsFile {
            file,
            path: self.path.clone(),
        }))
    }
}

impl Drop for IdsWriter {
    /// A writer dropped unfinished (the release was refused) leaves no file.
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The written ids, read by position ([`shoal_engine::ChunkIdFile`]).
#[derive(Debug)]
pub(crate) struct IdsFile {
    file: File,
    path: PathBuf,
}

impl shoal_engine::ChunkIdFile for IdsFile {
    fn read_ids(&self, from: u32, out: &mut [ChunkId]) -> std::io::Result<()> {
        let mut buf = [0u8; READ_IDS * 32];
        let mut at = u64::from(from) * 32;
        for ids in out.chunks_mut(READ_IDS) {
            let bytes = &mut buf[..ids.len() * 32];
            self.file.read_exact_at(bytes, at)?;
            for (id, b) in ids.iter_mut().zip(bytes.chunks_exact(32)) {
                id.0.copy_from_slice(b);
            }
            at += bytes.len() as u64;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// A file read by offset ([`shoal_artifact::ReadAt`]): the stored envelope, as
/// the engine verifies it.
#[derive(Debug)]
pub(crate) struct FileAt(pub(crate) File);

impl shoal_artifact::ReadAt for FileAt {
    fn read_at(&self, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_exact_at(buf, at)
    }
}
