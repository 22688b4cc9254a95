//! The rules of recording touchpoints: one result per item, duplicates by
//! event id reported and never stored twice, customers resolved in one
//! round trip per batch, and nothing stored when identity cannot be asked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use uuid::Uuid;

use crate::model::{Stored, Touchpoint};
use crate::store::{StoreError, TouchpointStore};
use clm_platform::identity::{IdentityResolver, IdentityUnavailable, Reference, Resolution};

/// One reason an item was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The request field, e.g. `touchpoints[3].revenue.currency_code`.
    pub field: String,
    /// UPPER_SNAKE_CASE reason.
    pub reason: String,
    /// Explanation.
    pub description: String,
}

impl Violation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, reason: &str, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.to_owned(),
            description: description.into(),
        }
    }
}

/// A valid item: its touchpoint (customer still to resolve) and reference.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The field prefix of the item, e.g. `touchpoints[3]`.
    pub field: String,
    /// Who it is about.
    pub reference: Reference,
    /// The touchpoint; `customer_id` is filled after resolution.
    pub touchpoint: Touchpoint,
}

/// What happened to one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored now.
    Stored {
        /// Its id.
        id: Uuid,
        /// Its customer.
        customer_id: Uuid,
    },
    /// Stored before (possibly earlier in the same batch).
    Duplicate {
        /// The earlier touchpoint's id.
        id: Uuid,
        /// Its customer.
        customer_id: Uuid,
    },
    /// Not stored.
    Rejected(Vec<Violation>),
}

