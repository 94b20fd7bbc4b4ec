//! Helpers of the managed-mode tests that run a real `shoal daemon`: a device with
//! file-backed slots and the file bootloader (reboots simulated with bootctl's
//! bootloader model), its configuration, and waiting for what the server reports.
//! Used with `server_common`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_bootctl::Slot;
use shoal_bootctl::env::Env;
use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::scheme::{Flavor, Scheme};
use shoal_tests::shoal;

use crate::server_common::{Server, Setup, admin_json, image};

/// Size of each slot file.
pub const SLOT: usize = 4 << 20;

/// The device: slot files, the file bootloader, its configuration.
pub struct Dev {
    pub dir: tempfile::TempDir,
}

impl Dev {
    /// A device on slot A (3 MiB of `image(42)`), polling `server_url` every second;
    /// `server_extra` is appended to its `[server]` table (e.g. `ca_certificate`).
    pub fn new(setup: &Setup, server_url: &str, server_extra: &str) -> Dev {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| dir.path().join(n);
        let mut a = image(42, 3 << 20);
        a.resize(SLOT, 0);
        std::fs::write(p("a.img"), &a).unwrap();
        std::fs::File::create(p("b.img"))
            .and_then(|f| f.set_len(SLOT as u64))
            .unwrap();
        let mut env = FileEnv::open(&p("bootenv"), true).unwrap();
        env.store(&Scheme::Shoal.initial(Flavor::File, Slot::A))
            .unwrap();
        std::fs::create_dir_all(p("health.d")).unwrap();
        let config = format!(
            r#"[device]
type = "board"
data_dir = "{data}"
trust_root = "{root}"
reboot_command = ["touch", "{marker}"]

[health]
dir = "{health}"
timeout_s = 10

[server]
url = "{server_url}"
poll_interval_s = 1
retry_max_s = 2
identity = {{ mac = "02:00:00:00:00:42" }}
{server_extra}

[install]
journal_batch_mib = 1

[slots]
a = {{ path = "{a}" }}
b = {{ path = "{b}" }}

[slots.detect]
from = "bootloader"

[bootloader]
type = "file"
path = "{env}"
"#,
            data = p("data").display(),
            root = setup.path("root.shoalroot").display(),
            marker = p("rebooted").display(),
            health = p("health.d").display(),
            a = p("a.img").display(),
            b = p("b.img").display(),
            env = p("bootenv").display(),
        );
        std::fs::write(p("shoal.toml"), config).unwrap();
        Dev { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `shoal daemon`; its log goes to `daemon.log` (appended).
    pub fn start(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("daemon.log"))
            .unwrap();
        shoal()
            .arg("daemon")
            .arg("--config")
            .arg(self.path("shoal.toml"))
            .env("SHOAL_LOG", "shoal=info,shoal::daemon=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn shoal daemon")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// A reboot: bootctl's bootloader model picks (and records) the slot.
    pub fn reboot(&self) -> Slot {
        let mut env = FileEnv::open(&self.path("bootenv"), true).unwrap();
        shoal_bootctl::model::boot_env(
            &mut env,
            &shoal_bootctl::model::Bootloader::new(Scheme::Shoal, Flavor::File),
        )
        .expect("boot")
        .slot
    }

    pub fn slot_bytes(&self, slot: Slot, len: usize) -> Vec<u8> {
        let name = if slot == Slot::A { "a.img" } else { "b.img" };
        std::fs::read(self.path(name)).unwrap()[..len].to_vec()
    }
}

pub fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits up to `secs` for `cond`, panicking with `what` and the daemon's log.
pub fn wait_for(dev: &Dev, secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}; daemon log:\n{}", dev.log());
}

/// The device's state in a deployment.
pub fn device_state(server: &Server, token: &str, dep: &str) -> String {
    let v = admin_json(server, token, &["deployments", "devices", dep]);
    v[0]["status"].as_str().unwrap_or_default().to_owned()
}

/// Uploads `file` (in the setup's directory); returns the release id.
pub fn upload(server: &Server, token: &str, file: &Path) -> String {
    admin_json(
        server,
        token,
        &["releases", "upload", file.to_str().unwrap()],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Deploys `release` to `device`; returns the deployment id.
pub fn deploy(server: &Server, token: &str, name: &str, release: &str, device: &str) -> String {
    admin_json(
        server,
        token,
        &[
            "deployments",
            "create",
            "--name",
            name,
            "--release",
            release,
            "--device",
            device,
        ],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Waits for the daemon's device to show up pending, accepts it and waits for its
/// inventory; returns its id.
pub fn accept_device(dev: &Dev, server: &Server, token: &str) -> String {
    let mut pending = Value::Null;
    wait_for(dev, 60, "a pending device", || {
        pending = admin_json(server, token, &["devices", "list", "--status", "pending"]);
        pending.as_array().is_some_and(|a| a.len() == 1)
    });
    let device = pending[0]["id"].as_str().unwrap().to_owned();
    admin_json(server, token, &["devices", "accept", &device]);
    // A deployment made before the inventory (device_type) arrives finds no
    // artifact for the device.
    wait_for(dev, 60, "the inventory", || {
        admin_json(server, token, &["devices", "show", &device])["inventory"]["device_type"]
            == "board"
    });
    device
}

/// Waits for the reboot command, stops the daemon, reboots the device (the
/// bootloader model), starts the daemon again and waits for `success`.
pub fn reboot_and_succeed(dev: &Dev, daemon: &mut Child, server: &Server, token: &str, dep: &str) {
    wait_for(dev, 120, "the reboot command", || {
        dev.path("rebooted").exists()
    });
    assert_eq!(device_state(server, token, dep), "rebooting");
    stop(daemon);
    std::fs::remove_file(dev.path("rebooted")).unwrap();
    dev.reboot();
    *daemon = dev.start();
    wait_for(dev, 60, "success", || {
        device_state(server, token, dep) == "success"
    });
}

/// The `key=NUMBER` values of the daemon's "installed" log lines, in order.
pub fn installed_field(log: &str, key: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("installed; trial armed"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}
