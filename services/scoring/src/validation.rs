//! Model validation: every documented range, name and consistency rule of
//! `clm.scoring.v1.Model`, and every rule condition compiled and checked, with
//! one [`ModelViolation`] per problem, in field order, naming the rule.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use clm_proto::scoring as proto;

use crate::lifecycle::LifecycleStage;
use crate::model::{DecayedWeights, Model, days};
use crate::rules::{CompiledCondition, MAX_CONDITION_CHARS, RuleKind, compile_condition};
use crate::vocabulary::is_touchpoint_type;

/// Why a model is invalid (`ModelViolationReason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationReason {
    /// A CEL expression does not parse.
    SyntaxError,
    /// A CEL expression references a feature or function that does not exist.
    UnknownFeature,
    /// A CEL expression does not type-check, or does not yield a bool.
    WrongType,
    /// A required field is missing.
    Required,
    /// A number, duration, length or count is out of range.
    OutOfRange,
    /// Two rules of one list have the same name.
    DuplicateName,
    /// A weight is keyed by an unknown touchpoint type.
    UnknownTouchpointType,
    /// Fields contradict each other.
    Inconsistent,
    /// A CEL expression uses a literal key that its documented map never has.
    UnknownKey,
}

impl ViolationReason {
    /// The protobuf value.
    pub fn to_proto(self) -> proto::ModelViolationReason {
        use proto::ModelViolationReason as P;
        match self {
            Self::SyntaxError => P::SyntaxError,
            Self::UnknownFeature => P::UnknownFeature,
            Self::WrongType => P::WrongType,
            Self::Required => P::Required,
            Self::OutOfRange => P::OutOfRange,
            Self::DuplicateName => P::DuplicateName,
            Self::UnknownTouchpointType => P::UnknownTouchpointType,
            Self::Inconsistent => P::Inconsistent,
            Self::UnknownKey => P::UnknownKey,
        }
    }
}

/// One problem of a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelViolation {
    /// The name of the rule concerned; empty when not in a rule.
    pub rule_name: String,
    /// The path of the bad field, e.g. `model.stage_rules[2].condition`.
    pub field: String,
    /// What kind of problem.
    pub reason: ViolationReason,
    /// A lower-case explanation; for CEL errors, with the position.
    pub description: String,
}

impl ModelViolation {
    /// A problem outside any rule.
    pub fn new(
        field: impl Into<String>,
        reason: ViolationReason,
        description: impl Into<String>,
    ) -> Self {
        Self {
            rule_name: String::new(),
            field: field.into(),
            reason,
            description: description.into(),
        }
    }

    /// The protobuf message.
    pub fn to_proto(&self) -> proto::ModelViolation {
        proto::ModelViolation {
            rule_name: self.rule_name.clone(),
            field: self.field.clone(),
            reason: self.reason.to_proto() as i32,
            description: self.description.clone(),
        }
    }
}

/// The compiled conditions of a valid model, in model order.
#[derive(Debug)]
pub(crate) struct CompiledRules {
    pub stage: Vec<CompiledCondition>,
    pub health: Vec<CompiledCondition>,
    pub fit: Vec<CompiledCondition>,
}

