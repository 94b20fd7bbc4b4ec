//! Fetch scheduler tests: sources that come and go, batching, cancels, failures
//! classified by the driver, silent sources, bans, cost classes. Each drives the
//! engine through [`crate::testing::SimDevice`] (invariants checked after every step)
//! and asserts on who was asked for what.

use std::collections::BTreeSet;

use shoal_artifact::{ChunkId, Manifest};
use shoal_signing::{SecretKey, TrustRoot};

use crate::testing::{Link, SimDevice, bytes, keys, release, sign};
use crate::{
    Bitfield, Config, Event, FetchFailure, Gone, Holds, InstallError, Offer, SourceClass, SourceId,
    SourceInfo, SourceKind, SourceLimits,
};

const DEVICE: &str = "acme-board";
const MIB: usize = 1024 * 1024;

pub(crate) struct Fixture {
    key: SecretKey,
    root: TrustRoot,
}

impl Fixture {
    pub(crate) fn new() -> Fixture {
        let (key, root) = keys(3);
        Fixture { key, root }
    }

    pub(crate) fn config(&self) -> Config {
        let mut c = Config::new(DEVICE, self.root.clone());
        c.journal_batch_bytes = 256 * 1024;
        c
    }

    pub(crate) fn offer(&self, m: &Manifest, sources: Vec<SourceInfo>) -> Offer {
        Offer {
            envelope: sign(m, &self.key),
            wall_unix_s: None,
            sources,
            reboot: false,
        }
    }
}

fn failed(events: &[Event]) -> Option<&InstallError> {
    events.iter().find_map(|e| match e {
        Event::Failed(err) => Some(err),
        _ => None,
    })
}

fn armed(events: &[Event]) -> bool {
    events.iter().any(|e| matches!(e, Event::Armed { .. }))
}

pub(crate) fn source(id: u32, class: SourceClass) -> SourceInfo {
    SourceInfo::new(SourceId(id), SourceKind::Requests, class, format!("s{id}"))
}

/// A device whose active slot shares nothing with `image` (so every chunk is
/// fetched), and a release of `image` in 4 KiB chunks.
pub(crate) fn setup(image: &[u8]) -> (SimDevice, Manifest, Vec<(ChunkId, Vec<u8>)>) {
    let dev = SimDevice::new(&[], 2 * MIB as u64, 1);
    let (m, chunks) = release("acme-os", "1.0", 1, DEVICE, image);
    (dev, m, chunks)
}

fn asked(dev: &SimDevice, id: u32) -> (u64, u64) {
    dev.requests_sent
        .get(&SourceId(id))
        .copied()
        .unwrap_or_default()
}

fn slot_b_holds(dev: &SimDevice, image: &[u8]) -> bool {
    dev.live[1][..image.len()] == *image
}

#[test]
fn a_source_sending_a_corrupt_chunk_is_banned_and_another_serves() {
    let f = Fixture::new();
    let image = bytes(1, MIB);
    let (mut dev, m, chunks) = setup(&image);
    let mut lying = chunks.clone();
    lying[3].1[0] ^= 1;
    // The liar is the cheaper source, so it is asked first and for everything.
    dev.stores.insert(SourceId(1), lying.into_iter().collect());
    dev.stores.insert(SourceId(2), chunks.into_iter().collect());
    let mut engine = dev.engine(f.config());
    let offer = f.offer(
        &m,
        vec![source(1, SourceClass::Peer), source(2, SourceClass::Wan)],
    );
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(asked(&dev, 1).1 > 0, "the liar was asked");
    assert!(dev.events.contains(&Event::SourceBanned {
        source: SourceId(1)
    }));
    assert!(asked(&dev, 2).1 > 0, "the honest source served the rest");
    assert!(armed(&dev.events));
    assert!(slot_b_holds(&dev, &image));
}

#[test]
fn chunks_a_source_lacks_are_asked_of_another() {
    let f = Fixture::new();
    let image = bytes(2, MIB);
    let (mut dev, m, chunks) = setup(&image);
    let lacking: BTreeSet<ChunkId> = chunks.iter().step_by(10).map(|(id, _)| *id).collect();
    dev.stores.insert(
        SourceId(1),
        chunks
            .iter()
            .filter(|(id, _)| !lacking.contains(id))
            .cloned()
            .collect(),
    );
    dev.stores
        .insert(SourceId(2), chunks.iter().cloned().collect());
    let mut engine = dev.engine(f.config());
    let offer = f.offer(
        &m,
        vec![source(1, SourceClass::Local), source(2, SourceClass::Wan)],
    );
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(armed(&dev.events));
    // The WAN source is asked exactly for what the local one lacks.
    assert_eq!(asked(&dev, 2).1, lacking.len() as u64);
    assert!(slot_b_holds(&dev, &image));
}

#[test]
fn a_chunk_no_source_holds_fails_the_install_instead_of_asking_forever() {
    let f = Fixture::new();
    let image = bytes(3, MIB);
    let (mut dev, m, chunks) = setup(&image);
    dev.stores
        .insert(SourceId(1), chunks[1..].iter().cloned().collect());
    let mut engine = dev.engine(f.config());
    let offer = f.offer(&m, vec![source(1, SourceClass::Local)]);
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(
        failed(&dev.events),
        Some(&InstallError::MissingChunks {
            count: 1,
            bytes: chunks[0].1.len() as u64,
            base: None,
            active: None,
        })
    );
    assert!(!failed(&dev.events).is_some_and(InstallError::worth_retrying));
    // Asked once for it, then never again.
    assert_eq!(asked(&dev, 1).1, chunks.len() as u64);
}

#[test]
fn a_lost_request_is_cancelled_and_asked_again_after_the_source_is_silent() {
    let f = Fixture::new();
    let image = bytes(4, MIB);
    let (mut dev, m, chunks) = setup(&image);
    dev.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    dev.drop_requests = 2;
    let mut engine = dev.engine(f.config());
    let offer = f.offer(&m, vec![source(1, SourceClass::Wan)]);
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(armed(&dev.events));
    // The dropped requests' chunks were asked twice.
    assert!(
        asked(&dev, 1).1 > chunks.len() as u64,
        "{:?}",
        asked(&dev, 1)
    );
    assert!(dev.cancels >= 1, "the lost requests were cancelled");
    assert!(
        dev.now().as_millis() >= 200,
        "after a silence timeout: {}",
        dev.now().as_millis()
    );
    assert!(slot_b_holds(&dev, &image));
}

#[test]
fn a_silent_source_is_dropped_after_its_retry_limit_and_the_install_fails() {
    let f = Fixture::new();
    let image = bytes(5, 256 * 1024);
    let (mut dev, m, chunks) = setup(&image);
    dev.links.insert(
        SourceId(1),
        Link {
            silent: true,
            ..Link::default()
        },
    );
    let mut engine = dev.engine(f.config());
    let offer = f.offer(&m, vec![source(1, SourceClass::Wan)]);
    engine.offer(dev.now(), offer).expect("offer");
    let mut statuses = Vec::new();
    // Run until the end, looking at the source on the way.
    while dev.now().as_millis() < 3_600_000 && failed(&dev.events).is_none() {
        let until = dev.now().as_millis() + 10_000;
        dev.run_until(&mut engine, None, until).expect("no crash");
        statuses.extend(engine.sources());
    }
    assert_eq!(
        failed(&dev.events),
        Some(&InstallError::SourcesFailed {
            count: chunks.len(),
            bytes: image.len() as u64,
        })
    );
    // Silent sources may answer later: a rerun is worth it.
    assert!(failed(&dev.events).is_some_and(InstallError::worth_retrying));
    // All 64 chunks fit one request: asked once, then once per backoff until
    // the retry limit.
    let retry = f.config().retry;
    assert_eq!(asked(&dev, 1).0, u64::from(retry.failures_max));
    assert!(statuses.iter().any(|s| s.failures >= 2));
}

