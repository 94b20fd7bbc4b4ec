//! Regression tests for issue 9 ("Hardening"): what an adversarial review of the
//! release binary found, and the error contract (one line on stderr, the right exit
//! code), through the real binary on file-backed devices.

mod install_common;

use std::path::Path;

use install_common::{Device, image, ok};
use shoal_bootctl::Slot;
use shoal_tests::fails;

const MIB: usize = 1024 * 1024;
const SIZE: usize = 2 * MIB;
const SLOT: u64 = 3 * MIB as u64;

/// A ustar header block for `path` of type `kind` with `size` data bytes.
fn ustar_header(path: &str, kind: u8, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..path.len()].copy_from_slice(path.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Appends a member after the last one (as `tarfile.open(.., 'a')` does): the end
/// blocks are replaced by the member, then written again.
fn append_member(artifact: &Path, path: &str, kind: u8, data: &[u8]) {
    let mut bytes = std::fs::read(artifact).expect("artifact");
    let end = bytes.len() - 1024;
    assert!(
        bytes[end..].iter().all(|&b| b == 0),
        "ends with the end blocks"
    );
    bytes.truncate(end);
    bytes.extend_from_slice(&ustar_header(path, kind, data.len() as u64));
    bytes.extend_from_slice(data);
    bytes.resize(bytes.len().next_multiple_of(512), 0);
    bytes.extend_from_slice(&[0u8; 1024]);
    std::fs::write(artifact, bytes).expect("write artifact");
}

fn no_trial_armed(dev: &Device) {
    let state = dev.boot_state();
    assert_eq!(state.trial, None, "no trial armed: {state:?}");
    assert_eq!(state.committed, Slot::A);
}

/// Item 1: slot B configured as a symlink to slot A's file. The install wrote the
/// new image over the running slot A and armed a trial.
#[test]
fn a_slot_symlinked_to_the_running_slot_is_refused_before_anything_is_written() {
    let factory = image(1, SIZE);
    let dev = Device::new(&factory, SLOT);
    let v1 = dev.build(&image(2, SIZE), "1.0", 1, None);
    let link = dev.path("by-partlabel-rootfs-b");
    std::os::unix::fs::symlink(dev.path("a.img"), &link).expect("symlink");
    dev.write_config_with_b(&link, None, "");
    let before = std::fs::read(dev.path("a.img")).expect("slot A");
    let line = fails(dev.run(&["install", &v1.display().to_string()]), 2);
    assert_eq!(
        line,
        format!(
            "shoal: [slots]/[bootloader]: slots A and B overlap: {a} and {link} (= {a}) are the same storage",
            a = dev.path("a.img").display(),
            link = link.display()
        )
    );
    assert_eq!(std::fs::read(dev.path("a.img")).expect("slot A"), before);
    no_trial_armed(&dev);
}

/// Item 2: one extra tar member after the last pack. `install` exited 1 ("unexpected
/// tar member") with the trial already armed.
#[test]
fn an_extra_member_after_the_last_pack_fails_the_install_without_arming() {
    let dev = Device::new(&image(1, SIZE), SLOT);
    let v1 = dev.build(&image(2, SIZE), "1.0", 1, None);
    append_member(&v1, "evil", b'0', b"hello");
    let out = dev.run(&["install", &v1.display().to_string()]);
    no_trial_armed(&dev);
    let line = fails(out, 1);
    assert_eq!(
        line,
        format!(
            "shoal: installing {}: unexpected tar member \"evil\"",
            v1.display()
        )
    );
    no_trial_armed(&dev);
    let status = dev.status();
    assert_ne!(status["deployment"]["phase"], "trial-armed", "{status}");
    let _ = ok;
}

/// Keys and roots in a directory: `release.pem` (release key), `root.pem` (root
/// key), `good.shoalroot` (signed by the root key), `unsigned.shoalroot` (no
/// signature, as `root init` without `--sign` writes) and `release-signed.shoalroot`
/// (signed only by the release key).
fn roots(dir: &Path) {
    let run = |args: &[&str]| ok(shoal_tests::run_in(dir, args));
    run(&["key", "generate", "--out", "release.pem"]);
    run(&["key", "generate", "--out", "root.pem"]);
    let init = |out: &str, sign: &[&str]| {
        let mut args = vec![
            "root",
            "init",
            "--root-key",
            "root.pem.pub",
            "--release-key",
            "release.pem.pub",
            "--out",
            out,
        ];
        args.extend_from_slice(sign);
        run(&args);
    };
    init("good.shoalroot", &["--sign", "root.pem"]);
    init("unsigned.shoalroot", &[]);
    init("release-signed.shoalroot", &["--sign", "release.pem"]);
    std::fs::write(dir.join("img"), image(7, 300_000)).expect("image");
    run(&[
        "artifact",
        "build",
        "--image",
        "img",
        "--name",
        "acme-os",
        "--version",
        "1.0",
        "--device-type",
        "board",
        "--security-counter",
        "1",
        "--key",
        "release.pem",
        "--out",
        "a.shoal",
    ]);
}

/// Item 3: `artifact verify`, `artifact extract` and `store add` accepted a root
/// whose self-signatures are incomplete (or signed only by a release key), which
/// a device refuses.
#[test]
fn host_tools_verify_the_trust_root_the_way_the_device_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    roots(d);
    let run = |args: &[&str]| shoal_tests::run_in(d, args);
    for (root, found) in [
        (
            "unsigned.shoalroot",
            "0 invalid, 0 by keys the root role does not list",
        ),
        (
            "release-signed.shoalroot",
            "0 invalid, 1 by keys the root role does not list",
        ),
    ] {
        let want = format!(
            "shoal: trust root {root} is not validly self-signed: root role needs 1 valid signature(s) from its keys, found 0 ({found})"
        );
        for args in [
            vec!["artifact", "verify", "--root", root, "a.shoal"],
            vec![
                "artifact", "extract", "--root", root, "a.shoal", "--out", "x.img",
            ],
            vec!["store", "add", "--root", root, "store", "a.shoal"],
            vec!["artifact", "diff", "--root", root, "a.shoal", "a.shoal"],
        ] {
            assert_eq!(fails(run(&args), 2), want, "{args:?}");
        }
    }
    assert!(!d.join("x.img").exists() && !d.join("store").exists());
    ok(run(&[
        "artifact",
        "verify",
        "--root",
        "good.shoalroot",
        "a.shoal",
    ]));
    // A PEM key given as the root says so, not a CBOR decoder's debug text.
    assert_eq!(
        fails(
            run(&["artifact", "verify", "--root", "root.pem", "a.shoal"]),
            2
        ),
        "shoal: trust root root.pem: this is a PEM file (a key?), not a signed trust root such as `shoal root init` writes"
    );
}

