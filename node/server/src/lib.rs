//! Shoal's server role: the HTTP APIs that devices and operators talk to.
//!
//! - **Device API** (`/api/devices/v1`): devices authenticate with an auth request
//!   signed by their own ed25519 key (the same key is their LAN identity); unknown
//!   devices wait as *pending* until an operator accepts them (or their key was
//!   preauthorized); accepted devices get a short-lived bearer token bound to that
//!   device. With it they poll for their next deployment, fetch its signed
//!   manifest and the stored (compressed) chunks they lack in batches, and report
//!   status with Mender's state names, logs and inventory.
//! - **Management API** (`/api/management/v1`, used by `shoal admin`): devices,
//!   static and dynamic groups, releases (uploaded `.shoal` artifacts, verified
//!   against the server's trust root while they stream in), deployments, API
//!   tokens with roles, and an audit log of every change.
//! - An OpenAPI document at `/api/openapi.json`.
//!
//! Design: axum handlers stay thin over one `Arc`-held [`Context`]; every failure
//! is an [`ApiError`](http::error::ApiError) with a JSON body; authentication is an
//! extractor; SQL lives in migrations and in one module per resource. The database
//! is SQLite in the data directory by default and PostgreSQL for scale-out; all
//! state is in the database and the chunk store; what a server keeps in memory (the
//! [`view`] of which devices may have something to do, used so that an idle poll
//! needs no database round trip) is refreshed from the database within a stated
//! bound, so any number of server processes can share one PostgreSQL. Chunks live in a
//! [`shoal_artifact::ChunkStore`] directory (`DIR/store`) or an S3 bucket
//! ([`chunks`]), laid out so that a static file server can serve them as they are.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use shoal_artifact::ChunkStore;

use crate::chunks::Chunks;
use shoal_signing::TrustRoot;
use sqlx::AnyPool;

pub mod chunks;
pub mod db;
pub mod encode_jobs;
pub mod encodings;
pub mod filter;
pub mod http;
pub mod last_seen;
pub mod manifest_deltas;
pub mod release_cache;
pub mod rollouts;
pub mod tls;
pub mod token;
pub mod view;

pub use http::extractor::Role;

/// How a server is configured.
#[derive(Debug, Clone)]
pub struct Config {
    /// The data directory: the SQLite database (unless `database_url` is set) and
    /// the chunk store (`DIR/store`).
    pub data_dir: PathBuf,
    /// A database URL (`postgres://...` or `sqlite:...`); default: SQLite in
    /// `data_dir`.
    pub database_url: Option<String>,
    /// An object store for chunks (`s3://bucket/prefix`) instead of `DIR/store`.
    pub chunks_url: Option<String>,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Serve HTTPS with this certificate and key (plain HTTP without).
    pub tls: Option<tls::TlsFiles>,
    /// The trust root uploaded artifacts must verify against.
    pub root: TrustRoot,
    /// How long a device token lives, in seconds.
    pub device_token_ttl_s: u64,
    /// The largest artifact upload accepted, in bytes.
    pub upload_max_bytes: u64,
    /// A static base URL that serves the chunk store (nginx, S3, a CDN), handed to
    /// devices with each deployment so they may fetch chunks from it instead.
    pub chunk_base_url: Option<String>,
    /// Database connections per server process.
    pub max_connections: u32,
    /// How often rollout timers (phase soak delays) are checked, in milliseconds.
    pub timer_period_ms: u64,
    /// Fleet membership credentials issued to accepted devices, if any.
    pub fleet: Option<FleetIssuer>,
    /// Per-base encodings queued automatically per release, against the releases
    /// most of its devices run ([`encode_jobs`]); 0 turns them off.
    pub auto_encode_bases: usize,
}

/// What the server signs LAN membership credentials with: a fleet key the trust
/// root's `fleet` role names, the fleet, and how long a credential lives.
///
/// Revocation: a credential lives `ttl_s` (short, a day by default) and devices
/// renew it at half its life; a decommissioned device can no longer renew, and its
/// key is also handed to every device as revoked until its last credential has
/// expired (`GET /api/devices/v1/credential`), so its peers refuse it at once.
#[derive(Debug, Clone)]
pub struct FleetIssuer {
    /// The fleet's name.
    pub name: String,
    /// The fleet key(s) signing credentials (a threshold of the `fleet` role).
    pub keys: Vec<shoal_signing::SecretKey>,
    /// A credential's lifetime, in seconds.
    pub ttl_s: u64,
}

impl Config {
    /// The database URL in force.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| db::sqlite_url(&self.data_dir))
    }
}

/// Limits on what one request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A device token's lifetime, in milliseconds.
    pub device_token_ttl_ms: i64,
    /// The largest artifact upload, in bytes.
    pub upload_max_bytes: u64,
}

