//! Conversions between the domain [`Model`] and `clm.scoring.v1.Model`.
//!
//! Converting from protobuf never fails outright: what cannot be represented
//! (a missing required message, a negative duration, an enum value this build
//! does not know) becomes a [`ModelViolation`] next to a best-effort model, so
//! that validation can report every other problem in the same answer.

use std::time::Duration;

use chrono::{DateTime, Utc};
use clm_proto::scoring as proto;

use crate::lifecycle::{AcquisitionStatus, Health, LifecycleStage};
use crate::model::{
    DecayedWeights, EngagementScoreConfig, FitRule, HealthRule, HealthScoreConfig, LeadScoreConfig,
    Model, ModelState, StageRule,
};
use crate::validation::{ModelViolation, ViolationReason};

/// A protobuf duration from a domain one.
pub fn duration_to_proto(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: duration.subsec_nanos() as i32,
    }
}

/// A domain duration from a protobuf one; `None` when negative or malformed.
pub fn duration_from_proto(duration: &prost_types::Duration) -> Option<Duration> {
    let seconds = u64::try_from(duration.seconds).ok()?;
    let nanos = u32::try_from(duration.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)?;
    Some(Duration::new(seconds, nanos))
}

/// A protobuf timestamp from a domain time.
pub fn timestamp_to_proto(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// A domain time from a protobuf timestamp; `None` when out of range.
pub fn timestamp_from_proto(at: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(at.seconds, u32::try_from(at.nanos).ok()?)
}

impl Model {
    /// The protobuf message.
    pub fn to_proto(&self) -> proto::Model {
        proto::Model {
            version: self.version.clone(),
            description: self.description.clone(),
            state: match self.state {
                ModelState::Inactive => proto::ModelState::Inactive,
                ModelState::Active => proto::ModelState::Active,
            } as i32,
            engagement: Some(proto::EngagementScoreConfig {
                weights: Some(weights_to_proto(&self.engagement.weights)),
            }),
            lead: Some(proto::LeadScoreConfig {
                behaviour: Some(weights_to_proto(&self.lead.behaviour)),
                fit_rules: self
                    .lead
                    .fit_rules
                    .iter()
                    .map(|rule| proto::FitRule {
                        name: rule.name.clone(),
                        description: rule.description.clone(),
                        condition: rule.condition.clone(),
                        points: rule.points,
                    })
                    .collect(),
                mql_threshold: self.lead.mql_threshold,
                sql_threshold: self.lead.sql_threshold,
            }),
            health: Some(proto::HealthScoreConfig {
                recency_weight: self.health.recency_weight,
                trend_weight: self.health.trend_weight,
                feedback_weight: self.health.feedback_weight,
                support_weight: self.health.support_weight,
                recency_half_life: self.health.recency_half_life.map(duration_to_proto),
                trend_window: self.health.trend_window.map(duration_to_proto),
                open_ticket_penalty: self.health.open_ticket_penalty,
            }),
            stage_rules: self
                .stage_rules
                .iter()
                .map(|rule| proto::StageRule {
                    name: rule.name.clone(),
                    description: rule.description.clone(),
                    condition: rule.condition.clone(),
                    stage: rule.stage.map_or(0, |stage| stage.to_proto() as i32),
                    acquisition_status: rule
                        .acquisition_status
                        .map_or(0, |status| status.to_proto() as i32),
                })
                .collect(),
            health_rules: self
                .health_rules
                .iter()
                .map(|rule| proto::HealthRule {
                    name: rule.name.clone(),
                    description: rule.description.clone(),
                    condition: rule.condition.clone(),
                    health: rule.health.map_or(0, |health| health.to_proto() as i32),
                })
                .collect(),
            sweep_interval: self.sweep_interval.map(duration_to_proto),
            built_in: self.built_in,
            create_time: self.create_time.map(timestamp_to_proto),
            activate_time: self.activate_time.map(timestamp_to_proto),
        }
    }

    /// The domain model of a protobuf message, with what could not be
    /// converted as violations (empty when everything converted). The model
    /// still needs validating: see
    /// [`CompiledModel::from_proto`](crate::CompiledModel::from_proto).
    pub fn from_proto(message: &proto::Model) -> (Model, Vec<ModelViolation>) {
        let mut violations = Vec::new();
        let mut required = |field: &str| {
            violations.push(ModelViolation::new(
                field,
                ViolationReason::Required,
                "is required",
            ));
        };
        let engagement = match &message.engagement {
            None => {
                required("model.engagement");
                None
            }
            Some(config) => {
                if config.weights.is_none() {
                    required("model.engagement.weights");
                }
                config.weights.as_ref()
            }
        };
        let lead = message.lead.clone().unwrap_or_else(|| {
            required("model.lead");
            proto::LeadScoreConfig::default()
        });
        if message.lead.is_some() && lead.behaviour.is_none() {
            required("model.lead.behaviour");
        }
        let health = message.health.unwrap_or_else(|| {
            required("model.health");
            proto::HealthScoreConfig::default()
        });

        let mut convert = Conversion {
            violations: &mut violations,
        };
        let model = Model {
            version: message.version.clone(),
            description: message.description.clone(),
            state: match proto::ModelState::try_from(message.state) {
                Ok(proto::ModelState::Active) => ModelState::Active,
                _ => ModelState::Inactive,
            },
            engagement: EngagementScoreConfig {
                weights: engagement.map_or_else(DecayedWeights::default, |weights| {
                    convert.weights("model.engagement.weights", weights)
                }),
            },
            lead: LeadScoreConfig {
                behaviour: lead
                    .behaviour
                    .as_ref()
                    .map_or_else(DecayedWeights::default, |weights| {
                        convert.weights("model.lead.behaviour", weights)
                    }),
                fit_rules: lead
                    .fit_rules
                    .iter()
                    .map(|rule| FitRule {
                        name: rule.name.clone(),
                        description: rule.description.clone(),
                        condition: rule.condition.clone(),
                        points: rule.points,
                    })
                    .collect(),
                mql_threshold: lead.mql_threshold,
                sql_threshold: lead.sql_threshold,
            },
            health: HealthScoreConfig {
                recency_weight: health.recency_weight,
                trend_weight: health.trend_weight,
                feedback_weight: health.feedback_weight,
                support_weight: health.support_weight,
                recency_half_life: convert.duration(
                    "model.health.recency_half_life",
                    health.recency_half_life.as_ref(),
                ),
                trend_window: convert
                    .duration("model.health.trend_window", health.trend_window.as_ref()),
                open_ticket_penalty: health.open_ticket_penalty,
            },
            stage_rules: message
                .stage_rules
                .iter()
                .enumerate()
                .map(|(index, rule)| StageRule {
                    name: rule.name.clone(),
                    description: rule.description.clone(),
                    condition: rule.condition.clone(),
                    stage: convert.enumeration(
                        &format!("model.stage_rules[{index}].stage"),
                        &rule.name,
                        rule.stage,
                        LifecycleStage::from_proto,
                    ),
                    acquisition_status: convert.enumeration(
                        &format!("model.stage_rules[{index}].acquisition_status"),
                        &rule.name,
                        rule.acquisition_status,
                        AcquisitionStatus::from_proto,
                    ),
                })
                .collect(),
            health_rules: message
                .health_rules
                .iter()
                .enumerate()
                .map(|(index, rule)| HealthRule {
                    name: rule.name.clone(),
                    description: rule.description.clone(),
                    condition: rule.condition.clone(),
                    health: convert.enumeration(
                        &format!("model.health_rules[{index}].health"),
                        &rule.name,
                        rule.health,
                        Health::from_proto,
                    ),
                })
                .collect(),
            sweep_interval: convert
                .duration("model.sweep_interval", message.sweep_interval.as_ref()),
            built_in: message.built_in,
            create_time: message.create_time.as_ref().and_then(timestamp_from_proto),
            activate_time: message
                .activate_time
                .as_ref()
                .and_then(timestamp_from_proto),
        };
        (model, violations)
    }
}

fn weights_to_proto(weights: &DecayedWeights) -> proto::DecayedWeights {
    proto::DecayedWeights {
        weights: weights
            .weights
            .iter()
            .map(|(kind, weight)| (kind.clone(), *weight))
            .collect(),
        half_life: weights.half_life.map(duration_to_proto),
    }
}

struct Conversion<'a> {
    violations: &'a mut Vec<ModelViolation>,
}

