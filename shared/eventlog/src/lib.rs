//! The append-only event log every clm producer keeps in its own database
//! (a transactional outbox) and the tail that serves it: "every entry after
//! cursor C, then live".
//!
//! # No entry is ever skipped
//!
//! On PostgreSQL a sequence value allocated first can commit last, so a
//! reader that hands out entries by sequence alone would skip the late one.
//! Every entry therefore records the id of the transaction that wrote it
//! (`pg_current_xact_id()`), the log is ordered by (transaction id,
//! sequence), and a reader only hands out entries whose transaction id is
//! below the oldest transaction still running
//! (`pg_snapshot_xmin(pg_current_snapshot())`). Every transaction below that
//! horizon has ended, and any transaction that writes later has a larger id,
//! so everything at or before a handed-out cursor is final: later commits
//! only ever land after it.
//!
//! SQLite has a single writer whose commits are serial, so there the order
//! is the sequence alone and everything committed is final.
//!
//! # Table shape
//!
//! Each producer creates its log table in its own migrations with these
//! columns (see the identity service's migrations for an example):
//! `seq` (bigserial / integer primary key autoincrement), `txid` (xid8
//! default `pg_current_xact_id()`, PostgreSQL only), `event_id`,
//! `customer_id`, `shard`, `kind`, `payload`, `recorded_at`, and on
//! PostgreSQL an index on `(txid, seq)`.

pub mod consumer;
pub mod customer_events;
pub mod leases;
pub mod serving;
pub mod sources;

/// The tables every service that follows logs or divides work by shard
/// keeps: `log_cursors` ([`consumer::cursors`]) and, on PostgreSQL,
/// `shard_leases`, `lease_members` ([`leases`]) and `clm_shard_of(uuid)`,
/// the shard of a customer as [`shard_of`] computes it, for tables that
/// divide their rows by shard. A service lists them among its migrations
/// at the version it chooses.
pub mod kit {
    use clm_platform::db::EmbeddedMigration;

    /// The kit's tables on PostgreSQL, as migration `version`.
    pub const fn postgres_migration(version: i64) -> EmbeddedMigration {
        EmbeddedMigration {
            version,
            description: "log cursors, shard leases and clm_shard_of",
            sql: include_str!("kit_postgres.sql"),
        }
    }

    /// The kit's tables on SQLite (the cursors: one process owns every
    /// shard), as migration `version`.
    pub const fn sqlite_migration(version: i64) -> EmbeddedMigration {
        EmbeddedMigration {
            version,
            description: "log cursors",
            sql: include_str!("kit_sqlite.sql"),
        }
    }
}

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clm_platform::FieldViolation;
use clm_platform::db::Pools;
use clm_platform::server::Shutdown;
use futures_util::Stream;
use sqlx::Row;
use tokio::sync::watch;
use uuid::Uuid;

/// A position in a log. Entries are ordered by (transaction, sequence).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    /// The writing transaction's id on PostgreSQL; 0 on SQLite.
    pub transaction: u64,
    /// The entry's sequence number.
    pub sequence: i64,
}

impl Cursor {
    /// The position before the first entry.
    pub const START: Cursor = Cursor {
        transaction: 0,
        sequence: 0,
    };

    /// Parses a cursor a client sent back; empty means [`Cursor::START`].
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldViolation> {
        if raw.is_empty() {
            return Ok(Self::START);
        }
        let invalid = || FieldViolation::new(field, "is not a cursor returned by this log");
        let (transaction, sequence) = raw.split_once('-').ok_or_else(invalid)?;
        Ok(Self {
            transaction: transaction.parse().map_err(|_| invalid())?,
            sequence: sequence.parse().map_err(|_| invalid())?,
        })
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.transaction, self.sequence)
    }
}

