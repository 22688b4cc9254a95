//! The model that ships with the service and is active on first start. It
//! encodes the journey of DESIGN §1:
//!
//! | stage rule | when |
//! |---|---|
//! | `advocate` → ADVOCACY | a converted customer who referred, reviewed, took part in a case study or answered NPS 9–10 |
//! | `loyal` → LOYALTY | 3+ purchases, contracts or renewals and 180+ days since conversion |
//! | `retained` → RETENTION | a repeat purchase or a renewal |
//! | `converted` → CONVERSION | a purchase or a signed contract (a walk-in buyer lands here directly) |
//! | `sales_qualified` → ACQUISITION/SQL | a demo request or proposal, or a known lead with a pricing view or a lead score at the SQL threshold; stays SQL |
//! | `marketing_qualified` → ACQUISITION/MQL | a lead whose lead score reaches the MQL threshold; stays MQL |
//! | `lead` → ACQUISITION/LEAD | identified, or a form submit, newsletter signup or content download |
//! | `reach` → REACH | anyone else seen (anonymous page views, ad clicks...) |
//!
//! | health rule | when |
//! |---|---|
//! | `cancelled` → CHURNED | cancelled and not bought again since |
//! | `lapsed` → CHURNED | no touchpoint for more than 120 days |
//! | `inactive` → AT_RISK | no touchpoint for more than 60 days |
//! | `won_back` → ACTIVE | churned, and none of the above holds any more |
//! | `active` → ACTIVE | otherwise |
//!
//! MQL and SQL are sticky: a qualified lead whose lead score decays stays
//! qualified until it converts.

use crate::lifecycle::{AcquisitionStatus, Health, LifecycleStage};
use crate::model::{
    DecayedWeights, EngagementScoreConfig, FitRule, HealthRule, HealthScoreConfig, LeadScoreConfig,
    Model, StageRule, days,
};

/// The version of the built-in model.
pub const DEFAULT_MODEL_VERSION: &str = "builtin-1";

/// Purchases, signed contracts and renewals, all time.
const PURCHASES: &str =
    "count['purchase']['all'] + count['contract_signed']['all'] + count['renewal']['all']";

