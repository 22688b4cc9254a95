//! Where surveys, dispatches and responses are kept: a store trait with
//! PostgreSQL and SQLite implementations that hold no business rules, the
//! feedback log beside them, and the embedded migrations.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Datelike as _, DurationRound as _, TimeDelta, Utc};
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
    /// Dispatches by id; ids not stored are left out.
    async fn dispatches(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Dispatch>, StoreError>;
    /// A dispatch by id.
    async fn dispatch(&self, id: Uuid) -> Result<Option<Dispatch>, StoreError> {
        Ok(self.dispatches(&[id]).await?.remove(&id))
    }
    /// A page of dispatches, oldest due time first.
    async fn list_dispatches(&self, query: &DispatchQuery) -> Result<Vec<Dispatch>, StoreError>;
    /// Records responses (distinct response ids), their figures and log
    /// entries in one transaction; one result per response, in order. A
    /// response that is not stored (a duplicate, a closed dispatch) adds
    /// nothing to the figures and writes nothing to the log.
    async fn record_responses(&self, news: &[NewResponse]) -> Result<Vec<Recorded>, StoreError>;
    /// Records one response, its figures and log entries atomically.
    async fn record_response(&self, new: &NewResponse) -> Result<Recorded, StoreError> {
        self.record_responses(std::slice::from_ref(new))
            .await?
            .pop()
            .ok_or_else(|| StoreError::Internal("a response was recorded with no result".into()))
    }
    /// The responses stored under callers' response ids, by response id;
    /// ids not stored are left out.
    async fn responses_by_response_ids(
        &self,
        response_ids: &[&str],
    ) -> Result<HashMap<String, Response>, StoreError>;
    /// The response stored under a caller's response id.
    async fn response_by_response_id(
        &self,
        response_id: &str,
    ) -> Result<Option<Response>, StoreError> {
        Ok(self
            .responses_by_response_ids(&[response_id])
            .await?
            .remove(response_id))
    }
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
    /// Folds the slots of every rollup period that ended before `before`
    /// into one row (slot 0), up to `limit` distinct periods of each grain
    /// per call, oldest first; returns how many periods of any grain were
    /// in reach (less than `limit` of each when nothing is left). The
    /// figures do not change: a summary then reads one row per period
    /// instead of up to 16. A write into a folded period (a late response,
    /// a merge) adds slot rows again, which a later call folds.
    async fn compact_rollups(&self, before: DateTime<Utc>, limit: u32)
    -> Result<usize, StoreError>;
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
    /// For each of `customer_ids` that was ever sent a survey: when it was
    /// last sent each survey it was sent (one read for a whole sweep round).
    async fn last_releases(
        &self,
        customer_ids: &[Uuid],
    ) -> Result<HashMap<Uuid, HashMap<Uuid, DateTime<Utc>>>, StoreError>;
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
        EmbeddedMigration {
            version: 3,
            description: "summary edges read by index only; rollup periods still spread over slots",
            sql: include_str!("../migrations/postgres/0003_summary_edges_index_only.sql"),
        },
    ],
    sqlite: &[
        EmbeddedMigration {
            version: 1,
            description: "surveys, question sets, dispatches, responses, rollups, the feedback log",
            sql: include_str!("../migrations/sqlite/0001_feedback.sql"),
        },
        clm_eventlog::kit::sqlite_migration(2),
        EmbeddedMigration {
            version: 3,
            description: "rollup periods still spread over slots",
            sql: include_str!("../migrations/sqlite/0003_rollup_compaction.sql"),
        },
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

/// The lengths of period a rollup row covers. Every response and release
/// is added to the row of its hour, of its day and of its month (UTC), so
/// that a window reads whole months, then whole days, then whole hours at
/// its edges: a year's window reads a few hundred rows, not one per hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Grain {
    /// One hour.
    Hour,
    /// One UTC day.
    Day,
    /// One UTC calendar month.
    Month,
}

impl Grain {
    /// Every grain, finest first.
    pub const ALL: [Grain; 3] = [Grain::Hour, Grain::Day, Grain::Month];

