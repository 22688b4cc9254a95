//! The scoring store on SQLite (the embedded default). Ids are UUID
//! strings; times are microseconds since the Unix epoch. The single writer
//! connection serialises every write transaction.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use clm_eventlog::consumer::cursors;
use clm_eventlog::{EventLog, ShardFilter};
use clm_platform::db::sqlite_columns::{time as time_column, uuid as uuid_column};
use clm_platform::db::{Pools, SqlitePools};
use clm_proto::scoring as proto;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::{
    Activation, ChangeSet, CursorMove, CustomerRecord, Fence, Input, ModelInsert, RescoreRow,
    ScoringStore, StoreError, TRANSITION_LOG_TABLE, TransitionQuery, decode_fact, decode_features,
    decode_model, decode_snapshot, decode_transition, encode_fact, encode_features, encode_model,
    encode_snapshot, encode_transition, log_entries,
};
use crate::evaluate::LifecycleSnapshot;
use crate::history::RecordedTransition;
use crate::model::Model;

/// The merged_into column as read.
type MergedInto = String;

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

/// `rows` decoded and grouped by their `customer_id` column, in row order.
fn by_customer<T>(
    rows: &[SqliteRow],
    decode: impl Fn(&SqliteRow) -> Result<T, StoreError>,
) -> Result<HashMap<Uuid, Vec<T>>, StoreError> {
    let mut out: HashMap<Uuid, Vec<T>> = HashMap::new();
    for row in rows {
        let customer = uuid_column(row, "customer_id").map_err(corrupt)?;
        out.entry(customer).or_default().push(decode(row)?);
    }
    Ok(out)
}

