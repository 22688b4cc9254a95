//! Models on PostgreSQL: storing, reading and listing them, activating one
//! (which cancels the running rescores and stores the one it starts) and
//! installing the built-in model, under the advisory lock that serialises
//! activations and rescore starts.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use super::rescores::insert_rescore;
use super::{CANCELLED, PENDING, PostgresScoringStore, RUNNING};
use crate::model::Model;
use crate::store::{
    Activation, ModelInsert, RescoreRow, ScoringStore as _, StoreError, decode_model, encode_model,
};

/// The advisory lock that serialises model activations and rescore starts.
const MODELS_LOCK: i64 = 0x636c_6d73;

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

pub(super) async fn insert_model(
    store: &PostgresScoringStore,
    model: &Model,
) -> Result<ModelInsert, StoreError> {
    let now = model.create_time.unwrap_or_else(Utc::now);
    let inserted = sqlx::query(
        "INSERT INTO models (version, body, built_in, create_time) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (version) DO NOTHING",
    )
    .bind(&model.version)
    .bind(encode_model(model))
    .bind(model.built_in)
    .bind(now)
    .execute(&store.pool)
    .await
    .map_err(StoreError::from_db)?;
    let stored = store
        .model(&model.version)
        .await?
        .ok_or_else(|| StoreError::Internal("a stored model vanished".into()))?;
    Ok(if inserted.rows_affected() == 1 {
        ModelInsert::Created(stored)
    } else {
        ModelInsert::Exists(stored)
    })
}

pub(super) async fn model(
    store: &PostgresScoringStore,
    version: &str,
) -> Result<Option<Model>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {MODEL_COLUMNS} FROM models m WHERE m.version = $1"
    ))
    .bind(version)
    .fetch_optional(&store.pool)
    .await
    .map_err(StoreError::from_db)?;
    row.as_ref().map(model_from_row).transpose()
}

pub(super) async fn active_model(
    store: &PostgresScoringStore,
) -> Result<Option<Model>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {MODEL_COLUMNS} FROM models m JOIN active_model a ON a.version = m.version"
    ))
    .fetch_optional(&store.pool)
    .await
    .map_err(StoreError::from_db)?;
    row.as_ref().map(model_from_row).transpose()
}

pub(super) async fn list_models(
    store: &PostgresScoringStore,
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
    .fetch_all(&store.pool)
    .await
    .map_err(StoreError::from_db)?;
    rows.iter().map(model_from_row).collect()
}

pub(super) async fn activate(
    store: &PostgresScoringStore,
    version: &str,
    expected_active: Option<&str>,
    rescore: RescoreRow,
    now: DateTime<Utc>,
) -> Result<Activation, StoreError> {
    let mut tx = store.pool.begin().await.map_err(StoreError::from_db)?;
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
        let model = store
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
    let model = store
        .model(version)
        .await?
        .ok_or_else(|| StoreError::Internal("the activated model vanished".into()))?;
    Ok(Activation::Activated(model, rescore))
}

pub(super) async fn install_default(
    store: &PostgresScoringStore,
    model: &Model,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let mut tx = store.pool.begin().await.map_err(StoreError::from_db)?;
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

/// Serialises model activations and rescore starts for the transaction.
pub(super) async fn lock_models(tx: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MODELS_LOCK)
        .execute(tx)
        .await
        .map_err(StoreError::from_db)?;
    Ok(())
}
