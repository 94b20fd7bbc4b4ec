//! When the cut of the active slot gives up ([`Engine::index_pays`]): a slot that
//! holds (next to) nothing of the release, with every chunk from a local source
//! that holds them all. Each test cuts the slot as a device's driver does
//! ([`SimDevice::cut_progress`]: the needed chunks met handed over, the progress
//! told every 64 KiB) on a 2 MiB slot, with a 512 KiB sample (a quarter of the
//! slot, as 64 MiB is an eighth of the bench's 512 MiB slot).

use shoal_artifact::{ChunkId, Manifest};
use shoal_signing::{SecretKey, TrustRoot};

use crate::state::slot_ordinal;
use crate::testing::{SimDevice, bytes, keys, release, sign};
use crate::{
    Config, Engine, Event, Holds, InstallError, Offer, Slot, SourceClass, SourceId, SourceInfo,
    SourceKind,
};

const DEVICE: &str = "acme-board";
const MIB: usize = 1024 * 1024;
const SAMPLE: u64 = 512 * 1024;

struct Fixture {
    key: SecretKey,
    root: TrustRoot,
}

impl Fixture {
    fn new() -> Fixture {
        let (key, root) = keys(7);
        Fixture { key, root }
    }

    fn config(&self) -> Config {
        let mut c = Config::new(DEVICE, self.root.clone());
        c.journal_batch_bytes = 64 * 1024;
        c.index_sample_min_bytes = SAMPLE;
        c
    }

    fn offer(&self, m: &Manifest, sources: Vec<SourceInfo>) -> Offer {
        Offer {
            envelope: sign(m, &self.key),
            wall_unix_s: None,
            sources,
            reboot: false,
        }
    }
}

/// The artifact file: a local stream that holds every chunk (a full artifact).
fn artifact() -> SourceInfo {
    SourceInfo::new(
        SourceId(1),
        SourceKind::Stream,
        SourceClass::Local,
        "artifact",
    )
    .holding(Holds::All)
}

fn failed(events: &[Event]) -> Option<&InstallError> {
    events.iter().find_map(|e| match e {
        Event::Failed(err) => Some(err),
        _ => None,
    })
}

fn stopped(events: &[Event]) -> Option<(u64, u64)> {
    events.iter().find_map(|e| match e {
        Event::IndexStopped { cut, found, .. } => Some((*cut, *found)),
        _ => None,
    })
}

/// A release of 1 MiB: random data, then (from 640 KiB) zeros, as a file
/// system's free space.
fn v2() -> Vec<u8> {
    let mut v2 = bytes(2, MIB);
    v2[640 * 1024..].fill(0);
    v2
}

/// A device whose slot A holds `slot_a`, cutting it as a driver does.
fn device(slot_a: &[u8]) -> SimDevice {
    let mut dev = SimDevice::new(slot_a, 2 * MIB as u64, 1);
    dev.cut_progress = Some(64 * 1024);
    dev
}

/// Offers v2 with `sources`, streams the artifact's chunks from source 1 when it is
/// one, runs to the armed trial and checks slot B holds v2. Returns the engine.
fn install(f: &Fixture, dev: &mut SimDevice, sources: Vec<SourceInfo>) -> Engine {
    install_image(f, dev, sources, &v2())
}

/// [`install`] of a release of `image`.
fn install_image(
    f: &Fixture,
    dev: &mut SimDevice,
    sources: Vec<SourceInfo>,
    image: &[u8],
) -> Engine {
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, image);
    for s in sources.iter().filter(|s| s.kind == SourceKind::Requests) {
        dev.stores.insert(s.id, c2.iter().cloned().collect());
    }
    let streams = sources.iter().any(|s| s.id == SourceId(1));
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), f.offer(&m2, sources))
        .expect("offer");
    let chunks: Vec<(ChunkId, Vec<u8>)> = c2.clone();
    let stream = streams.then(|| (SourceId(1), chunks.into_iter()));
    dev.run(&mut engine, stream).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(dev.boot.armed(), Some(Slot::B));
    assert_eq!(&dev.durable[1][..image.len()], image, "slot B holds v2");
    engine
}

/// An unrelated slot (random data) and a full artifact: the cut stops once its
/// sample is cut, nothing found, and the slot has no index afterwards (what was
/// cut is not taken for the whole slot).
#[test]
fn the_cut_of_an_unrelated_slot_stops_after_its_sample_with_a_local_full_source() {
    let f = Fixture::new();
    let mut dev = device(&bytes(99, 2 * MIB));
    let engine = install(&f, &mut dev, vec![artifact()]);
    assert_eq!(dev.cuts_stopped.len(), 1, "one cut, stopped");
    let cut = dev.cuts_stopped[0];
    assert!(
        (SAMPLE..SAMPLE + 64 * 1024).contains(&cut),
        "stopped at {cut}"
    );
    assert_eq!(stopped(&dev.events), Some((cut, 0)));
    assert_eq!(engine.progress().reused_bytes, 0);
    assert_eq!(dev.store.load().active_index, None, "no index recorded");
    assert_eq!(engine.active_chunking(), None);
}

