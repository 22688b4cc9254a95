//! Reading customers on PostgreSQL: by id for a unit of work, those due
//! for the sweep, the evaluated ones in id order for a rescore, how many
//! are scored, and those whose latest snapshot identity has not received
//! (and recording what it has). Also how a customer row is read and how a
//! query keeps to one shard.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use clm_eventlog::ShardFilter;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::PostgresScoringStore;
use super::writes::check_fences;
use crate::evaluate::LifecycleSnapshot;
use crate::store::{
    CustomerRecord, Fence, ScoringStore as _, StoreError, decode_features, decode_snapshot,
};

/// The merged_into column as read.
type MergedInto = Uuid;

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

/// `$count` = 1 or the row's shard is `$index` of `$count`.
fn shard_condition(count: usize, index: usize) -> String {
    format!("(${count} = 1 OR c.shard % ${count} = ${index})")
}

pub(super) async fn load_customers(
    store: &PostgresScoringStore,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, CustomerRecord>, StoreError> {
    let select = format!(
        "SELECT {CUSTOMER_COLUMNS} FROM customers c \
         LEFT JOIN customer_features f ON f.customer_id = c.customer_id \
         WHERE c.customer_id = ANY($1)"
    );
    let rows = store.rows_of(&select, ids).await?;
    rows.iter()
        .map(|row| customer_from_row(row).map(|record| (record.customer_id, record)))
        .collect()
}

pub(super) async fn due_customers(
    store: &PostgresScoringStore,
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
    .fetch_all(&store.pool)
    .await
    .map_err(StoreError::from_db)
}

pub(super) async fn customers_after(
    store: &PostgresScoringStore,
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
    .fetch_all(&store.pool)
    .await
    .map_err(StoreError::from_db)?;
    rows.iter().map(customer_from_row).collect()
}

pub(super) async fn count_scored(store: &PostgresScoringStore) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "SELECT count(*) FROM customers WHERE merged_into IS NULL AND snapshot IS NOT NULL",
    )
    .fetch_one(&store.pool)
    .await
    .map_err(StoreError::from_db)
}

pub(super) async fn unpushed(
    store: &PostgresScoringStore,
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
        .fetch_all(&store.pool)
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
    store.mark_pushed(&nothing, &[]).await?;
    Ok(out)
}

pub(super) async fn mark_pushed(
    store: &PostgresScoringStore,
    pushed: &[(Uuid, i64)],
    fences: &[Fence],
) -> Result<(), StoreError> {
    if pushed.is_empty() {
        return Ok(());
    }
    let mut tx = store.pool.begin().await.map_err(StoreError::from_db)?;
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
