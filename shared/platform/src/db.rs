//! Database connections picked by the DSN scheme (`postgres://…` or
//! `sqlite://…`), migrations embedded in the binary, and the one mapping from
//! database errors to what they mean for a service.
//!
//! Batch lookups on PostgreSQL (`WHERE id = ANY($1)` with a list of ids) are
//! run as unnamed statements (`.persistent(false)`), so they are planned
//! for each call. A cached generic plan is made once per connection, often
//! while the table is still small, and keeps a sequential scan (comparing
//! every row with every id) long after the table has grown.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection as _};

use crate::secret::Secret;

mod binary_copy;
pub use binary_copy::BinaryCopy;

/// Which database engine a URL points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    /// PostgreSQL (production).
    Postgres,
    /// A SQLite file (the embedded default).
    Sqlite,
}

impl DatabaseKind {
    /// The engine of a database URL, or why the URL is not usable.
    pub fn of_url(url: &str) -> Result<Self, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else {
            Err("must start with postgres://, postgresql:// or sqlite://".to_owned())
        }
    }
}

/// SQLite connections: one writer (SQLite has a single writer, so writes
/// queue in-process instead of failing with SQLITE_BUSY) and several readers.
#[derive(Debug, Clone)]
pub struct SqlitePools {
    /// The one connection that writes.
    pub writer: SqlitePool,
    /// Connections for reads (WAL mode lets them run beside the writer).
    pub reader: SqlitePool,
}

/// An open connection pool to one service's database.
#[derive(Debug, Clone)]
pub enum Pools {
    /// PostgreSQL, with `search_path` set to the service's schema.
    Postgres(PgPool),
    /// SQLite.
    Sqlite(SqlitePools),
}

/// Opens a service's database. On PostgreSQL every connection works in the
/// schema named `schema` (one schema per service, so services can share a
/// database without sharing tables); SQLite files are created when missing.
pub async fn connect(
    url: &Secret,
    schema: &str,
    max_connections: u32,
) -> Result<Pools, sqlx::Error> {
    match DatabaseKind::of_url(url.expose())
        .map_err(|reason| sqlx::Error::Configuration(reason.into()))?
    {
        DatabaseKind::Postgres => {
            // No sequential scan where an index serves. Every read of a
            // service is meant to be an index range, and after five calls
            // PostgreSQL may keep a generic plan for a prepared statement:
            // one made while a table was small would be a sequential scan,
            // cached on the connection while the table grows, until the
            // next ANALYZE (a service's tables start empty and grow under
            // load). With index plans only, the generic plan stays right as
            // the table grows, and statements whose generic plan costs no
            // more than their custom plans are not planned again on every
            // call (planning every call took a third of the database's time
            // under load). Statements whose plan depends on their values
            // (optional filters) keep custom plans: PostgreSQL keeps those
            // when the generic plan costs more. JIT compilation is off: the
            // cost that rules out a sequential scan where it is the only
            // way (a one-row table) would otherwise cross JIT's threshold,
            // and compiling took 150 ms for a statement of 0.1 ms.
            let options = PgConnectOptions::from_str(url.expose())?
                .options([
                    ("search_path", schema),
                    ("enable_seqscan", "off"),
                    ("jit", "off"),
                ])
                .log_statements(tracing::log::LevelFilter::Trace)
                .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
            // One connection made directly first: when the server cannot be
            // reached, the pool would only say that it timed out, while this
            // says why (refused, unknown host, authentication, …).
            let first = tokio::time::timeout(Duration::from_secs(5), options.connect())
                .await
                .map_err(|_| {
                    sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no answer within 5 s",
                    ))
                })??;
            let _ = first.close().await;
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await?;
            Ok(Pools::Postgres(pool))
        }
        DatabaseKind::Sqlite => {
            let options = SqliteConnectOptions::from_str(url.expose())?;
            if let Some(parent) = options.get_filename().parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(sqlx::Error::Io)?;
            }
            let options = options
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                // Statement journals and sorts in memory, pages read through
                // a memory map rather than a read call each.
                .pragma("temp_store", "memory")
                .pragma("mmap_size", "4294967296")
                // Deleted and overwritten content is zeroed in the file, so
                // what an erasure removes cannot be read back from free
                // space (see `wipe_sqlite_wal` for the WAL).
                .pragma("secure_delete", "on")
                .log_statements(tracing::log::LevelFilter::Trace);
            // The one writer keeps up to 64 MiB of pages, so a large
            // transaction does not spill to the WAL before it commits; each
            // reader up to 16 MiB. The writer copies the WAL back into the
            // database (a checkpoint, with its fsync) every 16,384 pages
            // (64 MiB) instead of SQLite's 1,000: under a stream of writes a
            // page changed many times is copied once, and the writer stops
            // for a flush far less often.
            let writer = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(
                    options
                        .clone()
                        .pragma("cache_size", "-65536")
                        .pragma("wal_autocheckpoint", "16384"),
                )
                .await?;
            let reader = SqlitePoolOptions::new()
                .max_connections(max_connections.clamp(1, 8))
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options.read_only(true).pragma("cache_size", "-16384"))
                .await?;
            Ok(Pools::Sqlite(SqlitePools { writer, reader }))
        }
    }
}

