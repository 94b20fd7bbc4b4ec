//! Engine tests, through the in-memory device of [`crate::testing`].

use std::collections::{BTreeMap, BTreeSet};

use shoal_artifact::{BaseRelease, ChunkId, Manifest};
use shoal_signing::{RoleName, SecretKey, TrustRoot, VerifyError};

use crate::state::slot_ordinal;
use crate::testing::{SimDevice, bytes, keys, release, sign};
use crate::{
    CommitError, Config, Engine, Event, Holds, Input, InstallError, Offer, OfferError, Origin,
    Output, Phase, Release, RollbackError, Slot, SourceClass, SourceFault, SourceId, SourceInfo,
    SourceKind, Verdict,
};

const DEVICE: &str = "acme-board";
const MIB: usize = 1024 * 1024;

struct Fixture {
    key: SecretKey,
    root: TrustRoot,
}

impl Fixture {
    fn new() -> Fixture {
        let (key, root) = keys(1);
        Fixture { key, root }
    }

    fn config(&self) -> Config {
        let mut c = Config::new(DEVICE, self.root.clone());
        c.journal_batch_bytes = 64 * 1024;
        c
    }
}

fn stream_offer(envelope: Vec<u8>) -> Offer {
    Offer {
        envelope,
        wall_unix_s: Some(1_800_000_000),
        sources: vec![SourceInfo::new(
            SourceId(1),
            SourceKind::Stream,
            SourceClass::Local,
            "artifact",
        )],
        reboot: false,
    }
}

fn stream(chunks: &[(ChunkId, Vec<u8>)]) -> Option<crate::testing::Stream> {
    let chunks: Vec<(ChunkId, Vec<u8>)> = chunks.to_vec();
    Some((SourceId(1), chunks.into_iter()))
}

/// v2 shares most of v1: a changed stretch in the middle.
fn images() -> (Vec<u8>, Vec<u8>) {
    let v1 = bytes(1, MIB);
    let mut v2 = v1.clone();
    v2[300_000..400_000].copy_from_slice(&bytes(2, 100_000));
    (v1, v2)
}

/// Offers `m` signed by the fixture's key with one WAN request source
/// (`SourceId(3)`, "usb"), as the index tests do.
fn offer_over_usb(
    engine: &mut Engine,
    now: crate::Instant,
    f: &Fixture,
    m: &Manifest,
    wall_unix_s: Option<u64>,
) {
    let source = SourceInfo::new(SourceId(3), SourceKind::Requests, SourceClass::Wan, "usb");
    engine
        .offer(
            now,
            Offer {
                envelope: sign(m, &f.key),
                wall_unix_s,
                sources: vec![source],
                reboot: false,
            },
        )
        .expect("offer");
}

/// The chunks of `chunks` (a release's) that v1's image (`v1`, cut as the
/// fixtures cut it) does not have.
/// Carries out the engine's outputs after an offer but its request to index the
/// active slot, which it returns (slot, chunking, length): a device Shoal has not
/// seen is indexed first.
fn index_request(
    dev: &mut SimDevice,
    engine: &mut Engine,
) -> (Slot, shoal_artifact::Chunking, u64) {
    let mut index_slot = None;
    while let Some(out) = engine.poll_output() {
        match out {
            Output::IndexSlot { .. } => index_slot = Some(out),
            other => dev.execute(engine, other).expect("no crash"),
        }
    }
    let Some(Output::IndexSlot {
        slot,
        chunking,
        len,
    }) = index_slot
    else {
        panic!("a device Shoal has not seen is indexed first");
    };
    (slot, chunking, len)
}

fn chunks_not_in(v1: &[u8], chunks: &[(ChunkId, Vec<u8>)]) -> Vec<(ChunkId, Vec<u8>)> {
    let in_v1: BTreeSet<ChunkId> = release("acme-os", "1.0", 1, DEVICE, v1)
        .1
        .iter()
        .map(|(id, _)| *id)
        .collect();
    chunks
        .iter()
        .filter(|(id, _)| !in_v1.contains(id))
        .cloned()
        .collect()
}

fn failed(events: &[Event]) -> Option<&InstallError> {
    events.iter().find_map(|e| match e {
        Event::Failed(err) => Some(err),
        _ => None,
    })
}

fn release_of(m: &Manifest) -> Release {
    Release::from_manifest(m, 0)
}

/// Installs `image` (as v1, counter 1) on a fresh device and commits it; returns it.
fn device_running_v1(f: &Fixture, v1: &[u8]) -> (SimDevice, Manifest) {
    let mut dev = SimDevice::new(&bytes(99, MIB), 2 * MIB as u64, 5);
    let (m1, c1) = release("acme-os", "1.0", 1, DEVICE, v1);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m1, &f.key)))
        .expect("offer v1");
    dev.run(&mut engine, stream(&c1)).expect("no crash");
    dev.reboot();
    let mut engine = dev.engine(f.config());
    engine.boot(dev.now(), dev.boot_info());
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(dev.boot.committed(), Slot::B);
    assert_eq!(dev.store.state.active, Slot::B);
    dev.events.clear();
    (dev, m1)
}

#[test]
fn full_install_from_stream_then_trial_commit_raises_floor() {
    let f = Fixture::new();
    let (v1, _) = images();
    let mut dev = SimDevice::new(&bytes(99, MIB), 2 * MIB as u64, 1);
    let (m1, c1) = release("acme-os", "1.0", 7, DEVICE, &v1);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m1, &f.key)))
        .expect("offer");
    dev.run(&mut engine, stream(&c1)).expect("no crash");

    assert_eq!(failed(&dev.events), None);
    assert_eq!(
        dev.boot.armed(),
        Some(Slot::B),
        "trial armed on the inactive slot"
    );
    assert_eq!(
        &dev.durable[1][..v1.len()],
        &v1[..],
        "slot B holds v1, durably"
    );
    let p = engine.progress();
    assert_eq!(
        (p.written_bytes, p.fetched_bytes, p.resumed_bytes),
        (MIB as u64, MIB as u64, 0)
    );
    assert_eq!(
        dev.store.state.deployment.as_ref().map(|d| d.phase.clone()),
        Some(Phase::TrialArmed)
    );
    assert!(
        dev.events
            .iter()
            .any(|e| matches!(e, Event::Indexing { slot: Slot::A, .. }))
    );

    dev.reboot();
    let mut engine = dev.engine(f.config());
    engine.boot(dev.now(), dev.boot_info());
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(dev.boot.committed(), Slot::B);
    assert_eq!(dev.store.state.floor, 7);
    assert_eq!(dev.store.state.active, Slot::B);
    assert_eq!(dev.store.state.deployment, None);
    assert_eq!(
        dev.store.state.last.as_ref().map(|o| o.verdict.clone()),
        Some(Verdict::Committed)
    );
    assert_eq!(dev.store.state.releases[1], Some(release_of(&m1)));
}

#[test]
fn delta_install_reuses_active_slot_and_fetches_only_the_difference() {
    let f = Fixture::new();
    let (v1, v2) = images();
    let (mut dev, _) = device_running_v1(&f, &v1);
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    dev.stores.insert(SourceId(3), c2.into_iter().collect());
    let mut engine = dev.engine(f.config());
    let offer = Offer {
        envelope: sign(&m2, &f.key),
        wall_unix_s: None,
        sources: vec![SourceInfo::new(
            SourceId(3),
            SourceKind::Requests,
            SourceClass::Wan,
            "usb",
        )],
        reboot: true,
    };
    engine.offer(dev.now(), offer).expect("offer v2");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    let p = engine.progress();
    // 100 000 changed bytes touch 25 chunks of 4 KiB (bytes 299 008..401 408).
    assert_eq!(p.fetched_bytes, 25 * 4096);
    assert_eq!(p.reused_bytes, MIB as u64 - 25 * 4096);
    assert!(
        !dev.events
            .iter()
            .any(|e| matches!(e, Event::Indexing { .. })),
        "index known from install"
    );
    assert_eq!(&dev.live[0][..v2.len()], &v2[..]);
    assert_eq!(dev.reboots, 1, "reboot asked for");
    assert_eq!(
        dev.store.state.deployment.as_ref().map(|d| d.phase.clone()),
        Some(Phase::Rebooting)
    );
}

