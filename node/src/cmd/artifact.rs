//! `shoal artifact`: build, sign, inspect, verify, extract and diff `.shoal` artifacts.

use std::collections::BTreeMap;
use std::fs::File;
#[cfg(feature = "host")]
use std::io::BufWriter;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use shoal_artifact::{ArtifactReader, Manifest};
#[cfg(feature = "host")]
use shoal_artifact::{BuildOptions, ChunkStore, HeldManifests};
#[cfg(feature = "host")]
use shoal_signing::SecretKey;
use shoal_signing::TrustRoot;

#[cfg(feature = "host")]
use crate::cmd::chain;
use crate::cmd::root::{load_trusted_root, now_unix_s};
use crate::cmd::{Exit, Ui};

/// `shoal artifact` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    #[cfg(feature = "host")]
    /// Build a signed artifact from a payload image (streaming; uses all cores).
    ///
    /// Example:
    ///   shoal artifact build --image rootfs.img --name acme-os --version 2.0 \
    ///       --device-type board-a --security-counter 2 --key release.pem --out acme-os-2.0.shoal
    #[command(verbatim_doc_comment)]
    Build(BuildArgs),
    #[cfg(feature = "host")]
    /// Add signatures to an artifact in place (threshold signing by several holders).
    ///
    /// Example: shoal artifact sign acme-os-2.0.shoal --key second-release.pem
    #[command(verbatim_doc_comment)]
    Sign {
        /// The artifact.
        artifact: PathBuf,
        /// Private keys (PKCS#8 PEM) to sign with (repeatable).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// The base release's artifact, for an artifact whose manifest travels as
        /// a delta against its manifest.
        #[arg(long)]
        base: Option<PathBuf>,
    },
    /// Show an artifact's manifest and signatures. Checks no signature: use `verify`.
    ///
    /// Example: shoal artifact inspect acme-os-2.0.shoal --json
    #[command(verbatim_doc_comment)]
    Inspect {
        /// The artifact.
        artifact: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Also list every chunk (id, size, stored size) of every payload.
        #[arg(long)]
        chunks: bool,
        /// The base release's artifact, for an artifact whose manifest travels as
        /// a delta against its manifest.
        #[arg(long)]
        base: Option<PathBuf>,
    },
    /// Verify an artifact: signatures against a trust root, then every chunk.
    ///
    /// Example: shoal artifact verify acme-os-2.0.shoal --root root.shoalroot
    #[command(verbatim_doc_comment)]
    Verify {
        /// The artifact (`-` for standard input).
        artifact: PathBuf,
        #[command(flatten)]
        trust: Trust,
        /// The base release's payload image: delta-encoded chunks (of an artifact
        /// built with `--base-image`) are decoded against it and verified.
        #[arg(long)]
        base_image: Option<PathBuf>,
        /// The base release's artifact (only its signed manifest is read), for an
        /// artifact whose manifest travels as a delta against it.
        #[arg(long)]
        base: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    #[cfg(feature = "host")]
    /// Reassemble an artifact's payload into a file, verifying everything.
    ///
    /// Example: shoal artifact extract acme-os-2.0.shoal --root root.shoalroot --out rootfs.img
    #[command(verbatim_doc_comment)]
    Extract {
        /// The artifact (`-` for standard input).
        artifact: PathBuf,
        #[command(flatten)]
        trust: Trust,
        /// Where to write the payload (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// A chunk store holding the base release of a thin artifact.
        #[arg(long)]
        store: Option<PathBuf>,
        /// The base release's payload image: delta-encoded chunks are decoded
        /// against it, and (with --base, without --store) the chunks a thin
        /// artifact leaves out are read from it.
        #[arg(long)]
        base_image: Option<PathBuf>,
        /// The base release's artifact (only its signed manifest is read): where
        /// its chunks are in --base-image, and what a manifest delta is against.
        #[arg(long, conflicts_with = "store")]
        base: Option<PathBuf>,
    },
    #[cfg(feature = "host")]
    /// How many bytes a device running OLD must download to get NEW (manifest included).
    ///
    /// Example: shoal artifact diff acme-os-1.0.shoal acme-os-2.0.shoal --json
    #[command(verbatim_doc_comment)]
    Diff {
        /// The release the device runs.
        old: PathBuf,
        /// The release it gets.
        new: PathBuf,
        /// Also verify both manifests against this trust root.
        #[arg(long)]
        root: Option<PathBuf>,
        /// Size the thin artifact as `artifact build --packs` lays it out (1 MiB
        /// packs and a pack table) instead of the default data members.
        #[arg(long)]
        packs: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// The trust root to verify against, and the time to check its expiry at.
#[derive(Debug, clap::Args)]
pub struct Trust {
    /// The signed trust root file (from `shoal root init`).
    #[arg(long)]
    root: PathBuf,
    /// Skip the root's expiry check (for a machine without a trustworthy clock).
    #[arg(long)]
    no_clock: bool,
}

impl Trust {
    /// Loads the root and picks the time.
    pub fn load(&self) -> anyhow::Result<(TrustRoot, Option<u64>)> {
        let signed = load_trusted_root(&self.root)?;
        let now = if self.no_clock {
            None
        } else {
            Some(now_unix_s()?)
        };
        Ok((signed.root, now))
    }
}

#[cfg(feature = "host")]
/// `shoal artifact build` arguments.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The payload image (a root filesystem image).
    #[arg(long)]
    image: PathBuf,
    /// Release name.
    #[arg(long)]
    name: String,
    /// Release version.
    #[arg(long)]
    version: String,
    /// A device type this release may be installed on (repeatable, at least one).
    #[arg(long = "device-type", required = true)]
    device_types: Vec<String>,
    /// Anti-rollback counter: devices refuse releases with a lower counter.
    #[arg(long)]
    security_counter: u64,
    /// Private key (PKCS#8 PEM) to sign with (repeatable).
    #[arg(long = "key", required = true)]
    keys: Vec<PathBuf>,
    /// Make a thin artifact: leave out the chunks this earlier artifact holds.
    #[arg(long)]
    base: Option<PathBuf>,
    /// With --base: the base release's payload image. New chunks are then also
    /// compressed against bytes of it (a device reads them from its running slot),
    /// which makes the artifact much smaller; only a device running the base
    /// release can install it. The manifest then travels as a delta against the
    /// base's manifest, which such a device keeps (see --full-manifest).
    #[arg(long, requires = "base")]
    base_image: Option<PathBuf>,
    /// With --base-image: carry the whole signed manifest instead of a delta against
    /// the base's (for devices that run the base release but do not hold its
    /// manifest, e.g. flashed at the factory without it).
    #[arg(long, requires = "base_image")]
    full_manifest: bool,
    /// Faster build, somewhat larger artifact: bigger chunks, lower zstd level.
    #[arg(long)]
    fast: bool,
    /// Lay the chunks out in 1 MiB packs with a pack table, as artifacts were before
    /// data members: for devices still running a Shoal release that reads only
    /// packs (it refuses the default layout with "unexpected tar member
    /// \"data/00000000\""). A device that needs few chunks then reads every pack's
    /// header (516 bytes a pack).
    #[arg(long)]
    packs: bool,
    /// zstd level of the chunks (1-19; default 9, or 5 with --fast): lower builds
    /// faster and stores more bytes, without changing how the image is cut into
    /// chunks.
    #[arg(long, value_name = "LEVEL", value_parser = clap::value_parser!(i32).range(1..=19))]
    zstd_level: Option<i32>,
    /// What the device has once installed, `key=value` (repeatable).
    #[arg(long = "provides", value_parser = parse_kv)]
    provides: Vec<(String, String)>,
    /// What the device must have, `key=value` (repeatable; one key several times
    /// means any of those values).
    #[arg(long = "depends", value_parser = parse_kv)]
    depends: Vec<(String, String)>,
    /// The artifact file to write.
    #[arg(long)]
    out: PathBuf,
}

#[cfg(feature = "host")]
fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

/// Runs a `shoal artifact` subcommand.
pub fn run(command: Command, ui: &Ui) -> anyhow::Result<()> {
    match command {
        #[cfg(feature = "host")]
        Command::Build(args) => build(args, ui),
        #[cfg(feature = "host")]
        Command::Sign {
            artifact,
            keys,
            base,
        } => {
            let keys = load_keys(&keys)?;
            let held = held_manifests(base.as_deref())?;
            let n = shoal_artifact::add_signatures(&artifact, &keys, &held)
                .with_context(|| format!("signing {}", artifact.display()))?;
            ui.info(format_args!("{}: {n} signature(s)", artifact.display()));
            Ok(())
        }
        Command::Inspect {
            artifact,
            json,
            chunks,
            base,
        } => inspect(&artifact, json, chunks, base.as_deref()),
        Command::Verify {
            artifact,
            trust,
            base_image,
            base,
            json,
        } => verify(
            &artifact,
            &trust,
            base_image.as_deref(),
            base.as_deref(),
            json,
            ui,
        ),
        #[cfg(feature = "host")]
        Command::Extract {
            artifact,
            trust,
            out,
            store,
            base_image,
            base,
        } => extract(
            &artifact,
            &trust,
            &out,
            ExtractBase {
                store: store.as_deref(),
                image: base_image.as_deref(),
                artifact: base.as_deref(),
            },
            ui,
        ),
        #[cfg(feature = "host")]
        Command::Diff {
            old,
            new,
            root,
            packs,
            json,
        } => {
            let layout = match packs {
                true => shoal_artifact::write::Layout::Packs {
                    bytes: shoal_artifact::write::PACK_BYTES_DEFAULT,
                },
                false => shoal_artifact::write::Layout::Data,
            };
            diff(&old, &new, root.as_deref(), layout, json)
        }
    }
}

#[cfg(feature = "host")]
fn load_keys(paths: &[PathBuf]) -> anyhow::Result<Vec<SecretKey>> {
    paths
        .iter()
        .map(|p| {
            SecretKey::load(p).map_err(|e| Exit::usage(format!("{}: {}", p.display(), chain(&e))))
        })
        .collect()
}

/// Opens an artifact file, or standard input for `-`. A regular file's envelope is
/// first checked to carry signatures (by enough of `root`'s release keys, when
/// given) without reading its signed bytes, so an unsigned or wrongly signed
/// envelope of many megabytes is refused before it costs memory.
pub fn open_input(
    path: &Path,
    root: Option<&TrustRoot>,
) -> anyhow::Result<Box<dyn std::io::Read + Send>> {
    if path == Path::new("-") {
        return Ok(Box::new(BufReader::with_capacity(
            1 << 20,
            std::io::stdin(),
        )));
    }
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if f.metadata().is_ok_and(|m| m.is_file()) {
        shoal_artifact::read::check_envelope_signers(&mut f, root)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(Box::new(BufReader::with_capacity(1 << 20, f)))
}

#[cfg(feature = "host")]
fn build(args: BuildArgs, ui: &Ui) -> anyhow::Result<()> {
    let keys = load_keys(&args.keys)?;
    let image = File::open(&args.image)
        .map_err(|e| Exit::usage(format!("image {}: {e}", args.image.display())))?;
    let image_len = image.metadata()?.len();
    let mut opts = BuildOptions::rootfs(
        &args.name,
        &args.version,
        args.device_types,
        args.security_counter,
    );
    if args.fast {
        opts = opts.fast();
    }
    if args.packs {
        opts.layout = shoal_artifact::write::Layout::Packs {
            bytes: shoal_artifact::write::PACK_BYTES_DEFAULT,
        };
    }
    if let Some(level) = args.zstd_level {
        opts.zstd_level = level;
    }
    opts.provides = args.provides.into_iter().collect();
    let mut depends: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in args.depends {
        depends.entry(k).or_default().push(v);
    }
    opts.depends = depends;
    opts.manifest_delta = args.base_image.is_some() && !args.full_manifest;
    // The base's manifest and, for a delta build, its dictionary (which a device
    // running the base keeps, so reusing it costs no download): the build measures
    // whether a new one pays for itself. A base that carries none (a full build
    // with `--fast`, or a thin one that itself reused its base's) offers none.
    let (base, base_dictionary) = match &args.base {
        None => (None, None),
        Some(p) => {
            let mut r = ArtifactReader::open_unverified(open_input(p, None)?)
                .with_context(|| format!("base artifact {}", p.display()))?;
            let d = if args.base_image.is_some() {
                r.read_dictionary()
                    .with_context(|| format!("base artifact {}", p.display()))?
                    .cloned()
            } else {
                None
            };
            (Some(r.manifest().clone()), d)
        }
    };
    if let Some(b) = &base {
        // A thin artifact must be cut like its base, or nothing would be shared.
        opts.chunking = b.chunking;
    }
    let dir = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Written under a temporary name and renamed: a failed build leaves nothing.
    let tmp = TempOut::create(&args.out)?;
    let bar = ui.progress(image_len, "building", false);
    let input = BufReader::with_capacity(1 << 20, image);
    let report = match (&base, &args.base_image) {
        (Some(b), Some(path)) => {
            let f = File::open(path)
                .map_err(|e| Exit::usage(format!("base image {}: {e}", path.display())))?;
            shoal_artifact::build_delta(
                input,
                &opts,
                &keys,
                b,
                f,
                base_dictionary.as_ref(),
                dir,
                &tmp.file,
                |n| bar.inc(n),
            )
        }
        _ => shoal_artifact::build(input, &opts, &keys, base.as_ref(), dir, &tmp.file, |n| {
            bar.inc(n)
        }),
    }
    .with_context(|| format!("building from {}", args.image.display()))?;
    bar.finish_and_clear();
    tmp.persist()?;
    ui.info(format_args!(
        "{}: {} {} — {} bytes; {} chunks, {} distinct, {} stored{}",
        args.out.display(),
        report.manifest.name,
        report.manifest.version,
        report.artifact_len,
        report.chunks_total,
        report.chunks_distinct,
        report.chunks_written,
        if report.chunks_delta > 0 {
            format!(
                " (thin; {} delta-encoded against {} references to the base)",
                report.chunks_delta, report.references
            )
        } else if report.manifest.base.is_some() {
            " (thin)".to_string()
        } else {
            String::new()
        },
    ));
    Ok(())
}

#[cfg(feature = "host")]
/// A file written under a temporary name next to its destination, removed unless
/// [`TempOut::persist`] renames it into place.
struct TempOut {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

#[cfg(feature = "host")]
impl TempOut {
    fn create(dest: &Path) -> anyhow::Result<TempOut> {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        Ok(TempOut {
            file,
            tmp,
            dest: dest.to_path_buf(),
            done: false,
        })
    }

    fn persist(mut self) -> anyhow::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.tmp, &self.dest)
            .with_context(|| format!("writing {}", self.dest.display()))?;
        self.done = true;
        Ok(())
    }
}

#[cfg(feature = "host")]
impl Drop for TempOut {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[derive(Serialize)]
struct PayloadInfo {
    name: String,
    kind: String,
    size: u64,
    hash: String,
    chunks: usize,
    distinct_chunks: usize,
    stored_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk_list: Option<Vec<(String, u32, u32)>>,
    /// With `--chunks`, the references of delta-encoded chunks: the base payload's
    /// byte ranges `(offset, len)`, their hash, and the positions (in `chunk_list`)
    /// of the chunks encoded against them.
    #[serde(skip_serializing_if = "Option::is_none")]
    reference_list: Option<Vec<ReferenceInfo>>,
}

#[derive(Serialize)]
struct ReferenceInfo {
    ranges: Vec<(u64, u32)>,
    hash: String,
    chunks: Vec<u32>,
}

#[derive(Serialize)]
struct ManifestInfo {
    name: String,
    version: String,
    format_version: u32,
    security_counter: u64,
    device_types: Vec<String>,
    provides: BTreeMap<String, String>,
    depends: BTreeMap<String, Vec<String>>,
    chunking: shoal_artifact::Chunking,
    base: Option<BaseInfo>,
    manifest_hash: String,
    payloads: Vec<PayloadInfo>,
}

#[derive(Serialize)]
struct BaseInfo {
    name: String,
    version: String,
    manifest_hash: String,
}

fn manifest_info(m: &Manifest, with_chunks: bool) -> ManifestInfo {
    ManifestInfo {
        name: m.name.clone(),
        version: m.version.clone(),
        format_version: m.format_version,
        security_counter: m.security_counter,
        device_types: m.device_types.clone(),
        provides: m.provides.clone(),
        depends: m.depends.clone(),
        chunking: m.chunking,
        base: m.base.as_ref().map(|b| BaseInfo {
            name: b.name.clone(),
            version: b.version.clone(),
            manifest_hash: hex::encode(b.manifest_hash),
        }),
        manifest_hash: hex::encode(m.hash()),
        payloads: m
            .payloads
            .iter()
            .map(|p| {
                let mut seen = std::collections::HashSet::new();
                let distinct: Vec<_> = p.chunks.iter().filter(|c| seen.insert(c.id)).collect();
                PayloadInfo {
                    name: p.name.clone(),
                    kind: p.kind.to_string(),
                    size: p.size,
                    hash: hex::encode(p.hash),
                    chunks: p.chunks.len(),
                    distinct_chunks: distinct.len(),
                    stored_bytes: distinct.iter().map(|c| u64::from(c.stored_size)).sum(),
                    chunk_list: with_chunks.then(|| {
                        p.chunks
                            .iter()
                            .map(|c| (c.id.to_hex(), c.size, c.stored_size))
                            .collect()
                    }),
                    reference_list: (with_chunks && !p.references.is_empty()).then(|| {
                        p.references
                            .iter()
                            .map(|r| ReferenceInfo {
                                ranges: r.ranges.clone(),
                                hash: hex::encode(r.hash),
                                chunks: r.chunks.clone(),
                            })
                            .collect()
                    }),
                }
            })
            .collect(),
    }
}

fn inspect(path: &Path, json: bool, chunks: bool, base: Option<&Path>) -> anyhow::Result<()> {
    let held = held_manifests(base)?;
    let r = ArtifactReader::open_unverified_held(open_input(path, None)?, &held)
        .with_context(|| format!("reading {}", path.display()))?;
    let info = manifest_info(r.manifest(), chunks);
    let layout = layout_of(path);
    let sigs: Vec<String> = r
        .envelope()
        .signatures
        .iter()
        .map(|s| s.key_id.to_string())
        .collect();
    let mut out = std::io::stdout().lock();
    if json {
        #[derive(Serialize)]
        struct Inspect<'a> {
            #[serde(flatten)]
            manifest: &'a ManifestInfo,
            envelope_bytes: u64,
            /// "data" (data members), "packs" (`build --packs`), or null when not
            /// known (read from stdin, or no chunks).
            layout: Option<&'static str>,
            signature_key_ids: &'a [String],
            signatures_verified: bool,
        }
        let v = Inspect {
            manifest: &info,
            envelope_bytes: r.envelope_len(),
            layout: layout.map(|(name, _)| name),
            signature_key_ids: &sigs,
            signatures_verified: false,
        };
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "release:          {} {}", info.name, info.version)?;
    writeln!(out, "format version:   {}", info.format_version)?;
    writeln!(out, "security counter: {}", info.security_counter)?;
    writeln!(out, "device types:     {}", info.device_types.join(", "))?;
    for (k, v) in &info.provides {
        writeln!(out, "provides:         {k}={v}")?;
    }
    for (k, v) in &info.depends {
        writeln!(out, "depends:          {k}={}", v.join(" | "))?;
    }
    let c = info.chunking;
    writeln!(
        out,
        "chunking:         FastCDC min {} avg {} max {}",
        c.min_size, c.avg_size, c.max_size
    )?;
    match &info.base {
        Some(b) => writeln!(
            out,
            "thin, base:       {} {} ({})",
            b.name, b.version, b.manifest_hash
        )?,
        None => writeln!(out, "thin:             no")?,
    }
    writeln!(out, "manifest hash:    {}", info.manifest_hash)?;
    for p in &info.payloads {
        writeln!(
            out,
            "payload {:?} ({}): {} bytes, {} chunks ({} distinct, {} stored bytes), blake3 {}",
            p.name, p.kind, p.size, p.chunks, p.distinct_chunks, p.stored_bytes, p.hash
        )?;
        for (id, size, stored) in p.chunk_list.iter().flatten() {
            writeln!(out, "  {id} {size} {stored}")?;
        }
    }
    writeln!(out, "envelope:         {} bytes", r.envelope_len())?;
    if let Some((_, says)) = layout {
        writeln!(out, "layout:           {says}")?;
    }
    for s in &sigs {
        writeln!(
            out,
            "signature by:     {s} (not verified; use `shoal artifact verify`)"
        )?;
    }
    Ok(())
}

/// How the artifact at `path` lays out its chunks, from the first member after the
/// envelope, dictionary and contents members: `("data", ..)` for data members,
/// `("packs", ..)` for packs (older devices read only these). `None` from stdin,
/// without chunks, or where the headers do not say (`verify` says what is wrong).
fn layout_of(path: &Path) -> Option<(&'static str, &'static str)> {
    use shoal_artifact::ustar::{self, Block};
    use std::io::{Read as _, Seek as _, SeekFrom};
    if path == Path::new("-") {
        return None;
    }
    let mut f = File::open(path).ok()?;
    let mut at = 0u64;
    // The envelope, and at most a dictionary, contents and pack table before.
    for _ in 0..4 {
        let mut block = [0u8; ustar::BLOCK];
        f.seek(SeekFrom::Start(at)).ok()?;
        f.read_exact(&mut block).ok()?;
        let Block::Member(m) = ustar::parse(&block).ok()? else {
            return None;
        };
        if m.path.starts_with("data/") {
            return Some((
                "data",
                "data members (the default; older Shoal releases read only --packs)",
            ));
        }
        if m.path.starts_with("packs/") || m.path == shoal_artifact::read::PACK_TABLE_MEMBER {
            return Some(("packs", "packs (--packs: every Shoal release reads it)"));
        }
        at += ustar::BLOCK as u64 + m.size + ustar::padding(m.size) as u64;
    }
    None
}

/// Opens `--base-image`.
/// The signed manifest of the base artifact at `base` (read without checking its
/// signatures: a manifest rebuilt against it is verified as a whole), for reading an
/// artifact whose manifest travels as a delta.
fn held_manifests(base: Option<&Path>) -> anyhow::Result<Vec<Vec<u8>>> {
    let Some(p) = base else {
        return Ok(Vec::new());
    };
    let r = ArtifactReader::open_unverified(open_input(p, None)?)
        .with_context(|| format!("base artifact {}", p.display()))?;
    Ok(vec![r.envelope().signed.clone()])
}

/// The dictionary the base artifact at `base` carries, for reading a thin artifact
/// that reuses it (its manifest names it; the reader checks the hash).
fn base_dictionary(
    base: Option<&Path>,
) -> anyhow::Result<Option<shoal_artifact::chunk::Dictionary>> {
    let Some(p) = base else {
        return Ok(None);
    };
    let mut r = ArtifactReader::open_unverified(open_input(p, None)?)
        .with_context(|| format!("base artifact {}", p.display()))?;
    Ok(r.read_dictionary()
        .with_context(|| format!("base artifact {}", p.display()))?
        .cloned())
}

#[cfg(feature = "host")]
/// Manifests held by a base artifact and a chunk store.
struct Held<'a> {
    given: Vec<Vec<u8>>,
    store: Option<&'a ChunkStore>,
}

