//! Rescoring: re-evaluating every customer with a model, in the background,
//! as a long-running operation whose progress is stored with each page, so
//! a restarted process resumes where it stopped and any replica can report
//! it.
//!
//! A rescore is divided by shard like the rest of the background work: the
//! owner of each shard lease rescores that shard's customers, with the
//! shard's own progress, and the rescore has succeeded when every shard
//! has finished.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clm_eventlog::ShardFilter;
use clm_eventlog::leases::ShardLease;
use clm_platform::server::Shutdown;
use clm_proto::scoring as proto;
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use crate::compiled_model::CompiledModel;
use crate::model_proto::timestamp_to_proto;
use crate::scorer::{EvaluatedPage, Scorer, ScoringError, evaluate_page};
use crate::store::{CustomerRecord, RescoreProgress, RescoreRow, ScoringStore, StoreError};

/// Customers per page (one transaction each). Large, because a page's
/// writes land all over the due-time index: the fewer the transactions,
/// the more often one index page takes several of them in one write (a
/// rescore of 1,000,000 customers on SQLite took 41 s with pages of 2,000
/// and 32-36 s with pages of 10,000). A live write to a customer of the
/// page waits for that page's commit, a fraction of a second.
pub const PAGE: u32 = 10_000;
/// The window the rate is averaged over.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// How often the worker looks for a rescore when not woken.
const IDLE_CHECK: Duration = Duration::from_secs(2);

/// A new pending rescore of every scored customer with `model_version`.
pub async fn new_rescore(
    scorer: &Scorer,
    model_version: &str,
    trigger: proto::RescoreTrigger,
) -> Result<RescoreRow, StoreError> {
    Ok(RescoreRow {
        id: Uuid::now_v7(),
        model_version: model_version.to_owned(),
        state: proto::RescoreState::Pending as i32,
        trigger: trigger as i32,
        done_count: 0,
        total_count: scorer.store().count_scored().await?,
        changed_count: 0,
        rate_per_second: 0.0,
        create_time: Utc::now(),
        start_time: None,
        end_time: None,
        error: String::new(),
        resume_after: None,
    })
}

/// The rescore `id` once it has ended (succeeded, failed or cancelled),
/// read every `poll`; `None` when it is gone.
pub async fn until_ended(
    store: &dyn ScoringStore,
    id: Uuid,
    poll: Duration,
) -> Result<Option<RescoreRow>, StoreError> {
    loop {
        tokio::time::sleep(poll).await;
        match store.rescore(Some(id)).await? {
            Some(row)
                if row.state == proto::RescoreState::Pending as i32
                    || row.state == proto::RescoreState::Running as i32 => {}
            ended => return Ok(ended),
        }
    }
}

/// The protobuf message of a stored rescore, with its ETA.
pub fn to_proto(row: &RescoreRow, now: DateTime<Utc>) -> proto::Rescore {
    let running = row.state == proto::RescoreState::Running as i32;
    let remaining = (row.total_count - row.done_count).max(0);
    let estimated_end_time = (running && row.rate_per_second > 0.0).then(|| {
        let seconds = remaining as f64 / row.rate_per_second;
        timestamp_to_proto(now + chrono::Duration::milliseconds((seconds * 1000.0) as i64))
    });
    proto::Rescore {
        id: row.id.to_string(),
        model_version: row.model_version.clone(),
        state: row.state,
        trigger: row.trigger,
        done_count: row.done_count,
        total_count: row.total_count,
        changed_count: row.changed_count,
        rate_per_second: if running { row.rate_per_second } else { 0.0 },
        estimated_end_time,
        create_time: Some(timestamp_to_proto(row.create_time)),
        start_time: row.start_time.map(timestamp_to_proto),
        end_time: row.end_time.map(timestamp_to_proto),
        error: row.error.clone(),
    }
}

/// A moving average of customers per second over the last 10 seconds.
#[derive(Default)]
struct Rate {
    samples: VecDeque<(Instant, i64)>,
}

