//! Surveys dispatched from the logs, end to end against the real binary on
//! the embedded default (SQLite) and on PostgreSQL, with "now" moved by the
//! clock files of scoring and feedback: the onboarding journey (a purchase,
//! CONVERSION, a survey seven days later, its response), fatigue, consent,
//! merges, and a kill -9 in the middle of consumption.

#![allow(missing_docs)]

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use clm_proto::common::{
    CustomerReference, IdentityKey, IdentityKeys, IdentityKind, customer_reference,
};
use clm_proto::feedback as pb;
use clm_proto::feedback::survey_service_client::SurveyServiceClient;
use clm_proto::identity as identity_pb;
use clm_proto::identity::customer_service_client::CustomerServiceClient;
use clm_proto::scoring as scoring_pb;
use clm_proto::scoring::lifecycle_service_client::LifecycleServiceClient;
use clm_proto::touchpoint as tp;
use clm_proto::touchpoint::touchpoint_service_client::TouchpointServiceClient;
use clm_tests::ClmServer;
use tonic::transport::Channel;

/// The clock file, in a folder that lives as long as the clock.
struct Clock(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Clock {
    fn new(at: DateTime<Utc>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = Self(dir.path().join("now"), dir);
        clock.set(at);
        clock
    }

    fn set(&self, at: DateTime<Utc>) {
        std::fs::write(&self.0, at.to_rfc3339()).expect("write the clock file");
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CLM_SCORING_CLOCK_FILE", self.0.display().to_string()),
            ("CLM_FEEDBACK_CLOCK_FILE", self.0.display().to_string()),
            ("CLM_FEEDBACK_SWEEP_MS", "50".to_owned()),
        ]
    }
}

enum Mode {
    Embedded,
    Postgres(clm_platform::Secret),
}

impl Mode {
    async fn postgres() -> Option<Self> {
        Some(Self::Postgres(
            clm_tests::fresh_postgres_database("e2e").await?,
        ))
    }

    async fn start(&self, clock: &Clock, data_dir: Option<&std::path::Path>) -> ClmServer {
        let mut env = clock.env();
        if let Self::Postgres(url) = self {
            env.push(("CLM_DATABASE_URL", url.expose().to_owned()));
        }
        if let Some(dir) = data_dir {
            env.push(("CLM_DATA_DIR", dir.display().to_string()));
        }
        ClmServer::start(&["serve"], &env).await.expect("start clm")
    }
}

struct Clients {
    surveys: SurveyServiceClient<Channel>,
    touchpoints: TouchpointServiceClient<Channel>,
    customers: CustomerServiceClient<Channel>,
}

impl Clients {
    async fn of(server: &ClmServer) -> Self {
        let channel = server.channel().await;
        Self {
            surveys: SurveyServiceClient::new(channel.clone()),
            touchpoints: TouchpointServiceClient::new(channel.clone()),
            customers: CustomerServiceClient::new(channel),
        }
    }
}

fn by_email(email: &str) -> Option<CustomerReference> {
    Some(CustomerReference {
        reference: Some(customer_reference::Reference::IdentityKeys(IdentityKeys {
            keys: vec![IdentityKey {
                kind: IdentityKind::Email as i32,
                value: email.into(),
                source: String::new(),
            }],
        })),
    })
}

fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

fn days(n: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: n * 86_400,
        nanos: 0,
    }
}

/// Records one touchpoint; returns the customer's id.
async fn touch(
    clients: &mut Clients,
    event_id: &str,
    email: &str,
    kind: &str,
    at: DateTime<Utc>,
) -> String {
    let revenue = (kind == "purchase").then(|| clm_proto::common::Money {
        currency_code: "EUR".into(),
        amount_micros: 49_000_000,
    });
    clients
        .touchpoints
        .record_touchpoint(tp::RecordTouchpointRequest {
            touchpoint: Some(tp::Touchpoint {
                event_id: event_id.into(),
                customer: by_email(email),
                channel: tp::Channel::Web as i32,
                r#type: kind.into(),
                occur_time: Some(timestamp(at)),
                revenue,
                ..Default::default()
            }),
        })
        .await
        .expect("record touchpoint")
        .into_inner()
        .touchpoint
        .expect("touchpoint")
        .customer_id
}