#[cfg(feature = "host")]
impl HeldManifests for Held<'_> {
    fn manifest(&self, hash: &[u8; 32]) -> Option<Vec<u8>> {
        self.given
            .manifest(hash)
            .or_else(|| self.store.and_then(|s| s.manifest(hash)))
    }
}

fn open_base_image(path: &Path) -> anyhow::Result<shoal_artifact::BaseImage> {
    shoal_artifact::BaseImage::open(path)
        .map_err(|e| Exit::usage(format!("base image {}: {e}", path.display())))
}

fn verify(
    path: &Path,
    trust: &Trust,
    base_image: Option<&Path>,
    base: Option<&Path>,
    json: bool,
    ui: &Ui,
) -> anyhow::Result<()> {
    let mut image = base_image.map(open_base_image).transpose()?;
    let held = held_manifests(base)?;
    let (root, now) = trust.load()?;
    let mut r = ArtifactReader::open_held(open_input(path, Some(&root))?, &root, now, None, &held)
        .with_context(|| format!("verifying {}", path.display()))?;
    if let Some(d) = base_dictionary(base)? {
        r.hold_dictionary(d)
            .with_context(|| format!("verifying {}", path.display()))?;
    }
    let m = r.manifest().clone();
    let total: u64 = m.payloads.iter().map(|p| p.size).sum();
    let bar = ui.progress(total, "verifying", json);
    let n = r
        .verify_rest_with(
            image
                .as_mut()
                .map(|i| i as &mut dyn shoal_artifact::ReferenceSource),
            |b| bar.inc(b),
        )
        .with_context(|| format!("verifying {}", path.display()))?;
    bar.finish_and_clear();
    let mut out = std::io::stdout().lock();
    if json {
        #[derive(Serialize)]
        struct Verified<'a> {
            ok: bool,
            name: &'a str,
            version: &'a str,
            thin: bool,
            chunks_verified: u64,
            payload_bytes: u64,
            manifest_hash: String,
        }
        let v = Verified {
            ok: true,
            name: &m.name,
            version: &m.version,
            thin: m.base.is_some(),
            chunks_verified: n,
            payload_bytes: total,
            manifest_hash: hex::encode(m.hash()),
        };
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "ok: {} {}: signatures meet the threshold, {n} chunks verified{}",
            m.name,
            m.version,
            if m.base.is_some() {
                " (thin artifact)"
            } else {
                ""
            }
        )?;
    }
    Ok(())
}

