//! Evaluating one customer with a compiled model: scores, then the stage and
//! health rules (the first true rule of each list wins; no true rule keeps
//! the state), the transition this causes, the next time the result would
//! change by time alone, and on request an explanation.
//!
//! Rules may read the state they decide (`stage`, `health`, `days_in_*`),
//! so after a move the rules run again with the new state until it stops
//! changing (at most [`MAX_SETTLE_ROUNDS`] rounds): a customer who submits a
//! form and requests a demo in one touchpoint batch lands in SQL in one
//! evaluation, which records one transition (REACH → ACQUISITION/SQL) naming
//! the rule of the last move of each axis.
//!
//! Nothing here reads a clock: `now` is a parameter, so evaluations are
//! deterministic and tests control time.

use std::collections::BTreeMap;

use cel::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::compiled_model::CompiledModel;
use crate::feature_map::{CelBindings, Feature, FeatureContext, FeatureValue};
use crate::features::CustomerFeatures;
use crate::lifecycle::LifecycleState;
use crate::next_due::TimeAnalysis;
use crate::rules::{CompiledCondition, RuleOutcome};
use crate::scores::{
    ScoreExplanation, Scores, engagement_score, explain_engagement, explain_health, explain_lead,
    health_score, lead_score,
};
use clm_cel::rule_env;

/// How many times the rules run after a move before the engine gives up
/// settling (a model whose rules keep moving a customer back and forth).
pub const MAX_SETTLE_ROUNDS: usize = 8;

/// The longest transition reason, in characters.
pub const MAX_REASON_CHARS: usize = 1024;

/// Where a customer stands after an evaluation, with the scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LifecycleSnapshot {
    /// Stage, acquisition status, health and when they were entered.
    pub state: LifecycleState,
    /// The three scores.
    pub scores: Scores,
    /// The version of the model that computed it.
    pub model_version: String,
    /// The evaluation time.
    #[serde(with = "crate::stored_time")]
    pub evaluated_at: DateTime<Utc>,
}

/// A change of stage, acquisition status or health (one per evaluation at
/// most; an axis that did not change has equal from and to values).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// The state before.
    pub from: LifecycleState,
    /// The state after.
    pub to: LifecycleState,
    /// The stage rule that moved the stage or acquisition status; `None`
    /// when they did not change.
    pub stage_rule: Option<String>,
    /// The health rule that moved the health; `None` when it did not change.
    pub health_rule: Option<String>,
    /// Why, e.g. `stage rule 'converted' matched: count['purchase']['all'] >= 1`.
    pub reason: String,
    /// The model version that decided it.
    pub model_version: String,
    /// When: the evaluation time, but never before the previous move.
    pub at: DateTime<Utc>,
}

/// The result of one evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The customer's lifecycle after the evaluation.
    pub snapshot: LifecycleSnapshot,
    /// The move this evaluation makes, if any.
    pub transition: Option<Transition>,
    /// When the result would change if nothing but time passed: the time
    /// to index for the sweep. `None` when time alone never changes it.
    pub next_evaluation_at: Option<DateTime<Utc>>,
}

/// How one rule came out, for explanations.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleResult {
    /// The rule's name.
    pub rule_name: String,
    /// Its condition.
    pub condition: String,
    /// True, false, or failed.
    pub outcome: RuleOutcome,
    /// True for the rule that decided: the first true stage or health rule,
    /// every true fit rule.
    pub applied: bool,
    /// For fit rules, the points added.
    pub points: f64,
}

/// An evaluation with everything that went into it.
#[derive(Clone, Debug, PartialEq)]
pub struct Explanation {
    /// The evaluation itself.
    pub evaluation: Evaluation,
    /// Every feature the rules could see, flattened (`count.purchase.30d`).
    pub features: BTreeMap<String, FeatureValue>,
    /// Every stage rule, in model order, against the state before.
    pub stage_rules: Vec<RuleResult>,
    /// Every health rule, in model order, against the state before.
    pub health_rules: Vec<RuleResult>,
    /// Every fit rule, in model order.
    pub fit_rules: Vec<RuleResult>,
    /// Engagement, lead and health, with their contributions.
    pub scores: Vec<ScoreExplanation>,
}

#[derive(Default)]
struct ExplanationParts {
    features: BTreeMap<String, FeatureValue>,
    stage_rules: Vec<RuleResult>,
    health_rules: Vec<RuleResult>,
    fit_rules: Vec<RuleResult>,
}

