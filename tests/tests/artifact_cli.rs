//! `shoal artifact ...` and `shoal store ...` as a person runs them: the real binary,
//! real files. Bad input gives one line on stderr and a non-zero exit code.

use std::path::Path;

use shoal_tests::{fails, ok, run_in};

/// A compressible, non-repeating image with a repeated region and a zero run.
fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b"abcdefghij"[(x >> 60) as usize % 10]
        })
        .collect();
    let (a, b) = v.split_at_mut(len / 2);
    b[..len / 8].copy_from_slice(&a[..len / 8]);
    v[len / 4..len / 4 + len / 16].fill(0);
    v
}

/// Makes release keys `rel1`, `rel2`, a root key, and `root.shoalroot` trusting
/// `release_keys` with `threshold`.
fn setup(dir: &Path, release_keys: &[&str], threshold: u32) {
    for k in ["rootk", "rel1", "rel2", "other"] {
        if !dir.join(format!("{k}.pem")).exists() {
            ok(run_in(
                dir,
                &["key", "generate", "--out", &format!("{k}.pem")],
            ));
        }
    }
    let mut args = vec!["root", "init", "--root-key", "rootk.pem.pub"];
    let pubs: Vec<String> = release_keys
        .iter()
        .map(|k| format!("{k}.pem.pub"))
        .collect();
    for p in &pubs {
        args.extend(["--release-key", p.as_str()]);
    }
    let t = threshold.to_string();
    args.extend([
        "--release-threshold",
        &t,
        "--sign",
        "rootk.pem",
        "--out",
        "root.shoalroot",
    ]);
    let _ = std::fs::remove_file(dir.join("root.shoalroot"));
    ok(run_in(dir, &args));
}

fn build(dir: &Path, img: &str, version: &str, out: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "artifact",
        "build",
        "--image",
        img,
        "--name",
        "acme-os",
        "--version",
        version,
        "--device-type",
        "board-a",
        "--device-type",
        "board-b",
        "--security-counter",
        "4",
        "--key",
        "rel1.pem",
        "--provides",
        "rootfs-image.version=2",
        "--depends",
        "rootfs-image.version=1",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    run_in(dir, &args)
}

