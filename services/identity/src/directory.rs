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
use clm_platform::cache::{Versioned, VersionedCache};
use clm_platform::server::Shutdown;
use clm_proto::identity as pb;
use futures_util::{Stream, StreamExt as _};
use prost::Message as _;
use rand::Rng as _;
use uuid::Uuid;

use crate::convert::{customer_to_proto, lifecycle_to_proto};
use crate::error::IdentityError;
use crate::keys::{IdentityKey, KeyHasher, KeyKind};
use crate::model::{
    Consent, ConsentStatus, Customer, CustomerState, Lifecycle, MergeRecord, Profile,
};
use crate::store::{ChangeSet, CustomerStore, ListQuery, LogEvent, StoreError};

/// How often an operation re-reads and retries after losing a race.
const MAX_ATTEMPTS: u32 = 8;
/// How many merge pointers are followed to find the final survivor.
const MAX_MERGE_HOPS: usize = 16;
/// How many distinct references of one ResolveCustomers call are resolved at
/// once: enough to overlap database round trips, few enough to leave
/// connections for other calls.
const REFERENCE_CONCURRENCY: usize = 16;

/// An identity key as a request gave it, with the field that carried it (for
/// error messages).
#[derive(Debug, Clone)]
pub struct RequestKey {
    /// The request field, e.g. `customer.emails[1]`.
    pub field: String,
    /// The normalised key.
    pub key: IdentityKey,
}

/// A customer to create.
#[derive(Debug, Clone, Default)]
pub struct NewCustomer {
    /// Profile fields, consents included.
    pub profile: Profile,
    /// Identity keys.
    pub keys: Vec<RequestKey>,
    /// The idempotency key of the request.
    pub request_id: Option<String>,
}

/// The fields an update changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct CustomerPatch {
    /// New given name.
    pub given_name: Option<String>,
    /// New family name.
    pub family_name: Option<String>,
    /// New company.
    pub company: Option<String>,
    /// New industry.
    pub industry: Option<String>,
    /// New job title.
    pub job_title: Option<String>,
    /// New attributes (replace all).
    pub attributes: Option<BTreeMap<String, String>>,
    /// New consents (replace all).
    pub consents: Option<Vec<Consent>>,
    /// New keys per kind (replace all keys of that kind).
    pub keys: BTreeMap<KeyKind, Vec<RequestKey>>,
}

/// A resolve request.
#[derive(Debug, Clone, Default)]
pub struct ResolveRequest {
    /// The keys that identify the person.
    pub keys: Vec<RequestKey>,
    /// Profile fields to fill where empty (consents ignored here).
    pub traits: Profile,
    /// Consent decisions to record.
    pub consents: Vec<Consent>,
    /// Merge two identified customers when the keys point at both.
    pub allow_merge: bool,
}

/// What a resolve found or did.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The customer the keys identify.
    pub customer: Customer,
    /// True when created by this call.
    pub created: bool,
    /// Customers merged into it by this call.
    pub merged_ids: Vec<Uuid>,
}

/// The result of an erase.
#[derive(Debug, Clone)]
pub struct Erased {
    /// The tombstone.
    pub customer: Customer,
    /// When the personal data was erased.
    pub erased_at: DateTime<Utc>,
    /// How many keys went on the suppression list.
    pub suppressed_keys: usize,
}

/// A page of customers.
#[derive(Debug, Clone)]
pub struct CustomerPage {
    /// The customers.
    pub customers: Vec<Customer>,
    /// Where the next page starts, if there is one.
    pub next_after: Option<Uuid>,
}

/// A customer reference of ResolveCustomers, validated.
#[derive(Debug, Clone)]
pub enum CustomerReference {
    /// A customer id, followed through merges to its final survivor.
    Id(Uuid),
    /// Identity keys, resolved (or created) as ResolveCustomer does, without
    /// merging two identified customers.
    Keys(Vec<RequestKey>),
}

/// What makes two references identical: the id, or the set of keys (their
/// order and the request fields that carried them do not matter).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ReferenceTarget {
    Id(Uuid),
    Keys(BTreeSet<IdentityKey>),
}

