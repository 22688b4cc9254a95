//! Committing a change set on PostgreSQL, in one transaction: the
//! customers (each checked against the version read) and their features,
//! the kept inputs, the transitions and their transition log entries, the
//! rescore page's progress, then the cursor move or the fence check. Also
//! the fence check other writes end with.

use chrono::{DateTime, Utc};
use clm_eventlog::EventLog;
use clm_eventlog::consumer::cursors;
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use super::PostgresScoringStore;
use super::rescores::record_rescore_page;
use crate::store::{
    ChangeSet, CursorMove, CustomerWrite, Fence, StoreError, encode_fact, encode_features,
    encode_snapshot, encode_transition, log_entries,
};

async fn move_cursor(tx: &mut PgConnection, cursor: &CursorMove) -> Result<(), StoreError> {
    cursors::move_postgres(tx, cursor)
        .await
        .map_err(StoreError::from_db)?
        .map_err(StoreError::from)
}

/// Checks the shard leases, last before the commit.
pub(super) async fn check_fences(
    tx: &mut PgConnection,
    fences: &[Fence],
) -> Result<(), StoreError> {
    Fence::check_all_postgres(fences, tx)
        .await
        .map_err(StoreError::from_db)?
        .map_err(|lost| StoreError::LeaseLost(lost.to_string()))
}

/// Plans the rest of the transaction with key lookups in the order of the
/// ids given. Otherwise, on a small table or for a large batch, the planner
/// picks a hash join over a sequential or bitmap scan, which visits (and
/// locks) rows in their physical order: two writers sharing customers could
/// then lock them in opposite orders and deadlock, each deadlock stalling
/// both for `deadlock_timeout` (seen under the lifecycle benchmark). What
/// the transaction does after the update only inserts or looks up by key.
const ORDERED_LOOKUPS: &str = "SELECT set_config('enable_seqscan', 'off', true), \
     set_config('enable_bitmapscan', 'off', true), set_config('enable_hashjoin', 'off', true), \
     set_config('enable_mergejoin', 'off', true)";

