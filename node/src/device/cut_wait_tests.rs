//! The driver serves a [`Requests`] source while a cut of the running slot runs
//! (issue 10: no source, and no slow disk, stalls an install): the source's
//! answers, the engine's timers and a withdrawn deployment are not left waiting
//! for the cut's end.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use shoal_artifact::ChunkId;
use shoal_bootctl::Slot;
use shoal_bootctl::control::SlotStorage;
use shoal_bootctl::storage::Storage;
use shoal_bootctl::testing::CrashSlots;
use shoal_engine::{RequestId, SourceClass, SourceLimits};

use super::crash_tests::{fixture, fresh_disk, try_device_with_slots};
use super::{Answer, Requests, Source, slotio};

/// How long each read of the running slot takes (an SD card: a 1 MiB block at
/// 20 MB/s is ~50 ms).
const READ_DELAY: Duration = Duration::from_millis(50);
/// The running slot's size: a cut of it reads this many 1 MiB blocks (a few
/// ahead of the one cut).
const RUNNING_SLOT: usize = 16 * slotio::BLOCK;

/// What the slow running slot saw: bytes read, and whether a read started.
#[derive(Debug, Default)]
struct Reads {
    bytes: AtomicU64,
    started: AtomicBool,
}

/// A storage read slowly: each read sleeps [`READ_DELAY`] first.
#[derive(Debug)]
struct Slow {
    inner: Box<dyn Storage>,
    reads: Arc<Reads>,
}

impl Storage for Slow {
    forward_storage!();

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.reads.started.store(true, Ordering::SeqCst);
        std::thread::sleep(READ_DELAY);
        self.reads
            .bytes
            .fetch_add(buf.len() as u64, Ordering::SeqCst);
        self.inner.read_at(offset, buf)
    }
}

/// The crash disk's slots, slot A (the running one) read through [`Slow`].
#[derive(Debug)]
struct SlowRunning {
    inner: CrashSlots,
    reads: Arc<Reads>,
}

impl SlotStorage for SlowRunning {
    fn open(&self, slot: Slot, writable: bool) -> io::Result<Box<dyn Storage>> {
        let inner = self.inner.open(slot, writable)?;
        Ok(if slot == Slot::A && !writable {
            Box::new(Slow {
                inner,
                reads: Arc::clone(&self.reads),
            })
        } else {
            inner
        })
    }

    fn describe(&self, slot: Slot) -> String {
        self.inner.describe(slot)
    }
}

/// A server whose deployment is aborted as soon as the running slot's first read
/// starts (while the cut runs); it answers nothing.
struct Withdrawn {
    reads: Arc<Reads>,
}

impl Requests for Withdrawn {
    fn send(&mut self, _request: RequestId, _ids: Vec<ChunkId>) {}

    fn cancel(&mut self, _request: RequestId) {}

    fn wait(&mut self, timeout: Duration) -> Vec<Answer> {
        std::thread::sleep(timeout);
        Vec::new()
    }

    fn bytes_read(&self) -> u64 {
        0
    }

    fn stop_reason(&self) -> Option<String> {
        self.reads
            .started
            .load(Ordering::SeqCst)
            .then(|| "the server aborted the deployment".to_owned())
    }
}

/// A deployment withdrawn while the first cut of a slow running slot runs stops
/// the install then, and the cut with it: the slot is not read to its end first.
#[test]
fn a_deployment_withdrawn_during_a_slow_cut_stops_it() {
    let f = fixture();
    let disk = fresh_disk(&f);
    // Slot A: the factory image, in a slot larger than it (a cut of 16 blocks).
    let mut a = f.factory.clone();
    a.resize(RUNNING_SLOT, 0);
    disk.put("a", &a);
    let reads = Arc::new(Reads::default());
    let mut dev = try_device_with_slots(
        &f,
        &disk,
        Box::new(SlowRunning {
            inner: CrashSlots::new(&disk, "a", "b"),
            reads: Arc::clone(&reads),
        }),
    )
    .expect("device");
    let envelope =
        shoal_artifact::read::ArtifactReader::open(io::Cursor::new(&f.artifact), &f.root, None)
            .expect("artifact")
            .envelope()
            .to_bytes();
    let release = dev.verify_envelope(envelope).expect("verifies");
    let source = Source::Remote {
        name: "server".into(),
        release,
        limits: SourceLimits::for_class(SourceClass::Wan),
        requests: Box::new(Withdrawn {
            reads: Arc::clone(&reads),
        }),
    };
    let e = dev
        .install(source, false, &mut |_| {})
        .expect_err("withdrawn");
    assert!(
        format!("{e:#}").contains("the server aborted the deployment"),
        "{e:#}"
    );
    // The cut reads 1 MiB blocks, a few ahead: it was stopped within a few of
    // them, not run over the whole slot.
    let read = reads.bytes.load(Ordering::SeqCst);
    assert!(
        read <= RUNNING_SLOT as u64 / 2,
        "{read} bytes of the {RUNNING_SLOT}-byte running slot read"
    );
}
