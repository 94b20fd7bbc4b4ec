//! `shoal demo`: Shoal end to end on a simulated device, in a temporary directory.
//!
//! Everything runs in this process through the same library code the real commands
//! use: keys and a trust root, artifacts built from generated images, a device whose
//! slots are files and whose bootloader is bootctl's file environment, with reboots
//! simulated by bootctl's bootloader model.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use shoal_artifact::chunk::{CHUNKING_DEFAULT, ZSTD_LEVEL_FAST};
use shoal_artifact::{BuildOptions, Manifest, PayloadKind};
use shoal_bootctl::Slot;
use shoal_bootctl::env::Env;
use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::model::{Bootloader, boot_env};
use shoal_bootctl::scheme::{Flavor, Scheme};
use shoal_signing::{SecretKey, SignedRoot, TrustRoot};

use crate::cmd::Ui;
use crate::config::Config;
use crate::device::{BootCheck, Device, InstallReport, Reboot, Source};

/// Show Shoal end to end on a simulated device in a temporary directory.
///
/// Builds releases 1.0, 2.0 and 3.0 of a made-up OS from generated images, makes a
/// signing key and a trust root, sets up a device whose slots are files, installs
/// 1.0, reboots into it and commits it after its health checks pass, installs 2.0 as
/// a delta (reusing what the running slot has), then 3.0, whose health check fails so
/// it is rolled back. Leaves nothing behind.
///
/// Example: `shoal demo`
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the generated root filesystem images, in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(4..=1024))]
    pub size_mib: u64,
}

/// A deterministic generator for the demo images (SplitMix64).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Bytes that look a little like a filesystem: text-ish runs, random runs, zeros.
    fn fill(&mut self, out: &mut [u8]) {
        const WORDS: &[&str] = &[
            "lib", "usr", "bin", "etc", "config", "shoal", "kernel", "module", "=", "\n", " ",
        ];
        let mut i = 0;
        while i < out.len() {
            let kind = self.next() % 4;
            let len = (4096 + (self.next() % 65536) as usize).min(out.len() - i);
            match kind {
                0 => out[i..i + len].fill(0),
                1 => {
                    for b in &mut out[i..i + len] {
                        *b = self.next() as u8;
                    }
                }
                _ => {
                    let mut j = i;
                    while j < i + len {
                        let w = WORDS[(self.next() % WORDS.len() as u64) as usize].as_bytes();
                        let n = w.len().min(i + len - j);
                        out[j..j + n].copy_from_slice(&w[..n]);
                        j += n;
                    }
                }
            }
            i += len;
        }
    }
}

/// Rewrites `fraction` of `image` (in a few stretches) with new content.
fn change(image: &[u8], seed: u64, fraction: f64) -> Vec<u8> {
    let mut out = image.to_vec();
    let mut g = Gen(seed);
    let stretches = 4;
    let len = ((image.len() as f64 * fraction) as usize / stretches).max(1);
    for _ in 0..stretches {
        let at = (g.next() as usize) % (image.len() - len);
        g.fill(&mut out[at..at + len]);
    }
    out
}

struct Demo<'a> {
    dir: PathBuf,
    key: SecretKey,
    ui: &'a Ui,
    step: u32,
}