async fn write_customers(tx: &mut PgConnection, changes: &ChangeSet) -> Result<(), StoreError> {
    // In id order, and the update below runs as a nested loop over those
    // ids with a primary key lookup each (see ORDERED_LOOKUPS), so it locks
    // rows in id order as it goes: writers sharing customers (a touchpoint
    // shard consumer and the customer event consumer, the sweep, a rescore)
    // wait for each other rather than deadlock. The pusher skips locked
    // rows and never waits. No SELECT ... FOR UPDATE first: it wrote each
    // row's lock to the heap and the WAL before the update wrote the row
    // again, and took the locks earlier, so they were held longer.
    let mut sorted: Vec<&CustomerWrite> = changes.customers.iter().collect();
    sorted.sort_by_key(|write| write.record.customer_id);
    let (inserts, updates): (Vec<_>, Vec<_>) = sorted
        .iter()
        .copied()
        .partition(|write| write.record.version == 0);
    if !inserts.is_empty() {
        let mut query = QueryBuilder::<Postgres>::new(
            "INSERT INTO customers (customer_id, shard, merged_into, snapshot, next_due_at, version, position_version) ",
        );
        query.push_values(&inserts, |mut row, write| {
            let record = &write.record;
            row.push_bind(record.customer_id)
                .push_bind(clm_eventlog::shard_of(Some(record.customer_id)))
                .push_bind(record.merged_into)
                .push_bind(encode_snapshot(record.snapshot.as_ref()))
                .push_bind(record.next_due_at)
                .push_bind(1_i64)
                .push_bind(i64::from(write.position_changed));
        });
        query.push(" ON CONFLICT (customer_id) DO NOTHING");
        let inserted = query
            .build()
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        if inserted.rows_affected() != inserts.len() as u64 {
            return Err(StoreError::Conflict(
                "a customer was stored concurrently".into(),
            ));
        }
    }
    if !updates.is_empty() {
        sqlx::query(ORDERED_LOOKUPS)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        let ids: Vec<Uuid> = updates.iter().map(|w| w.record.customer_id).collect();
        let merged: Vec<Option<Uuid>> = updates.iter().map(|w| w.record.merged_into).collect();
        let snapshots: Vec<Option<Vec<u8>>> = updates
            .iter()
            .map(|w| encode_snapshot(w.record.snapshot.as_ref()))
            .collect();
        let due: Vec<Option<DateTime<Utc>>> =
            updates.iter().map(|w| w.record.next_due_at).collect();
        let versions: Vec<i64> = updates.iter().map(|w| w.record.version).collect();
        let moved: Vec<bool> = updates.iter().map(|w| w.position_changed).collect();
        // `last_transition` is no longer kept here (the newest row of
        // `transitions` is read instead): cleared so rows written by
        // earlier versions shrink as they are rewritten.
        let updated = sqlx::query(
            "UPDATE customers AS c SET merged_into = u.merged_into, snapshot = u.snapshot, \
               last_transition = NULL, next_due_at = u.next_due_at, version = c.version + 1, \
               position_version = CASE WHEN u.moved THEN c.version + 1 ELSE c.position_version END \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::bytea[], $4::timestamptz[], $5::bigint[], $6::bool[]) \
               AS u(customer_id, merged_into, snapshot, next_due_at, version, moved) \
             WHERE c.customer_id = u.customer_id AND c.version = u.version",
        )
        .bind(&ids)
        .bind(&merged)
        .bind(&snapshots)
        .bind(&due)
        .bind(&versions)
        .bind(&moved)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
        if updated.rows_affected() != updates.len() as u64 {
            return Err(StoreError::Conflict(
                "a customer changed concurrently".into(),
            ));
        }
    }
    let features: Vec<_> = sorted
        .iter()
        .filter(|write| write.features_changed)
        .collect();
    if !features.is_empty() {
        let ids: Vec<Uuid> = features.iter().map(|w| w.record.customer_id).collect();
        let bodies: Vec<Vec<u8>> = features
            .iter()
            .map(|w| encode_features(&w.record.features))
            .collect();
        let folded_to: Vec<Option<DateTime<Utc>>> =
            features.iter().map(|w| w.record.folded_to).collect();
        let kept: Vec<bool> = features.iter().map(|w| w.record.inputs_kept).collect();
        sqlx::query(
            "INSERT INTO customer_features (customer_id, features, folded_to, inputs_kept) \
             SELECT * FROM UNNEST($1::uuid[], $2::bytea[], $3::timestamptz[], $4::bool[]) \
             ON CONFLICT (customer_id) DO UPDATE SET features = EXCLUDED.features, \
               folded_to = EXCLUDED.folded_to, inputs_kept = EXCLUDED.inputs_kept",
        )
        .bind(&ids)
        .bind(&bodies)
        .bind(&folded_to)
        .bind(&kept)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
    }
    Ok(())
}

async fn write_inputs(tx: &mut PgConnection, changes: &ChangeSet) -> Result<(), StoreError> {
    for (merged, survivor) in &changes.moved_inputs {
        sqlx::query(
            "WITH gone AS (DELETE FROM customer_inputs WHERE customer_id = $1 AND NOT is_profile \
               RETURNING *) \
             INSERT INTO customer_inputs (customer_id, input_key, occur_time, is_profile, body) \
             SELECT $2, input_key, occur_time, is_profile, body FROM gone ON CONFLICT DO NOTHING",
        )
        .bind(merged)
        .bind(survivor)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
    }
    if !changes.forgotten_profiles.is_empty() {
        sqlx::query("DELETE FROM customer_inputs WHERE customer_id = ANY($1) AND is_profile")
            .bind(&changes.forgotten_profiles)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
    }
    if changes.inputs.is_empty() {
        return Ok(());
    }
    // A profile is replaced; a touchpoint's facts never change. Each key
    // comes once (see `ChangeSet::inputs`).
    let mut customers = Vec::with_capacity(changes.inputs.len());
    let mut keys = Vec::with_capacity(changes.inputs.len());
    let mut times = Vec::with_capacity(changes.inputs.len());
    let mut profiles = Vec::with_capacity(changes.inputs.len());
    let mut bodies = Vec::with_capacity(changes.inputs.len());
    for (customer, input) in &changes.inputs {
        customers.push(*customer);
        keys.push(input.key.as_str());
        times.push(input.at);
        profiles.push(input.is_profile());
        bodies.push(encode_fact(&input.fact));
    }
    sqlx::query(
        "INSERT INTO customer_inputs (customer_id, input_key, occur_time, is_profile, body) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::bool[], $5::bytea[]) \
         ON CONFLICT (customer_id, input_key) DO UPDATE SET \
           occur_time = EXCLUDED.occur_time, body = EXCLUDED.body",
    )
    .bind(&customers)
    .bind(&keys)
    .bind(&times)
    .bind(&profiles)
    .bind(&bodies)
    .execute(&mut *tx)
    .await
    .map_err(StoreError::from_db)?;
    Ok(())
}

