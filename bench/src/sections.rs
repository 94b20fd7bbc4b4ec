//! The goal groups: issue 2 (artifact), issue 4 (install) and issue 9 (hardening).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::measure::{self, Cmd, Series};
use crate::report::{Baseline, Goal, Quantity, Section, Target};
use crate::shoal::{self, Release, Shoal};
use crate::{Ctx, progress, strace, work_path};

/// What a timed command leaves behind, whose size the tables report.
#[derive(Debug)]
enum Output {
    /// Nothing to size.
    None,
    /// One file.
    File(PathBuf),
    /// A chunk store directory: the sum of its files.
    Store(PathBuf),
}

/// One timed command, run once per round.
#[derive(Debug)]
struct Job {
    series: Series,
    cmd: Cmd,
    /// Removed before each run, so every run starts from the same state.
    clean: Vec<PathBuf>,
    /// Run (untimed) after the removals, before each run.
    prepare: Vec<Cmd>,
    output: Output,
    /// A Shoal command may fail (it is what is under test): the failure is reported in
    /// the table instead of ending the bench. A competitor failing ends the bench.
    is_shoal: bool,
    error: Option<String>,
    /// Standard output of the last run.
    last_stdout: Vec<u8>,
    /// The exit code every run must have (0; 1 for a refusal whose cost is measured).
    expect_code: i32,
    /// Run in the first round only (a slow baseline whose output is deterministic
    /// and whose time no goal uses).
    once: bool,
}

impl Job {
    fn new(label: &str, cmd: Cmd, clean: &[&Path], output: Output, is_shoal: bool) -> Self {
        Self {
            series: Series::new(label),
            cmd,
            clean: clean.iter().map(|p| p.to_path_buf()).collect(),
            prepare: Vec::new(),
            output,
            is_shoal,
            error: None,
            last_stdout: Vec::new(),
            expect_code: 0,
            once: false,
        }
    }

    /// Runs in the first round only.
    fn once(mut self) -> Self {
        self.once = true;
        self
    }

    /// Every run must exit with `code` instead of 0.
    fn expecting(mut self, code: i32) -> Self {
        self.expect_code = code;
        self
    }

    /// Commands to run (untimed) before each run, after the removals.
    fn with_prepare(mut self, prepare: Vec<Cmd>) -> Self {
        self.prepare = prepare;
        self
    }

    /// The series if every run succeeded, otherwise why not.
    fn result(&self) -> Result<&Series, String> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(&self.series),
        }
    }
}

/// Runs every job once per round, round-robin, with `sync` before each run so one
/// command's dirty pages are not flushed on the next command's clock.
fn run_rounds(ctx: &Ctx, jobs: &mut [Job]) -> Result<()> {
    for round in 1..=ctx.runs {
        for job in jobs.iter_mut() {
            if job.error.is_some() || (job.once && round > 1) {
                continue;
            }
            for path in &job.clean {
                measure::remove_any(path)?;
            }
            let prepared = job
                .prepare
                .iter()
                .try_for_each(|cmd| cmd.run_plain().map(drop));
            match prepared {
                Ok(()) => {}
                Err(e) if job.is_shoal => {
                    job.error = Some(one_line(&format!("{e:#}")));
                    continue;
                }
                Err(e) => return Err(e),
            }
            Cmd::new("sync").run_plain()?;
            progress(&format!(
                "round {round}/{}: {}",
                ctx.runs,
                job.cmd.display()
            ));
            match ctx.meter.run_expecting(&job.cmd, job.expect_code) {
                Ok(run) => {
                    job.series.push(&job.cmd, &run);
                    job.series.command = ctx.shorten(&job.series.command);
                    job.last_stdout = run.stdout;
                }
                Err(e) if job.is_shoal => {
                    progress(&format!("shoal command failed: {e:#}"));
                    job.error = Some(one_line(&format!("{e:#}")));
                    continue;
                }
                Err(e) => return Err(e),
            }
            let bytes = match &job.output {
                Output::None => continue,
                Output::File(path) => measure::file_bytes(path)?,
                Output::Store(dir) => measure::files_by_name(dir)?.values().sum(),
            };
            job.series.record_output_bytes(bytes);
        }
    }
    Ok(())
}

/// The last line of a (multi-line) error, short enough for a table cell.
fn one_line(s: &str) -> String {
    let line = s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(s);
    line.chars().take(160).collect()
}

fn find<'a>(jobs: &'a [Job], label: &str) -> Option<&'a Job> {
    jobs.iter().find(|j| j.series.label == label)
}

/// A figure from the job labelled `label`, or why there is none (`why_missing` when
/// the job was never set up).
fn figure(
    jobs: &[Job],
    label: &str,
    why_missing: &str,
    f: impl Fn(&Series) -> Option<Quantity>,
) -> Result<Quantity, String> {
    match find(jobs, label) {
        None => Err(why_missing.to_owned()),
        Some(job) => job
            .result()
            .and_then(|s| f(s).ok_or_else(|| format!("`{label}` produced no output"))),
    }
}

/// The competitor's figure (always measured; the bench fails without it).
fn must(jobs: &[Job], label: &str, f: impl Fn(&Series) -> Option<Quantity>) -> Result<Quantity> {
    let job = find(jobs, label).with_context(|| format!("no `{label}` measured"))?;
    f(&job.series).with_context(|| format!("`{label}` produced no output"))
}

fn size(s: &Series) -> Option<Quantity> {
    s.output_bytes.map(Quantity::Bytes)
}

fn wall(s: &Series) -> Option<Quantity> {
    (!s.wall_s.is_empty()).then(|| Quantity::Seconds(s.median_wall_s()))
}

fn rss(s: &Series) -> Option<Quantity> {
    (!s.peak_rss_kib.is_empty()).then(|| Quantity::Mebibytes(s.max_rss_mib()))
}

fn baseline(label: &str, quantity: Quantity) -> Baseline {
    Baseline {
        label: label.to_owned(),
        quantity,
    }
}

/// The two releases: v1 (what the device runs) and v2.
fn releases(ctx: &Ctx) -> (Release<'_>, Release<'_>) {
    (
        Release {
            image: &ctx.v1,
            version: "1.0.0",
            counter: 1,
        },
        Release {
            image: &ctx.v2,
            version: "2.0.0",
            counter: 2,
        },
    )
}

