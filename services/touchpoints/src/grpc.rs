//! `clm.touchpoint.v1.TouchpointService` over gRPC: validates and converts
//! requests, calls [`TouchpointIngest`] and the store, converts answers.

use clm_eventlog::serving::{LogResponses, log_position, respond};
use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use clm_eventlog::{Cursor, EndMark, TailOptions, tail_batches};
use clm_platform::error::{ErrorReport, Violations, reasons};
use clm_platform::server::Shutdown;
use clm_platform::time::{FactTimes, from_timestamp, to_timestamp};
use clm_platform::{FieldViolation, Limits, StatusBuilder, paging, validate};
use clm_proto::common as common_pb;
use clm_proto::touchpoint as pb;
use futures_util::StreamExt as _;
use prost::Message as _;
use tonic::{Code, Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::ingest::{Candidate, IngestError, Outcome, TouchpointIngest, Violation};
use crate::model::{LogEntry, Money, TimelineQuery, Touchpoint};
use crate::store::StoreError;
use crate::vocabulary;
use clm_platform::identity::Reference;

const MAX_EVENT_ID: usize = 128;
const MAX_TEXT: usize = 256;
const MAX_PROPERTIES: usize = 64;
const MAX_PROPERTY_VALUE: usize = 1024;
const MAX_KEYS: usize = 20;
const MAX_TYPE_FILTER: usize = 50;
/// The first rejections a bulk load reports.
const MAX_REPORTED_REJECTIONS: usize = 100;

/// The gRPC face of the touchpoints service.
#[derive(Clone)]
pub struct TouchpointGrpc {
    ingest: TouchpointIngest,
    limits: Limits,
    max_future_skew: Duration,
    shutdown: Shutdown,
}

impl TouchpointGrpc {
    /// Serves `ingest`.
    pub fn new(
        ingest: TouchpointIngest,
        limits: Limits,
        max_future_skew: Duration,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            ingest,
            limits,
            max_future_skew,
            shutdown,
        }
    }

    /// Validates one touchpoint of a request; `field` is its path.
    fn candidate(
        &self,
        field: &str,
        raw: &pb::Touchpoint,
        now: DateTime<Utc>,
    ) -> Result<Candidate, Vec<Violation>> {
        let mut violations = Vec::new();
        let mut bad = |name: &str, reason: &str, description: String| {
            violations.push(Violation::new(
                format!("{field}.{name}"),
                reason,
                description,
            ));
        };
        let event_id = raw.event_id.as_str();
        if event_id.is_empty() {
            bad("event_id", "REQUIRED", "is required".into());
        } else if event_id.len() > MAX_EVENT_ID {
            bad(
                "event_id",
                "TOO_LONG",
                format!("is longer than {MAX_EVENT_ID} characters"),
            );
        } else if !event_id.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            bad(
                "event_id",
                "INVALID_FORMAT",
                "may only contain printable ASCII without spaces".into(),
            );
        }
        let reference = match raw.customer.as_ref().and_then(|c| c.reference.as_ref()) {
            None => {
                bad(
                    "customer",
                    "REQUIRED",
                    "is required: a customer_id or identity_keys".into(),
                );
                None
            }
            Some(common_pb::customer_reference::Reference::CustomerId(id)) => {
                match Uuid::try_parse(id) {
                    Ok(id) => Some(Reference::Id(id)),
                    Err(_) => {
                        bad(
                            "customer.customer_id",
                            "INVALID_FORMAT",
                            "is not a valid UUID".into(),
                        );
                        None
                    }
                }
            }
            Some(common_pb::customer_reference::Reference::IdentityKeys(keys)) => {
                if keys.keys.is_empty() {
                    bad(
                        "customer.identity_keys.keys",
                        "REQUIRED",
                        "at least one identity key is required".into(),
                    );
                } else if keys.keys.len() > MAX_KEYS {
                    bad(
                        "customer.identity_keys.keys",
                        "TOO_MANY_ENTRIES",
                        format!("at most {MAX_KEYS} keys are allowed"),
                    );
                }
                for (i, key) in keys.keys.iter().enumerate() {
                    match common_pb::IdentityKind::try_from(key.kind) {
                        Ok(common_pb::IdentityKind::Unspecified) => {
                            bad(
                                &format!("customer.identity_keys.keys[{i}].kind"),
                                "REQUIRED",
                                "is required".into(),
                            );
                        }
                        Err(_) => bad(
                            &format!("customer.identity_keys.keys[{i}].kind"),
                            "UNKNOWN_VALUE",
                            format!("{} is not a known value", key.kind),
                        ),
                        Ok(_) => {}
                    }
                    if key.value.trim().is_empty() {
                        bad(
                            &format!("customer.identity_keys.keys[{i}].value"),
                            "REQUIRED",
                            "is required".into(),
                        );
                    } else if key.value.chars().count() > 320 {
                        bad(
                            &format!("customer.identity_keys.keys[{i}].value"),
                            "TOO_LONG",
                            "is longer than 320 characters".into(),
                        );
                    }
                }
                Some(Reference::Keys(keys.keys.clone()))
            }
        };
        let channel = match pb::Channel::try_from(raw.channel) {
            Ok(pb::Channel::Unspecified) => {
                bad("channel", "REQUIRED", "is required".into());
                0
            }
            Ok(channel) => channel as i16,
            Err(_) => {
                bad(
                    "channel",
                    "UNKNOWN_VALUE",
                    format!("{} is not a known channel", raw.channel),
                );
                0
            }
        };
        if let Some(problem) = vocabulary::type_problem(&raw.r#type) {
            let reason = if raw.r#type.is_empty() {
                "REQUIRED"
            } else {
                "UNKNOWN_TYPE"
            };
            bad("type", reason, problem.to_owned());
        }
        let occurred_at = match &raw.occur_time {
            None => now,
            Some(ts) => match FactTimes::at(now, self.max_future_skew).check("occur_time", ts) {
                Err(v) => {
                    bad("occur_time", "OUT_OF_RANGE", v.description);
                    now
                }
                Ok(at) => at.trunc_subsecs(6),
            },
        };
        for (name, value) in [
            ("campaign", &raw.campaign),
            ("utm_source", &raw.utm_source),
            ("utm_medium", &raw.utm_medium),
        ] {
            if let Err(v) = validate::text(name, value, false, MAX_TEXT) {
                bad(name, &v.reason, v.description);
            }
        }
        if raw.properties.len() > MAX_PROPERTIES {
            bad(
                "properties",
                "TOO_MANY_ENTRIES",
                format!(
                    "has {} entries, at most {MAX_PROPERTIES} are allowed",
                    raw.properties.len()
                ),
            );
        }
        for (key, value) in &raw.properties {
            let valid_key = !key.is_empty()
                && key.len() <= 64
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !valid_key {
                bad(
                    &format!("properties[{key:?}]"),
                    "INVALID_FORMAT",
                    "keys are 1 to 64 characters of A-Z, a-z, 0-9, '_', '.', '-'".into(),
                );
            }
            if let Err(v) = validate::text("", value, false, MAX_PROPERTY_VALUE) {
                bad(&format!("properties[{key:?}]"), &v.reason, v.description);
            }
        }
        let mut money = |name: &str, raw: &Option<common_pb::Money>| {
            raw.as_ref().and_then(|m| {
                let mut ok = true;
                if !vocabulary::is_currency(&m.currency_code) {
                    bad(
                        &format!("{name}.currency_code"),
                        "INVALID_CURRENCY",
                        format!("{:?} is not an ISO 4217 currency code", m.currency_code),
                    );
                    ok = false;
                }
                if m.amount_micros < 0 {
                    bad(
                        &format!("{name}.amount_micros"),
                        "NEGATIVE_AMOUNT",
                        "must not be negative".into(),
                    );
                    ok = false;
                }
                ok.then(|| Money {
                    currency: m.currency_code.clone(),
                    micros: m.amount_micros,
                })
            })
        };
        let revenue = money("revenue", &raw.revenue);
        let cost = money("cost", &raw.cost);
        if !violations.is_empty() {
            return Err(violations);
        }
        Ok(Candidate {
            field: field.to_owned(),
            reference: reference.expect("validated"),
            touchpoint: Touchpoint {
                id: Uuid::now_v7(),
                event_id: raw.event_id.clone(),
                customer_id: Uuid::nil(),
                channel,
                kind: raw.r#type.clone(),
                occurred_at,
                recorded_at: now,
                campaign: raw.campaign.clone(),
                utm_source: raw.utm_source.clone(),
                utm_medium: raw.utm_medium.clone(),
                properties: (!raw.properties.is_empty()).then(|| {
                    raw.properties
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect::<BTreeMap<_, _>>()
                }),
                revenue,
                cost,
            },
        })
    }

    fn check_batch_size(&self, count: usize) -> Result<(), Status> {
        if count == 0 {
            return Err(StatusBuilder::invalid_argument(&[FieldViolation::new(
                "touchpoints",
                "at least one touchpoint is required",
            )]));
        }
        let max = self.limits.max_batch_size as usize;
        if count > max {
            return Err(StatusBuilder::with_reason(
                Code::ResourceExhausted,
                format!(
                    "touchpoints: {count} items, at most {max} are allowed in one batch or chunk"
                ),
                reasons::BATCH_TOO_LARGE,
                &[("limit", &max.to_string())],
            ));
        }
        Ok(())
    }
}

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn money_to_proto(money: &Option<Money>) -> Option<common_pb::Money> {
    money.as_ref().map(|m| common_pb::Money {
        currency_code: m.currency.clone(),
        amount_micros: m.micros,
    })
}