#[test]
fn build_inspect_verify_extract_diff_sign() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d, &["rel1"], 1);
    let img = image(3_000_000, 1);
    std::fs::write(d.join("v1.img"), &img).unwrap();
    ok(build(d, "v1.img", "1.0", "v1.shoal", &[]));

    let v: serde_json::Value = serde_json::from_str(&ok(run_in(
        d,
        &["artifact", "inspect", "v1.shoal", "--json"],
    )))
    .unwrap();
    assert_eq!(v["name"], "acme-os");
    assert_eq!(v["version"], "1.0");
    assert_eq!(v["security_counter"], 4);
    assert_eq!(v["device_types"], serde_json::json!(["board-a", "board-b"]));
    assert_eq!(v["provides"]["rootfs-image.version"], "2");
    assert_eq!(
        v["depends"]["rootfs-image.version"],
        serde_json::json!(["1"])
    );
    assert_eq!(v["payloads"][0]["size"], 3_000_000);
    assert_eq!(v["payloads"][0]["kind"], "rootfs-image");
    assert_eq!(v["signatures_verified"], false);

    let out = ok(run_in(
        d,
        &["artifact", "verify", "v1.shoal", "--root", "root.shoalroot"],
    ));
    assert!(out.starts_with("ok: acme-os 1.0"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&ok(run_in(
        d,
        &[
            "artifact",
            "verify",
            "v1.shoal",
            "--root",
            "root.shoalroot",
            "--json",
        ],
    )))
    .unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["payload_bytes"], 3_000_000);

    ok(run_in(
        d,
        &[
            "artifact",
            "extract",
            "v1.shoal",
            "--root",
            "root.shoalroot",
            "--out",
            "out.img",
        ],
    ));
    assert_eq!(std::fs::read(d.join("out.img")).unwrap(), img);
    // Extract refuses to overwrite (usage error).
    let line = fails(
        run_in(
            d,
            &[
                "artifact",
                "extract",
                "v1.shoal",
                "--root",
                "root.shoalroot",
                "--out",
                "out.img",
            ],
        ),
        2,
    );
    assert!(line.contains("out.img"), "{line}");

    // v2 changes a little; the diff is small and counts the manifest.
    let mut img2 = img.clone();
    img2[1_000_000..1_050_000].copy_from_slice(&image(50_000, 9));
    std::fs::write(d.join("v2.img"), &img2).unwrap();
    ok(build(d, "v2.img", "2.0", "v2.shoal", &[]));
    let v: serde_json::Value = serde_json::from_str(&ok(run_in(
        d,
        &["artifact", "diff", "v1.shoal", "v2.shoal", "--json"],
    )))
    .unwrap();
    let download = v["download_bytes"].as_u64().unwrap();
    let full = v["full_stored_bytes"].as_u64().unwrap();
    assert!(v["manifest_bytes"].as_u64().unwrap() > 0);
    assert!(download > 0 && download < full / 2, "{v}");
    // The download figure is the exact size of the thin artifact the device gets.
    ok(build(
        d,
        "v2.img",
        "2.0",
        "v2-thin.shoal",
        &["--base", "v1.shoal"],
    ));
    let thin_len = std::fs::metadata(d.join("v2-thin.shoal")).unwrap().len();
    assert_eq!(download, thin_len, "{v}");
    // `--packs` sizes the thin artifact `build --packs` writes (for older devices).
    ok(build(
        d,
        "v2.img",
        "2.0",
        "v2-thin-packs.shoal",
        &["--base", "v1.shoal", "--packs"],
    ));
    let v_packs: serde_json::Value = serde_json::from_str(&ok(run_in(
        d,
        &[
            "artifact", "diff", "v1.shoal", "v2.shoal", "--packs", "--json",
        ],
    )))
    .unwrap();
    let packs_len = std::fs::metadata(d.join("v2-thin-packs.shoal"))
        .unwrap()
        .len();
    assert_eq!(
        v_packs["download_bytes"].as_u64().unwrap(),
        packs_len,
        "{v_packs}"
    );
    assert_ne!(packs_len, thin_len);
    // `inspect` says which layout an artifact has.
    for (file, layout) in [
        ("v2-thin-packs.shoal", "packs"),
        ("v2-thin.shoal", "data"),
        ("v2.shoal", "data"),
    ] {
        let v: serde_json::Value =
            serde_json::from_str(&ok(run_in(d, &["artifact", "inspect", file, "--json"]))).unwrap();
        assert_eq!(v["layout"], layout, "{file}: {v}");
    }
    let text = ok(run_in(d, &["artifact", "inspect", "v2-thin-packs.shoal"]));
    assert!(
        text.contains("layout:           packs (--packs: every Shoal release reads it)"),
        "{text}"
    );
    let needed = v["needed_stored_bytes"].as_u64().unwrap();
    let store = v["store_download_bytes"].as_u64().unwrap();
    assert!(store > needed && store < download, "{v}");

    // Threshold signing: a 2-of-2 root refuses one signature, accepts after `sign`.
    setup(d, &["rel1", "rel2"], 2);
    let line = fails(
        run_in(
            d,
            &["artifact", "verify", "v2.shoal", "--root", "root.shoalroot"],
        ),
        1,
    );
    // Counted by key id before the envelope is read (issue 9).
    assert!(
        line.contains("is signed by 1 of the trust root's release keys; it needs 2"),
        "{line}"
    );
    ok(run_in(
        d,
        &["artifact", "sign", "v2.shoal", "--key", "rel2.pem"],
    ));
    ok(run_in(
        d,
        &["artifact", "verify", "v2.shoal", "--root", "root.shoalroot"],
    ));
}

