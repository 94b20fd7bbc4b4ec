//! Helpers of the server tests: a real `shoal server` process on loopback, a
//! PostgreSQL database per test, `shoal admin` runs, and a device client that signs
//! auth requests with its ed25519 key.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use reqwest::blocking::{Client, Response};
use serde_json::{Value, json};
use shoal_signing::SecretKey;
use shoal_tests::{ok, run_in, shoal};

/// Which database a server runs on.
#[derive(Debug, Clone)]
pub enum Db {
    /// SQLite in the data directory.
    Sqlite,
    /// PostgreSQL at this URL.
    Postgres(String),
}

/// A fresh PostgreSQL database for one test, named `name`. Needs Debian's
/// `postgresql` running (`.ci/run` starts it with `pg_ctlcluster 15 main start` and
/// makes the role `shoal`); `SHOAL_TEST_POSTGRES` overrides the server URL.
pub fn postgres(name: &str) -> Db {
    let base = std::env::var("SHOAL_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://shoal:shoal@127.0.0.1:5432".into());
    let out = Command::new("psql")
        .arg(format!("{base}/postgres"))
        .args(["-v", "ON_ERROR_STOP=1", "-qc"])
        .arg(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .args(["-qc"])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run psql ({e}): install Debian's postgresql and postgresql-client")
        });
    assert!(
        out.status.success(),
        "cannot create database {name} on {base}: {}\nDebian's postgresql must be running \
         (pg_ctlcluster 15 main start) with a superuser role shoal/shoal, as .ci/run sets up",
        String::from_utf8_lossy(&out.stderr)
    );
    Db::Postgres(format!("{base}/{name}"))
}

/// Keys, a trust root and artifacts in a temporary directory.
pub struct Setup {
    pub dir: tempfile::TempDir,
}

impl Setup {
    /// Release key `rel.pem`, an unknown key `other.pem`, `root.shoalroot`
    /// trusting `rel`, and `v1.shoal`, `v2.shoal` (signed by rel, device type
    /// `board`), `bad.shoal` (signed by `other`).
    pub fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for k in ["rootk", "rel", "other"] {
            ok(run_in(
                d,
                &["key", "generate", "--out", &format!("{k}.pem")],
            ));
        }
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
                "--sign",
                "rootk.pem",
                "--out",
                "root.shoalroot",
            ],
        ));
        let v1 = image(1, 3 << 20);
        let mut v2 = v1.clone();
        for b in &mut v2[1 << 20..(1 << 20) + 300_000] {
            *b = b.wrapping_add(1);
        }
        std::fs::write(d.join("v1.img"), &v1).unwrap();
        std::fs::write(d.join("v2.img"), &v2).unwrap();
        for (img, version, key, out) in [
            ("v1.img", "1", "rel.pem", "v1.shoal"),
            ("v2.img", "2", "rel.pem", "v2.shoal"),
            ("v1.img", "9", "other.pem", "bad.shoal"),
        ] {
            build_release(d, img, version, key, out);
        }
        Setup { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The trust root, as devices hold it.
    pub fn root(&self) -> shoal_signing::TrustRoot {
        shoal_signing::SignedRoot::load(&self.path("root.shoalroot"))
            .expect("root")
            .root
    }
}

/// Pseudo-random bytes (xorshift), compressible enough to be realistic.
/// `shoal artifact build` in `dir`: release `acme-os` `version` of `img` for
/// device type `board` (security counter 1), signed with `key`, into `out`.
pub fn build_release(dir: &Path, img: &str, version: &str, key: &str, out: &str) {
    ok(run_in(
        dir,
        &[
            "--quiet",
            "artifact",
            "build",
            "--image",
            img,
            "--name",
            "acme-os",
            "--version",
            version,
            "--device-type",
            "board",
            "--security-counter",
            "1",
            "--key",
            key,
            "--out",
            out,
        ],
    ));
}

pub fn image(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Runs of repeated bytes between random ones.
        let b = (x & 0xff) as u8;
        let run = 1 + ((x >> 8) & 7) as usize;
        for _ in 0..run.min(len - out.len()) {
            out.push(b);
        }
    }
    out
}

/// A running `shoal server`; killed on drop.
pub struct Server {
    child: Child,
    pub url: String,
    pub data: PathBuf,
    /// Everything the server wrote to stderr so far.
    log: std::sync::Arc<std::sync::Mutex<String>>,
    /// The CA certificate `shoal admin` must trust (an https server).
    pub ca: Option<PathBuf>,
}

impl Server {
    /// Starts `shoal server` on a free loopback port with `data` and `db`.
    pub fn start(setup: &Setup, data: &Path, db: &Db, extra: &[&str]) -> Server {
        Server::start_with_env(setup, data, db, extra, &[])
    }

