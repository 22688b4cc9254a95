//! Checks shared by every service's request validation. Each returns a
//! [`FieldViolation`] naming the field, so handlers can collect them.

use crate::error::FieldViolation;

/// A required UUID (the id format of every clm resource).
pub fn uuid(field: &str, value: &str) -> Result<uuid::Uuid, FieldViolation> {
    if value.is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    uuid::Uuid::try_parse(value).map_err(|_| FieldViolation::new(field, "is not a valid UUID"))
}

/// Why `c` may not stand in a text field, if it may not. The one rule of
/// every text field of every service (names, attribute and property values,
/// campaign and UTM fields, descriptions): no control characters but tab,
/// line feed and carriage return (a NUL ends the string for many readers),
/// and no bidirectional embeddings, overrides or isolates (U+202A–U+202E,
/// U+2066–U+2069), which reorder how the surrounding text is displayed and
/// so can disguise it. Marks that only attach to neighbours (U+200E, U+200F,
/// zero-width joiners) stay allowed: scripts and emoji need them.
pub fn forbidden_in_text(c: char) -> Option<&'static str> {
    match c {
        '\t' | '\n' | '\r' => None,
        c if c.is_control() => Some("contains a control character"),
        '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
            Some("contains a bidirectional override or isolate (U+202A-U+202E, U+2066-U+2069)")
        }
        _ => None,
    }
}

/// A text of at most `max` characters (`required`: at least one), with no
/// character that [`forbidden_in_text`] refuses.
pub fn text(field: &str, value: &str, required: bool, max: usize) -> Result<(), FieldViolation> {
    if required && value.trim().is_empty() {
        return Err(FieldViolation::with_reason(
            field,
            "REQUIRED",
            "is required",
        ));
    }
    let length = value.chars().count();
    if length > max {
        return Err(FieldViolation::with_reason(
            field,
            "TOO_LONG",
            format!("is {length} characters long, at most {max} are allowed"),
        ));
    }
    if let Some(problem) = value.chars().find_map(forbidden_in_text) {
        return Err(FieldViolation::with_reason(
            field,
            "INVALID_FORMAT",
            problem,
        ));
    }
    Ok(())
}

/// A token of 1 to `max` characters of `[a-z0-9_.-]` (sources, purposes).
pub fn token(field: &str, value: &str, max: usize) -> Result<(), FieldViolation> {
    if value.is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    if value.len() > max {
        return Err(FieldViolation::new(
            field,
            format!("is longer than {max} characters"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(FieldViolation::new(
            field,
            "may only contain a-z, 0-9, '_', '.' and '-'",
        ));
    }
    Ok(())
}

/// A known value of a protobuf enum (prost keeps unknown numbers as `i32`).
pub fn enum_value<E>(field: &str, raw: i32, allow_unspecified: bool) -> Result<E, FieldViolation>
where
    E: TryFrom<i32> + Default + PartialEq,
{
    match E::try_from(raw) {
        Ok(value) if !allow_unspecified && value == E::default() => {
            Err(FieldViolation::new(field, "is required"))
        }
        Ok(value) => Ok(value),
        Err(_) => Err(FieldViolation::new(
            field,
            format!("{raw} is not a known value"),
        )),
    }
}

/// A page size: 0 means `default`, above `max` is an error.
pub fn page_size(field: &str, raw: i32, default: u32, max: u32) -> Result<u32, FieldViolation> {
    match raw {
        0 => Ok(default),
        n if n < 0 => Err(FieldViolation::new(field, "must not be negative")),
        n if n as u32 > max => Err(FieldViolation::new(field, format!("must be at most {max}"))),
        n => Ok(n as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids() {
        assert_eq!(uuid("id", "").unwrap_err().description, "is required");
        assert_eq!(
            uuid("id", "nope").unwrap_err().description,
            "is not a valid UUID"
        );
        assert!(uuid("id", "0190a8a0-7c4e-7b3a-9c1d-2f3e4a5b6c7d").is_ok());
    }

    #[test]
    fn texts_and_tokens() {
        assert!(text("f", "", false, 3).is_ok());
        assert!(text("f", " ", true, 3).is_err());
        assert!(text("f", "abcd", false, 3).is_err());
        assert!(text("f", "a\u{0}b", false, 3).is_err());
        assert!(text("f", "Love\u{202e}lace", false, 30).is_err());
        assert!(text("f", "a\u{2066}b", false, 30).is_err());
        assert!(text("f", "line one\r\nline two\tend", false, 30).is_ok());
        assert!(text("f", "👩\u{200d}💻 \u{200f}عربي", false, 30).is_ok());
        assert_eq!(
            text("f", "a\u{7}", false, 30).unwrap_err().reason,
            "INVALID_FORMAT"
        );
        assert!(token("f", "email_marketing", 64).is_ok());
        assert!(token("f", "Email", 64).is_err());
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size("page_size", 0, 100, 1000).unwrap(), 100);
        assert_eq!(page_size("page_size", 5, 100, 1000).unwrap(), 5);
        assert!(page_size("page_size", 1001, 100, 1000).is_err());
        assert!(page_size("page_size", -1, 100, 1000).is_err());
    }
}