#[test]
fn a_source_the_driver_drops_loses_its_chunks_to_the_others() {
    let f = Fixture::new();
    let image = bytes(6, MIB);
    let (mut dev, m, chunks) = setup(&image);
    dev.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    dev.stores
        .insert(SourceId(2), chunks.iter().cloned().collect());
    dev.fail_requests
        .insert(SourceId(1), FetchFailure::DropSource);
    let mut engine = dev.engine(f.config());
    let offer = f.offer(
        &m,
        vec![source(1, SourceClass::Local), source(2, SourceClass::Wan)],
    );
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(armed(&dev.events));
    // Asked once (one request), then never again.
    let local = SourceLimits::for_class(SourceClass::Local);
    assert!(asked(&dev, 1).0 <= u64::from(local.requests_max));
    assert_eq!(asked(&dev, 2).1, chunks.len() as u64);
    assert!(slot_b_holds(&dev, &image));
}

/// A request source that ends (a USB store unplugged, a server that has nothing
/// more) loses its requests in flight to the others and is not asked again; when it
/// was the only source, the chunks it did not bring are missing.
#[test]
fn a_request_source_that_ends_loses_its_chunks_to_the_others() {
    let f = Fixture::new();
    let image = bytes(16, MIB);
    for other in [true, false] {
        let (mut dev, m, chunks) = setup(&image);
        dev.stores
            .insert(SourceId(1), chunks.iter().cloned().collect());
        dev.stores
            .insert(SourceId(2), chunks.iter().cloned().collect());
        // The local source answers a chunk every 2 ms, so it has requests in flight
        // when it ends.
        dev.links.insert(
            SourceId(1),
            Link {
                rtt_us: 1000,
                per_chunk_us: 2000,
                ..Link::default()
            },
        );
        let mut sources = vec![source(1, SourceClass::Local)];
        if other {
            sources.push(source(2, SourceClass::Wan));
        }
        let mut engine = dev.engine(f.config());
        engine
            .offer(dev.now(), f.offer(&m, sources))
            .expect("offer");
        dev.run_until(&mut engine, None, 100).expect("no crash");
        let before = asked(&dev, 1);
        assert!(before.1 > 0 && !armed(&dev.events), "{before:?}");
        let written = engine.progress().fetched_bytes;
        dev.handle(
            &mut engine,
            crate::Input::SourceEnded {
                source: SourceId(1),
            },
        );
        let status = engine.sources();
        dev.run(&mut engine, None).expect("no crash");
        assert_eq!(asked(&dev, 1), before, "not asked after it ended");
        if other {
            assert_eq!(failed(&dev.events), None);
            assert!(armed(&dev.events));
            assert!(slot_b_holds(&dev, &image));
            // The WAN source brought the rest, including what was in flight.
            let rest = (image.len() as u64 - written).div_ceil(4096);
            assert!(asked(&dev, 2).1 >= rest, "{:?} < {rest}", asked(&dev, 2));
            assert_eq!(
                status
                    .iter()
                    .find(|s| s.id == SourceId(1))
                    .and_then(|s| s.gone),
                Some(Gone::Ended)
            );
        } else {
            match failed(&dev.events) {
                Some(InstallError::MissingChunks { count, .. }) => {
                    assert!(*count > 0 && *count < chunks.len(), "{count}");
                }
                other => panic!("expected the rest missing, got {other:?}"),
            }
        }
    }
}

#[test]
fn retry_later_backs_the_source_off_and_not_there_is_not_asked_again() {
    let f = Fixture::new();
    let image = bytes(7, MIB);
    let (mut dev, m, chunks) = setup(&image);
    dev.stores
        .insert(SourceId(2), chunks.iter().cloned().collect());
    dev.fail_requests
        .insert(SourceId(1), FetchFailure::RetryLater);
    dev.fail_requests
        .insert(SourceId(3), FetchFailure::NotThere);
    let mut engine = dev.engine(f.config());
    let offer = f.offer(
        &m,
        vec![
            source(1, SourceClass::Local),
            source(3, SourceClass::Local),
            source(2, SourceClass::Wan),
        ],
    );
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(armed(&dev.events));
    assert!(slot_b_holds(&dev, &image));
    // The "not there" source was asked for each chunk at most once.
    assert!(asked(&dev, 3).1 <= chunks.len() as u64);
    // The failing one was backed off: far fewer requests than the install made.
    assert!(
        asked(&dev, 1).0 < asked(&dev, 2).0,
        "{:?}",
        dev.requests_sent
    );
}

#[test]
fn a_source_added_during_the_install_is_used() {
    let f = Fixture::new();
    let image = bytes(8, MIB);
    let (mut dev, m, chunks) = setup(&image);
    dev.links.insert(
        SourceId(1),
        Link {
            silent: true,
            ..Link::default()
        },
    );
    dev.stores
        .insert(SourceId(2), chunks.iter().cloned().collect());
    let mut engine = dev.engine(f.config());
    let offer = f.offer(&m, vec![source(1, SourceClass::Wan)]);
    engine.offer(dev.now(), offer).expect("offer");
    dev.run_until(&mut engine, None, 5_000).expect("no crash");
    assert!(!armed(&dev.events) && failed(&dev.events).is_none());
    engine
        .add_source(dev.now(), source(2, SourceClass::Peer))
        .expect("added");
    engine.check_invariants();
    assert_eq!(
        engine.add_source(dev.now(), source(2, SourceClass::Peer)),
        Err(crate::SourceError::Duplicate(SourceId(2)))
    );
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(armed(&dev.events));
    assert!(slot_b_holds(&dev, &image));
    assert!(
        dev.now().as_millis() < 60_000,
        "not after the silent one gave up"
    );
}

#[test]
fn cheaper_sources_are_asked_first_and_holds_steer_requests() {
    let f = Fixture::new();
    let image = bytes(9, MIB);
    let (mut dev, m, chunks) = setup(&image);
    let n = m.payloads[0].chunks.len() as u32;
    dev.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    dev.stores
        .insert(SourceId(2), chunks.iter().cloned().collect());
    let mut engine = dev.engine(f.config());
    // The peer says it holds nothing at first...
    let peer = source(1, SourceClass::Peer).holding(Holds::Positions(Bitfield::new(n)));
    let offer = f.offer(&m, vec![peer, source(2, SourceClass::Wan)]);
    engine.offer(dev.now(), offer).expect("offer");
    // ... then the first half ("peer P now has these chunks").
    let half = Bitfield::from_members(n, 0..n / 2);
    engine
        .update_source(dev.now(), SourceId(1), Holds::Positions(half))
        .expect("updated");
    engine.check_invariants();
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(armed(&dev.events));
    let first_half: BTreeSet<ChunkId> = m.payloads[0].chunks[..(n / 2) as usize]
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(asked(&dev, 1).1, first_half.len() as u64);
    assert_eq!(
        asked(&dev, 2).1,
        chunks.len() as u64 - first_half.len() as u64
    );
    let progress = engine.progress();
    assert!(progress.peer_bytes > 0 && progress.wan_bytes > 0);
    assert_eq!(progress.peer_bytes + progress.wan_bytes, image.len() as u64);
}

