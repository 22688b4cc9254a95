//! Where the scoring service keeps its state: models, per-customer features
//! and lifecycle, transitions and their log, rescore operations and consumer
//! cursors. A store trait with PostgreSQL and SQLite implementations that
//! hold no business rules, and the embedded migrations.

pub mod postgres;
mod seams;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use clm_eventlog::{EventLog, ShardFilter};
use clm_platform::db::{DbFailure, EmbeddedMigration, Pools, ServiceMigrations};
use clm_proto::scoring as proto;
use prost::Message as _;
use uuid::Uuid;

use crate::evaluate::LifecycleSnapshot;
use crate::features::CustomerFeatures;
use crate::history::RecordedTransition;
use crate::model::Model;

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A customer changed since it was read (or a transaction lost a race);
    /// read again and retry.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Another consumer moved the cursor since it was read: resume from the
    /// saved cursor.
    #[error("the consumer cursor moved: {0}")]
    CursorMoved(String),
    /// The shard lease the write was made under is no longer held: another
    /// replica owns the shard now.
    #[error("{0}")]
    LeaseLost(String),
    /// The rescore being written is no longer running (cancelled), or
    /// another worker advanced it.
    #[error("the rescore is no longer running here")]
    RescoreStopped,
    /// A stored value cannot be decoded.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// Anything else.
    #[error("database error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Maps a database error.
    pub fn from_db(err: sqlx::Error) -> Self {
        match clm_platform::db::failure_of(&err) {
            DbFailure::Unavailable => Self::Unavailable(err.to_string()),
            DbFailure::Conflict => Self::Conflict(err.to_string()),
            DbFailure::Internal => Self::Internal(err.to_string()),
        }
    }
}

impl From<clm_eventlog::consumer::cursors::NotMoved> for StoreError {
    fn from(not_moved: clm_eventlog::consumer::cursors::NotMoved) -> Self {
        use clm_eventlog::consumer::cursors::NotMoved;
        match not_moved {
            NotMoved::CursorMoved(consumer) => Self::CursorMoved(consumer),
            NotMoved::LeaseLost(lost) => Self::LeaseLost(lost.to_string()),
        }
    }
}

/// Everything the service keeps about one customer.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerRecord {
    /// The customer.
    pub customer_id: Uuid,
    /// The survivor this customer was merged into.
    pub merged_into: Option<Uuid>,
    /// The features folded from their touchpoints and profile.
    pub features: CustomerFeatures,
    /// The latest evaluation; `None` until the first.
    pub snapshot: Option<LifecycleSnapshot>,
    /// When the sweep evaluates them next.
    pub next_due_at: Option<DateTime<Utc>>,
    /// The stored version; 0 for a customer not stored yet.
    pub version: i64,
    /// The time of the latest input folded in (evaluations aside): an input
    /// that occurred at or before it, or before the latest evaluation, is
    /// late and derives the history again.
    pub folded_to: Option<DateTime<Utc>>,
    /// True when every input folded into `features` is kept in the store, so
    /// the history can be derived again; false for customers scored before
    /// inputs were kept, whose late inputs are folded in at their latest
    /// evaluation instead.
    pub inputs_kept: bool,
}

impl CustomerRecord {
    /// A customer the service has not seen before.
    pub fn new(customer_id: Uuid) -> Self {
        Self {
            customer_id,
            merged_into: None,
            features: CustomerFeatures::new(),
            snapshot: None,
            next_due_at: None,
            version: 0,
            folded_to: None,
            inputs_kept: true,
        }
    }

    /// The time up to which the history is derived: the latest input or
    /// evaluation.
    pub fn derived_to(&self) -> Option<DateTime<Utc>> {
        let evaluated = self.snapshot.as_ref().map(|s| s.evaluated_at);
        self.folded_to.max(evaluated)
    }
}

/// One input of a customer's history, at the time it occurred.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    /// When it occurred.
    pub at: DateTime<Utc>,
    /// What identifies it among the customer's inputs (a touchpoint id, or
    /// `profile/` and the customer event id); inputs of one time are
    /// ordered by it.
    pub key: String,
    /// What it says.
    pub fact: Fact,
}