/// Checks every field of `model` and compiles its conditions.
pub(crate) fn validate_and_compile(model: &Model) -> Result<CompiledRules, Vec<ModelViolation>> {
    let mut check = Checker::default();
    check.version(&model.version);
    check.max_chars("model.description", "", &model.description, 1024);
    check.weights("model.engagement.weights", &model.engagement.weights);

    let lead = &model.lead;
    check.weights("model.lead.behaviour", &lead.behaviour);
    if lead.fit_rules.len() > 50 {
        check.out_of_range("model.lead.fit_rules", "", "at most 50 fit rules");
    }
    let mut fit = Vec::new();
    let mut names = HashSet::new();
    for (index, rule) in lead.fit_rules.iter().enumerate() {
        let field = format!("model.lead.fit_rules[{index}]");
        check.rule_name(&field, &rule.name, &mut names);
        check.max_chars(
            &format!("{field}.description"),
            &rule.name,
            &rule.description,
            512,
        );
        fit.extend(check.condition(&field, &rule.name, &rule.condition, RuleKind::Fit));
        check.range(
            &format!("{field}.points"),
            &rule.name,
            rule.points,
            -100.0,
            100.0,
        );
    }
    check.range(
        "model.lead.mql_threshold",
        "",
        lead.mql_threshold,
        0.0,
        100.0,
    );
    check.range(
        "model.lead.sql_threshold",
        "",
        lead.sql_threshold,
        0.0,
        100.0,
    );
    if lead.sql_threshold < lead.mql_threshold {
        check.push(
            "model.lead.sql_threshold",
            "",
            ViolationReason::Inconsistent,
            "must not be below mql_threshold",
        );
    }

    let health = &model.health;
    for (name, weight) in [
        ("recency_weight", health.recency_weight),
        ("trend_weight", health.trend_weight),
        ("feedback_weight", health.feedback_weight),
        ("support_weight", health.support_weight),
    ] {
        check.range(&format!("model.health.{name}"), "", weight, 0.0, f64::MAX);
    }
    let weights = [
        health.recency_weight,
        health.trend_weight,
        health.feedback_weight,
        health.support_weight,
    ];
    if weights.iter().all(|weight| *weight == 0.0) {
        check.push(
            "model.health",
            "",
            ViolationReason::Inconsistent,
            "at least one of recency_weight, trend_weight, feedback_weight and support_weight \
             must be above 0: with all at 0 every customer gets the same health score",
        );
    }
    check.duration(
        "model.health.recency_half_life",
        health.recency_half_life,
        days(1),
        days(3650),
    );
    check.duration(
        "model.health.trend_window",
        health.trend_window,
        days(1),
        days(365),
    );
    check.range(
        "model.health.open_ticket_penalty",
        "",
        health.open_ticket_penalty,
        0.0,
        100.0,
    );

    check.rule_count("model.stage_rules", model.stage_rules.len());
    let mut stage = Vec::new();
    let mut names = HashSet::new();
    for (index, rule) in model.stage_rules.iter().enumerate() {
        let field = format!("model.stage_rules[{index}]");
        check.rule_name(&field, &rule.name, &mut names);
        check.max_chars(
            &format!("{field}.description"),
            &rule.name,
            &rule.description,
            512,
        );
        stage.extend(check.condition(&field, &rule.name, &rule.condition, RuleKind::Stage));
        match (rule.stage, rule.acquisition_status) {
            (None, _) => check.push(
                format!("{field}.stage"),
                &rule.name,
                ViolationReason::Required,
                "is required",
            ),
            (Some(LifecycleStage::Acquisition), None) => check.push(
                format!("{field}.acquisition_status"),
                &rule.name,
                ViolationReason::Required,
                "is required when the stage is ACQUISITION",
            ),
            (Some(stage), Some(_)) if stage != LifecycleStage::Acquisition => check.push(
                format!("{field}.acquisition_status"),
                &rule.name,
                ViolationReason::Inconsistent,
                format!("must be unset when the stage is {}", stage.as_str()),
            ),
            _ => {}
        }
    }

    check.rule_count("model.health_rules", model.health_rules.len());
    let mut health_rules = Vec::new();
    let mut names = HashSet::new();
    for (index, rule) in model.health_rules.iter().enumerate() {
        let field = format!("model.health_rules[{index}]");
        check.rule_name(&field, &rule.name, &mut names);
        check.max_chars(
            &format!("{field}.description"),
            &rule.name,
            &rule.description,
            512,
        );
        health_rules.extend(check.condition(&field, &rule.name, &rule.condition, RuleKind::Health));
        if rule.health.is_none() {
            check.push(
                format!("{field}.health"),
                &rule.name,
                ViolationReason::Required,
                "is required",
            );
        }
    }

    check.duration(
        "model.sweep_interval",
        model.sweep_interval,
        Duration::from_secs(3600),
        days(7),
    );

    if check.violations.is_empty() {
        Ok(CompiledRules {
            stage,
            health: health_rules,
            fit,
        })
    } else {
        Err(check.violations)
    }
}

#[derive(Default)]
struct Checker {
    violations: Vec<ModelViolation>,
}

fn is_name(value: &str, extra: &[u8]) -> bool {
    value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b))
}

impl Checker {
    fn push(
        &mut self,
        field: impl Into<String>,
        rule_name: &str,
        reason: ViolationReason,
        description: impl Into<String>,
    ) {
        self.violations.push(ModelViolation {
            rule_name: rule_name.to_owned(),
            field: field.into(),
            reason,
            description: description.into(),
        });
    }

