//! Per-base encodings queued without an operator, on two `shoal server`s sharing one
//! PostgreSQL (Debian's `postgresql`, as `server_api` uses it): a device reports
//! that it runs v1; v2 uploaded through one server and deployed through the other
//! wakes both servers' workers for the same (v2, v1) pair; exactly one encodes it
//! (its lease), once, and both list it done.

mod server_common;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use server_common::*;

#[test]
fn two_servers_on_one_postgres_encode_a_pair_once() {
    let setup = Setup::new();
    let db = postgres("shoal_test_encode_jobs");
    let data = setup.path("data");
    let auto = ["--auto-encode-bases", "1"];
    let (s1, s2) = std::thread::scope(|s| {
        let one = s.spawn(|| Server::start(&setup, &data, &db, &auto));
        let two = s.spawn(|| Server::start(&setup, &data, &db, &auto));
        (one.join().unwrap(), two.join().unwrap())
    });
    let http = http();
    let token = host_token(&data, &db, "admin");
    let upload = |s: &Server, file: &str| {
        admin_json(
            s,
            &token,
            &["releases", "upload", setup.path(file).to_str().unwrap()],
        )
    };
    let v1 = upload(&s1, "v1.shoal");
    let v1_id = v1["id"].as_str().unwrap().to_owned();

    // A device that runs v1 (its inventory says so).
    let mut d = Device::new(9);
    expect_error(d.auth(&http, &s1), 401);
    admin_json(&s2, &token, &["devices", "accept", &d.id]);
    d.login(&http, &s1);
    let r = d
        .req(&http, Method::PATCH, &s1, "/inventory/attributes")
        .json(&json!([
            {"name": "device_type", "value": "board"},
            {"name": "release_name", "value": v1["name"]},
            {"name": "release_version", "value": v1["version"]},
        ]))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);

    // v2 through s2 (queues v2 against v1 and wakes s2's worker), deployed at once
    // through s1 (the pair is queued already: nothing more; s1's worker looks too).
    let v2 = upload(&s2, "v2.shoal")["id"].as_str().unwrap().to_owned();
    admin_json(
        &s1,
        &token,
        &[
            "deployments",
            "create",
            "--name",
            "v2",
            "--release",
            &v2,
            "--device",
            &d.id,
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let row = loop {
        let rows = admin_json(&s1, &token, &["releases", "encodings", &v2]);
        let rows = rows.as_array().unwrap().clone();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["base"], v1_id.as_str(), "{rows:?}");
        assert_ne!(rows[0]["state"], "failed", "{rows:?}");
        if rows[0]["state"] == "done" {
            break rows[0].clone();
        }
        assert!(Instant::now() < deadline, "not encoded in 120 s: {rows:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(row["origin"], "auto", "{row}");
    assert_eq!(row["devices"], 1, "{row}");
    assert_eq!(row["attempts"], 1, "{row}");
    assert!(row["plain_bytes"].as_u64().unwrap() > 0, "{row}");
    // Both servers looked (s1 within its 5 s poll); one encoded.
    std::thread::sleep(Duration::from_secs(6));
    let started = |s: &Server| s.log().matches("per-base encoding started").count();
    assert_eq!(
        started(&s1) + started(&s2),
        1,
        "s1:\n{}\ns2:\n{}",
        s1.log(),
        s2.log()
    );
    assert_eq!(
        admin_json(&s2, &token, &["releases", "encodings", &v2])[0]["state"],
        "done"
    );
}
