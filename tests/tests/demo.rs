//! `shoal demo` runs its whole story with real processes (a server, five daemons)
//! and leaves nothing behind: not when it succeeds, not when it is interrupted.
//!
//! Each run gets a TMPDIR of its own, so "nothing left behind" is checked as that
//! directory being empty afterwards, and no process on the machine may still name
//! the demo's directory on its command line.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shoal_tests::shoal;

/// Processes whose command line names `dir` (the demo's server, daemons, checks).
fn processes_naming(dir: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(dir) {
            found.push(format!("{}: {text}", name.to_string_lossy()));
        }
    }
    found
}

fn demo_dir(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("Shoal demo in "))
        .and_then(|l| l.strip_suffix(" (removed at the end)"))
        .unwrap_or_else(|| panic!("no demo directory line in:\n{stdout}"))
        .to_owned()
}

fn assert_empty(tmpdir: &Path) {
    let left: Vec<_> = std::fs::read_dir(tmpdir)
        .expect("read the test's TMPDIR")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind in TMPDIR: {left:?}");
}

/// The number in `line` right before `unit` (e.g. `"12345 bytes"` → 12345).
fn number_before(line: &str, unit: &str) -> f64 {
    let at = line
        .find(unit)
        .unwrap_or_else(|| panic!("no {unit:?} in {line:?}"));
    line[..at]
        .split([' ', '('])
        .rev()
        .find(|w| !w.is_empty())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number before {unit:?} in {line:?}"))
}

#[test]
fn the_demo_rolls_out_shares_rolls_back_updates_offline_and_leaves_nothing() {
    let tmpdir = tempfile::tempdir().expect("tempdir");
    let out = shoal()
        .args(["demo", "--size-mib", "8"])
        .env("TMPDIR", tmpdir.path())
        .output()
        .expect("run shoal demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status.code()
    );
    let dir = demo_dir(&stdout);
    assert!(dir.starts_with(&*tmpdir.path().to_string_lossy()), "{dir}");
    assert!(!Path::new(&dir).exists(), "{dir} was left behind");
    assert_empty(tmpdir.path());
    assert_eq!(processes_naming(&dir), Vec::<String>::new());

    let has = |expected: &str| {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    };
    // The phased rollout: a canary, then the rest once it succeeded.
    has("phase 1 of 2 opened (the canary): dev-1\n");
    has("phase 2 of 2 opened (the canary succeeded, so the rest): dev-2, dev-3, dev-4, dev-5\n");
    has("dev-1: success: it runs 2.0, committed after its health checks");
    // The old board fails 2.0's health check, rolls back, and the rollout carries on.
    has(
        "dev-5: failure: rolled back: health check 20-sensor exited with status 1: acme-app 2.0 cannot read the rev-A sensor of this board",
    );
    has(
        "The rollout finished: 4 devices run 2.0; dev-5 failed its health check, rolled back to 1.0",
    );
    assert!(
        stdout.find("phase 2 of 2 opened") > stdout.find("dev-1: success"),
        "phase 2 opened before the canary succeeded:\n{stdout}"
    );
    // The uplink carried less than the devices installed: the LAN shared the rest.
    let uplink = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("uplink: "))
        .unwrap_or_else(|| panic!("no uplink line in:\n{stdout}"));
    let uplink_bytes = number_before(uplink, " bytes: chunks");
    let installed_bytes = number_before(uplink, " bytes)");
    assert!(
        uplink_bytes > 0.0 && uplink_bytes < installed_bytes,
        "uplink {uplink_bytes} B, installed {installed_bytes} B: {uplink}"
    );
    let shared = stdout
        .lines()
        .find(|l| l.contains("Chunks shared on the LAN"))
        .unwrap_or_else(|| panic!("no sharing line in:\n{stdout}"));
    let alone = stdout
        .lines()
        .find(|l| l.contains("without the LAN each device would read its own chunks"))
        .unwrap_or_else(|| panic!("no baseline line in:\n{stdout}"));
    let alone_bytes = number_before(alone, " bytes) over the uplink");
    assert!(
        uplink_bytes < alone_bytes,
        "the uplink carried {uplink_bytes} B, as much as {alone_bytes} B without the LAN: {uplink}"
    );
    let peer_share = number_before(shared, "%)");
    assert!(peer_share >= 50.0, "peer share {peer_share}%: {shared}");
    // Offline: the stick in dev-1 updates the site, nothing crosses the uplink.
    has("runs `shoal install ");
    has("the health checks passed, 3.0 is committed and dev-1's daemon serves it to the LAN");
    has(
        "The whole site runs 3.0 with no server: dev-1 from the stick, the other 4 from their LAN peers",
    );
    has(", 0 bytes the uplink)");
    has("3.0 reads its rev-A sensor again");
    // The reports queued offline reached the server once it was back.
    has("dev-1: 3.0 reports: ");
    for n in 2..=5 {
        has(&format!(
            "dev-{n}: 3.0 reports: lan downloading, lan installing, lan rebooting, standalone success\n"
        ));
    }
    let dev1 = stdout
        .lines()
        .find(|l| l.contains("dev-1: 3.0 reports: "))
        .unwrap_or_default();
    assert!(dev1.ends_with("standalone success"), "{dev1}");
    // Every device on 3.0, committed, its slot read back and verified.
    for n in 1..=5 {
        let line = stdout
            .lines()
            .find(|l| {
                l.trim_start()
                    .starts_with(&format!("dev-{n}: acme-os 3.0 on slot "))
            })
            .unwrap_or_else(|| panic!("no final line for dev-{n} in:\n{stdout}"));
        assert!(line.ends_with(", committed, slot verified"), "{line}");
    }
    has("Stopped the server and every daemon the demo started, and removed ");
    has("nothing was left behind");
}

#[test]
fn an_interrupted_demo_stops_its_processes_and_removes_its_directory() {
    let tmpdir = tempfile::tempdir().expect("tempdir");
    let mut child = shoal()
        .args(["demo", "--size-mib", "8"])
        .env("TMPDIR", tmpdir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shoal demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Wait until the server and the five daemons run and the rollout started.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    let dir = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("the rollout never started:\n{}", seen.join("\n")));
        seen.push(line.clone());
        if line.contains("Rolled out acme-os 2.0") {
            break demo_dir(&seen.join("\n"));
        }
    };
    let running = processes_naming(&dir);
    assert!(
        running.len() >= 6,
        "expected the server and five daemons: {running:?}"
    );
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let status = child.wait().expect("wait for the demo");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert_eq!(status.code(), Some(130), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line on stderr: {stderr}");
    assert!(
        stderr.starts_with("shoal: the demo stopped (its ")
            && stderr.trim_end().ends_with(": interrupted"),
        "{stderr}"
    );
    assert!(!Path::new(&dir).exists(), "{dir} was left behind");
    assert_empty(tmpdir.path());
    assert_eq!(processes_naming(&dir), Vec::<String>::new());
}
