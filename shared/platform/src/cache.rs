//! The hot-object cache: read-through, versioned, shared by every replica
//! through Redis or kept in-process when no Redis is configured.
//!
//! Correctness rules, in order of importance:
//! - The cache never goes back in time: every write is a compare-and-set on
//!   the object's version, so a reader that loaded an old version from the
//!   database cannot overwrite a newer one a writer put there after commit.
//! - Writers put the new version after every commit (write-through), so a
//!   read after a write returns never sees the old object.
//! - The cache is an optimisation only: when Redis fails, reads go to the
//!   database and writes still succeed; the failure is logged and counted,
//!   never returned. A key whose write-through failed is remembered and read
//!   from the database until the cache has been repaired for it, so an
//!   outage cannot leave this process serving a stale entry afterwards.
//! - Concurrent misses on one key load it from the database once (stampede
//!   protection); entries expire after a TTL with ±10% jitter so that a burst
//!   of fills does not expire as a burst.

use std::collections::HashSet;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rand::Rng;
use tokio::sync::Mutex as AsyncMutex;

use crate::secret::Secret;

/// A cached object: its encoded bytes and the version they are of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The object's version; higher is newer.
    pub version: i64,
    /// The encoded object.
    pub bytes: Vec<u8>,
}

/// A cache backend failed (Redis unreachable, timed out, refused).
#[derive(Debug, thiserror::Error)]
#[error("cache backend error: {0}")]
pub struct BackendError(String);

/// Where cached objects are kept.
#[async_trait]
pub trait CacheBackend: Send + Sync + 'static {
    /// The cached object under `key`, if any and not expired.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, BackendError>;
    /// Stores `value` unless the cache already holds the same or a newer
    /// version of it.
    async fn put_if_newer(
        &self,
        key: &str,
        value: &Versioned,
        ttl: Duration,
    ) -> Result<(), BackendError>;
    /// Forgets `key`.
    async fn remove(&self, key: &str) -> Result<(), BackendError>;
    /// A short name for logs ("redis", "in-process").
    fn name(&self) -> &'static str;
}

/// Counters of what the cache did; read them for tests and metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Reads answered from the cache.
    pub hits: AtomicU64,
    /// Reads that went to the database.
    pub misses: AtomicU64,
    /// Backend failures (each one logged, none returned to a caller).
    pub errors: AtomicU64,
}

/// A snapshot of [`CacheStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheCounts {
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that went to the database.
    pub misses: u64,
    /// Backend failures.
    pub errors: u64,
}

/// How long the cache is skipped after a backend failure before one call
/// tries it again.
const SKIP_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The circuit breaker in front of a backend: after a failure the cache is
/// skipped (reads go to the database, writes mark their keys dirty) for
/// [`SKIP_AFTER_FAILURE`]; then one call at a time tries the backend again,
/// bounded by its timeout, and the first success closes the circuit. An
/// outage then costs a call nothing most of the time, and never more than
/// one backend timeout.
#[derive(Debug)]
struct Breaker {
    /// Where `open_since` counts from.
    epoch: tokio::time::Instant,
    /// When the backend failed last, in microseconds after `epoch` plus one,
    /// while the circuit is open; 0 while it is closed. An atomic, so that
    /// the closed circuit, the usual case, costs every call one load.
    open_since: AtomicU64,
    /// True while one call tries the backend on an open circuit.
    probing: std::sync::atomic::AtomicBool,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            epoch: tokio::time::Instant::now(),
            open_since: AtomicU64::new(0),
            probing: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// What the breaker lets a call do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Use the backend.
    Closed,
    /// Use the backend, as the one call that probes an open circuit.
    Probe,
    /// Skip the backend.
    Skip,
}

impl Breaker {
    /// Now, as stored in `open_since` (never 0).
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64 + 1
    }

    fn pass(&self) -> Pass {
        let open_since = self.open_since.load(Ordering::Acquire);
        if open_since == 0 {
            return Pass::Closed;
        }
        let open_for = Duration::from_micros(self.now().saturating_sub(open_since));
        if open_for < SKIP_AFTER_FAILURE {
            return Pass::Skip;
        }
        match self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Pass::Probe,
            Err(_) => Pass::Skip,
        }
    }

    /// The backend answered.
    fn succeeded(&self, pass: Pass, backend: &str) {
        if pass == Pass::Probe {
            self.open_since.store(0, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            tracing::info!(backend, "cache answers again, using it");
        }
    }

    /// The backend failed: skip it for a while.
    fn failed(&self, pass: Pass) {
        self.open_since.store(self.now(), Ordering::Release);
        if pass == Pass::Probe {
            self.probing.store(false, Ordering::Release);
        }
    }
}

