//! Opaque page tokens: the position after the last item of a page, bound to
//! the filter it was issued for so that it cannot be replayed with another.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::FieldViolation;

#[derive(Serialize, Deserialize)]
struct Envelope<P> {
    /// A fingerprint of the request's filter.
    f: u64,
    /// Where the next page starts.
    p: P,
}

/// A stable fingerprint of anything serialisable (a request's filter).
pub fn fingerprint<T: Serialize>(filter: &T) -> u64 {
    // FNV-1a over the JSON form: stable across processes and versions.
    let bytes = serde_json::to_vec(filter).unwrap_or_default();
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Encodes the position `position` for a request whose filter has
/// fingerprint `filter`.
pub fn encode<P: Serialize>(filter: u64, position: &P) -> String {
    let json = serde_json::to_vec(&Envelope {
        f: filter,
        p: position,
    })
    .unwrap_or_default();
    URL_SAFE_NO_PAD.encode(json)
}

/// Decodes a page token; an empty token is the first page (`None`).
pub fn decode<P: DeserializeOwned>(
    field: &str,
    token: &str,
    filter: u64,
) -> Result<Option<P>, FieldViolation> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || FieldViolation::new(field, "is not a token returned by this call");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let envelope: Envelope<P> = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    if envelope.f != filter {
        return Err(FieldViolation::new(
            field,
            "was issued for a different filter",
        ));
    }
    Ok(Some(envelope.p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_filter_binding() {
        let filter = fingerprint(&("ACTIVE", 3));
        let token = encode(filter, &("2024-01-01", 42_i64));
        let position: Option<(String, i64)> = decode("page_token", &token, filter).unwrap();
        assert_eq!(position, Some(("2024-01-01".to_owned(), 42)));
        assert!(decode::<(String, i64)>("page_token", &token, filter + 1).is_err());
        assert!(decode::<(String, i64)>("page_token", "garbage!", filter).is_err());
        assert_eq!(
            decode::<(String, i64)>("page_token", "", filter).unwrap(),
            None
        );
    }
}
