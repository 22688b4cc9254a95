//! Hot profiles: customers as GetCustomer serves them, kept in the cache
//! (Redis or in-process) in their `clm.identity.v1.Customer` encoding, so a
//! hit is answered without a conversion. This is a read model beside the
//! directory: the directory writes every committed record through it and
//! reads the state of merge chains from it; the protobuf form never reaches
//! the directory's rules.

use std::sync::Arc;

use clm_platform::cache::{Versioned, VersionedCache};
use clm_proto::identity as pb;
use prost::Message as _;
use uuid::Uuid;

use crate::convert::customer_to_proto;
use crate::error::IdentityError;
use crate::model::{Customer, CustomerState};
use crate::store::{CustomerStore, StoreError};

/// The cache's namespace; its suffix names the encoding of the entries.
pub const CACHE_NAMESPACE: &str = "clm:identity:customer:v1";

/// How many merge pointers are followed to find the final survivor.
const MAX_MERGE_HOPS: usize = 16;

/// Served customers, read through the cache.
pub struct HotProfiles {
    cache: Arc<VersionedCache>,
    store: Arc<dyn CustomerStore>,
}

impl HotProfiles {
    /// Profiles of `store`'s customers, cached in `cache`.
    pub fn new(cache: Arc<VersionedCache>, store: Arc<dyn CustomerStore>) -> Self {
        Self { cache, store }
    }

    /// The cache (for its counters).
    pub fn cache(&self) -> &VersionedCache {
        &self.cache
    }

    /// Writes committed records through to the cache.
    pub async fn write_through(&self, customers: &[&Customer]) {
        for customer in customers {
            self.cache
                .store(&customer.id.to_string(), &entry(customer))
                .await;
        }
    }

    /// A customer as GetCustomer serves it. A merged customer points at its
    /// final survivor: the end of its chain of merges or, when a pointer
    /// leads nowhere or the chain is too long, the last pointer read.
    pub async fn served(&self, id: Uuid) -> Result<pb::Customer, IdentityError> {
        let mut customer = self.cached(id).await?.ok_or(IdentityError::NotFound(id))?;
        if customer.merged_into_id.is_empty() {
            return Ok(customer);
        }
        let (survivor_id, survivor) = self.follow(id, customer.clone()).await?;
        customer.merged_into_id = if survivor.merged_into_id.is_empty() {
            survivor_id.to_string()
        } else {
            survivor.merged_into_id
        };
        Ok(customer)
    }

    /// The last customer the merges from `id` lead to, and its state: `id`
    /// itself when it was never merged; a merged state when the chain broke
    /// off (a pointer that leads nowhere, or too many hops).
    pub async fn final_survivor(&self, id: Uuid) -> Result<(Uuid, CustomerState), IdentityError> {
        let customer = self.cached(id).await?.ok_or(IdentityError::NotFound(id))?;
        let (survivor_id, survivor) = self.follow(id, customer).await?;
        Ok((survivor_id, state_of(survivor_id, &survivor)?))
    }

    /// Follows the merge pointers from `customer` (whose id is `id`) through
    /// the cache, at most [`MAX_MERGE_HOPS`] of them, and returns the last
    /// customer reached with its id. The chain stops early at a pointer that
    /// leads nowhere; the customer returned then still carries that pointer.
    async fn follow(
        &self,
        id: Uuid,
        customer: pb::Customer,
    ) -> Result<(Uuid, pb::Customer), IdentityError> {
        let mut current = (id, customer);
        for _ in 0..MAX_MERGE_HOPS {
            let Ok(next_id) = Uuid::try_parse(&current.1.merged_into_id) else {
                break;
            };
            match self.cached(next_id).await? {
                Some(next) => current = (next_id, next),
                None => break,
            }
        }
        Ok(current)
    }

    async fn cached(&self, id: Uuid) -> Result<Option<pb::Customer>, IdentityError> {
        let store = &self.store;
        let cached = self
            .cache
            .get_or_load(&id.to_string(), || async move {
                let customer = store.get(id).await?;
                Ok::<_, StoreError>(customer.as_ref().map(entry))
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
}

/// The cache entry of a record.
fn entry(customer: &Customer) -> Versioned {
    Versioned {
        version: customer.version,
        bytes: customer_to_proto(customer).encode_to_vec(),
    }
}

/// The state of a served customer.
fn state_of(id: Uuid, customer: &pb::Customer) -> Result<CustomerState, IdentityError> {
    match customer.state() {
        pb::CustomerState::Active => Ok(CustomerState::Active),
        pb::CustomerState::Erased => Ok(CustomerState::Erased),
        pb::CustomerState::Merged => Uuid::try_parse(&customer.merged_into_id)
            .map(|into| CustomerState::Merged { into })
            .map_err(|_| {
                IdentityError::Internal(format!("customer {id} is merged into an unreadable id"))
            }),
        pb::CustomerState::Unspecified => Err(IdentityError::Internal(format!(
            "customer {id} has no state"
        ))),
    }
}
