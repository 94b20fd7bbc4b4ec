//! LAN peers end to end (issue 13): one real `shoal server` behind a throttled,
//! byte-counting TCP proxy (the site's "uplink"), four `shoal daemon` processes on
//! loopback that find each other through static peers (no root, no multicast), all
//! given the same release. Each chunk should cross the uplink about once: the
//! devices split the chunks by rendezvous hashing and fetch the rest from each
//! other over libp2p. One device is killed in the middle of the transfer; the
//! others take over its chunks, and it finishes once restarted. Every slot is
//! compared with the release image. A third test finds the peers through the
//! server instead (no static peers, no mDNS).

mod lan_common;
mod server_common;

use shoal_tests::installed_field;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use server_common::*;
use shoal_tests::{ok, run_in, shoal};

/// Bytes per second of each proxied connection towards the devices.
const RATE: u64 = 64 * 1024;

/// The uplink: a TCP proxy that throttles and counts what the server sends, and
/// counts the requests for a deployment's signed manifest that cross it.
struct Uplink {
    url: String,
    down: Arc<AtomicU64>,
    manifests: Arc<AtomicU64>,
    dictionaries: Arc<AtomicU64>,
}

/// The tail of a device's request path for a deployment's signed manifest (then
/// ` HTTP/1.1`, or `?held=` naming the manifests the device keeps).
const MANIFEST_REQUEST: &[u8] = b"/manifest";
/// The start of a device's request line for a zstd dictionary.
const DICTIONARY_REQUEST: &[u8] = b"GET /api/devices/v1/dictionaries/";

impl Uplink {
    fn start(upstream: &str) -> Uplink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let target = upstream.trim_start_matches("http://").to_owned();
        let down = Arc::new(AtomicU64::new(0));
        let manifests = Arc::new(AtomicU64::new(0));
        let dictionaries = Arc::new(AtomicU64::new(0));
        let (d, m, y) = (
            Arc::clone(&down),
            Arc::clone(&manifests),
            Arc::clone(&dictionaries),
        );
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (m, y) = (Arc::clone(&m), Arc::clone(&y));
                std::thread::spawn(move || pipe(c2, s2, Count::Requests(m, y)));
                let d = Arc::clone(&d);
                std::thread::spawn(move || pipe(server, client, Count::Bytes(d)));
            }
        });
        Uplink {
            url,
            down,
            manifests,
            dictionaries,
        }
    }
}

/// What a proxied direction counts.
enum Count {
    /// Bytes (towards the devices; throttled).
    Bytes(Arc<AtomicU64>),
    /// Manifest and dictionary requests (towards the server).
    Requests(Arc<AtomicU64>, Arc<AtomicU64>),
}

