//! Real libp2p on loopback, in one process: only the fleet is served.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_artifact::ChunkId;
use shoal_bootctl::Slot;
use shoal_bootctl::env::Env;
use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::scheme::{Flavor, Scheme};
use shoal_engine::FetchFailure;
use shoal_signing::{Credential, SecretKey, SignedRoot, TrustRoot};

use super::proto::{ChunkData, ManifestId};
use super::serve::Served;
use super::{Lan, keypair};
use crate::config::Config;

pub(crate) fn key(n: u8) -> SecretKey {
    SecretKey::from_seed(&[n; 32])
}

const FLEET_KEY: u8 = 3;
const OTHER_FLEET_KEY: u8 = 4;

/// A device with slot files and a trust root naming fleet key 3; `credential`
/// is (fleet name, signing key) or none.
pub(crate) fn device(
    dir: &Path,
    n: u8,
    credential: Option<(&str, u8)>,
    peers: &[String],
) -> (Config, SecretKey) {
    device_on(dir, n, credential, peers, "/ip4/127.0.0.1/tcp/0")
}

/// [`device`], listening on `listen` only.
fn device_on(
    dir: &Path,
    n: u8,
    credential: Option<(&str, u8)>,
    peers: &[String],
    listen: &str,
) -> (Config, SecretKey) {
    let d = dir.join(format!("dev{n}"));
    std::fs::create_dir_all(&d).unwrap();
    let k = key(100 + n);
    let mut a = vec![0u8; 256 * 1024];
    for (i, b) in a.iter_mut().enumerate() {
        *b = (i * 7 + usize::from(n)) as u8;
    }
    std::fs::write(d.join("a.img"), &a).unwrap();
    std::fs::write(d.join("b.img"), vec![0u8; 256 * 1024]).unwrap();
    let mut env = FileEnv::open(&d.join("bootenv"), true).unwrap();
    env.store(&Scheme::Shoal.initial(Flavor::File, Slot::A))
        .unwrap();
    let root = TrustRoot::new(
        1,
        4_000_000_000,
        &[key(1).public()],
        1,
        &[key(2).public()],
        1,
    )
    .unwrap()
    .with_fleet(&[key(FLEET_KEY).public()], 1)
    .unwrap();
    let mut signed = SignedRoot::new(root);
    signed.envelope.sign(&key(1));
    signed.save(&d.join("root.shoalroot")).unwrap();
    let cred_line = match credential {
        Some((fleet, signer)) => {
            let c = Credential::new(k.public(), fleet, 4_000_000_000).issue(&[&key(signer)]);
            std::fs::write(d.join("fleet.cred"), c).unwrap();
            format!("credential = \"{}\"\n", d.join("fleet.cred").display())
        }
        None => String::new(),
    };
    let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    let text = format!(
        "[device]\ntype = \"board\"\ndata_dir = \"{data}\"\ntrust_root = \"{root}\"\n\
         [lan]\nenabled = true\nlisten = [\"{listen}\"]\nmdns = false\n\
         static_peers = [{peers}]\n{cred_line}\
         [slots]\na = {{ path = \"{a}\" }}\nb = {{ path = \"{b}\" }}\n\
         [bootloader]\ntype = \"file\"\npath = \"{env}\"\n",
        data = d.join("data").display(),
        root = d.join("root.shoalroot").display(),
        peers = peers.join(", "),
        a = d.join("a.img").display(),
        b = d.join("b.img").display(),
        env = d.join("bootenv").display(),
    );
    (Config::parse(&text, Path::new("t.toml")).unwrap(), k)
}

