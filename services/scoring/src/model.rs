//! The scoring model as domain data, field for field the `clm.scoring.v1.Model`
//! of the contract (see `model_proto` for the conversions and
//! [`CompiledModel`](crate::CompiledModel) for validation).
//!
//! Optional durations stay `None` when unset, so a model converts back to the
//! protobuf it came from; the `effective_*` accessors apply the documented
//! defaults.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::lifecycle::{AcquisitionStatus, Health, LifecycleStage};

/// Seconds in a day, as a `Duration` helper.
pub(crate) const fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

/// A versioned scoring model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// The version, 1 to 64 characters of `[a-z0-9_.-]`.
    pub version: String,
    /// What the model is for, up to 1024 characters.
    pub description: String,
    /// Whether the model is the active one. Output only: set by the service.
    pub state: ModelState,
    /// How the engagement score is computed.
    pub engagement: EngagementScoreConfig,
    /// How the lead score is computed and where MQL and SQL begin.
    pub lead: LeadScoreConfig,
    /// How the health score is computed.
    pub health: HealthScoreConfig,
    /// The stage rules in order; the first true one sets the stage.
    pub stage_rules: Vec<StageRule>,
    /// The health rules in order; the first true one sets the health.
    pub health_rules: Vec<HealthRule>,
    /// How often the sweep re-evaluates a customer whose rules depend on
    /// time in ways the engine cannot predict; `None`: 1 day.
    pub sweep_interval: Option<Duration>,
    /// True for the model that ships with the service. Output only.
    pub built_in: bool,
    /// When the model was created. Output only.
    pub create_time: Option<DateTime<Utc>>,
    /// When the model was last activated. Output only.
    pub activate_time: Option<DateTime<Utc>>,
}

impl Model {
    /// The sweep interval with its default applied.
    pub fn effective_sweep_interval(&self) -> Duration {
        self.sweep_interval.unwrap_or(days(1))
    }

    /// True when both models say the same thing, output-only fields aside:
    /// what decides whether creating a version that exists is a safe retry.
    pub fn same_content(&self, other: &Model) -> bool {
        let strip = |model: &Model| Model {
            state: ModelState::default(),
            built_in: false,
            create_time: None,
            activate_time: None,
            ..model.clone()
        };
        strip(self) == strip(other)
    }
}

/// Whether a model is in use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ModelState {
    /// Stored, not in use.
    #[default]
    Inactive,
    /// The model every evaluation uses.
    Active,
}

/// Per-type points with exponential time decay: each touchpoint adds
/// `weights[type] * 0.5 ^ (age / half_life)`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DecayedWeights {
    /// Points per touchpoint type, -100 to 100.
    pub weights: BTreeMap<String, f64>,
    /// The age at which a touchpoint counts half; `None`: 30 days.
    pub half_life: Option<Duration>,
}

impl DecayedWeights {
    /// The half-life with its default applied.
    pub fn effective_half_life(&self) -> Duration {
        self.half_life.unwrap_or(days(30))
    }

    /// What one touchpoint of `touchpoint_type` that occurred at
    /// `occurred_at` adds at `now`: for the top contributing touchpoints of
    /// an explanation, which the service computes from its timeline. `None`
    /// for a type without weight.
    pub fn contribution(
        &self,
        touchpoint_type: &str,
        occurred_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Option<PointContribution> {
        let weight = *self.weights.get(touchpoint_type)?;
        let age = (now - occurred_at).num_milliseconds().max(0) as f64 / 1000.0;
        let decay = (-age / self.effective_half_life().as_secs_f64()).exp2();
        Some(PointContribution {
            weight,
            decay,
            points: weight * decay,
        })
    }
}

/// The points one touchpoint adds to a score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PointContribution {
    /// The model's weight for its type.
    pub weight: f64,
    /// The decay factor, 0 to 1.
    pub decay: f64,
    /// `weight * decay`.
    pub points: f64,
}

/// How the engagement score is computed: the decayed weights of all
/// touchpoints, summed and clamped to 0..100.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EngagementScoreConfig {
    /// The weights and their decay.
    pub weights: DecayedWeights,
}

/// A profile-fit rule of the lead score.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FitRule {
    /// The rule's name, 1 to 64 characters of `[a-z0-9_]`, unique.
    pub name: String,
    /// What the rule checks.
    pub description: String,
    /// A CEL condition over the feature map, without `lead_score`.
    pub condition: String,
    /// Points added when the condition is true, -100 to 100.
    pub points: f64,
}

/// How the lead score is computed: decayed behaviour points plus the points
/// of every true fit rule, clamped to 0..100.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LeadScoreConfig {
    /// Behaviour points per touchpoint type and their decay.
    pub behaviour: DecayedWeights,
    /// Profile-fit rules, all evaluated.
    pub fit_rules: Vec<FitRule>,
    /// The lead score at which a lead is marketing-qualified.
    pub mql_threshold: f64,
    /// The lead score at which a lead is sales-qualified.
    pub sql_threshold: f64,
}

/// How the health score is computed: the weighted mean of recency, trend,
/// feedback and support, leaving out components without data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthScoreConfig {
    /// Weight of recency, >= 0.
    pub recency_weight: f64,
    /// Weight of the engagement trend, >= 0.
    pub trend_weight: f64,
    /// Weight of feedback (NPS or CSAT), >= 0.
    pub feedback_weight: f64,
    /// Weight of support (open tickets), >= 0.
    pub support_weight: f64,
    /// The half-life of recency; `None`: 30 days.
    pub recency_half_life: Option<Duration>,
    /// The length of each trend window; `None`: 30 days.
    pub trend_window: Option<Duration>,
    /// Points off support per open ticket, 0 to 100; 0: 25.
    pub open_ticket_penalty: f64,
}

impl HealthScoreConfig {
    /// The recency half-life with its default applied.
    pub fn effective_recency_half_life(&self) -> Duration {
        self.recency_half_life.unwrap_or(days(30))
    }

    /// The trend window with its default applied.
    pub fn effective_trend_window(&self) -> Duration {
        self.trend_window.unwrap_or(days(30))
    }

    /// The open-ticket penalty with its default applied.
    pub fn effective_open_ticket_penalty(&self) -> f64 {
        if self.open_ticket_penalty == 0.0 {
            25.0
        } else {
            self.open_ticket_penalty
        }
    }
}

/// An ordered stage rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageRule {
    /// The rule's name, 1 to 64 characters of `[a-z0-9_]`, unique.
    pub name: String,
    /// What the rule means.
    pub description: String,
    /// A CEL condition over the feature map.
    pub condition: String,
    /// The stage when the rule applies; required (`None` is invalid).
    pub stage: Option<LifecycleStage>,
    /// The acquisition status when the rule applies: required for
    /// ACQUISITION, unset otherwise.
    pub acquisition_status: Option<AcquisitionStatus>,
}

/// An ordered health rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthRule {
    /// The rule's name, 1 to 64 characters of `[a-z0-9_]`, unique.
    pub name: String,
    /// What the rule means.
    pub description: String,
    /// A CEL condition over the feature map.
    pub condition: String,
    /// The health when the rule applies; required (`None` is invalid).
    pub health: Option<Health>,
}
