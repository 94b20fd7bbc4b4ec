//! The device configuration file (`--config`, default `/etc/shoal/shoal.toml`).
//!
//! ```toml
//! [device]
//! type = "acme-board"                    # must be in a release's device_types
//! data_dir = "/var/lib/shoal"            # the device store (redb) lives here
//! trust_root = "/etc/shoal/root.shoal"   # the signed trust root (`shoal root init`)
//! provides = { "bootloader" = "2024.01" } # optional, checked against `depends`
//! reboot_command = ["systemctl", "reboot"] # [] = never reboot by itself
//!
//! [health]
//! dir = "/etc/shoal/health.d"            # executables run by `shoal boot-check`
//! timeout_s = 60                         # per check
//!
//! [install]
//! journal_batch_mib = 16                 # progress journal commit interval
//!
//! [server]                               # optional: managed mode (`shoal daemon`)
//! url = "https://updates.example.com"    # http:// or https://
//! ca_certificate = "/etc/shoal/ca.pem"   # optional: PEM CA added to the system roots
//! poll_interval_s = 300                  # between deployment polls (jittered)
//! retry_max_s = 3600                     # the longest backoff after failures
//! identity = { mac = "02:00:00:00:00:01" } # identity attributes shown to operators
//! inventory_dir = "/etc/shoal/inventory.d" # executables printing key=value lines
//!
//! [network]                              # optional: limits of downloads from the server
//! rate_limit_kib_s = 512                 # bandwidth cap (KiB/s on the wire)
//! budget_per_deployment_mib = 200        # data budget of one deployment (MiB on the wire)
//! budget_per_month_mib = 1000            # data budget of a calendar month (UTC), all deployments
//!
//! [lan]                                  # optional: LAN peers (libp2p)
//! enabled = true
//! listen = ["/ip4/0.0.0.0/tcp/4040"]     # multiaddrs to listen on
//! static_peers = ["/ip4/192.0.2.7/tcp/4040"] # dialled (and redialled) where mDNS cannot reach
//! mdns = true                            # discover peers by multicast DNS
//! mdns_query_interval_s = 5
//! connections_max = 64                   # established connections, all peers
//! request_timeout_s = 10                 # a peer that stalls costs at most this
//! owner_timeout_s = 20                   # a swarm member announcing no new chunk this long loses its chunks
//! serve_rate_kib_s = 8192                # chunk bytes served to one peer per second
//! credential = "/etc/shoal/fleet.cred"   # this device's fleet membership credential
//! revoked_peers = []                     # device keys (hex) refused whatever they show
//!
//! [slots]                                # and [bootloader]: see shoal-bootctl
//! a = { path = "/dev/mmcblk0p2" }
//! b = { path = "/dev/mmcblk0p3" }
//! [bootloader]
//! type = "uboot"
//! ```
//!
//! Unknown keys and bad values are errors that name the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use shoal_bootctl::config::{BootloaderConfig, SlotsConfig};

/// Default location of the device configuration.
pub const DEFAULT_PATH: &str = "/etc/shoal/shoal.toml";

/// The whole device configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[device]`.
    pub device: Device,
    /// `[health]`.
    #[serde(default)]
    pub health: Health,
    /// `[install]`.
    #[serde(default)]
    pub install: Install,
    /// `[server]`: managed mode; `None` for standalone devices.
    #[serde(default)]
    pub server: Option<Server>,
    /// `[network]`: limits of server downloads.
    #[serde(default)]
    pub network: Network,
    /// `[lan]`: LAN peers; off when absent.
    #[serde(default)]
    pub lan: Lan,
    /// `[slots]` (shoal-bootctl's table).
    pub slots: SlotsConfig,
    /// `[bootloader]` (shoal-bootctl's table).
    pub bootloader: BootloaderConfig,
}

/// `[device]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// The device type releases must list.
    #[serde(rename = "type")]
    pub device_type: String,
    /// Directory of the device store.
    pub data_dir: PathBuf,
    /// The signed trust root file.
    pub trust_root: PathBuf,
    /// What the device provides besides its running release's provides.
    #[serde(default)]
    pub provides: BTreeMap<String, String>,
    /// The command that reboots the device; empty: never reboot automatically.
    #[serde(default = "default_reboot")]
    pub reboot_command: Vec<String>,
}

