//! A customer's history as the service records it: each move of stage,
//! acquisition status or health, with what caused it and the snapshot after
//! it. These are the values the scorer derives, the store keeps and the gRPC
//! layer serves; their protobuf form (`clm.scoring.v1.Transition`) is made
//! and read in the crate's `evaluation_proto` module only.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::evaluate::{LifecycleSnapshot, Transition};
use crate::lifecycle::{AcquisitionStatus, Health, LifecycleStage, LifecycleState};

/// What made the service evaluate a customer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    /// A touchpoint arrived.
    Touchpoint,
    /// A survey response arrived from the feedback service.
    Feedback,
    /// Time passed: the customer was evaluated at the time the result
    /// became due.
    Sweep,
    /// A rescore after a model was activated or a rescore was started.
    Rescore,
    /// Another customer was merged into this one.
    Merge,
    /// An explicit Evaluate call.
    Evaluate,
    /// The customer's profile changed in the identity service.
    Profile,
}

/// Where a customer stands on both axes, without the times they were
/// entered: the two ends of a move. `None` is "not evaluated yet".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Standing {
    /// The stage.
    pub stage: Option<LifecycleStage>,
    /// The sub-status while in ACQUISITION.
    pub acquisition_status: Option<AcquisitionStatus>,
    /// The health.
    pub health: Option<Health>,
}

impl From<&LifecycleState> for Standing {
    fn from(state: &LifecycleState) -> Self {
        Self {
            stage: state.stage,
            acquisition_status: state.acquisition_status,
            health: state.health,
        }
    }
}

/// One recorded move of a customer.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedTransition {
    /// The transition's id, a UUIDv7.
    pub id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// Where the customer stood before.
    pub from: Standing,
    /// Where the customer stands after.
    pub to: Standing,
    /// When the move happened, in event time.
    pub at: DateTime<Utc>,
    /// The model version that decided it.
    pub model_version: String,
    /// The stage rule that applied; `None` when the stage did not change.
    pub stage_rule: Option<String>,
    /// The health rule that applied; `None` when the health did not change.
    pub health_rule: Option<String>,
    /// Why, in words.
    pub reason: String,
    /// What made the service evaluate the customer.
    pub cause: Cause,
    /// For [`Cause::Touchpoint`], the touchpoint that arrived.
    pub touchpoint_id: Option<String>,
    /// The customer's snapshot after the move.
    pub snapshot: LifecycleSnapshot,
    /// When the move was recorded.
    pub record_time: DateTime<Utc>,
}

impl RecordedTransition {
    /// Records `transition` of `customer_id`, whose snapshot after it is
    /// `snapshot`, under a fresh id, at `record_time`.
    pub fn new(
        customer_id: Uuid,
        transition: &Transition,
        snapshot: LifecycleSnapshot,
        cause: Cause,
        touchpoint_id: Option<&str>,
        record_time: DateTime<Utc>,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            customer_id,
            from: Standing::from(&transition.from),
            to: Standing::from(&transition.to),
            at: transition.at,
            model_version: transition.model_version.clone(),
            stage_rule: transition.stage_rule.clone(),
            health_rule: transition.health_rule.clone(),
            reason: transition.reason.clone(),
            cause,
            touchpoint_id: touchpoint_id.map(str::to_owned),
            snapshot,
            record_time,
        }
    }

    /// True when both record the same move: everything but the id and the
    /// record time is equal.
    pub fn same_move(&self, other: &RecordedTransition) -> bool {
        let Self {
            id: _,
            record_time: _,
            customer_id,
            from,
            to,
            at,
            model_version,
            stage_rule,
            health_rule,
            reason,
            cause,
            touchpoint_id,
            snapshot,
        } = self;
        *customer_id == other.customer_id
            && *from == other.from
            && *to == other.to
            && *at == other.at
            && *model_version == other.model_version
            && *stage_rule == other.stage_rule
            && *health_rule == other.health_rule
            && *reason == other.reason
            && *cause == other.cause
            && *touchpoint_id == other.touchpoint_id
            && *snapshot == other.snapshot
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;
    use crate::compiled_model::CompiledModel;
    use crate::features::{CustomerFeatures, TouchpointFacts};

    /// A transition the default model records for a first purchase, at a
    /// time with nanoseconds.
    fn recorded() -> RecordedTransition {
        let at = Utc.timestamp_opt(1_790_000_000, 123_456_789).unwrap();
        let model = CompiledModel::compile(crate::default_model()).unwrap();
        let mut features = CustomerFeatures::new();
        features.apply(&TouchpointFacts {
            touchpoint_type: "purchase",
            channel: clm_proto::touchpoint::Channel::Web,
            occurred_at: at,
            revenue: None,
        });
        let evaluation = model.evaluate(&features, &LifecycleState::new(), at);
        let transition = evaluation
            .transition
            .expect("a first purchase moves the stage");
        RecordedTransition::new(
            Uuid::now_v7(),
            &transition,
            evaluation.snapshot,
            Cause::Touchpoint,
            Some("tp-1"),
            at,
        )
    }

    #[test]
    fn the_protobuf_form_reads_back_as_the_same_transition() {
        let transition = recorded();
        assert!(transition.stage_rule.is_some());
        assert_eq!(
            transition.health_rule.is_some(),
            transition.to.health.is_some()
        );
        let back = RecordedTransition::from_proto(&transition.to_proto()).unwrap();
        assert_eq!(back, transition);
        for cause in [
            Cause::Touchpoint,
            Cause::Feedback,
            Cause::Sweep,
            Cause::Rescore,
            Cause::Merge,
            Cause::Evaluate,
            Cause::Profile,
        ] {
            assert_eq!(Cause::from_proto(cause.to_proto() as i32), Some(cause));
        }
    }

    #[test]
    fn a_malformed_message_names_its_field() {
        let good = recorded().to_proto();
        type Spoil = fn(&mut clm_proto::scoring::Transition);
        let cases: [(&str, Spoil); 5] = [
            ("cause", |m| m.cause = 99),
            ("to_stage", |m| m.to_stage = 42),
            ("customer_id", |m| m.customer_id = "x".to_owned()),
            ("lifecycle", |m| m.lifecycle = None),
            ("transition_time", |m| m.transition_time = None),
        ];
        for (field, spoil) in cases {
            let mut message = good.clone();
            spoil(&mut message);
            let err = RecordedTransition::from_proto(&message).unwrap_err();
            assert!(err.starts_with(field), "{field}: {err}");
        }
    }

    #[test]
    fn the_same_move_ignores_only_id_and_record_time() {
        let a = recorded();
        let mut b = RecordedTransition {
            id: Uuid::now_v7(),
            record_time: a.record_time + chrono::Duration::seconds(5),
            ..a.clone()
        };
        assert!(a.same_move(&b));
        b.cause = Cause::Sweep;
        assert!(!a.same_move(&b));
    }
}
