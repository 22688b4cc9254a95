//! The scoring service's core: gathers log entries as customers' inputs,
//! folds them in event time (see [`crate::fold`]), and writes the new
//! lifecycle with its transitions, the inputs kept, retractions (and the
//! consumer cursor or rescore progress) in one transaction. A customer's
//! history is a function of their inputs, so replaying the logs, or
//! receiving the same events late, one by one or in one batch, gives the
//! same history. Rescores and Evaluate calls evaluate at the wall-clock time
//! on top of it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clm_proto::feedback as feedback_pb;
use clm_proto::identity as identity_pb;
use clm_proto::touchpoint as touchpoint_pb;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::clock::Clock;
use crate::compiled_model::CompiledModel;
use crate::features::{ProfileFacts, TouchpointFacts};
use crate::fold;
use crate::history::{Cause, RecordedTransition};
use crate::store::{
    ChangeSet, CursorMove, CustomerRecord, CustomerWrite, Fact, Fence, Input, ScoringStore,
    StoreError,
};

/// How often a process re-reads which model is active (another replica may
/// have activated one).
const ACTIVE_MODEL_TTL: Duration = Duration::from_secs(1);
/// How many times a unit of work is retried after losing a race.
const CONFLICT_RETRIES: usize = 8;
/// How often a write that lost a race to another writer is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Until it passes: derived state written in the background.
    UntilDone,
    /// [`CONFLICT_RETRIES`] times: a call a caller waits for.
    AFew,
}

/// The smallest part a rescore page is split into after a write conflict.
pub const SMALLEST_RESCORE_PART: usize = 64;

/// How long to wait before the `tries`-th retry after a conflict: 5 ms
/// doubling to at most 500 ms, with jitter so that two writers that
/// collided do not collide again.
fn conflict_backoff(tries: u32) -> Duration {
    let base = Duration::from_millis(5 << tries.min(7)).min(Duration::from_millis(500));
    base.mul_f64(rand::random_range(0.5..1.5))
}

/// Why a scoring operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ScoringError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored model no longer compiles (it did when it was stored).
    #[error("model {0} does not compile")]
    BadModel(String),
    /// No model is active (the database was not initialised).
    #[error("no model is active")]
    NoActiveModel,
}

/// What the customer event log says about a customer, for scoring.
#[derive(Debug, Clone)]
pub enum ProfileChange {
    /// The customer's profile says this now.
    Profile(Uuid, ProfileFacts),
    /// The customer was erased: forget the profile.
    Erased(Uuid),
    /// `merged` was merged into `survivor`.
    Merged {
        /// The customer merged away.
        merged: Uuid,
        /// The survivor.
        survivor: Uuid,
        /// The survivor's profile after the merge, when identity has it.
        profile: Option<ProfileFacts>,
    },
}

/// The profile facts of an identity customer.
pub fn profile_of(customer: &identity_pb::Customer) -> ProfileFacts {
    ProfileFacts {
        identified: !customer.emails.is_empty()
            || !customer.phones.is_empty()
            || !customer.external_ids.is_empty(),
        company: customer.company.clone(),
        industry: customer.industry.clone(),
        job_title: customer.job_title.clone(),
        attributes: customer
            .attributes
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
    }
}

/// The outcome of evaluating one customer.
#[derive(Debug, Clone)]
pub struct Evaluated {
    /// The customer's record after the evaluation.
    pub record: CustomerRecord,
    /// The transition it recorded.
    pub transition: Option<RecordedTransition>,
}

struct ActiveModel {
    model: Arc<CompiledModel>,
    read_at: Instant,
}

/// Evaluates customers and writes the results.
pub struct Scorer {
    store: Arc<dyn ScoringStore>,
    clock: Clock,
    active: Mutex<Option<ActiveModel>>,
    compiled: Mutex<HashMap<String, Arc<CompiledModel>>>,
    /// Woken after every write that changed a snapshot (for the pusher).
    changed: Arc<Notify>,
}

