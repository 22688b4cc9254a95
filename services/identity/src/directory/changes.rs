//! The pieces the operations compute their changes from.

use super::*;

/// What storing a lifecycle snapshot on a customer comes to.
pub(super) enum Planned {
    /// Nothing to write: (applied, version).
    Keep((bool, i64)),
    /// The customer's next version, added to the change set.
    Write(Box<Customer>),
}

/// Plans storing `lifecycle` on `current`: an older snapshot than the
/// stored one, or a merged or erased customer, is ignored; a change of
/// stage, status or health is logged.
pub(super) fn plan_lifecycle(
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

pub(super) fn backoff(attempt: u32) -> Duration {
    let base = 2_u64.pow(attempt.min(6));
    Duration::from_millis(rand::rng().random_range(base..base * 3))
}

pub(super) fn dedupe(keys: Vec<RequestKey>) -> Vec<RequestKey> {
    let mut seen = BTreeSet::new();
    keys.into_iter()
        .filter(|k| seen.insert(k.key.clone()))
        .collect()
}

pub(super) fn grants_consent(consents: &[Consent]) -> bool {
    consents.iter().any(|c| c.status == ConsentStatus::Granted)
}

pub(super) fn field_of(keys: &[RequestKey], key: &IdentityKey) -> String {
    keys.iter()
        .find(|k| &k.key == key)
        .map_or_else(|| "keys".to_owned(), |k| k.field.clone())
}

pub(super) fn event(
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

pub(super) fn merged_event(
    subject: &Customer,
    record: &MergeRecord,
    now: DateTime<Utc>,
) -> LogEvent {
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
pub(super) fn absorb(
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
