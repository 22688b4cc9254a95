//! The customer journey of DESIGN §1 through the engine with the default
//! model and a controllable clock, as the scoring service will drive it:
//! apply a touchpoint and evaluate at its time, or sweep at the next due
//! time.

use chrono::{DateTime, Duration, TimeZone, Utc};
use clm_proto::touchpoint::Channel;
use clm_scoring::{
    AcquisitionStatus, CompiledModel, CustomerFeatures, Evaluation, FeatureValue, Health,
    LifecycleStage, LifecycleState, Money, ProfileFacts, RuleOutcome, TouchpointFacts, Transition,
    default_model,
};

/// What the service stores per customer, and the transitions it recorded.
#[derive(Default)]
struct Customer {
    features: CustomerFeatures,
    state: LifecycleState,
    next_due: Option<DateTime<Utc>>,
    transitions: Vec<Transition>,
    evaluations: Vec<Evaluation>,
}

impl Customer {
    fn evaluate(&mut self, model: &CompiledModel, now: DateTime<Utc>) -> Option<Transition> {
        let evaluation = model.evaluate(&self.features, &self.state, now);
        self.state = evaluation.snapshot.state;
        self.next_due = evaluation.next_evaluation_at;
        self.transitions.extend(evaluation.transition.clone());
        self.evaluations.push(evaluation.clone());
        evaluation.transition
    }

    fn touch(
        &mut self,
        model: &CompiledModel,
        kind: &str,
        channel: Channel,
        at: DateTime<Utc>,
    ) -> Option<Transition> {
        self.features.apply(&TouchpointFacts {
            touchpoint_type: kind,
            channel,
            occurred_at: at,
            revenue: None,
        });
        self.evaluate(model, at)
    }

    fn buy(
        &mut self,
        model: &CompiledModel,
        kind: &str,
        at: DateTime<Utc>,
        euros: i64,
    ) -> Option<Transition> {
        self.features.apply(&TouchpointFacts {
            touchpoint_type: kind,
            channel: Channel::Web,
            occurred_at: at,
            revenue: Some(Money {
                currency_code: "EUR",
                amount_micros: euros * 1_000_000,
            }),
        });
        self.evaluate(model, at)
    }
}

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 1, 1, 10, 0, 0).unwrap()
}

fn day(n: i64) -> DateTime<Utc> {
    start() + Duration::days(n)
}

fn model() -> CompiledModel {
    CompiledModel::compile(default_model()).expect("the default model is valid")
}

#[track_caller]
fn assert_moved(
    transition: Option<Transition>,
    stage_rule: Option<&str>,
    health_rule: Option<&str>,
    to: (
        Option<LifecycleStage>,
        Option<AcquisitionStatus>,
        Option<Health>,
    ),
) -> Transition {
    let transition = transition.expect("a transition");
    assert_eq!(
        transition.stage_rule.as_deref(),
        stage_rule,
        "{transition:#?}"
    );
    assert_eq!(
        transition.health_rule.as_deref(),
        health_rule,
        "{transition:#?}"
    );
    assert_eq!(
        (
            transition.to.stage,
            transition.to.acquisition_status,
            transition.to.health
        ),
        to
    );
    if let Some(rule) = stage_rule {
        assert!(
            transition
                .reason
                .starts_with(&format!("stage rule '{rule}' matched: ")),
            "{}",
            transition.reason
        );
    }
    if let Some(rule) = health_rule {
        assert!(
            transition
                .reason
                .contains(&format!("health rule '{rule}' matched: ")),
            "{}",
            transition.reason
        );
    }
    assert_eq!(transition.model_version, "builtin-1");
    transition
}

use AcquisitionStatus::{Lead, Mql, Sql};
use Health::{Active, AtRisk, Churned};
use LifecycleStage::{Acquisition, Advocacy, Conversion, Loyalty, Reach, Retention};

