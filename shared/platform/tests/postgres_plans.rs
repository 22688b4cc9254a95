//! Statements on the pools `db::connect` opens are planned for the values
//! of each call. A generic plan made while a table was small (a sequential
//! scan) would otherwise stay cached on the connection and scan the table
//! once it has grown, until the next ANALYZE: a service's tables start
//! empty and grow under load.

#![allow(missing_docs)]

use clm_platform::db::{self, Pools};

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
    for n in 0..10 {
        let keys = vec![format!("small-{n}")];
        sqlx::query_scalar::<_, String>(LOOKUP)
            .bind(&keys)
            .fetch_all(&mut *connection)
            .await
            .unwrap();
    }
    let (generic, custom): (i64, i64) = sqlx::query_as(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1",
    )
    .bind(LOOKUP)
    .fetch_one(&mut *connection)
    .await
    .unwrap();
    assert_eq!(
        (generic, custom),
        (0, 10),
        "every execution is planned for its own values"
    );
}
