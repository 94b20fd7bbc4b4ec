//! The demo's story, step by step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};
use shoal_signing::{SecretKey, SignedRoot, TrustRoot};

use super::Args;
use super::images::{self, Gen};
use super::procs;
use super::show::Board;
use super::site::{Admin, Device, Installed, Server, run_shoal};
use super::uplink::Uplink;
use crate::cmd::Ui;

/// How long one phase of the story may take before the demo gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// How often the demo looks at the server and the devices.
const POLL: Duration = Duration::from_millis(200);

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Runs the demo in a temporary directory and removes it, with everything it
/// started, whatever happens.
pub fn run(args: Args, ui: &Ui) -> anyhow::Result<()> {
    procs::catch_signals()?;
    let started = Instant::now();
    let exe = std::env::current_exe().context("cannot find the shoal binary")?;
    let tmp = tempfile::Builder::new()
        .prefix("shoal-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let dir = tmp.path().to_path_buf();
    outln!("Shoal demo in {} (removed at the end)", dir.display());
    outln!(
        "A server and a site of {} devices, each device its own `shoal daemon` process, on this machine.\n",
        args.devices
    );
    let mut demo = Demo {
        ui,
        exe,
        tmp: dir.join("tmp"),
        dir: dir.clone(),
        size: usize::try_from(args.size_mib * 1024 * 1024).context("image size")?,
        size_mib: args.size_mib,
        n: usize::from(args.devices),
        step: 0,
        server: None,
        uplink: None,
        admin: None,
        devices: Vec::new(),
    };
    let result = demo.story();
    demo.shutdown();
    drop(demo);
    let shown = dir.display().to_string();
    let removed = if args.keep {
        let kept = tmp.keep();
        format!("kept {} (--keep)", kept.display())
    } else {
        tmp.close()
            .with_context(|| format!("cannot remove {shown}"))?;
        format!("removed {shown}")
    };
    match result {
        Ok(()) => {
            outln!(
                "\nStopped the server and every daemon the demo started, and {removed}: nothing was left behind."
            );
            outln!(
                "The demo took {:.0} s.",
                started.elapsed().as_secs_f64().ceil()
            );
            Ok(())
        }
        Err(e) => Err(e.context(format!("the demo stopped (its processes ended, {removed})"))),
    }
}

struct Demo<'a> {
    ui: &'a Ui,
    exe: PathBuf,
    dir: PathBuf,
    /// TMPDIR of the demo's processes.
    tmp: PathBuf,
    size: usize,
    size_mib: u64,
    n: usize,
    step: u32,
    server: Option<Server>,
    uplink: Option<Uplink>,
    admin: Option<Admin>,
    devices: Vec<Device>,
}

/// What a release the demo built is.
struct Built {
    path: PathBuf,
    image_hash: blake3::Hash,
}

