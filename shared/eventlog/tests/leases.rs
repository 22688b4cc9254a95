//! Shard leases on PostgreSQL: replicas split the shards fairly and never
//! hold one twice, a replica that stops hands its shards over, one that
//! vanishes has them taken over once its leases expire, and a write under
//! a lease that was taken over is refused.

#![allow(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clm_eventlog::leases::{self, Fence, LeaseGroup, ShardLease};
use clm_eventlog::{kit, shard_of};
use clm_platform::db::{self, Pools, ServiceMigrations};
use clm_platform::server::Shutdown;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use uuid::Uuid;

const MIGRATIONS: ServiceMigrations = ServiceMigrations {
    schema: "leases_test",
    postgres: &[kit::postgres_migration(1)],
    sqlite: &[kit::sqlite_migration(1)],
};

async fn database() -> Option<Pools> {
    let url = clm_platform::testing::fresh_postgres_database("eventlog_leases").await?;
    let pools = db::connect(&url, MIGRATIONS.schema, 8).await.unwrap();
    MIGRATIONS.run(&pools).await.unwrap();
    Some(pools)
}

fn pg(pools: &Pools) -> PgPool {
    match pools {
        Pools::Postgres(pool) => pool.clone(),
        Pools::Sqlite(_) => unreachable!("a PostgreSQL test"),
    }
}

/// Which replica runs which shard's work now, and every lease handed out.
#[derive(Default)]
struct Board {
    running: BTreeMap<u32, Vec<usize>>,
    leases: Vec<(usize, ShardLease)>,
}

type Shared = Arc<Mutex<Board>>;

/// A replica: a lease keeper whose work records itself on the board while
/// it runs.
struct Replica {
    stop: Shutdown,
    handle: JoinHandle<anyhow::Result<()>>,
}

fn replica(pools: &Pools, group: LeaseGroup, number: usize, board: &Shared) -> Replica {
    let stop = Shutdown::new();
    let board = board.clone();
    let handle = tokio::spawn(leases::run(
        pools.clone(),
        group,
        move |lease: ShardLease, stop: Shutdown| {
            let board = board.clone();
            async move {
                let index = lease.shard.index;
                {
                    let mut board = board.lock().unwrap();
                    board.running.entry(index).or_default().push(number);
                    board.leases.push((number, lease));
                }
                stop.triggered().await;
                let mut board = board.lock().unwrap();
                board
                    .running
                    .get_mut(&index)
                    .unwrap()
                    .retain(|n| *n != number);
                Ok(())
            }
        },
        stop.clone(),
    ));
    Replica { stop, handle }
}

/// Shards held per replica, failing when a shard runs twice.
fn held(board: &Shared) -> BTreeMap<usize, BTreeSet<u32>> {
    let board = board.lock().unwrap();
    let mut held: BTreeMap<usize, BTreeSet<u32>> = BTreeMap::new();
    for (shard, owners) in &board.running {
        assert!(
            owners.len() <= 1,
            "shard {shard} runs on {owners:?} at once"
        );
        for owner in owners {
            held.entry(*owner).or_default().insert(*shard);
        }
    }
    held
}

