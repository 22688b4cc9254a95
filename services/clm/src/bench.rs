//! `clm bench`: load benchmarks that print figures.
//!
//! `clm bench ingest` measures touchpoint ingest; see its module.
//!
//! `clm bench feedback` measures the feedback service's dispatch latency,
//! RecordResponse and GetSurveySummary; see its module.
//!
//! `clm bench get-customer` starts identity servers of this same binary,
//! seeds customers and measures, with many concurrent clients over several
//! HTTP/2 connections, the requests per second and p50/p99 latency of
//! GetCustomer on a cache miss (a database read), on an in-process cache hit
//! and on a Redis cache hit, each next to the health Check of the same
//! server: the no-op that passes through the same middleware. A hit phase
//! and its baseline alternate in one-second slices (ABBA), so that both see
//! the same background load on a shared machine. With `--server` it
//! measures an already running server instead.

mod database;
mod evaluate;
mod feedback;
mod ingest;
mod lifecycle;
mod load;
mod report;
mod rescore;
mod server_process;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::json;
use tonic::transport::Channel;

use self::load::{
    PhaseMeasurement, Workload, connect_channels, is_serving, measure, measure_alternating,
    seed_customers,
};
use self::report::{PhaseRole, PhaseRow, Report, TargetCheck};
use self::server_process::{ServerProcess, ServerSpec};

/// The longest a warm-up pass over the hot set may take.
const WARM_UP_LIMIT: Duration = Duration::from_secs(60);
/// How long Redis may take to answer the reachability probe.
const REDIS_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

const HEALTH_PHASE: &str = "health Check (baseline)";
const MISS_PHASE: &str = "GetCustomer, cache miss (database read)";
const IN_PROCESS_HIT_PHASE: &str = "GetCustomer, in-process cache hit";
const REDIS_HIT_PHASE: &str = "GetCustomer, Redis cache hit";
const RUNNING_SERVER_HIT_PHASE: &str = "GetCustomer, cache hit";

/// Arguments of `clm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    benchmark: Benchmark,
}

#[derive(Debug, Subcommand)]
enum Benchmark {
    /// GetCustomer on a cache miss, an in-process hit and a Redis hit,
    /// each compared with the health Check of the same server.
    ///
    /// Starts `clm serve identity` child processes on free loopback ports
    /// (other CLM_* settings of this environment pass through to them),
    /// seeds customers, measures, and stops the servers.
    GetCustomer(GetCustomerBenchArgs),
    /// Touchpoint ingest into PostgreSQL (batches of 1,000 and 10,000,
    /// client streams) next to a raw binary COPY of the same rows, unary
    /// RecordTouchpoint against the health Check, and the touchpoint log
    /// read by a consumer that is behind.
    ///
    /// Creates a fresh database on the PostgreSQL server, starts `clm serve
    /// identity touchpoints` on it, measures, and drops the database.
    Ingest(ingest::IngestBenchArgs),
    /// The CPU time of one lifecycle evaluation of a typical customer with
    /// the default scoring model, excluding I/O.
    Evaluate(evaluate::EvaluateBenchArgs),
    /// Rescoring every customer after a model is activated: generates
    /// customers with a typical history (default 1,000,000 with 20
    /// touchpoints each) into a scoring store (SQLite, or PostgreSQL with
    /// --admin-database-url), activates a second model and times the
    /// rescore worker until every customer is evaluated.
    Rescore(rescore::RescoreBenchArgs),
    /// Touchpoint to stage on GetCustomer while touchpoints stream in:
    /// starts identity, touchpoints and scoring on a fresh PostgreSQL
    /// database, ingests at --rate events/s and times purchases of fresh
    /// customers until their profile shows CONVERSION (p50/p90/p99).
    Lifecycle(lifecycle::LifecycleBenchArgs),
    /// The feedback service's targets: transition to dispatch while 1,000
    /// transitions/s flow, RecordResponse next to the health Check, and
    /// GetSurveySummary over a year of 1,000,000 responses.
    ///
    /// Creates a fresh PostgreSQL database, starts `clm serve` (every
    /// service) on it, seeds identified customers and times the dispatches
    /// of their first page views (each a transition into ACQUISITION;
    /// p50/p90/p99), measures unary RecordResponse alternating with
    /// the health Check, seeds a year-old survey through the feedback store
    /// and times summaries over random and whole-survey windows; drops the
    /// database.
    Feedback(feedback::FeedbackBenchArgs),
}