/// Item 7: `root rotate` of a root at version u64::MAX wrote version 0, and
/// `root init --version 0` was accepted.
#[test]
fn root_versions_start_at_one_and_never_wrap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    roots(d);
    let run = |args: &[&str]| shoal_tests::run_in(d, args);
    let keys = [
        "--root-key",
        "root.pem.pub",
        "--release-key",
        "release.pem.pub",
    ];
    let init = |version: &str, out: &str| {
        let mut args = vec![
            "root",
            "init",
            "--version",
            version,
            "--sign",
            "root.pem",
            "--out",
            out,
        ];
        args.extend_from_slice(&keys);
        run(&args)
    };
    assert_eq!(
        fails(init("0", "v0.shoalroot"), 2),
        "shoal: invalid value '0' for '--version <VERSION>': 0 is not in 1..18446744073709551615 (see --help)"
    );
    assert!(!d.join("v0.shoalroot").exists());
    ok(init(&u64::MAX.to_string(), "max.shoalroot"));
    let mut rotate = vec![
        "root",
        "rotate",
        "--current",
        "max.shoalroot",
        "--sign",
        "root.pem",
        "--out",
        "next.shoalroot",
    ];
    rotate.extend_from_slice(&keys);
    assert_eq!(
        fails(run(&rotate), 1),
        "shoal: the current root has version 18446744073709551615, the last possible one; it cannot be rotated"
    );
    assert!(!d.join("next.shoalroot").exists());
}

/// Item 6: an error with stderr a closed pipe exited 101 (a panic in `eprintln!`);
/// data to a closed stdout too. Neither may panic.
#[test]
fn a_closed_stdout_or_stderr_is_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    roots(d);
    let closed = || {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        writer
    };
    // An error path, stderr closed.
    let out = shoal_tests::shoal()
        .current_dir(d)
        .args(["install", "--config", "nope.toml", "a.shoal"])
        .stderr(closed())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = shoal_tests::shoal()
        .current_dir(d)
        .args([
            "artifact",
            "verify",
            "--root",
            "unsigned.shoalroot",
            "a.shoal",
        ])
        .stderr(closed())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    // Data and help to a closed stdout, information to a closed stderr.
    for args in [
        vec!["key", "id", "release.pem"],
        vec!["root", "inspect", "good.shoalroot"],
        vec!["artifact", "inspect", "a.shoal"],
        vec!["--help"],
    ] {
        let out = shoal_tests::shoal()
            .current_dir(d)
            .args(&args)
            .stdout(closed())
            .stderr(closed())
            .output()
            .expect("run");
        assert_ne!(out.status.code(), Some(101), "{args:?} panicked");
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "{args:?}: {:?}",
            out.status
        );
    }
}

