//! `shoal slot` and `shoal env` on file-backed devices: the real binary, real files,
//! reboots simulated with bootctl's bootloader model, and cross-checks with the real
//! `fw_printenv` (`libubootenv-tool`) and `grub-editenv` (`grub-common`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use shoal_bootctl::Slot;
use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::scheme::{Flavor, Scheme};
use shoal_tests::{fails, ok, shoal};

struct Device {
    dir: tempfile::TempDir,
}

impl Device {
    /// A device with file slots, the file bootloader, the Shoal scheme, running A.
    /// `detect` is the `[slots.detect]` table body.
    fn new(detect: &str) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for slot in ["a.img", "b.img"] {
            std::fs::write(d.join(slot), vec![0; 64 * 1024]).unwrap();
        }
        std::fs::write(d.join("cmdline"), "console=ttyS0 shoal.slot=A\n").unwrap();
        let config = format!(
            r#"
[device]
type = "test-board"
data_dir = "{d}/data"
trust_root = "{d}/root.shoal"

[slots]
a = {{ path = "{d}/a.img" }}
b = {{ path = "{d}/b.img" }}

[slots.detect]
{detect}

[bootloader]
type = "file"
path = "{d}/bootenv"
"#,
            d = d.display()
        );
        std::fs::write(d.join("shoal.toml"), config).unwrap();
        let dev = Device { dir };
        ok(dev.run(&[
            "env",
            "set",
            "--file",
            &dev.path("bootenv"),
            "shoal_slot=A",
            "shoal_booted=A",
        ]));
        dev
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn run(&self, args: &[&str]) -> Output {
        shoal().args(args).output().expect("running shoal")
    }

    fn slot(&self, args: &[&str]) -> Output {
        let config = self.path("shoal.toml");
        let mut all = vec!["slot"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--config", &config]);
        self.run(&all)
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&ok(self.slot(&["status", "--json"]))).expect("status JSON")
    }

    /// Reboots: the bootloader model picks the slot (and writes the env as the boot
    /// script would); the kernel command line says which slot runs.
    fn reboot(&self) -> Slot {
        let mut env = FileEnv::open(Path::new(&self.path("bootenv")), true).unwrap();
        let booted = shoal_bootctl::model::boot_env(
            &mut env,
            &shoal_bootctl::model::Bootloader::new(Scheme::Shoal, Flavor::File),
        )
        .unwrap();
        assert!(!booted.used_default_env);
        std::fs::write(
            self.dir.path().join("cmdline"),
            format!("shoal.slot={}\n", booted.slot),
        )
        .unwrap();
        booted.slot
    }
}

const SYSTEM: &str = "from = \"system\"\ncmdline = \"CMDLINE\"\nroot_device = false";

fn system_device() -> Device {
    let dev = Device::new("from = \"bootloader\"");
    let detect = SYSTEM.replace("CMDLINE", &dev.path("cmdline"));
    let cfg = std::fs::read_to_string(dev.path("shoal.toml")).unwrap();
    std::fs::write(
        dev.path("shoal.toml"),
        cfg.replace("from = \"bootloader\"", &detect),
    )
    .unwrap();
    dev
}

