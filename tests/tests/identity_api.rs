//! The identity API through generated clients against the real binary: on
//! the embedded default (SQLite, in-process cache) and on PostgreSQL with
//! Redis.

#![allow(missing_docs)]

use clm_proto::common::{
    CustomerReference, IdentityKey, IdentityKeys, IdentityKind, customer_reference,
};
use clm_proto::identity::customer_service_client::CustomerServiceClient;
use clm_proto::identity::{self as pb, Customer};
use clm_tests::{ClmServer, details};
use tonic::Code;
use tonic::transport::Channel;

type Client = CustomerServiceClient<Channel>;

async fn embedded() -> ClmServer {
    ClmServer::start(&["serve"], &[]).await.expect("start clm")
}

async fn postgres_and_redis() -> Option<ClmServer> {
    let database = clm_tests::fresh_postgres_database("e2e").await?;
    let redis = clm_tests::redis_url().await?;
    Some(
        ClmServer::start(
            &["serve", "identity"],
            &[
                ("CLM_DATABASE_URL", database.expose().to_owned()),
                ("CLM_REDIS_URL", redis.expose().to_owned()),
                (
                    "CLM_IDENTITY_HASH_KEY",
                    "e2e-test-hash-key-0123456789".to_owned(),
                ),
            ],
        )
        .await
        .expect("start clm"),
    )
}

fn email_key(value: &str) -> IdentityKey {
    IdentityKey {
        kind: IdentityKind::Email as i32,
        value: value.to_owned(),
        source: String::new(),
    }
}

async fn create(client: &mut Client, customer: Customer) -> Customer {
    client
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(customer),
            request_id: String::new(),
        })
        .await
        .expect("create")
        .into_inner()
        .customer
        .expect("customer")
}