/// `artifact` with its manifest replaced by `edit(manifest)`, its signatures no
/// longer valid (an attacker needs no key to hand someone a file to inspect).
fn unsigned_with(artifact: &Path, out: &Path, edit: impl FnOnce(&mut shoal_artifact::Manifest)) {
    let bytes = std::fs::read(artifact).expect("artifact");
    let size = usize::from_str_radix(
        std::str::from_utf8(&bytes[124..135]).expect("octal size"),
        8,
    )
    .expect("size");
    let member_end = 512 + size.next_multiple_of(512);
    let envelope = shoal_signing::Envelope::from_bytes(&bytes[512..512 + size]).expect("envelope");
    let mut manifest = shoal_artifact::Manifest::from_cbor(&envelope.signed).expect("manifest");
    edit(&mut manifest);
    // The original signatures stay (they no longer verify; `inspect` does not check).
    let mut forged = shoal_signing::Envelope::new(manifest.to_cbor());
    forged.signatures = envelope.signatures;
    let forged = forged.to_bytes();
    let mut new = Vec::new();
    shoal_artifact::ustar::write_member(&mut new, "manifest.envelope", &forged).expect("write");
    new.extend_from_slice(&bytes[member_end..]);
    std::fs::write(out, new).expect("write");
}

/// Item 5: manifest strings were printed raw: `artifact inspect` printed terminal
/// escapes even from an unsigned artifact. New manifests with control characters
/// are refused, and what is printed is escaped.
#[test]
fn terminal_escapes_in_manifests_are_refused_and_never_printed_raw() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    roots(d);
    let run = |args: &[&str]| shoal_tests::run_in(d, args);
    let esc = "acme\u{1b}]0;pwned\u{7}\u{1b}[31m";
    unsigned_with(&d.join("a.shoal"), &d.join("evil.shoal"), |m| {
        m.name = esc.into();
    });
    let out = run(&["artifact", "inspect", "evil.shoal"]);
    assert!(!out.stdout.contains(&0x1b) && !out.stderr.contains(&0x1b));
    assert_eq!(
        fails(out, 1),
        "shoal: reading evil.shoal: bad manifest: manifest field name holds a control character: \"acme\\u{1b}]0;pwned\\u{7}\\u{1b}[31m\""
    );
    let out = run(&[
        "artifact",
        "build",
        "--image",
        "img",
        "--name",
        esc,
        "--version",
        "1.0",
        "--device-type",
        "board",
        "--security-counter",
        "1",
        "--key",
        "release.pem",
        "--out",
        "new.shoal",
    ]);
    assert!(!out.stderr.contains(&0x1b));
    assert_eq!(
        fails(out, 1),
        "shoal: building from img: invalid release: manifest field name holds a control character: \"acme\\u{1b}]0;pwned\\u{7}\\u{1b}[31m\""
    );
    assert!(!d.join("new.shoal").exists());
}

