//! `shoal server --chunks s3://BUCKET/PREFIX`: chunks written through
//! `object_store` to an S3-compatible server (moto's server mode, from PyPI:
//! `pip install 'moto[server]'`, started here on a loopback port), served to a
//! real `shoal daemon` by the server (read back from S3), then, after a restart
//! with `--chunk-base-url` pointing into the bucket, by S3 itself with the server
//! streaming nothing. A release deletion removes the chunks only it listed and its
//! per-base encodings (listed in the bucket before and after); a refused upload
//! leaves no manifest behind.

mod device_common;
mod server_common;

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use device_common::*;
use server_common::*;
use shoal_bootctl::Slot;

const BUCKET: &str = "shoal-chunks";
const PREFIX: &str = "fleet/eu";

/// moto's S3 server on a loopback port; killed on drop.
struct Moto {
    child: Child,
    url: String,
}

impl Moto {
    fn start() -> Moto {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run moto_server ({e}): pip install 'moto[server]'")
                });
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    eprintln!("moto_server exited ({status}); trying another port");
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Moto {
                        child,
                        url: format!("http://127.0.0.1:{port}"),
                    };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("moto_server did not start (pip install 'moto[server]')");
    }

    /// The keys under `prefix` (ListObjectsV2, one page: the test stores few).
    fn keys(&self, prefix: &str) -> BTreeSet<String> {
        let body = http()
            .get(format!("{}/{BUCKET}", self.url))
            .query(&[("list-type", "2"), ("prefix", prefix), ("max-keys", "1000")])
            .send()
            .expect("list objects")
            .text()
            .unwrap();
        assert!(
            !body.contains("<IsTruncated>true</IsTruncated>"),
            "more keys than one page"
        );
        body.split("<Key>")
            .skip(1)
            .map(|s| s.split("</Key>").next().unwrap().to_owned())
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3_env(moto: &Moto) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ENDPOINT", moto.url.clone()),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
    ]
}

fn start(setup: &Setup, moto: &Moto, extra: &[&str]) -> Server {
    let env = s3_env(moto);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let chunks = format!("s3://{BUCKET}/{PREFIX}/");
    let mut args = vec!["--chunks", &chunks];
    args.extend_from_slice(extra);
    Server::start_with_env(setup, &setup.path("data"), &Db::Sqlite, &args, &env)
}

