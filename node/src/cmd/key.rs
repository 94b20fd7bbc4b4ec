//! `shoal key`.

use crate::cmd::Ui;

/// `shoal key` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {}

/// Runs a `shoal key` subcommand.
pub fn run(command: Command, _ui: &Ui) -> anyhow::Result<()> {
    match command {}
}