#[test]
fn status_arm_reboot_commit_lifecycle() {
    let dev = system_device();
    let s = dev.status();
    assert_eq!(
        (s["active"].as_str(), s["next_boot"].as_str()),
        (Some("A"), Some("A"))
    );
    let text = ok(dev.slot(&["status"]));
    assert!(
        text.starts_with("running slot A, which is committed and boots next"),
        "{text}"
    );

    let armed: serde_json::Value =
        serde_json::from_str(&ok(dev.slot(&["arm", "B", "--tries", "2", "--json"]))).unwrap();
    assert_eq!(armed["trial"]["slot"], "B");
    assert_eq!(armed["trial"]["tries_left"], 2);
    let s = dev.status();
    assert_eq!(
        (s["active"].as_str(), s["next_boot"].as_str()),
        (Some("A"), Some("B"))
    );
    assert!(
        s["summary"]
            .as_str()
            .unwrap()
            .contains("armed for a trial (2 boots)")
    );
    // Committing before the trial slot runs is refused.
    let err = fails(dev.slot(&["commit"]), 1);
    assert!(
        err.contains("slot B is on trial but slot A is running"),
        "{err}"
    );

    assert_eq!(dev.reboot(), Slot::B);
    let s = dev.status();
    assert_eq!(s["active"], "B");
    assert_eq!(s["state"]["trial"]["tries_left"], 1);
    assert!(s["summary"].as_str().unwrap().contains("on trial"), "{s}");
    ok(dev.slot(&["commit"]));
    let s = dev.status();
    assert_eq!(
        (s["active"].as_str(), s["next_boot"].as_str()),
        (Some("B"), Some("B"))
    );
    assert_eq!(s["state"]["committed"], "B");
    assert!(s["state"]["trial"].is_null());
    for _ in 0..3 {
        assert_eq!(dev.reboot(), Slot::B);
    }
    let env = ok(dev.run(&["env", "print", "--file", &dev.path("bootenv")]));
    assert_eq!(env, "shoal_booted=B\nshoal_slot=B\n");
}

#[test]
fn failed_trial_falls_back_and_rollback_clears_it() {
    let dev = system_device();
    ok(dev.slot(&["arm", "B"]));
    assert_eq!(dev.reboot(), Slot::B);
    // Never committed: the next boot falls back.
    assert_eq!(dev.reboot(), Slot::A);
    let s = dev.status();
    assert_eq!(s["active"], "A");
    assert!(
        s["summary"].as_str().unwrap().contains("used up its boots"),
        "{s}"
    );
    ok(dev.slot(&["rollback"]));
    assert!(dev.status()["state"]["trial"].is_null());
    let err = fails(dev.slot(&["rollback"]), 1);
    assert!(err.contains("no trial to roll back"), "{err}");
}

#[test]
fn rollback_from_a_running_trial_returns_to_the_old_slot() {
    let dev = system_device();
    ok(dev.slot(&["arm", "B", "--tries", "3"]));
    assert_eq!(dev.reboot(), Slot::B);
    ok(dev.slot(&["rollback"]));
    let s = dev.status();
    assert_eq!(
        (s["active"].as_str(), s["next_boot"].as_str()),
        (Some("B"), Some("A"))
    );
    assert_eq!(dev.reboot(), Slot::A);
}

#[test]
fn usage_errors_exit_2() {
    let dev = system_device();
    let err = fails(dev.slot(&["arm", "A"]), 2);
    assert!(err.contains("slot A is running"), "{err}");
    let err = fails(dev.slot(&["arm", "B", "--tries", "10"]), 2);
    assert!(err.contains("tries must be between 1 and 9"), "{err}");
    let out = dev.run(&["slot", "arm", "C", "--config", &dev.path("shoal.toml")]);
    assert_eq!(out.status.code(), Some(2));
    let missing = dev.run(&["slot", "status", "--config", &dev.path("nope.toml")]);
    let err = fails(missing, 2);
    assert!(err.contains("nope.toml"), "{err}");
    let cfg = std::fs::read_to_string(dev.path("shoal.toml")).unwrap();
    std::fs::write(
        dev.path("bad.toml"),
        cfg.replace("type = \"file\"", "type = \"file\"\nflavour = 1"),
    )
    .unwrap();
    // (The TOML parser's message spans several lines, so no one-line check here.)
    let out = dev.run(&["slot", "status", "--config", &dev.path("bad.toml")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `flavour`"), "{err}");
    let err = fails(
        dev.run(&["env", "set", "--file", &dev.path("bootenv"), "novalue"]),
        2,
    );
    assert!(err.contains("is not NAME=VALUE"), "{err}");
}

#[test]
fn disagreeing_sources_are_refused() {
    let dev = system_device();
    std::fs::write(dev.path("cmdline"), "shoal.slot=B\n").unwrap();
    let err = fails(dev.slot(&["status"]), 1);
    assert!(err.contains("disagree"), "{err}");
    let err = fails(dev.slot(&["arm", "A"]), 1);
    assert!(err.contains("disagree"), "{err}");
    std::fs::write(dev.path("cmdline"), "quiet\n").unwrap();
    ok(dev.run(&[
        "env",
        "set",
        "--file",
        &dev.path("bootenv"),
        "shoal_booted=",
    ]));
    let err = fails(dev.slot(&["status"]), 1);
    assert!(err.contains("cannot tell which slot is running"), "{err}");
}

#[test]
fn bootloader_detection_needs_no_cmdline() {
    let dev = Device::new("from = \"bootloader\"");
    std::fs::remove_file(dev.path("cmdline")).unwrap();
    assert_eq!(dev.status()["active"], "A");
    ok(dev.slot(&["arm", "B"]));
    assert_eq!(dev.reboot(), Slot::B);
    assert_eq!(dev.status()["active"], "B");
    ok(dev.slot(&["commit"]));
}

#[test]
fn env_print_and_set_on_a_file_env() {
    let dev = Device::new("from = \"bootloader\"");
    let file = dev.path("bootenv");
    ok(dev.run(&[
        "env",
        "set",
        "--file",
        &file,
        "x=1",
        "y=a b=c",
        "shoal_booted=",
    ]));
    assert_eq!(
        ok(dev.run(&["env", "print", "--file", &file, "y", "x"])),
        "x=1\ny=a b=c\n"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(dev.run(&["env", "print", "--file", &file, "--json"]))).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"shoal_slot": "A", "x": "1", "y": "a b=c"})
    );
    let err = fails(dev.run(&["env", "print", "--file", &file, "nope"]), 1);
    assert!(err.contains("\"nope\" is not set"), "{err}");
    // Without a selector, the device configuration's [bootloader] is used.
    let config = dev.path("shoal.toml");
    assert_eq!(
        ok(dev.run(&["env", "print", "x", "--config", &config])),
        "x=1\n"
    );
}

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

