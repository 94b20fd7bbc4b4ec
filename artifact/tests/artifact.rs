//! Artifact round trips and the bad-input matrix of issue #2: every malformed or
//! malicious artifact is refused with its specific error, before anything is yielded.

use std::io::Cursor;

use shoal_artifact::chunk;
use shoal_artifact::manifest::Chunking;
use shoal_artifact::read::{
    CONTENTS_MEMBER, ENVELOPE_MEMBER, PACK_CHUNKS_MAX, PACK_TABLE_MEMBER, data_path, pack_path,
    pack_table,
};
use shoal_artifact::ustar;
use shoal_artifact::write::{Layout, member_len, pack_member};
use shoal_artifact::{
    ArtifactReader, BuildOptions, BuildReport, ChunkError, ChunkId, ChunkRef, ChunkStore,
    ExtractError, Manifest, ReadError, StoreError,
};
use shoal_signing::{DecodeError, Envelope, RoleName, SecretKey, TrustRoot, VerifyError};

const CHUNKING: Chunking = Chunking {
    min_size: 1024,
    avg_size: 4096,
    max_size: 16384,
};
const NOW: Option<u64> = Some(1_000_000);

fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed(&[seed; 32])
}

/// A root whose release role is keys `release` with `threshold`.
fn root(release: &[u8], threshold: u32) -> TrustRoot {
    let rk = key(200).public();
    let rel: Vec<_> = release.iter().map(|&s| key(s).public()).collect();
    TrustRoot::new(1, 2_000_000, &[rk], 1, &rel, threshold).unwrap()
}

/// Compressible, non-repeating payload with a repeated region and a zero run.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b"abcdefgh"[(x >> 60) as usize % 8]
        })
        .collect();
    if len > 200_000 {
        let (a, b) = v.split_at_mut(100_000);
        b[..50_000].copy_from_slice(&a[..50_000]);
        v[150_000..200_000].fill(0);
    }
    v
}

fn opts() -> BuildOptions {
    let mut o = BuildOptions::rootfs("acme-os", "1.0", vec!["board".into()], 3);
    o.chunking = CHUNKING;
    o.zstd_level = 3;
    // Several small packs: the pack layout's structure tests (data members have
    // their own, `data_members_*`).
    o.layout = Layout::Packs { bytes: 8 * 1024 };
    // Structure tests take artifacts apart; the dictionary has its own test.
    o.dictionary = false;
    o
}

fn build_with(
    data: &[u8],
    o: &BuildOptions,
    keys: &[SecretKey],
    base: Option<&Manifest>,
) -> (Vec<u8>, BuildReport) {
    let dir = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    let report = shoal_artifact::build(
        Cursor::new(data),
        o,
        keys,
        base,
        dir.path(),
        &mut out,
        |_| {},
    )
    .unwrap();
    assert_eq!(report.artifact_len, out.len() as u64);
    (out, report)
}

fn build(data: &[u8]) -> (Vec<u8>, BuildReport) {
    build_with(data, &opts(), &[key(1)], None)
}

/// Both layouts the readers take: small packs (as [`opts`]) and data members (the
/// default), for the tests that hold for both.
fn layouts() -> [Layout; 2] {
    [opts().layout, Layout::Data]
}

/// [`opts`] with `layout`.
fn opts_in(layout: Layout) -> BuildOptions {
    let mut o = opts();
    o.layout = layout;
    o
}

/// [`build`] with `layout`.
fn build_in(data: &[u8], layout: Layout) -> (Vec<u8>, BuildReport) {
    build_with(data, &opts_in(layout), &[key(1)], None)
}

/// Reads the whole artifact through the verifying reader.
fn read_all(bytes: &[u8], root: &TrustRoot) -> Result<Vec<Vec<u8>>, ReadError> {
    let mut r = ArtifactReader::open(bytes, root, NOW)?;
    let mut out = Vec::new();
    while let Some((_, d)) = r.next_chunk()? {
        out.push(d);
    }
    Ok(out)
}

/// Byte offsets of each member's header in an artifact: (offset, path, size).
fn members(bytes: &[u8]) -> Vec<(usize, String, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 512 <= bytes.len() {
        let block: &[u8; 512] = bytes[at..at + 512].try_into().unwrap();
        match ustar::parse(block).unwrap() {
            ustar::Block::End => break,
            ustar::Block::Member(m) => {
                out.push((at, m.path.clone(), m.size as usize));
                at += 512 + m.size as usize + ustar::padding(m.size);
            }
        }
    }
    out
}

/// Reassembles a tar from (path, data) members, with the end marker.
fn tar(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (p, d) in members {
        ustar::write_member(&mut out, p, d).unwrap();
    }
    ustar::write_end(&mut out).unwrap();
    out
}

/// An artifact taken apart: envelope bytes, manifest, and its chunks in order.
/// Chunks with their stored forms, in artifact order.
type Stored = Vec<(ChunkId, Vec<u8>)>;

fn parts(bytes: &[u8]) -> (Vec<u8>, Manifest, Stored) {
    let ms = members(bytes);
    let env = bytes[512..512 + ms[0].2].to_vec();
    let m = Manifest::from_cbor(&Envelope::from_bytes(&env).unwrap().signed).unwrap();
    // A full artifact's packs hold the distinct chunks in order; the header only
    // counts them.
    let mut order = m.distinct_chunks().into_iter();
    let mut chunks = Vec::new();
    for (at, path, size) in ms[1..].iter() {
        let data = &bytes[at + 512..at + 512 + size];
        let (count, mut pos) = if path.starts_with("packs/") {
            (
                u32::from_le_bytes(data[..4].try_into().unwrap()) as usize,
                4,
            )
        } else if path.starts_with("data/") {
            // A data member: the chunks its bytes hold.
            let mut rest = order.clone();
            let (mut n, mut sum) = (0, 0);
            while sum < *size {
                sum += rest.next().unwrap().stored_size as usize;
                n += 1;
            }
            (n, 0)
        } else {
            continue;
        };
        for _ in 0..count {
            let c = order.next().unwrap();
            let n = c.stored_size as usize;
            chunks.push((c.id, data[pos..pos + n].to_vec()));
            pos += n;
        }
        assert_eq!(pos, *size);
    }
    (env, m, chunks)
}

/// Builds an artifact from an envelope and chunks, `per_pack` chunks per pack, as
/// the builder did before the pack table existed (no table member).
fn assemble(env: &[u8], chunks: &[(ChunkId, Vec<u8>)], per_pack: usize) -> Vec<u8> {
    let mut members = vec![(ENVELOPE_MEMBER.to_string(), env.to_vec())];
    for (seq, group) in chunks.chunks(per_pack).enumerate() {
        let data: Vec<u8> = group.iter().flat_map(|(_, d)| d.iter().copied()).collect();
        members.push((pack_path(seq as u64), pack_member(group.len(), &data)));
    }
    tar(&members)
}

/// The pack members holding `chunks` in packs of `counts` chunks, in order.
fn pack_members(chunks: &[(ChunkId, Vec<u8>)], counts: &[u32]) -> Vec<(String, Vec<u8>)> {
    assert_eq!(
        counts.iter().map(|&c| c as usize).sum::<usize>(),
        chunks.len()
    );
    let mut rest = chunks;
    let mut members = Vec::new();
    for (seq, &count) in counts.iter().enumerate() {
        let (group, tail) = rest.split_at(count as usize);
        rest = tail;
        let data: Vec<u8> = group.iter().flat_map(|(_, d)| d.iter().copied()).collect();
        members.push((pack_path(seq as u64), pack_member(group.len(), &data)));
    }
    members
}

/// An artifact of an envelope, a pack table member saying `table`, and the chunks
/// really packed in packs of `counts` chunks.
fn assemble_with_table(
    env: &[u8],
    chunks: &[(ChunkId, Vec<u8>)],
    counts: &[u32],
    table: &[u32],
) -> Vec<u8> {
    let mut members = vec![
        (ENVELOPE_MEMBER.to_string(), env.to_vec()),
        (PACK_TABLE_MEMBER.to_string(), pack_table(table)),
    ];
    members.extend(pack_members(chunks, counts));
    tar(&members)
}

/// A signed envelope around `m`.
fn signed(m: &Manifest) -> Vec<u8> {
    let mut env = Envelope::new(m.to_cbor());
    env.sign(&key(1));
    env.to_bytes()
}

#[test]
fn round_trip_and_extract() {
    let data = payload(600_000, 1);
    let (bytes, report) = build(&data);
    assert!(
        report.chunks_distinct < report.chunks_total,
        "repeats are stored once"
    );
    assert_eq!(report.chunks_written, report.chunks_distinct);
    let chunks = read_all(&bytes, &root(&[1], 1)).unwrap();
    assert_eq!(chunks.len() as u64, report.chunks_distinct);

    let r = ArtifactReader::open(&bytes[..], &root(&[1], 1), NOW).unwrap();
    let mut out = Cursor::new(Vec::new());
    let n = shoal_artifact::extract(r, None, None, &mut out, |_| {}).unwrap();
    assert_eq!(n, data.len() as u64);
    assert_eq!(out.into_inner(), data);
    // The first member is the envelope, then the pack table, then numbered packs
    // holding each chunk once, as many as the table says.
    let m = members(&bytes);
    assert_eq!(m[0].1, ENVELOPE_MEMBER);
    assert_eq!(m[1].1, PACK_TABLE_MEMBER);
    assert!(m.len() > 4);
    let mut counts = Vec::new();
    for (i, (at, p, _)) in m[2..].iter().enumerate() {
        assert_eq!(*p, pack_path(i as u64));
        counts.push(u32::from_le_bytes(
            bytes[at + 512..at + 516].try_into().unwrap(),
        ));
    }
    assert_eq!(bytes[m[1].0 + 512..][..m[1].2], pack_table(&counts)[..]);
    // The table is read with the members before the first pack, and no further.
    let mut r = ArtifactReader::open(&bytes[..], &root(&[1], 1), NOW).unwrap();
    assert_eq!(r.holds().unwrap().len() as u64, report.chunks_distinct);
    assert_eq!(r.pack_table(), Some(&counts[..]));
    assert_eq!(r.offset(), m[2].0 as u64);
    let (env, manifest, chunks) = parts(&bytes);
    assert_eq!(manifest, report.manifest);
    let ids: Vec<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
    let want: Vec<ChunkId> = manifest.distinct_chunks().iter().map(|c| c.id).collect();
    assert_eq!(ids, want);
    // Re-packing the same chunks differently is still a valid artifact.
    assert_eq!(
        read_all(&assemble(&env, &chunks, 1), &root(&[1], 1)).unwrap(),
        read_all(&bytes, &root(&[1], 1)).unwrap()
    );
}

#[test]
fn dictionary_compressed_artifact_round_trips_through_a_store() {
    // Many similar small chunks: a dictionary pays off and is used.
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| {
            b"the quick brown fox jumps over the lazy dog"
                [(i as usize * 7 + (i as usize >> 11)) % 43]
                ^ ((i >> 13) as u8 & 3)
        })
        .collect();
    let mut o = opts();
    o.dictionary = true;
    let (bytes, report) = build_with(&data, &o, &[key(1)], None);
    assert!(report.dictionary_len > 0, "{report:?}");
    assert_eq!(members(&bytes)[1].1, "dictionary");
    let root = root(&[1], 1);
    let mut r = ArtifactReader::open(&bytes[..], &root, NOW).unwrap();
    assert!(r.read_dictionary().unwrap().is_some());
    let mut out = Cursor::new(Vec::new());
    shoal_artifact::extract(r, None, None, &mut out, |_| {}).unwrap();
    assert_eq!(out.into_inner(), data);
    // Chunks in a store decode with the store's copy of the dictionary.
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    store.add_artifact(&bytes[..], &root, NOW).unwrap();
    store.verify(&root, NOW).unwrap();
    let c = report.manifest.distinct_chunks()[0];
    assert_eq!(store.get(&c).unwrap(), data[..c.size as usize]);
    // Without its dictionary a chunk is refused, not misread.
    let stored = store.get_stored(&c.id).unwrap();
    let zstd_id = chunk::frame_dictionary_id(&stored).expect("the frame names its dictionary");
    // The frame's dictionary id names the store's dictionary file, and is derived
    // from the dictionary's content.
    let d = store
        .dictionary(zstd_id)
        .unwrap()
        .expect("the store has the dictionary");
    assert_eq!(d.zstd_id, chunk::derived_zstd_id(d.bytes()));
    assert!(store.dictionary_file(zstd_id).is_file());
    let mut forged = d.bytes().to_vec();
    forged[4] ^= 1;
    assert!(matches!(
        chunk::Dictionary::from_bytes(forged),
        Err(chunk::DictionaryError::IdNotDerived(_))
    ));
    assert!(matches!(
        chunk::decode(&stored, &c),
        Err(ChunkError::NeedsDictionary { .. })
    ));
    // A dictionary member that is not a dictionary.
    let mut ms: Vec<(String, Vec<u8>)> = members(&bytes)
        .iter()
        .map(|(at, p, n)| (p.clone(), bytes[at + 512..at + 512 + n].to_vec()))
        .collect();
    ms[1].1 = b"not a dictionary".to_vec();
    assert!(matches!(
        read_all(&tar(&ms), &root),
        Err(ReadError::Dictionary(_))
    ));
}

#[test]
fn build_is_deterministic_and_streams_from_a_pipe() {
    let data = payload(300_000, 2);
    let (a, _) = build(&data);
    let (b, _) = build(&data);
    assert_eq!(a, b);
    // A reader that hands out a few bytes at a time, like a pipe.
    struct Trickle<'a>(&'a [u8]);
    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(7).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let mut r = ArtifactReader::open(Trickle(&a), &root(&[1], 1), NOW).unwrap();
    let mut n = 0;
    while r.next_chunk().unwrap().is_some() {
        n += 1;
    }
    assert!(n > 10);
}

#[test]
fn thin_artifact_holds_only_new_chunks_and_extracts_with_a_store() {
    let v1 = payload(600_000, 3);
    let mut v2 = v1.clone();
    v2[300_000..310_000].copy_from_slice(&payload(10_000, 4));
    v2.extend_from_slice(&payload(20_000, 5));
    let (full1, r1) = build(&v1);
    let mut o2 = opts();
    o2.version = "2.0".into();
    let (thin, r2) = build_with(&v2, &o2, &[key(1)], Some(&r1.manifest));
    let base = r2.manifest.base.clone().unwrap();
    assert_eq!(
        (base.name.as_str(), base.version.as_str()),
        ("acme-os", "1.0")
    );
    assert_eq!(base.manifest_hash, r1.manifest.hash());
    assert!(r2.chunks_written < r2.chunks_distinct / 4, "{r2:?}");
    assert!(thin.len() < full1.len() / 4);

    let root = root(&[1], 1);
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    // Without the base in the store, adding the thin artifact is refused.
    assert!(matches!(
        store.add_artifact(&thin[..], &root, NOW),
        Err(StoreError::BaseMissing { .. })
    ));
    store.add_artifact(&full1[..], &root, NOW).unwrap();
    let added = store.add_artifact(&thin[..], &root, NOW).unwrap();
    assert_eq!(added.chunks_added, r2.chunks_written);
    store.verify(&root, NOW).unwrap();

    let r = ArtifactReader::open_with_base(&thin[..], &root, NOW, Some(&r1.manifest)).unwrap();
    let mut out = Cursor::new(Vec::new());
    shoal_artifact::extract(
        r,
        Some((shoal_artifact::BaseChunks::Store(&store), &r1.manifest)),
        None,
        &mut out,
        |_| {},
    )
    .unwrap();
    assert_eq!(out.into_inner(), v2);

    let r = ArtifactReader::open(&thin[..], &root, NOW).unwrap();
    assert!(matches!(
        shoal_artifact::extract(r, None, None, &mut Cursor::new(Vec::new()), |_| {}),
        Err(ExtractError::NeedsBase(_))
    ));

    let envelope = |bytes: &[u8]| {
        ArtifactReader::open(bytes, &root, NOW)
            .unwrap()
            .envelope()
            .clone()
    };
    let d = shoal_artifact::diff(
        &r1.manifest,
        &r2.manifest,
        &envelope(&thin),
        r2.dictionary_len,
        false,
        Layout::Data,
    );
    assert_eq!(d.chunks_needed, r2.chunks_written);
    assert_eq!(d.needed_stored_bytes, r2.stored_bytes);
    assert_eq!(d.manifest_bytes, r2.envelope_len);
    // From the full artifact of v2, the diff sizes the thin artifact exactly, with
    // the writer's own packing (small packs here, so several).
    let mut o = opts();
    o.version = "2.0".into();
    o.layout = Layout::default();
    let (thin_default, _) = build_with(&v2, &o, &[key(1)], Some(&r1.manifest));
    let (full2, f2) = build_with(&v2, &o, &[key(1)], None);
    let d = shoal_artifact::diff(
        &r1.manifest,
        &f2.manifest,
        &envelope(&full2),
        0,
        false,
        Layout::Data,
    );
    assert_eq!(d.download_bytes, thin_default.len() as u64, "{d:?}");
    // And a thin artifact of packs (`--packs`), sized with the pack layout.
    let packs = opts().layout;
    let d_packs = shoal_artifact::diff(
        &r1.manifest,
        &f2.manifest,
        &envelope(&full2),
        0,
        false,
        packs,
    );
    assert_eq!(d_packs.download_bytes, thin.len() as u64, "{d_packs:?}");
    assert!(d_packs.download_bytes > d.download_bytes);
    assert_eq!(d.needed_stored_bytes, r2.stored_bytes);
    assert_eq!(
        d.store_download_bytes,
        f2.envelope_len + r2.stored_bytes,
        "{d:?}"
    );
    // The writer's size formula is its output's size.
    assert_eq!(
        shoal_artifact::write::artifact_len(
            f2.envelope_len,
            0,
            None,
            f2.manifest.distinct_chunks().iter().map(|c| c.stored_size),
            o.layout,
        ),
        full2.len() as u64
    );
    // And for packs (several here).
    let (packed, fp) = build_with(&v2, &opts(), &[key(1)], None);
    assert!(members(&packed).len() > 3);
    assert_eq!(
        shoal_artifact::write::artifact_len(
            fp.envelope_len,
            0,
            None,
            fp.manifest.distinct_chunks().iter().map(|c| c.stored_size),
            opts().layout,
        ),
        packed.len() as u64
    );
}

