//! Each server's in-memory view of the fleet, so that the common poll (nothing to
//! do) is answered without a database round trip.
//!
//! A poll carries a token the server verifies itself ([`crate::token`]). What is
//! left to know is whether the device was revoked since its token was issued, and
//! whether it may have a deployment to run. The view holds both, per server:
//!
//! - **epochs**: the token epoch of every device ever rejected or decommissioned
//!   (`device_epochs`). A token whose epoch is lower is refused.
//! - **open**: the devices that may have an open deployment (an entry pending,
//!   downloading, installing or rebooting in a running, paused or halted
//!   deployment). A poll of any other device is answered 204 from memory; a poll of
//!   a device in the set goes to the database, which decides as before (phases,
//!   pauses, aborts). The set may hold devices whose deployment ended: the database
//!   path then finds nothing open and takes the device out ([`View::settle`]).
//!
//! **Refresh.** Every transaction that adds to either (a revocation, a deployment
//! created, an operator command on a deployment) bumps the single generation row
//! last, just before it commits, and logs what it changed under that generation
//! (`view_changes`, see the migration `0005_poll_view.sql`). Because the row is
//! locked until commit, generations are handed out in commit order and none is
//! skipped, so a server that has applied generation G has seen every change of
//! generation ≤ G. Every [`REFRESH_PERIOD`] each server reads the generation (one
//! indexed read of one row) and, when it moved, the logged changes, and re-reads
//! only the devices and deployments named; a gap (the log is pruned after
//! [`CHANGES_KEPT_MS`]) or a fresh start reloads the whole view. The server that
//! made a change refreshes at once after its commit, so its own next poll sees it.
//!
//! **Staleness bound.** A poll is answered from the view only if the view's last
//! successful refresh *started* less than [`STALE_MAX`] ago; otherwise it goes to
//! the database like any poll of an open device. A change committed at time t is
//! therefore obeyed by every server's polls from t + [`STALE_MAX`] on (in practice
//! within one [`REFRESH_PERIOD`] plus a query), whatever the load: a server whose
//! refresh falls behind answers from the database instead. Aborts take effect at
//! once (the aborted devices are in the open set, so their polls ask the database;
//! their manifest, chunk and status requests always check it), and every other
//! device endpoint checks the device's status and epoch in the database, so a
//! decommissioned device is refused there at once and by polls within the bound.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use sqlx::{AnyConnection, AnyPool, Row};

use crate::db::now_ms;

/// How often each server checks the generation.
pub const REFRESH_PERIOD: Duration = Duration::from_millis(250);
/// The oldest view a poll may be answered from (measured from when its refresh
/// started).
pub const STALE_MAX: Duration = Duration::from_secs(2);
/// How long logged changes are kept; a server further behind reloads everything.
pub const CHANGES_KEPT_MS: i64 = 3_600_000;
/// How often the change log is pruned (by whichever server's refresh comes by).
const PRUNE_PERIOD: Duration = Duration::from_secs(60);

/// SQL: a `deployment_devices dd` row joined to its `deployments d` is open (a
/// macro, so queries stay static strings through `concat!`).
macro_rules! open_sql {
    () => {
        "d.status IN ('running', 'paused', 'halted') \
         AND dd.status IN ('pending', 'downloading', 'installing', 'rebooting')"
    };
}

/// A device id (64 lowercase hex digits) as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey(pub [u8; 32]);

impl DeviceKey {
    /// Parses a device id; `None` unless it is 64 lowercase hex digits.
    pub fn parse(id: &str) -> Option<DeviceKey> {
        if id.len() != 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(id, &mut out).ok()?;
        Some(DeviceKey(out))
    }
}

/// What the view says about a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The token's epoch is older than the device's: revoked.
    Refused,
    /// Nothing to do: 204, no database.
    Idle,
    /// Ask the database (the device may have a deployment, or the view is stale).
    /// `generation` is the view's generation now, for [`View::settle`].
    AskDatabase {
        /// The generation the view had applied.
        generation: i64,
    },
}

/// A change to log with [`record`].
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// A device's epoch or deployments changed.
    Device(&'a str),
    /// A deployment's devices may have something new to do.
    Deployment(&'a str),
}

/// What a refresh did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refreshed {
    /// The generation had not moved.
    Unchanged,
    /// The logged changes were applied.
    Changes(usize),
    /// Everything was reloaded (first refresh, or a gap in the log).
    Reloaded,
}

