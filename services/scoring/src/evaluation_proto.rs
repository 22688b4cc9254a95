//! Evaluation results and recorded transitions as `clm.scoring.v1` and
//! `clm.common.v1` messages, and back: the one place the engine's values
//! meet their protobuf form.

use chrono::{DateTime, Utc};
use clm_proto::{common, scoring as proto};
use uuid::Uuid;

use crate::evaluate::{Explanation, LifecycleSnapshot, RuleResult};
use crate::feature_map::FeatureValue;
use crate::history::{Cause, RecordedTransition, Standing};
use crate::lifecycle::{AcquisitionStatus, Health, LifecycleStage, LifecycleState};
use crate::model_proto::{timestamp_from_proto, timestamp_to_proto};
use crate::rules::RuleOutcome;
use crate::scores::{ScoreExplanation, ScoreKind, Scores};

impl LifecycleSnapshot {
    /// The snapshot pushed to identity and returned by GetLifecycle.
    pub fn to_proto(&self) -> common::LifecycleSnapshot {
        let state = &self.state;
        common::LifecycleSnapshot {
            stage: state.stage.map_or(0, |stage| stage.to_proto() as i32),
            acquisition_status: state
                .acquisition_status
                .map_or(0, |status| status.to_proto() as i32),
            health: state.health.map_or(0, |health| health.to_proto() as i32),
            engagement_score: self.scores.engagement,
            lead_score: self.scores.lead,
            health_score: self.scores.health,
            model_version: self.model_version.clone(),
            stage_entered_at: state.stage_entered_at.map(timestamp_to_proto),
            health_entered_at: state.health_entered_at.map(timestamp_to_proto),
            evaluated_at: Some(timestamp_to_proto(self.evaluated_at)),
        }
    }
}

impl LifecycleSnapshot {
    /// The snapshot of a stored or served message; `Err` names what is
    /// missing or unknown.
    pub fn from_proto(message: &common::LifecycleSnapshot) -> Result<Self, String> {
        Ok(Self {
            state: LifecycleState {
                stage: known(message.stage, LifecycleStage::from_proto, "stage")?,
                acquisition_status: known(
                    message.acquisition_status,
                    AcquisitionStatus::from_proto,
                    "acquisition_status",
                )?,
                health: known(message.health, Health::from_proto, "health")?,
                stage_entered_at: optional_time(&message.stage_entered_at, "stage_entered_at")?,
                health_entered_at: optional_time(&message.health_entered_at, "health_entered_at")?,
            },
            scores: Scores {
                engagement: message.engagement_score,
                lead: message.lead_score,
                health: message.health_score,
            },
            model_version: message.model_version.clone(),
            evaluated_at: required_time(&message.evaluated_at, "evaluated_at")?,
        })
    }
}

/// `None` for 0 (unspecified), the value for a known number, `Err` naming
/// `field` for an unknown one.
fn known<T>(value: i32, from: fn(i32) -> Option<T>, field: &str) -> Result<Option<T>, String> {
    match (value, from(value)) {
        (0, _) => Ok(None),
        (_, Some(known)) => Ok(Some(known)),
        (_, None) => Err(format!("{field}: unknown value {value}")),
    }
}

fn optional_time(
    at: &Option<prost_types::Timestamp>,
    field: &str,
) -> Result<Option<DateTime<Utc>>, String> {
    at.as_ref()
        .map(|at| timestamp_from_proto(at).ok_or_else(|| format!("{field}: out of range")))
        .transpose()
}

fn required_time(
    at: &Option<prost_types::Timestamp>,
    field: &str,
) -> Result<DateTime<Utc>, String> {
    optional_time(at, field)?.ok_or_else(|| format!("{field}: missing"))
}

