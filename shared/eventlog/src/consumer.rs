//! The consumer side of a log tail: read batches after the saved cursor,
//! apply each batch and save the new cursor in the same transaction as the
//! state derived from it, and on any failure reconnect with backoff from the
//! cursor last saved. A crash between reading and committing therefore
//! re-reads the batch instead of losing or double-counting it.

use std::time::Duration;

use async_trait::async_trait;
use clm_platform::db::Pools;
use clm_platform::server::Shutdown;
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use rand::Rng as _;

use crate::ShardFilter;
use crate::leases::ShardLease;

/// A failure of a source or a projection; the consumer logs it and retries.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConsumeError(pub String);

impl ConsumeError {
    /// An error with a message.
    pub fn new(message: impl std::fmt::Display) -> Self {
        Self(message.to_string())
    }
}

/// One entry with the cursor that resumes after it.
#[derive(Debug, Clone)]
pub struct Positioned<E> {
    /// The opaque cursor of the entry.
    pub cursor: String,
    /// The entry.
    pub entry: E,
}

/// Where entries come from: usually a producer's server-streaming log RPC.
#[async_trait]
pub trait LogSource: Send + Sync + 'static {
    /// The entry type.
    type Entry: Send + 'static;

    /// Opens a live stream of batches after `after` (empty: the start).
    async fn open(
        &self,
        after: &str,
        shard: ShardFilter,
    ) -> Result<BoxStream<'static, Result<Vec<Positioned<Self::Entry>>, ConsumeError>>, ConsumeError>;
}

/// Derived state kept by a consumer, with its cursor beside it.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// The entry type.
    type Entry: Send + 'static;

    /// The name its cursors are saved under in `log_cursors`.
    fn cursor_name(&self) -> &'static str;

    /// The cursor saved with the state (empty: nothing consumed yet).
    async fn saved_cursor(&self, shard: ShardFilter) -> Result<String, ConsumeError>;

    /// The most entries applied in one transaction: a batch read from the
    /// source is split into pieces of at most this many. On PostgreSQL a
    /// long transaction holds back every log tail of the cluster, so a
    /// consumer that writes much per entry keeps its transactions short.
    fn max_batch(&self) -> usize {
        usize::MAX
    }

    /// Applies a batch and moves the cursor (from the one read to the
    /// batch's last entry's) in the same transaction, by compare-and-set
    /// ([`cursors::move_postgres`], [`cursors::move_sqlite`]): when the
    /// cursor is no longer the one read, nothing is applied.
    async fn apply(
        &self,
        batch: Vec<Self::Entry>,
        cursor: &cursors::CursorMove,
    ) -> Result<(), ConsumeError>;
}

/// How a consumer retries.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first wait after a failure.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// Runs a consumer of the shard `lease` holds until `shutdown`: reads from
/// `source` after the saved cursor and applies every batch to `projection`,
/// each cursor move fenced by the lease.
pub async fn run<S, P>(
    name: &str,
    source: S,
    projection: P,
    lease: ShardLease,
    backoff: Backoff,
    shutdown: Shutdown,
) where
    S: LogSource,
    P: Projection<Entry = S::Entry>,
{
    let mut wait = backoff.initial;
    while !shutdown.is_triggered() {
        match consume_until_failure(&source, &projection, &lease, &shutdown, &mut wait, backoff)
            .await
        {
            Ok(()) => return,
            Err(err) => {
                tracing::warn!(consumer = name, error = %err, retry_in_ms = wait.as_millis() as u64, "log consumer failed, reconnecting");
            }
        }
        let jittered = wait.mul_f64(rand::rng().random_range(0.8..1.2));
        tokio::select! {
            () = shutdown.triggered() => return,
            () = tokio::time::sleep(jittered) => {}
        }
        wait = (wait * 2).min(backoff.max);
    }
}

