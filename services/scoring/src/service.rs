//! The scoring service: settings, start-up (database, default model,
//! consumers, sweep, pusher, rescore worker) and the gRPC mount.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use clm_eventlog::ShardFilter;
use clm_eventlog::consumer::{self, Backoff};
use clm_eventlog::sources::{IdentityEventSource, TouchpointLogSource};
use clm_platform::server::{Mounted, Shutdown};
use clm_platform::{ConfigError, Env, PlatformConfig, Secret};
use clm_proto::scoring as pb;
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint};

use crate::clock::Clock;
use crate::consumers::{CUSTOMERS_CONSUMER, CustomerEventProjection, TouchpointProjection};
use crate::default_model::default_model;
use crate::grpc::LifecycleGrpc;
use crate::push::Pusher;
use crate::rescore;
use crate::scorer::Scorer;
use crate::store;

/// The name of this service in `clm serve` and `clm migrate`.
pub const SERVICE_NAME: &str = "scoring";

/// How many due customers the sweep evaluates per transaction.
const SWEEP_BATCH: u32 = 500;

/// The scoring service's settings.
#[derive(Debug, Clone)]
pub struct ScoringConfig {
    /// Its database (`CLM_SCORING_DATABASE_URL`, else `CLM_DATABASE_URL`, else SQLite).
    pub database_url: Secret,
    /// The identity service (`CLM_IDENTITY_URL`; default: this process when
    /// it serves identity too).
    pub identity_url: Option<String>,
    /// The touchpoints service (`CLM_TOUCHPOINTS_URL`; default: this
    /// process when it serves touchpoints too).
    pub touchpoints_url: Option<String>,
    /// Shards of the touchpoint log consumed in parallel
    /// (`CLM_SCORING_LOG_SHARDS`, default 8).
    pub log_shards: u32,
    /// How often the sweep looks for due customers
    /// (`CLM_SCORING_SWEEP_POLL_MS`, default 1000).
    pub sweep_poll: Duration,
    /// Concurrent SetLifecycles calls (`CLM_SCORING_PUSH_CONCURRENCY`, default 4).
    pub push_concurrency: usize,
    /// How often snapshots whose scores alone changed are pushed to
    /// identity, at most (`CLM_SCORING_SCORE_PUSH_INTERVAL_MS`, default
    /// 2000). Stage, acquisition status and health changes go at once.
    pub score_push_interval: Duration,
    /// Deadline of each call to identity or touchpoints (`CLM_IDENTITY_TIMEOUT_MS`, default 5000).
    pub call_timeout: Duration,
    /// Database connections (`CLM_SCORING_DB_CONNECTIONS`, default 16).
    pub max_connections: u32,
    /// Where "now" comes from (`CLM_SCORING_CLOCK_FILE`: testing only).
    pub clock: Clock,
}

fn url_setting(env: &Env, name: &str) -> Result<Option<String>, ConfigError> {
    let url = env.string(name);
    if let Some(url) = &url {
        Endpoint::from_shared(url.clone())
            .map_err(|err| ConfigError::new(name, format!("{url:?} is not a valid URL: {err}")))?;
    }
    Ok(url)
}

impl ScoringConfig {
    /// Reads and validates the settings.
    pub fn from_env(platform: &PlatformConfig, env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            database_url: platform.database_url_for(env, SERVICE_NAME)?,
            identity_url: url_setting(env, "CLM_IDENTITY_URL")?,
            touchpoints_url: url_setting(env, "CLM_TOUCHPOINTS_URL")?,
            log_shards: env.bounded_or("CLM_SCORING_LOG_SHARDS", 8, 1, 256)? as u32,
            sweep_poll: Duration::from_millis(env.bounded_or(
                "CLM_SCORING_SWEEP_POLL_MS",
                1000,
                10,
                3_600_000,
            )?),
            push_concurrency: env.bounded_or("CLM_SCORING_PUSH_CONCURRENCY", 4, 1, 256)? as usize,
            score_push_interval: Duration::from_millis(env.bounded_or(
                "CLM_SCORING_SCORE_PUSH_INTERVAL_MS",
                2000,
                0,
                3_600_000,
            )?),
            call_timeout: Duration::from_millis(env.bounded_or(
                "CLM_IDENTITY_TIMEOUT_MS",
                5000,
                50,
                60_000,
            )?),
            max_connections: env.bounded_or("CLM_SCORING_DB_CONNECTIONS", 16, 1, 1000)? as u32,
            clock: match env.string("CLM_SCORING_CLOCK_FILE") {
                Some(path) => Clock::File(PathBuf::from(path)),
                None => Clock::System,
            },
        })
    }
}