/// Why a whole ingest call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    /// Identity could not be asked; nothing was stored.
    #[error(transparent)]
    IdentityUnavailable(#[from] IdentityUnavailable),
    /// The database failed; nothing was stored.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How many times a batch is retried after losing a lock race.
const MAX_ATTEMPTS: u32 = 5;

/// One unary touchpoint waiting for its batch, where its outcome goes, and
/// the span of the call that sent it.
type Waiting = (
    Result<Candidate, Vec<Violation>>,
    oneshot::Sender<Result<Outcome, IngestError>>,
    tracing::Span,
);

/// The most unary touchpoints committed together.
const MAX_GROUP: usize = 512;
/// How long the first unary touchpoint of a group waits for company.
const GROUP_WINDOW: Duration = Duration::from_millis(1);

/// Records touchpoints.
#[derive(Clone)]
pub struct TouchpointIngest {
    store: Arc<dyn TouchpointStore>,
    resolver: IdentityResolver,
    unary: Option<mpsc::Sender<Waiting>>,
}

impl TouchpointIngest {
    /// Ingest into `store`, resolving customers through `resolver`.
    pub fn new(store: Arc<dyn TouchpointStore>, resolver: IdentityResolver) -> Self {
        Self {
            store,
            resolver,
            unary: None,
        }
    }

    /// Groups concurrent single-touchpoint calls into one batch (one
    /// identity round trip, one transaction): under load many callers share
    /// a commit instead of each paying for its own. Call once, on a runtime.
    pub fn with_group_commit(mut self) -> Self {
        let (sender, mut receiver) = mpsc::channel::<Waiting>(4 * MAX_GROUP);
        let ingest = self.clone();
        tokio::spawn(async move {
            while let Some(first) = receiver.recv().await {
                let mut group = vec![first];
                let window = tokio::time::sleep(GROUP_WINDOW);
                tokio::pin!(window);
                while group.len() < MAX_GROUP {
                    tokio::select! {
                        next = receiver.recv() => match next {
                            Some(item) => group.push(item),
                            None => break,
                        },
                        () = &mut window => break,
                    }
                }
                let mut items = Vec::with_capacity(group.len());
                let mut replies = Vec::with_capacity(group.len());
                let mut spans = Vec::with_capacity(group.len());
                for (item, reply, span) in group {
                    items.push(item);
                    replies.push(reply);
                    spans.push(span);
                }
                // The batch continues the first call's trace (its identity
                // call and insert included) and links the others' traces.
                let batch = tracing::info_span!(
                    parent: &spans[0],
                    "touchpoints.group_commit",
                    touchpoints = items.len()
                );
                for other in &spans[1..] {
                    clm_platform::telemetry::add_link(&batch, other);
                }
                match ingest.record(items).instrument(batch).await {
                    Ok(outcomes) => {
                        for (reply, outcome) in replies.into_iter().zip(outcomes) {
                            let _ = reply.send(Ok(outcome));
                        }
                    }
                    Err(err) => {
                        for reply in replies {
                            let _ = reply.send(Err(err.clone()));
                        }
                    }
                }
            }
        });
        self.unary = Some(sender);
        self
    }

    /// Records one touchpoint, grouped with concurrent ones when group
    /// commit is on.
    pub async fn record_one(
        &self,
        item: Result<Candidate, Vec<Violation>>,
    ) -> Result<Outcome, IngestError> {
        let Some(unary) = &self.unary else {
            let mut outcomes = self.record(vec![item]).await?;
            return Ok(outcomes.pop().expect("one outcome per item"));
        };
        let (reply, answer) = oneshot::channel();
        if unary
            .send((item, reply, tracing::Span::current()))
            .await
            .is_err()
        {
            return Err(IngestError::Store(StoreError::Unavailable(
                "the ingest queue is closed".into(),
            )));
        }
        answer.await.unwrap_or_else(|_| {
            Err(IngestError::Store(StoreError::Unavailable(
                "the ingest queue is closed".into(),
            )))
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn TouchpointStore> {
        &self.store
    }

    /// The resolver.
    pub fn resolver(&self) -> &IdentityResolver {
        &self.resolver
    }

    /// Records a batch: items that failed validation come in as their
    /// violations. Returns one outcome per item, in order. Either everything
    /// valid is committed or (on an error) nothing.
    pub async fn record(
        &self,
        items: Vec<Result<Candidate, Vec<Violation>>>,
    ) -> Result<Vec<Outcome>, IngestError> {
        let references: Vec<Reference> = items
            .iter()
            .filter_map(|item| item.as_ref().ok().map(|c| c.reference.clone()))
            .collect();
        let mut resolutions = self.resolver.resolve(&references).await?.into_iter();

        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(items.len());
        let mut to_store: Vec<Touchpoint> = Vec::new();
        let mut slots: Vec<usize> = Vec::new();
        // Later items with an event id seen earlier in the batch: (slot, first item's slot).
        let mut repeats: Vec<(usize, usize)> = Vec::new();
        let mut first_by_event: HashMap<String, usize> = HashMap::new();
        for (slot, item) in items.into_iter().enumerate() {
            let candidate = match item {
                Err(violations) => {
                    outcomes.push(Some(Outcome::Rejected(violations)));
                    continue;
                }
                Ok(candidate) => candidate,
            };
            let resolution = resolutions.next().expect("one resolution per candidate");
            match resolution {
                Resolution::Refused { reason, problems } => {
                    outcomes.push(Some(Outcome::Rejected(
                        problems
                            .into_iter()
                            .map(|(path, description)| {
                                Violation::new(
                                    format!("{}.customer{path}", candidate.field),
                                    &reason,
                                    description,
                                )
                            })
                            .collect(),
                    )));
                }
                Resolution::Customer(customer_id) => {
                    if let Some(first) = first_by_event.get(&candidate.touchpoint.event_id) {
                        repeats.push((slot, *first));
                        outcomes.push(None);
                        continue;
                    }
                    first_by_event.insert(candidate.touchpoint.event_id.clone(), slot);
                    let mut touchpoint = candidate.touchpoint;
                    touchpoint.customer_id = customer_id;
                    to_store.push(touchpoint);
                    slots.push(slot);
                    outcomes.push(None);
                }
            }
        }

        let stored = self.insert_with_retries(&to_store).await?;
        for (slot, result) in slots.into_iter().zip(stored) {
            outcomes[slot] = Some(match result {
                Stored::New { id, customer_id } => Outcome::Stored { id, customer_id },
                Stored::Duplicate { id, customer_id } => Outcome::Duplicate { id, customer_id },
            });
        }
        for (slot, first) in repeats {
            outcomes[slot] = Some(match outcomes[first].clone() {
                Some(
                    Outcome::Stored { id, customer_id } | Outcome::Duplicate { id, customer_id },
                ) => Outcome::Duplicate { id, customer_id },
                other => other.expect("the first occurrence has an outcome"),
            });
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every item has an outcome"))
            .collect())
    }

    async fn insert_with_retries(
        &self,
        touchpoints: &[Touchpoint],
    ) -> Result<Vec<Stored>, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.store.insert(touchpoints).await {
                Err(StoreError::Conflict(detail)) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(attempt, error = %detail, "touchpoint batch lost a race, retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(5 * u64::from(attempt)))
                        .await;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use chrono::Utc;
    use tracing_subscriber::layer::{Context, SubscriberExt as _};
    use tracing_subscriber::registry::LookupSpan;

    use super::*;

    /// A span's name and its parent's.
    type SpanAndParent = (String, Option<String>);

    /// Records each new span's name with its parent's name.
    #[derive(Clone, Default)]
    struct Parents(Arc<Mutex<Vec<SpanAndParent>>>);

    impl<S> tracing_subscriber::Layer<S> for Parents
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            id: &tracing::span::Id,
            ctx: Context<'_, S>,
        ) {
            let parent = ctx
                .span(id)
                .and_then(|span| span.parent().map(|parent| parent.name().to_owned()));
            self.0
                .lock()
                .unwrap()
                .push((attrs.metadata().name().to_owned(), parent));
        }
    }

    #[tokio::test]
    async fn a_group_commit_continues_the_trace_of_the_call() {
        // The unary RecordTouchpoint's batch once ran as a root span of its
        // own, so the identity call and the insert were separate traces.
        let parents = Parents::default();
        let _guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(parents.clone()));
        let dir = tempfile::tempdir().unwrap();
        let url = clm_platform::Secret::new(format!("sqlite://{}/t.db", dir.path().display()));
        let pools = clm_platform::db::connect(&url, "touchpoints", 2)
            .await
            .unwrap();
        crate::store::MIGRATIONS.run(&pools).await.unwrap();
        // Nothing listens there: the call fails, after its batch started.
        let resolver = IdentityResolver::new(
            clm_platform::service::peer_channel("http://127.0.0.1:9").unwrap(),
            Duration::from_millis(200),
        );
        let ingest = TouchpointIngest::new(crate::store::open(pools), resolver).with_group_commit();
        let now = Utc::now();
        let candidate = Candidate {
            field: "touchpoint".into(),
            reference: Reference::Id(Uuid::now_v7()),
            touchpoint: Touchpoint {
                id: Uuid::now_v7(),
                event_id: "traced".into(),
                customer_id: Uuid::nil(),
                channel: 1,
                kind: "page_view".into(),
                occurred_at: now,
                recorded_at: now,
                campaign: String::new(),
                utm_source: String::new(),
                utm_medium: String::new(),
                properties: None,
                revenue: None,
                cost: None,
            },
        };
        let outcome = ingest
            .record_one(Ok(candidate))
            .instrument(tracing::info_span!("the_call"))
            .await;
        assert!(matches!(outcome, Err(IngestError::IdentityUnavailable(_))));
        let seen = parents.0.lock().unwrap().clone();
        assert!(
            seen.contains(&(
                "touchpoints.group_commit".to_owned(),
                Some("the_call".to_owned())
            )),
            "{seen:?}"
        );
    }
}
