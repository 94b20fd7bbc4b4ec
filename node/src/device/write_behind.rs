//! Writing the slot and syncing it, on threads of their own.
//!
//! The engine asks for writes of the target slot and a sync after every batch of
//! them ([`shoal_engine::Output::Write`], [`shoal_engine::Output::Sync`]), and asks
//! for the journal record of a batch only once told its sync returned
//! ([`shoal_engine::Input::Synced`]). Carried out in line, every write waits for the
//! page cache and every sync for the medium, and the install stops meanwhile. The
//! [`WriteBehind`] threads take writes and syncs in order instead (one writing, one
//! syncing, so writes go on while the medium syncs), while the driver goes on
//! reading and decoding, and report each sync that returned
//! ([`WriteBehind::synced`]); the driver passes that on to the engine, so the
//! journal never claims a byte the slot may not hold. The data of the writes waiting for the thread is
//! bounded ([`BUDGET`]). The read-back of the written slot ([`Verifier`]) rides
//! along, told of each write and of each completed sync.
//!
//! The thread gathers contiguous writes into one (up to [`GATHER_RUNS`] runs at
//! once, each written out when it is full and continued, when a new run needs its
//! place (the least recently continued), or before a write over its bytes), and
//! runs of zero chunks into one range to zero ([`SlotWriter::write_zeroes_at`]:
//! the free space of a file system image is not written byte by byte).
//!
//! The first failure stops the thread's work (nothing after it is written, synced
//! or persisted) and is handed back to the driver, which tells the engine.
//! Anything that must not run before the journal is current (a bootloader change,
//! the final verification) waits for the queue to drain ([`WriteBehind::barrier`]).

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use shoal_bootctl::SlotWriter;
use shoal_engine::IoOp;

use super::slotio::Verifier;
use crate::cmd::chain;

/// Bytes of write data queued for the thread at most.
pub const BUDGET: u64 = 2 * 1024 * 1024;

/// Runs of contiguous writes gathered at once. An install that reuses chunks of the
/// running slot writes two interleaved ascending sequences (the chunks copied from
/// the running slot and those the stream brings): gathered one run at a time, its
/// writes were cut at every switch (the bench's v1 → v2 delta install: 4,814
/// writes and as many `sync_file_range` calls; 2,202 and 1,756 with two runs; the
/// install's median 0.82 → 0.74 s, three runs 0.78 s, in 7 alternating runs of a
/// build that hashed references only when a chunk failed, an experiment not kept;
/// session 14).
const GATHER_RUNS: usize = 2;

/// Why the thread's work failed: the operation and the message for the engine.
pub type Failure = (IoOp, String);

enum Job {
    /// `data` at each of `offsets`; `zeros` when it is all zero bytes.
    Write {
        offsets: Vec<u64>,
        data: Vec<u8>,
        zeros: bool,
    },
    /// Makes every write before it durable.
    Sync,
    /// Answered once every job before it is done.
    Barrier(mpsc::Sender<()>),
    /// Syncs, then answers with the payload's hash from the read-back (or `None`
    /// without a verifier), and ends the thread.
    Finish(mpsc::Sender<Result<Option<[u8; 32]>, Failure>>),
}

/// Bytes of write data queued and not yet written, and a signal when that falls.
#[derive(Default)]
struct Budget {
    queued: Mutex<u64>,
    fell: Condvar,
}

impl Budget {
    /// Waits until `n` more bytes fit (any amount fits an empty queue).
    fn take(&self, n: u64) {
        let mut queued = self.queued.lock().expect("budget lock");
        while *queued > 0 && *queued + n > BUDGET {
            queued = self.fell.wait(queued).expect("budget lock");
        }
        *queued += n;
    }

    fn give(&self, n: u64) {
        let mut queued = self.queued.lock().expect("budget lock");
        *queued = queued.saturating_sub(n);
        self.fell.notify_all();
    }
}

/// See the module documentation.
pub struct WriteBehind {
    tx: Option<mpsc::Sender<Job>>,
    budget: Arc<Budget>,
    failures: mpsc::Receiver<Failure>,
    /// One message per sync that returned, in order.
    synced: mpsc::Receiver<()>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for WriteBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehind").finish_non_exhaustive()
    }
}