fn default_reboot() -> Vec<String> {
    vec!["systemctl".into(), "reboot".into()]
}

/// `[health]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Directory of health check executables, run in name order.
    #[serde(default = "default_health_dir")]
    pub dir: PathBuf,
    /// Seconds each check may take.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
}

fn default_health_dir() -> PathBuf {
    PathBuf::from("/etc/shoal/health.d")
}

fn default_timeout_s() -> u64 {
    60
}

impl Default for Health {
    fn default() -> Health {
        Health {
            dir: default_health_dir(),
            timeout_s: default_timeout_s(),
        }
    }
}

/// `[install]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Install {
    /// MiB written between two progress journal commits.
    #[serde(default = "default_batch_mib")]
    pub journal_batch_mib: u64,
}

fn default_batch_mib() -> u64 {
    16
}

impl Default for Install {
    fn default() -> Install {
        Install {
            journal_batch_mib: default_batch_mib(),
        }
    }
}

/// `[network]`: limits the engine enforces on downloads from the server (WAN
/// sources); local sources (USB, a chunk store) are not limited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Bandwidth cap in KiB per second of wire bytes.
    #[serde(default)]
    pub rate_limit_kib_s: Option<u64>,
    /// Most wire bytes (MiB) one deployment may download; a deployment that needs
    /// more fails before anything is fetched, saying so.
    #[serde(default)]
    pub budget_per_deployment_mib: Option<u64>,
    /// Most wire bytes (MiB) the daemon may download from the server in one calendar
    /// month (UTC), counted across deployments and restarts; a deployment that needs
    /// more than is left fails before anything is fetched, saying so.
    #[serde(default)]
    pub budget_per_month_mib: Option<u64>,
}

/// `[lan]`: sharing chunks with LAN peers (the daemon; see `crate::lan`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lan {
    /// Whether the daemon joins its LAN at all.
    #[serde(default)]
    pub enabled: bool,
    /// Multiaddrs to listen on.
    #[serde(default = "default_lan_listen")]
    pub listen: Vec<String>,
    /// Peers dialled (and redialled while unreachable) besides those mDNS finds.
    #[serde(default)]
    pub static_peers: Vec<String>,
    /// QUIC (`/udp/P/quic-v1`, TLS 1.3) besides TCP: the LAN layer also listens on
    /// a QUIC twin of each plain TCP address in `listen` (same IP, the same port
    /// number over UDP) and dials the QUIC addresses peers advertise. On by default
    /// in a shoal built with the `quic` cargo feature; refused in one without it.
    /// QUIC addresses may also be listed in `listen` (only those: QUIC only).
    #[serde(default = "default_quic")]
    pub quic: bool,
    /// Whether peers are discovered by multicast DNS.
    #[serde(default = "default_true")]
    pub mdns: bool,
    /// Seconds between two mDNS queries.
    #[serde(default = "default_mdns_s")]
    pub mdns_query_interval_s: u64,
    /// Established connections at most (all peers together).
    #[serde(default = "default_connections_max")]
    pub connections_max: u32,
    /// Seconds a request to a peer may take.
    #[serde(default = "default_request_timeout_s")]
    pub request_timeout_s: u64,
    /// Seconds a LAN swarm member may announce no new chunk before the chunks it
    /// owns are fetched by their next owner (in the end over the WAN). Shorter
    /// recovers sooner from a member that died; too short for the site's uplink
    /// (a member's first chunks arrive after its share of a busy uplink) and
    /// members fetch each other's chunks over the WAN.
    #[serde(default = "default_owner_timeout_s")]
    pub owner_timeout_s: u64,
    /// Chunk bytes (KiB) served to one peer per second; more is answered "later".
    #[serde(default = "default_serve_rate")]
    pub serve_rate_kib_s: u64,
    /// This device's fleet membership credential (`shoal fleet credential`). When
    /// the trust root has a `fleet` role, peers serve only devices that show one
    /// of their own fleet, and this device serves only such peers.
    #[serde(default)]
    pub credential: Option<PathBuf>,
    /// Device keys (64 hex digits) refused whatever credential they show (a
    /// decommissioned device whose credential has not expired yet).
    #[serde(default)]
    pub revoked_peers: Vec<String>,
    /// Offline propagation: the daemon installs a release a LAN peer runs, when it
    /// is an update for this device (the engine's `peer_release`) and its signed
    /// manifest passes the same offer checks as a server's (trust root, device
    /// type, depends, anti-rollback). Without it, peers only share chunks of
    /// releases the server deploys.
    #[serde(default)]
    pub accept_releases: bool,
}

