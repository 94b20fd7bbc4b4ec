//! `shoal`: the one binary of Shoal (tools, device installer, later daemon and server).
//!
//! Each noun-verb command group lives in its own module under `cmd/`. `main` parses the
//! command line, installs the tracing subscriber (diagnostics go to stderr, data to
//! stdout), runs the command, prints an error chain once and picks the exit code:
//! 0 success, 1 operation failed, 2 usage or config error, 75 temporary failure that is
//! safe to retry.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `println!` for data on stdout that never panics: when stdout is closed (the reader
/// went away) or full, the line is dropped; there is no one left to tell.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `eprintln!` that never panics: a closed stderr drops the line.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

mod cmd;
mod daemon;
mod device;
mod lan;
mod reports;

// The device configuration parser lives in the library target so fuzz targets can
// reach it.
use shoal_node::config;

/// Shoal: atomic A/B over-the-air updates for fleets of embedded Linux devices.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about, long_about = None)]
struct Cli {
    /// Print only errors (no progress bars, no informational messages).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make and inspect signing keys.
    #[cfg_attr(not(feature = "host"), command(about = "Inspect signing keys"))]
    #[command(subcommand)]
    Key(cmd::key::Command),
    /// Make, rotate and inspect trust roots.
    #[cfg_attr(not(feature = "host"), command(about = "Inspect trust roots"))]
    #[command(subcommand)]
    Root(cmd::root::Command),
    /// Build, sign, inspect, verify, extract and diff `.shoal` artifacts.
    #[cfg_attr(
        not(feature = "host"),
        command(about = "Inspect and verify `.shoal` artifacts")
    )]
    #[command(subcommand)]
    Artifact(cmd::artifact::Command),
    /// Manage chunk stores (plain directories servable as static files).
    #[cfg_attr(
        not(feature = "host"),
        command(about = "Verify chunk stores (plain directories servable as static files)")
    )]
    #[command(subcommand)]
    Store(cmd::store::Command),
    /// Install a release (artifact, chunk store or stdin) and arm a trial boot.
    #[command(
        after_help = "Examples:\n  shoal install /media/usb/acme-os-2.0.shoal\n  shoal install /media/usb/store --release acme-os@2.0\n  curl -s https://example.com/acme-os-2.0.shoal | shoal install -\n  shoal install --reboot --json acme-os-2.0.shoal"
    )]
    Install(cmd::install::Args),
    /// At boot: health-check a trial boot, then commit or roll back.
    #[command(
        after_help = "Examples:\n  shoal boot-check              (from a boot-time unit, see node/systemd/)\n  shoal boot-check --json"
    )]
    BootCheck(cmd::device::BootCheckArgs),
    /// Commit the running trial boot.
    #[command(after_help = "Examples:\n  shoal commit\n  shoal commit --json")]
    Commit(cmd::device::CommitArgs),
    /// Roll back the deployment in progress.
    #[command(
        after_help = "Examples:\n  shoal rollback\n  shoal rollback --reason \"app misbehaves\""
    )]
    Rollback(cmd::device::RollbackArgs),
    /// Show the slots, the trial state and the last result.
    #[command(
        after_help = "Examples:\n  shoal status\n  shoal status --json\n  shoal status --config /etc/shoal/shoal.toml"
    )]
    Status(cmd::device::StatusArgs),
    /// Show the signed status reports waiting for delivery to the server.
    #[command(after_help = "Examples:\n  shoal reports\n  shoal reports --json")]
    Reports(cmd::reports::Args),
    /// Show Shoal end to end: a server and a site of devices, real processes on this
    /// machine (built with `--features server`).
    #[cfg(feature = "host")]
    Demo(cmd::demo::Args),
    /// Inspect the A/B slots and drive the bootloader directly (status, arm, commit,
    /// rollback).
    #[command(subcommand)]
    Slot(cmd::slot::Command),
    /// Print and set bootloader environment variables (U-Boot, GRUB, file).
    #[command(subcommand)]
    Env(cmd::env::Command),
    /// Run the device daemon: poll the server, install deployments, report.
    #[command(
        after_help = "Examples:\n  shoal daemon                  (from node/systemd/shoal-daemon.service)\n  SHOAL_LOG=info shoal daemon --config /etc/shoal/shoal.toml"
    )]
    Daemon(cmd::daemon::Args),
    /// Run the server role (device and management APIs; built with `--features server`).
    #[cfg(feature = "server")]
    Server(cmd::server::Args),
    /// Manage a server: devices, groups, releases, deployments, tokens, audit log.
    #[cfg(feature = "server")]
    Admin(cmd::admin::Args),
}

/// Keeps glibc's heap from holding on to memory the program freed: a device install
/// streams hundreds of MiB through buffers of 1 MiB and less, on several threads.
/// By default glibc raises its mmap threshold (and with it the trim threshold) each
/// time a large buffer is freed, so later ones come from per-thread arenas that
/// keep their free space; measured on the 512 MiB bench image, that alone costs
/// about 7 MiB of peak RSS. A fixed threshold and two arenas keep it small.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; it is called first thing in
    // main, before any other thread exists, with values glibc documents.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// A command-line error on one line: clap's first paragraph (its message and the
