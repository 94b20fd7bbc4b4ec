//! `shoal key` and `shoal root` as a user runs them.

use shoal_tests::{fails, ok, run_in};

#[test]
fn generate_keys_init_rotate_cosign_and_inspect_a_root() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root_id = ok(run_in(d, &["key", "generate", "--out", "root.pem"]));
    assert_eq!(root_id.trim().len(), 64);
    assert!(d.join("root.pem.pub").exists());
    assert_eq!(ok(run_in(d, &["key", "id", "root.pem.pub"])), root_id);
    assert_eq!(ok(run_in(d, &["key", "id", "root.pem"])), root_id);
    ok(run_in(d, &["key", "generate", "--out", "release.pem"]));
    ok(run_in(d, &["key", "generate", "--out", "new-a.pem"]));
    ok(run_in(d, &["key", "generate", "--out", "new-b.pem"]));

    ok(run_in(
        d,
        &[
            "root",
            "init",
            "--root-key",
            "root.pem.pub",
            "--release-key",
            "release.pem.pub",
            "--sign",
            "root.pem",
            "--out",
            "v1.root",
        ],
    ));
    let v1: serde_json::Value =
        serde_json::from_str(&ok(run_in(d, &["root", "inspect", "v1.root", "--json"]))).unwrap();
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["self_signed"], true);

    // v2 needs 2 of the new keys; the old holder and one new holder sign first.
    ok(run_in(
        d,
        &[
            "root",
            "rotate",
            "--current",
            "v1.root",
            "--root-key",
            "new-a.pem.pub",
            "--root-key",
            "new-b.pem.pub",
            "--root-threshold",
            "2",
            "--release-key",
            "release.pem.pub",
            "--sign",
            "root.pem",
            "--sign",
            "new-a.pem",
            "--out",
            "v2.root",
        ],
    ));
    let partial: serde_json::Value = serde_json::from_str(&ok(run_in(
        d,
        &[
            "root",
            "inspect",
            "v2.root",
            "--trusted",
            "v1.root",
            "--json",
        ],
    )))
    .unwrap();
    assert_eq!(partial["version"], 2);
    assert_eq!(partial["self_signed"], false);
    assert_eq!(partial["rotation_accepted"], false);

    // The second new holder completes it.
    ok(run_in(
        d,
        &["root", "sign", "v2.root", "--key", "new-b.pem"],
    ));
    let full: serde_json::Value = serde_json::from_str(&ok(run_in(
        d,
        &[
            "root",
            "inspect",
            "v2.root",
            "--trusted",
            "v1.root",
            "--json",
        ],
    )))
    .unwrap();
    assert_eq!(full["self_signed"], true);
    assert_eq!(full["rotation_accepted"], true);
}

#[test]
fn bad_input_gives_one_line_and_the_right_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(run_in(d, &["key", "generate", "--out", "k.pem"]));
    // Refuses to overwrite a key.
    let line = fails(run_in(d, &["key", "generate", "--out", "k.pem"]), 1);
    assert!(line.contains("already exists"), "{line}");
    // Threshold above the number of keys is a usage error.
    let line = fails(
        run_in(
            d,
            &[
                "root",
                "init",
                "--root-key",
                "k.pem.pub",
                "--root-threshold",
                "2",
                "--release-key",
                "k.pem.pub",
                "--out",
                "r",
            ],
        ),
        2,
    );
    assert!(line.contains("threshold 2 but only 1 key"), "{line}");
    // A file that is not a root.
    std::fs::write(d.join("junk"), b"not a root").unwrap();
    let line = fails(run_in(d, &["root", "inspect", "junk"]), 1);
    assert!(line.contains("not a signed trust root"), "{line}");
    // A private key where a public key is needed.
    let line = fails(
        run_in(
            d,
            &[
                "root",
                "init",
                "--root-key",
                "k.pem",
                "--release-key",
                "k.pem.pub",
                "--out",
                "r",
            ],
        ),
        1,
    );
    assert_eq!(
        line,
        "shoal: reading k.pem: expected an ed25519 public key (SPKI PEM), found a private key (PKCS#8 PEM)"
    );
}
