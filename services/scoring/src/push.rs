//! Pushes each customer's latest snapshot to identity (SetLifecycle), so the
//! hot profile shows stage, health and scores.
//!
//! Which snapshots identity has not received is stored (`pushed_version`
//! below `version`), so nothing is lost when identity is down or this
//! process stops: the pusher works through that set after every write and
//! on a timer, and only the latest snapshot of a customer is sent. A
//! customer whose stage, acquisition status or health changed goes before
//! those whose scores alone changed, so under a flood of touchpoints the
//! profile's stage stays current while its scores may trail.
//!
//! Snapshots whose scores alone changed are pushed in rounds at most every
//! `score_interval`: a customer whose scores change many times in that
//! while is written to identity once. Each kind of round goes through the
//! customers in id order from where the previous round of its kind ended,
//! so under a steady stream of changes every customer gets its turn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clm_platform::server::Shutdown;
use clm_proto::identity as identity_pb;
use clm_proto::identity::customer_service_client::CustomerServiceClient;
use futures_util::StreamExt as _;
use tokio::sync::Notify;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::evaluate::LifecycleSnapshot;
use crate::store::ScoringStore;

/// How many snapshots are read per round.
const ROUND: u32 = 2048;
/// Snapshots per SetLifecycles call.
const BATCH: usize = 256;
/// How often unpushed snapshots are looked for without a wake-up.
const IDLE_CHECK: Duration = Duration::from_secs(2);

/// The snapshot pusher.
pub struct Pusher {
    store: Arc<dyn ScoringStore>,
    client: CustomerServiceClient<Channel>,
    timeout: Duration,
    concurrency: usize,
    score_interval: Duration,
    /// When the last round of score changes pushed something.
    scores_pushed_at: Option<Instant>,
    /// Where the next round of position changes starts.
    position_after: Option<Uuid>,
    /// Where the next round of score changes starts.
    score_after: Option<Uuid>,
}

/// What a round did.
#[derive(Debug, PartialEq)]
enum Round {
    /// Pushed this many snapshots.
    Pushed(usize),
    /// Nothing to push now; score changes may be due after this long.
    Idle(Option<Duration>),
}

impl Pusher {
    /// A pusher to the identity service on `channel`, sending up to
    /// `concurrency` calls at once, and snapshots whose scores alone
    /// changed at most every `score_interval`.
    pub fn new(
        store: Arc<dyn ScoringStore>,
        channel: Channel,
        timeout: Duration,
        concurrency: usize,
        score_interval: Duration,
    ) -> Self {
        Self {
            store,
            client: CustomerServiceClient::new(channel),
            timeout,
            concurrency: concurrency.max(1),
            score_interval,
            scores_pushed_at: None,
            position_after: None,
            score_after: None,
        }
    }

    /// Runs until `shutdown`, woken by `changed`.
    pub async fn run(mut self, changed: Arc<Notify>, shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.round().await {
                Ok(Round::Idle(scores_due)) => {
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        () = shutdown.triggered() => return,
                        () = changed.notified() => {}
                        () = tokio::time::sleep(scores_due.unwrap_or(IDLE_CHECK).min(IDLE_CHECK)) => {}
                    }
                }
                Ok(Round::Pushed(_)) => backoff = Duration::from_millis(100),
                Err(err) => {
                    tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "cannot push lifecycle snapshots to identity");
                    tokio::select! {
                        () = shutdown.triggered() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
            if shutdown.is_triggered() {
                return;
            }
        }
    }

