//! The touchpoints service: every interaction a person has with the brand,
//! recorded idempotently by event id (one, a batch, or a client stream),
//! with customers resolved through the identity service; customer
//! timelines and counts; and the touchpoint log that feeds the other
//! services. Merges and erasures seen on the identity log re-key touchpoints
//! and strip their personal properties.

pub mod grpc;
pub mod identity_events;
pub mod ingest;
pub mod model;
pub mod resolver;
pub mod store;
pub mod vocabulary;

use std::time::Duration;

use clm_eventlog::ShardFilter;
use clm_eventlog::consumer::{self, Backoff};
use clm_platform::server::{Mounted, Shutdown};
use clm_platform::{ConfigError, Env, PlatformConfig, Secret};
use tonic::transport::Endpoint;

use crate::grpc::TouchpointGrpc;
use clm_eventlog::sources::IdentityEventSource;

use crate::identity_events::TouchpointCustomerProjection;
use crate::ingest::TouchpointIngest;
use crate::resolver::IdentityResolver;

/// The name of this service in `clm serve` and `clm migrate`.
pub const SERVICE_NAME: &str = "touchpoints";

/// The touchpoints service's settings.
#[derive(Debug, Clone)]
pub struct TouchpointsConfig {
    /// Its database (`CLM_TOUCHPOINTS_DATABASE_URL`, else `CLM_DATABASE_URL`, else SQLite).
    pub database_url: Secret,
    /// The identity service (`CLM_IDENTITY_URL`; default: this process when
    /// it serves identity too).
    pub identity_url: Option<String>,
    /// How far in the future `occur_time` may be (`CLM_TOUCHPOINT_MAX_FUTURE_SKEW_SECONDS`,
    /// default `CLM_MAX_CLOCK_SKEW_SECONDS`, the bound of every service).
    pub max_future_skew: Duration,
    /// Deadline of each call to identity (`CLM_IDENTITY_TIMEOUT_MS`, default 5000).
    pub identity_timeout: Duration,
    /// Database connections (`CLM_TOUCHPOINTS_DB_CONNECTIONS`, default 16).
    pub max_connections: u32,
}

impl TouchpointsConfig {
    /// Reads and validates the settings.
    pub fn from_env(platform: &PlatformConfig, env: &Env) -> Result<Self, ConfigError> {
        let identity_url = env.string("CLM_IDENTITY_URL");
        if let Some(url) = &identity_url {
            Endpoint::from_shared(url.clone()).map_err(|err| {
                ConfigError::new(
                    "CLM_IDENTITY_URL",
                    format!("{url:?} is not a valid URL: {err}"),
                )
            })?;
        }
        Ok(Self {
            database_url: platform.database_url_for(env, SERVICE_NAME)?,
            identity_url,
            max_future_skew: Duration::from_secs(env.bounded_or(
                "CLM_TOUCHPOINT_MAX_FUTURE_SKEW_SECONDS",
                platform.limits.max_clock_skew.as_secs(),
                0,
                86_400,
            )?),
            identity_timeout: Duration::from_millis(env.bounded_or(
                "CLM_IDENTITY_TIMEOUT_MS",
                5000,
                50,
                60_000,
            )?),
            max_connections: env.bounded_or("CLM_TOUCHPOINTS_DB_CONNECTIONS", 16, 1, 1000)? as u32,
        })
    }
}

/// Applies the touchpoints migrations.
pub async fn migrate(config: &TouchpointsConfig) -> anyhow::Result<()> {
    store::MIGRATIONS
        .open(&config.database_url, 2, true)
        .await?;
    Ok(())
}

/// A running touchpoints service, ready to mount.
pub struct TouchpointsService {
    grpc: TouchpointGrpc,
}

impl TouchpointsService {
    /// Connects, migrates when asked to, starts the identity event consumer
    /// and builds the service. `identity_url` is where identity is served
    /// (the configured URL, or this process's own address).
    pub async fn start(
        platform: &PlatformConfig,
        config: &TouchpointsConfig,
        identity_url: &str,
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
        let resolver = IdentityResolver::new(identity_url, config.identity_timeout)
            .map_err(|err| anyhow::anyhow!("CLM_IDENTITY_URL: {err}"))?;
        let events_channel = Endpoint::from_shared(identity_url.to_owned())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        let projection = TouchpointCustomerProjection::new(store.clone(), resolver.clone());
        let consumer_shutdown = shutdown.clone();
        tokio::spawn(async move {
            consumer::run(
                identity_events::CONSUMER_NAME,
                IdentityEventSource::new(events_channel),
                projection,
                ShardFilter::ALL,
                Backoff::default(),
                consumer_shutdown,
            )
            .await;
        });
        let ingest = TouchpointIngest::new(store, resolver).with_group_commit();
        let grpc = TouchpointGrpc::new(ingest, platform.limits, config.max_future_skew, shutdown);
        tracing::info!(identity = identity_url, "touchpoints service ready");
        Ok(Self { grpc })
    }

    /// Mounts the gRPC service.
    pub fn mount(&self, mounted: &mut Mounted) {
        mounted.add(self.grpc.clone().into_server());
    }
}
