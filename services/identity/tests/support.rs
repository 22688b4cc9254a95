//! Opens a fresh identity store on SQLite or PostgreSQL for one test.

#![allow(dead_code, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use clm_identity::directory::CustomerDirectory;
use clm_identity::keys::KeyHasher;
use clm_identity::store::{self, CustomerStore};
use clm_platform::Secret;
use clm_platform::cache::{CacheBackend, InProcessBackend, VersionedCache};
use clm_platform::db;

/// A store with whatever keeps it alive.
pub struct Backend {
    pub store: Arc<dyn CustomerStore>,
    pub url: Secret,
    _dir: Option<tempfile::TempDir>,
}

pub async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = Secret::new(format!("sqlite://{}/identity.db", dir.path().display()));
    let pools = db::connect(&url, "identity", 4).await.expect("open sqlite");
    store::MIGRATIONS.run(&pools).await.expect("migrate sqlite");
    Backend {
        store: store::open(pools),
        url,
        _dir: Some(dir),
    }
}

pub async fn postgres() -> Option<Backend> {
    let url = clm_platform::testing::fresh_postgres_database("identity").await?;
    let pools = db::connect(&url, "identity", 8)
        .await
        .expect("open postgres");
    store::MIGRATIONS
        .run(&pools)
        .await
        .expect("migrate postgres");
    Some(Backend {
        store: store::open(pools),
        url,
        _dir: None,
    })
}

pub fn in_process_cache() -> Arc<VersionedCache> {
    cache_over(Arc::new(InProcessBackend::new(
        10_000,
        Duration::from_secs(60),
    )))
}

pub fn cache_over(backend: Arc<dyn CacheBackend>) -> Arc<VersionedCache> {
    Arc::new(VersionedCache::new(
        backend,
        format!("clm:test:{}", uuid::Uuid::now_v7()),
        Duration::from_secs(60),
    ))
}

pub fn directory(backend: &Backend, cache: Arc<VersionedCache>) -> Arc<CustomerDirectory> {
    Arc::new(CustomerDirectory::new(
        backend.store.clone(),
        cache,
        KeyHasher::new(b"test-hash-key-0123456789"),
    ))
}
