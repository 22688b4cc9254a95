//! From the logs to dispatches. Three consumers follow the other services'
//! logs, each saving its cursor in the transaction of what it derives:
//!
//! - the transition log (scoring) and the touchpoint log: every entry is
//!   matched against the triggers of the active surveys; a match schedules
//!   a dispatch at the event's time plus the trigger's delay, at most one
//!   per (survey, trigger, source), so a replay or a second delivery makes
//!   none twice. Transitions also keep each customer's latest lifecycle (a
//!   trigger's `lifecycle`), and a retracted transition suppresses the
//!   dispatches it scheduled that have not fallen due;
//! - identity's customer events: merges move dispatches and responses to
//!   the survivor, erasures suppress scheduled dispatches and delete free
//!   text.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use clm_eventlog::ShardFilter;
use clm_eventlog::consumer::cursors::CursorMove;
use clm_eventlog::consumer::{ConsumeError, Projection};
use clm_eventlog::customer_events::{self, CustomerLogChange};
use clm_platform::clock::Clock;
use clm_proto::identity as identity_pb;
use clm_proto::scoring as scoring_pb;
use clm_proto::touchpoint as touchpoint_pb;
use uuid::Uuid;

use crate::model::{
    CustomerChange, Dispatch, DispatchState, Fate, Lifecycle, SuppressReason, Survey, SurveyQuery,
    SurveyState, TriggerSource,
};
use crate::service::{dispatch_entry, text_erased_entry};
use crate::store::{EventBatch, FeedbackStore, StoreError};
use crate::triggers::{self, CompiledTrigger, Field};

/// The cursor name of the transition log consumer.
pub const TRANSITIONS: &str = "scoring.transitions";
/// The cursor name of the touchpoint log consumer.
pub const TOUCHPOINTS: &str = "touchpoints.touchpoints";
/// The cursor name of the customer event consumer.
pub const CUSTOMER_EVENTS: &str = "identity.customer_events";

/// One event of a log, as triggers see it.
#[derive(Debug, Clone)]
pub struct Event {
    /// The log it came from.
    pub source: TriggerSource,
    /// What matched: the transition's or the touchpoint's id.
    pub source_id: String,
    /// The customer.
    pub customer_id: Uuid,
    /// When it happened (transition time, occur time).
    pub at: DateTime<Utc>,
    /// `event`'s keys.
    pub fields: Vec<(&'static str, Field)>,
    /// The lifecycle after the event, for a transition.
    pub lifecycle: Option<Lifecycle>,
}

/// The triggers of one survey version, compiled once.
type CompiledSurvey = Arc<Vec<(String, TriggerSource, std::time::Duration, CompiledTrigger)>>;

/// Matches events against the active surveys' triggers.
pub struct Matcher {
    store: Arc<dyn FeedbackStore>,
    clock: Clock,
    compiled: Mutex<HashMap<(Uuid, i64), CompiledSurvey>>,
}

impl Matcher {
    /// A matcher over `store`'s surveys, "now" from `clock`.
    pub fn new(store: Arc<dyn FeedbackStore>, clock: Clock) -> Self {
        Self {
            store,
            clock,
            compiled: Mutex::new(HashMap::new()),
        }
    }

