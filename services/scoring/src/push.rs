//! Pushes each customer's latest snapshot to identity (SetLifecycle), so the
//! hot profile shows stage, health and scores.
//!
//! Which snapshots identity has not received is stored (`pushed_version`
//! below `version`), so nothing is lost when identity is down or this
//! process stops, and only the latest snapshot of a customer is sent.
//!
//! Two loops share the work. Customers whose stage, acquisition status or
//! health changed are pushed after every committed write; those whose
//! scores alone changed in rounds at most every `score_interval`, so a
//! customer whose scores change many times in that while is written to
//! identity once, and a flood of touchpoints leaves the profile's stage
//! current while its scores trail by about that interval. Each loop goes
//! through the customers in id order from where its previous round ended,
//! so under a steady stream of changes every customer gets its turn.

use std::sync::Arc;
use std::time::Duration;

use clm_platform::server::Shutdown;
use clm_platform::service::PeerChannel;
use clm_proto::identity as identity_pb;
use clm_proto::identity::customer_service_client::CustomerServiceClient;
use futures_util::StreamExt as _;
use tokio::sync::Notify;
use uuid::Uuid;

use clm_eventlog::ShardFilter;
use clm_eventlog::leases::{Fence, HeldShards};

use crate::evaluate::LifecycleSnapshot;
use crate::store::ScoringStore;

/// How many snapshots are read per round.
const ROUND: u32 = 2048;
/// Snapshots per SetLifecycles call.
const BATCH: usize = 256;
/// How often position changes are looked for without a wake-up.
const IDLE_CHECK: Duration = Duration::from_secs(2);
/// How often score changes are looked for at least, when the score
/// interval is shorter.
const SCORE_IDLE_CHECK: Duration = Duration::from_millis(100);

/// The snapshot pusher of the customers of the shards a replica holds.
pub struct Pusher {
    store: Arc<dyn ScoringStore>,
    held: HeldShards,
    client: CustomerServiceClient<PeerChannel>,
    timeout: Duration,
    concurrency: usize,
    score_interval: Duration,
}

/// Which changes a push loop sends. A customer is in one set at a time,
/// so the two loops never send identity the same customer at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Changes {
    /// Stage, acquisition status or health changed.
    Position,
    /// The scores alone changed.
    Scores,
}

impl Pusher {
    /// A pusher of the customers of the shards in `held` (read again every
    /// round) to the identity service on `channel`, sending up to
    /// `concurrency` calls at once, and snapshots whose scores alone
    /// changed at most every `score_interval`.
    pub fn new(
        store: Arc<dyn ScoringStore>,
        held: HeldShards,
        channel: PeerChannel,
        timeout: Duration,
        concurrency: usize,
        score_interval: Duration,
    ) -> Self {
        Self {
            store,
            held,
            client: CustomerServiceClient::new(channel),
            timeout,
            concurrency: concurrency.max(1),
            score_interval,
        }
    }

    /// Runs until `shutdown`: position changes as soon as `changed` says a
    /// write was committed, score changes in rounds every score interval.
    /// The two loops run side by side, so a position change never waits
    /// behind a round of score changes; identity keeps the newest snapshot
    /// whichever arrives last.
    pub async fn run(self, changed: Arc<Notify>, shutdown: Shutdown) {
        tokio::join!(
            self.push_loop(Changes::Position, Some(changed), shutdown.clone()),
            self.push_loop(Changes::Scores, None, shutdown),
        );
    }

    async fn push_loop(&self, changes: Changes, changed: Option<Arc<Notify>>, shutdown: Shutdown) {
        let mut after = None;
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_triggered() {
            // How long to wait, and whether a committed write ends the wait.
            let (wait, on_write) = match self.round(changes, &mut after).await {
                Ok(pushed) => {
                    backoff = Duration::from_millis(100);
                    match changes {
                        Changes::Position if pushed > 0 => continue,
                        Changes::Position => (IDLE_CHECK, true),
                        Changes::Scores if pushed > 0 => (self.score_interval, false),
                        Changes::Scores => (self.score_interval.max(SCORE_IDLE_CHECK), false),
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "cannot push lifecycle snapshots to identity");
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    (wait, false)
                }
            };
            let written = async {
                match &changed {
                    Some(changed) if on_write => changed.notified().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.triggered() => return,
                () = written => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Pushes one round of `changes`, from after `after` (moved on to
    /// where the next round starts); returns how many snapshots identity
    /// received.
    async fn round(&self, changes: Changes, after: &mut Option<Uuid>) -> Result<usize, String> {
        let leases = self.held.leases();
        let shards: Vec<ShardFilter> = leases.iter().map(|lease| lease.shard).collect();
        let fences: Vec<Fence> = leases.into_iter().map(|lease| lease.fence).collect();
        let pending = self.next_pending(changes, after, &shards).await?;
        if pending.is_empty() {
            return Ok(0);
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
            .mark_pushed(&done, &fences)
            .await
            .map_err(|err| err.to_string())?;
        match failure {
            Some(reason) if done.is_empty() => Err(reason),
            Some(reason) => {
                tracing::debug!(%reason, "some snapshots were not pushed; retrying");
                Ok(done.len())
            }
            None => Ok(done.len()),
        }
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

    /// The next snapshots of a kind to push, after where the previous
    /// round of that kind ended (from the first customer again at the
    /// end).
    async fn next_pending(
        &self,
        changes: Changes,
        after: &mut Option<Uuid>,
        shards: &[ShardFilter],
    ) -> Result<Vec<(Uuid, i64, LifecycleSnapshot)>, String> {
        let position = changes == Changes::Position;
        let mut pending = self
            .store
            .unpushed(ROUND, position, *after, shards)
            .await
            .map_err(|err| err.to_string())?;
        if pending.is_empty() && after.is_some() {
            pending = self
                .store
                .unpushed(ROUND, position, None, shards)
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
}
