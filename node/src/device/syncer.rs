//! Syncing the slot being written, and journaling what each sync made durable, on
//! a thread of its own.
//!
//! The engine asks for a sync of the target slot after every batch of writes and
//! then for the journal record of that batch ([`shoal_engine::Output::Sync`], then
//! [`shoal_engine::Output::Persist`]). Carried out in line, each sync stops the
//! install until the medium has the batch. The [`Syncer`] takes both in order on
//! its own thread instead, while the driver goes on decoding and writing the next
//! batch: a record is still persisted only after the sync before it returned, so
//! the journal never claims a byte the slot may not hold. The read-back of the
//! written slot ([`Verifier`]) rides along, told of each write and of each
//! completed sync.
//!
//! The first failure stops the thread's work (nothing after a failed sync is
//! persisted) and is handed back to the driver, which tells the engine. Anything
//! that must not run before the journal is current (a bootloader change, the
//! final verification) waits for the queue to drain ([`Syncer::barrier`]).

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use shoal_bootctl::SlotWriter;
use shoal_engine::{IoOp, Record};

use super::slotio::Verifier;
use super::store::Store;
use crate::cmd::chain;

/// Jobs queued ahead of the thread at most (a sync and a journal record per
/// batch): the driver runs at most about two batches ahead of the medium.
const QUEUE: usize = 4;

/// Why the thread's work failed: the operation and the message for the engine.
pub type Failure = (IoOp, String);

enum Job {
    /// Syncs; the ranges `(offset, len)` written since the last sync are then
    /// durable.
    Sync(Vec<(u64, u64)>),
    Persist(Vec<Record>),
    /// Answered once every job before it is done.
    Barrier(mpsc::Sender<()>),
    /// Syncs (as [`Job::Sync`]), then answers with the payload's hash from the
    /// read-back (or `None` without a verifier).
    Finish(
        Vec<(u64, u64)>,
        mpsc::Sender<Result<Option<[u8; 32]>, Failure>>,
    ),
}

/// See the module documentation.
pub struct Syncer {
    tx: Option<mpsc::SyncSender<Job>>,
    /// Writes since the last queued sync.
    written: Vec<(u64, u64)>,
    failures: mpsc::Receiver<Failure>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer").finish_non_exhaustive()
    }
}

impl Syncer {
    /// Starts the thread: `sync` is a second writer of the slot being written
    /// (a sync through it makes every write of the slot durable), `store` the
    /// journal, `verifier` the read-back of the slot, if any.
    pub fn start(sync: SlotWriter, store: Arc<Store>, verifier: Option<Verifier>) -> Syncer {
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        let (fail_tx, failures) = mpsc::channel();
        let worker = std::thread::spawn(move || run(&rx, sync, &store, verifier, &fail_tx));
        Syncer {
            tx: Some(tx),
            written: Vec::new(),
            failures,
            worker: Some(worker),
        }
    }

    fn send(&self, job: Job) -> Result<(), Failure> {
        self.tx
            .as_ref()
            .expect("not finished")
            .send(job)
            .map_err(|_| (IoOp::Sync, "the syncing thread stopped".to_owned()))
    }

    /// `len` bytes were written at `offset` (not yet durable).
    pub fn wrote(&mut self, offset: u64, len: u64) {
        match self.written.last_mut() {
            Some((start, n)) if *start + *n == offset => *n += len,
            _ => self.written.push((offset, len)),
        }
    }

    /// Queues a sync of every write so far (waiting while two batches are queued).
    pub fn sync(&mut self) -> Result<(), Failure> {
        let written = std::mem::take(&mut self.written);
        self.send(Job::Sync(written))
    }

    /// Queues journal records, persisted once every sync before them returned.
    pub fn persist(&self, records: Vec<Record>) -> Result<(), Failure> {
        self.send(Job::Persist(records))
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
        // The thread drops the sender without answering only when it stopped.
        rx.recv()
            .map_err(|_| (IoOp::Sync, "the syncing thread stopped".to_owned()))?;
        match self.failure() {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }

    /// Syncs and finishes the read-back: the payload's hash, or `None` when there
    /// was no verifier. Stops the thread.
    pub fn finish(mut self) -> Result<Option<[u8; 32]>, Failure> {
        let (tx, rx) = mpsc::channel();
        let written = std::mem::take(&mut self.written);
        self.send(Job::Finish(written, tx))?;
        let answer = rx.recv().map_err(|_| match self.failure() {
            Some(failure) => failure,
            None => (IoOp::Sync, "the syncing thread stopped".to_owned()),
        })?;
        self.stop();
        answer
    }

    fn stop(&mut self) {
        // The thread does every job queued before the channel closed, then ends.
        self.tx.take();
        if let Some(worker) = self.worker.take() {
            worker.join().expect("the syncing thread panicked");
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        // An install that stopped early still journals what it synced.
        self.stop();
    }
}

fn run(
    rx: &mpsc::Receiver<Job>,
    mut sync: SlotWriter,
    store: &Store,
    mut verifier: Option<Verifier>,
    failures: &mpsc::Sender<Failure>,
) {
    let mut failed = false;
    let fail = |op: IoOp, message: String| {
        tracing::warn!(%op, %message, "output failed");
        let _ = failures.send((op, message));
    };
    while let Ok(job) = rx.recv() {
        match job {
            // After a failure nothing more is synced or persisted: the journal
            // stays at the last batch known durable.
            Job::Sync(written) if !failed => match sync.sync() {
                Ok(()) => {
                    if let Some(v) = verifier.as_mut() {
                        for (offset, len) in written {
                            v.wrote(offset, len);
                        }
                        v.synced();
                    }
                }
                Err(e) => {
                    failed = true;
                    fail(IoOp::Sync, chain(&e));
                }
            },
            Job::Persist(records) if !failed => {
                if let Err(e) = store.apply(&records) {
                    failed = true;
                    fail(IoOp::Persist, chain(&e));
                }
            }
            Job::Sync(_) | Job::Persist(_) => {}
            Job::Barrier(answer) => {
                let _ = answer.send(());
            }
            Job::Finish(written, answer) => {
                if let Some(v) = verifier.as_mut() {
                    for (offset, len) in written {
                        v.wrote(offset, len);
                    }
                }
                let result = if failed {
                    Err((
                        IoOp::Sync,
                        "an earlier sync or journal write failed".to_owned(),
                    ))
                } else {
                    sync.sync()
                        .map_err(|e| (IoOp::Sync, chain(&e)))
                        .and_then(|()| match verifier.take() {
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
