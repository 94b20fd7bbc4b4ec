//! `shoal install`, `boot-check`, `commit`, `rollback`, `status` on a file-backed
//! device, through the real binary.

mod install_common;

use install_common::{Device, fails, hash, image, modify, ok, u};
use shoal_bootctl::Slot;

const MIB: usize = 1024 * 1024;
const SIZE: usize = 8 * MIB;
const SLOT: u64 = 10 * MIB as u64;

/// A device running a factory image; v1 (its successor) and v2 (a small change).
fn setup() -> (Device, Vec<u8>, Vec<u8>) {
    let factory = image(1, SIZE);
    let v1 = modify(&factory, 2, 3, 500_000);
    let v2 = modify(&v1, 3, 2, 200_000);
    (Device::new(&factory, SLOT), v1, v2)
}

fn boot_check(dev: &Device) -> serde_json::Value {
    install_common::json(&ok(dev.run(&["boot-check", "--json"])))
}

#[test]
fn full_install_trial_commit_then_delta_from_thin_artifact_and_chunk_store() {
    let (dev, v1, v2) = setup();
    let a1 = dev.build(&v1, "1.0", 1, None);
    let a2_thin = dev.build(&v2, "2.0", 2, Some(&a1));

    let r = dev.install(&a1);
    assert_eq!(
        (r["slot"].as_str(), u(&r, "total_bytes")),
        (Some("B"), SIZE as u64)
    );
    assert_eq!(u(&r, "written_bytes"), SIZE as u64);
    assert!(
        u(&r, "reused_bytes") > (SIZE / 2) as u64,
        "indexed factory image reused: {r}"
    );
    assert_eq!(u(&r, "reused_bytes") + u(&r, "fetched_bytes"), SIZE as u64);
    assert_eq!(dev.slot_hash(Slot::B, SIZE), hash(&v1), "slot B holds v1");
    let st = dev.status();
    assert_eq!(st["deployment"]["phase"], "trial-armed");
    assert_eq!(st["next_boot"], "B");
    assert_eq!(st["slots"]["B"]["version"], "1.0");

    // Before the reboot, boot-check leaves the armed trial alone.
    assert_eq!(boot_check(&dev)["result"], "trial-pending");
    assert_eq!(dev.reboot(), Slot::B);
    let c = boot_check(&dev);
    assert_eq!(
        (c["result"].as_str(), c["slot"].as_str()),
        (Some("committed"), Some("B")),
        "{c}"
    );
    let st = dev.status();
    assert_eq!(
        (st["active"].as_str(), st["floor"].as_u64()),
        (Some("B"), Some(1))
    );
    assert_eq!(st["last"]["result"], "committed");
    assert_eq!(st["deployment"], serde_json::Value::Null);

    // v2 as a delta from a thin artifact: most of it comes from the running slot.
    let r = dev.install(&a2_thin);
    assert_eq!(r["slot"], "A");
    assert!(
        u(&r, "fetched_bytes") <= 600_000 + 2 * 256 * 1024,
        "only the changes fetched: {r}"
    );
    assert_eq!(u(&r, "reused_bytes") + u(&r, "fetched_bytes"), SIZE as u64);
    // A thin artifact holds only chunks the device lacks: it is read once, all but
    // its tar padding. Its chunks make one data member, whose header is read and
    // checked as `verify` checks it (issue 9), and whose padding (under 512 bytes)
    // is skipped.
    let thin_len = std::fs::metadata(&a2_thin).expect("artifact").len();
    let read = u(&r, "source_bytes_read");
    assert!(
        read <= thin_len && read + 512 > thin_len,
        "{thin_len}: thin artifact read: {r}"
    );
    assert_eq!(dev.slot_hash(Slot::A, SIZE), hash(&v2));
    // Rolling back before the reboot cancels the trial.
    let rb = install_common::json(&ok(dev.run(&[
        "rollback",
        "--json",
        "--reason",
        "changed my mind",
    ])));
    assert_eq!(rb["result"], "rolled-back");
    assert_eq!(dev.boot_state().next_boot(), Slot::B);
    assert_eq!(dev.status()["last"]["reason"], "changed my mind");

    // The same release from a chunk store directory: slot A already holds it, so
    // nothing is written, only verified.
    let store = dev.path("store");
    let root = dev.root.display().to_string();
    for a in [&a1, &a2_thin] {
        ok(dev.run(&[
            "store",
            "add",
            &store.display().to_string(),
            &a.display().to_string(),
            "--root",
            &root,
        ]));
    }
    let r = install_common::json(&ok(dev.run(&[
        "install",
        "--json",
        &store.display().to_string(),
        "--release",
        "acme-os@2.0",
    ])));
    assert_eq!(
        (u(&r, "written_bytes"), u(&r, "resumed_bytes")),
        (0, SIZE as u64),
        "{r}"
    );
    assert_eq!(dev.reboot(), Slot::A);
    ok(dev.run(&["commit"]));
    let st = dev.status();
    assert_eq!(
        (st["active"].as_str(), st["floor"].as_u64()),
        (Some("A"), Some(2))
    );
}

