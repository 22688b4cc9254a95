//! A customer's history as a function of their inputs.
//!
//! The inputs of a customer are their touchpoints, each at its
//! `occur_time`, their survey answers (NPS, CSAT, CES) from the feedback
//! log, each at its `submit_time`, and the profile identity holds for them
//! now. The profile
//! applies to the whole history (identity keeps no history of profiles, so a
//! replay of the customer event log can only read the current one): it is
//! folded in first, and a change of it derives the history again. Their
//! history is what folding the inputs in event time gives:
//! inputs of one instant are applied together and evaluated once at that
//! instant, and between two inputs the customer is evaluated at each time the
//! model said the result would change by time alone (cause SWEEP), as the
//! sweep would have done had the inputs arrived live. So the history depends
//! on the inputs only, never on how they were batched or when they arrived.
//!
//! An input that arrives after the customer's history was derived past its
//! time is late: the history is derived again from all kept inputs (see
//! [`rederive`]), and the transitions from the first one that differs are
//! replaced.

use chrono::{DateTime, Utc};
use clm_proto::touchpoint::Channel;

use crate::compiled_model::CompiledModel;
use crate::features::{Money, TouchpointFacts};
use crate::history::{Cause, RecordedTransition};
use crate::scorer::evaluate_record;
use crate::store::{CustomerRecord, Fact, Input, SurveyScore};

/// The most evaluations at due times that one fold makes in a row: a bound
/// for models whose due times never end (each is a step forward in time).
pub const MAX_DUE_EVALUATIONS: usize = 1_000;

/// The key of a customer's profile among their inputs.
pub const PROFILE_KEY: &str = "profile";

/// The profile input: what identity holds for the customer, from the start
/// of their history.
pub fn profile_input(profile: crate::features::ProfileFacts) -> Input {
    Input {
        at: DateTime::UNIX_EPOCH,
        key: PROFILE_KEY.to_owned(),
        fact: Fact::Profile(profile),
    }
}

/// Puts inputs (in arrival order) in fold order: by time, then key; of two
/// with one key (a profile replaced), the later arrival stays.
pub fn in_fold_order(inputs: &mut Vec<Input>) {
    inputs.reverse();
    inputs.sort_by(|a, b| (a.at, &a.key).cmp(&(b.at, &b.key)));
    inputs.dedup_by(|a, b| a.key == b.key);
}

/// Evaluates `record` at each due time before `until` (or at it, with
/// `inclusive`), appending the transitions to `out`.
pub fn catch_up(
    model: &CompiledModel,
    record: &mut CustomerRecord,
    until: DateTime<Utc>,
    inclusive: bool,
    out: &mut Vec<RecordedTransition>,
) {
    for _ in 0..MAX_DUE_EVALUATIONS {
        let Some(due) = record.next_due_at else {
            return;
        };
        if due > until || (due == until && !inclusive) {
            return;
        }
        out.extend(evaluate_record(model, record, due, Cause::Sweep, None));
        if record.next_due_at.is_some_and(|next| next <= due) {
            // Not a step forward: leave it to the sweep rather than spin.
            return;
        }
    }
}

/// Folds `inputs` (in fold order, none at or before the record's
/// [`derived_to`](CustomerRecord::derived_to)) into `record`, then evaluates
/// at the due times up to `now`. Returns the transitions made.
pub fn fold(
    model: &CompiledModel,
    record: &mut CustomerRecord,
    inputs: &[Input],
    now: DateTime<Utc>,
) -> Vec<RecordedTransition> {
    let mut out = Vec::new();
    for group in inputs.chunk_by(|a, b| a.at == b.at) {
        let at = group[0].at;
        catch_up(model, record, at, false, &mut out);
        let mut touchpoint = None;
        let mut profile_changed = false;
        let mut answered = false;
        for input in group {
            match &input.fact {
                Fact::Touchpoint {
                    touchpoint_type,
                    channel,
                    revenue,
                } => {
                    record.features.apply(&TouchpointFacts {
                        touchpoint_type,
                        channel: Channel::try_from(*channel).unwrap_or_default(),
                        occurred_at: at,
                        revenue: revenue.as_ref().map(|(currency, micros)| Money {
                            currency_code: currency,
                            amount_micros: *micros,
                        }),
                    });
                    touchpoint = Some(input.key.as_str());
                }
                Fact::Profile(profile) => {
                    if record.features.profile() != profile {
                        record.features.set_profile(profile.clone());
                        profile_changed = true;
                    }
                }
                Fact::SurveyAnswer { kind, score } => {
                    match kind {
                        SurveyScore::Nps => record.features.record_nps(*score, at),
                        SurveyScore::Csat => record.features.record_csat(*score, at),
                        SurveyScore::Ces => record.features.record_ces(*score, at),
                    }
                    answered = true;
                }
            }
        }
        record.folded_to = record.folded_to.max(Some(at));
        if let Some(touchpoint_id) = touchpoint {
            out.extend(evaluate_record(
                model,
                record,
                at,
                Cause::Touchpoint,
                Some(touchpoint_id),
            ));
        } else if answered {
            // A survey answer feeds stage and health rules (NPS, CSAT).
            out.extend(evaluate_record(model, record, at, Cause::Feedback, None));
        } else if profile_changed && record.snapshot.is_some() {
            // The profile feeds fit rules: customers already scored are
            // evaluated; others wait for a touchpoint.
            out.extend(evaluate_record(model, record, at, Cause::Profile, None));
        }
    }
    catch_up(model, record, now, true, &mut out);
    out
}