/// The members of an artifact as (path, data).
fn member_data(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    members(bytes)
        .into_iter()
        .map(|(at, p, size)| (p, bytes[at + 512..at + 512 + size].to_vec()))
        .collect()
}

#[test]
fn thin_artifact_says_what_it_holds_and_a_bad_contents_member_is_refused() {
    let v1 = payload(600_000, 3);
    let mut v2 = v1.clone();
    v2[300_000..310_000].copy_from_slice(&payload(10_000, 4));
    v2.extend_from_slice(&payload(20_000, 5));
    let (full1, r1) = build(&v1);
    let mut o2 = opts();
    o2.version = "2.0".into();
    let (thin, r2) = build_with(&v2, &o2, &[key(1)], Some(&r1.manifest));
    let root = root(&[1], 1);

    // A full artifact holds every distinct chunk and needs no contents member.
    assert!(
        member_data(&full1)
            .iter()
            .all(|(p, _)| p != CONTENTS_MEMBER)
    );
    let mut r = ArtifactReader::open(&full1[..], &root, NOW).unwrap();
    let all: Vec<ChunkId> = r1.manifest.distinct_chunks().iter().map(|c| c.id).collect();
    assert_eq!(r.holds().unwrap(), all);

    // A thin one lists exactly the chunks its base lacks, right after the envelope.
    let ms = member_data(&thin);
    assert_eq!(ms[1].0, CONTENTS_MEMBER);
    let distinct = r2.manifest.distinct_chunks();
    assert_eq!(ms[1].1.len(), distinct.len().div_ceil(8));
    let in_base: std::collections::HashSet<ChunkId> =
        r1.manifest.distinct_chunks().iter().map(|c| c.id).collect();
    let new: Vec<ChunkId> = distinct
        .iter()
        .map(|c| c.id)
        .filter(|id| !in_base.contains(id))
        .collect();
    assert_eq!(new.len() as u64, r2.chunks_written);
    let mut r = ArtifactReader::open(&thin[..], &root, NOW).unwrap();
    assert_eq!(r.holds().unwrap(), new);
    assert_eq!(read_all(&thin, &root).unwrap().len(), new.len());

    let with_contents = |bits: Vec<u8>| {
        let mut ms = ms.clone();
        ms[1].1 = bits;
        tar(&ms)
    };
    // One byte too many, or too few: refused before any chunk, with both sizes.
    let expected = distinct.len().div_ceil(8) as u64;
    for found in [expected + 1, expected - 1] {
        let mut bits = ms[1].1.clone();
        bits.resize(found as usize, 0);
        let bad = with_contents(bits);
        let mut r = ArtifactReader::open(&bad[..], &root, NOW).unwrap();
        let e = r.holds().unwrap_err();
        assert!(
            matches!(e, ReadError::ContentsLength { expected: x, found: f, chunks }
                if x == expected && f == found && chunks == distinct.len()),
            "{e:?}"
        );
    }
    // Bits past the last chunk.
    let tail = distinct.len() % 8;
    if tail != 0 {
        let mut bits = ms[1].1.clone();
        *bits.last_mut().unwrap() |= 0x80;
        let e = read_all(&with_contents(bits), &root).unwrap_err();
        assert!(
            matches!(e, ReadError::ContentsPadding { chunks } if chunks == distinct.len()),
            "{e:?}"
        );
    }
    let position = |id: &ChunkId| distinct.iter().position(|c| c.id == *id).unwrap();
    // The packs hold what the contents member says, in order: a member that leaves
    // out a chunk the artifact holds, or promises one it does not hold, puts the
    // wrong bytes under a chunk's name. Refused, whether or not the base is known.
    let mut left_out = ms[1].1.clone();
    let i = position(&new[0]);
    left_out[i / 8] &= !(1 << (i % 8));
    let mut promised = ms[1].1.clone();
    let absent = distinct
        .iter()
        .find(|c| in_base.contains(&c.id))
        .unwrap()
        .id;
    let i = position(&absent);
    promised[i / 8] |= 1 << (i % 8);
    // The pack table's counts then no longer add up to what the artifact holds:
    // refused before any chunk. Without a table (older artifacts), the packs' sizes
    // or the chunks' hashes catch it.
    assert_eq!(ms[2].0, PACK_TABLE_MEMBER);
    for (bits, chunks) in [(left_out.clone(), new.len() - 1), (promised, new.len() + 1)] {
        let bad = with_contents(bits.clone());
        let mut r = ArtifactReader::open(&bad[..], &root, NOW).unwrap();
        let e = r.holds().unwrap_err();
        assert!(
            matches!(e, ReadError::PackTableSum { sum, chunks: c }
                if sum == new.len() as u64 && c == chunks),
            "{e:?}"
        );
        let mut no_table = ms.clone();
        no_table[1].1 = bits;
        no_table.remove(2);
        let e = read_all(&tar(&no_table), &root).unwrap_err();
        assert!(
            matches!(
                e,
                ReadError::PackSizeMismatch { .. }
                    | ReadError::BadPack { .. }
                    | ReadError::Chunk(ChunkError::HashMismatch { .. })
            ),
            "{e:?}"
        );
    }
    // With the base at hand, leaving out a chunk the base lacks is caught before
    // any chunk is read.
    let bad = with_contents(left_out);
    let mut r = ArtifactReader::open_with_base(&bad[..], &root, NOW, Some(&r1.manifest)).unwrap();
    let e = r.holds().unwrap_err();
    assert!(
        matches!(e, ReadError::MissingChunk(id) if id == new[0]),
        "{e:?}"
    );
    // A thin artifact without a contents member cannot be read without its base,
    // and reads as before with it.
    let mut bare = ms.clone();
    bare.remove(1);
    let bare = tar(&bare);
    assert!(matches!(
        read_all(&bare, &root),
        Err(ReadError::MissingContents)
    ));
    let mut r = ArtifactReader::open_with_base(&bare[..], &root, NOW, Some(&r1.manifest)).unwrap();
    assert_eq!(r.holds().unwrap(), new);
    // After a pack, a contents member is just an unexpected member (and without
    // the base, the packs cannot be read without it).
    let mut late = ms.clone();
    let c = late.remove(1);
    late.push(c);
    let late = tar(&late);
    assert!(matches!(
        read_all(&late, &root),
        Err(ReadError::MissingContents)
    ));
    let mut r = ArtifactReader::open_with_base(&late[..], &root, NOW, Some(&r1.manifest)).unwrap();
    let e = loop {
        match r.next_chunk() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("read to the end"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&e, ReadError::UnexpectedMember { path } if path == CONTENTS_MEMBER),
        "{e:?}"
    );
}

#[test]
fn signatures_threshold_and_unknown_keys() {
    let data = payload(100_000, 6);
    let (one, _) = build(&data);
    // 2-of-3 release role: one signature is not enough...
    let r23 = root(&[1, 2, 3], 2);
    assert!(matches!(
        read_all(&one, &r23),
        Err(ReadError::Signature(VerifyError::BelowThreshold {
            valid: 1,
            threshold: 2,
            ..
        }))
    ));
    // ...two are (added to the existing artifact as a second holder would).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.shoal");
    std::fs::write(&path, &one).unwrap();
    assert_eq!(
        shoal_artifact::add_signatures(&path, &[key(2)], &shoal_artifact::NoManifests).unwrap(),
        2
    );
    let two = std::fs::read(&path).unwrap();
    read_all(&two, &r23).unwrap();
    // The same key twice counts once.
    assert_eq!(
        shoal_artifact::add_signatures(&path, &[key(2)], &shoal_artifact::NoManifests).unwrap(),
        2
    );
    // A key not in the root.
    assert!(matches!(
        read_all(&one, &root(&[9], 1)),
        Err(ReadError::Signature(VerifyError::BelowThreshold {
            valid: 0,
            unknown: 1,
            ..
        }))
    ));
    // An expired root.
    assert!(matches!(
        ArtifactReader::open(&one[..], &root(&[1], 1), Some(2_000_000)),
        Err(ReadError::Signature(VerifyError::Expired { .. }))
    ));
    // The release role only: a root key cannot sign releases.
    let rk_only =
        TrustRoot::new(1, 2_000_000, &[key(1).public()], 1, &[key(2).public()], 1).unwrap();
    assert!(rk_only.roles.contains_key(&RoleName::Root));
    assert!(matches!(
        read_all(&one, &rk_only),
        Err(ReadError::Signature(_))
    ));
}

#[test]
fn truncated_anywhere_is_refused() {
    for layout in layouts() {
        truncated_anywhere_is_refused_in(layout);
    }
}

fn truncated_anywhere_is_refused_in(layout: Layout) {
    let (bytes, _) = build_in(&payload(200_000, 7), layout);
    let root = root(&[1], 1);
    let m = members(&bytes);
    let (_, _, chunks) = parts(&bytes);
    // At the envelope (inside its header, and inside its data).
    for cut in [0usize, 100, 512 + 10] {
        let r = read_all(&bytes[..cut], &root);
        match cut {
            0 => assert!(matches!(r, Err(ReadError::Empty)), "{r:?}"),
            _ => assert!(
                matches!(r, Err(ReadError::Truncated { .. })),
                "cut {cut}: {r:?}"
            ),
        }
    }
    // Mid-chunk, exactly before the last chunk, between members, before the end marker.
    let (mid_at, _, mid_size) = m[m.len() / 2];
    let (last_at, _, last_size) = *m.last().unwrap();
    let before_last_chunk = last_at + 512 + last_size - chunks.last().unwrap().1.len();
    for cut in [
        mid_at + 512 + mid_size - 3,
        before_last_chunk,
        last_at,
        bytes.len() - 1024,
        bytes.len() - 512,
    ] {
        let r = read_all(&bytes[..cut], &root);
        assert!(
            matches!(r, Err(ReadError::Truncated { .. })),
            "{layout:?}: cut {cut}: {r:?}"
        );
    }
}

#[test]
fn flipped_bits_are_refused() {
    for layout in layouts() {
        flipped_bits_are_refused_in(layout);
    }
}

fn flipped_bits_are_refused_in(layout: Layout) {
    let (bytes, _) = build_in(&payload(200_000, 8), layout);
    let root = root(&[1], 1);
    let env_bytes = parts(&bytes).0;
    let env = Envelope::from_bytes(&env_bytes).unwrap();
    let rest = &bytes[512 + env_bytes.len() + ustar::padding(env_bytes.len() as u64)..];

    // In the manifest (the signed bytes): the signature no longer verifies.
    let mut e = env.clone();
    let i = e.signed.len() / 2;
    e.signed[i] ^= 0x01;
    let eb = e.to_bytes();
    let head = tar(&[(ENVELOPE_MEMBER.into(), eb.clone())]);
    let bad = [
        &head[..512 + eb.len() + ustar::padding(eb.len() as u64)],
        rest,
    ]
    .concat();
    assert!(matches!(
        read_all(&bad, &root),
        Err(ReadError::Signature(VerifyError::BelowThreshold {
            valid: 0,
            invalid: 1,
            ..
        }))
    ));
    // In the signature.
    let mut e = env.clone();
    e.signatures[0].sig[10] ^= 0x80;
    let eb = e.to_bytes();
    let head = tar(&[(ENVELOPE_MEMBER.into(), eb.clone())]);
    let bad = [
        &head[..512 + eb.len() + ustar::padding(eb.len() as u64)],
        rest,
    ]
    .concat();
    assert!(matches!(
        read_all(&bad, &root),
        Err(ReadError::Signature(VerifyError::BelowThreshold {
            valid: 0,
            invalid: 1,
            ..
        }))
    ));
    // In a chunk's data (the last bytes of a pack or data member are chunk data,
    // not a pack's index).
    let m = members(&bytes);
    let (at, _, size) = *m.last().unwrap();
    assert!(
        m.len() > 3 || layout == Layout::Data,
        "{layout:?}: several packs"
    );
    let mut bad = bytes.clone();
    bad[at + 512 + size - 2] ^= 0x04;
    let r = read_all(&bad, &root);
    assert!(
        matches!(
            r,
            Err(ReadError::Chunk(
                ChunkError::HashMismatch { .. } | ChunkError::Corrupt { .. }
            ))
        ),
        "{r:?}"
    );
    // In a tar header (checksum catches it).
    let mut bad = bytes.clone();
    bad[at + 5] ^= 0x01;
    assert!(matches!(
        read_all(&bad, &root),
        Err(ReadError::BadHeader { .. })
    ));
}

#[test]
fn swapped_duplicate_missing_and_unexpected_chunks_are_refused() {
    let (bytes, report) = build(&payload(200_000, 9));
    let root = root(&[1], 1);
    let (env, _, cs) = parts(&bytes);
    assert!(cs.len() > 5);

    // A chunk's data swapped for another valid chunk's, under the first one's id.
    let mut swapped = cs.clone();
    swapped[2].1 = cs[3].1.clone();
    let r = read_all(&assemble(&env, &swapped, 4), &root);
    assert!(
        matches!(
            r,
            Err(ReadError::PackSizeMismatch { .. }
                | ReadError::Chunk(ChunkError::HashMismatch { .. }))
        ),
        "{r:?}"
    );
    // Packs only count their chunks; which ones they are follows from the signed
    // order. So anything out of place is either a pack whose size does not match
    // the signed sizes of the chunks that belong there, or bytes that do not hash to
    // the chunk that belongs there: `wrong_at(pack, chunk)`.
    let wrong_at = |r: Result<Vec<Vec<u8>>, ReadError>, pack: u64, chunk: ChunkId| match r {
        Err(ReadError::PackSizeMismatch { seq, .. }) => seq == pack,
        Err(ReadError::Chunk(
            ChunkError::HashMismatch { id, .. }
            | ChunkError::Corrupt { id, .. }
            | ChunkError::SizeMismatch { id, .. }
            | ChunkError::DecompressedTooLarge { id, .. },
        )) => id == chunk,
        _ => false,
    };
    // Two chunks swapped in place: out of the signed order. The pack's size still
    // matches, so the first misplaced chunk fails its checks.
    let mut reordered = cs.clone();
    reordered.swap(2, 3);
    let r = read_all(&assemble(&env, &reordered, 4), &root);
    assert!(!matches!(r, Err(ReadError::PackSizeMismatch { .. })) && wrong_at(r, 0, cs[2].0));
    // A duplicate chunk, in the same pack (one chunk more than remain) and in the
    // next one.
    let mut dup = cs.clone();
    dup.insert(3, cs[2].clone());
    let r = read_all(&assemble(&env, &dup, 64), &root);
    assert!(matches!(r, Err(ReadError::BadPack { seq: 0, .. })), "{r:?}");
    let r = read_all(&assemble(&env, &dup, 1), &root);
    assert!(wrong_at(r, 3, cs[3].0));
    // A missing chunk (the archive ends cleanly without it), last and in the middle.
    let want = report.manifest.distinct_chunks().last().unwrap().id;
    assert!(matches!(
        read_all(&assemble(&env, &cs[..cs.len() - 1], 4), &root),
        Err(ReadError::MissingChunk(id)) if id == want
    ));
    let mut gap = cs.clone();
    gap.remove(4);
    assert!(wrong_at(
        read_all(&assemble(&env, &gap, 4), &root),
        1,
        cs[4].0
    ));
    // A chunk the manifest does not list.
    let mut extra = cs.clone();
    let other = b"not in the manifest".to_vec();
    let id = ChunkId::of(&other);
    extra.insert(2, (id, chunk::encode(&other, 3)));
    assert!(wrong_at(
        read_all(&assemble(&env, &extra, 4), &root),
        0,
        cs[2].0
    ));
    // A member that is not a pack, and a pack out of sequence.
    let mut junk = members(&bytes)
        .iter()
        .map(|(at, p, n)| (p.clone(), bytes[at + 512..at + 512 + n].to_vec()))
        .collect::<Vec<_>>();
    junk.insert(2, ("README".into(), b"hi".to_vec()));
    assert!(matches!(
        read_all(&tar(&junk), &root),
        Err(ReadError::UnexpectedMember { .. })
    ));
    junk.remove(2);
    junk[2].0 = pack_path(7);
    assert!(matches!(
        read_all(&tar(&junk), &root),
        Err(ReadError::UnexpectedMember { .. })
    ));
}

