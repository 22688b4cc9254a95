//! One conformance suite for the touchpoint store, run against SQLite and
//! PostgreSQL alike.

#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{Duration as TimeDelta, SubsecRound as _, Utc};
use clm_eventlog::consumer::cursors::CursorMove;
use clm_eventlog::{Cursor, ShardFilter, shard_of};
use clm_platform::Secret;
use clm_platform::db;
use clm_touchpoints::model::{
    CustomerChange, LogEntry, Merge, Money, Stored, TimelineQuery, Touchpoint,
};
use clm_touchpoints::store::{self, StoreError, TouchpointStore};
use uuid::Uuid;

struct Backend {
    store: Arc<dyn TouchpointStore>,
    pools: db::Pools,
    _dir: Option<tempfile::TempDir>,
}

async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let url = Secret::new(format!("sqlite://{}/touchpoints.db", dir.path().display()));
    let pools = db::connect(&url, "touchpoints", 4).await.unwrap();
    store::MIGRATIONS.run(&pools).await.unwrap();
    Backend {
        store: store::open(pools.clone()),
        pools,
        _dir: Some(dir),
    }
}

async fn postgres() -> Option<Backend> {
    let url = clm_platform::testing::fresh_postgres_database("touchpoints").await?;
    let pools = db::connect(&url, "touchpoints", 8).await.unwrap();
    store::MIGRATIONS.run(&pools).await.unwrap();
    Some(Backend {
        store: store::open(pools.clone()),
        pools,
        _dir: None,
    })
}

fn now() -> chrono::DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn touchpoint(event_id: &str, customer_id: Uuid, kind: &str, minutes_ago: i64) -> Touchpoint {
    Touchpoint {
        id: Uuid::now_v7(),
        event_id: event_id.to_owned(),
        customer_id,
        channel: 1,
        kind: kind.to_owned(),
        occurred_at: now() - TimeDelta::minutes(minutes_ago),
        recorded_at: now(),
        campaign: "spring".into(),
        utm_source: "google".into(),
        utm_medium: "cpc".into(),
        properties: Some(BTreeMap::from([(
            "email".to_owned(),
            "ada@example.com".to_owned(),
        )])),
        revenue: (kind == "purchase").then(|| Money {
            currency: "EUR".into(),
            micros: 19_990_000,
        }),
        cost: None,
    }
}

/// The move of the test consumer's cursor from `expected` to `new`.
fn moved(expected: &str, new: &str) -> CursorMove {
    CursorMove {
        consumer: "test",
        shard: ShardFilter::ALL,
        expected: expected.to_owned(),
        new: new.to_owned(),
        fence: Default::default(),
    }
}

/// Log entries are readable once older transactions ended; waits for `count`.
async fn log_when(store: &dyn TouchpointStore, count: usize) -> Vec<(Cursor, LogEntry)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entries = store
            .read_log(Cursor::START, ShardFilter::ALL, 10_000)
            .await
            .unwrap();
        if entries.len() >= count || tokio::time::Instant::now() > deadline {
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn an_event_id_is_stored_once(backend: Backend) {
    let ada = Uuid::now_v7();
    let first = vec![
        touchpoint("e-1", ada, "page_view", 3),
        touchpoint("e-2", ada, "purchase", 2),
    ];
    let outcomes = backend.store.insert(&first).await.unwrap();
    assert!(
        matches!(outcomes[0], Stored::New { id, customer_id } if id == first[0].id && customer_id == ada)
    );
    // A replay of the batch, with one new event: only the new one is stored.
    let mut replay = vec![
        touchpoint("e-1", ada, "page_view", 3),
        touchpoint("e-3", ada, "renewal", 1),
    ];
    replay[0].id = Uuid::now_v7();
    let outcomes = backend.store.insert(&replay).await.unwrap();
    assert_eq!(
        outcomes[0],
        Stored::Duplicate {
            id: first[0].id,
            customer_id: ada
        }
    );
    assert!(matches!(outcomes[1], Stored::New { .. }));
    let stored = backend
        .store
        .find_by_event_id("e-2")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored, first[1]);
    assert_eq!(backend.store.find_by_event_id("nope").await.unwrap(), None);
}