/// A local request source that holds every chunk (a chunk store that says so)
/// and an unrelated slot: once the cut stops, no chunk is looked for at its own
/// offset in the slot (the part cut showed the slot unrelated); all come from the
/// source.
#[test]
fn after_the_cut_stops_no_chunk_is_read_at_its_own_offset() {
    let f = Fixture::new();
    let mut dev = device(&bytes(99, 2 * MIB));
    let store = SourceInfo::new(
        SourceId(2),
        SourceKind::Requests,
        SourceClass::Local,
        "store",
    )
    .holding(Holds::All);
    let engine = install(&f, &mut dev, vec![store]);
    assert!(stopped(&dev.events).is_some(), "the cut stopped");
    assert_eq!(dev.slot_reads, 0, "no read of the active slot");
    assert_eq!(engine.progress().reused_bytes, 0);
}

/// A local chunk store that says it holds every chunk but answered that it lacks
/// one: that chunk is not served locally by what a source says it holds, and the
/// cut of an unrelated slot goes on (another local source, which does not say
/// what it holds, brings it).
#[test]
fn a_chunk_a_holder_said_it_lacks_keeps_the_cut_going() {
    let f = Fixture::new();
    let mut dev = device(&bytes(99, 2 * MIB));
    let image = v2();
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &image);
    let holder = SourceInfo::new(SourceId(2), SourceKind::Requests, SourceClass::Local, "usb")
        .holding(Holds::All);
    let other = SourceInfo::new(
        SourceId(3),
        SourceKind::Requests,
        SourceClass::Local,
        "disk",
    );
    let lacked = c2[0].0;
    let mut held: std::collections::BTreeMap<ChunkId, Vec<u8>> = c2.iter().cloned().collect();
    held.remove(&lacked);
    dev.stores.insert(SourceId(2), held);
    dev.stores.insert(SourceId(3), c2.iter().cloned().collect());
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), f.offer(&m2, vec![holder, other]))
        .expect("offer");
    dev.handle(
        &mut engine,
        crate::Input::Unavailable {
            source: SourceId(2),
            id: lacked,
        },
    );
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(
        &dev.durable[1][..image.len()],
        &image[..],
        "slot B holds v2"
    );
    assert_eq!(stopped(&dev.events), None, "the cut runs to the end");
    assert!(dev.cuts_stopped.is_empty());
}

/// A slot of zeros (an erased partition) holds the release's zero chunk only: a
/// few KiB found in the sample, under a 64th of it, and the cut stops.
#[test]
fn the_cut_of_a_slot_of_zeros_stops_after_its_sample() {
    let f = Fixture::new();
    let mut dev = device(&[]);
    let engine = install(&f, &mut dev, vec![artifact()]);
    let (cut, found) = stopped(&dev.events).expect("the cut stopped");
    assert_eq!(found, 4096, "the one zero chunk, found and taken");
    assert!(cut >= SAMPLE);
    assert!(
        engine.progress().reused_bytes > 0,
        "the zero chunk's positions"
    );
    assert_eq!(dev.store.load().active_index, None);
}

/// A slot that holds an earlier release all along: every window gives new chunks,
/// and the cut runs to the end (and is the slot's index).
#[test]
fn the_cut_of_a_slot_holding_an_earlier_release_all_along_runs_to_the_end() {
    let f = Fixture::new();
    let v1 = bytes(5, 2 * MIB);
    let mut image = v1.clone();
    image[300_000..400_000].copy_from_slice(&bytes(3, 100_000));
    let mut dev = device(&v1);
    let engine = install_image(&f, &mut dev, vec![artifact()], &image);
    assert_eq!(stopped(&dev.events), None);
    assert!(dev.cuts_stopped.is_empty());
    assert!(engine.progress().reused_bytes > 3 * MIB as u64 / 2);
    assert!(
        dev.store.load().active_index.is_some(),
        "the whole index is recorded"
    );
}