impl Scorer {
    /// A scorer over `store`.
    pub fn new(store: Arc<dyn ScoringStore>, clock: Clock) -> Self {
        Self {
            store,
            clock,
            active: Mutex::new(None),
            compiled: Mutex::new(HashMap::new()),
            changed: Arc::new(Notify::new()),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ScoringStore> {
        &self.store
    }

    /// The service's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Notified after each write that changed a customer's snapshot.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// A stored model, compiled (cached by version: models are immutable).
    pub async fn compiled(
        &self,
        version: &str,
    ) -> Result<Option<Arc<CompiledModel>>, ScoringError> {
        if let Some(model) = self.cached(version) {
            return Ok(Some(model));
        }
        let Some(model) = self.store.model(version).await? else {
            return Ok(None);
        };
        Ok(Some(self.compile(model)?))
    }

    fn cached(&self, version: &str) -> Option<Arc<CompiledModel>> {
        self.compiled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(version)
            .cloned()
    }

    fn compile(&self, model: crate::Model) -> Result<Arc<CompiledModel>, ScoringError> {
        let version = model.version.clone();
        if let Some(model) = self.cached(&version) {
            return Ok(model);
        }
        let compiled = Arc::new(
            CompiledModel::compile(model).map_err(|_| ScoringError::BadModel(version.clone()))?,
        );
        self.compiled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(version, compiled.clone());
        Ok(compiled)
    }

    /// The active model (re-read from the store at most every second).
    pub async fn active_model(&self) -> Result<Arc<CompiledModel>, ScoringError> {
        {
            let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(active) = active.as_ref()
                && active.read_at.elapsed() < ACTIVE_MODEL_TTL
            {
                return Ok(active.model.clone());
            }
        }
        let model = self
            .store
            .active_model()
            .await?
            .ok_or(ScoringError::NoActiveModel)?;
        let model = self.compile(model)?;
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = Some(ActiveModel {
            model: model.clone(),
            read_at: Instant::now(),
        });
        Ok(model)
    }

    /// Forgets the cached active model (after an activation here).
    pub fn active_model_changed(&self) {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Loads customers and the survivors they were merged into.
    async fn load_with_survivors(
        &self,
        ids: impl IntoIterator<Item = Uuid>,
    ) -> Result<HashMap<Uuid, CustomerRecord>, StoreError> {
        let mut wanted: Vec<Uuid> = ids
            .into_iter()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut loaded = HashMap::new();
        // A survivor can itself have been merged later: follow a few hops.
        for _ in 0..4 {
            if wanted.is_empty() {
                break;
            }
            let found = self.store.load_customers(&wanted).await?;
            wanted = found
                .values()
                .filter_map(|record| record.merged_into)
                .filter(|id| !loaded.contains_key(id) && !found.contains_key(id))
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            loaded.extend(found);
        }
        Ok(loaded)
    }

    /// Applies a batch of touchpoint log entries and moves the cursor, in
    /// one transaction.
    pub async fn apply_touchpoints(
        &self,
        entries: &[touchpoint_pb::TouchpointLogEntry],
        cursor: CursorMove,
    ) -> Result<(), ScoringError> {
        let ids: Vec<Uuid> = entries
            .iter()
            .filter_map(|entry| Uuid::try_parse(&entry.customer_id).ok())
            .collect();
        self.with_retries(Retry::UntilDone, || async {
            let model = self.active_model().await?;
            let mut work = Work::new(self.load_with_survivors(ids.iter().copied()).await?);
            for entry in entries {
                let Some(touchpoint_pb::touchpoint_log_entry::Change::Recorded(recorded)) =
                    &entry.change
                else {
                    // Re-keys follow merges, which the customer event log
                    // already applied; stripped properties are not features.
                    continue;
                };
                let (Ok(customer_id), Some(facts)) = (
                    Uuid::try_parse(&entry.customer_id),
                    TouchpointFacts::from_recorded(recorded),
                ) else {
                    tracing::warn!(entry = %entry.entry_id, "skipping a touchpoint log entry without customer or time");
                    continue;
                };
                let target = work.target(customer_id).customer_id;
                work.add_input(
                    target,
                    Input {
                        at: facts.occurred_at,
                        key: recorded.touchpoint_id.clone(),
                        fact: Fact::Touchpoint {
                            touchpoint_type: facts.touchpoint_type.to_owned(),
                            channel: facts.channel as i32,
                            revenue: facts
                                .revenue
                                .map(|money| (money.currency_code.to_owned(), money.amount_micros)),
                        },
                    },
                );
            }
            self.settle(&mut work, &model).await?;
            let mut changes = work.into_changes();
            changes.cursor = Some(cursor.clone());
            self.commit(&changes).await
        })
        .await
    }

    /// Folds the NPS, CSAT and CES answers of the responses on a batch of
    /// the feedback log into their customers (each at its submit time, late
    /// ones by deriving the history again) and moves the cursor, in one
    /// transaction.
    pub async fn apply_answers(
        &self,
        entries: &[feedback_pb::FeedbackLogEntry],
        cursor: CursorMove,
    ) -> Result<(), ScoringError> {
        let answers: Vec<(Uuid, Input)> = entries.iter().flat_map(answer_inputs).collect();
        let ids: Vec<Uuid> = answers.iter().map(|(id, _)| *id).collect();
        self.with_retries(Retry::UntilDone, || async {
            let model = self.active_model().await?;
            let mut work = Work::new(self.load_with_survivors(ids.iter().copied()).await?);
            for (customer_id, input) in &answers {
                let target = work.target(*customer_id).customer_id;
                work.add_input(target, input.clone());
            }
            self.settle(&mut work, &model).await?;
            let mut changes = work.into_changes();
            changes.cursor = Some(cursor.clone());
            self.commit(&changes).await
        })
        .await
    }

    /// Applies profile changes, merges and erasures from the customer event
    /// log and moves the cursor, in one transaction.
    pub async fn apply_customer_changes(
        &self,
        changes: &[ProfileChange],
        cursor: CursorMove,
    ) -> Result<(), ScoringError> {
        let ids = changes.iter().flat_map(|change| match change {
            ProfileChange::Profile(id, _) | ProfileChange::Erased(id) => vec![*id],
            ProfileChange::Merged {
                merged, survivor, ..
            } => vec![*merged, *survivor],
        });
        let ids: Vec<Uuid> = ids.collect();
        self.with_retries(Retry::UntilDone, || async {
            let model = self.active_model().await?;
            let now = self.now();
            let mut work = Work::new(self.load_with_survivors(ids.iter().copied()).await?);
            for change in changes {
                match change {
                    ProfileChange::Profile(id, profile) => {
                        let target = work.target(*id).customer_id;
                        work.add_input(target, fold::profile_input(profile.clone()));
                    }
                    ProfileChange::Erased(id) => work.erase(*id),
                    ProfileChange::Merged {
                        merged,
                        survivor,
                        profile,
                    } => {
                        work.merge(*merged, *survivor, &model, now);
                        if let Some(profile) = profile {
                            let target = work.target(*survivor).customer_id;
                            work.add_input(target, fold::profile_input(profile.clone()));
                        }
                    }
                }
            }
            self.settle(&mut work, &model).await?;
            self.commit(&{
                let mut set = work.into_changes();
                set.cursor = Some(cursor.clone());
                set
            })
            .await
        })
        .await
    }

    /// Folds the inputs a unit of work gathered into its customers: in
    /// memory when they come after everything derived so far, otherwise by
    /// deriving the history again from every kept input.
    async fn settle(&self, work: &mut Work, model: &CompiledModel) -> Result<(), ScoringError> {
        let now = self.now();
        let pending: Vec<(Uuid, Vec<Input>)> = std::mem::take(&mut work.pending);
        work.pending_index.clear();
        for (id, mut inputs) in pending {
            fold::in_fold_order(&mut inputs);
            let record = work.records.get(&id).expect("a target is loaded");
            // A profile that says what the features hold already changes
            // nothing.
            inputs.retain(|input| match &input.fact {
                Fact::Profile(profile) => profile != record.features.profile(),
                Fact::Touchpoint { .. } | Fact::SurveyAnswer { .. } => true,
            });
            if inputs.is_empty() {
                continue;
            }
            if !record.inputs_kept {
                // Scored before inputs were kept: fold in at the latest
                // evaluation, as then.
                work.fold(id, model, &inputs, now);
                continue;
            }
            let late = inputs
                .first()
                .is_some_and(|first| record.derived_to().is_some_and(|to| first.at <= to));
            work.kept_inputs
                .extend(inputs.iter().cloned().map(|input| (id, input)));
            if late || work.rederive.contains(&id) {
                work.rederive.insert(id);
                work.late_inputs.entry(id).or_default().extend(inputs);
            } else {
                work.fold(id, model, &inputs, now);
            }
        }
        if !work.merged_away.is_empty() {
            let gone = self.store.customer_transitions(&work.merged_away).await?;
            work.retracted.extend(gone.into_values().flatten());
        }
        if work.rederive.is_empty() {
            return Ok(());
        }
        let targets: Vec<Uuid> = work.rederive.iter().copied().collect();
        // A survivor's history takes in the touchpoints of the customers
        // merged into it in this unit of work (moved when it commits).
        let mut sources: Vec<Uuid> = targets.clone();
        sources.extend(work.moved.iter().map(|(merged, _)| *merged));
        let mut stored = self.store.load_inputs(&sources).await?;
        let mut recorded = self.store.customer_transitions(&targets).await?;
        for (merged, survivor) in work.moved.clone() {
            let taken = stored.remove(&merged).unwrap_or_default();
            stored
                .entry(survivor)
                .or_default()
                .extend(taken.into_iter().filter(|input| !input.is_profile()));
        }
        for id in targets {
            let mut inputs = stored.remove(&id).unwrap_or_default();
            if work.forgotten.contains(&id) {
                inputs.retain(|input| !input.is_profile());
            }
            // After the stored ones: a new profile replaces the stored one.
            inputs.extend(work.late_inputs.remove(&id).unwrap_or_default());
            let old = recorded.remove(&id).unwrap_or_default();
            let record = work.records.get_mut(&id).expect("a target is loaded");
            let again = fold::rederive(model, record, inputs, old, now);
            work.touch(id, true);
            if !again.added.is_empty() || !again.retracted.is_empty() {
                work.position_changed.insert(id);
            }
            work.retracted.extend(again.retracted);
            work.transitions.extend(again.added);
        }
        Ok(())
    }

    /// Brings customers up to now with the active model: each is evaluated
    /// at every due time up to now (the sweep's cause SWEEP), and for cause
    /// EVALUATE at now as well. With `only_due`, customers no longer due are
    /// skipped. Returns each evaluated customer's record and latest
    /// transition, keyed by the id asked for.
    pub async fn evaluate_now(
        &self,
        ids: &[Uuid],
        cause: Cause,
        only_due: bool,
        fence: &Fence,
    ) -> Result<HashMap<Uuid, Evaluated>, ScoringError> {
        let retry = if cause == Cause::Evaluate {
            Retry::AFew
        } else {
            Retry::UntilDone
        };
        self.with_retries(retry, || async {
            let model = self.active_model().await?;
            let now = self.now();
            let mut work = Work::new(self.load_with_survivors(ids.iter().copied()).await?);
            let mut targets = Vec::new();
            for id in ids {
                if !work.records.contains_key(id) {
                    continue;
                }
                let target = work.target(*id).customer_id;
                let record = work.get(target);
                if record.snapshot.is_none() && record.features.touchpoint_count() == 0 {
                    continue;
                }
                if only_due && record.next_due_at.is_none_or(|due| due > now) {
                    continue;
                }
                if !work.dirty.contains(&target) {
                    work.catch_up(target, &model, now);
                    if cause != Cause::Sweep {
                        work.evaluate(target, &model, now, cause, None, false);
                    }
                }
                targets.push((*id, target));
            }
            let transitions: HashMap<Uuid, RecordedTransition> = work
                .transitions
                .iter()
                .map(|t| (t.customer_id, t.clone()))
                .collect();
            let result = targets
                .into_iter()
                .map(|(asked, target)| {
                    let record = work.get(target).clone();
                    let evaluated = Evaluated {
                        transition: transitions.get(&target).cloned(),
                        record: CustomerRecord {
                            version: record.version + 1,
                            ..record
                        },
                    };
                    (asked, evaluated)
                })
                .collect();
            self.commit(&ChangeSet {
                fence: fence.clone(),
                ..work.into_changes()
            })
            .await?;
            Ok(result)
        })
        .await
    }

    /// Writes a rescore page with the progress it makes, and returns how
    /// many customers changed position. `progress` is the page's progress
    /// with `done`, `changed`, `resume_after` and `resumed_from` to be set.
    ///
    /// A page is written in one transaction, checked against the versions
    /// read, so a customer that a consumer wrote meanwhile fails the whole
    /// page. Such a page is read and evaluated again in two halves, each
    /// written on its own with its own progress, down to pages of
    /// [`SMALLEST_RESCORE_PART`] customers, which are retried until they
    /// pass: the fewer the customers and the shorter the read-to-commit
    /// window, the less likely a concurrent write, so a rescore finishes
    /// whatever its size and whatever the consumers do meanwhile.
    pub async fn write_rescore_page(
        &self,
        model: &Arc<CompiledModel>,
        page: EvaluatedPage,
        progress: crate::store::RescoreProgress,
        fence: &Fence,
    ) -> Result<i64, ScoringError> {
        let mut parts = std::collections::VecDeque::from([page]);
        let mut resumed_from = progress.resumed_from;
        let mut changed = 0;
        let mut tries = 0u32;
        while let Some(mut part) = parts.pop_front() {
            let Some(&last) = part.ids.last() else {
                continue;
            };
            part.changes.rescore = Some(crate::store::RescoreProgress {
                done: part.ids.len() as i64,
                changed: part.changed,
                resume_after: last,
                resumed_from,
                ..progress
            });
            part.changes.fence = fence.clone();
            match self.commit(&part.changes).await {
                Ok(()) => {
                    resumed_from = Some(last);
                    changed += part.changed;
                    tries = 0;
                }
                Err(ScoringError::Store(StoreError::Conflict(reason))) => {
                    tries += 1;
                    tracing::debug!(%reason, customers = part.ids.len(), tries, "rescore page lost a race, evaluating it again");
                    let halves: Vec<&[Uuid]> = if part.ids.len() > SMALLEST_RESCORE_PART {
                        let (first, second) = part.ids.split_at(part.ids.len() / 2);
                        vec![first, second]
                    } else {
                        tokio::time::sleep(conflict_backoff(tries)).await;
                        vec![part.ids.as_slice()]
                    };
                    let mut again = Vec::with_capacity(halves.len());
                    for ids in halves {
                        again.push(self.evaluate_again(model, ids).await?);
                    }
                    for page in again.into_iter().rev() {
                        parts.push_front(page);
                    }
                }
                Err(err) => return Err(err),
            }
        }
        Ok(changed)
    }

    /// The customers `ids` read and evaluated again with `model`.
    async fn evaluate_again(
        &self,
        model: &Arc<CompiledModel>,
        ids: &[Uuid],
    ) -> Result<EvaluatedPage, ScoringError> {
        let mut found = self.store.load_customers(ids).await?;
        let records: Vec<CustomerRecord> = ids.iter().filter_map(|id| found.remove(id)).collect();
        let (model, now) = (model.clone(), self.now());
        let mut page = tokio::task::spawn_blocking(move || evaluate_page(&model, records, now))
            .await
            .map_err(|err| StoreError::Internal(err.to_string()))?;
        // A customer gone meanwhile (merged away) still counts as done.
        page.ids = ids.to_vec();
        Ok(page)
    }

    async fn commit(&self, changes: &ChangeSet) -> Result<(), ScoringError> {
        self.store.commit(changes).await?;
        if !changes.customers.is_empty() {
            self.changed.notify_one();
        }
        Ok(())
    }

    /// Runs `attempt` again, state read afresh, after each write conflict:
    /// a conflict between writers of derived state resolves once one of
    /// them commits, so the background writers (log consumers, the sweep)
    /// retry until they pass (`Retry::UntilDone`) instead of failing their
    /// stream; a call made for a caller gives up after a few tries and
    /// answers ABORTED (`Retry::AFew`).
    async fn with_retries<T, F, Fut>(&self, retry: Retry, attempt: F) -> Result<T, ScoringError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ScoringError>>,
    {
        let mut tries = 0u32;
        loop {
            match attempt().await {
                Err(ScoringError::Store(StoreError::Conflict(reason)))
                    if retry == Retry::UntilDone || (tries as usize) < CONFLICT_RETRIES =>
                {
                    tries += 1;
                    if tries.is_multiple_of(100) {
                        tracing::warn!(%reason, tries, "still retrying after write conflicts");
                    } else {
                        tracing::debug!(%reason, tries, "retrying after a write conflict");
                    }
                    tokio::time::sleep(conflict_backoff(tries)).await;
                }
                other => return other,
            }
        }
    }
}

/// A page of a rescore, evaluated and ready to write.
#[derive(Debug)]
pub struct EvaluatedPage {
    /// The customers of the page.
    pub ids: Vec<Uuid>,
    /// What to write (without the progress).
    pub changes: ChangeSet,
    /// How many changed position.
    pub changed: i64,
}

/// Applies `f` to every item and its index, in order, the items split into
/// one run per core (at most 8). CPU only: call it on a blocking thread. A
/// panic in `f` is raised again here, so no result goes missing.
pub fn map_on_every_core<T: Send, R: Send>(
    items: &mut [T],
    f: impl Fn(usize, &mut T) -> R + Sync,
) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let per_thread = items.len().div_ceil(threads).max(1);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks_mut(per_thread)
            .enumerate()
            .map(|(part, chunk)| {
                scope.spawn(move || {
                    chunk
                        .iter_mut()
                        .enumerate()
                        .map(|(i, item)| f(part * per_thread + i, item))
                        .collect::<Vec<R>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Evaluates the customers of a page (merged ones are skipped) with `model`
/// at `now`, on every core. CPU only: call it on a blocking thread.
pub fn evaluate_page(
    model: &CompiledModel,
    mut records: Vec<CustomerRecord>,
    now: DateTime<Utc>,
) -> EvaluatedPage {
    let ids = records.iter().map(|record| record.customer_id).collect();
    records.retain(|record| record.merged_into.is_none());
    let outcomes = map_on_every_core(&mut records, |_, record| {
        evaluate_record(model, record, now, Cause::Rescore, None)
    });
    let mut transitions = Vec::new();
    let customers = records
        .into_iter()
        .zip(outcomes)
        .map(|(record, transition)| {
            let position_changed = transition.is_some();
            transitions.extend(transition);
            CustomerWrite {
                record,
                features_changed: false,
                position_changed,
            }
        })
        .collect();
    EvaluatedPage {
        ids,
        changed: transitions.len() as i64,
        changes: ChangeSet {
            customers,
            transitions,
            ..ChangeSet::default()
        },
    }
}

/// Evaluates one customer at `at` (or their previous evaluation, if later)
/// and updates the record; returns the transition, if any.
pub fn evaluate_record(
    model: &CompiledModel,
    record: &mut CustomerRecord,
    at: DateTime<Utc>,
    cause: Cause,
    touchpoint_id: Option<&str>,
) -> Option<RecordedTransition> {
    let previous = record.snapshot.as_ref();
    let state = previous.map(|s| s.state).unwrap_or_default();
    let at = previous.map_or(at, |s| s.evaluated_at.max(at));
    let evaluation = model.evaluate(&record.features, &state, at);
    let transition = evaluation.transition.as_ref().map(|transition| {
        RecordedTransition::new(
            record.customer_id,
            transition,
            evaluation.snapshot.clone(),
            cause,
            touchpoint_id,
            Utc::now(),
        )
    });
    record.snapshot = Some(evaluation.snapshot);
    record.next_due_at = evaluation.next_evaluation_at;
    transition
}

/// The customers one unit of work reads and changes.
struct Work {
    records: HashMap<Uuid, CustomerRecord>,
    /// Customers to write, and whether their features changed.
    dirty: HashSet<Uuid>,
    features_changed: HashSet<Uuid>,
    position_changed: HashSet<Uuid>,
    order: Vec<Uuid>,
    transitions: Vec<RecordedTransition>,
    /// Inputs gathered and not yet folded, by customer, in arrival order.
    pending: Vec<(Uuid, Vec<Input>)>,
    /// Where each customer's inputs are in `pending`.
    pending_index: HashMap<Uuid, usize>,
    /// Late inputs of customers whose history is derived again.
    late_inputs: HashMap<Uuid, Vec<Input>>,
    /// Customers whose history is derived again from every kept input.
    rederive: HashSet<Uuid>,
    /// Inputs to keep.
    kept_inputs: Vec<(Uuid, Input)>,
    /// Merges whose inputs move: (merged, survivor).
    moved: Vec<(Uuid, Uuid)>,
    /// Merged customers whose transitions are all retracted (their history
    /// is derived again on the survivor).
    merged_away: Vec<Uuid>,
    /// Customers whose profile inputs are deleted.
    forgotten: HashSet<Uuid>,
    /// Transitions retracted.
    retracted: Vec<RecordedTransition>,
}

impl Work {
    fn new(records: HashMap<Uuid, CustomerRecord>) -> Self {
        Self {
            records,
            dirty: HashSet::new(),
            features_changed: HashSet::new(),
            position_changed: HashSet::new(),
            order: Vec::new(),
            transitions: Vec::new(),
            pending: Vec::new(),
            pending_index: HashMap::new(),
            late_inputs: HashMap::new(),
            rederive: HashSet::new(),
            kept_inputs: Vec::new(),
            moved: Vec::new(),
            merged_away: Vec::new(),
            forgotten: HashSet::new(),
            retracted: Vec::new(),
        }
    }

    /// The customer that stands for `id`: the survivor of a merged
    /// customer, created when new.
    fn target(&mut self, id: Uuid) -> &mut CustomerRecord {
        let mut id = id;
        for _ in 0..8 {
            match self.records.get(&id).and_then(|r| r.merged_into) {
                Some(survivor) => id = survivor,
                None => break,
            }
        }
        self.records
            .entry(id)
            .or_insert_with(|| CustomerRecord::new(id))
    }

    fn get(&self, id: Uuid) -> &CustomerRecord {
        &self.records[&id]
    }

    fn touch(&mut self, id: Uuid, features_changed: bool) {
        if self.dirty.insert(id) {
            self.order.push(id);
        }
        if features_changed {
            self.features_changed.insert(id);
        }
    }

    /// Gathers an input of the customer `target` (a target) for
    /// [`Scorer::settle`].
    fn add_input(&mut self, target: Uuid, input: Input) {
        self.touch(target, true);
        match self.pending_index.get(&target) {
            Some(&at) => self.pending[at].1.push(input),
            None => {
                self.pending_index.insert(target, self.pending.len());
                self.pending.push((target, vec![input]));
            }
        }
    }

    fn record_transitions(&mut self, id: Uuid, transitions: Vec<RecordedTransition>) {
        if !transitions.is_empty() {
            self.position_changed.insert(id);
            self.transitions.extend(transitions);
        }
    }

    /// Folds inputs that come after everything derived for `id`.
    fn fold(&mut self, id: Uuid, model: &CompiledModel, inputs: &[Input], now: DateTime<Utc>) {
        self.touch(id, true);
        let record = self.records.get_mut(&id).expect("a target is loaded");
        let transitions = fold::fold(model, record, inputs, now);
        self.record_transitions(id, transitions);
    }

    /// Evaluates `id` at each due time up to `now`.
    fn catch_up(&mut self, id: Uuid, model: &CompiledModel, now: DateTime<Utc>) {
        self.touch(id, false);
        let record = self.records.get_mut(&id).expect("a target is loaded");
        let mut transitions = Vec::new();
        fold::catch_up(model, record, now, true, &mut transitions);
        self.record_transitions(id, transitions);
    }

    fn evaluate(
        &mut self,
        id: Uuid,
        model: &CompiledModel,
        at: DateTime<Utc>,
        cause: Cause,
        touchpoint_id: Option<&str>,
        features_changed: bool,
    ) {
        self.touch(id, features_changed);
        let record = self.records.get_mut(&id).expect("a target is loaded");
        if let Some(transition) = evaluate_record(model, record, at, cause, touchpoint_id) {
            self.position_changed.insert(id);
            self.transitions.push(transition);
        }
    }

    /// Forgets `id`'s profile: its profile inputs are deleted and, when its
    /// inputs are kept, its history derived again without them.
    fn erase(&mut self, id: Uuid) {
        let record = self.target(id);
        let target = record.customer_id;
        let had_profile = *record.features.profile() != ProfileFacts::default();
        record.features.set_profile(ProfileFacts::default());
        let kept = record.inputs_kept && had_profile;
        if let Some(&at) = self.pending_index.get(&target) {
            self.pending[at].1.retain(|input| !input.is_profile());
        }
        self.forgotten.insert(target);
        if kept && self.get(target).version > 0 {
            self.rederive.insert(target);
        }
        self.touch(target, true);
    }

    /// Merges `merged` into `survivor`: the survivor's history is derived
    /// again from both customers' touchpoints (or, for customers scored
    /// before inputs were kept, the features are added up and the survivor
    /// evaluated at `now`).
    fn merge(&mut self, merged: Uuid, survivor: Uuid, model: &CompiledModel, now: DateTime<Utc>) {
        let survivor = self.target(survivor).customer_id;
        if survivor == merged {
            return;
        }
        let Some(mut gone) = self.records.remove(&merged) else {
            // Never seen: remember where its entries go from now on.
            let mut record = CustomerRecord::new(merged);
            record.merged_into = Some(survivor);
            self.records.insert(merged, record);
            self.touch(merged, false);
            return;
        };
        if gone.merged_into.is_some() {
            self.records.insert(merged, gone);
            return;
        }
        let taken = std::mem::take(&mut gone.features);
        let had_history = gone.snapshot.is_some() || taken.touchpoint_count() > 0;
        let gone_kept = gone.inputs_kept;
        gone.merged_into = Some(survivor);
        gone.next_due_at = None;
        gone.folded_to = None;
        self.records.insert(merged, gone);
        self.touch(merged, true);
        self.moved.push((merged, survivor));
        self.forgotten.insert(merged);
        // Inputs gathered for the merged customer in this unit of work.
        let mut carried = Vec::new();
        if let Some(&at) = self.pending_index.get(&merged) {
            let inputs = std::mem::take(&mut self.pending[at].1);
            carried.extend(inputs.into_iter().filter(|i| !i.is_profile()));
        }
        for input in carried {
            self.add_input(survivor, input);
        }
        let record = self
            .records
            .get_mut(&survivor)
            .expect("the survivor is loaded");
        if gone_kept && record.inputs_kept {
            // Its history becomes the survivor's: derived again there, and
            // retracted here, so that the customer counts once.
            self.merged_away.push(merged);
            if had_history {
                self.rederive.insert(survivor);
            }
            self.touch(survivor, true);
            return;
        }
        record.inputs_kept = false;
        record.features.merge(&taken);
        if had_history || record.snapshot.is_some() {
            self.evaluate(survivor, model, now, Cause::Merge, None, true);
        } else {
            self.touch(survivor, true);
        }
    }

    fn into_changes(mut self) -> ChangeSet {
        let customers = self
            .order
            .iter()
            .filter_map(|id| {
                let record = self.records.remove(id)?;
                Some(CustomerWrite {
                    features_changed: self.features_changed.contains(id),
                    position_changed: self.position_changed.contains(id),
                    record,
                })
            })
            .collect();
        let mut forgotten: Vec<Uuid> = self.forgotten.into_iter().collect();
        forgotten.sort();

        ChangeSet {
            customers,
            transitions: self.transitions,
            cursor: None,
            rescore: None,
            fence: Fence::Sole,
            // Each customer's once, in fold order without duplicate keys
            // (see `Scorer::settle`).
            inputs: self.kept_inputs,
            moved_inputs: self.moved,
            forgotten_profiles: forgotten,
            retracted: self.retracted,
        }
    }
}

/// The inputs a feedback log entry gives: one per NPS, CSAT or CES answer
/// of a recorded response, keyed by the response and question so that a
/// replayed entry replaces itself.
pub fn answer_inputs(entry: &feedback_pb::FeedbackLogEntry) -> Vec<(Uuid, Input)> {
    use feedback_pb::feedback_log_entry::Change;
    let Some(Change::ResponseRecorded(recorded)) = &entry.change else {
        return Vec::new();
    };
    let (Ok(customer_id), Some(submitted)) = (
        Uuid::try_parse(&entry.customer_id),
        recorded
            .submit_time
            .as_ref()
            .and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)),
    ) else {
        return Vec::new();
    };
    recorded
        .scores
        .iter()
        .filter_map(|answer| {
            let kind = match feedback_pb::QuestionType::try_from(answer.r#type).ok()? {
                feedback_pb::QuestionType::Nps => crate::store::SurveyScore::Nps,
                feedback_pb::QuestionType::Csat => crate::store::SurveyScore::Csat,
                feedback_pb::QuestionType::Ces => crate::store::SurveyScore::Ces,
                _ => return None,
            };
            Some((
                customer_id,
                Input {
                    at: submitted,
                    key: format!("response/{}/{}", recorded.id, answer.question_id),
                    fact: Fact::SurveyAnswer {
                        kind,
                        score: i64::from(answer.score),
                    },
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::model_proto::timestamp_to_proto;

    async fn scorer() -> (Scorer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = clm_platform::Secret::new(format!("sqlite://{}/s.db", dir.path().display()));
        let pools = clm_platform::db::connect(&url, "scoring", 2).await.unwrap();
        crate::store::MIGRATIONS.run(&pools).await.unwrap();
        (
            Scorer::new(crate::store::open(pools), crate::clock::Clock::System),
            dir,
        )
    }

    /// Fails with a conflict `conflicts` times, then passes.
    async fn conflicting(tries: &AtomicUsize, conflicts: usize) -> Result<u8, ScoringError> {
        if tries.fetch_add(1, Ordering::SeqCst) < conflicts {
            Err(StoreError::Conflict("a customer changed concurrently".into()).into())
        } else {
            Ok(7)
        }
    }

    #[tokio::test]
    async fn background_writers_retry_conflicts_until_they_pass() {
        // The customer event consumer once gave up after eight conflicts and
        // dropped its stream to reconnect with backoff.
        let (scorer, _dir) = scorer().await;
        // The waits between tries pass at once.
        tokio::time::pause();
        let tries = AtomicUsize::new(0);
        let passed = scorer
            .with_retries(Retry::UntilDone, || conflicting(&tries, 50))
            .await;
        assert_eq!(passed.unwrap(), 7);
        assert_eq!(tries.load(Ordering::SeqCst), 51);

        let tries = AtomicUsize::new(0);
        let refused = scorer
            .with_retries(Retry::AFew, || conflicting(&tries, 50))
            .await;
        assert!(matches!(
            refused,
            Err(ScoringError::Store(StoreError::Conflict(_)))
        ));
        assert_eq!(tries.load(Ordering::SeqCst), CONFLICT_RETRIES + 1);
    }

    fn recorded(customer: Uuid, at: DateTime<Utc>) -> touchpoint_pb::TouchpointLogEntry {
        touchpoint_pb::TouchpointLogEntry {
            entry_id: Uuid::now_v7().to_string(),
            customer_id: customer.to_string(),
            change: Some(touchpoint_pb::touchpoint_log_entry::Change::Recorded(
                touchpoint_pb::TouchpointRecorded {
                    touchpoint_id: Uuid::now_v7().to_string(),
                    r#type: "page_view".to_owned(),
                    channel: touchpoint_pb::Channel::Web as i32,
                    occur_time: Some(timestamp_to_proto(at)),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn customers_scored_before_inputs_were_kept_fold_late_touchpoints_in_as_before() {
        // Their features hold touchpoints no input row keeps, so deriving
        // their history again would lose those.
        let (scorer, _dir) = scorer().await;
        // Whole seconds: the store keeps microseconds.
        let start = chrono::SubsecRound::trunc_subsecs(Utc::now() - chrono::Duration::days(30), 0);
        scorer
            .store()
            .install_default(&crate::default_model(), start)
            .await
            .unwrap();
        let model = scorer.active_model().await.unwrap();
        let id = Uuid::now_v7();
        let mut old = CustomerRecord {
            inputs_kept: false,
            ..CustomerRecord::new(id)
        };
        old.features.apply(&TouchpointFacts {
            touchpoint_type: "page_view",
            channel: touchpoint_pb::Channel::Web,
            occurred_at: start,
            revenue: None,
        });
        let evaluated = start + chrono::Duration::days(10);
        evaluate_record(&model, &mut old, evaluated, Cause::Touchpoint, None);
        scorer
            .store()
            .commit(&ChangeSet {
                customers: vec![CustomerWrite {
                    record: old,
                    features_changed: true,
                    position_changed: true,
                }],
                ..ChangeSet::default()
            })
            .await
            .unwrap();

        let late = start + chrono::Duration::days(5);
        let cursor = CursorMove {
            consumer: "test",
            shard: clm_eventlog::ShardFilter::ALL,
            expected: String::new(),
            new: "1".to_owned(),
            fence: Default::default(),
        };
        scorer
            .apply_touchpoints(&[recorded(id, late)], cursor)
            .await
            .unwrap();
        let now = scorer.store().load_customers(&[id]).await.unwrap()[&id].clone();
        assert!(!now.inputs_kept);
        assert_eq!(now.features.touchpoint_count(), 2, "nothing is lost");
        assert_eq!(
            now.snapshot.unwrap().evaluated_at,
            evaluated,
            "folded in at the latest evaluation"
        );
        assert!(scorer.store().load_inputs(&[id]).await.unwrap().is_empty());

        // A new customer's late touchpoint derives the history again.
        let new = Uuid::now_v7();
        for (n, at) in [(2, start + chrono::Duration::days(9)), (3, late)] {
            let cursor = CursorMove {
                consumer: "test",
                shard: clm_eventlog::ShardFilter::ALL,
                expected: (n - 1).to_string(),
                new: n.to_string(),
                fence: Default::default(),
            };
            scorer
                .apply_touchpoints(&[recorded(new, at)], cursor)
                .await
                .unwrap();
        }
        let kept = scorer.store().load_inputs(&[new]).await.unwrap();
        assert_eq!(kept[&new].len(), 2);
        let record = scorer.store().load_customers(&[new]).await.unwrap()[&new].clone();
        assert!(record.inputs_kept);
        assert_eq!(record.folded_to, Some(start + chrono::Duration::days(9)));
    }

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        assert!(conflict_backoff(1) <= Duration::from_millis(15));
        for tries in [8, 20, 1000] {
            let wait = conflict_backoff(tries);
            assert!(wait >= Duration::from_millis(250) && wait <= Duration::from_millis(750));
        }
    }
}
