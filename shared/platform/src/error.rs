//! The vocabulary services use to build `tonic::Status` values with
//! `google.rpc` details: BadRequest field violations for INVALID_ARGUMENT and
//! ErrorInfo (a machine-readable reason) for everything else.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every clm error.
pub const ERROR_DOMAIN: &str = "clm";

/// One bad field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field path, e.g. `customer.emails[2]`.
    pub field: String,
    /// Why it is bad, in lower case without trailing punctuation.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Collects the field violations of one request so that every bad field is
/// reported at once.
#[derive(Debug, Default, Clone)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// No violations yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a violation.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// Records the violation of a check that failed.
    pub fn check<T>(&mut self, result: Result<T, FieldViolation>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(violation) => {
                self.0.push(violation);
                None
            }
        }
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The recorded violations.
    pub fn into_vec(self) -> Vec<FieldViolation> {
        self.0
    }

    /// `Ok(())` when nothing was recorded, the violations otherwise.
    pub fn into_result(self) -> Result<(), Vec<FieldViolation>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

/// Builds statuses with `google.rpc` details.
pub struct StatusBuilder;

impl StatusBuilder {
    /// INVALID_ARGUMENT with a BadRequest detail naming every bad field. The
    /// message names them too, for callers that do not decode details.
    pub fn invalid_argument(violations: &[FieldViolation]) -> Status {
        let mut details = ErrorDetails::new();
        for violation in violations {
            details
                .add_bad_request_violation(violation.field.clone(), violation.description.clone());
        }
        let summary = violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; ");
        Status::with_error_details(
            Code::InvalidArgument,
            format!("invalid request: {summary}"),
            details,
        )
    }

    /// A status with an ErrorInfo detail: `reason` is an UPPER_SNAKE_CASE
    /// constant callers can match on; `metadata` adds ids that help.
    pub fn with_reason(
        code: Code,
        message: impl Into<String>,
        reason: &str,
        metadata: &[(&str, &str)],
    ) -> Status {
        let metadata: HashMap<String, String> = metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
        Status::with_error_details(code, message, details)
    }

    /// INTERNAL without any detail of the cause: the cause is logged, never
    /// returned (no SQL, no stack text reaches a caller).
    pub fn internal(context: &str, cause: &dyn std::fmt::Display) -> Status {
        tracing::error!(error = %cause, context, "internal error");
        Status::internal(format!("internal error while {context}"))
    }

    /// UNAVAILABLE: a dependency is down; the caller may retry with backoff.
    pub fn unavailable(what: &str) -> Status {
        Self::with_reason(
            Code::Unavailable,
            format!("{what} is unavailable, retry later"),
            "DEPENDENCY_UNAVAILABLE",
            &[("dependency", what)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_every_field() {
        let status = StatusBuilder::invalid_argument(&[
            FieldViolation::new("customer.emails[0]", "not a valid e-mail address"),
            FieldViolation::new("page_size", "must be at most 1000"),
        ]);
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request detail");
        let fields: Vec<_> = bad
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["customer.emails[0]", "page_size"]);
        assert!(status.message().contains("customer.emails[0]"));
    }

    #[test]
    fn reasons_travel_in_error_info() {
        let status = StatusBuilder::with_reason(
            Code::Aborted,
            "version conflict",
            "VERSION_CONFLICT",
            &[("current_version", "3")],
        );
        let info = status
            .get_error_details()
            .error_info()
            .cloned()
            .expect("error info");
        assert_eq!(info.reason, "VERSION_CONFLICT");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(
            info.metadata.get("current_version").map(String::as_str),
            Some("3")
        );
    }
}