/// A slot that holds an earlier release followed by its free space (zeros): the
/// cut goes on while its windows give new chunks, stops after the first window
/// that gives none, and takes from the slot every chunk a whole cut would have
/// (what a WAN source among the sources, which keeps the cut going, shows).
#[test]
fn the_cut_of_a_slot_holding_an_earlier_release_stops_only_past_its_data() {
    let f = Fixture::new();
    let mut v1 = v2();
    v1[300_000..400_000].copy_from_slice(&bytes(3, 100_000));
    let mut dev = device(&v1);
    let engine = install(&f, &mut dev, vec![artifact()]);
    let (cut, found) = stopped(&dev.events).expect("stopped in the free space");
    // The data and the zero chunk lie in the first 640 KiB: the sample (to 512
    // KiB) and the next half-window (to 768 KiB) give new chunks, the next (768
    // KiB to 1 MiB) none.
    assert!(
        (MIB as u64..MIB as u64 + 64 * 1024).contains(&cut),
        "stopped at {cut}"
    );
    let mut whole = device(&v1);
    let wan = SourceInfo::new(
        SourceId(2),
        SourceKind::Requests,
        SourceClass::Wan,
        "server",
    );
    let all = install(&f, &mut whole, vec![artifact(), wan]);
    assert!(whole.cuts_stopped.is_empty());
    assert_eq!(engine.progress().reused_bytes, all.progress().reused_bytes);
    assert!(found > 500_000, "found {found}");
    assert_eq!(dev.store.load().active_index, None, "no index recorded");
}

/// A WAN source among the sources: every chunk found saves a download, and the
/// cut of an unrelated slot runs to the end.
#[test]
fn the_cut_runs_to_the_end_with_a_wan_source() {
    let f = Fixture::new();
    let mut dev = device(&bytes(99, 2 * MIB));
    let wan = SourceInfo::new(
        SourceId(2),
        SourceKind::Requests,
        SourceClass::Wan,
        "server",
    );
    install(&f, &mut dev, vec![artifact(), wan]);
    assert_eq!(stopped(&dev.events), None);
    assert!(dev.cuts_stopped.is_empty());
    assert!(dev.store.load().active_index.is_some());
}

/// A LAN peer alone, or a local source that does not say what it holds (a chunk
/// store: what it lacks would come from elsewhere): the cut runs to the end.
#[test]
fn the_cut_runs_to_the_end_without_a_local_source_holding_everything() {
    let f = Fixture::new();
    let peer = SourceInfo::new(SourceId(2), SourceKind::Requests, SourceClass::Peer, "peer")
        .holding(Holds::All);
    let store = SourceInfo::new(
        SourceId(3),
        SourceKind::Requests,
        SourceClass::Local,
        "store",
    );
    for sources in [vec![peer], vec![store]] {
        let mut dev = device(&bytes(99, 2 * MIB));
        install(&f, &mut dev, sources);
        assert_eq!(stopped(&dev.events), None);
        assert!(dev.cuts_stopped.is_empty());
    }
}

/// A thin artifact (it lacks chunks the slot must hold): nothing is taken while
/// indexing and the index is needed whole, so it is never given up, even on an
/// unrelated slot (where the install is then refused untouched).
#[test]
fn the_cut_for_a_thin_artifact_is_never_given_up() {
    let f = Fixture::new();
    let image = v2();
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &image);
    let mut dev = device(&bytes(99, 2 * MIB));
    let holds = c2.iter().skip(1).map(|(id, _)| *id).collect();
    let mut engine = dev.engine(f.config());
    engine
        .offer(
            dev.now(),
            f.offer(&m2, vec![artifact().holding(Holds::Ids(holds))]),
        )
        .expect("offer");
    assert!(
        engine.index_pays(u64::MAX),
        "a thin artifact's index always pays"
    );
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(stopped(&dev.events), None);
    assert!(matches!(
        failed(&dev.events),
        Some(InstallError::MissingChunks { .. })
    ));
    assert_eq!(dev.durable[1], vec![0u8; 2 * MIB], "slot B untouched");
}

/// An install whose cut stopped, cut off by a power loss, resumes: offered again,
/// it cuts the slot again (no index was recorded), stops again and completes.
#[test]
fn an_install_whose_cut_stopped_resumes_after_a_power_loss() {
    let f = Fixture::new();
    let image = v2();
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &image);
    // The operations of a whole install, to cut the power two thirds in.
    let mut clean = device(&bytes(99, 2 * MIB));
    install(&f, &mut clean, vec![artifact()]);
    let mut dev = device(&bytes(99, 2 * MIB));
    dev.crash_at = Some(dev.ops + clean.ops * 2 / 3);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), f.offer(&m2, vec![artifact()]))
        .expect("offer");
    let crashed = dev.run(&mut engine, Some((SourceId(1), c2.clone().into_iter())));
    assert!(crashed.is_err(), "the power was cut");
    assert_eq!(dev.cuts_stopped.len(), 1, "after the cut stopped");
    dev.reboot();
    assert_eq!(dev.store.load().active_index, None);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), f.offer(&m2, vec![artifact()]))
        .expect("offer again");
    assert!(
        engine.progress().resumed_bytes > 0,
        "journaled work is kept"
    );
    dev.run(&mut engine, Some((SourceId(1), c2.into_iter())))
        .expect("no crash");
    assert_eq!(dev.cuts_stopped.len(), 2, "cut again, stopped again");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(dev.boot.armed(), Some(Slot::B));
    assert_eq!(
        &dev.durable[slot_ordinal(Slot::B)][..image.len()],
        &image[..]
    );
}

