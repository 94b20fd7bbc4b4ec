//! The database: one sqlx `Any` pool over SQLite (embedded default) or PostgreSQL
//! (scale-out), migrated at start. Both backends run the same queries (`$N`
//! placeholders, `TEXT` and 64-bit integers only; times are Unix milliseconds), and
//! each has its own migration files under `migrations/` because their DDL differs.
//! Migrations take the database's lock, so several servers can start on one
//! PostgreSQL at once.

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor, SqlSafeStr};

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, in a file.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL is neither `sqlite:` nor `postgres://` / `postgresql://`.
    #[error("unsupported database url (use sqlite:PATH or postgres://...): {0}")]
    UnsupportedUrl(String),
    /// Connecting failed.
    #[error("connecting to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// A migration failed.
    #[error("migrating the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl Backend {
    /// The backend a database URL names.
    pub fn of_url(url: &str) -> Result<Backend, OpenError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(OpenError::UnsupportedUrl(redact(url)))
        }
    }
}

/// A database URL with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The SQLite URL of the database file in a data directory.
pub fn sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", data_dir.join("shoal.db").display())
}

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../migrations/sqlite/0001_initial.sql"),
    ),
    (
        2,
        "device reports",
        include_str!("../migrations/sqlite/0002_device_reports.sql"),
    ),
    (
        3,
        "revoked keys",
        include_str!("../migrations/sqlite/0003_revoked_keys.sql"),
    ),
    (
        4,
        "lan peers",
        include_str!("../migrations/sqlite/0004_lan_peers.sql"),
    ),
    (
        5,
        "poll view",
        include_str!("../migrations/sqlite/0005_poll_view.sql"),
    ),
    (
        6,
        "encodings",
        include_str!("../migrations/sqlite/0006_encodings.sql"),
    ),
];

const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        "device reports",
        include_str!("../migrations/postgres/0002_device_reports.sql"),
    ),
    (
        3,
        "revoked keys",
        include_str!("../migrations/postgres/0003_revoked_keys.sql"),
    ),
    (
        4,
        "lan peers",
        include_str!("../migrations/postgres/0004_lan_peers.sql"),
    ),
    (
        5,
        "poll view",
        include_str!("../migrations/postgres/0005_poll_view.sql"),
    ),
    (
        6,
        "encodings",
        include_str!("../migrations/postgres/0006_encodings.sql"),
    ),
];

fn migrator(backend: Backend) -> Migrator {
    let list = match backend {
        Backend::Sqlite => SQLITE_MIGRATIONS,
        Backend::Postgres => POSTGRES_MIGRATIONS,
    };
    Migrator::with_migrations(
        list.iter()
            .map(|(v, d, sql)| {
                Migration::new(
                    *v,
                    Cow::Borrowed(*d),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// Opens (creating a SQLite file if needed) and migrates the database at `url`.
pub async fn open(url: &str, max_connections: u32) -> Result<(AnyPool, Backend), OpenError> {
    sqlx::any::install_default_drivers();
    let backend = Backend::of_url(url)?;
    let mut options = AnyPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        // No ping before each use: a poll is one query, and a ping per acquire
        // doubled its round trips to PostgreSQL. A connection the database dropped
        // fails its next query once and is discarded by the pool.
        .test_before_acquire(false);
    if backend == Backend::Sqlite {
        // WAL lets readers go on while one writer writes; foreign keys are off by
        // default in SQLite; a busy writer is waited for, not failed.
        options = options.after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("PRAGMA journal_mode = WAL").await?;
                conn.execute("PRAGMA synchronous = NORMAL").await?;
                conn.execute("PRAGMA foreign_keys = ON").await?;
                conn.execute("PRAGMA busy_timeout = 10000").await?;
                Ok(())
            })
        });
    }
    let pool = options.connect(url).await.map_err(OpenError::Connect)?;
    migrator(backend).run(&pool).await?;
    Ok((pool, backend))
}

/// Checks a URL's form without connecting (for usage errors at start).
pub fn check_url(url: &str) -> Result<(), OpenError> {
    Backend::of_url(url).map(|_| ())?;
    sqlx::any::AnyConnectOptions::from_str(url)
        .map(|_| ())
        .map_err(OpenError::Connect)
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `n` random bytes from the operating system, as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).expect("the operating system's random number generator failed");
    hex::encode(buf)
}

/// The stored form of a bearer token: its BLAKE3 hash in hex. Tokens are random, so
/// an unsalted fast hash is enough to keep a database leak from handing them out.
pub fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}
