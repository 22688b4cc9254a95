//! Rescore operations on PostgreSQL: starting one unless one is pending or
//! running, reading them, the progress of each shard page by page (checked
//! to start where the last page ended) and its end, and the changes of
//! state.

use chrono::{DateTime, Utc};
use clm_eventlog::ShardFilter;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::models::lock_models;
use super::writes::check_fences;
use super::{PENDING, PostgresScoringStore, RUNNING, SUCCEEDED};
use crate::store::{Fence, RescoreRow, StoreError};

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

const RESCORE_COLUMNS: &str = "id, model_version, state, trigger_kind, done_count, total_count, \
     changed_count, rate_per_second, create_time, start_time, end_time, error, resume_after";

pub(super) async fn start_rescore(
    store: &PostgresScoringStore,
    rescore: RescoreRow,
) -> Result<(RescoreRow, bool), StoreError> {
    let mut tx = store.pool.begin().await.map_err(StoreError::from_db)?;
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

pub(super) async fn rescore(
    store: &PostgresScoringStore,
    id: Option<Uuid>,
) -> Result<Option<RescoreRow>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {RESCORE_COLUMNS} FROM rescores WHERE $1::uuid IS NULL OR id = $1 \
         ORDER BY create_time DESC LIMIT 1"
    ))
    .bind(id)
    .fetch_optional(&store.pool)
    .await
    .map_err(StoreError::from_db)?;
    row.as_ref()
        .map(rescore_from_row)
        .transpose()
        .map_err(StoreError::from_db)
}

pub(super) async fn rescore_to_run(
    store: &PostgresScoringStore,
) -> Result<Option<RescoreRow>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {RESCORE_COLUMNS} FROM rescores WHERE state IN ($1, $2) ORDER BY create_time LIMIT 1"
    ))
    .bind(PENDING)
    .bind(RUNNING)
    .fetch_optional(&store.pool)
    .await
    .map_err(StoreError::from_db)?;
    row.as_ref()
        .map(rescore_from_row)
        .transpose()
        .map_err(StoreError::from_db)
}

pub(super) async fn finish_rescore_shard(
    store: &PostgresScoringStore,
    id: Uuid,
    shard: ShardFilter,
    resume_after: Option<Uuid>,
    at: DateTime<Utc>,
    fence: &Fence,
) -> Result<bool, StoreError> {
    let mut tx = store.pool.begin().await.map_err(StoreError::from_db)?;
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

pub(super) async fn rescore_shard(
    store: &PostgresScoringStore,
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
    .fetch_optional(&store.pool)
    .await
    .map_err(StoreError::from_db)?;
    Ok(row.unwrap_or((None, false)))
}

pub(super) async fn set_rescore_state(
    store: &PostgresScoringStore,
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
    .execute(&store.pool)
    .await
    .map_err(StoreError::from_db)?;
    Ok(())
}

/// Records a rescore page's progress: the shard's, checked to start where
/// its last page ended, and the sums on the rescore, checked to be running.
pub(super) async fn record_rescore_page(
    tx: &mut PgConnection,
    progress: &crate::store::RescoreProgress,
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

pub(super) async fn insert_rescore(
    tx: &mut PgConnection,
    rescore: &RescoreRow,
) -> Result<(), StoreError> {
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
