-- A summary edge adds up the tally columns of one survey's rows in a time
-- range. With those columns in the survey index, the edge is an index-only
-- scan of that range. The planner, which does not know how survey and time
-- go together, would otherwise take the time index when another survey is
-- busy in the same hour, and read all of that survey's rows there. The key
-- is unchanged, so listings by survey read this index as they did the old one.
CREATE INDEX responses_by_survey_tally ON responses (survey_id, submitted_at DESC, id DESC)
    INCLUDE (responses, nps_count, nps_promoters, nps_passives, nps_detractors,
             csat_count, csat_satisfied, csat_sum, ces_count, ces_sum,
             sentiment_positive, sentiment_neutral, sentiment_negative,
             sentiment_not_scored, sentiment_sum, dispatched, answered);
DROP INDEX responses_by_survey;

-- The dispatch edge counts releases and answers; with `responded_at` in
-- the index it is index-only too.
CREATE INDEX dispatches_released_answered ON dispatches (survey_id, dispatched_at)
    INCLUDE (responded_at) WHERE dispatched_at IS NOT NULL;
DROP INDEX dispatches_released;

-- Rollup rows of a period beside its slot 0, for the compaction that folds
-- the slots of closed periods into one row (they are spread only so that
-- concurrent writers of the current period do not queue for one row).
CREATE INDEX survey_rollups_spread ON survey_rollups (grain, period) WHERE slot <> 0;
