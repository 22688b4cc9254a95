//! Generated protobuf messages and gRPC clients and servers for every clm
//! contract under `proto/`, mirroring the protobuf package tree, plus the
//! encoded descriptor set that server reflection serves.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// The encoded `FileDescriptorSet` of every clm contract and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/clm_descriptor.bin"));

/// Values the contracts document in prose rather than as enums.
pub mod vocabulary {
    /// The documented touchpoint types (`clm.touchpoint.v1.Touchpoint.type`),
    /// in contract order. Other types must be custom: [`CUSTOM_TYPE_PREFIX`].
    pub const TOUCHPOINT_TYPES: &[&str] = &[
        "page_view",
        "ad_click",
        "social_engagement",
        "content_view",
        "content_download",
        "form_submit",
        "newsletter_signup",
        "email_open",
        "email_click",
        "demo_request",
        "pricing_view",
        "proposal_sent",
        "contract_signed",
        "purchase",
        "renewal",
        "cancellation",
        "refund",
        "onboarding_completed",
        "product_usage",
        "support_ticket_opened",
        "support_ticket_resolved",
        "referral",
        "review",
        "case_study",
        "nps_response",
        "csat_response",
        "ces_response",
    ];

    /// The prefix of custom touchpoint types, e.g. `custom.webinar`.
    pub const CUSTOM_TYPE_PREFIX: &str = "custom.";

    /// The active ISO 4217 alphabetic currency codes.
    pub const CURRENCIES: &[&str] = &[
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
}

/// The `clm.*` protobuf packages. Their doc comments are the contract's
/// comments, written for every language's readers (`custom.<name>`), not as
/// rustdoc markup.
#[allow(
    rustdoc::invalid_html_tags,
    rustdoc::bare_urls,
    rustdoc::broken_intra_doc_links
)]
pub mod clm {
    /// Messages shared by every service.
    pub mod common {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/clm.common.v1.rs"));
        }
    }
    /// The identity (customers) service.
    pub mod identity {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/clm.identity.v1.rs"));
        }
    }
    /// The touchpoints service.
    pub mod touchpoint {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/clm.touchpoint.v1.rs"));
        }
    }
    /// The lifecycle stage scoring service.
    pub mod scoring {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/clm.scoring.v1.rs"));
        }
    }
    /// The feedback (surveys) service.
    pub mod feedback {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/clm.feedback.v1.rs"));
        }
    }
    /// The metrics service.
    pub mod metrics {
        /// Version 1.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/clm.metrics.v1.rs"));
        }
    }
}

pub use clm::common::v1 as common;
pub use clm::feedback::v1 as feedback;
pub use clm::identity::v1 as identity;
pub use clm::metrics::v1 as metrics;
pub use clm::scoring::v1 as scoring;
pub use clm::touchpoint::v1 as touchpoint;