impl Demo<'_> {
    fn say(&mut self, text: impl std::fmt::Display) {
        self.step += 1;
        outln!("{:>2}. {text}", self.step);
    }

    fn detail(&self, text: impl std::fmt::Display) {
        outln!("    {text}");
    }

    fn build(
        &self,
        image: &[u8],
        version: &str,
        counter: u64,
        base: Option<&Manifest>,
    ) -> anyhow::Result<(PathBuf, Manifest, u64)> {
        let name = if base.is_some() {
            format!("acme-os-{version}-thin.shoal")
        } else {
            format!("acme-os-{version}.shoal")
        };
        let path = self.dir.join(&name);
        let opts = BuildOptions {
            name: "acme-os".into(),
            version: version.into(),
            device_types: vec!["demo-board".into()],
            security_counter: counter,
            provides: BTreeMap::from([("rootfs-image.version".to_string(), version.to_string())]),
            depends: BTreeMap::new(),
            payload_name: "rootfs".into(),
            payload_kind: PayloadKind::RootfsImage,
            chunking: CHUNKING_DEFAULT,
            zstd_level: ZSTD_LEVEL_FAST,
            pack_bytes: shoal_artifact::write::PACK_BYTES_DEFAULT,
            dictionary: false,
            manifest_delta: false,
        };
        let out = BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        let bar = self.ui.progress(image.len() as u64, "building", false);
        let report = shoal_artifact::build(
            std::io::Cursor::new(image),
            &opts,
            std::slice::from_ref(&self.key),
            base,
            &self.dir,
            out,
            |n| bar.inc(n),
        )
        .with_context(|| format!("building {name}"))?;
        bar.finish_and_clear();
        Ok((path, report.manifest, report.artifact_len))
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn write_check(dir: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Boots the simulated device: the bootloader model reads the file environment,
/// picks a slot (consuming a trial) and records it, as a real bootloader script does.
fn simulated_boot(env_path: &Path) -> anyhow::Result<Slot> {
    let mut env =
        FileEnv::open(env_path, true).context("opening the simulated bootloader environment")?;
    let boot = boot_env(&mut env, &Bootloader::new(Scheme::Shoal, Flavor::File))
        .context("simulating the bootloader")?;
    Ok(boot.slot)
}

/// Runs `shoal demo`.
pub fn run(args: Args, ui: &Ui) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("shoal-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let dir = tmp.path().to_path_buf();
    outln!("Shoal demo in {} (removed at the end)\n", dir.display());
    let result = demo(&dir, args.size_mib, ui);
    let shown = dir.display().to_string();
    tmp.close().with_context(|| format!("removing {shown}"))?;
    result?;
    outln!("\nRemoved {shown}; nothing was left behind.");
    Ok(())
}

fn demo(dir: &Path, size_mib: u64, ui: &Ui) -> anyhow::Result<()> {
    let size = usize::try_from(size_mib * 1024 * 1024).context("image size")?;
    let key = SecretKey::generate().context("generating a key")?;
    let mut d = Demo {
        dir: dir.to_path_buf(),
        key,
        ui,
        step: 0,
    };

    // Keys and trust root.
    let now = crate::cmd::root::now_unix_s()?;
    let root = TrustRoot::new(
        1,
        now + 365 * 86400,
        &[d.key.public()],
        1,
        &[d.key.public()],
        1,
    )
    .context("making the trust root")?;
    let mut signed = SignedRoot::new(root);
    signed.envelope.sign(&d.key);
    let root_path = dir.join("root.shoalroot");
    signed.save(&root_path).context("saving the trust root")?;
    d.say(format!(
        "Made a signing key ({}) and a trust root that trusts it for releases: {}",
        d.key.id().short(),
        root_path.display()
    ));

    // Images and artifacts.
    let mut factory = vec![0u8; size];
    Gen(1).fill(&mut factory);
    let v1 = change(&factory, 2, 0.30);
    let v2 = change(&v1, 3, 0.06);
    let v3 = change(&v2, 4, 0.02);
    let (v1_path, v1_manifest, v1_len) = d.build(&v1, "1.0", 1, None)?;
    let (v2_path, _, v2_len) = d.build(&v2, "2.0", 2, Some(&v1_manifest))?;
    let (v3_path, _, v3_len) = d.build(&v3, "3.0", 3, None)?;
    d.say(format!(
        "Built three releases of acme-os from generated {size_mib} MiB root filesystem images:"
    ));
    d.detail(format!(
        "1.0: {} ({}), a full artifact",
        v1_path.display(),
        mib(v1_len)
    ));
    d.detail(format!(
        "2.0: {} ({}), a thin artifact: only the chunks 1.0 lacks",
        v2_path.display(),
        mib(v2_len)
    ));
    d.detail(format!(
        "3.0: {} ({}), a full artifact",
        v3_path.display(),
        mib(v3_len)
    ));

    // The device.
    let slot_size = size as u64 + size as u64 / 4;
    let a = dir.join("slot-a.img");
    let b = dir.join("slot-b.img");
    let mut fa = factory.clone();
    fa.resize(slot_size as usize, 0);
    std::fs::write(&a, &fa).context("writing slot A")?;
    std::fs::File::create(&b)?.set_len(slot_size)?;
    drop(fa);
    let env_path = dir.join("bootenv");
    let mut env = FileEnv::open(&env_path, true)?;
    env.store(&Scheme::Shoal.initial(Flavor::File, Slot::A))
        .context("provisioning the bootloader environment")?;
    let health = dir.join("health.d");
    std::fs::create_dir_all(&health)?;
    write_check(
        &health,
        "10-system",
        "# the system came up far enough to run this\nexit 0",
    )?;
    let config_path = dir.join("shoal.toml");
    let config_text = format!(
        r#"[device]
type = "demo-board"
data_dir = "{data}"
trust_root = "{root}"
reboot_command = []

[health]
dir = "{health}"
timeout_s = 10

[slots]
a = {{ path = "{a}" }}
b = {{ path = "{b}" }}

[slots.detect]
from = "bootloader"

[bootloader]
type = "file"
path = "{env}"
"#,
        data = dir.join("data").display(),
        root = root_path.display(),
        health = health.display(),
        a = a.display(),
        b = b.display(),
        env = env_path.display(),
    );
    std::fs::write(&config_path, &config_text)?;
    let config = Config::load(&config_path)?;
    d.say(format!(
        "Set up a device (type demo-board): slots A and B are {} files, the bootloader is a file environment, \
         and slot A runs a factory image Shoal did not install",
        mib(slot_size)
    ));

    let boot_path = env_path.clone();
    let reboot = Reboot::Hook(Box::new(move || {
        let slot = simulated_boot(&boot_path)?;
        outln!("    (rebooted: the bootloader started slot {slot})");
        Ok(())
    }));
    let mut dev = Device::open(config, reboot)?;

    // 1.0
    let r = install(&mut dev, &v1_path, ui)?;
    d.say(format!(
        "Installed 1.0 from {}:",
        v1_path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    d.detail(format!(
        "the first run indexed the factory image in slot A; {} of {} were reused from it, {} came from the artifact",
        mib(r.reused_bytes),
        mib(r.total_bytes),
        mib(r.fetched_bytes)
    ));
    d.detail(format!(
        "slot {} was read back and verified, and a trial boot of it armed",
        r.slot
    ));
    reboot_and_check(&mut d, &env_path, &mut dev, "1.0")?;

    // 2.0
    let r = install(&mut dev, &v2_path, ui)?;
    d.say("Installed 2.0 as a delta, from its thin artifact:");
    d.detail(format!(
        "{} of {} reused from the running slot, only {} from the artifact ({} read)",
        mib(r.reused_bytes),
        mib(r.total_bytes),
        mib(r.fetched_bytes),
        mib(r.source_bytes_read)
    ));
    reboot_and_check(&mut d, &env_path, &mut dev, "2.0")?;

    // 3.0
    let r = install(&mut dev, &v3_path, ui)?;
    d.say(format!(
        "Installed 3.0 into slot {} ({} reused, {} from the artifact)",
        r.slot,
        mib(r.reused_bytes),
        mib(r.fetched_bytes)
    ));
    write_check(
        &health,
        "20-app",
        "echo 'acme-app is not answering on port 8080' >&2\nexit 1",
    )?;
    d.detail("3.0 has a bug: its app does not start, so its health check 20-app will fail");
    let slot = simulated_boot(&env_path)?;
    d.say(format!(
        "Rebooted: the bootloader tried slot {slot} once (a trial boot)"
    ));
    match dev.boot_check()? {
        BootCheck::RolledBack {
            release, reason, ..
        } => {
            d.say(format!("boot-check ran the health checks: {reason}"));
            d.detail(format!(
                "so it rolled {release} back: the bootloader points at the previous slot again"
            ));
        }
        other => bail!("expected 3.0 to be rolled back, boot-check said {other:?}"),
    }
    match dev.boot_check()? {
        BootCheck::Nothing => {}
        other => bail!("expected a plain boot after the rollback, boot-check said {other:?}"),
    }
    let (status, boot) = dev.status()?;
    let running = status.releases[shoal_engine::slot_index(status.active)]
        .as_ref()
        .map_or_else(|| "nothing known".to_string(), ToString::to_string);
    if running != "acme-os 2.0" {
        bail!("expected the device to run acme-os 2.0 after the rollback, it runs {running}");
    }
    d.say(format!(
        "The device runs {running} on slot {} again ({}); the anti-rollback floor is {}",
        status.active, boot.summary, status.floor
    ));
    if let Some(last) = &status.last
        && let shoal_engine::Verdict::RolledBack { reason } = &last.verdict
    {
        d.detail(format!(
            "`shoal status` keeps the last result: {} rolled back ({reason})",
            last.release
        ));
    }
    Ok(())
}

fn install(dev: &mut Device, path: &Path, ui: &Ui) -> anyhow::Result<InstallReport> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let source = Source::Artifact {
        name: path.display().to_string(),
        reader: crate::device::ArtifactInput::File(file),
    };
    crate::cmd::install::install(dev, source, false, false, ui)
}

fn reboot_and_check(
    d: &mut Demo<'_>,
    env_path: &Path,
    dev: &mut Device,
    version: &str,
) -> anyhow::Result<()> {
    let slot = simulated_boot(env_path)?;
    d.say(format!(
        "Rebooted: the bootloader tried slot {slot} once (a trial boot)"
    ));
    match dev.boot_check()? {
        BootCheck::Committed { release, slot } => {
            d.say(format!("boot-check ran the health checks: all passed, so {release} on slot {slot} is committed"));
        }
        other => bail!("expected {version} to be committed, boot-check said {other:?}"),
    }
    Ok(())
}
