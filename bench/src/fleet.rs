//! What the managed-mode sections (`net`, `lan`) set up the same way: commands that
//! must succeed, waiting on a condition, and the keys, trust root and two releases
//! a server is given.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::progress;
use crate::report::{Goal, Quantity, Target};

/// Runs `cmd`; its stdout, or an error with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `cond` every 200 ms until it holds, or fails after `secs`.
pub fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if cond()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("timed out after {secs} s waiting for {what}")
}

/// In `dir`: a root key and a release key and a trust root (`root.shoalroot`)
/// naming them.
pub fn keys_and_root(shoal: &Path, dir: &Path) -> Result<()> {
    let sh = |args: &[&str]| {
        let mut c = Command::new(shoal);
        c.current_dir(dir).args(args);
        c
    };
    run(&mut sh(&["key", "generate", "--out", "rootk.pem"]))?;
    run(&mut sh(&["key", "generate", "--out", "rel.pem"]))?;
    run(&mut sh(&[
        "root",
        "init",
        "--root-key",
        "rootk.pem.pub",
        "--release-key",
        "rel.pem.pub",
        "--release-threshold",
        "1",
        "--sign",
        "rootk.pem",
        "--out",
        "root.shoalroot",
    ]))?;
    Ok(())
}

/// [`keys_and_root`], and `v1.shoal` / `v2.shoal` built from `v1` and `v2` for
/// `device_type` (untimed; `section` names them in the progress lines).
pub fn keys_root_and_releases(
    shoal: &Path,
    dir: &Path,
    v1: &Path,
    v2: &Path,
    device_type: &str,
    section: &str,
) -> Result<()> {
    keys_and_root(shoal, dir)?;
    let sh = |args: &[&str]| {
        let mut c = Command::new(shoal);
        c.current_dir(dir).args(args);
        c
    };
    for (img, v) in [(v1, "1"), (v2, "2")] {
        progress(&format!("{section}: building v{v}.shoal (untimed)"));
        run(sh(&[
            "--quiet",
            "artifact",
            "build",
            "--name",
            "bench-os",
            "--version",
            v,
            "--device-type",
            device_type,
            "--security-counter",
            "1",
            "--key",
            "rel.pem",
            "--out",
            &format!("v{v}.shoal"),
            "--image",
        ])
        .arg(img))?;
    }
    Ok(())
}

/// An admin API token written into the server data dir `data` (created).
pub fn admin_token(shoal: &Path, dir: &Path, data: &Path) -> Result<String> {
    std::fs::create_dir_all(data)?;
    Ok(run(Command::new(shoal)
        .current_dir(dir)
        .args([
            "server", "token", "--name", "bench", "--role", "admin", "--data",
        ])
        .arg(data))?
    .trim()
    .to_owned())
}

/// The URL a `shoal server` logging to `log` says it listens on.
pub fn server_url(log: &Path) -> Result<String> {
    let mut url = String::new();
    wait_until("the server", 60, || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(rest) = text.split("listening on ").nth(1) {
            url = rest.lines().next().unwrap_or_default().trim().to_owned();
        }
        Ok(!url.is_empty())
    })?;
    Ok(url)
}

/// The issue-13 goal on the device build's size: `path` (`--profile device`) at
/// most 6 MiB, or not run when it is not built.
pub fn device_size_goal(name: &str, path: &Path) -> Goal {
    let target = Target::AtMost(Quantity::Mebibytes(6.0));
    match std::fs::metadata(path) {
        Ok(meta) => Goal::absolute(
            name,
            Ok(Quantity::Mebibytes(meta.len() as f64 / 1048576.0)),
            target,
        ),
        Err(e) => Goal::not_run(
            name,
            format!(
                "{}: {e}; cargo build --profile device -p shoal-node --no-default-features",
                path.display()
            ),
            target,
        ),
    }
}
