//! Rescoring: re-evaluating every customer with a model, in the background,
//! as a long-running operation whose progress is stored with each page, so
//! a restarted process resumes where it stopped and any replica can report
//! it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clm_platform::server::Shutdown;
use clm_proto::scoring as proto;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::model_proto::timestamp_to_proto;
use crate::scorer::{Scorer, ScoringError};
use crate::store::{RescoreProgress, RescoreRow, StoreError};

/// Customers per page (one transaction each).
pub const PAGE: u32 = 2000;
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

/// Runs pending rescores one after the other until `shutdown`.
pub async fn run_worker(scorer: Arc<Scorer>, wake: Arc<Notify>, shutdown: Shutdown) {
    loop {
        match scorer.store().rescore_to_run().await {
            Ok(Some(rescore)) => {
                if let Err(err) = run_one(&scorer, &rescore, &shutdown).await {
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

async fn run_one(
    scorer: &Scorer,
    rescore: &RescoreRow,
    shutdown: &Shutdown,
) -> Result<(), ScoringError> {
    let model = scorer
        .compiled(&rescore.model_version)
        .await?
        .ok_or_else(|| ScoringError::BadModel(rescore.model_version.clone()))?;
    let store = scorer.store();
    store
        .set_rescore_state(
            rescore.id,
            proto::RescoreState::Running as i32,
            Utc::now(),
            "",
        )
        .await?;
    tracing::info!(rescore = %rescore.id, model = %rescore.model_version, total = rescore.total_count, "rescore running");
    let mut after = rescore.resume_after;
    let mut done = rescore.done_count;
    let mut rate = Rate::default();
    rate.add(Instant::now(), done);
    // Read the next page while the current one is evaluated and written.
    let mut next = Some(tokio::spawn({
        let store = store.clone();
        async move { store.customers_after(after, PAGE).await }
    }));
    while let Some(reading) = next.take() {
        if shutdown.is_triggered() {
            // Resumed from `resume_after` on the next start.
            return Ok(());
        }
        let page = reading
            .await
            .map_err(|err| StoreError::Internal(err.to_string()))??;
        let Some(last) = page.last().map(|record| record.customer_id) else {
            break;
        };
        if page.len() as u32 == PAGE {
            let store = store.clone();
            next = Some(tokio::spawn(async move {
                store.customers_after(Some(last), PAGE).await
            }));
        }
        let count = page.len() as i64;
        done += count;
        let per_second = rate.add(Instant::now(), done);
        let written = scorer
            .rescore_page(&model, page, |changed| RescoreProgress {
                id: rescore.id,
                done: count,
                changed,
                rate_per_second: per_second,
                resume_after: last,
            })
            .await;
        match written {
            Ok(_) => after = Some(last),
            Err(ScoringError::Store(StoreError::RescoreStopped)) => {
                tracing::info!(rescore = %rescore.id, "rescore cancelled by a newer activation");
                return Ok(());
            }
            Err(err) => return Err(err),
        }
    }
    let _ = after;
    store
        .set_rescore_state(
            rescore.id,
            proto::RescoreState::Succeeded as i32,
            Utc::now(),
            "",
        )
        .await?;
    tracing::info!(rescore = %rescore.id, done, "rescore succeeded");
    Ok(())
}