/// Arguments of `clm bench get-customer`.
#[derive(Debug, Args)]
struct GetCustomerBenchArgs {
    /// How long each phase sends requests, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Concurrent clients, each sending one request after another.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: u32,
    /// HTTP/2 connections the clients are spread over, round-robin.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    channels: u32,
    /// Customers to create before measuring; the cache-miss phase reads
    /// each at most once, so it ends early when they run out.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    customers: u32,
    /// Customers in the hot set that the cache-hit phases read repeatedly.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    hot_customers: u32,
    /// The servers' database (default: a SQLite file in a fresh temporary
    /// directory); a postgres:// URL is passed on as CLM_DATABASE_URL.
    #[arg(long, conflicts_with = "server")]
    database_url: Option<String>,
    /// The Redis server for the Redis-hit phase; skipped when unreachable.
    #[arg(
        long,
        default_value = "redis://127.0.0.1:6379/",
        conflicts_with = "server"
    )]
    redis_url: String,
    /// Measure health and GetCustomer hits against this running server
    /// (host:port) instead of starting servers.
    #[arg(long, value_name = "HOST:PORT")]
    server: Option<String>,
    /// Print the figures as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

impl GetCustomerBenchArgs {
    fn phase_duration(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }

    fn concurrency(&self) -> usize {
        self.concurrency as usize
    }

    fn setup(&self, target: &str) -> (String, serde_json::Value) {
        let text = format!(
            "clm bench get-customer: {target}; {} clients over {} connections, {} s per phase (hits and health alternating every {} s), hot set of {} customers",
            self.concurrency,
            self.channels,
            self.seconds,
            load::ALTERNATION_SLICE.as_secs(),
            self.hot_customers
        );
        let json = json!({
            "target": target,
            "concurrency": self.concurrency,
            "channels": self.channels,
            "seconds_per_phase": self.seconds,
            "customers": self.customers,
            "hot_customers": self.hot_customers,
        });
        (text, json)
    }
}

/// Runs the benchmark named in `args` and prints its figures.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.benchmark {
        Benchmark::Ingest(args) => ingest::run(args).await,
        Benchmark::Evaluate(args) => evaluate::run(&args),
        Benchmark::Rescore(args) => rescore::run(args).await,
        Benchmark::Lifecycle(args) => lifecycle::run(args).await,
        Benchmark::Feedback(args) => feedback::run(args).await,
        Benchmark::GetCustomer(args) => {
            let report = match &args.server {
                Some(address) => bench_running_server(&args, address).await?,
                None => bench_started_servers(&args).await?,
            };
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
    }
}

fn progress(message: &str) {
    eprintln!("clm bench: {message}");
}