/// Throwaway keys of other kinds (`openssl genpkey -algorithm RSA|EC`).
const RSA_PKCS8: &str = "-----BEGIN PRIVATE KEY-----\nMIICeAIBADANBgkqhkiG9w0BAQEFAASCAmIwggJeAgEAAoGBANA1u87zPqe0x+IE\nXGiF/8OCGMmmbwAGGas/lfvXHeEHLTwd5NcBb6dwPjtkIJU+Z4TBwk3zOYMoX1+x\ntexqFb+nexPXgseahOZNDilAd9nxrTdNV5ZyMZZD/JZUK6KDuaMGpa9r8alBZp9p\n4KTdDRjWMCkVBgpS0UwV/8ou0OvFAgMBAAECgYEAiKOK0gCeEK86MeCMyGeP9r0t\nCUD5PXnDZLgA9NoymJf+HqK7qEIgBTFLFeza2Tav9ta1bjR9fM6E8KcObc0c4Y+q\noXJtYFRYjkI9NHK4mI11PQmn2yF/svU7b63mxNDyUJtOL2/HCNZBYKhrfekCnwX0\nBYD2FKMHPlcVSAEThGECQQDsYI9NoDtmiQUJLeXylQnOCmIq9xj67gRik3c2hrug\nPbzhPDemQWHmevNxe2t19uZTlACgSUyuYP/xsHSI8rXpAkEA4X6RfAFgMyUz6ESs\nU3gLyUtOzgEngGC6J172KxZsvQaYSYBtXKoXN7e+sn9RIBXPafGR6v4xrLmSw2RM\nP0ixfQJBAKEQapUKSW9kjfnjPHw+8Z9jk+CS3oKdDH/e26xbwh099CXFUmYGxx61\nSIxa/K40vlzUzFhrmcR4c+3LvpxSRYECQGtLnk4zGWM8wIY0pwrQhEsz2juLsRAU\n9n7lYJz//p2zFaNjyKXfCU0p0UN98UwjFJ6Eo7n9WgWmB3+RqfYy0MECQQCjK0gS\n4Y5zK7xuMgEudehgJl2oshmkAdUZXLqnOyCkM0auWbf/uUV5jpBLVKLE1N5HZmJH\n5xCssyqVOFZNIpwe\n-----END PRIVATE KEY-----\n";
const EC_PKCS8: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg6l7mozkYI55FTmVo\nM/xUgZD6Hkwt1iT0ZnG43Fiz6UmhRANCAATSrCv8bFyZjww1utMj5aON+Rc5T8jQ\nkMBnYkXrW05HaFHnoTWPb+R/mjU6tsJZ4mtdHn5O/wHxhPFJUpM2ojpA\n-----END PRIVATE KEY-----\n";

/// Error contract: an empty key file says it is empty; `key id` given an RSA or EC
/// private key says what it got (it said "not an ed25519 public key").
#[test]
fn key_files_of_the_wrong_kind_say_what_they_are() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    roots(d);
    std::fs::write(d.join("empty.pem"), "").expect("write");
    std::fs::write(d.join("rsa.pem"), RSA_PKCS8).expect("write");
    std::fs::write(d.join("ec.pem"), EC_PKCS8).expect("write");
    let run = |args: &[&str]| shoal_tests::run_in(d, args);
    for (file, line) in [
        (
            "empty.pem",
            "shoal: reading empty.pem: key file empty.pem is empty",
        ),
        (
            "rsa.pem",
            "shoal: reading rsa.pem: expected an ed25519 private key (PKCS#8 PEM), found an RSA private key (PKCS#8 PEM)",
        ),
        (
            "ec.pem",
            "shoal: reading ec.pem: expected an ed25519 private key (PKCS#8 PEM), found an EC private key (PKCS#8 PEM)",
        ),
    ] {
        assert_eq!(fails(run(&["key", "id", file]), 1), line);
    }
    let build = |key: &str| {
        run(&[
            "artifact",
            "build",
            "--image",
            "img",
            "--name",
            "acme-os",
            "--version",
            "2.0",
            "--device-type",
            "board",
            "--security-counter",
            "1",
            "--key",
            key,
            "--out",
            "b.shoal",
        ])
    };
    assert_eq!(
        fails(build("empty.pem"), 2),
        "shoal: empty.pem: key file empty.pem is empty"
    );
    assert_eq!(
        fails(build("release.pem.pub"), 2),
        "shoal: release.pem.pub: expected an ed25519 private key (PKCS#8 PEM), found a public key (SPKI PEM)"
    );
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(
                p.strip_prefix(dir)
                    .expect("under dir")
                    .display()
                    .to_string(),
            );
        }
    }
    out.sort();
    out
}

/// Error contract and new users: `shoal status` is read-only and creates no files;
/// a bootloader environment never written says so (it said "no terminator") and
/// `shoal slot init` provisions it.
#[test]
fn status_creates_nothing_and_a_new_environment_is_provisioned_by_slot_init() {
    let dev = Device::new(&image(1, SIZE), SLOT);
    for f in ["bootenv", "bootenv.2", "bootenv.lock"] {
        let _ = std::fs::remove_file(dev.path(f));
    }
    let _ = std::fs::remove_dir_all(dev.path("data"));
    let before = files(dev.dir.path());
    assert_eq!(
        fails(dev.run(&["status"]), 1),
        format!(
            "shoal: cannot read the boot state: cannot read the bootloader environment: the bootloader environment {0} and {0}.2 has never been written (a new device): provision it with `shoal slot init SLOT`, SLOT the slot the device runs",
            dev.path("bootenv").display()
        )
    );
    assert_eq!(files(dev.dir.path()), before, "status created files");
    ok(dev.run(&["slot", "init", "A"]));
    assert_eq!(
        fails(dev.run(&["slot", "init", "B"]), 1),
        "shoal: the bootloader environment already holds a boot state (slot A committed); --force replaces it"
    );
    let with_env = files(dev.dir.path());
    let text = ok(dev.run(&["status"]));
    assert!(
        text.starts_with("slot A: unknown (not installed by Shoal)  (running)\n"),
        "{text}"
    );
    assert_eq!(files(dev.dir.path()), with_env, "status created files");
    assert!(!dev.path("data").exists());
}

