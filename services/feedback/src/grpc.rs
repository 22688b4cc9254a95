//! `clm.feedback.v1.SurveyService` over gRPC: reads and checks requests
//! (`requests`), calls [`Feedback`] and the store, converts answers
//! (`convert`).

pub mod convert;
pub mod requests;

use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use clm_eventlog::serving::{LogResponses, log_position, respond};
use clm_platform::clock::Clock;
use clm_platform::error::{ErrorReport, Violations, reasons};
use clm_platform::identity::Reference;
use clm_platform::server::Shutdown;
use clm_platform::time::{FactTimes, from_timestamp};
use clm_platform::{FieldViolation, paging, validate};
use clm_proto::common as common_pb;
use clm_proto::feedback as pb;
use futures_util::StreamExt as _;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

use crate::model::{DispatchQuery, ResponseQuery, SurveyQuery, SurveyState};
use crate::service::{Feedback, FeedbackError, ResponseOutcome, ResponseRequest};
use crate::store::StoreError;

/// The gRPC face of the feedback service.
#[derive(Clone)]
pub struct SurveyGrpc {
    feedback: Feedback,
    max_future_skew: Duration,
    clock: Clock,
    shutdown: Shutdown,
}

impl SurveyGrpc {
    /// Serves `feedback`; stated times may be `max_future_skew` ahead of
    /// `clock`.
    pub fn new(
        feedback: Feedback,
        max_future_skew: Duration,
        clock: Clock,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            feedback,
            max_future_skew,
            clock,
            shutdown,
        }
    }

    /// Reads the response at `field` of a request: its checked fields and
    /// its raw answers (checked later, against the survey's questions).
    fn read_response(
        &self,
        raw: pb::SurveyResponse,
        field: &str,
        now: DateTime<Utc>,
    ) -> Result<(ResponseRequest, Vec<pb::Answer>), Vec<FieldViolation>> {
        let mut violations = Violations::new();
        violations.check(requests::response_id(
            &format!("{field}.response_id"),
            &raw.response_id,
        ));
        let survey_id = violations.check(validate::uuid(
            &format!("{field}.survey_id"),
            &raw.survey_id,
        ));
        let dispatch_id = violations
            .check(optional_uuid(
                &format!("{field}.dispatch_id"),
                &raw.dispatch_id,
            ))
            .flatten();
        let customer = reference(
            &mut violations,
            &format!("{field}.customer"),
            raw.customer.as_ref(),
        );
        let submitted_at = match &raw.submit_time {
            None => Some(now),
            Some(time) => violations
                .check(
                    FactTimes::at(now, self.max_future_skew)
                        .check(&format!("{field}.submit_time"), time),
                )
                .map(|time| time.trunc_subsecs(6)),
        };
        violations.into_result()?;
        let (Some(survey_id), Some(submitted_at)) = (survey_id, submitted_at) else {
            unreachable!("checked above");
        };
        Ok((
            ResponseRequest {
                response_id: raw.response_id,
                survey_id,
                dispatch_id,
                customer,
                submitted_at,
                field: field.to_owned(),
            },
            raw.answers,
        ))
    }

    /// The clock at the precision times are stored at (microseconds), so
    /// that what a call answers equals what later reads return.
    fn now(&self) -> DateTime<Utc> {
        self.clock.now().trunc_subsecs(6)
    }
}

fn bad(violations: Violations) -> Result<(), Status> {
    violations
        .into_result()
        .map_err(|v| Status::from(ErrorReport::BadRequest(v)))
}

fn one_bad(violation: FieldViolation) -> Status {
    Status::from(ErrorReport::BadRequest(vec![violation]))
}

