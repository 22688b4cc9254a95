//! The next evaluation time: when the result would change by time alone,
//! for the kinds of time dependence rules can have.

use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, TimeZone, Utc};
use clm_proto::touchpoint::Channel;
use clm_scoring::{
    CompiledModel, CustomerFeatures, Health, HealthRule, LifecycleStage, LifecycleState, Model,
    StageRule, TouchpointFacts, default_model,
};

fn at(day: i64, hour: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 3, 4, 0, 0, 0).unwrap() + Duration::days(day) + Duration::hours(hour)
}

fn model(stage_rules: &[(&str, &str, LifecycleStage)]) -> CompiledModel {
    let mut model: Model = default_model();
    model.version = "test".into();
    model.built_in = false;
    model.sweep_interval = Some(StdDuration::from_secs(6 * 3600));
    model.stage_rules = stage_rules
        .iter()
        .map(|(name, condition, stage)| StageRule {
            name: (*name).into(),
            condition: (*condition).into(),
            stage: Some(*stage),
            ..StageRule::default()
        })
        .collect();
    model.health_rules = vec![HealthRule {
        name: "active".into(),
        condition: "true".into(),
        health: Some(Health::Active),
        ..HealthRule::default()
    }];
    CompiledModel::compile(model).expect("valid")
}

fn touch(features: &mut CustomerFeatures, kind: &str, when: DateTime<Utc>) {
    features.apply(&TouchpointFacts {
        touchpoint_type: kind,
        channel: Channel::Web,
        occurred_at: when,
        revenue: None,
    });
}

#[test]
fn rolling_windows_are_due_when_a_touchpoint_leaves_them() {
    let model = model(&[
        (
            "recent_views",
            "count['page_view']['7d'] >= 2",
            LifecycleStage::Retention,
        ),
        ("reach", "true", LifecycleStage::Reach),
    ]);
    let mut features = CustomerFeatures::new();
    touch(&mut features, "page_view", at(0, 10));
    touch(&mut features, "page_view", at(2, 9));
    let evaluation = model.evaluate(&features, &LifecycleState::new(), at(2, 9));
    assert_eq!(
        evaluation.snapshot.state.stage,
        Some(LifecycleStage::Retention)
    );
    // the day-0 view leaves the 7-day window at the start of day 7
    assert_eq!(evaluation.next_evaluation_at, Some(at(7, 0)));

    let later = model.evaluate(&features, &evaluation.snapshot.state, at(7, 0));
    assert_eq!(later.snapshot.state.stage, Some(LifecycleStage::Reach));
    assert_eq!(
        later.transition.unwrap().stage_rule.as_deref(),
        Some("reach")
    );
    // conservative: the count changes again when the day-2 view leaves
    assert_eq!(later.next_evaluation_at, Some(at(9, 0)));
}

#[test]
fn time_in_stage_is_due_exactly() {
    let model = model(&[
        (
            "promote",
            "stage == 'LOYALTY' || stage == 'RETENTION' && days_in_stage >= 14",
            LifecycleStage::Loyalty,
        ),
        (
            "retained",
            "count['purchase']['all'] >= 1",
            LifecycleStage::Retention,
        ),
        ("reach", "true", LifecycleStage::Reach),
    ]);
    let mut features = CustomerFeatures::new();
    touch(&mut features, "purchase", at(0, 15));
    let first = model.evaluate(&features, &LifecycleState::new(), at(0, 15));
    assert_eq!(first.snapshot.state.stage, Some(LifecycleStage::Retention));
    assert_eq!(first.next_evaluation_at, Some(at(14, 15)));

    let promoted = model.evaluate(&features, &first.snapshot.state, at(14, 15));
    assert_eq!(promoted.snapshot.state.stage, Some(LifecycleStage::Loyalty));
    // `stage == 'LOYALTY'` holds for good
    assert_eq!(promoted.next_evaluation_at, None);
}

#[test]
fn scores_fall_back_to_the_sweep_interval() {
    let model = model(&[
        (
            "engaged",
            "engagement_score >= 10.0",
            LifecycleStage::Retention,
        ),
        ("reach", "true", LifecycleStage::Reach),
    ]);
    let mut features = CustomerFeatures::new();
    touch(&mut features, "purchase", at(0, 0));
    let evaluation = model.evaluate(&features, &LifecycleState::new(), at(1, 0));
    assert_eq!(
        evaluation.snapshot.state.stage,
        Some(LifecycleStage::Retention)
    );
    assert_eq!(evaluation.next_evaluation_at, Some(at(1, 6)));
}

#[test]
fn rules_that_never_settle_stop_and_fall_back_to_the_sweep() {
    let model = model(&[
        ("back", "stage == 'CONVERSION'", LifecycleStage::Reach),
        ("forth", "true", LifecycleStage::Conversion),
    ]);
    let mut features = CustomerFeatures::new();
    touch(&mut features, "page_view", at(0, 0));
    let evaluation = model.evaluate(&features, &LifecycleState::new(), at(0, 0));
    assert!(evaluation.transition.is_some());
    assert_eq!(evaluation.next_evaluation_at, Some(at(0, 6)));
    // and the same again: deterministic
    assert_eq!(
        model.evaluate(&features, &LifecycleState::new(), at(0, 0)),
        evaluation
    );
}

#[test]
fn day_thresholds_can_be_written_either_way_round() {
    let model = model(&[
        ("quiet", "30 < days_since_last_touch", LifecycleStage::Reach),
        ("loud", "true", LifecycleStage::Retention),
    ]);
    let mut features = CustomerFeatures::new();
    touch(&mut features, "page_view", at(0, 8));
    let evaluation = model.evaluate(&features, &LifecycleState::new(), at(0, 8));
    assert_eq!(evaluation.next_evaluation_at, Some(at(31, 8)));
}