impl Conversion<'_> {
    fn weights(&mut self, field: &str, weights: &proto::DecayedWeights) -> DecayedWeights {
        DecayedWeights {
            weights: weights
                .weights
                .iter()
                .map(|(kind, weight)| (kind.clone(), *weight))
                .collect(),
            half_life: self.duration(&format!("{field}.half_life"), weights.half_life.as_ref()),
        }
    }

    fn duration(
        &mut self,
        field: &str,
        duration: Option<&prost_types::Duration>,
    ) -> Option<Duration> {
        let duration = duration?;
        let converted = duration_from_proto(duration);
        if converted.is_none() {
            self.violations.push(ModelViolation::new(
                field,
                ViolationReason::OutOfRange,
                "must be a positive duration",
            ));
        }
        converted
    }

    /// An enum value: 0 is unset (`None`, which validation reports where it
    /// is required); a value this build does not know is out of range.
    fn enumeration<T>(
        &mut self,
        field: &str,
        rule_name: &str,
        value: i32,
        from_proto: impl Fn(i32) -> Option<T>,
    ) -> Option<T> {
        let converted = from_proto(value);
        if converted.is_none() && value != 0 {
            self.violations.push(ModelViolation {
                rule_name: rule_name.to_owned(),
                field: field.to_owned(),
                reason: ViolationReason::OutOfRange,
                description: format!("{value} is not a known value"),
            });
        }
        converted
    }
}

