//! The touchpoint types and channels the feature map is keyed by.
//!
//! The type list is the contract's (`clm_proto::vocabulary`), shared with the
//! touchpoints service.

use clm_proto::touchpoint::Channel;

/// The documented touchpoint types, in contract order.
pub const KNOWN_TYPES: &[&str] = clm_proto::vocabulary::TOUCHPOINT_TYPES;

/// The prefix of custom touchpoint types, e.g. `custom.webinar`.
pub const CUSTOM_PREFIX: &str = clm_proto::vocabulary::CUSTOM_TYPE_PREFIX;

/// The types that count as purchases for `days_since_last_purchase`.
pub const PURCHASE_TYPES: &[&str] = &["purchase", "contract_signed", "renewal"];

/// The types whose first occurrence is the customer's conversion.
pub const CONVERSION_TYPES: &[&str] = &["purchase", "contract_signed"];

/// The type that subtracts its revenue from the net revenue.
pub const REFUND_TYPE: &str = "refund";

/// The type that marks a cancellation.
pub const CANCELLATION_TYPE: &str = "cancellation";

/// The type that opens a support ticket.
pub const SUPPORT_TICKET_OPENED_TYPE: &str = "support_ticket_opened";

/// The type that resolves a support ticket.
pub const SUPPORT_TICKET_RESOLVED_TYPE: &str = "support_ticket_resolved";

/// The channel names rules see, lower case, in contract order.
pub const CHANNELS: &[&str] = &[
    "web",
    "email",
    "social",
    "search",
    "ads",
    "phone",
    "in_person",
    "chat",
    "support",
    "product",
    "referral",
    "other",
];

/// True for a documented type or a well-formed `custom.<name>` type.
pub fn is_touchpoint_type(kind: &str) -> bool {
    if KNOWN_TYPES.contains(&kind) {
        return true;
    }
    kind.strip_prefix(CUSTOM_PREFIX).is_some_and(|name| {
        (1..=57).contains(&name.len())
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
            })
    })
}

/// The lower-case name of a channel as rules see it; unspecified counts as
/// `other`.
pub fn channel_name(channel: Channel) -> &'static str {
    match channel {
        Channel::Web => "web",
        Channel::Email => "email",
        Channel::Social => "social",
        Channel::Search => "search",
        Channel::Ads => "ads",
        Channel::Phone => "phone",
        Channel::InPerson => "in_person",
        Channel::Chat => "chat",
        Channel::Support => "support",
        Channel::Product => "product",
        Channel::Referral => "referral",
        Channel::Other | Channel::Unspecified => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_follow_the_contract() {
        for (index, name) in CHANNELS.iter().enumerate() {
            let channel = Channel::try_from(index as i32 + 1).unwrap();
            assert_eq!(channel_name(channel), *name);
            assert_eq!(
                channel.as_str_name(),
                format!("CHANNEL_{}", name.to_uppercase())
            );
        }
    }

    #[test]
    fn types() {
        assert!(is_touchpoint_type("purchase"));
        assert!(is_touchpoint_type("custom.webinar"));
        assert!(!is_touchpoint_type("custom."));
        assert!(!is_touchpoint_type("Purchase"));
        assert!(!is_touchpoint_type("webinar"));
    }
}