#[test]
fn a_stream_and_a_request_source_work_at_the_same_time() {
    let f = Fixture::new();
    let image = bytes(10, MIB);
    let (mut dev, m, chunks) = setup(&image);
    let half = chunks.len() / 2;
    dev.stores
        .insert(SourceId(2), chunks.iter().cloned().collect());
    let stick = SourceInfo::new(SourceId(1), SourceKind::Stream, SourceClass::Local, "usb")
        .holding(Holds::Ids(
            chunks[..half].iter().map(|(id, _)| *id).collect(),
        ));
    let mut engine = dev.engine(f.config());
    let offer = f.offer(&m, vec![stick, source(2, SourceClass::Peer)]);
    engine.offer(dev.now(), offer).expect("offer");
    let pushed: Vec<(ChunkId, Vec<u8>)> = chunks[..half].to_vec();
    let stream = Some((SourceId(1), pushed.into_iter()));
    dev.run(&mut engine, stream).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(armed(&dev.events));
    // The peer was asked only for what the stick lacks.
    assert_eq!(asked(&dev, 2).1, (chunks.len() - half) as u64);
    assert!(slot_b_holds(&dev, &image));
}

/// Installs `m` on `dev` from one WAN request source (id 1) holding `chunks`,
/// which takes `requests_max` requests of `request_bytes_max` bytes at a time;
/// the slot is armed.
fn install_from_one_wan_source(
    f: &Fixture,
    dev: &mut SimDevice,
    m: &Manifest,
    chunks: &[(ChunkId, Vec<u8>)],
    requests_max: u32,
    request_bytes_max: u32,
) {
    dev.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    let limits = SourceLimits {
        requests_max,
        request_bytes_max,
        request_chunks_max: 1000,
    };
    let mut engine = dev.engine(f.config());
    let offer = f.offer(m, vec![source(1, SourceClass::Wan).with_limits(limits)]);
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert!(armed(&dev.events));
}

#[test]
fn fetches_are_batched_by_bytes() {
    let f = Fixture::new();
    let image = bytes(11, MIB);
    let (mut dev, m, chunks) = setup(&image);
    install_from_one_wan_source(&f, &mut dev, &m, &chunks, 3, 16 * 1024);
    let (requests, asked_chunks) = asked(&dev, 1);
    assert_eq!(asked_chunks, chunks.len() as u64);
    // 4 KiB chunks, 16 KiB requests: 4 per request.
    assert_eq!(requests, (chunks.len() as u64).div_ceil(4));
}

/// A request that the next queued chunk does not fit (by bytes), to a source
/// that takes no further request, is sent as it is: the queue is not searched
/// for a chunk small enough to top it up (which scanned hundreds of entries for
/// every request filled), so chunks are asked for in order.
#[test]
fn a_request_the_next_chunk_does_not_fit_is_sent_as_it_is() {
    let f = Fixture::new();
    // Chunks of 6, 6 and 2 KiB, in turn.
    let image = bytes(21, 14 * 1024 * 8);
    let mut dev = SimDevice::new(&[], 2 * MIB as u64, 1);
    let (m, chunks) =
        crate::testing::release_cut("acme-os", "1.0", 1, DEVICE, &image, &[6144, 6144, 2048]);
    dev.requests_log = Some(Vec::new());
    install_from_one_wan_source(&f, &mut dev, &m, &chunks, 1, 10 * 1024);
    let size = |id: &ChunkId| {
        chunks
            .iter()
            .find(|(c, _)| c == id)
            .map(|(_, d)| d.len() / 1024)
            .expect("a chunk of the release")
    };
    let sizes: Vec<Vec<usize>> = dev
        .requests_log
        .as_ref()
        .expect("logged")
        .iter()
        .map(|r| r.iter().map(size).collect())
        .collect();
    // Whole chunks in order, as many as fit 10 KiB from where the last ended
    // (not [6, 2, 2], [6, 2, 2], ...: topped up with chunks from further on).
    assert_eq!(sizes[..4], [vec![6], vec![6, 2], vec![6], vec![6, 2]]);
}

/// The acceptance experiment of the dead-source review: 30,000 chunks from two
/// request sources, one of which never answers, finish within 1.2 × the time of the
/// healthy source alone (virtual time), with batched requests.
#[test]
fn a_dead_source_does_not_stall_a_30000_chunk_install() {
    let ratio = crate::testing::dead_source_experiment(30_000, 1);
    eprintln!("{ratio:?}");
    assert!(
        ratio.dead_ms as f64 <= 1.2 * ratio.healthy_ms as f64,
        "{ratio:?}"
    );
    // Batched: about one request per 1,024 chunks, not one per chunk.
    assert!(ratio.healthy_requests <= 40, "{ratio:?}");
}

#[test]
fn a_gone_source_is_reported_in_status() {
    let f = Fixture::new();
    let image = bytes(12, 256 * 1024);
    let (mut dev, m, chunks) = setup(&image);
    dev.stores
        .insert(SourceId(2), chunks.iter().cloned().collect());
    dev.fail_requests
        .insert(SourceId(1), FetchFailure::DropSource);
    let mut engine = dev.engine(f.config());
    let offer = f.offer(
        &m,
        vec![source(1, SourceClass::Local), source(2, SourceClass::Wan)],
    );
    engine.offer(dev.now(), offer).expect("offer");
    // Step until the first source is gone, then look at the status.
    while let Some(out) = engine.poll_output() {
        dev.execute(&mut engine, out).expect("no crash");
        let gone = engine
            .status()
            .sources
            .iter()
            .any(|s| s.id == SourceId(1) && s.gone == Some(Gone::Removed));
        if gone {
            return;
        }
    }
    panic!("source 1 was never reported gone");
}

#[test]
fn a_plan_over_the_data_budget_is_refused_before_anything_is_fetched() {
    let f = Fixture::new();
    let image = bytes(13, MIB);
    let (mut dev, m, chunks) = setup(&image);
    dev.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    // Each distinct chunk once, at its stored size (here its size).
    let needed: u64 = chunks.iter().map(|(_, d)| d.len() as u64).sum();
    let mut config = f.config();
    config.wan_budget_bytes = Some(needed - 1);
    let mut engine = dev.engine(config);
    let offer = f.offer(&m, vec![source(1, SourceClass::Wan)]);
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(
        failed(&dev.events),
        Some(&InstallError::OverBudget {
            needed,
            allowed: needed - 1
        })
    );
    assert_eq!(asked(&dev, 1), (0, 0), "nothing was fetched");
    assert_eq!(dev.bytes_written, 0, "nothing was written");
}

#[test]
fn an_install_within_the_budget_completes_and_a_retry_never_exceeds_it() {
    let f = Fixture::new();
    let image = bytes(14, MIB);
    let (mut dev, m, chunks) = setup(&image);
    dev.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    let needed: u64 = chunks.iter().map(|(_, d)| d.len() as u64).sum();
    let mut config = f.config();
    config.wan_budget_bytes = Some(needed);
    let mut engine = dev.engine(config.clone());
    let offer = f.offer(&m, vec![source(1, SourceClass::Wan)]);
    engine.offer(dev.now(), offer.clone()).expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(engine.progress().wan_wire_bytes, needed);

    // A lost request must be asked again, which the budget does not allow: the
    // install stops rather than go over.
    let (mut dev, _, _) = setup(&image);
    dev.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    dev.drop_requests = 1;
    let mut engine = dev.engine(config);
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert!(
        matches!(failed(&dev.events), Some(InstallError::OverBudget { allowed, .. }) if *allowed == needed),
        "{:?}",
        failed(&dev.events)
    );
    let asked_bytes = asked(&dev, 1).1 * 4096;
    assert!(asked_bytes <= needed, "asked {asked_bytes} > {needed}");
}