#[test]
fn install_from_stdin_and_from_a_chunk_store_fetches_only_missing_chunks() {
    let (dev, v1, _) = setup();
    let a1 = dev.build(&v1, "1.0", 1, None);
    let store = dev.path("store");
    ok(dev.run(&[
        "store",
        "add",
        &store.display().to_string(),
        &a1.display().to_string(),
        "--root",
        &dev.root.display().to_string(),
    ]));
    // Store: only what the factory image lacks is read.
    let r = install_common::json(&ok(dev.run(&[
        "install",
        "--json",
        &store.display().to_string(),
    ])));
    let artifact_len = std::fs::metadata(&a1).expect("meta").len();
    assert!(
        u(&r, "source_bytes_read") < artifact_len / 2,
        "{r} vs artifact {artifact_len}"
    );
    assert_eq!(dev.slot_hash(Slot::B, SIZE), hash(&v1));
    // The envelope read from the store is verified from the file it was stored
    // to, as the file install's is: its chunk ids went to `<hash>.ids` beside it
    // (32 bytes a chunk), not into memory, and stay with the armed deployment.
    let from_store = stored_envelope_files(&dev);

    let (dev, v1, _) = setup();
    let a1 = dev.build(&v1, "1.0", 1, None);
    let out = dev
        .cmd(&["install", "--json", "-"])
        .stdin(std::fs::File::open(&a1).expect("open"))
        .output()
        .expect("run");
    let r = install_common::json(&ok(out));
    assert_eq!(u(&r, "written_bytes"), SIZE as u64);
    assert_eq!(dev.slot_hash(Slot::B, SIZE), hash(&v1));
    // Signed with another device's keys (another envelope), the same chunks.
    assert_eq!(
        stored_envelope_files(&dev).1,
        from_store.1,
        "the same chunks' ids, stored the same way from the file install"
    );
}

