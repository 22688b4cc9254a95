//! The touchpoints API end to end against the real binary on PostgreSQL:
//! idempotent ingest, bulk loads that survive a kill -9, merges and
//! erasures seen through the identity log, validation, and identity down.

#![allow(missing_docs)]

use std::time::Duration;

use clm_proto::common::{
    CustomerReference, IdentityKey, IdentityKeys, IdentityKind, Money, customer_reference,
};
use clm_proto::identity as identity_pb;
use clm_proto::identity::customer_service_client::CustomerServiceClient;
use clm_proto::touchpoint as pb;
use clm_proto::touchpoint::touchpoint_service_client::TouchpointServiceClient;
use clm_tests::{ClmServer, details};
use tonic::Code;
use tonic::transport::Channel;

type Touchpoints = TouchpointServiceClient<Channel>;

async fn on_postgres(database: &clm_platform::Secret) -> ClmServer {
    ClmServer::start(
        &["serve"],
        &[("CLM_DATABASE_URL", database.expose().to_owned())],
    )
    .await
    .expect("start clm")
}

fn by_email(email: &str) -> Option<CustomerReference> {
    Some(CustomerReference {
        reference: Some(customer_reference::Reference::IdentityKeys(IdentityKeys {
            keys: vec![IdentityKey {
                kind: IdentityKind::Email as i32,
                value: email.to_owned(),
                source: String::new(),
            }],
        })),
    })
}

fn by_id(id: &str) -> Option<CustomerReference> {
    Some(CustomerReference {
        reference: Some(customer_reference::Reference::CustomerId(id.to_owned())),
    })
}

fn touchpoint(event_id: &str, customer: Option<CustomerReference>, kind: &str) -> pb::Touchpoint {
    pb::Touchpoint {
        event_id: event_id.to_owned(),
        customer,
        channel: pb::Channel::Web as i32,
        r#type: kind.to_owned(),
        properties: [("path".to_owned(), "/pricing".to_owned())].into(),
        ..Default::default()
    }
}

async fn record_batch(
    client: &mut Touchpoints,
    touchpoints: Vec<pb::Touchpoint>,
) -> pb::RecordTouchpointsResponse {
    client
        .record_touchpoints(pb::RecordTouchpointsRequest { touchpoints })
        .await
        .expect("record batch")
        .into_inner()
}

