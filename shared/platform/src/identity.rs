//! Resolves customer references through the identity service: one
//! ResolveCustomers round trip for a whole batch, with a short-lived local
//! cache of what was resolved.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::service::PeerChannel;
use clm_proto::common as common_pb;
use clm_proto::identity as identity_pb;
use clm_proto::identity::customer_service_client::CustomerServiceClient;
use uuid::Uuid;

/// How a batch names a customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// By id.
    Id(Uuid),
    /// By identity keys, resolved (and created when new) by identity.
    Keys(Vec<common_pb::IdentityKey>),
}

/// What identifies a reference within a batch and in the cache: the id
/// itself, or the identity keys in a canonical order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ReferenceKey {
    Id(Uuid),
    Keys(String),
}

impl Reference {
    fn key(&self) -> ReferenceKey {
        match self {
            Self::Id(id) => ReferenceKey::Id(*id),
            Self::Keys(keys) => {
                let mut parts: Vec<String> = keys
                    .iter()
                    .map(|k| format!("{}\u{1f}{}\u{1f}{}", k.kind, k.source, k.value))
                    .collect();
                parts.sort_unstable();
                ReferenceKey::Keys(parts.join("\u{1e}"))
            }
        }
    }

    fn to_proto(&self) -> common_pb::CustomerReference {
        common_pb::CustomerReference {
            reference: Some(match self {
                Self::Id(id) => {
                    common_pb::customer_reference::Reference::CustomerId(id.to_string())
                }
                Self::Keys(keys) => common_pb::customer_reference::Reference::IdentityKeys(
                    common_pb::IdentityKeys { keys: keys.clone() },
                ),
            }),
        }
    }
}

/// What identity said about one reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The customer (after merges: the survivor).
    Customer(Uuid),
    /// Identity refused the reference.
    Refused {
        /// The ErrorInfo reason (CUSTOMER_NOT_FOUND, CUSTOMER_ERASED, …).
        reason: String,
        /// Identity's explanation, one per problem: the path of the bad field
        /// within the reference (e.g. `.identity_keys.keys[0].value`, empty
        /// for the reference as a whole) and why.
        problems: Vec<(String, String)>,
    },
}

/// Splits identity's explanation of a refused reference into its problems,
/// with paths relative to the reference. Identity names fields of its own
/// request (`references[3].identity_keys.keys[0].value: …`, joined by `; `);
/// a caller of touchpoints named them otherwise, so the request-specific
/// prefix `references[<position>]` is taken off here.
fn problems_of(position: usize, message: &str) -> Vec<(String, String)> {
    let prefix = format!("references[{position}]");
    message
        .split("; ")
        .map(|part| match part.strip_prefix(&prefix) {
            Some(rest) => match rest.split_once(": ") {
                Some((path, description)) => (path.to_owned(), description.to_owned()),
                None => (String::new(), rest.trim_start_matches(": ").to_owned()),
            },
            None => (String::new(), part.to_owned()),
        })
        .collect()
}

/// The identity service could not be asked.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the identity service is unavailable: {0}")]
pub struct IdentityUnavailable(pub String);

/// The most references one ResolveCustomers call carries.
const MAX_PER_CALL: usize = 1000;

/// Resolves references through the identity service.
#[derive(Clone)]
pub struct IdentityResolver {
    client: CustomerServiceClient<PeerChannel>,
    /// The customer that identity keys resolved to. References by id are
    /// not cached: identity is asked by id either way.
    cache: moka::sync::Cache<String, Uuid>,
    timeout: Duration,
}

