//! `shoal server` and `shoal admin` end to end, as real processes on loopback: the
//! same suite on SQLite and on PostgreSQL, then two servers on one PostgreSQL.
//!
//! Covers the issue's bad-input list: unauthenticated → 401; pending or rejected
//! devices get no token; device A's token on device B's deployment → 403;
//! malformed, oversized and unknown-field bodies → 4xx with a JSON error and no
//! change; an artifact signed by an unknown key → upload refused.

mod server_common;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use server_common::*;
use shoal_artifact::chunk::{ChunkError, Dictionary, decode, decode_with};
use shoal_artifact::manifest::{ChunkRef, Manifest};
use shoal_signing::{Envelope, RoleName};
use shoal_tests::{fails, ok};

fn count(server: &Server, token: &str, what: &str) -> usize {
    admin_json(server, token, &[what, "list"])
        .as_array()
        .expect("list")
        .len()
}

/// Parses a chunk batch answer: (id, stored bytes) frames.
fn frames(mut body: &[u8]) -> Vec<([u8; 32], Vec<u8>)> {
    let mut out = Vec::new();
    while !body.is_empty() {
        assert!(body.len() >= 36, "truncated frame header");
        let id: [u8; 32] = body[..32].try_into().unwrap();
        let len = u32::from_be_bytes(body[32..36].try_into().unwrap()) as usize;
        out.push((id, body[36..36 + len].to_vec()));
        body = &body[36 + len..];
    }
    out
}

