//! Pushes each customer's latest snapshot to identity (SetLifecycle), so the
//! hot profile shows stage, health and scores.
//!
//! Which snapshots identity has not received is stored (`pushed_version`
//! below `version`), so nothing is lost when identity is down or this
//! process stops: the pusher works through that set after every write and
//! on a timer, and only the latest snapshot of a customer is sent.

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
const ROUND: u32 = 512;
/// How often unpushed snapshots are looked for without a wake-up.
const IDLE_CHECK: Duration = Duration::from_secs(2);

/// The snapshot pusher.
pub struct Pusher {
    store: Arc<dyn ScoringStore>,
    client: CustomerServiceClient<Channel>,
    timeout: Duration,
    concurrency: usize,
}

enum Outcome {
    /// Identity has it (or will never want it: merged or unknown customer).
    Done(Uuid, i64),
    /// Retry later.
    Failed(String),
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
    async fn round(&self) -> Result<usize, String> {
        let pending = self
            .store
            .unpushed(ROUND)
            .await
            .map_err(|err| err.to_string())?;
        if pending.is_empty() {
            return Ok(0);
        }
        let outcomes: Vec<Outcome> = futures_util::stream::iter(pending)
            .map(|(id, version, snapshot)| self.push(id, version, snapshot))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let mut done = Vec::with_capacity(outcomes.len());
        let mut failure = None;
        for outcome in outcomes {
            match outcome {
                Outcome::Done(id, version) => done.push((id, version)),
                Outcome::Failed(reason) => failure = Some(reason),
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

    async fn push(&self, id: Uuid, version: i64, snapshot: LifecycleSnapshot) -> Outcome {
        let mut request = tonic::Request::new(identity_pb::SetLifecycleRequest {
            customer_id: id.to_string(),
            lifecycle: Some(snapshot.to_proto()),
        });
        request.set_timeout(self.timeout);
        match self.client.clone().set_lifecycle(request).await {
            Ok(_) => Outcome::Done(id, version),
            // A customer identity does not know or merged away: nothing to
            // show, nothing to retry.
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::NotFound | tonic::Code::FailedPrecondition
                ) =>
            {
                Outcome::Done(id, version)
            }
            Err(status) => Outcome::Failed(format!("{}: {}", status.code(), status.message())),
        }
    }
}