/// Copies the WAL of a SQLite database into the main file and truncates it
/// to zero bytes. The WAL keeps every page version written since the last
/// checkpoint, the ones from before an erasure included; with
/// `secure_delete` on, the main file holds no freed content, so after this
/// nothing an erasure removed is left in any file. Waits for readers to
/// finish (a checkpoint cannot pass a reader still on an older snapshot),
/// giving up after `attempts` tries.
pub async fn wipe_sqlite_wal(pools: &SqlitePools, attempts: u32) -> Result<(), sqlx::Error> {
    for attempt in 1..=attempts {
        let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&pools.writer)
            .await?;
        if busy == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
    }
    Err(sqlx::Error::Io(std::io::Error::other(
        "the WAL could not be truncated: readers kept older snapshots open",
    )))
}

/// Whether one PostgreSQL database of this process answers.
#[derive(Debug)]
struct DatabaseHealth {
    /// Where it is, without credentials.
    description: String,
    reachable: std::sync::atomic::AtomicBool,
}

/// Every PostgreSQL database this process serves from, probed every second.
static DATABASES: std::sync::Mutex<Vec<std::sync::Arc<DatabaseHealth>>> =
    std::sync::Mutex::new(Vec::new());

/// How often a served database is probed, and how long a probe may take.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Probes `pool` with `SELECT 1` every second while it is open, so that a
/// call waiting for a connection can be told at once that the database is
/// down (see [`unreachable_database`]) instead of waiting out the pool.
fn watch(pool: &PgPool, description: String) {
    let health = std::sync::Arc::new(DatabaseHealth {
        description,
        reachable: std::sync::atomic::AtomicBool::new(true),
    });
    DATABASES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(health.clone());
    WATCHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pool = pool.clone();
    tokio::spawn(async move {
        while !pool.is_closed() {
            let probe = tokio::time::timeout(PROBE_EVERY, sqlx::query("SELECT 1").execute(&pool));
            let reachable = matches!(probe.await, Ok(Ok(_)));
            let was = health
                .reachable
                .swap(reachable, std::sync::atomic::Ordering::SeqCst);
            match (was, reachable) {
                (true, false) => {
                    tracing::warn!(database = %health.description, "database unreachable")
                }
                (false, true) => {
                    tracing::info!(database = %health.description, "database reachable again")
                }
                _ => {}
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
        DATABASES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|other| !std::sync::Arc::ptr_eq(other, &health));
        WATCHED.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    });
}

/// True when this process serves from a PostgreSQL database (which is
/// probed); the embedded default has none, and its calls need no watch.
pub fn watches_databases() -> bool {
    WATCHED.load(std::sync::atomic::Ordering::Relaxed) > 0
}

/// How many databases are in [`DATABASES`], readable without its lock.
static WATCHED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A PostgreSQL database this process serves from that did not answer its
/// last probe, if any, named without credentials.
pub fn unreachable_database() -> Option<String> {
    DATABASES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|health| !health.reachable.load(std::sync::atomic::Ordering::SeqCst))
        .map(|health| health.description.clone())
}

/// Vacuums a service's PostgreSQL tables soon after an erasure, at most once
/// per interval however many erasures come.
///
/// What this does and does not guarantee: an UPDATE or DELETE leaves the old
/// row version (a dead tuple) in the table's pages until VACUUM removes it
/// and its space is reused; VACUUM marks that space free but does not zero
/// it, so the bytes stay in the data file until a later write covers them,
/// and they stay in WAL segments and base backups until those are recycled
/// or expire. Vacuuming at once shortens how long an erased profile is
/// readable through SQL-level tools (pageinspect, a copy of the data
/// directory) and lets the space be reused early; it cannot promise that
/// nothing is recoverable from the files. Only destroying a per-customer
/// encryption key (crypto-shredding) can, and the SQLite store's
/// `secure_delete` plus WAL truncation does for the embedded default.
#[derive(Clone, Debug)]
pub struct ErasureVacuum {
    wake: std::sync::Arc<tokio::sync::Notify>,
}