impl CustomerReference {
    fn target(&self) -> ReferenceTarget {
        match self {
            Self::Id(id) => ReferenceTarget::Id(*id),
            Self::Keys(keys) => ReferenceTarget::Keys(keys.iter().map(|k| k.key.clone()).collect()),
        }
    }
}

/// The customer a reference names now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferencedCustomer {
    /// The customer: for an id, the final survivor of any merges.
    pub customer_id: Uuid,
    /// True when this call created it from identity keys.
    pub created: bool,
}

/// The outcome of one reference of ResolveCustomers; an error concerns that
/// reference only.
pub type ReferenceOutcome = Result<ReferencedCustomer, IdentityError>;

/// The outcome of `first` told for `reference`, an identical reference that
/// shares it: a failure names the request field of `reference`, not of
/// `first`.
fn outcome_for(
    reference: &CustomerReference,
    first: &CustomerReference,
    outcome: &ReferenceOutcome,
) -> ReferenceOutcome {
    match (outcome, first, reference) {
        (
            Err(IdentityError::Suppressed { field }),
            CustomerReference::Keys(first_keys),
            CustomerReference::Keys(keys),
        ) => {
            let own_field = first_keys
                .iter()
                .find(|k| &k.field == field)
                .map_or_else(|| field.clone(), |k| field_of(keys, &k.key));
            Err(IdentityError::Suppressed { field: own_field })
        }
        _ => outcome.clone(),
    }
}

/// Customer profiles, their identities and their cache.
pub struct CustomerDirectory {
    store: Arc<dyn CustomerStore>,
    cache: Arc<VersionedCache>,
    hasher: KeyHasher,
}

/// The current time at the precision both databases store (microseconds), so
/// a record reads back exactly as it was written.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// What storing a lifecycle snapshot on a customer comes to.
enum Planned {
    /// Nothing to write: (applied, version).
    Keep((bool, i64)),
    /// The customer's next version, added to the change set.
    Write(Box<Customer>),
}

/// Plans storing `lifecycle` on `current`: an older snapshot than the
/// stored one, or a merged or erased customer, is ignored; a change of
/// stage, status or health is logged.
fn plan_lifecycle(
    current: &Customer,
    lifecycle: &Lifecycle,
    now: DateTime<Utc>,
    changes: &mut ChangeSet,
) -> Planned {
    if current.state != CustomerState::Active {
        return Planned::Keep((false, current.version));
    }
    if let Some(stored) = &current.lifecycle {
        if stored.evaluated_at > lifecycle.evaluated_at {
            return Planned::Keep((false, current.version));
        }
        if stored == lifecycle {
            return Planned::Keep((true, current.version));
        }
    }
    let mut next = current.next_version(now);
    next.lifecycle = Some(lifecycle.clone());
    let moved = current.lifecycle.as_ref().is_none_or(|stored| {
        (stored.stage, stored.acquisition_status, stored.health)
            != (
                lifecycle.stage,
                lifecycle.acquisition_status,
                lifecycle.health,
            )
    });
    if moved {
        changes.events.push(event(
            &next,
            "customer.lifecycle_changed",
            pb::customer_event::Change::LifecycleChanged(pb::LifecycleChanged {
                lifecycle: Some(lifecycle_to_proto(lifecycle)),
            }),
            now,
        ));
    }
    changes.updates.push((next.clone(), current.version));
    Planned::Write(Box::new(next))
}

fn backoff(attempt: u32) -> Duration {
    let base = 2_u64.pow(attempt.min(6));
    Duration::from_millis(rand::rng().random_range(base..base * 3))
}

fn dedupe(keys: Vec<RequestKey>) -> Vec<RequestKey> {
    let mut seen = BTreeSet::new();
    keys.into_iter()
        .filter(|k| seen.insert(k.key.clone()))
        .collect()
}

fn grants_consent(consents: &[Consent]) -> bool {
    consents.iter().any(|c| c.status == ConsentStatus::Granted)
}

fn field_of(keys: &[RequestKey], key: &IdentityKey) -> String {
    keys.iter()
        .find(|k| &k.key == key)
        .map_or_else(|| "keys".to_owned(), |k| k.field.clone())
}