const LOAD_STRIPES: usize = 256;
/// How long this process remembers the versions it wrote: far longer than a
/// backend needs to drop an older copy.
const WRITTEN_VERSION_MEMORY: Duration = Duration::from_secs(10);
const MAX_DIRTY_KEYS: usize = 100_000;

/// A read-through, write-through, versioned cache over a [`CacheBackend`].
pub struct VersionedCache {
    backend: Arc<dyn CacheBackend>,
    namespace: String,
    ttl: Duration,
    stats: CacheStats,
    /// Keys whose write-through failed: read from the database until the
    /// backend has forgotten them.
    dirty: std::sync::Mutex<HashSet<String>>,
    /// True while `dirty` may hold keys: the read path checks it without a lock.
    any_dirty: std::sync::atomic::AtomicBool,
    /// The version each key had when this process last wrote it: a cached
    /// entry older than that is not served (the backend may still hold or
    /// hand out the old one for a moment, e.g. a client-side copy whose
    /// invalidation is on its way).
    written: moka::sync::Cache<String, i64>,
    /// Striped locks so that concurrent misses on one key load it once.
    load_locks: Vec<AsyncMutex<()>>,
    last_error_log: std::sync::Mutex<Option<Instant>>,
    breaker: Breaker,
}

impl VersionedCache {
    /// A cache that keeps keys under `namespace` (e.g. `clm:identity:customer`).
    pub fn new(
        backend: Arc<dyn CacheBackend>,
        namespace: impl Into<String>,
        ttl: Duration,
    ) -> Self {
        Self {
            backend,
            namespace: namespace.into(),
            ttl,
            stats: CacheStats::default(),
            dirty: std::sync::Mutex::new(HashSet::new()),
            any_dirty: std::sync::atomic::AtomicBool::new(false),
            written: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(WRITTEN_VERSION_MEMORY)
                .build(),
            load_locks: (0..LOAD_STRIPES).map(|_| AsyncMutex::new(())).collect(),
            last_error_log: std::sync::Mutex::new(None),
            breaker: Breaker::default(),
        }
    }