/// The protobuf form of a stored touchpoint.
pub fn touchpoint_to_proto(t: &Touchpoint) -> pb::Touchpoint {
    pb::Touchpoint {
        id: t.id.to_string(),
        event_id: t.event_id.clone(),
        customer: Some(common_pb::CustomerReference {
            reference: Some(common_pb::customer_reference::Reference::CustomerId(
                t.customer_id.to_string(),
            )),
        }),
        customer_id: t.customer_id.to_string(),
        channel: i32::from(t.channel),
        r#type: t.kind.clone(),
        occur_time: Some(to_timestamp(t.occurred_at)),
        campaign: t.campaign.clone(),
        utm_source: t.utm_source.clone(),
        utm_medium: t.utm_medium.clone(),
        properties: t
            .properties
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        revenue: money_to_proto(&t.revenue),
        cost: money_to_proto(&t.cost),
        record_time: Some(to_timestamp(t.recorded_at)),
    }
}

fn violations_to_proto(violations: &[Violation]) -> Vec<pb::FieldViolation> {
    violations
        .iter()
        .map(|v| pb::FieldViolation {
            field: v.field.clone(),
            reason: v.reason.clone(),
            description: v.description.clone(),
        })
        .collect()
}

fn ingest_error(err: IngestError) -> Status {
    ingest_report(err).into()
}

