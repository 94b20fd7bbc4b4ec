//! Per-base encodings end to end (issue 12): real `shoal server`, `shoal admin` and
//! `shoal daemon` processes on loopback, devices with file-backed slots.
//!
//! An operator encodes v2 against v1 (`shoal admin releases encode`). A device
//! running v1 names it in its chunk requests, gets the changed chunks as delta
//! records, decodes them against its running slot and installs a verified v2,
//! downloading exactly the encoded figure (records where they pay, plain chunks
//! elsewhere, 37 bytes of framing each), far less than the plain chunks
//! `shoal artifact diff` counts. A device running another release (v0, which v2 has
//! no encodings against) gets plain chunks: exactly the `diff` figure in version-1
//! framing. A device that says it runs v1 but whose running slot no longer holds
//! v1's bytes where the references point fails a reference's hash, says so in its
//! log, and installs a verified v2 from plain chunks.

mod daemon_common;
mod server_common;

use daemon_common::*;
use server_common::*;
use shoal_bootctl::Slot;
use std::sync::atomic::Ordering;

fn build(setup: &Setup, img: &str, version: &str, out: &str) {
    build_release(setup.dir.path(), img, version, "rel.pem", out);
}

/// Gives `dev` another identity (MAC) than the template's.
fn renamed(dev: &Dev, mac: &str) {
    let config = std::fs::read_to_string(dev.path("shoal.toml")).unwrap();
    std::fs::write(
        dev.path("shoal.toml"),
        config.replace("02:00:00:00:00:43", mac),
    )
    .unwrap();
}

/// The manifest answers a daemon's log shows, in order: whether it came as a
/// delta, the bytes of the answer, and (for a delta) of the envelope rebuilt.
fn manifest_answers(log: &str) -> Vec<(bool, u64, Option<u64>)> {
    let field = |l: &str, key: &str| -> Option<u64> {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
    };
    log.lines()
        .filter(|l| l.contains("the release's manifest came from the server"))
        .map(|l| {
            (
                l.contains("as a delta"),
                field(l, "bytes").expect("bytes"),
                field(l, "manifest_bytes"),
            )
        })
        .collect()
}

/// Installs `release` on `dev` through a deployment and waits for success.
fn install(
    server: &Server,
    token: &str,
    dev: &Dev,
    daemon: &mut std::process::Child,
    name: &str,
    release: &str,
    id: &str,
) {
    let dep = deploy(server, token, name, release, id);
    reboot_and_succeed(dev, daemon, server, token, &dep);
}

/// Builds `v2d.shoal` (v1 [`edited`]: per-base encodings against v1 pay) and
/// `v0.shoal` (another base, unrelated bytes); returns v2d's image.
fn build_v2d_and_v0(setup: &Setup) -> Vec<u8> {
    let v1_img = std::fs::read(setup.path("v1.img")).unwrap();
    let v2_img = edited(&v1_img);
    std::fs::write(setup.path("v2d.img"), &v2_img).unwrap();
    build(setup, "v2d.img", "2d", "v2d.shoal");
    std::fs::write(setup.path("v0.img"), image(7, 3 << 20)).unwrap();
    build(setup, "v0.img", "0", "v0.shoal");
    v2_img
}

