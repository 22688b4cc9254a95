//! Rollup compaction. The rollup rows of a period are spread over 16 slots
//! so that concurrent writers of the current hour, day and month do not
//! queue for one row; once a period is over, nothing needs the spread, and
//! a summary over a year would read up to 16 rows per period. The sweep's
//! lease holder folds the slots of periods that ended more than
//! [`MARGIN`] ago into one row each, every [`EVERY`]. The figures never
//! change; a late write into a folded period is folded again next time.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use clm_platform::clock::Clock;
use clm_platform::server::Shutdown;

use crate::store::{FeedbackStore, StoreError};

/// How often the closed periods are folded.
pub const EVERY: Duration = Duration::from_secs(60);
/// How long after its end a period is left spread, for the writes that
/// still arrive for it (responses submitted just before the hour).
pub const MARGIN: TimeDelta = TimeDelta::hours(1);
/// Periods of each grain folded per statement.
const PERIODS_PER_CALL: u32 = 500;

/// Folds every period that ended before `before`, a statement at a time;
/// returns how many periods were folded.
pub async fn compact_all(
    store: &dyn FeedbackStore,
    before: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let mut folded = 0;
    loop {
        match store.compact_rollups(before, PERIODS_PER_CALL).await? {
            0 => return Ok(folded),
            periods => folded += periods,
        }
    }
}

/// Folds the closed periods every [`EVERY`] until `stop`.
pub async fn run(
    store: Arc<dyn FeedbackStore>,
    clock: Clock,
    stop: Shutdown,
) -> anyhow::Result<()> {
    while !stop.is_triggered() {
        match compact_all(store.as_ref(), clock.now() - MARGIN).await {
            Ok(0) => {}
            Ok(periods) => tracing::debug!(periods, "folded the rollup slots of closed periods"),
            Err(err) => tracing::warn!(error = %err, "rollup compaction failed; retrying later"),
        }
        tokio::select! {
            () = stop.triggered() => break,
            () = tokio::time::sleep(EVERY) => {}
        }
    }
    Ok(())
}