#[test]
fn the_wan_rate_cap_paces_requests_with_its_own_timer() {
    let f = Fixture::new();
    let image = bytes(15, MIB);
    let (mut dev, m, chunks) = setup(&image);
    dev.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    let mut config = f.config();
    let rate = 256 * 1024;
    config.wan_rate_bytes_per_s = Some(rate);
    let mut engine = dev.engine(config);
    let offer = f.offer(&m, vec![source(1, SourceClass::Wan)]);
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert!(armed(&dev.events), "{:?}", failed(&dev.events));
    // 1 MiB at 256 KiB/s with a burst of a tenth of a second: about 3.9 s.
    let burst = rate / 10;
    let least_ms = (MIB as u64 - burst) * 1000 / rate;
    assert!(
        dev.now().as_millis() >= least_ms,
        "{} ms < {least_ms} ms",
        dev.now().as_millis()
    );
    assert!(
        dev.now().as_millis() <= least_ms + 1_000,
        "{} ms",
        dev.now().as_millis()
    );
    assert!(slot_b_holds(&dev, &image));
}

#[test]
fn the_journal_waits_for_the_sync() {
    use crate::{Input, Output, Record};
    let f = Fixture::new();
    let image = bytes(16, MIB);
    let (mut dev, m, chunks) = setup(&image);
    dev.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    let mut config = f.config();
    config.journal_batch_bytes = 64 * 1024;
    config.writing_bytes_max = 128 * 1024;
    let mut engine = dev.engine(config);
    let offer = f.offer(&m, vec![source(1, SourceClass::Local)]);
    engine.offer(dev.now(), offer).expect("offer");
    let mut syncs = Vec::new();
    while let Some(out) = engine.poll_output() {
        match out {
            Output::Sync { slot } => syncs.push(slot),
            Output::Persist(records) => {
                assert!(
                    !records.iter().any(|r| matches!(r, Record::Journaled(_))),
                    "a journal record before its sync returned"
                );
                dev.store.apply(&records);
            }
            out => dev.execute(&mut engine, out).expect("no crash"),
        }
    }
    assert!(!syncs.is_empty(), "batches were flushed");
    assert!(
        dev.store.state.journaled.is_empty(),
        "nothing journaled yet"
    );
    // A sync returns: its batch is journaled at once.
    dev.handle(&mut engine, Input::Synced { slot: syncs[0] });
    let journaled = std::iter::from_fn(|| engine.poll_output()).any(|out| {
        matches!(out, Output::Persist(records) if records.iter().any(|r| matches!(r, Record::Journaled(_))))
    });
    assert!(journaled, "the batch was journaled after its sync");
}

#[test]
fn writes_not_yet_carried_out_bound_what_is_fetched() {
    use crate::{Input, Output};
    let f = Fixture::new();
    let image = bytes(17, MIB);
    let (mut dev, m, chunks) = setup(&image);
    dev.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    let mut config = f.config();
    config.writing_bytes_max = 128 * 1024;
    let mut engine = dev.engine(config);
    let limits = SourceLimits {
        requests_max: 1,
        request_bytes_max: 16 * 1024,
        request_chunks_max: 4,
    };
    let offer = f.offer(&m, vec![source(1, SourceClass::Local).with_limits(limits)]);
    engine.offer(dev.now(), offer).expect("offer");
    let mut pending = Vec::new();
    let mut written = 0u64;
    // A disk that never finishes a write: fetching stops at the bound.
    while let Some(out) = engine.poll_output() {
        match out {
            Output::Write {
                slot,
                offsets,
                data,
                ..
            } => {
                written += data.len() as u64 * offsets.len() as u64;
                pending.push((slot, data.len() as u64 * offsets.len() as u64));
            }
            Output::Sync { slot } => dev.handle(&mut engine, Input::Synced { slot }),
            out => dev.execute(&mut engine, out).expect("no crash"),
        }
    }
    assert!(written >= 128 * 1024, "{written}");
    assert!(written < 128 * 1024 + 16 * 1024, "{written}");
    assert!(engine.is_installing());
    // The disk catches up: the install goes on.
    for (slot, bytes) in pending {
        dev.handle(&mut engine, Input::Written { slot, bytes });
    }
    assert!(std::iter::from_fn(|| engine.poll_output()).any(|o| matches!(o, Output::Fetch { .. })));
}

#[test]
fn an_install_runs_on_chunk_proofs_without_bytes() {
    use crate::testing::LengthsOnly;
    let f = Fixture::new();
    let image = bytes(18, MIB);
    let (dev, m, _) = setup(&image);
    let mut engine = dev.engine(f.config());
    let offer = f.offer(&m, vec![source(1, SourceClass::Wan)]);
    engine.offer(dev.now(), offer).expect("offer");
    let mut driver = LengthsOnly::new(&m);
    driver.run(&mut engine, dev.now());
    assert_eq!(failed(&driver.events), None);
    assert!(armed(&driver.events), "{:?}", driver.events);
    let distinct: BTreeSet<ChunkId> = m.payloads[0].chunks.iter().map(|c| c.id).collect();
    assert_eq!(driver.chunks, distinct.len() as u64);
    assert_eq!(engine.progress().written_bytes, image.len() as u64);
}

#[test]
fn a_proof_of_the_wrong_length_bans_the_source() {
    use crate::{Input, Origin, Output};
    let f = Fixture::new();
    let image = bytes(19, MIB);
    let (mut dev, m, chunks) = setup(&image);
    dev.stores.insert(SourceId(2), chunks.into_iter().collect());
    let mut engine = dev.engine(f.config());
    let offer = f.offer(
        &m,
        vec![source(1, SourceClass::Peer), source(2, SourceClass::Wan)],
    );
    engine.offer(dev.now(), offer).expect("offer");
    // Source 1 answers its first chunk with a proof one byte short.
    let mut lied = false;
    while let Some(out) = engine.poll_output() {
        match out {
            Output::Fetch { source, ids, .. } if source == SourceId(1) && !lied => {
                lied = true;
                let c = m.payloads[0]
                    .chunks
                    .iter()
                    .find(|c| c.id == ids[0])
                    .expect("asked");
                dev.handle(
                    &mut engine,
                    Input::Chunk {
                        origin: Origin::Source(source),
                        chunk: shoal_artifact::VerifiedChunk::simulated(c.id, c.size - 1),
                    },
                );
            }
            out => dev.execute(&mut engine, out).expect("no crash"),
        }
    }
    assert!(lied);
    dev.run(&mut engine, None).expect("no crash");
    assert!(dev.events.contains(&Event::SourceBanned {
        source: SourceId(1)
    }));
    assert_eq!(failed(&dev.events), None);
    assert!(slot_b_holds(&dev, &image));
}