impl WriteBehind {
    /// Starts the threads over `writer` (the slot being written), `sync` (a second
    /// writer of it, to sync through) and `verifier` (the read-back of the slot, if
    /// any). Contiguous
    /// writes are gathered up to `gather` bytes.
    pub fn start(
        writer: SlotWriter,
        sync: SlotWriter,
        verifier: Option<Verifier>,
        gather: usize,
    ) -> WriteBehind {
        let (tx, rx) = mpsc::channel::<Job>();
        let (to_sync, sync_rx) = mpsc::sync_channel::<SyncJob>(SYNC_QUEUE);
        let (fail_tx, failures) = mpsc::channel();
        let (synced_tx, synced) = mpsc::channel();
        let budget = Arc::new(Budget::default());
        let writing = Writing {
            writer,
            gather,
            pending: std::collections::VecDeque::new(),
            pending_zeros: None,
            written: Vec::new(),
            budget: Arc::clone(&budget),
            to_sync,
            failures: fail_tx.clone(),
            failed: false,
        };
        let syncing = Syncing {
            sync,
            verifier,
            failures: fail_tx,
            synced: synced_tx,
            failed: false,
        };
        let workers = vec![
            std::thread::spawn(move || writing.run(&rx)),
            std::thread::spawn(move || syncing.run(&sync_rx)),
        ];
        WriteBehind {
            tx: Some(tx),
            budget,
            failures,
            synced,
            workers,
        }
    }

    /// How many queued syncs returned since the last call (without waiting).
    pub fn synced(&self) -> usize {
        self.synced.try_iter().count()
    }

    /// Waits for the next queued sync to return; `Err` when the thread failed
    /// instead (it syncs nothing after a failure).
    pub fn wait_synced(&self) -> Result<(), Failure> {
        loop {
            match self
                .synced
                .recv_timeout(std::time::Duration::from_millis(20))
            {
                Ok(()) => return Ok(()),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(self
                        .failure()
                        .unwrap_or((IoOp::Sync, "the slot syncing thread stopped".to_owned())));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(failure) = self.failure() {
                        return Err(failure);
                    }
                }
            }
        }
    }

    fn send(&self, job: Job) -> Result<(), Failure> {
        self.tx
            .as_ref()
            .expect("not finished")
            .send(job)
            .map_err(|_| (IoOp::Write, "the slot writing thread stopped".to_owned()))
    }

    /// Queues `data` for each of `offsets` (waiting while [`BUDGET`] bytes are
    /// queued).
    pub fn write(&self, offsets: Vec<u64>, data: Vec<u8>) -> Result<(), Failure> {
        let zeros = is_zeros(&data);
        self.budget.take(data.len() as u64);
        self.send(Job::Write {
            offsets,
            data,
            zeros,
        })
    }

    /// Queues a sync of every write so far.
    pub fn sync(&self) -> Result<(), Failure> {
        self.send(Job::Sync)
    }

    /// A failure of the thread's work, if one happened (at most one is ever
    /// reported: the thread stops working after it).
    pub fn failure(&self) -> Option<Failure> {
        self.failures.try_recv().ok()
    }

    /// Waits until every queued job is done; then says how the work went.
    pub fn barrier(&self) -> Result<(), Failure> {
        let (tx, rx) = mpsc::channel();
        self.send(Job::Barrier(tx))?;
        rx.recv()
            .map_err(|_| (IoOp::Write, "the slot writing thread stopped".to_owned()))?;
        match self.failure() {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }

    /// Writes and syncs everything queued and finishes the read-back: the
    /// payload's hash, or `None` when there was no verifier. Ends the thread.
    pub fn finish(mut self) -> Result<Option<[u8; 32]>, Failure> {
        let (tx, rx) = mpsc::channel();
        self.send(Job::Finish(tx))?;
        let answer = rx.recv().map_err(|_| match self.failure() {
            Some(failure) => failure,
            None => (IoOp::Write, "the slot writing thread stopped".to_owned()),
        })?;
        self.stop();
        answer
    }

    fn stop(&mut self) {
        // The threads do every job queued before the channel closed, then end.
        self.tx.take();
        for worker in self.workers.drain(..) {
            worker.join().expect("a slot writing thread panicked");
        }
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        // An install that stopped early still writes, syncs and journals what it
        // had queued: its work is kept for the next run.
        self.stop();
    }
}

