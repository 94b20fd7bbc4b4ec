//! The demo's processes: the server (`shoal server`), the operator's `shoal admin`,
//! and the devices of the site, each a `shoal daemon` with its own data directory,
//! slot files, bootloader environment file, health checks and configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;
use shoal_bootctl::Slot;
use shoal_bootctl::env::Env as _;
use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::model::{Bootloader, boot_env};
use shoal_bootctl::scheme::{Flavor, Scheme};

use super::procs::{self, Proc};
use crate::config::Config;

/// How long the server may take to start listening.
const SERVER_START: Duration = Duration::from_secs(30);

/// A `shoal` command for a child of the demo: logs on in its log file, no colours,
/// temporary files inside the demo's directory.
pub fn shoal(exe: &Path, tmp: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.env("SHOAL_LOG", "shoal=info,shoal_server=info,shoal_node=info")
        .env("NO_COLOR", "1")
        .env("TMPDIR", tmp)
        .env_remove("SHOAL_CONFIG")
        .env_remove("SHOAL_SERVER")
        .env_remove("SHOAL_TOKEN")
        .env_remove("SHOAL_DATABASE_URL")
        .env_remove("SHOAL_CHUNKS");
    cmd
}

/// Runs a short `shoal` command to completion; its stdout, or its one-line error.
pub fn run_shoal(exe: &Path, tmp: &Path, args: &[&str], what: &str) -> anyhow::Result<String> {
    procs::check()?;
    let out = shoal(exe, tmp)
        .env_remove("SHOAL_LOG")
        .args(args)
        .output()
        .with_context(|| format!("cannot run shoal for {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err.lines().last().unwrap_or_default();
        bail!(
            "{what} failed ({}): {}",
            out.status,
            line.trim_start_matches("shoal: ")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The server process.
#[derive(Debug)]
pub struct Server {
    proc: Proc,
    /// Where it listens (`http://127.0.0.1:PORT`).
    pub url: String,
    /// Its socket address.
    pub addr: SocketAddr,
}

impl Server {
    /// Starts `shoal server` on a free loopback port with its data in `data` (SQLite
    /// and the chunk store; the trust root in `data/root.shoalroot`).
    pub fn start(exe: &Path, tmp: &Path, data: &Path) -> anyhow::Result<Server> {
        let log = data.join("server.log");
        // A restarted server appends to the same log: find this start's line.
        let from = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        let mut cmd = shoal(exe, tmp);
        cmd.arg("server").arg("--data").arg(data).args([
            "--listen",
            "127.0.0.1:0",
            "--timer-period-ms",
            "200",
        ]);
        let mut proc = Proc::spawn("the server", cmd, &log)?;
        let url = procs::wait_for(
            SERVER_START,
            Duration::from_millis(50),
            "the server's start",
            || {
                if let Some(status) = proc.exited() {
                    bail!(
                        "the server exited ({status}): {}",
                        last_line(&log, from).unwrap_or_default()
                    );
                }
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                Ok(text.get(from..).and_then(|t| {
                    t.lines()
                        .find_map(|l| l.split("listening on ").nth(1))
                        .map(|u| u.trim().to_owned())
                }))
            },
        )?;
        let addr = url
            .trim_start_matches("http://")
            .parse()
            .with_context(|| format!("the server listens on {url}, not a socket address"))?;
        Ok(Server { proc, url, addr })
    }

    /// Stops it (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        self.proc.stop(Duration::from_secs(5));
    }
}

fn last_line(log: &Path, from: usize) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.get(from..)?
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::to_owned)
}

/// `shoal admin` as the operator runs it.
#[derive(Debug, Clone)]
pub struct Admin {
    exe: PathBuf,
    tmp: PathBuf,
    /// The server's URL (the operator's side: not through the site's uplink).
    pub url: String,
    token: String,
}

impl Admin {
    /// An operator of the server at `url` with API token `token`.
    pub fn new(exe: &Path, tmp: &Path, url: &str, token: &str) -> Admin {
        Admin {
            exe: exe.to_path_buf(),
            tmp: tmp.to_path_buf(),
            url: url.to_owned(),
            token: token.to_owned(),
        }
    }

    /// The API token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Runs `shoal admin --json ARGS`; the server's JSON answer.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        procs::check()?;
        let out = shoal(&self.exe, &self.tmp)
            .env_remove("SHOAL_LOG")
            .env("SHOAL_TOKEN", &self.token)
            .args(["admin", "--json", "--server", &self.url])
            .args(args)
            .output()
            .context("cannot run shoal admin")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!(
                "shoal admin {} failed: {}",
                args.first().copied().unwrap_or_default(),
                err.trim().trim_start_matches("shoal: ")
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "shoal admin {} printed no JSON",
                args.first().copied().unwrap_or_default()
            )
        })
    }
}

/// What a device's daemon logged about one install.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// Payload bytes copied from the running slot.
    pub reused: u64,
    /// Payload bytes that came over the network (peers and server), uncompressed.
    pub fetched: u64,
    /// Of those, from LAN peers.
    pub from_peers: u64,
    /// Bytes read from the server (stored form, with framing).
    pub from_server_wire: u64,
}

