//! The scoring store on PostgreSQL (schema `scoring`).

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use clm_eventlog::consumer::cursors;
use clm_eventlog::{EventLog, ShardFilter};
use clm_platform::db::Pools;
use clm_proto::scoring as proto;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::{
    Activation, ChangeSet, CursorMove, CustomerRecord, CustomerWrite, Fence, Input, ModelInsert,
    RescoreRow, ScoringStore, StoreError, TRANSITION_LOG_TABLE, TransitionQuery, decode_fact,
    decode_features, decode_model, decode_snapshot, decode_transition, encode_fact,
    encode_features, encode_model, encode_snapshot, encode_transition, log_entries,
};
use crate::evaluate::LifecycleSnapshot;
use crate::history::RecordedTransition;
use crate::model::Model;

/// The merged_into column as read.
type MergedInto = Uuid;
/// The advisory lock that serialises model activations and rescore starts.
const MODELS_LOCK: i64 = 0x636c_6d73;

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

const CUSTOMER_COLUMNS: &str = "c.customer_id, c.merged_into, c.snapshot, c.next_due_at, \
     c.version, f.features, f.folded_to, f.inputs_kept";

fn customer_from_row(row: &PgRow) -> Result<CustomerRecord, StoreError> {
    let get = |err: sqlx::Error| StoreError::Corrupt(err.to_string());
    let features: Option<Vec<u8>> = row.try_get("features").map_err(get)?;
    let snapshot: Option<Vec<u8>> = row.try_get("snapshot").map_err(get)?;
    Ok(CustomerRecord {
        customer_id: row.try_get("customer_id").map_err(get)?,
        merged_into: row.try_get("merged_into").map_err(get)?,
        features: decode_features(features.as_deref())?,
        snapshot: decode_snapshot(snapshot.as_deref())?,
        next_due_at: row.try_get("next_due_at").map_err(get)?,
        version: row.try_get("version").map_err(get)?,
        folded_to: row.try_get("folded_to").map_err(get)?,
        // No features row: nothing was folded in, so nothing is missing.
        inputs_kept: row
            .try_get::<Option<bool>, _>("inputs_kept")
            .map_err(get)?
            .unwrap_or(true),
    })
}

fn rescore_from_row(row: &PgRow) -> Result<RescoreRow, sqlx::Error> {
    Ok(RescoreRow {
        id: row.try_get("id")?,
        model_version: row.try_get("model_version")?,
        state: i32::from(row.try_get::<i16, _>("state")?),
        trigger: i32::from(row.try_get::<i16, _>("trigger_kind")?),
        done_count: row.try_get("done_count")?,
        total_count: row.try_get("total_count")?,
        changed_count: row.try_get("changed_count")?,
        rate_per_second: row.try_get("rate_per_second")?,
        create_time: row.try_get("create_time")?,
        start_time: row.try_get("start_time")?,
        end_time: row.try_get("end_time")?,
        error: row.try_get("error")?,
        resume_after: row.try_get("resume_after")?,
    })
}

fn model_from_row(row: &PgRow) -> Result<Model, StoreError> {
    let get = |err: sqlx::Error| StoreError::Corrupt(err.to_string());
    let body: Vec<u8> = row.try_get("body").map_err(get)?;
    decode_model(
        &body,
        row.try_get("built_in").map_err(get)?,
        row.try_get("create_time").map_err(get)?,
        row.try_get("activate_time").map_err(get)?,
        row.try_get("active").map_err(get)?,
    )
}

const MODEL_COLUMNS: &str = "m.version, m.body, m.built_in, m.create_time, m.activate_time, \
     EXISTS (SELECT 1 FROM active_model a WHERE a.version = m.version) AS active";

const RESCORE_COLUMNS: &str = "id, model_version, state, trigger_kind, done_count, total_count, \
     changed_count, rate_per_second, create_time, start_time, end_time, error, resume_after";

async fn move_cursor(tx: &mut PgConnection, cursor: &CursorMove) -> Result<(), StoreError> {
    cursors::move_postgres(tx, cursor)
        .await
        .map_err(StoreError::from_db)?
        .map_err(StoreError::from)
}

/// Checks the shard leases, last before the commit.
async fn check_fences(tx: &mut PgConnection, fences: &[Fence]) -> Result<(), StoreError> {
    Fence::check_all_postgres(fences, tx)
        .await
        .map_err(StoreError::from_db)?
        .map_err(|lost| StoreError::LeaseLost(lost.to_string()))
}