#[test]
fn chunk_swapped_for_valid_chunk_of_same_size_is_refused() {
    // Two incompressible chunks of one size (stored raw, so equal stored sizes too).
    let a: Vec<u8> = payload(4096, 21)
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ (i * 31) as u8)
        .collect();
    let b: Vec<u8> = a.iter().map(|x| x.wrapping_add(1)).collect();
    let (sa, sb) = (chunk::encode(&a, 3), chunk::encode(&b, 3));
    assert_eq!(sa.len(), sb.len());
    let mut m = build(&payload(10_000, 11)).1.manifest;
    let p = &mut m.payloads[0];
    let size = 4096u32;
    let stored_size = u32::try_from(sa.len()).unwrap();
    p.chunks = vec![
        ChunkRef {
            id: ChunkId::of(&a),
            size,
            stored_size,
        },
        ChunkRef {
            id: ChunkId::of(&b),
            size,
            stored_size,
        },
    ];
    p.size = 8192;
    p.hash = *blake3::hash(&[a.clone(), b.clone()].concat()).as_bytes();
    let env = signed(&m);
    let good = assemble(
        &env,
        &[(ChunkId::of(&a), sa.clone()), (ChunkId::of(&b), sb.clone())],
        2,
    );
    assert_eq!(
        read_all(&good, &root(&[1], 1)).unwrap(),
        vec![a.clone(), b.clone()]
    );
    let bad = assemble(&env, &[(ChunkId::of(&a), sb), (ChunkId::of(&b), sa)], 2);
    assert!(matches!(
        read_all(&bad, &root(&[1], 1)),
        Err(ReadError::Chunk(ChunkError::HashMismatch { id, .. })) if id == ChunkId::of(&a)
    ));
}

#[test]
fn unsafe_paths_are_refused() {
    let (bytes, _) = build(&payload(100_000, 10));
    let root = root(&[1], 1);
    let ms: Vec<(String, Vec<u8>)> = members(&bytes)
        .iter()
        .map(|(at, p, n)| (p.clone(), bytes[at + 512..at + 512 + n].to_vec()))
        .collect();
    for path in ["/etc/passwd", "../escape", "packs/../../x"] {
        // As a chunk member...
        let mut bad = ms.clone();
        bad.insert(1, (path.into(), b"x".to_vec()));
        let r = read_all(&tar(&bad), &root);
        assert!(
            matches!(&r, Err(ReadError::UnsafePath { path: p }) if p == path),
            "{r:?}"
        );
        // ...and as the first member.
        let mut bad = ms.clone();
        bad[0].0 = path.into();
        let r = read_all(&tar(&bad), &root);
        assert!(matches!(&r, Err(ReadError::UnsafePath { .. })), "{r:?}");
    }
}

#[test]
fn zstd_bomb_is_refused() {
    // Sign a manifest that declares a chunk of 4096 bytes whose stored frame
    // decompresses to 4 MiB, with the stored size the frame really has.
    let big = vec![0u8; 4 * 1024 * 1024];
    let bomb = chunk::encode(&big, 19);
    let small = vec![0u8; 4096];
    let id = ChunkId::of(&small);
    let mut m = build(&payload(10_000, 11)).1.manifest;
    let p = &mut m.payloads[0];
    p.chunks = vec![ChunkRef {
        id,
        size: 4096,
        stored_size: u32::try_from(bomb.len()).unwrap(),
    }];
    p.size = 4096;
    p.hash = *blake3::hash(&small).as_bytes();
    let bytes = assemble(&signed(&m), &[(id, bomb)], 1);
    assert!(matches!(
        read_all(&bytes, &root(&[1], 1)),
        Err(ReadError::Chunk(ChunkError::DecompressedTooLarge {
            size: 4096,
            ..
        }))
    ));
}

#[test]
fn empty_and_non_tar_files_are_refused() {
    let root = root(&[1], 1);
    assert!(matches!(read_all(b"", &root), Err(ReadError::Empty)));
    let text = b"This is not a tar file, just some text that goes on for a while.\n".repeat(20);
    assert!(matches!(read_all(&text, &root), Err(ReadError::NotTar(_))));
    assert!(matches!(
        read_all(b"short", &root),
        Err(ReadError::NotTar(_))
    ));
    // A tar whose first member is something else.
    let other = tar(&[("hello.txt".into(), b"hi".to_vec())]);
    assert!(matches!(
        read_all(&other, &root),
        Err(ReadError::MissingEnvelope { .. })
    ));
    // A tar with an envelope member that is not an envelope.
    let bad_env = tar(&[(ENVELOPE_MEMBER.into(), b"garbage".to_vec())]);
    assert!(matches!(
        read_all(&bad_env, &root),
        Err(ReadError::Envelope(_))
    ));
}

#[test]
fn store_verify_catches_corruption() {
    let (bytes, report) = build(&payload(200_000, 12));
    let root = root(&[1], 1);
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let added = store.add_artifact(&bytes[..], &root, NOW).unwrap();
    assert_eq!(added.chunks_added, report.chunks_distinct);
    let v = store.verify(&root, NOW).unwrap();
    assert_eq!((v.manifests, v.chunks), (1, report.chunks_distinct));
    // Adding again adds nothing.
    assert_eq!(
        store
            .add_artifact(&bytes[..], &root, NOW)
            .unwrap()
            .chunks_added,
        0
    );

    let c = report.manifest.distinct_chunks()[1];
    assert_eq!(store.get(&c).unwrap().len(), c.size as usize);
    let path = store.chunk_file(&c.id);
    let mut stored = std::fs::read(&path).unwrap();
    let n = stored.len();
    stored[n / 2] ^= 1;
    std::fs::write(&path, &stored).unwrap();
    assert!(matches!(
        store.verify(&root, NOW),
        Err(StoreError::BadChunk { .. })
    ));
    std::fs::remove_file(&path).unwrap();
    assert!(
        matches!(store.verify(&root, NOW), Err(StoreError::MissingChunk { id, .. }) if id == c.id)
    );
    // A manifest signed by a key the root does not trust.
    assert!(matches!(
        store.verify(&self::root(&[5], 1), NOW),
        Err(StoreError::BadManifest { .. })
    ));
}

#[test]
fn parallel_verify_reports_the_same_errors_as_reading_in_order() {
    for layout in layouts() {
        parallel_verify_reports_the_same_errors_as_reading_in_order_in(layout);
    }
}

fn parallel_verify_reports_the_same_errors_as_reading_in_order_in(layout: Layout) {
    let (bytes, report) = build_in(&payload(600_000, 13), layout);
    let root = root(&[1], 1);
    let verify = |b: &[u8]| -> Result<u64, ReadError> {
        let mut r = ArtifactReader::open(b, &root, NOW)?;
        r.verify_rest(|_| {})
    };
    assert_eq!(verify(&bytes).unwrap(), report.chunks_distinct);
    let m = members(&bytes);
    let (at, _, size) = m[m.len() / 2];
    let mut flipped = bytes.clone();
    flipped[at + 512 + size - 2] ^= 0x40;
    let truncated = &bytes[..at + 512 + size / 2];
    // A bad chunk early and a truncation later: the bad chunk is reported.
    let mut both = flipped.clone();
    both.truncate(bytes.len() - 700);
    for (name, input) in [
        ("flipped", &flipped[..]),
        ("truncated", truncated),
        ("both", &both[..]),
    ] {
        let sequential = format!("{:?}", read_all(input, &root).unwrap_err());
        let parallel = format!("{:?}", verify(input).unwrap_err());
        assert_eq!(sequential, parallel, "{layout:?}: {name}");
    }
}

/// A seekable source that counts the bytes actually read.
struct Counted<'a> {
    inner: Cursor<&'a [u8]>,
    read: u64,
}

impl std::io::Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl shoal_artifact::read::Skip for Counted<'_> {
    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        use std::io::Seek;
        self.inner
            .seek(std::io::SeekFrom::Current(n as i64))
            .map(|_| ())
    }
}

/// What [`read_wanted`] got: the verified chunks, the reader's offset at the end
/// (or the error that stopped it), and the bytes read from the source.
type Wanted = (Vec<(ChunkRef, Vec<u8>)>, Result<u64, ReadError>, u64);

/// Reads the chunks `want` says yes to through the seeking path, verifying each
/// (as an install does), until the end or the first error.
fn read_wanted(bytes: &[u8], root: &TrustRoot, want: impl Fn(&ChunkId) -> bool) -> Wanted {
    let mut src = Counted {
        inner: Cursor::new(bytes),
        read: 0,
    };
    let mut got = Vec::new();
    let mut r = match ArtifactReader::open(&mut src, root, NOW) {
        Ok(r) => r,
        Err(e) => return (got, Err(e), 0),
    };
    let end = loop {
        match r.next_wanted(&want) {
            Ok(Some(raw)) => match raw.verify() {
                Ok(data) => got.push((raw.chunk, data)),
                Err(e) => break Err(e.into()),
            },
            Ok(None) => break Ok(r.offset()),
            Err(e) => break Err(e),
        }
    };
    drop(r);
    (got, end, src.read)
}

#[test]
fn wanted_chunks_are_read_and_the_rest_skipped_unread() {
    let (bytes, report) = build(&payload(600_000, 11));
    let root = root(&[1], 1);
    let distinct = report.manifest.distinct_chunks();
    // Every third chunk.
    let want: Vec<ChunkRef> = distinct.iter().step_by(3).copied().collect();
    let wanted: std::collections::HashSet<ChunkId> = want.iter().map(|c| c.id).collect();
    let (got, end, read) = read_wanted(&bytes, &root, |id| wanted.contains(id));
    assert_eq!(got.iter().map(|(c, _)| *c).collect::<Vec<_>>(), want);
    assert!(got.iter().all(|(c, d)| ChunkId::of(d) == c.id));
    // The whole artifact was consumed, and of it only the envelope and pack table
    // members, each pack's header and count (checked as `verify` checks them), the
    // wanted chunks and the end blocks were read.
    assert_eq!(end.unwrap(), bytes.len() as u64);
    let m = members(&bytes);
    assert_eq!(m[1].1, PACK_TABLE_MEMBER);
    let packs = (m.len() - 2) as u64;
    let member =
        |(_, _, size): &(usize, String, usize)| shoal_artifact::write::member_len(*size as u64);
    let wanted_bytes: u64 = want.iter().map(|c| u64::from(c.stored_size)).sum();
    assert_eq!(
        read,
        member(&m[0]) + member(&m[1]) + packs * (512 + 4) + wanted_bytes + 1024
    );
    // Nothing wanted: the packs' data is skipped, their headers and the end are
    // still checked.
    let (got, end, read) = read_wanted(&bytes, &root, |_| false);
    assert!(got.is_empty());
    assert_eq!(end.unwrap(), bytes.len() as u64);
    assert_eq!(
        read,
        member(&m[0]) + member(&m[1]) + packs * (512 + 4) + 1024
    );

    // An artifact without a pack table (as built before it existed) is read as
    // before: every pack's header, and the wanted chunks.
    let (env, _, cs) = parts(&bytes);
    let old = assemble(&env, &cs, 5);
    let (got_old, end, read) = read_wanted(&old, &root, |id| wanted.contains(id));
    assert_eq!(got_old.iter().map(|(c, _)| *c).collect::<Vec<_>>(), want);
    assert_eq!(end.unwrap(), old.len() as u64);
    let packs = cs.len().div_ceil(5) as u64;
    assert_eq!(
        read,
        member(&members(&old)[0]) + packs * (512 + 4) + wanted_bytes + 1024
    );

    // Truncated inside a skipped stretch: still refused at the end, with or without
    // a table.
    for artifact in [&bytes, &old] {
        let cut = &artifact[..artifact.len() - 2000];
        let (_, end, _) = read_wanted(cut, &root, |_| false);
        assert!(matches!(end, Err(ReadError::Truncated { .. })), "{end:?}");
    }
    // Cut inside the end blocks.
    let (_, end, _) = read_wanted(&bytes[..bytes.len() - 100], &root, |_| false);
    assert!(matches!(end, Err(ReadError::Truncated { .. })), "{end:?}");
}

#[test]
fn bad_pack_tables_are_refused_before_any_chunk() {
    let (bytes, report) = build(&payload(200_000, 14));
    let root = root(&[1], 1);
    let held = report.chunks_distinct as usize;
    let ms = member_data(&bytes);
    assert_eq!(ms[1].0, PACK_TABLE_MEMBER);
    let table: Vec<u32> = ms[1]
        .1
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert!(table.len() >= 3, "{table:?}");
    let holds = |data: Vec<u8>| {
        let mut ms = ms.clone();
        ms[1].1 = data;
        let bad = tar(&ms);
        let mut r = ArtifactReader::open(&bad[..], &root, NOW).unwrap();
        r.holds().unwrap_err()
    };
    // Not whole entries.
    let mut data = ms[1].1.clone();
    data.push(0);
    let e = holds(data);
    assert!(
        matches!(e, ReadError::PackTableLength { found } if found == 4 * table.len() as u64 + 1),
        "{e:?}"
    );
    // More entries than the artifact holds chunks: refused before it is read.
    let e = holds(pack_table(&vec![1; held + 1]));
    assert!(
        matches!(e, ReadError::PackTableTooLarge { found, max, chunks }
            if found == 4 * (held as u64 + 1) && max == 4 * held as u64 && chunks == held),
        "{e:?}"
    );
    // A pack of no chunks, or of more than a pack may hold.
    let mut zero = table.clone();
    zero[1] = 0;
    let e = holds(pack_table(&zero));
    assert!(
        matches!(e, ReadError::PackTableCount { seq: 1, count: 0 }),
        "{e:?}"
    );
    let mut huge = table.clone();
    huge[0] = PACK_CHUNKS_MAX as u32 + 1;
    let e = holds(pack_table(&huge));
    assert!(
        matches!(e, ReadError::PackTableCount { seq: 0, count } if count as usize == PACK_CHUNKS_MAX + 1),
        "{e:?}"
    );
    // Counts that do not add up to the chunks the artifact holds.
    let mut more = table.clone();
    *more.last_mut().unwrap() += 1;
    let e = holds(pack_table(&more));
    assert!(
        matches!(e, ReadError::PackTableSum { sum, chunks } if sum == held as u64 + 1 && chunks == held),
        "{e:?}"
    );
    // A table after the first pack is just an unexpected member.
    let mut late = ms.clone();
    let t = late.remove(1);
    late.insert(2, t);
    let e = read_all(&tar(&late), &root).unwrap_err();
    assert!(
        matches!(&e, ReadError::UnexpectedMember { path } if path == PACK_TABLE_MEMBER),
        "{e:?}"
    );
}

#[test]
fn a_lying_pack_table_never_yields_a_wrong_chunk() {
    let (bytes, _) = build(&payload(200_000, 15));
    let root = root(&[1], 1);
    let (env, _, cs) = parts(&bytes);
    let n = cs.len() as u32;
    assert!(n > 10, "{n} chunks");
    // The packs hold 2, 5 and the rest; the table swaps the first two counts.
    let truth = [2, 5, n - 7];
    let lie = [5, 2, n - 7];
    assert_eq!(
        read_all(&assemble_with_table(&env, &cs, &truth, &truth), &root).unwrap(),
        read_all(&bytes, &root).unwrap()
    );
    let bad = assemble_with_table(&env, &cs, &truth, &lie);
    // Reading every pack (verify, store add): the first pack's header disagrees.
    let e = read_all(&bad, &root).unwrap_err();
    assert!(
        matches!(
            e,
            ReadError::PackCountMismatch {
                seq: 0,
                table: 5,
                found: 2
            }
        ),
        "{e:?}"
    );
    let mut r = ArtifactReader::open(&bad[..], &root, NOW).unwrap();
    assert!(matches!(
        r.verify_rest(|_| {}),
        Err(ReadError::PackCountMismatch { seq: 0, .. })
    ));
    // Seeking (install) reads every pack's header and count too (issue 9: one
    // reader, one set of rules): the lie is refused at the first pack, before any
    // chunk, whichever chunks are wanted.
    for wanted in [
        (0..cs.len()).collect::<Vec<_>>(),
        vec![3, 6],
        vec![6],
        vec![],
    ] {
        let ids: Vec<ChunkId> = wanted.iter().map(|&i| cs[i].0).collect();
        let (got, end, _) = read_wanted(&bad, &root, |id| ids.contains(id));
        assert!(got.is_empty(), "wanted {wanted:?}");
        assert!(
            matches!(
                end,
                Err(ReadError::PackCountMismatch {
                    seq: 0,
                    table: 5,
                    found: 2
                })
            ),
            "wanted {wanted:?}: {end:?}"
        );
    }
    // A table that moves the end of the archive: the end check fails.
    let moved = assemble_with_table(&env, &cs, &truth, &[2, 5, n - 8, 1]);
    let (got, end, _) = read_wanted(&moved, &root, |_| false);
    assert!(got.is_empty());
    assert!(
        matches!(end, Err(ReadError::PackCountMismatch { seq: 2, .. })),
        "{end:?}"
    );
}