impl IdentityResolver {
    /// A resolver asking the identity service on `channel`, each call
    /// within `timeout`.
    pub fn new(channel: PeerChannel, timeout: Duration) -> Self {
        Self {
            client: CustomerServiceClient::new(channel),
            cache: moka::sync::Cache::builder()
                .max_capacity(200_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            timeout,
        }
    }

    /// Forgets what is cached about a customer (after a merge or erasure).
    pub fn forget(&self, customer_id: Uuid) {
        let stale: Vec<String> = self
            .cache
            .iter()
            .filter(|(_, id)| *id == customer_id)
            .map(|(key, _)| (*key).clone())
            .collect();
        for key in stale {
            self.cache.invalidate(&key);
        }
    }

    /// One resolution per reference, in order, from one ResolveCustomers
    /// call per 1,000 distinct references (two rounds at most). Fails when
    /// identity cannot be asked.
    ///
    /// A cached resolution is never used unchecked: it is asked again by
    /// customer id, which identity answers from its hot cache. An erasure
    /// must stop new data under the erased keys as soon as EraseCustomer
    /// returns, and only identity knows of it by then (this service reads
    /// it from the log a moment later). A cached customer that is no longer
    /// active is forgotten and its reference resolved afresh, so that the
    /// caller gets identity's answer for the keys it sent
    /// (IDENTITY_KEY_SUPPRESSED for an erased person's e-mail, say).
    pub async fn resolve(
        &self,
        references: &[Reference],
    ) -> Result<Vec<Resolution>, IdentityUnavailable> {
        let keys: Vec<ReferenceKey> = references.iter().map(Reference::key).collect();
        let mut resolved: HashMap<ReferenceKey, Resolution> = HashMap::new();
        let mut seen: HashSet<&ReferenceKey> = HashSet::new();
        let mut asks: Vec<Ask<'_>> = Vec::new();
        for (key, reference) in keys.iter().zip(references) {
            if !seen.insert(key) {
                continue;
            }
            let cached = match key {
                ReferenceKey::Id(_) => None,
                ReferenceKey::Keys(keys) => self.cache.get(keys),
            };
            asks.push(Ask {
                key,
                reference,
                cached,
            });
        }
        let mut afresh: Vec<Ask<'_>> = Vec::new();
        for (ask, answer) in asks.iter().zip(self.ask(&asks).await?) {
            afresh.extend(self.settle(&mut resolved, ask, answer));
        }
        for (ask, answer) in afresh.iter().zip(self.ask(&afresh).await?) {
            // Asked by its reference this time: never asked again.
            self.settle(&mut resolved, ask, answer);
        }
        Ok(keys
            .iter()
            .map(|key| {
                resolved
                    .get(key)
                    .cloned()
                    .expect("every reference was resolved")
            })
            .collect())
    }

    /// Records identity's answer to `ask`, or, for a cached customer that is
    /// no longer active, forgets it and returns the ask to put to identity
    /// again by its reference.
    fn settle<'a>(
        &self,
        resolved: &mut HashMap<ReferenceKey, Resolution>,
        ask: &Ask<'a>,
        answer: Result<Uuid, Resolution>,
    ) -> Option<Ask<'a>> {
        match (answer, ask.cached) {
            (Ok(id), cached) => {
                // A confirmed entry stays as it is (an insert is the costly
                // part of the cache); it expires a minute after it was
                // first resolved by its keys.
                if let ReferenceKey::Keys(keys) = ask.key
                    && cached != Some(id)
                {
                    self.cache.insert(keys.clone(), id);
                }
                resolved.insert(ask.key.clone(), Resolution::Customer(id));
                None
            }
            (Err(_), Some(_)) => {
                if let ReferenceKey::Keys(keys) = ask.key {
                    self.cache.invalidate(keys);
                }
                Some(Ask {
                    cached: None,
                    ..*ask
                })
            }
            (Err(refusal), None) => {
                resolved.insert(ask.key.clone(), refusal);
                None
            }
        }
    }

    /// Identity's answer to each ask, in order: the customer, or its
    /// refusal. A cached ask is asked by the cached customer id.
    async fn ask(
        &self,
        asks: &[Ask<'_>],
    ) -> Result<Vec<Result<Uuid, Resolution>>, IdentityUnavailable> {
        let mut answers = Vec::with_capacity(asks.len());
        for chunk in asks.chunks(MAX_PER_CALL) {
            let mut request = tonic::Request::new(identity_pb::ResolveCustomersRequest {
                references: chunk
                    .iter()
                    .map(|ask| match ask.cached {
                        Some(id) => Reference::Id(id).to_proto(),
                        None => ask.reference.to_proto(),
                    })
                    .collect(),
            });
            request.set_timeout(self.timeout);
            let response = self
                .client
                .clone()
                .resolve_customers(request)
                .await
                .map_err(|status| {
                    IdentityUnavailable(format!("{}: {}", status.code(), status.message()))
                })?
                .into_inner();
            if response.results.len() != chunk.len() {
                return Err(IdentityUnavailable(
                    "identity answered with the wrong number of results".into(),
                ));
            }
            for (position, result) in response.results.into_iter().enumerate() {
                answers.push(if result.error_code == 0 {
                    Ok(Uuid::try_parse(&result.customer_id).map_err(|_| {
                        IdentityUnavailable("identity returned a malformed customer id".into())
                    })?)
                } else {
                    Err(Resolution::Refused {
                        problems: problems_of(position, &result.error_message),
                        reason: result.error_reason,
                    })
                });
            }
        }
        Ok(answers)
    }
}

/// One distinct reference of a batch, and the customer cached for it.
#[derive(Clone, Copy)]
struct Ask<'a> {
    key: &'a ReferenceKey,
    reference: &'a Reference,
    cached: Option<Uuid>,
}

#[cfg(test)]
mod tests {
    use super::problems_of;

    #[test]
    fn identity_paths_become_relative_to_the_reference() {
        assert_eq!(
            problems_of(
                3,
                "references[3].identity_keys.keys[0].value: is not a valid e-mail address; \
                 references[3].identity_keys.keys[1].kind: is required"
            ),
            [
                (
                    ".identity_keys.keys[0].value".to_owned(),
                    "is not a valid e-mail address".to_owned()
                ),
                (
                    ".identity_keys.keys[1].kind".to_owned(),
                    "is required".to_owned()
                ),
            ]
        );
        assert_eq!(
            problems_of(0, "customer 0190 was erased"),
            [(String::new(), "customer 0190 was erased".to_owned())]
        );
    }
}
