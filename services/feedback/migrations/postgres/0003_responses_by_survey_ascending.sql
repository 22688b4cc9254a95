-- A summary edge reads one survey's rows in a time range. Written as row
-- comparisons on (survey_id, submitted_at), only this index can take that
-- range as its condition: the time index cannot, and on the earlier
-- descending index a row comparison is cut to `survey_id >=`. Listings in
-- newest-first order scan it backwards.
CREATE INDEX responses_by_survey_ascending ON responses (survey_id, submitted_at, id);
DROP INDEX responses_by_survey;
ALTER INDEX responses_by_survey_ascending RENAME TO responses_by_survey;
