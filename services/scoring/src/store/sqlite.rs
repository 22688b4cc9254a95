//! The scoring store on SQLite (the embedded default). Ids are UUID
//! strings; times are microseconds since the Unix epoch. The single writer
//! connection serialises every write transaction.
//!
//! This module holds the store, what its parts share (the column
//! conversions, and the checks that a caller asks for no part of the
//! shards) and the [`ScoringStore`] implementation, each of whose methods
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

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use clm_eventlog::consumer::cursors;
use clm_eventlog::{EventLog, ShardFilter};
use clm_platform::db::{Pools, SqlitePools};
use clm_proto::scoring as proto;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;

use super::{
    Activation, ChangeSet, CustomerRecord, Fence, Input, ModelInsert, RescoreRow, ScoringStore,
    StoreError, TRANSITION_LOG_TABLE, TransitionQuery,
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

#[async_trait]
impl ScoringStore for SqliteScoringStore {
    async fn load_customers(
        &self,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, CustomerRecord>, StoreError> {
        customers::load_customers(self, ids).await
    }

    async fn commit(&self, changes: &ChangeSet) -> Result<(), StoreError> {
        writes::commit(self, changes).await
    }

    async fn due_customers(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        shard: ShardFilter,
    ) -> Result<Vec<Uuid>, StoreError> {
        customers::due_customers(self, now, limit, shard).await
    }

    async fn customers_after(
        &self,
        after: Option<Uuid>,
        limit: u32,
        shard: ShardFilter,
    ) -> Result<Vec<CustomerRecord>, StoreError> {
        customers::customers_after(self, after, limit, shard).await
    }

    async fn count_scored(&self) -> Result<i64, StoreError> {
        customers::count_scored(self).await
    }

    async fn unpushed(
        &self,
        limit: u32,
        position: bool,
        after: Option<Uuid>,
        shards: &[ShardFilter],
    ) -> Result<Vec<(Uuid, i64, LifecycleSnapshot)>, StoreError> {
        customers::unpushed(self, limit, position, after, shards).await
    }

    async fn mark_pushed(
        &self,
        pushed: &[(Uuid, i64)],
        fences: &[Fence],
    ) -> Result<(), StoreError> {
        customers::mark_pushed(self, pushed, fences).await
    }

    async fn insert_model(&self, model: &Model) -> Result<ModelInsert, StoreError> {
        models::insert_model(self, model).await
    }

    async fn model(&self, version: &str) -> Result<Option<Model>, StoreError> {
        models::model(self, version).await
    }

    async fn active_model(&self) -> Result<Option<Model>, StoreError> {
        models::active_model(self).await
    }

    async fn list_models(
        &self,
        after: Option<(DateTime<Utc>, String)>,
        limit: u32,
    ) -> Result<Vec<Model>, StoreError> {
        models::list_models(self, after, limit).await
    }

    async fn activate(
        &self,
        version: &str,
        expected_active: Option<&str>,
        rescore: RescoreRow,
        now: DateTime<Utc>,
    ) -> Result<Activation, StoreError> {
        models::activate(self, version, expected_active, rescore, now).await
    }

    async fn install_default(&self, model: &Model, now: DateTime<Utc>) -> Result<(), StoreError> {
        models::install_default(self, model, now).await
    }

    async fn start_rescore(&self, rescore: RescoreRow) -> Result<(RescoreRow, bool), StoreError> {
        rescores::start_rescore(self, rescore).await
    }

    async fn rescore(&self, id: Option<Uuid>) -> Result<Option<RescoreRow>, StoreError> {
        rescores::rescore(self, id).await
    }

    async fn rescore_to_run(&self) -> Result<Option<RescoreRow>, StoreError> {
        rescores::rescore_to_run(self).await
    }

    async fn finish_rescore_shard(
        &self,
        id: Uuid,
        shard: ShardFilter,
        resume_after: Option<Uuid>,
        at: DateTime<Utc>,
        fence: &Fence,
    ) -> Result<bool, StoreError> {
        rescores::finish_rescore_shard(self, id, shard, resume_after, at, fence).await
    }

    async fn rescore_shard(
        &self,
        id: Uuid,
        shard: ShardFilter,
    ) -> Result<(Option<Uuid>, bool), StoreError> {
        rescores::rescore_shard(self, id, shard).await
    }

    async fn set_rescore_state(
        &self,
        id: Uuid,
        state: i32,
        at: DateTime<Utc>,
        error: &str,
    ) -> Result<(), StoreError> {
        rescores::set_rescore_state(self, id, state, at, error).await
    }

    async fn last_transition(
        &self,
        customer_id: Uuid,
    ) -> Result<Option<RecordedTransition>, StoreError> {
        history::last_transition(self, customer_id).await
    }

    async fn list_transitions(
        &self,
        query: &TransitionQuery,
    ) -> Result<Vec<RecordedTransition>, StoreError> {
        history::list_transitions(self, query).await
    }

    async fn customer_transitions(
        &self,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<RecordedTransition>>, StoreError> {
        history::customer_transitions(self, ids).await
    }

    async fn load_inputs(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Vec<Input>>, StoreError> {
        history::load_inputs(self, ids).await
    }

    fn transition_log(&self) -> &EventLog {
        &self.log
    }

    async fn saved_cursor(&self, consumer: &str, shard: ShardFilter) -> Result<String, StoreError> {
        cursors::load(&Pools::Sqlite(self.pools.clone()), consumer, shard)
            .await
            .map_err(|err| StoreError::Unavailable(err.0))
    }
}
