//! The touchpoint store on SQLite (the embedded default). Ids are UUID
//! strings; times are microseconds since the Unix epoch. SQLite's single
//! writer commits in sequence order, so the log is read by `seq` alone.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use clm_eventlog::consumer::cursors::{self, CursorMove};
use clm_eventlog::{Cursor, ShardFilter, shard_of};
use clm_platform::db::sqlite_columns::{decode_err, time as time_column, uuid as uuid_column};
use clm_platform::db::{Pools, SqlitePools};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite};
use tokio::sync::watch;
use uuid::Uuid;

use super::{StoreError, TouchpointStore, change_entry};
use crate::model::{CustomerChange, LogEntry, Money, Stored, TimelineQuery, Touchpoint, TypeCount};

/// Touchpoints in a SQLite file.
pub struct SqliteTouchpointStore {
    pools: SqlitePools,
    appended: watch::Sender<u64>,
}

impl SqliteTouchpointStore {
    /// A store over open pools.
    pub fn new(pools: SqlitePools) -> Self {
        Self {
            pools,
            appended: watch::channel(0).0,
        }
    }

    fn notify(&self) {
        self.appended.send_modify(|n| *n = n.wrapping_add(1));
    }
}

fn touchpoint_from_row(row: &SqliteRow, with_properties: bool) -> Result<Touchpoint, sqlx::Error> {
    let properties = if with_properties {
        row.try_get::<Option<String>, _>("properties")?
            .map(|json| serde_json::from_str::<BTreeMap<String, String>>(&json).map_err(decode_err))
            .transpose()?
    } else {
        None
    };
    Ok(Touchpoint {
        id: uuid_column(row, "id")?,
        event_id: row.try_get("event_id")?,
        customer_id: uuid_column(row, "customer_id")?,
        channel: row.try_get::<i64, _>("channel")? as i16,
        kind: row.try_get("type")?,
        occurred_at: time_column(row, "occurred_at")?,
        recorded_at: time_column(row, "recorded_at")?,
        campaign: row.try_get("campaign")?,
        utm_source: row.try_get("utm_source")?,
        utm_medium: row.try_get("utm_medium")?,
        properties,
        revenue: Money::from_columns(
            row.try_get("revenue_currency")?,
            row.try_get("revenue_micros")?,
        ),
        cost: Money::from_columns(row.try_get("cost_currency")?, row.try_get("cost_micros")?),
    })
}

const TOUCHPOINT_COLUMNS: &str = "id, event_id, customer_id, channel, type, occurred_at, recorded_at, campaign, \
     utm_source, utm_medium, properties, revenue_currency, revenue_micros, cost_currency, cost_micros";

/// Takes `count` positions of the log sequence inside the write transaction.
async fn take_sequence(tx: &mut sqlx::SqliteConnection, count: usize) -> Result<i64, sqlx::Error> {
    let last: i64 = sqlx::query_scalar(
        "UPDATE log_sequence SET value = value + ?1 WHERE id = 1 RETURNING value",
    )
    .bind(count as i64)
    .fetch_one(tx)
    .await?;
    Ok(last - count as i64 + 1)
}