fn store_error(err: StoreError) -> Status {
    store_report(err).into()
}

/// How an ingest failure is told to the caller.
fn ingest_report(err: IngestError) -> ErrorReport {
    match err {
        IngestError::IdentityUnavailable(cause) => ErrorReport::Unavailable {
            what: "the identity service",
            detail: cause.to_string(),
        },
        IngestError::Store(err) => store_report(err),
    }
}

/// How a store failure is told to the caller.
fn store_report(err: StoreError) -> ErrorReport {
    match err {
        StoreError::Unavailable(detail) => ErrorReport::Unavailable {
            what: "the touchpoint database",
            detail,
        },
        StoreError::Conflict(detail) => {
            tracing::debug!(%detail, "a touchpoint batch lost a race");
            ErrorReport::reason(
                Code::Aborted,
                reasons::CONTENDED,
                "the batch lost a race with a concurrent change, retry",
                &[],
            )
        }
        StoreError::Internal(detail) => ErrorReport::Internal {
            context: "handling a touchpoint request",
            detail,
        },
    }
}

/// A single rejected touchpoint as the status a unary call returns.
fn rejection_status(violations: &[Violation]) -> Status {
    let customer_refusal = violations.iter().find(|v| {
        [
            reasons::CUSTOMER_NOT_FOUND,
            reasons::CUSTOMER_ERASED,
            reasons::IDENTITY_KEY_SUPPRESSED,
            reasons::IDENTITY_CONFLICT,
        ]
        .contains(&v.reason.as_str())
    });
    match customer_refusal {
        Some(v) => StatusBuilder::with_reason(
            if v.reason == reasons::CUSTOMER_NOT_FOUND {
                Code::NotFound
            } else {
                Code::FailedPrecondition
            },
            format!("{}: {}", v.field, v.description),
            &v.reason,
            &[("field", &v.field)],
        ),
        None => StatusBuilder::invalid_argument(
            &violations
                .iter()
                .map(|v| FieldViolation::with_reason(&v.field, &v.reason, &v.description))
                .collect::<Vec<_>>(),
        ),
    }
}