async fn count_customers(client: &mut Client) -> usize {
    client
        .list_customers(pb::ListCustomersRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .customers
        .len()
}

/// Every event of the customer log readable now, oldest first.
async fn events(client: &mut Client) -> Vec<pb::CustomerEvent> {
    let mut stream = client
        .stream_customer_events(pb::StreamCustomerEventsRequest {
            stop_at_end: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        events.extend(batch.events);
    }
    events
}

async fn count_events(client: &mut Client) -> usize {
    events(client).await.len()
}

/// Asserts INVALID_ARGUMENT naming `field`.
fn assert_invalid(result: Result<impl std::fmt::Debug, tonic::Status>, field: &str) {
    let status = result.expect_err("the request must be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let (violations, _) = details(&status);
    assert!(
        violations.iter().any(|(f, _)| f == field),
        "expected a violation of {field}, got {violations:?}"
    );
}

async fn the_customer_lifecycle_of_calls(server: ClmServer) {
    let mut client = CustomerServiceClient::new(server.channel().await);
    let ada = create(
        &mut client,
        Customer {
            given_name: "Ada".into(),
            emails: vec![" Ada@Example.COM ".into()],
            phones: vec!["+49 30 901820".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ada.emails, ["ada@example.com"]);
    assert_eq!(ada.phones, ["+4930901820"]);
    assert_eq!(ada.version, 1);

    // Update with a field mask, then with a stale version.
    let updated = client
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(Customer {
                id: ada.id.clone(),
                family_name: "Lovelace".into(),
                given_name: "ignored: not in the mask".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["family_name".into()],
            }),
            expected_version: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    assert_eq!(
        (updated.given_name.as_str(), updated.family_name.as_str()),
        ("Ada", "Lovelace")
    );
    let stale = client
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(Customer {
                id: ada.id.clone(),
                family_name: "Byron".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["family_name".into()],
            }),
            expected_version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(details(&stale).1.as_deref(), Some("VERSION_CONFLICT"));

    // A duplicate identity key.
    let taken = client
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(Customer {
                emails: vec!["ada@example.com".into()],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists);

    // Resolve with an anonymous id merges the visitor into Ada.
    let visitor = client
        .resolve_customer(pb::ResolveCustomerRequest {
            keys: vec![IdentityKey {
                kind: IdentityKind::AnonymousId as i32,
                value: "cookie-77".into(),
                source: String::new(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(visitor.created);
    let resolved = client
        .resolve_customer(pb::ResolveCustomerRequest {
            keys: vec![
                email_key("ADA@example.com"),
                IdentityKey {
                    kind: IdentityKind::AnonymousId as i32,
                    value: "cookie-77".into(),
                    source: String::new(),
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let visitor_id = visitor.customer.unwrap().id;
    assert_eq!(resolved.customer.unwrap().id, ada.id);
    assert_eq!(
        resolved.merged_customer_ids,
        std::slice::from_ref(&visitor_id)
    );

    // Merge, then get the merged id.
    let other = create(
        &mut client,
        Customer {
            emails: vec!["a.lovelace@example.com".into()],
            company: "Analytical Engines".into(),
            ..Default::default()
        },
    )
    .await;
    let merged = client
        .merge_customers(pb::MergeCustomersRequest {
            survivor_id: ada.id.clone(),
            merged_id: other.id.clone(),
            reason: "same person".into(),
            requested_by: "e2e".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let survivor = merged.survivor.unwrap();
    assert_eq!(survivor.company, "Analytical Engines");
    assert!(
        survivor
            .emails
            .contains(&"a.lovelace@example.com".to_owned())
    );
    let pointer = client
        .get_customer(pb::GetCustomerRequest {
            customer_id: other.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    assert_eq!(pointer.state(), pb::CustomerState::Merged);
    assert_eq!(pointer.merged_into_id, ada.id);

    // Erase, then resolve the erased e-mail.
    let erased = client
        .erase_customer(pb::EraseCustomerRequest {
            customer_id: ada.id.clone(),
            reason: "ticket 1234".into(),
            requested_by: "e2e".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.suppressed_keys, 4);
    let tombstone = client
        .get_customer(pb::GetCustomerRequest {
            customer_id: ada.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    assert_eq!(tombstone.state(), pb::CustomerState::Erased);
    assert!(tombstone.given_name.is_empty() && tombstone.emails.is_empty());
    let suppressed = client
        .resolve_customer(pb::ResolveCustomerRequest {
            keys: vec![email_key("ada@example.com")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(suppressed.code(), Code::FailedPrecondition);
    assert_eq!(
        details(&suppressed).1.as_deref(),
        Some("IDENTITY_KEY_SUPPRESSED")
    );

    // The event log tells the story without personal data. On PostgreSQL an
    // entry becomes readable once every older transaction of the cluster
    // has ended, so the erasure may show a moment after its call returned.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let kinds = loop {
        let kinds: Vec<&str> = events(&mut client)
            .await
            .into_iter()
            .map(|event| match event.change.unwrap() {
                pb::customer_event::Change::Created(_) => "created",
                pb::customer_event::Change::Updated(_) => "updated",
                pb::customer_event::Change::Merged(_) => "merged",
                pb::customer_event::Change::Erased(_) => "erased",
                pb::customer_event::Change::LifecycleChanged(_) => "lifecycle",
            })
            .collect();
        if kinds.last() == Some(&"erased") || tokio::time::Instant::now() > deadline {
            break kinds;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(kinds.first(), Some(&"created"));
    assert_eq!(kinds.last(), Some(&"erased"));
    assert_eq!(
        kinds.iter().filter(|k| **k == "merged").count(),
        4,
        "two merges, each on both shards"
    );
}

async fn bad_input_is_refused_and_stores_nothing(server: ClmServer) {
    let mut client = CustomerServiceClient::new(server.channel().await);
    let seed = create(
        &mut client,
        Customer {
            emails: vec!["seed@example.com".into()],
            ..Default::default()
        },
    )
    .await;
    let customers_before = count_customers(&mut client).await;
    // On PostgreSQL a log entry becomes readable once every older
    // transaction of the cluster has ended, so the seed's event may show a
    // moment after its call returned: count once it does.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !events(&mut client)
        .await
        .iter()
        .any(|event| event.customer_id == seed.id)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the seed's event never showed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let events_before = count_events(&mut client).await;

    assert_invalid(
        client
            .get_customer(pb::GetCustomerRequest {
                customer_id: String::new(),
            })
            .await,
        "customer_id",
    );
    assert_invalid(
        client
            .get_customer(pb::GetCustomerRequest {
                customer_id: "not-a-uuid".into(),
            })
            .await,
        "customer_id",
    );
    assert_invalid(
        client
            .create_customer(pb::CreateCustomerRequest {
                customer: Some(Customer {
                    emails: vec!["ok@example.com".into(), "not an email".into()],
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await,
        "customer.emails[1]",
    );
    assert_invalid(
        client
            .create_customer(pb::CreateCustomerRequest {
                customer: Some(Customer {
                    phones: vec!["12".into()],
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await,
        "customer.phones[0]",
    );
    assert_invalid(
        client
            .list_customers(pb::ListCustomersRequest {
                page_size: 5000,
                ..Default::default()
            })
            .await,
        "page_size",
    );
    assert_invalid(
        client
            .list_customers(pb::ListCustomersRequest {
                filter: Some(pb::CustomerFilter {
                    stage: 42,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await,
        "filter.stage",
    );
    assert_invalid(
        client
            .resolve_customer(pb::ResolveCustomerRequest {
                keys: vec![IdentityKey {
                    kind: 99,
                    value: "x".into(),
                    source: String::new(),
                }],
                ..Default::default()
            })
            .await,
        "keys[0].kind",
    );
    assert_invalid(
        client
            .create_customer(pb::CreateCustomerRequest {
                customer: Some(Customer {
                    given_name: "x".repeat(300),
                    emails: vec!["long@example.com".into()],
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await,
        "customer.given_name",
    );
    // Text that reorders or ends what readers display is refused.
    for (name, given, family) in [
        ("customer.family_name", "Ada", "Love\u{202e}lace"),
        ("customer.given_name", "A\u{0}da", "Lovelace"),
    ] {
        assert_invalid(
            client
                .create_customer(pb::CreateCustomerRequest {
                    customer: Some(Customer {
                        given_name: given.into(),
                        family_name: family.into(),
                        emails: vec!["bidi@example.com".into()],
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
                .await,
            name,
        );
    }
    // A message above CLM_MAX_MESSAGE_BYTES (16 MiB) never reaches a handler.
    let status = client
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(Customer {
                attributes: [("blob".to_owned(), "x".repeat(17 * 1024 * 1024))].into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect_err("an oversized message is refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(details(&status).1.as_deref(), Some("MESSAGE_TOO_LARGE"));
    assert!(
        status.message().contains("CLM_MAX_MESSAGE_BYTES"),
        "{status:?}"
    );
    assert_invalid(
        client
            .update_customer(pb::UpdateCustomerRequest {
                customer: Some(Customer {
                    id: uuid::Uuid::now_v7().to_string(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["version".into()],
                }),
                expected_version: 0,
            })
            .await,
        "update_mask.paths[0]",
    );
    assert_invalid(
        client
            .stream_customer_events(pb::StreamCustomerEventsRequest {
                after_cursor: "garbage".into(),
                ..Default::default()
            })
            .await,
        "after_cursor",
    );
    let missing = client
        .get_customer(pb::GetCustomerRequest {
            customer_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    assert_eq!(
        count_customers(&mut client).await,
        customers_before,
        "nothing was stored"
    );
    assert_eq!(
        count_events(&mut client).await,
        events_before,
        "nothing was logged"
    );
}

async fn pages_walk_every_customer_once(server: ClmServer) {
    let mut client = CustomerServiceClient::new(server.channel().await);
    let mut created = Vec::new();
    for i in 0..25 {
        created.push(
            create(
                &mut client,
                Customer {
                    emails: vec![format!("page-{i}@example.com")],
                    ..Default::default()
                },
            )
            .await
            .id,
        );
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_customers(pb::ListCustomersRequest {
                page_size: 10,
                page_token: token.clone(),
                filter: Some(pb::CustomerFilter {
                    identified_only: true,
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.customers.into_iter().map(|c| c.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, created);
    // A token is bound to its filter.
    let first = client
        .list_customers(pb::ListCustomersRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_invalid(
        client
            .list_customers(pb::ListCustomersRequest {
                page_size: 10,
                page_token: first.next_page_token,
                filter: Some(pb::CustomerFilter {
                    company: "Acme".into(),
                    ..Default::default()
                }),
            })
            .await,
        "page_token",
    );
}

fn id_reference(id: &str) -> CustomerReference {
    CustomerReference {
        reference: Some(customer_reference::Reference::CustomerId(id.to_owned())),
    }
}

fn email_reference(email: &str) -> CustomerReference {
    CustomerReference {
        reference: Some(customer_reference::Reference::IdentityKeys(IdentityKeys {
            keys: vec![email_key(email)],
        })),
    }
}

async fn a_batch_of_references_fails_only_its_bad_references(server: ClmServer) {
    let mut client = CustomerServiceClient::new(server.channel().await);
    let ada = create(
        &mut client,
        Customer {
            emails: vec!["ada@example.com".into()],
            ..Default::default()
        },
    )
    .await;
    let duplicate = create(
        &mut client,
        Customer {
            emails: vec!["a.lovelace@example.org".into()],
            ..Default::default()
        },
    )
    .await;
    client
        .merge_customers(pb::MergeCustomersRequest {
            survivor_id: ada.id.clone(),
            merged_id: duplicate.id.clone(),
            reason: "same person".into(),
            requested_by: "e2e".into(),
        })
        .await
        .unwrap();
    let gone = create(
        &mut client,
        Customer {
            emails: vec!["gone@example.com".into()],
            ..Default::default()
        },
    )
    .await;
    client
        .erase_customer(pb::EraseCustomerRequest {
            customer_id: gone.id.clone(),
            reason: "ticket 7".into(),
            requested_by: "e2e".into(),
        })
        .await
        .unwrap();
    let unknown = uuid::Uuid::now_v7().to_string();
    let customers_before = count_customers(&mut client).await;

    let results = client
        .resolve_customers(pb::ResolveCustomersRequest {
            references: vec![
                id_reference(&ada.id),
                id_reference(&duplicate.id),
                email_reference(" Batch@Example.com "),
                id_reference("not-a-uuid"),
                email_reference("not an email"),
                id_reference(&unknown),
                id_reference(&gone.id),
                email_reference("gone@example.com"),
                email_reference("batch@example.com"),
                CustomerReference { reference: None },
            ],
        })
        .await
        .expect("a batch with bad references still answers")
        .into_inner()
        .results;
    assert_eq!(results.len(), 10, "one result per reference");
    let failure = |index: usize| {
        let result: &pb::ResolvedReference = &results[index];
        assert!(result.customer_id.is_empty(), "{result:?}");
        (result.error_code, result.error_reason.as_str())
    };

    assert_eq!(results[0].customer_id, ada.id);
    assert_eq!(results[0].error_code, 0);
    assert_eq!(
        results[1].customer_id, ada.id,
        "a merged id names its survivor"
    );
    assert!(!results[1].created);
    let batch = &results[2];
    assert!(batch.created && !batch.customer_id.is_empty(), "{batch:?}");
    assert_eq!(
        (&results[8].customer_id, results[8].created),
        (&batch.customer_id, true),
        "a repeated reference is resolved once"
    );
    assert_eq!(failure(3), (3, "INVALID_REFERENCE"));
    assert!(
        results[3]
            .error_message
            .contains("references[3].customer_id"),
        "{:?}",
        results[3]
    );
    assert_eq!(failure(4), (3, "INVALID_REFERENCE"));
    assert!(
        results[4]
            .error_message
            .contains("references[4].identity_keys.keys[0].value"),
        "{:?}",
        results[4]
    );
    assert_eq!(failure(5), (5, "CUSTOMER_NOT_FOUND"));
    assert!(results[5].error_message.contains(&unknown));
    assert_eq!(failure(6), (9, "CUSTOMER_ERASED"));
    assert_eq!(failure(7), (9, "IDENTITY_KEY_SUPPRESSED"));
    assert!(
        results[7]
            .error_message
            .contains("references[7].identity_keys.keys[0]:"),
        "{:?}",
        results[7]
    );
    assert_eq!(failure(9), (3, "INVALID_REFERENCE"));
    assert!(results[9].error_message.contains("references[9]"));

    // The reasons are those of the unary calls.
    let missing = client
        .get_customer(pb::GetCustomerRequest {
            customer_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(details(&missing).1.as_deref(), Some("CUSTOMER_NOT_FOUND"));
    assert_eq!(missing.message(), results[5].error_message);

    assert_eq!(
        count_customers(&mut client).await,
        customers_before + 1,
        "only the new keys created a customer"
    );

    assert_invalid(
        client
            .resolve_customers(pb::ResolveCustomersRequest { references: vec![] })
            .await,
        "references",
    );
    assert_invalid(
        client
            .resolve_customers(pb::ResolveCustomersRequest {
                references: vec![id_reference(&ada.id); 1001],
            })
            .await,
        "references",
    );
}

fn snapshot(
    stage: clm_proto::common::LifecycleStage,
    seconds: i64,
) -> clm_proto::common::LifecycleSnapshot {
    clm_proto::common::LifecycleSnapshot {
        stage: stage as i32,
        health: clm_proto::common::Health::Active as i32,
        engagement_score: 10.0,
        model_version: "m-1".to_owned(),
        evaluated_at: Some(prost_types::Timestamp { seconds, nanos: 0 }),
        ..Default::default()
    }
}

async fn lifecycles_are_stored_in_batches(server: ClmServer) {
    use clm_proto::common::LifecycleStage;
    let mut client = CustomerServiceClient::new(server.channel().await);
    let ada = create(
        &mut client,
        Customer {
            emails: vec!["batch-ada@example.com".into()],
            ..Customer::default()
        },
    )
    .await;
    let bob = create(
        &mut client,
        Customer {
            emails: vec!["batch-bob@example.com".into()],
            ..Customer::default()
        },
    )
    .await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let item = |id: &str, stage, seconds| pb::SetLifecycleRequest {
        customer_id: id.to_owned(),
        lifecycle: Some(snapshot(stage, seconds)),
    };
    let results = client
        .set_lifecycles(pb::SetLifecyclesRequest {
            items: vec![
                item(&ada.id, LifecycleStage::Reach, 1_750_000_000),
                item(&bob.id, LifecycleStage::Conversion, 1_750_000_000),
                item(&unknown, LifecycleStage::Reach, 1_750_000_000),
                // Named twice: the newer snapshot wins.
                item(&ada.id, LifecycleStage::Retention, 1_750_000_100),
            ],
        })
        .await
        .expect("set lifecycles")
        .into_inner()
        .results;
    let outcome: Vec<(bool, bool)> = results.iter().map(|r| (r.applied, r.version > 0)).collect();
    assert_eq!(
        outcome,
        [(true, true), (true, true), (false, false), (true, true)]
    );
    let stage_of = |customer: Option<Customer>| customer.and_then(|c| c.lifecycle).map(|l| l.stage);
    let stored = client
        .get_customer(pb::GetCustomerRequest {
            customer_id: ada.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .customer;
    assert_eq!(stage_of(stored), Some(LifecycleStage::Retention as i32));
    // An older snapshot is not applied.
    let older = client
        .set_lifecycles(pb::SetLifecyclesRequest {
            items: vec![item(&bob.id, LifecycleStage::Reach, 1_700_000_000)],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(!older[0].applied);
    // A bad item is named, and nothing of the call is stored.
    let mut bad = item(&ada.id, LifecycleStage::Loyalty, 1_750_000_200);
    bad.lifecycle.as_mut().unwrap().lead_score = 101.0;
    let refused = client
        .set_lifecycles(pb::SetLifecyclesRequest {
            items: vec![item(&bob.id, LifecycleStage::Loyalty, 1_750_000_200), bad],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(details(&refused).0[0].0, "items[1].lifecycle.lead_score");
    let bob_now = client
        .get_customer(pb::GetCustomerRequest {
            customer_id: bob.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .customer;
    assert_eq!(stage_of(bob_now), Some(LifecycleStage::Conversion as i32));

    // A snapshot from the future would shadow every real one for good.
    let year_9999 = 253_402_214_400;
    let future = client
        .set_lifecycles(pb::SetLifecyclesRequest {
            items: vec![item(&bob.id, LifecycleStage::Loyalty, year_9999)],
        })
        .await
        .unwrap_err();
    assert_eq!(future.code(), Code::InvalidArgument);
    assert_eq!(
        clm_tests::violation_reasons(&future),
        [(
            "items[0].lifecycle.evaluated_at".to_owned(),
            "OUT_OF_RANGE".to_owned()
        )]
    );
    let an_hour_ahead = chrono::Utc::now().timestamp() + 3600;
    assert_invalid(
        client
            .set_lifecycle(pb::SetLifecycleRequest {
                customer_id: bob.id.clone(),
                lifecycle: Some(snapshot(LifecycleStage::Loyalty, an_hour_ahead)),
            })
            .await,
        "lifecycle.evaluated_at",
    );
    // The acquisition status belongs to ACQUISITION alone.
    let mut reach_mql = snapshot(LifecycleStage::Reach, 1_750_000_300);
    reach_mql.acquisition_status = clm_proto::common::AcquisitionStatus::Mql as i32;
    assert_invalid(
        client
            .set_lifecycle(pb::SetLifecycleRequest {
                customer_id: bob.id.clone(),
                lifecycle: Some(reach_mql),
            })
            .await,
        "lifecycle.acquisition_status",
    );
    assert_invalid(
        client
            .set_lifecycle(pb::SetLifecycleRequest {
                customer_id: bob.id.clone(),
                lifecycle: Some(snapshot(LifecycleStage::Acquisition, 1_750_000_300)),
            })
            .await,
        "lifecycle.acquisition_status",
    );
    // A consent recorded in the future could never be withdrawn.
    assert_invalid(
        client
            .update_customer(pb::UpdateCustomerRequest {
                customer: Some(Customer {
                    id: bob.id.clone(),
                    consents: vec![pb::Consent {
                        purpose: "email_marketing".into(),
                        status: pb::ConsentStatus::Granted as i32,
                        source: "test".into(),
                        recorded_at: Some(prost_types::Timestamp {
                            seconds: year_9999,
                            nanos: 0,
                        }),
                    }],
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["consents".into()],
                }),
                expected_version: 0,
            })
            .await,
        "customer.consents[0].recorded_at",
    );
    let bob_after = client
        .get_customer(pb::GetCustomerRequest {
            customer_id: bob.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    assert_eq!(
        bob_after.lifecycle.map(|l| l.stage),
        Some(LifecycleStage::Conversion as i32),
        "nothing refused was stored"
    );
    assert!(bob_after.consents.is_empty(), "nothing refused was stored");
}

macro_rules! on_both_modes {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::embedded().await).await;
                }
            )*
        }
        mod postgres_redis {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(server) = super::postgres_and_redis().await else { return };
                    super::$name(server).await;
                }
            )*
        }
    };
}

/// The changed_fields of every update event of `customer_id`, in order.
async fn changed_fields_of(client: &mut Client, customer_id: &str) -> Vec<Vec<String>> {
    events(client)
        .await
        .into_iter()
        .filter(|event| event.customer_id == customer_id)
        .filter_map(|event| match event.change {
            Some(pb::customer_event::Change::Updated(updated)) => Some(updated.changed_fields),
            _ => None,
        })
        .collect()
}

async fn update_events_name_the_mask_paths_that_changed(server: ClmServer) {
    let mut client = CustomerServiceClient::new(server.channel().await);
    let ada = create(
        &mut client,
        Customer {
            given_name: "Ada".into(),
            emails: vec!["paths-ada@example.com".into()],
            ..Default::default()
        },
    )
    .await;
    let update = |customer: Customer, paths: &[&str]| pb::UpdateCustomerRequest {
        customer: Some(Customer {
            id: ada.id.clone(),
            ..customer
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
        expected_version: 0,
    };
    // A path named twice is one change.
    client
        .update_customer(update(
            Customer {
                job_title: "CTO".into(),
                ..Default::default()
            },
            &["job_title", "job_title"],
        ))
        .await
        .unwrap();
    // A path whose value stays is no change.
    client
        .update_customer(update(
            Customer {
                given_name: "Ada".into(),
                company: "Engines".into(),
                ..Default::default()
            },
            &["given_name", "company"],
        ))
        .await
        .unwrap();
    // A resolve that adds a key and fills an empty field names both paths.
    client
        .resolve_customer(pb::ResolveCustomerRequest {
            keys: vec![
                IdentityKey {
                    kind: IdentityKind::Email as i32,
                    value: "paths-ada@example.com".into(),
                    source: String::new(),
                },
                IdentityKey {
                    kind: IdentityKind::Phone as i32,
                    value: "+44 20 7946 0999".into(),
                    source: String::new(),
                },
            ],
            traits: Some(pb::CustomerTraits {
                industry: "computing".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let updates = loop {
        let updates = changed_fields_of(&mut client, &ada.id).await;
        if updates.len() >= 3 || tokio::time::Instant::now() > deadline {
            break updates;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        updates,
        [
            vec!["job_title".to_owned()],
            vec!["company".to_owned()],
            vec!["phones".to_owned(), "industry".to_owned()],
        ]
    );
}

on_both_modes!(
    update_events_name_the_mask_paths_that_changed,
    the_customer_lifecycle_of_calls,
    bad_input_is_refused_and_stores_nothing,
    pages_walk_every_customer_once,
    a_batch_of_references_fails_only_its_bad_references,
    lifecycles_are_stored_in_batches,
);
