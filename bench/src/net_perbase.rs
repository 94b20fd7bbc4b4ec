//! `shoal-bench net`, per-base row (issue 12 on the server): what a device running
//! v1 downloads from `shoal server` for v2 when the server holds v2's per-base
//! encodings against v1 (`shoal admin releases encode v2 --base v1`), beside the
//! same device fetching plain chunks (`[server] delta = false`) and the thin
//! delta-encoded artifact's `shoal artifact diff` figure (`artifact build --base
//! v1.shoal --base-image v1.img`), all in the same run.
//!
//! The device first installs v1 through the server (its slot A holds v1's bytes, so
//! no chunk is downloaded; it then runs v1 on slot B, as a release it knows), is
//! snapshotted, installs v2 with per-base encodings, then the snapshot (v1 again)
//! installs v2 with plain chunks. Bytes are counted by the shaping link of
//! [`crate::net_link`] (10 Mbit/s, 100 ms round trip), both directions, everything
//! included (manifest, dictionary, status reports).
//!
//! Then the same pair from a static chunk host: Debian's nginx serves the server's
//! store directory (chunks, dictionaries, and the per-base encodings' index and
//! records as files) behind a second shaping link, the server restarted on the same
//! port with `--chunk-base-url` pointing at it, and two more snapshots of the device
//! on v1 install v2: one fetching the per-base encodings from nginx, one (`[server]
//! delta = false`) plain chunk files. Bytes are both links', both directions.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::fleet::{run, wait_until};
use crate::net_link::{Inputs, Link, Proc, json, log_span_s};
use crate::progress;
use crate::report::{Baseline, Goal, Quantity, Section, Target};

/// One v2 install's figures.
struct Install {
    /// Bytes over the link, down + up.
    bytes: u64,
    /// From the `downloading` report to the armed trial.
    wall_s: f64,
    /// Chunks that came delta-encoded (the daemon's count).
    delta_chunks: u64,
}

/// What the row measured.
struct Measured {
    thin_diff: u64,
    encode_s: f64,
    encoded: serde_json::Value,
    perbase: Install,
    plain: Install,
    static_perbase: Install,
    static_plain: Install,
}

/// The section's rows (a section of their own in `shoal-bench net`).
pub fn section(inp: &Inputs) -> Result<Section> {
    let mut goals = Vec::new();
    let mut facts = Vec::new();
    let per_name = "v1 → v2 from the server with per-base encodings: bytes vs the thin delta artifact's `diff`";
    let vs_plain = "per-base encodings vs plain chunks from the server (same device, same run)";
    let vs_static = "per-base encodings vs plain chunk files from a static chunk host (nginx; same device, same run)";
    match measure(inp) {
        Ok(m) => {
            facts.push((
                "per-base encodings (v2 against v1)".to_owned(),
                format!(
                    "{} of {} changed chunks delta-encoded; {} B instead of {} B of plain chunks; computed by the server in {:.1} s",
                    m.encoded["chunks_delta"],
                    m.encoded["chunks"],
                    m.encoded["encoded_bytes"],
                    m.encoded["plain_bytes"],
                    m.encode_s
                ),
            ));
            for (name, i) in [
                ("per-base", &m.perbase),
                ("plain chunks", &m.plain),
                ("static host (nginx), per-base", &m.static_perbase),
                ("static host (nginx), plain chunk files", &m.static_plain),
            ] {
                facts.push((
                    format!("device on v1 → v2, {name}"),
                    format!(
                        "{} B over the link (down + up) in {:.2} s; {} chunks delta-encoded",
                        i.bytes, i.wall_s, i.delta_chunks
                    ),
                ));
            }
            facts.push((
                "thin delta artifact, `shoal artifact diff v1.shoal v2-thin.shoal`".to_owned(),
                format!("{} B", m.thin_diff),
            ));
            goals.push(Goal::relative(
                per_name,
                Ok(Quantity::Bytes(m.perbase.bytes)),
                Baseline {
                    label: "thin delta artifact `diff`".into(),
                    quantity: Quantity::Bytes(m.thin_diff),
                },
                Target::RatioAtMost(1.05),
            ));
            goals.push(Goal::relative(
                vs_plain,
                Ok(Quantity::Bytes(m.perbase.bytes)),
                Baseline {
                    label: "plain chunks".into(),
                    quantity: Quantity::Bytes(m.plain.bytes),
                },
                Target::RatioAtMost(0.70),
            ));
            goals.push(Goal::relative(
                vs_static,
                Ok(Quantity::Bytes(m.static_perbase.bytes)),
                Baseline {
                    label: "plain chunk files".into(),
                    quantity: Quantity::Bytes(m.static_plain.bytes),
                },
                Target::RatioAtMost(0.70),
            ));
        }
        Err(e) => {
            let why = format!("{e:#}");
            progress(&format!("net: per-base row not measured: {why}"));
            goals.push(Goal::not_run(
                per_name,
                why.clone(),
                Target::RatioAtMost(1.05),
            ));
            goals.push(Goal::not_run(
                vs_plain,
                why.clone(),
                Target::RatioAtMost(0.70),
            ));
            goals.push(Goal::not_run(vs_static, why, Target::RatioAtMost(0.70)));
        }
    }
    Ok(Section {
        title: "Issue 12 — per-base encodings served by `shoal server`".to_owned(),
        goals,
        series: Vec::new(),
        facts,
    })
}