#[test]
fn scripted_journey_from_reach_to_won_back() {
    let model = model();
    let mut customer = Customer::default();

    // anonymous page views: REACH, and the first health
    let first = customer.touch(&model, "page_view", Channel::Web, day(0));
    let first = assert_moved(
        first,
        Some("reach"),
        Some("active"),
        (Some(Reach), None, Some(Active)),
    );
    assert_eq!(first.from, LifecycleState::new());
    assert_eq!(
        first.reason,
        "stage rule 'reach' matched: true; health rule 'active' matched: true"
    );
    assert_eq!(
        customer.touch(
            &model,
            "page_view",
            Channel::Web,
            day(0) + Duration::minutes(2)
        ),
        None
    );
    assert_eq!(
        customer.touch(
            &model,
            "page_view",
            Channel::Web,
            day(0) + Duration::minutes(5)
        ),
        None
    );

    // a form submit identifies them: LEAD
    customer.features.set_profile(ProfileFacts {
        identified: true,
        company: "Acme".into(),
        ..ProfileFacts::default()
    });
    let lead = customer.touch(&model, "form_submit", Channel::Web, day(1));
    assert_moved(
        lead,
        Some("lead"),
        None,
        (Some(Acquisition), Some(Lead), Some(Active)),
    );
    let lead_score = customer.evaluations.last().unwrap().snapshot.scores.lead;
    assert!(lead_score < 40.0, "{lead_score}");

    // engagement builds the lead score up to the MQL threshold
    assert_eq!(
        customer.touch(&model, "email_click", Channel::Email, day(2)),
        None
    );
    let mql = customer.touch(
        &model,
        "content_download",
        Channel::Web,
        day(2) + Duration::hours(1),
    );
    let mql = assert_moved(
        mql,
        Some("marketing_qualified"),
        None,
        (Some(Acquisition), Some(Mql), Some(Active)),
    );
    assert!(customer.evaluations.last().unwrap().snapshot.scores.lead >= 40.0);
    // a change of acquisition status keeps the stage entry time
    assert_eq!(mql.to.stage_entered_at, Some(day(1)));
    // lead scores decay: while qualifying on score, the sweep comes back
    assert_eq!(
        customer.next_due,
        Some(day(2) + Duration::hours(1) + Duration::days(1))
    );

    // a demo request: SQL
    let sql = customer.touch(&model, "demo_request", Channel::Web, day(5));
    assert_moved(
        sql,
        Some("sales_qualified"),
        None,
        (Some(Acquisition), Some(Sql), Some(Active)),
    );

    // a purchase: CONVERSION
    let conversion = customer.buy(&model, "purchase", day(10), 100);
    assert_moved(
        conversion,
        Some("converted"),
        None,
        (Some(Conversion), None, Some(Active)),
    );
    assert_eq!(customer.state.stage_entered_at, Some(day(10)));
    // only inactivity can move a converted customer now: 61 days after the last touch
    assert_eq!(customer.next_due, Some(day(10) + Duration::days(61)));

    // a renewal: RETENTION
    let retention = customer.buy(&model, "renewal", day(40), 100);
    assert_moved(
        retention,
        Some("retained"),
        None,
        (Some(Retention), None, Some(Active)),
    );

    // more purchases, then tenure: LOYALTY, on time, by the sweep
    assert_eq!(customer.buy(&model, "purchase", day(100), 50), None);
    assert_eq!(
        customer.touch(&model, "product_usage", Channel::Product, day(150)),
        None
    );
    let loyal_at = day(10) + Duration::days(180);
    assert_eq!(
        customer.next_due,
        Some(loyal_at),
        "180 days after conversion"
    );
    assert_eq!(
        customer.evaluate(&model, loyal_at - Duration::seconds(1)),
        None
    );
    let loyalty = customer.evaluate(&model, loyal_at);
    let loyalty = assert_moved(
        loyalty,
        Some("loyal"),
        None,
        (Some(Loyalty), None, Some(Active)),
    );
    assert_eq!(loyalty.at, loyal_at);

    // a referral: ADVOCACY
    let advocacy = customer.touch(&model, "referral", Channel::Referral, day(200));
    assert_moved(
        advocacy,
        Some("advocate"),
        None,
        (Some(Advocacy), None, Some(Active)),
    );

    // 120 days of silence: AT_RISK after 60 whole days, CHURNED after 120
    let at_risk_at = day(200) + Duration::days(61);
    assert_eq!(customer.next_due, Some(at_risk_at));
    assert_eq!(
        customer.evaluate(&model, at_risk_at - Duration::seconds(1)),
        None
    );
    let at_risk = customer.evaluate(&model, at_risk_at);
    let at_risk = assert_moved(
        at_risk,
        None,
        Some("inactive"),
        (Some(Advocacy), None, Some(AtRisk)),
    );
    assert_eq!(at_risk.at, at_risk_at);
    assert_eq!(
        at_risk.reason,
        "health rule 'inactive' matched: days_since_last_touch > 60"
    );

    let churned_at = day(200) + Duration::days(121);
    assert_eq!(customer.next_due, Some(churned_at));
    assert_eq!(
        customer.evaluate(&model, churned_at - Duration::seconds(1)),
        None
    );
    let churned = customer.evaluate(&model, churned_at);
    assert_moved(
        churned,
        None,
        Some("lapsed"),
        (Some(Advocacy), None, Some(Churned)),
    );
    // nothing but activity changes a lapsed customer now
    assert_eq!(customer.next_due, None);
    assert_eq!(customer.evaluate(&model, day(380)), None);

    // a purchase wins them back; the stage stays
    let won_back = customer.buy(&model, "purchase", day(400), 80);
    let won_back = assert_moved(
        won_back,
        None,
        Some("won_back"),
        (Some(Advocacy), None, Some(Active)),
    );
    assert_eq!(won_back.from.health, Some(Churned));
    assert_eq!(
        won_back.reason,
        "health rule 'won_back' matched: health == 'CHURNED'"
    );
    assert_eq!(customer.state.health_entered_at, Some(day(400)));

    let moves: Vec<_> = customer
        .transitions
        .iter()
        .map(|t| {
            (
                t.to.stage.unwrap(),
                t.to.acquisition_status,
                t.to.health.unwrap(),
            )
        })
        .collect();
    assert_eq!(
        moves,
        vec![
            (Reach, None, Active),
            (Acquisition, Some(Lead), Active),
            (Acquisition, Some(Mql), Active),
            (Acquisition, Some(Sql), Active),
            (Conversion, None, Active),
            (Retention, None, Active),
            (Loyalty, None, Active),
            (Advocacy, None, Active),
            (Advocacy, None, AtRisk),
            (Advocacy, None, Churned),
            (Advocacy, None, Active),
        ]
    );
}

