//! When each device was last seen, written in batches off the request path.
//!
//! A poll (`GET /deployments/next`) used to run `UPDATE devices SET last_seen_ms`
//! itself. Even when the row was fresh and matched nothing, on SQLite the
//! statement takes the database's single write lock, so every poll queued behind
//! every other poll's write (and behind SQLite's busy-handler sleeps); on
//! PostgreSQL each stale row was a commit, a WAL flush, on the poll's own time.
//! Now the poll only notes the device here, and only when this server has not
//! noted (or, at authentication, written) it for [`LAST_SEEN_RESOLUTION_MS`]: a
//! poll answered from the [`crate::view`] reads nothing from the database; one task
//! ([`run`]) writes the noted devices every [`FLUSH_PERIOD`] in a few
//! transactions. `last_seen_ms` may therefore lag by up to the resolution plus the
//! flush period, and what a server noted in its last period is lost if the process
//! is killed (a clean stop flushes it). Each server process has its own; several
//! servers on one database each write the devices they saw, and a write never moves
//! `last_seen_ms` backwards.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::AnyPool;

use crate::view::DeviceKey;

/// How stale a device's `last_seen_ms` may get before a poll notes it again.
pub const LAST_SEEN_RESOLUTION_MS: i64 = 60_000;
/// How often noted devices are written.
pub const FLUSH_PERIOD: Duration = Duration::from_secs(2);
/// Devices written per transaction (a long one would hold SQLite's write lock).
const ROWS_PER_TRANSACTION: usize = 256;

/// Devices seen since the last write, with when.
#[derive(Debug, Default)]
pub struct LastSeen {
    pending: Mutex<HashMap<String, i64>>,
    /// When this server last noted or wrote each device (within the resolution;
    /// older entries are dropped at each flush, so this holds the devices seen in
    /// the last minute or so).
    recent: Mutex<HashMap<DeviceKey, i64>>,
}

/// Whether a `last_seen_ms` read at `now_ms` is stale enough to note again.
pub fn is_stale(last_seen_ms: Option<i64>, now_ms: i64) -> bool {
    last_seen_ms.is_none_or(|t| t < now_ms.saturating_sub(LAST_SEEN_RESOLUTION_MS))
}

impl LastSeen {
    /// A request by `device` (`key`) at `now_ms`: noted for the next write unless
    /// this server noted or wrote it less than [`LAST_SEEN_RESOLUTION_MS`] ago.
    /// Returns whether it was noted.
    pub fn seen(&self, device: &str, key: DeviceKey, now_ms: i64) -> bool {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            let last = recent.get(&key).copied();
            if !is_stale(last, now_ms) {
                return false;
            }
            recent.insert(key, now_ms);
        }
        self.note(device, now_ms);
        true
    }

    /// `key`'s `last_seen_ms` was written at `at_ms` by the request itself (an
    /// auth request): polls need not note it for a while.
    pub fn written(&self, key: DeviceKey, at_ms: i64) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let t = recent.entry(key).or_insert(at_ms);
        *t = (*t).max(at_ms);
    }

    /// Notes that `device` was seen at `at_ms` (the latest time wins).
    pub fn note(&self, device: &str, at_ms: i64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.get_mut(device) {
            Some(t) => *t = (*t).max(at_ms),
            None => {
                pending.insert(device.to_owned(), at_ms);
            }
        }
    }

    /// Devices noted and not yet written.
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Writes every noted device; returns how many rows were written. On an
    /// error the devices not written are noted again for the next flush.
    pub async fn flush(&self, db: &AnyPool) -> Result<usize, sqlx::Error> {
        {
            let horizon = crate::db::now_ms().saturating_sub(LAST_SEEN_RESOLUTION_MS);
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            recent.retain(|_, t| *t >= horizon);
        }
        let batch: Vec<(String, i64)> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.is_empty() {
                return Ok(0);
            }
            let mut batch: Vec<(String, i64)> = pending.drain().collect();
            // One order for every writer: two servers never lock rows crosswise.
            batch.sort_unstable();
            batch
        };
        let mut written = 0;
        for (n, part) in batch.chunks(ROWS_PER_TRANSACTION).enumerate() {
            if let Err(e) = write(db, part).await {
                for (device, at) in &batch[n * ROWS_PER_TRANSACTION..] {
                    self.note(device, *at);
                }
                return Err(e);
            }
            written += part.len();
        }
        Ok(written)
    }
}

