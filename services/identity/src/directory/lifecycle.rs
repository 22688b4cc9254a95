//! Erasure and the lifecycle snapshots scoring pushes.

use super::*;

impl CustomerDirectory {
    /// Erases a customer's personal data (EraseCustomer).
    pub async fn erase(&self, id: Uuid) -> Result<Erased, IdentityError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self.load(id).await?;
            match current.state {
                CustomerState::Erased => {
                    // A retry after a purge that failed finishes it.
                    self.store.purge_erased().await?;
                    let erased_at = current.erased_at.unwrap_or(current.updated_at);
                    return Ok(Erased {
                        customer: current,
                        erased_at,
                        suppressed_keys: 0,
                    });
                }
                CustomerState::Merged { into } => {
                    return Err(IdentityError::NotActive {
                        customer_id: id,
                        state: "merged",
                        merged_into: Some(into),
                    });
                }
                CustomerState::Active => {}
            }
            let now = now();
            let mut next = current.next_version(now);
            next.state = CustomerState::Erased;
            next.profile = Profile::default();
            next.keys.clear();
            next.lifecycle = None;
            next.erased_at = Some(now);
            let mut changes = ChangeSet {
                removed_keys: current.keys.iter().map(|k| (k.clone(), id)).collect(),
                suppress: current
                    .keys
                    .iter()
                    .map(|k| (self.hasher.hash(k), id))
                    .collect(),
                ..ChangeSet::default()
            };
            changes.events.push(event(
                &next,
                "customer.erased",
                pb::customer_event::Change::Erased(pb::CustomerErased {}),
                now,
            ));
            changes.updates.push((next.clone(), current.version));
            match self.store.commit(&changes).await {
                Ok(()) => {
                    self.cache_committed(&[&next]).await;
                    self.store.purge_erased().await?;
                    tracing::info!(customer_id = %id, suppressed_keys = current.keys.len(), "customer erased");
                    return Ok(Erased {
                        customer: next,
                        erased_at: now,
                        suppressed_keys: current.keys.len(),
                    });
                }
                Err(StoreError::VersionConflict { .. }) if attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(StoreError::VersionConflict { .. }) => {
                    return Err(IdentityError::Contended(id));
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Stores a lifecycle snapshot unless an older one (SetLifecycle).
    /// Returns whether it was applied and the customer's version.
    pub async fn set_lifecycle(
        &self,
        id: Uuid,
        lifecycle: Lifecycle,
    ) -> Result<(bool, i64), IdentityError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self.load(id).await?;
            let mut changes = ChangeSet::default();
            let next = match plan_lifecycle(&current, &lifecycle, now(), &mut changes) {
                Planned::Keep(outcome) => return Ok(outcome),
                Planned::Write(next) => next,
            };
            match self.store.commit(&changes).await {
                Ok(()) => {
                    self.cache_committed(&[&next]).await;
                    return Ok((true, next.version));
                }
                Err(StoreError::VersionConflict { .. }) if attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(StoreError::VersionConflict { .. }) => {
                    return Err(IdentityError::Contended(id));
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Stores several snapshots in one transaction, each as
    /// [`set_lifecycle`](Self::set_lifecycle) would (for a customer named
    /// twice, the newest). Returns (applied, version) per item, in order;
    /// (false, 0) for an unknown customer.
    pub async fn set_lifecycles(
        &self,
        items: &[(Uuid, Lifecycle)],
    ) -> Result<Vec<(bool, i64)>, IdentityError> {
        let mut newest: HashMap<Uuid, &Lifecycle> = HashMap::new();
        for (id, lifecycle) in items {
            let kept = newest.entry(*id).or_insert(lifecycle);
            if lifecycle.evaluated_at > kept.evaluated_at {
                *kept = lifecycle;
            }
        }
        // In id order, so two calls sharing customers lock their rows in
        // the same order and wait for each other rather than deadlock.
        let mut ids: Vec<Uuid> = newest.keys().copied().collect();
        ids.sort_unstable();
        let mut attempt = 0;
        let outcomes = loop {
            attempt += 1;
            let current: HashMap<Uuid, Customer> = self
                .store
                .get_many(&ids)
                .await?
                .into_iter()
                .map(|customer| (customer.id, customer))
                .collect();
            let now = now();
            let mut changes = ChangeSet::default();
            let mut outcomes: HashMap<Uuid, (bool, i64)> = HashMap::new();
            let mut written = Vec::new();
            for id in &ids {
                let Some(customer) = current.get(id) else {
                    outcomes.insert(*id, (false, 0));
                    continue;
                };
                match plan_lifecycle(customer, newest[id], now, &mut changes) {
                    Planned::Keep(outcome) => {
                        outcomes.insert(*id, outcome);
                    }
                    Planned::Write(next) => {
                        outcomes.insert(*id, (true, next.version));
                        written.push(*next);
                    }
                }
            }
            if written.is_empty() {
                break outcomes;
            }
            match self.store.commit(&changes).await {
                Ok(()) => {
                    self.cache_committed(&written.iter().collect::<Vec<_>>())
                        .await;
                    break outcomes;
                }
                Err(StoreError::VersionConflict { .. }) if attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(StoreError::VersionConflict { customer_id }) => {
                    return Err(IdentityError::Contended(customer_id));
                }
                Err(err) => return Err(err.into()),
            }
        };
        Ok(items.iter().map(|(id, _)| outcomes[id]).collect())
    }
}