fn log_entry_to_proto(cursor: Cursor, entry: LogEntry) -> Result<pb::TouchpointLogEntry, Status> {
    match entry {
        LogEntry::Recorded(t) => {
            let t = *t;
            Ok(pb::TouchpointLogEntry {
                cursor: cursor.to_string(),
                entry_id: t.id.to_string(),
                customer_id: t.customer_id.to_string(),
                commit_time: Some(to_timestamp(t.recorded_at)),
                change: Some(pb::touchpoint_log_entry::Change::Recorded(
                    pb::TouchpointRecorded {
                        touchpoint_id: t.id.to_string(),
                        event_id: t.event_id,
                        channel: i32::from(t.channel),
                        r#type: t.kind,
                        occur_time: Some(to_timestamp(t.occurred_at)),
                        campaign: t.campaign,
                        utm_source: t.utm_source,
                        utm_medium: t.utm_medium,
                        revenue: money_to_proto(&t.revenue),
                        cost: money_to_proto(&t.cost),
                    },
                )),
            })
        }
        LogEntry::Change { payload, .. } => {
            let mut entry = pb::TouchpointLogEntry::decode(payload.as_slice())
                .map_err(|err| StatusBuilder::internal("reading the touchpoint log", &err))?;
            entry.cursor = cursor.to_string();
            Ok(entry)
        }
    }
}

fn time_filter(
    violations: &mut Violations,
    field: &str,
    ts: &Option<prost_types::Timestamp>,
) -> Option<DateTime<Utc>> {
    ts.as_ref()
        .and_then(|ts| violations.check(from_timestamp(field, ts)))
}

fn type_filter(violations: &mut Violations, field: &str, types: &[String]) {
    if types.len() > MAX_TYPE_FILTER {
        violations.add(
            field,
            format!("at most {MAX_TYPE_FILTER} types are allowed"),
        );
    }
    for (i, kind) in types.iter().enumerate() {
        if let Some(problem) = vocabulary::type_problem(kind) {
            violations.add(format!("{field}[{i}]"), problem);
        }
    }
}

type LogStream = LogResponses<pb::StreamTouchpointLogResponse>;

#[tonic::async_trait]
impl pb::touchpoint_service_server::TouchpointService for TouchpointGrpc {
    async fn record_touchpoint(
        &self,
        request: Request<pb::RecordTouchpointRequest>,
    ) -> Result<Response<pb::RecordTouchpointResponse>, Status> {
        let request = request.into_inner();
        let Some(raw) = request.touchpoint else {
            return Err(StatusBuilder::invalid_argument(&[FieldViolation::new(
                "touchpoint",
                "is required",
            )]));
        };
        let now = now();
        let candidate = self.candidate("touchpoint", &raw, now);
        let template = candidate.as_ref().ok().map(|c| c.touchpoint.clone());
        let outcome = self
            .ingest
            .record_one(candidate)
            .await
            .map_err(ingest_error)?;
        match outcome {
            Outcome::Rejected(violations) => Err(rejection_status(&violations)),
            Outcome::Stored { id, customer_id } => {
                let mut touchpoint = template.expect("a stored touchpoint was valid");
                touchpoint.id = id;
                touchpoint.customer_id = customer_id;
                Ok(Response::new(pb::RecordTouchpointResponse {
                    touchpoint: Some(touchpoint_to_proto(&touchpoint)),
                    duplicate: false,
                }))
            }
            Outcome::Duplicate { .. } => {
                let earlier = self
                    .ingest
                    .store()
                    .find_by_event_id(&raw.event_id)
                    .await
                    .map_err(store_error)?
                    .ok_or_else(|| {
                        StatusBuilder::internal(
                            "returning a duplicate touchpoint",
                            &"the earlier touchpoint is gone",
                        )
                    })?;
                Ok(Response::new(pb::RecordTouchpointResponse {
                    touchpoint: Some(touchpoint_to_proto(&earlier)),
                    duplicate: true,
                }))
            }
        }
    }

