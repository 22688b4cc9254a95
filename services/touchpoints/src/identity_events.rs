//! Follows the identity service's customer event log: when a customer is
//! merged away its touchpoints move to the survivor, when a customer is
//! erased its touchpoints lose their properties. The cursor is saved in the
//! same transaction as those changes.

use std::sync::Arc;

use async_trait::async_trait;
use clm_eventlog::ShardFilter;
use clm_eventlog::consumer::cursors::CursorMove;
use clm_eventlog::consumer::{ConsumeError, Projection};
use clm_eventlog::customer_events::{self, CustomerLogChange};
use clm_proto::identity as identity_pb;

use crate::model::{CustomerChange, Merge};
use crate::store::TouchpointStore;
use clm_platform::identity::IdentityResolver;

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

/// The change an identity event asks of the touchpoint store, if any:
/// merges and erasures (touchpoints keep no profile).
pub fn change_of(event: &identity_pb::CustomerEvent) -> Option<CustomerChange> {
    match customer_events::change_of(event)? {
        CustomerLogChange::Merged {
            merge_id,
            merged_id,
            survivor_id,
            at,
        } => Some(CustomerChange::Merged(Merge {
            merge_id,
            merged_id,
            survivor_id,
            merged_at: at,
        })),
        CustomerLogChange::Erased { customer_id, at } => Some(CustomerChange::Erased {
            customer_id,
            erased_at: at,
        }),
        CustomerLogChange::Profile { .. } => None,
    }
}

#[async_trait]
impl Projection for TouchpointCustomerProjection {
    type Entry = identity_pb::CustomerEvent;

    fn cursor_name(&self) -> &'static str {
        CONSUMER_NAME
    }

    async fn saved_cursor(&self, shard: ShardFilter) -> Result<String, ConsumeError> {
        self.store
            .saved_cursor(CONSUMER_NAME, shard)
            .await
            .map_err(ConsumeError::new)
    }

    async fn apply(
        &self,
        batch: Vec<Self::Entry>,
        cursor: &CursorMove,
    ) -> Result<(), ConsumeError> {
        let changes: Vec<CustomerChange> = batch.iter().filter_map(change_of).collect();
        self.store
            .apply_customer_changes(&changes, cursor)
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
