//! Per-base encodings made without an operator (issue 12), and the job state every
//! encoding leaves in the database (`encodings` table).
//!
//! **When.** A release uploaded is queued for encoding against the releases most
//! accepted devices run (their inventory's `release_name`/`release_version`), and a
//! deployment created against the releases its devices run; the bases are ranked by
//! devices on them, and at most `auto_encode_bases` (`shoal server
//! --auto-encode-bases N`, 0 turns it off) are queued automatically per release.
//! Bases the server does not hold, and the release itself, are skipped.
//!
//! **Who.** Every server process runs one background worker ([`run`]): one encoding
//! at a time (the same [`crate::encodings::ENCODING`] lock as an operator's request),
//! on a rayon pool of lowered CPU priority (nice 10), so polls and uploads go first.
//! A worker claims a queued row by a conditional `UPDATE` that sets its lease (only
//! one server's can win, on SQLite or PostgreSQL), renews the lease while it
//! encodes, and records the figures or the error. A lease that expired (its server
//! died or restarted) is claimed again; a failed attempt is retried after a while,
//! [`ATTEMPTS_MAX`] times; a release or base without the rootfs payload fails at
//! once. Devices that poll before an encoding is done get plain chunks.
//!
//! **Seen.** `GET /releases/{id}/encodings` and `GET /releases/{id}` list each
//! base's state, figures and saving (`shoal admin releases encodings ID`).

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;
use sqlx::{AnyPool, Row};

use crate::Ctx;
use crate::db::now_ms;
use crate::encodings::{EncodeError, Encoded};

/// How long a claim holds without renewal.
pub const LEASE_MS: i64 = 60_000;
/// How often a running encoding renews its lease.
const RENEW: Duration = Duration::from_secs(15);
/// How often an idle worker looks for work queued by another server.
const POLL: Duration = Duration::from_secs(5);
/// Attempts before an encoding is marked failed.
pub const ATTEMPTS_MAX: i64 = 3;
/// The wait before a failed attempt is retried, times the attempts so far.
const RETRY_MS: i64 = 60_000;

/// One base's encoding of a release, as the API lists it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EncodingRow {
    /// The base release's id.
    pub base: String,
    /// Its name and version (`null` if it was deleted meanwhile).
    pub base_name: Option<String>,
    /// Its version.
    pub base_version: Option<String>,
    /// queued, running, done or failed.
    pub state: String,
    /// auto (queued by the server) or operator.
    pub origin: String,
    /// Devices on the base when it was queued.
    pub devices: i64,
    /// Attempts so far.
    pub attempts: i64,
    /// The last failure.
    pub error: Option<String>,
    /// Distinct chunks of the release the base lacks (when done).
    pub chunks: Option<i64>,
    /// Of those, the ones sent as delta records.
    pub chunks_delta: Option<i64>,
    /// Their plain stored bytes.
    pub plain_bytes: Option<i64>,
    /// What a device on the base downloads for them.
    pub encoded_bytes: Option<i64>,
    /// `1 - encoded_bytes / plain_bytes`.
    pub saving: Option<f64>,
    /// When it was queued.
    pub created_ms: i64,
    /// When its state last changed.
    pub updated_ms: i64,
}

/// The encodings of release `release_id`, the most devices first.
pub async fn list(db: &AnyPool, release_id: &str) -> Result<Vec<EncodingRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT e.*, r.name AS base_name, r.version AS base_version FROM encodings e \
         LEFT JOIN releases r ON r.id = e.base_id WHERE e.release_id = $1 \
         ORDER BY e.devices DESC, e.base_id",
    )
    .bind(release_id)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|r| {
            let plain: Option<i64> = r.try_get("plain_bytes")?;
            let encoded: Option<i64> = r.try_get("encoded_bytes")?;
            Ok(EncodingRow {
                base: r.try_get("base_id")?,
                base_name: r.try_get("base_name")?,
                base_version: r.try_get("base_version")?,
                state: r.try_get("state")?,
                origin: r.try_get("origin")?,
                devices: r.try_get("devices")?,
                attempts: r.try_get("attempts")?,
                error: r.try_get("error")?,
                chunks: r.try_get("chunks")?,
                chunks_delta: r.try_get("chunks_delta")?,
                plain_bytes: plain,
                encoded_bytes: encoded,
                saving: match (plain, encoded) {
                    (Some(p), Some(e)) if p > 0 => Some(1.0 - e as f64 / p as f64),
                    _ => None,
                },
                created_ms: r.try_get("created_ms")?,
                updated_ms: r.try_get("updated_ms")?,
            })
        })
        .collect()
}

