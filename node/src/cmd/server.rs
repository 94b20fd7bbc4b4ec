//! `shoal server`: runs the server role (device and management APIs), and
//! `shoal server token` makes API tokens on the server host (the first admin token).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args as ClapArgs, Subcommand};
use shoal_server::{Config, Role, db};
use shoal_signing::SignedRoot;

use super::{Exit, Ui, chain};

/// Run the Shoal server, or manage it on its host.
///
/// Example: shoal server --data /var/lib/shoal-server --listen 0.0.0.0:8440
#[derive(Debug, ClapArgs)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make an API token directly in the database (works with the server running or
    /// not); prints the secret once. Use it for the first admin token.
    ///
    /// Example: shoal server token --data /var/lib/shoal-server --name alice --role admin
    Token(TokenArgs),
}

#[derive(Debug, ClapArgs)]
struct Where {
    /// Data directory: the SQLite database (unless --database) and the chunk store.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// A PostgreSQL URL (postgres://user:pass@host/db) instead of SQLite in DIR.
    #[arg(long, value_name = "URL", env = "SHOAL_DATABASE_URL")]
    database: Option<String>,
}

#[derive(Debug, ClapArgs)]
struct RunArgs {
    #[command(flatten)]
    place: Where,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8440")]
    listen: SocketAddr,
    /// The trust root uploaded releases must verify against [default: DIR/root.shoalroot].
    #[arg(long, value_name = "FILE")]
    root: Option<PathBuf>,
    /// Lifetime of device tokens, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    device_token_ttl: u64,
    /// Largest artifact upload, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 8 << 30)]
    upload_max: u64,
    /// A static URL serving DIR/store as plain files (nginx, S3, a CDN), handed to
    /// devices, which then GET URL/chunks/<2 hex>/<64 hex> and
    /// URL/dictionaries/<8 hex> from it instead of the server.
    #[arg(long, value_name = "URL")]
    chunk_base_url: Option<String>,
    /// Per-base encodings made without an operator: a release uploaded, or
    /// deployed, is delta-encoded in the background against at most N of the
    /// releases most of its devices run (0: only those an operator asks for).
    #[arg(long, value_name = "N", default_value_t = 3)]
    auto_encode_bases: usize,
    /// Serve HTTPS with this PEM certificate chain (leaf first); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Keep chunks in an S3 bucket (s3://BUCKET[/PREFIX]) instead of DIR/store,
    /// configured from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
    /// AWS_ENDPOINT (S3-compatible servers) and AWS_ALLOW_HTTP.
    #[arg(long, value_name = "URL", env = "SHOAL_CHUNKS")]
    chunks: Option<String>,
    /// Database connections of this process.
    #[arg(long, value_name = "N", default_value_t = 16)]
    db_connections: u32,
    /// How often rollout timers (phase soak delays) are checked, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    timer_period_ms: u64,
    /// Issue LAN fleet membership credentials to accepted devices, signed with this
    /// fleet key (one the trust root's fleet role names; repeat for a threshold).
    #[arg(long, value_name = "FILE", requires = "fleet")]
    fleet_key: Vec<PathBuf>,
    /// The fleet named in the credentials issued.
    #[arg(long, value_name = "NAME", requires = "fleet_key")]
    fleet: Option<String>,
    /// Lifetime of an issued credential, in seconds (devices renew at half of it;
    /// a decommissioned device's key is handed out as revoked for this long).
    #[arg(long, value_name = "SECONDS", default_value_t = 86_400)]
    credential_ttl: u64,
}

