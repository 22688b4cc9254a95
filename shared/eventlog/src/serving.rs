//! The server side of every log RPC: the position a request asks for,
//! checked the same way everywhere, and the response stream, read ahead of
//! the network.

use std::pin::Pin;

use clm_platform::StatusBuilder;
use clm_platform::error::Violations;
use clm_proto::common::LogShard;
use futures_util::Stream;
use tonic::Status;

use crate::{Cursor, ShardFilter};

/// The response stream of a log RPC.
pub type LogResponses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Where a log request starts: its `after_cursor` and `shard`, checked. A
/// bad one is INVALID_ARGUMENT naming the field (`after_cursor`,
/// `shard.count`, …).
pub fn log_position(
    after_cursor: &str,
    shard: Option<LogShard>,
) -> Result<(Cursor, ShardFilter), Status> {
    let mut violations = Violations::new();
    let after = violations.check(Cursor::parse("after_cursor", after_cursor));
    let shard = shard.unwrap_or_default();
    let shard = violations.check(ShardFilter::new("shard", shard.index, shard.count));
    violations
        .into_result()
        .map_err(|v| StatusBuilder::invalid_argument(&v))?;
    Ok((after.expect("validated"), shard.expect("validated")))
}

/// The response stream of `batches`, read two batches ahead of the network
/// (see [`crate::read_ahead`]).
pub fn respond<S, T>(batches: S) -> LogResponses<T>
where
    S: Stream<Item = Result<T, Status>> + Send + 'static,
    T: Send + 'static,
{
    Box::pin(crate::read_ahead(batches, 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_position_names_its_fields() {
        let status =
            log_position("not-a-cursor", Some(LogShard { index: 3, count: 2 })).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("after_cursor"),
            "{}",
            status.message()
        );
        assert!(status.message().contains("shard"), "{}", status.message());
        let (after, shard) = log_position("", None).unwrap();
        assert_eq!((after, shard), (Cursor::default(), ShardFilter::ALL));
    }
}
