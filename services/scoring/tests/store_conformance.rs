//! One conformance suite for the scoring store, run against SQLite and
//! PostgreSQL alike.

#![allow(missing_docs)]

use std::sync::Arc;

use chrono::{DateTime, Duration as TimeDelta, SubsecRound as _, Utc};
use clm_eventlog::{Cursor, ShardFilter};
use clm_platform::Secret;
use clm_platform::db;
use clm_proto::scoring as pb;
use clm_scoring::history::{Cause, RecordedTransition, Standing};
use clm_scoring::store::{
    self, Activation, ChangeSet, CursorMove, CustomerRecord, CustomerWrite, Fact, Fence, Input,
    ModelInsert, RescoreProgress, RescoreRow, ScoringStore, StoreError, TransitionQuery,
};
use clm_scoring::{
    CustomerFeatures, LifecycleSnapshot, LifecycleStage, LifecycleState, ProfileFacts, Scores,
    TouchpointFacts, default_model,
};
use uuid::Uuid;

struct Backend {
    store: Arc<dyn ScoringStore>,
    _dir: Option<tempfile::TempDir>,
}

async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let url = Secret::new(format!("sqlite://{}/scoring.db", dir.path().display()));
    let pools = db::connect(&url, "scoring", 4).await.unwrap();
    store::MIGRATIONS.run(&pools).await.unwrap();
    Backend {
        store: store::open(pools),
        _dir: Some(dir),
    }
}

async fn postgres() -> Option<Backend> {
    let url = clm_platform::testing::fresh_postgres_database("scoring").await?;
    let pools = db::connect(&url, "scoring", 8).await.unwrap();
    store::MIGRATIONS.run(&pools).await.unwrap();
    Some(Backend {
        store: store::open(pools),
        _dir: None,
    })
}

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn record(id: Uuid, stage: LifecycleStage, due: Option<DateTime<Utc>>) -> CustomerRecord {
    let at = now();
    let mut features = CustomerFeatures::new();
    features.apply(&TouchpointFacts {
        touchpoint_type: "page_view",
        channel: clm_proto::touchpoint::Channel::Web,
        occurred_at: at,
        revenue: None,
    });
    CustomerRecord {
        features,
        snapshot: Some(LifecycleSnapshot {
            state: LifecycleState {
                stage: Some(stage),
                stage_entered_at: Some(at),
                ..LifecycleState::default()
            },
            scores: Scores {
                engagement: 1.0,
                lead: 2.0,
                health: 3.0,
            },
            model_version: "builtin-1".to_owned(),
            evaluated_at: at,
        }),
        next_due_at: due,
        ..CustomerRecord::new(id)
    }
}

fn write(record: CustomerRecord) -> CustomerWrite {
    CustomerWrite {
        record,
        features_changed: true,
        position_changed: true,
    }
}

fn transition(customer: Uuid, at: DateTime<Utc>) -> RecordedTransition {
    let reach = LifecycleState {
        stage: Some(LifecycleStage::Reach),
        stage_entered_at: Some(at),
        ..LifecycleState::default()
    };
    RecordedTransition {
        id: Uuid::now_v7(),
        customer_id: customer,
        from: Standing::default(),
        to: Standing::from(&reach),
        at,
        model_version: "builtin-1".to_owned(),
        stage_rule: Some("first_touch".to_owned()),
        health_rule: None,
        reason: "stage rule 'first_touch' matched".to_owned(),
        cause: Cause::Touchpoint,
        touchpoint_id: Some(Uuid::now_v7().to_string()),
        snapshot: LifecycleSnapshot {
            state: reach,
            scores: Scores {
                engagement: 1.5,
                lead: 0.0,
                health: 100.0,
            },
            model_version: "builtin-1".to_owned(),
            evaluated_at: at,
        },
        record_time: at,
    }
}