impl Cause {
    /// The protobuf value.
    pub fn to_proto(self) -> proto::TransitionCause {
        match self {
            Cause::Touchpoint => proto::TransitionCause::Touchpoint,
            Cause::Feedback => proto::TransitionCause::Feedback,
            Cause::Sweep => proto::TransitionCause::Sweep,
            Cause::Rescore => proto::TransitionCause::Rescore,
            Cause::Merge => proto::TransitionCause::Merge,
            Cause::Evaluate => proto::TransitionCause::Evaluate,
            Cause::Profile => proto::TransitionCause::Profile,
        }
    }

    /// The cause of a protobuf value; `None` for unspecified or unknown ones.
    pub fn from_proto(value: i32) -> Option<Self> {
        Some(match proto::TransitionCause::try_from(value).ok()? {
            proto::TransitionCause::Unspecified => return None,
            proto::TransitionCause::Touchpoint => Cause::Touchpoint,
            proto::TransitionCause::Feedback => Cause::Feedback,
            proto::TransitionCause::Sweep => Cause::Sweep,
            proto::TransitionCause::Rescore => Cause::Rescore,
            proto::TransitionCause::Merge => Cause::Merge,
            proto::TransitionCause::Evaluate => Cause::Evaluate,
            proto::TransitionCause::Profile => Cause::Profile,
        })
    }
}

impl RecordedTransition {
    /// The `clm.scoring.v1.Transition` message, as served and as kept in
    /// the store and the transition log.
    pub fn to_proto(&self) -> proto::Transition {
        let stage = |s: Option<LifecycleStage>| s.map_or(0, |s| s.to_proto() as i32);
        let status = |s: Option<AcquisitionStatus>| s.map_or(0, |s| s.to_proto() as i32);
        let health = |h: Option<Health>| h.map_or(0, |h| h.to_proto() as i32);
        proto::Transition {
            id: self.id.to_string(),
            customer_id: self.customer_id.to_string(),
            from_stage: stage(self.from.stage),
            to_stage: stage(self.to.stage),
            from_acquisition_status: status(self.from.acquisition_status),
            to_acquisition_status: status(self.to.acquisition_status),
            from_health: health(self.from.health),
            to_health: health(self.to.health),
            transition_time: Some(timestamp_to_proto(self.at)),
            model_version: self.model_version.clone(),
            stage_rule: self.stage_rule.clone().unwrap_or_default(),
            health_rule: self.health_rule.clone().unwrap_or_default(),
            reason: self.reason.clone(),
            cause: self.cause.to_proto() as i32,
            touchpoint_id: self.touchpoint_id.clone().unwrap_or_default(),
            lifecycle: Some(self.snapshot.to_proto()),
            record_time: Some(timestamp_to_proto(self.record_time)),
        }
    }

    /// The transition of a message [`to_proto`](Self::to_proto) made; `Err`
    /// names the field that is missing, malformed or unknown.
    pub fn from_proto(message: &proto::Transition) -> Result<Self, String> {
        let id = |value: &str, field: &str| {
            Uuid::try_parse(value).map_err(|err| format!("{field}: {err}"))
        };
        let standing = |stage, status, health, side: &str| -> Result<Standing, String> {
            Ok(Standing {
                stage: known(stage, LifecycleStage::from_proto, &format!("{side}_stage"))?,
                acquisition_status: known(
                    status,
                    AcquisitionStatus::from_proto,
                    &format!("{side}_acquisition_status"),
                )?,
                health: known(health, Health::from_proto, &format!("{side}_health"))?,
            })
        };
        let text = |value: &str| (!value.is_empty()).then(|| value.to_owned());
        Ok(Self {
            id: id(&message.id, "id")?,
            customer_id: id(&message.customer_id, "customer_id")?,
            from: standing(
                message.from_stage,
                message.from_acquisition_status,
                message.from_health,
                "from",
            )?,
            to: standing(
                message.to_stage,
                message.to_acquisition_status,
                message.to_health,
                "to",
            )?,
            at: required_time(&message.transition_time, "transition_time")?,
            model_version: message.model_version.clone(),
            stage_rule: text(&message.stage_rule),
            health_rule: text(&message.health_rule),
            reason: message.reason.clone(),
            cause: Cause::from_proto(message.cause)
                .ok_or_else(|| format!("cause: unknown value {}", message.cause))?,
            touchpoint_id: text(&message.touchpoint_id),
            snapshot: LifecycleSnapshot::from_proto(
                message.lifecycle.as_ref().ok_or("lifecycle: missing")?,
            )?,
            record_time: required_time(&message.record_time, "record_time")?,
        })
    }
}