fn corrupt(err: sqlx::Error) -> StoreError {
    StoreError::Corrupt(err.to_string())
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

const CUSTOMER_COLUMNS: &str = "c.customer_id, c.merged_into, c.snapshot, c.next_due_at, \
     c.version, f.features, f.folded_to, f.inputs_kept";

fn customer_from_row(row: &SqliteRow) -> Result<CustomerRecord, StoreError> {
    let get = |err: sqlx::Error| StoreError::Corrupt(err.to_string());
    let features: Option<Vec<u8>> = row.try_get("features").map_err(get)?;
    let snapshot: Option<Vec<u8>> = row.try_get("snapshot").map_err(get)?;
    Ok(CustomerRecord {
        customer_id: uuid_column(row, "customer_id").map_err(get)?,
        merged_into: optional_uuid(row, "merged_into").map_err(get)?,
        features: decode_features(features.as_deref())?,
        snapshot: decode_snapshot(snapshot.as_deref())?,
        next_due_at: optional_time(row, "next_due_at").map_err(get)?,
        version: row.try_get("version").map_err(get)?,
        folded_to: optional_time(row, "folded_to").map_err(get)?,
        // No features row: nothing was folded in, so nothing is missing.
        inputs_kept: row
            .try_get::<Option<bool>, _>("inputs_kept")
            .map_err(get)?
            .unwrap_or(true),
    })
}

fn rescore_from_row(row: &SqliteRow) -> Result<RescoreRow, sqlx::Error> {
    Ok(RescoreRow {
        id: uuid_column(row, "id")?,
        model_version: row.try_get("model_version")?,
        state: row.try_get("state")?,
        trigger: row.try_get("trigger_kind")?,
        done_count: row.try_get("done_count")?,
        total_count: row.try_get("total_count")?,
        changed_count: row.try_get("changed_count")?,
        rate_per_second: row.try_get("rate_per_second")?,
        create_time: time_column(row, "create_time")?,
        start_time: optional_time(row, "start_time")?,
        end_time: optional_time(row, "end_time")?,
        error: row.try_get("error")?,
        resume_after: optional_uuid(row, "resume_after")?,
    })
}

fn model_from_row(row: &SqliteRow) -> Result<Model, StoreError> {
    let get = |err: sqlx::Error| StoreError::Corrupt(err.to_string());
    let body: Vec<u8> = row.try_get("body").map_err(get)?;
    decode_model(
        &body,
        row.try_get::<bool, _>("built_in").map_err(get)?,
        time_column(row, "create_time").map_err(get)?,
        optional_time(row, "activate_time").map_err(get)?,
        row.try_get::<bool, _>("active").map_err(get)?,
    )
}

const MODEL_COLUMNS: &str = "m.version, m.body, m.built_in, m.create_time, m.activate_time, \
     EXISTS (SELECT 1 FROM active_model a WHERE a.version = m.version) AS active";

const RESCORE_COLUMNS: &str = "id, model_version, state, trigger_kind, done_count, total_count, \
     changed_count, rate_per_second, create_time, start_time, end_time, error, resume_after";

async fn move_cursor(tx: &mut SqliteConnection, cursor: &CursorMove) -> Result<(), StoreError> {
    cursors::move_sqlite(tx, cursor)
        .await
        .map_err(StoreError::from_db)?
        .map_err(StoreError::from)
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

/// Records a rescore page's progress (see the PostgreSQL store).
async fn record_rescore_page(
    tx: &mut SqliteConnection,
    progress: &super::RescoreProgress,
) -> Result<(), StoreError> {
    whole(progress.shard)?;
    let id = progress.id.to_string();
    let moved = match progress.resumed_from {
        None => sqlx::query(
            "INSERT INTO rescore_shards (rescore_id, shard_index, shard_count, resume_after, rate_per_second) \
             VALUES (?1, 0, 1, ?2, ?3) ON CONFLICT DO NOTHING",
        )
        .bind(&id)
        .bind(progress.resume_after.to_string())
        .bind(progress.rate_per_second)
        .execute(&mut *tx)
        .await,
        Some(from) => sqlx::query(
            "UPDATE rescore_shards SET resume_after = ?2, rate_per_second = ?3 \
             WHERE rescore_id = ?1 AND shard_index = 0 AND shard_count = 1 \
               AND resume_after = ?4 AND NOT finished",
        )
        .bind(&id)
        .bind(progress.resume_after.to_string())
        .bind(progress.rate_per_second)
        .bind(from.to_string())
        .execute(&mut *tx)
        .await,
    }
    .map_err(StoreError::from_db)?;
    if moved.rows_affected() != 1 {
        return Err(StoreError::RescoreStopped);
    }
    let updated = sqlx::query(
        "UPDATE rescores SET done_count = done_count + ?2, changed_count = changed_count + ?3, \
           rate_per_second = ?4, resume_after = ?5 \
         WHERE id = ?1 AND state = ?6",
    )
    .bind(&id)
    .bind(progress.done)
    .bind(progress.changed)
    .bind(progress.rate_per_second)
    .bind(progress.resume_after.to_string())
    .bind(RUNNING)
    .execute(&mut *tx)
    .await
    .map_err(StoreError::from_db)?;
    if updated.rows_affected() != 1 {
        return Err(StoreError::RescoreStopped);
    }
    Ok(())
}

/// Rows per multi-row statement (SQLite allows 32,766 parameters).
const ROWS_PER_STATEMENT: usize = 1_000;

async fn write_customers(tx: &mut SqliteConnection, changes: &ChangeSet) -> Result<(), StoreError> {
    // One upsert per chunk: a new customer (version 0) is inserted; a known
    // one is updated only from the version read. Anything else leaves the
    // row alone, so fewer rows change than were sent: a conflict.
    for chunk in changes.customers.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO customers (customer_id, merged_into, snapshot, next_due_at, version, position_version) ",
        );
        query.push_values(chunk, |mut row, write| {
            let record = &write.record;
            row.push_bind(record.customer_id.to_string())
                .push_bind(record.merged_into.map(|id| id.to_string()))
                .push_bind(encode_snapshot(record.snapshot.as_ref()))
                .push_bind(record.next_due_at.map(micros))
                .push_bind(record.version + 1)
                .push_bind(if write.position_changed {
                    record.version + 1
                } else {
                    0
                });
        });
        // `last_transition` is no longer kept here (the newest row of
        // `transitions` is read instead): cleared so rows written by
        // earlier versions shrink as they are rewritten.
        query.push(
            " ON CONFLICT (customer_id) DO UPDATE SET merged_into = excluded.merged_into, \
               snapshot = excluded.snapshot, last_transition = NULL, \
               next_due_at = excluded.next_due_at, version = excluded.version, \
               position_version = max(customers.position_version, excluded.position_version) \
             WHERE customers.version = excluded.version - 1",
        );
        let written = query
            .build()
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        if written.rows_affected() != chunk.len() as u64 {
            return Err(StoreError::Conflict(
                "a customer changed concurrently".into(),
            ));
        }
        let features: Vec<_> = chunk.iter().filter(|w| w.features_changed).collect();
        if features.is_empty() {
            continue;
        }
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO customer_features (customer_id, features, folded_to, inputs_kept) ",
        );
        query.push_values(features, |mut row, write| {
            row.push_bind(write.record.customer_id.to_string())
                .push_bind(encode_features(&write.record.features))
                .push_bind(write.record.folded_to.map(micros))
                .push_bind(write.record.inputs_kept);
        });
        query.push(
            " ON CONFLICT (customer_id) DO UPDATE SET features = excluded.features, \
               folded_to = excluded.folded_to, inputs_kept = excluded.inputs_kept",
        );
        query
            .build()
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
    }
    Ok(())
}

