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

#[cfg(test)]
mod tests {
    use super::*;

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