/// What an input says.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Fact {
    /// A touchpoint, as the features use it.
    Touchpoint {
        /// Its type.
        touchpoint_type: String,
        /// Its clm.touchpoint.v1.Channel number.
        channel: i32,
        /// Its revenue: currency code and micros.
        revenue: Option<(String, i64)>,
    },
    /// The profile identity holds for the customer from then on.
    Profile(crate::features::ProfileFacts),
    /// An answer to an NPS, CSAT or CES question, from the feedback log.
    /// (Variants are encoded by position: new ones go last.)
    SurveyAnswer {
        /// Which score it is.
        kind: SurveyScore,
        /// The score given.
        score: i64,
    },
}

/// The survey scores the features keep (the latest answer of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SurveyScore {
    /// Net Promoter Score, 0 to 10.
    Nps,
    /// Customer satisfaction, 1 to 5.
    Csat,
    /// Customer effort, 1 to 7.
    Ces,
}

impl Input {
    /// True for a profile change.
    pub fn is_profile(&self) -> bool {
        matches!(self.fact, Fact::Profile(_))
    }
}

pub(crate) fn encode_fact(fact: &Fact) -> Vec<u8> {
    encode_binary(fact)
}

pub(crate) fn decode_fact(raw: &[u8]) -> Result<Fact, StoreError> {
    decode_stored(raw, "customer input")
}

/// A customer to write: `record.version` is the version read (0: insert).
#[derive(Debug, Clone)]
pub struct CustomerWrite {
    /// The new content.
    pub record: CustomerRecord,
    /// Whether the features changed (a rescore only changes the lifecycle).
    pub features_changed: bool,
    /// Whether stage, acquisition status or health changed: identity gets
    /// such a snapshot before those whose scores alone changed.
    pub position_changed: bool,
}

pub use clm_eventlog::consumer::cursors::CursorMove;
pub use clm_eventlog::leases::Fence;

/// A rescore's progress after one page.
#[derive(Debug, Clone, Copy)]
pub struct RescoreProgress {
    /// The operation.
    pub id: Uuid,
    /// Customers evaluated in this page.
    pub done: i64,
    /// Customers whose position changed in this page.
    pub changed: i64,
    /// The current rate, customers per second.
    pub rate_per_second: f64,
    /// The last customer of the page.
    pub resume_after: Uuid,
    /// Where the page began (the previous page's last customer): the write
    /// fails unless the stored progress is there, so two workers never
    /// count one rescore twice.
    pub resumed_from: Option<Uuid>,
    /// The shard of customers the page belongs to: each shard of a rescore
    /// keeps its own progress.
    pub shard: ShardFilter,
}

/// What one unit of work writes, atomically.
#[derive(Debug, Clone, Default)]
pub struct ChangeSet {
    /// Customers, each checked against the version read.
    pub customers: Vec<CustomerWrite>,
    /// Transitions to record and append to the transition log.
    pub transitions: Vec<RecordedTransition>,
    /// The consumer cursor to move, checked against the one read.
    pub cursor: Option<CursorMove>,
    /// The rescore progress to record, checked to be still running.
    pub rescore: Option<RescoreProgress>,
    /// The shard lease the writes are made under, checked last (a cursor
    /// move checks its own).
    pub fence: Fence,
    /// Inputs to keep, by customer, each key once: a kept input with the
    /// same key is replaced.
    pub inputs: Vec<(Uuid, Input)>,
    /// Merges (merged, survivor): the merged customer's touchpoint inputs
    /// become the survivor's (its profile is forgotten: list it in
    /// `forgotten_profiles`).
    pub moved_inputs: Vec<(Uuid, Uuid)>,
    /// Customers whose profile inputs are deleted (erasure).
    pub forgotten_profiles: Vec<Uuid>,
    /// Transitions no longer in their customer's history: deleted, and a
    /// retraction appended to the transition log.
    pub retracted: Vec<RecordedTransition>,
}

impl ChangeSet {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.customers.is_empty()
            && self.transitions.is_empty()
            && self.cursor.is_none()
            && self.rescore.is_none()
            && self.inputs.is_empty()
            && self.moved_inputs.is_empty()
            && self.forgotten_profiles.is_empty()
            && self.retracted.is_empty()
    }
}