/// How many touchpoints were recorded, read from the log.
async fn recorded_count(client: &mut Touchpoints) -> usize {
    let mut stream = client
        .stream_touchpoint_log(pb::StreamTouchpointLogRequest {
            stop_at_end: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut count = 0;
    while let Some(batch) = stream.message().await.unwrap() {
        count += batch
            .entries
            .iter()
            .filter(|e| {
                matches!(
                    e.change,
                    Some(pb::touchpoint_log_entry::Change::Recorded(_))
                )
            })
            .count();
    }
    count
}

/// Waits until the log holds `count` recorded touchpoints (entries become
/// readable once every older transaction in the database cluster ended).
async fn wait_for_recorded(client: &mut Touchpoints, count: usize) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let seen = recorded_count(client).await;
        if seen >= count || tokio::time::Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn timeline(client: &mut Touchpoints, customer_id: &str) -> Vec<pb::Touchpoint> {
    client
        .list_touchpoints(pb::ListTouchpointsRequest {
            customer_id: customer_id.to_owned(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .touchpoints
}

#[tokio::test]
async fn retries_and_repeats_are_stored_once() {
    let Some(database) = clm_tests::fresh_postgres_database("e2e_tp").await else {
        return;
    };
    let server = on_postgres(&database).await;
    let mut client = TouchpointServiceClient::new(server.channel().await);

    let batch: Vec<pb::Touchpoint> = (0..100)
        .map(|i| {
            touchpoint(
                &format!("retry-{i}"),
                by_email(&format!("r{}@example.com", i % 10)),
                "page_view",
            )
        })
        .collect();
    let first = record_batch(&mut client, batch.clone()).await;
    assert_eq!(first.stored_count, 100);
    for _ in 0..4 {
        let again = record_batch(&mut client, batch.clone()).await;
        assert_eq!((again.stored_count, again.duplicate_count), (0, 100));
        for (a, b) in first.results.iter().zip(&again.results) {
            assert_eq!(
                a.touchpoint_id, b.touchpoint_id,
                "a duplicate names the earlier touchpoint"
            );
        }
    }

    // The same event id twice in one batch.
    let twice = record_batch(
        &mut client,
        vec![
            touchpoint("dup-in-batch", by_email("d@example.com"), "page_view"),
            touchpoint("dup-in-batch", by_email("d@example.com"), "page_view"),
        ],
    )
    .await;
    assert_eq!(twice.results[0].status(), pb::RecordStatus::Stored);
    assert_eq!(twice.results[1].status(), pb::RecordStatus::Duplicate);
    assert_eq!(
        twice.results[0].touchpoint_id,
        twice.results[1].touchpoint_id
    );

    // Twenty concurrent clients with overlapping event ids.
    let mut tasks = Vec::new();
    for c in 0..20 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let batch: Vec<pb::Touchpoint> = (c * 10..c * 10 + 30)
                .map(|n| {
                    touchpoint(
                        &format!("overlap-{n}"),
                        by_email(&format!("o{}@example.com", n % 7)),
                        "content_view",
                    )
                })
                .collect();
            record_batch(&mut client, batch).await.stored_count
        }));
    }
    let mut stored = 0;
    for task in tasks {
        stored += task.await.unwrap();
    }
    let distinct = 19 * 10 + 30;
    assert_eq!(stored, distinct as i32);
    assert_eq!(
        wait_for_recorded(&mut client, 100 + 1 + distinct).await,
        100 + 1 + distinct
    );

    // A unary retry answers with the stored touchpoint and says so.
    let once = client
        .record_touchpoint(pb::RecordTouchpointRequest {
            touchpoint: Some(touchpoint(
                "unary-1",
                by_email("u@example.com"),
                "demo_request",
            )),
        })
        .await
        .unwrap()
        .into_inner();
    let again = client
        .record_touchpoint(pb::RecordTouchpointRequest {
            touchpoint: Some(touchpoint(
                "unary-1",
                by_email("u@example.com"),
                "demo_request",
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!once.duplicate && again.duplicate);
    assert_eq!(once.touchpoint.unwrap().id, again.touchpoint.unwrap().id);
}

#[tokio::test]
async fn a_bulk_load_killed_mid_stream_loses_and_doubles_nothing() {
    let Some(database) = clm_tests::fresh_postgres_database("e2e_tp").await else {
        return;
    };
    let env = [("CLM_DATABASE_URL", database.expose().to_owned())];
    let chunks: Vec<Vec<pb::Touchpoint>> = (0..40)
        .map(|c| {
            (0..500)
                .map(|i| {
                    let n = c * 500 + i;
                    touchpoint(
                        &format!("bulk-{n}"),
                        by_email(&format!("bulk{}@example.com", n % 50)),
                        "product_usage",
                    )
                })
                .collect()
        })
        .collect();
    let distinct = 40 * 500;

    let mut server = ClmServer::start(&["serve"], &env).await.unwrap();
    let mut client = TouchpointServiceClient::new(server.channel().await);
    let mut observer = client.clone();
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    let load = tokio::spawn(async move {
        client
            .stream_touchpoints(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
    });
    for chunk in chunks.iter().take(15) {
        sender
            .send(pb::StreamTouchpointsRequest {
                touchpoints: chunk.clone(),
            })
            .await
            .unwrap();
    }
    // Once some chunks have committed, kill the server without warning.
    let committed = wait_for_recorded(&mut observer, 1).await;
    assert!(committed > 0 && committed < distinct);
    server.signal("KILL");
    server
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("killed");
    drop(sender);
    assert!(load.await.unwrap().is_err(), "the interrupted stream fails");

    // A new server on the same database; the client resends everything.
    let server = ClmServer::start(&["serve"], &env).await.unwrap();
    let mut client = TouchpointServiceClient::new(server.channel().await);
    let summary = client
        .stream_touchpoints(futures_util::stream::iter(
            chunks
                .iter()
                .map(|chunk| pb::StreamTouchpointsRequest {
                    touchpoints: chunk.clone(),
                })
                .collect::<Vec<_>>(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.chunk_count, 40);
    assert_eq!(
        summary.stored_count + summary.duplicate_count,
        distinct as i64
    );
    assert!(
        summary.duplicate_count > 0,
        "some chunks had committed before the kill"
    );
    assert_eq!(summary.rejected_count, 0);
    assert_eq!(wait_for_recorded(&mut client, distinct).await, distinct);
}

#[tokio::test]
async fn merges_move_touchpoints_and_erasure_strips_properties() {
    let Some(database) = clm_tests::fresh_postgres_database("e2e_tp").await else {
        return;
    };
    let server = on_postgres(&database).await;
    let mut touchpoints = TouchpointServiceClient::new(server.channel().await);
    let mut identity = CustomerServiceClient::new(server.channel().await);

    let a = record_batch(
        &mut touchpoints,
        vec![
            touchpoint("a-1", by_email("ada@example.com"), "page_view"),
            touchpoint("a-2", by_email("ada@example.com"), "form_submit"),
        ],
    )
    .await;
    let b = record_batch(
        &mut touchpoints,
        vec![touchpoint(
            "b-1",
            by_email("lovelace@example.com"),
            "purchase",
        )],
    )
    .await;
    let ada = a.results[0].customer_id.clone();
    let other = b.results[0].customer_id.clone();
    assert_ne!(ada, other);

    identity
        .merge_customers(identity_pb::MergeCustomersRequest {
            survivor_id: ada.clone(),
            merged_id: other.clone(),
            reason: "same person".into(),
            requested_by: "e2e".into(),
        })
        .await
        .unwrap();
    // The identity log reaches touchpoints asynchronously.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while timeline(&mut touchpoints, &ada).await.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the merge never re-keyed the timeline"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(timeline(&mut touchpoints, &other).await.is_empty());
    // Touchpoints sent later for the merged id land on the survivor.
    let late = record_batch(
        &mut touchpoints,
        vec![touchpoint("b-2", by_id(&other), "renewal")],
    )
    .await;
    assert_eq!(late.results[0].customer_id, ada);

    identity
        .erase_customer(identity_pb::EraseCustomerRequest {
            customer_id: ada.clone(),
            reason: "gdpr".into(),
            requested_by: "e2e".into(),
        })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let list = timeline(&mut touchpoints, &ada).await;
        if list.iter().all(|t| t.properties.is_empty()) {
            assert_eq!(list.len(), 4, "touchpoints stay, without personal data");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the erasure never stripped properties"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The erased person cannot be tracked again by e-mail.
    let refused = touchpoints
        .record_touchpoint(pb::RecordTouchpointRequest {
            touchpoint: Some(touchpoint(
                "after-erase",
                by_email("ada@example.com"),
                "page_view",
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(
        details(&refused).1.as_deref(),
        Some("IDENTITY_KEY_SUPPRESSED")
    );
}

#[tokio::test]
async fn every_bad_field_is_named_and_nothing_is_stored() {
    let Some(database) = clm_tests::fresh_postgres_database("e2e_tp").await else {
        return;
    };
    let server = on_postgres(&database).await;
    let mut client = TouchpointServiceClient::new(server.channel().await);
    let good = || touchpoint("good", by_email("v@example.com"), "page_view");
    let far_future = prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + 3600,
        nanos: 0,
    };
    let cases: Vec<(pb::Touchpoint, &str, &str)> = vec![
        (
            pb::Touchpoint {
                channel: 99,
                ..good()
            },
            "touchpoints[0].channel",
            "UNKNOWN_VALUE",
        ),
        (
            pb::Touchpoint {
                r#type: String::new(),
                ..good()
            },
            "touchpoints[0].type",
            "REQUIRED",
        ),
        (
            pb::Touchpoint {
                r#type: "teleported".into(),
                ..good()
            },
            "touchpoints[0].type",
            "UNKNOWN_TYPE",
        ),
        (
            pb::Touchpoint {
                event_id: String::new(),
                ..good()
            },
            "touchpoints[0].event_id",
            "REQUIRED",
        ),
        (
            pb::Touchpoint {
                event_id: "x".repeat(129),
                ..good()
            },
            "touchpoints[0].event_id",
            "TOO_LONG",
        ),
        (
            pb::Touchpoint {
                occur_time: Some(far_future),
                ..good()
            },
            "touchpoints[0].occur_time",
            "OUT_OF_RANGE",
        ),
        (
            pb::Touchpoint {
                occur_time: Some(prost_types::Timestamp {
                    seconds: -10,
                    nanos: 0,
                }),
                ..good()
            },
            "touchpoints[0].occur_time",
            "OUT_OF_RANGE",
        ),
        (
            pb::Touchpoint {
                revenue: Some(Money {
                    currency_code: "EUR".into(),
                    amount_micros: -5,
                }),
                ..good()
            },
            "touchpoints[0].revenue.amount_micros",
            "NEGATIVE_AMOUNT",
        ),
        (
            pb::Touchpoint {
                cost: Some(Money {
                    currency_code: "XYZ".into(),
                    amount_micros: 5,
                }),
                ..good()
            },
            "touchpoints[0].cost.currency_code",
            "INVALID_CURRENCY",
        ),
        (
            pb::Touchpoint {
                properties: (0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect(),
                ..good()
            },
            "touchpoints[0].properties",
            "TOO_MANY_ENTRIES",
        ),
        (
            pb::Touchpoint {
                properties: [("note".to_owned(), "x".repeat(2000))].into(),
                ..good()
            },
            "touchpoints[0].properties[\"note\"]",
            "TOO_LONG",
        ),
        (
            pb::Touchpoint {
                properties: [("note".to_owned(), "a\u{0}b".to_owned())].into(),
                ..good()
            },
            "touchpoints[0].properties[\"note\"]",
            "INVALID_FORMAT",
        ),
        (
            pb::Touchpoint {
                campaign: "spring\u{202e}sale".into(),
                ..good()
            },
            "touchpoints[0].campaign",
            "INVALID_FORMAT",
        ),
        (
            pb::Touchpoint {
                customer: None,
                ..good()
            },
            "touchpoints[0].customer",
            "REQUIRED",
        ),
        (
            pb::Touchpoint {
                customer: by_id("not-a-uuid"),
                ..good()
            },
            "touchpoints[0].customer.customer_id",
            "INVALID_FORMAT",
        ),
        (
            pb::Touchpoint {
                customer: by_email("not an email"),
                ..good()
            },
            // Identity's own path (references[0]…) is not the caller's.
            "touchpoints[0].customer.identity_keys.keys[0].value",
            "INVALID_REFERENCE",
        ),
        (
            pb::Touchpoint {
                customer: by_id(&uuid::Uuid::now_v7().to_string()),
                ..good()
            },
            "touchpoints[0].customer",
            "CUSTOMER_NOT_FOUND",
        ),
    ];
    for (bad, field, reason) in cases.clone() {
        let response = record_batch(&mut client, vec![bad]).await;
        let result = &response.results[0];
        assert_eq!(result.status(), pb::RecordStatus::Rejected, "{field}");
        assert!(
            result
                .violations
                .iter()
                .any(|v| v.field == field && v.reason == reason),
            "expected {field} {reason}, got {:?}",
            result.violations
        );
    }
    // The unary call refuses each with a BadRequest naming the same field
    // under its own name, with the same reason.
    for (bad, field, reason) in cases {
        let status = client
            .record_touchpoint(pb::RecordTouchpointRequest {
                touchpoint: Some(bad),
            })
            .await
            .unwrap_err();
        if reason == "CUSTOMER_NOT_FOUND" {
            assert_eq!(status.code(), Code::NotFound, "{status:?}");
            assert_eq!(details(&status).1.as_deref(), Some(reason));
            continue;
        }
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        let unary_field = field.replacen("touchpoints[0]", "touchpoint", 1);
        assert!(
            clm_tests::violation_reasons(&status)
                .contains(&(unary_field.clone(), reason.to_owned())),
            "expected {unary_field} {reason}, got {:?}",
            clm_tests::violation_reasons(&status)
        );
    }
    // The largest batch allowed fits the default message size, with about
    // 1 KiB of properties on each touchpoint (10.5 MB in all).
    let full: Vec<pb::Touchpoint> = (0..10_000)
        .map(|i| pb::Touchpoint {
            event_id: format!("full-{i}"),
            properties: [("note".to_owned(), "n".repeat(1000))].into(),
            ..good()
        })
        .collect();
    let stored = client
        .record_touchpoints(pb::RecordTouchpointsRequest { touchpoints: full })
        .await
        .expect("a full batch of 10,000 touchpoints is accepted")
        .into_inner();
    assert_eq!(stored.stored_count, 10_000);
    // A batch over the limit is refused whole.
    let too_many = client
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: vec![good(); 10_001],
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::ResourceExhausted);
    // One bad item does not sink the others.
    let mixed = record_batch(
        &mut client,
        vec![
            good(),
            pb::Touchpoint {
                channel: 0,
                ..good()
            },
        ],
    )
    .await;
    assert_eq!((mixed.stored_count, mixed.rejected_count), (1, 1));
    assert_eq!(
        wait_for_recorded(&mut client, 10_001).await,
        10_001,
        "only the full batch and the good touchpoint were stored"
    );
}

#[tokio::test]
async fn once_erasure_returns_nothing_new_is_accepted_under_the_erased_keys() {
    let Some(database) = clm_tests::fresh_postgres_database("e2e_tp").await else {
        return;
    };
    let server = on_postgres(&database).await;
    let mut client = TouchpointServiceClient::new(server.channel().await);
    let mut identity = CustomerServiceClient::new(server.channel().await);
    for round in 0..5 {
        let email = format!("erased-{round}@example.com");
        // The first touchpoint creates the customer and puts the e-mail in
        // touchpoints' resolver cache.
        let first = client
            .record_touchpoint(pb::RecordTouchpointRequest {
                touchpoint: Some(touchpoint(
                    &format!("before-{round}"),
                    by_email(&email),
                    "page_view",
                )),
            })
            .await
            .expect("recorded")
            .into_inner()
            .touchpoint
            .unwrap();
        identity
            .erase_customer(identity_pb::EraseCustomerRequest {
                customer_id: first.customer_id.clone(),
                reason: "gdpr".into(),
                requested_by: "e2e".into(),
            })
            .await
            .unwrap();
        // At once, by key and by id, unary and in a batch.
        let unary = client
            .record_touchpoint(pb::RecordTouchpointRequest {
                touchpoint: Some(touchpoint(
                    &format!("after-{round}"),
                    by_email(&email),
                    "page_view",
                )),
            })
            .await
            .expect_err("refused right after the erasure");
        assert_eq!(unary.code(), Code::FailedPrecondition, "{unary:?}");
        assert_eq!(
            details(&unary).1.as_deref(),
            Some("IDENTITY_KEY_SUPPRESSED")
        );
        let batch = record_batch(
            &mut client,
            vec![
                touchpoint(&format!("batch-key-{round}"), by_email(&email), "page_view"),
                touchpoint(
                    &format!("batch-id-{round}"),
                    by_id(&first.customer_id),
                    "page_view",
                ),
            ],
        )
        .await;
        assert_eq!(batch.rejected_count, 2, "{batch:?}");
        assert_eq!(
            batch.results[0].violations[0].reason,
            "IDENTITY_KEY_SUPPRESSED"
        );
        assert_eq!(batch.results[1].violations[0].reason, "CUSTOMER_ERASED");
    }
    assert_eq!(
        wait_for_recorded(&mut client, 5).await,
        5,
        "only the first of each round"
    );
}

#[tokio::test]
async fn identity_down_means_unavailable_and_nothing_stored() {
    let Some(database) = clm_tests::fresh_postgres_database("e2e_tp").await else {
        return;
    };
    let dead = format!("http://127.0.0.1:{}", clm_tests::free_port());
    let server = ClmServer::start(
        &["serve", "touchpoints"],
        &[
            ("CLM_DATABASE_URL", database.expose().to_owned()),
            ("CLM_IDENTITY_URL", dead),
            ("CLM_IDENTITY_TIMEOUT_MS", "500".to_owned()),
        ],
    )
    .await
    .unwrap();
    let mut client = TouchpointServiceClient::new(server.channel().await);
    let refused = client
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: vec![
                touchpoint("down-1", by_email("down@example.com"), "page_view"),
                touchpoint(
                    "down-2",
                    by_id(&uuid::Uuid::now_v7().to_string()),
                    "page_view",
                ),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(
        details(&refused).1.as_deref(),
        Some("DEPENDENCY_UNAVAILABLE")
    );
    // Give a wrongly committed write the time to become visible, then count.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(recorded_count(&mut client).await, 0);
}