/// The full benchmark: server A with the in-process cache, then server B
/// with Redis, both on the same database.
async fn bench_started_servers(args: &GetCustomerBenchArgs) -> anyhow::Result<Report> {
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let data_dir = tempfile::Builder::new()
        .prefix("clm-bench-")
        .tempdir()
        .context("cannot create a temporary data directory")?;
    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", data_dir.path().join("identity.db").display()));
    let database_kind = database_url
        .split_once("://")
        .map_or("unknown", |(scheme, _)| scheme)
        .to_owned();
    let in_process_spec = ServerSpec::this_binary(data_dir.path(), &database_url, &["identity"])?;
    let server_a = "A (in-process cache)".to_owned();
    let server_b = "B (Redis cache)".to_owned();
    let (setup, mut setup_json) =
        args.setup(&format!("servers started here, {database_kind} database"));
    setup_json["database"] = json!(database_kind);
    let mut report = Report {
        setup,
        setup_json,
        rows: Vec::new(),
        target: Some(TargetCheck {
            label: "Redis-hit / health",
            server: server_b.clone(),
            phase: REDIS_HIT_PHASE,
        }),
        notes: Vec::new(),
    };

    // 1. Seed through server A.
    progress(&format!(
        "starting server A (in-process cache, {database_kind} database)"
    ));
    let mut server = ServerProcess::start("A", &in_process_spec).await?;
    let channels = connect_to(&server, args).await?;
    let customer_ids = seed(
        args,
        &channels,
        args.customers as usize,
        &run_id,
        &mut report,
    )
    .await?;
    server.ensure_running("seeding")?;
    drop(channels);
    // 2. CreateCustomer wrote every new customer through to the cache, so
    // restart for an empty one.
    progress("restarting server A so that its in-process cache is empty");
    server.stop().await?;
    let mut server = ServerProcess::start("A", &in_process_spec).await?;
    let channels = connect_to(&server, args).await?;

    // 3. Every read is the first of its id in this process: a miss.
    progress(&format!("measuring: {MISS_PHASE}"));
    let misses = Workload::read_each_once(customer_ids.clone());
    let measured = measure(
        &channels,
        args.concurrency(),
        args.phase_duration(),
        &misses,
    )
    .await?;
    server.ensure_running("the cache-miss phase")?;
    if misses.ids_consumed() >= customer_ids.len() {
        report.notes.push(format!(
            "the cache-miss phase read all {} customers in {:.1} s; raise --customers for a full-length phase",
            customer_ids.len(),
            measured.elapsed.as_secs_f64()
        ));
    }
    report.rows.push(measured_row(
        &server_a,
        MISS_PHASE,
        PhaseRole::Measured,
        measured,
    ));

    // 4. The hot set was read in phase 3; the warm-up covers what was not.
    let hot_ids = hot_set(&customer_ids, args);
    warm_up(args, &channels, &hot_ids, "A", &mut report).await?;

    // 5. In-process hits and the baseline of server A, alternating.
    measure_hits_against_health(
        args,
        &channels,
        &hot_ids,
        &server_a,
        IN_PROCESS_HIT_PHASE,
        &mut report,
    )
    .await?;
    server.ensure_running("the in-process cache-hit phase")?;
    drop(channels);
    server.stop().await?;

    // 6. Server B with Redis, on the same database.
    let mut redis = match RedisProbe::connect(&args.redis_url).await {
        Ok(redis) => redis,
        Err(reason) => {
            let reason = format!("redis at --redis-url is unreachable: {reason}");
            progress(&format!("{reason}; skipping the Redis phase"));
            for (phase, role) in [
                (REDIS_HIT_PHASE, PhaseRole::Measured),
                (HEALTH_PHASE, PhaseRole::Baseline),
            ] {
                report.rows.push(PhaseRow {
                    server: server_b.clone(),
                    phase,
                    role,
                    measurement: Err(reason.clone()),
                });
            }
            return Ok(report);
        }
    };
    let redis_spec = ServerSpec {
        redis_url: Some(args.redis_url.clone()),
        ..in_process_spec
    };
    progress("starting server B (Redis cache)");
    let mut server = ServerProcess::start("B", &redis_spec).await?;
    let channels = connect_to(&server, args).await?;
    warm_up(args, &channels, &hot_ids, "B", &mut report).await?;
    let before = redis.keyspace_counts().await;
    let hit_requests = measure_hits_against_health(
        args,
        &channels,
        &hot_ids,
        &server_b,
        REDIS_HIT_PHASE,
        &mut report,
    )
    .await?;
    server.ensure_running("the Redis cache-hit phase")?;
    let after = redis.keyspace_counts().await;
    if let (Ok(before), Ok(after)) = (before, after) {
        let hits = after.hits.saturating_sub(before.hits);
        let misses = after.misses.saturating_sub(before.misses);
        report.notes.push(format!(
            "redis counted {hits} keyspace hits and {misses} misses during the Redis-hit phase ({hit_requests} GetCustomer answered)"
        ));
        let client_cache = std::env::var("CLM_REDIS_CLIENT_CACHE")
            .map(|v| {
                !matches!(
                    v.to_ascii_lowercase().as_str(),
                    "0" | "false" | "no" | "off"
                )
            })
            .unwrap_or(true);
        if client_cache {
            report.notes.push(
                "Redis client-side caching is on (CLM_REDIS_CLIENT_CACHE): repeated reads of a hot profile are served from the \
                 server's tracked copy of the Redis entry, which Redis invalidates on change; run with \
                 CLM_REDIS_CLIENT_CACHE=false to measure a Redis round trip per read"
                    .to_owned(),
            );
        } else if hits < hit_requests {
            report.notes.push(
                "fewer redis hits than GetCustomer answers: some reads did not come from redis (see the server's warnings above)"
                    .to_owned(),
            );
        }
    }
    drop(channels);
    server.stop().await?;
    Ok(report)
}

