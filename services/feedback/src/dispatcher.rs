//! The due-time sweeps. A scheduled dispatch that falls due is checked —
//! survey still active, customer not erased, fatigue across all surveys and
//! per survey, consent for the survey's purpose as identity holds it — and
//! becomes DISPATCHED (released for delivery, with its response window) or
//! SUPPRESSED with the reason. A released dispatch not answered within its
//! window becomes EXPIRED. Both sweeps read partial indexes of the due rows
//! only, never a scan of all dispatches.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use clm_platform::clock::Clock;
use clm_platform::server::Shutdown;
use clm_platform::service::PeerChannel;
use clm_proto::identity as identity_pb;
use clm_proto::identity::customer_service_client::CustomerServiceClient;
use tonic::Code;
use uuid::Uuid;

use crate::model::{Dispatch, DispatchState, Fate, SuppressReason, Survey, SurveyState};
use crate::service::dispatch_entry;
use crate::store::{FeedbackStore, StoreError};

/// The most dispatches one round settles.
const ROUND: u32 = 500;

/// What identity says of a customer's consent for a purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consent {
    /// GRANTED.
    Granted,
    /// Anything else (none recorded, denied, withdrawn).
    NotGranted,
    /// The customer was erased.
    Erased,
}

/// Reads consents from identity.
#[derive(Clone)]
pub struct ConsentReader {
    client: CustomerServiceClient<PeerChannel>,
    timeout: Duration,
}

impl ConsentReader {
    /// A reader asking identity on `channel`, each call within `timeout`.
    pub fn new(channel: PeerChannel, timeout: Duration) -> Self {
        Self {
            client: CustomerServiceClient::new(channel),
            timeout,
        }
    }

    /// The consent of `customer_id` (or of whom it was merged into) for
    /// `purpose`; an error when identity cannot be asked.
    pub async fn consent(&self, customer_id: Uuid, purpose: &str) -> Result<Consent, String> {
        let mut id = customer_id.to_string();
        for _ in 0..3 {
            let mut request = tonic::Request::new(identity_pb::GetCustomerRequest {
                customer_id: id.clone(),
            });
            request.set_timeout(self.timeout);
            let customer = match self.client.clone().get_customer(request).await {
                Ok(answer) => answer.into_inner().customer.unwrap_or_default(),
                Err(status) if status.code() == Code::NotFound => return Ok(Consent::NotGranted),
                Err(status) => return Err(status.message().to_owned()),
            };
            match identity_pb::CustomerState::try_from(customer.state) {
                Ok(identity_pb::CustomerState::Erased) => return Ok(Consent::Erased),
                Ok(identity_pb::CustomerState::Merged) if !customer.merged_into_id.is_empty() => {
                    id = customer.merged_into_id;
                    continue;
                }
                _ => {}
            }
            let granted = customer.consents.iter().any(|consent| {
                consent.purpose == purpose
                    && consent.status == identity_pb::ConsentStatus::Granted as i32
            });
            return Ok(if granted {
                Consent::Granted
            } else {
                Consent::NotGranted
            });
        }
        Ok(Consent::NotGranted)
    }
}

/// The sweeps over due and expiring dispatches.
pub struct Dispatcher {
    store: Arc<dyn FeedbackStore>,
    clock: Clock,
    consent: ConsentReader,
    poll: Duration,
}

impl Dispatcher {
    /// Sweeps over `store`, "now" from `clock`, consents from `consent`,
    /// looking for due dispatches every `poll` (and whenever this process
    /// appends to the feedback log).
    pub fn new(
        store: Arc<dyn FeedbackStore>,
        clock: Clock,
        consent: ConsentReader,
        poll: Duration,
    ) -> Self {
        Self {
            store,
            clock,
            consent,
            poll,
        }
    }

    /// Sweeps until `stop`.
    pub async fn run(self, stop: Shutdown) -> anyhow::Result<()> {
        let mut appended = self.store.log().appended();
        while !stop.is_triggered() {
            let busy = match self.round().await {
                Ok(settled) => settled >= ROUND as usize,
                Err(err) => {
                    tracing::warn!(error = %err, "the dispatch sweep failed; retrying");
                    false
                }
            };
            if busy {
                continue;
            }
            appended.mark_unchanged();
            tokio::select! {
                () = stop.triggered() => break,
                _ = appended.changed() => {}
                () = tokio::time::sleep(self.poll) => {}
            }
        }
        Ok(())
    }

