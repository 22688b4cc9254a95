//! `clm.identity.v1.CustomerService` over gRPC: converts and validates
//! requests, calls the [`CustomerDirectory`], converts the answers. No
//! business rule lives here.

use clm_eventlog::serving::{LogResponses, log_position, respond};
use std::collections::BTreeMap;
use std::sync::Arc;

use clm_platform::error::Violations;
use clm_platform::server::Shutdown;
use clm_platform::time::FactTimes;
use clm_platform::{FieldViolation, Limits, paging, validate};
use clm_proto::common as common_pb;
use clm_proto::identity as pb;
use futures_util::StreamExt as _;
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

use crate::convert::{customer_to_proto, merge_to_proto};
use crate::directory::{
    CustomerDirectory, CustomerPatch, CustomerReference, NewCustomer, ReferenceOutcome, RequestKey,
    ResolveRequest,
};
use crate::error::{ErrorReport, INVALID_REFERENCE, IdentityError};
use crate::keys::{KeyKind, KeyNormalizer};
use crate::model::{Consent, ConsentStatus, Lifecycle, Profile};
use crate::store::ListQuery;

mod requests;

use requests::*;

/// The gRPC face of the identity service.
#[derive(Clone)]
pub struct CustomerGrpc {
    directory: Arc<CustomerDirectory>,
    normalizer: KeyNormalizer,
    limits: Limits,
    shutdown: Shutdown,
}

impl CustomerGrpc {
    /// Serves `directory`.
    pub fn new(
        directory: Arc<CustomerDirectory>,
        normalizer: KeyNormalizer,
        limits: Limits,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            directory,
            normalizer,
            limits,
            shutdown,
        }
    }

    /// The bound on the times a request states as facts, as of now.
    fn fact_times(&self) -> FactTimes {
        FactTimes::at(crate::directory::now(), self.limits.max_clock_skew)
    }
}

/// The result of a reference that failed validation: INVALID_ARGUMENT with
/// every bad field in the message.
fn invalid_reference(violations: &[FieldViolation]) -> pb::ResolvedReference {
    pb::ResolvedReference {
        error_code: Code::InvalidArgument as i32,
        error_reason: INVALID_REFERENCE.to_owned(),
        error_message: violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; "),
        ..pb::ResolvedReference::default()
    }
}

/// The result of a resolved reference, with the code, reason and message the
/// unary RPCs give for the same error. An outage is no per-reference result:
/// it fails the call.
fn resolved_reference(outcome: ReferenceOutcome) -> Result<pb::ResolvedReference, Status> {
    match outcome {
        Ok(customer) => Ok(pb::ResolvedReference {
            customer_id: customer.customer_id.to_string(),
            created: customer.created,
            ..pb::ResolvedReference::default()
        }),
        Err(err) => match err.report() {
            ErrorReport::Reason {
                code,
                reason,
                message,
                metadata: _,
            } => Ok(pb::ResolvedReference {
                error_code: code as i32,
                error_reason: reason.to_owned(),
                error_message: message,
                ..pb::ResolvedReference::default()
            }),
            ErrorReport::BadRequest(violations) => Ok(invalid_reference(&violations)),
            outage @ (ErrorReport::Unavailable { .. } | ErrorReport::Internal { .. }) => {
                Err(Status::from(outage))
            }
        },
    }
}

type EventStream = LogResponses<pb::StreamCustomerEventsResponse>;