    async fn record_touchpoints(
        &self,
        request: Request<pb::RecordTouchpointsRequest>,
    ) -> Result<Response<pb::RecordTouchpointsResponse>, Status> {
        let request = request.into_inner();
        self.check_batch_size(request.touchpoints.len())?;
        let now = now();
        let items: Vec<_> = request
            .touchpoints
            .iter()
            .enumerate()
            .map(|(i, raw)| self.candidate(&format!("touchpoints[{i}]"), raw, now))
            .collect();
        let outcomes = self.ingest.record(items).await.map_err(ingest_error)?;
        let mut response = pb::RecordTouchpointsResponse::default();
        for (index, (outcome, raw)) in outcomes.into_iter().zip(&request.touchpoints).enumerate() {
            let mut result = pb::RecordTouchpointResult {
                index: index as i32,
                event_id: raw.event_id.clone(),
                ..Default::default()
            };
            match outcome {
                Outcome::Stored { id, customer_id } => {
                    response.stored_count += 1;
                    result.status = pb::RecordStatus::Stored.into();
                    result.touchpoint_id = id.to_string();
                    result.customer_id = customer_id.to_string();
                }
                Outcome::Duplicate { id, customer_id } => {
                    response.duplicate_count += 1;
                    result.status = pb::RecordStatus::Duplicate.into();
                    result.touchpoint_id = id.to_string();
                    result.customer_id = customer_id.to_string();
                }
                Outcome::Rejected(violations) => {
                    response.rejected_count += 1;
                    result.status = pb::RecordStatus::Rejected.into();
                    result.violations = violations_to_proto(&violations);
                }
            }
            response.results.push(result);
        }
        Ok(Response::new(response))
    }

