//! The identity service: customer profiles, their identity keys (e-mails,
//! phones, external and anonymous ids), resolve-or-create, merges with a
//! ledger, consents, GDPR erasure with a suppression list, the lifecycle
//! snapshot shown on the profile, the customer event log, and hot profiles
//! cached in Redis or in-process.

pub mod convert;
pub mod directory;
pub mod error;
pub mod grpc;
pub mod keys;
pub mod model;
pub mod profiles;
pub mod store;

use std::sync::Arc;

use async_trait::async_trait;

use clm_platform::cache::{VersionedCache, backend_from_config};
use clm_platform::db::DatabaseKind;
use clm_platform::service::{Configured, Service, ServiceInfo, SmokeCall, StartContext};
use clm_platform::{ConfigError, Env, PlatformConfig, Secret};

use crate::directory::CustomerDirectory;
use crate::grpc::CustomerGrpc;
use crate::keys::{KeyHasher, KeyNormalizer};

/// The name of this service in `clm serve` and `clm migrate`.
pub const SERVICE_NAME: &str = "identity";

/// The key used to hash erased identity keys when none is configured. Fine
/// for the embedded mode; a deployment sets its own secret.
const DEVELOPMENT_HASH_KEY: &str = "clm-embedded-development-hash-key";

/// The identity service's settings.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// Its database (`CLM_IDENTITY_DATABASE_URL`, else `CLM_DATABASE_URL`, else SQLite).
    pub database_url: Secret,
    /// Region for phone numbers without a country prefix (`CLM_PHONE_DEFAULT_REGION`).
    pub phone_default_region: Option<String>,
    /// Secret for hashing erased identity keys (`CLM_IDENTITY_HASH_KEY`).
    pub hash_key: Secret,
    /// Database connections (`CLM_IDENTITY_DB_CONNECTIONS`, default 16).
    pub max_connections: u32,
}

impl IdentityConfig {
    /// Reads and validates the settings.
    pub fn from_env(platform: &PlatformConfig, env: &Env) -> Result<Self, ConfigError> {
        let phone_default_region = env.string("CLM_PHONE_DEFAULT_REGION");
        if let Some(region) = &phone_default_region {
            KeyNormalizer::new(Some(region))
                .map_err(|reason| ConfigError::new("CLM_PHONE_DEFAULT_REGION", reason))?;
        }
        let database_url = platform.database_url_for(env, SERVICE_NAME)?;
        let hash_key = match env.string("CLM_IDENTITY_HASH_KEY") {
            Some(key) if key.len() < 16 => {
                return Err(ConfigError::new(
                    "CLM_IDENTITY_HASH_KEY",
                    "must be at least 16 characters",
                ));
            }
            Some(key) => Secret::new(key),
            None => {
                if DatabaseKind::of_url(database_url.expose()) == Ok(DatabaseKind::Postgres) {
                    tracing::warn!(
                        "CLM_IDENTITY_HASH_KEY is not set: erased identity keys are hashed with the development key"
                    );
                }
                Secret::new(DEVELOPMENT_HASH_KEY)
            }
        };
        Ok(Self {
            database_url,
            phone_default_region,
            hash_key,
            max_connections: env.bounded_or("CLM_IDENTITY_DB_CONNECTIONS", 16, 1, 1000)? as u32,
        })
    }
}

/// The identity service, as the binary lists it.
pub struct Identity;

impl Service for Identity {
    fn info(&self) -> &'static ServiceInfo {
        &INFO
    }

    fn configure(
        &self,
        platform: &PlatformConfig,
        env: &Env,
    ) -> Result<Box<dyn Configured>, ConfigError> {
        Ok(Box::new(IdentityConfig::from_env(platform, env)?))
    }
}

/// What the binary and the deploy manifests know of this service.
const INFO: ServiceInfo = ServiceInfo {
    name: SERVICE_NAME,
    about: "Customer profiles and identities",
    grpc_services: &["clm.identity.v1.CustomerService"],
    calls: &[],
    smoke_call: SmokeCall {
        service: "clm.identity.v1.CustomerService",
        method: "ListCustomers",
        request: r#"{"page_size": 10}"#,
    },
};

#[async_trait]
impl Configured for IdentityConfig {
    async fn migrate(&self) -> anyhow::Result<()> {
        store::MIGRATIONS.apply(&self.database_url).await
    }

    async fn start(self: Box<Self>, context: &mut StartContext<'_>) -> anyhow::Result<()> {
        let platform = context.platform;
        let pools = store::MIGRATIONS
            .open(
                &self.database_url,
                self.max_connections,
                platform.migrate_on_start,
            )
            .await?;
        let backend = backend_from_config(platform)?;
        let cache = Arc::new(VersionedCache::new(
            backend,
            profiles::CACHE_NAMESPACE,
            platform.cache_ttl,
        ));
        tracing::info!(cache = cache.backend_name(), "identity service ready");
        let directory = Arc::new(CustomerDirectory::new(
            store::open(pools),
            cache,
            KeyHasher::new(self.hash_key.expose().as_bytes()),
        ));
        let normalizer =
            KeyNormalizer::new(self.phone_default_region.as_deref()).map_err(anyhow::Error::msg)?;
        let grpc = CustomerGrpc::new(
            directory,
            normalizer,
            platform.limits,
            context.shutdown.clone(),
        );
        context.mounted.add(clm_platform::limited!(
            clm_proto::identity::customer_service_server::CustomerServiceServer::new(grpc),
            platform.limits
        ));
        Ok(())
    }
}