/// The fleet credential issuer of `--fleet-key`/`--fleet`, checked against the
/// trust root: a credential it signs must verify.
fn fleet_issuer(
    args: &RunArgs,
    root: &shoal_signing::TrustRoot,
) -> anyhow::Result<Option<shoal_server::FleetIssuer>> {
    let Some(name) = &args.fleet else {
        return Ok(None);
    };
    if args.credential_ttl == 0 {
        return Err(Exit::usage("--credential-ttl must be at least 1 second"));
    }
    let keys = args
        .fleet_key
        .iter()
        .map(|p| {
            shoal_signing::SecretKey::load(p)
                .map_err(|e| Exit::usage(format!("--fleet-key {}: {}", p.display(), chain(&e))))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let probe = shoal_signing::Credential::new(keys[0].public(), name.clone(), u64::MAX)
        .issue(&keys.iter().collect::<Vec<_>>());
    shoal_signing::Credential::verify(&probe, root, None).map_err(|e| {
        Exit::usage(format!(
            "--fleet-key/--fleet: a credential they sign is refused by the trust root: {e}"
        ))
    })?;
    Ok(Some(shoal_server::FleetIssuer {
        name: name.clone(),
        keys,
        ttl_s: args.credential_ttl,
    }))
}

#[derive(Debug, ClapArgs)]
struct TokenArgs {
    #[command(flatten)]
    place: Where,
    /// Who or what the token is for.
    #[arg(long)]
    name: String,
    /// Its role: viewer, operator or admin.
    #[arg(long, value_parser = parse_role)]
    role: Role,
    /// Print the token as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("unknown role {s:?} (viewer, operator or admin)"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn data_dir(place: &Where) -> anyhow::Result<PathBuf> {
    place
        .data
        .clone()
        .ok_or_else(|| Exit::usage("--data DIR is required"))
}

fn check_database(place: &Where) -> anyhow::Result<()> {
    if let Some(url) = &place.database {
        db::check_url(url).map_err(|e| Exit::usage(format!("--database: {}", chain(&e))))?;
    }
    Ok(())
}

/// Runs `shoal server`.
pub fn run(args: Args, ui: &Ui) -> anyhow::Result<()> {
    match args.command {
        Some(Command::Token(t)) => token(t),
        None => serve(args.run, ui),
    }
}

fn serve(args: RunArgs, ui: &Ui) -> anyhow::Result<()> {
    let data = data_dir(&args.place)?;
    check_database(&args.place)?;
    let root_path = args
        .root
        .clone()
        .unwrap_or_else(|| data.join("root.shoalroot"));
    let signed = SignedRoot::load(&root_path).map_err(|e| {
        Exit::usage(format!(
            "trust root {}: {} (pass --root FILE or put it there)",
            root_path.display(),
            chain(&e)
        ))
    })?;
    signed.verify_self(None).map_err(|e| {
        Exit::usage(format!(
            "trust root {} is not validly self-signed: {e}",
            root_path.display()
        ))
    })?;
    let fleet = fleet_issuer(&args, &signed.root)?;
    let config = Config {
        fleet,
        data_dir: data,
        database_url: args.place.database,
        chunks_url: args.chunks,
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| shoal_server::tls::TlsFiles { cert, key }),
        listen: args.listen,
        root: signed.root,
        device_token_ttl_s: args.device_token_ttl,
        upload_max_bytes: args.upload_max,
        chunk_base_url: args
            .chunk_base_url
            .as_deref()
            .map(shoal_node::chunk_url::StaticBase::parse)
            .transpose()
            .map_err(|e| Exit::usage(format!("--chunk-base-url: {e}")))?
            .map(|b| b.as_str().to_owned()),
        max_connections: args.db_connections.max(1),
        timer_period_ms: args.timer_period_ms,
        auto_encode_bases: args.auto_encode_bases,
    };
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let rt = runtime()?;
    rt.block_on(async {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
        };
        shoal_server::serve(
            &config,
            |addr| ui.info(format!("shoal server listening on {scheme}://{addr}")),
            shutdown,
        )
        .await
    })
    .map_err(|e| match e {
        shoal_server::ServeError::Database(db::OpenError::Connect(_)) => Exit::tempfail(chain(&e)),
        shoal_server::ServeError::Bind { .. }
        | shoal_server::ServeError::ChunksUrl(_)
        | shoal_server::ServeError::Tls(_) => Exit::usage(chain(&e)),
        other => anyhow::Error::new(other),
    })
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    check_database(&args.place)?;
    let url = match &args.place.database {
        Some(u) => u.clone(),
        None => {
            let data = data_dir(&args.place)?;
            std::fs::create_dir_all(&data)
                .with_context(|| format!("cannot create {}", data.display()))?;
            db::sqlite_url(&data)
        }
    };
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let rt = runtime()?;
    let t = rt.block_on(async {
        let (pool, _) = db::open(&url, 1)
            .await
            .map_err(|e| Exit::tempfail(chain(&e)))?;
        let t = shoal_server::http::tokens::create_token(
            &pool,
            &args.name,
            args.role,
            &format!("host:{user}"),
        )
        .await
        .map_err(|e| match e {
            shoal_server::http::error::ApiError::BadRequest(m) => Exit::usage(m),
            other => anyhow::anyhow!(other.to_string()),
        })?;
        pool.close().await;
        anyhow::Ok(t)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&t)?);
    } else {
        println!("{}", t.secret);
    }
    Ok(())
}