/// `$count` = 1 or the row's shard is `$index` of `$count`.
fn shard_condition(count: usize, index: usize) -> String {
    format!("(${count} = 1 OR c.shard % ${count} = ${index})")
}

/// Plans the rest of the transaction with key lookups in the order of the
/// ids given. Otherwise, on a small table or for a large batch, the planner
/// picks a hash join over a sequential or bitmap scan, which visits (and
/// locks) rows in their physical order: two writers sharing customers could
/// then lock them in opposite orders and deadlock, each deadlock stalling
/// both for `deadlock_timeout` (seen under the lifecycle benchmark). What
/// the transaction does after the update only inserts or looks up by key.
const ORDERED_LOOKUPS: &str = "SELECT set_config('enable_seqscan', 'off', true), \
     set_config('enable_bitmapscan', 'off', true), set_config('enable_hashjoin', 'off', true), \
     set_config('enable_mergejoin', 'off', true)";

async fn write_customers(tx: &mut PgConnection, changes: &ChangeSet) -> Result<(), StoreError> {
    // In id order, and the update below runs as a nested loop over those
    // ids with a primary key lookup each (see ORDERED_LOOKUPS), so it locks
    // rows in id order as it goes: writers sharing customers (a touchpoint
    // shard consumer and the customer event consumer, the sweep, a rescore)
    // wait for each other rather than deadlock. The pusher skips locked
    // rows and never waits. No SELECT ... FOR UPDATE first: it wrote each
    // row's lock to the heap and the WAL before the update wrote the row
    // again, and took the locks earlier, so they were held longer.
    let mut sorted: Vec<&CustomerWrite> = changes.customers.iter().collect();
    sorted.sort_by_key(|write| write.record.customer_id);
    let (inserts, updates): (Vec<_>, Vec<_>) = sorted
        .iter()
        .copied()
        .partition(|write| write.record.version == 0);
    if !inserts.is_empty() {
        let mut query = QueryBuilder::<Postgres>::new(
            "INSERT INTO customers (customer_id, shard, merged_into, snapshot, next_due_at, version, position_version) ",
        );
        query.push_values(&inserts, |mut row, write| {
            let record = &write.record;
            row.push_bind(record.customer_id)
                .push_bind(clm_eventlog::shard_of(Some(record.customer_id)))
                .push_bind(record.merged_into)
                .push_bind(encode_snapshot(record.snapshot.as_ref()))
                .push_bind(record.next_due_at)
                .push_bind(1_i64)
                .push_bind(i64::from(write.position_changed));
        });
        query.push(" ON CONFLICT (customer_id) DO NOTHING");
        let inserted = query
            .build()
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        if inserted.rows_affected() != inserts.len() as u64 {
            return Err(StoreError::Conflict(
                "a customer was stored concurrently".into(),
            ));
        }
    }
    if !updates.is_empty() {
        sqlx::query(ORDERED_LOOKUPS)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        let ids: Vec<Uuid> = updates.iter().map(|w| w.record.customer_id).collect();
        let merged: Vec<Option<Uuid>> = updates.iter().map(|w| w.record.merged_into).collect();
        let snapshots: Vec<Option<Vec<u8>>> = updates
            .iter()
            .map(|w| encode_snapshot(w.record.snapshot.as_ref()))
            .collect();
        let due: Vec<Option<DateTime<Utc>>> =
            updates.iter().map(|w| w.record.next_due_at).collect();
        let versions: Vec<i64> = updates.iter().map(|w| w.record.version).collect();
        let moved: Vec<bool> = updates.iter().map(|w| w.position_changed).collect();
        // `last_transition` is no longer kept here (the newest row of
        // `transitions` is read instead): cleared so rows written by
        // earlier versions shrink as they are rewritten.
        let updated = sqlx::query(
            "UPDATE customers AS c SET merged_into = u.merged_into, snapshot = u.snapshot, \
               last_transition = NULL, next_due_at = u.next_due_at, version = c.version + 1, \
               position_version = CASE WHEN u.moved THEN c.version + 1 ELSE c.position_version END \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::bytea[], $4::timestamptz[], $5::bigint[], $6::bool[]) \
               AS u(customer_id, merged_into, snapshot, next_due_at, version, moved) \
             WHERE c.customer_id = u.customer_id AND c.version = u.version",
        )
        .bind(&ids)
        .bind(&merged)
        .bind(&snapshots)
        .bind(&due)
        .bind(&versions)
        .bind(&moved)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        if updated.rows_affected() != updates.len() as u64 {
            return Err(StoreError::Conflict(
                "a customer changed concurrently".into(),
            ));
        }
    }
    let features: Vec<_> = sorted
        .iter()
        .filter(|write| write.features_changed)
        .collect();
    if !features.is_empty() {
        let ids: Vec<Uuid> = features.iter().map(|w| w.record.customer_id).collect();
        let bodies: Vec<Vec<u8>> = features
            .iter()
            .map(|w| encode_features(&w.record.features))
            .collect();
        let folded_to: Vec<Option<DateTime<Utc>>> =
            features.iter().map(|w| w.record.folded_to).collect();
        let kept: Vec<bool> = features.iter().map(|w| w.record.inputs_kept).collect();
        sqlx::query(
            "INSERT INTO customer_features (customer_id, features, folded_to, inputs_kept) \
             SELECT * FROM UNNEST($1::uuid[], $2::bytea[], $3::timestamptz[], $4::bool[]) \
             ON CONFLICT (customer_id) DO UPDATE SET features = EXCLUDED.features, \
               folded_to = EXCLUDED.folded_to, inputs_kept = EXCLUDED.inputs_kept",
        )
        .bind(&ids)
        .bind(&bodies)
        .bind(&folded_to)
        .bind(&kept)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
    }
    Ok(())
}

