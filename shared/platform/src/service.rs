//! A service of the binary as one value: what it is called, what it serves
//! and calls, how it reads its settings, migrates, starts and stops. `clm
//! serve`, `clm migrate` and `clm services` loop over the binary's list of
//! [`Service`]s; nothing about a single service is written in the binary.
//!
//! Starting a service happens in two steps, so that every setting of every
//! service is checked before anything is opened: [`Service::configure`]
//! reads the environment into a [`Configured`] service, which then
//! [`migrates`](Configured::migrate) or [`starts`](Configured::start).
//! Starting mounts gRPC services and hands long-lived work (log consumers,
//! sweeps, pushers) to [`Tasks`], which own it: a task that ends before the
//! process stops turns health NOT_SERVING and says why, and on shutdown the
//! tasks are stopped one after the other, in the order they were started.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::config::{ConfigError, Env, PlatformConfig};
use crate::server::{Mounted, Shutdown};

/// One RPC that shows a running service works, for deploy smoke tests and
/// `clm services`: the call as proto JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmokeCall {
    /// The fully qualified gRPC service, e.g. `clm.identity.v1.CustomerService`.
    pub service: &'static str,
    /// The method, e.g. `ListCustomers`.
    pub method: &'static str,
    /// The request as proto JSON.
    pub request: &'static str,
}

/// What the binary, the deploy manifests and `clm services` know of a
/// service without starting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Its name in `clm serve <name>`, `clm migrate <name>`, its
    /// `CLM_<NAME>_*` settings (`CLM_<NAME>_URL` is where callers reach it)
    /// and its entry in the Helm chart.
    pub name: &'static str,
    /// What it does, in a line.
    pub about: &'static str,
    /// The gRPC services it serves, fully qualified; health probes check
    /// the first.
    pub grpc_services: &'static [&'static str],
    /// The services it calls, by name.
    pub calls: &'static [&'static str],
    /// A call that shows it works, on an empty database.
    pub smoke_call: SmokeCall,
}

/// A service of the binary.
pub trait Service: Send + Sync + 'static {
    /// What it is.
    fn info(&self) -> &'static ServiceInfo;
    /// Reads and checks its settings; opens nothing.
    fn configure(
        &self,
        platform: &PlatformConfig,
        env: &Env,
    ) -> Result<Box<dyn Configured>, ConfigError>;

    /// Its name ([`ServiceInfo::name`]).
    fn name(&self) -> &'static str {
        self.info().name
    }
    /// What it does ([`ServiceInfo::about`]).
    fn about(&self) -> &'static str {
        self.info().about
    }
    /// Its gRPC services ([`ServiceInfo::grpc_services`]).
    fn grpc_services(&self) -> &'static [&'static str] {
        self.info().grpc_services
    }
    /// The services it calls ([`ServiceInfo::calls`]).
    fn calls(&self) -> &'static [&'static str] {
        self.info().calls
    }
    /// Its smoke call ([`ServiceInfo::smoke_call`]).
    fn smoke_call(&self) -> SmokeCall {
        self.info().smoke_call
    }
}

/// A service with its settings read, ready to migrate or start.
#[async_trait]
pub trait Configured: Send + Sync {
    /// Applies its database migrations.
    async fn migrate(&self) -> anyhow::Result<()>;
    /// Connects (migrating when the platform says so), mounts its gRPC
    /// services and hands its long-lived work to the context's tasks.
    async fn start(self: Box<Self>, context: &mut StartContext<'_>) -> anyhow::Result<()>;
}

/// What a starting service gets from the process.
pub struct StartContext<'a> {
    /// The settings every service shares.
    pub platform: &'a PlatformConfig,
    /// Where the services it calls are.
    pub peers: &'a Peers,
    /// Where it mounts its gRPC services.
    pub mounted: &'a mut Mounted,
    /// Where it hands its long-lived work.
    pub tasks: &'a mut Tasks,
    /// The process's shutdown, for request handlers that stream.
    pub shutdown: Shutdown,
}

/// Where one called service is.
#[derive(Debug, Clone)]
enum Peer {
    /// At `CLM_<NAME>_URL`.
    Remote(String),
    /// In this process.
    Local,
}

/// The services a process calls and where they are: at `CLM_<NAME>_URL`
/// when that is set, else in this process when it serves them.
#[derive(Debug, Clone, Default)]
pub struct Peers {
    peers: BTreeMap<&'static str, Peer>,
    own: Option<String>,
}

/// The setting holding where callers reach `service`.
pub fn url_variable(service: &str) -> String {
    format!("CLM_{}_URL", service.to_ascii_uppercase())
}

