//! Reading customers on SQLite: by id for a unit of work, those due for
//! the sweep, the evaluated ones in id order for a rescore, how many are
//! scored, and those whose latest snapshot identity has not received (and
//! recording what it has). Also how a customer row is read.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use clm_eventlog::ShardFilter;
use clm_platform::db::sqlite_columns::uuid as uuid_column;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use super::{SqliteScoringStore, micros, optional_time, optional_uuid, sole, whole};
use crate::evaluate::LifecycleSnapshot;
use crate::store::{
    CustomerRecord, Fence, ScoringStore as _, StoreError, decode_features, decode_snapshot,
};

/// The merged_into column as read.
type MergedInto = String;

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

pub(super) async fn load_customers(
    store: &SqliteScoringStore,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, CustomerRecord>, StoreError> {
    let select = format!(
        "SELECT {CUSTOMER_COLUMNS} FROM customers c \
         LEFT JOIN customer_features f ON f.customer_id = c.customer_id \
         WHERE c.customer_id IN ({{ids}})"
    );
    let rows = store.rows_of(&select, ids).await?;
    rows.iter()
        .map(|row| customer_from_row(row).map(|record| (record.customer_id, record)))
        .collect()
}

pub(super) async fn due_customers(
    store: &SqliteScoringStore,
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
    .fetch_all(&store.pools.reader)
    .await
    .map_err(StoreError::from_db)?;
    ids.iter()
        .map(|id| Uuid::try_parse(id).map_err(|err| StoreError::Corrupt(err.to_string())))
        .collect()
}

pub(super) async fn customers_after(
    store: &SqliteScoringStore,
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
    .fetch_all(&store.pools.reader)
    .await
    .map_err(StoreError::from_db)?;
    rows.iter().map(customer_from_row).collect()
}

pub(super) async fn count_scored(store: &SqliteScoringStore) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "SELECT count(*) FROM customers WHERE merged_into IS NULL AND snapshot IS NOT NULL",
    )
    .fetch_one(&store.pools.reader)
    .await
    .map_err(StoreError::from_db)
}

pub(super) async fn unpushed(
    store: &SqliteScoringStore,
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
        .fetch_all(&store.pools.reader)
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
    store.mark_pushed(&nothing, &[]).await?;
    Ok(out)
}

pub(super) async fn mark_pushed(
    store: &SqliteScoringStore,
    pushed: &[(Uuid, i64)],
    fences: &[Fence],
) -> Result<(), StoreError> {
    fences.iter().try_for_each(sole)?;
    if pushed.is_empty() {
        return Ok(());
    }
    let mut tx = store
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