#[test]
fn offer_checks_refuse_before_anything_is_written() {
    let f = Fixture::new();
    let (v1, _) = images();
    let dev = SimDevice::new(&v1, 2 * MIB as u64, 1);
    let check = |m: &Manifest, key: &SecretKey, config: Config| {
        let mut engine = Engine::new(config, dev.store.load());
        let r = engine.offer(dev.now(), stream_offer(sign(m, key)));
        if r.is_err() {
            assert_eq!(
                engine.poll_output(),
                None,
                "no output after a refused offer"
            );
        }
        r
    };
    let (m, _) = release("acme-os", "1.0", 5, DEVICE, &v1);

    let (other_key, _) = keys(2);
    assert!(matches!(
        check(&m, &other_key, f.config()),
        Err(OfferError::Signature(VerifyError::BelowThreshold {
            role: RoleName::Release,
            valid: 0,
            ..
        }))
    ));

    let (wrong_type, _) = release("acme-os", "1.0", 5, "other-board", &v1);
    assert_eq!(
        check(&wrong_type, &f.key, f.config()),
        Err(OfferError::DeviceType {
            device_type: DEVICE.into(),
            supported: vec!["other-board".into()]
        })
    );

    let mut depends = m.clone();
    depends.depends = BTreeMap::from([("bootloader".to_string(), vec!["v2".to_string()])]);
    assert_eq!(
        check(&depends, &f.key, f.config()),
        Err(OfferError::Depends {
            key: "bootloader".into(),
            wanted: vec!["v2".into()],
            have: None
        })
    );
    let mut provides = f.config();
    provides.provides.insert("bootloader".into(), "v2".into());
    assert_eq!(check(&depends, &f.key, provides), Ok(()));

    let mut big = SimDevice::new(&v1, 2 * MIB as u64, 1);
    big.store.state.slot_capacity = [2 * MIB as u64, MIB as u64 - 1];
    let mut engine = Engine::new(f.config(), big.store.load());
    assert_eq!(
        engine.offer(big.now(), stream_offer(sign(&m, &f.key))),
        Err(OfferError::SlotTooSmall {
            slot: Slot::B,
            need: MIB as u64,
            capacity: MIB as u64 - 1
        })
    );

    let mut engine = Engine::new(f.config(), dev.store.load());
    assert!(matches!(
        engine.offer(dev.now(), stream_offer(b"not an envelope".to_vec())),
        Err(OfferError::Envelope(_))
    ));

    // Regression (issue 9, item 4): a signed release with a 0-byte payload was
    // accepted and reported as "already written and verified".
    let (empty, _) = release("acme-os", "1.0", 5, DEVICE, &[]);
    assert_eq!(
        check(&empty, &f.key, f.config()),
        Err(OfferError::Manifest(
            shoal_artifact::ManifestError::EmptyPayload {
                payload: "rootfs".into()
            }
        ))
    );

    let mut expired_root = f.root.clone();
    expired_root.expires_unix_s = 1_000;
    let mut config = f.config();
    config.trust_root = expired_root;
    assert!(matches!(
        check(&m, &f.key, config),
        Err(OfferError::Signature(VerifyError::Expired { .. }))
    ));
}

#[test]
fn anti_rollback_floor_rises_only_at_commit() {
    let f = Fixture::new();
    let (v1, v2) = images();
    let (mut dev, _) = device_running_v1(&f, &v1);
    assert_eq!(dev.store.state.floor, 1);
    let (m5, c5) = release("acme-os", "5.0", 5, DEVICE, &v2);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m5, &f.key)))
        .expect("offer");
    dev.run(&mut engine, stream(&c5)).expect("no crash");
    assert_eq!(
        dev.store.state.floor, 1,
        "armed, not committed: the floor stays"
    );

    // Cancelling the armed install leaves the floor alone; an older release is fine.
    engine
        .rollback(dev.now(), "operator cancelled")
        .expect("rollback");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(dev.boot.armed(), None);
    let (m0, _) = release("acme-os", "0.9", 0, DEVICE, &v2);
    let mut engine = dev.engine(f.config());
    assert_eq!(
        engine.offer(dev.now(), stream_offer(sign(&m0, &f.key))),
        Err(OfferError::BelowFloor {
            counter: 0,
            floor: 1
        })
    );
}

#[test]
fn failed_health_check_rolls_back_with_its_reason() {
    let f = Fixture::new();
    let (v1, v2) = images();
    let (mut dev, _) = device_running_v1(&f, &v1);
    let (m3, c3) = release("acme-os", "3.0", 3, DEVICE, &v2);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m3, &f.key)))
        .expect("offer");
    dev.run(&mut engine, stream(&c3)).expect("no crash");
    assert_eq!(dev.boot.armed(), Some(Slot::A));

    dev.reboot();
    dev.health = Err("check-network exited with 1".into());
    let mut engine = dev.engine(f.config());
    engine.boot(dev.now(), dev.boot_info());
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(dev.reboots, 1);
    assert_eq!(
        dev.boot.committed(),
        Slot::B,
        "bootloader points back at v1"
    );
    let last = dev.store.state.last.clone().expect("a result");
    assert_eq!(
        last.verdict,
        Verdict::RolledBack {
            reason: "check-network exited with 1".into()
        }
    );
    assert_eq!(
        dev.store.state.floor, 1,
        "floor not raised by a rolled back release"
    );

    dev.reboot();
    let mut engine = dev.engine(f.config());
    engine.boot(dev.now(), dev.boot_info());
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(dev.store.state.active, Slot::B);
    assert_eq!(
        engine.commit(dev.now()),
        Err(CommitError::NotInTrial { phase: None })
    );
    assert_eq!(
        engine.rollback(dev.now(), "x"),
        Err(RollbackError::NothingToRollBack)
    );
}

#[test]
fn trial_that_never_came_up_is_recorded_as_rolled_back() {
    let f = Fixture::new();
    let (v1, v2) = images();
    let (mut dev, _) = device_running_v1(&f, &v1);
    let (m3, c3) = release("acme-os", "3.0", 3, DEVICE, &v2);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m3, &f.key)))
        .expect("offer");
    dev.run(&mut engine, stream(&c3)).expect("no crash");

    // Before the reboot, boot-check sees the trial still pending: nothing happens.
    let mut engine = dev.engine(f.config());
    engine.boot(dev.now(), dev.boot_info());
    dev.run(&mut engine, None).expect("no crash");
    assert!(
        dev.events
            .iter()
            .any(|e| matches!(e, Event::TrialPending { slot: Slot::A }))
    );
    assert!(dev.store.state.deployment.is_some());

    // The reboot starts the trial of A, whose kernel hangs: the watchdog resets
    // the board, and the bootloader, the trial's one try used up, boots B.
    dev.reboot();
    dev.reboot();
    let mut engine = dev.engine(f.config());
    engine.boot(dev.now(), dev.boot_info());
    dev.run(&mut engine, None).expect("no crash");
    let last = dev.store.state.last.clone().expect("a result");
    assert!(
        matches!(&last.verdict, Verdict::RolledBack { reason } if reason.contains("did not come up")),
        "{last:?}"
    );
    assert_eq!(dev.store.state.deployment, None);
}

#[test]
fn thin_artifact_without_its_base_names_the_base_and_the_count() {
    let f = Fixture::new();
    let (v1, v2) = images();
    let mut dev = SimDevice::new(&bytes(99, MIB), 2 * MIB as u64, 1);
    let (m1, c1) = release("acme-os", "1.0", 1, DEVICE, &v1);
    let (mut m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    m2.base = Some(BaseRelease {
        name: "acme-os".into(),
        version: "1.0".into(),
        manifest_hash: m1.hash(),
    });
    let base_ids: std::collections::BTreeSet<ChunkId> = c1.iter().map(|c| c.0).collect();
    let thin: Vec<(ChunkId, Vec<u8>)> = c2
        .into_iter()
        .filter(|c| !base_ids.contains(&c.0))
        .collect();
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m2, &f.key)))
        .expect("offer");
    dev.run(&mut engine, stream(&thin)).expect("no crash");
    match failed(&dev.events) {
        Some(InstallError::MissingChunks {
            count,
            bytes,
            base: Some(base),
            active: None,
        }) => {
            assert_eq!(*count, 256 - 25);
            assert_eq!(*bytes, (256 - 25) * 4096);
            assert_eq!(
                (base.name.as_str(), base.version.as_str()),
                ("acme-os", "1.0")
            );
        }
        other => panic!("expected MissingChunks, got {other:?}"),
    }
    assert_eq!(dev.boot.armed(), None);
    let msg = failed(&dev.events)
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(msg.contains("base release acme-os 1.0"), "{msg}");
}

#[test]
fn corrupt_stream_chunk_fails_the_install_when_no_other_source_can_serve() {
    let f = Fixture::new();
    let (v1, _) = images();
    let (m1, mut c1) = release("acme-os", "1.0", 1, DEVICE, &v1);
    c1[3].1[0] ^= 1;
    let bad_id = c1[3].0;
    let mut dev = SimDevice::new(&bytes(99, MIB), 2 * MIB as u64, 1);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m1, &f.key)))
        .expect("offer");
    dev.run(&mut engine, stream(&c1)).expect("no crash");
    assert_eq!(
        failed(&dev.events),
        Some(&InstallError::CorruptChunk {
            origin: Origin::Source(SourceId(1)),
            id: bad_id
        })
    );
    assert!(!failed(&dev.events).is_some_and(InstallError::worth_retrying));
    assert!(dev.events.contains(&Event::SourceBanned {
        source: SourceId(1)
    }));
    assert_eq!(dev.boot.armed(), None);
}

#[test]
fn offering_the_armed_release_again_rearms_without_writing() {
    let f = Fixture::new();
    let (v1, _) = images();
    let (m1, c1) = release("acme-os", "1.0", 1, DEVICE, &v1);
    let mut dev = SimDevice::new(&bytes(99, MIB), 2 * MIB as u64, 1);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m1, &f.key)))
        .expect("offer");
    dev.run(&mut engine, stream(&c1)).expect("no crash");
    let written = dev.bytes_written;
    // The trial is disarmed (lost, e.g. an operator's rollback with `shoal slot`).
    dev.boot
        .apply(shoal_bootctl::model::Step::Disarm(Slot::B))
        .expect("disarmed");
    assert_eq!(dev.boot.armed(), None);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m1, &f.key)))
        .expect("offer again");
    dev.run(&mut engine, stream(&c1)).expect("no crash");
    assert_eq!(dev.bytes_written, written);
    assert_eq!(dev.boot.armed(), Some(Slot::B));
    assert_eq!(engine.progress().resumed_bytes, MIB as u64);
}