/// One device of the site.
#[derive(Debug)]
pub struct Device {
    /// Its name (`dev-1`), also its identity towards the server (`serial`).
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its board's sensor revision (`rev-A` boards are the old ones).
    pub sensor: &'static str,
    /// Its id on the server, once it asked to join.
    pub id: Option<String>,
    /// The address its LAN layer listens on (fixed after its first start).
    pub lan_addr: Option<String>,
    daemon: Option<Proc>,
    /// Bytes of the daemon's log already looked at for installs.
    log_seen: usize,
}

/// The health checks a release ships in its root file system for `/etc/shoal/health.d`
/// (a booted slot brings its own): `10-system` always; 2.0's acme-app dropped the
/// driver of the rev-A sensor, so its `20-sensor` fails on those boards; 3.0 brings
/// it back.
fn release_checks(version: &str, board: &Path) -> Vec<(&'static str, String)> {
    let mut checks = vec![(
        "10-system",
        "# the system came up far enough to run this\nexit 0".to_owned(),
    )];
    let board = board.display();
    match version {
        "2.0" => checks.push((
            "20-sensor",
            format!(
                "if grep -qx 'sensor=rev-A' '{board}'; then\n  echo 'acme-app 2.0 cannot read the rev-A sensor of this board' >&2\n  exit 1\nfi\nexit 0"
            ),
        )),
        "3.0" => checks.push((
            "20-sensor",
            format!("grep -q '^sensor=rev-' '{board}'"),
        )),
        _ => {}
    }
    checks
}

impl Device {
    /// Makes device `name` in `dir`: slot A holds `factory` (a release Shoal did not
    /// install), slot B is empty; both are `slot_bytes` long; the bootloader
    /// environment runs A, committed.
    pub fn create(
        dir: PathBuf,
        name: String,
        sensor: &'static str,
        factory: &[u8],
        slot_bytes: u64,
    ) -> anyhow::Result<Device> {
        std::fs::create_dir_all(dir.join("inventory.d"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let a = std::fs::File::create(dir.join("a.img"))?;
        std::io::Write::write_all(&mut &a, factory)?;
        a.set_len(slot_bytes)?;
        std::fs::File::create(dir.join("b.img"))?.set_len(slot_bytes)?;
        let mut env = FileEnv::open(&dir.join("bootenv"), true)?;
        env.store(&Scheme::Shoal.initial(Flavor::File, Slot::A))
            .context("cannot provision the bootloader environment")?;
        std::fs::write(dir.join("board"), format!("sensor={sensor}\n"))?;
        write_script(
            &dir.join("inventory.d/10-site"),
            &format!("echo site=harbour\necho board_sensor={sensor}"),
        )?;
        let dev = Device {
            name,
            dir,
            sensor,
            id: None,
            lan_addr: None,
            daemon: None,
            log_seen: 0,
        };
        dev.install_checks("1.0")?;
        Ok(dev)
    }

    /// A file of the device's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Puts the checks of the release `version` in the device's health directory.
    fn install_checks(&self, version: &str) -> anyhow::Result<()> {
        let health = self.path("health.d");
        if health.exists() {
            std::fs::remove_dir_all(&health)?;
        }
        std::fs::create_dir_all(&health)?;
        for (name, body) in release_checks(version, &self.path("board")) {
            write_script(&health.join(name), &body)?;
        }
        Ok(())
    }

    /// Writes its configuration: the server through `server_url`, LAN listening on
    /// `listen` with `peers` as static peers.
    pub fn configure(
        &self,
        server_url: &str,
        listen: &str,
        peers: &[String],
        accept_releases: bool,
    ) -> anyhow::Result<()> {
        let p = |f: &str| self.path(f).display().to_string();
        let peers: Vec<String> = peers.iter().map(|a| format!("\"{a}\"")).collect();
        let text = format!(
            r#"# {name}: a device of the demo site "harbour"
[device]
type = "demo-board"
data_dir = "{data}"
trust_root = "{root}"
# A reboot here only leaves this file; the demo then plays the bootloader.
reboot_command = ["touch", "{marker}"]

[health]
dir = "{health}"
timeout_s = 10

[server]
url = "{server_url}"
poll_interval_s = 1
retry_max_s = 2
identity = {{ serial = "{name}" }}
inventory_dir = "{inventory}"

[install]
journal_batch_mib = 1

[lan]
enabled = true
listen = ["{listen}"]
static_peers = [{peers}]
mdns = false
accept_releases = {accept_releases}

[slots]
a = {{ path = "{a}" }}
b = {{ path = "{b}" }}

[slots.detect]
from = "bootloader"

[bootloader]
type = "file"
path = "{env}"
"#,
            name = self.name,
            data = p("data"),
            root = p("root.shoalroot"),
            marker = p("reboot-requested"),
            health = p("health.d"),
            inventory = p("inventory.d"),
            peers = peers.join(", "),
            a = p("a.img"),
            b = p("b.img"),
            env = p("bootenv"),
        );
        std::fs::write(self.path("shoal.toml"), text)
            .with_context(|| format!("cannot write {}'s configuration", self.name))
    }

    /// Its configuration, parsed as the daemon parses it.
    pub fn config(&self) -> anyhow::Result<Config> {
        Config::load(&self.path("shoal.toml")).map_err(|e| anyhow!("{}: {e}", self.name))
    }

    /// Starts its daemon.
    pub fn start(&mut self, exe: &Path, tmp: &Path) -> anyhow::Result<()> {
        let mut cmd = shoal(exe, tmp);
        cmd.arg("daemon")
            .arg("--config")
            .arg(self.path("shoal.toml"));
        self.daemon = Some(Proc::spawn(
            format!("{}'s daemon", self.name),
            cmd,
            &self.path("daemon.log"),
        )?);
        Ok(())
    }

    /// Stops its daemon at once (a reboot or a power cut ends it so).
    pub fn stop(&mut self) -> bool {
        self.daemon.take().is_some_and(|mut d| d.kill())
    }

    /// `Err` when its daemon exited by itself.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(d) = &mut self.daemon
            && let Some(status) = d.exited()
        {
            let log = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
            let last = log
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default();
            bail!("{} exited ({status}): {last}", d.name);
        }
        Ok(())
    }

    /// The multiaddr its LAN layer listens on, once it says.
    pub fn listening(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.path("data/lan-addresses")).ok()?;
        text.lines().next().map(str::to_owned)
    }

