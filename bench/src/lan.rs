//! `shoal-bench lan` (issue 13): ten devices on one LAN behind a 10 Mbit/s uplink
//! install v1 → v2 from a real `shoal server`, sharing chunks over the LAN layer,
//! against baselines on the same topology in the same run: one device alone (the
//! delta once), the ten without the LAN layer (each downloads the delta, as
//! casync/desync fleets do), and the full artifact downloaded with `curl` (as Mender
//! devices do, each its own copy).
//!
//! The topology is the LAN tests' own (`shoal_tests::netns`): network namespaces for
//! the server, a router whose WAN uplink is shaped with `tc tbf` each way, and the
//! devices on a bridge behind it; nftables on the router counts the bytes forwarded
//! from the WAN to the LAN (IP packets, headers included: chunks, polls, manifests,
//! status reports). Needs root, iproute2 and nftables.

use shoal_tests::installed_field;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shoal_tests::netns::{NET, Net};

use crate::fleet::{run, wait_until};
use crate::progress;
use crate::report::{Baseline, Goal, Quantity, Section, Target};

/// The uplink, each way.
const WAN: &str = "10mbit";
/// Devices on the LAN.
const DEVICES: u8 = 10;
/// The device type of the bench releases.
const BOARD: &str = "bench-board";
/// WAN bytes of the ten sharing, at most, against one device's delta.
const WAN_GOAL: f64 = 1.1;
/// Time until all ten run v2, at most, against one device alone.
const TIME_GOAL: f64 = 1.5;

/// The inputs of the section.
#[derive(Debug)]
pub struct Inputs {
    /// The `shoal` binary with the server role (`--features server`); it runs the
    /// server and the daemons.
    pub shoal: PathBuf,
    /// The device build (`--profile device`), for its size, if built.
    pub device_shoal: PathBuf,
    /// The image the devices run.
    pub v1: PathBuf,
    /// The release.
    pub v2: PathBuf,
    /// Scratch directory.
    pub work: PathBuf,
    /// Runs of the timed rows (the ten sharing, one alone); figures are medians.
    pub runs: u32,
    /// Whether the baselines without sharing are measured too.
    pub baselines: bool,
}

/// One install of v2 by some devices of the LAN.
#[derive(Debug, Clone, Copy)]
struct Install {
    /// Bytes the router forwarded from the WAN to the LAN.
    wan: u64,
    /// From the deployment to the last device's armed trial.
    wall_s: f64,
    /// Chunk bytes the devices received from peers (repeats included).
    from_peers: u64,
    /// Distinct chunk bytes the devices installed from peers (the engine's count).
    installed_from_peers: u64,
    /// Chunk bytes the devices installed from the network (peers and server).
    fetched: u64,
}

/// The site: namespaces, the server, the releases.
struct Site {
    shoal: PathBuf,
    work: PathBuf,
    url: String,
    token: String,
    v2_id: String,
    v2_len: u64,
    v2_hash: blake3::Hash,
    /// v1 once, hard-linked as every device's slot A (only ever read).
    slot_a: PathBuf,
    /// Devices made so far (each row's devices are new ones).
    made: u32,
    // Last: the namespaces go after the processes in them.
    net: Net,
}

/// BLAKE3 of the first `len` bytes of a file.
fn hash_prefix(path: &Path, len: u64) -> Result<blake3::Hash> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut f.take(len), &mut hasher)?;
    Ok(hasher.finalize())
}

