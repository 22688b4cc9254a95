//! `clm bench lifecycle`: how long a touchpoint takes to show as a stage on
//! the customer's profile (GetCustomer) while touchpoints stream in at a
//! steady rate.
//!
//! It starts `clm serve identity touchpoints scoring` on a fresh PostgreSQL
//! database, seeds customers, and sends RecordTouchpoints batches paced to
//! `--rate` events per second across the background customers. Meanwhile,
//! `--probes` times per second it records a purchase for a fresh customer
//! (who has no touchpoint yet) and polls GetCustomer every few milliseconds
//! until the profile says CONVERSION (every 20 ms): the time from sending the purchase to
//! seeing the stage is one sample. The sample includes the whole path:
//! ingest, the touchpoint log, the scoring consumer, the evaluation, the
//! push to identity, identity's cache.
//!
//! It runs once per count of `--scoring-replicas` (default 1 and 2), each on
//! a fresh database: the first process serves every service, and each
//! further replica is a `clm serve scoring` process on the same database,
//! taking its share of the shard leases. Each run reports where the shards
//! were at its end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use clm_proto::common::{CustomerReference, LifecycleStage, Money, customer_reference};
use clm_proto::identity::GetCustomerRequest;
use clm_proto::identity::customer_service_client::CustomerServiceClient;
use clm_proto::touchpoint as pb;
use clm_proto::touchpoint::touchpoint_service_client::TouchpointServiceClient;
use serde_json::json;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use super::database::TemporaryDatabase;
use super::load;
use super::server_process::{ServerProcess, ServerSpec};

/// Touchpoints per background RecordTouchpoints call.
const BATCH: usize = 100;
/// How often a probe polls GetCustomer (the resolution of a sample).
const POLL: Duration = Duration::from_millis(20);
/// The longest a probe waits for the stage.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Background load before the first probe, so every consumer is live.
const WARM_UP: Duration = Duration::from_secs(5);

/// Arguments of `clm bench lifecycle`.
#[derive(Debug, Args)]
pub struct LifecycleBenchArgs {
    /// Background touchpoints per second.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    rate: u32,
    /// Seconds of measurement (after a 5 s warm-up).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Probes (purchases of fresh customers) per second.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    probes: u32,
    /// Customers the background touchpoints are spread over.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    customers: u32,
    /// A PostgreSQL server on which the benchmark creates (and drops) a
    /// fresh database; the URL names the database to connect to for that.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    admin_database_url: String,
    /// Scoring replicas of each run, comma-separated: the first serves
    /// every service, the others scoring alone on the same database.
    #[arg(long, value_delimiter = ',', default_value = "1,2",
          value_parser = clap::value_parser!(u32).range(1..=REPLICA_LABELS.len() as i64))]
    scoring_replicas: Vec<u32>,
    /// Print the figures as JSON, an object per run.
    #[arg(long)]
    json: bool,
}

/// The names of the scoring replicas' processes (the first serves every
/// service).
const REPLICA_LABELS: [&str; 4] = ["all", "scoring-2", "scoring-3", "scoring-4"];

/// Runs the benchmark.
pub async fn run(args: LifecycleBenchArgs) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for &replicas in &args.scoring_replicas {
        let database = TemporaryDatabase::create(&args.admin_database_url, "lifecycle").await?;
        let outcome = measure(&args, &database.url, replicas).await;
        let dropped = database.drop().await;
        let report = outcome?;
        dropped?;
        if !args.json {
            println!("{report}");
        }
        reports.push(report);
    }
    if args.json {
        println!("[{}]", reports.join(","));
    }
    Ok(())
}

