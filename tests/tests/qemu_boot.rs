//! Shoal on a real booted machine: the real `shoal` binary inside a QEMU/OVMF
//! machine updates its own disk, the real GRUB (running Shoal's `grub.cfg` fragment
//! from `bootctl/integration/`) picks the slot from the environment Shoal wrote, and
//! power cuts in the middle of an install leave a machine that still boots.
//!
//! The scenarios of issue 5 run in order on one machine, because each starts from
//! the state the previous one left (as on a real device):
//!
//! 0. factory provisioning: slot B holds the raw v1 image; booted once, it installs
//!    the signed v1 into slot A, which then commits, so the store knows its release;
//! 1. first boot from A: `shoal boot-check` has nothing to do, status says A runs v1;
//! 2. v2 (full artifact) from the USB stick: B boots as a trial and commits, and
//!    stays; 6 (anti-rollback) runs here: v1 is refused and nothing is written;
//! 3. v3 (thin, against v2): only missing chunks come from the stick, the rest is
//!    read from the running slot B, whose journaled ext4 root (mounted read-only)
//!    makes its page cache differ from its disk (checked), so Shoal must read it
//!    with `O_DIRECT`; A's trial fails its health check, Shoal rolls back and
//!    reboots into B;
//! 4. a release whose kernel does not come up: GRUB's try counter falls back to B;
//! 5. power cuts (SIGKILL to QEMU) early, midway, during verification and right
//!    after arming; the machine boots a verified slot every time and the rerun
//!    resumes.
//!
//! Needs QEMU, OVMF, GRUB and friends (see `tests/qemu/host.rs`); without them the
//! test fails and names the packages. Takes several minutes under TCG (no KVM).

#[path = "../qemu/host.rs"]
mod host;
#[path = "../qemu/image.rs"]
mod image;
#[path = "../qemu/machine.rs"]
mod machine;
#[path = "../qemu/system.rs"]
mod system;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use machine::{Boot, End, Machine, Run, Step};
use serde_json::Value;
use system::{Builder, Release};

const DEVICE_TYPE: &str = "qemu-x86_64-efi";
const RELEASE_NAME: &str = "acme-os";

const V1: Release = Release {
    name: "v1",
    version: "1.0.0",
    counter: 1,
    data_seeds: &[1, 2, 3, 4, 5, 6, 7, 8],
    healthy: true,
    boots: true,
};
const V2: Release = Release {
    name: "v2",
    version: "2.0.0",
    counter: 2,
    data_seeds: &[1, 2, 30, 4, 5, 6, 7, 8, 9],
    healthy: true,
    boots: true,
};
/// Its health check fails.
const V3: Release = Release {
    name: "v3",
    version: "3.0.0",
    counter: 3,
    data_seeds: &[1, 2, 30, 4, 50, 6, 7, 8, 9],
    healthy: false,
    boots: true,
};
/// Its kernel does not come up.
const V4: Release = Release {
    name: "v4",
    version: "4.0.0",
    counter: 4,
    data_seeds: &[1, 2, 30, 4, 5, 6, 7, 8, 9],
    healthy: true,
    boots: false,
};
/// Installed through power cuts.
const V5: Release = Release {
    name: "v5",
    version: "5.0.0",
    counter: 5,
    data_seeds: &[11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    healthy: true,
    boots: true,
};

/// The device configuration every release carries in `/etc/shoal/shoal.toml`.
const DEVICE_CONFIG: &str = r#"# Shoal on the QEMU test machine.
[device]
type = "qemu-x86_64-efi"
data_dir = "/data/shoal"
trust_root = "/etc/shoal/root.shoal"
reboot_command = ["/bin/reboot"]

[health]
dir = "/etc/shoal/health.d"
timeout_s = 60

[install]
journal_batch_mib = 4

[slots]
a = { path = "/dev/vda2" }
b = { path = "/dev/vda3" }

[bootloader]
type = "grub"
scheme = "shoal"
grub_dir = "/boot/efi/EFI/shoal"
"#;

/// Where GRUB's environment blocks live on the ESP (`grub_dir` above).
const ESP_ENV_DIR: &str = "/EFI/shoal";

/// The test's work directory: removed after a pass, kept (with every boot's
/// serial log) after a failure.
struct WorkDir(Option<tempfile::TempDir>);

impl WorkDir {
    fn path(&self) -> &Path {
        self.0.as_ref().expect("work directory").path()
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!("qemu: work directory kept: {}", dir.keep().display());
        }
    }
}

