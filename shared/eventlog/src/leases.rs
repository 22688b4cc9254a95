//! Shard leases: each shard of a service's background work (a log consumer,
//! the sweep, the pusher, rescore pages) has one owner at a time, so adding
//! replicas adds capacity instead of repeating the work.
//!
//! # How
//!
//! A lease is a row of `shard_leases` in the service's own PostgreSQL
//! schema: (group, shard, owner, fencing token, expiry). Advisory locks were
//! not chosen: they belong to one database session, which a connection pool
//! does not pin, and they carry no token that a late writer could be checked
//! against.
//!
//! - Every replica keeps a row in `lease_members` alive, so each knows how
//!   many replicas there are and what its fair share is (shards divided by
//!   replicas, rounded up).
//! - It takes free or expired shards up to that share (the token grows by
//!   one on every take), renews what it holds every third of the lease
//!   time, and gives back what exceeds its share when a replica joins.
//! - On SIGTERM it stops its work and hands its shards back at once; a
//!   notification wakes the other replicas, so a rolling deploy moves the
//!   shards without waiting for the leases to expire.
//! - Every write under a lease checks its token, last in the transaction
//!   ([`Fence::check_postgres`]): it takes the shard's advisory lock shared
//!   (in memory, nothing written) and reads the lease row for the owner,
//!   the token and an expiry in the future. A take holds the same lock
//!   exclusively while it moves the token, so it waits for any commit
//!   already under way, and a check after it sees the new token: a replica
//!   that was paused past its lease and taken over rolls back, and no write
//!   is ever made under two tokens at once. A writer frozen between its
//!   check and its commit keeps the lock only until PostgreSQL ends its idle
//!   transaction (after a lease time); until then the shard is not taken.
//!
//! All times are the database's clock, so the replicas' clocks need not
//! agree. On SQLite there is one process: it owns every shard, with no
//! table and no check ([`Fence::Sole`]).
//!
//! The shard count is part of the key, like the cursors': replicas
//! configured with different counts split different sets of shards.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use clm_platform::db::Pools;
use clm_platform::server::Shutdown;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::task::JoinHandle;

use crate::ShardFilter;

/// The channel replicas are woken on when shards are given back or a
/// replica joins; the payload is the group's name.
const CHANNEL: &str = "clm_shard_leases";

/// The lease a write is made under, checked in its transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fence {
    /// The only process (SQLite, or work that is not divided): nothing to
    /// check.
    #[default]
    Sole,
    /// A lease on a shard.
    Lease {
        /// The lease group.
        group: &'static str,
        /// The shard.
        shard: ShardFilter,
        /// This replica.
        owner: Arc<str>,
        /// The fencing token it took the lease with.
        token: i64,
    },
}

/// A write was refused: the lease it was made under is no longer held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the lease on shard {index} of {count} of {group} is no longer held here: another replica owns it"
)]
pub struct LeaseLost {
    /// The lease group.
    pub group: &'static str,
    /// The shard.
    pub index: u32,
    /// The shard count.
    pub count: u32,
}

impl Fence {
    /// Checks, inside the caller's PostgreSQL transaction and as its last
    /// statement before the commit, that the lease is still held; `Ok(Err)`
    /// when it is not (roll the transaction back). The shard's advisory lock
    /// stays held, shared, until the commit, so a take waits for it.
    pub async fn check_postgres(
        &self,
        tx: &mut sqlx::PgConnection,
    ) -> Result<Result<(), LeaseLost>, sqlx::Error> {
        Self::check_all_postgres(std::slice::from_ref(self), tx).await
    }

