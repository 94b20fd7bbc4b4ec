//! The device's queue of signed status reports (`shoal_fleet::report`).
//!
//! Whatever changes the device's state — a standalone `shoal install` from a USB
//! stick, `boot-check` committing or rolling back, the daemon's deployment states —
//! is recorded as a report signed by the device key, with the time it happened and a
//! sequence number, and queued here until the daemon delivers it to the server
//! (`daemon::deliver`), oldest first. A device that never meets a server keeps its
//! reports (up to [`QUEUE_MAX`]); one that meets it later delivers them all, and the
//! server records them with their original times.
//!
//! Storage: its own redb file, `data_dir/reports.redb` (not the engine's store: the
//! daemon delivers while a `shoal install` may hold the engine's store, and the
//! queue's file is opened only for the moment a report is added or delivered).
//! Adding a report is one write transaction that takes the next sequence number,
//! stores the signed report and advances the counter, with redb's immediate
//! durability: once [`Queue::push`] returns the report survives a power cut, and a cut
//! during it leaves neither the report nor a used number. Sequence numbers are never
//! reused (the counter is kept when reports are delivered), which is what makes the
//! server's `(device, seq)` idempotence safe.
//!
//! | table     | key   | value                                               |
//! |-----------|-------|-----------------------------------------------------|
//! | `meta`    | `next_seq` | the next sequence number (`u64`)               |
//! | `pending` | seq   | the signed report (`report::Signed` as JSON)        |
//! | `refused` | seq   | a report the server refused for good, with why (JSON) |

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use shoal_fleet::Status;
use shoal_fleet::report::{Origin, Release, Report, Signed};
use shoal_signing::SecretKey;
use tracing::{info, warn};

use crate::config::Config;

/// The queue's file in `data_dir`.
pub const FILE_NAME: &str = "reports.redb";
/// The most undelivered reports kept; a report beyond them is not recorded (and says
/// so in the log). At a few hundred bytes each, that is a few MiB.
pub const QUEUE_MAX: u64 = 10_000;
/// The most refused reports kept (the oldest are dropped first).
pub const REFUSED_MAX: u64 = 1_000;
/// How long [`Queue::open`] waits while another shoal process has the queue open.
pub const OPEN_WAIT: Duration = Duration::from_secs(10);

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const PENDING: TableDefinition<u64, &str> = TableDefinition::new("pending");
const REFUSED: TableDefinition<u64, &str> = TableDefinition::new("refused");

/// Why the report queue failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another process kept the queue open for longer than [`OPEN_WAIT`].
    #[error("the report queue {path} is in use by another shoal process")]
    Busy {
        /// The queue file.
        path: PathBuf,
    },
    /// redb failed.
    #[error("report queue {path}: {message}")]
    Db {
        /// The queue file.
        path: PathBuf,
        /// redb's message.
        message: String,
    },
    /// The queue holds [`QUEUE_MAX`] undelivered reports already.
    #[error("the report queue {path} is full ({QUEUE_MAX} undelivered reports)")]
    Full {
        /// The queue file.
        path: PathBuf,
    },
    /// A stored report does not decode (the file is corrupt or from a newer version).
    #[error("report queue {path}: report {seq} is unreadable: {message}")]
    Corrupt {
        /// The queue file.
        path: PathBuf,
        /// Its sequence number.
        seq: u64,
        /// The decoder's message.
        message: String,
    },
}

/// A report to record: what happened. The queue adds the device, the sequence number
/// and the time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    /// What produced it.
    pub origin: Origin,
    /// The server deployment, if any.
    pub deployment: Option<String>,
    /// The release concerned, when known.
    pub release: Option<Release>,
    /// The state reached.
    pub status: Status,
    /// Details (cut to 256 bytes).
    pub substate: Option<String>,
}

/// A report the server refused for good, kept for an operator to read on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// The report.
    pub signed: Signed,
    /// The server's answer.
    pub reason: String,
}

/// The report queue. See the module documentation.
pub struct Queue {
    db: Database,
    path: PathBuf,
    /// [`QUEUE_MAX`], smaller in tests.
    max: u64,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("path", &self.path).finish()
    }
}

/// Unix milliseconds, `None` without a sane clock (see [`crate::device::wall_clock`]).
pub fn now_ms() -> Option<u64> {
    crate::device::wall_clock()?;
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_millis();
    u64::try_from(ms).ok()
}

