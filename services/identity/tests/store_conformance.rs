//! One conformance suite for the identity store, run against SQLite and
//! PostgreSQL alike: what one engine does, the other must do too.

#![allow(missing_docs)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{Duration as TimeDelta, SubsecRound as _, Utc};
use clm_eventlog::{Cursor, ShardFilter};
use clm_identity::keys::{IdentityKey, KeyKind};
use clm_identity::model::{
    Consent, ConsentStatus, Customer, CustomerState, Lifecycle, MergeRecord,
};
use clm_identity::store::{ChangeSet, ListQuery, LogEvent, StoreError};
use clm_platform::server::Shutdown;
use futures_util::StreamExt as _;
use support::Backend;
use uuid::Uuid;

fn email(value: &str) -> IdentityKey {
    IdentityKey {
        kind: KeyKind::Email,
        value: value.to_owned(),
    }
}

fn now() -> chrono::DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn customer_with(keys: &[IdentityKey]) -> Customer {
    let mut customer = Customer::new(now());
    customer.keys = keys.to_vec();
    customer
}

fn log_event(customer: &Customer, kind: &'static str) -> LogEvent {
    LogEvent {
        event_id: Uuid::now_v7(),
        customer_id: customer.id,
        kind,
        payload: kind.as_bytes().to_vec(),
        recorded_at: now(),
    }
}

/// Entries become readable once every older transaction in the database
/// cluster has ended (PostgreSQL) — at once on SQLite. Waits for `count`.
async fn entries_when(log: &clm_eventlog::EventLog, count: usize) -> Vec<clm_eventlog::Entry> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entries = log
            .read_after(Cursor::START, ShardFilter::ALL, 1000)
            .await
            .unwrap();
        if entries.len() >= count || tokio::time::Instant::now() > deadline {
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn insert(customer: &Customer) -> ChangeSet {
    ChangeSet {
        inserts: vec![customer.clone()],
        added_keys: customer
            .keys
            .iter()
            .map(|k| (k.clone(), customer.id))
            .collect(),
        events: vec![log_event(customer, "customer.created")],
        ..ChangeSet::default()
    }
}

async fn a_customer_round_trips(backend: Backend) {
    let mut customer =
        customer_with(&[email("ada@example.com"), IdentityKey::external("crm", "42")]);
    customer.profile.given_name = "Ada".into();
    customer.profile.company = "Analytical Engines".into();
    customer.profile.attributes = BTreeMap::from([("tier".to_owned(), "gold".to_owned())]);
    customer.profile.consents = vec![Consent {
        purpose: "email_marketing".into(),
        status: ConsentStatus::Granted,
        source: "signup".into(),
        recorded_at: now(),
    }];
    customer.lifecycle = Some(Lifecycle {
        stage: 3,
        acquisition_status: 0,
        health: 1,
        engagement_score: 12.5,
        lead_score: 40.0,
        health_score: 90.0,
        model_version: "default-1".into(),
        stage_entered_at: Some(now()),
        health_entered_at: None,
        evaluated_at: now(),
    });
    backend.store.commit(&insert(&customer)).await.unwrap();
    let stored = backend
        .store
        .get(customer.id)
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(stored, customer);
    assert_eq!(backend.store.get(Uuid::now_v7()).await.unwrap(), None);
    let many = backend
        .store
        .get_many(&[customer.id, Uuid::now_v7()])
        .await
        .unwrap();
    assert_eq!(many, vec![customer.clone()]);
    let owners = backend
        .store
        .owners_of(&[email("ada@example.com"), email("nobody@example.com")])
        .await
        .unwrap();
    assert_eq!(owners, vec![(email("ada@example.com"), customer.id)]);
}

async fn a_stale_version_changes_nothing(backend: Backend) {
    let customer = customer_with(&[email("a@example.com")]);
    backend.store.commit(&insert(&customer)).await.unwrap();
    let mut next = customer.next_version(now());
    next.profile.given_name = "New".into();
    next.keys.push(email("b@example.com"));
    let stale = ChangeSet {
        updates: vec![(next.clone(), customer.version + 5)],
        added_keys: vec![(email("b@example.com"), customer.id)],
        events: vec![log_event(&next, "customer.updated")],
        ..ChangeSet::default()
    };
    let err = backend.store.commit(&stale).await.unwrap_err();
    assert!(
        matches!(err, StoreError::VersionConflict { customer_id } if customer_id == customer.id)
    );
    // Nothing of the failed change set is visible: not the key, not the event.
    assert_eq!(
        backend.store.get(customer.id).await.unwrap().unwrap(),
        customer
    );
    assert!(
        backend
            .store
            .owners_of(&[email("b@example.com")])
            .await
            .unwrap()
            .is_empty()
    );
    let events = entries_when(backend.store.event_log(), 1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, "customer.created");

    let fresh = ChangeSet {
        updates: vec![(next.clone(), customer.version)],
        added_keys: vec![(email("b@example.com"), customer.id)],
        ..ChangeSet::default()
    };
    backend.store.commit(&fresh).await.unwrap();
    assert_eq!(backend.store.get(customer.id).await.unwrap().unwrap(), next);
}

async fn a_key_belongs_to_one_customer(backend: Backend) {
    let first = customer_with(&[email("shared@example.com")]);
    backend.store.commit(&insert(&first)).await.unwrap();
    let second = customer_with(&[email("shared@example.com")]);
    let err = backend.store.commit(&insert(&second)).await.unwrap_err();
    assert!(matches!(err, StoreError::KeyTaken { ref key } if *key == email("shared@example.com")));
    assert_eq!(
        backend.store.get(second.id).await.unwrap(),
        None,
        "the failed insert left nothing"
    );
}

async fn concurrent_inserts_of_one_key_create_one_owner(backend: Backend) {
    let store = backend.store.clone();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let customer = customer_with(&[email("race@example.com")]);
            store.commit(&insert(&customer)).await.map(|()| customer.id)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(id) => winners.push(id),
            Err(StoreError::KeyTaken { .. }) => {}
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1);
    let owners = store.owners_of(&[email("race@example.com")]).await.unwrap();
    assert_eq!(owners, vec![(email("race@example.com"), winners[0])]);
}

