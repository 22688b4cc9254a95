//! The scoring API end to end against the real binary: a customer's whole
//! journey (with a controllable clock for the silence), a walk-in buyer,
//! invalid models, activation with a rescore, a merge, replaying the
//! touchpoint log into an empty store, and a consumer killed mid-batch.

#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Duration as TimeDelta, Utc};
use clm_proto::common::{
    CustomerReference, IdentityKey, IdentityKeys, IdentityKind, LifecycleStage, Money,
    customer_reference,
};
use clm_proto::identity as identity_pb;
use clm_proto::identity::customer_service_client::CustomerServiceClient;
use clm_proto::scoring as pb;
use clm_proto::scoring::lifecycle_service_client::LifecycleServiceClient;
use clm_proto::touchpoint as tp;
use clm_proto::touchpoint::touchpoint_service_client::TouchpointServiceClient;
use clm_tests::{ClmServer, details};
use tonic::Code;
use tonic::transport::Channel;

/// The clients of one process serving everything.
struct Clients {
    identity: CustomerServiceClient<Channel>,
    touchpoints: TouchpointServiceClient<Channel>,
    scoring: LifecycleServiceClient<Channel>,
}

impl Clients {
    async fn of(server: &ClmServer) -> Self {
        let channel = server.channel().await;
        Self {
            identity: CustomerServiceClient::new(channel.clone()),
            touchpoints: TouchpointServiceClient::new(channel.clone()),
            scoring: LifecycleServiceClient::new(channel),
        }
    }
}

fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

fn key(kind: IdentityKind, value: &str) -> Option<CustomerReference> {
    Some(CustomerReference {
        reference: Some(customer_reference::Reference::IdentityKeys(IdentityKeys {
            keys: vec![IdentityKey {
                kind: kind as i32,
                value: value.to_owned(),
                source: String::new(),
            }],
        })),
    })
}

fn anonymous(cookie: &str) -> Option<CustomerReference> {
    key(IdentityKind::AnonymousId, cookie)
}

fn touchpoint(
    event_id: &str,
    customer: Option<CustomerReference>,
    kind: &str,
    at: DateTime<Utc>,
) -> tp::Touchpoint {
    let revenue = matches!(kind, "purchase" | "renewal").then(|| Money {
        currency_code: "EUR".to_owned(),
        amount_micros: 49_000_000,
    });
    tp::Touchpoint {
        event_id: event_id.to_owned(),
        customer,
        channel: tp::Channel::Web as i32,
        r#type: kind.to_owned(),
        occur_time: Some(timestamp(at)),
        revenue,
        ..Default::default()
    }
}

/// The id of the customer identity holds under one key.
async fn customer_with_key(
    mut identity: CustomerServiceClient<Channel>,
    kind: IdentityKind,
    value: String,
) -> String {
    identity
        .resolve_customer(identity_pb::ResolveCustomerRequest {
            keys: vec![IdentityKey {
                kind: kind as i32,
                value,
                source: String::new(),
            }],
            ..Default::default()
        })
        .await
        .expect("resolve")
        .into_inner()
        .customer
        .expect("a customer")
        .id
}

/// Records touchpoints; returns the customer id of the last.
async fn record(clients: &mut Clients, touchpoints: Vec<tp::Touchpoint>) -> String {
    let response = clients
        .touchpoints
        .record_touchpoints(tp::RecordTouchpointsRequest { touchpoints })
        .await
        .expect("record touchpoints")
        .into_inner();
    assert_eq!(
        response.rejected_count, 0,
        "rejected: {:?}",
        response.results
    );
    response
        .results
        .last()
        .map(|r| r.customer_id.clone())
        .unwrap_or_default()
}

/// Polls `probe` until it returns `Some`, for up to 30 seconds.
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn lifecycle(clients: &mut Clients, customer: &str) -> Option<pb::CustomerLifecycle> {
    clients
        .scoring
        .get_lifecycle(pb::GetLifecycleRequest {
            customer_id: customer.to_owned(),
        })
        .await
        .ok()
        .and_then(|r| r.into_inner().lifecycle)
}

/// The lifecycle snapshot on identity's profile of the customer.
async fn profile_lifecycle(
    mut identity: CustomerServiceClient<Channel>,
    customer: String,
) -> Option<clm_proto::common::LifecycleSnapshot> {
    identity
        .get_customer(identity_pb::GetCustomerRequest {
            customer_id: customer,
        })
        .await
        .ok()?
        .into_inner()
        .customer?
        .lifecycle
}

/// Waits until the customer is in `stage`/`status`/`health` on scoring and
/// on identity's profile; returns the lifecycle.
async fn wait_for(
    clients: &mut Clients,
    customer: &str,
    stage: LifecycleStage,
    status: clm_proto::common::AcquisitionStatus,
    health: clm_proto::common::Health,
) -> pb::CustomerLifecycle {
    let what = format!("{customer} in {stage:?}/{status:?}/{health:?}");
    let found = eventually(&what, || {
        let mut scoring = clients.scoring.clone();
        let customer = customer.to_owned();
        async move {
            let lifecycle = scoring
                .get_lifecycle(pb::GetLifecycleRequest {
                    customer_id: customer,
                })
                .await
                .ok()?
                .into_inner()
                .lifecycle?;
            let snapshot = lifecycle.lifecycle.as_ref()?;
            (snapshot.stage == stage as i32
                && snapshot.acquisition_status == status as i32
                && snapshot.health == health as i32)
                .then_some(lifecycle)
        }
    })
    .await;
    // The snapshot reaches identity's profile too.
    let expected = found.lifecycle.clone().expect("a snapshot");
    eventually(&format!("identity's profile of {what}"), || {
        let profile = profile_lifecycle(clients.identity.clone(), customer.to_owned());
        let expected = expected.clone();
        async move {
            let profile = profile.await?;
            (profile.stage == expected.stage
                && profile.acquisition_status == expected.acquisition_status
                && profile.health == expected.health)
                .then_some(())
        }
    })
    .await;
    found
}

fn last_transition(lifecycle: &pb::CustomerLifecycle) -> &pb::Transition {
    lifecycle.last_transition.as_ref().expect("a transition")
}

struct ClockFile(PathBuf);

impl ClockFile {
    fn set(&self, at: DateTime<Utc>) {
        std::fs::write(&self.0, at.to_rfc3339()).expect("write the clock file");
    }
}