    /// Runs one backend operation through the circuit breaker: `None` when
    /// the backend is skipped (it failed a moment ago), else its result.
    async fn through_breaker<T, Fut>(
        &self,
        operation: &str,
        call: impl FnOnce() -> Fut,
    ) -> Option<Result<T, BackendError>>
    where
        Fut: Future<Output = Result<T, BackendError>>,
    {
        let pass = self.breaker.pass();
        if pass == Pass::Skip {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let result = call().await;
        match &result {
            Ok(_) => self.breaker.succeeded(pass, self.backend.name()),
            Err(err) => {
                self.breaker.failed(pass);
                self.record_error(operation, err);
            }
        }
        Some(result)
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// What the cache has done so far.
    pub fn counts(&self) -> CacheCounts {
        CacheCounts {
            hits: self.stats.hits.load(Ordering::Relaxed),
            misses: self.stats.misses.load(Ordering::Relaxed),
            errors: self.stats.errors.load(Ordering::Relaxed),
        }
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}:{key}", self.namespace)
    }

    fn jittered_ttl(&self) -> Duration {
        let factor = rand::rng().random_range(0.9..1.1);
        self.ttl.mul_f64(factor)
    }

    fn record_error(&self, operation: &str, err: &BackendError) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        // One line every few seconds is enough to see an outage; more would
        // flood the log at full request rate.
        let mut last = self
            .last_error_log
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| at.elapsed() > Duration::from_secs(5)) {
            *last = Some(Instant::now());
            tracing::warn!(
                backend = self.backend.name(),
                operation,
                error = %err,
                errors_total = self.stats.errors.load(Ordering::Relaxed),
                "cache unavailable, using the database"
            );
        }
    }

    fn is_dirty(&self, key: &str) -> bool {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }

    fn mark_dirty(&self, key: &str) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        if dirty.len() < MAX_DIRTY_KEYS {
            dirty.insert(key.to_owned());
            self.any_dirty.store(true, Ordering::Release);
        }
    }

    fn clear_dirty(&self, key: &str) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Tries to forget a key whose write-through failed; true once done.
    async fn repair(&self, full_key: &str) -> bool {
        match self
            .through_breaker("repair", || self.backend.remove(full_key))
            .await
        {
            Some(Ok(())) => {
                self.clear_dirty(full_key);
                true
            }
            Some(Err(_)) | None => false,
        }
    }

    /// The object under `key`: from the cache when there, otherwise loaded
    /// with `load` (at most once at a time per key in this process) and
    /// cached. `load` errors are returned; cache errors never are.
    pub async fn get_or_load<F, Fut, E>(&self, key: &str, load: F) -> Result<Option<Versioned>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Versioned>, E>>,
    {
        let full_key = self.full_key(key);
        if self.is_dirty(&full_key) && !self.repair(&full_key).await {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return load().await;
        }
        match self
            .through_breaker("get", || self.backend.get(&full_key))
            .await
        {
            Some(Ok(Some(hit))) if self.older_than_written(&full_key, &hit) => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return load().await;
            }
            Some(Ok(Some(hit))) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(hit));
            }
            Some(Ok(None)) => {}
            Some(Err(_)) | None => {
                // The backend is down: every caller goes to the database
                // directly rather than queueing behind one lock.
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return load().await;
            }
        }

        let stripe = {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            full_key.hash(&mut hasher);
            (hasher.finish() as usize) % LOAD_STRIPES
        };
        let _loading = self.load_locks[stripe].lock().await;
        // Another caller may have filled it while this one waited.
        if let Ok(Some(hit)) = self.backend.get(&full_key).await
            && !self.older_than_written(&full_key, &hit)
        {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(hit));
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let loaded = load().await?;
        if let Some(value) = &loaded {
            let ttl = self.jittered_ttl();
            self.through_breaker("fill", || self.backend.put_if_newer(&full_key, value, ttl))
                .await;
        }
        Ok(loaded)
    }

    fn older_than_written(&self, full_key: &str, hit: &Versioned) -> bool {
        self.written
            .get(full_key)
            .is_some_and(|written| hit.version < written)
    }

    /// Puts a freshly committed version (write-through). Never fails: on a
    /// backend error the key is read from the database until repaired.
    pub async fn store(&self, key: &str, value: &Versioned) {
        let full_key = self.full_key(key);
        self.written.insert(full_key.clone(), value.version);
        let ttl = self.jittered_ttl();
        if !matches!(
            self.through_breaker("store", || self.backend.put_if_newer(&full_key, value, ttl))
                .await,
            Some(Ok(()))
        ) {
            self.mark_dirty(&full_key);
        }
    }

    /// Forgets a key. Never fails: on a backend error the key is read from
    /// the database until repaired.
    pub async fn invalidate(&self, key: &str) {
        let full_key = self.full_key(key);
        if !matches!(
            self.through_breaker("invalidate", || self.backend.remove(&full_key))
                .await,
            Some(Ok(()))
        ) {
            self.mark_dirty(&full_key);
        }
    }
}

/// The cache kept in this process: bounded, for the embedded mode and for
/// single-replica deployments without Redis.
pub struct InProcessBackend {
    entries: moka::sync::Cache<String, Arc<(Versioned, Instant)>>,
}

impl InProcessBackend {
    /// A cache of at most `capacity` entries that live at most `max_ttl`.
    pub fn new(capacity: u64, max_ttl: Duration) -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(max_ttl.mul_f64(1.2))
                .build(),
        }
    }
}

#[async_trait]
impl CacheBackend for InProcessBackend {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, BackendError> {
        Ok(self
            .entries
            .get(key)
            .filter(|entry| entry.1 > Instant::now())
            .map(|entry| entry.0.clone()))
    }

    async fn put_if_newer(
        &self,
        key: &str,
        value: &Versioned,
        ttl: Duration,
    ) -> Result<(), BackendError> {
        let expires = Instant::now() + ttl;
        self.entries
            .entry(key.to_owned())
            .and_compute_with(|current| match current {
                Some(entry)
                    if entry.value().0.version >= value.version
                        && entry.value().1 > Instant::now() =>
                {
                    moka::ops::compute::Op::Nop
                }
                _ => moka::ops::compute::Op::Put(Arc::new((value.clone(), expires))),
            });
        Ok(())
    }

    async fn remove(&self, key: &str) -> Result<(), BackendError> {
        self.entries.invalidate(key);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "in-process"
    }
}

