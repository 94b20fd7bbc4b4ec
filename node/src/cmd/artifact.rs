//! `shoal artifact`.

use crate::cmd::Ui;

/// `shoal artifact` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {}

/// Runs a `shoal artifact` subcommand.
pub fn run(command: Command, _ui: &Ui) -> anyhow::Result<()> {
    match command {}
}