impl FeatureValue {
    /// The protobuf message.
    pub fn to_proto(&self) -> proto::FeatureValue {
        use proto::feature_value::Kind;
        proto::FeatureValue {
            kind: Some(match self {
                FeatureValue::Int(value) => Kind::IntValue(*value),
                FeatureValue::Double(value) => Kind::DoubleValue(*value),
                FeatureValue::Bool(value) => Kind::BoolValue(*value),
                FeatureValue::String(value) => Kind::StringValue(value.clone()),
            }),
        }
    }
}

impl RuleResult {
    /// The protobuf message.
    pub fn to_proto(&self) -> proto::RuleResult {
        let (outcome, error) = match &self.outcome {
            RuleOutcome::Matched => (proto::RuleOutcome::Matched, String::new()),
            RuleOutcome::NotMatched => (proto::RuleOutcome::NotMatched, String::new()),
            RuleOutcome::Error(error) => (proto::RuleOutcome::Error, error.clone()),
        };
        proto::RuleResult {
            rule_name: self.rule_name.clone(),
            condition: self.condition.clone(),
            outcome: outcome as i32,
            applied: self.applied,
            error,
            points: self.points,
        }
    }
}

impl ScoreExplanation {
    /// The protobuf message, without top touchpoints.
    pub fn to_proto(&self) -> proto::ScoreExplanation {
        proto::ScoreExplanation {
            score: match self.kind {
                ScoreKind::Engagement => proto::ScoreKind::Engagement,
                ScoreKind::Lead => proto::ScoreKind::Lead,
                ScoreKind::Health => proto::ScoreKind::Health,
            } as i32,
            value: self.value,
            raw_value: self.raw_value,
            by_type: self
                .by_type
                .iter()
                .map(|contribution| proto::TypeContribution {
                    r#type: contribution.touchpoint_type.clone(),
                    count: i64::try_from(contribution.count).unwrap_or(i64::MAX),
                    points: contribution.points,
                })
                .collect(),
            top_touchpoints: Vec::new(),
            components: self
                .components
                .iter()
                .map(|component| proto::ComponentContribution {
                    component: component.component.to_owned(),
                    value: component.value,
                    weight: component.weight,
                    present: component.present,
                })
                .collect(),
        }
    }
}

impl Explanation {
    /// The ExplainLifecycle response for `customer_id`, without top
    /// touchpoints.
    pub fn to_proto(&self, customer_id: &str) -> proto::ExplainLifecycleResponse {
        let snapshot = &self.evaluation.snapshot;
        proto::ExplainLifecycleResponse {
            customer_id: customer_id.to_owned(),
            model_version: snapshot.model_version.clone(),
            evaluate_time: Some(timestamp_to_proto(snapshot.evaluated_at)),
            lifecycle: Some(snapshot.to_proto()),
            features: self
                .features
                .iter()
                .map(|(name, value)| (name.clone(), value.to_proto()))
                .collect(),
            stage_rules: self.stage_rules.iter().map(RuleResult::to_proto).collect(),
            health_rules: self.health_rules.iter().map(RuleResult::to_proto).collect(),
            fit_rules: self.fit_rules.iter().map(RuleResult::to_proto).collect(),
            scores: self.scores.iter().map(ScoreExplanation::to_proto).collect(),
        }
    }
}