/// Compare-and-set on version: KEYS[1] the key; ARGV version, bytes, ttl ms.
const PUT_IF_NEWER: &str = r"
local current = redis.call('HGET', KEYS[1], 'v')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// The cache in Redis, shared by every replica. Connects lazily and
/// reconnects in the background, so a service starts and serves while Redis
/// is down.
pub struct RedisBackend {
    client: redis::Client,
    client_cache: Option<redis::caching::CacheConfig>,
    connection: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    connecting: AsyncMutex<Option<Instant>>,
    script: redis::Script,
    timeout: Duration,
}

impl RedisBackend {
    /// A backend for the Redis server at `url`. Nothing is connected yet.
    pub fn new(url: &Secret, timeout: Duration) -> Result<Self, BackendError> {
        let client =
            redis::Client::open(url.expose()).map_err(|err| BackendError(err.to_string()))?;
        Ok(Self {
            client,
            client_cache: None,
            connection: tokio::sync::OnceCell::new(),
            connecting: AsyncMutex::new(None),
            script: redis::Script::new(PUT_IF_NEWER),
            timeout,
        })
    }

    /// Keeps recently read entries in this process too, with Redis's
    /// server-assisted client-side caching (RESP3 tracking): Redis tells
    /// this process when a key it holds changes, from any replica, and the
    /// local copy is dropped; after a reconnection everything is dropped.
    /// A repeated read of a hot profile then costs no round trip.
    pub fn with_client_side_cache(
        mut self,
        entries: usize,
        ttl: Duration,
    ) -> Result<Self, BackendError> {
        use redis::IntoConnectionInfo as _;
        let mut info = self
            .client
            .get_connection_info()
            .clone()
            .into_connection_info()
            .map_err(|err| BackendError(err.to_string()))?;
        info.redis.protocol = redis::ProtocolVersion::RESP3;
        self.client = redis::Client::open(info).map_err(|err| BackendError(err.to_string()))?;
        let size =
            std::num::NonZeroUsize::new(entries.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
        self.client_cache = Some(
            redis::caching::CacheConfig::new()
                .set_size(size)
                .set_default_client_ttl(ttl),
        );
        Ok(self)
    }

    /// The connection, once made. The manager reconnects by itself after
    /// that; only the first connection is attempted here.
    async fn connection(&self) -> Result<redis::aio::ConnectionManager, BackendError> {
        if let Some(connection) = self.connection.get() {
            return Ok(connection.clone());
        }
        let mut last_attempt = self.connecting.lock().await;
        if let Some(connection) = self.connection.get() {
            return Ok(connection.clone());
        }
        // While Redis is down, try to connect at most once a second instead of
        // on every request.
        if last_attempt.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return Err(BackendError("not connected".to_owned()));
        }
        *last_attempt = Some(Instant::now());
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1)
            .set_max_delay(1000);
        let config = match self.client_cache {
            Some(cache) => config.set_cache_config(cache),
            None => config,
        };
        let connection =
            redis::aio::ConnectionManager::new_with_config(self.client.clone(), config)
                .await
                .map_err(|err| BackendError(err.to_string()))?;
        let _ = self.connection.set(connection.clone());
        Ok(connection)
    }

    async fn run<T, F, Fut>(&self, op: F) -> Result<T, BackendError>
    where
        F: FnOnce(redis::aio::ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        // The whole operation is bounded, connecting included: the
        // manager's response timeout does not cover the reconnection and
        // its backoff after Redis went away, which took 1 to 1.5 s a call
        // while Redis refused connections.
        let bounded = tokio::time::timeout(self.timeout, async {
            let connection = self.connection().await?;
            op(connection)
                .await
                .map_err(|err| BackendError(err.to_string()))
        });
        match bounded.await {
            Ok(result) => result,
            Err(_) => Err(BackendError(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }
}

#[async_trait]
impl CacheBackend for RedisBackend {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, BackendError> {
        let (version, bytes): (Option<i64>, Option<Vec<u8>>) = self
            .run(|mut connection| async move {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg("v")
                    .arg("d")
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        Ok(match (version, bytes) {
            (Some(version), Some(bytes)) => Some(Versioned { version, bytes }),
            _ => None,
        })
    }

    async fn put_if_newer(
        &self,
        key: &str,
        value: &Versioned,
        ttl: Duration,
    ) -> Result<(), BackendError> {
        let script = &self.script;
        let _: i64 = self
            .run(|mut connection| async move {
                script
                    .key(key)
                    .arg(value.version)
                    .arg(value.bytes.as_slice())
                    .arg(ttl.as_millis().max(1) as u64)
                    .invoke_async(&mut connection)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn remove(&self, key: &str) -> Result<(), BackendError> {
        let _: i64 = self
            .run(|mut connection| async move {
                redis::cmd("DEL")
                    .arg(key)
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

/// The backend `CLM_REDIS_URL` asks for: Redis when set, in-process otherwise.
pub fn backend_from_config(
    config: &crate::PlatformConfig,
) -> Result<Arc<dyn CacheBackend>, crate::ConfigError> {
    match &config.redis_url {
        Some(url) => {
            let backend = RedisBackend::new(url, Duration::from_millis(250))
                .map_err(|err| crate::ConfigError::new("CLM_REDIS_URL", err.to_string()))?;
            let backend = if config.redis_client_cache {
                backend
                    .with_client_side_cache(
                        config.cache_capacity.min(1_000_000) as usize,
                        config.cache_ttl,
                    )
                    .map_err(|err| crate::ConfigError::new("CLM_REDIS_URL", err.to_string()))?
            } else {
                backend
            };
            Ok(Arc::new(backend))
        }
        None => Ok(Arc::new(InProcessBackend::new(
            config.cache_capacity,
            config.cache_ttl,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn versioned(version: i64, text: &str) -> Versioned {
        Versioned {
            version,
            bytes: text.as_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn an_old_fill_never_overwrites_a_newer_write() {
        let cache = VersionedCache::new(
            Arc::new(InProcessBackend::new(100, Duration::from_secs(60))),
            "t",
            Duration::from_secs(60),
        );
        cache.store("k", &versioned(2, "new")).await;
        // A reader that loaded version 1 before the write committed fills late.
        let got = cache
            .get_or_load("k", || async { Ok::<_, ()>(Some(versioned(1, "old"))) })
            .await
            .unwrap();
        assert_eq!(got, Some(versioned(2, "new")));
        cache.store("k", &versioned(1, "old")).await;
        let got = cache
            .get_or_load("k", || async { Ok::<_, ()>(None) })
            .await
            .unwrap();
        assert_eq!(got, Some(versioned(2, "new")));
    }

    #[tokio::test]
    async fn concurrent_misses_load_once() {
        let cache = Arc::new(VersionedCache::new(
            Arc::new(InProcessBackend::new(100, Duration::from_secs(60))),
            "t",
            Duration::from_secs(60),
        ));
        let loads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let cache = cache.clone();
            let loads = loads.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_load("hot", || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, ()>(Some(versioned(1, "v")))
                    })
                    .await
                    .unwrap()
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), Some(versioned(1, "v")));
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(cache.counts().misses, 1);
    }

    struct BrokenBackend;

    #[async_trait]
    impl CacheBackend for BrokenBackend {
        async fn get(&self, _: &str) -> Result<Option<Versioned>, BackendError> {
            Err(BackendError("down".into()))
        }
        async fn put_if_newer(
            &self,
            _: &str,
            _: &Versioned,
            _: Duration,
        ) -> Result<(), BackendError> {
            Err(BackendError("down".into()))
        }
        async fn remove(&self, _: &str) -> Result<(), BackendError> {
            Err(BackendError("down".into()))
        }
        fn name(&self) -> &'static str {
            "broken"
        }
    }

    #[tokio::test]
    async fn a_broken_backend_falls_back_and_counts() {
        let cache = VersionedCache::new(Arc::new(BrokenBackend), "t", Duration::from_secs(60));
        let got = cache
            .get_or_load("k", || async { Ok::<_, ()>(Some(versioned(1, "db"))) })
            .await
            .unwrap();
        assert_eq!(got, Some(versioned(1, "db")));
        cache.store("k", &versioned(2, "db2")).await;
        let counts = cache.counts();
        assert_eq!(counts.errors, 2);
        assert_eq!(counts.hits, 0);
        assert!(cache.is_dirty("t:k"));
    }

    /// A backend that is up or down at will and counts the calls it gets.
    #[derive(Default)]
    struct FlakyBackend {
        down: std::sync::atomic::AtomicBool,
        calls: AtomicUsize,
        inner: std::sync::Mutex<Option<Versioned>>,
    }

    impl FlakyBackend {
        fn answer<T>(&self, value: T) -> Result<T, BackendError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                Err(BackendError("connection refused".into()))
            } else {
                Ok(value)
            }
        }
    }

    #[async_trait]
    impl CacheBackend for FlakyBackend {
        async fn get(&self, _: &str) -> Result<Option<Versioned>, BackendError> {
            let held = self.inner.lock().unwrap().clone();
            self.answer(held)
        }
        async fn put_if_newer(
            &self,
            _: &str,
            value: &Versioned,
            _: Duration,
        ) -> Result<(), BackendError> {
            self.answer(())?;
            *self.inner.lock().unwrap() = Some(value.clone());
            Ok(())
        }
        async fn remove(&self, _: &str) -> Result<(), BackendError> {
            self.answer(())?;
            *self.inner.lock().unwrap() = None;
            Ok(())
        }
        fn name(&self) -> &'static str {
            "flaky"
        }
    }

    #[tokio::test]
    async fn after_a_failure_the_backend_is_skipped_until_it_answers_again() {
        tokio::time::pause();
        let backend = Arc::new(FlakyBackend::default());
        let cache = VersionedCache::new(backend.clone(), "t", Duration::from_secs(60));
        let from_db = || async { Ok::<_, ()>(Some(versioned(1, "db"))) };
        backend.down.store(true, Ordering::SeqCst);
        assert_eq!(
            cache.get_or_load("k", from_db).await.unwrap(),
            Some(versioned(1, "db"))
        );
        assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
        // While the circuit is open no call waits on the backend.
        for _ in 0..20 {
            cache.get_or_load("k", from_db).await.unwrap();
            cache.store("k", &versioned(2, "db2")).await;
        }
        assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
        // Later one call tries again; still down, the circuit opens again.
        tokio::time::advance(SKIP_AFTER_FAILURE + Duration::from_millis(1)).await;
        cache.get_or_load("k", from_db).await.unwrap();
        cache.get_or_load("k", from_db).await.unwrap();
        assert_eq!(backend.calls.load(Ordering::SeqCst), 2);
        // Back up: the next probe closes the circuit, the key written
        // meanwhile is repaired (not served stale) and then cached.
        backend.down.store(false, Ordering::SeqCst);
        tokio::time::advance(SKIP_AFTER_FAILURE + Duration::from_millis(1)).await;
        let db3 = || async { Ok::<_, ()>(Some(versioned(3, "db3"))) };
        assert_eq!(
            cache.get_or_load("k", db3).await.unwrap(),
            Some(versioned(3, "db3"))
        );
        let cached = cache
            .get_or_load("k", || async { Ok::<_, ()>(None) })
            .await
            .unwrap();
        assert_eq!(
            cached,
            Some(versioned(3, "db3")),
            "served from the cache again"
        );
    }

    /// A backend that keeps serving what it first held, as a client-side
    /// copy does until its invalidation arrives.
    struct LaggingBackend(std::sync::Mutex<Option<Versioned>>);

    #[async_trait]
    impl CacheBackend for LaggingBackend {
        async fn get(&self, _: &str) -> Result<Option<Versioned>, BackendError> {
            Ok(self.0.lock().unwrap().clone())
        }
        async fn put_if_newer(
            &self,
            _: &str,
            value: &Versioned,
            _: Duration,
        ) -> Result<(), BackendError> {
            self.0.lock().unwrap().get_or_insert_with(|| value.clone());
            Ok(())
        }
        async fn remove(&self, _: &str) -> Result<(), BackendError> {
            Ok(())
        }
        fn name(&self) -> &'static str {
            "lagging"
        }
    }

    #[tokio::test]
    async fn a_copy_older_than_this_process_wrote_is_never_served() {
        let cache = VersionedCache::new(
            Arc::new(LaggingBackend(std::sync::Mutex::new(None))),
            "t",
            Duration::from_secs(60),
        );
        cache.store("k", &versioned(1, "one")).await;
        assert_eq!(
            cache
                .get_or_load("k", || async { Ok::<_, ()>(None) })
                .await
                .unwrap(),
            Some(versioned(1, "one"))
        );
        cache.store("k", &versioned(2, "two")).await;
        // The backend still answers version 1: the database is asked instead.
        let got = cache
            .get_or_load("k", || async { Ok::<_, ()>(Some(versioned(2, "two"))) })
            .await
            .unwrap();
        assert_eq!(got, Some(versioned(2, "two")));
    }

    #[tokio::test]
    async fn entries_expire() {
        let backend = InProcessBackend::new(100, Duration::from_secs(60));
        backend
            .put_if_newer("k", &versioned(1, "v"), Duration::from_millis(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(backend.get("k").await.unwrap(), None);
    }
}
