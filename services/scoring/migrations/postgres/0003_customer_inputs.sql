-- Every input of a customer's history (a touchpoint's facts, or the profile
-- identity held from a customer event on), so that an input arriving late
-- derives the history again in event time. Keyed by touchpoint id or
-- `profile/<event id>`; body is the postcard-encoded fact.
CREATE TABLE customer_inputs (
    customer_id  UUID NOT NULL,
    input_key    TEXT NOT NULL,
    occur_time   TIMESTAMPTZ NOT NULL,
    is_profile   BOOLEAN NOT NULL,
    body         BYTEA NOT NULL,
    PRIMARY KEY (customer_id, input_key)
);

-- The latest input folded into the features, and whether every input folded
-- in is kept in customer_inputs (false for customers scored before, whose
-- history cannot be derived again).
ALTER TABLE customer_features
    ADD COLUMN folded_to TIMESTAMPTZ,
    ADD COLUMN inputs_kept BOOLEAN NOT NULL DEFAULT FALSE;
