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

use std::sync::Arc;
use std::time::Duration;

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
}

impl Pusher {
    /// A pusher to the identity service on `channel`.
    pub fn new(
        store: Arc<dyn ScoringStore>,
        channel: Channel,
        timeout: Duration,
        concurrency: usize,
    ) -> Self {
        Self {
            store,
            client: CustomerServiceClient::new(channel),
            timeout,
            concurrency: concurrency.max(1),
        }
    }

    /// Runs until `shutdown`, woken by `changed`.
    pub async fn run(self, changed: Arc<Notify>, shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.round().await {
                Ok(0) => {
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        () = shutdown.triggered() => return,
                        () = changed.notified() => {}
                        () = tokio::time::sleep(IDLE_CHECK) => {}
                    }
                }
                Ok(_) => backoff = Duration::from_millis(100),
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

    /// Pushes one round; returns how many snapshots identity received.
    /// Customers whose stage, acquisition status or health changed go
    /// first; those whose scores alone changed when none is left.
    async fn round(&self) -> Result<usize, String> {
        let mut pending = self
            .store
            .unpushed(ROUND, true)
            .await
            .map_err(|err| err.to_string())?;
        if pending.is_empty() {
            pending = self
                .store
                .unpushed(ROUND, false)
                .await
                .map_err(|err| err.to_string())?;
        }
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
            .mark_pushed(&done)
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
}