/// arguments it names), without the usage block, pointing to `--help`.
fn usage_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let text = text.trim_start().trim_start_matches("error:").trim();
    let first = text.split("\n\n").next().unwrap_or_default();
    let words: Vec<&str> = first.split_whitespace().collect();
    format!("{} (see --help)", words.join(" "))
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            errln!("shoal: {}", usage_line(&e));
            return ExitCode::from(cmd::EXIT_USAGE);
        }
        Err(e) => {
            // --help and --version: on stdout, never panicking on a closed one.
            outln!("{}", e.render().to_string().trim_end());
            return ExitCode::SUCCESS;
        }
    };
    // The tracing log is for the daemon and for debugging (`SHOAL_LOG=debug`): a
    // command reports a failure once, as the one line below, not also as log lines.
    // `SHOAL_LOG` holds `target=level` directives and an optional bare default
    // level (`info`, `shoal=debug,shoal::daemon=trace`); unset or unreadable: off.
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let filter: tracing_subscriber::filter::Targets = std::env::var("SHOAL_LOG")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_default();
        tracing_subscriber::fmt()
            // The filter above decides; the fmt layer's own default would stop
            // everything below `info`.
            .with_max_level(tracing::Level::TRACE)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .finish()
            .with(filter)
            .init();
    }
    let ui = cmd::Ui::new(cli.quiet);
    let result = match cli.command {
        Command::Key(c) => cmd::key::run(c, &ui),
        Command::Root(c) => cmd::root::run(c, &ui),
        Command::Artifact(c) => cmd::artifact::run(c, &ui),
        Command::Store(c) => cmd::store::run(c, &ui),
        Command::Install(a) => cmd::install::run(a, &ui),
        Command::BootCheck(a) => cmd::device::boot_check(a, &ui),
        Command::Commit(a) => cmd::device::commit(a, &ui),
        Command::Rollback(a) => cmd::device::rollback(a, &ui),
        Command::Status(a) => cmd::device::status(a, &ui),
        Command::Reports(a) => cmd::reports::run(a, &ui),
        #[cfg(feature = "host")]
        Command::Demo(a) => cmd::demo::run(a, &ui),
        Command::Slot(c) => cmd::slot::run(c, &ui),
        Command::Env(c) => cmd::env::run(c, &ui),
        Command::Daemon(a) => cmd::daemon::run(a),
        #[cfg(feature = "server")]
        Command::Server(a) => cmd::server::run(a, &ui),
        #[cfg(feature = "server")]
        Command::Admin(a) => cmd::admin::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            errln!("shoal: {}", cmd::one_line(&err));
            ExitCode::from(cmd::exit_code(&err))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a device build (`--no-default-features`, no `host`) still parses, and
    /// what it refuses as an unknown subcommand.
    #[test]
    fn host_commands_are_in_host_builds_only() {
        let parses = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("shoal").chain(args.iter().copied()))
                .map(|_| ())
                .map_err(|e| e.kind())
        };
        for device in [
            &["install", "x.shoal"][..],
            &["status"],
            &["boot-check"],
            &["commit"],
            &["rollback"],
            &["daemon"],
            &["reports"],
            &["env", "print"],
            &["slot", "status"],
            &["artifact", "verify", "x.shoal", "--root", "r"],
            &["artifact", "inspect", "x.shoal"],
            &["key", "id", "k.pub"],
            &["root", "inspect", "r"],
            &["store", "verify", "s", "--root", "r"],
        ] {
            assert_eq!(parses(device), Ok(()), "{device:?}");
        }
        let host: [&[&str]; 12] = [
            &[
                "artifact",
                "build",
                "--image",
                "i",
                "--name",
                "n",
                "--version",
                "1",
                "--device-type",
                "d",
                "--security-counter",
                "1",
                "--key",
                "k",
                "--out",
                "o",
            ],
            &["artifact", "sign", "a", "--key", "k"],
            &["artifact", "extract", "a", "--root", "r", "--out", "o"],
            &["artifact", "diff", "a", "b"],
            &["key", "generate", "--out", "k"],
            &[
                "key",
                "credential",
                "--key",
                "k",
                "--device",
                "d",
                "--fleet",
                "f",
                "--out",
                "o",
            ],
            &[
                "root",
                "init",
                "--root-key",
                "r",
                "--release-key",
                "k",
                "--out",
                "o",
            ],
            &[
                "root",
                "rotate",
                "--current",
                "c",
                "--root-key",
                "r",
                "--release-key",
                "k",
                "--out",
                "o",
            ],
            &["root", "sign", "r", "--key", "k"],
            &["store", "add", "s", "a", "--root", "r"],
            &["demo"],
            &["demo", "--keep"],
        ];
        for args in host {
            let expected = if cfg!(feature = "host") {
                Ok(())
            } else {
                Err(clap::error::ErrorKind::InvalidSubcommand)
            };
            assert_eq!(parses(args), expected, "{args:?}");
        }
    }
}
