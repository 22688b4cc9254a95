//! Model validation as CreateModel and ValidateModel will use it: invalid
//! models are rejected with one violation per problem, naming the rule.

use clm_scoring::{CompiledModel, FitRule, Model, ViolationReason, default_model};

fn violations(model: Model) -> Vec<(String, String, ViolationReason)> {
    let direct = CompiledModel::validate(&model);
    // the gRPC path reports the same
    let through_proto = CompiledModel::from_proto(&model.to_proto()).unwrap_err();
    assert_eq!(direct, through_proto);
    direct
        .into_iter()
        .map(|violation| (violation.field, violation.rule_name, violation.reason))
        .collect()
}

#[test]
fn rejects_bad_rules_naming_each_one() {
    let mut model = default_model();
    model.version = "2024-06-b2b".into();
    model.stage_rules[1].condition = "count['purchase']['all'] >=".into();
    model.stage_rules[3].condition = "purchases_total >= 1".into();
    model.health_rules[2].condition = "days_since_last_touch".into();
    model.health_rules[4].condition = "company > 3".into();
    model.lead.fit_rules.push(FitRule {
        name: "hot_lead".into(),
        description: String::new(),
        condition: "lead_score > 50.0".into(),
        points: 5.0,
    });

    let found = violations(model);
    let expected = [
        (
            "model.lead.fit_rules[2].condition",
            "hot_lead",
            ViolationReason::UnknownFeature,
        ),
        (
            "model.stage_rules[1].condition",
            "loyal",
            ViolationReason::SyntaxError,
        ),
        (
            "model.stage_rules[3].condition",
            "converted",
            ViolationReason::UnknownFeature,
        ),
        (
            "model.health_rules[2].condition",
            "inactive",
            ViolationReason::WrongType,
        ),
        (
            "model.health_rules[4].condition",
            "active",
            ViolationReason::WrongType,
        ),
    ];
    let found_short: Vec<_> = found
        .iter()
        .map(|(f, r, k)| (f.as_str(), r.as_str(), *k))
        .collect();
    assert_eq!(found_short, expected);
}

#[test]
fn rejects_literal_keys_the_feature_maps_never_have() {
    let mut model = default_model();
    model.stage_rules[1].condition = "count['purchse']['all'] >= 1".into();
    model.stage_rules[3].condition = "count['purchase']['13d'] >= 1".into();
    model.health_rules[0].condition = "channel_count.webb['7d'] > 0".into();
    let found = violations(model);
    let found_short: Vec<_> = found
        .iter()
        .map(|(f, r, k)| (f.as_str(), r.as_str(), *k))
        .collect();
    assert_eq!(
        found_short,
        [
            (
                "model.stage_rules[1].condition",
                "loyal",
                ViolationReason::UnknownKey
            ),
            (
                "model.stage_rules[3].condition",
                "converted",
                ViolationReason::UnknownKey
            ),
            (
                "model.health_rules[0].condition",
                "cancelled",
                ViolationReason::UnknownKey
            ),
        ]
    );
}

#[test]
fn rejects_health_weights_that_are_all_zero() {
    let mut model = default_model();
    model.health.recency_weight = 0.0;
    model.health.trend_weight = 0.0;
    model.health.feedback_weight = 0.0;
    model.health.support_weight = 0.0;
    assert_eq!(
        violations(model),
        [(
            "model.health".to_owned(),
            String::new(),
            ViolationReason::Inconsistent
        )]
    );
}

#[test]
fn describes_cel_errors_with_their_position() {
    let mut model = default_model();
    model.stage_rules[0].condition = "nps >= 9 && referrals > 0".into();
    model.health_rules[0].condition = "days_since_last_touch + 1.5 > 3.0".into();
    let all = CompiledModel::validate(&model);
    assert_eq!(
        all[0].description,
        "<input>:1:13: unknown feature 'referrals'"
    );
    assert_eq!(
        all[1].description,
        "<input>:1:23: '+' does not apply to (int, double)"
    );
    let message = all[0].to_proto();
    assert_eq!(message.rule_name, "advocate");
    assert_eq!(message.field, "model.stage_rules[0].condition");
    assert_eq!(
        message.reason,
        clm_proto::scoring::ModelViolationReason::UnknownFeature as i32
    );
}

#[test]
fn rejects_bad_fields() {
    let mut model = default_model();
    model.version = "Not Valid".into();
    model
        .engagement
        .weights
        .weights
        .insert("webinar".into(), 5.0);
    model
        .engagement
        .weights
        .weights
        .insert("custom.webinar".into(), 500.0);
    model.lead.sql_threshold = 10.0;
    model.stage_rules[2].name = model.stage_rules[1].name.clone();
    model.stage_rules[3].acquisition_status = Some(clm_scoring::AcquisitionStatus::Lead);
    model.stage_rules[4].acquisition_status = None;
    model.health_rules[0].health = None;
    model.sweep_interval = Some(std::time::Duration::from_secs(60));

    let found = violations(model);
    let found_short: Vec<_> = found
        .iter()
        .map(|(f, r, k)| (f.as_str(), r.as_str(), *k))
        .collect();
    assert_eq!(
        found_short,
        [
            ("model.version", "", ViolationReason::OutOfRange),
            (
                "model.engagement.weights.weights[\"custom.webinar\"]",
                "",
                ViolationReason::OutOfRange
            ),
            (
                "model.engagement.weights.weights[\"webinar\"]",
                "",
                ViolationReason::UnknownTouchpointType
            ),
            (
                "model.lead.sql_threshold",
                "",
                ViolationReason::Inconsistent
            ),
            (
                "model.stage_rules[2].name",
                "loyal",
                ViolationReason::DuplicateName
            ),
            (
                "model.stage_rules[3].acquisition_status",
                "converted",
                ViolationReason::Inconsistent
            ),
            (
                "model.stage_rules[4].acquisition_status",
                "sales_qualified",
                ViolationReason::Required
            ),
            (
                "model.health_rules[0].health",
                "cancelled",
                ViolationReason::Required
            ),
            ("model.sweep_interval", "", ViolationReason::OutOfRange),
        ]
    );
}

#[test]
fn rejects_a_model_without_rules() {
    let mut model = default_model();
    model.stage_rules.clear();
    model.health_rules.clear();
    let reasons: Vec<_> = violations(model)
        .into_iter()
        .map(|(field, _, reason)| (field, reason))
        .collect();
    assert_eq!(
        reasons,
        [
            ("model.stage_rules".to_owned(), ViolationReason::Required),
            ("model.health_rules".to_owned(), ViolationReason::Required),
        ]
    );
}

#[test]
fn identical_content_is_a_safe_retry() {
    let stored = default_model();
    let mut retried = default_model();
    retried.built_in = false;
    retried.create_time = chrono::DateTime::from_timestamp(1, 0);
    assert!(stored.same_content(&retried));
    retried.lead.mql_threshold = 41.0;
    assert!(!stored.same_content(&retried));
}
