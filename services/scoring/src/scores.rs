//! The three scores of a model, each 0 to 100, with what they are made of.
//!
//! - engagement: the sum of per-type weights decayed by age, clamped;
//! - lead: decayed behaviour points plus the points of true profile-fit
//!   rules (evaluated by the caller, since they are CEL), clamped;
//! - health: the weighted mean of recency, engagement trend, feedback and
//!   support, leaving out components without data.
//!
//! Every function takes `now` explicitly and reads only the customer's
//! features, so scores are deterministic.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::features::CustomerFeatures;
use crate::model::{DecayedWeights, HealthScoreConfig};

/// A customer's three scores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Engagement score, 0 to 100.
    pub engagement: f64,
    /// Lead score, 0 to 100.
    pub lead: f64,
    /// Health score, 0 to 100 (higher is healthier).
    pub health: f64,
}

/// Which score an explanation is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreKind {
    /// The engagement score.
    Engagement,
    /// The lead score.
    Lead,
    /// The health score.
    Health,
}

/// The points all touchpoints of one type added to a score.
#[derive(Clone, Debug, PartialEq)]
pub struct TypeContribution {
    /// The touchpoint type.
    pub touchpoint_type: String,
    /// How many touchpoints of the type the customer has.
    pub count: u64,
    /// Their decayed points together.
    pub points: f64,
}

/// One component of a composite score.
#[derive(Clone, Debug, PartialEq)]
pub struct ComponentContribution {
    /// `behaviour` or `fit` (lead); `recency`, `trend`, `feedback` or
    /// `support` (health).
    pub component: &'static str,
    /// Points (lead) or 0 to 100 (health).
    pub value: f64,
    /// The share of the component in the health score (0 when left out),
    /// or 1 for lead components.
    pub weight: f64,
    /// Whether the component had data.
    pub present: bool,
}

/// How one score came about.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreExplanation {
    /// Which score.
    pub kind: ScoreKind,
    /// The score, 0 to 100.
    pub value: f64,
    /// The score before clamping.
    pub raw_value: f64,
    /// Contributions by touchpoint type, largest absolute points first
    /// (engagement and lead behaviour).
    pub by_type: Vec<TypeContribution>,
    /// The components (lead and health).
    pub components: Vec<ComponentContribution>,
}

fn clamp_score(raw: f64) -> f64 {
    if raw.is_nan() {
        0.0
    } else {
        raw.clamp(0.0, 100.0)
    }
}

/// The sum over the customer's touchpoints of `weight * 0.5 ^ (age /
/// half_life)`, calling `each_type` with each weighted type's count and
/// points.
fn decayed_points(
    weights: &DecayedWeights,
    features: &CustomerFeatures,
    now: DateTime<Utc>,
    mut each_type: impl FnMut(&str, u64, f64),
) -> f64 {
    let half_life = weights.effective_half_life().as_secs_f64();
    let mut total = 0.0;
    for (kind, history) in features.type_histories() {
        let Some(weight) = weights.weights.get(kind) else {
            continue;
        };
        let points = weight * history.decayed_count(half_life, now);
        each_type(kind, history.total(), points);
        total += points;
    }
    total
}

fn sorted_by_points(mut by_type: Vec<TypeContribution>) -> Vec<TypeContribution> {
    by_type.sort_by(|a, b| {
        b.points
            .abs()
            .total_cmp(&a.points.abs())
            .then_with(|| a.touchpoint_type.cmp(&b.touchpoint_type))
    });
    by_type
}

/// The engagement score.
pub fn engagement_score(
    weights: &DecayedWeights,
    features: &CustomerFeatures,
    now: DateTime<Utc>,
) -> f64 {
    clamp_score(decayed_points(weights, features, now, |_, _, _| {}))
}

/// The engagement score with its contributions by type.
pub fn explain_engagement(
    weights: &DecayedWeights,
    features: &CustomerFeatures,
    now: DateTime<Utc>,
) -> ScoreExplanation {
    let mut by_type = Vec::new();
    let raw = decayed_points(weights, features, now, |kind, count, points| {
        by_type.push(TypeContribution {
            touchpoint_type: kind.to_owned(),
            count,
            points,
        });
    });
    ScoreExplanation {
        kind: ScoreKind::Engagement,
        value: clamp_score(raw),
        raw_value: raw,
        by_type: sorted_by_points(by_type),
        components: Vec::new(),
    }
}

