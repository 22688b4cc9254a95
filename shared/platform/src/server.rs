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
    /// Set when the stop is for a person at a terminal (Ctrl-C): the server
    /// closes its listener at once instead of after the shutdown delay.
    immediate: std::sync::Arc<std::sync::atomic::AtomicBool>,
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
            immediate: Default::default(),
        }
    }

    /// Starts the shutdown.
    pub fn trigger(&self) {
        self.sender.send_replace(true);
    }

    /// Starts the shutdown without the delay that lets load balancers see
    /// NOT_SERVING (for Ctrl-C at a terminal, where nobody balances load).
    pub fn trigger_immediately(&self) {
        self.immediate
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.trigger();
    }

    fn is_immediate(&self) -> bool {
        self.immediate.load(std::sync::atomic::Ordering::SeqCst)
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

/// How the process was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// Ctrl-C at a terminal.
    Interrupt,
    /// SIGTERM, from an orchestrator such as Kubernetes.
    Terminate,
}

/// Completes on SIGTERM (Kubernetes) or Ctrl-C (a terminal), saying which.
pub async fn termination_signal() -> Termination {
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
        () = ctrl_c => {
            tracing::info!("ctrl-c received, shutting down");
            Termination::Interrupt
        }
        () = terminate => {
            tracing::info!("SIGTERM received, shutting down");
            Termination::Terminate
        }
    }
}

/// Triggers `shutdown` on the first termination signal: at once for
/// Ctrl-C, after the shutdown delay for SIGTERM.
pub fn stop_on_signal(shutdown: Shutdown) {
    tokio::spawn(async move {
        match termination_signal().await {
            Termination::Interrupt => shutdown.trigger_immediately(),
            Termination::Terminate => shutdown.trigger(),
        }
    });
}

/// The accepted connections of `listener`, with Nagle's algorithm off.
/// tonic ignores its own `tcp_nodelay` setting for a listener it is given,
/// and with Nagle on, a response's trailers wait for the ACK of its data
/// frame: an idle client delays that ACK by 40 ms, so every call with a
/// response of more than a few hundred bytes took 40 ms.
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}

/// A generated gRPC server with the message size limits every clm server
/// has: requests up to `CLM_MAX_MESSAGE_BYTES` (larger ones get
/// RESOURCE_EXHAUSTED), responses up to that or 16 MiB, whichever is more.
/// Every service mounts its servers through it:
/// `mounted.add(clm_platform::limited!(Server::new(handler), platform.limits))`.
#[macro_export]
macro_rules! limited {
    ($server:expr, $limits:expr) => {{
        let max: usize = $limits.max_message_bytes;
        $server
            .max_decoding_message_size(max)
            .max_encoding_message_size(max.max(16 * 1024 * 1024))
    }};
}

/// The services one process serves, collected before it starts, each with
/// the clm service it belongs to.
pub struct Mounted {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    owners: Vec<&'static str>,
    owner: &'static str,
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
            owners: Vec::new(),
            owner: "",
        }
    }

    /// Services mounted from now on belong to the clm service `service`.
    pub fn for_service(&mut self, service: &'static str) -> &mut Self {
        self.owner = service;
        self
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
        self.owners.push(self.owner);
        self.routes.add_service(service);
        self
    }

    /// The fully qualified names of the mounted services.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }
}

