//! The scoring service: settings, start-up (database, default model,
//! consumers, sweep, pusher, rescore worker) and the gRPC mount.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use clm_eventlog::ShardFilter;
use clm_eventlog::consumer::{self, Backoff};
use clm_eventlog::leases::{self, HeldShards, LeaseGroup, ShardLease};
use clm_eventlog::sources::{CustomerEvents, FeedbackLog, GrpcLogSource, TouchpointLog};
use clm_platform::db::Pools;
use clm_platform::server::Shutdown;
use clm_platform::service::{
    Configured, PeerChannel, Service, ServiceInfo, SmokeCall, StartContext,
};
use clm_platform::{ConfigError, Env, PlatformConfig, Secret};
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::consumers::{
    CUSTOMERS_CONSUMER, CustomerEventProjection, FeedbackProjection, TouchpointProjection,
};
use crate::default_model::default_model;
use crate::grpc::LifecycleGrpc;
use crate::history::Cause;
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
    /// How long a replica's lease on a shard lasts without renewal
    /// (`CLM_SHARD_LEASE_MS`, see [`leases::lease_time`]).
    pub lease_time: Duration,
    /// Where "now" comes from (`CLM_SCORING_CLOCK_FILE`: testing only).
    pub clock: Clock,
}

impl ScoringConfig {
    /// Reads and validates the settings.
    pub fn from_env(platform: &PlatformConfig, env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            database_url: platform.database_url_for(env, SERVICE_NAME)?,
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
            lease_time: leases::lease_time(env)?,
            clock: Clock::from_env(env, SERVICE_NAME),
        })
    }
}

/// The service scoring pushes snapshots to and whose log it follows.
const IDENTITY: &str = "identity";
/// The service whose log scoring folds.
const TOUCHPOINTS: &str = "touchpoints";
/// The service whose feedback log (survey answers) scoring folds in.
const FEEDBACK: &str = "feedback";

/// The scoring service, as the binary lists it.
pub struct Scoring;

impl Service for Scoring {
    fn info(&self) -> &'static ServiceInfo {
        &INFO
    }

    fn configure(
        &self,
        platform: &PlatformConfig,
        env: &Env,
    ) -> Result<Box<dyn Configured>, ConfigError> {
        Ok(Box::new(ScoringConfig::from_env(platform, env)?))
    }
}

/// What the binary and the deploy manifests know of this service.
const INFO: ServiceInfo = ServiceInfo {
    name: SERVICE_NAME,
    about: "Lifecycle stages, scores, models and transitions",
    grpc_services: &["clm.scoring.v1.LifecycleService"],
    calls: &[TOUCHPOINTS, IDENTITY, FEEDBACK],
    // A fresh database already holds the default model.
    smoke_call: SmokeCall {
        service: "clm.scoring.v1.LifecycleService",
        method: "ListModels",
        request: r#"{"page_size": 10}"#,
    },
};

#[async_trait]
impl Configured for ScoringConfig {
    async fn migrate(&self) -> anyhow::Result<()> {
        store::MIGRATIONS.apply(&self.database_url).await
    }

    /// Connects, migrates when asked to, installs the default model, takes
    /// its share of the shard leases (the touchpoint log consumer, the
    /// sweep and the rescore worker of each shard held, and one pusher for
    /// the shards held) and of the customer event log consumer, and mounts
    /// the service.
    async fn start(self: Box<Self>, context: &mut StartContext<'_>) -> anyhow::Result<()> {
        let config = *self;
        let platform = context.platform;
        let pools = store::MIGRATIONS
            .open(
                &config.database_url,
                config.max_connections,
                platform.migrate_on_start,
            )
            .await?;
        let store = store::open(pools.clone());
        store
            .install_default(&default_model(), Utc::now())
            .await
            .map_err(|err| anyhow::anyhow!("cannot install the default model: {err}"))?;
        // On PostgreSQL every replica takes a share of the shards: the sweep
        // and rescore pages of a shard go with its log consumer, and one
        // pusher covers the shards held. On SQLite the one process owns
        // every shard and runs those once, over all customers.
        let divided = matches!(pools, Pools::Postgres(_));
        let scorer = Arc::new(Scorer::new(store.clone(), config.clock.clone()));
        let identity = context.peers.channel(IDENTITY)?;
        let touchpoints = context.peers.channel(TOUCHPOINTS)?;
        let feedback = context.peers.channel(FEEDBACK)?;
        let tasks = &mut *context.tasks;
        let rescore_wake = Arc::new(Notify::new());
        let shard_work = ShardWork {
            scorer: scorer.clone(),
            touchpoints: touchpoints.clone(),
            feedback: feedback.clone(),
            rescore_wake: rescore_wake.clone(),
            config: config.clone(),
            divided,
        };
        let group = LeaseGroup {
            name: SHARDS_GROUP,
            shards: config.log_shards,
            lease_time: config.lease_time,
        };
        let leased = pools.clone();
        // The pusher covers the shards held on PostgreSQL, and every
        // customer at once on SQLite (whose store does not divide them).
        let tracked = HeldShards::default();
        let held = if divided {
            tracked.clone()
        } else {
            HeldShards::fixed([ShardLease::sole(ShardFilter::ALL)])
        };
        tasks.spawn(SHARDS_GROUP, move |stop| {
            leases::run_tracked(
                leased,
                group,
                tracked,
                move |lease, stop| shard_work.clone().run(lease, stop),
                stop,
            )
        });
        let (scorer_, identity_, timeout) = (scorer.clone(), identity.clone(), config.call_timeout);
        let customers_group = LeaseGroup {
            name: CUSTOMERS_CONSUMER,
            shards: 1,
            lease_time: config.lease_time,
        };
        tasks.spawn(CUSTOMERS_CONSUMER, move |stop| {
            consumer::run_leased(
                CUSTOMERS_CONSUMER,
                pools,
                customers_group,
                move || {
                    (
                        GrpcLogSource::<CustomerEvents>::new(identity_.clone()),
                        CustomerEventProjection::new(scorer_.clone(), identity_.clone(), timeout),
                    )
                },
                Backoff::default(),
                stop,
            )
        });
        let pusher = Pusher::new(
            store.clone(),
            held,
            identity.clone(),
            config.call_timeout,
            config.push_concurrency,
            config.score_push_interval,
        );
        let changed = scorer.changed();
        tasks.spawn("scoring.push", move |stop| async move {
            pusher.run(changed, stop).await;
            Ok(())
        });
        if !divided {
            let work = ShardWork {
                scorer: scorer.clone(),
                touchpoints: touchpoints.clone(),
                feedback: feedback.clone(),
                rescore_wake: rescore_wake.clone(),
                config: config.clone(),
                divided,
            };
            tasks.spawn("scoring.customers", move |stop| {
                work.customers(ShardLease::sole(ShardFilter::ALL), stop)
            });
        }
        let grpc = LifecycleGrpc::new(scorer, touchpoints, rescore_wake, context.shutdown.clone());
        context.mounted.add(clm_platform::limited!(
            clm_proto::scoring::lifecycle_service_server::LifecycleServiceServer::new(grpc),
            platform.limits
        ));
        tracing::info!(shards = config.log_shards, "scoring service ready");
        Ok(())
    }
}