#[test]
fn a_new_release_during_a_trial_is_refused() {
    let f = Fixture::new();
    let (v1, v2) = images();
    let (mut dev, _) = device_running_v1(&f, &v1);
    let (m3, c3) = release("acme-os", "3.0", 3, DEVICE, &v2);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m3, &f.key)))
        .expect("offer");
    dev.run(&mut engine, stream(&c3)).expect("no crash");
    dev.reboot();
    dev.health = Err("pending".into());
    let mut engine = dev.engine(f.config());
    engine.boot(dev.now(), dev.boot_info());
    // Health checks asked for; the answer has not come: a trial is in progress.
    while let Some(out) = engine.poll_output() {
        if out == crate::Output::RunHealthChecks {
            break;
        }
        if let crate::Output::Persist(r) = out {
            dev.store.apply(&r);
        }
    }
    let (m4, _) = release("acme-os", "4.0", 4, DEVICE, &v1);
    let mut engine = dev.engine(f.config());
    assert_eq!(
        engine.offer(dev.now(), stream_offer(sign(&m4, &f.key))),
        Err(OfferError::Busy {
            release: "acme-os 3.0".into(),
            phase: Phase::Trial
        })
    );
    engine.commit(dev.now()).expect("commit in trial");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(dev.store.state.floor, 3);
    assert_eq!(dev.boot.committed(), Slot::A);
}

/// Cuts the power before every durable operation of an install + trial + commit, and
/// checks after each: the next boot runs a slot holding a complete verified image; a
/// rerun completes; it rewrites nothing the journal recorded.
#[test]
fn power_cut_at_every_operation_keeps_a_bootable_verified_slot_and_resumes() {
    let (v1, v2) = images();
    power_cuts(&v1, &v2, 1, &[]);
}

/// [`power_cut_at_every_operation_keeps_a_bootable_verified_slot_and_resumes`]
/// with a release whose zero-filled regions repeat one chunk 70 times (written
/// everywhere at once and journaled as one entry), cut at every third operation.
#[test]
fn power_cuts_in_a_release_with_a_repeated_chunk_resume_it() {
    let (v1, mut v2) = images();
    v2[500_000..700_000].fill(0);
    v2[800_000..900_000].fill(0);
    let (m2, _) = release("acme-os", "2.0", 2, DEVICE, &v2);
    let zero = ChunkId::from(blake3::hash(&[0u8; 4096]));
    let zeros: Vec<u32> = (0u32..)
        .zip(&m2.payloads[0].chunks)
        .filter(|(_, c)| c.id == zero)
        .map(|(p, _)| p)
        .collect();
    assert_eq!(zeros.len(), 70, "the zero chunk repeats");
    power_cuts(&v1, &v2, 3, &zeros);
}

/// Installs `v2` over `v1` with a power cut at every `step`-th operation; each
/// time the next boot holds a verified image, the journal holds all or none of
/// the positions `together` (a repeated chunk's, written at once), and the rerun
/// completes writing at most what the journal lacked.
fn power_cuts(v1: &[u8], v2: &[u8], step: usize, together: &[u32]) {
    let f = Fixture::new();
    let (v1, v2) = (v1.to_vec(), v2.to_vec());
    let (base_dev, m1) = device_running_v1(&f, &v1);
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    let r1 = release_of(&m1);
    let r2 = release_of(&m2);

    // A clean run, to count the operations.
    let mut total_ops = 0;
    {
        let mut dev = clone_device(&base_dev, 0);
        let before = dev.ops;
        run_to_commit(&f, &mut dev, &m2, &c2).expect("clean run");
        total_ops = total_ops.max(dev.ops - before);
    }
    assert!(total_ops > 40, "enough operations to cut: {total_ops}");

    for cut in (1..=total_ops).step_by(step) {
        let mut dev = clone_device(&base_dev, cut);
        let start = dev.ops;
        dev.crash_at = Some(start + cut);
        let crashed = run_to_commit(&f, &mut dev, &m2, &c2).is_err();
        assert!(crashed, "cut {cut} happened");
        let journaled = together
            .iter()
            .filter(|p| dev.store.state.journaled.contains(p))
            .count();
        assert!(
            journaled == 0 || journaled == together.len(),
            "cut {cut}: the journal holds {journaled} of the {} positions of the repeated chunk",
            together.len()
        );

        // Safety: whatever boots next holds a complete, verified release.
        let next = dev.boot.next_boot();
        dev.reboot();
        let held = dev.holds(next, &[&r1, &r2]);
        assert!(
            held.is_some(),
            "cut {cut}: next boot slot {next} holds no verified image"
        );
        if dev.store.state.releases[slot_ordinal(next)].is_some() {
            assert_eq!(
                dev.store.state.releases[slot_ordinal(next)],
                held,
                "cut {cut}: store agrees"
            );
        }

        // Liveness: the rerun completes (re-offering if the install had not armed).
        let journal_bytes = if dev.holds(Slot::A, &[&r2]).is_some()
            && dev.store.state.releases[0].as_ref() == Some(&r2)
        {
            r2.payload_size
        } else {
            dev.engine(f.config()).status().deployment.map_or(0, |d| {
                if d.phase == Phase::Fetching {
                    d.journal_bytes
                } else {
                    0
                }
            })
        };
        let written_before = dev.bytes_written;
        let mut engine = dev.engine(f.config());
        engine.boot(dev.now(), dev.boot_info());
        dev.run(&mut engine, None).expect("no crash");
        if dev.store.state.last.as_ref().map(|o| &o.verdict) != Some(&Verdict::Committed)
            || dev.store.state.active != Slot::A
        {
            run_to_commit(&f, &mut dev, &m2, &c2).expect("rerun without crash");
        }
        assert_eq!(
            dev.store.state.active,
            Slot::A,
            "cut {cut}: v2 committed in the end"
        );
        assert_eq!(dev.boot.committed(), Slot::A, "cut {cut}");
        assert_eq!(dev.holds(Slot::A, &[&r2]), Some(r2.clone()), "cut {cut}");
        assert_eq!(dev.store.state.floor, 2, "cut {cut}");
        // Nothing the journal recorded was rewritten: the rerun wrote at most the rest.
        let rewritten = dev.bytes_written - written_before;
        assert!(
            rewritten <= r2.payload_size - journal_bytes,
            "cut {cut}: rerun wrote {rewritten}, journal had {journal_bytes} of {}",
            r2.payload_size
        );
    }
}

fn clone_device(base: &SimDevice, seed: u64) -> SimDevice {
    let mut dev = SimDevice::new(&[], base.live[0].len() as u64, seed);
    dev.live = base.live.clone();
    dev.durable = base.durable.clone();
    dev.store = base.store.clone();
    dev.boot = base.boot.clone();
    dev.ops = base.ops;
    dev
}

/// Offer (if needed), install, reboot into the trial, boot-check commit.
fn run_to_commit(
    f: &Fixture,
    dev: &mut SimDevice,
    m: &Manifest,
    chunks: &[(ChunkId, Vec<u8>)],
) -> Result<(), crate::testing::Crashed> {
    let mut engine = dev.engine(f.config());
    let armed_already = matches!(
        dev.store.state.deployment.as_ref().map(|d| &d.phase),
        Some(Phase::Rebooting | Phase::Trial | Phase::RollingBack { .. })
    );
    if !armed_already {
        engine
            .offer(dev.now(), stream_offer(sign(m, &f.key)))
            .expect("offer");
        dev.run(&mut engine, stream(chunks))?;
        assert_eq!(failed(&dev.events), None);
        dev.reboot();
    }
    let mut engine = dev.engine(f.config());
    engine.boot(dev.now(), dev.boot_info());
    dev.run(&mut engine, None)
}

/// A chunk the index lacks (e.g. the last chunk of an image, which cutting the
/// whole slot merges with the slot's trailing bytes) is read from the active slot at
/// its own offset, verified, and not fetched.
#[test]
fn chunks_missing_from_the_index_are_found_at_their_own_offset() {
    let f = Fixture::new();
    let (v1, _) = images();
    let mut dev = SimDevice::new(&v1, 2 * MIB as u64, 1);
    dev.store.indexes[0] = Some(crate::SlotIndex {
        chunking: crate::testing::TEST_CHUNKING,
        chunks: Vec::new(),
    });
    let (m1, _) = release("acme-os", "1.0", 1, DEVICE, &v1);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m1, &f.key)))
        .expect("offer");
    // A stream that holds nothing: everything must come from the slot.
    dev.run(&mut engine, stream(&[])).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    let p = engine.progress();
    assert_eq!((p.reused_bytes, p.fetched_bytes), (MIB as u64, 0));
    assert_eq!(&dev.live[1][..v1.len()], &v1[..]);
    assert!(
        !dev.events
            .iter()
            .any(|e| matches!(e, Event::Indexing { .. }))
    );
}

