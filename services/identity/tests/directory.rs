//! The identity rules end to end through the domain service, on SQLite and
//! PostgreSQL: resolve, merge, erase, optimistic concurrency and the cache.

#![allow(missing_docs)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{Duration as TimeDelta, Utc};
use clm_eventlog::EventLog;
use clm_identity::directory::{
    CustomerPatch, CustomerReference, NewCustomer, ReferencedCustomer, RequestKey, ResolveRequest,
};
use clm_identity::error::IdentityError;
use clm_identity::keys::{IdentityKey, KeyKind};
use clm_identity::model::{Consent, ConsentStatus, Lifecycle, Profile};
use clm_identity::model::{Customer, MergeRecord};
use clm_identity::store::{ChangeSet, CustomerStore, ListQuery, StoreError};
use clm_proto::identity as pb;
use support::Backend;
use uuid::Uuid;

fn key(kind: KeyKind, value: &str) -> RequestKey {
    RequestKey {
        field: format!("keys[{value}]"),
        key: IdentityKey {
            kind,
            value: value.to_owned(),
        },
    }
}

fn email(value: &str) -> RequestKey {
    key(KeyKind::Email, value)
}

fn cookie(value: &str) -> RequestKey {
    key(KeyKind::Anonymous, value)
}

fn resolve(keys: Vec<RequestKey>) -> ResolveRequest {
    ResolveRequest {
        keys,
        ..ResolveRequest::default()
    }
}

fn lifecycle(stage: i32, evaluated_at: chrono::DateTime<Utc>) -> Lifecycle {
    Lifecycle {
        stage,
        acquisition_status: 0,
        health: 1,
        engagement_score: 10.0,
        lead_score: 20.0,
        health_score: 80.0,
        model_version: "test-1".into(),
        stage_entered_at: Some(evaluated_at),
        health_entered_at: Some(evaluated_at),
        evaluated_at,
    }
}

