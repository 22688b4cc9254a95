-- See the PostgreSQL migration 0005. One process owns every shard of a
-- SQLite database, so customers carry no shard and a rescore has one
-- shard row, (0, 1).
CREATE TABLE rescore_shards (
    rescore_id      TEXT NOT NULL REFERENCES rescores (id) ON DELETE CASCADE,
    shard_index     INTEGER NOT NULL,
    shard_count     INTEGER NOT NULL,
    resume_after    TEXT,
    rate_per_second REAL NOT NULL DEFAULT 0,
    finished        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (rescore_id, shard_count, shard_index)
) STRICT;