/// The shard of a customer: entries for one customer always land in one
/// shard, so a consumer of shard k of n sees them all, in order.
pub fn shard_of(customer_id: Option<Uuid>) -> i32 {
    let Some(id) = customer_id else { return 0 };
    // FNV-1a over the id's bytes: UUIDv7 starts with a timestamp, so its
    // leading bytes alone would spread badly.
    let hash = id.as_bytes().iter().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    });
    (hash & 0x7fff_ffff) as i32
}

/// Which part of a log a consumer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardFilter {
    /// This consumer's shard, below `count`.
    pub index: u32,
    /// The number of shards (1: everything).
    pub count: u32,
}

impl ShardFilter {
    /// Every entry.
    pub const ALL: ShardFilter = ShardFilter { index: 0, count: 1 };

    /// Validates a shard request (count 0 means everything).
    pub fn new(field: &str, index: u32, count: u32) -> Result<Self, FieldViolation> {
        match count {
            0 if index == 0 => Ok(Self::ALL),
            0 => Err(FieldViolation::new(
                format!("{field}.count"),
                "is required when index is set",
            )),
            c if c > 1024 => Err(FieldViolation::new(
                format!("{field}.count"),
                "must be at most 1024",
            )),
            c if index >= c => Err(FieldViolation::new(
                format!("{field}.index"),
                "must be below count",
            )),
            c => Ok(Self { index, count: c }),
        }
    }
}

/// An entry to append.
#[derive(Debug, Clone)]
pub struct NewEntry<'a> {
    /// A unique id of the event.
    pub event_id: Uuid,
    /// The customer it is about, which decides its shard.
    pub customer_id: Option<Uuid>,
    /// What kind of entry it is (producer-defined, e.g. `customer.created`).
    pub kind: &'a str,
    /// The encoded event body.
    pub payload: &'a [u8],
    /// When it happened.
    pub recorded_at: DateTime<Utc>,
}

/// An entry read from the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Where it stands in the log.
    pub cursor: Cursor,
    /// A unique id of the event.
    pub event_id: Uuid,
    /// The customer it is about.
    pub customer_id: Option<Uuid>,
    /// What kind of entry it is.
    pub kind: String,
    /// The encoded event body.
    pub payload: Vec<u8>,
    /// When it happened.
    pub recorded_at: DateTime<Utc>,
}

/// One producer's log table.
#[derive(Clone)]
pub struct EventLog {
    pools: Pools,
    table: &'static str,
    appended: Arc<watch::Sender<u64>>,
    poll_interval: Duration,
}