impl CompiledModel {
    /// Evaluates a customer at `now`, from the lifecycle state stored for
    /// them.
    pub fn evaluate(
        &self,
        features: &CustomerFeatures,
        state: &LifecycleState,
        now: DateTime<Utc>,
    ) -> Evaluation {
        self.run(features, state, now, None)
    }

    /// Evaluates a customer at `now` and explains the result. The top
    /// contributing touchpoints are the caller's to add (it has the
    /// timeline): see [`DecayedWeights::contribution`](crate::DecayedWeights::contribution).
    pub fn explain(
        &self,
        features: &CustomerFeatures,
        state: &LifecycleState,
        now: DateTime<Utc>,
    ) -> Explanation {
        let mut parts = ExplanationParts::default();
        let evaluation = self.run(features, state, now, Some(&mut parts));
        let model = self.model();
        let fit_points = parts.fit_rules.iter().map(|rule| rule.points).sum();
        let scores = vec![
            explain_engagement(&model.engagement.weights, features, now),
            explain_lead(
                &model.lead.behaviour,
                fit_points,
                !model.lead.fit_rules.is_empty(),
                features,
                now,
            ),
            explain_health(&model.health, &model.engagement.weights, features, now),
        ];
        Explanation {
            evaluation,
            features: parts.features,
            stage_rules: parts.stage_rules,
            health_rules: parts.health_rules,
            fit_rules: parts.fit_rules,
            scores,
        }
    }

    fn run(
        &self,
        features: &CustomerFeatures,
        input: &LifecycleState,
        now: DateTime<Utc>,
        mut explanation: Option<&mut ExplanationParts>,
    ) -> Evaluation {
        let model = self.model();
        let rules = self.rules();
        let env = rule_env();
        let mut context = FeatureContext {
            features,
            now,
            state: *input,
            scores: Scores {
                engagement: engagement_score(&model.engagement.weights, features, now),
                lead: 0.0,
                health: health_score(&model.health, &model.engagement.weights, features, now),
            },
            mql_threshold: model.lead.mql_threshold,
            sql_threshold: model.lead.sql_threshold,
        };
        let bound = self.bound_features();
        let mut bindings = CelBindings::new(&context, bound);

        let mut fit_points = 0.0;
        if !rules.fit.is_empty() {
            let mut cel = Context::with_env(env.clone());
            cel.set_variable_resolver(&bindings);
            for (rule, condition) in model.lead.fit_rules.iter().zip(&rules.fit) {
                let outcome = condition.evaluate(&cel);
                let points = if outcome.matched() { rule.points } else { 0.0 };
                fit_points += points;
                if let Some(parts) = explanation.as_deref_mut() {
                    parts.fit_rules.push(RuleResult {
                        rule_name: rule.name.clone(),
                        condition: rule.condition.clone(),
                        applied: outcome.matched(),
                        outcome,
                        points,
                    });
                }
            }
        }
        context.scores.lead = lead_score(&model.lead.behaviour, fit_points, features, now);
        bindings.rebind(&context, Feature::LeadScore);
        if let Some(parts) = explanation.as_deref_mut() {
            parts.features = context.flatten();
        }

        // a move is never dated before the previous one
        let moved_at = [input.stage_entered_at, input.health_entered_at]
            .into_iter()
            .flatten()
            .fold(now, DateTime::max);
        let mut state = *input;
        let mut stage_cause = None;
        let mut health_cause = None;
        let mut matched = (None, None);
        let mut settled = false;
        for round in 0..MAX_SETTLE_ROUNDS {
            let (stage_match, health_match) = {
                let mut cel = Context::with_env(env.clone());
                cel.set_variable_resolver(&bindings);
                let parts = if round == 0 {
                    explanation.as_deref_mut()
                } else {
                    None
                };
                match parts {
                    None => (
                        first_match(&rules.stage, &cel),
                        first_match(&rules.health, &cel),
                    ),
                    Some(parts) => {
                        let stage = explain_list(
                            &rules.stage,
                            model.stage_rules.iter().map(|r| (&r.name, &r.condition)),
                            &cel,
                            &mut parts.stage_rules,
                        );
                        let health = explain_list(
                            &rules.health,
                            model.health_rules.iter().map(|r| (&r.name, &r.condition)),
                            &cel,
                            &mut parts.health_rules,
                        );
                        (stage, health)
                    }
                }
            };
            matched = (stage_match, health_match);
            let next = self.apply(state, stage_match, health_match, moved_at);
            if next.same_position(&state) {
                settled = true;
                break;
            }
            if !next.same_stage(&state) {
                stage_cause = stage_match;
            }
            if next.health != state.health {
                health_cause = health_match;
            }
            state = next;
            context.state = state;
            bindings.rebind_state(&context, bound);
        }

        let fallback = now + model.effective_sweep_interval();
        let next_evaluation_at = if settled {
            let mut cel = Context::with_env(env);
            cel.set_variable_resolver(&bindings);
            let analysis = TimeAnalysis {
                features: &context,
                cel: &cel,
                fallback,
            };
            let stage = analysis.rule_list(&rules.stage, matched.0);
            let health = analysis.rule_list(&rules.health, matched.1);
            match (stage, health) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
            .map(|at| if at > now { at } else { fallback })
        } else {
            Some(fallback)
        };

        let transition = (!state.same_position(input)).then(|| {
            let stage_rule = (!state.same_stage(input))
                .then(|| stage_cause.map(|index| &model.stage_rules[index]))
                .flatten();
            let health_rule = (state.health != input.health)
                .then(|| health_cause.map(|index| &model.health_rules[index]))
                .flatten();
            let mut reasons = Vec::new();
            if let Some(rule) = stage_rule {
                reasons.push(format!(
                    "stage rule '{}' matched: {}",
                    rule.name, rule.condition
                ));
            }
            if let Some(rule) = health_rule {
                reasons.push(format!(
                    "health rule '{}' matched: {}",
                    rule.name, rule.condition
                ));
            }
            Transition {
                from: *input,
                to: state,
                stage_rule: stage_rule.map(|rule| rule.name.clone()),
                health_rule: health_rule.map(|rule| rule.name.clone()),
                reason: truncate(reasons.join("; "), MAX_REASON_CHARS),
                model_version: model.version.clone(),
                at: moved_at,
            }
        });

        Evaluation {
            snapshot: LifecycleSnapshot {
                state,
                scores: context.scores,
                model_version: model.version.clone(),
                evaluated_at: now,
            },
            transition,
            next_evaluation_at,
        }
    }

