-- The log-consumer kit's tables (see clm_eventlog::kit).

-- Where each consumer of another service's log stands (see
-- clm_eventlog::consumer::cursors). Services that landed before the kit
-- declared it in their first migration, hence IF NOT EXISTS.
CREATE TABLE IF NOT EXISTS log_cursors (
    consumer     TEXT NOT NULL,
    shard_index  INTEGER NOT NULL,
    shard_count  INTEGER NOT NULL,
    cursor       TEXT NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (consumer, shard_index, shard_count)
);

-- One row per shard of a lease group: its owner ('' when free), the token
-- it took the lease with (one more on every take) and when the lease ends.
CREATE TABLE IF NOT EXISTS shard_leases (
    lease_group  TEXT NOT NULL,
    shard_index  INTEGER NOT NULL,
    shard_count  INTEGER NOT NULL,
    owner        TEXT NOT NULL,
    token        BIGINT NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (lease_group, shard_count, shard_index)
);

-- The replicas alive in each group, renewed with their leases: the fair
-- share of each is the group's shards divided by their number.
CREATE TABLE IF NOT EXISTS lease_members (
    lease_group  TEXT NOT NULL,
    owner        TEXT NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (lease_group, owner)
);

-- The shard of a customer, as clm_eventlog::shard_of computes it: FNV-1a
-- over the id's 16 bytes, keeping 31 bits.
CREATE OR REPLACE FUNCTION clm_shard_of(id UUID) RETURNS INTEGER
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    bytes BYTEA := uuid_send(id);
    hash BIGINT := 2166136261;
BEGIN
    FOR i IN 0..15 LOOP
        hash := ((hash # get_byte(bytes, i)) * 16777619) % 4294967296;
    END LOOP;
    RETURN (hash & 2147483647)::INTEGER;
END;
$$;