// A cut stopped, then resumed (`Output::CutRest`): the reason for the stop no
// longer holds. Slot A: 1 MiB of unrelated data, then the first 512 KiB of v2
// (its chunks 0..128), then zeros (v2's zero chunk); v2's chunks 128..160 are in
// no slot. The cut stops after its 512 KiB sample, having found nothing.

/// Bytes of a 4 KiB chunk of the test releases.
const CHUNK: u64 = 4096;

/// Slot A: unrelated data to 1 MiB, v2's first 512 KiB, zeros.
fn slot_with_v2_past_the_cut() -> Vec<u8> {
    let mut a = bytes(99, 2 * MIB);
    a[MIB..MIB + MIB / 2].copy_from_slice(&v2()[..MIB / 2]);
    a[MIB + MIB / 2..].fill(0);
    a
}

/// A USB stick's chunk store: a local request source that says it holds every
/// chunk, answering a chunk every 10 ms.
fn stick(dev: &mut SimDevice, chunks: &[(ChunkId, Vec<u8>)]) -> SourceInfo {
    dev.stores
        .insert(SourceId(2), chunks.iter().cloned().collect());
    dev.links.insert(
        SourceId(2),
        crate::testing::Link {
            rtt_us: 1000,
            per_chunk_us: 10_000,
            bytes_per_s: 0,
            silent: false,
        },
    );
    SourceInfo::new(SourceId(2), SourceKind::Requests, SourceClass::Local, "usb")
        .holding(Holds::All)
}

/// The server, holding every chunk.
fn server(dev: &mut SimDevice, chunks: &[(ChunkId, Vec<u8>)]) -> SourceInfo {
    dev.stores
        .insert(SourceId(3), chunks.iter().cloned().collect());
    SourceInfo::new(
        SourceId(3),
        SourceKind::Requests,
        SourceClass::Wan,
        "server",
    )
}

fn resumed(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::CutResumed { from, .. } => Some(*from),
            _ => None,
        })
        .collect()
}

/// v2 offered over a stick holding all of it to a device whose active slot is
/// `slot`, under `budget` (WAN wire bytes), run until the slot's cut stopped
/// (30 ms in).
struct Stopped {
    f: Fixture,
    image: Vec<u8>,
    c2: Vec<(ChunkId, Vec<u8>)>,
    dev: SimDevice,
    engine: Engine,
}

fn stopped_over_a_stick(slot: &[u8], budget: Option<u64>) -> Stopped {
    let f = Fixture::new();
    let image = v2();
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &image);
    let mut dev = device(slot);
    let usb = stick(&mut dev, &c2);
    let mut config = f.config();
    config.wan_budget_bytes = budget;
    let mut engine = dev.engine(config);
    engine
        .offer(dev.now(), f.offer(&m2, vec![usb]))
        .expect("offer");
    dev.run_until(&mut engine, None, 30).expect("no crash");
    assert!(stopped(&dev.events).is_some(), "the cut stopped");
    Stopped {
        f,
        image,
        c2,
        dev,
        engine,
    }
}

/// The server comes (holding every chunk), then the stick is pulled out. The
/// server first: with no source left between the two, the install would fail as
/// stuck (the cut is not resumed for the slot alone).
fn server_then_no_stick(dev: &mut SimDevice, engine: &mut Engine, c2: &[(ChunkId, Vec<u8>)]) {
    let wan = server(dev, c2);
    engine.add_source(dev.now(), wan).expect("add the server");
    engine
        .remove_source(dev.now(), SourceId(2))
        .expect("pull the stick out");
}

