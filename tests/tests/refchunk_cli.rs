//! Delta-encoded chunks (issue 12) through the real binary: `shoal artifact build
//! --base --base-image` makes a thin artifact whose changed chunks are compressed
//! against bytes of the base release; `shoal install` on a device running the base
//! decodes them with bytes of its running slot, checked by hash; an interrupted
//! install resumes; a running slot whose reference bytes differ is refused with a
//! clear error and nothing wrong is written. The manifest of such an artifact
//! travels as a delta against the base's manifest, which the device keeps: rebuilt,
//! verified whole, refused with a clear error on a device that does not hold it.

mod install_common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use install_common::{Device, fails, hash, image, ok, u};
use shoal_bootctl::Slot;
use shoal_tests::shoal;

const MIB: usize = 1024 * 1024;
const SIZE: usize = 8 * MIB;
const SLOT: u64 = 10 * MIB as u64;
/// One small edit every this many bytes: a few hundred changed chunks, each a small
/// edit of a chunk the device has (a rebuilt package, a grown file).
const EDIT_EVERY: usize = 24 * 1024;

/// v2: v1 with a few bytes rewritten every [`EDIT_EVERY`] bytes, and the offsets
/// of those edits.
fn edited(v1: &[u8]) -> (Vec<u8>, Vec<usize>) {
    let mut v2 = v1.to_vec();
    let mut at = Vec::new();
    let mut i = 5000;
    while i + 8 < v2.len() {
        v2[i..i + 8].copy_from_slice(&(i as u64).to_le_bytes());
        at.push(i);
        i += EDIT_EVERY;
    }
    (v2, at)
}

/// `shoal artifact build` of `image`, thin against `base` (with its image when
/// `base_image` is given).
fn build(
    dev: &Device,
    image: &[u8],
    version: &str,
    base: Option<(&Path, Option<&Path>)>,
) -> PathBuf {
    let img = dev.path(&format!("build-{version}.img"));
    std::fs::write(&img, image).expect("image");
    let suffix = match base {
        None => "full",
        Some((_, None)) => "thin",
        Some((_, Some(_))) => "delta",
    };
    let out = dev.path(&format!("acme-os-{version}-{suffix}.shoal"));
    let mut cmd = shoal();
    cmd.args(["--quiet", "artifact", "build", "--image"])
        .arg(&img)
        .args(["--name", "acme-os", "--version", version])
        .args(["--device-type", "board", "--security-counter", "1"])
        .arg("--key")
        .arg(&dev.key)
        .arg("--out")
        .arg(&out);
    if let Some((b, bi)) = base {
        cmd.arg("--base").arg(b);
        if let Some(bi) = bi {
            cmd.arg("--base-image").arg(bi);
        }
    }
    ok(cmd.output().expect("run"));
    out
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).expect("artifact").len()
}

/// The signed manifest envelope an artifact carries, whole (its first member).
fn envelope_of(artifact: &Path) -> (String, Vec<u8>) {
    let r = shoal_artifact::ArtifactReader::open_unverified(std::io::BufReader::new(
        std::fs::File::open(artifact).expect("artifact"),
    ))
    .expect("artifact");
    (hex::encode(r.manifest().hash()), r.envelope().to_bytes())
}

/// Puts v1's signed manifest (and its dictionary, when it has one) where the
/// device keeps the manifests of its releases, as a factory image that ships them
/// does.
fn ship_manifest(dev: &Device, artifact: &Path) -> PathBuf {
    let (hash, envelope) = envelope_of(artifact);
    let dir = dev.path("data").join("manifests");
    std::fs::create_dir_all(&dir).expect("manifests dir");
    let path = dir.join(format!("{hash}.envelope"));
    std::fs::write(&path, envelope).expect("kept manifest");
    if let (Some(d), _) = dictionaries(artifact) {
        std::fs::write(dir.join(format!("{hash}.dictionary")), d.bytes()).expect("dictionary");
    }
    path
}

/// The first member's path and size of an artifact.
fn first_member(artifact: &Path) -> (String, u64) {
    let bytes = std::fs::read(artifact).expect("artifact");
    let name = &bytes[..100];
    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(100)];
    let size = std::str::from_utf8(&bytes[124..136]).expect("size field");
    let size = u64::from_str_radix(size.trim_matches(|c: char| c == '\0' || c == ' '), 8)
        .expect("octal size");
    (String::from_utf8(name.to_vec()).expect("name"), size)
}

/// A device running v1 in slot A (as shipped, no Shoal record, v1's signed manifest
/// in its data directory), with the three artifacts: v1 full, v2 thin (plain) and
/// v2 thin delta-encoded.
struct Setup {
    dev: Device,
    v1: Vec<u8>,
    v2: Vec<u8>,
    edits: Vec<usize>,
    plain: PathBuf,
    delta: PathBuf,
}