/// A stored rescore operation.
#[derive(Debug, Clone, PartialEq)]
pub struct RescoreRow {
    /// The operation's id.
    pub id: Uuid,
    /// The model it evaluates with.
    pub model_version: String,
    /// A clm.scoring.v1.RescoreState number.
    pub state: i32,
    /// A clm.scoring.v1.RescoreTrigger number.
    pub trigger: i32,
    /// Customers evaluated so far.
    pub done_count: i64,
    /// Customers to evaluate.
    pub total_count: i64,
    /// Customers whose position changed.
    pub changed_count: i64,
    /// The latest rate, customers per second.
    pub rate_per_second: f64,
    /// When it was requested.
    pub create_time: DateTime<Utc>,
    /// When it began.
    pub start_time: Option<DateTime<Utc>>,
    /// When it ended.
    pub end_time: Option<DateTime<Utc>>,
    /// Why it failed.
    pub error: String,
    /// The last customer evaluated.
    pub resume_after: Option<Uuid>,
}

/// The outcome of activating a model.
#[derive(Debug, Clone)]
pub enum Activation {
    /// The model is now active; the rescore it started.
    Activated(Model, RescoreRow),
    /// The model was active already.
    AlreadyActive(Model),
    /// No such model.
    NotFound,
    /// Another model is active than the one expected.
    NotExpected(String),
}

/// The outcome of storing a model.
#[derive(Debug, Clone)]
pub enum ModelInsert {
    /// Stored now.
    Created(Model),
    /// A model with this version exists (returned).
    Exists(Model),
}

/// A position in ListTransitions order.
pub type TransitionPosition = (DateTime<Utc>, Uuid);

/// Which transitions to list.
#[derive(Debug, Clone)]
pub struct TransitionQuery {
    /// Only this customer's.
    pub customer_id: Option<Uuid>,
    /// At or after.
    pub start: Option<DateTime<Utc>>,
    /// Before.
    pub end: Option<DateTime<Utc>>,
    /// After this position.
    pub after: Option<TransitionPosition>,
    /// At most this many.
    pub limit: u32,
}