/// Cuts `items` (fetched one beyond `limit`) to the page and returns the
/// token of the next one: the position `after` gives of the page's last
/// item, bound to the filter; empty on the last page.
fn next_page<T, P: Serialize>(
    items: &mut Vec<T>,
    limit: u32,
    fingerprint: u64,
    after: impl Fn(&T) -> P,
) -> String {
    if items.len() <= limit as usize {
        return String::new();
    }
    items.truncate(limit as usize);
    items.last().map_or(String::new(), |last| {
        paging::encode(fingerprint, &after(last))
    })
}

fn optional_uuid(field: &str, raw: &str) -> Result<Option<Uuid>, FieldViolation> {
    if raw.is_empty() {
        Ok(None)
    } else {
        validate::uuid(field, raw).map(Some)
    }
}

fn optional_time(
    violations: &mut Violations,
    field: &str,
    raw: Option<&prost_types::Timestamp>,
) -> Option<DateTime<Utc>> {
    raw.and_then(|raw| violations.check(from_timestamp(field, raw)))
}

/// A customer reference of a request.
fn reference(
    violations: &mut Violations,
    field: &str,
    raw: Option<&common_pb::CustomerReference>,
) -> Option<Reference> {
    match raw.and_then(|r| r.reference.as_ref()) {
        None => None,
        Some(common_pb::customer_reference::Reference::CustomerId(id)) => violations
            .check(validate::uuid(&format!("{field}.customer_id"), id))
            .map(Reference::Id),
        Some(common_pb::customer_reference::Reference::IdentityKeys(keys)) => {
            if keys.keys.is_empty() || keys.keys.len() > 20 {
                violations.add(
                    format!("{field}.identity_keys.keys"),
                    "1 to 20 identity keys are required",
                );
                None
            } else {
                Some(Reference::Keys(keys.keys.clone()))
            }
        }
    }
}

/// How a failure is told to the caller.
fn report(err: FeedbackError) -> ErrorReport {
    let id = |id: Uuid| vec![("id", id.to_string())];
    match err {
        FeedbackError::BadRequest(violations) => ErrorReport::BadRequest(violations),
        FeedbackError::DispatchMismatch(violation) => ErrorReport::BadRequest(vec![violation]),
        FeedbackError::SurveyNotFound(survey) => ErrorReport::reason(
            Code::NotFound,
            reasons::SURVEY_NOT_FOUND,
            format!("no survey has the id {survey}"),
            &[("survey_id", survey.to_string())],
        ),
        FeedbackError::SurveyArchived(survey) => ErrorReport::reason(
            Code::FailedPrecondition,
            reasons::SURVEY_ARCHIVED,
            format!("survey {survey} is archived: it takes no changes and no responses"),
            &[("survey_id", survey.to_string())],
        ),
        FeedbackError::VersionConflict { expected, current } => ErrorReport::reason(
            Code::Aborted,
            reasons::VERSION_CONFLICT,
            format!("the survey is at version {current}, not {expected}: read it again"),
            &[
                ("expected_version", expected.to_string()),
                ("current_version", current.to_string()),
            ],
        ),
        FeedbackError::DispatchNotFound(dispatch) => ErrorReport::reason(
            Code::NotFound,
            reasons::DISPATCH_NOT_FOUND,
            format!("no dispatch has the id {dispatch}"),
            &id(dispatch),
        ),
        FeedbackError::DispatchNotOpen {
            id: dispatch,
            state,
        } => ErrorReport::reason(
            Code::FailedPrecondition,
            reasons::DISPATCH_NOT_OPEN,
            format!("dispatch {dispatch} takes no response: it is {state}"),
            &[("id", dispatch.to_string()), ("state", state.to_owned())],
        ),
        FeedbackError::DispatchAnswered(dispatch) => ErrorReport::reason(
            Code::AlreadyExists,
            reasons::DISPATCH_ANSWERED,
            format!("dispatch {dispatch} was answered by another response"),
            &id(dispatch),
        ),
        FeedbackError::WindowClosed {
            id: dispatch,
            expired_at,
        } => ErrorReport::reason(
            Code::FailedPrecondition,
            reasons::RESPONSE_WINDOW_CLOSED,
            format!(
                "the response window of dispatch {dispatch} closed at {}",
                expired_at.to_rfc3339()
            ),
            &[("id", dispatch.to_string())],
        ),
        FeedbackError::CustomerRefused {
            field,
            reason,
            problems,
        } => {
            let code = if reason == reasons::CUSTOMER_NOT_FOUND {
                Code::NotFound
            } else {
                Code::FailedPrecondition
            };
            let reason = [
                reasons::CUSTOMER_NOT_FOUND,
                reasons::CUSTOMER_ERASED,
                reasons::CUSTOMER_MERGED,
                reasons::IDENTITY_KEY_SUPPRESSED,
                reasons::IDENTITY_CONFLICT,
            ]
            .into_iter()
            .find(|known| *known == reason)
            .unwrap_or(reasons::INVALID_REFERENCE);
            let message = problems
                .iter()
                .map(|(path, description)| format!("{field}{path}: {description}"))
                .collect::<Vec<_>>()
                .join("; ");
            if reason == reasons::INVALID_REFERENCE {
                ErrorReport::BadRequest(
                    problems
                        .into_iter()
                        .map(|(path, description)| {
                            FieldViolation::new(format!("{field}{path}"), description)
                        })
                        .collect(),
                )
            } else {
                ErrorReport::reason(code, reason, message, &[])
            }
        }
        FeedbackError::IdentityUnavailable(cause) => ErrorReport::Unavailable {
            what: "the identity service",
            detail: cause.to_string(),
        },
        FeedbackError::Store(err) => store_report(err),
    }
}

