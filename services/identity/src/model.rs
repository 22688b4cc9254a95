//! The customer as the service reasons about it, independent of gRPC and of
//! the database.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::keys::{IdentityKey, KeyKind};

/// Whether a customer record is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CustomerState {
    /// A live customer.
    Active,
    /// Merged into `into`.
    Merged {
        /// The survivor.
        into: Uuid,
    },
    /// Personal data erased.
    Erased,
}

impl CustomerState {
    /// The name stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Merged { .. } => "merged",
            Self::Erased => "erased",
        }
    }
}

/// A consent decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentStatus {
    /// Agreed.
    Granted,
    /// Refused.
    Denied,
    /// Withdrew an earlier agreement.
    Withdrawn,
}

/// A customer's latest decision for one purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    /// The purpose, e.g. `email_marketing`.
    pub purpose: String,
    /// The decision.
    pub status: ConsentStatus,
    /// Where it was captured.
    pub source: String,
    /// When it was made.
    pub recorded_at: DateTime<Utc>,
}

/// The lifecycle snapshot the scoring service last stored. Enum fields hold
/// the `clm.common.v1` enum numbers, which are stable API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lifecycle {
    /// `clm.common.v1.LifecycleStage`.
    pub stage: i32,
    /// `clm.common.v1.AcquisitionStatus`.
    pub acquisition_status: i32,
    /// `clm.common.v1.Health`.
    pub health: i32,
    /// Engagement score, 0 to 100.
    pub engagement_score: f64,
    /// Lead score, 0 to 100.
    pub lead_score: f64,
    /// Health score, 0 to 100.
    pub health_score: f64,
    /// The scoring model version.
    pub model_version: String,
    /// When the current stage was entered.
    pub stage_entered_at: Option<DateTime<Utc>>,
    /// When the current health was entered.
    pub health_entered_at: Option<DateTime<Utc>>,
    /// When the snapshot was computed.
    pub evaluated_at: DateTime<Utc>,
}

/// The personal profile fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Given name.
    pub given_name: String,
    /// Family name.
    pub family_name: String,
    /// Company.
    pub company: String,
    /// Industry.
    pub industry: String,
    /// Job title.
    pub job_title: String,
    /// Free attributes.
    pub attributes: BTreeMap<String, String>,
    /// The latest consent per purpose.
    pub consents: Vec<Consent>,
}

impl Profile {
    /// Records consent decisions: per purpose the most recent one wins.
    pub fn record_consents(&mut self, decisions: &[Consent]) -> bool {
        let mut changed = false;
        for decision in decisions {
            match self
                .consents
                .iter_mut()
                .find(|c| c.purpose == decision.purpose)
            {
                Some(current)
                    if current.recorded_at <= decision.recorded_at && current != decision =>
                {
                    *current = decision.clone();
                    changed = true;
                }
                Some(_) => {}
                None => {
                    self.consents.push(decision.clone());
                    changed = true;
                }
            }
        }
        self.consents.sort_by(|a, b| a.purpose.cmp(&b.purpose));
        changed
    }

    /// Fills the fields this profile lacks from `other` (the survivorship
    /// rule of merges and of resolve traits).
    pub fn fill_from(&mut self, other: &Profile) -> bool {
        let mut changed = false;
        for (mine, theirs) in [
            (&mut self.given_name, &other.given_name),
            (&mut self.family_name, &other.family_name),
            (&mut self.company, &other.company),
            (&mut self.industry, &other.industry),
            (&mut self.job_title, &other.job_title),
        ] {
            if mine.is_empty() && !theirs.is_empty() {
                mine.clone_from(theirs);
                changed = true;
            }
        }
        for (key, value) in &other.attributes {
            if !self.attributes.contains_key(key) {
                self.attributes.insert(key.clone(), value.clone());
                changed = true;
            }
        }
        changed |= self.record_consents(&other.consents);
        changed
    }
}

/// A customer record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    /// The id (UUIDv7).
    pub id: Uuid,
    /// Active, merged or erased.
    pub state: CustomerState,
    /// Personal profile fields.
    pub profile: Profile,
    /// Identity keys, in the order they were added.
    pub keys: Vec<IdentityKey>,
    /// The latest lifecycle snapshot.
    pub lifecycle: Option<Lifecycle>,
    /// When created.
    pub created_at: DateTime<Utc>,
    /// When last changed.
    pub updated_at: DateTime<Utc>,
    /// When erased.
    pub erased_at: Option<DateTime<Utc>>,
    /// Incremented on every change.
    pub version: i64,
}

