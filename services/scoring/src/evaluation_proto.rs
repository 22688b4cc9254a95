//! Evaluation results as `clm.scoring.v1` and `clm.common.v1` messages. The
//! fields only the service knows (ids, the customer, the cause, record
//! times, top touchpoints) are left at their defaults for it to fill.

use clm_proto::{common, scoring as proto};

use crate::evaluate::{Explanation, LifecycleSnapshot, RuleResult, Transition};
use crate::feature_map::FeatureValue;
use crate::model_proto::timestamp_to_proto;
use crate::rules::RuleOutcome;
use crate::scores::{ScoreExplanation, ScoreKind};

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

impl Transition {
    /// The transition message, with `lifecycle` set to `snapshot` (the
    /// snapshot after it); id, customer, cause, touchpoint and record time
    /// are the service's to set.
    pub fn to_proto(&self, snapshot: &LifecycleSnapshot) -> proto::Transition {
        proto::Transition {
            from_stage: self.from.stage.map_or(0, |stage| stage.to_proto() as i32),
            to_stage: self.to.stage.map_or(0, |stage| stage.to_proto() as i32),
            from_acquisition_status: self
                .from
                .acquisition_status
                .map_or(0, |status| status.to_proto() as i32),
            to_acquisition_status: self
                .to
                .acquisition_status
                .map_or(0, |status| status.to_proto() as i32),
            from_health: self
                .from
                .health
                .map_or(0, |health| health.to_proto() as i32),
            to_health: self.to.health.map_or(0, |health| health.to_proto() as i32),
            transition_time: Some(timestamp_to_proto(self.at)),
            model_version: self.model_version.clone(),
            stage_rule: self.stage_rule.clone().unwrap_or_default(),
            health_rule: self.health_rule.clone().unwrap_or_default(),
            reason: self.reason.clone(),
            lifecycle: Some(snapshot.to_proto()),
            ..proto::Transition::default()
        }
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