fn address(config: &Config) -> String {
    let path = config.device.data_dir.join("lan-addresses");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Some(line) = text.lines().next()
        {
            return line.to_owned();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no listen address in {}", path.display());
}

fn ask(
    lan: &Lan,
    peer: libp2p_identity::PeerId,
    release: ManifestId,
    id: ChunkId,
) -> Result<Vec<ChunkData>, FetchFailure> {
    let (tx, rx) = std::sync::mpsc::channel();
    lan.chunks(
        peer,
        release,
        vec![id],
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv_timeout(Duration::from_secs(30)).expect("an answer")
}

/// A verified release of the first `chunks` 4 KiB chunks of `img`, served from
/// `slot`.
fn served(img: &[u8], chunks: usize, slot: Slot) -> Served {
    use shoal_engine::testing;
    let image = &img[..chunks * 4096];
    let (key, root) = testing::keys(1);
    let (manifest, _) = testing::release_cut("os", "1", 1, "board", image, &[4096]);
    let release =
        shoal_engine::VerifiedRelease::verify(&root, testing::sign(&manifest, &key), None)
            .expect("verifies");
    let envelope = super::serve::EnvelopeAt::of(&release, None).expect("kept");
    Served::new(release, envelope, slot)
}

/// `a` runs a release from its slot A, whose image is `a_img`: four chunks, the
/// first four 4 KiB of it. Returns their ids in order, and the release.
fn serve_four_chunks(a: &Lan, a_img: &[u8]) -> (Vec<ChunkId>, ManifestId) {
    let ids: Vec<ChunkId> = (0..4)
        .map(|i| ChunkId::from(blake3::hash(&a_img[i * 4096..(i + 1) * 4096])))
        .collect();
    let s = served(a_img, 4, Slot::A);
    let release = s.manifest;
    a.serve_running(Some(Arc::new(s)));
    (ids, release)
}

/// Waits up to 30 s for `b` to hear that `a` runs `release`; panics with `what`
/// otherwise.
fn hears_what_it_runs(b: &Lan, a: libp2p_identity::PeerId, release: ManifestId, what: &str) {
    let runs = || b.peers().snapshot().get(&a).and_then(|s| s.running);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && runs() != Some(release) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(runs(), Some(release), "{what}");
}

#[test]
fn only_members_of_the_fleet_get_chunks() {
    let dir = tempfile::tempdir().unwrap();
    // A serves its running slot: one chunk, the first 4 KiB.
    let (a_cfg, a_key) = device(dir.path(), 0, Some(("plant", FLEET_KEY)), &[]);
    let a = Lan::start(&a_cfg, &a_key).expect("a starts");
    let a_img = std::fs::read(&a_cfg.slots.a.path).unwrap();
    let id = ChunkId::from(blake3::hash(&a_img[..4096]));
    let s = served(&a_img, 1, Slot::A);
    let release = s.manifest;
    a.serve_running(Some(Arc::new(s)));
    let a_addr = address(&a_cfg);
    let a_peer = keypair(&a_key).unwrap().public().to_peer_id();

    // B: a member. C: no credential. D: a credential of another fleet (signed by a
    // key A's root does not name). E: the right fleet name, but signed by a
    // stranger's key.
    let (b_cfg, b_key) = device(
        dir.path(),
        1,
        Some(("plant", FLEET_KEY)),
        std::slice::from_ref(&a_addr),
    );
    let (c_cfg, c_key) = device(dir.path(), 2, None, std::slice::from_ref(&a_addr));
    let (d_cfg, d_key) = device(
        dir.path(),
        3,
        Some(("other-plant", FLEET_KEY)),
        std::slice::from_ref(&a_addr),
    );
    let (e_cfg, e_key) = device(dir.path(), 4, Some(("plant", OTHER_FLEET_KEY)), &[a_addr]);
    let b = Lan::start(&b_cfg, &b_key).expect("b starts");
    let c = Lan::start(&c_cfg, &c_key).expect("c starts");
    let d = Lan::start(&d_cfg, &d_key).expect("d starts");
    let e = Lan::start(&e_cfg, &e_key).expect("e starts");

    // B learns what A runs; A admits B and nobody else.
    hears_what_it_runs(&b, a_peer, release, "the member never heard what A runs");
    match ask(&b, a_peer, release, id) {
        Ok(chunks) => assert_eq!(chunks, vec![ChunkData::Bytes(a_img[..4096].to_vec())]),
        Err(f) => panic!("the member got {f:?}"),
    }
    // The strangers are connected (they dialled A), and get nothing: not the
    // chunk, not even which release A runs.
    for (name, lan) in [("no credential", &c), ("other fleet", &d), ("forged", &e)] {
        assert_eq!(
            ask(lan, a_peer, release, id),
            Err(FetchFailure::DropSource),
            "{name}: served"
        );
        assert!(
            lan.peers()
                .snapshot()
                .get(&a_peer)
                .is_none_or(|s| s.running.is_none()),
            "{name}: learnt what A runs"
        );
    }
    let admitted = a.peers().snapshot();
    assert!(admitted.contains_key(&b.peer_id()));
    for lan in [&c, &d, &e] {
        assert!(
            !admitted.contains_key(&lan.peer_id()),
            "a stranger is in A's table"
        );
    }
}

/// A peer is served at most `[lan] serve_rate_kib_s` chunk bytes a second (a
/// token bucket per peer, full at first): a batch past it gets "later" for the
/// rest, and the bucket refills with time.
#[test]
fn each_peer_is_served_at_most_its_byte_rate() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a_cfg, a_key) = device(dir.path(), 0, Some(("plant", FLEET_KEY)), &[]);
    // 8 KiB a second: two of A's 4 KiB chunks.
    a_cfg.lan.serve_rate_kib_s = 8;
    let a = Lan::start(&a_cfg, &a_key).expect("a starts");
    let a_img = std::fs::read(&a_cfg.slots.a.path).unwrap();
    let (ids, release) = serve_four_chunks(&a, &a_img);
    let a_peer = keypair(&a_key).unwrap().public().to_peer_id();
    let (b_cfg, b_key) = device(
        dir.path(),
        1,
        Some(("plant", FLEET_KEY)),
        &[address(&a_cfg)],
    );
    let b = Lan::start(&b_cfg, &b_key).expect("b starts");
    hears_what_it_runs(&b, a_peer, release, "the member never heard what A runs");

    let (tx, rx) = std::sync::mpsc::channel();
    b.chunks(
        a_peer,
        release,
        ids.clone(),
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("an answer")
        .expect("served");
    let bytes = |i: usize| ChunkData::Bytes(a_img[i * 4096..(i + 1) * 4096].to_vec());
    assert_eq!(
        first,
        vec![bytes(0), bytes(1), ChunkData::Later, ChunkData::Later],
        "one batch gets the bucket's 8 KiB, the rest later"
    );
    // Over a second later the bucket holds at least one chunk's bytes again.
    std::thread::sleep(Duration::from_millis(1200));
    match ask(&b, a_peer, release, ids[2]) {
        Ok(chunks) => assert_eq!(chunks, vec![bytes(2)]),
        Err(f) => panic!("the member got {f:?} after the refill"),
    }
}

/// A device with `[lan] listen` naming one QUIC address, and `quic` as given.
#[cfg(feature = "quic")]
fn lan_config(listen: &[&str], quic: bool) -> crate::config::Lan {
    crate::config::Lan {
        listen: listen.iter().map(|a| (*a).to_owned()).collect(),
        quic,
        ..crate::config::Lan::default()
    }
}

#[test]
#[cfg(feature = "quic")]
fn quic_twins_each_plain_tcp_address() {
    let addrs = |lan| -> Vec<String> {
        super::listen_addresses(&lan)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(
        addrs(lan_config(
            &["/ip4/0.0.0.0/tcp/0", "/ip6/::/tcp/4040"],
            true
        )),
        [
            "/ip4/0.0.0.0/tcp/0",
            "/ip6/::/tcp/4040",
            "/ip4/0.0.0.0/udp/0/quic-v1",
            "/ip6/::/udp/4040/quic-v1"
        ]
    );
    // Listed already: not twice. QUIC only: no TCP added. Off: as listed.
    assert_eq!(
        addrs(lan_config(
            &["/ip4/10.0.0.1/tcp/7", "/ip4/10.0.0.1/udp/7/quic-v1"],
            true
        )),
        ["/ip4/10.0.0.1/tcp/7", "/ip4/10.0.0.1/udp/7/quic-v1"]
    );
    assert_eq!(
        addrs(lan_config(&["/ip4/127.0.0.1/udp/0/quic-v1"], true)),
        ["/ip4/127.0.0.1/udp/0/quic-v1"]
    );
    assert_eq!(
        addrs(lan_config(&["/ip4/0.0.0.0/tcp/0"], false)),
        ["/ip4/0.0.0.0/tcp/0"]
    );
    // Only a bare IP + TCP address has a twin.
    assert_eq!(
        addrs(lan_config(&["/dns4/example.com/tcp/1"], true)),
        ["/dns4/example.com/tcp/1"]
    );
}

/// Every address in `config`'s `lan-addresses` file (once `n` are there).
#[cfg(feature = "quic")]
fn addresses(config: &Config, n: usize) -> Vec<String> {
    let path = config.device.data_dir.join("lan-addresses");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[cfg(feature = "quic")]
fn quic_alone_carries_chunks_to_members_only_and_blocks() {
    const QUIC: &str = "/ip4/127.0.0.1/udp/0/quic-v1";
    let dir = tempfile::tempdir().unwrap();
    let (a_cfg, a_key) = device_on(dir.path(), 0, Some(("plant", FLEET_KEY)), &[], QUIC);
    let a = Lan::start(&a_cfg, &a_key).expect("a starts");
    let a_img = std::fs::read(&a_cfg.slots.a.path).unwrap();
    let (ids, release) = serve_four_chunks(&a, &a_img);
    // A listens on QUIC and nothing else: whoever reaches A does so over QUIC.
    let a_addrs = addresses(&a_cfg, 1);
    assert_eq!(a_addrs.len(), 1, "{a_addrs:?}");
    let a_addr = a_addrs[0].clone();
    assert!(
        a_addr.starts_with("/ip4/127.0.0.1/udp/") && a_addr.contains("/quic-v1/p2p/"),
        "{a_addr}"
    );
    let a_peer = keypair(&a_key).unwrap().public().to_peer_id();

    // B: a member; C: no credential; D: another fleet. All on QUIC only.
    let (b_cfg, b_key) = device_on(
        dir.path(),
        1,
        Some(("plant", FLEET_KEY)),
        std::slice::from_ref(&a_addr),
        QUIC,
    );
    let (c_cfg, c_key) = device_on(dir.path(), 2, None, std::slice::from_ref(&a_addr), QUIC);
    let (d_cfg, d_key) = device_on(
        dir.path(),
        3,
        Some(("other-plant", FLEET_KEY)),
        std::slice::from_ref(&a_addr),
        QUIC,
    );
    let b = Lan::start(&b_cfg, &b_key).expect("b starts");
    let c = Lan::start(&c_cfg, &c_key).expect("c starts");
    let d = Lan::start(&d_cfg, &d_key).expect("d starts");

    hears_what_it_runs(
        &b,
        a_peer,
        release,
        "the member never heard over QUIC what A runs",
    );
    // A batch of chunks over QUIC, byte for byte.
    let (tx, rx) = std::sync::mpsc::channel();
    b.chunks(
        a_peer,
        release,
        ids.clone(),
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    let got = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("an answer")
        .expect("chunks");
    let want: Vec<ChunkData> = (0..4)
        .map(|i| ChunkData::Bytes(a_img[i * 4096..(i + 1) * 4096].to_vec()))
        .collect();
    assert_eq!(got, want);

    // The strangers reach A over QUIC and get nothing.
    for (name, lan) in [("no credential", &c), ("other fleet", &d)] {
        assert_eq!(
            ask(lan, a_peer, release, ids[0]),
            Err(FetchFailure::DropSource),
            "{name}: served over QUIC"
        );
        assert!(
            lan.peers()
                .snapshot()
                .get(&a_peer)
                .is_none_or(|s| s.running.is_none()),
            "{name}: learnt over QUIC what A runs"
        );
    }
    let admitted = a.peers().snapshot();
    assert!(admitted.contains_key(&b.peer_id()));
    assert!(!admitted.contains_key(&c.peer_id()));
    assert!(!admitted.contains_key(&d.peer_id()));

    // The block list closes B's QUIC connection and refuses it from then on
    // (B keeps redialling A, a static peer).
    a.block(b.peer_id());
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && b.peers().snapshot().contains_key(&a_peer) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !b.peers().snapshot().contains_key(&a_peer),
        "B still connected to A after the block"
    );
    assert!(!a.peers().snapshot().contains_key(&b.peer_id()));
    std::thread::sleep(Duration::from_secs(4)); // past a redial (3 s)
    assert_eq!(
        ask(&b, a_peer, release, ids[0]),
        Err(FetchFailure::RetryLater),
        "a blocked peer was answered over QUIC"
    );
}

/// Runs `ip` with `args`; panics naming iproute2 when it is missing or fails.
#[cfg(feature = "quic")]
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (Debian package iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// mDNS announces QUIC addresses: two devices that listen on QUIC only (no static
/// peer, no TCP) find each other by multicast DNS and talk. mDNS ignores loopback,
/// so the test runs itself again (as root, as CI does) in a network namespace of
/// its own with a veth interface, `shl-quic-<pid>`, which it deletes.
#[test]
#[cfg(feature = "quic")]
fn mdns_finds_peers_over_quic_alone() {
    const INSIDE: &str = "SHOAL_TEST_IN_NETNS";
    if std::env::var_os(INSIDE).is_none() {
        let ns = format!("shl-quic-{}", std::process::id());
        ip(&["netns", "add", &ns]);
        struct Gone(String);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &self.0])
                    .status();
            }
        }
        let _gone = Gone(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &ns, "link", "add", "shlq0", "type", "veth", "peer", "name", "shlq1",
        ]);
        ip(&["-n", &ns, "addr", "add", "10.77.9.1/24", "dev", "shlq0"]);
        ip(&["-n", &ns, "link", "set", "shlq0", "up"]);
        ip(&["-n", &ns, "link", "set", "shlq1", "up"]);
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "lan::tests::mdns_finds_peers_over_quic_alone"])
            .env(INSIDE, "1")
            .output()
            .expect("ip netns exec");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "inside {ns}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    const QUIC: &str = "/ip4/0.0.0.0/udp/0/quic-v1";
    let dir = tempfile::tempdir().unwrap();
    let mdns = |mut c: Config| {
        c.lan.mdns = true;
        c.lan.mdns_query_interval_s = 1;
        c
    };
    let (a_cfg, a_key) = device_on(dir.path(), 0, Some(("plant", FLEET_KEY)), &[], QUIC);
    let a_img = std::fs::read(&a_cfg.slots.a.path).unwrap();
    let a = Lan::start(&mdns(a_cfg), &a_key).expect("a starts");
    let s = served(&a_img, 1, Slot::A);
    let release = s.manifest;
    a.serve_running(Some(Arc::new(s)));
    let a_peer = keypair(&a_key).unwrap().public().to_peer_id();
    let (b_cfg, b_key) = device_on(dir.path(), 1, Some(("plant", FLEET_KEY)), &[], QUIC);
    let b = Lan::start(&mdns(b_cfg), &b_key).expect("b starts");
    hears_what_it_runs(&b, a_peer, release, "B never found A by mDNS over QUIC");
}