/// Runs a consumer on each shard of `group` this replica holds
/// ([`leases::run`](crate::leases::run)): `make` gives the source and the
/// projection of a shard when its lease is taken. Until `shutdown`.
pub async fn run_leased<S, P, M>(
    name: &'static str,
    pools: Pools,
    group: crate::leases::LeaseGroup,
    make: M,
    backoff: Backoff,
    shutdown: Shutdown,
) -> anyhow::Result<()>
where
    S: LogSource,
    P: Projection<Entry = S::Entry>,
    M: Fn() -> (S, P) + Send + Sync + 'static,
{
    crate::leases::run(
        pools,
        group,
        move |lease, stop| {
            let (source, projection) = make();
            async move {
                run(name, source, projection, lease, backoff, stop).await;
                Ok(())
            }
        },
        shutdown,
    )
    .await
}

async fn consume_until_failure<S, P>(
    source: &S,
    projection: &P,
    lease: &ShardLease,
    shutdown: &Shutdown,
    wait: &mut Duration,
    backoff: Backoff,
) -> Result<(), ConsumeError>
where
    S: LogSource,
    P: Projection<Entry = S::Entry>,
{
    let shard = lease.shard;
    let mut cursor = projection.saved_cursor(shard).await?;
    let mut stream = source.open(&cursor, shard).await?;
    loop {
        let batch = tokio::select! {
            () = shutdown.triggered() => return Ok(()),
            batch = stream.next() => batch,
        };
        let Some(batch) = batch else {
            if shutdown.is_triggered() {
                return Ok(());
            }
            return Err(ConsumeError::new("the log stream ended"));
        };
        let mut batch = batch?;
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(projection.max_batch().max(1)));
            let last = batch.last().map(|p| p.cursor.clone()).unwrap_or_default();
            let moved = cursors::CursorMove {
                consumer: projection.cursor_name(),
                shard,
                expected: std::mem::take(&mut cursor),
                new: last,
                fence: lease.fence.clone(),
            };
            projection
                .apply(batch.into_iter().map(|p| p.entry).collect(), &moved)
                .await?;
            cursor = moved.new;
            batch = rest;
        }
        // A batch went through: the next failure starts with a short wait.
        *wait = backoff.initial;
    }
}

/// The cursor table every consumer keeps in its own database:
/// `log_cursors (consumer, shard_index, shard_count, cursor, updated_at)`.
///
/// A cursor is only ever saved by a compare-and-set on the value the
/// consumer read ([`CursorMove`](cursors::CursorMove)), inside the transaction of the state
/// derived from the batch: a crash, a retry or a second replica that read
/// the same cursor can never apply an entry twice, because its save finds
/// the cursor already moved and its transaction rolls back. The same save
/// checks the shard lease the consumer holds ([`Fence`](crate::leases::Fence)), so a replica that
/// lost its shard commits nothing more of it. Save last in the
/// transaction: the shard's lock is held until the commit.
pub mod cursors {
    use super::*;
    pub use crate::leases::{Fence, LeaseLost};