use clm_proto::common::AcquisitionStatus as Status;
use clm_proto::common::Health;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_customer_journey_from_reach_to_won_back() {
    let clock_dir = tempfile::tempdir().unwrap();
    let clock = ClockFile(clock_dir.path().join("now"));
    let start = Utc::now() - TimeDelta::days(700);
    clock.set(start);
    let server = ClmServer::start(
        &["serve"],
        &[
            ("CLM_SCORING_CLOCK_FILE", clock.0.display().to_string()),
            ("CLM_SCORING_SWEEP_POLL_MS", "100".to_owned()),
        ],
    )
    .await
    .expect("start clm");
    let mut clients = Clients::of(&server).await;
    let day = |n: i64| start + TimeDelta::days(n);
    let visitor = || anonymous("journey-cookie");

    // Anonymous page views: REACH.
    let customer = record(
        &mut clients,
        (0..3)
            .map(|i| {
                touchpoint(
                    &format!("j-view-{i}"),
                    visitor(),
                    "page_view",
                    day(0) + TimeDelta::minutes(i),
                )
            })
            .collect(),
    )
    .await;
    let reached = wait_for(
        &mut clients,
        &customer,
        LifecycleStage::Reach,
        Status::Unspecified,
        Health::Active,
    )
    .await;
    assert_eq!(last_transition(&reached).stage_rule, "reach");
    assert_eq!(
        last_transition(&reached).from_stage,
        0,
        "the first transition has no from stage"
    );

    // Each step: touchpoints (type, how many, on which day), then the stage
    // and status expected and the rule that must have moved the customer.
    let steps: [(&str, i64, i64, LifecycleStage, Status, &str); 7] = [
        // A form: LEAD.
        (
            "form_submit",
            1,
            1,
            LifecycleStage::Acquisition,
            Status::Lead,
            "lead",
        ),
        // Enough engagement: MQL.
        (
            "content_download",
            3,
            2,
            LifecycleStage::Acquisition,
            Status::Mql,
            "marketing_qualified",
        ),
        // A demo request: SQL.
        (
            "demo_request",
            1,
            3,
            LifecycleStage::Acquisition,
            Status::Sql,
            "sales_qualified",
        ),
        // A purchase: CONVERSION.
        (
            "purchase",
            1,
            4,
            LifecycleStage::Conversion,
            Status::Unspecified,
            "converted",
        ),
        // A renewal: RETENTION.
        (
            "renewal",
            1,
            40,
            LifecycleStage::Retention,
            Status::Unspecified,
            "retained",
        ),
        // More purchases and tenure: LOYALTY.
        (
            "purchase",
            1,
            200,
            LifecycleStage::Loyalty,
            Status::Unspecified,
            "loyal",
        ),
        // A referral: ADVOCACY.
        (
            "referral",
            1,
            210,
            LifecycleStage::Advocacy,
            Status::Unspecified,
            "advocate",
        ),
    ];
    let mut previous = (LifecycleStage::Reach as i32, Status::Unspecified as i32);
    let mut advocate = None;
    for (kind, count, on_day, stage, status, rule) in steps {
        record(
            &mut clients,
            (0..count)
                .map(|i| {
                    touchpoint(
                        &format!("j-{kind}-{on_day}-{i}"),
                        visitor(),
                        kind,
                        day(on_day) + TimeDelta::hours(i),
                    )
                })
                .collect(),
        )
        .await;
        let now = wait_for(&mut clients, &customer, stage, status, Health::Active).await;
        let moved = last_transition(&now);
        assert_eq!(moved.stage_rule, rule);
        assert_eq!((moved.from_stage, moved.from_acquisition_status), previous);
        assert!(
            moved.reason.contains(&format!("'{rule}'")),
            "{}",
            moved.reason
        );
        assert_eq!(moved.cause, pb::TransitionCause::Touchpoint as i32);
        assert!(!moved.touchpoint_id.is_empty());
        if status == Status::Mql {
            assert!(now.lifecycle.as_ref().unwrap().lead_score >= 40.0);
        }
        previous = (stage as i32, status as i32);
        advocate = Some(now);
    }
    let advocate = advocate.expect("the journey ran");
    let due = advocate
        .next_evaluation_time
        .expect("a silent customer is due later");
    assert!(due.seconds > timestamp(day(210)).seconds);

    // 61 days of silence: AT_RISK, by the sweep.
    clock.set(day(210) + TimeDelta::days(61) + TimeDelta::hours(1));
    let at_risk = wait_for(
        &mut clients,
        &customer,
        LifecycleStage::Advocacy,
        Status::Unspecified,
        Health::AtRisk,
    )
    .await;
    let moved = last_transition(&at_risk);
    assert_eq!(moved.health_rule, "inactive");
    assert_eq!(moved.stage_rule, "", "the stage did not move");
    assert_eq!(moved.cause, pb::TransitionCause::Sweep as i32);
    assert!(
        moved.reason.contains("days_since_last_touch > 60"),
        "{}",
        moved.reason
    );

    // 121 days: CHURNED.
    clock.set(day(210) + TimeDelta::days(121) + TimeDelta::hours(1));
    let churned = wait_for(
        &mut clients,
        &customer,
        LifecycleStage::Advocacy,
        Status::Unspecified,
        Health::Churned,
    )
    .await;
    assert_eq!(last_transition(&churned).health_rule, "lapsed");
    assert_eq!(last_transition(&churned).from_health, Health::AtRisk as i32);

    // A purchase wins them back.
    clock.set(day(333) + TimeDelta::hours(1));
    record(
        &mut clients,
        vec![touchpoint("j-buy-3", visitor(), "purchase", day(333))],
    )
    .await;
    let won_back = wait_for(
        &mut clients,
        &customer,
        LifecycleStage::Advocacy,
        Status::Unspecified,
        Health::Active,
    )
    .await;
    assert_eq!(last_transition(&won_back).health_rule, "won_back");
    assert_eq!(
        last_transition(&won_back).from_health,
        Health::Churned as i32
    );

    // The whole history, oldest first, every move with its reason.
    let history = clients
        .scoring
        .list_transitions(pb::ListTransitionsRequest {
            customer_id: customer.clone(),
            ..Default::default()
        })
        .await
        .expect("list transitions")
        .into_inner()
        .transitions;
    let stages: Vec<i32> = history.iter().map(|t| t.to_stage).collect();
    let healths: Vec<i32> = history.iter().map(|t| t.to_health).collect();
    // The 160 silent days between the renewal (day 40) and the purchase
    // of day 200 left the customer at risk, then churned, at the times
    // those moves became due, though the touchpoints arrived together.
    assert_eq!(history.len(), 13, "{history:#?}");
    assert_eq!(stages[0], LifecycleStage::Reach as i32);
    assert_eq!(stages[12], LifecycleStage::Advocacy as i32);
    for (moved, silent_days, health) in [
        (&history[6], 61, Health::AtRisk),
        (&history[7], 121, Health::Churned),
    ] {
        assert_eq!(moved.to_health, health as i32);
        assert_eq!(moved.cause, pb::TransitionCause::Sweep as i32);
        assert_eq!(
            moved.transition_time.unwrap().seconds,
            timestamp(day(40) + TimeDelta::days(silent_days)).seconds,
            "due in event time, not when the sweep ran"
        );
    }
    assert_eq!(history[8].to_stage, LifecycleStage::Loyalty as i32);
    assert_eq!(history[8].to_health, Health::Active as i32);
    assert_eq!(
        &healths[10..],
        [
            Health::AtRisk as i32,
            Health::Churned as i32,
            Health::Active as i32
        ]
    );
    assert!(
        history
            .iter()
            .all(|t| !t.reason.is_empty() && t.model_version == "builtin-1")
    );
    assert!(
        history.windows(2).all(|w| w[0].transition_time.unwrap().seconds <= w[1].transition_time.unwrap().seconds),
        "transitions are in time order"
    );

    // The explanation names the rules and the top touchpoints.
    let explanation = clients
        .scoring
        .explain_lifecycle(pb::ExplainLifecycleRequest {
            customer_id: customer.clone(),
            top_touchpoints: 3,
            ..Default::default()
        })
        .await
        .expect("explain")
        .into_inner();
    let applied: Vec<&str> = explanation
        .stage_rules
        .iter()
        .filter(|r| r.applied)
        .map(|r| r.rule_name.as_str())
        .collect();
    assert_eq!(applied, ["advocate"]);
    assert!(
        explanation
            .stage_rules
            .iter()
            .any(|r| r.outcome == pb::RuleOutcome::NotMatched as i32)
    );
    let engagement = explanation
        .scores
        .iter()
        .find(|s| s.score == pb::ScoreKind::Engagement as i32)
        .expect("the engagement score");
    assert_eq!(engagement.top_touchpoints.len(), 3);
    assert_eq!(
        engagement.top_touchpoints[0].r#type, "purchase",
        "the latest purchase weighs most"
    );
    assert!(!engagement.by_type.is_empty());
    assert!(matches!(
        explanation
            .features
            .get("count.purchase.all")
            .and_then(|v| v.kind.clone()),
        Some(pb::feature_value::Kind::IntValue(3))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_walk_in_purchase_lands_in_conversion() {
    let server = ClmServer::start(&["serve"], &[]).await.expect("start clm");
    let mut clients = Clients::of(&server).await;
    let customer = record(
        &mut clients,
        vec![touchpoint(
            "walk-in",
            key(IdentityKind::Email, "walkin@example.com"),
            "purchase",
            Utc::now(),
        )],
    )
    .await;
    let converted = wait_for(
        &mut clients,
        &customer,
        LifecycleStage::Conversion,
        Status::Unspecified,
        Health::Active,
    )
    .await;
    let first = last_transition(&converted);
    assert_eq!(first.from_stage, 0);
    assert_eq!(first.stage_rule, "converted");

    // A page view changes the scores alone: the profile gets them too, in
    // the next round of score pushes.
    record(
        &mut clients,
        vec![touchpoint(
            "walk-in-browses",
            key(IdentityKind::Email, "walkin@example.com"),
            "page_view",
            Utc::now(),
        )],
    )
    .await;
    let engagement = converted
        .lifecycle
        .as_ref()
        .expect("a snapshot")
        .engagement_score;
    let rescored = eventually("the page view's scores on scoring", || {
        let mut scoring = clients.scoring.clone();
        let customer = customer.clone();
        async move {
            let now = scoring
                .get_lifecycle(pb::GetLifecycleRequest {
                    customer_id: customer,
                })
                .await
                .ok()?
                .into_inner()
                .lifecycle?
                .lifecycle?;
            (now.engagement_score > engagement).then_some(now)
        }
    })
    .await;
    assert_eq!(rescored.stage, LifecycleStage::Conversion as i32);
    eventually("the page view's scores on identity's profile", || {
        let profile = profile_lifecycle(clients.identity.clone(), customer.clone());
        let expected = rescored.clone();
        async move {
            let profile = profile.await?;
            (profile.engagement_score == expected.engagement_score
                && profile.lead_score == expected.lead_score
                && profile.evaluated_at == expected.evaluated_at)
                .then_some(())
        }
    })
    .await;

    // Evaluate now changes nothing and records no transition.
    let evaluated = clients
        .scoring
        .evaluate(pb::EvaluateRequest {
            customer_id: customer.clone(),
        })
        .await
        .expect("evaluate")
        .into_inner();
    assert!(evaluated.transition.is_none());
    assert_eq!(
        evaluated.lifecycle.unwrap().lifecycle.unwrap().stage,
        LifecycleStage::Conversion as i32
    );
    // Unknown and malformed customers.
    let unknown = clients
        .scoring
        .get_lifecycle(pb::GetLifecycleRequest {
            customer_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let bad = clients
        .scoring
        .evaluate(pb::EvaluateRequest {
            customer_id: "nope".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(details(&bad).0[0].0, "customer_id");
}

fn model_with_stage_rules(version: &str, rules: &[(&str, &str)]) -> pb::Model {
    pb::Model {
        version: version.to_owned(),
        description: "test model".to_owned(),
        engagement: Some(pb::EngagementScoreConfig {
            weights: Some(pb::DecayedWeights {
                weights: [("page_view".to_owned(), 1.0)].into(),
                half_life: Some(prost_types::Duration {
                    seconds: 30 * 86_400,
                    nanos: 0,
                }),
            }),
        }),
        lead: Some(pb::LeadScoreConfig {
            behaviour: Some(pb::DecayedWeights {
                weights: [("page_view".to_owned(), 5.0)].into(),
                half_life: None,
            }),
            fit_rules: Vec::new(),
            mql_threshold: 40.0,
            sql_threshold: 70.0,
        }),
        health: Some(pb::HealthScoreConfig {
            recency_weight: 1.0,
            ..Default::default()
        }),
        stage_rules: rules
            .iter()
            .map(|(name, condition)| pb::StageRule {
                name: (*name).to_owned(),
                condition: (*condition).to_owned(),
                stage: if *name == "everyone_leads" {
                    LifecycleStage::Acquisition as i32
                } else {
                    LifecycleStage::Reach as i32
                },
                acquisition_status: if *name == "everyone_leads" {
                    Status::Lead as i32
                } else {
                    0
                },
                ..Default::default()
            })
            .collect(),
        health_rules: vec![pb::HealthRule {
            name: "always_active".to_owned(),
            condition: "true".to_owned(),
            health: Health::Active as i32,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_models_are_rejected_with_the_rule_named() {
    let server = ClmServer::start(
        &["serve", "scoring", "identity", "touchpoints", "feedback"],
        &[],
    )
    .await
    .expect("start clm");
    let mut clients = Clients::of(&server).await;
    let bad = model_with_stage_rules(
        "bad-1",
        &[
            ("broken_syntax", "count['purchase']['all'] >="),
            ("unknown_feature", "favourite_colour == 'blue'"),
            ("not_a_bool", "days_since_last_touch + 1"),
            ("fine", "true"),
        ],
    );
    let rejected = clients
        .scoring
        .create_model(pb::CreateModelRequest {
            model: Some(bad.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(rejected.code(), Code::InvalidArgument);
    let (fields, _) = details(&rejected);
    let named: BTreeMap<&str, &str> = fields
        .iter()
        .map(|(f, d)| (f.as_str(), d.as_str()))
        .collect();
    assert!(
        named["model.stage_rules[0].condition"].contains("broken_syntax"),
        "{named:?}"
    );
    assert!(
        named["model.stage_rules[1].condition"].contains("unknown_feature"),
        "{named:?}"
    );
    assert!(
        named["model.stage_rules[2].condition"].contains("not_a_bool"),
        "{named:?}"
    );
    assert_eq!(named.len(), 3, "{named:?}");

    let validated = clients
        .scoring
        .validate_model(pb::ValidateModelRequest {
            source: Some(pb::validate_model_request::Source::Model(bad)),
        })
        .await
        .expect("validate")
        .into_inner();
    assert!(!validated.valid);
    let reasons: Vec<(&str, i32)> = validated
        .violations
        .iter()
        .map(|v| (v.rule_name.as_str(), v.reason))
        .collect();
    assert_eq!(
        reasons,
        [
            (
                "broken_syntax",
                pb::ModelViolationReason::SyntaxError as i32
            ),
            (
                "unknown_feature",
                pb::ModelViolationReason::UnknownFeature as i32
            ),
            ("not_a_bool", pb::ModelViolationReason::WrongType as i32),
        ]
    );
    // Nothing was stored.
    let models = clients
        .scoring
        .list_models(pb::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    assert!(models[0].built_in);
    let missing = clients
        .scoring
        .get_model(pb::GetModelRequest {
            version: "bad-1".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    // A model without a version is named too.
    let unnamed = clients
        .scoring
        .create_model(pb::CreateModelRequest {
            model: Some(model_with_stage_rules("", &[("fine", "true")])),
        })
        .await
        .unwrap_err();
    assert_eq!(details(&unnamed).0[0].0, "model.version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn activating_a_model_rescores_everyone() {
    let server = ClmServer::start(&["serve"], &[]).await.expect("start clm");
    let mut clients = Clients::of(&server).await;
    let mut customers = Vec::new();
    for i in 0..30 {
        customers.push(
            record(
                &mut clients,
                vec![touchpoint(
                    &format!("r-{i}"),
                    anonymous(&format!("rescore-{i}")),
                    "page_view",
                    Utc::now(),
                )],
            )
            .await,
        );
    }
    for customer in &customers {
        wait_for(
            &mut clients,
            customer,
            LifecycleStage::Reach,
            Status::Unspecified,
            Health::Active,
        )
        .await;
    }
    let model = model_with_stage_rules(
        "leads-2",
        &[("everyone_leads", "count['page_view']['all'] >= 1")],
    );
    let created = clients
        .scoring
        .create_model(pb::CreateModelRequest {
            model: Some(model.clone()),
        })
        .await
        .expect("create")
        .into_inner()
        .model
        .unwrap();
    assert_eq!(created.state, pb::ModelState::Inactive as i32);
    // The same content again is a safe retry; other content is refused.
    clients
        .scoring
        .create_model(pb::CreateModelRequest {
            model: Some(model.clone()),
        })
        .await
        .expect("a retry");
    let mut changed = model.clone();
    changed.description = "something else".to_owned();
    let exists = clients
        .scoring
        .create_model(pb::CreateModelRequest {
            model: Some(changed),
        })
        .await
        .unwrap_err();
    assert_eq!(exists.code(), Code::AlreadyExists);
    // A stale expectation changes nothing.
    let stale = clients
        .scoring
        .activate_model(pb::ActivateModelRequest {
            version: "leads-2".to_owned(),
            expected_active_version: "leads-1".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);

    let activated = clients
        .scoring
        .activate_model(pb::ActivateModelRequest {
            version: "leads-2".to_owned(),
            expected_active_version: "builtin-1".to_owned(),
        })
        .await
        .expect("activate")
        .into_inner();
    let rescore = activated.rescore.expect("a rescore started");
    assert_eq!(rescore.trigger, pb::RescoreTrigger::Activation as i32);
    assert_eq!(rescore.total_count, 30);
    let finished = eventually("the rescore to finish", || {
        let mut scoring = clients.scoring.clone();
        let id = rescore.id.clone();
        async move {
            let rescore = scoring
                .get_rescore(pb::GetRescoreRequest { rescore_id: id })
                .await
                .ok()?
                .into_inner()
                .rescore?;
            (rescore.state == pb::RescoreState::Succeeded as i32).then_some(rescore)
        }
    })
    .await;
    assert_eq!(finished.done_count, 30);
    assert_eq!(finished.changed_count, 30);
    assert!(finished.end_time.is_some());
    for customer in &customers {
        let lead = wait_for(
            &mut clients,
            customer,
            LifecycleStage::Acquisition,
            Status::Lead,
            Health::Active,
        )
        .await;
        let moved = last_transition(&lead);
        assert_eq!(moved.cause, pb::TransitionCause::Rescore as i32);
        assert_eq!(moved.model_version, "leads-2");
        assert_eq!(moved.stage_rule, "everyone_leads");
    }
    // Activating it again starts nothing.
    let again = clients
        .scoring
        .activate_model(pb::ActivateModelRequest {
            version: "leads-2".to_owned(),
            ..Default::default()
        })
        .await
        .expect("activate again")
        .into_inner();
    assert!(again.rescore.is_none());
    // New touchpoints use the new model at once.
    let newcomer = record(
        &mut clients,
        vec![touchpoint(
            "r-new",
            anonymous("rescore-new"),
            "page_view",
            Utc::now(),
        )],
    )
    .await;
    let lead = wait_for(
        &mut clients,
        &newcomer,
        LifecycleStage::Acquisition,
        Status::Lead,
        Health::Active,
    )
    .await;
    assert_eq!(last_transition(&lead).model_version, "leads-2");

    // `clm rescore` starts a manual rescore and follows it to the end.
    let output = tokio::process::Command::new(clm_tests::clm_binary())
        .args(["rescore", "--address", &server.endpoint()])
        .output()
        .await
        .expect("run clm rescore");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("succeeded"), "{stdout}");
    assert!(stdout.contains("31/31"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merge_combines_two_customers_in_different_stages() {
    let server = ClmServer::start(&["serve"], &[]).await.expect("start clm");
    let mut clients = Clients::of(&server).await;
    let now = Utc::now();
    let lead = record(
        &mut clients,
        vec![touchpoint(
            "m-1",
            key(IdentityKind::Email, "merge-lead@example.com"),
            "form_submit",
            now,
        )],
    )
    .await;
    wait_for(
        &mut clients,
        &lead,
        LifecycleStage::Acquisition,
        Status::Lead,
        Health::Active,
    )
    .await;
    let buyer = record(
        &mut clients,
        vec![
            touchpoint("m-2", anonymous("merge-cookie"), "page_view", now),
            touchpoint(
                "m-3",
                anonymous("merge-cookie"),
                "purchase",
                now + TimeDelta::seconds(1),
            ),
        ],
    )
    .await;
    wait_for(
        &mut clients,
        &buyer,
        LifecycleStage::Conversion,
        Status::Unspecified,
        Health::Active,
    )
    .await;

    clients
        .identity
        .merge_customers(identity_pb::MergeCustomersRequest {
            survivor_id: lead.clone(),
            merged_id: buyer.clone(),
            reason: "same person".to_owned(),
            requested_by: "test".to_owned(),
        })
        .await
        .expect("merge");
    let merged = wait_for(
        &mut clients,
        &lead,
        LifecycleStage::Conversion,
        Status::Unspecified,
        Health::Active,
    )
    .await;
    // The survivor's history is derived again from both customers'
    // touchpoints: it converted with the purchase, at the purchase's time.
    let moved = last_transition(&merged);
    assert_eq!(moved.cause, pb::TransitionCause::Touchpoint as i32);
    assert_eq!(moved.from_stage, LifecycleStage::Acquisition as i32);
    let purchased = timestamp(now + TimeDelta::seconds(1));
    let at = moved.transition_time.expect("a transition time");
    assert_eq!(
        (at.seconds, at.nanos / 1000),
        (purchased.seconds, purchased.nanos / 1000),
        "stored to the microsecond"
    );
    // The merged customer's id answers with the survivor.
    let through_merged = lifecycle(&mut clients, &buyer)
        .await
        .expect("the survivor's lifecycle");
    assert_eq!(through_merged.customer_id, lead);
    // Features add up: one page view, one form, one purchase.
    let explanation = clients
        .scoring
        .explain_lifecycle(pb::ExplainLifecycleRequest {
            customer_id: lead.clone(),
            ..Default::default()
        })
        .await
        .expect("explain")
        .into_inner();
    for (feature, count) in [
        ("count.page_view.all", 1),
        ("count.form_submit.all", 1),
        ("count.purchase.all", 1),
    ] {
        assert!(
            matches!(explanation.features.get(feature).and_then(|v| v.kind.clone()), Some(pb::feature_value::Kind::IntValue(n)) if n == count),
            "{feature}: {:?}",
            explanation.features.get(feature)
        );
    }
    // A later touchpoint of the merged customer's cookie counts once, for
    // the survivor.
    record(
        &mut clients,
        vec![touchpoint(
            "m-4",
            anonymous("merge-cookie"),
            "renewal",
            now + TimeDelta::seconds(2),
        )],
    )
    .await;
    wait_for(
        &mut clients,
        &lead,
        LifecycleStage::Retention,
        Status::Unspecified,
        Health::Active,
    )
    .await;
}

/// Customer lifecycles and transitions as comparable values (without the
/// ids and record times that differ between runs; see [`bare`]).
async fn states_of(
    scoring: &mut LifecycleServiceClient<Channel>,
    customers: &[String],
) -> Vec<(pb::CustomerLifecycle, Vec<pb::Transition>)> {
    let mut states = Vec::new();
    for customer in customers {
        let mut lifecycle = scoring
            .get_lifecycle(pb::GetLifecycleRequest {
                customer_id: customer.clone(),
            })
            .await
            .expect("get lifecycle")
            .into_inner()
            .lifecycle
            .unwrap();
        if let Some(t) = lifecycle.last_transition.as_mut() {
            bare(t);
        }
        states.push((lifecycle, moves_of(scoring, customer).await));
    }
    states
}

/// The scoring service alone, following `upstream`'s identity and
/// touchpoints, on its own PostgreSQL database.
/// `clm serve identity touchpoints` on `database`, and clients of it.
async fn identity_and_touchpoints(database: &clm_platform::Secret) -> (ClmServer, Clients) {
    let upstream = ClmServer::start(
        &["serve", "identity", "touchpoints"],
        &[("CLM_DATABASE_URL", database.expose().to_owned())],
    )
    .await
    .expect("start clm");
    let clients = Clients {
        identity: CustomerServiceClient::new(upstream.channel().await),
        touchpoints: TouchpointServiceClient::new(upstream.channel().await),
        scoring: LifecycleServiceClient::new(upstream.channel().await),
    };
    (upstream, clients)
}

async fn scoring_alone(upstream: &ClmServer, database: &clm_platform::Secret) -> ClmServer {
    scoring_with(upstream, database, &[]).await
}

/// `clm serve scoring` on `database`, calling `upstream`, with `more`
/// settings.
async fn scoring_with(
    upstream: &ClmServer,
    database: &clm_platform::Secret,
    more: &[(&str, String)],
) -> ClmServer {
    let mut env = vec![
        ("CLM_SCORING_DATABASE_URL", database.expose().to_owned()),
        ("CLM_IDENTITY_URL", upstream.endpoint()),
        ("CLM_TOUCHPOINTS_URL", upstream.endpoint()),
        // Not served there: scoring's feedback consumer waits, retrying.
        ("CLM_FEEDBACK_URL", upstream.endpoint()),
    ];
    env.extend(more.iter().cloned());
    ClmServer::start(&["serve", "scoring"], &env)
        .await
        .expect("start clm serve scoring")
}

/// A mixed history for `count` anonymous customers over the last days.
fn history(count: usize, per_customer: usize) -> Vec<tp::Touchpoint> {
    const KINDS: &[&str] = &[
        "page_view",
        "ad_click",
        "form_submit",
        "content_download",
        "email_click",
        "pricing_view",
        "demo_request",
        "purchase",
        "product_usage",
        "support_ticket_opened",
        "renewal",
        "referral",
    ];
    let start = Utc::now() - TimeDelta::days(20);
    let mut touchpoints = Vec::new();
    for round in 0..per_customer {
        for customer in 0..count {
            let kind = KINDS[(customer * 7 + round * 3) % KINDS.len()];
            let at = start + TimeDelta::hours((round * 9 + customer) as i64);
            touchpoints.push(touchpoint(
                &format!("h-{customer}-{round}"),
                anonymous(&format!("history-{customer}")),
                if round == 0 { "page_view" } else { kind },
                at,
            ));
        }
    }
    touchpoints
}

async fn caught_up(
    scoring: &mut LifecycleServiceClient<Channel>,
    customers: &[String],
    touchpoints: i64,
) {
    eventually("scoring to read every touchpoint", || {
        let mut scoring = scoring.clone();
        let customers = customers.to_vec();
        async move {
            let mut total = 0;
            for customer in &customers {
                let explanation = scoring
                    .explain_lifecycle(pb::ExplainLifecycleRequest {
                        customer_id: customer.clone(),
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner();
                total += explanation
                    .features
                    .iter()
                    .filter(|(name, _)| name.starts_with("count.") && name.ends_with(".all"))
                    .map(|(_, value)| match value.kind {
                        Some(pb::feature_value::Kind::IntValue(n)) => n,
                        _ => 0,
                    })
                    .sum::<i64>();
            }
            assert!(
                total <= touchpoints,
                "counted {total} of {touchpoints} touchpoints: some twice"
            );
            (total == touchpoints).then_some(())
        }
    })
    .await;
}

async fn record_history(
    clients: &mut Clients,
    customers: usize,
    per_customer: usize,
) -> Vec<String> {
    for chunk in history(customers, per_customer).chunks(500) {
        record(clients, chunk.to_vec()).await;
    }
    let mut ids = Vec::new();
    for customer in 0..customers {
        let value = format!("history-{customer}");
        ids.push(
            customer_with_key(clients.identity.clone(), IdentityKind::AnonymousId, value).await,
        );
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaying_the_touchpoint_log_gives_the_same_states() {
    let Some(first_db) = clm_platform::testing::fresh_postgres_database("scoring_replay").await
    else {
        return;
    };
    let second_db = clm_platform::testing::fresh_postgres_database("scoring_replay")
        .await
        .expect("a second database");
    let upstream = ClmServer::start(
        &["serve"],
        &[("CLM_DATABASE_URL", first_db.expose().to_owned())],
    )
    .await
    .expect("start clm");
    let mut clients = Clients::of(&upstream).await;
    let customers = record_history(&mut clients, 25, 12).await;
    caught_up(&mut clients.scoring, &customers, 25 * 12).await;
    let live = states_of(&mut clients.scoring, &customers).await;
    assert!(
        live.iter().any(|(_, transitions)| transitions.len() > 2),
        "the history moves customers"
    );

    let replay = scoring_alone(&upstream, &second_db).await;
    let mut replayed = LifecycleServiceClient::new(replay.channel().await);
    caught_up(&mut replayed, &customers, 25 * 12).await;
    let again = states_of(&mut replayed, &customers).await;
    assert_eq!(live, again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_killed_mid_batch_counts_nothing_twice() {
    let Some(upstream_db) = clm_platform::testing::fresh_postgres_database("scoring_crash").await
    else {
        return;
    };
    let scoring_db = clm_platform::testing::fresh_postgres_database("scoring_crash")
        .await
        .expect("a second database");
    let (upstream, mut clients) = identity_and_touchpoints(&upstream_db).await;
    let customers = record_history(&mut clients, 40, 50).await;
    // Kill the consumer with SIGKILL while it works through the log, again
    // and again, then let it finish.
    for delay_ms in [150_u64, 400, 900, 250] {
        let mut scoring = scoring_alone(&upstream, &scoring_db).await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        scoring.signal("KILL");
        scoring
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("killed");
    }
    let scoring = scoring_alone(&upstream, &scoring_db).await;
    let mut client = LifecycleServiceClient::new(scoring.channel().await);
    caught_up(&mut client, &customers, 40 * 50).await;
    // Every customer's first transition is recorded once.
    for (_, transitions) in states_of(&mut client, &customers).await {
        assert_eq!(transitions.iter().filter(|t| t.from_stage == 0).count(), 1);
    }
}

/// A customer's transitions without what differs between two customers with
/// the same history (ids, record times, touchpoint and customer ids).
async fn moves_of(
    scoring: &mut LifecycleServiceClient<Channel>,
    customer: &str,
) -> Vec<pb::Transition> {
    let mut transitions = scoring
        .list_transitions(pb::ListTransitionsRequest {
            customer_id: customer.to_owned(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list transitions")
        .into_inner()
        .transitions;
    transitions.iter_mut().for_each(bare);
    transitions
}

/// A transition without its ids and record time.
fn bare(t: &mut pb::Transition) {
    t.id.clear();
    t.record_time = None;
    t.touchpoint_id.clear();
    t.customer_id.clear();
}

/// How many retractions the transition log holds.
async fn retractions(scoring: &mut LifecycleServiceClient<Channel>) -> usize {
    let mut stream = scoring
        .stream_transitions(pb::StreamTransitionsRequest {
            stop_at_end: true,
            ..Default::default()
        })
        .await
        .expect("stream transitions")
        .into_inner();
    let mut count = 0;
    while let Some(response) = stream.message().await.expect("a log batch") {
        count += response
            .entries
            .iter()
            .filter(|e| {
                matches!(
                    e.change,
                    Some(pb::transition_log_entry::Change::Retracted(_))
                )
            })
            .count();
    }
    count
}

/// Fourteen touchpoints over 250 days: (day, type).
const IMPORTED: &[(i64, &str)] = &[
    (0, "page_view"),
    (1, "page_view"),
    (4, "form_submit"),
    (9, "content_download"),
    (10, "content_download"),
    (11, "content_download"),
    (15, "pricing_view"),
    (18, "demo_request"),
    (30, "purchase"),
    (75, "product_usage"),
    (120, "renewal"),
    (160, "purchase"),
    (200, "purchase"),
    (250, "referral"),
];

/// Imports the same history for two customers, one touchpoint per call
/// (each folded, swept and evaluated at "now" before the next) and in one
/// call, and expects the same transitions at the touchpoints' own dates.
async fn import_one_by_one_and_in_one_batch(env: &[(&str, String)]) {
    let clock_dir = tempfile::tempdir().unwrap();
    let clock = ClockFile(clock_dir.path().join("now"));
    let now = Utc::now();
    clock.set(now);
    let mut env = env.to_vec();
    env.push(("CLM_SCORING_CLOCK_FILE", clock.0.display().to_string()));
    env.push(("CLM_SCORING_SWEEP_POLL_MS", "50".to_owned()));
    let server = ClmServer::start(&["serve"], &env).await.expect("start clm");
    let mut clients = Clients::of(&server).await;
    let start = now - TimeDelta::days(260);
    let imported = |who: &str| -> Vec<tp::Touchpoint> {
        IMPORTED
            .iter()
            .enumerate()
            .map(|(i, (day, kind))| {
                touchpoint(
                    &format!("import-{who}-{i}"),
                    key(IdentityKind::Email, &format!("import-{who}@example.com")),
                    kind,
                    start + TimeDelta::days(*day),
                )
            })
            .collect()
    };

    let mut trickled = String::new();
    for (i, touchpoint) in imported("trickle").into_iter().enumerate() {
        trickled = record(&mut clients, vec![touchpoint]).await;
        caught_up(
            &mut clients.scoring,
            std::slice::from_ref(&trickled),
            i as i64 + 1,
        )
        .await;
        // An explicit evaluation at "now" after each: what used to stamp
        // every later move with today.
        clients
            .scoring
            .evaluate(pb::EvaluateRequest {
                customer_id: trickled.clone(),
            })
            .await
            .expect("evaluate");
    }
    let batched = record(&mut clients, imported("batch")).await;
    caught_up(
        &mut clients.scoring,
        std::slice::from_ref(&batched),
        IMPORTED.len() as i64,
    )
    .await;
    for customer in [&trickled, &batched] {
        clients
            .scoring
            .evaluate(pb::EvaluateRequest {
                customer_id: customer.clone(),
            })
            .await
            .expect("evaluate");
    }

    let one_by_one = moves_of(&mut clients.scoring, &trickled).await;
    let in_one_batch = moves_of(&mut clients.scoring, &batched).await;
    assert_eq!(one_by_one, in_one_batch);
    // Every move of the funnel at the date of the touchpoint that made it.
    let day_of =
        |t: &pb::Transition| (t.transition_time.unwrap().seconds - start.timestamp()) / 86_400;
    let funnel: Vec<(i32, i32, i64)> = in_one_batch
        .iter()
        .filter(|t| {
            (t.from_stage, t.from_acquisition_status) != (t.to_stage, t.to_acquisition_status)
        })
        .map(|t| (t.to_stage, t.to_acquisition_status, day_of(t)))
        .collect();
    let acquisition = LifecycleStage::Acquisition as i32;
    assert_eq!(
        funnel,
        [
            // Identified by e-mail from the first page view.
            (acquisition, Status::Lead as i32, 0),
            // The third download lifts the lead score past 40.
            (acquisition, Status::Mql as i32, 11),
            // The pricing page lifts it past 70.
            (acquisition, Status::Sql as i32, 15),
            (LifecycleStage::Conversion as i32, 0, 30),
            (LifecycleStage::Retention as i32, 0, 120),
            // Tenure: the sweep's move, at the day it became due.
            (LifecycleStage::Loyalty as i32, 0, 210),
            (LifecycleStage::Advocacy as i32, 0, 250),
        ],
        "{in_one_batch:#?}"
    );
    assert!(
        retractions(&mut clients.scoring).await > 0,
        "the late touchpoints replaced moves made without them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn imported_history_is_the_same_one_by_one_or_in_one_batch() {
    import_one_by_one_and_in_one_batch(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn imported_history_is_the_same_one_by_one_or_in_one_batch_on_postgres() {
    let Some(db) = clm_platform::testing::fresh_postgres_database("scoring_import").await else {
        return;
    };
    import_one_by_one_and_in_one_batch(&[("CLM_DATABASE_URL", db.expose().to_owned())]).await;
}

/// Customers with a history sent one touchpoint per call in no order
/// (backdated and current, identified and anonymous), profiles changed
/// midway, one customer merged into another and one erased, a fixed "now"
/// a day later: a second scoring replaying the logs from zero derives the
/// same transitions for every customer.
async fn trickle_then_replay(live_env: &[(&str, String)], replay_env: &[(&str, String)]) {
    const CUSTOMERS: usize = 30;
    const KINDS: &[&str] = &[
        "page_view",
        "form_submit",
        "content_download",
        "pricing_view",
        "demo_request",
        "purchase",
        "product_usage",
        "renewal",
    ];
    let clock_dir = tempfile::tempdir().unwrap();
    let clock = ClockFile(clock_dir.path().join("now"));
    let wall = Utc::now();
    clock.set(wall + TimeDelta::days(1));
    let clock_env = [
        ("CLM_SCORING_CLOCK_FILE", clock.0.display().to_string()),
        ("CLM_SCORING_SWEEP_POLL_MS", "50".to_owned()),
    ];
    let mut env = live_env.to_vec();
    env.extend(clock_env.iter().cloned());
    let upstream = ClmServer::start(&["serve"], &env).await.expect("start clm");
    let mut clients = Clients::of(&upstream).await;

    let mut touchpoints = Vec::new();
    for customer in 0..CUSTOMERS {
        let who = if customer % 2 == 0 {
            key(
                IdentityKind::Email,
                &format!("trickle-{customer}@example.com"),
            )
        } else {
            anonymous(&format!("trickle-{customer}"))
        };
        for k in 0..8usize {
            let at = if k < 6 {
                wall - TimeDelta::days(200 - 33 * k as i64) + TimeDelta::hours(customer as i64)
            } else {
                wall - TimeDelta::minutes((10 * (8 - k) + customer) as i64)
            };
            let kind = KINDS[(customer * 3 + k * 5) % KINDS.len()];
            touchpoints.push(touchpoint(
                &format!("trickle-{customer}-{k}"),
                who.clone(),
                kind,
                at,
            ));
        }
    }
    // A fixed shuffle: many touchpoints arrive after later ones.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for i in (1..touchpoints.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        touchpoints.swap(i, (state % (i as u64 + 1)) as usize);
    }
    let half = touchpoints.len() / 2;
    let mut customers = std::collections::BTreeSet::new();
    for (sent, touchpoint) in touchpoints.into_iter().enumerate() {
        customers.insert(record(&mut clients, vec![touchpoint]).await);
        if sent == half {
            // Half of the identified customers now work for a known company.
            for customer in (0..CUSTOMERS).step_by(4) {
                let email = format!("trickle-{customer}@example.com");
                let id =
                    customer_with_key(clients.identity.clone(), IdentityKind::Email, email).await;
                clients
                    .identity
                    .update_customer(identity_pb::UpdateCustomerRequest {
                        customer: Some(identity_pb::Customer {
                            id,
                            company: "Acme".to_owned(),
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["company".to_owned()],
                        }),
                        expected_version: 0,
                    })
                    .await
                    .expect("update the company");
            }
        }
    }
    let customers: Vec<String> = customers.into_iter().collect();
    assert_eq!(customers.len(), CUSTOMERS);
    let total = (CUSTOMERS * 8) as i64;
    caught_up(&mut clients.scoring, &customers, total).await;

    // One identified customer merged into another, one erased.
    let id_of = |n: usize| {
        let email = format!("trickle-{n}@example.com");
        customer_with_key(clients.identity.clone(), IdentityKind::Email, email)
    };
    let (survivor, merged, erased) = (id_of(0).await, id_of(2).await, id_of(6).await);
    clients
        .identity
        .merge_customers(identity_pb::MergeCustomersRequest {
            survivor_id: survivor.clone(),
            merged_id: merged.clone(),
            reason: "same person".to_owned(),
            requested_by: "test".to_owned(),
        })
        .await
        .expect("merge");
    clients
        .identity
        .erase_customer(identity_pb::EraseCustomerRequest {
            customer_id: erased,
            reason: "test".to_owned(),
            requested_by: "test".to_owned(),
        })
        .await
        .expect("erase");
    // The merged customer's history is now the survivor's: its own moves
    // are retracted, so that it counts once.
    eventually("the merged customer's moves to be retracted", || {
        let mut scoring = clients.scoring.clone();
        let merged = merged.clone();
        async move {
            moves_of(&mut scoring, &merged)
                .await
                .is_empty()
                .then_some(())
        }
    })
    .await;
    // Its id answers with the survivor: count the touchpoints once.
    let counted: Vec<String> = customers
        .iter()
        .filter(|c| **c != merged)
        .cloned()
        .collect();
    caught_up(&mut clients.scoring, &counted, total).await;

    let mut env = replay_env.to_vec();
    env.extend(clock_env.iter().cloned());
    env.push(("CLM_IDENTITY_URL", upstream.endpoint()));
    env.push(("CLM_TOUCHPOINTS_URL", upstream.endpoint()));
    env.push(("CLM_FEEDBACK_URL", upstream.endpoint()));
    let replay = ClmServer::start(&["serve", "scoring"], &env)
        .await
        .expect("start clm serve scoring");
    let mut replayed = LifecycleServiceClient::new(replay.channel().await);
    caught_up(&mut replayed, &counted, total).await;

    // Both sides settle (profiles are read, due moves made); then every
    // customer's history is the same: every transition, the position and
    // the next due time. (Live, a snapshot may have been evaluated later,
    // since a snapshot never goes back in time; its scores are then as of
    // that time.)
    let histories = |states: Vec<(pb::CustomerLifecycle, Vec<pb::Transition>)>| {
        states
            .into_iter()
            .map(|(lifecycle, transitions)| {
                let snapshot = lifecycle.lifecycle.unwrap_or_default();
                let position = (snapshot.stage, snapshot.acquisition_status, snapshot.health);
                (position, lifecycle.next_evaluation_time, transitions)
            })
            .collect::<Vec<_>>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (live, again) = loop {
        let live = histories(states_of(&mut clients.scoring, &customers).await);
        let again = histories(states_of(&mut replayed, &customers).await);
        if live == again || tokio::time::Instant::now() > deadline {
            break (live, again);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for ((customer, live), again) in customers.iter().zip(&live).zip(&again) {
        assert_eq!(live, again, "customer {customer}: live, then replayed");
    }
    let longest = live.iter().map(|(_, _, t)| t.len()).max().unwrap_or(0);
    assert!(
        longest >= 3,
        "the history moves customers: {longest} moves at most"
    );
    assert!(
        retractions(&mut clients.scoring).await > 0,
        "late touchpoints replaced moves live"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_trickle_and_a_replay_give_the_same_history() {
    trickle_then_replay(&[], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_trickle_and_a_replay_give_the_same_history_on_postgres() {
    let Some(live) = clm_platform::testing::fresh_postgres_database("scoring_trickle").await else {
        return;
    };
    let replay = clm_platform::testing::fresh_postgres_database("scoring_trickle")
        .await
        .expect("a second database");
    trickle_then_replay(
        &[("CLM_DATABASE_URL", live.expose().to_owned())],
        &[("CLM_SCORING_DATABASE_URL", replay.expose().to_owned())],
    )
    .await;
}

/// How long a scoring replica's shard lease lasts in the replica tests.
const LEASE_MS: u64 = 2000;

/// A scoring replica on `database` dividing 8 shards with the others.
async fn scoring_replica(upstream: &ClmServer, database: &clm_platform::Secret) -> ClmServer {
    let lease = [
        ("CLM_SCORING_LOG_SHARDS", "8".to_owned()),
        ("CLM_SHARD_LEASE_MS", LEASE_MS.to_string()),
        // Three replicas beside the other tests: leave PostgreSQL
        // connections for them.
        ("CLM_SCORING_DB_CONNECTIONS", "4".to_owned()),
    ];
    scoring_with(upstream, database, &lease).await
}

/// The shards of the scoring database's touchpoint log each process (by
/// pid) holds an unexpired lease on.
async fn lease_holders(connection: &mut sqlx::PgConnection) -> BTreeMap<u32, Vec<i32>> {
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT owner, shard_index FROM scoring.shard_leases \
         WHERE lease_group = 'scoring.shards' AND shard_count = 8 AND owner <> '' \
           AND expires_at > clock_timestamp() ORDER BY shard_index",
    )
    .fetch_all(connection)
    .await
    .expect("read the shard leases");
    let mut holders: BTreeMap<u32, Vec<i32>> = BTreeMap::new();
    for (owner, shard) in rows {
        // The owner is "<host>/<pid>/<instance>".
        let pid = owner
            .split('/')
            .nth(1)
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("an owner without a pid: {owner}"));
        holders.entry(pid).or_default().push(shard);
    }
    holders
}

/// Waits until exactly `replicas` hold every one of the 8 shards, each
/// its fair share; returns how long that took.
async fn split_among(database: &clm_platform::Secret, replicas: &[&ClmServer]) -> Duration {
    use sqlx::Connection as _;
    let mut connection = sqlx::PgConnection::connect(database.expose())
        .await
        .expect("connect to the scoring database");
    let started = tokio::time::Instant::now();
    let pids: Vec<u32> = replicas.iter().map(|r| r.pid()).collect();
    let share = 8_usize.div_ceil(pids.len());
    let mut last = BTreeMap::new();
    while started.elapsed() < Duration::from_secs(30) {
        last = lease_holders(&mut connection).await;
        let held: usize = last.values().map(Vec::len).sum();
        let fair = last.len() == pids.len()
            && pids.iter().all(|pid| {
                last.get(pid)
                    .is_some_and(|shards| shards.len() <= share && shards.len() + 1 >= share)
            });
        if held == 8 && fair {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the 8 shards were never split among {pids:?}: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_split_the_shards_and_take_over_from_a_killed_or_frozen_one() {
    let Some(upstream_db) =
        clm_platform::testing::fresh_postgres_database("scoring_replicas").await
    else {
        return;
    };
    let scoring_db = clm_platform::testing::fresh_postgres_database("scoring_replicas")
        .await
        .expect("a second database");
    let (upstream, mut clients) = identity_and_touchpoints(&upstream_db).await;
    let first = scoring_replica(&upstream, &scoring_db).await;
    let second = scoring_replica(&upstream, &scoring_db).await;
    let third = scoring_replica(&upstream, &scoring_db).await;
    split_among(&scoring_db, &[&first, &second, &third]).await;
    let mut scoring = LifecycleServiceClient::new(first.channel().await);
    // `history` names touchpoints by customer and round, so a longer
    // history of the same customers only adds the later rounds.
    let customers = record_history(&mut clients, 30, 10).await;
    caught_up(&mut scoring, &customers, 30 * 10).await;

    // SIGKILL: the killed replica's shards are taken over once its leases
    // expire (a lease and the third of one between renewals at most).
    let mut third = third;
    third.signal("KILL");
    third
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("killed");
    let taken_over = split_among(&scoring_db, &[&first, &second]).await;
    let bound = Duration::from_millis(LEASE_MS + LEASE_MS / 3 + 1000);
    assert!(
        taken_over <= bound,
        "the killed replica's shards were taken over after {taken_over:?}"
    );
    record_history(&mut clients, 30, 20).await;
    caught_up(&mut scoring, &customers, 30 * 20).await;

    // SIGSTOP past the lease: the frozen replica's shards go to the other,
    // touchpoints keep flowing, and after SIGCONT it finds its leases
    // taken: it commits nothing under them and takes its share again.
    second.signal("STOP");
    split_among(&scoring_db, &[&first]).await;
    record_history(&mut clients, 30, 30).await;
    caught_up(&mut scoring, &customers, 30 * 30).await;
    second.signal("CONT");
    split_among(&scoring_db, &[&first, &second]).await;
    record_history(&mut clients, 30, 40).await;
    caught_up(&mut scoring, &customers, 30 * 40).await;
    let mut other = LifecycleServiceClient::new(second.channel().await);
    caught_up(&mut other, &customers, 30 * 40).await;
    assert!(
        second.log().contains("shard lease lost"),
        "the frozen replica did not notice it lost its leases:\n{}",
        second.log()
    );
    // Every customer's first transition is recorded once.
    for (_, transitions) in states_of(&mut scoring, &customers).await {
        assert_eq!(transitions.iter().filter(|t| t.from_stage == 0).count(), 1);
    }
}
