//! Where surveys, dispatches and responses are kept: a store trait with
//! PostgreSQL and SQLite implementations that hold no business rules, the
//! feedback log beside them, and the embedded migrations.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, DurationRound as _, TimeDelta, Utc};
use clm_eventlog::EventLog;
use clm_platform::db::{DbFailure, EmbeddedMigration, Pools, ServiceMigrations};
use uuid::Uuid;

use std::collections::HashMap;

use clm_eventlog::ShardFilter;
use clm_eventlog::consumer::cursors::CursorMove;

use crate::model::{
    CustomerChange, Dispatch, DispatchQuery, Fate, Lifecycle, Question, Response, ResponseQuery,
    Survey, SurveyQuery,
};
use crate::summary::Tally;

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A transaction lost a race (deadlock, serialization); safe to retry.
    #[error("transaction conflict: {0}")]
    Conflict(String),
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

    /// A row that does not decode.
    pub fn corrupt(what: &str, err: impl std::fmt::Display) -> Self {
        Self::Internal(format!("a stored {what} does not decode: {err}"))
    }
}

/// An entry for the feedback log, written in the same transaction as the
/// change it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The entry's id.
    pub event_id: Uuid,
    /// The customer, which decides the shard.
    pub customer_id: Uuid,
    /// `dispatch.changed`, `response.recorded` or `response.text_erased`.
    pub kind: &'static str,
    /// The encoded `FeedbackLogEntry` (without its cursor).
    pub payload: Vec<u8>,
    /// When it was written.
    pub recorded_at: DateTime<Utc>,
}

/// Makes the log entry of a dispatch that was stored or changed.
pub type DispatchEntry = dyn for<'d> Fn(&'d Dispatch) -> LogEntry + Send + Sync;

/// Makes the log entry of an erasure's deleted free text: the customer and
/// the number of responses changed.
pub type TextErasedEntry = dyn Fn(Uuid, i64) -> LogEntry + Send + Sync;

/// What creating a survey did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// It was stored.
    New(Survey),
    /// A survey created earlier with the same request id.
    Earlier(Survey),
}

/// What an update did.
// Returned once per call and matched at once, never kept: boxing the survey
// would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Updated {
    /// It was stored.
    Done(Survey),
    /// The stored version was not the one the update was made from.
    VersionChanged(i64),
    /// No such survey.
    NotFound,
}

/// A response to store, with what it adds to the figures and the log.
#[derive(Debug, Clone, PartialEq)]
pub struct NewResponse {
    /// The response.
    pub response: Response,
    /// What it adds to its survey's figures (its dispatch, if any, moves
    /// from DISPATCHED to RESPONDED and counts as answered in the hour it
    /// was released).
    pub tally: Tally,
    /// The log entries to append.
    pub log: Vec<LogEntry>,
}

/// What recording a response did.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// It was stored.
    New(Response),
    /// A response with the same response id was stored before.
    Duplicate(Response),
    /// Its dispatch was no longer DISPATCHED (answered by another response
    /// meanwhile, or expired); nothing was stored.
    DispatchClosed,
}