fn rescore_row(model: &str, total: i64) -> RescoreRow {
    RescoreRow {
        id: Uuid::now_v7(),
        model_version: model.to_owned(),
        state: pb::RescoreState::Pending as i32,
        trigger: pb::RescoreTrigger::Manual as i32,
        done_count: 0,
        total_count: total,
        changed_count: 0,
        rate_per_second: 0.0,
        create_time: now(),
        start_time: None,
        end_time: None,
        error: String::new(),
        resume_after: None,
    }
}

/// Up to ten of a customer's transitions, as ListTransitions lists them.
async fn listed_for(store: &dyn ScoringStore, customer: Uuid) -> Vec<RecordedTransition> {
    store
        .list_transitions(&TransitionQuery {
            customer_id: Some(customer),
            start: None,
            end: None,
            after: None,
            limit: 10,
        })
        .await
        .unwrap()
}

async fn customers_are_written_with_a_version_check(backend: Backend) {
    let store = backend.store;
    let id = Uuid::now_v7();
    let first = record(id, LifecycleStage::Reach, None);
    store
        .commit(&ChangeSet {
            customers: vec![write(first.clone())],
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    let loaded = store.load_customers(&[id, Uuid::now_v7()]).await.unwrap();
    assert_eq!(loaded.len(), 1, "an unknown id is left out");
    let stored = loaded[&id].clone();
    assert_eq!(stored.version, 1);
    assert_eq!(stored.features, first.features);
    assert_eq!(stored.snapshot, first.snapshot);

    // Inserting it again, or updating from a stale version, conflicts and
    // writes nothing, not even the transition beside it.
    let again = store
        .commit(&ChangeSet {
            customers: vec![write(first.clone())],
            transitions: vec![transition(id, now())],
            ..ChangeSet::default()
        })
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    let mut next = record(id, LifecycleStage::Conversion, None);
    next.version = 1;
    store
        .commit(&ChangeSet {
            customers: vec![write(next.clone())],
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    let stale = store
        .commit(&ChangeSet {
            customers: vec![write(next.clone())],
            ..ChangeSet::default()
        })
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");
    let stored = store.load_customers(&[id]).await.unwrap()[&id].clone();
    assert_eq!(stored.version, 2);
    assert_eq!(
        stored.snapshot.unwrap().state.stage,
        Some(LifecycleStage::Conversion)
    );
    let listed = listed_for(store.as_ref(), id).await;
    assert!(
        listed.is_empty(),
        "the conflicting commit left a transition"
    );
}

async fn the_cursor_moves_only_from_the_value_read(backend: Backend) {
    let store = backend.store;
    let shard = ShardFilter { index: 1, count: 4 };
    let step = |expected: &str, new: &str| ChangeSet {
        cursor: Some(CursorMove {
            consumer: "test.log",
            shard,
            expected: expected.to_owned(),
            new: new.to_owned(),
            fence: Default::default(),
        }),
        ..ChangeSet::default()
    };
    assert_eq!(store.saved_cursor("test.log", shard).await.unwrap(), "");
    store.commit(&step("", "0-1")).await.unwrap();
    assert_eq!(store.saved_cursor("test.log", shard).await.unwrap(), "0-1");
    // A second consumer that read nothing, or an old value, loses.
    let lost = store.commit(&step("", "0-2")).await;
    assert!(matches!(lost, Err(StoreError::CursorMoved(_))), "{lost:?}");
    let id = Uuid::now_v7();
    let mut with_customer = step("0-0", "0-9");
    with_customer
        .customers
        .push(write(record(id, LifecycleStage::Reach, None)));
    let lost = store.commit(&with_customer).await;
    assert!(matches!(lost, Err(StoreError::CursorMoved(_))), "{lost:?}");
    assert!(
        store.load_customers(&[id]).await.unwrap().is_empty(),
        "state was written although the cursor had moved"
    );
    store.commit(&step("0-1", "0-5")).await.unwrap();
    assert_eq!(store.saved_cursor("test.log", shard).await.unwrap(), "0-5");
    // Other shards keep their own cursor.
    assert_eq!(
        store
            .saved_cursor("test.log", ShardFilter::ALL)
            .await
            .unwrap(),
        ""
    );
}

async fn transitions_are_listed_and_logged(backend: Backend) {
    let store = backend.store;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let base = now() - TimeDelta::days(10);
    let transitions: Vec<RecordedTransition> = (0..6)
        .map(|i| transition(if i % 2 == 0 { a } else { b }, base + TimeDelta::days(i)))
        .collect();
    store
        .commit(&ChangeSet {
            transitions: transitions.clone(),
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    let query = |customer: Option<Uuid>, start, end, after, limit| TransitionQuery {
        customer_id: customer,
        start,
        end,
        after,
        limit,
    };
    let of_a = store
        .list_transitions(&query(Some(a), None, None, None, 10))
        .await
        .unwrap();
    assert_eq!(of_a.len(), 3);
    assert!(of_a.iter().all(|t| t.customer_id == a));
    let window = store
        .list_transitions(&query(
            None,
            Some(base + TimeDelta::days(1)),
            Some(base + TimeDelta::days(4)),
            None,
            10,
        ))
        .await
        .unwrap();
    let ids: Vec<Uuid> = window.iter().map(|t| t.id).collect();
    let expected: Vec<Uuid> = transitions[1..4].iter().map(|t| t.id).collect();
    assert_eq!(
        ids, expected,
        "oldest first, start inclusive, end exclusive"
    );
    // Paging by (time, id).
    let first = store
        .list_transitions(&query(None, None, None, None, 4))
        .await
        .unwrap();
    let last = first.last().unwrap();
    let position = (last.at, last.id);
    let rest = store
        .list_transitions(&query(None, None, None, Some(position), 4))
        .await
        .unwrap();
    assert_eq!(first.len() + rest.len(), 6);
    assert_eq!(rest[0].id, transitions[4].id);
    // The newest transition: latest time, then the greater id; none for a
    // customer without transitions.
    assert_eq!(
        store.last_transition(a).await.unwrap().as_ref(),
        Some(&transitions[4])
    );
    let tie = transition(a, base + TimeDelta::days(4));
    store
        .commit(&ChangeSet {
            transitions: vec![tie.clone()],
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    assert_eq!(store.last_transition(a).await.unwrap(), Some(tie));
    assert_eq!(store.last_transition(Uuid::now_v7()).await.unwrap(), None);
    // The log holds every transition, in commit order.
    let log = store
        .transition_log()
        .read_after(Cursor::START, ShardFilter::ALL, 100)
        .await
        .unwrap();
    assert_eq!(log.len(), 7);
    for (entry, transition) in log.iter().zip(&transitions) {
        let decoded =
            <pb::TransitionLogEntry as prost::Message>::decode(entry.payload.as_slice()).unwrap();
        match decoded.change {
            Some(pb::transition_log_entry::Change::Transition(logged)) => {
                assert_eq!(logged, transition.to_proto())
            }
            other => panic!("not a transition: {other:?}"),
        }
        assert_eq!(entry.customer_id, Some(transition.customer_id));
    }
}

async fn models_are_stored_activated_and_listed(backend: Backend) {
    let store = backend.store;
    let builtin = default_model();
    store.install_default(&builtin, now()).await.unwrap();
    store.install_default(&builtin, now()).await.unwrap();
    let active = store.active_model().await.unwrap().unwrap();
    assert_eq!(active.version, builtin.version);
    assert!(active.built_in);
    assert!(active.same_content(&builtin));

    let mut second = builtin.clone();
    second.version = "second".to_owned();
    second.built_in = false;
    second.lead.mql_threshold = 30.0;
    second.create_time = Some(now() + TimeDelta::seconds(1));
    assert!(matches!(
        store.insert_model(&second).await.unwrap(),
        ModelInsert::Created(_)
    ));
    match store.insert_model(&second).await.unwrap() {
        ModelInsert::Exists(stored) => assert!(stored.same_content(&second)),
        other => panic!("{other:?}"),
    }
    let listed = store.list_models(None, 10).await.unwrap();
    let versions: Vec<&str> = listed.iter().map(|m| m.version.as_str()).collect();
    assert_eq!(
        versions,
        ["second", builtin.version.as_str()],
        "newest first"
    );
    let first_page = store.list_models(None, 1).await.unwrap();
    let after = (
        first_page[0].create_time.unwrap(),
        first_page[0].version.clone(),
    );
    let next = store.list_models(Some(after), 1).await.unwrap();
    assert_eq!(next[0].version, builtin.version);

    // A pending rescore is cancelled by an activation, which starts its own.
    let (pending, started) = store
        .start_rescore(rescore_row(&builtin.version, 0))
        .await
        .unwrap();
    assert!(started);
    assert!(matches!(
        store
            .activate("missing", None, rescore_row("missing", 0), now())
            .await
            .unwrap(),
        Activation::NotFound
    ));
    assert!(matches!(
        store.activate("second", Some("other"), rescore_row("second", 0), now()).await.unwrap(),
        Activation::NotExpected(active) if active == builtin.version
    ));
    let rescore = rescore_row("second", 0);
    match store
        .activate("second", Some(&builtin.version), rescore.clone(), now())
        .await
        .unwrap()
    {
        Activation::Activated(model, started) => {
            assert_eq!(model.version, "second");
            assert_eq!(model.state, clm_scoring::ModelState::Active);
            assert_eq!(started.id, rescore.id);
        }
        other => panic!("{other:?}"),
    }
    let cancelled = store.rescore(Some(pending.id)).await.unwrap().unwrap();
    assert_eq!(cancelled.state, pb::RescoreState::Cancelled as i32);
    assert!(cancelled.end_time.is_some());
    assert!(matches!(
        store
            .activate("second", None, rescore_row("second", 0), now())
            .await
            .unwrap(),
        Activation::AlreadyActive(_)
    ));
    assert_eq!(
        store.active_model().await.unwrap().unwrap().version,
        "second"
    );
    let old = store.model(&builtin.version).await.unwrap().unwrap();
    assert_eq!(old.state, clm_scoring::ModelState::Inactive);
    // Installing the default again does not take the active place back.
    store.install_default(&builtin, now()).await.unwrap();
    assert_eq!(
        store.active_model().await.unwrap().unwrap().version,
        "second"
    );
}

async fn rescores_record_progress_until_stopped(backend: Backend) {
    let store = backend.store;
    let (first, started) = store.start_rescore(rescore_row("m", 10)).await.unwrap();
    assert!(started);
    let (same, started) = store.start_rescore(rescore_row("m", 10)).await.unwrap();
    assert!(!started, "a pending rescore is returned, not doubled");
    assert_eq!(same.id, first.id);
    assert_eq!(store.rescore_to_run().await.unwrap().unwrap().id, first.id);
    store
        .set_rescore_state(first.id, pb::RescoreState::Running as i32, now(), "")
        .await
        .unwrap();
    let last = Uuid::now_v7();
    let page = ChangeSet {
        rescore: Some(RescoreProgress {
            id: first.id,
            done: 4,
            changed: 1,
            rate_per_second: 2.5,
            resume_after: last,
            resumed_from: None,
            shard: ShardFilter::ALL,
        }),
        ..ChangeSet::default()
    };
    store.commit(&page).await.unwrap();
    // A second worker that read the rescore before that page cannot count
    // it again.
    let twice = store.commit(&page).await;
    assert!(
        matches!(twice, Err(StoreError::RescoreStopped)),
        "{twice:?}"
    );
    let running = store.rescore(None).await.unwrap().unwrap();
    assert_eq!(running.state, pb::RescoreState::Running as i32);
    assert_eq!((running.done_count, running.changed_count), (4, 1));
    assert_eq!(running.resume_after, Some(last));
    assert!(running.start_time.is_some());
    assert_eq!(
        store
            .rescore_shard(first.id, ShardFilter::ALL)
            .await
            .unwrap(),
        (Some(last), false)
    );
    store
        .set_rescore_state(first.id, pb::RescoreState::Cancelled as i32, now(), "")
        .await
        .unwrap();
    let stopped = store
        .commit(&ChangeSet {
            rescore: Some(RescoreProgress {
                id: first.id,
                done: 1,
                changed: 0,
                rate_per_second: 1.0,
                resume_after: last,
                resumed_from: Some(last),
                shard: ShardFilter::ALL,
            }),
            ..ChangeSet::default()
        })
        .await;
    assert!(
        matches!(stopped, Err(StoreError::RescoreStopped)),
        "{stopped:?}"
    );
    assert!(store.rescore_to_run().await.unwrap().is_none());
    let ended = store.rescore(Some(first.id)).await.unwrap().unwrap();
    assert_eq!(ended.done_count, 4);
    assert_eq!(ended.rate_per_second, 0.0);
}

async fn due_scored_and_unpushed_customers_are_found(backend: Backend) {
    let store = backend.store;
    let at = now();
    let early = Uuid::now_v7();
    let late = Uuid::now_v7();
    let future = Uuid::now_v7();
    let merged = Uuid::now_v7();
    let mut gone = record(merged, LifecycleStage::Reach, None);
    gone.merged_into = Some(early);
    let unscored = CustomerRecord::new(Uuid::now_v7());
    store
        .commit(&ChangeSet {
            customers: vec![
                write(record(
                    late,
                    LifecycleStage::Reach,
                    Some(at - TimeDelta::hours(1)),
                )),
                write(record(
                    early,
                    LifecycleStage::Reach,
                    Some(at - TimeDelta::days(1)),
                )),
                write(record(
                    future,
                    LifecycleStage::Reach,
                    Some(at + TimeDelta::days(1)),
                )),
                write(gone),
                write(unscored),
            ],
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    assert_eq!(
        store.due_customers(at, 10, ShardFilter::ALL).await.unwrap(),
        [early, late]
    );
    assert_eq!(
        store.due_customers(at, 1, ShardFilter::ALL).await.unwrap(),
        [early]
    );
    assert_eq!(store.count_scored().await.unwrap(), 3);
    let mut scored: Vec<Uuid> = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .customers_after(after, 2, ShardFilter::ALL)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.customer_id);
        scored.extend(page.iter().map(|r| r.customer_id));
    }
    let mut expected = vec![early, late, future];
    expected.sort();
    assert_eq!(
        scored, expected,
        "by id, without merged or unscored customers"
    );

    let pending = store
        .unpushed(100, true, None, &[ShardFilter::ALL])
        .await
        .unwrap();
    let pushed: Vec<Uuid> = pending.iter().map(|p| p.0).collect();
    assert_eq!(
        pushed, expected,
        "every customer's first snapshot is a new position; only snapshots are pushed, in id order"
    );
    assert!(
        store
            .unpushed(100, false, None, &[ShardFilter::ALL])
            .await
            .unwrap()
            .is_empty(),
        "none of them has a change of scores alone"
    );
    // A round goes on after where the previous one ended.
    let after_first: Vec<Uuid> = store
        .unpushed(1, true, Some(expected[0]), &[ShardFilter::ALL])
        .await
        .unwrap()
        .iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(after_first, [expected[1]]);
    assert!(
        store
            .unpushed(100, true, Some(expected[2]), &[ShardFilter::ALL])
            .await
            .unwrap()
            .is_empty()
    );
    store
        .mark_pushed(&pending.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>(), &[])
        .await
        .unwrap();
    assert!(
        store
            .unpushed(100, true, None, &[ShardFilter::ALL])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .unpushed(100, false, None, &[ShardFilter::ALL])
            .await
            .unwrap()
            .is_empty()
    );
    // A newer write needs a new push; marking an older version does not
    // hide it. A change of scores alone is not a change of position.
    let mut again = store.load_customers(&[late]).await.unwrap()[&late].clone();
    again.next_due_at = None;
    store
        .commit(&ChangeSet {
            customers: vec![CustomerWrite {
                position_changed: false,
                ..write(again)
            }],
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    store.mark_pushed(&[(late, 1)], &[]).await.unwrap();
    assert!(
        store
            .unpushed(100, true, None, &[ShardFilter::ALL])
            .await
            .unwrap()
            .is_empty()
    );
    let pending = store
        .unpushed(100, false, None, &[ShardFilter::ALL])
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!((pending[0].0, pending[0].1), (late, 2));
}

fn touchpoint_input(key: &str, at: DateTime<Utc>) -> Input {
    Input {
        at,
        key: key.to_owned(),
        fact: Fact::Touchpoint {
            touchpoint_type: "purchase".to_owned(),
            channel: clm_proto::touchpoint::Channel::Web as i32,
            revenue: Some(("EUR".to_owned(), 1_500_000)),
        },
    }
}

fn profile_input(company: &str) -> Input {
    Input {
        at: DateTime::UNIX_EPOCH,
        key: "profile".to_owned(),
        fact: Fact::Profile(ProfileFacts {
            company: company.to_owned(),
            ..ProfileFacts::default()
        }),
    }
}

fn sorted(mut inputs: Vec<Input>) -> Vec<Input> {
    inputs.sort_by(|a, b| a.key.cmp(&b.key));
    inputs
}

async fn inputs_are_kept_replaced_moved_and_forgotten(backend: Backend) {
    let store = backend.store;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let t0 = now();
    let mut first = record(a, LifecycleStage::Reach, None);
    first.folded_to = Some(t0);
    store
        .commit(&ChangeSet {
            customers: vec![write(first)],
            inputs: vec![
                (a, touchpoint_input("tp-1", t0)),
                (a, profile_input("Acme")),
                (b, touchpoint_input("tp-2", t0 + TimeDelta::seconds(1))),
                (b, profile_input("Globex")),
            ],
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    let loaded = store.load_customers(&[a]).await.unwrap();
    assert_eq!(loaded[&a].folded_to, Some(t0));
    assert!(loaded[&a].inputs_kept);
    let kept = store.load_inputs(&[a, b]).await.unwrap();
    assert_eq!(
        sorted(kept[&a].clone()),
        [profile_input("Acme"), touchpoint_input("tp-1", t0)]
    );
    assert_eq!(kept[&b].len(), 2);

    // A profile is replaced; a touchpoint kept again stays as it is.
    store
        .commit(&ChangeSet {
            inputs: vec![
                (a, profile_input("Initech")),
                (a, touchpoint_input("tp-1", t0)),
            ],
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    let kept = store.load_inputs(&[a]).await.unwrap();
    assert_eq!(
        sorted(kept[&a].clone()),
        [profile_input("Initech"), touchpoint_input("tp-1", t0)]
    );

    // B merged into A: B's touchpoints become A's, B's profile goes.
    store
        .commit(&ChangeSet {
            moved_inputs: vec![(b, a)],
            forgotten_profiles: vec![b],
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    let kept = store.load_inputs(&[a, b]).await.unwrap();
    assert!(!kept.contains_key(&b));
    assert_eq!(
        sorted(kept[&a].clone()),
        [
            profile_input("Initech"),
            touchpoint_input("tp-1", t0),
            touchpoint_input("tp-2", t0 + TimeDelta::seconds(1)),
        ]
    );

    // Erasure forgets the profile and keeps the touchpoints.
    store
        .commit(&ChangeSet {
            forgotten_profiles: vec![a],
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    let kept = store.load_inputs(&[a]).await.unwrap();
    assert!(kept[&a].iter().all(|input| !input.is_profile()));
    assert_eq!(kept[&a].len(), 2);
}

async fn retracted_transitions_leave_the_list_and_are_logged(backend: Backend) {
    let store = backend.store;
    let id = Uuid::now_v7();
    let at = now();
    let kept = transition(id, at);
    let gone = transition(id, at + TimeDelta::seconds(1));
    store
        .commit(&ChangeSet {
            transitions: vec![kept.clone(), gone.clone()],
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    let replacement = transition(id, at + TimeDelta::seconds(2));
    store
        .commit(&ChangeSet {
            transitions: vec![replacement.clone()],
            retracted: vec![gone.clone()],
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    let listed = listed_for(store.as_ref(), id).await;
    assert_eq!(listed, [kept.clone(), replacement.clone()]);
    let other = Uuid::now_v7();
    let by_customer = store.customer_transitions(&[id, other]).await.unwrap();
    assert_eq!(
        by_customer.len(),
        1,
        "a customer without transitions is left out"
    );
    assert_eq!(by_customer[&id], listed);
    // On PostgreSQL an entry shows once every older transaction of the
    // cluster has ended.
    let mut log = Vec::new();
    for _ in 0..200 {
        log = store
            .transition_log()
            .read_after(Cursor::START, ShardFilter::ALL, 100)
            .await
            .unwrap();
        if log.len() >= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let changes: Vec<_> = log
        .iter()
        .map(|entry| {
            <pb::TransitionLogEntry as prost::Message>::decode(entry.payload.as_slice())
                .unwrap()
                .change
                .unwrap()
        })
        .collect();
    assert_eq!(changes.len(), 4);
    assert!(matches!(
        &changes[2],
        pb::transition_log_entry::Change::Retracted(r) if r.transition == Some(gone.to_proto())
    ));
    assert!(matches!(
        &changes[3],
        pb::transition_log_entry::Change::Transition(t) if *t == replacement.to_proto()
    ));
}

clm_platform::on_both_backends!(
    sqlite: super::sqlite, postgres: super::postgres;
    customers_are_written_with_a_version_check,
    the_cursor_moves_only_from_the_value_read,
    transitions_are_listed_and_logged,
    models_are_stored_activated_and_listed,
    rescores_record_progress_until_stopped,
    due_scored_and_unpushed_customers_are_found,
    inputs_are_kept_replaced_moved_and_forgotten,
    retracted_transitions_leave_the_list_and_are_logged,
);

/// On PostgreSQL the sweep, the pusher and rescore pages of a shard read
/// only that shard's customers, and a rescore succeeds once every shard has
/// finished.
#[tokio::test]
async fn postgres_divides_customers_and_rescores_by_shard() {
    let Some(backend) = postgres().await else {
        return;
    };
    let store = backend.store;
    let at = now();
    let ids: Vec<Uuid> = (0..40).map(|_| Uuid::now_v7()).collect();
    store
        .commit(&ChangeSet {
            customers: ids
                .iter()
                .map(|id| {
                    write(record(
                        *id,
                        LifecycleStage::Reach,
                        Some(at - TimeDelta::hours(1)),
                    ))
                })
                .collect(),
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    let shard_of = |id: &Uuid| clm_eventlog::shard_of(Some(*id)) as u32 % 4;
    let mut seen = Vec::new();
    for index in 0..4 {
        let shard = ShardFilter { index, count: 4 };
        let due = store.due_customers(at, 100, shard).await.unwrap();
        let page = store.customers_after(None, 100, shard).await.unwrap();
        let pending = store.unpushed(100, true, None, &[shard]).await.unwrap();
        assert!(
            due.iter().all(|id| shard_of(id) == index),
            "due of shard {index}"
        );
        assert_eq!(
            page.iter().map(|r| r.customer_id).collect::<Vec<_>>(),
            {
                let mut mine: Vec<Uuid> = ids
                    .iter()
                    .copied()
                    .filter(|id| shard_of(id) == index)
                    .collect();
                mine.sort();
                mine
            },
            "scored customers of shard {index}"
        );
        assert!(pending.iter().all(|(id, _, _)| shard_of(id) == index));
        seen.extend(due);
    }
    // The pusher reads the shards a replica holds in one scan.
    let two = [
        ShardFilter { index: 0, count: 4 },
        ShardFilter { index: 2, count: 4 },
    ];
    let pending = store.unpushed(100, true, None, &two).await.unwrap();
    assert!(!pending.is_empty());
    assert!(
        pending
            .iter()
            .all(|(id, _, _)| [0, 2].contains(&shard_of(id)))
    );
    seen.sort();
    let mut all = ids.clone();
    all.sort();
    assert_eq!(seen, all, "every due customer is in exactly one shard");

    let (rescore, _) = store.start_rescore(rescore_row("m", 40)).await.unwrap();
    store
        .set_rescore_state(rescore.id, pb::RescoreState::Running as i32, now(), "")
        .await
        .unwrap();
    let shards = [
        ShardFilter { index: 0, count: 2 },
        ShardFilter { index: 1, count: 2 },
    ];
    let last = ids[0];
    store
        .commit(&ChangeSet {
            rescore: Some(RescoreProgress {
                id: rescore.id,
                done: 3,
                changed: 0,
                rate_per_second: 1.0,
                resume_after: last,
                resumed_from: None,
                shard: shards[0],
            }),
            ..ChangeSet::default()
        })
        .await
        .unwrap();
    // A shard finishes only from where its progress stands.
    let stale = store
        .finish_rescore_shard(rescore.id, shards[0], None, now(), &Fence::Sole)
        .await;
    assert!(
        matches!(stale, Err(StoreError::RescoreStopped)),
        "{stale:?}"
    );
    assert!(
        !store
            .finish_rescore_shard(rescore.id, shards[0], Some(last), now(), &Fence::Sole)
            .await
            .unwrap(),
        "one shard of two done"
    );
    assert_eq!(
        store.rescore_shard(rescore.id, shards[0]).await.unwrap(),
        (Some(last), true)
    );
    assert_eq!(
        store
            .rescore(Some(rescore.id))
            .await
            .unwrap()
            .unwrap()
            .state,
        pb::RescoreState::Running as i32
    );
    // A shard without customers finishes from nothing.
    assert!(
        store
            .finish_rescore_shard(rescore.id, shards[1], None, now(), &Fence::Sole)
            .await
            .unwrap(),
        "every shard done"
    );
    let ended = store.rescore(Some(rescore.id)).await.unwrap().unwrap();
    assert_eq!(ended.state, pb::RescoreState::Succeeded as i32);
    assert_eq!(ended.done_count, 3);
}

/// One process owns every shard of a SQLite store: asking it for part of
/// the work is refused rather than answered wrongly.
#[tokio::test]
async fn sqlite_serves_only_the_whole() {
    let store = sqlite().await.store;
    let half = ShardFilter { index: 0, count: 2 };
    assert!(store.due_customers(now(), 10, half).await.is_err());
    assert!(store.customers_after(None, 10, half).await.is_err());
    assert!(store.unpushed(10, true, None, &[half]).await.is_err());
}

/// Customers stored before they carried their shard get it from the
/// migration, as shard_of computes it.
#[tokio::test]
async fn postgres_gives_customers_stored_earlier_their_shard() {
    let Some(url) = clm_platform::testing::fresh_postgres_database("scoring").await else {
        return;
    };
    let pools = db::connect(&url, "scoring", 2).await.unwrap();
    let before_shards = db::ServiceMigrations {
        postgres: &store::MIGRATIONS.postgres[..4],
        ..store::MIGRATIONS
    };
    before_shards.run(&pools).await.unwrap();
    let db::Pools::Postgres(pool) = &pools else {
        unreachable!("a PostgreSQL database")
    };
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    sqlx::query(
        "INSERT INTO customers (customer_id, version) SELECT id, 1 FROM UNNEST($1::uuid[]) AS id",
    )
    .bind(&ids)
    .execute(pool)
    .await
    .unwrap();
    store::MIGRATIONS.run(&pools).await.unwrap();
    for id in ids {
        let shard: i32 = sqlx::query_scalar("SELECT shard FROM customers WHERE customer_id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(shard, clm_eventlog::shard_of(Some(id)));
    }
}
