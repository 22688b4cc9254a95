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
    /// A machine-readable UPPER_SNAKE_CASE reason (`REQUIRED`, `TOO_LONG`, …),
    /// empty when the check gives none.
    pub reason: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
            reason: String::new(),
        }
    }

    /// A violation of `field` with a machine-readable reason.
    pub fn with_reason(
        field: impl Into<String>,
        reason: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
            reason: reason.into(),
        }
    }
}

/// The most field violations one status carries in its BadRequest detail.
/// Every mainstream client reads statuses whose metadata stays within 8 KiB
/// (grpc-core's default soft limit); beyond this many, the message says how
/// many were left out. Batch RPCs report every item in their response body.
pub const MAX_REPORTED_VIOLATIONS: usize = 10;
/// The violations the status message itself spells out.
const MAX_VIOLATIONS_IN_MESSAGE: usize = 3;
/// The longest field path and description a status carries, in characters.
const MAX_FIELD_CHARS: usize = 100;
const MAX_DESCRIPTION_CHARS: usize = 160;

/// `text` cut to at most `max` characters, with an ellipsis when cut.
fn clipped(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max.saturating_sub(1)) {
        Some((end, _)) if text[end..].chars().nth(1).is_some() => {
            format!("{}…", &text[..end]).into()
        }
        _ => text.into(),
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
    /// INVALID_ARGUMENT with a BadRequest detail naming the bad fields (the
    /// first [`MAX_REPORTED_VIOLATIONS`], each clipped), so that the status
    /// stays small enough for every client to read. The message names the
    /// first few too, for callers that do not decode details, and says how
    /// many there were in all.
    pub fn invalid_argument(violations: &[FieldViolation]) -> Status {
        let reported = &violations[..violations.len().min(MAX_REPORTED_VIOLATIONS)];
        let violations_proto = reported
            .iter()
            .map(|v| tonic_types::FieldViolation {
                field: clipped(&v.field, MAX_FIELD_CHARS).into_owned(),
                description: clipped(&v.description, MAX_DESCRIPTION_CHARS).into_owned(),
                reason: clipped(&v.reason, 64).into_owned(),
                localized_message: None,
            })
            .collect::<Vec<_>>();
        let mut summary = reported
            .iter()
            .take(MAX_VIOLATIONS_IN_MESSAGE)
            .map(|v| {
                format!(
                    "{}: {}",
                    clipped(&v.field, MAX_FIELD_CHARS),
                    clipped(&v.description, MAX_DESCRIPTION_CHARS)
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let left_out = violations.len() - reported.len().min(MAX_VIOLATIONS_IN_MESSAGE);
        if left_out > 0 {
            summary.push_str(&format!(
                "; and {left_out} more ({} in all, the first {} in the BadRequest detail)",
                violations.len(),
                reported.len()
            ));
        }
        let details = ErrorDetails::with_bad_request(violations_proto);
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
            reasons::DEPENDENCY_UNAVAILABLE,
            &[("dependency", what)],
        )
    }
}

/// The `ErrorInfo` reasons of every clm service, one constant each, so that
/// a service that relays another's refusal (touchpoints relays identity's)
/// matches the same constant the other sends. Callers match on these
/// strings: they never change once released.
pub mod reasons {
    /// UNAVAILABLE: a database or another service is down; retry later.
    pub const DEPENDENCY_UNAVAILABLE: &str = "DEPENDENCY_UNAVAILABLE";
    /// NOT_FOUND: no customer has this id.
    pub const CUSTOMER_NOT_FOUND: &str = "CUSTOMER_NOT_FOUND";
    /// FAILED_PRECONDITION: the customer was merged into another.
    pub const CUSTOMER_MERGED: &str = "CUSTOMER_MERGED";
    /// FAILED_PRECONDITION: the customer was erased.
    pub const CUSTOMER_ERASED: &str = "CUSTOMER_ERASED";
    /// ALREADY_EXISTS: an identity key belongs to another customer.
    pub const IDENTITY_KEY_TAKEN: &str = "IDENTITY_KEY_TAKEN";
    /// FAILED_PRECONDITION: the keys belong to different identified customers.
    pub const IDENTITY_CONFLICT: &str = "IDENTITY_CONFLICT";
    /// FAILED_PRECONDITION: the key belonged to an erased customer.
    pub const IDENTITY_KEY_SUPPRESSED: &str = "IDENTITY_KEY_SUPPRESSED";
    /// ABORTED: the record is not at the expected version; read it again.
    pub const VERSION_CONFLICT: &str = "VERSION_CONFLICT";
    /// ABORTED: the change lost a race with concurrent changes; retry.
    pub const CONTENDED: &str = "CONTENDED";
    /// A malformed reference in a batch call (its item fails, not the batch).
    pub const INVALID_REFERENCE: &str = "INVALID_REFERENCE";
    /// NOT_FOUND: scoring has not seen a touchpoint of the customer.
    pub const CUSTOMER_NOT_SCORED: &str = "CUSTOMER_NOT_SCORED";
    /// ABORTED: scoring's state of the customer changed meanwhile; retry.
    pub const CONCURRENT_CHANGE: &str = "CONCURRENT_CHANGE";
    /// ALREADY_EXISTS: a different model has this version.
    pub const MODEL_VERSION_EXISTS: &str = "MODEL_VERSION_EXISTS";
    /// NOT_FOUND: no model has this version.
    pub const MODEL_NOT_FOUND: &str = "MODEL_NOT_FOUND";
    /// FAILED_PRECONDITION: another model is active than the one expected.
    pub const ACTIVE_MODEL_CHANGED: &str = "ACTIVE_MODEL_CHANGED";
    /// NOT_FOUND: no rescore has this id.
    pub const RESCORE_NOT_FOUND: &str = "RESCORE_NOT_FOUND";
    /// NOT_FOUND: no survey has this id.
    pub const SURVEY_NOT_FOUND: &str = "SURVEY_NOT_FOUND";
    /// FAILED_PRECONDITION: the survey is archived.
    pub const SURVEY_ARCHIVED: &str = "SURVEY_ARCHIVED";
    /// NOT_FOUND: no dispatch has this id.
    pub const DISPATCH_NOT_FOUND: &str = "DISPATCH_NOT_FOUND";
    /// FAILED_PRECONDITION: the dispatch was not released for delivery (it
    /// is scheduled, suppressed or expired).
    pub const DISPATCH_NOT_OPEN: &str = "DISPATCH_NOT_OPEN";
    /// FAILED_PRECONDITION: the dispatch's response window has closed.
    pub const RESPONSE_WINDOW_CLOSED: &str = "RESPONSE_WINDOW_CLOSED";
    /// ALREADY_EXISTS: the dispatch was answered by another response.
    pub const DISPATCH_ANSWERED: &str = "DISPATCH_ANSWERED";
    /// A batch holds more items than one call may carry.
    pub const BATCH_TOO_LARGE: &str = "BATCH_TOO_LARGE";
}

/// How a service error is told to a caller: every error enum of a service
/// turns into one of these by an exhaustive match (its `report`), and this
/// into the `Status`, so codes, reasons and detail handling are decided in
/// one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorReport {
    /// INVALID_ARGUMENT naming every bad field (a `google.rpc.BadRequest`).
    BadRequest(Vec<FieldViolation>),
    /// A failure the caller can act on, with an `ErrorInfo` reason.
    Reason {
        /// The `google.rpc.Code`.
        code: Code,
        /// The UPPER_SNAKE_CASE reason callers match on ([`reasons`]).
        reason: &'static str,
        /// What went wrong, for people.
        message: String,
        /// Ids that help (`ErrorInfo` metadata).
        metadata: Vec<(&'static str, String)>,
    },
    /// A dependency is unreachable: UNAVAILABLE, the caller may retry. The
    /// detail is logged, never returned.
    Unavailable {
        /// What is down, as the caller is told ("the scoring database").
        what: &'static str,
        /// Why, for the log.
        detail: String,
    },
    /// A bug or a broken database: INTERNAL. The detail is logged, never
    /// returned.
    Internal {
        /// What was being done ("handling a touchpoint request").
        context: &'static str,
        /// Why, for the log.
        detail: String,
    },
}

impl ErrorReport {
    /// A failure with a reason.
    pub fn reason(
        code: Code,
        reason: &'static str,
        message: impl Into<String>,
        metadata: &[(&'static str, String)],
    ) -> Self {
        Self::Reason {
            code,
            reason,
            message: message.into(),
            metadata: metadata.to_vec(),
        }
    }
}

impl From<ErrorReport> for Status {
    fn from(report: ErrorReport) -> Self {
        match report {
            ErrorReport::BadRequest(violations) => StatusBuilder::invalid_argument(&violations),
            ErrorReport::Reason {
                code,
                reason,
                message,
                metadata,
            } => {
                let metadata: Vec<(&str, &str)> = metadata
                    .iter()
                    .map(|(key, value)| (*key, value.as_str()))
                    .collect();
                StatusBuilder::with_reason(code, message, reason, &metadata)
            }
            ErrorReport::Unavailable { what, detail } => {
                tracing::warn!(error = %detail, "{what} unavailable");
                StatusBuilder::unavailable(what)
            }
            ErrorReport::Internal { context, detail } => StatusBuilder::internal(context, &detail),
        }
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
    fn many_violations_stay_readable_by_every_client() {
        // 50 bad items with long descriptions and a reason each: once, this
        // built a 28 KB status that grpc-python refused to read.
        let long = "x".repeat(2000);
        let violations: Vec<_> = (0..50)
            .map(|i| {
                FieldViolation::with_reason(
                    format!("items[{i}].{long}"),
                    "INVALID_FORMAT",
                    format!("{long} is not valid"),
                )
            })
            .collect();
        let status = StatusBuilder::invalid_argument(&violations);
        let mut headers = http::HeaderMap::new();
        status.add_header(&mut headers).expect("headers");
        let size: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        assert!(size < 8 * 1024, "status metadata is {size} bytes");
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request detail");
        assert_eq!(bad.field_violations.len(), MAX_REPORTED_VIOLATIONS);
        assert_eq!(bad.field_violations[0].reason, "INVALID_FORMAT");
        assert!(bad.field_violations[0].field.starts_with("items[0]."));
        assert!(
            status.message().contains("50 in all"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn clipping_keeps_short_texts_and_cuts_on_characters() {
        assert_eq!(clipped("abc", 3), "abc");
        assert_eq!(clipped("abcd", 3), "ab…");
        assert_eq!(clipped("ééééé", 4), "ééé…");
        assert_eq!(clipped("", 3), "");
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
