//! Interop with the real tools, both directions: `fw_printenv`/`fw_setenv`
//! (Debian package `libubootenv-tool`), `mkenvimage` (`u-boot-tools`) and
//! `grub-editenv` (`grub-common`). What Shoal writes the tool reads; what the tool
//! writes Shoal reads; for single and redundant U-Boot environments, at offsets in
//! a disk image, and for GRUB blocks and the lock-file layout.
//!
//! A missing tool fails the test with the package to install: these tests never
//! pass without having run.

use std::path::{Path, PathBuf};
use std::process::Command;

use shoal_bootctl::env::grub::{self, GrubEnv, Paths};
use shoal_bootctl::env::uboot::{self, FwEnvConfig, Layout, UbootEnv};
use shoal_bootctl::env::{Env, Vars};

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
        "`{name}` is not installed: this interop test needs it. Install it with \
         `apt-get install -y {package}` (CI installs it in .ci/run)"
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("tool output is utf-8")
}

fn vars(pairs: &[(&str, &str)]) -> Vars {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `fw_printenv` output (`name=value` per line, values without newlines) as vars.
fn printenv(config: &Path) -> Vars {
    let out = run(Command::new(tool("fw_printenv", "libubootenv-tool"))
        .arg("-c")
        .arg(config));
    out.lines()
        .map(|l| {
            let (k, v) = l.split_once('=').expect("name=value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// `fw_setenv`; an empty value deletes the variable.
fn setenv(config: &Path, name: &str, value: &str) {
    let mut cmd = Command::new(tool("fw_setenv", "libubootenv-tool"));
    cmd.arg("-c").arg(config).arg(name);
    if !value.is_empty() {
        cmd.arg(value);
    }
    run(&mut cmd);
}

struct Disk {
    _dir: tempfile::TempDir,
    image: PathBuf,
    config: PathBuf,
}

const SIZE: u64 = 0x4000;

/// A 64 KiB disk image with the environment at 0x4000 (and 0x8000 if redundant).
fn disk(redundant: bool) -> Disk {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0x5a; 0x10000]).unwrap();
    let config = dir.path().join("fw_env.config");
    let mut text = format!("# test\n{} 0x4000 {SIZE:#x}\n", image.display());
    if redundant {
        text.push_str(&format!("{} 0x8000 {SIZE:#x}\n", image.display()));
    }
    std::fs::write(&config, text).unwrap();
    Disk {
        _dir: dir,
        image,
        config,
    }
}

fn shoal_env(d: &Disk) -> UbootEnv {
    UbootEnv::open(&FwEnvConfig::load(&d.config).unwrap(), true).unwrap()
}

#[test]
fn mkenvimage_output_is_byte_identical_to_shoal_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("env.txt");
    // Sorted, as Shoal writes them; values with spaces, '=' and punctuation.
    let v = vars(&[
        ("bootargs", "console=ttyS0,115200 root=/dev/mmcblk0p2 rw"),
        ("bootcmd", "run shoal_boot; echo fail"),
        ("shoal_slot", "A"),
    ]);
    let text: String = v.iter().map(|(k, val)| format!("{k}={val}\n")).collect();
    std::fs::write(&input, text).unwrap();
    for (redundant, layout, flag) in [
        (false, Layout::Single, None),
        (true, Layout::Redundant, Some(1)),
    ] {
        let out = dir.path().join(format!("env-{redundant}.bin"));
        let mut cmd = Command::new(tool("mkenvimage", "u-boot-tools"));
        cmd.args(["-s", "0x2000", "-p", "0", "-o"]).arg(&out);
        if redundant {
            cmd.arg("-r");
        }
        run(cmd.arg(&input));
        let theirs = std::fs::read(&out).unwrap();
        let ours = uboot::encode(&v, 0x2000, flag).unwrap();
        assert_eq!(theirs, ours, "redundant={redundant}");
        assert_eq!(uboot::decode(&theirs, 0x2000, layout).unwrap().vars, v);
        // And with mkenvimage's default 0xff padding Shoal still decodes it.
        let out_ff = dir.path().join("ff.bin");
        let mut cmd = Command::new(tool("mkenvimage", "u-boot-tools"));
        cmd.args(["-s", "0x2000", "-o"]).arg(&out_ff);
        if redundant {
            cmd.arg("-r");
        }
        run(cmd.arg(&input));
        let ff = std::fs::read(&out_ff).unwrap();
        assert_eq!(ff[ff.len() - 1], 0xff);
        assert_eq!(
            uboot::decode(&ff, 0x2000, layout).unwrap(),
            uboot::Copy {
                flag,
                vars: v.clone()
            }
        );
    }
}

#[test]
fn single_env_shoal_writes_fw_printenv_reads_and_back() {
    let d = disk(false);
    let mut env = shoal_env(&d);
    let v = vars(&[
        ("bootdelay", "2"),
        ("shoal_slot", "A"),
        ("shoal_try_slot", "B"),
        ("shoal_tries", "3"),
    ]);
    env.store(&v).unwrap();
    assert_eq!(printenv(&d.config), v);
    // Bytes outside the environment region are untouched.
    let img = std::fs::read(&d.image).unwrap();
    assert!(
        img[..0x4000]
            .iter()
            .chain(&img[0x8000..])
            .all(|&b| b == 0x5a)
    );

    setenv(&d.config, "shoal_slot", "B");
    setenv(&d.config, "shoal_try_slot", "");
    let mut want = v.clone();
    want.insert("shoal_slot".into(), "B".into());
    want.remove("shoal_try_slot");
    assert_eq!(env.load().unwrap(), want);
}

#[test]
fn redundant_env_alternating_writers_always_see_the_newest() {
    let d = disk(true);
    let mut env = shoal_env(&d);
    let mut want = vars(&[("shoal_slot", "A")]);
    env.store(&want).unwrap();
    assert_eq!(printenv(&d.config), want);
    // Many rounds: each writer's update is seen by the other, across both copies
    // and across the flag byte wrapping from 255 to 0.
    for round in 0..560u32 {
        if round % 2 == 0 {
            want.insert("counter".into(), round.to_string());
            env.store(&want).unwrap();
            if round % 37 == 0 {
                assert_eq!(
                    printenv(&d.config),
                    want,
                    "round {round}: fw_printenv after shoal"
                );
            }
        } else {
            let value = format!("tool-{round}");
            if round % 37 == 1 || round > 500 {
                setenv(&d.config, "counter", &value);
                want.insert("counter".into(), value);
                assert_eq!(
                    env.load().unwrap(),
                    want,
                    "round {round}: shoal after fw_setenv"
                );
            }
        }
    }
    let copies = env.read_copies().unwrap();
    let flags: Vec<u8> = copies
        .iter()
        .map(|c| c.as_ref().unwrap().flag.unwrap())
        .collect();
    assert!(
        flags.iter().any(|&f| f < 100),
        "flags never wrapped: {flags:?}"
    );
}

#[test]
fn redundant_env_with_one_bad_copy_uses_the_other_in_both_tools() {
    let d = disk(true);
    let mut env = shoal_env(&d);
    let v1 = vars(&[("shoal_slot", "A")]);
    let v2 = vars(&[("shoal_slot", "B")]);
    env.store(&v1).unwrap();
    env.store(&v2).unwrap();
    // Damage the newest copy (copy 2, at 0x8000): both fall back to copy 1.
    let mut img = std::fs::read(&d.image).unwrap();
    img[0x8000 + 10] ^= 0xff;
    std::fs::write(&d.image, &img).unwrap();
    assert_eq!(env.load().unwrap(), v1);
    assert_eq!(printenv(&d.config), v1);
}

#[test]
fn redundant_env_made_by_mkenvimage_is_read_and_updated() {
    let d = disk(true);
    let dir = d.image.parent().unwrap().to_path_buf();
    let input = dir.join("in.txt");
    std::fs::write(&input, "mender_boot_part=2\nmender_boot_part_hex=2\nupgrade_available=0\nbootcount=0\nbootlimit=1\n").unwrap();
    let bin = dir.join("env.bin");
    run(Command::new(tool("mkenvimage", "u-boot-tools"))
        .args(["-r", "-s", "0x4000", "-o"])
        .arg(&bin)
        .arg(&input));
    let block = std::fs::read(&bin).unwrap();
    let mut img = std::fs::read(&d.image).unwrap();
    img[0x4000..0x8000].copy_from_slice(&block);
    img[0x8000..0xc000].copy_from_slice(&block);
    std::fs::write(&d.image, &img).unwrap();
    let mut env = shoal_env(&d);
    let mut v = env.load().unwrap();
    assert_eq!(v["mender_boot_part"], "2");
    v.insert("upgrade_available".into(), "1".into());
    env.store(&v).unwrap();
    assert_eq!(printenv(&d.config), v);
}

fn editenv(file: &Path, args: &[&str]) -> String {
    run(Command::new(tool("grub-editenv", "grub-common"))
        .arg(file)
        .args(args))
}

#[test]
fn grub_blocks_are_byte_identical_to_grub_editenv() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("grubenv");
    editenv(&f, &["create"]);
    assert_eq!(
        std::fs::read(&f).unwrap(),
        grub::encode(&Vars::new()).unwrap()
    );
    editenv(&f, &["set", "a=back\\slash", "b=two\nlines", "c=", "d=x=y"]);
    let v = vars(&[
        ("a", "back\\slash"),
        ("b", "two\nlines"),
        ("c", ""),
        ("d", "x=y"),
    ]);
    let theirs = std::fs::read(&f).unwrap();
    assert_eq!(theirs, grub::encode(&v).unwrap());
    assert_eq!(grub::decode(&theirs).unwrap(), v);

    // Shoal writes, grub-editenv lists.
    let ours = dir.path().join("ours");
    let v2 = vars(&[
        ("shoal_slot", "B"),
        ("shoal_try_slot", "A"),
        ("shoal_tries", "2"),
    ]);
    std::fs::write(&ours, grub::encode(&v2).unwrap()).unwrap();
    assert_eq!(
        editenv(&ours, &["list"]),
        "shoal_slot=B\nshoal_tries=2\nshoal_try_slot=A\n"
    );
    editenv(&ours, &["unset", "shoal_try_slot"]);
    let back = grub::decode(&std::fs::read(&ours).unwrap()).unwrap();
    assert_eq!(back, vars(&[("shoal_slot", "B"), ("shoal_tries", "2")]));
}

/// Mender's provisioning (`make-env-and-lock-files`): blank grub-editenv blocks with
/// the variables written over the padding, and `lock.sha256sum` next to each lock.
fn mender_layout(dir: &Path) -> Paths {
    let paths = Paths::new(dir, "mender_grubenv");
    for i in 0..2 {
        std::fs::create_dir_all(paths.env[i].parent().unwrap()).unwrap();
        editenv(&paths.env[i], &["create"]);
        editenv(
            &paths.env[i],
            &[
                "set",
                "bootcount=0",
                "mender_boot_part=2",
                "upgrade_available=0",
            ],
        );
        editenv(&paths.lock[i], &["create"]);
        editenv(&paths.lock[i], &["set", "editing=0"]);
    }
    paths
}

#[test]
fn grub_env_in_mender_layout_round_trips_with_grub_editenv() {
    let dir = tempfile::tempdir().unwrap();
    let paths = mender_layout(dir.path());
    let locks_before: Vec<Vec<u8>> = paths
        .lock
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let mut env = GrubEnv::open(&paths, true).unwrap();
    let mut v = env.load().unwrap();
    assert_eq!(
        v,
        vars(&[
            ("bootcount", "0"),
            ("mender_boot_part", "2"),
            ("upgrade_available", "0")
        ])
    );
    v.insert("mender_boot_part".into(), "3".into());
    v.insert("upgrade_available".into(), "1".into());
    env.store(&v).unwrap();
    for (i, lock_before) in locks_before.iter().enumerate() {
        assert_eq!(
            editenv(&paths.env[i], &["list"]),
            "bootcount=0\nmender_boot_part=3\nupgrade_available=1\n",
            "copy {i}"
        );
        // The lock files end byte-identical (editing=0), so Mender's
        // lock.sha256sum checks keep passing.
        assert_eq!(
            &std::fs::read(&paths.lock[i]).unwrap(),
            lock_before,
            "lock {i}"
        );
    }
    // grub-editenv (as Mender's fw_setenv does) updates copy 2 then copy 1: Shoal
    // reads it.
    for i in [1, 0] {
        editenv(&paths.env[i], &["set", "bootcount=1"]);
    }
    assert_eq!(env.load().unwrap()["bootcount"], "1");
    // A dirty lock 1 (GRUB was writing copy 1) makes both GRUB and Shoal use copy 2.
    editenv(&paths.lock[0], &["set", "editing=1"]);
    editenv(&paths.env[0], &["set", "bootcount=9"]);
    assert_eq!(env.load().unwrap()["bootcount"], "1");
    // The next store repairs copy 1 and clears the lock.
    env.store(&v).unwrap();
    assert_eq!(editenv(&paths.lock[0], &["list"]), "editing=0\n");
    assert_eq!(
        grub::decode(&std::fs::read(&paths.env[0]).unwrap()).unwrap(),
        v
    );
}