/// Queues encodings of `release_id` against the releases the `devices` run (their
/// inventories), the most devices first, up to the server's cap of automatic
/// encodings per release; returns how many were queued. Wakes this server's
/// worker.
pub async fn plan<'a>(
    ctx: &Ctx,
    release_id: &str,
    inventories: impl Iterator<Item = &'a BTreeMap<String, String>>,
) -> Result<usize, sqlx::Error> {
    let cap = ctx.auto_encode_bases;
    if cap == 0 {
        return Ok(0);
    }
    let mut on: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for inv in inventories {
        if let (Some(n), Some(v)) = (inv.get("release_name"), inv.get("release_version")) {
            *on.entry((n.as_str(), v.as_str())).or_default() += 1;
        }
    }
    let mut bases: Vec<(i64, String)> = Vec::new();
    for row in sqlx::query("SELECT id, name, version FROM releases")
        .fetch_all(&ctx.db)
        .await?
    {
        let id: String = row.try_get("id")?;
        let (n, v): (String, String) = (row.try_get("name")?, row.try_get("version")?);
        if id == release_id {
            continue;
        }
        if let Some(count) = on.get(&(n.as_str(), v.as_str())) {
            bases.push((*count, id));
        }
    }
    bases.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let queued_auto: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM encodings WHERE release_id = $1 AND origin = 'auto'",
    )
    .bind(release_id)
    .fetch_one(&ctx.db)
    .await?
    .try_get("n")?;
    let mut room = cap.saturating_sub(usize::try_from(queued_auto).unwrap_or(usize::MAX));
    let now = now_ms();
    let mut queued = 0;
    for (devices, base) in bases {
        if room == 0 {
            break;
        }
        let done = sqlx::query(
            "INSERT INTO encodings (release_id, base_id, state, origin, devices, attempts, \
             not_before_ms, created_ms, updated_ms) VALUES ($1, $2, 'queued', 'auto', $3, 0, 0, $4, $4) \
             ON CONFLICT (release_id, base_id) DO NOTHING",
        )
        .bind(release_id)
        .bind(&base)
        .bind(devices)
        .bind(now)
        .execute(&ctx.db)
        .await?;
        if done.rows_affected() == 1 {
            queued += 1;
            room -= 1;
            tracing::info!(release = %release_id, base = %base, devices, "per-base encoding queued");
        }
    }
    if queued > 0 {
        ctx.encode_wake.notify_one();
    }
    Ok(queued)
}

/// Records an encoding an operator made (`POST /releases/{id}/encodings`).
pub async fn record_operator(
    db: &AnyPool,
    release_id: &str,
    base_id: &str,
    e: &Encoded,
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO encodings (release_id, base_id, state, origin, devices, attempts, not_before_ms, \
         chunks, chunks_delta, plain_bytes, encoded_bytes, created_ms, updated_ms) \
         VALUES ($1, $2, 'done', 'operator', 0, 1, 0, $3, $4, $5, $6, $7, $7) \
         ON CONFLICT (release_id, base_id) DO UPDATE SET state = 'done', error = NULL, \
         chunks = $3, chunks_delta = $4, plain_bytes = $5, encoded_bytes = $6, updated_ms = $7",
    )
    .bind(release_id)
    .bind(base_id)
    .bind(e.chunks as i64)
    .bind(e.chunks_delta as i64)
    .bind(e.plain_bytes as i64)
    .bind(e.encoded_bytes as i64)
    .bind(now)
    .execute(db)
    .await?;
    Ok(())
}

/// The rows a worker may claim at time `$1`.
macro_rules! runnable {
    () => {
        "((state = 'queued' AND not_before_ms <= $1) OR (state = 'running' AND lease_until_ms < $1))"
    };
}

/// Claims the next encoding to run for `owner` (a queued one whose retry time
/// came, or a running one whose lease expired), the most devices first; `None`
/// when there is none. Only one claimant wins a row.
pub async fn claim(db: &AnyPool, owner: &str) -> Result<Option<(String, String)>, sqlx::Error> {
    for _ in 0..8 {
        let now = now_ms();
        let Some(row) = sqlx::query(concat!(
            "SELECT release_id, base_id FROM encodings WHERE ",
            runnable!(),
            " ORDER BY devices DESC, created_ms, release_id, base_id LIMIT 1"
        ))
        .bind(now)
        .fetch_optional(db)
        .await?
        else {
            return Ok(None);
        };
        let (r, b): (String, String) = (row.try_get("release_id")?, row.try_get("base_id")?);
        let won = sqlx::query(concat!(
            "UPDATE encodings SET state = 'running', lease_owner = $2, lease_until_ms = $3, \
             attempts = attempts + 1, updated_ms = $1 WHERE release_id = $4 AND base_id = $5 AND ",
            runnable!()
        ))
        .bind(now)
        .bind(owner)
        .bind(now + LEASE_MS)
        .bind(&r)
        .bind(&b)
        .execute(db)
        .await?;
        if won.rows_affected() == 1 {
            return Ok(Some((r, b)));
        }
        // Another server took it between the two statements: look again.
    }
    Ok(None)
}

