//! Offline propagation (issue 13): a site with no server. One device installs a
//! release from a USB chunk store (`shoal install STORE`), reboots into it and
//! commits; its daemon announces it on the LAN. Four daemons with
//! `[lan] accept_releases` fetch its signed manifest from it, check it like any
//! offer and install from it with no server at all, then commit after their health
//! checks. A fifth daemon without `accept_releases` installs nothing. Then the
//! server comes up behind the same address the devices were configured with, and
//! every status report queued offline reaches it.

mod lan_common;
mod server_common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use server_common::*;
use shoal_bootctl::Slot;
use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::scheme::{Flavor, Scheme};
use shoal_tests::{ok, run_in, shoal};

/// The server's address before the server exists: a TCP proxy that drops every
/// connection until it is given the server to forward to.
struct LateServer {
    url: String,
    target: Arc<Mutex<Option<String>>>,
}

impl LateServer {
    fn start() -> LateServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let target: Arc<Mutex<Option<String>>> = Arc::default();
        let t = Arc::clone(&target);
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Some(to) = t.lock().unwrap().clone() else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let Ok(server) = TcpStream::connect(&to) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pipe(c2, s2));
                std::thread::spawn(move || pipe(server, client));
            }
        });
        LateServer { url, target }
    }

    fn connect(&self, server_url: &str) {
        *self.target.lock().unwrap() = Some(server_url.trim_start_matches("http://").to_owned());
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

struct Dev {
    dir: tempfile::TempDir,
}

impl Dev {
    fn new(setup: &Setup, server_url: &str, n: u8, peers: &[String], accept: bool) -> Dev {
        let dir = tempfile::tempdir().expect("tempdir");
        let mac = format!("02:00:00:00:02:{n:02x}");
        let lan_extra = format!("accept_releases = {accept}\n");
        lan_common::write_device(
            dir.path(),
            setup,
            server_url,
            &mac,
            100 + u64::from(n),
            peers,
            &lan_extra,
        );
        // A health check that passes, so the commit is the checks' decision.
        std::fs::write(dir.path().join("health.d/10-ok"), "#!/bin/sh\nexit 0\n").unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                dir.path().join("health.d/10-ok"),
                std::fs::Permissions::from_mode(0o755),
            )
            .unwrap();
        }
        Dev { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        shoal()
            .arg(args[0])
            .arg("--config")
            .arg(self.path("shoal.toml"))
            .args(&args[1..])
            .output()
            .expect("run shoal")
    }

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
            .env("SHOAL_LOG", "shoal=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn shoal daemon")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// The bootloader model: the device reboots (the trial slot once).
    fn reboot(&self) -> Slot {
        let mut env = FileEnv::open(&self.path("bootenv"), true).unwrap();
        shoal_bootctl::model::boot_env(
            &mut env,
            &shoal_bootctl::model::Bootloader::new(Scheme::Shoal, Flavor::File),
        )
        .expect("boot")
        .slot
    }

    fn lan_address(&self) -> String {
        wait_for(self, 30, "the LAN listen address", || {
            self.path("data/lan-addresses").exists()
        });
        std::fs::read_to_string(self.path("data/lan-addresses"))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_owned()
    }

    /// Whether `shoal status` says the device runs and committed the release in
    /// slot B (the store may be busy with the daemon: then not yet).
    fn committed_b(&self) -> bool {
        let out = self.run(&["status", "--json"]);
        let Ok(s) = serde_json::from_slice::<Value>(&out.stdout) else {
            return false;
        };
        s["active"] == "B" && s["last"]["result"] == "committed" && s["last"]["version"] == "1"
    }
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

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

struct Daemons(Vec<Option<Child>>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in self.0.iter_mut().flatten() {
            stop(c);
        }
    }
}