/// A stream that says up front which chunks it holds (a thin artifact's contents)
/// and lacks some the device does not have either: refused before anything is
/// written, naming how many are missing.
#[test]
fn chunks_no_source_holds_are_refused_before_any_write() {
    let f = Fixture::new();
    let (v1, v2) = images();
    let (mut dev, _) = device_running_v1(&f, &v1);
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    let new = chunks_not_in(&v1, &c2);
    assert!(new.len() >= 2, "v2 has new chunks");
    // The stream holds all new chunks but one.
    let mut offer = stream_offer(sign(&m2, &f.key));
    offer.sources[0].holds = Holds::Ids(new[1..].iter().map(|(id, _)| *id).collect());
    let target = dev.live[0].clone();
    let mut engine = dev.engine(f.config());
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, stream(&new[1..])).expect("no crash");
    match failed(&dev.events) {
        Some(InstallError::MissingChunks { count, bytes, .. }) => {
            assert_eq!(*count, 1);
            assert_eq!(*bytes, new[0].1.len() as u64);
        }
        other => panic!("expected MissingChunks, got {other:?}"),
    }
    assert_eq!(dev.live[0], target, "the inactive slot was not written");
    assert_eq!(engine.progress().written_bytes, 0);

    // Holding them all, the same offer installs.
    let mut offer = stream_offer(sign(&m2, &f.key));
    offer.sources[0].holds = Holds::Ids(new.iter().map(|(id, _)| *id).collect());
    let mut engine = dev.engine(f.config());
    dev.events.clear();
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, stream(&new)).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(&dev.live[0][..v2.len()], &v2[..]);
}

/// Feeds v2's new chunks as a stream to a device running v1 (config's lead
/// `lead`), sending [`Input::StreamAt`] before each chunk when `stream_at`; returns
/// the reads carried out before each stream chunk was handed over, and the payload
/// offsets (first occurrence) of v2's chunks.
fn reads_before_each_stream_chunk(
    lead: u64,
    stream_at: bool,
) -> (Vec<usize>, Vec<(ChunkId, u64)>, usize) {
    let f = Fixture::new();
    let (v1, v2) = images();
    let (mut dev, _) = device_running_v1(&f, &v1);
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    let new = chunks_not_in(&v1, &c2);
    let reused = c2.len() - new.len();
    assert!(
        new.len() >= 20 && reused >= 200,
        "{} new, {reused} reused",
        new.len()
    );
    let mut offsets = Vec::new();
    let mut at = 0u64;
    for (id, data) in &c2 {
        if !offsets.iter().any(|(i, _)| i == id) {
            offsets.push((*id, at));
        }
        at += data.len() as u64;
    }
    let mut offer = stream_offer(sign(&m2, &f.key));
    offer.sources[0].holds = Holds::Ids(new.iter().map(|(id, _)| *id).collect());
    let mut config = f.config();
    config.stream_read_lead_bytes = lead;
    let mut engine = dev.engine(config);
    engine.offer(dev.now(), offer).expect("offer");
    let source = SourceId(1);
    let mut reads = 0usize;
    let mut before = Vec::new();
    let mut stream = new.clone().into_iter();
    loop {
        while let Some(out) = engine.poll_output() {
            reads += usize::from(matches!(out, Output::Read { .. }));
            dev.execute(&mut engine, out).expect("no crash");
        }
        let Some((id, data)) = stream.next() else {
            dev.handle(&mut engine, Input::SourceEnded { source });
            break;
        };
        assert!(engine.wants(&id), "chunk {id} of the stream is needed");
        if stream_at {
            dev.handle(&mut engine, Input::StreamAt { source, id });
            while let Some(out) = engine.poll_output() {
                reads += usize::from(matches!(out, Output::Read { .. }));
                dev.execute(&mut engine, out).expect("no crash");
            }
        }
        before.push(reads);
        dev.handle(
            &mut engine,
            Input::checked(Origin::Source(source), id, data),
        );
    }
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(&dev.live[0][..v2.len()], &v2[..]);
    assert_eq!(reads, reused, "each reused chunk read once");
    let first = |id: &ChunkId| offsets.iter().find(|(i, _)| i == id).expect("in v2").1;
    let expected = new
        .iter()
        .enumerate()
        .map(|(k, (id, _))| {
            // Where the stream is before it hands over chunk k.
            let position = match (stream_at, k) {
                (true, _) | (false, 0) => first(id),
                (false, _) => first(&new[k - 1].0) + new[k - 1].1.len() as u64,
            };
            offsets
                .iter()
                .filter(|(i, at)| !new.iter().any(|(n, _)| n == i) && *at < position + lead)
                .count()
        })
        .collect::<Vec<_>>();
    assert_eq!(before, expected, "reads before each stream chunk");
    (before, offsets, reused)
}

/// Reads of the active slot keep pace with the position in the payload of the
/// stream that brings the rest (a thin artifact): the driver answers reads at once,
/// so without the pacing every reused chunk would be read before the stream's first
/// chunk, and the stream's decoding would then run alone. The stream says where it
/// is ([`Input::StreamAt`]) before each chunk: the reads carried out by then are
/// exactly those of the reused chunks before that chunk (plus the lead).
#[test]
fn reads_of_the_active_slot_are_interleaved_with_the_stream() {
    let (before, offsets, reused) = reads_before_each_stream_chunk(16 * 1024, true);
    // The stretch changed in v2 starts at 300 000: every reused chunk before it (and
    // 16 KiB more) is read before the stream's first chunk, none after it.
    let upto = offsets.iter().filter(|(_, at)| *at < 300_000).count();
    assert!(
        before[0] >= upto - 1 && before[0] < reused / 2,
        "{} reads of {reused} before the stream's first chunk ({upto} chunks before it)",
        before[0]
    );
}

/// Without [`Input::StreamAt`], the stream's position is the end of the last chunk it
/// handed over (and, before the first, where the first chunk it brings lies).
#[test]
fn reads_keep_pace_with_the_chunks_a_stream_handed_over_when_it_says_nothing() {
    let (before, _, reused) = reads_before_each_stream_chunk(0, false);
    assert!(before[0] > 16 && before[0] < reused / 2, "{before:?}");
}

/// A stream that holds the chunks planned for reading too (a full artifact) does not
/// pace the reads: they all come first, and the stream skips those chunks instead of
/// decoding them from the source.
#[test]
fn reads_of_chunks_the_stream_holds_too_all_come_before_the_stream() {
    let f = Fixture::new();
    let (v1, v2) = images();
    let (mut dev, _) = device_running_v1(&f, &v1);
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    let mut offer = stream_offer(sign(&m2, &f.key));
    offer.sources[0].holds = Holds::Ids(c2.iter().map(|(id, _)| *id).collect());
    let mut config = f.config();
    config.writing_bytes_max = 64 * 1024;
    let mut engine = dev.engine(config);
    engine.offer(dev.now(), offer).expect("offer");
    let mut reads = 0usize;
    while let Some(out) = engine.poll_output() {
        reads += usize::from(matches!(out, Output::Read { .. }));
        dev.execute(&mut engine, out).expect("no crash");
    }
    let wanted = c2.iter().filter(|(id, _)| engine.wants(id)).count();
    assert!(reads >= 200, "{reads} reads before the stream");
    assert_eq!(wanted, c2.len() - reads, "the stream brings only the rest");
    dev.run(&mut engine, stream(&c2)).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(&dev.live[0][..v2.len()], &v2[..]);
    let p = engine.progress();
    assert_eq!(p.reused_bytes, reads as u64 * 4096);
}

/// A stream that says it holds nothing on a device whose index lacks every chunk:
/// the probe finds them all at their own offsets in the active slot.
#[test]
fn probing_finds_unindexed_chunks_in_the_active_slot() {
    let f = Fixture::new();
    let (v1, _) = images();
    let mut dev = SimDevice::new(&v1, 2 * MIB as u64, 1);
    dev.store.indexes[0] = Some(crate::SlotIndex {
        chunking: crate::testing::TEST_CHUNKING,
        chunks: Vec::new(),
    });
    let (m1, _) = release("acme-os", "1.0", 1, DEVICE, &v1);
    let mut offer = stream_offer(sign(&m1, &f.key));
    offer.sources[0].holds = Holds::Ids(BTreeSet::new());
    let mut engine = dev.engine(f.config());
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, stream(&[])).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(engine.progress().reused_bytes, MIB as u64);
    assert_eq!(&dev.live[1][..v1.len()], &v1[..]);
}

/// A chunk the index lacks but the stream says it holds is taken from the stream:
/// the active slot is not read on the off chance (it would be a wasted read of the
/// whole slot on a device whose slot shares nothing).
#[test]
fn chunks_a_stream_holds_are_not_guessed_in_the_active_slot() {
    let f = Fixture::new();
    let (v1, _) = images();
    let mut dev = SimDevice::new(&v1, 2 * MIB as u64, 1);
    dev.store.indexes[0] = Some(crate::SlotIndex {
        chunking: crate::testing::TEST_CHUNKING,
        chunks: Vec::new(),
    });
    let (m1, c1) = release("acme-os", "1.0", 1, DEVICE, &v1);
    let mut offer = stream_offer(sign(&m1, &f.key));
    offer.sources[0].holds = Holds::Ids(c1.iter().map(|(id, _)| *id).collect());
    let mut engine = dev.engine(f.config());
    engine.offer(dev.now(), offer).expect("offer");
    dev.run(&mut engine, stream(&c1)).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    let p = engine.progress();
    assert_eq!((p.reused_bytes, p.fetched_bytes), (0, MIB as u64));
    assert_eq!(&dev.live[1][..v1.len()], &v1[..]);
}

