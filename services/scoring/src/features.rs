//! What the engine knows about one customer, folded incrementally from the
//! customer's touchpoints, survey answers and profile.
//!
//! [`CustomerFeatures`] is the state the scoring service stores per customer
//! (it is `serde`-serializable) and the input of every evaluation. It holds
//! no touchpoint ids, so [`CustomerFeatures::apply`] is **not idempotent**:
//! applying a touchpoint twice counts it twice. The caller deduplicates by
//! touchpoint id before applying (the scoring service commits the log cursor
//! with the features in one transaction), and can cross-check with
//! [`CustomerFeatures::touchpoint_count`], which grows by exactly one per
//! applied touchpoint.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use clm_proto::touchpoint::Channel;
use serde::{Deserialize, Serialize};

use crate::activity::ActivityHistory;
use crate::vocabulary::{
    CANCELLATION_TYPE, CONVERSION_TYPES, PURCHASE_TYPES, REFUND_TYPE, SUPPORT_TICKET_OPENED_TYPE,
    SUPPORT_TICKET_RESOLVED_TYPE, channel_name,
};

/// The facts of one touchpoint the engine uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TouchpointFacts<'a> {
    /// The touchpoint type: documented, or `custom.<name>`.
    pub touchpoint_type: &'a str,
    /// The channel it happened on.
    pub channel: Channel,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// The revenue it brought (for a refund: paid back), if any.
    pub revenue: Option<Money<'a>>,
}

/// An amount of money in one currency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Money<'a> {
    /// ISO 4217 code, e.g. `"EUR"`.
    pub currency_code: &'a str,
    /// Millionths of the major unit.
    pub amount_micros: i64,
}

impl<'a> TouchpointFacts<'a> {
    /// The facts of a stored touchpoint from the touchpoint log; `None`
    /// without an occur time (stored touchpoints always have one).
    pub fn from_proto(touchpoint: &'a clm_proto::touchpoint::Touchpoint) -> Option<Self> {
        Self::from_parts(
            &touchpoint.r#type,
            touchpoint.channel(),
            touchpoint.occur_time.as_ref(),
            touchpoint.revenue.as_ref(),
        )
    }

    fn from_parts(
        touchpoint_type: &'a str,
        channel: Channel,
        occur_time: Option<&prost_types::Timestamp>,
        revenue: Option<&'a clm_proto::common::Money>,
    ) -> Option<Self> {
        let occur_time = occur_time?;
        let occurred_at =
            DateTime::from_timestamp(occur_time.seconds, occur_time.nanos.max(0) as u32)?;
        Some(Self {
            touchpoint_type,
            channel,
            occurred_at,
            revenue: revenue.map(|money| Money {
                currency_code: &money.currency_code,
                amount_micros: money.amount_micros,
            }),
        })
    }

    /// The facts of a "touchpoint recorded" entry of the touchpoint log;
    /// `None` without an occur time (the log always has one).
    pub fn from_recorded(recorded: &'a clm_proto::touchpoint::TouchpointRecorded) -> Option<Self> {
        Self::from_parts(
            &recorded.r#type,
            recorded.channel(),
            recorded.occur_time.as_ref(),
            recorded.revenue.as_ref(),
        )
    }
}

/// The latest answer to one kind of survey.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurveyAnswer {
    /// The score given: NPS 0..10, CSAT 1..5, CES 1..7.
    pub score: i64,
    /// When it was given.
    #[serde(with = "crate::stored_time")]
    pub answered_at: DateTime<Utc>,
}

/// What the identity profile says about the customer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileFacts {
    /// The customer has an identity key that is not an anonymous id.
    pub identified: bool,
    /// The company, `""` when unknown.
    pub company: String,
    /// The industry, `""` when unknown.
    pub industry: String,
    /// The job title, `""` when unknown.
    pub job_title: String,
    /// The profile's free attributes.
    pub attributes: BTreeMap<String, String>,
}

/// Everything the engine knows about one customer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerFeatures {
    /// Touchpoints per type.
    by_type: BTreeMap<String, ActivityHistory>,
    /// Touchpoints per channel name.
    by_channel: BTreeMap<String, ActivityHistory>,
    #[serde(with = "crate::stored_time::option")]
    first_touch_at: Option<DateTime<Utc>>,
    #[serde(with = "crate::stored_time::option")]
    last_touch_at: Option<DateTime<Utc>>,
    /// The first purchase or contract_signed.
    #[serde(with = "crate::stored_time::option")]
    converted_at: Option<DateTime<Utc>>,
    /// The latest purchase, contract_signed or renewal.
    #[serde(with = "crate::stored_time::option")]
    last_purchase_at: Option<DateTime<Utc>>,
    #[serde(with = "crate::stored_time::option")]
    last_cancellation_at: Option<DateTime<Utc>>,
    /// Net revenue (revenue minus refunds) per currency, in micros, carried
    /// in 128 bits so that no sum of 64-bit amounts overflows (2^64 of the
    /// largest amount fit). Stored as postcard varints, which read the
    /// 64-bit sums stored before unchanged.
    revenue_micros: BTreeMap<String, i128>,
    nps: Option<SurveyAnswer>,
    csat: Option<SurveyAnswer>,
    ces: Option<SurveyAnswer>,
    profile: ProfileFacts,
}