/// Renews `owner`'s lease; `false` if it no longer holds it.
pub async fn renew(db: &AnyPool, owner: &str, r: &str, b: &str) -> Result<bool, sqlx::Error> {
    let now = now_ms();
    Ok(sqlx::query(
        "UPDATE encodings SET lease_until_ms = $1 WHERE release_id = $2 AND base_id = $3 \
         AND state = 'running' AND lease_owner = $4",
    )
    .bind(now + LEASE_MS)
    .bind(r)
    .bind(b)
    .bind(owner)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Records the outcome of `owner`'s encoding; `false` if the row is gone (the
/// release or the base was deleted meanwhile) or another server holds it.
pub async fn finish(
    db: &AnyPool,
    owner: &str,
    r: &str,
    b: &str,
    outcome: &Result<Encoded, String>,
    permanent: bool,
) -> Result<bool, sqlx::Error> {
    let now = now_ms();
    let q = match outcome {
        Ok(e) => sqlx::query(
            "UPDATE encodings SET state = 'done', error = NULL, lease_owner = NULL, lease_until_ms = NULL, \
             chunks = $1, chunks_delta = $2, plain_bytes = $3, encoded_bytes = $4, updated_ms = $5 \
             WHERE release_id = $6 AND base_id = $7 AND lease_owner = $8",
        )
        .bind(e.chunks as i64)
        .bind(e.chunks_delta as i64)
        .bind(e.plain_bytes as i64)
        .bind(e.encoded_bytes as i64),
        Err(msg) => sqlx::query(
            "UPDATE encodings SET \
             state = CASE WHEN $1 = 1 OR attempts >= $2 THEN 'failed' ELSE 'queued' END, \
             not_before_ms = $5 + attempts * $3, error = $4, lease_owner = NULL, lease_until_ms = NULL, \
             updated_ms = $5 WHERE release_id = $6 AND base_id = $7 AND lease_owner = $8",
        )
        .bind(i64::from(permanent))
        .bind(ATTEMPTS_MAX)
        .bind(RETRY_MS)
        .bind(msg.clone()),
    };
    Ok(q.bind(now)
        .bind(r)
        .bind(b)
        .bind(owner)
        .execute(db)
        .await?
        .rows_affected()
        == 1)
}

/// The rayon pool encodings run on: every core, at nice 10 (Linux sets a thread's
/// niceness on its own), so a server's requests go before its encodings.
fn low_priority_pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("shoal-encode-{i}"))
            .start_handler(|_| {
                // No pid: the calling thread, on Linux. Failing leaves it at the
                // normal priority.
                let _ = rustix::process::setpriority_process(None, 10);
            })
            .build()
            .expect("building the encoding thread pool")
    })
}

/// Encodes `r` against `b` on the low-priority pool. Blocking.
fn encode_low_priority(ctx: &Ctx, r: &str, b: &str) -> Result<Encoded, (String, bool)> {
    let load = |id: &str| {
        ctx.releases
            .load(&ctx.store, &ctx.root, id)
            .map_err(|e| (format!("loading release {id}: {e}"), false))
    };
    let (release, base) = (load(r)?, load(b)?);
    let rt = tokio::runtime::Handle::current();
    low_priority_pool().install(|| {
        let _in = rt.enter();
        crate::encodings::encode_blocking(&ctx.store, &base, &release).map_err(|e| {
            let permanent = matches!(e, EncodeError::NoPayload(_));
            (e.to_string(), permanent)
        })
    })
}

