//! `shoal boot-check`, `shoal commit`, `shoal rollback`, `shoal status`.

use serde_json::json;
use shoal_engine::{Phase, Release, Slot, Verdict, slot_ordinal};

use crate::cmd::Ui;
use crate::cmd::install::ConfigArg;
use crate::device::{BootCheck, Device, Reboot};

/// Run at boot: in a trial boot, run the health checks and commit, or roll back and
/// reboot.
///
/// Health checks are the executables in `[health] dir`, run in name order, each
/// within `timeout_s`. Run it from a boot-time unit (see
/// `node/systemd/shoal-boot-check.service`).
///
/// Example: `shoal boot-check`
#[derive(Debug, clap::Args)]
pub struct BootCheckArgs {
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Commit the running trial boot without running the health checks.
///
/// Example: `shoal commit`
#[derive(Debug, clap::Args)]
pub struct CommitArgs {
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Roll back the deployment in progress: in a trial boot, go back to the previous
/// slot and reboot; before it, cancel the install.
///
/// Example: `shoal rollback --reason "app misbehaves"`
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// Why (recorded in `shoal status`).
    #[arg(long, default_value = "rolled back by the operator")]
    pub reason: String,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Show the release in each slot, the trial state and the last result.
///
/// Example: `shoal status --json`
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print the status as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Runs `shoal boot-check`.
pub fn boot_check(args: BootCheckArgs, ui: &Ui) -> anyhow::Result<()> {
    settle(args.config.load()?, args.json, ui, |dev| dev.boot_check())
}

/// Runs `shoal commit`.
pub fn commit(args: CommitArgs, ui: &Ui) -> anyhow::Result<()> {
    settle(args.config.load()?, args.json, ui, |dev| dev.commit())
}

/// Runs `shoal rollback`.
pub fn rollback(args: RollbackArgs, ui: &Ui) -> anyhow::Result<()> {
    let reason = args.reason.clone();
    settle(args.config.load()?, args.json, ui, move |dev| {
        dev.rollback(&reason)
    })
}

/// Runs `op` with the reboot it may ask for held back; then queues the status report
/// (durably), prints the result, and only then runs the reboot command. A rollback
/// reboots the system: its report must be in the queue and its output written before
/// the shutdown kills this process.
fn settle(
    config: crate::config::Config,
    json: bool,
    ui: &Ui,
    op: impl FnOnce(&mut Device) -> anyhow::Result<BootCheck>,
) -> anyhow::Result<()> {
    let asked = std::rc::Rc::new(std::cell::Cell::new(false));
    let flag = std::rc::Rc::clone(&asked);
    let mut dev = Device::open(
        config.clone(),
        Reboot::Hook(Box::new(move || {
            flag.set(true);
            Ok(())
        })),
    )?;
    let result = op(&mut dev)?;
    drop(dev);
    if let Some(draft) = crate::reports::settled(&config, &result) {
        crate::reports::record(&config, draft);
    }
    // Reboot even when the output cannot be written (a closed stdout).
    let printed = report(&result, json, ui);
    if asked.get() {
        crate::device::run_reboot_command(&config)?;
    }
    printed
}

/// Prints a boot-check/commit/rollback result.
pub fn report(result: &BootCheck, json: bool, ui: &Ui) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string(result)?);
        return Ok(());
    }
    ui.info(match result {
        BootCheck::Nothing => "no deployment is waiting for this boot".to_string(),
        BootCheck::TrialPending { slot } => {
            format!("a trial boot of slot {slot} is armed; it runs at the next boot")
        }
        BootCheck::InstallUnfinished => {
            "an install was interrupted; run `shoal install` again to resume it".to_string()
        }
        BootCheck::Committed { release, slot } => format!("{release} on slot {slot} is committed"),
        BootCheck::RolledBack {
            release,
            slot,
            reason,
        } => {
            format!("{release} on slot {slot} was rolled back: {reason}")
        }
    });
    Ok(())
}

fn release_json(r: &Option<Release>) -> serde_json::Value {
    match r {
        None => serde_json::Value::Null,
        Some(r) => json!({
            "name": r.name,
            "version": r.version,
            "security_counter": r.security_counter,
            "size": r.payload_size,
            "hash": hex::encode(r.payload_hash),
        }),
    }
}