impl Demo<'_> {
    fn say(&mut self, text: impl std::fmt::Display) {
        self.step += 1;
        outln!("{:>2}. {text}", self.step);
    }

    fn detail(&self, text: impl std::fmt::Display) {
        outln!("    {text}");
    }

    fn admin(&self) -> anyhow::Result<&Admin> {
        self.admin.as_ref().ok_or_else(|| anyhow!("no server yet"))
    }

    fn uplink(&self) -> anyhow::Result<&Uplink> {
        self.uplink.as_ref().ok_or_else(|| anyhow!("no uplink yet"))
    }

    /// Stops every process the demo started that still runs, and the uplink.
    fn shutdown(&mut self) {
        for d in &mut self.devices {
            d.stop();
        }
        // The uplink's connections first: the server's graceful stop waits for them.
        self.uplink = None;
        if let Some(s) = &mut self.server {
            s.stop();
        }
        self.server = None;
    }

    fn story(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.tmp)?;
        let key = self.keys()?;
        let (v2, v3) = self.releases(&key)?;
        let release = self.server_up(&v2)?;
        self.site()?;
        self.join()?;
        let uplink = self.uplink()?;
        let before = (uplink.bytes_down(), uplink.bytes_up());
        self.rollout(&release)?;
        self.sharing(before)?;
        self.offline(&v3)?;
        self.back()?;
        self.verify(&v3)
    }

    /// A release key and a trust root that trusts it.
    fn keys(&mut self) -> anyhow::Result<SecretKey> {
        let key = SecretKey::generate().context("cannot generate a key")?;
        let now = crate::cmd::root::now_unix_s()?;
        let root = TrustRoot::new(1, now + 365 * 86400, &[key.public()], 1, &[key.public()], 1)
            .context("cannot make the trust root")?;
        let mut signed = SignedRoot::new(root);
        signed.envelope.sign(&key);
        signed
            .save(&self.dir.join("root.shoalroot"))
            .context("cannot save the trust root")?;
        self.say(format!(
            "Made a release signing key ({}) and a trust root that trusts it; the server and every device hold the root",
            key.id().short()
        ));
        Ok(key)
    }

    /// The devices' factory image (1.0), and releases 2.0 and 3.0 built from it.
    fn releases(&mut self, key: &SecretKey) -> anyhow::Result<(Built, Built)> {
        let mut v1 = vec![0u8; self.size];
        Gen(1).fill(&mut v1);
        let v2 = images::change(&v1, 2, 0.10);
        let v3 = images::change(&v2, 3, 0.03);
        std::fs::write(self.dir.join("factory-1.0.img"), &v1)?;
        drop(v1);
        let usb = self.dir.join("usb");
        std::fs::create_dir_all(&usb)?;
        let p2 = self.dir.join("acme-os-2.0.shoal");
        let p3 = usb.join("acme-os-3.0.shoal");
        let (_, len2) = images::build(&v2, "2.0", 2, key, &self.dir, &p2, self.ui)?;
        let (_, len3) = images::build(&v3, "3.0", 3, key, &self.dir, &p3, self.ui)?;
        self.say(format!(
            "Built two releases of acme-os from generated {} MiB root file system images; the devices run 1.0 from the factory",
            self.size_mib
        ));
        self.detail(format!(
            "2.0, to roll out: {} ({})",
            p2.display(),
            mib(len2)
        ));
        self.detail(format!(
            "3.0, the next fix, on a \"USB stick\": {} ({})",
            p3.display(),
            mib(len3)
        ));
        Ok((
            Built {
                path: p2,
                image_hash: blake3::hash(&v2),
            },
            Built {
                path: p3,
                image_hash: blake3::hash(&v3),
            },
        ))
    }

    /// The server, an admin token, the site's uplink, and 2.0 uploaded; its id.
    fn server_up(&mut self, v2: &Built) -> anyhow::Result<String> {
        let data = self.dir.join("server");
        std::fs::create_dir_all(&data)?;
        std::fs::copy(self.dir.join("root.shoalroot"), data.join("root.shoalroot"))?;
        let data_s = data.display().to_string();
        let token = run_shoal(
            &self.exe,
            &self.tmp,
            &[
                "server", "token", "--data", &data_s, "--name", "operator", "--role", "admin",
            ],
            "making the operator's API token",
        )?
        .trim()
        .to_owned();
        let server = Server::start(&self.exe, &self.tmp, &data)?;
        let uplink = Uplink::start()?;
        uplink.connect_to(Some(server.addr));
        self.say(format!(
            "Started `shoal server` on {} (SQLite and the chunk store in {data_s}) and made the operator's API token (`shoal server token`)",
            server.url
        ));
        self.detail(format!(
            "the site reaches the server through its \"uplink\" at {}, a relay that counts every byte crossing it",
            uplink.url()
        ));
        self.admin = Some(Admin::new(&self.exe, &self.tmp, &server.url, &token));
        self.server = Some(server);
        self.uplink = Some(uplink);
        let path = v2.path.display().to_string();
        let r = self.admin()?.json(&["releases", "upload", &path])?;
        let id = r["id"]
            .as_str()
            .ok_or_else(|| anyhow!("the server's release has no id: {r}"))?
            .to_owned();
        self.say(format!(
            "Uploaded acme-os 2.0 (`shoal admin releases upload`): verified against the trust root as it streamed in, {} chunks, {} stored",
            r["chunks"],
            mib(r["stored_bytes"].as_u64().unwrap_or(0))
        ));
        Ok(id)
    }

    /// The site's devices, their daemons started, LAN peers of each other.
    fn site(&mut self) -> anyhow::Result<()> {
        let factory = std::fs::read(self.dir.join("factory-1.0.img"))?;
        let slot_bytes = (self.size as u64 * 5 / 4).div_ceil(1 << 20) << 20;
        let url = self.uplink()?.url();
        let mut addrs: Vec<String> = Vec::new();
        for i in 1..=self.n {
            let name = format!("dev-{i}");
            let sensor = if i == self.n { "rev-A" } else { "rev-B" };
            let dir = self.dir.join("site").join(&name);
            let mut dev = Device::create(dir, name, sensor, &factory, slot_bytes)?;
            std::fs::copy(self.dir.join("root.shoalroot"), dev.path("root.shoalroot"))?;
            // The first start takes any free port; the device keeps it from then on.
            dev.configure(&url, "/ip4/127.0.0.1/tcp/0", &addrs, false)?;
            dev.start(&self.exe, &self.tmp)?;
            let addr = procs::wait_for(
                Duration::from_secs(30),
                Duration::from_millis(20),
                &format!("{}'s LAN layer listening", dev.name),
                || {
                    dev.check_alive()?;
                    Ok(dev.listening())
                },
            )?;
            dev.lan_addr = Some(addr.split("/p2p/").next().unwrap_or(&addr).to_owned());
            addrs.push(addr);
            self.devices.push(dev);
        }
        for (i, dev) in self.devices.iter().enumerate() {
            let others: Vec<String> = addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, a)| a.clone())
                .collect();
            let listen = dev.lan_addr.clone().unwrap_or_default();
            dev.configure(&url, &listen, &others, false)?;
        }
        let n = self.n;
        self.say(format!(
            "Set up the site \"harbour\": dev-1 to dev-{n}, each a `shoal daemon` process with its own data directory, configuration, health checks, bootloader environment file and two {} slot files",
            mib(slot_bytes)
        ));
        self.detail(
            "slot A runs acme-os 1.0 from the factory (not installed by Shoal), slot B is empty",
        );
        self.detail(
            "LAN peers on loopback: each daemon listens on 127.0.0.1 and knows the others as static peers (no root, no multicast)",
        );
        self.detail(format!(
            "dev-{n} is an older board: its sensor is rev-A, the others' rev-B"
        ));
        Ok(())
    }

    /// The devices ask to join, the operator accepts them; the group `harbour`.
    fn join(&mut self) -> anyhow::Result<()> {
        let n = self.n;
        let admin = self.admin()?.clone();
        let pending = procs::wait_for(
            Duration::from_secs(60),
            POLL,
            "every device asking to join",
            || {
                for d in &mut self.devices {
                    d.check_alive()?;
                }
                let list = admin.json(&["devices", "list", "--status", "pending"])?;
                let list = list.as_array().cloned().unwrap_or_default();
                Ok((list.len() >= n).then_some(list))
            },
        )?;
        for p in &pending {
            let serial = p["identity"]["serial"].as_str().unwrap_or_default();
            let id = p["id"].as_str().unwrap_or_default();
            if let Some(dev) = self.devices.iter_mut().find(|d| d.name == serial) {
                admin.json(&["devices", "accept", id])?;
                dev.id = Some(id.to_owned());
            }
        }
        if let Some(d) = self.devices.iter().find(|d| d.id.is_none()) {
            bail!("{} did not ask to join", d.name);
        }
        admin.json(&["groups", "set", "harbour", "--where", "site=harbour"])?;
        procs::wait_for(
            Duration::from_secs(60),
            POLL,
            "every device's inventory",
            || {
                let list = admin.json(&["groups", "devices", "harbour"])?;
                Ok((list.as_array().map_or(0, Vec::len) == n).then_some(()))
            },
        )?;
        self.say(format!(
            "The {n} daemons made their device keys and asked the server to join; they showed up pending and the operator accepted them (`shoal admin devices accept`)"
        ));
        self.detail(
            "their inventory says site=harbour, so the dynamic group harbour holds them (`shoal admin groups set harbour --where site=harbour`)",
        );
        Ok(())
    }

    fn names(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.name.clone()).collect()
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.devices
            .iter()
            .position(|d| d.id.as_deref() == Some(id))
    }

    /// Reboots the devices whose daemon asked for it; `board` shows it.
    fn reboots(&mut self, board: &mut Board) -> anyhow::Result<()> {
        for i in 0..self.devices.len() {
            self.devices[i].check_alive()?;
            if self.devices[i].wants_reboot() {
                let (slot, trial) = self.devices[i].reboot(&self.exe, &self.tmp)?;
                let state = if trial {
                    format!("rebooted into slot {slot} for a trial boot: health checks")
                } else {
                    format!("rebooted into slot {slot}")
                };
                board.set(i, &state);
            }
        }
        Ok(())
    }

    /// Release 2.0 to the group in two phases.
    fn rollout(&mut self, release: &str) -> anyhow::Result<()> {
        let n = self.n;
        let admin = self.admin()?.clone();
        // The seed picks the phases' devices; this one makes dev-1 the canary.
        let ids: Vec<shoal_fleet::DeviceId> = self
            .devices
            .iter()
            .filter_map(|d| d.id.clone())
            .map(shoal_fleet::DeviceId::new)
            .collect();
        let canary = self.devices[0].id.clone().unwrap_or_default();
        let seed = (0u64..100_000)
            .find(|s| {
                shoal_fleet::select::order(*s, ids.iter().cloned())
                    .first()
                    .is_some_and(|d| d.as_str() == canary)
            })
            .ok_or_else(|| anyhow!("no seed makes dev-1 the canary"))?;
        let policy = json!({
            "phases": [
                {"size": {"count": 1}, "proceed": {"successes": {"count": 1}}},
                {"size": "rest"}
            ],
            "failures_max": {"count": 1},
            "seed": seed,
        })
        .to_string();
        let dep = admin.json(&[
            "deployments",
            "create",
            "--name",
            "harbour-2.0",
            "--release",
            release,
            "--group",
            "harbour",
            "--policy",
            &policy,
        ])?;
        let dep = dep["id"]
            .as_str()
            .ok_or_else(|| anyhow!("the new deployment has no id: {dep}"))?
            .to_owned();
        self.say(format!(
            "Rolled out acme-os 2.0 to the group harbour in two phases (`shoal admin deployments create`): a canary first, the other {} once it succeeded; one failed device is tolerated, a second halts the rollout",
            n - 1
        ));
        self.detail(format!("policy: {policy}"));
        let mut board = Board::new(self.ui, &self.names());
        let mut open_seen = 0;
        let mut states: Vec<String> = vec![String::new(); n];
        let watched = procs::wait_for(STEP_TIMEOUT, POLL, "the 2.0 rollout", || {
            self.reboots(&mut board)?;
            let d = admin.json(&["deployments", "show", &dep])?;
            let list = admin.json(&["deployments", "devices", &dep])?;
            let mut list = list.as_array().cloned().unwrap_or_default();
            list.sort_by_key(|e| e["device_id"].as_str().and_then(|id| self.index_of(id)));
            for e in &list {
                let Some(i) = e["device_id"].as_str().and_then(|id| self.index_of(id)) else {
                    continue;
                };
                let status = e["status"].as_str().unwrap_or_default().to_owned();
                if status == states[i] {
                    continue;
                }
                states[i] = status.clone();
                let name = &self.devices[i].name;
                match status.as_str() {
                    "success" => board.event(
                        i,
                        "2.0 committed",
                        &format!(
                            "    {name}: success: it runs 2.0, committed after its health checks"
                        ),
                    ),
                    "failure" => {
                        let why = e["substate"].as_str().unwrap_or("no reason given");
                        board.event(
                            i,
                            "failed; back on 1.0",
                            &format!("    {name}: failure: {why}"),
                        );
                    }
                    "pending" => board.set(i, "waiting for its phase"),
                    other => board.set(i, &format!("{other} 2.0")),
                }
            }
            let open = d["rollout"]["summary"]["open_phases"].as_u64().unwrap_or(0);
            if open > open_seen {
                open_seen = open;
                let mut who: Vec<&str> = list
                    .iter()
                    .filter(|e| e["phase"].as_u64() == Some(open))
                    .filter_map(|e| e["device_id"].as_str())
                    .filter_map(|id| self.index_of(id))
                    .map(|i| self.devices[i].name.as_str())
                    .collect();
                who.sort_by_key(|w| (w.len(), w.to_string()));
                let what = if open == 1 {
                    "the canary"
                } else {
                    "the canary succeeded, so the rest"
                };
                board.say(&format!(
                    "    phase {open} of 2 opened ({what}): {}",
                    who.join(", ")
                ));
            }
            let state = d["status"].as_str().unwrap_or_default().to_owned();
            match state.as_str() {
                "finished" => Ok(Some(d)),
                "halted" | "aborted" => bail!(
                    "the rollout {state}: {}",
                    d["halt_reason"].as_str().unwrap_or("no reason given")
                ),
                _ => Ok(None),
            }
        });
        // A device that rolled back asked for its reboot before it reported.
        let reboots = self.reboots(&mut board);
        board.finish();
        let d = watched?;
        reboots?;
        let stats = &d["stats"];
        let ok = stats["success"].as_u64().unwrap_or(0);
        let failed = stats["failure"].as_u64().unwrap_or(0);
        let failed_names: Vec<String> = states
            .iter()
            .enumerate()
            .filter(|(_, s)| *s == "failure")
            .map(|(i, _)| self.devices[i].name.clone())
            .collect();
        self.say(format!(
            "The rollout finished: {ok} devices run 2.0; {} failed its health check, rolled back to 1.0 by itself and reported it; {failed} failure is within the rollout's limit, so it carried on (a second would have halted it)",
            failed_names.join(", ")
        ));
        Ok(())
    }

    /// What crossed the uplink during the rollout against what the devices installed.
    fn sharing(&mut self, before: (u64, u64)) -> anyhow::Result<()> {
        let down = self.uplink()?.bytes_down() - before.0;
        let up = self.uplink()?.bytes_up() - before.1;
        let mut rows = Vec::new();
        let (mut fetched, mut peers, mut server_wire) = (0, 0, 0);
        // The most one device read from the server: what each would read without the LAN.
        let mut alone = 0;
        for d in &mut self.devices {
            let i = d
                .new_installs()
                .into_iter()
                .fold(Installed::default(), |a, b| Installed {
                    reused: a.reused + b.reused,
                    fetched: a.fetched + b.fetched,
                    from_peers: a.from_peers + b.from_peers,
                    from_server_wire: a.from_server_wire + b.from_server_wire,
                });
            alone = alone.max(i.from_server_wire);
            fetched += i.fetched;
            peers += i.from_peers;
            server_wire += i.from_server_wire;
            rows.push(format!(
                "{:<6}  {:>12}  {:>12}  {:>12}  {:>12}",
                d.name,
                mib(i.reused),
                mib(i.fetched),
                mib(i.from_peers),
                mib(i.fetched.saturating_sub(i.from_peers)),
            ));
        }
        if fetched == 0 {
            bail!("the daemons logged no install of 2.0");
        }
        self.say(format!(
            "Chunks shared on the LAN: the devices installed {} of 2.0 over the network, {} of it ({:.0}%) from each other",
            mib(fetched),
            mib(peers),
            peers as f64 * 100.0 / fetched as f64
        ));
        self.detail(format!(
            "{:<6}  {:>12}  {:>12}  {:>12}  {:>12}",
            "device", "own slot", "network", "LAN peers", "server"
        ));
        for r in rows {
            self.detail(r);
        }
        self.detail(format!(
            "uplink: {} from the server to the site ({} bytes: chunks as stored, compressed, {} of them, plus the API's answers; {} the other way); installed over the network: {} ({} bytes)",
            mib(down),
            down,
            mib(server_wire),
            mib(up),
            mib(fetched),
            fetched
        ));
        let n = self.devices.len() as u64;
        self.detail(format!(
            "without the LAN each device would read its own chunks from the server, as dev-1 did: about {n} x {} = {} ({} bytes) over the uplink",
            mib(alone),
            mib(n * alone),
            n * alone
        ));
        Ok(())
    }

    /// The uplink goes down; 3.0 from a USB stick in dev-1 updates the site.
    fn offline(&mut self, v3: &Built) -> anyhow::Result<()> {
        // The link first: the server's graceful stop waits for open connections.
        self.uplink()?.connect_to(None);
        if let Some(s) = &mut self.server {
            s.stop();
        }
        self.server = None;
        let before = self.uplink()?.bytes_down();
        self.say("The site loses its uplink: the server is stopped and the relay refuses every connection");
        let usb = v3.path.display().to_string();
        let dev = &mut self.devices[0];
        dev.stop();
        let config = dev.path("shoal.toml").display().to_string();
        let out = run_shoal(
            &self.exe,
            &self.tmp,
            &["install", "--json", "--config", &config, &usb],
            "dev-1's install from the USB stick",
        )?;
        let r: Value = serde_json::from_str(&out)
            .with_context(|| format!("shoal install printed no JSON: {out}"))?;
        let (slot, _) = dev.reboot(&self.exe, &self.tmp)?;
        procs::wait_for(STEP_TIMEOUT, POLL, "dev-1's commit of 3.0", || {
            dev.check_alive()?;
            Ok(dev
                .running()?
                .filter(|(run, last)| {
                    run.as_deref() == Some("3.0") && last.as_deref() == Some("3.0 committed")
                })
                .map(|_| ()))
        })?;
        self.say(format!(
            "A technician plugs a USB stick with acme-os 3.0 into dev-1 and runs `shoal install {usb}`:"
        ));
        self.detail(format!(
            "{} reused from the running slot, {} read from the stick; the reboot tried slot {slot}, the health checks passed, 3.0 is committed and dev-1's daemon serves it to the LAN",
            mib(r["reused_bytes"].as_u64().unwrap_or(0)),
            mib(r["source_bytes_read"].as_u64().unwrap_or(0)),
        ));
        let url = self.uplink()?.url();
        let addrs: Vec<String> = self
            .devices
            .iter()
            .map(|d| d.lan_addr.clone().unwrap_or_default())
            .collect();
        for i in 1..self.n {
            let dev = &mut self.devices[i];
            dev.stop();
            let others: Vec<String> = addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, a)| a.clone())
                .collect();
            dev.configure(&url, &addrs[i], &others, true)?;
            dev.start(&self.exe, &self.tmp)?;
        }
        self.say(format!(
            "dev-2 to dev-{} may now install releases their LAN peers run (`[lan] accept_releases = true`, daemons restarted): with no server in reach they look at what their peers run",
            self.n
        ));
        let mut board = Board::new(self.ui, &self.names());
        board.set(0, "3.0 committed, serving it to the LAN");
        for i in 1..self.n {
            board.set(i, "looking at what its peers run");
        }
        let mut offline_installs: BTreeMap<usize, Installed> = BTreeMap::new();
        let watched = procs::wait_for(STEP_TIMEOUT, POLL, "the site's update from dev-1", || {
            let mut done = 0;
            for i in 1..self.n {
                for inst in self.devices[i].new_installs() {
                    board.set(
                        i,
                        &format!(
                            "installed 3.0 from LAN peers ({}); rebooting",
                            mib(inst.from_peers)
                        ),
                    );
                    offline_installs.insert(i, inst);
                }
                if offline_installs.contains_key(&i)
                    && let Some((run, last)) = self.devices[i].running()?
                    && run.as_deref() == Some("3.0")
                    && last.as_deref() == Some("3.0 committed")
                {
                    board.set(i, "3.0 committed after its health checks");
                    done += 1;
                }
            }
            self.reboots(&mut board)?;
            Ok((done == self.n - 1).then_some(()))
        });
        board.finish();
        watched?;
        let crossed = self.uplink()?.bytes_down() - before;
        let peers: u64 = offline_installs.values().map(|i| i.from_peers).sum();
        self.say(format!(
            "The whole site runs 3.0 with no server: dev-1 from the stick, the other {} from their LAN peers ({} crossed the LAN, {crossed} bytes the uplink)",
            self.n - 1,
            mib(peers)
        ));
        for (i, inst) in &offline_installs {
            let d = &self.devices[*i];
            let note = if d.sensor == "rev-A" {
                "; 3.0 reads its rev-A sensor again"
            } else {
                ""
            };
            self.detail(format!(
                "{}: {} reused from its running slot, {} from LAN peers, committed after its health checks{note}",
                d.name,
                mib(inst.reused),
                mib(inst.from_peers),
            ));
        }
        Ok(())
    }

    /// The server comes back; the reports the devices queued offline reach it.
    fn back(&mut self) -> anyhow::Result<()> {
        let data = self.dir.join("server");
        let server = Server::start(&self.exe, &self.tmp, &data)?;
        self.uplink()?.connect_to(Some(server.addr));
        let token = self.admin()?.clone();
        let admin = Admin::new(&self.exe, &self.tmp, &server.url, token.token());
        self.server = Some(server);
        self.admin = Some(admin.clone());
        let ids: Vec<(String, String)> = self
            .devices
            .iter()
            .map(|d| (d.name.clone(), d.id.clone().unwrap_or_default()))
            .collect();
        let reports = procs::wait_for(
            Duration::from_secs(60),
            POLL,
            "the reports queued offline reaching the server",
            || {
                for d in &mut self.devices {
                    d.check_alive()?;
                }
                let mut all = Vec::new();
                for (_, id) in &ids {
                    let r = admin.json(&["devices", "reports", id])?;
                    let r = r.as_array().cloned().unwrap_or_default();
                    let arrived = r
                        .iter()
                        .any(|x| x["release_version"] == "3.0" && x["status"] == "success");
                    if !arrived {
                        return Ok(None);
                    }
                    all.push(r);
                }
                Ok(Some(all))
            },
        )?;
        self.say(
            "The uplink is back (the server restarted on its data): every device delivered the signed status reports it queued while offline, with the times they happened",
        );
        for ((name, _), r) in ids.iter().zip(&reports) {
            let of3: Vec<String> = r
                .iter()
                .filter(|x| x["release_version"] == "3.0")
                .map(|x| {
                    format!(
                        "{} {}",
                        x["origin"].as_str().unwrap_or_default(),
                        x["status"].as_str().unwrap_or_default()
                    )
                })
                .collect();
            self.detail(format!("{name}: 3.0 reports: {}", of3.join(", ")));
        }
        Ok(())
    }

    /// Every device runs 3.0, committed, and its running slot hashes to 3.0.
    fn verify(&mut self, v3: &Built) -> anyhow::Result<()> {
        for d in &mut self.devices {
            d.stop();
        }
        let mut lines = Vec::new();
        for d in &self.devices {
            let s = d
                .status()?
                .ok_or_else(|| anyhow!("{}'s store is still busy", d.name))?;
            let release = s.releases[shoal_engine::slot_ordinal(s.active)]
                .clone()
                .ok_or_else(|| anyhow!("{} runs no release Shoal knows", d.name))?;
            if release.version != "3.0" {
                bail!("{} runs acme-os {}, not 3.0", d.name, release.version);
            }
            let committed = s.last.as_ref().is_some_and(|o| {
                o.release.version == "3.0" && o.verdict == shoal_engine::Verdict::Committed
            });
            if !committed {
                bail!(
                    "{}'s last result is not 3.0 committed: {:?}",
                    d.name,
                    s.last
                );
            }
            let slot = d.path(if s.active == shoal_engine::Slot::A {
                "a.img"
            } else {
                "b.img"
            });
            let hash = hash_prefix(&slot, release.payload_size)?;
            if hash != *v3.image_hash.as_bytes() || hash != release.payload_hash {
                bail!(
                    "{}'s slot {} does not hash to acme-os 3.0",
                    d.name,
                    s.active
                );
            }
            lines.push(format!(
                "{}: acme-os 3.0 on slot {}, committed, slot verified",
                d.name, s.active
            ));
        }
        self.say(
            "Every device runs acme-os 3.0, committed; each one's running slot, read back, hashes to 3.0's payload hash (BLAKE3):",
        );
        for l in lines {
            self.detail(l);
        }
        Ok(())
    }
}

/// BLAKE3 of the first `len` bytes of the file at `path`.
fn hash_prefix(path: &Path, len: u64) -> anyhow::Result<[u8; 32]> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut f.take(len), &mut h)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(*h.finalize().as_bytes())
}
