//! `shoal env`: read and write bootloader environments through Shoal's codecs
//! (useful on a device without `fw_printenv` or `grub-editenv`).

use std::path::PathBuf;

use anyhow::Context;
use shoal_bootctl::env::file::FileEnv;
use shoal_bootctl::env::grub::{BlockEnv, GrubEnv, Paths};
use shoal_bootctl::env::uboot::{FwEnvConfig, UbootEnv};
use shoal_bootctl::env::{Env, EnvLock, Vars};

use crate::cmd::chain;
use crate::cmd::install::ConfigArg;
use crate::cmd::{Exit, Ui};

/// `shoal env` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print variables as `name=value` lines (all of them, sorted, or the NAMEs
    /// given).
    ///
    /// Example: `shoal env print --uboot-config /etc/fw_env.config bootcount`
    Print(PrintArgs),
    /// Set variables; `NAME=` with an empty value deletes NAME (as `fw_setenv`).
    /// All changes are written in one power-safe update where the backend allows.
    ///
    /// Example: `shoal env set --grub /boot/efi/EFI/shoal shoal_slot=A shoal_tries=`
    Set(SetArgs),
}

/// Which environment to open. Without a selector, the `[bootloader]` of the
/// device configuration.
#[derive(Debug, clap::Args)]
pub struct Selector {
    /// A U-Boot environment described by this `fw_env.config`-style file
    /// (`device offset size` per copy; two lines for a redundant environment).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["grub", "file"])]
    pub uboot_config: Option<PathBuf>,
    /// A GRUB environment: a directory holding `<prefix>1/{env,lock}` and
    /// `<prefix>2/{env,lock}` (power-safe layout), or a single `grubenv` file.
    #[arg(long, value_name = "PATH", conflicts_with = "file")]
    pub grub: Option<PathBuf>,
    /// Directory prefix of the GRUB layout (`shoal_grubenv`, or `mender_grubenv`
    /// for Mender's).
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "shoal_grubenv",
        requires = "grub"
    )]
    pub grub_prefix: String,
    /// Shoal's two-copy file environment (FILE and FILE.2).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Arguments of `shoal env print`.
#[derive(Debug, clap::Args)]
pub struct PrintArgs {
    /// Variables to print; all when none is given.
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
    /// Print a JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub selector: Selector,
}

/// Arguments of `shoal env set`.
#[derive(Debug, clap::Args)]
pub struct SetArgs {
    /// Assignments `NAME=VALUE`.
    #[arg(value_name = "NAME=VALUE", required = true)]
    pub assignments: Vec<String>,
    /// Start from an empty environment when no valid copy exists (provisioning a
    /// new device). Without it, an unreadable environment is reported, not
    /// overwritten; empty files are always treated as new.
    #[arg(long)]
    pub init: bool,
    #[command(flatten)]
    pub selector: Selector,
}