/// Health and GetCustomer hits against a server started elsewhere.
async fn bench_running_server(
    args: &GetCustomerBenchArgs,
    address: &str,
) -> anyhow::Result<Report> {
    let server_label = address.to_owned();
    let (setup, setup_json) = args.setup(&format!("running server {address}"));
    let mut report = Report {
        setup,
        setup_json,
        rows: Vec::new(),
        target: Some(TargetCheck {
            label: "GetCustomer-hit / health",
            server: server_label.clone(),
            phase: RUNNING_SERVER_HIT_PHASE,
        }),
        notes: vec![
            "the benchmark does not know this server's cache backend; the 0.70 target is for a Redis-backed one".to_owned(),
        ],
    };
    let channels = connect_channels(address, args.channels as usize).await?;
    let serving = is_serving(channels[0].clone())
        .await
        .with_context(|| format!("health check of {address} failed"))?;
    anyhow::ensure!(serving, "{address} is not SERVING");
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let customer_ids = seed(
        args,
        &channels,
        args.hot_customers as usize,
        &run_id,
        &mut report,
    )
    .await?;
    let hot_ids = hot_set(&customer_ids, args);
    warm_up(args, &channels, &hot_ids, address, &mut report).await?;
    measure_hits_against_health(
        args,
        &channels,
        &hot_ids,
        &server_label,
        RUNNING_SERVER_HIT_PHASE,
        &mut report,
    )
    .await?;
    Ok(report)
}

/// Measures GetCustomer of the hot set and the health Check in alternating
/// slices, adds both rows and returns how many GetCustomer calls succeeded.
async fn measure_hits_against_health(
    args: &GetCustomerBenchArgs,
    channels: &[Channel],
    hot_ids: &Arc<[String]>,
    server: &str,
    hit_phase: &'static str,
    report: &mut Report,
) -> anyhow::Result<u64> {
    progress(&format!(
        "measuring on server {server}: {hit_phase} and {HEALTH_PHASE}, alternating every {} s",
        load::ALTERNATION_SLICE.as_secs()
    ));
    let hits = Workload::ReadRepeatedly {
        customer_ids: hot_ids.clone(),
    };
    let [hit_measurement, health_measurement] = measure_alternating(
        channels,
        args.concurrency(),
        args.phase_duration(),
        [&hits, &Workload::HealthCheck],
    )
    .await?;
    let hit_requests = hit_measurement.requests;
    report.rows.push(measured_row(
        server,
        hit_phase,
        PhaseRole::Measured,
        hit_measurement,
    ));
    report.rows.push(measured_row(
        server,
        HEALTH_PHASE,
        PhaseRole::Baseline,
        health_measurement,
    ));
    Ok(hit_requests)
}