impl CustomerFeatures {
    /// A customer the engine knows nothing about.
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one touchpoint in. Not idempotent: see the module docs.
    pub fn apply(&mut self, touchpoint: &TouchpointFacts<'_>) {
        let at = touchpoint.occurred_at;
        let kind = touchpoint.touchpoint_type;
        history_of(&mut self.by_type, kind).record(at);
        history_of(&mut self.by_channel, channel_name(touchpoint.channel)).record(at);
        self.first_touch_at = earliest(self.first_touch_at, Some(at));
        self.last_touch_at = latest(self.last_touch_at, Some(at));
        if CONVERSION_TYPES.contains(&kind) {
            self.converted_at = earliest(self.converted_at, Some(at));
        }
        if PURCHASE_TYPES.contains(&kind) {
            self.last_purchase_at = latest(self.last_purchase_at, Some(at));
        }
        if kind == CANCELLATION_TYPE {
            self.last_cancellation_at = latest(self.last_cancellation_at, Some(at));
        }
        if let Some(money) = touchpoint.revenue {
            let amount = i128::from(money.amount_micros);
            let signed = if kind == REFUND_TYPE { -amount } else { amount };
            let net = self
                .revenue_micros
                .entry(money.currency_code.to_owned())
                .or_default();
            *net += signed;
        }
    }

    /// Adds everything known about `other` (a customer merged into this
    /// one): counts and revenue add up, first times take the earliest, last
    /// times and survey answers the latest. This customer's profile wins;
    /// what it lacks comes from `other`'s.
    pub fn merge(&mut self, other: &CustomerFeatures) {
        for (kind, history) in &other.by_type {
            history_of(&mut self.by_type, kind).merge(history);
        }
        for (channel, history) in &other.by_channel {
            history_of(&mut self.by_channel, channel).merge(history);
        }
        self.first_touch_at = earliest(self.first_touch_at, other.first_touch_at);
        self.last_touch_at = latest(self.last_touch_at, other.last_touch_at);
        self.converted_at = earliest(self.converted_at, other.converted_at);
        self.last_purchase_at = latest(self.last_purchase_at, other.last_purchase_at);
        self.last_cancellation_at = latest(self.last_cancellation_at, other.last_cancellation_at);
        for (currency, micros) in &other.revenue_micros {
            let net = self.revenue_micros.entry(currency.clone()).or_default();
            *net += *micros;
        }
        self.nps = newer_answer(self.nps, other.nps);
        self.csat = newer_answer(self.csat, other.csat);
        self.ces = newer_answer(self.ces, other.ces);
        let profile = &mut self.profile;
        profile.identified |= other.profile.identified;
        for (mine, theirs) in [
            (&mut profile.company, &other.profile.company),
            (&mut profile.industry, &other.profile.industry),
            (&mut profile.job_title, &other.profile.job_title),
        ] {
            if mine.is_empty() {
                mine.clone_from(theirs);
            }
        }
        for (key, value) in &other.profile.attributes {
            profile
                .attributes
                .entry(key.clone())
                .or_insert_with(|| value.clone());
        }
    }

    /// Records an NPS answer (0..10); an answer older than the one kept is
    /// ignored.
    pub fn record_nps(&mut self, score: i64, answered_at: DateTime<Utc>) {
        self.nps = newer_answer(self.nps, Some(SurveyAnswer { score, answered_at }));
    }

    /// Records a CSAT answer (1..5); an answer older than the one kept is
    /// ignored.
    pub fn record_csat(&mut self, score: i64, answered_at: DateTime<Utc>) {
        self.csat = newer_answer(self.csat, Some(SurveyAnswer { score, answered_at }));
    }

    /// Records a CES answer (1..7); an answer older than the one kept is
    /// ignored.
    pub fn record_ces(&mut self, score: i64, answered_at: DateTime<Utc>) {
        self.ces = newer_answer(self.ces, Some(SurveyAnswer { score, answered_at }));
    }

    /// Replaces the profile facts (from the identity service).
    pub fn set_profile(&mut self, profile: ProfileFacts) {
        self.profile = profile;
    }

    /// The profile facts.
    pub fn profile(&self) -> &ProfileFacts {
        &self.profile
    }