fn event(
    customer: &Customer,
    kind: &'static str,
    change: pb::customer_event::Change,
    now: DateTime<Utc>,
) -> LogEvent {
    let event_id = Uuid::now_v7();
    let body = pb::CustomerEvent {
        cursor: String::new(),
        event_id: event_id.to_string(),
        customer_id: customer.id.to_string(),
        occur_time: Some(clm_platform::time::to_timestamp(now)),
        version: customer.version,
        change: Some(change),
    };
    LogEvent {
        event_id,
        customer_id: customer.id,
        kind,
        payload: body.encode_to_vec(),
        recorded_at: now,
    }
}

fn merged_event(subject: &Customer, record: &MergeRecord, now: DateTime<Utc>) -> LogEvent {
    event(
        subject,
        "customer.merged",
        pb::customer_event::Change::Merged(pb::CustomerMerged {
            merged_id: record.merged_id.to_string(),
            merge_id: record.merge_id.to_string(),
            survivor_id: record.survivor_id.to_string(),
        }),
        now,
    )
}

/// Moves `merged` into `survivor` by the survivorship rule and records the
/// merged record's new state in `changes`.
fn absorb(
    survivor: &mut Customer,
    merged: &Customer,
    reason: &str,
    requested_by: &str,
    now: DateTime<Utc>,
    changes: &mut ChangeSet,
) -> (MergeRecord, Customer) {
    survivor.profile.fill_from(&merged.profile);
    for key in &merged.keys {
        if !survivor.has_key(key) {
            survivor.keys.push(key.clone());
        }
    }
    if survivor.lifecycle.is_none() {
        survivor.lifecycle.clone_from(&merged.lifecycle);
    }
    survivor.created_at = survivor.created_at.min(merged.created_at);

    let mut pointer = merged.next_version(now);
    pointer.state = CustomerState::Merged { into: survivor.id };
    pointer.profile = Profile::default();
    pointer.keys.clear();
    pointer.lifecycle = None;
    let record = MergeRecord {
        merge_id: Uuid::now_v7(),
        survivor_id: survivor.id,
        merged_id: merged.id,
        reason: reason.to_owned(),
        requested_by: requested_by.to_owned(),
        merged_at: now,
    };
    changes.updates.push((pointer.clone(), merged.version));
    changes.reassigned_keys.push((merged.id, survivor.id));
    changes.merges.push(record.clone());
    changes.events.push(merged_event(&pointer, &record, now));
    (record, pointer)
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
            store,
            cache,
            hasher,
        }
    }

    /// The store (for the event log stream).
    pub fn store(&self) -> &Arc<dyn CustomerStore> {
        &self.store
    }

    /// The cache (for its counters).
    pub fn cache(&self) -> &VersionedCache {
        &self.cache
    }

    async fn cache_committed(&self, customers: &[&Customer]) {
        for customer in customers {
            let value = Versioned {
                version: customer.version,
                bytes: customer_to_proto(customer).encode_to_vec(),
            };
            self.cache.store(&customer.id.to_string(), &value).await;
        }
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

    /// A customer as served by GetCustomer: from the cache when hot. A merged
    /// customer points at its final survivor.
    pub async fn get(&self, id: Uuid) -> Result<pb::Customer, IdentityError> {
        let mut customer = self
            .get_cached(id)
            .await?
            .ok_or(IdentityError::NotFound(id))?;
        if customer.merged_into_id.is_empty() {
            return Ok(customer);
        }
        let (survivor_id, survivor) = self.final_survivor(id, customer.clone()).await?;
        // The chain ends at a customer that was never merged, or, when a pointer
        // leads nowhere or the chain is too long, at the last pointer read.
        customer.merged_into_id = if survivor.merged_into_id.is_empty() {
            survivor_id.to_string()
        } else {
            survivor.merged_into_id
        };
        Ok(customer)
    }

    /// Follows the merge pointers from `customer` (whose id is `id`) through
    /// the cache, at most [`MAX_MERGE_HOPS`] of them, and returns the last
    /// customer reached with its id: the final survivor, or `customer` itself
    /// when it was never merged. The chain stops early at a pointer that leads
    /// nowhere; the customer returned then still carries that pointer.
    async fn final_survivor(
        &self,
        id: Uuid,
        customer: pb::Customer,
    ) -> Result<(Uuid, pb::Customer), IdentityError> {
        let mut current = (id, customer);
        for _ in 0..MAX_MERGE_HOPS {
            let Ok(next_id) = Uuid::try_parse(&current.1.merged_into_id) else {
                break;
            };
            match self.get_cached(next_id).await? {
                Some(next) => current = (next_id, next),
                None => break,
            }
        }
        Ok(current)
    }

    /// Resolves the references of one ResolveCustomers call: one outcome per
    /// reference, in order. Identical references (the same id, or the same set
    /// of keys) are resolved once and share their outcome; distinct ones are
    /// resolved 16 at a time. A failure of the request
    /// (an unknown or erased customer, a suppressed key, a conflict) is the
    /// outcome of its reference; a database outage fails the whole call.
    pub async fn resolve_references(
        &self,
        references: Vec<CustomerReference>,
    ) -> Result<Vec<ReferenceOutcome>, IdentityError> {
        let mut distinct: Vec<&CustomerReference> = Vec::new();
        let mut distinct_index_of_reference = Vec::with_capacity(references.len());
        let mut index_of_target = BTreeMap::new();
        for reference in &references {
            let next_index = distinct.len();
            let index = *index_of_target
                .entry(reference.target())
                .or_insert(next_index);
            if index == next_index {
                distinct.push(reference);
            }
            distinct_index_of_reference.push(index);
        }

        // The futures are built before they enter the stream (a closure there
        // would make the handler's future not provably `Send`); nothing runs
        // until the stream polls them.
        let pending: Vec<_> =
            distinct
                .iter()
                .enumerate()
                .map(|(index, reference)| async move {
                    (index, self.resolve_reference(reference).await)
                })
                .collect();
        let mut resolving =
            futures_util::stream::iter(pending).buffer_unordered(REFERENCE_CONCURRENCY);
        let mut resolved = Vec::with_capacity(distinct.len());
        while let Some((index, outcome)) = resolving.next().await {
            match outcome {
                Err(err) if err.is_outage() => return Err(err),
                outcome => resolved.push((index, outcome)),
            }
        }
        // Every distinct reference answered once: in index order, the
        // position of an outcome is its index.
        resolved.sort_by_key(|(index, _)| *index);
        let resolved: Vec<ReferenceOutcome> =
            resolved.into_iter().map(|(_, outcome)| outcome).collect();

        Ok(references
            .iter()
            .zip(distinct_index_of_reference)
            .map(|(reference, index)| outcome_for(reference, distinct[index], &resolved[index]))
            .collect())
    }

    async fn resolve_reference(&self, reference: &CustomerReference) -> ReferenceOutcome {
        match reference {
            CustomerReference::Id(id) => self.live_survivor(*id).await,
            CustomerReference::Keys(keys) => {
                let resolved = self
                    .resolve(ResolveRequest {
                        keys: keys.clone(),
                        traits: Profile::default(),
                        consents: Vec::new(),
                        allow_merge: false,
                    })
                    .await?;
                Ok(ReferencedCustomer {
                    customer_id: resolved.customer.id,
                    created: resolved.created,
                })
            }
        }
    }

    /// The live customer an id names now, through the cache: the customer
    /// itself, or the final survivor of its merges.
    async fn live_survivor(&self, id: Uuid) -> ReferenceOutcome {
        let customer = self
            .get_cached(id)
            .await?
            .ok_or(IdentityError::NotFound(id))?;
        let (survivor_id, survivor) = self.final_survivor(id, customer).await?;
        match survivor.state() {
            pb::CustomerState::Active => Ok(ReferencedCustomer {
                customer_id: survivor_id,
                created: false,
            }),
            pb::CustomerState::Erased => Err(IdentityError::NotActive {
                customer_id: survivor_id,
                state: "erased",
                merged_into: None,
            }),
            // The chain of merges broke off (a pointer that leads nowhere or
            // too many hops): say where it ended.
            pb::CustomerState::Merged => match Uuid::try_parse(&survivor.merged_into_id) {
                Ok(into) => Err(IdentityError::NotActive {
                    customer_id: survivor_id,
                    state: "merged",
                    merged_into: Some(into),
                }),
                Err(_) => Err(IdentityError::Internal(format!(
                    "customer {survivor_id} is merged into an unreadable id"
                ))),
            },
            pb::CustomerState::Unspecified => Err(IdentityError::Internal(format!(
                "customer {survivor_id} has no state"
            ))),
        }
    }

    async fn get_cached(&self, id: Uuid) -> Result<Option<pb::Customer>, IdentityError> {
        let store = &self.store;
        let cached = self
            .cache
            .get_or_load(&id.to_string(), || async move {
                let customer = store.get(id).await?;
                Ok::<_, StoreError>(customer.map(|c| Versioned {
                    version: c.version,
                    bytes: customer_to_proto(&c).encode_to_vec(),
                }))
            })
            .await?;
        cached
            .map(|value| {
                pb::Customer::decode(value.bytes.as_slice()).map_err(|err| {
                    IdentityError::Internal(format!("undecodable cached customer: {err}"))
                })
            })
            .transpose()
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

    /// Resolves identity keys to one customer, creating or merging as the
    /// rules say (ResolveCustomer).
    pub async fn resolve(&self, request: ResolveRequest) -> Result<Resolved, IdentityError> {
        let keys = dedupe(request.keys.clone());
        let unsuppress = self.suppression(&keys, &request.consents).await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_resolve(&keys, &request, &unsuppress).await {
                Err(IdentityError::Contended(_)) if attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                outcome => return outcome,
            }
        }
    }

    async fn try_resolve(
        &self,
        keys: &[RequestKey],
        request: &ResolveRequest,
        unsuppress: &[Vec<u8>],
    ) -> Result<Resolved, IdentityError> {
        let wanted: Vec<IdentityKey> = keys.iter().map(|k| k.key.clone()).collect();
        let owners: BTreeSet<Uuid> = self
            .store
            .owners_of(&wanted)
            .await?
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        let now = now();
        let mut changes = ChangeSet {
            unsuppress: unsuppress.to_vec(),
            ..ChangeSet::default()
        };

        if owners.is_empty() {
            let mut customer = Customer::new(now);
            customer.profile = request.traits.clone();
            customer.profile.consents.clear();
            customer.profile.record_consents(&request.consents);
            customer.keys = wanted.clone();
            changes.added_keys = wanted.iter().map(|k| (k.clone(), customer.id)).collect();
            changes.events.push(event(
                &customer,
                "customer.created",
                pb::customer_event::Change::Created(pb::CustomerCreated {
                    anonymous: !customer.is_identified(),
                }),
                now,
            ));
            changes.inserts.push(customer.clone());
            return match self.store.commit(&changes).await {
                Ok(()) => {
                    self.cache_committed(&[&customer]).await;
                    tracing::info!(customer_id = %customer.id, "customer created by resolve");
                    Ok(Resolved {
                        customer,
                        created: true,
                        merged_ids: Vec::new(),
                    })
                }
                // Another resolve created the person first: read again.
                Err(StoreError::KeyTaken { .. }) => Err(IdentityError::Contended(customer.id)),
                Err(err) => Err(err.into()),
            };
        }

        let ids: Vec<Uuid> = owners.into_iter().collect();
        let mut found = self.store.get_many(&ids).await?;
        if found.len() != ids.len() || found.iter().any(|c| c.state != CustomerState::Active) {
            // A key moved between the two reads (a concurrent merge or erase).
            return Err(IdentityError::Contended(ids[0]));
        }
        // UUIDv7 ids sort by creation: the oldest comes first.
        found.sort_by_key(|c| c.id);
        let identified: Vec<&Customer> = found.iter().filter(|c| c.is_identified()).collect();
        if identified.len() > 1 && !request.allow_merge {
            return Err(IdentityError::IdentityConflict {
                customer_ids: identified.iter().map(|c| c.id).collect(),
            });
        }
        let survivor = identified.first().copied().unwrap_or(&found[0]).clone();
        let mut next = survivor.next_version(now);
        let mut merged_ids = Vec::new();
        let mut pointers = Vec::new();
        let mut records = Vec::new();
        for other in found.iter().filter(|c| c.id != survivor.id) {
            let reason = if other.is_identified() {
                "resolve with allow_merge: keys identified both customers"
            } else {
                "resolve: anonymous profile identified"
            };
            let (record, pointer) = absorb(
                &mut next,
                other,
                reason,
                "identity.resolve",
                now,
                &mut changes,
            );
            merged_ids.push(other.id);
            pointers.push(pointer);
            records.push(record);
        }
        let mut added_keys = Vec::new();
        for key in &wanted {
            if !next.has_key(key) {
                next.keys.push(key.clone());
                added_keys.push(key.clone());
            }
        }
        let mut traits = request.traits.clone();
        traits.consents.clear();
        next.profile.fill_from(&traits);
        next.profile.record_consents(&request.consents);
        if merged_ids.is_empty()
            && added_keys.is_empty()
            && next.profile == survivor.profile
            && unsuppress.is_empty()
        {
            return Ok(Resolved {
                customer: survivor,
                created: false,
                merged_ids,
            });
        }
        changes.added_keys = added_keys.into_iter().map(|k| (k, next.id)).collect();
        for record in &records {
            changes.events.push(merged_event(&next, record, now));
        }
        if next.keys != survivor.keys || next.profile != survivor.profile {
            changes.events.push(event(
                &next,
                "customer.updated",
                pb::customer_event::Change::Updated(pb::CustomerUpdated {
                    changed_fields: survivor.changed_fields(&next),
                }),
                now,
            ));
        }
        changes.updates.push((next.clone(), survivor.version));
        match self.store.commit(&changes).await {
            Ok(()) => {
                let mut committed: Vec<&Customer> = pointers.iter().collect();
                committed.push(&next);
                self.cache_committed(&committed).await;
                if !merged_ids.is_empty() {
                    tracing::info!(customer_id = %next.id, merged = merged_ids.len(), "customers merged by resolve");
                }
                Ok(Resolved {
                    customer: next,
                    created: false,
                    merged_ids,
                })
            }
            Err(StoreError::KeyTaken { .. } | StoreError::VersionConflict { .. }) => {
                Err(IdentityError::Contended(next.id))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Merges `merged_id` into `survivor_id` (MergeCustomers).
    pub async fn merge(
        &self,
        survivor_id: Uuid,
        merged_id: Uuid,
        reason: &str,
        requested_by: &str,
    ) -> Result<(Customer, MergeRecord), IdentityError> {
        if survivor_id == merged_id {
            return Err(IdentityError::SelfMerge);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let survivor = self.load_active(survivor_id).await?;
            let merged = self.load_active(merged_id).await?;
            let now = now();
            let mut changes = ChangeSet::default();
            let mut next = survivor.next_version(now);
            let (record, pointer) =
                absorb(&mut next, &merged, reason, requested_by, now, &mut changes);
            changes.events.push(merged_event(&next, &record, now));
            changes.updates.push((next.clone(), survivor.version));
            match self.store.commit(&changes).await {
                Ok(()) => {
                    self.cache_committed(&[&pointer, &next]).await;
                    tracing::info!(customer_id = %survivor_id, merged_id = %merged_id, merge_id = %record.merge_id, "customers merged");
                    return Ok((next, record));
                }
                Err(StoreError::VersionConflict { .. }) if attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(StoreError::VersionConflict { .. }) => {
                    return Err(IdentityError::Contended(survivor_id));
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// The merge ledger entries of a customer.
    pub async fn merges_of(&self, customer_id: Uuid) -> Result<Vec<MergeRecord>, IdentityError> {
        Ok(self.store.merges_of(customer_id).await?)
    }

    /// Erases a customer's personal data (EraseCustomer).
    pub async fn erase(&self, id: Uuid) -> Result<Erased, IdentityError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self.load(id).await?;
            match current.state {
                CustomerState::Erased => {
                    // A retry after a purge that failed finishes it.
                    self.store.purge_erased().await?;
                    let erased_at = current.erased_at.unwrap_or(current.updated_at);
                    return Ok(Erased {
                        customer: current,
                        erased_at,
                        suppressed_keys: 0,
                    });
                }
                CustomerState::Merged { into } => {
                    return Err(IdentityError::NotActive {
                        customer_id: id,
                        state: "merged",
                        merged_into: Some(into),
                    });
                }
                CustomerState::Active => {}
            }
            let now = now();
            let mut next = current.next_version(now);
            next.state = CustomerState::Erased;
            next.profile = Profile::default();
            next.keys.clear();
            next.lifecycle = None;
            next.erased_at = Some(now);
            let mut changes = ChangeSet {
                removed_keys: current.keys.iter().map(|k| (k.clone(), id)).collect(),
                suppress: current
                    .keys
                    .iter()
                    .map(|k| (self.hasher.hash(k), id))
                    .collect(),
                ..ChangeSet::default()
            };
            changes.events.push(event(
                &next,
                "customer.erased",
                pb::customer_event::Change::Erased(pb::CustomerErased {}),
                now,
            ));
            changes.updates.push((next.clone(), current.version));
            match self.store.commit(&changes).await {
                Ok(()) => {
                    self.cache_committed(&[&next]).await;
                    self.store.purge_erased().await?;
                    tracing::info!(customer_id = %id, suppressed_keys = current.keys.len(), "customer erased");
                    return Ok(Erased {
                        customer: next,
                        erased_at: now,
                        suppressed_keys: current.keys.len(),
                    });
                }
                Err(StoreError::VersionConflict { .. }) if attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(StoreError::VersionConflict { .. }) => {
                    return Err(IdentityError::Contended(id));
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Stores a lifecycle snapshot unless an older one (SetLifecycle).
    /// Returns whether it was applied and the customer's version.
    pub async fn set_lifecycle(
        &self,
        id: Uuid,
        lifecycle: Lifecycle,
    ) -> Result<(bool, i64), IdentityError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self.load(id).await?;
            let mut changes = ChangeSet::default();
            let next = match plan_lifecycle(&current, &lifecycle, now(), &mut changes) {
                Planned::Keep(outcome) => return Ok(outcome),
                Planned::Write(next) => next,
            };
            match self.store.commit(&changes).await {
                Ok(()) => {
                    self.cache_committed(&[&next]).await;
                    return Ok((true, next.version));
                }
                Err(StoreError::VersionConflict { .. }) if attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(StoreError::VersionConflict { .. }) => {
                    return Err(IdentityError::Contended(id));
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Stores several snapshots in one transaction, each as
    /// [`set_lifecycle`](Self::set_lifecycle) would (for a customer named
    /// twice, the newest). Returns (applied, version) per item, in order;
    /// (false, 0) for an unknown customer.
    pub async fn set_lifecycles(
        &self,
        items: &[(Uuid, Lifecycle)],
    ) -> Result<Vec<(bool, i64)>, IdentityError> {
        let mut newest: HashMap<Uuid, &Lifecycle> = HashMap::new();
        for (id, lifecycle) in items {
            let kept = newest.entry(*id).or_insert(lifecycle);
            if lifecycle.evaluated_at > kept.evaluated_at {
                *kept = lifecycle;
            }
        }
        // In id order, so two calls sharing customers lock their rows in
        // the same order and wait for each other rather than deadlock.
        let mut ids: Vec<Uuid> = newest.keys().copied().collect();
        ids.sort_unstable();
        let mut attempt = 0;
        let outcomes = loop {
            attempt += 1;
            let current: HashMap<Uuid, Customer> = self
                .store
                .get_many(&ids)
                .await?
                .into_iter()
                .map(|customer| (customer.id, customer))
                .collect();
            let now = now();
            let mut changes = ChangeSet::default();
            let mut outcomes: HashMap<Uuid, (bool, i64)> = HashMap::new();
            let mut written = Vec::new();
            for id in &ids {
                let Some(customer) = current.get(id) else {
                    outcomes.insert(*id, (false, 0));
                    continue;
                };
                match plan_lifecycle(customer, newest[id], now, &mut changes) {
                    Planned::Keep(outcome) => {
                        outcomes.insert(*id, outcome);
                    }
                    Planned::Write(next) => {
                        outcomes.insert(*id, (true, next.version));
                        written.push(*next);
                    }
                }
            }
            if written.is_empty() {
                break outcomes;
            }
            match self.store.commit(&changes).await {
                Ok(()) => {
                    self.cache_committed(&written.iter().collect::<Vec<_>>())
                        .await;
                    break outcomes;
                }
                Err(StoreError::VersionConflict { .. }) if attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(StoreError::VersionConflict { customer_id }) => {
                    return Err(IdentityError::Contended(customer_id));
                }
                Err(err) => return Err(err.into()),
            }
        };
        Ok(items.iter().map(|(id, _)| outcomes[id]).collect())
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
