//! `shoal-bench net`, link rows (issue 11): v1 → v2 over a 10 Mbit/s link with a
//! 100 ms round trip, through the real `shoal server` and `shoal daemon`, beside
//! `casync extract` (HTTP chunk store of v2, seeded with v1) and the Mender full
//! artifact fetched with `curl` on the same link; the daemon's memory idle and
//! installing; both binaries' sizes.
//!
//! The link is a shaping TCP proxy in this program ([`Link`]): each direction is one
//! serial line of [`RATE_BYTES_PER_S`] shared by every connection (a packet leaves
//! when the line is free and takes `len / rate` to cross), then waits the one-way
//! delay ([`ONE_WAY`]) before it is delivered. It stands in for network namespaces
//! with `tc tbf` and a delay relay (this kernel has no netem), counts the bytes in
//! each direction, and needs no root.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::fleet::{run, wait_until};
use crate::measure::Cmd;
use crate::progress;
use crate::report::{Baseline, Goal, Quantity, Section, Target};

/// The link rate: 10 Mbit/s.
pub const RATE_BYTES_PER_S: u64 = 10_000_000 / 8;
/// Half the 100 ms round trip.
pub const ONE_WAY: Duration = Duration::from_millis(50);
/// The largest piece the link carries at once (a few packets).
const PIECE: usize = 16 * 1024;

/// One direction of the link: a serial line, then a delay.
struct Line {
    /// When the line is free again.
    free_at: Mutex<Instant>,
    /// Bytes carried.
    bytes: AtomicU64,
}

impl Line {
    fn new() -> Line {
        Line {
            free_at: Mutex::new(Instant::now()),
            bytes: AtomicU64::new(0),
        }
    }

    /// When `n` bytes offered now arrive at the other end.
    fn arrival(&self, n: usize) -> Instant {
        let mut free = self.free_at.lock().expect("line lock");
        let start = (*free).max(Instant::now());
        let done = start + Duration::from_secs_f64(n as f64 / RATE_BYTES_PER_S as f64);
        *free = done;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        done + ONE_WAY
    }
}

/// The shaped link: a TCP proxy to `upstream` (see the module documentation).
pub struct Link {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    down: Arc<Line>,
    up: Arc<Line>,
}

impl Link {
    /// Starts the proxy.
    pub fn start(upstream: String) -> Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind the link")?;
        let url = format!("http://{}", listener.local_addr()?);
        let (down, up) = (Arc::new(Line::new()), Arc::new(Line::new()));
        let (d, u) = (Arc::clone(&down), Arc::clone(&up));
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                carry(c2, s2, Arc::clone(&u));
                carry(server, client, Arc::clone(&d));
            }
        });
        Ok(Link { url, down, up })
    }

    /// Bytes carried towards the client, and towards the server.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.down.bytes.load(Ordering::Relaxed),
            self.up.bytes.load(Ordering::Relaxed),
        )
    }
}

/// Bytes with the time they arrive at the other end of the link.
type Piece = (Instant, Vec<u8>);