fn run_tool(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn env_set_on_redundant_uboot_is_read_by_fw_printenv_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 0x20000]).unwrap();
    let cfg = dir.path().join("fw_env.config");
    std::fs::write(
        &cfg,
        format!("{0} 0x10000 0x4000\n{0} 0x14000 0x4000\n", img.display()),
    )
    .unwrap();
    let cfg_s = cfg.display().to_string();
    ok(shoal()
        .args([
            "env",
            "set",
            "--init",
            "--uboot-config",
            &cfg_s,
            "mender_boot_part=2",
            "upgrade_available=0",
        ])
        .output()
        .unwrap());
    let printed = run_tool(
        Command::new(tool("fw_printenv", "libubootenv-tool"))
            .arg("-c")
            .arg(&cfg),
    );
    assert_eq!(printed, "mender_boot_part=2\nupgrade_available=0\n");
    run_tool(
        Command::new(tool("fw_setenv", "libubootenv-tool"))
            .arg("-c")
            .arg(&cfg)
            .args(["bootcount", "1"]),
    );
    let ours = ok(shoal()
        .args(["env", "print", "--uboot-config", &cfg_s])
        .output()
        .unwrap());
    assert_eq!(
        ours,
        "bootcount=1\nmender_boot_part=2\nupgrade_available=0\n"
    );
    // A bad fw_env.config line is a usage error naming the line.
    let mut bytes = std::fs::read(&img).unwrap();
    let bad_cfg = dir.path().join("bad.config");
    std::fs::write(&bad_cfg, format!("{} 0x10000 0x4000 junk\n", img.display())).unwrap();
    let err = fails(
        shoal()
            .args([
                "env",
                "print",
                "--uboot-config",
                &bad_cfg.display().to_string(),
            ])
            .output()
            .unwrap(),
        2,
    );
    assert!(err.contains("line 1"), "{err}");
    // Both copies destroyed: refused, never read as data.
    bytes[0x10000..0x18000].fill(0xff);
    std::fs::write(&img, &bytes).unwrap();
    let err = fails(
        shoal()
            .args(["env", "print", "--uboot-config", &cfg_s])
            .output()
            .unwrap(),
        1,
    );
    assert!(err.contains("no valid copy"), "{err}");
}