impl std::io::Seek for Counted<'_> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Regression (issue 9, error contract): an unsigned (or not enough signed)
/// envelope of many megabytes was read whole and decoded before it was refused.
/// `check_envelope_signers` refuses it after reading the tar header, the envelope's
/// first bytes and its signatures, and leaves the source where it was.
#[test]
fn unsigned_and_undersigned_envelopes_are_refused_before_their_bytes_are_read() {
    use shoal_artifact::read::check_envelope_signers;
    let big = vec![0x5au8; 3_000_000];
    let unsigned = tar(&[(
        "manifest.envelope".into(),
        Envelope::new(big.clone()).to_bytes(),
    )]);
    let mut src = Counted {
        inner: Cursor::new(&unsigned),
        read: 0,
    };
    match check_envelope_signers(&mut src, Some(&root(&[1], 1))) {
        Err(ReadError::Unsigned { size }) => assert!(size > 3_000_000),
        other => panic!("{other:?}"),
    }
    assert!(src.read < 1024, "read {} bytes", src.read);
    assert_eq!(src.inner.position(), 0, "left where it was");
    assert!(matches!(
        check_envelope_signers(&mut Cursor::new(&unsigned), None),
        Err(ReadError::Unsigned { .. })
    ));

    // Signed by keys 1 and 2; the root wants 2 of keys 2 and 3.
    let mut env = Envelope::new(big);
    env.sign(&key(1));
    env.sign(&key(2));
    let two = tar(&[("manifest.envelope".into(), env.to_bytes())]);
    let mut src = Counted {
        inner: Cursor::new(&two),
        read: 0,
    };
    match check_envelope_signers(&mut src, Some(&root(&[2, 3], 2))) {
        Err(ReadError::TooFewSigners {
            found: 1,
            threshold: 2,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(src.read < 1024, "read {} bytes", src.read);
    // Enough signers by id, or no root: left to the full check.
    check_envelope_signers(&mut Cursor::new(&two), Some(&root(&[1, 2], 2))).unwrap();
    check_envelope_signers(&mut Cursor::new(&two), None).unwrap();
    // A real artifact passes; garbage is left for the reader to report.
    let (bytes, _) = build(&payload(100_000, 1));
    check_envelope_signers(&mut Cursor::new(&bytes), Some(&root(&[1], 1))).unwrap();
    check_envelope_signers(&mut Cursor::new(&b"not a tar"[..]), None).unwrap();
}

/// Random (incompressible) bytes: only a reference can shrink them.
fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// A base release (full) and a delta-encoded thin artifact of `new` against it.
fn delta_pair(base: &[u8], new: &[u8]) -> (Manifest, Vec<u8>, BuildReport) {
    delta_pair_in(base, new, opts().layout)
}

/// [`delta_pair`] with the thin artifact's chunks laid out as `layout` says.
fn delta_pair_in(base: &[u8], new: &[u8], layout: Layout) -> (Manifest, Vec<u8>, BuildReport) {
    let (base_art, base_report) = build(base);
    drop(base_art);
    let mut o = opts_in(layout);
    o.version = "2.0".into();
    let (out, report) = build_delta_of(base, new, &base_report.manifest, &o, None);
    assert_eq!(report.artifact_len, out.len() as u64);
    (base_report.manifest, out, report)
}

/// `shoal_artifact::build_delta` of `new` (options `o`, key 1) against the base
/// image `base` whose manifest is `base_manifest`, given the base's dictionary or
/// not: the artifact and its report.
fn build_delta_of(
    base: &[u8],
    new: &[u8],
    base_manifest: &Manifest,
    o: &BuildOptions,
    base_dict: Option<&chunk::Dictionary>,
) -> (Vec<u8>, BuildReport) {
    let dir = tempfile::tempdir().unwrap();
    let base_file = dir.path().join("base.img");
    std::fs::write(&base_file, base).unwrap();
    let mut out = Vec::new();
    let report = shoal_artifact::build_delta(
        Cursor::new(new),
        o,
        &[key(1)],
        base_manifest,
        std::fs::File::open(&base_file).unwrap(),
        base_dict,
        dir.path(),
        &mut out,
        |_| {},
    )
    .unwrap();
    (out, report)
}

/// The bytes of a reference, read from the base payload.
fn reference_bytes(base: &[u8], r: &shoal_artifact::Reference) -> Vec<u8> {
    r.ranges
        .iter()
        .flat_map(|&(o, l)| base[o as usize..o as usize + l as usize].iter().copied())
        .collect()
}

/// v2 = v1 with a few bytes changed in two places and a stretch inserted: random
/// data, so the changed chunks compress only against v1's bytes.
fn edited(base: &[u8]) -> Vec<u8> {
    let mut new = base.to_vec();
    new[70_000..70_010].copy_from_slice(b"0123456789");
    new[200_000] ^= 0xff;
    new.splice(300_000..300_000, random(3000, 77));
    new
}

#[test]
fn delta_encoded_chunks_decode_only_against_their_checked_reference() {
    for layout in layouts() {
        delta_encoded_chunks_decode_only_against_their_checked_reference_in(layout);
    }
}

fn delta_encoded_chunks_decode_only_against_their_checked_reference_in(layout: Layout) {
    let base = random(400_000, 5);
    let new = edited(&base);
    let (base_m, art, report) = delta_pair_in(&base, &new, layout);
    let m = &report.manifest;
    assert_eq!(m.format_version, shoal_artifact::FORMAT_VERSION_REFERENCES);
    assert!(report.chunks_delta >= 3, "{report:?}");
    assert_eq!(report.chunks_delta, report.chunks_written, "{report:?}");
    // Far smaller than the same chunks stored plain (random bytes do not compress).
    let (plain_thin, plain_report) = build_with(&new, &opts_in(layout), &[key(1)], Some(&base_m));
    assert!(
        report.stored_bytes * 5 < plain_report.stored_bytes,
        "delta {} vs plain {}",
        report.stored_bytes,
        plain_report.stored_bytes
    );
    assert!(art.len() < plain_thin.len());

    let r = root(&[1], 1);
    let mut reader = ArtifactReader::open(&art[..], &r, NOW).unwrap();
    let mut chunks = 0;
    while let Some(raw) = reader.next_raw().unwrap() {
        let reference = raw
            .reference()
            .expect("every chunk here is delta-encoded")
            .clone();
        // Without its reference a delta chunk is refused, by name.
        assert_eq!(
            raw.verify(),
            Err(ChunkError::NeedsReference { id: raw.chunk.id })
        );
        // Bytes that are not the base's fail the reference's hash.
        let mut wrong = reference_bytes(&base, &reference);
        wrong[0] ^= 1;
        assert!(matches!(
            reference.check(wrong),
            Err(shoal_artifact::ReferenceError::Hash { .. })
        ));
        // Checked bytes of another reference are refused too.
        let other = shoal_artifact::Reference {
            ranges: vec![(0, 100)],
            hash: *blake3::hash(&base[..100]).as_bytes(),
            chunks: vec![0],
        };
        let other = other.check(base[..100].to_vec()).unwrap();
        assert_eq!(
            raw.verify_against(&other).unwrap_err(),
            ChunkError::WrongReference { id: raw.chunk.id }
        );
        // The right bytes decode to the chunk, hash-checked.
        let ok = reference.check(reference_bytes(&base, &reference)).unwrap();
        let v = raw.verify_against(&ok).unwrap();
        assert_eq!(ChunkId::of(v.data()), raw.chunk.id);
        chunks += 1;
    }
    assert_eq!(chunks, report.chunks_written);
}

#[test]
fn a_tampered_delta_frame_is_refused_after_decoding() {
    let base = random(400_000, 6);
    let new = edited(&base);
    let (_, art, report) = delta_pair(&base, &new);
    let r = root(&[1], 1);
    let mut reader = ArtifactReader::open(&art[..], &r, NOW).unwrap();
    let raw = reader.next_raw().unwrap().unwrap();
    let reference = raw.reference().unwrap().clone();
    let ok = reference.check(reference_bytes(&base, &reference)).unwrap();
    // The same frame decoded against a shifted window of the base: the hash check
    // (or zstd) catches it, never yields wrong bytes.
    let shifted = shoal_artifact::Reference {
        ranges: reference.ranges.iter().map(|&(o, l)| (o + 1, l)).collect(),
        hash: [0; 32],
        chunks: vec![0],
    };
    let bytes = reference_bytes(&base, &shifted);
    let decoded = shoal_artifact::chunk::decode_against(raw.stored(), &raw.chunk, &bytes);
    assert!(
        matches!(
            decoded,
            Err(ChunkError::HashMismatch { .. } | ChunkError::Corrupt { .. })
        ),
        "{decoded:?}"
    );
    assert!(raw.verify_against(&ok).is_ok());
    assert!(report.references >= 1);
}

#[test]
fn build_delta_refuses_a_base_image_that_is_not_the_base() {
    let base = random(400_000, 8);
    let (_, base_report) = build(&base);
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.img");
    let mut other = base.clone();
    other[1000] ^= 1;
    std::fs::write(&wrong, &other).unwrap();
    let e = shoal_artifact::build_delta(
        Cursor::new(edited(&base)),
        &opts(),
        &[key(1)],
        &base_report.manifest,
        std::fs::File::open(&wrong).unwrap(),
        None,
        dir.path(),
        Vec::new(),
        |_| {},
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the base image is not the base release's payload \"rootfs\" (its hash differs)"
    );
}

#[test]
fn a_delta_build_drops_the_dictionary_when_it_does_not_pay() {
    let base = payload(400_000, 21);
    let new = edited(&base);
    let (base_art, base_report) = build(&base);
    drop(base_art);
    let dir = tempfile::tempdir().unwrap();
    let base_file = dir.path().join("base.img");
    std::fs::write(&base_file, &base).unwrap();
    let mut o = opts();
    o.dictionary = true;
    let mut out = Vec::new();
    let report = shoal_artifact::build_delta(
        Cursor::new(&new),
        &o,
        &[key(1)],
        &base_report.manifest,
        std::fs::File::open(&base_file).unwrap(),
        None,
        dir.path(),
        &mut out,
        |_| {},
    )
    .unwrap();
    // The new chunks are small edits of the base (delta-encoded) and one of new
    // random bytes: a dictionary could only cost.
    assert_eq!(
        (report.chunks_delta, report.chunks_written),
        (3, 4),
        "{report:?}"
    );
    assert_eq!(report.dictionary_len, 0, "{report:?}");
    assert!(!members(&out).iter().any(|(_, p, _)| p == "dictionary"));
    assert_eq!(report.artifact_len, out.len() as u64);
    // The stored sizes the manifest signs are those of the spool written.
    let r = root(&[1], 1);
    let mut reader = ArtifactReader::open(&out[..], &r, NOW).unwrap();
    let mut n = 0;
    while let Some(raw) = reader.next_raw().unwrap() {
        match raw.reference().cloned() {
            Some(reference) => {
                let ok = reference.check(reference_bytes(&base, &reference)).unwrap();
                raw.verify_against(&ok).unwrap();
            }
            // The plain chunk was compressed without the dictionary it dropped.
            None => {
                raw.verify().unwrap();
            }
        }
        n += 1;
    }
    assert_eq!(n, report.chunks_written);
}

#[test]
fn unchecked_reference_bytes_decode_and_wrong_ones_name_the_reference() {
    let base = random(400_000, 9);
    let new = edited(&base);
    let (_, art, _) = delta_pair(&base, &new);
    let r = root(&[1], 1);
    let mut reader = ArtifactReader::open(&art[..], &r, NOW).unwrap();
    let raw = reader.next_raw().unwrap().unwrap();
    let reference = raw.reference().unwrap().clone();
    // Bytes read without their hash check decode the chunk (which is hashed).
    let read = reference.read(reference_bytes(&base, &reference)).unwrap();
    assert_eq!(
        ChunkId::of(raw.verify_against(&read).unwrap().data()),
        raw.chunk.id
    );
    // Wrong bytes of the right length: refused by the reference's hash, before any
    // decoding.
    let mut wrong = reference_bytes(&base, &reference);
    for b in wrong.iter_mut() {
        *b ^= 0x5a;
    }
    let wrong = reference.read(wrong).unwrap();
    match raw.verify_against(&wrong) {
        Err(ChunkError::BadReference { id, source }) => {
            assert_eq!(id, raw.chunk.id);
            assert!(matches!(
                source,
                shoal_artifact::ReferenceError::Hash { .. }
            ));
        }
        other => panic!("{other:?}"),
    }
    // A length that is not the reference's is refused when read.
    assert_eq!(
        reference.read(vec![0; 10]).unwrap_err(),
        shoal_artifact::ReferenceError::Length {
            expected: reference.len(),
            found: 10
        }
    );
}

/// A delta pair with the base image written to `dir`: (base artifact, delta
/// artifact, base image path).
fn delta_files(dir: &std::path::Path, base: &[u8], new: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let (base_art, _) = build(base);
    std::fs::write(dir.join("base.img"), base).unwrap();
    let (_, art, _) = delta_pair(base, new);
    (base_art, art)
}

#[test]
fn a_delta_artifact_verifies_and_extracts_against_its_base_image() {
    let dir = tempfile::tempdir().unwrap();
    let base = random(400_000, 10);
    let new = edited(&base);
    let (base_art, art) = delta_files(dir.path(), &base, &new);
    let r = root(&[1], 1);
    let image_path = dir.path().join("base.img");

    // Without the image, the first delta chunk is refused by name.
    let mut reader = ArtifactReader::open(&art[..], &r, NOW).unwrap();
    assert!(matches!(
        reader.verify_rest(|_| {}),
        Err(ReadError::Chunk(ChunkError::NeedsReference { .. }))
    ));
    // With it, every chunk decodes and verifies.
    let mut image = shoal_artifact::BaseImage::open(&image_path).unwrap();
    let mut reader = ArtifactReader::open(&art[..], &r, NOW).unwrap();
    let n = reader.verify_rest_with(Some(&mut image), |_| {}).unwrap();
    assert!(n >= 3, "{n}");

    // Extract: base chunks from the image (located by the base manifest),
    // references from the image too; the output is the new payload exactly.
    let base_m = ArtifactReader::open(&base_art[..], &r, NOW)
        .unwrap()
        .manifest()
        .clone();
    let mut chunks = shoal_artifact::BaseImage::open(&image_path).unwrap();
    assert!(chunks.index(&base_m, "rootfs"));
    let mut refs = shoal_artifact::BaseImage::open(&image_path).unwrap();
    let reader = ArtifactReader::open_with_base(&art[..], &r, NOW, Some(&base_m)).unwrap();
    let mut out = Cursor::new(Vec::new());
    let size = shoal_artifact::extract(
        reader,
        Some((shoal_artifact::BaseChunks::Image(&chunks), &base_m)),
        Some(&mut refs),
        &mut out,
        |_| {},
    )
    .unwrap();
    assert_eq!(size, new.len() as u64);
    assert_eq!(out.into_inner(), new);
}

#[test]
fn verifying_a_delta_artifact_against_another_image_names_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let base = random(400_000, 11);
    let new = edited(&base);
    let (_, art) = delta_files(dir.path(), &base, &new);
    let r = root(&[1], 1);
    // Another image of the same size: references fail their hash.
    let other = dir.path().join("other.img");
    std::fs::write(&other, random(400_000, 12)).unwrap();
    let mut image = shoal_artifact::BaseImage::open(&other).unwrap();
    let mut reader = ArtifactReader::open(&art[..], &r, NOW).unwrap();
    match reader.verify_rest_with(Some(&mut image), |_| {}) {
        Err(ReadError::Chunk(ChunkError::BadReference { source, .. })) => {
            assert!(matches!(
                source,
                shoal_artifact::ReferenceError::Hash { .. }
            ));
        }
        other => panic!("{other:?}"),
    }
    // A shorter image: the reference cannot be read, which is said.
    let short = dir.path().join("short.img");
    std::fs::write(&short, &base[..1000]).unwrap();
    let mut image = shoal_artifact::BaseImage::open(&short).unwrap();
    let mut reader = ArtifactReader::open(&art[..], &r, NOW).unwrap();
    let e = reader
        .verify_rest_with(Some(&mut image), |_| {})
        .unwrap_err();
    assert!(
        matches!(&e, ReadError::ReferenceRead { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof),
        "{e:?}"
    );
    // Base chunks read from a wrong image fail their hash, by name.
    let (base_art, _) = build(&base);
    let base_m = ArtifactReader::open(&base_art[..], &r, NOW)
        .unwrap()
        .manifest()
        .clone();
    let mut chunks = shoal_artifact::BaseImage::open(&other).unwrap();
    assert!(chunks.index(&base_m, "rootfs"));
    let c = base_m.payloads[0].chunks[0];
    assert!(matches!(
        chunks.chunk(&c),
        Err(shoal_artifact::BaseChunkError::Hash { id, offset: 0, .. }) if id == c.id
    ));
}

/// Issue 12: a thin artifact's manifest travels as a delta against its base's; a
/// reader rebuilds the whole manifest from the one it holds and verifies the
/// signatures over it before anything else.
#[test]
fn a_thin_manifest_travels_as_a_delta_and_is_verified_whole() {
    use shoal_artifact::{HeldManifests, ManifestDeltaError, NoManifests};
    let v1 = payload(600_000, 1);
    let mut v2 = v1.clone();
    v2[100_000..100_400].copy_from_slice(&payload(400, 9));
    let (_, r1) = build_with(&v1, &opts(), &[key(1)], None);
    // The default layout, which `diff` sizes.
    let (plain, rp) = build_with(&v2, &data_opts(), &[key(1)], Some(&r1.manifest));
    let mut o = data_opts();
    o.manifest_delta = true;
    let (delta, rd) = build_with(&v2, &o, &[key(1)], Some(&r1.manifest));
    // The same signed manifest, sent smaller.
    assert_eq!(rd.manifest.hash(), rp.manifest.hash());
    let m = members(&delta);
    assert_eq!(
        (m[0].1.as_str(), m[0].2 as u64),
        ("manifest.delta", rd.envelope_len)
    );
    assert!(
        rd.envelope_len * 4 < rp.envelope_len,
        "{} vs {}",
        rd.envelope_len,
        rp.envelope_len
    );
    assert_eq!(
        delta.len() as u64,
        plain.len() as u64 - member_len(rp.envelope_len) + member_len(rd.envelope_len)
    );
    let plain_envelope = ArtifactReader::open(&plain[..], &root(&[1], 1), NOW)
        .unwrap()
        .envelope()
        .clone();
    let d = shoal_artifact::diff(
        &r1.manifest,
        &rd.manifest,
        &plain_envelope,
        0,
        true,
        Layout::Data,
    );
    assert_eq!(
        (d.manifest_bytes, d.download_bytes),
        (rd.envelope_len, delta.len() as u64)
    );

    let r13 = root(&[1], 1);
    // Without the base manifest: refused, naming it.
    match ArtifactReader::open(&delta[..], &r13, NOW) {
        Err(ReadError::ManifestDelta(ManifestDeltaError::UnknownBase { base })) => {
            assert_eq!(base, hex::encode(r1.manifest.hash()))
        }
        other => panic!("{other:?}"),
    }
    // With it: the whole manifest, verified, and the chunks.
    let held = vec![r1.manifest.to_cbor()];
    let mut r = ArtifactReader::open_held(&delta[..], &r13, NOW, None, &held).unwrap();
    assert_eq!(r.manifest(), &rp.manifest);
    assert_eq!(r.manifest_delta_base(), Some(&r1.manifest.hash()));
    let mut n = 0;
    while r.next_chunk().unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, rp.chunks_written);
    // Signed by a key the root does not take: the rebuilt manifest's signature
    // check refuses it.
    assert!(matches!(
        ArtifactReader::open_held(&delta[..], &root(&[2], 1), NOW, None, &held),
        Err(ReadError::Signature(_))
    ));
    // A frame byte flipped: it no longer decodes, or decodes to bytes the signature
    // does not cover; either way refused before a manifest is returned.
    let at = m[0].0 + 512 + 60;
    let mut bad = delta.clone();
    bad[at] ^= 0x40;
    match ArtifactReader::open_held(&bad[..], &r13, NOW, None, &held) {
        Err(ReadError::ManifestDelta(ManifestDeltaError::Corrupt(_)))
        | Err(ReadError::ManifestDelta(ManifestDeltaError::SizeMismatch { .. }))
        | Err(ReadError::ManifestDelta(ManifestDeltaError::Decode(_)))
        | Err(ReadError::Signature(_)) => {}
        other => panic!("{other:?}"),
    }
    // Signatures stripped: unsigned, refused before the frame is decoded.
    let mut md =
        shoal_artifact::ManifestDelta::from_bytes(&delta[m[0].0 + 512..m[0].0 + 512 + m[0].2])
            .unwrap();
    md.signatures.clear();
    let mut unsigned = Vec::new();
    ustar::write_member(&mut unsigned, "manifest.delta", &md.to_bytes()).unwrap();
    let rest = m[1].0;
    unsigned.extend_from_slice(&delta[rest..]);
    assert!(matches!(
        ArtifactReader::open_held(&unsigned[..], &r13, NOW, None, &held),
        Err(ReadError::Unsigned { .. })
    ));
    assert!(NoManifests.manifest(&r1.manifest.hash()).is_none());

    // Signing again keeps the delta, and the second signature counts.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.shoal");
    std::fs::write(&path, &delta).unwrap();
    assert!(matches!(
        shoal_artifact::add_signatures(&path, &[key(2)], &NoManifests),
        Err(shoal_artifact::SignError::Read(ReadError::ManifestDelta(
            ManifestDeltaError::UnknownBase { .. }
        )))
    ));
    assert_eq!(
        shoal_artifact::add_signatures(&path, &[key(2)], &held).unwrap(),
        2
    );
    let two = std::fs::read(&path).unwrap();
    assert_eq!(members(&two)[0].1, "manifest.delta");
    let r = ArtifactReader::open_held(&two[..], &root(&[1, 2], 2), NOW, None, &held).unwrap();
    assert_eq!(r.manifest(), &rp.manifest);
}

/// The distinct chunks of a manifest, kept outside the reader (as the engine's chunk
/// table keeps them).
#[derive(Debug)]
struct List {
    hash: [u8; 32],
    chunks: Vec<ChunkRef>,
}

impl shoal_artifact::ChunkList for List {
    fn manifest_hash(&self) -> [u8; 32] {
        self.hash
    }
    fn distinct_len(&self) -> usize {
        self.chunks.len()
    }
    fn distinct_chunk(&self, k: usize) -> ChunkRef {
        self.chunks[k]
    }
}

/// Reads every chunk of `bytes` with the reader's chunk lists shed and its packs
/// bound to a list kept outside it; returns what `holds` said and the chunks.
fn read_bound(bytes: &[u8], root: &TrustRoot) -> Result<(Vec<ChunkId>, Stored), ReadError> {
    let streamed = read_bound_as(bytes, root, true);
    let whole = read_bound_as(bytes, root, false);
    let summary = |r: &Result<(Vec<ChunkId>, Stored), ReadError>| match r {
        Ok((holds, chunks)) => Ok((
            holds.clone(),
            chunks
                .iter()
                .map(|c| blake3::hash(&format!("{c:?}").into_bytes()))
                .collect::<Vec<_>>(),
        )),
        Err(e) => Err(format!("{e:?}")),
    };
    assert!(
        summary(&streamed) == summary(&whole),
        "opened without its chunk list, the reader reads the same: {:?} vs {:?}",
        streamed.as_ref().err(),
        whole.as_ref().err()
    );
    let stored = read_bound_stored(bytes, root);
    assert!(
        summary(&stored) == summary(&whole),
        "opened from its copied envelope, the reader reads the same: {:?} vs {:?}",
        stored.as_ref().err(),
        whole.as_ref().err()
    );
    whole
}

/// The copied envelope, the hash its signatures were verified over, and the
/// artifact's bytes after it.
type Copied<'a> = (Vec<u8>, [u8; 32], &'a [u8]);

/// The envelope member of `bytes` copied out as the installer copies it to the
/// device store's file (`read_envelope_head`, `copy_envelope_member`, checked
/// with `check_copied_envelope`), its signatures verified there, and the rest of
/// `bytes` after it: the source left at the member after the envelope.
fn copy_envelope<'a>(bytes: &'a [u8], root: &TrustRoot) -> Result<Copied<'a>, ReadError> {
    use shoal_artifact::read::{
        CopyError, EnvelopeHead, check_copied_envelope, copy_envelope_member, read_envelope_head,
    };
    let mut src = bytes;
    let EnvelopeHead::Member { len } = read_envelope_head(&mut src, &shoal_artifact::NoManifests)?
    else {
        panic!("not a manifest delta");
    };
    let mut copied = Vec::new();
    copy_envelope_member(&mut src, len, &mut copied).map_err(|e| match e {
        CopyError::Read(e) => e,
        CopyError::Write(e) => panic!("a Vec takes every byte: {e}"),
    })?;
    assert_eq!(copied.len() as u64, len);
    check_copied_envelope(&mut Cursor::new(&copied[..]), len)?;
    let envelope = Envelope::from_vec(copied.clone())?;
    let hash = *blake3::hash(root.verify(RoleName::Release, &envelope, NOW)?).as_bytes();
    Ok((copied, hash, src))
}