impl Queue {
    /// Opens (creating if needed) the queue in `data_dir`, waiting up to
    /// [`OPEN_WAIT`] while another shoal process has it open.
    pub fn open(data_dir: &Path) -> Result<Queue, QueueError> {
        std::fs::create_dir_all(data_dir).map_err(|source| QueueError::Dir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(FILE_NAME);
        if !path.exists() {
            create_atomically(data_dir, &path)?;
        }
        let start = Instant::now();
        loop {
            match builder().open(&path) {
                Ok(db) => {
                    return Ok(Queue {
                        db,
                        path,
                        max: QUEUE_MAX,
                    });
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if start.elapsed() < OPEN_WAIT => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(QueueError::Busy { path });
                }
                Err(e) => {
                    return Err(QueueError::Db {
                        path,
                        message: e.to_string(),
                    });
                }
            }
        }
    }

    fn db_err(&self, e: impl std::fmt::Display) -> QueueError {
        QueueError::Db {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Signs `draft` with `key` as the next report and stores it durably; its
    /// sequence number. [`QueueError::Full`] (nothing stored) at [`QUEUE_MAX`].
    pub fn push(&self, key: &SecretKey, draft: Draft) -> Result<u64, QueueError> {
        self.push_at(key, draft, now_ms())
    }

    /// [`Queue::push`] with the time given (tests).
    pub fn push_at(
        &self,
        key: &SecretKey,
        draft: Draft,
        at_ms: Option<u64>,
    ) -> Result<u64, QueueError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let seq = {
            let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            let mut pending = txn.open_table(PENDING).map_err(|e| self.db_err(e))?;
            if pending.len().map_err(|e| self.db_err(e))? >= self.max {
                return Err(QueueError::Full {
                    path: self.path.clone(),
                });
            }
            let seq = meta
                .get("next_seq")
                .map_err(|e| self.db_err(e))?
                .map_or(1, |v| v.value());
            let mut report = Report {
                device_id: hex::encode(key.public().id().0),
                seq,
                at_ms,
                origin: draft.origin,
                deployment: draft.deployment,
                release: draft.release,
                status: draft.status,
                substate: draft.substate,
            };
            report.truncate_substate();
            let signed = Signed::seal(&report, |m| key.sign(m));
            let text = serde_json::to_string(&signed).map_err(|e| self.db_err(e))?;
            pending
                .insert(seq, text.as_str())
                .map_err(|e| self.db_err(e))?;
            meta.insert("next_seq", seq + 1)
                .map_err(|e| self.db_err(e))?;
            seq
        };
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(seq)
    }

    /// The oldest `max` undelivered reports, by sequence number.
    pub fn peek(&self, max: usize) -> Result<Vec<(u64, Signed)>, QueueError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = match txn.open_table(PENDING) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.db_err(e)),
        };
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| self.db_err(e))?.take(max) {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            let seq = k.value();
            let signed = serde_json::from_str(v.value()).map_err(|e| QueueError::Corrupt {
                path: self.path.clone(),
                seq,
                message: e.to_string(),
            })?;
            out.push((seq, signed));
        }
        Ok(out)
    }

    /// How many reports wait for delivery.
    #[cfg(test)]
    pub fn len(&self) -> Result<u64, QueueError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        match txn.open_table(PENDING) {
            Ok(t) => t.len().map_err(|e| self.db_err(e)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(self.db_err(e)),
        }
    }

    /// Whether no report waits for delivery.
    #[cfg(test)]
    pub fn is_empty(&self) -> Result<bool, QueueError> {
        Ok(self.len()? == 0)
    }

    /// Drops delivered reports (the server stored them, or had them already).
    pub fn delivered(&self, seqs: &[u64]) -> Result<(), QueueError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut pending = txn.open_table(PENDING).map_err(|e| self.db_err(e))?;
            for seq in seqs {
                pending.remove(*seq).map_err(|e| self.db_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Moves a report the server refused for good (a permanent 4xx) out of the way of
    /// the others, keeping it with the server's answer.
    pub fn refuse(&self, seq: u64, reason: &str) -> Result<(), QueueError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut pending = txn.open_table(PENDING).map_err(|e| self.db_err(e))?;
            let mut refused = txn.open_table(REFUSED).map_err(|e| self.db_err(e))?;
            let text = pending
                .remove(seq)
                .map_err(|e| self.db_err(e))?
                .map(|v| v.value().to_owned());
            if let Some(text) = text {
                let signed: Signed =
                    serde_json::from_str(&text).map_err(|e| QueueError::Corrupt {
                        path: self.path.clone(),
                        seq,
                        message: e.to_string(),
                    })?;
                let entry = serde_json::to_string(&Refused {
                    signed,
                    reason: reason.to_owned(),
                })
                .map_err(|e| self.db_err(e))?;
                refused
                    .insert(seq, entry.as_str())
                    .map_err(|e| self.db_err(e))?;
                while refused.len().map_err(|e| self.db_err(e))? > REFUSED_MAX {
                    refused.pop_first().map_err(|e| self.db_err(e))?;
                }
            }
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// The reports the server refused, oldest first.
    pub fn refused(&self) -> Result<Vec<(u64, Refused)>, QueueError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = match txn.open_table(REFUSED) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.db_err(e)),
        };
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            let seq = k.value();
            let r = serde_json::from_str(v.value()).map_err(|e| QueueError::Corrupt {
                path: self.path.clone(),
                seq,
                message: e.to_string(),
            })?;
            out.push((seq, r));
        }
        Ok(out)
    }
}