async fn write_inputs(tx: &mut SqliteConnection, changes: &ChangeSet) -> Result<(), StoreError> {
    for (merged, survivor) in &changes.moved_inputs {
        sqlx::query(
            "UPDATE OR IGNORE customer_inputs SET customer_id = ?2 \
             WHERE customer_id = ?1 AND is_profile = 0",
        )
        .bind(merged.to_string())
        .bind(survivor.to_string())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
    }
    for id in &changes.forgotten_profiles {
        sqlx::query("DELETE FROM customer_inputs WHERE customer_id = ?1 AND is_profile = 1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
    }
    for chunk in changes.inputs.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO customer_inputs (customer_id, input_key, occur_time, is_profile, body) ",
        );
        query.push_values(chunk, |mut row, (customer, input)| {
            row.push_bind(customer.to_string())
                .push_bind(&input.key)
                .push_bind(micros(input.at))
                .push_bind(input.is_profile())
                .push_bind(encode_fact(&input.fact));
        });
        // A profile is replaced; a touchpoint's facts never change.
        query.push(
            " ON CONFLICT (customer_id, input_key) DO UPDATE SET \
               occur_time = excluded.occur_time, body = excluded.body",
        );
        query
            .build()
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
    }
    Ok(())
}

async fn write_transitions(
    tx: &mut SqliteConnection,
    log: &EventLog,
    changes: &ChangeSet,
) -> Result<(), StoreError> {
    for transition in &changes.retracted {
        sqlx::query("DELETE FROM transitions WHERE id = ?1")
            .bind(transition.id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
    }
    for transition in &changes.transitions {
        sqlx::query(
            "INSERT INTO transitions (id, customer_id, transition_time, body) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(transition.id.to_string())
        .bind(transition.customer_id.to_string())
        .bind(micros(transition.at))
        .bind(encode_transition(transition))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
    }
    let now = Utc::now();
    for entry in log_entries(changes, now) {
        log.append_sqlite(tx, &entry.to_append(now))
            .await
            .map_err(StoreError::from_db)?;
    }
    Ok(())
}

#[async_trait]
impl ScoringStore for SqliteScoringStore {
    async fn load_customers(
        &self,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, CustomerRecord>, StoreError> {
        let select = format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers c \
             LEFT JOIN customer_features f ON f.customer_id = c.customer_id \
             WHERE c.customer_id IN ({{ids}})"
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
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        sole(&changes.fence)?;
        if let Some(cursor) = &changes.cursor {
            move_cursor(&mut tx, cursor).await?;
        }
        if let Some(progress) = &changes.rescore {
            record_rescore_page(&mut tx, progress).await?;
        }
        write_customers(&mut tx, changes).await?;
        write_inputs(&mut tx, changes).await?;
        write_transitions(&mut tx, &self.log, changes).await?;
        tx.commit().await.map_err(StoreError::from_db)?;
        if !changes.forgotten_profiles.is_empty() {
            // Profiles are personal data: leave none in the WAL. The erasure
            // is committed already; a busy WAL is wiped by a later erasure.
            if let Err(err) = clm_platform::db::wipe_sqlite_wal(&self.pools, 50).await {
                tracing::warn!(error = %err, "cannot truncate the WAL after an erasure");
            }
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
        whole(shard)?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT customer_id FROM customers WHERE next_due_at IS NOT NULL AND next_due_at <= ?1 \
             ORDER BY next_due_at LIMIT ?2",
        )
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&self.pools.reader)
        .await
        .map_err(StoreError::from_db)?;
        ids.iter()
            .map(|id| Uuid::try_parse(id).map_err(|err| StoreError::Corrupt(err.to_string())))
            .collect()
    }

    async fn customers_after(
        &self,
        after: Option<Uuid>,
        limit: u32,
        shard: ShardFilter,
    ) -> Result<Vec<CustomerRecord>, StoreError> {
        whole(shard)?;
        // A range scan of the primary key from `after` (the nil id sorts
        // before every other).
        let rows = sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers c \
             LEFT JOIN customer_features f ON f.customer_id = c.customer_id \
             WHERE c.customer_id > ?1 AND c.merged_into IS NULL \
               AND c.snapshot IS NOT NULL \
             ORDER BY c.customer_id LIMIT ?2"
        ))
        .bind(after.unwrap_or(Uuid::nil()).to_string())
        .bind(i64::from(limit))
        .fetch_all(&self.pools.reader)
        .await
        .map_err(StoreError::from_db)?;
        rows.iter().map(customer_from_row).collect()
    }

    async fn count_scored(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar(
            "SELECT count(*) FROM customers WHERE merged_into IS NULL AND snapshot IS NOT NULL",
        )
        .fetch_one(&self.pools.reader)
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
        if shards != [ShardFilter::ALL] {
            return Err(StoreError::Internal(
                "a SQLite store does not divide its customers by shard".to_owned(),
            ));
        }
        // A range of the partial index, in its order (UUID strings sort as
        // the UUIDs do).
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT customer_id, version, snapshot, merged_into FROM customers WHERE ",
        );
        query.push(if position {
            "pushed_version < position_version"
        } else {
            "pushed_version < version AND pushed_version >= position_version"
        });
        if let Some(after) = after {
            query
                .push(" AND customer_id > ")
                .push_bind(after.to_string());
        }
        query
            .push(" ORDER BY customer_id LIMIT ")
            .push_bind(i64::from(limit));
        let rows = query
            .build()
            .fetch_all(&self.pools.reader)
            .await
            .map_err(StoreError::from_db)?;
        let mut out = Vec::with_capacity(rows.len());
        // Nothing to push for these (identity ignores merged customers):
        // recorded as received, in one write.
        let mut nothing = Vec::new();
        for row in &rows {
            let id = uuid_column(row, "customer_id").map_err(StoreError::from_db)?;
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
        fences.iter().try_for_each(sole)?;
        if pushed.is_empty() {
            return Ok(());
        }
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        for (id, version) in pushed {
            sqlx::query(
                "UPDATE customers SET pushed_version = ?2 WHERE customer_id = ?1 AND pushed_version < ?2",
            )
            .bind(id.to_string())
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        }
        tx.commit().await.map_err(StoreError::from_db)
    }

    async fn insert_model(&self, model: &Model) -> Result<ModelInsert, StoreError> {
        let now = model.create_time.unwrap_or_else(Utc::now);
        let inserted = sqlx::query(
            "INSERT INTO models (version, body, built_in, create_time) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(&model.version)
        .bind(encode_model(model))
        .bind(model.built_in)
        .bind(micros(now))
        .execute(&self.pools.writer)
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
            "SELECT {MODEL_COLUMNS} FROM models m WHERE m.version = ?1"
        ))
        .bind(version)
        .fetch_optional(&self.pools.writer)
        .await
        .map_err(StoreError::from_db)?;
        row.as_ref().map(model_from_row).transpose()
    }

    async fn active_model(&self) -> Result<Option<Model>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {MODEL_COLUMNS} FROM models m JOIN active_model a ON a.version = m.version"
        ))
        .fetch_optional(&self.pools.reader)
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
             WHERE ?1 IS NULL OR m.create_time < ?1 OR (m.create_time = ?1 AND m.version < ?2) \
             ORDER BY m.create_time DESC, m.version DESC LIMIT ?3"
        ))
        .bind(time.map(micros))
        .bind(version)
        .bind(i64::from(limit))
        .fetch_all(&self.pools.reader)
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
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        let exists: Option<String> =
            sqlx::query_scalar("SELECT version FROM models WHERE version = ?1")
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
            "INSERT INTO active_model (id, version) VALUES (1, ?1) \
             ON CONFLICT (id) DO UPDATE SET version = excluded.version",
        )
        .bind(version)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        sqlx::query("UPDATE models SET activate_time = ?2 WHERE version = ?1")
            .bind(version)
            .bind(micros(now))
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        sqlx::query("UPDATE rescores SET state = ?1, end_time = ?2 WHERE state IN (?3, ?4)")
            .bind(CANCELLED)
            .bind(micros(now))
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
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        sqlx::query(
            "INSERT INTO models (version, body, built_in, create_time, activate_time) \
             VALUES (?1, ?2, 1, ?3, ?3) ON CONFLICT (version) DO NOTHING",
        )
        .bind(&model.version)
        .bind(encode_model(model))
        .bind(micros(now))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        sqlx::query(
            "INSERT INTO active_model (id, version) VALUES (1, ?1) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&model.version)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        tx.commit().await.map_err(StoreError::from_db)
    }

    async fn start_rescore(&self, rescore: RescoreRow) -> Result<(RescoreRow, bool), StoreError> {
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        let existing = sqlx::query(&format!(
            "SELECT {RESCORE_COLUMNS} FROM rescores WHERE state IN (?1, ?2) ORDER BY create_time LIMIT 1"
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
            "SELECT {RESCORE_COLUMNS} FROM rescores WHERE ?1 IS NULL OR id = ?1 \
             ORDER BY create_time DESC LIMIT 1"
        ))
        .bind(id.map(|id| id.to_string()))
        .fetch_optional(&self.pools.writer)
        .await
        .map_err(StoreError::from_db)?;
        row.as_ref()
            .map(rescore_from_row)
            .transpose()
            .map_err(StoreError::from_db)
    }

    async fn rescore_to_run(&self) -> Result<Option<RescoreRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {RESCORE_COLUMNS} FROM rescores WHERE state IN (?1, ?2) ORDER BY create_time LIMIT 1"
        ))
        .bind(PENDING)
        .bind(RUNNING)
        .fetch_optional(&self.pools.writer)
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
        whole(shard)?;
        sole(fence)?;
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        let finished = sqlx::query(
            "INSERT INTO rescore_shards (rescore_id, shard_index, shard_count, resume_after, finished) \
             SELECT ?1, 0, 1, ?2, 1 FROM rescores WHERE id = ?1 AND state = ?3 \
             ON CONFLICT (rescore_id, shard_count, shard_index) DO UPDATE \
               SET finished = 1, rate_per_second = 0 \
               WHERE rescore_shards.resume_after IS excluded.resume_after \
                 AND NOT rescore_shards.finished",
        )
        .bind(id.to_string())
        .bind(resume_after.map(|id| id.to_string()))
        .bind(RUNNING)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        if finished.rows_affected() != 1 {
            return Err(StoreError::RescoreStopped);
        }
        sqlx::query(
            "UPDATE rescores SET state = ?2, end_time = ?3, rate_per_second = 0 \
             WHERE id = ?1 AND state = ?4",
        )
        .bind(id.to_string())
        .bind(SUCCEEDED)
        .bind(micros(at))
        .bind(RUNNING)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        tx.commit().await.map_err(StoreError::from_db)?;
        Ok(true)
    }

    async fn rescore_shard(
        &self,
        id: Uuid,
        shard: ShardFilter,
    ) -> Result<(Option<Uuid>, bool), StoreError> {
        whole(shard)?;
        let row: Option<(Option<String>, bool)> = sqlx::query_as(
            "SELECT resume_after, finished FROM rescore_shards \
             WHERE rescore_id = ?1 AND shard_index = 0 AND shard_count = 1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pools.reader)
        .await
        .map_err(StoreError::from_db)?;
        let Some((after, finished)) = row else {
            return Ok((None, false));
        };
        let after = after
            .map(|id| Uuid::try_parse(&id))
            .transpose()
            .map_err(|err| StoreError::Corrupt(format!("rescore_shards.resume_after: {err}")))?;
        Ok((after, finished))
    }

    async fn set_rescore_state(
        &self,
        id: Uuid,
        state: i32,
        at: DateTime<Utc>,
        error: &str,
    ) -> Result<(), StoreError> {
        let running = state == RUNNING;
        sqlx::query(
            "UPDATE rescores SET state = ?2, error = ?4, \
               start_time = CASE WHEN ?5 THEN COALESCE(start_time, ?3) ELSE start_time END, \
               end_time = CASE WHEN ?5 THEN NULL ELSE ?3 END, \
               rate_per_second = CASE WHEN ?5 THEN rate_per_second ELSE 0 END \
             WHERE id = ?1 AND state IN (?6, ?7)",
        )
        .bind(id.to_string())
        .bind(state)
        .bind(micros(at))
        .bind(error)
        .bind(running)
        .bind(PENDING)
        .bind(RUNNING)
        .execute(&self.pools.writer)
        .await
        .map_err(StoreError::from_db)?;
        Ok(())
    }

    async fn last_transition(
        &self,
        customer_id: Uuid,
    ) -> Result<Option<RecordedTransition>, StoreError> {
        let body: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT body FROM transitions WHERE customer_id = ?1 \
             ORDER BY transition_time DESC, id DESC LIMIT 1",
        )
        .bind(customer_id.to_string())
        .fetch_optional(&self.pools.reader)
        .await
        .map_err(StoreError::from_db)?;
        body.as_deref().map(decode_transition).transpose()
    }

    async fn list_transitions(
        &self,
        query: &TransitionQuery,
    ) -> Result<Vec<RecordedTransition>, StoreError> {
        // Only the conditions given, so the planner sees an index range.
        let mut sql = QueryBuilder::<Sqlite>::new("SELECT body FROM transitions WHERE 1");
        if let Some(customer) = query.customer_id {
            sql.push(" AND customer_id = ")
                .push_bind(customer.to_string());
        }
        if let Some(start) = query.start {
            sql.push(" AND transition_time >= ")
                .push_bind(micros(start));
        }
        if let Some(end) = query.end {
            sql.push(" AND transition_time < ").push_bind(micros(end));
        }
        if let Some((time, id)) = query.after {
            sql.push(" AND (transition_time, id) > (")
                .push_bind(micros(time))
                .push(", ")
                .push_bind(id.to_string())
                .push(")");
        }
        sql.push(" ORDER BY transition_time, id LIMIT ")
            .push_bind(i64::from(query.limit));
        let bodies: Vec<Vec<u8>> = sql
            .build_query_scalar()
            .fetch_all(&self.pools.reader)
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
                "SELECT customer_id, body FROM transitions WHERE customer_id IN ({ids}) \
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
                 WHERE customer_id IN ({ids})",
                ids,
            )
            .await?;
        by_customer(&rows, |row| {
            Ok(Input {
                at: time_column(row, "occur_time").map_err(corrupt)?,
                key: row.try_get("input_key").map_err(corrupt)?,
                fact: decode_fact(&row.try_get::<Vec<u8>, _>("body").map_err(corrupt)?)?,
            })
        })
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

async fn insert_rescore(tx: &mut SqliteConnection, rescore: &RescoreRow) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO rescores (id, model_version, state, trigger_kind, total_count, create_time) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .bind(rescore.id.to_string())
    .bind(&rescore.model_version)
    .bind(rescore.state)
    .bind(rescore.trigger)
    .bind(rescore.total_count)
    .bind(micros(rescore.create_time))
    .execute(tx)
    .await
    .map_err(StoreError::from_db)?;
    Ok(())
}
