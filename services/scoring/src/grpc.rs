//! `clm.scoring.v1.LifecycleService` over the scorer and the store.

use clm_eventlog::serving::{LogResponses, log_position, respond};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use clm_platform::error::{ErrorReport, FieldViolation, StatusBuilder, Violations, reasons};
use clm_platform::server::Shutdown;
use clm_platform::service::PeerChannel;
use clm_platform::{paging, validate};
use clm_proto::scoring as pb;
use clm_proto::scoring::lifecycle_service_server::LifecycleService;
use clm_proto::touchpoint as touchpoint_pb;
use clm_proto::touchpoint::touchpoint_service_client::TouchpointServiceClient;
use futures_util::StreamExt as _;
use prost::Message as _;
use tokio::sync::Notify;
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

use crate::compiled_model::CompiledModel;
use crate::history::{Cause, RecordedTransition};
use crate::model::{DecayedWeights, Model};
use crate::model_proto::{timestamp_from_proto, timestamp_to_proto};
use crate::rescore;
use crate::scorer::{Scorer, ScoringError};
use crate::store::{Activation, CustomerRecord, Fence, ModelInsert, StoreError, TransitionQuery};
use crate::validation::ModelViolation;

/// The newest touchpoints an explanation looks at for its top contributors
/// (older ones have decayed the most).
const EXPLAIN_TOUCHPOINTS: i32 = 1000;

/// The gRPC service.
#[derive(Clone)]
pub struct LifecycleGrpc {
    scorer: Arc<Scorer>,
    touchpoints: TouchpointServiceClient<PeerChannel>,
    rescore_wake: Arc<Notify>,
    shutdown: Shutdown,
}

impl LifecycleGrpc {
    /// The service over `scorer`, reading timelines from touchpoints.
    pub fn new(
        scorer: Arc<Scorer>,
        touchpoints: PeerChannel,
        rescore_wake: Arc<Notify>,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            scorer,
            touchpoints: TouchpointServiceClient::new(touchpoints),
            rescore_wake,
            shutdown,
        }
    }

    /// The lifecycle record standing for `id` (the survivor of a merged
    /// customer), when evaluated.
    async fn lifecycle_of(&self, id: Uuid) -> Result<CustomerRecord, Status> {
        let mut id = id;
        for _ in 0..8 {
            let record = self
                .scorer
                .store()
                .load_customers(&[id])
                .await
                .map_err(store_status)?
                .remove(&id);
            match record {
                Some(record) => match record.merged_into {
                    Some(survivor) => id = survivor,
                    None if record.snapshot.is_some() => return Ok(record),
                    None => break,
                },
                None => break,
            }
        }
        Err(not_found(id))
    }

    /// The customer's newest transition.
    async fn last_transition(&self, id: Uuid) -> Result<Option<pb::Transition>, Status> {
        self.scorer
            .store()
            .last_transition(id)
            .await
            .map(|transition| transition.as_ref().map(RecordedTransition::to_proto))
            .map_err(store_status)
    }
}

fn not_found(id: Uuid) -> Status {
    StatusBuilder::with_reason(
        Code::NotFound,
        format!("customer {id} has no lifecycle: the service has not seen a touchpoint of theirs"),
        reasons::CUSTOMER_NOT_SCORED,
        &[("customer_id", &id.to_string())],
    )
}

fn store_status(err: StoreError) -> Status {
    store_report(err).into()
}

fn scoring_status(err: ScoringError) -> Status {
    scoring_report(err).into()
}

/// How a store failure is told to a caller.
fn store_report(err: StoreError) -> ErrorReport {
    let internal = |detail: String| ErrorReport::Internal {
        context: "accessing the scoring database",
        detail,
    };
    match err {
        StoreError::Unavailable(detail) => ErrorReport::Unavailable {
            what: "the scoring database",
            detail,
        },
        StoreError::Conflict(_) => ErrorReport::reason(
            Code::Aborted,
            reasons::CONCURRENT_CHANGE,
            "the customer changed concurrently; retry",
            &[],
        ),
        // The background writers' outcomes: a call never meets them.
        err @ (StoreError::CursorMoved(_)
        | StoreError::LeaseLost(_)
        | StoreError::RescoreStopped) => internal(err.to_string()),
        StoreError::Corrupt(detail) | StoreError::Internal(detail) => internal(detail),
    }
}

