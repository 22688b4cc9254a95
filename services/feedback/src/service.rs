//! What the feedback service does with a checked request: the rules of a
//! survey's life (versions, archiving), and recording a response (once per
//! response id, one per dispatch, within the response window, with its
//! sentiment, figures and log entry). No protobuf requests here: `grpc`
//! reads them; the log entries are the one protobuf this writes.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
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
#[derive(Debug, Clone, thiserror::Error)]
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
        /// The reference's field in the request (`response.customer`).
        field: String,
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
    /// The response's field in the request (`response`, `responses[3]`),
    /// which the paths of refusals start with.
    pub field: String,
}

/// What recording one response of a batch came to: the stored response
/// and whether it was stored before, or why it was refused.
pub type ResponseOutcome = Result<(Response, bool), FeedbackError>;

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
        check_answers: impl Fn(&[Question]) -> Result<Vec<Answer>, Vec<FieldViolation>>,
        now: DateTime<Utc>,
    ) -> Result<(Response, bool), FeedbackError> {
        self.record_responses(vec![request], |_, questions| check_answers(questions), now)
            .await?
            .pop()
            .unwrap_or_else(|| {
                Err(FeedbackError::Store(StoreError::Internal(
                    "a response was recorded with no outcome".into(),
                )))
            })
    }

    /// Records a batch of responses, each as [`Self::record_response`]
    /// would alone, with one outcome per request in order;
    /// `check_answers(i, questions)` checks the answers of request `i`. The
    /// reads are made once for the batch (earlier responses, surveys,
    /// dispatches, customers) and the stored responses are written in one
    /// transaction. Fails as a whole only when identity or the store cannot
    /// be used; then nothing is stored.
    pub async fn record_responses(
        &self,
        requests: Vec<ResponseRequest>,
        check_answers: impl Fn(usize, &[Question]) -> Result<Vec<Answer>, Vec<FieldViolation>>,
        now: DateTime<Utc>,
    ) -> Result<Vec<ResponseOutcome>, FeedbackError> {
        let mut outcomes: Vec<Option<ResponseOutcome>> = vec![None; requests.len()];
        // A repeat of an earlier item's response id is answered like it.
        let mut first_of: HashMap<&str, usize> = HashMap::new();
        let mut repeats: Vec<(usize, usize)> = Vec::new();
        let mut open: Vec<usize> = Vec::with_capacity(requests.len());
        for (index, request) in requests.iter().enumerate() {
            match first_of.entry(request.response_id.as_str()) {
                Entry::Occupied(first) => repeats.push((index, *first.get())),
                Entry::Vacant(slot) => {
                    slot.insert(index);
                    open.push(index);
                }
            }
        }
        let response_ids: Vec<&str> = open
            .iter()
            .map(|&i| requests[i].response_id.as_str())
            .collect();
        let mut earlier = self.store.responses_by_response_ids(&response_ids).await?;
        refuse(&mut open, &mut outcomes, |i| {
            earlier
                .remove(&requests[i].response_id)
                .map(|earlier| Ok((earlier, true)))
        });

        let mut surveys: HashMap<Uuid, Option<Survey>> = HashMap::new();
        for &i in &open {
            if let Entry::Vacant(slot) = surveys.entry(requests[i].survey_id) {
                slot.insert(self.store.survey(requests[i].survey_id).await?);
            }
        }
        refuse(&mut open, &mut outcomes, |i| {
            let id = requests[i].survey_id;
            match &surveys[&id] {
                None => Some(Err(FeedbackError::SurveyNotFound(id))),
                Some(survey) if survey.state == SurveyState::Archived => {
                    Some(Err(FeedbackError::SurveyArchived(id)))
                }
                Some(_) => None,
            }
        });

        let mut dispatch_ids: Vec<Uuid> = open
            .iter()
            .filter_map(|&i| requests[i].dispatch_id)
            .collect();
        dispatch_ids.sort_unstable();
        dispatch_ids.dedup();
        let dispatches = if dispatch_ids.is_empty() {
            HashMap::new()
        } else {
            self.store.dispatches(&dispatch_ids).await?
        };
        let mut claimed: HashSet<Uuid> = HashSet::new();
        refuse(&mut open, &mut outcomes, |i| {
            let request = &requests[i];
            let id = request.dispatch_id?;
            let refusal = match dispatches.get(&id) {
                None => FeedbackError::DispatchNotFound(id),
                Some(dispatch) if dispatch.survey_id != request.survey_id => {
                    FeedbackError::DispatchMismatch(FieldViolation::with_reason(
                        format!("{}.dispatch_id", request.field),
                        "DISPATCH_MISMATCH",
                        format!(
                            "belongs to survey {}, not to {}",
                            dispatch.survey_id, request.survey_id
                        ),
                    ))
                }
                Some(dispatch) => match dispatch.state {
                    DispatchState::Responded => FeedbackError::DispatchAnswered(id),
                    DispatchState::Dispatched => {
                        match dispatch.expires_at.filter(|at| *at <= now) {
                            Some(expired_at) => FeedbackError::WindowClosed { id, expired_at },
                            // Another item of the batch answers it.
                            None if !claimed.insert(id) => FeedbackError::DispatchAnswered(id),
                            None => return None,
                        }
                    }
                    other => FeedbackError::DispatchNotOpen {
                        id,
                        state: other.as_str(),
                    },
                },
            };
            Some(Err(refusal))
        });

        let dispatch_of = |i: usize| requests[i].dispatch_id.and_then(|id| dispatches.get(&id));
        let mut answering: Vec<Uuid> = open
            .iter()
            .filter_map(|&i| dispatch_of(i).map(|d| d.customer_id))
            .collect();
        answering.sort_unstable();
        answering.dedup();
        let fates = if answering.is_empty() {
            HashMap::new()
        } else {
            self.store.fates(&answering).await?
        };
        refuse(&mut open, &mut outcomes, |i| {
            let dispatch = dispatch_of(i)?;
            matches!(
                fates.get(&dispatch.customer_id),
                Some(crate::model::Fate::Erased)
            )
            .then(|| {
                Err(FeedbackError::CustomerRefused {
                    field: format!("{}.customer", requests[i].field),
                    reason: clm_platform::error::reasons::CUSTOMER_ERASED.to_owned(),
                    problems: vec![(
                        String::new(),
                        format!("customer {} was erased", dispatch.customer_id),
                    )],
                })
            })
        });

        let referring: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&i| requests[i].customer.is_some())
            .collect();
        let references: Vec<Reference> = referring
            .iter()
            .filter_map(|&i| requests[i].customer.clone())
            .collect();
        let mut resolved: HashMap<usize, Resolution> = HashMap::new();
        if !references.is_empty() {
            let resolutions = self.resolver.resolve(&references).await?;
            if resolutions.len() != references.len() {
                return Err(FeedbackError::IdentityUnavailable(IdentityUnavailable(
                    "identity answered too few resolutions".into(),
                )));
            }
            resolved.extend(referring.iter().copied().zip(resolutions));
        }
        let mut customers: HashMap<usize, Uuid> = HashMap::new();
        refuse(&mut open, &mut outcomes, |i| {
            let request = &requests[i];
            let dispatch = dispatch_of(i);
            let customer_id = match (resolved.remove(&i), dispatch) {
                (None, Some(dispatch)) => dispatch.customer_id,
                (Some(Resolution::Customer(id)), dispatch) => {
                    if let Some(dispatch) = dispatch
                        && dispatch.customer_id != id
                    {
                        return Some(Err(FeedbackError::DispatchMismatch(
                            FieldViolation::with_reason(
                                format!("{}.customer", request.field),
                                "DISPATCH_MISMATCH",
                                format!(
                                    "is customer {id}, the dispatch was made to {}",
                                    dispatch.customer_id
                                ),
                            ),
                        )));
                    }
                    id
                }
                (Some(Resolution::Refused { reason, problems }), _) => {
                    return Some(Err(FeedbackError::CustomerRefused {
                        field: format!("{}.customer", request.field),
                        reason,
                        problems,
                    }));
                }
                (None, None) => {
                    return Some(Err(FeedbackError::BadRequest(vec![
                        FieldViolation::with_reason(
                            format!("{}.customer", request.field),
                            "REQUIRED",
                            "is required unless dispatch_id is set",
                        ),
                    ])));
                }
            };
            customers.insert(i, customer_id);
            None
        });

        let mut news: Vec<(usize, NewResponse)> = Vec::with_capacity(open.len());
        for &i in &open {
            let request = &requests[i];
            let Some(survey) = surveys[&request.survey_id].as_ref() else {
                continue;
            };
            let questions = &survey.definition.questions;
            match check_answers(i, questions) {
                Err(violations) => outcomes[i] = Some(Err(FeedbackError::BadRequest(violations))),
                Ok(answers) => news.push((
                    i,
                    new_response(request, survey, dispatch_of(i), customers[&i], answers, now),
                )),
            }
        }

        let batch: Vec<NewResponse> = news.iter().map(|(_, new)| new.clone()).collect();
        let recorded = self.store.record_responses(&batch).await?;
        let mut closed: Vec<(usize, Uuid)> = Vec::new();
        for ((i, new), recorded) in news.iter().zip(recorded) {
            outcomes[*i] = Some(match recorded {
                Recorded::New(response) => Ok((response, false)),
                Recorded::Duplicate(earlier) => Ok((earlier, true)),
                Recorded::DispatchClosed => {
                    closed.push((*i, new.response.dispatch_id.unwrap_or_default()));
                    continue;
                }
            });
        }
        if !closed.is_empty() {
            let ids: Vec<Uuid> = closed.iter().map(|(_, id)| *id).collect();
            let now_stored = self.store.dispatches(&ids).await?;
            for (i, id) in closed {
                outcomes[i] = Some(Err(match now_stored.get(&id).map(|d| d.state) {
                    Some(DispatchState::Responded) => FeedbackError::DispatchAnswered(id),
                    Some(state) => FeedbackError::DispatchNotOpen {
                        id,
                        state: state.as_str(),
                    },
                    None => FeedbackError::DispatchNotFound(id),
                }));
            }
        }
        for (repeat, first) in repeats {
            outcomes[repeat] = match &outcomes[first] {
                Some(Ok((response, _))) => Some(Ok((response.clone(), true))),
                other => other.clone(),
            };
        }
        Ok(outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| {
                    Err(FeedbackError::Store(StoreError::Internal(
                        "a response of the batch was left without an outcome".into(),
                    )))
                })
            })
            .collect())
    }
}

