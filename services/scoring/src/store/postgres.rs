//! The scoring store on PostgreSQL (schema `scoring`).
//!
//! This module holds the store, what its parts share and the
//! [`ScoringStore`] implementation, each of whose methods calls the part
//! that does the work: `customers` (reading customers for a unit of work,
//! the sweep, a rescore and the pusher), `writes` (committing a change
//! set), `models`, `rescores` and `history` (recorded transitions and kept
//! inputs).

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
use clm_platform::db::Pools;
use clm_proto::scoring as proto;
use sqlx::postgres::{PgPool, PgRow};
use uuid::Uuid;

use super::{
    Activation, ChangeSet, CustomerRecord, Fence, Input, ModelInsert, RescoreRow, ScoringStore,
    StoreError, TRANSITION_LOG_TABLE, TransitionQuery,
};
use crate::evaluate::LifecycleSnapshot;
use crate::history::RecordedTransition;
use crate::model::Model;

const PENDING: i16 = proto::RescoreState::Pending as i16;
const RUNNING: i16 = proto::RescoreState::Running as i16;
const CANCELLED: i16 = proto::RescoreState::Cancelled as i16;
const SUCCEEDED: i16 = proto::RescoreState::Succeeded as i16;

/// The scoring state in PostgreSQL.
pub struct PostgresScoringStore {
    pool: PgPool,
    log: EventLog,
    /// Profile facts are personal data: their old row versions are vacuumed
    /// soon after an erasure.
    vacuum: clm_platform::db::ErasureVacuum,
}

impl PostgresScoringStore {
    /// The rows `select` returns with the customers `ids` as its `$1`.
    async fn rows_of(&self, select: &str, ids: &[Uuid]) -> Result<Vec<PgRow>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query(select)
            // Planned for each call (see `clm_platform::db` on batch lookups).
            .persistent(false)
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from_db)
    }

    /// A store over an open pool whose `search_path` is the scoring schema.
    pub fn new(pool: PgPool) -> Self {
        let log = EventLog::new(Pools::Postgres(pool.clone()), TRANSITION_LOG_TABLE);
        let vacuum = clm_platform::db::ErasureVacuum::spawn(
            pool.clone(),
            &["customer_features", "customer_inputs"],
            std::time::Duration::from_secs(10),
        );
        Self { pool, log, vacuum }
    }
}

#[async_trait]
impl ScoringStore for PostgresScoringStore {
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
        cursors::load(&Pools::Postgres(self.pool.clone()), consumer, shard)
            .await
            .map_err(|err| StoreError::Unavailable(err.0))
    }
}
