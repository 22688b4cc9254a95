-- The feedback tables. Survey definitions are JSON documents of the
-- service's own types; answers are JSON too, read whole with their response.

-- Surveys, one row each, with the current definition.
CREATE TABLE surveys (
    id                 UUID PRIMARY KEY,
    kind               TEXT NOT NULL,
    state              TEXT NOT NULL,
    version            BIGINT NOT NULL,
    questions_version  BIGINT NOT NULL,
    definition         JSONB NOT NULL,
    request_id         TEXT UNIQUE,
    created_at         TIMESTAMPTZ NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL,
    archived_at        TIMESTAMPTZ
);
CREATE INDEX surveys_by_state ON surveys (state, id);

-- Every question set a survey has had, by the survey version that set it:
-- a response names the one it answered, so changed questions leave earlier
-- responses readable and countable.
CREATE TABLE survey_questions (
    survey_id  UUID NOT NULL REFERENCES surveys (id),
    version    BIGINT NOT NULL,
    questions  JSONB NOT NULL,
    PRIMARY KEY (survey_id, version)
);

-- Planned sendings of a survey, at most one per (survey, trigger, log
-- entry), so a replayed log surveys nobody twice.
CREATE TABLE dispatches (
    id               UUID PRIMARY KEY,
    survey_id        UUID NOT NULL REFERENCES surveys (id),
    customer_id      UUID NOT NULL,
    trigger_name     TEXT NOT NULL,
    source_entry_id  TEXT NOT NULL,
    state            TEXT NOT NULL,
    due_at           TIMESTAMPTZ NOT NULL,
    dispatched_at    TIMESTAMPTZ,
    expires_at       TIMESTAMPTZ,
    responded_at     TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL,
    UNIQUE (survey_id, trigger_name, source_entry_id)
);
CREATE INDEX dispatches_by_due ON dispatches (due_at, id);
CREATE INDEX dispatches_by_survey ON dispatches (survey_id, due_at, id);
CREATE INDEX dispatches_by_customer ON dispatches (customer_id, due_at, id);
CREATE INDEX dispatches_released ON dispatches (survey_id, dispatched_at) WHERE dispatched_at IS NOT NULL;
-- The sweeps: scheduled ones by due time, released ones by expiry.
CREATE INDEX dispatches_due ON dispatches (due_at, id) WHERE state = 'SCHEDULED';
CREATE INDEX dispatches_expiring ON dispatches (expires_at, id) WHERE state = 'DISPATCHED';
-- Fatigue: a customer's releases; retractions: by the entry that matched.
CREATE INDEX dispatches_customer_released ON dispatches (customer_id, dispatched_at) WHERE dispatched_at IS NOT NULL;
CREATE INDEX dispatches_by_source ON dispatches (source_entry_id);