#[test]
fn cancellation_churns_until_the_next_purchase() {
    let model = model();
    let mut customer = Customer::default();
    customer.buy(&model, "purchase", day(0), 20);
    let cancelled = customer.touch(&model, "cancellation", Channel::Email, day(3));
    assert_moved(
        cancelled,
        None,
        Some("cancelled"),
        (Some(Conversion), None, Some(Churned)),
    );
    // browsing does not undo a cancellation
    assert_eq!(
        customer.touch(&model, "page_view", Channel::Web, day(4)),
        None
    );
    let back = customer.buy(&model, "renewal", day(9), 20);
    assert_moved(
        back,
        Some("retained"),
        Some("won_back"),
        (Some(Retention), None, Some(Active)),
    );
}

#[test]
fn walk_in_purchase_lands_directly_in_conversion() {
    let model = model();
    let mut customer = Customer::default();
    let conversion = customer.buy(&model, "purchase", day(0), 35);
    let conversion = assert_moved(
        conversion,
        Some("converted"),
        Some("active"),
        (Some(Conversion), None, Some(Active)),
    );
    assert_eq!(conversion.from, LifecycleState::new());
    assert_eq!(customer.transitions.len(), 1);
}

#[test]
fn a_form_and_a_pricing_view_together_settle_in_sql() {
    let model = model();
    let mut customer = Customer::default();
    customer.features.apply(&TouchpointFacts {
        touchpoint_type: "form_submit",
        channel: Channel::Web,
        occurred_at: day(0),
        revenue: None,
    });
    // the form makes a lead, and a lead who views pricing is sales-qualified
    let sql = customer.touch(&model, "pricing_view", Channel::Web, day(0));
    assert_moved(
        sql,
        Some("sales_qualified"),
        Some("active"),
        (Some(Acquisition), Some(Sql), Some(Active)),
    );
}

/// The touchpoints of a journey, in log order.
fn journey_log() -> Vec<(&'static str, Channel, DateTime<Utc>)> {
    vec![
        ("page_view", Channel::Web, day(0)),
        ("ad_click", Channel::Ads, day(0) + Duration::hours(3)),
        ("form_submit", Channel::Web, day(1)),
        ("email_open", Channel::Email, day(3)),
        ("content_download", Channel::Web, day(4)),
        ("pricing_view", Channel::Web, day(6)),
        ("purchase", Channel::Web, day(9)),
        ("support_ticket_opened", Channel::Support, day(20)),
        ("support_ticket_resolved", Channel::Support, day(22)),
        ("renewal", Channel::Email, day(120)),
        ("custom.webinar", Channel::Other, day(130)),
        ("review", Channel::Web, day(140)),
    ]
}

