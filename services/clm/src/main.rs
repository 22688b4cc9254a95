//! `clm`: the one binary of the customer lifecycle management suite.
//!
//! `clm serve` runs every service in one process (the embedded default:
//! SQLite files and an in-process cache, no external server); `clm serve
//! <service>` runs one, as a Kubernetes pod does; `clm migrate` applies the
//! embedded database migrations; `clm bench` measures a server under load.

mod bench;
mod rescore;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{Parser, Subcommand};
use clm_platform::server::{self, Mounted, Shutdown};
use clm_platform::service::{Peers, Service, StartContext, Tasks};
use clm_platform::{Env, PlatformConfig, telemetry};

/// Customer lifecycle management: identity, touchpoints, lifecycle scoring,
/// feedback and metrics over gRPC.
// Scoring folds, encodes and evaluates many short-lived maps and buffers per
// touchpoint; glibc's allocator spent a third of the server's CPU on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The services this binary contains, in the order a process starts them
/// (a service is started after those it calls, when they run here too).
const SERVICES: &[&dyn Service] = &[
    &clm_identity::Identity,
    &clm_touchpoints::Touchpoints,
    &clm_scoring::Scoring,
    &clm_feedback::FeedbackSurveys,
];

/// The names of [`SERVICES`] for the command line, each with what it does.
fn service_names() -> PossibleValuesParser {
    PossibleValuesParser::new(SERVICES.iter().map(|service| {
        PossibleValue::new(service.name()).help(format!(
            "{} ({})",
            service.about(),
            service.grpc_services().join(", ")
        ))
    }))
}

#[derive(Debug, Parser)]
#[command(name = "clm", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve gRPC: every service when none is named, otherwise the named ones.
    ///
    /// Configuration comes from CLM_* environment variables; with none set,
    /// everything runs on 127.0.0.1:50051 with SQLite files under ./data.
    Serve {
        /// The services to run (default: all).
        #[arg(value_parser = service_names())]
        services: Vec<String>,
    },
    /// Apply the embedded database migrations and exit.
    Migrate {
        /// The services to migrate (default: all).
        #[arg(value_parser = service_names())]
        services: Vec<String>,
    },
    /// List the services of this binary: what each serves and calls, and a
    /// call that shows it works.
    Services {
        /// Print them as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Measure a server under load and print requests/s and latencies.
    Bench(bench::BenchArgs),
    /// Rescore every customer with the active model on a running scoring
    /// service and show the progress until it ends.
    Rescore(rescore::RescoreArgs),
    /// Print the version.
    Version,
}

/// The named services, in the order of [`SERVICES`]; all when none is named.
fn selected(names: &[String]) -> Vec<&'static dyn Service> {
    SERVICES
        .iter()
        .copied()
        .filter(|service| names.is_empty() || names.iter().any(|name| name == service.name()))
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("clm: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Version => {
                println!("clm {}", env!("CARGO_PKG_VERSION"));
                Ok(())
            }
            Command::Serve { services } => serve(selected(&services)).await,
            Command::Migrate { services } => migrate(selected(&services)).await,
            Command::Services { json } => {
                list_services(json);
                Ok(())
            }
            Command::Bench(args) => bench::run(args).await,
            Command::Rescore(args) => rescore::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("clm: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(services: Vec<&'static dyn Service>) -> anyhow::Result<()> {
    let env = Env::process();
    let platform = PlatformConfig::from_env(&env)?;
    let _telemetry = telemetry::init(&platform)?;
    warn_about_unknown_variables(&platform, &env);
    for service in services {
        service.configure(&platform, &env)?.migrate().await?;
        tracing::info!(service = service.name(), "migrations applied");
    }
    Ok(())
}

async fn serve(services: Vec<&'static dyn Service>) -> anyhow::Result<()> {
    let env = Env::process();
    let platform = PlatformConfig::from_env(&env)?;
    let _telemetry = telemetry::init(&platform)?;
    let shutdown = Shutdown::new();
    // Every setting is checked before anything is opened, so a bad variable
    // is reported as such and not as a side effect.
    let mut configured = Vec::with_capacity(services.len());
    for service in &services {
        configured.push((*service, service.configure(&platform, &env)?));
    }
    let peers = Peers::configure(&services, &env)?;
    warn_about_unknown_variables(&platform, &env);
    // Bind before starting services: a service that calls a sibling in this
    // process needs the address actually bound (the configured port may be 0).
    let listener = server::bind(platform.listen_addr).await?;
    let address = listener.local_addr()?;
    let peers = peers.served_at(address);
    let mut mounted = Mounted::new();
    let mut tasks = Tasks::new();
    for (service, configured) in configured {
        mounted.for_service(service.name());
        tasks.for_service(service.name());
        let mut context = StartContext {
            platform: &platform,
            peers: &peers,
            mounted: &mut mounted,
            tasks: &mut tasks,
            shutdown: shutdown.clone(),
        };
        configured
            .start(&mut context)
            .await
            .with_context(|| format!("cannot start {}", service.name()))?;
    }
    if platform.log_format == clm_platform::config::LogFormat::Text {
        println!(
            "clm listening on {address} ({})",
            mounted.names().join(", ")
        );
        println!("try: grpcurl -plaintext {address} list");
    }
    server::stop_on_signal(shutdown.clone());
    server::serve(&platform, listener, mounted, tasks, shutdown).await
}

/// Prints [`SERVICES`]: a table, or a JSON array for tools (the deploy
/// tests check the chart and the manifests against it).
fn list_services(json: bool) {
    if json {
        let services: Vec<serde_json::Value> = SERVICES
            .iter()
            .map(|service| {
                let smoke = service.smoke_call();
                serde_json::json!({
                    "name": service.name(),
                    "about": service.about(),
                    "grpc_services": service.grpc_services(),
                    "calls": service.calls(),
                    "url_variable": clm_platform::service::url_variable(service.name()),
                    "smoke_call": {
                        "service": smoke.service,
                        "method": smoke.method,
                        "request": serde_json::from_str::<serde_json::Value>(smoke.request)
                            .expect("a smoke call's request is JSON"),
                    },
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(services));
        return;
    }
    for service in SERVICES {
        let calls = match service.calls() {
            [] => "calls nothing".to_owned(),
            calls => format!("calls {}", calls.join(", ")),
        };
        println!(
            "{:<12} {} ({}); {calls}",
            service.name(),
            service.about(),
            service.grpc_services().join(", ")
        );
    }
}

/// Warns about `CLM_*` variables that no service reads, such as a misspelled
/// one. The configuration of every service the binary contains is read for
/// it, so that a variable meant for a service not run here (one ConfigMap for
/// every pod) is no surprise; errors there are not this process's concern.
fn warn_about_unknown_variables(platform: &PlatformConfig, env: &Env) {
    for service in SERVICES {
        let _ = service.configure(platform, env);
    }
    Peers::declare(SERVICES, env);
    env.warn_about_unknown_variables();
}
