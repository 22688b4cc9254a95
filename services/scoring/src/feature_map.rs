//! The feature map rules see: the documented names and types (the schema the
//! type checker uses), their values for one customer at one time, and those
//! values as CEL variables or flattened for explanations.
//!
//! The map is the one documented on `clm.scoring.v1.Model`, plus two
//! cancellation features the default model needs to tell a cancelled
//! customer from one who bought again:
//!
//! - `days_since_last_cancellation`: int, -1 when never;
//! - `cancelled`: bool, the latest cancellation is later than the latest
//!   purchase, contract_signed or renewal.
//!
//! Rolling windows (`'7d'` ...) count whole UTC calendar days up to and
//! including the day of the evaluation; `days_since_*` are whole days
//! elapsed (rounded down), -1 for "never".

use std::collections::{BTreeMap, HashMap};

use cel::common::types::{CelBool, CelDouble, CelInt, CelMap, CelMapKey, CelString};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use chrono::{DateTime, Utc};

use crate::activity::{ActivityHistory, SECONDS_PER_DAY};
use crate::features::CustomerFeatures;
use crate::lifecycle::LifecycleState;
use crate::scores::Scores;
use crate::vocabulary::{CHANNELS, KNOWN_TYPES};
use crate::window_counts::{CountedBy, WindowCountMap};
use clm_cel::CelType;

/// The rolling windows of `count` and `channel_count`, with their length in
/// days (`None`: all time).
pub const WINDOWS: [(&str, Option<i32>); 5] = [
    ("7d", Some(7)),
    ("30d", Some(30)),
    ("90d", Some(90)),
    ("365d", Some(365)),
    ("all", None),
];

/// One feature of the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(missing_docs)] // each variant is the feature of the same name
pub enum Feature {
    Count,
    ChannelCount,
    DaysSinceFirstTouch,
    DaysSinceLastTouch,
    DaysSinceLastPurchase,
    DaysSinceConversion,
    DaysSinceLastCancellation,
    Cancelled,
    DaysInStage,
    DaysInHealth,
    Revenue,
    EngagementScore,
    LeadScore,
    HealthScore,
    MqlThreshold,
    SqlThreshold,
    Nps,
    Csat,
    Ces,
    DaysSinceNps,
    DaysSinceCsat,
    DaysSinceCes,
    OpenSupportTickets,
    Stage,
    AcquisitionStatus,
    Health,
    Identified,
    Company,
    Industry,
    JobTitle,
    Attributes,
}

/// How a feature's value changes while time passes and nothing else happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeBehaviour {
    /// It does not change.
    Constant,
    /// Whole days elapsed since an anchor time: steps up by one every 24
    /// hours after the anchor.
    DaysSince,
    /// Rolling-window counts: drop when touchpoints leave a window.
    Windowed,
    /// A score that decays continuously.
    Continuous,
}

impl Feature {
    /// Every feature, in documentation order.
    pub const ALL: [Feature; 31] = [
        Feature::Count,
        Feature::ChannelCount,
        Feature::DaysSinceFirstTouch,
        Feature::DaysSinceLastTouch,
        Feature::DaysSinceLastPurchase,
        Feature::DaysSinceConversion,
        Feature::DaysSinceLastCancellation,
        Feature::Cancelled,
        Feature::DaysInStage,
        Feature::DaysInHealth,
        Feature::Revenue,
        Feature::EngagementScore,
        Feature::LeadScore,
        Feature::HealthScore,
        Feature::MqlThreshold,
        Feature::SqlThreshold,
        Feature::Nps,
        Feature::Csat,
        Feature::Ces,
        Feature::DaysSinceNps,
        Feature::DaysSinceCsat,
        Feature::DaysSinceCes,
        Feature::OpenSupportTickets,
        Feature::Stage,
        Feature::AcquisitionStatus,
        Feature::Health,
        Feature::Identified,
        Feature::Company,
        Feature::Industry,
        Feature::JobTitle,
        Feature::Attributes,
    ];