#[test]
fn a_device_on_the_base_downloads_delta_records_and_others_plain_chunks() {
    let setup = Setup::new();
    let v2_img = build_v2d_and_v0(&setup);
    let v1_img = std::fs::read(setup.path("v1.img")).unwrap();

    let mut v3_img = v2_img.clone();
    v3_img[100_000..100_012].copy_from_slice(b"hotfix000001");
    std::fs::write(setup.path("v3d.img"), &v3_img).unwrap();
    build(&setup, "v3d.img", "3d", "v3d.shoal");

    let data = setup.path("data");
    let server = Server::start(&setup, &data, &Db::Sqlite, &[]);
    let token = host_token(&data, &Db::Sqlite, "admin");
    let v0 = upload(&server, &token, &setup, "v0.shoal");
    let v1 = upload(&server, &token, &setup, "v1.shoal");
    let v2 = upload(&server, &token, &setup, "v2d.shoal");
    let v3 = upload(&server, &token, &setup, "v3d.shoal");

    // Refused: an unknown base, a release against itself, a bad id.
    let unknown = "ab".repeat(32);
    let out = admin(
        &server,
        &token,
        &["releases", "encode", &v2, "--base", &unknown],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );
    let out = admin(&server, &token, &["releases", "encode", &v2, "--base", &v2]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not encoded against itself"),
        "{out:?}"
    );
    let out = admin(
        &server,
        &token,
        &["releases", "encode", &v2, "--base", "xyz"],
    );
    assert!(!out.status.success(), "{out:?}");

    let encoded = admin_json(&server, &token, &["releases", "encode", &v2, "--base", &v1]);
    let (chunks, chunks_delta, plain, enc) = (
        encoded["chunks"].as_u64().unwrap(),
        encoded["chunks_delta"].as_u64().unwrap(),
        encoded["plain_bytes"].as_u64().unwrap(),
        encoded["encoded_bytes"].as_u64().unwrap(),
    );
    let d12 = diff(&setup, "v1.shoal", "v2d.shoal");
    assert_eq!(
        chunks,
        d12["chunks_needed"].as_u64().unwrap(),
        "{encoded}\n{d12}"
    );
    assert_eq!(
        plain,
        d12["needed_stored_bytes"].as_u64().unwrap(),
        "{encoded}\n{d12}"
    );
    assert!(chunks_delta * 2 > chunks, "{encoded}");
    assert!(enc * 4 < plain, "{encoded}");
    // Asked again: the same figures (the records are kept).
    let again = admin_json(&server, &token, &["releases", "encode", &v2, "--base", &v1]);
    assert_eq!(again["encoded_bytes"], encoded["encoded_bytes"], "{again}");
    // The store layout: records beside the chunks, and the release's index.
    let store = data.join("store");
    let base_dir = store.join("deltas").join(&v1);
    assert!(
        base_dir.join("index").join(&v2).is_file(),
        "{}",
        base_dir.display()
    );

    // The device on v1: the changed chunks come as delta records.
    let dev = Dev::new(&setup, &server.url, "");
    let mut daemon = dev.start();
    let id = accept(&server, &token, &dev);
    install(&server, &token, &dev, &mut daemon, "v1", &v1, &id);
    assert_eq!(dev.slot_bytes(Slot::B, v1_img.len()), v1_img);
    install(&server, &token, &dev, &mut daemon, "v2", &v2, &id);
    stop(&mut daemon);
    assert_eq!(dev.slot_bytes(Slot::A, v2_img.len()), v2_img);
    let log = dev.log();
    let transferred = installed_field(&log, "transferred");
    let deltas = installed_field(&log, "delta_chunks");
    assert_eq!(deltas, vec![0, chunks_delta], "{log}");
    assert_eq!(
        transferred.last().copied(),
        Some(enc + 37 * chunks),
        "{encoded}\n{log}"
    );
    let plain_figure = plain + 36 * chunks;
    assert!(
        transferred[1] * 3 < plain_figure,
        "{} bytes with per-base encodings vs {plain_figure} plain",
        transferred[1]
    );
    // The manifests: v1's whole (the device kept none; it names none), v2's as a
    // delta against v1's, rebuilt into exactly the envelope the server holds.
    let envelope_len = |id: &str| {
        std::fs::metadata(store.join("manifests").join(format!("{id}.envelope")))
            .unwrap()
            .len()
    };
    let answers = manifest_answers(&log);
    assert_eq!(answers.len(), 2, "{log}");
    assert_eq!(answers[0], (false, envelope_len(&v1), None), "{log}");
    let (delta, delta_bytes, rebuilt) = answers[1];
    let delta_bytes_v2 = delta_bytes;
    assert!(delta, "{log}");
    assert_eq!(rebuilt, Some(envelope_len(&v2)), "{log}");
    // v2 changed 95 of v1's chunks: their entries are most of the delta.
    assert!(
        delta_bytes < envelope_len(&v2),
        "a manifest delta of {delta_bytes} bytes for an envelope of {}",
        envelope_len(&v2)
    );
    assert!(
        server.log().contains("manifest served as a delta"),
        "the server logs what it served"
    );
    // A hotfix (v3: one edit of v2): the manifest travels as a delta against v2's,
    // a fraction of the envelope; it names both slots' manifests, v2's first.
    let mut daemon = dev.start();
    let from = dev.log().len();
    install(&server, &token, &dev, &mut daemon, "v3", &v3, &id);
    stop(&mut daemon);
    assert_eq!(dev.slot_bytes(Slot::B, v3_img.len()), v3_img);
    let log3 = dev.log()[from..].to_owned();
    let answers = manifest_answers(&log3);
    assert_eq!(answers.len(), 1, "{log3}");
    let (delta, delta_bytes, rebuilt) = answers[0];
    assert!(delta && log3.contains("held=2"), "{log3}");
    assert!(log3.contains(&format!("base={v2}")), "{log3}");
    assert_eq!(rebuilt, Some(envelope_len(&v3)), "{log3}");
    assert!(
        delta_bytes * 8 < envelope_len(&v3),
        "a manifest delta of {delta_bytes} bytes for an envelope of {}",
        envelope_len(&v3)
    );
    // The rebuilt manifest was checked once: that check is the install's.
    assert_eq!(
        shoal_tests::installed_field(&log3, "manifest_checks"),
        Some(1),
        "{log3}"
    );

    // A device on v1 whose running slot was damaged where v2 changed (chunks v2
    // does not reuse): the references there fail their hash; plain chunks follow.
    // It talks through a proxy that flips the last byte of the first manifest
    // delta it carries (a signature byte): the rebuilt manifest fails its
    // signature, the daemon says so and asks for the whole envelope, once.
    let proxy = FaultProxy::start(&server.url);
    let damaged = Dev::new(&setup, &proxy.url, "");
    renamed(&damaged, "02:00:00:00:00:45");
    let mut daemon = damaged.start();
    let id = accept(&server, &token, &damaged);
    install(
        &server,
        &token,
        &damaged,
        &mut daemon,
        "v1 (to damage)",
        &v1,
        &id,
    );
    stop(&mut daemon);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut b = std::fs::OpenOptions::new()
            .write(true)
            .open(damaged.path("b.img"))
            .unwrap();
        b.seek(SeekFrom::Start(600 * 1024)).unwrap();
        b.write_all(&vec![0x5a; 1 << 20]).unwrap();
    }
    let before = damaged.log().len();
    *proxy.faults.flip_body_end_at_pattern.lock().unwrap() =
        Some(b"application/vnd.shoal.manifest-delta.v1".to_vec());
    // Slowly, and the daemon is killed mid-download: after the restart it asks
    // for the manifest again (a delta that verifies this time) and resumes.
    proxy.faults.rate.store(100 * 1024, Ordering::Relaxed);
    let mut daemon = damaged.start();
    let dep = deploy(&server, &token, "v2 on a damaged v1", &v2, &id);
    wait_for(&damaged, 60, "plain chunks", || {
        damaged.log()[before..].contains("fetching plain chunks")
    });
    std::thread::sleep(std::time::Duration::from_millis(3000));
    assert!(
        !damaged.log()[before..].contains("installed; trial armed"),
        "v2 was fetched before the daemon could be killed; slow the proxy down"
    );
    stop(&mut daemon);
    proxy.faults.rate.store(0, Ordering::Relaxed);
    let mut daemon = damaged.start();
    reboot_and_succeed(&damaged, &mut daemon, &server, &token, &dep);
    stop(&mut daemon);
    assert_eq!(damaged.slot_bytes(Slot::A, v2_img.len()), v2_img);
    let log = damaged.log()[before..].to_owned();
    assert!(
        log.contains(
            "cannot decode a delta-encoded chunk against the running slot; fetching plain chunks"
        ) && log.contains("are not the base release's"),
        "{log}"
    );
    assert_eq!(proxy.faults.flips.load(Ordering::Relaxed), 1);
    assert!(
        log.contains("the server's manifest delta was refused; asking for the whole manifest")
            && log.contains("the rebuilt manifest does not verify"),
        "{log}"
    );
    assert_eq!(
        manifest_answers(&log),
        vec![
            (false, envelope_len(&v2), None),
            (true, delta_bytes_v2, Some(envelope_len(&v2)))
        ],
        "{log}"
    );
    let resumed = installed_field(&log, "resumed");
    assert!(
        resumed.last().is_some_and(|&r| r > 0),
        "the install after the restart did not resume: {resumed:?}\n{log}"
    );

    // A device on v0: v2 has no encodings against it, so it gets plain chunks.
    let other = Dev::new(&setup, &server.url, "");
    renamed(&other, "02:00:00:00:00:44");
    let mut daemon = other.start();
    let id = accept(&server, &token, &other);
    install(&server, &token, &other, &mut daemon, "v0", &v0, &id);
    // The server no longer holds v0's manifest (the release was deleted): the
    // device names it, and gets the whole envelope.
    let v0_envelope = envelope_len(&v0);
    let out = admin(&server, &token, &["releases", "delete", &v0]);
    assert!(out.status.success(), "{out:?}");
    install(&server, &token, &other, &mut daemon, "v2 on v0", &v2, &id);
    stop(&mut daemon);
    assert_eq!(other.slot_bytes(Slot::A, v2_img.len()), v2_img);
    let log = other.log();
    assert_eq!(installed_field(&log, "delta_chunks"), vec![0, 0], "{log}");
    assert_eq!(
        manifest_answers(&log),
        vec![(false, v0_envelope, None), (false, envelope_len(&v2), None)],
        "{log}"
    );
    let named: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("the release's manifest came from the server"))
        .collect();
    assert!(
        named[0].contains("held=0") && named[1].contains("held=1"),
        "the device named v0's manifest the second time: {log}"
    );
    // The chunks v2 has and v0 lacks, as the store holds them (a chunk v1 and v2
    // share is stored as v1's upload had it), in version-1 framing.
    let chunks_of = |file: &str| -> std::collections::HashSet<shoal_artifact::ChunkId> {
        let f = std::fs::File::open(setup.path(file)).unwrap();
        let r =
            shoal_artifact::ArtifactReader::open_unverified(std::io::BufReader::new(f)).unwrap();
        r.manifest()
            .distinct_chunks()
            .iter()
            .map(|c| c.id)
            .collect()
    };
    let (in_v0, in_v2) = (chunks_of("v0.shoal"), chunks_of("v2d.shoal"));
    let needed: Vec<_> = in_v2.difference(&in_v0).collect();
    let plain_v0: u64 = needed
        .iter()
        .map(|id| {
            std::fs::metadata(store.join(shoal_artifact::read::chunk_path(id)))
                .unwrap()
                .len()
                + 36
        })
        .sum();
    assert_eq!(
        installed_field(&log, "transferred").last().copied(),
        Some(plain_v0),
        "{log}"
    );
}