/// Applies the scoring migrations.
pub async fn migrate(config: &ScoringConfig) -> anyhow::Result<()> {
    store::MIGRATIONS
        .open(&config.database_url, 2, true)
        .await?;
    Ok(())
}

/// A running scoring service, ready to mount.
pub struct ScoringService {
    grpc: LifecycleGrpc,
    max_message_bytes: usize,
}

fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy())
}

impl ScoringService {
    /// Connects, migrates when asked to, installs the default model, starts
    /// the consumers, the sweep, the pusher and the rescore worker, and
    /// builds the service.
    pub async fn start(
        platform: &PlatformConfig,
        config: &ScoringConfig,
        identity_url: &str,
        touchpoints_url: &str,
        shutdown: Shutdown,
    ) -> anyhow::Result<Self> {
        let pools = store::MIGRATIONS
            .open(
                &config.database_url,
                config.max_connections,
                platform.migrate_on_start,
            )
            .await?;
        let store = store::open(pools);
        store
            .install_default(&default_model(), Utc::now())
            .await
            .map_err(|err| anyhow::anyhow!("cannot install the default model: {err}"))?;
        let scorer = Arc::new(Scorer::new(store.clone(), config.clock.clone()));
        let identity = channel(identity_url)?;
        let touchpoints = channel(touchpoints_url)?;

        for index in 0..config.log_shards {
            let shard = ShardFilter {
                index,
                count: config.log_shards,
            };
            let source = TouchpointLogSource::new(touchpoints.clone());
            let projection = TouchpointProjection::new(scorer.clone());
            tokio::spawn(consumer::run(
                "scoring.touchpoints",
                source,
                projection,
                shard,
                Backoff::default(),
                shutdown.clone(),
            ));
        }
        tokio::spawn(consumer::run(
            CUSTOMERS_CONSUMER,
            IdentityEventSource::new(identity.clone()),
            CustomerEventProjection::new(scorer.clone(), identity.clone(), config.call_timeout),
            ShardFilter::ALL,
            Backoff::default(),
            shutdown.clone(),
        ));
        tokio::spawn(
            Pusher::new(
                store.clone(),
                identity,
                config.call_timeout,
                config.push_concurrency,
                config.score_push_interval,
            )
            .run(scorer.changed(), shutdown.clone()),
        );
        tokio::spawn(sweep(scorer.clone(), config.sweep_poll, shutdown.clone()));
        let rescore_wake = Arc::new(Notify::new());
        tokio::spawn(rescore::run_worker(
            scorer.clone(),
            rescore_wake.clone(),
            shutdown.clone(),
        ));
        let grpc = LifecycleGrpc::new(scorer, touchpoints, rescore_wake, shutdown);
        tracing::info!(
            identity = identity_url,
            touchpoints = touchpoints_url,
            shards = config.log_shards,
            "scoring service ready"
        );
        Ok(Self {
            grpc,
            max_message_bytes: platform.limits.max_message_bytes,
        })
    }

    /// Mounts the gRPC service, with this process's message size limit.
    pub fn mount(&self, mounted: &mut Mounted) {
        mounted.add(
            self.grpc
                .clone()
                .into_server()
                .max_decoding_message_size(self.max_message_bytes)
                .max_encoding_message_size(self.max_message_bytes.max(16 * 1024 * 1024)),
        );
    }
}

/// Evaluates customers whose next evaluation time has passed, so that time
/// alone moves them (AT_RISK, CHURNED, tenure).
async fn sweep(scorer: Arc<Scorer>, poll: Duration, shutdown: Shutdown) {
    loop {
        let now = scorer.now();
        let evaluated = match scorer.store().due_customers(now, SWEEP_BATCH).await {
            Ok(due) if due.is_empty() => 0,
            Ok(due) => match scorer
                .evaluate_now(&due, pb::TransitionCause::Sweep, true)
                .await
            {
                Ok(done) => due.len().max(done.len()),
                Err(err) => {
                    tracing::warn!(error = %err, "sweep failed");
                    0
                }
            },
            Err(err) => {
                tracing::warn!(error = %err, "cannot read due customers");
                0
            }
        };
        if evaluated >= SWEEP_BATCH as usize {
            continue;
        }
        tokio::select! {
            () = shutdown.triggered() => return,
            () = tokio::time::sleep(poll) => {}
        }
    }
}
