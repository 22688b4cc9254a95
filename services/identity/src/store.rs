//! Where customers are kept. The service computes every change in memory
//! and hands the store one [`ChangeSet`] that commits atomically, with a
//! compare-and-set on each updated customer's version, so the two engines
//! hold no business rules of their own and can be tested by one suite.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use clm_eventlog::EventLog;
use clm_platform::db::{DbFailure, EmbeddedMigration, Pools, ServiceMigrations};
use uuid::Uuid;

use crate::keys::IdentityKey;
use crate::model::{Customer, MergeRecord};

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An updated customer's version was not the expected one: someone else
    /// changed it first.
    #[error("customer {customer_id} was changed concurrently")]
    VersionConflict {
        /// The customer.
        customer_id: Uuid,
    },
    /// An added identity key already belongs to another customer.
    #[error("an identity key is taken")]
    KeyTaken {
        /// The key.
        key: IdentityKey,
    },
    /// A create request id was used by a concurrent call.
    #[error("the request id is taken")]
    RequestIdTaken,
    /// The database cannot be reached.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error("database error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Maps a database error that has no more specific meaning here.
    pub fn from_db(err: sqlx::Error) -> Self {
        match clm_platform::db::failure_of(&err) {
            DbFailure::Unavailable => Self::Unavailable(err.to_string()),
            // A lost race is reported as a conflict so the caller retries.
            DbFailure::Conflict => Self::VersionConflict {
                customer_id: Uuid::nil(),
            },
            DbFailure::Internal => Self::Internal(err.to_string()),
        }
    }
}

/// An entry for the customer event log, committed with the change.
#[derive(Debug, Clone)]
pub struct LogEvent {
    /// The event id.
    pub event_id: Uuid,
    /// The customer it is about (decides the shard).
    pub customer_id: Uuid,
    /// `customer.created`, `customer.updated`, …
    pub kind: &'static str,
    /// The encoded `clm.identity.v1.CustomerEvent` (without cursor).
    pub payload: Vec<u8>,
    /// When.
    pub recorded_at: DateTime<Utc>,
}

/// Everything one operation changes, committed atomically.
#[derive(Debug, Default, Clone)]
pub struct ChangeSet {
    /// New customers.
    pub inserts: Vec<Customer>,
    /// Changed customers, each with the version it must still have in the
    /// database (the new record carries the new version).
    pub updates: Vec<(Customer, i64)>,
    /// Keys to delete, if still owned by the given customer.
    pub removed_keys: Vec<(IdentityKey, Uuid)>,
    /// Every key of the first customer moves to the second.
    pub reassigned_keys: Vec<(Uuid, Uuid)>,
    /// Keys to add for the given customer; fails with
    /// [`StoreError::KeyTaken`] when another customer has one.
    pub added_keys: Vec<(IdentityKey, Uuid)>,
    /// Keyed hashes to put on the suppression list, with the erased customer.
    pub suppress: Vec<(Vec<u8>, Uuid)>,
    /// Keyed hashes to take off the suppression list (consent given again).
    pub unsuppress: Vec<Vec<u8>>,
    /// Merge ledger entries.
    pub merges: Vec<MergeRecord>,
    /// A create request id and the customer it created.
    pub request: Option<(String, Uuid)>,
    /// Customer event log entries.
    pub events: Vec<LogEvent>,
}

impl ChangeSet {
    /// True when nothing would change.
    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.updates.is_empty() && self.events.is_empty()
    }
}

/// What ListCustomers filters by.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only this state (`active`, `merged`, `erased`).
    pub state: &'static str,
    /// Only this stage number.
    pub stage: Option<i32>,
    /// Only this health number.
    pub health: Option<i32>,
    /// Only this company, lower-cased.
    pub company: Option<String>,
    /// Created at or after.
    pub created_after: Option<DateTime<Utc>>,
    /// Created before.
    pub created_before: Option<DateTime<Utc>>,
    /// Only customers with a person-identifying key.
    pub identified_only: bool,
    /// Start after this id (the page token).
    pub after_id: Option<Uuid>,
    /// At most this many.
    pub limit: u32,
}

/// The identity service's storage.
#[async_trait]
pub trait CustomerStore: Send + Sync + 'static {
    /// A customer by id.
    async fn get(&self, id: Uuid) -> Result<Option<Customer>, StoreError>;
    /// Several customers by id, in no particular order; missing ids are left out.
    async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<Customer>, StoreError>;
    /// The owners of those keys that have one.
    async fn owners_of(&self, keys: &[IdentityKey])
    -> Result<Vec<(IdentityKey, Uuid)>, StoreError>;
    /// Those of `hashes` that are on the suppression list.
    async fn suppressed(&self, hashes: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, StoreError>;
    /// The customer a create request id created, if any.
    async fn customer_for_request(&self, request_id: &str) -> Result<Option<Uuid>, StoreError>;
    /// The merge ledger entries that involve a customer, oldest first.
    async fn merges_of(&self, customer_id: Uuid) -> Result<Vec<MergeRecord>, StoreError>;
    /// One page of customers, by id.
    async fn list(&self, query: &ListQuery) -> Result<Vec<Customer>, StoreError>;
    /// Commits a change set atomically.
    async fn commit(&self, changes: &ChangeSet) -> Result<(), StoreError>;
    /// After an erasure: makes what it removed unreadable from the store's
    /// files as far as the engine allows. SQLite (with `secure_delete`)
    /// truncates its WAL, after which nothing is left; PostgreSQL vacuums
    /// soon, which frees the old row versions but does not zero them (see
    /// [`clm_platform::db::ErasureVacuum`]).
    async fn purge_erased(&self) -> Result<(), StoreError>;
    /// The customer event log.
    fn event_log(&self) -> &EventLog;
}

/// The migrations of the identity database.
pub const MIGRATIONS: ServiceMigrations = ServiceMigrations {
    schema: "identity",
    postgres: &[EmbeddedMigration {
        version: 1,
        description: "customers, identity keys, suppression list, merge ledger, event log",
        sql: include_str!("../migrations/postgres/0001_customers.sql"),
    }],
    sqlite: &[EmbeddedMigration {
        version: 1,
        description: "customers, identity keys, suppression list, merge ledger, event log",
        sql: include_str!("../migrations/sqlite/0001_customers.sql"),
    }],
};

/// The name of the event log table.
pub const EVENT_LOG_TABLE: &str = "customer_events";

/// Opens the store for an open database.
pub fn open(pools: Pools) -> Arc<dyn CustomerStore> {
    match pools {
        Pools::Postgres(pool) => Arc::new(postgres::PostgresCustomerStore::new(pool)),
        Pools::Sqlite(pools) => Arc::new(sqlite::SqliteCustomerStore::new(pools)),
    }
}
