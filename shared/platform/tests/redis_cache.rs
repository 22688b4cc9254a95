//! The versioned cache against a real Redis server: compare-and-set on
//! version, expiry, fallback when Redis cannot be reached.

#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clm_platform::Secret;
use clm_platform::cache::{CacheBackend, RedisBackend, Versioned, VersionedCache};

fn versioned(version: i64, text: &str) -> Versioned {
    Versioned {
        version,
        bytes: text.as_bytes().to_vec(),
    }
}

fn unique_key() -> String {
    format!("clm:test:{}", uuid::Uuid::now_v7())
}

#[tokio::test]
async fn redis_keeps_the_newest_version_and_expires() {
    let Some(url) = clm_platform::testing::redis_url().await else {
        return;
    };
    let backend = RedisBackend::new(&url, Duration::from_secs(2)).unwrap();
    let key = unique_key();
    assert_eq!(backend.get(&key).await.unwrap(), None);
    backend
        .put_if_newer(&key, &versioned(2, "two"), Duration::from_secs(30))
        .await
        .unwrap();
    backend
        .put_if_newer(&key, &versioned(1, "one"), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(backend.get(&key).await.unwrap(), Some(versioned(2, "two")));
    backend
        .put_if_newer(&key, &versioned(3, "three"), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        backend.get(&key).await.unwrap(),
        Some(versioned(3, "three"))
    );
    backend.remove(&key).await.unwrap();
    assert_eq!(backend.get(&key).await.unwrap(), None);

    backend
        .put_if_newer(&key, &versioned(1, "short"), Duration::from_millis(50))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(backend.get(&key).await.unwrap(), None, "the entry expired");
}

#[tokio::test]
async fn concurrent_misses_through_redis_load_once() {
    let Some(url) = clm_platform::testing::redis_url().await else {
        return;
    };
    let cache = Arc::new(VersionedCache::new(
        Arc::new(RedisBackend::new(&url, Duration::from_secs(2)).unwrap()),
        unique_key(),
        Duration::from_secs(60),
    ));
    let loads = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let cache = cache.clone();
        let loads = loads.clone();
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("hot", || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, ()>(Some(versioned(7, "value")))
                })
                .await
                .unwrap()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), Some(versioned(7, "value")));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(cache.counts().errors, 0);
}

#[tokio::test]
async fn an_unreachable_redis_falls_back_to_the_loader() {
    // Port 1 on loopback: nothing listens there.
    let backend = RedisBackend::new(
        &Secret::new("redis://127.0.0.1:1/"),
        Duration::from_millis(200),
    )
    .unwrap();
    let cache = VersionedCache::new(Arc::new(backend), "clm:test", Duration::from_secs(60));
    for _ in 0..3 {
        let got = cache
            .get_or_load("k", || async {
                Ok::<_, ()>(Some(versioned(1, "from the database")))
            })
            .await
            .unwrap();
        assert_eq!(got, Some(versioned(1, "from the database")));
    }
    cache.store("k", &versioned(2, "written")).await;
    let counts = cache.counts();
    assert!(counts.errors >= 4, "{counts:?}");
    assert_eq!(counts.hits, 0);
}
