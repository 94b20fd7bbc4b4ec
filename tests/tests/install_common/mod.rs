//! A file-backed device for the install tests: slot files, the file bootloader
//! (provisioned and "booted" with bootctl's model), a trust root and a signing key made
//! with the real `shoal` binary, and a device configuration.

#![allow(dead_code)] // Each test file uses a different part of this.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use shoal_bootctl::Slot;
use shoal_bootctl::env::Env;
use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::scheme::{BootState, Flavor, Scheme};
use shoal_tests::shoal;

/// Deterministic image bytes: pseudo-random runs mixed with zero runs.
pub fn image(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        let run = 4096 + (next() % 200_000) as usize;
        if next() % 5 == 0 {
            out.resize(out.len() + run, 0);
        } else {
            for _ in 0..run / 8 {
                out.extend_from_slice(&next().to_le_bytes());
            }
        }
    }
    out.truncate(len);
    out
}

/// `image` with `count` stretches of `len` bytes rewritten.
pub fn modify(image: &[u8], seed: u64, count: usize, len: usize) -> Vec<u8> {
    let mut out = image.to_vec();
    let fresh = self::image(seed, count * len);
    for i in 0..count {
        let at = (image.len() / (count + 1)) * (i + 1) - len / 2;
        out[at..at + len].copy_from_slice(&fresh[i * len..(i + 1) * len]);
    }
    out
}

/// A file-backed device in a temporary directory.
pub struct Device {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub key: PathBuf,
    pub root: PathBuf,
    pub slot_size: u64,
}

impl Device {
    /// A device running `image_a` in slot A (not installed by Shoal), slot B zeroed,
    /// each slot `slot_size` bytes; device type `board`.
    pub fn new(image_a: &[u8], slot_size: u64) -> Device {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| dir.path().join(n);
        let key = p("release.pem");
        let root = p("root.shoalroot");
        ok(shoal()
            .args(["key", "generate", "--out"])
            .arg(&key)
            .output()
            .expect("run"));
        ok(shoal()
            .args(["root", "init", "--root-key"])
            .arg(p("release.pem.pub"))
            .arg("--release-key")
            .arg(p("release.pem.pub"))
            .arg("--sign")
            .arg(&key)
            .arg("--out")
            .arg(&root)
            .output()
            .expect("run"));
        let mut a = image_a.to_vec();
        a.resize(usize::try_from(slot_size).expect("fits"), 0);
        std::fs::write(p("a.img"), &a).expect("slot A");
        std::fs::File::create(p("b.img"))
            .and_then(|f| f.set_len(slot_size))
            .expect("slot B");
        let mut env = FileEnv::open(&p("bootenv"), true).expect("env");
        env.store(&Scheme::Shoal.initial(Flavor::File, Slot::A))
            .expect("provision env");
        std::fs::create_dir_all(p("health.d")).expect("health dir");
        let config = p("shoal.toml");
        let dev = Device {
            config,
            key,
            root,
            slot_size,
            dir,
        };
        dev.write_config("");
        dev
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the configuration; `extra` is appended (e.g. `[install]`).
    pub fn write_config(&self, extra: &str) {
        self.write_config_with_b(&self.path("b.img"), None, extra);
    }

    /// Writes the configuration with slot B at `b` (optionally sized).
    pub fn write_config_with_b(&self, b: &Path, b_size: Option<u64>, extra: &str) {
        let b_size = b_size.map(|s| format!(", size = {s}")).unwrap_or_default();
        let text = format!(
            r#"[device]
type = "board"
data_dir = "{data}"
trust_root = "{root}"
reboot_command = []

[health]
dir = "{health}"
timeout_s = 10

[slots]
a = {{ path = "{a}" }}
b = {{ path = "{b}"{b_size} }}

[slots.detect]
from = "bootloader"

[bootloader]
type = "file"
path = "{env}"
{extra}
"#,
            data = self.path("data").display(),
            root = self.root.display(),
            health = self.path("health.d").display(),
            a = self.path("a.img").display(),
            b = b.display(),
            env = self.path("bootenv").display(),
        );
        std::fs::write(&self.config, text).expect("config");
    }

    /// Builds an artifact with the real `shoal artifact build`.
    pub fn build(&self, image: &[u8], version: &str, counter: u64, base: Option<&Path>) -> PathBuf {
        self.build_as(image, version, counter, base, "board", &self.key)
    }

    pub fn build_as(
        &self,
        image: &[u8],
        version: &str,
        counter: u64,
        base: Option<&Path>,
        device_type: &str,
        key: &Path,
    ) -> PathBuf {
        self.build_with(image, version, counter, base, device_type, key, &[])
    }

    /// Like [`Device::build_as`], with more `artifact build` arguments.
    #[allow(clippy::too_many_arguments)]
    pub fn build_with(
        &self,
        image: &[u8],
        version: &str,
        counter: u64,
        base: Option<&Path>,
        device_type: &str,
        key: &Path,
        extra: &[&str],
    ) -> PathBuf {
        let img = self.path(&format!("v{version}-{device_type}.img"));
        std::fs::write(&img, image).expect("image");
        let signer = key
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tag: String = extra
            .iter()
            .map(|a| a.trim_start_matches('-'))
            .collect::<Vec<_>>()
            .join("_");
        let tag = if tag.is_empty() {
            tag
        } else {
            format!("-{tag}")
        };
        let name = match base {
            Some(_) => format!("acme-os-{version}-{device_type}-{signer}{tag}-thin.shoal"),
            None => format!("acme-os-{version}-{device_type}-{signer}{tag}.shoal"),
        };
        let out = self.path(&name);
        let mut cmd = shoal();
        cmd.args(["--quiet", "artifact", "build", "--image"])
            .arg(&img)
            .args([
                "--name",
                "acme-os",
                "--version",
                version,
                "--device-type",
                device_type,
            ])
            .args(["--security-counter", &counter.to_string(), "--key"])
            .arg(key)
            .arg("--out")
            .arg(&out);
        if let Some(base) = base {
            cmd.arg("--base").arg(base);
        }
        cmd.args(extra);
        ok(cmd.output().expect("run"));
        std::fs::remove_file(&img).expect("rm image");
        out
    }

    /// `shoal ARGS` against this device.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = shoal();
        cmd.env("SHOAL_CONFIG", &self.config).args(args);
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running shoal")
    }

