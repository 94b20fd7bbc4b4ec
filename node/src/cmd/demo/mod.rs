//! `shoal demo`: Shoal's whole story with real processes on this machine.
//!
//! A `shoal server` (SQLite in a temporary directory) and a site of devices, each a
//! `shoal daemon` process with its own data directory, file-backed A/B slots, file
//! bootloader environment and health checks, talking to each other as LAN peers on
//! loopback (static peers) and to the server through a byte-counting "uplink" relay.
//! A release rolls out in phases through the management API (`shoal admin`), the
//! devices share its chunks on the LAN, one device's health check fails and it rolls
//! back, then the uplink goes down and a USB stick updates the whole site, whose
//! reports reach the server once it is back. The demo plays the bootloader (bootctl's
//! model of the boot script) when a daemon asks for a reboot, and leaves nothing
//! behind: every process it started is stopped and its directory removed, also on
//! failure and on Ctrl-C.
//!
//! The server role is the cargo feature `server`; a build without it says how to
//! run the demo.

#[cfg(feature = "server")]
mod images;
#[cfg(feature = "server")]
mod procs;
#[cfg(feature = "server")]
mod show;
#[cfg(feature = "server")]
mod site;
#[cfg(feature = "server")]
mod story;
#[cfg(feature = "server")]
mod uplink;

use crate::cmd::Ui;

/// Show Shoal end to end: a server and a site of devices, real processes on this
/// machine, in a temporary directory.
///
/// Starts `shoal server` and one `shoal daemon` per device (file-backed slots, LAN
/// peers on loopback), rolls release 2.0 out in phases (a canary, then the rest), shows
/// how many bytes crossed the site's uplink against how many the devices installed,
/// lets one device fail its health check and roll back, then takes the uplink down and
/// updates the whole site to 3.0 from a USB stick in one device, and shows the
/// devices' reports reaching the server once it is back. Needs no root and no setup.
/// Leaves nothing behind (also on failure and Ctrl-C).
///
/// Example: `shoal demo` (built with `--features server`)
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the generated root filesystem images, in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(4..=512))]
    pub size_mib: u64,
    /// Devices on the site (one canary, one older board whose health check fails).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(3..=9))]
    pub devices: u8,
    /// Keep the demo's directory (logs, slots, the server's data) instead of
    /// removing it; its processes are stopped all the same.
    #[arg(long)]
    pub keep: bool,
}

/// The command that runs the demo, for builds without the server role.
#[cfg(not(feature = "server"))]
pub const HOW_TO_RUN: &str = "cargo run --release -p shoal-node --features server -- demo";

/// Runs `shoal demo`.
pub fn run(args: Args, ui: &Ui) -> anyhow::Result<()> {
    #[cfg(feature = "server")]
    {
        story::run(args, ui)
    }
    #[cfg(not(feature = "server"))]
    {
        let _ = (args, ui);
        Err(crate::cmd::Exit::usage(format!(
            "the demo runs a server, and this shoal was built without the server role: run `{HOW_TO_RUN}`"
        )))
    }
}

#[cfg(all(test, not(feature = "server")))]
mod tests {
    use super::*;

    #[test]
    fn without_the_server_role_it_says_how_to_run_it() {
        let args = Args {
            size_mib: 8,
            devices: 5,
            keep: false,
        };
        let e = run(args, &Ui::new(true)).expect_err("no server role");
        assert_eq!(crate::cmd::exit_code(&e), crate::cmd::EXIT_USAGE);
        let line = crate::cmd::one_line(&e);
        assert!(line.contains("built without the server role"), "{line}");
        assert!(line.ends_with(&format!("run `{HOW_TO_RUN}`")), "{line}");
        assert!(!line.contains('\n'));
    }
}