#[test]
fn an_interrupted_install_reports_its_journaled_ranges_on_resume() {
    let f = Fixture::new();
    let (v1, v2) = images();
    let (base_dev, _) = device_running_v1(&f, &v1);
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    // No install, no ranges.
    assert!(base_dev.engine(f.config()).journaled_ranges().is_empty());

    // Cut the power in the middle of the install, after some batches were journaled.
    let mut clean = clone_device(&base_dev, 0);
    let start = clean.ops;
    let mut engine = clean.engine(f.config());
    engine
        .offer(clean.now(), stream_offer(sign(&m2, &f.key)))
        .expect("offer");
    clean.run(&mut engine, stream(&c2)).expect("clean run");
    let ops = clean.ops - start;
    let mut dev = clone_device(&base_dev, 1);
    dev.crash_at = Some(dev.ops + ops * 2 / 3);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m2, &f.key)))
        .expect("offer");
    assert!(
        dev.run(&mut engine, stream(&c2)).is_err(),
        "the cut happened"
    );
    dev.reboot();

    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m2, &f.key)))
        .expect("offer again");
    let ranges = engine.journaled_ranges();
    let journaled: u64 = ranges.iter().map(|&(_, len)| len).sum();
    assert!(journaled > 0, "some work was journaled before the cut");
    assert_eq!(journaled, engine.progress().resumed_bytes);
    // Each journaled range holds the new release's bytes on the medium already.
    let target = slot_ordinal(Slot::A);
    for (offset, len) in ranges {
        let (o, l) = (offset as usize, len as usize);
        assert_eq!(
            &dev.durable[target][o..o + l],
            &v2[o..o + l],
            "range {offset}+{len}"
        );
    }
}

#[test]
fn needed_chunks_met_while_indexing_are_written_and_not_read_again() {
    let f = Fixture::new();
    let (v1, v2) = images();
    // Slot A runs v1, not installed by Shoal: the install indexes it first.
    let mut dev = SimDevice::new(&v1, 2 * MIB as u64, 1);
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m2, &f.key)))
        .expect("offer");
    let (slot, chunking, len) = index_request(&mut dev, &mut engine);
    assert_eq!(slot, Slot::A);

    // The driver cuts the slot and hands over the needed chunks it meets.
    assert!(engine.takes_while_indexing());
    let needed_now = engine.needed_chunks();
    let needed: BTreeSet<ChunkId> = needed_now.ids().collect();
    assert!(!needed.is_empty());
    assert_eq!(
        needed,
        engine.awaited_chunks().ids().collect::<BTreeSet<_>>()
    );
    // A needed chunk's key is its own entry of the release's table.
    let keys: BTreeSet<u32> = needed
        .iter()
        .map(|id| needed_now.key(id).expect("a needed chunk has a key"))
        .collect();
    assert_eq!(keys.len(), needed.len());
    let live = dev.live[slot_ordinal(slot)].clone();
    let end = usize::try_from(len).expect("fits").min(live.len());
    let index = crate::testing::index_fixed(&live[..end], chunking);
    let mut handed = BTreeSet::new();
    for c in &index.chunks {
        if needed.contains(&c.id) && handed.insert(c.id) {
            let at = usize::try_from(c.offset).expect("fits");
            dev.handle(
                &mut engine,
                Input::checked(
                    Origin::Slot(slot),
                    c.id,
                    live[at..at + c.len as usize].to_vec(),
                ),
            );
        }
    }
    assert!(handed.len() > 10, "v2 shares most of v1: {}", handed.len());
    let mut writes = 0;
    while let Some(out) = engine.poll_output() {
        writes += usize::from(matches!(out, Output::Write { .. }));
        dev.execute(&mut engine, out).expect("no crash");
    }
    assert!(
        writes >= handed.len(),
        "each handed chunk is written at once"
    );
    // A chunk written is no longer needed: no key (a cut keeps no bit for it);
    // nor has a chunk the release does not list.
    let after = engine.needed_chunks();
    for id in &needed {
        assert_eq!(after.key(id).is_some(), !handed.contains(id), "chunk {id}");
    }
    assert_eq!(after.key(&ChunkId::from(blake3::hash(b"not in v2"))), None);
    // A chunk the install does not need is ignored.
    dev.handle(
        &mut engine,
        Input::checked(
            Origin::Slot(slot),
            ChunkId::from(blake3::hash(b"not in v2")),
            b"not in v2".to_vec(),
        ),
    );
    assert_eq!(engine.poll_output(), None);
    let reused = engine.progress().reused_bytes;
    assert!(reused > 0);

    // After the index, none of them is read again; the rest comes from the stream.
    dev.handle(&mut engine, Input::SlotIndexed { slot, index });
    while let Some(out) = engine.poll_output() {
        if let Output::Read { id, .. } = &out {
            assert!(!handed.contains(id), "chunk {id} read again");
        }
        dev.execute(&mut engine, out).expect("no crash");
    }
    dev.run(&mut engine, stream(&c2)).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(dev.boot.armed(), Some(Slot::B));
    assert_eq!(&dev.durable[1][..v2.len()], &v2[..]);
    let p = engine.progress();
    assert_eq!(p.reused_bytes + p.fetched_bytes, v2.len() as u64);
    assert!(p.reused_bytes >= reused);
}

#[test]
fn nothing_is_taken_while_indexing_when_the_plan_may_refuse_the_release() {
    let f = Fixture::new();
    let (v1, v2) = images();
    let mut dev = SimDevice::new(&v1, 2 * MIB as u64, 1);
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    // The stream says it holds all of v2's chunks but one: that one may turn out
    // missing, which must be found before anything is written.
    let mut holds: BTreeSet<ChunkId> = c2.iter().map(|(id, _)| *id).collect();
    let (lacking, data) = c2[0].clone();
    holds.remove(&lacking);
    let mut offer = stream_offer(sign(&m2, &f.key));
    offer.sources[0].holds = Holds::Ids(holds);
    let mut engine = dev.engine(f.config());
    engine.offer(dev.now(), offer).expect("offer");
    while engine.poll_output().is_some() {}
    assert!(engine.needed_chunks().is_empty());
    assert!(!engine.takes_while_indexing());
    // What the install waits for from the slot is still known (a driver may check
    // only those chunks): every chunk of v2, none journaled yet.
    let awaited: BTreeSet<ChunkId> = engine.awaited_chunks().ids().collect();
    assert_eq!(
        awaited,
        c2.iter().map(|(id, _)| *id).collect::<BTreeSet<_>>()
    );
    dev.handle(
        &mut engine,
        Input::checked(Origin::Slot(Slot::A), lacking, data),
    );
    assert_eq!(
        engine.poll_output(),
        None,
        "nothing written before the plan"
    );
    assert_eq!(engine.progress().written_bytes, 0);
}

#[test]
fn the_active_slot_index_can_be_the_shared_table_of_its_release() {
    let f = Fixture::new();
    let (v1, v2) = images();
    let (mut dev, m1) = device_running_v1(&f, &v1);
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    dev.stores.insert(SourceId(3), c2.into_iter().collect());
    let v1_rel = crate::VerifiedRelease::verify(&f.root, sign(&m1, &f.key), None).expect("v1");
    let mut engine = dev.engine(f.config());
    assert_eq!(
        engine.active_index_bytes(),
        0,
        "the store's index, read by id: no copy"
    );
    assert!(engine.share_active_index(&v1_rel));
    assert_eq!(engine.active_index_bytes(), 0, "shared, not copied");
    // Another release than the one the slot holds is not taken as its index.
    let v2_rel = crate::VerifiedRelease::verify(&f.root, sign(&m2, &f.key), None).expect("v2");
    assert!(!engine.share_active_index(&v2_rel));
    let source = SourceInfo::new(SourceId(3), SourceKind::Requests, SourceClass::Wan, "usb");
    engine
        .offer_verified(dev.now(), &v2_rel, vec![source], false)
        .expect("offer v2");
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    let p = engine.progress();
    assert_eq!(
        p.fetched_bytes,
        25 * 4096,
        "only the changed chunks fetched"
    );
    assert_eq!(&dev.live[0][..v2.len()], &v2[..]);
}

/// Lifecycle decision (#10): a slot switched outside Shoal, with no deployment in
/// flight, is recorded as the active slot by the engine; one a deployment explains
/// is left to the boot check.
#[test]
fn a_slot_switched_outside_shoal_is_recorded_by_the_engine() {
    let f = Fixture::new();
    let (v1, _) = images();
    let mut dev = SimDevice::new(&bytes(99, MIB), 2 * MIB as u64, 1);
    let mut engine = dev.engine(f.config());
    // Running the recorded slot: nothing to record.
    assert!(!engine.observe_running(dev.now(), Slot::A));
    assert!(engine.poll_output().is_none());
    // Switched to B by hand.
    assert!(engine.observe_running(dev.now(), Slot::B));
    match engine.poll_output() {
        Some(Output::Persist(records)) => {
            assert_eq!(records, vec![crate::Record::Active(Slot::B)]);
        }
        other => panic!("expected the active slot recorded, got {other:?}"),
    }
    assert_eq!(engine.status().active, Slot::B);

    // With an install in flight (slot B being written from A), running B is the
    // deployment's business: nothing is recorded.
    let (m1, _) = release("acme-os", "1.0", 7, DEVICE, &v1);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m1, &f.key)))
        .expect("offer");
    dev.run(&mut engine, None).expect("no crash");
    assert!(dev.store.state.deployment.is_some());
    let mut engine = dev.engine(f.config());
    assert!(!engine.observe_running(dev.now(), Slot::B));
    assert!(
        std::iter::from_fn(|| engine.poll_output()).all(
            |o| !matches!(o, Output::Persist(r) if r.contains(&crate::Record::Active(Slot::B)))
        )
    );
    assert_eq!(engine.status().active, Slot::A);
}

