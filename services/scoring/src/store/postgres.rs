//! The scoring store on PostgreSQL (schema `scoring`).
//!
//! This module holds the store, what its parts share and the
//! [`ScoringStore`](super::ScoringStore) implementation (made by the
//! `seams` macro), each of whose methods calls the part
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

use chrono::{DateTime, Utc};

use clm_eventlog::{EventLog, ShardFilter};
use clm_platform::db::Pools;
use clm_proto::scoring as proto;
use sqlx::postgres::{PgPool, PgRow};
use uuid::Uuid;

use super::{
    Activation, ChangeSet, CustomerRecord, Fence, Input, ModelInsert, RescoreRow, StoreError,
    TRANSITION_LOG_TABLE, TransitionQuery,
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

super::seams::forward_to_seams!(PostgresScoringStore);
