//! The feedback service: surveys (NPS, CSAT, CES and custom questions) with
//! their triggers and limits, responses recorded once by the caller's
//! response id with the sentiment of their free text, summaries from
//! rollups kept as responses arrive, and the feedback log.

pub mod grpc;
pub mod model;
pub mod sentiment;
pub mod service;
pub mod store;
pub mod summary;
pub mod triggers;

use std::time::Duration;

use async_trait::async_trait;
use clm_platform::identity::IdentityResolver;
use clm_platform::service::{Configured, Service, ServiceInfo, SmokeCall, StartContext};
use clm_platform::{ConfigError, Env, PlatformConfig, Secret};

use crate::grpc::SurveyGrpc;
use crate::service::Feedback;

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
    calls: &[IDENTITY],
    // An empty database lists no surveys.
    smoke_call: SmokeCall {
        service: "clm.feedback.v1.SurveyService",
        method: "ListSurveys",
        request: "{}",
    },
};

/// The service that resolves the customers of responses.
const IDENTITY: &str = "identity";

#[async_trait]
impl Configured for FeedbackConfig {
    async fn migrate(&self) -> anyhow::Result<()> {
        store::MIGRATIONS.apply(&self.database_url).await
    }

    /// Connects, migrates when asked to, and mounts the service.
    async fn start(self: Box<Self>, context: &mut StartContext<'_>) -> anyhow::Result<()> {
        let platform = context.platform;
        let pools = store::MIGRATIONS
            .open(
                &self.database_url,
                self.max_connections,
                platform.migrate_on_start,
            )
            .await?;
        let store = store::open(pools);
        let resolver =
            IdentityResolver::new(context.peers.channel(IDENTITY)?, self.identity_timeout);
        let grpc = SurveyGrpc::new(
            Feedback::new(store, resolver),
            self.max_future_skew,
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
