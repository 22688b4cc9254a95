//! The feedback API end to end against the real binary, on the embedded
//! default (SQLite) and on PostgreSQL: surveys and their versions, the
//! refusal of bad surveys and bad answers with the field named, responses
//! recorded once whatever the retries, their sentiment, the summary and the
//! feedback log.

#![allow(missing_docs)]

use clm_proto::common::{
    CustomerReference, IdentityKey, IdentityKeys, IdentityKind, customer_reference,
};
use clm_proto::feedback as pb;
use clm_proto::feedback::survey_service_client::SurveyServiceClient;
use clm_proto::identity as identity_pb;
use clm_proto::identity::customer_service_client::CustomerServiceClient;
use clm_tests::{ClmServer, details, violation_reasons};
use tonic::Code;
use tonic::transport::Channel;

type Surveys = SurveyServiceClient<Channel>;

async fn embedded() -> ClmServer {
    ClmServer::start(&["serve"], &[]).await.expect("start clm")
}

async fn on_postgres() -> Option<ClmServer> {
    let database = clm_tests::fresh_postgres_database("e2e").await?;
    Some(
        ClmServer::start(
            &["serve"],
            &[("CLM_DATABASE_URL", database.expose().to_owned())],
        )
        .await
        .expect("start clm"),
    )
}

fn question(id: &str, kind: pb::QuestionType, required: bool) -> pb::Question {
    pb::Question {
        id: id.into(),
        text: format!("Question {id}"),
        r#type: kind as i32,
        required,
        ..Default::default()
    }
}

fn onboarding_survey() -> pb::Survey {
    pb::Survey {
        display_name: "Onboarding".into(),
        kind: pb::SurveyKind::Nps as i32,
        questions: vec![
            question("recommend", pb::QuestionType::Nps, true),
            question("why", pb::QuestionType::FreeText, false),
            pb::Question {
                choices: vec!["price".into(), "support".into(), "product".into()],
                ..question("best", pb::QuestionType::MultipleChoice, false)
            },
            pb::Question {
                scale_min: 1,
                scale_max: 10,
                ..question("ease", pb::QuestionType::Rating, false)
            },
        ],
        triggers: vec![pb::Trigger {
            name: "converted".into(),
            source: pb::TriggerSource::Transition as i32,
            condition: "event.to_stage == 'CONVERSION' && event.from_stage != 'CONVERSION'".into(),
            delay: Some(prost_types::Duration {
                seconds: 7 * 86_400,
                nanos: 0,
            }),
        }],
        consent_purpose: "surveys".into(),
        ..Default::default()
    }
}

async fn create(client: &mut Surveys, survey: pb::Survey, request_id: &str) -> pb::Survey {
    client
        .create_survey(pb::CreateSurveyRequest {
            survey: Some(survey),
            request_id: request_id.into(),
        })
        .await
        .expect("create survey")
        .into_inner()
        .survey
        .expect("survey")
}