/// Moves bytes from `from` to `to` over `line`: a reader that stamps each piece with
/// its arrival time and a writer that delivers it then.
fn carry(mut from: TcpStream, mut to: TcpStream, line: Arc<Line>) {
    let (tx, rx): (Sender<Piece>, Receiver<Piece>) = channel();
    // Bounded in flight: at most the bytes the line can carry in a second plus the
    // delay (as a socket buffer would hold).
    let queued = Arc::new((Mutex::new(0usize), Condvar::new()));
    let q2 = Arc::clone(&queued);
    let cap = RATE_BYTES_PER_S as usize;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; PIECE];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            {
                let (m, cv) = &*q2;
                let mut q = m.lock().expect("queue lock");
                while *q > cap {
                    q = cv.wait(q).expect("queue lock");
                }
                *q += n;
            }
            if tx.send((line.arrival(n), buf[..n].to_vec())).is_err() {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Read);
    });
    std::thread::spawn(move || {
        let mut pending: VecDeque<Piece> = VecDeque::new();
        while let Ok(piece) = rx.recv() {
            pending.push_back(piece);
            while let Some((at, data)) = pending.pop_front() {
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                if to.write_all(&data).is_err() {
                    return;
                }
                let (m, cv) = &*queued;
                *m.lock().expect("queue lock") -= data.len();
                cv.notify_all();
                while let Ok(more) = rx.try_recv() {
                    pending.push_back(more);
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Peak and current RSS of a process, from `/proc/PID/status`, in MiB.
fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed status line")?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

pub(crate) fn json(cmd: &mut Command) -> Result<serde_json::Value> {
    let out = run(cmd)?;
    serde_json::from_str(&out).with_context(|| format!("not JSON from {cmd:?}: {out}"))
}

/// A child process killed when dropped.
pub(crate) struct Proc(pub(crate) Child);

/// A `shoal server` on loopback with its data in `w/server` (trust root
/// `w/root.shoalroot`, log `w/server.log`): the process, its URL, and an admin
/// token.
pub(crate) fn start_server(shoal: &Path, w: &Path) -> Result<(Proc, String, String)> {
    start_server_with(shoal, w, "127.0.0.1:0", &[])
}

/// [`start_server`] listening on `listen`, with more arguments (a restart on the
/// same port, with `--chunk-base-url`).
pub(crate) fn start_server_with(
    shoal: &Path,
    w: &Path,
    listen: &str,
    extra: &[&str],
) -> Result<(Proc, String, String)> {
    let data = w.join("server");
    let token = crate::fleet::admin_token(shoal, w, &data)?;
    let log_path = w.join("server.log");
    let server = Proc(
        Command::new(shoal)
            .current_dir(w)
            .args([
                "server",
                "--root",
                "root.shoalroot",
                "--listen",
                listen,
                "--data",
            ])
            .arg(&data)
            // The net rows time the encodings they ask for and compare plain
            // chunks with them: none made in the background.
            .args(["--auto-encode-bases", "0"])
            .args(extra)
            .env("SHOAL_LOG", "warn")
            .stderr(std::fs::File::create(&log_path)?)
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start shoal server")?,
    );
    let url = crate::fleet::server_url(&log_path)?;
    Ok((server, url, token))
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Seconds from the log line containing `from` to the one containing `to` (tracing's
/// RFC 3339 timestamps).
pub(crate) fn log_span_s(log: &str, from: &str, to: &str) -> Option<f64> {
    let stamp = |needle: &str| -> Option<f64> {
        let line = log.lines().find(|l| l.contains(needle))?;
        let ts = line.split_whitespace().next()?;
        // 2026-12-05T12:00:00.123456Z → seconds of the day.
        let t = ts.split('T').nth(1)?.trim_end_matches('Z');
        let mut p = t.split(':');
        let (h, m, s): (f64, f64, f64) = (
            p.next()?.parse().ok()?,
            p.next()?.parse().ok()?,
            p.next()?.parse().ok()?,
        );
        Some(h * 3600.0 + m * 60.0 + s)
    };
    Some(stamp(to)? - stamp(from)?)
}

/// The inputs of the link rows.
pub struct Inputs {
    /// The `shoal` binary with the server role (`--features server`).
    pub shoal: PathBuf,
    /// The device build (`--profile device`), if built.
    pub device_shoal: PathBuf,
    /// The old and new images.
    pub v1: PathBuf,
    /// The new image.
    pub v2: PathBuf,
    /// Scratch directory.
    pub work: PathBuf,
}

/// A wall-time row against the time `bytes` take at the link's rate (goal ≤ 1.2 ×).
fn vs_link_rate(name: &str, wall_s: f64, bytes: u64) -> Goal {
    Goal::relative(
        name,
        Ok(Quantity::Seconds(wall_s)),
        Baseline {
            label: "bytes / 10 Mbit/s".into(),
            quantity: Quantity::Seconds(bytes as f64 / RATE_BYTES_PER_S as f64),
        },
        Target::RatioAtMost(1.2),
    )
}

/// Measures the link rows; every row that cannot run says why.
pub fn section(inp: &Inputs) -> Result<Section> {
    let mut goals = Vec::new();
    let mut facts = Vec::new();
    facts.push((
        "link".to_owned(),
        format!(
            "{} Mbit/s each way, {} ms round trip (shaping proxy in shoal-bench)",
            RATE_BYTES_PER_S * 8 / 1_000_000,
            ONE_WAY.as_millis() * 2
        ),
    ));
    let (shoal_row, fresh_row) = match shoal_over_link(inp) {
        Ok((indexed, fresh)) => (Ok(indexed), fresh),
        Err(e) => {
            let why = format!("{e:#}");
            (Err(e), Err(anyhow::anyhow!(why)))
        }
    };
    let casync_row = casync_over_link(inp);
    let mender_row = mender_over_link(inp);
    match &shoal_row {
        Ok(r) => {
            facts.push((
                "shoal v1 → v2".to_owned(),
                format!(
                    "{} B down + {} B up in {:.2} s (diff figure {} B); daemon RSS idle {:.1} MiB, installing {:.1} MiB; the running slot indexed at idle time beforehand{}, peak RSS through that cut {}",
                    r.down,
                    r.up,
                    r.wall_s,
                    r.diff_bytes,
                    r.rss_idle_mib,
                    r.rss_install_mib,
                    r.index_s
                        .map(|t| format!(" in {t:.2} s"))
                        .unwrap_or_default(),
                    r.rss_index_mib
                        .map_or("not measured".to_owned(), |m| format!("{m:.1} MiB"))
                ),
            ));
            goals.push(Goal::relative(
                "bytes on the wire vs `shoal artifact diff`",
                Ok(Quantity::Bytes(r.down + r.up)),
                Baseline {
                    label: "artifact diff".into(),
                    quantity: Quantity::Bytes(r.diff_bytes),
                },
                Target::RatioAtMost(1.05),
            ));
            goals.push(vs_link_rate(
                "download wall time vs bytes / link rate",
                r.wall_s,
                r.down + r.up,
            ));
            match &fresh_row {
                Ok(f) => {
                    facts.push((
                        "shoal v1 → v2, fresh device".to_owned(),
                        format!(
                            "{} B down + {} B up in {:.2} s from the daemon's start (its idle-time cut of the running slot{}, then the download); RSS installing {:.1} MiB",
                            f.down,
                            f.up,
                            f.wall_s,
                            f.index_s
                                .map(|t| format!(" took {t:.2} s"))
                                .unwrap_or_default(),
                            f.rss_install_mib
                        ),
                    ));
                    goals.push(vs_link_rate(
                        "fresh device (indexing its slot first): wall time vs bytes / link rate",
                        f.wall_s,
                        f.down + f.up,
                    ));
                }
                Err(e) => goals.push(Goal::not_run(
                    "fresh device (indexing its slot first): wall time vs bytes / link rate",
                    format!("{e:#}"),
                    Target::RatioAtMost(1.2),
                )),
            }
            goals.push(Goal::absolute(
                "daemon RSS, idle",
                Ok(Quantity::Mebibytes(r.rss_idle_mib)),
                Target::AtMost(Quantity::Mebibytes(16.0)),
            ));
            goals.push(Goal::absolute(
                "daemon RSS, installing",
                Ok(Quantity::Mebibytes(r.rss_install_mib)),
                Target::AtMost(Quantity::Mebibytes(32.0)),
            ));
        }
        Err(e) => {
            let why = format!("{e:#}");
            progress(&format!("shoal over the link not measured: {why}"));
            for (name, target) in [
                (
                    "bytes on the wire vs `shoal artifact diff`",
                    Target::RatioAtMost(1.05),
                ),
                (
                    "download wall time vs bytes / link rate",
                    Target::RatioAtMost(1.2),
                ),
                (
                    "daemon RSS, idle",
                    Target::AtMost(Quantity::Mebibytes(16.0)),
                ),
                (
                    "daemon RSS, installing",
                    Target::AtMost(Quantity::Mebibytes(32.0)),
                ),
            ] {
                goals.push(Goal::not_run(name, why.clone(), target));
            }
        }
    }
    for (name, row) in [
        ("casync extract (HTTP store, seeded with v1)", &casync_row),
        ("Mender full artifact (curl)", &mender_row),
    ] {
        let shoal_wall = shoal_row
            .as_ref()
            .map(|r| Quantity::Seconds(r.wall_s))
            .map_err(|e| format!("{e:#}"));
        match row {
            Ok(t) => {
                facts.push((
                    name.to_owned(),
                    format!("{} B down + {} B up in {:.2} s", t.down, t.up, t.wall_s),
                ));
                goals.push(Goal::relative(
                    &format!("shoal wall time vs {name}"),
                    shoal_wall,
                    Baseline {
                        label: name.to_owned(),
                        quantity: Quantity::Seconds(t.wall_s),
                    },
                    Target::RatioAtMost(1.0),
                ));
            }
            Err(e) => goals.push(Goal::not_run(
                &format!("shoal wall time vs {name}"),
                format!("{e:#}"),
                Target::RatioAtMost(1.0),
            )),
        }
    }
    for (name, path) in [
        (
            "binary size, server build (`--release --features server`)",
            &inp.shoal,
        ),
        (
            "binary size, device build (`--profile device`)",
            &inp.device_shoal,
        ),
    ] {
        match std::fs::metadata(path) {
            Ok(m) => facts.push((
                name.to_owned(),
                format!("{} bytes ({})", m.len(), path.display()),
            )),
            Err(e) => facts.push((
                name.to_owned(),
                format!("not built: {} ({e})", path.display()),
            )),
        }
    }
    goals.push(crate::fleet::device_size_goal(
        "device binary size",
        &inp.device_shoal,
    ));
    Ok(Section {
        title: "Issue 11 — the device daemon over a 10 Mbit/s, 100 ms link".to_owned(),
        goals,
        series: Vec::new(),
        facts,
    })
}

/// One transfer over the link.
struct Transfer {
    down: u64,
    up: u64,
    wall_s: f64,
}

/// Shoal's row.
struct ShoalRow {
    down: u64,
    up: u64,
    wall_s: f64,
    diff_bytes: u64,
    rss_idle_mib: f64,
    rss_install_mib: f64,
    /// The daemon's idle-time cut of its running slot, when it made one.
    index_s: Option<f64>,
    /// The daemon's peak RSS from its start through that cut.
    rss_index_mib: Option<f64>,
}

/// The server side of Shoal's rows: a `shoal server` with v1 and v2 uploaded,
/// reached over the link.
struct Setup<'a> {
    inp: &'a Inputs,
    w: PathBuf,
    url: String,
    token: String,
    /// Release ids of v1 and v2.
    ids: Vec<String>,
    diff_bytes: u64,
    link: Link,
    _server: Proc,
}

impl Setup<'_> {
    fn sh(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.inp.shoal);
        c.current_dir(&self.w).args(args);
        c
    }

    fn admin(&self, args: &[&str]) -> Result<serde_json::Value> {
        json(
            self.sh(&[
                "admin",
                "--json",
                "--server",
                &self.url,
                "--token",
                &self.token,
            ])
            .args(args),
        )
    }
}

/// Shoal's rows: a device that indexed its running slot before the deployment (the
/// link row), and a fresh one whose deployment waits for it when it first starts
/// (indexing + download).
fn shoal_over_link(inp: &Inputs) -> Result<(ShoalRow, Result<ShoalRow>)> {
    let w = inp.work.join("net-shoal");
    let _ = std::fs::remove_dir_all(&w);
    std::fs::create_dir_all(&w)?;
    let sh = |args: &[&str]| {
        let mut c = Command::new(&inp.shoal);
        c.current_dir(&w).args(args);
        c
    };
    crate::fleet::keys_root_and_releases(&inp.shoal, &w, &inp.v1, &inp.v2, "bench-board", "net")?;
    let diff = json(&mut sh(&[
        "artifact", "diff", "v1.shoal", "v2.shoal", "--json",
    ]))?;
    let diff_bytes = diff["download_bytes"]
        .as_u64()
        .context("diff: download_bytes")?;

    // The server, on loopback; the device reaches it over the link.
    let (server, url, token) = start_server(&inp.shoal, &w)?;
    let link = Link::start(url.trim_start_matches("http://").to_owned())?;
    let mut setup = Setup {
        inp,
        w: w.clone(),
        url,
        token,
        ids: Vec::new(),
        diff_bytes,
        link,
        _server: server,
    };
    for f in ["v1.shoal", "v2.shoal"] {
        let id = setup.admin(&["releases", "upload", f])?["id"]
            .as_str()
            .context("release id")?
            .to_owned();
        setup.ids.push(id);
    }
    let indexed = device_over_link(&setup, "device", false)?;
    let fresh = device_over_link(&setup, "fresh-device", true);
    Ok((indexed, fresh))
}

/// One device over the link: slot A runs v1 (copied there, not installed by Shoal),
/// slot B empty. Not `fresh`: the daemon starts, is accepted, indexes its running
/// slot at idle time and says so, then the deployment is made; the wall time runs
/// from its `downloading` report to "installed; trial armed". `fresh`: the device
/// key is preauthorized and the deployment made before the daemon first starts;
/// the wall time runs from "daemon started" to "installed; trial armed" (indexing
/// the slot, authenticating and polling included).
fn device_over_link(s: &Setup, name: &str, fresh: bool) -> Result<ShoalRow> {
    let inp = s.inp;
    let dev = s.w.join(name);
    std::fs::create_dir_all(dev.join("health.d"))?;
    Cmd::new("cp")
        .arg("--sparse=never")
        .arg(&inp.v1)
        .arg(dev.join("a.img"))
        .run_plain()?;
    let size = std::fs::metadata(&inp.v1)?.len();
    Cmd::new("truncate")
        .args(["-s", &size.to_string()])
        .arg(dev.join("b.img"))
        .run_plain()?;
    run(s
        .sh(&["--quiet", "env", "set", "--file"])
        .arg(dev.join("bootenv"))
        .args(["shoal_slot=A", "shoal_booted=A"]))?;
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let mac = if fresh {
        "02:00:00:00:00:98"
    } else {
        "02:00:00:00:00:99"
    };
    std::fs::write(
        dev.join("shoal.toml"),
        format!(
            "[device]\ntype = \"bench-board\"\ndata_dir = {}\ntrust_root = {}\nreboot_command = []\n\n\
             [health]\ndir = {}\n\n[server]\nurl = \"{}\"\npoll_interval_s = 1\nretry_max_s = 2\n\
             identity = {{ mac = \"{mac}\" }}\n\n\
             [slots]\na = {{ path = {} }}\nb = {{ path = {} }}\n\n[slots.detect]\nfrom = \"bootloader\"\n\n\
             [bootloader]\ntype = \"file\"\npath = {}\n",
            q(&dev.join("data")),
            q(&s.w.join("root.shoalroot")),
            q(&dev.join("health.d")),
            s.link.url,
            q(&dev.join("a.img")),
            q(&dev.join("b.img")),
            q(&dev.join("bootenv")),
        ),
    )?;
    let deploy = |device: &str| -> Result<String> {
        Ok(s.admin(&[
            "deployments",
            "create",
            "--name",
            &format!("bench-{}", if fresh { "fresh" } else { "indexed" }),
            "--release",
            &s.ids[1],
            "--device",
            device,
        ])?["id"]
            .as_str()
            .context("deployment id")?
            .to_owned())
    };
    let daemon_bin = if inp.device_shoal.is_file() {
        &inp.device_shoal
    } else {
        &inp.shoal
    };
    let dlog = dev.join("daemon.log");
    let start = || -> Result<Proc> {
        Ok(Proc(
            Command::new(daemon_bin)
                .arg("daemon")
                .arg("--config")
                .arg(dev.join("shoal.toml"))
                .env("SHOAL_LOG", "shoal=info")
                .stderr(std::fs::File::create(&dlog)?)
                .stdout(Stdio::null())
                .spawn()
                .context("cannot start shoal daemon")?,
        ))
    };
    let log = || std::fs::read_to_string(&dlog).unwrap_or_default();
    let mut daemon = start()?;
    let mut device = String::new();
    wait_until("a pending device", 60, || {
        let v = s.admin(&["devices", "list", "--status", "pending"])?;
        if let Some(id) = v[0]["id"].as_str() {
            device = id.to_owned();
        }
        Ok(!device.is_empty())
    })?;
    s.admin(&["devices", "accept", &device])?;
    wait_until("the inventory", 60, || {
        Ok(s.admin(&["devices", "show", &device])?["inventory"]["device_type"] == "bench-board")
    })?;
    let mut rss_idle_mib = 0.0;
    let mut rss_index_mib = None;
    let (down0, up0);
    if fresh {
        // Known to the server (accepted, inventory sent), then made fresh again:
        // the daemon stopped and its device store (with whatever it indexed)
        // removed. The deployment waits for its first poll.
        drop(daemon);
        std::fs::remove_file(dev.join("data").join("shoal.redb"))
            .context("cannot remove the device store")?;
        deploy(&device)?;
        (down0, up0) = s.link.bytes();
        daemon = start()?;
    } else {
        progress("net: waiting for the daemon to index its running slot");
        wait_until("the running slot's index", 600, || {
            Ok(log().contains("the running slot's index is ready"))
        })?;
        // The peak so far includes the cut; reset (`clear_refs` 5), so that the
        // idle figure is the daemon polling with nothing to do.
        rss_index_mib = Some(rss_mib(daemon.0.id())?.0);
        std::fs::write(format!("/proc/{}/clear_refs", daemon.0.id()), "5")
            .context("cannot reset the daemon's peak RSS")?;
        // Idle: authenticated, indexed, polling every second, nothing to do.
        std::thread::sleep(Duration::from_secs(5));
        rss_idle_mib = rss_mib(daemon.0.id())?.0;
        (down0, up0) = s.link.bytes();
        deploy(&device)?;
    }
    let pid = daemon.0.id();
    progress(&format!(
        "net: shoal v1 → v2 over the link ({})",
        if fresh {
            "fresh device"
        } else {
            "device with its slot indexed"
        }
    ));
    wait_until("the install", 1800, || {
        let log = log();
        if log.contains("install failed") {
            bail!("the install failed: {log}");
        }
        Ok(log.contains("installed; trial armed"))
    })?;
    let (rss_install_mib, _) = rss_mib(pid)?;
    let (down1, up1) = s.link.bytes();
    let log = log();
    let from = if fresh {
        "daemon started"
    } else {
        "state=\"downloading\""
    };
    let wall_s = log_span_s(&log, from, "installed; trial armed")
        .context("no timestamps in the daemon log")?;
    let index_s = log_span_s(
        &log,
        "indexing the running slot at idle time",
        "the running slot's index is ready",
    );
    drop(daemon);
    Ok(ShoalRow {
        down: down1 - down0,
        up: up1 - up0,
        wall_s,
        diff_bytes: s.diff_bytes,
        rss_idle_mib,
        rss_install_mib,
        rss_index_mib,
        index_s,
    })
}

/// A static file server (python3's) for `dir` behind a fresh link.
fn static_over_link(dir: &Path) -> Result<(Proc, Link)> {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let server = Proc(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start python3 -m http.server (Debian: python3)")?,
    );
    wait_until("the static server", 30, || {
        Ok(TcpStream::connect(("127.0.0.1", port)).is_ok())
    })?;
    Ok((server, Link::start(format!("127.0.0.1:{port}"))?))
}

fn casync_over_link(inp: &Inputs) -> Result<Transfer> {
    let w = inp.work.join("net-casync");
    let _ = std::fs::remove_dir_all(&w);
    std::fs::create_dir_all(&w)?;
    progress("net: casync make of v2 (untimed)");
    run(Command::new("casync")
        .args(["make", "--store"])
        .arg(w.join("store"))
        .arg(w.join("v2.caibx"))
        .arg(&inp.v2))
    .context("casync make (Debian: casync)")?;
    let (_srv, link) = static_over_link(&w)?;
    progress("net: casync extract over the link");
    let t = Instant::now();
    run(Command::new("casync")
        .arg("extract")
        .arg(format!("--store={}/store", link.url))
        .arg(format!("--seed={}", inp.v1.display()))
        .arg(w.join("v2.caibx"))
        .arg(w.join("out.img")))?;
    let wall_s = t.elapsed().as_secs_f64();
    let (down, up) = link.bytes();
    Ok(Transfer { down, up, wall_s })
}

fn mender_over_link(inp: &Inputs) -> Result<Transfer> {
    let w = inp.work.join("net-mender");
    let _ = std::fs::remove_dir_all(&w);
    std::fs::create_dir_all(&w)?;
    progress("net: mender-artifact write of v2 (untimed)");
    run(Command::new("mender-artifact")
        .args([
            "write",
            "rootfs-image",
            "-n",
            "v2",
            "-t",
            "bench-board",
            "-o",
        ])
        .arg(w.join("v2.mender"))
        .arg("-f")
        .arg(&inp.v2))
    .context("mender-artifact write (Debian: mender-artifact)")?;
    let (_srv, link) = static_over_link(&w)?;
    progress("net: curl of the Mender artifact over the link");
    let t = Instant::now();
    run(Command::new("curl")
        .args(["-sf", "-o"])
        .arg(w.join("fetched.mender"))
        .arg(format!("{}/v2.mender", link.url)))
    .context("curl (Debian: curl)")?;
    let wall_s = t.elapsed().as_secs_f64();
    let (down, up) = link.bytes();
    Ok(Transfer { down, up, wall_s })
}