#[derive(Debug, Default)]
struct State {
    /// The generation applied; `None` before the first load.
    generation: Option<i64>,
    /// When the last successful refresh started.
    fresh_at: Option<Instant>,
    open: HashSet<DeviceKey>,
    epochs: HashMap<DeviceKey, i64>,
}

/// One server's view (see the module doc).
#[derive(Debug)]
pub struct View {
    state: RwLock<State>,
    /// One refresh at a time (the periodic task and a handler after its commit).
    refreshing: tokio::sync::Mutex<Option<Instant>>,
    stale_max: Duration,
}

impl Default for View {
    fn default() -> View {
        View::new(STALE_MAX)
    }
}

impl View {
    /// An empty view (every poll asks the database until the first refresh) whose
    /// answers go stale after `stale_max`.
    pub fn new(stale_max: Duration) -> View {
        View {
            state: RwLock::new(State::default()),
            refreshing: tokio::sync::Mutex::new(None),
            stale_max,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The verdict on a poll by `device` with a token of `epoch`, at `now`.
    pub fn verdict(&self, device: &DeviceKey, epoch: i64, now: Instant) -> Verdict {
        let s = self.read();
        let Some(generation) = s.generation else {
            return Verdict::AskDatabase { generation: -1 };
        };
        if s.epochs.get(device).is_some_and(|e| *e > epoch) {
            return Verdict::Refused;
        }
        let fresh = s
            .fresh_at
            .is_some_and(|at| now.saturating_duration_since(at) <= self.stale_max);
        if !fresh || s.open.contains(device) {
            return Verdict::AskDatabase { generation };
        }
        Verdict::Idle
    }

    /// The database found no open deployment of `device` after the view said
    /// [`Verdict::AskDatabase`] with `generation`: the device leaves the open set, unless
    /// the view applied changes since (one of them may have added it after the
    /// database was read; a change the view has not applied yet will add it again).
    pub fn settle(&self, device: &DeviceKey, generation: i64) {
        let mut s = self.write();
        if s.generation == Some(generation) {
            s.open.remove(device);
        }
    }

    /// The generation applied, if any.
    pub fn generation(&self) -> Option<i64> {
        self.read().generation
    }

    /// Devices in the open set.
    pub fn open_devices(&self) -> usize {
        self.read().open.len()
    }

    /// Brings the view up to the database's generation (see the module doc).
    pub async fn refresh(&self, db: &AnyPool) -> Result<Refreshed, sqlx::Error> {
        let mut last_prune = self.refreshing.lock().await;
        let started = Instant::now();
        let generation: i64 = sqlx::query("SELECT generation FROM view_generation WHERE id = 1")
            .fetch_one(db)
            .await?
            .try_get("generation")?;
        let applied = self.read().generation;
        let outcome = match applied {
            Some(applied) if applied >= generation => {
                self.write().fresh_at = Some(started);
                Refreshed::Unchanged
            }
            Some(applied) => match self.apply_changes(db, applied, generation, started).await? {
                Some(n) => Refreshed::Changes(n),
                None => {
                    self.reload(db, generation, started).await?;
                    Refreshed::Reloaded
                }
            },
            None => {
                self.reload(db, generation, started).await?;
                Refreshed::Reloaded
            }
        };
        if last_prune.is_none_or(|at| started.duration_since(at) >= PRUNE_PERIOD) {
            *last_prune = Some(started);
            sqlx::query("DELETE FROM view_changes WHERE at_ms < $1")
                .bind(now_ms().saturating_sub(CHANGES_KEPT_MS))
                .execute(db)
                .await?;
        }
        Ok(outcome)
    }

    /// Applies the logged changes of generations `(applied, generation]`; `None` if some
    /// are no longer logged (then everything must be reloaded).
    async fn apply_changes(
        &self,
        db: &AnyPool,
        applied: i64,
        generation: i64,
        started: Instant,
    ) -> Result<Option<usize>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT generation, device_id, deployment_id FROM view_changes \
             WHERE generation > $1 AND generation <= $2 ORDER BY generation",
        )
        .bind(applied)
        .bind(generation)
        .fetch_all(db)
        .await?;
        let mut gens = HashSet::new();
        let mut devices = Vec::new();
        let mut deployments = Vec::new();
        for row in &rows {
            gens.insert(row.try_get::<i64, _>("generation")?);
            if let Some(d) = row.try_get::<Option<String>, _>("device_id")? {
                devices.push(d);
            }
            if let Some(d) = row.try_get::<Option<String>, _>("deployment_id")? {
                deployments.push(d);
            }
        }
        if i64::try_from(gens.len()).ok() != Some(generation - applied) {
            return Ok(None);
        }
        devices.sort_unstable();
        devices.dedup();
        deployments.sort_unstable();
        deployments.dedup();
        // Read after the generation: at least as new as every change applied.
        let mut device_states = Vec::with_capacity(devices.len());
        for id in &devices {
            let Some(key) = DeviceKey::parse(id) else {
                continue;
            };
            let row = sqlx::query(concat!(
                "SELECT (SELECT COALESCE(MAX(epoch), 0) FROM device_epochs WHERE device_id = $1) AS epoch, \
                 (SELECT COUNT(*) FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id \
                 WHERE dd.device_id = $1 AND ",
                open_sql!(),
                ") AS open"
            ))
            .bind(id)
            .fetch_one(db)
            .await?;
            let epoch: i64 = row.try_get("epoch")?;
            let open: i64 = row.try_get("open")?;
            device_states.push((key, epoch, open > 0));
        }
        let mut opened = Vec::new();
        for id in &deployments {
            for row in sqlx::query(concat!(
                "SELECT dd.device_id FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id \
                 WHERE dd.deployment_id = $1 AND ",
                open_sql!()
            ))
            .bind(id)
            .fetch_all(db)
            .await?
            {
                if let Some(key) = DeviceKey::parse(&row.try_get::<String, _>("device_id")?) {
                    opened.push(key);
                }
            }
        }
        let mut s = self.write();
        for (key, epoch, open) in device_states {
            if epoch > 0 {
                let e = s.epochs.entry(key).or_insert(0);
                *e = (*e).max(epoch);
            }
            if open {
                s.open.insert(key);
            } else {
                s.open.remove(&key);
            }
        }
        s.open.extend(opened);
        s.generation = Some(generation);
        s.fresh_at = Some(started);
        Ok(Some(gens.len()))
    }