/// New users: after the reboot into the trial (before `boot-check`), `status`
/// said slot A was running while its boot line said slot B runs on trial.
#[test]
fn status_after_the_reboot_into_the_trial_agrees_with_itself() {
    let dev = Device::new(&image(1, SIZE), SLOT);
    let v1 = dev.build(&image(2, SIZE), "1.0", 1, None);
    ok(dev.run(&["install", &v1.display().to_string()]));
    assert_eq!(dev.reboot(), Slot::B);
    let before = files(dev.dir.path());
    let st = dev.status();
    assert_eq!(st["active"], "B", "{st}");
    assert_eq!(st["deployment"]["phase"], "trial", "{st}");
    assert_eq!(st["deployment"]["boot_check_pending"], true, "{st}");
    let text = ok(dev.run(&["status"]));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0], "slot A: unknown (not installed by Shoal)",
        "{text}"
    );
    assert_eq!(lines[1], "slot B: acme-os 1.0  (running)", "{text}");
    assert!(
        lines[2].starts_with("boot: running slot B on trial"),
        "{text}"
    );
    assert_eq!(
        lines[4],
        "deployment: acme-os 1.0 to slot B: trial (booted; `shoal boot-check` has not run yet)",
        "{text}"
    );
    assert_eq!(files(dev.dir.path()), before, "status wrote nothing");
}

/// New users: `install`, `status`, `boot-check`, `commit`, `rollback` show examples
/// in `--help`; the `root init`/`rotate` examples render on their own lines.
#[test]
fn help_shows_examples_on_their_own_lines() {
    let help = |args: &[&str]| {
        ok(shoal_tests::shoal()
            .args(args)
            .arg("--help")
            .output()
            .expect("run"))
    };
    for cmd in ["install", "status", "boot-check", "commit", "rollback"] {
        let text = help(&[cmd]);
        assert!(
            text.contains(&format!("Examples:\n  shoal {cmd}")),
            "{cmd} --help:\n{text}"
        );
    }
    let init = help(&["root", "init"]);
    assert!(
        init.contains("Example:\n  shoal root init --root-key root.pem.pub --release-key release.pem.pub \\\n      --sign root.pem --out root.shoalroot\n"),
        "{init}"
    );
    let rotate = help(&["root", "rotate"]);
    assert!(
        rotate.contains("Example:\n  shoal root rotate --current root.shoalroot"),
        "{rotate}"
    );
}

/// Error contract: exit 75 only where retrying can help. A hash mismatch read from
/// a local artifact file and a thin artifact whose base is missing fail the same way
/// every time: exit 1, and no "rerunning the install resumes it".
#[test]
fn corrupt_local_artifacts_exit_1_without_a_resume_hint() {
    let factory = image(1, SIZE);
    let dev = Device::new(&factory, SLOT);
    let v1_image = image(2, SIZE);
    let v1 = dev.build(&v1_image, "1.0", 1, None);
    // Flip a byte in the middle of the packs (chunk data, not a header).
    let mut bytes = std::fs::read(&v1).expect("artifact");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    let bad = dev.path("bad.shoal");
    std::fs::write(&bad, &bytes).expect("write");
    let line = fails(dev.run(&["install", &bad.display().to_string()]), 1);
    assert!(
        line.starts_with(&format!(
            "shoal: installing {}: install stopped: ",
            bad.display()
        )) && line.contains("is corrupt")
            && !line.contains("resume"),
        "{line}"
    );
    no_trial_armed(&dev);

    // A thin artifact against a base the device does not run.
    let v2 = install_common::modify(&v1_image, 3, 2, 100_000);
    let thin = dev.build(&v2, "2.0", 2, Some(&v1));
    let line = fails(dev.run(&["install", &thin.display().to_string()]), 1);
    assert!(
        !line.contains("resume") && line.contains("acme-os 1.0"),
        "{line}"
    );
    no_trial_armed(&dev);
}

