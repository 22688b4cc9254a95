//! Resolving references and identity keys to customers, and merging them.

use super::*;

impl CustomerDirectory {
    /// Resolves the references of one ResolveCustomers call: one outcome per
    /// reference, in order. Identical references (the same id, or the same set
    /// of keys) are resolved once and share their outcome; distinct ones are
    /// resolved 16 at a time. A failure of the request
    /// (an unknown or erased customer, a suppressed key, a conflict) is the
    /// outcome of its reference; a database outage fails the whole call.
    pub async fn resolve_references(
        &self,
        references: Vec<CustomerReference>,
    ) -> Result<Vec<ReferenceOutcome>, IdentityError> {
        let mut distinct: Vec<&CustomerReference> = Vec::new();
        let mut distinct_index_of_reference = Vec::with_capacity(references.len());
        let mut index_of_target = BTreeMap::new();
        for reference in &references {
            let next_index = distinct.len();
            let index = *index_of_target
                .entry(reference.target())
                .or_insert(next_index);
            if index == next_index {
                distinct.push(reference);
            }
            distinct_index_of_reference.push(index);
        }

        // The futures are built before they enter the stream (a closure there
        // would make the handler's future not provably `Send`); nothing runs
        // until the stream polls them.
        let pending: Vec<_> =
            distinct
                .iter()
                .enumerate()
                .map(|(index, reference)| async move {
                    (index, self.resolve_reference(reference).await)
                })
                .collect();
        let mut resolving =
            futures_util::stream::iter(pending).buffer_unordered(REFERENCE_CONCURRENCY);
        let mut resolved = Vec::with_capacity(distinct.len());
        while let Some((index, outcome)) = resolving.next().await {
            match outcome {
                Err(err) if err.is_outage() => return Err(err),
                outcome => resolved.push((index, outcome)),
            }
        }
        // Every distinct reference answered once: in index order, the
        // position of an outcome is its index.
        resolved.sort_by_key(|(index, _)| *index);
        let resolved: Vec<ReferenceOutcome> =
            resolved.into_iter().map(|(_, outcome)| outcome).collect();

        Ok(references
            .iter()
            .zip(distinct_index_of_reference)
            .map(|(reference, index)| outcome_for(reference, distinct[index], &resolved[index]))
            .collect())
    }

    pub(super) async fn resolve_reference(
        &self,
        reference: &CustomerReference,
    ) -> ReferenceOutcome {
        match reference {
            CustomerReference::Id(id) => self.live_survivor(*id).await,
            CustomerReference::Keys(keys) => {
                let resolved = self
                    .resolve(ResolveRequest {
                        keys: keys.clone(),
                        traits: Profile::default(),
                        consents: Vec::new(),
                        allow_merge: false,
                    })
                    .await?;
                Ok(ReferencedCustomer {
                    customer_id: resolved.customer.id,
                    created: resolved.created,
                })
            }
        }
    }

    /// The live customer an id names now, through the cache: the customer
    /// itself, or the final survivor of its merges.
    pub(super) async fn live_survivor(&self, id: Uuid) -> ReferenceOutcome {
        let (survivor_id, state) = self.profiles.final_survivor(id).await?;
        match state {
            CustomerState::Active => Ok(ReferencedCustomer {
                customer_id: survivor_id,
                created: false,
            }),
            CustomerState::Erased => Err(IdentityError::NotActive {
                customer_id: survivor_id,
                state: "erased",
                merged_into: None,
            }),
            // The chain of merges broke off (a pointer that leads nowhere or
            // too many hops): say where it ended.
            CustomerState::Merged { into } => Err(IdentityError::NotActive {
                customer_id: survivor_id,
                state: "merged",
                merged_into: Some(into),
            }),
        }
    }