/// Whether `data` is all zero bytes (compared a block at a time: `memcmp` speed).
pub fn is_zeros(data: &[u8]) -> bool {
    static ZEROS: [u8; 4096] = [0; 4096];
    data.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Syncs and journal records queued from the writing thread to the syncing one at
/// most: writing runs at most about two batches ahead of what is durable.
const SYNC_QUEUE: usize = 4;

/// What the writing thread hands on to the syncing thread, in order.
enum SyncJob {
    /// Syncs; the ranges `(offset, len)` written before it are then durable.
    Sync(Vec<(u64, u64)>),
    /// A write failed: nothing after it is synced or persisted.
    WriteFailed,
    Barrier(mpsc::Sender<()>),
    Finish(
        Vec<(u64, u64)>,
        mpsc::Sender<Result<Option<[u8; 32]>, Failure>>,
    ),
}

/// The writing thread: writes (gathered) and hands syncs on once the writes
/// before them are done, so writing goes on while the medium syncs.
struct Writing {
    writer: SlotWriter,
    gather: usize,
    /// Runs of contiguous writes, each gathered into one write, least recently
    /// extended first (at most [`GATHER_RUNS`]).
    pending: std::collections::VecDeque<(u64, Vec<u8>)>,
    /// Contiguous zero chunks gathered into one range: (start, length).
    pending_zeros: Option<(u64, u64)>,
    /// Ranges written since the last sync was handed on.
    written: Vec<(u64, u64)>,
    budget: Arc<Budget>,
    to_sync: mpsc::SyncSender<SyncJob>,
    failures: mpsc::Sender<Failure>,
    failed: bool,
}

impl Writing {
    fn run(mut self, rx: &mpsc::Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            let next = match job {
                Job::Write {
                    offsets,
                    data,
                    zeros,
                } => {
                    // After a failure nothing more is written.
                    if !self.failed
                        && let Err(e) = self.write(&offsets, &data, zeros)
                    {
                        self.fail(e);
                    }
                    self.budget.give(data.len() as u64);
                    None
                }
                Job::Sync => {
                    if !self.failed
                        && let Err(e) = self.flush()
                    {
                        self.fail(e);
                    }
                    Some(SyncJob::Sync(std::mem::take(&mut self.written)))
                }
                Job::Barrier(answer) => Some(SyncJob::Barrier(answer)),
                Job::Finish(answer) => {
                    if !self.failed
                        && let Err(e) = self.flush()
                    {
                        self.fail(e);
                    }
                    let _ = self
                        .to_sync
                        .send(SyncJob::Finish(std::mem::take(&mut self.written), answer));
                    return;
                }
            };
            if let Some(next) = next
                && self.to_sync.send(next).is_err()
            {
                return;
            }
        }
        // The driver went away (an install that stopped): what was queued is
        // written; syncing it is left to the next run, which resumes from the
        // journal.
        let _ = self.flush();
    }

    fn fail(&mut self, message: String) {
        tracing::warn!(op = %IoOp::Write, %message, "output failed");
        self.failed = true;
        let _ = self.failures.send((IoOp::Write, message));
        let _ = self.to_sync.send(SyncJob::WriteFailed);
    }

    fn write(&mut self, offsets: &[u64], data: &[u8], zeros: bool) -> Result<(), String> {
        let len = data.len() as u64;
        for &offset in offsets {
            // What is gathered is written later, in another order: a write over
            // bytes still gathered must land after them.
            self.flush_overlapping(offset, len)?;
            if zeros {
                match self.pending_zeros.as_mut() {
                    Some((start, run)) if *start + *run == offset => *run += len,
                    _ => {
                        self.flush_zeros()?;
                        self.pending_zeros = Some((offset, len));
                    }
                }
            } else {
                let gather = self.gather;
                // The run this write continues, if one does.
                let continues = self
                    .pending
                    .iter()
                    .position(|(start, buf)| *start + buf.len() as u64 == offset);
                match continues {
                    Some(i) if self.pending[i].1.len() + data.len() <= gather => {
                        let mut run = self.pending.remove(i).expect("found");
                        run.1.extend_from_slice(data);
                        self.pending.push_back(run);
                    }
                    _ if data.len() >= gather => {
                        self.writer.write_at(offset, data).map_err(|e| chain(&e))?;
                    }
                    Some(i) => {
                        // The run it continues is full: written out, and its
                        // buffer starts the run's next part (the other run, still
                        // growing, stays).
                        let (start, mut buf) = self.pending.remove(i).expect("found");
                        self.write_out(start, &buf)?;
                        buf.clear();
                        buf.extend_from_slice(data);
                        self.pending.push_back((offset, buf));
                    }
                    None => {
                        let mut buf = match self.pending.len() >= GATHER_RUNS {
                            true => self.flush_oldest()?,
                            false => Vec::with_capacity(gather),
                        };
                        buf.clear();
                        buf.extend_from_slice(data);
                        self.pending.push_back((offset, buf));
                    }
                }
            }
            match self.written.last_mut() {
                Some((start, n)) if *start + *n == offset => *n += len,
                _ => self.written.push((offset, len)),
            }
        }
        Ok(())
    }

    /// Writes out the gathered runs that overlap `len` bytes at `offset`.
    fn flush_overlapping(&mut self, offset: u64, len: u64) -> Result<(), String> {
        let end = offset + len;
        if self
            .pending_zeros
            .is_some_and(|(start, run)| start < end && offset < start + run)
        {
            self.flush_zeros()?;
        }
        while let Some(i) = self
            .pending
            .iter()
            .position(|(start, buf)| *start < end && offset < start + buf.len() as u64)
        {
            let (start, buf) = self.pending.remove(i).expect("found");
            self.write_out(start, &buf)?;
        }
        Ok(())
    }

    /// Writes out a gathered run of `buf` at `start`.
    fn write_out(&mut self, start: u64, buf: &[u8]) -> Result<(), String> {
        self.writer
            .write_at(start, buf)
            .map(drop)
            .map_err(|e| chain(&e))
    }

    /// Writes out the run least recently extended; its buffer, for the next.
    fn flush_oldest(&mut self) -> Result<Vec<u8>, String> {
        match self.pending.pop_front() {
            Some((start, buf)) => {
                self.write_out(start, &buf)?;
                Ok(buf)
            }
            None => Ok(Vec::with_capacity(self.gather)),
        }
    }

    fn flush_zeros(&mut self) -> Result<(), String> {
        if let Some((start, len)) = self.pending_zeros.take() {
            self.writer
                .write_zeroes_at(start, len)
                .map_err(|e| chain(&e))?;
        }
        Ok(())
    }

    /// Writes out everything gathered.
    fn flush(&mut self) -> Result<(), String> {
        self.flush_zeros()?;
        while let Some((start, buf)) = self.pending.pop_front() {
            self.write_out(start, &buf)?;
        }
        Ok(())
    }
}