/// The scoring service's storage.
#[async_trait]
pub trait ScoringStore: Send + Sync + 'static {
    /// The customers stored under these ids (absent ones are left out).
    async fn load_customers(
        &self,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, CustomerRecord>, StoreError>;
    /// Writes a change set atomically. Fails with `Conflict` when a customer
    /// changed since it was read, `CursorMoved` when the cursor did,
    /// `RescoreStopped` when the rescore is no longer running; then nothing
    /// is written.
    async fn commit(&self, changes: &ChangeSet) -> Result<(), StoreError>;
    /// Up to `limit` customers (not merged) of `shard` whose next evaluation
    /// is due at `now`, earliest first.
    ///
    /// The `shard` arguments divide the work among the replicas of a
    /// PostgreSQL database; on SQLite one process does all of it and only
    /// [`ShardFilter::ALL`] is served.
    async fn due_customers(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        shard: ShardFilter,
    ) -> Result<Vec<Uuid>, StoreError>;
    /// Up to `limit` evaluated, unmerged customers of `shard` after
    /// `after`, by id.
    async fn customers_after(
        &self,
        after: Option<Uuid>,
        limit: u32,
        shard: ShardFilter,
    ) -> Result<Vec<CustomerRecord>, StoreError>;
    /// How many evaluated, unmerged customers there are.
    async fn count_scored(&self) -> Result<i64, StoreError>;
    /// Up to `limit` customers of `shards` (all of one count) after
    /// `after`, in id order, whose latest snapshot identity has not
    /// received: (id, version, snapshot). With
    /// `position`, those whose stage, acquisition status or health changed
    /// since; otherwise those whose scores alone changed.
    async fn unpushed(
        &self,
        limit: u32,
        position: bool,
        after: Option<Uuid>,
        shards: &[ShardFilter],
    ) -> Result<Vec<(Uuid, i64, LifecycleSnapshot)>, StoreError>;
    /// Records that identity received these versions, under `fences` (of
    /// the shards the pusher holds).
    async fn mark_pushed(&self, pushed: &[(Uuid, i64)], fences: &[Fence])
    -> Result<(), StoreError>;

    /// Stores a model unless its version exists.
    async fn insert_model(&self, model: &Model) -> Result<ModelInsert, StoreError>;
    /// A stored model, with its state.
    async fn model(&self, version: &str) -> Result<Option<Model>, StoreError>;
    /// The active model.
    async fn active_model(&self) -> Result<Option<Model>, StoreError>;
    /// Up to `limit` models after `after`, newest first.
    async fn list_models(
        &self,
        after: Option<(DateTime<Utc>, String)>,
        limit: u32,
    ) -> Result<Vec<Model>, StoreError>;
    /// Makes a model active, cancels running rescores and stores `rescore`
    /// (pending), atomically.
    async fn activate(
        &self,
        version: &str,
        expected_active: Option<&str>,
        rescore: RescoreRow,
        now: DateTime<Utc>,
    ) -> Result<Activation, StoreError>;
    /// Stores the built-in model and activates it when no model is active.
    async fn install_default(&self, model: &Model, now: DateTime<Utc>) -> Result<(), StoreError>;

    /// Stores `rescore` unless one is pending or running (returned, false).
    async fn start_rescore(&self, rescore: RescoreRow) -> Result<(RescoreRow, bool), StoreError>;
    /// A rescore by id, or the most recent one.
    async fn rescore(&self, id: Option<Uuid>) -> Result<Option<RescoreRow>, StoreError>;
    /// The oldest pending or running rescore.
    async fn rescore_to_run(&self) -> Result<Option<RescoreRow>, StoreError>;
    /// Records that `shard` of a running rescore is done, its last page
    /// having ended at `resume_after`; when every shard is, the rescore
    /// has succeeded (returned true). Fails with `RescoreStopped` when the
    /// rescore is no longer running or the shard's progress moved.
    async fn finish_rescore_shard(
        &self,
        id: Uuid,
        shard: ShardFilter,
        resume_after: Option<Uuid>,
        at: DateTime<Utc>,
        fence: &Fence,
    ) -> Result<bool, StoreError>;
    /// Where `shard` of a rescore stands: (resume after, finished).
    async fn rescore_shard(
        &self,
        id: Uuid,
        shard: ShardFilter,
    ) -> Result<(Option<Uuid>, bool), StoreError>;
    /// Sets a rescore's state (and start or end time, error).
    async fn set_rescore_state(
        &self,
        id: Uuid,
        state: i32,
        at: DateTime<Utc>,
        error: &str,
    ) -> Result<(), StoreError>;

    /// A customer's newest transition (by transition time, then id).
    async fn last_transition(
        &self,
        customer_id: Uuid,
    ) -> Result<Option<RecordedTransition>, StoreError>;
    /// Transitions in ListTransitions order.
    async fn list_transitions(
        &self,
        query: &TransitionQuery,
    ) -> Result<Vec<RecordedTransition>, StoreError>;
    /// Every transition of these customers, each customer's in
    /// ListTransitions order (customers without any are left out).
    async fn customer_transitions(
        &self,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<RecordedTransition>>, StoreError>;
    /// The kept inputs of these customers, in no particular order.
    async fn load_inputs(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Vec<Input>>, StoreError>;
    /// The transition log.
    fn transition_log(&self) -> &EventLog;
    /// The cursor a consumer saved (empty when none).
    async fn saved_cursor(&self, consumer: &str, shard: ShardFilter) -> Result<String, StoreError>;
}

/// The migrations of the scoring database.
pub const MIGRATIONS: ServiceMigrations = ServiceMigrations {
    schema: "scoring",
    postgres: &[
        EmbeddedMigration {
            version: 1,
            description: "models, customers, features, transitions and their log, rescores, cursors",
            sql: include_str!("../migrations/postgres/0001_scoring.sql"),
        },
        EmbeddedMigration {
            version: 2,
            description: "customers.last_transition no longer used",
            sql: include_str!("../migrations/postgres/0002_last_transition_unused.sql"),
        },
        EmbeddedMigration {
            version: 3,
            description: "customer inputs kept, so histories can be derived again",
            sql: include_str!("../migrations/postgres/0003_customer_inputs.sql"),
        },
        clm_eventlog::kit::postgres_migration(4),
        EmbeddedMigration {
            version: 5,
            description: "customers carry their shard; rescore progress per shard",
            sql: include_str!("../migrations/postgres/0005_shards.sql"),
        },
    ],
    sqlite: &[
        EmbeddedMigration {
            version: 1,
            description: "models, customers, features, transitions and their log, rescores, cursors",
            sql: include_str!("../migrations/sqlite/0001_scoring.sql"),
        },
        EmbeddedMigration {
            version: 2,
            description: "customer inputs kept, so histories can be derived again",
            sql: include_str!("../migrations/sqlite/0002_customer_inputs.sql"),
        },
        clm_eventlog::kit::sqlite_migration(3),
        EmbeddedMigration {
            version: 4,
            description: "rescore progress per shard",
            sql: include_str!("../migrations/sqlite/0004_rescore_shards.sql"),
        },
    ],
};

/// The name of the transition log table.
pub const TRANSITION_LOG_TABLE: &str = "transition_log";

/// Opens the store for an open database.
pub fn open(pools: Pools) -> Arc<dyn ScoringStore> {
    match pools {
        Pools::Postgres(pool) => Arc::new(postgres::PostgresScoringStore::new(pool)),
        Pools::Sqlite(pools) => Arc::new(sqlite::SqliteScoringStore::new(pools)),
    }
}

// Encodings shared by both stores.

// Features and snapshots are stored in a compact binary form: a format
// byte, then postcard (the serde data model with variable-length integers;
// fields in declaration order, enums by variant index, times as seconds and
// nanoseconds). A field or variant is only ever added at the end, and a new
// layout gets a new format byte. Values stored as JSON by earlier versions
// begin with `{` and are still read; they are rewritten in the binary form
// the next time the customer is written.

/// The format byte of postcard-encoded values.
const POSTCARD_V1: u8 = 1;

fn encode_binary<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serialising these types to memory cannot fail.
    postcard::to_extend(value, vec![POSTCARD_V1]).expect("a stored value serialises")
}

fn decode_stored<T: serde::de::DeserializeOwned>(raw: &[u8], what: &str) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt(format!("{what}: {reason}"));
    match raw.first() {
        Some(&POSTCARD_V1) => {
            postcard::from_bytes(&raw[1..]).map_err(|err| corrupt(err.to_string()))
        }
        Some(b'{') => serde_json::from_slice(raw).map_err(|err| corrupt(err.to_string())),
        Some(other) => Err(corrupt(format!("unknown format {other}"))),
        None => Err(corrupt("empty".to_owned())),
    }
}

