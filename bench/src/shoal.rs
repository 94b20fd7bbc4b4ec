//! The `shoal` command lines the bench runs, in one place, so a change of the CLI is
//! a change here only.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::measure::{self, Cmd};
use crate::{Ctx, progress, work_path};

/// Release name, device type, and the per-image version and security counter used for
/// every artifact the bench builds.
pub const NAME: &str = "bench-os";
/// Device type written into every artifact.
pub const DEVICE_TYPE: &str = "bench-board";

/// A release the bench builds: which image, which version.
#[derive(Debug, Clone, Copy)]
pub struct Release<'a> {
    /// The payload image.
    pub image: &'a Path,
    /// Release version.
    pub version: &'a str,
    /// Anti-rollback security counter.
    pub counter: u64,
}

/// The `shoal` binary with a release key and a trust root made for this run.
#[derive(Debug)]
pub struct Shoal {
    bin: PathBuf,
    key: PathBuf,
    root: PathBuf,
}

impl Shoal {
    /// Checks that the binary has the artifact commands, then makes a key and a root.
    /// `Err` holds the reason the Shoal side of the artifact goals cannot run.
    pub fn setup(ctx: &Ctx) -> Result<Self, String> {
        let bin = ctx.shoal.clone();
        if !bin.is_file() {
            return Err(format!(
                "{} not found; run `cargo build --release -p shoal-node`",
                bin.display()
            ));
        }
        for sub in [
            ["key", "generate"],
            ["root", "init"],
            ["artifact", "build"],
            ["artifact", "verify"],
            ["artifact", "diff"],
        ] {
            if !Cmd::new(&bin).args(sub).arg("--help").succeeds() {
                return Err(format!("this shoal build has no `shoal {}`", sub.join(" ")));
            }
        }
        let shoal = Self {
            key: work_path(ctx, "release.pem"),
            root: work_path(ctx, "root.shoalroot"),
            bin,
        };
        shoal.make_key_and_root(ctx).map_err(|e| format!("{e:#}"))?;
        Ok(shoal)
    }

    fn make_key_and_root(&self, ctx: &Ctx) -> Result<()> {
        progress("making a release key and a trust root");
        let root_key = work_path(ctx, "root.pem");
        for key in [&root_key, &self.key] {
            measure::remove_any(key)?;
            measure::remove_any(&pub_path(key))?;
            self.cmd()
                .args(["key", "generate", "--out"])
                .arg(key)
                .run_plain()?;
        }
        measure::remove_any(&self.root)?;
        self.cmd()
            .args(["root", "init", "--root-key"])
            .arg(pub_path(&root_key))
            .arg("--release-key")
            .arg(pub_path(&self.key))
            .arg("--sign")
            .arg(&root_key)
            .arg("--out")
            .arg(&self.root)
            .run_plain()?;
        Ok(())
    }

    /// The binary with no arguments.
    pub fn cmd(&self) -> Cmd {
        Cmd::new(&self.bin)
    }

    /// The trust root file made for this run.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `shoal artifact build` of `release` into `out`; `fast` selects `--fast`, `base`
    /// makes a thin artifact.
    pub fn build(&self, release: Release<'_>, out: &Path, fast: bool, base: Option<&Path>) -> Cmd {
        let mut cmd = self
            .cmd()
            .args(["--quiet", "artifact", "build", "--image"])
            .arg(release.image)
            .args(["--name", NAME, "--version", release.version])
            .args(["--device-type", DEVICE_TYPE, "--security-counter"])
            .arg(release.counter.to_string())
            .arg("--key")
            .arg(&self.key);
        if fast {
            cmd = cmd.arg("--fast");
        }
        if let Some(base) = base {
            cmd = cmd.arg("--base").arg(base);
        }
        cmd.arg("--out").arg(out)
    }

    /// `shoal artifact build --base BASE --base-image BASE_IMAGE` of `release`: a
    /// thin artifact whose new chunks are delta-encoded against the base's bytes.
    pub fn build_delta(
        &self,
        release: Release<'_>,
        out: &Path,
        base: &Path,
        base_image: &Path,
    ) -> Cmd {
        self.build(release, out, false, Some(base))
            .arg("--base-image")
            .arg(base_image)
    }

    /// `shoal artifact verify ART --root ROOT`.
    pub fn verify(&self, artifact: &Path) -> Cmd {
        self.cmd()
            .args(["--quiet", "artifact", "verify"])
            .arg(artifact)
            .arg("--root")
            .arg(&self.root)
    }

    /// `shoal artifact diff OLD NEW --json`.
    pub fn diff(&self, old: &Path, new: &Path) -> Cmd {
        self.cmd()
            .args(["--quiet", "artifact", "diff"])
            .arg(old)
            .arg(new)
            .arg("--json")
    }
}

/// The public key file `shoal key generate --out KEY` writes next to KEY.
fn pub_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// A number field of `shoal artifact diff --json` output.
pub fn parse_diff_field(stdout: &[u8], key: &str) -> Result<u64> {
    let v: serde_json::Value =
        serde_json::from_slice(stdout).context("`shoal artifact diff --json` printed no JSON")?;
    v.get(key)
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("`shoal artifact diff --json` has no number {key:?}: {v}"))
}

/// The download size in bytes from `shoal artifact diff --json` output.
pub fn parse_diff_download_bytes(stdout: &[u8]) -> Result<u64> {
    let v: serde_json::Value =
        serde_json::from_slice(stdout).context("`shoal artifact diff --json` printed no JSON")?;
    const KEYS: [&str; 1] = ["download_bytes"];
    for key in KEYS {
        if let Some(n) = v.get(key).and_then(serde_json::Value::as_u64) {
            return Ok(n);
        }
    }
    bail!("`shoal artifact diff --json` output has none of the fields {KEYS:?}: {v}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_json_is_parsed_and_missing_field_is_an_error() {
        assert_eq!(
            parse_diff_download_bytes(br#"{"download_bytes": 1234, "chunks": 3}"#).unwrap(),
            1234
        );
        assert!(parse_diff_download_bytes(br#"{"bytes": 1}"#).is_err());
        assert!(parse_diff_download_bytes(b"not json").is_err());
    }

    #[test]
    fn public_key_path_appends_pub() {
        assert_eq!(
            pub_path(Path::new("/w/release.pem")),
            Path::new("/w/release.pem.pub")
        );
    }
}