/// How a scoring failure is told to a caller.
fn scoring_report(err: ScoringError) -> ErrorReport {
    match err {
        ScoringError::Store(err) => store_report(err),
        err @ (ScoringError::BadModel(_) | ScoringError::NoActiveModel) => ErrorReport::Internal {
            context: "scoring",
            detail: err.to_string(),
        },
    }
}

fn done<T>(violations: Violations, value: impl FnOnce() -> T) -> Result<T, Status> {
    violations
        .into_result()
        .map_err(|v| StatusBuilder::invalid_argument(&v))?;
    Ok(value())
}

fn customer_id(field: &str, raw: &str) -> Result<Uuid, Status> {
    validate::uuid(field, raw).map_err(|v| StatusBuilder::invalid_argument(&[v]))
}

fn time_field(
    violations: &mut Violations,
    field: &str,
    raw: Option<&prost_types::Timestamp>,
) -> Option<DateTime<Utc>> {
    let raw = raw?;
    let parsed = timestamp_from_proto(raw);
    if parsed.is_none() {
        violations.add(field, "is not a valid timestamp");
    }
    parsed
}

/// INVALID_ARGUMENT listing a model's violations, each naming its rule.
fn model_violations(violations: &[ModelViolation]) -> Status {
    let fields: Vec<FieldViolation> = violations
        .iter()
        .map(|violation| {
            let description = if violation.rule_name.is_empty() {
                violation.description.clone()
            } else {
                format!("rule '{}': {}", violation.rule_name, violation.description)
            };
            FieldViolation::new(violation.field.clone(), description)
        })
        .collect();
    StatusBuilder::invalid_argument(&fields)
}

/// The model in a request, checked: every violation, in field order, when
/// invalid.
fn checked_model(message: &pb::Model) -> Result<Model, Vec<ModelViolation>> {
    CompiledModel::from_proto(message).map(|compiled| compiled.model().clone())
}