impl ErasureVacuum {
    /// Starts the task that vacuums `tables` of `pool`'s schema, at most once
    /// per `interval`, after [`ErasureVacuum::erased`] was called.
    pub fn spawn(pool: PgPool, tables: &'static [&'static str], interval: Duration) -> Self {
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        let woken = wake.clone();
        tokio::spawn(async move {
            let statement = format!("VACUUM (SKIP_LOCKED) {}", tables.join(", "));
            loop {
                woken.notified().await;
                match sqlx::query(&statement).execute(&pool).await {
                    Ok(_) => tracing::info!(tables = ?tables, "vacuumed after an erasure"),
                    Err(err) => {
                        tracing::warn!(error = %err, tables = ?tables, "cannot vacuum after an erasure")
                    }
                }
                tokio::time::sleep(interval).await;
            }
        });
        Self { wake }
    }

    /// An erasure was committed: vacuum soon.
    pub fn erased(&self) {
        self.wake.notify_one();
    }
}

/// Where a database URL points, without its credentials: `PostgreSQL at
/// host:port, database name` or `SQLite file path`.
pub fn describe_url(url: &str) -> String {
    match DatabaseKind::of_url(url) {
        Ok(DatabaseKind::Postgres) => match PgConnectOptions::from_str(url) {
            Ok(options) => format!(
                "PostgreSQL at {}:{}, database {}",
                options.get_host(),
                options.get_port(),
                options.get_database().unwrap_or("(default)")
            ),
            Err(_) => "PostgreSQL, with a URL that does not parse".to_owned(),
        },
        Ok(DatabaseKind::Sqlite) => match SqliteConnectOptions::from_str(url) {
            Ok(options) => format!("SQLite file {}", options.get_filename().display()),
            Err(_) => "SQLite, with a URL that does not parse".to_owned(),
        },
        Err(_) => "an unsupported database URL".to_owned(),
    }
}

/// One migration embedded in the binary.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedMigration {
    /// Version, increasing (e.g. 1, 2, 3).
    pub version: i64,
    /// What it does, for the migrations table.
    pub description: &'static str,
    /// The SQL, run in one transaction.
    pub sql: &'static str,
}

/// A service's migrations, one list per engine.
#[derive(Debug, Clone, Copy)]
pub struct ServiceMigrations {
    /// The schema (PostgreSQL) the service's tables live in.
    pub schema: &'static str,
    /// Migrations for PostgreSQL.
    pub postgres: &'static [EmbeddedMigration],
    /// Migrations for SQLite.
    pub sqlite: &'static [EmbeddedMigration],
}

impl ServiceMigrations {
    fn migrator(list: &[EmbeddedMigration]) -> Migrator {
        let migrations = list
            .iter()
            .map(|m| {
                Migration::new(
                    m.version,
                    Cow::Borrowed(m.description),
                    MigrationType::Simple,
                    Cow::Borrowed(m.sql),
                    false,
                )
            })
            .collect::<Vec<_>>();
        Migrator {
            migrations: Cow::Owned(migrations),
            ignore_missing: false,
            locking: true,
            no_tx: false,
        }
    }

    /// Applies every migration not applied yet. On PostgreSQL an advisory lock
    /// makes concurrent runs (several pods, a migration Job) wait for each
    /// other instead of racing.
    pub async fn run(&self, pools: &Pools) -> Result<(), sqlx::migrate::MigrateError> {
        match pools {
            Pools::Postgres(pool) => {
                sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", self.schema))
                    .execute(pool)
                    .await?;
                Self::migrator(self.postgres).run(pool).await
            }
            Pools::Sqlite(pools) => Self::migrator(self.sqlite).run(&pools.writer).await,
        }
    }