fn default_lan_listen() -> Vec<String> {
    vec!["/ip4/0.0.0.0/tcp/0".into()]
}
fn default_quic() -> bool {
    cfg!(feature = "quic")
}
/// Whether `addr` is a QUIC address (`/quic-v1`, or draft-29's `/quic`).
pub fn is_quic(addr: &libp2p_core::Multiaddr) -> bool {
    use libp2p_core::multiaddr::Protocol;
    addr.iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}
fn default_true() -> bool {
    true
}
fn default_mdns_s() -> u64 {
    5
}
fn default_connections_max() -> u32 {
    64
}
fn default_request_timeout_s() -> u64 {
    10
}
fn default_owner_timeout_s() -> u64 {
    20
}
fn default_serve_rate() -> u64 {
    8192
}

impl Default for Lan {
    fn default() -> Lan {
        Lan {
            enabled: false,
            listen: default_lan_listen(),
            static_peers: Vec::new(),
            quic: default_quic(),
            mdns: true,
            mdns_query_interval_s: default_mdns_s(),
            connections_max: default_connections_max(),
            request_timeout_s: default_request_timeout_s(),
            owner_timeout_s: default_owner_timeout_s(),
            serve_rate_kib_s: default_serve_rate(),
            credential: None,
            revoked_peers: Vec::new(),
            accept_releases: false,
        }
    }
}

/// `[server]`: where `shoal daemon` gets its deployments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// The server's base URL (`http://` or `https://`, no path).
    pub url: String,
    /// A PEM CA certificate to trust besides the system's roots.
    #[serde(default)]
    pub ca_certificate: Option<PathBuf>,
    /// Seconds between two polls for a deployment (each jittered by up to a tenth).
    #[serde(default = "default_poll_s")]
    pub poll_interval_s: u64,
    /// The longest wait, in seconds, of the exponential backoff after failures.
    #[serde(default = "default_retry_max_s")]
    pub retry_max_s: u64,
    /// Identity attributes sent with each auth request (at least one).
    pub identity: BTreeMap<String, String>,
    /// Directory of inventory executables, each printing `key=value` lines.
    #[serde(default)]
    pub inventory_dir: Option<PathBuf>,
    /// Names the release the running slot holds in chunk requests, so the server
    /// may send changed chunks delta-encoded against it (per-base encodings; the
    /// reference bytes are read from the running slot and checked), and the
    /// manifests it keeps in manifest requests, so the server may send the new
    /// manifest as a delta against one of them (rebuilt and verified whole).
    /// `false`: plain chunks and whole manifests only.
    #[serde(default = "default_true")]
    pub delta: bool,
}

fn default_poll_s() -> u64 {
    300
}

