//! How often one kind of thing happened, kept compactly enough to store per
//! customer and answer "how many in the last N days at time `now`" and "how
//! much do they weigh after exponential decay" without the touchpoints
//! themselves.
//!
//! Touchpoints are counted in buckets: one per UTC day for the last
//! [`DAILY_HORIZON_DAYS`] days before the newest touchpoint, one per
//! [`BLOCK_DAYS`]-day block before that, plus an all-time total. Each bucket
//! also keeps the sum of its touchpoints' offsets from the bucket start, so the
//! mean time of its touchpoints is exact: a bucket of one touchpoint knows that
//! touchpoint's time to the second, which makes decay exact for sparse
//! activity and a mean-time approximation for busy days.
//!
//! A bucket moves from daily to block resolution once it is more than the
//! horizon older than the newest touchpoint ever recorded. That depends only
//! on the set of recorded touchpoints, never on their order, so recording in
//! any order and merging give identical histories.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Seconds in a day.
pub const SECONDS_PER_DAY: i64 = 86_400;

/// How many days before the newest touchpoint are kept per day; older ones
/// are kept per block. At least the longest rolling window (365 days).
pub const DAILY_HORIZON_DAYS: i32 = 400;

/// The length of an old bucket, in days.
pub const BLOCK_DAYS: i32 = 30;

/// One bucket: its index (an epoch day, or an epoch block of
/// [`BLOCK_DAYS`] days), how many touchpoints it holds, and the sum of their
/// offsets in seconds from the bucket start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Bucket(i32, u32, u64);

impl Bucket {
    fn index(&self) -> i32 {
        self.0
    }

    fn count(&self) -> u32 {
        self.1
    }

    /// The mean time of the bucket's touchpoints, in epoch seconds, given the
    /// bucket's length in days.
    fn mean_seconds(&self, days_per_bucket: i32) -> f64 {
        let start = i64::from(self.0) * i64::from(days_per_bucket) * SECONDS_PER_DAY;
        start as f64 + self.2 as f64 / f64::from(self.1.max(1))
    }
}

/// The counts of one touchpoint type (or channel) over time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityHistory {
    /// Every touchpoint ever recorded.
    total: u64,
    /// Daily buckets, ascending by epoch day.
    days: Vec<Bucket>,
    /// Block buckets older than the daily horizon, ascending by block.
    blocks: Vec<Bucket>,
}

/// The epoch day of a time.
pub fn epoch_day(at: DateTime<Utc>) -> i32 {
    at.timestamp().div_euclid(SECONDS_PER_DAY) as i32
}

