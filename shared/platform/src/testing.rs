//! Support for tests that need a real PostgreSQL or Redis server.
//!
//! The servers are found through `CLM_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `CLM_TEST_REDIS_URL`
//! (default `redis://127.0.0.1:6379/`). When one cannot be reached the test
//! fails if `CI=true` or `CLM_TEST_REQUIRE_SERVERS=1` (the test command sets
//! it), and otherwise says loudly that it did not run.

use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;

use crate::secret::Secret;

fn servers_required() -> bool {
    let truthy = |name: &str| {
        std::env::var(name)
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
            .unwrap_or(false)
    };
    truthy("CI") || truthy("CLM_TEST_REQUIRE_SERVERS")
}

fn unreachable(what: &str, detail: &str) -> Option<Secret> {
    if servers_required() {
        panic!("{what} is required for this test but unreachable: {detail}");
    }
    eprintln!("NOT RUN: {what} unreachable ({detail}); set CI=true to make this a failure");
    None
}

/// A fresh, empty PostgreSQL database for one test, named
/// `clm_test_<prefix>_<16 hex digits>` (the test script drops those). `None` only outside CI when no server runs.
pub async fn fresh_postgres_database(prefix: &str) -> Option<Secret> {
    let admin_url = std::env::var("CLM_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let options = match PgConnectOptions::from_str(&admin_url) {
        Ok(options) => options,
        Err(err) => return unreachable("PostgreSQL", &format!("bad CLM_TEST_DATABASE_URL: {err}")),
    };
    let connect = tokio::time::timeout(Duration::from_secs(5), options.clone().connect()).await;
    let mut admin = match connect {
        Ok(Ok(connection)) => connection,
        Ok(Err(err)) => return unreachable("PostgreSQL", &err.to_string()),
        Err(_) => return unreachable("PostgreSQL", "connection timed out"),
    };
    let name = format!(
        "clm_test_{prefix}_{}",
        uuid::Uuid::now_v7()
            .simple()
            .to_string()
            .chars()
            .rev()
            .take(16)
            .collect::<String>()
    );
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    let url = options.database(&name).to_url_lossy();
    Some(Secret::new(url.to_string()))
}

/// The URL of a reachable Redis server, after a PING. `None` only outside CI
/// when no server runs.
pub async fn redis_url() -> Option<Secret> {
    let url = std::env::var("CLM_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned());
    let client = match redis::Client::open(url.as_str()) {
        Ok(client) => client,
        Err(err) => return unreachable("Redis", &err.to_string()),
    };
    let ping = async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    match tokio::time::timeout(Duration::from_secs(5), ping).await {
        Ok(Ok(_)) => Some(Secret::new(url)),
        Ok(Err(err)) => unreachable("Redis", &err.to_string()),
        Err(_) => unreachable("Redis", "connection timed out"),
    }
}

/// Runs each listed test function, `async fn name(backend: Backend)`,
/// against SQLite and against PostgreSQL: `sqlite` and `postgres` name the
/// functions that make a backend (`postgres` returns an `Option`, `None`
/// only outside CI when no server runs). The tests land in the modules
/// `sqlite_store` and `postgres_store`.
///
/// ```text
/// clm_platform::on_both_backends!(sqlite: super::sqlite, postgres: super::postgres;
///     an_event_id_is_stored_once,
///     merges_rekey_and_erasures_strip,
/// );
/// ```
#[macro_export]
macro_rules! on_both_backends {
    (sqlite: $sqlite:path, postgres: $postgres:path; $($name:ident),* $(,)?) => {
        mod sqlite_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($sqlite().await).await;
                }
            )*
        }
        mod postgres_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(backend) = $postgres().await else { return };
                    super::$name(backend).await;
                }
            )*
        }
    };
}