/// Every file under `dir/deltas`, relative to `dir`, sorted.
fn deltas_listing(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.join("deltas")];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.map(Result::unwrap) {
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Waits for the device to report `version` as its release in its inventory.
fn runs(server: &Server, token: &str, dev: &Dev, id: &str, version: &str) {
    wait_for(dev, 60, "the inventory's release_version", || {
        admin_json(server, token, &["devices", "show", id])["inventory"]["release_version"]
            == version
    });
}

/// Waits for the encoding of `release` against `base` to be done; the row.
fn encoded_row(
    server: &Server,
    token: &str,
    dev: &Dev,
    release: &str,
    base: &str,
) -> serde_json::Value {
    let mut row = serde_json::Value::Null;
    wait_for(dev, 180, "the background encoding", || {
        let rows = admin_json(server, token, &["releases", "encodings", release]);
        row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["base"] == base)
            .cloned()
            .unwrap_or_default();
        assert_ne!(row["state"], "failed", "{row}");
        row["state"] == "done"
    });
    row
}

/// Per-base encodings without an operator: a deployment queues the release
/// against what its devices run (a device polling before it is done gets plain
/// chunks and installs), an upload against what the fleet runs (done before the
/// deployment: the device downloads delta records); the operator sees them
/// (`releases encodings`, `releases show`); deleting a release prunes its
/// encodings as base and as target, from the store and the database.
#[test]
fn encodings_are_made_without_an_operator_and_pruned_with_their_release() {
    let setup = Setup::new();
    let v2_img = build_v2d_and_v0(&setup);
    let v1_img = std::fs::read(setup.path("v1.img")).unwrap();

    let data = setup.path("data");
    let server = Server::start(&setup, &data, &Db::Sqlite, &["--auto-encode-bases", "2"]);
    let token = host_token(&data, &Db::Sqlite, "admin");
    let v0 = upload(&server, &token, &setup, "v0.shoal");
    let v1 = upload(&server, &token, &setup, "v1.shoal");
    // No device runs either: nothing queued.
    assert_eq!(
        admin_json(&server, &token, &["releases", "encodings", &v1]),
        serde_json::json!([])
    );

    let dev = Dev::new(&setup, &server.url, "");
    let mut daemon = dev.start();
    let id = accept(&server, &token, &dev);
    install(&server, &token, &dev, &mut daemon, "v0", &v0, &id);
    runs(&server, &token, &dev, &id, "0");
    // The deployment of v1 queues v1 against v0 (its device runs v0); the device
    // installs a verified v1 whether or not the encoding was done by then.
    install(&server, &token, &dev, &mut daemon, "v1", &v1, &id);
    assert_eq!(dev.slot_bytes(Slot::A, v1_img.len()), v1_img);
    let row = encoded_row(&server, &token, &dev, &v1, &v0);
    assert_eq!(row["origin"], "auto", "{row}");
    assert_eq!(row["devices"], 1, "{row}");
    runs(&server, &token, &dev, &id, "1");

    // The upload of v2 queues v2 against v1, which the fleet runs.
    let v2 = upload(&server, &token, &setup, "v2d.shoal");
    let row = encoded_row(&server, &token, &dev, &v2, &v1);
    assert_eq!(row["origin"], "auto", "{row}");
    let d12 = diff(&setup, "v1.shoal", "v2d.shoal");
    assert_eq!(
        row["plain_bytes"], d12["needed_stored_bytes"],
        "{row}\n{d12}"
    );
    assert!(row["saving"].as_f64().unwrap() > 0.5, "{row}");
    let shown = admin_json(&server, &token, &["releases", "show", &v2]);
    assert_eq!(shown["encodings"][0]["base"], v1, "{shown}");
    assert_eq!(shown["encodings"][0]["state"], "done", "{shown}");

    // One record the index lists goes missing from the store (as a prune racing
    // an encoding could leave it): the server sends that chunk plain.
    let store = data.join("store");
    let record_dir = std::fs::read_dir(store.join("deltas").join(&v1))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap() != "index")
        .unwrap();
    let lost = std::fs::read_dir(&record_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let lost_id = lost.file_name().unwrap().to_string_lossy().into_owned();
    let lost_record = std::fs::metadata(&lost).unwrap().len();
    let lost_plain = std::fs::metadata(store.join("chunks").join(&lost_id[..2]).join(&lost_id))
        .unwrap()
        .len();
    std::fs::remove_file(&lost).unwrap();

    install(&server, &token, &dev, &mut daemon, "v2", &v2, &id);
    stop(&mut daemon);
    assert_eq!(dev.slot_bytes(Slot::B, v2_img.len()), v2_img);
    let log = dev.log();
    let deltas = installed_field(&log, "delta_chunks");
    assert_eq!(
        deltas.last().copied(),
        Some(row["chunks_delta"].as_u64().unwrap() - 1),
        "{row}\n{log}"
    );
    let transferred = installed_field(&log, "transferred");
    assert_eq!(
        transferred.last().copied(),
        Some(
            row["encoded_bytes"].as_u64().unwrap() - lost_record
                + lost_plain
                + 37 * row["chunks"].as_u64().unwrap()
        ),
        "{row}\n{log}"
    );
    assert!(
        server
            .log()
            .contains("a per-base delta record the index lists is missing or changed"),
        "{}",
        server.log()
    );

    // Deleting v1 prunes it as a base (deltas/<v1>/, v2's encodings against it)
    // and as a target (its index against v0, and the records only it listed).
    let before = deltas_listing(&store);
    let has = |l: &[String], p: &str| l.iter().any(|f| f.starts_with(p));
    assert!(
        has(&before, &format!("deltas/{v1}/index/{v2}")),
        "{before:?}"
    );
    assert!(
        has(&before, &format!("deltas/{v0}/index/{v1}")),
        "{before:?}"
    );
    assert!(has(&before, &format!("deltas/{v1}/")), "{before:?}");
    let out = admin(&server, &token, &["releases", "delete", &v1]);
    assert!(out.status.success(), "{out:?}");
    let after = deltas_listing(&store);
    assert_eq!(after, Vec::<String>::new(), "before: {before:?}");
    assert!(!store.join("deltas").join(&v1).exists());
    assert_eq!(
        admin_json(&server, &token, &["releases", "encodings", &v2]),
        serde_json::json!([])
    );
    assert_eq!(
        admin_json(&server, &token, &["releases", "encodings", &v0]),
        serde_json::json!([])
    );
}