/// Error contract: an unsigned envelope is refused before it costs memory. A 15 MB
/// envelope without signatures was read whole and decoded by `verify`, `inspect`
/// and `diff`; now each refuses it from its first bytes and its signature list
/// (peak RSS: shoal-bench's `harden` section).
#[test]
fn a_big_unsigned_envelope_is_refused_from_its_signature_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    roots(d);
    let envelope = shoal_signing::Envelope::new(vec![0x5a; 15_000_000]).to_bytes();
    let mut bytes = Vec::new();
    shoal_artifact::ustar::write_member(&mut bytes, "manifest.envelope", &envelope).expect("tar");
    shoal_artifact::ustar::write_end(&mut bytes).expect("tar");
    std::fs::write(d.join("big.shoal"), bytes).expect("write");
    let run = |args: &[&str]| shoal_tests::run_in(d, args);
    let refused = format!(
        "shoal: reading big.shoal: the manifest envelope ({} bytes) carries no signature",
        envelope.len()
    );
    assert_eq!(
        fails(run(&["artifact", "inspect", "big.shoal"]), 1),
        refused
    );
    assert_eq!(
        fails(
            run(&[
                "artifact",
                "verify",
                "--root",
                "good.shoalroot",
                "big.shoal"
            ]),
            1
        ),
        refused
    );
    assert_eq!(
        fails(run(&["artifact", "diff", "a.shoal", "big.shoal"]), 1),
        refused
    );
    assert_eq!(
        fails(
            run(&[
                "store",
                "add",
                "--root",
                "good.shoalroot",
                "store",
                "big.shoal"
            ]),
            1
        ),
        refused
    );
}

/// Offsets of the member headers of a tar: (offset, path, size).
fn member_headers(bytes: &[u8]) -> Vec<(usize, String, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 512 <= bytes.len() && bytes[at..at + 512].iter().any(|&b| b != 0) {
        let name_end = bytes[at..at + 100]
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(100);
        let path = String::from_utf8_lossy(&bytes[at..at + name_end]).into_owned();
        let size_text = std::str::from_utf8(&bytes[at + 124..at + 135]).expect("size");
        let size =
            usize::from_str_radix(size_text.trim_matches(char::from(0)).trim(), 8).expect("octal");
        out.push((at, path, size));
        at += 512 + size.next_multiple_of(512);
    }
    out
}

