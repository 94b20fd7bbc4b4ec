//! Issue 10: no allocation in steady state. A counting global allocator (this test
//! binary's) counts the heap allocations of every engine step of a whole install
//! driven by the lengths-only driver; a step that made no request and no store
//! transaction (a chunk arrives, is written, the write completes, the slot is
//! synced) must make none. The first offending allocation's backtrace is kept and
//! printed on failure, naming the site.
#![cfg(feature = "testing")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use shoal_artifact::{ChunkId, ChunkRef, Chunking, Manifest, Payload, PayloadKind};
use shoal_engine::testing::{LengthsOnly, keys, sign};
use shoal_engine::{
    Config, DeviceState, Engine, Event, Instant, Slot, SourceClass, SourceId, SourceInfo,
    SourceKind, VerifiedRelease,
};

/// Counts the allocations of the thread that armed it.
struct Counting;

thread_local! {
    /// Whether this thread's allocations are counted.
    static ARMED: Cell<bool> = const { Cell::new(false) };
    /// Allocations counted on this thread.
    static COUNT: Cell<u64> = const { Cell::new(0) };
    /// Set while a backtrace is captured (its own allocations are not counted).
    static TRACING: Cell<bool> = const { Cell::new(false) };
    /// The backtrace of the first counted allocation.
    static FIRST: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Each counted allocation's site: the innermost frame of the engine.
    static SITES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

fn counted() {
    if !ARMED.with(Cell::get) || TRACING.with(Cell::get) {
        return;
    }
    COUNT.with(|c| c.set(c.get() + 1));
    TRACING.with(|t| t.set(true));
    let trace = std::backtrace::Backtrace::force_capture().to_string();
    SITES.with(|s| s.borrow_mut().push(site(&trace)));
    FIRST.with(|f| {
        if f.borrow().is_none() {
            *f.borrow_mut() = Some(trace);
        }
    });
    TRACING.with(|t| t.set(false));
}

/// The innermost `shoal_engine` frame of `trace`, with its location.
fn site(trace: &str) -> String {
    let mut lines = trace.lines();
    while let Some(l) = lines.next() {
        if l.contains("shoal_engine::") {
            let at = lines.next().unwrap_or_default().trim();
            return format!("{} {at}", l.trim());
        }
    }
    "(no engine frame)".to_string()
}

// Every method forwards to `System` with the caller's arguments unchanged, so it
// upholds `GlobalAlloc`'s contract exactly as `System` does.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        counted();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What [`count`] counted.
struct Allocations {
    /// How many.
    n: u64,
    /// The first one's backtrace.
    first: Option<String>,
    /// Each one's site.
    sites: Vec<String>,
}

/// Runs `f` with this thread's allocations counted.
fn count<T>(f: impl FnOnce() -> T) -> (T, Allocations) {
    COUNT.with(|c| c.set(0));
    FIRST.with(|f| *f.borrow_mut() = None);
    SITES.with(|s| s.borrow_mut().clear());
    ARMED.with(|a| a.set(true));
    let out = f();
    ARMED.with(|a| a.set(false));
    let a = Allocations {
        n: COUNT.with(Cell::get),
        first: FIRST.with(|f| f.borrow_mut().take()),
        sites: SITES.with(|s| std::mem::take(&mut *s.borrow_mut())),
    };
    (out, a)
}

const DEVICE: &str = "alloc-board";

/// A release of `n` chunks of varied sizes (1 to 64 KiB); every `repeat`-th chunk
/// is one same chunk (as the zero-filled regions of an image are), none if 0.
fn manifest(n: u32, repeat: u32) -> Manifest {
    let zero = ChunkId::from(blake3::hash(b"zero"));
    let chunks: Vec<ChunkRef> = (0..n)
        .map(|i| {
            if repeat > 0 && i % repeat == repeat - 1 {
                ChunkRef {
                    id: zero,
                    size: 32 * 1024,
                    stored_size: 32 * 1024,
                }
            } else {
                let size = 1024 + (i.wrapping_mul(2_654_435_761) % (63 * 1024));
                ChunkRef {
                    id: ChunkId::from(blake3::hash(&i.to_le_bytes())),
                    size,
                    stored_size: size,
                }
            }
        })
        .collect();
    let size = chunks.iter().map(|c| u64::from(c.size)).sum();
    Manifest {
        base: None,
        name: "alloc-os".into(),
        depends: BTreeMap::new(),
        version: "2".into(),
        chunking: Chunking {
            min_size: 1024,
            avg_size: 16 * 1024,
            max_size: 64 * 1024,
        },
        payloads: vec![Payload {
            hash: *blake3::hash(b"the payload").as_bytes(),
            kind: PayloadKind::RootfsImage,
            name: "rootfs".into(),
            size,
            references: Vec::new(),
            chunks,
        }],
        provides: BTreeMap::new(),
        dictionary: None,
        device_types: vec![DEVICE.into()],
        format_version: shoal_artifact::FORMAT_VERSION,
        security_counter: 2,
    }
}

fn server() -> SourceInfo {
    SourceInfo::new(
        SourceId(1),
        SourceKind::Requests,
        SourceClass::Wan,
        "server",
    )
}

/// What one whole install counted.
struct Counted {
    /// Steps that made no request and no store transaction.
    quiet: u64,
    /// Their allocations.
    allocations: u64,
    /// The first one's backtrace.
    first: Option<String>,
    /// Their sites, with how many each.
    sites: BTreeMap<String, u64>,
    /// Chunks handed over.
    chunks: u64,
    /// Requests and store transactions over the install.
    fetches: u64,
    persists: u64,
}

/// Counts the allocations of the quiet steps of one whole install of `manifest`.
fn install(manifest: &Manifest) -> Counted {
    let (key, root) = keys(3);
    let envelope = sign(manifest, &key);
    let rel = VerifiedRelease::verify(&root, envelope, None).expect("verifies");
    let mut config = Config::new(DEVICE, root);
    config.seed = 5;
    let mut engine = Engine::new(config, DeviceState::fresh(Slot::A, [0, 1 << 40]));
    let now = Instant::from_millis(0);
    engine
        .offer_verified(now, &rel, vec![server()], false)
        .expect("offered");
    let mut driver = LengthsOnly::new(manifest);
    // The driver's own queues have their room before counting starts.
    driver.pending.reserve(1 << 17);
    driver.events.reserve(1 << 10);
    driver.drain(&mut engine);
    let mut c = Counted {
        quiet: 0,
        allocations: 0,
        first: None,
        sites: BTreeMap::new(),
        chunks: 0,
        fetches: 0,
        persists: 0,
    };
    loop {
        let (f, p) = (driver.fetches, driver.persists);
        let (more, a) = count(|| driver.step(&mut engine, now));
        if !more {
            break;
        }
        if driver.fetches == f && driver.persists == p {
            c.quiet += 1;
            c.allocations += a.n;
            if c.first.is_none() {
                c.first = a.first;
            }
            for s in a.sites {
                *c.sites.entry(s).or_default() += 1;
            }
        }
    }
    assert!(
        driver
            .events
            .iter()
            .any(|e| matches!(e, Event::Armed { .. })),
        "the install did not arm its slot: {:?}",
        driver.events
    );
    c.chunks = driver.chunks;
    c.fetches = driver.fetches;
    c.persists = driver.persists;
    c
}

#[test]
fn steady_state_steps_do_not_allocate() {
    for (n, repeat) in [(20_000, 0), (20_000, 97), (40_000, 2)] {
        let c = install(&manifest(n, repeat));
        // Each chunk's arrival and its write's completion, at least.
        assert!(
            c.quiet > c.chunks,
            "{n} chunks: only {} quiet steps for {} chunks ({} requests, {} store transactions)",
            c.quiet,
            c.chunks,
            c.fetches,
            c.persists
        );
        assert_eq!(
            c.allocations,
            0,
            "{n} chunks (every {repeat}th repeated): {} allocations in {} steps that made no request and no store transaction ({} requests, {} store transactions); by site:\n{:#?}\nthe first:\n{}",
            c.allocations,
            c.quiet,
            c.fetches,
            c.persists,
            c.sites,
            c.first.unwrap_or_default()
        );
    }
}
