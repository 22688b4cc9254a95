//! What every service of the binary answers alike, whatever the RPC: bodies
//! that are not the request message, calls to services or methods it does
//! not serve, and reflection of the reflection services themselves.

#![allow(missing_docs)]

use bytes::{Buf as _, BufMut as _};
use clm_tests::{ClmServer, details};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// Sends and receives raw bytes, so a test can put anything on the wire.
#[derive(Default, Clone)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Self::Error> {
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

async fn raw_call(channel: &Channel, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .expect_err("the call fails")
}

#[tokio::test]
async fn a_body_that_is_not_the_request_message_is_the_callers_fault() {
    let server = ClmServer::start(&["serve"], &[]).await.expect("server");
    let channel = server.channel().await;
    let cases: [(&str, Vec<u8>); 3] = [
        // customer_id (field 1, a string) sent as a varint.
        ("wrong wire type", vec![0x08, 0x01]),
        // customer_id with bytes that are not UTF-8.
        ("invalid UTF-8", vec![0x0a, 0x02, 0xff, 0xfe]),
        // customer_id announced as 16 bytes, with 3.
        ("truncated", vec![0x0a, 0x10, b'a', b'b', b'c']),
    ];
    for (case, body) in cases {
        let status = raw_call(
            &channel,
            "/clm.identity.v1.CustomerService/GetCustomer",
            body,
        )
        .await;
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
        let (violations, _) = details(&status);
        assert_eq!(violations.len(), 1, "{case}: {status:?}");
        assert_eq!(violations[0].0, "request", "{case}");
        assert!(
            violations[0].1.contains("not a valid protobuf encoding"),
            "{case}: {violations:?}"
        );
    }
    assert!(
        server
            .log()
            .contains("request refused: the body is not a valid protobuf message"),
        "the refusal is logged: {}",
        server.log()
    );
}

#[tokio::test]
async fn calls_to_what_is_not_served_say_what_is_missing() {
    let server = ClmServer::start(&["serve", "identity"], &[])
        .await
        .expect("server");
    let channel = server.channel().await;

    let status = raw_call(
        &channel,
        "/clm.scoring.v1.LifecycleService/GetLifecycle",
        Vec::new(),
    )
    .await;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(
        status
            .message()
            .contains("does not serve \"clm.scoring.v1.LifecycleService\""),
        "{status:?}"
    );
    assert!(
        status.message().contains("clm.identity.v1.CustomerService"),
        "it names what it serves: {status:?}"
    );
    assert_eq!(details(&status).1.as_deref(), Some("UNKNOWN_SERVICE"));

    let status = raw_call(
        &channel,
        "/clm.identity.v1.CustomerService/NoSuchMethod",
        Vec::new(),
    )
    .await;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("NoSuchMethod"), "{status:?}");
    assert_eq!(details(&status).1.as_deref(), Some("UNKNOWN_METHOD"));
}