    /// Every active survey with triggers, with them compiled.
    async fn active(&self) -> Result<Vec<(Survey, CompiledSurvey)>, StoreError> {
        let mut surveys = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .store
                .list_surveys(&SurveyQuery {
                    states: vec![SurveyState::Active],
                    kind: None,
                    after,
                    limit: 1000,
                })
                .await?;
            let last = page.last().map(|survey| survey.id);
            surveys.extend(
                page.into_iter()
                    .filter(|survey| !survey.definition.triggers.is_empty()),
            );
            match last {
                Some(id) => after = Some(id),
                None => break,
            }
        }
        let mut cache = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|(id, version), _| {
            surveys
                .iter()
                .any(|survey| survey.id == *id && survey.version == *version)
        });
        Ok(surveys
            .into_iter()
            .map(|survey| {
                let compiled = cache
                    .entry((survey.id, survey.version))
                    .or_insert_with(|| {
                        Arc::new(
                            survey
                                .definition
                                .triggers
                                .iter()
                                .filter_map(|trigger| {
                                    // Checked when stored; a condition that no
                                    // longer compiles matches nothing.
                                    let compiled =
                                        triggers::compile(trigger.source, &trigger.condition)
                                            .map_err(|refused| {
                                                tracing::error!(survey = %survey.id, trigger = %trigger.name, error = %refused.description, "a stored trigger does not compile");
                                            })
                                            .ok()?;
                                    Some((trigger.name.clone(), trigger.source, trigger.delay, compiled))
                                })
                                .collect(),
                        )
                    })
                    .clone();
                (survey, compiled)
            })
            .collect())
    }

    /// What `events` (in log order) ask of the store: the dispatches their
    /// matches schedule, the lifecycles they tell, the sources retracted.
    pub async fn batch(
        &self,
        events: Vec<Event>,
        retracted: Vec<String>,
    ) -> Result<EventBatch, StoreError> {
        let mut batch = EventBatch {
            retracted,
            ..EventBatch::default()
        };
        if events.is_empty() {
            return Ok(batch);
        }
        let ids: Vec<Uuid> = events
            .iter()
            .map(|event| event.customer_id)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let fates = self.store.fates(&ids).await?;
        let survivor = |id: Uuid| match fates.get(&id) {
            Some(Fate::Merged(survivor)) => *survivor,
            _ => id,
        };
        let mut lifecycles = self.store.lifecycles(&ids).await?;
        let surveys = self.active().await?;
        let now = self.clock.now();
        for event in events {
            let customer_id = survivor(event.customer_id);
            if let Some(lifecycle) = &event.lifecycle {
                batch.lifecycles.push((customer_id, lifecycle.clone()));
                lifecycles.insert(customer_id, lifecycle.clone());
            }
            if surveys.is_empty() {
                continue;
            }
            let lifecycle = lifecycles.get(&customer_id).cloned().unwrap_or_default();
            let lifecycle_fields = lifecycle_fields(&lifecycle);
            for (survey, compiled) in &surveys {
                for (name, source, delay, trigger) in compiled.iter() {
                    if *source != event.source {
                        continue;
                    }
                    match trigger.matches(&event.fields, &lifecycle_fields) {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(error) => {
                            tracing::debug!(survey = %survey.id, trigger = %name, %error, "a trigger did not evaluate");
                            continue;
                        }
                    }
                    if !survey.definition.samples(survey.id, customer_id) {
                        continue;
                    }
                    let due_at = event.at + TimeDelta::from_std(*delay).unwrap_or_default();
                    let window =
                        TimeDelta::from_std(survey.definition.response_window).unwrap_or_default();
                    let state = if matches!(fates.get(&event.customer_id), Some(Fate::Erased)) {
                        DispatchState::Suppressed(SuppressReason::CustomerErased)
                    } else if due_at + window < now {
                        DispatchState::Suppressed(SuppressReason::Stale)
                    } else {
                        DispatchState::Scheduled
                    };
                    batch.dispatches.push(Dispatch {
                        id: Uuid::now_v7(),
                        survey_id: survey.id,
                        customer_id,
                        trigger_name: name.clone(),
                        source_entry_id: event.source_id.clone(),
                        state,
                        due_at,
                        dispatched_at: None,
                        expires_at: None,
                        responded_at: None,
                        created_at: now,
                    });
                }
            }
        }
        Ok(batch)
    }
}

fn lifecycle_fields(lifecycle: &Lifecycle) -> Vec<(&'static str, Field)> {
    vec![
        ("stage", Field::Text(lifecycle.stage.clone())),
        (
            "acquisition_status",
            Field::Text(lifecycle.acquisition_status.clone()),
        ),
        ("health", Field::Text(lifecycle.health.clone())),
        (
            "engagement_score",
            Field::Number(lifecycle.engagement_score),
        ),
        ("lead_score", Field::Number(lifecycle.lead_score)),
        ("health_score", Field::Number(lifecycle.health_score)),
    ]
}

/// An enum value's name without its prefix (`LIFECYCLE_STAGE_CONVERSION` →
/// `CONVERSION`), '' when unspecified.
fn short_name(name: &str, prefix: &str) -> String {
    match name.strip_prefix(prefix) {
        Some("UNSPECIFIED") | None => String::new(),
        Some(rest) => rest.to_owned(),
    }
}

fn time_of(timestamp: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let timestamp = timestamp?;
    DateTime::from_timestamp(timestamp.seconds, timestamp.nanos.max(0) as u32)
}

fn stage(raw: i32) -> String {
    clm_proto::common::LifecycleStage::try_from(raw)
        .map(|v| short_name(v.as_str_name(), "LIFECYCLE_STAGE_"))
        .unwrap_or_default()
}

fn acquisition(raw: i32) -> String {
    clm_proto::common::AcquisitionStatus::try_from(raw)
        .map(|v| short_name(v.as_str_name(), "ACQUISITION_STATUS_"))
        .unwrap_or_default()
}

fn health(raw: i32) -> String {
    clm_proto::common::Health::try_from(raw)
        .map(|v| short_name(v.as_str_name(), "HEALTH_"))
        .unwrap_or_default()
}

