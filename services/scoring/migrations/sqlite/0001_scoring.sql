-- The scoring tables on SQLite: ids are UUID strings, times microseconds
-- since the Unix epoch. See the PostgreSQL migration for what each holds.
CREATE TABLE models (
    version        TEXT PRIMARY KEY,
    body           BLOB NOT NULL,
    built_in       INTEGER NOT NULL,
    create_time    INTEGER NOT NULL,
    activate_time  INTEGER
) STRICT;
CREATE INDEX models_newest ON models (create_time DESC, version DESC);

CREATE TABLE active_model (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    version  TEXT NOT NULL REFERENCES models (version)
) STRICT;

CREATE TABLE customers (
    customer_id      TEXT PRIMARY KEY,
    merged_into      TEXT,
    snapshot         BLOB,
    last_transition  BLOB,
    next_due_at      INTEGER,
    version          INTEGER NOT NULL,
    position_version INTEGER NOT NULL DEFAULT 0,
    pushed_version   INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX customers_due ON customers (next_due_at) WHERE next_due_at IS NOT NULL;
CREATE INDEX customers_unpushed ON customers (customer_id) WHERE pushed_version < version;
CREATE INDEX customers_unpushed_position ON customers (customer_id) WHERE pushed_version < position_version;

CREATE TABLE customer_features (
    customer_id  TEXT PRIMARY KEY,
    features     BLOB NOT NULL
) STRICT;

CREATE TABLE transitions (
    id               TEXT PRIMARY KEY,
    customer_id      TEXT NOT NULL,
    transition_time  INTEGER NOT NULL,
    body             BLOB NOT NULL
) STRICT;
CREATE INDEX transitions_by_customer ON transitions (customer_id, transition_time, id);
CREATE INDEX transitions_by_time ON transitions (transition_time, id);

CREATE TABLE transition_log (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL,
    customer_id  TEXT,
    shard        INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    payload      BLOB NOT NULL,
    recorded_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE rescores (
    id              TEXT PRIMARY KEY,
    model_version   TEXT NOT NULL,
    state           INTEGER NOT NULL,
    trigger_kind    INTEGER NOT NULL,
    done_count      INTEGER NOT NULL DEFAULT 0,
    total_count     INTEGER NOT NULL,
    changed_count   INTEGER NOT NULL DEFAULT 0,
    rate_per_second REAL NOT NULL DEFAULT 0,
    create_time     INTEGER NOT NULL,
    start_time      INTEGER,
    end_time        INTEGER,
    error           TEXT NOT NULL DEFAULT '',
    resume_after    TEXT
) STRICT;
CREATE INDEX rescores_newest ON rescores (create_time DESC);

CREATE TABLE log_cursors (
    consumer     TEXT NOT NULL,
    shard_index  INTEGER NOT NULL,
    shard_count  INTEGER NOT NULL,
    cursor       TEXT NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (consumer, shard_index, shard_count)
) STRICT;
