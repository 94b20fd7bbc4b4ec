//! `shoal store`.

use crate::cmd::Ui;

/// `shoal store` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {}

/// Runs a `shoal store` subcommand.
pub fn run(command: Command, _ui: &Ui) -> anyhow::Result<()> {
    match command {}
}
