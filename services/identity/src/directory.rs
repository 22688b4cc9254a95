//! The identity service's rules: creating, resolving, merging, updating and
//! erasing customers. Each operation reads what it needs, computes the
//! complete change in memory, and commits it as one [`ChangeSet`] guarded by
//! version checks; when a concurrent change wins, it reads again and
//! retries. After every commit the new versions are written through to the
//! hot-profile cache.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use clm_eventlog::{Cursor, ShardFilter};
use clm_platform::cache::VersionedCache;
use clm_platform::server::Shutdown;
use clm_proto::identity as pb;
use futures_util::{Stream, StreamExt as _};
use prost::Message as _;
use rand::Rng as _;
use uuid::Uuid;

use crate::convert::lifecycle_to_proto;
use crate::error::IdentityError;
use crate::keys::{IdentityKey, KeyHasher, KeyKind};
use crate::model::{
    Consent, ConsentStatus, Customer, CustomerState, Lifecycle, MergeRecord, Profile,
};
use crate::profiles::HotProfiles;
use crate::store::{ChangeSet, CustomerStore, ListQuery, LogEvent, StoreError};

/// How often an operation re-reads and retries after losing a race.
const MAX_ATTEMPTS: u32 = 8;
/// How many distinct references of one ResolveCustomers call are resolved at
/// once: enough to overlap database round trips, few enough to leave
/// connections for other calls.
const REFERENCE_CONCURRENCY: usize = 16;

mod changes;
mod lifecycle;
mod requests;
mod resolve;

use changes::*;
pub use requests::*;

/// Customer profiles, their identities and their cache.
pub struct CustomerDirectory {
    store: Arc<dyn CustomerStore>,
    profiles: HotProfiles,
    hasher: KeyHasher,
}

/// The current time at the precision both databases store (microseconds), so
/// a record reads back exactly as it was written.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

impl CustomerDirectory {
    /// A directory over a store and a cache. `hasher` keys the suppression
    /// list.
    pub fn new(
        store: Arc<dyn CustomerStore>,
        cache: Arc<VersionedCache>,
        hasher: KeyHasher,
    ) -> Self {
        Self {
            profiles: HotProfiles::new(cache, store.clone()),
            store,
            hasher,
        }
    }

    /// The store (for the event log stream).
    pub fn store(&self) -> &Arc<dyn CustomerStore> {
        &self.store
    }

    /// The hot profiles: what GetCustomer serves, and the cache's counters.
    pub fn profiles(&self) -> &HotProfiles {
        &self.profiles
    }

    async fn cache_committed(&self, customers: &[&Customer]) {
        self.profiles.write_through(customers).await;
    }

    async fn load(&self, id: Uuid) -> Result<Customer, IdentityError> {
        self.store.get(id).await?.ok_or(IdentityError::NotFound(id))
    }

    async fn load_active(&self, id: Uuid) -> Result<Customer, IdentityError> {
        let customer = self.load(id).await?;
        match customer.state {
            CustomerState::Active => Ok(customer),
            CustomerState::Merged { into } => Err(IdentityError::NotActive {
                customer_id: id,
                state: "merged",
                merged_into: Some(into),
            }),
            CustomerState::Erased => Err(IdentityError::NotActive {
                customer_id: id,
                state: "erased",
                merged_into: None,
            }),
        }
    }

