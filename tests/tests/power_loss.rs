//! Power-loss proof: the real `shoal install` of a real artifact into file-backed
//! slots with the file bootloader, killed with SIGKILL at random points spread over
//! the whole install (indexing the running slot, streaming, verifying, arming).
//!
//! After every kill:
//! - the bootloader's next boot is a slot holding a complete, verified image (the
//!   factory image in A, or the new release in B once its trial is armed);
//! - the device store opens and reports progress no smaller than before the kill;
//!
//! and the run that finally completes resumes from the journal: it re-writes none of
//! the bytes the journal had recorded as written and verified (the bound is
//! less than 10%), and leaves slot B holding the release with its trial armed.

mod install_common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use install_common::{Device, hash, image, modify, ok, u};
use shoal_bootctl::Slot;
use shoal_bootctl::env::Env;
use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::scheme::{Flavor, Scheme};

const MIB: usize = 1024 * 1024;
const SIZE: usize = 32 * MIB;
const SLOT: u64 = 34 * MIB as u64;
const KILLS_MIN: usize = 50;
const KILLS_PER_ROUND: usize = 6;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Puts the device back to "factory image in A, nothing installed".
fn reset(dev: &Device, factory: &[u8]) {
    let mut a = factory.to_vec();
    a.resize(SLOT as usize, 0);
    std::fs::write(dev.path("a.img"), &a).expect("slot A");
    std::fs::write(dev.path("b.img"), vec![0u8; SLOT as usize]).expect("slot B");
    let _ = std::fs::remove_dir_all(dev.path("data"));
    let _ = std::fs::remove_file(dev.path("bootenv.2"));
    let mut env = FileEnv::open(&dev.path("bootenv"), true).expect("env");
    env.store(&Scheme::Shoal.initial(Flavor::File, Slot::A))
        .expect("provision env");
}

/// Bytes the store records as written and verified for the install in progress.
fn verified_bytes(dev: &Device) -> (String, u64) {
    let st = dev.status();
    match st["deployment"]["phase"].as_str() {
        None => ("none".into(), 0),
        Some("fetching") => ("fetching".into(), u(&st["deployment"], "journal_bytes")),
        Some(other) => (other.to_string(), SIZE as u64),
    }
}

#[test]
fn sigkill_at_random_points_never_loses_a_bootable_slot_or_verified_work() {
    let factory = image(11, SIZE);
    // The new release shares about half with the factory image: the install both
    // copies from the running slot and streams from the artifact.
    let v2 = modify(&factory, 12, 8, 2 * MIB);
    let dev = Device::new(&factory, SLOT);
    // Small journal batches: more commits for the kills to land between.
    dev.write_config("\n[install]\njournal_batch_mib = 1\n");
    let artifact = dev.build(&v2, "2.0", 2, None);
    let source = artifact.display().to_string();
    let (factory_hash, v2_hash) = (hash(&factory), hash(&v2));

    // Calibrate: how long an uninterrupted install takes here.
    reset(&dev, &factory);
    let start = Instant::now();
    let r = dev.install(&artifact);
    let full = start.elapsed();
    assert_eq!(u(&r, "written_bytes"), SIZE as u64);
    assert_eq!(dev.slot_hash(Slot::B, SIZE), v2_hash);
    let span_ms = u64::try_from(full.as_millis()).expect("fits").max(20) * 11 / 10;
    eprintln!("uninterrupted install: {full:?}; killing within 0..{span_ms} ms of each run");

    let seed = 0x5eed_0f5a_1e00_u64;
    let mut rng = Rng(seed);
    let mut kills = 0usize;
    let mut phases: std::collections::BTreeMap<String, usize> = Default::default();
    let mut mid_fetch = 0usize;
    let mut rounds = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    while kills < KILLS_MIN {
        assert!(
            Instant::now() < deadline,
            "too slow: {kills} kills so far (seed {seed:#x})"
        );
        rounds += 1;
        reset(&dev, &factory);
        let mut verified_before = 0u64;
        let mut killed_this_round = 0;
        loop {
            let mut child = dev
                .cmd(&["install", "--json", &source])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn shoal install");
            let last = killed_this_round >= KILLS_PER_ROUND;
            if !last {
                std::thread::sleep(Duration::from_millis(rng.next() % span_ms));
            }
            let running = child.try_wait().expect("try_wait").is_none();
            if !last && running {
                child.kill().expect("SIGKILL");
                let status = child.wait().expect("wait");
                if std::os::unix::process::ExitStatusExt::signal(&status) != Some(9) {
                    // It finished between the check and the kill: a completed run.
                    assert!(
                        status.success(),
                        "round {rounds}: install failed: {status:?}"
                    );
                    assert_eq!(
                        dev.slot_hash(Slot::B, SIZE),
                        v2_hash,
                        "round {rounds}: slot B complete"
                    );
                    assert_eq!(
                        dev.boot_state().next_boot(),
                        Slot::B,
                        "round {rounds}: trial armed"
                    );
                    break;
                }
                kills += 1;
                killed_this_round += 1;

                // Safety: the next boot runs a complete, verified image.
                let next = dev.boot_state().next_boot();
                match next {
                    Slot::A => assert_eq!(
                        dev.slot_hash(Slot::A, SIZE),
                        factory_hash,
                        "kill {kills}: A damaged (seed {seed:#x})"
                    ),
                    Slot::B => assert_eq!(
                        dev.slot_hash(Slot::B, SIZE),
                        v2_hash,
                        "kill {kills}: B armed but not complete (seed {seed:#x})"
                    ),
                }
                // The store is readable and progress never goes backwards.
                let (phase, verified) = verified_bytes(&dev);
                assert!(
                    verified >= verified_before,
                    "kill {kills}: verified bytes went from {verified_before} to {verified} (seed {seed:#x})"
                );
                if phase == "fetching" && verified > 0 && verified < SIZE as u64 {
                    mid_fetch += 1;
                }
                *phases.entry(phase).or_default() += 1;
                verified_before = verified;
                continue;
            }
            // This run completes (or already has).
            let out = child.wait_with_output().expect("wait");
            let r = install_common::json(&ok(out));
            let resumed = u(&r, "resumed_bytes");
            let written = u(&r, "written_bytes");
            // Nothing recorded as verified is written again.
            let rewritten = verified_before.saturating_sub(resumed);
            assert!(
                rewritten * 10 < verified_before.max(1),
                "round {rounds}: re-wrote {rewritten} of {verified_before} verified bytes (seed {seed:#x})"
            );
            assert_eq!(
                rewritten, 0,
                "round {rounds}: the journal is honoured exactly"
            );
            assert_eq!(resumed + written, SIZE as u64, "round {rounds}: {r}");
            assert_eq!(
                dev.slot_hash(Slot::B, SIZE),
                v2_hash,
                "round {rounds}: slot B complete"
            );
            let state = dev.boot_state();
            assert_eq!(state.next_boot(), Slot::B, "round {rounds}: trial armed");
            break;
        }
    }
    eprintln!(
        "{kills} kills in {rounds} rounds; phase at the kill: {phases:?}; {mid_fetch} mid-fetch"
    );
    assert!(kills >= KILLS_MIN);
    assert!(
        mid_fetch >= 5,
        "kills spread over the streaming phase: {phases:?}"
    );
    assert!(phases.len() >= 2, "kills in several phases: {phases:?}");
}