async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn split_among(board: &Shared, replicas: &[usize], shards: u32) -> bool {
    let held = held(board);
    let all: BTreeSet<u32> = held.values().flatten().copied().collect();
    let share = shards.div_ceil(replicas.len() as u32) as usize;
    all.len() == shards as usize
        && replicas.iter().all(|r| {
            let n = held.get(r).map_or(0, BTreeSet::len);
            n + 1 >= share && n <= share
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_computes_the_shard_of_a_customer_as_the_log_does() {
    let Some(pools) = database().await else {
        return;
    };
    let ids: Vec<Uuid> = (0..500)
        .map(|_| Uuid::now_v7())
        .chain((0..500).map(|_| Uuid::new_v4()))
        .chain([Uuid::nil(), Uuid::max()])
        .collect();
    let computed: Vec<i32> = sqlx::query_scalar(
        "SELECT clm_shard_of(id) FROM UNNEST($1::uuid[]) WITH ORDINALITY AS u(id, n) ORDER BY n",
    )
    .bind(&ids)
    .fetch_all(&pg(&pools))
    .await
    .unwrap();
    let expected: Vec<i32> = ids.iter().map(|id| shard_of(Some(*id))).collect();
    assert_eq!(computed, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_split_the_shards_and_hand_them_over() {
    let Some(pools) = database().await else {
        return;
    };
    let group = LeaseGroup {
        name: "test.split",
        shards: 8,
        lease_time: Duration::from_millis(900),
    };
    let board = Shared::default();
    let first = replica(&pools, group, 1, &board);
    until(
        "one replica holds every shard",
        Duration::from_secs(10),
        || split_among(&board, &[1], 8),
    )
    .await;
    let second = replica(&pools, group, 2, &board);
    let third = replica(&pools, group, 3, &board);
    until(
        "three replicas hold 2 or 3 shards each",
        Duration::from_secs(10),
        || split_among(&board, &[1, 2, 3], 8),
    )
    .await;

    // A replica that stops hands its shards back at once: the others take
    // them well before its leases would have expired.
    second.stop.trigger();
    second.handle.await.unwrap().unwrap();
    let handed = tokio::time::Instant::now();
    until(
        "the two left hold 4 shards each",
        Duration::from_secs(10),
        || split_among(&board, &[1, 3], 8),
    )
    .await;
    assert!(
        handed.elapsed() < group.lease_time,
        "the hand-over took {:?}, as long as a lease",
        handed.elapsed()
    );

    // One that vanishes without a word loses its shards when its leases
    // expire.
    third.handle.abort();
    let vanished = tokio::time::Instant::now();
    board
        .lock()
        .unwrap()
        .running
        .values_mut()
        .for_each(|owners| owners.retain(|n| *n != 3));
    until(
        "the last replica holds every shard",
        Duration::from_secs(10),
        || split_among(&board, &[1], 8),
    )
    .await;
    assert!(
        vanished.elapsed() >= group.lease_time / 2,
        "shards were taken before the vanished replica's leases could expire"
    );
    first.stop.trigger();
    first.handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_under_a_lease_taken_over_is_refused() {
    let Some(pools) = database().await else {
        return;
    };
    let group = LeaseGroup {
        name: "test.fence",
        shards: 1,
        lease_time: Duration::from_millis(600),
    };
    let board = Shared::default();
    let paused = replica(&pools, group, 1, &board);
    until(
        "the first replica holds the shard",
        Duration::from_secs(10),
        || split_among(&board, &[1], 1),
    )
    .await;
    let old = board.lock().unwrap().leases[0].1.fence.clone();
    let pool = pg(&pools);
    let check = |fence: Fence| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            let outcome = fence.check_postgres(&mut tx).await.unwrap();
            tx.commit().await.unwrap();
            outcome
        }
    };
    assert_eq!(check(old.clone()).await, Ok(()));

    // The holder stops renewing (a process frozen or cut off) while a
    // second replica waits. A commit of the holder's that checked its
    // lease in time holds the take back until it ends, however long; then
    // the shard is taken.
    paused.handle.abort();
    board.lock().unwrap().running.clear();
    let mut in_flight = pool.begin().await.unwrap();
    assert_eq!(old.check_postgres(&mut in_flight).await.unwrap(), Ok(()));
    let taker = replica(&pools, group, 2, &board);
    tokio::time::sleep(group.lease_time * 3).await;
    assert!(
        held(&board).is_empty(),
        "the shard was taken while a commit under the old lease was under way"
    );
    in_flight.commit().await.unwrap();
    until(
        "the second replica takes the shard",
        Duration::from_secs(10),
        || split_among(&board, &[2], 1),
    )
    .await;
    let new = board.lock().unwrap().leases[1].1.fence.clone();
    let (
        Fence::Lease {
            token: old_token, ..
        },
        Fence::Lease {
            token: new_token, ..
        },
    ) = (&old, &new)
    else {
        panic!("PostgreSQL leases carry tokens");
    };
    assert!(new_token > old_token, "a take moves the token on");
    let refused = check(old).await;
    assert!(
        matches!(&refused, Err(lost) if lost.group == "test.fence" && lost.index == 0),
        "{refused:?}"
    );
    assert_eq!(check(new).await, Ok(()));
    taker.stop.trigger();
    taker.handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn on_sqlite_one_process_runs_every_shard_unfenced() {
    let dir = tempfile::tempdir().unwrap();
    let url = clm_platform::Secret::new(format!("sqlite://{}/leases.db", dir.path().display()));
    let pools = db::connect(&url, MIGRATIONS.schema, 2).await.unwrap();
    MIGRATIONS.run(&pools).await.unwrap();
    let group = LeaseGroup {
        name: "test.sqlite",
        shards: 4,
        lease_time: Duration::from_millis(600),
    };
    let board = Shared::default();
    let only = replica(&pools, group, 1, &board);
    until("every shard runs", Duration::from_secs(5), || {
        split_among(&board, &[1], 4)
    })
    .await;
    assert!(
        board
            .lock()
            .unwrap()
            .leases
            .iter()
            .all(|(_, lease)| lease.fence == Fence::Sole)
    );
    only.stop.trigger();
    only.handle.await.unwrap().unwrap();
    assert!(held(&board).is_empty(), "every shard's work stopped");
}