/// Statuses that tonic produces itself, before or instead of a handler, and
/// that say too little or the wrong thing, rewritten in one place:
/// - a request above `CLM_MAX_MESSAGE_BYTES` is refused by the decoder as
///   OUT_OF_RANGE; gRPC's own servers answer RESOURCE_EXHAUSTED, and so does
///   clm, with reason `MESSAGE_TOO_LARGE` and the limit;
/// - a body that is not the request message (wrong wire type, a string that
///   is not UTF-8, a truncated message) is refused as INTERNAL; it is the
///   caller's fault, so INVALID_ARGUMENT naming the request, and logged;
/// - a call to a service or method this process does not serve answers
///   UNIMPLEMENTED with no message; the message names what is missing.
///
/// The status may travel in the headers (trailers-only response) or in the
/// trailers; both are rewritten.
#[derive(Clone)]
struct StatusRewrite {
    /// The path of the call, `/package.Service/Method`.
    path: std::sync::Arc<str>,
    /// The services this process serves.
    services: std::sync::Arc<[&'static str]>,
}

/// The tower layer that applies [`StatusRewrite`] to every call, and
/// answers a call stuck on a database that is down before its deadline.
#[derive(Clone)]
struct StatusRewriteLayer {
    services: std::sync::Arc<[&'static str]>,
    database_wait: Duration,
}

impl<S> tower::Layer<S> for StatusRewriteLayer {
    type Service = StatusRewriteService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StatusRewriteService {
            inner,
            services: self.services.clone(),
            database_wait: self.database_wait,
        }
    }
}

#[derive(Clone)]
struct StatusRewriteService<S> {
    inner: S,
    services: std::sync::Arc<[&'static str]>,
    database_wait: Duration,
}

/// Calls answered UNAVAILABLE because a database was down.
static DATABASE_UNAVAILABLE_ANSWERS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

tokio::task_local! {
    /// When the caller of the call being served gives up (its
    /// `grpc-timeout`), for the calls this one makes in turn.
    static CALLER_DEADLINE: tokio::time::Instant;
}

/// The deadline of the call this code serves, when its caller set one; the
/// calls it makes to other services carry what is left of it
/// ([`crate::service::PeerChannel`]).
pub fn caller_deadline() -> Option<tokio::time::Instant> {
    CALLER_DEADLINE.try_with(|deadline| *deadline).ok()
}

/// Runs `future` (the serving of one call) with `deadline` as the caller's.
pub fn with_caller_deadline<F: std::future::Future>(
    deadline: tokio::time::Instant,
    future: F,
) -> impl std::future::Future<Output = F::Output> {
    CALLER_DEADLINE.scope(deadline, future)
}

/// The caller's deadline (`grpc-timeout`: up to 8 digits and a unit).
fn caller_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    parse_grpc_timeout(headers.get("grpc-timeout")?.to_str().ok()?)
}

/// A `grpc-timeout` value: up to 8 digits and a unit.
pub(crate) fn parse_grpc_timeout(raw: &str) -> Option<Duration> {
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.saturating_mul(3600)),
        "M" => Duration::from_secs(value.saturating_mul(60)),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// How long a call may run before it is checked against the databases: a
/// tenth of the caller's deadline (at least 5 ms) is kept to send the
/// answer in, and no call waits longer than `database_wait`.
fn call_budget(headers: &http::HeaderMap, database_wait: Duration) -> Duration {
    match caller_timeout(headers) {
        Some(timeout) => timeout
            .saturating_sub((timeout / 10).max(Duration::from_millis(5)))
            .min(database_wait),
        None => database_wait,
    }
}

/// `response`, unless it is not ready when `budget` runs out while a
/// database of this process is down: then UNAVAILABLE, at once, rather than
/// after the pool's wait or the caller's deadline. A call merely slow while
/// every database answers runs on.
async fn within_budget<F, E>(
    response: F,
    budget: Duration,
    path: &str,
) -> Result<http::Response<tonic::body::Body>, E>
where
    F: std::future::Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    tokio::pin!(response);
    tokio::select! {
        answered = &mut response => answered,
        () = tokio::time::sleep(budget) => match crate::db::unreachable_database() {
            Some(database) => {
                let total = DATABASE_UNAVAILABLE_ANSWERS
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                tracing::warn!(
                    rpc.method = %path,
                    %database,
                    unavailable_answers_total = total,
                    "database unreachable, call answered UNAVAILABLE"
                );
                Ok(crate::error::StatusBuilder::unavailable("the database").into_http())
            }
            None => response.await,
        },
    }
}

impl<S, B> tower::Service<http::Request<B>> for StatusRewriteService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let rewrite = StatusRewrite {
            path: request.uri().path().into(),
            services: self.services.clone(),
        };
        // A timer per call only where a database can go away: SQLite,
        // in this process, cannot.
        let budget = (!self.database_wait.is_zero() && crate::db::watches_databases())
            .then(|| call_budget(request.headers(), self.database_wait));
        let deadline =
            caller_timeout(request.headers()).map(|timeout| tokio::time::Instant::now() + timeout);
        let response = self.inner.call(request);
        let response = async move {
            match deadline {
                Some(deadline) => with_caller_deadline(deadline, response).await,
                None => response.await,
            }
        };
        Box::pin(async move {
            let response = match budget {
                Some(budget) => within_budget(response, budget, &rewrite.path).await?,
                None => response.await?,
            };
            Ok(rewrite.apply(response))
        })
    }
}

