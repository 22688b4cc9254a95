//! How requests are read and checked: every field named in a violation,
//! nothing stored from a bad request.

use super::*;

pub(super) const MAX_NAME: usize = 256;
pub(super) const MAX_SHORT_TEXT: usize = 128;
pub(super) const MAX_EMAILS: usize = 20;
pub(super) const MAX_PHONES: usize = 20;
pub(super) const MAX_EXTERNAL_IDS: usize = 20;
pub(super) const MAX_ANONYMOUS_IDS: usize = 100;
pub(super) const MAX_ATTRIBUTES: usize = 64;
pub(super) const MAX_ATTRIBUTE_VALUE: usize = 1024;
pub(super) const MAX_CONSENTS: usize = 32;
pub(super) const MAX_RESOLVE_KEYS: usize = 20;
pub(super) const MAX_REFERENCES: usize = 1000;
pub(super) const MAX_REASON: usize = 512;

/// The paths UpdateCustomer accepts in its mask.
pub(super) const UPDATABLE_FIELDS: &[&str] = &[
    "given_name",
    "family_name",
    "emails",
    "phones",
    "external_ids",
    "anonymous_ids",
    "company",
    "industry",
    "job_title",
    "attributes",
    "consents",
];

pub(super) fn id_field(violations: &mut Violations, field: &str, raw: &str) -> Option<Uuid> {
    violations.check(validate::uuid(field, raw))
}

pub(super) fn done<T>(
    violations: Violations,
    value: impl FnOnce() -> T,
) -> Result<T, IdentityError> {
    violations
        .into_result()
        .map_err(IdentityError::InvalidArgument)?;
    Ok(value())
}

