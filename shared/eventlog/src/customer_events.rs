//! The one reading of identity's customer event log for every service that
//! follows it: what an event asks of derived state, with the log's rules
//! applied once — a merge is acted on from the survivor's copy (identity
//! logs it for both customers, on each one's shard), an anonymous customer's
//! creation carries no profile to read.

use chrono::{DateTime, Utc};
use clm_proto::identity::CustomerEvent;
use clm_proto::identity::customer_event::Change;
use uuid::Uuid;

/// What one customer event asks of a service that keeps state per customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerLogChange {
    /// The customer's profile was created or changed: read it from identity
    /// (the log carries no personal data).
    Profile {
        /// The customer.
        customer_id: Uuid,
    },
    /// `merged_id` was merged into `survivor_id`.
    Merged {
        /// The merge.
        merge_id: Uuid,
        /// The customer merged away.
        merged_id: Uuid,
        /// The customer that remains.
        survivor_id: Uuid,
        /// When identity merged them.
        at: DateTime<Utc>,
    },
    /// The customer was erased.
    Erased {
        /// The customer.
        customer_id: Uuid,
        /// When identity erased them.
        at: DateTime<Utc>,
    },
}

/// What `event` asks of derived state; `None` for events that ask nothing
/// (consents, key changes, the merged customer's copy of a merge) and for
/// events whose ids do not parse.
pub fn change_of(event: &CustomerEvent) -> Option<CustomerLogChange> {
    let customer_id = Uuid::try_parse(&event.customer_id).ok()?;
    let at = event
        .occur_time
        .as_ref()
        .and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .unwrap_or_else(Utc::now);
    match event.change.as_ref()? {
        Change::Created(created) if created.anonymous => None,
        Change::Created(_) | Change::Updated(_) => Some(CustomerLogChange::Profile { customer_id }),
        Change::Merged(merged) if merged.survivor_id == event.customer_id => {
            Some(CustomerLogChange::Merged {
                merge_id: Uuid::try_parse(&merged.merge_id).ok()?,
                merged_id: Uuid::try_parse(&merged.merged_id).ok()?,
                survivor_id: customer_id,
                at,
            })
        }
        Change::Erased(_) => Some(CustomerLogChange::Erased { customer_id, at }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use clm_proto::identity::{CustomerCreated, CustomerErased, CustomerMerged, CustomerUpdated};

    use super::*;

    fn event(customer: Uuid, change: Change) -> CustomerEvent {
        CustomerEvent {
            customer_id: customer.to_string(),
            occur_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            change: Some(change),
            ..Default::default()
        }
    }

    #[test]
    fn a_merge_is_read_from_the_survivors_copy_only() {
        let (merge, merged, survivor) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let change = Change::Merged(CustomerMerged {
            merge_id: merge.to_string(),
            merged_id: merged.to_string(),
            survivor_id: survivor.to_string(),
        });
        assert_eq!(change_of(&event(merged, change.clone())), None);
        assert_eq!(
            change_of(&event(survivor, change)),
            Some(CustomerLogChange::Merged {
                merge_id: merge,
                merged_id: merged,
                survivor_id: survivor,
                at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            })
        );
    }

    #[test]
    fn profiles_erasures_and_what_asks_nothing() {
        let ada = Uuid::now_v7();
        let created = |anonymous| Change::Created(CustomerCreated { anonymous });
        let profile = Some(CustomerLogChange::Profile { customer_id: ada });
        assert_eq!(change_of(&event(ada, created(false))), profile);
        assert_eq!(change_of(&event(ada, created(true))), None);
        assert_eq!(
            change_of(&event(ada, Change::Updated(CustomerUpdated::default()))),
            profile
        );
        assert!(matches!(
            change_of(&event(ada, Change::Erased(CustomerErased::default()))),
            Some(CustomerLogChange::Erased { customer_id, .. }) if customer_id == ada
        ));
        let mut bad = event(ada, created(false));
        bad.customer_id = "nope".into();
        assert_eq!(change_of(&bad), None);
    }
}