#[test]
fn a_verified_release_is_shared_and_its_envelope_persisted_once() {
    use crate::{OfferError, Output, Record, VerifiedRelease};
    let f = Fixture::new();
    let image = bytes(20, MIB);
    let (dev, m, chunks) = setup(&image);
    let rel = VerifiedRelease::verify(&f.root, sign(&m, &f.key), None).expect("verifies");
    // Two engines take the same Arc: neither verifies it again, both hold it.
    let mut engines: Vec<(SimDevice, crate::Engine)> = (0..2)
        .map(|_| {
            let mut d = SimDevice::new(&[], 2 * MIB as u64, 1);
            d.stores
                .insert(SourceId(1), chunks.iter().cloned().collect());
            let e = d.engine(f.config());
            (d, e)
        })
        .collect();
    for (d, e) in &mut engines {
        e.offer_verified(d.now(), &rel, vec![source(1, SourceClass::Wan)], false)
            .expect("offer");
    }
    assert_eq!(
        std::sync::Arc::strong_count(&rel),
        1 + 2 * 2,
        "each engine shares it"
    );
    let (mut d, mut e) = engines.pop().expect("two");
    let mut envelopes = 0;
    let mut persists = 0;
    loop {
        let Some(out) = e.poll_output() else {
            d.run(&mut e, None).expect("no crash");
            break;
        };
        if let Output::Persist(records) = &out {
            persists += 1;
            envelopes += records
                .iter()
                .filter(|r| matches!(r, Record::Envelope(Some(_))))
                .count();
        }
        d.execute(&mut e, out).expect("no crash");
    }
    assert!(armed(&d.events));
    assert!(persists > 2, "{persists}");
    assert_eq!(
        envelopes, 1,
        "the envelope is persisted once per deployment"
    );
    assert_eq!(
        d.store.state.envelope.as_deref(),
        rel.envelope().as_deref(),
        "the store holds it while the deployment runs"
    );
    // A release verified under another trust root is refused.
    let (_, other_root) = crate::testing::keys(9);
    let mut e = dev.engine(Config::new(DEVICE, other_root));
    assert_eq!(
        e.offer_verified(dev.now(), &rel, Vec::new(), false),
        Err(OfferError::OtherTrustRoot)
    );
}

/// Issue 10 (memory): once the store holds the deployment's envelope, the engine
/// sheds its copies (an 8 GiB image's is about 35 MB); the install goes on, and
/// offering the same release again resumes it without the envelope.
#[test]
fn a_shed_envelope_is_held_by_the_store_alone_and_the_install_resumes_without_it() {
    use crate::{Output, Record, VerifiedRelease};
    let f = Fixture::new();
    let image = bytes(21, MIB);
    let (mut d, m, chunks) = setup(&image);
    d.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    let rel = VerifiedRelease::verify(&f.root, sign(&m, &f.key), None).expect("verifies");
    let envelope = rel.envelope().expect("kept until shed");
    let mut e = d.engine(f.config());
    e.offer_verified(d.now(), &rel, vec![source(1, SourceClass::Wan)], false)
        .expect("offer");
    // Carry out outputs up to the one that persists the envelope, then shed.
    loop {
        let out = e.poll_output().expect("the envelope is persisted first");
        let persisted = matches!(&out, Output::Persist(r) if r.iter().any(|r| matches!(r, Record::Envelope(Some(_)))));
        d.execute(&mut e, out).expect("no crash");
        if persisted {
            break;
        }
    }
    e.shed_envelope();
    assert_eq!(rel.envelope(), None, "the release no longer holds it");
    assert_eq!(
        std::sync::Arc::strong_count(&envelope),
        2,
        "held by this test and the store only"
    );
    // Half-way, the same release is offered again: it resumes, writing no
    // envelope record (the store has it).
    for _ in 0..40 {
        let Some(out) = e.poll_output() else { break };
        d.execute(&mut e, out).expect("no crash");
    }
    e.offer_verified(d.now(), &rel, vec![source(1, SourceClass::Wan)], false)
        .expect("resumes");
    let mut envelopes = 0;
    loop {
        let Some(out) = e.poll_output() else {
            d.run(&mut e, None).expect("no crash");
            break;
        };
        if let Output::Persist(records) = &out {
            envelopes += records
                .iter()
                .filter(|r| matches!(r, Record::Envelope(_)))
                .count();
        }
        d.execute(&mut e, out).expect("no crash");
    }
    assert!(armed(&d.events));
    assert!(slot_b_holds(&d, &image));
    assert_eq!(envelopes, 0);
    assert_eq!(d.store.state.envelope.as_deref(), Some(&envelope[..]));
}

/// Issue 10 (memory at 8 GiB): a release whose envelope the driver stored before
/// the offer (`verify_stored`) never holds it, not even while its chunk table is
/// built; the deployment names the stored envelope by the BLAKE3 of its bytes
/// (`Record::EnvelopeStored`, once), the install completes, and offering it again
/// resumes.
#[test]
fn a_release_whose_envelope_the_driver_stored_names_it_by_hash_and_installs() {
    use crate::{Output, Record, VerifiedRelease};
    let f = Fixture::new();
    let image = bytes(22, MIB);
    let (mut d, m, chunks) = setup(&image);
    d.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    let envelope = sign(&m, &f.key);
    let hash = *blake3::hash(&envelope).as_bytes();
    let held = VerifiedRelease::verify(&f.root, envelope.clone(), None).expect("verifies");
    let rel = VerifiedRelease::verify_stored(&f.root, envelope, None).expect("verifies");
    assert_eq!(rel.envelope(), None, "the release does not hold it");
    assert_eq!(rel.release(), held.release(), "the same release");
    assert_eq!(rel.chunk_count(), held.chunk_count());
    let mut e = d.engine(f.config());
    e.offer_verified(d.now(), &rel, vec![source(1, SourceClass::Wan)], false)
        .expect("offer");
    let mut stored = Vec::new();
    let mut with_bytes = 0;
    let mut steps = 0;
    loop {
        let Some(out) = e.poll_output() else {
            d.run(&mut e, None).expect("no crash");
            break;
        };
        if let Output::Persist(records) = &out {
            for r in records {
                match r {
                    Record::EnvelopeStored(h) => stored.push(*h),
                    Record::Envelope(Some(_)) => with_bytes += 1,
                    _ => {}
                }
            }
        }
        d.execute(&mut e, out).expect("no crash");
        steps += 1;
        if steps == 40 {
            // Half-way, the same release again: it resumes from the journal.
            e.offer_verified(d.now(), &rel, vec![source(1, SourceClass::Wan)], false)
                .expect("resumes");
        }
    }
    assert!(steps > 40, "{steps}");
    assert!(armed(&d.events));
    assert!(slot_b_holds(&d, &image));
    assert_eq!(with_bytes, 0, "the envelope's bytes never go to the store");
    assert!(
        !stored.is_empty() && stored.iter().all(|h| *h == hash),
        "the deployment names the stored envelope by its hash: {stored:?}"
    );
}

/// Ids in memory standing for a driver's file, which can be made to fail.
#[derive(Debug, Default)]
struct IdsFile {
    bytes: std::sync::Mutex<Vec<u8>>,
    broken: std::sync::atomic::AtomicBool,
    reads: std::sync::atomic::AtomicUsize,
}

impl crate::ChunkIdFile for IdsFile {
    fn read_ids(&self, from: u32, out: &mut [ChunkId]) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        self.reads.fetch_add(1, Relaxed);
        if self.broken.load(Relaxed) {
            return Err(std::io::Error::other("Input/output error (os error 5)"));
        }
        let b = self.bytes.lock().unwrap();
        for (k, id) in out.iter_mut().enumerate() {
            let at = (from as usize + k) * 32;
            id.0.copy_from_slice(&b[at..at + 32]);
        }
        Ok(())
    }
    fn describe(&self) -> String {
        "/var/lib/shoal/envelopes/0123.ids".into()
    }
}