fn suite(db: Db) {
    let setup = Setup::new();
    let data = setup.path("data");
    let server = Server::start(&setup, &data, &db, &[]);
    let http = http();
    let admin_token = host_token(&data, &db, "admin");
    let operator = admin_json(
        &server,
        &admin_token,
        &["tokens", "create", "--name", "op", "--role", "operator"],
    )["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let viewer = admin_json(
        &server,
        &admin_token,
        &["tokens", "create", "--name", "v", "--role", "viewer"],
    )["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let m = |p: &str| format!("{}/api/management/v1{p}", server.url);

    // Every route of the served OpenAPI document is routed (not the JSON 404/405
    // fallback), and without credentials answers 401 unless it is public.
    let doc: Value = http
        .get(format!("{}/api/openapi.json", server.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let mut routes = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let concrete = path
                .replace("{id}", &"ab".repeat(16))
                .replace("{device_id}", &"ab".repeat(32))
                .replace("{zstd_id}", "abababab")
                .replace("{name}", "g");
            let resp = http
                .request(
                    method.to_uppercase().parse().unwrap(),
                    format!("{}{concrete}", server.url),
                )
                .send()
                .unwrap();
            let status = resp.status().as_u16();
            let public = op["security"].as_array().is_some_and(|s| s.is_empty());
            if public {
                assert_ne!(status, 404, "{method} {path}");
                assert_ne!(status, 405, "{method} {path}");
            } else {
                let msg = expect_error(resp, 401);
                assert!(!msg.is_empty(), "{method} {path}");
            }
            routes += 1;
        }
    }
    assert_eq!(routes, 47, "the document lists every route");

    // Unauthenticated: 401 with a JSON error, on both APIs.
    expect_error(http.get(m("/devices")).send().unwrap(), 401);
    expect_error(
        http.get(m("/devices"))
            .bearer_auth("st_nope")
            .send()
            .unwrap(),
        401,
    );
    expect_error(
        http.get(format!("{}/api/devices/v1/deployments/next", server.url))
            .send()
            .unwrap(),
        401,
    );
    // An API token is not a device token, and the other way round.
    expect_error(
        http.get(format!("{}/api/devices/v1/deployments/next", server.url))
            .bearer_auth(&admin_token)
            .send()
            .unwrap(),
        401,
    );
    let e = fails(admin(&server, "st_wrong", &["devices", "list"]), 2);
    assert!(e.contains("401"), "{e}");

    // Releases: the good one is accepted; one signed by an unknown key is refused
    // and nothing is listed; a truncated one too.
    let v1 = admin_json(
        &server,
        &operator,
        &[
            "releases",
            "upload",
            setup.path("v1.shoal").to_str().unwrap(),
        ],
    );
    let v1_id = v1["id"].as_str().unwrap().to_owned();
    assert_eq!(v1["name"], "acme-os");
    assert_eq!(v1["version"], "1");
    let e = fails(
        admin(
            &server,
            &operator,
            &[
                "releases",
                "upload",
                setup.path("bad.shoal").to_str().unwrap(),
            ],
        ),
        1,
    );
    assert!(e.contains("422") && e.contains("signature"), "{e}");
    let whole = std::fs::read(setup.path("v2.shoal")).unwrap();
    std::fs::write(setup.path("trunc.shoal"), &whole[..whole.len() / 2]).unwrap();
    let e = fails(
        admin(
            &server,
            &operator,
            &[
                "releases",
                "upload",
                setup.path("trunc.shoal").to_str().unwrap(),
            ],
        ),
        1,
    );
    assert!(e.contains("422") && e.contains("truncated"), "{e}");
    assert_eq!(count(&server, &viewer, "releases"), 1);
    // The same release again is fine and changes nothing.
    let again = admin_json(
        &server,
        &operator,
        &[
            "releases",
            "upload",
            setup.path("v1.shoal").to_str().unwrap(),
        ],
    );
    assert_eq!(again["id"], v1_id.as_str());
    // A viewer may not upload.
    let e = fails(
        admin(
            &server,
            &viewer,
            &[
                "releases",
                "upload",
                setup.path("v2.shoal").to_str().unwrap(),
            ],
        ),
        2,
    );
    assert!(e.contains("403") && e.contains("operator"), "{e}");
    let v2 = admin_json(
        &server,
        &operator,
        &[
            "releases",
            "upload",
            setup.path("v2.shoal").to_str().unwrap(),
        ],
    );
    let v2_id = v2["id"].as_str().unwrap().to_owned();

    // Devices authenticate: unknown → pending, no token.
    let mut a = Device::new(1);
    let mut b = Device::new(2);
    let mut c = Device::new(3);
    for d in [&mut a, &mut b] {
        let msg = expect_error(d.auth(&http, &server), 401);
        assert!(msg.contains("pending"), "{msg}");
    }
    let pending = admin_json(
        &server,
        &viewer,
        &["devices", "list", "--status", "pending"],
    );
    assert_eq!(pending.as_array().unwrap().len(), 2);
    assert_eq!(pending[0]["identity"]["mac"].as_str().unwrap().len(), 17);

    // Bad auth requests: each refused with its reason, no device added.
    let (body, sig) = a.auth_body(&http, &server);
    let mut tampered = body.clone();
    let n = tampered.len();
    tampered[n - 3] ^= 1;
    let msg = expect_error(a.send_auth(&http, &server, &tampered, &sig), 401);
    assert!(msg.contains("signature") || msg.contains("nonce"), "{msg}");
    // Signed by another key than the one in the body.
    let other_sig = hex::encode(b.key.sign(&body));
    assert!(
        expect_error(a.send_auth(&http, &server, &body, &other_sig), 401).contains("signature")
    );
    assert!(
        expect_error(a.send_auth(&http, &server, &body, "zz"), 400).contains("x-shoal-signature")
    );
    assert!(
        expect_error(a.send_auth(&http, &server, b"{not json", &sig), 400).contains("auth request")
    );
    let mut v: Value = serde_json::from_slice(&body).unwrap();
    v["extra"] = json!(1);
    let unknown = serde_json::to_vec(&v).unwrap();
    let unknown_sig = hex::encode(a.key.sign(&unknown));
    assert!(
        expect_error(a.send_auth(&http, &server, &unknown, &unknown_sig), 400)
            .contains("unknown field")
    );
    let big = vec![b' '; 70 * 1024];
    expect_error(a.send_auth(&http_oversized(), &server, &big, &sig), 413);
    let mut x = Device::new(9);
    let (xbody, _) = x.auth_body(&http, &server);
    let mut xv: Value = serde_json::from_slice(&xbody).unwrap();
    xv["public_key"] = json!("abcd");
    let xb = serde_json::to_vec(&xv).unwrap();
    assert!(
        expect_error(
            x.send_auth(&http, &server, &xb, &hex::encode(x.key.sign(&xb))),
            400
        )
        .contains("public_key")
    );
    // A replayed request (its nonce used) is refused.
    assert_eq!(
        a.send_auth(&http, &server, &body, &sig).status().as_u16(),
        401
    );
    let msg = expect_error(a.send_auth(&http, &server, &body, &sig), 401);
    assert!(msg.contains("nonce"), "{msg}");
    assert_eq!(
        count(&server, &viewer, "devices"),
        2,
        "bad requests added no device"
    );
    x.token = None;

    // Accept A, reject B, preauthorize C's key.
    let e = fails(admin(&server, &viewer, &["devices", "accept", &a.id]), 2);
    assert!(e.contains("403"), "{e}");
    admin_json(&server, &operator, &["devices", "accept", &a.id]);
    admin_json(&server, &operator, &["devices", "reject", &b.id]);
    std::fs::write(setup.path("c.pub"), c.key.public().to_spki_pem()).unwrap();
    admin_json(
        &server,
        &operator,
        &[
            "devices",
            "preauthorize",
            "--public-key-file",
            setup.path("c.pub").to_str().unwrap(),
            "--identity",
            "serial=c",
        ],
    );
    let e = fails(admin(&server, &operator, &["devices", "accept", "00"]), 1);
    assert!(e.contains("404"), "{e}");
    a.login(&http, &server);
    assert!(expect_error(b.auth(&http, &server), 401).contains("rejected"));
    c.login(&http, &server);
    assert_eq!(
        admin_json(&server, &viewer, &["devices", "show", &c.id])["status"],
        "accepted"
    );

    // LAN peers behind one public address: each accepted device that said where
    // it listens is handed to the others behind the same source IP (127.0.0.1).
    let lan = |d: &Device, body: Value| {
        d.req(&http, Method::POST, &server, "/lan/peers")
            .json(&body)
            .send()
            .unwrap()
    };
    let r = lan(&a, json!({"addrs": ["/ip4/127.0.0.1/tcp/4001"]}));
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().unwrap();
    assert_eq!(v, json!({"source_ip": "127.0.0.1", "peers": []}));
    let r = lan(&c, json!({"addrs": ["/ip4/127.0.0.1/tcp/4003"]}));
    let v: Value = r.json().unwrap();
    assert_eq!(
        v["peers"],
        json!([{"public_key": hex::encode(a.key.public().to_bytes()), "addrs": ["/ip4/127.0.0.1/tcp/4001"]}])
    );
    let v: Value = lan(&a, json!({"addrs": []})).json().unwrap();
    assert_eq!(
        v["peers"],
        json!([{"public_key": hex::encode(c.key.public().to_bytes()), "addrs": ["/ip4/127.0.0.1/tcp/4003"]}])
    );
    // Malformed announcements are refused and change nothing.
    assert!(
        expect_error(
            lan(&c, json!({"addrs": ["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWx"]})),
            400
        )
        .contains("has a /p2p part")
    );
    expect_error(lan(&c, json!({"addrs": "/ip4/1.2.3.4"})), 422);
    let v: Value = lan(&a, json!({"addrs": []})).json().unwrap();
    assert_eq!(v["peers"][0]["addrs"], json!(["/ip4/127.0.0.1/tcp/4003"]));

    // Inventory: malformed bodies change nothing.
    let inv = |d: &Device, m: Method, body: Value| {
        d.req(&http, m, &server, "/inventory/attributes")
            .json(&body)
            .send()
            .unwrap()
    };
    assert_eq!(inv(&a, Method::PUT, json!([{"name": "device_type", "value": "board"}, {"name": "release_name", "value": "acme-os"}, {"name": "release_version", "value": "1"}, {"name": "site", "value": "berlin"}])).status().as_u16(), 204);
    assert_eq!(
        inv(
            &c,
            Method::PATCH,
            json!([{"name": "device_type", "value": "board"}, {"name": "site", "value": "paris"}])
        )
        .status()
        .as_u16(),
        204
    );
    expect_error(
        inv(
            &a,
            Method::PATCH,
            json!([{"name": "x", "value": "y", "extra": 1}]),
        ),
        422,
    );
    expect_error(
        inv(
            &a,
            Method::PATCH,
            json!([{"name": "bad name", "value": "y"}]),
        ),
        400,
    );
    expect_error(inv(&a, Method::PATCH, json!({"name": "x"})), 422);
    let many: Vec<Value> = (0..300)
        .map(|i| json!({"name": format!("a{i}"), "value": "v"}))
        .collect();
    expect_error(inv(&a, Method::PATCH, json!(many)), 400);
    // Oversized bodies: the server answers before reading them all and closes the
    // connection, so they go on a client of their own.
    let huge = "x".repeat(2 << 20);
    expect_error(
        a.req(
            &http_oversized(),
            Method::PATCH,
            &server,
            "/inventory/attributes",
        )
        .json(&json!([{"name": "x", "value": huge}]))
        .send()
        .unwrap(),
        413,
    );
    let shown = admin_json(&server, &viewer, &["devices", "show", &a.id]);
    assert_eq!(shown["inventory"].as_object().unwrap().len(), 4, "{shown}");
    let berlin = admin_json(
        &server,
        &viewer,
        &["devices", "list", "--where", "site=berlin"],
    );
    assert_eq!(berlin.as_array().unwrap().len(), 1);
    assert_eq!(berlin[0]["id"], a.id.as_str());
    let e = fails(
        admin(
            &server,
            &viewer,
            &["devices", "list", "--where", "nonsense"],
        ),
        2,
    );
    assert!(e.contains("400") && e.contains("\"nonsense\""), "{e}");

    // Delta preview: A is on v1, so v2 costs it only the changed chunks.
    let delta = admin_json(&server, &viewer, &["releases", "delta", &v2_id]);
    let rows = delta.as_array().unwrap();
    let on_v1 = rows
        .iter()
        .find(|r| r["installed_version"] == "1")
        .expect("v1 row");
    let unknown = rows
        .iter()
        .find(|r| r["installed_version"].is_null())
        .expect("no-release row");
    assert_eq!(on_v1["known"], true);
    assert!(on_v1["bytes"].as_u64().unwrap() > 0);
    assert!(
        on_v1["bytes"].as_u64().unwrap() < v2["stored_bytes"].as_u64().unwrap() / 2,
        "{delta}"
    );
    assert_eq!(unknown["bytes"], v2["stored_bytes"]);

    // A deployment to A only.
    let dep = admin_json(
        &server,
        &operator,
        &[
            "deployments",
            "create",
            "--name",
            "one",
            "--release",
            &v2_id,
            "--device",
            &a.id,
        ],
    );
    let dep_id = dep["id"].as_str().unwrap().to_owned();
    assert_eq!(dep["stats"]["pending"], 1);
    let next = a
        .req(&http, Method::GET, &server, "/deployments/next")
        .send()
        .unwrap();
    assert_eq!(next.status().as_u16(), 200);
    let next: Value = next.json().unwrap();
    assert_eq!(next["id"], dep_id.as_str());
    assert_eq!(next["release"]["version"], "2");
    assert_eq!(
        c.req(&http, Method::GET, &server, "/deployments/next")
            .send()
            .unwrap()
            .status()
            .as_u16(),
        204
    );

    // The manifest verifies against the device's root; chunks come in batches and
    // each decodes to its id.
    let env = a
        .req(
            &http,
            Method::GET,
            &server,
            &format!("/deployments/{dep_id}/manifest"),
        )
        .send()
        .unwrap();
    assert_eq!(env.status().as_u16(), 200);
    let env = Envelope::from_bytes(&env.bytes().unwrap()).unwrap();
    let root = setup.root();
    let manifest =
        Manifest::from_cbor(root.verify(RoleName::Release, &env, None).unwrap()).unwrap();
    let chunks: Vec<ChunkRef> = manifest.distinct_chunks();
    let batch: Vec<String> = chunks.iter().take(20).map(|c| c.id.to_hex()).collect();
    let resp = a
        .req(
            &http,
            Method::POST,
            &server,
            &format!("/deployments/{dep_id}/chunks"),
        )
        .json(&json!({"ids": batch}))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/vnd.shoal.chunks"
    );
    let got = frames(&resp.bytes().unwrap());
    assert_eq!(got.len(), 20);
    for ((id, stored), want) in got.iter().zip(&chunks) {
        assert_eq!(id, want.id.as_bytes());
        let plain = match decode(stored, want) {
            Err(ChunkError::NeedsDictionary { zstd_id, .. }) => {
                // Compressed with a dictionary: the device fetches it once.
                let resp = a
                    .req(
                        &http,
                        Method::GET,
                        &server,
                        &format!("/dictionaries/{zstd_id:08x}"),
                    )
                    .send()
                    .unwrap();
                assert_eq!(resp.status().as_u16(), 200);
                let dict = Dictionary::from_bytes(resp.bytes().unwrap().to_vec()).unwrap();
                decode_with(stored, want, Some(&dict))
            }
            other => other,
        };
        plain.expect("chunk decodes and hashes to its id");
    }
    expect_error(
        a.req(&http, Method::GET, &server, "/dictionaries/00000001")
            .send()
            .unwrap(),
        404,
    );
    // Bad batches: unknown field, id not in the release, twice, malformed, empty.
    let post = |d: &Device, body: Value| {
        d.req(
            &http,
            Method::POST,
            &server,
            &format!("/deployments/{dep_id}/chunks"),
        )
        .json(&body)
        .send()
        .unwrap()
    };
    expect_error(
        post(&a, json!({"ids": [chunks[0].id.to_hex()], "more": 1})),
        422,
    );
    assert!(
        expect_error(post(&a, json!({"ids": ["00".repeat(32)]})), 400)
            .contains("not in this deployment's release")
    );
    assert!(
        expect_error(
            post(
                &a,
                json!({"ids": [chunks[0].id.to_hex(), chunks[0].id.to_hex()]})
            ),
            400
        )
        .contains("twice")
    );
    assert!(expect_error(post(&a, json!({"ids": ["xyz"]})), 400).contains("64 hex"));
    expect_error(post(&a, json!({"ids": []})), 400);
    // Per-base encodings: a malformed base is refused; a base the release has no
    // encodings against gets version 1, byte for byte what a request without one gets.
    assert!(
        expect_error(
            post(&a, json!({"ids": [chunks[0].id.to_hex()], "base": "xyz"})),
            400
        )
        .contains("base")
    );
    let plain = post(&a, json!({"ids": [chunks[0].id.to_hex()]}));
    let named = post(
        &a,
        json!({"ids": [chunks[0].id.to_hex()], "base": "ab".repeat(32)}),
    );
    assert_eq!(named.status().as_u16(), 200);
    assert_eq!(
        named.headers()["content-type"],
        "application/vnd.shoal.chunks"
    );
    assert_eq!(named.bytes().unwrap(), plain.bytes().unwrap());
    let too_many: Vec<String> = (0..5000).map(|_| chunks[0].id.to_hex()).collect();
    expect_error(post(&a, json!({"ids": too_many})), 400);

    // Device C's token on A's deployment: 403, for every device endpoint of it.
    expect_error(post(&c, json!({"ids": [chunks[0].id.to_hex()]})), 403);
    expect_error(
        c.req(
            &http,
            Method::GET,
            &server,
            &format!("/deployments/{dep_id}/manifest"),
        )
        .send()
        .unwrap(),
        403,
    );
    expect_error(
        c.req(
            &http,
            Method::PUT,
            &server,
            &format!("/deployments/{dep_id}/status"),
        )
        .json(&json!({"status": "success"}))
        .send()
        .unwrap(),
        403,
    );
    expect_error(
        c.req(
            &http,
            Method::PUT,
            &server,
            &format!("/deployments/{dep_id}/log"),
        )
        .json(&json!({"messages": []}))
        .send()
        .unwrap(),
        403,
    );
    expect_error(
        a.req(
            &http,
            Method::GET,
            &server,
            &format!("/deployments/{}/manifest", "ab".repeat(16)),
        )
        .send()
        .unwrap(),
        404,
    );

    // Status: Mender's states; bad ones refused without change.
    let status = |d: &Device, body: Value| {
        d.req(
            &http,
            Method::PUT,
            &server,
            &format!("/deployments/{dep_id}/status"),
        )
        .json(&body)
        .send()
        .unwrap()
    };
    assert_eq!(
        status(&a, json!({"status": "downloading"}))
            .status()
            .as_u16(),
        204
    );
    assert!(expect_error(status(&a, json!({"status": "done"})), 400).contains("unknown status"));
    expect_error(status(&a, json!({"status": "installing", "x": 1})), 422);
    let log = a
        .req(
            &http,
            Method::PUT,
            &server,
            &format!("/deployments/{dep_id}/log"),
        )
        .json(&json!({"messages": [{"timestamp_ms": 1, "level": "info", "message": "fetching"}]}))
        .send()
        .unwrap();
    assert_eq!(log.status().as_u16(), 204);
    let states = admin_json(&server, &viewer, &["deployments", "devices", &dep_id]);
    assert_eq!(states[0]["status"], "downloading");
    let lines = admin_json(&server, &viewer, &["deployments", "log", &dep_id, &a.id]);
    assert_eq!(lines[0]["message"], "fetching");

    // Abort: the device's next status and chunk request get 409.
    admin_json(&server, &operator, &["deployments", "abort", &dep_id]);
    assert!(expect_error(status(&a, json!({"status": "installing"})), 409).contains("aborted"));
    expect_error(post(&a, json!({"ids": [chunks[0].id.to_hex()]})), 409);
    assert_eq!(
        a.req(&http, Method::GET, &server, "/deployments/next")
            .send()
            .unwrap()
            .status()
            .as_u16(),
        204
    );
    let e = fails(
        admin(&server, &operator, &["deployments", "abort", &dep_id]),
        1,
    );
    assert!(e.contains("409"), "{e}");

    // A dynamic group, a deployment to it, a failure and a retry.
    admin_json(
        &server,
        &operator,
        &["groups", "set", "boards", "--where", "device_type=board"],
    );
    let members = admin_json(&server, &viewer, &["groups", "devices", "boards"]);
    assert_eq!(members.as_array().unwrap().len(), 2);
    let dep2 = admin_json(
        &server,
        &operator,
        &[
            "deployments",
            "create",
            "--name",
            "two",
            "--release",
            &v2_id,
            "--group",
            "boards",
        ],
    );
    let dep2_id = dep2["id"].as_str().unwrap().to_owned();
    assert_eq!(dep2["stats"]["pending"], 2);
    // Frozen at creation (hawkBit's rollouts; a phase's percentage and the halt
    // threshold need a fixed set): a device that joins the group later is not
    // added to the deployment, and one that leaves it stays in.
    let mut late = Device::new(4);
    expect_error(late.auth(&http, &server), 401);
    admin_json(&server, &operator, &["devices", "accept", &late.id]);
    late.login(&http, &server);
    assert_eq!(
        inv(
            &late,
            Method::PUT,
            json!([{"name": "device_type", "value": "board"}])
        )
        .status()
        .as_u16(),
        204
    );
    let members = admin_json(&server, &viewer, &["groups", "devices", "boards"]);
    assert_eq!(members.as_array().unwrap().len(), 3, "{members}");
    let in_dep2 = admin_json(&server, &viewer, &["deployments", "devices", &dep2_id]);
    assert_eq!(in_dep2.as_array().unwrap().len(), 2, "{in_dep2}");
    assert!(!in_dep2.to_string().contains(&late.id), "{in_dep2}");
    assert_eq!(
        late.req(&http, Method::GET, &server, "/deployments/next")
            .send()
            .unwrap()
            .status()
            .as_u16(),
        204,
        "a device that joined the group after the deployment was made got it"
    );
    admin_json(&server, &operator, &["devices", "decommission", &late.id]);
    let st = |d: &Device, s: &str| {
        d.req(
            &http,
            Method::PUT,
            &server,
            &format!("/deployments/{dep2_id}/status"),
        )
        .json(&json!({"status": s}))
        .send()
        .unwrap()
        .status()
        .as_u16()
    };
    assert_eq!(st(&a, "failure"), 204);
    assert_eq!(st(&c, "success"), 204);
    assert_eq!(
        st(&c, "success"),
        204,
        "the same final report again is fine"
    );
    assert_eq!(
        st(&c, "failure"),
        409,
        "a finished device cannot change its result"
    );
    assert_eq!(
        admin_json(&server, &viewer, &["deployments", "show", &dep2_id])["status"],
        "finished"
    );
    let retried = admin_json(&server, &operator, &["deployments", "retry", &dep2_id]);
    assert_eq!(retried["status"], "running");
    assert_eq!(retried["stats"]["pending"], 1);
    let e = fails(
        admin(&server, &operator, &["deployments", "resume", &dep2_id]),
        1,
    );
    assert!(e.contains("409"), "{e}");
    admin_json(&server, &operator, &["deployments", "pause", &dep2_id]);
    assert_eq!(
        a.req(&http, Method::GET, &server, "/deployments/next")
            .send()
            .unwrap()
            .status()
            .as_u16(),
        204
    );
    admin_json(&server, &operator, &["deployments", "resume", &dep2_id]);
    assert_eq!(
        a.req(&http, Method::GET, &server, "/deployments/next")
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200
    );

    // A release in use cannot be deleted; unused ones can, and their own chunks go.
    let e = fails(
        admin(&server, &operator, &["releases", "delete", &v2_id]),
        1,
    );
    assert!(e.contains("409") && e.contains(&dep2_id), "{e}");
    ok_delete(&server, &operator, &v1_id);
    assert_eq!(count(&server, &viewer, "releases"), 1);

    // Management bodies: unknown fields and malformed JSON are refused, no change.
    let post_m = |path: &str, body: &str| {
        http.post(m(path))
            .bearer_auth(&operator)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .unwrap()
    };
    expect_error(
        post_m(
            "/deployments",
            r#"{"name":"x","release":"00","devices":["a"],"bogus":1}"#,
        ),
        422,
    );
    expect_error(post_m("/deployments", r#"{"name":"#), 400);
    expect_error(
        post_m(
            "/deployments",
            &format!(r#"{{"name":"x","release":"{v2_id}","group":"boards","filter":["a=b"]}}"#),
        ),
        400,
    );
    expect_error(
        http.post(m("/deployments"))
            .bearer_auth(&operator)
            .body("{}")
            .send()
            .unwrap(),
        415,
    );
    let big = format!(r#"{{"name":"{}","release":"x"}}"#, "n".repeat(2 << 20));
    expect_error(
        http_oversized()
            .post(m("/deployments"))
            .bearer_auth(&operator)
            .header("content-type", "application/json")
            .body(big)
            .send()
            .unwrap(),
        413,
    );
    expect_error(
        http.put(m("/groups/bad%20name"))
            .bearer_auth(&operator)
            .json(&json!({"devices": []}))
            .send()
            .unwrap(),
        400,
    );
    assert_eq!(count(&server, &viewer, "deployments"), 2);

    // Decommission C: its token stops working; its key comes back as pending.
    let old_token = c.token.clone();
    ok(admin(
        &server,
        &operator,
        &["devices", "decommission", &c.id],
    ));
    expect_error(
        c.req(&http, Method::GET, &server, "/deployments/next")
            .send()
            .unwrap(),
        401,
    );
    assert!(expect_error(c.auth(&http, &server), 401).contains("pending"));
    // Accepted again, it gets a token that works; the one it held before the
    // decommission stays refused (its epoch outlived the device row).
    admin_json(&server, &operator, &["devices", "accept", &c.id]);
    c.login(&http, &server);
    let poll = |d: &Device| {
        d.req(&http, Method::GET, &server, "/deployments/next")
            .send()
            .unwrap()
    };
    assert_eq!(poll(&c).status().as_u16(), 204);
    let new_token = std::mem::replace(&mut c.token, old_token);
    expect_error(poll(&c), 401);
    // A token altered to name another device does not verify.
    let forged = new_token.as_ref().unwrap().replace(&c.id, &a.id);
    c.token = Some(forged);
    assert!(expect_error(poll(&c), 401).contains("does not verify"));
    c.token = new_token;
    assert_eq!(poll(&c).status().as_u16(), 204);

    // Every change is in the audit log; only admins read it.
    let e = fails(admin(&server, &operator, &["audit"]), 2);
    assert!(e.contains("403"), "{e}");
    let audit = admin_json(&server, &admin_token, &["audit", "--limit", "1000"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for want in [
        "token.create",
        "release.upload",
        "release.delete",
        "device.pending",
        "device.accept",
        "device.reject",
        "device.preauthorize",
        "device.decommission",
        "group.put",
        "deployment.create",
        "deployment.abort",
        "deployment.retry",
        "deployment.pause",
        "deployment.resume",
    ] {
        assert!(
            actions.contains(&want),
            "audit log lacks {want}: {actions:?}"
        );
    }

    // Revoked tokens stop working at once.
    let tokens = admin_json(&server, &admin_token, &["tokens", "list"]);
    let vid = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "v")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(admin(&server, &admin_token, &["tokens", "revoke", &vid]));
    let e = fails(admin(&server, &viewer, &["devices", "list"]), 2);
    assert!(e.contains("401"), "{e}");
}

/// A client for one oversized request (its connection is closed after it).
fn http_oversized() -> reqwest::blocking::Client {
    http()
}

fn ok_delete(server: &Server, token: &str, id: &str) {
    let out = admin(server, token, &["releases", "delete", id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn server_suite_sqlite() {
    suite(Db::Sqlite);
}

#[test]
fn server_suite_postgres() {
    suite(postgres("shoal_test_suite"));
}

/// Two server processes on one PostgreSQL database (and one shared data
/// directory for chunks): started at once (the migrations race), and any of them
/// serves any device and operator.
#[test]
fn two_servers_one_postgres() {
    let setup = Setup::new();
    let db = postgres("shoal_test_two");
    let data = setup.path("data");
    let (s1, s2) = std::thread::scope(|s| {
        let one = s.spawn(|| Server::start(&setup, &data, &db, &[]));
        let two = s.spawn(|| Server::start(&setup, &data, &db, &[]));
        (one.join().unwrap(), two.join().unwrap())
    });
    assert_ne!(s1.url, s2.url);
    let http = http();
    let admin_token = host_token(&data, &db, "admin");
    // A release uploaded through one is listed by the other.
    let rel = admin_json(
        &s1,
        &admin_token,
        &[
            "releases",
            "upload",
            setup.path("v1.shoal").to_str().unwrap(),
        ],
    );
    let rel_id = rel["id"].as_str().unwrap();
    assert_eq!(
        admin_json(&s2, &admin_token, &["releases", "list"])[0]["id"],
        rel_id
    );
    // A device pending on one, accepted through the other, logs in on the first and
    // uses its token on the second.
    let mut d = Device::new(7);
    expect_error(d.auth(&http, &s1), 401);
    admin_json(&s2, &admin_token, &["devices", "accept", &d.id]);
    d.login(&http, &s1);
    let r = d
        .req(&http, Method::PATCH, &s2, "/inventory/attributes")
        .json(&json!([{"name": "device_type", "value": "board"}]))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    // The second answers its polls from its view of the fleet: 204 with no
    // database round trip.
    let poll = |d: &Device, s: &Server| {
        d.req(&http, Method::GET, s, "/deployments/next")
            .send()
            .unwrap()
    };
    assert_eq!(poll(&d, &s2).status().as_u16(), 204);
    let dep = admin_json(
        &s1,
        &admin_token,
        &[
            "deployments",
            "create",
            "--name",
            "x",
            "--release",
            rel_id,
            "--device",
            &d.id,
        ],
    );
    // A deployment created on the first is seen by the device polling the second
    // within the view's staleness bound.
    let next = within_bound("the deployment made on s1 reaches s2", || {
        let r = poll(&d, &s2);
        (r.status().as_u16() == 200).then(|| r.json::<serde_json::Value>().unwrap())
    });
    assert_eq!(next["id"], dep["id"]);
    let dep_id = next["id"].as_str().unwrap();
    let manifest = d
        .req(
            &http,
            Method::GET,
            &s2,
            &format!("/deployments/{dep_id}/manifest"),
        )
        .send()
        .unwrap();
    assert_eq!(manifest.status().as_u16(), 200);
    let r = d
        .req(
            &http,
            Method::PUT,
            &s1,
            &format!("/deployments/{dep_id}/status"),
        )
        .json(&json!({"status": "downloading"}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    // Aborted through one: the device's report to the other gets 409.
    admin_json(&s2, &admin_token, &["deployments", "abort", dep_id]);
    let r = d
        .req(
            &http,
            Method::PUT,
            &s1,
            &format!("/deployments/{dep_id}/status"),
        )
        .json(&json!({"status": "installing"}))
        .send()
        .unwrap();
    expect_error(r, 409);
    // And its polls on the first stop offering it at once: the device is in the
    // first's view as one with a deployment, so the first asks the database.
    assert_eq!(poll(&d, &s1).status().as_u16(), 204);

    // A device decommissioned through the first is refused by the second: at once
    // by the endpoints that read the database, by polls within the bound.
    let mut e = Device::new(8);
    expect_error(e.auth(&http, &s2), 401);
    admin_json(&s1, &admin_token, &["devices", "accept", &e.id]);
    e.login(&http, &s2);
    assert_eq!(poll(&e, &s2).status().as_u16(), 204);
    ok(admin(
        &s1,
        &admin_token,
        &["devices", "decommission", &e.id],
    ));
    let r = e
        .req(&http, Method::PATCH, &s2, "/inventory/attributes")
        .json(&json!([{"name": "x", "value": "y"}]))
        .send()
        .unwrap();
    expect_error(r, 401);
    within_bound("the decommission on s1 reaches s2's polls", || {
        (poll(&e, &s2).status().as_u16() == 401).then_some(())
    });
    // The same for a rejection.
    let mut f = Device::new(9);
    expect_error(f.auth(&http, &s1), 401);
    admin_json(&s2, &admin_token, &["devices", "accept", &f.id]);
    f.login(&http, &s1);
    assert_eq!(poll(&f, &s1).status().as_u16(), 204);
    admin_json(&s2, &admin_token, &["devices", "reject", &f.id]);
    within_bound("the rejection on s2 reaches s1's polls", || {
        (poll(&f, &s1).status().as_u16() == 401).then_some(())
    });
}

/// The server's view of the fleet (`node/server/src/view.rs`) may lag the
/// database by at most this much.
const VIEW_STALE_MAX: Duration = Duration::from_secs(2);

/// Runs `probe` until it gives a value, failing if that takes longer than the
/// view's staleness bound (plus 1 s for requests on a loaded machine).
fn within_bound<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = probe() {
            eprintln!("{what}: {:?}", start.elapsed());
            return v;
        }
        assert!(
            start.elapsed() <= VIEW_STALE_MAX + Duration::from_secs(1),
            "{what}: not within {VIEW_STALE_MAX:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs schemathesis (PyPI) against the served OpenAPI document, with a bounded
/// number of examples and a fixed seed: once with an admin token over the
/// management API, once with a device token over the device API. Checks: no 5xx,
/// documented status codes, content types and headers, responses that match their
/// schemas, and invalid data rejected.
#[test]
fn schemathesis_against_openapi() {
    let st = std::process::Command::new("st").arg("--version").output();
    assert!(
        st.is_ok_and(|o| o.status.success()),
        "schemathesis is not installed: pip install schemathesis (PyPI), as .ci/run does"
    );
    let setup = Setup::new();
    let data = setup.path("data");
    let db = Db::Sqlite;
    let server = Server::start(&setup, &data, &db, &[]);
    let http = http();
    let admin_token = host_token(&data, &db, "admin");
    admin_json(
        &server,
        &admin_token,
        &[
            "releases",
            "upload",
            setup.path("v1.shoal").to_str().unwrap(),
        ],
    );
    let rel = admin_json(
        &server,
        &admin_token,
        &[
            "releases",
            "upload",
            setup.path("v2.shoal").to_str().unwrap(),
        ],
    );
    let mut d = Device::new(5);
    expect_error(d.auth(&http, &server), 401);
    admin_json(&server, &admin_token, &["devices", "accept", &d.id]);
    d.login(&http, &server);
    let r = d
        .req(&http, Method::PUT, &server, "/inventory/attributes")
        .json(&json!([{"name": "device_type", "value": "board"}]))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    admin_json(
        &server,
        &admin_token,
        &[
            "deployments",
            "create",
            "--name",
            "st",
            "--release",
            rel["id"].as_str().unwrap(),
            "--device",
            &d.id,
        ],
    );
    let run = |token: &str, include: &str, exclude: Option<&str>| {
        let mut cmd = std::process::Command::new("st");
        cmd.arg("run")
            .arg(format!("{}/api/openapi.json", server.url))
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["--max-examples", "15", "--seed", "1", "--no-color"])
            .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance,negative_data_rejection"])
            .args(["--include-path-regex", include])
            .current_dir(setup.dir.path());
        if let Some(x) = exclude {
            cmd.args(["--exclude-path-regex", x]);
        }
        let out = cmd.output().expect("run schemathesis");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis found failures on {include}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("passed"), "{text}");
    };
    // The device API first: the management run may decommission the device.
    run(
        d.token.as_deref().unwrap(),
        "^/api/devices/",
        Some("^/api/devices/v1/authentication/"),
    );
    run(
        &admin_token,
        "^/api/(management|openapi)",
        Some("^/api/management/v1/tokens/"),
    );
    // Auth endpoints without credentials (revoking tokens is left out above: the run
    // would revoke its own).
    run("none", "^/api/devices/v1/authentication/", None);
}

/// A phased rollout driven by `shoal_fleet` through the server: the second phase
/// opens after the first phase's success, a failure past the limit halts the
/// rollout with its reason, resume and abort; then a phase that opens by itself
/// after its soak delay (the server's timer).
fn phased(db: Db) {
    let setup = Setup::new();
    let data = setup.path("data");
    let server = Server::start(&setup, &data, &db, &["--timer-period-ms", "100"]);
    let http = http();
    let token = host_token(&data, &db, "admin");
    let rel = admin_json(
        &server,
        &token,
        &[
            "releases",
            "upload",
            setup.path("v1.shoal").to_str().unwrap(),
        ],
    );
    let rel_id = rel["id"].as_str().unwrap().to_owned();
    let mut devs: Vec<Device> = (20..23).map(Device::new).collect();
    for d in &mut devs {
        expect_error(d.auth(&http, &server), 401);
        admin_json(&server, &token, &["devices", "accept", &d.id]);
        d.login(&http, &server);
        let r = d
            .req(&http, Method::PUT, &server, "/inventory/attributes")
            .json(&json!([{"name": "device_type", "value": "board"}, {"name": "fleet", "value": "p"}]))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 204);
    }
    let by_id = |id: &str| devs.iter().find(|d| d.id == id).expect("device");
    let next = |d: &Device| {
        d.req(&http, Method::GET, &server, "/deployments/next")
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    let report = |d: &Device, dep: &str, s: &str| {
        d.req(
            &http,
            Method::PUT,
            &server,
            &format!("/deployments/{dep}/status"),
        )
        .json(&json!({"status": s}))
        .send()
        .unwrap()
    };
    let phase_of = |dep: &str| -> Vec<(String, i64)> {
        admin_json(&server, &token, &["deployments", "devices", dep])
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["device_id"].as_str().unwrap().to_owned(),
                    s["phase"].as_i64().unwrap(),
                )
            })
            .collect()
    };

    // One canary; the rest after one success; any final failure halts.
    let policy = r#"{"phases":[{"size":{"count":1},"proceed":{"successes":{"count":1}}},{"size":"rest"}],"failures_max":{"count":0},"seed":7}"#;
    let dep = admin_json(
        &server,
        &token,
        &[
            "deployments",
            "create",
            "--name",
            "canary",
            "--release",
            &rel_id,
            "--where",
            "fleet=p",
            "--policy",
            policy,
        ],
    );
    let dep_id = dep["id"].as_str().unwrap().to_owned();
    assert_eq!(dep["status"], "running");
    let phases = phase_of(&dep_id);
    let canary: Vec<&str> = phases
        .iter()
        .filter(|(_, p)| *p == 1)
        .map(|(d, _)| d.as_str())
        .collect();
    let rest: Vec<&str> = phases
        .iter()
        .filter(|(_, p)| *p == 2)
        .map(|(d, _)| d.as_str())
        .collect();
    assert_eq!((canary.len(), rest.len()), (1, 2), "{phases:?}");
    let canary = by_id(canary[0]);
    assert_eq!(next(canary), 200);
    for r in &rest {
        assert_eq!(next(by_id(r)), 204, "phase 2 has not opened");
        // A device whose phase is not open may not start either.
        expect_error(report(by_id(r), &dep_id, "downloading"), 409);
    }
    for s in ["downloading", "installing", "rebooting", "success"] {
        assert_eq!(report(canary, &dep_id, s).status().as_u16(), 204);
    }
    for r in &rest {
        assert_eq!(
            next(by_id(r)),
            200,
            "phase 2 opened after the canary's success"
        );
    }
    // A failure halts the rollout and says why; the other device is not offered it.
    assert_eq!(
        report(by_id(rest[0]), &dep_id, "failure").status().as_u16(),
        204
    );
    let shown = admin_json(&server, &token, &["deployments", "show", &dep_id]);
    assert_eq!(shown["status"], "halted", "{shown}");
    let reason = shown["halt_reason"].as_str().expect("halt reason");
    assert!(reason.contains("fail"), "{reason}");
    assert_eq!(
        next(by_id(rest[1])),
        204,
        "a halted rollout starts no device"
    );
    let audit = admin_json(&server, &token, &["audit", "--limit", "100"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"rollout.phase_opened") && actions.contains(&"rollout.halted"),
        "{actions:?}"
    );
    // Resume: the last device may go; then abort ends it.
    assert_eq!(
        admin_json(&server, &token, &["deployments", "resume", &dep_id])["status"],
        "running"
    );
    assert_eq!(next(by_id(rest[1])), 200);
    admin_json(&server, &token, &["deployments", "abort", &dep_id]);
    expect_error(report(by_id(rest[1]), &dep_id, "downloading"), 409);

    // A soak delay: the second phase opens by itself 1.5 s after the first opened.
    let policy =
        r#"{"phases":[{"size":{"count":1},"proceed":{"delay_ms":1500}},{"size":"rest"}],"seed":3}"#;
    let dep = admin_json(
        &server,
        &token,
        &[
            "deployments",
            "create",
            "--name",
            "soak",
            "--release",
            &rel_id,
            "--where",
            "fleet=p",
            "--policy",
            policy,
        ],
    );
    let dep_id = dep["id"].as_str().unwrap().to_owned();
    let phases = phase_of(&dep_id);
    let later = by_id(&phases.iter().find(|(_, p)| *p == 2).unwrap().0);
    assert_eq!(next(later), 204);
    let start = std::time::Instant::now();
    while next(later) == 204 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "phase 2 never opened"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(1000),
        "opened before its delay"
    );
    // Bad policies are refused with the reason, and nothing is created.
    let before = count(&server, &token, "deployments");
    let e = fails(
        admin(
            &server,
            &token,
            &[
                "deployments",
                "create",
                "--name",
                "x",
                "--release",
                &rel_id,
                "--where",
                "fleet=p",
                "--policy",
                r#"{"phases":[{"size":"rest"},{"size":{"count":1}}]}"#,
            ],
        ),
        2,
    );
    assert!(e.contains("400") && e.contains("rest"), "{e}");
    let e = fails(
        admin(
            &server,
            &token,
            &[
                "deployments",
                "create",
                "--name",
                "x",
                "--release",
                &rel_id,
                "--where",
                "fleet=p",
                "--policy",
                r#"{"phases":[],"bogus":1}"#,
            ],
        ),
        1,
    );
    assert!(e.contains("422"), "{e}");
    assert_eq!(count(&server, &token, "deployments"), before);
}

#[test]
fn phased_rollout_sqlite() {
    phased(Db::Sqlite);
}

#[test]
fn phased_rollout_postgres() {
    phased(postgres("shoal_test_phased"));
}