    /// The name rules use.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Count => "count",
            Feature::ChannelCount => "channel_count",
            Feature::DaysSinceFirstTouch => "days_since_first_touch",
            Feature::DaysSinceLastTouch => "days_since_last_touch",
            Feature::DaysSinceLastPurchase => "days_since_last_purchase",
            Feature::DaysSinceConversion => "days_since_conversion",
            Feature::DaysSinceLastCancellation => "days_since_last_cancellation",
            Feature::Cancelled => "cancelled",
            Feature::DaysInStage => "days_in_stage",
            Feature::DaysInHealth => "days_in_health",
            Feature::Revenue => "revenue",
            Feature::EngagementScore => "engagement_score",
            Feature::LeadScore => "lead_score",
            Feature::HealthScore => "health_score",
            Feature::MqlThreshold => "mql_threshold",
            Feature::SqlThreshold => "sql_threshold",
            Feature::Nps => "nps",
            Feature::Csat => "csat",
            Feature::Ces => "ces",
            Feature::DaysSinceNps => "days_since_nps",
            Feature::DaysSinceCsat => "days_since_csat",
            Feature::DaysSinceCes => "days_since_ces",
            Feature::OpenSupportTickets => "open_support_tickets",
            Feature::Stage => "stage",
            Feature::AcquisitionStatus => "acquisition_status",
            Feature::Health => "health",
            Feature::Identified => "identified",
            Feature::Company => "company",
            Feature::Industry => "industry",
            Feature::JobTitle => "job_title",
            Feature::Attributes => "attributes",
        }
    }

    /// The feature of a name.
    pub fn from_name(name: &str) -> Option<Feature> {
        Feature::ALL
            .into_iter()
            .find(|feature| feature.name() == name)
    }

    /// The feature's CEL type.
    pub fn cel_type(self) -> CelType {
        match self {
            Feature::Count | Feature::ChannelCount => {
                CelType::map(CelType::String, CelType::map(CelType::String, CelType::Int))
            }
            Feature::Revenue => CelType::map(CelType::String, CelType::Double),
            Feature::Attributes => CelType::map(CelType::String, CelType::String),
            Feature::EngagementScore
            | Feature::LeadScore
            | Feature::HealthScore
            | Feature::MqlThreshold
            | Feature::SqlThreshold => CelType::Double,
            Feature::Cancelled | Feature::Identified => CelType::Bool,
            Feature::Stage
            | Feature::AcquisitionStatus
            | Feature::Health
            | Feature::Company
            | Feature::Industry
            | Feature::JobTitle => CelType::String,
            Feature::DaysSinceFirstTouch
            | Feature::DaysSinceLastTouch
            | Feature::DaysSinceLastPurchase
            | Feature::DaysSinceConversion
            | Feature::DaysSinceLastCancellation
            | Feature::DaysInStage
            | Feature::DaysInHealth
            | Feature::Nps
            | Feature::Csat
            | Feature::Ces
            | Feature::DaysSinceNps
            | Feature::DaysSinceCsat
            | Feature::DaysSinceCes
            | Feature::OpenSupportTickets => CelType::Int,
        }
    }

    /// How the feature changes with time alone.
    pub fn time_behaviour(self) -> TimeBehaviour {
        match self {
            Feature::DaysSinceFirstTouch
            | Feature::DaysSinceLastTouch
            | Feature::DaysSinceLastPurchase
            | Feature::DaysSinceConversion
            | Feature::DaysSinceLastCancellation
            | Feature::DaysInStage
            | Feature::DaysInHealth
            | Feature::DaysSinceNps
            | Feature::DaysSinceCsat
            | Feature::DaysSinceCes => TimeBehaviour::DaysSince,
            Feature::Count | Feature::ChannelCount => TimeBehaviour::Windowed,
            Feature::EngagementScore | Feature::LeadScore | Feature::HealthScore => {
                TimeBehaviour::Continuous
            }
            _ => TimeBehaviour::Constant,
        }
    }

    /// True for features that describe the current lifecycle state, which
    /// change when an evaluation moves the customer.
    pub fn depends_on_state(self) -> bool {
        matches!(
            self,
            Feature::Stage
                | Feature::AcquisitionStatus
                | Feature::Health
                | Feature::DaysInStage
                | Feature::DaysInHealth
        )
    }

    fn bit(self) -> u64 {
        1 << (self as u32)
    }
}

/// A set of features, e.g. those a model's rules reference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeatureSet(u64);

impl FeatureSet {
    /// Adds a feature.
    pub fn insert(&mut self, feature: Feature) {
        self.0 |= feature.bit();
    }

    /// Adds every feature of `other`.
    pub fn extend(&mut self, other: FeatureSet) {
        self.0 |= other.0;
    }

    /// True when the feature is in the set.
    pub fn contains(self, feature: Feature) -> bool {
        self.0 & feature.bit() != 0
    }

    /// The features of the set, in documentation order.
    pub fn iter(self) -> impl Iterator<Item = Feature> {
        Feature::ALL
            .into_iter()
            .filter(move |feature| self.contains(*feature))
    }
}

/// The value of one flattened feature, for explanations.
#[derive(Clone, Debug, PartialEq)]
pub enum FeatureValue {
    /// Counts, days.
    Int(i64),
    /// Scores, revenue.
    Double(f64),
    /// Flags.
    Bool(bool),
    /// Stage, health, profile fields.
    String(String),
}

