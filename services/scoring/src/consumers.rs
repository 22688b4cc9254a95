//! The logs the scoring service follows: the touchpoint log (features and
//! evaluations, one consumer per shard) and the identity customer event log
//! (profiles, merges, erasures). Each saves its cursor in the transaction
//! that writes what it derived, and the save is checked against the cursor
//! it read, so a crash, a retry or a second replica never counts an entry
//! twice.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use clm_eventlog::ShardFilter;
use clm_eventlog::consumer::cursors::CursorMove;
use clm_eventlog::consumer::{ConsumeError, Projection};
use clm_eventlog::customer_events::{self, CustomerLogChange};
use clm_platform::service::PeerChannel;
use clm_proto::identity as identity_pb;
use clm_proto::identity::customer_service_client::CustomerServiceClient;
use clm_proto::touchpoint as touchpoint_pb;
use futures_util::StreamExt as _;
use uuid::Uuid;

use crate::scorer::{ProfileChange, Scorer, profile_of};

/// The name the touchpoint log consumer saves its cursors under.
pub const TOUCHPOINTS_CONSUMER: &str = "touchpoints.log";
/// Touchpoints folded in per transaction: short transactions keep the log
/// tails of a shared PostgreSQL cluster moving (see [`Projection::max_batch`]).
const TOUCHPOINTS_PER_TRANSACTION: usize = 1000;

/// The name the customer event log consumer saves its cursor under.
pub const CUSTOMERS_CONSUMER: &str = "identity.customer_events";

/// Folds touchpoints into features and evaluates.
pub struct TouchpointProjection {
    scorer: Arc<Scorer>,
}

impl TouchpointProjection {
    /// A projection through `scorer`.
    pub fn new(scorer: Arc<Scorer>) -> Self {
        Self { scorer }
    }
}

#[async_trait]
impl Projection for TouchpointProjection {
    type Entry = touchpoint_pb::TouchpointLogEntry;

    fn cursor_name(&self) -> &'static str {
        TOUCHPOINTS_CONSUMER
    }

    async fn saved_cursor(&self, shard: ShardFilter) -> Result<String, ConsumeError> {
        self.scorer
            .store()
            .saved_cursor(TOUCHPOINTS_CONSUMER, shard)
            .await
            .map_err(ConsumeError::new)
    }

    fn max_batch(&self) -> usize {
        TOUCHPOINTS_PER_TRANSACTION
    }

    async fn apply(
        &self,
        batch: Vec<Self::Entry>,
        cursor: &CursorMove,
    ) -> Result<(), ConsumeError> {
        let change = cursor.clone();
        self.scorer
            .apply_touchpoints(&batch, change)
            .await
            .map_err(ConsumeError::new)?;
        Ok(())
    }
}

/// The name the feedback log consumer saves its cursors under.
pub const FEEDBACK_CONSUMER: &str = "feedback.log";

/// Folds survey answers (NPS, CSAT, CES) into features and evaluates.
pub struct FeedbackProjection {
    scorer: Arc<Scorer>,
}

impl FeedbackProjection {
    /// A projection through `scorer`.
    pub fn new(scorer: Arc<Scorer>) -> Self {
        Self { scorer }
    }
}

#[async_trait]
impl Projection for FeedbackProjection {
    type Entry = clm_proto::feedback::FeedbackLogEntry;

    fn cursor_name(&self) -> &'static str {
        FEEDBACK_CONSUMER
    }

    async fn saved_cursor(&self, shard: ShardFilter) -> Result<String, ConsumeError> {
        self.scorer
            .store()
            .saved_cursor(FEEDBACK_CONSUMER, shard)
            .await
            .map_err(ConsumeError::new)
    }

    fn max_batch(&self) -> usize {
        TOUCHPOINTS_PER_TRANSACTION
    }

    async fn apply(
        &self,
        batch: Vec<Self::Entry>,
        cursor: &CursorMove,
    ) -> Result<(), ConsumeError> {
        self.scorer
            .apply_answers(&batch, cursor.clone())
            .await
            .map_err(ConsumeError::new)
    }
}

/// Applies profile changes, merges and erasures. Profiles are read from
/// identity (the log carries no personal data).
pub struct CustomerEventProjection {
    scorer: Arc<Scorer>,
    identity: CustomerServiceClient<PeerChannel>,
    timeout: Duration,
}

