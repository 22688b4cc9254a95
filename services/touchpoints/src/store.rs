//! Where touchpoints are kept: a store trait with PostgreSQL and SQLite
//! implementations that hold no business rules, and the embedded migrations.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use clm_eventlog::consumer::cursors::CursorMove;
use clm_eventlog::{Cursor, ShardFilter};
use clm_platform::db::{DbFailure, EmbeddedMigration, Pools, ServiceMigrations};
use tokio::sync::watch;
use uuid::Uuid;

use crate::model::{CustomerChange, LogEntry, Stored, TimelineQuery, Touchpoint, TypeCount};

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A transaction lost a race (deadlock, serialization); safe to retry.
    #[error("transaction conflict: {0}")]
    Conflict(String),
    /// Anything else.
    #[error("database error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Maps a database error.
    pub fn from_db(err: sqlx::Error) -> Self {
        match clm_platform::db::failure_of(&err) {
            DbFailure::Unavailable => Self::Unavailable(err.to_string()),
            DbFailure::Conflict => Self::Conflict(err.to_string()),
            DbFailure::Internal => Self::Internal(err.to_string()),
        }
    }
}

/// The touchpoint service's storage.
#[async_trait]
pub trait TouchpointStore: Send + Sync + 'static {
    /// Stores touchpoints with distinct event ids, atomically; an event id
    /// stored before is reported as a duplicate of the earlier touchpoint. A
    /// touchpoint of a merged customer is stored under the survivor; one of
    /// an erased customer without properties. One outcome per input, in order.
    async fn insert(&self, touchpoints: &[Touchpoint]) -> Result<Vec<Stored>, StoreError>;
    /// The touchpoint stored under an event id.
    async fn find_by_event_id(&self, event_id: &str) -> Result<Option<Touchpoint>, StoreError>;
    /// A page of a customer's timeline, newest first.
    async fn timeline(&self, query: &TimelineQuery) -> Result<Vec<Touchpoint>, StoreError>;
    /// Counts by type of a customer's touchpoints in a window, largest first.
    async fn count_by_type(
        &self,
        customer_id: Uuid,
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
        types: &[String],
    ) -> Result<Vec<TypeCount>, StoreError>;
    /// Up to `limit` final log entries after `after`, in log order.
    async fn read_log(
        &self,
        after: Cursor,
        shard: ShardFilter,
        limit: u32,
    ) -> Result<Vec<(Cursor, LogEntry)>, StoreError>;
    /// Applies customer changes (re-key, strip) and saves the consumer's
    /// cursor, atomically.
    async fn apply_customer_changes(
        &self,
        changes: &[CustomerChange],
        cursor: &CursorMove,
    ) -> Result<(), StoreError>;
    /// The cursor a consumer saved.
    async fn saved_cursor(&self, consumer: &str, shard: ShardFilter) -> Result<String, StoreError>;
    /// Changes whenever this process commits log entries.
    fn appended(&self) -> watch::Receiver<u64>;
    /// Whether every log entry committed before `mark` was first asked is
    /// readable (see [`clm_eventlog::EndMark`]).
    async fn log_end_reached(&self, mark: &clm_eventlog::EndMark) -> Result<bool, StoreError>;
}

/// The migrations of the touchpoints database.
pub const MIGRATIONS: ServiceMigrations = ServiceMigrations {
    schema: "touchpoints",
    postgres: &[
        EmbeddedMigration {
            version: 1,
            description: "touchpoints, log changes, merged and erased customers, consumer cursors",
            sql: include_str!("../migrations/postgres/0001_touchpoints.sql"),
        },
        clm_eventlog::kit::postgres_migration(2),
    ],
    sqlite: &[
        EmbeddedMigration {
            version: 1,
            description: "touchpoints, log changes, merged and erased customers, consumer cursors",
            sql: include_str!("../migrations/sqlite/0001_touchpoints.sql"),
        },
        clm_eventlog::kit::sqlite_migration(2),
    ],
};

/// Opens the store for an open database.
pub fn open(pools: Pools) -> Arc<dyn TouchpointStore> {
    match pools {
        Pools::Postgres(pool) => Arc::new(postgres::PostgresTouchpointStore::new(pool)),
        Pools::Sqlite(pools) => Arc::new(sqlite::SqliteTouchpointStore::new(pools)),
    }
}

/// The encoded log entry for a customer change, with its id.
pub(crate) fn change_entry(
    change: &CustomerChange,
    touchpoint_count: i64,
    now: DateTime<Utc>,
) -> (Uuid, Uuid, &'static str, Vec<u8>) {
    use clm_proto::touchpoint as pb;
    use prost::Message as _;
    let entry_id = Uuid::now_v7();
    let (customer_id, kind, change) = match change {
        CustomerChange::Merged(merge) => (
            merge.survivor_id,
            "touchpoints.rekeyed",
            pb::touchpoint_log_entry::Change::Rekeyed(pb::TouchpointsRekeyed {
                from_customer_id: merge.merged_id.to_string(),
                to_customer_id: merge.survivor_id.to_string(),
                merge_id: merge.merge_id.to_string(),
                touchpoint_count,
            }),
        ),
        CustomerChange::Erased { customer_id, .. } => (
            *customer_id,
            "touchpoints.properties_stripped",
            pb::touchpoint_log_entry::Change::PropertiesStripped(pb::PropertiesStripped {
                touchpoint_count,
            }),
        ),
    };
    let entry = pb::TouchpointLogEntry {
        cursor: String::new(),
        entry_id: entry_id.to_string(),
        customer_id: customer_id.to_string(),
        commit_time: Some(clm_platform::time::to_timestamp(now)),
        change: Some(change),
    };
    (entry_id, customer_id, kind, entry.encode_to_vec())
}