    /// [`check_postgres`](Self::check_postgres) for several leases at once,
    /// in one statement: `Ok(Err)` names the first one no longer held.
    pub async fn check_all_postgres(
        fences: &[Fence],
        tx: &mut sqlx::PgConnection,
    ) -> Result<Result<(), LeaseLost>, sqlx::Error> {
        let leases: Vec<(&'static str, ShardFilter, &str, i64)> = fences
            .iter()
            .filter_map(|fence| match fence {
                Fence::Sole => None,
                Fence::Lease {
                    group,
                    shard,
                    owner,
                    token,
                } => Some((*group, *shard, &**owner, *token)),
            })
            .collect();
        if leases.is_empty() {
            return Ok(Ok(()));
        }
        // The whole test, lock included, is one expression evaluated for
        // every lease, so each lock is taken whatever the plan.
        let lost: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT min(f.n)::int \
             FROM UNNEST($1::text[], $2::int[], $3::int[], $4::text[], $5::bigint[]) \
               WITH ORDINALITY AS f(lease_group, shard_index, shard_count, owner, token, n) \
             WHERE NOT (set_config('idle_in_transaction_session_timeout', $6, true) IS NOT NULL \
               AND {} IS NOT NULL \
               AND EXISTS (SELECT 1 FROM shard_leases l \
                 WHERE l.lease_group = f.lease_group AND l.shard_index = f.shard_index \
                   AND l.shard_count = f.shard_count AND l.owner = f.owner AND l.token = f.token \
                   AND l.expires_at > clock_timestamp()))",
            shard_lock(
                "pg_advisory_xact_lock_shared",
                "f.lease_group",
                "f.shard_index",
                "f.shard_count"
            )
        ))
        .bind(leases.iter().map(|l| l.0).collect::<Vec<_>>())
        .bind(leases.iter().map(|l| l.1.index as i32).collect::<Vec<_>>())
        .bind(leases.iter().map(|l| l.1.count as i32).collect::<Vec<_>>())
        .bind(leases.iter().map(|l| l.2).collect::<Vec<_>>())
        .bind(leases.iter().map(|l| l.3).collect::<Vec<_>>())
        .bind(IDLE_IN_CHECK_MS.to_string())
        .fetch_one(&mut *tx)
        .await?;
        Ok(match lost {
            None => Ok(()),
            Some(n) => {
                let (group, shard, _, _) = leases[n as usize - 1];
                Err(LeaseLost {
                    group,
                    index: shard.index,
                    count: shard.count,
                })
            }
        })
    }
}

/// How long a transaction may sit idle after its lease check before
/// PostgreSQL ends it (releasing the shard's lock): only a frozen writer
/// waits that long between its check and its commit.
const IDLE_IN_CHECK_MS: u64 = 5_000;

/// A call of the advisory lock function `function` on the lock of a shard:
/// the group (with the schema, since advisory locks span the database) and
/// the shard, from the SQL expressions given.
fn shard_lock(function: &str, group: &str, index: &str, count: &str) -> String {
    format!("{function}(hashtext(current_schema() || '/' || {group}), {count} * 4096 + {index})")
}

/// A shard held by this replica, handed to the work run on it.
#[derive(Debug, Clone)]
pub struct ShardLease {
    /// The shard.
    pub shard: ShardFilter,
    /// What every write of the work checks.
    pub fence: Fence,
}

impl ShardLease {
    /// A shard of the only process.
    pub fn sole(shard: ShardFilter) -> Self {
        Self {
            shard,
            fence: Fence::Sole,
        }
    }
}

/// A set of shards divided among the replicas of a service.
#[derive(Debug, Clone, Copy)]
pub struct LeaseGroup {
    /// Its name, unique within the service's database.
    pub name: &'static str,
    /// How many shards.
    pub shards: u32,
    /// How long a lease lasts without renewal; renewed every third of it.
    pub lease_time: Duration,
}

/// The lease time every service reads (`CLM_SHARD_LEASE_MS`, default
/// 15000): a replica that dies leaves its shards unserved for at most this
/// long and a third of it.
pub fn lease_time(env: &clm_platform::Env) -> Result<Duration, clm_platform::ConfigError> {
    Ok(Duration::from_millis(env.bounded_or(
        "CLM_SHARD_LEASE_MS",
        15_000,
        300,
        600_000,
    )?))
}

/// Divides a [`LeaseGroup`] with the other replicas and runs `work` on each
/// shard held, until `stop`: started when a shard is taken, stopped (its
/// stop signal fires, and it is waited for) when it is lost or given back.
/// Returns an error when the work of a shard fails, which is the process's
/// failure.
pub async fn run<W, F>(
    pools: Pools,
    group: LeaseGroup,
    work: W,
    stop: Shutdown,
) -> anyhow::Result<()>
where
    W: Fn(ShardLease, Shutdown) -> F + Send + Sync + 'static,
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    run_tracked(pools, group, HeldShards::default(), work, stop).await
}