    /// How many touchpoints were applied (merged ones included).
    pub fn touchpoint_count(&self) -> u64 {
        self.by_type.values().map(ActivityHistory::total).sum()
    }

    /// The touchpoints of one type, `None` if none was ever applied.
    pub fn type_history(&self, kind: &str) -> Option<&ActivityHistory> {
        self.by_type.get(kind)
    }

    /// The types seen, with their histories, in name order.
    pub fn type_histories(&self) -> impl Iterator<Item = (&str, &ActivityHistory)> {
        self.by_type
            .iter()
            .map(|(kind, history)| (kind.as_str(), history))
    }

    /// The touchpoints of one channel (lower-case name), `None` if none.
    pub fn channel_history(&self, channel: &str) -> Option<&ActivityHistory> {
        self.by_channel.get(channel)
    }

    /// All touchpoints of one type ever applied.
    pub fn total_of(&self, kind: &str) -> u64 {
        self.by_type.get(kind).map_or(0, ActivityHistory::total)
    }

    /// The earliest touchpoint's time.
    pub fn first_touch_at(&self) -> Option<DateTime<Utc>> {
        self.first_touch_at
    }

    /// The latest touchpoint's time.
    pub fn last_touch_at(&self) -> Option<DateTime<Utc>> {
        self.last_touch_at
    }

    /// The first purchase or contract_signed.
    pub fn converted_at(&self) -> Option<DateTime<Utc>> {
        self.converted_at
    }

    /// The latest purchase, contract_signed or renewal.
    pub fn last_purchase_at(&self) -> Option<DateTime<Utc>> {
        self.last_purchase_at
    }

    /// The latest cancellation.
    pub fn last_cancellation_at(&self) -> Option<DateTime<Utc>> {
        self.last_cancellation_at
    }

    /// True when the latest cancellation is later than the latest purchase,
    /// contract_signed or renewal (or there is none): the customer cancelled
    /// and has not bought again since.
    pub fn cancelled(&self) -> bool {
        match (self.last_cancellation_at, self.last_purchase_at) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(cancelled), Some(purchased)) => cancelled > purchased,
        }
    }

    /// Net revenue per currency, in micros.
    pub fn revenue_micros(&self) -> &BTreeMap<String, i128> {
        &self.revenue_micros
    }

    /// support_ticket_opened minus support_ticket_resolved, at least 0.
    pub fn open_support_tickets(&self) -> u64 {
        self.total_of(SUPPORT_TICKET_OPENED_TYPE)
            .saturating_sub(self.total_of(SUPPORT_TICKET_RESOLVED_TYPE))
    }

    /// The latest NPS answer.
    pub fn nps(&self) -> Option<SurveyAnswer> {
        self.nps
    }

    /// The latest CSAT answer.
    pub fn csat(&self) -> Option<SurveyAnswer> {
        self.csat
    }

    /// The latest CES answer.
    pub fn ces(&self) -> Option<SurveyAnswer> {
        self.ces
    }
}

fn history_of<'m>(
    histories: &'m mut BTreeMap<String, ActivityHistory>,
    key: &str,
) -> &'m mut ActivityHistory {
    if !histories.contains_key(key) {
        histories.insert(key.to_owned(), ActivityHistory::default());
    }
    histories.get_mut(key).expect("inserted above")
}

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn latest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    a.max(b)
}

