-- Work divided by shard among replicas (clm_eventlog::leases): each
-- customer row carries its shard (clm_eventlog::shard_of, written with the
-- row), so the sweep, the pusher and rescore pages of one shard read only
-- its customers. Not a generated column: PostgreSQL computes those again
-- on every update of the row, and customers are updated all the time.
ALTER TABLE customers ADD COLUMN shard INTEGER;
UPDATE customers SET shard = clm_shard_of(customer_id);
ALTER TABLE customers ALTER COLUMN shard SET NOT NULL;

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