impl fmt::Debug for EventLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventLog")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl EventLog {
    /// The log kept in `table` (a trusted, static name).
    pub fn new(pools: Pools, table: &'static str) -> Self {
        Self {
            pools,
            table,
            appended: Arc::new(watch::channel(0).0),
            poll_interval: Duration::from_millis(100),
        }
    }

    /// How often a live tail looks for entries committed by other processes
    /// (entries committed by this process wake it at once).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Appends an entry inside the caller's PostgreSQL transaction, so it
    /// commits (or not) with the state change it describes.
    pub async fn append_postgres(
        &self,
        tx: &mut sqlx::PgConnection,
        entry: &NewEntry<'_>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "INSERT INTO {} (txid, event_id, customer_id, shard, kind, payload, recorded_at) \
             VALUES (pg_current_xact_id(), $1, $2, $3, $4, $5, $6)",
            self.table
        ))
        .bind(entry.event_id)
        .bind(entry.customer_id)
        .bind(shard_of(entry.customer_id))
        .bind(entry.kind)
        .bind(entry.payload)
        .bind(entry.recorded_at)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Appends entries inside the caller's PostgreSQL transaction, in one
    /// statement, in order.
    pub async fn append_many_postgres(
        &self,
        tx: &mut sqlx::PgConnection,
        entries: &[NewEntry<'_>],
    ) -> Result<(), sqlx::Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = entries.iter().map(|e| e.event_id).collect();
        let customers: Vec<Option<Uuid>> = entries.iter().map(|e| e.customer_id).collect();
        let shards: Vec<i32> = entries.iter().map(|e| shard_of(e.customer_id)).collect();
        let kinds: Vec<&str> = entries.iter().map(|e| e.kind).collect();
        let payloads: Vec<&[u8]> = entries.iter().map(|e| e.payload).collect();
        let times: Vec<DateTime<Utc>> = entries.iter().map(|e| e.recorded_at).collect();
        // WITH ORDINALITY keeps the given order in the sequence.
        sqlx::query(&format!(
            "INSERT INTO {} (txid, event_id, customer_id, shard, kind, payload, recorded_at) \
             SELECT pg_current_xact_id(), e.event_id, e.customer_id, e.shard, e.kind, e.payload, e.recorded_at \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::int[], $4::text[], $5::bytea[], $6::timestamptz[]) \
               WITH ORDINALITY AS e(event_id, customer_id, shard, kind, payload, recorded_at, n) \
             ORDER BY e.n",
            self.table
        ))
        .bind(&ids)
        .bind(&customers)
        .bind(&shards)
        .bind(&kinds)
        .bind(&payloads)
        .bind(&times)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Appends an entry inside the caller's SQLite transaction.
    pub async fn append_sqlite(
        &self,
        tx: &mut sqlx::SqliteConnection,
        entry: &NewEntry<'_>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "INSERT INTO {} (event_id, customer_id, shard, kind, payload, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            self.table
        ))
        .bind(entry.event_id.to_string())
        .bind(entry.customer_id.map(|id| id.to_string()))
        .bind(shard_of(entry.customer_id))
        .bind(entry.kind)
        .bind(entry.payload)
        .bind(entry.recorded_at.timestamp_micros())
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Wakes live tails in this process; call after a commit that appended.
    pub fn notify_appended(&self) {
        self.appended
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// Up to `limit` final entries after `after`, in log order.
    pub async fn read_after(
        &self,
        after: Cursor,
        shard: ShardFilter,
        limit: u32,
    ) -> Result<Vec<Entry>, sqlx::Error> {
        match &self.pools {
            Pools::Postgres(pool) => {
                let sql = format!(
                    "SELECT seq, txid::text::bigint AS tx, event_id, customer_id, kind, payload, recorded_at \
                     FROM {} \
                     WHERE (txid, seq) > ($1::text::xid8, $2) \
                       AND txid < pg_snapshot_xmin(pg_current_snapshot()) \
                       AND ($4 = 1 OR shard % $4 = $5) \
                     ORDER BY txid, seq LIMIT $3",
                    self.table
                );
                // An ordered index scan that stops after `limit` entries;
                // with lagging statistics the planner may otherwise scan and
                // sort everything after the cursor.
                let mut tx = pool.begin().await?;
                sqlx::query("SET LOCAL enable_bitmapscan = off")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("SET LOCAL enable_seqscan = off")
                    .execute(&mut *tx)
                    .await?;
                let rows = sqlx::query(&sql)
                    .bind(after.transaction.to_string())
                    .bind(after.sequence)
                    .bind(i64::from(limit))
                    .bind(shard.count as i32)
                    .bind(shard.index as i32)
                    .fetch_all(&mut *tx)
                    .await?;
                tx.commit().await?;
                rows.iter()
                    .map(|row| {
                        Ok(Entry {
                            cursor: Cursor {
                                transaction: row.try_get::<i64, _>("tx")? as u64,
                                sequence: row.try_get("seq")?,
                            },
                            event_id: row.try_get("event_id")?,
                            customer_id: row.try_get("customer_id")?,
                            kind: row.try_get("kind")?,
                            payload: row.try_get("payload")?,
                            recorded_at: row.try_get("recorded_at")?,
                        })
                    })
                    .collect()
            }
            Pools::Sqlite(pools) => {
                let sql = format!(
                    "SELECT seq, event_id, customer_id, kind, payload, recorded_at FROM {} \
                     WHERE seq > ?1 AND (?3 = 1 OR shard % ?3 = ?4) ORDER BY seq LIMIT ?2",
                    self.table
                );
                let rows = sqlx::query(&sql)
                    .bind(after.sequence)
                    .bind(i64::from(limit))
                    .bind(i64::from(shard.count))
                    .bind(i64::from(shard.index))
                    .fetch_all(&pools.reader)
                    .await?;
                rows.iter()
                    .map(|row| {
                        let parse_uuid = |raw: String| {
                            Uuid::try_parse(&raw).map_err(|err| sqlx::Error::Decode(Box::new(err)))
                        };
                        let micros: i64 = row.try_get("recorded_at")?;
                        Ok(Entry {
                            cursor: Cursor {
                                transaction: 0,
                                sequence: row.try_get("seq")?,
                            },
                            event_id: parse_uuid(row.try_get("event_id")?)?,
                            customer_id: row
                                .try_get::<Option<String>, _>("customer_id")?
                                .map(parse_uuid)
                                .transpose()?,
                            kind: row.try_get("kind")?,
                            payload: row.try_get("payload")?,
                            recorded_at: DateTime::from_timestamp_micros(micros)
                                .unwrap_or_default(),
                        })
                    })
                    .collect()
            }
        }
    }

    /// Streams batches of entries after `after`: as fast as the database
    /// gives them while behind, then live as they are committed. Ends when
    /// caught up if `stop_at_end`, when `shutdown` is triggered, or after the
    /// first error (which it yields).
    pub fn tail(
        &self,
        after: Cursor,
        shard: ShardFilter,
        batch_size: u32,
        stop_at_end: bool,
        shutdown: Shutdown,
    ) -> impl Stream<Item = Result<Vec<Entry>, sqlx::Error>> + Send + 'static {
        let log = self.clone();
        let reader = move |cursor: Cursor| {
            let log = log.clone();
            async move {
                let batch = log.read_after(cursor, shard, batch_size).await?;
                Ok(batch
                    .into_iter()
                    .map(|entry| (entry.cursor, entry))
                    .collect())
            }
        };
        let (pools, end) = (self.pools.clone(), EndMark::default());
        tail_batches(
            reader,
            move || {
                let (pools, end) = (pools.clone(), end.clone());
                async move { end.reached(&pools).await }
            },
            after,
            TailOptions {
                stop_at_end,
                poll_interval: self.poll_interval,
            },
            self.appended.subscribe(),
            shutdown,
        )
    }

    /// A receiver that changes whenever this process appends.
    pub fn appended(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }
}