    fn out_of_range(&mut self, field: &str, rule_name: &str, description: impl Into<String>) {
        self.push(field, rule_name, ViolationReason::OutOfRange, description);
    }

    fn version(&mut self, version: &str) {
        if version.is_empty() {
            self.push(
                "model.version",
                "",
                ViolationReason::Required,
                "is required",
            );
        } else if version.len() > 64 || !is_name(version, b"_.-") {
            self.out_of_range(
                "model.version",
                "",
                "must be 1 to 64 characters of a-z, 0-9, '_', '.', '-'",
            );
        }
    }

    fn max_chars(&mut self, field: &str, rule_name: &str, value: &str, max: usize) {
        if value.chars().count() > max {
            self.out_of_range(
                field,
                rule_name,
                format!("must be at most {max} characters"),
            );
        } else if let Some(problem) = value
            .chars()
            .find_map(clm_platform::validate::forbidden_in_text)
        {
            self.push(field, rule_name, ViolationReason::OutOfRange, problem);
        }
    }

    fn range(&mut self, field: &str, rule_name: &str, value: f64, min: f64, max: f64) {
        if !value.is_finite() || value < min || value > max {
            let description = if max == f64::MAX {
                format!("must be a number of at least {min}")
            } else {
                format!("must be a number from {min} to {max}")
            };
            self.out_of_range(field, rule_name, description);
        }
    }

    fn duration(&mut self, field: &str, value: Option<Duration>, min: Duration, max: Duration) {
        if let Some(value) = value
            && (value < min || value > max)
        {
            self.out_of_range(
                field,
                "",
                format!(
                    "must be from {} to {} seconds",
                    min.as_secs(),
                    max.as_secs()
                ),
            );
        }
    }

    fn weights(&mut self, field: &str, weights: &DecayedWeights) {
        self.weight_map(&format!("{field}.weights"), &weights.weights);
        self.duration(
            &format!("{field}.half_life"),
            weights.half_life,
            Duration::from_secs(3600),
            days(3650),
        );
    }

    fn weight_map(&mut self, field: &str, weights: &BTreeMap<String, f64>) {
        if weights.len() > 200 {
            self.out_of_range(field, "", "at most 200 touchpoint types");
        }
        for (kind, weight) in weights {
            let entry = format!("{field}[\"{kind}\"]");
            if !is_touchpoint_type(kind) {
                self.push(
                    entry.as_str(),
                    "",
                    ViolationReason::UnknownTouchpointType,
                    format!("'{kind}' is neither a documented touchpoint type nor custom.<name>"),
                );
            }
            self.range(&entry, "", *weight, -100.0, 100.0);
        }
    }

    fn rule_count(&mut self, field: &str, count: usize) {
        if count == 0 {
            self.push(
                field,
                "",
                ViolationReason::Required,
                "at least one rule is required",
            );
        } else if count > 100 {
            self.out_of_range(field, "", "at most 100 rules");
        }
    }

    fn rule_name(&mut self, field: &str, name: &str, seen: &mut HashSet<String>) {
        let field = format!("{field}.name");
        if name.is_empty() {
            self.push(field, name, ViolationReason::Required, "is required");
        } else if name.len() > 64 || !is_name(name, b"_") {
            self.out_of_range(&field, name, "must be 1 to 64 characters of a-z, 0-9, '_'");
        } else if !seen.insert(name.to_owned()) {
            self.push(
                field,
                name,
                ViolationReason::DuplicateName,
                format!("another rule of the list is named '{name}'"),
            );
        }
    }

    fn condition(
        &mut self,
        field: &str,
        rule_name: &str,
        condition: &str,
        kind: RuleKind,
    ) -> Option<CompiledCondition> {
        let field = format!("{field}.condition");
        if condition.trim().is_empty() {
            self.push(field, rule_name, ViolationReason::Required, "is required");
            return None;
        }
        if condition.chars().count() > MAX_CONDITION_CHARS {
            self.out_of_range(
                &field,
                rule_name,
                format!("must be at most {MAX_CONDITION_CHARS} characters"),
            );
            return None;
        }
        match compile_condition(condition, kind) {
            Ok(compiled) => Some(compiled),
            Err((reason, description)) => {
                self.push(field, rule_name, reason, description);
                None
            }
        }
    }
}