    /// `shoal install --json SOURCE`, parsed.
    pub fn install(&self, source: &Path) -> serde_json::Value {
        let out = self.run(&["install", "--json", &source.display().to_string()]);
        json(&ok(out))
    }

    /// `shoal status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        json(&ok(self.run(&["status", "--json"])))
    }

    fn env(&self) -> FileEnv {
        FileEnv::open(&self.path("bootenv"), true).expect("env")
    }

    /// What the bootloader environment says.
    pub fn boot_state(&self) -> BootState {
        let vars = self.env().load().expect("env readable");
        Scheme::Shoal
            .decode(&vars, Flavor::File)
            .expect("valid state")
    }

    /// A reboot: bootctl's bootloader model picks (and records) the slot.
    pub fn reboot(&self) -> Slot {
        let mut env = self.env();
        shoal_bootctl::model::boot_env(
            &mut env,
            &shoal_bootctl::model::Bootloader::new(Scheme::Shoal, Flavor::File),
        )
        .expect("boot")
        .slot
    }

    /// BLAKE3 of the first `len` bytes of a slot.
    pub fn slot_hash(&self, slot: Slot, len: usize) -> [u8; 32] {
        let name = match slot {
            Slot::A => "a.img",
            Slot::B => "b.img",
        };
        let bytes = std::fs::read(self.path(name)).expect("slot");
        *blake3::hash(&bytes[..len]).as_bytes()
    }
}

pub fn hash(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

pub use shoal_tests::ok;

/// Asserts failure with `code`; returns stderr.
pub fn fails(out: Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "stderr:\n{stderr}\nstdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

pub fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}