    /// The value of the `grain` column.
    pub fn code(self) -> i16 {
        match self {
            Self::Hour => 0,
            Self::Day => 1,
            Self::Month => 2,
        }
    }

    /// The start of the period `time` falls in.
    pub fn start(self, time: DateTime<Utc>) -> DateTime<Utc> {
        let hour = time.duration_trunc(TimeDelta::hours(1)).unwrap_or(time);
        match self {
            Self::Hour => hour,
            Self::Day => time.duration_trunc(TimeDelta::days(1)).unwrap_or(hour),
            Self::Month => time
                .date_naive()
                .with_day(1)
                .and_then(|day| day.and_hms_opt(0, 0, 0))
                .map_or(hour, |start| start.and_utc()),
        }
    }

    /// The start of the period after the one starting at `start`.
    fn next(self, start: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Self::Hour => start + TimeDelta::hours(1),
            Self::Day => start + TimeDelta::days(1),
            Self::Month => start
                .checked_add_months(chrono::Months::new(1))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    }

    /// The first period start at or after `time`.
    fn ceil(self, time: DateTime<Utc>) -> DateTime<Utc> {
        let start = self.start(time);
        if start == time {
            start
        } else {
            self.next(start)
        }
    }
}

/// The hour a time falls in.
pub fn hour_of(time: DateTime<Utc>) -> DateTime<Utc> {
    Grain::Hour.start(time)
}

/// What a write adds to the rollups, by (survey, grain, period, slot), in
/// key order: one statement writes them all, and every writer takes the
/// rows' locks in the same order.
#[derive(Debug, Default)]
pub struct RollupDeltas {
    rows: std::collections::BTreeMap<(Uuid, Grain, DateTime<Utc>, i16), Tally>,
}

impl RollupDeltas {
    /// Adds `tally` at `time` to the survey's hour, day and month in
    /// `slot`.
    pub fn add(&mut self, survey_id: Uuid, time: DateTime<Utc>, slot: i16, tally: &Tally) {
        for grain in Grain::ALL {
            let row = self
                .rows
                .entry((survey_id, grain, grain.start(time), slot))
                .or_default();
            *row = row.plus(tally);
        }
    }