impl Peers {
    /// The services that `serving` call, each at its `CLM_<NAME>_URL`, or
    /// here when this process serves it too. A callee that is neither is a
    /// configuration error naming the variable.
    pub fn configure(serving: &[&dyn Service], env: &Env) -> Result<Self, ConfigError> {
        let mut peers = BTreeMap::new();
        for service in serving {
            for &callee in service.calls() {
                if peers.contains_key(callee) {
                    continue;
                }
                let variable = url_variable(callee);
                let peer = match env.string(&variable) {
                    Some(url) => {
                        check_url(&url).map_err(|reason| ConfigError::new(&variable, reason))?;
                        Peer::Remote(url)
                    }
                    None if serving.iter().any(|s| s.name() == callee) => Peer::Local,
                    None => {
                        return Err(ConfigError::new(
                            &variable,
                            format!(
                                "required when this process does not serve {callee} \
                                 (e.g. http://clm-{callee}:50051)"
                            ),
                        ));
                    }
                };
                peers.insert(callee, peer);
            }
        }
        Ok(Self { peers, own: None })
    }

    /// Reads every `CLM_<NAME>_URL` of `services`, so that none of them is
    /// reported as unknown by a process that does not call it (one ConfigMap
    /// serves every pod).
    pub fn declare(services: &[&dyn Service], env: &Env) {
        for service in services {
            let _ = env.string(&url_variable(service.name()));
        }
    }

    /// The same peers, with the services of this process reached at
    /// `address` (an unspecified address through loopback).
    pub fn served_at(mut self, address: SocketAddr) -> Self {
        self.own = Some(format!("http://{}", loopback_of(address)));
        self
    }

    /// The URL of `service`, which must be one of the callees.
    pub fn url(&self, service: &str) -> anyhow::Result<String> {
        match self.peers.get(service) {
            Some(Peer::Remote(url)) => Ok(url.clone()),
            Some(Peer::Local) => self
                .own
                .clone()
                .ok_or_else(|| anyhow::anyhow!("the address of this process is not known yet")),
            None => anyhow::bail!("{service} is not among the services called"),
        }
    }

    /// A channel to `service` (see [`peer_channel`]).
    pub fn channel(&self, service: &str) -> anyhow::Result<PeerChannel> {
        let url = self.url(service)?;
        peer_channel(&url).map_err(|err| anyhow::anyhow!("{}: {err}", url_variable(service)))
    }
}

/// A channel from one clm service to another. Every call on it carries the
/// trace context of the span it is made in, so the callee's work joins the
/// caller's trace, and at most what is left of the deadline of the call
/// being served, so a callee never works for a caller that gave up.
pub type PeerChannel = InterceptedService<Channel, Outgoing>;

/// What every call between services gets on its way out.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outgoing;

impl Interceptor for Outgoing {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        crate::telemetry::inject_context(&mut request);
        if let Some(deadline) = crate::server::caller_deadline() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(tonic::Status::deadline_exceeded(
                    "the deadline of the call being served has passed",
                ));
            }
            let own = request
                .metadata()
                .get("grpc-timeout")
                .and_then(|value| value.to_str().ok())
                .and_then(crate::server::parse_grpc_timeout);
            request.set_timeout(own.map_or(left, |own| own.min(left)));
        }
        Ok(request)
    }
}

/// The one way a service dials another: a channel to `url` (an http(s) URL
/// with a host), connected on first use, Nagle off, a short connect
/// timeout, reconnecting by itself, tracing every call.
pub fn peer_channel(url: &str) -> anyhow::Result<PeerChannel> {
    check_url(url).map_err(anyhow::Error::msg)?;
    let channel = Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(InterceptedService::new(channel, Outgoing))
}

/// Checks that `url` is an `http://` or `https://` URL with a host, as a
/// gRPC channel needs.
fn check_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|err| format!("{url:?} is not a valid URL: {err}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(host)) if !host.is_empty() => Ok(()),
        _ => Err(format!(
            "{url:?} is not a valid URL: an http:// or https:// URL with a host is needed"
        )),
    }
}

/// The address to reach this process from itself: an unspecified listen
/// address (0.0.0.0, ::) is reached through loopback.
pub fn loopback_of(address: SocketAddr) -> SocketAddr {
    match address.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::from(([127, 0, 0, 1], address.port()))
        }
        ip if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, address.port()))
        }
        _ => address,
    }
}

/// How a task ended.
#[derive(Debug)]
pub(crate) struct Ended {
    pub(crate) index: usize,
    pub(crate) outcome: Result<(), String>,
}

struct Task {
    service: &'static str,
    name: String,
    stop: Shutdown,
    handle: JoinHandle<()>,
}