    /// Reloads the whole view as of generation `generation` (read before).
    async fn reload(
        &self,
        db: &AnyPool,
        generation: i64,
        started: Instant,
    ) -> Result<(), sqlx::Error> {
        let mut epochs = HashMap::new();
        for row in sqlx::query("SELECT device_id, epoch FROM device_epochs")
            .fetch_all(db)
            .await?
        {
            if let Some(key) = DeviceKey::parse(&row.try_get::<String, _>("device_id")?) {
                epochs.insert(key, row.try_get::<i64, _>("epoch")?);
            }
        }
        let mut open = HashSet::new();
        for row in sqlx::query(concat!(
            "SELECT DISTINCT dd.device_id FROM deployment_devices dd \
             JOIN deployments d ON d.id = dd.deployment_id WHERE ",
            open_sql!()
        ))
        .fetch_all(db)
        .await?
        {
            if let Some(key) = DeviceKey::parse(&row.try_get::<String, _>("device_id")?) {
                open.insert(key);
            }
        }
        let mut s = self.write();
        s.epochs = epochs;
        s.open = open;
        s.generation = Some(generation);
        s.fresh_at = Some(started);
        Ok(())
    }
}

/// Logs `changes` under a new generation. Call it last in the transaction, just
/// before the commit: it holds the generation row's lock until then, and a
/// transaction holding it must wait for no other lock (no deadlock).
pub async fn record(conn: &mut AnyConnection, changes: &[Change<'_>]) -> Result<i64, sqlx::Error> {
    let generation: i64 = sqlx::query(
        "UPDATE view_generation SET generation = generation + 1 WHERE id = 1 RETURNING generation",
    )
    .fetch_one(&mut *conn)
    .await?
    .try_get("generation")?;
    let now = now_ms();
    for change in changes {
        let (device, deployment) = match change {
            Change::Device(d) => (Some(*d), None),
            Change::Deployment(d) => (None, Some(*d)),
        };
        sqlx::query(
            "INSERT INTO view_changes (generation, at_ms, device_id, deployment_id) VALUES ($1, $2, $3, $4)",
        )
        .bind(generation)
        .bind(now)
        .bind(device)
        .bind(deployment)
        .execute(&mut *conn)
        .await?;
    }
    Ok(generation)
}

/// Bumps `device`'s token epoch (every token issued before is refused) and logs
/// it; last in the transaction, like [`record`].
pub async fn revoke(conn: &mut AnyConnection, device: &str) -> Result<i64, sqlx::Error> {
    let epoch: i64 = sqlx::query(
        "INSERT INTO device_epochs (device_id, epoch) VALUES ($1, 1) \
         ON CONFLICT (device_id) DO UPDATE SET epoch = device_epochs.epoch + 1 RETURNING epoch",
    )
    .bind(device)
    .fetch_one(&mut *conn)
    .await?
    .try_get("epoch")?;
    record(conn, &[Change::Device(device)]).await?;
    Ok(epoch)
}

/// Refreshes `ctx`'s view every [`REFRESH_PERIOD`] until `stop` is cancelled.
pub async fn run(ctx: crate::Ctx, stop: tokio_util::sync::CancellationToken) {
    let mut interval = tokio::time::interval(REFRESH_PERIOD);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = stop.cancelled() => return,
        }
        match ctx.view.refresh(&ctx.db).await {
            Ok(r) => {
                if failing {
                    tracing::info!("fleet view refreshed again");
                    failing = false;
                }
                if r != Refreshed::Unchanged {
                    tracing::debug!(outcome = ?r, generation = ?ctx.view.generation(), open = ctx.view.open_devices(), "fleet view refreshed");
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot refresh the fleet view; polls ask the database once it is stale");
                }
                failing = true;
            }
        }
    }
}