/// The syncing thread: syncs, tells the read-back and the driver.
struct Syncing {
    /// A second writer of the slot: a sync through it makes every write of the
    /// slot durable.
    sync: SlotWriter,
    verifier: Option<Verifier>,
    failures: mpsc::Sender<Failure>,
    synced: mpsc::Sender<()>,
    failed: bool,
}

impl Syncing {
    fn run(mut self, rx: &mpsc::Receiver<SyncJob>) {
        while let Ok(job) = rx.recv() {
            match job {
                // After a failure nothing more is synced or persisted: the journal
                // stays at the last batch known durable.
                SyncJob::Sync(written) if !self.failed => match self.sync(written) {
                    Ok(()) => {
                        let _ = self.synced.send(());
                    }
                    Err((op, message)) => self.fail(op, message),
                },
                SyncJob::Sync(_) => {}
                SyncJob::WriteFailed => self.failed = true,
                SyncJob::Barrier(answer) => {
                    let _ = answer.send(());
                }
                SyncJob::Finish(written, answer) => {
                    let result = if self.failed {
                        Err((
                            IoOp::Write,
                            "an earlier write, sync or journal record failed".to_owned(),
                        ))
                    } else {
                        self.sync(written)
                            .and_then(|()| match self.verifier.take() {
                                Some(v) => v.finish().map(Some).map_err(|e| {
                                    (IoOp::HashSlot, format!("cannot read back the slot: {e}"))
                                }),
                                None => Ok(None),
                            })
                    };
                    let _ = answer.send(result);
                    return;
                }
            }
        }
    }

    fn fail(&mut self, op: IoOp, message: String) {
        tracing::warn!(%op, %message, "output failed");
        self.failed = true;
        let _ = self.failures.send((op, message));
    }

