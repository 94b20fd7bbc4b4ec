//! Chunks served by a real nginx (Debian's `nginx`) from the server's chunk store
//! directory, fetched by a real `shoal daemon` through the static base URL the
//! server hands out (`shoal server --chunk-base-url`).
//!
//! - v1: every chunk comes from nginx (its access log), the server streams none
//!   (its log has no "chunk batch served"), and the bytes the daemon read from
//!   the static host are exactly v1's stored bytes.
//! - v2, with nginx serving a copy of the store that lacks one chunk v2 needs (a
//!   CDN not yet filled): nginx answers 404 for it, the daemon asks the server
//!   for that one chunk only, and the install completes.
//! - Per-base encodings on the static host: a device on v1 fetches the index and
//!   the delta records of v2 against v1 as files from nginx (a record nginx lacks
//!   comes as its plain chunk file) and downloads fewer bytes than v2's plain
//!   chunks.

mod device_common;
mod server_common;

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use device_common::*;
use serde_json::Value;
use server_common::*;
use shoal_bootctl::Slot;
use shoal_tests::{ok, run_in};

/// A real nginx serving `root` on a loopback port; stopped (SIGTERM, which also
/// ends its workers) on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Nginx {
    /// Starts nginx with its own configuration, logs and pid file in `dir`. nginx
    /// cannot listen on port 0, so a free port is picked (bound and released) and
    /// the start retried on a collision.
    fn start(dir: &Path, root: &Path) -> Nginx {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or_else(|| panic!("nginx is not installed: install Debian's nginx"));
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        for attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let conf = format!(
                r#"daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format shoal '$request_method $uri $status $body_bytes_sent';
    access_log {dir}/access.log shoal;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    default_type application/octet-stream;
    keepalive_requests 10000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ try_files $uri =404; }}
    }}
}}
"#,
                dir = dir.display(),
                root = root.display(),
            );
            std::fs::write(dir.join("nginx.conf"), conf).unwrap();
            let mut child = Command::new(nginx)
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run nginx ({e}): install Debian's nginx"));
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    let mut err = String::new();
                    use std::io::Read;
                    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                    if err.contains("Address already in use") && attempt < 4 {
                        break;
                    }
                    panic!("nginx exited ({status}): {err}");
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Nginx {
                        child,
                        dir: dir.to_path_buf(),
                        port,
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("nginx did not start");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    /// The access log: (method, path, status, body bytes) per request.
    fn requests(&self) -> Vec<(String, String, u16, u64)> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                assert_eq!(f.len(), 4, "access log line {l:?}");
                (
                    f[0].to_owned(),
                    f[1].to_owned(),
                    f[2].parse().unwrap(),
                    f[3].parse().unwrap(),
                )
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The chunk files in a store directory, as `chunks/<2>/<64>` paths.
fn chunk_files(store: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for sub in std::fs::read_dir(store.join("chunks")).unwrap() {
        let sub = sub.unwrap().path();
        for f in std::fs::read_dir(&sub).unwrap() {
            let f = f.unwrap().path();
            out.insert(
                f.strip_prefix(store)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    ok(Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .expect("cp"));
}

/// Points the symlink `link` at `target` atomically (nginx follows it per request).
fn repoint(link: &Path, target: &Path) {
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

#[test]
fn daemon_fetches_chunks_from_nginx_and_the_server_streams_none() {
    let setup = Setup::new();
    let data = setup.path("data");
    // nginx serves whatever `static` points at: first the server's store itself.
    let link = setup.path("static");
    repoint(&link, &data.join("store"));
    let nginx = Nginx::start(&setup.path("nginx"), &link);
    let server = Server::start(
        &setup,
        &data,
        &Db::Sqlite,
        &["--chunk-base-url", &nginx.url()],
    );
    let token = host_token(&data, &Db::Sqlite, "admin");
    let v1 = upload(&server, &token, &setup.path("v1.shoal"));

    let dev = Dev::new(&setup, &server.url, "");
    let mut daemon = dev.start();
    let device = accept_device(&dev, &server, &token);

    // v1: all from nginx.
    let dep1 = deploy(&server, &token, "v1", &v1, &device);
    reboot_and_succeed(&dev, &mut daemon, &server, &token, &dep1);
    let v1_img = std::fs::read(setup.path("v1.img")).unwrap();
    assert_eq!(dev.slot_bytes(Slot::B, v1_img.len()), v1_img);
    let slog = server.log();
    assert!(
        !slog.contains("chunk batch served"),
        "the server streamed chunks itself:\n{slog}"
    );
    let v1_stored = {
        let d: Value = serde_json::from_str(&ok(run_in(
            setup.dir.path(),
            &["artifact", "diff", "v1.shoal", "v1.shoal", "--json"],
        )))
        .unwrap();
        d["full_stored_bytes"].as_u64().unwrap()
    };
    let requests = nginx.requests();
    let chunk_gets: Vec<_> = requests
        .iter()
        .filter(|(m, p, s, _)| m == "GET" && p.starts_with("/chunks/") && *s == 200)
        .collect();
    let served: u64 = chunk_gets.iter().map(|r| r.3).sum();
    let mut seen = BTreeSet::new();
    let dups: Vec<_> = chunk_gets.iter().filter(|r| !seen.insert(&r.1)).collect();
    assert!(
        dups.is_empty(),
        "chunks fetched twice: {dups:?}\n{}",
        dev.log()
    );
    assert_eq!(
        served, v1_stored,
        "nginx served {served} chunk bytes, v1 has {v1_stored}: {requests:?}"
    );
    assert_eq!(
        chunk_gets.len(),
        chunk_files(&data.join("store")).len(),
        "one GET per chunk of v1"
    );
    // The daemon counts what it read from the static host: the chunks and the
    // zstd dictionary they were compressed with.
    let dictionaries: u64 = requests
        .iter()
        .filter(|(m, p, s, _)| m == "GET" && p.starts_with("/dictionaries/") && *s == 200)
        .map(|r| r.3)
        .sum();
    let log = dev.log();
    assert_eq!(
        installed_field(&log, "transferred_static"),
        vec![v1_stored + dictionaries],
        "{log}"
    );
    assert_eq!(installed_field(&log, "transferred"), vec![0], "{log}");

    // v2, with nginx serving a copy of the store that lacks one chunk only v2 has.
    let before = chunk_files(&data.join("store"));
    let v2 = upload(&server, &token, &setup.path("v2.shoal"));
    let added: Vec<String> = chunk_files(&data.join("store"))
        .difference(&before)
        .cloned()
        .collect();
    assert!(!added.is_empty(), "v2 added no chunks");
    let partial = setup.path("partial-store");
    copy_dir(&data.join("store"), &partial);
    let withheld = &added[0];
    std::fs::remove_file(partial.join(withheld)).unwrap();
    repoint(&link, &partial);

    let dep2 = deploy(&server, &token, "v2", &v2, &device);
    reboot_and_succeed(&dev, &mut daemon, &server, &token, &dep2);
    let v2_img = std::fs::read(setup.path("v2.img")).unwrap();
    assert_eq!(dev.slot_bytes(Slot::A, v2_img.len()), v2_img);
    let batches: Vec<String> = server
        .log()
        .lines()
        .filter(|l| l.contains("chunk batch served"))
        .map(str::to_owned)
        .collect();
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert!(batches[0].contains("chunks=1 "), "{batches:?}");
    let withheld_path = format!("/{withheld}");
    assert!(
        nginx
            .requests()
            .iter()
            .any(|(m, p, s, _)| m == "GET" && *p == withheld_path && *s == 404),
        "nginx was not asked for the withheld chunk"
    );
    assert!(
        dev.log()
            .contains("the static chunk host lacks chunks; asking the server"),
        "{}",
        dev.log()
    );
    stop(&mut daemon);
}

/// Per-base encodings on the static host: the server encodes v2 against v1 in the
/// background (the fleet runs v1), into its store; nginx serves the index and the
/// records as files. The device on v1 fetches the index, the records (one withheld
/// from nginx's copy: 404, so that chunk comes as its plain file), the plain chunks
/// without a record, decodes against its running slot and installs a verified v2,
/// with fewer bytes from nginx than v2's plain chunks and none from the server.
#[test]
fn a_device_on_v1_gets_per_base_encodings_from_nginx() {
    let setup = Setup::new();
    let data = setup.path("data");
    let link = setup.path("static");
    repoint(&link, &data.join("store"));
    let nginx = Nginx::start(&setup.path("nginx"), &link);
    let server = Server::start(
        &setup,
        &data,
        &Db::Sqlite,
        &["--chunk-base-url", &nginx.url(), "--auto-encode-bases", "2"],
    );
    let token = host_token(&data, &Db::Sqlite, "admin");
    let v1 = upload(&server, &token, &setup.path("v1.shoal"));
    let v1_img = std::fs::read(setup.path("v1.img")).unwrap();
    let v2_img = edited(&v1_img);
    std::fs::write(setup.path("v2d.img"), &v2_img).unwrap();
    build_release(setup.dir.path(), "v2d.img", "2d", "rel.pem", "v2d.shoal");

    let dev = Dev::new(&setup, &server.url, "");
    let mut daemon = dev.start();
    let device = accept_device(&dev, &server, &token);
    let dep1 = deploy(&server, &token, "v1", &v1, &device);
    reboot_and_succeed(&dev, &mut daemon, &server, &token, &dep1);
    wait_for(&dev, 60, "the inventory's release_version", || {
        admin_json(&server, &token, &["devices", "show", &device])["inventory"]["release_version"]
            == "1"
    });

    // The upload queues v2 against v1 (the release the fleet runs).
    let v2 = upload(&server, &token, &setup.path("v2d.shoal"));
    let mut row = Value::Null;
    wait_for(&dev, 180, "the background encoding", || {
        row = admin_json(&server, &token, &["releases", "encodings", &v2])[0].clone();
        assert_ne!(row["state"], "failed", "{row}");
        row["state"] == "done"
    });
    assert_eq!(
        (&row["base"], &row["origin"]),
        (&Value::from(v1.clone()), &Value::from("auto"))
    );
    let chunks_delta = row["chunks_delta"].as_u64().unwrap();
    let (plain, encoded) = (
        row["plain_bytes"].as_u64().unwrap(),
        row["encoded_bytes"].as_u64().unwrap(),
    );
    assert!(chunks_delta > 2 && encoded * 2 < plain, "{row}");

    // nginx serves a copy of the store lacking one record.
    let store = data.join("store");
    let partial = setup.path("partial-store");
    copy_dir(&store, &partial);
    let index_path = format!("deltas/{v1}/index/{v2}");
    let index_len = std::fs::metadata(partial.join(&index_path)).unwrap().len();
    assert_eq!(index_len, 36 * chunks_delta);
    let record_dir = std::fs::read_dir(partial.join("deltas").join(&v1))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap() != "index")
        .unwrap();
    let withheld = std::fs::read_dir(&record_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let withheld_id = withheld.file_name().unwrap().to_string_lossy().into_owned();
    let withheld_record = std::fs::metadata(&withheld).unwrap().len();
    let withheld_plain = std::fs::metadata(
        store
            .join("chunks")
            .join(&withheld_id[..2])
            .join(&withheld_id),
    )
    .unwrap()
    .len();
    std::fs::remove_file(&withheld).unwrap();
    repoint(&link, &partial);

    let seen = nginx.requests().len();
    let dep2 = deploy(&server, &token, "v2", &v2, &device);
    reboot_and_succeed(&dev, &mut daemon, &server, &token, &dep2);
    stop(&mut daemon);
    assert_eq!(dev.slot_bytes(Slot::A, v2_img.len()), v2_img);
    let log = dev.log();
    assert_eq!(
        installed_field(&log, "delta_chunks").last().copied(),
        Some(chunks_delta - 1),
        "{log}"
    );
    let requests = nginx.requests()[seen..].to_vec();
    let ok_bytes = |prefix: &str| -> u64 {
        requests
            .iter()
            .filter(|(m, p, s, _)| m == "GET" && p.starts_with(prefix) && *s == 200)
            .map(|r| r.3)
            .sum()
    };
    assert!(
        requests
            .iter()
            .any(|(_, p, s, _)| *p == format!("/{index_path}") && *s == 200),
        "{requests:?}"
    );
    assert!(
        requests.iter().any(|(_, p, s, _)| p.ends_with(&withheld_id)
            && p.starts_with("/deltas/")
            && *s == 404),
        "{requests:?}"
    );
    // Exactly: the records but the withheld one, its plain chunk instead, the
    // plain chunks without a record, and the index.
    let from_nginx = ok_bytes("/deltas/") + ok_bytes("/chunks/");
    assert_eq!(
        from_nginx,
        encoded - withheld_record + withheld_plain + index_len,
        "{row}\n{requests:?}"
    );
    assert!(
        from_nginx * 2 < plain,
        "{from_nginx} bytes from nginx with per-base encodings vs {plain} of plain chunks"
    );
    // The server streamed nothing.
    assert_eq!(
        installed_field(&log, "transferred").last().copied(),
        Some(0),
        "{log}"
    );
    assert!(
        !server.log().contains("chunk batch served"),
        "{}",
        server.log()
    );
}
