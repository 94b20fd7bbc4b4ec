//! `shoal store`: chunk stores, plain directories servable as static files.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;
use shoal_artifact::ChunkStore;

use crate::cmd::Ui;
use crate::cmd::artifact::Trust;

/// `shoal store` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    #[cfg(feature = "host")]
    /// Verify an artifact and add its chunks and signed manifest to a store (created
    /// if missing). A thin artifact needs its base release in the store first.
    ///
    /// Example: shoal store add /srv/shoal acme-os-2.0.shoal --root root.shoalroot
    #[command(verbatim_doc_comment)]
    Add {
        /// The store directory.
        store: PathBuf,
        /// The artifact (`-` for standard input).
        artifact: PathBuf,
        #[command(flatten)]
        trust: Trust,
    },
    /// Verify a store: every manifest's signatures, every chunk present and intact.
    ///
    /// Example: shoal store verify /srv/shoal --root root.shoalroot --json
    #[command(verbatim_doc_comment)]
    Verify {
        /// The store directory.
        store: PathBuf,
        #[command(flatten)]
        trust: Trust,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `shoal store` subcommand.
pub fn run(command: Command, ui: &Ui) -> anyhow::Result<()> {
    #[cfg(not(feature = "host"))]
    let _ = ui;
    match command {
        #[cfg(feature = "host")]
        Command::Add {
            store,
            artifact,
            trust,
        } => {
            let (root, now) = trust.load()?;
            let s = ChunkStore::open(&store)
                .with_context(|| format!("opening store {}", store.display()))?;
            let input = crate::cmd::artifact::open_input(&artifact, Some(&root))?;
            let report = s
                .add_artifact(input, &root, now)
                .with_context(|| format!("adding {}", artifact.display()))?;
            ui.info(format_args!(
                "added {} {}: {} new chunk(s), {} already present; manifest {}",
                report.manifest.name,
                report.manifest.version,
                report.chunks_added,
                report.chunks_present,
                report.manifest_path.display()
            ));
            Ok(())
        }
        Command::Verify { store, trust, json } => {
            let (root, now) = trust.load()?;
            if !store.is_dir() {
                return Err(crate::cmd::Exit::usage(format!(
                    "store {} is not a directory",
                    store.display()
                )));
            }
            let s = ChunkStore::open(&store)
                .with_context(|| format!("opening store {}", store.display()))?;
            let report = s
                .verify(&root, now)
                .with_context(|| format!("verifying store {}", store.display()))?;
            let mut out = std::io::stdout().lock();
            if json {
                #[derive(Serialize)]
                struct Verified {
                    ok: bool,
                    manifests: u64,
                    chunks: u64,
                    stored_bytes: u64,
                }
                let v = Verified {
                    ok: true,
                    manifests: report.manifests,
                    chunks: report.chunks,
                    stored_bytes: report.stored_bytes,
                };
                serde_json::to_writer_pretty(&mut out, &v)?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "ok: {} manifest(s), {} chunk(s), {} stored bytes verified",
                    report.manifests, report.chunks, report.stored_bytes
                )?;
            }
            Ok(())
        }
    }
}
