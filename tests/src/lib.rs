//! Helpers shared by Shoal's black-box integration tests (in `tests/tests/`).
//!
//! The tests run the real `shoal` binary as a separate process. Cargo only tells a
//! package's own integration tests where its binaries are, and `shoal` belongs to
//! `shoal-node`, so [`shoal_bin`] builds it (with the same cargo and profile that
//! built the running test, a no-op when it is up to date) once per test process and
//! returns its path. That keeps `cargo test --workspace` the one test entry point.

pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The path of a freshly built `shoal` binary, with the server role (`--features
/// server`) so the server tests can run `shoal server` and `shoal admin`.
pub fn shoal_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/<test-binary>
        let exe = std::env::current_exe().expect("path of the running test");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binaries live in target/<profile>/deps");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile directory name");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "--quiet",
            "-p",
            "shoal-node",
            "--features",
            // The server role, and LAN peers that misbehave on request (the lan_e2e
            // test's malicious peer; compiled out of device builds).
            "server,test-peer-faults",
            "--bin",
            "shoal",
            "--manifest-path",
        ]);
        build.arg(&manifest);
        match profile {
            "debug" => {}
            "release" => {
                build.arg("--release");
            }
            other => {
                build.args(["--profile", other]);
            }
        }
        let status = build.status().expect("running cargo to build shoal");
        assert!(status.success(), "building the shoal binary failed");
        let bin = profile_dir.join("shoal");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
}

/// A `shoal` command with a clean environment for logging.
pub fn shoal() -> Command {
    let mut cmd = Command::new(shoal_bin());
    cmd.env_remove("SHOAL_LOG");
    cmd
}

/// Runs `shoal ARGS` in `dir` and returns its output.
pub fn run_in(dir: &Path, args: &[&str]) -> Output {
    shoal()
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running shoal")
}

/// Asserts the command succeeded and returns its stdout as text.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "shoal failed with {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Asserts the command failed with `code` and printed exactly one line on stderr;
/// returns that line.
pub fn fails(out: Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit code {code}\nstdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected a one-line reason, got:\n{stderr}");
    lines[0].to_string()
}

/// Every `key=NUMBER` of a daemon's "installed; trial armed" log lines, in order.
pub fn installed_fields(log: &str, key: &str) -> Vec<u64> {
    let prefix = format!("{key}=");
    log.lines()
        .filter(|l| l.contains("installed; trial armed"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&prefix))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

/// The last `key=NUMBER` of a daemon's "installed; trial armed" log lines.
pub fn installed_field(log: &str, key: &str) -> Option<u64> {
    installed_fields(log, key).pop()
}