    /// The keyed hashes of the keys that are suppressed. With a granted
    /// consent they are returned for lifting; without, the first is an error.
    async fn suppression(
        &self,
        keys: &[RequestKey],
        consents: &[Consent],
    ) -> Result<Vec<Vec<u8>>, IdentityError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let hashes: Vec<Vec<u8>> = keys.iter().map(|k| self.hasher.hash(&k.key)).collect();
        let suppressed: BTreeSet<Vec<u8>> =
            self.store.suppressed(&hashes).await?.into_iter().collect();
        if suppressed.is_empty() {
            return Ok(Vec::new());
        }
        if !grants_consent(consents) {
            let (index, _) = hashes
                .iter()
                .enumerate()
                .find(|(_, hash)| suppressed.contains(*hash))
                .expect("a suppressed hash came from the list");
            return Err(IdentityError::Suppressed {
                field: keys[index].field.clone(),
            });
        }
        Ok(suppressed.into_iter().collect())
    }

    /// Creates a customer (CreateCustomer).
    pub async fn create(&self, new: NewCustomer) -> Result<Customer, IdentityError> {
        if let Some(request_id) = &new.request_id
            && let Some(id) = self.store.customer_for_request(request_id).await?
        {
            return self.load(id).await;
        }
        let keys = dedupe(new.keys);
        let unsuppress = self.suppression(&keys, &new.profile.consents).await?;
        let now = now();
        let mut customer = Customer::new(now);
        customer.profile = new.profile;
        customer.keys = keys.iter().map(|k| k.key.clone()).collect();
        let mut changes = ChangeSet {
            added_keys: customer
                .keys
                .iter()
                .map(|k| (k.clone(), customer.id))
                .collect(),
            unsuppress,
            request: new.request_id.clone().map(|r| (r, customer.id)),
            ..ChangeSet::default()
        };
        changes.events.push(event(
            &customer,
            "customer.created",
            pb::customer_event::Change::Created(pb::CustomerCreated {
                anonymous: !customer.is_identified(),
            }),
            now,
        ));
        changes.inserts.push(customer.clone());
        match self.store.commit(&changes).await {
            Ok(()) => {
                self.cache_committed(&[&customer]).await;
                tracing::info!(customer_id = %customer.id, "customer created");
                Ok(customer)
            }
            Err(StoreError::KeyTaken { key }) => Err(IdentityError::KeyTaken {
                field: field_of(&keys, &key),
            }),
            Err(StoreError::RequestIdTaken) => {
                // A concurrent call with the same request id won: return its customer.
                let request_id = new.request_id.unwrap_or_default();
                match self.store.customer_for_request(&request_id).await? {
                    Some(id) => self.load(id).await,
                    None => Err(IdentityError::Contended(customer.id)),
                }
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Updates the masked fields of a customer (UpdateCustomer). With
    /// `expected_version` a concurrent change fails with a version conflict;
    /// without, the update is retried on the newest version.
    pub async fn update(
        &self,
        id: Uuid,
        patch: CustomerPatch,
        expected_version: Option<i64>,
    ) -> Result<Customer, IdentityError> {
        let request_keys: Vec<RequestKey> = patch.keys.values().flatten().cloned().collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self.load_active(id).await?;
            if let Some(expected) = expected_version
                && expected != current.version
            {
                return Err(IdentityError::VersionConflict {
                    customer_id: id,
                    expected,
                    current: current.version,
                });
            }
            let now = now();
            let mut next = current.next_version(now);
            let profile = &mut next.profile;
            for (target, value) in [
                (&mut profile.given_name, &patch.given_name),
                (&mut profile.family_name, &patch.family_name),
                (&mut profile.company, &patch.company),
                (&mut profile.industry, &patch.industry),
                (&mut profile.job_title, &patch.job_title),
            ] {
                if let Some(value) = value {
                    target.clone_from(value);
                }
            }
            if let Some(attributes) = &patch.attributes {
                profile.attributes.clone_from(attributes);
            }
            if let Some(consents) = &patch.consents {
                profile.consents.clone_from(consents);
                profile.consents.sort_by(|a, b| a.purpose.cmp(&b.purpose));
            }
            let mut changes = ChangeSet::default();
            let mut added = Vec::new();
            for (kind, wanted) in &patch.keys {
                let wanted: Vec<IdentityKey> =
                    dedupe(wanted.clone()).into_iter().map(|k| k.key).collect();
                for key in current.keys_of(*kind) {
                    if !wanted.contains(key) {
                        changes.removed_keys.push((key.clone(), id));
                    }
                }
                for key in &wanted {
                    if !current.has_key(key) {
                        added.push(key.clone());
                    }
                }
                let mut keys: Vec<IdentityKey> = next
                    .keys
                    .iter()
                    .filter(|k| k.kind != *kind)
                    .cloned()
                    .collect();
                keys.extend(wanted);
                next.keys = keys;
            }
            if next.profile == current.profile && next.keys == current.keys {
                return Ok(current);
            }
            let added_request_keys: Vec<RequestKey> = request_keys
                .iter()
                .filter(|k| added.contains(&k.key))
                .cloned()
                .collect();
            changes.unsuppress = self
                .suppression(
                    &added_request_keys,
                    patch.consents.as_deref().unwrap_or_default(),
                )
                .await?;
            changes.added_keys = added.into_iter().map(|k| (k, id)).collect();
            changes.events.push(event(
                &next,
                "customer.updated",
                pb::customer_event::Change::Updated(pb::CustomerUpdated {
                    changed_fields: current.changed_fields(&next),
                }),
                now,
            ));
            changes.updates.push((next.clone(), current.version));
            match self.store.commit(&changes).await {
                Ok(()) => {
                    self.cache_committed(&[&next]).await;
                    return Ok(next);
                }
                Err(StoreError::KeyTaken { key }) => {
                    return Err(IdentityError::KeyTaken {
                        field: field_of(&request_keys, &key),
                    });
                }
                Err(StoreError::VersionConflict { .. })
                    if expected_version.is_none() && attempt < MAX_ATTEMPTS =>
                {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(StoreError::VersionConflict { .. }) => {
                    let stored = self.load(id).await?;
                    return Err(IdentityError::VersionConflict {
                        customer_id: id,
                        expected: expected_version.unwrap_or(current.version),
                        current: stored.version,
                    });
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// One page of customers, oldest first (ListCustomers).
    pub async fn list(&self, mut query: ListQuery) -> Result<CustomerPage, IdentityError> {
        let page_size = query.limit as usize;
        query.limit += 1;
        let mut customers = self.store.list(&query).await?;
        let next_after = if customers.len() > page_size {
            customers.truncate(page_size);
            customers.last().map(|c| c.id)
        } else {
            None
        };
        Ok(CustomerPage {
            customers,
            next_after,
        })
    }

    /// The merge ledger entries of a customer.
    pub async fn merges_of(&self, customer_id: Uuid) -> Result<Vec<MergeRecord>, IdentityError> {
        Ok(self.store.merges_of(customer_id).await?)
    }

    /// The customer event log after `after`, in batches, live unless
    /// `stop_at_end`.
    pub fn events(
        &self,
        after: Cursor,
        shard: ShardFilter,
        stop_at_end: bool,
        shutdown: Shutdown,
    ) -> impl Stream<Item = Result<Vec<pb::CustomerEvent>, IdentityError>> + Send + 'static {
        self.store
            .event_log()
            .tail(after, shard, 1000, stop_at_end, shutdown)
            .map(|batch| {
                let batch = batch.map_err(|err| IdentityError::from(StoreError::from_db(err)))?;
                batch
                    .into_iter()
                    .map(|entry| {
                        let mut event = pb::CustomerEvent::decode(entry.payload.as_slice())
                            .map_err(|err| {
                                IdentityError::Internal(format!("undecodable log entry: {err}"))
                            })?;
                        event.cursor = entry.cursor.to_string();
                        Ok(event)
                    })
                    .collect()
            })
    }
}