/// A history derived again.
#[derive(Debug, Default)]
pub struct Rederived {
    /// Transitions of the old history that the new one does not make.
    pub retracted: Vec<RecordedTransition>,
    /// Transitions of the new history that the old one did not make.
    pub added: Vec<RecordedTransition>,
}

/// Derives `record`'s history again from all its `inputs` (in arrival
/// order: a replaced profile before its replacement), up to `now`,
/// against its recorded transitions `old` (in ListTransitions order). The
/// record is replaced by the fold's (keeping its id and stored version);
/// the transitions up to the first that differs are kept with their ids.
pub fn rederive(
    model: &CompiledModel,
    record: &mut CustomerRecord,
    mut inputs: Vec<Input>,
    mut old: Vec<RecordedTransition>,
    now: DateTime<Utc>,
) -> Rederived {
    in_fold_order(&mut inputs);
    let mut fresh = CustomerRecord {
        version: record.version,
        ..CustomerRecord::new(record.customer_id)
    };
    let mut derived = fold(model, &mut fresh, &inputs, now);
    // Identity keeps the snapshot evaluated last, so a snapshot never goes
    // back in time: when the old one was evaluated later (at a due time the
    // late input took away, or by Evaluate), the new history is evaluated
    // at that time too. Every due time up to `now` is behind it, so nothing
    // moves then, unless the active model changed meanwhile.
    if let Some(floor) = record.snapshot.as_ref().map(|s| s.evaluated_at)
        && fresh
            .snapshot
            .as_ref()
            .is_some_and(|s| s.evaluated_at < floor)
    {
        derived.extend(evaluate_record(
            model,
            &mut fresh,
            floor,
            Cause::Sweep,
            None,
        ));
    }
    *record = fresh;
    let kept = old
        .iter()
        .zip(&derived)
        .take_while(|(old, new)| old.same_move(new))
        .count();
    Rederived {
        retracted: old.split_off(kept),
        added: derived.split_off(kept),
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone as _};
    use uuid::Uuid;

    use super::*;
    use crate::default_model;

    fn model() -> CompiledModel {
        CompiledModel::compile(default_model()).unwrap()
    }

    fn day(n: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 1, 9, 0, 0).unwrap() + Duration::days(n)
    }

    fn touch(n: i64, kind: &str) -> Input {
        Input {
            at: day(n),
            key: format!("tp-{n}-{kind}"),
            fact: Fact::Touchpoint {
                touchpoint_type: kind.to_owned(),
                channel: Channel::Web as i32,
                revenue: (kind == "purchase").then(|| ("EUR".to_owned(), 50_000_000)),
            },
        }
    }

    fn backfill() -> Vec<Input> {
        [
            (0, "page_view"),
            (3, "form_submit"),
            (9, "demo_request"),
            (20, "purchase"),
            (140, "purchase"),
            (150, "page_view"),
            (250, "renewal"),
        ]
        .into_iter()
        .map(|(n, kind)| touch(n, kind))
        .collect()
    }

    type Move = (i64, Option<crate::LifecycleStage>, Option<crate::Health>);

    fn moves(transitions: &[RecordedTransition]) -> Vec<Move> {
        transitions
            .iter()
            .map(|t| ((t.at - day(0)).num_days(), t.to.stage, t.to.health))
            .collect()
    }

    fn answer(n: i64, score: i64) -> Input {
        Input {
            at: day(n),
            key: format!("response/r-{n}/recommend"),
            fact: Fact::SurveyAnswer {
                kind: SurveyScore::Nps,
                score,
            },
        }
    }

    #[test]
    fn survey_answers_fold_in_at_their_time_in_any_arrival_order() {
        let model = model();
        let id = Uuid::now_v7();
        let now = day(400);
        let mut inputs = backfill();
        inputs.extend([answer(30, 10), answer(200, 3)]);
        let mut ordered = inputs.clone();
        in_fold_order(&mut ordered);
        let mut batch = CustomerRecord::new(id);
        let all = fold(&model, &mut batch, &ordered, now);
        // The promoter of day 30 is evidence for ADVOCACY, then, and the
        // detractor of day 200 makes the latest NPS 3.
        assert!(
            moves(&all).iter().any(
                |(day, stage, _)| *day == 30 && *stage == Some(crate::LifecycleStage::Advocacy)
            ),
            "{:?}",
            moves(&all)
        );
        assert_eq!(batch.features.nps().map(|answer| answer.score), Some(3));
        assert!(all.iter().any(|t| t.cause == Cause::Feedback));

        // The answers arriving last (late, after everything else) and one
        // by one give the same history.
        let mut trickle = CustomerRecord::new(id);
        let mut history: Vec<RecordedTransition> = Vec::new();
        let mut kept = Vec::new();
        let mut arrival = backfill();
        arrival.extend([answer(200, 3), answer(30, 10)]);
        for input in arrival {
            kept.push(input);
            let again = rederive(&model, &mut trickle, kept.clone(), history.clone(), now);
            let retracted = again.retracted.len();
            history.truncate(history.len() - retracted);
            history.extend(again.added);
        }
        assert_eq!(moves(&history), moves(&all));
        assert_eq!(trickle.features.nps(), batch.features.nps());
    }

    #[test]
    fn one_at_a_time_and_all_at_once_give_the_same_history() {
        let model = model();
        let id = Uuid::now_v7();
        let now = day(400);
        let mut batch = CustomerRecord::new(id);
        let all = fold(&model, &mut batch, &backfill(), now);

        // One input per call, each late against what the sweep derived
        // up to now: the history is derived again each time.
        let mut trickle = CustomerRecord::new(id);
        let mut history: Vec<RecordedTransition> = Vec::new();
        let mut kept = Vec::new();
        for input in backfill() {
            kept.push(input);
            let again = rederive(&model, &mut trickle, kept.clone(), history.clone(), now);
            let retracted = again.retracted.len();
            history.truncate(history.len() - retracted);
            history.extend(again.added);
        }
        assert_eq!(moves(&history), moves(&all));
        // The same position; the trickle's snapshot may be evaluated later
        // (it never goes back in time).
        let state = |record: &CustomerRecord| record.snapshot.as_ref().map(|s| s.state);
        assert_eq!(state(&trickle), state(&batch));
        assert_eq!(trickle.next_due_at, batch.next_due_at);
        // The purchase on day 20 converts, at its own time.
        assert!(
            moves(&all).contains(&(
                20,
                Some(crate::LifecycleStage::Conversion),
                Some(crate::Health::Active)
            )),
            "{:?}",
            moves(&all)
        );
    }

    #[test]
    fn due_times_between_inputs_are_evaluated_in_event_time() {
        let model = model();
        let mut record = CustomerRecord::new(Uuid::now_v7());
        let history = fold(&model, &mut record, &backfill(), day(400));
        let sweeps: Vec<_> = history.iter().filter(|t| t.cause == Cause::Sweep).collect();
        // A long gap between the purchases leaves the customer at risk
        // before the second, at a due time, not at the time of folding.
        assert!(!sweeps.is_empty());
        for sweep in sweeps {
            assert!(sweep.at < day(400));
        }
    }

    #[test]
    fn a_snapshot_never_goes_back_in_time() {
        // Silent after day 0: at risk on day 61, by the sweep. A touchpoint
        // of day 50 arrives on day 70: no longer at risk, and the snapshot
        // stays at day 61, the evaluation identity holds.
        let model = model();
        let mut record = CustomerRecord::new(Uuid::now_v7());
        let first = vec![touch(0, "page_view")];
        let old = fold(&model, &mut record, &first, day(70));
        let at_risk = record.snapshot.clone().unwrap();
        assert_eq!(at_risk.evaluated_at, day(61));
        let mut inputs = first;
        inputs.push(touch(50, "page_view"));
        let again = rederive(&model, &mut record, inputs, old, day(70));
        let now = record.snapshot.as_ref().unwrap();
        assert_eq!(now.evaluated_at, at_risk.evaluated_at);
        assert_eq!(now.state.health, Some(crate::Health::Active));
        assert_eq!(again.retracted.len(), 1, "the move to at risk is retracted");
        assert!(again.added.is_empty(), "{:?}", again.added);
    }

    #[test]
    fn the_kept_prefix_keeps_its_ids() {
        let model = model();
        let id = Uuid::now_v7();
        let mut record = CustomerRecord::new(id);
        let mut inputs = backfill();
        let late = inputs.remove(4);
        let old = fold(&model, &mut record, &inputs, day(400));
        inputs.push(late);
        let again = rederive(&model, &mut record, inputs, old.clone(), day(400));
        let kept = old.len() - again.retracted.len();
        assert!(kept > 0, "the history before the late input stays");
        for retracted in &again.retracted {
            assert!(
                retracted.at >= day(140),
                "only moves at or after the late input go"
            );
        }
    }
}