/// [`read_bound_as`] of a reader opened from its copied envelope
/// (`open_stored`, as the installer opens it).
fn read_bound_stored(bytes: &[u8], root: &TrustRoot) -> Result<(Vec<ChunkId>, Stored), ReadError> {
    let manifest = ArtifactReader::open(bytes, root, NOW)?.manifest().clone();
    let (copied, hash, rest) = copy_envelope(bytes, root)?;
    let len = copied.len() as u64;
    let mut r = ArtifactReader::open_stored(rest, &&copied[..], len, &hash, len, None)?;
    assert_eq!(*r.manifest(), {
        // The list, a full artifact's or a thin one's, is streamed out and dropped.
        let mut m = manifest.clone();
        m.payloads[0].chunks.clear();
        m
    });
    assert!(r.envelope().signed.is_empty(), "the envelope is not held");
    r.shed_chunk_lists_unbound()?;
    read_against(r, hash, &manifest)
}

/// Binds `r`'s packs to `manifest`'s distinct chunks (kept outside it, named by
/// `hash`) and reads every chunk; returns what `holds` said and the chunks.
fn read_against<R: std::io::Read>(
    mut r: ArtifactReader<R>,
    hash: [u8; 32],
    manifest: &Manifest,
) -> Result<(Vec<ChunkId>, Stored), ReadError> {
    let list = List {
        hash,
        chunks: manifest.distinct_chunks(),
    };
    r.bind_to(std::sync::Arc::new(list))?;
    let holds = r.holds()?;
    let mut out = Vec::new();
    while let Some(c) = r.next_chunk()? {
        out.push(c);
    }
    Ok((holds, out))
}

/// Issue 10 (memory): the installer's envelope copied out of the artifact gives
/// the reader's errors for malformed members (truncated, unsigned, not an
/// envelope), and a reader opened from it decodes only the signed bytes the
/// verifier checked (another hash is refused).
#[test]
fn an_envelope_copied_out_gives_the_readers_errors_and_binds_to_its_hash() {
    let (full, _) = build(&payload(300_000, 5));
    let root = root(&[1], 1);
    let opened = |bytes: &[u8]| ArtifactReader::open(bytes, &root, NOW).map(|_| ());
    let copied = |bytes: &[u8]| copy_envelope(bytes, &root).map(|_| ());
    let mut ms = member_data(&full);
    let envelope = ms[0].1.clone();
    // Truncated inside the envelope.
    let cut = &full[..512 + envelope.len() / 2];
    assert!(
        matches!(copied(cut), Err(ReadError::Truncated { ref what }) if what == "the envelope")
    );
    assert_eq!(format!("{:?}", copied(cut)), format!("{:?}", opened(cut)));
    // Unsigned.
    let mut unsigned = Envelope::from_vec(envelope.clone()).unwrap();
    unsigned.signatures.clear();
    ms[0].1 = unsigned.to_bytes();
    let bytes = tar(&ms);
    assert!(matches!(copied(&bytes), Err(ReadError::Unsigned { .. })));
    assert_eq!(
        format!("{:?}", copied(&bytes)),
        format!("{:?}", opened(&bytes))
    );
    // Not an envelope at all.
    ms[0].1 = b"not cbor at all".to_vec();
    let bytes = tar(&ms);
    assert!(matches!(copied(&bytes), Err(ReadError::Envelope(_))));
    assert_eq!(
        format!("{:?}", copied(&bytes)),
        format!("{:?}", opened(&bytes))
    );
    // Every byte of the envelope flipped in turn (a stride of them): the copy's
    // checks and verdict agree with the reader's.
    for at in (0..envelope.len()).step_by(envelope.len() / 97 + 1) {
        let mut flipped = envelope.clone();
        flipped[at] ^= 0x20;
        ms[0].1 = flipped;
        let bytes = tar(&ms);
        assert_eq!(
            format!("{:?}", copied(&bytes)),
            format!("{:?}", opened(&bytes)),
            "flip at {at}"
        );
    }

    // The reader decodes the copied file's signed bytes only against the hash
    // the signatures were verified over.
    let (copy, hash, rest) = copy_envelope(&full, &root).unwrap();
    let len = copy.len() as u64;
    let mut other = hash;
    other[0] ^= 1;
    let e = ArtifactReader::open_stored(rest, &&copy[..], len, &other, len, None).unwrap_err();
    assert!(e.to_string().contains("the signed manifest changed"), "{e}");
    assert!(ArtifactReader::open_stored(rest, &&copy[..], len, &hash, len, None).is_ok());
}

/// [`read_bound`], the reader opened with its manifest's chunk list streamed
/// out (`open_held_unbound`, as the installer opens it) or decoded whole.
fn read_bound_as(
    bytes: &[u8],
    root: &TrustRoot,
    streamed: bool,
) -> Result<(Vec<ChunkId>, Stored), ReadError> {
    let manifest = ArtifactReader::open(bytes, root, NOW)?.manifest().clone();
    let mut r = if streamed {
        ArtifactReader::open_held_unbound(bytes, root, NOW, &shoal_artifact::NoManifests)?
    } else {
        ArtifactReader::open(bytes, root, NOW)?
    };
    r.shed_chunk_lists_unbound()?;
    assert!(r.manifest().payloads.iter().all(|p| p.chunks.is_empty()));
    let hash = *blake3::hash(&r.envelope().signed).as_bytes();
    read_against(r, hash, &manifest)
}

/// Issue 10 (memory): a reader whose packs are bound to a chunk list kept elsewhere
/// reads exactly what it reads with its own list, full and thin, and a full
/// artifact whose contents member leaves a chunk out is refused when binding, with
/// the chunk it lacks.
#[test]
fn packs_bound_to_a_shared_chunk_list_read_as_with_the_readers_own() {
    for layout in layouts() {
        bound_to_a_shared_chunk_list_read_as_with_the_readers_own_in(layout);
    }
}

fn bound_to_a_shared_chunk_list_read_as_with_the_readers_own_in(layout: Layout) {
    // With zeros: chunks that repeat (the same id at several positions), which
    // the reader opened without its list counts once.
    let mut v1 = payload(600_000, 3);
    v1[100_000..400_000].fill(0);
    let mut v2 = v1.clone();
    v2[300_000..310_000].copy_from_slice(&payload(10_000, 4));
    let (full1, r1) = build_in(&v1, layout);
    let mut o2 = opts_in(layout);
    o2.version = "2.0".into();
    let (thin, _) = build_with(&v2, &o2, &[key(1)], Some(&r1.manifest));
    let root = root(&[1], 1);
    for bytes in [&full1, &thin] {
        let mut own = ArtifactReader::open(&bytes[..], &root, NOW).unwrap();
        let holds = own.holds().unwrap();
        let mut chunks = Vec::new();
        while let Some(c) = own.next_chunk().unwrap() {
            chunks.push(c);
        }
        assert!(!chunks.is_empty());
        assert_eq!(read_bound(bytes, &root).unwrap(), (holds, chunks));
    }

    // The full artifact with a contents member that leaves its third chunk out.
    let distinct = r1.manifest.distinct_chunks();
    assert!(
        distinct.len() < r1.manifest.payloads[0].chunks.len(),
        "some chunks repeat"
    );
    let left_out = distinct[2].id;
    let bits = shoal_artifact::read::contents_bitmap(&distinct, |id| *id != left_out);
    let mut ms = member_data(&full1);
    ms.insert(1, (CONTENTS_MEMBER.to_string(), bits));
    let lacking = tar(&ms);
    assert!(matches!(
        read_bound(&lacking, &root),
        Err(ReadError::MissingChunk(id)) if id == left_out
    ));
    // The same without its pack table: found when binding.
    ms.retain(|(p, _)| p != PACK_TABLE_MEMBER);
    let lacking = tar(&ms);
    assert!(matches!(
        read_bound(&lacking, &root),
        Err(ReadError::MissingChunk(id)) if id == left_out
    ));
}