#[test]
fn thin_artifacts_and_stores() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d, &["rel1"], 1);
    let img = image(2_000_000, 2);
    let mut img2 = img.clone();
    img2.extend_from_slice(&image(100_000, 3));
    std::fs::write(d.join("v1.img"), &img).unwrap();
    std::fs::write(d.join("v2.img"), &img2).unwrap();
    ok(build(d, "v1.img", "1.0", "v1.shoal", &["--fast"]));
    ok(build(
        d,
        "v2.img",
        "2.0",
        "v2.thin.shoal",
        &["--fast", "--base", "v1.shoal"],
    ));
    let thin = std::fs::metadata(d.join("v2.thin.shoal")).unwrap().len();
    let full = std::fs::metadata(d.join("v1.shoal")).unwrap().len();
    assert!(thin < full / 2, "thin {thin} full {full}");

    // The store needs the base first.
    let line = fails(
        run_in(
            d,
            &[
                "store",
                "add",
                "st",
                "v2.thin.shoal",
                "--root",
                "root.shoalroot",
            ],
        ),
        1,
    );
    assert!(line.contains("base release acme-os 1.0"), "{line}");
    ok(run_in(
        d,
        &["store", "add", "st", "v1.shoal", "--root", "root.shoalroot"],
    ));
    ok(run_in(
        d,
        &[
            "store",
            "add",
            "st",
            "v2.thin.shoal",
            "--root",
            "root.shoalroot",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&ok(run_in(
        d,
        &[
            "store",
            "verify",
            "st",
            "--root",
            "root.shoalroot",
            "--json",
        ],
    )))
    .unwrap();
    assert_eq!(v["manifests"], 2);

    // A thin artifact extracts with the store holding its base.
    let line = fails(
        run_in(
            d,
            &[
                "artifact",
                "extract",
                "v2.thin.shoal",
                "--root",
                "root.shoalroot",
                "--out",
                "x.img",
            ],
        ),
        1,
    );
    assert!(line.contains("needs a chunk store"), "{line}");
    assert!(!d.join("x.img").exists(), "a failed extract leaves no file");
    ok(run_in(
        d,
        &[
            "artifact",
            "extract",
            "v2.thin.shoal",
            "--root",
            "root.shoalroot",
            "--store",
            "st",
            "--out",
            "x.img",
        ],
    ));
    assert_eq!(std::fs::read(d.join("x.img")).unwrap(), img2);

    // A corrupted chunk file is found by `store verify`.
    let chunks = d.join("st/chunks");
    let sub = std::fs::read_dir(&chunks)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let file = std::fs::read_dir(&sub)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let line = fails(
        run_in(d, &["store", "verify", "st", "--root", "root.shoalroot"]),
        1,
    );
    assert!(line.contains("chunk file"), "{line}");
}

#[test]
fn bad_input_gives_one_line_and_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d, &["rel1"], 1);
    std::fs::write(d.join("v1.img"), image(1_000_000, 4)).unwrap();
    ok(build(d, "v1.img", "1.0", "v1.shoal", &[]));
    let good = std::fs::read(d.join("v1.shoal")).unwrap();
    let verify = |name: &str| run_in(d, &["artifact", "verify", name, "--root", "root.shoalroot"]);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.shoal", Vec::new(), "empty"),
        (
            "text.shoal",
            b"hello, this is not a tar file\n".repeat(40),
            "not a tar",
        ),
        ("trunc-env.shoal", good[..700].to_vec(), "truncated"),
        (
            "trunc-mid.shoal",
            good[..good.len() / 2].to_vec(),
            "truncated",
        ),
        ("flip-chunk.shoal", flip(&good, good.len() - 2048), "chunk"),
        ("flip-manifest.shoal", flip(&good, 700), "signature"),
    ];
    for (name, bytes, want) in &cases {
        std::fs::write(d.join(name), bytes).unwrap();
        let line = fails(verify(name), 1);
        assert!(line.starts_with("shoal: "), "{name}: {line}");
        assert!(
            line.to_lowercase().contains(want),
            "{name}: expected {want:?} in {line}"
        );
        // inspect reads the same bytes and fails the same way (or, for a chunk
        // flip, succeeds: it does not read chunks).
    }

    // A key not in the root.
    std::fs::remove_file(d.join("root.shoalroot")).unwrap();
    setup(d, &["other"], 1);
    let line = fails(verify("v1.shoal"), 1);
    assert!(
        line.contains("is signed by 0 of the trust root's release keys; it needs 1"),
        "{line}"
    );

    // Usage errors: exit 2.
    let line = fails(
        run_in(
            d,
            &["artifact", "verify", "v1.shoal", "--root", "nope.root"],
        ),
        2,
    );
    assert!(line.contains("nope.root"), "{line}");
    let line = fails(build(d, "missing.img", "1.0", "m.shoal", &[]), 2);
    assert!(line.contains("missing.img"), "{line}");
    assert!(!d.join("m.shoal").exists());
    // A build that fails leaves no output (an empty image).
    std::fs::write(d.join("empty.img"), b"").unwrap();
    let line = fails(build(d, "empty.img", "1.0", "e.shoal", &[]), 1);
    assert!(line.contains("empty"), "{line}");
    assert!(!d.join("e.shoal").exists());
    assert!(
        std::fs::read_dir(d)
            .unwrap()
            .all(|e| { !e.unwrap().file_name().to_string_lossy().contains(".tmp") })
    );
}

fn flip(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at] ^= 0x08;
    b
}

/// `--zstd-level` changes how chunks are compressed, not how the image is cut:
/// levels 1 and 19 store different byte counts with the same chunk list; a level
/// outside 1-19 is a usage error (exit 2).
#[test]
fn zstd_level_sets_the_compression_not_the_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d, &["rel1"], 1);
    std::fs::write(d.join("v1.img"), image(3_000_000, 5)).unwrap();
    ok(build(
        d,
        "v1.img",
        "1.0",
        "l1.shoal",
        &["--zstd-level", "1"],
    ));
    ok(build(
        d,
        "v1.img",
        "1.0",
        "l19.shoal",
        &["--zstd-level", "19"],
    ));
    let payload = |name: &str| {
        let v: serde_json::Value =
            serde_json::from_str(&ok(run_in(d, &["artifact", "inspect", name, "--json"]))).unwrap();
        v["payloads"][0].clone()
    };
    let (p1, p19) = (payload("l1.shoal"), payload("l19.shoal"));
    assert_eq!(p1["chunks"], p19["chunks"]);
    assert_eq!(p1["hash"], p19["hash"]);
    // Which level stores fewer bytes depends on the data (with a dictionary, level
    // 19 stored more than level 1 here): the levels differ, so the sizes do.
    let stored = |p: &serde_json::Value| p["stored_bytes"].as_u64().unwrap();
    assert_ne!(stored(&p1), stored(&p19));
    for bad in ["0", "20"] {
        let line = fails(
            build(d, "v1.img", "1.0", "bad.shoal", &["--zstd-level", bad]),
            2,
        );
        assert!(line.contains("zstd-level"), "{line}");
    }
}
