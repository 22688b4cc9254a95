//! How both backends implement the store: one module per seam
//! (`customers`, `writes`, `models`, `rescores`, `history`), each a set of
//! functions taking the store as their first argument, and this macro, which
//! maps the trait onto them.

/// Implements [`ScoringStore`](crate::store::ScoringStore) for a backend's store by forwarding each
/// method to the function of the same name in the backend's seam modules
/// (`customers`, `writes`, `models`, `rescores`, `history`), which take the
/// store as their first argument. Both backends are laid out alike, so this
/// one list maps the trait onto either.
macro_rules! forward_to_seams {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::ScoringStore for $store {
            async fn load_customers(
                &self,
                ids: &[Uuid],
            ) -> Result<HashMap<Uuid, CustomerRecord>, StoreError> {
                customers::load_customers(self, ids).await
            }

            async fn commit(&self, changes: &ChangeSet) -> Result<(), StoreError> {
                writes::commit(self, changes).await
            }

            async fn due_customers(
                &self,
                now: DateTime<Utc>,
                limit: u32,
                shard: ShardFilter,
            ) -> Result<Vec<Uuid>, StoreError> {
                customers::due_customers(self, now, limit, shard).await
            }

            async fn customers_after(
                &self,
                after: Option<Uuid>,
                limit: u32,
                shard: ShardFilter,
            ) -> Result<Vec<CustomerRecord>, StoreError> {
                customers::customers_after(self, after, limit, shard).await
            }

            async fn count_scored(&self) -> Result<i64, StoreError> {
                customers::count_scored(self).await
            }

            async fn unpushed(
                &self,
                limit: u32,
                position: bool,
                after: Option<Uuid>,
                shards: &[ShardFilter],
            ) -> Result<Vec<(Uuid, i64, LifecycleSnapshot)>, StoreError> {
                customers::unpushed(self, limit, position, after, shards).await
            }

            async fn mark_pushed(
                &self,
                pushed: &[(Uuid, i64)],
                fences: &[Fence],
            ) -> Result<(), StoreError> {
                customers::mark_pushed(self, pushed, fences).await
            }

            async fn insert_model(&self, model: &Model) -> Result<ModelInsert, StoreError> {
                models::insert_model(self, model).await
            }

            async fn model(&self, version: &str) -> Result<Option<Model>, StoreError> {
                models::model(self, version).await
            }

            async fn active_model(&self) -> Result<Option<Model>, StoreError> {
                models::active_model(self).await
            }

            async fn list_models(
                &self,
                after: Option<(DateTime<Utc>, String)>,
                limit: u32,
            ) -> Result<Vec<Model>, StoreError> {
                models::list_models(self, after, limit).await
            }

            async fn activate(
                &self,
                version: &str,
                expected_active: Option<&str>,
                rescore: RescoreRow,
                now: DateTime<Utc>,
            ) -> Result<Activation, StoreError> {
                models::activate(self, version, expected_active, rescore, now).await
            }

            async fn install_default(
                &self,
                model: &Model,
                now: DateTime<Utc>,
            ) -> Result<(), StoreError> {
                models::install_default(self, model, now).await
            }

            async fn start_rescore(
                &self,
                rescore: RescoreRow,
            ) -> Result<(RescoreRow, bool), StoreError> {
                rescores::start_rescore(self, rescore).await
            }

            async fn rescore(&self, id: Option<Uuid>) -> Result<Option<RescoreRow>, StoreError> {
                rescores::rescore(self, id).await
            }

            async fn rescore_to_run(&self) -> Result<Option<RescoreRow>, StoreError> {
                rescores::rescore_to_run(self).await
            }

            async fn finish_rescore_shard(
                &self,
                id: Uuid,
                shard: ShardFilter,
                resume_after: Option<Uuid>,
                at: DateTime<Utc>,
                fence: &Fence,
            ) -> Result<bool, StoreError> {
                rescores::finish_rescore_shard(self, id, shard, resume_after, at, fence).await
            }

            async fn rescore_shard(
                &self,
                id: Uuid,
                shard: ShardFilter,
            ) -> Result<(Option<Uuid>, bool), StoreError> {
                rescores::rescore_shard(self, id, shard).await
            }

            async fn set_rescore_state(
                &self,
                id: Uuid,
                state: i32,
                at: DateTime<Utc>,
                error: &str,
            ) -> Result<(), StoreError> {
                rescores::set_rescore_state(self, id, state, at, error).await
            }

            async fn last_transition(
                &self,
                customer_id: Uuid,
            ) -> Result<Option<RecordedTransition>, StoreError> {
                history::last_transition(self, customer_id).await
            }

            async fn list_transitions(
                &self,
                query: &TransitionQuery,
            ) -> Result<Vec<RecordedTransition>, StoreError> {
                history::list_transitions(self, query).await
            }

            async fn customer_transitions(
                &self,
                ids: &[Uuid],
            ) -> Result<HashMap<Uuid, Vec<RecordedTransition>>, StoreError> {
                history::customer_transitions(self, ids).await
            }

            async fn load_inputs(
                &self,
                ids: &[Uuid],
            ) -> Result<HashMap<Uuid, Vec<Input>>, StoreError> {
                history::load_inputs(self, ids).await
            }

            fn transition_log(&self) -> &EventLog {
                history::transition_log(self)
            }

            async fn saved_cursor(
                &self,
                consumer: &str,
                shard: ShardFilter,
            ) -> Result<String, StoreError> {
                writes::saved_cursor(self, consumer, shard).await
            }
        }
    };
}
pub(crate) use forward_to_seams;
