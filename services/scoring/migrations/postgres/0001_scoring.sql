-- Scoring models: immutable once stored. `body` is the clm.scoring.v1.Model
-- message without its output-only fields.
CREATE TABLE models (
    version        TEXT PRIMARY KEY,
    body           BYTEA NOT NULL,
    built_in       BOOLEAN NOT NULL,
    create_time    TIMESTAMPTZ NOT NULL,
    activate_time  TIMESTAMPTZ
);
CREATE INDEX models_newest ON models (create_time DESC, version DESC);

-- The active model: one row.
CREATE TABLE active_model (
    id       SMALLINT PRIMARY KEY CHECK (id = 1),
    version  TEXT NOT NULL REFERENCES models (version)
);

-- One row per customer the service has seen. `snapshot` is the JSON of the
-- latest evaluation (NULL until the first), `last_transition` the
-- clm.scoring.v1.Transition message. `version` grows with every write;
-- `position_version` is the version at which stage, acquisition status or
-- health last changed; `pushed_version` is the version whose snapshot
-- identity has received.
CREATE TABLE customers (
    customer_id      UUID PRIMARY KEY,
    merged_into      UUID,
    snapshot         BYTEA,
    last_transition  BYTEA,
    next_due_at      TIMESTAMPTZ,
    version          BIGINT NOT NULL,
    position_version BIGINT NOT NULL DEFAULT 0,
    pushed_version   BIGINT NOT NULL DEFAULT 0
);
-- The sweep reads the customers whose next evaluation is due.
CREATE INDEX customers_due ON customers (next_due_at) WHERE next_due_at IS NOT NULL;
-- The pusher reads the customers whose snapshot identity has not received,
-- those whose position changed first.
CREATE INDEX customers_unpushed ON customers (customer_id) WHERE pushed_version < version;
CREATE INDEX customers_unpushed_position ON customers (customer_id) WHERE pushed_version < position_version;

-- The features folded from each customer's touchpoints (JSON), apart from
-- the narrow lifecycle rows so that a rescore rewrites only those.
CREATE TABLE customer_features (
    customer_id  UUID PRIMARY KEY,
    features     BYTEA NOT NULL
);

-- Every transition (clm.scoring.v1.Transition), for ListTransitions.
CREATE TABLE transitions (
    id               UUID PRIMARY KEY,
    customer_id      UUID NOT NULL,
    transition_time  TIMESTAMPTZ NOT NULL,
    body             BYTEA NOT NULL
);
CREATE INDEX transitions_by_customer ON transitions (customer_id, transition_time, id);
CREATE INDEX transitions_by_time ON transitions (transition_time, id);

-- The transition log (transactional outbox), read in (txid, seq) order.
CREATE TABLE transition_log (
    seq          BIGSERIAL PRIMARY KEY,
    txid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id     UUID NOT NULL,
    customer_id  UUID,
    shard        INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    payload      BYTEA NOT NULL,
    recorded_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX transition_log_order ON transition_log (txid, seq);

-- Rescore operations. `state` and `trigger_kind` hold the
-- clm.scoring.v1.RescoreState and RescoreTrigger numbers; `resume_after` is
-- the last customer id evaluated, where a restarted rescore goes on.
CREATE TABLE rescores (
    id              UUID PRIMARY KEY,
    model_version   TEXT NOT NULL,
    state           SMALLINT NOT NULL,
    trigger_kind    SMALLINT NOT NULL,
    done_count      BIGINT NOT NULL DEFAULT 0,
    total_count     BIGINT NOT NULL,
    changed_count   BIGINT NOT NULL DEFAULT 0,
    rate_per_second DOUBLE PRECISION NOT NULL DEFAULT 0,
    create_time     TIMESTAMPTZ NOT NULL,
    start_time      TIMESTAMPTZ,
    end_time        TIMESTAMPTZ,
    error           TEXT NOT NULL DEFAULT '',
    resume_after    UUID
);
CREATE INDEX rescores_newest ON rescores (create_time DESC);

-- Where this service's consumers of other logs stand.
CREATE TABLE log_cursors (
    consumer     TEXT NOT NULL,
    shard_index  INTEGER NOT NULL,
    shard_count  INTEGER NOT NULL,
    cursor       TEXT NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (consumer, shard_index, shard_count)
);