/// A USB-stick install whose cut stopped; the server shows up 300 ms in (the
/// stick has brought about 30 chunks), the stick is pulled out 100 ms later. The
/// server's arrival resumes the cut where it stopped, which takes from the slot
/// every chunk it holds that the stick had not brought: only chunks in no slot
/// come over the WAN (without the resume, every chunk left when the stick goes,
/// most of them in the slot, did).
#[test]
fn a_wan_source_added_after_the_stop_resumes_the_cut_and_the_slot_serves_what_it_holds() {
    let f = Fixture::new();
    let image = v2();
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &image);
    let mut dev = device(&slot_with_v2_past_the_cut());
    let usb = stick(&mut dev, &c2);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), f.offer(&m2, vec![usb]))
        .expect("offer");
    dev.run_until(&mut engine, None, 300).expect("no crash");
    let (cut, found) = stopped(&dev.events).expect("the cut stopped");
    assert_eq!((cut, found), (SAMPLE, 0));
    let from_usb = engine.progress().local_bytes;
    assert!(
        (10 * CHUNK..100 * CHUNK).contains(&from_usb),
        "the stick brought {from_usb} bytes by then"
    );
    let wan = server(&mut dev, &c2);
    engine.add_source(dev.now(), wan).expect("add the server");
    dev.run_until(&mut engine, None, 400).expect("no crash");
    assert_eq!(dev.rest_cuts, vec![SAMPLE], "resumed where it stopped");
    assert_eq!(resumed(&dev.events), vec![SAMPLE]);
    assert_eq!(dev.cuts_stopped.len(), 1, "the resumed cut ran to the end");
    engine
        .remove_source(dev.now(), SourceId(2))
        .expect("pull the stick out");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(
        &dev.durable[1][..image.len()],
        &image[..],
        "slot B holds v2"
    );
    let p = engine.progress();
    // 128 chunks and the zero chunk are in the slot: what the stick had not
    // brought of them came from it.
    assert!(
        p.wan_bytes <= 32 * CHUNK,
        "{} bytes over the WAN",
        p.wan_bytes
    );
    assert!(
        p.reused_bytes >= 96 * CHUNK,
        "the zero chunk's 96 positions at least"
    );
}

/// The stick said it holds every chunk but lacks v2's first 32 (as a stick filled
/// from an interrupted copy): after the cut stopped, its "lacks" leave chunks no
/// source holds, and the cut resumes and finds them in the slot past where it
/// stopped, running to the end (without the resume the install fails: nothing
/// serves them). It stops once every chunk is in.
#[test]
fn a_local_sources_lacks_after_the_stop_resume_the_cut() {
    let f = Fixture::new();
    let image = v2();
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &image);
    let mut dev = device(&slot_with_v2_past_the_cut());
    let usb = SourceInfo::new(SourceId(2), SourceKind::Requests, SourceClass::Local, "usb")
        .holding(Holds::All);
    let lacked: Vec<ChunkId> = c2.iter().take(32).map(|(id, _)| *id).collect();
    dev.stores.insert(
        SourceId(2),
        c2.iter()
            .filter(|(id, _)| !lacked.contains(id))
            .cloned()
            .collect(),
    );
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), f.offer(&m2, vec![usb]))
        .expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(
        &dev.durable[1][..image.len()],
        &image[..],
        "slot B holds v2"
    );
    assert_eq!(dev.rest_cuts, vec![SAMPLE]);
    // The stick brought the rest at once; the last lacked chunk lies before 1
    // MiB + 128 KiB (the progress last told at 1 MiB + 64 KiB): nothing more
    // needed, the resumed cut stops (no event: the rule did not stop it).
    assert_eq!(dev.cuts_stopped, vec![SAMPLE, MIB as u64 + 64 * 1024]);
    assert_eq!(stopped(&dev.events), Some((SAMPLE, 0)));
    assert_eq!(
        dev.events
            .iter()
            .filter(|e| matches!(e, Event::IndexStopped { .. }))
            .count(),
        1
    );
    assert!(
        engine.progress().reused_bytes >= 32 * CHUNK,
        "the lacked chunks came from the slot"
    );
}

/// The stick lacks one chunk, which the slot holds just past where the cut
/// stopped: the resumed cut finds it in its first half-window; every chunk still
/// needed is then held by the stick again, and the next half-window, which gives
/// nothing, stops the cut again by the same rule.
#[test]
fn a_resumed_cut_is_stopped_again_by_the_same_rule() {
    let f = Fixture::new();
    let image = v2();
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &image);
    let mut slot = bytes(99, 2 * MIB);
    let k = 10;
    slot[600 * 1024..604 * 1024].copy_from_slice(&image[k * 4096..(k + 1) * 4096]);
    let mut dev = device(&slot);
    // Slow (a chunk every 10 ms): most chunks are still needed when the cut resumes.
    let usb = stick(&mut dev, &c2);
    let lacked = c2[k].0;
    dev.stores.insert(
        SourceId(2),
        c2.iter().filter(|(id, _)| *id != lacked).cloned().collect(),
    );
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), f.offer(&m2, vec![usb]))
        .expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(
        &dev.durable[1][..image.len()],
        &image[..],
        "slot B holds v2"
    );
    assert_eq!(dev.rest_cuts, vec![SAMPLE]);
    // The half-window to 768 KiB gave the chunk; the one to 1 MiB nothing.
    assert_eq!(dev.cuts_stopped, vec![SAMPLE, MIB as u64]);
    let stops: Vec<(u64, u64)> = dev
        .events
        .iter()
        .filter_map(|e| match e {
            Event::IndexStopped { cut, found, .. } => Some((*cut, *found)),
            _ => None,
        })
        .collect();
    assert_eq!(stops, vec![(SAMPLE, 0), (MIB as u64, CHUNK)]);
    assert_eq!(engine.progress().reused_bytes, CHUNK);
}

