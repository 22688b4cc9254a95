//! Logs and traces: `tracing` with structured fields to stdout (text or
//! JSON), and OpenTelemetry export over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, with W3C trace context taken from
//! incoming calls and put on outgoing ones.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{LogFormat, PlatformConfig};

/// Flushes and stops trace export when dropped (at process exit).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("trace export did not shut down cleanly: {err}");
        }
    }
}

/// Installs the global subscriber. Call once, at start-up.
pub fn init(config: &PlatformConfig) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_new(&config.log_filter)
        .map_err(|err| anyhow::anyhow!("invalid CLM_LOG: {err}"))?;
    let fmt_layer = match config.log_format {
        // Colours only for a person at a terminal: a file, a pipe or a log
        // collector gets plain text.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };

    let mut provider = None;
    let otel_layer = match &config.otel {
        None => None,
        Some(otel) => {
            use opentelemetry_otlp::WithExportConfig as _;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(otel.endpoint.clone())
                .build()
                .map_err(|err| anyhow::anyhow!("invalid OTEL_EXPORTER_OTLP_ENDPOINT: {err}"))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(otel.service_name.clone())
                .build();
            let tracer_provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            let tracer = tracer_provider.tracer("clm");
            opentelemetry::global::set_tracer_provider(tracer_provider.clone());
            provider = Some(tracer_provider);
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .map_err(|err| anyhow::anyhow!("logging was already set up: {err}"))?;
    Ok(TelemetryGuard { provider })
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The span of one incoming gRPC call, child of the caller's trace when the
/// request carries W3C `traceparent`.
pub fn request_span<B>(request: &http::Request<B>) -> tracing::Span {
    let span = tracing::info_span!(
        "grpc_request",
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = %request.uri().path(),
    );
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    let _ = span.set_parent(parent);
    span
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Puts the current span's trace context on an outgoing request, so the
/// trace continues in the service called.
pub fn inject_context<T>(request: &mut tonic::Request<T>) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(request.metadata_mut()));
    });
}

/// Links `span` to `other`'s trace: for work done once on behalf of many
/// calls (a group commit), which can have one parent only. The batch then
/// shows in the first call's trace, and the others point at it.
pub fn add_link(span: &tracing::Span, other: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt as _;
    let context = other.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.add_link(span_context);
    }
}
