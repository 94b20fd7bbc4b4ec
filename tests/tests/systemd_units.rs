//! The systemd units in `node/systemd/` (server, daemon, boot-check): each passes
//! `systemd-analyze verify` with no warning (an unknown key, section or a
//! command that is not executable is reported), and every option its `ExecStart`
//! passes to `shoal` is one the built binary's subcommand takes.

use std::path::{Path, PathBuf};
use std::process::Command;

use shoal_tests::{shoal, shoal_bin};

const UNITS: &[&str] = &[
    "shoal-server.service",
    "shoal-daemon.service",
    "shoal-boot-check.service",
];

fn unit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../node/systemd")
}

/// The unit's `ExecStart` arguments after `/usr/bin/shoal`.
fn exec_args(unit: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("/usr/bin/shoal"), "{line}");
    words.map(str::to_owned).collect()
}

#[test]
fn units_verify_and_pass_options_shoal_takes() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze is not installed: apt-get install systemd"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    for name in UNITS {
        let text = std::fs::read_to_string(unit_dir().join(name)).expect("unit file");
        // The unit names /usr/bin/shoal; verify it against the binary just built.
        let local = text.replace("/usr/bin/shoal", shoal_bin().to_str().expect("utf-8 path"));
        let path = dir.path().join(name);
        std::fs::write(&path, local).expect("write unit");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("running systemd-analyze");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        assert!(
            stderr.trim().is_empty(),
            "{name}: systemd-analyze warns: {stderr}"
        );

        let args = exec_args(&text);
        let subcommand = &args[0];
        let help = shoal()
            .args([subcommand.as_str(), "--help"])
            .output()
            .expect("running shoal");
        assert!(help.status.success(), "shoal {subcommand} --help failed");
        let help = String::from_utf8_lossy(&help.stdout);
        for option in args.iter().filter(|a| a.starts_with("--")) {
            // The option as a whole word of the help (`--data` is not `--database`).
            let named = help.match_indices(option.as_str()).any(|(i, _)| {
                help[i + option.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            });
            assert!(named, "{name}: shoal {subcommand} takes no {option}");
        }
    }
}

/// The check above must notice a broken unit: a misspelt key is a warning, which
/// the test counts as a failure.
#[test]
fn a_misspelt_key_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(unit_dir().join("shoal-server.service")).expect("unit");
    let broken = text
        .replace("/usr/bin/shoal", shoal_bin().to_str().expect("utf-8 path"))
        .replace("Type=exec", "Typ=exec");
    let path = dir.path().join("shoal-server.service");
    std::fs::write(&path, broken).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("running systemd-analyze (apt-get install systemd)");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unknown key 'Typ'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