/// Issue 10 (memory): a thin artifact with delta-encoded chunks opened as the
/// installer opens it (from its copied envelope, or streamed) holds no chunk
/// list, not even before its lists are shed, yet gives each chunk the same
/// reference as a reader with its own list, and reads the same chunks. (That
/// only the referenced positions' ids are kept is checked where the manifest is
/// decoded: `a_manifest_decoded_without_its_list_keeps_only_the_referenced_ids`.)
#[test]
fn a_thin_reader_opened_without_its_list_gives_its_chunks_their_references() {
    // Zeros in both: ids that repeat, so the references' first positions are
    // told from full ids, not from unique prefixes alone.
    let mut base = random(400_000, 8);
    base[100_000..180_000].fill(0);
    let new = edited(&base);
    let (_, art, report) = delta_pair(&base, &new);
    assert!(report.chunks_delta >= 3, "{report:?}");
    assert!(report.manifest.distinct_count() < report.manifest.payloads[0].chunks.len());
    let root = root(&[1], 1);
    let references = |mut r: ArtifactReader<&[u8]>| {
        let mut out = Vec::new();
        while let Some(raw) = r.next_raw().unwrap() {
            out.push((raw.chunk.id, raw.reference().map(|r| (**r).clone())));
        }
        out
    };
    let whole = references(ArtifactReader::open(&art[..], &root, NOW).unwrap());
    assert!(
        whole.iter().all(|(_, r)| r.is_some()),
        "every chunk is delta"
    );

    let (copied, hash, rest) = copy_envelope(&art, &root).unwrap();
    let len = copied.len() as u64;
    let stored = ArtifactReader::open_stored(rest, &&copied[..], len, &hash, len, None).unwrap();
    let streamed =
        ArtifactReader::open_held_unbound(&art[..], &root, NOW, &shoal_artifact::NoManifests)
            .unwrap();
    let list = std::sync::Arc::new(List {
        hash,
        chunks: report.manifest.distinct_chunks(),
    });
    for mut r in [stored, streamed] {
        assert!(r.is_thin());
        assert!(
            r.manifest().payloads[0].chunks.is_empty(),
            "no chunk list is decoded"
        );
        assert_eq!(
            r.manifest().payloads[0].references,
            report.manifest.payloads[0].references
        );
        r.shed_chunk_lists_unbound().unwrap();
        r.bind_to(list.clone()).unwrap();
        assert_eq!(
            r.holds().unwrap(),
            whole.iter().map(|(id, _)| *id).collect::<Vec<_>>()
        );
        assert_eq!(references(r), whole);
    }
}

/// Issue 10: the references of a thin manifest decoded without its chunk list
/// are checked as a whole decode checks them, with the same errors: a position
/// out of the list, one that is not its id's first (an id that repeats), and
/// one that is (allowed).
#[test]
fn a_thin_manifests_references_are_checked_without_its_list_as_with_it() {
    let mut base = random(400_000, 9);
    base[100_000..180_000].fill(0);
    let new = edited(&base);
    let (_, art, report) = delta_pair(&base, &new);
    let m = &report.manifest;
    let chunks = &m.payloads[0].chunks;
    // A repeated id: its first position and a later one.
    let (first, later) = (0..chunks.len())
        .find_map(|j| {
            let i = chunks.iter().position(|c| c.id == chunks[j].id)?;
            (i < j).then_some((i as u32, j as u32))
        })
        .expect("zeros repeat");
    let root = root(&[1], 1);
    let opened = |bytes: &[u8]| -> [Result<(), String>; 3] {
        let debug = |r: Result<(), ReadError>| r.map_err(|e| format!("{e:?}"));
        let whole = debug(ArtifactReader::open(bytes, &root, NOW).map(|_| ()));
        let streamed = debug(
            ArtifactReader::open_held_unbound(bytes, &root, NOW, &shoal_artifact::NoManifests)
                .map(|_| ()),
        );
        let stored = debug(
            copy_envelope(bytes, &root).and_then(|(copied, hash, rest)| {
                let len = copied.len() as u64;
                ArtifactReader::open_stored(rest, &&copied[..], len, &hash, len, None).map(|_| ())
            }),
        );
        [whole, streamed, stored]
    };
    let with_chunks = |positions: Vec<u32>| {
        let mut m = m.clone();
        m.payloads[0].references[0].chunks = positions;
        let mut ms = member_data(&art);
        ms[0].1 = signed(&m);
        tar(&ms)
    };
    let out_of_range = with_chunks(vec![chunks.len() as u32]);
    let not_first = with_chunks(vec![later]);
    let is_first = with_chunks(vec![first]);
    for (bytes, problem) in [
        (&out_of_range, Some("ChunkOutOfRange")),
        (&not_first, Some("NotFirst")),
        (&is_first, None),
    ] {
        let [whole, streamed, stored] = opened(bytes);
        match problem {
            Some(p) => assert!(
                whole.as_ref().is_err_and(|e| e.contains(p)),
                "{p}: {whole:?}"
            ),
            None => assert_eq!(whole, Ok(())),
        }
        assert_eq!(streamed, whole, "{problem:?}");
        assert_eq!(stored, whole, "{problem:?}");
    }
}

/// Issue 10 (review13c): two different ids that share their first 4 bytes (the
/// only case where a reader without its chunk list needs full ids) are two
/// distinct chunks, and the later one's position is its id's first: a reference
/// naming it is accepted, and the distinct count (the contents member's length,
/// the list bound) is a reader's with its own list.
#[test]
fn a_thin_reader_without_its_list_tells_ids_that_share_a_prefix() {
    let base = random(400_000, 10);
    let new = edited(&base);
    let (_, art, report) = delta_pair(&base, &new);
    let mut m = report.manifest.clone();
    let chunks = &m.payloads[0].chunks;
    let unique = |k: usize| chunks.iter().filter(|c| c.id == chunks[k].id).count() == 1;
    // A position a reference names, and an earlier one, both of ids that do not repeat.
    let j = m.payloads[0].references[0].chunks[0] as usize;
    let i = (0..j).find(|&i| unique(i)).expect("an earlier chunk");
    assert!(unique(j));
    let mut id = chunks[j].id;
    id.0[..4].copy_from_slice(&chunks[i].id.0[..4]);
    assert_ne!(id, chunks[i].id);
    m.payloads[0].chunks[j].id = id;
    let distinct = m.distinct_chunks();
    assert_eq!(distinct.len(), report.manifest.distinct_count());
    let mut ms = member_data(&art);
    ms[0].1 = signed(&m);
    let contents = &mut ms
        .iter_mut()
        .find(|(p, _)| p == CONTENTS_MEMBER)
        .expect("contents")
        .1;
    assert_eq!(contents.len(), distinct.len().div_ceil(8));
    // The last distinct chunk marked (its pack table, which no longer adds up,
    // left out): a count one short would be refused.
    *contents.last_mut().unwrap() |= 1 << ((distinct.len() - 1) % 8);
    ms.retain(|(p, _)| p != PACK_TABLE_MEMBER);
    let bytes = tar(&ms);
    let root = root(&[1], 1);
    let own = ArtifactReader::open(&bytes[..], &root, NOW)
        .unwrap()
        .holds()
        .unwrap();
    let list = std::sync::Arc::new(List {
        hash: m.hash(),
        chunks: distinct,
    });
    let (copied, hash, rest) = copy_envelope(&bytes, &root).unwrap();
    let len = copied.len() as u64;
    let stored = ArtifactReader::open_stored(rest, &&copied[..], len, &hash, len, None).unwrap();
    let streamed =
        ArtifactReader::open_held_unbound(&bytes[..], &root, NOW, &shoal_artifact::NoManifests)
            .unwrap();
    for mut r in [stored, streamed] {
        assert!(r.manifest().payloads[0].chunks.is_empty());
        r.shed_chunk_lists_unbound().unwrap();
        r.bind_to(list.clone()).unwrap();
        assert_eq!(r.holds().unwrap(), own);
    }
}

/// A thin artifact of a 600 kB image with 10 kB changed, against the image's
/// full build: the thin artifact, the base's report and its own.
fn thin_of_one_edit() -> (Vec<u8>, BuildReport, BuildReport) {
    let v1 = payload(600_000, 3);
    let mut v2 = v1.clone();
    v2[300_000..310_000].copy_from_slice(&payload(10_000, 4));
    let (_, r1) = build(&v1);
    let mut o2 = opts();
    o2.version = "2.0".into();
    let (thin, r2) = build_with(&v2, &o2, &[key(1)], Some(&r1.manifest));
    (thin, r1, r2)
}

/// Issue 10: a thin artifact opened without its chunk list, told its base
/// release, is checked against it when its packs are bound: a chunk the base
/// lacks that the contents member leaves out is refused, by id, as a reader
/// with its own list refuses it.
#[test]
fn a_thin_reader_without_its_list_checks_its_base_when_bound() {
    let (thin, r1, r2) = thin_of_one_edit();
    let root = root(&[1], 1);
    let distinct = r2.manifest.distinct_chunks();
    let in_base: std::collections::HashSet<ChunkId> = r1.manifest.payloads[0]
        .chunks
        .iter()
        .map(|c| c.id)
        .collect();
    let lacking = distinct
        .iter()
        .find(|c| !in_base.contains(&c.id))
        .expect("a new chunk")
        .id;
    let mut ms = member_data(&thin);
    let at = ms
        .iter()
        .position(|(p, _)| p == CONTENTS_MEMBER)
        .expect("contents");
    ms[at].1 = shoal_artifact::read::contents_bitmap(&distinct, |id| {
        !in_base.contains(id) && *id != lacking
    });
    // With its pack table, whose counts no longer add up to what the contents
    // member marks: refused as the members before the first pack are read (a
    // reader with its own list checks the base first).
    let with_table = tar(&ms);
    {
        let mut r = ArtifactReader::open_held_unbound(
            &with_table[..],
            &root,
            NOW,
            &shoal_artifact::NoManifests,
        )
        .unwrap();
        r.set_base(&r1.manifest);
        let shed = r.shed_chunk_lists_unbound();
        assert!(
            matches!(shed, Err(ReadError::PackTableSum { .. })),
            "{shed:?}"
        );
        let own = ArtifactReader::open_with_base(&with_table[..], &root, NOW, Some(&r1.manifest))
            .unwrap()
            .holds();
        assert!(matches!(own, Err(ReadError::MissingChunk(id)) if id == lacking));
    }
    // Without its pack table: found when binding.
    ms.retain(|(p, _)| p != PACK_TABLE_MEMBER);
    let list = std::sync::Arc::new(List {
        hash: r2.manifest.hash(),
        chunks: distinct.clone(),
    });
    for bytes in [thin.clone(), tar(&ms)] {
        let mut own =
            ArtifactReader::open_with_base(&bytes[..], &root, NOW, Some(&r1.manifest)).unwrap();
        let own = own.holds();
        let mut r =
            ArtifactReader::open_held_unbound(&bytes[..], &root, NOW, &shoal_artifact::NoManifests)
                .unwrap();
        r.set_base(&r1.manifest);
        r.shed_chunk_lists_unbound().unwrap();
        // The error comes from binding itself, not from a later read.
        let bound = r.bind_to(list.clone());
        if bytes != thin {
            assert!(
                matches!(bound, Err(ReadError::MissingChunk(id)) if id == lacking),
                "{bound:?}"
            );
            assert!(matches!(own, Err(ReadError::MissingChunk(id)) if id == lacking));
        } else {
            bound.unwrap();
            let holds = r.holds().unwrap();
            assert!(holds.len() < distinct.len());
            assert_eq!(holds, own.unwrap());
        }
    }
}

/// Issue 10 (review13c): a thin artifact whose (unsigned) contents member was
/// removed, its pack table kept, opened as the installer opens it (from its
/// copied envelope, or streamed) fails without its base release with
/// `MissingContents`, not a panic; told its base, it holds what its base lacks,
/// as a reader with its own list finds, and a pack table that does not add up
/// to those is refused when bound, as is a chunk list of another length.
#[test]
fn a_thin_reader_without_its_list_or_contents_needs_its_base() {
    let (thin, r1, r2) = thin_of_one_edit();
    let root = root(&[1], 1);
    let mut ms = member_data(&thin);
    assert!(ms.iter().any(|(p, _)| p == PACK_TABLE_MEMBER));
    ms.retain(|(p, _)| p != CONTENTS_MEMBER);
    let bytes = tar(&ms);
    // The same, with a pack table one chunk short of what the base lacks.
    let mut short = ms.clone();
    let table = short
        .iter_mut()
        .find(|(p, _)| p == PACK_TABLE_MEMBER)
        .expect("a pack table");
    let first = u32::from_le_bytes(table.1[..4].try_into().unwrap());
    assert!(first > 1, "a pack of several chunks");
    table.1[..4].copy_from_slice(&(first - 1).to_le_bytes());
    let short = tar(&short);
    let list = std::sync::Arc::new(List {
        hash: r2.manifest.hash(),
        chunks: r2.manifest.distinct_chunks(),
    });
    let own = ArtifactReader::open_with_base(&bytes[..], &root, NOW, Some(&r1.manifest))
        .unwrap()
        .holds()
        .unwrap();
    assert!(own.len() < list.chunks.len());
    for (bytes, base) in [(&bytes, false), (&bytes, true), (&short, true)] {
        let (copied, hash, rest) = copy_envelope(bytes, &root).unwrap();
        let len = copied.len() as u64;
        let stored =
            ArtifactReader::open_stored(rest, &&copied[..], len, &hash, len, None).unwrap();
        let streamed =
            ArtifactReader::open_held_unbound(&bytes[..], &root, NOW, &shoal_artifact::NoManifests)
                .unwrap();
        for mut r in [stored, streamed] {
            if base {
                r.set_base(&r1.manifest);
            } else {
                assert!(matches!(
                    r.shed_chunk_lists_unbound(),
                    Err(ReadError::MissingContents)
                ));
                continue;
            }
            r.shed_chunk_lists_unbound().unwrap();
            // A list of the manifest that counts other chunks: refused, not a panic.
            let fewer = std::sync::Arc::new(List {
                hash: list.hash,
                chunks: list.chunks[1..].to_vec(),
            });
            let n = list.chunks.len();
            assert!(
                matches!(r.bind_to(fewer), Err(ReadError::ChunkListLength { found, list })
                    if found == n && list + 1 == n)
            );
            let bound = r.bind_to(list.clone());
            if bytes == &short {
                assert!(
                    matches!(bound, Err(ReadError::PackTableSum { sum, chunks })
                        if sum + 1 == chunks as u64 && chunks == own.len()),
                    "{bound:?}"
                );
            } else {
                bound.unwrap();
                assert_eq!(r.holds().unwrap(), own);
            }
        }
    }
}

/// Text-like bytes a dictionary helps with: `phrase` repeated with a slow drift.
fn text(len: usize, phrase: &[u8]) -> Vec<u8> {
    (0..len)
        .map(|i| phrase[(i * 7 + (i >> 11)) % phrase.len()] ^ ((i >> 13) as u8 & 3))
        .collect()
}

