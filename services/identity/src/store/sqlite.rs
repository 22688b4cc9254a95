//! The identity store on SQLite (the embedded default). Ids are stored as
//! UUID strings and times as microseconds since the Unix epoch.

use async_trait::async_trait;
use chrono::Utc;
use clm_eventlog::{EventLog, NewEntry};
use clm_platform::db::sqlite_columns::{decode_err, time as time_column, uuid as uuid_column};
use clm_platform::db::{Pools, SqlitePools};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use super::{ChangeSet, CustomerStore, EVENT_LOG_TABLE, ListQuery, StoreError};
use crate::keys::IdentityKey;
use crate::model::{Customer, CustomerState, MergeRecord, StoredDocument};

const CUSTOMER_COLUMNS: &str = "id, state, merged_into, version, document, created_at, updated_at";

/// Customers in a SQLite file.
pub struct SqliteCustomerStore {
    pools: SqlitePools,
    log: EventLog,
}

impl SqliteCustomerStore {
    /// A store over open pools.
    pub fn new(pools: SqlitePools) -> Self {
        let log = EventLog::new(Pools::Sqlite(pools.clone()), EVENT_LOG_TABLE);
        Self { pools, log }
    }
}

fn customer_from_row(row: &SqliteRow) -> Result<Customer, sqlx::Error> {
    let state: String = row.try_get("state")?;
    let merged_into: Option<String> = row.try_get("merged_into")?;
    let document: String = row.try_get("document")?;
    let document: StoredDocument = serde_json::from_str(&document).map_err(decode_err)?;
    let state = match (state.as_str(), merged_into) {
        ("merged", Some(into)) => CustomerState::Merged {
            into: Uuid::try_parse(&into).map_err(decode_err)?,
        },
        ("erased", _) => CustomerState::Erased,
        _ => CustomerState::Active,
    };
    Ok(Customer {
        id: uuid_column(row, "id")?,
        state,
        profile: document.profile,
        keys: document.keys,
        lifecycle: document.lifecycle,
        created_at: time_column(row, "created_at")?,
        updated_at: time_column(row, "updated_at")?,
        erased_at: document.erased_at,
        version: row.try_get("version")?,
    })
}

fn merged_into(customer: &Customer) -> Option<String> {
    match customer.state {
        CustomerState::Merged { into } => Some(into.to_string()),
        _ => None,
    }
}

fn company_key(customer: &Customer) -> Option<String> {
    let company = customer.profile.company.trim();
    (!company.is_empty()).then(|| company.to_lowercase())
}

fn document(customer: &Customer) -> Result<String, StoreError> {
    serde_json::to_string(&StoredDocument::of(customer))
        .map_err(|err| StoreError::Internal(err.to_string()))
}

fn merge_from_row(row: &SqliteRow) -> Result<MergeRecord, sqlx::Error> {
    Ok(MergeRecord {
        merge_id: uuid_column(row, "merge_id")?,
        survivor_id: uuid_column(row, "survivor_id")?,
        merged_id: uuid_column(row, "merged_id")?,
        reason: row.try_get("reason")?,
        requested_by: row.try_get("requested_by")?,
        merged_at: time_column(row, "merged_at")?,
    })
}

/// Binds `?` placeholders for `count` values, e.g. `?,?,?`.
fn placeholders(count: usize) -> String {
    vec!["?"; count].join(",")
}

