//! Running real processes and measuring them: wall time, peak resident set size, and
//! the sizes of what they wrote.
//!
//! Peak RSS comes from GNU time (`/usr/bin/time -f %M`), which reads it from the
//! `wait4` resource usage of the child (the child and the descendants it waited
//! for), so the bench itself needs no unsafe code and no polling that could miss a
//! short-lived peak. Wall time is taken by the bench around the whole child.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// GNU time, the only way this bench reads a child's peak RSS.
const GNU_TIME: &str = "/usr/bin/time";

/// A command line to run: a program and its arguments.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
}

impl Cmd {
    /// A command running `program` with no arguments yet.
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends several arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// The program.
    pub fn program(&self) -> &OsStr {
        &self.program
    }

    /// The arguments.
    pub fn arguments(&self) -> &[OsString] {
        &self.args
    }

    /// The command line as a shell would show it (for the tables and errors).
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| {
                let s = a.to_string_lossy();
                if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '\'') {
                    format!("'{}'", s.replace('\'', r"'\''"))
                } else {
                    s.into_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the command without measuring it; fails unless it exits 0. Returns stdout.
    pub fn run_plain(&self) -> Result<Vec<u8>> {
        let out = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot start `{}`", self.display()))?;
        check_status(self, out.status, &out.stderr)?;
        Ok(out.stdout)
    }

    /// Whether the command runs and exits 0 (used to probe for subcommands).
    pub fn succeeds(&self) -> bool {
        Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

fn check_status(cmd: &Cmd, status: std::process::ExitStatus, stderr: &[u8]) -> Result<()> {
    check_code(cmd, status, stderr, 0)
}

/// Like [`check_status`], for a command expected to exit with `code` (a refusal
/// under test).
fn check_code(cmd: &Cmd, status: std::process::ExitStatus, stderr: &[u8], code: i32) -> Result<()> {
    if status.code() == Some(code) {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    bail!(
        "`{}` failed ({status}):\n{}",
        cmd.display(),
        tail.join("\n")
    )
}

/// One measured run of a command.
#[derive(Debug, Clone)]
pub struct Run {
    /// Wall time of the child, seconds.
    pub wall_s: f64,
    /// Peak resident set size reported by `wait4`, KiB.
    pub peak_rss_kib: u64,
    /// What the child wrote to stdout.
    pub stdout: Vec<u8>,
}

/// Runs commands under GNU time.
#[derive(Debug)]
pub struct Meter {
    report_file: PathBuf,
}

impl Meter {
    /// A meter writing GNU time's report into `scratch`. Fails if GNU time is missing.
    pub fn new(scratch: &Path) -> Result<Self> {
        let meter = Self {
            report_file: scratch.join(".gnu-time-report"),
        };
        meter.run(&Cmd::new("true")).with_context(|| {
            format!("GNU time is needed at {GNU_TIME} for peak RSS (apt-get install -y time)")
        })?;
        Ok(meter)
    }

    /// Runs `cmd` once (stdin empty, stderr captured), measuring wall time and peak RSS.
    /// Fails, with the tail of its stderr, unless it exits 0.
    pub fn run(&self, cmd: &Cmd) -> Result<Run> {
        self.run_expecting(cmd, 0)
    }

    /// Like [`Meter::run`] for a command that must exit with `code` (e.g. 1 for a
    /// refusal whose cost is measured).
    pub fn run_expecting(&self, cmd: &Cmd, code: i32) -> Result<Run> {
        let _ = fs::remove_file(&self.report_file);
        let start = Instant::now();
        let out = Command::new(GNU_TIME)
            .arg("-f")
            .arg("%M")
            .arg("-o")
            .arg(&self.report_file)
            .arg("--")
            .arg(&cmd.program)
            .args(&cmd.args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot start {GNU_TIME} for `{}`", cmd.display()))?;
        let wall_s = start.elapsed().as_secs_f64();
        check_code(cmd, out.status, &out.stderr, code)?;
        let report = fs::read_to_string(&self.report_file)
            .with_context(|| format!("GNU time wrote no report for `{}`", cmd.display()))?;
        // On failure GNU time writes a "Command exited with non-zero status" line first;
        // the format's line is always the last one.
        let last = report
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let peak_rss_kib = last.trim().parse().with_context(|| {
            format!(
                "unexpected GNU time report {report:?} for `{}`",
                cmd.display()
            )
        })?;
        Ok(Run {
            wall_s,
            peak_rss_kib,
            stdout: out.stdout,
        })
    }
}

/// The runs of one command over the rounds of a bench invocation.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Short name used in the tables ("shoal build", "zck", ...).
    pub label: String,
    /// The exact command line of the last run.
    pub command: String,
    /// Wall time of each run, seconds.
    pub wall_s: Vec<f64>,
    /// Peak RSS of each run, KiB.
    pub peak_rss_kib: Vec<u64>,
    /// Size of what the command produced (file or store), bytes, when it produces one:
    /// the largest over the runs (they should all be equal; see `output_sizes`).
    pub output_bytes: Option<u64>,
    /// The size each run produced.
    pub output_sizes: Vec<u64>,
}

impl Series {
    /// An empty series.
    pub fn new(label: &str) -> Self {
        Self {
            label: label.to_owned(),
            command: String::new(),
            wall_s: Vec::new(),
            peak_rss_kib: Vec::new(),
            output_bytes: None,
            output_sizes: Vec::new(),
        }
    }

    /// Records one run of `cmd`.
    pub fn push(&mut self, cmd: &Cmd, run: &Run) {
        self.command = cmd.display();
        self.wall_s.push(run.wall_s);
        self.peak_rss_kib.push(run.peak_rss_kib);
    }

    /// Records the size of one run's output. The figure compared is the largest (the
    /// size goals are ceilings).
    pub fn record_output_bytes(&mut self, bytes: u64) {
        self.output_sizes.push(bytes);
        self.output_bytes = self.output_sizes.iter().copied().max();
    }

    /// Whether every run produced the same size (a build should be reproducible).
    pub fn sizes_reproducible(&self) -> bool {
        self.output_sizes.windows(2).all(|w| w[0] == w[1])
    }

    /// Median wall time, seconds.
    pub fn median_wall_s(&self) -> f64 {
        median(&self.wall_s)
    }

    /// Largest peak RSS over the runs, MiB (the goals are ceilings, so the worst run counts).
    pub fn max_rss_mib(&self) -> f64 {
        self.peak_rss_kib.iter().copied().max().unwrap_or(0) as f64 / 1024.0
    }
}

/// Median of the values (mean of the middle two for an even count); 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Size of a regular file, bytes.
pub fn file_bytes(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len())
}

/// Every regular file under `dir`, by file name (chunk stores name files by content
/// hash, so the name is the chunk's identity), with its size in bytes.
pub fn files_by_name(dir: &Path) -> Result<BTreeMap<OsString, u64>> {
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                found.insert(entry.file_name(), entry.metadata()?.len());
            }
        }
    }
    Ok(found)
}