/// Runs one claimed encoding to its end: renews the lease meanwhile, records the
/// outcome, and if the release or base went meanwhile, prunes what it wrote.
async fn run_one(ctx: &Ctx, r: &str, b: &str) {
    let started = std::time::Instant::now();
    tracing::info!(release = %r, base = %b, "per-base encoding started");
    let beat = {
        let (ctx, r, b) = (ctx.clone(), r.to_owned(), b.to_owned());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW).await;
                match renew(&ctx.db, &ctx.worker_id, &r, &b).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(release = %r, base = %b, "lost the lease of a running encoding");
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "renewing an encoding's lease"),
                }
            }
        })
    };
    let outcome = {
        let (c, r, b) = (ctx.clone(), r.to_owned(), b.to_owned());
        tokio::task::spawn_blocking(move || encode_low_priority(&c, &r, &b))
            .await
            .unwrap_or_else(|e| Err((format!("the encoding panicked: {e}"), false)))
    };
    beat.abort();
    let (outcome, permanent) = match outcome {
        Ok(e) => (Ok(e), false),
        Err((m, p)) => (Err(m), p),
    };
    match &outcome {
        Ok(e) => {
            tracing::info!(release = %r, base = %b, chunks = e.chunks, chunks_delta = e.chunks_delta, plain_bytes = e.plain_bytes, encoded_bytes = e.encoded_bytes, ms = started.elapsed().as_millis() as u64, "per-base encodings stored")
        }
        Err(m) => tracing::warn!(release = %r, base = %b, error = %m, "per-base encoding failed"),
    }
    if let Ok(h) = r.parse::<shoal_artifact::manifest::ChunkId>() {
        ctx.encodings.forget(&h.0);
    }
    match finish(&ctx.db, &ctx.worker_id, r, b, &outcome, permanent).await {
        Ok(true) => {}
        Ok(false) => prune_if_gone(ctx, &[r, b]).await,
        Err(e) => tracing::warn!(error = %e, "recording an encoding's outcome"),
    }
}

/// Prunes the encodings of those of `ids` no longer listed as releases (deleted
/// while an encoding against them ran).
async fn prune_if_gone(ctx: &Ctx, ids: &[&str]) {
    for id in ids {
        let listed = sqlx::query("SELECT id FROM releases WHERE id = $1")
            .bind(*id)
            .fetch_optional(&ctx.db)
            .await;
        if !matches!(listed, Ok(None)) {
            continue;
        }
        let Ok(h) = id.parse::<shoal_artifact::manifest::ChunkId>() else {
            continue;
        };
        let c = ctx.clone();
        let pruned =
            tokio::task::spawn_blocking(move || c.store.prune_encodings_blocking(&h.0)).await;
        tracing::info!(release = %id, ?pruned, "pruned the encodings of a release deleted while encoding");
    }
}