fn builder() -> redb::Builder {
    let mut b = Database::builder();
    b.set_cache_size(256 * 1024);
    b
}

/// Creates an empty queue under a name of this process and links it into place, so a
/// power cut never leaves a half-made queue, and two processes creating it at once
/// never replace one another's (the loser's link fails and it uses the winner's).
fn create_atomically(data_dir: &Path, path: &Path) -> Result<(), QueueError> {
    let tmp = data_dir.join(format!("{FILE_NAME}.{}.new", std::process::id()));
    let db_err = |e: &dyn std::fmt::Display| QueueError::Db {
        path: tmp.clone(),
        message: e.to_string(),
    };
    let io_err = |source| QueueError::Dir {
        path: data_dir.to_path_buf(),
        source,
    };
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(e)),
        _ => {}
    }
    {
        let db = builder().create(&tmp).map_err(|e| db_err(&e))?;
        let txn = db.begin_write().map_err(|e| db_err(&e))?;
        txn.open_table(META).map_err(|e| db_err(&e))?;
        txn.open_table(PENDING).map_err(|e| db_err(&e))?;
        txn.open_table(REFUSED).map_err(|e| db_err(&e))?;
        txn.commit().map_err(|e| db_err(&e))?;
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err)?;
    match std::fs::hard_link(&tmp, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(e));
        }
    }
    std::fs::remove_file(&tmp).map_err(io_err)?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err)
}

/// Records a report on this device: signs it with the device key (made if there is
/// none yet) and queues it. A failure is logged, never returned: a report that cannot
/// be queued must not fail the install it reports on.
pub fn record(config: &Config, draft: Draft) {
    let result = (|| -> anyhow::Result<u64> {
        let key = crate::daemon::device_key(&config.device.data_dir)?;
        let queue = Queue::open(&config.device.data_dir)?;
        Ok(queue.push(&key, draft.clone())?)
    })();
    match result {
        Ok(seq) => info!(
            seq,
            status = %draft.status,
            deployment = draft.deployment.as_deref().unwrap_or("-"),
            "status report queued"
        ),
        Err(e) => warn!(
            status = %draft.status,
            error = %crate::cmd::one_line(&e),
            "cannot queue a status report"
        ),
    }
}