impl Customer {
    /// The update-mask paths (as UpdateCustomerRequest.update_mask names
    /// them) whose values differ between `self` and `after`, each once, in
    /// the contract's field order.
    pub fn changed_fields(&self, after: &Customer) -> Vec<String> {
        let keys_of = |customer: &Customer, kind: KeyKind| -> Vec<String> {
            let mut values: Vec<String> = customer
                .keys
                .iter()
                .filter(|key| key.kind == kind)
                .map(|key| key.value.clone())
                .collect();
            values.sort_unstable();
            values
        };
        let (a, b) = (&self.profile, &after.profile);
        let mut consents_before = a.consents.clone();
        let mut consents_after = b.consents.clone();
        consents_before.sort_by(|x, y| x.purpose.cmp(&y.purpose));
        consents_after.sort_by(|x, y| x.purpose.cmp(&y.purpose));
        [
            ("given_name", a.given_name != b.given_name),
            ("family_name", a.family_name != b.family_name),
            (
                "emails",
                keys_of(self, KeyKind::Email) != keys_of(after, KeyKind::Email),
            ),
            (
                "phones",
                keys_of(self, KeyKind::Phone) != keys_of(after, KeyKind::Phone),
            ),
            (
                "external_ids",
                keys_of(self, KeyKind::External) != keys_of(after, KeyKind::External),
            ),
            (
                "anonymous_ids",
                keys_of(self, KeyKind::Anonymous) != keys_of(after, KeyKind::Anonymous),
            ),
            ("company", a.company != b.company),
            ("industry", a.industry != b.industry),
            ("job_title", a.job_title != b.job_title),
            ("attributes", a.attributes != b.attributes),
            ("consents", consents_before != consents_after),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(path, _)| path.to_owned())
        .collect()
    }

    /// A new active customer with a fresh UUIDv7.
    pub fn new(now: DateTime<Utc>) -> Self {
        Self {
            id: Uuid::now_v7(),
            state: CustomerState::Active,
            profile: Profile::default(),
            keys: Vec::new(),
            lifecycle: None,
            created_at: now,
            updated_at: now,
            erased_at: None,
            version: 1,
        }
    }

    /// True when some key identifies a person (not only anonymous ids).
    pub fn is_identified(&self) -> bool {
        self.keys.iter().any(|key| key.kind.identifies_person())
    }

    /// True when the customer has the key.
    pub fn has_key(&self, key: &IdentityKey) -> bool {
        self.keys.contains(key)
    }

    /// The keys of one kind.
    pub fn keys_of(&self, kind: KeyKind) -> impl Iterator<Item = &IdentityKey> {
        self.keys.iter().filter(move |key| key.kind == kind)
    }

    /// The stage number for filters (0 when never evaluated).
    pub fn stage(&self) -> i32 {
        self.lifecycle.as_ref().map_or(0, |l| l.stage)
    }

    /// The health number for filters (0 when never evaluated).
    pub fn health(&self) -> i32 {
        self.lifecycle.as_ref().map_or(0, |l| l.health)
    }

    /// The next version of this record, changed at `now`.
    pub fn next_version(&self, now: DateTime<Utc>) -> Self {
        let mut next = self.clone();
        next.version += 1;
        next.updated_at = now.max(self.updated_at);
        next
    }
}

/// The part of a record kept as a JSON document; the rest are columns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredDocument {
    /// Personal profile fields.
    pub profile: Profile,
    /// Identity keys.
    pub keys: Vec<IdentityKey>,
    /// Lifecycle snapshot.
    pub lifecycle: Option<Lifecycle>,
    /// When erased.
    pub erased_at: Option<DateTime<Utc>>,
}

impl StoredDocument {
    /// The document of a customer.
    pub fn of(customer: &Customer) -> Self {
        Self {
            profile: customer.profile.clone(),
            keys: customer.keys.clone(),
            lifecycle: customer.lifecycle.clone(),
            erased_at: customer.erased_at,
        }
    }
}

/// An entry of the merge ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeRecord {
    /// The merge id.
    pub merge_id: Uuid,
    /// The customer that remained.
    pub survivor_id: Uuid,
    /// The customer merged into it.
    pub merged_id: Uuid,
    /// Why.
    pub reason: String,
    /// Who asked.
    pub requested_by: String,
    /// When.
    pub merged_at: DateTime<Utc>,
}