/// The newer of two answers; on a tie, the second (the one recorded last).
fn newer_answer(kept: Option<SurveyAnswer>, new: Option<SurveyAnswer>) -> Option<SurveyAnswer> {
    match (kept, new) {
        (Some(kept), Some(new)) if kept.answered_at > new.answered_at => Some(kept),
        (kept, new) => new.or(kept),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn day(n: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 3, 1, 9, 0, 0).unwrap() + Duration::days(n)
    }

    fn touch(kind: &str, channel: Channel, at: DateTime<Utc>) -> TouchpointFacts<'_> {
        TouchpointFacts {
            touchpoint_type: kind,
            channel,
            occurred_at: at,
            revenue: None,
        }
    }

    fn paid<'a>(
        kind: &'a str,
        at: DateTime<Utc>,
        currency: &'a str,
        micros: i64,
    ) -> TouchpointFacts<'a> {
        TouchpointFacts {
            revenue: Some(Money {
                currency_code: currency,
                amount_micros: micros,
            }),
            ..touch(kind, Channel::Web, at)
        }
    }

    #[test]
    fn revenue_sums_are_exact_at_any_size() {
        // Two purchases of the largest amount once summed to one of them.
        let mut features = CustomerFeatures::new();
        features.apply(&paid("purchase", day(1), "EUR", i64::MAX));
        features.apply(&paid("purchase", day(2), "EUR", i64::MAX));
        assert_eq!(features.revenue_micros()["EUR"], 2 * i128::from(i64::MAX));
        let mut survivor = features.clone();
        survivor.merge(&features);
        assert_eq!(survivor.revenue_micros()["EUR"], 4 * i128::from(i64::MAX));
        features.apply(&paid("refund", day(3), "EUR", i64::MAX));
        assert_eq!(features.revenue_micros()["EUR"], i128::from(i64::MAX));
    }

    #[test]
    fn revenue_stored_in_64_bits_reads_back_the_same() {
        let before: BTreeMap<String, i64> =
            [("EUR".to_owned(), i64::MAX), ("USD".to_owned(), -5)].into();
        let stored = postcard::to_allocvec(&before).unwrap();
        let read: BTreeMap<String, i128> = postcard::from_bytes(&stored).unwrap();
        assert_eq!(read["EUR"], i128::from(i64::MAX));
        assert_eq!(read["USD"], -5);
    }

    #[test]
    fn applies_touchpoints() {
        let mut features = CustomerFeatures::new();
        features.apply(&touch("page_view", Channel::Web, day(0)));
        features.apply(&paid("purchase", day(3), "EUR", 50_000_000));
        features.apply(&paid("refund", day(4), "EUR", 10_000_000));
        features.apply(&touch("support_ticket_opened", Channel::Support, day(5)));
        features.apply(&touch("support_ticket_opened", Channel::Support, day(5)));
        features.apply(&touch("support_ticket_resolved", Channel::Support, day(6)));
        features.apply(&touch("cancellation", Channel::Email, day(7)));

        assert_eq!(features.touchpoint_count(), 7);
        assert_eq!(features.first_touch_at(), Some(day(0)));
        assert_eq!(features.last_touch_at(), Some(day(7)));
        assert_eq!(features.converted_at(), Some(day(3)));
        assert_eq!(features.revenue_micros()["EUR"], 40_000_000);
        assert_eq!(features.open_support_tickets(), 1);
        assert!(features.cancelled());
        assert_eq!(features.channel_history("support").unwrap().total(), 3);

        features.apply(&paid("purchase", day(8), "USD", 1_000_000));
        assert!(!features.cancelled());
        assert_eq!(features.last_purchase_at(), Some(day(8)));
    }

    #[test]
    fn merge_combines_two_customers() {
        let mut survivor = CustomerFeatures::new();
        survivor.apply(&touch("page_view", Channel::Web, day(10)));
        survivor.apply(&paid("purchase", day(12), "EUR", 5_000_000));
        survivor.record_nps(6, day(12));
        survivor.set_profile(ProfileFacts {
            identified: true,
            company: "Acme".into(),
            ..ProfileFacts::default()
        });

        let mut merged = CustomerFeatures::new();
        merged.apply(&touch("page_view", Channel::Web, day(1)));
        merged.apply(&paid("purchase", day(2), "EUR", 7_000_000));
        merged.record_nps(10, day(20));
        merged.set_profile(ProfileFacts {
            company: "Other".into(),
            industry: "software".into(),
            ..ProfileFacts::default()
        });

        // the same as one customer with every touchpoint
        let mut expected = CustomerFeatures::new();
        for facts in [
            touch("page_view", Channel::Web, day(1)),
            paid("purchase", day(2), "EUR", 7_000_000),
            touch("page_view", Channel::Web, day(10)),
            paid("purchase", day(12), "EUR", 5_000_000),
        ] {
            expected.apply(&facts);
        }

        survivor.merge(&merged);
        assert_eq!(survivor.by_type, expected.by_type);
        assert_eq!(survivor.by_channel, expected.by_channel);
        assert_eq!(survivor.touchpoint_count(), 4);
        assert_eq!(survivor.first_touch_at(), Some(day(1)));
        assert_eq!(survivor.last_touch_at(), Some(day(12)));
        assert_eq!(survivor.converted_at(), Some(day(2)));
        assert_eq!(survivor.revenue_micros()["EUR"], 12_000_000);
        assert_eq!(survivor.nps().unwrap().score, 10);
        assert_eq!(survivor.profile().company, "Acme");
        assert_eq!(survivor.profile().industry, "software");
        assert!(survivor.profile().identified);
    }

    #[test]
    fn survives_serialization() {
        let mut features = CustomerFeatures::new();
        features.apply(&paid("purchase", day(1), "JPY", 3_000_000_000));
        features.record_csat(4, day(2));
        let json = serde_json::to_string(&features).unwrap();
        let back: CustomerFeatures = serde_json::from_str(&json).unwrap();
        assert_eq!(back, features);
    }

    #[test]
    fn older_answers_do_not_replace_newer_ones() {
        let mut features = CustomerFeatures::new();
        features.record_nps(9, day(5));
        features.record_nps(3, day(1));
        assert_eq!(features.nps().unwrap().score, 9);
    }
}
