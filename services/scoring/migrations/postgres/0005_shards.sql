-- Work divided by shard among replicas (clm_eventlog::leases): each
-- customer row carries its shard, so the sweep, the pusher and rescore
-- pages of one shard read only its customers.
ALTER TABLE customers
    ADD COLUMN shard INTEGER NOT NULL GENERATED ALWAYS AS (clm_shard_of(customer_id)) STORED;

-- Each shard of a rescore keeps its own progress; the rescore has
-- succeeded when every shard has finished. `rate_per_second` is the
-- shard's, and the rescore's rate their sum.
CREATE TABLE rescore_shards (
    rescore_id      UUID NOT NULL REFERENCES rescores (id) ON DELETE CASCADE,
    shard_index     INTEGER NOT NULL,
    shard_count     INTEGER NOT NULL,
    resume_after    UUID,
    rate_per_second DOUBLE PRECISION NOT NULL DEFAULT 0,
    finished        BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (rescore_id, shard_count, shard_index)
);
