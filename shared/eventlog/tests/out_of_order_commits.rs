//! The log tail never skips an entry when concurrent writers commit out of
//! order: a transaction holds an early entry open while later transactions
//! commit theirs, and the consumer still gets every entry, in order, once.

#![allow(missing_docs)]

use std::time::Duration;

use chrono::Utc;
use clm_eventlog::{Cursor, Entry, EventLog, NewEntry, ShardFilter};
use clm_platform::db::{self, Pools};
use clm_platform::server::Shutdown;
use futures_util::StreamExt as _;
use uuid::Uuid;

const TABLE_DDL: &str = "CREATE TABLE test_events (
    seq BIGSERIAL PRIMARY KEY,
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id UUID NOT NULL,
    customer_id UUID,
    shard INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload BYTEA NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL)";

fn entry(kind: &str) -> NewEntry<'_> {
    NewEntry {
        event_id: Uuid::now_v7(),
        customer_id: Some(Uuid::now_v7()),
        kind,
        payload: kind.as_bytes(),
        recorded_at: Utc::now(),
    }
}

/// A fresh database holding the indexed log table, its pool and the log
/// (polling every 20 ms); `None` where no PostgreSQL server is configured.
async fn indexed_log() -> Option<(sqlx::PgPool, EventLog)> {
    let url = clm_platform::testing::fresh_postgres_database("eventlog").await?;
    let pools = db::connect(&url, "public", 8).await.unwrap();
    let Pools::Postgres(pool) = &pools else {
        panic!("expected postgres")
    };
    sqlx::query(TABLE_DDL).execute(pool).await.unwrap();
    sqlx::query("CREATE INDEX test_events_order ON test_events (txid, seq)")
        .execute(pool)
        .await
        .unwrap();
    let pool = pool.clone();
    Some((
        pool,
        EventLog::new(pools, "test_events").with_poll_interval(Duration::from_millis(20)),
    ))
}

