//! `shoal slot`: the A/B slots and the bootloader's boot state, directly.
//!
//! These are the low-level bootloader operations of `shoal-bootctl`. They do not
//! touch the update journal: on a device whose updates Shoal manages, prefer
//! `shoal commit` / `shoal rollback`, which also record the result.

use anyhow::{Context, bail};
use shoal_bootctl::control::{ArmError, CommitError, RollbackError};
use shoal_bootctl::{BootControl, BootState, Slot};

use crate::cmd::chain;
use crate::cmd::install::ConfigArg;
use crate::cmd::{Exit, Ui};

/// `shoal slot` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show the running slot, the slot the next boot starts and the trial state.
    ///
    /// Example: `shoal slot status --json`
    Status(StatusArgs),
    /// Arm a trial boot of the other slot: the next TRIES boots start SLOT and, unless
    /// it is committed, the bootloader then falls back to the running slot.
    ///
    /// Only arm a slot that holds a complete, verified image (`shoal install` does
    /// this for you).
    ///
    /// Example: `shoal slot arm B --tries 3`
    Arm(ArmArgs),
    /// Make the running trial slot the committed one.
    ///
    /// Example: `shoal slot commit`
    Commit(OpArgs),
    /// Cancel the armed, running or exhausted trial: the committed slot boots next.
    /// When the trial slot is running, reboot afterwards.
    ///
    /// Example: `shoal slot rollback`
    Rollback(OpArgs),
    /// Provision a new device's bootloader environment: SLOT (the one the device
    /// runs) committed, no trial. Refuses an environment that already holds a valid
    /// state unless --force.
    ///
    /// Example: `shoal slot init A`
    Init(InitArgs),
    /// Index the running slot now (where each of its chunks is), so the next
    /// install starts fetching at once: for a slot Shoal did not write (flashed at
    /// the factory, copied by hand), e.g. at provisioning. A recorded index is
    /// checked first (a sample of its chunks read back) and kept when it holds.
    /// `shoal daemon` does the same at idle time. Records in the device store.
    ///
    /// Example: `shoal slot index --json`
    Index(IndexArgs),
}

