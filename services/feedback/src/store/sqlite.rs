//! The feedback store on SQLite (the embedded default): the PostgreSQL
//! store's statements, in SQLite's column conventions. Ids are UUID
//! strings, times microseconds since the Unix epoch, JSON documents text
//! and booleans 0 or 1. Writes run on the one writer connection (SQLite has
//! a single writer, so write transactions run one after another), reads on
//! the reader connections.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use clm_eventlog::consumer::cursors::{self, CursorMove};
use clm_eventlog::{EventLog, NewEntry, ShardFilter};
use clm_platform::db::sqlite_columns::{decode_err, time as time_column, uuid as uuid_column};
use clm_platform::db::{Pools, SqlitePools};
use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use uuid::Uuid;

use super::postgres::{sentiment_of, strip_text};
use super::{
    Created, DispatchEntry, EventBatch, FeedbackStore, Grain, LogEntry, NewResponse, Recorded,
    RollupDeltas, StoreError, TextErasedEntry, Updated, window_parts,
};
use crate::model::{
    Answer, CustomerChange, Dispatch, DispatchQuery, DispatchState, Fate, Lifecycle, Question,
    Response, ResponseQuery, Sentiment, SuppressReason, Survey, SurveyDefinition, SurveyKind,
    SurveyQuery, SurveyState,
};
use crate::summary::{TALLY_COLUMNS, Tally, column_list};

/// Surveys, dispatches and responses in a SQLite file.
pub struct SqliteFeedbackStore {
    pools: SqlitePools,
    log: EventLog,
}

impl SqliteFeedbackStore {
    /// A store over open pools, with the feedback log in the same file.
    pub fn new(pools: SqlitePools, log: EventLog) -> Self {
        Self { pools, log }
    }
}

/// Dispatches per `INSERT` statement: 11 parameters each, well below
/// SQLite's limit of 32,766 parameters per statement.
const DISPATCHES_PER_STATEMENT: usize = 1000;

/// Values per `IN (...)` list: one statement per 1,000, well below
/// SQLite's limit of 32,766 parameters per statement.
const IDS_PER_STATEMENT: usize = 1000;

/// Inserts dispatches (one statement per [`DISPATCHES_PER_STATEMENT`])
/// unless their (survey, trigger, source entry) is stored already; returns
/// those stored, in the order given.
async fn insert_new_dispatches(
    tx: &mut SqliteConnection,
    dispatches: &[Dispatch],
) -> Result<Vec<Dispatch>, StoreError> {
    let mut stored_ids = HashSet::with_capacity(dispatches.len());
    for chunk in dispatches.chunks(DISPATCHES_PER_STATEMENT) {
        let mut sql: QueryBuilder<Sqlite> =
            QueryBuilder::new(format!("INSERT INTO dispatches ({DISPATCH_COLUMNS}) "));
        sql.push_values(chunk, |mut row, dispatch| {
            row.push_bind(dispatch.id.to_string())
                .push_bind(dispatch.survey_id.to_string())
                .push_bind(dispatch.customer_id.to_string())
                .push_bind(&dispatch.trigger_name)
                .push_bind(&dispatch.source_entry_id)
                .push_bind(dispatch.state.as_str())
                .push_bind(dispatch.due_at.timestamp_micros())
                .push_bind(dispatch.dispatched_at.map(|at| at.timestamp_micros()))
                .push_bind(dispatch.expires_at.map(|at| at.timestamp_micros()))
                .push_bind(dispatch.responded_at.map(|at| at.timestamp_micros()))
                .push_bind(dispatch.created_at.timestamp_micros());
        });
        sql.push(" ON CONFLICT (survey_id, trigger_name, source_entry_id) DO NOTHING RETURNING id");
        let ids: Vec<String> = sql
            .build_query_scalar()
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        for id in ids {
            stored_ids.insert(
                Uuid::try_parse(&id).map_err(|err| StoreError::corrupt("dispatch id", err))?,
            );
        }
    }
    Ok(dispatches
        .iter()
        .filter(|dispatch| stored_ids.contains(&dispatch.id))
        .cloned()
        .collect())
}

/// Moves the SCHEDULED dispatches whose `column` is one of `values` to
/// SUPPRESSED with `reason`; returns them as changed.
async fn suppress_scheduled(
    tx: &mut SqliteConnection,
    column: &str,
    values: &[String],
    reason: SuppressReason,
) -> Result<Vec<Dispatch>, StoreError> {
    let mut changed = Vec::new();
    for chunk in values.chunks(IDS_PER_STATEMENT) {
        let mut sql: QueryBuilder<Sqlite> = QueryBuilder::new("UPDATE dispatches SET state = ");
        sql.push_bind(DispatchState::Suppressed(reason).as_str());
        sql.push(format!(" WHERE state = 'SCHEDULED' AND {column} IN ("));
        let mut list = sql.separated(", ");
        for value in chunk {
            list.push_bind(value);
        }
        sql.push(format!(") RETURNING {DISPATCH_COLUMNS}"));
        for row in sql
            .build()
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::from_db)?
        {
            changed.push(dispatch_from_row(&row)?);
        }
    }
    // RETURNING gives no order: log them in due order, as they are listed.
    changed.sort_by_key(|dispatch| (dispatch.due_at, dispatch.id));
    Ok(changed)
}

/// Moves the cursor as the transaction's last statement and commits; a
/// cursor moved meanwhile rolls everything back as a conflict.
async fn move_cursor_and_commit(
    mut tx: sqlx::Transaction<'_, Sqlite>,
    cursor: &CursorMove,
) -> Result<(), StoreError> {
    cursors::move_sqlite(&mut tx, cursor)
        .await
        .map_err(StoreError::from_db)?
        .map_err(|moved| StoreError::Conflict(moved.to_string()))?;
    tx.commit().await.map_err(StoreError::from_db)
}

