//! Goals, their verdicts, and the Markdown/JSON rendering of a bench run.

use std::fmt::{self, Write as _};

use serde::Serialize;

use crate::measure::Series;

/// A measured figure with its unit.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "unit", content = "value", rename_all = "snake_case")]
pub enum Quantity {
    /// A size in bytes (shown in MB, 10^6 bytes).
    Bytes(u64),
    /// A duration in seconds.
    Seconds(f64),
    /// A throughput in MB/s (10^6 bytes per second).
    MegabytesPerSecond(f64),
    /// A memory size in MiB.
    Mebibytes(f64),
    /// A count per needed chunk (e.g. WAN fetches per chunk).
    PerChunk(f64),
    /// A memory size in KiB.
    Kibibytes(f64),
    /// A duration in microseconds.
    Microseconds(f64),
    /// A duration in nanoseconds.
    Nanoseconds(f64),
    /// A duration in milliseconds (request latencies).
    Milliseconds(f64),
}

impl Quantity {
    fn value(self) -> f64 {
        match self {
            Quantity::Bytes(b) => b as f64,
            Quantity::Seconds(v)
            | Quantity::MegabytesPerSecond(v)
            | Quantity::Mebibytes(v)
            | Quantity::PerChunk(v)
            | Quantity::Kibibytes(v)
            | Quantity::Microseconds(v)
            | Quantity::Nanoseconds(v)
            | Quantity::Milliseconds(v) => v,
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Quantity::Bytes(b) => write!(f, "{:.2} MB", b as f64 / 1e6),
            Quantity::Seconds(s) => write!(f, "{s:.2} s"),
            Quantity::MegabytesPerSecond(v) => write!(f, "{v:.0} MB/s"),
            Quantity::Mebibytes(v) => write!(f, "{v:.1} MiB"),
            Quantity::PerChunk(v) => write!(f, "{v:.3} per chunk"),
            Quantity::Kibibytes(v) => write!(f, "{v:.1} KiB"),
            Quantity::Microseconds(v) => write!(f, "{v:.1} µs"),
            Quantity::Nanoseconds(v) => write!(f, "{v:.0} ns"),
            Quantity::Milliseconds(v) => write!(f, "{v:.1} ms"),
        }
    }
}

/// What a goal requires of Shoal's figure.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// shoal / baseline must be strictly below this factor.
    RatioBelow(f64),
    /// shoal / baseline must be at most this factor.
    RatioAtMost(f64),
    /// The figure must be at least this absolute value.
    AtLeast(Quantity),
    /// The figure must be at most this absolute value.
    AtMost(Quantity),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::RatioBelow(r) => write!(f, "< {r:.2} ×"),
            Target::RatioAtMost(r) => write!(f, "≤ {r:.2} ×"),
            Target::AtLeast(q) => write!(f, "≥ {q}"),
            Target::AtMost(q) => write!(f, "≤ {q}"),
        }
    }
}

/// The figure a goal compares against, measured in the same invocation.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// Which tool and measure ("zck .zck size").
    pub label: String,
    /// Its figure.
    pub quantity: Quantity,
}

/// The verdict of one goal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// The goal is met.
    Pass,
    /// The goal is missed.
    Fail,
    /// Shoal's side could not be measured (the command is missing or failed).
    NotRun,
}

/// One row of a goal table.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    /// What is measured.
    pub name: String,
    /// Shoal's figure, or why there is none.
    pub shoal: Result<Quantity, String>,
    /// The baseline, for relative goals.
    pub baseline: Option<Baseline>,
    /// The requirement.
    pub target: Target,
    /// shoal / baseline, for relative goals with a figure.
    pub ratio: Option<f64>,
    /// The verdict.
    pub verdict: Verdict,
}

