//! `clm bench ingest`: touchpoint ingest into PostgreSQL — batches of 1,000
//! and 10,000 and client streams — each next to a raw binary COPY of the
//! same number of rows into an identical table of the same database, half
//! just before it and half just after (so both write into tables of the
//! same size, under the same conditions of the machine); unary RecordTouchpoint against the
//! health Check; and how fast a consumer that is behind reads the
//! touchpoint log.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use clm_platform::db::BinaryCopy;
use clm_proto::common::{CustomerReference, Money, customer_reference};
use clm_proto::touchpoint as pb;
use clm_proto::touchpoint::touchpoint_service_client::TouchpointServiceClient;
use serde_json::json;
use sqlx::{Connection as _, PgConnection};
use tonic::transport::Channel;

use super::database::TemporaryDatabase;
use super::load::{self, Workload};
use super::server_process::{ServerProcess, ServerSpec};

/// Arguments of `clm bench ingest`.
#[derive(Debug, Args)]
pub struct IngestBenchArgs {
    /// Touchpoints each ingest mode sends (and the COPY writes).
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u32).range(10_000..=50_000_000))]
    events: u32,
    /// Batches or streams in flight at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: u32,
    /// Customers the touchpoints are spread over.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    customers: u32,
    /// Seconds of the unary RecordTouchpoint phase (alternating with health).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Clients of the unary phase.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    unary_concurrency: u32,
    /// A PostgreSQL server on which the benchmark creates (and drops) a
    /// fresh database; the URL names the database to connect to for that.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    admin_database_url: String,
    /// Print the figures as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// A touchpoint of a benchmark run: a mix of types, a few properties,
/// revenue on purchases.
pub fn touchpoint(run_id: &str, event: usize, customer_id: &str) -> pb::Touchpoint {
    const TYPES: [&str; 6] = [
        "page_view",
        "content_view",
        "email_open",
        "pricing_view",
        "product_usage",
        "purchase",
    ];
    let kind = TYPES[event % TYPES.len()];
    pb::Touchpoint {
        event_id: format!("{run_id}-{event}"),
        customer: Some(CustomerReference {
            reference: Some(customer_reference::Reference::CustomerId(
                customer_id.to_owned(),
            )),
        }),
        channel: pb::Channel::Web as i32,
        r#type: kind.to_owned(),
        campaign: "autumn".into(),
        utm_source: "newsletter".into(),
        utm_medium: "email".into(),
        properties: [("path".to_owned(), format!("/p/{}", event % 97))].into(),
        revenue: (kind == "purchase").then(|| Money {
            currency_code: "EUR".into(),
            amount_micros: 19_990_000,
        }),
        ..Default::default()
    }
}

struct Figure {
    name: &'static str,
    events: u64,
    elapsed: Duration,
    errors: u64,
    /// The rate of the raw COPYs just before and just after (half the rows
    /// each), rows per second.
    copy_rate: f64,
}

impl Figure {
    fn per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    fn ratio_to_copy(&self) -> f64 {
        self.per_second() / self.copy_rate.max(f64::EPSILON)
    }
}

/// Sends `events` touchpoints as `batch` sized RecordTouchpoints calls,
/// `concurrency` at a time.
async fn ingest_batches(
    channel: &Channel,
    run_id: &str,
    customers: &Arc<[String]>,
    events: usize,
    batch: usize,
    concurrency: usize,
) -> anyhow::Result<(Duration, u64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = TouchpointServiceClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let next = next.clone();
        let customers = customers.clone();
        let run_id = run_id.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut stored = 0_u64;
            loop {
                let start = next.fetch_add(batch, Ordering::Relaxed);
                if start >= events {
                    return Ok::<_, anyhow::Error>(stored);
                }
                let touchpoints = (start..(start + batch).min(events))
                    .map(|n| touchpoint(&run_id, n, &customers[n % customers.len()]))
                    .collect();
                let response = client
                    .record_touchpoints(pb::RecordTouchpointsRequest { touchpoints })
                    .await
                    .context("RecordTouchpoints failed")?
                    .into_inner();
                stored += response.stored_count as u64;
            }
        }));
    }
    let mut stored = 0;
    for task in tasks {
        stored += task.await??;
    }
    Ok((started.elapsed(), stored))
}

