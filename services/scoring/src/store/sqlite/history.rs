//! Reading the recorded history on SQLite: a customer's newest
//! transition, transitions in ListTransitions order, every transition of
//! some customers, and the kept inputs their histories are derived from
//! again.

use std::collections::HashMap;

use clm_platform::db::sqlite_columns::{time as time_column, uuid as uuid_column};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use super::{SqliteScoringStore, micros};
use crate::history::RecordedTransition;
use crate::store::{Input, StoreError, TransitionQuery, decode_fact, decode_transition};

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

pub(super) async fn last_transition(
    store: &SqliteScoringStore,
    customer_id: Uuid,
) -> Result<Option<RecordedTransition>, StoreError> {
    let body: Option<Vec<u8>> = sqlx::query_scalar(
        "SELECT body FROM transitions WHERE customer_id = ?1 \
         ORDER BY transition_time DESC, id DESC LIMIT 1",
    )
    .bind(customer_id.to_string())
    .fetch_optional(&store.pools.reader)
    .await
    .map_err(StoreError::from_db)?;
    body.as_deref().map(decode_transition).transpose()
}

pub(super) async fn list_transitions(
    store: &SqliteScoringStore,
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
        .fetch_all(&store.pools.reader)
        .await
        .map_err(StoreError::from_db)?;
    bodies.iter().map(|body| decode_transition(body)).collect()
}

pub(super) async fn customer_transitions(
    store: &SqliteScoringStore,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<RecordedTransition>>, StoreError> {
    let rows = store
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

pub(super) async fn load_inputs(
    store: &SqliteScoringStore,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<Input>>, StoreError> {
    let rows = store
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

/// The transition log.
pub(super) fn transition_log(store: &SqliteScoringStore) -> &clm_eventlog::EventLog {
    &store.log
}