fn lifecycle_from_row(row: &SqliteRow) -> Result<(Uuid, Lifecycle), StoreError> {
    let decode = |err: sqlx::Error| StoreError::corrupt("lifecycle", err);
    Ok((
        uuid_column(row, "customer_id").map_err(decode)?,
        Lifecycle {
            stage: row.try_get("stage").map_err(decode)?,
            acquisition_status: row.try_get("acquisition_status").map_err(decode)?,
            health: row.try_get("health").map_err(decode)?,
            engagement_score: row.try_get("engagement_score").map_err(decode)?,
            lead_score: row.try_get("lead_score").map_err(decode)?,
            health_score: row.try_get("health_score").map_err(decode)?,
            as_of: time_column(row, "as_of").map_err(decode)?,
        },
    ))
}

/// A document as the JSON text it is stored as.
fn to_json(what: &str, value: &impl Serialize) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|err| StoreError::Internal(format!("a {what} does not encode: {err}")))
}

/// A UUID stored as text, or NULL.
fn optional_uuid(row: &SqliteRow, column: &str) -> Result<Option<Uuid>, sqlx::Error> {
    row.try_get::<Option<String>, _>(column)?
        .map(|raw| Uuid::try_parse(&raw).map_err(decode_err))
        .transpose()
}

/// A time stored as microseconds since the Unix epoch, or NULL.
fn optional_time(row: &SqliteRow, column: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    row.try_get::<Option<i64>, _>(column)?
        .map(|micros| {
            DateTime::from_timestamp_micros(micros)
                .ok_or_else(|| sqlx::Error::Decode(format!("bad time in {column}").into()))
        })
        .transpose()
}

const SURVEY_COLUMNS: &str =
    "id, kind, state, version, questions_version, definition, created_at, updated_at, archived_at";

fn survey_from_row(row: &SqliteRow) -> Result<Survey, StoreError> {
    let decode = |err: sqlx::Error| StoreError::corrupt("survey", err);
    let kind: String = row.try_get("kind").map_err(decode)?;
    let state: String = row.try_get("state").map_err(decode)?;
    let definition: String = row.try_get("definition").map_err(decode)?;
    let definition: SurveyDefinition = serde_json::from_str(&definition)
        .map_err(|err| StoreError::corrupt("survey definition", err))?;
    Ok(Survey {
        id: uuid_column(row, "id").map_err(decode)?,
        kind: SurveyKind::parse(&kind).ok_or_else(|| StoreError::corrupt("survey kind", &kind))?,
        state: SurveyState::parse(&state)
            .ok_or_else(|| StoreError::corrupt("survey state", &state))?,
        definition,
        version: row.try_get("version").map_err(decode)?,
        questions_version: row.try_get("questions_version").map_err(decode)?,
        created_at: time_column(row, "created_at").map_err(decode)?,
        updated_at: time_column(row, "updated_at").map_err(decode)?,
        archived_at: optional_time(row, "archived_at").map_err(decode)?,
    })
}

const DISPATCH_COLUMNS: &str = "id, survey_id, customer_id, trigger_name, source_entry_id, state, \
     due_at, dispatched_at, expires_at, responded_at, created_at";

fn dispatch_from_row(row: &SqliteRow) -> Result<Dispatch, StoreError> {
    let decode = |err: sqlx::Error| StoreError::corrupt("dispatch", err);
    let state: String = row.try_get("state").map_err(decode)?;
    Ok(Dispatch {
        id: uuid_column(row, "id").map_err(decode)?,
        survey_id: uuid_column(row, "survey_id").map_err(decode)?,
        customer_id: uuid_column(row, "customer_id").map_err(decode)?,
        trigger_name: row.try_get("trigger_name").map_err(decode)?,
        source_entry_id: row.try_get("source_entry_id").map_err(decode)?,
        state: DispatchState::parse(&state)
            .ok_or_else(|| StoreError::corrupt("dispatch state", &state))?,
        due_at: time_column(row, "due_at").map_err(decode)?,
        dispatched_at: optional_time(row, "dispatched_at").map_err(decode)?,
        expires_at: optional_time(row, "expires_at").map_err(decode)?,
        responded_at: optional_time(row, "responded_at").map_err(decode)?,
        created_at: time_column(row, "created_at").map_err(decode)?,
    })
}

const RESPONSE_COLUMNS: &str = "id, response_id, survey_id, survey_version, dispatch_id, customer_id, \
     answers, submitted_at, sentiment_score, sentiment_scored, language, recorded_at";

fn response_from_row(row: &SqliteRow) -> Result<Response, StoreError> {
    let decode = |err: sqlx::Error| StoreError::corrupt("response", err);
    let answers: String = row.try_get("answers").map_err(decode)?;
    let answers: Vec<Answer> = serde_json::from_str(&answers)
        .map_err(|err| StoreError::corrupt("response's answers", err))?;
    let score: Option<f64> = row.try_get("sentiment_score").map_err(decode)?;
    let scored: Option<bool> = row.try_get("sentiment_scored").map_err(decode)?;
    let language: String = row.try_get("language").map_err(decode)?;
    Ok(Response {
        id: uuid_column(row, "id").map_err(decode)?,
        response_id: row.try_get("response_id").map_err(decode)?,
        survey_id: uuid_column(row, "survey_id").map_err(decode)?,
        survey_version: row.try_get("survey_version").map_err(decode)?,
        dispatch_id: optional_uuid(row, "dispatch_id").map_err(decode)?,
        customer_id: uuid_column(row, "customer_id").map_err(decode)?,
        answers,
        submitted_at: time_column(row, "submitted_at").map_err(decode)?,
        sentiment: sentiment_of(score, scored, &language),
        recorded_at: time_column(row, "recorded_at").map_err(decode)?,
    })
}

/// `TOTAL(c) AS c` for every tally column: SQLite's sum that is 0.0 over
/// no rows and always a real, as PostgreSQL's `COALESCE(SUM(c), 0)::float8`.
static TALLY_SUMS: LazyLock<String> =
    LazyLock::new(|| column_list(|column| format!("TOTAL({column}) AS {column}")));