/// Issue 2: the artifact goals.
pub fn artifact(ctx: &Ctx, shoal: &Result<Shoal, String>) -> Result<Section> {
    let w = |name: &str| work_path(ctx, name);
    let (v1, v2) = releases(ctx);
    let (v2_shoal, v2_fast) = (w("v2.shoal"), w("v2-fast.shoal"));
    let (v2_zck, v2_mender) = (w("v2.zck"), w("v2.mender"));
    let (v2_castr, v2_caibx) = (w("v2.castr"), w("v2.caibx"));

    let mut jobs = Vec::new();
    if let Ok(s) = shoal {
        jobs.push(Job::new(
            "shoal build",
            s.build(v2, &v2_shoal, false, None),
            &[&v2_shoal],
            Output::File(v2_shoal.clone()),
            true,
        ));
        jobs.push(Job::new(
            "shoal verify",
            s.verify(&v2_shoal),
            &[],
            Output::None,
            true,
        ));
        jobs.push(Job::new(
            "shoal build --fast",
            s.build(v2, &v2_fast, true, None),
            &[&v2_fast],
            Output::File(v2_fast.clone()),
            true,
        ));
    }
    jobs.push(Job::new(
        "zck",
        zck(&ctx.v2, &v2_zck),
        &[&v2_zck],
        Output::File(v2_zck.clone()),
        false,
    ));
    jobs.push(Job::new(
        "mender-artifact",
        Cmd::new("mender-artifact")
            .args(["write", "rootfs-image", "--no-progress", "--file"])
            .arg(&ctx.v2)
            .args(["--artifact-name", "bench-os-2.0.0", "--device-type"])
            .arg(shoal::DEVICE_TYPE)
            .arg("--output-path")
            .arg(&v2_mender),
        &[&v2_mender],
        Output::File(v2_mender.clone()),
        false,
    ));
    jobs.push(Job::new(
        "casync make",
        casync_make(&v2_castr, &v2_caibx, &ctx.v2),
        &[&v2_castr, &v2_caibx],
        Output::Store(v2_castr.clone()),
        false,
    ));
    run_rounds(ctx, &mut jobs)?;

    // The old release, built once, for the delta goals.
    progress("building the v1 competitors' files for the delta figures");
    let (v1_zck, v1_castr, v1_caibx) = (w("v1.zck"), w("v1.castr"), w("v1.caibx"));
    measure::remove_any(&v1_zck)?;
    zck(&ctx.v1, &v1_zck).run_plain()?;
    measure::remove_any(&v1_castr)?;
    measure::remove_any(&v1_caibx)?;
    casync_make(&v1_castr, &v1_caibx, &ctx.v1).run_plain()?;
    let zck_delta = parse_zck_delta_size(
        &Cmd::new("zck_delta_size")
            .arg(&v1_zck)
            .arg(&v2_zck)
            .run_plain()?,
    )?;
    let v1_chunks = measure::files_by_name(&v1_castr)?;
    let v2_chunks = measure::files_by_name(&v2_castr)?;
    let casync_new: u64 = v2_chunks
        .iter()
        .filter(|(name, _)| !v1_chunks.contains_key(*name))
        .map(|(_, bytes)| bytes)
        .sum();
    let casync_new_count = v2_chunks
        .keys()
        .filter(|name| !v1_chunks.contains_key(*name))
        .count();

    let mut facts = vec![
        (
            "casync v2 index (.caibx), not counted in the store size".to_owned(),
            Quantity::Bytes(measure::file_bytes(&v2_caibx)?).to_string(),
        ),
        (
            "casync chunks: v1 store / v2 store / v2 chunks not in v1".to_owned(),
            format!(
                "{} / {} / {casync_new_count}",
                v1_chunks.len(),
                v2_chunks.len()
            ),
        ),
    ];

    let diff = match (shoal, find(&jobs, "shoal build").map(Job::result)) {
        (Ok(s), Some(Ok(_))) => shoal_delta(ctx, s, v1, v2, &v2_shoal, &mut facts),
        (Err(why), _) => Err(why.clone()),
        (Ok(_), _) => Err("the v2 build failed".to_owned()),
    };

    let image_bytes = measure::file_bytes(&ctx.v2)?;
    let why = shoal.as_ref().err().map_or("", String::as_str);
    let rss_cap = Target::AtMost(Quantity::Mebibytes(64.0));
    let goals = vec![
        Goal::relative(
            "full v2 artifact size (default) vs zchunk",
            figure(&jobs, "shoal build", why, size),
            baseline("`zck` .zck", must(&jobs, "zck", size)?),
            Target::RatioBelow(1.0),
        ),
        Goal::relative(
            "full v2 artifact size (default) vs mender-artifact (gzip)",
            figure(&jobs, "shoal build", why, size),
            baseline("mender-artifact", must(&jobs, "mender-artifact", size)?),
            Target::RatioAtMost(0.92),
        ),
        Goal::relative(
            "build time (default) vs zchunk",
            figure(&jobs, "shoal build", why, wall),
            baseline("`zck`", must(&jobs, "zck", wall)?),
            Target::RatioBelow(1.0),
        ),
        Goal::relative(
            "full v2 artifact size (`--fast`) vs casync store",
            figure(&jobs, "shoal build --fast", why, size),
            baseline("casync store chunks", must(&jobs, "casync make", size)?),
            Target::RatioBelow(1.0),
        ),
        Goal::relative(
            "build time (`--fast`) vs `casync make`",
            figure(&jobs, "shoal build --fast", why, wall),
            baseline("`casync make`", must(&jobs, "casync make", wall)?),
            Target::RatioAtMost(1.0),
        ),
        Goal::relative(
            "download v1 → v2 (`shoal artifact diff`, manifest included) vs casync",
            diff.clone(),
            baseline("casync new-chunk bytes", Quantity::Bytes(casync_new)),
            Target::RatioAtMost(0.70),
        ),
        Goal::relative(
            "download v1 → v2 (`shoal artifact diff`, manifest included) vs zchunk",
            diff,
            baseline("`zck_delta_size`", Quantity::Bytes(zck_delta)),
            Target::RatioAtMost(0.80),
        ),
        Goal::absolute(
            "`shoal artifact verify` throughput (payload MB/s)",
            figure(&jobs, "shoal verify", why, |s| {
                wall(s).map(|_| {
                    Quantity::MegabytesPerSecond(image_bytes as f64 / 1e6 / s.median_wall_s())
                })
            }),
            Target::AtLeast(Quantity::MegabytesPerSecond(400.0)),
        ),
        Goal::absolute(
            "peak RSS of `shoal artifact build` (default)",
            figure(&jobs, "shoal build", why, rss),
            rss_cap,
        ),
        Goal::absolute(
            "peak RSS of `shoal artifact build --fast`",
            figure(&jobs, "shoal build --fast", why, rss),
            rss_cap,
        ),
        Goal::absolute(
            "peak RSS of `shoal artifact verify`",
            figure(&jobs, "shoal verify", why, rss),
            rss_cap,
        ),
    ];
    for job in &jobs {
        if !job.series.sizes_reproducible() {
            let sizes: Vec<String> = job.series.output_sizes.iter().map(u64::to_string).collect();
            facts.push((
                format!(
                    "**`{}` is not reproducible**: output bytes per run",
                    job.series.label
                ),
                format!("{} (the table uses the largest)", sizes.join(", ")),
            ));
        }
    }
    Ok(Section {
        title: "Issue 2 — artifact: size, build time, delta, verify".to_owned(),
        goals,
        series: jobs.into_iter().map(|j| j.series).collect(),
        facts,
    })
}