impl CustomerEventProjection {
    /// A projection through `scorer`, reading profiles over `identity`.
    pub fn new(scorer: Arc<Scorer>, identity: PeerChannel, timeout: Duration) -> Self {
        Self {
            scorer,
            identity: CustomerServiceClient::new(identity),
            timeout,
        }
    }

    /// The current profile of each customer (absent: merged, erased or
    /// unknown; their own events say what happened).
    async fn profiles(
        &self,
        ids: HashSet<Uuid>,
    ) -> Result<HashMap<Uuid, identity_pb::Customer>, ConsumeError> {
        let fetches = ids.into_iter().map(|id| {
            let mut client = self.identity.clone();
            let timeout = self.timeout;
            async move {
                let mut request = tonic::Request::new(identity_pb::GetCustomerRequest {
                    customer_id: id.to_string(),
                });
                request.set_timeout(timeout);
                match client.get_customer(request).await {
                    Ok(response) => Ok(response.into_inner().customer.map(|c| (id, c))),
                    Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
                    Err(status) => Err(ConsumeError::new(format!(
                        "cannot read a customer profile from identity: {}",
                        status.message()
                    ))),
                }
            }
        });
        let mut profiles = HashMap::new();
        let mut results = futures_util::stream::iter(fetches).buffer_unordered(16);
        while let Some(result) = results.next().await {
            if let Some((id, customer)) = result?
                && customer.state == identity_pb::CustomerState::Active as i32
            {
                profiles.insert(id, customer);
            }
        }
        Ok(profiles)
    }
}

/// What a customer event asks of scoring, before profiles are read.
enum Wanted {
    /// The customer's current profile.
    Profile(Uuid),
    /// An erasure.
    Erased(Uuid),
    /// A merge into `survivor`, whose current profile comes with it.
    Merged { merged: Uuid, survivor: Uuid },
}

impl Wanted {
    /// The customer whose profile to read from identity.
    fn profile_to_read(&self) -> Option<Uuid> {
        match self {
            Wanted::Erased(_) => None,
            Wanted::Profile(id) | Wanted::Merged { survivor: id, .. } => Some(*id),
        }
    }

    fn into_change(self, profiles: &HashMap<Uuid, identity_pb::Customer>) -> Option<ProfileChange> {
        let profile = |id: &Uuid| profiles.get(id).map(profile_of);
        Some(match self {
            // Absent: merged, erased or unknown; their own events say what
            // happened.
            Wanted::Profile(id) => ProfileChange::Profile(id, profile(&id)?),
            Wanted::Erased(id) => ProfileChange::Erased(id),
            Wanted::Merged { merged, survivor } => ProfileChange::Merged {
                merged,
                survivor,
                profile: profile(&survivor),
            },
        })
    }
}

fn wanted(event: &identity_pb::CustomerEvent) -> Option<Wanted> {
    // Identity gave the survivor of a merge what it lacked of the merged
    // profile, so the survivor's profile is read with it.
    Some(match customer_events::change_of(event)? {
        CustomerLogChange::Profile { customer_id } => Wanted::Profile(customer_id),
        CustomerLogChange::Merged {
            merged_id,
            survivor_id,
            ..
        } => Wanted::Merged {
            merged: merged_id,
            survivor: survivor_id,
        },
        CustomerLogChange::Erased { customer_id, .. } => Wanted::Erased(customer_id),
    })
}

#[async_trait]
impl Projection for CustomerEventProjection {
    type Entry = identity_pb::CustomerEvent;

    fn cursor_name(&self) -> &'static str {
        CUSTOMERS_CONSUMER
    }

    async fn saved_cursor(&self, shard: ShardFilter) -> Result<String, ConsumeError> {
        self.scorer
            .store()
            .saved_cursor(CUSTOMERS_CONSUMER, shard)
            .await
            .map_err(ConsumeError::new)
    }

    async fn apply(
        &self,
        batch: Vec<Self::Entry>,
        cursor: &CursorMove,
    ) -> Result<(), ConsumeError> {
        let wanted: Vec<Wanted> = batch.iter().filter_map(wanted).collect();
        let to_read: HashSet<Uuid> = wanted.iter().filter_map(Wanted::profile_to_read).collect();
        let profiles = self.profiles(to_read).await?;
        let changes: Vec<ProfileChange> = wanted
            .into_iter()
            .filter_map(|w| w.into_change(&profiles))
            .collect();
        let change = cursor.clone();
        self.scorer
            .apply_customer_changes(&changes, change)
            .await
            .map_err(ConsumeError::new)?;
        Ok(())
    }
}