/// How a store failure is told to the caller.
fn store_report(err: StoreError) -> ErrorReport {
    match err {
        StoreError::Unavailable(detail) => ErrorReport::Unavailable {
            what: "the feedback database",
            detail,
        },
        StoreError::Conflict(detail) => {
            tracing::debug!(%detail, "a feedback write lost a race");
            ErrorReport::reason(
                Code::Aborted,
                reasons::CONTENDED,
                "the change lost a race with a concurrent change, retry",
                &[],
            )
        }
        StoreError::Internal(detail) => ErrorReport::Internal {
            context: "handling a feedback request",
            detail,
        },
    }
}

/// The most responses one RecordResponses call may carry.
const MAX_RESPONSE_BATCH: usize = 1000;

/// Fills a batch item's result with why it was refused: the code, reason
/// and violations RecordResponse would have failed with.
fn refusal(result: &mut pb::RecordResponseResult, err: FeedbackError) {
    let report = report(err);
    match &report {
        ErrorReport::BadRequest(violations) => {
            result.violations = violations
                .iter()
                .map(|v| pb::FieldViolation {
                    field: v.field.clone(),
                    reason: v.reason.clone(),
                    description: v.description.clone(),
                })
                .collect();
        }
        ErrorReport::Reason { reason, .. } => result.reason = (*reason).to_owned(),
        ErrorReport::Unavailable { .. } | ErrorReport::Internal { .. } => {}
    }
    let status = Status::from(report);
    result.status = pb::ResponseRecordStatus::Refused as i32;
    result.code = status.code() as i32;
    result.message = status.message().to_owned();
}

/// Checks the answers of the response at `field` against `questions`.
fn check_answers(
    field: &str,
    answers: &[pb::Answer],
    questions: &[crate::model::Question],
) -> Result<Vec<crate::model::Answer>, Vec<FieldViolation>> {
    let mut violations = Violations::new();
    let answers = requests::answers(
        &mut violations,
        &format!("{field}.answers"),
        answers,
        questions,
    );
    violations.into_result().map(|()| answers)
}

fn status(err: FeedbackError) -> Status {
    Status::from(report(err))
}

fn store_status(err: StoreError) -> Status {
    Status::from(store_report(err))
}

/// Where the next page of surveys starts, bound to the filter.
#[derive(Serialize, Deserialize)]
struct SurveyPage {
    after: Uuid,
}