/// Builds v1 (and a thin v2 against it), and asks `shoal artifact diff` for the
/// download size of v1 → v2.
fn shoal_delta(
    ctx: &Ctx,
    shoal: &Shoal,
    v1: Release<'_>,
    v2: Release<'_>,
    v2_shoal: &Path,
    facts: &mut Vec<(String, String)>,
) -> Result<Quantity, String> {
    let v1_shoal = work_path(ctx, "v1.shoal");
    let thin = work_path(ctx, "v2-thin.shoal");
    let mut step = || -> Result<u64> {
        progress("building the v1 artifact for the delta figure");
        measure::remove_any(&v1_shoal)?;
        shoal.build(v1, &v1_shoal, false, None).run_plain()?;
        let diff = shoal.diff(&v1_shoal, v2_shoal).run_plain()?;
        let bytes = shoal::parse_diff_download_bytes(&diff)?;
        facts.push((
            "`shoal artifact diff --json` v1 → v2".to_owned(),
            format!(
                "`{}`",
                String::from_utf8_lossy(&diff)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ));
        Ok(bytes)
    };
    let bytes = step().map_err(|e| one_line(&format!("{e:#}")))?;
    measure::remove_any(&thin).map_err(|e| format!("{e:#}"))?;
    let thin_fact = match shoal.build(v2, &thin, false, Some(&v1_shoal)).run_plain() {
        Ok(_) => match measure::file_bytes(&thin) {
            Ok(b) => Quantity::Bytes(b).to_string(),
            Err(e) => format!("{e:#}"),
        },
        Err(e) => format!("build failed: {}", one_line(&format!("{e:#}"))),
    };
    facts.push(("thin v2 artifact (`--base v1.shoal`)".to_owned(), thin_fact));
    Ok(Quantity::Bytes(bytes))
}

/// `zck -o OUT IMAGE` with zchunk's defaults (zstd, automatic content-defined chunks).
fn zck(image: &Path, out: &Path) -> Cmd {
    Cmd::new("zck").arg("-o").arg(out).arg(image)
}

/// `casync make` of a blob index with a fresh store, casync's defaults (chunks
/// 16/64/256 KiB min/avg/max, zstd, SHA-512/256).
fn casync_make(store: &Path, index: &Path, image: &Path) -> Cmd {
    let mut store_arg = std::ffi::OsString::from("--store=");
    store_arg.push(store);
    Cmd::new("casync")
        .arg(store_arg)
        .arg("make")
        .arg(index)
        .arg(image)
}

/// The "Would download N of M bytes" figure of `zck_delta_size` (it includes the new
/// file's header, which holds the chunk index).
fn parse_zck_delta_size(stdout: &[u8]) -> Result<u64> {
    let text = String::from_utf8_lossy(stdout);
    for line in text.lines() {
        if let Some(rest) = line.trim().strip_prefix("Would download ")
            && let Some(n) = rest.split_whitespace().next()
        {
            return n
                .parse()
                .with_context(|| format!("bad number in zck_delta_size line {line:?}"));
        }
    }
    bail!("zck_delta_size printed no \"Would download\" line: {text:?}")
}

/// Label of the full install (slot A holds nothing reusable).
const FULL: &str = "shoal install (full)";
/// Label of the install on a device running v1.
const DELTA: &str = "shoal install (v1 → v2)";
/// Label of the install of the thin artifact (v2 against v1) on a device running v1.
const THIN: &str = "shoal install (v1 → v2, thin artifact)";

/// Issue 4: the install goals.
pub fn install(ctx: &Ctx, shoal: &Result<Shoal, String>) -> Result<Section> {
    let (v1, v2) = releases(ctx);
    let image_bytes = measure::file_bytes(&ctx.v2)?;
    let (v1_shoal, v2_shoal) = (work_path(ctx, "v1.shoal"), work_path(ctx, "v2.shoal"));
    let thin_shoal = work_path(ctx, "v2-thin.shoal");
    let dd_slot = work_path(ctx, "slot-dd.img");
    let mut jobs = vec![Job::new(
        "dd",
        Cmd::new("dd")
            .arg(concat_os("if=", &ctx.v2))
            .arg(concat_os("of=", &dd_slot))
            .args(["bs=4M", "conv=fsync", "status=none"]),
        &[&dd_slot],
        Output::File(dd_slot.clone()),
        false,
    )];

    // The Shoal side needs `shoal install`, the artifacts, and the diff figure.
    let ready = (|| -> Result<(&Shoal, u64), String> {
        let s = shoal.as_ref().map_err(Clone::clone)?;
        if !s.cmd().args(["install", "--help"]).succeeds() {
            return Err("this shoal build has no `shoal install`".to_owned());
        }
        let untimed = || -> Result<u64> {
            ensure_artifact(s, v1, &v1_shoal, None)?;
            ensure_artifact(s, v2, &v2_shoal, None)?;
            ensure_artifact(s, v2, &thin_shoal, Some(&v1_shoal))?;
            shoal::parse_diff_download_bytes(&s.diff(&v1_shoal, &v2_shoal).run_plain()?)
        };
        let diff = untimed().map_err(|e| one_line(&format!("{e:#}")))?;
        Ok((s, diff))
    })();
    // (label, device, the artifact it installs)
    let mut devices = Vec::new();
    if let Ok((s, _)) = &ready {
        progress("setting up three file-backed devices (slot A: unrelated data / v1.img / v1.img)");
        for (label, name, slot_a, source) in [
            (FULL, "dev-full", SlotA::Random, &v2_shoal),
            (DELTA, "dev-delta", SlotA::Image(&ctx.v1), &v2_shoal),
            (THIN, "dev-thin", SlotA::Image(&ctx.v1), &thin_shoal),
        ] {
            let dev = Device::create(ctx, s, name, slot_a, image_bytes)?;
            jobs.push(
                Job::new(
                    label,
                    dev.install(s, source),
                    &dev.clean(),
                    Output::None,
                    true,
                )
                .with_prepare(dev.prepare(s)),
            );
            devices.push((label, dev, source));
        }
    }
    run_rounds(ctx, &mut jobs)?;
    measure::remove_any(&dd_slot)?;

    let mut facts = Vec::new();
    if let Ok((_, diff)) = &ready {
        facts.push((
            "`shoal artifact diff` v1 → v2 download".to_owned(),
            Quantity::Bytes(*diff).to_string(),
        ));
        for (label, dev, _) in &devices {
            let Some(job) = find(&jobs, label).filter(|j| j.error.is_none()) else {
                continue;
            };
            facts.push((
                format!("`{label}`: what `--json` reported (last run)"),
                format!("`{}`", String::from_utf8_lossy(&job.last_stdout).trim()),
            ));
            let same = Cmd::new("cmp")
                .arg("-n")
                .arg(image_bytes.to_string())
                .arg(&dev.slot_b)
                .arg(&ctx.v2)
                .succeeds();
            facts.push((
                format!("`{label}`: slot B equals v2.img afterwards"),
                if same { "yes" } else { "**NO**" }.to_owned(),
            ));
        }
    }
    let why = ready.as_ref().err().cloned().unwrap_or_default();
    // Bytes a v1 → v2 install read from its artifact: one more install of it, under
    // strace (untimed, after slot B was checked above).
    let source_read = |label: &str| -> Result<Quantity, String> {
        let (s, _) = ready.as_ref().map_err(Clone::clone)?;
        let Some((_, dev, source)) = devices.iter().find(|(l, _, _)| *l == label) else {
            return Err(why.clone());
        };
        find(&jobs, label).ok_or_else(|| why.clone())?.result()?;
        progress(&format!(
            "counting the reads of `{label}` from its source with strace (untimed)"
        ));
        dev.strace_source_bytes(ctx, s, source)
            .map(Quantity::Bytes)
            .map_err(|e| one_line(&format!("{e:#}")))
    };
    let (delta_read, thin_read) = (source_read(DELTA), source_read(THIN));

    let full_wall = figure(&jobs, FULL, &why, wall);
    let rss_cap = Target::AtMost(Quantity::Mebibytes(32.0));
    let mut goals = vec![Goal::relative(
        "install of the full v2 artifact from a local file into a file slot",
        full_wall.clone(),
        baseline(
            "`dd bs=4M conv=fsync` of the raw image",
            must(&jobs, "dd", wall)?,
        ),
        Target::RatioAtMost(2.0),
    )];
    // Bytes read from the source, against the thin artifact's size.
    let read_goal = |name: &str, read: Result<Quantity, String>| match &ready {
        Ok((_, diff)) => Goal::relative(
            &format!("{name}: bytes read from the source (strace)"),
            read,
            baseline("`shoal artifact diff`", Quantity::Bytes(*diff)),
            Target::RatioAtMost(1.0),
        ),
        Err(why) => Goal::not_run(
            &format!("{name}: bytes read from the source vs `shoal artifact diff`"),
            why.clone(),
            Target::RatioAtMost(1.0),
        ),
    };
    goals.push(read_goal("v1 → v2 install", delta_read));
    goals.push(read_goal("v1 → v2 install of the thin artifact", thin_read));
    goals.push(match &full_wall {
        Ok(full) => Goal::relative(
            "v1 → v2 install: wall time vs the full install",
            figure(&jobs, DELTA, &why, wall),
            baseline("full `shoal install`", *full),
            Target::RatioAtMost(1.0),
        ),
        Err(e) => Goal::not_run(
            "v1 → v2 install: wall time vs the full install",
            e.clone(),
            Target::RatioAtMost(1.0),
        ),
    });
    goals.push(Goal::absolute(
        "peak RSS of `shoal install` (full, 512 MiB image)",
        figure(&jobs, FULL, &why, rss),
        rss_cap,
    ));
    goals.push(Goal::absolute(
        "peak RSS of `shoal install` (v1 → v2)",
        figure(&jobs, DELTA, &why, rss),
        rss_cap,
    ));
    goals.push(Goal::absolute(
        "peak RSS of `shoal install` (v1 → v2, thin artifact)",
        figure(&jobs, THIN, &why, rss),
        rss_cap,
    ));
    let (large_goals, large_facts) = match &ready {
        Ok((s, _)) => install_large(ctx, s, false)?,
        Err(why) => (large_not_run(why), Vec::new()),
    };
    goals.extend(large_goals);
    facts.extend(large_facts);
    Ok(Section {
        title: "Issue 4 — `shoal install`".to_owned(),
        goals,
        series: jobs.into_iter().map(|j| j.series).collect(),
        facts,
    })
}

/// The rows of the installs on generated images, not run because of `why`.
fn large_not_run(why: &str) -> Vec<Goal> {
    LARGE_IMAGES
        .iter()
        .flat_map(|&(label, _, cap)| {
            large_rows(label).map(move |row| {
                Goal::not_run(
                    &row,
                    why.to_owned(),
                    Target::AtMost(Quantity::Mebibytes(cap)),
                )
            })
        })
        .collect()
}

/// The install section's rows on generated images alone (`--only large`), or its
/// thin artifact's rows alone (`--only large-thin`: the full and store installs
/// are not run), to measure them without the rows on the real images.
pub fn install_generated(
    ctx: &Ctx,
    shoal: &Result<Shoal, String>,
    thin_only: bool,
) -> Result<Section> {
    let (goals, facts) = match shoal {
        Ok(s) => install_large(ctx, s, thin_only)?,
        Err(why) => (large_not_run(why), Vec::new()),
    };
    Ok(Section {
        title: "Issue 4 — `shoal install` (generated images)".to_owned(),
        goals,
        series: Vec::new(),
        facts,
    })
}

/// The generated images whose full install's peak RSS is a goal (issue 10: memory
/// that does not grow with the image): label, size, and the cap in MiB.
const LARGE_IMAGES: [(&str, u64, f64); 2] = [("2 GiB", 2 << 30, 32.0), ("8 GiB", 8 << 30, 48.0)];

/// zstd level the generated images' artifacts are built at (see [`install_large`]).
const LARGE_ZSTD_LEVEL: i32 = 1;

/// Table facts: (what, value).
type Facts = Vec<(String, String)>;

/// The rows measured on each generated image (issue 10): the full artifact from a
/// file, the same release from a chunk store (`--store`: the release picked from
/// its envelope's signed fields, verified once), and a thin artifact of a second
/// release whose base (the image) runs in slot A with its manifest kept (the index
/// along the kept manifest).
fn large_rows(label: &str) -> [String; 3] {
    [
        format!("peak RSS of `shoal install` ({label} generated image)"),
        format!("peak RSS of `shoal install --store` ({label} generated image)"),
        format!(
            "peak RSS of `shoal install` of a thin artifact, its base's manifest kept ({label} generated image)"
        ),
    ]
}

/// Peak RSS of `shoal install` of generated 2 GiB and 8 GiB images into file slots:
/// from the artifact file, from a chunk store holding it, and (a second release,
/// thin, on top of the image) along the kept base manifest. Disk is spent one image
/// at a time and given back: the image is written, built into an artifact and a
/// chunk store, and removed; a second image (the first, generated again from its
/// seed, with a few regions changed) is built into a thin artifact against it and
/// removed. The file and store installs run
/// on a device whose slot A is a sparse file (the running slot holds nothing of
/// the release, and the install cuts an index of it as on any device Shoal meets
/// for the first time); that device is removed, then the first image becomes the
/// slot A of a device that keeps its manifest (as a factory image ships it), which
/// installs the thin artifact (generated again from its seed: the same bytes).
/// With `thin_only`, the file and store installs are not run (nor the store
/// built): their rows say so.
fn install_large(ctx: &Ctx, shoal: &Shoal, thin_only: bool) -> Result<(Vec<Goal>, Facts)> {
    let mut goals = Vec::new();
    let mut facts = Vec::new();
    for (k, &(label, size, cap)) in LARGE_IMAGES.iter().enumerate() {
        let target = Target::AtMost(Quantity::Mebibytes(cap));
        let rows = large_rows(label);
        if size > ctx.large_max_bytes {
            progress(&format!(
                "{label} generated image skipped (--large-max-gib {})",
                ctx.large_max_bytes >> 30
            ));
            for row in &rows {
                goals.push(Goal::not_run(
                    row,
                    format!("skipped: --large-max-gib {}", ctx.large_max_bytes >> 30),
                    target,
                ));
            }
            continue;
        }
        let image = work_path(ctx, &format!("large-{k}.img"));
        let image2 = work_path(ctx, &format!("large-{k}-v3.img"));
        let artifact = work_path(ctx, &format!("large-{k}.shoal"));
        let thin = work_path(ctx, &format!("large-{k}-v3-thin.shoal"));
        let store = work_path(ctx, &format!("large-{k}-store"));
        let name = format!("dev-large-{k}");
        let kept_name = format!("dev-large-{k}-kept");
        let cleanup = || -> Result<()> {
            for p in [&image, &image2, &artifact, &thin, &store] {
                measure::remove_any(p)?;
            }
            measure::remove_any(&work_path(ctx, &name))?;
            measure::remove_any(&work_path(ctx, &kept_name))
        };
        let before = goals.len();
        let measured = (|| -> Result<()> {
            progress(&format!("generating a {label} image (untimed)"));
            write_generated_image(&image, size, 0x5ee0 + k as u64)?;
            let release = Release {
                image: &image,
                version: "2",
                counter: 2,
            };
            // The rows measure the install's memory, not the build: the artifact is
            // built at zstd level 1 (same chunks as the default level 9, which took
            // more than 43 minutes for 8 GiB on the loaded 2 cores), and its wall
            // time is reported as a fact.
            progress(&format!(
                "building the {label} artifact at zstd level {LARGE_ZSTD_LEVEL} (untimed)"
            ));
            let started = std::time::Instant::now();
            shoal
                .build(release, &artifact, false, None)
                .arg("--zstd-level")
                .arg(LARGE_ZSTD_LEVEL.to_string())
                .run_plain()?;
            let build_s = started.elapsed().as_secs_f64();
            let artifact_bytes = fs::metadata(&artifact)
                .with_context(|| format!("cannot stat {}", artifact.display()))?
                .len();
            facts.push((
                format!("{label} generated image: artifact build (`--zstd-level {LARGE_ZSTD_LEVEL}`, one run)"),
                format!("{build_s:.1} s, {artifact_bytes} bytes"),
            ));
            if !thin_only {
                progress(&format!(
                    "adding the {label} artifact to a chunk store (untimed)"
                ));
                shoal
                    .cmd()
                    .args(["--quiet", "store", "add"])
                    .arg(&store)
                    .arg(&artifact)
                    .arg("--root")
                    .arg(shoal.root())
                    .run_plain()?;
            }
            // The image is not kept meanwhile (8 GiB of disk at the largest): the
            // second one is generated from the same seed, and the first again
            // where it becomes a slot.
            measure::remove_any(&image)?;
            progress(&format!(
                "building a thin artifact of a second {label} release against it (untimed)"
            ));
            write_generated_image(&image2, size, 0x5ee0 + k as u64)?;
            change_regions(&image2, 0x7ee0 + k as u64)?;
            let started = std::time::Instant::now();
            shoal
                .build(
                    Release {
                        image: &image2,
                        version: "3",
                        counter: 3,
                    },
                    &thin,
                    false,
                    Some(&artifact),
                )
                .arg("--zstd-level")
                .arg(LARGE_ZSTD_LEVEL.to_string())
                .run_plain()?;
            let thin_s = started.elapsed().as_secs_f64();
            measure::remove_any(&image2)?;
            facts.push((
                format!("{label} generated image: thin artifact of the changed copy (one run)"),
                format!("{thin_s:.1} s, {} bytes", measure::file_bytes(&thin)?),
            ));

            // The artifact file and the chunk store, on a device running nothing
            // of the release.
            let mut jobs = Vec::new();
            if !thin_only {
                let dev = Device::create(ctx, shoal, &name, SlotA::Sparse, size)?;
                jobs = vec![
                    Job::new(
                        &format!("shoal install ({label} generated image)"),
                        dev.install(shoal, &artifact),
                        &dev.clean(),
                        Output::None,
                        true,
                    )
                    .with_prepare(dev.prepare(shoal)),
                    Job::new(
                        &format!("shoal install --store ({label} generated image)"),
                        dev.install(shoal, &store),
                        &dev.clean(),
                        Output::None,
                        true,
                    )
                    .with_prepare(dev.prepare(shoal)),
                ];
                run_rounds(ctx, &mut jobs)?;
                measure::remove_any(&work_path(ctx, &name))?;
            }
            measure::remove_any(&store)?;
            // The thin artifact, on a device running the image with its manifest
            // (generated again: the same bytes, from the same seed).
            progress(&format!("generating the {label} image again (untimed)"));
            write_generated_image(&image, size, 0x5ee0 + k as u64)?;
            let mut dev = Device::create(ctx, shoal, &kept_name, SlotA::Moved(&image), size)?;
            dev.ship = dev.ship_manifest(ctx, &artifact)?;
            measure::remove_any(&artifact)?;
            jobs.push(
                Job::new(
                    &format!("shoal install, thin, base manifest kept ({label} generated image)"),
                    dev.install(shoal, &thin),
                    &dev.clean(),
                    Output::None,
                    true,
                )
                .with_prepare(dev.prepare(shoal)),
            );
            let last = jobs.len() - 1;
            run_rounds(ctx, &mut jobs[last..])?;
            for (kept, _) in &dev.ship {
                measure::remove_any(kept)?;
            }
            let measured_rows = if thin_only {
                for row in &rows[..2] {
                    goals.push(Goal::not_run(
                        row,
                        "skipped: --only large-thin".to_owned(),
                        target,
                    ));
                }
                &rows[2..]
            } else {
                &rows[..]
            };
            for (job, row) in jobs.iter().zip(measured_rows) {
                if let Ok(v) = job.result().and_then(|_| {
                    serde_json::from_slice::<serde_json::Value>(&job.last_stdout)
                        .map_err(|e| e.to_string())
                }) {
                    facts.push((
                        format!("`{}`: what `--json` reported (last run)", job.series.label),
                        format!("`{v}`"),
                    ));
                }
                goals.push(Goal::absolute(
                    row,
                    figure(&jobs, &job.series.label, "", rss),
                    target,
                ));
            }
            Ok(())
        })();
        cleanup()?;
        if let Err(e) = measured {
            let why = one_line(&format!("{e:#}"));
            for row in rows.iter().skip(goals.len() - before) {
                goals.push(Goal::not_run(row, why.clone(), target));
            }
        }
    }
    Ok((goals, facts))
}

/// Changes a few regions of the generated image at `dst` in place (64 regions of
/// 64 KiB spread over it, with content from `seed`): a second release that shares
/// nearly every chunk with the first.
fn change_regions(dst: &Path, seed: u64) -> Result<()> {
    use std::os::unix::fs::FileExt as _;
    let file = fs::OpenOptions::new()
        .write(true)
        .open(dst)
        .with_context(|| format!("cannot open {}", dst.display()))?;
    let len = file.metadata()?.len();
    let mut state = seed | 1;
    let mut region = vec![0u8; 64 * 1024];
    for i in 0..64u64 {
        for b in region.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = if state & 1 == 1 { b'B' } else { b'A' };
        }
        let at = (len / 64 * i + len / 128).min(len - region.len() as u64);
        file.write_all_at(&region, at)
            .with_context(|| format!("cannot write {}", dst.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("cannot write {}", dst.display()))?;
    Ok(())
}

/// Writes `size` bytes of generated content to `path`: one random bit per byte
/// (`A` or `B`, from a seeded xorshift), so content-defined chunking cuts it like
/// real data (chunks of every size, none repeated) while zstd stores it in about
/// an eighth of its size (disk is spent on the slot, not the artifact).
fn write_generated_image(path: &Path, size: u64, seed: u64) -> Result<()> {
    use std::io::Write as _;
    let file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut state = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for bytes in block.chunks_mut(64) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = if state >> i & 1 == 1 { b'B' } else { b'A' };
            }
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= n as u64;
    }
    out.flush()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Builds `release` into `out` (untimed; against `base` for a thin artifact)
/// unless an earlier step already did.
fn ensure_artifact(
    shoal: &Shoal,
    release: Release<'_>,
    out: &Path,
    base: Option<&Path>,
) -> Result<()> {
    if !out.is_file() {
        progress(&format!("building {} (untimed)", out.display()));
        shoal.build(release, out, false, base).run_plain()?;
    }
    Ok(())
}

/// What the running slot A of a bench device holds.
#[derive(Debug, Clone, Copy)]
enum SlotA<'a> {
    /// Bytes unrelated to any release (nothing can be reused): a full install.
    Random,
    /// An image the device runs (not installed by Shoal, so the install indexes it).
    Image(&'a Path),
    /// A sparse file of zeros (nothing can be reused; costs no disk).
    Sparse,
    /// An image the device runs, moved into place (no second copy on disk).
    Moved(&'a Path),
}

/// A file-backed device: two slot files, Shoal's file bootloader environment, a data
/// directory, and its configuration file.
#[derive(Debug)]
struct Device {
    config: PathBuf,
    data: PathBuf,
    slot_b: PathBuf,
    env: PathBuf,
    env2: PathBuf,
    size: u64,
    /// Commands that put a release's manifest in the data directory before each
    /// run (see [`Device::ship_manifest`]).
    ship: Vec<(PathBuf, PathBuf)>,
}

impl Device {
    /// Makes the device's directory, slot A and configuration (untimed).
    fn create(ctx: &Ctx, shoal: &Shoal, name: &str, slot_a: SlotA<'_>, size: u64) -> Result<Self> {
        let dir = work_path(ctx, name);
        measure::remove_any(&dir)?;
        let health = dir.join("health.d");
        fs::create_dir_all(&health)
            .with_context(|| format!("cannot create {}", health.display()))?;
        let a = dir.join("slot-a.img");
        match slot_a {
            SlotA::Random => Cmd::new("dd")
                .arg("if=/dev/urandom")
                .arg(concat_os("of=", &a))
                .arg("bs=1M")
                .arg(format!("count={}", size.div_ceil(1 << 20)))
                .arg("status=none")
                .run_plain()?,
            // A real partition has no holes: copy without them.
            SlotA::Image(image) => Cmd::new("cp")
                .arg("--sparse=never")
                .arg(image)
                .arg(&a)
                .run_plain()?,
            // `truncate` below makes it.
            SlotA::Sparse => Vec::new(),
            SlotA::Moved(image) => Cmd::new("mv").arg(image).arg(&a).run_plain()?,
        };
        Cmd::new("truncate")
            .args(["-s", &size.to_string()])
            .arg(&a)
            .run_plain()?;
        let dev = Self {
            config: dir.join("shoal.toml"),
            data: dir.join("data"),
            slot_b: dir.join("slot-b.img"),
            env: dir.join("bootenv"),
            env2: dir.join("bootenv.2"),
            size,
            ship: Vec::new(),
        };
        let toml_str = |p: &Path| toml_string(&p.to_string_lossy());
        let config = format!(
            "[device]\ntype = {}\ndata_dir = {}\ntrust_root = {}\nreboot_command = []\n\n\
             [health]\ndir = {}\n\n\
             [slots]\na = {{ path = {} }}\nb = {{ path = {} }}\n\n\
             [slots.detect]\nfrom = \"bootloader\"\n\n\
             [bootloader]\ntype = \"file\"\npath = {}\n",
            toml_string(shoal::DEVICE_TYPE),
            toml_str(&dev.data),
            toml_str(shoal.root()),
            toml_str(&health),
            toml_str(&a),
            toml_str(&dev.slot_b),
            toml_str(&dev.env),
        );
        fs::write(&dev.config, config)
            .with_context(|| format!("cannot write {}", dev.config.display()))?;
        Ok(dev)
    }

    /// What each run removes: the device store, slot B, the bootloader environment.
    fn clean(&self) -> Vec<&Path> {
        vec![&self.data, &self.slot_b, &self.env, &self.env2]
    }

    /// What each run starts from: an empty slot B of the image's size, and a
    /// bootloader environment that runs slot A (as a factory-provisioned board).
    fn prepare(&self, shoal: &Shoal) -> Vec<Cmd> {
        let mut cmds = vec![
            Cmd::new("truncate")
                .args(["-s", &self.size.to_string()])
                .arg(&self.slot_b),
            shoal
                .cmd()
                .args(["--quiet", "env", "set", "--file"])
                .arg(&self.env)
                .args(["shoal_slot=A", "shoal_booted=A"]),
        ];
        for (kept, dest) in &self.ship {
            if let Some(dir) = dest.parent() {
                cmds.push(Cmd::new("mkdir").arg("-p").arg(dir));
            }
            cmds.push(Cmd::new("cp").arg(kept).arg(dest));
        }
        cmds
    }

    /// Where `artifact`'s signed manifest (and its dictionary, which a thin
    /// release may reuse) is put so the device keeps it as the manifests of its
    /// releases (`DATA/manifests/<hash>.envelope`, `<hash>.dictionary`), by
    /// [`Device::prepare`]; the files are written to the work directory here
    /// (untimed).
    fn ship_manifest(&self, ctx: &Ctx, artifact: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
        let file = fs::File::open(artifact)
            .with_context(|| format!("cannot open {}", artifact.display()))?;
        let mut r = shoal_artifact::ArtifactReader::open_unverified(std::io::BufReader::new(file))
            .with_context(|| format!("cannot read {}", artifact.display()))?;
        let hash = hex::encode(r.manifest().hash());
        let name = format!("{hash}.envelope");
        let kept = work_path(ctx, &name);
        fs::write(&kept, r.envelope().to_bytes())
            .with_context(|| format!("cannot write {}", kept.display()))?;
        let mut ship = vec![(kept, self.data.join("manifests").join(&name))];
        let dictionary = r
            .read_dictionary()
            .with_context(|| format!("cannot read {}", artifact.display()))?;
        if let Some(d) = dictionary {
            let name = format!("{hash}.dictionary");
            let kept = work_path(ctx, &name);
            fs::write(&kept, d.bytes())
                .with_context(|| format!("cannot write {}", kept.display()))?;
            ship.push((kept, self.data.join("manifests").join(&name)));
        }
        Ok(ship)
    }

    /// `shoal install SOURCE --config CONFIG --json`.
    fn install(&self, shoal: &Shoal, source: &Path) -> Cmd {
        shoal
            .cmd()
            .args(["--quiet", "install"])
            .arg(source)
            .arg("--config")
            .arg(&self.config)
            .arg("--json")
    }

    /// Resets the device, installs once under strace and returns the bytes read
    /// from `source`.
    fn strace_source_bytes(&self, ctx: &Ctx, shoal: &Shoal, source: &Path) -> Result<u64> {
        for p in self.clean() {
            measure::remove_any(p)?;
        }
        for cmd in self.prepare(shoal) {
            cmd.run_plain()?;
        }
        let log = work_path(ctx, "install.strace");
        strace::wrap(&self.install(shoal, source), &log).run_plain()?;
        let text =
            fs::read_to_string(&log).with_context(|| format!("cannot read {}", log.display()))?;
        let canonical = fs::canonicalize(source)?;
        let bytes = strace::bytes_read_from(&text, &canonical.to_string_lossy(), false)?;
        measure::remove_any(&log)?;
        Ok(bytes)
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn concat_os(prefix: &str, path: &Path) -> std::ffi::OsString {
    let mut s = std::ffi::OsString::from(prefix);
    s.push(path);
    s
}

/// Size of the unsigned envelope the hardening goals refuse.
const UNSIGNED_ENVELOPE_BYTES: usize = 15_000_000;

/// Writes a `.shoal` whose first member is an envelope of `signed_len` bytes with
/// no signature (`{"signed": h'5a5a…', "signatures": []}` in canonical CBOR), and
/// the end blocks: what an attacker hands someone to inspect or verify.
fn write_unsigned_artifact(path: &Path, signed_len: usize) -> Result<u64> {
    let len = u32::try_from(signed_len).context("envelope too large")?;
    let mut envelope = vec![0xa2, 0x66];
    envelope.extend_from_slice(b"signed");
    envelope.push(0x5a);
    envelope.extend_from_slice(&len.to_be_bytes());
    envelope.resize(envelope.len() + signed_len, 0x5a);
    envelope.push(0x6a);
    envelope.extend_from_slice(b"signatures");
    envelope.push(0x80);
    let mut header = [0u8; 512];
    let name = b"manifest.envelope";
    header[..name.len()].copy_from_slice(name);
    header[100..108].copy_from_slice(b"0000644\0");
    header[108..116].copy_from_slice(b"0000000\0");
    header[116..124].copy_from_slice(b"0000000\0");
    header[124..136].copy_from_slice(format!("{:011o}\0", envelope.len()).as_bytes());
    header[136..148].copy_from_slice(b"00000000000\0");
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(&envelope);
    bytes.resize(bytes.len().next_multiple_of(512) + 1024, 0);
    fs::write(path, &bytes).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(envelope.len() as u64)
}

/// Issue 9: an unsigned envelope is refused before it costs memory. Peak RSS of
/// `shoal artifact verify`, `inspect` and `diff` refusing a 15 MB envelope without
/// signatures, each at most 16 MiB (before the fix each read and decoded it whole).
pub fn harden(ctx: &Ctx, shoal: &Result<Shoal, String>) -> Result<Section> {
    let big = work_path(ctx, "unsigned-envelope.shoal");
    let envelope_bytes = write_unsigned_artifact(&big, UNSIGNED_ENVELOPE_BYTES)?;
    let facts = vec![(
        "unsigned envelope refused".to_owned(),
        format!(
            "{envelope_bytes} bytes ({:.1} MB), no signature",
            envelope_bytes as f64 / 1e6
        ),
    )];
    const INSPECT: &str = "shoal artifact inspect (unsigned 15 MB envelope)";
    const VERIFY: &str = "shoal artifact verify --root (unsigned 15 MB envelope)";
    const DIFF: &str = "shoal artifact diff (unsigned 15 MB envelope)";
    let why = match shoal {
        Ok(_) => String::new(),
        Err(e) => e.clone(),
    };
    let mut jobs = Vec::new();
    if let Ok(s) = shoal {
        let job =
            |label: &str, cmd: Cmd| Job::new(label, cmd, &[], Output::None, true).expecting(1);
        jobs.push(job(
            INSPECT,
            s.cmd().args(["artifact", "inspect"]).arg(&big),
        ));
        jobs.push(job(
            VERIFY,
            s.cmd()
                .args(["artifact", "verify", "--root"])
                .arg(s.root())
                .arg(&big),
        ));
        jobs.push(job(
            DIFF,
            s.cmd().args(["artifact", "diff"]).arg(&big).arg(&big),
        ));
        run_rounds(ctx, &mut jobs)?;
    }
    let cap = Target::AtMost(Quantity::Mebibytes(16.0));
    let goals = [
        ("peak RSS of `shoal artifact inspect` refusing it", INSPECT),
        ("peak RSS of `shoal artifact verify` refusing it", VERIFY),
        ("peak RSS of `shoal artifact diff` refusing it", DIFF),
    ]
    .into_iter()
    .map(|(name, label)| Goal::absolute(name, figure(&jobs, label, &why, rss), cap))
    .collect();
    measure::remove_any(&big)?;
    Ok(Section {
        title: "Issue 9 — hardening: an unsigned envelope is refused before it costs memory"
            .to_owned(),
        goals,
        series: jobs.into_iter().map(|j| j.series).collect(),
        facts,
    })
}

/// Issue 10: the engine's fetch scheduler, on the engine alone (virtual time, the
/// in-memory device). Rows not listed are not measured yet.
pub fn engine() -> Result<Section> {
    progress("engine: dead-source install, 30,000 chunks (virtual time)");
    let runs = shoal_engine::testing::dead_source_experiment(30_000, 1);
    let healthy = Quantity::Seconds(runs.healthy_ms as f64 / 1000.0);
    let dead = Quantity::Seconds(runs.dead_ms as f64 / 1000.0);
    progress("engine: 10 engines on one LAN, 2,000 chunks, without and with owners dying");
    let (lan, lan_ms) = shoal_engine::testing::lan_experiment(10, 2_000, false);
    let (lan_dying, lan_dying_ms) = shoal_engine::testing::lan_experiment(10, 2_000, true);
    let (state_goals, state_facts) =
        crate::engine_bench::rows(std::path::Path::new("/tmp/shoal-images/v2.img"))?;
    let mut goals = vec![Goal::relative(
        "install with one of two request sources dead (virtual time, 30,000 chunks)",
        Ok(dead),
        Baseline {
            label: "the healthy source alone".to_string(),
            quantity: healthy,
        },
        Target::RatioAtMost(1.2),
    )];
    // WAN fetches per needed chunk, as a ratio to one fetch per chunk.
    let once = Baseline {
        label: "one WAN fetch per chunk".to_string(),
        quantity: Quantity::PerChunk(1.0),
    };
    goals.push(Goal::relative(
        "10 engines on one LAN: WAN fetches per needed chunk",
        Ok(Quantity::PerChunk(lan)),
        once.clone(),
        Target::RatioAtMost(1.0),
    ));
    goals.push(Goal::relative(
        "10 engines on one LAN, 2 owners killed mid-way: WAN fetches per needed chunk",
        Ok(Quantity::PerChunk(lan_dying)),
        once,
        Target::RatioAtMost(1.1),
    ));
    goals.extend(state_goals);
    Ok(Section {
        title: "Issue 10: engine".to_string(),
        goals,
        series: Vec::new(),
        facts: vec![
            (
                "requests to the healthy source alone for 30,000 chunks".to_string(),
                runs.healthy_requests.to_string(),
            ),
            (
                "healthy / dead-source virtual time".to_string(),
                format!("{} ms / {} ms", runs.healthy_ms, runs.dead_ms),
            ),
            (
                "LAN rows: WAN fetches per needed chunk, and virtual time".to_string(),
                format!(
                    "{lan:.3} in {lan_ms} ms; with owners dying {lan_dying:.3} in {lan_dying_ms} ms (virtual time)"
                ),
            ),
        ]
        .into_iter()
        .chain(state_facts)
        .collect(),
    })
}

/// casync's new-chunk bytes and zchunk's download (`zck_delta_size`) from `old` to
/// `new` (untimed): the competitors' delta figures for one pair of images.
fn competitor_deltas(ctx: &Ctx, old: &Path, new: &Path, tag: &str) -> Result<(u64, u64)> {
    let w = |name: &str| work_path(ctx, &format!("{tag}-{name}"));
    let (old_zck, new_zck) = (w("old.zck"), w("new.zck"));
    let (old_castr, old_caibx) = (w("old.castr"), w("old.caibx"));
    let (new_castr, new_caibx) = (w("new.castr"), w("new.caibx"));
    for p in [
        &old_zck, &new_zck, &old_castr, &old_caibx, &new_castr, &new_caibx,
    ] {
        measure::remove_any(p)?;
    }
    progress(&format!("zck and casync of both images of {tag} (untimed)"));
    zck(old, &old_zck).run_plain()?;
    zck(new, &new_zck).run_plain()?;
    casync_make(&old_castr, &old_caibx, old).run_plain()?;
    casync_make(&new_castr, &new_caibx, new).run_plain()?;
    let zck_delta = parse_zck_delta_size(
        &Cmd::new("zck_delta_size")
            .arg(&old_zck)
            .arg(&new_zck)
            .run_plain()?,
    )?;
    let old_chunks = measure::files_by_name(&old_castr)?;
    let new_chunks = measure::files_by_name(&new_castr)?;
    let casync_new = new_chunks
        .iter()
        .filter(|(name, _)| !old_chunks.contains_key(*name))
        .map(|(_, bytes)| bytes)
        .sum();
    for p in [
        &old_zck, &new_zck, &old_castr, &old_caibx, &new_castr, &new_caibx,
    ] {
        measure::remove_any(p)?;
    }
    Ok((casync_new, zck_delta))
}

/// `zstd -19 --long=30 --patch-from=OLD NEW -o OUT`: the whole-image delta a device
/// with 2 GB of memory could apply.
fn zstd_patch_from(old: &Path, new: &Path, out: &Path) -> Cmd {
    Cmd::new("zstd")
        .args(["-q", "-f", "-19", "--long=30"])
        .arg(concat_os("--patch-from=", old))
        .arg(new)
        .arg("-o")
        .arg(out)
}

/// Label of the delta-encoded install (v1 → v2).
const REF_INSTALL: &str = "shoal install (v1 → v2, delta-encoded thin artifact)";
/// Label of the full install it is compared with.
const REF_FULL: &str = "shoal install (full, for comparison)";

/// Issue 12: reference-compressed (delta-encoded) chunks.
pub fn refchunk(ctx: &Ctx, shoal: &Result<Shoal, String>) -> Result<Section> {
    let w = |name: &str| work_path(ctx, name);
    let (v1, v2) = releases(ctx);
    let v3_img = ctx
        .v2
        .parent()
        .map_or_else(|| PathBuf::from("v3.img"), |d| d.join("v3.img"));
    let v3 = Release {
        image: &v3_img,
        version: "3.0.0",
        counter: 3,
    };
    let hotfix = v3_img.is_file();
    let (v1_shoal, v2_shoal) = (w("v1.shoal"), w("v2.shoal"));
    let (v2_thin, v2_delta, v3_delta) =
        (w("v2-thin.shoal"), w("v2-delta.shoal"), w("v3-delta.shoal"));
    let (v2_patch, v3_patch) = (w("v2.zst-patch"), w("v3.zst-patch"));

    let ready = (|| -> Result<&Shoal, String> {
        let s = shoal.as_ref().map_err(Clone::clone)?;
        if !s
            .cmd()
            .args(["artifact", "build", "--help"])
            .run_plain()
            .is_ok_and(|o| String::from_utf8_lossy(&o).contains("--base-image"))
        {
            return Err("this shoal build has no `artifact build --base-image`".to_owned());
        }
        ensure_artifact(s, v1, &v1_shoal, None).map_err(|e| one_line(&format!("{e:#}")))?;
        ensure_artifact(s, v2, &v2_shoal, None).map_err(|e| one_line(&format!("{e:#}")))?;
        Ok(s)
    })();
    let image_bytes = measure::file_bytes(&ctx.v2)?;
    // `zstd --patch-from` runs once: its size is deterministic, no goal uses its
    // time, and one run takes minutes (14 on a loaded machine), so three rounds of it
    // would keep Shoal's rows from being medians of three.
    let mut jobs = vec![
        Job::new(
            "zstd --patch-from (v1 → v2)",
            zstd_patch_from(&ctx.v1, &ctx.v2, &v2_patch),
            &[&v2_patch],
            Output::File(v2_patch.clone()),
            false,
        )
        .once(),
    ];
    if hotfix {
        jobs.push(
            Job::new(
                "zstd --patch-from (v2 → v3)",
                zstd_patch_from(&ctx.v2, &v3_img, &v3_patch),
                &[&v3_patch],
                Output::File(v3_patch.clone()),
                false,
            )
            .once(),
        );
    }
    let mut devices = Vec::new();
    if let Ok(s) = &ready {
        jobs.push(Job::new(
            "shoal build --base (thin v2, plain chunks)",
            s.build(v2, &v2_thin, false, Some(&v1_shoal)),
            &[&v2_thin],
            Output::File(v2_thin.clone()),
            true,
        ));
        jobs.push(Job::new(
            "shoal build --base --base-image (v2)",
            s.build_delta(v2, &v2_delta, &v1_shoal, &ctx.v1),
            &[&v2_delta],
            Output::File(v2_delta.clone()),
            true,
        ));
        if hotfix {
            jobs.push(Job::new(
                "shoal build --base --base-image (v3, hotfix)",
                s.build_delta(v3, &v3_delta, &v2_shoal, &ctx.v2),
                &[&v3_delta],
                Output::File(v3_delta.clone()),
                true,
            ));
        }
    }
    run_rounds(ctx, &mut jobs)?;
    // The installs need the delta artifact the rounds built.
    if let Ok(s) = &ready
        && v2_delta.is_file()
    {
        progress("setting up two file-backed devices (slot A: unrelated data / v1.img)");
        let mut install_jobs = Vec::new();
        for (label, name, slot_a, source) in [
            (REF_FULL, "dev-ref-full", SlotA::Random, &v2_shoal),
            (
                REF_INSTALL,
                "dev-ref-delta",
                SlotA::Image(&ctx.v1),
                &v2_delta,
            ),
        ] {
            let dev = Device::create(ctx, s, name, slot_a, image_bytes)?;
            let mut dev = dev;
            // The device running v1 holds v1's signed manifest, as one that
            // installed it (or a factory image that ships it) does: the delta
            // artifact's manifest travels as a delta against it.
            if matches!(slot_a, SlotA::Image(_)) {
                dev.ship = dev.ship_manifest(ctx, &v1_shoal)?;
            }
            let prepare = dev.prepare(s);
            install_jobs.push(
                Job::new(
                    label,
                    dev.install(s, source),
                    &dev.clean(),
                    Output::None,
                    true,
                )
                .with_prepare(prepare),
            );
            devices.push((label, dev, source.clone()));
        }
        run_rounds(ctx, &mut install_jobs)?;
        jobs.extend(install_jobs);
    }

    let mut facts = Vec::new();
    let why = ready.as_ref().err().cloned().unwrap_or_default();
    // `shoal artifact diff OLD NEW-DELTA`: the download, and its fixed part.
    let diff_of = |old: &Path, new: &Path| -> Result<(u64, u64), String> {
        let s = ready.as_ref().map_err(Clone::clone)?;
        if !new.is_file() {
            return Err("the delta build failed".to_owned());
        }
        let out = s
            .diff(old, new)
            .run_plain()
            .map_err(|e| one_line(&format!("{e:#}")))?;
        let field = |k: &str| shoal::parse_diff_field(&out, k).map_err(|e| format!("{e:#}"));
        Ok((
            field("download_bytes")?,
            field("manifest_bytes")? + field("dictionary_bytes")?,
        ))
    };
    let v2_diff = diff_of(&v1_shoal, &v2_delta);
    let (v1v2_casync, v1v2_zck) = competitor_deltas(ctx, &ctx.v1, &ctx.v2, "v1v2")?;
    let plain_thin = find(&jobs, "shoal build --base (thin v2, plain chunks)")
        .and_then(|j| j.result().ok())
        .and_then(size);
    if let Some(q) = plain_thin {
        facts.push((
            "thin v2 artifact with plain chunks (before issue 12)".to_owned(),
            q.to_string(),
        ));
    }
    if let Ok((d, fixed)) = &v2_diff {
        facts.push((
            "v1 → v2 download: manifest + dictionary of it".to_owned(),
            format!(
                "{} ({:.1} %)",
                Quantity::Bytes(*fixed),
                *fixed as f64 * 100.0 / *d as f64
            ),
        ));
    }
    for (label, dev, _) in &devices {
        let Some(job) = find(&jobs, label).filter(|j| j.error.is_none()) else {
            continue;
        };
        facts.push((
            format!("`{label}`: what `--json` reported (last run)"),
            format!("`{}`", String::from_utf8_lossy(&job.last_stdout).trim()),
        ));
        let same = Cmd::new("cmp")
            .arg("-n")
            .arg(image_bytes.to_string())
            .arg(&dev.slot_b)
            .arg(&ctx.v2)
            .succeeds();
        facts.push((
            format!("`{label}`: slot B equals v2.img afterwards"),
            if same { "yes" } else { "**NO**" }.to_owned(),
        ));
    }
    let install_read = (|| -> Result<Quantity, String> {
        let s = ready.as_ref().map_err(Clone::clone)?;
        let (_, dev, source) = devices
            .iter()
            .find(|(l, _, _)| *l == REF_INSTALL)
            .ok_or_else(|| "the delta artifact was not built".to_owned())?;
        find(&jobs, REF_INSTALL)
            .ok_or_else(|| why.clone())?
            .result()?;
        progress(
            "counting the reads of the delta-encoded install from its artifact (strace, untimed)",
        );
        dev.strace_source_bytes(ctx, s, source)
            .map(Quantity::Bytes)
            .map_err(|e| one_line(&format!("{e:#}")))
    })();

    let bytes = |r: &Result<(u64, u64), String>| r.clone().map(|(d, _)| Quantity::Bytes(d));
    let patch_v2 = must(&jobs, "zstd --patch-from (v1 → v2)", size)?;
    facts.push((
        "`zstd --patch-from` runs".to_owned(),
        "once, in the first round (deterministic size; its time is for reference)".to_owned(),
    ));
    facts.push((
        "`zstd -19 --long=30 --patch-from` v1 → v2: size / time / peak RSS".to_owned(),
        format!(
            "{} / {} / {}",
            patch_v2,
            must(&jobs, "zstd --patch-from (v1 → v2)", wall)?,
            must(&jobs, "zstd --patch-from (v1 → v2)", rss)?
        ),
    ));
    let mut goals = vec![
        Goal::absolute(
            "download v1 → v2 (`shoal artifact diff` of the delta-encoded thin artifact, everything included)",
            bytes(&v2_diff),
            Target::AtMost(Quantity::Bytes(9_000_000)),
        ),
        Goal::relative(
            "download v1 → v2 vs casync",
            bytes(&v2_diff),
            baseline("casync new-chunk bytes", Quantity::Bytes(v1v2_casync)),
            Target::RatioAtMost(0.70),
        ),
        Goal::relative(
            "download v1 → v2 vs zchunk",
            bytes(&v2_diff),
            baseline("`zck_delta_size`", Quantity::Bytes(v1v2_zck)),
            Target::RatioAtMost(0.80),
        ),
        Goal::relative(
            "download v1 → v2 vs `zstd -19 --long=30 --patch-from` (for reference: no target of the issue)",
            bytes(&v2_diff),
            baseline("`zstd --patch-from` v1 → v2", patch_v2),
            Target::RatioAtMost(2.0),
        ),
        Goal::relative(
            "build time of the delta-encoded thin artifact vs the plain thin build",
            figure(&jobs, "shoal build --base --base-image (v2)", &why, wall),
            baseline(
                "`shoal artifact build --base` (plain chunks)",
                must(&jobs, "shoal build --base (thin v2, plain chunks)", wall)
                    .unwrap_or(Quantity::Seconds(f64::NAN)),
            ),
            Target::RatioAtMost(2.0),
        ),
        Goal::absolute(
            "peak RSS of `shoal artifact build --base --base-image` (v2)",
            figure(&jobs, "shoal build --base --base-image (v2)", &why, rss),
            Target::AtMost(Quantity::Mebibytes(128.0)),
        ),
        Goal::absolute(
            "peak RSS of the delta-encoded install (v1 → v2)",
            figure(&jobs, REF_INSTALL, &why, rss),
            Target::AtMost(Quantity::Mebibytes(32.0)),
        ),
        match figure(&jobs, REF_FULL, &why, wall) {
            Ok(full) => Goal::relative(
                "delta-encoded install (v1 → v2): wall time vs the full install",
                figure(&jobs, REF_INSTALL, &why, wall),
                baseline("full `shoal install`", full),
                Target::RatioAtMost(1.0),
            ),
            Err(e) => Goal::not_run(
                "delta-encoded install (v1 → v2): wall time vs the full install",
                e,
                Target::RatioAtMost(1.0),
            ),
        },
        match &v2_diff {
            Ok((d, _)) => Goal::relative(
                "delta-encoded install (v1 → v2): bytes read from the artifact (strace)",
                install_read,
                baseline("`shoal artifact diff`", Quantity::Bytes(*d)),
                Target::RatioAtMost(1.0),
            ),
            Err(e) => Goal::not_run(
                "delta-encoded install (v1 → v2): bytes read from the artifact vs `shoal artifact diff`",
                e.clone(),
                Target::RatioAtMost(1.0),
            ),
        },
    ];
    if hotfix {
        let v3_diff = diff_of(&v2_shoal, &v3_delta);
        let (casync3, zck3) = competitor_deltas(ctx, &ctx.v2, &v3_img, "v2v3")?;
        let patch_v3 = must(&jobs, "zstd --patch-from (v2 → v3)", size)?;
        facts.push((
            "`zstd -19 --long=30 --patch-from` v2 → v3: size / time / peak RSS".to_owned(),
            format!(
                "{} / {} / {}",
                patch_v3,
                must(&jobs, "zstd --patch-from (v2 → v3)", wall)?,
                must(&jobs, "zstd --patch-from (v2 → v3)", rss)?
            ),
        ));
        goals.push(Goal::relative(
            "hotfix v2 → v3 download vs casync",
            bytes(&v3_diff),
            baseline("casync new-chunk bytes", Quantity::Bytes(casync3)),
            Target::RatioAtMost(0.70),
        ));
        goals.push(Goal::relative(
            "hotfix v2 → v3 download vs zchunk",
            bytes(&v3_diff),
            baseline("`zck_delta_size`", Quantity::Bytes(zck3)),
            Target::RatioAtMost(0.70),
        ));
        goals.push(Goal::relative(
            "hotfix v2 → v3 download vs `zstd -19 --long=30 --patch-from`",
            bytes(&v3_diff),
            baseline("`zstd --patch-from` v2 → v3", patch_v3),
            Target::RatioAtMost(1.4),
        ));
        goals.push(match &v3_diff {
            Ok((d, fixed)) => Goal::relative(
                "hotfix v2 → v3: manifest + dictionary in the download",
                Ok(Quantity::Bytes(*fixed)),
                baseline("the whole v2 → v3 download", Quantity::Bytes(*d)),
                Target::RatioAtMost(0.10),
            ),
            Err(e) => Goal::not_run(
                "hotfix v2 → v3: manifest + dictionary in the download",
                e.clone(),
                Target::RatioAtMost(0.10),
            ),
        });
    } else {
        facts.push((
            "hotfix pair v2 → v3".to_owned(),
            format!(
                "not measured: {} is missing (run bench/make-hotfix-image.sh as root)",
                v3_img.display()
            ),
        ));
    }
    for p in [&v2_patch, &v3_patch] {
        measure::remove_any(p)?;
    }
    Ok(Section {
        title: "Issue 12 — delta-encoded chunks (reference-compressed)".to_owned(),
        goals,
        series: jobs.into_iter().map(|j| j.series).collect(),
        facts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zck_delta_size_output_is_parsed() {
        let out = b"Would download 19447716 of 79834649 bytes\nMatched 6066 of 7076 chunks\n";
        assert_eq!(parse_zck_delta_size(out).unwrap(), 19_447_716);
        assert!(parse_zck_delta_size(b"Matched 1 of 2 chunks\n").is_err());
        assert!(parse_zck_delta_size(b"Would download lots of bytes\n").is_err());
    }

    #[test]
    fn one_line_keeps_the_last_line() {
        assert_eq!(one_line("`x` failed:\nfirst\nreason here\n"), "reason here");
    }
}
