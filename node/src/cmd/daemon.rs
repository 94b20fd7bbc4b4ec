//! `shoal daemon`.

use crate::cmd::install::ConfigArg;
use crate::daemon::Daemon;

/// Run the device daemon: poll the server in `[server]`, install its deployments
/// through the engine (only the chunks the device lacks), reboot, report.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Handle at most one deployment (or one poll when there is none), then exit.
    #[arg(long)]
    pub once: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Runs `shoal daemon`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let config = args.config.load()?;
    Daemon::new(config)?.run(args.once)
}
