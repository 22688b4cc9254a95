-- Touchpoints; also the "touchpoint recorded" part of the touchpoint log,
-- read in seq order (SQLite's single writer commits in that order). Ids are
-- UUID strings, times microseconds since the Unix epoch.
CREATE TABLE log_sequence (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    value  INTEGER NOT NULL
) STRICT;
INSERT INTO log_sequence (id, value) VALUES (1, 0);

CREATE TABLE touchpoints (
    id                TEXT PRIMARY KEY,
    event_id          TEXT NOT NULL UNIQUE,
    customer_id       TEXT NOT NULL,
    channel           INTEGER NOT NULL,
    type              TEXT NOT NULL,
    occurred_at       INTEGER NOT NULL,
    recorded_at       INTEGER NOT NULL,
    campaign          TEXT NOT NULL DEFAULT '',
    utm_source        TEXT NOT NULL DEFAULT '',
    utm_medium        TEXT NOT NULL DEFAULT '',
    properties        TEXT,
    revenue_currency  TEXT,
    revenue_micros    INTEGER,
    cost_currency     TEXT,
    cost_micros       INTEGER,
    shard             INTEGER NOT NULL,
    seq               INTEGER NOT NULL UNIQUE
) STRICT;
CREATE INDEX touchpoints_timeline ON touchpoints (customer_id, occurred_at DESC, id DESC);

CREATE TABLE touchpoint_changes (
    seq          INTEGER PRIMARY KEY,
    event_id     TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    shard        INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    payload      BLOB NOT NULL,
    recorded_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE merged_customers (
    merged_id    TEXT PRIMARY KEY,
    survivor_id  TEXT NOT NULL,
    merge_id     TEXT NOT NULL,
    merged_at    INTEGER NOT NULL
) STRICT;

CREATE TABLE erased_customers (
    customer_id  TEXT PRIMARY KEY,
    erased_at    INTEGER NOT NULL
) STRICT;

CREATE TABLE log_cursors (
    consumer     TEXT NOT NULL,
    shard_index  INTEGER NOT NULL,
    shard_count  INTEGER NOT NULL,
    cursor       TEXT NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (consumer, shard_index, shard_count)
) STRICT;