/// The position of a field in the model, for listing violations in field
/// order: the top-level field's number, the sub-field's number, then the
/// index in a rule list.
pub(crate) fn field_order(field: &str) -> (u32, u32, usize) {
    let path = field.strip_prefix("model.").unwrap_or(field);
    let mut segments = path.split('.');
    let (top, top_index) = split_index(segments.next().unwrap_or_default());
    let (sub, sub_index) = split_index(segments.next().unwrap_or_default());
    let top_rank = match top {
        "version" => 1,
        "description" => 2,
        "engagement" => 4,
        "lead" => 5,
        "health" => 6,
        "stage_rules" => 7,
        "health_rules" => 8,
        "sweep_interval" => 9,
        _ => 10,
    };
    let sub_rank = match (top, sub) {
        ("lead", "behaviour") | ("health", "recency_weight") => 1,
        ("lead", "fit_rules") | ("health", "trend_weight") => 2,
        ("lead", "mql_threshold") | ("health", "feedback_weight") => 3,
        ("lead", "sql_threshold") | ("health", "support_weight") => 4,
        ("health", "recency_half_life") => 5,
        ("health", "trend_window") => 6,
        ("health", "open_ticket_penalty") => 7,
        _ => 0,
    };
    (top_rank, sub_rank, top_index.max(sub_index))
}

/// `"stage_rules[2]"` → `("stage_rules", 2)`; no index → 0.
fn split_index(segment: &str) -> (&str, usize) {
    match segment.split_once('[') {
        Some((name, rest)) => (name, rest.trim_end_matches(']').parse().unwrap_or_default()),
        None => (segment, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::default_model::default_model;

    #[test]
    fn round_trips_through_protobuf() {
        let mut model = default_model();
        model.create_time = DateTime::from_timestamp(1_700_000_000, 5);
        model.state = ModelState::Active;
        let (back, violations) = Model::from_proto(&model.to_proto());
        assert!(violations.is_empty(), "{violations:?}");
        assert_eq!(back, model);
    }

    #[test]
    fn reports_what_cannot_be_converted() {
        let mut message = default_model().to_proto();
        message.health = None;
        message.stage_rules[0].stage = 42;
        message.sweep_interval = Some(prost_types::Duration {
            seconds: -5,
            nanos: 0,
        });
        let (_, violations) = Model::from_proto(&message);
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "model.health",
                "model.stage_rules[0].stage",
                "model.sweep_interval"
            ]
        );
        assert_eq!(violations[1].rule_name, message.stage_rules[0].name);
    }

    #[test]
    fn orders_fields_like_the_message() {
        assert!(field_order("model.version") < field_order("model.lead.mql_threshold"));
        assert!(
            field_order("model.stage_rules[2].condition")
                < field_order("model.stage_rules[10].name")
        );
        assert!(
            field_order("model.stage_rules[99].name") < field_order("model.health_rules[0].name")
        );
        assert!(
            field_order("model.lead.fit_rules[3].name") < field_order("model.lead.mql_threshold")
        );
        assert!(
            field_order("model.lead.behaviour.half_life")
                < field_order("model.lead.fit_rules[0].name")
        );
    }
}