/// A LAN peer that shows up after the stop resumes the cut as the WAN does (each
/// chunk the slot holds saves a download from it), and is not asked for what the
/// slot holds while the windows give: the peer brings only the chunks in no slot.
#[test]
fn a_lan_peer_after_the_stop_resumes_the_cut() {
    let Stopped {
        image,
        c2,
        mut dev,
        mut engine,
        ..
    } = stopped_over_a_stick(&slot_with_v2_at_the_cut(), None);
    assert_eq!(stopped(&dev.events), Some((SAMPLE, 0)));
    dev.stores.insert(SourceId(3), c2.iter().cloned().collect());
    let peer = SourceInfo::new(SourceId(3), SourceKind::Requests, SourceClass::Peer, "peer");
    engine.add_source(dev.now(), peer).expect("add the peer");
    engine
        .remove_source(dev.now(), SourceId(2))
        .expect("pull the stick out");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(
        dev.durable[1][..image.len()] == image[..],
        "slot B holds v2"
    );
    assert_eq!(resumed(&dev.events), vec![SAMPLE]);
    let p = engine.progress();
    assert!(p.reused_bytes >= 128 * CHUNK, "{} reused", p.reused_bytes);
}

/// Two resumes: the stick lacks two chunks the slot holds past the stop, one at
/// 600 KiB, asked (and lacked) early, one at 1.5 MiB, asked about 1.5 s in. The
/// first lack resumes the cut, which finds the first chunk and is stopped again at
/// 1 MiB by the rule; the second lack resumes it again from where it got to
/// (1 MiB), and it finds the second: both come from the slot.
#[test]
fn a_cut_stopped_twice_resumes_again_from_where_it_got_to() {
    let f = Fixture::new();
    let image = v2();
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &image);
    let mut slot = bytes(99, 2 * MIB);
    let (k, k2) = (10, 150);
    slot[600 * 1024..604 * 1024].copy_from_slice(&image[k * 4096..(k + 1) * 4096]);
    let at = MIB + MIB / 2;
    slot[at..at + 4096].copy_from_slice(&image[k2 * 4096..(k2 + 1) * 4096]);
    let mut dev = device(&slot);
    let usb = stick(&mut dev, &c2);
    let lacked = [c2[k].0, c2[k2].0];
    dev.stores.insert(
        SourceId(2),
        c2.iter()
            .filter(|(id, _)| !lacked.contains(id))
            .cloned()
            .collect(),
    );
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), f.offer(&m2, vec![usb]))
        .expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(&dev.durable[1][..image.len()], &image[..]);
    assert_eq!(dev.rest_cuts, vec![SAMPLE, MIB as u64]);
    assert_eq!(resumed(&dev.events), vec![SAMPLE, MIB as u64]);
    assert_eq!(engine.progress().reused_bytes, 2 * CHUNK);
}

/// The stick is pulled out once the cut stopped, and the server shows up with a
/// data budget that covers only the chunks in no slot: the resumed cut is waited
/// for (the WAN is not asked for what the slot may hold until it ends), and the
/// install fits the budget (without the resume it is refused over budget).
#[test]
fn a_data_budget_waits_for_the_resumed_cut() {
    // Wire bytes of the 32 chunks in no slot (stored raw in the test releases).
    let budget = 32 * CHUNK;
    let Stopped {
        image,
        c2,
        mut dev,
        mut engine,
        ..
    } = stopped_over_a_stick(&slot_with_v2_past_the_cut(), Some(budget));
    server_then_no_stick(&mut dev, &mut engine, &c2);
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(
        &dev.durable[1][..image.len()],
        &image[..],
        "slot B holds v2"
    );
    assert_eq!(dev.rest_cuts, vec![SAMPLE]);
    assert!(engine.progress().wan_wire_bytes <= budget);
}

