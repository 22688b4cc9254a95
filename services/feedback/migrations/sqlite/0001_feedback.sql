-- The feedback tables on SQLite: ids are UUID strings, times microseconds
-- since the Unix epoch. See the PostgreSQL migration for what each holds.
CREATE TABLE surveys (
    id                 TEXT PRIMARY KEY,
    kind               TEXT NOT NULL,
    state              TEXT NOT NULL,
    version            INTEGER NOT NULL,
    questions_version  INTEGER NOT NULL,
    definition         TEXT NOT NULL,
    request_id         TEXT UNIQUE,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    archived_at        INTEGER
) STRICT;
CREATE INDEX surveys_by_state ON surveys (state, id);

CREATE TABLE survey_questions (
    survey_id  TEXT NOT NULL REFERENCES surveys (id),
    version    INTEGER NOT NULL,
    questions  TEXT NOT NULL,
    PRIMARY KEY (survey_id, version)
) STRICT;

CREATE TABLE dispatches (
    id               TEXT PRIMARY KEY,
    survey_id        TEXT NOT NULL REFERENCES surveys (id),
    customer_id      TEXT NOT NULL,
    trigger_name     TEXT NOT NULL,
    source_entry_id  TEXT NOT NULL,
    state            TEXT NOT NULL,
    due_at           INTEGER NOT NULL,
    dispatched_at    INTEGER,
    expires_at       INTEGER,
    responded_at     INTEGER,
    created_at       INTEGER NOT NULL,
    UNIQUE (survey_id, trigger_name, source_entry_id)
) STRICT;
CREATE INDEX dispatches_by_due ON dispatches (due_at, id);
CREATE INDEX dispatches_by_survey ON dispatches (survey_id, due_at, id);
CREATE INDEX dispatches_by_customer ON dispatches (customer_id, due_at, id);
CREATE INDEX dispatches_released ON dispatches (survey_id, dispatched_at) WHERE dispatched_at IS NOT NULL;
CREATE INDEX dispatches_due ON dispatches (due_at, id) WHERE state = 'SCHEDULED';
CREATE INDEX dispatches_expiring ON dispatches (expires_at, id) WHERE state = 'DISPATCHED';
CREATE INDEX dispatches_customer_released ON dispatches (customer_id, dispatched_at) WHERE dispatched_at IS NOT NULL;
CREATE INDEX dispatches_by_source ON dispatches (source_entry_id);

CREATE TABLE responses (
    id                TEXT PRIMARY KEY,
    response_id       TEXT NOT NULL UNIQUE,
    survey_id         TEXT NOT NULL REFERENCES surveys (id),
    survey_version    INTEGER NOT NULL,
    dispatch_id       TEXT UNIQUE,
    customer_id       TEXT NOT NULL,
    answers           TEXT NOT NULL,
    submitted_at      INTEGER NOT NULL,
    sentiment_score   REAL,
    sentiment_scored  INTEGER,
    language          TEXT NOT NULL DEFAULT '',
    recorded_at       INTEGER NOT NULL,
    responses INTEGER NOT NULL DEFAULT 0,
    nps_count INTEGER NOT NULL DEFAULT 0,
    nps_promoters INTEGER NOT NULL DEFAULT 0,
    nps_passives INTEGER NOT NULL DEFAULT 0,
    nps_detractors INTEGER NOT NULL DEFAULT 0,
    csat_count INTEGER NOT NULL DEFAULT 0,
    csat_satisfied INTEGER NOT NULL DEFAULT 0,
    csat_sum INTEGER NOT NULL DEFAULT 0,
    ces_count INTEGER NOT NULL DEFAULT 0,
    ces_sum INTEGER NOT NULL DEFAULT 0,
    sentiment_positive INTEGER NOT NULL DEFAULT 0,
    sentiment_neutral INTEGER NOT NULL DEFAULT 0,
    sentiment_negative INTEGER NOT NULL DEFAULT 0,
    sentiment_not_scored INTEGER NOT NULL DEFAULT 0,
    sentiment_sum REAL NOT NULL DEFAULT 0,
    dispatched INTEGER NOT NULL DEFAULT 0,
    answered INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX responses_by_survey ON responses (survey_id, submitted_at DESC, id DESC);
CREATE INDEX responses_by_customer ON responses (customer_id, submitted_at DESC, id DESC);
CREATE INDEX responses_by_time ON responses (submitted_at DESC, id DESC);

CREATE TABLE survey_rollups (
    survey_id  TEXT NOT NULL,
    grain      INTEGER NOT NULL,
    period     INTEGER NOT NULL,
    slot       INTEGER NOT NULL,
    responses INTEGER NOT NULL DEFAULT 0,
    nps_count INTEGER NOT NULL DEFAULT 0,
    nps_promoters INTEGER NOT NULL DEFAULT 0,
    nps_passives INTEGER NOT NULL DEFAULT 0,
    nps_detractors INTEGER NOT NULL DEFAULT 0,
    csat_count INTEGER NOT NULL DEFAULT 0,
    csat_satisfied INTEGER NOT NULL DEFAULT 0,
    csat_sum INTEGER NOT NULL DEFAULT 0,
    ces_count INTEGER NOT NULL DEFAULT 0,
    ces_sum INTEGER NOT NULL DEFAULT 0,
    sentiment_positive INTEGER NOT NULL DEFAULT 0,
    sentiment_neutral INTEGER NOT NULL DEFAULT 0,
    sentiment_negative INTEGER NOT NULL DEFAULT 0,
    sentiment_not_scored INTEGER NOT NULL DEFAULT 0,
    sentiment_sum REAL NOT NULL DEFAULT 0,
    dispatched INTEGER NOT NULL DEFAULT 0,
    answered INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (survey_id, grain, period, slot)
) STRICT;

CREATE TABLE customer_lifecycles (
    customer_id         TEXT PRIMARY KEY,
    stage               TEXT NOT NULL,
    acquisition_status  TEXT NOT NULL,
    health              TEXT NOT NULL,
    engagement_score    REAL NOT NULL,
    lead_score          REAL NOT NULL,
    health_score        REAL NOT NULL,
    as_of               INTEGER NOT NULL
) STRICT;

CREATE TABLE merged_customers (
    merged_id    TEXT PRIMARY KEY,
    survivor_id  TEXT NOT NULL,
    merged_at    INTEGER NOT NULL
) STRICT;
CREATE INDEX merged_customers_by_survivor ON merged_customers (survivor_id);
CREATE TABLE erased_customers (
    customer_id  TEXT PRIMARY KEY,
    erased_at    INTEGER NOT NULL
) STRICT;

CREATE TABLE feedback_log (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL,
    customer_id  TEXT,
    shard        INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    payload      BLOB NOT NULL,
    recorded_at  INTEGER NOT NULL
) STRICT;