#[test]
fn mender_scheme_on_uboot_arms_the_way_mender_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.img");
    std::fs::write(&img, vec![0u8; 0x20000]).unwrap();
    let fw = d.join("fw_env.config");
    std::fs::write(
        &fw,
        format!("{0} 0x10000 0x4000\n{0} 0x14000 0x4000\n", img.display()),
    )
    .unwrap();
    for slot in ["a.img", "b.img"] {
        std::fs::write(d.join(slot), vec![0; 4096]).unwrap();
    }
    std::fs::write(d.join("cmdline"), format!("root={}/a.img\n", d.display())).unwrap();
    let config = format!(
        r#"
[device]
type = "t"
data_dir = "{d}/data"
trust_root = "{d}/root.shoal"
[slots]
a = {{ path = "{d}/a.img" }}
b = {{ path = "{d}/b.img" }}
[slots.detect]
cmdline = "{d}/cmdline"
root_device = false
[bootloader]
type = "uboot"
scheme = "mender"
fw_env_config = "{fw}"
mender_part_a = 2
mender_part_b = 3
"#,
        d = d.display(),
        fw = fw.display()
    );
    let cfg = d.join("shoal.toml");
    std::fs::write(&cfg, config).unwrap();
    let fw_s = fw.display().to_string();
    let cfg_s = cfg.display().to_string();
    ok(shoal()
        .args([
            "env",
            "set",
            "--init",
            "--uboot-config",
            &fw_s,
            "mender_boot_part=2",
            "mender_boot_part_hex=2",
            "upgrade_available=0",
            "bootcount=0",
            "bootlimit=1",
        ])
        .output()
        .unwrap());
    ok(shoal()
        .args(["slot", "arm", "B", "--config", &cfg_s])
        .output()
        .unwrap());
    let printed = run_tool(
        Command::new(tool("fw_printenv", "libubootenv-tool"))
            .arg("-c")
            .arg(&fw),
    );
    assert_eq!(
        printed,
        "bootcount=0\nbootlimit=1\nmender_boot_part=3\nmender_boot_part_hex=3\nupgrade_available=1\n"
    );
    // U-Boot boots B and counts (as CONFIG_BOOTCOUNT_ENV does); the kernel runs B.
    run_tool(
        Command::new(tool("fw_setenv", "libubootenv-tool"))
            .arg("-c")
            .arg(&fw)
            .args(["bootcount", "1"]),
    );
    std::fs::write(d.join("cmdline"), format!("root={}/b.img\n", d.display())).unwrap();
    ok(shoal()
        .args(["slot", "commit", "--config", &cfg_s])
        .output()
        .unwrap());
    let printed = run_tool(
        Command::new(tool("fw_printenv", "libubootenv-tool"))
            .arg("-c")
            .arg(&fw),
    );
    assert!(
        printed.contains("mender_boot_part=3\n") && printed.contains("upgrade_available=0\n"),
        "{printed}"
    );
}

#[test]
fn env_set_on_a_grub_layout_is_read_by_grub_editenv() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    ok(shoal()
        .args(["env", "set", "--grub", &d, "shoal_slot=A", "msg=two\nlines"])
        .output()
        .unwrap());
    for n in [1, 2] {
        let env = dir.path().join(format!("shoal_grubenv{n}/env"));
        let listed = run_tool(
            Command::new(tool("grub-editenv", "grub-common"))
                .arg(&env)
                .arg("list"),
        );
        assert_eq!(listed, "msg=two\nlines\nshoal_slot=A\n");
        let lock = dir.path().join(format!("shoal_grubenv{n}/lock"));
        let listed = run_tool(
            Command::new(tool("grub-editenv", "grub-common"))
                .arg(&lock)
                .arg("list"),
        );
        assert_eq!(listed, "editing=0\n");
    }
    // A single grubenv file works like grub-editenv FILE.
    let single = dir.path().join("grubenv");
    run_tool(
        Command::new(tool("grub-editenv", "grub-common"))
            .arg(&single)
            .args(["set", "k=v"]),
    );
    let single_s = single.display().to_string();
    assert_eq!(
        ok(shoal()
            .args(["env", "print", "--grub", &single_s])
            .output()
            .unwrap()),
        "k=v\n"
    );
}