/// The deployment's stored envelope and its chunk ids file (under the data
/// directory's `envelopes/`): their hash, and the ids file's length, which must
/// be a whole number of 32-byte ids.
fn stored_envelope_files(dev: &install_common::Device) -> (String, u64) {
    let mut names: Vec<(String, u64)> = std::fs::read_dir(dev.path("data/envelopes"))
        .expect("the envelope directory")
        .map(|e| {
            let e = e.expect("entry");
            let len = e.metadata().expect("meta").len();
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect();
    names.sort();
    let [(envelope, _), (ids, ids_len)] = &names[..] else {
        panic!("an envelope and its chunk ids: {names:?}");
    };
    let hash = envelope.strip_suffix(".envelope").expect("an envelope");
    assert_eq!(ids, &format!("{hash}.ids"), "{names:?}");
    assert!(*ids_len > 0 && ids_len % 32 == 0, "{names:?}");
    (hash.to_owned(), *ids_len)
}

#[test]
fn failing_health_check_rolls_back_with_its_reason() {
    let (dev, v1, _) = setup();
    let a1 = dev.build(&v1, "1.0", 1, None);
    dev.install(&a1);
    let check = dev.path("health.d/20-app");
    std::fs::write(&check, "#!/bin/sh\necho 'app is down' >&2\nexit 4\n").expect("write");
    std::fs::set_permissions(&check, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    assert_eq!(dev.reboot(), Slot::B);
    let c = boot_check(&dev);
    assert_eq!(c["result"], "rolled-back", "{c}");
    assert_eq!(
        c["reason"],
        "health check 20-app exited with status 4: app is down"
    );
    assert_eq!(
        dev.boot_state().next_boot(),
        Slot::A,
        "the bootloader goes back to A"
    );
    assert_eq!(dev.reboot(), Slot::A);
    assert_eq!(boot_check(&dev)["result"], "nothing");
    let st = dev.status();
    assert_eq!(
        (st["active"].as_str(), st["floor"].as_u64()),
        (Some("A"), Some(0))
    );
    assert_eq!(st["last"]["result"], "rolled-back");
    assert_eq!(st["last"]["version"], "1.0");
}

#[test]
fn clear_errors_for_bad_sources_and_refused_releases() {
    let (dev, v1, v2) = setup();
    let a1 = dev.build(&v1, "1.0", 1, None);

    let e = fails(dev.run(&["install", &dev.config.display().to_string()]), 1);
    assert!(e.contains("not a .shoal artifact"), "{e}");

    let toaster = dev.build_as(&v1, "1.0", 1, None, "toaster", &dev.key);
    let e = fails(dev.run(&["install", &toaster.display().to_string()]), 1);
    assert!(
        e.contains(r#"release is for device types ["toaster"], this device is "board""#),
        "{e}"
    );
    // A refused release's manifest is not kept (the device keeps its slots').
    let kept = dev.path("data").join("manifests");
    let kept_files = std::fs::read_dir(&kept)
        .map(|d| d.count())
        .unwrap_or_default();
    assert_eq!(kept_files, 0, "{}", kept.display());

    let other = dev.path("other.pem");
    ok(shoal_tests::shoal()
        .args(["key", "generate", "--out"])
        .arg(&other)
        .output()
        .expect("run"));
    let forged = dev.build_as(&v1, "1.0", 1, None, "board", &other);
    let e = fails(dev.run(&["install", &forged.display().to_string()]), 1);
    // Counted by key id before the envelope is read (issue 9).
    assert!(
        e.contains("is signed by 0 of the trust root's release keys; it needs 1"),
        "{e}"
    );

    // A thin artifact whose base the device does not run: refused from its contents
    // member before a byte of the inactive slot is written.
    let a2_thin = dev.build(&v2, "2.0", 2, Some(&a1));
    let inspected = install_common::json(&ok(dev.run(&[
        "artifact",
        "diff",
        &a1.display().to_string(),
        &a2_thin.display().to_string(),
        "--json",
    ])));
    let slot_b = std::fs::read(dev.path("b.img")).expect("slot B");
    let e = fails(dev.run(&["install", &a2_thin.display().to_string()]), 1);
    assert!(
        e.contains("leaves out the chunks of base release acme-os 1.0"),
        "{e}"
    );
    // The device runs the factory image, which lacks the base's chunks: it misses
    // exactly the chunks of v2 that the thin artifact leaves out, minus those the
    // factory image happens to share.
    let missing: u64 = e
        .split(" chunk(s) (")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no chunk count in {e}"));
    let left_out = u(&inspected, "chunks_distinct") - u(&inspected, "chunks_needed");
    assert!(
        missing > 0 && missing <= left_out,
        "{missing} of {left_out}: {e}"
    );
    assert!(e.contains("are missing"), "{e}");
    assert_eq!(dev.boot_state().next_boot(), Slot::A, "nothing armed");
    assert!(
        std::fs::read(dev.path("b.img")).expect("slot B") == slot_b,
        "the inactive slot was not written"
    );
    // The full artifact of the same release then installs.
    let a2 = dev.build(&v2, "2.0", 2, None);
    let r = dev.install(&a2);
    assert_eq!(u(&r, "resumed_bytes"), 0, "{r}");
    // From a file, the chunks the running slot already has are skipped, not read.
    let file_len = std::fs::metadata(&a2).expect("artifact").len();
    assert!(u(&r, "source_bytes_read") < file_len / 2, "{file_len}: {r}");
    assert_eq!(u(&r, "written_bytes"), SIZE as u64);
    assert_eq!(dev.slot_hash(Slot::B, SIZE), hash(&v2));

    // Nothing was armed by the failures.
    assert_eq!(dev.status()["deployment"]["phase"], "trial-armed");
}

#[test]
fn slot_too_small_disk_write_error_and_config_errors() {
    let (dev, v1, _) = setup();
    let a1 = dev.build(&v1, "1.0", 1, None);

    dev.write_config_with_b(&dev.path("b.img"), Some(SIZE as u64 - 1), "");
    let e = fails(dev.run(&["install", &a1.display().to_string()]), 1);
    assert!(
        e.contains(&format!(
            "the image is {SIZE} bytes but slot B holds only {} bytes",
            SIZE - 1
        )),
        "{e}"
    );

    // Slot B on a device that refuses every write.
    dev.write_config_with_b(std::path::Path::new("/dev/full"), Some(SLOT), "");
    let e = fails(dev.run(&["install", &a1.display().to_string()]), 1);
    assert!(e.contains("writing the slot failed"), "{e}");
    assert!(e.contains("No space left on device"), "{e}");

    dev.write_config("\n[install]\njournal_batch_mb = 4\n");
    let e = fails(dev.run(&["status"]), 2);
    assert!(e.contains("unknown field `journal_batch_mb`"), "{e}");
    dev.write_config("\n[install]\njournal_batch_mib = 0\n");
    let e = fails(dev.run(&["install", &a1.display().to_string()]), 2);
    assert!(
        e.contains("install.journal_batch_mib must be between 1 and 1024"),
        "{e}"
    );
    let e = fails(
        dev.cmd(&["status"])
            .env("SHOAL_CONFIG", dev.path("missing.toml"))
            .output()
            .expect("run"),
        2,
    );
    assert!(e.contains("cannot read the device configuration"), "{e}");
}

#[test]
fn anti_rollback_floor_refuses_older_releases_after_commit() {
    let (dev, v1, v2) = setup();
    let a2 = dev.build(&v2, "2.0", 5, None);
    let a1 = dev.build(&v1, "1.0", 4, None);
    dev.install(&a2);
    assert_eq!(dev.reboot(), Slot::B);
    assert_eq!(boot_check(&dev)["result"], "committed");
    let e = fails(dev.run(&["install", &a1.display().to_string()]), 1);
    assert!(
        e.contains("release security counter 4 is below the device's anti-rollback floor 5"),
        "{e}"
    );
}

/// A running slot of unrelated data, larger than the index's sample (64 MiB): the
/// install of a full artifact stops cutting it after the sample (nothing of the
/// release found), takes every chunk from the artifact and writes the release
/// byte for byte. The cut that stopped is no index of the slot: the next install
/// (another release, offered while the first is armed) cuts the slot again, and
/// stops again.
#[test]
fn an_unrelated_running_slot_is_cut_only_as_far_as_its_sample() {
    const BIG: usize = 80 * MIB;
    let dev = Device::new(&image(21, BIG), BIG as u64);
    let logged = |artifact: &std::path::Path| {
        let out = dev
            .cmd(&["install", "--json", &artifact.display().to_string()])
            .env("SHOAL_LOG", "shoal=info")
            .output()
            .expect("run");
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        (install_common::json(&ok(out)), log)
    };
    for (k, seed) in [(1u64, 22u64), (2, 23)] {
        let v = image(seed, SIZE);
        let a = dev.build(&v, &format!("{k}.0"), k, None);
        let (r, log) = logged(&a);
        assert!(
            log.contains("indexing slot A"),
            "run {k} cuts the slot: {log}"
        );
        let stopped = log
            .lines()
            .find(|l| l.contains("stopped indexing slot A after"))
            .unwrap_or_else(|| panic!("run {k}: the cut stops: {log}"));
        let cut: u64 = stopped
            .split("after ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .expect("bytes cut");
        assert!(
            (64 * MIB as u64..72 * MIB as u64).contains(&cut),
            "run {k} stopped at {cut}"
        );
        // The driver's own stop (`Output::StopIndex` carried out): its cut ended
        // there, and nothing of it was recorded as an index of the slot.
        assert!(
            log.contains("stopped indexing the active slot"),
            "run {k}: the driver stops its cut: {log}"
        );
        assert!(
            !log.contains("indexed the active slot"),
            "run {k}: no index of the slot recorded: {log}"
        );
        // The zero chunk only (at each of its positions), found in the slot's zero runs.
        assert!(u(&r, "reused_bytes") < (SIZE / 4) as u64, "{r}");
        assert_eq!(u(&r, "reused_bytes") + u(&r, "fetched_bytes"), SIZE as u64);
        assert_eq!(u(&r, "written_bytes"), SIZE as u64, "{r}");
        assert_eq!(
            dev.slot_hash(Slot::B, SIZE),
            hash(&v),
            "run {k}: slot B holds it"
        );
    }
}

/// A full artifact with a corrupt chunk, on a running slot of unrelated data
/// larger than the index's sample (64 MiB): the cut stops after the sample, and
/// the corrupt chunk (read after the stop) fails the install at once, exit 1,
/// naming it, nothing armed: the rest of the slot is not cut for the chunks still
/// needed (the artifact reader reports the corruption as a fault of its source,
/// which stops the install; had the engine only banned the source, no source is
/// left and it does not resume the cut either: `index_tests`).
#[test]
fn a_corrupt_artifact_on_an_unrelated_slot_fails_without_resuming_the_cut() {
    const BIG: usize = 80 * MIB;
    let dev = Device::new(&image(31, BIG), BIG as u64);
    let a = dev.build(&image(32, SIZE), "1.0", 1, None);
    // Flip a byte in the last quarter of the packs (chunk data, not a header).
    let mut bytes = std::fs::read(&a).expect("artifact");
    let at = bytes.len() * 3 / 4;
    bytes[at] ^= 0x55;
    let bad = dev.path("bad.shoal");
    std::fs::write(&bad, &bytes).expect("write");
    let out = dev
        .cmd(&["install", &bad.display().to_string()])
        .env("SHOAL_LOG", "shoal=info")
        .output()
        .expect("run");
    let log = fails(out, 1);
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "shoal: installing {}: install stopped: ",
            bad.display()
        )) && last.contains("is corrupt")
            && !last.contains("resume"),
        "{log}"
    );
    assert!(
        log.contains("stopped indexing slot A after"),
        "the first cut stops: {log}"
    );
    assert!(
        !log.contains("cutting the rest of the active slot")
            && !log.contains("cut the rest of the active slot"),
        "the cut did not resume: {log}"
    );
    let state = dev.boot_state();
    assert_eq!(state.trial, None, "no trial armed: {state:?}");
    assert_eq!(state.committed, Slot::A);
}

/// `shoal install --store DIR` picks among the store's releases from their signed
/// manifests' fields, each read without its chunk list: the newest (highest
/// security counter) for this device type, a thin release whose base the store
/// holds included; `--release` names another; a store with nothing for this
/// device, or two different releases tied on the counter, is refused naming them.
#[test]
fn a_chunk_store_install_picks_the_newest_compatible_release() {
    let (dev, v1, v2) = setup();
    let a1 = dev.build(&v1, "1.0", 1, None);
    let a2_thin = dev.build(&v2, "2.0", 2, Some(&a1));
    let v3 = modify(&v2, 4, 2, 100_000);
    let toaster = dev.build_as(&v3, "3.0", 3, None, "toaster", &dev.key);
    let root = dev.root.display().to_string();
    let add = |store: &std::path::Path, a: &std::path::Path| {
        ok(dev.run(&[
            "store",
            "add",
            &store.display().to_string(),
            &a.display().to_string(),
            "--root",
            &root,
        ]));
    };
    let store = dev.path("store");
    for a in [&a1, &a2_thin, &toaster] {
        add(&store, a);
    }
    let store_arg = store.display().to_string();
    let r = install_common::json(&ok(dev.run(&["install", "--json", &store_arg])));
    assert_eq!(r["slot"], "B", "{r}");
    assert_eq!(
        dev.slot_hash(Slot::B, SIZE),
        hash(&v2),
        "slot B holds 2.0: {r}"
    );
    assert_eq!(dev.status()["slots"]["B"]["version"], "2.0");
    // Named: the older one.
    ok(dev.run(&["rollback"]));
    let r = install_common::json(&ok(dev.run(&[
        "install",
        "--json",
        &store_arg,
        "--release",
        "acme-os@1.0",
    ])));
    assert_eq!(
        dev.slot_hash(Slot::B, SIZE),
        hash(&v1),
        "slot B holds 1.0: {r}"
    );
    assert_eq!(dev.status()["slots"]["B"]["version"], "1.0");
    ok(dev.run(&["rollback"]));

    // Nothing for this device.
    let other = dev.path("store-toaster");
    add(&other, &toaster);
    let e = fails(dev.run(&["install", &other.display().to_string()]), 1);
    assert!(
        e.contains(r#"holds no compatible release (this device is "board")"#),
        "{e}"
    );
    // Two different releases on the highest counter: not guessed.
    let tied = dev.path("store-tied");
    let a2b = dev.build(&v3, "2.0-hotfix", 2, None);
    let a2 = dev.build(&v2, "2.0", 2, None);
    add(&tied, &a2);
    add(&tied, &a2b);
    let e = fails(dev.run(&["install", &tied.display().to_string()]), 1);
    assert!(
        e.contains("several releases (acme-os@2.0, acme-os@2.0-hotfix)"),
        "{e}"
    );
    // Two different images under one name and version, on one counter: told
    // apart by the hashes of their signed manifests (their fields are the same
    // but for the chunk lists, which the pick does not read), not guessed.
    let same = dev.path("store-same-version");
    add(&same, &a2);
    // (Built to the same file name: added after the first is in the store.)
    let v2b = modify(&v2, 9, 3, 50_000);
    let a2c = dev.build(&v2b, "2.0", 2, None);
    add(&same, &a2c);
    let e = fails(dev.run(&["install", &same.display().to_string()]), 1);
    assert!(
        e.contains("several releases (acme-os@2.0); pick one with --release NAME@VERSION"),
        "{e}"
    );
    assert_eq!(dev.boot_state().next_boot(), Slot::A, "nothing armed");
}
