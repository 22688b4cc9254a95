//! Rows in PostgreSQL's binary COPY format, for `COPY … FROM STDIN (FORMAT
//! binary)`: the fastest way to write many rows, with no statement to parse
//! and no arrays to unpack on the server.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Microseconds between the Unix and the PostgreSQL epochs (2000-01-01).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A COPY stream being written: the header, then rows of fields in the
/// column order of the COPY statement, then [`BinaryCopy::finish`].
///
/// Each value is encoded as its column type expects it (`uuid`, `text`,
/// `int2`, `int4`, `int8`, `timestamptz`, `jsonb`); a mismatch with the
/// table is refused by the server, not here.
pub struct BinaryCopy {
    buffer: Vec<u8>,
}

impl BinaryCopy {
    /// A stream for about `rows` rows of about `row_bytes` each.
    pub fn with_capacity(rows: usize, row_bytes: usize) -> Self {
        let mut buffer = Vec::with_capacity(19 + rows * row_bytes + 2);
        buffer.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        // Flags (no OIDs), then the length of the header extension (none).
        buffer.extend_from_slice(&0_i32.to_be_bytes());
        buffer.extend_from_slice(&0_i32.to_be_bytes());
        Self { buffer }
    }

    /// Starts a row of `fields` fields.
    pub fn row(&mut self, fields: i16) -> &mut Self {
        self.buffer.extend_from_slice(&fields.to_be_bytes());
        self
    }

    fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        let length = i32::try_from(bytes.len()).expect("a COPY field is below 2 GiB");
        self.buffer.extend_from_slice(&length.to_be_bytes());
        self.buffer.extend_from_slice(bytes);
        self
    }

    /// A NULL.
    pub fn null(&mut self) -> &mut Self {
        self.buffer.extend_from_slice(&(-1_i32).to_be_bytes());
        self
    }

    /// A `uuid`.
    pub fn uuid(&mut self, value: Uuid) -> &mut Self {
        self.bytes(value.as_bytes())
    }

    /// A `text` (or `varchar`).
    pub fn text(&mut self, value: &str) -> &mut Self {
        self.bytes(value.as_bytes())
    }

    /// A `text` or NULL.
    pub fn text_or_null(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.text(value),
            None => self.null(),
        }
    }

    /// An `int2`.
    pub fn int2(&mut self, value: i16) -> &mut Self {
        self.bytes(&value.to_be_bytes())
    }

    /// An `int4`.
    pub fn int4(&mut self, value: i32) -> &mut Self {
        self.bytes(&value.to_be_bytes())
    }

    /// An `int8`.
    pub fn int8(&mut self, value: i64) -> &mut Self {
        self.bytes(&value.to_be_bytes())
    }

    /// An `int8` or NULL.
    pub fn int8_or_null(&mut self, value: Option<i64>) -> &mut Self {
        match value {
            Some(value) => self.int8(value),
            None => self.null(),
        }
    }

    /// A `timestamptz`, to the microsecond.
    pub fn timestamptz(&mut self, value: DateTime<Utc>) -> &mut Self {
        self.int8(value.timestamp_micros() - POSTGRES_EPOCH_MICROS)
    }

    /// A `jsonb` from its JSON text, or NULL.
    pub fn jsonb_or_null(&mut self, json: Option<&str>) -> &mut Self {
        let Some(json) = json else {
            return self.null();
        };
        let length = i32::try_from(json.len() + 1).expect("a COPY field is below 2 GiB");
        self.buffer.extend_from_slice(&length.to_be_bytes());
        // The jsonb binary format: version 1, then the text.
        self.buffer.push(1);
        self.buffer.extend_from_slice(json.as_bytes());
        self
    }

    /// The whole stream, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.buffer.extend_from_slice(&(-1_i16).to_be_bytes());
        self.buffer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_its_field_count_then_length_prefixed_values() {
        let mut copy = BinaryCopy::with_capacity(1, 32);
        copy.row(4)
            .int2(7)
            .text("ab")
            .null()
            .timestamptz(DateTime::from_timestamp_micros(POSTGRES_EPOCH_MICROS + 1).unwrap());
        let bytes = copy.finish();
        let mut expected = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        expected.extend_from_slice(&[0, 4]);
        expected.extend_from_slice(&[0, 0, 0, 2, 0, 7]);
        expected.extend_from_slice(&[0, 0, 0, 2, b'a', b'b']);
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn jsonb_carries_its_version_byte() {
        let mut copy = BinaryCopy::with_capacity(1, 8);
        copy.row(1).jsonb_or_null(Some("{}"));
        let bytes = copy.finish();
        assert_eq!(&bytes[19..], &[0, 1, 0, 0, 0, 3, 1, b'{', b'}', 0xff, 0xff]);
    }
}
