//! `shoal daemon` end to end: real `shoal server`, `shoal admin` and `shoal daemon`
//! processes on loopback, a device with file-backed slots and the file bootloader
//! (reboots simulated with bootctl's bootloader model, as the install tests do), and
//! a throttling TCP proxy between the daemon and the server (so a download can be
//! caught in the middle).
//!
//! One device goes through: authentication (pending until `shoal admin` accepts
//! it); v1 installed with the server killed and restarted mid-download (the
//! install resumes, verified chunks are not fetched again); reboot, boot-check,
//! success; the v2 delta fetching only the chunks it lacks (byte counts checked
//! against `shoal artifact diff`); a v3 deployment aborted mid-download (the
//! daemon stops, nothing is armed).

mod server_common;

use shoal_tests::installed_fields;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use server_common::*;
use shoal_bootctl::Slot;
use shoal_bootctl::env::Env;
use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::scheme::{Flavor, Scheme};
use shoal_tests::{ok, run_in, shoal};

const SLOT: usize = 4 << 20;

/// A TCP proxy to the server whose upstream can change (a restarted server gets a
/// new port) and whose server → device direction can be throttled.
struct Proxy {
    url: String,
    upstream: Arc<Mutex<String>>,
    /// Bytes per second towards the device; 0: no limit.
    rate: Arc<AtomicU64>,
    /// When set, `acme-os` becomes `acme-OS` in what the server sends (the
    /// release name inside a signed manifest: its signature no longer verifies),
    /// and the device's manifest requests lose their `held` list (`?held=` becomes
    /// `?xeld=`, which the server ignores), so the manifest comes whole, in clear,
    /// not as a compressed delta the substitution cannot reach.
    tamper: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let upstream = Arc::new(Mutex::new(addr_of(upstream)));
        let rate = Arc::new(AtomicU64::new(0));
        let tamper = Arc::new(AtomicBool::new(false));
        let (up, r, t) = (
            Arc::clone(&upstream),
            Arc::clone(&rate),
            Arc::clone(&tamper),
        );
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let target = up.lock().unwrap().clone();
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let t_up = Arc::clone(&t);
                std::thread::spawn(move || pipe(c2, s2, None, Some((t_up, b"?held=", b"?xeld="))));
                let (r, t) = (Arc::clone(&r), Arc::clone(&t));
                std::thread::spawn(move || {
                    pipe(server, client, Some(r), Some((t, b"acme-os", b"acme-OS")))
                });
            }
        });
        Proxy {
            url,
            upstream,
            rate,
            tamper,
        }
    }

    fn set_upstream(&self, url: &str) {
        *self.upstream.lock().unwrap() = addr_of(url);
    }
}

fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    rate: Option<Arc<AtomicU64>>,
    tamper: Option<(Arc<AtomicBool>, &'static [u8], &'static [u8])>,
) {
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // `from` becomes `to` (the same length) while the switch is on.
        if let Some((t, from_text, to_text)) = &tamper
            && t.load(Ordering::Relaxed)
        {
            let len = from_text.len();
            for i in 0..(n + 1).saturating_sub(len) {
                if &buf[i..i + len] == *from_text {
                    buf[i..i + len].copy_from_slice(to_text);
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some(r) = &rate
            && let Some(us) = (n as u64 * 1_000_000).checked_div(r.load(Ordering::Relaxed))
        {
            std::thread::sleep(Duration::from_micros(us));
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// The device: slot files, the file bootloader, its configuration.
struct Dev {
    dir: tempfile::TempDir,
}

impl Dev {
    fn new(setup: &Setup, server_url: &str) -> Dev {
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
        std::fs::create_dir_all(p("inventory.d")).unwrap();
        let inv = p("inventory.d/10-hw");
        std::fs::write(&inv, "#!/bin/sh\necho cpu=test-arm\n").unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&inv, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
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
inventory_dir = "{inventory}"

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
            inventory = p("inventory.d").display(),
            a = p("a.img").display(),
            b = p("b.img").display(),
            env = p("bootenv").display(),
        );
        std::fs::write(p("shoal.toml"), config).unwrap();
        Dev { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `shoal daemon`; its log goes to `daemon.log` (appended).
    fn start(&self) -> Child {
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

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// A reboot: bootctl's bootloader model picks (and records) the slot.
    fn reboot(&self) -> Slot {
        let mut env = FileEnv::open(&self.path("bootenv"), true).unwrap();
        shoal_bootctl::model::boot_env(
            &mut env,
            &shoal_bootctl::model::Bootloader::new(Scheme::Shoal, Flavor::File),
        )
        .expect("boot")
        .slot
    }

    fn slot_bytes(&self, slot: Slot, len: usize) -> Vec<u8> {
        let name = if slot == Slot::A { "a.img" } else { "b.img" };
        std::fs::read(self.path(name)).unwrap()[..len].to_vec()
    }

    fn boot_state(&self) -> shoal_bootctl::scheme::BootState {
        let vars = FileEnv::open(&self.path("bootenv"), false)
            .unwrap()
            .load()
            .unwrap();
        Scheme::Shoal.decode(&vars, Flavor::File).unwrap()
    }
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits up to `secs` for `cond`, panicking with `what` and the daemon's log.
fn wait_for(dev: &Dev, secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
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
fn device_state(server: &Server, token: &str, dep: &str) -> String {
    let v = admin_json(server, token, &["deployments", "devices", dep]);
    v[0]["status"].as_str().unwrap_or_default().to_owned()
}

fn deploy(server: &Server, token: &str, name: &str, release: &str, device: &str) -> String {
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

/// Waits for the reboot command, stops the daemon, reboots the device (the
/// bootloader model), starts the daemon again and waits for `success`.
fn reboot_and_succeed(dev: &Dev, daemon: &mut Child, server: &Server, token: &str, dep: &str) {
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

#[test]
fn daemon_installs_resumes_deltas_and_stops_when_aborted() {
    let setup = Setup::new();
    let data = setup.path("data");
    let mut server = Server::start(&setup, &data, &Db::Sqlite, &[]);
    let admin_token = host_token(&data, &Db::Sqlite, "admin");
    let upload = |server: &Server, file: &str| -> String {
        admin_json(
            server,
            &admin_token,
            &["releases", "upload", setup.path(file).to_str().unwrap()],
        )["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let v1 = upload(&server, "v1.shoal");
    let v2 = upload(&server, "v2.shoal");
    // v3: unrelated to v1 and v2, so all of it must be fetched (slowly).
    std::fs::write(setup.path("v3.img"), image(3, 3 << 20)).unwrap();
    ok(run_in(
        setup.dir.path(),
        &[
            "--quiet",
            "artifact",
            "build",
            "--image",
            "v3.img",
            "--name",
            "acme-os",
            "--version",
            "3",
            "--device-type",
            "board",
            "--security-counter",
            "1",
            "--key",
            "rel.pem",
            "--out",
            "v3.shoal",
        ],
    ));
    let v3 = upload(&server, "v3.shoal");

    let proxy = Proxy::start(&server.url);
    let dev = Dev::new(&setup, &proxy.url);
    let mut daemon = dev.start();

    // Authentication: the device appears as pending (with its identity), gets no
    // deployment until accepted, and sends its inventory once accepted.
    let mut pending = Value::Null;
    wait_for(&dev, 60, "a pending device", || {
        pending = admin_json(
            &server,
            &admin_token,
            &["devices", "list", "--status", "pending"],
        );
        pending.as_array().is_some_and(|a| a.len() == 1)
    });
    assert_eq!(pending[0]["identity"]["mac"], "02:00:00:00:00:42");
    let device = pending[0]["id"].as_str().unwrap().to_owned();
    let key_mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dev.path("data/device-key.pem"))
            .unwrap()
            .permissions()
            .mode()
    };
    assert_eq!(key_mode & 0o777, 0o600);
    admin_json(&server, &admin_token, &["devices", "accept", &device]);
    wait_for(&dev, 60, "the inventory", || {
        let shown = admin_json(&server, &admin_token, &["devices", "show", &device]);
        shown.to_string().contains("test-arm")
    });

    // v1, slowly. The server is killed and restarted mid-download (the daemon
    // goes on once it is back), then the daemon itself is killed (a power cut) and
    // restarted: the install resumes from its journal.
    proxy.rate.store(100 * 1024, Ordering::Relaxed);
    let dep1 = deploy(&server, &admin_token, "v1", &v1, &device);
    wait_for(&dev, 60, "downloading", || {
        device_state(&server, &admin_token, &dep1) == "downloading"
    });
    std::thread::sleep(Duration::from_millis(1500));
    server.kill();
    std::thread::sleep(Duration::from_millis(1500));
    server = Server::start(&setup, &data, &Db::Sqlite, &[]);
    proxy.set_upstream(&server.url);
    std::thread::sleep(Duration::from_millis(6000));
    assert!(
        !dev.log().contains("installed; trial armed"),
        "v1 was fetched before the daemon could be killed; slow the proxy down"
    );
    stop(&mut daemon);
    proxy.rate.store(0, Ordering::Relaxed);
    daemon = dev.start();
    reboot_and_succeed(&dev, &mut daemon, &server, &admin_token, &dep1);
    let v1_img = std::fs::read(setup.path("v1.img")).unwrap();
    assert_eq!(dev.slot_bytes(Slot::B, v1_img.len()), v1_img);
    let log = dev.log();
    let v1_stored: u64 = {
        let d: Value = serde_json::from_str(&ok(run_in(
            setup.dir.path(),
            &["artifact", "diff", "v1.shoal", "v1.shoal", "--json"],
        )))
        .unwrap();
        d["full_stored_bytes"].as_u64().unwrap()
    };
    let resumed = installed_fields(&log, "resumed");
    let transferred = installed_fields(&log, "transferred");
    assert!(
        resumed.first().is_some_and(|&r| r >= 1 << 20),
        "the install after the restart did not resume: {resumed:?}\n{log}"
    );
    assert!(
        transferred.first().is_some_and(|&t| t < v1_stored),
        "the resumed install fetched all of v1 ({v1_stored} bytes) again: {transferred:?}\n{log}"
    );

    // v2: only the chunks v1 lacks, as `shoal artifact diff` says.
    let diff: Value = serde_json::from_str(&ok(run_in(
        setup.dir.path(),
        &["artifact", "diff", "v1.shoal", "v2.shoal", "--json"],
    )))
    .unwrap();
    let dep2 = deploy(&server, &admin_token, "v2", &v2, &device);
    reboot_and_succeed(&dev, &mut daemon, &server, &admin_token, &dep2);
    let v2_img = std::fs::read(setup.path("v2.img")).unwrap();
    assert_eq!(dev.slot_bytes(Slot::A, v2_img.len()), v2_img);
    let log = dev.log();
    let fetched = installed_fields(&log, "fetched");
    let transferred = installed_fields(&log, "transferred");
    assert_eq!(
        fetched.last().copied(),
        diff["needed_raw_bytes"].as_u64(),
        "{diff}\n{log}"
    );
    let framing = 36 * diff["chunks_needed"].as_u64().unwrap();
    assert_eq!(
        transferred.last().copied(),
        Some(diff["needed_stored_bytes"].as_u64().unwrap() + framing),
        "{diff}\n{log}"
    );
    // Each deployment's signed manifest was checked against the trust root once
    // (the daemon's check is the install's: the verified release is handed on),
    // also v1's after the restart and v2's, which came as a manifest delta.
    assert_eq!(
        installed_fields(&log, "manifest_checks"),
        [1, 1],
        "a deployment's manifest was verified more than once:\n{log}"
    );

    // v3, slowly; aborted mid-download: the daemon stops it, nothing is armed.
    proxy.rate.store(50 * 1024, Ordering::Relaxed);
    let dep3 = deploy(&server, &admin_token, "v3", &v3, &device);
    wait_for(&dev, 60, "downloading", || {
        device_state(&server, &admin_token, &dep3) == "downloading"
    });
    std::thread::sleep(Duration::from_millis(1000));
    admin_json(&server, &admin_token, &["deployments", "abort", &dep3]);
    wait_for(&dev, 60, "the daemon to stop the deployment", || {
        dev.log()
            .contains("the server ended the deployment; stopping it")
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(device_state(&server, &admin_token, &dep3), "aborted");
    // Stopped mid-download: v3 was never completed and armed.
    assert!(
        !dev.log().contains("acme-os 3 armed"),
        "v3 was fetched to the end despite the abort:\n{}",
        dev.log()
    );
    assert!(!dev.path("rebooted").exists());
    assert!(
        dev.boot_state().trial.is_none(),
        "{:?}\n{}",
        dev.boot_state(),
        dev.log()
    );
    assert_eq!(dev.slot_bytes(Slot::A, v2_img.len()), v2_img);
    stop(&mut daemon);

    // A manifest altered between the server and the device: refused before a
    // byte is written (no deployment starts, the slots are unchanged).
    let b_before = std::fs::read(dev.path("b.img")).unwrap();
    proxy.tamper.store(true, Ordering::Relaxed);
    let before = dev.log().len();
    daemon = dev.start();
    let dep_t = deploy(&server, &admin_token, "v3-tampered", &v3, &device);
    wait_for(&dev, 60, "failure", || {
        device_state(&server, &admin_token, &dep_t) == "failure"
    });
    proxy.tamper.store(false, Ordering::Relaxed);
    stop(&mut daemon);
    let states = admin_json(&server, &admin_token, &["deployments", "devices", &dep_t]);
    let substate = states[0]["substate"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(substate.contains("the manifest was refused"), "{states}");
    assert!(
        !dev.log()[before..].contains("accepted acme-os"),
        "{}",
        dev.log()
    );
    assert_eq!(std::fs::read(dev.path("b.img")).unwrap(), b_before);
    assert!(dev.boot_state().trial.is_none(), "{:?}", dev.boot_state());

    // [network]: a deployment needing more than its data budget fails before a
    // byte of it is fetched, with a status that says so.
    let config = std::fs::read_to_string(dev.path("shoal.toml")).unwrap();
    std::fs::write(
        dev.path("shoal.toml"),
        config.replace(
            "[install]",
            "[network]\nbudget_per_deployment_mib = 1\n\n[install]",
        ),
    )
    .unwrap();
    proxy.rate.store(0, Ordering::Relaxed);
    let before = dev.log().len();
    daemon = dev.start();
    let dep4 = deploy(&server, &admin_token, "v3-budget", &v3, &device);
    wait_for(&dev, 60, "failure", || {
        device_state(&server, &admin_token, &dep4) == "failure"
    });
    let states = admin_json(&server, &admin_token, &["deployments", "devices", &dep4]);
    let substate = states[0]["substate"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(substate.contains("budget"), "{states}");
    let log = dev.log();
    assert_eq!(
        installed_fields(&log[before..], "transferred"),
        Vec::<u64>::new()
    );
    assert!(dev.boot_state().trial.is_none(), "{:?}", dev.boot_state());
    stop(&mut daemon);
}