/// Everything a handler needs, shared by all of them behind one `Arc`.
#[derive(Debug)]
pub struct Context {
    /// The database pool.
    pub db: AnyPool,
    /// Which database it is.
    pub backend: db::Backend,
    /// Where chunks, manifests and dictionaries are stored.
    pub store: Chunks,
    /// The trust root releases must verify against.
    pub root: TrustRoot,
    /// Request limits.
    pub limits: Limits,
    /// The static chunk base URL handed to devices, if any.
    pub chunk_base_url: Option<String>,
    /// Fleet membership credentials issued to accepted devices, if any.
    pub fleet: Option<FleetIssuer>,
    /// Verified manifests of releases, loaded on first use.
    pub releases: release_cache::ReleaseCache,
    /// Per-base encoding indexes read from the store ([`encodings`]).
    pub encodings: encodings::IndexCache,
    /// Manifest deltas served to devices that name the manifests they keep
    /// ([`manifest_deltas`]).
    pub manifest_deltas: manifest_deltas::ManifestDeltas,
    /// Held while an upload adds chunks and while a release deletion removes the
    /// chunks no other release lists, so one never removes what the other counts on.
    pub store_lock: tokio::sync::Mutex<()>,
    /// Devices seen by polls, written in batches ([`last_seen::run`]).
    pub last_seen: last_seen::LastSeen,
    /// The key device tokens are MAC'd with (shared through the database).
    pub tokens: token::TokenKey,
    /// This server's view of which devices may have something to do and which
    /// were revoked ([`view`]), refreshed by [`view::run`].
    pub view: view::View,
    /// Per-base encodings queued automatically per release ([`encode_jobs`]).
    pub auto_encode_bases: usize,
    /// Wakes this server's encoding worker when an encoding is queued.
    pub encode_wake: tokio::sync::Notify,
    /// This server process's name in encoding leases (random).
    pub worker_id: String,
}

