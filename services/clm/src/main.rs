//! `clm`: the one binary of the customer lifecycle management suite.
//!
//! `clm serve` runs every service in one process (the embedded default:
//! SQLite files and an in-process cache, no external server); `clm serve
//! <service>` runs one, as a Kubernetes pod does; `clm migrate` applies the
//! embedded database migrations; `clm bench` measures a server under load.

mod bench;
mod rescore;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use clm_platform::server::{self, Mounted, Shutdown};
use clm_platform::{Env, PlatformConfig, telemetry};

/// Customer lifecycle management: identity, touchpoints, lifecycle scoring,
/// feedback and metrics over gRPC.
// Scoring folds, encodes and evaluates many short-lived maps and buffers per
// touchpoint; glibc's allocator spent a third of the server's CPU on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        #[arg(value_enum)]
        services: Vec<ServiceName>,
    },
    /// Apply the embedded database migrations and exit.
    Migrate {
        /// The services to migrate (default: all).
        #[arg(value_enum)]
        services: Vec<ServiceName>,
    },
    /// Measure a server under load and print requests/s and latencies.
    Bench(bench::BenchArgs),
    /// Rescore every customer with the active model on a running scoring
    /// service and show the progress until it ends.
    Rescore(rescore::RescoreArgs),
    /// Print the version.
    Version,
}

/// The services this binary contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ServiceName {
    /// Customer profiles and identities (clm.identity.v1.CustomerService).
    Identity,
    /// Interactions, timelines and the touchpoint log (clm.touchpoint.v1.TouchpointService).
    Touchpoints,
    /// Lifecycle stages, scores, models and transitions (clm.scoring.v1.LifecycleService).
    Scoring,
}

impl ServiceName {
    fn all() -> Vec<Self> {
        Self::value_variants().to_vec()
    }
}

fn selected(services: Vec<ServiceName>) -> Vec<ServiceName> {
    if services.is_empty() {
        ServiceName::all()
    } else {
        services
    }
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
            Command::Serve { services } => serve(selected(services)).await,
            Command::Migrate { services } => migrate(selected(services)).await,
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

async fn migrate(services: Vec<ServiceName>) -> anyhow::Result<()> {
    let env = Env::process();
    let platform = PlatformConfig::from_env(&env)?;
    let _telemetry = telemetry::init(&platform)?;
    warn_about_unknown_variables(&platform, &env);
    for service in services {
        match service {
            ServiceName::Identity => {
                let config = clm_identity::IdentityConfig::from_env(&platform, &env)?;
                clm_identity::migrate(&config).await?;
            }
            ServiceName::Touchpoints => {
                let config = clm_touchpoints::TouchpointsConfig::from_env(&platform, &env)?;
                clm_touchpoints::migrate(&config).await?;
            }
            ServiceName::Scoring => {
                let config = clm_scoring::ScoringConfig::from_env(&platform, &env)?;
                clm_scoring::migrate(&config).await?;
            }
        }
        tracing::info!(service = ?service, "migrations applied");
    }
    Ok(())
}

async fn serve(services: Vec<ServiceName>) -> anyhow::Result<()> {
    let env = Env::process();
    let platform = PlatformConfig::from_env(&env)?;
    let _telemetry = telemetry::init(&platform)?;
    let shutdown = Shutdown::new();
    // Every setting is checked before anything is opened, so a bad variable
    // is reported as such and not as a side effect.
    let identity = match services.contains(&ServiceName::Identity) {
        true => Some(clm_identity::IdentityConfig::from_env(&platform, &env)?),
        false => None,
    };
    let touchpoints = match services.contains(&ServiceName::Touchpoints) {
        true => {
            let config = clm_touchpoints::TouchpointsConfig::from_env(&platform, &env)?;
            if config.identity_url.is_none() && identity.is_none() {
                anyhow::bail!(
                    "invalid CLM_IDENTITY_URL: required when this process does not serve identity \
                     (e.g. http://clm-identity:50051)"
                );
            }
            Some(config)
        }
        false => None,
    };
    // Bind before starting services: a service that calls a sibling in this
    // process needs the address actually bound (the configured port may be 0).
    let scoring = match services.contains(&ServiceName::Scoring) {
        true => {
            let config = clm_scoring::ScoringConfig::from_env(&platform, &env)?;
            if config.identity_url.is_none() && identity.is_none() {
                anyhow::bail!(
                    "invalid CLM_IDENTITY_URL: required when this process does not serve identity \
                     (e.g. http://clm-identity:50051)"
                );
            }
            if config.touchpoints_url.is_none() && touchpoints.is_none() {
                anyhow::bail!(
                    "invalid CLM_TOUCHPOINTS_URL: required when this process does not serve touchpoints \
                     (e.g. http://clm-touchpoints:50051)"
                );
            }
            Some(config)
        }
        false => None,
    };
    warn_about_unknown_variables(&platform, &env);
    let listener = server::bind(platform.listen_addr).await?;
    let address = listener.local_addr()?;
    let mut mounted = Mounted::new();
    if let Some(config) = &identity {
        clm_identity::IdentityService::start(&platform, config, shutdown.clone())
            .await?
            .mount(&mut mounted);
    }
    if let Some(config) = &touchpoints {
        let identity_url = config
            .identity_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", loopback_of(address)));
        clm_touchpoints::TouchpointsService::start(
            &platform,
            config,
            &identity_url,
            shutdown.clone(),
        )
        .await?
        .mount(&mut mounted);
    }
    if let Some(config) = &scoring {
        let own = format!("http://{}", loopback_of(address));
        let identity_url = config.identity_url.clone().unwrap_or_else(|| own.clone());
        let touchpoints_url = config.touchpoints_url.clone().unwrap_or(own);
        clm_scoring::ScoringService::start(
            &platform,
            config,
            &identity_url,
            &touchpoints_url,
            shutdown.clone(),
        )
        .await?
        .mount(&mut mounted);
    }
    if platform.log_format == clm_platform::config::LogFormat::Text {
        println!(
            "clm listening on {address} ({})",
            mounted.names().join(", ")
        );
        println!("try: grpcurl -plaintext {address} list");
    }
    server::stop_on_signal(shutdown.clone());
    server::serve(&platform, listener, mounted, shutdown).await
}

/// Warns about `CLM_*` variables that no service reads, such as a misspelled
/// one. The configuration of every service the binary contains is read for
/// it, so that a variable meant for a service not run here (one ConfigMap for
/// every pod) is no surprise; errors there are not this process's concern.
fn warn_about_unknown_variables(platform: &PlatformConfig, env: &Env) {
    let _ = clm_identity::IdentityConfig::from_env(platform, env);
    let _ = clm_touchpoints::TouchpointsConfig::from_env(platform, env);
    let _ = clm_scoring::ScoringConfig::from_env(platform, env);
    env.warn_about_unknown_variables();
}

/// The address to reach this process from itself: an unspecified listen
/// address (0.0.0.0, ::) is reached through loopback.
fn loopback_of(address: std::net::SocketAddr) -> std::net::SocketAddr {
    match address.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            std::net::SocketAddr::from(([127, 0, 0, 1], address.port()))
        }
        ip if ip.is_unspecified() => {
            std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, address.port()))
        }
        _ => address,
    }
}
