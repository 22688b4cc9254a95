//! The identity store on PostgreSQL.

use async_trait::async_trait;
use clm_eventlog::{EventLog, NewEntry};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::{ChangeSet, CustomerStore, EVENT_LOG_TABLE, ListQuery, StoreError};
use crate::keys::{IdentityKey, KeyKind};
use crate::model::{Customer, CustomerState, MergeRecord, StoredDocument};
use clm_platform::db::Pools;

const CUSTOMER_COLUMNS: &str = "id, state, merged_into, version, document, created_at, updated_at";

/// Customers in PostgreSQL (schema `identity`).
pub struct PostgresCustomerStore {
    pool: PgPool,
    log: EventLog,
    vacuum: clm_platform::db::ErasureVacuum,
}

impl PostgresCustomerStore {
    /// A store over an open pool whose `search_path` is the identity schema.
    pub fn new(pool: PgPool) -> Self {
        let log = EventLog::new(Pools::Postgres(pool.clone()), EVENT_LOG_TABLE);
        let vacuum = clm_platform::db::ErasureVacuum::spawn(
            pool.clone(),
            &["customers", "identity_keys"],
            std::time::Duration::from_secs(10),
        );
        Self { pool, log, vacuum }
    }
}

fn customer_from_row(row: &PgRow) -> Result<Customer, sqlx::Error> {
    let state: String = row.try_get("state")?;
    let merged_into: Option<Uuid> = row.try_get("merged_into")?;
    let Json(document): Json<StoredDocument> = row.try_get("document")?;
    let state = match (state.as_str(), merged_into) {
        ("merged", Some(into)) => CustomerState::Merged { into },
        ("erased", _) => CustomerState::Erased,
        _ => CustomerState::Active,
    };
    Ok(Customer {
        id: row.try_get("id")?,
        state,
        profile: document.profile,
        keys: document.keys,
        lifecycle: document.lifecycle,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        erased_at: document.erased_at,
        version: row.try_get("version")?,
    })
}

fn merged_into(customer: &Customer) -> Option<Uuid> {
    match customer.state {
        CustomerState::Merged { into } => Some(into),
        _ => None,
    }
}

fn company_key(customer: &Customer) -> Option<String> {
    let company = customer.profile.company.trim();
    (!company.is_empty()).then(|| company.to_lowercase())
}

fn merge_from_row(row: &PgRow) -> Result<MergeRecord, sqlx::Error> {
    Ok(MergeRecord {
        merge_id: row.try_get("merge_id")?,
        survivor_id: row.try_get("survivor_id")?,
        merged_id: row.try_get("merged_id")?,
        reason: row.try_get("reason")?,
        requested_by: row.try_get("requested_by")?,
        merged_at: row.try_get("merged_at")?,
    })
}