/// The lead score, given the points of the fit rules that are true.
pub fn lead_score(
    behaviour: &DecayedWeights,
    fit_points: f64,
    features: &CustomerFeatures,
    now: DateTime<Utc>,
) -> f64 {
    clamp_score(decayed_points(behaviour, features, now, |_, _, _| {}) + fit_points)
}

/// The lead score with its behaviour contributions by type and its
/// components; `has_fit_rules` says whether the model has any.
pub fn explain_lead(
    behaviour: &DecayedWeights,
    fit_points: f64,
    has_fit_rules: bool,
    features: &CustomerFeatures,
    now: DateTime<Utc>,
) -> ScoreExplanation {
    let mut by_type = Vec::new();
    let behaviour_points = decayed_points(behaviour, features, now, |kind, count, points| {
        by_type.push(TypeContribution {
            touchpoint_type: kind.to_owned(),
            count,
            points,
        });
    });
    let raw = behaviour_points + fit_points;
    ScoreExplanation {
        kind: ScoreKind::Lead,
        value: clamp_score(raw),
        raw_value: raw,
        by_type: sorted_by_points(by_type),
        components: vec![
            ComponentContribution {
                component: "behaviour",
                value: behaviour_points,
                weight: 1.0,
                present: true,
            },
            ComponentContribution {
                component: "fit",
                value: fit_points,
                weight: 1.0,
                present: has_fit_rules,
            },
        ],
    }
}

