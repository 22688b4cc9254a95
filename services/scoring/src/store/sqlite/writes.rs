//! Committing a change set on SQLite, in one transaction on the writer:
//! the cursor move and the rescore page's progress, then the customers
//! (each checked against the version read) and their features, the kept
//! inputs, and the transitions and their transition log entries.

use chrono::Utc;
use clm_eventlog::EventLog;
use clm_eventlog::consumer::cursors;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

use super::rescores::record_rescore_page;
use super::{SqliteScoringStore, micros, sole};
use crate::store::{
    ChangeSet, CursorMove, StoreError, encode_fact, encode_features, encode_snapshot,
    encode_transition, log_entries,
};

async fn move_cursor(tx: &mut SqliteConnection, cursor: &CursorMove) -> Result<(), StoreError> {
    cursors::move_sqlite(tx, cursor)
        .await
        .map_err(StoreError::from_db)?
        .map_err(StoreError::from)
}

/// Rows per multi-row statement (SQLite allows 32,766 parameters).
const ROWS_PER_STATEMENT: usize = 1_000;

async fn write_customers(tx: &mut SqliteConnection, changes: &ChangeSet) -> Result<(), StoreError> {
    // One upsert per chunk: a new customer (version 0) is inserted; a known
    // one is updated only from the version read. Anything else leaves the
    // row alone, so fewer rows change than were sent: a conflict.
    for chunk in changes.customers.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO customers (customer_id, merged_into, snapshot, next_due_at, version, position_version) ",
        );
        query.push_values(chunk, |mut row, write| {
            let record = &write.record;
            row.push_bind(record.customer_id.to_string())
                .push_bind(record.merged_into.map(|id| id.to_string()))
                .push_bind(encode_snapshot(record.snapshot.as_ref()))
                .push_bind(record.next_due_at.map(micros))
                .push_bind(record.version + 1)
                .push_bind(if write.position_changed {
                    record.version + 1
                } else {
                    0
                });
        });
        // `last_transition` is no longer kept here (the newest row of
        // `transitions` is read instead): cleared so rows written by
        // earlier versions shrink as they are rewritten.
        query.push(
            " ON CONFLICT (customer_id) DO UPDATE SET merged_into = excluded.merged_into, \
               snapshot = excluded.snapshot, last_transition = NULL, \
               next_due_at = excluded.next_due_at, version = excluded.version, \
               position_version = max(customers.position_version, excluded.position_version) \
             WHERE customers.version = excluded.version - 1",
        );
        let written = query
            .build()
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
        if written.rows_affected() != chunk.len() as u64 {
            return Err(StoreError::Conflict(
                "a customer changed concurrently".into(),
            ));
        }
        let features: Vec<_> = chunk.iter().filter(|w| w.features_changed).collect();
        if features.is_empty() {
            continue;
        }
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO customer_features (customer_id, features, folded_to, inputs_kept) ",
        );
        query.push_values(features, |mut row, write| {
            row.push_bind(write.record.customer_id.to_string())
                .push_bind(encode_features(&write.record.features))
                .push_bind(write.record.folded_to.map(micros))
                .push_bind(write.record.inputs_kept);
        });
        query.push(
            " ON CONFLICT (customer_id) DO UPDATE SET features = excluded.features, \
               folded_to = excluded.folded_to, inputs_kept = excluded.inputs_kept",
        );
        query
            .build()
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
    }
    Ok(())
}

async fn write_inputs(tx: &mut SqliteConnection, changes: &ChangeSet) -> Result<(), StoreError> {
    for (merged, survivor) in &changes.moved_inputs {
        sqlx::query(
            "UPDATE OR IGNORE customer_inputs SET customer_id = ?2 \
             WHERE customer_id = ?1 AND is_profile = 0",
        )
        .bind(merged.to_string())
        .bind(survivor.to_string())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
    }
    for id in &changes.forgotten_profiles {
        sqlx::query("DELETE FROM customer_inputs WHERE customer_id = ?1 AND is_profile = 1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
    }
    for chunk in changes.inputs.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO customer_inputs (customer_id, input_key, occur_time, is_profile, body) ",
        );
        query.push_values(chunk, |mut row, (customer, input)| {
            row.push_bind(customer.to_string())
                .push_bind(&input.key)
                .push_bind(micros(input.at))
                .push_bind(input.is_profile())
                .push_bind(encode_fact(&input.fact));
        });
        // A profile is replaced; a touchpoint's facts never change.
        query.push(
            " ON CONFLICT (customer_id, input_key) DO UPDATE SET \
               occur_time = excluded.occur_time, body = excluded.body",
        );
        query
            .build()
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
    }
    Ok(())
}

async fn write_transitions(
    tx: &mut SqliteConnection,
    log: &EventLog,
    changes: &ChangeSet,
) -> Result<(), StoreError> {
    for transition in &changes.retracted {
        sqlx::query("DELETE FROM transitions WHERE id = ?1")
            .bind(transition.id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_db)?;
    }
    for transition in &changes.transitions {
        sqlx::query(
            "INSERT INTO transitions (id, customer_id, transition_time, body) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(transition.id.to_string())
        .bind(transition.customer_id.to_string())
        .bind(micros(transition.at))
        .bind(encode_transition(transition))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_db)?;
    }
    let now = Utc::now();
    for entry in log_entries(changes, now) {
        log.append_sqlite(tx, &entry.to_append(now))
            .await
            .map_err(StoreError::from_db)?;
    }
    Ok(())
}

pub(super) async fn commit(
    store: &SqliteScoringStore,
    changes: &ChangeSet,
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut tx = store
        .pools
        .writer
        .begin()
        .await
        .map_err(StoreError::from_db)?;
    sole(&changes.fence)?;
    if let Some(cursor) = &changes.cursor {
        move_cursor(&mut tx, cursor).await?;
    }
    if let Some(progress) = &changes.rescore {
        record_rescore_page(&mut tx, progress).await?;
    }
    write_customers(&mut tx, changes).await?;
    write_inputs(&mut tx, changes).await?;
    write_transitions(&mut tx, &store.log, changes).await?;
    tx.commit().await.map_err(StoreError::from_db)?;
    if !changes.forgotten_profiles.is_empty() {
        // Profiles are personal data: leave none in the WAL. The erasure
        // is committed already; a busy WAL is wiped by a later erasure.
        if let Err(err) = clm_platform::db::wipe_sqlite_wal(&store.pools, 50).await {
            tracing::warn!(error = %err, "cannot truncate the WAL after an erasure");
        }
    }
    if !changes.transitions.is_empty() || !changes.retracted.is_empty() {
        store.log.notify_appended();
    }
    Ok(())
}

/// The cursor a consumer saved for a shard.
pub(super) async fn saved_cursor(
    store: &SqliteScoringStore,
    consumer: &str,
    shard: clm_eventlog::ShardFilter,
) -> Result<String, StoreError> {
    cursors::load(
        &clm_platform::db::Pools::Sqlite(store.pools.clone()),
        consumer,
        shard,
    )
    .await
    .map_err(|err| StoreError::Unavailable(err.0))
}