/// Writes one transaction of `rows`.
async fn write(db: &AnyPool, rows: &[(String, i64)]) -> Result<(), sqlx::Error> {
    let mut tx = db.begin().await?;
    for (device, at) in rows {
        sqlx::query(
            "UPDATE devices SET last_seen_ms = $2 WHERE id = $1 \
             AND (last_seen_ms IS NULL OR last_seen_ms < $2)",
        )
        .bind(device)
        .bind(*at)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Writes the devices noted in `ctx` every [`FLUSH_PERIOD`], and once more when
/// `stop` is cancelled (then it returns).
pub async fn run(ctx: crate::Ctx, stop: tokio_util::sync::CancellationToken) {
    let mut interval = tokio::time::interval(FLUSH_PERIOD);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = interval.tick() => false,
            () = stop.cancelled() => true,
        };
        match ctx.last_seen.flush(&ctx.db).await {
            Ok(0) => {}
            Ok(rows) => tracing::debug!(rows, "last seen times written"),
            Err(e) if last => tracing::warn!(
                error = %e,
                devices = ctx.last_seen.pending(),
                "cannot write last seen times at shutdown"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot write last seen times; retrying"),
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    async fn seen(db: &AnyPool, id: &str) -> Option<i64> {
        sqlx::query("SELECT last_seen_ms FROM devices WHERE id = $1")
            .bind(id)
            .fetch_one(db)
            .await
            .expect("device row")
            .try_get("last_seen_ms")
            .expect("last_seen_ms")
    }

    #[test]
    fn staleness_follows_the_resolution() {
        assert!(is_stale(None, 0));
        assert!(is_stale(Some(1_000), 1_000 + LAST_SEEN_RESOLUTION_MS + 1));
        assert!(!is_stale(Some(1_000), 1_000 + LAST_SEEN_RESOLUTION_MS));
        assert!(!is_stale(Some(5_000), 1_000));
    }

    #[test]
    fn a_device_is_noted_once_per_resolution() {
        let last = LastSeen::default();
        let key = DeviceKey([7; 32]);
        assert!(last.seen("d", key, 1_000));
        assert!(!last.seen("d", key, 1_000 + LAST_SEEN_RESOLUTION_MS));
        assert!(last.seen("d", key, 1_001 + LAST_SEEN_RESOLUTION_MS));
        assert_eq!(last.pending(), 1);
        // Written by an auth request: not noted again within the resolution.
        let other = DeviceKey([8; 32]);
        last.written(other, 5_000);
        assert!(!last.seen("e", other, 5_000 + LAST_SEEN_RESOLUTION_MS));
        assert_eq!(last.pending(), 1);
    }

    #[tokio::test]
    async fn noted_devices_are_written_in_one_flush_and_never_backwards() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, _) = crate::db::open(&crate::db::sqlite_url(dir.path()), 2)
            .await
            .expect("open");
        for (id, seen_ms) in [("a", None), ("b", Some(9_000i64))] {
            sqlx::query(
                "INSERT INTO devices (id, public_key, identity, status, created_ms, updated_ms, last_seen_ms) \
                 VALUES ($1, $1, '{}', 'accepted', 0, 0, $2)",
            )
            .bind(id)
            .bind(seen_ms)
            .execute(&db)
            .await
            .expect("insert");
        }
        let last = LastSeen::default();
        // Nothing is written until the flush; the latest note of a device wins.
        last.note("a", 5_000);
        last.note("a", 4_000);
        last.note("b", 7_000);
        assert_eq!(last.pending(), 2);
        assert_eq!(seen(&db, "a").await, None);
        assert_eq!(last.flush(&db).await.expect("flush"), 2);
        assert_eq!(last.pending(), 0);
        assert_eq!(seen(&db, "a").await, Some(5_000));
        // An older time than the row's (another server wrote later) is not written.
        assert_eq!(seen(&db, "b").await, Some(9_000));
        assert_eq!(last.flush(&db).await.expect("empty flush"), 0);
    }

    #[tokio::test]
    async fn a_failed_flush_keeps_the_devices_for_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, _) = crate::db::open(&crate::db::sqlite_url(dir.path()), 1)
            .await
            .expect("open");
        let last = LastSeen::default();
        last.note("a", 5_000);
        db.close().await;
        assert!(last.flush(&db).await.is_err());
        assert_eq!(last.pending(), 1, "kept for the next flush");
    }
}