/// Words drawn at random from a vocabulary of 2000 made-up words: a chunk holds
/// few repeats (it compresses little alone) and a dictionary that holds the
/// vocabulary helps every chunk.
fn words(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
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
        out.extend_from_slice(&vocabulary[(r >> 40) as usize % vocabulary.len()]);
        out.push(if r & 15 == 0 { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// A base built with a dictionary, and a release that adds text no base bytes
/// resemble (so its new chunks are plain, compressed with a dictionary).
fn dictionary_pair() -> (Vec<u8>, Vec<u8>, Vec<u8>, BuildReport) {
    let base = text(1_000_000, b"the quick brown fox jumps over the lazy dog");
    let mut new = base.clone();
    new.splice(
        500_000..500_000,
        text(
            60_000,
            b"PACK MY BOX WITH FIVE DOZEN LIQUOR JUGS, 0123456789!",
        ),
    );
    let mut o = opts();
    o.dictionary = true;
    let (base_art, base_report) = build_with(&base, &o, &[key(1)], None);
    assert!(base_report.dictionary_len > 0, "{base_report:?}");
    (base, new, base_art, base_report)
}

/// The delta build of `new` against `base` (whose artifact is `base_art`), given
/// the base's dictionary or not.
fn delta_with_dictionary(
    base: &[u8],
    new: &[u8],
    base_art: &[u8],
    base_report: &BuildReport,
    reuse: bool,
) -> (Vec<u8>, BuildReport, chunk::Dictionary) {
    let r = root(&[1], 1);
    let mut reader = ArtifactReader::open(base_art, &r, NOW).unwrap();
    let base_dict = reader.read_dictionary().unwrap().unwrap().clone();
    let mut o = opts();
    o.dictionary = true;
    o.version = "2.0".into();
    let (out, report) = build_delta_of(
        base,
        new,
        &base_report.manifest,
        &o,
        reuse.then_some(&base_dict),
    );
    (out, report, base_dict)
}

#[test]
fn a_delta_build_reuses_the_base_dictionary_unless_a_new_one_pays() {
    let (base, new, base_art, base_report) = dictionary_pair();
    let (art, report, base_dict) =
        delta_with_dictionary(&base, &new, &base_art, &base_report, true);
    // A new dictionary (112 KiB) cannot save its size on a few chunks: the base's
    // is reused, named by the signed manifest, and not in the artifact.
    assert_eq!(report.dictionary_len, 0, "{report:?}");
    assert!(!members(&art).iter().any(|(_, p, _)| p == "dictionary"));
    assert_eq!(report.manifest.dictionary, Some(base_dict.id));
    assert_eq!(
        report.manifest.format_version,
        shoal_artifact::FORMAT_VERSION_REFERENCES
    );
    let r = root(&[1], 1);
    // With the base's dictionary held, every chunk decodes and verifies.
    let mut reader = ArtifactReader::open(&art[..], &r, NOW).unwrap();
    reader.hold_dictionary(base_dict.clone()).unwrap();
    let (mut plain_with_dict, mut n) = (0, 0);
    while let Some(raw) = reader.next_raw().unwrap() {
        match raw.reference().cloned() {
            Some(reference) => {
                let ok = reference.check(reference_bytes(&base, &reference));
                raw.verify_against(&ok.unwrap()).unwrap();
            }
            None => {
                raw.verify().unwrap();
                if chunk::frame_dictionary_id(raw.stored()) == Some(base_dict.zstd_id) {
                    plain_with_dict += 1;
                }
            }
        }
        n += 1;
    }
    assert_eq!(n, report.chunks_written);
    assert!(plain_with_dict > 0, "{report:?}");
    // Without it, such a chunk is refused (not misread), naming the dictionary.
    let mut reader = ArtifactReader::open(&art[..], &r, NOW).unwrap();
    let mut refused = None;
    while let Some(raw) = reader.next_raw().unwrap() {
        if raw.reference().is_none()
            && let Err(e) = raw.verify()
        {
            refused = Some(e);
            break;
        }
    }
    assert!(
        matches!(refused, Some(chunk::ChunkError::NeedsDictionary { zstd_id, .. }) if zstd_id == base_dict.zstd_id),
        "{refused:?}"
    );
}

#[test]
fn a_held_dictionary_that_is_not_the_named_one_is_refused() {
    let (base, new, base_art, base_report) = dictionary_pair();
    let (art, report, base_dict) =
        delta_with_dictionary(&base, &new, &base_art, &base_report, true);
    assert_eq!(report.manifest.dictionary, Some(base_dict.id));
    // Another valid dictionary (the new release's own, from a full build).
    let mut o = opts();
    o.dictionary = true;
    let (other_art, _) = build_with(&new, &o, &[key(1)], None);
    let r = root(&[1], 1);
    let mut other_reader = ArtifactReader::open(&other_art[..], &r, NOW).unwrap();
    let other = other_reader.read_dictionary().unwrap().unwrap().clone();
    assert_ne!(other.id, base_dict.id);
    let mut reader = ArtifactReader::open(&art[..], &r, NOW).unwrap();
    let e = reader.hold_dictionary(other.clone()).unwrap_err();
    assert!(
        matches!(e, ReadError::DictionaryMismatch { expected, found, held: true }
            if expected == base_dict.id && found == other.id),
        "{e:?}"
    );
}

#[test]
fn a_delta_build_names_a_new_dictionary_it_keeps_and_its_member_must_match() {
    let (base, new, base_art, base_report) = dictionary_pair();
    // Without the base's dictionary the new one is measured against none; a lot of
    // new text makes it pay.
    let mut more = new.clone();
    more.extend(words(3_000_000, 5));
    let (art, report, _) = delta_with_dictionary(&base, &more, &base_art, &base_report, false);
    // The new text is plain (no base bytes resemble it) and a dictionary trained on
    // this release pays for its member.
    assert!(
        report.dictionary_len > 0,
        "stored {} of {} chunks ({} delta), artifact {}",
        report.stored_bytes,
        report.chunks_written,
        report.chunks_delta,
        report.artifact_len
    );
    let member = members(&art)
        .into_iter()
        .find(|(_, p, _)| p == "dictionary")
        .expect("a kept dictionary travels as the member");
    let named = report.manifest.dictionary.expect("the manifest names it");
    let bytes = &art[member.0 + 512..member.0 + 512 + member.2];
    assert_eq!(
        chunk::Dictionary::from_bytes(bytes.to_vec()).unwrap().id,
        named
    );
    // The member replaced by another dictionary of the same length: refused as
    // not the named one (the signature covers the name, not the member).
    let mut forged = art.clone();
    let mut other = bytes.to_vec();
    let last = other.len() - 1;
    other[last] ^= 1; // content after the header: a valid dictionary, other hash
    let id = chunk::derived_zstd_id(&other);
    other[4..8].copy_from_slice(&id.to_le_bytes());
    let other = chunk::Dictionary::from_bytes(other).unwrap();
    forged[member.0 + 512..member.0 + 512 + member.2].copy_from_slice(other.bytes());
    let r = root(&[1], 1);
    let mut reader = ArtifactReader::open(&forged[..], &r, NOW).unwrap();
    let e = reader.read_dictionary().unwrap_err();
    assert!(
        matches!(e, ReadError::DictionaryMismatch { expected, found, held: false }
            if expected == named && found == other.id),
        "{e:?}"
    );
}

/// Options for the default layout: chunks in data members.
fn data_opts() -> BuildOptions {
    let mut o = opts();
    o.layout = Layout::Data;
    o
}

/// An artifact of an envelope and data members holding `counts` chunks each, in
/// order (the builder splits only past 4 GiB).
fn assemble_data(env: &[u8], chunks: &[(ChunkId, Vec<u8>)], counts: &[usize]) -> Vec<u8> {
    assert_eq!(counts.iter().sum::<usize>(), chunks.len());
    let mut members = vec![(ENVELOPE_MEMBER.to_string(), env.to_vec())];
    let mut rest = chunks;
    for (seq, &n) in counts.iter().enumerate() {
        let (group, tail) = rest.split_at(n);
        rest = tail;
        let data: Vec<u8> = group.iter().flat_map(|(_, d)| d.iter().copied()).collect();
        members.push((data_path(seq as u64), data));
    }
    tar(&members)
}

#[test]
fn data_members_hold_the_chunks_and_a_seeking_reader_reads_one_header_each() {
    let (bytes, report) = build_with(&payload(600_000, 11), &data_opts(), &[key(1)], None);
    let root = root(&[1], 1);
    let m = members(&bytes);
    // The envelope and one data member of exactly the stored chunks: no count, no
    // pack table.
    assert_eq!(
        m.iter().map(|(_, p, _)| p.as_str()).collect::<Vec<_>>(),
        [ENVELOPE_MEMBER, "data/00000000"]
    );
    assert_eq!(m[1].2 as u64, report.stored_bytes);
    let chunks = read_all(&bytes, &root).unwrap();
    assert_eq!(chunks.len() as u64, report.chunks_distinct);
    let mut r = ArtifactReader::open(&bytes[..], &root, NOW).unwrap();
    assert_eq!(r.verify_rest(|_| {}).unwrap(), report.chunks_distinct);
    assert_eq!(r.pack_table(), None);

    let member = |size: usize| member_len(size as u64);
    let distinct = report.manifest.distinct_chunks();
    let want: Vec<ChunkRef> = distinct.iter().step_by(3).copied().collect();
    let wanted: std::collections::HashSet<ChunkId> = want.iter().map(|c| c.id).collect();
    let wanted_bytes: u64 = want.iter().map(|c| u64::from(c.stored_size)).sum();
    let (got, end, read) = read_wanted(&bytes, &root, |id| wanted.contains(id));
    assert_eq!(got.iter().map(|(c, _)| *c).collect::<Vec<_>>(), want);
    assert!(got.iter().all(|(c, d)| ChunkId::of(d) == c.id));
    assert_eq!(end.unwrap(), bytes.len() as u64);
    // The envelope, the data member's header, the wanted chunks and the end blocks:
    // no framing per chunk or per MiB.
    assert_eq!(read, member(m[0].2) + 512 + wanted_bytes + 1024);
    let (got, end, read) = read_wanted(&bytes, &root, |_| false);
    assert!(got.is_empty());
    assert_eq!(end.unwrap(), bytes.len() as u64);
    assert_eq!(read, member(m[0].2) + 512 + 1024);

    // Chunks split over several data members (at chunk boundaries) read the same,
    // each member's header read and checked; a window of a data member holds at
    // most PACK_CHUNKS_MAX chunks, whatever the member holds.
    let (env, _, cs) = parts(&bytes);
    assert_eq!(cs.len(), chunks.len());
    let split = assemble_data(&env, &cs, &[1, 7, cs.len() - 8]);
    assert_eq!(read_all(&split, &root).unwrap(), chunks);
    let (got, end, read) = read_wanted(&split, &root, |id| wanted.contains(id));
    assert_eq!(got.iter().map(|(c, _)| *c).collect::<Vec<_>>(), want);
    assert_eq!(end.unwrap(), split.len() as u64);
    assert_eq!(read, member(env.len()) + 3 * 512 + wanted_bytes + 1024);
}

#[test]
fn bad_data_members_are_refused_with_their_error_by_every_reader() {
    let (bytes, _) = build_with(&payload(300_000, 5), &data_opts(), &[key(1)], None);
    let root = root(&[1], 1);
    let (env, _, cs) = parts(&bytes);
    assert!(cs.len() > 4);
    let all: Vec<u8> = cs.iter().flat_map(|(_, d)| d.iter().copied()).collect();
    let (first, last) = (&cs[0], &cs[cs.len() - 1]);
    let s0 = first.1.len();
    let env_member = (ENVELOPE_MEMBER.to_string(), env.clone());
    let with = |rest: Vec<(String, Vec<u8>)>| {
        let mut members = vec![env_member.clone()];
        members.extend(rest);
        tar(&members)
    };
    let d = |seq: u64, data: &[u8]| (data_path(seq), data.to_vec());
    // A data member whose header says it is a hard link.
    let mut hardlink = with(vec![d(0, &all)]);
    let at = members(&hardlink)[1].0;
    let mut h = ustar::header(&data_path(0), all.len() as u64);
    h.set_entry_type(tar::EntryType::Link);
    h.set_cksum();
    hardlink[at..at + 512].copy_from_slice(h.as_bytes());
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "ends inside its last chunk",
            with(vec![d(0, &all[..all.len() - 1])]),
            format!(
                "data member 0: ends {} bytes into chunk {} of {} stored bytes",
                last.1.len() - 1,
                last.0,
                last.1.len()
            ),
        ),
        (
            "split inside a chunk",
            with(vec![d(0, &all[..s0 + 1]), d(1, &all[s0 + 1..])]),
            format!(
                "data member 0: ends 1 byte into chunk {} of {} stored bytes",
                cs[1].0,
                cs[1].1.len()
            ),
        ),
        (
            "bytes after the last chunk",
            with(vec![d(0, &[&all[..], b"x"].concat())]),
            "data member 0: 1 byte after the last chunk".into(),
        ),
        (
            "a member after the last chunk",
            with(vec![d(0, &all), d(1, b"xy")]),
            "data member 1: 2 bytes after the last chunk".into(),
        ),
        (
            "empty",
            with(vec![d(0, b""), d(1, &all)]),
            "data member 0: no bytes".into(),
        ),
        (
            "out of order",
            with(vec![d(1, &all)]),
            "unexpected tar member \"data/00000001\"".into(),
        ),
        (
            "skipped number",
            with(vec![d(0, &all[..s0]), d(2, &all[s0..])]),
            "unexpected tar member \"data/00000002\"".into(),
        ),
        (
            "after a pack table",
            with(vec![
                (PACK_TABLE_MEMBER.into(), pack_table(&[cs.len() as u32])),
                d(0, &all),
            ]),
            "unexpected tar member \"data/00000000\"".into(),
        ),
        (
            "a pack after data",
            with(vec![
                d(0, &all[..s0]),
                (pack_path(1), pack_member(cs.len() - 1, &all[s0..])),
            ]),
            "unexpected tar member \"packs/00000001\"".into(),
        ),
        (
            "data after a pack",
            with(vec![
                (pack_path(0), pack_member(1, &all[..s0])),
                d(1, &all[s0..]),
            ]),
            "unexpected tar member \"data/00000001\"".into(),
        ),
        (
            "unsafe path",
            with(vec![("../data/00000000".into(), all.clone())]),
            "tar member \"../data/00000000\" has an unsafe path".into(),
        ),
        (
            "hard link",
            hardlink,
            "unexpected tar member \"data/00000000\"".into(),
        ),
    ];
    for (name, input, why) in cases {
        let sequential = read_all(&input, &root).unwrap_err().to_string();
        assert_eq!(sequential, why, "{name}: read");
        let mut r = ArtifactReader::open(&input[..], &root, NOW).unwrap();
        assert_eq!(
            r.verify_rest(|_| {}).unwrap_err().to_string(),
            why,
            "{name}: verify"
        );
        // The seeking reader (an install) refuses it the same way, whether it
        // wants every chunk or none.
        let (_, end, _) = read_wanted(&input, &root, |_| true);
        assert_eq!(
            end.unwrap_err().to_string(),
            why,
            "{name}: every chunk wanted"
        );
        let (_, end, _) = read_wanted(&input, &root, |_| false);
        assert_eq!(end.unwrap_err().to_string(), why, "{name}: nothing wanted");
    }
    // Truncated inside the data member, or before the end blocks.
    let good = with(vec![d(0, &all)]);
    let cut = &good[..good.len() - 1024 - ustar::padding(all.len() as u64) - 10];
    assert!(matches!(
        read_all(cut, &root),
        Err(ReadError::Truncated { what }) if what == format!("chunk {}", last.0)
    ));
    let cut = &good[..good.len() - 1024];
    assert!(matches!(
        read_all(cut, &root),
        Err(ReadError::Truncated { .. })
    ));
}

/// A data member of more than two windows of [`PACK_CHUNKS_MAX`] chunks (every
/// real rootfs past ~64 MiB), read by all three readers: chunks wanted and not at
/// the window edges, a member split exactly at a window edge, and a byte after a
/// full window.
#[test]
fn data_members_of_more_than_two_windows_read_the_same_by_every_reader() {
    let mut o = data_opts();
    // Small chunks: thousands of them from a few MiB.
    o.chunking = Chunking {
        min_size: 64,
        avg_size: 256,
        max_size: 1024,
    };
    let (bytes, report) = build_with(&payload(3 << 20, 17), &o, &[key(1)], None);
    let root = root(&[1], 1);
    let m = members(&bytes);
    assert_eq!(
        m.iter().map(|(_, p, _)| p.as_str()).collect::<Vec<_>>(),
        [ENVELOPE_MEMBER, "data/00000000"]
    );
    let (env, _, cs) = parts(&bytes);
    let n = cs.len();
    assert!(n > 2 * PACK_CHUNKS_MAX + 1, "{n} chunks");
    let chunks = read_all(&bytes, &root).unwrap();
    assert_eq!(chunks.len(), n);
    assert!(
        chunks
            .iter()
            .zip(&cs)
            .all(|(d, (id, _))| ChunkId::of(d) == *id)
    );
    let mut r = ArtifactReader::open(&bytes[..], &root, NOW).unwrap();
    assert_eq!(r.verify_rest(|_| {}).unwrap(), n as u64);

    let distinct = report.manifest.distinct_chunks();
    let edges = [
        PACK_CHUNKS_MAX - 1,
        PACK_CHUNKS_MAX,
        PACK_CHUNKS_MAX + 1,
        2 * PACK_CHUNKS_MAX,
    ];
    let env_len = member_len(env.len() as u64);
    // The chunks at the edges wanted, then all chunks but those.
    for edge_wanted in [true, false] {
        let want: Vec<ChunkRef> = (0..n)
            .filter(|i| edges.contains(i) == edge_wanted)
            .map(|i| distinct[i])
            .collect();
        let wanted: std::collections::HashSet<ChunkId> = want.iter().map(|c| c.id).collect();
        let wanted_bytes: u64 = want.iter().map(|c| u64::from(c.stored_size)).sum();
        for (what, art, headers) in [
            ("one member", bytes.clone(), 1),
            (
                "split at a window edge",
                assemble_data(&env, &cs, &[PACK_CHUNKS_MAX, n - PACK_CHUNKS_MAX]),
                2,
            ),
        ] {
            let (got, end, read) = read_wanted(&art, &root, |id| wanted.contains(id));
            assert_eq!(
                got.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
                want,
                "{what}"
            );
            assert!(got.iter().all(|(c, d)| ChunkId::of(d) == c.id), "{what}");
            assert_eq!(end.unwrap(), art.len() as u64, "{what}");
            // The envelope, one header per data member, the wanted chunks and the
            // end blocks: exactly.
            assert_eq!(
                read,
                env_len + 512 * headers + wanted_bytes + 1024,
                "{what}, edges wanted: {edge_wanted}"
            );
            assert_eq!(read_all(&art, &root).unwrap(), chunks, "{what}");
            let mut r = ArtifactReader::open(&art[..], &root, NOW).unwrap();
            assert_eq!(r.verify_rest(|_| {}).unwrap(), n as u64, "{what}");
        }
    }

    // A byte after a full window: inside the archive (the next chunk is in the
    // next member) and after the last chunk (the last member holds one window).
    let all: Vec<u8> = cs.iter().flat_map(|(_, d)| d.iter().copied()).collect();
    let cut = |k: usize| cs[..k].iter().map(|(_, d)| d.len()).sum::<usize>();
    let (a, b) = (cut(PACK_CHUNKS_MAX), cut(n - PACK_CHUNKS_MAX));
    let with = |rest: Vec<(String, Vec<u8>)>| {
        let mut members = vec![(ENVELOPE_MEMBER.to_string(), env.clone())];
        members.extend(rest);
        tar(&members)
    };
    let cases = [
        (
            "a byte after the first window",
            with(vec![
                (data_path(0), [&all[..a], b"x"].concat()),
                (data_path(1), all[a..].to_vec()),
            ]),
            format!(
                "data member 0: ends 1 byte into chunk {} of {} stored bytes",
                cs[PACK_CHUNKS_MAX].0,
                cs[PACK_CHUNKS_MAX].1.len()
            ),
        ),
        (
            "a byte after the last window",
            with(vec![
                (data_path(0), all[..b].to_vec()),
                (data_path(1), [&all[b..], b"x"].concat()),
            ]),
            "data member 1: 1 byte after the last chunk".to_string(),
        ),
    ];
    for (name, input, why) in cases {
        assert_eq!(
            read_all(&input, &root).unwrap_err().to_string(),
            why,
            "{name}: read"
        );
        let mut r = ArtifactReader::open(&input[..], &root, NOW).unwrap();
        assert_eq!(
            r.verify_rest(|_| {}).unwrap_err().to_string(),
            why,
            "{name}: verify"
        );
        for want_all in [true, false] {
            let (_, end, _) = read_wanted(&input, &root, |_| want_all);
            assert_eq!(
                end.unwrap_err().to_string(),
                why,
                "{name}: every chunk wanted: {want_all}"
            );
        }
    }
}

/// A data member whose size is not that of a whole run of the chunks still to
/// come is refused as it opens, before any of its chunks is handed out (`store
/// add` writes each chunk it is given), by every reader.
#[test]
fn a_bad_data_member_is_refused_before_any_of_its_chunks() {
    let (bytes, _) = build_with(&payload(300_000, 5), &data_opts(), &[key(1)], None);
    let root = root(&[1], 1);
    let (env, _, cs) = parts(&bytes);
    let n = cs.len();
    assert!(n > 4);
    let all: Vec<u8> = cs.iter().flat_map(|(_, d)| d.iter().copied()).collect();
    let s2: usize = cs[..2].iter().map(|(_, d)| d.len()).sum();
    let last = &cs[n - 1];
    let with = |rest: Vec<(String, Vec<u8>)>| {
        let mut members = vec![(ENVELOPE_MEMBER.to_string(), env.clone())];
        members.extend(rest);
        tar(&members)
    };
    // (name, artifact, chunks of the good members before the bad one, error)
    let cases = [
        (
            "ends inside its last chunk",
            with(vec![(data_path(0), all[..all.len() - 1].to_vec())]),
            0,
            format!(
                "data member 0: ends {} bytes into chunk {} of {} stored bytes",
                last.1.len() - 1,
                last.0,
                last.1.len()
            ),
        ),
        (
            "a byte after the last chunk",
            with(vec![(data_path(0), [&all[..], b"x"].concat())]),
            0,
            "data member 0: 1 byte after the last chunk".into(),
        ),
        (
            "the second member a byte long",
            with(vec![
                (data_path(0), all[..s2].to_vec()),
                (data_path(1), [&all[s2..], b"x"].concat()),
            ]),
            2,
            "data member 1: 1 byte after the last chunk".into(),
        ),
    ];
    for (name, input, good, why) in cases {
        let mut r = ArtifactReader::open(&input[..], &root, NOW).unwrap();
        let mut yielded = 0;
        let e = loop {
            match r.next_raw() {
                Ok(Some(_)) => yielded += 1,
                Ok(None) => panic!("{name}: read to the end"),
                Err(e) => break e,
            }
        };
        assert_eq!((yielded, e.to_string()), (good, why.clone()), "{name}");
        for want in [true, false] {
            let (got, end, _) = read_wanted(&input, &root, |_| want);
            assert_eq!(
                (got.len(), end.unwrap_err().to_string()),
                (if want { good } else { 0 }, why.clone()),
                "{name}: wanted {want}"
            );
        }
        let mut r = ArtifactReader::open(&input[..], &root, NOW).unwrap();
        let e = r.verify_rest(|_| {}).unwrap_err();
        assert_eq!(e.to_string(), why, "{name}: verify");
        // Bound to a chunk list kept elsewhere (a device's kept manifests).
        assert_eq!(
            read_bound(&input, &root).unwrap_err().to_string(),
            why,
            "{name}: bound"
        );
    }
}

/// A chunk store's release read from its envelope file without its chunk list
/// (`ChunkStore::release_head`, what `shoal install --store` picks from): the
/// signed fields and the manifest's hash; every bad envelope refused with its
/// own error, the signatures checked before a byte of the manifest is decoded.
#[test]
fn a_store_release_is_read_from_its_signed_fields_and_bad_envelopes_give_their_errors() {
    let data = payload(200_000, 21);
    let (bytes, report) = build(&data);
    let root = root(&[1], 1);
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let added = store.add_artifact(&bytes[..], &root, NOW).unwrap();
    let path = added.manifest_path;
    let head = store.release_head(&path, &root, NOW).unwrap();
    let m = &report.manifest;
    assert_eq!(head.manifest_hash, m.hash());
    assert_eq!(head.path, path);
    assert_eq!(
        head.envelope_hash,
        *blake3::hash(&std::fs::read(&path).unwrap()).as_bytes()
    );
    assert_eq!(
        (&head.name, &head.version, &head.device_types),
        (&m.name, &m.version, &m.device_types)
    );
    assert_eq!(head.security_counter, m.security_counter);
    assert_eq!(head.base, m.base);

    let bad = |file: &std::path::Path, root: &TrustRoot| match store.release_head(file, root, NOW) {
        Err(StoreError::BadManifest { path, source }) => {
            assert_eq!(path, file);
            source
        }
        other => panic!("not a bad manifest: {other:?}"),
    };
    // Signed by a key the root does not trust.
    assert!(matches!(
        bad(&path, &self::root(&[5], 1)),
        ReadError::Signature(VerifyError::BelowThreshold { valid: 0, .. })
    ));
    // The root expired: refused as such, whatever the signatures.
    match store.release_head(&path, &root, Some(3_000_000)) {
        Err(StoreError::BadManifest {
            source:
                ReadError::Signature(VerifyError::Expired {
                    expires_unix_s: 2_000_000,
                    now_unix_s: 3_000_000,
                }),
            ..
        }) => {}
        other => panic!("not expired: {other:?}"),
    }
    // A root that needs two release signatures: one valid is not enough.
    assert!(matches!(
        bad(&path, &self::root(&[1, 2], 2)),
        ReadError::Signature(VerifyError::BelowThreshold {
            valid: 1,
            threshold: 2,
            invalid: 0,
            unknown: 0,
            ..
        })
    ));
    // Signed by the root's own key, which the release role does not list.
    let mut by_root_key = Envelope::new(m.to_cbor());
    by_root_key.sign(&key(200));
    let other_role = dir.path().join("root-key.envelope");
    std::fs::write(&other_role, by_root_key.to_bytes()).unwrap();
    assert!(matches!(
        bad(&other_role, &root),
        ReadError::Signature(VerifyError::BelowThreshold {
            valid: 0,
            invalid: 0,
            unknown: 1,
            ..
        })
    ));
    // A signed byte changed: the signature fails before the manifest is decoded.
    let good = std::fs::read(&path).unwrap();
    let other = dir.path().join("other.envelope");
    let at = good.len() / 2;
    let mut flipped = good.clone();
    flipped[at] ^= 0x01;
    std::fs::write(&other, &flipped).unwrap();
    assert!(matches!(
        bad(&other, &root),
        ReadError::Signature(VerifyError::BelowThreshold {
            valid: 0,
            invalid: 1,
            ..
        })
    ));
    // Cut short: not an envelope.
    std::fs::write(&other, &good[..good.len() - 10]).unwrap();
    assert!(matches!(
        bad(&other, &root),
        ReadError::Envelope(DecodeError::Cbor(why)) if why == "the input ends inside bytes"
    ));
    // Not laid out canonically (a byte after the envelope): the decoder's
    // own error, as a whole decode gives it.
    let mut longer = good.clone();
    longer.push(0);
    std::fs::write(&other, &longer).unwrap();
    assert_eq!(
        Envelope::from_bytes(&longer),
        Err(DecodeError::NonCanonical)
    );
    assert!(matches!(
        bad(&other, &root),
        ReadError::Envelope(DecodeError::NonCanonical)
    ));
    // Not a regular file: refused before a byte is read (a symlink to a
    // device reads as 0 bytes long and forever; a FIFO blocks its opener).
    let zero = dir.path().join("zero.envelope");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let fifo = dir.path().join("fifo.envelope");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo (package coreutils)");
    assert!(status.success());
    for file in [&zero, &fifo, &dir.path().join("chunks")] {
        match store.release_head(file, &root, NOW) {
            Err(StoreError::NotAFile(p)) => assert_eq!(&p, file),
            other => panic!("{}: {other:?}", file.display()),
        }
        match store.load_manifest(file, &root, NOW) {
            Err(StoreError::NotAFile(p)) => assert_eq!(&p, file),
            other => panic!("{}: {other:?}", file.display()),
        }
    }
    // Larger than any envelope: refused before it is read.
    let file = std::fs::File::create(&other).unwrap();
    file.set_len(shoal_signing::ENVELOPE_SIZE_MAX as u64 + 1)
        .unwrap();
    assert!(matches!(
        bad(&other, &root),
        ReadError::EnvelopeTooLarge { size, .. } if size == shoal_signing::ENVELOPE_SIZE_MAX as u64 + 1
    ));
    // Signed, but not a manifest.
    let mut env = Envelope::new(b"not a manifest".to_vec());
    env.sign(&key(1));
    std::fs::write(&other, env.to_bytes()).unwrap();
    assert!(matches!(
        bad(&other, &root),
        ReadError::Manifest(shoal_artifact::ManifestError::Decode(_))
    ));
    // Signed, but its chunk sizes do not add up to its payload's size: the
    // error `Manifest::from_cbor` gives.
    let mut wrong = m.clone();
    wrong.payloads[0].size += 1;
    let expected = Manifest::from_cbor(&wrong.to_cbor()).unwrap_err();
    assert!(matches!(
        expected,
        shoal_artifact::ManifestError::SizeMismatch { .. }
    ));
    std::fs::write(&other, signed(&wrong)).unwrap();
    match bad(&other, &root) {
        ReadError::Manifest(e) => assert_eq!(e, expected),
        e => panic!("{e}"),
    }
    // The good one still reads.
    std::fs::write(&other, &good).unwrap();
    assert_eq!(
        store
            .release_head(&other, &root, NOW)
            .unwrap()
            .manifest_hash,
        m.hash()
    );
    // Signed, but not canonical: refused as a whole decode refuses it, not
    // left for the install's copy to refuse. A non-shortest integer...
    let cbor = m.to_cbor();
    let field = b"\x70security_counter";
    let at = cbor.windows(field.len()).position(|w| w == field).unwrap() + field.len();
    assert!(cbor[at] < 24, "a counter encoded in its head");
    let mut long_int = cbor[..at].to_vec();
    long_int.extend_from_slice(&[0x18, cbor[at]]);
    long_int.extend_from_slice(&cbor[at + 1..]);
    // ... and a byte after the manifest's map.
    let mut trailing = cbor.clone();
    trailing.push(0x00);
    for (what, bytes) in [
        ("a non-shortest integer", long_int),
        ("a byte after", trailing),
    ] {
        assert!(
            matches!(
                Manifest::from_cbor(&bytes),
                Err(shoal_artifact::ManifestError::NotCanonical)
            ),
            "{what}: {:?}",
            Manifest::from_cbor(&bytes)
        );
        let mut env = Envelope::new(bytes);
        env.sign(&key(1));
        std::fs::write(&other, env.to_bytes()).unwrap();
        match bad(&other, &root) {
            ReadError::Manifest(shoal_artifact::ManifestError::NotCanonical) => {}
            e => panic!("{what}: {e:?}"),
        }
    }
    // A thin release: its base is read with the rest of its head.
    let mut thin = m.clone();
    thin.base = Some(shoal_artifact::BaseRelease {
        name: "acme-os".into(),
        version: "0.9".into(),
        manifest_hash: [7; 32],
    });
    std::fs::write(&other, signed(&thin)).unwrap();
    let head = store.release_head(&other, &root, NOW).unwrap();
    assert_eq!(
        head.envelope_hash,
        *blake3::hash(&std::fs::read(&other).unwrap()).as_bytes()
    );
    assert_eq!(head.base, thin.base);
    assert_eq!(head.manifest_hash, thin.hash());
}

/// Bytes in memory that count what is read of them.
struct CountedAt<'a>(&'a [u8], std::cell::Cell<u64>);

