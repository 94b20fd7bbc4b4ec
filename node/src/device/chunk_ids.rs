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
//! A kept manifest's file ([`IdsWriter::reuse_or_create`]) is checked instead of
//! written when it holds the very ids the manifest lists, and then read from the
//! handle that checked it.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read as _, Seek as _, Write as _};
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
    /// `None` once finished (a temporary file is then renamed).
    out: Option<Out>,
    count: u64,
}

#[derive(Debug)]
enum Out {
    /// Comparing the ids with those `path` holds (the first `count` matched).
    Checking(BufReader<File>),
    /// Writing them to the temporary file.
    Writing(BufWriter<File>),
}

fn create_tmp(tmp: &std::path::Path) -> std::io::Result<BufWriter<File>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)?;
    Ok(BufWriter::with_capacity(64 * 1024, file))
}

impl IdsWriter {
    /// Creates the temporary file next to `path`.
    pub(crate) fn create(path: PathBuf) -> std::io::Result<IdsWriter> {
        let tmp = path.with_extension("ids.tmp");
        let out = create_tmp(&tmp)?;
        Ok(IdsWriter {
            path,
            tmp,
            out: Some(Out::Writing(out)),
            count: 0,
        })
    }

    /// Like [`IdsWriter::create`], but when `path` exists its ids are compared
    /// with those pushed instead: if they are the same (and no more), the file
    /// is kept as it is and read from the handle that compared it; from the first
    /// that differs, the ids are written to a temporary file as by `create` (the
    /// ones that matched copied from `path`).
    pub(crate) fn reuse_or_create(path: PathBuf) -> std::io::Result<IdsWriter> {
        match File::open(&path) {
            Ok(file) => Ok(IdsWriter {
                tmp: path.with_extension("ids.tmp"),
                path,
                out: Some(Out::Checking(BufReader::with_capacity(64 * 1024, file))),
                count: 0,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => IdsWriter::create(path),
            Err(e) => Err(e),
        }
    }

    /// From checking to writing: the `count` ids that matched are copied from
    /// the file checked to the temporary file.
    fn diverge(&mut self) -> Result<(), String> {
        let Some(Out::Checking(reader)) = self.out.take() else {
            return Ok(());
        };
        let mut old = reader.into_inner();
        let copied = (|| -> std::io::Result<BufWriter<File>> {
            let mut out = create_tmp(&self.tmp)?;
            old.rewind()?;
            let n = std::io::copy(&mut (&mut old).take(self.count * 32), &mut out)?;
            if n != self.count * 32 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok(out)
        })();
        match copied {
            Ok(out) => {
                self.out = Some(Out::Writing(out));
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&self.tmp);
                Err(self.failed(e))
            }
        }
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
        if let Some(Out::Checking(reader)) = &mut self.out {
            let mut kept = [0u8; 32];
            if reader.read_exact(&mut kept).is_ok() && kept == id.0 {
                self.count += 1;
                return Ok(());
            }
            self.diverge()?;
        }
        let Some(Out::Writing(out)) = self.out.as_mut() else {
            unreachable!("not finished, and writing once it diverged")
        };
        match out.write_all(&id.0) {
            Ok(()) => {
                self.count += 1;
                Ok(())
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    fn finish(mut self: Box<Self>) -> Result<Arc<dyn shoal_engine::ChunkIdFile>, String> {
        if let Some(Out::Checking(reader)) = &self.out {
            // Every id matched: the file is theirs if it holds no more.
            match reader.get_ref().metadata() {
                Ok(m) if m.len() == self.count * 32 => {
                    let Some(Out::Checking(reader)) = self.out.take() else {
                        unreachable!()
                    };
                    return Ok(Arc::new(IdsFile {
                        file: reader.into_inner(),
                        path: self.path.clone(),
                    }));
                }
                _ => self.diverge()?,
            }
        }
        let Some(Out::Writing(out)) = self.out.take() else {
            unreachable!("not finished, and writing once it diverged")
        };
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
        if let Some(Out::Writing(_)) = self.out.take() {
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

    /// A kept file holding the very ids is read as it is (not written again: the
    /// same inode, no temporary file); one that differs anywhere, holds fewer or
    /// more is written again with the ids pushed.
    #[test]
    fn ids_already_on_disk_are_reused_only_when_they_are_the_same() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ab.ids");
        let ids: Vec<ChunkId> = (1..=300u16)
            .map(|i| ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes()))
            .collect();
        let write = |ids: &[ChunkId], reuse: bool| {
            let mut w = Box::new(if reuse {
                IdsWriter::reuse_or_create(path.clone()).expect("open")
            } else {
                IdsWriter::create(path.clone()).expect("create")
            });
            for id in ids {
                w.push(id).expect("push");
            }
            let file = w.finish().expect("finish");
            let mut back = vec![ChunkId([0; 32]); ids.len()];
            file.read_ids(0, &mut back).expect("read");
            assert_eq!(back, ids);
            assert!(!path.with_extension("ids.tmp").exists());
            std::fs::metadata(&path).expect("ids").ino()
        };
        // None yet: written.
        let first = write(&ids, true);
        assert_eq!(std::fs::read(&path).expect("read").len(), 300 * 32);
        // The same: kept.
        assert_eq!(
            write(&ids, true),
            first,
            "the same ids are not written again"
        );
        // One differs midway: written again, the prefix copied.
        let mut changed = ids.clone();
        changed[150] = ChunkId([9; 32]);
        let second = write(&changed, true);
        assert_ne!(second, first);
        let on_disk = std::fs::read(&path).expect("read");
        assert_eq!(&on_disk[..32], &ids[0].0);
        assert_eq!(&on_disk[150 * 32..151 * 32], &[9; 32]);
        // Fewer, then more than the file holds.
        let third = write(&changed[..200], true);
        assert_ne!(third, second);
        assert_eq!(std::fs::read(&path).expect("read").len(), 200 * 32);
        write(&changed, true);
        assert_eq!(std::fs::read(&path).expect("read").len(), 300 * 32);
        // A plain writer always writes.
        assert_ne!(write(&changed, false), write(&changed, false));
    }
}