struct IdsWriter(std::sync::Arc<IdsFile>);

impl crate::ChunkIdWriter for IdsWriter {
    fn push(&mut self, id: &ChunkId) -> Result<(), String> {
        self.0.bytes.lock().unwrap().extend_from_slice(&id.0);
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<std::sync::Arc<dyn crate::ChunkIdFile>, String> {
        Ok(self.0)
    }
}

/// Issue 10 (memory): a release whose chunk ids the driver keeps in a file
/// (`verify_stored_to`) is the release verified in memory (same chunks, same
/// index), holds no id in memory, and installs.
#[test]
fn a_release_with_its_ids_in_a_file_installs() {
    use crate::VerifiedRelease;
    let f = Fixture::new();
    // More chunks (4,352) than the ids' block cache holds (4,096).
    let image = bytes(23, 17 * MIB);
    let mut d = SimDevice::new(&[], 32 * MIB as u64, 1);
    let (m, chunks) = release("acme-os", "1.0", 1, DEVICE, &image);
    d.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    let envelope = sign(&m, &f.key);
    let held = VerifiedRelease::verify(&f.root, envelope.clone(), None).expect("verifies");
    let file = std::sync::Arc::new(IdsFile::default());
    let writer = Box::new(IdsWriter(std::sync::Arc::clone(&file)));
    let rel = VerifiedRelease::verify_stored_to(&f.root, envelope, None, writer).expect("verifies");
    assert_eq!(
        file.bytes.lock().unwrap().len(),
        m.payloads[0].chunks.len() * 32
    );
    assert_eq!(rel.release(), held.release());
    assert_eq!(rel.slot_index(), held.slot_index());
    // The ids' 32 bytes a chunk are not in memory: a cache of 16 blocks of 256
    // ids (and a tag a block) is.
    assert_eq!(
        held.table_heap_bytes() - rel.table_heap_bytes(),
        4352 * 32 - (16 * 256 * 32 + 16 * 4)
    );
    let mut e = d.engine(f.config());
    e.offer_verified(d.now(), &rel, vec![source(1, SourceClass::Wan)], false)
        .expect("offer");
    d.run(&mut e, None).expect("no crash");
    assert_eq!(failed(&d.events), None);
    assert!(armed(&d.events));
    assert!(slot_b_holds(&d, &image));
    assert_eq!(rel.chunk_ids_error(), None);
}

/// An envelope "file" in memory.
struct EnvelopeFile(Vec<u8>);

impl shoal_artifact::ReadAt for EnvelopeFile {
    fn read_at(&self, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let at = at as usize;
        let b = self
            .0
            .get(at..at + buf.len())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(b);
        Ok(())
    }
}

fn verify_file(
    f: &Fixture,
    envelope: &[u8],
    hash: [u8; 32],
) -> Result<std::sync::Arc<crate::VerifiedRelease>, crate::OfferError> {
    let file = EnvelopeFile(envelope.to_vec());
    let ids = Box::new(IdsWriter(std::sync::Arc::new(IdsFile::default())));
    crate::VerifiedRelease::verify_file(&f.root, &file, envelope.len() as u64, hash, None, ids)
}

/// Issue 10 (memory): a release verified from its stored envelope's file (the
/// signatures checked as it is read, the manifest decoded from it in a second
/// read) is the release verified in memory; the same bytes refused in memory
/// are refused from a file with the same error (a bad signature, too few
/// signers, a malformed envelope, a manifest with two payloads); a file that
/// is not the one named is refused.
#[test]
fn a_release_verified_from_its_envelope_file_is_the_one_verified_in_memory() {
    use crate::{OfferError, VerifiedRelease};
    let f = Fixture::new();
    let image = bytes(25, MIB);
    let (m, _) = release("acme-os", "1.0", 1, DEVICE, &image);
    let envelope = sign(&m, &f.key);
    let hash = *blake3::hash(&envelope).as_bytes();
    let held = VerifiedRelease::verify(&f.root, envelope.clone(), None).expect("verifies");
    let rel = verify_file(&f, &envelope, hash).expect("verifies from the file");
    assert_eq!(rel.release(), held.release());
    assert_eq!(rel.manifest(), held.manifest());
    assert_eq!(rel.slot_index(), held.slot_index());
    assert_eq!(rel.envelope(), None, "the release does not hold it");
    // The same errors as in memory.
    let in_memory = |e: &[u8]| VerifiedRelease::verify(&f.root, e.to_vec(), None).err();
    let from_file = |e: &[u8]| verify_file(&f, e, *blake3::hash(e).as_bytes()).err();
    let mut bad_sig = shoal_signing::Envelope::from_bytes(&envelope).expect("decodes");
    bad_sig.signatures[0].sig[5] ^= 1;
    let stranger = shoal_signing::SecretKey::from_seed(&[42; 32]);
    let mut two = m.clone();
    let mut second = two.payloads[0].clone();
    second.name = "second".into();
    two.payloads.push(second);
    let mut flipped = envelope.clone();
    flipped[3] ^= 0x40;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a bad signature", bad_sig.to_bytes()),
        ("a stranger's signature", sign(&m, &stranger)),
        ("a malformed envelope", flipped),
        ("two payloads", sign(&two, &f.key)),
        ("not an envelope", b"not cbor".to_vec()),
    ];
    for (what, bytes) in &cases {
        let want = in_memory(bytes).unwrap_or_else(|| panic!("{what}: refused in memory"));
        assert_eq!(from_file(bytes), Some(want), "{what}");
    }
    match verify_file(&f, &envelope, [7; 32]) {
        Err(OfferError::StoredEnvelope(e)) => {
            assert_eq!(e, "the stored envelope does not hash to its name");
        }
        other => panic!("expected the name's mismatch, got {:?}", other.map(|_| ())),
    }
    // A file not named after its hash (a kept manifest): the same release, the
    // same errors, and no name to match.
    let unnamed = |e: &[u8]| {
        let ids = Box::new(IdsWriter(std::sync::Arc::new(IdsFile::default())));
        VerifiedRelease::verify_unnamed_file(
            &f.root,
            &EnvelopeFile(e.to_vec()),
            e.len() as u64,
            None,
            ids,
        )
    };
    let rel = unnamed(&envelope).expect("verifies unnamed");
    assert_eq!(rel.release(), held.release());
    assert_eq!(rel.slot_index(), held.slot_index());
    for (what, bytes) in &cases {
        let want = in_memory(bytes).unwrap_or_else(|| panic!("{what}: refused in memory"));
        assert_eq!(unnamed(bytes).err(), Some(want), "{what} (unnamed)");
    }
}

