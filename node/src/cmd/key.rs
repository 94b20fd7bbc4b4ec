//! `shoal key`: make and inspect ed25519 signing keys.

use std::path::PathBuf;

use anyhow::{Context, bail};
use shoal_signing::{PublicKey, SecretKey};

use crate::cmd::Ui;

/// `shoal key` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Make a new ed25519 key: FILE gets the private key (PKCS#8 PEM, mode 0600),
    /// FILE.pub the public key (SPKI PEM).
    ///
    /// Example: shoal key generate --out release-1.pem
    ///
    /// Keys made with `openssl genpkey -algorithm ed25519` work as they are.
    Generate {
        /// Where to write the private key; the public key goes to the same path plus `.pub`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the key id (BLAKE3 of the public key, hex) of a private or public key file.
    ///
    /// Example: shoal key id release-1.pem.pub
    Id {
        /// A PKCS#8 private key or SPKI public key PEM file.
        file: PathBuf,
    },
}

/// Runs a `shoal key` subcommand.
pub fn run(command: Command, ui: &Ui) -> anyhow::Result<()> {
    match command {
        Command::Generate { out } => {
            let pub_path = public_path(&out);
            if pub_path.exists() {
                bail!(
                    "{} already exists; refusing to overwrite it",
                    pub_path.display()
                );
            }
            let key = SecretKey::generate()?;
            key.save(&out)?;
            key.public()
                .save(&pub_path)
                .with_context(|| format!("writing {}", pub_path.display()))?;
            outln!("{}", key.id());
            ui.info(format!(
                "wrote private key {} and public key {}",
                out.display(),
                pub_path.display()
            ));
            Ok(())
        }
        Command::Id { file } => {
            // A private key's label says so; anything else is read as a public key
            // (and its error says what it is instead).
            let text = std::fs::read(&file).unwrap_or_default();
            let private = shoal_signing::pem_label(&String::from_utf8_lossy(&text))
                .is_some_and(|l| l.contains("PRIVATE KEY"));
            let id = if private {
                SecretKey::load(&file).map(|k| k.id())
            } else {
                PublicKey::load(&file).map(|k| k.id())
            }
            .with_context(|| format!("reading {}", file.display()))?;
            outln!("{id}");
            Ok(())
        }
    }
}

/// The public key file written beside a private key file.
pub fn public_path(private: &std::path::Path) -> PathBuf {
    let mut name = private.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}