/// Settles the outcome of the open items `decide` has one for and keeps
/// the others open.
fn refuse(
    open: &mut Vec<usize>,
    outcomes: &mut [Option<ResponseOutcome>],
    mut decide: impl FnMut(usize) -> Option<ResponseOutcome>,
) {
    open.retain(|&i| match decide(i) {
        Some(outcome) => {
            outcomes[i] = Some(outcome);
            false
        }
        None => true,
    });
}

/// The response to store for a checked request: answers with their
/// sentiment, the overall sentiment, its figures and log entries.
fn new_response(
    request: &ResponseRequest,
    survey: &Survey,
    dispatch: Option<&crate::model::Dispatch>,
    customer_id: Uuid,
    mut answers: Vec<Answer>,
    now: DateTime<Utc>,
) -> NewResponse {
    let questions = &survey.definition.questions;
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
        response_id: request.response_id.clone(),
        survey_id: survey.id,
        survey_version: survey.questions_version,
        dispatch_id: dispatch.map(|d| d.id),
        customer_id,
        answers,
        submitted_at: request.submitted_at,
        sentiment: overall,
        recorded_at: now,
    };
    let tally = Tally::of_response(&response, questions);
    let mut log = vec![response_entry(survey, &response, questions)];
    if let Some(dispatch) = dispatch {
        let mut answered = dispatch.clone();
        answered.state = DispatchState::Responded;
        answered.responded_at = Some(now);
        log.push(dispatch_entry(&answered, now));
    }
    NewResponse {
        response,
        tally,
        log,
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
