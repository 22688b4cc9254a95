//! The feedback store on PostgreSQL (schema `feedback`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use clm_eventlog::{EventLog, NewEntry};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use clm_eventlog::ShardFilter;
use clm_eventlog::consumer::cursors::{self, CursorMove};
use clm_platform::db::{ErasureVacuum, Pools};

use super::{
    Created, DispatchEntry, EventBatch, FeedbackStore, Grain, LogEntry, NewResponse, Recorded,
    RollupDeltas, StoreError, TextErasedEntry, Updated, window_parts,
};
use crate::model::{
    Answer, AnswerValue, CustomerChange, Dispatch, DispatchQuery, DispatchState, Fate, Language,
    Lifecycle, Question, Response, ResponseQuery, Sentiment, SuppressReason, Survey,
    SurveyDefinition, SurveyKind, SurveyQuery, SurveyState,
};
use crate::summary::{TALLY_COLUMNS, Tally, column_list};

/// Surveys, dispatches and responses in PostgreSQL.
pub struct PostgresFeedbackStore {
    pool: PgPool,
    log: EventLog,
    vacuum: ErasureVacuum,
}

impl PostgresFeedbackStore {
    /// A store over an open pool whose `search_path` is the feedback schema.
    pub fn new(pool: PgPool, log: EventLog) -> Self {
        Self {
            vacuum: ErasureVacuum::spawn(
                pool.clone(),
                &["responses"],
                std::time::Duration::from_secs(10),
            ),
            pool,
            log,
        }
    }
}

/// Inserts dispatches (one statement per 1,000) unless their source is
/// stored already; returns those stored.
async fn insert_new_dispatches(
    tx: &mut sqlx::PgConnection,
    dispatches: &[Dispatch],
) -> Result<Vec<Dispatch>, sqlx::Error> {
    let mut stored: HashSet<Uuid> = HashSet::with_capacity(dispatches.len());
    for chunk in dispatches.chunks(1000) {
        let mut sql: QueryBuilder<Postgres> =
            QueryBuilder::new(format!("INSERT INTO dispatches ({DISPATCH_COLUMNS}) "));
        sql.push_values(chunk, |mut row, dispatch| {
            row.push_bind(dispatch.id)
                .push_bind(dispatch.survey_id)
                .push_bind(dispatch.customer_id)
                .push_bind(&dispatch.trigger_name)
                .push_bind(&dispatch.source_entry_id)
                .push_bind(dispatch.state.as_str())
                .push_bind(dispatch.due_at)
                .push_bind(dispatch.dispatched_at)
                .push_bind(dispatch.expires_at)
                .push_bind(dispatch.responded_at)
                .push_bind(dispatch.created_at);
        });
        sql.push(" ON CONFLICT (survey_id, trigger_name, source_entry_id) DO NOTHING RETURNING id");
        stored.extend(sql.build_query_scalar::<Uuid>().fetch_all(&mut *tx).await?);
    }
    Ok(dispatches
        .iter()
        .filter(|dispatch| stored.contains(&dispatch.id))
        .cloned()
        .collect())
}

/// Which scheduled dispatches to suppress.
enum Scheduled<'a> {
    /// Those a source (transition) scheduled.
    Sources(&'a [String]),
    /// Those of a customer.
    Customer(Uuid),
    /// Those of a survey.
    Survey(Uuid),
}