/// The report of a settled trial boot (after `boot-check`, `commit` or `rollback`),
/// or `None` when nothing was settled. The release and outcome come from the device
/// status; a deployment the daemon rebooted for is named (origin `daemon`).
pub fn settled(config: &Config, result: &crate::device::BootCheck) -> Option<Draft> {
    use crate::device::BootCheck;
    let (status, substate) = match result {
        BootCheck::Committed { slot, .. } => (Status::Success, format!("committed in slot {slot}")),
        BootCheck::RolledBack { reason, slot, .. } => (
            Status::Failure,
            format!("rolled back from slot {slot}: {reason}"),
        ),
        BootCheck::Nothing | BootCheck::TrialPending { .. } | BootCheck::InstallUnfinished => {
            return None;
        }
    };
    let release = crate::device::read_status(config)
        .ok()
        .and_then(|(s, _)| s.last)
        .map(|o| Release {
            name: o.release.name,
            version: o.release.version,
        });
    let deployment = crate::daemon::deployment_of(config, release.as_ref());
    Some(Draft {
        origin: if deployment.is_some() {
            Origin::Daemon
        } else {
            Origin::Standalone
        },
        deployment,
        release,
        status,
        substate: Some(substate),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(status: Status) -> Draft {
        Draft {
            origin: Origin::Standalone,
            deployment: None,
            release: Some(Release {
                name: "os".into(),
                version: "2".into(),
            }),
            status,
            substate: Some("x".repeat(400)),
        }
    }

    #[test]
    fn reports_are_numbered_signed_and_kept_until_delivered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SecretKey::from_seed(&[9; 32]);
        {
            let q = Queue::open(dir.path()).expect("open");
            assert_eq!(
                q.push_at(&key, draft(Status::Installing), Some(5))
                    .expect("push"),
                1
            );
            assert_eq!(
                q.push_at(&key, draft(Status::Success), None).expect("push"),
                2
            );
        }
        // Reopened (a restart): both are there, in order, signed by the key.
        let q = Queue::open(dir.path()).expect("reopen");
        let got = q.peek(10).expect("peek");
        assert_eq!(got.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2]);
        let r = got[0]
            .1
            .verify(|m, sig| key.public().verify(m, sig))
            .expect("verifies");
        assert_eq!(r.seq, 1);
        assert_eq!(r.at_ms, Some(5));
        assert_eq!(r.status, Status::Installing);
        assert_eq!(r.device_id, hex::encode(key.public().id().0));
        assert_eq!(r.substate.as_deref().map(str::len), Some(256));
        let other = SecretKey::from_seed(&[8; 32]);
        assert!(
            got[0]
                .1
                .verify(|m, sig| other.public().verify(m, sig))
                .is_err()
        );
        assert_eq!(got[1].1.claimed().expect("claimed").at_ms, None);

        // Delivered reports go; their numbers are never reused.
        q.delivered(&[1, 2]).expect("delivered");
        assert!(q.is_empty().expect("len"));
        assert_eq!(
            q.push_at(&key, draft(Status::Failure), None).expect("push"),
            3
        );
        q.refuse(3, "409: different content").expect("refuse");
        assert!(q.is_empty().expect("len"));
        let refused = q.refused().expect("refused");
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, 3);
        assert_eq!(refused[0].1.reason, "409: different content");
        drop(q);
        let q = Queue::open(dir.path()).expect("reopen");
        assert_eq!(
            q.push_at(&key, draft(Status::Success), None).expect("push"),
            4
        );
    }

    #[test]
    fn a_full_queue_refuses_more_and_keeps_what_it_has() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SecretKey::from_seed(&[9; 32]);
        let mut q = Queue::open(dir.path()).expect("open");
        q.max = 20;
        let mut d = draft(Status::Downloading);
        d.substate = None;
        for _ in 0..20 {
            q.push_at(&key, d.clone(), None).expect("push");
        }
        let e = q.push_at(&key, d, None).expect_err("full");
        assert!(matches!(e, QueueError::Full { .. }), "{e}");
        assert_eq!(q.len().expect("len"), 20);
        assert_eq!(q.peek(1).expect("peek")[0].0, 1);
    }

    #[test]
    fn a_second_process_waits_for_the_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Queue::open(dir.path()).expect("open");
        let path = dir.path().to_path_buf();
        let t = std::thread::spawn(move || Queue::open(&path).map(|_| ()));
        std::thread::sleep(Duration::from_millis(200));
        drop(q);
        t.join()
            .expect("join")
            .expect("opened after the first closed");
    }

    #[test]
    fn a_corrupt_report_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Queue::open(dir.path()).expect("open");
        let txn = q.db.begin_write().expect("txn");
        txn.open_table(PENDING)
            .expect("table")
            .insert(7, "{not json")
            .expect("insert");
        txn.commit().expect("commit");
        let e = q.peek(10).expect_err("corrupt");
        assert!(matches!(e, QueueError::Corrupt { seq: 7, .. }), "{e}");
    }
}
