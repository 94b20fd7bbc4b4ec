//! `shoal key`: make and inspect ed25519 signing keys.

use std::path::PathBuf;

use anyhow::Context;
#[cfg(feature = "host")]
use anyhow::bail;
use shoal_signing::{PublicKey, SecretKey};

use crate::cmd::Ui;

/// `shoal key` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    #[cfg(feature = "host")]
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
    #[cfg(feature = "host")]
    /// Issue a fleet membership credential: LAN peers serve firmware only to
    /// devices showing one of their own fleet, signed by the trust root's fleet
    /// keys (`shoal root init --fleet-key`). The device names it in `[lan]
    /// credential`.
    ///
    /// Example: shoal key credential --key fleet.pem --device data/device-key.pem --fleet plant-7 --out plant-7-dev12.cred
    Credential {
        /// A fleet private key (PKCS#8 PEM); repeat for a threshold above 1.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// The device's key: its private or public key PEM file, or its public key
        /// as 64 hex digits.
        #[arg(long)]
        device: String,
        /// The fleet's name.
        #[arg(long)]
        fleet: String,
        /// Days from now until the credential expires.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u64).range(1..=36_500))]
        expires_in_days: u64,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs a `shoal key` subcommand.
pub fn run(command: Command, ui: &Ui) -> anyhow::Result<()> {
    #[cfg(not(feature = "host"))]
    let _ = ui;
    match command {
        #[cfg(feature = "host")]
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
        #[cfg(feature = "host")]
        Command::Credential {
            keys,
            device,
            fleet,
            expires_in_days,
            out,
        } => {
            if fleet.is_empty() || fleet.len() > shoal_signing::FLEET_NAME_MAX {
                return Err(crate::cmd::Exit::usage(format!(
                    "--fleet must be 1 to {} bytes",
                    shoal_signing::FLEET_NAME_MAX
                )));
            }
            let device = device_key(&device)?;
            let signers: Vec<SecretKey> = keys
                .iter()
                .map(|p| SecretKey::load(p).with_context(|| format!("reading {}", p.display())))
                .collect::<anyhow::Result<_>>()?;
            let expires = crate::cmd::root::now_unix_s()?
                .saturating_add(expires_in_days.saturating_mul(86_400));
            let credential = shoal_signing::Credential::new(device, fleet.clone(), expires);
            let refs: Vec<&SecretKey> = signers.iter().collect();
            std::fs::write(&out, credential.issue(&refs))
                .with_context(|| format!("writing {}", out.display()))?;
            ui.info(format!(
                "wrote the credential of device {} in fleet {fleet} to {} (expires at unix time {expires})",
                hex::encode(device.to_bytes()),
                out.display()
            ));
            Ok(())
        }
    }
}

#[cfg(feature = "host")]
/// A device's public key from `--device`: 64 hex digits or a PEM key file.
fn device_key(arg: &str) -> anyhow::Result<PublicKey> {
    if arg.len() == 64
        && let Ok(bytes) = hex::decode(arg)
    {
        let bytes: [u8; 32] = bytes.try_into().expect("32 bytes");
        return PublicKey::from_bytes(&bytes)
            .map_err(|e| crate::cmd::Exit::usage(format!("--device {arg}: {e}")));
    }
    let path = std::path::Path::new(arg);
    let text =
        std::fs::read(path).map_err(|e| crate::cmd::Exit::usage(format!("--device {arg}: {e}")))?;
    let private = shoal_signing::pem_label(&String::from_utf8_lossy(&text))
        .is_some_and(|l| l.contains("PRIVATE KEY"));
    if private {
        SecretKey::load(path).map(|k| k.public())
    } else {
        PublicKey::load(path)
    }
    .with_context(|| format!("reading {}", path.display()))
}

#[cfg(feature = "host")]
/// The public key file written beside a private key file.
pub fn public_path(private: &std::path::Path) -> PathBuf {
    let mut name = private.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}
