//! The lifecycle vocabulary of the engine: stages, acquisition statuses,
//! health, and a customer's current lifecycle state, with their protobuf
//! counterparts in `clm.common.v1`.

use chrono::{DateTime, Utc};
use clm_proto::common;
use serde::{Deserialize, Serialize};

/// A stage of the customer journey (DESIGN §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LifecycleStage {
    /// Aware of the brand, mostly anonymous.
    Reach,
    /// Engaged and identified: lead, MQL, SQL.
    Acquisition,
    /// Made a first purchase or signed a contract.
    Conversion,
    /// Kept after the first purchase.
    Retention,
    /// Repeat buyer with long tenure.
    Loyalty,
    /// Promotes the brand.
    Advocacy,
}

impl LifecycleStage {
    /// The name rules see in the `stage` feature, e.g. `"REACH"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reach => "REACH",
            Self::Acquisition => "ACQUISITION",
            Self::Conversion => "CONVERSION",
            Self::Retention => "RETENTION",
            Self::Loyalty => "LOYALTY",
            Self::Advocacy => "ADVOCACY",
        }
    }

    /// The protobuf value.
    pub fn to_proto(self) -> common::LifecycleStage {
        match self {
            Self::Reach => common::LifecycleStage::Reach,
            Self::Acquisition => common::LifecycleStage::Acquisition,
            Self::Conversion => common::LifecycleStage::Conversion,
            Self::Retention => common::LifecycleStage::Retention,
            Self::Loyalty => common::LifecycleStage::Loyalty,
            Self::Advocacy => common::LifecycleStage::Advocacy,
        }
    }

    /// The stage of a protobuf value; `None` for unspecified or unknown values.
    pub fn from_proto(value: i32) -> Option<Self> {
        match common::LifecycleStage::try_from(value).ok()? {
            common::LifecycleStage::Unspecified => None,
            common::LifecycleStage::Reach => Some(Self::Reach),
            common::LifecycleStage::Acquisition => Some(Self::Acquisition),
            common::LifecycleStage::Conversion => Some(Self::Conversion),
            common::LifecycleStage::Retention => Some(Self::Retention),
            common::LifecycleStage::Loyalty => Some(Self::Loyalty),
            common::LifecycleStage::Advocacy => Some(Self::Advocacy),
        }
    }
}

/// The sub-status of a customer in [`LifecycleStage::Acquisition`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AcquisitionStatus {
    /// Identified and engaged.
    Lead,
    /// Marketing-qualified.
    Mql,
    /// Sales-qualified.
    Sql,
}

impl AcquisitionStatus {
    /// The name rules see in the `acquisition_status` feature, e.g. `"MQL"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lead => "LEAD",
            Self::Mql => "MQL",
            Self::Sql => "SQL",
        }
    }

    /// The protobuf value.
    pub fn to_proto(self) -> common::AcquisitionStatus {
        match self {
            Self::Lead => common::AcquisitionStatus::Lead,
            Self::Mql => common::AcquisitionStatus::Mql,
            Self::Sql => common::AcquisitionStatus::Sql,
        }
    }

    /// The status of a protobuf value; `None` for unspecified or unknown values.
    pub fn from_proto(value: i32) -> Option<Self> {
        match common::AcquisitionStatus::try_from(value).ok()? {
            common::AcquisitionStatus::Unspecified => None,
            common::AcquisitionStatus::Lead => Some(Self::Lead),
            common::AcquisitionStatus::Mql => Some(Self::Mql),
            common::AcquisitionStatus::Sql => Some(Self::Sql),
        }
    }
}

/// The health of a customer relationship, independent of the stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Health {
    /// Engaged and in good standing.
    Active,
    /// Signs of leaving.
    AtRisk,
    /// Gone.
    Churned,
}

impl Health {
    /// The name rules see in the `health` feature, e.g. `"AT_RISK"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::AtRisk => "AT_RISK",
            Self::Churned => "CHURNED",
        }
    }

    /// The protobuf value.
    pub fn to_proto(self) -> common::Health {
        match self {
            Self::Active => common::Health::Active,
            Self::AtRisk => common::Health::AtRisk,
            Self::Churned => common::Health::Churned,
        }
    }

    /// The health of a protobuf value; `None` for unspecified or unknown values.
    pub fn from_proto(value: i32) -> Option<Self> {
        match common::Health::try_from(value).ok()? {
            common::Health::Unspecified => None,
            common::Health::Active => Some(Self::Active),
            common::Health::AtRisk => Some(Self::AtRisk),
            common::Health::Churned => Some(Self::Churned),
        }
    }
}

/// Where a customer stands on both axes, and since when. `None` means "not
/// evaluated yet" (unspecified in the protobuf contract).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleState {
    /// The current stage.
    pub stage: Option<LifecycleStage>,
    /// The sub-status while in ACQUISITION; `None` otherwise.
    pub acquisition_status: Option<AcquisitionStatus>,
    /// The current health.
    pub health: Option<Health>,
    /// When the current stage was entered. A change of acquisition status
    /// alone keeps it.
    #[serde(with = "crate::stored_time::option")]
    pub stage_entered_at: Option<DateTime<Utc>>,
    /// When the current health was entered.
    #[serde(with = "crate::stored_time::option")]
    pub health_entered_at: Option<DateTime<Utc>>,
}

impl LifecycleState {
    /// The state of a customer the service has never evaluated.
    pub fn new() -> Self {
        Self::default()
    }

    /// True when stage and acquisition status are those of `other`.
    pub fn same_stage(&self, other: &LifecycleState) -> bool {
        self.stage == other.stage && self.acquisition_status == other.acquisition_status
    }

    /// True when stage, acquisition status and health are those of `other`
    /// (entry times aside).
    pub fn same_position(&self, other: &LifecycleState) -> bool {
        self.same_stage(other) && self.health == other.health
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_round_trip() {
        for stage in [
            LifecycleStage::Reach,
            LifecycleStage::Acquisition,
            LifecycleStage::Conversion,
            LifecycleStage::Retention,
            LifecycleStage::Loyalty,
            LifecycleStage::Advocacy,
        ] {
            assert_eq!(
                LifecycleStage::from_proto(stage.to_proto() as i32),
                Some(stage)
            );
            assert!(stage.to_proto().as_str_name().ends_with(stage.as_str()));
        }
        for status in [
            AcquisitionStatus::Lead,
            AcquisitionStatus::Mql,
            AcquisitionStatus::Sql,
        ] {
            assert_eq!(
                AcquisitionStatus::from_proto(status.to_proto() as i32),
                Some(status)
            );
            assert!(status.to_proto().as_str_name().ends_with(status.as_str()));
        }
        for health in [Health::Active, Health::AtRisk, Health::Churned] {
            assert_eq!(Health::from_proto(health.to_proto() as i32), Some(health));
            assert!(health.to_proto().as_str_name().ends_with(health.as_str()));
        }
        assert_eq!(LifecycleStage::from_proto(0), None);
        assert_eq!(Health::from_proto(42), None);
    }
}
