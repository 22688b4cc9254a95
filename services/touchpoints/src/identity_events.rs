//! Follows the identity service's customer event log: when a customer is
//! merged away its touchpoints move to the survivor, when a customer is
//! erased its touchpoints lose their properties. The cursor is saved in the
//! same transaction as those changes.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use clm_eventlog::ShardFilter;
use clm_eventlog::consumer::{ConsumeError, Projection};
use clm_proto::identity as identity_pb;
use uuid::Uuid;

use crate::model::{CustomerChange, Merge};
use crate::resolver::IdentityResolver;
use crate::store::TouchpointStore;

/// The name this consumer saves its cursor under.
pub const CONSUMER_NAME: &str = "identity.customer_events";

/// Applies merges and erasures to the touchpoint store.
pub struct TouchpointCustomerProjection {
    store: Arc<dyn TouchpointStore>,
    resolver: IdentityResolver,
}

impl TouchpointCustomerProjection {
    /// A projection into `store` that also clears `resolver`'s cache.
    pub fn new(store: Arc<dyn TouchpointStore>, resolver: IdentityResolver) -> Self {
        Self { store, resolver }
    }
}

/// The change an identity event asks of the touchpoint store, if any.
pub fn change_of(event: &identity_pb::CustomerEvent) -> Option<CustomerChange> {
    let at = event
        .occur_time
        .as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .unwrap_or_else(Utc::now);
    match event.change.as_ref()? {
        // A merge is logged once for each customer; act on the survivor's copy.
        identity_pb::customer_event::Change::Merged(merged)
            if merged.survivor_id == event.customer_id =>
        {
            Some(CustomerChange::Merged(Merge {
                merge_id: Uuid::try_parse(&merged.merge_id).ok()?,
                merged_id: Uuid::try_parse(&merged.merged_id).ok()?,
                survivor_id: Uuid::try_parse(&merged.survivor_id).ok()?,
                merged_at: at,
            }))
        }
        identity_pb::customer_event::Change::Erased(_) => Some(CustomerChange::Erased {
            customer_id: Uuid::try_parse(&event.customer_id).ok()?,
            erased_at: at,
        }),
        _ => None,
    }
}

#[async_trait]
impl Projection for TouchpointCustomerProjection {
    type Entry = identity_pb::CustomerEvent;

    async fn saved_cursor(&self, shard: ShardFilter) -> Result<String, ConsumeError> {
        self.store
            .saved_cursor(CONSUMER_NAME, shard)
            .await
            .map_err(ConsumeError::new)
    }

    async fn apply(
        &self,
        batch: Vec<Self::Entry>,
        cursor: &str,
        shard: ShardFilter,
    ) -> Result<(), ConsumeError> {
        let changes: Vec<CustomerChange> = batch.iter().filter_map(change_of).collect();
        self.store
            .apply_customer_changes(&changes, CONSUMER_NAME, shard, cursor)
            .await
            .map_err(ConsumeError::new)?;
        for change in &changes {
            match change {
                CustomerChange::Merged(merge) => self.resolver.forget(merge.merged_id),
                CustomerChange::Erased { customer_id, .. } => self.resolver.forget(*customer_id),
            }
        }
        if !changes.is_empty() {
            tracing::info!(
                changes = changes.len(),
                "applied customer merges and erasures to touchpoints"
            );
        }
        Ok(())
    }
}