/// The test's work directory (unique, so concurrent runs do not collide) and the
/// kernel cache (`target/qemu-cache`).
fn dirs() -> (WorkDir, PathBuf) {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let cache = tmp
        .parent()
        .expect("target/tmp has a parent")
        .join("qemu-cache");
    fs::create_dir_all(&cache).expect("cache directory");
    let work = tempfile::Builder::new()
        .prefix("qemu-boot-")
        .tempdir_in(tmp)
        .expect("work directory");
    (WorkDir(Some(work)), cache)
}

/// Runs `shoal ARGS` on the host (building releases, keys, roots).
fn shoal_host(args: &[&str]) -> String {
    let mut cmd = Command::new(shoal_tests::shoal_bin());
    cmd.env_remove("SHOAL_LOG").args(args);
    host::stdout(&mut cmd)
}

/// The machine's `grub.cfg`: the board part (find the ESP, point Shoal's fragment
/// at the environment, boot the slot it picks) around `bootctl/integration`'s
/// fragment, which is embedded next to it as `shoal.cfg`.
fn board_grub_cfg() -> String {
    fs::read_to_string(system::repo_dir().join("tests/qemu/grub/board.cfg"))
        .expect("read tests/qemu/grub/board.cfg")
}

/// Artifacts built on the host, by release name.
#[derive(Debug)]
struct Artifacts {
    dir: PathBuf,
}

impl Artifacts {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.shoal"))
    }
    fn size(&self, name: &str) -> u64 {
        fs::metadata(self.path(name)).expect("artifact").len()
    }
}

/// Keys, trust root, slot images, artifacts, USB stick, ESP, the machine.
fn build_lab(work: &Path, cache: &Path) -> (Machine, Artifacts) {
    let keys = work.join("keys");
    fs::create_dir_all(&keys).expect("keys directory");
    let root_key = keys.join("root.pem");
    let release_key = keys.join("release.pem");
    let root_file = keys.join("root.shoal");
    let p = |p: &Path| p.to_str().expect("UTF-8 path").to_string();
    shoal_host(&["key", "generate", "--out", &p(&root_key)]);
    shoal_host(&["key", "generate", "--out", &p(&release_key)]);
    shoal_host(&[
        "root",
        "init",
        "--root-key",
        &format!("{}.pub", p(&root_key)),
        "--release-key",
        &format!("{}.pub", p(&release_key)),
        "--sign",
        &p(&root_key),
        "--out",
        &p(&root_file),
    ]);
    let trust_root = fs::read(&root_file).expect("trust root");

    let builder = Builder::new(&work.join("build"), cache, shoal_tests::shoal_bin());
    let extra = vec![
        (
            "etc/shoal/shoal.toml",
            0o644,
            DEVICE_CONFIG.as_bytes().to_vec(),
        ),
        ("etc/shoal/root.shoal", 0o644, trust_root),
    ];
    let artifacts = Artifacts {
        dir: work.join("usb"),
    };
    fs::create_dir_all(&artifacts.dir).expect("usb directory");
    let mut v1_image = PathBuf::new();
    // (release, base of a thin artifact)
    for (release, base) in [
        (&V1, None),
        (&V2, None),
        (&V3, Some("v2")),
        (&V4, Some("v2")),
        (&V5, None),
    ] {
        let image = builder.rootfs(release, &extra);
        let out = artifacts.path(release.name);
        let counter = release.counter.to_string();
        let mut args = vec![
            "artifact",
            "build",
            "--image",
            image.to_str().expect("UTF-8 path"),
            "--name",
            RELEASE_NAME,
            "--version",
            release.version,
            "--device-type",
            DEVICE_TYPE,
            "--security-counter",
            &counter,
            "--key",
            release_key.to_str().expect("UTF-8 path"),
            "--out",
            out.to_str().expect("UTF-8 path"),
        ];
        let base_path = base.map(|b| artifacts.path(b));
        if let Some(b) = &base_path {
            args.extend(["--base", b.to_str().expect("UTF-8 path")]);
        }
        shoal_host(&args);
        if release.name == "v1" {
            v1_image = image;
        } else {
            fs::remove_file(&image).expect("remove slot image");
        }
    }
    let usb_size: u64 = fs::read_dir(&artifacts.dir)
        .expect("usb directory")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum::<u64>()
        + 16 * image::MIB;
    let usb = work.join("usb.img");
    image::ext4(
        &usb,
        "usb",
        usb_size.next_multiple_of(image::MIB),
        Some(&artifacts.dir),
        image::Journal::No,
    );

    // The ESP: GRUB with the board config and Shoal's fragment, and the factory
    // boot environment (slot B committed: the factory's provisioning boot).
    let fragment_path = system::repo_dir().join("bootctl/integration/grub.cfg");
    let fragment = fs::read_to_string(&fragment_path).unwrap_or_else(|e| {
        panic!(
            "Shoal's GRUB fragment {} is missing ({e}); the machine must boot with it",
            fragment_path.display()
        )
    });
    let efi = builder.grub_efi(&board_grub_cfg(), &fragment);
    let env = builder.grub_env(&[("shoal_slot", "B")]);
    let mut esp_files: Vec<(String, Vec<u8>)> = vec![("/EFI/BOOT/BOOTX64.EFI".into(), efi)];
    for (rel, bytes) in env {
        esp_files.push((format!("{ESP_ENV_DIR}/{rel}"), bytes));
    }
    let esp_refs: Vec<(&str, &[u8])> = esp_files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let esp = work.join("esp.img");
    image::esp(&esp, machine::ESP.size, &esp_refs, work);
    let data = work.join("data.img");
    image::ext4(&data, "data", machine::DATA.size, None, image::Journal::Yes);
    // Slot A starts empty (zeros); slot B holds v1 as the factory flashed it.
    let machine = Machine::assemble(work, &esp, None, Some(&v1_image), &data, &usb);
    fs::remove_file(&v1_image).expect("remove slot image");
    (machine, artifacts)
}

