//! What the directory's operations take and give.

use super::*;

/// An identity key as a request gave it, with the field that carried it (for
/// error messages).
#[derive(Debug, Clone)]
pub struct RequestKey {
    /// The request field, e.g. `customer.emails[1]`.
    pub field: String,
    /// The normalised key.
    pub key: IdentityKey,
}

/// A customer to create.
#[derive(Debug, Clone, Default)]
pub struct NewCustomer {
    /// Profile fields, consents included.
    pub profile: Profile,
    /// Identity keys.
    pub keys: Vec<RequestKey>,
    /// The idempotency key of the request.
    pub request_id: Option<String>,
}

/// The fields an update changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct CustomerPatch {
    /// New given name.
    pub given_name: Option<String>,
    /// New family name.
    pub family_name: Option<String>,
    /// New company.
    pub company: Option<String>,
    /// New industry.
    pub industry: Option<String>,
    /// New job title.
    pub job_title: Option<String>,
    /// New attributes (replace all).
    pub attributes: Option<BTreeMap<String, String>>,
    /// New consents (replace all).
    pub consents: Option<Vec<Consent>>,
    /// New keys per kind (replace all keys of that kind).
    pub keys: BTreeMap<KeyKind, Vec<RequestKey>>,
}

/// A resolve request.
#[derive(Debug, Clone, Default)]
pub struct ResolveRequest {
    /// The keys that identify the person.
    pub keys: Vec<RequestKey>,
    /// Profile fields to fill where empty (consents ignored here).
    pub traits: Profile,
    /// Consent decisions to record.
    pub consents: Vec<Consent>,
    /// Merge two identified customers when the keys point at both.
    pub allow_merge: bool,
}

/// What a resolve found or did.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The customer the keys identify.
    pub customer: Customer,
    /// True when created by this call.
    pub created: bool,
    /// Customers merged into it by this call.
    pub merged_ids: Vec<Uuid>,
}

/// The result of an erase.
#[derive(Debug, Clone)]
pub struct Erased {
    /// The tombstone.
    pub customer: Customer,
    /// When the personal data was erased.
    pub erased_at: DateTime<Utc>,
    /// How many keys went on the suppression list.
    pub suppressed_keys: usize,
}

/// A page of customers.
#[derive(Debug, Clone)]
pub struct CustomerPage {
    /// The customers.
    pub customers: Vec<Customer>,
    /// Where the next page starts, if there is one.
    pub next_after: Option<Uuid>,
}

/// A customer reference of ResolveCustomers, validated.
#[derive(Debug, Clone)]
pub enum CustomerReference {
    /// A customer id, followed through merges to its final survivor.
    Id(Uuid),
    /// Identity keys, resolved (or created) as ResolveCustomer does, without
    /// merging two identified customers.
    Keys(Vec<RequestKey>),
}

/// What makes two references identical: the id, or the set of keys (their
/// order and the request fields that carried them do not matter).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum ReferenceTarget {
    Id(Uuid),
    Keys(BTreeSet<IdentityKey>),
}

impl CustomerReference {
    pub(super) fn target(&self) -> ReferenceTarget {
        match self {
            Self::Id(id) => ReferenceTarget::Id(*id),
            Self::Keys(keys) => ReferenceTarget::Keys(keys.iter().map(|k| k.key.clone()).collect()),
        }
    }
}

/// The customer a reference names now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferencedCustomer {
    /// The customer: for an id, the final survivor of any merges.
    pub customer_id: Uuid,
    /// True when this call created it from identity keys.
    pub created: bool,
}

/// The outcome of one reference of ResolveCustomers; an error concerns that
/// reference only.
pub type ReferenceOutcome = Result<ReferencedCustomer, IdentityError>;

/// The outcome of `first` told for `reference`, an identical reference that
/// shares it: a failure names the request field of `reference`, not of
/// `first`.
pub(super) fn outcome_for(
    reference: &CustomerReference,
    first: &CustomerReference,
    outcome: &ReferenceOutcome,
) -> ReferenceOutcome {
    match (outcome, first, reference) {
        (
            Err(IdentityError::Suppressed { field }),
            CustomerReference::Keys(first_keys),
            CustomerReference::Keys(keys),
        ) => {
            let own_field = first_keys
                .iter()
                .find(|k| &k.field == field)
                .map_or_else(|| field.clone(), |k| field_of(keys, &k.key));
            Err(IdentityError::Suppressed { field: own_field })
        }
        _ => outcome.clone(),
    }
}