pub(super) fn attributes(
    violations: &mut Violations,
    field: &str,
    raw: &std::collections::HashMap<String, String>,
) -> BTreeMap<String, String> {
    if raw.len() > MAX_ATTRIBUTES {
        violations.add(
            field,
            format!(
                "has {} entries, at most {MAX_ATTRIBUTES} are allowed",
                raw.len()
            ),
        );
    }
    for (key, value) in raw {
        let valid_key = !key.is_empty()
            && key.len() <= 64
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !valid_key {
            violations.add(
                format!("{field}[{key:?}]"),
                "keys are 1 to 64 characters of A-Z, a-z, 0-9, '_', '.', '-'",
            );
        }
        violations.check(validate::text(
            &format!("{field}[{key:?}]"),
            value,
            false,
            MAX_ATTRIBUTE_VALUE,
        ));
    }
    raw.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub(super) fn consents(
    violations: &mut Violations,
    field: &str,
    raw: &[pb::Consent],
    times: FactTimes,
) -> Vec<Consent> {
    if raw.len() > MAX_CONSENTS {
        violations.add(
            field,
            format!(
                "has {} entries, at most {MAX_CONSENTS} are allowed",
                raw.len()
            ),
        );
    }
    let now = times.clock();
    let mut seen = std::collections::HashSet::new();
    raw.iter()
        .enumerate()
        .filter_map(|(i, consent)| {
            let at = format!("{field}[{i}]");
            let purpose_ok = violations
                .check(validate::token(
                    &format!("{at}.purpose"),
                    &consent.purpose,
                    64,
                ))
                .is_some();
            if purpose_ok && !seen.insert(consent.purpose.clone()) {
                violations.add(format!("{at}.purpose"), "appears more than once");
            }
            let status = violations.check(validate::enum_value::<pb::ConsentStatus>(
                &format!("{at}.status"),
                consent.status,
                false,
            ));
            violations.check(validate::text(
                &format!("{at}.source"),
                &consent.source,
                false,
                MAX_SHORT_TEXT,
            ));
            let recorded_at = match &consent.recorded_at {
                None => Some(now),
                Some(ts) => violations.check(times.check(&format!("{at}.recorded_at"), ts)),
            };
            Some(Consent {
                purpose: consent.purpose.clone(),
                status: match status? {
                    pb::ConsentStatus::Granted => ConsentStatus::Granted,
                    pb::ConsentStatus::Denied => ConsentStatus::Denied,
                    pb::ConsentStatus::Withdrawn | pb::ConsentStatus::Unspecified => {
                        ConsentStatus::Withdrawn
                    }
                },
                source: consent.source.clone(),
                recorded_at: recorded_at?,
            })
        })
        .collect()
}

impl CustomerGrpc {
    /// The identity keys of a Customer message, per kind.
    pub(super) fn customer_keys(
        &self,
        violations: &mut Violations,
        customer: &pb::Customer,
        kinds: &[KeyKind],
    ) -> BTreeMap<KeyKind, Vec<RequestKey>> {
        let mut keys = BTreeMap::new();
        let mut add_list = |kind: KeyKind, name: &str, max: usize, values: &[String]| {
            if values.len() > max {
                violations.add(
                    format!("customer.{name}"),
                    format!("has {} entries, at most {max} are allowed", values.len()),
                );
            }
            let list = values
                .iter()
                .enumerate()
                .filter_map(|(i, value)| {
                    let field = format!("customer.{name}[{i}]");
                    let key = match kind {
                        KeyKind::Email => self.normalizer.email(&field, value),
                        KeyKind::Phone => self.normalizer.phone(&field, value),
                        _ => self.normalizer.anonymous(&field, value),
                    };
                    violations.check(key).map(|key| RequestKey { field, key })
                })
                .collect::<Vec<_>>();
            keys.insert(kind, list);
        };
        if kinds.contains(&KeyKind::Email) {
            add_list(KeyKind::Email, "emails", MAX_EMAILS, &customer.emails);
        }
        if kinds.contains(&KeyKind::Phone) {
            add_list(KeyKind::Phone, "phones", MAX_PHONES, &customer.phones);
        }
        if kinds.contains(&KeyKind::Anonymous) {
            add_list(
                KeyKind::Anonymous,
                "anonymous_ids",
                MAX_ANONYMOUS_IDS,
                &customer.anonymous_ids,
            );
        }
        if kinds.contains(&KeyKind::External) {
            if customer.external_ids.len() > MAX_EXTERNAL_IDS {
                violations.add(
                    "customer.external_ids",
                    format!(
                        "has {} entries, at most {MAX_EXTERNAL_IDS} are allowed",
                        customer.external_ids.len()
                    ),
                );
            }
            let list = customer
                .external_ids
                .iter()
                .enumerate()
                .filter_map(|(i, external)| {
                    let field = format!("customer.external_ids[{i}]");
                    violations
                        .check(
                            self.normalizer
                                .external(&field, &external.source, &external.id),
                        )
                        .map(|key| RequestKey { field, key })
                })
                .collect();
            keys.insert(KeyKind::External, list);
        }
        keys
    }

    pub(super) fn profile_text(violations: &mut Violations, customer: &pb::Customer) {
        for (name, value, max) in [
            ("given_name", &customer.given_name, MAX_NAME),
            ("family_name", &customer.family_name, MAX_NAME),
            ("company", &customer.company, MAX_NAME),
            ("industry", &customer.industry, MAX_SHORT_TEXT),
            ("job_title", &customer.job_title, MAX_SHORT_TEXT),
        ] {
            violations.check(validate::text(
                &format!("customer.{name}"),
                value,
                false,
                max,
            ));
        }
    }

    /// The identity keys of a resolve, each named by its field: `keys[i]`
    /// under `prefix` (empty for ResolveCustomer, e.g.
    /// `references[3].identity_keys.` for ResolveCustomers).
    pub(super) fn resolve_keys(
        &self,
        violations: &mut Violations,
        prefix: &str,
        raw: &[common_pb::IdentityKey],
    ) -> Vec<RequestKey> {
        let list_field = format!("{prefix}keys");
        if raw.is_empty() {
            violations.add(&list_field, "at least one identity key is required");
        }
        if raw.len() > MAX_RESOLVE_KEYS {
            violations.add(
                &list_field,
                format!(
                    "has {} entries, at most {MAX_RESOLVE_KEYS} are allowed",
                    raw.len()
                ),
            );
        }
        raw.iter()
            .enumerate()
            .filter_map(|(i, key)| {
                let field = format!("{list_field}[{i}]");
                let kind = violations.check(validate::enum_value::<common_pb::IdentityKind>(
                    &format!("{field}.kind"),
                    key.kind,
                    false,
                ))?;
                let value_field = format!("{field}.value");
                if kind != common_pb::IdentityKind::ExternalId && !key.source.is_empty() {
                    violations.add(
                        format!("{field}.source"),
                        "is only allowed for external ids",
                    );
                    return None;
                }
                let key = match kind {
                    common_pb::IdentityKind::Email => {
                        self.normalizer.email(&value_field, &key.value)
                    }
                    common_pb::IdentityKind::Phone => {
                        self.normalizer.phone(&value_field, &key.value)
                    }
                    common_pb::IdentityKind::AnonymousId => {
                        self.normalizer.anonymous(&value_field, &key.value)
                    }
                    common_pb::IdentityKind::ExternalId => self
                        .normalizer
                        .external(&field, &key.source, &key.value)
                        .map_err(|v| {
                            FieldViolation::new(v.field.replace(".id", ".value"), v.description)
                        }),
                    common_pb::IdentityKind::Unspecified => return None,
                };
                violations.check(key).map(|key| RequestKey { field, key })
            })
            .collect()
    }

    /// One reference of ResolveCustomers (the `index`th), or every violation
    /// that makes it invalid.
    pub(super) fn customer_reference(
        &self,
        index: usize,
        raw: &common_pb::CustomerReference,
    ) -> Result<CustomerReference, Vec<FieldViolation>> {
        let field = format!("references[{index}]");
        match &raw.reference {
            None => Err(vec![FieldViolation::new(
                field,
                "set exactly one of customer_id or identity_keys",
            )]),
            Some(common_pb::customer_reference::Reference::CustomerId(id)) => {
                validate::uuid(&format!("{field}.customer_id"), id)
                    .map(CustomerReference::Id)
                    .map_err(|violation| vec![violation])
            }
            Some(common_pb::customer_reference::Reference::IdentityKeys(keys)) => {
                let mut violations = Violations::new();
                let keys = self.resolve_keys(
                    &mut violations,
                    &format!("{field}.identity_keys."),
                    &keys.keys,
                );
                violations.into_result()?;
                Ok(CustomerReference::Keys(keys))
            }
        }
    }
}

pub(super) fn text_violation(violations: &mut Violations, field: &str, value: &str, max: usize) {
    violations.check(validate::text(field, value, false, max));
}

/// The snapshot at `field` (e.g. `lifecycle`, `items[2].lifecycle`).
pub(super) fn lifecycle(
    violations: &mut Violations,
    field: &str,
    raw: Option<&common_pb::LifecycleSnapshot>,
    times: FactTimes,
) -> Option<Lifecycle> {
    let Some(raw) = raw else {
        violations.add(field, "is required");
        return None;
    };
    let stage = violations.check(validate::enum_value::<common_pb::LifecycleStage>(
        &format!("{field}.stage"),
        raw.stage,
        true,
    ));
    let status = violations.check(validate::enum_value::<common_pb::AcquisitionStatus>(
        &format!("{field}.acquisition_status"),
        raw.acquisition_status,
        true,
    ));
    let health = violations.check(validate::enum_value::<common_pb::Health>(
        &format!("{field}.health"),
        raw.health,
        true,
    ));
    // The sub-status belongs to ACQUISITION alone, as in scoring's models.
    match (stage, status) {
        (
            Some(common_pb::LifecycleStage::Acquisition),
            Some(common_pb::AcquisitionStatus::Unspecified),
        ) => violations.add(
            format!("{field}.acquisition_status"),
            "is required when the stage is ACQUISITION",
        ),
        (Some(stage), Some(status))
            if stage != common_pb::LifecycleStage::Acquisition
                && status != common_pb::AcquisitionStatus::Unspecified =>
        {
            violations.add(
                format!("{field}.acquisition_status"),
                format!(
                    "must be unspecified when the stage is {}",
                    stage.as_str_name()
                ),
            )
        }
        _ => {}
    }
    for (name, score) in [
        ("engagement_score", raw.engagement_score),
        ("lead_score", raw.lead_score),
        ("health_score", raw.health_score),
    ] {
        if !(0.0..=100.0).contains(&score) {
            violations.add(format!("{field}.{name}"), "must be between 0 and 100");
        }
    }
    text_violation(
        violations,
        &format!("{field}.model_version"),
        &raw.model_version,
        64,
    );
    let time = |violations: &mut Violations, name: &str, ts: &Option<prost_types::Timestamp>| {
        ts.as_ref()
            .and_then(|ts| violations.check(times.check(&format!("{field}.{name}"), ts)))
    };
    let stage_entered_at = time(violations, "stage_entered_at", &raw.stage_entered_at);
    let health_entered_at = time(violations, "health_entered_at", &raw.health_entered_at);
    let evaluated_at = match &raw.evaluated_at {
        None => {
            violations.add(format!("{field}.evaluated_at"), "is required");
            None
        }
        Some(ts) => violations.check(times.check(&format!("{field}.evaluated_at"), ts)),
    };
    Some(Lifecycle {
        stage: stage? as i32,
        acquisition_status: status? as i32,
        health: health? as i32,
        engagement_score: raw.engagement_score,
        lead_score: raw.lead_score,
        health_score: raw.health_score,
        model_version: raw.model_version.clone(),
        stage_entered_at,
        health_entered_at,
        evaluated_at: evaluated_at?,
    })
}
