//! What the feedback service does with a checked request: the rules of a
//! survey's life (versions, archiving), and recording a response (once per
//! response id, one per dispatch, within the response window, with its
//! sentiment, figures and log entry). No protobuf requests here: `grpc`
//! reads them; the log entries are the one protobuf this writes.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use clm_platform::FieldViolation;
use clm_platform::identity::{IdentityResolver, IdentityUnavailable, Reference, Resolution};
use clm_proto::feedback as pb;
use prost::Message as _;
use uuid::Uuid;

use crate::grpc::convert;
use crate::model::{
    Answer, AnswerValue, DispatchState, Question, Response, Survey, SurveyDefinition, SurveyKind,
    SurveyState,
};
use crate::sentiment;
use crate::store::{Created, FeedbackStore, LogEntry, NewResponse, Recorded, StoreError, Updated};
use crate::summary::Tally;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    /// Bad fields.
    #[error("invalid request")]
    BadRequest(Vec<FieldViolation>),
    /// No such survey.
    #[error("survey {0} not found")]
    SurveyNotFound(Uuid),
    /// The survey is archived.
    #[error("survey {0} is archived")]
    SurveyArchived(Uuid),
    /// The stored version differs from the expected one.
    #[error("version {current} is stored, not {expected}")]
    VersionConflict {
        /// What the caller expected.
        expected: i64,
        /// What is stored.
        current: i64,
    },
    /// No such dispatch.
    #[error("dispatch {0} not found")]
    DispatchNotFound(Uuid),
    /// The dispatch belongs to another survey or customer.
    #[error("{}: {}", .0.field, .0.description)]
    DispatchMismatch(FieldViolation),
    /// The dispatch does not take responses in its state.
    #[error("dispatch {id} is {state}")]
    DispatchNotOpen {
        /// The dispatch.
        id: Uuid,
        /// Its state.
        state: &'static str,
    },
    /// The dispatch was answered by another response.
    #[error("dispatch {0} was answered by another response")]
    DispatchAnswered(Uuid),
    /// The response came after the dispatch's window closed.
    #[error("the response window of dispatch {id} closed at {expired_at}")]
    WindowClosed {
        /// The dispatch.
        id: Uuid,
        /// When its window closed.
        expired_at: DateTime<Utc>,
    },
    /// Identity refused the customer reference.
    #[error("{}", .problems.first().map_or("", |(_, description)| description.as_str()))]
    CustomerRefused {
        /// Identity's reason.
        reason: String,
        /// The bad fields, relative to the reference, and why.
        problems: Vec<(String, String)>,
    },
    /// Identity could not be asked.
    #[error(transparent)]
    IdentityUnavailable(#[from] IdentityUnavailable),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The feedback service's operations.
#[derive(Clone)]
pub struct Feedback {
    store: Arc<dyn FeedbackStore>,
    resolver: IdentityResolver,
}

/// A response as read from a request: everything but what the server
/// decides (ids, times, the customer when only the dispatch names it).
#[derive(Debug, Clone)]
pub struct ResponseRequest {
    /// The caller's id.
    pub response_id: String,
    /// The survey.
    pub survey_id: Uuid,
    /// The dispatch answered.
    pub dispatch_id: Option<Uuid>,
    /// Who responded, when the request says.
    pub customer: Option<Reference>,
    /// When the customer answered (checked against the clock's skew).
    pub submitted_at: DateTime<Utc>,
}

impl Feedback {
    /// Operations over `store`, resolving customers with `resolver`.
    pub fn new(store: Arc<dyn FeedbackStore>, resolver: IdentityResolver) -> Self {
        Self { store, resolver }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn FeedbackStore> {
        &self.store
    }

    /// Creates a survey (or returns the one created with `request_id`).
    pub async fn create_survey(
        &self,
        kind: SurveyKind,
        state: SurveyState,
        definition: SurveyDefinition,
        request_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Survey, FeedbackError> {
        let survey = Survey {
            id: Uuid::now_v7(),
            kind,
            definition,
            state,
            version: 1,
            questions_version: 1,
            created_at: now,
            updated_at: now,
            archived_at: None,
        };
        Ok(match self.store.create_survey(&survey, request_id).await? {
            Created::New(survey) | Created::Earlier(survey) => survey,
        })
    }

    /// A survey.
    pub async fn survey(&self, id: Uuid) -> Result<Survey, FeedbackError> {
        self.store
            .survey(id)
            .await?
            .ok_or(FeedbackError::SurveyNotFound(id))
    }

    /// Applies `change` to the stored survey (read, changed, written back
    /// under its version), after checking `expected_version` (0: any).
    pub async fn change_survey(
        &self,
        id: Uuid,
        expected_version: i64,
        now: DateTime<Utc>,
        change: impl Fn(&mut Survey) -> Result<(), FeedbackError>,
    ) -> Result<Survey, FeedbackError> {
        let current = self.survey(id).await?;
        if expected_version > 0 && current.version != expected_version {
            return Err(FeedbackError::VersionConflict {
                expected: expected_version,
                current: current.version,
            });
        }
        let mut next = current.clone();
        change(&mut next)?;
        if next == current {
            return Ok(current);
        }
        next.version = current.version + 1;
        next.updated_at = now;
        if next.definition.questions != current.definition.questions {
            next.questions_version = next.version;
        }
        match self.store.update_survey(&next).await? {
            Updated::Done(survey) => Ok(survey),
            Updated::NotFound => Err(FeedbackError::SurveyNotFound(id)),
            Updated::VersionChanged(stored) => Err(FeedbackError::VersionConflict {
                expected: if expected_version > 0 {
                    expected_version
                } else {
                    current.version
                },
                current: stored,
            }),
        }
    }

    /// Records a response; answers are checked by `check_answers` against
    /// the questions the survey has now. Returns the stored response and
    /// whether it was stored before.
    pub async fn record_response(
        &self,
        request: ResponseRequest,
        check_answers: impl FnOnce(&[Question]) -> Result<Vec<Answer>, Vec<FieldViolation>>,
        now: DateTime<Utc>,
    ) -> Result<(Response, bool), FeedbackError> {
        if let Some(earlier) = self
            .store
            .response_by_response_id(&request.response_id)
            .await?
        {
            return Ok((earlier, true));
        }
        let survey = self.survey(request.survey_id).await?;
        if survey.state == SurveyState::Archived {
            return Err(FeedbackError::SurveyArchived(survey.id));
        }
        let dispatch = match request.dispatch_id {
            None => None,
            Some(id) => {
                let dispatch = self
                    .store
                    .dispatch(id)
                    .await?
                    .ok_or(FeedbackError::DispatchNotFound(id))?;
                if dispatch.survey_id != survey.id {
                    return Err(FeedbackError::DispatchMismatch(
                        FieldViolation::with_reason(
                            "response.dispatch_id",
                            "DISPATCH_MISMATCH",
                            format!(
                                "belongs to survey {}, not to {}",
                                dispatch.survey_id, survey.id
                            ),
                        ),
                    ));
                }
                match dispatch.state {
                    DispatchState::Dispatched => {}
                    DispatchState::Responded => {
                        return Err(FeedbackError::DispatchAnswered(id));
                    }
                    other => {
                        return Err(FeedbackError::DispatchNotOpen {
                            id,
                            state: other.as_str(),
                        });
                    }
                }
                if let Some(expired_at) = dispatch.expires_at.filter(|at| *at <= now) {
                    return Err(FeedbackError::WindowClosed { id, expired_at });
                }
                Some(dispatch)
            }
        };
        if let Some(dispatch) = &dispatch
            && matches!(
                self.store
                    .fates(&[dispatch.customer_id])
                    .await?
                    .get(&dispatch.customer_id),
                Some(crate::model::Fate::Erased)
            )
        {
            return Err(FeedbackError::CustomerRefused {
                reason: clm_platform::error::reasons::CUSTOMER_ERASED.to_owned(),
                problems: vec![(
                    String::new(),
                    format!("customer {} was erased", dispatch.customer_id),
                )],
            });
        }
        let customer_id = match (&request.customer, &dispatch) {
            (None, Some(dispatch)) => dispatch.customer_id,
            (Some(reference), dispatch) => {
                let resolved = self.resolve(reference).await?;
                if let Some(dispatch) = dispatch
                    && dispatch.customer_id != resolved
                {
                    return Err(FeedbackError::DispatchMismatch(
                        FieldViolation::with_reason(
                            "response.customer",
                            "DISPATCH_MISMATCH",
                            format!(
                                "is customer {resolved}, the dispatch was made to {}",
                                dispatch.customer_id
                            ),
                        ),
                    ));
                }
                resolved
            }
            (None, None) => {
                return Err(FeedbackError::BadRequest(vec![
                    FieldViolation::with_reason(
                        "response.customer",
                        "REQUIRED",
                        "is required unless dispatch_id is set",
                    ),
                ]));
            }
        };
        let questions = &survey.definition.questions;
        let mut answers = check_answers(questions).map_err(FeedbackError::BadRequest)?;
        for answer in &mut answers {
            if let AnswerValue::Text(Some(text)) = &answer.value {
                answer.sentiment = Some(sentiment::analyse(text));
            }
        }
        let texts: Vec<(&str, Option<crate::model::Sentiment>)> = answers
            .iter()
            .filter_map(|answer| match &answer.value {
                AnswerValue::Text(Some(text)) => Some((text.as_str(), answer.sentiment)),
                _ => None,
            })
            .collect();
        let overall = match texts.as_slice() {
            [] => None,
            [(_, one)] => *one,
            many => sentiment::analyse_all(many.iter().map(|(text, _)| *text)),
        };
        let response = Response {
            id: Uuid::now_v7(),
            response_id: request.response_id,
            survey_id: survey.id,
            survey_version: survey.questions_version,
            dispatch_id: dispatch.as_ref().map(|d| d.id),
            customer_id,
            answers,
            submitted_at: request.submitted_at,
            sentiment: overall,
            recorded_at: now,
        };
        let tally = Tally::of_response(&response, questions);
        let mut log = vec![response_entry(&survey, &response, questions)];
        if let Some(dispatch) = &dispatch {
            let mut answered = dispatch.clone();
            answered.state = DispatchState::Responded;
            answered.responded_at = Some(now);
            log.push(dispatch_entry(&answered, now));
        }
        let new = NewResponse {
            response,
            tally,
            log,
        };
        match self.store.record_response(&new).await? {
            Recorded::New(response) => Ok((response, false)),
            Recorded::Duplicate(earlier) => Ok((earlier, true)),
            Recorded::DispatchClosed => {
                let id = new.response.dispatch_id.unwrap_or_default();
                Err(match self.store.dispatch(id).await?.map(|d| d.state) {
                    Some(DispatchState::Responded) => FeedbackError::DispatchAnswered(id),
                    Some(state) => FeedbackError::DispatchNotOpen {
                        id,
                        state: state.as_str(),
                    },
                    None => FeedbackError::DispatchNotFound(id),
                })
            }
        }
    }

    async fn resolve(&self, reference: &Reference) -> Result<Uuid, FeedbackError> {
        let resolution = self
            .resolver
            .resolve(std::slice::from_ref(reference))
            .await?
            .into_iter()
            .next();
        match resolution {
            Some(Resolution::Customer(id)) => Ok(id),
            Some(Resolution::Refused { reason, problems }) => {
                Err(FeedbackError::CustomerRefused { reason, problems })
            }
            None => Err(FeedbackError::IdentityUnavailable(IdentityUnavailable(
                "identity answered no resolution".into(),
            ))),
        }
    }
}

/// The log entry of a recorded response: ids, scores and sentiment, no
/// free text.
fn response_entry(survey: &Survey, response: &Response, questions: &[Question]) -> LogEntry {
    let change = pb::feedback_log_entry::Change::ResponseRecorded(pb::ResponseRecorded {
        id: response.id.to_string(),
        response_id: response.response_id.clone(),
        survey_id: survey.id.to_string(),
        survey_kind: convert::kind(survey.kind) as i32,
        dispatch_id: response
            .dispatch_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
        submit_time: Some(clm_platform::time::to_timestamp(response.submitted_at)),
        scores: response
            .scored_answers(questions)
            .iter()
            .map(convert::scored_answer)
            .collect(),
        sentiment: response.sentiment.as_ref().map(convert::sentiment),
    });
    log_entry(
        response.customer_id,
        "response.recorded",
        change,
        response.recorded_at,
    )
}

/// The log entry of a dispatch after a change.
pub fn dispatch_entry(dispatch: &crate::model::Dispatch, now: DateTime<Utc>) -> LogEntry {
    let change = pb::feedback_log_entry::Change::DispatchChanged(pb::DispatchChanged {
        dispatch: Some(convert::dispatch(dispatch)),
    });
    log_entry(dispatch.customer_id, "dispatch.changed", change, now)
}

/// The log entry of an erasure that deleted the free text of `count`
/// responses of `customer_id`.
pub fn text_erased_entry(customer_id: Uuid, count: i64, now: DateTime<Utc>) -> LogEntry {
    let change = pb::feedback_log_entry::Change::ResponseTextErased(pb::ResponseTextErased {
        response_count: count,
    });
    log_entry(customer_id, "response.text_erased", change, now)
}

fn log_entry(
    customer_id: Uuid,
    kind: &'static str,
    change: pb::feedback_log_entry::Change,
    now: DateTime<Utc>,
) -> LogEntry {
    let event_id = Uuid::now_v7();
    let entry = pb::FeedbackLogEntry {
        cursor: String::new(),
        entry_id: event_id.to_string(),
        customer_id: customer_id.to_string(),
        commit_time: Some(clm_platform::time::to_timestamp(now)),
        change: Some(change),
    };
    LogEntry {
        event_id,
        customer_id,
        kind,
        payload: entry.encode_to_vec(),
        recorded_at: now,
    }
}
