//! Domain records to protobuf messages (responses, cache entries, log
//! events). Requests are converted and validated in `grpc.rs`.

use clm_platform::time::to_timestamp;
use clm_proto::common::LifecycleSnapshot;
use clm_proto::identity as pb;

use crate::keys::KeyKind;
use crate::model::{Consent, ConsentStatus, Customer, CustomerState, Lifecycle, MergeRecord};

/// The protobuf form of a customer.
pub fn customer_to_proto(customer: &Customer) -> pb::Customer {
    let (state, merged_into_id) = match customer.state {
        CustomerState::Active => (pb::CustomerState::Active, String::new()),
        CustomerState::Merged { into } => (pb::CustomerState::Merged, into.to_string()),
        CustomerState::Erased => (pb::CustomerState::Erased, String::new()),
    };
    let values = |kind| {
        customer
            .keys_of(kind)
            .map(|key| key.value.clone())
            .collect()
    };
    pb::Customer {
        id: customer.id.to_string(),
        state: state.into(),
        merged_into_id,
        given_name: customer.profile.given_name.clone(),
        family_name: customer.profile.family_name.clone(),
        emails: values(KeyKind::Email),
        phones: values(KeyKind::Phone),
        external_ids: customer
            .keys_of(KeyKind::External)
            .filter_map(|key| key.external_parts())
            .map(|(source, id)| pb::ExternalId {
                source: source.to_owned(),
                id: id.to_owned(),
            })
            .collect(),
        anonymous_ids: values(KeyKind::Anonymous),
        company: customer.profile.company.clone(),
        industry: customer.profile.industry.clone(),
        job_title: customer.profile.job_title.clone(),
        attributes: customer.profile.attributes.clone().into_iter().collect(),
        consents: customer
            .profile
            .consents
            .iter()
            .map(consent_to_proto)
            .collect(),
        lifecycle: customer.lifecycle.as_ref().map(lifecycle_to_proto),
        create_time: Some(to_timestamp(customer.created_at)),
        update_time: Some(to_timestamp(customer.updated_at)),
        version: customer.version,
    }
}

/// The protobuf form of a consent.
pub fn consent_to_proto(consent: &Consent) -> pb::Consent {
    pb::Consent {
        purpose: consent.purpose.clone(),
        status: match consent.status {
            ConsentStatus::Granted => pb::ConsentStatus::Granted,
            ConsentStatus::Denied => pb::ConsentStatus::Denied,
            ConsentStatus::Withdrawn => pb::ConsentStatus::Withdrawn,
        }
        .into(),
        source: consent.source.clone(),
        recorded_at: Some(to_timestamp(consent.recorded_at)),
    }
}

/// The protobuf form of a lifecycle snapshot.
pub fn lifecycle_to_proto(lifecycle: &Lifecycle) -> LifecycleSnapshot {
    LifecycleSnapshot {
        stage: lifecycle.stage,
        acquisition_status: lifecycle.acquisition_status,
        health: lifecycle.health,
        engagement_score: lifecycle.engagement_score,
        lead_score: lifecycle.lead_score,
        health_score: lifecycle.health_score,
        model_version: lifecycle.model_version.clone(),
        stage_entered_at: lifecycle.stage_entered_at.map(to_timestamp),
        health_entered_at: lifecycle.health_entered_at.map(to_timestamp),
        evaluated_at: Some(to_timestamp(lifecycle.evaluated_at)),
    }
}

/// The protobuf form of a merge ledger entry.
pub fn merge_to_proto(record: &MergeRecord) -> pb::MergeRecord {
    pb::MergeRecord {
        merge_id: record.merge_id.to_string(),
        survivor_id: record.survivor_id.to_string(),
        merged_id: record.merged_id.to_string(),
        reason: record.reason.clone(),
        requested_by: record.requested_by.clone(),
        merge_time: Some(to_timestamp(record.merged_at)),
    }
}