    async fn stream_touchpoints(
        &self,
        request: Request<Streaming<pb::StreamTouchpointsRequest>>,
    ) -> Result<Response<pb::StreamTouchpointsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut summary = pb::StreamTouchpointsResponse::default();
        let mut offset: i64 = 0;
        while let Some(chunk) = stream.message().await? {
            self.check_batch_size(chunk.touchpoints.len())?;
            summary.chunk_count += 1;
            let now = now();
            let items: Vec<_> = chunk
                .touchpoints
                .iter()
                .enumerate()
                .map(|(i, raw)| {
                    self.candidate(&format!("touchpoints[{}]", offset + i as i64), raw, now)
                })
                .collect();
            let outcomes = self.ingest.record(items).await.map_err(ingest_error)?;
            for (i, (outcome, raw)) in outcomes.into_iter().zip(&chunk.touchpoints).enumerate() {
                match outcome {
                    Outcome::Stored { .. } => summary.stored_count += 1,
                    Outcome::Duplicate { .. } => summary.duplicate_count += 1,
                    Outcome::Rejected(violations) => {
                        summary.rejected_count += 1;
                        if summary.rejections.len() < MAX_REPORTED_REJECTIONS {
                            summary.rejections.push(pb::RejectedTouchpoint {
                                index: offset + i as i64,
                                event_id: raw.event_id.clone(),
                                violations: violations_to_proto(&violations),
                            });
                        }
                    }
                }
            }
            offset += chunk.touchpoints.len() as i64;
        }
        Ok(Response::new(summary))
    }

    async fn list_touchpoints(
        &self,
        request: Request<pb::ListTouchpointsRequest>,
    ) -> Result<Response<pb::ListTouchpointsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let customer_id = violations.check(validate::uuid("customer_id", &request.customer_id));
        let page_size = violations.check(validate::page_size(
            "page_size",
            request.page_size,
            self.limits.default_page_size,
            self.limits.max_page_size,
        ));
        let filter = request.filter.unwrap_or_default();
        type_filter(&mut violations, "filter.types", &filter.types);
        let mut channels = Vec::new();
        for (i, raw) in filter.channels.iter().enumerate() {
            match validate::enum_value::<pb::Channel>(&format!("filter.channels[{i}]"), *raw, false)
            {
                Ok(channel) => channels.push(channel as i16),
                Err(v) => violations.add(v.field, v.description),
            }
        }
        let start = time_filter(&mut violations, "filter.start_time", &filter.start_time);
        let end = time_filter(&mut violations, "filter.end_time", &filter.end_time);
        let fingerprint = paging::fingerprint(&(
            &request.customer_id,
            &filter.types,
            &filter.channels,
            filter.start_time.as_ref().map(|t| (t.seconds, t.nanos)),
            filter.end_time.as_ref().map(|t| (t.seconds, t.nanos)),
        ));
        let after: Option<(i64, Uuid)> = violations
            .check(paging::decode(
                "page_token",
                &request.page_token,
                fingerprint,
            ))
            .flatten();
        violations
            .into_result()
            .map_err(|v| StatusBuilder::invalid_argument(&v))?;
        let limit = page_size.expect("validated");
        let mut page = self
            .ingest
            .store()
            .timeline(&TimelineQuery {
                customer_id: customer_id.expect("validated"),
                types: filter.types.clone(),
                channels,
                start,
                end,
                after: after.and_then(|(micros, id)| {
                    DateTime::from_timestamp_micros(micros).map(|at| (at, id))
                }),
                limit: limit + 1,
            })
            .await
            .map_err(store_error)?;
        let next_page_token = if page.len() > limit as usize {
            page.truncate(limit as usize);
            page.last()
                .map(|t| paging::encode(fingerprint, &(t.occurred_at.timestamp_micros(), t.id)))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTouchpointsResponse {
            touchpoints: page.iter().map(touchpoint_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn count_touchpoints(
        &self,
        request: Request<pb::CountTouchpointsRequest>,
    ) -> Result<Response<pb::CountTouchpointsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let customer_id = violations.check(validate::uuid("customer_id", &request.customer_id));
        type_filter(&mut violations, "types", &request.types);
        let start = time_filter(&mut violations, "start_time", &request.start_time);
        let end = time_filter(&mut violations, "end_time", &request.end_time);
        violations
            .into_result()
            .map_err(|v| StatusBuilder::invalid_argument(&v))?;
        let counts = self
            .ingest
            .store()
            .count_by_type(customer_id.expect("validated"), start, end, &request.types)
            .await
            .map_err(store_error)?;
        Ok(Response::new(pb::CountTouchpointsResponse {
            total_count: counts.iter().map(|c| c.count).sum(),
            counts: counts
                .into_iter()
                .map(|c| pb::TypeCount {
                    r#type: c.kind,
                    count: c.count,
                    last_occur_time: Some(to_timestamp(c.last_occurred_at)),
                })
                .collect(),
        }))
    }

    type StreamTouchpointLogStream = LogStream;

    async fn stream_touchpoint_log(
        &self,
        request: Request<pb::StreamTouchpointLogRequest>,
    ) -> Result<Response<Self::StreamTouchpointLogStream>, Status> {
        let request = request.into_inner();
        let (after, shard) = log_position(&request.after_cursor, request.shard)?;
        let store = self.ingest.store().clone();
        let reader = move |cursor: Cursor| {
            let store = store.clone();
            async move {
                let batch = store.read_log(cursor, shard, 10_000).await?;
                Ok::<_, StoreError>(
                    batch
                        .into_iter()
                        .map(|(c, e)| (c, (c, e)))
                        .collect::<Vec<_>>(),
                )
            }
        };
        let (store, end) = (self.ingest.store().clone(), EndMark::default());
        let at_end = move || {
            let (store, end) = (store.clone(), end.clone());
            async move { store.log_end_reached(&end).await }
        };
        let stream = tail_batches(
            reader,
            at_end,
            after,
            TailOptions {
                stop_at_end: request.stop_at_end,
                poll_interval: Duration::from_millis(100),
            },
            self.ingest.store().appended(),
            self.shutdown.clone(),
        );
        // The reader yields (cursor, entry) pairs as the entries; keep them.
        let stream = stream.map(|batch| {
            let batch = batch.map_err(store_error)?;
            let entries = batch
                .into_iter()
                .map(|(cursor, entry)| log_entry_to_proto(cursor, entry))
                .collect::<Result<Vec<_>, Status>>()?;
            Ok(pb::StreamTouchpointLogResponse { entries })
        });
        // Read and convert the next batches while tonic encodes and sends.
        Ok(Response::new(respond(stream)))
    }
}
