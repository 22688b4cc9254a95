//! The lifecycle scoring engine: per-customer features folded from
//! touchpoints, versioned scoring models whose stage, health and profile-fit
//! rules are CEL expressions, the engagement, lead and health scores, and the
//! evaluation that moves a customer between lifecycle stages and health
//! states, with the reason, an explanation and the next time the result
//! would change by time alone.
//!
//! The engine (features, models, scores, evaluation) has no I/O: no
//! database, no gRPC, no clock. The service around it ([`service`]) stores
//! [`CustomerFeatures`] and the latest [`LifecycleSnapshot`] per customer
//! ([`store`]), keeps one [`CompiledModel`] per model version, and calls
//! [`CompiledModel::evaluate`] ([`scorer`]) after every touchpoint, profile
//! change or merge it reads from the logs ([`consumers`]), when the
//! [`Evaluation::next_evaluation_at`] it indexed has passed (the sweep), on
//! Evaluate and during rescores ([`rescore`]); it pushes snapshots to
//! identity ([`push`]) and serves `clm.scoring.v1.LifecycleService`
//! ([`grpc`]).
//!
//! ```
//! use chrono::Utc;
//! use clm_proto::touchpoint::Channel;
//! use clm_scoring::{default_model, CompiledModel, CustomerFeatures, LifecycleStage, LifecycleState, TouchpointFacts};
//!
//! let model = CompiledModel::compile(default_model()).expect("the default model is valid");
//! let mut features = CustomerFeatures::new();
//! let now = Utc::now();
//! features.apply(&TouchpointFacts { touchpoint_type: "purchase", channel: Channel::InPerson, occurred_at: now, revenue: None });
//! let evaluation = model.evaluate(&features, &LifecycleState::new(), now);
//! assert_eq!(evaluation.snapshot.state.stage, Some(LifecycleStage::Conversion));
//! ```

pub mod activity;
pub mod bench;
pub mod clock;
mod compiled_model;
pub mod consumers;
mod default_model;
mod evaluate;
mod evaluation_proto;
pub mod feature_map;
mod features;
pub mod fold;
pub mod grpc;
pub mod history;
mod lifecycle;
mod literal_keys;
mod model;
mod model_proto;
mod next_due;
pub mod push;
pub mod rescore;
pub mod rules;
pub mod scorer;
pub mod scores;
pub mod service;
pub mod store;
mod stored_time;
mod validation;
pub mod vocabulary;
mod window_counts;

pub use compiled_model::CompiledModel;
pub use default_model::{DEFAULT_MODEL_VERSION, default_model};
pub use evaluate::{
    Evaluation, Explanation, LifecycleSnapshot, MAX_REASON_CHARS, MAX_SETTLE_ROUNDS, RuleResult,
    Transition,
};
pub use feature_map::{Feature, FeatureValue};
pub use features::{CustomerFeatures, Money, ProfileFacts, SurveyAnswer, TouchpointFacts};
pub use lifecycle::{AcquisitionStatus, Health, LifecycleStage, LifecycleState};
pub use model::{
    DecayedWeights, EngagementScoreConfig, FitRule, HealthRule, HealthScoreConfig, LeadScoreConfig,
    Model, ModelState, PointContribution, StageRule,
};
pub use model_proto::{
    duration_from_proto, duration_to_proto, timestamp_from_proto, timestamp_to_proto,
};
pub use rules::RuleOutcome;
pub use scores::{ComponentContribution, ScoreExplanation, ScoreKind, Scores, TypeContribution};
pub use service::{SERVICE_NAME, Scoring, ScoringConfig};
pub use validation::{ModelViolation, ViolationReason};