async fn twenty_concurrent_resolves_of_a_new_key_create_one_customer(backend: Backend) {
    let directory = support::directory(&backend, support::in_process_cache());
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let directory = directory.clone();
        tasks.push(tokio::spawn(async move {
            directory
                .resolve(resolve(vec![email("new@example.com")]))
                .await
        }));
    }
    let mut ids = Vec::new();
    let mut created = 0;
    for task in tasks {
        let resolved = task.await.unwrap().expect("every resolve succeeds");
        created += usize::from(resolved.created);
        ids.push(resolved.customer.id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "all resolves name the same customer");
    assert_eq!(created, 1, "exactly one resolve created it");
    let page = directory
        .list(clm_identity::store::ListQuery {
            state: "active",
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.customers.len(), 1);
}

async fn an_anonymous_profile_is_merged_into_the_identified_one(backend: Backend) {
    let directory = support::directory(&backend, support::in_process_cache());
    let visitor = directory
        .resolve(resolve(vec![cookie("cookie-1")]))
        .await
        .unwrap();
    assert!(visitor.created);
    let known = directory
        .resolve(resolve(vec![email("ada@example.com")]))
        .await
        .unwrap();
    // The sign-up: the cookie and the e-mail arrive together.
    let signed_up = directory
        .resolve(resolve(vec![email("ada@example.com"), cookie("cookie-1")]))
        .await
        .unwrap();
    assert_eq!(signed_up.customer.id, known.customer.id);
    assert_eq!(signed_up.merged_ids, vec![visitor.customer.id]);
    assert!(signed_up.customer.keys.contains(&cookie("cookie-1").key));
    let pointer = directory
        .profiles()
        .served(visitor.customer.id)
        .await
        .unwrap();
    assert_eq!(pointer.state(), pb::CustomerState::Merged);
    assert_eq!(pointer.merged_into_id, known.customer.id.to_string());
}

async fn two_identified_customers_merge_only_when_allowed(backend: Backend) {
    let directory = support::directory(&backend, support::in_process_cache());
    let a = directory
        .resolve(resolve(vec![email("a@example.com")]))
        .await
        .unwrap()
        .customer;
    let b = directory
        .resolve(resolve(vec![email("b@example.com")]))
        .await
        .unwrap()
        .customer;
    let both = vec![email("a@example.com"), email("b@example.com")];
    let err = directory.resolve(resolve(both.clone())).await.unwrap_err();
    assert!(
        matches!(err, IdentityError::IdentityConflict { ref customer_ids } if customer_ids.len() == 2)
    );
    let merged = directory
        .resolve(ResolveRequest {
            keys: both,
            allow_merge: true,
            ..ResolveRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(
        merged.customer.id, a.id,
        "the older identified customer survives"
    );
    assert_eq!(merged.merged_ids, vec![b.id]);
}

async fn merge_then_get_points_at_the_survivor(backend: Backend) {
    let directory = support::directory(&backend, support::in_process_cache());
    let survivor = directory
        .create(NewCustomer {
            profile: Profile {
                given_name: "Ada".into(),
                attributes: BTreeMap::from([("tier".into(), "gold".into())]),
                ..Profile::default()
            },
            keys: vec![email("ada@example.com")],
            request_id: None,
        })
        .await
        .unwrap();
    let merged = directory
        .create(NewCustomer {
            profile: Profile {
                given_name: "A.".into(),
                family_name: "Lovelace".into(),
                attributes: BTreeMap::from([
                    ("tier".into(), "silver".into()),
                    ("city".into(), "London".into()),
                ]),
                ..Profile::default()
            },
            keys: vec![
                email("ada.l@example.com"),
                key(KeyKind::Phone, "+4930901820"),
            ],
            request_id: None,
        })
        .await
        .unwrap();
    // Warm the cache with the merged customer's pre-merge state.
    assert_eq!(
        directory
            .profiles()
            .served(merged.id)
            .await
            .unwrap()
            .state(),
        pb::CustomerState::Active
    );

    let (after, record) = directory
        .merge(survivor.id, merged.id, "duplicate", "support")
        .await
        .unwrap();
    assert_eq!(
        after.profile.given_name, "Ada",
        "the survivor keeps its own values"
    );
    assert_eq!(
        after.profile.family_name, "Lovelace",
        "empty fields are filled"
    );
    assert_eq!(after.profile.attributes["tier"], "gold");
    assert_eq!(after.profile.attributes["city"], "London");
    assert_eq!(after.keys.len(), 3);

    let pointer = directory.profiles().served(merged.id).await.unwrap();
    assert_eq!(pointer.state(), pb::CustomerState::Merged);
    assert_eq!(pointer.merged_into_id, survivor.id.to_string());
    assert!(
        pointer.emails.is_empty(),
        "the merged record keeps no personal data"
    );

    let ledger = directory.merges_of(merged.id).await.unwrap();
    assert_eq!(ledger, vec![record.clone()]);
    assert_eq!(record.requested_by, "support");

    // The keys now resolve to the survivor.
    let resolved = directory
        .resolve(resolve(vec![email("ada.l@example.com")]))
        .await
        .unwrap();
    assert_eq!(resolved.customer.id, survivor.id);

    // A chain of merges points at the final survivor.
    let third = directory
        .resolve(resolve(vec![email("third@example.com")]))
        .await
        .unwrap()
        .customer;
    directory
        .merge(third.id, survivor.id, "chain", "support")
        .await
        .unwrap();
    assert_eq!(
        directory
            .profiles()
            .served(merged.id)
            .await
            .unwrap()
            .merged_into_id,
        third.id.to_string()
    );

    assert!(matches!(
        directory
            .merge(survivor.id, survivor.id, "", "")
            .await
            .unwrap_err(),
        IdentityError::SelfMerge
    ));
    assert!(matches!(
        directory
            .merge(third.id, merged.id, "", "")
            .await
            .unwrap_err(),
        IdentityError::NotActive {
            state: "merged",
            ..
        }
    ));
}

async fn an_erased_email_is_suppressed_until_consent(backend: Backend) {
    let directory = support::directory(&backend, support::in_process_cache());
    let ada = directory
        .resolve(resolve(vec![email("erase-me@example.com"), cookie("c-9")]))
        .await
        .unwrap()
        .customer;
    directory.profiles().served(ada.id).await.unwrap();
    let erased = directory.erase(ada.id).await.unwrap();
    assert_eq!(erased.suppressed_keys, 2);
    let tombstone = directory.profiles().served(ada.id).await.unwrap();
    assert_eq!(
        tombstone.state(),
        pb::CustomerState::Erased,
        "the cache shows the erasure"
    );
    assert!(tombstone.emails.is_empty() && tombstone.anonymous_ids.is_empty());

    let err = directory
        .resolve(resolve(vec![email("erase-me@example.com")]))
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::Suppressed { .. }), "{err:?}");
    let err = directory
        .create(NewCustomer {
            keys: vec![email("erase-me@example.com")],
            ..NewCustomer::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::Suppressed { .. }));

    let again = directory
        .resolve(ResolveRequest {
            keys: vec![email("erase-me@example.com")],
            consents: vec![Consent {
                purpose: "account".into(),
                status: ConsentStatus::Granted,
                source: "signup_form".into(),
                recorded_at: Utc::now(),
            }],
            ..ResolveRequest::default()
        })
        .await
        .unwrap();
    assert!(again.created);
    assert_ne!(again.customer.id, ada.id);
    // Erasing twice is harmless.
    let twice = directory.erase(ada.id).await.unwrap();
    assert_eq!(twice.suppressed_keys, 0);
}

async fn a_stale_version_is_aborted(backend: Backend) {
    let directory = support::directory(&backend, support::in_process_cache());
    let ada = directory
        .create(NewCustomer {
            keys: vec![email("v@example.com")],
            ..NewCustomer::default()
        })
        .await
        .unwrap();
    let patch = |name: &str| CustomerPatch {
        given_name: Some(name.to_owned()),
        ..CustomerPatch::default()
    };
    let first = directory
        .update(ada.id, patch("One"), Some(ada.version))
        .await
        .unwrap();
    assert_eq!(first.version, ada.version + 1);
    let err = directory
        .update(ada.id, patch("Two"), Some(ada.version))
        .await
        .unwrap_err();
    assert!(
        matches!(err, IdentityError::VersionConflict { expected, current, .. } if expected == ada.version && current == first.version)
    );
    assert_eq!(
        directory
            .profiles()
            .served(ada.id)
            .await
            .unwrap()
            .given_name,
        "One"
    );
}

async fn a_read_after_a_write_is_never_stale(backend: Backend) {
    let directory = support::directory(&backend, support::in_process_cache());
    let ada = directory
        .create(NewCustomer {
            keys: vec![email("fresh@example.com")],
            ..NewCustomer::default()
        })
        .await
        .unwrap();
    for round in 0..20 {
        // Warm: the cache holds the current version.
        directory.profiles().served(ada.id).await.unwrap();
        let name = format!("name-{round}");
        directory
            .update(
                ada.id,
                CustomerPatch {
                    given_name: Some(name.clone()),
                    ..CustomerPatch::default()
                },
                None,
            )
            .await
            .unwrap();
        assert_eq!(
            directory
                .profiles()
                .served(ada.id)
                .await
                .unwrap()
                .given_name,
            name
        );
    }
    assert!(directory.profiles().cache().counts().hits >= 20);
}

async fn a_read_after_a_write_through_redis_is_never_stale(backend: Backend) {
    let Some(url) = clm_platform::testing::redis_url().await else {
        return;
    };
    for client_side in [false, true] {
        let redis = clm_platform::cache::RedisBackend::new(&url, std::time::Duration::from_secs(2))
            .unwrap();
        let redis = if client_side {
            redis
                .with_client_side_cache(1000, std::time::Duration::from_secs(60))
                .unwrap()
        } else {
            redis
        };
        let directory =
            support::directory(&backend, support::cache_over(std::sync::Arc::new(redis)));
        let ada = directory
            .create(NewCustomer {
                keys: vec![email(&format!("redis-{client_side}@example.com"))],
                ..NewCustomer::default()
            })
            .await
            .unwrap();
        for round in 0..10 {
            directory.profiles().served(ada.id).await.unwrap();
            let name = format!("name-{round}");
            directory
                .update(
                    ada.id,
                    CustomerPatch {
                        given_name: Some(name.clone()),
                        ..CustomerPatch::default()
                    },
                    None,
                )
                .await
                .unwrap();
            assert_eq!(
                directory
                    .profiles()
                    .served(ada.id)
                    .await
                    .unwrap()
                    .given_name,
                name,
                "client-side cache: {client_side}"
            );
        }
        let counts = directory.profiles().cache().counts();
        assert!(counts.hits >= 10 && counts.errors == 0, "{counts:?}");
    }
}

async fn keys_can_be_replaced_by_update(backend: Backend) {
    let directory = support::directory(&backend, support::in_process_cache());
    let a = directory
        .create(NewCustomer {
            keys: vec![email("old@example.com")],
            ..NewCustomer::default()
        })
        .await
        .unwrap();
    let b = directory
        .create(NewCustomer {
            keys: vec![email("taken@example.com")],
            ..NewCustomer::default()
        })
        .await
        .unwrap();
    let replace = |emails: &[&str]| CustomerPatch {
        keys: BTreeMap::from([(KeyKind::Email, emails.iter().map(|e| email(e)).collect())]),
        ..CustomerPatch::default()
    };
    let err = directory
        .update(a.id, replace(&["taken@example.com"]), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, IdentityError::KeyTaken { ref field } if field == "keys[taken@example.com]")
    );
    let updated = directory
        .update(a.id, replace(&["new@example.com"]), None)
        .await
        .unwrap();
    assert_eq!(updated.keys, vec![email("new@example.com").key]);
    let freed = directory
        .resolve(resolve(vec![email("old@example.com")]))
        .await
        .unwrap();
    assert!(freed.created, "the removed key no longer points at anyone");
    assert_ne!(freed.customer.id, b.id);
}