    /// Resolves identity keys to one customer, creating or merging as the
    /// rules say (ResolveCustomer).
    pub async fn resolve(&self, request: ResolveRequest) -> Result<Resolved, IdentityError> {
        let keys = dedupe(request.keys.clone());
        let unsuppress = self.suppression(&keys, &request.consents).await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_resolve(&keys, &request, &unsuppress).await {
                Err(IdentityError::Contended(_)) if attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                outcome => return outcome,
            }
        }
    }

    pub(super) async fn try_resolve(
        &self,
        keys: &[RequestKey],
        request: &ResolveRequest,
        unsuppress: &[Vec<u8>],
    ) -> Result<Resolved, IdentityError> {
        let wanted: Vec<IdentityKey> = keys.iter().map(|k| k.key.clone()).collect();
        let owners: BTreeSet<Uuid> = self
            .store
            .owners_of(&wanted)
            .await?
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        let now = now();
        let mut changes = ChangeSet {
            unsuppress: unsuppress.to_vec(),
            ..ChangeSet::default()
        };

        if owners.is_empty() {
            let mut customer = Customer::new(now);
            customer.profile = request.traits.clone();
            customer.profile.consents.clear();
            customer.profile.record_consents(&request.consents);
            customer.keys = wanted.clone();
            changes.added_keys = wanted.iter().map(|k| (k.clone(), customer.id)).collect();
            changes.events.push(event(
                &customer,
                "customer.created",
                pb::customer_event::Change::Created(pb::CustomerCreated {
                    anonymous: !customer.is_identified(),
                }),
                now,
            ));
            changes.inserts.push(customer.clone());
            return match self.store.commit(&changes).await {
                Ok(()) => {
                    self.cache_committed(&[&customer]).await;
                    tracing::info!(customer_id = %customer.id, "customer created by resolve");
                    Ok(Resolved {
                        customer,
                        created: true,
                        merged_ids: Vec::new(),
                    })
                }
                // Another resolve created the person first: read again.
                Err(StoreError::KeyTaken { .. }) => Err(IdentityError::Contended(customer.id)),
                Err(err) => Err(err.into()),
            };
        }

        let ids: Vec<Uuid> = owners.into_iter().collect();
        let mut found = self.store.get_many(&ids).await?;
        if found.len() != ids.len() || found.iter().any(|c| c.state != CustomerState::Active) {
            // A key moved between the two reads (a concurrent merge or erase).
            return Err(IdentityError::Contended(ids[0]));
        }
        // UUIDv7 ids sort by creation: the oldest comes first.
        found.sort_by_key(|c| c.id);
        let identified: Vec<&Customer> = found.iter().filter(|c| c.is_identified()).collect();
        if identified.len() > 1 && !request.allow_merge {
            return Err(IdentityError::IdentityConflict {
                customer_ids: identified.iter().map(|c| c.id).collect(),
            });
        }
        let survivor = identified.first().copied().unwrap_or(&found[0]).clone();
        let mut next = survivor.next_version(now);
        let mut merged_ids = Vec::new();
        let mut pointers = Vec::new();
        let mut records = Vec::new();
        for other in found.iter().filter(|c| c.id != survivor.id) {
            let reason = if other.is_identified() {
                "resolve with allow_merge: keys identified both customers"
            } else {
                "resolve: anonymous profile identified"
            };
            let (record, pointer) = absorb(
                &mut next,
                other,
                reason,
                "identity.resolve",
                now,
                &mut changes,
            );
            merged_ids.push(other.id);
            pointers.push(pointer);
            records.push(record);
        }
        let mut added_keys = Vec::new();
        for key in &wanted {
            if !next.has_key(key) {
                next.keys.push(key.clone());
                added_keys.push(key.clone());
            }
        }
        let mut traits = request.traits.clone();
        traits.consents.clear();
        next.profile.fill_from(&traits);
        next.profile.record_consents(&request.consents);
        if merged_ids.is_empty()
            && added_keys.is_empty()
            && next.profile == survivor.profile
            && unsuppress.is_empty()
        {
            return Ok(Resolved {
                customer: survivor,
                created: false,
                merged_ids,
            });
        }
        changes.added_keys = added_keys.into_iter().map(|k| (k, next.id)).collect();
        for record in &records {
            changes.events.push(merged_event(&next, record, now));
        }
        if next.keys != survivor.keys || next.profile != survivor.profile {
            changes.events.push(event(
                &next,
                "customer.updated",
                pb::customer_event::Change::Updated(pb::CustomerUpdated {
                    changed_fields: survivor.changed_fields(&next),
                }),
                now,
            ));
        }
        changes.updates.push((next.clone(), survivor.version));
        match self.store.commit(&changes).await {
            Ok(()) => {
                let mut committed: Vec<&Customer> = pointers.iter().collect();
                committed.push(&next);
                self.cache_committed(&committed).await;
                if !merged_ids.is_empty() {
                    tracing::info!(customer_id = %next.id, merged = merged_ids.len(), "customers merged by resolve");
                }
                Ok(Resolved {
                    customer: next,
                    created: false,
                    merged_ids,
                })
            }
            Err(StoreError::KeyTaken { .. } | StoreError::VersionConflict { .. }) => {
                Err(IdentityError::Contended(next.id))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Merges `merged_id` into `survivor_id` (MergeCustomers).
    pub async fn merge(
        &self,
        survivor_id: Uuid,
        merged_id: Uuid,
        reason: &str,
        requested_by: &str,
    ) -> Result<(Customer, MergeRecord), IdentityError> {
        if survivor_id == merged_id {
            return Err(IdentityError::SelfMerge);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let survivor = self.load_active(survivor_id).await?;
            let merged = self.load_active(merged_id).await?;
            let now = now();
            let mut changes = ChangeSet::default();
            let mut next = survivor.next_version(now);
            let (record, pointer) =
                absorb(&mut next, &merged, reason, requested_by, now, &mut changes);
            changes.events.push(merged_event(&next, &record, now));
            changes.updates.push((next.clone(), survivor.version));
            match self.store.commit(&changes).await {
                Ok(()) => {
                    self.cache_committed(&[&pointer, &next]).await;
                    tracing::info!(customer_id = %survivor_id, merged_id = %merged_id, merge_id = %record.merge_id, "customers merged");
                    return Ok((next, record));
                }
                Err(StoreError::VersionConflict { .. }) if attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(StoreError::VersionConflict { .. }) => {
                    return Err(IdentityError::Contended(survivor_id));
                }
                Err(err) => return Err(err.into()),
            }
        }
    }
}