async fn write_inputs(tx: &mut PgConnection, changes: &ChangeSet) -> Result<(), StoreError> {
    for (merged, survivor) in &changes.moved_inputs {
        sqlx::query(
            "WITH gone AS (DELETE FROM customer_inputs WHERE customer_id = $1 AND NOT is_profile \
               RETURNING *) \
             INSERT INTO customer_inputs (customer_id, input_key, occur_time, is_profile, body) \
             SELECT $2, input_key, occur_time, is_profile, body FROM gone ON CONFLICT DO NOTHING",
        )
        .bind(merged)
        .bind(survivor)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
    }
    if !changes.forgotten_profiles.is_empty() {
        sqlx::query("DELETE FROM customer_inputs WHERE customer_id = ANY($1) AND is_profile")
            .bind(&changes.forgotten_profiles)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
    }
    if changes.inputs.is_empty() {
        return Ok(());
    }
    // A profile is replaced; a touchpoint's facts never change. Each key
    // comes once (see `ChangeSet::inputs`).
    let mut customers = Vec::with_capacity(changes.inputs.len());
    let mut keys = Vec::with_capacity(changes.inputs.len());
    let mut times = Vec::with_capacity(changes.inputs.len());
    let mut profiles = Vec::with_capacity(changes.inputs.len());
    let mut bodies = Vec::with_capacity(changes.inputs.len());
    for (customer, input) in &changes.inputs {
        customers.push(*customer);
        keys.push(input.key.as_str());
        times.push(input.at);
        profiles.push(input.is_profile());
        bodies.push(encode_fact(&input.fact));
    }
    sqlx::query(
        "INSERT INTO customer_inputs (customer_id, input_key, occur_time, is_profile, body) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::bool[], $5::bytea[]) \
         ON CONFLICT (customer_id, input_key) DO UPDATE SET \
           occur_time = EXCLUDED.occur_time, body = EXCLUDED.body",
    )
    .bind(&customers)
    .bind(&keys)
    .bind(&times)
    .bind(&profiles)
    .bind(&bodies)
    .execute(&mut *tx)
    .await
    .map_err(StoreError::from_db)?;
    Ok(())
}