/// [`run`], keeping `held` up to date with the shards whose work runs, for
/// work of this replica that covers all of them at once (a scan that
/// would cost as much per shard as for all).
pub async fn run_tracked<W, F>(
    pools: Pools,
    group: LeaseGroup,
    held: HeldShards,
    work: W,
    stop: Shutdown,
) -> anyhow::Result<()>
where
    W: Fn(ShardLease, Shutdown) -> F + Send + Sync + 'static,
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut running = Running {
        shards: BTreeMap::new(),
        held,
    };
    match pools {
        Pools::Sqlite(_) => {
            for index in 0..group.shards {
                let shard = ShardFilter {
                    index,
                    count: group.shards,
                };
                running.start(&work, ShardLease::sole(shard));
            }
            let outcome = tokio::select! {
                () = stop.triggered() => Ok(()),
                failed = running.failure() => failed,
            };
            running.stop_all(group.lease_time).await;
            outcome
        }
        Pools::Postgres(pool) => {
            let keeper = Keeper::new(pool, group);
            keeper.keep(&work, &mut running, stop).await
        }
    }
}

/// The shards a replica holds now, as [`run_tracked`] keeps them.
#[derive(Debug, Clone, Default)]
pub struct HeldShards(Arc<std::sync::Mutex<BTreeMap<u32, ShardLease>>>);

impl HeldShards {
    /// Holds `leases` for good (one process that owns all the work).
    pub fn fixed(leases: impl IntoIterator<Item = ShardLease>) -> Self {
        let held = Self::default();
        for lease in leases {
            held.insert(lease);
        }
        held
    }

    /// The leases held now, by shard.
    pub fn leases(&self) -> Vec<ShardLease> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, ShardLease>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn insert(&self, lease: ShardLease) {
        self.lock().insert(lease.shard.index, lease);
    }

    fn remove(&self, index: u32) {
        self.lock().remove(&index);
    }
}

/// The work running on held shards.
struct Running {
    shards: BTreeMap<u32, (ShardLease, Shutdown, JoinHandle<anyhow::Result<()>>)>,
    held: HeldShards,
}