    /// Pushes one round. Customers whose stage, acquisition status or
    /// health changed go first; those whose scores alone changed when none
    /// is left and the score interval has passed.
    async fn round(&mut self) -> Result<Round, String> {
        let mut pending = self.next_pending(true).await?;
        if pending.is_empty() {
            if let Some(wait) =
                scores_wait(self.scores_pushed_at, self.score_interval, Instant::now())
            {
                return Ok(Round::Idle(Some(wait)));
            }
            pending = self.next_pending(false).await?;
            if !pending.is_empty() {
                self.scores_pushed_at = Some(Instant::now());
            }
        }
        if pending.is_empty() {
            return Ok(Round::Idle(None));
        }
        let batches: Vec<Vec<(Uuid, i64, LifecycleSnapshot)>> =
            pending.chunks(BATCH).map(<[_]>::to_vec).collect();
        let outcomes: Vec<Result<Vec<(Uuid, i64)>, String>> = futures_util::stream::iter(batches)
            .map(|batch| self.push(batch))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let mut done = Vec::new();
        let mut failure = None;
        for outcome in outcomes {
            match outcome {
                Ok(pushed) => done.extend(pushed),
                Err(reason) => failure = Some(reason),
            }
        }
        self.store
            .mark_pushed(&done)
            .await
            .map_err(|err| err.to_string())?;
        match failure {
            Some(reason) if done.is_empty() => Err(reason),
            Some(reason) => {
                tracing::debug!(%reason, "some snapshots were not pushed; retrying");
                Ok(Round::Pushed(done.len()))
            }
            None => Ok(Round::Pushed(done.len())),
        }
    }

    /// The next snapshots of a kind to push, after where the previous
    /// round of that kind ended (from the first customer again at the
    /// end).
    async fn next_pending(
        &mut self,
        position_only: bool,
    ) -> Result<Vec<(Uuid, i64, LifecycleSnapshot)>, String> {
        let after = if position_only {
            &mut self.position_after
        } else {
            &mut self.score_after
        };
        let mut pending = self
            .store
            .unpushed(ROUND, position_only, *after)
            .await
            .map_err(|err| err.to_string())?;
        if pending.is_empty() && after.is_some() {
            pending = self
                .store
                .unpushed(ROUND, position_only, None)
                .await
                .map_err(|err| err.to_string())?;
        }
        *after = if pending.len() == ROUND as usize {
            pending.last().map(|(id, _, _)| *id)
        } else {
            None
        };
        Ok(pending)
    }

    /// Sends one batch; identity has every snapshot of it afterwards (or
    /// ignores it: merged, erased or unknown customers, older snapshots).
    async fn push(
        &self,
        batch: Vec<(Uuid, i64, LifecycleSnapshot)>,
    ) -> Result<Vec<(Uuid, i64)>, String> {
        let mut request = tonic::Request::new(identity_pb::SetLifecyclesRequest {
            items: batch
                .iter()
                .map(|(id, _, snapshot)| identity_pb::SetLifecycleRequest {
                    customer_id: id.to_string(),
                    lifecycle: Some(snapshot.to_proto()),
                })
                .collect(),
        });
        request.set_timeout(self.timeout);
        match self.client.clone().set_lifecycles(request).await {
            Ok(_) => Ok(batch
                .into_iter()
                .map(|(id, version, _)| (id, version))
                .collect()),
            Err(status) => Err(format!("{}: {}", status.code(), status.message())),
        }
    }
}

/// How long score changes must still wait, when the last round of them
/// pushed something at `last`; `None`: they may go now.
fn scores_wait(last: Option<Instant>, interval: Duration, now: Instant) -> Option<Duration> {
    let since = now.saturating_duration_since(last?);
    interval.checked_sub(since).filter(|wait| !wait.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_changes_wait_for_the_interval_after_a_round() {
        let interval = Duration::from_secs(2);
        let start = Instant::now();
        assert_eq!(scores_wait(None, interval, start), None, "never pushed");
        assert_eq!(
            scores_wait(Some(start), interval, start + Duration::from_millis(500)),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(scores_wait(Some(start), interval, start + interval), None);
        assert_eq!(
            scores_wait(Some(start), interval, start + Duration::from_secs(9)),
            None
        );
        assert_eq!(
            scores_wait(Some(start), Duration::ZERO, start),
            None,
            "no interval"
        );
    }
}