    /// One round: settles what is due, expires what is past its window.
    /// Returns how many dispatches changed.
    pub async fn round(&self) -> Result<usize, StoreError> {
        let now = self.clock.now();
        let due = self.store.due_dispatches(now, ROUND).await?;
        let mut settled = Vec::with_capacity(due.len());
        let mut surveys: HashMap<Uuid, Option<Survey>> = HashMap::new();
        let mut customers: Vec<Uuid> = due.iter().map(|d| d.customer_id).collect();
        customers.sort_unstable();
        customers.dedup();
        let fates = self.store.fates(&customers).await?;
        // The last releases of every customer of the round, in one read;
        // releases decided in this round join them, so two dispatches of one
        // customer due together count each other for fatigue.
        let mut released = self.store.last_releases(&customers).await?;
        for dispatch in due {
            if let Entry::Vacant(vacant) = surveys.entry(dispatch.survey_id) {
                vacant.insert(self.store.survey(dispatch.survey_id).await?);
            }
            let Some(survey) = surveys.get(&dispatch.survey_id).cloned().flatten() else {
                continue;
            };
            let Some(state) = self
                .decide(
                    &dispatch,
                    &survey,
                    fates.get(&dispatch.customer_id),
                    &released,
                    now,
                )
                .await?
            else {
                continue;
            };
            let mut decided = dispatch.clone();
            decided.state = state;
            if state == DispatchState::Dispatched {
                let window =
                    TimeDelta::from_std(survey.definition.response_window).unwrap_or_default();
                decided.dispatched_at = Some(now);
                decided.expires_at = Some(now + window);
                released
                    .entry(decided.customer_id)
                    .or_default()
                    .insert(decided.survey_id, now);
            }
            let entry = dispatch_entry(&decided, now);
            settled.push((decided, entry));
        }
        let changed = self.store.settle_dispatches(&settled).await?.len();
        let entry = move |dispatch: &Dispatch| dispatch_entry(dispatch, now);
        let expired = self.store.expire_dispatches(now, ROUND, &entry).await?;
        Ok(changed + expired)
    }

    /// What a due dispatch becomes; `None` to leave it scheduled for the
    /// next round (identity could not be asked).
    async fn decide(
        &self,
        dispatch: &Dispatch,
        survey: &Survey,
        fate: Option<&Fate>,
        released: &HashMap<Uuid, HashMap<Uuid, DateTime<Utc>>>,
        now: DateTime<Utc>,
    ) -> Result<Option<DispatchState>, StoreError> {
        let suppressed = |reason| Ok(Some(DispatchState::Suppressed(reason)));
        if survey.state != SurveyState::Active {
            return suppressed(SuppressReason::SurveyInactive);
        }
        if matches!(fate, Some(Fate::Erased)) {
            return suppressed(SuppressReason::CustomerErased);
        }
        let customer = dispatch.customer_id;
        let last = released.get(&customer).cloned().unwrap_or_default();
        let fatigue = survey.definition.fatigue;
        let within = |at: &DateTime<Utc>, interval: Duration| {
            !interval.is_zero() && now - *at < TimeDelta::from_std(interval).unwrap_or_default()
        };
        if last.values().any(|at| within(at, fatigue.min_interval)) {
            return suppressed(SuppressReason::Fatigue);
        }
        if last
            .get(&survey.id)
            .is_some_and(|at| within(at, fatigue.repeat_interval))
        {
            return suppressed(SuppressReason::Fatigue);
        }
        if let Some(purpose) = &survey.definition.consent_purpose {
            match self.consent.consent(customer, purpose).await {
                Ok(Consent::Granted) => {}
                Ok(Consent::NotGranted) => return suppressed(SuppressReason::NoConsent),
                Ok(Consent::Erased) => return suppressed(SuppressReason::CustomerErased),
                Err(error) => {
                    tracing::warn!(%error, dispatch = %dispatch.id, "identity could not be asked for consent; the dispatch waits");
                    return Ok(None);
                }
            }
        }
        Ok(Some(DispatchState::Dispatched))
    }
}
