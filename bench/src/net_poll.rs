//! `shoal-bench net`, poll load rows: 10,000 devices polling one real `shoal
//! server` (release build, `--features server`) over real HTTP with real device
//! authentication, on SQLite and on PostgreSQL.
//!
//! The load generator is in this process (tokio, one kept-alive HTTP/1.1 client
//! pool for all devices). Each device has its own ed25519 key; the keys are
//! preauthorized through the management API (`POST /api/management/v1/devices`,
//! an admin token from `shoal server token`), then every device authenticates
//! (`GET .../authentication/nonce`, `POST .../auth_requests` signed with its key)
//! and keeps its token. The measured phase is open-loop, as a fleet is: device
//! `i` polls `GET /api/devices/v1/deployments/next` at `t0 + i·T/N + k·T` for
//! rounds `k`, whatever the other devices' answers, so a slow server cannot slow
//! the offered load down (no coordinated omission). The first round (new
//! connections, cold caches) is not counted. Latency is from the moment the
//! request was due to its whole answer; how late the client itself started
//! requests (CPU shared with the server) is reported beside it.
//!
//! Peak RSS is the server process's `VmHWM` from `/proc` at the end of the run.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use shoal_signing::SecretKey;

use crate::fleet::run;
use crate::report::{Goal, Quantity, Target};

/// Devices polling.
pub const DEVICES: usize = 10_000;
/// Each device's poll interval in the measured phase.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Rounds of polls, the first one not counted.
pub const ROUNDS: u32 = 4;
/// The p99 latency goal.
pub const P99_MAX_MS: f64 = 50.0;
/// Requests in flight while preauthorizing and authenticating.
const SETUP_CONCURRENCY: usize = 32;

/// Which database the server runs on.
#[derive(Debug, Clone)]
pub enum Db {
    /// SQLite in the data directory.
    Sqlite,
    /// PostgreSQL at this server URL (a database is made for the run).
    Postgres(String),
}