#[test]
fn chunks_live_in_s3_and_devices_get_them_from_the_server_or_the_bucket() {
    let setup = Setup::new();
    let moto = Moto::start();
    let created = http()
        .put(format!("{}/{BUCKET}", moto.url))
        .send()
        .expect("create bucket");
    assert!(created.status().is_success(), "{created:?}");
    // Anyone may read the chunk store under the prefix (what a CDN or devices
    // reading the bucket directly need); writing takes the server's credentials.
    let policy = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": "*",
            "Action": "s3:GetObject",
            "Resource": format!("arn:aws:s3:::{BUCKET}/{PREFIX}/*"),
        }],
    });
    let set = http()
        .put(format!("{}/{BUCKET}?policy", moto.url))
        .body(policy.to_string())
        .send()
        .expect("bucket policy");
    assert!(set.status().is_success(), "{set:?}");

    let data = setup.path("data");
    let mut server = start(&setup, &moto, &[]);
    let token = host_token(&data, &Db::Sqlite, "admin");

    // A release signed by an unknown key is refused; nothing is listed in S3.
    let out = admin(
        &server,
        &token,
        &[
            "releases",
            "upload",
            setup.path("bad.shoal").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        moto.keys(&format!("{PREFIX}/manifests/")).is_empty(),
        "a refused release left a manifest"
    );

    // v1: its chunks and manifest go to the bucket, none to DIR/store.
    let v1 = upload(&server, &token, &setup.path("v1.shoal"));
    let release = admin_json(&server, &token, &["releases", "show", &v1]);
    let v1_chunks: BTreeSet<String> = moto.keys(&format!("{PREFIX}/chunks/"));
    assert_eq!(
        v1_chunks.len() as u64,
        release["chunks"].as_u64().unwrap(),
        "{release}"
    );
    assert_eq!(
        moto.keys(&format!("{PREFIX}/manifests/")),
        BTreeSet::from([format!("{PREFIX}/manifests/{v1}.envelope")])
    );
    assert!(
        !data.join("store").exists(),
        "the server wrote a local store with --chunks s3://"
    );

    // The device gets v1 through the server, which reads the chunks from S3.
    let dev = Dev::new(&setup, &server.url, "");
    let mut daemon = dev.start();
    let device = accept_device(&dev, &server, &token);
    let dep1 = deploy(&server, &token, "v1", &v1, &device);
    reboot_and_succeed(&dev, &mut daemon, &server, &token, &dep1);
    let v1_img = std::fs::read(setup.path("v1.img")).unwrap();
    assert_eq!(dev.slot_bytes(Slot::B, v1_img.len()), v1_img);
    assert!(
        server.log().contains("chunk batch served"),
        "{}",
        server.log()
    );

    // v2 adds only the chunks v1 lacks.
    let v2 = upload(&server, &token, &setup.path("v2.shoal"));
    let all = moto.keys(&format!("{PREFIX}/chunks/"));
    assert!(all.is_superset(&v1_chunks) && all.len() > v1_chunks.len());

    // Restarted with the bucket as the static base URL (moto serves objects at
    // ENDPOINT/BUCKET/KEY): the device gets v2 from S3, the server streams none.
    stop(&mut daemon);
    server.kill();
    let old_url = server.url.clone();
    server = start(
        &setup,
        &moto,
        &[
            "--chunk-base-url",
            &format!("{}/{BUCKET}/{PREFIX}", moto.url),
        ],
    );
    // The restarted server has another port: point the device at it.
    let conf = std::fs::read_to_string(dev.path("shoal.toml")).unwrap();
    std::fs::write(dev.path("shoal.toml"), conf.replace(&old_url, &server.url)).unwrap();
    daemon = Dev::start(&dev);
    let dep2 = deploy(&server, &token, "v2", &v2, &device);
    reboot_and_succeed(&dev, &mut daemon, &server, &token, &dep2);
    let v2_img = std::fs::read(setup.path("v2.img")).unwrap();
    assert_eq!(dev.slot_bytes(Slot::A, v2_img.len()), v2_img);
    assert!(
        !server.log().contains("chunk batch served"),
        "{}",
        server.log()
    );
    let static_bytes = installed_field(&dev.log(), "transferred_static");
    assert!(
        static_bytes.last().is_some_and(|&b| b > 0),
        "{static_bytes:?}\n{}",
        dev.log()
    );
    stop(&mut daemon);

    // Per-base encodings of v2 against v1 live in the bucket too.
    let encoded = admin_json(&server, &token, &["releases", "encode", &v2, "--base", &v1]);
    let deltas = moto.keys(&format!("{PREFIX}/deltas/"));
    assert!(
        deltas.contains(&format!("{PREFIX}/deltas/{v1}/index/{v2}")),
        "{deltas:?}"
    );
    assert_eq!(
        deltas.len() as u64,
        1 + encoded["chunks_delta"].as_u64().unwrap(),
        "{encoded}\n{deltas:?}"
    );

    // Deleting v1 (its deployment finished) removes its manifest, the chunks v2
    // does not list, and every per-base encoding against it.
    let out = admin(&server, &token, &["releases", "delete", &v1]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(moto.keys(&format!("{PREFIX}/deltas/")), BTreeSet::new());
    assert_eq!(
        admin_json(&server, &token, &["releases", "encodings", &v2]),
        serde_json::json!([])
    );
    assert_eq!(
        moto.keys(&format!("{PREFIX}/manifests/")),
        BTreeSet::from([format!("{PREFIX}/manifests/{v2}.envelope")])
    );
    let left = moto.keys(&format!("{PREFIX}/chunks/"));
    let v2_chunks = admin_json(&server, &token, &["releases", "show", &v2])["chunks"]
        .as_u64()
        .unwrap();
    assert_eq!(left.len() as u64, v2_chunks);
    assert!(left.len() < all.len());
}