/// The lease group the touchpoint log shards (and the customers' sweep,
/// rescore pages and pushes with them) are divided in.
const SHARDS_GROUP: &str = "scoring.shards";

/// What runs on one shard of the scoring service.
#[derive(Clone)]
struct ShardWork {
    scorer: Arc<Scorer>,
    touchpoints: PeerChannel,
    feedback: PeerChannel,
    rescore_wake: Arc<Notify>,
    config: ScoringConfig,
    /// Whether the customers' work is divided by shard too (PostgreSQL).
    divided: bool,
}

impl ShardWork {
    /// The touchpoint log consumer of the shard, and when the work is
    /// divided, the sweep and rescore pages of its customers;
    /// until `stop`.
    async fn run(self, lease: ShardLease, stop: Shutdown) -> anyhow::Result<()> {
        let shard = lease.shard;
        let source = GrpcLogSource::<TouchpointLog>::new(self.touchpoints.clone());
        let projection = TouchpointProjection::new(self.scorer.clone());
        let touchpoints = consumer::run(
            "scoring.touchpoints",
            source,
            projection,
            lease.clone(),
            Backoff::default(),
            stop.clone(),
        );
        // The shard's survey answers, beside its touchpoints: the feedback
        // log is sharded by customer as the touchpoint log is.
        let answers = consumer::run(
            "scoring.feedback",
            GrpcLogSource::<FeedbackLog>::new(self.feedback.clone()),
            FeedbackProjection::new(self.scorer.clone()),
            lease.clone(),
            Backoff::default(),
            stop.clone(),
        );
        let consume = async move {
            tokio::join!(touchpoints, answers);
        };
        if self.divided {
            // Tasks of their own, so a batch being evaluated never holds up
            // the shard's pushes.
            let consumer = tokio::spawn(consume);
            let customers = self.customers(lease, stop).await;
            consumer.await?;
            customers
        } else {
            consume.await;
            tracing::debug!(shard = shard.index, "touchpoint log consumer stopped");
            Ok(())
        }
    }

    /// The sweep and rescore pages of the customers of the shard `lease`
    /// holds, until `stop`.
    async fn customers(self, lease: ShardLease, stop: Shutdown) -> anyhow::Result<()> {
        let config = &self.config;
        let (scorer, poll, swept, sweep_stop) = (
            self.scorer.clone(),
            config.sweep_poll,
            lease.clone(),
            stop.clone(),
        );
        let tasks = [
            tokio::spawn(async move { sweep(&scorer, poll, &swept, sweep_stop).await }),
            tokio::spawn(rescore::run_worker(
                self.scorer.clone(),
                self.rescore_wake.clone(),
                lease,
                stop,
            )),
        ];
        for task in tasks {
            task.await?;
        }
        Ok(())
    }
}

/// Evaluates the customers of the shard `lease` holds whose next
/// evaluation time has passed, so that time alone moves them (AT_RISK,
/// CHURNED, tenure).
async fn sweep(scorer: &Scorer, poll: Duration, lease: &ShardLease, shutdown: Shutdown) {
    loop {
        let now = scorer.now();
        let evaluated = match scorer
            .store()
            .due_customers(now, SWEEP_BATCH, lease.shard)
            .await
        {
            Ok(due) if due.is_empty() => 0,
            Ok(due) => match scorer
                .evaluate_now(&due, Cause::Sweep, true, &lease.fence)
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
