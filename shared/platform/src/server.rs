//! The gRPC server every clm process runs: the services it mounts plus
//! grpc.health.v1 (per service name) and server reflection (v1 and v1alpha,
//! so every grpcurl version works), with request limits and a graceful
//! shutdown: on SIGTERM or Ctrl-C health goes NOT_SERVING, log-tail streams
//! end, in-flight calls drain, and the process gives up waiting after the
//! configured grace period.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;

use crate::config::PlatformConfig;

/// Tells long-lived work (streams, consumers, sweeps) that the process is
/// stopping. Cloning is cheap; every clone sees the same signal.
#[derive(Clone, Debug)]
pub struct Shutdown {
    sender: std::sync::Arc<watch::Sender<bool>>,
    receiver: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal not triggered yet.
    pub fn new() -> Self {
        let (sender, receiver) = watch::channel(false);
        Self {
            sender: std::sync::Arc::new(sender),
            receiver,
        }
    }

    /// Starts the shutdown.
    pub fn trigger(&self) {
        self.sender.send_replace(true);
    }

    /// True once shutdown has started.
    pub fn is_triggered(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Completes when shutdown starts.
    pub async fn triggered(&self) {
        let mut receiver = self.receiver.clone();
        let _ = receiver.wait_for(|stopping| *stopping).await;
    }
}

/// Completes on SIGTERM (Kubernetes) or Ctrl-C (a terminal).
pub async fn termination_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %err, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("ctrl-c received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// The services one process serves, collected before it starts.
pub struct Mounted {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
}

impl Default for Mounted {
    fn default() -> Self {
        Self::new()
    }
}

impl Mounted {
    /// Nothing mounted yet.
    pub fn new() -> Self {
        Self {
            routes: RoutesBuilder::default(),
            names: Vec::new(),
        }
    }

    /// Mounts a generated gRPC server.
    pub fn add<S>(&mut self, service: S) -> &mut Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// The fully qualified names of the mounted services.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }
}

/// A request above `CLM_MAX_MESSAGE_BYTES` is refused by the decoder before
/// any handler runs, as OUT_OF_RANGE. Callers sent a bad request, so it is
/// reported like every other bad request: INVALID_ARGUMENT with a BadRequest
/// detail naming the request and the limit. The status may travel in the
/// headers (trailers-only response) or in the trailers; both are rewritten.
fn oversized_request_is_invalid(
    response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let (mut parts, body) = response.into_parts();
    if let Some(rewritten) = rewrite_oversized(&parts.headers) {
        parts.headers.extend(rewritten);
        return http::Response::from_parts(parts, body);
    }
    http::Response::from_parts(
        parts,
        tonic::body::Body::new(OversizedTrailers { inner: body }),
    )
}

/// The status headers that replace an oversized-message status, if `headers`
/// carry one.
fn rewrite_oversized(headers: &http::HeaderMap) -> Option<http::HeaderMap> {
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|status| status == "11");
    if !out_of_range {
        return None;
    }
    let message = percent_decode(
        headers
            .get("grpc-message")
            .map(http::HeaderValue::as_bytes)
            .unwrap_or_default(),
    );
    if !message.contains("message length too large") {
        return None;
    }
    let numbers: Vec<&str> = message
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .collect();
    let description = match numbers.as_slice() {
        [found, limit, ..] => {
            format!(
                "the message is {found} bytes, above the limit of {limit} bytes (CLM_MAX_MESSAGE_BYTES)"
            )
        }
        _ => "the message is above the size limit (CLM_MAX_MESSAGE_BYTES)".to_owned(),
    };
    let status =
        crate::error::StatusBuilder::invalid_argument(&[crate::error::FieldViolation::new(
            "request",
            description,
        )]);
    let mut rewritten = http::HeaderMap::new();
    status.add_header(&mut rewritten).ok()?;
    Some(rewritten)
}

/// Decodes the percent-encoding of a `grpc-message` header.
fn percent_decode(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            raw[i],
            raw.get(i + 1).copied().and_then(hex),
            raw.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response body whose trailers get [`rewrite_oversized`].
struct OversizedTrailers {
    inner: tonic::body::Body,
}

impl http_body::Body for OversizedTrailers {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        polled.map(|frame| {
            frame.map(|frame| {
                frame.map(|frame| match frame.into_trailers() {
                    Ok(mut trailers) => {
                        if let Some(rewritten) = rewrite_oversized(&trailers) {
                            trailers.extend(rewritten);
                        }
                        http_body::Frame::trailers(trailers)
                    }
                    Err(frame) => frame,
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Binds the listening socket (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {addr} (CLM_LISTEN_ADDR): {err}"))
}

/// Serves `mounted` on `listener` until `shutdown` is triggered, then drains
/// for at most the configured grace period.
pub async fn serve(
    config: &PlatformConfig,
    listener: TcpListener,
    mounted: Mounted,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let Mounted { mut routes, names } = mounted;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    for name in &names {
        health_reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }

    let mut reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(clm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    let mut reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(clm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    // List only what this process serves, not every contract it knows.
    for name in names.iter().copied().chain(["grpc.health.v1.Health"]) {
        reflection_v1 = reflection_v1.with_service_name(name);
        reflection_v1alpha = reflection_v1alpha.with_service_name(name);
    }
    reflection_v1 = reflection_v1
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection");
    reflection_v1alpha = reflection_v1alpha
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection");
    routes
        .add_service(health_service)
        .add_service(reflection_v1.build_v1()?)
        .add_service(reflection_v1alpha.build_v1alpha()?);

    let local_addr = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let limits = config.limits;
    let router = tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            oversized_request_is_invalid,
        ))
        .trace_fn(crate::telemetry::request_span)
        .concurrency_limit_per_connection(limits.max_concurrent_requests)
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_routes(routes.routes());

    let stopping = {
        let shutdown = shutdown.clone();
        let reporter = health_reporter.clone();
        let names = names.clone();
        async move {
            shutdown.triggered().await;
            // Readiness first, so load balancers stop sending new calls.
            reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
            for name in &names {
                reporter
                    .set_service_status(*name, ServingStatus::NotServing)
                    .await;
            }
            tracing::info!("health is NOT_SERVING, draining in-flight calls");
        }
    };
    tracing::info!(address = %local_addr, services = ?names, "serving gRPC");
    let server = router.serve_with_incoming_shutdown(incoming, stopping);
    let grace = config.shutdown_grace;
    let deadline = async {
        shutdown.triggered().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => {
            result?;
            tracing::info!("all calls drained, server stopped");
        }
        () = deadline => {
            tracing::warn!(grace_seconds = grace.as_secs(), "calls still running after the shutdown grace period, stopping anyway");
        }
    }
    Ok(())
}