impl Goal {
    /// A goal relative to a baseline measured in the same run.
    pub fn relative(
        name: &str,
        shoal: Result<Quantity, String>,
        baseline: Baseline,
        target: Target,
    ) -> Self {
        let ratio = shoal
            .as_ref()
            .ok()
            .map(|q| q.value() / baseline.quantity.value());
        let verdict = match (ratio, target) {
            (None, _) => Verdict::NotRun,
            (Some(r), Target::RatioBelow(t)) => pass_if(r < t),
            (Some(r), Target::RatioAtMost(t)) => pass_if(r <= t),
            (Some(_), Target::AtLeast(_) | Target::AtMost(_)) => {
                unreachable!("relative goal {name} with an absolute target")
            }
        };
        Self {
            name: name.to_owned(),
            shoal,
            baseline: Some(baseline),
            target,
            ratio,
            verdict,
        }
    }

    /// A goal with an absolute threshold.
    pub fn absolute(name: &str, shoal: Result<Quantity, String>, target: Target) -> Self {
        let verdict = match (&shoal, target) {
            (Err(_), _) => Verdict::NotRun,
            (Ok(q), Target::AtLeast(t)) => pass_if(q.value() >= t.value()),
            (Ok(q), Target::AtMost(t)) => pass_if(q.value() <= t.value()),
            (Ok(_), Target::RatioBelow(_) | Target::RatioAtMost(_)) => {
                unreachable!("absolute goal {name} with a ratio target")
            }
        };
        Self {
            name: name.to_owned(),
            shoal,
            baseline: None,
            target,
            ratio: None,
            verdict,
        }
    }
}

impl Goal {
    /// A goal whose baseline could not be measured either (it is itself a Shoal figure).
    pub fn not_run(name: &str, why: String, target: Target) -> Self {
        Self {
            name: name.to_owned(),
            shoal: Err(why),
            baseline: None,
            target,
            ratio: None,
            verdict: Verdict::NotRun,
        }
    }
}

fn pass_if(ok: bool) -> Verdict {
    if ok { Verdict::Pass } else { Verdict::Fail }
}

/// One section of the report: a goal table and the raw measurements behind it.
#[derive(Debug, Clone, Serialize)]
pub struct Section {
    /// Title ("Issue 2: artifact").
    pub title: String,
    /// The goal rows.
    pub goals: Vec<Goal>,
    /// Every measured command.
    pub series: Vec<Series>,
    /// Extra figures worth printing (name, value).
    pub facts: Vec<(String, String)>,
}

/// The whole report of one invocation.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// How the bench was invoked and on what (date, load, tool versions, runs).
    pub context: Vec<(String, String)>,
    /// The sections in order.
    pub sections: Vec<Section>,
}