/// `SUM(c)` for every tally column, in [`TALLY_COLUMNS`] order (whole
/// counts stay integers; `sentiment_sum` is a real).
static COMPACTED_SUMS: LazyLock<String> =
    LazyLock::new(|| column_list(|column| format!("SUM({column})")));

/// `c = c + excluded.c` for every tally column: what a write adds to a
/// rollup row that exists.
static ROLLUP_ADDED: LazyLock<String> = LazyLock::new(|| {
    column_list(|column| format!("{column} = survey_rollups.{column} + excluded.{column}"))
});

fn tally_from_row(row: &SqliteRow) -> Result<Tally, StoreError> {
    let mut columns = [0.0; 17];
    for (slot, column) in columns.iter_mut().zip(TALLY_COLUMNS) {
        *slot = row
            .try_get::<f64, _>(column)
            .map_err(|err| StoreError::corrupt("rollup", err))?;
    }
    Ok(Tally::from_columns(&columns))
}

/// Binds a tally's columns in [`TALLY_COLUMNS`] order: counts as integers,
/// the sentiment sum as a real.
fn push_tally(values: &mut sqlx::query_builder::Separated<'_, '_, Sqlite, &str>, tally: &Tally) {
    for (column, value) in TALLY_COLUMNS.iter().zip(tally.to_columns()) {
        if *column == "sentiment_sum" {
            values.push_bind(value);
        } else {
            values.push_bind(value.round() as i64);
        }
    }
}

/// Records one response of a batch inside the writer's transaction, adding
/// its figures to `deltas`.
async fn record_one(
    tx: &mut SqliteConnection,
    new: &NewResponse,
    deltas: &mut RollupDeltas,
) -> Result<Recorded, StoreError> {
    let response = &new.response;
    let earlier = async |tx: &mut SqliteConnection| -> Result<Option<Response>, StoreError> {
        sqlx::query(&format!(
            "SELECT {RESPONSE_COLUMNS} FROM responses WHERE response_id = ?1"
        ))
        .bind(&response.response_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::from_db)?
        .as_ref()
        .map(response_from_row)
        .transpose()
    };
    // The release time is read from the row, so that the answered count
    // lands in the hour its release was counted in.
    let mut released = None;
    if let Some(dispatch_id) = response.dispatch_id {
        let open: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT dispatched_at FROM dispatches WHERE id = ?1 AND state = 'DISPATCHED'",
        )
        .bind(dispatch_id.to_string())
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        let Some(open) = open else {
            return Ok(match earlier(tx).await? {
                Some(earlier) => Recorded::Duplicate(earlier),
                None => Recorded::DispatchClosed,
            });
        };
        released = open.and_then(DateTime::from_timestamp_micros);
    }
    let answers = to_json("response's answers", &response.answers)?;
    let mut sql: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
        "INSERT INTO responses ({RESPONSE_COLUMNS}, {}) VALUES (",
        TALLY_COLUMNS.join(", ")
    ));
    let mut values = sql.separated(", ");
    values
        .push_bind(response.id.to_string())
        .push_bind(&response.response_id)
        .push_bind(response.survey_id.to_string())
        .push_bind(response.survey_version)
        .push_bind(response.dispatch_id.map(|id| id.to_string()))
        .push_bind(response.customer_id.to_string())
        .push_bind(answers)
        .push_bind(response.submitted_at.timestamp_micros())
        .push_bind(response.sentiment.map(|s| s.score()))
        .push_bind(
            response
                .sentiment
                .map(|s| matches!(s, Sentiment::Scored { .. })),
        )
        .push_bind(
            response
                .sentiment
                .map(|s| s.language().code().to_owned())
                .unwrap_or_default(),
        )
        .push_bind(response.recorded_at.timestamp_micros());
    push_tally(&mut values, &new.tally);
    sql.push(") ON CONFLICT DO NOTHING");
    let inserted = sql
        .build()
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?
        .rows_affected()
        == 1;
    if !inserted {
        return Ok(match earlier(tx).await? {
            Some(earlier) => Recorded::Duplicate(earlier),
            None => Recorded::DispatchClosed,
        });
    }
    let slot = super::rollup_slot(&response.response_id);
    if let Some(dispatch_id) = response.dispatch_id {
        sqlx::query("UPDATE dispatches SET state = 'RESPONDED', responded_at = ?2 WHERE id = ?1")
            .bind(dispatch_id.to_string())
            .bind(response.recorded_at.timestamp_micros())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        if let Some(released) = released {
            let answered = Tally {
                answered: 1,
                ..Tally::default()
            };
            deltas.add(response.survey_id, released, slot, &answered);
        }
    }
    deltas.add(response.survey_id, response.submitted_at, slot, &new.tally);
    Ok(Recorded::New(response.clone()))
}

/// Adds `deltas` to the rollup rows, one statement per 500 rows, in key
/// order.
async fn add_to_rollups(
    tx: &mut SqliteConnection,
    deltas: &RollupDeltas,
) -> Result<(), sqlx::Error> {
    let rows: Vec<_> = deltas.rows().collect();
    for chunk in rows.chunks(500) {
        let mut sql: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
            "INSERT INTO survey_rollups (survey_id, grain, period, slot, {}) ",
            TALLY_COLUMNS.join(", ")
        ));
        sql.push_values(
            chunk,
            |mut values, ((survey_id, grain, period, slot), tally)| {
                values
                    .push_bind(survey_id.to_string())
                    .push_bind(i64::from(grain.code()))
                    .push_bind(period.timestamp_micros())
                    .push_bind(i64::from(*slot));
                push_tally(&mut values, tally);
            },
        );
        sql.push(" ON CONFLICT (survey_id, grain, period, slot) DO UPDATE SET ");
        sql.push(ROLLUP_ADDED.as_str());
        sql.build().execute(&mut *tx).await?;
    }
    Ok(())
}

