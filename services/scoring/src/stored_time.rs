//! How stored times are serialised: as RFC 3339 text in human-readable
//! formats (the JSON that earlier versions stored, still read), and as
//! whole seconds plus nanoseconds in the compact binary format, which is
//! exact and needs no parsing. Use with `#[serde(with = "...")]`.

use chrono::{DateTime, Utc};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Serialises a time.
pub fn serialize<S: Serializer>(time: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    if serializer.is_human_readable() {
        time.serialize(serializer)
    } else {
        (time.timestamp(), time.timestamp_subsec_nanos()).serialize(serializer)
    }
}

/// Deserialises a time.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    if deserializer.is_human_readable() {
        DateTime::<Utc>::deserialize(deserializer)
    } else {
        let (seconds, nanos) = <(i64, u32)>::deserialize(deserializer)?;
        DateTime::from_timestamp(seconds, nanos)
            .ok_or_else(|| D::Error::custom("a stored time is out of range"))
    }
}

/// The same for an optional time.
pub mod option {
    use super::*;

    /// A time as [`super::serialize`] writes it.
    #[derive(Serialize, Deserialize)]
    #[serde(transparent)]
    struct Stored(#[serde(with = "super")] DateTime<Utc>);

    /// Serialises an optional time.
    pub fn serialize<S: Serializer>(
        time: &Option<DateTime<Utc>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        time.map(Stored).serialize(serializer)
    }

    /// Deserialises an optional time.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        Ok(Option::<Stored>::deserialize(deserializer)?.map(|stored| stored.0))
    }
}
