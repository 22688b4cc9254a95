//! The scoring store on SQLite (the embedded default). Ids are UUID
//! strings; times are microseconds since the Unix epoch. The single writer
//! connection serialises every write transaction.
//!
//! This module holds the store, what its parts share (the column
//! conversions, and the checks that a caller asks for no part of the
//! shards) and the [`ScoringStore`](super::ScoringStore) implementation
//! (made by the `seams` macro), each of whose methods
//! calls the part that does the work: `customers` (reading customers for a
//! unit of work, the sweep, a rescore and the pusher), `writes`
//! (committing a change set), `models`, `rescores` and `history` (recorded
//! transitions and kept inputs), as in the PostgreSQL store.

mod customers;
mod history;
mod models;
mod rescores;
mod writes;

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use clm_eventlog::{EventLog, ShardFilter};
use clm_platform::db::{Pools, SqlitePools};
use clm_proto::scoring as proto;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;

use super::{
    Activation, ChangeSet, CustomerRecord, Fence, Input, ModelInsert, RescoreRow, StoreError,
    TRANSITION_LOG_TABLE, TransitionQuery,
};
use crate::evaluate::LifecycleSnapshot;
use crate::history::RecordedTransition;
use crate::model::Model;

const PENDING: i32 = proto::RescoreState::Pending as i32;
const RUNNING: i32 = proto::RescoreState::Running as i32;
const CANCELLED: i32 = proto::RescoreState::Cancelled as i32;
const SUCCEEDED: i32 = proto::RescoreState::Succeeded as i32;

/// The scoring state in a SQLite file.
pub struct SqliteScoringStore {
    pools: SqlitePools,
    log: EventLog,
}

impl SqliteScoringStore {
    /// A store over open pools.
    pub fn new(pools: SqlitePools) -> Self {
        let log = EventLog::new(Pools::Sqlite(pools.clone()), TRANSITION_LOG_TABLE);
        Self { pools, log }
    }

    /// The rows `select` returns for the customers `ids`: its `{ids}` stands
    /// for the placeholders of up to 500 ids a query. Read on the writer: a
    /// consumer's read-modify-write must see the latest commit.
    async fn rows_of(&self, select: &str, ids: &[Uuid]) -> Result<Vec<SqliteRow>, StoreError> {
        let mut rows = Vec::new();
        for chunk in ids.chunks(500) {
            let sql = select.replace("{ids}", &vec!["?"; chunk.len()].join(", "));
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id.to_string());
            }
            rows.extend(
                query
                    .fetch_all(&self.pools.writer)
                    .await
                    .map_err(StoreError::from_db)?,
            );
        }
        Ok(rows)
    }
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn optional_time(row: &SqliteRow, column: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let raw: Option<i64> = row.try_get(column)?;
    Ok(raw.and_then(DateTime::from_timestamp_micros))
}

fn optional_uuid(row: &SqliteRow, column: &str) -> Result<Option<Uuid>, sqlx::Error> {
    let raw: Option<String> = row.try_get(column)?;
    raw.map(|raw| Uuid::try_parse(&raw).map_err(clm_platform::db::sqlite_columns::decode_err))
        .transpose()
}

/// One process owns every shard of a SQLite database: its background work
/// is not divided, and a request for part of it is a bug.
fn whole(shard: ShardFilter) -> Result<(), StoreError> {
    if shard == ShardFilter::ALL {
        Ok(())
    } else {
        Err(StoreError::Internal(format!(
            "a SQLite store does not divide its customers by shard (asked for shard {} of {})",
            shard.index, shard.count
        )))
    }
}

/// A fence on SQLite, where one process owns every shard.
fn sole(fence: &Fence) -> Result<(), StoreError> {
    match fence {
        Fence::Sole => Ok(()),
        Fence::Lease { .. } => Err(StoreError::Internal(
            "a SQLite store has no shard leases".to_owned(),
        )),
    }
}

super::seams::forward_to_seams!(SqliteScoringStore);
