//! `shoal install`.

use std::path::PathBuf;

use anyhow::Context;

use crate::cmd::{Ui, chain};
use crate::config::Config;
use crate::device::{self, Device, InstallReport, Reboot};

/// Where the device configuration is.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// The device configuration file.
    #[arg(long, env = "SHOAL_CONFIG", default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
}

impl ConfigArg {
    /// Loads the configuration; problems are usage errors (exit code 2).
    pub fn load(&self) -> anyhow::Result<Config> {
        Config::load(&self.config).map_err(|e| crate::cmd::Exit::usage(chain(&e)))
    }
}

/// Install a release into the inactive slot and arm a trial boot.
///
/// SOURCE is a `.shoal` artifact (full or thin), a chunk store directory, or `-` to
/// read an artifact from stdin. The signature is checked before anything is written;
/// chunks the running slot already has are copied from it; the written slot is read
/// back and verified before the bootloader is told to try it. An interrupted install
/// (killed, power cut) resumes when run again.
///
/// Example: `shoal install /media/usb/acme-os-2.0.shoal`
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The artifact, chunk store directory, or `-` for stdin.
    pub source: String,
    /// With a chunk store: which release (`NAME` or `NAME@VERSION`).
    #[arg(long)]
    pub release: Option<String>,
    /// Reboot into the trial as soon as it is armed (with device.reboot_command).
    #[arg(long)]
    pub reboot: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Runs `shoal install`.
pub fn run(args: Args, ui: &Ui) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let source = device::source_from_arg(&args.source, args.release.clone())?;
    let mut dev = Device::open(config.clone(), Reboot::Command)?;
    let result = install(&mut dev, source, args.reboot, args.json, ui)
        .with_context(|| format!("installing {}", args.source));
    drop(dev);
    if let Some(draft) = installed(&result) {
        crate::reports::record(&config, draft);
    }
    print_report(&result?, args.json, ui)
}

/// The status report of a standalone install: the trial armed (or rebooting into
/// it), or a failure. An interrupted install (exit 75, it resumes) and a usage error
/// report nothing.
fn installed(result: &anyhow::Result<InstallReport>) -> Option<crate::reports::Draft> {
    use shoal_fleet::Status;
    use shoal_fleet::report::{Origin, Release};
    let (release, status, substate) = match result {
        Ok(r) => (
            Some(Release {
                name: r.release.clone(),
                version: r.version.clone(),
            }),
            if r.rebooting {
                Status::Rebooting
            } else {
                Status::Installing
            },
            format!(
                "written and verified in slot {}; trial boot armed ({} bytes from the source)",
                r.slot, r.source_bytes_read
            ),
        ),
        Err(e) if crate::cmd::exit_code(e) == crate::cmd::EXIT_FAILED => {
            (None, Status::Failure, crate::cmd::one_line(e))
        }
        Err(_) => return None,
    };
    Some(crate::reports::Draft {
        origin: Origin::Standalone,
        deployment: None,
        release,
        status,
        substate: Some(substate),
    })
}

/// Installs with a progress bar (TTY only).
pub fn install(
    dev: &mut Device,
    source: device::Source,
    reboot: bool,
    json: bool,
    ui: &Ui,
) -> anyhow::Result<InstallReport> {
    let bar = ui.progress(0, "installing", json);
    let mut progress = |p: shoal_engine::Progress| {
        if bar.length() != Some(p.total_bytes) {
            bar.set_length(p.total_bytes);
        }
        bar.set_position(p.done_bytes());
    };
    let report = dev.install(source, reboot, &mut progress);
    bar.finish_and_clear();
    report
}

/// Prints an install report: JSON on stdout, or words on stderr.
pub fn print_report(r: &InstallReport, json: bool, ui: &Ui) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    // Only when an earlier run wrote (and verified) the whole payload; an empty
    // payload never gets here (the manifest is refused).
    if r.total_bytes > 0 && r.resumed_bytes == r.total_bytes && r.written_bytes == 0 {
        ui.info(format!(
            "{} {} was already written and verified in slot {}; trial boot armed",
            r.release, r.version, r.slot
        ));
    } else {
        ui.info(format!(
            "installed {} {} into slot {}: {:.1} MiB written ({:.1} MiB reused from the running slot, {:.1} MiB from the source{}), verified",
            r.release,
            r.version,
            r.slot,
            mib(r.written_bytes),
            mib(r.reused_bytes),
            mib(r.fetched_bytes),
            if r.resumed_bytes > 0 {
                format!(", {:.1} MiB already done by an earlier run", mib(r.resumed_bytes))
            } else {
                String::new()
            }
        ));
    }
    if r.rebooting {
        ui.info("rebooting into the trial");
    } else {
        ui.info(
            "the next boot tries it; run `shoal boot-check` after that boot to commit or roll back",
        );
    }
    Ok(())
}