fn default_retry_max_s() -> u64 {
    3600
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the device configuration {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, or a value of the wrong type (the message names
    /// the key and its line).
    #[error("device configuration {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is of the right type but not acceptable.
    #[error("device configuration {path}: {key} {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, dotted (`health.timeout_s`).
        key: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl Config {
    /// Reads and checks the configuration at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks configuration text (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |key, reason| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            reason,
        };
        if config.device.device_type.trim().is_empty() {
            return Err(invalid("device.type", "must not be empty"));
        }
        if config.device.data_dir.as_os_str().is_empty() {
            return Err(invalid("device.data_dir", "must not be empty"));
        }
        if config.device.trust_root.as_os_str().is_empty() {
            return Err(invalid("device.trust_root", "must not be empty"));
        }
        if config.health.timeout_s == 0 || config.health.timeout_s > 24 * 3600 {
            return Err(invalid(
                "health.timeout_s",
                "must be between 1 and 86400 seconds",
            ));
        }
        let lan = &config.lan;
        if lan
            .listen
            .iter()
            .any(|a| a.parse::<libp2p_core::Multiaddr>().is_err())
        {
            return Err(invalid(
                "lan.listen",
                "must be multiaddrs such as /ip4/0.0.0.0/tcp/4040",
            ));
        }
        if lan
            .static_peers
            .iter()
            .any(|a| a.parse::<libp2p_core::Multiaddr>().is_err())
        {
            return Err(invalid(
                "lan.static_peers",
                "must be multiaddrs such as /ip4/192.0.2.7/tcp/4040",
            ));
        }
        if lan.quic && !cfg!(feature = "quic") {
            return Err(invalid(
                "lan.quic",
                "needs a shoal built with the `quic` cargo feature (cargo build -p shoal-node --features quic)",
            ));
        }
        for (field, addrs) in [
            ("lan.listen", &lan.listen),
            ("lan.static_peers", &lan.static_peers),
        ] {
            let quic = addrs.iter().any(|a| a.parse().is_ok_and(|a| is_quic(&a)));
            if quic && !lan.quic {
                return Err(invalid(
                    field,
                    if cfg!(feature = "quic") {
                        "has a QUIC address (/quic-v1) but lan.quic is false"
                    } else {
                        "has a QUIC address (/quic-v1), which needs a shoal built with the `quic` cargo feature"
                    },
                ));
            }
        }
        if lan.mdns_query_interval_s == 0 || lan.mdns_query_interval_s > 3600 {
            return Err(invalid(
                "lan.mdns_query_interval_s",
                "must be between 1 and 3600 seconds",
            ));
        }
        if lan.connections_max == 0 {
            return Err(invalid("lan.connections_max", "must be at least 1"));
        }
        if lan.request_timeout_s == 0 || lan.request_timeout_s > 600 {
            return Err(invalid(
                "lan.request_timeout_s",
                "must be between 1 and 600 seconds",
            ));
        }
        if lan.owner_timeout_s == 0 || lan.owner_timeout_s > 3600 {
            return Err(invalid(
                "lan.owner_timeout_s",
                "must be between 1 and 3600 seconds",
            ));
        }
        if lan
            .revoked_peers
            .iter()
            .any(|k| k.len() != 64 || hex::decode(k).is_err())
        {
            return Err(invalid(
                "lan.revoked_peers",
                "must be device public keys of 64 hex digits",
            ));
        }
        if lan.serve_rate_kib_s == 0 {
            return Err(invalid("lan.serve_rate_kib_s", "must be at least 1"));
        }
        if config.install.journal_batch_mib == 0 || config.install.journal_batch_mib > 1024 {
            return Err(invalid(
                "install.journal_batch_mib",
                "must be between 1 and 1024",
            ));
        }
        if config
            .device
            .reboot_command
            .first()
            .is_some_and(|c| c.is_empty())
        {
            return Err(invalid(
                "device.reboot_command",
                "must start with a program name",
            ));
        }
        if config
            .network
            .rate_limit_kib_s
            .is_some_and(|r| r == 0 || r > 10 * 1024 * 1024)
        {
            return Err(invalid(
                "network.rate_limit_kib_s",
                "must be between 1 and 10485760 KiB/s",
            ));
        }
        if config
            .network
            .budget_per_deployment_mib
            .is_some_and(|b| b == 0 || b > 1024 * 1024)
        {
            return Err(invalid(
                "network.budget_per_deployment_mib",
                "must be between 1 and 1048576 MiB",
            ));
        }
        if config
            .network
            .budget_per_month_mib
            .is_some_and(|b| b == 0 || b > 1024 * 1024 * 1024)
        {
            return Err(invalid(
                "network.budget_per_month_mib",
                "must be between 1 and 1073741824 MiB",
            ));
        }
        if let Some(server) = &config.server {
            check_server(server).map_err(|(key, reason)| invalid(key, reason))?;
        }
        Ok(config)
    }
}

/// The checks of `[server]`: the key and what is wrong with it.
fn check_server(s: &Server) -> Result<(), (&'static str, &'static str)> {
    let rest = s
        .url
        .strip_prefix("https://")
        .or_else(|| s.url.strip_prefix("http://"))
        .ok_or(("server.url", "must start with http:// or https://"))?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
        return Err((
            "server.url",
            "must be a scheme and a host[:port], without a path",
        ));
    }
    if s.ca_certificate
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        return Err(("server.ca_certificate", "must not be empty"));
    }
    if s.poll_interval_s == 0 || s.poll_interval_s > 7 * 24 * 3600 {
        return Err((
            "server.poll_interval_s",
            "must be between 1 and 604800 seconds",
        ));
    }
    if s.retry_max_s < s.poll_interval_s.min(60) || s.retry_max_s > 7 * 24 * 3600 {
        return Err((
            "server.retry_max_s",
            "must be between min(poll_interval_s, 60) and 604800 seconds",
        ));
    }
    if s.identity.is_empty() {
        return Err(("server.identity", "must have at least one attribute"));
    }
    let name_ok = |k: &str| {
        !k.is_empty()
            && k.len() <= 128
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-:".contains(&b))
    };
    if !s.identity.keys().all(|k| name_ok(k)) {
        return Err((
            "server.identity",
            "attribute names must be 1 to 128 characters of A-Z a-z 0-9 _ . - :",
        ));
    }
    if s.identity.values().any(|v| v.len() > 1024) {
        return Err(("server.identity", "values must be at most 1024 bytes"));
    }
    if s.inventory_dir
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        return Err(("server.inventory_dir", "must not be empty"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [device]
        type = "acme-board"
        data_dir = "/var/lib/shoal"
        trust_root = "/etc/shoal/root.shoal"

        [health]
        dir = "/etc/shoal/health.d"
        timeout_s = 30

        [slots]
        a = { path = "/dev/mmcblk0p2" }
        b = { path = "/dev/mmcblk0p3" }

        [bootloader]
        type = "file"
        path = "/var/lib/shoal/bootenv"
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("shoal.toml"))
    }

    fn parse_err(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_with_defaults() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.device.device_type, "acme-board");
        assert_eq!(c.health.timeout_s, 30);
        assert_eq!(c.install.journal_batch_mib, 16);
        assert_eq!(
            c.device.reboot_command,
            vec!["systemctl".to_string(), "reboot".to_string()]
        );
        assert_eq!(c.slots.b.path, PathBuf::from("/dev/mmcblk0p3"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = parse_err(&GOOD.replace("timeout_s = 30", "timeout = 30"));
        assert!(e.contains("unknown field `timeout`"), "{e}");
        let e = parse_err(&format!("{GOOD}\n[network]\ncap = 1\n"));
        assert!(e.contains("unknown field `cap`"), "{e}");
        let e = parse_err(&format!("{GOOD}\n[lan]\nport = 1\n"));
        assert!(e.contains("unknown field `port`"), "{e}");
        let e =
            parse_err(&GOOD.replace("type = \"acme-board\"", "type = \"acme-board\"\ncolour = 1"));
        assert!(e.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse_err(&GOOD.replace("timeout_s = 30", "timeout_s = \"soon\""));
        assert!(e.contains("timeout_s"), "{e}");
        let e = parse_err(&GOOD.replace("timeout_s = 30", "timeout_s = 0"));
        assert!(
            e.contains("health.timeout_s must be between 1 and 86400"),
            "{e}"
        );
        let e = parse_err(&GOOD.replace("type = \"acme-board\"", "type = \"\""));
        assert!(e.contains("device.type must not be empty"), "{e}");
        let e = parse_err(&format!("{GOOD}\n[install]\njournal_batch_mib = 0\n"));
        assert!(e.contains("install.journal_batch_mib"), "{e}");
        let e = parse_err(&GOOD.replace("type = \"file\"", "type = \"floppy\""));
        assert!(e.contains("floppy") && e.contains("type"), "{e}");
    }

    #[test]
    fn lan_table_is_checked() {
        let c = parse(&format!(
            "{GOOD}\n[lan]\nenabled = true\nstatic_peers = [\"/ip4/127.0.0.1/tcp/4040\"]\n"
        ))
        .expect("valid");
        assert!(c.lan.enabled);
        assert_eq!(c.lan.listen, vec!["/ip4/0.0.0.0/tcp/0".to_string()]);
        assert_eq!(c.lan.mdns_query_interval_s, 5);
        assert!(!parse(GOOD).expect("valid").lan.enabled);
        let e = parse_err(&format!(
            "{GOOD}\n[lan]\nstatic_peers = [\"192.0.2.7:4040\"]\n"
        ));
        assert!(e.contains("lan.static_peers must be multiaddrs"), "{e}");
        let e = parse_err(&format!("{GOOD}\n[lan]\nlisten = [\"tcp\"]\n"));
        assert!(e.contains("lan.listen must be multiaddrs"), "{e}");
        let e = parse_err(&format!("{GOOD}\n[lan]\nmdns_query_interval_s = 0\n"));
        assert!(
            e.contains("lan.mdns_query_interval_s must be between"),
            "{e}"
        );
        let e = parse_err(&format!("{GOOD}\n[lan]\nrequest_timeout_s = 0\n"));
        assert!(e.contains("lan.request_timeout_s must be between"), "{e}");
        assert_eq!(parse(GOOD).expect("valid").lan.owner_timeout_s, 20);
        let e = parse_err(&format!("{GOOD}\n[lan]\nowner_timeout_s = 0\n"));
        assert!(e.contains("lan.owner_timeout_s must be between"), "{e}");
        let e = parse_err(&format!("{GOOD}\n[lan]\nowner_timeout_s = 3601\n"));
        assert!(e.contains("lan.owner_timeout_s must be between"), "{e}");
        let e = parse_err(&format!("{GOOD}\n[lan]\nrevoked_peers = [\"abc\"]\n"));
        assert!(
            e.contains("lan.revoked_peers must be device public keys"),
            "{e}"
        );
        let e = parse_err(&format!("{GOOD}\n[lan]\nconnections_max = 0\n"));
        assert!(e.contains("lan.connections_max must be at least 1"), "{e}");
    }

    #[test]
    fn lan_quic_needs_the_feature_and_the_switch() {
        let quic_listen = format!("{GOOD}\n[lan]\nlisten = [\"/ip4/0.0.0.0/udp/0/quic-v1\"]\n");
        let quic_peer =
            format!("{GOOD}\n[lan]\nstatic_peers = [\"/ip4/192.0.2.7/udp/4040/quic-v1\"]\n");
        let quic_on = format!("{GOOD}\n[lan]\nquic = true\n");
        if cfg!(feature = "quic") {
            // On by default in a build with the feature; QUIC addresses accepted.
            assert!(parse(GOOD).expect("valid").lan.quic);
            assert!(parse(&quic_on).expect("valid").lan.quic);
            assert!(parse(&quic_listen).is_ok());
            assert!(parse(&quic_peer).is_ok());
            let off = "\nquic = false\n";
            let e = parse_err(&format!("{quic_listen}{off}"));
            assert!(
                e.contains("lan.listen has a QUIC address (/quic-v1) but lan.quic is false"),
                "{e}"
            );
            let e = parse_err(&format!("{quic_peer}{off}"));
            assert!(
                e.contains("lan.static_peers has a QUIC address (/quic-v1) but lan.quic is false"),
                "{e}"
            );
        } else {
            assert!(!parse(GOOD).expect("valid").lan.quic);
            let e = parse_err(&quic_on);
            assert!(
                e.contains("lan.quic needs a shoal built with the `quic` cargo feature"),
                "{e}"
            );
            for (text, field) in [(quic_listen, "lan.listen"), (quic_peer, "lan.static_peers")] {
                let e = parse_err(&text);
                assert!(
                    e.contains(&format!(
                        "{field} has a QUIC address (/quic-v1), which needs a shoal built with the `quic` cargo feature"
                    )),
                    "{e}"
                );
            }
        }
    }

    const SERVER: &str = r#"
        [server]
        url = "https://updates.example.com:8443"
        identity = { mac = "02:00:00:00:00:01" }
    "#;

    fn with_server(server: &str) -> String {
        // [server] before [slots], so the tables stay apart.
        GOOD.replace("[slots]", &format!("{server}\n[slots]"))
    }

    #[test]
    fn server_table_parses_with_defaults() {
        assert_eq!(parse(GOOD).expect("valid").server, None);
        let c = parse(&with_server(SERVER)).expect("valid");
        let s = c.server.expect("[server]");
        assert_eq!(s.url, "https://updates.example.com:8443");
        assert_eq!(s.poll_interval_s, 300);
        assert_eq!(s.retry_max_s, 3600);
        assert_eq!(s.identity["mac"], "02:00:00:00:00:01");
        assert_eq!(s.ca_certificate, None);
        assert_eq!(s.inventory_dir, None);
    }

    #[test]
    fn server_bad_values_are_named() {
        let cases = [
            (
                SERVER.replace("https://updates.example.com:8443", "ftp://x"),
                "server.url must start with http:// or https://",
            ),
            (
                SERVER.replace(":8443", ":8443/api"),
                "server.url must be a scheme and a host[:port], without a path",
            ),
            (
                SERVER.replace("https://updates.example.com:8443", "https://"),
                "server.url must be a scheme and a host[:port]",
            ),
            (
                format!("{SERVER}\npoll_interval_s = 0"),
                "server.poll_interval_s must be between 1 and 604800",
            ),
            (
                format!("{SERVER}\nretry_max_s = 1"),
                "server.retry_max_s must be between",
            ),
            (
                SERVER.replace("{ mac = \"02:00:00:00:00:01\" }", "{}"),
                "server.identity must have at least one attribute",
            ),
            (
                SERVER.replace("{ mac =", "{ \"m a c\" ="),
                "server.identity attribute names must be",
            ),
            (
                format!("{SERVER}\nca_certificate = \"\""),
                "server.ca_certificate must not be empty",
            ),
            (
                format!("{SERVER}\ninventory_dir = \"\""),
                "server.inventory_dir must not be empty",
            ),
        ];
        for (server, want) in cases {
            let e = parse_err(&with_server(&server));
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
        let e = parse_err(&with_server(&format!("{SERVER}\npoll = 5")));
        assert!(e.contains("unknown field `poll`"), "{e}");
        let e = parse_err(&with_server(&SERVER.replace("url = ", "# url = ")));
        assert!(e.contains("missing field `url`"), "{e}");
        let e = parse_err(&with_server(&format!("{SERVER}\npoll_interval_s = -3")));
        assert!(e.contains("poll_interval_s"), "{e}");
    }

    #[test]
    fn network_limits_parse_and_bad_values_are_named() {
        assert_eq!(parse(GOOD).expect("valid").network, Network::default());
        let c = parse(&format!(
            "{GOOD}\n[network]\nrate_limit_kib_s = 512\nbudget_per_deployment_mib = 200\n"
        ))
        .expect("valid");
        assert_eq!(c.network.rate_limit_kib_s, Some(512));
        assert_eq!(c.network.budget_per_deployment_mib, Some(200));
        assert_eq!(c.network.budget_per_month_mib, None);
        let c = parse(&format!("{GOOD}\n[network]\nbudget_per_month_mib = 1000\n"))
            .expect("month budget");
        assert_eq!(c.network.budget_per_month_mib, Some(1000));
        let e = parse_err(&format!("{GOOD}\n[network]\nbudget_per_month_mib = 0\n"));
        assert!(
            e.contains("network.budget_per_month_mib must be between"),
            "{e}"
        );
        let e = parse_err(&format!("{GOOD}\n[network]\nrate_limit_kib_s = 0\n"));
        assert!(
            e.contains("network.rate_limit_kib_s must be between"),
            "{e}"
        );
        let e = parse_err(&format!(
            "{GOOD}\n[network]\nbudget_per_deployment_mib = 0\n"
        ));
        assert!(
            e.contains("network.budget_per_deployment_mib must be between"),
            "{e}"
        );
        let e = parse_err(&format!("{GOOD}\n[network]\nrate_limit_kib_s = -1\n"));
        assert!(e.contains("rate_limit_kib_s"), "{e}");
    }

    #[test]
    fn missing_tables_and_keys_are_named() {
        let e = parse_err(&GOOD.replace("data_dir = \"/var/lib/shoal\"", ""));
        assert!(e.contains("missing field `data_dir`"), "{e}");
        let no_slots = GOOD.replace("[slots]", "[other]");
        let e = parse_err(&no_slots);
        assert!(e.contains("other") || e.contains("slots"), "{e}");
    }
}