/// A transition as an event (with the lifecycle after it).
pub fn transition_event(transition: &scoring_pb::Transition) -> Option<Event> {
    let customer_id = Uuid::try_parse(&transition.customer_id).ok()?;
    let at = time_of(transition.transition_time.as_ref())?;
    let cause = scoring_pb::TransitionCause::try_from(transition.cause)
        .map(|v| short_name(v.as_str_name(), "TRANSITION_CAUSE_"))
        .unwrap_or_default();
    let fields = vec![
        ("from_stage", Field::Text(stage(transition.from_stage))),
        ("to_stage", Field::Text(stage(transition.to_stage))),
        (
            "from_acquisition_status",
            Field::Text(acquisition(transition.from_acquisition_status)),
        ),
        (
            "to_acquisition_status",
            Field::Text(acquisition(transition.to_acquisition_status)),
        ),
        ("from_health", Field::Text(health(transition.from_health))),
        ("to_health", Field::Text(health(transition.to_health))),
        ("stage_rule", Field::Text(transition.stage_rule.clone())),
        ("health_rule", Field::Text(transition.health_rule.clone())),
        ("cause", Field::Text(cause)),
        (
            "model_version",
            Field::Text(transition.model_version.clone()),
        ),
    ];
    let lifecycle = transition.lifecycle.as_ref().map(|snapshot| Lifecycle {
        stage: stage(snapshot.stage),
        acquisition_status: acquisition(snapshot.acquisition_status),
        health: health(snapshot.health),
        engagement_score: snapshot.engagement_score,
        lead_score: snapshot.lead_score,
        health_score: snapshot.health_score,
        as_of: at,
    });
    Some(Event {
        source: TriggerSource::Transition,
        source_id: transition.id.clone(),
        customer_id,
        at,
        fields,
        lifecycle,
    })
}

/// A recorded touchpoint as an event.
pub fn touchpoint_event(
    customer_id: &str,
    recorded: &touchpoint_pb::TouchpointRecorded,
) -> Option<Event> {
    let customer_id = Uuid::try_parse(customer_id).ok()?;
    let at = time_of(recorded.occur_time.as_ref())?;
    let channel = touchpoint_pb::Channel::try_from(recorded.channel)
        .map(|v| short_name(v.as_str_name(), "CHANNEL_").to_ascii_lowercase())
        .unwrap_or_default();
    let (currency, revenue) = recorded
        .revenue
        .as_ref()
        .map_or((String::new(), 0.0), |money| {
            (
                money.currency_code.clone(),
                money.amount_micros as f64 / 1_000_000.0,
            )
        });
    Some(Event {
        source: TriggerSource::Touchpoint,
        source_id: recorded.touchpoint_id.clone(),
        customer_id,
        at,
        fields: vec![
            ("type", Field::Text(recorded.r#type.clone())),
            ("channel", Field::Text(channel)),
            ("campaign", Field::Text(recorded.campaign.clone())),
            ("utm_source", Field::Text(recorded.utm_source.clone())),
            ("utm_medium", Field::Text(recorded.utm_medium.clone())),
            ("currency", Field::Text(currency)),
            ("revenue", Field::Number(revenue)),
        ],
        lifecycle: None,
    })
}

/// Follows the transition log.
pub struct TransitionProjection {
    matcher: Arc<Matcher>,
}

impl TransitionProjection {
    /// A projection matching with `matcher`.
    pub fn new(matcher: Arc<Matcher>) -> Self {
        Self { matcher }
    }
}

async fn apply(
    matcher: &Matcher,
    events: Vec<Event>,
    retracted: Vec<String>,
    cursor: &CursorMove,
) -> Result<(), ConsumeError> {
    let batch = matcher
        .batch(events, retracted)
        .await
        .map_err(ConsumeError::new)?;
    let now = matcher.clock.now();
    let entry = move |dispatch: &Dispatch| dispatch_entry(dispatch, now);
    matcher
        .store
        .apply_events(&batch, &entry, cursor)
        .await
        .map_err(ConsumeError::new)
}

#[async_trait]
impl Projection for TransitionProjection {
    type Entry = scoring_pb::TransitionLogEntry;

    fn cursor_name(&self) -> &'static str {
        TRANSITIONS
    }

    async fn saved_cursor(&self, shard: ShardFilter) -> Result<String, ConsumeError> {
        self.matcher
            .store
            .saved_cursor(TRANSITIONS, shard)
            .await
            .map_err(ConsumeError::new)
    }

    fn max_batch(&self) -> usize {
        500
    }

    async fn apply(
        &self,
        batch: Vec<Self::Entry>,
        cursor: &CursorMove,
    ) -> Result<(), ConsumeError> {
        use scoring_pb::transition_log_entry::Change;
        let mut events = Vec::new();
        let mut retracted = Vec::new();
        for entry in &batch {
            match &entry.change {
                Some(Change::Transition(transition)) => events.extend(transition_event(transition)),
                Some(Change::Retracted(retraction)) => {
                    if let Some(transition) = &retraction.transition {
                        retracted.push(transition.id.clone());
                    }
                }
                None => {}
            }
        }
        apply(&self.matcher, events, retracted, cursor).await
    }
}

/// Follows the touchpoint log.
pub struct TouchpointProjection {
    matcher: Arc<Matcher>,
}

impl TouchpointProjection {
    /// A projection matching with `matcher`.
    pub fn new(matcher: Arc<Matcher>) -> Self {
        Self { matcher }
    }
}

#[async_trait]
impl Projection for TouchpointProjection {
    type Entry = touchpoint_pb::TouchpointLogEntry;

    fn cursor_name(&self) -> &'static str {
        TOUCHPOINTS
    }

    async fn saved_cursor(&self, shard: ShardFilter) -> Result<String, ConsumeError> {
        self.matcher
            .store
            .saved_cursor(TOUCHPOINTS, shard)
            .await
            .map_err(ConsumeError::new)
    }

    fn max_batch(&self) -> usize {
        500
    }

    async fn apply(
        &self,
        batch: Vec<Self::Entry>,
        cursor: &CursorMove,
    ) -> Result<(), ConsumeError> {
        use touchpoint_pb::touchpoint_log_entry::Change;
        let events = batch
            .iter()
            .filter_map(|entry| match &entry.change {
                Some(Change::Recorded(recorded)) => touchpoint_event(&entry.customer_id, recorded),
                _ => None,
            })
            .collect();
        apply(&self.matcher, events, Vec::new(), cursor).await
    }
}