/// Lifecycle decision (#10): an operator's commit in a trial boot the boot check
/// has not seen records the trial and commits, without running health checks; out
/// of a trial it is refused.
#[test]
fn commit_without_a_boot_check_records_the_trial_then_commits() {
    let f = Fixture::new();
    let (v1, _) = images();
    let mut dev = SimDevice::new(&bytes(99, MIB), 2 * MIB as u64, 1);
    let (m1, c1) = release("acme-os", "1.0", 7, DEVICE, &v1);
    let mut engine = dev.engine(f.config());
    engine
        .offer(dev.now(), stream_offer(sign(&m1, &f.key)))
        .expect("offer");
    dev.run(&mut engine, stream(&c1)).expect("no crash");
    assert_eq!(
        dev.store.state.deployment.as_ref().map(|d| d.phase.clone()),
        Some(Phase::TrialArmed)
    );
    // Before the reboot there is no trial to commit.
    let mut engine = dev.engine(f.config());
    assert!(matches!(
        engine.commit_running(dev.now(), dev.boot_info()),
        Err(CommitError::NotInTrial { .. })
    ));
    dev.reboot();
    let mut engine = dev.engine(f.config());
    engine
        .commit_running(dev.now(), dev.boot_info())
        .expect("commits the unrecorded trial");
    let outs: Vec<Output> = std::iter::from_fn(|| engine.poll_output()).collect();
    assert!(
        !outs.iter().any(|o| matches!(o, Output::RunHealthChecks)),
        "{outs:?}"
    );
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Commit { slot: Slot::B })),
        "{outs:?}"
    );
    for o in outs {
        dev.execute(&mut engine, o).expect("no crash");
    }
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(dev.boot.committed(), Slot::B);
    assert_eq!(dev.store.state.floor, 7);
    assert_eq!(dev.store.state.deployment, None);
}

/// Lifecycle decision (#10): which failures are worth retrying is the engine's. The
/// driver says why it stopped reading a source; the install stops with the journal
/// kept, the error says whether a rerun can do better, and a rerun resumes.
#[test]
fn a_source_the_driver_stops_reading_fails_the_install_and_says_whether_to_retry() {
    let f = Fixture::new();
    let (v1, _) = images();
    let (m1, c1) = release("acme-os", "1.0", 7, DEVICE, &v1);
    for (fault, retry) in [
        (
            SourceFault::Unreadable("read error on /dev/sdb".into()),
            true,
        ),
        (SourceFault::Damaged("chunk 12 is corrupt".into()), false),
        (
            SourceFault::WrongBase("the running slot is not 0.9".into()),
            false,
        ),
        (
            SourceFault::Withdrawn("aborted by the server".into()),
            false,
        ),
    ] {
        let mut dev = SimDevice::new(&bytes(99, MIB), 2 * MIB as u64, 1);
        let mut engine = dev.engine(f.config());
        engine
            .offer(dev.now(), stream_offer(sign(&m1, &f.key)))
            .expect("offer");
        dev.run(&mut engine, None).expect("no crash");
        // Half the artifact arrives, then the driver stops reading it.
        for (id, data) in &c1[..c1.len() / 2] {
            let input = Input::checked(Origin::Source(SourceId(1)), *id, data.clone());
            dev.handle(&mut engine, input);
            dev.run(&mut engine, None).expect("no crash");
        }
        dev.handle(
            &mut engine,
            Input::SourceFailed {
                source: SourceId(1),
                fault: fault.clone(),
            },
        );
        dev.run(&mut engine, None).expect("no crash");
        let err = failed(&dev.events).cloned().expect("the install stopped");
        assert_eq!(
            err,
            InstallError::Source {
                id: SourceId(1),
                fault: fault.clone()
            }
        );
        assert_eq!(err.worth_retrying(), retry, "{fault:?}");
        assert!(!engine.is_installing());
        assert_eq!(dev.boot.armed(), None);
        // The journal is kept: the rerun resumes where it stopped.
        assert_eq!(
            dev.store.state.deployment.as_ref().map(|d| d.phase.clone()),
            Some(Phase::Fetching)
        );
        assert!(!dev.store.state.journaled.is_empty(), "{fault:?}");
        dev.events.clear();
        let mut engine = dev.engine(f.config());
        engine
            .offer(dev.now(), stream_offer(sign(&m1, &f.key)))
            .expect("offer");
        dev.run(&mut engine, stream(&c1)).expect("no crash");
        match dev.events.first() {
            Some(Event::Accepted { resumed_bytes, .. }) => assert!(*resumed_bytes > 0),
            other => panic!("expected the install accepted, got {other:?}"),
        }
        assert!(
            dev.events.iter().any(|e| matches!(e, Event::Armed { .. })),
            "{:?}",
            dev.events
        );
    }
}

/// One bootloader model (#10): the lifecycle runs the same on every bootloader
/// bootctl models (Shoal's scheme and Mender's, on U-Boot and GRUB semantics): a
/// trial commits; a trial whose health checks fail rolls back to the committed
/// slot; a trial whose kernel never comes up is given up by the bootloader and
/// recorded as rolled back.
#[test]
fn the_lifecycle_runs_on_every_bootloader_of_the_model() {
    use shoal_bootctl::model::Bootloader;
    use shoal_bootctl::scheme::{Flavor, MenderParts, Scheme};
    let f = Fixture::new();
    let (v1, v2) = images();
    let mender = Scheme::Mender(MenderParts {
        part_a: 2,
        part_b: 3,
    });
    let (m1, c1) = release("acme-os", "1.0", 1, DEVICE, &v1);
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    for (scheme, flavor) in [
        (Scheme::Shoal, Flavor::Uboot),
        (Scheme::Shoal, Flavor::Grub),
        (mender, Flavor::Uboot),
        (mender, Flavor::Grub),
    ] {
        let what = format!("{scheme:?} {flavor:?}");
        let mut dev = SimDevice::new(&bytes(99, MIB), 2 * MIB as u64, 1)
            .with_bootloader(Bootloader::new(scheme, flavor));
        let install = |dev: &mut SimDevice, m: &Manifest, c: &[(ChunkId, Vec<u8>)]| {
            let mut engine = dev.engine(f.config());
            engine
                .offer(dev.now(), stream_offer(sign(m, &f.key)))
                .expect("offer");
            dev.run(&mut engine, stream(c)).expect("no crash");
        };
        let boot_check = |dev: &mut SimDevice| {
            let mut engine = dev.engine(f.config());
            engine.boot(dev.now(), dev.boot_info());
            dev.run(&mut engine, None).expect("no crash");
        };
        // 1.0 into B, a trial, health checks pass: committed.
        install(&mut dev, &m1, &c1);
        assert_eq!(dev.boot.armed(), Some(Slot::B), "{what}");
        dev.reboot();
        boot_check(&mut dev);
        assert_eq!(
            (dev.boot.committed(), dev.boot.armed()),
            (Slot::B, None),
            "{what}"
        );
        assert_eq!(
            dev.store.state.last.as_ref().map(|o| o.verdict.clone()),
            Some(Verdict::Committed),
            "{what}"
        );
        // 2.0 into A, health checks fail: back to B.
        install(&mut dev, &m2, &c2);
        dev.reboot();
        assert_eq!(dev.boot.running, Slot::A, "{what}: the trial");
        dev.health = Err("check-app exited with 1".into());
        boot_check(&mut dev);
        assert_eq!(dev.boot.committed(), Slot::B, "{what}");
        dev.reboot();
        assert_eq!(dev.boot.running, Slot::B, "{what}: back on 1.0");
        boot_check(&mut dev);
        assert!(
            matches!(&dev.store.state.last, Some(o) if matches!(&o.verdict, Verdict::RolledBack { reason } if reason.contains("check-app"))),
            "{what}: {:?}",
            dev.store.state.last
        );
        // 2.0 again, its kernel hangs: the watchdog resets the board and the
        // bootloader, the trial's try used up, falls back to B.
        dev.health = Ok(());
        install(&mut dev, &m2, &c2);
        dev.reboot();
        dev.reboot();
        assert_eq!(dev.boot.running, Slot::B, "{what}: the fallback");
        boot_check(&mut dev);
        assert!(
            matches!(&dev.store.state.last, Some(o) if matches!(&o.verdict, Verdict::RolledBack { reason } if reason.contains("did not come up"))),
            "{what}: {:?}",
            dev.store.state.last
        );
        assert_eq!(
            (dev.boot.committed(), dev.boot.armed()),
            (Slot::B, None),
            "{what}"
        );
        assert_eq!(dev.store.state.active, Slot::B, "{what}");
        assert_eq!(dev.store.state.floor, 1, "{what}");
    }
}

