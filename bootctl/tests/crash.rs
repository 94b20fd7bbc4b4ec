//! Power safety, proven by enumeration: every crash point (every mutating storage
//! operation, with every tear mode, keeping either the durable or the live image) of
//! every environment update and of every install / arm / boot / commit / rollback
//! sequence, for every backend and both schemes. After each crash the bootloader
//! model boots the device, and the slot it boots must hold a complete image whose
//! BLAKE3 hash is the one that slot is supposed to hold. Then the device must be
//! able to finish the interrupted operation.

use std::error::Error;

use shoal_bootctl::control::Detect;
use shoal_bootctl::env::Vars;
use shoal_bootctl::model::{Bootloader, boot_env};
use shoal_bootctl::scheme::{MenderParts, Scheme};
use shoal_bootctl::testing::{Backend, CrashDisk, CrashSlots, Image, Tear};
use shoal_bootctl::{BootControl, Slot};

type Res = Result<(), Box<dyn Error>>;

const SLOT_SIZE: usize = 16 * 1024;
const MENDER: Scheme = Scheme::Mender(MenderParts {
    part_a: 2,
    part_b: 3,
});

fn image(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
struct Case {
    backend: Backend,
    scheme: Scheme,
}

impl Case {
    fn all() -> Vec<Case> {
        let mut out = Vec::new();
        for backend in Backend::ALL {
            for scheme in [Scheme::Shoal, MENDER] {
                out.push(Case { backend, scheme });
            }
        }
        out
    }

    fn tries(&self) -> u32 {
        self.scheme.tries_max(self.backend.flavor()).min(2)
    }

    fn power_safe(&self) -> bool {
        self.backend != Backend::UbootSingle
    }
}

struct World {
    image_a: Vec<u8>,
    image_b: Vec<u8>,
}

impl World {
    fn new() -> World {
        World {
            image_a: image(1, 12 * 1024),
            image_b: image(2, 10 * 1024 + 17),
        }
    }

    /// A device running slot A (holding image A), slot B blank, env initialised.
    fn fresh(&self, case: Case) -> CrashDisk {
        let disk = CrashDisk::new();
        let mut a = self.image_a.clone();
        a.resize(SLOT_SIZE, 0);
        disk.put("slot-a", &a);
        disk.put("slot-b", &vec![0xee; SLOT_SIZE]);
        let mut env = case.backend.open(&disk);
        env.store(&case.scheme.initial(case.backend.flavor(), Slot::A))
            .unwrap();
        disk.reboot(Image::Durable)
    }

    fn control(&self, disk: &CrashDisk, case: Case, running: Slot) -> BootControl {
        BootControl::new(
            case.backend.open(disk),
            case.scheme,
            case.backend.flavor(),
            Box::new(CrashSlots::new(disk, "slot-a", "slot-b")),
            Detect::Fixed(running),
        )
    }

    fn holds(&self, disk: &CrashDisk, slot: Slot) -> bool {
        let (name, img) = match slot {
            Slot::A => ("slot-a", &self.image_a),
            Slot::B => ("slot-b", &self.image_b),
        };
        let bytes = disk.durable(name);
        bytes.len() >= img.len() && blake3::hash(&bytes[..img.len()]) == blake3::hash(img)
    }

    /// Boots the (rebooted) device once and checks the safety invariant: the booted
    /// slot holds its complete, verified image.
    fn boot_checked(&self, disk: &CrashDisk, case: Case, ctx: &str) -> Slot {
        let mut env = case.backend.open(disk);
        let b = boot_env(
            &mut *env,
            &Bootloader::new(case.scheme, case.backend.flavor()),
        )
        .unwrap_or_else(|e| panic!("{ctx}: boot failed: {e}"));
        if case.power_safe() {
            assert!(
                !b.used_default_env,
                "{ctx}: environment unreadable after crash"
            );
        }
        assert!(
            self.holds(disk, b.slot),
            "{ctx}: booted slot {} which does not hold its verified image",
            b.slot
        );
        b.slot
    }

    /// Writes image B into slot B (out of order, small sync batches), verifies it
    /// and arms it.
    fn install(&self, disk: &CrashDisk, case: Case) -> Res {
        let mut bc = self.control(disk, case, Slot::A);
        let mut w = bc.open_writer(Slot::B, self.image_b.len() as u64)?;
        w.set_sync_batch_bytes(3000);
        let chunks: Vec<(usize, &[u8])> = self
            .image_b
            .chunks(1024)
            .enumerate()
            .map(|(i, c)| (i * 1024, c))
            .collect();
        for (off, chunk) in chunks.iter().rev() {
            w.write_at(*off as u64, chunk)?;
        }
        w.verify(blake3::hash(&self.image_b).as_bytes())?;
        bc.arm(Slot::B, case.tries())?;
        Ok(())
    }
}

/// Runs `phase` from `start` crashing at every operation with every tear, and
/// calls `check` on the rebooted disk for both surviving images. Returns the number
/// of crash points run.
fn every_crash(
    start: &CrashDisk,
    phase: &dyn Fn(&CrashDisk) -> Res,
    check: &dyn Fn(&CrashDisk, &str),
) -> usize {
    let dry = start.reboot(Image::Durable);
    phase(&dry).expect("phase completes without a crash");
    let total = dry.ops();
    assert!(total > 0, "phase performs no writes");
    let mut runs = 0;
    for n in 1..=total {
        for tear in Tear::ALL {
            let disk = start.reboot(Image::Durable);
            disk.crash_at(n, tear);
            let result = phase(&disk);
            assert!(result.is_err(), "crash at op {n} was not reported");
            assert!(disk.has_crashed(), "op {n} did not crash");
            for image in Image::ALL {
                let after = disk.reboot(image);
                check(
                    &after,
                    &format!("crash at op {n}/{total} {tear:?} {image:?}"),
                );
                runs += 1;
            }
        }
    }
    runs
}

#[test]
fn every_crash_point_of_an_env_update_leaves_old_or_new() {
    let old = Vars::from([
        ("shoal_slot".into(), "A".into()),
        ("pad".into(), "x".repeat(300)),
    ]);
    let new = Vars::from([
        ("shoal_slot".into(), "B".into()),
        ("shoal_try_slot".into(), "B".into()),
    ]);
    for backend in Backend::ALL {
        for (from, to) in [(&old, &new), (&new, &old)] {
            let start = CrashDisk::new();
            // An older version first, so the two copies of redundant backends differ
            // and falling back to the wrong one is caught.
            let older = Vars::from([("shoal_slot".into(), "older".into())]);
            backend.open(&start).store(&older).unwrap();
            backend.open(&start).store(from).unwrap();
            let runs = every_crash(
                &start,
                &|disk| Ok(backend.open(disk).store(to)?),
                &|after, ctx| match backend.open(after).load() {
                    Ok(v) => assert!(&v == from || &v == to, "{backend:?} {ctx}: mixed env {v:?}"),
                    Err(e) => assert_eq!(
                        backend,
                        Backend::UbootSingle,
                        "{backend:?} {ctx}: power-safe env unreadable: {e}"
                    ),
                },
            );
            assert!(runs >= 8, "{backend:?}: only {runs} crash points");
        }
    }
}

/// A crash during an update, then a crash at every point of the next update
/// (which must first repair what the first crash left).
#[test]
fn every_crash_point_of_an_update_after_an_interrupted_update_leaves_old_or_new() {
    let v1 = Vars::from([
        ("shoal_slot".into(), "A".into()),
        ("pad".into(), "x".repeat(200)),
    ]);
    let v2 = Vars::from([("shoal_slot".into(), "B".into())]);
    let v3 = Vars::from([
        ("shoal_slot".into(), "A".into()),
        ("shoal_try_slot".into(), "B".into()),
    ]);
    for backend in Backend::ALL
        .into_iter()
        .filter(|b| *b != Backend::UbootSingle)
    {
        let start = CrashDisk::new();
        backend.open(&start).store(&v1).unwrap();
        let runs = std::cell::Cell::new(0);
        every_crash(
            &start,
            &|disk| Ok(backend.open(disk).store(&v2)?),
            &|after, _ctx| {
                let first = backend.open(after).load().expect("power-safe env readable");
                runs.set(
                    runs.get()
                        + every_crash(
                            after,
                            &|disk| Ok(backend.open(disk).store(&v3)?),
                            &|again, ctx| {
                                let v = backend
                                    .open(again)
                                    .load()
                                    .unwrap_or_else(|e| panic!("{backend:?} {ctx}: {e}"));
                                assert!(v == first || v == v3, "{backend:?} {ctx}: got {v:?}");
                            },
                        ),
                );
            },
        );
        eprintln!("{backend:?}: nested crash points checked: {}", runs.get());
    }
}

#[test]
fn every_crash_point_of_install_and_arm_boots_a_verified_slot() {
    let w = World::new();
    for case in Case::all() {
        let start = w.fresh(case);
        let runs = every_crash(&start, &|d| w.install(d, case), &|after, ctx| {
            let ctx = format!("{case:?} install {ctx}");
            let booted = w.boot_checked(after, case, &ctx);
            // The interrupted update can always be finished.
            let env_ok = case.backend.open(after).load().is_ok();
            if !env_ok {
                assert!(!case.power_safe(), "{ctx}: env lost");
                return;
            }
            match booted {
                Slot::A => {
                    w.install(after, case)
                        .unwrap_or_else(|e| panic!("{ctx}: re-install: {e}"));
                    assert_eq!(
                        w.boot_checked(after, case, &ctx),
                        Slot::B,
                        "{ctx}: trial not booted"
                    );
                }
                Slot::B => {}
            }
            w.control(after, case, Slot::B)
                .commit()
                .unwrap_or_else(|e| panic!("{ctx}: commit: {e}"));
            for _ in 0..3 {
                assert_eq!(
                    w.boot_checked(after, case, &ctx),
                    Slot::B,
                    "{ctx}: committed B not booted"
                );
            }
        });
        eprintln!("{case:?}: install/arm crash points checked: {runs}");
    }
}

/// The device after install + arm, rebooted into the trial.
fn in_trial(w: &World, case: Case) -> CrashDisk {
    let disk = w.fresh(case);
    w.install(&disk, case).unwrap();
    assert_eq!(w.boot_checked(&disk, case, "first trial boot"), Slot::B);
    disk
}

#[test]
fn every_crash_point_of_the_bootloaders_own_write_boots_a_verified_slot() {
    let w = World::new();
    for case in Case::all() {
        let armed = w.fresh(case);
        w.install(&armed, case).unwrap();
        let runs = every_crash(
            &armed,
            &|d| {
                let mut env = case.backend.open(d);
                boot_env(
                    &mut *env,
                    &Bootloader::new(case.scheme, case.backend.flavor()),
                )?;
                Ok(())
            },
            &|after, ctx| {
                let ctx = format!("{case:?} trial boot {ctx}");
                for _ in 0..3 {
                    w.boot_checked(after, case, &ctx);
                }
            },
        );
        eprintln!("{case:?}: bootloader write crash points checked: {runs}");
    }
}

#[test]
fn every_crash_point_of_commit_boots_a_verified_slot() {
    let w = World::new();
    for case in Case::all() {
        let start = in_trial(&w, case);
        let runs = every_crash(
            &start,
            &|d| Ok(w.control(d, case, Slot::B).commit().map(|_| ())?),
            &|after, ctx| {
                let ctx = format!("{case:?} commit {ctx}");
                let booted = w.boot_checked(after, case, &ctx);
                if !case.power_safe() && case.backend.open(after).load().is_err() {
                    return;
                }
                let bc = w.control(after, case, booted);
                let state = bc.state().unwrap_or_else(|e| panic!("{ctx}: {e}"));
                if booted == Slot::B && state.trial.is_some() {
                    w.control(after, case, Slot::B)
                        .commit()
                        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                }
                let settled = w.boot_checked(after, case, &ctx);
                for _ in 0..2 {
                    assert_eq!(
                        w.boot_checked(after, case, &ctx),
                        settled,
                        "{ctx}: boots flip-flop"
                    );
                }
            },
        );
        eprintln!("{case:?}: commit crash points checked: {runs}");
    }
}

#[test]
fn every_crash_point_of_rollback_boots_a_verified_slot() {
    let w = World::new();
    for case in Case::all() {
        // Rolling back a running trial, and cancelling an armed, not yet booted one.
        let running = in_trial(&w, case);
        let armed = w.fresh(case);
        w.install(&armed, case).unwrap();
        for (start, active) in [(&running, Slot::B), (&armed, Slot::A)] {
            let runs = every_crash(
                start,
                &|d| Ok(w.control(d, case, active).rollback().map(|_| ())?),
                &|after, ctx| {
                    let ctx = format!("{case:?} rollback from {active} {ctx}");
                    w.boot_checked(after, case, &ctx);
                    if !case.power_safe() && case.backend.open(after).load().is_err() {
                        return;
                    }
                    // Finishing the rollback always lands on A.
                    let bc = w.control(after, case, Slot::A);
                    if bc.state().unwrap().trial.is_some() {
                        w.control(after, case, Slot::A).rollback().unwrap();
                    }
                    for _ in 0..2 {
                        assert_eq!(w.boot_checked(after, case, &ctx), Slot::A, "{ctx}");
                    }
                },
            );
            eprintln!("{case:?}: rollback from {active} crash points checked: {runs}");
        }
    }
}

#[test]
fn exhausted_trial_falls_back_and_rolls_back_cleanly() {
    let w = World::new();
    for case in Case::all() {
        let disk = in_trial(&w, case);
        // The trial never gets committed: the bootloader uses up the tries.
        let mut boots = vec![Slot::B];
        for _ in 0..4 {
            boots.push(w.boot_checked(&disk, case, "fallback"));
        }
        let tries = case.tries() as usize;
        assert_eq!(&boots[..tries], vec![Slot::B; tries].as_slice(), "{case:?}");
        assert!(
            boots[tries..].iter().all(|&s| s == Slot::A),
            "{case:?}: {boots:?}"
        );
        let mut bc = w.control(&disk, case, Slot::A);
        let status = bc.status().unwrap();
        assert_eq!((status.active, status.next_boot), (Slot::A, Slot::A));
        if status.state.trial.is_some() {
            assert!(status.summary.contains("used up"), "{}", status.summary);
            bc.rollback().unwrap();
        }
        assert_eq!(bc.state().unwrap().trial, None);
        // And a second update goes through.
        w.install(&disk, case).unwrap();
        assert_eq!(w.boot_checked(&disk, case, "second update"), Slot::B);
    }
}