#[tonic::async_trait]
impl pb::customer_service_server::CustomerService for CustomerGrpc {
    async fn create_customer(
        &self,
        request: Request<pb::CreateCustomerRequest>,
    ) -> Result<Response<pb::CreateCustomerResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        if request.customer.is_none() {
            violations.add("customer", "is required");
        }
        let customer = request.customer.unwrap_or_default();
        Self::profile_text(&mut violations, &customer);
        let keys = self.customer_keys(
            &mut violations,
            &customer,
            &[
                KeyKind::Email,
                KeyKind::Phone,
                KeyKind::External,
                KeyKind::Anonymous,
            ],
        );
        let attributes = attributes(&mut violations, "customer.attributes", &customer.attributes);
        let consents = consents(
            &mut violations,
            "customer.consents",
            &customer.consents,
            self.fact_times(),
        );
        text_violation(
            &mut violations,
            "request_id",
            &request.request_id,
            MAX_SHORT_TEXT,
        );
        let new = done(violations, || NewCustomer {
            profile: Profile {
                given_name: customer.given_name.trim().to_owned(),
                family_name: customer.family_name.trim().to_owned(),
                company: customer.company.trim().to_owned(),
                industry: customer.industry.trim().to_owned(),
                job_title: customer.job_title.trim().to_owned(),
                attributes,
                consents,
            },
            keys: keys.into_values().flatten().collect(),
            request_id: (!request.request_id.is_empty()).then(|| request.request_id.clone()),
        })?;
        let created = self.directory.create(new).await?;
        Ok(Response::new(pb::CreateCustomerResponse {
            customer: Some(customer_to_proto(&created)),
        }))
    }

    async fn get_customer(
        &self,
        request: Request<pb::GetCustomerRequest>,
    ) -> Result<Response<pb::GetCustomerResponse>, Status> {
        let request = request.into_inner();
        let id = validate::uuid("customer_id", &request.customer_id)
            .map_err(|v| IdentityError::InvalidArgument(vec![v]))?;
        let customer = self.directory.profiles().served(id).await?;
        Ok(Response::new(pb::GetCustomerResponse {
            customer: Some(customer),
        }))
    }

    async fn update_customer(
        &self,
        request: Request<pb::UpdateCustomerRequest>,
    ) -> Result<Response<pb::UpdateCustomerResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        if request.customer.is_none() {
            violations.add("customer", "is required");
        }
        let customer = request.customer.unwrap_or_default();
        let id = id_field(&mut violations, "customer.id", &customer.id);
        let paths: Vec<String> = request.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            violations.add("update_mask", "is required: name the fields to change");
        }
        for (i, path) in paths.iter().enumerate() {
            if !UPDATABLE_FIELDS.contains(&path.as_str()) {
                violations.add(
                    format!("update_mask.paths[{i}]"),
                    format!(
                        "{path:?} cannot be updated (allowed: {})",
                        UPDATABLE_FIELDS.join(", ")
                    ),
                );
            }
        }
        if request.expected_version < 0 {
            violations.add("expected_version", "must not be negative");
        }
        let has = |name: &str| paths.iter().any(|p| p == name);
        Self::profile_text(&mut violations, &customer);
        let kinds: Vec<KeyKind> = [
            ("emails", KeyKind::Email),
            ("phones", KeyKind::Phone),
            ("external_ids", KeyKind::External),
            ("anonymous_ids", KeyKind::Anonymous),
        ]
        .into_iter()
        .filter(|(name, _)| has(name))
        .map(|(_, kind)| kind)
        .collect();
        let keys = self.customer_keys(&mut violations, &customer, &kinds);
        let attributes = has("attributes")
            .then(|| attributes(&mut violations, "customer.attributes", &customer.attributes));
        let consents = has("consents").then(|| {
            consents(
                &mut violations,
                "customer.consents",
                &customer.consents,
                self.fact_times(),
            )
        });
        let text = |name: &str, value: &str| has(name).then(|| value.trim().to_owned());
        let patch = CustomerPatch {
            given_name: text("given_name", &customer.given_name),
            family_name: text("family_name", &customer.family_name),
            company: text("company", &customer.company),
            industry: text("industry", &customer.industry),
            job_title: text("job_title", &customer.job_title),
            attributes,
            consents,
            keys,
        };
        let id = done(violations, || id)?.expect("validated");
        let expected = (request.expected_version > 0).then_some(request.expected_version);
        let updated = self.directory.update(id, patch, expected).await?;
        Ok(Response::new(pb::UpdateCustomerResponse {
            customer: Some(customer_to_proto(&updated)),
        }))
    }

    async fn list_customers(
        &self,
        request: Request<pb::ListCustomersRequest>,
    ) -> Result<Response<pb::ListCustomersResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let page_size = violations.check(validate::page_size(
            "page_size",
            request.page_size,
            self.limits.default_page_size,
            self.limits.max_page_size,
        ));
        let filter = request.filter.unwrap_or_default();
        let state = violations.check(validate::enum_value::<pb::CustomerState>(
            "filter.state",
            filter.state,
            true,
        ));
        let stage = violations.check(validate::enum_value::<common_pb::LifecycleStage>(
            "filter.stage",
            filter.stage,
            true,
        ));
        let health = violations.check(validate::enum_value::<common_pb::Health>(
            "filter.health",
            filter.health,
            true,
        ));
        text_violation(&mut violations, "filter.company", &filter.company, MAX_NAME);
        let created_after = filter.created_after.as_ref().and_then(|ts| {
            violations.check(clm_platform::time::from_timestamp(
                "filter.created_after",
                ts,
            ))
        });
        let created_before = filter.created_before.as_ref().and_then(|ts| {
            violations.check(clm_platform::time::from_timestamp(
                "filter.created_before",
                ts,
            ))
        });
        let fingerprint = paging::fingerprint(&(
            filter.state,
            filter.stage,
            filter.health,
            &filter.company,
            filter.created_after.as_ref().map(|t| (t.seconds, t.nanos)),
            filter.created_before.as_ref().map(|t| (t.seconds, t.nanos)),
            filter.identified_only,
        ));
        let after_id: Option<Uuid> = violations
            .check(paging::decode(
                "page_token",
                &request.page_token,
                fingerprint,
            ))
            .flatten();
        let query = done(violations, || ListQuery {
            state: match state {
                Some(pb::CustomerState::Merged) => "merged",
                Some(pb::CustomerState::Erased) => "erased",
                _ => "active",
            },
            stage: stage
                .filter(|s| *s != common_pb::LifecycleStage::Unspecified)
                .map(|s| s as i32),
            health: health
                .filter(|h| *h != common_pb::Health::Unspecified)
                .map(|h| h as i32),
            company: (!filter.company.trim().is_empty())
                .then(|| filter.company.trim().to_lowercase()),
            created_after,
            created_before,
            identified_only: filter.identified_only,
            after_id,
            limit: page_size.unwrap_or_default(),
        })?;
        let page = self.directory.list(query).await?;
        Ok(Response::new(pb::ListCustomersResponse {
            customers: page.customers.iter().map(customer_to_proto).collect(),
            next_page_token: page
                .next_after
                .map(|id| paging::encode(fingerprint, &id))
                .unwrap_or_default(),
        }))
    }

    async fn resolve_customer(
        &self,
        request: Request<pb::ResolveCustomerRequest>,
    ) -> Result<Response<pb::ResolveCustomerResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let keys = self.resolve_keys(&mut violations, "", &request.keys);
        let traits = request.traits.unwrap_or_default();
        for (name, value, max) in [
            ("given_name", &traits.given_name, MAX_NAME),
            ("family_name", &traits.family_name, MAX_NAME),
            ("company", &traits.company, MAX_NAME),
            ("industry", &traits.industry, MAX_SHORT_TEXT),
            ("job_title", &traits.job_title, MAX_SHORT_TEXT),
        ] {
            text_violation(&mut violations, &format!("traits.{name}"), value, max);
        }
        let attributes = attributes(&mut violations, "traits.attributes", &traits.attributes);
        let consents = consents(
            &mut violations,
            "consents",
            &request.consents,
            self.fact_times(),
        );
        let resolve = done(violations, || ResolveRequest {
            keys,
            traits: Profile {
                given_name: traits.given_name.trim().to_owned(),
                family_name: traits.family_name.trim().to_owned(),
                company: traits.company.trim().to_owned(),
                industry: traits.industry.trim().to_owned(),
                job_title: traits.job_title.trim().to_owned(),
                attributes,
                consents: Vec::new(),
            },
            consents,
            allow_merge: request.allow_merge,
        })?;
        let resolved = self.directory.resolve(resolve).await?;
        Ok(Response::new(pb::ResolveCustomerResponse {
            customer: Some(customer_to_proto(&resolved.customer)),
            created: resolved.created,
            merged_customer_ids: resolved.merged_ids.iter().map(Uuid::to_string).collect(),
        }))
    }

    async fn resolve_customers(
        &self,
        request: Request<pb::ResolveCustomersRequest>,
    ) -> Result<Response<pb::ResolveCustomersResponse>, Status> {
        let request = request.into_inner();
        let count = request.references.len();
        if count == 0 {
            return Err(
                IdentityError::invalid("references", "at least one reference is required").into(),
            );
        }
        if count > MAX_REFERENCES {
            return Err(IdentityError::invalid(
                "references",
                format!("has {count} entries, at most {MAX_REFERENCES} are allowed"),
            )
            .into());
        }
        let mut results = vec![pb::ResolvedReference::default(); count];
        let mut positions = Vec::with_capacity(count);
        let mut references = Vec::with_capacity(count);
        for (index, raw) in request.references.iter().enumerate() {
            match self.customer_reference(index, raw) {
                Ok(reference) => {
                    positions.push(index);
                    references.push(reference);
                }
                Err(violations) => results[index] = invalid_reference(&violations),
            }
        }
        let outcomes = self.directory.resolve_references(references).await?;
        for (index, outcome) in positions.into_iter().zip(outcomes) {
            results[index] = resolved_reference(outcome)?;
        }
        Ok(Response::new(pb::ResolveCustomersResponse { results }))
    }

    async fn merge_customers(
        &self,
        request: Request<pb::MergeCustomersRequest>,
    ) -> Result<Response<pb::MergeCustomersResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let survivor = id_field(&mut violations, "survivor_id", &request.survivor_id);
        let merged = id_field(&mut violations, "merged_id", &request.merged_id);
        text_violation(&mut violations, "reason", &request.reason, MAX_REASON);
        text_violation(
            &mut violations,
            "requested_by",
            &request.requested_by,
            MAX_SHORT_TEXT,
        );
        let (survivor, merged) = done(violations, || (survivor, merged))?;
        let (survivor, merged) = (survivor.expect("validated"), merged.expect("validated"));
        let (customer, record) = self
            .directory
            .merge(survivor, merged, &request.reason, &request.requested_by)
            .await?;
        Ok(Response::new(pb::MergeCustomersResponse {
            survivor: Some(customer_to_proto(&customer)),
            record: Some(merge_to_proto(&record)),
        }))
    }

    async fn erase_customer(
        &self,
        request: Request<pb::EraseCustomerRequest>,
    ) -> Result<Response<pb::EraseCustomerResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let id = id_field(&mut violations, "customer_id", &request.customer_id);
        text_violation(&mut violations, "reason", &request.reason, MAX_REASON);
        text_violation(
            &mut violations,
            "requested_by",
            &request.requested_by,
            MAX_SHORT_TEXT,
        );
        let id = done(violations, || id)?.expect("validated");
        let erased = self.directory.erase(id).await?;
        tracing::info!(customer_id = %id, requested_by = %request.requested_by, "erasure requested");
        Ok(Response::new(pb::EraseCustomerResponse {
            customer: Some(customer_to_proto(&erased.customer)),
            erase_time: Some(clm_platform::time::to_timestamp(erased.erased_at)),
            suppressed_keys: erased.suppressed_keys as i32,
        }))
    }

    async fn set_lifecycle(
        &self,
        request: Request<pb::SetLifecycleRequest>,
    ) -> Result<Response<pb::SetLifecycleResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let id = id_field(&mut violations, "customer_id", &request.customer_id);
        let lifecycle = lifecycle(
            &mut violations,
            "lifecycle",
            request.lifecycle.as_ref(),
            self.fact_times(),
        );
        let (id, lifecycle) = done(violations, || (id, lifecycle))?;
        let (applied, version) = self
            .directory
            .set_lifecycle(id.expect("validated"), lifecycle.expect("validated"))
            .await?;
        Ok(Response::new(pb::SetLifecycleResponse { applied, version }))
    }

    async fn set_lifecycles(
        &self,
        request: Request<pb::SetLifecyclesRequest>,
    ) -> Result<Response<pb::SetLifecyclesResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        if request.items.is_empty() {
            violations.add("items", "at least one item is required");
        }
        if request.items.len() > self.limits.max_batch_size as usize {
            violations.add(
                "items",
                format!("at most {} items per call", self.limits.max_batch_size),
            );
        }
        let times = self.fact_times();
        let items: Vec<Option<(Uuid, Lifecycle)>> = request
            .items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                let id = id_field(
                    &mut violations,
                    &format!("items[{index}].customer_id"),
                    &item.customer_id,
                );
                let lifecycle = lifecycle(
                    &mut violations,
                    &format!("items[{index}].lifecycle"),
                    item.lifecycle.as_ref(),
                    times,
                );
                Some((id?, lifecycle?))
            })
            .collect();
        let items: Vec<(Uuid, Lifecycle)> = done(violations, || items)?
            .into_iter()
            .map(|item| item.expect("validated"))
            .collect();
        let results = self.directory.set_lifecycles(&items).await?;
        Ok(Response::new(pb::SetLifecyclesResponse {
            results: items
                .iter()
                .zip(results)
                .map(|((id, _), (applied, version))| pb::SetLifecycleResult {
                    customer_id: id.to_string(),
                    applied,
                    version,
                })
                .collect(),
        }))
    }

    type StreamCustomerEventsStream = EventStream;

    async fn stream_customer_events(
        &self,
        request: Request<pb::StreamCustomerEventsRequest>,
    ) -> Result<Response<Self::StreamCustomerEventsStream>, Status> {
        let request = request.into_inner();
        let (after, shard) = log_position(&request.after_cursor, request.shard)?;
        let stream = self
            .directory
            .events(after, shard, request.stop_at_end, self.shutdown.clone())
            .map(|batch| {
                batch
                    .map(|events| pb::StreamCustomerEventsResponse { events })
                    .map_err(Status::from)
            });
        Ok(Response::new(respond(stream)))
    }
}