/// #11: a device whose running slot has no index (flashed at the factory, or copied
/// outside Shoal) has it cut at idle time and persisted; the next install then
/// starts fetching at once instead of indexing first. A slot found changed drops
/// its index, which is cut again.
#[test]
fn the_active_slot_is_indexed_at_idle_time_and_the_next_install_uses_it() {
    let f = Fixture::new();
    let (v1, v2) = images();
    let mut dev = SimDevice::new(&v1, 2 * MIB as u64, 1);
    let mut engine = dev.engine(f.config());
    assert!(engine.index_idle(dev.now(), crate::testing::TEST_CHUNKING));
    dev.run(&mut engine, None).expect("no crash");
    let recorded = dev.store.indexes[0]
        .as_ref()
        .expect("the index is persisted");
    assert_eq!(recorded.chunking, crate::testing::TEST_CHUNKING);
    assert_eq!(
        recorded.chunks.len(),
        2 * MIB / 4096,
        "the whole slot was cut"
    );
    // Cut already: asked again, nothing to do, also from the store.
    assert!(!engine.index_idle(dev.now(), crate::testing::TEST_CHUNKING));
    let mut engine = dev.engine(f.config());
    assert_eq!(
        engine.active_chunking(),
        Some(crate::testing::TEST_CHUNKING)
    );
    assert!(!engine.index_idle(dev.now(), crate::testing::TEST_CHUNKING));
    assert!(engine.poll_output().is_none());

    dev.events.clear();
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    dev.stores.insert(SourceId(3), c2.into_iter().collect());
    offer_over_usb(&mut engine, dev.now(), &f, &m2, None);
    // While an install runs, idle indexing and a changed slot are not its business
    // (its reads from the slot are verified chunk by chunk).
    let other = shoal_artifact::Chunking {
        min_size: 2048,
        avg_size: 8192,
        max_size: 32768,
    };
    assert!(!engine.index_idle(dev.now(), other));
    assert!(!engine.active_slot_changed(dev.now()));
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(
        !dev.events
            .iter()
            .any(|e| matches!(e, Event::Indexing { .. })),
        "the idle index was used"
    );
    assert_eq!(engine.progress().fetched_bytes, 25 * 4096);

    // v2 armed, not booted yet: the slot found changed, the index goes; it is cut
    // again only once the deployment is settled (the running slot may change).
    let mut engine = dev.engine(f.config());
    assert!(engine.active_slot_changed(dev.now()));
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(dev.store.indexes[0], None);
    assert_eq!(engine.active_chunking(), None);
    assert!(!engine.index_idle(dev.now(), crate::testing::TEST_CHUNKING));
    dev.store.state.deployment = None;
    let mut engine = dev.engine(f.config());
    assert!(engine.index_idle(dev.now(), crate::testing::TEST_CHUNKING));
}

/// A device store whose index cannot be read: `scan` (the plan's pass) or `get`
/// (a read of the slot on the index's word) fails.
#[derive(Debug)]
struct BrokenIndex {
    inner: crate::MemIndexes,
    scan_fails: bool,
}

impl crate::IndexReader for BrokenIndex {
    fn get(
        &self,
        _slot: Slot,
        _id: &shoal_artifact::ChunkId,
    ) -> Result<Option<(u64, u32)>, crate::IndexReadError> {
        Err(crate::IndexReadError("page checksum mismatch".into()))
    }

    fn scan(
        &self,
        slot: Slot,
        from: &shoal_artifact::ChunkId,
        f: &mut dyn FnMut(&shoal_artifact::ChunkId, u64, u32) -> bool,
    ) -> Result<(), crate::IndexReadError> {
        if self.scan_fails {
            return Err(crate::IndexReadError("page checksum mismatch".into()));
        }
        self.inner.scan(slot, from, f)
    }

    fn chunking(
        &self,
        slot: Slot,
    ) -> Result<Option<shoal_artifact::Chunking>, crate::IndexReadError> {
        self.inner.chunking(slot)
    }
}

/// An install on a device whose recorded index cannot be read, in the plan's pass
/// or in a lookup before a read of the slot: it stops with that error, nothing
/// written, rather than planning as though the slot held nothing.
#[test]
fn a_store_read_error_of_the_slot_index_stops_the_install() {
    for scan_fails in [true, false] {
        let f = Fixture::new();
        let (v1, v2) = images();
        let (mut dev, _) = device_running_v1(&f, &v1);
        let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
        dev.stores.insert(SourceId(3), c2.into_iter().collect());
        let mut state = dev.store.load();
        assert!(state.active_index.is_some(), "v1's index is recorded");
        state.indexes = Some(crate::IndexStore(std::sync::Arc::new(BrokenIndex {
            inner: crate::MemIndexes::new(&dev.store.indexes),
            scan_fails,
        })));
        let mut engine = Engine::new(f.config(), state);
        offer_over_usb(&mut engine, dev.now(), &f, &m2, Some(1_800_000_000));
        dev.run(&mut engine, None).expect("no crash");
        assert_eq!(
            failed(&dev.events),
            Some(&InstallError::Io {
                op: crate::IoOp::IndexRead,
                message: "page checksum mismatch".into(),
            }),
            "scan fails: {scan_fails}"
        );
        assert_eq!(
            engine.progress().written_bytes,
            0,
            "scan fails: {scan_fails}"
        );
    }
}

/// A store's index reader that reads what is in it now (as redb does), not a
/// snapshot taken when the engine was made.
#[derive(Debug, Default)]
struct LiveIndexes(std::sync::Mutex<[Option<crate::SlotIndex>; 2]>);

impl crate::IndexReader for LiveIndexes {
    fn get(
        &self,
        slot: Slot,
        id: &shoal_artifact::ChunkId,
    ) -> Result<Option<(u64, u32)>, crate::IndexReadError> {
        crate::MemIndexes::new(&self.0.lock().expect("lock")).get(slot, id)
    }

    fn scan(
        &self,
        slot: Slot,
        from: &shoal_artifact::ChunkId,
        f: &mut dyn FnMut(&shoal_artifact::ChunkId, u64, u32) -> bool,
    ) -> Result<(), crate::IndexReadError> {
        crate::MemIndexes::new(&self.0.lock().expect("lock")).scan(slot, from, f)
    }

    fn chunking(
        &self,
        slot: Slot,
    ) -> Result<Option<shoal_artifact::Chunking>, crate::IndexReadError> {
        crate::MemIndexes::new(&self.0.lock().expect("lock")).chunking(slot)
    }
}

/// A partial index ([`Input::SlotIndexWritten`] with `partial`: only the chunks the
/// waiting install needs, checked where the driver expected them) serves that
/// install (the chunk no source holds is read from the slot on its word) but is
/// not recorded, and is dropped when the install ends: another install indexes the
/// slot again rather than miss the chunks it does not list.
#[test]
fn a_partial_index_serves_its_install_only_and_is_not_recorded() {
    let f = Fixture::new();
    let (v1, v2) = images();
    let mut dev = SimDevice::new(&v1, 2 * MIB as u64, 1);
    let live = std::sync::Arc::new(LiveIndexes::default());
    let mut state = dev.store.load();
    state.indexes = Some(crate::IndexStore(live.clone()));
    let mut engine = Engine::new(f.config(), state);
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    // The stream holds all of v2's chunks but the first (a thin artifact): nothing
    // is taken while indexing, and that chunk must be found in the slot.
    let mut holds: BTreeSet<ChunkId> = c2.iter().map(|(id, _)| *id).collect();
    let lacking = c2[0].0;
    holds.remove(&lacking);
    let mut offer = stream_offer(sign(&m2, &f.key));
    offer.sources[0].holds = Holds::Ids(holds);
    engine.offer(dev.now(), offer).expect("offer");
    let (slot, chunking, len) = index_request(&mut dev, &mut engine);
    assert!(!engine.takes_while_indexing());
    // The driver checks only the awaited chunks where v1 puts them.
    let awaited = engine.awaited_chunks();
    let live_slot = dev.live[slot_ordinal(slot)].clone();
    let whole =
        crate::testing::index_fixed(&live_slot[..live_slot.len().min(len as usize)], chunking);
    let mut seen = BTreeSet::new();
    let mut cut = whole.clone();
    cut.chunks
        .retain(|c| awaited.contains(&c.id) && seen.insert(c.id));
    assert!(cut.chunks.iter().any(|c| c.id == lacking));
    assert!(cut.chunks.len() < whole.chunks.len());
    let chunks = cut.chunks.len() as u64;
    live.0.lock().expect("lock")[slot_ordinal(slot)] = Some(cut.clone());
    dev.store.write_index(slot, cut);
    engine.handle(
        dev.now(),
        Input::SlotIndexWritten {
            slot,
            chunking,
            chunks,
            partial: true,
            sampled: false,
        },
    );
    assert_eq!(
        engine.active_chunking(),
        Some(chunking),
        "taken for this install"
    );
    let streamed: Vec<(ChunkId, Vec<u8>)> = c2.iter().filter(|c| c.0 != lacking).cloned().collect();
    dev.run(&mut engine, stream(&streamed)).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert_eq!(dev.boot.armed(), Some(Slot::B));
    assert_eq!(&dev.durable[1][..v2.len()], &v2[..], "slot B holds v2");
    // Never recorded, and gone with its install.
    assert_eq!(dev.store.load().active_index, None);
    assert_eq!(engine.active_chunking(), None);
}