async fn next_batch(
    stream: &mut (impl futures_util::Stream<Item = Result<Vec<Entry>, sqlx::Error>> + Unpin),
) -> Vec<Entry> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a batch arrives")
        .expect("the stream is open")
        .expect("the read succeeds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_commit_of_an_early_entry_is_not_skipped() {
    let Some((pool, log)) = indexed_log().await else {
        return;
    };
    let pool = &pool;
    let mut tail = Box::pin(log.tail(Cursor::START, ShardFilter::ALL, 100, false, Shutdown::new()));

    // The slow writer takes its transaction id and its sequence value first…
    let mut slow = pool.begin().await.unwrap();
    log.append_postgres(&mut slow, &entry("early"))
        .await
        .unwrap();

    // …while later writers commit.
    for kind in ["later-1", "later-2"] {
        let mut tx = pool.begin().await.unwrap();
        log.append_postgres(&mut tx, &entry(kind)).await.unwrap();
        tx.commit().await.unwrap();
    }
    // Nothing is handed out past the open transaction.
    let held = tokio::time::timeout(Duration::from_millis(300), tail.next()).await;
    assert!(
        held.is_err(),
        "entries behind an open transaction must wait, got {held:?}"
    );

    slow.commit().await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.extend(next_batch(&mut tail).await);
    }
    let kinds: Vec<&str> = seen.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["early", "later-1", "later-2"]);
    assert!(seen.windows(2).all(|w| w[0].cursor < w[1].cursor));

    // The slow writer's sequence value is the smallest, yet a consumer that
    // had stopped after "later-2" resumes without seeing anything twice.
    let resumed = log
        .read_after(seen[2].cursor, ShardFilter::ALL, 100)
        .await
        .unwrap();
    assert!(resumed.is_empty());
    let mut tx = pool.begin().await.unwrap();
    log.append_postgres(&mut tx, &entry("after")).await.unwrap();
    tx.commit().await.unwrap();
    let batch = next_batch(&mut tail).await;
    assert_eq!(
        batch.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["after"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_writers_lose_nothing() {
    let Some(url) = clm_platform::testing::fresh_postgres_database("eventlog").await else {
        return;
    };
    let pools = db::connect(&url, "public", 16).await.unwrap();
    let Pools::Postgres(pool) = &pools else {
        panic!("expected postgres")
    };
    sqlx::query(TABLE_DDL).execute(pool).await.unwrap();
    let log =
        EventLog::new(pools.clone(), "test_events").with_poll_interval(Duration::from_millis(10));
    let consumer = {
        let log = log.clone();
        tokio::spawn(async move {
            let mut tail =
                Box::pin(log.tail(Cursor::START, ShardFilter::ALL, 50, false, Shutdown::new()));
            let mut seen = Vec::new();
            while seen.len() < 400 {
                seen.extend(next_batch(&mut tail).await);
            }
            seen
        })
    };
    let mut writers = Vec::new();
    for writer in 0..8 {
        let pool = pool.clone();
        let log = log.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..50 {
                let mut tx = pool.begin().await.unwrap();
                let kind = format!("{writer}-{i}");
                log.append_postgres(&mut tx, &entry(&kind)).await.unwrap();
                // Random hold times make commits overtake each other.
                tokio::time::sleep(Duration::from_micros(u64::from(rand_delay(writer, i)))).await;
                tx.commit().await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let seen = consumer.await.unwrap();
    assert_eq!(seen.len(), 400);
    let mut kinds: Vec<&str> = seen.iter().map(|e| e.kind.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(kinds.len(), 400, "every entry once");
    assert!(seen.windows(2).all(|w| w[0].cursor < w[1].cursor));
}

fn rand_delay(writer: u32, i: u32) -> u32 {
    (writer * 7919 + i * 104_729) % 3000
}

#[tokio::test]
async fn sqlite_hands_out_entries_in_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    let url = clm_platform::Secret::new(format!("sqlite://{}/log.db", dir.path().display()));
    let pools = db::connect(&url, "main", 2).await.unwrap();
    let Pools::Sqlite(sqlite) = &pools else {
        panic!("expected sqlite")
    };
    sqlx::query(
        "CREATE TABLE test_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, customer_id TEXT, \
         shard INTEGER NOT NULL, kind TEXT NOT NULL, payload BLOB NOT NULL, recorded_at INTEGER NOT NULL)",
    )
    .execute(&sqlite.writer)
    .await
    .unwrap();
    let log = EventLog::new(pools.clone(), "test_events");
    for kind in ["a", "b", "c"] {
        let mut tx = sqlite.writer.begin().await.unwrap();
        log.append_sqlite(&mut tx, &entry(kind)).await.unwrap();
        tx.commit().await.unwrap();
    }
    let entries = log
        .read_after(Cursor::START, ShardFilter::ALL, 10)
        .await
        .unwrap();
    assert_eq!(
        entries.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    let cursor = Cursor::parse("after_cursor", &entries[0].cursor.to_string()).unwrap();
    assert_eq!(cursor, entries[0].cursor);
    assert_eq!(
        log.read_after(cursor, ShardFilter::ALL, 10)
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(Cursor::parse("after_cursor", "nonsense").is_err());
}

/// A tail that stops at the end still hands out every entry committed
/// before it was opened while an older transaction, anywhere on the
/// server, holds the readable horizon back: it waits for that transaction
/// instead of ending with nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tail_to_the_end_waits_for_older_open_transactions() {
    let Some((pool, log)) = indexed_log().await else {
        return;
    };
    let pool = &pool;
    // Another writer's transaction, unrelated to the log, takes its id
    // first and stays open.
    let mut other = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *other)
        .await
        .unwrap();
    for kind in ["first", "second"] {
        let mut tx = pool.begin().await.unwrap();
        log.append_postgres(&mut tx, &entry(kind)).await.unwrap();
        tx.commit().await.unwrap();
    }
    let tail = log.tail(Cursor::START, ShardFilter::ALL, 100, true, Shutdown::new());
    let reading = tokio::spawn(async move {
        let batches: Vec<_> = tail.collect().await;
        batches
            .into_iter()
            .flat_map(|batch| batch.expect("the read succeeds"))
            .map(|entry| entry.kind)
            .collect::<Vec<_>>()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !reading.is_finished(),
        "the tail waits for the open transaction"
    );
    other.rollback().await.unwrap();
    let kinds = tokio::time::timeout(Duration::from_secs(10), reading)
        .await
        .expect("the tail ends once the transaction is over")
        .unwrap();
    assert_eq!(kinds, ["first", "second"]);
}