/// Moves the scheduled dispatches selected to SUPPRESSED with `reason`;
/// returns them as changed, oldest due first.
async fn suppress_scheduled(
    tx: &mut sqlx::PgConnection,
    which: Scheduled<'_>,
    reason: SuppressReason,
) -> Result<Vec<Dispatch>, StoreError> {
    let state = DispatchState::Suppressed(reason).as_str();
    let rows = match which {
        Scheduled::Sources([]) => return Ok(Vec::new()),
        Scheduled::Sources(sources) => sqlx::query(&format!(
            "UPDATE dispatches SET state = $2 WHERE state = 'SCHEDULED' AND source_entry_id = ANY($1) \
             RETURNING {DISPATCH_COLUMNS}"
        ))
        .bind(sources)
        .bind(state)
        .fetch_all(&mut *tx)
        .await,
        Scheduled::Customer(customer_id) => sqlx::query(&format!(
            "UPDATE dispatches SET state = $2 WHERE state = 'SCHEDULED' AND customer_id = $1 \
             RETURNING {DISPATCH_COLUMNS}"
        ))
        .bind(customer_id)
        .bind(state)
        .fetch_all(&mut *tx)
        .await,
        Scheduled::Survey(survey_id) => sqlx::query(&format!(
            "UPDATE dispatches SET state = $2 WHERE state = 'SCHEDULED' AND survey_id = $1 \
             RETURNING {DISPATCH_COLUMNS}"
        ))
        .bind(survey_id)
        .bind(state)
        .fetch_all(&mut *tx)
        .await,
    }
    .map_err(StoreError::from_db)?;
    let mut changed = rows
        .iter()
        .map(dispatch_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    changed.sort_by_key(|dispatch| (dispatch.due_at, dispatch.id));
    Ok(changed)
}

const SURVEY_COLUMNS: &str =
    "id, kind, state, version, questions_version, definition, created_at, updated_at, archived_at";

fn survey_from_row(row: &PgRow) -> Result<Survey, StoreError> {
    let decode = |err: sqlx::Error| StoreError::corrupt("survey", err);
    let kind: String = row.try_get("kind").map_err(decode)?;
    let state: String = row.try_get("state").map_err(decode)?;
    let Json(definition): Json<SurveyDefinition> = row.try_get("definition").map_err(decode)?;
    Ok(Survey {
        id: row.try_get("id").map_err(decode)?,
        kind: SurveyKind::parse(&kind).ok_or_else(|| StoreError::corrupt("survey kind", &kind))?,
        state: SurveyState::parse(&state)
            .ok_or_else(|| StoreError::corrupt("survey state", &state))?,
        definition,
        version: row.try_get("version").map_err(decode)?,
        questions_version: row.try_get("questions_version").map_err(decode)?,
        created_at: row.try_get("created_at").map_err(decode)?,
        updated_at: row.try_get("updated_at").map_err(decode)?,
        archived_at: row.try_get("archived_at").map_err(decode)?,
    })
}

const DISPATCH_COLUMNS: &str = "id, survey_id, customer_id, trigger_name, source_entry_id, state, \
     due_at, dispatched_at, expires_at, responded_at, created_at";

fn dispatch_from_row(row: &PgRow) -> Result<Dispatch, StoreError> {
    let decode = |err: sqlx::Error| StoreError::corrupt("dispatch", err);
    let state: String = row.try_get("state").map_err(decode)?;
    Ok(Dispatch {
        id: row.try_get("id").map_err(decode)?,
        survey_id: row.try_get("survey_id").map_err(decode)?,
        customer_id: row.try_get("customer_id").map_err(decode)?,
        trigger_name: row.try_get("trigger_name").map_err(decode)?,
        source_entry_id: row.try_get("source_entry_id").map_err(decode)?,
        state: DispatchState::parse(&state)
            .ok_or_else(|| StoreError::corrupt("dispatch state", &state))?,
        due_at: row.try_get("due_at").map_err(decode)?,
        dispatched_at: row.try_get("dispatched_at").map_err(decode)?,
        expires_at: row.try_get("expires_at").map_err(decode)?,
        responded_at: row.try_get("responded_at").map_err(decode)?,
        created_at: row.try_get("created_at").map_err(decode)?,
    })
}

const RESPONSE_COLUMNS: &str = "id, response_id, survey_id, survey_version, dispatch_id, customer_id, \
     answers, submitted_at, sentiment_score, sentiment_scored, language, recorded_at";

fn response_from_row(row: &PgRow) -> Result<Response, StoreError> {
    let decode = |err: sqlx::Error| StoreError::corrupt("response", err);
    let Json(answers): Json<Vec<Answer>> = row.try_get("answers").map_err(decode)?;
    let score: Option<f64> = row.try_get("sentiment_score").map_err(decode)?;
    let scored: Option<bool> = row.try_get("sentiment_scored").map_err(decode)?;
    let language: String = row.try_get("language").map_err(decode)?;
    Ok(Response {
        id: row.try_get("id").map_err(decode)?,
        response_id: row.try_get("response_id").map_err(decode)?,
        survey_id: row.try_get("survey_id").map_err(decode)?,
        survey_version: row.try_get("survey_version").map_err(decode)?,
        dispatch_id: row.try_get("dispatch_id").map_err(decode)?,
        customer_id: row.try_get("customer_id").map_err(decode)?,
        answers,
        submitted_at: row.try_get("submitted_at").map_err(decode)?,
        sentiment: sentiment_of(score, scored, &language),
        recorded_at: row.try_get("recorded_at").map_err(decode)?,
    })
}

/// A response's sentiment from its columns.
pub(super) fn sentiment_of(
    score: Option<f64>,
    scored: Option<bool>,
    language: &str,
) -> Option<Sentiment> {
    let language = Language::of_code(language);
    match scored? {
        true => Some(Sentiment::Scored {
            score: score.unwrap_or(0.0),
            language,
        }),
        false => Some(Sentiment::NotScored { language }),
    }
}

/// `SUM(c) AS c` for every tally column: the select list of the rollup
/// periods and of the response edges.
static TALLY_SUMS: LazyLock<String> = LazyLock::new(|| {
    column_list(|column| format!("COALESCE(SUM({column}), 0)::float8 AS {column}"))
});

/// `c = c + EXCLUDED.c` for every tally column: what a write adds to a
/// rollup row that exists.
static ROLLUP_ADDED: LazyLock<String> = LazyLock::new(|| {
    column_list(|column| format!("{column} = survey_rollups.{column} + EXCLUDED.{column}"))
});

/// Folds the slot rows of up to `$3` periods of grain `$1` that start
/// before `$2` into slot 0; answers how many periods it reached.
static COMPACT_ROLLUPS: LazyLock<String> = LazyLock::new(|| {
    let columns = TALLY_COLUMNS.join(", ");
    let sums = column_list(|column| format!("SUM({column})"));
    let added = ROLLUP_ADDED.as_str();
    // The rows are locked in key order, the order every writer takes
    // them in, slot 0 with the others: a fold and a merge or a batch of
    // late responses into the same periods wait for each other instead of
    // deadlocking.
    format!(
        "WITH periods AS ( \
           SELECT DISTINCT period FROM survey_rollups \
           WHERE slot <> 0 AND grain = $1 AND period < $2 ORDER BY period LIMIT $3), \
         spread AS ( \
           SELECT DISTINCT survey_id, period FROM survey_rollups \
           WHERE slot <> 0 AND grain = $1 AND period <= (SELECT max(period) FROM periods)), \
         locked AS ( \
           SELECT r.survey_id, r.period, r.slot FROM survey_rollups r \
           JOIN spread s ON r.survey_id = s.survey_id AND r.grain = $1 AND r.period = s.period \
           ORDER BY r.survey_id, r.period, r.slot FOR UPDATE OF r), \
         gone AS ( \
           DELETE FROM survey_rollups r USING locked l \
           WHERE r.survey_id = l.survey_id AND r.grain = $1 AND r.period = l.period \
             AND r.slot = l.slot AND r.slot <> 0 \
           RETURNING r.*), \
         folded AS ( \
           INSERT INTO survey_rollups (survey_id, grain, period, slot, {columns}) \
           SELECT survey_id, grain, period, 0, {sums} FROM gone \
           GROUP BY survey_id, grain, period \
           ON CONFLICT (survey_id, grain, period, slot) DO UPDATE SET {added} \
           RETURNING 1) \
         SELECT count(*) FROM periods"
    )
});

/// The tally columns of the dispatches released in a range: releases and
/// the answers they took; every other column is zero.
static RELEASED_SUMS: LazyLock<String> = LazyLock::new(|| {
    column_list(|column| match column {
        "dispatched" => "count(*)::float8 AS dispatched".to_owned(),
        "answered" => "count(responded_at)::float8 AS answered".to_owned(),
        other => format!("0::float8 AS {other}"),
    })
});

fn tally_from_row(row: &PgRow) -> Result<Tally, StoreError> {
    let mut columns = [0.0; 17];
    for (slot, column) in columns.iter_mut().zip(TALLY_COLUMNS) {
        *slot = row
            .try_get::<f64, _>(column)
            .map_err(|err| StoreError::corrupt("rollup", err))?;
    }
    Ok(Tally::from_columns(&columns))
}

/// Adds `deltas` to the rollup rows, one statement per 1,000 rows, in key
/// order.
async fn add_to_rollups(
    tx: &mut sqlx::PgConnection,
    deltas: &RollupDeltas,
) -> Result<(), sqlx::Error> {
    let rows: Vec<_> = deltas.rows().collect();
    for chunk in rows.chunks(1000) {
        let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(format!(
            "INSERT INTO survey_rollups (survey_id, grain, period, slot, {}) ",
            TALLY_COLUMNS.join(", ")
        ));
        sql.push_values(
            chunk,
            |mut values, ((survey_id, grain, period, slot), tally)| {
                values
                    .push_bind(*survey_id)
                    .push_bind(grain.code())
                    .push_bind(*period)
                    .push_bind(*slot);
                for (column, value) in TALLY_COLUMNS.iter().zip(tally.to_columns()) {
                    if *column == "sentiment_sum" {
                        values.push_bind(value);
                    } else {
                        values.push_bind(value.round() as i64);
                    }
                }
            },
        );
        sql.push(" ON CONFLICT (survey_id, grain, period, slot) DO UPDATE SET ");
        sql.push(ROLLUP_ADDED.as_str());
        sql.build().execute(&mut *tx).await?;
    }
    Ok(())
}

/// The responses stored under `response_ids`, by response id.
async fn responses_by_ids(
    conn: &mut sqlx::PgConnection,
    response_ids: &[&str],
) -> Result<HashMap<String, Response>, StoreError> {
    sqlx::query(&format!(
        "SELECT {RESPONSE_COLUMNS} FROM responses WHERE response_id = ANY($1)"
    ))
    .bind(response_ids)
    .fetch_all(conn)
    .await
    .map_err(StoreError::from_db)?
    .iter()
    .map(|row| response_from_row(row).map(|response| (response.response_id.clone(), response)))
    .collect()
}

async fn append(
    log: &EventLog,
    tx: &mut sqlx::PgConnection,
    entries: &[LogEntry],
) -> Result<(), sqlx::Error> {
    let entries: Vec<NewEntry<'_>> = entries
        .iter()
        .map(|entry| NewEntry {
            event_id: entry.event_id,
            customer_id: Some(entry.customer_id),
            kind: entry.kind,
            payload: &entry.payload,
            recorded_at: entry.recorded_at,
        })
        .collect();
    log.append_many_postgres(tx, &entries).await
}

#[async_trait]
impl FeedbackStore for PostgresFeedbackStore {
    async fn create_survey(
        &self,
        survey: &Survey,
        request_id: Option<&str>,
    ) -> Result<Created, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
        let inserted = sqlx::query(
            "INSERT INTO surveys (id, kind, state, version, questions_version, definition, request_id, \
               created_at, updated_at, archived_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (request_id) DO NOTHING",
        )
        .bind(survey.id)
        .bind(survey.kind.as_str())
        .bind(survey.state.as_str())
        .bind(survey.version)
        .bind(survey.questions_version)
        .bind(Json(&survey.definition))
        .bind(request_id)
        .bind(survey.created_at)
        .bind(survey.updated_at)
        .bind(survey.archived_at)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        if inserted.rows_affected() == 0 {
            drop(tx);
            let row = sqlx::query(&format!(
                "SELECT {SURVEY_COLUMNS} FROM surveys WHERE request_id = $1"
            ))
            .bind(request_id)
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::from_db)?;
            return Ok(Created::Earlier(survey_from_row(&row)?));
        }
        sqlx::query(
            "INSERT INTO survey_questions (survey_id, version, questions) VALUES ($1, $2, $3)",
        )
        .bind(survey.id)
        .bind(survey.questions_version)
        .bind(Json(&survey.definition.questions))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        tx.commit().await.map_err(StoreError::from_db)?;
        Ok(Created::New(survey.clone()))
    }

    async fn survey(&self, id: Uuid) -> Result<Option<Survey>, StoreError> {
        sqlx::query(&format!(
            "SELECT {SURVEY_COLUMNS} FROM surveys WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from_db)?
        .as_ref()
        .map(survey_from_row)
        .transpose()
    }

    async fn list_surveys(&self, query: &SurveyQuery) -> Result<Vec<Survey>, StoreError> {
        let states: Vec<&str> = query.states.iter().map(|state| state.as_str()).collect();
        sqlx::query(&format!(
            "SELECT {SURVEY_COLUMNS} FROM surveys \
             WHERE state = ANY($1) AND ($2::text IS NULL OR kind = $2) AND ($3::uuid IS NULL OR id > $3) \
             ORDER BY id LIMIT $4"
        ))
        .bind(&states)
        .bind(query.kind.map(SurveyKind::as_str))
        .bind(query.after)
        .bind(i64::from(query.limit))
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from_db)?
        .iter()
        .map(survey_from_row)
        .collect()
    }

    async fn update_survey(&self, survey: &Survey) -> Result<Updated, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
        let updated = sqlx::query(
            "UPDATE surveys SET state = $2, version = $3, questions_version = $4, definition = $5, \
               updated_at = $6, archived_at = $7 \
             WHERE id = $1 AND version = $3 - 1",
        )
        .bind(survey.id)
        .bind(survey.state.as_str())
        .bind(survey.version)
        .bind(survey.questions_version)
        .bind(Json(&survey.definition))
        .bind(survey.updated_at)
        .bind(survey.archived_at)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        if updated.rows_affected() == 0 {
            drop(tx);
            let current: Option<i64> =
                sqlx::query_scalar("SELECT version FROM surveys WHERE id = $1")
                    .bind(survey.id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(StoreError::from_db)?;
            return Ok(current.map_or(Updated::NotFound, Updated::VersionChanged));
        }
        if survey.questions_version == survey.version {
            sqlx::query(
                "INSERT INTO survey_questions (survey_id, version, questions) VALUES ($1, $2, $3)",
            )
            .bind(survey.id)
            .bind(survey.questions_version)
            .bind(Json(&survey.definition.questions))
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
        let found: Option<Json<Vec<Question>>> = sqlx::query_scalar(
            "SELECT questions FROM survey_questions WHERE survey_id = $1 AND version = $2",
        )
        .bind(survey_id)
        .bind(questions_version)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        Ok(found.map(|Json(questions)| questions))
    }

    async fn insert_dispatches(
        &self,
        dispatches: &[Dispatch],
    ) -> Result<Vec<Dispatch>, StoreError> {
        if dispatches.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
        let stored = insert_new_dispatches(&mut tx, dispatches)
            .await
            .map_err(StoreError::from_db)?;
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
        sqlx::query(&format!(
            "SELECT {DISPATCH_COLUMNS} FROM dispatches WHERE id = ANY($1)"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from_db)?
        .iter()
        .map(|row| dispatch_from_row(row).map(|dispatch| (dispatch.id, dispatch)))
        .collect()
    }

    async fn list_dispatches(&self, query: &DispatchQuery) -> Result<Vec<Dispatch>, StoreError> {
        let states: Vec<&str> = query.states.iter().map(|state| state.as_str()).collect();
        let (after_due, after_id) = query.after.unzip();
        sqlx::query(&format!(
            "SELECT {DISPATCH_COLUMNS} FROM dispatches \
             WHERE ($1::uuid IS NULL OR survey_id = $1) AND ($2::uuid IS NULL OR customer_id = $2) \
               AND (cardinality($3::text[]) = 0 OR state = ANY($3)) \
               AND ($4::timestamptz IS NULL OR due_at >= $4) AND ($5::timestamptz IS NULL OR due_at < $5) \
               AND ($6::timestamptz IS NULL OR (due_at, id) > ($6, $7)) \
             ORDER BY due_at, id LIMIT $8"
        ))
        .bind(query.survey_id)
        .bind(query.customer_id)
        .bind(&states)
        .bind(query.start)
        .bind(query.end)
        .bind(after_due)
        .bind(after_id)
        .bind(i64::from(query.limit))
        .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
        // The dispatches answered are locked first, in id order, as the
        // sweep locks them: a response is stored only while its dispatch is
        // DISPATCHED and cannot change under it.
        let mut dispatch_ids: Vec<Uuid> = news
            .iter()
            .filter_map(|new| new.response.dispatch_id)
            .collect();
        dispatch_ids.sort_unstable();
        let open: HashMap<Uuid, Option<DateTime<Utc>>> = if dispatch_ids.is_empty() {
            HashMap::new()
        } else {
            sqlx::query_as(
                "SELECT id, dispatched_at FROM dispatches \
                 WHERE id = ANY($1) AND state = 'DISPATCHED' ORDER BY id FOR UPDATE",
            )
            .bind(&dispatch_ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::from_db)?
            .into_iter()
            .collect()
        };
        let takes = |new: &NewResponse| {
            new.response
                .dispatch_id
                .is_none_or(|id| open.contains_key(&id))
        };
        // Inserted in response-id order, so that concurrent batches meet on
        // the unique index in one order.
        let mut order: Vec<&NewResponse> = news.iter().filter(|new| takes(new)).collect();
        order.sort_unstable_by(|a, b| a.response.response_id.cmp(&b.response.response_id));
        let columns = 12 + TALLY_COLUMNS.len();
        let mut inserted: HashSet<String> = HashSet::with_capacity(order.len());
        for chunk in order.chunks(30_000 / columns) {
            let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(format!(
                "INSERT INTO responses ({RESPONSE_COLUMNS}, {}) ",
                TALLY_COLUMNS.join(", ")
            ));
            sql.push_values(chunk, |mut values, new| {
                let response = &new.response;
                values
                    .push_bind(response.id)
                    .push_bind(&response.response_id)
                    .push_bind(response.survey_id)
                    .push_bind(response.survey_version)
                    .push_bind(response.dispatch_id)
                    .push_bind(response.customer_id)
                    .push_bind(Json(&response.answers))
                    .push_bind(response.submitted_at)
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
                    .push_bind(response.recorded_at);
                for (column, value) in TALLY_COLUMNS.iter().zip(new.tally.to_columns()) {
                    if *column == "sentiment_sum" {
                        values.push_bind(value);
                    } else {
                        values.push_bind(value.round() as i64);
                    }
                }
            });
            // No conflict target: a response id stored before, and a
            // dispatch that took another response, both skip the row.
            sql.push(" ON CONFLICT DO NOTHING RETURNING response_id");
            inserted.extend(
                sql.build_query_scalar::<String>()
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(StoreError::from_db)?,
            );
        }
        let (answered_ids, answered_at): (Vec<Uuid>, Vec<DateTime<Utc>>) = news
            .iter()
            .filter(|new| inserted.contains(&new.response.response_id))
            .filter_map(|new| {
                new.response
                    .dispatch_id
                    .map(|id| (id, new.response.recorded_at))
            })
            .unzip();
        if !answered_ids.is_empty() {
            sqlx::query(
                "UPDATE dispatches d SET state = 'RESPONDED', responded_at = a.at \
                 FROM unnest($1::uuid[], $2::timestamptz[]) AS a(id, at) WHERE d.id = a.id",
            )
            .bind(&answered_ids)
            .bind(&answered_at)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        }
        // Anything not stored may be a retry of a response stored
        // meanwhile, its dispatch answered by it.
        let skipped: Vec<&str> = news
            .iter()
            .map(|new| new.response.response_id.as_str())
            .filter(|id| !inserted.contains(*id))
            .collect();
        let mut earlier = if skipped.is_empty() {
            HashMap::new()
        } else {
            responses_by_ids(&mut tx, &skipped).await?
        };
        let mut deltas = RollupDeltas::default();
        let mut log = Vec::new();
        let mut results = Vec::with_capacity(news.len());
        for new in news {
            let response = &new.response;
            if !inserted.contains(&response.response_id) {
                results.push(match earlier.remove(&response.response_id) {
                    Some(earlier) => Recorded::Duplicate(earlier),
                    None if response.dispatch_id.is_some() => Recorded::DispatchClosed,
                    None => {
                        return Err(StoreError::Conflict(
                            "a response with this response_id was being stored concurrently".into(),
                        ));
                    }
                });
                continue;
            }
            let slot = super::rollup_slot(&response.response_id);
            // The answered count lands in the hour its release was counted
            // in.
            if let Some(Some(released)) = response.dispatch_id.and_then(|id| open.get(&id)) {
                let answered = Tally {
                    answered: 1,
                    ..Tally::default()
                };
                deltas.add(response.survey_id, *released, slot, &answered);
            }
            deltas.add(response.survey_id, response.submitted_at, slot, &new.tally);
            log.extend_from_slice(&new.log);
            results.push(Recorded::New(response.clone()));
        }
        append(&self.log, &mut tx, &log)
            .await
            .map_err(StoreError::from_db)?;
        // Last before the commit: every batch adds to the same few rollup
        // rows, so their locks are held for as short a time as possible.
        add_to_rollups(&mut tx, &deltas)
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
        let mut conn = self.pool.acquire().await.map_err(StoreError::from_db)?;
        responses_by_ids(&mut conn, response_ids).await
    }

    async fn list_responses(&self, query: &ResponseQuery) -> Result<Vec<Response>, StoreError> {
        let (before_time, before_id) = query.before.unzip();
        sqlx::query(&format!(
            "SELECT {RESPONSE_COLUMNS} FROM responses \
             WHERE ($1::uuid IS NULL OR survey_id = $1) AND ($2::uuid IS NULL OR customer_id = $2) \
               AND ($3::timestamptz IS NULL OR submitted_at >= $3) \
               AND ($4::timestamptz IS NULL OR submitted_at < $4) \
               AND ($5::timestamptz IS NULL OR (submitted_at, id) < ($5, $6)) \
             ORDER BY submitted_at DESC, id DESC LIMIT $7"
        ))
        .bind(query.survey_id)
        .bind(query.customer_id)
        .bind(query.start)
        .bind(query.end)
        .bind(before_time)
        .bind(before_id)
        .bind(i64::from(query.limit))
        .fetch_all(&self.pool)
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
        let released = RELEASED_SUMS.as_str();
        // One statement: whole periods from the rollups, the edges from the
        // rows (responses by submit time, dispatches by release time).
        let mut sql: QueryBuilder<Postgres> = QueryBuilder::new("");
        let mut first = true;
        let mut union = |sql: &mut QueryBuilder<Postgres>| {
            if !std::mem::take(&mut first) {
                sql.push(" UNION ALL ");
            }
        };
        for (grain, from, to) in parts.periods {
            union(&mut sql);
            sql.push(format!(
                "(SELECT {sums} FROM survey_rollups WHERE survey_id = "
            ))
            .push_bind(survey_id)
            .push(" AND grain = ")
            .push_bind(grain.code())
            .push(" AND period >= ")
            .push_bind(from)
            .push(" AND period < ")
            .push_bind(to)
            .push(")");
        }
        for (from, to) in parts.edges.into_iter().flatten() {
            union(&mut sql);
            sql.push(format!("(SELECT {sums} FROM responses WHERE survey_id = "))
                .push_bind(survey_id)
                .push(" AND submitted_at >= ")
                .push_bind(from)
                .push(" AND submitted_at < ")
                .push_bind(to)
                .push(")");
            union(&mut sql);
            sql.push(format!(
                "(SELECT {released} FROM dispatches WHERE survey_id = "
            ))
            .push_bind(survey_id)
            .push(" AND dispatched_at >= ")
            .push_bind(from)
            .push(" AND dispatched_at < ")
            .push_bind(to)
            .push(")");
        }
        if first {
            return Ok(Tally::default());
        }
        // The edges are read by index ranges of one survey's rows. The
        // planner does not know how survey and time go together: when
        // another survey takes many responses in the current hour it
        // expects most of them to be this survey's. It then scans the table
        // (seen: 516 ms for 15 rows of 430,000), starts parallel workers for
        // a bitmap scan (30 ms for 62 rows), or walks the time index through
        // the other survey's hour (130 ms). The survey indexes carry the
        // tally columns (migration 3), so their index-only scan is the
        // cheapest plan for any values; sequential scans and parallel
        // workers are off for this read-only transaction, set in the same
        // round trip as its BEGIN. The statement is planned once per shape
        // and connection (a generic plan): planning it for every call's
        // values took a third of the database's time under summary load,
        // and the plan does not depend on them.
        let mut tx = self
            .pool
            .begin_with(
                "BEGIN READ ONLY; SELECT set_config('enable_seqscan', 'off', true), \
                 set_config('max_parallel_workers_per_gather', '0', true), \
                 set_config('plan_cache_mode', 'force_generic_plan', true)",
            )
            .await
            .map_err(StoreError::from_db)?;
        let rows = sql
            .build()
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        // Nothing to commit: dropping the transaction rolls it back as the
        // connection goes back to the pool, after the answer is sent.
        drop(tx);
        let mut total = Tally::default();
        for row in &rows {
            total = total.plus(&tally_from_row(row)?);
        }
        Ok(total)
    }

    async fn compact_rollups(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<usize, StoreError> {
        let mut reached = 0;
        for grain in Grain::ALL {
            // One statement per grain: the slot rows of the oldest `limit`
            // closed periods are deleted and added to their slot 0. A
            // writer adding to one of them meanwhile is waited for (its row
            // is deleted with what it added) or comes after (and adds a slot
            // row again).
            let (periods,): (i64,) = sqlx::query_as(&COMPACT_ROLLUPS)
                .bind(grain.code())
                .bind(grain.start(before))
                .bind(i64::from(limit))
                .fetch_one(&self.pool)
                .await
                .map_err(StoreError::from_db)?;
            reached += periods as usize;
        }
        Ok(reached)
    }

    fn log(&self) -> &EventLog {
        &self.log
    }

    async fn lifecycles(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Lifecycle>, StoreError> {
        let rows = sqlx::query(
            "SELECT customer_id, stage, acquisition_status, health, engagement_score, lead_score, \
               health_score, as_of FROM customer_lifecycles WHERE customer_id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        rows.iter()
            .map(|row| {
                let decode = |err: sqlx::Error| StoreError::corrupt("lifecycle", err);
                Ok((
                    row.try_get("customer_id").map_err(decode)?,
                    Lifecycle {
                        stage: row.try_get("stage").map_err(decode)?,
                        acquisition_status: row.try_get("acquisition_status").map_err(decode)?,
                        health: row.try_get("health").map_err(decode)?,
                        engagement_score: row.try_get("engagement_score").map_err(decode)?,
                        lead_score: row.try_get("lead_score").map_err(decode)?,
                        health_score: row.try_get("health_score").map_err(decode)?,
                        as_of: row.try_get("as_of").map_err(decode)?,
                    },
                ))
            })
            .collect()
    }

    async fn fates(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Fate>, StoreError> {
        let rows: Vec<(Uuid, Option<Uuid>)> = sqlx::query_as(
            "SELECT merged_id, survivor_id FROM merged_customers WHERE merged_id = ANY($1) \
             UNION ALL SELECT customer_id, NULL FROM erased_customers WHERE customer_id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        let mut fates = HashMap::new();
        for (id, survivor) in rows {
            // An erasure outranks a merge: nothing more goes to the person.
            match survivor {
                None => {
                    fates.insert(id, Fate::Erased);
                }
                Some(survivor) => {
                    fates.entry(id).or_insert(Fate::Merged(survivor));
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
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
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
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (customer_id) DO UPDATE SET stage = EXCLUDED.stage, \
                   acquisition_status = EXCLUDED.acquisition_status, health = EXCLUDED.health, \
                   engagement_score = EXCLUDED.engagement_score, lead_score = EXCLUDED.lead_score, \
                   health_score = EXCLUDED.health_score, as_of = EXCLUDED.as_of \
                 WHERE customer_lifecycles.as_of <= EXCLUDED.as_of",
            )
            .bind(id)
            .bind(&lifecycle.stage)
            .bind(&lifecycle.acquisition_status)
            .bind(&lifecycle.health)
            .bind(lifecycle.engagement_score)
            .bind(lifecycle.lead_score)
            .bind(lifecycle.health_score)
            .bind(lifecycle.as_of)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        }
        let mut changed = insert_new_dispatches(&mut tx, &batch.dispatches)
            .await
            .map_err(StoreError::from_db)?;
        changed.extend(
            suppress_scheduled(
                &mut tx,
                Scheduled::Sources(&batch.retracted),
                SuppressReason::Retracted,
            )
            .await?,
        );
        let entries: Vec<LogEntry> = changed.iter().map(entry).collect();
        append(&self.log, &mut tx, &entries)
            .await
            .map_err(StoreError::from_db)?;
        cursors::move_postgres(&mut tx, cursor)
            .await
            .map_err(StoreError::from_db)?
            .map_err(|moved| StoreError::Conflict(moved.to_string()))?;
        tx.commit().await.map_err(StoreError::from_db)?;
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
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
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
                         VALUES ($1, $2, $3) ON CONFLICT (merged_id) DO NOTHING",
                    )
                    .bind(merged_id)
                    .bind(survivor_id)
                    .bind(at)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from_db)?;
                    // Those merged into the merged customer earlier follow.
                    for sql in [
                        "UPDATE merged_customers SET survivor_id = $2 WHERE survivor_id = $1",
                        "UPDATE dispatches SET customer_id = $2 WHERE customer_id = $1",
                        "UPDATE responses SET customer_id = $2 WHERE customer_id = $1",
                    ] {
                        sqlx::query(sql)
                            .bind(merged_id)
                            .bind(survivor_id)
                            .execute(&mut *tx)
                            .await
                            .map_err(StoreError::from_db)?;
                    }
                }
                CustomerChange::Erased { customer_id, at } => {
                    sqlx::query(
                        "INSERT INTO erased_customers (customer_id, erased_at) VALUES ($1, $2) \
                         ON CONFLICT (customer_id) DO NOTHING",
                    )
                    .bind(customer_id)
                    .bind(at)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from_db)?;
                    let suppressed = suppress_scheduled(
                        &mut tx,
                        Scheduled::Customer(*customer_id),
                        SuppressReason::CustomerErased,
                    )
                    .await?;
                    entries.extend(suppressed.iter().map(entry));
                    let rows = sqlx::query(
                        "SELECT id, answers FROM responses WHERE customer_id = $1 FOR UPDATE",
                    )
                    .bind(customer_id)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(StoreError::from_db)?;
                    let mut stripped = 0_i64;
                    for row in rows {
                        let decode = |err: sqlx::Error| StoreError::corrupt("response", err);
                        let id: Uuid = row.try_get("id").map_err(decode)?;
                        let Json(mut answers): Json<Vec<Answer>> =
                            row.try_get("answers").map_err(decode)?;
                        if !strip_text(&mut answers) {
                            continue;
                        }
                        sqlx::query("UPDATE responses SET answers = $2 WHERE id = $1")
                            .bind(id)
                            .bind(Json(&answers))
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
        cursors::move_postgres(&mut tx, cursor)
            .await
            .map_err(StoreError::from_db)?
            .map_err(|moved| StoreError::Conflict(moved.to_string()))?;
        tx.commit().await.map_err(StoreError::from_db)?;
        if erased {
            self.vacuum.erased();
        }
        if !entries.is_empty() {
            self.log.notify_appended();
        }
        Ok(())
    }

    async fn saved_cursor(&self, consumer: &str, shard: ShardFilter) -> Result<String, StoreError> {
        cursors::load(&Pools::Postgres(self.pool.clone()), consumer, shard)
            .await
            .map_err(|err| StoreError::Unavailable(err.0))
    }

    async fn due_dispatches(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Dispatch>, StoreError> {
        sqlx::query(&format!(
            "SELECT {DISPATCH_COLUMNS} FROM dispatches WHERE state = 'SCHEDULED' AND due_at <= $1 \
             ORDER BY due_at, id LIMIT $2"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
        let rows: Vec<(Uuid, Uuid, DateTime<Utc>)> = sqlx::query_as(
            "SELECT customer_id, survey_id, max(dispatched_at) FROM dispatches \
             WHERE customer_id = ANY($1) AND dispatched_at IS NOT NULL \
             GROUP BY customer_id, survey_id",
        )
        .bind(customer_ids)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from_db)?;
        let mut releases: HashMap<Uuid, HashMap<Uuid, DateTime<Utc>>> = HashMap::new();
        for (customer_id, survey_id, released) in rows {
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
        // One statement for the round, its rows locked in id order so that
        // two settles (or a settle and a merge) never wait on each other in
        // a cycle.
        let mut order: Vec<&(Dispatch, LogEntry)> = settled.iter().collect();
        order.sort_by_key(|(dispatch, _)| dispatch.id);
        let ids: Vec<Uuid> = order.iter().map(|(d, _)| d.id).collect();
        let states: Vec<&str> = order.iter().map(|(d, _)| d.state.as_str()).collect();
        let dispatched: Vec<Option<DateTime<Utc>>> =
            order.iter().map(|(d, _)| d.dispatched_at).collect();
        let expires: Vec<Option<DateTime<Utc>>> = order.iter().map(|(d, _)| d.expires_at).collect();
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
        let changed: Vec<Uuid> = sqlx::query_scalar(
            "WITH wanted AS ( \
                 SELECT d.id FROM dispatches d JOIN unnest($1::uuid[]) AS w (id) ON d.id = w.id \
                 WHERE d.state = 'SCHEDULED' ORDER BY d.id FOR UPDATE OF d) \
             UPDATE dispatches d SET state = v.state, dispatched_at = v.dispatched_at, \
                 expires_at = v.expires_at \
             FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[]) \
                 AS v (id, state, dispatched_at, expires_at) \
             WHERE d.id = v.id AND d.id IN (SELECT id FROM wanted) AND d.state = 'SCHEDULED' \
             RETURNING d.id",
        )
        .bind(&ids)
        .bind(&states)
        .bind(&dispatched)
        .bind(&expires)
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        let changed: std::collections::HashSet<Uuid> = changed.into_iter().collect();
        let mut done = Vec::new();
        let mut entries = Vec::new();
        let mut deltas = RollupDeltas::default();
        for (dispatch, entry) in settled {
            if !changed.contains(&dispatch.id) {
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
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
        let suppressed = suppress_scheduled(
            &mut tx,
            Scheduled::Survey(survey_id),
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
        let mut tx = self.pool.begin().await.map_err(StoreError::from_db)?;
        let expired: Vec<Dispatch> = sqlx::query(&format!(
            "UPDATE dispatches SET state = 'EXPIRED' WHERE id IN ( \
               SELECT id FROM dispatches WHERE state = 'DISPATCHED' AND expires_at <= $1 \
               ORDER BY expires_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING {DISPATCH_COLUMNS}"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::from_db)?
        .iter()
        .map(dispatch_from_row)
        .collect::<Result<_, _>>()?;
        let mut expired = expired;
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

/// Deletes the free text of `answers`; true when there was any.
pub(super) fn strip_text(answers: &mut [Answer]) -> bool {
    let mut stripped = false;
    for answer in answers {
        if let AnswerValue::Text(text @ Some(_)) = &mut answer.value {
            *text = None;
            stripped = true;
        }
    }
    stripped
}
