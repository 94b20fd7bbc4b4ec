//! The monthly data budget (`[network] budget_per_month_mib`): bytes the daemon
//! downloaded from the server in the current calendar month (UTC), kept in
//! `data_dir/budget-month.json` so restarts and power cuts do not forget them.
//!
//! Before each install attempt the daemon hands the engine
//! `min(budget_per_deployment, what is left of the month)` as its WAN budget, so the
//! engine refuses a plan that needs more before a byte is fetched, and never asks
//! for more while it runs. While the install runs the bytes read from the server are
//! added to the month (written at most every [`SAVE_EVERY`], and at the end), so a
//! daemon killed mid-download loses at most that much of the count.
//!
//! The month is the device's UTC calendar month. Without a sane clock (a board that
//! booted in 1970) the month cannot be told: the recorded month is kept and its bytes
//! keep counting, so a missing clock never grants a fresh budget.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use serde::{Deserialize, Serialize};

/// The ledger's file in `data_dir`.
pub const FILE_NAME: &str = "budget-month.json";
/// How often a running install's bytes are written to the ledger.
pub const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Bytes downloaded in one month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ledger {
    /// `YYYY-MM` (UTC).
    pub month: String,
    /// Wire bytes read from the server in that month.
    pub used_bytes: u64,
}

/// `YYYY-MM` of Unix seconds `unix_s` (UTC; the proleptic Gregorian calendar).
pub fn month_of(unix_s: u64) -> String {
    // Howard Hinnant's days-to-civil.
    let z = (unix_s / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}")
}

fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// The ledger of the current month: the stored one, or a fresh one when the month
/// (by `now_unix_s`) changed. `None` for the clock keeps the stored month.
pub fn current(data_dir: &Path, now_unix_s: Option<u64>) -> anyhow::Result<Ledger> {
    let p = path(data_dir);
    let stored: Option<Ledger> = match std::fs::read(&p) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is corrupt (remove it to start the month's count again)",
                p.display()
            )
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(anyhow!(e).context(format!("cannot read {}", p.display()))),
    };
    Ok(match (stored, now_unix_s.map(month_of)) {
        (Some(l), Some(m)) if l.month == m => l,
        (Some(l), None) => l,
        (_, Some(month)) => Ledger {
            month,
            used_bytes: 0,
        },
        (None, None) => Ledger {
            month: "unknown".into(),
            used_bytes: 0,
        },
    })
}

/// Writes `ledger` atomically (a new file synced, renamed over the old one).
pub fn save(data_dir: &Path, ledger: &Ledger) -> anyhow::Result<()> {
    let p = path(data_dir);
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let tmp = p.with_extension("json.new");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec(ledger)?)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("cannot write {}", p.display()))?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", data_dir.display()))
}

/// The budget of one install attempt under a monthly limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowance {
    /// The month's ledger when the attempt starts.
    pub ledger: Ledger,
    /// The month's limit in bytes.
    pub limit_bytes: u64,
}

impl Allowance {
    /// What is left of the month.
    pub fn left_bytes(&self) -> u64 {
        self.limit_bytes.saturating_sub(self.ledger.used_bytes)
    }

    /// Whether the month, not the per-deployment budget, limits this attempt.
    pub fn binds(&self, per_deployment_bytes: Option<u64>) -> bool {
        per_deployment_bytes.is_none_or(|d| self.left_bytes() < d)
    }

    /// The ledger after `bytes` more were read in this attempt.
    pub fn after(&self, bytes: u64) -> Ledger {
        Ledger {
            month: self.ledger.month.clone(),
            used_bytes: self.ledger.used_bytes.saturating_add(bytes),
        }
    }

    /// Words for an operator: the month, what is left, the limit.
    pub fn describe(&self) -> String {
        format!(
            "the monthly data budget has {} of {} bytes left in {}",
            self.left_bytes(),
            self.limit_bytes,
            self.ledger.month
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_utc_calendar_months() {
        assert_eq!(month_of(0), "1970-01");
        assert_eq!(month_of(951_782_400), "2000-02"); // 2000-02-29 00:00:00
        assert_eq!(month_of(951_868_799), "2000-02"); // 2000-02-29 23:59:59
        assert_eq!(month_of(951_868_800), "2000-03"); // 2000-03-01 00:00:00
        assert_eq!(month_of(1_798_761_599), "2026-12"); // 2026-12-31 23:59:59
        assert_eq!(month_of(1_798_761_600), "2027-01");
    }

    #[test]
    fn the_ledger_rolls_over_with_the_month_and_survives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let dec = 1_796_500_000; // 2026-12-05
        let l = current(d, Some(dec)).expect("fresh");
        assert_eq!(
            l,
            Ledger {
                month: "2026-12".into(),
                used_bytes: 0
            }
        );
        save(
            d,
            &Ledger {
                month: "2026-12".into(),
                used_bytes: 500,
            },
        )
        .expect("save");
        assert_eq!(
            current(d, Some(dec + 86_400)).expect("same").used_bytes,
            500
        );
        // No clock: the stored month goes on counting.
        assert_eq!(current(d, None).expect("no clock").used_bytes, 500);
        // January: a fresh month.
        let jan = current(d, Some(1_798_761_600)).expect("jan");
        assert_eq!((jan.month.as_str(), jan.used_bytes), ("2027-01", 0));
        std::fs::write(d.join(FILE_NAME), b"{").expect("write");
        let e = current(d, Some(dec)).expect_err("corrupt");
        assert!(e.to_string().contains("is corrupt"), "{e}");
    }

    #[test]
    fn the_allowance_is_what_is_left_and_says_when_it_binds() {
        let a = Allowance {
            ledger: Ledger {
                month: "2026-12".into(),
                used_bytes: 700,
            },
            limit_bytes: 1000,
        };
        assert_eq!(a.left_bytes(), 300);
        assert!(a.binds(None));
        assert!(a.binds(Some(301)));
        assert!(!a.binds(Some(300)));
        assert_eq!(a.after(50).used_bytes, 750);
        let over = Allowance {
            ledger: Ledger {
                month: "2026-12".into(),
                used_bytes: 1200,
            },
            limit_bytes: 1000,
        };
        assert_eq!(over.left_bytes(), 0);
        assert_eq!(
            a.describe(),
            "the monthly data budget has 300 of 1000 bytes left in 2026-12"
        );
    }
}