async fn new_customer(channel: Channel, email: &str) -> String {
    CustomerServiceClient::new(channel)
        .create_customer(identity_pb::CreateCustomerRequest {
            customer: Some(identity_pb::Customer {
                emails: vec![email.into()],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect("create customer")
        .into_inner()
        .customer
        .expect("customer")
        .id
}

fn by_id(id: &str) -> Option<CustomerReference> {
    Some(CustomerReference {
        reference: Some(customer_reference::Reference::CustomerId(id.into())),
    })
}

fn score(question_id: &str, value: i32) -> pb::Answer {
    pb::Answer {
        question_id: question_id.into(),
        value: Some(pb::answer::Value::Score(value)),
        sentiment: None,
    }
}

fn text(question_id: &str, value: &str) -> pb::Answer {
    pb::Answer {
        question_id: question_id.into(),
        value: Some(pb::answer::Value::Text(value.into())),
        sentiment: None,
    }
}

fn response(
    survey_id: &str,
    response_id: &str,
    customer: &str,
    answers: Vec<pb::Answer>,
) -> pb::RecordResponseRequest {
    pb::RecordResponseRequest {
        response: Some(pb::SurveyResponse {
            response_id: response_id.into(),
            survey_id: survey_id.into(),
            customer: by_id(customer),
            answers,
            ..Default::default()
        }),
    }
}

async fn surveys_are_versioned_paused_and_archived(server: ClmServer) {
    let mut client = Surveys::new(server.channel().await);
    let created = create(&mut client, onboarding_survey(), "onboarding-1").await;
    assert_eq!(created.version, 1);
    assert_eq!(created.state, pb::SurveyState::Active as i32);
    assert_eq!(
        created.response_window.as_ref().map(|d| d.seconds),
        Some(14 * 86_400),
        "the default window"
    );
    assert_eq!(
        created
            .fatigue
            .as_ref()
            .and_then(|f| f.min_interval.as_ref())
            .map(|d| d.seconds),
        Some(14 * 86_400)
    );
    let retried = create(&mut client, onboarding_survey(), "onboarding-1").await;
    assert_eq!(retried.id, created.id, "a retry returns the first survey");
    let fetched = client
        .get_survey(pb::GetSurveyRequest {
            survey_id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .survey
        .unwrap();
    assert_eq!(fetched, created);

    let update = |survey: pb::Survey, paths: &[&str], expected_version| pb::UpdateSurveyRequest {
        survey: Some(survey),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
        expected_version,
    };
    let paused = client
        .update_survey(update(
            pb::Survey {
                id: created.id.clone(),
                display_name: "Onboarding, paused".into(),
                state: pb::SurveyState::Paused as i32,
                ..Default::default()
            },
            &["display_name", "state"],
            1,
        ))
        .await
        .unwrap()
        .into_inner()
        .survey
        .unwrap();
    assert_eq!(
        (paused.version, paused.state),
        (2, pb::SurveyState::Paused as i32)
    );
    assert_eq!(paused.questions, created.questions, "unmasked fields stay");
    let stale = client
        .update_survey(update(
            pb::Survey {
                id: created.id.clone(),
                display_name: "Lost update".into(),
                ..Default::default()
            },
            &["display_name"],
            1,
        ))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(details(&stale).1.as_deref(), Some("VERSION_CONFLICT"));
    let listed = client
        .list_surveys(pb::ListSurveysRequest {
            filter: Some(pb::SurveyFilter {
                state: pb::SurveyState::Paused as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .surveys
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>(),
        vec![created.id.as_str()]
    );
    let archived = client
        .archive_survey(pb::ArchiveSurveyRequest {
            survey_id: created.id.clone(),
            expected_version: 2,
        })
        .await
        .unwrap()
        .into_inner()
        .survey
        .unwrap();
    assert_eq!(archived.state, pb::SurveyState::Archived as i32);
    assert!(archived.archive_time.is_some());
    let again = client
        .archive_survey(pb::ArchiveSurveyRequest {
            survey_id: created.id.clone(),
            expected_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .survey
        .unwrap();
    assert_eq!(
        again, archived,
        "archiving an archived survey changes nothing"
    );
    let refused = client
        .update_survey(update(
            pb::Survey {
                id: created.id.clone(),
                display_name: "Too late".into(),
                ..Default::default()
            },
            &["display_name"],
            0,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(details(&refused).1.as_deref(), Some("SURVEY_ARCHIVED"));
    let missing = client
        .get_survey(pb::GetSurveyRequest {
            survey_id: "0190c2a8-1b2c-7d3e-8f40-516273849506".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

async fn bad_surveys_are_refused_with_the_field_named(server: ClmServer) {
    let mut client = Surveys::new(server.channel().await);
    let refused = |survey: pb::Survey| {
        let mut client = client.clone();
        async move {
            let status = client
                .create_survey(pb::CreateSurveyRequest {
                    survey: Some(survey),
                    request_id: String::new(),
                })
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            violation_reasons(&status)
        }
    };
    let with_condition = |condition: &str| {
        let mut survey = onboarding_survey();
        survey.triggers[0].condition = condition.into();
        survey
    };
    let field = "survey.triggers[0].condition".to_owned();
    assert_eq!(
        refused(with_condition("event.to_stage ==")).await,
        vec![(field.clone(), "SYNTAX_ERROR".to_owned())]
    );
    assert_eq!(
        refused(with_condition("event.to_stag == 'CONVERSION'")).await,
        vec![(field.clone(), "UNKNOWN_KEY".to_owned())]
    );
    assert_eq!(
        refused(with_condition("event['revenue'] > 1.0")).await,
        vec![(field.clone(), "UNKNOWN_KEY".to_owned())],
        "a transition event has no revenue"
    );
    assert_eq!(
        refused(with_condition("lifecycle.health_score == 'high'")).await,
        vec![(field.clone(), "WRONG_TYPE".to_owned())]
    );
    assert_eq!(
        refused(with_condition("stage == 'CONVERSION'")).await,
        vec![(field.clone(), "UNKNOWN_REFERENCE".to_owned())]
    );
    let mut no_nps = onboarding_survey();
    no_nps.questions.remove(0);
    assert_eq!(
        refused(no_nps).await,
        vec![("survey.questions".to_owned(), "KIND_MISMATCH".to_owned())]
    );
    let mut bad_questions = onboarding_survey();
    bad_questions.questions[2].choices = vec!["only".into()];
    bad_questions.questions[3].scale_max = 1;
    bad_questions.questions[1].id = "Why?".into();
    let fields: Vec<String> = refused(bad_questions)
        .await
        .into_iter()
        .map(|(field, _)| field)
        .collect();
    assert_eq!(
        fields,
        vec![
            "survey.questions[1].id",
            "survey.questions[2].choices",
            "survey.questions[3].scale_max"
        ]
    );
    let mut two_bad_triggers = onboarding_survey();
    two_bad_triggers.triggers.push(pb::Trigger {
        name: "bought".into(),
        source: pb::TriggerSource::Touchpoint as i32,
        condition: "event.revenue > 'x'".into(),
        delay: None,
    });
    two_bad_triggers.triggers[0].condition = "event.bogus".into();
    let fields: Vec<String> = refused(two_bad_triggers)
        .await
        .into_iter()
        .map(|(field, _)| field)
        .collect();
    assert_eq!(
        fields,
        vec![
            "survey.triggers[0].condition",
            "survey.triggers[1].condition"
        ],
        "one violation per bad trigger"
    );
    let listed = client
        .list_surveys(pb::ListSurveysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.surveys.is_empty(), "nothing was stored");
}

async fn responses_are_recorded_once_and_summarised(server: ClmServer) {
    let channel = server.channel().await;
    let mut client = Surveys::new(channel.clone());
    let survey = create(&mut client, onboarding_survey(), "").await;
    let alice = new_customer(channel.clone(), "alice@example.org").await;
    let bob = new_customer(channel.clone(), "bob@example.org").await;

    let first = response(
        &survey.id,
        "alice-onboarding",
        &alice,
        vec![
            score("recommend", 10),
            text(
                "why",
                "The onboarding was wonderful and the team was very helpful.",
            ),
        ],
    );
    let recorded = client
        .record_response(first.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!recorded.duplicate);
    let stored = recorded.response.unwrap();
    assert_eq!(stored.customer_id, alice);
    assert_eq!(stored.survey_version, 1);
    let sentiment = stored.sentiment.clone().unwrap();
    assert_eq!(
        sentiment.label,
        pb::SentimentLabel::Positive as i32,
        "{sentiment:?}"
    );
    assert_eq!(sentiment.language, "eng");
    for _ in 0..3 {
        let retry = client
            .record_response(first.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(retry.duplicate);
        assert_eq!(
            retry.response.unwrap(),
            stored,
            "a retry returns the stored response"
        );
    }
    let german = client
        .record_response(response(
            &survey.id,
            "bob-onboarding",
            &bob,
            vec![
                score("recommend", 3),
                text(
                    "why",
                    "Die Lieferung kam viel zu spät und niemand hat auf meine E-Mails geantwortet.",
                ),
            ],
        ))
        .await
        .unwrap()
        .into_inner()
        .response
        .unwrap();
    assert_eq!(
        german.sentiment.as_ref().map(|s| s.label),
        Some(pb::SentimentLabel::NotScored as i32),
        "text the analyser cannot read is not scored"
    );
    // By identity keys: resolved through identity, as touchpoints does.
    let by_keys = client
        .record_response(pb::RecordResponseRequest {
            response: Some(pb::SurveyResponse {
                response_id: "carol-onboarding".into(),
                survey_id: survey.id.clone(),
                customer: Some(CustomerReference {
                    reference: Some(customer_reference::Reference::IdentityKeys(IdentityKeys {
                        keys: vec![IdentityKey {
                            kind: IdentityKind::Email as i32,
                            value: "carol@example.org".into(),
                            source: String::new(),
                        }],
                    })),
                }),
                answers: vec![score("recommend", 8)],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .response
        .unwrap();
    assert!(uuid::Uuid::try_parse(&by_keys.customer_id).is_ok());
    assert!(by_keys.sentiment.is_none(), "no free text, no sentiment");

    // Bad answers, each named; nothing stored.
    let bad = |answers: Vec<pb::Answer>| {
        let mut client = client.clone();
        let request = response(&survey.id, "bad-one", &alice, answers);
        async move {
            let status = client.record_response(request).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            violation_reasons(&status)
        }
    };
    let answer = |field: &str, reason: &str| vec![(field.to_owned(), reason.to_owned())];
    assert_eq!(
        bad(vec![score("recommend", 11)]).await,
        answer("response.answers[0].score", "OUT_OF_RANGE")
    );
    assert_eq!(
        bad(vec![text("recommend", "ten")]).await,
        answer("response.answers[0].score", "WRONG_ANSWER_TYPE")
    );
    assert_eq!(
        bad(vec![score("recommend", 9), score("ease", 0)]).await,
        answer("response.answers[1].score", "OUT_OF_RANGE"),
        "a rating is checked against its own scale"
    );
    assert_eq!(
        bad(vec![
            score("recommend", 9),
            pb::Answer {
                question_id: "best".into(),
                value: Some(pb::answer::Value::Choices(pb::Choices {
                    values: vec!["price".into(), "colour".into()],
                })),
                sentiment: None,
            }
        ])
        .await,
        answer("response.answers[1].choices.values[1]", "UNKNOWN_CHOICE")
    );
    assert_eq!(
        bad(vec![score("nope", 1), score("recommend", 9)]).await,
        answer("response.answers[0].question_id", "UNKNOWN_QUESTION")
    );
    assert_eq!(
        bad(vec![text("why", "Nice")]).await,
        answer("response.answers", "REQUIRED"),
        "the required NPS question is missing"
    );
    let lost = client
        .list_responses(pb::ListResponsesRequest {
            filter: Some(pb::ResponseFilter {
                survey_id: survey.id.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        lost.responses
            .iter()
            .map(|r| r.response_id.as_str())
            .collect::<Vec<_>>(),
        vec!["carol-onboarding", "bob-onboarding", "alice-onboarding"],
        "newest first, refusals left no trace"
    );

    let summary = client
        .get_survey_summary(pb::GetSurveySummaryRequest {
            survey_id: survey.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.response_count, 3);
    let nps = summary.nps.unwrap();
    assert_eq!(
        (nps.promoter_count, nps.passive_count, nps.detractor_count),
        (1, 1, 1)
    );
    assert!(
        nps.score.abs() < 1e-9,
        "one promoter, one detractor: {nps:?}"
    );
    assert!(nps.score_ci_low < 0.0 && nps.score_ci_high > 0.0, "{nps:?}");
    let sentiment = summary.sentiment.unwrap();
    assert_eq!(
        (sentiment.positive_count, sentiment.not_scored_count),
        (1, 1)
    );
    assert_eq!((summary.dispatch_count, summary.response_rate), (0, 0.0));

    // The log carries scores and sentiment, never the free text.
    let mut log = client
        .stream_feedback_log(pb::StreamFeedbackLogRequest {
            stop_at_end: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut recorded = Vec::new();
    while let Some(batch) = log.message().await.unwrap() {
        for entry in batch.entries {
            assert!(!entry.cursor.is_empty());
            let bytes = prost::Message::encode_to_vec(&entry);
            assert!(
                !String::from_utf8_lossy(&bytes).contains("wonderful"),
                "no free text on the log"
            );
            if let Some(pb::feedback_log_entry::Change::ResponseRecorded(r)) = entry.change {
                recorded.push((
                    r.response_id,
                    r.scores.iter().map(|s| s.score).collect::<Vec<_>>(),
                ));
            }
        }
    }
    assert_eq!(
        recorded,
        vec![
            ("alice-onboarding".to_owned(), vec![10]),
            ("bob-onboarding".to_owned(), vec![3]),
            ("carol-onboarding".to_owned(), vec![8]),
        ]
    );

    // An archived survey takes no more responses; a repeat is still a repeat.
    client
        .archive_survey(pb::ArchiveSurveyRequest {
            survey_id: survey.id.clone(),
            expected_version: 0,
        })
        .await
        .unwrap();
    let late = client
        .record_response(response(
            &survey.id,
            "late",
            &bob,
            vec![score("recommend", 5)],
        ))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert_eq!(details(&late).1.as_deref(), Some("SURVEY_ARCHIVED"));
    assert!(
        client
            .record_response(first)
            .await
            .unwrap()
            .into_inner()
            .duplicate
    );
}

async fn a_batch_of_responses_is_recorded_item_by_item(server: ClmServer) {
    let channel = server.channel().await;
    let mut client = Surveys::new(channel.clone());
    let survey = create(&mut client, onboarding_survey(), "").await;
    let alice = new_customer(channel.clone(), "alice@example.org").await;
    let bob = new_customer(channel.clone(), "bob@example.org").await;
    let item = |response_id: &str, customer: &str, answers: Vec<pb::Answer>| {
        response(&survey.id, response_id, customer, answers)
            .response
            .unwrap()
    };
    let batch = pb::RecordResponsesRequest {
        responses: vec![
            item(
                "alice-batch",
                &alice,
                vec![
                    score("recommend", 10),
                    text("why", "Wonderful support, very helpful and kind."),
                ],
            ),
            item("bob-batch", &bob, vec![score("recommend", 11)]),
            item("alice-batch", &alice, vec![score("recommend", 0)]),
            pb::SurveyResponse {
                survey_id: uuid::Uuid::now_v7().to_string(),
                ..item("nobody-survey", &bob, vec![score("recommend", 5)])
            },
            item(
                "ghost-batch",
                &uuid::Uuid::now_v7().to_string(),
                vec![score("recommend", 5)],
            ),
            pb::SurveyResponse {
                customer: None,
                ..item("anonymous", &bob, vec![score("recommend", 5)])
            },
            pb::SurveyResponse {
                survey_id: "not-a-uuid".into(),
                ..item("bad-survey", &bob, vec![score("recommend", 5)])
            },
            item("bob-batch-2", &bob, vec![score("recommend", 6)]),
        ],
    };
    let first = client
        .record_responses(batch.clone())
        .await
        .unwrap()
        .into_inner();
    let statuses = |reply: &pb::RecordResponsesResponse| {
        reply
            .results
            .iter()
            .map(|r| {
                (
                    r.index,
                    r.response_id.clone(),
                    r.status,
                    r.code,
                    r.reason.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    let stored = pb::ResponseRecordStatus::Stored as i32;
    let duplicate = pb::ResponseRecordStatus::Duplicate as i32;
    let refused = pb::ResponseRecordStatus::Refused as i32;
    let row = |index: i32, id: &str, status: i32, code: Code, reason: &str| {
        (index, id.to_owned(), status, code as i32, reason.to_owned())
    };
    assert_eq!(
        statuses(&first),
        vec![
            row(0, "alice-batch", stored, Code::Ok, ""),
            row(1, "bob-batch", refused, Code::InvalidArgument, ""),
            row(2, "alice-batch", duplicate, Code::Ok, ""),
            row(
                3,
                "nobody-survey",
                refused,
                Code::NotFound,
                "SURVEY_NOT_FOUND"
            ),
            row(
                4,
                "ghost-batch",
                refused,
                Code::NotFound,
                "CUSTOMER_NOT_FOUND"
            ),
            row(5, "anonymous", refused, Code::InvalidArgument, ""),
            row(6, "bad-survey", refused, Code::InvalidArgument, ""),
            row(7, "bob-batch-2", stored, Code::Ok, ""),
        ]
    );
    assert_eq!(
        (
            first.stored_count,
            first.duplicate_count,
            first.refused_count
        ),
        (2, 1, 5)
    );
    let violations = |index: usize| {
        first.results[index]
            .violations
            .iter()
            .map(|v| (v.field.clone(), v.reason.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        violations(1),
        vec![(
            "responses[1].answers[0].score".to_owned(),
            "OUT_OF_RANGE".to_owned()
        )]
    );
    assert_eq!(
        violations(5),
        vec![("responses[5].customer".to_owned(), "REQUIRED".to_owned())]
    );
    assert_eq!(violations(6)[0].0, "responses[6].survey_id");
    assert!(!first.results[3].message.is_empty());
    let alice_stored = first.results[0].response.clone().unwrap();
    assert_eq!(alice_stored.customer_id, alice);
    assert_eq!(
        alice_stored.sentiment.as_ref().map(|s| s.label),
        Some(pb::SentimentLabel::Positive as i32)
    );
    assert_eq!(
        first.results[2].response.as_ref(),
        Some(&alice_stored),
        "a repeat within the batch is a duplicate of the first"
    );
    assert!(first.results[1].response.is_none());

    // The whole batch again: what was stored is a duplicate, the refusals
    // are the same, nothing is stored twice.
    let again = client.record_responses(batch).await.unwrap().into_inner();
    let mut expected = statuses(&first);
    expected[0].2 = duplicate;
    expected[7].2 = duplicate;
    assert_eq!(statuses(&again), expected);
    assert_eq!(again.results[0].response.as_ref(), Some(&alice_stored));
    let unary = client
        .record_response(response(
            &survey.id,
            "alice-batch",
            &alice,
            vec![score("recommend", 1)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(unary.duplicate);
    assert_eq!(unary.response.unwrap(), alice_stored);
    let summary = client
        .get_survey_summary(pb::GetSurveySummaryRequest {
            survey_id: survey.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.response_count, 2);
    let nps = summary.nps.unwrap();
    assert_eq!((nps.promoter_count, nps.detractor_count), (1, 1));

    let empty = client
        .record_responses(pb::RecordResponsesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(
        violation_reasons(&empty),
        vec![("responses".to_owned(), "REQUIRED".to_owned())]
    );
    let too_many = pb::RecordResponsesRequest {
        responses: (0..1001)
            .map(|n| item(&format!("many-{n}"), &bob, vec![score("recommend", 5)]))
            .collect(),
    };
    let status = client.record_responses(too_many).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(details(&status).1.as_deref(), Some("BATCH_TOO_LARGE"));
}

macro_rules! on_both_modes {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::embedded().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(server) = super::on_postgres().await else { return };
                    super::$name(server).await;
                }
            )*
        }
    };
}

on_both_modes!(
    surveys_are_versioned_paused_and_archived,
    bad_surveys_are_refused_with_the_field_named,
    responses_are_recorded_once_and_summarised,
    a_batch_of_responses_is_recorded_item_by_item,
);