impl Site {
    fn sh(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.shoal);
        c.current_dir(&self.work).args(args);
        c
    }

    /// `shoal admin --json ARGS`, from the server's namespace.
    fn admin(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut c = self.net.command("srv", &self.shoal);
        c.args([
            "admin",
            "--json",
            "--server",
            &self.url,
            "--token",
            &self.token,
        ])
        .args(args);
        let out = run(&mut c)?;
        serde_json::from_str(&out).with_context(|| format!("not JSON from shoal admin: {out}"))
    }

    /// Keys, a trust root, v1 and v2 built and uploaded to a server in the
    /// server's namespace.
    fn new(inp: &Inputs) -> Result<Site> {
        let net = Net::new("bl", 1, DEVICES, WAN);
        let work = inp.work.clone();
        crate::fleet::keys_root_and_releases(&inp.shoal, &work, &inp.v1, &inp.v2, BOARD, "lan")?;
        let data = work.join("server");
        let token = crate::fleet::admin_token(&inp.shoal, &work, &data)?;
        let log_path = work.join("server.log");
        let mut net = net;
        let mut server = net.command("srv", &inp.shoal);
        server
            .current_dir(&work)
            .args(["server", "--root", "root.shoalroot", "--listen"])
            .arg(format!("{NET}.0.10:0"))
            .arg("--data")
            .arg(&data)
            .env("SHOAL_LOG", "warn,shoal::server=info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?);
        net.spawn(server);
        let url = crate::fleet::server_url(&log_path)?;
        progress("lan: copying v1 once for the devices' slot A");
        let slot_a = work.join("v1-slot.img");
        run(Command::new("cp")
            .arg("--sparse=never")
            .arg(&inp.v1)
            .arg(&slot_a))?;
        let v2_len = std::fs::metadata(&inp.v2)?.len();
        let mut site = Site {
            shoal: inp.shoal.clone(),
            work,
            url,
            token,
            v2_id: String::new(),
            v2_len,
            v2_hash: hash_prefix(&inp.v2, v2_len)?,
            slot_a,
            made: 0,
            net,
        };
        for f in ["v1.shoal", "v2.shoal"] {
            let v = site.admin(&["releases", "upload", &site.work.join(f).to_string_lossy()])?;
            site.v2_id = v["id"].as_str().context("release id")?.to_owned();
        }
        Ok(site)
    }

    /// The bytes the router forwarded from the WAN to the LAN so far.
    fn wan_bytes(&self) -> u64 {
        self.net.counter("lan1")
    }

    /// Devices `1..=n` of the LAN, new ones (fresh keys, slot B empty), install v2
    /// at once from the server, sharing over the LAN layer when `lan`.
    fn install(&mut self, name: &str, n: u8, lan: bool) -> Result<Install> {
        let row = self.work.join(format!("row-{name}"));
        let _ = std::fs::remove_dir_all(&row);
        let mut devs = Vec::new();
        let mut daemons = Vec::new();
        let first = self.made;
        for d in 1..=n {
            let dir = row.join(format!("dev{d}"));
            std::fs::create_dir_all(dir.join("health.d"))?;
            std::fs::create_dir_all(dir.join("data"))?;
            std::fs::hard_link(&self.slot_a, dir.join("a.img"))?;
            std::fs::File::create(dir.join("b.img"))?.set_len(self.v2_len)?;
            run(self
                .sh(&["--quiet", "env", "set", "--file"])
                .arg(dir.join("bootenv"))
                .args(["shoal_slot=A", "shoal_booted=A"]))?;
            let q = |f: &str| format!("{:?}", dir.join(f).display().to_string());
            let lan_section = if lan {
                "\n[lan]\nenabled = true\nlisten = [\"/ip4/0.0.0.0/tcp/0\"]\nmdns = true\nmdns_query_interval_s = 1\n"
            } else {
                ""
            };
            self.made += 1;
            std::fs::write(
                dir.join("shoal.toml"),
                format!(
                    "[device]\ntype = \"{BOARD}\"\ndata_dir = {}\ntrust_root = {:?}\nreboot_command = []\n\n\
                     [health]\ndir = {}\n\n[server]\nurl = \"{}\"\npoll_interval_s = 1\nretry_max_s = 2\n\
                     identity = {{ mac = \"02:00:00:00:{:02x}:{:02x}\" }}\n{lan_section}\n\
                     [slots]\na = {{ path = {} }}\nb = {{ path = {} }}\n\n[slots.detect]\nfrom = \"bootloader\"\n\n\
                     [bootloader]\ntype = \"file\"\npath = {}\n",
                    q("data"),
                    self.work.join("root.shoalroot").display().to_string(),
                    q("health.d"),
                    self.url,
                    self.made >> 8,
                    self.made & 0xff,
                    q("a.img"),
                    q("b.img"),
                    q("bootenv"),
                ),
            )?;
            let mut cmd = self.net.command(&format!("d1{d}"), &self.shoal);
            cmd.arg("daemon")
                .arg("--config")
                .arg(dir.join("shoal.toml"))
                .env("SHOAL_LOG", "shoal=debug")
                .env("NO_COLOR", "1")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("daemon.log"))?);
            daemons.push(self.net.spawn(cmd));
            devs.push(dir);
        }
        let result = self.deploy_and_wait(name, first, &devs, lan);
        for d in daemons {
            self.net.kill(d);
        }
        if result.is_ok() {
            // The daemons' logs stay (with `--keep`); the slots go.
            let logs = self.work.join("logs");
            std::fs::create_dir_all(&logs)?;
            for (d, dir) in devs.iter().enumerate() {
                let _ = std::fs::copy(
                    dir.join("daemon.log"),
                    logs.join(format!("{name}-dev{}.log", d + 1)),
                );
            }
            let _ = std::fs::remove_dir_all(&row);
        } else {
            progress(&format!(
                "lan: the {name} row's devices are kept in {}",
                row.display()
            ));
        }
        result
    }

    fn deploy_and_wait(
        &self,
        name: &str,
        first: u32,
        devs: &[PathBuf],
        lan: bool,
    ) -> Result<Install> {
        let n = devs.len();
        let macs: Vec<String> = (first + 1..=first + n as u32)
            .map(|m| format!("02:00:00:00:{:02x}:{:02x}", m >> 8, m & 0xff))
            .collect();
        let mut ids = Vec::new();
        wait_until("the devices' auth requests", 120, || {
            let pending = self.admin(&["devices", "list", "--status", "pending"])?;
            ids = pending
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| {
                    d["identity"]["mac"]
                        .as_str()
                        .is_some_and(|m| macs.iter().any(|x| x == m))
                })
                .filter_map(|d| d["id"].as_str().map(str::to_owned))
                .collect();
            Ok(ids.len() == n)
        })?;
        for id in &ids {
            self.admin(&["devices", "accept", id])?;
        }
        wait_until("the devices' inventories", 120, || {
            let mut all = true;
            for id in &ids {
                all &= self.admin(&["devices", "show", id])?["inventory"]["device_type"] == BOARD;
            }
            Ok(all)
        })?;
        // Every device indexed its running slot (the daemon does so at idle time,
        // once, after its first start) before the release is out, in every row: a
        // device in the field has done so long before a deployment, and ten new
        // devices indexing at once on this machine's two cores would otherwise
        // delay the ten sharing (by up to 3.6 s, measured) but not one alone.
        wait_until("the devices' running-slot indexes", 300, || {
            Ok(devs.iter().all(|d| {
                std::fs::read_to_string(d.join("daemon.log"))
                    .unwrap_or_default()
                    .contains("the running slot's index is ready")
            }))
        })?;
        if lan {
            // Every device found the others (mDNS) before the release is out.
            wait_until("the devices finding each other", 120, || {
                Ok(devs.iter().all(|d| {
                    let log = std::fs::read_to_string(d.join("daemon.log")).unwrap_or_default();
                    let peers: std::collections::HashSet<&str> = log
                        .lines()
                        .filter(|l| l.contains("peer connected"))
                        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("peer=")))
                        .collect();
                    peers.len() + 1 >= n
                }))
            })?;
        }
        let before = self.wan_bytes();
        let mut args = vec![
            "deployments",
            "create",
            "--name",
            name,
            "--release",
            &self.v2_id,
        ];
        for id in &ids {
            args.extend(["--device", id.as_str()]);
        }
        progress(&format!("lan: {name}: {n} device(s) install v2"));
        let t0 = Instant::now();
        self.admin(&args)?;
        let mut done = vec![None; n];
        wait_until("the installs", 1800, || {
            for (i, d) in devs.iter().enumerate() {
                if done[i].is_some() {
                    continue;
                }
                let log = std::fs::read_to_string(d.join("daemon.log")).unwrap_or_default();
                if log.contains("install failed") {
                    bail!(
                        "device {} failed to install: see {}",
                        i + 1,
                        d.join("daemon.log").display()
                    );
                }
                if log.contains("installed; trial armed") {
                    done[i] = Some(t0.elapsed());
                }
            }
            Ok(done.iter().all(Option::is_some))
        })?;
        let wall_s = done
            .iter()
            .flatten()
            .max()
            .map_or(0.0, Duration::as_secs_f64);
        let wan = self.wan_bytes() - before;
        let mut from_peers = 0;
        let mut installed_from_peers = 0;
        let mut fetched = 0;
        for d in devs {
            let log = std::fs::read_to_string(d.join("daemon.log"))?;
            from_peers += installed_field(&log, "from_peers").unwrap_or(0);
            installed_from_peers += installed_field(&log, "installed_from_peers")
                .context("no installed_from_peers= in the install line")?;
            fetched +=
                installed_field(&log, "fetched").context("no fetched= in the install line")?;
            // Every slot B holds v2, byte for byte.
            let got = hash_prefix(&d.join("b.img"), self.v2_len)?;
            if got != self.v2_hash {
                bail!("{}: slot B differs from v2", d.display());
            }
        }
        progress(&format!(
            "lan: {name}: {wan} WAN bytes, {wall_s:.2} s, {installed_from_peers} of {fetched} chunk bytes installed from peers ({from_peers} received)"
        ));
        Ok(Install {
            wan,
            wall_s,
            from_peers,
            installed_from_peers,
            fetched,
        })
    }

    /// One device downloads the full artifact with `curl` from a static file
    /// server on the server host: the WAN bytes.
    fn full_artifact(&mut self) -> Result<u64> {
        let mut http = self.net.command("srv", Path::new("python3"));
        http.args([
            "-m",
            "http.server",
            "--bind",
            &format!("{NET}.0.10"),
            "8088",
        ])
        .current_dir(&self.work)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let i = self.net.spawn(http);
        let url = format!("http://{NET}.0.10:8088/v2.shoal");
        let result = (|| {
            wait_until("python3 -m http.server (Debian: python3)", 30, || {
                Ok(self
                    .net
                    .command("d11", Path::new("curl"))
                    .args(["-sf", "-o", "/dev/null", "-r", "0-0", &url])
                    .status()
                    .context("cannot run curl (Debian: curl)")?
                    .success())
            })?;
            let before = self.wan_bytes();
            progress("lan: one device downloads the full v2 artifact with curl");
            run(self
                .net
                .command("d11", Path::new("curl"))
                .args(["-sf", "-o", "/dev/null", &url]))?;
            Ok(self.wan_bytes() - before)
        })();
        self.net.kill(i);
        result
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures the section; a part that cannot run says why in its rows.
pub fn section(inp: &Inputs) -> Result<Section> {
    // The namespace helpers panic with the failing tool's stderr (they are the
    // tests' own); here that is an error of the section.
    let measured = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| measure(inp)))
        .unwrap_or_else(|p| {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".to_owned());
            Err(anyhow::anyhow!(why))
        });
    let mut goals = Vec::new();
    let mut facts = vec![(
        "topology".to_owned(),
        format!(
            "{DEVICES} devices (network namespaces) on one bridge behind a router; WAN uplink {WAN} each way (`tc tbf`); `shoal server` (SQLite) on the far side; WAN bytes = IP bytes the router forwards from the WAN to the LAN (nftables counter)"
        ),
    )];
    let m = match measured {
        Ok(m) => m,
        Err(e) => {
            let why = format!("{e:#}");
            progress(&format!("lan: not measured: {why}"));
            for (name, target) in [
                (
                    "WAN bytes, ten sharing vs one device's delta",
                    Target::RatioAtMost(WAN_GOAL),
                ),
                (
                    "time until all ten run v2 vs one device alone",
                    Target::RatioAtMost(TIME_GOAL),
                ),
            ] {
                goals.push(Goal::not_run(name, why.clone(), target));
            }
            return Ok(Section {
                title: "Issue 13 — LAN peers: ten devices behind one 10 Mbit/s uplink".to_owned(),
                goals,
                series: Vec::new(),
                facts,
            });
        }
    };
    let shared_wan = median(m.shared.iter().map(|r| r.wan as f64).collect()) as u64;
    let shared_s = median(m.shared.iter().map(|r| r.wall_s).collect());
    let alone_wan = median(m.alone.iter().map(|r| r.wan as f64).collect()) as u64;
    let alone_s = median(m.alone.iter().map(|r| r.wall_s).collect());
    goals.push(Goal::relative(
        "WAN bytes, ten devices sharing on the LAN vs one device's delta",
        Ok(Quantity::Bytes(shared_wan)),
        Baseline {
            label: "one device alone, delta from the server".into(),
            quantity: Quantity::Bytes(alone_wan),
        },
        Target::RatioAtMost(WAN_GOAL),
    ));
    let ten_deltas_row =
        "WAN bytes, ten sharing vs ten each downloading the delta (casync/desync fleets)";
    match &m.ten_deltas {
        Ok(ten) => goals.push(Goal::relative(
            ten_deltas_row,
            Ok(Quantity::Bytes(shared_wan)),
            Baseline {
                label: "ten devices without the LAN layer".into(),
                quantity: Quantity::Bytes(ten.wan),
            },
            Target::RatioAtMost(WAN_GOAL / f64::from(DEVICES)),
        )),
        Err(e) => goals.push(Goal::not_run(
            ten_deltas_row,
            format!("{e:#}"),
            Target::RatioAtMost(WAN_GOAL / f64::from(DEVICES)),
        )),
    }
    match m.full {
        Ok(full) => goals.push(Goal::relative(
            "WAN bytes, ten sharing vs ten each downloading the full artifact (Mender)",
            Ok(Quantity::Bytes(shared_wan)),
            Baseline {
                label: format!(
                    "{DEVICES} × one `curl` of v2.shoal ({:.2} MB on the WAN)",
                    full as f64 / 1e6
                ),
                quantity: Quantity::Bytes(full * u64::from(DEVICES)),
            },
            Target::RatioAtMost(WAN_GOAL / f64::from(DEVICES)),
        )),
        Err(e) => goals.push(Goal::not_run(
            "WAN bytes, ten sharing vs ten each downloading the full artifact (Mender)",
            format!("{e:#}"),
            Target::RatioAtMost(WAN_GOAL / f64::from(DEVICES)),
        )),
    }
    goals.push(Goal::relative(
        "time until all ten run v2 vs one device alone",
        Ok(Quantity::Seconds(shared_s)),
        Baseline {
            label: "one device alone".into(),
            quantity: Quantity::Seconds(alone_s),
        },
        Target::RatioAtMost(TIME_GOAL),
    ));
    goals.push(crate::fleet::device_size_goal(
        "device binary size (`--profile device`, LAN layer included)",
        &inp.device_shoal,
    ));
    let share = |r: &Install| r.installed_from_peers as f64 / r.fetched.max(1) as f64;
    facts.push((
        "peer share (chunk bytes installed from peers / chunk bytes installed from the network; received from peers, repeats included)".to_owned(),
        m.shared
            .iter()
            .map(|r| {
                format!(
                    "{:.1} % ({} of {} B; {} B received)",
                    100.0 * share(r),
                    r.installed_from_peers,
                    r.fetched,
                    r.from_peers
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    ));
    let runs = |rs: &[Install]| {
        rs.iter()
            .map(|r| format!("{} B in {:.2} s", r.wan, r.wall_s))
            .collect::<Vec<_>>()
            .join("; ")
    };
    facts.push((
        "ten sharing, each run (WAN bytes, time)".to_owned(),
        runs(&m.shared),
    ));
    facts.push(("one alone, each run".to_owned(), runs(&m.alone)));
    if let Ok(ten) = &m.ten_deltas {
        facts.push((
            "ten without the LAN layer (once)".to_owned(),
            format!(
                "{} B in {:.2} s until all ten armed v2",
                ten.wan, ten.wall_s
            ),
        ));
    }
    facts.push((
        "runs".to_owned(),
        format!(
            "{} of the ten sharing and of one alone (medians), alternating; the baselines without sharing once",
            inp.runs
        ),
    ));
    Ok(Section {
        title: "Issue 13 — LAN peers: ten devices behind one 10 Mbit/s uplink".to_owned(),
        goals,
        series: Vec::new(),
        facts,
    })
}

struct Measured {
    shared: Vec<Install>,
    alone: Vec<Install>,
    ten_deltas: Result<Install>,
    full: Result<u64>,
}

fn measure(inp: &Inputs) -> Result<Measured> {
    let mut site = Site::new(inp)?;
    site.net.count_wan(1, &[]);
    let mut shared = Vec::new();
    let mut alone = Vec::new();
    for r in 1..=inp.runs {
        shared.push(site.install(&format!("shared{r}"), DEVICES, true)?);
        alone.push(site.install(&format!("alone{r}"), 1, false)?);
    }
    if !inp.baselines {
        let skipped = || anyhow::anyhow!("skipped (--timed-only)");
        return Ok(Measured {
            shared,
            alone,
            ten_deltas: Err(skipped()),
            full: Err(skipped()),
        });
    }
    let ten_deltas = Ok(site.install("ten-deltas", DEVICES, false)?);
    let full = site.full_artifact();
    Ok(Measured {
        shared,
        alone,
        ten_deltas,
        full,
    })
}