/// Runs `shoal status`.
pub fn status(args: StatusArgs, _ui: &Ui) -> anyhow::Result<()> {
    let (st, boot) = crate::device::read_status(&args.config.load()?)?;
    // The slot running now is the bootloader's (and the system's) answer; the
    // store's lags behind after a reboot into a trial until `boot-check` runs, which
    // is what this says instead of contradicting the boot line.
    let running = boot.active;
    let booted_into_trial = st.deployment.as_ref().is_some_and(|d| {
        d.target == running
            && running != st.active
            && matches!(d.phase, Phase::TrialArmed | Phase::Rebooting)
    });
    let phase = |d: &shoal_engine::DeploymentStatus| {
        if booted_into_trial {
            "trial (booted; `shoal boot-check` has not run yet)".to_string()
        } else {
            d.phase.to_string()
        }
    };
    let deployment = st.deployment.as_ref().map(|d| {
        json!({
            "release": d.release.name,
            "version": d.release.version,
            "slot": d.target,
            "phase": if booted_into_trial { "trial".to_string() } else { d.phase.to_string() },
            "boot_check_pending": booted_into_trial,
            "journal_bytes": d.journal_bytes,
            "total_bytes": d.release.payload_size,
        })
    });
    let last = st.last.as_ref().map(|o| {
        let (result, reason) = match &o.verdict {
            Verdict::Committed => ("committed", None),
            Verdict::RolledBack { reason } => ("rolled-back", Some(reason.clone())),
            Verdict::Failed { reason } => ("failed", Some(reason.clone())),
        };
        json!({
            "release": o.release.name,
            "version": o.release.version,
            "slot": o.slot,
            "result": result,
            "reason": reason,
        })
    });
    let trial = boot
        .state
        .trial
        .map(|t| json!({ "slot": t.slot, "tries_left": t.tries_left }));
    if args.json {
        let value = json!({
            "active": running,
            "next_boot": boot.next_boot,
            "committed": boot.state.committed,
            "trial": trial,
            "boot": boot.summary,
            "floor": st.floor,
            "slots": {
                "A": release_json(&st.releases[slot_ordinal(Slot::A)]),
                "B": release_json(&st.releases[slot_ordinal(Slot::B)]),
            },
            "deployment": deployment,
            "last": last,
        });
        return print_data(&serde_json::to_string_pretty(&value)?);
    }
    let name = |r: &Option<Release>| {
        r.as_ref().map_or(
            "unknown (not installed by Shoal)".to_string(),
            ToString::to_string,
        )
    };
    let mut lines = vec![
        format!(
            "slot A: {}{}",
            name(&st.releases[0]),
            if running == Slot::A {
                "  (running)"
            } else {
                ""
            }
        ),
        format!(
            "slot B: {}{}",
            name(&st.releases[1]),
            if running == Slot::B {
                "  (running)"
            } else {
                ""
            }
        ),
        format!("boot: {}", boot.summary),
        format!("anti-rollback floor: {}", st.floor),
    ];
    if let Some(d) = &st.deployment {
        let extra = if d.phase == Phase::Fetching {
            format!(
                " ({:.1} of {:.1} MiB written and verified)",
                d.journal_bytes as f64 / 1048576.0,
                d.release.payload_size as f64 / 1048576.0
            )
        } else {
            String::new()
        };
        lines.push(format!(
            "deployment: {} to slot {}: {}{extra}",
            d.release,
            d.target,
            phase(d)
        ));
    }
    if let Some(o) = &st.last {
        let what = match &o.verdict {
            Verdict::Committed => "committed".to_string(),
            Verdict::RolledBack { reason } => format!("rolled back: {reason}"),
            Verdict::Failed { reason } => format!("failed: {reason}"),
        };
        lines.push(format!("last: {} on slot {}: {what}", o.release, o.slot));
    }
    // Status is the data of this command: stdout (a closed pipe is not an error).
    print_data(&lines.join("\n"))
}

/// Prints `text` and a newline on stdout; a reader that went away (`| head`) is fine.
fn print_data(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