impl StatusRewrite {
    fn apply(
        self,
        response: http::Response<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        let (mut parts, body) = response.into_parts();
        if let Some(rewritten) = self.rewrite(&parts.headers) {
            parts.headers.extend(rewritten);
            return http::Response::from_parts(parts, body);
        }
        http::Response::from_parts(
            parts,
            tonic::body::Body::new(RewrittenTrailers {
                inner: body,
                rewrite: self,
            }),
        )
    }

    /// The status headers that replace the status in `headers`, if it is one
    /// of those rewritten.
    fn rewrite(&self, headers: &http::HeaderMap) -> Option<http::HeaderMap> {
        let code = headers.get("grpc-status")?.to_str().ok()?;
        let message = percent_decode(
            headers
                .get("grpc-message")
                .map(http::HeaderValue::as_bytes)
                .unwrap_or_default(),
        );
        let status = match code {
            "11" if message.contains("message length too large") => {
                Self::message_too_large(&message)
            }
            "13" if message.starts_with("failed to decode Protobuf message") => {
                tracing::info!(
                    rpc.method = %self.path,
                    error = %message,
                    "request refused: the body is not a valid protobuf message"
                );
                crate::error::StatusBuilder::invalid_argument(&[
                    crate::error::FieldViolation::with_reason(
                        "request",
                        "MALFORMED_MESSAGE",
                        format!(
                            "is not a valid protobuf encoding of the request message: {}",
                            message
                                .trim_start_matches("failed to decode Protobuf message")
                                .trim_start_matches(": ")
                        ),
                    ),
                ])
            }
            "12" if message.is_empty() => self.unimplemented(),
            _ => return None,
        };
        let mut rewritten = http::HeaderMap::new();
        status.add_header(&mut rewritten).ok()?;
        Some(rewritten)
    }

    fn message_too_large(message: &str) -> tonic::Status {
        let numbers: Vec<&str> = message
            .split(|c: char| !c.is_ascii_digit())
            .filter(|part| !part.is_empty())
            .collect();
        let (text, limit) = match numbers.as_slice() {
            [found, limit, ..] => (
                format!(
                    "the request is {found} bytes, above the limit of {limit} bytes (CLM_MAX_MESSAGE_BYTES)"
                ),
                *limit,
            ),
            _ => (
                "the request is above the size limit (CLM_MAX_MESSAGE_BYTES)".to_owned(),
                "",
            ),
        };
        crate::error::StatusBuilder::with_reason(
            tonic::Code::ResourceExhausted,
            text,
            "MESSAGE_TOO_LARGE",
            &[("limit_bytes", limit)],
        )
    }