async fn create_is_idempotent_by_request_id(backend: Backend) {
    let directory = support::directory(&backend, support::in_process_cache());
    let new = NewCustomer {
        keys: vec![email("once@example.com")],
        request_id: Some("req-42".into()),
        ..NewCustomer::default()
    };
    let first = directory.create(new.clone()).await.unwrap();
    let again = directory.create(new).await.unwrap();
    assert_eq!(first.id, again.id);
    let err = directory
        .create(NewCustomer {
            keys: vec![email("once@example.com")],
            ..NewCustomer::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::KeyTaken { .. }));
}

async fn lifecycle_snapshots_never_go_back_in_time(backend: Backend) {
    let directory = support::directory(&backend, support::in_process_cache());
    let ada = directory
        .resolve(resolve(vec![email("life@example.com")]))
        .await
        .unwrap()
        .customer;
    let now = clm_identity::directory::now();
    assert!(
        directory
            .set_lifecycle(ada.id, lifecycle(3, now))
            .await
            .unwrap()
            .0
    );
    let (applied, _) = directory
        .set_lifecycle(ada.id, lifecycle(2, now - TimeDelta::seconds(10)))
        .await
        .unwrap();
    assert!(!applied, "an older snapshot is ignored");
    let shown = directory.profiles().served(ada.id).await.unwrap();
    assert_eq!(shown.lifecycle.unwrap().stage, 3);
    assert!(matches!(
        directory
            .set_lifecycle(uuid::Uuid::now_v7(), lifecycle(1, now))
            .await
            .unwrap_err(),
        IdentityError::NotFound(_)
    ));
}

