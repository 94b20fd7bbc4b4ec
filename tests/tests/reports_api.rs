//! Signed status reports against a real `shoal server` (SQLite and PostgreSQL):
//! stored with the device's times, idempotent on (device, seq), any order, relayed
//! by another device, and every refusal with its own status and nothing stored.

mod server_common;

use reqwest::Method;
use serde_json::{Value, json};
use server_common::*;
use shoal_fleet::Status;
use shoal_fleet::report::{Origin, Release, Report, Signed};
use shoal_signing::SecretKey;

/// Device `dev`'s report `seq` at `at_ms`, signed by `key`.
fn signed(dev: &Device, key: &SecretKey, seq: u64, at_ms: u64, status: Status) -> Signed {
    let r = Report {
        device_id: dev.id.clone(),
        seq,
        at_ms: Some(at_ms),
        origin: Origin::Standalone,
        deployment: None,
        release: Some(Release {
            name: "acme-os".into(),
            version: format!("{seq}"),
        }),
        status,
        substate: Some(format!("report {seq}")),
    };
    Signed::seal(&r, |m| key.sign(m))
}

fn own(dev: &Device, seq: u64, at_ms: u64) -> Signed {
    signed(dev, &dev.key, seq, at_ms, Status::Success)
}

/// POSTs a delivery of `of`'s reports with `by`'s token.
fn deliver(
    http: &reqwest::blocking::Client,
    server: &Server,
    by: &Device,
    of: &str,
    reports: &[Signed],
) -> reqwest::blocking::Response {
    by.req(http, Method::POST, server, "/reports")
        .json(&json!({ "device_id": of, "reports": reports }))
        .send()
        .expect("deliver")
}

fn delivered(resp: reqwest::blocking::Response) -> (Vec<u64>, Vec<u64>) {
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().expect("json");
    let seqs = |k: &str| -> Vec<u64> {
        v[k].as_array()
            .expect("array")
            .iter()
            .map(|s| s.as_u64().expect("seq"))
            .collect()
    };
    (seqs("stored"), seqs("duplicates"))
}

fn listed(server: &Server, token: &str, dev: &Device) -> Vec<Value> {
    admin_json(server, token, &["devices", "reports", &dev.id])
        .as_array()
        .expect("array")
        .clone()
}

fn seqs(list: &[Value]) -> Vec<u64> {
    list.iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect()
}

