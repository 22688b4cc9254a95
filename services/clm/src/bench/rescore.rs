//! `clm bench rescore`: builds a scoring store of many customers with a
//! typical history each (the generator folds their touchpoints into
//! features and evaluates them with the default model, as the live flow
//! would have), activates a second model, and times the rescore of every
//! customer by the service's own rescore worker, from activation to its end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use clap::Args;
use clm_platform::Secret;
use clm_platform::db;
use clm_platform::server::Shutdown;
use clm_proto::scoring as pb;
use clm_scoring::clock::Clock;
use clm_scoring::history::Cause;
use clm_scoring::scorer::{Scorer, evaluate_record, map_on_every_core};
use clm_scoring::store::{
    self, Activation, ChangeSet, CustomerRecord, CustomerWrite, ScoringStore,
};
use clm_scoring::{CompiledModel, default_model};
use serde_json::json;

use super::database::TemporaryDatabase;
use tokio::sync::Notify;

/// Customers generated per transaction.
const CHUNK: usize = 5_000;

/// Arguments of `clm bench rescore`.
#[derive(Debug, Args)]
pub struct RescoreBenchArgs {
    /// Customers to generate and rescore.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    customers: u32,
    /// Touchpoints in each customer's history.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    touchpoints: u32,
    /// Run on PostgreSQL: a server on which the benchmark creates (and
    /// drops) a fresh database; the URL names the database to connect to
    /// for that. Default: a SQLite file in a temporary folder.
    #[arg(long)]
    admin_database_url: Option<String>,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs the rescore benchmark.
pub async fn run(args: RescoreBenchArgs) -> anyhow::Result<()> {
    let data_dir = tempfile::tempdir()?;
    let Some(admin_url) = args.admin_database_url.clone() else {
        let url = format!("sqlite://{}/scoring.db", data_dir.path().display());
        let report = measure(&args, &url, "SQLite").await?;
        println!("{report}");
        return Ok(());
    };
    let database = TemporaryDatabase::create(&admin_url, "rescore").await?;
    let outcome = measure(&args, &database.url, "PostgreSQL").await;
    let dropped = database.drop().await;
    let report = outcome?;
    dropped?;
    println!("{report}");
    Ok(())
}

/// Generates `count` customers starting at `seed`, evaluated with `model`,
/// on every core.
fn generate(
    model: &CompiledModel,
    seed: u64,
    count: usize,
    touchpoints: usize,
) -> Vec<CustomerRecord> {
    let now = Utc::now();
    let mut ids: Vec<uuid::Uuid> = (0..count).map(|_| uuid::Uuid::now_v7()).collect();
    ids.sort();
    map_on_every_core(&mut ids, |index, id| {
        let mut record = CustomerRecord {
            features: clm_scoring::bench::typical_customer(seed + index as u64, touchpoints, now),
            ..CustomerRecord::new(*id)
        };
        evaluate_record(model, &mut record, now, Cause::Touchpoint, None);
        record
    })
}

/// A second model that moves customers: advocates need an NPS of 10, MQL
/// comes earlier, at risk after 30 days, churned after 90.
fn second_model() -> clm_scoring::Model {
    let mut model = default_model();
    model.version = "bench-rescore-2".to_owned();
    model.built_in = false;
    model.lead.mql_threshold = 30.0;
    for rule in &mut model.stage_rules {
        rule.condition = rule.condition.replace("nps >= 9", "nps >= 10");
    }
    for rule in &mut model.health_rules {
        rule.condition = rule
            .condition
            .replace("days_since_last_touch > 120", "days_since_last_touch > 90")
            .replace("days_since_last_touch > 60", "days_since_last_touch > 30");
    }
    model
}

async fn measure(args: &RescoreBenchArgs, url: &str, engine: &str) -> anyhow::Result<String> {
    let pools = db::connect(&Secret::new(url.to_owned()), "scoring", 8).await?;
    store::MIGRATIONS.run(&pools).await?;
    let store: Arc<dyn ScoringStore> = store::open(pools);
    store.install_default(&default_model(), Utc::now()).await?;
    let model = Arc::new(
        CompiledModel::compile(default_model())
            .map_err(|v| anyhow::anyhow!("the default model does not compile: {v:?}"))?,
    );

    let total = args.customers as usize;
    let touchpoints = args.touchpoints as usize;
    eprintln!("generating {total} customers with {touchpoints} touchpoints each into {engine}");
    let generation = Instant::now();
    // The next chunk is generated while the previous one is written.
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Vec<CustomerRecord>>(2);
    let generator = {
        let model = model.clone();
        tokio::task::spawn_blocking(move || {
            let mut made = 0;
            while made < total {
                let count = CHUNK.min(total - made);
                let chunk = generate(&model, made as u64, count, touchpoints);
                made += count;
                if sender.blocking_send(chunk).is_err() {
                    break;
                }
            }
        })
    };
    let mut written = 0;
    while let Some(chunk) = receiver.recv().await {
        written += chunk.len();
        store
            .commit(&ChangeSet {
                customers: chunk
                    .into_iter()
                    .map(|record| CustomerWrite {
                        record,
                        features_changed: true,
                        position_changed: true,
                    })
                    .collect(),
                ..ChangeSet::default()
            })
            .await?;
        if written % 100_000 < CHUNK {
            eprintln!("  {written} customers written");
        }
    }
    generator.await?;
    let generated_in = generation.elapsed();

    let second = second_model();
    store.insert_model(&second).await?;
    let scorer = Arc::new(Scorer::new(store.clone(), Clock::System));
    let shutdown = Shutdown::new();
    let wake = Arc::new(Notify::new());
    let worker = tokio::spawn(clm_scoring::rescore::run_worker(
        scorer.clone(),
        wake.clone(),
        clm_eventlog::leases::ShardLease::sole(clm_eventlog::ShardFilter::ALL),
        shutdown.clone(),
    ));
    eprintln!("activating {} and rescoring every customer", second.version);
    let started = Instant::now();
    let cpu_before = process_cpu_seconds();
    let rescore =
        clm_scoring::rescore::new_rescore(&scorer, &second.version, pb::RescoreTrigger::Activation)
            .await?;
    let Activation::Activated(_, rescore) = store
        .activate(&second.version, None, rescore, Utc::now())
        .await?
    else {
        anyhow::bail!("the second model was not activated");
    };
    wake.notify_one();
    let finished =
        clm_scoring::rescore::until_ended(store.as_ref(), rescore.id, Duration::from_millis(100))
            .await?
            .context("the rescore vanished")?;
    let rescored_in = started.elapsed();
    let cpu = process_cpu_seconds() - cpu_before;
    shutdown.trigger();
    let _ = worker.await;
    anyhow::ensure!(
        finished.state == pb::RescoreState::Succeeded as i32,
        "the rescore ended in state {} ({})",
        finished.state,
        finished.error
    );
    anyhow::ensure!(
        finished.done_count == total as i64,
        "the rescore evaluated {} of {total} customers",
        finished.done_count
    );
    let rate = total as f64 / rescored_in.as_secs_f64();
    // The target: 1,000,000 customers in 60 s or less.
    let projected = 1_000_000.0 / rate;
    let met = projected <= 60.0;
    Ok(if args.json {
        json!({
            "engine": engine, "customers": total, "touchpoints_per_customer": touchpoints,
            "generate_seconds": generated_in.as_secs_f64(), "rescore_seconds": rescored_in.as_secs_f64(),
            "customers_per_second": rate, "changed": finished.changed_count,
            "projected_seconds_for_1m": projected, "target_met": met, "process_cpu_seconds": cpu,
        })
        .to_string()
    } else {
        format!(
            "clm bench rescore ({engine}): {total} customers with {touchpoints} touchpoints each\n\
             generated and stored in {:.1} s\n\
             rescored by the rescore worker in {:.1} s: {rate:.0} customers/s, {} changed stage or health \
             ({cpu:.1} s of CPU in this process{})\n\
             1,000,000 customers at this rate: {projected:.1} s (target <= 60 s: {})",
            generated_in.as_secs_f64(),
            rescored_in.as_secs_f64(),
            finished.changed_count,
            if engine == "PostgreSQL" {
                ", the database server's apart"
            } else {
                ""
            },
            if met { "met" } else { "not met" }
        )
    })
}

/// The CPU time (user and system) this process has used so far, in seconds;
/// 0 where /proc is not available.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): utime is the
    // 14th field of the line, stime the 15th, in clock ticks.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}
