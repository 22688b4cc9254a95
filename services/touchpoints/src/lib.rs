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
pub mod store;
pub mod vocabulary;

use std::time::Duration;

use async_trait::async_trait;

use clm_eventlog::consumer::{self, Backoff};
use clm_eventlog::leases::{self, LeaseGroup};
use clm_platform::service::{Configured, Service, ServiceInfo, SmokeCall, StartContext};
use clm_platform::{ConfigError, Env, PlatformConfig, Secret};

use crate::grpc::TouchpointGrpc;
use clm_eventlog::sources::{CustomerEvents, GrpcLogSource};

use crate::identity_events::TouchpointCustomerProjection;
use crate::ingest::TouchpointIngest;
use clm_platform::identity::IdentityResolver;

/// The name of this service in `clm serve` and `clm migrate`.
pub const SERVICE_NAME: &str = "touchpoints";

/// The touchpoints service's settings.
#[derive(Debug, Clone)]
pub struct TouchpointsConfig {
    /// Its database (`CLM_TOUCHPOINTS_DATABASE_URL`, else `CLM_DATABASE_URL`, else SQLite).
    pub database_url: Secret,
    /// How far in the future `occur_time` may be (`CLM_TOUCHPOINT_MAX_FUTURE_SKEW_SECONDS`,
    /// default `CLM_MAX_CLOCK_SKEW_SECONDS`, the bound of every service).
    pub max_future_skew: Duration,
    /// Deadline of each call to identity (`CLM_IDENTITY_TIMEOUT_MS`, default 5000).
    pub identity_timeout: Duration,
    /// Database connections (`CLM_TOUCHPOINTS_DB_CONNECTIONS`, default 16).
    pub max_connections: u32,
    /// How long a replica's lease on the customer event log consumer lasts
    /// without renewal (`CLM_SHARD_LEASE_MS`, see [`leases::lease_time`]).
    pub lease_time: Duration,
}

impl TouchpointsConfig {
    /// Reads and validates the settings.
    pub fn from_env(platform: &PlatformConfig, env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            database_url: platform.database_url_for(env, SERVICE_NAME)?,
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
            lease_time: leases::lease_time(env)?,
        })
    }
}

/// The touchpoints service, as the binary lists it.
pub struct Touchpoints;

impl Service for Touchpoints {
    fn info(&self) -> &'static ServiceInfo {
        &INFO
    }

    fn configure(
        &self,
        platform: &PlatformConfig,
        env: &Env,
    ) -> Result<Box<dyn Configured>, ConfigError> {
        Ok(Box::new(TouchpointsConfig::from_env(platform, env)?))
    }
}

/// What the binary and the deploy manifests know of this service.
const INFO: ServiceInfo = ServiceInfo {
    name: SERVICE_NAME,
    about: "Interactions, timelines and the touchpoint log",
    grpc_services: &["clm.touchpoint.v1.TouchpointService"],
    calls: &[IDENTITY],
    // Any valid UUID works on an empty database: no touchpoints, an empty
    // count, and no call to identity.
    smoke_call: SmokeCall {
        service: "clm.touchpoint.v1.TouchpointService",
        method: "CountTouchpoints",
        request: r#"{"customer_id": "0190c2a8-1b2c-7d3e-8f40-516273849506"}"#,
    },
};

/// The service that resolves customers and whose log touchpoints follows.
const IDENTITY: &str = "identity";

#[async_trait]
impl Configured for TouchpointsConfig {
    async fn migrate(&self) -> anyhow::Result<()> {
        store::MIGRATIONS.apply(&self.database_url).await
    }

    /// Connects, migrates when asked to, starts the identity event consumer
    /// and mounts the service.
    async fn start(self: Box<Self>, context: &mut StartContext<'_>) -> anyhow::Result<()> {
        let platform = context.platform;
        let pools = store::MIGRATIONS
            .open(
                &self.database_url,
                self.max_connections,
                platform.migrate_on_start,
            )
            .await?;
        let store = store::open(pools.clone());
        let identity_url = context.peers.url(IDENTITY)?;
        let identity = context.peers.channel(IDENTITY)?;
        let resolver = IdentityResolver::new(identity.clone(), self.identity_timeout);
        let events_channel = identity;
        let (projected, projection_resolver) = (store.clone(), resolver.clone());
        // One replica at a time follows the log: its changes touch every
        // shard of touchpoints.
        let group = LeaseGroup {
            name: identity_events::CONSUMER_NAME,
            shards: 1,
            lease_time: self.lease_time,
        };
        context
            .tasks
            .spawn(identity_events::CONSUMER_NAME, move |stop| {
                consumer::run_leased(
                    identity_events::CONSUMER_NAME,
                    pools,
                    group,
                    move || {
                        (
                            GrpcLogSource::<CustomerEvents>::new(events_channel.clone()),
                            TouchpointCustomerProjection::new(
                                projected.clone(),
                                projection_resolver.clone(),
                            ),
                        )
                    },
                    Backoff::default(),
                    stop,
                )
            });
        let ingest = TouchpointIngest::new(store, resolver).with_group_commit();
        let grpc = TouchpointGrpc::new(
            ingest,
            platform.limits,
            self.max_future_skew,
            context.shutdown.clone(),
        );
        context.mounted.add(clm_platform::limited!(
            clm_proto::touchpoint::touchpoint_service_server::TouchpointServiceServer::new(grpc),
            platform.limits
        ));
        tracing::info!(identity = %identity_url, "touchpoints service ready");
        Ok(())
    }
}