    /// A consumer's cursor moving from `expected` to `new`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct CursorMove {
        /// The consumer's name.
        pub consumer: &'static str,
        /// Its shard.
        pub shard: ShardFilter,
        /// The cursor it read from (empty: none saved).
        pub expected: String,
        /// The cursor after the batch.
        pub new: String,
        /// The lease the move is made under.
        pub fence: Fence,
    }

    /// Why a cursor was not moved; roll the transaction back either way.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum NotMoved {
        /// Another writer moved the cursor since it was read (it applied
        /// the batch).
        #[error("the cursor of {0} moved since it was read: another writer applied the batch")]
        CursorMoved(String),
        /// The consumer's shard lease is no longer held.
        #[error(transparent)]
        LeaseLost(#[from] LeaseLost),
    }

    /// The cursor saved for `consumer` and `shard` (empty when none).
    pub async fn load(
        pools: &Pools,
        consumer: &str,
        shard: ShardFilter,
    ) -> Result<String, ConsumeError> {
        let cursor: Option<String> = match pools {
            Pools::Postgres(pool) => sqlx::query_scalar(
                "SELECT cursor FROM log_cursors WHERE consumer = $1 AND shard_index = $2 AND shard_count = $3",
            )
            .bind(consumer)
            .bind(shard.index as i32)
            .bind(shard.count as i32)
            .fetch_optional(pool)
            .await,
            Pools::Sqlite(pools) => sqlx::query_scalar(
                "SELECT cursor FROM log_cursors WHERE consumer = ?1 AND shard_index = ?2 AND shard_count = ?3",
            )
            .bind(consumer)
            .bind(shard.index)
            .bind(shard.count)
            .fetch_optional(&pools.writer)
            .await,
        }
        .map_err(ConsumeError::new)?;
        Ok(cursor.unwrap_or_default())
    }

    /// Moves the cursor inside the caller's PostgreSQL transaction, as its
    /// last statement before the commit; `Ok(Err)` when another writer moved
    /// it first or the lease is lost (roll the transaction back).
    pub async fn move_postgres(
        tx: &mut sqlx::PgConnection,
        cursor: &CursorMove,
    ) -> Result<Result<(), NotMoved>, sqlx::Error> {
        let moved = if cursor.expected.is_empty() {
            sqlx::query(
                "INSERT INTO log_cursors (consumer, shard_index, shard_count, cursor, updated_at) \
                 VALUES ($1, $2, $3, $4, now()) ON CONFLICT DO NOTHING",
            )
            .bind(cursor.consumer)
            .bind(cursor.shard.index as i32)
            .bind(cursor.shard.count as i32)
            .bind(&cursor.new)
            .execute(&mut *tx)
            .await?
        } else {
            sqlx::query(
                "UPDATE log_cursors SET cursor = $4, updated_at = now() \
                 WHERE consumer = $1 AND shard_index = $2 AND shard_count = $3 AND cursor = $5",
            )
            .bind(cursor.consumer)
            .bind(cursor.shard.index as i32)
            .bind(cursor.shard.count as i32)
            .bind(&cursor.new)
            .bind(&cursor.expected)
            .execute(&mut *tx)
            .await?
        };
        if let Err(moved) = outcome(moved.rows_affected(), cursor) {
            return Ok(Err(moved));
        }
        Ok(cursor
            .fence
            .check_postgres(tx)
            .await?
            .map_err(NotMoved::from))
    }

    /// Moves the cursor inside the caller's SQLite transaction; `Ok(Err)`
    /// when another writer moved it first (roll the transaction back). One
    /// process owns every shard of a SQLite database: there is no lease.
    pub async fn move_sqlite(
        tx: &mut sqlx::SqliteConnection,
        cursor: &CursorMove,
    ) -> Result<Result<(), NotMoved>, sqlx::Error> {
        let now = chrono::Utc::now().timestamp_micros();
        let moved = if cursor.expected.is_empty() {
            sqlx::query(
                "INSERT INTO log_cursors (consumer, shard_index, shard_count, cursor, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            )
            .bind(cursor.consumer)
            .bind(cursor.shard.index)
            .bind(cursor.shard.count)
            .bind(&cursor.new)
            .bind(now)
            .execute(&mut *tx)
            .await?
        } else {
            sqlx::query(
                "UPDATE log_cursors SET cursor = ?4, updated_at = ?5 \
                 WHERE consumer = ?1 AND shard_index = ?2 AND shard_count = ?3 AND cursor = ?6",
            )
            .bind(cursor.consumer)
            .bind(cursor.shard.index)
            .bind(cursor.shard.count)
            .bind(&cursor.new)
            .bind(now)
            .bind(&cursor.expected)
            .execute(&mut *tx)
            .await?
        };
        Ok(outcome(moved.rows_affected(), cursor))
    }

    fn outcome(rows: u64, cursor: &CursorMove) -> Result<(), NotMoved> {
        if rows == 1 {
            Ok(())
        } else {
            Err(NotMoved::CursorMoved(cursor.consumer.to_owned()))
        }
    }
}