/// Appends the entries to the feedback log, in order, inside `tx`.
async fn append(
    log: &EventLog,
    tx: &mut SqliteConnection,
    entries: &[LogEntry],
) -> Result<(), sqlx::Error> {
    for entry in entries {
        log.append_sqlite(
            tx,
            &NewEntry {
                event_id: entry.event_id,
                customer_id: Some(entry.customer_id),
                kind: entry.kind,
                payload: &entry.payload,
                recorded_at: entry.recorded_at,
            },
        )
        .await?;
    }
    Ok(())
}

#[async_trait]
impl FeedbackStore for SqliteFeedbackStore {
    async fn create_survey(
        &self,
        survey: &Survey,
        request_id: Option<&str>,
    ) -> Result<Created, StoreError> {
        let definition = to_json("survey definition", &survey.definition)?;
        let questions = to_json("question set", &survey.definition.questions)?;
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        let inserted = sqlx::query(
            "INSERT INTO surveys (id, kind, state, version, questions_version, definition, request_id, \
               created_at, updated_at, archived_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (request_id) DO NOTHING",
        )
        .bind(survey.id.to_string())
        .bind(survey.kind.as_str())
        .bind(survey.state.as_str())
        .bind(survey.version)
        .bind(survey.questions_version)
        .bind(&definition)
        .bind(request_id)
        .bind(survey.created_at.timestamp_micros())
        .bind(survey.updated_at.timestamp_micros())
        .bind(survey.archived_at.map(|at| at.timestamp_micros()))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        if inserted.rows_affected() == 0 {
            // The survey of the earlier request, read in this transaction:
            // the one writer committed it before this one began.
            let row = sqlx::query(&format!(
                "SELECT {SURVEY_COLUMNS} FROM surveys WHERE request_id = ?1"
            ))
            .bind(request_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
            drop(tx);
            return Ok(Created::Earlier(survey_from_row(&row)?));
        }
        sqlx::query(
            "INSERT INTO survey_questions (survey_id, version, questions) VALUES (?1, ?2, ?3)",
        )
        .bind(survey.id.to_string())
        .bind(survey.questions_version)
        .bind(&questions)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        tx.commit().await.map_err(StoreError::from_db)?;
        Ok(Created::New(survey.clone()))
    }

    async fn survey(&self, id: Uuid) -> Result<Option<Survey>, StoreError> {
        sqlx::query(&format!(
            "SELECT {SURVEY_COLUMNS} FROM surveys WHERE id = ?1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pools.reader)
        .await
        .map_err(StoreError::from_db)?
        .as_ref()
        .map(survey_from_row)
        .transpose()
    }

    async fn list_surveys(&self, query: &SurveyQuery) -> Result<Vec<Survey>, StoreError> {
        // As PostgreSQL's `state = ANY('{}')`: no states, no surveys.
        if query.states.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {SURVEY_COLUMNS} FROM surveys WHERE state IN ("
        ));
        let mut list = sql.separated(", ");
        for state in &query.states {
            list.push_bind(state.as_str());
        }
        sql.push(")");
        if let Some(kind) = query.kind {
            sql.push(" AND kind = ").push_bind(kind.as_str());
        }
        if let Some(after) = query.after {
            sql.push(" AND id > ").push_bind(after.to_string());
        }
        sql.push(" ORDER BY id LIMIT ")
            .push_bind(i64::from(query.limit));
        sql.build()
            .fetch_all(&self.pools.reader)
            .await
            .map_err(StoreError::from_db)?
            .iter()
            .map(survey_from_row)
            .collect()
    }

    async fn update_survey(&self, survey: &Survey) -> Result<Updated, StoreError> {
        let definition = to_json("survey definition", &survey.definition)?;
        let questions = if survey.questions_version == survey.version {
            Some(to_json("question set", &survey.definition.questions)?)
        } else {
            None
        };
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        let updated = sqlx::query(
            "UPDATE surveys SET state = ?2, version = ?3, questions_version = ?4, definition = ?5, \
               updated_at = ?6, archived_at = ?7 \
             WHERE id = ?1 AND version = ?3 - 1",
        )
        .bind(survey.id.to_string())
        .bind(survey.state.as_str())
        .bind(survey.version)
        .bind(survey.questions_version)
        .bind(&definition)
        .bind(survey.updated_at.timestamp_micros())
        .bind(survey.archived_at.map(|at| at.timestamp_micros()))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        if updated.rows_affected() == 0 {
            let current: Option<i64> =
                sqlx::query_scalar("SELECT version FROM surveys WHERE id = ?1")
                    .bind(survey.id.to_string())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(StoreError::from_db)?;
            drop(tx);
            return Ok(current.map_or(Updated::NotFound, Updated::VersionChanged));
        }
        if let Some(questions) = &questions {
            sqlx::query(
                "INSERT INTO survey_questions (survey_id, version, questions) VALUES (?1, ?2, ?3)",
            )
            .bind(survey.id.to_string())
            .bind(survey.questions_version)
            .bind(questions)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        }
        tx.commit().await.map_err(StoreError::from_db)?;
        Ok(Updated::Done(survey.clone()))
    }

    async fn questions(
        &self,
        survey_id: Uuid,
        questions_version: i64,
    ) -> Result<Option<Vec<Question>>, StoreError> {
        let found: Option<String> = sqlx::query_scalar(
            "SELECT questions FROM survey_questions WHERE survey_id = ?1 AND version = ?2",
        )
        .bind(survey_id.to_string())
        .bind(questions_version)
        .fetch_optional(&self.pools.reader)
        .await
        .map_err(StoreError::from_db)?;
        found
            .map(|json| {
                serde_json::from_str(&json).map_err(|err| StoreError::corrupt("question set", err))
            })
            .transpose()
    }

    async fn insert_dispatches(
        &self,
        dispatches: &[Dispatch],
    ) -> Result<Vec<Dispatch>, StoreError> {
        if dispatches.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        let stored = insert_new_dispatches(&mut tx, dispatches).await?;
        let mut deltas = RollupDeltas::default();
        for dispatch in &stored {
            if let Some(released) = dispatch.dispatched_at {
                let tally = Tally {
                    dispatched: 1,
                    answered: i64::from(dispatch.responded_at.is_some()),
                    ..Tally::default()
                };
                deltas.add(
                    dispatch.survey_id,
                    released,
                    super::rollup_slot(&dispatch.id.to_string()),
                    &tally,
                );
            }
        }
        add_to_rollups(&mut tx, &deltas)
            .await
            .map_err(StoreError::from_db)?;
        tx.commit().await.map_err(StoreError::from_db)?;
        Ok(stored)
    }

    async fn dispatches(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Dispatch>, StoreError> {
        let ids = to_json(
            "dispatch ids",
            &ids.iter().map(Uuid::to_string).collect::<Vec<_>>(),
        )?;
        sqlx::query(&format!(
            "SELECT {DISPATCH_COLUMNS} FROM dispatches WHERE id IN (SELECT value FROM json_each(?1))"
        ))
        .bind(ids)
        .fetch_all(&self.pools.reader)
        .await
        .map_err(StoreError::from_db)?
        .iter()
        .map(|row| dispatch_from_row(row).map(|dispatch| (dispatch.id, dispatch)))
        .collect()
    }

    async fn list_dispatches(&self, query: &DispatchQuery) -> Result<Vec<Dispatch>, StoreError> {
        let mut sql = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {DISPATCH_COLUMNS} FROM dispatches WHERE 1 = 1"
        ));
        if let Some(survey_id) = query.survey_id {
            sql.push(" AND survey_id = ")
                .push_bind(survey_id.to_string());
        }
        if let Some(customer_id) = query.customer_id {
            sql.push(" AND customer_id = ")
                .push_bind(customer_id.to_string());
        }
        // No states: every state.
        if !query.states.is_empty() {
            sql.push(" AND state IN (");
            let mut list = sql.separated(", ");
            for state in &query.states {
                list.push_bind(state.as_str());
            }
            sql.push(")");
        }
        if let Some(start) = query.start {
            sql.push(" AND due_at >= ")
                .push_bind(start.timestamp_micros());
        }
        if let Some(end) = query.end {
            sql.push(" AND due_at < ").push_bind(end.timestamp_micros());
        }
        if let Some((due_at, id)) = query.after {
            sql.push(" AND (due_at, id) > (")
                .push_bind(due_at.timestamp_micros())
                .push(", ")
                .push_bind(id.to_string())
                .push(")");
        }
        sql.push(" ORDER BY due_at, id LIMIT ")
            .push_bind(i64::from(query.limit));
        sql.build()
            .fetch_all(&self.pools.reader)
            .await
            .map_err(StoreError::from_db)?
            .iter()
            .map(dispatch_from_row)
            .collect()
    }

    async fn record_responses(&self, news: &[NewResponse]) -> Result<Vec<Recorded>, StoreError> {
        if news.is_empty() {
            return Ok(Vec::new());
        }
        // One writer: nothing changes between a check and the write after
        // it.
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        let mut deltas = RollupDeltas::default();
        let mut log = Vec::new();
        let mut results = Vec::with_capacity(news.len());
        for new in news {
            let recorded = record_one(&mut tx, new, &mut deltas).await?;
            if matches!(recorded, Recorded::New(_)) {
                log.extend_from_slice(&new.log);
            }
            results.push(recorded);
        }
        add_to_rollups(&mut tx, &deltas)
            .await
            .map_err(StoreError::from_db)?;
        append(&self.log, &mut tx, &log)
            .await
            .map_err(StoreError::from_db)?;
        tx.commit().await.map_err(StoreError::from_db)?;
        if !log.is_empty() {
            self.log.notify_appended();
        }
        Ok(results)
    }

    async fn responses_by_response_ids(
        &self,
        response_ids: &[&str],
    ) -> Result<HashMap<String, Response>, StoreError> {
        let ids = to_json("response ids", &response_ids)?;
        sqlx::query(&format!(
            "SELECT {RESPONSE_COLUMNS} FROM responses \
             WHERE response_id IN (SELECT value FROM json_each(?1))"
        ))
        .bind(ids)
        .fetch_all(&self.pools.reader)
        .await
        .map_err(StoreError::from_db)?
        .iter()
        .map(|row| response_from_row(row).map(|response| (response.response_id.clone(), response)))
        .collect()
    }

    async fn list_responses(&self, query: &ResponseQuery) -> Result<Vec<Response>, StoreError> {
        let mut sql = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {RESPONSE_COLUMNS} FROM responses WHERE 1 = 1"
        ));
        if let Some(survey_id) = query.survey_id {
            sql.push(" AND survey_id = ")
                .push_bind(survey_id.to_string());
        }
        if let Some(customer_id) = query.customer_id {
            sql.push(" AND customer_id = ")
                .push_bind(customer_id.to_string());
        }
        if let Some(start) = query.start {
            sql.push(" AND submitted_at >= ")
                .push_bind(start.timestamp_micros());
        }
        if let Some(end) = query.end {
            sql.push(" AND submitted_at < ")
                .push_bind(end.timestamp_micros());
        }
        if let Some((submitted_at, id)) = query.before {
            sql.push(" AND (submitted_at, id) < (")
                .push_bind(submitted_at.timestamp_micros())
                .push(", ")
                .push_bind(id.to_string())
                .push(")");
        }
        sql.push(" ORDER BY submitted_at DESC, id DESC LIMIT ")
            .push_bind(i64::from(query.limit));
        sql.build()
            .fetch_all(&self.pools.reader)
            .await
            .map_err(StoreError::from_db)?
            .iter()
            .map(response_from_row)
            .collect()
    }

    async fn tally(
        &self,
        survey_id: Uuid,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Tally, StoreError> {
        let parts = window_parts(start, end);
        let sums = TALLY_SUMS.as_str();
        let survey = survey_id.to_string();
        let mut total = Tally::default();
        let mut conn = self
            .pools
            .reader
            .acquire()
            .await
            .map_err(StoreError::from_db)?;
        for (grain, from, to) in parts.periods {
            let row = sqlx::query(&format!(
                "SELECT {sums} FROM survey_rollups \
                 WHERE survey_id = ?1 AND grain = ?4 AND period >= ?2 AND period < ?3"
            ))
            .bind(&survey)
            .bind(from.timestamp_micros())
            .bind(to.timestamp_micros())
            .bind(i64::from(grain.code()))
            .fetch_one(&mut *conn)
            .await
            .map_err(StoreError::from_db)?;
            total = total.plus(&tally_from_row(&row)?);
        }
        for (from, to) in parts.edges.into_iter().flatten() {
            let row = sqlx::query(&format!(
                "SELECT {sums} FROM responses \
                 WHERE survey_id = ?1 AND submitted_at >= ?2 AND submitted_at < ?3"
            ))
            .bind(&survey)
            .bind(from.timestamp_micros())
            .bind(to.timestamp_micros())
            .fetch_one(&mut *conn)
            .await
            .map_err(StoreError::from_db)?;
            total = total.plus(&tally_from_row(&row)?);
            let (dispatched, answered): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(responded_at) FROM dispatches \
                 WHERE survey_id = ?1 AND dispatched_at >= ?2 AND dispatched_at < ?3",
            )
            .bind(&survey)
            .bind(from.timestamp_micros())
            .bind(to.timestamp_micros())
            .fetch_one(&mut *conn)
            .await
            .map_err(StoreError::from_db)?;
            total = total.plus(&Tally {
                dispatched,
                answered,
                ..Tally::default()
            });
        }
        Ok(total)
    }

    async fn compact_rollups(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<usize, StoreError> {
        let columns = TALLY_COLUMNS.join(", ");
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        let mut reached = 0;
        for grain in Grain::ALL {
            // The one writer: the sums, then the slot rows, in one
            // transaction.
            let (periods, last): (i64, Option<i64>) = sqlx::query_as(
                "SELECT count(*), max(period) FROM ( \
                   SELECT DISTINCT period FROM survey_rollups \
                   WHERE slot <> 0 AND grain = ?1 AND period < ?2 ORDER BY period LIMIT ?3)",
            )
            .bind(i64::from(grain.code()))
            .bind(grain.start(before).timestamp_micros())
            .bind(i64::from(limit))
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
            let Some(last) = last else { continue };
            sqlx::query(&format!(
                "INSERT INTO survey_rollups (survey_id, grain, period, slot, {columns}) \
                 SELECT survey_id, grain, period, 0, {sums} FROM survey_rollups \
                 WHERE slot <> 0 AND grain = ?1 AND period <= ?2 \
                 GROUP BY survey_id, grain, period \
                 ON CONFLICT (survey_id, grain, period, slot) DO UPDATE SET {added}",
                sums = *COMPACTED_SUMS,
                added = *ROLLUP_ADDED,
            ))
            .bind(i64::from(grain.code()))
            .bind(last)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
            sqlx::query(
                "DELETE FROM survey_rollups WHERE slot <> 0 AND grain = ?1 AND period <= ?2",
            )
            .bind(i64::from(grain.code()))
            .bind(last)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
            reached += periods as usize;
        }
        tx.commit().await.map_err(StoreError::from_db)?;
        Ok(reached)
    }

    fn log(&self) -> &EventLog {
        &self.log
    }

    async fn lifecycles(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Lifecycle>, StoreError> {
        let mut lifecycles = HashMap::new();
        if ids.is_empty() {
            return Ok(lifecycles);
        }
        // One read transaction, so that every chunk sees the same snapshot.
        let mut tx = self
            .pools
            .reader
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let mut sql = QueryBuilder::<Sqlite>::new(
                "SELECT customer_id, stage, acquisition_status, health, engagement_score, \
                   lead_score, health_score, as_of FROM customer_lifecycles WHERE customer_id IN (",
            );
            let mut list = sql.separated(", ");
            for id in chunk {
                list.push_bind(id.to_string());
            }
            sql.push(")");
            for row in sql
                .build()
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::from_db)?
            {
                let (id, lifecycle) = lifecycle_from_row(&row)?;
                lifecycles.insert(id, lifecycle);
            }
        }
        Ok(lifecycles)
    }

    async fn fates(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Fate>, StoreError> {
        let mut fates = HashMap::new();
        if ids.is_empty() {
            return Ok(fates);
        }
        let mut tx = self
            .pools
            .reader
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let mut sql = QueryBuilder::<Sqlite>::new(
                "SELECT merged_id AS id, survivor_id FROM merged_customers WHERE merged_id IN (",
            );
            let mut list = sql.separated(", ");
            for id in chunk {
                list.push_bind(id.to_string());
            }
            sql.push(
                ") UNION ALL SELECT customer_id AS id, NULL AS survivor_id FROM erased_customers \
                 WHERE customer_id IN (",
            );
            let mut list = sql.separated(", ");
            for id in chunk {
                list.push_bind(id.to_string());
            }
            sql.push(")");
            for row in sql
                .build()
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::from_db)?
            {
                let decode = |err: sqlx::Error| StoreError::corrupt("customer fate", err);
                let id = uuid_column(&row, "id").map_err(decode)?;
                // An erasure outranks a merge: nothing more goes to the person.
                match optional_uuid(&row, "survivor_id").map_err(decode)? {
                    None => {
                        fates.insert(id, Fate::Erased);
                    }
                    Some(survivor) => {
                        fates.entry(id).or_insert(Fate::Merged(survivor));
                    }
                }
            }
        }
        Ok(fates)
    }

    async fn apply_events(
        &self,
        batch: &EventBatch,
        entry: &DispatchEntry,
        cursor: &CursorMove,
    ) -> Result<(), StoreError> {
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        // The newest lifecycle of each customer in the batch.
        let mut newest: HashMap<Uuid, &Lifecycle> = HashMap::new();
        for (id, lifecycle) in &batch.lifecycles {
            let keep = newest
                .get(id)
                .is_none_or(|kept| kept.as_of <= lifecycle.as_of);
            if keep {
                newest.insert(*id, lifecycle);
            }
        }
        for (id, lifecycle) in &newest {
            sqlx::query(
                "INSERT INTO customer_lifecycles (customer_id, stage, acquisition_status, health, \
                   engagement_score, lead_score, health_score, as_of) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (customer_id) DO UPDATE SET stage = excluded.stage, \
                   acquisition_status = excluded.acquisition_status, health = excluded.health, \
                   engagement_score = excluded.engagement_score, lead_score = excluded.lead_score, \
                   health_score = excluded.health_score, as_of = excluded.as_of \
                 WHERE customer_lifecycles.as_of <= excluded.as_of",
            )
            .bind(id.to_string())
            .bind(&lifecycle.stage)
            .bind(&lifecycle.acquisition_status)
            .bind(&lifecycle.health)
            .bind(lifecycle.engagement_score)
            .bind(lifecycle.lead_score)
            .bind(lifecycle.health_score)
            .bind(lifecycle.as_of.timestamp_micros())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        }
        let mut changed = insert_new_dispatches(&mut tx, &batch.dispatches).await?;
        changed.extend(
            suppress_scheduled(
                &mut tx,
                "source_entry_id",
                &batch.retracted,
                SuppressReason::Retracted,
            )
            .await?,
        );
        let entries: Vec<LogEntry> = changed.iter().map(entry).collect();
        append(&self.log, &mut tx, &entries)
            .await
            .map_err(StoreError::from_db)?;
        move_cursor_and_commit(tx, cursor).await?;
        if !entries.is_empty() {
            self.log.notify_appended();
        }
        Ok(())
    }

    async fn apply_customer_changes(
        &self,
        changes: &[CustomerChange],
        entry: &DispatchEntry,
        text_erased: &TextErasedEntry,
        cursor: &CursorMove,
    ) -> Result<(), StoreError> {
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        let mut entries = Vec::new();
        let mut erased = false;
        for change in changes {
            match change {
                CustomerChange::Merged {
                    merged_id,
                    survivor_id,
                    at,
                } => {
                    sqlx::query(
                        "INSERT INTO merged_customers (merged_id, survivor_id, merged_at) \
                         VALUES (?1, ?2, ?3) ON CONFLICT (merged_id) DO NOTHING",
                    )
                    .bind(merged_id.to_string())
                    .bind(survivor_id.to_string())
                    .bind(at.timestamp_micros())
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from_db)?;
                    // Those merged into the merged customer earlier follow.
                    for sql in [
                        "UPDATE merged_customers SET survivor_id = ?2 WHERE survivor_id = ?1",
                        "UPDATE dispatches SET customer_id = ?2 WHERE customer_id = ?1",
                        "UPDATE responses SET customer_id = ?2 WHERE customer_id = ?1",
                    ] {
                        sqlx::query(sql)
                            .bind(merged_id.to_string())
                            .bind(survivor_id.to_string())
                            .execute(&mut *tx)
                            .await
                            .map_err(StoreError::from_db)?;
                    }
                }
                CustomerChange::Erased { customer_id, at } => {
                    sqlx::query(
                        "INSERT INTO erased_customers (customer_id, erased_at) VALUES (?1, ?2) \
                         ON CONFLICT (customer_id) DO NOTHING",
                    )
                    .bind(customer_id.to_string())
                    .bind(at.timestamp_micros())
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from_db)?;
                    let suppressed = suppress_scheduled(
                        &mut tx,
                        "customer_id",
                        &[customer_id.to_string()],
                        SuppressReason::CustomerErased,
                    )
                    .await?;
                    entries.extend(suppressed.iter().map(entry));
                    // The one writer: no other transaction changes these
                    // rows between the read and the update.
                    let rows =
                        sqlx::query("SELECT id, answers FROM responses WHERE customer_id = ?1")
                            .bind(customer_id.to_string())
                            .fetch_all(&mut *tx)
                            .await
                            .map_err(StoreError::from_db)?;
                    let mut stripped = 0_i64;
                    for row in rows {
                        let decode = |err: sqlx::Error| StoreError::corrupt("response", err);
                        let id: String = row.try_get("id").map_err(decode)?;
                        let answers: String = row.try_get("answers").map_err(decode)?;
                        let mut answers: Vec<Answer> = serde_json::from_str(&answers)
                            .map_err(|err| StoreError::corrupt("response's answers", err))?;
                        if !strip_text(&mut answers) {
                            continue;
                        }
                        sqlx::query("UPDATE responses SET answers = ?2 WHERE id = ?1")
                            .bind(&id)
                            .bind(to_json("response's answers", &answers)?)
                            .execute(&mut *tx)
                            .await
                            .map_err(StoreError::from_db)?;
                        stripped += 1;
                    }
                    if stripped > 0 {
                        erased = true;
                        entries.push(text_erased(*customer_id, stripped));
                    }
                }
            }
        }
        append(&self.log, &mut tx, &entries)
            .await
            .map_err(StoreError::from_db)?;
        move_cursor_and_commit(tx, cursor).await?;
        if erased {
            // The old answers are zeroed in the main file (`secure_delete`);
            // the WAL still holds their pages until it is truncated. The
            // erasure is committed already: a busy WAL is wiped by a later
            // erasure.
            if let Err(err) = clm_platform::db::wipe_sqlite_wal(&self.pools, 50).await {
                tracing::warn!(error = %err, "cannot truncate the WAL after an erasure");
            }
        }
        if !entries.is_empty() {
            self.log.notify_appended();
        }
        Ok(())
    }

    async fn saved_cursor(&self, consumer: &str, shard: ShardFilter) -> Result<String, StoreError> {
        cursors::load(&Pools::Sqlite(self.pools.clone()), consumer, shard)
            .await
            .map_err(|err| StoreError::Unavailable(err.0))
    }

    async fn due_dispatches(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Dispatch>, StoreError> {
        sqlx::query(&format!(
            "SELECT {DISPATCH_COLUMNS} FROM dispatches WHERE state = 'SCHEDULED' AND due_at <= ?1 \
             ORDER BY due_at, id LIMIT ?2"
        ))
        .bind(now.timestamp_micros())
        .bind(i64::from(limit))
        .fetch_all(&self.pools.reader)
        .await
        .map_err(StoreError::from_db)?
        .iter()
        .map(dispatch_from_row)
        .collect()
    }

    async fn last_releases(
        &self,
        customer_ids: &[Uuid],
    ) -> Result<HashMap<Uuid, HashMap<Uuid, DateTime<Utc>>>, StoreError> {
        let ids: Vec<String> = customer_ids.iter().map(Uuid::to_string).collect();
        let ids =
            serde_json::to_string(&ids).map_err(|err| StoreError::corrupt("customer ids", err))?;
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT customer_id, survey_id, max(dispatched_at) FROM dispatches \
             WHERE customer_id IN (SELECT value FROM json_each(?1)) \
             AND dispatched_at IS NOT NULL GROUP BY customer_id, survey_id",
        )
        .bind(ids)
        .fetch_all(&self.pools.reader)
        .await
        .map_err(StoreError::from_db)?;
        let mut releases: HashMap<Uuid, HashMap<Uuid, DateTime<Utc>>> = HashMap::new();
        for (customer_id, survey_id, released) in rows {
            let customer_id = Uuid::try_parse(&customer_id)
                .map_err(|err| StoreError::corrupt("dispatch's customer id", err))?;
            let survey_id = Uuid::try_parse(&survey_id)
                .map_err(|err| StoreError::corrupt("dispatch's survey id", err))?;
            let released = DateTime::from_timestamp_micros(released)
                .ok_or_else(|| StoreError::corrupt("dispatch's release time", released))?;
            releases
                .entry(customer_id)
                .or_default()
                .insert(survey_id, released);
        }
        Ok(releases)
    }

    async fn settle_dispatches(
        &self,
        settled: &[(Dispatch, LogEntry)],
    ) -> Result<Vec<Dispatch>, StoreError> {
        if settled.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        let mut done = Vec::new();
        let mut entries = Vec::new();
        let mut deltas = RollupDeltas::default();
        for (dispatch, entry) in settled {
            let updated = sqlx::query(
                "UPDATE dispatches SET state = ?2, dispatched_at = ?3, expires_at = ?4 \
                 WHERE id = ?1 AND state = 'SCHEDULED'",
            )
            .bind(dispatch.id.to_string())
            .bind(dispatch.state.as_str())
            .bind(dispatch.dispatched_at.map(|at| at.timestamp_micros()))
            .bind(dispatch.expires_at.map(|at| at.timestamp_micros()))
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
            if updated.rows_affected() == 0 {
                continue;
            }
            if let Some(released) = dispatch.dispatched_at {
                let tally = Tally {
                    dispatched: 1,
                    ..Tally::default()
                };
                deltas.add(
                    dispatch.survey_id,
                    released,
                    super::rollup_slot(&dispatch.id.to_string()),
                    &tally,
                );
            }
            done.push(dispatch.clone());
            entries.push(entry.clone());
        }
        add_to_rollups(&mut tx, &deltas)
            .await
            .map_err(StoreError::from_db)?;
        append(&self.log, &mut tx, &entries)
            .await
            .map_err(StoreError::from_db)?;
        tx.commit().await.map_err(StoreError::from_db)?;
        if !entries.is_empty() {
            self.log.notify_appended();
        }
        Ok(done)
    }

    async fn suppress_survey_dispatches(
        &self,
        survey_id: Uuid,
        entry: &DispatchEntry,
    ) -> Result<usize, StoreError> {
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        let suppressed = suppress_scheduled(
            &mut tx,
            "survey_id",
            &[survey_id.to_string()],
            SuppressReason::SurveyInactive,
        )
        .await?;
        let entries: Vec<LogEntry> = suppressed.iter().map(entry).collect();
        append(&self.log, &mut tx, &entries)
            .await
            .map_err(StoreError::from_db)?;
        tx.commit().await.map_err(StoreError::from_db)?;
        if !entries.is_empty() {
            self.log.notify_appended();
        }
        Ok(entries.len())
    }

    async fn expire_dispatches(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        entry: &DispatchEntry,
    ) -> Result<usize, StoreError> {
        let mut tx = self
            .pools
            .writer
            .begin()
            .await
            .map_err(StoreError::from_db)?;
        // The one writer: no other transaction takes these rows meanwhile,
        // so no locking clause is needed.
        let mut expired: Vec<Dispatch> = sqlx::query(&format!(
            "UPDATE dispatches SET state = 'EXPIRED' WHERE id IN ( \
               SELECT id FROM dispatches WHERE state = 'DISPATCHED' AND expires_at <= ?1 \
               ORDER BY expires_at, id LIMIT ?2) \
             RETURNING {DISPATCH_COLUMNS}"
        ))
        .bind(now.timestamp_micros())
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::from_db)?
        .iter()
        .map(dispatch_from_row)
        .collect::<Result<_, _>>()?;
        // RETURNING gives no order: log the oldest first.
        expired.sort_by_key(|dispatch| (dispatch.expires_at, dispatch.id));
        let entries: Vec<LogEntry> = expired.iter().map(entry).collect();
        append(&self.log, &mut tx, &entries)
            .await
            .map_err(StoreError::from_db)?;
        tx.commit().await.map_err(StoreError::from_db)?;
        if !entries.is_empty() {
            self.log.notify_appended();
        }
        Ok(expired.len())
    }
}