    /// [`Server::start`] with more environment variables.
    pub fn start_with_env(
        setup: &Setup,
        data: &Path,
        db: &Db,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let mut cmd = shoal();
        cmd.envs(env.iter().copied());
        cmd.arg("server")
            .arg("--data")
            .arg(data)
            .arg("--root")
            .arg(setup.path("root.shoalroot"))
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            // Tests count exact bytes of plain chunks: per-base encodings made in
            // the background only where a test asks for them.
            .args(
                (!extra.iter().any(|a| a.starts_with("--auto-encode-bases")))
                    .then_some(["--auto-encode-bases", "0"])
                    .into_iter()
                    .flatten(),
            )
            .env("SHOAL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Db::Postgres(url) = db {
            cmd.arg("--database").arg(url);
        }
        let mut child = cmd.spawn().expect("spawn shoal server");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let keep = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = keep.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
                if !sent && let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(Ok(rest.trim().to_owned()));
                    sent = true;
                } else if !sent {
                    let _ = tx.send(Err(line.clone()));
                }
                eprintln!("[server] {line}");
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(url)) => {
                    return Server {
                        child,
                        url,
                        data: data.to_path_buf(),
                        log,
                        ca: None,
                    };
                }
                Ok(Err(_)) => continue,
                Err(_) => {
                    let _ = child.kill();
                    panic!("shoal server did not start: {:?}", child.wait());
                }
            }
        }
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Stops the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Makes an API token with `shoal server token` on the server's database.
pub fn host_token(data: &Path, db: &Db, role: &str) -> String {
    let mut cmd = shoal();
    cmd.arg("server").arg("token").arg("--data").arg(data);
    if let Db::Postgres(url) = db {
        cmd.arg("--database").arg(url);
    }
    cmd.args(["--name", &format!("test-{role}"), "--role", role]);
    ok(cmd.output().expect("run")).trim().to_owned()
}

/// Runs `shoal admin ARGS` against `server` with `token`.
pub fn admin(server: &Server, token: &str, args: &[&str]) -> Output {
    let mut cmd = shoal();
    cmd.arg("admin")
        .args(["--server", &server.url, "--token", token]);
    if let Some(ca) = &server.ca {
        cmd.arg("--ca-cert").arg(ca);
    }
    cmd.args(args).output().expect("run shoal admin")
}

/// `shoal admin --json ARGS`, which must succeed, parsed.
pub fn admin_json(server: &Server, token: &str, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = ok(admin(server, token, &all));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// An HTTP client for the tests (no proxy, rustls on ring).
pub fn http() -> Client {
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

/// Asserts a response has `status` and a JSON error body; returns the message.
pub fn expect_error(resp: Response, status: u16) -> String {
    let got = resp.status().as_u16();
    let body = resp.text().unwrap_or_default();
    assert_eq!(got, status, "expected {status}, got {got}: {body}");
    let v: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("error body not JSON ({e}): {body}"));
    assert!(v["code"].is_string(), "no code in {body}");
    v["error"].as_str().expect("error message").to_owned()
}

/// A simulated device: an ed25519 key and a token once accepted.
pub struct Device {
    pub key: SecretKey,
    pub id: String,
    pub token: Option<String>,
}

impl Device {
    pub fn new(seed: u8) -> Device {
        let key = SecretKey::from_seed(&[seed; 32]);
        let id = hex::encode(key.public().id().0);
        Device {
            key,
            id,
            token: None,
        }
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.key.public().to_bytes())
    }

    /// The signed auth request body and its signature header value.
    pub fn auth_body(&self, http: &Client, server: &Server) -> (Vec<u8>, String) {
        let nonce: Value = http
            .get(format!(
                "{}/api/devices/v1/authentication/nonce",
                server.url
            ))
            .send()
            .expect("nonce")
            .json()
            .expect("nonce json");
        let body = serde_json::to_vec(&json!({
            "identity": { "mac": format!("02:00:00:00:00:{}", &self.id[..2]) },
            "public_key": self.public_hex(),
            "nonce": nonce["nonce"],
        }))
        .unwrap();
        let sig = hex::encode(self.key.sign(&body));
        (body, sig)
    }

    pub fn send_auth(&self, http: &Client, server: &Server, body: &[u8], sig: &str) -> Response {
        http.post(format!(
            "{}/api/devices/v1/authentication/auth_requests",
            server.url
        ))
        .header("content-type", "application/json")
        .header("x-shoal-signature", sig)
        .body(body.to_vec())
        .send()
        .expect("auth request")
    }

    /// Authenticates; returns the response (200 with a token once accepted).
    pub fn auth(&mut self, http: &Client, server: &Server) -> Response {
        let (body, sig) = self.auth_body(http, server);
        self.send_auth(http, server, &body, &sig)
    }

    /// Authenticates and keeps the token; panics unless accepted.
    pub fn login(&mut self, http: &Client, server: &Server) {
        let resp = self.auth(http, server);
        assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.text());
        let v: Value = resp.json().unwrap();
        assert_eq!(v["device_id"], self.id.as_str());
        self.token = Some(v["token"].as_str().unwrap().to_owned());
    }

    pub fn req(
        &self,
        http: &Client,
        method: reqwest::Method,
        server: &Server,
        path: &str,
    ) -> reqwest::blocking::RequestBuilder {
        let r = http.request(method, format!("{}/api/devices/v1{path}", server.url));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }
}

/// v1 with small edits every 16 KiB over 2 MiB and 1000 bytes inserted at 1.5 MiB:
/// every chunk there changes, little of each (per-base encodings pay).
pub fn edited(v1: &[u8]) -> Vec<u8> {
    let mut v2 = v1.to_vec();
    let mut at = 512 * 1024;
    let mut n = 0u32;
    while at < (5 << 19) {
        v2[at..at + 12].copy_from_slice(format!("edit{n:08}").as_bytes());
        at += 16 * 1024;
        n += 1;
    }
    let insert: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
    v2.splice(3 << 19..3 << 19, insert);
    v2
}
