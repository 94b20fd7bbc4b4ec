//! The shipped U-Boot script (`integration/shoal-boot.cmd`, compiled with
//! `mkimage`) run by real U-Boot (Debian's `u-boot-qemu` build for QEMU x86_64)
//! against environments Shoal wrote. U-Boot imports the environment block from a
//! disk (`env import -c`: Shoal's single-copy layout, CRC checked by U-Boot), runs
//! the script, exports the environment back (`env export -c`) and Shoal reads it.
//! Every boot is also run through `testing::boot`, the model the crash tests rely on:
//! both must pick the same slot and leave the same Shoal variables.
//!
//! That build keeps its environment nowhere, so the script's own `saveenv` cannot
//! persist anything; the export stands in for it (what `saveenv` would write).
//!
//! Needs `qemu-system-x86_64` (`qemu-system-x86`), `u-boot-qemu` and `mkimage`
//! (`u-boot-tools`); a missing one fails the test and names the package.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use shoal_bootctl::control::Detect;
use shoal_bootctl::env::uboot::{FwEnvConfig, Location, UbootEnv};
use shoal_bootctl::env::{Env, Vars};
use shoal_bootctl::model::{Bootloader, boot_env};
use shoal_bootctl::scheme::{Flavor, Scheme};
use shoal_bootctl::testing::{Backend, CrashDisk, CrashSlots};
use shoal_bootctl::{BootControl, Slot};

const ROM: &str = "/usr/lib/u-boot/qemu-x86_64/u-boot.rom";
const ENV_OFFSET: u64 = 1 << 20;
const ENV_SIZE: u64 = 0x2000;
const SHOAL_VARS: [&str; 4] = [
    "shoal_slot",
    "shoal_try_slot",
    "shoal_tries",
    "shoal_booted",
];

fn tool(name: &str, package: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` is not installed: this test needs it. Install it with `apt-get install -y {package}`"
    );
}

struct Board {
    dir: tempfile::TempDir,
}

impl Board {
    fn new() -> Board {
        assert!(
            Path::new(ROM).is_file(),
            "{ROM} missing: apt-get install -y u-boot-qemu"
        );
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/shoal-boot.cmd");
        let scr = dir.path().join("shoal-boot.scr");
        let out = Command::new(tool("mkimage", "u-boot-tools"))
            .args(["-A", "x86", "-T", "script", "-C", "none", "-d"])
            .arg(&script)
            .arg(&scr)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mkimage: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut disk = std::fs::read(&scr).unwrap();
        assert!(disk.len() < ENV_OFFSET as usize);
        disk.resize(4 << 20, 0);
        std::fs::write(dir.path().join("disk.img"), disk).unwrap();
        Board { dir }
    }

    fn env(&self) -> UbootEnv {
        let cfg = FwEnvConfig {
            copies: vec![Location {
                path: self.dir.path().join("disk.img"),
                offset: ENV_OFFSET,
                size: ENV_SIZE,
                sector_size: None,
                sectors: None,
            }],
        };
        UbootEnv::open(&cfg, true).unwrap()
    }

    fn control(&self, running: Slot) -> BootControl {
        let disk = CrashDisk::new();
        disk.put("a", &[0; 16]);
        disk.put("b", &[0; 16]);
        BootControl::new(
            Box::new(self.env()),
            Scheme::Shoal,
            Flavor::Uboot,
            Box::new(CrashSlots::new(&disk, "a", "b")),
            Detect::Fixed(running),
        )
    }

    /// One U-Boot run of the script; returns the chosen slot.
    fn uboot_boot(&self) -> Slot {
        let sectors = ENV_SIZE / 512;
        let lba = ENV_OFFSET / 512;
        // The first characters stop autoboot (some are swallowed by it).
        let commands = format!(
            "\n\n\n\necho sync\n\
             ide reset\n\
             ide read 0x1000000 {lba:x} {sectors:x}\n\
             env import -d -c 0x1000000 {ENV_SIZE:x}\n\
             ide read 0x2000000 0 40\n\
             source 0x2000000\n\
             echo SHOAL_BOOT=${{shoal_boot_slot}}.\n\
             env delete shoal_boot_slot\n\
             env export -c -s {ENV_SIZE:x} 0x1000000\n\
             ide write 0x1000000 {lba:x} {sectors:x}\n\
             echo DONE\n\
             reset\n"
        );
        let mut child = Command::new(tool("qemu-system-x86_64", "qemu-system-x86"))
            .args([
                "-bios",
                ROM,
                "-nographic",
                "-m",
                "256",
                "-no-reboot",
                "-nic",
                "none",
            ])
            .arg("-drive")
            .arg(format!(
                "file={},if=ide,format=raw",
                self.dir.path().join("disk.img").display()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(commands.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            text.contains("\nDONE"),
            "U-Boot did not finish the commands:\n{text}"
        );
        match text.rsplit("SHOAL_BOOT=").next().and_then(|r| r.get(..2)) {
            Some("A.") => Slot::A,
            Some("B.") => Slot::B,
            other => panic!("U-Boot did not pick a slot ({other:?}):\n{text}"),
        }
    }

    fn shoal_vars(vars: &Vars) -> Vars {
        vars.iter()
            .filter(|(k, _)| SHOAL_VARS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn boot_both(&self) -> Slot {
        let before = self.env().load().unwrap();
        let disk = CrashDisk::new();
        let mut model_env = Backend::File.open(&disk);
        model_env.store(&before).unwrap();
        let model = boot_env(
            &mut *model_env,
            &Bootloader::new(Scheme::Shoal, Flavor::Uboot),
        )
        .unwrap();
        let real = self.uboot_boot();
        assert_eq!(
            real, model.slot,
            "U-Boot and the model chose differently from {before:?}"
        );
        let after = self
            .env()
            .load()
            .expect("Shoal reads the env U-Boot exported");
        assert_eq!(
            Board::shoal_vars(&after),
            Board::shoal_vars(&model_env.load().unwrap()),
            "U-Boot and the model left different variables"
        );
        real
    }
}

#[test]
fn uboot_runs_trials_counts_down_falls_back_and_commits() {
    let b = Board::new();
    let mut env = b.env();
    let mut initial = Scheme::Shoal.initial(Flavor::Uboot, Slot::A);
    initial.insert("bootdelay".into(), "2".into());
    env.store(&initial).unwrap();
    assert_eq!(b.boot_both(), Slot::A);

    b.control(Slot::A).arm(Slot::B, 2).unwrap();
    assert_eq!(b.boot_both(), Slot::B);
    assert_eq!(b.env().load().unwrap()["shoal_tries"], "1");
    assert_eq!(b.boot_both(), Slot::B);
    assert_eq!(b.boot_both(), Slot::A);
    assert!(
        b.control(Slot::A)
            .status()
            .unwrap()
            .summary
            .contains("used up its boots")
    );
    b.control(Slot::A).rollback().unwrap();

    b.control(Slot::A).arm(Slot::B, 1).unwrap();
    assert_eq!(b.boot_both(), Slot::B);
    b.control(Slot::B).commit().unwrap();
    assert_eq!(b.boot_both(), Slot::B);
    // Values the script must not count: not one digit, not exactly A/B.
    let mut v = b.env().load().unwrap();
    v.insert("shoal_try_slot".into(), "a".into());
    v.insert("shoal_tries".into(), "3".into());
    b.env().store(&v).unwrap();
    assert_eq!(b.boot_both(), Slot::B);
}
