//! A rescore finishes whatever its size and whatever other writers do
//! meanwhile: pages of 10,000 customers, while a writer keeps changing
//! customers of every page as the log consumers do, on SQLite and
//! PostgreSQL. Once, every page lost its race on SQLite and the rescore
//! failed with "a customer changed concurrently" above about 10,000
//! customers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use clm_eventlog::ShardFilter;
use clm_eventlog::leases::ShardLease;
use clm_platform::Secret;
use clm_platform::db;
use clm_platform::server::Shutdown;
use clm_proto::scoring as pb;
use clm_scoring::clock::Clock;
use clm_scoring::history::Cause;
use clm_scoring::scorer::{Scorer, evaluate_record};
use clm_scoring::store::{
    self, Activation, ChangeSet, CustomerRecord, CustomerWrite, ScoringStore,
};
use clm_scoring::{CompiledModel, default_model};
use tokio::sync::Notify;
use uuid::Uuid;

const CUSTOMERS: usize = 12_000;

async fn seed(store: &Arc<dyn ScoringStore>) -> Vec<Uuid> {
    store
        .install_default(&default_model(), Utc::now())
        .await
        .unwrap();
    let model = CompiledModel::compile(default_model()).unwrap();
    let now = Utc::now();
    let mut ids: Vec<Uuid> = (0..CUSTOMERS).map(|_| Uuid::now_v7()).collect();
    ids.sort();
    for chunk in ids.chunks(3_000) {
        let customers = chunk
            .iter()
            .enumerate()
            .map(|(index, id)| {
                let mut record = CustomerRecord {
                    features: clm_scoring::bench::typical_customer(index as u64, 5, now),
                    ..CustomerRecord::new(*id)
                };
                evaluate_record(&model, &mut record, now, Cause::Touchpoint, None);
                CustomerWrite {
                    record,
                    features_changed: true,
                    position_changed: true,
                }
            })
            .collect();
        store
            .commit(&ChangeSet {
                customers,
                ..ChangeSet::default()
            })
            .await
            .unwrap();
    }
    ids
}

/// Rewrites random customers, each under the version check, until `stop`.
fn spawn_writer(
    store: Arc<dyn ScoringStore>,
    ids: Vec<Uuid>,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        while !stop.load(Ordering::SeqCst) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let id = ids[(seed % ids.len() as u64) as usize];
            let Ok(mut found) = store.load_customers(&[id]).await else {
                continue;
            };
            // Written back as read: the store checks the version read and
            // bumps it, as for any consumer's write.
            if let Some(record) = found.remove(&id) {
                let written = store
                    .commit(&ChangeSet {
                        customers: vec![CustomerWrite {
                            record,
                            features_changed: true,
                            position_changed: false,
                        }],
                        ..ChangeSet::default()
                    })
                    .await;
                if written.is_ok() {
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// Rescores with one worker per shard of `shards` (a PostgreSQL store
/// divides its customers by shard; SQLite has one).
async fn a_rescore_finishes_under_concurrent_writes(store: Arc<dyn ScoringStore>, shards: u32) {
    let ids = seed(&store).await;
    let mut second = default_model();
    second.version = "rescore-under-writes-2".into();
    second.built_in = false;
    second.lead.mql_threshold = 30.0;
    store.insert_model(&second).await.unwrap();

    let scorer = Arc::new(Scorer::new(store.clone(), Clock::System));
    let shutdown = Shutdown::new();
    let wake = Arc::new(Notify::new());
    let workers: Vec<_> = (0..shards)
        .map(|index| {
            let lease = ShardLease::sole(ShardFilter {
                index,
                count: shards,
            });
            tokio::spawn(clm_scoring::rescore::run_worker(
                scorer.clone(),
                wake.clone(),
                lease,
                shutdown.clone(),
            ))
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(store.clone(), ids, stop.clone(), writes.clone());

    let rescore =
        clm_scoring::rescore::new_rescore(&scorer, &second.version, pb::RescoreTrigger::Activation)
            .await
            .unwrap();
    let Activation::Activated(_, rescore) = store
        .activate(&second.version, None, rescore, Utc::now())
        .await
        .unwrap()
    else {
        panic!("the second model was not activated");
    };
    let before = writes.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    wake.notify_waiters();
    let finished = tokio::time::timeout(
        Duration::from_secs(600),
        clm_scoring::rescore::until_ended(store.as_ref(), rescore.id, Duration::from_millis(100)),
    )
    .await
    .expect("the rescore ends")
    .unwrap()
    .expect("the rescore is kept");
    let during = writes.load(Ordering::SeqCst) - before;
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    shutdown.trigger();
    for worker in workers {
        worker.await.unwrap();
    }
    eprintln!("{during} writes during the rescore of {took:?}");
    assert!(
        during > 0,
        "the writer kept writing during the rescore ({during} writes in {took:?})"
    );
    assert_eq!(
        finished.state,
        pb::RescoreState::Succeeded as i32,
        "{}",
        finished.error
    );
    assert_eq!(finished.done_count, CUSTOMERS as i64, "every customer once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = Secret::new(format!("sqlite://{}/scoring.db", dir.path().display()));
    let pools = db::connect(&url, "scoring", 4).await.unwrap();
    store::MIGRATIONS.run(&pools).await.unwrap();
    a_rescore_finishes_under_concurrent_writes(store::open(pools), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let Some(url) = clm_platform::testing::fresh_postgres_database("scoring").await else {
        return;
    };
    let pools = db::connect(&url, "scoring", 8).await.unwrap();
    store::MIGRATIONS.run(&pools).await.unwrap();
    a_rescore_finishes_under_concurrent_writes(store::open(pools), 4).await;
}