/// A key as the `reference`th reference of ResolveCustomers carries it.
fn reference_key(reference: usize, key: RequestKey) -> RequestKey {
    RequestKey {
        field: format!("references[{reference}].identity_keys.keys[0]"),
        ..key
    }
}

async fn count_active(directory: &clm_identity::directory::CustomerDirectory) -> usize {
    directory
        .list(ListQuery {
            state: "active",
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .customers
        .len()
}

async fn a_batch_of_references_resolves_each_once(backend: Backend) {
    let directory = support::directory(&backend, support::in_process_cache());
    let ada = directory
        .resolve(resolve(vec![email("ada@example.com")]))
        .await
        .unwrap()
        .customer;
    let duplicate = directory
        .resolve(resolve(vec![email("a.lovelace@example.org")]))
        .await
        .unwrap()
        .customer;
    // Warm the cache with the duplicate before the merge: the batch must
    // still see the merge.
    directory.profiles().served(duplicate.id).await.unwrap();
    directory
        .merge(ada.id, duplicate.id, "same person", "test")
        .await
        .unwrap();
    let grace = directory
        .resolve(resolve(vec![email("grace@example.com")]))
        .await
        .unwrap()
        .customer;
    let gone = directory
        .resolve(resolve(vec![email("gone@example.com")]))
        .await
        .unwrap()
        .customer;
    directory.erase(gone.id).await.unwrap();
    let unknown = Uuid::now_v7();
    let active_before = count_active(&directory).await;

    let new_visitor = |reference: usize| {
        CustomerReference::Keys(vec![
            reference_key(reference, cookie("batch-cookie")),
            reference_key(reference, email("new@example.com")),
        ])
    };
    let references = vec![
        CustomerReference::Id(ada.id),
        CustomerReference::Id(duplicate.id),
        CustomerReference::Id(gone.id),
        CustomerReference::Id(unknown),
        new_visitor(4),
        CustomerReference::Keys(vec![reference_key(5, email("gone@example.com"))]),
        // The same keys in another order: the same reference.
        CustomerReference::Keys(vec![
            reference_key(6, email("new@example.com")),
            reference_key(6, cookie("batch-cookie")),
        ]),
        CustomerReference::Id(ada.id),
        CustomerReference::Keys(vec![
            reference_key(8, email("ada@example.com")),
            reference_key(8, email("grace@example.com")),
        ]),
        CustomerReference::Keys(vec![reference_key(9, email("gone@example.com"))]),
        CustomerReference::Keys(vec![reference_key(10, email("grace@example.com"))]),
    ];
    let outcomes = directory
        .resolve_references(references)
        .await
        .expect("no outage");
    assert_eq!(outcomes.len(), 11, "one outcome per reference");

    let existing = |id: Uuid| ReferencedCustomer {
        customer_id: id,
        created: false,
    };
    assert_eq!(outcomes[0].as_ref().unwrap(), &existing(ada.id));
    assert_eq!(
        outcomes[1].as_ref().unwrap(),
        &existing(ada.id),
        "a merged id names its survivor"
    );
    assert!(
        matches!(outcomes[2], Err(IdentityError::NotActive { customer_id, state: "erased", merged_into: None }) if customer_id == gone.id),
        "{:?}",
        outcomes[2]
    );
    assert!(
        matches!(outcomes[3], Err(IdentityError::NotFound(id)) if id == unknown),
        "{:?}",
        outcomes[3]
    );
    let created = outcomes[4].as_ref().expect("new keys resolve").clone();
    assert!(created.created);
    assert_eq!(
        outcomes[6].as_ref().unwrap(),
        &created,
        "identical references share one outcome"
    );
    assert!(
        matches!(&outcomes[5], Err(IdentityError::Suppressed { field }) if field == "references[5].identity_keys.keys[0]"),
        "{:?}",
        outcomes[5]
    );
    assert!(
        matches!(&outcomes[9], Err(IdentityError::Suppressed { field }) if field == "references[9].identity_keys.keys[0]"),
        "a repeated reference's failure names its own field: {:?}",
        outcomes[9]
    );
    assert_eq!(outcomes[7].as_ref().unwrap(), &existing(ada.id));
    assert!(
        matches!(&outcomes[8], Err(IdentityError::IdentityConflict { customer_ids }) if customer_ids.len() == 2),
        "two identified customers are not merged: {:?}",
        outcomes[8]
    );
    assert_eq!(outcomes[10].as_ref().unwrap(), &existing(grace.id));

    assert_eq!(
        count_active(&directory).await,
        active_before + 1,
        "the repeated new keys created one customer"
    );
    let again = directory
        .resolve(resolve(vec![cookie("batch-cookie")]))
        .await
        .unwrap();
    assert_eq!(again.customer.id, created.customer_id);
    assert!(!again.created);
}

async fn a_large_batch_of_new_keys_creates_each_customer(backend: Backend) {
    let directory = support::directory(&backend, support::in_process_cache());
    let references: Vec<CustomerReference> = (0..200)
        .map(|i| {
            CustomerReference::Keys(vec![reference_key(
                i,
                cookie(&format!("visitor-{}", i % 100)),
            )])
        })
        .collect();
    let outcomes = directory.resolve_references(references).await.unwrap();
    let ids: Vec<Uuid> = outcomes
        .iter()
        .map(|outcome| outcome.as_ref().expect("resolved").customer_id)
        .collect();
    for i in 0..100 {
        assert_eq!(ids[i], ids[i + 100], "reference {i} and its repetition");
    }
    let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), 100);
    assert_eq!(count_active(&directory).await, 100);
}