    fn sync(&mut self, written: Vec<(u64, u64)>) -> Result<(), Failure> {
        self.sync.sync().map_err(|e| (IoOp::Sync, chain(&e)))?;
        if let Some(v) = self.verifier.as_mut() {
            for (offset, len) in written {
                v.wrote(offset, len);
            }
            v.synced();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{WriteBehind, is_zeros};
    use shoal_bootctl::testing::CrashDisk;
    use shoal_bootctl::{Slot, SlotWriter};

    /// A write-behind over a 1 MiB slot `b` of a fresh [`CrashDisk`] (which counts
    /// the writes), gathering up to 64 KiB.
    fn writing() -> (CrashDisk, WriteBehind) {
        let disk = CrashDisk::new();
        disk.put("b", &vec![0xee; 1024 * 1024]);
        let writer = |disk: &CrashDisk| {
            SlotWriter::new(Box::new(disk.storage("b")), Slot::B, 1024 * 1024).unwrap()
        };
        let wb = WriteBehind::start(writer(&disk), writer(&disk), None, 64 * 1024);
        (disk, wb)
    }

    #[test]
    fn two_interleaved_runs_are_each_gathered_into_one_write() {
        let (disk, wb) = writing();
        let mut expected = vec![0xee; 1024 * 1024];
        for i in 0..8u8 {
            for (base, tag) in [(0usize, 1u8), (512 * 1024, 100)] {
                let at = base + usize::from(i) * 4096;
                let data = vec![tag + i; 4096];
                expected[at..at + 4096].copy_from_slice(&data);
                wb.write(vec![at as u64], data).unwrap();
            }
        }
        wb.finish().unwrap();
        // One write per run (gathering one run at a time wrote all 16).
        assert_eq!(disk.ops(), 2);
        assert_eq!(disk.live("b"), expected);
    }

    #[test]
    fn a_full_run_continued_is_written_out_not_the_other_one() {
        let (disk, wb) = writing();
        // b starts a run; a fills one (64 KiB, the most recently continued) and
        // continues it, and b continues its own: a's full run goes, b's stays.
        wb.write(vec![512 * 1024], vec![1; 4096]).unwrap();
        for i in 0..17u64 {
            wb.write(vec![i * 4096], vec![2; 4096]).unwrap();
        }
        wb.write(vec![516 * 1024], vec![3; 4096]).unwrap();
        wb.finish().unwrap();
        // a's 64 KiB, a's last chunk, b's 8 KiB (writing out the least recently
        // continued run, b's, cut it in two: 4 writes).
        assert_eq!(disk.ops(), 3);
        let live = disk.live("b");
        assert!(live[..17 * 4096].iter().all(|&b| b == 2));
        assert!(live[512 * 1024..516 * 1024].iter().all(|&b| b == 1));
        assert!(live[516 * 1024..520 * 1024].iter().all(|&b| b == 3));
    }

    #[test]
    fn data_over_gathered_zeros_lands_after_them() {
        let (disk, wb) = writing();
        // The zeros are gathered; the data (a gather's size: written at once)
        // must not be zeroed when they are written out.
        wb.write(vec![0], vec![0; 64 * 1024]).unwrap();
        wb.write(vec![0], vec![7; 64 * 1024]).unwrap();
        wb.finish().unwrap();
        assert!(disk.live("b")[..64 * 1024].iter().all(|&b| b == 7));
    }

    #[test]
    fn a_write_over_gathered_bytes_lands_after_them() {
        let (disk, wb) = writing();
        // x is gathered; y overlaps it (not contiguous: a run of its own); w
        // extends x's run and overlaps y. Written out in the order runs end, x's
        // run (with w) would land after y and put x back under y.
        wb.write(vec![0], vec![b'x'; 4096]).unwrap();
        wb.write(vec![2048], vec![b'y'; 4096]).unwrap();
        wb.write(vec![4096], vec![b'w'; 4096]).unwrap();
        wb.finish().unwrap();
        let live = disk.live("b");
        assert!(live[..2048].iter().all(|&b| b == b'x'));
        assert!(live[2048..4096].iter().all(|&b| b == b'y'));
        assert!(live[4096..8192].iter().all(|&b| b == b'w'));
        assert!(live[8192..].iter().all(|&b| b == 0xee));
    }

    #[test]
    fn zero_chunks_are_recognized_whatever_their_length() {
        assert!(is_zeros(&[]));
        assert!(is_zeros(&[0; 1]));
        assert!(is_zeros(&vec![0; 64 * 1024 + 3]));
        for len in [1, 4096, 4097, 64 * 1024 + 3] {
            for at in [0, len / 2, len - 1] {
                let mut data = vec![0u8; len];
                data[at] = 1;
                assert!(!is_zeros(&data), "a 1 at {at} of {len}");
            }
        }
    }
}