/// A sampled index ([`Input::SlotIndexWritten`] with `sampled`) whose entry of a
/// repeated chunk `R` (its first position, 8 KiB in) was overwritten after the
/// check; `R` is also at 40 KiB unless `both`, and the stream carries it when
/// `streamed`; with `server`, a WAN request source that says nothing of what it
/// holds (so it may hold `R`) but holds nothing is offered too. Runs the install;
/// returns the device (events, cuts resumed).
fn install_over_a_sampled_index_missing_a_chunk(
    streamed: bool,
    both: bool,
    server: bool,
) -> SimDevice {
    let f = Fixture::new();
    let (mut v1, _) = images();
    let c = crate::testing::TEST_CHUNKING.avg_size as usize;
    // v1 repeats chunk 2 at chunk 10; v2 keeps both.
    let r = v1[2 * c..3 * c].to_vec();
    v1[10 * c..11 * c].copy_from_slice(&r);
    let mut v2 = v1.clone();
    v2[300_000..400_000].copy_from_slice(&bytes(2, 100_000));
    let mut dev = SimDevice::new(&v1, 2 * MIB as u64, 1);
    let live = std::sync::Arc::new(LiveIndexes::default());
    let mut state = dev.store.load();
    state.indexes = Some(crate::IndexStore(live.clone()));
    let mut engine = Engine::new(f.config(), state);
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    let r_id = ChunkId::of(&r);
    // A thin artifact: the stream leaves out what v1 holds in the first 64 KiB
    // (R among them, unless `streamed`).
    let kept: BTreeSet<ChunkId> = (0..16)
        .map(|i| ChunkId::of(&v1[i * c..(i + 1) * c]))
        .collect();
    let holds: BTreeSet<ChunkId> = c2
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !kept.contains(id) || (streamed && *id == r_id))
        .collect();
    let mut offer = stream_offer(sign(&m2, &f.key));
    offer.sources[0].holds = Holds::Ids(holds.clone());
    if server {
        offer.sources.push(SourceInfo::new(
            SourceId(3),
            SourceKind::Requests,
            SourceClass::Wan,
            "server",
        ));
    }
    engine.offer(dev.now(), offer).expect("offer");
    let (slot, chunking, len) = index_request(&mut dev, &mut engine);
    // The driver lists the awaited chunks where v1 puts them (first positions),
    // having read only a sample of them.
    let awaited = engine.awaited_chunks();
    assert!(awaited.contains(&r_id));
    let live_slot = dev.live[slot_ordinal(slot)].clone();
    let mut seen = BTreeSet::new();
    let mut cut =
        crate::testing::index_fixed(&live_slot[..live_slot.len().min(len as usize)], chunking);
    cut.chunks
        .retain(|c| awaited.contains(&c.id) && seen.insert(c.id));
    assert_eq!(
        cut.chunks.iter().find(|e| e.id == r_id).map(|e| e.offset),
        Some(2 * c as u64),
        "R listed at its first position"
    );
    let chunks = cut.chunks.len() as u64;
    live.0.lock().expect("lock")[slot_ordinal(slot)] = Some(cut.clone());
    dev.store.write_index(slot, cut);
    engine.handle(
        dev.now(),
        Input::SlotIndexWritten {
            slot,
            chunking,
            chunks,
            partial: true,
            sampled: true,
        },
    );
    // Then the slot changes where the sample did not look.
    let a = slot_ordinal(slot);
    dev.live[a][2 * c..3 * c].fill(0xa5);
    if both {
        dev.live[a][10 * c..11 * c].fill(0x5a);
    }
    let streamed_chunks: Vec<(ChunkId, Vec<u8>)> = c2
        .iter()
        .filter(|c| holds.contains(&c.0))
        .cloned()
        .collect();
    dev.run(&mut engine, stream(&streamed_chunks))
        .expect("no crash");
    if failed(&dev.events).is_none() {
        assert_eq!(&dev.durable[1][..v2.len()], &v2[..], "slot B holds v2");
    }
    dev
}

/// Issue 12 (session 12, mend12b): a listed chunk of a sampled index that is not
/// there, and that no source holds, is not the end of the install: the engine has
/// the slot cut by content from its start ([`Output::CutRest`] from 0), which
/// finds the chunk where the slot repeats it. (Without it: `MissingChunks`.)
#[test]
fn a_sampled_index_missing_a_chunk_no_source_holds_cuts_the_slot_by_content() {
    let dev = install_over_a_sampled_index_missing_a_chunk(false, false, false);
    assert_eq!(failed(&dev.events), None);
    assert_eq!(dev.rest_cuts, vec![0]);
    assert_eq!(dev.boot.armed(), Some(Slot::B));
}

/// The same chunk carried by the stream (an artifact built against another base,
/// v1 and v2 sharing the chunk): it comes from the stream, as a bad entry of any
/// index does, without a cut.
#[test]
fn a_sampled_index_missing_a_chunk_the_stream_carries_takes_it_from_the_stream() {
    let dev = install_over_a_sampled_index_missing_a_chunk(true, false, false);
    assert_eq!(failed(&dev.events), None);
    assert_eq!(dev.rest_cuts, Vec::<u64>::new());
    assert_eq!(dev.boot.armed(), Some(Slot::B));
}

/// A source that may hold the chunk (a server that says nothing of what it holds)
/// is asked first, as for any bad entry; when it turns out not to hold it, the
/// install is not failed as stuck while the sampled index is unproved: the slot
/// is cut by content from its start, which finds the chunk where the slot repeats
/// it. (Without it: `MissingChunks` with no cut; review12d.)
#[test]
fn a_sampled_index_missing_a_chunk_a_server_lacks_too_cuts_the_slot_by_content() {
    let dev = install_over_a_sampled_index_missing_a_chunk(false, false, true);
    assert_eq!(failed(&dev.events), None);
    assert_eq!(dev.rest_cuts, vec![0]);
    assert_eq!(dev.boot.armed(), Some(Slot::B));
}

/// Gone from the slot everywhere, and no source holds it: the cut by content runs
/// to its end and the install fails naming the missing chunk, nothing armed.
#[test]
fn a_sampled_index_missing_a_chunk_nowhere_fails_after_the_cut() {
    let dev = install_over_a_sampled_index_missing_a_chunk(false, true, false);
    match failed(&dev.events) {
        Some(InstallError::MissingChunks {
            count: 1, bytes, ..
        }) => {
            assert_eq!(*bytes, u64::from(crate::testing::TEST_CHUNKING.avg_size));
        }
        other => panic!("expected MissingChunks of one chunk, got {other:?}"),
    }
    assert_eq!(dev.rest_cuts, vec![0]);
    assert_eq!(dev.boot.armed(), None);
}

/// A cut the driver wrote to the store ([`Input::SlotIndexWritten`]) is the slot's
/// index once the engine's record says so: the engine holds no copy of it, reads it
/// by id for the next install; written but not recorded (a power cut before the
/// record), it is no index.
#[test]
fn a_cut_written_to_the_store_is_read_by_id_and_recorded_by_the_engine() {
    let f = Fixture::new();
    let (v1, v2) = images();
    let mut dev = SimDevice::new(&v1, 2 * MIB as u64, 1);
    let live = std::sync::Arc::new(LiveIndexes::default());
    let mut state = dev.store.load();
    state.indexes = Some(crate::IndexStore(live.clone()));
    let mut engine = Engine::new(f.config(), state);
    assert!(engine.index_idle(dev.now(), crate::testing::TEST_CHUNKING));
    let outputs: Vec<Output> = std::iter::from_fn(|| engine.poll_output()).collect();
    let Some(&Output::IndexSlot {
        slot,
        chunking,
        len,
    }) = outputs.last()
    else {
        panic!("an index asked for: {outputs:?}");
    };
    let live_slot = &dev.live[slot_ordinal(slot)];
    let cut =
        crate::testing::index_fixed(&live_slot[..live_slot.len().min(len as usize)], chunking);
    let chunks = cut.chunks.len() as u64;
    live.0.lock().expect("lock")[slot_ordinal(slot)] = Some(cut.clone());
    dev.store.write_index(slot, cut);
    engine.handle(
        dev.now(),
        Input::SlotIndexWritten {
            slot,
            chunking,
            chunks,
            partial: false,
            sampled: false,
        },
    );
    let record = crate::Record::SlotIndexWritten {
        slot,
        chunking,
        chunks,
    };
    assert_eq!(
        engine.poll_output(),
        Some(Output::Persist(vec![record.clone()]))
    );
    assert_eq!(engine.active_chunking(), Some(chunking));
    assert_eq!(engine.active_index_bytes(), 0, "read by id, not copied");
    // Written, not recorded: no index after a restart.
    assert_eq!(dev.store.load().active_index, None);
    dev.store.apply(&[record]);
    assert_eq!(dev.store.load().active_index, Some(chunking));

    // The next install takes the slot's chunks on the store's word.
    let (m2, c2) = release("acme-os", "2.0", 2, DEVICE, &v2);
    dev.stores.insert(SourceId(3), c2.into_iter().collect());
    offer_over_usb(&mut engine, dev.now(), &f, &m2, None);
    dev.run(&mut engine, None).expect("no crash");
    assert_eq!(failed(&dev.events), None);
    assert!(
        !dev.events
            .iter()
            .any(|e| matches!(e, Event::Indexing { .. })),
        "the written index was used"
    );
    assert_eq!(engine.progress().fetched_bytes, 25 * 4096);
}
