//! LAN peers in network namespaces (issue 13), with real `shoal` processes: a
//! server host, a router with a shaped WAN uplink (`tc tbf`) whose forwarded bytes
//! nftables counts per LAN, and two LANs of five devices each (file-backed slots,
//! mDNS discovery, a closed fleet with membership credentials).
//!
//! - Each LAN pulls about one copy of the release over the WAN (≤ 1.1 × the bytes
//!   the release needs), every device updates and every slot verifies, while two
//!   strangers sit on the first LAN (a libp2p node without a credential, one with a
//!   credential of another fleet) and are served nothing.
//! - A device killed mid-transfer (its chunks come from elsewhere) and a peer that
//!   serves corrupt chunks (banned); every slot still verifies.
//!
//! Needs root and Debian's `iproute2` and `nftables` (CI runs as root; the tests
//! fail, never skip, without them).

mod server_common;

use shoal_tests::installed_field;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use server_common::{Setup, host_token, image};
use shoal_bootctl::Slot;
use shoal_bootctl::env::Env;
use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::scheme::{Flavor, Scheme};
use shoal_tests::netns::{NET, Net};
use shoal_tests::{ok, run_in, shoal_bin};

/// The two tests run a dozen daemons each: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const SLOT: usize = 4 << 20;
const FLEET: &str = "site-7";
/// The WAN uplink's rate, each way.
const WAN: &str = "8mbit";

/// One device: its directory, namespace and daemon.
struct Dev {
    dir: tempfile::TempDir,
    ns: String,
    daemon: Option<usize>,
}

impl Dev {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// How many distinct peers the daemon connected to so far.
    fn peers_connected(&self) -> usize {
        let peers: std::collections::HashSet<String> = self
            .log()
            .lines()
            .filter(|l| l.contains("peer connected"))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("peer="))
                    .map(str::to_owned)
            })
            .collect();
        peers.len()
    }

    /// The peer id the daemon logged when it joined the LAN.
    fn peer_id(&self) -> Option<String> {
        self.log()
            .lines()
            .find(|l| l.contains("joined the LAN"))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("peer="))
                    .map(str::to_owned)
            })
    }
}

/// Who a device is to the fleet.
#[derive(Clone, Copy, PartialEq)]
enum Member {
    /// A credential of the fleet.
    Yes,
    /// No credential at all.
    NoCredential,
    /// A valid credential of another fleet.
    OtherFleet,
}

/// The site: the network, the server, the release and the devices.
struct Site {
    setup: Setup,
    url: String,
    token: String,
    v1: String,
    /// The bytes the release needs (its stored chunks; slot A shares none).
    stored: u64,
    devs: Vec<Dev>,
    ids: Vec<String>,
    // Last: the namespaces go after every process in them.
    net: Net,
}