/// A store whose database can be switched off: every call then fails as
/// unreachable.
struct SwitchableStore {
    inner: Arc<dyn CustomerStore>,
    down: AtomicBool,
}

impl SwitchableStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("switched off by the test".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl CustomerStore for SwitchableStore {
    async fn get(&self, id: Uuid) -> Result<Option<Customer>, StoreError> {
        self.check()?;
        self.inner.get(id).await
    }
    async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<Customer>, StoreError> {
        self.check()?;
        self.inner.get_many(ids).await
    }
    async fn owners_of(
        &self,
        keys: &[IdentityKey],
    ) -> Result<Vec<(IdentityKey, Uuid)>, StoreError> {
        self.check()?;
        self.inner.owners_of(keys).await
    }
    async fn suppressed(&self, hashes: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.check()?;
        self.inner.suppressed(hashes).await
    }
    async fn customer_for_request(&self, request_id: &str) -> Result<Option<Uuid>, StoreError> {
        self.check()?;
        self.inner.customer_for_request(request_id).await
    }
    async fn merges_of(&self, customer_id: Uuid) -> Result<Vec<MergeRecord>, StoreError> {
        self.check()?;
        self.inner.merges_of(customer_id).await
    }
    async fn list(&self, query: &ListQuery) -> Result<Vec<Customer>, StoreError> {
        self.check()?;
        self.inner.list(query).await
    }
    async fn commit(&self, changes: &ChangeSet) -> Result<(), StoreError> {
        self.check()?;
        self.inner.commit(changes).await
    }
    async fn purge_erased(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.purge_erased().await
    }
    fn event_log(&self) -> &EventLog {
        self.inner.event_log()
    }
}

async fn a_database_outage_fails_the_whole_batch(backend: Backend) {
    let store = Arc::new(SwitchableStore {
        inner: backend.store.clone(),
        down: AtomicBool::new(false),
    });
    let directory = clm_identity::directory::CustomerDirectory::new(
        store.clone(),
        support::in_process_cache(),
        clm_identity::keys::KeyHasher::new(b"test-hash-key-0123456789"),
    );
    let ada = directory
        .resolve(resolve(vec![email("ada@example.com")]))
        .await
        .unwrap()
        .customer;
    // Hot in the cache: this reference alone would still resolve.
    directory.profiles().served(ada.id).await.unwrap();
    store.down.store(true, Ordering::SeqCst);
    let err = directory
        .resolve_references(vec![
            CustomerReference::Id(ada.id),
            CustomerReference::Keys(vec![reference_key(1, email("new@example.com"))]),
        ])
        .await
        .expect_err("an outage is no per-reference outcome");
    assert!(matches!(err, IdentityError::Unavailable(_)), "{err:?}");
}

clm_platform::on_both_backends!(
    sqlite: crate::support::sqlite, postgres: crate::support::postgres;
    a_batch_of_references_resolves_each_once,
    a_large_batch_of_new_keys_creates_each_customer,
    a_database_outage_fails_the_whole_batch,
    twenty_concurrent_resolves_of_a_new_key_create_one_customer,
    an_anonymous_profile_is_merged_into_the_identified_one,
    two_identified_customers_merge_only_when_allowed,
    merge_then_get_points_at_the_survivor,
    an_erased_email_is_suppressed_until_consent,
    a_stale_version_is_aborted,
    a_read_after_a_write_is_never_stale,
    a_read_after_a_write_through_redis_is_never_stale,
    keys_can_be_replaced_by_update,
    create_is_idempotent_by_request_id,
    lifecycle_snapshots_never_go_back_in_time,
);