    /// Whether its daemon ran the reboot command.
    pub fn wants_reboot(&self) -> bool {
        self.path("reboot-requested").exists()
    }

    /// Reboots it: the daemon dies, the bootloader (bootctl's model of the boot
    /// script) picks the slot, the booted slot's release brings its health checks,
    /// and the daemon starts again (and, in a trial boot, runs the health checks and
    /// commits or rolls back). Returns the slot booted and whether it is a trial.
    pub fn reboot(&mut self, exe: &Path, tmp: &Path) -> anyhow::Result<(Slot, bool)> {
        self.stop();
        let _ = std::fs::remove_file(self.path("reboot-requested"));
        let (status, _) = crate::device::read_status(&self.config()?)
            .with_context(|| format!("reading {}'s state", self.name))?;
        let mut env = FileEnv::open(&self.path("bootenv"), true)?;
        let slot = boot_env(&mut env, &Bootloader::new(Scheme::Shoal, Flavor::File))
            .context("simulating the bootloader")?
            .slot;
        let version = status.releases[shoal_engine::slot_ordinal(slot)]
            .as_ref()
            .map_or_else(|| "1.0".to_owned(), |r| r.version.clone());
        self.install_checks(&version)?;
        self.start(exe, tmp)?;
        // Booting another slot than the one the device ran is a trial boot.
        Ok((slot, slot != status.active))
    }

    /// Its state, read as `shoal status` does; `None` while its daemon holds the
    /// store.
    pub fn status(&self) -> anyhow::Result<Option<shoal_engine::Status>> {
        match crate::device::read_status(&self.config()?) {
            Ok((s, _)) => Ok(Some(s)),
            Err(e) if crate::cmd::exit_code(&e) == crate::cmd::EXIT_TEMPFAIL => Ok(None),
            Err(e) => Err(e.context(format!("reading {}'s state", self.name))),
        }
    }

    /// The release its running slot holds (`None`: the factory image) and the last
    /// result, `None` while its daemon holds the store.
    pub fn running(&self) -> anyhow::Result<Option<(Option<String>, Option<String>)>> {
        Ok(self.status()?.map(|s| {
            let running = s.releases[shoal_engine::slot_ordinal(s.active)]
                .as_ref()
                .map(|r| r.version.clone());
            let last = s.last.as_ref().map(|o| match &o.verdict {
                shoal_engine::Verdict::Committed => format!("{} committed", o.release.version),
                shoal_engine::Verdict::RolledBack { .. } => {
                    format!("{} rolled back", o.release.version)
                }
                shoal_engine::Verdict::Failed { .. } => format!("{} failed", o.release.version),
            });
            (running, last)
        }))
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// The installs its daemon logged since the last call.
    pub fn new_installs(&mut self) -> Vec<Installed> {
        let log = self.log();
        let new = log.get(self.log_seen..).unwrap_or_default();
        let mut out = Vec::new();
        let mut seen = self.log_seen;
        for line in new.split_inclusive('\n') {
            if !line.ends_with('\n') {
                break;
            }
            seen += line.len();
            let offline = line.contains("installed from LAN peers; trial armed");
            if !offline && !line.contains("installed; trial armed") {
                continue;
            }
            let field = |name: &str| -> u64 {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            out.push(Installed {
                reused: field("reused"),
                fetched: field("fetched"),
                from_peers: field("from_peers"),
                from_server_wire: field("transferred"),
            });
        }
        self.log_seen = seen;
        out
    }
}

fn write_script(path: &Path, body: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}