    /// Checks that every migration has been applied, so a service started
    /// without `CLM_MIGRATE_ON_START` fails at once with a clear message
    /// instead of on the first query.
    pub async fn ensure_applied(&self, pools: &Pools) -> Result<(), String> {
        let (expected, applied) = match pools {
            Pools::Postgres(pool) => (
                self.postgres.iter().map(|m| m.version).max().unwrap_or(0),
                sqlx::query_scalar::<_, Option<i64>>(
                    "SELECT MAX(version) FROM _sqlx_migrations WHERE success",
                )
                .fetch_one(pool)
                .await,
            ),
            Pools::Sqlite(pools) => (
                self.sqlite.iter().map(|m| m.version).max().unwrap_or(0),
                sqlx::query_scalar::<_, Option<i64>>(
                    "SELECT MAX(version) FROM _sqlx_migrations WHERE success",
                )
                .fetch_one(&pools.reader)
                .await,
            ),
        };
        match applied {
            Ok(Some(version)) if version >= expected => Ok(()),
            Ok(version) => Err(format!(
                "the {} database is at migration {} but this binary needs {expected}: run `clm migrate {}`",
                self.schema,
                version.unwrap_or(0),
                self.schema
            )),
            Err(_) => Err(format!(
                "the {} database has not been migrated: run `clm migrate {}`",
                self.schema, self.schema
            )),
        }
    }
}

impl ServiceMigrations {
    /// Applies the migrations to a service's database (`clm migrate`).
    pub async fn apply(&self, url: &Secret) -> anyhow::Result<()> {
        self.open(url, 2, true).await?;
        Ok(())
    }

    /// Opens a service's database for serving: applies the migrations when
    /// `migrate` is set (`CLM_MIGRATE_ON_START`), otherwise checks that they
    /// were applied (by `clm migrate`), so a service never runs against a
    /// schema it does not know.
    pub async fn open(
        &self,
        url: &Secret,
        max_connections: u32,
        migrate: bool,
    ) -> anyhow::Result<Pools> {
        let pools = connect(url, self.schema, max_connections)
            .await
            .map_err(|err| {
                anyhow::anyhow!(
                    "cannot open the {} database ({}): {err}",
                    self.schema,
                    describe_url(url.expose())
                )
            })?;
        if let Pools::Postgres(pool) = &pools {
            watch(pool, describe_url(url.expose()));
        }
        if migrate {
            self.run(&pools).await?;
        } else {
            self.ensure_applied(&pools)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        Ok(pools)
    }
}

/// Decoding the column conventions of the SQLite stores: ids as UUID
/// strings, times as microseconds since the Unix epoch.
pub mod sqlite_columns {
    use chrono::{DateTime, Utc};
    use sqlx::Row as _;
    use sqlx::sqlite::SqliteRow;
    use uuid::Uuid;

    /// A decoding error from any error.
    pub fn decode_err(err: impl std::error::Error + Send + Sync + 'static) -> sqlx::Error {
        sqlx::Error::Decode(Box::new(err))
    }

    /// A UUID stored as text.
    pub fn uuid(row: &SqliteRow, column: &str) -> Result<Uuid, sqlx::Error> {
        let raw: String = row.try_get(column)?;
        Uuid::try_parse(&raw).map_err(decode_err)
    }

    /// A time stored as microseconds since the Unix epoch.
    pub fn time(row: &SqliteRow, column: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        let micros: i64 = row.try_get(column)?;
        DateTime::from_timestamp_micros(micros)
            .ok_or_else(|| sqlx::Error::Decode(format!("bad time in {column}").into()))
    }
}

/// What a database error means to a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbErrorKind {
    /// No row matched.
    NotFound,
    /// A unique constraint was violated (PostgreSQL 23505); names it when known.
    UniqueViolation(Option<String>),
    /// A foreign key was violated (PostgreSQL 23503).
    ForeignKeyViolation,
    /// The transaction lost a race and may be retried (PostgreSQL 40001,
    /// 40P01; SQLite busy or locked).
    Retryable,
    /// The database cannot be reached or has no free connection.
    Unavailable,
    /// Anything else: a bug or a broken database.
    Other,
}

/// What a store makes of a database error it has no more specific meaning
/// for: the one policy of every store. Map the specific cases (a key
/// taken, a duplicate to fall back from) with [`classify`] first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbFailure {
    /// The database cannot be reached: UNAVAILABLE, the caller retries
    /// later.
    Unavailable,
    /// The transaction lost a race (a serialization failure, a deadlock, a
    /// busy SQLite file, or a unique violation between two writers of the
    /// same new row): read again and retry.
    Conflict,
    /// Anything else: a bug or a broken database, INTERNAL.
    Internal,
}