/// Where `artifact extract` gets a thin or delta artifact's base release.
#[cfg(feature = "host")]
struct ExtractBase<'a> {
    store: Option<&'a Path>,
    image: Option<&'a Path>,
    artifact: Option<&'a Path>,
}

#[cfg(feature = "host")]
fn extract(
    path: &Path,
    trust: &Trust,
    out_path: &Path,
    given: ExtractBase<'_>,
    ui: &Ui,
) -> anyhow::Result<()> {
    let store = given.store;
    // References are read through one handle, base chunks through another.
    let mut ref_image = given.image.map(open_base_image).transpose()?;
    let mut chunk_image = match (given.image, given.artifact) {
        (Some(p), Some(_)) => Some(open_base_image(p)?),
        _ => None,
    };
    let (root, now) = trust.load()?;
    let input = open_input(path, Some(&root))?;
    // Peek at the manifest to find a thin artifact's base in the store.
    let store = store
        .map(ChunkStore::open)
        .transpose()
        .context("opening the chunk store")?;
    let held = Held {
        given: held_manifests(given.artifact)?,
        store: store.as_ref(),
    };
    let (reader, base) = {
        let r = ArtifactReader::open_held(input, &root, now, None, &held)
            .with_context(|| format!("verifying {}", path.display()))?;
        match (r.manifest().base.clone(), &store) {
            (Some(b), Some(s)) => {
                let file = s.manifest_file(&b.manifest_hash);
                let base = s.load_manifest(&file, &root, now).with_context(|| {
                    format!("base release {} {} in the chunk store", b.name, b.version)
                })?;
                // Reopen knowing the base, so the reader can check completeness.
                drop(r);
                let r = ArtifactReader::open_held(
                    open_input(path, Some(&root))?,
                    &root,
                    now,
                    Some(&base),
                    &held,
                )
                .with_context(|| format!("verifying {}", path.display()))?;
                (r, Some(base))
            }
            (Some(b), None) => match (given.artifact, chunk_image.as_mut()) {
                (Some(base_path), Some(image)) => {
                    let base =
                        ArtifactReader::open(open_input(base_path, Some(&root))?, &root, now)
                            .with_context(|| format!("base artifact {}", base_path.display()))?
                            .manifest()
                            .clone();
                    if base.hash() != b.manifest_hash {
                        return Err(Exit::usage(format!(
                            "{} is not the base release of {} ({} {})",
                            base_path.display(),
                            path.display(),
                            b.name,
                            b.version
                        )));
                    }
                    let payload = &r.manifest().payloads[0].name;
                    if !image.index(&base, payload) {
                        anyhow::bail!(
                            "the base release {} {} has no payload named {payload:?}",
                            b.name,
                            b.version
                        );
                    }
                    drop(r);
                    let r = ArtifactReader::open_held(
                        open_input(path, Some(&root))?,
                        &root,
                        now,
                        Some(&base),
                        &held,
                    )
                    .with_context(|| format!("verifying {}", path.display()))?;
                    (r, Some(base))
                }
                _ => (r, None),
            },
            _ => (r, None),
        }
    };
    let mut reader = reader;
    if let Some(d) = base_dictionary(given.artifact)? {
        reader
            .hold_dictionary(d)
            .with_context(|| format!("verifying {}", path.display()))?;
    }
    let total = reader.manifest().payloads.iter().map(|p| p.size).sum();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(out_path)
        .map_err(|e| Exit::usage(format!("output {}: {e}", out_path.display())))?;
    let bar = ui.progress(total, "extracting", false);
    let result = {
        let mut w = BufRwFile::new(&mut file);
        let base_ref = match (&store, &chunk_image, &base) {
            (Some(s), _, Some(b)) => Some((shoal_artifact::BaseChunks::Store(s), b)),
            (None, Some(i), Some(b)) => Some((shoal_artifact::BaseChunks::Image(i), b)),
            _ => None,
        };
        let refs = ref_image
            .as_mut()
            .map(|i| i as &mut dyn shoal_artifact::ReferenceSource);
        shoal_artifact::extract(reader, base_ref, refs, &mut w, |n| bar.inc(n)).and_then(|n| {
            w.flush()?;
            Ok(n)
        })
    };
    bar.finish_and_clear();
    match result {
        Ok(n) => {
            file.sync_all()?;
            ui.info(format_args!(
                "{}: {n} bytes, payload hash verified",
                out_path.display()
            ));
            Ok(())
        }
        Err(e) => {
            // Nothing else happens: no partial payload is left behind.
            drop(file);
            let _ = std::fs::remove_file(out_path);
            Err(anyhow::Error::new(e).context(format!("extracting {}", path.display())))
        }
    }
}