impl Rate {
    fn add(&mut self, at: Instant, done: i64) -> f64 {
        self.samples.push_back((at, done));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > RATE_WINDOW)
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
        match (self.samples.front(), self.samples.back()) {
            (Some((t0, d0)), Some((t1, d1))) if t1 > t0 => {
                (d1 - d0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// Runs the shard `lease` holds of pending rescores, one after the other,
/// until `shutdown`.
pub async fn run_worker(
    scorer: Arc<Scorer>,
    wake: Arc<Notify>,
    lease: ShardLease,
    shutdown: Shutdown,
) {
    loop {
        let shard = lease.shard;
        let to_run = match scorer.store().rescore_to_run().await {
            Ok(Some(rescore)) => match scorer.store().rescore_shard(rescore.id, shard).await {
                // This shard is done; the others finish the rescore.
                Ok((_, true)) => Ok(None),
                Ok((after, false)) => Ok(Some((rescore, after))),
                Err(err) => Err(err),
            },
            Ok(None) => Ok(None),
            Err(err) => Err(err),
        };
        match to_run {
            Ok(Some((rescore, after))) => {
                if let Err(err) = run_one(&scorer, &rescore, after, &lease, &shutdown).await {
                    tracing::error!(rescore = %rescore.id, error = %err, "rescore failed");
                    let _ = scorer
                        .store()
                        .set_rescore_state(
                            rescore.id,
                            proto::RescoreState::Failed as i32,
                            Utc::now(),
                            &err.to_string(),
                        )
                        .await;
                }
                if shutdown.is_triggered() {
                    return;
                }
                continue;
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(error = %err, "cannot read pending rescores"),
        }
        tokio::select! {
            () = shutdown.triggered() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(IDLE_CHECK) => {}
        }
    }
}

/// The page size of a shard: the rescore's pages divided among the shards.
fn page_of(shard: ShardFilter) -> u32 {
    (PAGE / shard.count.max(1)).max(SHARD_PAGE_MIN)
}

/// The smallest page of a shard.
const SHARD_PAGE_MIN: u32 = 1000;

/// Reads pages of the customers of `shard` after `after` into `pages`
/// until the end.
fn spawn_reader(
    store: Arc<dyn ScoringStore>,
    mut after: Option<Uuid>,
    shard: ShardFilter,
    pages: mpsc::Sender<Result<Vec<CustomerRecord>, StoreError>>,
) -> tokio::task::JoinHandle<()> {
    let size = page_of(shard);
    tokio::spawn(async move {
        loop {
            let page = store.customers_after(after, size, shard).await;
            let last = match &page {
                Ok(page) => page.last().map(|record| record.customer_id),
                Err(_) => None,
            };
            let full = page.as_ref().is_ok_and(|page| page.len() as u32 == size);
            if pages.send(page).await.is_err() || !full {
                return;
            }
            after = last;
        }
    })
}

/// Evaluates the pages read, on blocking threads, into `evaluated`.
fn spawn_evaluator(
    scorer: Arc<Scorer>,
    model: Arc<CompiledModel>,
    mut pages: mpsc::Receiver<Result<Vec<CustomerRecord>, StoreError>>,
    evaluated: mpsc::Sender<Result<(EvaluatedPage, Uuid), ScoringError>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(page) = pages.recv().await {
            let result = match page {
                Err(err) => Err(ScoringError::Store(err)),
                Ok(page) => {
                    let Some(last) = page.last().map(|record| record.customer_id) else {
                        return;
                    };
                    let (model, now) = (model.clone(), scorer.now());
                    tokio::task::spawn_blocking(move || evaluate_page(&model, page, now))
                        .await
                        .map(|page| (page, last))
                        .map_err(|err| ScoringError::Store(StoreError::Internal(err.to_string())))
                }
            };
            if evaluated.send(result).await.is_err() {
                return;
            }
        }
    })
}

/// Runs one shard of a rescore from after `after`: pages are read,
/// evaluated and written in a pipeline, so the database reads, the
/// evaluation on every core and the writes overlap.
async fn run_one(
    scorer: &Arc<Scorer>,
    rescore: &RescoreRow,
    after: Option<Uuid>,
    lease: &ShardLease,
    shutdown: &Shutdown,
) -> Result<(), ScoringError> {
    let shard = lease.shard;
    let model = scorer
        .compiled(&rescore.model_version)
        .await?
        .ok_or_else(|| ScoringError::BadModel(rescore.model_version.clone()))?;
    let store = scorer.store().clone();
    store
        .set_rescore_state(
            rescore.id,
            proto::RescoreState::Running as i32,
            Utc::now(),
            "",
        )
        .await?;
    tracing::info!(rescore = %rescore.id, model = %rescore.model_version, total = rescore.total_count, shard = shard.index, shards = shard.count, "rescore running");
    let mut done = 0;
    let mut resumed_from = after;
    let mut rate = Rate::default();
    rate.add(Instant::now(), done);
    let (page_sender, pages) = mpsc::channel(2);
    let (evaluated_sender, mut evaluated) = mpsc::channel(1);
    let reader = spawn_reader(store.clone(), after, shard, page_sender);
    let evaluator = spawn_evaluator(scorer.clone(), model.clone(), pages, evaluated_sender);
    let outcome = async {
        while let Some(page) = evaluated.recv().await {
            if shutdown.is_triggered() {
                // Resumed from `resume_after` on the next start.
                return Ok(false);
            }
            let (page, last) = page?;
            let count = page.ids.len() as i64;
            done += count;
            let per_second = rate.add(Instant::now(), done);
            let written = scorer
                .write_rescore_page(
                    &model,
                    page,
                    RescoreProgress {
                        id: rescore.id,
                        done: count,
                        changed: 0,
                        rate_per_second: per_second,
                        resume_after: last,
                        resumed_from,
                        shard,
                    },
                    &lease.fence,
                )
                .await;
            match written {
                Ok(_) => resumed_from = Some(last),
                Err(ScoringError::Store(StoreError::RescoreStopped)) => {
                    tracing::info!(rescore = %rescore.id, "rescore cancelled, or run by another replica");
                    return Ok(false);
                }
                Err(err) => return Err(err),
            }
        }
        Ok(true)
    }
    .await;
    reader.abort();
    evaluator.abort();
    if outcome? {
        match store
            .finish_rescore_shard(rescore.id, shard, resumed_from, Utc::now(), &lease.fence)
            .await
        {
            Ok(true) => tracing::info!(rescore = %rescore.id, "rescore succeeded"),
            Ok(false) => {
                tracing::info!(rescore = %rescore.id, shard = shard.index, done, "rescore shard finished")
            }
            Err(StoreError::RescoreStopped) => {
                tracing::info!(rescore = %rescore.id, "rescore cancelled, or run by another replica");
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}