/// Arguments of `shoal slot index`.
#[derive(Debug, clap::Args)]
pub struct IndexArgs {
    /// Cut with `--fast` artifacts' chunking (64 KiB chunks) instead of the one
    /// recorded before, or of the other slot, or the default.
    #[arg(long)]
    pub fast: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Arguments of `shoal slot init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The slot the device runs (and boots): A or B.
    pub slot: Slot,
    /// Replace an environment that already holds a valid boot state.
    #[arg(long)]
    pub force: bool,
    /// Print the resulting state as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Arguments of `shoal slot status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print the status as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Arguments of `shoal slot arm`.
#[derive(Debug, clap::Args)]
pub struct ArmArgs {
    /// The slot to try: A or B (not the running one).
    pub slot: Slot,
    /// How many boots to try it before falling back (1 to 9; Mender's GRUB
    /// integration supports only 1).
    #[arg(long, default_value_t = 1)]
    pub tries: u32,
    /// Print the resulting state as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Arguments of `shoal slot commit` and `shoal slot rollback`.
#[derive(Debug, clap::Args)]
pub struct OpArgs {
    /// Print the resulting state as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Runs a `shoal slot` subcommand.
pub fn run(command: Command, ui: &Ui) -> anyhow::Result<()> {
    match command {
        Command::Index(args) => index(&args, ui),
        Command::Status(args) => {
            let bc = open(&args.config, false)?;
            let status = bc.status().context("cannot read the boot status")?;
            if args.json {
                outln!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                outln!("{status}");
            }
            Ok(())
        }
        Command::Arm(args) => {
            let mut bc = open(&args.config, true)?;
            let state = bc.arm(args.slot, args.tries).map_err(|e| match e {
                ArmError::Tries(_) | ArmError::ActiveSlot { .. } => Exit::usage(chain(&e)),
                other => anyhow::Error::new(other).context("cannot arm the trial boot"),
            })?;
            ui.info(format!(
                "armed slot {} for {} trial boot{}; next boot: {}",
                args.slot,
                args.tries,
                if args.tries == 1 { "" } else { "s" },
                state.next_boot()
            ));
            print_state(&state, args.json)
        }
        Command::Commit(args) => {
            let mut bc = open(&args.config, true)?;
            let state = bc.commit().map_err(|e| match e {
                CommitError::NoTrial | CommitError::TrialNotRunning { .. } => {
                    anyhow::Error::new(e).context("nothing to commit")
                }
                other => anyhow::Error::new(other).context("cannot commit"),
            })?;
            ui.info(format!("committed slot {}", state.committed));
            print_state(&state, args.json)
        }
        Command::Init(args) => {
            let cfg = args.config.load()?;
            let scheme = cfg
                .bootloader
                .scheme()
                .map_err(|e| Exit::usage(format!("[bootloader]: {}", chain(&e))))?;
            let flavor = cfg.bootloader.flavor();
            let mut env = cfg
                .bootloader
                .open_env(true)
                .map_err(|e| Exit::usage(format!("[bootloader]: {}", chain(&e))))?;
            if !args.force
                && let Ok(vars) = env.load()
                && let Ok(state) = scheme.decode(&vars, flavor)
            {
                bail!(
                    "the bootloader environment already holds a boot state (slot {} committed); --force replaces it",
                    state.committed
                );
            }
            env.store(&scheme.initial(flavor, args.slot))
                .context("cannot write the bootloader environment")?;
            let state = scheme
                .decode(
                    &env.load().context("cannot read the environment back")?,
                    flavor,
                )
                .context("the environment written does not read back")?;
            ui.info(format!(
                "provisioned the bootloader environment: slot {} committed, no trial",
                args.slot
            ));
            print_state(&state, args.json)
        }
        Command::Rollback(args) => {
            let mut bc = open(&args.config, true)?;
            let state = bc.rollback().map_err(|e| match e {
                RollbackError::NoTrial => anyhow::Error::new(e).context("nothing to roll back"),
                other => anyhow::Error::new(other).context("cannot roll back"),
            })?;
            ui.info(format!("rolled back; next boot: {}", state.next_boot()));
            print_state(&state, args.json)
        }
    }
}

/// Opens boot control from the device configuration. Configuration problems are
/// usage errors (exit code 2); a device or file that cannot be opened is a failure.
fn open(config: &ConfigArg, writable: bool) -> anyhow::Result<BootControl> {
    let cfg = config.load()?;
    shoal_bootctl::config::build(&cfg.slots, &cfg.bootloader, writable).map_err(|e| match e {
        shoal_bootctl::config::BuildError::Open { .. } => {
            anyhow::anyhow!("{}", chain(&e)).context("[slots]/[bootloader]")
        }
        other => Exit::usage(format!("[slots]/[bootloader]: {}", chain(&other))),
    })
}

fn print_state(state: &BootState, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(state)?);
    }
    Ok(())
}

/// `shoal slot index`.
fn index(args: &IndexArgs, ui: &Ui) -> anyhow::Result<()> {
    use crate::device::idle_index::Plan;
    let config = args.config.load()?;
    let dev = crate::device::Device::open(config, crate::device::Reboot::Command)?;
    let chunking = args.fast.then_some(shoal_artifact::chunk::CHUNKING_FAST);
    let (slot, chunks, indexed, reason) = match dev.plan_index(chunking)? {
        Plan::Valid { slot, chunks } => {
            ui.info(format!(
                "slot {slot}: its recorded index holds ({chunks} chunks)"
            ));
            (slot, chunks, false, None)
        }
        Plan::Later => {
            return Err(Exit::tempfail(
                "a deployment is armed or booting: the running slot is indexed once it is settled (shoal boot-check)",
            ));
        }
        Plan::Cut(cut) => {
            let reason = cut.reason;
            ui.info(format!("indexing slot {} ({reason})", cut.slot));
            let done = dev.record_index(cut.run()?)?;
            ui.info(format!(
                "indexed slot {}: {} chunks in {:.1} s",
                done.slot,
                done.chunks,
                done.elapsed.as_secs_f64()
            ));
            (done.slot, done.chunks, true, Some(reason.to_string()))
        }
    };
    if args.json {
        outln!(
            "{}",
            serde_json::json!({
                "slot": slot.to_string(),
                "chunks": chunks,
                "indexed": indexed,
                "reason": reason,
            })
        );
    }
    Ok(())
}
