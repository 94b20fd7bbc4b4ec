//! `shoal root`: make, rotate, co-sign and inspect trust roots.

use std::path::{Path, PathBuf};

use anyhow::Context;
#[cfg(feature = "host")]
use anyhow::bail;
use serde::Serialize;
#[cfg(feature = "host")]
use shoal_signing::{PublicKey, SecretKey, TrustRoot};
use shoal_signing::{SignedRoot, VerifyError};

use crate::cmd::{Exit, Ui};

/// `shoal root` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    #[cfg(feature = "host")]
    /// Make a new signed trust root (version 1 unless --version).
    #[command(verbatim_doc_comment)]
    ///
    /// Example:
    ///   shoal root init --root-key root.pem.pub --release-key release.pem.pub \
    ///       --sign root.pem --out root.shoalroot
    Init {
        #[command(flatten)]
        keys: RootKeys,
        /// The root's version (1 or more).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        version: u64,
        #[command(flatten)]
        out: SignAndWrite,
    },
    #[cfg(feature = "host")]
    /// Make the next trust root, to be signed by a threshold of the current root's root
    /// keys and of the new root's own root keys. Its version is the current one plus 1.
    #[command(verbatim_doc_comment)]
    ///
    /// Example:
    ///   shoal root rotate --current root.shoalroot --root-key new-root.pem.pub \
    ///       --release-key release.pem.pub --sign root.pem --sign new-root.pem --out root-v2.shoalroot
    Rotate {
        /// The currently trusted signed root.
        #[arg(long)]
        current: PathBuf,
        #[command(flatten)]
        keys: RootKeys,
        #[command(flatten)]
        out: SignAndWrite,
    },
    #[cfg(feature = "host")]
    /// Add signatures to a root file in place (threshold signing by several holders).
    ///
    /// Example: shoal root sign root-v2.shoalroot --key other-root.pem
    Sign {
        /// The signed root file to add signatures to.
        file: PathBuf,
        /// Private keys to sign with (repeatable).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
    },
    /// Show a root: version, expiry, keys, roles, and whether its signatures suffice.
    ///
    /// Example: shoal root inspect root-v2.shoalroot --trusted root.shoalroot --json
    Inspect {
        /// The signed root file.
        file: PathBuf,
        /// Also check that a device trusting this root would accept FILE as a rotation.
        #[arg(long)]
        trusted: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[cfg(feature = "host")]
/// The keys and thresholds of a root.
#[derive(Debug, clap::Args)]
pub struct RootKeys {
    /// Public key (SPKI PEM) allowed to sign new roots (repeatable).
    #[arg(long = "root-key", required = true)]
    root_keys: Vec<PathBuf>,
    /// How many distinct root keys must sign a new root.
    #[arg(long, default_value_t = 1)]
    root_threshold: u32,
    /// Public key (SPKI PEM) allowed to sign releases (repeatable).
    #[arg(long = "release-key", required = true)]
    release_keys: Vec<PathBuf>,
    /// How many distinct release keys must sign a release.
    #[arg(long, default_value_t = 1)]
    release_threshold: u32,
    /// Public key (SPKI PEM) allowed to sign fleet membership credentials
    /// (repeatable; `shoal key credential`). With one, LAN peers serve only
    /// members of their own fleet; without, any peer.
    #[arg(long = "fleet-key")]
    fleet_keys: Vec<PathBuf>,
    /// How many distinct fleet keys must sign a credential.
    #[arg(long, default_value_t = 1)]
    fleet_threshold: u32,
    /// Days from now until the root expires.
    #[arg(long, default_value_t = 365, conflicts_with = "expires_unix")]
    expires_in_days: u64,
    /// Absolute expiry time, Unix seconds.
    #[arg(long)]
    expires_unix: Option<u64>,
}

#[cfg(feature = "host")]
/// Who signs a new root and where it goes.
#[derive(Debug, clap::Args)]
pub struct SignAndWrite {
    /// Private key to sign the new root with (repeatable). Fewer than the threshold
    /// writes a partially signed root that others complete with `shoal root sign`.
    #[arg(long = "sign")]
    signers: Vec<PathBuf>,
    /// Where to write the signed root.
    #[arg(long)]
    out: PathBuf,
}

/// Runs a `shoal root` subcommand.
pub fn run(command: Command, ui: &Ui) -> anyhow::Result<()> {
    #[cfg(not(feature = "host"))]
    let _ = ui;
    match command {
        #[cfg(feature = "host")]
        Command::Init { keys, version, out } => {
            let root = keys.build(version)?;
            write_signed(SignedRoot::new(root), &out, None, ui)
        }
        #[cfg(feature = "host")]
        Command::Rotate { current, keys, out } => {
            let current = load_root(&current)?;
            let version = current.root.version.checked_add(1).ok_or_else(|| {
                anyhow::anyhow!(
                    "the current root has version {}, the last possible one; it cannot be rotated",
                    current.root.version
                )
            })?;
            let root = keys.build(version)?;
            write_signed(SignedRoot::new(root), &out, Some(&current.root), ui)
        }
        #[cfg(feature = "host")]
        Command::Sign { file, keys } => {
            let mut signed = load_root(&file)?;
            for path in &keys {
                signed.envelope.sign(&load_secret(path)?);
            }
            signed.save(&file)?;
            report_self(&signed, ui);
            Ok(())
        }
        Command::Inspect {
            file,
            trusted,
            json,
        } => inspect(&file, trusted.as_deref(), json),
    }
}

#[cfg(feature = "host")]
impl RootKeys {
    fn build(&self, version: u64) -> anyhow::Result<TrustRoot> {
        let load = |paths: &[PathBuf]| -> anyhow::Result<Vec<PublicKey>> {
            paths
                .iter()
                .map(|p| PublicKey::load(p).with_context(|| format!("reading {}", p.display())))
                .collect()
        };
        let expires = match self.expires_unix {
            Some(t) => t,
            None => now_unix_s()?.saturating_add(self.expires_in_days.saturating_mul(86_400)),
        };
        let root = TrustRoot::new(
            version,
            expires,
            &load(&self.root_keys)?,
            self.root_threshold,
            &load(&self.release_keys)?,
            self.release_threshold,
        )
        .map_err(|e| Exit::usage(e.to_string()))?;
        if self.fleet_keys.is_empty() {
            return Ok(root);
        }
        root.with_fleet(&load(&self.fleet_keys)?, self.fleet_threshold)
            .map_err(|e| Exit::usage(e.to_string()))
    }
}

#[cfg(feature = "host")]
fn write_signed(
    mut signed: SignedRoot,
    out: &SignAndWrite,
    current: Option<&TrustRoot>,
    ui: &Ui,
) -> anyhow::Result<()> {
    if out.out.exists() {
        bail!(
            "{} already exists; refusing to overwrite it",
            out.out.display()
        );
    }
    for path in &out.signers {
        signed.envelope.sign(&load_secret(path)?);
    }
    signed.save(&out.out)?;
    ui.info(format!(
        "wrote trust root version {} to {}",
        signed.root.version,
        out.out.display()
    ));
    report_self(&signed, ui);
    if let Some(current) = current {
        match current.rotate(&signed, None) {
            Ok(_) => ui.info(format!(
                "a device trusting version {} accepts this rotation",
                current.version
            )),
            Err(e) => ui.info(format!("not yet acceptable as a rotation: {e}")),
        }
    }
    Ok(())
}

#[cfg(feature = "host")]
fn report_self(signed: &SignedRoot, ui: &Ui) {
    match signed.verify_self(None) {
        Ok(()) => ui.info("signatures: complete (threshold of its own root keys met)"),
        Err(e) => ui.info(format!("signatures: incomplete: {e}")),
    }
}

#[derive(Debug, Serialize)]
struct RootReport {
    version: u64,
    expires_unix_s: u64,
    expired: bool,
    keys: Vec<String>,
    roles: Vec<RoleReport>,
    signatures: Vec<String>,
    /// Whether a threshold of its own root keys signed it.
    self_signed: bool,
    /// Why not, when not.
    self_signed_problem: Option<String>,
    /// With `--trusted`: whether a device trusting that root accepts this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    rotation_accepted: Option<bool>,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    rotation_problem: Option<String>,
}

#[derive(Debug, Serialize)]
struct RoleReport {
    role: String,
    threshold: u32,
    key_ids: Vec<String>,
}

fn inspect(file: &Path, trusted: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let signed = load_root(file)?;
    let now = now_unix_s()?;
    let root = &signed.root;
    let rotation = match trusted {
        Some(p) => Some(
            load_trusted_root(p)?
                .root
                .rotate(&signed, Some(now))
                .map(|_| ())
                .map_err(|e| e.to_string()),
        ),
        None => None,
    };
    let self_check = signed.verify_self(None);
    let report = RootReport {
        version: root.version,
        expires_unix_s: root.expires_unix_s,
        expired: matches!(
            root.check_expiry(Some(now)),
            Err(VerifyError::Expired { .. })
        ),
        keys: root.keys.keys().map(|k| k.to_string()).collect(),
        roles: root
            .roles
            .iter()
            .map(|(name, role)| RoleReport {
                role: name.to_string(),
                threshold: role.threshold,
                key_ids: role.key_ids.iter().map(|k| k.to_string()).collect(),
            })
            .collect(),
        signatures: signed
            .envelope
            .signatures
            .iter()
            .map(|s| s.key_id.to_string())
            .collect(),
        self_signed: self_check.is_ok(),
        self_signed_problem: self_check.err().map(|e| e.to_string()),
        rotation_accepted: rotation.as_ref().map(Result::is_ok),
        rotation_problem: rotation.and_then(Result::err),
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!("trust root version {}", report.version);
        outln!(
            "expires     unix {}{}",
            report.expires_unix_s,
            if report.expired { " (EXPIRED)" } else { "" }
        );
        for role in &report.roles {
            outln!(
                "role {:<8} threshold {} of {}",
                role.role,
                role.threshold,
                role.key_ids.len()
            );
            for id in &role.key_ids {
                outln!("  key {id}");
            }
        }
        outln!("signed by   {} key(s)", report.signatures.len());
        match &report.self_signed_problem {
            None => outln!("own root keys: threshold met"),
            Some(e) => outln!("own root keys: {e}"),
        }
        match (&report.rotation_accepted, &report.rotation_problem) {
            (Some(true), _) => outln!("rotation from trusted root: accepted"),
            (Some(false), Some(e)) => outln!("rotation from trusted root: refused: {e}"),
            _ => {}
        }
    }
    Ok(())
}

/// Loads a signed trust root file with a clear error.
pub fn load_root(path: &Path) -> anyhow::Result<SignedRoot> {
    Ok(SignedRoot::load(path)?)
}

/// Loads a root to trust, checked the way a device checks its trust root: well
/// formed and signed by a threshold of its own root keys. Problems are usage errors
/// (exit code 2), naming the file.
pub fn load_trusted_root(path: &Path) -> anyhow::Result<SignedRoot> {
    let signed = load_root(path).map_err(|e| {
        Exit::usage(format!(
            "trust root {}: {}",
            path.display(),
            crate::cmd::one_line(&e)
        ))
    })?;
    signed.verify_self(None).map_err(|e| {
        Exit::usage(format!(
            "trust root {} is not validly self-signed: {e}",
            path.display()
        ))
    })?;
    Ok(signed)
}

#[cfg(feature = "host")]
fn load_secret(path: &Path) -> anyhow::Result<SecretKey> {
    Ok(SecretKey::load(path)?)
}

/// Wall-clock time in Unix seconds.
pub fn now_unix_s() -> anyhow::Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the system clock is before 1970")?
        .as_secs())
}