/// Sends `events` touchpoints over `concurrency` client streams in chunks
/// of 10,000.
async fn ingest_streams(
    channel: &Channel,
    run_id: &str,
    customers: &Arc<[String]>,
    events: usize,
    concurrency: usize,
) -> anyhow::Result<(Duration, u64)> {
    const CHUNK: usize = 10_000;
    let started = Instant::now();
    let mut tasks = Vec::new();
    let share = events.div_ceil(concurrency);
    for stream_index in 0..concurrency {
        let mut client = TouchpointServiceClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let customers = customers.clone();
        let run_id = run_id.to_owned();
        let range = (stream_index * share)..((stream_index + 1) * share).min(events);
        tasks.push(tokio::spawn(async move {
            let chunks: Vec<pb::StreamTouchpointsRequest> = range
                .clone()
                .step_by(CHUNK)
                .map(|start| pb::StreamTouchpointsRequest {
                    touchpoints: (start..(start + CHUNK).min(range.end))
                        .map(|n| touchpoint(&run_id, n, &customers[n % customers.len()]))
                        .collect(),
                })
                .collect();
            let summary = client
                .stream_touchpoints(futures_util::stream::iter(chunks))
                .await
                .context("StreamTouchpoints failed")?
                .into_inner();
            Ok::<_, anyhow::Error>(summary.stored_count as u64)
        }));
    }
    let mut stored = 0;
    for task in tasks {
        stored += task.await??;
    }
    Ok((started.elapsed(), stored))
}