/// The JSON document in a step's output (Shoal's log lines may surround it).
fn json_of(boot: &Boot, step: &Step) -> Value {
    let lines = &step.output;
    for (i, first) in lines.iter().enumerate() {
        if !first.starts_with('{') {
            continue;
        }
        for j in (i..lines.len()).rev() {
            if lines[j].ends_with('}')
                && let Ok(v) = serde_json::from_str::<Value>(&lines[i..=j].join("\n"))
            {
                return v;
            }
        }
    }
    boot.fail(&format!(
        "`{}` printed no JSON; its output:\n{}",
        step.command,
        step.text()
    ))
}

/// `shoal boot-check --json`'s result on this boot. It exits 0, or is still running
/// when the reboot it asked for (after a rollback) takes the system down.
fn boot_check(boot: &Boot) -> Value {
    let Some(step) = boot.step("boot-check") else {
        boot.fail("`shoal boot-check` never ran")
    };
    let rebooting = step.rc.is_none() && boot.shows("Requesting system reboot");
    if step.rc != Some(0) && !rebooting {
        boot.fail(&format!(
            "`shoal boot-check` ended with {:?}; its output:\n{}",
            step.rc,
            step.text()
        ));
    }
    json_of(boot, &step)
}

#[track_caller]
fn expect_eq(boot: &Boot, what: &str, got: &Value, want: &str) {
    if got.as_str() != Some(want) {
        boot.fail(&format!("{what}: expected {want:?}, got {got}"));
    }
}

/// The release a status JSON reports for `slot` (`name version`), if any.
fn slot_release(status: &Value, slot: &str) -> Option<String> {
    let r = &status["slots"][slot];
    Some(format!(
        "{} {}",
        r["name"].as_str()?,
        r["version"].as_str()?
    ))
}

#[track_caller]
fn expect_status(boot: &Boot, status: &Value, active: &str, release: &str) {
    expect_eq(boot, "status active", &status["active"], active);
    let want = format!("{RELEASE_NAME} {release}");
    if slot_release(status, active).as_deref() != Some(want.as_str()) {
        boot.fail(&format!(
            "status: expected slot {active} to hold {want}, got {status:#}"
        ));
    }
}

const STATUS: &str = "shoal status --json";

/// Hashes of the inactive slot A and of the four GRUB environment blocks.
const HASH_INACTIVE_A: &str = "md5sum /dev/vda2 /boot/efi/EFI/shoal/shoal_grubenv1/env \
     /boot/efi/EFI/shoal/shoal_grubenv1/lock /boot/efi/EFI/shoal/shoal_grubenv2/env \
     /boot/efi/EFI/shoal/shoal_grubenv2/lock";