async fn concurrent_overlapping_batches_store_each_event_once(backend: Backend) {
    let customer = Uuid::now_v7();
    let mut tasks = Vec::new();
    for client in 0..20 {
        let store = backend.store.clone();
        tasks.push(tokio::spawn(async move {
            // Each client sends 50 events, half of them shared with the next client.
            let batch: Vec<Touchpoint> = (client * 25..client * 25 + 50)
                .map(|n| touchpoint(&format!("ov-{n}"), customer, "page_view", 1))
                .collect();
            store.insert(&batch).await.unwrap()
        }));
    }
    let mut new = 0;
    for task in tasks {
        new += task
            .await
            .unwrap()
            .iter()
            .filter(|o| matches!(o, Stored::New { .. }))
            .count();
    }
    let distinct = 19 * 25 + 50;
    assert_eq!(new, distinct);
    assert_eq!(
        log_when(backend.store.as_ref(), distinct).await.len(),
        distinct
    );
}

async fn the_timeline_is_newest_first_filtered_and_paged(backend: Backend) {
    let ada = Uuid::now_v7();
    let other = Uuid::now_v7();
    let mut all = Vec::new();
    for i in 0..12 {
        let kind = if i % 3 == 0 { "purchase" } else { "page_view" };
        all.push(touchpoint(&format!("t-{i}"), ada, kind, 100 - i));
    }
    all.push(touchpoint("other", other, "page_view", 1));
    backend.store.insert(&all).await.unwrap();
    let query = |f: &dyn Fn(&mut TimelineQuery)| {
        let mut q = TimelineQuery {
            customer_id: ada,
            limit: 100,
            ..TimelineQuery::default()
        };
        f(&mut q);
        q
    };
    let page = backend.store.timeline(&query(&|_| {})).await.unwrap();
    let events: Vec<&str> = page.iter().map(|t| t.event_id.as_str()).collect();
    assert_eq!(events.first(), Some(&"t-11"));
    assert_eq!(events.len(), 12);
    assert_eq!(
        page[0].properties.as_ref().unwrap()["email"],
        "ada@example.com"
    );

    let first = backend
        .store
        .timeline(&query(&|q| q.limit = 5))
        .await
        .unwrap();
    let last = first.last().unwrap();
    let second = backend
        .store
        .timeline(&query(&|q| {
            q.limit = 5;
            q.after = Some((last.occurred_at, last.id));
        }))
        .await
        .unwrap();
    assert_eq!(second[0].event_id, "t-6");
    let purchases = backend
        .store
        .timeline(&query(&|q| q.types = vec!["purchase".into()]))
        .await
        .unwrap();
    assert_eq!(purchases.len(), 4);
    let none = backend
        .store
        .timeline(&query(&|q| q.channels = vec![2]))
        .await
        .unwrap();
    assert!(none.is_empty());
    let window = backend
        .store
        .timeline(&query(&|q| {
            q.start = Some(now() - TimeDelta::minutes(95));
            q.end = Some(now() - TimeDelta::minutes(90));
        }))
        .await
        .unwrap();
    assert_eq!(window.len(), 5);

    let counts = backend
        .store
        .count_by_type(ada, None, None, &[])
        .await
        .unwrap();
    assert_eq!(
        counts
            .iter()
            .map(|c| (c.kind.as_str(), c.count))
            .collect::<Vec<_>>(),
        [("page_view", 8), ("purchase", 4)]
    );
    let counts = backend
        .store
        .count_by_type(ada, None, None, &["purchase".into()])
        .await
        .unwrap();
    assert_eq!(counts.len(), 1);
}

