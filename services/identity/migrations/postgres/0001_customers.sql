-- Customers: state and version as columns, the profile as a document, and
-- the few profile facts that ListCustomers filters by.
CREATE TABLE customers (
    id           UUID PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ('active', 'merged', 'erased')),
    merged_into  UUID REFERENCES customers (id),
    version      BIGINT NOT NULL,
    document     JSONB NOT NULL,
    stage        INTEGER NOT NULL DEFAULT 0,
    health       INTEGER NOT NULL DEFAULT 0,
    company_key  TEXT,
    identified   BOOLEAN NOT NULL DEFAULT FALSE,
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL
);
CREATE INDEX customers_state_id ON customers (state, id);
CREATE INDEX customers_stage_id ON customers (stage, id) WHERE state = 'active';
CREATE INDEX customers_health_id ON customers (health, id) WHERE state = 'active';
CREATE INDEX customers_company ON customers (company_key, id) WHERE company_key IS NOT NULL;
CREATE INDEX customers_merged_into ON customers (merged_into) WHERE merged_into IS NOT NULL;

-- Each identity key belongs to at most one active customer: the primary key
-- enforces it, also under concurrent requests.
CREATE TABLE identity_keys (
    kind         TEXT NOT NULL,
    value        TEXT NOT NULL,
    customer_id  UUID NOT NULL REFERENCES customers (id),
    PRIMARY KEY (kind, value)
);
CREATE INDEX identity_keys_customer ON identity_keys (customer_id);

-- Keyed hashes of erased customers' identity keys.
CREATE TABLE suppressed_keys (
    key_hash            BYTEA PRIMARY KEY,
    erased_customer_id  UUID NOT NULL,
    suppressed_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The merge ledger: who merged whom, why and when.
CREATE TABLE merges (
    merge_id      UUID PRIMARY KEY,
    survivor_id   UUID NOT NULL REFERENCES customers (id),
    merged_id     UUID NOT NULL REFERENCES customers (id),
    reason        TEXT NOT NULL,
    requested_by  TEXT NOT NULL,
    merged_at     TIMESTAMPTZ NOT NULL
);
CREATE INDEX merges_survivor ON merges (survivor_id);
CREATE INDEX merges_merged ON merges (merged_id);

-- Idempotency of CreateCustomer.
CREATE TABLE create_requests (
    request_id   TEXT PRIMARY KEY,
    customer_id  UUID NOT NULL REFERENCES customers (id),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The customer event log (transactional outbox), read in (txid, seq) order.
CREATE TABLE customer_events (
    seq          BIGSERIAL PRIMARY KEY,
    txid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id     UUID NOT NULL,
    customer_id  UUID,
    shard        INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    payload      BYTEA NOT NULL,
    recorded_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX customer_events_order ON customer_events (txid, seq);