/// Issue 10: an offer whose ids' file cannot be read while the chunk table is
/// built (ids that share a prefix are read to tell them apart) is refused with
/// that read's failure, not as an invalid manifest (the unread ids, zeros, made
/// two distinct chunks one, and a reference to the second "not the first
/// occurrence" of its id).
#[test]
fn an_offer_whose_ids_cannot_be_read_fails_with_the_read_not_the_manifest() {
    let f = Fixture::new();
    let image = bytes(25, MIB);
    let (mut m, _) = release("acme-os", "1.0", 1, DEVICE, &image);
    m.format_version = shoal_artifact::FORMAT_VERSION_REFERENCES;
    m.base = Some(shoal_artifact::BaseRelease {
        name: "acme-os".into(),
        version: "0.9".into(),
        manifest_hash: [3; 32],
    });
    let p = &mut m.payloads[0];
    let mut twin = p.chunks[0].id;
    twin.0[31] ^= 1;
    p.chunks[1].id = twin;
    p.references = vec![shoal_artifact::Reference {
        ranges: vec![(0, 10)],
        hash: [4; 32],
        chunks: vec![1],
    }];
    // Readable ids: the release verifies.
    let ok = sign(&m, &f.key);
    verify_file(&f, &ok, *blake3::hash(&ok).as_bytes()).expect("verifies");
    let envelope = sign(&m, &f.key);
    let hash = *blake3::hash(&envelope).as_bytes();
    let file = std::sync::Arc::new(IdsFile::default());
    file.broken
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let ids = Box::new(IdsWriter(std::sync::Arc::clone(&file)));
    let env = EnvelopeFile(envelope.clone());
    match crate::VerifiedRelease::verify_file(&f.root, &env, envelope.len() as u64, hash, None, ids)
    {
        Err(crate::OfferError::ChunkIds(e)) => assert_eq!(
            e,
            "cannot read the release's chunk ids from /var/lib/shoal/envelopes/0123.ids: \
             Input/output error (os error 5)"
        ),
        other => panic!("expected the ids' read error, got {:?}", other.map(|_| ())),
    }
    assert!(file.reads.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

/// A stored envelope's file larger than any envelope is refused with the
/// decoder's size error before a byte of it is read into memory.
#[test]
fn a_stored_envelope_file_larger_than_any_envelope_is_refused_unread() {
    struct Huge(std::cell::Cell<u64>);
    impl shoal_artifact::ReadAt for Huge {
        fn read_at(&self, _at: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.0.set(self.0.get() + buf.len() as u64);
            buf.fill(0);
            Ok(())
        }
    }
    let f = Fixture::new();
    let len = shoal_signing::ENVELOPE_SIZE_MAX as u64 + 1;
    let file = Huge(std::cell::Cell::new(0));
    let ids = Box::new(IdsWriter(std::sync::Arc::new(IdsFile::default())));
    match crate::VerifiedRelease::verify_file(&f.root, &file, len, [7; 32], None, ids) {
        Err(crate::OfferError::Envelope(shoal_signing::DecodeError::TooLarge { size, max })) => {
            assert_eq!((size as u64, max), (len, shoal_signing::ENVELOPE_SIZE_MAX));
        }
        other => panic!("expected the size error, got {:?}", other.map(|_| ())),
    }
    assert!(file.0.get() < 1024, "read {} bytes", file.0.get());
}

/// Issue 10: when the file of the release's ids cannot be read mid-install, the
/// install ends with that failure (naming the file, worth a rerun), and every
/// byte written to the slot is the image's: no chunk was written for an id that
/// was not read.
#[test]
fn an_unreadable_ids_file_fails_the_install_and_writes_nothing_wrong() {
    use crate::VerifiedRelease;
    use std::sync::atomic::Ordering::Relaxed;
    let f = Fixture::new();
    // More chunks (6,144) than the ids' block cache holds (4,096).
    let image = bytes(24, 24 * MIB);
    let mut d = SimDevice::new(&[], 32 * MIB as u64, 1);
    let (m, chunks) = release("acme-os", "1.0", 1, DEVICE, &image);
    d.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    let file = std::sync::Arc::new(IdsFile::default());
    let writer = Box::new(IdsWriter(std::sync::Arc::clone(&file)));
    let rel = VerifiedRelease::verify_stored_to(&f.root, sign(&m, &f.key), None, writer)
        .expect("verifies");
    let mut e = d.engine(f.config());
    e.offer_verified(d.now(), &rel, vec![source(1, SourceClass::Wan)], false)
        .expect("offer");
    let mut steps = 0;
    while let Some(out) = e.poll_output() {
        d.execute(&mut e, out).expect("no crash");
        steps += 1;
        if steps == 30 {
            file.broken.store(true, Relaxed);
        }
    }
    d.run(&mut e, None).expect("no crash");
    assert!(steps > 30, "{steps}");
    assert!(file.reads.load(Relaxed) > 0);
    let err = failed(&d.events).expect("the install failed");
    assert_eq!(
        err,
        &InstallError::ChunkIds {
            message: "cannot read the release's chunk ids from /var/lib/shoal/envelopes/0123.ids: Input/output error (os error 5)".into()
        }
    );
    assert!(err.worth_retrying());
    assert!(!armed(&d.events));
    assert!(!slot_b_holds(&d, &image), "the install stopped part-way");
    // Whatever reached the slot is the image's (the slot was all zeros).
    let slot = &d.live[1][..image.len()];
    assert!(
        slot.iter().zip(&image).all(|(s, i)| s == i || *s == 0),
        "a byte that is not the image's was written"
    );
}

/// Regression (issue 10): on a slow link (30 KiB/s, like the daemon under a rate
/// cap) the silence timer, fed by the gaps between small chunks, fired while a big
/// chunk was still on the wire, so a live source was failed, backed off and asked
/// again. Its timeout now allows for the bytes in flight at its measured rate.
#[test]
fn a_slow_but_live_source_is_not_taken_for_a_silent_one() {
    use crate::testing::{Link, release_cut};
    let f = Fixture::new();
    // Eight 4 KiB chunks, then one of 60 KiB (2 s on the wire), six times.
    let image = bytes(21, 6 * (8 * 4096 + 60 * 1024));
    let mut sizes = vec![4096; 8];
    sizes.push(60 * 1024);
    let (m, chunks) = release_cut("acme-os", "1.0", 1, DEVICE, &image, &sizes);
    let mut dev = SimDevice::new(&[], 2 * MIB as u64, 1);
    dev.stores.insert(SourceId(1), chunks.into_iter().collect());
    dev.links.insert(
        SourceId(1),
        Link {
            rtt_us: 50_000,
            bytes_per_s: 30 * 1024,
            ..Link::default()
        },
    );
    let mut engine = dev.engine(f.config());
    let limits = SourceLimits {
        requests_max: 2,
        request_bytes_max: 128 * 1024,
        request_chunks_max: 16,
    };
    let offer = f.offer(&m, vec![source(1, SourceClass::Wan).with_limits(limits)]);
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(slot_b_holds(&dev, &image));
    assert_eq!(dev.cancels, 0, "no request was given up on");
    let wire_s = image.len() as f64 / (30.0 * 1024.0);
    let took_s = dev.now().as_millis() as f64 / 1000.0;
    assert!(
        took_s < wire_s * 1.1,
        "{took_s} s for {wire_s} s on the wire: the source was backed off"
    );
}

/// Regression (issue 11): on a 10 Mbit/s link the daemon's four pipelined 4 MiB
/// batches shared the link from the start, so the first answer (which waited for a
/// zstd dictionary queued behind all of them) came after `rto_initial`; the live
/// server was taken for a silent one and the batches it had already sent were
/// asked again (1.33 x the diff on the wire). A source is now asked one request
/// until it first answers, then up to its limit, and never re-asked while live.
#[test]
fn a_source_gets_one_request_until_it_first_answers() {
    let f = Fixture::new();
    let image = bytes(24, MIB);
    let (mut dev, m, chunks) = setup(&image);
    dev.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    // A slow link: each 4 KiB chunk takes 2.5 s, so its first answer comes at
    // 2.6 s, inside `rto_initial` (3 s).
    dev.links.insert(
        SourceId(1),
        Link {
            rtt_us: 100_000,
            bytes_per_s: 4096 * 2 / 5,
            ..Link::default()
        },
    );
    let limits = SourceLimits {
        requests_max: 4,
        request_bytes_max: 64 * 1024,
        request_chunks_max: 1024,
    };
    let mut engine = dev.engine(f.config());
    let offer = f.offer(&m, vec![source(1, SourceClass::Wan).with_limits(limits)]);
    engine.offer(dev.now(), offer).expect("offer");
    let in_flight = |engine: &crate::Engine| {
        engine
            .status()
            .sources
            .iter()
            .find(|s| s.id == SourceId(1))
            .map(|s| s.requests_in_flight)
    };
    dev.run_until(&mut engine, None, 2_000).expect("no crash");
    assert_eq!(asked(&dev, 1).0, 1, "one request before any answer");
    assert_eq!(in_flight(&engine), Some(1));
    // Its first chunk came at 2.6 s: pipelining starts.
    dev.run_until(&mut engine, None, 2_700).expect("no crash");
    assert_eq!(
        in_flight(&engine),
        Some(4),
        "up to its limit once it answered"
    );
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(slot_b_holds(&dev, &image));
    assert_eq!(dev.cancels, 0, "no request was given up on");
    assert_eq!(
        asked(&dev, 1).1,
        chunks.len() as u64,
        "each chunk asked once"
    );
}

#[test]
fn the_data_budget_spent_survives_a_restart() {
    let f = Fixture::new();
    let image = bytes(22, MIB);
    let (mut dev, m, chunks) = setup(&image);
    let needed: u64 = chunks.iter().map(|(_, d)| d.len() as u64).sum();
    // The server is asked for everything, then drops out: the install stops.
    dev.fail_requests
        .insert(SourceId(1), FetchFailure::DropSource);
    let mut config = f.config();
    config.wan_budget_bytes = Some(needed + needed / 2);
    let mut engine = dev.engine(config.clone());
    let offer = f.offer(&m, vec![source(1, SourceClass::Wan)]);
    engine.offer(dev.now(), offer.clone()).expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert!(matches!(
        failed(&dev.events),
        Some(InstallError::SourcesFailed { .. })
    ));
    assert_eq!(dev.store.state.wan_spent_bytes, needed, "persisted");

    // Restarted from the store, the deployment has half its budget left, less
    // than the release still needs: refused before anything is fetched.
    dev.fail_requests.clear();
    dev.stores
        .insert(SourceId(1), chunks.iter().cloned().collect());
    dev.events.clear();
    let before = asked(&dev, 1);
    let mut engine = dev.engine(config);
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(
        failed(&dev.events),
        Some(&InstallError::OverBudget {
            needed: 2 * needed,
            allowed: needed + needed / 2
        })
    );
    assert_eq!(asked(&dev, 1), before, "nothing more was asked");
}

/// On a slow link a journal batch of `journal_batch_bytes` takes longer to fill than
/// a LAN swarm waits for a member's progress (only journaled chunks are announced):
/// a batch is also committed once its first chunk is `journal_batch_age` old.
#[test]
fn a_journal_batch_is_committed_by_age_on_a_slow_link() {
    use crate::testing::{Link, release_cut};
    let durable_ops = |age: std::time::Duration| {
        let f = Fixture::new();
        // 565 KiB at 30 KiB/s: about 19 s on the wire.
        let image = bytes(23, 6 * (8 * 4096 + 60 * 1024));
        let mut sizes = vec![4096; 8];
        sizes.push(60 * 1024);
        let (m, chunks) = release_cut("acme-os", "1.0", 1, DEVICE, &image, &sizes);
        let mut dev = SimDevice::new(&[], 2 * MIB as u64, 1);
        dev.stores.insert(SourceId(1), chunks.into_iter().collect());
        dev.links.insert(
            SourceId(1),
            Link {
                rtt_us: 50_000,
                bytes_per_s: 30 * 1024,
                ..Link::default()
            },
        );
        let mut config = f.config();
        config.journal_batch_bytes = 64 * MIB as u64;
        config.journal_batch_age = age;
        let mut engine = dev.engine(config);
        let offer = f.offer(&m, vec![source(1, SourceClass::Wan)]);
        engine.offer(dev.now(), offer).expect("offer");
        dev.run(&mut engine, None).expect("no crash");
        assert_eq!(failed(&dev.events), None);
        assert!(slot_b_holds(&dev, &image));
        dev.ops
    };
    let by_size_only = durable_ops(std::time::Duration::from_secs(3600));
    let by_age = durable_ops(std::time::Duration::from_secs(1));
    // Without the age, one commit at the end; with it, a commit whenever a chunk
    // arrives more than a second after the batch opened (each a slot sync and a
    // store transaction).
    assert!(
        by_age >= by_size_only + 8,
        "{by_age} durable operations with a 1 s batch age, {by_size_only} without"
    );
}

/// An owner that received its chunks and waits for LAN peers for the rest gets no
/// further chunk to commit its batch with: the batch is committed by its age timer
/// (its chunks are announced to peers only once they are journaled).
#[test]
fn a_journal_batch_is_committed_by_its_age_timer_when_no_chunk_follows() {
    use crate::{Input, Origin, Output};
    let f = Fixture::new();
    let image = bytes(24, MIB);
    let (mut dev, m, chunks) = setup(&image);
    let mut config = f.config();
    config.journal_batch_bytes = 64 * MIB as u64;
    config.journal_batch_age = std::time::Duration::from_secs(1);
    let mut engine = dev.engine(config);
    let offer = f.offer(&m, vec![source(1, SourceClass::Wan)]);
    engine.offer(dev.now(), offer).expect("offer");
    // The source answers one chunk of what it is asked, then nothing.
    let mut asked = Vec::new();
    let mut synced = false;
    let mut drain = |engine: &mut crate::Engine, dev: &mut SimDevice, asked: &mut Vec<ChunkId>| {
        while let Some(out) = engine.poll_output() {
            match out {
                Output::Fetch { ids, .. } => asked.extend(ids),
                Output::Write {
                    slot,
                    offsets,
                    data,
                    ..
                } => dev.handle(
                    engine,
                    Input::Written {
                        slot,
                        bytes: data.len() as u64 * offsets.len() as u64,
                    },
                ),
                Output::Sync { .. } => synced = true,
                out => dev.execute(engine, out).expect("no crash"),
            }
        }
    };
    drain(&mut engine, &mut dev, &mut asked);
    let first = *asked.first().expect("a chunk was asked");
    let data = chunks
        .iter()
        .find(|(id, _)| *id == first)
        .map(|(_, d)| d.clone())
        .expect("the chunk");
    let t0 = dev.now();
    engine.handle(
        t0,
        Input::Chunk {
            origin: Origin::Source(SourceId(1)),
            chunk: shoal_artifact::VerifiedChunk::check(first, data).expect("the chunk"),
        },
    );
    engine.check_invariants();
    drain(&mut engine, &mut dev, &mut asked);
    assert!(!synced, "a young batch of one chunk is not committed yet");
    let due = engine.poll_timeout().expect("a timer is set");
    assert!(
        due.as_millis() <= t0.as_millis() + 1000,
        "the batch's age timer is due by {} ms, not {} ms",
        t0.as_millis() + 1000,
        due.as_millis()
    );
    engine.handle_timeout(crate::Instant::from_millis(t0.as_millis() + 1000));
    engine.check_invariants();
    let synced =
        std::iter::from_fn(|| engine.poll_output()).any(|o| matches!(o, Output::Sync { .. }));
    assert!(
        synced,
        "the batch was committed by age with no chunk following"
    );
}
