//! `shoal root`.

use crate::cmd::Ui;

/// `shoal root` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {}

/// Runs a `shoal root` subcommand.
pub fn run(command: Command, _ui: &Ui) -> anyhow::Result<()> {
    match command {}
}
