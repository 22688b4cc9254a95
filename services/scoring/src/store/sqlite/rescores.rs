//! Rescore operations on SQLite: starting one unless one is pending or
//! running, reading them, the progress of its one shard page by page
//! (checked to start where the last page ended) and its end, and the
//! changes of state.

use chrono::{DateTime, Utc};
use clm_eventlog::ShardFilter;
use clm_platform::db::sqlite_columns::{time as time_column, uuid as uuid_column};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
use uuid::Uuid;

use super::{
    PENDING, RUNNING, SUCCEEDED, SqliteScoringStore, micros, optional_time, optional_uuid, sole,
    whole,
};
use crate::store::{Fence, RescoreRow, StoreError};

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

const RESCORE_COLUMNS: &str = "id, model_version, state, trigger_kind, done_count, total_count, \
     changed_count, rate_per_second, create_time, start_time, end_time, error, resume_after";

/// Records a rescore page's progress (see the PostgreSQL store).
pub(super) async fn record_rescore_page(
    tx: &mut SqliteConnection,
    progress: &crate::store::RescoreProgress,
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

pub(super) async fn start_rescore(
    store: &SqliteScoringStore,
    rescore: RescoreRow,
) -> Result<(RescoreRow, bool), StoreError> {
    let mut tx = store
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

pub(super) async fn rescore(
    store: &SqliteScoringStore,
    id: Option<Uuid>,
) -> Result<Option<RescoreRow>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {RESCORE_COLUMNS} FROM rescores WHERE ?1 IS NULL OR id = ?1 \
         ORDER BY create_time DESC LIMIT 1"
    ))
    .bind(id.map(|id| id.to_string()))
    .fetch_optional(&store.pools.writer)
    .await
    .map_err(StoreError::from_db)?;
    row.as_ref()
        .map(rescore_from_row)
        .transpose()
        .map_err(StoreError::from_db)
}

pub(super) async fn rescore_to_run(
    store: &SqliteScoringStore,
) -> Result<Option<RescoreRow>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {RESCORE_COLUMNS} FROM rescores WHERE state IN (?1, ?2) ORDER BY create_time LIMIT 1"
    ))
    .bind(PENDING)
    .bind(RUNNING)
    .fetch_optional(&store.pools.writer)
    .await
    .map_err(StoreError::from_db)?;
    row.as_ref()
        .map(rescore_from_row)
        .transpose()
        .map_err(StoreError::from_db)
}

pub(super) async fn finish_rescore_shard(
    store: &SqliteScoringStore,
    id: Uuid,
    shard: ShardFilter,
    resume_after: Option<Uuid>,
    at: DateTime<Utc>,
    fence: &Fence,
) -> Result<bool, StoreError> {
    whole(shard)?;
    sole(fence)?;
    let mut tx = store
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

pub(super) async fn rescore_shard(
    store: &SqliteScoringStore,
    id: Uuid,
    shard: ShardFilter,
) -> Result<(Option<Uuid>, bool), StoreError> {
    whole(shard)?;
    let row: Option<(Option<String>, bool)> = sqlx::query_as(
        "SELECT resume_after, finished FROM rescore_shards \
         WHERE rescore_id = ?1 AND shard_index = 0 AND shard_count = 1",
    )
    .bind(id.to_string())
    .fetch_optional(&store.pools.reader)
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

pub(super) async fn set_rescore_state(
    store: &SqliteScoringStore,
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
    .execute(&store.pools.writer)
    .await
    .map_err(StoreError::from_db)?;
    Ok(())
}

pub(super) async fn insert_rescore(
    tx: &mut SqliteConnection,
    rescore: &RescoreRow,
) -> Result<(), StoreError> {
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