/// Replays the log into an empty store, sweeping whenever a customer is due
/// before the next touchpoint, and storing the features as the service
/// would (serialized).
fn replay(model: &CompiledModel, until: DateTime<Utc>) -> Vec<Evaluation> {
    let mut stored_features = serde_json::to_string(&CustomerFeatures::new()).unwrap();
    let mut customer = Customer::default();
    let mut log = journey_log().into_iter().peekable();
    loop {
        let next_touch = log.peek().map(|(_, _, at)| *at);
        match (customer.next_due, next_touch) {
            (Some(due), touch) if due <= until && touch.is_none_or(|at| due < at) => {
                customer.evaluate(model, due);
            }
            (_, Some(_)) => {
                let (kind, channel, at) = log.next().unwrap();
                customer.features = serde_json::from_str(&stored_features).unwrap();
                customer.touch(model, kind, channel, at);
                stored_features = serde_json::to_string(&customer.features).unwrap();
            }
            _ => return customer.evaluations,
        }
    }
}

#[test]
fn replaying_the_log_gives_the_same_states() {
    let model = model();
    let first = replay(&model, day(500));
    let second = replay(&model, day(500));
    assert_eq!(first, second);
    let last = &first.last().unwrap().snapshot.state;
    assert_eq!((last.stage, last.health), (Some(Advocacy), Some(Churned)));
    // a freshly compiled model decides the same
    assert_eq!(
        replay(&CompiledModel::compile(default_model()).unwrap(), day(500)),
        first
    );
}

#[test]
fn explains_an_evaluation() {
    let model = model();
    let mut customer = Customer::default();
    customer.touch(&model, "page_view", Channel::Web, day(0));
    customer.features.apply(&TouchpointFacts {
        touchpoint_type: "purchase",
        channel: Channel::InPerson,
        occurred_at: day(1),
        revenue: Some(Money {
            currency_code: "EUR",
            amount_micros: 12_500_000,
        }),
    });
    let explanation = model.explain(&customer.features, &customer.state, day(2));
    assert_eq!(
        explanation.evaluation,
        model.evaluate(&customer.features, &customer.state, day(2))
    );

    let applied: Vec<_> = explanation
        .stage_rules
        .iter()
        .filter(|r| r.applied)
        .map(|r| r.rule_name.as_str())
        .collect();
    assert_eq!(applied, ["converted"]);
    assert_eq!(
        explanation.stage_rules.len(),
        default_model().stage_rules.len()
    );
    assert_eq!(explanation.stage_rules[0].outcome, RuleOutcome::NotMatched);
    assert_eq!(
        explanation
            .health_rules
            .iter()
            .filter(|r| r.applied)
            .count(),
        1
    );
    assert_eq!(explanation.fit_rules.len(), 2);

    assert_eq!(
        explanation.features["count.purchase.all"],
        FeatureValue::Int(1)
    );
    assert_eq!(
        explanation.features["count.purchase.7d"],
        FeatureValue::Int(1)
    );
    assert_eq!(
        explanation.features["channel_count.in_person.30d"],
        FeatureValue::Int(1)
    );
    assert_eq!(
        explanation.features["revenue.EUR"],
        FeatureValue::Double(12.5)
    );
    assert_eq!(
        explanation.features["days_since_first_touch"],
        FeatureValue::Int(2)
    );
    assert_eq!(
        explanation.features["stage"],
        FeatureValue::String("REACH".into())
    );

    let engagement = &explanation.scores[0];
    assert_eq!(engagement.by_type[0].touchpoint_type, "purchase");
    assert_eq!(
        engagement.value,
        explanation.evaluation.snapshot.scores.engagement
    );
    assert_eq!(explanation.scores[2].components.len(), 4);

    let message = explanation.to_proto("customer-1");
    assert_eq!(message.stage_rules.len(), explanation.stage_rules.len());
    assert_eq!(
        message.lifecycle.unwrap().stage,
        clm_proto::common::LifecycleStage::Conversion as i32
    );
}