async fn merges_rekey_and_erasures_strip(backend: Backend) {
    let survivor = Uuid::now_v7();
    let merged = Uuid::now_v7();
    backend
        .store
        .insert(&[
            touchpoint("s-1", survivor, "page_view", 5),
            touchpoint("m-1", merged, "purchase", 4),
        ])
        .await
        .unwrap();
    let merge = CustomerChange::Merged(Merge {
        merge_id: Uuid::now_v7(),
        merged_id: merged,
        survivor_id: survivor,
        merged_at: now(),
    });
    backend
        .store
        .apply_customer_changes(std::slice::from_ref(&merge), &moved("", "0-7"))
        .await
        .unwrap();
    assert_eq!(
        backend
            .store
            .saved_cursor("test", ShardFilter::ALL)
            .await
            .unwrap(),
        "0-7"
    );
    // A second writer that read the cursor before it moved cannot apply
    // the batch again.
    let stale = backend
        .store
        .apply_customer_changes(std::slice::from_ref(&merge), &moved("", "0-7"))
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");
    // Applying the same merge again (a redelivery) changes nothing.
    backend
        .store
        .apply_customer_changes(&[merge], &moved("0-7", "0-8"))
        .await
        .unwrap();
    let timeline = backend
        .store
        .timeline(&TimelineQuery {
            customer_id: survivor,
            limit: 10,
            ..TimelineQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(timeline.len(), 2, "the merged customer's touchpoint moved");
    // A late touchpoint for the merged id lands on the survivor.
    let late = backend
        .store
        .insert(&[touchpoint("m-2", merged, "page_view", 1)])
        .await
        .unwrap();
    assert!(matches!(late[0], Stored::New { customer_id, .. } if customer_id == survivor));

    backend
        .store
        .apply_customer_changes(
            &[CustomerChange::Erased {
                customer_id: survivor,
                erased_at: now(),
            }],
            &moved("0-8", "0-9"),
        )
        .await
        .unwrap();
    let stripped = backend
        .store
        .timeline(&TimelineQuery {
            customer_id: survivor,
            limit: 10,
            ..TimelineQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(stripped.len(), 3);
    assert!(
        stripped.iter().all(|t| t.properties.is_none()),
        "personal properties are gone"
    );
    assert!(
        stripped.iter().any(|t| t.revenue.is_some()),
        "revenue stays for metrics"
    );
    let after = backend
        .store
        .insert(&[touchpoint("late-erased", survivor, "page_view", 0)])
        .await
        .unwrap();
    assert!(matches!(after[0], Stored::New { .. }));
    assert!(
        backend
            .store
            .find_by_event_id("late-erased")
            .await
            .unwrap()
            .unwrap()
            .properties
            .is_none()
    );

    let log = log_when(backend.store.as_ref(), 6).await;
    let changes = log
        .iter()
        .filter(|(_, e)| matches!(e, LogEntry::Change { .. }))
        .count();
    assert_eq!(changes, 2, "one re-key and one strip entry");
    // The re-keyed purchase keeps its shard: a consumer of the survivor's
    // shard that had not reached it yet does not read it as the survivor's.
    let merged_shard = shard_of(Some(merged)) as u32 % 4;
    let survivor_shard = shard_of(Some(survivor)) as u32 % 4;
    for (index, expected) in [
        (merged_shard, true),
        (survivor_shard, merged_shard == survivor_shard),
    ] {
        let entries = backend
            .store
            .read_log(
                Cursor::START,
                ShardFilter::new("shard", index, 4).unwrap(),
                100,
            )
            .await
            .unwrap();
        let has_purchase = entries.iter().any(|(_, e)| {
            matches!(e, LogEntry::Recorded(t) if t.event_id == "m-1" && t.customer_id == survivor)
        });
        assert_eq!(has_purchase, expected, "shard {index}");
    }
    assert!(log.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(
        log.iter().all(|(_, e)| match e {
            LogEntry::Recorded(t) => t.properties.is_none(),
            LogEntry::Change { .. } => true,
        }),
        "the log never carries properties"
    );
}

async fn the_log_is_sharded_by_customer(backend: Backend) {
    let customers: Vec<Uuid> = (0..8).map(|_| Uuid::now_v7()).collect();
    let batch: Vec<Touchpoint> = customers
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            (0..3).map(move |j| touchpoint(&format!("sh-{i}-{j}"), *c, "page_view", 1))
        })
        .collect();
    backend.store.insert(&batch).await.unwrap();
    let all = log_when(backend.store.as_ref(), batch.len()).await;
    let mut union = Vec::new();
    for index in 0..4 {
        let shard = ShardFilter::new("shard", index, 4).unwrap();
        let part = backend
            .store
            .read_log(Cursor::START, shard, 1000)
            .await
            .unwrap();
        union.extend(part);
    }
    union.sort_by_key(|(c, _)| *c);
    assert_eq!(union, all);
    // Paging through the log with small batches sees every entry once.
    let mut cursor = Cursor::START;
    let mut seen = 0;
    loop {
        let page = backend
            .store
            .read_log(cursor, ShardFilter::ALL, 5)
            .await
            .unwrap();
        let Some((last, _)) = page.last() else { break };
        cursor = *last;
        seen += page.len();
    }
    assert_eq!(seen, batch.len());
}

/// Every field comes back as it went in, from a batch of new event ids (the
/// fast path on PostgreSQL) and from one that holds a duplicate too.
async fn every_field_is_kept_whether_or_not_the_batch_holds_a_duplicate(backend: Backend) {
    let ada = Uuid::now_v7();
    let full = |event_id: &str| {
        let mut t = touchpoint(event_id, ada, "purchase", 0);
        t.channel = 7;
        // Before the PostgreSQL epoch, to the microsecond.
        t.occurred_at = chrono::DateTime::from_timestamp_micros(946_684_799_999_999).unwrap();
        t.campaign = "Ünïcode «spring»".into();
        t.utm_source = String::new();
        t.properties = Some(BTreeMap::from([
            ("path".to_owned(), "/p/\"quoted\"\\".to_owned()),
            ("emoji".to_owned(), "🎉".to_owned()),
        ]));
        t.revenue = Some(Money {
            currency: "JPY".into(),
            micros: i64::MAX / 2,
        });
        t.cost = Some(Money {
            currency: "EUR".into(),
            micros: 0,
        });
        t
    };
    let fresh = vec![full("f-1"), touchpoint("f-2", ada, "page_view", 1)];
    let outcomes = backend.store.insert(&fresh).await.unwrap();
    assert!(outcomes.iter().all(|o| matches!(o, Stored::New { .. })));
    let mut plain = touchpoint("f-3", ada, "page_view", 2);
    plain.properties = None;
    let mixed = vec![full("f-4"), fresh[1].clone(), plain];
    let outcomes = backend.store.insert(&mixed).await.unwrap();
    assert!(matches!(outcomes[0], Stored::New { .. }));
    assert_eq!(
        outcomes[1],
        Stored::Duplicate {
            id: fresh[1].id,
            customer_id: ada
        }
    );
    assert!(matches!(outcomes[2], Stored::New { .. }));
    for expected in [&fresh[0], &fresh[1], &mixed[0], &mixed[2]] {
        let stored = backend
            .store
            .find_by_event_id(&expected.event_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&stored, expected);
    }
    assert_eq!(log_when(backend.store.as_ref(), 4).await.len(), 4);
}

clm_platform::on_both_backends!(
    sqlite: super::sqlite, postgres: super::postgres;
    an_event_id_is_stored_once,
    concurrent_overlapping_batches_store_each_event_once,
    the_timeline_is_newest_first_filtered_and_paged,
    merges_rekey_and_erasures_strip,
    the_log_is_sharded_by_customer,
    every_field_is_kept_whether_or_not_the_batch_holds_a_duplicate,
);

/// PostgreSQL only: a writer that took its transaction id and sequence value
/// first but commits last is still handed out, in order, and nothing after
/// it is handed out before it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_log_waits_for_a_late_commit() {
    let Some(backend) = postgres().await else {
        return;
    };
    let db::Pools::Postgres(pool) = &backend.pools else {
        panic!("expected postgres")
    };
    let customer = Uuid::now_v7();
    let mut slow = pool.begin().await.unwrap();
    // The slow writer's change entry: a re-key logged while its transaction stays open.
    sqlx::query(
        "INSERT INTO touchpoint_changes (event_id, customer_id, shard, kind, payload, recorded_at) \
         VALUES ($1, $2, 0, 'touchpoints.rekeyed', '\\x'::bytea, now())",
    )
    .bind(Uuid::now_v7())
    .bind(customer)
    .execute(&mut *slow)
    .await
    .unwrap();
    backend
        .store
        .insert(&[touchpoint("fast-1", customer, "page_view", 1)])
        .await
        .unwrap();
    backend
        .store
        .insert(&[touchpoint("fast-2", customer, "page_view", 1)])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let early = backend
        .store
        .read_log(Cursor::START, ShardFilter::ALL, 100)
        .await
        .unwrap();
    assert!(
        early.is_empty(),
        "nothing may pass the open transaction: {early:?}"
    );
    slow.commit().await.unwrap();
    let all = log_when(backend.store.as_ref(), 3).await;
    assert_eq!(all.len(), 3);
    assert!(
        matches!(all[0].1, LogEntry::Change { .. }),
        "the early writer comes first"
    );
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
}