#[async_trait]
impl CustomerStore for PostgresCustomerStore {
    #[tracing::instrument(skip_all)]
    async fn get(&self, id: Uuid) -> Result<Option<Customer>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        row.as_ref()
            .map(customer_from_row)
            .transpose()
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all)]
    async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<Customer>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = ANY($1)"
        ))
        // Planned for each call (see `clm_platform::db` on batch lookups).
        .persistent(false)
        .bind(ids)
        .fetch_all(&self.pool)
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
        let kinds: Vec<&str> = keys.iter().map(|k| k.kind.as_str()).collect();
        let values: Vec<&str> = keys.iter().map(|k| k.value.as_str()).collect();
        let rows = sqlx::query(
            "SELECT k.kind, k.value, k.customer_id FROM identity_keys k \
             JOIN UNNEST($1::text[], $2::text[]) AS wanted(kind, value) \
               ON k.kind = wanted.kind AND k.value = wanted.value",
        )
        .bind(&kinds)
        .bind(&values)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                let kind = KeyKind::from_stored(&kind).ok_or_else(|| {
                    sqlx::Error::Decode(format!("unknown key kind {kind}").into())
                })?;
                Ok((
                    IdentityKey {
                        kind,
                        value: row.try_get("value")?,
                    },
                    row.try_get("customer_id")?,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all)]
    async fn suppressed(&self, hashes: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, StoreError> {
        sqlx::query_scalar("SELECT key_hash FROM suppressed_keys WHERE key_hash = ANY($1)")
            .persistent(false)
            .bind(hashes)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all)]
    async fn customer_for_request(&self, request_id: &str) -> Result<Option<Uuid>, StoreError> {
        sqlx::query_scalar("SELECT customer_id FROM create_requests WHERE request_id = $1")
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all)]
    async fn merges_of(&self, customer_id: Uuid) -> Result<Vec<MergeRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT merge_id, survivor_id, merged_id, reason, requested_by, merged_at FROM merges \
             WHERE survivor_id = $1 OR merged_id = $1 ORDER BY merged_at, merge_id",
        )
        .bind(customer_id)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        rows.iter()
            .map(merge_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all)]
    async fn list(&self, query: &ListQuery) -> Result<Vec<Customer>, StoreError> {
        let mut sql = QueryBuilder::<Postgres>::new(format!(
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
            sql.push(" AND created_at >= ").push_bind(after);
        }
        if let Some(before) = query.created_before {
            sql.push(" AND created_at < ").push_bind(before);
        }
        if query.identified_only {
            sql.push(" AND identified");
        }
        if let Some(after_id) = query.after_id {
            sql.push(" AND id > ").push_bind(after_id);
        }
        sql.push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(query.limit));
        let rows = sql
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from_db)?;
        rows.iter()
            .map(customer_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::from_db)
    }

    #[tracing::instrument(skip_all, fields(inserts = changes.inserts.len(), updates = changes.updates.len()))]
    async fn commit(&self, changes: &ChangeSet) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
        for customer in &changes.inserts {
            sqlx::query(
                "INSERT INTO customers (id, state, merged_into, version, document, stage, health, company_key, identified, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(customer.id)
            .bind(customer.state.as_str())
            .bind(merged_into(customer))
            .bind(customer.version)
            .bind(Json(StoredDocument::of(customer)))
            .bind(customer.stage())
            .bind(customer.health())
            .bind(company_key(customer))
            .bind(customer.is_identified())
            .bind(customer.created_at)
            .bind(customer.updated_at)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        }
        for (customer, expected_version) in &changes.updates {
            let updated = sqlx::query(
                "UPDATE customers SET state = $2, merged_into = $3, version = $4, document = $5, stage = $6, \
                 health = $7, company_key = $8, identified = $9, created_at = $10, updated_at = $11 \
                 WHERE id = $1 AND version = $12",
            )
            .bind(customer.id)
            .bind(customer.state.as_str())
            .bind(merged_into(customer))
            .bind(customer.version)
            .bind(Json(StoredDocument::of(customer)))
            .bind(customer.stage())
            .bind(customer.health())
            .bind(company_key(customer))
            .bind(customer.is_identified())
            .bind(customer.created_at)
            .bind(customer.updated_at)
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
                "DELETE FROM identity_keys WHERE kind = $1 AND value = $2 AND customer_id = $3",
            )
            .bind(key.kind.as_str())
            .bind(&key.value)
            .bind(owner)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        }
        for (from, to) in &changes.reassigned_keys {
            sqlx::query("UPDATE identity_keys SET customer_id = $2 WHERE customer_id = $1")
                .bind(from)
                .bind(to)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from_db)?;
        }
        for (key, owner) in &changes.added_keys {
            // ON CONFLICT waits for a concurrent writer of the same key and
            // skips the row if that writer commits, without aborting this
            // transaction; a fresh statement then sees who owns it.
            let inserted = sqlx::query(
                "INSERT INTO identity_keys (kind, value, customer_id) VALUES ($1, $2, $3) ON CONFLICT (kind, value) DO NOTHING",
            )
            .bind(key.kind.as_str())
            .bind(&key.value)
            .bind(owner)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
            if inserted.rows_affected() == 0 {
                let current: Option<Uuid> = sqlx::query_scalar(
                    "SELECT customer_id FROM identity_keys WHERE kind = $1 AND value = $2",
                )
                .bind(key.kind.as_str())
                .bind(&key.value)
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::from_db)?;
                if current != Some(*owner) {
                    return Err(StoreError::KeyTaken { key: key.clone() });
                }
            }
        }
        for (hash, customer_id) in &changes.suppress {
            sqlx::query("INSERT INTO suppressed_keys (key_hash, erased_customer_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(hash)
                .bind(customer_id)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from_db)?;
        }
        for hash in &changes.unsuppress {
            sqlx::query("DELETE FROM suppressed_keys WHERE key_hash = $1")
                .bind(hash)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from_db)?;
        }
        for merge in &changes.merges {
            sqlx::query(
                "INSERT INTO merges (merge_id, survivor_id, merged_id, reason, requested_by, merged_at) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(merge.merge_id)
            .bind(merge.survivor_id)
            .bind(merge.merged_id)
            .bind(&merge.reason)
            .bind(&merge.requested_by)
            .bind(merge.merged_at)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        }
        if let Some((request_id, customer_id)) = &changes.request {
            let inserted = sqlx::query(
                "INSERT INTO create_requests (request_id, customer_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(request_id)
            .bind(customer_id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
            if inserted.rows_affected() == 0 {
                return Err(StoreError::RequestIdTaken);
            }
        }
        for event in &changes.events {
            self.log
                .append_postgres(
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
        self.vacuum.erased();
        Ok(())
    }

    fn event_log(&self) -> &EventLog {
        &self.log
    }
}