fn measured_row(
    server: &str,
    phase: &'static str,
    role: PhaseRole,
    measured: PhaseMeasurement,
) -> PhaseRow {
    PhaseRow {
        server: server.to_owned(),
        phase,
        role,
        measurement: Ok(measured),
    }
}

async fn connect_to(
    server: &ServerProcess,
    args: &GetCustomerBenchArgs,
) -> anyhow::Result<Vec<Channel>> {
    connect_channels(&server.address().to_string(), args.channels as usize).await
}

/// Creates `count` customers and returns their ids; fails when none could
/// be created, notes the errors when some could not.
async fn seed(
    args: &GetCustomerBenchArgs,
    channels: &[Channel],
    count: usize,
    run_id: &str,
    report: &mut Report,
) -> anyhow::Result<Arc<[String]>> {
    progress(&format!("creating {count} customers"));
    let started = Instant::now();
    let seeded = seed_customers(channels, args.concurrency(), count, run_id).await?;
    let seconds = started.elapsed().as_secs_f64();
    progress(&format!(
        "created {} customers in {seconds:.1} s ({:.0}/s)",
        seeded.customer_ids.len(),
        seeded.customer_ids.len() as f64 / seconds.max(f64::EPSILON)
    ));
    for (code, (failed, first_message)) in &seeded.errors.by_code {
        report.notes.push(format!(
            "{failed} CreateCustomer calls failed with {code} while seeding (first: {first_message})"
        ));
    }
    anyhow::ensure!(
        !seeded.customer_ids.is_empty(),
        "no customer could be created: {}",
        report.notes.join("; ")
    );
    Ok(seeded.customer_ids.into())
}

fn hot_set(customer_ids: &Arc<[String]>, args: &GetCustomerBenchArgs) -> Arc<[String]> {
    let size = (args.hot_customers as usize).min(customer_ids.len());
    customer_ids[..size].into()
}

/// Reads each hot customer once so that the cache holds all of them.
async fn warm_up(
    args: &GetCustomerBenchArgs,
    channels: &[Channel],
    hot_ids: &Arc<[String]>,
    server: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    progress(&format!(
        "warming the cache of server {server} with {} customers",
        hot_ids.len()
    ));
    let warmed = measure(
        channels,
        args.concurrency(),
        WARM_UP_LIMIT,
        &Workload::read_each_once(hot_ids.clone()),
    )
    .await?;
    for (code, (failed, first_message)) in &warmed.errors.by_code {
        report.notes.push(format!(
            "{failed} GetCustomer calls failed with {code} while warming server {server} (first: {first_message})"
        ));
    }
    Ok(())
}

/// Redis's own hit and miss counters (`INFO stats`).
#[derive(Debug, Clone, Copy)]
struct KeyspaceCounts {
    hits: u64,
    misses: u64,
}

/// A connection to the Redis server the Redis phase uses, to check that it
/// is reachable and to read its counters.
struct RedisProbe {
    connection: redis::aio::MultiplexedConnection,
}

impl RedisProbe {
    async fn connect(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|err| err.to_string())?;
        let attempt = async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await?;
            Ok::<_, redis::RedisError>(connection)
        };
        match tokio::time::timeout(REDIS_PROBE_TIMEOUT, attempt).await {
            Ok(Ok(connection)) => Ok(Self { connection }),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!(
                "no answer within {} s",
                REDIS_PROBE_TIMEOUT.as_secs()
            )),
        }
    }

    async fn keyspace_counts(&mut self) -> anyhow::Result<KeyspaceCounts> {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut self.connection)
            .await
            .context("cannot read redis INFO stats")?;
        let counter = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|value| value.trim().parse::<u64>().ok())
                .with_context(|| format!("redis INFO stats has no {name}"))
        };
        Ok(KeyspaceCounts {
            hits: counter("keyspace_hits")?,
            misses: counter("keyspace_misses")?,
        })
    }
}