impl Report {
    /// The report as Markdown, ready for the README.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        for (k, v) in &self.context {
            let _ = writeln!(md, "- {k}: {v}");
        }
        for section in &self.sections {
            let _ = writeln!(md, "\n### {}\n", section.title);
            // Why a figure is missing is usually the same for many rows: say it once.
            let mut reasons: Vec<&str> = Vec::new();
            if !section.goals.is_empty() {
                md.push_str("| Goal | Shoal | Baseline (same run) | Ratio | Target | Result |\n");
                md.push_str("|---|---:|---:|---:|---:|---|\n");
                for g in &section.goals {
                    let shoal = match &g.shoal {
                        Ok(q) => q.to_string(),
                        Err(why) => {
                            let n = match reasons.iter().position(|r| r == why) {
                                Some(i) => i + 1,
                                None => {
                                    reasons.push(why);
                                    reasons.len()
                                }
                            };
                            format!("— (note {n})")
                        }
                    };
                    let baseline = g.baseline.as_ref().map_or("—".to_owned(), |b| {
                        format!("{} ({})", b.quantity, b.label)
                    });
                    let ratio = g.ratio.map_or("—".to_owned(), |r| format!("{r:.3} ×"));
                    let verdict = match g.verdict {
                        Verdict::Pass => "PASS",
                        Verdict::Fail => "**FAIL**",
                        Verdict::NotRun => "NOT RUN",
                    };
                    let _ = writeln!(
                        md,
                        "| {} | {shoal} | {baseline} | {ratio} | {} | {verdict} |",
                        g.name, g.target
                    );
                }
            }
            if !reasons.is_empty() {
                md.push('\n');
                for (i, why) in reasons.iter().enumerate() {
                    let _ = writeln!(md, "- note {}: not measured: {why}", i + 1);
                }
            }
            if !section.series.is_empty() {
                md.push_str("\n| Command | Wall (median) | Runs (s) | Peak RSS (max) | Output |\n");
                md.push_str("|---|---:|---|---:|---:|\n");
                for s in &section.series {
                    let runs: Vec<String> = s.wall_s.iter().map(|w| format!("{w:.2}")).collect();
                    let output = s
                        .output_bytes
                        .map_or("—".to_owned(), |b| Quantity::Bytes(b).to_string());
                    let _ = writeln!(
                        md,
                        "| `{}` | {} | {} | {} | {output} |",
                        s.command.replace('|', r"\|"),
                        Quantity::Seconds(s.median_wall_s()),
                        runs.join(", "),
                        Quantity::Mebibytes(s.max_rss_mib()),
                    );
                }
            }
            if !section.facts.is_empty() {
                md.push('\n');
                for (k, v) in &section.facts {
                    let _ = writeln!(md, "- {k}: {v}");
                }
            }
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zck(bytes: u64) -> Baseline {
        Baseline {
            label: "zck".into(),
            quantity: Quantity::Bytes(bytes),
        }
    }

    #[test]
    fn relative_goals_compare_ratio_to_target() {
        let below = Target::RatioBelow(1.0);
        let g = Goal::relative("size", Ok(Quantity::Bytes(90)), zck(100), below);
        assert_eq!(g.verdict, Verdict::Pass);
        assert_eq!(g.ratio, Some(0.9));
        let g = Goal::relative("size", Ok(Quantity::Bytes(100)), zck(100), below);
        assert_eq!(g.verdict, Verdict::Fail, "strictly below means equal fails");
        let at_most = Target::RatioAtMost(0.92);
        let g = Goal::relative("size", Ok(Quantity::Bytes(92)), zck(100), at_most);
        assert_eq!(g.verdict, Verdict::Pass);
        let g = Goal::relative("size", Err("missing".into()), zck(100), at_most);
        assert_eq!(g.verdict, Verdict::NotRun);
        assert_eq!(g.ratio, None);
    }

    #[test]
    fn absolute_goals_compare_values() {
        let rss = Target::AtMost(Quantity::Mebibytes(64.0));
        assert_eq!(
            Goal::absolute("rss", Ok(Quantity::Mebibytes(64.0)), rss).verdict,
            Verdict::Pass
        );
        assert_eq!(
            Goal::absolute("rss", Ok(Quantity::Mebibytes(64.1)), rss).verdict,
            Verdict::Fail
        );
        let tput = Target::AtLeast(Quantity::MegabytesPerSecond(400.0));
        assert_eq!(
            Goal::absolute("tput", Ok(Quantity::MegabytesPerSecond(399.0)), tput).verdict,
            Verdict::Fail
        );
    }

    #[test]
    fn markdown_has_one_row_per_goal_and_series() {
        let mut s = Series::new("zck");
        s.command = "zck -o v2.zck v2.img".into();
        s.wall_s = vec![2.0, 1.0, 3.0];
        s.peak_rss_kib = vec![1024, 2048, 1024];
        s.output_bytes = Some(5_000_000);
        let report = Report {
            context: vec![("runs".into(), "3".into())],
            sections: vec![Section {
                title: "t".into(),
                goals: vec![Goal::relative(
                    "size",
                    Ok(Quantity::Bytes(4_000_000)),
                    zck(5_000_000),
                    Target::RatioBelow(1.0),
                )],
                series: vec![s],
                facts: vec![],
            }],
        };
        let md = report.to_markdown();
        assert!(
            md.contains("| size | 4.00 MB | 5.00 MB (zck) | 0.800 × | < 1.00 × | PASS |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| `zck -o v2.zck v2.img` | 2.00 s | 2.00, 1.00, 3.00 | 2.0 MiB | 5.00 MB |"
            ),
            "{md}"
        );
    }
}
