//! A statement on the pools `db::connect` opens keeps reading by index once
//! its table has grown. After five calls PostgreSQL may keep a generic plan
//! for a prepared statement; one made while a table was small (a sequential
//! scan) would otherwise stay cached on the connection and scan the table
//! once it has grown, until the next ANALYZE: a service's tables start
//! empty and grow under load.

#![allow(missing_docs)]

use std::time::Duration;

use clm_platform::db::{self, Pools};
use sqlx::Connection as _;

#[tokio::test]
async fn a_lookup_is_not_stuck_with_a_plan_made_for_a_small_table() {
    let Some(url) = clm_platform::testing::fresh_postgres_database("plans").await else {
        return;
    };
    let Pools::Postgres(pool) = db::connect(&url, "public", 1).await.expect("connect") else {
        panic!("a postgres URL opens PostgreSQL pools");
    };
    let mut connection = pool.acquire().await.unwrap();
    sqlx::query("CREATE TABLE lookups (key TEXT PRIMARY KEY, payload TEXT NOT NULL)")
        .execute(&mut *connection)
        .await
        .unwrap();
    sqlx::query("INSERT INTO lookups SELECT 'small-' || n, 'x' FROM generate_series(1, 10) n")
        .execute(&mut *connection)
        .await
        .unwrap();
    sqlx::query("ANALYZE lookups")
        .execute(&mut *connection)
        .await
        .unwrap();
    const LOOKUP: &str = "SELECT payload FROM lookups WHERE key = ANY($1)";
    let lookup = |key: String| {
        let pool = pool.clone();
        async move {
            let mut connection = pool.acquire().await.unwrap();
            sqlx::query_scalar::<_, String>(LOOKUP)
                .bind(vec![key])
                .fetch_all(&mut *connection)
                .await
                .unwrap()
        }
    };
    drop(connection);
    // Enough calls on the small table for PostgreSQL to settle on a plan.
    for n in 1..=10 {
        assert_eq!(lookup(format!("small-{n}")).await, ["x"]);
    }
    let mut connection = pool.acquire().await.unwrap();
    sqlx::query("INSERT INTO lookups SELECT 'grown-' || n, 'y' FROM generate_series(1, 100000) n")
        .execute(&mut *connection)
        .await
        .unwrap();
    // (sequential scans, index scans) of the table, read by another
    // connection once the pool's one connection has flushed its counters.
    let scans = || async {
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(&pool)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut other = sqlx::PgConnection::connect(url.expose()).await.unwrap();
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT seq_scan, COALESCE(idx_scan, 0) FROM pg_stat_user_tables \
             WHERE relname = 'lookups'",
        )
        .fetch_one(&mut other)
        .await
        .unwrap()
    };
    drop(connection);
    let before = scans().await;
    for n in [1, 50_000, 100_000] {
        assert_eq!(lookup(format!("grown-{n}")).await, ["y"]);
    }
    let mut after = scans().await;
    for _ in 0..10 {
        if after.0 + after.1 >= before.0 + before.1 + 3 {
            break;
        }
        after = scans().await;
    }
    assert_eq!(
        after.0, before.0,
        "no lookup scanned the grown table: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.1,
        before.1 + 3,
        "each lookup read the key index: {before:?} -> {after:?}"
    );
}

/// A statement whose only way is a sequential scan (a one-row table
/// without an index) carries the cost that rules scans out elsewhere; it
/// must not be compiled for it (JIT took 150 ms for 0.1 ms of work).
#[tokio::test]
async fn a_statement_that_must_scan_is_not_compiled() {
    let Some(url) = clm_platform::testing::fresh_postgres_database("plans").await else {
        return;
    };
    let Pools::Postgres(pool) = db::connect(&url, "public", 1).await.expect("connect") else {
        panic!("a postgres URL opens PostgreSQL pools");
    };
    sqlx::query("CREATE TABLE settings (name TEXT NOT NULL, value TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO settings VALUES ('active', 'v1')")
        .execute(&pool)
        .await
        .unwrap();
    let plan: Vec<String> =
        sqlx::query_scalar("EXPLAIN ANALYZE SELECT value FROM settings WHERE name = 'active'")
            .fetch_all(&pool)
            .await
            .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("Seq Scan"), "the one way is a scan:\n{plan}");
    assert!(
        !plan.contains("JIT"),
        "the statement was not compiled:\n{plan}"
    );
}
