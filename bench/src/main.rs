//! `shoal-bench`: measures the `shoal` binary against the tools it replaces, on real
//! root filesystem images, and prints one Markdown goal table per issue.
//!
//! Every figure comes from running the real programs (`shoal`, `zck`,
//! `zck_delta_size`, `mender-artifact`, `casync`, `dd`) as child processes in the same
//! invocation, so each ratio compares runs made on the same machine under the same
//! load. Timed commands run round-robin (round 1 runs every command once, then round
//! 2, ...) so a burst of load from elsewhere hits all tools alike; each figure is the
//! median over the rounds, peak RSS the worst round. See `bench/README.md` for the
//! exact competitor commands and why they are the fair ones.

use std::fs;
use std::io::{self, Write as _};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};

mod alloc_count;
mod engine_bench;
mod fleet;
mod lan;
mod measure;
mod net_link;
mod net_perbase;
mod net_poll;
mod report;
mod sections;
mod shoal;
mod strace;

use measure::{Cmd, Meter};

#[global_allocator]
static ALLOCATOR: alloc_count::Counting = alloc_count::Counting;
use report::Report;

/// Benchmark Shoal against mender-artifact, casync and zchunk on real rootfs images.
///
/// Build the binary under test first: `cargo build --release -p shoal-node`.
/// Make the images with `../shared/bench/make-rootfs-images.sh /tmp/shoal-images`.
#[derive(Debug, Parser)]
#[command(name = "shoal-bench", version)]
struct Args {
    /// Directory holding `v1.img` and `v2.img`.
    #[arg(default_value = "/tmp/shoal-images")]
    images: PathBuf,
    /// The `shoal` binary to measure.
    #[arg(long, default_value = "target/release/shoal")]
    shoal: PathBuf,
    /// Timed runs of each command; figures are medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Which goals to measure.
    #[arg(long, value_enum, default_value_t = Only::All)]
    only: Only,
    /// Scratch directory for artifacts, stores and slots (default: a fresh temporary
    /// directory under /tmp, removed at the end unless `--keep`).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the scratch directory.
    #[arg(long)]
    keep: bool,
    /// Also write the Markdown report to FILE (for the README).
    #[arg(long, value_name = "FILE")]
    markdown_out: Option<PathBuf>,
    /// Also write every measurement as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// The largest generated image (GiB) whose install peak RSS the install section
    /// measures (2 and 8 GiB by default; an 8 GiB image, its artifact and slot take
    /// about 18 GB of disk and a long untimed build).
    #[arg(long, value_name = "GIB", default_value_t = 8)]
    large_max_gib: u64,
}

/// The goal groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Only {
    /// Both groups.
    All,
    /// Issue 2: artifact size, build time, delta size, verify throughput, RSS.
    Artifact,
    /// Issue 4: `shoal install`, full and delta, against `dd`.
    Install,
    /// Issue 9: the memory an unsigned envelope costs before it is refused (needs
    /// no images).
    Harden,
    /// Issue 12: delta-encoded chunks (v1 → v2, and the v2 → v3 hotfix when
    /// `v3.img` exists: `bench/make-hotfix-image.sh`).
    Refchunk,
    /// Issue 10: only the install section's rows on generated images (up to
    /// `--large-max-gib`), without its rows on the real images.
    Large,
    /// Issue 10: only the thin artifact's row on each generated image (its base's
    /// manifest kept), without the full and store installs.
    LargeThin,
}

impl Only {
    /// Whether these goals run on the real images (`v1.img`, `v2.img`).
    fn needs_images(self) -> bool {
        !matches!(self, Only::Harden | Only::Large | Only::LargeThin)
    }

    /// How the command line says it (`""` for every group).
    fn flag(self) -> &'static str {
        match self {
            Only::All => "",
            Only::Artifact => " --only artifact",
            Only::Install => " --only install",
            Only::Harden => " --only harden",
            Only::Refchunk => " --only refchunk",
            Only::Large => " --only large",
            Only::LargeThin => " --only large-thin",
        }
    }
}