impl Db {
    fn name(&self) -> &'static str {
        match self {
            Db::Sqlite => "SQLite",
            Db::Postgres(_) => "PostgreSQL",
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct PollRun {
    /// The database.
    pub db: &'static str,
    /// Polls counted (after the warm-up round).
    pub polls: usize,
    /// Polls that failed (not 200/204).
    pub errors: usize,
    /// Median poll latency, ms.
    pub p50_ms: f64,
    /// 99th percentile poll latency, ms.
    pub p99_ms: f64,
    /// The slowest poll, ms.
    pub max_ms: f64,
    /// 99th percentile of how late the client started a poll, ms.
    pub lag_p99_ms: f64,
    /// Offered polls per second.
    pub rate: f64,
    /// 99th percentile of one device authentication (nonce + auth request), ms.
    pub auth_p99_ms: f64,
    /// The server's peak RSS, MiB.
    pub rss_peak_mib: f64,
}

/// A `shoal server` child, killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(
    shoal: &Path,
    dir: &Path,
    db: &Option<String>,
    connections: Option<u32>,
) -> Result<Server> {
    let mut cmd = Command::new(shoal);
    cmd.arg("server");
    if let Some(n) = connections {
        cmd.args(["--db-connections", &n.to_string()]);
    }
    cmd.arg("--data")
        .arg(dir.join("data"))
        .arg("--root")
        .arg(dir.join("root.shoalroot"))
        .args(["--listen", "127.0.0.1:0"])
        .env("SHOAL_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(url) = db {
        cmd.arg("--database").arg(url);
    }
    let mut child = cmd.spawn().context("cannot start shoal server")?;
    let stderr = child.stderr.take().context("server stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && let Some(rest) = line.split("listening on ").nth(1) {
                let _ = tx.send(rest.trim().to_owned());
                sent = true;
            } else if line.contains("ERROR") || line.contains("WARN") {
                eprintln!("shoal-bench: [server] {line}");
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| anyhow!("shoal server did not start"))?;
    Ok(Server { child, url })
}

/// Peak resident set of a process, MiB.
fn vm_hwm_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(kib / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Makes a fresh PostgreSQL database `name` on `base` (`postgres://user:pw@host:port`).
fn postgres_db(base: &str, name: &str) -> Result<String> {
    run(Command::new("psql")
        .arg(format!("{base}/postgres"))
        .args(["-v", "ON_ERROR_STOP=1", "-qc"])
        .arg(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .arg("-qc")
        .arg(format!("CREATE DATABASE {name}")))
    .context("PostgreSQL (Debian's postgresql, started by .ci/run with role shoal/shoal)")?;
    Ok(format!("{base}/{name}"))
}

/// Runs the whole poll load against a fresh server on `db`.
pub fn measure(shoal: &Path, work: &Path, db: &Db, connections: Option<u32>) -> Result<PollRun> {
    let dir = work.join(format!("poll-{}", db.name().to_lowercase()));
    std::fs::create_dir_all(&dir)?;
    crate::fleet::keys_and_root(shoal, &dir)?;
    let url = match db {
        Db::Sqlite => None,
        Db::Postgres(base) => Some(postgres_db(base, "shoal_bench_poll")?),
    };
    let mut token_cmd = Command::new(shoal);
    token_cmd
        .args(["server", "token", "--data"])
        .arg(dir.join("data"))
        .args(["--name", "bench", "--role", "admin"]);
    if let Some(u) = &url {
        token_cmd.arg("--database").arg(u);
    }
    let admin = run(&mut token_cmd)?.trim().to_owned();
    let server = start_server(shoal, &dir, &url, connections)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut run = rt.block_on(load(&server.url, &admin))?;
    run.db = db.name();
    run.rss_peak_mib = vm_hwm_mib(server.child.id())?;
    drop(server);
    Ok(run)
}

async fn load(base: &str, admin: &str) -> Result<PollRun> {
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(512)
        .build()?;
    let keys: Vec<SecretKey> = (0..DEVICES)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            seed[8] = 0x5b;
            SecretKey::from_seed(&seed)
        })
        .collect();

    crate::progress(&format!(
        "net: preauthorizing {DEVICES} device keys through the management API"
    ));
    let pre: Vec<Result<()>> = futures_util::stream::iter(keys.iter().enumerate())
        .map(|(i, k)| {
            let client = &client;
            async move {
                let r = client
                    .post(format!("{base}/api/management/v1/devices"))
                    .bearer_auth(admin)
                    .json(&serde_json::json!({
                        "identity": { "serial": format!("bench-{i:05}") },
                        "public_key": hex::encode(k.public().to_bytes()),
                    }))
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("preauthorize: {} {}", r.status(), r.text().await?);
                }
                Ok(())
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await;
    pre.into_iter().collect::<Result<Vec<()>>>()?;

    crate::progress(&format!(
        "net: {DEVICES} devices authenticate (nonce, signed auth request)"
    ));
    let auths: Vec<Result<(String, Duration)>> =
        futures_util::stream::iter(keys.iter().enumerate())
            .map(|(i, k)| {
                let client = &client;
                async move {
                    let start = Instant::now();
                    let nonce: serde_json::Value = client
                        .get(format!("{base}/api/devices/v1/authentication/nonce"))
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    let body = serde_json::to_vec(&serde_json::json!({
                        "identity": { "serial": format!("bench-{i:05}") },
                        "public_key": hex::encode(k.public().to_bytes()),
                        "nonce": nonce["nonce"],
                    }))?;
                    let sig = hex::encode(k.sign(&body));
                    let r = client
                        .post(format!(
                            "{base}/api/devices/v1/authentication/auth_requests"
                        ))
                        .header("content-type", "application/json")
                        .header("x-shoal-signature", sig)
                        .body(body)
                        .send()
                        .await?;
                    if !r.status().is_success() {
                        bail!("auth request: {} {}", r.status(), r.text().await?);
                    }
                    let v: serde_json::Value = r.json().await?;
                    let token = v["token"]
                        .as_str()
                        .context("no token in the auth answer")?
                        .to_owned();
                    Ok((token, start.elapsed()))
                }
            })
            .buffered(SETUP_CONCURRENCY)
            .collect()
            .await;
    let auths = auths.into_iter().collect::<Result<Vec<_>>>()?;
    let mut auth_ms: Vec<f64> = auths.iter().map(|(_, d)| ms(*d)).collect();
    auth_ms.sort_by(f64::total_cmp);
    let tokens: Vec<String> = auths.into_iter().map(|(t, _)| t).collect();

    crate::progress(&format!(
        "net: {DEVICES} devices poll deployments/next every {} s, {ROUNDS} rounds (the first not counted)",
        INTERVAL.as_secs()
    ));
    let samples: Arc<Mutex<Vec<(f64, f64, bool)>>> = Arc::new(Mutex::new(Vec::new()));
    let t0 = tokio::time::Instant::now() + Duration::from_millis(500);
    let mut tasks = Vec::with_capacity(DEVICES);
    for (i, token) in tokens.into_iter().enumerate() {
        let client = client.clone();
        let samples = Arc::clone(&samples);
        let url = format!("{base}/api/devices/v1/deployments/next");
        let offset = INTERVAL.mul_f64(i as f64 / DEVICES as f64);
        tasks.push(tokio::spawn(async move {
            for round in 0..ROUNDS {
                let due = t0 + offset + INTERVAL * round;
                tokio::time::sleep_until(due).await;
                let started = tokio::time::Instant::now();
                let ok = match client.get(&url).bearer_auth(&token).send().await {
                    Ok(r) => {
                        let good = r.status().as_u16() == 204 || r.status().as_u16() == 200;
                        r.bytes().await.is_ok() && good
                    }
                    Err(_) => false,
                };
                let done = tokio::time::Instant::now();
                if round > 0
                    && let Ok(mut s) = samples.lock()
                {
                    s.push((ms(done - due), ms(started - due), ok));
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let samples = std::mem::take(&mut *samples.lock().map_err(|_| anyhow!("poisoned"))?);
    let errors = samples.iter().filter(|s| !s.2).count();
    let mut lat: Vec<f64> = samples.iter().map(|s| s.0).collect();
    let mut lag: Vec<f64> = samples.iter().map(|s| s.1).collect();
    lat.sort_by(f64::total_cmp);
    lag.sort_by(f64::total_cmp);
    Ok(PollRun {
        db: "",
        polls: samples.len(),
        errors,
        p50_ms: percentile(&lat, 50.0),
        p99_ms: percentile(&lat, 99.0),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        lag_p99_ms: percentile(&lag, 99.0),
        rate: DEVICES as f64 / INTERVAL.as_secs_f64(),
        auth_p99_ms: percentile(&auth_ms, 99.0),
        rss_peak_mib: 0.0,
    })
}

/// The goal rows and facts of the poll load, on SQLite and PostgreSQL.
/// `connections`: the server's `--db-connections` (its default when `None`).
pub fn rows(
    shoal: &Path,
    work: &Path,
    connections: Option<u32>,
) -> (Vec<Goal>, Vec<(String, String)>) {
    let pg = std::env::var("SHOAL_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://shoal:shoal@127.0.0.1:5432".into());
    let mut goals = Vec::new();
    let mut facts = Vec::new();
    let mut by_db = BTreeMap::new();
    for db in [Db::Sqlite, Db::Postgres(pg)] {
        let name = db.name();
        crate::progress(&format!("net: poll load on {name}"));
        let run = measure(shoal, work, &db, connections);
        let title = format!(
            "{DEVICES} devices polling every {} s ({name}): p99 latency of deployments/next",
            INTERVAL.as_secs()
        );
        match run {
            Ok(r) if r.errors > 0 => {
                goals.push(Goal::not_run(
                    &title,
                    format!("{} of {} polls failed", r.errors, r.polls),
                    Target::AtMost(Quantity::Milliseconds(P99_MAX_MS)),
                ));
                by_db.insert(name, r);
            }
            Ok(r) => {
                goals.push(Goal::absolute(
                    &title,
                    Ok(Quantity::Milliseconds(r.p99_ms)),
                    Target::AtMost(Quantity::Milliseconds(P99_MAX_MS)),
                ));
                by_db.insert(name, r);
            }
            Err(e) => goals.push(Goal::not_run(
                &title,
                format!("{e:#}"),
                Target::AtMost(Quantity::Milliseconds(P99_MAX_MS)),
            )),
        }
    }
    for (name, r) in by_db {
        facts.push((
            format!("poll load on {name}"),
            format!(
                "{} polls counted at {:.0}/s offered, {} failed; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; client start lag p99 {:.1} ms; auth (nonce + signed request) p99 {:.1} ms; server peak RSS {:.1} MiB",
                r.polls,
                r.rate,
                r.errors,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.lag_p99_ms,
                r.auth_p99_ms,
                r.rss_peak_mib
            ),
        ));
    }
    facts.push((
        "poll load setup".to_string(),
        format!(
            "one `shoal server` (release, --features server, {} database connections) on loopback; the load generator (tokio, 2 worker threads, one HTTP/1.1 keep-alive pool) shares the machine's CPUs with it; keys preauthorized through the management API; each device authenticates with its own ed25519 key; open-loop polls (device i at t0 + i·{}s/{DEVICES} + k·{}s), the first of {ROUNDS} rounds not counted",
            connections.map_or("the default 16".to_owned(), |n| n.to_string()),
            INTERVAL.as_secs(),
            INTERVAL.as_secs()
        ),
    ));
    (goals, facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 99.0).is_nan());
    }
}