/// The [`DbFailure`] of a database error.
pub fn failure_of(err: &sqlx::Error) -> DbFailure {
    match classify(err) {
        DbErrorKind::Unavailable => DbFailure::Unavailable,
        DbErrorKind::Retryable | DbErrorKind::UniqueViolation(_) => DbFailure::Conflict,
        DbErrorKind::NotFound | DbErrorKind::ForeignKeyViolation | DbErrorKind::Other => {
            DbFailure::Internal
        }
    }
}

/// Classifies a database error.
pub fn classify(err: &sqlx::Error) -> DbErrorKind {
    match err {
        sqlx::Error::RowNotFound => DbErrorKind::NotFound,
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => DbErrorKind::Unavailable,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match code.as_ref() {
                "23505" => return DbErrorKind::UniqueViolation(db.constraint().map(str::to_owned)),
                "23503" => return DbErrorKind::ForeignKeyViolation,
                "40001" | "40P01" => return DbErrorKind::Retryable,
                // SQLite primary result codes SQLITE_BUSY (5) and SQLITE_LOCKED (6),
                // with their extended variants.
                "5" | "6" | "261" | "262" | "517" => return DbErrorKind::Retryable,
                "57P01" | "57P02" | "57P03" | "53300" => return DbErrorKind::Unavailable,
                _ => {}
            }
            match db.kind() {
                sqlx::error::ErrorKind::UniqueViolation => {
                    DbErrorKind::UniqueViolation(db.constraint().map(str::to_owned))
                }
                sqlx::error::ErrorKind::ForeignKeyViolation => DbErrorKind::ForeignKeyViolation,
                _ => DbErrorKind::Other,
            }
        }
        _ => DbErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_picks_the_engine() {
        assert_eq!(
            DatabaseKind::of_url("postgres://h/db"),
            Ok(DatabaseKind::Postgres)
        );
        assert_eq!(
            DatabaseKind::of_url("postgresql://h/db"),
            Ok(DatabaseKind::Postgres)
        );
        assert_eq!(
            DatabaseKind::of_url("sqlite://data/x.db"),
            Ok(DatabaseKind::Sqlite)
        );
        assert!(DatabaseKind::of_url("mysql://h/db").is_err());
    }

    #[test]
    fn urls_are_described_without_credentials() {
        assert_eq!(
            describe_url("postgres://clm:hunter2@db.internal:6543/identity"),
            "PostgreSQL at db.internal:6543, database identity"
        );
        assert_eq!(
            describe_url("sqlite://data/identity.db"),
            "SQLite file data/identity.db"
        );
    }

    #[tokio::test]
    async fn an_unreachable_postgres_says_where_and_why() {
        // A port nothing listens on: the error names the host and the cause,
        // not only that a pool timed out.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = Secret::new(format!("postgres://clm@127.0.0.1:{port}/identity"));
        let migrations = ServiceMigrations {
            schema: "identity",
            postgres: &[],
            sqlite: &[],
        };
        let err = migrations
            .open(&url, 2, true)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "PostgreSQL at 127.0.0.1:{port}, database identity"
            )),
            "{err}"
        );
        assert!(err.to_lowercase().contains("refused"), "{err}");
        assert!(!err.contains("timed out"), "{err}");
    }

    #[tokio::test]
    async fn sqlite_unique_violations_are_classified() {
        let dir = tempfile::tempdir().unwrap();
        let url = Secret::new(format!("sqlite://{}/t.db", dir.path().display()));
        let Pools::Sqlite(pools) = connect(&url, "t", 2).await.unwrap() else {
            panic!("expected sqlite")
        };
        sqlx::query("CREATE TABLE t (k TEXT PRIMARY KEY)")
            .execute(&pools.writer)
            .await
            .unwrap();
        sqlx::query("INSERT INTO t VALUES ('a')")
            .execute(&pools.writer)
            .await
            .unwrap();
        let err = sqlx::query("INSERT INTO t VALUES ('a')")
            .execute(&pools.writer)
            .await
            .unwrap_err();
        assert!(matches!(classify(&err), DbErrorKind::UniqueViolation(_)));
        let Err(err) = sqlx::query("SELECT k FROM t WHERE k = 'z'")
            .fetch_one(&pools.reader)
            .await
        else {
            panic!("no row expected")
        };
        assert_eq!(classify(&err), DbErrorKind::NotFound);
    }
}
