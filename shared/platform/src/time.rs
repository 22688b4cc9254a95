//! Conversions between `google.protobuf.Timestamp` and `chrono`.

use chrono::{DateTime, Utc};

use crate::error::FieldViolation;

/// A timestamp for a response.
pub fn to_timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

/// A timestamp from a request: within year 1970 to 9999 and with valid nanos.
pub fn from_timestamp(
    field: &str,
    timestamp: &prost_types::Timestamp,
) -> Result<DateTime<Utc>, FieldViolation> {
    if !(0..1_000_000_000).contains(&timestamp.nanos) {
        return Err(FieldViolation::new(
            field,
            "nanos must be between 0 and 999999999",
        ));
    }
    if timestamp.seconds < 0 {
        return Err(FieldViolation::new(
            field,
            "must not be before 1970-01-01T00:00:00Z",
        ));
    }
    DateTime::from_timestamp(timestamp.seconds, timestamp.nanos as u32)
        .filter(|time| time.timestamp() < 253_402_300_800)
        .ok_or_else(|| FieldViolation::new(field, "is after year 9999"))
}

/// How far ahead of this server's clock a caller's time may be: the bound
/// on every time a request states as a fact (when a touchpoint happened, a
/// consent was recorded, a lifecycle was evaluated). A time further ahead
/// would stay "newest" for good and shadow every real one, so it is refused.
#[derive(Debug, Clone, Copy)]
pub struct FactTimes {
    now: DateTime<Utc>,
    skew: std::time::Duration,
}

impl FactTimes {
    /// Times checked against the clock now, with `skew` allowed
    /// (`CLM_MAX_CLOCK_SKEW_SECONDS`).
    pub fn now(skew: std::time::Duration) -> Self {
        Self::at(Utc::now(), skew)
    }

    /// Times checked against `now`.
    pub fn at(now: DateTime<Utc>, skew: std::time::Duration) -> Self {
        Self { now, skew }
    }

    /// The clock reading the check uses.
    pub fn clock(&self) -> DateTime<Utc> {
        self.now
    }

    /// A time of a fact: valid as [`from_timestamp`] and not beyond the
    /// allowed skew ahead of the clock.
    pub fn check(
        &self,
        field: &str,
        timestamp: &prost_types::Timestamp,
    ) -> Result<DateTime<Utc>, FieldViolation> {
        let time = from_timestamp(field, timestamp)?;
        let latest = self.now + self.skew;
        if time > latest {
            return Err(FieldViolation::with_reason(
                field,
                "OUT_OF_RANGE",
                format!(
                    "is more than {}s in the future (the allowed clock skew, CLM_MAX_CLOCK_SKEW_SECONDS)",
                    self.skew.as_secs()
                ),
            ));
        }
        Ok(time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fact_times_may_not_lie_beyond_the_skew() {
        let now = Utc::now();
        let times = FactTimes::at(now, std::time::Duration::from_secs(300));
        let at = |seconds: i64| prost_types::Timestamp {
            seconds: now.timestamp() + seconds,
            nanos: 0,
        };
        assert!(times.check("t", &at(-86_400 * 365)).is_ok());
        assert!(times.check("t", &at(299)).is_ok());
        let err = times.check("t", &at(301)).unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.reason.as_str()),
            ("t", "OUT_OF_RANGE")
        );
        assert!(err.description.contains("300s in the future"), "{err:?}");
        let year_9999 = prost_types::Timestamp {
            seconds: 253_402_214_400,
            nanos: 0,
        };
        assert!(times.check("t", &year_9999).is_err());
    }

    #[test]
    fn round_trip() {
        let now = Utc::now();
        assert_eq!(from_timestamp("t", &to_timestamp(now)).unwrap(), now);
        assert!(
            from_timestamp(
                "t",
                &prost_types::Timestamp {
                    seconds: -1,
                    nanos: 0
                }
            )
            .is_err()
        );
        assert!(
            from_timestamp(
                "t",
                &prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1
                }
            )
            .is_err()
        );
        assert!(
            from_timestamp(
                "t",
                &prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0
                }
            )
            .is_err()
        );
    }
}