/// The start (midnight UTC) of an epoch day.
pub fn day_start(day: i32) -> DateTime<Utc> {
    DateTime::from_timestamp(i64::from(day) * SECONDS_PER_DAY, 0)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl ActivityHistory {
    /// Counts one touchpoint that occurred at `at`.
    pub fn record(&mut self, at: DateTime<Utc>) {
        self.total += 1;
        let seconds = at.timestamp();
        let day = seconds.div_euclid(SECONDS_PER_DAY) as i32;
        let offset = seconds.rem_euclid(SECONDS_PER_DAY) as u64;
        match self.newest_day() {
            Some(newest) if day < newest - DAILY_HORIZON_DAYS => {
                add_to_block(&mut self.blocks, day, 1, offset);
            }
            _ => {
                add(&mut self.days, Bucket(day, 1, offset));
                self.compact();
            }
        }
    }

    /// Adds every touchpoint of `other`, as if they had been recorded here.
    pub fn merge(&mut self, other: &ActivityHistory) {
        self.total += other.total;
        for bucket in &other.days {
            add(&mut self.days, *bucket);
        }
        for bucket in &other.blocks {
            add(&mut self.blocks, *bucket);
        }
        self.compact();
    }

    /// All touchpoints ever recorded.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// True when nothing was ever recorded.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The touchpoints of the last `days` UTC calendar days up to and
    /// including the day of `now` (later ones included).
    pub fn count_in_last_days(&self, days: i32, now: DateTime<Utc>) -> u64 {
        let from = epoch_day(now) - days + 1;
        let recent: u64 = self
            .days
            .iter()
            .rev()
            .take_while(|bucket| bucket.index() >= from)
            .map(|bucket| u64::from(bucket.count()))
            .sum();
        // Only reached when `now` is far before the newest touchpoint.
        let old: u64 = self
            .blocks
            .iter()
            .filter(|bucket| bucket.index() * BLOCK_DAYS >= from)
            .map(|bucket| u64::from(bucket.count()))
            .sum();
        recent + old
    }

    /// When the count of the last `days` days next drops because its oldest
    /// touchpoint leaves the window: the midnight after that touchpoint's day
    /// plus `days` days. `None` when the window is empty.
    pub fn next_window_change(&self, days: i32, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let from = epoch_day(now) - days + 1;
        self.days
            .iter()
            .find(|bucket| bucket.index() >= from)
            .map(|bucket| day_start(bucket.index() + days))
    }

    /// The sum over every touchpoint of `0.5 ^ (age / half_life)`, the age
    /// being the time from the touchpoint to `now` (0 for later ones).
    pub fn decayed_count(&self, half_life_seconds: f64, now: DateTime<Utc>) -> f64 {
        self.decayed_count_between(half_life_seconds, now, f64::NEG_INFINITY, f64::INFINITY)
    }

    /// Like [`decayed_count`](Self::decayed_count), for the touchpoints whose
    /// (bucket mean) time in epoch seconds is in `[from, until)`.
    pub fn decayed_count_between(
        &self,
        half_life_seconds: f64,
        now: DateTime<Utc>,
        from: f64,
        until: f64,
    ) -> f64 {
        let now = now.timestamp() as f64;
        let decayed = |bucket: &Bucket, days_per_bucket: i32| {
            let mean = bucket.mean_seconds(days_per_bucket);
            if mean < from || mean >= until {
                return 0.0;
            }
            let age = (now - mean).max(0.0);
            f64::from(bucket.count()) * (-age / half_life_seconds).exp2()
        };
        let recent: f64 = self.days.iter().map(|bucket| decayed(bucket, 1)).sum();
        let old: f64 = self
            .blocks
            .iter()
            .map(|bucket| decayed(bucket, BLOCK_DAYS))
            .sum();
        recent + old
    }

    fn newest_day(&self) -> Option<i32> {
        self.days.last().map(Bucket::index)
    }

    /// Moves the daily buckets older than the horizon into blocks.
    fn compact(&mut self) {
        let Some(newest) = self.newest_day() else {
            return;
        };
        let keep_from = self
            .days
            .partition_point(|bucket| bucket.index() < newest - DAILY_HORIZON_DAYS);
        for bucket in self.days.drain(..keep_from) {
            let offset = bucket.2;
            add_to_block(&mut self.blocks, bucket.index(), bucket.count(), offset);
        }
    }
}

/// Adds `count` touchpoints of epoch day `day`, whose offsets from the day's
/// start sum to `offset`, to the block holding that day.
fn add_to_block(blocks: &mut Vec<Bucket>, day: i32, count: u32, offset: u64) {
    let block = day.div_euclid(BLOCK_DAYS);
    let day_in_block = (day - block * BLOCK_DAYS) as u64;
    let offset = offset + u64::from(count) * day_in_block * SECONDS_PER_DAY as u64;
    add(blocks, Bucket(block, count, offset));
}

/// Adds a bucket to an ascending list, summing it into the one of the same
/// index if there is one.
fn add(buckets: &mut Vec<Bucket>, bucket: Bucket) {
    match buckets.binary_search_by_key(&bucket.index(), Bucket::index) {
        Ok(position) => {
            let existing = &mut buckets[position];
            existing.1 += bucket.1;
            existing.2 += bucket.2;
        }
        Err(position) => buckets.insert(position, bucket),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn at(day: i64, hour: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap()
            + Duration::days(day)
            + Duration::hours(hour)
    }

    #[test]
    fn windows_count_calendar_days() {
        let mut history = ActivityHistory::default();
        history.record(at(0, 10));
        history.record(at(5, 23));
        history.record(at(9, 1));
        let now = at(9, 12);
        assert_eq!(history.count_in_last_days(1, now), 1);
        assert_eq!(history.count_in_last_days(5, now), 2);
        assert_eq!(history.count_in_last_days(10, now), 3);
        assert_eq!(history.total(), 3);
        // the day-0 touchpoint leaves the 10-day window at the start of day 10
        assert_eq!(history.next_window_change(10, now), Some(at(10, 0)));
        assert_eq!(history.next_window_change(1, at(20, 0)), None);
    }

    #[test]
    fn decay_is_exact_for_single_touchpoints() {
        let mut history = ActivityHistory::default();
        history.record(at(0, 7));
        let half_life = 10.0 * SECONDS_PER_DAY as f64;
        let decayed = history.decayed_count(half_life, at(10, 7));
        assert!((decayed - 0.5).abs() < 1e-12, "{decayed}");
    }

    #[test]
    fn old_days_are_compacted_into_blocks_whatever_the_order() {
        let times: Vec<_> = (0..900).step_by(7).map(|day| at(day, day % 24)).collect();
        let mut forward = ActivityHistory::default();
        times.iter().for_each(|time| forward.record(*time));
        let mut backward = ActivityHistory::default();
        times.iter().rev().for_each(|time| backward.record(*time));
        assert_eq!(forward, backward);
        assert!(forward.days.len() <= DAILY_HORIZON_DAYS as usize + 1);
        assert!(!forward.blocks.is_empty());
        assert_eq!(forward.total(), times.len() as u64);

        // merging two halves gives the same history as recording everything
        let (first, second) = times.split_at(times.len() / 3);
        let mut left = ActivityHistory::default();
        first.iter().for_each(|time| left.record(*time));
        let mut right = ActivityHistory::default();
        second.iter().for_each(|time| right.record(*time));
        let mut merged = right.clone();
        merged.merge(&left);
        assert_eq!(merged, forward);
        left.merge(&right);
        assert_eq!(left, forward);

        // blocks keep the mean time: decay stays close to the exact value
        let now = at(900, 0);
        let half_life = 365.0 * SECONDS_PER_DAY as f64;
        let exact: f64 = times
            .iter()
            .map(|time| {
                let age = (now - *time).num_seconds() as f64;
                (-age / half_life).exp2()
            })
            .sum();
        let approximate = forward.decayed_count(half_life, now);
        assert!(
            (exact - approximate).abs() / exact < 1e-3,
            "{exact} vs {approximate}"
        );
    }
}