fn measure(inp: &Inputs) -> Result<Measured> {
    let w = inp.work.join("net-perbase");
    let _ = std::fs::remove_dir_all(&w);
    std::fs::create_dir_all(&w)?;
    let sh = |args: &[&str]| {
        let mut c = Command::new(&inp.shoal);
        c.current_dir(&w).args(args);
        c
    };
    crate::fleet::keys_root_and_releases(
        &inp.shoal,
        &w,
        &inp.v1,
        &inp.v2,
        "bench-board",
        "perbase",
    )?;
    progress("perbase: building the thin delta artifact (untimed)");
    run(sh(&[
        "--quiet",
        "artifact",
        "build",
        "--name",
        "bench-os",
        "--version",
        "2",
        "--device-type",
        "bench-board",
        "--security-counter",
        "1",
        "--key",
        "rel.pem",
        "--base",
        "v1.shoal",
        "--out",
        "v2-thin.shoal",
        "--base-image",
    ])
    .arg(&inp.v1)
    .arg("--image")
    .arg(&inp.v2))?;
    let thin_diff = json(&mut sh(&[
        "artifact",
        "diff",
        "v1.shoal",
        "v2-thin.shoal",
        "--json",
    ]))?["download_bytes"]
        .as_u64()
        .context("diff: download_bytes")?;

    let (server, url, token) = crate::net_link::start_server(&inp.shoal, &w)?;
    let link = Link::start(url.trim_start_matches("http://").to_owned())?;
    // The static chunk host: nginx serving the server's store, behind its own link.
    let nginx_port = free_port()?;
    let _nginx = start_nginx(
        &w.join("nginx"),
        &w.join("server").join("store"),
        nginx_port,
    )?;
    let static_link = Link::start(format!("127.0.0.1:{nginx_port}"))?;
    let token = std::cell::RefCell::new(token);
    let admin = |args: &[&str]| -> Result<serde_json::Value> {
        json(
            sh(&[
                "admin",
                "--json",
                "--server",
                &url,
                "--token",
                &token.borrow(),
            ])
            .args(args),
        )
    };
    let id_of = |v: serde_json::Value| -> Result<String> {
        Ok(v["id"].as_str().context("an id")?.to_owned())
    };
    let v1 = id_of(admin(&["releases", "upload", "v1.shoal"])?)?;
    let v2 = id_of(admin(&["releases", "upload", "v2.shoal"])?)?;
    progress("perbase: the server encodes v2 against v1");
    let started = Instant::now();
    let encoded = admin(&["releases", "encode", &v2, "--base", &v1])?;
    let encode_s = started.elapsed().as_secs_f64();

    // The device: slot A holds v1's bytes (not installed by Shoal), slot B empty.
    let dev = w.join("device");
    std::fs::create_dir_all(dev.join("health.d"))?;
    run(Command::new("cp")
        .arg("--sparse=never")
        .arg(&inp.v1)
        .arg(dev.join("a.img")))?;
    let size = std::fs::metadata(&inp.v1)?.len();
    std::fs::File::create(dev.join("b.img"))?.set_len(size)?;
    run(sh(&["--quiet", "env", "set", "--file"])
        .arg(dev.join("bootenv"))
        .args(["shoal_slot=A", "shoal_booted=A"]))?;
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let config = |dir: &Path, delta: bool| {
        format!(
            "[device]\ntype = \"bench-board\"\ndata_dir = {}\ntrust_root = {}\nreboot_command = [\"touch\", {}]\n\n\
             [health]\ndir = {}\n\n[server]\nurl = \"{}\"\npoll_interval_s = 1\nretry_max_s = 2\ndelta = {delta}\n\
             identity = {{ mac = \"02:00:00:00:00:97\" }}\n\n\
             [slots]\na = {{ path = {} }}\nb = {{ path = {} }}\n\n[slots.detect]\nfrom = \"bootloader\"\n\n\
             [bootloader]\ntype = \"file\"\npath = {}\n",
            q(&dir.join("data")),
            q(&w.join("root.shoalroot")),
            q(&dir.join("rebooted")),
            q(&dir.join("health.d")),
            link.url,
            q(&dir.join("a.img")),
            q(&dir.join("b.img")),
            q(&dir.join("bootenv")),
        )
    };
    std::fs::write(dev.join("shoal.toml"), config(&dev, true))?;
    let daemon_bin = if inp.device_shoal.is_file() {
        &inp.device_shoal
    } else {
        &inp.shoal
    };
    let start = |dir: &Path| -> Result<Proc> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))?;
        Ok(Proc(
            Command::new(daemon_bin)
                .arg("daemon")
                .arg("--config")
                .arg(dir.join("shoal.toml"))
                .env("SHOAL_LOG", "shoal=info")
                .env("NO_COLOR", "1")
                .stderr(log)
                .stdout(Stdio::null())
                .spawn()
                .context("cannot start shoal daemon")?,
        ))
    };
    let log = |dir: &Path| std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    let deploy = |name: &str, release: &str, device: &str| -> Result<String> {
        id_of(admin(&[
            "deployments",
            "create",
            "--name",
            name,
            "--release",
            release,
            "--device",
            device,
        ])?)
    };
    let status = |dep: &str| -> Result<String> {
        Ok(admin(&["deployments", "devices", dep])?[0]["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    };
    // Waits for the armed trial of deployment `dep` on the device in `dir`.
    let armed = |dir: &Path, from: usize| -> Result<()> {
        wait_until("the install", 1800, || {
            let l = log(dir);
            if l[from..].contains("install failed") {
                bail!("the install failed: {l}");
            }
            Ok(dir.join("rebooted").exists())
        })
    };

    let mut daemon = start(&dev)?;
    let mut device = String::new();
    wait_until("a pending device", 60, || {
        let v = admin(&["devices", "list", "--status", "pending"])?;
        if let Some(id) = v[0]["id"].as_str() {
            device = id.to_owned();
        }
        Ok(!device.is_empty())
    })?;
    admin(&["devices", "accept", &device])?;
    wait_until("the inventory", 60, || {
        Ok(admin(&["devices", "show", &device])?["inventory"]["device_type"] == "bench-board")
    })?;
    progress("perbase: the device installs v1 (from its slot A) and boots it");
    let dep1 = deploy("perbase-v1", &v1, &device)?;
    armed(&dev, 0)?;
    drop(daemon);
    std::fs::remove_file(dev.join("rebooted"))?;
    reboot(&dev.join("bootenv"))?;
    daemon = start(&dev)?;
    wait_until("v1's success", 300, || Ok(status(&dep1)? == "success"))?;
    wait_until("the running slot's index", 600, || {
        Ok(log(&dev)
            .matches("the running slot's index is ready")
            .count()
            >= 2)
    })?;
    drop(daemon);
    // The same device on v1, twice: the snapshot fetches plain chunks.
    let snap = w.join("device-plain");
    run(Command::new("cp").arg("-a").arg(&dev).arg(&snap))?;
    let snap_config = std::fs::read_to_string(dev.join("shoal.toml"))?
        .replace(&dev.display().to_string(), &snap.display().to_string())
        .replace("delta = true", "delta = false");
    std::fs::write(snap.join("shoal.toml"), snap_config)?;
    // Two more for the static host: per-base and plain.
    let snapshot = |name: &str, delta: bool| -> Result<std::path::PathBuf> {
        let to = w.join(name);
        run(Command::new("cp").arg("-a").arg(&dev).arg(&to))?;
        let mut c = std::fs::read_to_string(dev.join("shoal.toml"))?
            .replace(&dev.display().to_string(), &to.display().to_string());
        if !delta {
            c = c.replace("delta = true", "delta = false");
        }
        std::fs::write(to.join("shoal.toml"), c)?;
        Ok(to)
    };
    let static_dev = snapshot("device-static", true)?;
    let static_plain_dev = snapshot("device-static-plain", false)?;

    let one = |dir: &Path, name: &str| -> Result<(Install, String)> {
        progress(&format!("perbase: v1 → v2 over the link, {name}"));
        let from = log(dir).len();
        let daemon = start(dir)?;
        let both = || {
            let ((d, u), (sd, su)) = (link.bytes(), static_link.bytes());
            (d + sd, u + su)
        };
        let (down0, up0) = both();
        let dep = deploy(name, &v2, &device)?;
        armed(dir, from)?;
        let (down1, up1) = both();
        drop(daemon);
        let l = log(dir)[from..].to_owned();
        let field = |key: &str| -> u64 {
            l.lines()
                .filter(|x| x.contains("installed; trial armed"))
                .filter_map(|x| {
                    x.split_whitespace()
                        .find_map(|w| w.strip_prefix(&format!("{key}=")))
                        .and_then(|v| v.parse().ok())
                })
                .next_back()
                .unwrap_or(0)
        };
        Ok((
            Install {
                bytes: (down1 - down0) + (up1 - up0),
                wall_s: log_span_s(&l, "state=\"downloading\"", "installed; trial armed")
                    .context("no timestamps in the daemon log")?,
                delta_chunks: field("delta_chunks"),
            },
            dep,
        ))
    };
    let (perbase, dep2) = one(&dev, "perbase-v2")?;
    admin(&["deployments", "abort", &dep2])?;
    let (plain, dep3) = one(&snap, "plain-v2")?;
    admin(&["deployments", "abort", &dep3])?;
    if perbase.delta_chunks == 0 {
        bail!("the device on v1 got no delta-encoded chunk: {}", log(&dev));
    }
    if static_link.bytes() != (0, 0) {
        bail!("the static host was used before it was handed out");
    }

    // The server again on the same port (the device's link points there), now
    // handing out the static host.
    progress("perbase: the server restarts with --chunk-base-url (nginx)");
    let listen = url.trim_start_matches("http://").to_owned();
    drop(server);
    let (_server, url2, token2) = crate::net_link::start_server_with(
        &inp.shoal,
        &w,
        &listen,
        &["--chunk-base-url", &static_link.url],
    )?;
    if url2 != url {
        bail!("the server restarted on {url2}, not {url}");
    }
    *token.borrow_mut() = token2;
    let (static_perbase, dep4) = one(&static_dev, "static-perbase-v2")?;
    admin(&["deployments", "abort", &dep4])?;
    let (static_plain, _) = one(&static_plain_dev, "static-plain-v2")?;
    if static_perbase.delta_chunks == 0 {
        bail!(
            "the device on v1 got no delta-encoded chunk from the static host: {}",
            log(&static_dev)
        );
    }
    Ok(Measured {
        thin_diff,
        encode_s,
        encoded,
        perbase,
        plain,
        static_perbase,
        static_plain,
    })
}

/// A reboot of the device whose file bootloader environment is `env`: bootctl's
/// bootloader model picks the slot.
fn reboot(env: &Path) -> Result<()> {
    use shoal_bootctl::env::file::FileEnv;
    use shoal_bootctl::scheme::{Flavor, Scheme};
    let mut e = FileEnv::open(env, true).context("cannot open the bootloader environment")?;
    shoal_bootctl::model::boot_env(
        &mut e,
        &shoal_bootctl::model::Bootloader::new(Scheme::Shoal, Flavor::File),
    )
    .map_err(|e| anyhow::anyhow!("booting the device: {e:?}"))?;
    Ok(())
}

/// A free loopback port (bound and released: nginx cannot listen on port 0).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Debian's nginx serving `root` on `port` as a static chunk host (one process, no
/// master, so dropping the [`Proc`] stops it), with its files in `dir`.
fn start_nginx(dir: &Path, root: &Path, port: u16) -> Result<crate::net_link::Proc> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("nginx is not installed: install Debian's nginx")?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    let conf = format!(
        r#"daemon off;
master_process off;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    default_type application/octet-stream;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /chunks/ {{ try_files $uri =404; }}
        location /dictionaries/ {{ try_files $uri =404; }}
        location /deltas/ {{ try_files $uri =404; }}
        location / {{ return 404; }}
    }}
}}
"#,
        dir = dir.display(),
        root = root.display(),
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let proc = crate::net_link::Proc(
        Command::new(nginx)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run nginx: install Debian's nginx")?,
    );
    wait_until("nginx", 10, || {
        Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
    })?;
    Ok(proc)
}