    /// The state after the matching rules apply at `at`.
    fn apply(
        &self,
        state: LifecycleState,
        stage_match: Option<usize>,
        health_match: Option<usize>,
        at: DateTime<Utc>,
    ) -> LifecycleState {
        let model = self.model();
        let mut next = state;
        if let Some(rule) = stage_match.map(|index| &model.stage_rules[index]) {
            if next.stage != rule.stage {
                next.stage = rule.stage;
                next.acquisition_status = rule.acquisition_status;
                next.stage_entered_at = Some(at);
            } else {
                next.acquisition_status = rule.acquisition_status;
            }
        }
        if let Some(rule) = health_match.map(|index| &model.health_rules[index])
            && next.health != rule.health
        {
            next.health = rule.health;
            next.health_entered_at = Some(at);
        }
        next
    }
}

/// The index of the first true condition.
fn first_match(conditions: &[CompiledCondition], cel: &Context<'_, '_>) -> Option<usize> {
    conditions
        .iter()
        .position(|condition| condition.evaluate(cel).matched())
}

/// Evaluates every condition, recording each outcome; the index of the
/// first true one.
fn explain_list<'m>(
    conditions: &[CompiledCondition],
    rules: impl Iterator<Item = (&'m String, &'m String)>,
    cel: &Context<'_, '_>,
    results: &mut Vec<RuleResult>,
) -> Option<usize> {
    let mut first = None;
    for (index, (condition, (name, source))) in conditions.iter().zip(rules).enumerate() {
        let outcome = condition.evaluate(cel);
        let applied = outcome.matched() && first.is_none();
        if applied {
            first = Some(index);
        }
        results.push(RuleResult {
            rule_name: name.clone(),
            condition: source.clone(),
            outcome,
            applied,
            points: 0.0,
        });
    }
    first
}

/// At most `max` characters, ending with `…` when cut.
fn truncate(text: String, max: usize) -> String {
    if text.chars().count() <= max {
        return text;
    }
    let mut cut: String = text.chars().take(max - 1).collect();
    cut.push('…');
    cut
}