/// The background worker: claims and runs encodings one at a time until `stop`.
pub async fn run(ctx: Ctx, stop: tokio_util::sync::CancellationToken) {
    loop {
        if stop.is_cancelled() {
            return;
        }
        match claim(&ctx.db, &ctx.worker_id).await {
            Ok(Some((r, b))) => {
                tokio::select! {
                    () = run_one(&ctx, &r, &b) => {}
                    () = stop.cancelled() => return,
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "looking for encodings to run"),
        }
        tokio::select! {
            () = ctx.encode_wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &str = "1100000000000000000000000000000000000000000000000000000000000000";
    const B1: &str = "2200000000000000000000000000000000000000000000000000000000000000";
    const B2: &str = "3300000000000000000000000000000000000000000000000000000000000000";
    const B3: &str = "4400000000000000000000000000000000000000000000000000000000000000";

    async fn context(dir: &std::path::Path, cap: usize) -> Ctx {
        let ctx = crate::open(&crate::Config {
            auto_encode_bases: cap,
            ..crate::Config::for_tests(dir)
        })
        .await
        .expect("open");
        for (id, v) in [(R, "9"), (B1, "1"), (B2, "2"), (B3, "3")] {
            sqlx::query(
                "INSERT INTO releases (id, name, version, device_types, payload_bytes, stored_bytes, chunks, created_ms) \
                 VALUES ($1, 'os', $2, '[]', 0, 0, 0, 0)",
            )
            .bind(id)
            .bind(v)
            .execute(&ctx.db)
            .await
            .unwrap();
        }
        ctx
    }

    fn inv(version: &str) -> BTreeMap<String, String> {
        [("release_name", "os"), ("release_version", version)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    #[tokio::test]
    async fn plan_queues_the_bases_most_devices_run_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path(), 2).await;
        // 3 devices on v2, 2 on v1, 1 on v3, 1 on the release itself, 1 on a
        // release the server lacks.
        let invs: Vec<_> = ["2", "2", "2", "1", "1", "3", "9", "7"]
            .iter()
            .map(|v| inv(v))
            .collect();
        assert_eq!(plan(&ctx, R, invs.iter()).await.unwrap(), 2);
        let rows = list(&ctx.db, R).await.unwrap();
        let got: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.base.as_str(),
                    r.devices,
                    r.state.as_str(),
                    r.origin.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![(B2, 3, "queued", "auto"), (B1, 2, "queued", "auto")]
        );
        // The cap holds across plans (another deployment of the same release).
        assert_eq!(plan(&ctx, R, [inv("3")].iter()).await.unwrap(), 0);
        // Off: nothing queued.
        let dir = tempfile::tempdir().unwrap();
        let off = context(dir.path(), 0).await;
        assert_eq!(plan(&off, R, invs.iter()).await.unwrap(), 0);
        assert!(list(&off.db, R).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn one_claimant_wins_and_an_expired_lease_is_claimed_again() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path(), 3).await;
        assert_eq!(plan(&ctx, R, [inv("1")].iter()).await.unwrap(), 1);
        let db = &ctx.db;
        assert_eq!(
            claim(db, "server-a").await.unwrap(),
            Some((R.to_owned(), B1.to_owned()))
        );
        // Server b, on the same database, gets nothing while a's lease holds.
        assert_eq!(claim(db, "server-b").await.unwrap(), None);
        assert!(renew(db, "server-a", R, B1).await.unwrap());
        assert!(!renew(db, "server-b", R, B1).await.unwrap());
        // a dies: its lease expires, b claims it; a can no longer renew or finish.
        sqlx::query("UPDATE encodings SET lease_until_ms = 0")
            .execute(db)
            .await
            .unwrap();
        assert_eq!(
            claim(db, "server-b").await.unwrap(),
            Some((R.to_owned(), B1.to_owned()))
        );
        assert!(!renew(db, "server-a", R, B1).await.unwrap());
        let done = Ok(Encoded {
            chunks: 10,
            chunks_delta: 8,
            plain_bytes: 1000,
            encoded_bytes: 250,
        });
        assert!(!finish(db, "server-a", R, B1, &done, false).await.unwrap());
        // A transient failure: queued again, not before the retry delay.
        let failed = Err("store unreachable".to_owned());
        assert!(finish(db, "server-b", R, B1, &failed, false).await.unwrap());
        let row = &list(db, R).await.unwrap()[0];
        assert_eq!((row.state.as_str(), row.attempts), ("queued", 2));
        assert_eq!(row.error.as_deref(), Some("store unreachable"));
        assert_eq!(claim(db, "server-a").await.unwrap(), None);
        sqlx::query("UPDATE encodings SET not_before_ms = 0")
            .execute(db)
            .await
            .unwrap();
        assert!(claim(db, "server-a").await.unwrap().is_some());
        assert!(finish(db, "server-a", R, B1, &done, false).await.unwrap());
        let row = &list(db, R).await.unwrap()[0];
        assert_eq!(row.state, "done");
        assert_eq!((row.chunks, row.encoded_bytes), (Some(10), Some(250)));
        assert_eq!(row.saving, Some(0.75));
        assert_eq!(claim(db, "server-a").await.unwrap(), None);
    }

    #[tokio::test]
    async fn permanent_and_repeated_failures_end_failed() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path(), 3).await;
        plan(&ctx, R, [inv("1"), inv("2")].iter()).await.unwrap();
        let db = &ctx.db;
        let (r, b) = claim(db, "a").await.unwrap().unwrap();
        let no = Err("no rootfs-image payload".to_owned());
        assert!(finish(db, "a", &r, &b, &no, true).await.unwrap());
        let (r2, b2) = claim(db, "a").await.unwrap().unwrap();
        assert_ne!((&r2, &b2), (&r, &b));
        let io = Err("io".to_owned());
        assert!(finish(db, "a", &r2, &b2, &io, false).await.unwrap());
        for _ in 1..ATTEMPTS_MAX {
            sqlx::query("UPDATE encodings SET not_before_ms = 0")
                .execute(db)
                .await
                .unwrap();
            assert_eq!(
                claim(db, "a").await.unwrap(),
                Some((r2.clone(), b2.clone()))
            );
            assert!(finish(db, "a", &r2, &b2, &io, false).await.unwrap());
        }
        sqlx::query("UPDATE encodings SET not_before_ms = 0")
            .execute(db)
            .await
            .unwrap();
        assert_eq!(claim(db, "a").await.unwrap(), None);
        let states: Vec<_> = list(db, R)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.base, r.state, r.attempts))
            .collect();
        assert_eq!(
            states,
            vec![
                (B1.to_owned(), "failed".to_owned(), 1),
                (B2.to_owned(), "failed".to_owned(), ATTEMPTS_MAX)
            ]
        );
    }
}