fn nps_survey(name: &str, trigger: pb::Trigger) -> pb::Survey {
    pb::Survey {
        display_name: name.into(),
        kind: pb::SurveyKind::Nps as i32,
        questions: vec![
            pb::Question {
                id: "recommend".into(),
                text: "How likely are you to recommend us?".into(),
                r#type: pb::QuestionType::Nps as i32,
                required: true,
                ..Default::default()
            },
            pb::Question {
                id: "why".into(),
                text: "Why?".into(),
                r#type: pb::QuestionType::FreeText as i32,
                ..Default::default()
            },
        ],
        triggers: vec![trigger],
        ..Default::default()
    }
}

fn on_touchpoint(kind: &str) -> pb::Trigger {
    pb::Trigger {
        name: "touched".into(),
        source: pb::TriggerSource::Touchpoint as i32,
        condition: format!("event.type == '{kind}'"),
        delay: None,
    }
}

async fn create(clients: &mut Clients, survey: pb::Survey) -> String {
    clients
        .surveys
        .create_survey(pb::CreateSurveyRequest {
            survey: Some(survey),
            request_id: String::new(),
        })
        .await
        .expect("create survey")
        .into_inner()
        .survey
        .expect("survey")
        .id
}

async fn dispatches(clients: &mut Clients, customer_id: &str) -> Vec<pb::Dispatch> {
    clients
        .surveys
        .list_dispatches(pb::ListDispatchesRequest {
            page_size: 1000,
            filter: Some(pb::DispatchFilter {
                customer_id: customer_id.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("list dispatches")
        .into_inner()
        .dispatches
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The dispatches of a customer once `ready` holds for them.
async fn dispatches_when(
    clients: &mut Clients,
    customer_id: &str,
    what: &str,
    ready: impl Fn(&[pb::Dispatch]) -> bool,
) -> Vec<pb::Dispatch> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = dispatches(clients, customer_id).await;
        if ready(&found) {
            return found;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}: {found:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn state(dispatch: &pb::Dispatch) -> (pb::DispatchState, pb::SuppressReason) {
    (
        pb::DispatchState::try_from(dispatch.state).unwrap(),
        pb::SuppressReason::try_from(dispatch.suppress_reason).unwrap(),
    )
}

async fn the_onboarding_journey(mode: Mode) {
    let start = Utc::now() - TimeDelta::days(60);
    let clock = Clock::new(start);
    let server = mode.start(&clock, None).await;
    let mut clients = Clients::of(&server).await;
    let survey = create(
        &mut clients,
        nps_survey(
            "Onboarding",
            pb::Trigger {
                name: "converted".into(),
                source: pb::TriggerSource::Transition as i32,
                condition: "event.to_stage == 'CONVERSION' && event.from_stage != 'CONVERSION'"
                    .into(),
                delay: Some(days(7)),
            },
        ),
    )
    .await;
    let customer = touch(
        &mut clients,
        "journey-purchase",
        "olive@example.org",
        "purchase",
        start,
    )
    .await;
    let scheduled = dispatches_when(&mut clients, &customer, "the scheduled dispatch", |d| {
        !d.is_empty()
    })
    .await;
    assert_eq!(scheduled.len(), 1, "{scheduled:?}");
    let dispatch = scheduled[0].clone();
    assert_eq!(dispatch.survey_id, survey);
    assert_eq!(dispatch.trigger_name, "converted");
    assert_eq!(state(&dispatch).0, pb::DispatchState::Scheduled);
    assert_eq!(
        dispatch.due_time.as_ref().map(|t| t.seconds),
        Some((start + TimeDelta::days(7)).timestamp()),
        "due seven days after the transition"
    );
    // Six days on, it is not due yet; eight days on, it is released.
    clock.set(start + TimeDelta::days(6));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        state(&dispatches(&mut clients, &customer).await[0]).0,
        pb::DispatchState::Scheduled
    );
    clock.set(start + TimeDelta::days(8));
    let released = dispatches_when(&mut clients, &customer, "the release", |d| {
        d.first()
            .is_some_and(|d| state(d).0 == pb::DispatchState::Dispatched)
    })
    .await;
    let released = &released[0];
    assert_eq!(
        released.dispatch_time.as_ref().map(|t| t.seconds),
        Some((start + TimeDelta::days(8)).timestamp())
    );
    assert_eq!(
        released.expire_time.as_ref().map(|t| t.seconds),
        Some((start + TimeDelta::days(22)).timestamp()),
        "the default 14-day window"
    );

    // The answer, recorded once despite three retries.
    let answer = pb::RecordResponseRequest {
        response: Some(pb::SurveyResponse {
            response_id: "olive-onboarding".into(),
            survey_id: survey.clone(),
            dispatch_id: released.id.clone(),
            answers: vec![
                pb::Answer {
                    question_id: "recommend".into(),
                    value: Some(pb::answer::Value::Score(10)),
                    sentiment: None,
                },
                pb::Answer {
                    question_id: "why".into(),
                    value: Some(pb::answer::Value::Text(
                        "Everything worked on the first day, great support.".into(),
                    )),
                    sentiment: None,
                },
            ],
            submit_time: Some(timestamp(start + TimeDelta::days(8))),
            ..Default::default()
        }),
    };
    let first = clients
        .surveys
        .record_response(answer.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate);
    assert_eq!(first.response.as_ref().unwrap().customer_id, customer);
    for _ in 0..3 {
        let retry = clients
            .surveys
            .record_response(answer.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(retry.duplicate);
        assert_eq!(retry.response, first.response);
    }
    let answered = dispatches(&mut clients, &customer).await;
    assert_eq!(state(&answered[0]).0, pb::DispatchState::Responded);
    // A second response to the same dispatch is refused.
    let mut other = answer.clone();
    other.response.as_mut().unwrap().response_id = "olive-again".into();
    let refused = clients.surveys.record_response(other).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists);
    let summary = clients
        .surveys
        .get_survey_summary(pb::GetSurveySummaryRequest {
            survey_id: survey.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((summary.dispatch_count, summary.response_count), (1, 1));
    assert_eq!(summary.response_rate, 1.0);

    // Scoring folds the answer in: the NPS feature, and with the default
    // model a promoter is evidence for ADVOCACY.
    let mut scoring = LifecycleServiceClient::new(server.channel().await);
    let promoted = explained_when(&mut scoring, &customer, "the NPS of 10", |e| {
        int_feature(e, "nps") == Some(10)
    })
    .await;
    assert_eq!(int_feature(&promoted, "days_since_nps"), Some(0));
    let lifecycle = promoted.lifecycle.clone().unwrap();
    assert_eq!(
        lifecycle.stage,
        clm_proto::common::LifecycleStage::Advocacy as i32,
        "{promoted:?}"
    );
    let before = lifecycle.health_score;
    // A later detractor answer, by customer rather than dispatch, lowers
    // health.
    clients
        .surveys
        .record_response(pb::RecordResponseRequest {
            response: Some(pb::SurveyResponse {
                response_id: "olive-later".into(),
                survey_id: survey.clone(),
                customer: Some(CustomerReference {
                    reference: Some(customer_reference::Reference::CustomerId(customer.clone())),
                }),
                answers: vec![pb::Answer {
                    question_id: "recommend".into(),
                    value: Some(pb::answer::Value::Score(3)),
                    sentiment: None,
                }],
                submit_time: Some(timestamp(
                    start + TimeDelta::days(8) + TimeDelta::minutes(2),
                )),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let detracted = explained_when(&mut scoring, &customer, "the NPS of 3", |e| {
        int_feature(e, "nps") == Some(3)
    })
    .await;
    let after = detracted.lifecycle.unwrap().health_score;
    assert!(after < before, "health {before} then {after}");
}

fn int_feature(explained: &scoring_pb::ExplainLifecycleResponse, name: &str) -> Option<i64> {
    match explained.features.get(name)?.kind {
        Some(scoring_pb::feature_value::Kind::IntValue(value)) => Some(value),
        _ => None,
    }
}

/// The explanation of a customer's lifecycle once `ready` holds for it.
async fn explained_when(
    scoring: &mut LifecycleServiceClient<Channel>,
    customer_id: &str,
    what: &str,
    ready: impl Fn(&scoring_pb::ExplainLifecycleResponse) -> bool,
) -> scoring_pb::ExplainLifecycleResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let explained = scoring
            .explain_lifecycle(scoring_pb::ExplainLifecycleRequest {
                customer_id: customer_id.to_owned(),
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner);
        if let Ok(explained) = &explained
            && ready(explained)
        {
            return explained.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {explained:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fatigue_across_surveys(mode: Mode) {
    let start = Utc::now() - TimeDelta::days(60);
    let clock = Clock::new(start);
    let server = mode.start(&clock, None).await;
    let mut clients = Clients::of(&server).await;
    let mut first = nps_survey("Delivery", on_touchpoint("custom.delivery"));
    first.fatigue = Some(pb::FatiguePolicy {
        min_interval: Some(days(1)),
        repeat_interval: None,
    });
    let first = create(&mut clients, first).await;
    let mut second = nps_survey("Delivery, second opinion", on_touchpoint("custom.delivery"));
    second.fatigue = Some(pb::FatiguePolicy {
        min_interval: Some(days(1)),
        repeat_interval: None,
    });
    let second = create(&mut clients, second).await;
    let customer = touch(
        &mut clients,
        "delivery-1",
        "fay@example.org",
        "custom.delivery",
        start,
    )
    .await;
    let settled = dispatches_when(&mut clients, &customer, "both settled", |d| {
        d.len() == 2 && d.iter().all(|d| state(d).0 != pb::DispatchState::Scheduled)
    })
    .await;
    let mut states: Vec<_> = settled
        .iter()
        .map(|d| (d.survey_id.clone(), state(d)))
        .collect();
    states.sort();
    assert_eq!(
        states,
        vec![
            (
                first.clone(),
                (
                    pb::DispatchState::Dispatched,
                    pb::SuppressReason::Unspecified
                )
            ),
            (
                second.clone(),
                (pb::DispatchState::Suppressed, pb::SuppressReason::Fatigue)
            ),
        ],
        "one survey a day: the first due (by id) goes, the other is suppressed"
    );
    // Two days later the interval has passed: the second survey goes, the
    // first is held back by its own 90-day repeat interval.
    let later = start + TimeDelta::days(2);
    clock.set(later);
    touch(
        &mut clients,
        "delivery-2",
        "fay@example.org",
        "custom.delivery",
        later,
    )
    .await;
    let settled = dispatches_when(&mut clients, &customer, "the second round", |d| {
        d.len() == 4 && d.iter().all(|d| state(d).0 != pb::DispatchState::Scheduled)
    })
    .await;
    let round: Vec<_> = settled
        .iter()
        .filter(|d| d.source_entry_id != settled[0].source_entry_id)
        .map(|d| (d.survey_id.clone(), state(d)))
        .collect();
    let mut round = round;
    round.sort();
    assert_eq!(
        round,
        vec![
            (
                first,
                (pb::DispatchState::Suppressed, pb::SuppressReason::Fatigue)
            ),
            (
                second,
                (
                    pb::DispatchState::Dispatched,
                    pb::SuppressReason::Unspecified
                )
            ),
        ]
    );
}

async fn consent_is_required_for_its_purpose(mode: Mode) {
    let start = Utc::now() - TimeDelta::days(60);
    let clock = Clock::new(start);
    let server = mode.start(&clock, None).await;
    let mut clients = Clients::of(&server).await;
    let mut survey = nps_survey("Visits", on_touchpoint("custom.visit"));
    survey.consent_purpose = "surveys".into();
    survey.fatigue = Some(pb::FatiguePolicy {
        min_interval: Some(days(0)),
        repeat_interval: Some(days(0)),
    });
    create(&mut clients, survey).await;
    let customer = touch(
        &mut clients,
        "visit-1",
        "gus@example.org",
        "custom.visit",
        start,
    )
    .await;
    let settled = dispatches_when(&mut clients, &customer, "the suppression", |d| {
        d.first()
            .is_some_and(|d| state(d).0 != pb::DispatchState::Scheduled)
    })
    .await;
    assert_eq!(
        state(&settled[0]),
        (pb::DispatchState::Suppressed, pb::SuppressReason::NoConsent)
    );
    clients
        .customers
        .update_customer(identity_pb::UpdateCustomerRequest {
            customer: Some(identity_pb::Customer {
                id: customer.clone(),
                consents: vec![identity_pb::Consent {
                    purpose: "surveys".into(),
                    status: identity_pb::ConsentStatus::Granted as i32,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["consents".into()],
            }),
            expected_version: 0,
        })
        .await
        .expect("grant consent");
    touch(
        &mut clients,
        "visit-2",
        "gus@example.org",
        "custom.visit",
        start,
    )
    .await;
    let settled = dispatches_when(&mut clients, &customer, "the release", |d| {
        d.len() == 2 && d.iter().all(|d| state(d).0 != pb::DispatchState::Scheduled)
    })
    .await;
    let states: Vec<_> = settled.iter().map(state).collect();
    assert!(
        states.contains(&(pb::DispatchState::Suppressed, pb::SuppressReason::NoConsent))
            && states.contains(&(
                pb::DispatchState::Dispatched,
                pb::SuppressReason::Unspecified
            )),
        "dispatched once GRANTED: {states:?}"
    );
}

async fn paused_and_archived_surveys_send_nothing(mode: Mode) {
    let start = Utc::now() - TimeDelta::days(60);
    let clock = Clock::new(start);
    let server = mode.start(&clock, None).await;
    let mut clients = Clients::of(&server).await;
    let mut later = nps_survey("A month on", on_touchpoint("custom.signup"));
    later.triggers[0].delay = Some(days(30));
    let later = create(&mut clients, later).await;
    let mut soon = nps_survey("Right away", on_touchpoint("custom.signup"));
    soon.fatigue = Some(pb::FatiguePolicy {
        min_interval: Some(days(0)),
        repeat_interval: Some(days(0)),
    });
    soon.triggers[0].delay = Some(days(1));
    let soon = create(&mut clients, soon).await;
    let customer = touch(
        &mut clients,
        "signup-1",
        "hal@example.org",
        "custom.signup",
        start,
    )
    .await;
    dispatches_when(&mut clients, &customer, "both scheduled", |d| d.len() == 2).await;
    // Archived: what it scheduled is suppressed at once.
    clients
        .surveys
        .archive_survey(pb::ArchiveSurveyRequest {
            survey_id: later.clone(),
            expected_version: 0,
        })
        .await
        .unwrap();
    // Paused: what falls due is suppressed.
    clients
        .surveys
        .update_survey(pb::UpdateSurveyRequest {
            survey: Some(pb::Survey {
                id: soon.clone(),
                state: pb::SurveyState::Paused as i32,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["state".into()],
            }),
            expected_version: 0,
        })
        .await
        .unwrap();
    let archived = dispatches(&mut clients, &customer).await;
    let of = |dispatches: &[pb::Dispatch], survey: &str| {
        dispatches
            .iter()
            .find(|d| d.survey_id == survey)
            .map(state)
            .unwrap()
    };
    assert_eq!(
        of(&archived, &later),
        (
            pb::DispatchState::Suppressed,
            pb::SuppressReason::SurveyInactive
        )
    );
    assert_eq!(of(&archived, &soon).0, pb::DispatchState::Scheduled);
    clock.set(start + TimeDelta::days(2));
    let settled = dispatches_when(&mut clients, &customer, "the paused one falls due", |d| {
        d.iter().all(|d| state(d).0 != pb::DispatchState::Scheduled)
    })
    .await;
    assert_eq!(
        of(&settled, &soon),
        (
            pb::DispatchState::Suppressed,
            pb::SuppressReason::SurveyInactive
        )
    );
}

async fn merges_move_dispatches_and_count_for_fatigue(mode: Mode) {
    let start = Utc::now() - TimeDelta::days(60);
    let clock = Clock::new(start);
    let server = mode.start(&clock, None).await;
    let mut clients = Clients::of(&server).await;
    create(
        &mut clients,
        nps_survey("Support", on_touchpoint("support_ticket_resolved")),
    )
    .await;
    let merged = touch(
        &mut clients,
        "ticket-b",
        "bea@example.org",
        "support_ticket_resolved",
        start,
    )
    .await;
    dispatches_when(&mut clients, &merged, "B's release", |d| {
        d.first()
            .is_some_and(|d| state(d).0 == pb::DispatchState::Dispatched)
    })
    .await;
    let survivor = touch(
        &mut clients,
        "signup-a",
        "abe@example.org",
        "page_view",
        start,
    )
    .await;
    clients
        .customers
        .merge_customers(identity_pb::MergeCustomersRequest {
            survivor_id: survivor.clone(),
            merged_id: merged.clone(),
            ..Default::default()
        })
        .await
        .expect("merge");
    let moved = dispatches_when(&mut clients, &survivor, "B's dispatch under A", |d| {
        !d.is_empty()
    })
    .await;
    assert_eq!(moved.len(), 1);
    assert!(dispatches(&mut clients, &merged).await.is_empty());
    // A's own trigger the next day: B's survey counts for fatigue.
    clock.set(start + TimeDelta::days(1));
    touch(
        &mut clients,
        "ticket-a",
        "abe@example.org",
        "support_ticket_resolved",
        start + TimeDelta::days(1),
    )
    .await;
    let settled = dispatches_when(&mut clients, &survivor, "A's suppression", |d| {
        d.len() == 2 && d.iter().all(|d| state(d).0 != pb::DispatchState::Scheduled)
    })
    .await;
    let states: Vec<_> = settled.iter().map(state).collect();
    assert!(
        states.contains(&(pb::DispatchState::Suppressed, pb::SuppressReason::Fatigue)),
        "{states:?}"
    );
}

/// Every dispatch of `survey`, all pages.
async fn all_dispatches(clients: &mut Clients, survey: &str) -> Vec<pb::Dispatch> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = clients
            .surveys
            .list_dispatches(pb::ListDispatchesRequest {
                page_size: 1000,
                page_token: token.clone(),
                filter: Some(pb::DispatchFilter {
                    survey_id: survey.to_owned(),
                    ..Default::default()
                }),
            })
            .await
            .expect("list dispatches")
            .into_inner();
        all.extend(page.dispatches);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

async fn a_kill_mid_consumption_loses_and_doubles_nothing(mode: Mode) {
    const ORDERS: usize = 3_000;
    let start = Utc::now() - TimeDelta::days(60);
    let clock = Clock::new(start);
    let data = tempfile::tempdir().unwrap();
    let with = |services: &'static [&'static str]| {
        let mut env = clock.env();
        if let Mode::Postgres(url) = &mode {
            env.push(("CLM_DATABASE_URL", url.expose().to_owned()));
        }
        env.push(("CLM_DATA_DIR", data.path().display().to_string()));
        if !services.is_empty() && !services.contains(&"feedback") {
            // Scoring follows feedback's log: nothing answers here while
            // feedback is down, and its consumer waits.
            env.push(("CLM_FEEDBACK_URL", "http://127.0.0.1:9".to_owned()));
        }
        async move {
            let mut args = vec!["serve"];
            args.extend(services);
            ClmServer::start(&args, &env).await.expect("start clm")
        }
    };
    // The survey first, then the orders while feedback is not running, so
    // that it has a backlog to consume when it starts.
    let server = with(&[]).await;
    let mut clients = Clients::of(&server).await;
    let mut survey = nps_survey("Every order", on_touchpoint("custom.order"));
    survey.fatigue = Some(pb::FatiguePolicy {
        min_interval: Some(days(0)),
        repeat_interval: Some(days(0)),
    });
    let survey = create(&mut clients, survey).await;
    server.signal("TERM");
    drop(server);
    let server = with(&["identity", "touchpoints", "scoring"]).await;
    let mut clients = Clients::of(&server).await;
    let touchpoints: Vec<tp::Touchpoint> = (0..ORDERS)
        .map(|i| tp::Touchpoint {
            event_id: format!("order-{i}"),
            customer: by_email(&format!("buyer-{}@example.org", i % 50)),
            channel: tp::Channel::Web as i32,
            r#type: "custom.order".into(),
            occur_time: Some(timestamp(start - TimeDelta::seconds((ORDERS - i) as i64))),
            ..Default::default()
        })
        .collect();
    for chunk in touchpoints.chunks(1000) {
        clients
            .touchpoints
            .record_touchpoints(tp::RecordTouchpointsRequest {
                touchpoints: chunk.to_vec(),
            })
            .await
            .expect("record");
    }
    server.signal("TERM");
    drop(server);

    // Feedback consumes the backlog; it is killed as soon as part of it is
    // stored.
    let mut server = with(&[]).await;
    let clients = Clients::of(&server).await;
    let seen = eventually("the first dispatches", || {
        let mut clients = Clients {
            surveys: clients.surveys.clone(),
            touchpoints: clients.touchpoints.clone(),
            customers: clients.customers.clone(),
        };
        let survey = survey.clone();
        async move {
            let count = all_dispatches(&mut clients, &survey).await.len();
            (count > 0).then_some(count)
        }
    })
    .await;
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(10)).await;
    drop(server);
    eprintln!("killed with {seen} of {ORDERS} dispatches stored");

    let server = with(&[]).await;
    let mut clients = Clients::of(&server).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let all = loop {
        let all = all_dispatches(&mut clients, &survey).await;
        if all.len() >= ORDERS
            && all
                .iter()
                .all(|d| state(d).0 != pb::DispatchState::Scheduled)
        {
            break all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {ORDERS} dispatches after the restart",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(all.len(), ORDERS, "one dispatch per order, none twice");
    let sources: std::collections::HashSet<_> = all.iter().map(|d| &d.source_entry_id).collect();
    assert_eq!(sources.len(), ORDERS);
    // Each released once: the log holds one release per dispatch.
    let mut log = clients
        .surveys
        .stream_feedback_log(pb::StreamFeedbackLogRequest {
            stop_at_end: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut released = std::collections::HashMap::new();
    while let Some(batch) = log.message().await.unwrap() {
        for entry in batch.entries {
            if let Some(pb::feedback_log_entry::Change::DispatchChanged(changed)) = entry.change {
                let dispatch = changed.dispatch.unwrap();
                if dispatch.state == pb::DispatchState::Dispatched as i32 {
                    *released.entry(dispatch.id).or_insert(0) += 1;
                }
            }
        }
    }
    assert_eq!(released.len(), ORDERS);
    assert!(
        released.values().all(|count| *count == 1),
        "a release logged twice"
    );
}

macro_rules! on_both_modes {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Mode::Embedded).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(mode) = super::Mode::postgres().await else { return };
                    super::$name(mode).await;
                }
            )*
        }
    };
}

on_both_modes!(
    the_onboarding_journey,
    fatigue_across_surveys,
    consent_is_required_for_its_purpose,
    paused_and_archived_surveys_send_nothing,
    merges_move_dispatches_and_count_for_fatigue,
    a_kill_mid_consumption_loses_and_doubles_nothing,
);