async fn write_transitions(
    tx: &mut PgConnection,
    log: &EventLog,
    changes: &ChangeSet,
) -> Result<(), StoreError> {
    if !changes.retracted.is_empty() {
        let ids: Vec<Uuid> = changes.retracted.iter().map(|t| t.id).collect();
        sqlx::query("DELETE FROM transitions WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
    }
    let transitions = &changes.transitions;
    if !transitions.is_empty() {
        let mut ids = Vec::with_capacity(transitions.len());
        let mut customers = Vec::with_capacity(transitions.len());
        let mut times = Vec::with_capacity(transitions.len());
        let mut bodies = Vec::with_capacity(transitions.len());
        for transition in transitions {
            ids.push(transition.id);
            customers.push(transition.customer_id);
            times.push(transition.at);
            bodies.push(encode_transition(transition));
        }
        sqlx::query(
            "INSERT INTO transitions (id, customer_id, transition_time, body) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[], $4::bytea[])",
        )
        .bind(&ids)
        .bind(&customers)
        .bind(&times)
        .bind(&bodies)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
    }
    let now = Utc::now();
    let entries = log_entries(changes, now);
    if entries.is_empty() {
        return Ok(());
    }
    let appended: Vec<_> = entries.iter().map(|entry| entry.to_append(now)).collect();
    log.append_many_postgres(tx, &appended)
        .await
        .map_err(StoreError::from_db)?;
    Ok(())
}

pub(super) async fn commit(
    store: &PostgresScoringStore,
    changes: &ChangeSet,
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut tx = store.pool.begin().await.map_err(StoreError::from_db)?;
    if changes.cursor.is_some() || changes.rescore.is_some() {
        // Derived state need not wait for its WAL flush: if the database
        // crashes before the flush, the state is lost together with the
        // cursor (or rescore progress) saved beside it, and is derived
        // again from the log.
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
    }
    write_customers(&mut tx, changes).await?;
    write_inputs(&mut tx, changes).await?;
    write_transitions(&mut tx, &store.log, changes).await?;
    // Last, so the rows every shard's rescore pages share (the
    // rescore's sums) and the shard's lock are held only until the
    // commit.
    if let Some(progress) = &changes.rescore {
        record_rescore_page(&mut tx, progress).await?;
    }
    match &changes.cursor {
        Some(cursor) => move_cursor(&mut tx, cursor).await?,
        None => check_fences(&mut tx, std::slice::from_ref(&changes.fence)).await?,
    }
    tx.commit().await.map_err(StoreError::from_db)?;
    if !changes.forgotten_profiles.is_empty() {
        store.vacuum.erased();
    }
    if !changes.transitions.is_empty() || !changes.retracted.is_empty() {
        store.log.notify_appended();
    }
    Ok(())
}

/// The cursor a consumer saved for a shard.
pub(super) async fn saved_cursor(
    store: &PostgresScoringStore,
    consumer: &str,
    shard: clm_eventlog::ShardFilter,
) -> Result<String, StoreError> {
    cursors::load(
        &clm_platform::db::Pools::Postgres(store.pool.clone()),
        consumer,
        shard,
    )
    .await
    .map_err(|err| StoreError::Unavailable(err.0))
}
