-- The log-consumer kit's tables on SQLite (see clm_eventlog::kit): the
-- cursors alone, since one process owns every shard.
CREATE TABLE IF NOT EXISTS log_cursors (
    consumer     TEXT NOT NULL,
    shard_index  INTEGER NOT NULL,
    shard_count  INTEGER NOT NULL,
    cursor       TEXT NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (consumer, shard_index, shard_count)
) STRICT;
