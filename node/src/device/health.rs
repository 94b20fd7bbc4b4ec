//! Health checks: the executables in a directory, run in name order, each with a
//! timeout. All must exit 0 for a trial boot to be committed.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Most bytes of a failing check's stderr quoted in the reason.
const STDERR_TAIL_MAX: usize = 400;

/// The checks in `dir`: regular executable files not starting with `.`, by name.
/// A missing directory holds no checks.
pub fn checks(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        let meta = entry.metadata()?;
        if !hidden && meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Runs every check; `Err` names the first that failed and why.
pub fn run(dir: &Path, timeout: Duration) -> Result<(), String> {
    let list =
        checks(dir).map_err(|e| format!("cannot list health checks in {}: {e}", dir.display()))?;
    for path in list {
        run_one(&path, timeout)?;
    }
    Ok(())
}

fn run_one(path: &Path, timeout: Duration) -> Result<(), String> {
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut child = Command::new(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("health check {name} could not be started: {e}"))?;
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            // Bounded: a chatty check cannot fill our memory.
            let _ = s.take(64 * 1024).read_to_end(&mut buf);
        }
        buf
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "health check {name} timed out after {} s",
                    timeout.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("health check {name}: waiting for it failed: {e}")),
        }
    };
    let err = reader.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&err);
    let text = text.trim();
    let tail: String = if text.len() > STDERR_TAIL_MAX {
        let start = text
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| i >= text.len() - STDERR_TAIL_MAX)
            .unwrap_or(0);
        text[start..].to_string()
    } else {
        text.to_string()
    };
    let how = match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => "was killed by a signal".to_string(),
    };
    if tail.is_empty() {
        Err(format!("health check {name} {how}"))
    } else {
        Err(format!("health check {name} {how}: {tail}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn passing_failing_and_hanging_checks() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            run(&dir.path().join("missing"), Duration::from_secs(1)),
            Ok(())
        );
        script(dir.path(), "10-ok", "exit 0");
        std::fs::write(dir.path().join("README"), "not executable").expect("write");
        assert_eq!(run(dir.path(), Duration::from_secs(5)), Ok(()));
        script(
            dir.path(),
            "20-app",
            "echo 'app not answering on :8080' >&2; exit 3",
        );
        assert_eq!(
            run(dir.path(), Duration::from_secs(5)),
            Err("health check 20-app exited with status 3: app not answering on :8080".into())
        );
        std::fs::remove_file(dir.path().join("20-app")).expect("rm");
        script(dir.path(), "30-slow", "sleep 5");
        let start = Instant::now();
        assert_eq!(
            run(dir.path(), Duration::from_secs(1)),
            Err("health check 30-slow timed out after 1 s".into())
        );
        assert!(start.elapsed() < Duration::from_secs(4));
    }
}