/// The long-lived work of a process, owned: each task gets its own stop
/// signal, is watched while the process serves and is joined when it stops.
pub struct Tasks {
    service: &'static str,
    tasks: Vec<Task>,
    ended_sender: mpsc::UnboundedSender<Ended>,
    ended: mpsc::UnboundedReceiver<Ended>,
}

impl Default for Tasks {
    fn default() -> Self {
        Self::new()
    }
}

impl Tasks {
    /// No tasks yet.
    pub fn new() -> Self {
        let (ended_sender, ended) = mpsc::unbounded_channel();
        Self {
            service: "",
            tasks: Vec::new(),
            ended_sender,
            ended,
        }
    }

    /// Tasks spawned from now on belong to `service` (its health turns
    /// NOT_SERVING when one of them dies).
    pub fn for_service(&mut self, service: &'static str) -> &mut Self {
        self.service = service;
        self
    }

    /// Spawns `task`, named `name` in logs. It is given its stop signal and
    /// must end soon after that fires; ending before (an error, a panic, or
    /// simply returning) is a failure of the process.
    pub fn spawn<F>(&mut self, name: impl Into<String>, task: impl FnOnce(Shutdown) -> F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let stop = Shutdown::new();
        let index = self.tasks.len();
        let future = task(stop.clone());
        let ended = self.ended_sender.clone();
        let handle = tokio::spawn(async move {
            let outcome = match std::panic::AssertUnwindSafe(future).catch_unwind().await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(format!("{err:#}")),
                Err(panic) => Err(match panic.downcast_ref::<&str>() {
                    Some(message) => format!("panicked: {message}"),
                    None => match panic.downcast_ref::<String>() {
                        Some(message) => format!("panicked: {message}"),
                        None => "panicked".to_owned(),
                    },
                }),
            };
            let _ = ended.send(Ended { index, outcome });
        });
        self.tasks.push(Task {
            service: self.service,
            name: name.into(),
            stop,
            handle,
        });
    }

    /// How many tasks there are.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Waits for the next task to end while the process serves, and returns
    /// its service, its name and why it ended. Pending forever when no task
    /// ends.
    pub(crate) async fn next_death(&mut self) -> (&'static str, String, String) {
        let Some(Ended { index, outcome }) = self.ended.recv().await else {
            return std::future::pending().await;
        };
        let task = &self.tasks[index];
        let why = match outcome {
            Ok(()) => "ended although the process is not stopping".to_owned(),
            Err(err) => err,
        };
        (task.service, task.name.clone(), why)
    }

    /// Stops the tasks one after the other, in the order they were started,
    /// each waited for until `deadline` at most. Returns the names of those
    /// still running then.
    pub async fn stop_in_order(self, deadline: tokio::time::Instant) -> Vec<String> {
        let mut late = Vec::new();
        for task in self.tasks {
            task.stop.trigger();
            let mut handle = task.handle;
            match tokio::time::timeout_at(deadline, &mut handle).await {
                Ok(_) => tracing::debug!(task = %task.name, "background task stopped"),
                Err(_) => {
                    handle.abort();
                    late.push(task.name);
                }
            }
        }
        late
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_dies_is_reported_with_its_reason() {
        let mut tasks = Tasks::new();
        tasks
            .for_service("scoring")
            .spawn("quiet", |stop| async move {
                stop.triggered().await;
                Ok(())
            });
        tasks.spawn("broken", |_| async { anyhow::bail!("the log is gone") });
        let (service, name, why) = tasks.next_death().await;
        assert_eq!((service, name.as_str()), ("scoring", "broken"));
        assert!(why.contains("the log is gone"), "{why}");
    }

    #[tokio::test]
    async fn a_panic_or_an_early_return_is_a_death_too() {
        let mut tasks = Tasks::new();
        tasks.spawn("panics", |_| async { panic!("boom") });
        let (_, name, why) = tasks.next_death().await;
        assert_eq!((name.as_str(), why.as_str()), ("panics", "panicked: boom"));
        tasks.spawn("returns", |_| async { Ok(()) });
        let (_, name, why) = tasks.next_death().await;
        assert_eq!(name, "returns");
        assert!(why.contains("not stopping"), "{why}");
    }

    #[tokio::test]
    async fn tasks_stop_in_the_order_they_started() {
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Tasks::new();
        for name in ["consumer", "pusher", "sweep"] {
            let order = order.clone();
            tasks.spawn(name, move |stop| async move {
                stop.triggered().await;
                // Later tasks would finish first if all were told at once.
                let pause = match name {
                    "consumer" => 30,
                    "pusher" => 15,
                    _ => 0,
                };
                tokio::time::sleep(Duration::from_millis(pause)).await;
                order.lock().unwrap().push(name);
                Ok(())
            });
        }
        tasks.spawn("stuck", |_| std::future::pending());
        let late = tasks
            .stop_in_order(tokio::time::Instant::now() + Duration::from_millis(500))
            .await;
        assert_eq!(*order.lock().unwrap(), ["consumer", "pusher", "sweep"]);
        assert_eq!(late, ["stuck"]);
    }

    #[test]
    fn calls_between_services_carry_the_callers_trace() {
        use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        use tracing_subscriber::layer::SubscriberExt as _;

        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("caller");
            let _entered = span.enter();
            let trace_id = span.context().span().span_context().trace_id();
            let request = Outgoing.call(tonic::Request::new(())).unwrap();
            let traceparent = request
                .metadata()
                .get("traceparent")
                .expect("the call carries a traceparent")
                .to_str()
                .unwrap()
                .to_owned();
            assert!(
                traceparent.contains(&trace_id.to_string()),
                "{traceparent} is not in trace {trace_id}"
            );
        });
    }

    fn timeout_of(request: &tonic::Request<()>) -> Option<Duration> {
        crate::server::parse_grpc_timeout(request.metadata().get("grpc-timeout")?.to_str().ok()?)
    }

    #[tokio::test]
    async fn calls_between_services_carry_what_is_left_of_the_callers_deadline() {
        let mut own = tonic::Request::new(());
        own.set_timeout(Duration::from_secs(5));
        // Not serving a call: the call's own timeout, or none.
        assert_eq!(
            timeout_of(&Outgoing.call(own).unwrap()),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            timeout_of(&Outgoing.call(tonic::Request::new(())).unwrap()),
            None
        );
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        crate::server::with_caller_deadline(deadline, async {
            let mut own = tonic::Request::new(());
            own.set_timeout(Duration::from_secs(5));
            let left = timeout_of(&Outgoing.call(own).unwrap()).unwrap();
            assert!(left <= Duration::from_millis(300), "{left:?}");
            assert!(left > Duration::from_millis(100), "{left:?}");
            let mut shorter = tonic::Request::new(());
            shorter.set_timeout(Duration::from_millis(50));
            assert_eq!(
                timeout_of(&Outgoing.call(shorter).unwrap()),
                Some(Duration::from_millis(50))
            );
        })
        .await;
        let passed = tokio::time::Instant::now() - Duration::from_millis(1);
        crate::server::with_caller_deadline(passed, async {
            let status = Outgoing.call(tonic::Request::new(())).unwrap_err();
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        })
        .await;
    }

    struct Fake(&'static ServiceInfo);

    const fn info(name: &'static str, calls: &'static [&'static str]) -> ServiceInfo {
        ServiceInfo {
            name,
            about: "",
            grpc_services: &[],
            calls,
            smoke_call: SmokeCall {
                service: "",
                method: "",
                request: "{}",
            },
        }
    }

    static IDENTITY: ServiceInfo = info("identity", &[]);
    static TOUCHPOINTS: ServiceInfo = info("touchpoints", &["identity"]);

    impl Service for Fake {
        fn info(&self) -> &'static ServiceInfo {
            self.0
        }
        fn configure(
            &self,
            _: &PlatformConfig,
            _: &Env,
        ) -> Result<Box<dyn Configured>, ConfigError> {
            unreachable!()
        }
    }

    #[test]
    fn callees_are_here_or_at_their_url_or_a_named_error() {
        let (identity, touchpoints) = (&Fake(&IDENTITY), &Fake(&TOUCHPOINTS));
        let env = Env::from_pairs([("CLM_TOUCHPOINTS_URL", "http://elsewhere:1")]);
        let here = Peers::configure(&[identity, touchpoints], &env)
            .unwrap()
            .served_at("0.0.0.0:7".parse().unwrap());
        assert_eq!(here.url("identity").unwrap(), "http://127.0.0.1:7");
        let err = Peers::configure(&[touchpoints], &env).unwrap_err();
        assert!(err.to_string().contains("CLM_IDENTITY_URL"), "{err}");
        for bad in ["not a url", "x", "clm-identity:50051", "ftp://clm-identity"] {
            let env = Env::from_pairs([("CLM_IDENTITY_URL", bad)]);
            let err = Peers::configure(&[touchpoints], &env).unwrap_err();
            assert!(err.to_string().contains("not a valid URL"), "{bad}: {err}");
        }
        let env = Env::from_pairs([("CLM_IDENTITY_URL", "http://clm-identity:50051")]);
        let remote = Peers::configure(&[touchpoints], &env).unwrap();
        assert_eq!(remote.url("identity").unwrap(), "http://clm-identity:50051");
    }
}