/// The shared context handlers get.
pub type Ctx = Arc<Context>;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory could not be created.
    #[error("creating data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Database(#[from] db::OpenError),
    /// The chunk store could not be opened.
    #[error("opening the chunk store: {0}")]
    Store(#[from] shoal_artifact::StoreError),
    /// The `--chunks` object store URL was refused.
    #[error("--chunks: {0}")]
    ChunksUrl(#[from] chunks::ChunksUrlError),
    /// The listen address could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The TLS certificate or key was refused.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Serving failed.
    #[error("serving: {0}")]
    Serve(#[source] std::io::Error),
}

/// Opens the database and chunk store of `config` into a [`Context`].
pub async fn open(config: &Config) -> Result<Ctx, ServeError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let (pool, backend) = db::open(&config.database_url(), config.max_connections).await?;
    let tokens = token::TokenKey::load(&pool)
        .await
        .map_err(db::OpenError::Connect)?;
    let store = match &config.chunks_url {
        Some(url) => Chunks::Object(chunks::ObjectChunks::open(url)?),
        None => Chunks::Dir(ChunkStore::open(&config.data_dir.join("store"))?),
    };
    Ok(Arc::new(Context {
        db: pool,
        backend,
        store,
        root: config.root.clone(),
        limits: Limits {
            device_token_ttl_ms: i64::try_from(config.device_token_ttl_s.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            upload_max_bytes: config.upload_max_bytes,
        },
        chunk_base_url: config.chunk_base_url.clone(),
        fleet: config.fleet.clone(),
        releases: release_cache::ReleaseCache::default(),
        encodings: encodings::IndexCache::default(),
        manifest_deltas: manifest_deltas::ManifestDeltas::default(),
        store_lock: tokio::sync::Mutex::new(()),
        last_seen: last_seen::LastSeen::default(),
        tokens,
        view: view::View::default(),
        auto_encode_bases: config.auto_encode_bases,
        encode_wake: tokio::sync::Notify::new(),
        worker_id: db::random_hex(8),
    }))
}

/// Binds `config.listen`, calls `on_ready` with the bound address (useful with port
/// 0), and serves until `shutdown` completes; requests in flight are finished.
pub async fn serve(
    config: &Config,
    on_ready: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Checked before anything is opened: a bad certificate is a usage error.
    let tls = config.tls.as_ref().map(tls::server_config).transpose()?;
    let ctx = open(config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;
    // Polls are answered from the view from the first one on (if this fails, they
    // ask the database until the periodic refresh succeeds).
    if let Err(e) = ctx.view.refresh(&ctx.db).await {
        tracing::warn!(error = %e, "cannot load the fleet view; polls ask the database");
    }
    tracing::info!(%addr, tls = config.tls.is_some(), backend = ?ctx.backend, chunks = %ctx.store.describe(), "serving");
    on_ready(addr);
    // Rollout timers (phase soak delays); every server runs them, under row locks.
    let timers = tokio::spawn(rollouts::run_timers(
        ctx.clone(),
        std::time::Duration::from_millis(config.timer_period_ms.max(10)),
    ));
    // Last-seen times noted by polls, written off the request path.
    let stop_seen = tokio_util::sync::CancellationToken::new();
    let seen = tokio::spawn(last_seen::run(ctx.clone(), stop_seen.clone()));
    // The fleet view, refreshed from the database's change log.
    let stop_view = tokio_util::sync::CancellationToken::new();
    let view = tokio::spawn(view::run(ctx.clone(), stop_view.clone()));
    // Per-base encodings, one at a time, claimed through the database.
    let stop_encode = tokio_util::sync::CancellationToken::new();
    let encode = tokio::spawn(encode_jobs::run(ctx.clone(), stop_encode.clone()));
    let served = match tls {
        None => axum::serve(
            listener,
            http::router(ctx.clone()).into_make_service_with_connect_info::<http::PeerAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ServeError::Serve),
        Some(tls) => {
            let listener =
                tls::Listener::new(listener, tls).map_err(|source| ServeError::Bind {
                    addr: config.listen,
                    source,
                })?;
            axum::serve(
                listener,
                http::router(ctx.clone()).into_make_service_with_connect_info::<http::PeerAddr>(),
            )
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(ServeError::Serve)
        }
    };
    timers.abort();
    let _ = timers.await;
    stop_encode.cancel();
    let _ = encode.await;
    stop_view.cancel();
    let _ = view.await;
    // What the last period noted is written before the pool closes.
    stop_seen.cancel();
    let _ = seen.await;
    ctx.db.close().await;
    served
}

#[cfg(test)]
impl Config {
    /// A server of one SQLite file and a chunk directory in `dir`, on loopback, its
    /// trust root one key (seed 1): what the unit tests open.
    pub(crate) fn for_tests(dir: &std::path::Path) -> Config {
        let key = shoal_signing::SecretKey::from_seed(&[1; 32]).public();
        Config {
            data_dir: dir.to_owned(),
            database_url: None,
            chunks_url: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            root: TrustRoot::new(1, 4_000_000_000, &[key], 1, &[key], 1).unwrap(),
            device_token_ttl_s: 3600,
            upload_max_bytes: 1 << 20,
            chunk_base_url: None,
            max_connections: 2,
            timer_period_ms: 1000,
            fleet: None,
            auto_encode_bases: 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::extract::State;
    use axum::http::StatusCode;

    use super::*;
    use crate::http::extractor::DeviceToken;

    const IDLE: &str = "aa00000000000000000000000000000000000000000000000000000000000000";
    const BUSY: &str = "bb00000000000000000000000000000000000000000000000000000000000000";

    async fn context(dir: &std::path::Path) -> Ctx {
        open(&Config::for_tests(dir)).await.expect("open")
    }

    async fn poll(ctx: &Ctx, device: &str) -> StatusCode {
        let token = ctx.tokens.issue(device, 0, db::now_ms() + 60_000);
        let claims = ctx.tokens.verify(&token, db::now_ms()).expect("verifies");
        match http::device::next(State(ctx.clone()), DeviceToken(claims)).await {
            Ok(resp) => resp.status(),
            Err(e) => e.status(),
        }
    }

    /// The point of the view: a device with nothing to do is answered from memory.
    /// With the database gone, its poll still gets 204 while the view is fresh, and
    /// asks the database (and fails) once the view is stale; a device with an open
    /// deployment always asks the database.
    #[tokio::test]
    async fn an_idle_poll_needs_no_database_until_the_view_is_stale() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ctx = context(dir.path()).await;
        Arc::get_mut(&mut ctx).expect("one owner").view =
            view::View::new(Duration::from_millis(300));
        for id in [IDLE, BUSY] {
            sqlx::query(
                "INSERT INTO devices (id, public_key, identity, status, created_ms, updated_ms) \
                 VALUES ($1, $1, '{}', 'accepted', 0, 0)",
            )
            .bind(id)
            .execute(&ctx.db)
            .await
            .unwrap();
        }
        let mut tx = ctx.db.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO deployments (id, name, release_id, target, status, rollout, created_ms, created_by) \
             VALUES ('d1', 'x', 'r', '{}', 'running', '', 0, 't')",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO deployment_devices (deployment_id, device_id, status, phase, attempts, created_ms, updated_ms) \
             VALUES ('d1', $1, 'pending', 0, 0, 0, 0)",
        )
        .bind(BUSY)
        .execute(&mut *tx)
        .await
        .unwrap();
        view::record(&mut tx, &[view::Change::Deployment("d1")])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        ctx.view.refresh(&ctx.db).await.unwrap();
        assert_eq!(poll(&ctx, IDLE).await, StatusCode::NO_CONTENT);

        ctx.db.close().await;
        assert_eq!(
            poll(&ctx, IDLE).await,
            StatusCode::NO_CONTENT,
            "from memory"
        );
        assert_eq!(
            poll(&ctx, BUSY).await,
            StatusCode::INTERNAL_SERVER_ERROR,
            "a device with an open deployment asks the database"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            poll(&ctx, IDLE).await,
            StatusCode::INTERNAL_SERVER_ERROR,
            "a stale view is not trusted"
        );
    }
}