pub(crate) fn encode_features(features: &CustomerFeatures) -> Vec<u8> {
    encode_binary(features)
}

pub(crate) fn decode_features(raw: Option<&[u8]>) -> Result<CustomerFeatures, StoreError> {
    match raw {
        None => Ok(CustomerFeatures::new()),
        Some(raw) => decode_stored(raw, "customer features"),
    }
}

pub(crate) fn encode_snapshot(snapshot: Option<&LifecycleSnapshot>) -> Option<Vec<u8>> {
    snapshot.map(encode_binary)
}

pub(crate) fn decode_snapshot(raw: Option<&[u8]>) -> Result<Option<LifecycleSnapshot>, StoreError> {
    raw.map(|raw| decode_stored(raw, "lifecycle snapshot"))
        .transpose()
}

/// A transition as stored: its `clm.scoring.v1.Transition` message, the
/// form the transition log carries too.
pub(crate) fn encode_transition(transition: &RecordedTransition) -> Vec<u8> {
    transition.to_proto().encode_to_vec()
}

pub(crate) fn decode_transition(raw: &[u8]) -> Result<RecordedTransition, StoreError> {
    let message = proto::Transition::decode(raw)
        .map_err(|err| StoreError::Corrupt(format!("transition: {err}")))?;
    RecordedTransition::from_proto(&message)
        .map_err(|err| StoreError::Corrupt(format!("transition {}: {err}", message.id)))
}

pub(crate) fn encode_model(model: &Model) -> Vec<u8> {
    let mut message = model.to_proto();
    message.state = 0;
    message.built_in = false;
    message.create_time = None;
    message.activate_time = None;
    message.encode_to_vec()
}

/// A stored model with its output-only fields.
pub(crate) fn decode_model(
    body: &[u8],
    built_in: bool,
    create_time: DateTime<Utc>,
    activate_time: Option<DateTime<Utc>>,
    active: bool,
) -> Result<Model, StoreError> {
    let message =
        proto::Model::decode(body).map_err(|err| StoreError::Corrupt(format!("model: {err}")))?;
    let (mut model, violations) = Model::from_proto(&message);
    if let Some(violation) = violations.first() {
        return Err(StoreError::Corrupt(format!(
            "stored model {}: {}",
            message.version, violation.description
        )));
    }
    model.built_in = built_in;
    model.create_time = Some(create_time);
    model.activate_time = activate_time;
    model.state = if active {
        crate::model::ModelState::Active
    } else {
        crate::model::ModelState::Inactive
    };
    Ok(model)
}