/// The built-in model, marked `built_in`.
pub fn default_model() -> Model {
    Model {
        version: DEFAULT_MODEL_VERSION.to_owned(),
        description: "The built-in model: the journey of the design brief with B2C/B2B-neutral \
                      weights, MQL at 40 and SQL at 70 lead points, at risk after 60 days without \
                      a touchpoint and churned after 120 days or a cancellation."
            .to_owned(),
        engagement: EngagementScoreConfig {
            weights: weights(
                &[
                    ("page_view", 1.0),
                    ("ad_click", 1.0),
                    ("social_engagement", 1.0),
                    ("content_view", 2.0),
                    ("content_download", 5.0),
                    ("form_submit", 5.0),
                    ("newsletter_signup", 3.0),
                    ("email_open", 1.0),
                    ("email_click", 2.0),
                    ("demo_request", 8.0),
                    ("pricing_view", 3.0),
                    ("proposal_sent", 5.0),
                    ("contract_signed", 15.0),
                    ("purchase", 15.0),
                    ("renewal", 15.0),
                    ("cancellation", -30.0),
                    ("refund", -10.0),
                    ("onboarding_completed", 5.0),
                    ("product_usage", 2.0),
                    ("support_ticket_opened", 1.0),
                    ("support_ticket_resolved", 1.0),
                    ("referral", 10.0),
                    ("review", 10.0),
                    ("case_study", 15.0),
                    ("nps_response", 3.0),
                    ("csat_response", 3.0),
                    ("ces_response", 3.0),
                ],
                30,
            ),
        },
        lead: LeadScoreConfig {
            behaviour: weights(
                &[
                    ("page_view", 2.0),
                    ("ad_click", 2.0),
                    ("social_engagement", 1.0),
                    ("content_view", 3.0),
                    ("content_download", 10.0),
                    ("form_submit", 15.0),
                    ("newsletter_signup", 5.0),
                    ("email_open", 1.0),
                    ("email_click", 3.0),
                    ("pricing_view", 10.0),
                    ("demo_request", 30.0),
                    ("proposal_sent", 20.0),
                ],
                30,
            ),
            fit_rules: vec![
                FitRule {
                    name: "business_contact".to_owned(),
                    description: "Works for a known company.".to_owned(),
                    condition: "company != ''".to_owned(),
                    points: 10.0,
                },
                FitRule {
                    name: "known_industry".to_owned(),
                    description: "The industry is known.".to_owned(),
                    condition: "industry != ''".to_owned(),
                    points: 5.0,
                },
            ],
            mql_threshold: 40.0,
            sql_threshold: 70.0,
        },
        health: HealthScoreConfig {
            recency_weight: 0.4,
            trend_weight: 0.2,
            feedback_weight: 0.2,
            support_weight: 0.2,
            recency_half_life: Some(days(30)),
            trend_window: Some(days(30)),
            open_ticket_penalty: 25.0,
        },
        stage_rules: vec![
            stage_rule(
                "advocate",
                "A converted customer who promotes the brand.",
                "days_since_conversion >= 0 && (count['referral']['all'] + count['review']['all'] \
                 + count['case_study']['all'] >= 1 || nps >= 9)"
                    .to_owned(),
                LifecycleStage::Advocacy,
                None,
            ),
            stage_rule(
                "loyal",
                "A repeat buyer with long tenure.",
                format!("{PURCHASES} >= 3 && days_since_conversion >= 180"),
                LifecycleStage::Loyalty,
                None,
            ),
            stage_rule(
                "retained",
                "Bought again or renewed.",
                format!("{PURCHASES} >= 2 || count['renewal']['all'] >= 1"),
                LifecycleStage::Retention,
                None,
            ),
            stage_rule(
                "converted",
                "Made a first purchase or signed a contract.",
                "count['purchase']['all'] + count['contract_signed']['all'] >= 1".to_owned(),
                LifecycleStage::Conversion,
                None,
            ),
            stage_rule(
                "sales_qualified",
                "Asked for a demo or got a proposal, or a known lead who viewed pricing or whose \
                 lead score reached the SQL threshold.",
                "acquisition_status == 'SQL' \
                 || count['demo_request']['all'] + count['proposal_sent']['all'] >= 1 \
                 || stage == 'ACQUISITION' \
                 && (count['pricing_view']['all'] >= 1 || lead_score >= sql_threshold)"
                    .to_owned(),
                LifecycleStage::Acquisition,
                Some(AcquisitionStatus::Sql),
            ),
            stage_rule(
                "marketing_qualified",
                "A known lead whose lead score reached the MQL threshold.",
                "acquisition_status == 'MQL' \
                 || stage == 'ACQUISITION' && lead_score >= mql_threshold"
                    .to_owned(),
                LifecycleStage::Acquisition,
                Some(AcquisitionStatus::Mql),
            ),
            stage_rule(
                "lead",
                "Identified themselves or engaged with a form, newsletter or download.",
                "stage == 'ACQUISITION' || identified \
                 || count['form_submit']['all'] + count['newsletter_signup']['all'] \
                 + count['content_download']['all'] >= 1"
                    .to_owned(),
                LifecycleStage::Acquisition,
                Some(AcquisitionStatus::Lead),
            ),
            stage_rule(
                "reach",
                "Seen, mostly anonymously: aware of the brand.",
                "true".to_owned(),
                LifecycleStage::Reach,
                None,
            ),
        ],
        health_rules: vec![
            health_rule(
                "cancelled",
                "Cancelled and has not bought again since.",
                "cancelled",
                Health::Churned,
            ),
            health_rule(
                "lapsed",
                "No touchpoint for more than 120 days.",
                "days_since_last_touch > 120",
                Health::Churned,
            ),
            health_rule(
                "inactive",
                "No touchpoint for more than 60 days.",
                "days_since_last_touch > 60",
                Health::AtRisk,
            ),
            health_rule(
                "won_back",
                "Churned, but active again (or bought again after a cancellation).",
                "health == 'CHURNED'",
                Health::Active,
            ),
            health_rule("active", "Recently active.", "true", Health::Active),
        ],
        sweep_interval: Some(days(1)),
        built_in: true,
        ..Model::default()
    }
}

fn weights(pairs: &[(&str, f64)], half_life_days: u64) -> DecayedWeights {
    DecayedWeights {
        weights: pairs
            .iter()
            .map(|(kind, weight)| ((*kind).to_owned(), *weight))
            .collect(),
        half_life: Some(days(half_life_days)),
    }
}

fn stage_rule(
    name: &str,
    description: &str,
    condition: String,
    stage: LifecycleStage,
    acquisition_status: Option<AcquisitionStatus>,
) -> StageRule {
    StageRule {
        name: name.to_owned(),
        description: description.to_owned(),
        condition,
        stage: Some(stage),
        acquisition_status,
    }
}

fn health_rule(name: &str, description: &str, condition: &str, health: Health) -> HealthRule {
    HealthRule {
        name: name.to_owned(),
        description: description.to_owned(),
        condition: condition.to_owned(),
        health: Some(health),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CompiledModel;

    #[test]
    fn passes_its_own_validation() {
        let violations = CompiledModel::validate(&default_model());
        assert!(violations.is_empty(), "{violations:#?}");
    }
}