/// Rewrites one header's path and type flag, with a valid checksum.
fn rewrite_header(bytes: &mut [u8], at: usize, path: &str, kind: u8) {
    let h = &mut bytes[at..at + 512];
    h[..100].fill(0);
    h[..path.len()].copy_from_slice(path.as_bytes());
    h[156] = kind;
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// Error contract: `install` refuses the members `verify` refuses (a `..` path, a
/// hard link, packs or data members out of order) even where it needs none of
/// their bytes (here the running slot already holds every chunk): one reader, one
/// set of rules. Both layouts: packs (`--packs`) and data members (the default).
#[test]
fn install_refuses_the_members_verify_refuses_even_unneeded() {
    // Big enough for several packs (1 MiB each) with `--packs`; the default layout
    // puts all of it in one data member. The device runs the same release, so it
    // needs none of the chunks: every member is one it does not need.
    let factory = image(1, 5 * MIB);
    let dev = Device::new(&factory, 6 * MIB as u64);
    let built = |extra: &[&str]| {
        let path = dev.build_with(&factory, "1.0", 1, None, "board", &dev.key, extra);
        std::fs::read(path).expect("artifact")
    };
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let mut cases: Vec<(String, Vec<u8>, Edit, String)> = Vec::new();
    // Packs: a later pack's header.
    let good = built(&["--packs"]);
    let headers = member_headers(&good);
    let packs: Vec<usize> = headers
        .iter()
        .filter(|(_, p, _)| p.starts_with("packs/0"))
        .map(|(at, _, _)| *at)
        .collect();
    assert!(packs.len() >= 2, "{headers:?}");
    let (p0, p1) = (packs[0], packs[1]);
    cases.push((
        "packs-dotdot".into(),
        good.clone(),
        Box::new(move |b| rewrite_header(b, p1, "../packs/00000001", b'0')),
        "tar member \"../packs/00000001\" has an unsafe path".to_string(),
    ));
    cases.push((
        "packs-hardlink".into(),
        good.clone(),
        Box::new(move |b| rewrite_header(b, p1, "packs/00000001", b'1')),
        "unexpected tar member \"packs/00000001\"".to_string(),
    ));
    cases.push((
        "packs-order".into(),
        good.clone(),
        Box::new(move |b| rewrite_header(b, p0, "packs/00000001", b'0')),
        "unexpected tar member \"packs/00000001\"".to_string(),
    ));
    // Data members (the default): the one data member's header.
    let good = built(&[]);
    let headers = member_headers(&good);
    let data: Vec<usize> = headers
        .iter()
        .filter(|(_, p, _)| p.starts_with("data/"))
        .map(|(at, _, _)| *at)
        .collect();
    assert_eq!(data.len(), 1, "{headers:?}");
    assert!(!headers.iter().any(|(_, p, _)| p.starts_with("packs")));
    let d0 = data[0];
    cases.push((
        "data-dotdot".into(),
        good.clone(),
        Box::new(move |b| rewrite_header(b, d0, "../data/00000000", b'0')),
        "tar member \"../data/00000000\" has an unsafe path".to_string(),
    ));
    cases.push((
        "data-hardlink".into(),
        good.clone(),
        Box::new(move |b| rewrite_header(b, d0, "data/00000000", b'1')),
        "unexpected tar member \"data/00000000\"".to_string(),
    ));
    cases.push((
        "data-order".into(),
        good.clone(),
        Box::new(move |b| rewrite_header(b, d0, "data/00000001", b'0')),
        "unexpected tar member \"data/00000001\"".to_string(),
    ));
    for (name, good, edit, why) in cases {
        let mut bytes = good;
        edit(&mut bytes);
        let path = dev.path(&format!("{name}.shoal"));
        std::fs::write(&path, &bytes).expect("write");
        let p = path.display().to_string();
        let verify = fails(
            dev.run(&[
                "artifact",
                "verify",
                "--root",
                &dev.root.display().to_string(),
                &p,
            ]),
            1,
        );
        assert!(verify.ends_with(&why), "{name}: verify: {verify}");
        let install = fails(dev.run(&["install", &p]), 1);
        assert_eq!(install, format!("shoal: installing {p}: {why}"), "{name}");
        no_trial_armed(&dev);
    }
}

/// Error contract: a signed manifest of 300,000 chunks (a 19 GB image) is refused
/// by the slot size before the install builds anything from its chunk list.
#[test]
fn a_huge_signed_manifest_is_refused_by_the_slot_size() {
    let dev = Device::new(&image(1, SIZE), SLOT);
    let small = dev.build(&image(2, SIZE), "1.0", 1, None);
    let bytes = std::fs::read(&small).expect("artifact");
    let size = usize::from_str_radix(std::str::from_utf8(&bytes[124..135]).expect("octal"), 8)
        .expect("size");
    let envelope = shoal_signing::Envelope::from_bytes(&bytes[512..512 + size]).expect("envelope");
    let mut manifest = shoal_artifact::Manifest::from_cbor(&envelope.signed).expect("manifest");
    let avg = manifest.chunking.avg_size;
    let chunks: Vec<shoal_artifact::ChunkRef> = (0..300_000u32)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_le_bytes());
            shoal_artifact::ChunkRef {
                id: shoal_artifact::ChunkId(id),
                size: avg,
                stored_size: avg,
            }
        })
        .collect();
    let payload = &mut manifest.payloads[0];
    payload.size = u64::from(avg) * 300_000;
    payload.chunks = chunks;
    let need = payload.size;
    let key = shoal_signing::SecretKey::load(&dev.key).expect("key");
    let mut signed = shoal_signing::Envelope::new(manifest.to_cbor());
    signed.sign(&key);
    let mut out = Vec::new();
    shoal_artifact::ustar::write_member(&mut out, "manifest.envelope", &signed.to_bytes())
        .expect("tar");
    shoal_artifact::ustar::write_end(&mut out).expect("tar");
    let huge = dev.path("huge.shoal");
    std::fs::write(&huge, out).expect("write");
    let p = huge.display().to_string();
    assert_eq!(
        fails(dev.run(&["install", &p]), 1),
        format!(
            "shoal: installing {p}: the release was refused: the image is {need} bytes but slot B holds only {SLOT} bytes"
        )
    );
    no_trial_armed(&dev);
}

/// Random bytes (no runs of zeros: every chunk is distinct and incompressible).
fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The device's decoding batch (`DECODE_BATCH_BYTES` in node/src/device/mod.rs):
/// a batch is read until the chunks' sizes plus their stored sizes reach it.
const DECODE_BATCH: u64 = 2 * MIB as u64;