impl Running {
    fn start<W, F>(&mut self, work: &W, lease: ShardLease)
    where
        W: Fn(ShardLease, Shutdown) -> F,
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let stop = Shutdown::new();
        let handle = tokio::spawn(work(lease.clone(), stop.clone()));
        self.held.insert(lease.clone());
        self.shards.insert(lease.shard.index, (lease, stop, handle));
    }

    /// The failure of a shard's work, when one ends on its own.
    async fn failure(&mut self) -> anyhow::Result<()> {
        loop {
            if let Some(index) = self
                .shards
                .iter()
                .find(|(_, (_, _, handle))| handle.is_finished())
                .map(|(index, _)| *index)
            {
                let (lease, _, handle) = self.shards.remove(&index).expect("present");
                self.held.remove(index);
                let shard = lease.shard;
                return Err(match handle.await {
                    Ok(Err(err)) => {
                        err.context(format!("shard {} of {}", shard.index, shard.count))
                    }
                    Ok(Ok(())) => anyhow::anyhow!(
                        "the work of shard {} of {} ended on its own",
                        shard.index,
                        shard.count
                    ),
                    Err(err) => anyhow::anyhow!(
                        "the work of shard {} of {} died: {err}",
                        shard.index,
                        shard.count
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the work of `index` and waits for it (at most `patience`).
    async fn stop(&mut self, index: u32, patience: Duration) {
        self.held.remove(index);
        if let Some((_, stop, handle)) = self.shards.remove(&index) {
            stop.trigger();
            wait_or_abort(handle, patience).await;
        }
    }

    async fn stop_all(&mut self, patience: Duration) {
        let all = std::mem::take(&mut self.shards);
        for index in all.keys() {
            self.held.remove(*index);
        }
        for (_, stop, _) in all.values() {
            stop.trigger();
        }
        for (_, (_, _, handle)) in all {
            wait_or_abort(handle, patience).await;
        }
    }

    fn held(&self) -> Vec<u32> {
        self.shards.keys().copied().collect()
    }
}

async fn wait_or_abort(mut handle: JoinHandle<anyhow::Result<()>>, patience: Duration) {
    if tokio::time::timeout(patience, &mut handle).await.is_err() {
        handle.abort();
    }
}

/// This replica's side of a lease group on PostgreSQL.
struct Keeper {
    pool: PgPool,
    group: LeaseGroup,
    owner: Arc<str>,
}

impl Keeper {
    fn new(pool: PgPool, group: LeaseGroup) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_default();
        let owner = format!(
            "{host}/{}/{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        Self {
            pool,
            group,
            owner: owner.into(),
        }
    }

    fn lease_ms(&self) -> i64 {
        self.group.lease_time.as_millis() as i64
    }

    async fn keep<W, F>(
        &self,
        work: &W,
        running: &mut Running,
        stop: Shutdown,
    ) -> anyhow::Result<()>
    where
        W: Fn(ShardLease, Shutdown) -> F,
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let renew_every = self.group.lease_time / 3;
        let mut listener = self.listen().await;
        let mut announce = true;
        let outcome = loop {
            match self.round(work, running, announce).await {
                Ok(()) => announce = false,
                Err(err) => {
                    tracing::warn!(group = self.group.name, error = %err, "cannot renew or take shard leases")
                }
            }
            let woken = async {
                match &mut listener {
                    Some(listener) => match listener.recv().await {
                        Ok(note) if note.payload() == self.group.name => {}
                        Ok(_) => std::future::pending().await,
                        Err(_) => tokio::time::sleep(renew_every).await,
                    },
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.triggered() => break Ok(()),
                failed = running.failure() => break failed,
                () = tokio::time::sleep(renew_every) => {}
                () = woken => {}
            }
        };
        running.stop_all(self.group.lease_time).await;
        if let Err(err) = self.give_back_all().await {
            tracing::warn!(group = self.group.name, error = %err, "cannot hand the shard leases back; they expire instead");
        }
        outcome
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for lease hand-overs; relying on renewals");
                return None;
            }
        };
        match listener.listen(CHANNEL).await {
            Ok(()) => Some(listener),
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for lease hand-overs; relying on renewals");
                None
            }
        }
    }

    /// One round: say this replica is alive, renew what it holds (stopping
    /// what was lost), give back what exceeds its share and take free
    /// shards up to it.
    async fn round<W, F>(&self, work: &W, running: &mut Running, announce: bool) -> sqlx::Result<()>
    where
        W: Fn(ShardLease, Shutdown) -> F,
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (name, count) = (self.group.name, self.group.shards as i32);
        let replicas = self.heartbeat(announce).await?;
        let held = running.held();
        let renewed: Vec<i32> = sqlx::query_scalar(
            "UPDATE shard_leases SET expires_at = clock_timestamp() + $4 * interval '1 millisecond' \
             WHERE lease_group = $1 AND shard_count = $2 AND owner = $3 RETURNING shard_index",
        )
        .bind(name)
        .bind(count)
        .bind(&*self.owner)
        .bind(self.lease_ms())
        .fetch_all(&self.pool)
        .await?;
        for index in held {
            if !renewed.contains(&(index as i32)) {
                tracing::warn!(
                    group = name,
                    shard = index,
                    "shard lease lost to another replica; stopping its work"
                );
                running.stop(index, self.group.lease_time).await;
            }
        }
        let share = self.group.shards.div_ceil(replicas.max(1)) as usize;
        let held = running.held();
        if held.len() > share {
            let excess: Vec<u32> = held[share..].to_vec();
            for index in &excess {
                running.stop(*index, self.group.lease_time).await;
            }
            self.give_back(&excess).await?;
            tracing::info!(group = name, shards = ?excess, replicas, "shards handed to a joining replica");
        } else if held.len() < share {
            // A take holds the shard's lock exclusively until it commits:
            // it waits for no writer (a shard a writer is committing under
            // is tried again next round), and a writer's check after it
            // sees the new token.
            let taken: Vec<(i32, i64)> = sqlx::query_as(&format!(
                "WITH free AS ( \
                   SELECT shard_index FROM shard_leases \
                   WHERE lease_group = $1 AND shard_count = $2 \
                     AND (owner = '' OR expires_at <= clock_timestamp()) \
                   ORDER BY shard_index FOR UPDATE SKIP LOCKED), \
                 locked AS ( \
                   SELECT shard_index FROM free WHERE {} LIMIT $3) \
                 UPDATE shard_leases l SET owner = $4, token = l.token + 1, \
                   expires_at = clock_timestamp() + $5 * interval '1 millisecond' \
                 FROM locked WHERE l.lease_group = $1 AND l.shard_count = $2 \
                   AND l.shard_index = locked.shard_index \
                 RETURNING l.shard_index, l.token",
                shard_lock("pg_try_advisory_xact_lock", "$1", "free.shard_index", "$2")
            ))
            .bind(name)
            .bind(count)
            .bind((share - held.len()) as i64)
            .bind(&*self.owner)
            .bind(self.lease_ms())
            .fetch_all(&self.pool)
            .await?;
            for (index, token) in taken {
                let shard = ShardFilter {
                    index: index as u32,
                    count: self.group.shards,
                };
                tracing::info!(
                    group = name,
                    shard = index,
                    token,
                    replicas,
                    "shard lease taken"
                );
                running.start(
                    work,
                    ShardLease {
                        shard,
                        fence: Fence::Lease {
                            group: name,
                            shard,
                            owner: self.owner.clone(),
                            token,
                        },
                    },
                );
            }
        }
        Ok(())
    }

    /// Keeps this replica's membership alive (and the group's rows present);
    /// returns how many replicas are alive.
    async fn heartbeat(&self, announce: bool) -> sqlx::Result<u32> {
        let mut tx = self.pool.begin().await?;
        if announce {
            sqlx::query(
                "INSERT INTO shard_leases (lease_group, shard_index, shard_count, owner, token, expires_at) \
                 SELECT $1, i, $2, '', 0, '-infinity' FROM generate_series(0, $2 - 1) AS i \
                 ON CONFLICT DO NOTHING",
            )
            .bind(self.group.name)
            .bind(self.group.shards as i32)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO lease_members (lease_group, owner, expires_at) \
             VALUES ($1, $2, clock_timestamp() + $3 * interval '1 millisecond') \
             ON CONFLICT (lease_group, owner) DO UPDATE SET expires_at = EXCLUDED.expires_at",
        )
        .bind(self.group.name)
        .bind(&*self.owner)
        .bind(self.lease_ms())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM lease_members WHERE lease_group = $1 AND expires_at < clock_timestamp()",
        )
        .bind(self.group.name)
        .execute(&mut *tx)
        .await?;
        let replicas: i64 =
            sqlx::query_scalar("SELECT count(*) FROM lease_members WHERE lease_group = $1")
                .bind(self.group.name)
                .fetch_one(&mut *tx)
                .await?;
        if announce {
            // The others recount and give back what exceeds their share.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(self.group.name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(replicas as u32)
    }

    async fn give_back(&self, shards: &[u32]) -> sqlx::Result<()> {
        let shards: Vec<i32> = shards.iter().map(|s| *s as i32).collect();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE shard_leases SET owner = '', expires_at = '-infinity' \
             WHERE lease_group = $1 AND shard_count = $2 AND owner = $3 AND shard_index = ANY($4)",
        )
        .bind(self.group.name)
        .bind(self.group.shards as i32)
        .bind(&*self.owner)
        .bind(&shards)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(self.group.name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    async fn give_back_all(&self) -> sqlx::Result<()> {
        sqlx::query("DELETE FROM lease_members WHERE lease_group = $1 AND owner = $2")
            .bind(self.group.name)
            .bind(&*self.owner)
            .execute(&self.pool)
            .await?;
        let all: Vec<u32> = (0..self.group.shards).collect();
        self.give_back(&all).await?;
        tracing::info!(group = self.group.name, "shard leases handed back");
        Ok(())
    }
}