#[async_trait]
impl TouchpointStore for SqliteTouchpointStore {
    #[tracing::instrument(skip_all, fields(count = touchpoints.len()))]
    async fn insert(&self, touchpoints: &[Touchpoint]) -> Result<Vec<Stored>, StoreError> {
        if touchpoints.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        let customers: HashSet<Uuid> = touchpoints.iter().map(|t| t.customer_id).collect();
        let mut merged = HashMap::new();
        let mut erased = HashSet::new();
        for customer in &customers {
            let survivor: Option<String> =
                sqlx::query_scalar("SELECT survivor_id FROM merged_customers WHERE merged_id = ?1")
                    .bind(customer.to_string())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(StoreError::from_db)?;
            if let Some(survivor) = survivor {
                merged.insert(
                    *customer,
                    Uuid::try_parse(&survivor).map_err(|e| StoreError::Internal(e.to_string()))?,
                );
            }
        }
        for customer in customers
            .iter()
            .map(|c| merged.get(c).copied().unwrap_or(*c))
        {
            let found: Option<String> = sqlx::query_scalar(
                "SELECT customer_id FROM erased_customers WHERE customer_id = ?1",
            )
            .bind(customer.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
            if found.is_some() {
                erased.insert(customer);
            }
        }
        let mut sequence = take_sequence(&mut tx, touchpoints.len())
            .await
            .map_err(StoreError::from_db)?;
        let mut outcomes = Vec::with_capacity(touchpoints.len());
        let mut any_new = false;
        for t in touchpoints {
            let customer = merged.get(&t.customer_id).copied().unwrap_or(t.customer_id);
            let properties = match &t.properties {
                Some(props) if !erased.contains(&customer) && !props.is_empty() => Some(
                    serde_json::to_string(props)
                        .map_err(|err| StoreError::Internal(err.to_string()))?,
                ),
                _ => None,
            };
            let inserted = sqlx::query(
                "INSERT INTO touchpoints (id, event_id, customer_id, channel, type, occurred_at, recorded_at, campaign, \
                   utm_source, utm_medium, properties, revenue_currency, revenue_micros, cost_currency, cost_micros, shard, seq) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17) \
                 ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(t.id.to_string())
            .bind(&t.event_id)
            .bind(customer.to_string())
            .bind(i64::from(t.channel))
            .bind(&t.kind)
            .bind(t.occurred_at.timestamp_micros())
            .bind(t.recorded_at.timestamp_micros())
            .bind(&t.campaign)
            .bind(&t.utm_source)
            .bind(&t.utm_medium)
            .bind(properties)
            .bind(t.revenue.as_ref().map(|m| m.currency.as_str()))
            .bind(t.revenue.as_ref().map(|m| m.micros))
            .bind(t.cost.as_ref().map(|m| m.currency.as_str()))
            .bind(t.cost.as_ref().map(|m| m.micros))
            .bind(shard_of(Some(customer)))
            .bind(sequence)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?
            .rows_affected()
                == 1;
            sequence += 1;
            if inserted {
                any_new = true;
                outcomes.push(Stored::New {
                    id: t.id,
                    customer_id: customer,
                });
            } else {
                let (id, customer_id): (String, String) =
                    sqlx::query_as("SELECT id, customer_id FROM touchpoints WHERE event_id = ?1")
                        .bind(&t.event_id)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(StoreError::from_db)?;
                let parse = |raw: &str| {
                    Uuid::try_parse(raw).map_err(|e| StoreError::Internal(e.to_string()))
                };
                outcomes.push(Stored::Duplicate {
                    id: parse(&id)?,
                    customer_id: parse(&customer_id)?,
                });
            }
        }
        tx.commit().await.map_err(StoreError::from_db)?;
        if any_new {
            self.notify();
        }
        Ok(outcomes)
    }

    #[tracing::instrument(skip_all)]
    async fn find_by_event_id(&self, event_id: &str) -> Result<Option<Touchpoint>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TOUCHPOINT_COLUMNS} FROM touchpoints WHERE event_id = ?1"
        ))
        .bind(event_id)
        .fetch_optional(&self.pools.reader)
        .await
        .map_err(StoreError::from_db)?;
        row.as_ref()
            .map(|row| touchpoint_from_row(row, true))
            .transpose()
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all)]
    async fn timeline(&self, query: &TimelineQuery) -> Result<Vec<Touchpoint>, StoreError> {
        let mut sql = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {TOUCHPOINT_COLUMNS} FROM touchpoints WHERE customer_id = "
        ));
        sql.push_bind(query.customer_id.to_string());
        if !query.types.is_empty() {
            sql.push(" AND type IN (");
            let mut list = sql.separated(", ");
            for kind in &query.types {
                list.push_bind(kind.clone());
            }
            sql.push(")");
        }
        if !query.channels.is_empty() {
            sql.push(" AND channel IN (");
            let mut list = sql.separated(", ");
            for channel in &query.channels {
                list.push_bind(i64::from(*channel));
            }
            sql.push(")");
        }
        if let Some(start) = query.start {
            sql.push(" AND occurred_at >= ")
                .push_bind(start.timestamp_micros());
        }
        if let Some(end) = query.end {
            sql.push(" AND occurred_at < ")
                .push_bind(end.timestamp_micros());
        }
        if let Some((at, id)) = query.after {
            sql.push(" AND (occurred_at, id) < (")
                .push_bind(at.timestamp_micros())
                .push(", ")
                .push_bind(id.to_string())
                .push(")");
        }
        sql.push(" ORDER BY occurred_at DESC, id DESC LIMIT ")
            .push_bind(i64::from(query.limit));
        let rows = sql
            .build()
            .fetch_all(&self.pools.reader)
            .await
            .map_err(StoreError::from_db)?;
        rows.iter()
            .map(|row| touchpoint_from_row(row, true))
            .collect::<Result<_, _>>()
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all)]
    async fn count_by_type(
        &self,
        customer_id: Uuid,
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
        types: &[String],
    ) -> Result<Vec<TypeCount>, StoreError> {
        let mut sql = QueryBuilder::<Sqlite>::new(
            "SELECT type, COUNT(*) AS n, MAX(occurred_at) AS last FROM touchpoints WHERE customer_id = ",
        );
        sql.push_bind(customer_id.to_string());
        if let Some(start) = start {
            sql.push(" AND occurred_at >= ")
                .push_bind(start.timestamp_micros());
        }
        if let Some(end) = end {
            sql.push(" AND occurred_at < ")
                .push_bind(end.timestamp_micros());
        }
        if !types.is_empty() {
            sql.push(" AND type IN (");
            let mut list = sql.separated(", ");
            for kind in types {
                list.push_bind(kind.clone());
            }
            sql.push(")");
        }
        sql.push(" GROUP BY type ORDER BY n DESC, type");
        let rows = sql
            .build()
            .fetch_all(&self.pools.reader)
            .await
            .map_err(StoreError::from_db)?;
        rows.iter()
            .map(|row| {
                Ok(TypeCount {
                    kind: row.try_get("type")?,
                    count: row.try_get("n")?,
                    last_occurred_at: time_column(row, "last")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all)]
    async fn read_log(
        &self,
        after: Cursor,
        shard: ShardFilter,
        limit: u32,
    ) -> Result<Vec<(Cursor, LogEntry)>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM ( \
               SELECT seq, id, event_id, customer_id, channel, type, occurred_at, recorded_at, campaign, utm_source, \
                 utm_medium, NULL AS properties, revenue_currency, revenue_micros, cost_currency, cost_micros, \
                 NULL AS change_id, NULL AS payload \
               FROM touchpoints WHERE seq > ?1 AND (?3 = 1 OR shard % ?3 = ?4) \
               UNION ALL \
               SELECT seq, NULL, NULL, customer_id, NULL, NULL, NULL, recorded_at, NULL, NULL, NULL, NULL, NULL, NULL, \
                 NULL, NULL, event_id, payload \
               FROM touchpoint_changes WHERE seq > ?1 AND (?3 = 1 OR shard % ?3 = ?4) \
             ) ORDER BY seq LIMIT ?2",
        )
        .bind(after.sequence)
        .bind(i64::from(limit))
        .bind(i64::from(shard.count))
        .bind(i64::from(shard.index))
        .fetch_all(&self.pools.reader)
        .await
        .map_err(StoreError::from_db)?;
        rows.iter()
            .map(|row| {
                let cursor = Cursor {
                    transaction: 0,
                    sequence: row.try_get("seq")?,
                };
                let change_id: Option<String> = row.try_get("change_id")?;
                let entry = match change_id {
                    Some(event_id) => LogEntry::Change {
                        event_id: Uuid::try_parse(&event_id).map_err(decode_err)?,
                        customer_id: uuid_column(row, "customer_id")?,
                        recorded_at: time_column(row, "recorded_at")?,
                        payload: row.try_get("payload")?,
                    },
                    None => LogEntry::Recorded(Box::new(touchpoint_from_row(row, false)?)),
                };
                Ok((cursor, entry))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all, fields(changes = changes.len()))]
    async fn apply_customer_changes(
        &self,
        changes: &[CustomerChange],
        cursor: &CursorMove,
    ) -> Result<(), StoreError> {
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        let now = Utc::now();
        let mut appended = false;
        // Any erasure in the batch, even one applied before: a retry after a
        // purge that failed finishes it.
        let erases = changes
            .iter()
            .any(|change| matches!(change, CustomerChange::Erased { .. }));
        for change in changes {
            let moved = match change {
                CustomerChange::Merged(merge) => {
                    let first_time = sqlx::query(
                        "INSERT INTO merged_customers (merged_id, survivor_id, merge_id, merged_at) VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (merged_id) DO NOTHING",
                    )
                    .bind(merge.merged_id.to_string())
                    .bind(merge.survivor_id.to_string())
                    .bind(merge.merge_id.to_string())
                    .bind(merge.merged_at.timestamp_micros())
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from_db)?
                    .rows_affected()
                        == 1;
                    if !first_time {
                        continue;
                    }
                    sqlx::query(
                        "UPDATE merged_customers SET survivor_id = ?2 WHERE survivor_id = ?1",
                    )
                    .bind(merge.merged_id.to_string())
                    .bind(merge.survivor_id.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from_db)?;
                    // The shard stays: a re-keyed touchpoint keeps its place in the
                    // log, so a consumer of the survivor's shard never reads it again.
                    sqlx::query("UPDATE touchpoints SET customer_id = ?2 WHERE customer_id = ?1")
                        .bind(merge.merged_id.to_string())
                        .bind(merge.survivor_id.to_string())
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from_db)?
                        .rows_affected()
                }
                CustomerChange::Erased {
                    customer_id,
                    erased_at,
                } => {
                    let first_time = sqlx::query(
                        "INSERT INTO erased_customers (customer_id, erased_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                    )
                    .bind(customer_id.to_string())
                    .bind(erased_at.timestamp_micros())
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from_db)?
                    .rows_affected()
                        == 1;
                    if !first_time {
                        continue;
                    }
                    sqlx::query("UPDATE touchpoints SET properties = NULL WHERE customer_id = ?1")
                        .bind(customer_id.to_string())
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from_db)?
                        .rows_affected()
                }
            };
            let (entry_id, customer_id, kind, payload) = change_entry(change, moved as i64, now);
            let seq = take_sequence(&mut tx, 1)
                .await
                .map_err(StoreError::from_db)?;
            sqlx::query(
                "INSERT INTO touchpoint_changes (seq, event_id, customer_id, shard, kind, payload, recorded_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .bind(seq)
            .bind(entry_id.to_string())
            .bind(customer_id.to_string())
            .bind(shard_of(Some(customer_id)))
            .bind(kind)
            .bind(payload)
            .bind(now.timestamp_micros())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
            appended = true;
        }
        cursors::move_sqlite(&mut tx, cursor)
            .await
            .map_err(StoreError::from_db)?
            .map_err(|moved| StoreError::Conflict(moved.to_string()))?;
        tx.commit().await.map_err(StoreError::from_db)?;
        if erases {
            // The stripped properties are zeroed in the file (secure_delete);
            // the WAL still has them until it is truncated.
            clm_platform::db::wipe_sqlite_wal(&self.pools, 50)
                .await
                .map_err(StoreError::from_db)?;
        }
        if appended {
            self.notify();
        }
        Ok(())
    }

    async fn saved_cursor(&self, consumer: &str, shard: ShardFilter) -> Result<String, StoreError> {
        cursors::load(&Pools::Sqlite(self.pools.clone()), consumer, shard)
            .await
            .map_err(|err| StoreError::Unavailable(err.0))
    }

    fn appended(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    async fn log_end_reached(&self, _mark: &clm_eventlog::EndMark) -> Result<bool, StoreError> {
        // One process writes: everything committed is readable.
        Ok(true)
    }
}
