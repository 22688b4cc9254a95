//! The feedback service: surveys (NPS, CSAT, CES and custom questions) with
//! their triggers and limits, responses recorded once by the caller's
//! response id with the sentiment of their free text, summaries from
//! rollups kept as responses arrive, and the feedback log.

pub mod compaction;
pub mod dispatcher;
pub mod grpc;
pub mod model;
pub mod sentiment;
pub mod service;
pub mod store;
pub mod summary;
pub mod triggering;
pub mod triggers;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use clm_eventlog::consumer::{self, Backoff};
use clm_eventlog::leases::{self, LeaseGroup};
use clm_eventlog::sources::{CustomerEvents, GrpcLogSource, TouchpointLog, TransitionLog};
use clm_platform::clock::Clock;
use clm_platform::identity::IdentityResolver;
use clm_platform::service::{Configured, Service, ServiceInfo, SmokeCall, StartContext};
use clm_platform::{ConfigError, Env, PlatformConfig, Secret};

use crate::dispatcher::{ConsentReader, Dispatcher};
use crate::grpc::SurveyGrpc;
use crate::service::Feedback;
use crate::triggering::{CustomerProjection, Matcher, TouchpointProjection, TransitionProjection};

/// The name of this service in `clm serve` and `clm migrate`.
pub const SERVICE_NAME: &str = "feedback";

/// The feedback service's settings.
#[derive(Debug, Clone)]
pub struct FeedbackConfig {
    /// Its database (`CLM_FEEDBACK_DATABASE_URL`, else `CLM_DATABASE_URL`, else SQLite).
    pub database_url: Secret,
    /// How far in the future `submit_time` may be (`CLM_MAX_CLOCK_SKEW_SECONDS`).
    pub max_future_skew: Duration,
    /// Deadline of each call to identity (`CLM_IDENTITY_TIMEOUT_MS`, default 5000).
    pub identity_timeout: Duration,
    /// Database connections (`CLM_FEEDBACK_DB_CONNECTIONS`, default 16).
    pub max_connections: u32,
    /// How long a replica's lease on a consumer or the sweep lasts without
    /// renewal (`CLM_SHARD_LEASE_MS`, see [`leases::lease_time`]).
    pub lease_time: Duration,
    /// How often the dispatch sweep looks for due dispatches written by
    /// other replicas (`CLM_FEEDBACK_SWEEP_MS`, default 250).
    pub sweep_interval: Duration,
    /// Where "now" comes from (`CLM_FEEDBACK_CLOCK_FILE`: testing only).
    pub clock: Clock,
}

impl FeedbackConfig {
    /// Reads and validates the settings.
    pub fn from_env(platform: &PlatformConfig, env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            database_url: platform.database_url_for(env, SERVICE_NAME)?,
            max_future_skew: platform.limits.max_clock_skew,
            identity_timeout: Duration::from_millis(env.bounded_or(
                "CLM_IDENTITY_TIMEOUT_MS",
                5000,
                50,
                60_000,
            )?),
            max_connections: env.bounded_or("CLM_FEEDBACK_DB_CONNECTIONS", 16, 1, 1000)? as u32,
            lease_time: leases::lease_time(env)?,
            sweep_interval: Duration::from_millis(env.bounded_or(
                "CLM_FEEDBACK_SWEEP_MS",
                250,
                10,
                60_000,
            )?),
            clock: Clock::from_env(env, SERVICE_NAME),
        })
    }
}

/// The feedback service, as the binary lists it.
pub struct FeedbackSurveys;

impl Service for FeedbackSurveys {
    fn info(&self) -> &'static ServiceInfo {
        &INFO
    }

    fn configure(
        &self,
        platform: &PlatformConfig,
        env: &Env,
    ) -> Result<Box<dyn Configured>, ConfigError> {
        Ok(Box::new(FeedbackConfig::from_env(platform, env)?))
    }
}

/// What the binary and the deploy manifests know of this service.
const INFO: ServiceInfo = ServiceInfo {
    name: SERVICE_NAME,
    about: "Surveys, responses with their sentiment, summaries and the feedback log",
    grpc_services: &["clm.feedback.v1.SurveyService"],
    calls: &[IDENTITY, TOUCHPOINTS, SCORING],
    // An empty database lists no surveys.
    smoke_call: SmokeCall {
        service: "clm.feedback.v1.SurveyService",
        method: "ListSurveys",
        request: "{}",
    },
};

