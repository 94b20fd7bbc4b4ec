//! Inventory scripts: the executables of `server.inventory_dir`, run in name order,
//! each printing `key=value` lines (as Mender's `mender-inventory-*`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tracing::warn;

/// How long one script may run.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes of a script's output read.
const OUTPUT_MAX: u64 = 64 * 1024;

/// Runs every script; a script that fails or times out is logged and skipped.
/// A later script's value for a key replaces an earlier one's.
pub fn collect(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let scripts = match crate::device::health::checks(dir) {
        Ok(s) => s,
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot list inventory scripts");
            return out;
        }
    };
    for script in scripts {
        match run(&script) {
            Ok(text) => out.extend(parse(&text)),
            Err(e) => warn!(script = %script.display(), error = %e, "inventory script failed"),
        }
    }
    out
}

fn run(path: &Path) -> Result<String, String> {
    let mut child = Command::new(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    let mut stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.take(OUTPUT_MAX).read_to_end(&mut buf);
        }
        buf
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() >= SCRIPT_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {} s", SCRIPT_TIMEOUT.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(format!("exited with {status}"));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `key=value` lines; blank lines, lines without `=` and empty keys are skipped.
pub fn parse(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_key_value_lines() {
        assert_eq!(
            parse("a=1\n\nnoise\n b = two words \n=x\nc=d=e\n"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "two words".into()),
                ("c".into(), "d=e".into()),
            ]
        );
    }

    #[test]
    fn runs_scripts_in_order_and_skips_failures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        };
        script("10-hw", "echo cpu=arm64; echo ram=512");
        script("20-bad", "echo ram=0; exit 1");
        script("30-net", "echo ram=1024");
        let got = collect(dir.path());
        assert_eq!(got["cpu"], "arm64");
        assert_eq!(got["ram"], "1024");
        assert_eq!(got.len(), 2);
    }
}
