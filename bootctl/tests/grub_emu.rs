//! The shipped GRUB fragment (`integration/grub.cfg`) run by real GRUB code
//! (`grub-emu`, Debian package `grub-emu`) against environments Shoal wrote, on a
//! FAT image (so GRUB's `save_env` really rewrites the blocks in place; `mtools` and
//! `dosfstools` move the files in and out). Every boot is also run through
//! `testing::boot`, the Rust model the crash tests rely on, and the two must agree on
//! the slot and on every variable afterwards.
//!
//! A missing tool fails the test with the package to install.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use shoal_bootctl::control::Detect;
use shoal_bootctl::env::grub::{self, GrubEnv, Paths};
use shoal_bootctl::env::{Env, Vars};
use shoal_bootctl::model::{Bootloader, boot_env};
use shoal_bootctl::scheme::{Flavor, Scheme};
use shoal_bootctl::testing::{CrashDisk, CrashSlots};
use shoal_bootctl::{BootControl, Slot};

const FILES: [&str; 4] = [
    "shoal_grubenv1/env",
    "shoal_grubenv1/lock",
    "shoal_grubenv2/env",
    "shoal_grubenv2/lock",
];

fn tool(name: &str, package: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` is not installed: this test runs the GRUB fragment in it. Install it with \
         `apt-get install -y {package}`"
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Emu {
    dir: tempfile::TempDir,
}

impl Emu {
    fn new() -> Emu {
        let modules = Path::new("/usr/lib/grub/x86_64-emu");
        tool("grub-emu", "grub-emu");
        assert!(
            modules.is_dir(),
            "GRUB emu modules missing: apt-get install -y grub-emu"
        );
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(modules, dir.path().join("x86_64-emu")).unwrap();
        let image = dir.path().join("esp.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        run(Command::new(tool("mkfs.vfat", "dosfstools"))
            .arg(&image)
            .stdout(Stdio::null()));
        for d in [
            "::/shoal",
            "::/shoal/shoal_grubenv1",
            "::/shoal/shoal_grubenv2",
        ] {
            run(Command::new(tool("mmd", "mtools"))
                .arg("-i")
                .arg(&image)
                .arg(d));
        }
        std::fs::write(
            dir.path().join("device.map"),
            format!("(hd0) {}\n", image.display()),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("env/shoal_grubenv1")).unwrap();
        std::fs::create_dir_all(dir.path().join("env/shoal_grubenv2")).unwrap();
        Emu { dir }
    }

    fn envdir(&self) -> PathBuf {
        self.dir.path().join("env")
    }

    fn env(&self) -> GrubEnv {
        GrubEnv::open(&Paths::new(&self.envdir(), "shoal_grubenv"), true).unwrap()
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("esp.img")
    }

    /// Boots GRUB once with the fragment; returns the slot it chose. The env files
    /// go into the image before and come back out after.
    fn grub_boot(&self) -> Slot {
        for f in FILES {
            let host = self.envdir().join(f);
            if host.exists() {
                run(Command::new(tool("mcopy", "mtools"))
                    .args(["-o", "-i"])
                    .arg(self.image())
                    .arg(&host)
                    .arg(format!("::/shoal/{f}")));
            }
        }
        let fragment = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/grub.cfg");
        let cfg = format!(
            "insmod fat\ninsmod echo\ninsmod test\ninsmod loadenv\n\
             set shoal_env_dir=(hd0)/shoal\n\
             source (host){}\n\
             echo \"SHOAL_BOOT=${{shoal_boot_slot}}.\"\nhalt\n",
            fragment.display()
        );
        std::fs::write(self.dir.path().join("grub.cfg"), cfg).unwrap();
        let out = Command::new(tool("grub-emu", "grub-emu"))
            .arg("-d")
            .arg(self.dir.path())
            .args(["-r", "host", "-m"])
            .arg(self.dir.path().join("device.map"))
            .env("TERM", "dumb")
            .stdin(Stdio::null())
            .output()
            .expect("run grub-emu");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let slot = match text.split("SHOAL_BOOT=").nth(1).and_then(|r| r.get(..2)) {
            Some("A.") => Slot::A,
            Some("B.") => Slot::B,
            other => panic!("grub-emu did not pick a slot ({other:?}):\n{text}"),
        };
        assert!(!text.contains("error:"), "GRUB reported an error:\n{text}");
        for f in FILES {
            run(Command::new(tool("mcopy", "mtools"))
                .args(["-o", "-i"])
                .arg(self.image())
                .arg(format!("::/shoal/{f}"))
                .arg(self.envdir().join(f)));
        }
        slot
    }

    /// Boots with GRUB and with the model from the same environment and checks
    /// they agree on the slot and on the variables left behind.
    fn boot_both(&self) -> Slot {
        let before = self.env().load().unwrap_or_default();
        let disk = CrashDisk::new();
        let mut model_env = shoal_bootctl::testing::Backend::Grub.open(&disk);
        model_env.store(&before).unwrap();
        let model = boot_env(
            &mut *model_env,
            &Bootloader::new(Scheme::Shoal, Flavor::Grub),
        )
        .unwrap();
        let real = self.grub_boot();
        assert_eq!(
            real, model.slot,
            "GRUB and the model chose differently from {before:?}"
        );
        let after = self.env().load().unwrap();
        assert_eq!(
            after,
            model_env.load().unwrap(),
            "GRUB and the model left different variables"
        );
        // GRUB leaves both copies consistent and both locks clean.
        for f in FILES {
            let bytes = std::fs::read(self.envdir().join(f)).unwrap();
            let vars = grub::decode(&bytes).unwrap();
            if f.ends_with("lock") {
                assert_eq!(vars["editing"], "0", "{f}");
            } else {
                assert_eq!(vars, after, "{f}");
            }
        }
        real
    }

    fn control(&self, running: Slot) -> BootControl {
        let disk = CrashDisk::new();
        disk.put("a", &[0; 16]);
        disk.put("b", &[0; 16]);
        BootControl::new(
            Box::new(self.env()),
            Scheme::Shoal,
            Flavor::Grub,
            Box::new(CrashSlots::new(&disk, "a", "b")),
            Detect::Fixed(running),
        )
    }
}

fn vars(pairs: &[(&str, &str)]) -> Vars {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn grub_runs_trials_counts_down_falls_back_and_commits() {
    let emu = Emu::new();
    emu.env()
        .store(&Scheme::Shoal.initial(Flavor::Grub, Slot::A))
        .unwrap();
    assert_eq!(emu.boot_both(), Slot::A);

    // Trial of B with two tries, never committed: B, B, then back to A.
    emu.control(Slot::A).arm(Slot::B, 2).unwrap();
    assert_eq!(emu.boot_both(), Slot::B);
    assert_eq!(emu.env().load().unwrap()["shoal_tries"], "1");
    assert_eq!(emu.boot_both(), Slot::B);
    assert_eq!(emu.boot_both(), Slot::A);
    let status = emu.control(Slot::A).status().unwrap();
    assert!(
        status.summary.contains("used up its boots"),
        "{}",
        status.summary
    );
    emu.control(Slot::A).rollback().unwrap();
    assert_eq!(emu.boot_both(), Slot::A);

    // Trial of B, committed from B: B from then on.
    emu.control(Slot::A).arm(Slot::B, 1).unwrap();
    assert_eq!(emu.boot_both(), Slot::B);
    emu.control(Slot::B).commit().unwrap();
    for _ in 0..2 {
        assert_eq!(emu.boot_both(), Slot::B);
    }
    // Rolling back a running trial returns to the committed slot.
    emu.control(Slot::B).arm(Slot::A, 3).unwrap();
    assert_eq!(emu.boot_both(), Slot::A);
    emu.control(Slot::A).rollback().unwrap();
    assert_eq!(emu.boot_both(), Slot::B);
}

#[test]
fn grub_restores_a_torn_copy_from_the_consistent_one() {
    let emu = Emu::new();
    let good = vars(&[("shoal_slot", "B"), ("shoal_booted", "B")]);
    emu.env().store(&good).unwrap();
    // Interrupted while writing copy 1: lock 1 dirty, copy 1 torn garbage that
    // still parses (it says A). GRUB must use copy 2 and repair copy 1.
    let lock_dirty = grub::encode(&vars(&[("editing", "1")])).unwrap();
    std::fs::write(emu.envdir().join("shoal_grubenv1/lock"), &lock_dirty).unwrap();
    let torn = grub::encode(&vars(&[("shoal_slot", "A")])).unwrap();
    std::fs::write(emu.envdir().join("shoal_grubenv1/env"), &torn).unwrap();
    assert_eq!(emu.env().load().unwrap(), good, "Shoal reads copy 2 too");
    assert_eq!(emu.boot_both(), Slot::B);

    // Interrupted while writing copy 2: lock 2 dirty; copy 1 is the truth.
    std::fs::write(emu.envdir().join("shoal_grubenv2/lock"), &lock_dirty).unwrap();
    std::fs::write(emu.envdir().join("shoal_grubenv2/env"), &torn).unwrap();
    assert_eq!(emu.boot_both(), Slot::B);
}

#[test]
fn grub_boots_a_when_there_is_no_environment() {
    let emu = Emu::new();
    // Empty (new) files: GRUB falls back to A and records it.
    for f in FILES {
        std::fs::write(emu.envdir().join(f), grub::encode(&Vars::new()).unwrap()).unwrap();
    }
    assert_eq!(emu.grub_boot(), Slot::A);
    assert_eq!(emu.env().load().unwrap(), vars(&[("shoal_booted", "A")]));
}