/// Everything the sections share.
#[derive(Debug)]
pub struct Ctx {
    /// Runs GNU time around children.
    pub meter: Meter,
    /// Timed rounds.
    pub runs: u32,
    /// Scratch directory.
    pub work: PathBuf,
    /// The old image (what the device runs).
    pub v1: PathBuf,
    /// The new image (the release).
    pub v2: PathBuf,
    /// The `shoal` binary under test.
    pub shoal: PathBuf,
    /// The largest generated image the install section measures, in bytes.
    pub large_max_bytes: u64,
}

fn main() -> std::process::ExitCode {
    // `shoal-bench engine`: the engine's goals (issue 10), on the engine alone.
    if std::env::args().nth(1).as_deref() == Some("engine") {
        return match engine_only() {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("shoal-bench: {err:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    // `shoal-bench net`: managed mode over the network (issue 11): the daemon over a
    // shaped link, and 10,000 devices polling the server.
    if std::env::args().nth(1).as_deref() == Some("net") {
        return match net_only(NetArgs::parse_from(std::env::args().skip(1))) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("shoal-bench: {err:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    // `shoal-bench lan`: ten devices sharing a release on one LAN behind a shaped
    // uplink (issue 13), in network namespaces (root).
    if std::env::args().nth(1).as_deref() == Some("lan") {
        return match lan_only(LanArgs::parse_from(std::env::args().skip(1))) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("shoal-bench: {err:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shoal-bench: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `shoal-bench net`: v1 → v2 through `shoal server` and `shoal daemon` over a
/// 10 Mbit/s, 100 ms link, beside casync and Mender on the same link.
#[derive(Debug, Parser)]
#[command(name = "shoal-bench net")]
struct NetArgs {
    /// Directory holding `v1.img` and `v2.img`.
    #[arg(default_value = "/tmp/shoal-images")]
    images: PathBuf,
    /// The `shoal` binary with the server role (`cargo build --release -p shoal-node
    /// --features server`).
    #[arg(long, default_value = "target/release/shoal")]
    shoal: PathBuf,
    /// The device build (`cargo build --profile device -p shoal-node
    /// --no-default-features`): runs the daemon when present, and its size is reported.
    #[arg(long, default_value = "target/device/shoal")]
    device_shoal: PathBuf,
    /// Also write the Markdown report to FILE.
    #[arg(long, value_name = "FILE")]
    markdown_out: Option<PathBuf>,
    /// Keep the scratch directory (artifacts, stores, the daemon's and server's logs).
    #[arg(long)]
    keep: bool,
    /// Run only one part: `link` (the shaped link), `perbase` (per-base encodings
    /// served to a device on v1, issue 12) or `poll` (10,000 devices polling).
    #[arg(long, value_parser = ["link", "perbase", "poll"])]
    only: Option<String>,
    /// The poll rows' server database connections (`shoal server --db-connections`;
    /// its default when not given).
    #[arg(long, value_name = "N")]
    db_connections: Option<u32>,
}

/// Runs the net section and prints its table.
fn net_only(args: NetArgs) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("shoal-bench-net-")
        .tempdir_in("/tmp")
        .context("cannot create a scratch directory in /tmp")?;
    if args.keep {
        progress(&format!("keeping {}", work.path().display()));
    }
    let abs = |p: &PathBuf| fs::canonicalize(p).unwrap_or(p.clone());
    let inputs = net_link::Inputs {
        shoal: abs(&args.shoal),
        device_shoal: abs(&args.device_shoal),
        v1: args.images.join("v1.img"),
        v2: args.images.join("v2.img"),
        work: work.path().to_path_buf(),
    };
    let part = args.only.as_deref();
    let mut sections = Vec::new();
    if part != Some("poll") {
        for img in [&inputs.v1, &inputs.v2] {
            if !img.is_file() {
                bail!(
                    "{} is missing: run ../shared/bench/make-rootfs-images.sh",
                    img.display()
                );
            }
        }
        if part != Some("perbase") {
            sections.push(net_link::section(&inputs)?);
        }
        if part != Some("link") {
            sections.push(net_perbase::section(&inputs)?);
        }
    }
    if part.is_none() || part == Some("poll") {
        // A private copy: a rebuild during the run must not swap the binary.
        let shoal = work.path().join("shoal-poll-under-test");
        fs::copy(&args.shoal, &shoal).with_context(|| {
            format!(
                "cannot copy {} (build it: cargo build --release -p shoal-node --features server)",
                args.shoal.display()
            )
        })?;
        let load_before = loadavg();
        let (goals, mut facts) = net_poll::rows(&shoal, work.path(), args.db_connections);
        facts.push((
            "load average (1/5/15 min) before → after".to_string(),
            format!("{load_before} → {}", loadavg()),
        ));
        sections.push(report::Section {
            title: "Issue 11: net, 10,000 devices polling".to_string(),
            goals,
            series: Vec::new(),
            facts,
        });
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let report = Report {
        context: vec![
            ("source tree".to_string(), source_tree()),
            ("machine".to_string(), format!("{cpus} CPUs")),
            ("load average before".to_string(), loadavg()),
        ],
        sections,
    };
    let md = report.to_markdown();
    io::stdout().write_all(md.as_bytes())?;
    if let Some(path) = &args.markdown_out {
        fs::write(path, &md).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.keep {
        let _ = work.keep();
    }
    Ok(())
}

/// `shoal-bench lan`: ten devices on one LAN behind a 10 Mbit/s uplink install
/// v1 → v2 from `shoal server`, sharing chunks, beside baselines on the same
/// topology (network namespaces: needs root, iproute2, nftables, python3, curl).
#[derive(Debug, Parser)]
#[command(name = "shoal-bench lan")]
struct LanArgs {
    /// Directory holding `v1.img` and `v2.img`.
    #[arg(default_value = "/tmp/shoal-images")]
    images: PathBuf,
    /// The `shoal` binary with the server role (`cargo build --release -p shoal-node
    /// --features server`): runs the server and the daemons.
    #[arg(long, default_value = "target/release/shoal")]
    shoal: PathBuf,
    /// The device build (`cargo build --profile device -p shoal-node
    /// --no-default-features`): its size is reported.
    #[arg(long, default_value = "target/device/shoal")]
    device_shoal: PathBuf,
    /// Runs of the ten sharing and of one device alone; figures are medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Also write the Markdown report to FILE.
    #[arg(long, value_name = "FILE")]
    markdown_out: Option<PathBuf>,
    /// Keep the scratch directory (artifacts, the server's data and log).
    #[arg(long)]
    keep: bool,
    /// Only the timed rows (the ten sharing, one alone): the baselines without
    /// sharing (ten each downloading the delta, `curl` of the full artifact) are
    /// skipped and their rows say NOT RUN. For looking at the time row alone.
    #[arg(long)]
    timed_only: bool,
}

/// Runs the lan section and prints its table.
fn lan_only(args: LanArgs) -> Result<()> {
    for img in ["v1.img", "v2.img"].map(|f| args.images.join(f)) {
        if !img.is_file() {
            bail!(
                "{} is missing: run ../shared/bench/make-rootfs-images.sh",
                img.display()
            );
        }
    }
    let work = tempfile::Builder::new()
        .prefix("shoal-bench-lan-")
        .tempdir_in("/tmp")
        .context("cannot create a scratch directory in /tmp")?;
    // A private copy: a rebuild during the run must not swap the binary.
    let shoal = work.path().join("shoal-under-test");
    fs::copy(&args.shoal, &shoal).with_context(|| {
        format!(
            "cannot copy {} (build it: cargo build --release -p shoal-node --features server)",
            args.shoal.display()
        )
    })?;
    let abs = |p: &PathBuf| fs::canonicalize(p).unwrap_or(p.clone());
    let inputs = lan::Inputs {
        shoal,
        device_shoal: abs(&args.device_shoal),
        v1: abs(&args.images.join("v1.img")),
        v2: abs(&args.images.join("v2.img")),
        work: work.path().to_path_buf(),
        runs: args.runs,
        baselines: !args.timed_only,
    };
    let load_before = loadavg();
    let section = lan::section(&inputs)?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let report = Report {
        context: vec![
            ("source tree".to_string(), source_tree()),
            ("machine".to_string(), format!("{cpus} CPUs")),
            (
                "load average (1/5/15 min) before → after".to_string(),
                format!("{load_before} → {}", loadavg()),
            ),
            (
                "command".to_string(),
                format!(
                    "`shoal-bench lan {} --shoal {} --runs {}`",
                    args.images.display(),
                    args.shoal.display(),
                    args.runs
                ),
            ),
        ],
        sections: vec![section],
    };
    let md = report.to_markdown();
    io::stdout().write_all(md.as_bytes())?;
    if let Some(path) = &args.markdown_out {
        fs::write(path, &md).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.keep {
        progress(&format!("keeping {}", work.path().display()));
        let _ = work.keep();
    }
    Ok(())
}

/// Runs the engine section and prints its table.
fn engine_only() -> Result<()> {
    let report = Report {
        context: vec![("source tree".to_string(), source_tree())],
        sections: vec![sections::engine()?],
    };
    io::stdout().write_all(report.to_markdown().as_bytes())?;
    Ok(())
}

fn run(args: Args) -> Result<()> {
    let v1 = args.images.join("v1.img");
    let v2 = args.images.join("v2.img");
    let needs_images = args.only.needs_images();
    for img in [&v1, &v2] {
        if needs_images && !img.is_file() {
            bail!(
                "{} is missing: run ../shared/bench/make-rootfs-images.sh {} as root",
                img.display(),
                args.images.display()
            );
        }
    }
    let shoal = fs::canonicalize(&args.shoal).unwrap_or(args.shoal.clone());

    let temp;
    let work = match &args.work_dir {
        Some(dir) => {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("shoal-bench-")
                .tempdir_in("/tmp")
                .context("cannot create a scratch directory in /tmp")?;
            if args.keep {
                temp.keep()
            } else {
                temp.path().to_path_buf()
            }
        }
    };
    // Measure a private copy: a rebuild of the workspace during the run (other people
    // work in the same tree) must not swap the binary between rounds.
    let shoal = if shoal.is_file() {
        let copy = work.join("shoal-under-test");
        fs::copy(&shoal, &copy)
            .with_context(|| format!("cannot copy {} to {}", shoal.display(), copy.display()))?;
        copy
    } else {
        shoal
    };
    let ctx = Ctx {
        meter: Meter::new(&work)?,
        runs: args.runs,
        work: work.clone(),
        v1,
        v2,
        shoal,
        large_max_bytes: args.large_max_gib << 30,
    };

    // Every tool starts from a warm page cache: read both images once now.
    for img in [&ctx.v1, &ctx.v2].into_iter().filter(|_| needs_images) {
        let mut f =
            fs::File::open(img).with_context(|| format!("cannot open {}", img.display()))?;
        io::copy(&mut f, &mut io::sink())?;
    }

    let load_before = loadavg();
    let mut report = Report {
        context: Vec::new(),
        sections: Vec::new(),
    };
    let shoal = shoal::Shoal::setup(&ctx);
    if let Err(why) = &shoal {
        progress(&format!("Shoal side not measured: {why}"));
    }
    if matches!(args.only, Only::All | Only::Artifact) {
        report.sections.push(sections::artifact(&ctx, &shoal)?);
    }
    if matches!(args.only, Only::All | Only::Install) {
        report.sections.push(sections::install(&ctx, &shoal)?);
    }
    if let Only::Large | Only::LargeThin = args.only {
        report.sections.push(sections::install_generated(
            &ctx,
            &shoal,
            args.only == Only::LargeThin,
        )?);
    }
    if matches!(args.only, Only::All | Only::Harden) {
        report.sections.push(sections::harden(&ctx, &shoal)?);
    }
    if matches!(args.only, Only::All | Only::Refchunk) {
        report.sections.push(sections::refchunk(&ctx, &shoal)?);
    }
    report.context = context(&ctx, &args, &load_before)?;

    let md = report.to_markdown();
    io::stdout().write_all(md.as_bytes())?;
    if let Some(path) = &args.markdown_out {
        fs::write(path, &md).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        fs::write(path, json + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.work_dir.is_none() && !args.keep {
        measure::remove_any(&work)?;
    } else {
        eprintln!("shoal-bench: scratch files kept in {}", work.display());
    }
    Ok(())
}

/// The commit of the working directory's git tree and how many files differ from it
/// (the binary under test is built from the working tree).
fn source_tree() -> String {
    let head = Cmd::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .run_plain();
    let dirty = Cmd::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .run_plain();
    match (head, dirty) {
        (Ok(head), Ok(dirty)) => format!(
            "git {} with {} uncommitted tracked files",
            String::from_utf8_lossy(&head).trim(),
            String::from_utf8_lossy(&dirty).lines().count()
        ),
        _ => "not a git checkout".to_owned(),
    }
}

/// `/proc/loadavg`'s three averages.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// The first line a command prints (for tool versions), or why there is none.
fn first_line(cmd: &Cmd) -> String {
    match cmd.run_plain() {
        Ok(out) => String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        Err(_) => "not available".to_owned(),
    }
}

fn context(ctx: &Ctx, args: &Args, load_before: &str) -> Result<Vec<(String, String)>> {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = Cmd::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .run_plain()?;
    Ok(vec![
        (
            "date".into(),
            String::from_utf8_lossy(&date).trim().to_owned(),
        ),
        (
            "machine".into(),
            format!("{cpus} CPUs, Linux {}", kernel.trim()),
        ),
        (
            "load average (1/5/15 min) before → after".into(),
            format!("{load_before} → {}", loadavg()),
        ),
        (
            "images".into(),
            if !args.only.needs_images() {
                format!("none needed ({})", args.only.flag().trim())
            } else {
                format!(
                    "{} ({}), {} ({}); page cache warm",
                    ctx.v1.display(),
                    report::Quantity::Bytes(measure::file_bytes(&ctx.v1)?),
                    ctx.v2.display(),
                    report::Quantity::Bytes(measure::file_bytes(&ctx.v2)?),
                )
            },
        ),
        (
            "paths in commands".into(),
            format!(
                "`$IMAGES` = {}, `$WORK` = {} (scratch), `shoal` = {} (a copy of {} taken at the start)",
                ctx.v2
                    .parent()
                    .map_or(String::new(), |p| p.display().to_string()),
                ctx.work.display(),
                ctx.shoal.display(),
                args.shoal.display()
            ),
        ),
        ("source tree".into(), source_tree()),
        (
            "runs".into(),
            format!(
                "{} per timed command, round-robin; wall = median, peak RSS = max",
                ctx.runs
            ),
        ),
        (
            "versions".into(),
            [
                first_line(&Cmd::new(&ctx.shoal).arg("--version")),
                first_line(&Cmd::new("zck").arg("--version")),
                first_line(&Cmd::new("mender-artifact").arg("--version")),
                format!(
                    "casync {}",
                    first_line(&Cmd::new("casync").arg("--version"))
                ),
            ]
            .join("; "),
        ),
        (
            "command".into(),
            format!(
                "`shoal-bench {} --shoal {} --runs {}{} --large-max-gib {}`",
                args.images.display(),
                args.shoal.display(),
                args.runs,
                args.only.flag(),
                args.large_max_gib,
            ),
        ),
    ])
}

impl Ctx {
    /// A command line with the scratch directory, the image directory and the binary
    /// under test written as `$WORK`, `$IMAGES` and `shoal`, so tables stay readable.
    pub fn shorten(&self, command: &str) -> String {
        let mut s = command.replace(&*self.shoal.to_string_lossy(), "shoal");
        s = s.replace(&*self.work.to_string_lossy(), "$WORK");
        if let Some(images) = self.v2.parent() {
            s = s.replace(&*images.to_string_lossy(), "$IMAGES");
        }
        s
    }
}

/// Path of `name` in the scratch directory.
pub fn work_path(ctx: &Ctx, name: &str) -> PathBuf {
    ctx.work.join(name)
}

/// Prints progress to stderr (the report goes to stdout).
pub fn progress(msg: &str) {
    eprintln!("shoal-bench: {msg}");
}
