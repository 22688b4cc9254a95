-- Customers: state and version as columns, the profile as a JSON document,
-- and the few profile facts that ListCustomers filters by. Ids are UUID
-- strings; times are microseconds since the Unix epoch.
CREATE TABLE customers (
    id           TEXT PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ('active', 'merged', 'erased')),
    merged_into  TEXT REFERENCES customers (id),
    version      INTEGER NOT NULL,
    document     TEXT NOT NULL,
    stage        INTEGER NOT NULL DEFAULT 0,
    health       INTEGER NOT NULL DEFAULT 0,
    company_key  TEXT,
    identified   INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
) STRICT;
CREATE INDEX customers_state_id ON customers (state, id);
CREATE INDEX customers_stage_id ON customers (stage, id);
CREATE INDEX customers_health_id ON customers (health, id);
CREATE INDEX customers_company ON customers (company_key, id);

CREATE TABLE identity_keys (
    kind         TEXT NOT NULL,
    value        TEXT NOT NULL,
    customer_id  TEXT NOT NULL REFERENCES customers (id),
    PRIMARY KEY (kind, value)
) STRICT;
CREATE INDEX identity_keys_customer ON identity_keys (customer_id);

CREATE TABLE suppressed_keys (
    key_hash            BLOB PRIMARY KEY,
    erased_customer_id  TEXT NOT NULL,
    suppressed_at       INTEGER NOT NULL
) STRICT;

CREATE TABLE merges (
    merge_id      TEXT PRIMARY KEY,
    survivor_id   TEXT NOT NULL REFERENCES customers (id),
    merged_id     TEXT NOT NULL REFERENCES customers (id),
    reason        TEXT NOT NULL,
    requested_by  TEXT NOT NULL,
    merged_at     INTEGER NOT NULL
) STRICT;
CREATE INDEX merges_survivor ON merges (survivor_id);
CREATE INDEX merges_merged ON merges (merged_id);

CREATE TABLE create_requests (
    request_id   TEXT PRIMARY KEY,
    customer_id  TEXT NOT NULL REFERENCES customers (id),
    created_at   INTEGER NOT NULL
) STRICT;

-- The customer event log (transactional outbox). SQLite has one writer, so
-- sequence order is commit order.
CREATE TABLE customer_events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL,
    customer_id  TEXT,
    shard        INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    payload      BLOB NOT NULL,
    recorded_at  INTEGER NOT NULL
) STRICT;