/// Removes a file or directory tree if it exists.
pub fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot stat {}", path.display())),
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(path).with_context(|| format!("cannot remove {}", path.display()))
        }
        Ok(_) => fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn display_quotes_what_a_shell_would_split() {
        let cmd = Cmd::new("zck").arg("-o").arg("a b.zck").arg("it's");
        assert_eq!(cmd.display(), r"zck -o 'a b.zck' 'it'\''s'");
    }

    #[test]
    fn series_keeps_the_largest_size_and_flags_irreproducible_ones() {
        let mut s = Series::new("x");
        s.record_output_bytes(10);
        s.record_output_bytes(10);
        assert!(s.sizes_reproducible());
        assert_eq!(s.output_bytes, Some(10));
        s.record_output_bytes(12);
        s.record_output_bytes(11);
        assert!(!s.sizes_reproducible());
        assert_eq!(s.output_bytes, Some(12));
    }

    #[test]
    fn meter_reports_rss_of_child_and_fails_on_nonzero_exit() {
        let dir = tempfile::tempdir().unwrap();
        let meter = Meter::new(dir.path()).unwrap();
        let run = meter.run(&Cmd::new("sh").arg("-c").arg("echo hi")).unwrap();
        assert_eq!(run.stdout, b"hi\n");
        assert!(run.peak_rss_kib > 0);
        let err = meter
            .run(&Cmd::new("sh").arg("-c").arg("echo boom >&2; exit 3"))
            .unwrap_err();
        assert!(format!("{err:#}").contains("boom"), "{err:#}");
    }

    #[test]
    fn files_by_name_walks_nested_store() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("ab")).unwrap();
        fs::write(dir.path().join("ab/abcd.cacnk"), b"12345").unwrap();
        fs::write(dir.path().join("top"), b"1").unwrap();
        let files = files_by_name(dir.path()).unwrap();
        assert_eq!(files.get(OsStr::new("abcd.cacnk")), Some(&5));
        assert_eq!(files.get(OsStr::new("top")), Some(&1));
        assert_eq!(files.len(), 2);
    }
}