impl shoal_artifact::ReadAt for CountedAt<'_> {
    fn read_at(&self, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.1.set(self.1.get() + buf.len() as u64);
        self.0.read_at(at, buf)
    }
}

struct DropIds;

impl shoal_artifact::ChunkIdSink for DropIds {
    fn push(&mut self, _: &ChunkId) -> Result<(), String> {
        Ok(())
    }
}

/// A manifest decoded from a file (a chunk store's, `release_head`) is decoded
/// in one read of it: its version is read alone only when the decode fails, which still
/// gives a newer manifest its own error.
#[test]
fn a_manifest_streamed_from_a_file_is_read_once_and_a_newer_one_says_so() {
    let (_, report) = build(&payload(300_000, 22));
    let m = &report.manifest;
    let cbor = m.to_cbor();
    let at = CountedAt(&cbor, std::cell::Cell::new(0));
    let (streamed, DropIds) =
        Manifest::from_file_streaming(&at, 0, cbor.len() as u64, &m.hash(), DropIds).unwrap();
    assert_eq!(streamed.manifest().name, m.name);
    assert_eq!(at.1.get(), cbor.len() as u64, "decoded in one read");
    // The canonical form: every byte once more (outside the list compared,
    // the list hashed).
    streamed.check_canonical().unwrap();
    assert_eq!(at.1.get(), 2 * cbor.len() as u64);
    // A newer format (with a field this build does not know): the decode
    // fails, the version read alone says why.
    #[derive(serde::Serialize)]
    struct Newer {
        format_version: u32,
        later: u32,
    }
    let newer = cbor4ii::serde::to_vec(
        Vec::new(),
        &Newer {
            format_version: 9,
            later: 1,
        },
    )
    .unwrap();
    let hash = *blake3::hash(&newer).as_bytes();
    let at = CountedAt(&newer, std::cell::Cell::new(0));
    match Manifest::from_file_streaming(&at, 0, newer.len() as u64, &hash, DropIds) {
        Err(shoal_artifact::StreamedError::Manifest(
            shoal_artifact::ManifestError::UnsupportedVersion { found: 9 },
        )) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(
        Manifest::from_cbor(&newer).unwrap_err(),
        shoal_artifact::ManifestError::UnsupportedVersion { found: 9 }
    );
    match Manifest::from_cbor_streaming(&newer, DropIds) {
        Err(shoal_artifact::StreamedError::Manifest(
            shoal_artifact::ManifestError::UnsupportedVersion { found: 9 },
        )) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }
}