/// A customer's features as rules see them at one time.
#[derive(Clone, Copy, Debug)]
pub struct FeatureContext<'a> {
    /// What is known about the customer.
    pub features: &'a CustomerFeatures,
    /// The evaluation time.
    pub now: DateTime<Utc>,
    /// The customer's lifecycle state the rules see.
    pub state: LifecycleState,
    /// The scores computed by the model.
    pub scores: Scores,
    /// The model's MQL threshold.
    pub mql_threshold: f64,
    /// The model's SQL threshold.
    pub sql_threshold: f64,
}

/// Whole days from `since` to `now`, rounded down, at least 0; -1 for never.
pub fn whole_days_since(since: Option<DateTime<Utc>>, now: DateTime<Utc>) -> i64 {
    match since {
        None => -1,
        Some(since) => (now - since).num_seconds().max(0) / SECONDS_PER_DAY,
    }
}

impl<'a> FeatureContext<'a> {
    /// The anchor time of a [`TimeBehaviour::DaysSince`] feature.
    pub fn anchor(&self, feature: Feature) -> Option<DateTime<Utc>> {
        let features = self.features;
        match feature {
            Feature::DaysSinceFirstTouch => features.first_touch_at(),
            Feature::DaysSinceLastTouch => features.last_touch_at(),
            Feature::DaysSinceLastPurchase => features.last_purchase_at(),
            Feature::DaysSinceConversion => features.converted_at(),
            Feature::DaysSinceLastCancellation => features.last_cancellation_at(),
            Feature::DaysInStage => self.state.stage_entered_at,
            Feature::DaysInHealth => self.state.health_entered_at,
            Feature::DaysSinceNps => features.nps().map(|answer| answer.answered_at),
            Feature::DaysSinceCsat => features.csat().map(|answer| answer.answered_at),
            Feature::DaysSinceCes => features.ces().map(|answer| answer.answered_at),
            _ => None,
        }
    }

    /// The value of an int feature; `None` for features of other types.
    pub fn int(&self, feature: Feature) -> Option<i64> {
        let survey = |answer: Option<crate::features::SurveyAnswer>| answer.map_or(-1, |a| a.score);
        Some(match feature {
            Feature::Nps => survey(self.features.nps()),
            Feature::Csat => survey(self.features.csat()),
            Feature::Ces => survey(self.features.ces()),
            Feature::OpenSupportTickets => {
                i64::try_from(self.features.open_support_tickets()).unwrap_or(i64::MAX)
            }
            _ if feature.time_behaviour() == TimeBehaviour::DaysSince => {
                whole_days_since(self.anchor(feature), self.now)
            }
            _ => return None,
        })
    }

    /// The value of a double feature; `None` for features of other types.
    pub fn double(&self, feature: Feature) -> Option<f64> {
        Some(match feature {
            Feature::EngagementScore => self.scores.engagement,
            Feature::LeadScore => self.scores.lead,
            Feature::HealthScore => self.scores.health,
            Feature::MqlThreshold => self.mql_threshold,
            Feature::SqlThreshold => self.sql_threshold,
            _ => return None,
        })
    }