async fn write_transitions(
    tx: &mut PgConnection,
    log: &EventLog,
    changes: &ChangeSet,
) -> Result<(), StoreError> {
    if !changes.retracted.is_empty() {
        let ids: Vec<Uuid> = changes.retracted.iter().map(|t| t.id).collect();
        sqlx::query("DELETE FROM transitions WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
    }
    let transitions = &changes.transitions;
    if !transitions.is_empty() {
        let mut ids = Vec::with_capacity(transitions.len());
        let mut customers = Vec::with_capacity(transitions.len());
        let mut times = Vec::with_capacity(transitions.len());
        let mut bodies = Vec::with_capacity(transitions.len());
        for transition in transitions {
            ids.push(transition.id);
            customers.push(transition.customer_id);
            times.push(transition.at);
            bodies.push(encode_transition(transition));
        }
        sqlx::query(
            "INSERT INTO transitions (id, customer_id, transition_time, body) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[], $4::bytea[])",
        )
        .bind(&ids)
        .bind(&customers)
        .bind(&times)
        .bind(&bodies)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
    }
    let now = Utc::now();
    let entries = log_entries(changes, now);
    if entries.is_empty() {
        return Ok(());
    }
    let appended: Vec<_> = entries.iter().map(|entry| entry.to_append(now)).collect();
    log.append_many_postgres(tx, &appended)
        .await
        .map_err(StoreError::from_db)?;
    Ok(())
}

/// `rows` decoded and grouped by their `customer_id` column, in row order.
fn by_customer<T>(
    rows: &[PgRow],
    decode: impl Fn(&PgRow) -> Result<T, StoreError>,
) -> Result<HashMap<Uuid, Vec<T>>, StoreError> {
    let mut out: HashMap<Uuid, Vec<T>> = HashMap::new();
    for row in rows {
        let customer: Uuid = row.try_get("customer_id").map_err(corrupt)?;
        out.entry(customer).or_default().push(decode(row)?);
    }
    Ok(out)
}

fn corrupt(err: sqlx::Error) -> StoreError {
    StoreError::Corrupt(err.to_string())
}

#[async_trait]
impl ScoringStore for PostgresScoringStore {
    async fn load_customers(
        &self,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, CustomerRecord>, StoreError> {
        let select = format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers c \
             LEFT JOIN customer_features f ON f.customer_id = c.customer_id \
             WHERE c.customer_id = ANY($1)"
        );
        let rows = self.rows_of(&select, ids).await?;
        rows.iter()
            .map(|row| customer_from_row(row).map(|record| (record.customer_id, record)))
            .collect()
    }

    async fn commit(&self, changes: &ChangeSet) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
        if changes.cursor.is_some() || changes.rescore.is_some() {
            // Derived state need not wait for its WAL flush: if the database
            // crashes before the flush, the state is lost together with the
            // cursor (or rescore progress) saved beside it, and is derived
            // again from the log.
            sqlx::query("SET LOCAL synchronous_commit = off")
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from_db)?;
        }
        write_customers(&mut tx, changes).await?;
        write_inputs(&mut tx, changes).await?;
        write_transitions(&mut tx, &self.log, changes).await?;
        // Last, so the rows every shard's rescore pages share (the
        // rescore's sums) and the shard's lock are held only until the
        // commit.
        if let Some(progress) = &changes.rescore {
            record_rescore_page(&mut tx, progress).await?;
        }
        match &changes.cursor {
            Some(cursor) => move_cursor(&mut tx, cursor).await?,
            None => check_fences(&mut tx, std::slice::from_ref(&changes.fence)).await?,
        }
        tx.commit().await.map_err(StoreError::from_db)?;
        if !changes.forgotten_profiles.is_empty() {
            self.vacuum.erased();
        }
        if !changes.transitions.is_empty() || !changes.retracted.is_empty() {
            self.log.notify_appended();
        }
        Ok(())
    }

    async fn due_customers(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        shard: ShardFilter,
    ) -> Result<Vec<Uuid>, StoreError> {
        sqlx::query_scalar(&format!(
            "SELECT customer_id FROM customers c WHERE next_due_at IS NOT NULL AND next_due_at <= $1 \
               AND {} ORDER BY next_due_at LIMIT $2",
            shard_condition(3, 4)
        ))
        .bind(now)
        .bind(i64::from(limit))
        .bind(shard.count as i32)
        .bind(shard.index as i32)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from_db)
    }

    async fn customers_after(
        &self,
        after: Option<Uuid>,
        limit: u32,
        shard: ShardFilter,
    ) -> Result<Vec<CustomerRecord>, StoreError> {
        // A range scan of the primary key from `after` (the nil id sorts
        // before every other), skipping the other shards' rows.
        let rows = sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers c \
             LEFT JOIN customer_features f ON f.customer_id = c.customer_id \
             WHERE c.customer_id > $1 AND c.merged_into IS NULL \
               AND c.snapshot IS NOT NULL AND {} \
             ORDER BY c.customer_id LIMIT $2",
            shard_condition(3, 4)
        ))
        .bind(after.unwrap_or(Uuid::nil()))
        .bind(i64::from(limit))
        .bind(shard.count as i32)
        .bind(shard.index as i32)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        rows.iter().map(customer_from_row).collect()
    }

    async fn count_scored(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar(
            "SELECT count(*) FROM customers WHERE merged_into IS NULL AND snapshot IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::from_db)
    }

    async fn unpushed(
        &self,
        limit: u32,
        position: bool,
        after: Option<Uuid>,
        shards: &[ShardFilter],
    ) -> Result<Vec<(Uuid, i64, LifecycleSnapshot)>, StoreError> {
        let Some(count) = shards.first().map(|shard| shard.count) else {
            return Ok(Vec::new());
        };
        // A range of the partial index, in its order. One scan for all the
        // shards held: the index holds every shard's rows (and the dead
        // entries of rows updated since), so a scan per shard would cost
        // as much as one for all, times the shards.
        let mut query = QueryBuilder::<Postgres>::new(
            "SELECT customer_id, version, snapshot, merged_into FROM customers WHERE ",
        );
        if count > 1 && shards.len() < count as usize {
            let indices: Vec<i32> = shards.iter().map(|shard| shard.index as i32).collect();
            query
                .push("shard % ")
                .push_bind(count as i32)
                .push(" = ANY(")
                .push_bind(indices)
                .push(") AND ");
        }
        query.push(if position {
            "pushed_version < position_version"
        } else {
            "pushed_version < version AND pushed_version >= position_version"
        });
        if let Some(after) = after {
            query.push(" AND customer_id > ").push_bind(after);
        }
        query
            .push(" ORDER BY customer_id LIMIT ")
            .push_bind(i64::from(limit));
        let rows = query
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from_db)?;
        let mut out = Vec::with_capacity(rows.len());
        // Nothing to push for these (identity ignores merged customers):
        // recorded as received, in one write.
        let mut nothing = Vec::new();
        for row in &rows {
            let id: Uuid = row.try_get("customer_id").map_err(StoreError::from_db)?;
            let version: i64 = row.try_get("version").map_err(StoreError::from_db)?;
            let snapshot: Option<Vec<u8>> = row.try_get("snapshot").map_err(StoreError::from_db)?;
            let merged = row
                .try_get::<Option<MergedInto>, _>("merged_into")
                .map_err(StoreError::from_db)?
                .is_some();
            match decode_snapshot(snapshot.as_deref())? {
                Some(snapshot) if !merged => out.push((id, version, snapshot)),
                _ => nothing.push((id, version)),
            }
        }
        self.mark_pushed(&nothing, &[]).await?;
        Ok(out)
    }

    async fn mark_pushed(
        &self,
        pushed: &[(Uuid, i64)],
        fences: &[Fence],
    ) -> Result<(), StoreError> {
        if pushed.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
        let ids: Vec<Uuid> = pushed.iter().map(|p| p.0).collect();
        let versions: Vec<i64> = pushed.iter().map(|p| p.1).collect();
        // Rows a writer holds are skipped, not waited for: they are pushed
        // again next round (identity ignores a snapshot it has).
        sqlx::query(
            "WITH pushed AS (SELECT * FROM UNNEST($1::uuid[], $2::bigint[]) AS u(customer_id, version)), \
             free AS (SELECT c.customer_id FROM customers c JOIN pushed p ON p.customer_id = c.customer_id \
                      WHERE c.pushed_version < p.version ORDER BY c.customer_id FOR UPDATE OF c SKIP LOCKED) \
             UPDATE customers AS c SET pushed_version = p.version FROM pushed p, free f \
             WHERE c.customer_id = p.customer_id AND f.customer_id = c.customer_id",
        )
        .bind(&ids)
        .bind(&versions)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        check_fences(&mut tx, fences).await?;
        tx.commit().await.map_err(StoreError::from_db)
    }

    async fn insert_model(&self, model: &Model) -> Result<ModelInsert, StoreError> {
        let now = model.create_time.unwrap_or_else(Utc::now);
        let inserted = sqlx::query(
            "INSERT INTO models (version, body, built_in, create_time) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(&model.version)
        .bind(encode_model(model))
        .bind(model.built_in)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        let stored = self
            .model(&model.version)
            .await?
            .ok_or_else(|| StoreError::Internal("a stored model vanished".into()))?;
        Ok(if inserted.rows_affected() == 1 {
            ModelInsert::Created(stored)
        } else {
            ModelInsert::Exists(stored)
        })
    }

    async fn model(&self, version: &str) -> Result<Option<Model>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {MODEL_COLUMNS} FROM models m WHERE m.version = $1"
        ))
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        row.as_ref().map(model_from_row).transpose()
    }

    async fn active_model(&self) -> Result<Option<Model>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {MODEL_COLUMNS} FROM models m JOIN active_model a ON a.version = m.version"
        ))
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        row.as_ref().map(model_from_row).transpose()
    }

    async fn list_models(
        &self,
        after: Option<(DateTime<Utc>, String)>,
        limit: u32,
    ) -> Result<Vec<Model>, StoreError> {
        let (time, version) = after.unzip();
        let rows = sqlx::query(&format!(
            "SELECT {MODEL_COLUMNS} FROM models m \
             WHERE $1::timestamptz IS NULL OR (m.create_time, m.version) < ($1, $2) \
             ORDER BY m.create_time DESC, m.version DESC LIMIT $3"
        ))
        .bind(time)
        .bind(version)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        rows.iter().map(model_from_row).collect()
    }

    async fn activate(
        &self,
        version: &str,
        expected_active: Option<&str>,
        rescore: RescoreRow,
        now: DateTime<Utc>,
    ) -> Result<Activation, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
        // One activation at a time.
        lock_models(&mut tx).await?;
        let exists: Option<String> =
            sqlx::query_scalar("SELECT version FROM models WHERE version = $1")
                .bind(version)
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::from_db)?;
        if exists.is_none() {
            return Ok(Activation::NotFound);
        }
        let active: Option<String> =
            sqlx::query_scalar("SELECT version FROM active_model WHERE id = 1")
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::from_db)?;
        if let Some(expected) = expected_active
            && active.as_deref() != Some(expected)
        {
            return Ok(Activation::NotExpected(active.unwrap_or_default()));
        }
        if active.as_deref() == Some(version) {
            drop(tx);
            let model = self
                .model(version)
                .await?
                .ok_or_else(|| StoreError::Internal("the active model vanished".into()))?;
            return Ok(Activation::AlreadyActive(model));
        }
        sqlx::query(
            "INSERT INTO active_model (id, version) VALUES (1, $1) \
             ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version",
        )
        .bind(version)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        sqlx::query("UPDATE models SET activate_time = $2 WHERE version = $1")
            .bind(version)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        sqlx::query("UPDATE rescores SET state = $1, end_time = $2 WHERE state IN ($3, $4)")
            .bind(CANCELLED)
            .bind(now)
            .bind(PENDING)
            .bind(RUNNING)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        insert_rescore(&mut tx, &rescore).await?;
        tx.commit().await.map_err(StoreError::from_db)?;
        let model = self
            .model(version)
            .await?
            .ok_or_else(|| StoreError::Internal("the activated model vanished".into()))?;
        Ok(Activation::Activated(model, rescore))
    }

    async fn install_default(&self, model: &Model, now: DateTime<Utc>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
        lock_models(&mut tx).await?;
        sqlx::query(
            "INSERT INTO models (version, body, built_in, create_time, activate_time) \
             VALUES ($1, $2, TRUE, $3, $3) ON CONFLICT (version) DO NOTHING",
        )
        .bind(&model.version)
        .bind(encode_model(model))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        sqlx::query(
            "INSERT INTO active_model (id, version) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&model.version)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        tx.commit().await.map_err(StoreError::from_db)
    }

    async fn start_rescore(&self, rescore: RescoreRow) -> Result<(RescoreRow, bool), StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
        lock_models(&mut tx).await?;
        let existing = sqlx::query(&format!(
            "SELECT {RESCORE_COLUMNS} FROM rescores WHERE state IN ($1, $2) ORDER BY create_time LIMIT 1"
        ))
        .bind(PENDING)
        .bind(RUNNING)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        if let Some(row) = existing {
            return Ok((rescore_from_row(&row).map_err(StoreError::from_db)?, false));
        }
        insert_rescore(&mut tx, &rescore).await?;
        tx.commit().await.map_err(StoreError::from_db)?;
        Ok((rescore, true))
    }

    async fn rescore(&self, id: Option<Uuid>) -> Result<Option<RescoreRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {RESCORE_COLUMNS} FROM rescores WHERE $1::uuid IS NULL OR id = $1 \
             ORDER BY create_time DESC LIMIT 1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        row.as_ref()
            .map(rescore_from_row)
            .transpose()
            .map_err(StoreError::from_db)
    }

    async fn rescore_to_run(&self) -> Result<Option<RescoreRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {RESCORE_COLUMNS} FROM rescores WHERE state IN ($1, $2) ORDER BY create_time LIMIT 1"
        ))
        .bind(PENDING)
        .bind(RUNNING)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        row.as_ref()
            .map(rescore_from_row)
            .transpose()
            .map_err(StoreError::from_db)
    }

    async fn finish_rescore_shard(
        &self,
        id: Uuid,
        shard: ShardFilter,
        resume_after: Option<Uuid>,
        at: DateTime<Utc>,
        fence: &Fence,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
        let finished = sqlx::query(
            "INSERT INTO rescore_shards (rescore_id, shard_index, shard_count, resume_after, finished) \
             SELECT $1, $2, $3, $4, TRUE FROM rescores WHERE id = $1 AND state = $5 \
             ON CONFLICT (rescore_id, shard_count, shard_index) DO UPDATE \
               SET finished = TRUE, rate_per_second = 0 \
               WHERE rescore_shards.resume_after IS NOT DISTINCT FROM EXCLUDED.resume_after \
                 AND NOT rescore_shards.finished",
        )
        .bind(id)
        .bind(shard.index as i32)
        .bind(shard.count as i32)
        .bind(resume_after)
        .bind(RUNNING)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        if finished.rows_affected() != 1 {
            return Err(StoreError::RescoreStopped);
        }
        let succeeded = sqlx::query(
            "UPDATE rescores SET state = $2, end_time = $3, rate_per_second = 0 \
             WHERE id = $1 AND state = $4 AND (SELECT count(*) FROM rescore_shards \
               WHERE rescore_id = $1 AND shard_count = $5 AND finished) = $5",
        )
        .bind(id)
        .bind(SUCCEEDED)
        .bind(at)
        .bind(RUNNING)
        .bind(i64::from(shard.count))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?
        .rows_affected()
            == 1;
        check_fences(&mut tx, std::slice::from_ref(fence)).await?;
        tx.commit().await.map_err(StoreError::from_db)?;
        Ok(succeeded)
    }

    async fn rescore_shard(
        &self,
        id: Uuid,
        shard: ShardFilter,
    ) -> Result<(Option<Uuid>, bool), StoreError> {
        let row: Option<(Option<Uuid>, bool)> = sqlx::query_as(
            "SELECT resume_after, finished FROM rescore_shards \
             WHERE rescore_id = $1 AND shard_index = $2 AND shard_count = $3",
        )
        .bind(id)
        .bind(shard.index as i32)
        .bind(shard.count as i32)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        Ok(row.unwrap_or((None, false)))
    }

    async fn set_rescore_state(
        &self,
        id: Uuid,
        state: i32,
        at: DateTime<Utc>,
        error: &str,
    ) -> Result<(), StoreError> {
        let running = state == i32::from(RUNNING);
        sqlx::query(
            "UPDATE rescores SET state = $2, error = $4, \
               start_time = CASE WHEN $5 THEN COALESCE(start_time, $3) ELSE start_time END, \
               end_time = CASE WHEN $5 THEN NULL ELSE $3 END, \
               rate_per_second = CASE WHEN $5 THEN rate_per_second ELSE 0 END \
             WHERE id = $1 AND state IN ($6, $7)",
        )
        .bind(id)
        .bind(state as i16)
        .bind(at)
        .bind(error)
        .bind(running)
        .bind(PENDING)
        .bind(RUNNING)
        .execute(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        Ok(())
    }

    async fn last_transition(
        &self,
        customer_id: Uuid,
    ) -> Result<Option<RecordedTransition>, StoreError> {
        let body: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT body FROM transitions WHERE customer_id = $1 \
             ORDER BY transition_time DESC, id DESC LIMIT 1",
        )
        .bind(customer_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        body.as_deref().map(decode_transition).transpose()
    }

    async fn list_transitions(
        &self,
        query: &TransitionQuery,
    ) -> Result<Vec<RecordedTransition>, StoreError> {
        // Only the conditions given, so the planner sees an index range.
        let mut sql = QueryBuilder::<Postgres>::new("SELECT body FROM transitions WHERE TRUE");
        if let Some(customer) = query.customer_id {
            sql.push(" AND customer_id = ").push_bind(customer);
        }
        if let Some(start) = query.start {
            sql.push(" AND transition_time >= ").push_bind(start);
        }
        if let Some(end) = query.end {
            sql.push(" AND transition_time < ").push_bind(end);
        }
        if let Some((time, id)) = query.after {
            sql.push(" AND (transition_time, id) > (")
                .push_bind(time)
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        sql.push(" ORDER BY transition_time, id LIMIT ")
            .push_bind(i64::from(query.limit));
        let bodies: Vec<Vec<u8>> = sql
            .build_query_scalar()
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from_db)?;
        bodies.iter().map(|body| decode_transition(body)).collect()
    }

    async fn customer_transitions(
        &self,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<RecordedTransition>>, StoreError> {
        let rows = self
            .rows_of(
                "SELECT customer_id, body FROM transitions WHERE customer_id = ANY($1) \
                 ORDER BY customer_id, transition_time, id",
                ids,
            )
            .await?;
        by_customer(&rows, |row| {
            decode_transition(&row.try_get::<Vec<u8>, _>("body").map_err(corrupt)?)
        })
    }

    async fn load_inputs(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Vec<Input>>, StoreError> {
        let rows = self
            .rows_of(
                "SELECT customer_id, input_key, occur_time, body FROM customer_inputs \
                 WHERE customer_id = ANY($1)",
                ids,
            )
            .await?;
        by_customer(&rows, |row| {
            Ok(Input {
                at: row.try_get("occur_time").map_err(corrupt)?,
                key: row.try_get("input_key").map_err(corrupt)?,
                fact: decode_fact(&row.try_get::<Vec<u8>, _>("body").map_err(corrupt)?)?,
            })
        })
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

/// Records a rescore page's progress: the shard's, checked to start where
/// its last page ended, and the sums on the rescore, checked to be running.
async fn record_rescore_page(
    tx: &mut PgConnection,
    progress: &super::RescoreProgress,
) -> Result<(), StoreError> {
    let shard = progress.shard;
    let moved = match progress.resumed_from {
        None => sqlx::query(
            "INSERT INTO rescore_shards (rescore_id, shard_index, shard_count, resume_after, rate_per_second) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(progress.id)
        .bind(shard.index as i32)
        .bind(shard.count as i32)
        .bind(progress.resume_after)
        .bind(progress.rate_per_second)
        .execute(&mut *tx)
        .await,
        Some(from) => sqlx::query(
            "UPDATE rescore_shards SET resume_after = $4, rate_per_second = $5 \
             WHERE rescore_id = $1 AND shard_index = $2 AND shard_count = $3 \
               AND resume_after = $6 AND NOT finished",
        )
        .bind(progress.id)
        .bind(shard.index as i32)
        .bind(shard.count as i32)
        .bind(progress.resume_after)
        .bind(progress.rate_per_second)
        .bind(from)
        .execute(&mut *tx)
        .await,
    }
    .map_err(StoreError::from_db)?;
    if moved.rows_affected() != 1 {
        return Err(StoreError::RescoreStopped);
    }
    let updated = sqlx::query(
        "UPDATE rescores SET done_count = done_count + $2, changed_count = changed_count + $3, \
           rate_per_second = (SELECT COALESCE(sum(rate_per_second), 0) FROM rescore_shards \
                              WHERE rescore_id = $1 AND NOT finished), \
           resume_after = $4 \
         WHERE id = $1 AND state = $5",
    )
    .bind(progress.id)
    .bind(progress.done)
    .bind(progress.changed)
    .bind(progress.resume_after)
    .bind(RUNNING)
    .execute(&mut *tx)
    .await
    .map_err(StoreError::from_db)?;
    if updated.rows_affected() != 1 {
        return Err(StoreError::RescoreStopped);
    }
    Ok(())
}

/// Serialises model activations and rescore starts for the transaction.
async fn lock_models(tx: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MODELS_LOCK)
        .execute(tx)
        .await
        .map_err(StoreError::from_db)?;
    Ok(())
}

async fn insert_rescore(tx: &mut PgConnection, rescore: &RescoreRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO rescores (id, model_version, state, trigger_kind, total_count, create_time) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(rescore.id)
    .bind(&rescore.model_version)
    .bind(rescore.state as i16)
    .bind(rescore.trigger as i16)
    .bind(rescore.total_count)
    .bind(rescore.create_time)
    .execute(tx)
    .await
    .map_err(StoreError::from_db)?;
    Ok(())
}