    /// The rows to add to, in key order.
    pub fn rows(&self) -> impl Iterator<Item = (&(Uuid, Grain, DateTime<Utc>, i16), &Tally)> {
        self.rows.iter()
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// How a summary window is read: whole periods from the rollups, the
/// partial hours at either edge from the rows themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowParts {
    /// Whole periods `[start, end)` of a grain, at most two of each grain
    /// but the coarsest.
    pub periods: Vec<(Grain, DateTime<Utc>, DateTime<Utc>)>,
    /// The partial ranges read from rows (at most two).
    pub edges: [Option<(DateTime<Utc>, DateTime<Utc>)>; 2],
}

/// Splits `[start, end)` into whole months, whole days around them, whole
/// hours around those and partial edges.
pub fn window_parts(start: DateTime<Utc>, end: DateTime<Utc>) -> WindowParts {
    let mut parts = WindowParts {
        periods: Vec::new(),
        edges: [None, None],
    };
    if end <= start {
        return parts;
    }
    let first_whole = Grain::Hour.ceil(start);
    let last_whole = Grain::Hour.start(end);
    if first_whole >= last_whole {
        parts.edges[0] = Some((start, end));
        return parts;
    }
    parts.edges = [
        (start < first_whole).then_some((start, first_whole)),
        (last_whole < end).then_some((last_whole, end)),
    ];
    split_periods(first_whole, last_whole, 0, &mut parts.periods);
    parts
}

/// Splits `[from, to)`, aligned to `Grain::ALL[level]`, into the coarsest
/// whole periods.
fn split_periods(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    level: usize,
    out: &mut Vec<(Grain, DateTime<Utc>, DateTime<Utc>)>,
) {
    let grain = Grain::ALL[level];
    if let Some(&coarser) = Grain::ALL.get(level + 1) {
        let inner_from = coarser.ceil(from);
        let inner_to = coarser.start(to);
        if inner_from < inner_to {
            if from < inner_from {
                out.push((grain, from, inner_from));
            }
            split_periods(inner_from, inner_to, level + 1, out);
            if inner_to < to {
                out.push((grain, inner_to, to));
            }
            return;
        }
    }
    out.push((grain, from, to));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    #[test]
    fn a_window_is_whole_periods_and_two_edges() {
        let parts = window_parts(at("2026-01-01T10:15:00Z"), at("2026-01-01T13:30:00Z"));
        assert_eq!(
            parts.periods,
            vec![(
                Grain::Hour,
                at("2026-01-01T11:00:00Z"),
                at("2026-01-01T13:00:00Z")
            )]
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
        assert!(inside.periods.is_empty());
        assert_eq!(
            inside.edges[0],
            Some((at("2026-01-01T10:15:00Z"), at("2026-01-01T10:45:00Z")))
        );
        let empty = window_parts(at("2026-01-01T10:45:00Z"), at("2026-01-01T10:15:00Z"));
        assert_eq!(empty.edges, [None, None]);
        assert!(empty.periods.is_empty());
    }

    #[test]
    fn a_long_window_reads_months_then_days_then_hours() {
        let parts = window_parts(at("2025-11-28T22:30:00Z"), at("2026-03-02T01:10:00Z"));
        assert_eq!(
            parts.periods,
            vec![
                (
                    Grain::Hour,
                    at("2025-11-28T23:00:00Z"),
                    at("2025-11-29T00:00:00Z")
                ),
                (
                    Grain::Day,
                    at("2025-11-29T00:00:00Z"),
                    at("2025-12-01T00:00:00Z")
                ),
                (
                    Grain::Month,
                    at("2025-12-01T00:00:00Z"),
                    at("2026-03-01T00:00:00Z")
                ),
                (
                    Grain::Day,
                    at("2026-03-01T00:00:00Z"),
                    at("2026-03-02T00:00:00Z")
                ),
                (
                    Grain::Hour,
                    at("2026-03-02T00:00:00Z"),
                    at("2026-03-02T01:00:00Z")
                ),
            ]
        );
        // The parts cover the window exactly once, in order.
        let mut cursor = at("2025-11-28T23:00:00Z");
        for (_, from, to) in &parts.periods {
            assert_eq!(*from, cursor);
            cursor = *to;
        }
        assert_eq!(cursor, at("2026-03-02T01:00:00Z"));
        // Within one month: days, no months.
        let days = window_parts(at("2026-02-03T00:00:00Z"), at("2026-02-10T05:00:00Z"));
        assert_eq!(
            days.periods,
            vec![
                (
                    Grain::Day,
                    at("2026-02-03T00:00:00Z"),
                    at("2026-02-10T00:00:00Z")
                ),
                (
                    Grain::Hour,
                    at("2026-02-10T00:00:00Z"),
                    at("2026-02-10T05:00:00Z")
                ),
            ]
        );
    }

    #[test]
    fn a_delta_lands_in_its_hour_day_and_month() {
        let survey = Uuid::nil();
        let mut deltas = RollupDeltas::default();
        let one = Tally {
            responses: 1,
            ..Tally::default()
        };
        deltas.add(survey, at("2026-02-10T05:20:00Z"), 3, &one);
        deltas.add(survey, at("2026-02-10T06:20:00Z"), 3, &one);
        let rows: Vec<_> = deltas
            .rows()
            .map(|((_, grain, period, slot), tally)| (*grain, *period, *slot, tally.responses))
            .collect();
        assert_eq!(
            rows,
            vec![
                (Grain::Hour, at("2026-02-10T05:00:00Z"), 3, 1),
                (Grain::Hour, at("2026-02-10T06:00:00Z"), 3, 1),
                (Grain::Day, at("2026-02-10T00:00:00Z"), 3, 2),
                (Grain::Month, at("2026-02-01T00:00:00Z"), 3, 2),
            ]
        );
    }
}