/// A buffered read/write/seek wrapper over a file (writes are buffered; reads and
/// seeks flush first).
#[cfg(feature = "host")]
struct BufRwFile<'a> {
    inner: BufWriter<&'a mut File>,
}

#[cfg(feature = "host")]
impl<'a> BufRwFile<'a> {
    fn new(file: &'a mut File) -> Self {
        BufRwFile {
            inner: BufWriter::with_capacity(1 << 20, file),
        }
    }
}

#[cfg(feature = "host")]
impl std::io::Read for BufRwFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.flush()?;
        self.inner.get_mut().read(buf)
    }
}

#[cfg(feature = "host")]
impl Write for BufRwFile<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(feature = "host")]
impl std::io::Seek for BufRwFile<'_> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

#[cfg(feature = "host")]
fn diff(
    old: &Path,
    new: &Path,
    root: Option<&Path>,
    layout: shoal_artifact::write::Layout,
    json: bool,
) -> anyhow::Result<()> {
    type Read = (Manifest, shoal_signing::Envelope, u64, bool);
    let read = |p: &Path, held: &dyn HeldManifests| -> anyhow::Result<Read> {
        let r = match root {
            Some(rp) => {
                let trust = Trust {
                    root: rp.to_path_buf(),
                    no_clock: false,
                };
                let (root, now) = trust.load()?;
                ArtifactReader::open_held(open_input(p, Some(&root))?, &root, now, None, held)
            }
            None => ArtifactReader::open_unverified_held(open_input(p, None)?, held),
        }
        .with_context(|| format!("reading {}", p.display()))?;
        let mut r = r;
        let dict_len = r
            .read_dictionary()
            .with_context(|| format!("reading {}", p.display()))?
            .map_or(0, |d| d.bytes().len() as u64);
        let delta = r.manifest_delta_base().is_some();
        Ok((r.manifest().clone(), r.envelope().clone(), dict_len, delta))
    };
    let (old_m, old_env, _, _) = read(old, &shoal_artifact::NoManifests)?;
    let (new_m, new_env, new_dict, new_delta) = match read(new, &vec![old_env.signed]) {
        Err(e)
            if matches!(
                e.downcast_ref::<shoal_artifact::ReadError>(),
                Some(shoal_artifact::ReadError::ManifestDelta(
                    shoal_artifact::ManifestDeltaError::UnknownBase { .. }
                ))
            ) =>
        {
            return Err(Exit::usage(format!(
                "{}'s manifest is a delta against another release than {} {}: compare it with its base",
                new.display(),
                old_m.name,
                old_m.version
            )));
        }
        r => r?,
    };
    // Delta-encoded chunks decode only against their own base's bytes.
    if new_m.payloads.iter().any(|p| !p.references.is_empty())
        && new_m
            .base
            .as_ref()
            .is_none_or(|b| b.manifest_hash != old_m.hash())
    {
        return Err(Exit::usage(format!(
            "{} is encoded against another release than {} {}: compare it with its base",
            new.display(),
            old_m.name,
            old_m.version
        )));
    }
    // The manifest travels as a delta when NEW does, and in any delta-encoded
    // build (`--base-image`), which sends it so by default.
    let manifest_delta = new_delta || new_m.payloads.iter().any(|p| !p.references.is_empty());
    let d = shoal_artifact::diff(&old_m, &new_m, &new_env, new_dict, manifest_delta, layout);
    let mut out = std::io::stdout().lock();
    if json {
        #[derive(Serialize)]
        struct DiffOut<'a> {
            old: String,
            new: String,
            #[serde(flatten)]
            diff: &'a shoal_artifact::Diff,
        }
        let v = DiffOut {
            old: format!("{} {}", old_m.name, old_m.version),
            new: format!("{} {}", new_m.name, new_m.version),
            diff: &d,
        };
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{} {} -> {} {}",
        old_m.name, old_m.version, new_m.name, new_m.version
    )?;
    writeln!(
        out,
        "new payload:      {} bytes, {} chunks ({} distinct)",
        d.new_payload_bytes, d.chunks_total, d.chunks_distinct
    )?;
    writeln!(
        out,
        "chunks needed:    {} ({} bytes uncompressed)",
        d.chunks_needed, d.needed_raw_bytes
    )?;
    writeln!(
        out,
        "download:         {} bytes (the thin artifact: {} manifest + {} dictionary + {} chunks + framing)",
        d.download_bytes, d.manifest_bytes, d.dictionary_bytes, d.needed_stored_bytes
    )?;
    writeln!(
        out,
        "from a store:     {} bytes (manifest, dictionary and chunk files)",
        d.store_download_bytes
    )?;
    writeln!(
        out,
        "full download:    {} bytes of chunks",
        d.full_stored_bytes
    )?;
    Ok(())
}
