//! The device of the LAN tests on loopback (lan_e2e, lan_offline): file-backed
//! slots (slot A unrelated to the release, so all of it is needed), a file
//! bootloader environment, a health directory and a config with a `[lan]` section
//! on loopback with static peers and no mDNS.

use std::path::Path;

use shoal_bootctl::Slot;
use shoal_bootctl::env::Env;
use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::scheme::{Flavor, Scheme};

use crate::server_common::{Setup, image};

/// Size of each slot file.
const SLOT: usize = 4 << 20;

/// Writes a device into `dir`: slot A filled from `seed`, identity `mac`, polling
/// `server_url`, `peers` as static peers, and `lan_extra` lines added to `[lan]`.
pub fn write_device(
    dir: &Path,
    setup: &Setup,
    server_url: &str,
    mac: &str,
    seed: u64,
    peers: &[String],
    lan_extra: &str,
) {
    let p = |f: &str| dir.join(f);
    // Slot A holds something unrelated: the whole release is needed.
    let mut a = image(seed, 3 << 20);
    a.resize(SLOT, 0);
    std::fs::write(p("a.img"), &a).unwrap();
    std::fs::File::create(p("b.img"))
        .and_then(|f| f.set_len(SLOT as u64))
        .unwrap();
    let mut env = FileEnv::open(&p("bootenv"), true).unwrap();
    env.store(&Scheme::Shoal.initial(Flavor::File, Slot::A))
        .unwrap();
    std::fs::create_dir_all(p("health.d")).unwrap();
    let peers: Vec<String> = peers.iter().map(|a| format!("\"{a}\"")).collect();
    let config = format!(
        r#"[device]
type = "board"
data_dir = "{data}"
trust_root = "{root}"
reboot_command = ["touch", "{marker}"]

[health]
dir = "{health}"

[server]
url = "{server_url}"
poll_interval_s = 1
retry_max_s = 2
identity = {{ mac = "{mac}" }}

[install]
journal_batch_mib = 1

[lan]
enabled = true
listen = ["/ip4/127.0.0.1/tcp/0"]
static_peers = [{peers}]
mdns = false
{lan_extra}
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
        peers = peers.join(", "),
        a = p("a.img").display(),
        b = p("b.img").display(),
        env = p("bootenv").display(),
    );
    std::fs::write(p("shoal.toml"), config).unwrap();
}