/// Where the scoring shards are: each process's label and the shards it
/// holds an unexpired lease on.
async fn shard_distribution(
    database_url: &str,
    processes: &[(&'static str, Option<u32>)],
) -> anyhow::Result<Vec<(&'static str, Vec<i32>)>> {
    use sqlx::Connection as _;
    let mut connection = sqlx::PgConnection::connect(database_url).await?;
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT owner, shard_index FROM scoring.shard_leases \
         WHERE lease_group = 'scoring.shards' AND owner <> '' \
           AND expires_at > clock_timestamp() ORDER BY shard_index",
    )
    .fetch_all(&mut connection)
    .await?;
    Ok(processes
        .iter()
        .map(|(label, pid)| {
            let pid = pid.map(|pid| pid.to_string());
            let shards = rows
                .iter()
                .filter(|(owner, _)| owner.split('/').nth(1) == pid.as_deref())
                .map(|(_, shard)| *shard)
                .collect();
            (*label, shards)
        })
        .collect())
}

fn by_id(customer_id: &str) -> Option<CustomerReference> {
    Some(CustomerReference {
        reference: Some(customer_reference::Reference::CustomerId(
            customer_id.to_owned(),
        )),
    })
}

/// Sends background batches paced to `rate` per second until `stop`;
/// counts the touchpoints stored in `stored`.
async fn background(
    channel: Channel,
    customers: Arc<[String]>,
    rate: u32,
    run_id: String,
    stored: Arc<AtomicU64>,
    stop: Arc<tokio::sync::Notify>,
) -> anyhow::Result<()> {
    if rate == 0 {
        stop.notified().await;
        return Ok(());
    }
    let interval = Duration::from_secs_f64(BATCH as f64 / f64::from(rate));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let in_flight = Arc::new(Semaphore::new(32));
    let next = Arc::new(AtomicUsize::new(0));
    let stopped = stop.notified();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => return Ok(()),
            _ = ticker.tick() => {}
        }
        let permit = in_flight.clone().acquire_owned().await?;
        let mut client = TouchpointServiceClient::new(channel.clone());
        let first = next.fetch_add(BATCH, Ordering::Relaxed);
        let touchpoints = (first..first + BATCH)
            .map(|n| super::ingest::touchpoint(&run_id, n, &customers[n % customers.len()]))
            .collect();
        let stored = stored.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match client
                .record_touchpoints(pb::RecordTouchpointsRequest { touchpoints })
                .await
            {
                Ok(response) => {
                    stored.fetch_add(response.into_inner().stored_count as u64, Ordering::Relaxed);
                }
                Err(status) => tracing::warn!(error = %status, "a background batch failed"),
            }
        });
    }
}

