-- Rollup rows of a period beside its slot 0, for the compaction that folds
-- the slots of closed periods into one row.
CREATE INDEX survey_rollups_spread ON survey_rollups (grain, period) WHERE slot <> 0;
