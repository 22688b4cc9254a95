//! The consumer loop: resumes from the saved cursor after every failure,
//! so a failure between reading a batch and committing it re-reads the
//! batch instead of losing it, and a committed batch is never applied twice.

#![allow(missing_docs)]

use clm_eventlog::consumer::cursors::CursorMove;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use clm_eventlog::ShardFilter;
use clm_eventlog::consumer::{self, Backoff, ConsumeError, LogSource, Positioned, Projection};
use clm_eventlog::leases::ShardLease;
use clm_platform::server::Shutdown;
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use tokio::sync::Mutex;

/// A log of the numbers 1..=total, served in batches of 7; the stream of
/// the first few opens breaks after two batches.
struct FlakySource {
    total: u64,
    opens: AtomicUsize,
}

#[async_trait]
impl LogSource for FlakySource {
    type Entry = u64;

    async fn open(
        &self,
        after: &str,
        _shard: ShardFilter,
    ) -> Result<BoxStream<'static, Result<Vec<Positioned<u64>>, ConsumeError>>, ConsumeError> {
        let open = self.opens.fetch_add(1, Ordering::SeqCst);
        if open == 1 {
            return Err(ConsumeError::new("connection refused"));
        }
        let start: u64 = if after.is_empty() {
            0
        } else {
            after.parse().unwrap()
        };
        let batches: Vec<Result<Vec<Positioned<u64>>, ConsumeError>> = (start + 1..=self.total)
            .collect::<Vec<_>>()
            .chunks(7)
            .map(|chunk| {
                Ok(chunk
                    .iter()
                    .map(|n| Positioned {
                        cursor: n.to_string(),
                        entry: *n,
                    })
                    .collect())
            })
            .collect();
        let breaks_after = if open < 4 { 2 } else { usize::MAX };
        let mut stream: Vec<_> = batches.into_iter().take(breaks_after).collect();
        if open < 4 {
            stream.push(Err(ConsumeError::new("stream reset")));
        }
        // A live stream does not end when it has caught up.
        Ok(futures_util::stream::iter(stream)
            .chain(futures_util::stream::pending())
            .boxed())
    }
}

/// Sums what it applies, with the cursor in the same "transaction"; every
/// third apply fails before committing, like a crash between read and commit.
#[derive(Default, Clone)]
struct Summing {
    state: Arc<Mutex<(u64, String)>>,
    attempts: Arc<AtomicUsize>,
}

#[async_trait]
impl Projection for Summing {
    type Entry = u64;

    fn cursor_name(&self) -> &'static str {
        "summing"
    }

    async fn saved_cursor(&self, _shard: ShardFilter) -> Result<String, ConsumeError> {
        Ok(self.state.lock().await.1.clone())
    }

    async fn apply(&self, batch: Vec<u64>, cursor: &CursorMove) -> Result<(), ConsumeError> {
        if self.attempts.fetch_add(1, Ordering::SeqCst) % 3 == 2 {
            return Err(ConsumeError::new("crashed before commit"));
        }
        let mut state = self.state.lock().await;
        // The save is a compare-and-set on the cursor the consumer read.
        if state.1 != cursor.expected {
            return Err(ConsumeError::new("the cursor moved"));
        }
        state.0 += batch.iter().sum::<u64>();
        state.1 = cursor.new.clone();
        Ok(())
    }
}

#[tokio::test]
async fn failures_anywhere_neither_lose_nor_double_count() {
    let total = 200;
    let source = FlakySource {
        total,
        opens: AtomicUsize::new(0),
    };
    let projection = Summing::default();
    let shutdown = Shutdown::new();
    let run = tokio::spawn(consumer::run(
        "test",
        source,
        projection.clone(),
        ShardLease::sole(ShardFilter::ALL),
        Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(10),
        },
        shutdown.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (sum, cursor) = projection.state.lock().await.clone();
        if cursor == total.to_string() {
            assert_eq!(
                sum,
                total * (total + 1) / 2,
                "every entry applied exactly once"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the consumer never caught up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap();
    assert!(
        projection.attempts.load(Ordering::SeqCst) > (total as usize).div_ceil(7),
        "failures were retried"
    );
}

#[tokio::test]
async fn read_ahead_stops_when_the_reader_goes_even_while_waiting() {
    let polled = Arc::new(AtomicUsize::new(0));
    let counter = polled.clone();
    // A live source: one item, then it waits forever.
    let source = futures_util::stream::once(async { 1_u32 }).chain(futures_util::stream::poll_fn(
        move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            std::task::Poll::<Option<u32>>::Pending
        },
    ));
    let ahead = clm_eventlog::read_ahead(source, 2);
    let mut ahead = Box::pin(ahead);
    assert_eq!(ahead.next().await, Some(1));
    drop(ahead);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after_drop = polled.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        polled.load(Ordering::SeqCst),
        after_drop,
        "the reading task is gone"
    );
    assert!(
        Arc::strong_count(&polled) == 1,
        "the source was dropped with its task"
    );
}