#[test]
fn a_usb_store_in_one_device_updates_the_site_with_no_server_and_reports_arrive_later() {
    let setup = Setup::new();
    let late = LateServer::start();
    // The USB stick: a chunk store holding v1.
    ok(run_in(
        setup.dir.path(),
        &[
            "store",
            "add",
            "usb",
            "v1.shoal",
            "--root",
            "root.shoalroot",
        ],
    ));
    let v1_img = std::fs::read(setup.path("v1.img")).unwrap();

    // Device 0 installs from the stick, reboots into v1 and its daemon commits it.
    let seed = Dev::new(&setup, &late.url, 0, &[], false);
    ok(seed.run(&["install", setup.path("usb").to_str().unwrap()]));
    assert_eq!(seed.reboot(), Slot::B);
    let mut daemons = Daemons(vec![Some(seed.start())]);
    let seed_addr = seed.lan_address();
    wait_for(&seed, 60, "the seed's commit and announcement", || {
        seed.log()
            .contains("serving the running release to LAN peers")
    });
    assert!(seed.committed_b(), "{}", seed.log());

    // Four devices that accept releases from peers, one that does not.
    let mut devs = Vec::new();
    let mut addrs = vec![seed_addr];
    for n in 1..=5u8 {
        let dev = Dev::new(&setup, &late.url, n, &addrs, n != 5);
        daemons.0.push(Some(dev.start()));
        addrs.push(dev.lan_address());
        devs.push(dev);
    }
    for (i, dev) in devs.iter().enumerate().take(4) {
        wait_for(dev, 120, "the install from peers", || {
            dev.path("rebooted").exists()
        });
        let b = std::fs::read(dev.path("b.img")).unwrap();
        assert!(
            b[..v1_img.len()] == v1_img[..],
            "device {}'s slot B differs",
            i + 1
        );
        assert!(
            dev.log().contains("installed from LAN peers; trial armed"),
            "{}",
            dev.log()
        );
    }
    // Each reboots into the trial; its daemon runs the health checks and commits.
    for (i, dev) in devs.iter().enumerate().take(4) {
        stop(daemons.0[i + 1].as_mut().unwrap());
        std::fs::remove_file(dev.path("rebooted")).unwrap();
        assert_eq!(dev.reboot(), Slot::B);
        daemons.0[i + 1] = Some(dev.start());
    }
    for dev in devs.iter().take(4) {
        wait_for(dev, 60, "the commit", || dev.committed_b());
    }
    // The device without accept_releases saw the release and left it alone.
    let quiet = &devs[4];
    assert!(!quiet.path("rebooted").exists());
    assert!(
        !quiet.log().contains("installing a release a LAN peer runs"),
        "{}",
        quiet.log()
    );
    let b = std::fs::read(quiet.path("b.img")).unwrap();
    assert!(b.iter().all(|&x| x == 0), "device 5's slot B was written");

    // The server comes up; the devices sign in, are accepted, and deliver the
    // reports they queued offline.
    let data = setup.path("data");
    let server = Server::start(&setup, &data, &Db::Sqlite, &[]);
    late.connect(&server.url);
    let token = host_token(&data, &Db::Sqlite, "admin");
    let mut pending = Value::Null;
    wait_for(&devs[0], 60, "the devices signing in", || {
        pending = admin_json(&server, &token, &["devices", "list", "--status", "pending"]);
        pending.as_array().is_some_and(|a| a.len() == 6)
    });
    let mut ids = vec![String::new(); 6];
    for d in pending.as_array().unwrap() {
        let mac = d["identity"]["mac"].as_str().unwrap();
        let i = usize::from_str_radix(mac.rsplit(':').next().unwrap(), 16).unwrap();
        ids[i] = d["id"].as_str().unwrap().to_owned();
        admin_json(&server, &token, &["devices", "accept", &ids[i]]);
    }
    let summary = |reports: &Value| -> Vec<(String, String)> {
        reports
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        (
                            r["origin"].as_str().unwrap_or_default().to_owned(),
                            r["status"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let lan_story: Vec<(String, String)> = ["downloading", "installing", "rebooting"]
        .iter()
        .map(|s| ("lan".to_owned(), (*s).to_owned()))
        .chain([("standalone".to_owned(), "success".to_owned())])
        .collect();
    for n in 1..=4 {
        let mut got = Vec::new();
        wait_for(&devs[n - 1], 60, "the offline reports", || {
            got = summary(&admin_json(
                &server,
                &token,
                &["devices", "reports", &ids[n]],
            ));
            got.len() >= lan_story.len()
        });
        assert_eq!(got, lan_story, "device {n}'s reports");
    }
    // The seed reported its USB install and commit.
    let mut got = Vec::new();
    wait_for(&seed, 60, "the seed's reports", || {
        got = summary(&admin_json(
            &server,
            &token,
            &["devices", "reports", &ids[0]],
        ));
        got.iter().any(|(_, s)| s == "success")
    });
    assert!(got.iter().all(|(o, _)| o == "standalone"), "{got:?}");
    // Device 5 reported nothing: it installed nothing.
    assert_eq!(
        summary(&admin_json(
            &server,
            &token,
            &["devices", "reports", &ids[5]]
        )),
        Vec::<(String, String)>::new()
    );

    // With the server in reach, it decides: the seed installs release 2 from a
    // file, but the server has no deployment for the others (their phase of a
    // rollout, say, has not opened), so they leave the peer's release alone.
    stop(daemons.0[0].as_mut().unwrap());
    ok(seed.run(&["install", setup.path("v2.shoal").to_str().unwrap()]));
    assert_eq!(seed.reboot(), Slot::A);
    daemons.0[0] = Some(seed.start());
    wait_for(&seed, 60, "the seed serving release 2", || {
        seed.log()
            .matches("serving the running release to LAN peers")
            .count()
            >= 2
    });
    // Several poll rounds (1 s apart) of every device with the seed announcing 2
    // (its peers find its new address through the server's peer hand-out).
    std::thread::sleep(Duration::from_secs(8));
    for (i, dev) in devs.iter().enumerate().take(4) {
        assert_eq!(
            dev.log()
                .matches("installing a release a LAN peer runs")
                .count(),
            1,
            "device {} took a peer's release while the server had no deployment for it:\n{}",
            i + 1,
            dev.log()
        );
        assert!(dev.committed_b(), "device {} left release 1", i + 1);
    }
}

fn device_state(server: &Server, token: &str, dep: &str) -> String {
    let v = admin_json(server, token, &["deployments", "devices", dep]);
    v[0]["status"].as_str().unwrap_or_default().to_owned()
}

/// The server signs a fleet credential for each device it accepts (`--fleet-key`);
/// the daemons show them to each other, so peers serve each other in a closed
/// fleet; a decommissioned device's key is handed out as revoked with the next
/// renewal and its peers refuse it.
#[test]
fn the_server_issues_fleet_credentials_and_a_decommissioned_device_is_refused() {
    let setup = Setup::new();
    let d = setup.dir.path();
    ok(run_in(d, &["key", "generate", "--out", "fleet.pem"]));
    // The same root and release keys, now with a fleet role: the fleet is closed.
    std::fs::remove_file(setup.path("root.shoalroot")).unwrap();
    ok(run_in(
        d,
        &[
            "root",
            "init",
            "--root-key",
            "rootk.pem.pub",
            "--release-key",
            "rel.pem.pub",
            "--release-threshold",
            "1",
            "--fleet-key",
            "fleet.pem.pub",
            "--sign",
            "rootk.pem",
            "--out",
            "root.shoalroot",
        ],
    ));
    let data = setup.path("data");
    let fleet_key = setup.path("fleet.pem");
    // A key the root does not name for the fleet is refused at start.
    let refused = shoal()
        .args(["server", "--data"])
        .arg(&data)
        .arg("--root")
        .arg(setup.path("root.shoalroot"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--fleet",
            "site-a",
            "--fleet-key",
        ])
        .arg(setup.path("other.pem"))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refused by the trust root"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let server = Server::start(
        &setup,
        &data,
        &Db::Sqlite,
        &[
            "--fleet-key",
            fleet_key.to_str().unwrap(),
            "--fleet",
            "site-a",
            "--credential-ttl",
            "12",
        ],
    );
    let token = host_token(&data, &Db::Sqlite, "admin");
    let v1 = admin_json(
        &server,
        &token,
        &[
            "releases",
            "upload",
            setup.path("v1.shoal").to_str().unwrap(),
        ],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut devs: Vec<Dev> = Vec::new();
    let mut daemons = Daemons(Vec::new());
    let mut addrs: Vec<String> = Vec::new();
    for n in 0..3u8 {
        let dev = Dev::new(&setup, &server.url, 0x10 + n, &addrs, false);
        daemons.0.push(Some(dev.start()));
        addrs.push(dev.lan_address());
        devs.push(dev);
    }
    let mut pending = Value::Null;
    wait_for(&devs[0], 60, "the pending devices", || {
        pending = admin_json(&server, &token, &["devices", "list", "--status", "pending"]);
        pending.as_array().is_some_and(|a| a.len() == 3)
    });
    let mut ids = vec![String::new(); 3];
    for p in pending.as_array().unwrap() {
        let mac = p["identity"]["mac"].as_str().unwrap();
        let i = usize::from_str_radix(mac.rsplit(':').next().unwrap(), 16).unwrap() - 0x10;
        ids[i] = p["id"].as_str().unwrap().to_owned();
        admin_json(&server, &token, &["devices", "accept", &ids[i]]);
    }
    for dev in &devs {
        wait_for(dev, 60, "a fleet credential", || {
            dev.log().contains("fleet credential from the server")
        });
    }
    // Let the members admit each other.
    std::thread::sleep(Duration::from_secs(2));
    // Device 2 is decommissioned: with their next renewal (half of 12 s) the others
    // learn its key is revoked and refuse it.
    let peer2 = devs[2]
        .log()
        .lines()
        .find(|l| l.contains("joined the LAN"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("peer=")))
        .unwrap()
        .to_owned();
    ok(admin(
        &server,
        &token,
        &["devices", "decommission", &ids[2]],
    ));
    for dev in &devs[..2] {
        wait_for(dev, 30, "device 2 refused as revoked", || {
            dev.log().lines().any(|l| {
                l.contains("not serving a peer outside the fleet")
                    && l.contains(&peer2)
                    && l.contains("revoked")
            })
        });
    }
    // Two devices install v1: each is admitted by the other (a closed fleet
    // serves only members) and sees it as a source.
    let deps: Vec<String> = (0..2)
        .map(|n| {
            admin_json(
                &server,
                &token,
                &[
                    "deployments",
                    "create",
                    "--name",
                    &format!("v1-{n}"),
                    "--release",
                    &v1,
                    "--device",
                    &ids[n],
                ],
            )["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for (dev, dep) in devs.iter().zip(&deps) {
        wait_for(dev, 120, "the install", || {
            device_state(&server, &token, dep) == "rebooting"
        });
    }
    // Chunk bytes each got from its peer (a closed fleet: only with credentials).
    let from_peers: Vec<u64> = devs[..2]
        .iter()
        .map(|dev| {
            let log = dev.log();
            assert!(log.contains("LAN peer serves this release"), "{log}");
            log.lines()
                .filter(|l| l.contains("installed; trial armed"))
                .filter_map(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("from_peers="))
                        .and_then(|v| v.parse::<u64>().ok())
                })
                .next_back()
                .unwrap_or(0)
        })
        .collect();
    assert!(
        from_peers.iter().sum::<u64>() > 0,
        "no chunk crossed the LAN: {from_peers:?}"
    );
}
