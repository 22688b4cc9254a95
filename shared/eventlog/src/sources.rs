//! The logs of the clm services as [`LogSource`]s, read over gRPC: the
//! identity service's customer event log and the touchpoint log.

use async_trait::async_trait;
use clm_proto::common::LogShard;
use clm_proto::identity::customer_service_client::CustomerServiceClient;
use clm_proto::identity::{CustomerEvent, StreamCustomerEventsRequest};
use clm_proto::touchpoint::touchpoint_service_client::TouchpointServiceClient;
use clm_proto::touchpoint::{StreamTouchpointLogRequest, TouchpointLogEntry};
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use tonic::transport::Channel;

use crate::ShardFilter;
use crate::consumer::{ConsumeError, LogSource, Positioned};

type Batches<E> = BoxStream<'static, Result<Vec<Positioned<E>>, ConsumeError>>;

/// Turns a gRPC stream of batches into positioned entries.
fn positioned<R, E>(
    what: &'static str,
    stream: tonic::Streaming<R>,
    entries: fn(R) -> Vec<E>,
    cursor: fn(&E) -> &str,
) -> Batches<E>
where
    R: Send + 'static,
    E: Send + 'static,
{
    stream
        .map(move |batch| {
            batch
                .map(|batch| {
                    entries(batch)
                        .into_iter()
                        .map(|entry| Positioned {
                            cursor: cursor(&entry).to_owned(),
                            entry,
                        })
                        .collect()
                })
                .map_err(|status| ConsumeError::new(format!("{what}: {}", status.message())))
        })
        .boxed()
}

fn shard_of(shard: ShardFilter) -> Option<LogShard> {
    Some(LogShard {
        index: shard.index,
        count: shard.count,
    })
}

/// The identity customer event log.
pub struct IdentityEventSource {
    client: CustomerServiceClient<Channel>,
}

impl IdentityEventSource {
    /// A source on a channel to the identity service.
    pub fn new(channel: Channel) -> Self {
        Self {
            client: CustomerServiceClient::new(channel),
        }
    }
}

#[async_trait]
impl LogSource for IdentityEventSource {
    type Entry = CustomerEvent;

    async fn open(
        &self,
        after: &str,
        shard: ShardFilter,
    ) -> Result<Batches<CustomerEvent>, ConsumeError> {
        let request = StreamCustomerEventsRequest {
            after_cursor: after.to_owned(),
            shard: shard_of(shard),
            stop_at_end: false,
        };
        let stream = self
            .client
            .clone()
            .stream_customer_events(request)
            .await
            .map_err(|status| {
                ConsumeError::new(format!(
                    "cannot open the customer event log: {}",
                    status.message()
                ))
            })?
            .into_inner();
        Ok(positioned(
            "customer event log",
            stream,
            |batch| batch.events,
            |event| &event.cursor,
        ))
    }
}

/// The touchpoint log.
pub struct TouchpointLogSource {
    client: TouchpointServiceClient<Channel>,
}

impl TouchpointLogSource {
    /// A source on a channel to the touchpoints service.
    pub fn new(channel: Channel) -> Self {
        Self {
            client: TouchpointServiceClient::new(channel),
        }
    }
}

#[async_trait]
impl LogSource for TouchpointLogSource {
    type Entry = TouchpointLogEntry;

    async fn open(
        &self,
        after: &str,
        shard: ShardFilter,
    ) -> Result<Batches<TouchpointLogEntry>, ConsumeError> {
        let request = StreamTouchpointLogRequest {
            after_cursor: after.to_owned(),
            shard: shard_of(shard),
            stop_at_end: false,
        };
        let stream = self
            .client
            .clone()
            .stream_touchpoint_log(request)
            .await
            .map_err(|status| {
                ConsumeError::new(format!(
                    "cannot open the touchpoint log: {}",
                    status.message()
                ))
            })?
            .into_inner();
        Ok(positioned(
            "touchpoint log",
            stream,
            |batch| batch.entries,
            |entry| &entry.cursor,
        ))
    }
}