/// The first 4 MiB of the running slot B (`/dev/vda3`, its journaled ext4 root
/// mounted read-only) read twice: through the page cache, and with `O_DIRECT` from
/// the disk. Prints how many bytes differ and the first differences (`cmp -l`:
/// 1-based offset, cached byte, disk byte, octal).
const CACHED_VS_DISK_B: &str = "dd if=/dev/vda3 of=/tmp/cached bs=65536 count=64 2>/dev/null \
     && dd if=/dev/vda3 of=/tmp/disk bs=65536 count=64 iflag=direct 2>/dev/null \
     && echo differing=$(cmp -l /tmp/cached /tmp/disk | wc -l) \
     && { cmp -l /tmp/cached /tmp/disk | head -n 8; rm /tmp/cached /tmp/disk; }";

fn install(name: &str) -> String {
    format!("shoal install --json /mnt/usb/{name}.shoal")
}

fn install_watched(name: &str) -> String {
    format!("SHOAL_LOG=info NO_COLOR=1 install-watched --json /mnt/usb/{name}.shoal")
}

/// Boots until the system comes up (at most `boots_max` boots); every boot that
/// does not come up must show a kernel panic.
fn boot_until_up(
    m: &mut Machine,
    label: &str,
    steps: &[&str],
    boots_max: usize,
    cut_power_when: &mut dyn FnMut(&str) -> bool,
) -> Vec<Boot> {
    let mut boots = Vec::new();
    for _ in 0..boots_max {
        let boot = m.boot(Run::new(label, steps).cut_power_when(&mut *cut_power_when));
        let up = boot.booted().is_some();
        if !up && !boot.shows("Kernel panic") {
            boot.fail("the system neither came up nor panicked");
        }
        boots.push(boot);
        if up {
            return boots;
        }
    }
    let last = boots.pop().expect("at least one boot");
    last.fail(&format!("the system did not come up in {boots_max} boots"))
}

/// Progress (`written=N`) from an `install-watched` line.
fn written(line: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("written="))
        .and_then(|n| n.parse().ok())
}