    /// The value of a string feature; `None` for features of other types.
    pub fn string(&self, feature: Feature) -> Option<&'a str> {
        let profile = self.features.profile();
        Some(match feature {
            Feature::Stage => self.state.stage.map_or("", |stage| stage.as_str()),
            Feature::AcquisitionStatus => self
                .state
                .acquisition_status
                .map_or("", |status| status.as_str()),
            Feature::Health => self.state.health.map_or("", |health| health.as_str()),
            Feature::Company => &profile.company,
            Feature::Industry => &profile.industry,
            Feature::JobTitle => &profile.job_title,
            _ => return None,
        })
    }

    /// The value of a bool feature; `None` for features of other types.
    pub fn bool(&self, feature: Feature) -> Option<bool> {
        match feature {
            Feature::Cancelled => Some(self.features.cancelled()),
            Feature::Identified => Some(self.features.profile().identified),
            _ => None,
        }
    }

    /// The counts of one history per window, in [`WINDOWS`] order.
    pub fn window_counts(&self, history: Option<&ActivityHistory>) -> [i64; 5] {
        WINDOWS.map(|(_, days)| {
            let count = match (history, days) {
                (None, _) => 0,
                (Some(history), None) => history.total(),
                (Some(history), Some(days)) => history.count_in_last_days(days, self.now),
            };
            i64::try_from(count).unwrap_or(i64::MAX)
        })
    }

    /// The keys of `count`: every documented type, then custom types seen.
    pub fn count_keys(&self) -> impl Iterator<Item = &'a str> {
        let custom = self
            .features
            .type_histories()
            .map(|(kind, _)| kind)
            .filter(|kind| !KNOWN_TYPES.contains(kind));
        KNOWN_TYPES.iter().copied().chain(custom)
    }

    /// The feature as a CEL value.
    pub fn to_cel(&self, feature: Feature) -> Box<dyn Val + 'a> {
        if let Some(value) = self.int(feature) {
            return Box::new(CelInt::from(value));
        }
        if let Some(value) = self.double(feature) {
            return Box::new(CelDouble::from(value));
        }
        if let Some(value) = self.string(feature) {
            return Box::new(CelString::from(value));
        }
        if let Some(value) = self.bool(feature) {
            return Box::new(CelBool::from(value));
        }
        match feature {
            Feature::Count => return Box::new(WindowCountMap::new(*self, CountedBy::Type)),
            Feature::ChannelCount => {
                return Box::new(WindowCountMap::new(*self, CountedBy::Channel));
            }
            _ => {}
        }
        let mut map: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = HashMap::new();
        match feature {
            Feature::Revenue => {
                for (currency, micros) in self.features.revenue_micros() {
                    map.insert(
                        CelMapKey::from(currency.as_str()),
                        Box::new(CelDouble::from(*micros as f64 / 1_000_000.0)),
                    );
                }
            }
            Feature::Attributes => {
                for (key, value) in &self.features.profile().attributes {
                    map.insert(
                        CelMapKey::from(key.as_str()),
                        Box::new(CelString::from(value.as_str())),
                    );
                }
            }
            _ => unreachable!("every scalar feature is handled above"),
        }
        Box::new(CelMap::from(map))
    }

    /// Every feature, flattened: `count.purchase.30d`, `revenue.EUR`,
    /// `attributes.plan`, `days_since_last_touch`, ...
    pub fn flatten(&self) -> BTreeMap<String, FeatureValue> {
        let mut flat = BTreeMap::new();
        for feature in Feature::ALL {
            let name = feature.name();
            if let Some(value) = self.int(feature) {
                flat.insert(name.to_owned(), FeatureValue::Int(value));
            } else if let Some(value) = self.double(feature) {
                flat.insert(name.to_owned(), FeatureValue::Double(value));
            } else if let Some(value) = self.string(feature) {
                flat.insert(name.to_owned(), FeatureValue::String(value.to_owned()));
            } else if let Some(value) = self.bool(feature) {
                flat.insert(name.to_owned(), FeatureValue::Bool(value));
            }
        }
        let mut windows = |prefix: &str, key: &str, counts: [i64; 5]| {
            for ((window, _), count) in WINDOWS.iter().zip(counts) {
                flat.insert(format!("{prefix}.{key}.{window}"), FeatureValue::Int(count));
            }
        };
        for kind in self.count_keys() {
            windows(
                "count",
                kind,
                self.window_counts(self.features.type_history(kind)),
            );
        }
        for channel in CHANNELS {
            let counts = self.window_counts(self.features.channel_history(channel));
            windows("channel_count", channel, counts);
        }
        for (currency, micros) in self.features.revenue_micros() {
            flat.insert(
                format!("revenue.{currency}"),
                FeatureValue::Double(*micros as f64 / 1_000_000.0),
            );
        }
        for (key, value) in &self.features.profile().attributes {
            flat.insert(
                format!("attributes.{key}"),
                FeatureValue::String(value.clone()),
            );
        }
        flat
    }
}

/// The features a rule evaluation needs, as CEL values, looked up by name.
pub struct CelBindings<'a> {
    values: Vec<Option<Box<dyn Val + 'a>>>,
}

impl<'a> CelBindings<'a> {
    /// Binds the features of `needed`.
    pub fn new(context: &FeatureContext<'a>, needed: FeatureSet) -> Self {
        let mut values: Vec<Option<Box<dyn Val + 'a>>> = std::iter::repeat_with(|| None)
            .take(Feature::ALL.len())
            .collect();
        for feature in needed.iter() {
            values[feature as usize] = Some(context.to_cel(feature));
        }
        Self { values }
    }

    /// Re-binds the state features of `needed` (after a move).
    pub fn rebind_state(&mut self, context: &FeatureContext<'a>, needed: FeatureSet) {
        for feature in needed.iter().filter(|feature| feature.depends_on_state()) {
            self.values[feature as usize] = Some(context.to_cel(feature));
        }
    }

    /// Re-binds one feature if it is bound (after a score was computed).
    pub fn rebind(&mut self, context: &FeatureContext<'a>, feature: Feature) {
        if self.values[feature as usize].is_some() {
            self.values[feature as usize] = Some(context.to_cel(feature));
        }
    }
}

impl VariableResolver for CelBindings<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let feature = Feature::from_name(variable)?;
        let value = self.values[feature as usize].as_deref()?;
        Some(CowVal::Borrowed(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_fit_in_a_set() {
        assert!(Feature::ALL.len() <= 64);
        for (index, feature) in Feature::ALL.into_iter().enumerate() {
            assert_eq!(feature as usize, index);
            assert_eq!(Feature::from_name(feature.name()), Some(feature));
        }
        assert_eq!(Feature::from_name("nope"), None);
    }
}