#[derive(Serialize, Deserialize)]
struct DispatchPage {
    due: DateTime<Utc>,
    id: Uuid,
}

#[derive(Serialize, Deserialize)]
struct ResponsePage {
    submitted: DateTime<Utc>,
    id: Uuid,
}

/// The fields UpdateSurvey may change.
const UPDATABLE: &[&str] = &[
    "display_name",
    "description",
    "questions",
    "triggers",
    "fatigue",
    "response_window",
    "consent_purpose",
    "sampling_percent",
    "state",
];

#[tonic::async_trait]
impl pb::survey_service_server::SurveyService for SurveyGrpc {
    async fn create_survey(
        &self,
        request: Request<pb::CreateSurveyRequest>,
    ) -> Result<Response<pb::CreateSurveyResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let Some(raw) = request.survey.as_ref() else {
            return Err(one_bad(FieldViolation::with_reason(
                "survey",
                "REQUIRED",
                "is required",
            )));
        };
        let kind = violations.check(requests::kind("survey.kind", raw.kind));
        let state = violations.check(requests::settable_state("survey.state", raw.state));
        let definition = requests::definition(&mut violations, "survey", kind, raw);
        if request.request_id.chars().count() > 128 {
            violations.add("request_id", "is longer than 128 characters");
        }
        violations.check(validate::text(
            "request_id",
            &request.request_id,
            false,
            128,
        ));
        bad(violations)?;
        let (Some(kind), Some(state)) = (kind, state) else {
            unreachable!("checked above");
        };
        let request_id = (!request.request_id.is_empty()).then_some(request.request_id.as_str());
        let survey = self
            .feedback
            .create_survey(kind, state, definition, request_id, self.now())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateSurveyResponse {
            survey: Some(convert::survey(&survey)),
        }))
    }

    async fn get_survey(
        &self,
        request: Request<pb::GetSurveyRequest>,
    ) -> Result<Response<pb::GetSurveyResponse>, Status> {
        let id = validate::uuid("survey_id", &request.get_ref().survey_id).map_err(one_bad)?;
        let survey = self.feedback.survey(id).await.map_err(status)?;
        Ok(Response::new(pb::GetSurveyResponse {
            survey: Some(convert::survey(&survey)),
        }))
    }

    async fn list_surveys(
        &self,
        request: Request<pb::ListSurveysRequest>,
    ) -> Result<Response<pb::ListSurveysResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let limit = violations.check(validate::page_size(
            "page_size",
            request.page_size,
            100,
            1000,
        ));
        let filter = request.filter.unwrap_or_default();
        let state = violations.check(validate::enum_value::<pb::SurveyState>(
            "filter.state",
            filter.state,
            true,
        ));
        let kind = violations.check(validate::enum_value::<pb::SurveyKind>(
            "filter.kind",
            filter.kind,
            true,
        ));
        let fingerprint = paging::fingerprint(&(filter.state, filter.kind));
        let page = violations.check(paging::decode::<SurveyPage>(
            "page_token",
            &request.page_token,
            fingerprint,
        ));
        bad(violations)?;
        let states = match state.unwrap_or_default() {
            pb::SurveyState::Unspecified => vec![SurveyState::Active, SurveyState::Paused],
            pb::SurveyState::Active => vec![SurveyState::Active],
            pb::SurveyState::Paused => vec![SurveyState::Paused],
            pb::SurveyState::Archived => vec![SurveyState::Archived],
        };
        let kind = match kind.unwrap_or_default() {
            pb::SurveyKind::Unspecified => None,
            other => Some(requests::kind("filter.kind", other as i32).map_err(one_bad)?),
        };
        let limit = limit.unwrap_or(100);
        let mut surveys = self
            .feedback
            .store()
            .list_surveys(&SurveyQuery {
                states,
                kind,
                after: page.flatten().map(|page| page.after),
                limit: limit + 1,
            })
            .await
            .map_err(store_status)?;
        let next_page_token = next_page(&mut surveys, limit, fingerprint, |last| SurveyPage {
            after: last.id,
        });
        Ok(Response::new(pb::ListSurveysResponse {
            surveys: surveys.iter().map(convert::survey).collect(),
            next_page_token,
        }))
    }

    async fn update_survey(
        &self,
        request: Request<pb::UpdateSurveyRequest>,
    ) -> Result<Response<pb::UpdateSurveyResponse>, Status> {
        let request = request.into_inner();
        let Some(raw) = request.survey.as_ref() else {
            return Err(one_bad(FieldViolation::with_reason(
                "survey",
                "REQUIRED",
                "is required",
            )));
        };
        let id = validate::uuid("survey.id", &raw.id).map_err(one_bad)?;
        let paths = request
            .update_mask
            .map(|mask| mask.paths)
            .unwrap_or_default();
        let mut violations = Violations::new();
        if paths.is_empty() {
            violations.add("update_mask", "is required: name the fields to change");
        }
        for (index, path) in paths.iter().enumerate() {
            if !UPDATABLE.contains(&path.as_str()) {
                violations.add(
                    format!("update_mask.paths[{index}]"),
                    format!(
                        "'{path}' cannot be updated; the fields that can: {}",
                        UPDATABLE.join(", ")
                    ),
                );
            }
        }
        if request.expected_version < 0 {
            violations.add("expected_version", "must not be negative");
        }
        let has = |name: &str| paths.iter().any(|path| path == name);
        if has("display_name") {
            violations.check(validate::text(
                "survey.display_name",
                &raw.display_name,
                true,
                200,
            ));
        }
        if has("description") {
            violations.check(validate::text(
                "survey.description",
                &raw.description,
                false,
                2000,
            ));
        }
        let questions = has("questions")
            .then(|| requests::questions(&mut violations, "survey.questions", &raw.questions));
        let triggers = has("triggers")
            .then(|| requests::triggers(&mut violations, "survey.triggers", &raw.triggers));
        let fatigue = has("fatigue")
            .then(|| requests::fatigue(&mut violations, "survey.fatigue", raw.fatigue.as_ref()));
        let window = has("response_window").then(|| {
            requests::response_window(
                &mut violations,
                "survey.response_window",
                raw.response_window.as_ref(),
            )
        });
        let purpose = has("consent_purpose").then(|| {
            requests::consent_purpose(
                &mut violations,
                "survey.consent_purpose",
                &raw.consent_purpose,
            )
        });
        let sampling = has("sampling_percent").then(|| {
            requests::sampling_percent(
                &mut violations,
                "survey.sampling_percent",
                raw.sampling_percent,
            )
        });
        let state = if has("state") {
            violations.check(requests::settable_state("survey.state", raw.state))
        } else {
            None
        };
        bad(violations)?;
        let survey = self
            .feedback
            .change_survey(id, request.expected_version, self.now(), |survey| {
                if survey.state == SurveyState::Archived {
                    return Err(FeedbackError::SurveyArchived(survey.id));
                }
                let definition = &mut survey.definition;
                if has("display_name") {
                    definition.display_name = raw.display_name.clone();
                }
                if has("description") {
                    definition.description = raw.description.clone();
                }
                if let Some(questions) = &questions {
                    let mut violations = Violations::new();
                    requests::kind_rule(
                        &mut violations,
                        "survey.questions",
                        survey.kind,
                        questions,
                    );
                    violations
                        .into_result()
                        .map_err(FeedbackError::BadRequest)?;
                    definition.questions = questions.clone();
                }
                if let Some(triggers) = &triggers {
                    definition.triggers = triggers.clone();
                }
                if let Some(fatigue) = fatigue {
                    definition.fatigue = fatigue;
                }
                if let Some(window) = window {
                    definition.response_window = window;
                }
                if let Some(purpose) = &purpose {
                    definition.consent_purpose = purpose.clone();
                }
                if let Some(sampling) = sampling {
                    definition.sampling_percent = sampling;
                }
                if let Some(state) = state {
                    survey.state = state;
                }
                Ok(())
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UpdateSurveyResponse {
            survey: Some(convert::survey(&survey)),
        }))
    }

    async fn archive_survey(
        &self,
        request: Request<pb::ArchiveSurveyRequest>,
    ) -> Result<Response<pb::ArchiveSurveyResponse>, Status> {
        let request = request.into_inner();
        let id = validate::uuid("survey_id", &request.survey_id).map_err(one_bad)?;
        if request.expected_version < 0 {
            return Err(one_bad(FieldViolation::new(
                "expected_version",
                "must not be negative",
            )));
        }
        let now = self.now();
        let survey = self
            .feedback
            .change_survey(id, request.expected_version, now, |survey| {
                if survey.state != SurveyState::Archived {
                    survey.state = SurveyState::Archived;
                    survey.archived_at = Some(now);
                }
                Ok(())
            })
            .await
            .map_err(status)?;
        // Its scheduled dispatches are suppressed now rather than when they
        // fall due (the sweep would too); a retry finds none left.
        let entry =
            move |dispatch: &crate::model::Dispatch| crate::service::dispatch_entry(dispatch, now);
        self.feedback
            .store()
            .suppress_survey_dispatches(survey.id, &entry)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ArchiveSurveyResponse {
            survey: Some(convert::survey(&survey)),
        }))
    }

    async fn list_dispatches(
        &self,
        request: Request<pb::ListDispatchesRequest>,
    ) -> Result<Response<pb::ListDispatchesResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let limit = violations.check(validate::page_size(
            "page_size",
            request.page_size,
            100,
            1000,
        ));
        let filter = request.filter.unwrap_or_default();
        let survey_id = violations
            .check(optional_uuid("filter.survey_id", &filter.survey_id))
            .flatten();
        let customer_id = violations
            .check(optional_uuid("filter.customer_id", &filter.customer_id))
            .flatten();
        let mut states = Vec::new();
        for (index, raw) in filter.states.iter().enumerate() {
            if let Some(state) = violations.check(validate::enum_value::<pb::DispatchState>(
                &format!("filter.states[{index}]"),
                *raw,
                false,
            )) {
                states.extend(convert::dispatch_states_of(state));
            }
        }
        let start = optional_time(
            &mut violations,
            "filter.start_time",
            filter.start_time.as_ref(),
        );
        let end = optional_time(&mut violations, "filter.end_time", filter.end_time.as_ref());
        let fingerprint = paging::fingerprint(&(
            &filter.survey_id,
            &filter.customer_id,
            &filter.states,
            start,
            end,
        ));
        let page = violations.check(paging::decode::<DispatchPage>(
            "page_token",
            &request.page_token,
            fingerprint,
        ));
        bad(violations)?;
        let limit = limit.unwrap_or(100);
        let mut dispatches = self
            .feedback
            .store()
            .list_dispatches(&DispatchQuery {
                survey_id,
                customer_id,
                states,
                start,
                end,
                after: page.flatten().map(|page| (page.due, page.id)),
                limit: limit + 1,
            })
            .await
            .map_err(store_status)?;
        let next_page_token = next_page(&mut dispatches, limit, fingerprint, |last| DispatchPage {
            due: last.due_at,
            id: last.id,
        });
        Ok(Response::new(pb::ListDispatchesResponse {
            dispatches: dispatches.iter().map(convert::dispatch).collect(),
            next_page_token,
        }))
    }

    async fn record_response(
        &self,
        request: Request<pb::RecordResponseRequest>,
    ) -> Result<Response<pb::RecordResponseResponse>, Status> {
        let Some(raw) = request.into_inner().response else {
            return Err(one_bad(FieldViolation::with_reason(
                "response",
                "REQUIRED",
                "is required",
            )));
        };
        let now = self.now();
        let (request, answers) = self
            .read_response(raw, "response", now)
            .map_err(|violations| Status::from(ErrorReport::BadRequest(violations)))?;
        let (response, duplicate) = self
            .feedback
            .record_response(
                request,
                |questions| check_answers("response", &answers, questions),
                now,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RecordResponseResponse {
            response: Some(convert::response(&response)),
            duplicate,
        }))
    }

    async fn record_responses(
        &self,
        request: Request<pb::RecordResponsesRequest>,
    ) -> Result<Response<pb::RecordResponsesResponse>, Status> {
        let raws = request.into_inner().responses;
        if raws.is_empty() {
            return Err(one_bad(FieldViolation::with_reason(
                "responses",
                "REQUIRED",
                "at least one response is required",
            )));
        }
        if raws.len() > MAX_RESPONSE_BATCH {
            return Err(Status::from(ErrorReport::reason(
                Code::ResourceExhausted,
                reasons::BATCH_TOO_LARGE,
                format!(
                    "responses: {} items, at most {MAX_RESPONSE_BATCH} are allowed in one batch",
                    raws.len()
                ),
                &[("limit", MAX_RESPONSE_BATCH.to_string())],
            )));
        }
        let now = self.now();
        let response_ids: Vec<String> = raws.iter().map(|raw| raw.response_id.clone()).collect();
        let mut outcomes: Vec<Option<ResponseOutcome>> = vec![None; raws.len()];
        // The items that read well, with their position in the request.
        let mut read: Vec<(usize, ResponseRequest, Vec<pb::Answer>)> = Vec::new();
        for (index, raw) in raws.into_iter().enumerate() {
            match self.read_response(raw, &format!("responses[{index}]"), now) {
                Ok((request, answers)) => read.push((index, request, answers)),
                Err(violations) => {
                    outcomes[index] = Some(Err(FeedbackError::BadRequest(violations)))
                }
            }
        }
        let (positions, (requests, answers)): (Vec<usize>, (Vec<_>, Vec<_>)) = read
            .into_iter()
            .map(|(index, request, answers)| (index, (request, answers)))
            .unzip();
        let recorded = self
            .feedback
            .record_responses(
                requests,
                |i, questions| {
                    check_answers(
                        &format!("responses[{}]", positions[i]),
                        &answers[i],
                        questions,
                    )
                },
                now,
            )
            .await
            .map_err(status)?;
        for (index, outcome) in positions.into_iter().zip(recorded) {
            outcomes[index] = Some(outcome);
        }
        let mut reply = pb::RecordResponsesResponse::default();
        for (index, (outcome, response_id)) in outcomes.into_iter().zip(response_ids).enumerate() {
            let mut result = pb::RecordResponseResult {
                index: index as i32,
                response_id,
                ..Default::default()
            };
            match outcome {
                Some(Ok((response, duplicate))) => {
                    result.status = if duplicate {
                        reply.duplicate_count += 1;
                        pb::ResponseRecordStatus::Duplicate
                    } else {
                        reply.stored_count += 1;
                        pb::ResponseRecordStatus::Stored
                    } as i32;
                    result.response = Some(convert::response(&response));
                }
                Some(Err(err)) => {
                    reply.refused_count += 1;
                    refusal(&mut result, err);
                }
                None => {
                    reply.refused_count += 1;
                    refusal(
                        &mut result,
                        FeedbackError::Store(StoreError::Internal(
                            "a response of the batch was left without an outcome".into(),
                        )),
                    );
                }
            }
            reply.results.push(result);
        }
        Ok(Response::new(reply))
    }

    async fn list_responses(
        &self,
        request: Request<pb::ListResponsesRequest>,
    ) -> Result<Response<pb::ListResponsesResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let limit = violations.check(validate::page_size(
            "page_size",
            request.page_size,
            100,
            1000,
        ));
        let filter = request.filter.unwrap_or_default();
        let survey_id = violations
            .check(optional_uuid("filter.survey_id", &filter.survey_id))
            .flatten();
        let customer_id = violations
            .check(optional_uuid("filter.customer_id", &filter.customer_id))
            .flatten();
        let start = optional_time(
            &mut violations,
            "filter.start_time",
            filter.start_time.as_ref(),
        );
        let end = optional_time(&mut violations, "filter.end_time", filter.end_time.as_ref());
        let fingerprint =
            paging::fingerprint(&(&filter.survey_id, &filter.customer_id, start, end));
        let page = violations.check(paging::decode::<ResponsePage>(
            "page_token",
            &request.page_token,
            fingerprint,
        ));
        bad(violations)?;
        let limit = limit.unwrap_or(100);
        let mut responses = self
            .feedback
            .store()
            .list_responses(&ResponseQuery {
                survey_id,
                customer_id,
                start,
                end,
                before: page.flatten().map(|page| (page.submitted, page.id)),
                limit: limit + 1,
            })
            .await
            .map_err(store_status)?;
        let next_page_token = next_page(&mut responses, limit, fingerprint, |last| ResponsePage {
            submitted: last.submitted_at,
            id: last.id,
        });
        Ok(Response::new(pb::ListResponsesResponse {
            responses: responses.iter().map(convert::response).collect(),
            next_page_token,
        }))
    }

    async fn get_survey_summary(
        &self,
        request: Request<pb::GetSurveySummaryRequest>,
    ) -> Result<Response<pb::GetSurveySummaryResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let survey_id = violations.check(validate::uuid("survey_id", &request.survey_id));
        let start = optional_time(&mut violations, "start_time", request.start_time.as_ref());
        let end = optional_time(&mut violations, "end_time", request.end_time.as_ref());
        if let (Some(start), Some(end)) = (start, end)
            && end < start
        {
            violations.add("end_time", "must not be before start_time");
        }
        bad(violations)?;
        let survey_id = survey_id.expect("checked above");
        let survey = self.feedback.survey(survey_id).await.map_err(status)?;
        let start = start.unwrap_or(survey.created_at);
        // Up to now: responses may be submitted up to the allowed skew ahead.
        let end = end.unwrap_or_else(|| {
            self.now()
                + chrono::TimeDelta::from_std(self.max_future_skew).unwrap_or_default()
                + chrono::TimeDelta::microseconds(1)
        });
        let tally = self
            .feedback
            .store()
            .tally(survey_id, start, end)
            .await
            .map_err(store_status)?;
        Ok(Response::new(convert::summary(&request.survey_id, &tally)))
    }

    type StreamFeedbackLogStream = LogResponses<pb::StreamFeedbackLogResponse>;

    async fn stream_feedback_log(
        &self,
        request: Request<pb::StreamFeedbackLogRequest>,
    ) -> Result<Response<Self::StreamFeedbackLogStream>, Status> {
        let request = request.into_inner();
        let (after, shard) = log_position(&request.after_cursor, request.shard)?;
        let stream = self
            .feedback
            .store()
            .log()
            .tail(
                after,
                shard,
                10_000,
                request.stop_at_end,
                self.shutdown.clone(),
            )
            .map(|batch| {
                let batch = batch.map_err(|err| store_status(StoreError::from_db(err)))?;
                let entries = batch
                    .into_iter()
                    .map(|entry| {
                        let mut decoded = pb::FeedbackLogEntry::decode(entry.payload.as_slice())
                            .map_err(|err| {
                                store_status(StoreError::corrupt("feedback log entry", err))
                            })?;
                        decoded.cursor = entry.cursor.to_string();
                        Ok(decoded)
                    })
                    .collect::<Result<Vec<_>, Status>>()?;
                Ok(pb::StreamFeedbackLogResponse { entries })
            });
        Ok(Response::new(respond(stream)))
    }
}
