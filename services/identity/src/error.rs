//! The identity service's errors and their exhaustive mapping to gRPC
//! statuses with `google.rpc` details.

use clm_platform::FieldViolation;
use clm_platform::error::reasons;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::store::StoreError;

/// Everything an identity operation can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    /// The request is malformed; every bad field is named.
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    /// No customer has the id.
    #[error("customer {0} not found")]
    NotFound(Uuid),
    /// An identity key in the request belongs to another customer.
    #[error("identity key {field} belongs to another customer")]
    KeyTaken {
        /// The request field that holds the key.
        field: String,
    },
    /// The stored version is not the one the caller expected.
    #[error("customer {customer_id} is at version {current}, not {expected}")]
    VersionConflict {
        /// The customer.
        customer_id: Uuid,
        /// What the caller expected.
        expected: i64,
        /// What is stored.
        current: i64,
    },
    /// The customer was merged or erased and cannot take this operation.
    #[error("customer {customer_id} is {state}")]
    NotActive {
        /// The customer.
        customer_id: Uuid,
        /// `merged` or `erased`.
        state: &'static str,
        /// For a merged customer, its survivor.
        merged_into: Option<Uuid>,
    },
    /// The keys identify several identified customers and merging was not
    /// allowed.
    #[error("the identity keys belong to {} different customers", customer_ids.len())]
    IdentityConflict {
        /// The customers the keys point at.
        customer_ids: Vec<Uuid>,
    },
    /// A key belonged to an erased customer and no consent was given again.
    #[error("identity key {field} belongs to an erased customer")]
    Suppressed {
        /// The request field that holds the key.
        field: String,
    },
    /// A merge names the same customer twice.
    #[error("a customer cannot be merged into itself")]
    SelfMerge,
    /// Concurrent changes kept winning; the caller may retry.
    #[error("too much contention on customer {0}")]
    Contended(Uuid),
    /// The database is unreachable.
    #[error("the customer database is unavailable")]
    Unavailable(String),
    /// A bug or a broken database; details are logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),
}

impl IdentityError {
    /// One invalid field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

impl From<StoreError> for IdentityError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::VersionConflict { customer_id } => Self::Contended(customer_id),
            StoreError::KeyTaken { .. } => Self::KeyTaken {
                field: "keys".to_owned(),
            },
            StoreError::RequestIdTaken => Self::Contended(Uuid::nil()),
            StoreError::Unavailable(detail) => Self::Unavailable(detail),
            StoreError::Internal(detail) => Self::Internal(detail),
        }
    }
}

pub use clm_platform::error::{ErrorReport, reasons::INVALID_REFERENCE};

impl IdentityError {
    /// True when the database failed (unreachable or broken) rather than the
    /// request: a batch call then fails as a whole instead of reporting the
    /// failure on each of its items.
    pub fn is_outage(&self) -> bool {
        match self {
            Self::Unavailable(_) | Self::Internal(_) => true,
            Self::InvalidArgument(_)
            | Self::NotFound(_)
            | Self::KeyTaken { .. }
            | Self::VersionConflict { .. }
            | Self::NotActive { .. }
            | Self::IdentityConflict { .. }
            | Self::Suppressed { .. }
            | Self::SelfMerge
            | Self::Contended(_) => false,
        }
    }

    /// How this error is told to a caller.
    pub fn report(self) -> ErrorReport {
        let reason = ErrorReport::reason;
        match self {
            Self::InvalidArgument(violations) => ErrorReport::BadRequest(violations),
            Self::NotFound(id) => reason(
                Code::NotFound,
                reasons::CUSTOMER_NOT_FOUND,
                format!("customer {id} not found"),
                &[("customer_id", id.to_string())],
            ),
            Self::KeyTaken { field } => reason(
                Code::AlreadyExists,
                reasons::IDENTITY_KEY_TAKEN,
                format!("{field}: the identity key belongs to another customer"),
                &[("field", field)],
            ),
            Self::VersionConflict {
                customer_id,
                expected,
                current,
            } => reason(
                Code::Aborted,
                reasons::VERSION_CONFLICT,
                format!(
                    "customer {customer_id} is at version {current}, not the expected {expected}: read it again and retry"
                ),
                &[
                    ("customer_id", customer_id.to_string()),
                    ("expected_version", expected.to_string()),
                    ("current_version", current.to_string()),
                ],
            ),
            Self::NotActive {
                customer_id,
                state,
                merged_into,
            } => {
                let (reason_code, message) = match merged_into {
                    Some(into) => (
                        reasons::CUSTOMER_MERGED,
                        format!("customer {customer_id} was merged into {into}"),
                    ),
                    None => (
                        reasons::CUSTOMER_ERASED,
                        format!("customer {customer_id} is {state}"),
                    ),
                };
                reason(
                    Code::FailedPrecondition,
                    reason_code,
                    message,
                    &[
                        ("customer_id", customer_id.to_string()),
                        (
                            "merged_into_id",
                            merged_into.map(|id| id.to_string()).unwrap_or_default(),
                        ),
                    ],
                )
            }
            Self::IdentityConflict { customer_ids } => {
                let ids = customer_ids
                    .iter()
                    .map(Uuid::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                reason(
                    Code::FailedPrecondition,
                    reasons::IDENTITY_CONFLICT,
                    format!(
                        "the identity keys belong to different identified customers ({ids}); set allow_merge to merge them"
                    ),
                    &[("customer_ids", ids)],
                )
            }
            Self::Suppressed { field } => reason(
                Code::FailedPrecondition,
                reasons::IDENTITY_KEY_SUPPRESSED,
                format!(
                    "{field}: the identity key belonged to an erased customer; record a GRANTED consent to use it again"
                ),
                &[("field", field)],
            ),
            Self::SelfMerge => ErrorReport::BadRequest(vec![FieldViolation::new(
                "merged_id",
                "must differ from survivor_id",
            )]),
            Self::Contended(id) => reason(
                Code::Aborted,
                reasons::CONTENDED,
                "the customer changed concurrently too many times, retry".to_owned(),
                &[("customer_id", id.to_string())],
            ),
            Self::Unavailable(detail) => ErrorReport::Unavailable {
                what: "the customer database",
                detail,
            },
            Self::Internal(detail) => ErrorReport::Internal {
                context: "handling a customer request",
                detail,
            },
        }
    }
}

impl From<IdentityError> for Status {
    fn from(err: IdentityError) -> Self {
        err.report().into()
    }
}