/// The four health components: name, configured weight, value if present.
fn health_components(
    config: &HealthScoreConfig,
    engagement: &DecayedWeights,
    features: &CustomerFeatures,
    now: DateTime<Utc>,
) -> [(&'static str, f64, Option<f64>); 4] {
    let recency = features.last_touch_at().map(|last| {
        let age = (now - last).num_milliseconds().max(0) as f64 / 1000.0;
        100.0 * (-age / config.effective_recency_half_life().as_secs_f64()).exp2()
    });
    let trend = features.last_touch_at().map(|_| {
        let window = config.effective_trend_window().as_secs_f64();
        let now_seconds = now.timestamp() as f64;
        let half_life = engagement.effective_half_life().as_secs_f64();
        let mut recent = 0.0;
        let mut previous = 0.0;
        for (kind, history) in features.type_histories() {
            let Some(weight) = engagement.weights.get(kind) else {
                continue;
            };
            recent += weight
                * history.decayed_count_between(
                    half_life,
                    now,
                    now_seconds - window,
                    f64::INFINITY,
                );
            previous += weight
                * history.decayed_count_between(
                    half_life,
                    now,
                    now_seconds - 2.0 * window,
                    now_seconds - window,
                );
        }
        let (recent, previous) = (recent.max(0.0), previous.max(0.0));
        let larger = recent.max(previous);
        if larger == 0.0 {
            50.0
        } else {
            50.0 + 50.0 * (recent - previous) / larger
        }
    });
    let feedback = match (features.nps(), features.csat()) {
        (Some(nps), Some(csat)) if csat.answered_at > nps.answered_at => {
            Some((csat.score - 1) as f64 * 25.0)
        }
        (Some(nps), _) => Some(nps.score as f64 * 10.0),
        (None, Some(csat)) => Some((csat.score - 1) as f64 * 25.0),
        (None, None) => None,
    }
    .map(|value| value.clamp(0.0, 100.0));
    let support = (100.0
        - config.effective_open_ticket_penalty() * features.open_support_tickets() as f64)
        .max(0.0);
    [
        ("recency", config.recency_weight, recency),
        ("trend", config.trend_weight, trend),
        ("feedback", config.feedback_weight, feedback),
        ("support", config.support_weight, Some(support)),
    ]
}

fn weighted_mean(components: &[(&'static str, f64, Option<f64>); 4]) -> (f64, f64) {
    let mut total_weight = 0.0;
    let mut sum = 0.0;
    for (_, weight, value) in components {
        if let Some(value) = value {
            total_weight += weight;
            sum += weight * value;
        }
    }
    let mean = if total_weight > 0.0 {
        sum / total_weight
    } else {
        0.0
    };
    (mean, total_weight)
}

/// The health score.
pub fn health_score(
    config: &HealthScoreConfig,
    engagement: &DecayedWeights,
    features: &CustomerFeatures,
    now: DateTime<Utc>,
) -> f64 {
    clamp_score(weighted_mean(&health_components(config, engagement, features, now)).0)
}

/// The health score with its components.
pub fn explain_health(
    config: &HealthScoreConfig,
    engagement: &DecayedWeights,
    features: &CustomerFeatures,
    now: DateTime<Utc>,
) -> ScoreExplanation {
    let components = health_components(config, engagement, features, now);
    let (raw, total_weight) = weighted_mean(&components);
    ScoreExplanation {
        kind: ScoreKind::Health,
        value: clamp_score(raw),
        raw_value: raw,
        by_type: Vec::new(),
        components: components
            .iter()
            .map(|(component, weight, value)| ComponentContribution {
                component,
                value: value.unwrap_or(0.0),
                weight: match value {
                    Some(_) if total_weight > 0.0 => weight / total_weight,
                    _ => 0.0,
                },
                present: value.is_some(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::TouchpointFacts;
    use crate::model::days;
    use chrono::{Duration, TimeZone};
    use clm_proto::touchpoint::Channel;

    fn day(n: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 1, 1, 12, 0, 0).unwrap() + Duration::days(n)
    }

    fn customer(touches: &[(&str, i64)]) -> CustomerFeatures {
        let mut features = CustomerFeatures::new();
        for (kind, at) in touches {
            features.apply(&TouchpointFacts {
                touchpoint_type: kind,
                channel: Channel::Web,
                occurred_at: day(*at),
                revenue: None,
            });
        }
        features
    }

    fn weights(pairs: &[(&str, f64)]) -> DecayedWeights {
        DecayedWeights {
            weights: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            half_life: Some(days(10)),
        }
    }

    #[test]
    fn engagement_decays_by_half_life_and_clamps() {
        let features = customer(&[("page_view", 0), ("purchase", 10)]);
        let weights = weights(&[("page_view", 10.0), ("purchase", 40.0)]);
        let explained = explain_engagement(&weights, &features, day(10));
        assert!((explained.raw_value - 45.0).abs() < 1e-9, "{explained:?}");
        assert_eq!(explained.by_type[0].touchpoint_type, "purchase");
        assert_eq!(
            engagement_score(&weights, &features, day(10)),
            explained.value
        );

        let busy = customer(&[("purchase", 0), ("purchase", 0), ("purchase", 0)]);
        assert_eq!(engagement_score(&weights, &busy, day(0)), 100.0);
        let negative = weights_with_cancellation();
        assert_eq!(
            engagement_score(&negative, &customer(&[("cancellation", 0)]), day(0)),
            0.0
        );
    }

    fn weights_with_cancellation() -> DecayedWeights {
        weights(&[("cancellation", -30.0)])
    }

    #[test]
    fn lead_adds_fit_points() {
        let features = customer(&[("form_submit", 0)]);
        let behaviour = weights(&[("form_submit", 15.0)]);
        assert!((lead_score(&behaviour, 10.0, &features, day(0)) - 25.0).abs() < 1e-9);
        let explained = explain_lead(&behaviour, 10.0, true, &features, day(0));
        assert_eq!(explained.components[1].value, 10.0);
    }

    #[test]
    fn health_leaves_out_components_without_data() {
        let config = HealthScoreConfig {
            recency_weight: 1.0,
            trend_weight: 1.0,
            feedback_weight: 1.0,
            support_weight: 1.0,
            recency_half_life: Some(days(30)),
            trend_window: Some(days(30)),
            open_ticket_penalty: 0.0,
        };
        let engagement = weights(&[("page_view", 1.0), ("support_ticket_opened", 0.0)]);
        let mut features = customer(&[("page_view", 0), ("support_ticket_opened", 0)]);
        let explained = explain_health(&config, &engagement, &features, day(30));
        // recency 50, trend 100 (nothing in the previous window), support 75
        let expected = (50.0 + 100.0 + 75.0) / 3.0;
        assert!((explained.value - expected).abs() < 1e-9, "{explained:?}");
        assert!(!explained.components[2].present);
        assert_eq!(
            health_score(&config, &engagement, &features, day(30)),
            explained.value
        );

        features.record_nps(10, day(30));
        let with_feedback = health_score(&config, &engagement, &features, day(30));
        assert!((with_feedback - (50.0 + 100.0 + 100.0 + 75.0) / 4.0).abs() < 1e-9);
    }
}