/// After a commit that logged changes: refreshes `ctx`'s view so this server's
/// next poll sees them (other servers do within the staleness bound).
pub async fn refresh_after_commit(ctx: &crate::Ctx) {
    if let Err(e) = ctx.view.refresh(&ctx.db).await {
        tracing::warn!(error = %e, "cannot refresh the fleet view after a change");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aa00000000000000000000000000000000000000000000000000000000000000";
    const B: &str = "bb00000000000000000000000000000000000000000000000000000000000000";

    async fn db() -> (tempfile::TempDir, AnyPool) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, _) = crate::db::open(&crate::db::sqlite_url(dir.path()), 2)
            .await
            .expect("open");
        (dir, db)
    }

    fn key(id: &str) -> DeviceKey {
        DeviceKey::parse(id).unwrap()
    }

    /// A running deployment `dep` with `device` pending in it, logged.
    async fn deploy(db: &AnyPool, dep: &str, device: &str) {
        let mut tx = db.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO deployments (id, name, release_id, target, status, rollout, created_ms, created_by) \
             VALUES ($1, 'x', 'r', '{}', 'running', '', 0, 't')",
        )
        .bind(dep)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO deployment_devices (deployment_id, device_id, status, phase, attempts, created_ms, updated_ms) \
             VALUES ($1, $2, 'pending', 0, 0, 0, 0)",
        )
        .bind(dep)
        .bind(device)
        .execute(&mut *tx)
        .await
        .unwrap();
        record(&mut tx, &[Change::Deployment(dep)]).await.unwrap();
        tx.commit().await.unwrap();
    }

    #[test]
    fn device_keys_are_64_lowercase_hex_digits() {
        assert_eq!(key(A).0[0], 0xaa);
        assert_eq!(DeviceKey::parse(&A.to_uppercase()), None);
        assert_eq!(DeviceKey::parse(&A[..63]), None);
        assert_eq!(DeviceKey::parse(&format!("{A}0")), None);
        assert_eq!(DeviceKey::parse(&A.replace('a', "g")), None);
    }

    #[tokio::test]
    async fn an_unloaded_or_stale_view_sends_polls_to_the_database() {
        let (_dir, db) = db().await;
        let view = View::new(Duration::from_millis(100));
        assert_eq!(
            view.verdict(&key(A), 0, Instant::now()),
            Verdict::AskDatabase { generation: -1 }
        );
        assert_eq!(view.refresh(&db).await.unwrap(), Refreshed::Reloaded);
        let now = Instant::now();
        assert_eq!(view.verdict(&key(A), 0, now), Verdict::Idle);
        assert_eq!(
            view.verdict(&key(A), 0, now + Duration::from_millis(150)),
            Verdict::AskDatabase { generation: 0 },
            "stale: the database decides"
        );
        assert_eq!(view.refresh(&db).await.unwrap(), Refreshed::Unchanged);
        assert_eq!(view.verdict(&key(A), 0, Instant::now()), Verdict::Idle);
    }

    #[tokio::test]
    async fn deployments_and_revocations_reach_a_second_view_through_the_log() {
        let (_dir, db) = db().await;
        // Two servers' views of one database.
        let (one, two) = (View::default(), View::default());
        one.refresh(&db).await.unwrap();
        two.refresh(&db).await.unwrap();
        deploy(&db, "d1", A).await;
        let mut tx = db.begin().await.unwrap();
        assert_eq!(revoke(&mut tx, B).await.unwrap(), 1);
        tx.commit().await.unwrap();
        assert_eq!(
            two.verdict(&key(A), 0, Instant::now()),
            Verdict::Idle,
            "not yet refreshed"
        );
        assert_eq!(two.refresh(&db).await.unwrap(), Refreshed::Changes(2));
        assert_eq!(
            two.verdict(&key(A), 0, Instant::now()),
            Verdict::AskDatabase { generation: 2 }
        );
        assert_eq!(two.verdict(&key(B), 0, Instant::now()), Verdict::Refused);
        assert_eq!(
            two.verdict(&key(B), 1, Instant::now()),
            Verdict::Idle,
            "a token issued after"
        );
        assert_eq!(one.refresh(&db).await.unwrap(), Refreshed::Changes(2));
        assert_eq!(one.verdict(&key(B), 0, Instant::now()), Verdict::Refused);
    }

    #[tokio::test]
    async fn a_gap_in_the_log_reloads_the_whole_view() {
        let (_dir, db) = db().await;
        let view = View::default();
        view.refresh(&db).await.unwrap();
        deploy(&db, "d1", A).await;
        deploy(&db, "d2", B).await;
        // Generation 1's rows were pruned.
        sqlx::query("DELETE FROM view_changes WHERE generation = 1")
            .execute(&db)
            .await
            .unwrap();
        assert_eq!(view.refresh(&db).await.unwrap(), Refreshed::Reloaded);
        assert_eq!(
            view.verdict(&key(A), 0, Instant::now()),
            Verdict::AskDatabase { generation: 2 }
        );
        assert_eq!(
            view.verdict(&key(B), 0, Instant::now()),
            Verdict::AskDatabase { generation: 2 }
        );
    }

    #[tokio::test]
    async fn settling_a_device_never_drops_a_change_applied_meanwhile() {
        let (_dir, db) = db().await;
        let view = View::default();
        deploy(&db, "d1", A).await;
        view.refresh(&db).await.unwrap();
        let Verdict::AskDatabase { generation } = view.verdict(&key(A), 0, Instant::now()) else {
            panic!("A has a deployment");
        };
        // The database said nothing open (say d1 ended), then a new deployment of
        // A was applied before the poll settled: A stays.
        deploy(&db, "d2", A).await;
        view.refresh(&db).await.unwrap();
        view.settle(&key(A), generation);
        assert!(matches!(
            view.verdict(&key(A), 0, Instant::now()),
            Verdict::AskDatabase { .. }
        ));
        // With no change in between it goes.
        let Verdict::AskDatabase { generation } = view.verdict(&key(A), 0, Instant::now()) else {
            unreachable!()
        };
        view.settle(&key(A), generation);
        assert_eq!(view.verdict(&key(A), 0, Instant::now()), Verdict::Idle);
    }

    #[tokio::test]
    async fn generations_are_contiguous_and_a_rolled_back_change_leaves_none() {
        let (_dir, db) = db().await;
        let mut tx = db.begin().await.unwrap();
        assert_eq!(record(&mut tx, &[Change::Device(A)]).await.unwrap(), 1);
        tx.rollback().await.unwrap();
        let mut tx = db.begin().await.unwrap();
        assert_eq!(
            record(&mut tx, &[Change::Device(A), Change::Device(B)])
                .await
                .unwrap(),
            1
        );
        tx.commit().await.unwrap();
        let view = View::default();
        view.refresh(&db).await.unwrap();
        assert_eq!(view.generation(), Some(1));
    }
}
