//! The logs of the clm services as [`LogSource`]s, read over gRPC. Every
//! log RPC has the same shape (`after_cursor`, `shard`, `stop_at_end` in;
//! a stream of batches of entries that carry their cursor out), so one
//! source serves them all: a log is a [`ServedLog`] type naming its RPC and
//! messages.

use std::marker::PhantomData;

use async_trait::async_trait;
use clm_platform::service::PeerChannel;
use clm_proto::common::LogShard;
use clm_proto::feedback::{FeedbackLogEntry, StreamFeedbackLogRequest, StreamFeedbackLogResponse};
use clm_proto::identity::{
    CustomerEvent, StreamCustomerEventsRequest, StreamCustomerEventsResponse,
};
use clm_proto::scoring::{StreamTransitionsRequest, StreamTransitionsResponse, TransitionLogEntry};
use clm_proto::touchpoint::{
    StreamTouchpointLogRequest, StreamTouchpointLogResponse, TouchpointLogEntry,
};
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;

use crate::ShardFilter;
use crate::consumer::{ConsumeError, LogSource, Positioned};

/// A log a clm service streams over gRPC.
pub trait ServedLog: Send + Sync + 'static {
    /// The request message of its RPC.
    type Request: prost::Message + Send + Sync + 'static;
    /// One message of the response stream: a batch of entries.
    type Batch: prost::Message + Default + Send + 'static;
    /// One entry.
    type Entry: Send + 'static;
    /// The RPC's path: `/<package>.<Service>/<Method>`.
    const PATH: &'static str;
    /// The log's name in errors.
    const NAME: &'static str;

    /// The request for a live stream of the entries after `after_cursor`
    /// (empty: from the start) on `shard`.
    fn request(after_cursor: String, shard: Option<LogShard>) -> Self::Request;
    /// The entries of a batch.
    fn entries(batch: Self::Batch) -> Vec<Self::Entry>;
    /// The cursor that resumes after `entry`.
    fn cursor(entry: &Self::Entry) -> &str;
}

/// Any [`ServedLog`], read over a channel to the service that serves it.
pub struct GrpcLogSource<L> {
    channel: PeerChannel,
    log: PhantomData<fn() -> L>,
}

impl<L> GrpcLogSource<L> {
    /// A source on a channel to the service serving the log.
    pub fn new(channel: PeerChannel) -> Self {
        Self {
            channel,
            log: PhantomData,
        }
    }
}

type Batches<E> = BoxStream<'static, Result<Vec<Positioned<E>>, ConsumeError>>;

#[async_trait]
impl<L: ServedLog> LogSource for GrpcLogSource<L> {
    type Entry = L::Entry;

    async fn open(
        &self,
        after: &str,
        shard: ShardFilter,
    ) -> Result<Batches<L::Entry>, ConsumeError> {
        let request = L::request(
            after.to_owned(),
            Some(LogShard {
                index: shard.index,
                count: shard.count,
            }),
        );
        let cannot_open = |message: &dyn std::fmt::Display| {
            ConsumeError::new(format!("cannot open the {}: {message}", L::NAME))
        };
        let mut client = tonic::client::Grpc::new(self.channel.clone());
        client.ready().await.map_err(|err| cannot_open(&err))?;
        let stream = client
            .server_streaming(
                tonic::Request::new(request),
                http::uri::PathAndQuery::from_static(L::PATH),
                tonic_prost::ProstCodec::<L::Request, L::Batch>::default(),
            )
            .await
            .map_err(|status| cannot_open(&status.message()))?
            .into_inner();
        Ok(stream
            .map(|batch| {
                batch
                    .map(|batch| {
                        L::entries(batch)
                            .into_iter()
                            .map(|entry| Positioned {
                                cursor: L::cursor(&entry).to_owned(),
                                entry,
                            })
                            .collect()
                    })
                    .map_err(|status| {
                        ConsumeError::new(format!("{}: {}", L::NAME, status.message()))
                    })
            })
            .boxed())
    }
}

/// The identity service's customer event log.
pub struct CustomerEvents;

impl ServedLog for CustomerEvents {
    type Request = StreamCustomerEventsRequest;
    type Batch = StreamCustomerEventsResponse;
    type Entry = CustomerEvent;
    const PATH: &'static str = "/clm.identity.v1.CustomerService/StreamCustomerEvents";
    const NAME: &'static str = "customer event log";

    fn request(after_cursor: String, shard: Option<LogShard>) -> Self::Request {
        StreamCustomerEventsRequest {
            after_cursor,
            shard,
            stop_at_end: false,
        }
    }

    fn entries(batch: Self::Batch) -> Vec<Self::Entry> {
        batch.events
    }

    fn cursor(entry: &Self::Entry) -> &str {
        &entry.cursor
    }
}

/// The touchpoints service's touchpoint log.
pub struct TouchpointLog;

impl ServedLog for TouchpointLog {
    type Request = StreamTouchpointLogRequest;
    type Batch = StreamTouchpointLogResponse;
    type Entry = TouchpointLogEntry;
    const PATH: &'static str = "/clm.touchpoint.v1.TouchpointService/StreamTouchpointLog";
    const NAME: &'static str = "touchpoint log";

    fn request(after_cursor: String, shard: Option<LogShard>) -> Self::Request {
        StreamTouchpointLogRequest {
            after_cursor,
            shard,
            stop_at_end: false,
        }
    }

    fn entries(batch: Self::Batch) -> Vec<Self::Entry> {
        batch.entries
    }

    fn cursor(entry: &Self::Entry) -> &str {
        &entry.cursor
    }
}

/// The scoring service's transition log.
pub struct TransitionLog;

impl ServedLog for TransitionLog {
    type Request = StreamTransitionsRequest;
    type Batch = StreamTransitionsResponse;
    type Entry = TransitionLogEntry;
    const PATH: &'static str = "/clm.scoring.v1.LifecycleService/StreamTransitions";
    const NAME: &'static str = "transition log";

    fn request(after_cursor: String, shard: Option<LogShard>) -> Self::Request {
        StreamTransitionsRequest {
            after_cursor,
            shard,
            stop_at_end: false,
        }
    }

    fn entries(batch: Self::Batch) -> Vec<Self::Entry> {
        batch.entries
    }

    fn cursor(entry: &Self::Entry) -> &str {
        &entry.cursor
    }
}

/// The feedback service's feedback log.
pub struct FeedbackLog;

impl ServedLog for FeedbackLog {
    type Request = StreamFeedbackLogRequest;
    type Batch = StreamFeedbackLogResponse;
    type Entry = FeedbackLogEntry;
    const PATH: &'static str = "/clm.feedback.v1.SurveyService/StreamFeedbackLog";
    const NAME: &'static str = "feedback log";

    fn request(after_cursor: String, shard: Option<LogShard>) -> Self::Request {
        StreamFeedbackLogRequest {
            after_cursor,
            shard,
            stop_at_end: false,
        }
    }

    fn entries(batch: Self::Batch) -> Vec<Self::Entry> {
        batch.entries
    }

    fn cursor(entry: &Self::Entry) -> &str {
        &entry.cursor
    }
}