impl Site {
    /// `lans` LANs of five devices; `extra` more devices on LAN 1 with their
    /// membership; `env` per device index (environment of its daemon).
    fn new(tag: &str, lans: u8, extra: &[Member], env: &[(usize, &[(&str, &str)])]) -> Site {
        let mut net = Net::new(tag, lans, 5, WAN);
        let setup = Setup::new();
        let d = setup.dir.path();
        // A closed fleet: the trust root names a fleet key.
        ok(run_in(d, &["key", "generate", "--out", "fleet.pem"]));
        std::fs::remove_file(setup.path("root.shoalroot")).expect("remove the open root");
        ok(run_in(
            d,
            &[
                "root",
                "init",
                "--root-key",
                "rootk.pem.pub",
                "--release-key",
                "rel.pem.pub",
                "--fleet-key",
                "fleet.pem.pub",
                "--sign",
                "rootk.pem",
                "--out",
                "root.shoalroot",
            ],
        ));
        let stored: u64 = {
            let d: Value = serde_json::from_str(&ok(run_in(
                d,
                &["artifact", "diff", "v1.shoal", "v1.shoal", "--json"],
            )))
            .expect("diff JSON");
            d["full_stored_bytes"].as_u64().expect("full_stored_bytes")
        };

        // The server, on the server host.
        let data = setup.path("data");
        let mut cmd = net.command("srv", shoal_bin());
        cmd.arg("server")
            .arg("--data")
            .arg(&data)
            .arg("--root")
            .arg(setup.path("root.shoalroot"))
            .args(["--listen", &format!("{NET}.0.10:0")])
            .env("SHOAL_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn shoal server");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let server_log = setup.path("server.log");
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(server_log).ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.trim().to_owned());
                }
                if let Some(f) = log.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(f, "{line}");
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server did not say where it listens");
        net.keep(child);
        let token = host_token(&data, &server_common::Db::Sqlite, "admin");
        let mut site = Site {
            setup,
            url,
            token,
            v1: String::new(),
            stored,
            devs: Vec::new(),
            ids: Vec::new(),
            net,
        };
        site.v1 = site.admin(&[
            "releases",
            "upload",
            site.setup.path("v1.shoal").to_str().unwrap(),
        ])["id"]
            .as_str()
            .expect("release id")
            .to_owned();

        let mut who: Vec<(u8, u8, Member)> = Vec::new();
        for l in 1..=lans {
            for n in 1..=5 {
                who.push((l, n, Member::Yes));
            }
        }
        for (i, m) in extra.iter().enumerate() {
            let n = 6 + i as u8;
            site.net.add_device(1, n);
            who.push((1, n, *m));
        }
        for (i, &(l, n, m)) in who.iter().enumerate() {
            let dev = site.device(i, l, n, m);
            site.devs.push(dev);
            let e = env
                .iter()
                .find(|(k, _)| *k == i)
                .map_or(&[][..], |(_, e)| e);
            site.start(i, e);
        }
        // Accept every device.
        let count = site.devs.len();
        let mut pending = Value::Null;
        wait(60, "the pending devices", || {
            pending = site.admin(&["devices", "list", "--status", "pending"]);
            pending.as_array().is_some_and(|a| a.len() == count)
        });
        site.ids = vec![String::new(); count];
        for d in pending.as_array().unwrap() {
            let mac = d["identity"]["mac"].as_str().unwrap();
            let i = usize::from_str_radix(mac.rsplit(':').next().unwrap(), 16).unwrap();
            site.ids[i] = d["id"].as_str().unwrap().to_owned();
            site.admin(&["devices", "accept", &site.ids[i]]);
        }
        // Every device reported its inventory (its device type): a deployment made
        // before that marks the device `noartifact` and it never installs.
        wait(60, "the devices' inventories", || {
            let accepted = site.admin(&["devices", "list", "--status", "accepted"]);
            accepted.as_array().is_some_and(|a| {
                a.len() == count
                    && a.iter()
                        .all(|d| d["inventory"]["device_type"].as_str() == Some("board"))
            })
        });
        // Every device found the four others of its LAN (mDNS).
        for (i, dev) in site.devs.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(60);
            while dev.peers_connected() < 4 {
                assert!(
                    Instant::now() < deadline,
                    "device {i} did not find its LAN peers by mDNS:\n{}",
                    dev.log()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        site
    }

    /// Device `i`, `n` on LAN `l`: slots, a key and its credential, a config.
    fn device(&self, i: usize, l: u8, n: u8, member: Member) -> Dev {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |f: &str| dir.path().join(f);
        // Slot A holds something unrelated: the whole release is needed.
        let mut a = image(100 + i as u64, 3 << 20);
        a.resize(SLOT, 0);
        std::fs::write(p("a.img"), &a).unwrap();
        std::fs::File::create(p("b.img"))
            .and_then(|f| f.set_len(SLOT as u64))
            .unwrap();
        let mut env = FileEnv::open(&p("bootenv"), true).unwrap();
        env.store(&Scheme::Shoal.initial(Flavor::File, Slot::A))
            .unwrap();
        std::fs::create_dir_all(p("health.d")).unwrap();
        std::fs::create_dir_all(p("data")).unwrap();
        let key = p("data/device-key.pem");
        ok(run_in(
            dir.path(),
            &["key", "generate", "--out", key.to_str().unwrap()],
        ));
        let fleet = match member {
            Member::Yes => Some(FLEET),
            Member::OtherFleet => Some("elsewhere"),
            Member::NoCredential => None,
        };
        let credential = match fleet {
            Some(fleet) => {
                ok(run_in(
                    self.setup.dir.path(),
                    &[
                        "key",
                        "credential",
                        "--key",
                        "fleet.pem",
                        "--device",
                        key.to_str().unwrap(),
                        "--fleet",
                        fleet,
                        "--out",
                        p("fleet.cred").to_str().unwrap(),
                    ],
                ));
                format!("credential = \"{}\"\n", p("fleet.cred").display())
            }
            None => String::new(),
        };
        let config = format!(
            r#"[device]
type = "board"
data_dir = "{data}"
trust_root = "{root}"
reboot_command = ["touch", "{marker}"]

[health]
dir = "{health}"

[server]
url = "{url}"
poll_interval_s = 2
retry_max_s = 2
identity = {{ mac = "02:00:00:00:01:{i:02x}" }}

[install]
journal_batch_mib = 1

[lan]
enabled = true
listen = ["/ip4/0.0.0.0/tcp/0"]
mdns = true
mdns_query_interval_s = 1
{credential}
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
            root = self.setup.path("root.shoalroot").display(),
            marker = p("rebooted").display(),
            health = p("health.d").display(),
            url = self.url,
            a = p("a.img").display(),
            b = p("b.img").display(),
            env = p("bootenv").display(),
        );
        std::fs::write(p("shoal.toml"), config).unwrap();
        Dev {
            dir,
            ns: format!("d{l}{n}"),
            daemon: None,
        }
    }

    /// Starts (or restarts) device `i`'s daemon in its namespace.
    fn start(&mut self, i: usize, env: &[(&str, &str)]) {
        let dev = &self.devs[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dev.path("daemon.log"))
            .unwrap();
        let mut cmd = self.net.command(&dev.ns, shoal_bin());
        cmd.arg("daemon")
            .arg("--config")
            .arg(dev.path("shoal.toml"))
            .env(
                "SHOAL_LOG",
                std::env::var("LAN_NETNS_DAEMON_LOG").unwrap_or_else(|_| "shoal=debug".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log);
        match self.devs[i].daemon {
            Some(k) => self.net.replace(k, cmd),
            None => self.devs[i].daemon = Some(self.net.spawn(cmd)),
        }
    }

    fn stop(&mut self, i: usize) {
        if let Some(k) = self.devs[i].daemon {
            self.net.kill(k);
        }
    }

    /// `shoal admin --json ARGS` from the server host.
    fn admin(&self, args: &[&str]) -> Value {
        let out = self
            .net
            .command("srv", shoal_bin())
            .args([
                "admin",
                "--server",
                &self.url,
                "--token",
                &self.token,
                "--json",
            ])
            .args(args)
            .output()
            .expect("run shoal admin");
        let text = ok(out);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// Deploys v1 to devices `which` in one deployment (a fleet rollout: each
    /// device starts at its next poll); its id.
    fn deploy(&self, which: &[usize]) -> String {
        let mut args = vec![
            "deployments",
            "create",
            "--name",
            "v1",
            "--release",
            &self.v1,
        ];
        for &n in which {
            args.extend(["--device", self.ids[n].as_str()]);
        }
        self.admin(&args)["id"].as_str().unwrap().to_owned()
    }

    /// Device `i`'s status in deployment `dep`.
    fn state(&self, dep: &str, i: usize) -> String {
        let v = self.admin(&["deployments", "devices", dep]);
        v.as_array()
            .and_then(|a| a.iter().find(|d| d["device_id"] == self.ids[i].as_str()))
            .and_then(|d| d["status"].as_str())
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until device `i` runs the release (installed, rebooting into it).
    fn wait_installed(&self, i: usize, dep: &str, secs: u64) {
        let dev = &self.devs[i];
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if self.state(dep, i) == "rebooting" {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let server = std::fs::read_to_string(self.setup.path("server.log")).unwrap_or_default();
        let tail: Vec<&str> = server.lines().rev().take(40).collect();
        panic!(
            "device {i} ({}) did not install in {secs} s; log:\n{}\nserver log (last lines, newest first):\n{}",
            dev.ns,
            dev.log(),
            tail.join("\n")
        );
    }

    /// Checks device `i`'s slot B holds v1, byte for byte.
    fn check_slot(&self, i: usize) {
        let v1_img = std::fs::read(self.setup.path("v1.img")).unwrap();
        let b = std::fs::read(self.devs[i].path("b.img")).unwrap();
        assert!(
            b[..v1_img.len()] == v1_img[..],
            "device {i}'s slot B differs from the release"
        );
    }
}

fn wait(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}");
}

fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b as f64
}

/// Two LANs of five devices behind one shaped uplink: each LAN pulls the release
/// about once, every slot verifies, and the two strangers on LAN 1 get nothing.
#[test]
fn each_lan_pulls_the_release_about_once_and_strangers_get_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let site = Site::new("a", 2, &[Member::NoCredential, Member::OtherFleet], &[]);
    let strangers = [10usize, 11];
    let stranger_addrs: Vec<String> = [6u8, 7].iter().map(|&n| Net::addr(1, n)).collect();
    site.net.count_wan(2, &stranger_addrs);
    let all: Vec<usize> = (0..site.devs.len()).collect();
    let t0 = Instant::now();
    let dep = site.deploy(&all);
    for &i in &all {
        site.wait_installed(i, &dep, 120);
    }
    let took = t0.elapsed();
    for &i in &all {
        site.check_slot(i);
    }
    if let Ok(dir) = std::env::var("LAN_NETNS_KEEP_LOGS") {
        for (i, d) in site.devs.iter().enumerate() {
            let _ = std::fs::copy(d.path("daemon.log"), format!("{dir}/dev{i}.log"));
        }
    }
    let lan1 = site.net.counter("lan1");
    let lan2 = site.net.counter("lan2");
    let excluded = site.net.counter("excluded");
    let stored = site.stored;
    let from_peers: Vec<u64> = site
        .devs
        .iter()
        .map(|d| installed_field(&d.log(), "from_peers").unwrap_or(0))
        .collect();
    eprintln!(
        "release: {stored} stored bytes; WAN to LAN 1 members: {lan1} ({:.3}x), to LAN 2: {lan2} ({:.3}x), to the 2 strangers: {excluded} ({:.3}x); from peers per device: {from_peers:?}; all installed in {:.1} s",
        ratio(lan1, stored),
        ratio(lan2, stored),
        ratio(excluded, stored),
        took.as_secs_f64()
    );
    // Chunk bytes the members fetched from the server (their own count of what
    // they read of chunk batches): the LAN pulls the release about once.
    let chunk_bytes: Vec<u64> = site
        .devs
        .iter()
        .map(|d| installed_field(&d.log(), "transferred").unwrap_or(0))
        .collect();
    // Everything that crossed the uplink, IP headers, polls, manifests and status
    // reports included, against what one device alone (a stranger: it gets nothing
    // from the LAN) pulls in the same run.
    let alone = excluded / strangers.len() as u64;
    for (l, bytes) in [(1, lan1), (2, lan2)] {
        let chunks: u64 = chunk_bytes[(l - 1) * 5..l * 5].iter().sum();
        eprintln!(
            "LAN {l}: chunk bytes from the server {chunks} ({:.3}x the release), all WAN bytes {bytes} ({:.3}x a device alone)",
            ratio(chunks, stored),
            ratio(bytes, alone)
        );
        assert!(
            chunks as f64 <= 1.1 * stored as f64,
            "LAN {l}: its members fetched {chunks} chunk bytes from the server for a release of {stored} stored bytes ({:.3}x > 1.1x)",
            ratio(chunks, stored)
        );
        assert!(
            bytes as f64 <= 1.5 * alone as f64,
            "LAN {l}: {bytes} bytes crossed the WAN, {:.3}x the {alone} a device alone pulls (> 1.5x)",
            ratio(bytes, alone)
        );
    }
    // Members share: at least four of each LAN's five got chunks from peers.
    for l in 0..2 {
        let sharing = (l * 5..l * 5 + 5).filter(|&i| from_peers[i] > 0).count();
        assert!(
            sharing >= 4,
            "LAN {}: only {sharing} devices got chunks from peers",
            l + 1
        );
    }
    // The strangers were served nothing, and the members said why.
    for &s in &strangers {
        assert_eq!(
            from_peers[s],
            0,
            "stranger {s} got chunks from the fleet:\n{}",
            site.devs[s].log()
        );
        let id = site.devs[s].peer_id().expect("the stranger joined the LAN");
        let refused = (0..5).any(|m| {
            site.devs[m]
                .log()
                .lines()
                .any(|l| l.contains("not serving a peer outside the fleet") && l.contains(&id))
        });
        assert!(
            refused,
            "no member of LAN 1 refused stranger {s} ({id}); it was never tried"
        );
    }
}

/// A device dies mid-transfer and another serves corrupt chunks: the killed
/// device's chunks come from elsewhere, the corrupting peer is banned, and every
/// slot verifies.
#[test]
fn a_killed_device_and_a_corrupt_peer_leave_every_slot_verified() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Device 9 (LAN 2's fifth) serves corrupt chunks.
    let corrupt: &[(&str, &str)] = &[("SHOAL_TEST_PEER_FAULT", "corrupt")];
    let mut site = Site::new("b", 2, &[], &[(9, corrupt)]);
    site.net.count_wan(2, &[]);
    let all: Vec<usize> = (0..10).collect();
    let dep = site.deploy(&all);

    // Device 4 (LAN 1's fifth) dies in the middle of its transfer.
    wait(120, "device 4 downloading", || {
        site.state(&dep, 4) == "downloading"
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        installed_field(&site.devs[4].log(), "fetched").is_none(),
        "device 4 finished before it could be killed; slow the uplink down"
    );
    site.stop(4);
    for i in (0..10).filter(|&i| i != 4) {
        site.wait_installed(i, &dep, 120);
    }
    // The others finished without it: what it owned came from elsewhere.
    site.start(4, &[]);
    site.wait_installed(4, &dep, 120);
    for i in 0..10 {
        site.check_slot(i);
    }
    for i in 5..9 {
        let log = site.devs[i].log();
        assert!(
            log.contains("sent a corrupt chunk; banned"),
            "device {i} never banned the corrupting peer:\n{log}"
        );
    }
    eprintln!(
        "release: {} stored bytes; WAN to LAN 1: {} ({:.3}x, a device killed), to LAN 2: {} ({:.3}x, a corrupt peer)",
        site.stored,
        site.net.counter("lan1"),
        ratio(site.net.counter("lan1"), site.stored),
        site.net.counter("lan2"),
        ratio(site.net.counter("lan2"), site.stored),
    );
}
