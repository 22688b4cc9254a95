-- Touchpoints. The table is also the "touchpoint recorded" part of the
-- touchpoint log: every row records the transaction that wrote it (txid) and
-- a position from the log sequence (seq), and the log tail reads it in
-- (txid, seq) order.
CREATE SEQUENCE touchpoint_log_seq;

-- The event id is the key: ingest looks touchpoints up by it (idempotency),
-- and nothing looks one up by its server id, so that needs no index.
CREATE TABLE touchpoints (
    event_id          TEXT PRIMARY KEY,
    id                UUID NOT NULL,
    customer_id       UUID NOT NULL,
    channel           SMALLINT NOT NULL,
    type              TEXT NOT NULL,
    occurred_at       TIMESTAMPTZ NOT NULL,
    recorded_at       TIMESTAMPTZ NOT NULL,
    campaign          TEXT NOT NULL DEFAULT '',
    utm_source        TEXT NOT NULL DEFAULT '',
    utm_medium        TEXT NOT NULL DEFAULT '',
    properties        JSONB,
    revenue_currency  TEXT,
    revenue_micros    BIGINT,
    cost_currency     TEXT,
    cost_micros       BIGINT,
    shard             INTEGER NOT NULL,
    seq               BIGINT NOT NULL DEFAULT nextval('touchpoint_log_seq'),
    txid              xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX touchpoints_timeline ON touchpoints (customer_id, occurred_at DESC, id DESC);
CREATE INDEX touchpoints_log ON touchpoints (txid, seq);

-- The other entries of the touchpoint log: re-keys after merges and
-- property stripping after erasures. Same sequence, same order.
CREATE TABLE touchpoint_changes (
    seq          BIGINT PRIMARY KEY DEFAULT nextval('touchpoint_log_seq'),
    txid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id     UUID NOT NULL,
    customer_id  UUID NOT NULL,
    shard        INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    payload      BYTEA NOT NULL,
    recorded_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX touchpoint_changes_log ON touchpoint_changes (txid, seq);

-- Customers identity merged away, and into whom: touchpoints that arrive for
-- them later are stored under the survivor.
CREATE TABLE merged_customers (
    merged_id    UUID PRIMARY KEY,
    survivor_id  UUID NOT NULL,
    merge_id     UUID NOT NULL,
    merged_at    TIMESTAMPTZ NOT NULL
);

-- Customers identity erased: touchpoints that arrive for them later keep
-- no properties.
CREATE TABLE erased_customers (
    customer_id  UUID PRIMARY KEY,
    erased_at    TIMESTAMPTZ NOT NULL
);

-- Where this service's consumers of other logs stand.
CREATE TABLE log_cursors (
    consumer     TEXT NOT NULL,
    shard_index  INTEGER NOT NULL,
    shard_count  INTEGER NOT NULL,
    cursor       TEXT NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (consumer, shard_index, shard_count)
);