/// An entry to append to the transition log.
pub(crate) struct LogEntry {
    kind: &'static str,
    event_id: Uuid,
    customer_id: Option<Uuid>,
    payload: Vec<u8>,
}

impl LogEntry {
    /// The entry as the event log appends it.
    pub(crate) fn to_append(&self, recorded_at: DateTime<Utc>) -> clm_eventlog::NewEntry<'_> {
        clm_eventlog::NewEntry {
            event_id: self.event_id,
            customer_id: self.customer_id,
            kind: self.kind,
            payload: &self.payload,
            recorded_at,
        }
    }
}

/// The transition log entries of a change set, in the order they are
/// appended: the retractions, then the new transitions.
pub(crate) fn log_entries(changes: &ChangeSet, now: DateTime<Utc>) -> Vec<LogEntry> {
    use proto::transition_log_entry::Change;
    let retractions = changes.retracted.iter().map(|transition| {
        let retracted = proto::TransitionRetracted {
            transition: Some(transition.to_proto()),
        };
        (
            RETRACTION_KIND,
            transition,
            now,
            Change::Retracted(retracted),
        )
    });
    let transitions = changes.transitions.iter().map(|transition| {
        let change = Change::Transition(transition.to_proto());
        (TRANSITION_KIND, transition, transition.record_time, change)
    });
    retractions
        .chain(transitions)
        .map(|(kind, transition, commit_time, change)| {
            let event_id = Uuid::now_v7();
            let entry = proto::TransitionLogEntry {
                cursor: String::new(),
                entry_id: event_id.to_string(),
                customer_id: transition.customer_id.to_string(),
                commit_time: Some(crate::model_proto::timestamp_to_proto(commit_time)),
                change: Some(change),
            };
            LogEntry {
                kind,
                event_id,
                customer_id: Some(transition.customer_id),
                payload: entry.encode_to_vec(),
            }
        })
        .collect()
}

/// The kind of transition log entries.
const TRANSITION_KIND: &str = "lifecycle.transition";
/// The kind of retraction entries.
const RETRACTION_KIND: &str = "lifecycle.transition_retracted";

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;
    use crate::compiled_model::CompiledModel;
    use crate::lifecycle::LifecycleState;

    fn sample() -> (CustomerFeatures, LifecycleSnapshot) {
        // A time with nanoseconds, which the binary form keeps exactly.
        let now = Utc.timestamp_opt(1_790_000_000, 123_456_789).unwrap();
        let mut features = crate::bench::typical_customer(7, 20, now);
        features.record_nps(9, now);
        let model = CompiledModel::compile(crate::default_model()).unwrap();
        let snapshot = model
            .evaluate(&features, &LifecycleState::default(), now)
            .snapshot;
        (features, snapshot)
    }

    #[test]
    fn features_and_snapshots_round_trip_in_the_binary_form() {
        let (features, snapshot) = sample();
        let raw = encode_features(&features);
        assert_eq!(raw[0], POSTCARD_V1);
        assert_eq!(decode_features(Some(&raw)).unwrap(), features);
        let raw = encode_snapshot(Some(&snapshot)).unwrap();
        assert_eq!(decode_snapshot(Some(&raw)).unwrap(), Some(snapshot));
        assert!(
            raw.len() < serde_json::to_vec(&features).unwrap().len(),
            "the binary form is the smaller"
        );
    }

    #[test]
    fn values_stored_as_json_are_still_read() {
        let (features, snapshot) = sample();
        let json = serde_json::to_vec(&features).unwrap();
        assert_eq!(json[0], b'{');
        assert_eq!(decode_features(Some(&json)).unwrap(), features);
        let json = serde_json::to_vec(&snapshot).unwrap();
        assert_eq!(decode_snapshot(Some(&json)).unwrap(), Some(snapshot));
    }

    #[test]
    fn unknown_or_damaged_values_are_reported() {
        let (features, _) = sample();
        let mut raw = encode_features(&features);
        raw.truncate(raw.len() / 2);
        for bad in [raw, vec![9, 1, 2], Vec::new()] {
            let err = decode_features(Some(&bad)).unwrap_err();
            assert!(
                matches!(&err, StoreError::Corrupt(reason) if reason.starts_with("customer features")),
                "{err:?}"
            );
        }
    }
}
