//! Helpers of the daemon tests: a device with file-backed slots and the file
//! bootloader (reboots simulated with bootctl's bootloader model), its `shoal daemon`
//! process, and a fault-injecting TCP proxy between the daemon and the server.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_bootctl::Slot;
use shoal_bootctl::env::Env;
use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::scheme::{Flavor, Scheme};
use shoal_tests::shoal;

use crate::server_common::{Server, Setup, admin_json, image};

/// Each slot's size.
pub const SLOT: usize = 4 << 20;

/// What the proxy does to the server → device direction. All counters are totals
/// over every connection since the proxy started.
#[derive(Default)]
pub struct Faults {
    /// Bytes per second towards the device; 0: no limit.
    pub rate: AtomicU64,
    /// Close each connection once it carried this many bytes towards the device;
    /// 0: never.
    pub cut_after: AtomicU64,
    /// The next connection that carries this many bytes towards the device stops
    /// forwarding (and stays open, silent) — once; 0: never.
    pub stall_after: AtomicU64,
    /// Once: the next connection whose bytes towards the device contain this
    /// pattern (e.g. a response header) is cut this many bytes after it.
    pub cut_at_pattern: Mutex<Option<(Vec<u8>, u64)>>,
    /// Once: in the next response towards the device whose header contains this
    /// pattern (e.g. a content type), the body's last byte (by its content-length)
    /// is flipped. The header must come in one read.
    pub flip_body_end_at_pattern: Mutex<Option<Vec<u8>>>,
    /// Bytes flipped so far.
    pub flips: AtomicU64,
    /// Connections cut so far.
    pub cuts: AtomicU64,
    /// When a connection stalled.
    pub stalled_at: Mutex<Option<Instant>>,
    /// Bytes forwarded towards the device.
    pub down_bytes: AtomicU64,
    /// While set, new connections are refused (the server is unreachable).
    pub offline: AtomicBool,
}

/// A TCP proxy to the server that throttles, cuts or stalls connections, and whose
/// upstream can change (a restarted server gets a new port).
pub struct FaultProxy {
    pub url: String,
    upstream: Arc<Mutex<String>>,
    pub faults: Arc<Faults>,
}

impl FaultProxy {
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let upstream = Arc::new(Mutex::new(addr_of(upstream)));
        let faults = Arc::new(Faults::default());
        let (up, f) = (Arc::clone(&upstream), Arc::clone(&faults));
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                if f.offline.load(Ordering::Relaxed) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let target = up.lock().unwrap().clone();
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pipe_up(c2, s2));
                let f = Arc::clone(&f);
                std::thread::spawn(move || pipe_down(server, client, &f));
            }
        });
        FaultProxy {
            url,
            upstream,
            faults,
        }
    }

    pub fn set_upstream(&self, url: &str) {
        *self.upstream.lock().unwrap() = addr_of(url);
    }
}

fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