#[async_trait]
impl CustomerStore for SqliteCustomerStore {
    #[tracing::instrument(skip_all)]
    async fn get(&self, id: Uuid) -> Result<Option<Customer>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = ?1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pools.reader)
        .await
        .map_err(StoreError::from_db)?;
        row.as_ref()
            .map(customer_from_row)
            .transpose()
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all)]
    async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<Customer>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id IN ({})",
            placeholders(ids.len())
        );
        let mut query = sqlx::query(&sql);
        for id in ids {
            query = query.bind(id.to_string());
        }
        let rows = query
            .fetch_all(&self.pools.reader)
            .await
            .map_err(StoreError::from_db)?;
        rows.iter()
            .map(customer_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all)]
    async fn owners_of(
        &self,
        keys: &[IdentityKey],
    ) -> Result<Vec<(IdentityKey, Uuid)>, StoreError> {
        let mut owners = Vec::new();
        for key in keys {
            let owner: Option<String> = sqlx::query_scalar(
                "SELECT customer_id FROM identity_keys WHERE kind = ?1 AND value = ?2",
            )
            .bind(key.kind.as_str())
            .bind(&key.value)
            .fetch_optional(&self.pools.reader)
            .await
            .map_err(StoreError::from_db)?;
            if let Some(owner) = owner {
                let owner =
                    Uuid::try_parse(&owner).map_err(|err| StoreError::Internal(err.to_string()))?;
                owners.push((key.clone(), owner));
            }
        }
        Ok(owners)
    }

    #[tracing::instrument(skip_all)]
    async fn suppressed(&self, hashes: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, StoreError> {
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT key_hash FROM suppressed_keys WHERE key_hash IN ({})",
            placeholders(hashes.len())
        );
        let mut query = sqlx::query_scalar(&sql);
        for hash in hashes {
            query = query.bind(hash.as_slice());
        }
        query
            .fetch_all(&self.pools.reader)
            .await
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all)]
    async fn customer_for_request(&self, request_id: &str) -> Result<Option<Uuid>, StoreError> {
        let id: Option<String> =
            sqlx::query_scalar("SELECT customer_id FROM create_requests WHERE request_id = ?1")
                .bind(request_id)
                .fetch_optional(&self.pools.reader)
                .await
                .map_err(StoreError::from_db)?;
        id.map(|id| Uuid::try_parse(&id).map_err(|err| StoreError::Internal(err.to_string())))
            .transpose()
    }

    #[tracing::instrument(skip_all)]
    async fn merges_of(&self, customer_id: Uuid) -> Result<Vec<MergeRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT merge_id, survivor_id, merged_id, reason, requested_by, merged_at FROM merges \
             WHERE survivor_id = ?1 OR merged_id = ?1 ORDER BY merged_at, merge_id",
        )
        .bind(customer_id.to_string())
        .fetch_all(&self.pools.reader)
        .await
        .map_err(StoreError::from_db)?;
        rows.iter()
            .map(merge_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all)]
    async fn list(&self, query: &ListQuery) -> Result<Vec<Customer>, StoreError> {
        let mut sql = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE state = "
        ));
        sql.push_bind(query.state);
        if let Some(stage) = query.stage {
            sql.push(" AND stage = ").push_bind(stage);
        }
        if let Some(health) = query.health {
            sql.push(" AND health = ").push_bind(health);
        }
        if let Some(company) = &query.company {
            sql.push(" AND company_key = ").push_bind(company.clone());
        }
        if let Some(after) = query.created_after {
            sql.push(" AND created_at >= ")
                .push_bind(after.timestamp_micros());
        }
        if let Some(before) = query.created_before {
            sql.push(" AND created_at < ")
                .push_bind(before.timestamp_micros());
        }
        if query.identified_only {
            sql.push(" AND identified = 1");
        }
        if let Some(after_id) = query.after_id {
            sql.push(" AND id > ").push_bind(after_id.to_string());
        }
        sql.push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(query.limit));
        let rows = sql
            .build()
            .fetch_all(&self.pools.reader)
            .await
            .map_err(StoreError::from_db)?;
        rows.iter()
            .map(customer_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all, fields(inserts = changes.inserts.len(), updates = changes.updates.len()))]
    async fn commit(&self, changes: &ChangeSet) -> Result<(), StoreError> {
        // The writer pool has one connection: transactions run one at a time.
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        for customer in &changes.inserts {
            sqlx::query(
                "INSERT INTO customers (id, state, merged_into, version, document, stage, health, company_key, identified, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )
            .bind(customer.id.to_string())
            .bind(customer.state.as_str())
            .bind(merged_into(customer))
            .bind(customer.version)
            .bind(document(customer)?)
            .bind(customer.stage())
            .bind(customer.health())
            .bind(company_key(customer))
            .bind(customer.is_identified())
            .bind(customer.created_at.timestamp_micros())
            .bind(customer.updated_at.timestamp_micros())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        }
        for (customer, expected_version) in &changes.updates {
            let updated = sqlx::query(
                "UPDATE customers SET state = ?2, merged_into = ?3, version = ?4, document = ?5, stage = ?6, \
                 health = ?7, company_key = ?8, identified = ?9, created_at = ?10, updated_at = ?11 \
                 WHERE id = ?1 AND version = ?12",
            )
            .bind(customer.id.to_string())
            .bind(customer.state.as_str())
            .bind(merged_into(customer))
            .bind(customer.version)
            .bind(document(customer)?)
            .bind(customer.stage())
            .bind(customer.health())
            .bind(company_key(customer))
            .bind(customer.is_identified())
            .bind(customer.created_at.timestamp_micros())
            .bind(customer.updated_at.timestamp_micros())
            .bind(expected_version)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
            if updated.rows_affected() == 0 {
                return Err(StoreError::VersionConflict {
                    customer_id: customer.id,
                });
            }
        }
        for (key, owner) in &changes.removed_keys {
            sqlx::query(
                "DELETE FROM identity_keys WHERE kind = ?1 AND value = ?2 AND customer_id = ?3",
            )
            .bind(key.kind.as_str())
            .bind(&key.value)
            .bind(owner.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        }
        for (from, to) in &changes.reassigned_keys {
            sqlx::query("UPDATE identity_keys SET customer_id = ?2 WHERE customer_id = ?1")
                .bind(from.to_string())
                .bind(to.to_string())
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from_db)?;
        }
        for (key, owner) in &changes.added_keys {
            let current: Option<String> = sqlx::query_scalar(
                "SELECT customer_id FROM identity_keys WHERE kind = ?1 AND value = ?2",
            )
            .bind(key.kind.as_str())
            .bind(&key.value)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
            match current {
                Some(current) if current == owner.to_string() => {}
                Some(_) => return Err(StoreError::KeyTaken { key: key.clone() }),
                None => {
                    sqlx::query(
                        "INSERT INTO identity_keys (kind, value, customer_id) VALUES (?1, ?2, ?3)",
                    )
                    .bind(key.kind.as_str())
                    .bind(&key.value)
                    .bind(owner.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from_db)?;
                }
            }
        }
        let now = Utc::now().timestamp_micros();
        for (hash, customer_id) in &changes.suppress {
            sqlx::query(
                "INSERT INTO suppressed_keys (key_hash, erased_customer_id, suppressed_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            )
            .bind(hash.as_slice())
            .bind(customer_id.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        }
        for hash in &changes.unsuppress {
            sqlx::query("DELETE FROM suppressed_keys WHERE key_hash = ?1")
                .bind(hash.as_slice())
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from_db)?;
        }
        for merge in &changes.merges {
            sqlx::query(
                "INSERT INTO merges (merge_id, survivor_id, merged_id, reason, requested_by, merged_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .bind(merge.merge_id.to_string())
            .bind(merge.survivor_id.to_string())
            .bind(merge.merged_id.to_string())
            .bind(&merge.reason)
            .bind(&merge.requested_by)
            .bind(merge.merged_at.timestamp_micros())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        }
        if let Some((request_id, customer_id)) = &changes.request {
            let inserted = sqlx::query(
                "INSERT INTO create_requests (request_id, customer_id, created_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            )
            .bind(request_id)
            .bind(customer_id.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
            if inserted.rows_affected() == 0 {
                return Err(StoreError::RequestIdTaken);
            }
        }
        for event in &changes.events {
            self.log
                .append_sqlite(
                    &mut tx,
                    &NewEntry {
                        event_id: event.event_id,
                        customer_id: Some(event.customer_id),
                        kind: event.kind,
                        payload: &event.payload,
                        recorded_at: event.recorded_at,
                    },
                )
                .await
                .map_err(StoreError::from_db)?;
        }
        tx.commit().await.map_err(StoreError::from_db)?;
        if !changes.events.is_empty() {
            self.log.notify_appended();
        }
        Ok(())
    }

    async fn purge_erased(&self) -> Result<(), StoreError> {
        clm_platform::db::wipe_sqlite_wal(&self.pools, 50)
            .await
            .map_err(StoreError::from_db)
    }

    fn event_log(&self) -> &EventLog {
        &self.log
    }
}