/// The service that resolves the customers of responses, holds their
/// consents and logs merges and erasures.
const IDENTITY: &str = "identity";
/// The service whose touchpoint log triggers surveys.
const TOUCHPOINTS: &str = "touchpoints";
/// The service whose transition log triggers surveys.
const SCORING: &str = "scoring";

/// The lease group of the dispatch and expiry sweep.
const SWEEP: &str = "feedback.sweep";

#[async_trait]
impl Configured for FeedbackConfig {
    async fn migrate(&self) -> anyhow::Result<()> {
        store::MIGRATIONS.apply(&self.database_url).await
    }

    /// Connects, migrates when asked to, starts the consumers of the
    /// transition, touchpoint and customer event logs and the dispatch
    /// sweep with the rollup compaction (each on a lease: one replica at a
    /// time), and mounts the service.
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
        let identity = context.peers.channel(IDENTITY)?;
        let resolver = IdentityResolver::new(identity.clone(), self.identity_timeout);
        let matcher = Arc::new(Matcher::new(store.clone(), self.clock.clone()));
        let lease_time = self.lease_time;
        let group = move |name| LeaseGroup {
            name,
            shards: 1,
            lease_time,
        };
        let scoring = context.peers.channel(SCORING)?;
        let transitions = matcher.clone();
        let consumer_pools = pools.clone();
        context.tasks.spawn(triggering::TRANSITIONS, move |stop| {
            consumer::run_leased(
                triggering::TRANSITIONS,
                consumer_pools,
                group(triggering::TRANSITIONS),
                move || {
                    (
                        GrpcLogSource::<TransitionLog>::new(scoring.clone()),
                        TransitionProjection::new(transitions.clone()),
                    )
                },
                Backoff::default(),
                stop,
            )
        });
        let touchpoints = context.peers.channel(TOUCHPOINTS)?;
        let touched = matcher.clone();
        let consumer_pools = pools.clone();
        context.tasks.spawn(triggering::TOUCHPOINTS, move |stop| {
            consumer::run_leased(
                triggering::TOUCHPOINTS,
                consumer_pools,
                group(triggering::TOUCHPOINTS),
                move || {
                    (
                        GrpcLogSource::<TouchpointLog>::new(touchpoints.clone()),
                        TouchpointProjection::new(touched.clone()),
                    )
                },
                Backoff::default(),
                stop,
            )
        });
        let (events, changed, clock) = (identity.clone(), store.clone(), self.clock.clone());
        let consumer_pools = pools.clone();
        context
            .tasks
            .spawn(triggering::CUSTOMER_EVENTS, move |stop| {
                consumer::run_leased(
                    triggering::CUSTOMER_EVENTS,
                    consumer_pools,
                    group(triggering::CUSTOMER_EVENTS),
                    move || {
                        (
                            GrpcLogSource::<CustomerEvents>::new(events.clone()),
                            CustomerProjection::new(changed.clone(), clock.clone()),
                        )
                    },
                    Backoff::default(),
                    stop,
                )
            });
        let consent = ConsentReader::new(identity, self.identity_timeout);
        let (swept, clock, poll) = (store.clone(), self.clock.clone(), self.sweep_interval);
        context.tasks.spawn(SWEEP, move |stop| {
            leases::run(
                pools,
                group(SWEEP),
                move |_lease, stop| {
                    let dispatcher =
                        Dispatcher::new(swept.clone(), clock.clone(), consent.clone(), poll);
                    let compacting = compaction::run(swept.clone(), clock.clone(), stop.clone());
                    async move {
                        tokio::try_join!(dispatcher.run(stop), compacting)?;
                        Ok(())
                    }
                },
                stop,
            )
        });
        let grpc = SurveyGrpc::new(
            Feedback::new(store, resolver),
            self.max_future_skew,
            self.clock.clone(),
            context.shutdown.clone(),
        );
        context.mounted.add(clm_platform::limited!(
            clm_proto::feedback::survey_service_server::SurveyServiceServer::new(grpc),
            platform.limits
        ));
        tracing::info!("feedback service ready");
        Ok(())
    }
}