/// The feedback service's storage.
#[async_trait]
pub trait FeedbackStore: Send + Sync + 'static {
    /// Stores a new survey with its first question set; with a request id
    /// seen before, returns the survey that created instead.
    async fn create_survey(
        &self,
        survey: &Survey,
        request_id: Option<&str>,
    ) -> Result<Created, StoreError>;
    /// A survey by id, archived ones included.
    async fn survey(&self, id: Uuid) -> Result<Option<Survey>, StoreError>;
    /// A page of surveys, oldest first.
    async fn list_surveys(&self, query: &SurveyQuery) -> Result<Vec<Survey>, StoreError>;
    /// Replaces a survey whose stored version is `survey.version - 1`; when
    /// `survey.questions_version == survey.version`, its questions are kept
    /// as a new question set.
    async fn update_survey(&self, survey: &Survey) -> Result<Updated, StoreError>;
    /// The questions a survey had at `questions_version`.
    async fn questions(
        &self,
        survey_id: Uuid,
        questions_version: i64,
    ) -> Result<Option<Vec<Question>>, StoreError>;
    /// Stores dispatches; one whose (survey, trigger, source entry) is
    /// stored already is left as it is. Returns those stored now.
    async fn insert_dispatches(&self, dispatches: &[Dispatch])
    -> Result<Vec<Dispatch>, StoreError>;
    /// A dispatch by id.
    async fn dispatch(&self, id: Uuid) -> Result<Option<Dispatch>, StoreError>;
    /// A page of dispatches, oldest due time first.
    async fn list_dispatches(&self, query: &DispatchQuery) -> Result<Vec<Dispatch>, StoreError>;
    /// Records a response, its figures and log entries atomically.
    async fn record_response(&self, new: &NewResponse) -> Result<Recorded, StoreError>;
    /// The response stored under a caller's response id.
    async fn response_by_response_id(
        &self,
        response_id: &str,
    ) -> Result<Option<Response>, StoreError>;
    /// A page of responses, newest first.
    async fn list_responses(&self, query: &ResponseQuery) -> Result<Vec<Response>, StoreError>;
    /// The figures of a survey's responses submitted, and dispatches
    /// released, in `[start, end)`.
    async fn tally(
        &self,
        survey_id: Uuid,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Tally, StoreError>;
    /// The feedback log.
    fn log(&self) -> &EventLog;

    /// The latest lifecycle known of each customer that has one.
    async fn lifecycles(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Lifecycle>, StoreError>;
    /// What identity told of each customer that was merged or erased.
    async fn fates(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Fate>, StoreError>;
    /// Applies what a batch of transition or touchpoint log entries asks,
    /// atomically with the consumer's cursor move: lifecycles kept when
    /// newer than the stored one, new dispatches stored unless their
    /// (survey, trigger, source entry) is stored already, scheduled
    /// dispatches of retracted sources suppressed (RETRACTED). Every
    /// dispatch stored or changed gets the log entry `entry` makes of it.
    async fn apply_events(
        &self,
        batch: &EventBatch,
        entry: &DispatchEntry,
        cursor: &CursorMove,
    ) -> Result<(), StoreError>;
    /// Applies merges and erasures with the consumer's cursor move: a
    /// merged customer's dispatches and responses move to the survivor; an
    /// erased customer's scheduled dispatches are suppressed
    /// (CUSTOMER_ERASED, each logged with `entry`) and the free text of
    /// their responses deleted (logged with `text_erased`, given the
    /// customer and the number of responses changed).
    async fn apply_customer_changes(
        &self,
        changes: &[CustomerChange],
        entry: &DispatchEntry,
        text_erased: &TextErasedEntry,
        cursor: &CursorMove,
    ) -> Result<(), StoreError>;
    /// The cursor a consumer saved (empty when none).
    async fn saved_cursor(&self, consumer: &str, shard: ShardFilter) -> Result<String, StoreError>;
    /// Up to `limit` SCHEDULED dispatches due at or before `now`, oldest due
    /// time first.
    async fn due_dispatches(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Dispatch>, StoreError>;
    /// When `customer_id` was last sent each survey it was sent.
    async fn last_releases(
        &self,
        customer_id: Uuid,
    ) -> Result<HashMap<Uuid, DateTime<Utc>>, StoreError>;
    /// Settles scheduled dispatches (released or suppressed, as given),
    /// each only if it is still SCHEDULED, with its log entry; a release
    /// counts in its survey's rollup. Returns those settled.
    async fn settle_dispatches(
        &self,
        settled: &[(Dispatch, LogEntry)],
    ) -> Result<Vec<Dispatch>, StoreError>;
    /// Suppresses every scheduled dispatch of an archived survey
    /// (SURVEY_INACTIVE), each with the log entry `entry` makes. Returns how
    /// many.
    async fn suppress_survey_dispatches(
        &self,
        survey_id: Uuid,
        entry: &DispatchEntry,
    ) -> Result<usize, StoreError>;
    /// Moves up to `limit` DISPATCHED dispatches whose window closed at or
    /// before `now` to EXPIRED, each with the log entry `entry` makes.
    /// Returns how many.
    async fn expire_dispatches(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        entry: &DispatchEntry,
    ) -> Result<usize, StoreError>;
}

/// What a batch of transition or touchpoint log entries asks of the store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventBatch {
    /// Lifecycles seen on transitions (the newest of each customer wins).
    pub lifecycles: Vec<(Uuid, Lifecycle)>,
    /// Dispatches scheduled (or suppressed as STALE) by matching triggers.
    pub dispatches: Vec<Dispatch>,
    /// The sources (transition ids) retracted.
    pub retracted: Vec<String>,
}

/// The name of the feedback log's table.
pub const LOG_TABLE: &str = "feedback_log";

/// The migrations of the feedback database.
pub const MIGRATIONS: ServiceMigrations = ServiceMigrations {
    schema: "feedback",
    postgres: &[
        EmbeddedMigration {
            version: 1,
            description: "surveys, question sets, dispatches, responses, rollups, the feedback log",
            sql: include_str!("../migrations/postgres/0001_feedback.sql"),
        },
        clm_eventlog::kit::postgres_migration(2),
    ],
    sqlite: &[
        EmbeddedMigration {
            version: 1,
            description: "surveys, question sets, dispatches, responses, rollups, the feedback log",
            sql: include_str!("../migrations/sqlite/0001_feedback.sql"),
        },
        clm_eventlog::kit::sqlite_migration(2),
    ],
};

/// Opens the store for an open database.
pub fn open(pools: Pools) -> Arc<dyn FeedbackStore> {
    let log = EventLog::new(pools.clone(), LOG_TABLE);
    match pools {
        Pools::Postgres(pool) => Arc::new(postgres::PostgresFeedbackStore::new(pool, log)),
        Pools::Sqlite(pools) => Arc::new(sqlite::SqliteFeedbackStore::new(pools, log)),
    }
}

/// The slot of a rollup row a response (or dispatch) adds to: FNV-1a of
/// its id, over 16 slots (see the migration).
pub fn rollup_slot(id: &str) -> i16 {
    let hash = id.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    (hash % 16) as i16
}

/// How a summary window is read: whole hours from the rollups, the partial
/// hours at either edge from the rows themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowParts {
    /// Whole hours `[start, end)`, when there are any.
    pub hours: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// The partial ranges read from rows (at most two).
    pub edges: [Option<(DateTime<Utc>, DateTime<Utc>)>; 2],
}

/// The hour a time falls in.
pub fn hour_of(time: DateTime<Utc>) -> DateTime<Utc> {
    time.duration_trunc(TimeDelta::hours(1)).unwrap_or(time)
}

/// Splits `[start, end)` into whole hours and partial edges.
pub fn window_parts(start: DateTime<Utc>, end: DateTime<Utc>) -> WindowParts {
    if end <= start {
        return WindowParts {
            hours: None,
            edges: [None, None],
        };
    }
    let first_whole = if hour_of(start) == start {
        start
    } else {
        hour_of(start) + TimeDelta::hours(1)
    };
    let last_whole = hour_of(end);
    if first_whole >= last_whole {
        return WindowParts {
            hours: None,
            edges: [Some((start, end)), None],
        };
    }
    WindowParts {
        hours: Some((first_whole, last_whole)),
        edges: [
            (start < first_whole).then_some((start, first_whole)),
            (last_whole < end).then_some((last_whole, end)),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_whole_hours_and_two_edges() {
        let at = |text: &str| DateTime::parse_from_rfc3339(text).unwrap().to_utc();
        let parts = window_parts(at("2026-01-01T10:15:00Z"), at("2026-01-01T13:30:00Z"));
        assert_eq!(
            parts.hours,
            Some((at("2026-01-01T11:00:00Z"), at("2026-01-01T13:00:00Z")))
        );
        assert_eq!(
            parts.edges,
            [
                Some((at("2026-01-01T10:15:00Z"), at("2026-01-01T11:00:00Z"))),
                Some((at("2026-01-01T13:00:00Z"), at("2026-01-01T13:30:00Z")))
            ]
        );
        let aligned = window_parts(at("2026-01-01T10:00:00Z"), at("2026-01-01T12:00:00Z"));
        assert_eq!(aligned.edges, [None, None]);
        let inside = window_parts(at("2026-01-01T10:15:00Z"), at("2026-01-01T10:45:00Z"));
        assert_eq!(inside.hours, None);
        assert_eq!(
            inside.edges[0],
            Some((at("2026-01-01T10:15:00Z"), at("2026-01-01T10:45:00Z")))
        );
        let empty = window_parts(at("2026-01-01T10:45:00Z"), at("2026-01-01T10:15:00Z"));
        assert_eq!(empty.edges, [None, None]);
    }
}