fn pipe_up(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

fn pipe_down(mut from: TcpStream, mut to: TcpStream, f: &Faults) {
    let mut buf = [0u8; 8192];
    let mut carried = 0u64;
    let mut cut_here = None;
    let mut flip_at: Option<u64> = None;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut p = f.cut_at_pattern.lock().unwrap();
            if let Some((pat, after)) = p.as_ref()
                && let Some(at) = buf[..n]
                    .windows(pat.len())
                    .position(|w| w == pat.as_slice())
            {
                cut_here = Some(carried + at as u64 + after);
                *p = None;
            }
        }
        {
            let mut p = f.flip_body_end_at_pattern.lock().unwrap();
            if let Some(pat) = p.as_ref()
                && let Some(at) = find(&buf[..n], pat)
                && let Some(start) = buf[..at].windows(9).rposition(|w| w == b"HTTP/1.1 ")
                && let Some(end) = find(&buf[at..n], b"\r\n\r\n").map(|e| at + e + 4)
                && let Some(len) = content_length(&buf[start..end])
                && len > 0
            {
                flip_at = Some(carried + end as u64 + len - 1);
                *p = None;
            }
        }
        if let Some(at) = flip_at
            && at >= carried
            && at < carried + n as u64
        {
            buf[(at - carried) as usize] ^= 1;
            f.flips.fetch_add(1, Ordering::Relaxed);
            flip_at = None;
        }
        let cut = match (f.cut_after.load(Ordering::Relaxed), cut_here) {
            (0, None) => 0,
            (0, Some(c)) => c,
            (a, None) => a,
            (a, Some(c)) => a.min(c),
        };
        let n = if cut > 0 && carried + n as u64 >= cut {
            let last = (cut - carried) as usize;
            let _ = to.write_all(&buf[..last]);
            f.down_bytes.fetch_add(last as u64, Ordering::Relaxed);
            f.cuts.fetch_add(1, Ordering::Relaxed);
            break;
        } else {
            n
        };
        let stall = f.stall_after.load(Ordering::Relaxed);
        if stall > 0
            && carried + n as u64 >= stall
            && f.stall_after
                .compare_exchange(stall, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            *f.stalled_at.lock().unwrap() = Some(Instant::now());
            // Silent, and open, until the other side gives up.
            let mut sink = [0u8; 8192];
            while matches!(from.read(&mut sink), Ok(n) if n > 0) {}
            break;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        carried += n as u64;
        f.down_bytes.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(us) = (n as u64 * 1_000_000).checked_div(f.rate.load(Ordering::Relaxed)) {
            std::thread::sleep(Duration::from_micros(us));
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The content-length of an HTTP/1.1 response header block.
fn content_length(header: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(header).ok()?;
    text.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// The device: slot files, the file bootloader, its configuration.
pub struct Dev {
    pub dir: tempfile::TempDir,
}

impl Dev {
    /// A device running an unrelated image in slot A, talking to `server_url`;
    /// `extra` is added to its configuration (e.g. a `[network]` table).
    pub fn new(setup: &Setup, server_url: &str, extra: &str) -> Dev {
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
identity = {{ mac = "02:00:00:00:00:43" }}

[install]
journal_batch_mib = 1

{extra}

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

    /// Runs `shoal ARGS --config <this device>` (a standalone command).
    pub fn shoal(&self, args: &[&str]) -> std::process::Output {
        shoal()
            .args(args)
            .arg("--config")
            .arg(self.path("shoal.toml"))
            .output()
            .expect("run shoal")
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

    /// The device's id (its key's id), once the key exists.
    pub fn id(&self) -> String {
        let key = shoal_signing::SecretKey::load(&self.path("data/device-key.pem")).expect("key");
        hex::encode(key.public().id().0)
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
pub fn device_state(server: &Server, token: &str, dep: &str) -> (String, String) {
    let v = admin_json(server, token, &["deployments", "devices", dep]);
    (
        v[0]["status"].as_str().unwrap_or_default().to_owned(),
        v[0]["substate"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Creates a deployment of `release` to `device`; its id.
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

/// Uploads `file` of `setup`; the release id.
pub fn upload(server: &Server, token: &str, setup: &Setup, file: &str) -> String {
    admin_json(
        server,
        token,
        &["releases", "upload", setup.path(file).to_str().unwrap()],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Waits for the device to ask to be admitted, accepts it and waits for its
/// inventory; its id.
pub fn accept(server: &Server, token: &str, dev: &Dev) -> String {
    let mut pending = Value::Null;
    wait_for(dev, 60, "a pending device", || {
        pending = admin_json(server, token, &["devices", "list", "--status", "pending"]);
        pending.as_array().is_some_and(|a| !a.is_empty())
    });
    let id = dev.id();
    admin_json(server, token, &["devices", "accept", &id]);
    // Deployments target by device type: wait for the inventory that says it.
    wait_for(dev, 60, "the inventory", || {
        admin_json(server, token, &["devices", "show", &id])["inventory"]["device_type"] == "board"
    });
    id
}

/// The last `key=NUMBER` of the daemon's "installed" log lines, in order.
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

/// Waits for the reboot command, stops the daemon, reboots the device (the
/// bootloader model), starts the daemon again and waits for `success`.
pub fn reboot_and_succeed(dev: &Dev, daemon: &mut Child, server: &Server, token: &str, dep: &str) {
    wait_for(dev, 120, "the reboot command", || {
        dev.path("rebooted").exists()
    });
    stop(daemon);
    std::fs::remove_file(dev.path("rebooted")).unwrap();
    dev.reboot();
    *daemon = dev.start();
    wait_for(dev, 60, "success", || {
        device_state(server, token, dep).0 == "success"
    });
}

/// `shoal artifact diff FROM TO --json` of two artifacts of `setup`.
pub fn diff(setup: &Setup, from: &str, to: &str) -> Value {
    let out = shoal_tests::ok(shoal_tests::run_in(
        setup.dir.path(),
        &["artifact", "diff", from, to, "--json"],
    ));
    serde_json::from_str(&out).unwrap()
}
