//! The documented touchpoint types and the ISO 4217 currency codes.

/// The documented touchpoint types, in contract order.
pub const KNOWN_TYPES: &[&str] = clm_proto::vocabulary::TOUCHPOINT_TYPES;

/// The prefix of custom touchpoint types, e.g. `custom.webinar`.
pub const CUSTOM_PREFIX: &str = clm_proto::vocabulary::CUSTOM_TYPE_PREFIX;

/// Why a type is not acceptable, if it is not.
pub fn type_problem(kind: &str) -> Option<&'static str> {
    if kind.is_empty() {
        return Some("is required");
    }
    if KNOWN_TYPES.contains(&kind) {
        return None;
    }
    match kind.strip_prefix(CUSTOM_PREFIX) {
        Some(name)
            if (1..=57).contains(&name.len())
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
                }) =>
        {
            None
        }
        Some(_) => {
            Some("a custom type is `custom.` and 1 to 57 characters of a-z, 0-9, '_', '.', '-'")
        }
        None => Some("is not a documented type; use a documented one or `custom.<name>`"),
    }
}

pub use clm_proto::vocabulary::is_currency;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currencies_are_sorted_and_checked() {
        assert!(
            clm_proto::vocabulary::CURRENCIES
                .windows(2)
                .all(|w| w[0] < w[1])
        );
        assert!(is_currency("EUR") && is_currency("JPY"));
        assert!(!is_currency("eur") && !is_currency("XXX") && !is_currency("EURO"));
    }

    #[test]
    fn types() {
        assert_eq!(type_problem("purchase"), None);
        assert_eq!(type_problem("custom.trial_started"), None);
        assert!(type_problem("").is_some());
        assert!(type_problem("Purchase").is_some());
        assert!(type_problem("custom.").is_some());
        assert!(type_problem("custom.Bad Name").is_some());
    }
}