/// A data budget that fits every chunk over the WAN changes nothing: a window of
/// the resumed cut that gives nothing releases the pause as without a budget (the
/// server then brings chunks the slot holds further on). Without the check of
/// what only the network can serve, any budget kept the pause to the cut's end.
#[test]
fn an_ample_data_budget_releases_the_hold_as_none_does() {
    let wan_bytes = |budget: Option<u64>| {
        let Stopped {
            image,
            c2,
            mut dev,
            mut engine,
            ..
        } = stopped_over_a_stick(&slot_with_v2_past_the_cut(), budget);
        server_then_no_stick(&mut dev, &mut engine, &c2);
        dev.run(&mut engine, None).expect("no crash");
        assert_eq!(failed(&dev.events), None);
        assert_eq!(&dev.durable[1][..image.len()], &image[..]);
        engine.progress().wan_wire_bytes
    };
    let none = wan_bytes(None);
    assert!(none > 32 * CHUNK, "the pause released: {none}");
    assert_eq!(wan_bytes(Some(4 * MIB as u64)), none);
}

/// Slot A: unrelated data to 512 KiB (the sample), v2's first 512 KiB right
/// after it, zeros.
fn slot_with_v2_at_the_cut() -> Vec<u8> {
    let mut a = bytes(99, 2 * MIB);
    a[MIB / 2..MIB].copy_from_slice(&v2()[..MIB / 2]);
    a[MIB..].fill(0);
    a
}

/// The stick is pulled out once the cut stopped and the server shows up: the
/// resumed cut's windows keep giving chunks, so the server is not asked for any
/// chunk the slot may hold until the cut is past them: only the 32 chunks in no
/// slot come over the WAN (without the pause, the fetches asked as the cut resumed
/// brought the slot's chunks over the WAN too).
#[test]
fn network_fetches_of_what_the_slot_may_hold_wait_for_the_resumed_cut() {
    let Stopped {
        image,
        c2,
        mut dev,
        mut engine,
        ..
    } = stopped_over_a_stick(&slot_with_v2_at_the_cut(), None);
    assert_eq!(stopped(&dev.events), Some((SAMPLE, 0)));
    server_then_no_stick(&mut dev, &mut engine, &c2);
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(
        dev.durable[1][..image.len()] == image[..],
        "slot B holds v2"
    );
    assert_eq!(dev.rest_cuts, vec![SAMPLE]);
    let p = engine.progress();
    assert!(
        p.wan_bytes <= 32 * CHUNK,
        "{} bytes over the WAN",
        p.wan_bytes
    );
    assert!(
        p.wan_bytes + p.local_bytes >= 32 * CHUNK,
        "the chunks in no slot"
    );
}

/// A driver whose resumed cut tells nothing (a stalled read): the fetches paused
/// for it go ahead once [`Config::cut_silence`] passes (`Timer::CutSilence`), and
/// the install completes from the network (without the timer it waits forever).
#[test]
fn held_fetches_go_ahead_when_the_resumed_cut_is_silent() {
    let Stopped {
        f,
        image,
        c2,
        mut dev,
        mut engine,
    } = stopped_over_a_stick(&slot_with_v2_at_the_cut(), None);
    server_then_no_stick(&mut dev, &mut engine, &c2);
    dev.stall_cuts = true;
    let silence = f.config().cut_silence.as_millis() as u64;
    dev.run_until(&mut engine, None, 30 + silence - 1)
        .expect("no crash");
    assert_eq!(
        dev.requests_sent.get(&SourceId(3)),
        None,
        "the server is not asked while the cut may tell"
    );
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(
        dev.durable[1][..image.len()] == image[..],
        "slot B holds v2"
    );
    assert_eq!(dev.rest_cuts, vec![SAMPLE]);
    assert!(dev.requests_sent.contains_key(&SourceId(3)));
    assert_eq!(engine.progress().reused_bytes, 0);
    // The stalled cut is given up as the fetches go ahead.
    assert_eq!(dev.cuts_stopped, vec![SAMPLE, SAMPLE]);
}

/// A resumed cut that tells nothing, with one chunk needed in no source: the
/// stick lacks it (it lies in the slot past the stop, where the stalled cut never
/// gets), its answer resumes the cut, the cut is given up after
/// [`Config::cut_silence`] and the install fails as stuck, naming the chunk
/// (without it, the install counted itself busy while the cut was on, and waited
/// forever with no timer set).
#[test]
fn a_silent_resumed_cut_with_a_chunk_in_no_source_fails_the_install() {
    let f = Fixture::new();
    let image = v2();
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &image);
    let mut dev = device(&slot_with_v2_at_the_cut());
    let usb = stick(&mut dev, &c2);
    // The release's 31st chunk (16 KiB each), at 992 KiB in the slot.
    let missing = c2[30].0;
    dev.stores
        .get_mut(&SourceId(2))
        .expect("stored")
        .remove(&missing);
    dev.stall_cuts = true;
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), f.offer(&m2, vec![usb]))
        .expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert!(stopped(&dev.events).is_some(), "the cut stopped");
    assert_eq!(dev.rest_cuts, vec![SAMPLE]);
    assert_eq!(
        dev.cuts_stopped,
        vec![SAMPLE, SAMPLE],
        "the silent cut given up"
    );
    match failed(&dev.events) {
        Some(InstallError::MissingChunks { count, .. }) => assert_eq!(*count, 1),
        other => panic!("not failed as stuck: {other:?}"),
    }
    assert!(!engine.is_installing());
}

