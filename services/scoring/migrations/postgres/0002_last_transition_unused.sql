-- A customer's newest transition is read from `transitions` (by
-- transitions_by_customer) instead of being copied into every customer row,
-- which made each lifecycle write several times larger. The column stays
-- until no running version writes it; writes now clear it.
COMMENT ON COLUMN customers.last_transition IS
    'Unused: cleared on write; the newest row of transitions is the last transition.';
