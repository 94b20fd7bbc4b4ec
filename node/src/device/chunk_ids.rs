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
        let written = (|| -> Result<File, String> {
            let file = out.into_inner().map_err(|e| self.failed(e.error()))?;
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
            std::fs::rename(&self.tmp, &self.path).map_err(|e| self.failed(e))?;
            Ok(file)
        })();
        match written {
            Ok(file) => Ok(Arc::new(IdsFile {
                file,
                path: self.path.clone(),
            })),
            Err(message) => {
                // Finished (Drop no longer removes it): the temporary file goes.
                let _ = std::fs::remove_file(&self.tmp);
                Err(message)
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_engine::ChunkIdWriter as _;

    /// The ids written are read back by position from the file renamed into
    /// place; a finish that fails (here the temporary file was written behind
    /// the writer's back: its length is not the ids') leaves no temporary file.
    #[test]
    fn a_finished_writer_leaves_its_file_and_a_failed_one_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ab.ids");
        let mut w = Box::new(IdsWriter::create(path.clone()).expect("create"));
        w.push(&ChunkId([1; 32])).expect("push");
        w.push(&ChunkId([2; 32])).expect("push");
        let file = w.finish().expect("finish");
        let mut ids = [ChunkId([0; 32]); 2];
        file.read_ids(0, &mut ids).expect("read");
        assert_eq!(ids, [ChunkId([1; 32]), ChunkId([2; 32])]);
        assert!(!path.with_extension("ids.tmp").exists());

        let other = dir.path().join("cd.ids");
        let tmp = other.with_extension("ids.tmp");
        let mut w = Box::new(IdsWriter::create(other.clone()).expect("create"));
        w.push(&ChunkId([3; 32])).expect("push");
        std::fs::write(&tmp, [0u8; 100]).expect("write behind its back");
        assert_eq!(
            w.finish().err(),
            Some(format!(
                "cannot write the release's chunk ids to {}: 100 bytes written for 1 ids",
                tmp.display()
            ))
        );
        assert!(!tmp.exists(), "the temporary file is removed");
        assert!(!other.exists());
    }
}