/// Runs a `shoal env` subcommand.
pub fn run(command: Command, ui: &Ui) -> anyhow::Result<()> {
    match command {
        Command::Print(args) => {
            let env = open(&args.selector, false)?;
            let vars = env
                .load()
                .with_context(|| format!("cannot read the {}", env.describe()))?;
            let selected: Vars = if args.names.is_empty() {
                vars
            } else {
                let mut out = Vars::new();
                for name in &args.names {
                    let value = vars
                        .get(name)
                        .ok_or_else(|| anyhow::anyhow!("variable {name:?} is not set"))?;
                    out.insert(name.clone(), value.clone());
                }
                out
            };
            if args.json {
                outln!("{}", serde_json::to_string_pretty(&selected)?);
            } else {
                for (name, value) in &selected {
                    outln!("{name}={value}");
                }
            }
            Ok(())
        }
        Command::Set(args) => {
            let mut changes = Vec::new();
            for a in &args.assignments {
                let (name, value) = a
                    .split_once('=')
                    .ok_or_else(|| Exit::usage(format!("{a:?} is not NAME=VALUE")))?;
                if name.is_empty() {
                    return Err(Exit::usage(format!("{a:?} has an empty name")));
                }
                changes.push((name.to_string(), value.to_string()));
            }
            let mut env = open(&args.selector, true)?;
            // Serialise with other writers (the daemon, fw_setenv) for the whole
            // read-modify-write.
            let _lock = EnvLock::acquire(&*env);
            // An environment whose files are empty (or, with --init, that has no
            // valid copy) starts empty; any other read error is reported rather
            // than overwritten.
            let mut vars = match env.load() {
                Ok(vars) => vars,
                Err(e) if args.init || never_written(&e) => {
                    ui.info(format!(
                        "starting from an empty environment ({})",
                        chain(&e)
                    ));
                    Vars::new()
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e))
                        .with_context(|| format!("cannot read the {}", env.describe()));
                }
            };
            for (name, value) in changes {
                if value.is_empty() {
                    vars.remove(&name);
                } else {
                    vars.insert(name, value);
                }
            }
            env.store(&vars).map_err(|e| match e {
                shoal_bootctl::env::StoreError::Encode(_) => Exit::usage(chain(&e)),
                other => anyhow::Error::new(other).context("cannot write the environment"),
            })?;
            ui.info(format!("wrote {}", env.describe()));
            Ok(())
        }
    }
}

/// Whether a load error means "no copy was ever written" (all copies empty).
fn never_written(e: &shoal_bootctl::env::LoadError) -> bool {
    use shoal_bootctl::env::{DecodeError, LoadError};
    let empty = |d: &DecodeError| {
        matches!(
            d,
            DecodeError::WrongSize { actual: 0, .. } | DecodeError::NoTerminator
        )
    };
    match e {
        LoadError::NoValidCopy { first, second } => empty(first) && empty(second),
        LoadError::Invalid { source, .. } => empty(source),
        LoadError::NeverWritten { .. } => true,
        LoadError::Io { .. } => false,
    }
}

fn open(sel: &Selector, writable: bool) -> anyhow::Result<Box<dyn Env>> {
    let open_err = |what: String| move |e: std::io::Error| anyhow::Error::new(e).context(what);
    if let Some(path) = &sel.uboot_config {
        let cfg = FwEnvConfig::load(path).map_err(|e| Exit::usage(chain(&e)))?;
        let env = UbootEnv::open(&cfg, writable).map_err(open_err(format!(
            "cannot open the environment described by {}",
            path.display()
        )))?;
        return Ok(Box::new(env));
    }
    if let Some(path) = &sel.grub {
        if path.is_dir() {
            let env =
                GrubEnv::open(&Paths::new(path, &sel.grub_prefix), writable).map_err(open_err(
                    format!("cannot open the GRUB environment under {}", path.display()),
                ))?;
            let lock = if sel.grub_prefix == "mender_grubenv" {
                shoal_bootctl::env::grub::MENDER_LOCK_FILE
            } else {
                shoal_bootctl::env::grub::LOCK_FILE
            };
            return Ok(Box::new(env.with_lock_file(PathBuf::from(lock))));
        }
        let env = BlockEnv::open(path, writable)
            .map_err(open_err(format!("cannot open {}", path.display())))?;
        return Ok(Box::new(env));
    }
    if let Some(path) = &sel.file {
        let env = FileEnv::open(path, writable)
            .map_err(open_err(format!("cannot open {}", path.display())))?;
        return Ok(Box::new(env));
    }
    let cfg = sel.config.load()?;
    cfg.bootloader.open_env(writable).map_err(|e| match e {
        shoal_bootctl::config::BuildError::Open { .. } => {
            anyhow::anyhow!("{}", chain(&e)).context("[bootloader]")
        }
        other => Exit::usage(format!("[bootloader]: {}", chain(&other))),
    })
}