async fn keys_move_on_reassignment_and_go_on_removal(backend: Backend) {
    let survivor = customer_with(&[email("s@example.com")]);
    let merged = customer_with(&[email("m@example.com"), email("m2@example.com")]);
    backend.store.commit(&insert(&survivor)).await.unwrap();
    backend.store.commit(&insert(&merged)).await.unwrap();
    let mut pointer = merged.next_version(now());
    pointer.state = CustomerState::Merged { into: survivor.id };
    pointer.keys.clear();
    let record = MergeRecord {
        merge_id: Uuid::now_v7(),
        survivor_id: survivor.id,
        merged_id: merged.id,
        reason: "duplicate".into(),
        requested_by: "test".into(),
        merged_at: now(),
    };
    backend
        .store
        .commit(&ChangeSet {
            updates: vec![(pointer.clone(), merged.version)],
            reassigned_keys: vec![(merged.id, survivor.id)],
            merges: vec![record.clone()],
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    let owners = backend
        .store
        .owners_of(&[email("m@example.com"), email("m2@example.com")])
        .await
        .unwrap();
    assert!(owners.iter().all(|(_, owner)| *owner == survivor.id));
    assert_eq!(
        backend.store.get(merged.id).await.unwrap().unwrap().state,
        CustomerState::Merged { into: survivor.id }
    );
    assert_eq!(
        backend.store.merges_of(merged.id).await.unwrap(),
        vec![record.clone()]
    );
    assert_eq!(
        backend.store.merges_of(survivor.id).await.unwrap(),
        vec![record]
    );

    // A removal only deletes a key its named owner still has.
    backend
        .store
        .commit(&ChangeSet {
            removed_keys: vec![
                (email("m@example.com"), merged.id),
                (email("m2@example.com"), survivor.id),
            ],
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    let owners = backend
        .store
        .owners_of(&[email("m@example.com"), email("m2@example.com")])
        .await
        .unwrap();
    assert_eq!(owners, vec![(email("m@example.com"), survivor.id)]);
}

async fn suppression_and_request_ids(backend: Backend) {
    let customer = customer_with(&[]);
    let mut changes = insert(&customer);
    changes.suppress = vec![(vec![1, 2, 3], customer.id), (vec![4, 5, 6], customer.id)];
    changes.request = Some(("req-1".into(), customer.id));
    backend.store.commit(&changes).await.unwrap();
    let mut found = backend
        .store
        .suppressed(&[vec![1, 2, 3], vec![9], vec![4, 5, 6]])
        .await
        .unwrap();
    found.sort();
    assert_eq!(found, vec![vec![1, 2, 3], vec![4, 5, 6]]);
    assert_eq!(
        backend.store.customer_for_request("req-1").await.unwrap(),
        Some(customer.id)
    );
    assert_eq!(
        backend.store.customer_for_request("req-2").await.unwrap(),
        None
    );

    let other = customer_with(&[]);
    let mut again = insert(&other);
    again.request = Some(("req-1".into(), other.id));
    assert!(matches!(
        backend.store.commit(&again).await.unwrap_err(),
        StoreError::RequestIdTaken
    ));

    backend
        .store
        .commit(&ChangeSet {
            unsuppress: vec![vec![1, 2, 3]],
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    assert_eq!(
        backend
            .store
            .suppressed(&[vec![1, 2, 3], vec![4, 5, 6]])
            .await
            .unwrap(),
        vec![vec![4, 5, 6]]
    );
}

async fn lists_filter_and_page_by_id(backend: Backend) {
    let start = now();
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut customer = if i % 2 == 0 {
            customer_with(&[email(&format!("c{i}@example.com"))])
        } else {
            customer_with(&[IdentityKey {
                kind: KeyKind::Anonymous,
                value: format!("cookie-{i}"),
            }])
        };
        customer.profile.company = if i < 3 {
            "Acme".into()
        } else {
            "Globex".into()
        };
        customer.created_at = start + TimeDelta::seconds(i);
        if i == 6 {
            customer.lifecycle = Some(Lifecycle {
                stage: 4,
                acquisition_status: 0,
                health: 2,
                engagement_score: 0.0,
                lead_score: 0.0,
                health_score: 0.0,
                model_version: "m".into(),
                stage_entered_at: None,
                health_entered_at: None,
                evaluated_at: now(),
            });
        }
        backend.store.commit(&insert(&customer)).await.unwrap();
        ids.push(customer.id);
    }
    let query = |f: &dyn Fn(&mut ListQuery)| {
        let mut q = ListQuery {
            state: "active",
            limit: 100,
            ..ListQuery::default()
        };
        f(&mut q);
        q
    };
    let ids_of = |customers: Vec<Customer>| customers.into_iter().map(|c| c.id).collect::<Vec<_>>();

    let all = ids_of(backend.store.list(&query(&|_| {})).await.unwrap());
    assert_eq!(all, ids, "oldest first");
    let page1 = ids_of(backend.store.list(&query(&|q| q.limit = 3)).await.unwrap());
    let page2 = ids_of(
        backend
            .store
            .list(&query(&|q| {
                q.limit = 3;
                q.after_id = Some(page1[2]);
            }))
            .await
            .unwrap(),
    );
    assert_eq!([page1, page2].concat(), ids[..6].to_vec());
    let acme = ids_of(
        backend
            .store
            .list(&query(&|q| q.company = Some("acme".into())))
            .await
            .unwrap(),
    );
    assert_eq!(acme, ids[..3].to_vec());
    let identified = ids_of(
        backend
            .store
            .list(&query(&|q| q.identified_only = true))
            .await
            .unwrap(),
    );
    assert_eq!(identified, vec![ids[0], ids[2], ids[4], ids[6]]);
    let retained = ids_of(
        backend
            .store
            .list(&query(&|q| q.stage = Some(4)))
            .await
            .unwrap(),
    );
    assert_eq!(retained, vec![ids[6]]);
    let at_risk = ids_of(
        backend
            .store
            .list(&query(&|q| q.health = Some(2)))
            .await
            .unwrap(),
    );
    assert_eq!(at_risk, vec![ids[6]]);
    let window = ids_of(
        backend
            .store
            .list(&query(&|q| {
                q.created_after = Some(start + TimeDelta::seconds(2));
                q.created_before = Some(start + TimeDelta::seconds(4));
            }))
            .await
            .unwrap(),
    );
    assert_eq!(window, vec![ids[2], ids[3]]);
    let merged = backend
        .store
        .list(&query(&|q| q.state = "merged"))
        .await
        .unwrap();
    assert!(merged.is_empty());
}

async fn the_event_log_is_ordered_sharded_and_live(backend: Backend) {
    let log = backend.store.event_log().clone();
    let shutdown = Shutdown::new();
    let mut live = Box::pin(log.tail(Cursor::START, ShardFilter::ALL, 2, false, shutdown.clone()));
    let mut customers = Vec::new();
    for _ in 0..6 {
        let customer = customer_with(&[]);
        backend.store.commit(&insert(&customer)).await.unwrap();
        customers.push(customer.id);
    }
    let entries = entries_when(&log, 6).await;
    assert_eq!(
        entries
            .iter()
            .map(|e| e.customer_id.unwrap())
            .collect::<Vec<_>>(),
        customers
    );
    assert!(entries.windows(2).all(|w| w[0].cursor < w[1].cursor));
    let rest = log
        .read_after(entries[2].cursor, ShardFilter::ALL, 100)
        .await
        .unwrap();
    assert_eq!(rest, entries[3..].to_vec());

    // Shards partition the log and keep each customer's entries together.
    let mut union = Vec::new();
    for index in 0..3 {
        let shard = ShardFilter::new("shard", index, 3).unwrap();
        union.extend(log.read_after(Cursor::START, shard, 100).await.unwrap());
    }
    union.sort_by_key(|e| e.cursor);
    assert_eq!(union, entries);

    // The live tail delivers everything, in batches, then what comes later.
    let mut seen = Vec::new();
    while seen.len() < 6 {
        let batch = tokio::time::timeout(Duration::from_secs(5), live.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(batch.len() <= 2);
        seen.extend(batch);
    }
    let late = customer_with(&[]);
    backend.store.commit(&insert(&late)).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(5), live.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(batch[0].customer_id, Some(late.id));
    shutdown.trigger();
    assert!(
        tokio::time::timeout(Duration::from_secs(5), live.next())
            .await
            .unwrap()
            .is_none()
    );

    let caught_up: Vec<_> = log
        .tail(Cursor::START, ShardFilter::ALL, 1000, true, Shutdown::new())
        .collect()
        .await;
    assert_eq!(caught_up.len(), 1, "stop_at_end ends after the last batch");
}

clm_platform::on_both_backends!(
    sqlite: crate::support::sqlite, postgres: crate::support::postgres;
    a_customer_round_trips,
    a_stale_version_changes_nothing,
    a_key_belongs_to_one_customer,
    concurrent_inserts_of_one_key_create_one_owner,
    keys_move_on_reassignment_and_go_on_removal,
    suppression_and_request_ids,
    lists_filter_and_page_by_id,
    the_event_log_is_ordered_sharded_and_live,
);