/// The same touchpoints as rows of a binary COPY into the touchpoints table.
fn copy_rows(run_id: &str, customers: &[String], events: usize) -> anyhow::Result<Vec<u8>> {
    let mut rows = BinaryCopy::with_capacity(events, 300);
    let customer_ids: Vec<uuid::Uuid> = customers
        .iter()
        .map(|c| uuid::Uuid::try_parse(c))
        .collect::<Result<_, _>>()?;
    let now = chrono::Utc::now();
    for n in 0..events {
        let customer = customer_ids[n % customer_ids.len()];
        let t = touchpoint(run_id, n, "");
        let properties = serde_json::to_string(&t.properties)?;
        rows.row(16)
            .uuid(uuid::Uuid::now_v7())
            .text(&t.event_id)
            .uuid(customer)
            .int2(t.channel as i16)
            .text(&t.r#type)
            .timestamptz(now)
            .timestamptz(now)
            .text(&t.campaign)
            .text(&t.utm_source)
            .text(&t.utm_medium)
            .jsonb_or_null(Some(&properties))
            .text_or_null(t.revenue.as_ref().map(|m| m.currency_code.as_str()))
            .int8_or_null(t.revenue.as_ref().map(|m| m.amount_micros))
            .null()
            .null()
            .int4(clm_eventlog_shard(customer));
    }
    Ok(rows.finish())
}

fn clm_eventlog_shard(customer: uuid::Uuid) -> i32 {
    // The same spread as the service's shard function: FNV-1a of the id.
    let hash = customer
        .as_bytes()
        .iter()
        .fold(0x811c_9dc5_u32, |hash, byte| {
            (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
        });
    (hash & 0x7fff_ffff) as i32
}

/// A table identical to the touchpoints table, written by raw binary COPY.
struct CopyTable {
    connection: PgConnection,
}

impl CopyTable {
    async fn create(database_url: &str) -> anyhow::Result<Self> {
        let mut connection = PgConnection::connect(database_url).await?;
        sqlx::query(
            "CREATE TABLE public.touchpoints_copy (LIKE touchpoints.touchpoints INCLUDING ALL)",
        )
        .execute(&mut connection)
        .await
        .context("cannot create the COPY table")?;
        Ok(Self { connection })
    }

    /// Copies `events` rows in, and returns how long the COPY took.
    async fn copy(
        &mut self,
        run_id: &str,
        customers: &[String],
        events: usize,
    ) -> anyhow::Result<Duration> {
        let rows = copy_rows(run_id, customers, events)?;
        let started = Instant::now();
        let mut copy = self
            .connection
            .copy_in_raw(
                "COPY public.touchpoints_copy (id, event_id, customer_id, channel, type, occurred_at, recorded_at, campaign, \
                 utm_source, utm_medium, properties, revenue_currency, revenue_micros, cost_currency, cost_micros, shard) \
                 FROM STDIN (FORMAT binary)",
            )
            .await?;
        for chunk in rows.chunks(1 << 20) {
            copy.send(chunk).await?;
        }
        let copied = copy.finish().await?;
        let elapsed = started.elapsed();
        anyhow::ensure!(
            copied == events as u64,
            "COPY wrote {copied} rows, not {events}"
        );
        Ok(elapsed)
    }
}

/// Reads the whole touchpoint log from the start, as a consumer that is
/// behind does.
async fn catch_up(channel: &Channel) -> anyhow::Result<(Duration, u64)> {
    let mut client =
        TouchpointServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let started = Instant::now();
    let mut stream = client
        .stream_touchpoint_log(pb::StreamTouchpointLogRequest {
            stop_at_end: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut entries = 0_u64;
    while let Some(batch) = stream.message().await? {
        entries += batch.entries.len() as u64;
    }
    Ok((started.elapsed(), entries))
}

/// Runs the ingest benchmark.
pub async fn run(args: IngestBenchArgs) -> anyhow::Result<()> {
    let events = args.events as usize;
    let run_id = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let database = TemporaryDatabase::create(&args.admin_database_url, "ingest").await?;
    let outcome = measure_all(&args, events, &run_id, &database.url).await;
    let dropped = database.drop().await;
    let report = outcome?;
    dropped?;
    println!("{report}");
    Ok(())
}

async fn measure_all(
    args: &IngestBenchArgs,
    events: usize,
    run_id: &str,
    database_url: &str,
) -> anyhow::Result<String> {
    let data_dir = tempfile::tempdir()?;
    let spec =
        ServerSpec::this_binary(data_dir.path(), database_url, &["identity", "touchpoints"])?;
    eprintln!("starting identity and touchpoints on a fresh PostgreSQL database");
    let mut server = ServerProcess::start("ingest", &spec).await?;
    let channels = load::connect_channels(
        &server.address().to_string(),
        args.concurrency.max(4) as usize,
    )
    .await?;
    let seeded = load::seed_customers(&channels, 32, args.customers as usize, run_id).await?;
    anyhow::ensure!(
        seeded.errors.total() == 0,
        "creating customers failed: {:?}",
        seeded.errors.by_code
    );
    let customers: Arc<[String]> = seeded.customer_ids.into();
    // Warm the touchpoint service's cache of resolved customers; the COPY
    // table gets as many rows, so both tables grow alike.
    ingest_batches(
        &channels[0],
        &format!("{run_id}-warm"),
        &customers,
        customers.len(),
        1000,
        1,
    )
    .await?;
    let mut copy_table = CopyTable::create(database_url).await?;
    copy_table
        .copy(&format!("{run_id}-cwarm"), &customers, customers.len())
        .await?;

    let mut figures = Vec::new();
    for (name, batch) in [
        ("RecordTouchpoints, batches of 1,000", 1_000),
        ("RecordTouchpoints, batches of 10,000", 10_000),
        ("StreamTouchpoints, chunks of 10,000", 0),
    ] {
        eprintln!("measuring a raw binary COPY, then {name}, then a COPY again");
        // Half the rows just before the mode, half just after: the COPY
        // table grows as the touchpoints table does, and a drift of the
        // machine's speed during the mode touches both alike.
        let copy_before = copy_table
            .copy(&format!("{run_id}-c{batch}"), &customers, events / 2)
            .await?;
        let (elapsed, stored) = if batch == 0 {
            ingest_streams(
                &channels[0],
                &format!("{run_id}-s"),
                &customers,
                events,
                args.concurrency as usize,
            )
            .await?
        } else {
            ingest_batches(
                &channels[0],
                &format!("{run_id}-b{batch}"),
                &customers,
                events,
                batch,
                args.concurrency as usize,
            )
            .await?
        };
        let copy_after = copy_table
            .copy(
                &format!("{run_id}-d{batch}"),
                &customers,
                events - events / 2,
            )
            .await?;
        figures.push(Figure {
            name,
            events: stored,
            elapsed,
            errors: (events as u64).saturating_sub(stored),
            copy_rate: events as f64 / (copy_before + copy_after).as_secs_f64().max(f64::EPSILON),
        });
        server.ensure_running(name)?;
    }
    drop(copy_table);

    eprintln!("measuring a consumer catching up on the touchpoint log");
    let (catch_up_elapsed, entries) = catch_up(&channels[0]).await?;

    eprintln!("measuring unary RecordTouchpoint against the health Check");
    let unary = Workload::RecordTouchpoint {
        customer_ids: customers.clone(),
        run_id: format!("{run_id}-u").into(),
        next_event: Arc::new(AtomicUsize::new(0)),
    };
    let [unary_measured, health_measured] = load::measure_alternating(
        &channels,
        args.unary_concurrency as usize,
        Duration::from_secs(args.seconds),
        [&unary, &Workload::HealthCheck],
    )
    .await?;
    server.ensure_running("the unary phase")?;
    server.stop().await?;

    let catch_up_rate = entries as f64 / catch_up_elapsed.as_secs_f64().max(f64::EPSILON);
    let unary_rate = unary_measured.requests_per_second();
    let health_rate = health_measured.requests_per_second();
    if args.json {
        let modes: Vec<_> = figures
            .iter()
            .map(|f| {
                json!({"mode": f.name, "events": f.events, "seconds": f.elapsed.as_secs_f64(), "events_per_second": f.per_second(),
                       "copy_rows_per_second": f.copy_rate, "ratio_to_copy": f.ratio_to_copy(), "not_stored": f.errors})
            })
            .collect();
        return Ok(json!({
            "events_per_mode": events,
            "concurrency": args.concurrency,
            "customers": customers.len(),
            "ingest": modes,
            "catch_up": {"entries": entries, "seconds": catch_up_elapsed.as_secs_f64(), "entries_per_second": catch_up_rate},
            "unary": {"record_touchpoint_rps": unary_rate, "health_rps": health_rate, "ratio": unary_rate / health_rate,
                      "record_p50_ms": unary_measured.percentile_ms(50.0), "record_p99_ms": unary_measured.percentile_ms(99.0),
                      "errors": unary_measured.errors.total() + health_measured.errors.total()},
        })
        .to_string());
    }
    let mut out = format!(
        "clm bench ingest: {events} touchpoints per mode over {} customers, {} in flight, PostgreSQL; \
         each mode next to a raw binary COPY of as many rows into an identical table, half just before it and half just after\n\n\
         {:<40} {:>8} {:>8} {:>10} {:>12} {:>8}\n",
        customers.len(),
        args.concurrency,
        "mode",
        "events",
        "seconds",
        "events/s",
        "COPY rows/s",
        "vs COPY"
    );
    for f in &figures {
        out.push_str(&format!(
            "{:<40} {:>8} {:>8.2} {:>10.0} {:>12.0} {:>7.2}x{}\n",
            f.name,
            f.events,
            f.elapsed.as_secs_f64(),
            f.per_second(),
            f.copy_rate,
            f.ratio_to_copy(),
            if f.errors > 0 {
                format!("  ({} not stored)", f.errors)
            } else {
                String::new()
            }
        ));
    }
    let best = figures
        .iter()
        .max_by(|a, b| a.ratio_to_copy().total_cmp(&b.ratio_to_copy()))
        .context("no ingest mode measured")?;
    out.push_str(&format!(
        "\ntarget: best ingest >= 0.60x COPY and >= 50,000 events/s: {:.2}x, {:.0} events/s ({}): {}\n",
        best.ratio_to_copy(),
        best.per_second(),
        best.name,
        if best.ratio_to_copy() >= 0.6 && best.per_second() >= 50_000.0 {
            "MET"
        } else {
            "NOT MET"
        }
    ));
    out.push_str(&format!(
        "log catch-up: {entries} entries in {:.2} s = {catch_up_rate:.0} entries/s (target >= 200,000): {}\n",
        catch_up_elapsed.as_secs_f64(),
        if catch_up_rate >= 200_000.0 { "MET" } else { "NOT MET" }
    ));
    out.push_str(&format!(
        "unary RecordTouchpoint: {unary_rate:.0} req/s (p50 {:.2} ms, p99 {:.2} ms) vs health Check {health_rate:.0} req/s: {:.2}x; errors {}\n",
        unary_measured.percentile_ms(50.0).unwrap_or(f64::NAN),
        unary_measured.percentile_ms(99.0).unwrap_or(f64::NAN),
        unary_rate / health_rate,
        unary_measured.errors.total() + health_measured.errors.total()
    ));
    Ok(out)
}