/// Each chunk's uncompressed size and the running sum of what a batch counts
/// (`size + stored size`), in artifact order.
fn batch_sums(artifact: &Path) -> Vec<(u64, u64)> {
    let mut r = shoal_artifact::ArtifactReader::open_unverified(std::io::BufReader::new(
        std::fs::File::open(artifact).expect("artifact"),
    ))
    .expect("artifact");
    let mut sum = 0;
    let mut out = Vec::new();
    while let Some(raw) = r.next_raw().expect("chunk") {
        sum += u64::from(raw.chunk.size) + raw.stored().len() as u64;
        out.push((u64::from(raw.chunk.size), sum));
    }
    out
}

/// Rewrites the ustar header at `at` to say `size`, with its checksum.
fn set_member_size(bytes: &mut [u8], at: usize, size: u64) {
    let h = &mut bytes[at..at + 512];
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// `artifact` with one byte added after the last chunk of its one data member.
fn with_trailing_byte(artifact: &[u8]) -> Vec<u8> {
    let header = artifact
        .chunks(512)
        .position(|b| b.starts_with(b"data/00000000\0"))
        .expect("a data member")
        * 512;
    assert!(
        !artifact
            .chunks(512)
            .any(|b| b.starts_with(b"data/00000001\0")),
        "one data member"
    );
    let size = u64::from_str_radix(
        std::str::from_utf8(&artifact[header + 124..header + 135]).expect("octal"),
        8,
    )
    .expect("size");
    let data_end = header + 512 + size as usize;
    let mut out = artifact[..data_end].to_vec();
    out.push(0x55);
    set_member_size(&mut out, header, size + 1);
    out.resize(out.len().next_multiple_of(512), 0);
    out.extend_from_slice(&artifact[data_end.next_multiple_of(512)..]);
    out
}

/// Item 2 again, when the batch holding the last wanted chunk fills up exactly at
/// that chunk: the reader stops before the end of the archive, and the next read
/// fails. The batch was handed over before that failure was looked at, so the
/// engine armed the trial and the install then exited 1.
#[test]
fn a_bad_end_after_a_full_last_batch_fails_the_install_without_arming() {
    let dev = Device::new(&image(1, SIZE), SLOT);
    // An image whose chunks fill one batch exactly at its last chunk: chunked
    // by content, a prefix of random bytes ending at a chunk boundary has the
    // same chunks up to there.
    let long = random(2, 3 * MIB / 2);
    let probe = dev.build(&long, "0.9", 1, None);
    let sums = batch_sums(&probe);
    let last = sums
        .iter()
        .position(|&(_, sum)| sum >= DECODE_BATCH)
        .expect("the probe fills a batch");
    let len: u64 = sums[..=last].iter().map(|&(size, _)| size).sum();
    let img = &long[..len as usize];
    let v1 = dev.build(img, "1.0", 1, None);
    let sums = batch_sums(&v1);
    assert_eq!(sums.len(), last + 1, "same chunks");
    assert!(
        sums[last - 1].1 < DECODE_BATCH && sums[last].1 >= DECODE_BATCH,
        "the last chunk fills the batch: {:?}",
        &sums[last - 1..]
    );
    // Each device has its own release key: each case builds the image again.
    let cases = [
        (
            "a trailing byte",
            "data member 0: 1 byte after the last chunk",
        ),
        ("an extra member", "unexpected tar member \"evil\""),
        (
            "cut before the end blocks",
            "the artifact is truncated (ends inside the chunk list)",
        ),
    ];
    for (what, want) in cases {
        let dev = Device::new(&image(1, SIZE), SLOT);
        let b_before = std::fs::read(dev.path("b.img")).expect("slot B");
        let path = dev.build(img, "1.0", 1, None);
        assert_eq!(batch_sums(&path), sums, "{what}: same chunks");
        let pristine = std::fs::read(&path).expect("artifact");
        match what {
            "a trailing byte" => std::fs::write(&path, with_trailing_byte(&pristine)),
            "an extra member" => {
                append_member(&path, "evil", b'0', b"hello");
                Ok(())
            }
            _ => std::fs::write(&path, &pristine[..pristine.len() - 1024]),
        }
        .expect("artifact");
        let out = dev.run(&["install", &path.display().to_string()]);
        let line = fails(out, 1);
        assert_eq!(
            line,
            format!("shoal: installing {}: {want}", path.display()),
            "{what}"
        );
        no_trial_armed(&dev);
        let status = dev.status();
        assert_ne!(
            status["deployment"]["phase"], "trial-armed",
            "{what}: {status}"
        );
        // Slot B never holds the whole new image.
        let b = std::fs::read(dev.path("b.img")).expect("slot B");
        assert!(
            b == b_before || b[..img.len()] != *img,
            "{what}: slot B holds the new image"
        );
    }
}