/// Follows identity's customer events: merges and erasures.
pub struct CustomerProjection {
    store: Arc<dyn FeedbackStore>,
    clock: Clock,
}

impl CustomerProjection {
    /// A projection into `store`.
    pub fn new(store: Arc<dyn FeedbackStore>, clock: Clock) -> Self {
        Self { store, clock }
    }
}

#[async_trait]
impl Projection for CustomerProjection {
    type Entry = identity_pb::CustomerEvent;

    fn cursor_name(&self) -> &'static str {
        CUSTOMER_EVENTS
    }

    async fn saved_cursor(&self, shard: ShardFilter) -> Result<String, ConsumeError> {
        self.store
            .saved_cursor(CUSTOMER_EVENTS, shard)
            .await
            .map_err(ConsumeError::new)
    }

    async fn apply(
        &self,
        batch: Vec<Self::Entry>,
        cursor: &CursorMove,
    ) -> Result<(), ConsumeError> {
        let changes: Vec<CustomerChange> = batch
            .iter()
            .filter_map(|event| match customer_events::change_of(event)? {
                CustomerLogChange::Merged {
                    merged_id,
                    survivor_id,
                    at,
                    ..
                } => Some(CustomerChange::Merged {
                    merged_id,
                    survivor_id,
                    at,
                }),
                CustomerLogChange::Erased { customer_id, at } => {
                    Some(CustomerChange::Erased { customer_id, at })
                }
                CustomerLogChange::Profile { .. } => None,
            })
            .collect();
        let now = self.clock.now();
        let entry = move |dispatch: &Dispatch| dispatch_entry(dispatch, now);
        let erased =
            move |customer_id: Uuid, count: i64| text_erased_entry(customer_id, count, now);
        self.store
            .apply_customer_changes(&changes, &entry, &erased, cursor)
            .await
            .map_err(ConsumeError::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_names_lose_their_prefix() {
        assert_eq!(
            stage(clm_proto::common::LifecycleStage::Conversion as i32),
            "CONVERSION"
        );
        assert_eq!(stage(0), "");
        assert_eq!(health(clm_proto::common::Health::AtRisk as i32), "AT_RISK");
        let recorded = touchpoint_pb::TouchpointRecorded {
            touchpoint_id: "t1".into(),
            channel: touchpoint_pb::Channel::InPerson as i32,
            r#type: "purchase".into(),
            occur_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            revenue: Some(clm_proto::common::Money {
                currency_code: "EUR".into(),
                amount_micros: 49_900_000,
            }),
            ..Default::default()
        };
        let event = touchpoint_event(&Uuid::now_v7().to_string(), &recorded).unwrap();
        assert!(
            event
                .fields
                .contains(&("channel", Field::Text("in_person".into())))
        );
        assert!(event.fields.contains(&("revenue", Field::Number(49.9))));
        assert!(
            event
                .fields
                .contains(&("currency", Field::Text("EUR".into())))
        );
    }
}