fn suite(db: Db) {
    let setup = Setup::new();
    let data = setup.path("data");
    let server = Server::start(&setup, &data, &db, &[]);
    let http = http();
    let admin_token = host_token(&data, &db, "admin");
    let mut a = Device::new(1);
    let mut b = Device::new(2);
    let c = Device::new(3); // never seen by the server
    let mut d = Device::new(4); // stays pending
    for dev in [&mut a, &mut b, &mut d] {
        assert_eq!(dev.auth(&http, &server).status().as_u16(), 401, "pending");
    }
    for dev in [&a, &b] {
        admin_json(&server, &admin_token, &["devices", "accept", &dev.id]);
    }
    a.login(&http, &server);
    b.login(&http, &server);

    // Without a device token: 401.
    let resp = http
        .post(format!("{}/api/devices/v1/reports", server.url))
        .json(&json!({ "device_id": a.id, "reports": [own(&a, 1, 1)] }))
        .send()
        .unwrap();
    expect_error(resp, 401);

    // Two reports, long ago (an offline install): stored with the device's times.
    let t0 = 1_600_000_000_000u64;
    let (stored, dups) = delivered(deliver(
        &http,
        &server,
        &a,
        &a.id,
        &[own(&a, 1, t0), own(&a, 2, t0 + 1000)],
    ));
    assert_eq!((stored, dups), (vec![1, 2], vec![]));
    let list = listed(&server, &admin_token, &a);
    assert_eq!(seqs(&list), [1, 2]);
    assert_eq!(list[0]["at_ms"], t0);
    assert_eq!(list[1]["at_ms"], t0 + 1000);
    assert!(list[0]["received_ms"].as_u64().unwrap() > t0 + 1000);
    assert_eq!(list[0]["status"], "success");
    assert_eq!(list[0]["origin"], "standalone");
    assert_eq!(list[0]["release_version"], "1");
    assert_eq!(list[0]["relayed_by"], Value::Null);

    // Replayed: duplicates, stored once.
    let (stored, dups) = delivered(deliver(
        &http,
        &server,
        &a,
        &a.id,
        &[own(&a, 1, t0), own(&a, 2, t0 + 1000)],
    ));
    assert_eq!((stored, dups), (vec![], vec![1, 2]));
    assert_eq!(seqs(&listed(&server, &admin_token, &a)), [1, 2]);

    // Out of order (4 before 3, in separate deliveries): both stored, read by seq.
    assert_eq!(
        delivered(deliver(&http, &server, &a, &a.id, &[own(&a, 4, t0 + 4000)])).0,
        [4]
    );
    assert_eq!(
        delivered(deliver(&http, &server, &a, &a.id, &[own(&a, 3, t0 + 3000)])).0,
        [3]
    );
    let list = listed(&server, &admin_token, &a);
    assert_eq!(seqs(&list), [1, 2, 3, 4]);
    assert_eq!(list[2]["at_ms"], t0 + 3000);

    // Signed by another key: 422, and nothing of the delivery is stored (all or
    // nothing: the good report 5 beside it is not stored either).
    let forged = signed(&a, &b.key, 6, t0, Status::Failure);
    let e = expect_error(
        deliver(&http, &server, &a, &a.id, &[own(&a, 5, t0), forged]),
        422,
    );
    assert!(
        e.contains("report 1 (seq 6)") && e.contains("does not verify"),
        "{e}"
    );
    // Altered after signing: 422.
    let good = own(&a, 5, t0);
    let altered = Signed {
        report: good.report.replace("\"success\"", "\"failure\""),
        signature: good.signature.clone(),
    };
    expect_error(deliver(&http, &server, &a, &a.id, &[altered]), 422);
    assert_eq!(seqs(&listed(&server, &admin_token, &a)), [1, 2, 3, 4]);

    // The same seq with other content: 409, the stored one stays.
    let other = signed(&a, &a.key, 2, t0 + 999, Status::Failure);
    let e = expect_error(deliver(&http, &server, &a, &a.id, &[other]), 409);
    assert!(e.contains("seq 2"), "{e}");
    let list = listed(&server, &admin_token, &a);
    assert_eq!(list[1]["status"], "success");
    assert_eq!(list[1]["at_ms"], t0 + 1000);

    // Relayed: B delivers A's report 5 (signed by A): stored, naming the relay. B
    // cannot pass off its own key's report as A's.
    assert_eq!(
        delivered(deliver(&http, &server, &b, &a.id, &[good])).0,
        [5]
    );
    let list = listed(&server, &admin_token, &a);
    assert_eq!(seqs(&list), [1, 2, 3, 4, 5]);
    assert_eq!(list[4]["relayed_by"], b.id.as_str());
    let by_b = signed(&a, &b.key, 7, t0, Status::Success);
    expect_error(deliver(&http, &server, &b, &a.id, &[by_b]), 422);

    // An unknown device: 404. A pending one: 403.
    let e = expect_error(deliver(&http, &server, &a, &c.id, &[own(&c, 1, t0)]), 404);
    assert!(e.contains(&c.id), "{e}");
    let e = expect_error(deliver(&http, &server, &a, &d.id, &[own(&d, 1, t0)]), 403);
    assert!(e.contains("pending"), "{e}");
    // A report of another device than the delivery names: 400.
    let e = expect_error(deliver(&http, &server, &a, &a.id, &[own(&b, 1, t0)]), 400);
    assert!(e.contains(&format!("of device {}", b.id)), "{e}");

    // Malformed: empty, too many, unknown fields, a report that is not one, a bad
    // signature encoding, a status a device does not report.
    expect_error(deliver(&http, &server, &a, &a.id, &[]), 400);
    let many: Vec<Signed> = (100..201).map(|s| own(&a, s, t0)).collect();
    expect_error(deliver(&http, &server, &a, &a.id, &many), 400);
    let resp = a
        .req(&http, Method::POST, &server, "/reports")
        .json(&json!({ "device_id": a.id, "reports": [own(&a, 8, t0)], "x": 1 }))
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    assert!((400..500).contains(&status), "{status}");
    let bad = Signed {
        report: "{".into(),
        signature: "00".repeat(64),
    };
    let e = expect_error(deliver(&http, &server, &a, &a.id, &[bad]), 400);
    assert!(e.contains("malformed"), "{e}");
    let bad_sig = Signed {
        signature: "zz".into(),
        ..own(&a, 8, t0)
    };
    let e = expect_error(deliver(&http, &server, &a, &a.id, &[bad_sig]), 400);
    assert!(e.contains("signature is not 64 bytes"), "{e}");
    let text = own(&a, 8, t0).report.replace("\"success\"", "\"aborted\"");
    let aborted = Signed {
        signature: hex::encode(a.key.sign(&shoal_fleet::report::message(&text))),
        report: text,
    };
    let e = expect_error(deliver(&http, &server, &a, &a.id, &[aborted]), 400);
    assert!(e.contains("does not report the status aborted"), "{e}");
    let resp = deliver(
        &http,
        &server,
        &a,
        "A".repeat(64).as_str(),
        &[own(&a, 8, t0)],
    );
    expect_error(resp, 400);
    // None of that stored anything.
    assert_eq!(seqs(&listed(&server, &admin_token, &a)), [1, 2, 3, 4, 5]);

    // Listing: paging, an unknown device.
    let v = admin_json(
        &server,
        &admin_token,
        &["devices", "reports", &a.id, "--after", "3", "--limit", "1"],
    );
    assert_eq!(seqs(v.as_array().unwrap()), [4]);
    let out = admin(&server, &admin_token, &["devices", "reports", &c.id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
}

#[test]
fn reports_sqlite() {
    suite(Db::Sqlite);
}

#[test]
fn reports_postgres() {
    suite(postgres("shoal_test_reports"));
}