#[test]
fn qemu_update_rollback_and_power_cuts() {
    host::require();
    let started = Instant::now();
    let (work, cache) = dirs();
    let (mut m, artifacts) = build_lab(work.path(), &cache);
    let built = started.elapsed();
    eprintln!(
        "qemu: machine and releases built in {:.1} s",
        built.as_secs_f64()
    );

    // 0. Factory provisioning.
    let boot = m.boot(Run::new(
        "factory: install v1 into slot A",
        &[STATUS, &install("v1"), "reboot"],
    ));
    boot.expect_booted("B", "v1");
    let report = json_of(&boot, &boot.expect_step("2", 0));
    expect_eq(&boot, "factory install slot", &report["slot"], "A");
    let boot = m.boot(Run::new("factory: first boot of A commits v1", &[STATUS]));
    boot.expect_booted("A", "v1");
    expect_eq(
        &boot,
        "boot-check",
        &boot_check(&boot)["result"],
        "committed",
    );

    // 1. First boot from A: nothing to do; status reports A with v1.
    //    2. (first half) install v2 (full) from the stick and reboot.
    let boot = m.boot(Run::new(
        "1: A runs v1; install v2",
        &[STATUS, &install("v2"), STATUS, "reboot"],
    ));
    boot.expect_booted("A", "v1");
    expect_eq(&boot, "boot-check", &boot_check(&boot)["result"], "nothing");
    let status = json_of(&boot, &boot.expect_step("1", 0));
    expect_status(&boot, &status, "A", "1.0.0");
    eprintln!("qemu: scenario 1 passed (A runs v1, boot-check: nothing)");
    let report = json_of(&boot, &boot.expect_step("2", 0));
    expect_eq(&boot, "v2 install slot", &report["slot"], "B");
    let status = json_of(&boot, &boot.expect_step("3", 0));
    expect_eq(&boot, "trial armed", &status["trial"]["slot"], "B");

    // 2. GRUB boots B as a trial; the health check passes; boot-check commits.
    let boot = m.boot(Run::new("2: B's trial commits", &[STATUS]));
    if !boot.shows("shoal: booting slot B") {
        boot.fail("GRUB (Shoal's fragment) should have booted the trial slot B");
    }
    boot.expect_booted("B", "v2");
    let check = boot_check(&boot);
    expect_eq(&boot, "boot-check", &check["result"], "committed");
    expect_eq(&boot, "committed slot", &check["slot"], "B");
    let status = json_of(&boot, &boot.expect_step("1", 0));
    expect_status(&boot, &status, "B", "2.0.0");
    if status["floor"].as_u64() != Some(V2.counter) {
        boot.fail(&format!(
            "the anti-rollback floor is not v2's counter: {status:#}"
        ));
    }

    // The next boot stays on B. 6. Anti-rollback: v1 is refused and nothing is
    // written (the inactive slot and the GRUB environment hash the same before
    // and after). 3. Then v3 as a thin artifact against v2, after checking that
    // B's journaled root really shows a cached view that differs from the disk.
    let boot = m.boot(Run::new(
        "2: B stays; 6: v1 is refused; 3: install v3 (thin)",
        &[
            STATUS,
            HASH_INACTIVE_A,
            &install("v1"),
            HASH_INACTIVE_A,
            STATUS,
            CACHED_VS_DISK_B,
            &install("v3"),
            "reboot",
        ],
    ));
    boot.expect_booted("B", "v2");
    expect_eq(&boot, "boot-check", &boot_check(&boot)["result"], "nothing");
    let status = json_of(&boot, &boot.expect_step("1", 0));
    expect_status(&boot, &status, "B", "2.0.0");
    eprintln!("qemu: scenario 2 passed (B tried, committed, stays)");
    let before = boot.expect_step("2", 0).output;
    let refused = boot.expect_step("3", 1);
    let reason = refused.text();
    if !reason.contains("security counter 1 is below") || !reason.contains("floor 2") {
        boot.fail(&format!(
            "installing v1 below the floor must fail naming the security counter and the floor; got:\n{reason}"
        ));
    }
    if boot.expect_step("4", 0).output != before {
        boot.fail("the refused install wrote to the inactive slot A or the GRUB environment");
    }
    let status = json_of(&boot, &boot.expect_step("5", 0));
    if !status["deployment"].is_null() || !status["trial"].is_null() {
        boot.fail(&format!("a refused install left state behind: {status:#}"));
    }
    eprintln!(
        "qemu: scenario 6 passed (v1 refused: {})",
        reason.lines().last().unwrap_or("")
    );

    // 3. The running slot's page cache is not its disk: the journaled ext4 root,
    //    mounted read-only, changed cached blocks it never writes. Shoal reuses
    //    B's chunks, so it must read them from the disk (O_DIRECT); through the
    //    cache one chunk fails its hash and the thin install misses it.
    let view = boot.expect_step("6", 0).text();
    let differing: u64 = view
        .lines()
        .find_map(|l| l.strip_prefix("differing="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| boot.fail(&format!("no cached-vs-disk count in:\n{view}")));
    if differing == 0 {
        boot.fail(
            "the running slot B reads the same through the page cache as from the disk, \
             so this machine no longer reproduces the stale cached view of a journaled \
             read-only ext4 root and cannot show that Shoal reads slots from the disk",
        );
    }
    eprintln!(
        "qemu:   running slot B: {differing} byte(s) of its first 4 MiB differ between the page cache and the disk (cmp -l: {})",
        view.lines().skip(1).take(3).collect::<Vec<_>>().join("; ")
    );
    // Only the missing chunks come from the stick.
    let (thin, full) = (artifacts.size("v3"), artifacts.size("v2"));
    assert!(
        thin * 4 < full,
        "the thin v3 artifact ({thin} bytes) should be much smaller than the full v2 ({full} bytes)"
    );
    let installed = boot.expect_step("7", 0);
    if installed.text().contains("does not hash as recorded") {
        boot.fail(&format!(
            "Shoal read a chunk of the running slot that does not hash as indexed (the page cache's view, not the disk's):\n{}",
            installed.text()
        ));
    }
    let report = json_of(&boot, &installed);
    expect_eq(&boot, "v3 install slot", &report["slot"], "A");
    let n = |k: &str| report[k].as_u64().unwrap_or(0);
    if n("source_bytes_read") > thin || n("fetched_bytes") * 4 > n("total_bytes") {
        boot.fail(&format!(
            "the thin install should read at most the thin artifact ({thin} bytes) and fetch little: {report:#}"
        ));
    }
    if n("reused_bytes") * 2 < n("total_bytes") {
        boot.fail(&format!(
            "most of v3 should be reused from the running slot: {report:#}"
        ));
    }
    eprintln!(
        "qemu:   v3 (thin, {thin} bytes): {} bytes reused from slot B, {} fetched, {} read from the stick",
        n("reused_bytes"),
        n("fetched_bytes"),
        n("source_bytes_read")
    );
    // A boots as a trial, its health check fails, Shoal rolls back and reboots.
    let boot = m.boot(Run::new("3: A's trial fails its health check", &[STATUS]));
    boot.expect_booted("A", "v3");
    let check = boot_check(&boot);
    expect_eq(&boot, "boot-check", &check["result"], "rolled-back");
    if !boot.shows("Requesting system reboot") {
        boot.fail("Shoal should have rebooted (device.reboot_command) right after the rollback");
    }
    // Back on B; this boot also starts scenario 4: a release whose kernel does
    // not come up.
    let boot = m.boot(Run::new(
        "3: back on B; 4: install v4 (its kernel panics)",
        &[STATUS, &install("v4"), "reboot"],
    ));
    boot.expect_booted("B", "v2");
    let status = json_of(&boot, &boot.expect_step("1", 0));
    expect_status(&boot, &status, "B", "2.0.0");
    expect_eq(
        &boot,
        "last result",
        &status["last"]["result"],
        "rolled-back",
    );
    expect_eq(&boot, "last release", &status["last"]["version"], "3.0.0");
    let reason = status["last"]["reason"].as_str().unwrap_or_default();
    if !reason.contains("health") {
        boot.fail(&format!(
            "the rollback reason should name the health check: {status:#}"
        ));
    }
    eprintln!("qemu: scenario 3 passed (v3 rolled back: {reason})");

    // 4. GRUB falls back by itself.
    let report = json_of(&boot, &boot.expect_step("2", 0));
    expect_eq(&boot, "v4 install slot", &report["slot"], "A");
    // The boot that comes back up also starts scenario 5: installing v5 (full
    // artifact) into A, with the power cut early in the install.
    let mut cut_early = |line: &str| {
        line.strip_prefix("2| ")
            .and_then(written)
            .is_some_and(|w| w >= 2 * image::MIB)
    };
    let boots = boot_until_up(
        &mut m,
        "4: trial of v4; 5: install v5, power cut early",
        &[STATUS, &install_watched("v5")],
        10,
        &mut cut_early,
    );
    let up = boots.last().expect("a boot");
    if boots.len() < 2 {
        up.fail("v4's trial should have panicked at least once");
    }
    for b in &boots[..boots.len() - 1] {
        if !b.shows("shoal: booting slot A") {
            b.fail("GRUB (Shoal's fragment) should have booted v4's trial slot A");
        }
        if b.step("boot-check").is_some() || !b.shows("@@panic") {
            b.fail("the trial boot of v4 should have panicked before any userspace of Shoal ran");
        }
    }
    if !up.shows("shoal: booting slot B") {
        up.fail("GRUB (Shoal's fragment) should have fallen back to slot B by itself");
    }
    up.expect_booted("B", "v2");
    let check = boot_check(up);
    if check["result"].as_str() != Some("rolled-back") {
        up.fail(&format!(
            "boot-check should record the failed trial: {check:#}"
        ));
    }
    let status = json_of(up, &up.expect_step("1", 0));
    expect_eq(up, "last result", &status["last"]["result"], "rolled-back");
    expect_eq(up, "last release", &status["last"]["version"], "4.0.0");
    eprintln!(
        "qemu: scenario 4 passed ({} panicking boot(s), then GRUB fell back to B)",
        boots.len() - 1
    );

    // 5. Power cuts while installing v5.
    let up = boots.into_iter().last().expect("a boot");
    expect_cut(&up, "early");
    let mut journal = 0;
    let mut cut_midway = |line: &str| {
        line.strip_prefix("2| ")
            .and_then(written)
            .is_some_and(|w| w >= 40 * image::MIB)
    };
    let boot = m.boot(
        Run::new(
            "5: rerun, power cut midway",
            &[STATUS, &install_watched("v5")],
        )
        .cut_power_when(&mut cut_midway),
    );
    journal = after_cut(&boot, journal, "early");
    expect_cut(&boot, "midway");
    // Shoal logs "verifying slot A" as it starts re-reading the written slot;
    // the cut lands while the verification runs.
    let mut cut_verifying = |line: &str| {
        line.strip_prefix("2| ")
            .is_some_and(|out| out.contains("verifying slot"))
    };
    let boot = m.boot(
        Run::new(
            "5: rerun, power cut during verification",
            &[STATUS, &install_watched("v5")],
        )
        .cut_power_when(&mut cut_verifying),
    );
    journal = after_cut(&boot, journal, "midway");
    expect_cut(&boot, "during verification");
    let mut cut_armed = |line: &str| {
        line.strip_prefix("2| ")
            .is_some_and(|out| out.contains("armed for a trial boot"))
    };
    let boot = m.boot(
        Run::new(
            "5: rerun, power cut right after arming",
            &[STATUS, &install_watched("v5")],
        )
        .cut_power_when(&mut cut_armed),
    );
    after_cut(&boot, journal, "during verification");
    expect_cut(&boot, "right after arming");
    // The trial was armed: the machine boots the verified v5 as a trial and commits.
    let boot = m.boot(Run::new("5: the armed trial of v5 commits", &[STATUS]));
    boot.expect_booted("A", "v5");
    expect_eq(
        &boot,
        "boot-check",
        &boot_check(&boot)["result"],
        "committed",
    );
    let status = json_of(&boot, &boot.expect_step("1", 0));
    expect_status(&boot, &status, "A", "5.0.0");
    expect_eq(&boot, "last result", &status["last"]["result"], "committed");
    eprintln!("qemu: scenario 5 passed (4 power cuts, v5 committed)");

    eprintln!(
        "qemu: all scenarios passed in {:.1} s ({:.1} s building, {} boots, {:.1} s in QEMU)",
        started.elapsed().as_secs_f64(),
        built.as_secs_f64(),
        m.boots(),
        m.qemu_time.as_secs_f64()
    );
}

/// Asserts `boot` ended in a power cut during the install step.
#[track_caller]
fn expect_cut(boot: &Boot, when: &str) {
    if boot.end != End::PowerCut {
        boot.fail(&format!(
            "the power was to be cut {when} in the install, but the boot ended by itself"
        ));
    }
    if boot.step("2").is_none_or(|s| s.rc.is_some()) {
        boot.fail(&format!(
            "the power cut ({when}) did not hit the running install"
        ));
    }
    eprintln!("qemu:   power cut {when}");
}

/// After a power cut `when`: the machine booted the committed slot (B, v2), Shoal
/// knows an install is unfinished, and its journal did not go backwards. Returns
/// the journal's bytes.
#[track_caller]
fn after_cut(boot: &Boot, journal_before: u64, when: &str) -> u64 {
    boot.expect_booted("B", "v2");
    let check = boot_check(boot);
    let result = check["result"].as_str().unwrap_or_default();
    if !matches!(result, "install-unfinished" | "nothing") {
        boot.fail(&format!(
            "after a power cut {when}, boot-check should find the install unfinished: {check:#}"
        ));
    }
    let status = json_of(boot, &boot.expect_step("1", 0));
    let deployment = &status["deployment"];
    expect_eq(boot, "deployment slot", &deployment["slot"], "A");
    expect_eq(boot, "deployment version", &deployment["version"], "5.0.0");
    let journal = deployment["journal_bytes"].as_u64().unwrap_or(0);
    if when != "early" && journal == 0 {
        boot.fail(&format!(
            "the journal kept nothing of the work done before the power cut {when}: {status:#}"
        ));
    }
    if journal < journal_before {
        boot.fail(&format!(
            "the journal went backwards after the power cut {when}: {journal} < {journal_before}"
        ));
    }
    // The rerun in this boot (step 2) resumes from the journal.
    let rerun = boot.step("2").unwrap_or_default().text();
    let resumed = rerun
        .split("bytes already done")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .and_then(|n| n.trim().parse::<u64>().ok());
    if resumed != Some(journal) {
        boot.fail(&format!(
            "the rerun should resume from the journal's {journal} bytes, it reported {resumed:?}"
        ));
    }
    eprintln!(
        "qemu:   after the cut {when}: booted B, journal {journal} of {} bytes, phase {}",
        deployment["total_bytes"], deployment["phase"]
    );
    journal
}
