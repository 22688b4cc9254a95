//! One conformance suite for the feedback store, run against SQLite and
//! PostgreSQL alike.

#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, TimeDelta, Utc};
use clm_eventlog::{Cursor, ShardFilter};
use clm_feedback::model::{
    Answer, AnswerValue, Dispatch, DispatchQuery, DispatchState, FatiguePolicy, Language, Question,
    QuestionType, Response, ResponseQuery, Sentiment, SuppressReason, Survey, SurveyDefinition,
    SurveyKind, SurveyQuery, SurveyState,
};
use clm_feedback::store::{self, Created, FeedbackStore, LogEntry, NewResponse, Recorded, Updated};
use clm_feedback::summary::Tally;
use clm_platform::Secret;
use clm_platform::db;
use uuid::Uuid;

struct Backend {
    store: Arc<dyn FeedbackStore>,
    _dir: Option<tempfile::TempDir>,
}

async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let url = Secret::new(format!("sqlite://{}/feedback.db", dir.path().display()));
    let pools = db::connect(&url, "feedback", 4).await.unwrap();
    store::MIGRATIONS.run(&pools).await.unwrap();
    Backend {
        store: store::open(pools),
        _dir: Some(dir),
    }
}

async fn postgres() -> Option<Backend> {
    let url = clm_platform::testing::fresh_postgres_database("feedback").await?;
    let pools = db::connect(&url, "feedback", 8).await.unwrap();
    store::MIGRATIONS.run(&pools).await.unwrap();
    Some(Backend {
        store: store::open(pools),
        _dir: None,
    })
}

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

fn nps_question() -> Question {
    Question {
        id: "recommend".into(),
        text: "How likely are you to recommend us?".into(),
        kind: QuestionType::Nps,
        required: true,
    }
}

fn survey(kind: SurveyKind, questions: Vec<Question>) -> Survey {
    let now = now();
    Survey {
        id: Uuid::now_v7(),
        kind,
        definition: SurveyDefinition {
            display_name: "Onboarding".into(),
            description: String::new(),
            questions,
            triggers: Vec::new(),
            fatigue: FatiguePolicy::default(),
            response_window: Duration::from_secs(14 * 86_400),
            consent_purpose: Some("surveys".into()),
            sampling_percent: 100,
        },
        state: SurveyState::Active,
        version: 1,
        questions_version: 1,
        created_at: now,
        updated_at: now,
        archived_at: None,
    }
}

fn response(
    survey: &Survey,
    response_id: &str,
    score: i32,
    submitted_at: DateTime<Utc>,
) -> Response {
    Response {
        id: Uuid::now_v7(),
        response_id: response_id.into(),
        survey_id: survey.id,
        survey_version: survey.questions_version,
        dispatch_id: None,
        customer_id: Uuid::now_v7(),
        answers: vec![Answer {
            question_id: "recommend".into(),
            value: AnswerValue::Score(score),
            sentiment: None,
        }],
        submitted_at,
        sentiment: None,
        recorded_at: now(),
    }
}

fn new_response(survey: &Survey, response: Response) -> NewResponse {
    NewResponse {
        tally: Tally::of_response(&response, &survey.definition.questions),
        log: vec![LogEntry {
            event_id: Uuid::now_v7(),
            customer_id: response.customer_id,
            kind: "response.recorded",
            payload: response.response_id.as_bytes().to_vec(),
            recorded_at: response.recorded_at,
        }],
        response,
    }
}

fn dispatch(survey: &Survey, entry: &str, state: DispatchState, due_at: DateTime<Utc>) -> Dispatch {
    let released = matches!(state, DispatchState::Dispatched | DispatchState::Responded);
    Dispatch {
        id: Uuid::now_v7(),
        survey_id: survey.id,
        customer_id: Uuid::now_v7(),
        trigger_name: "onboarding".into(),
        source_entry_id: entry.into(),
        state,
        due_at,
        dispatched_at: released.then_some(due_at),
        expires_at: released.then_some(due_at + TimeDelta::days(14)),
        responded_at: None,
        created_at: now(),
    }
}

