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

/// The active ISO 4217 alphabetic currency codes.
const CURRENCIES: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD",
    "CAD", "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY", "COP", "COU", "CRC", "CUP", "CVE",
    "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL",
    "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR",
    "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD",
    "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK",
    "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO",
    "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON",
    "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD",
    "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD",
    "TZS", "UAH", "UGX", "USD", "USN", "UYI", "UYU", "UYW", "UZS", "VED", "VES", "VND", "VUV",
    "WST", "XAF", "XAG", "XAU", "XBA", "XBB", "XBC", "XBD", "XCD", "XCG", "XDR", "XOF", "XPD",
    "XPF", "XPT", "XSU", "XUA", "YER", "ZAR", "ZMW", "ZWG",
];

/// True for an active ISO 4217 code.
pub fn is_currency(code: &str) -> bool {
    CURRENCIES.binary_search(&code).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currencies_are_sorted_and_checked() {
        assert!(CURRENCIES.windows(2).all(|w| w[0] < w[1]));
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