    fn unimplemented(&self) -> tonic::Status {
        let mut parts = self.path.trim_start_matches('/').splitn(2, '/');
        let service = parts.next().unwrap_or_default();
        let method = parts.next().unwrap_or_default();
        let known = self.services.contains(&service);
        let (message, reason) = if known {
            (
                format!("{service} has no method {method:?}"),
                "UNKNOWN_METHOD",
            )
        } else {
            (
                format!(
                    "this server does not serve {service:?}; it serves {}",
                    self.services.join(", ")
                ),
                "UNKNOWN_SERVICE",
            )
        };
        crate::error::StatusBuilder::with_reason(
            tonic::Code::Unimplemented,
            message,
            reason,
            &[("service", service), ("method", method)],
        )
    }
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

/// A response body whose trailers get [`StatusRewrite::rewrite`].
struct RewrittenTrailers {
    inner: tonic::body::Body,
    rewrite: StatusRewrite,
}

impl http_body::Body for RewrittenTrailers {
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
                        if let Some(rewritten) = self.rewrite.rewrite(&trailers) {
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

/// Sets the process's health and that of the mounted services to `status`.
async fn set_health(
    reporter: &tonic_health::server::HealthReporter,
    names: &[&'static str],
    status: ServingStatus,
) {
    reporter.set_service_status("", status).await;
    for name in names {
        reporter.set_service_status(*name, status).await;
    }
}

/// Serves `mounted` on `listener` and watches `tasks` until `shutdown` is
/// triggered, then stops the tasks in order and drains calls, for at most
/// the shutdown delay plus the configured grace period.
///
/// A task that dies while the process serves is logged with its reason, and
/// turns the health of its service and of the process (the liveness probe's
/// empty service name) NOT_SERVING: the pod is taken out of rotation and
/// restarted, as a process missing part of its work should be.
pub async fn serve(
    config: &PlatformConfig,
    listener: TcpListener,
    mounted: Mounted,
    tasks: crate::service::Tasks,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let Mounted {
        mut routes,
        names,
        owners,
        ..
    } = mounted;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&health_reporter, &names, ServingStatus::Serving).await;

    // Both reflection services describe every listed service, both
    // reflection versions included (each builder adds only its own).
    let descriptors = [
        clm_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut reflection_v1 = tonic_reflection::server::Builder::configure();
    let mut reflection_v1alpha = tonic_reflection::server::Builder::configure();
    for descriptor in descriptors {
        reflection_v1 = reflection_v1.register_encoded_file_descriptor_set(descriptor);
        reflection_v1alpha = reflection_v1alpha.register_encoded_file_descriptor_set(descriptor);
    }
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
    let incoming = incoming(listener);
    let limits = config.limits;
    let served: std::sync::Arc<[&'static str]> = names
        .iter()
        .copied()
        .chain([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ])
        .collect();
    let router = tonic::transport::Server::builder()
        .layer(StatusRewriteLayer {
            services: served,
            database_wait: limits.max_database_wait,
        })
        .trace_fn(crate::telemetry::request_span)
        .concurrency_limit_per_connection(limits.max_concurrent_requests)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_routes(routes.routes());

    let delay = config.shutdown_delay;
    let stopping = {
        let shutdown = shutdown.clone();
        let reporter = health_reporter.clone();
        let names = names.clone();
        async move {
            shutdown.triggered().await;
            // Readiness first, so load balancers stop sending new calls.
            set_health(&reporter, &names, ServingStatus::NotServing).await;
            // Then keep serving for as long as a prober takes to notice:
            // a listener closed at once turns the calls still routed here
            // into connection errors.
            let delay = if shutdown.is_immediate() {
                Duration::ZERO
            } else {
                delay
            };
            tracing::info!(
                delay_seconds = delay.as_secs_f64(),
                "health is NOT_SERVING, serving on until load balancers notice"
            );
            tokio::time::sleep(delay).await;
            tracing::info!("listener closed, draining in-flight calls");
        }
    };
    tracing::info!(address = %local_addr, services = ?names, "serving gRPC");
    let server = router.serve_with_incoming_shutdown(incoming, stopping);
    let grace = config.shutdown_grace;
    let deadline = async {
        shutdown.triggered().await;
        if !shutdown.is_immediate() {
            tokio::time::sleep(delay).await;
        }
        tokio::time::sleep(grace).await;
    };
    let serving = async {
        tokio::select! {
            result = server => {
                result?;
                tracing::info!("all calls drained, server stopped");
            }
            () = deadline => {
                tracing::warn!(grace_seconds = grace.as_secs(), "calls still running after the shutdown grace period, stopping anyway");
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    let supervising = async {
        let mut tasks = tasks;
        loop {
            tokio::select! {
                (service, task, why) = tasks.next_death() => {
                    tracing::error!(service, task = %task, reason = %why, "a background task died: health is NOT_SERVING");
                    let of_service: Vec<&'static str> = names
                        .iter()
                        .zip(&owners)
                        .filter(|(_, owner)| **owner == service)
                        .map(|(name, _)| *name)
                        .collect();
                    set_health(&health_reporter, &of_service, ServingStatus::NotServing).await;
                }
                () = shutdown.triggered() => break,
            }
        }
        let wait = if shutdown.is_immediate() {
            grace
        } else {
            delay + grace
        };
        let late = tasks
            .stop_in_order(tokio::time::Instant::now() + wait)
            .await;
        if !late.is_empty() {
            tracing::warn!(tasks = ?late, "background tasks still running after the shutdown grace period, stopped");
        }
    };
    let (served, ()) = tokio::join!(serving, supervising);
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt as _;

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        let server_side = accepted.next().await.unwrap().unwrap();
        assert!(server_side.nodelay().unwrap());
    }

    /// A gRPC service that serves nothing: it stands for a service whose
    /// background task dies, and answers every call FAILED_PRECONDITION
    /// saying how long was left of the caller's deadline as it served it.
    #[derive(Clone)]
    struct Unserved;

    impl tonic::server::NamedService for Unserved {
        const NAME: &'static str = "clm.test.v1.Unserved";
    }

    impl tower::Service<http::Request<tonic::body::Body>> for Unserved {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
        >;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
            Box::pin(async {
                let left = caller_deadline().map(|deadline| {
                    deadline
                        .saturating_duration_since(tokio::time::Instant::now())
                        .as_millis()
                });
                Ok(tonic::Status::failed_precondition(format!("left {left:?}")).into_http())
            })
        }
    }

    /// Serves `mounted` and `tasks` on a free port with no shutdown delay:
    /// a channel to it, its shutdown, and the serving task.
    async fn serve_for_test(
        mounted: Mounted,
        tasks: crate::service::Tasks,
    ) -> (
        tonic::transport::Channel,
        Shutdown,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        let config = PlatformConfig::from_env(&crate::Env::from_pairs([(
            "CLM_SHUTDOWN_DELAY_SECONDS",
            "0",
        )]))
        .unwrap();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let server = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { serve(&config, listener, mounted, tasks, shutdown).await }
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy();
        (channel, shutdown, server)
    }

    async fn health_of(
        client: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
        service: &str,
    ) -> i32 {
        client
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map(|response| response.into_inner().status)
            .unwrap_or(-1)
    }

    #[tokio::test]
    async fn a_call_is_served_knowing_its_callers_deadline() {
        let mut mounted = Mounted::new();
        mounted.add(Unserved);
        let (channel, shutdown, server) =
            serve_for_test(mounted, crate::service::Tasks::new()).await;
        let call = |timeout: Option<Duration>| {
            let mut client = tonic::client::Grpc::new(channel.clone());
            async move {
                let mut request =
                    tonic::Request::new(tonic_health::pb::HealthCheckRequest::default());
                if let Some(timeout) = timeout {
                    request.set_timeout(timeout);
                }
                client.ready().await.unwrap();
                client
                    .unary::<_, tonic_health::pb::HealthCheckResponse, _>(
                        request,
                        http::uri::PathAndQuery::from_static("/clm.test.v1.Unserved/Any"),
                        tonic_prost::ProstCodec::default(),
                    )
                    .await
                    .unwrap_err()
            }
        };
        let mut answer = call(None).await;
        for _ in 0..50 {
            if answer.code() == tonic::Code::FailedPrecondition {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            answer = call(None).await;
        }
        assert_eq!(answer.message(), "left None");
        let answer = call(Some(Duration::from_secs(2))).await;
        let left: u128 = answer
            .message()
            .strip_prefix("left Some(")
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(|ms| ms.parse().ok())
            .unwrap_or_else(|| panic!("{answer:?}"));
        assert!((1000..=2000).contains(&left), "{left} ms left of 2 s");
        shutdown.trigger_immediately();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_dead_background_task_turns_its_service_and_the_process_not_serving() {
        let mut mounted = Mounted::new();
        mounted.for_service("broken").add(Unserved);
        let mut tasks = crate::service::Tasks::new();
        let (fail, failed) = tokio::sync::oneshot::channel::<()>();
        tasks
            .for_service("broken")
            .spawn("broken.consumer", |_| async move {
                let _ = failed.await;
                anyhow::bail!("its log is gone")
            });
        let (channel, shutdown, server) = serve_for_test(mounted, tasks).await;
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let serving = ServingStatus::Serving as i32;
        let not_serving = ServingStatus::NotServing as i32;
        let name = <Unserved as tonic::server::NamedService>::NAME;
        for _ in 0..100 {
            if health_of(&mut client, "").await == serving {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(health_of(&mut client, name).await, serving);
        fail.send(()).unwrap();
        let mut status = serving;
        for _ in 0..100 {
            status = health_of(&mut client, "").await;
            if status == not_serving {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(status, not_serving, "the process's health");
        assert_eq!(health_of(&mut client, name).await, not_serving);
        shutdown.trigger_immediately();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn the_callers_deadline_bounds_the_wait() {
        let headers = |timeout: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-timeout", timeout.parse().unwrap());
            headers
        };
        let wait = Duration::from_secs(5);
        assert_eq!(
            call_budget(&headers("1S"), wait),
            Duration::from_millis(900)
        );
        assert_eq!(
            call_budget(&headers("20m"), wait),
            Duration::from_millis(15)
        );
        assert_eq!(call_budget(&headers("2M"), wait), wait);
        assert_eq!(call_budget(&http::HeaderMap::new(), wait), wait);
        assert_eq!(call_budget(&headers("bogus"), wait), wait);
    }

    #[test]
    fn unknown_calls_name_the_service_or_the_method() {
        let rewrite = StatusRewrite {
            path: "/clm.feedback.v1.SurveyService/GetSurvey".into(),
            services: vec!["clm.identity.v1.CustomerService"].into(),
        };
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", "12".parse().unwrap());
        let status = tonic::Status::from_header_map(&rewrite.rewrite(&headers).unwrap()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert!(status.message().contains("clm.feedback.v1.SurveyService"));
    }
}