/// The log once it holds `count` entries: on PostgreSQL an entry is handed
/// out once every older transaction of the server has ended, and other
/// tests run beside this one.
async fn log_when(store: &dyn FeedbackStore, count: usize) -> Vec<clm_eventlog::Entry> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = store
            .log()
            .read_after(Cursor::START, ShardFilter::ALL, 100)
            .await
            .unwrap();
        if log.len() >= count || tokio::time::Instant::now() > deadline {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn surveys_are_created_once_and_updated_under_their_version(backend: Backend) {
    let store = backend.store;
    let first = survey(SurveyKind::Nps, vec![nps_question()]);
    assert_eq!(
        store.create_survey(&first, Some("create-1")).await.unwrap(),
        Created::New(first.clone())
    );
    let retry = survey(SurveyKind::Nps, vec![nps_question()]);
    assert_eq!(
        store.create_survey(&retry, Some("create-1")).await.unwrap(),
        Created::Earlier(first.clone()),
        "a request id is answered with the survey it created"
    );
    assert_eq!(store.survey(retry.id).await.unwrap(), None);
    assert_eq!(store.survey(first.id).await.unwrap(), Some(first.clone()));
    let without_id = survey(SurveyKind::Csat, vec![]);
    store.create_survey(&without_id, None).await.unwrap();
    let another = survey(SurveyKind::Custom, vec![]);
    assert!(matches!(
        store.create_survey(&another, None).await.unwrap(),
        Created::New(_)
    ));

    let mut next = first.clone();
    next.version = 2;
    next.state = SurveyState::Paused;
    next.definition.display_name = "Renamed".into();
    assert_eq!(
        store.update_survey(&next).await.unwrap(),
        Updated::Done(next.clone())
    );
    // Written from version 1 again: the stored one is 2.
    assert_eq!(
        store.update_survey(&next).await.unwrap(),
        Updated::VersionChanged(2)
    );
    let mut missing = next.clone();
    missing.id = Uuid::now_v7();
    assert_eq!(
        store.update_survey(&missing).await.unwrap(),
        Updated::NotFound
    );
    assert_eq!(store.survey(first.id).await.unwrap(), Some(next.clone()));

    let active = store
        .list_surveys(&SurveyQuery {
            states: vec![SurveyState::Active],
            kind: None,
            after: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(
        active.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![without_id.id, another.id],
        "oldest first, paused ones left out"
    );
    let page = store
        .list_surveys(&SurveyQuery {
            states: vec![SurveyState::Active, SurveyState::Paused],
            kind: Some(SurveyKind::Custom),
            after: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![another.id]
    );
    let after = store
        .list_surveys(&SurveyQuery {
            states: vec![SurveyState::Active, SurveyState::Paused],
            kind: None,
            after: Some(first.id),
            limit: 1,
        })
        .await
        .unwrap();
    assert_eq!(
        after.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![without_id.id]
    );
}

async fn question_sets_are_kept_per_version(backend: Backend) {
    let store = backend.store;
    let first = survey(SurveyKind::Nps, vec![nps_question()]);
    store.create_survey(&first, None).await.unwrap();
    let mut next = first.clone();
    next.version = 2;
    next.questions_version = 2;
    next.definition.questions.push(Question {
        id: "why".into(),
        text: "Why?".into(),
        kind: QuestionType::FreeText,
        required: false,
    });
    store.update_survey(&next).await.unwrap();
    assert_eq!(
        store.questions(first.id, 1).await.unwrap(),
        Some(first.definition.questions.clone())
    );
    assert_eq!(
        store.questions(first.id, 2).await.unwrap(),
        Some(next.definition.questions.clone())
    );
    assert_eq!(store.questions(first.id, 3).await.unwrap(), None);
}

async fn responses_are_stored_once_and_take_one_dispatch(backend: Backend) {
    let store = backend.store;
    let survey = survey(SurveyKind::Nps, vec![nps_question()]);
    store.create_survey(&survey, None).await.unwrap();
    let mut first = response(&survey, "r-1", 10, now());
    first.sentiment = Some(Sentiment::Scored {
        score: 0.75,
        language: Language::of_code("eng"),
    });
    first.answers.push(Answer {
        question_id: "why".into(),
        value: AnswerValue::Text(Some("Great onboarding".into())),
        sentiment: first.sentiment,
    });
    assert_eq!(
        store
            .record_response(&new_response(&survey, first.clone()))
            .await
            .unwrap(),
        Recorded::New(first.clone())
    );
    let again = response(&survey, "r-1", 3, now());
    assert_eq!(
        store
            .record_response(&new_response(&survey, again))
            .await
            .unwrap(),
        Recorded::Duplicate(first.clone()),
        "the response id is the key, whatever the answers"
    );
    assert_eq!(
        store.response_by_response_id("r-1").await.unwrap(),
        Some(first.clone())
    );

    let due = now();
    let open = dispatch(&survey, "entry-1", DispatchState::Dispatched, due);
    let stored = store
        .insert_dispatches(&[
            open.clone(),
            dispatch(&survey, "entry-1", DispatchState::Scheduled, due),
        ])
        .await
        .unwrap();
    assert_eq!(stored, vec![open.clone()], "one dispatch per source entry");
    let mut answer = response(&survey, "r-2", 9, now());
    answer.dispatch_id = Some(open.id);
    answer.customer_id = open.customer_id;
    let recorded = new_response(&survey, answer.clone());
    assert_eq!(
        store.record_response(&recorded).await.unwrap(),
        Recorded::New(answer.clone())
    );
    let answered = store.dispatch(open.id).await.unwrap().unwrap();
    assert_eq!(answered.state, DispatchState::Responded);
    assert_eq!(answered.responded_at, Some(answer.recorded_at));
    let mut second = response(&survey, "r-3", 1, now());
    second.dispatch_id = Some(open.id);
    assert_eq!(
        store
            .record_response(&new_response(&survey, second))
            .await
            .unwrap(),
        Recorded::DispatchClosed
    );
    assert_eq!(
        store.response_by_response_id("r-3").await.unwrap(),
        None,
        "nothing of a refused response is stored"
    );
    let log = log_when(store.as_ref(), 2).await;
    assert_eq!(
        log.iter()
            .map(|entry| entry.payload.clone())
            .collect::<Vec<_>>(),
        vec![b"r-1".to_vec(), b"r-2".to_vec()],
        "one log entry per stored response, none for refusals"
    );
    let tally = store
        .tally(
            survey.id,
            due - TimeDelta::hours(1),
            now() + TimeDelta::hours(1),
        )
        .await
        .unwrap();
    assert_eq!((tally.responses, tally.nps_promoters), (2, 2));
    assert_eq!((tally.dispatched, tally.answered), (1, 1));
    assert_eq!(tally.sentiment_positive, 1);
}

async fn lists_page_in_their_order(backend: Backend) {
    let store = backend.store;
    let survey = survey(SurveyKind::Nps, vec![nps_question()]);
    store.create_survey(&survey, None).await.unwrap();
    let base = at("2026-03-01T12:00:00Z");
    let dispatches: Vec<Dispatch> = (0..5)
        .map(|i| {
            let state = if i % 2 == 0 {
                DispatchState::Scheduled
            } else {
                DispatchState::Suppressed(SuppressReason::Fatigue)
            };
            dispatch(
                &survey,
                &format!("e{i}"),
                state,
                base + TimeDelta::hours(4 - i),
            )
        })
        .collect();
    store.insert_dispatches(&dispatches).await.unwrap();
    let query = |states: Vec<DispatchState>, after, limit| DispatchQuery {
        survey_id: Some(survey.id),
        customer_id: None,
        states,
        start: None,
        end: None,
        after,
        limit,
    };
    let all = store
        .list_dispatches(&query(vec![], None, 10))
        .await
        .unwrap();
    assert_eq!(
        all.iter()
            .map(|d| d.source_entry_id.as_str())
            .collect::<Vec<_>>(),
        vec!["e4", "e3", "e2", "e1", "e0"],
        "oldest due time first"
    );
    assert_eq!(all[1], dispatches[3], "stored as given");
    let page = store
        .list_dispatches(&query(vec![], Some((all[1].due_at, all[1].id)), 2))
        .await
        .unwrap();
    assert_eq!(page, all[2..4].to_vec());
    let suppressed = store
        .list_dispatches(&query(
            vec![DispatchState::Suppressed(SuppressReason::Fatigue)],
            None,
            10,
        ))
        .await
        .unwrap();
    assert_eq!(suppressed.len(), 2);
    let windowed = store
        .list_dispatches(&DispatchQuery {
            start: Some(base + TimeDelta::hours(1)),
            end: Some(base + TimeDelta::hours(3)),
            ..query(vec![], None, 10)
        })
        .await
        .unwrap();
    assert_eq!(
        windowed
            .iter()
            .map(|d| d.source_entry_id.as_str())
            .collect::<Vec<_>>(),
        vec!["e3", "e2"]
    );
    let by_customer = store
        .list_dispatches(&DispatchQuery {
            survey_id: None,
            customer_id: Some(dispatches[0].customer_id),
            ..query(vec![], None, 10)
        })
        .await
        .unwrap();
    assert_eq!(by_customer, vec![dispatches[0].clone()]);

    let mut responses = Vec::new();
    for i in 0..5 {
        let mut r = response(&survey, &format!("p{i}"), 8, base + TimeDelta::minutes(i));
        if i == 4 {
            r.customer_id = responses
                .first()
                .map_or(r.customer_id, |f: &Response| f.customer_id);
        }
        store
            .record_response(&new_response(&survey, r.clone()))
            .await
            .unwrap();
        responses.push(r);
    }
    let newest = store
        .list_responses(&ResponseQuery {
            survey_id: Some(survey.id),
            customer_id: None,
            start: None,
            end: None,
            before: None,
            limit: 3,
        })
        .await
        .unwrap();
    assert_eq!(
        newest
            .iter()
            .map(|r| r.response_id.as_str())
            .collect::<Vec<_>>(),
        vec!["p4", "p3", "p2"]
    );
    let rest = store
        .list_responses(&ResponseQuery {
            survey_id: Some(survey.id),
            customer_id: None,
            start: Some(base),
            end: None,
            before: Some((newest[2].submitted_at, newest[2].id)),
            limit: 3,
        })
        .await
        .unwrap();
    assert_eq!(
        rest.iter()
            .map(|r| r.response_id.as_str())
            .collect::<Vec<_>>(),
        vec!["p1", "p0"]
    );
    let one_customer = store
        .list_responses(&ResponseQuery {
            survey_id: None,
            customer_id: Some(responses[0].customer_id),
            start: None,
            end: Some(base + TimeDelta::minutes(4)),
            before: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(one_customer, vec![responses[0].clone()]);
}

/// The tally of any window equals the tally of its responses and
/// dispatches counted one by one, whatever the window's edges.
async fn a_window_is_tallied_from_rollups_and_edges(backend: Backend) {
    let store = backend.store;
    let survey = survey(
        SurveyKind::Nps,
        vec![
            nps_question(),
            Question {
                id: "satisfied".into(),
                text: "How satisfied are you?".into(),
                kind: QuestionType::Csat,
                required: false,
            },
        ],
    );
    store.create_survey(&survey, None).await.unwrap();
    let base = at("2026-05-01T08:00:00Z");
    let mut counted: Vec<(DateTime<Utc>, Tally)> = Vec::new();
    for i in 0..60_i64 {
        let submitted = base + TimeDelta::minutes(i * 17 + (i % 7));
        let mut r = response(&survey, &format!("w{i}"), (i % 11) as i32, submitted);
        r.answers.push(Answer {
            question_id: "satisfied".into(),
            value: AnswerValue::Score((i % 5 + 1) as i32),
            sentiment: None,
        });
        if i % 3 == 0 {
            r.sentiment = Some(if i % 2 == 0 {
                Sentiment::Scored {
                    score: -0.5,
                    language: Language::of_code("eng"),
                }
            } else {
                Sentiment::NotScored {
                    language: Language::of_code("deu"),
                }
            });
        }
        let new = new_response(&survey, r);
        counted.push((submitted, new.tally));
        store.record_response(&new).await.unwrap();
    }
    let mut released = Vec::new();
    for i in 0..12_i64 {
        let due = base + TimeDelta::minutes(i * 41 + 3);
        released.push(due);
        store
            .insert_dispatches(&[dispatch(
                &survey,
                &format!("d{i}"),
                DispatchState::Dispatched,
                due,
            )])
            .await
            .unwrap();
    }
    let windows = [
        (base, base + TimeDelta::hours(24)),
        (
            base + TimeDelta::minutes(13),
            base + TimeDelta::minutes(500),
        ),
        (base + TimeDelta::hours(2), base + TimeDelta::hours(5)),
        (
            base + TimeDelta::minutes(70),
            base + TimeDelta::minutes(110),
        ),
        (
            base + TimeDelta::minutes(61),
            base + TimeDelta::minutes(119),
        ),
        (
            base + TimeDelta::minutes(300),
            base + TimeDelta::minutes(300),
        ),
    ];
    assert_windows(&*store, survey.id, &counted, &released, &windows).await;
    // Closed periods folded into one row each: the same figures.
    let folded = store.compact_rollups(now(), 100).await.unwrap();
    assert!(folded > 0, "the spread periods were folded: {folded}");
    assert_eq!(store.compact_rollups(now(), 100).await.unwrap(), 0);
    assert_windows(&*store, survey.id, &counted, &released, &windows).await;
    // Late responses into folded periods count, before and after the next
    // fold; a small limit folds a little at a time.
    for i in 0..20_i64 {
        let submitted = base + TimeDelta::minutes(i * 37 + 5);
        let new = new_response(
            &survey,
            response(&survey, &format!("late{i}"), (i % 11) as i32, submitted),
        );
        counted.push((submitted, new.tally));
        store.record_response(&new).await.unwrap();
    }
    assert_windows(&*store, survey.id, &counted, &released, &windows).await;
    let mut calls = 0;
    while store.compact_rollups(now(), 1).await.unwrap() > 0 {
        calls += 1;
        assert!(calls < 100, "folding one period a grain at a time ends");
    }
    assert!(calls > 1, "a limit of 1 folds over several calls: {calls}");
    assert_windows(&*store, survey.id, &counted, &released, &windows).await;
    let other = store
        .tally(Uuid::now_v7(), base, base + TimeDelta::days(1))
        .await
        .unwrap();
    assert_eq!(other, Tally::default(), "another survey counts nothing");
}

/// Every window's tally equals the responses submitted and dispatches
/// released in it.
async fn assert_windows(
    store: &dyn FeedbackStore,
    survey_id: Uuid,
    counted: &[(DateTime<Utc>, Tally)],
    released: &[DateTime<Utc>],
    windows: &[(DateTime<Utc>, DateTime<Utc>)],
) {
    for &(start, end) in windows {
        let expected = counted
            .iter()
            .filter(|(time, _)| *time >= start && *time < end)
            .fold(Tally::default(), |sum, (_, tally)| sum.plus(tally));
        let dispatched = released
            .iter()
            .filter(|t| **t >= start && **t < end)
            .count() as i64;
        let expected = Tally {
            dispatched,
            ..expected
        };
        let tally = store.tally(survey_id, start, end).await.unwrap();
        assert_eq!(
            Tally {
                sentiment_sum: 0.0,
                ..tally
            },
            Tally {
                sentiment_sum: 0.0,
                ..expected
            },
            "window {start} to {end}"
        );
        assert!((tally.sentiment_sum - expected.sentiment_sum).abs() < 1e-9);
    }
}

async fn a_round_settles_once_and_reads_every_customers_releases(backend: Backend) {
    let store = backend.store;
    let first = survey(SurveyKind::Nps, vec![nps_question()]);
    let second = survey(SurveyKind::Nps, vec![nps_question()]);
    store.create_survey(&first, None).await.unwrap();
    store.create_survey(&second, None).await.unwrap();
    let due = now() - TimeDelta::minutes(5);
    let mut scheduled: Vec<Dispatch> = (0..6)
        .map(|n| dispatch(&first, &format!("entry-{n}"), DispatchState::Scheduled, due))
        .collect();
    // Two customers hold two dispatches each, one per survey.
    scheduled[1].customer_id = scheduled[0].customer_id;
    scheduled[1].survey_id = second.id;
    scheduled[3].customer_id = scheduled[2].customer_id;
    scheduled[3].survey_id = second.id;
    store.insert_dispatches(&scheduled).await.unwrap();
    let released_at = now();
    let decided: Vec<(Dispatch, LogEntry)> = scheduled
        .iter()
        .enumerate()
        .map(|(n, dispatch)| {
            let mut decided = dispatch.clone();
            if n == 4 {
                decided.state = DispatchState::Suppressed(SuppressReason::Fatigue);
            } else {
                decided.state = DispatchState::Dispatched;
                decided.dispatched_at = Some(released_at - TimeDelta::seconds(n as i64));
                decided.expires_at = Some(released_at + TimeDelta::days(14));
            }
            let entry = LogEntry {
                event_id: Uuid::now_v7(),
                customer_id: decided.customer_id,
                kind: "dispatch.changed",
                payload: format!("settled-{n}").into_bytes(),
                recorded_at: released_at,
            };
            (decided, entry)
        })
        .collect();
    // Backwards, so the store cannot rely on the caller's order.
    let mut reversed = decided.clone();
    reversed.reverse();
    let settled = store.settle_dispatches(&reversed).await.unwrap();
    assert_eq!(settled.len(), 6, "every scheduled dispatch settles");
    assert!(
        store.settle_dispatches(&decided).await.unwrap().is_empty(),
        "a settled dispatch is never settled again"
    );
    for (decided, _) in &decided {
        let stored = store.dispatch(decided.id).await.unwrap().unwrap();
        assert_eq!(stored, *decided);
    }
    let log = log_when(store.as_ref(), 6).await;
    assert_eq!(
        log.len(),
        6,
        "one entry per settled dispatch, none for the repeat"
    );

    let customers: Vec<Uuid> = scheduled.iter().map(|d| d.customer_id).collect();
    let releases = store.last_releases(&customers).await.unwrap();
    let expected = |n: usize| decided[n].0.dispatched_at.unwrap();
    assert_eq!(
        releases.get(&scheduled[0].customer_id),
        Some(&[(first.id, expected(0)), (second.id, expected(1))].into())
    );
    assert_eq!(
        releases.get(&scheduled[2].customer_id),
        Some(&[(first.id, expected(2)), (second.id, expected(3))].into())
    );
    assert_eq!(
        releases.get(&scheduled[5].customer_id),
        Some(&[(first.id, expected(5))].into())
    );
    assert_eq!(
        releases.get(&scheduled[4].customer_id),
        None,
        "a suppressed dispatch is no release"
    );
    assert!(store.last_releases(&[]).await.unwrap().is_empty());
    let tally = store
        .tally(
            first.id,
            due - TimeDelta::hours(1),
            now() + TimeDelta::hours(1),
        )
        .await
        .unwrap();
    assert_eq!(
        tally.dispatched, 3,
        "the first survey's three releases count"
    );
}

async fn a_batch_of_responses_is_recorded_in_one_go(backend: Backend) {
    let store = backend.store;
    let survey = survey(SurveyKind::Nps, vec![nps_question()]);
    store.create_survey(&survey, None).await.unwrap();
    let stored_before = response(&survey, "b-0", 10, now());
    store
        .record_response(&new_response(&survey, stored_before.clone()))
        .await
        .unwrap();
    let released = now() - TimeDelta::hours(30);
    let open = dispatch(&survey, "entry-b1", DispatchState::Dispatched, released);
    let closed = dispatch(&survey, "entry-b2", DispatchState::Expired, released);
    store
        .insert_dispatches(&[open.clone(), closed.clone()])
        .await
        .unwrap();
    let answering = |response_id: &str, score: i32, dispatch: &Dispatch| {
        let mut answer = response(&survey, response_id, score, now());
        answer.dispatch_id = Some(dispatch.id);
        answer.customer_id = dispatch.customer_id;
        answer
    };
    let first = response(&survey, "b-1", 9, now());
    let answers_open = answering("b-2", 3, &open);
    let answers_open_again = answering("b-3", 10, &open);
    let answers_closed = answering("b-4", 10, &closed);
    let batch = [
        new_response(&survey, answers_open_again.clone()),
        new_response(&survey, first.clone()),
        new_response(&survey, response(&survey, "b-0", 1, now())),
        new_response(&survey, answers_closed),
        new_response(&survey, answers_open.clone()),
    ];
    let recorded = store.record_responses(&batch).await.unwrap();
    // Either item answering the open dispatch may take it; the other finds
    // it closed.
    let (taker, loser) = match &recorded[0] {
        Recorded::New(_) => (0, 4),
        _ => (4, 0),
    };
    assert_eq!(recorded[loser], Recorded::DispatchClosed, "{recorded:?}");
    assert_eq!(
        recorded[taker],
        Recorded::New(batch[taker].response.clone())
    );
    assert_eq!(recorded[1], Recorded::New(first.clone()));
    assert_eq!(recorded[2], Recorded::Duplicate(stored_before.clone()));
    assert_eq!(recorded[3], Recorded::DispatchClosed);
    assert_eq!(recorded.len(), 5);
    let answered = store.dispatch(open.id).await.unwrap().unwrap();
    assert_eq!(answered.state, DispatchState::Responded);
    assert_eq!(
        store.dispatch(closed.id).await.unwrap().unwrap().state,
        DispatchState::Expired
    );
    let found = store
        .responses_by_response_ids(&["b-0", "b-1", "b-2", "b-3", "b-4", "nope"])
        .await
        .unwrap();
    let mut keys: Vec<&str> = found.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let taken = batch[taker].response.response_id.as_str();
    let mut expected = vec!["b-0", "b-1", taken];
    expected.sort_unstable();
    assert_eq!(keys, expected, "nothing of a refused item is stored");
    assert_eq!(found["b-1"], first);
    let dispatches = store
        .dispatches(&[open.id, closed.id, Uuid::now_v7()])
        .await
        .unwrap();
    assert_eq!(dispatches.len(), 2);
    assert_eq!(dispatches[&closed.id], closed);

    let log = log_when(store.as_ref(), 3).await;
    let mut payloads: Vec<Vec<u8>> = log.iter().map(|entry| entry.payload.clone()).collect();
    payloads.sort();
    let mut expected: Vec<Vec<u8>> = vec![b"b-0".to_vec(), b"b-1".to_vec(), taken.into()];
    expected.sort();
    assert_eq!(payloads, expected, "log entries of the stored items only");
    let tally = store
        .tally(
            survey.id,
            released - TimeDelta::hours(1),
            now() + TimeDelta::hours(1),
        )
        .await
        .unwrap();
    assert_eq!(tally.responses, 3, "b-0 before, b-1 and one answer now");
    assert_eq!((tally.dispatched, tally.answered), (1, 1));
    // The answer counts in the hour the dispatch was released in.
    let release_hour = store
        .tally(
            survey.id,
            store::hour_of(released),
            store::hour_of(released) + TimeDelta::hours(1),
        )
        .await
        .unwrap();
    assert_eq!((release_hour.answered, release_hour.responses), (1, 0));
    assert!(
        store.record_responses(&[]).await.unwrap().is_empty(),
        "an empty batch is nothing"
    );
}

/// Responses written into closed periods while their slots are folded
/// are all counted: the fold waits for a writer's rows or leaves the rows
/// that come after it for the next fold.
async fn folding_under_writes_loses_nothing(backend: Backend) {
    let store = backend.store;
    let survey = survey(SurveyKind::Nps, vec![nps_question()]);
    store.create_survey(&survey, None).await.unwrap();
    let base = at("2026-03-10T06:00:00Z");
    let writers: Vec<_> = (0..4_i64)
        .map(|writer| {
            let (store, survey) = (store.clone(), survey.clone());
            tokio::spawn(async move {
                // Two writers one response at a time, two in batches of 10
                // over several periods (as a merge moves responses).
                let mut total = Tally::default();
                let mut batch = Vec::new();
                for i in 0..40_i64 {
                    let submitted = base + TimeDelta::minutes((i * 13 + writer * 7) % 240);
                    let new = new_response(
                        &survey,
                        response(
                            &survey,
                            &format!("fold-{writer}-{i}"),
                            ((i + writer) % 11) as i32,
                            submitted,
                        ),
                    );
                    total = total.plus(&new.tally);
                    if writer < 2 {
                        store.record_response(&new).await.unwrap();
                    } else {
                        batch.push(new);
                        if batch.len() == 10 {
                            store.record_responses(&batch).await.unwrap();
                            batch.clear();
                        }
                    }
                }
                total
            })
        })
        .collect();
    let folding = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut folds = 0;
            for _ in 0..200 {
                folds += store.compact_rollups(now(), 2).await.unwrap();
                tokio::task::yield_now().await;
            }
            folds
        })
    };
    let mut expected = Tally::default();
    for writer in writers {
        expected = expected.plus(&writer.await.unwrap());
    }
    assert!(folding.await.unwrap() > 0, "periods were folded meanwhile");
    while store.compact_rollups(now(), 100).await.unwrap() > 0 {}
    for (start, end) in [
        (base, base + TimeDelta::days(1)),
        (base - TimeDelta::days(30), base + TimeDelta::days(30)),
    ] {
        let tally = store.tally(survey.id, start, end).await.unwrap();
        assert_eq!(tally, expected, "window {start} to {end}");
    }
}

clm_platform::on_both_backends!(sqlite: super::sqlite, postgres: super::postgres;
    surveys_are_created_once_and_updated_under_their_version,
    question_sets_are_kept_per_version,
    responses_are_stored_once_and_take_one_dispatch,
    lists_page_in_their_order,
    a_window_is_tallied_from_rollups_and_edges,
    a_round_settles_once_and_reads_every_customers_releases,
    a_batch_of_responses_is_recorded_in_one_go,
    folding_under_writes_loses_nothing,
);

/// A window's edge is read by an index range of the survey's own rows on
/// PostgreSQL, however the planner misjudges it: here another survey took
/// 25,000 responses in the last seconds, and the planner, which does not
/// know how survey and time go together, expects the current hour of the
/// summarised survey (300,000 responses over a year, 92 % of the table) to
/// hold most of them. It holds none. The year is vacuumed, as autovacuum
/// does with rows that no longer change; the busy seconds are not.
#[tokio::test]
async fn a_summary_edge_does_not_scan_the_responses_on_postgres() {
    let Some(url) = clm_platform::testing::fresh_postgres_database("feedback_edges").await else {
        return;
    };
    let pools = db::connect(&url, "feedback", 4).await.unwrap();
    store::MIGRATIONS.run(&pools).await.unwrap();
    let db::Pools::Postgres(pool) = pools.clone() else {
        panic!("a postgres URL opens PostgreSQL pools");
    };
    let store = store::open(pools);
    let busy = survey(SurveyKind::Nps, vec![nps_question()]);
    let quiet = survey(SurveyKind::Nps, vec![nps_question()]);
    store.create_survey(&busy, None).await.unwrap();
    store.create_survey(&quiet, None).await.unwrap();
    // Rows only (no rollups): the window below has no whole hour.
    let generate = |survey: Uuid, kind: &str, count: i64, spacing: &str, before: &str| {
        let sql = format!(
            "INSERT INTO feedback.responses (id, response_id, survey_id, survey_version, customer_id, \
               answers, submitted_at, language, recorded_at) \
             SELECT gen_random_uuid(), '{kind}-' || n, $1, 1, gen_random_uuid(), '[]', \
               now() - interval '{before}' - n * interval '{spacing}', '', now() \
             FROM generate_series(1, {count}) n"
        );
        let pool = pool.clone();
        async move { sqlx::query(&sql).bind(survey).execute(&pool).await }
    };
    generate(quiet.id, "quiet", 300_000, "100 seconds", "2 hours")
        .await
        .unwrap();
    sqlx::query("VACUUM feedback.responses")
        .execute(&pool)
        .await
        .unwrap();
    generate(busy.id, "busy", 25_000, "1 millisecond", "0 seconds")
        .await
        .unwrap();
    sqlx::query("ANALYZE feedback.responses")
        .execute(&pool)
        .await
        .unwrap();
    // (sequential scans of the table, scans of the survey index, entries
    // read from the time index)
    let scans = || async {
        // Statistics reach the shared counters once their backend has been
        // idle for a moment.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        sqlx::query_as::<_, (i64, i64, i64)>(
            "SELECT t.seq_scan, \
               (SELECT sum(idx_scan)::int8 FROM pg_stat_user_indexes WHERE schemaname = 'feedback' \
                  AND indexrelname LIKE 'responses\\_by\\_survey%'), \
               (SELECT idx_tup_read FROM pg_stat_user_indexes WHERE schemaname = 'feedback' \
                  AND indexrelname = 'responses_by_time') \
             FROM pg_stat_user_tables t WHERE t.schemaname = 'feedback' AND t.relname = 'responses'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = scans().await;
    let now = now();
    let tally = store
        .tally(quiet.id, store::hour_of(now), now + TimeDelta::seconds(1))
        .await
        .unwrap();
    assert_eq!(
        tally.responses, 0,
        "the quiet survey's current hour is empty"
    );
    let mut after = scans().await;
    for _ in 0..10 {
        if after != before {
            break;
        }
        after = scans().await;
    }
    assert!(
        after.1 > before.1,
        "the edge was read by the survey's index: {before:?} -> {after:?}"
    );
    assert_eq!(after.0, before.0, "no sequential scan of the responses");
    // The planner itself looks up the newest entries of the time index to
    // bound its estimate (a few entries); reading the busy survey's
    // seconds through it would be 25,000.
    assert!(
        after.2 - before.2 < 1_000,
        "the time index, which holds the busy survey's hour, is not walked: {before:?} -> {after:?}"
    );
}