/// The install fails (a write the driver reports failed) while a resumed cut runs:
/// the cut is stopped with it ([`Output::StopIndex`]), so the driver does not read
/// the rest of the slot for nobody (without it, the job was dropped and the cut,
/// here a stalled one, was never told).
#[test]
fn an_install_failing_during_a_resumed_cut_stops_the_cut() {
    let Stopped {
        c2,
        mut dev,
        mut engine,
        ..
    } = stopped_over_a_stick(&slot_with_v2_at_the_cut(), None);
    let wan = server(&mut dev, &c2);
    dev.stall_cuts = true;
    engine.add_source(dev.now(), wan).expect("add the server");
    dev.run_until(&mut engine, None, 40).expect("no crash");
    assert_eq!(dev.rest_cuts, vec![SAMPLE], "the cut resumed");
    assert_eq!(dev.cuts_stopped, vec![SAMPLE]);
    dev.handle(
        &mut engine,
        crate::Input::Failed {
            op: crate::IoOp::Write,
            message: "no space left on device".into(),
        },
    );
    dev.run(&mut engine, None).expect("no crash");
    assert!(matches!(
        failed(&dev.events),
        Some(InstallError::Io {
            op: crate::IoOp::Write,
            ..
        })
    ));
    assert_eq!(
        dev.cuts_stopped,
        vec![SAMPLE, SAMPLE],
        "the resumed cut stopped"
    );
}

/// The install fails while its first cut of the active slot runs (the driver cut
/// it on a thread of its own; the write of a chunk the cut handed over failed):
/// the cut is stopped with it. A failure of the cut itself asks no stop (it is
/// not running).
#[test]
fn an_install_failing_during_the_first_cut_stops_the_cut() {
    let f = Fixture::new();
    let image = v2();
    let (m2, _) = release("acme-os", "2.0", 2, DEVICE, &image);
    for (op, stops) in [(crate::IoOp::Write, true), (crate::IoOp::IndexSlot, false)] {
        let dev = device(&slot_with_v2_at_the_cut());
        let mut engine = dev.engine(f.config());
        engine
            .offer(dev.now(), f.offer(&m2, vec![artifact()]))
            .expect("offer");
        let mut outs = Vec::new();
        while let Some(o) = engine.poll_output() {
            outs.push(o);
        }
        assert!(
            outs.iter()
                .any(|o| matches!(o, crate::Output::IndexSlot { .. })),
            "the cut asked"
        );
        assert!(engine.is_indexing());
        engine.handle(
            dev.now(),
            crate::Input::Failed {
                op,
                message: "failed".into(),
            },
        );
        let mut outs = Vec::new();
        while let Some(o) = engine.poll_output() {
            outs.push(o);
        }
        assert_eq!(
            outs.iter()
                .filter(|o| matches!(o, crate::Output::StopIndex { slot: Slot::A }))
                .count(),
            usize::from(stops),
            "{op:?}: {outs:?}"
        );
        assert!(!engine.is_installing());
    }
}

/// A full artifact sends a corrupt chunk after the cut of an unrelated slot
/// stopped: it is banned and no source is left. The rest of the slot, which the
/// sample showed unrelated, is not cut for the chunks left (without the check the
/// cut resumed and read the rest of the slot before the install failed): the
/// install fails at once, naming the corrupt chunk.
#[test]
fn a_corrupt_artifact_after_the_stop_fails_without_resuming_the_cut() {
    let f = Fixture::new();
    let (m2, mut c2) = release("acme-os", "2.0", 2, DEVICE, &v2());
    let bad = c2[10].0;
    c2[10].1[0] ^= 1;
    let mut dev = device(&bytes(99, 2 * MIB));
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), f.offer(&m2, vec![artifact()]))
        .expect("offer");
    dev.run(&mut engine, Some((SourceId(1), c2.into_iter())))
        .expect("no crash");
    assert!(stopped(&dev.events).is_some(), "the cut stopped");
    match failed(&dev.events) {
        Some(InstallError::CorruptChunk { id, .. }) => assert_eq!(*id, bad),
        other => panic!("not failed as corrupt: {other:?}"),
    }
    assert_eq!(
        resumed(&dev.events),
        Vec::<u64>::new(),
        "the cut not resumed"
    );
    assert!(dev.rest_cuts.is_empty());
}