-- Responses, deduplicated by the caller's response_id for ever; a dispatch
-- takes one. Each row also holds what it adds to its survey's figures (the
-- tally columns), for the partial hours at the edges of a summary window.
CREATE TABLE responses (
    id                UUID PRIMARY KEY,
    response_id       TEXT NOT NULL UNIQUE,
    survey_id         UUID NOT NULL REFERENCES surveys (id),
    survey_version    BIGINT NOT NULL,
    dispatch_id       UUID UNIQUE,
    customer_id       UUID NOT NULL,
    answers           JSONB NOT NULL,
    submitted_at      TIMESTAMPTZ NOT NULL,
    sentiment_score   DOUBLE PRECISION,
    sentiment_scored  BOOLEAN,
    language          TEXT NOT NULL DEFAULT '',
    recorded_at       TIMESTAMPTZ NOT NULL,
    responses BIGINT NOT NULL DEFAULT 0,
    nps_count BIGINT NOT NULL DEFAULT 0,
    nps_promoters BIGINT NOT NULL DEFAULT 0,
    nps_passives BIGINT NOT NULL DEFAULT 0,
    nps_detractors BIGINT NOT NULL DEFAULT 0,
    csat_count BIGINT NOT NULL DEFAULT 0,
    csat_satisfied BIGINT NOT NULL DEFAULT 0,
    csat_sum BIGINT NOT NULL DEFAULT 0,
    ces_count BIGINT NOT NULL DEFAULT 0,
    ces_sum BIGINT NOT NULL DEFAULT 0,
    sentiment_positive BIGINT NOT NULL DEFAULT 0,
    sentiment_neutral BIGINT NOT NULL DEFAULT 0,
    sentiment_negative BIGINT NOT NULL DEFAULT 0,
    sentiment_not_scored BIGINT NOT NULL DEFAULT 0,
    sentiment_sum DOUBLE PRECISION NOT NULL DEFAULT 0,
    dispatched BIGINT NOT NULL DEFAULT 0,
    answered BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX responses_by_survey ON responses (survey_id, submitted_at DESC, id DESC);
CREATE INDEX responses_by_customer ON responses (customer_id, submitted_at DESC, id DESC);
CREATE INDEX responses_by_time ON responses (submitted_at DESC, id DESC);

-- The figures of each survey per hour, day and month (grain 0, 1, 2;
-- `period` is the period's start, UTC; responses by submit time,
-- dispatches by release time), kept as responses and dispatches arrive:
-- a summary adds up whole months, then whole days, then whole hours of its
-- window. Each period is spread over a few slots (by response id) so that
-- concurrent responses to one survey do not queue for one row.
CREATE TABLE survey_rollups (
    survey_id  UUID NOT NULL,
    grain      SMALLINT NOT NULL,
    period     TIMESTAMPTZ NOT NULL,
    slot       SMALLINT NOT NULL,
    responses BIGINT NOT NULL DEFAULT 0,
    nps_count BIGINT NOT NULL DEFAULT 0,
    nps_promoters BIGINT NOT NULL DEFAULT 0,
    nps_passives BIGINT NOT NULL DEFAULT 0,
    nps_detractors BIGINT NOT NULL DEFAULT 0,
    csat_count BIGINT NOT NULL DEFAULT 0,
    csat_satisfied BIGINT NOT NULL DEFAULT 0,
    csat_sum BIGINT NOT NULL DEFAULT 0,
    ces_count BIGINT NOT NULL DEFAULT 0,
    ces_sum BIGINT NOT NULL DEFAULT 0,
    sentiment_positive BIGINT NOT NULL DEFAULT 0,
    sentiment_neutral BIGINT NOT NULL DEFAULT 0,
    sentiment_negative BIGINT NOT NULL DEFAULT 0,
    sentiment_not_scored BIGINT NOT NULL DEFAULT 0,
    sentiment_sum DOUBLE PRECISION NOT NULL DEFAULT 0,
    dispatched BIGINT NOT NULL DEFAULT 0,
    answered BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (survey_id, grain, period, slot)
);

-- Each customer's latest lifecycle snapshot as the transition log told it
-- (what a trigger's `lifecycle` reads), by the transition's time.
CREATE TABLE customer_lifecycles (
    customer_id         UUID PRIMARY KEY,
    stage               TEXT NOT NULL,
    acquisition_status  TEXT NOT NULL,
    health              TEXT NOT NULL,
    engagement_score    DOUBLE PRECISION NOT NULL,
    lead_score          DOUBLE PRECISION NOT NULL,
    health_score        DOUBLE PRECISION NOT NULL,
    as_of               TIMESTAMPTZ NOT NULL
);

-- Customers identity merged away, and into whom; customers it erased.
CREATE TABLE merged_customers (
    merged_id    UUID PRIMARY KEY,
    survivor_id  UUID NOT NULL,
    merged_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX merged_customers_by_survivor ON merged_customers (survivor_id);
CREATE TABLE erased_customers (
    customer_id  UUID PRIMARY KEY,
    erased_at    TIMESTAMPTZ NOT NULL
);

-- The feedback log (clm_eventlog's table shape).
CREATE TABLE feedback_log (
    seq          BIGSERIAL PRIMARY KEY,
    txid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id     UUID NOT NULL,
    customer_id  UUID,
    shard        INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    payload      BYTEA NOT NULL,
    recorded_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX feedback_log_order ON feedback_log (txid, seq);