fn setup() -> Setup {
    let v1 = image(11, SIZE);
    let (v2, edits) = edited(&v1);
    let dev = Device::new(&v1, SLOT);
    let v1_img = dev.path("v1.img");
    std::fs::write(&v1_img, &v1).expect("v1 image");
    let a1 = build(&dev, &v1, "1.0", None);
    ship_manifest(&dev, &a1);
    let plain = build(&dev, &v2, "2.0", Some((&a1, None)));
    let delta = build(&dev, &v2, "2.0", Some((&a1, Some(&v1_img))));
    Setup {
        dev,
        v1,
        v2,
        edits,
        plain,
        delta,
    }
}

#[test]
fn delta_artifact_is_small_installs_from_the_running_slot_and_resumes() {
    let s = setup();
    let dev = &s.dev;
    // Journal every MiB written, so a cut stream leaves journaled progress.
    dev.write_config("[install]\njournal_batch_mib = 1\n");
    // The edits touch a few hundred random-looking chunks: stored plain they cost
    // about their whole size; against v1's bytes, a few bytes each.
    let (plain, delta) = (len(&s.plain), len(&s.delta));
    assert!(
        delta * 4 < plain,
        "delta-encoded thin artifact {delta} bytes vs plain thin {plain}"
    );
    // The manifest says so (format 2, references) and `verify` without the base
    // names what it lacks rather than passing.
    let inspect = install_common::json(&ok(dev.run(&[
        "artifact",
        "inspect",
        "--json",
        "--chunks",
        "--base",
        &dev.path("acme-os-1.0-full.shoal").display().to_string(),
        &s.delta.display().to_string(),
    ])));
    assert_eq!(inspect["format_version"], 2, "{inspect}");
    // With `--chunks`, the references too: ranges of the base payload, and the
    // positions of the chunks decoded with them.
    let payload = &inspect["payloads"][0];
    let chunks = payload["chunk_list"].as_array().expect("chunk_list").len();
    let refs = payload["reference_list"]
        .as_array()
        .expect("reference_list");
    assert!(!refs.is_empty(), "{payload}");
    for r in refs {
        assert_eq!(r["hash"].as_str().expect("hash").len(), 64, "{r}");
        for range in r["ranges"].as_array().expect("ranges") {
            let n64 = |v: &serde_json::Value| v.as_u64().expect("a number");
            let (offset, n) = (n64(&range[0]), n64(&range[1]));
            assert!(n > 0 && offset + n <= SIZE as u64, "{r}");
        }
        let at = r["chunks"].as_array().expect("chunks");
        assert!(
            !at.is_empty()
                && at
                    .iter()
                    .all(|p| p.as_u64().is_some_and(|p| (p as usize) < chunks)),
            "{r}"
        );
    }

    // Interrupted: the install is killed (a power cut) while it waits for the
    // artifact's last kilobyte (its end-of-archive blocks), which it is never given
    // (a pipe on its standard input): it cannot finish first, however fast the
    // machine. It is killed after a growing delay until the journal records
    // verified progress.
    let bytes = std::fs::read(&s.delta).expect("the delta artifact");
    let mut journaled = 0;
    for wait_ms in [300u64, 1000, 3000, 9000] {
        let mut child = dev
            .cmd(&["install", "--json", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut stdin = child.stdin.take().expect("stdin");
        std::io::Write::write_all(&mut stdin, &bytes[..bytes.len() - 1024])
            .expect("the install reads the artifact but its end");
        std::thread::sleep(std::time::Duration::from_millis(wait_ms));
        let running = child.try_wait().expect("wait").is_none();
        let _ = child.kill();
        let _ = child.wait();
        drop(stdin);
        assert!(running, "the install ended without the end of its artifact");
        let st = dev.status();
        if st["deployment"]["phase"] == "fetching" {
            journaled = u(&st["deployment"], "journal_bytes");
            if journaled > 0 {
                break;
            }
        }
    }
    assert!(journaled > 0, "no kill left journaled progress");

    // The rerun resumes: nothing journaled is written again; slot B is v2.
    let r = dev.install(&s.delta);
    assert_eq!(r["slot"], "B");
    assert!(u(&r, "resumed_bytes") >= journaled, "{r}");
    assert_eq!(
        u(&r, "resumed_bytes") + u(&r, "written_bytes"),
        SIZE as u64,
        "{r}"
    );
    assert!(
        u(&r, "source_bytes_read") <= delta,
        "read at most the artifact: {r}"
    );
    assert_eq!(dev.slot_hash(Slot::B, SIZE), hash(&s.v2), "slot B holds v2");
    assert_eq!(dev.boot_state().next_boot(), Slot::B, "trial armed");
}

#[test]
fn a_running_slot_whose_reference_bytes_differ_is_refused_and_nothing_is_armed() {
    let s = setup();
    let dev = &s.dev;
    // Slot A differs from v1 where v2 changed it (a chunk v2 does not need, but
    // the bytes the changed chunks are encoded against).
    let mut a = std::fs::read(dev.path("a.img")).expect("slot A");
    let at = s.edits[s.edits.len() / 2];
    a[at + 1] ^= 0x55;
    std::fs::write(dev.path("a.img"), &a).expect("slot A");
    let err = fails(dev.run(&["install", &s.delta.display().to_string()]), 1);
    assert!(
        err.contains("fail their hash")
            && err.contains("does not hold the base release acme-os 1.0")
            && err.contains("install a full artifact"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    // Nothing armed; whatever was written is verified chunks of v2 at their place,
    // never bytes decoded from the wrong reference.
    assert_eq!(dev.boot_state().next_boot(), Slot::A);
    let b = std::fs::read(dev.path("b.img")).expect("slot B");
    for (i, (x, y)) in b[..SIZE].iter().zip(&s.v2).enumerate() {
        assert!(
            *x == 0 || x == y,
            "slot B byte {i} is neither unwritten nor v2's"
        );
    }
    // `diff` of a delta-encoded artifact against another release than its base is
    // refused (its chunks decode only against their base's bytes).
    let err = fails(
        dev.run(&[
            "artifact",
            "diff",
            &s.plain.display().to_string(),
            &s.delta.display().to_string(),
        ]),
        2,
    );
    assert!(
        err.contains("is encoded against another release")
            || err.contains("is a delta against another release"),
        "{err}"
    );
    // The plain thin artifact does not need those bytes: it installs.
    let r = dev.install(&s.plain);
    assert_eq!(dev.slot_hash(Slot::B, SIZE), hash(&s.v2), "{r}");
    assert!(!s.v1.is_empty());
}

/// The chunks of the slot's index, from the `indexed the active slot` log line of
/// an install run with `SHOAL_LOG=info`.
fn indexed_chunks(stderr: &str) -> usize {
    let line = stderr
        .lines()
        .find(|l| l.contains("indexed the active slot"))
        .unwrap_or_else(|| panic!("no index logged:\n{stderr}"));
    let n = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("chunks="))
        .unwrap_or_else(|| panic!("no count: {line}"));
    n.parse().unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// A thin install on a running slot that holds its base where the kept manifest
/// says does not read the whole slot: nothing is taken while the slot is indexed
/// (the release is refused untouched if a chunk is missing), so only the chunks the
/// new release needs are read and hashed, where the base puts them, and the slot's
/// index lists those (each distinct chunk once), not every chunk of v1.
#[test]
fn a_thin_install_checks_only_the_chunks_it_needs_from_the_running_slot() {
    let s = setup();
    let dev = &s.dev;
    let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
    let ids = |image: &[u8]| -> std::collections::BTreeSet<shoal_artifact::ChunkId> {
        shoal_artifact::chunk::index(image, chunking)
            .expect("cut")
            .into_iter()
            .map(|c| c.1)
            .collect()
    };
    let (v1_ids, v2_ids) = (ids(&s.v1), ids(&s.v2));
    let shared = v1_ids.intersection(&v2_ids).count();
    assert!(
        shared > 10 && shared * 2 < v1_ids.len(),
        "{shared} of {}",
        v1_ids.len()
    );
    let out = dev
        .cmd(&["install", "--json", &s.plain.display().to_string()])
        .env("SHOAL_LOG", "info")
        .output()
        .expect("running shoal");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let r = install_common::json(&ok(out));
    assert_eq!(r["slot"], "B", "{r}");
    assert_eq!(dev.slot_hash(Slot::B, SIZE), hash(&s.v2), "slot B holds v2");
    assert_eq!(indexed_chunks(&stderr), shared, "{stderr}");
    assert!(stderr.contains("partial=true"), "{stderr}");
}

/// The chunks of v1 a thin v2 install needs from the running slot, where v1 puts
/// them: the first position of each chunk of v1 that v2 has, in slot order
/// (`(offset, id, length)`), as the install's check lists them.
fn needed_along(s: &Setup) -> Vec<(u64, shoal_artifact::ChunkId, u32)> {
    let chunking = shoal_artifact::chunk::CHUNKING_DEFAULT;
    let v2: std::collections::HashSet<_> = shoal_artifact::chunk::index(&s.v2[..], chunking)
        .expect("cut v2")
        .into_iter()
        .map(|c| c.1)
        .collect();
    let mut seen = std::collections::HashSet::new();
    shoal_artifact::chunk::index(&s.v1[..], chunking)
        .expect("cut v1")
        .into_iter()
        .filter(|c| v2.contains(&c.1) && seen.insert(c.1))
        .collect()
}

/// Chunks a thin install reads from the running slot before it writes anything
/// (`ALONG_SAMPLE` in `node/src/device/mod.rs`), picked from the chunks it needs by
/// [`shoal_artifact::chunk::sample_positions`]. The install's log says it
/// (`sampled=64`): the test checks the binary agrees.
const ALONG_SAMPLE: shoal_artifact::chunk::Sample = shoal_artifact::chunk::Sample::new(64);

/// The needed chunks of [`needed_along`] the install's check does not read (all
/// but [`ALONG_SAMPLE`] of them, spread evenly), nearest the middle first.
fn unsampled_near_the_middle(n: usize) -> Vec<usize> {
    assert!(n > ALONG_SAMPLE.get(), "{n} chunks needed from slot A");
    let sampled: Vec<usize> = shoal_artifact::chunk::sample_positions(n, ALONG_SAMPLE).collect();
    let mut unsampled: Vec<usize> = (1..n).filter(|i| !sampled.contains(i)).collect();
    unsampled.sort_by_key(|&i| i.abs_diff(n / 2));
    unsampled
}

/// Slot B holds nothing but v2's bytes (or zeros, unwritten) over the payload.
fn b_holds_only_v2(dev: &Device, v2: &[u8]) -> Vec<u8> {
    let b = std::fs::read(dev.path("b.img")).expect("slot B");
    for (j, (x, y)) in b[..SIZE].iter().zip(v2).enumerate() {
        assert!(
            *x == 0 || x == y,
            "slot B byte {j} is neither unwritten nor v2's"
        );
    }
    b
}

/// A thin install reads only a sample of the chunks it needs from the running slot
/// before writing; the others are hashed as they are copied. A slot that holds the
/// base but differs in a chunk the sample did not read (here one near the middle,
/// changed in place and found nowhere else): when the copy reaches it, the engine
/// has the whole slot cut by content (no source holds the chunk), which does not
/// find it either, and the install fails as any thin install missing its base's
/// chunks does: exit 1, one line, nothing armed, slot A untouched, slot B partly
/// written with v2's bytes only. A rerun samples, resumes the journal and fails the
/// same way, writing nothing wrong; a full artifact installs.
#[test]
fn a_running_slot_that_differs_outside_the_sample_is_cut_by_content_then_refused() {
    let s = setup();
    let dev = &s.dev;
    let needed = needed_along(&s);
    let i = unsampled_near_the_middle(needed.len())[0];
    let (at, _, size) = needed[i];
    let mut a = std::fs::read(dev.path("a.img")).expect("slot A");
    a[at as usize + size as usize / 2] ^= 0x5a;
    std::fs::write(dev.path("a.img"), &a).expect("slot A");
    let path = s.plain.display().to_string();
    let out = dev
        .cmd(&["install", &path])
        .env("SHOAL_LOG", "info")
        .output()
        .expect("running shoal");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("cutting the slot by content")
            && log.contains(&format!("sampled={}", ALONG_SAMPLE.get())),
        "{log}"
    );
    let err = log.lines().last().expect("an error line").to_owned();
    assert!(
        err.contains("leaves out the chunks of base release acme-os 1.0")
            && err.contains("are missing"),
        "{err}"
    );
    assert_eq!(dev.boot_state().next_boot(), Slot::A, "nothing armed");
    assert!(
        std::fs::read(dev.path("a.img")).expect("slot A") == a,
        "slot A untouched"
    );
    let b = b_holds_only_v2(dev, &s.v2);
    // Chunks before the changed one were copied before it was found.
    let (first, _, n) = needed[0];
    let first = first as usize..first as usize + n as usize;
    assert_eq!(
        b[first.clone()],
        s.v2[first],
        "v2's first needed chunk written"
    );
    // The rerun fails the same way; what was written stays v2's.
    let again = fails(dev.run(&["install", &path]), 1);
    assert_eq!(again.trim(), err.trim());
    assert_eq!(dev.boot_state().next_boot(), Slot::A, "nothing armed");
    b_holds_only_v2(dev, &s.v2);
    // A full artifact does not need slot A's bytes: it installs.
    let full = build(dev, &s.v2, "2.1", None);
    let r = dev.install(&full);
    assert_eq!(r["slot"], "B", "{r}");
    assert_eq!(dev.slot_hash(Slot::B, SIZE), hash(&s.v2), "slot B holds v2");
}

/// The same slot (an unsampled needed chunk near the middle changed in place) with
/// the delta-encoded artifact: its chunks are encoded against blocks of slot A that
/// cover the changed chunk, and a reference block is hashed before anything is
/// decoded from it, so the install fails there, as for any changed reference
/// byte: one line naming the reference bytes, exit 1, nothing armed, slot A
/// untouched, slot B holding only v2's bytes.
#[test]
fn a_delta_install_on_a_slot_that_differs_outside_the_sample_is_refused_by_its_references() {
    let s = setup();
    let dev = &s.dev;
    let needed = needed_along(&s);
    let i = unsampled_near_the_middle(needed.len())[0];
    let (at, _, size) = needed[i];
    let mut a = std::fs::read(dev.path("a.img")).expect("slot A");
    a[at as usize + size as usize / 2] ^= 0x5a;
    std::fs::write(dev.path("a.img"), &a).expect("slot A");
    let err = fails(dev.run(&["install", &s.delta.display().to_string()]), 1);
    assert!(
        err.contains("of the running slot A fail their hash")
            && err.contains("does not hold the base release acme-os 1.0"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_eq!(dev.boot_state().next_boot(), Slot::A, "nothing armed");
    assert!(
        std::fs::read(dev.path("a.img")).expect("slot A") == a,
        "slot A untouched"
    );
    b_holds_only_v2(dev, &s.v2);
}

/// A reference that fails its hash in one of the batches read ahead when the
/// archive turns out truncated: the stream reads up to 3 batches ahead of the
/// decoding, and an archive failure drops them, but the failing reference of an
/// earlier chunk is what the install reports (errors come in artifact order), and
/// nothing is armed.
#[test]
fn a_bad_reference_read_ahead_of_a_truncated_end_is_reported_first() {
    let s = setup();
    let dev = &s.dev;
    // Near the end of the image: a reference of one of the batches read ahead
    // when the cut end is read (with the batches ahead not checked, the install
    // says the artifact is truncated: seen). This rests on the fixture's sizes
    // (8 MiB, an edit every 24 KiB) and the stream's batch sizes: 8 edits from the
    // end lie within the 3 batches read ahead; an earlier edit's reference fails
    // on the ordinary decoding path instead (edit len - 20 did, seen).
    let mut a = std::fs::read(dev.path("a.img")).expect("slot A");
    let at = s.edits[s.edits.len() - 8];
    a[at + 1] ^= 0x55;
    std::fs::write(dev.path("a.img"), &a).expect("slot A");
    let pristine = std::fs::read(&s.delta).expect("artifact");
    let cut = dev.path("cut.shoal");
    std::fs::write(&cut, &pristine[..pristine.len() - 1024]).expect("artifact");
    let err = fails(dev.run(&["install", &cut.display().to_string()]), 1);
    assert!(
        err.contains("fail their hash")
            && err.contains("does not hold the base release acme-os 1.0"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_eq!(dev.boot_state().next_boot(), Slot::A, "nothing armed");
    b_holds_only_v2(dev, &s.v2);
}

/// A running slot that holds another release than the base its kept manifest names
/// fails the install's sampled check at its first chunk and is cut by content: the
/// chunks the thin artifact leaves out are not there, and the install is refused
/// before anything is written.
#[test]
fn a_running_slot_holding_another_release_is_refused_untouched() {
    let s = setup();
    let dev = &s.dev;
    let mut other = image(99, SIZE);
    other.resize(SLOT as usize, 0);
    std::fs::write(dev.path("a.img"), &other).expect("slot A");
    let b_before = std::fs::read(dev.path("b.img")).expect("slot B");
    let err = fails(dev.run(&["install", &s.plain.display().to_string()]), 1);
    assert!(
        err.contains("leaves out the chunks of base release acme-os 1.0")
            && err.contains("are missing"),
        "{err}"
    );
    assert_eq!(dev.boot_state().next_boot(), Slot::A, "nothing armed");
    assert!(
        std::fs::read(dev.path("b.img")).expect("slot B") == b_before,
        "slot B untouched"
    );
    assert!(
        std::fs::read(dev.path("a.img")).expect("slot A") == other,
        "slot A untouched"
    );
}

/// The running slot is indexed along the chunk list of the release it should hold
/// (the kept base manifest) rather than cut by content again; a slot that holds
/// that release's chunks elsewhere (here one chunk written twice a third of the
/// way in, shifting every chunk after it) fails that comparison and is cut by
/// content, which finds every chunk: the plain thin artifact installs from it.
/// Indexed only along the manifest, the chunks past the shift would be missed and
/// the install refused.
#[test]
fn a_running_slot_holding_the_base_elsewhere_is_indexed_by_content() {
    let s = setup();
    let dev = &s.dev;
    let cuts = shoal_artifact::chunk::index(&s.v1[..], shoal_artifact::chunk::CHUNKING_DEFAULT)
        .expect("cut v1");
    let (start, _, n) = cuts[cuts.len() / 3];
    let (start, end) = (start as usize, start as usize + n as usize);
    let mut a = s.v1[..end].to_vec();
    a.extend_from_slice(&s.v1[start..end]);
    a.extend_from_slice(&s.v1[end..]);
    a.resize(SLOT as usize, 0);
    std::fs::write(dev.path("a.img"), &a).expect("slot A");
    let r = dev.install(&s.plain);
    assert_eq!(r["slot"], "B", "{r}");
    assert!(u(&r, "reused_bytes") > 0, "reused from slot A: {r}");
    assert_eq!(dev.slot_hash(Slot::B, SIZE), hash(&s.v2), "slot B holds v2");
}

#[test]
fn a_delta_artifact_verifies_and_extracts_given_its_base_image() {
    let s = setup();
    let dev = &s.dev;
    let run = |args: &[&str]| dev.run(args);
    let p = |x: &Path| x.display().to_string();
    let root = p(&dev.root);
    let v1_img = p(&dev.path("v1.img"));
    let a1 = p(&dev.path("acme-os-1.0-full.shoal"));
    let delta = p(&s.delta);

    // Without the base artifact, its manifest (a delta against v1's) cannot be
    // rebuilt; without the base image, verify names what is missing.
    assert_eq!(first_member(&s.delta).0, "manifest.delta");
    let err = fails(run(&["artifact", "verify", &delta, "--root", &root]), 1);
    assert!(
        err.contains("travels as a delta against manifest") && err.contains("is not at hand"),
        "{err}"
    );
    let err = fails(
        run(&["artifact", "verify", &delta, "--root", &root, "--base", &a1]),
        1,
    );
    assert!(
        err.contains("encoded against bytes of the base release"),
        "{err}"
    );
    // With both, every chunk is decoded and verified.
    let out = ok(run(&[
        "artifact",
        "verify",
        &delta,
        "--root",
        &root,
        "--base",
        &a1,
        "--base-image",
        &v1_img,
        "--json",
    ]));
    let v = install_common::json(&out);
    assert_eq!(v["ok"], true, "{v}");
    assert!(u(&v, "chunks_verified") > 100, "{v}");

    // Extract: the full v2 image, base chunks and references from v1's image.
    let out_img = dev.path("extracted-v2.img");
    ok(run(&[
        "artifact",
        "extract",
        &delta,
        "--root",
        &root,
        "--base",
        &a1,
        "--base-image",
        &v1_img,
        "--out",
        &p(&out_img),
    ]));
    assert_eq!(std::fs::read(&out_img).expect("extracted"), s.v2);

    // Another image than the base: refused by the reference's hash, nothing left.
    let mut wrong = s.v1.clone();
    for b in wrong.iter_mut() {
        *b ^= 0x33;
    }
    let wrong_img = dev.path("wrong.img");
    std::fs::write(&wrong_img, &wrong).expect("wrong image");
    let err = fails(
        run(&[
            "artifact",
            "verify",
            &delta,
            "--root",
            &root,
            "--base",
            &a1,
            "--base-image",
            &p(&wrong_img),
        ]),
        1,
    );
    assert!(
        err.contains("the reference bytes are not the base release's"),
        "{err}"
    );
    let out2 = dev.path("extracted-wrong.img");
    let err = fails(
        run(&[
            "artifact",
            "extract",
            &delta,
            "--root",
            &root,
            "--base",
            &a1,
            "--base-image",
            &p(&wrong_img),
            "--out",
            &p(&out2),
        ]),
        1,
    );
    assert!(
        err.contains("is not the base release's payload")
            || err.contains("the reference bytes are not the base release's"),
        "{err}"
    );
    assert!(!out2.exists(), "no partial output");
    // A base artifact that is not the delta's base is a usage error.
    let err = fails(
        run(&[
            "artifact",
            "extract",
            &delta,
            "--root",
            &root,
            "--base",
            &p(&s.plain),
            "--base-image",
            &v1_img,
            "--out",
            &p(&out2),
        ]),
        1,
    );
    assert!(
        err.contains("travels as a delta against manifest") && err.contains("is not at hand"),
        "{err}"
    );
    assert!(!out2.exists(), "no partial output");
}

/// A hotfix of v1: a few small edits, so the manifest is mostly v1's: its
/// delta-encoded thin artifact, built with the CLI (and the image).
fn hotfix(s: &Setup, full_manifest: bool) -> (Vec<u8>, PathBuf) {
    let dev = &s.dev;
    let mut v3 = s.v1.clone();
    for k in 1..6 {
        let at = k * SIZE / 6;
        v3[at..at + 8].copy_from_slice(b"hotfix!!");
    }
    let img = dev.path("build-3.0.img");
    std::fs::write(&img, &v3).expect("image");
    let out = dev.path(if full_manifest {
        "acme-os-3.0-full-manifest.shoal"
    } else {
        "acme-os-3.0-delta.shoal"
    });
    let mut cmd = shoal();
    cmd.args(["--quiet", "artifact", "build", "--image"])
        .arg(&img)
        .args(["--name", "acme-os", "--version", "3.0"])
        .args(["--device-type", "board", "--security-counter", "1"])
        .arg("--key")
        .arg(&dev.key)
        .arg("--base")
        .arg(dev.path("acme-os-1.0-full.shoal"))
        .arg("--base-image")
        .arg(dev.path("v1.img"))
        .arg("--out")
        .arg(&out);
    if full_manifest {
        cmd.arg("--full-manifest");
    }
    ok(cmd.output().expect("run"));
    (v3, out)
}

#[test]
fn the_manifest_travels_as_a_delta_against_the_kept_one_and_is_verified_whole() {
    let s = setup();
    let dev = &s.dev;
    let a1 = dev.path("acme-os-1.0-full.shoal");
    let (v3, delta) = hotfix(&s, false);
    let (_, whole) = hotfix(&s, true);
    let (path, delta_len) = first_member(&delta);
    assert_eq!(path, "manifest.delta");
    let (path, full_len) = first_member(&whole);
    assert_eq!(path, "manifest.envelope");
    assert!(
        delta_len * 4 < full_len,
        "manifest delta {delta_len} bytes vs the thin manifest's envelope {full_len}"
    );
    // `diff` counts the delta, and `inspect` shows the whole manifest, given the base.
    let d = install_common::json(&ok(dev.run(&[
        "artifact",
        "diff",
        &a1.display().to_string(),
        &delta.display().to_string(),
        "--json",
    ])));
    assert_eq!(u(&d, "manifest_bytes"), delta_len, "{d}");
    assert_eq!(u(&d, "download_bytes"), len(&delta), "{d}");
    let inspect = install_common::json(&ok(dev.run(&[
        "artifact",
        "inspect",
        "--json",
        "--base",
        &a1.display().to_string(),
        &delta.display().to_string(),
    ])));
    assert_eq!(inspect["version"], "3.0", "{inspect}");

    // Installed: the device keeps v3's manifest beside v1's (its two slots), each
    // with the dictionary its chunks use (v3 reuses v1's).
    let r = dev.install(&delta);
    assert_eq!(dev.slot_hash(Slot::B, SIZE), hash(&v3), "{r}");
    let mut kept: std::collections::BTreeSet<String> =
        std::fs::read_dir(dev.path("data").join("manifests"))
            .expect("kept manifests")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
    // The chunk ids of a kept manifest may be beside it (derived data: the
    // install read the running release's list by position from them).
    let ids: Vec<String> = kept
        .iter()
        .filter(|n| n.ends_with(".ids"))
        .cloned()
        .collect();
    for n in &ids {
        let envelope = n.replace(".ids", ".envelope");
        assert!(kept.contains(&envelope), "{n} without {envelope}");
        kept.remove(n);
    }
    let expected: std::collections::BTreeSet<String> = [&a1, &whole]
        .iter()
        .flat_map(|a| {
            let h = envelope_of(a).0;
            [format!("{h}.envelope"), format!("{h}.dictionary")]
        })
        .collect();
    assert_eq!(kept, expected);
    // Kept whole, byte for byte (LAN peers adopt a release from this file).
    for a in [&a1, &whole] {
        let (h, envelope) = envelope_of(a);
        let file = dev
            .path("data")
            .join("manifests")
            .join(format!("{h}.envelope"));
        assert!(
            std::fs::read(&file).expect("kept manifest") == envelope,
            "{} is not the release's envelope",
            file.display()
        );
    }
}

#[test]
fn a_device_without_the_base_manifest_refuses_the_delta_and_takes_a_full_manifest() {
    let s = setup();
    let dev = &s.dev;
    let (v3, delta) = hotfix(&s, false);
    assert_eq!(first_member(&delta).0, "manifest.delta");
    let kept = dev.path("data").join("manifests");
    std::fs::remove_dir_all(&kept).expect("forget v1's manifest");
    let err = fails(dev.run(&["install", &delta.display().to_string()]), 1);
    assert!(
        err.contains("travels as a delta against manifest")
            && err.contains("is not at hand")
            && err.contains("--full-manifest"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_eq!(dev.boot_state().next_boot(), Slot::A);
    assert!(
        std::fs::read(dev.path("b.img"))
            .expect("slot B")
            .iter()
            .all(|&b| b == 0),
        "nothing written"
    );

    // A kept file whose manifest is another's (renamed) is not used either.
    let a1 = dev.path("acme-os-1.0-full.shoal");
    let (v1_hash, _) = envelope_of(&a1);
    let (_, other) = envelope_of(&s.plain);
    std::fs::create_dir_all(&kept).expect("dir");
    std::fs::write(kept.join(format!("{v1_hash}.envelope")), other).expect("write");
    let err = fails(dev.run(&["install", &delta.display().to_string()]), 1);
    assert!(err.contains("is not at hand"), "{err}");
    std::fs::remove_dir_all(&kept).expect("rm");

    // `--full-manifest` makes an artifact such a device installs (given v1's
    // dictionary, which the hotfix reuses: a factory image ships it as it ships
    // the manifest).
    std::fs::create_dir_all(&kept).expect("dir");
    if let (Some(d), _) = dictionaries(&a1) {
        std::fs::write(kept.join(format!("{v1_hash}.dictionary")), d.bytes()).expect("write");
    }
    let (_, out) = hotfix(&s, true);
    assert_eq!(first_member(&out).0, "manifest.envelope");
    let r = dev.install(&out);
    assert_eq!(dev.slot_hash(Slot::B, SIZE), hash(&v3), "{r}");
}

/// Text-like bytes (words from a made-up vocabulary of `seed`) with stretches of
/// zeros: a dictionary helps its chunks, so builds train and use one.
fn words(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let vocabulary: Vec<Vec<u8>> = (0..2000)
        .map(|_| {
            let n = 4 + next() % 6;
            (0..n).map(|_| b'a' + (next() % 26) as u8).collect()
        })
        .collect();
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let r = next();
        if r % 997 == 0 {
            out.resize(out.len() + 20_000, 0);
            continue;
        }
        out.extend_from_slice(&vocabulary[(r >> 40) as usize % vocabulary.len()]);
        out.push(if r & 15 == 0 { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// The dictionary an artifact carries, and the dictionary its manifest names.
fn dictionaries(artifact: &Path) -> (Option<shoal_artifact::chunk::Dictionary>, Option<String>) {
    let mut r = shoal_artifact::ArtifactReader::open_unverified(std::io::BufReader::new(
        std::fs::File::open(artifact).expect("artifact"),
    ))
    .expect("artifact");
    let named = r.manifest().dictionary.map(|d| d.to_string());
    (r.read_dictionary().expect("members").cloned(), named)
}

#[test]
fn a_release_reuses_its_base_dictionary_which_the_device_keeps() {
    let size = 2 * MIB;
    let v1 = words(3, size);
    let (mut v2, _) = edited(&v1);
    // A little new text: its chunks are plain, compressed with a dictionary.
    let at = MIB;
    v2.splice(at..at, words(3, 32 * 1024).into_iter().rev());
    v2.truncate(size);
    let dev = Device::new(&v1, SLOT);
    let v1_img = dev.path("v1.img");
    std::fs::write(&v1_img, &v1).expect("v1 image");
    let a1 = build(&dev, &v1, "1.0", None);
    let (v1_dict, _) = dictionaries(&a1);
    let v1_dict = v1_dict.expect("the full v1 build trains a dictionary");
    // With its manifest whole (`--full-manifest`), so the test reads it alone.
    let v2_img = dev.path("v2.img");
    std::fs::write(&v2_img, &v2).expect("v2 image");
    let delta = dev.path("acme-os-2.0-reuse.shoal");
    ok(shoal()
        .args(["--quiet", "artifact", "build", "--image"])
        .arg(&v2_img)
        .args(["--name", "acme-os", "--version", "2.0"])
        .args(["--device-type", "board", "--security-counter", "1"])
        .arg("--key")
        .arg(&dev.key)
        .arg("--out")
        .arg(&delta)
        .arg("--base")
        .arg(&a1)
        .arg("--base-image")
        .arg(&v1_img)
        .arg("--full-manifest")
        .output()
        .expect("run"));
    // A new dictionary does not pay for itself on these few chunks: the thin
    // artifact carries none and its signed manifest names v1's.
    let (carried, named) = dictionaries(&delta);
    assert!(carried.is_none(), "the thin artifact carries a dictionary");
    assert_eq!(named, Some(v1_dict.id.to_string()));

    // Installing v1 from its artifact keeps its dictionary with its manifest.
    let (v1_hash, _) = envelope_of(&a1);
    let kept = dev
        .path("data")
        .join("manifests")
        .join(format!("{v1_hash}.dictionary"));
    let r = dev.install(&a1);
    assert_eq!(r["slot"], "B");
    assert_eq!(
        std::fs::read(&kept).expect("kept dictionary"),
        v1_dict.bytes()
    );
    assert_eq!(dev.reboot(), Slot::B);
    ok(dev.run(&["boot-check", "--json"]));

    // A second device running v1 (as shipped: its manifest, no dictionary) is
    // refused before anything is written, with one line that says why.
    let bare = Device::new(&v1, SLOT);
    std::fs::copy(&dev.root, &bare.root).expect("the same trust root");
    ship_manifest(&bare, &a1);
    let bare_kept = bare
        .path("data")
        .join("manifests")
        .join(format!("{v1_hash}.dictionary"));
    std::fs::remove_file(&bare_kept).expect("shipped dictionary");
    let path = delta.display().to_string();
    let err = fails(bare.run(&["install", &path]), 1);
    assert!(
        err.contains("carries no dictionary")
            && err.contains(&v1_dict.id.to_string())
            && err.contains("does not keep"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(bare.status()["deployment"], serde_json::Value::Null);
    // A kept dictionary that is not the named one fails its hash: refused.
    let other = build(&bare, &words(4, size), "9.0", None);
    let (other_dict, _) = dictionaries(&other);
    let other_dict = other_dict.expect("a dictionary");
    std::fs::write(&bare_kept, other_dict.bytes()).expect("wrong dictionary");
    let err = fails(bare.run(&["install", &path]), 1);
    assert!(err.contains("is not the one the manifest names"), "{err}");
    assert_eq!(bare.status()["deployment"], serde_json::Value::Null);

    // The first device, running v1 from slot B and keeping its dictionary,
    // installs v2 from the thin artifact: slot A is v2.
    let r = dev.install(&delta);
    assert_eq!(r["slot"], "A");
    assert_eq!(dev.slot_hash(Slot::A, size), hash(&v2));
    // `verify` with the base artifact takes its dictionary too.
    let v = install_common::json(&ok(dev.run(&[
        "artifact",
        "verify",
        &path,
        "--root",
        &dev.root.display().to_string(),
        "--base",
        &a1.display().to_string(),
        "--base-image",
        &v1_img.display().to_string(),
        "--json",
    ])));
    assert_eq!(v["ok"], true, "{v}");
}
