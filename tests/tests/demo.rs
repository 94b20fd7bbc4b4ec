//! `shoal demo` runs end to end and leaves nothing behind.

use shoal_tests::shoal;

#[test]
fn demo_installs_commits_delta_and_rolls_back_then_cleans_up() {
    let out = shoal()
        .args(["demo", "--size-mib", "8"])
        .output()
        .expect("run shoal demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status.code()
    );

    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Shoal demo in "))
        .and_then(|l| l.strip_suffix(" (removed at the end)"))
        .unwrap_or_else(|| panic!("no demo directory line in:\n{stdout}"));
    assert!(!std::path::Path::new(dir).exists(), "{dir} was left behind");

    for expected in [
        "so acme-os 1.0 on slot B is committed",
        "Installed 2.0 as a delta, from its thin artifact",
        "so acme-os 2.0 on slot A is committed",
        "health check 20-app exited with status 1: acme-app is not answering on port 8080",
        "so it rolled acme-os 3.0 back",
        "The device runs acme-os 2.0 on slot A again",
        "the anti-rollback floor is 2",
        "nothing was left behind",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // The delta reused most of the image from the running slot.
    let delta = stdout
        .lines()
        .skip_while(|l| !l.contains("Installed 2.0 as a delta"))
        .nth(1)
        .unwrap_or_else(|| panic!("no delta line in:\n{stdout}"));
    let reused: f64 = delta
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no reused MiB in {delta:?}"));
    assert!(reused > 6.0, "reused {reused} MiB of 8: {delta}");
}
