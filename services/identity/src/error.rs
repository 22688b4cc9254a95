//! The identity service's errors and their exhaustive mapping to gRPC
//! statuses with `google.rpc` details.

use clm_platform::{FieldViolation, StatusBuilder};
use tonic::{Code, Status};
use uuid::Uuid;

use crate::store::StoreError;

/// Everything an identity operation can fail with.
#[derive(Debug, thiserror::Error)]
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

impl From<IdentityError> for Status {
    fn from(err: IdentityError) -> Self {
        match err {
            IdentityError::InvalidArgument(violations) => {
                StatusBuilder::invalid_argument(&violations)
            }
            IdentityError::NotFound(id) => StatusBuilder::with_reason(
                Code::NotFound,
                format!("customer {id} not found"),
                "CUSTOMER_NOT_FOUND",
                &[("customer_id", &id.to_string())],
            ),
            IdentityError::KeyTaken { field } => StatusBuilder::with_reason(
                Code::AlreadyExists,
                format!("{field}: the identity key belongs to another customer"),
                "IDENTITY_KEY_TAKEN",
                &[("field", &field)],
            ),
            IdentityError::VersionConflict {
                customer_id,
                expected,
                current,
            } => StatusBuilder::with_reason(
                Code::Aborted,
                format!(
                    "customer {customer_id} is at version {current}, not the expected {expected}: read it again and retry"
                ),
                "VERSION_CONFLICT",
                &[
                    ("customer_id", &customer_id.to_string()),
                    ("expected_version", &expected.to_string()),
                    ("current_version", &current.to_string()),
                ],
            ),
            IdentityError::NotActive {
                customer_id,
                state,
                merged_into,
            } => {
                let survivor = merged_into.map(|id| id.to_string()).unwrap_or_default();
                let message = match merged_into {
                    Some(into) => format!("customer {customer_id} was merged into {into}"),
                    None => format!("customer {customer_id} is {state}"),
                };
                StatusBuilder::with_reason(
                    Code::FailedPrecondition,
                    message,
                    if merged_into.is_some() {
                        "CUSTOMER_MERGED"
                    } else {
                        "CUSTOMER_ERASED"
                    },
                    &[
                        ("customer_id", &customer_id.to_string()),
                        ("merged_into_id", &survivor),
                    ],
                )
            }
            IdentityError::IdentityConflict { customer_ids } => {
                let ids = customer_ids
                    .iter()
                    .map(Uuid::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                StatusBuilder::with_reason(
                    Code::FailedPrecondition,
                    format!(
                        "the identity keys belong to different identified customers ({ids}); set allow_merge to merge them"
                    ),
                    "IDENTITY_CONFLICT",
                    &[("customer_ids", &ids)],
                )
            }
            IdentityError::Suppressed { field } => StatusBuilder::with_reason(
                Code::FailedPrecondition,
                format!(
                    "{field}: the identity key belonged to an erased customer; record a GRANTED consent to use it again"
                ),
                "IDENTITY_KEY_SUPPRESSED",
                &[("field", &field)],
            ),
            IdentityError::SelfMerge => StatusBuilder::invalid_argument(&[FieldViolation::new(
                "merged_id",
                "must differ from survivor_id",
            )]),
            IdentityError::Contended(id) => StatusBuilder::with_reason(
                Code::Aborted,
                "the customer changed concurrently too many times, retry",
                "CONTENDED",
                &[("customer_id", &id.to_string())],
            ),
            IdentityError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "customer database unavailable");
                StatusBuilder::unavailable("the customer database")
            }
            IdentityError::Internal(detail) => {
                StatusBuilder::internal("handling a customer request", &detail)
            }
        }
    }
}