/// Reads ahead of the consumer: a task pulls up to `depth` items of
/// `stream` while the previous ones are still being encoded and sent, so a
/// consumer that is behind gets database reads and network sends
/// overlapped instead of one after the other. The task stops as soon as the
/// returned stream is dropped, even while it waits for the next item.
pub fn read_ahead<S>(stream: S, depth: usize) -> impl Stream<Item = S::Item> + Send + 'static
where
    S: Stream + Send + 'static,
    S::Item: Send + 'static,
{
    use futures_util::StreamExt as _;
    let (sender, receiver) = tokio::sync::mpsc::channel(depth.max(1));
    tokio::spawn(async move {
        let mut stream = Box::pin(stream);
        loop {
            // A live tail may wait long for its next entry: stop as soon as
            // the consumer has gone, not at the next entry.
            let item = tokio::select! {
                () = sender.closed() => return,
                item = stream.next() => item,
            };
            let Some(item) = item else { return };
            if sender.send(item).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// How often a tail that stops at the end looks again while older
/// transactions hold entries back.
const END_POLL: Duration = Duration::from_millis(20);

/// Where a tail that stops at the end ends. On PostgreSQL an entry is
/// readable once no older transaction is running anywhere on the server,
/// so an empty read does not mean that everything committed so far was
/// read. The first [`EndMark::reached`] notes the next transaction id to
/// be assigned; the mark is reached once every transaction older than it
/// has ended, and every entry committed before the mark is then readable.
/// On SQLite everything committed is readable: always reached.
#[derive(Debug, Clone, Default)]
pub struct EndMark(Arc<std::sync::Mutex<Option<i64>>>);

impl EndMark {
    /// True once every entry committed before the first call is readable.
    pub async fn reached(&self, pools: &Pools) -> Result<bool, sqlx::Error> {
        let Pools::Postgres(pool) = pools else {
            return Ok(true);
        };
        let (oldest_running, next): (i64, i64) = sqlx::query_as(
            "SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint \
             FROM pg_current_snapshot() AS s",
        )
        .fetch_one(pool)
        .await?;
        let mark = *self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get_or_insert(next);
        Ok(oldest_running >= mark)
    }
}

/// How a tail behaves once it has caught up.
#[derive(Debug, Clone, Copy)]
pub struct TailOptions {
    /// End the stream when caught up instead of waiting for new entries.
    pub stop_at_end: bool,
    /// How often to look for entries committed by other processes.
    pub poll_interval: Duration,
}

/// The tail loop shared by every log: calls `read` with the cursor after
/// the last entry handed out and yields each non-empty batch; when a read
/// comes back empty it waits for `appended` to change or for the poll
/// interval, or, with `stop_at_end`, ends once `at_end` says that every
/// entry committed before the tail found nothing more to read is readable
/// (an [`EndMark`]: an entry is readable once no older transaction is
/// running). Ends on shutdown and after the first error, which it yields.
pub fn tail_batches<E, Err, R, Fut, A, AFut>(
    read: R,
    at_end: A,
    after: Cursor,
    options: TailOptions,
    appended: watch::Receiver<u64>,
    shutdown: Shutdown,
) -> impl Stream<Item = Result<Vec<E>, Err>> + Send + 'static
where
    E: Send + 'static,
    Err: Send + 'static,
    R: Fn(Cursor) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<(Cursor, E)>, Err>> + Send,
    A: Fn() -> AFut + Send + 'static,
    AFut: std::future::Future<Output = Result<bool, Err>> + Send,
{
    struct State<R, A> {
        read: R,
        at_end: A,
        cursor: Option<Cursor>,
        appended: watch::Receiver<u64>,
        shutdown: Shutdown,
    }
    let state = State {
        read,
        at_end,
        cursor: Some(after),
        appended,
        shutdown,
    };
    futures_util::stream::unfold(state, move |mut state| async move {
        let cursor = state.cursor?;
        loop {
            if state.shutdown.is_triggered() {
                return None;
            }
            state.appended.mark_unchanged();
            match (state.read)(cursor).await {
                Err(err) => {
                    state.cursor = None;
                    return Some((Err(err), state));
                }
                Ok(batch) if !batch.is_empty() => {
                    state.cursor = batch.last().map(|(position, _)| *position);
                    return Some((
                        Ok(batch.into_iter().map(|(_, entry)| entry).collect()),
                        state,
                    ));
                }
                Ok(_) if options.stop_at_end => match (state.at_end)().await {
                    Ok(true) => return None,
                    // Entries committed before now are still behind an
                    // older transaction: look again shortly.
                    Ok(false) => {
                        tokio::select! {
                            () = state.shutdown.triggered() => return None,
                            () = tokio::time::sleep(options.poll_interval.min(END_POLL)) => {}
                        }
                    }
                    Err(err) => {
                        state.cursor = None;
                        return Some((Err(err), state));
                    }
                },
                Ok(_) => {
                    tokio::select! {
                        () = state.shutdown.triggered() => return None,
                        _ = state.appended.changed() => {}
                        () = tokio::time::sleep(options.poll_interval) => {}
                    }
                }
            }
        }
    })
}