fn top_touchpoints(
    weights: &DecayedWeights,
    touchpoints: &[touchpoint_pb::Touchpoint],
    now: DateTime<Utc>,
    limit: usize,
) -> Vec<pb::TouchpointContribution> {
    let mut contributions: Vec<pb::TouchpointContribution> = touchpoints
        .iter()
        .filter_map(|touchpoint| {
            let occurred_at = timestamp_from_proto(touchpoint.occur_time.as_ref()?)?;
            let contribution = weights.contribution(&touchpoint.r#type, occurred_at, now)?;
            Some(pb::TouchpointContribution {
                touchpoint_id: touchpoint.id.clone(),
                r#type: touchpoint.r#type.clone(),
                occur_time: touchpoint.occur_time,
                weight: contribution.weight,
                decay: contribution.decay,
                points: contribution.points,
            })
        })
        .collect();
    contributions.sort_by(|a, b| b.points.abs().total_cmp(&a.points.abs()));
    contributions.truncate(limit);
    contributions
}

type TransitionStream = LogResponses<pb::StreamTransitionsResponse>;

#[tonic::async_trait]
impl LifecycleService for LifecycleGrpc {
    async fn get_lifecycle(
        &self,
        request: Request<pb::GetLifecycleRequest>,
    ) -> Result<Response<pb::GetLifecycleResponse>, Status> {
        let id = customer_id("customer_id", &request.get_ref().customer_id)?;
        let record = self.lifecycle_of(id).await?;
        let last_transition = self.last_transition(record.customer_id).await?;
        Ok(Response::new(pb::GetLifecycleResponse {
            lifecycle: Some(lifecycle_message(&record, last_transition)),
        }))
    }

    async fn explain_lifecycle(
        &self,
        request: Request<pb::ExplainLifecycleRequest>,
    ) -> Result<Response<pb::ExplainLifecycleResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let id = violations.check(validate::uuid("customer_id", &request.customer_id));
        if !(0..=100).contains(&request.top_touchpoints) {
            violations.add("top_touchpoints", "must be between 0 and 100");
        }
        let id = done(violations, || id.expect("validated"))?;
        let limit = match request.top_touchpoints {
            0 => 10,
            n => n as usize,
        };
        let model = if request.model_version.is_empty() {
            self.scorer.active_model().await.map_err(scoring_status)?
        } else {
            self.scorer
                .compiled(&request.model_version)
                .await
                .map_err(scoring_status)?
                .ok_or_else(|| model_not_found(&request.model_version))?
        };
        let record = self.lifecycle_of(id).await?;
        let snapshot = record.snapshot.as_ref().expect("an evaluated customer");
        let now = self.scorer.now().max(snapshot.evaluated_at);
        let explanation = model.explain(&record.features, &snapshot.state, now);
        let mut response = explanation.to_proto(&record.customer_id.to_string());
        let mut list = tonic::Request::new(touchpoint_pb::ListTouchpointsRequest {
            customer_id: record.customer_id.to_string(),
            page_size: EXPLAIN_TOUCHPOINTS,
            ..Default::default()
        });
        list.set_timeout(std::time::Duration::from_secs(5));
        let touchpoints = self
            .touchpoints
            .clone()
            .list_touchpoints(list)
            .await
            .map_err(|status| {
                tracing::warn!(error = %status.message(), "cannot read a timeline from touchpoints");
                StatusBuilder::unavailable("the touchpoints service")
            })?
            .into_inner()
            .touchpoints;
        let config = model.model();
        for score in &mut response.scores {
            let weights = match pb::ScoreKind::try_from(score.score) {
                Ok(pb::ScoreKind::Engagement) => &config.engagement.weights,
                Ok(pb::ScoreKind::Lead) => &config.lead.behaviour,
                _ => continue,
            };
            score.top_touchpoints = top_touchpoints(weights, &touchpoints, now, limit);
        }
        Ok(Response::new(response))
    }

    async fn list_transitions(
        &self,
        request: Request<pb::ListTransitionsRequest>,
    ) -> Result<Response<pb::ListTransitionsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let customer = if request.customer_id.is_empty() {
            None
        } else {
            violations.check(validate::uuid("customer_id", &request.customer_id))
        };
        let start = time_field(&mut violations, "start_time", request.start_time.as_ref());
        let end = time_field(&mut violations, "end_time", request.end_time.as_ref());
        if let (Some(start), Some(end)) = (start, end)
            && end < start
        {
            violations.add("end_time", "must not be before start_time");
        }
        let limit = violations.check(validate::page_size(
            "page_size",
            request.page_size,
            100,
            1000,
        ));
        let filter = paging::fingerprint(&(&request.customer_id, start, end));
        let after = violations
            .check(paging::decode::<(DateTime<Utc>, Uuid)>(
                "page_token",
                &request.page_token,
                filter,
            ))
            .flatten();
        let limit = done(violations, || limit.expect("validated"))?;
        let mut recorded = self
            .scorer
            .store()
            .list_transitions(&TransitionQuery {
                customer_id: customer,
                start,
                end,
                after,
                limit: limit + 1,
            })
            .await
            .map_err(store_status)?;
        let next_page_token = if recorded.len() > limit as usize {
            recorded.truncate(limit as usize);
            let last = recorded.last().expect("a full page");
            paging::encode(filter, &(last.at, last.id))
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTransitionsResponse {
            transitions: recorded.iter().map(RecordedTransition::to_proto).collect(),
            next_page_token,
        }))
    }

    type StreamTransitionsStream = TransitionStream;

    async fn stream_transitions(
        &self,
        request: Request<pb::StreamTransitionsRequest>,
    ) -> Result<Response<Self::StreamTransitionsStream>, Status> {
        let request = request.into_inner();
        let (after, shard) = log_position(&request.after_cursor, request.shard)?;
        let stream = self
            .scorer
            .store()
            .transition_log()
            .tail(
                after,
                shard,
                1000,
                request.stop_at_end,
                self.shutdown.clone(),
            )
            .map(|batch| {
                let batch = batch.map_err(|err| store_status(StoreError::from_db(err)))?;
                let entries = batch
                    .into_iter()
                    .map(|entry| {
                        let mut decoded = pb::TransitionLogEntry::decode(entry.payload.as_slice())
                            .map_err(|err| {
                                StatusBuilder::internal("reading the transition log", &err)
                            })?;
                        decoded.cursor = entry.cursor.to_string();
                        Ok(decoded)
                    })
                    .collect::<Result<Vec<_>, Status>>()?;
                Ok(pb::StreamTransitionsResponse { entries })
            });
        Ok(Response::new(respond(stream)))
    }

    async fn evaluate(
        &self,
        request: Request<pb::EvaluateRequest>,
    ) -> Result<Response<pb::EvaluateResponse>, Status> {
        let id = customer_id("customer_id", &request.get_ref().customer_id)?;
        // A call made for a caller is served by any replica, whoever owns
        // the customer's shard: its write is checked by version alone.
        let mut evaluated = self
            .scorer
            .evaluate_now(&[id], Cause::Evaluate, false, &Fence::Sole)
            .await
            .map_err(scoring_status)?;
        let evaluated = evaluated.remove(&id).ok_or_else(|| not_found(id))?;
        let transition = evaluated
            .transition
            .as_ref()
            .map(RecordedTransition::to_proto);
        let last_transition = match &transition {
            Some(transition) => Some(transition.clone()),
            None => self.last_transition(evaluated.record.customer_id).await?,
        };
        Ok(Response::new(pb::EvaluateResponse {
            lifecycle: Some(lifecycle_message(&evaluated.record, last_transition)),
            transition,
        }))
    }

    async fn create_model(
        &self,
        request: Request<pb::CreateModelRequest>,
    ) -> Result<Response<pb::CreateModelResponse>, Status> {
        let Some(message) = request.into_inner().model else {
            return Err(StatusBuilder::invalid_argument(&[FieldViolation::new(
                "model",
                "is required",
            )]));
        };
        let model = checked_model(&message).map_err(|v| model_violations(&v))?;
        let stored = match self
            .scorer
            .store()
            .insert_model(&Model {
                built_in: false,
                create_time: Some(Utc::now()),
                activate_time: None,
                ..model.clone()
            })
            .await
            .map_err(store_status)?
        {
            ModelInsert::Created(stored) => stored,
            ModelInsert::Exists(stored) if stored.same_content(&model) => stored,
            ModelInsert::Exists(_) => {
                return Err(StatusBuilder::with_reason(
                    Code::AlreadyExists,
                    format!(
                        "model version {} exists with other content; models are immutable, choose a new version",
                        model.version
                    ),
                    reasons::MODEL_VERSION_EXISTS,
                    &[("version", &model.version)],
                ));
            }
        };
        Ok(Response::new(pb::CreateModelResponse {
            model: Some(stored.to_proto()),
        }))
    }

    async fn validate_model(
        &self,
        request: Request<pb::ValidateModelRequest>,
    ) -> Result<Response<pb::ValidateModelResponse>, Status> {
        let violations = match request.into_inner().source {
            Some(pb::validate_model_request::Source::Model(message)) => {
                checked_model(&message).err().unwrap_or_default()
            }
            Some(pb::validate_model_request::Source::Version(version)) => {
                let model = self
                    .scorer
                    .store()
                    .model(&version)
                    .await
                    .map_err(store_status)?
                    .ok_or_else(|| model_not_found(&version))?;
                CompiledModel::validate(&model)
            }
            None => {
                return Err(StatusBuilder::invalid_argument(&[FieldViolation::new(
                    "source",
                    "set either model or version",
                )]));
            }
        };
        Ok(Response::new(pb::ValidateModelResponse {
            valid: violations.is_empty(),
            violations: violations.iter().map(ModelViolation::to_proto).collect(),
        }))
    }

    async fn activate_model(
        &self,
        request: Request<pb::ActivateModelRequest>,
    ) -> Result<Response<pb::ActivateModelResponse>, Status> {
        let request = request.into_inner();
        if request.version.is_empty() {
            return Err(StatusBuilder::invalid_argument(&[FieldViolation::new(
                "version",
                "is required",
            )]));
        }
        let rescore = rescore::new_rescore(
            &self.scorer,
            &request.version,
            pb::RescoreTrigger::Activation,
        )
        .await
        .map_err(store_status)?;
        let expected = (!request.expected_active_version.is_empty())
            .then_some(request.expected_active_version.as_str());
        let outcome = self
            .scorer
            .store()
            .activate(&request.version, expected, rescore, Utc::now())
            .await
            .map_err(store_status)?;
        match outcome {
            Activation::NotFound => Err(model_not_found(&request.version)),
            Activation::NotExpected(active) => Err(StatusBuilder::with_reason(
                Code::Aborted,
                format!(
                    "the active model is {active:?}, not {:?} as expected",
                    request.expected_active_version
                ),
                reasons::ACTIVE_MODEL_CHANGED,
                &[("active_version", &active)],
            )),
            Activation::AlreadyActive(model) => Ok(Response::new(pb::ActivateModelResponse {
                model: Some(model.to_proto()),
                rescore: None,
            })),
            Activation::Activated(model, rescore) => {
                self.scorer.active_model_changed();
                self.rescore_wake.notify_one();
                tracing::info!(model = %model.version, rescore = %rescore.id, "model activated");
                Ok(Response::new(pb::ActivateModelResponse {
                    model: Some(model.to_proto()),
                    rescore: Some(rescore::to_proto(&rescore, Utc::now())),
                }))
            }
        }
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::GetModelResponse>, Status> {
        let version = &request.get_ref().version;
        let model = if version.is_empty() {
            self.scorer.store().active_model().await
        } else {
            self.scorer.store().model(version).await
        }
        .map_err(store_status)?
        .ok_or_else(|| model_not_found(version))?;
        Ok(Response::new(pb::GetModelResponse {
            model: Some(model.to_proto()),
        }))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let limit = violations.check(validate::page_size("page_size", request.page_size, 20, 100));
        let after = violations
            .check(paging::decode::<(DateTime<Utc>, String)>(
                "page_token",
                &request.page_token,
                0,
            ))
            .flatten();
        let limit = done(violations, || limit.expect("validated"))?;
        let mut models = self
            .scorer
            .store()
            .list_models(after, limit + 1)
            .await
            .map_err(store_status)?;
        let next_page_token = if models.len() > limit as usize {
            models.truncate(limit as usize);
            let last = models.last().expect("a full page");
            paging::encode(0, &(last.create_time.unwrap_or_default(), &last.version))
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListModelsResponse {
            models: models.iter().map(Model::to_proto).collect(),
            next_page_token,
        }))
    }

    async fn start_rescore(
        &self,
        _request: Request<pb::StartRescoreRequest>,
    ) -> Result<Response<pb::StartRescoreResponse>, Status> {
        let active = self.scorer.active_model().await.map_err(scoring_status)?;
        let rescore =
            rescore::new_rescore(&self.scorer, active.version(), pb::RescoreTrigger::Manual)
                .await
                .map_err(store_status)?;
        let (rescore, started) = self
            .scorer
            .store()
            .start_rescore(rescore)
            .await
            .map_err(store_status)?;
        if started {
            self.rescore_wake.notify_one();
        }
        Ok(Response::new(pb::StartRescoreResponse {
            rescore: Some(rescore::to_proto(&rescore, Utc::now())),
            started,
        }))
    }

    async fn get_rescore(
        &self,
        request: Request<pb::GetRescoreRequest>,
    ) -> Result<Response<pb::GetRescoreResponse>, Status> {
        let raw = &request.get_ref().rescore_id;
        let id = if raw.is_empty() {
            None
        } else {
            Some(customer_id("rescore_id", raw)?)
        };
        let rescore = self
            .scorer
            .store()
            .rescore(id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| {
                StatusBuilder::with_reason(
                    Code::NotFound,
                    match id {
                        Some(id) => format!("rescore {id} does not exist"),
                        None => "no rescore has run yet".to_owned(),
                    },
                    reasons::RESCORE_NOT_FOUND,
                    &[],
                )
            })?;
        Ok(Response::new(pb::GetRescoreResponse {
            rescore: Some(rescore::to_proto(&rescore, Utc::now())),
        }))
    }
}

fn model_not_found(version: &str) -> Status {
    StatusBuilder::with_reason(
        Code::NotFound,
        if version.is_empty() {
            "no model is active".to_owned()
        } else {
            format!("model version {version:?} does not exist")
        },
        reasons::MODEL_NOT_FOUND,
        &[("version", version)],
    )
}

/// The CustomerLifecycle message of an evaluated customer.
pub fn lifecycle_message(
    record: &CustomerRecord,
    last_transition: Option<pb::Transition>,
) -> pb::CustomerLifecycle {
    pb::CustomerLifecycle {
        customer_id: record.customer_id.to_string(),
        lifecycle: record.snapshot.as_ref().map(|s| s.to_proto()),
        last_transition,
        next_evaluation_time: record.next_due_at.map(timestamp_to_proto),
    }
}
