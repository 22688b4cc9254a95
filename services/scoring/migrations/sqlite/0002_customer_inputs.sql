-- See the PostgreSQL migration 0003.
CREATE TABLE customer_inputs (
    customer_id  TEXT NOT NULL,
    input_key    TEXT NOT NULL,
    occur_time   INTEGER NOT NULL,
    is_profile   INTEGER NOT NULL,
    body         BLOB NOT NULL,
    PRIMARY KEY (customer_id, input_key)
) STRICT;

ALTER TABLE customer_features ADD COLUMN folded_to INTEGER;
ALTER TABLE customer_features ADD COLUMN inputs_kept INTEGER NOT NULL DEFAULT 0;