/// Records a purchase for `customer` and waits until identity's profile
/// shows CONVERSION; returns the time that took.
async fn probe(channel: Channel, customer: String, run_id: String) -> anyhow::Result<Duration> {
    let mut touchpoints = TouchpointServiceClient::new(channel.clone());
    let mut identity = CustomerServiceClient::new(channel);
    let started = Instant::now();
    touchpoints
        .record_touchpoint(pb::RecordTouchpointRequest {
            touchpoint: Some(pb::Touchpoint {
                event_id: format!("{run_id}-probe-{customer}"),
                customer: by_id(&customer),
                channel: pb::Channel::Web as i32,
                r#type: "purchase".to_owned(),
                revenue: Some(Money {
                    currency_code: "EUR".to_owned(),
                    amount_micros: 49_000_000,
                }),
                ..Default::default()
            }),
        })
        .await
        .context("the probe purchase failed")?;
    loop {
        let profile = identity
            .get_customer(GetCustomerRequest {
                customer_id: customer.clone(),
            })
            .await
            .context("GetCustomer failed")?
            .into_inner();
        let stage = profile
            .customer
            .and_then(|c| c.lifecycle)
            .map(|l| l.stage)
            .unwrap_or_default();
        if stage == LifecycleStage::Conversion as i32 {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < PROBE_TIMEOUT,
            "customer {customer} did not reach CONVERSION within {} s",
            PROBE_TIMEOUT.as_secs()
        );
        tokio::time::sleep(POLL).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn measure(
    args: &LifecycleBenchArgs,
    database_url: &str,
    replicas: u32,
) -> anyhow::Result<String> {
    let run_id = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let data_dir = tempfile::tempdir()?;
    let mut spec = ServerSpec::this_binary(
        data_dir.path(),
        database_url,
        &["identity", "touchpoints", "scoring"],
    )?;
    // Feedback is not started (the figure is touchpoint to stage): scoring's
    // consumer of its log finds nothing at this address and waits.
    spec.env.push((
        "CLM_FEEDBACK_URL".to_owned(),
        "http://127.0.0.1:9".to_owned(),
    ));
    eprintln!(
        "starting identity, touchpoints and scoring on a fresh PostgreSQL database, \
         with {replicas} scoring replica(s) in all"
    );
    let mut server = ServerProcess::start(REPLICA_LABELS[0], &spec).await?;
    let mut more = Vec::new();
    for label in &REPLICA_LABELS[1..replicas as usize] {
        let endpoint = format!("http://{}", server.address());
        let replica = ServerSpec {
            services: &["scoring"],
            env: vec![
                ("CLM_IDENTITY_URL".to_owned(), endpoint.clone()),
                ("CLM_TOUCHPOINTS_URL".to_owned(), endpoint),
                (
                    "CLM_FEEDBACK_URL".to_owned(),
                    "http://127.0.0.1:9".to_owned(),
                ),
            ],
            ..spec.clone()
        };
        more.push(ServerProcess::start(label, &replica).await?);
    }
    let channels = load::connect_channels(&server.address().to_string(), 4).await?;
    let probes_total = (u64::from(args.probes) * args.seconds) as usize;
    eprintln!(
        "seeding {} background and {probes_total} probe customers",
        args.customers
    );
    let seeded = load::seed_customers(
        &channels,
        32,
        args.customers as usize + probes_total,
        &run_id,
    )
    .await?;
    anyhow::ensure!(
        seeded.errors.total() == 0,
        "creating customers failed: {:?}",
        seeded.errors.by_code
    );
    let (background_ids, probe_ids) = seeded.customer_ids.split_at(args.customers as usize);
    let background_ids: Arc<[String]> = background_ids.into();

    let stored = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let load = tokio::spawn(background(
        channels[0].clone(),
        background_ids,
        args.rate,
        run_id.clone(),
        stored.clone(),
        stop.clone(),
    ));
    eprintln!(
        "warming up for {} s at {} touchpoints/s",
        WARM_UP.as_secs(),
        args.rate
    );
    tokio::time::sleep(WARM_UP).await;
    server.ensure_running("the warm-up")?;
    for replica in &mut more {
        replica.ensure_running("the warm-up")?;
    }

    eprintln!("measuring for {} s: {} probes/s", args.seconds, args.probes);
    let stored_before = stored.load(Ordering::Relaxed);
    let measuring = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.probes)));
    let mut probes = Vec::with_capacity(probe_ids.len());
    for (index, customer) in probe_ids.iter().enumerate() {
        ticker.tick().await;
        probes.push(tokio::spawn(probe(
            channels[1 + index % (channels.len() - 1)].clone(),
            customer.clone(),
            run_id.clone(),
        )));
    }
    let sent_for = measuring.elapsed();
    let stored_during = stored.load(Ordering::Relaxed) - stored_before;
    let mut latencies = Vec::with_capacity(probes.len());
    for probe in probes {
        latencies.push(probe.await.context("a probe panicked")??);
    }
    stop.notify_one();
    load.await.context("the load generator panicked")??;
    server.ensure_running("the measurement")?;
    for replica in &mut more {
        replica.ensure_running("the measurement")?;
    }
    latencies.sort();
    let processes: Vec<(&'static str, Option<u32>)> = std::iter::once(&server)
        .chain(&more)
        .zip(REPLICA_LABELS)
        .map(|(process, label)| (label, process.pid()))
        .collect();
    let shards = shard_distribution(database_url, &processes).await?;
    let shards_text = shards
        .iter()
        .map(|(label, shards)| format!("{label}: {shards:?}"))
        .collect::<Vec<_>>()
        .join("; ");

    let ingest_rate = stored_during as f64 / sent_for.as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (p50, p90, p99, max) = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 90.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or_default(),
    );
    let met = p99 <= Duration::from_secs(1) && ingest_rate >= f64::from(args.rate) * 0.95;
    Ok(if args.json {
        json!({
            "scoring_replicas": replicas,
            "shards": shards.iter().map(|(label, shards)| json!({"process": label, "shards": shards})).collect::<Vec<_>>(),
            "target_rate": args.rate, "ingest_rate": ingest_rate, "probes": latencies.len(),
            "p50_ms": ms(p50), "p90_ms": ms(p90), "p99_ms": ms(p99), "max_ms": ms(max),
            "target_met": met,
        })
        .to_string()
    } else {
        format!(
            "clm bench lifecycle: touchpoint -> stage on GetCustomer, PostgreSQL, \
             {replicas} scoring replica(s) (shards held: {shards_text})\n\
             background ingest {ingest_rate:.0} touchpoints/s (asked {}), {} probes over {:.1} s\n\
             latency p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms \
             (target p99 <= 1000 ms at 10,000 events/s: {})",
            args.rate,
            latencies.len(),
            sent_for.as_secs_f64(),
            ms(p50),
            ms(p90),
            ms(p99),
            ms(max),
            if met { "met" } else { "not met" }
        )
    })
}