fn pipe(mut from: TcpStream, mut to: TcpStream, count: Count) {
    let mut buf = [0u8; 8192];
    // The end of what came before, so a request line split across reads counts.
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        match &count {
            Count::Bytes(c) => {
                c.fetch_add(n as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(n as u64 * 1_000_000 / RATE));
            }
            Count::Requests(manifests, dictionaries) => {
                carry.extend_from_slice(&buf[..n]);
                for (what, c) in [
                    (MANIFEST_REQUEST, manifests),
                    (DICTIONARY_REQUEST, dictionaries),
                ] {
                    let found = carry.windows(what.len()).filter(|w| *w == what).count();
                    c.fetch_add(found as u64, Ordering::Relaxed);
                }
                let keep = carry.len().min(DICTIONARY_REQUEST.len() - 1);
                carry.drain(..carry.len() - keep);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

struct Dev {
    dir: tempfile::TempDir,
}

impl Dev {
    fn new(setup: &Setup, server_url: &str, n: u8, peers: &[String]) -> Dev {
        let dir = tempfile::tempdir().expect("tempdir");
        let mac = format!("02:00:00:00:01:{n:02x}");
        lan_common::write_device(
            dir.path(),
            setup,
            server_url,
            &mac,
            100 + u64::from(n),
            peers,
            "",
        );
        Dev { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start(&self) -> Child {
        self.start_with(&[])
    }

    fn start_with(&self, env: &[(&str, &str)]) -> Child {
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
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn shoal daemon")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// The daemon's peer id, as it logged it when it joined the LAN.
    fn peer_id(&self) -> String {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains("joined the LAN"))
            .expect("the daemon joined the LAN");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("peer="))
            .expect("peer= in the joined line")
            .to_owned()
    }

    /// Where the daemon listens for peers (written once it does).
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

fn device_state(server: &Server, token: &str, dep: &str) -> String {
    let v = admin_json(server, token, &["deployments", "devices", dep]);
    v[0]["status"].as_str().unwrap_or_default().to_owned()
}

/// A site: the server with v1 uploaded, the uplink, `n` accepted devices that
/// know each other as static peers (device `bad`, if any, started with `env`).
struct Site {
    setup: Setup,
    server: Server,
    token: String,
    v1: String,
    stored: u64,
    uplink: Uplink,
    devs: Vec<Dev>,
    daemons: Vec<Child>,
    ids: Vec<String>,
}

impl Site {
    fn new(n: u8, bad: Option<(u8, &[(&str, &str)])>) -> Site {
        Site::with(n, bad, true)
    }

    /// A site whose devices know each other as static peers, or (with
    /// `static_peers` false) only through the server, which hands each accepted
    /// device the others behind the same public address (127.0.0.1 here).
    fn with(n: u8, bad: Option<(u8, &[(&str, &str)])>, static_peers: bool) -> Site {
        let setup = Setup::new();
        let data = setup.path("data");
        let server = Server::start(&setup, &data, &Db::Sqlite, &[]);
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
        let stored: u64 = {
            let d: Value = serde_json::from_str(&ok(run_in(
                setup.dir.path(),
                &["artifact", "diff", "v1.shoal", "v1.shoal", "--json"],
            )))
            .unwrap();
            d["full_stored_bytes"].as_u64().unwrap()
        };
        let uplink = Uplink::start(&server.url);
        // Each device names the ones started before it as static peers.
        let mut devs: Vec<Dev> = Vec::new();
        let mut daemons: Vec<Child> = Vec::new();
        let mut addrs: Vec<String> = Vec::new();
        for i in 0..n {
            let known: &[String] = if static_peers { &addrs } else { &[] };
            let dev = Dev::new(&setup, &uplink.url, i, known);
            daemons.push(match bad {
                Some((b, env)) if b == i => dev.start_with(env),
                _ => dev.start(),
            });
            addrs.push(dev.lan_address());
            devs.push(dev);
        }
        let mut pending = Value::Null;
        wait_for(&devs[0], 60, "the pending devices", || {
            pending = admin_json(&server, &token, &["devices", "list", "--status", "pending"]);
            pending
                .as_array()
                .is_some_and(|a| a.len() == usize::from(n))
        });
        let mut ids = vec![String::new(); usize::from(n)];
        for d in pending.as_array().unwrap() {
            let mac = d["identity"]["mac"].as_str().unwrap();
            let i = usize::from_str_radix(mac.rsplit(':').next().unwrap(), 16).unwrap();
            ids[i] = d["id"].as_str().unwrap().to_owned();
            admin_json(&server, &token, &["devices", "accept", &ids[i]]);
        }
        if !static_peers {
            // Each device hears of the others at its next polls.
            let others = format!("peers={}", n - 1);
            for dev in &devs {
                wait_for(dev, 30, "the LAN peers from the server", || {
                    dev.log().lines().any(|l| {
                        l.contains("LAN peers behind our public address, from the server")
                            && l.contains(&others)
                    })
                });
            }
        }
        // Let the peers connect and the polls settle before the deployments.
        std::thread::sleep(Duration::from_secs(2));
        Site {
            setup,
            server,
            token,
            v1,
            stored,
            uplink,
            devs,
            daemons,
            ids,
        }
    }

    /// Deploys v1 to every device; the deployment ids.
    fn deploy(&self) -> Vec<String> {
        self.deploy_to(&(0..self.ids.len()).collect::<Vec<_>>())
    }

    /// Deploys v1 to the devices `which`; their deployment ids.
    fn deploy_to(&self, which: &[usize]) -> Vec<String> {
        which
            .iter()
            .map(|&n| (n, &self.ids[n]))
            .map(|(n, id)| {
                admin_json(
                    &self.server,
                    &self.token,
                    &[
                        "deployments",
                        "create",
                        "--name",
                        &format!("v1-{n}"),
                        "--release",
                        &self.v1,
                        "--device",
                        id,
                    ],
                )["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    fn state(&self, dep: &str) -> String {
        device_state(&self.server, &self.token, dep)
    }

    /// Checks device `n`'s slot B holds v1, byte for byte.
    fn check_slot(&self, n: usize) {
        let v1_img = std::fs::read(self.setup.path("v1.img")).unwrap();
        let b = std::fs::read(self.devs[n].path("b.img")).unwrap();
        assert!(
            b[..v1_img.len()] == v1_img[..],
            "device {n}'s slot B differs"
        );
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            stop(d);
        }
    }
}

#[test]
fn lan_peers_share_chunks_so_each_crosses_the_uplink_about_once() {
    let mut site = Site::new(4, None);
    let before = site.uplink.down.load(Ordering::Relaxed);
    let deps = site.deploy();

    // Device 3 dies in the middle of the transfer.
    wait_for(&site.devs[3], 60, "device 3 downloading", || {
        site.state(&deps[3]) == "downloading"
    });
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        installed_field(&site.devs[3].log(), "fetched").is_none(),
        "device 3 finished before it could be killed; slow the uplink down"
    );
    stop(&mut site.daemons[3]);

    for (dev, dep) in site.devs.iter().zip(&deps).take(3) {
        wait_for(dev, 120, "the install", || site.state(dep) == "rebooting");
    }
    site.daemons[3] = site.devs[3].start();
    wait_for(
        &site.devs[3],
        120,
        "device 3's install after its restart",
        || site.state(&deps[3]) == "rebooting",
    );
    let down = site.uplink.down.load(Ordering::Relaxed) - before;
    let stored = site.stored;

    // Every slot holds the release, byte for byte.
    for n in 0..4 {
        site.check_slot(n);
    }
    // The devices that lived through it got chunks from their peers.
    let from_peers: Vec<u64> = site
        .devs
        .iter()
        .map(|d| installed_field(&d.log(), "from_peers").unwrap_or(0))
        .collect();
    // Chunk batch bytes each daemon read from the server (its own counter; the
    // killed device's first run is not in it, the uplink counter has it).
    let from_server: Vec<u64> = site
        .devs
        .iter()
        .map(|d| installed_field(&d.log(), "transferred").unwrap_or(0))
        .collect();
    let chunk_bytes: u64 = from_server.iter().sum();
    eprintln!(
        "uplink bytes: {down} for a release of {stored} stored bytes ({:.2}x); chunk bytes from the server: {from_server:?} ({:.2}x); from peers: {from_peers:?}",
        down as f64 / stored as f64,
        chunk_bytes as f64 / stored as f64,
    );
    for (n, &b) in from_peers.iter().enumerate().take(3) {
        assert!(
            b > 0,
            "device {n} got nothing from its peers:\n{}",
            site.devs[n].log()
        );
        // What the engine installed from peers: distinct chunk bytes, some, and
        // no more than it fetched from the network in all.
        let log = site.devs[n].log();
        let installed = installed_field(&log, "installed_from_peers")
            .expect("installed_from_peers= in the install line");
        let fetched = installed_field(&log, "fetched").expect("fetched= in the install line");
        assert!(
            installed > 0 && installed <= fetched,
            "device {n}: {installed} bytes installed from peers, {fetched} fetched:\n{log}"
        );
    }
    // Four devices without the LAN would pull 4x; with it, each chunk about once.
    assert!(
        chunk_bytes < stored * 3 / 2,
        "{chunk_bytes} chunk bytes came from the server for a release of {stored} stored bytes"
    );
    // Everything that crossed the uplink: the chunks, what the killed device had in
    // flight, and the API's polls, manifests and status reports.
    assert!(
        down < stored * 5 / 2,
        "{down} bytes crossed the uplink for a release of {stored} stored bytes"
    );
}

/// A peer that serves corrupt chunks (the test-only fault mode) is banned by the
/// engine of every device it serves and blocked on the LAN; every slot still
/// verifies.
#[test]
fn a_peer_serving_corrupt_chunks_is_banned_and_every_slot_verifies() {
    let site = Site::new(4, Some((0, &[("SHOAL_TEST_PEER_FAULT", "corrupt")])));
    let deps = site.deploy();
    for (n, (dev, dep)) in site.devs.iter().zip(&deps).enumerate() {
        wait_for(dev, 120, "the install", || site.state(dep) == "rebooting");
        site.check_slot(n);
    }
    for n in 1..4 {
        let log = site.devs[n].log();
        assert!(
            log.contains("sent a corrupt chunk; banned"),
            "device {n} never banned the corrupting peer:\n{log}"
        );
        assert!(
            log.contains("blocking a peer: it sent a corrupt chunk"),
            "device {n} did not block it on the LAN"
        );
    }
}

/// Where multicast is blocked and no static peers are configured (mDNS off, no
/// `static_peers`), the server hands each accepted device the others it sees
/// behind the same public address: on loopback every device is 127.0.0.1, so
/// they all find each other and share the release's chunks.
#[test]
fn devices_behind_one_public_address_find_each_other_through_the_server() {
    let site = Site::with(3, None, false);
    let deps = site.deploy();
    for (n, (dev, dep)) in site.devs.iter().zip(&deps).enumerate() {
        wait_for(dev, 120, "the install", || site.state(dep) == "rebooting");
        site.check_slot(n);
    }
    let from_peers: Vec<u64> = site
        .devs
        .iter()
        .map(|d| installed_field(&d.log(), "from_peers").unwrap_or(0))
        .collect();
    let chunk_bytes: u64 = site
        .devs
        .iter()
        .map(|d| installed_field(&d.log(), "transferred").unwrap_or(0))
        .sum();
    eprintln!(
        "chunk bytes from the server: {chunk_bytes} for {} stored bytes; from peers: {from_peers:?}",
        site.stored
    );
    for (n, &b) in from_peers.iter().enumerate() {
        assert!(
            b > 0,
            "device {n} got nothing from its peers:\n{}",
            site.devs[n].log()
        );
    }
    assert!(
        chunk_bytes < site.stored * 3 / 2,
        "{chunk_bytes} chunk bytes came from the server for a release of {} stored bytes",
        site.stored
    );
}

/// The release's signed manifest crosses the uplink once for the whole site: the
/// HRW owner of its id fetches it from the server, the other devices get it from a
/// peer that holds it and verify it like the server's.
#[test]
fn the_release_manifest_crosses_the_uplink_once_per_site() {
    let site = Site::new(4, None);
    let deps = site.deploy();
    for (n, (dev, dep)) in site.devs.iter().zip(&deps).enumerate() {
        wait_for(dev, 120, "the install", || site.state(dep) == "rebooting");
        site.check_slot(n);
    }
    let from_server = site.uplink.manifests.load(Ordering::Relaxed);
    let from_peers = site
        .devs
        .iter()
        .filter(|d| {
            d.log()
                .contains("the release's manifest came from a LAN peer")
        })
        .count();
    let dictionaries = site.uplink.dictionaries.load(Ordering::Relaxed);
    let dictionaries_from_peers = site
        .devs
        .iter()
        .filter(|d| d.log().contains("a zstd dictionary came from a LAN peer"))
        .count();
    eprintln!(
        "manifest requests across the uplink: {from_server}; devices that got it from a peer: {from_peers}; \
         dictionary requests across the uplink: {dictionaries}; devices that got one from a peer: {dictionaries_from_peers}"
    );
    // The release's chunks are compressed with one dictionary: one device fetches
    // it, the others get it from a peer.
    assert_eq!(dictionaries, 1, "dictionary requests across the uplink");
    assert_eq!(
        dictionaries_from_peers, 3,
        "devices that got the dictionary from a peer"
    );
    assert_eq!(
        from_server,
        1,
        "the manifest was fetched {from_server} times over the uplink; logs:\n{}",
        site.devs
            .iter()
            .map(Dev::log)
            .collect::<Vec<_>>()
            .join("\n----\n")
    );
    assert_eq!(from_peers, 3, "three devices got the manifest from a peer");
    // Each device checked the release's manifest against its trust root once,
    // whether it came from the server or a peer: the install used that check.
    for (n, dev) in site.devs.iter().enumerate() {
        let log = dev.log();
        assert_eq!(
            installed_field(&log, "manifest_checks"),
            Some(1),
            "device {n}:\n{log}"
        );
    }
}

/// A site of four whose device 0 misbehaves as `fault` (the test-only fault mode)
/// and gets the release first, so it is the one holder the others see; then devices
/// 1-3 install it, and every slot verifies.
fn liar_first_then_three_more(fault: &str) -> Site {
    let site = Site::new(4, Some((0, &[("SHOAL_TEST_PEER_FAULT", fault)])));
    let first = &site.deploy_to(&[0])[0];
    wait_for(&site.devs[0], 120, "the liar's install", || {
        site.state(first) == "rebooting"
    });
    let deps = site.deploy_to(&[1, 2, 3]);
    for (n, dep) in (1..4).zip(&deps) {
        wait_for(&site.devs[n], 120, "the install", || {
            site.state(dep) == "rebooting"
        });
        site.check_slot(n);
    }
    site.check_slot(0);
    site
}

/// A peer that hands out a manifest whose signature does not verify (the test-only
/// fault mode) is blocked by every device it lies to; they get the manifest
/// elsewhere (another peer, or the server), and every slot still verifies.
#[test]
fn a_peer_lying_about_the_manifest_is_blocked_and_every_device_updates() {
    let site = liar_first_then_three_more("manifest");
    let mut lied_to = 0;
    for n in 1..4 {
        let log = site.devs[n].log();
        if log.contains("a LAN peer's manifest was refused") {
            lied_to += 1;
            assert!(
                log.contains("blocking a peer: it sent a manifest that does not verify"),
                "device {n} refused the manifest but did not block the peer:\n{log}"
            );
        }
        assert!(
            !log.contains("the manifest was refused"),
            "device {n} reported a refused manifest to the server:\n{log}"
        );
    }
    // The liar was the only holder when the first of the others looked.
    assert!(lied_to >= 1, "no device was lied to");
    // Nobody got a manifest from the liar.
    let liar = site.devs[0].peer_id();
    for n in 1..4 {
        let log = site.devs[n].log();
        assert!(
            !log.lines().any(
                |l| l.contains("the release's manifest came from a LAN peer") && l.contains(&liar)
            ),
            "device {n} took the liar's manifest:\n{log}"
        );
    }
}

/// A peer that hands out a forged zstd dictionary (the test-only fault mode: its
/// content changed, so the id derived from it is no longer the one asked for;
/// keeping the id would take a 31-bit collision search) is blocked by every device
/// that asks it; they get the dictionary elsewhere, and every slot still verifies.
#[test]
fn a_peer_lying_about_the_dictionary_is_blocked_and_every_device_updates() {
    let site = liar_first_then_three_more("dictionary");
    let liar = site.devs[0].peer_id();
    let mut lied_to = 0;
    for n in 1..4 {
        let log = site.devs[n].log();
        if log.contains("a LAN peer sent another dictionary") {
            lied_to += 1;
            assert!(
                log.lines().any(|l| l.contains(
                    "blocking a peer: it sent a dictionary that is not the one asked for"
                ) && l.contains(&liar)),
                "device {n} refused the dictionary but did not block the liar:\n{log}"
            );
        }
        assert!(
            !log.lines()
                .any(|l| l.contains("a zstd dictionary came from a LAN peer") && l.contains(&liar)),
            "device {n} took the liar's dictionary:\n{log}"
        );
    }
    assert!(
        lied_to >= 1,
        "no device asked the liar for the dictionary:\n{}",
        site.devs[1].log()
    );
}
