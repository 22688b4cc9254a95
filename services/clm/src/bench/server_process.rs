//! The servers a benchmark measures: `clm serve identity` child processes of
//! this same binary, each on a free loopback port, stopped with SIGTERM and
//! killed if they do not stop (or when dropped on an error path).
//!
//! A benchmark's output is its table: what a server logs (slow statements
//! under load, say) goes to a file in the benchmark's data folder, named once
//! on stderr and quoted when the server fails.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// How long a server may take to migrate its database and listen.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to answer SERVING once it listens.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a server may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Variables of the benchmark's own environment that would change what a
/// server measures; each server gets its own values or none.
const OVERRIDDEN_VARIABLES: &[&str] = &[
    "CLM_LISTEN_ADDR",
    "CLM_LOG",
    "CLM_LOG_FORMAT",
    "CLM_DATA_DIR",
    "CLM_DATABASE_URL",
    "CLM_IDENTITY_DATABASE_URL",
    "CLM_TOUCHPOINTS_DATABASE_URL",
    "CLM_IDENTITY_URL",
    "CLM_REDIS_URL",
    "CLM_MIGRATE_ON_START",
    "CLM_SHUTDOWN_GRACE_SECONDS",
    "CLM_SHUTDOWN_DELAY_SECONDS",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// How to start a server.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// The `clm` binary.
    pub executable: PathBuf,
    /// Its `CLM_DATA_DIR`.
    pub data_dir: PathBuf,
    /// Its `CLM_DATABASE_URL`.
    pub database_url: String,
    /// Its `CLM_REDIS_URL`; `None`: the in-process cache.
    pub redis_url: Option<String>,
    /// The services it runs (`clm serve <services>`).
    pub services: &'static [&'static str],
    /// More variables to set (e.g. where the services it calls are).
    pub env: Vec<(String, String)>,
}

impl ServerSpec {
    /// This `clm` binary serving `services` on `database_url` with the
    /// in-process cache, its data in `data_dir`.
    pub fn this_binary(
        data_dir: &std::path::Path,
        database_url: &str,
        services: &'static [&'static str],
    ) -> anyhow::Result<Self> {
        Ok(Self {
            executable: std::env::current_exe()
                .map_err(|err| anyhow::anyhow!("cannot find the clm binary to start: {err}"))?,
            data_dir: data_dir.to_path_buf(),
            database_url: database_url.to_owned(),
            redis_url: None,
            services,
            env: Vec::new(),
        })
    }
}

/// A running `clm serve identity` child process.
pub struct ServerProcess {
    label: &'static str,
    child: Child,
    address: SocketAddr,
    log_path: PathBuf,
}

/// The last lines of a server's log, to quote when it fails.
fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    if tail.is_empty() {
        format!("its log {} is empty", path.display())
    } else {
        format!("the end of its log {}:\n{tail}", path.display())
    }
}

impl ServerProcess {
    /// Starts a server and waits until it listens and answers SERVING.
    pub async fn start(label: &'static str, spec: &ServerSpec) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&spec.data_dir)
            .with_context(|| format!("cannot create {}", spec.data_dir.display()))?;
        let log_path = spec.data_dir.join(format!("server-{label}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        eprintln!("clm bench: server {label} logs to {}", log_path.display());
        let mut command = Command::new(&spec.executable);
        command.arg("serve").args(spec.services);
        for variable in OVERRIDDEN_VARIABLES {
            command.env_remove(variable);
        }
        command
            // Port 0: the server picks a free port and prints it, so two
            // servers never race for one.
            .env("CLM_LISTEN_ADDR", "127.0.0.1:0")
            // CLM_BENCH_SERVER_LOG sets the servers' log filter (default
            // warn), e.g. to see what a server does under load.
            .env(
                "CLM_LOG",
                std::env::var("CLM_BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .env("CLM_LOG_FORMAT", "text")
            .env("CLM_DATA_DIR", &spec.data_dir)
            .env("CLM_DATABASE_URL", &spec.database_url)
            .env("CLM_SHUTDOWN_GRACE_SECONDS", "2")
            // No load balancer watches a benchmark's server: stop at once.
            .env("CLM_SHUTDOWN_DELAY_SECONDS", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        if let Some(redis_url) = &spec.redis_url {
            command.env("CLM_REDIS_URL", redis_url);
        }
        command.envs(spec.env.iter().map(|(name, value)| (name, value)));
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", spec.executable.display()))?;
        let stdout = child
            .stdout
            .take()
            .context("the server's stdout is not captured")?;
        let mut server = Self {
            label,
            child,
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_path,
        };
        server.address =
            match tokio::time::timeout(START_TIMEOUT, listening_address(stdout, label)).await {
                Ok(Ok(address)) => address,
                Ok(Err(err)) => {
                    let status = tokio::time::timeout(STOP_TIMEOUT, server.child.wait())
                        .await
                        .ok()
                        .and_then(Result::ok);
                    return Err(err.context(format!(
                        "server {label} did not start ({}); {}",
                        status.map_or_else(
                            || "exit status unknown".to_owned(),
                            |status| status.to_string()
                        ),
                        log_tail(&server.log_path)
                    )));
                }
                Err(_) => anyhow::bail!(
                    "server {label} did not listen within {} s; {}",
                    START_TIMEOUT.as_secs(),
                    log_tail(&server.log_path)
                ),
            };
        server.wait_until_serving().await?;
        Ok(server)
    }

    /// Fails when the server has exited, naming `during` (what was running)
    /// and its exit status.
    pub fn ensure_running(&mut self, during: &str) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                anyhow::bail!(
                    "server {} exited during {during} ({status}); {}",
                    self.label,
                    log_tail(&self.log_path)
                )
            }
            Err(err) => Err(anyhow::Error::new(err).context(format!(
                "cannot tell whether server {} still runs",
                self.label
            ))),
        }
    }

    /// Where the server listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn wait_until_serving(&self) -> anyhow::Result<()> {
        let give_up_at = Instant::now() + READY_TIMEOUT;
        let mut last_problem = String::from("no answer yet");
        while Instant::now() < give_up_at {
            match super::load::connect_channels(&self.address.to_string(), 1).await {
                Ok(channels) => match super::load::is_serving(channels[0].clone()).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => last_problem = "health is not SERVING".to_owned(),
                    Err(status) => last_problem = format!("health check failed: {status}"),
                },
                Err(err) => last_problem = format!("{err:#}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!(
            "server {} on {} was not SERVING within {} s: {last_problem}; {}",
            self.label,
            self.address,
            READY_TIMEOUT.as_secs(),
            log_tail(&self.log_path)
        )
    }

    /// Stops the server with SIGTERM, killing it when it does not stop in
    /// time, and waits for it to exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let label = self.label;
        if let Some(pid) = self.child.id() {
            let terminated = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stdin(Stdio::null())
                .status()
                .await
                .is_ok_and(|status| status.success());
            if terminated {
                if let Ok(waited) = tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
                    waited.with_context(|| format!("cannot wait for server {label}"))?;
                    return Ok(());
                }
                eprintln!(
                    "clm bench: server {label} did not stop within {} s of SIGTERM, killing it",
                    STOP_TIMEOUT.as_secs()
                );
            }
        }
        self.child
            .kill()
            .await
            .with_context(|| format!("cannot kill server {label}"))
    }
}

/// Reads the server's stdout until it says where it listens, then keeps
/// passing what else it prints to stderr so that the pipe never fills.
async fn listening_address(stdout: ChildStdout, label: &'static str) -> anyhow::Result<SocketAddr> {
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines
            .next_line()
            .await
            .context("cannot read the server's output")?
            .context("the server ended before it listened")?;
        if let Some(address) = parse_listening_line(&line) {
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    if !line.starts_with("try: ") {
                        eprintln!("[server {label}] {line}");
                    }
                }
            });
            return Ok(address);
        }
        eprintln!("[server {label}] {line}");
    }
}

/// The address in `clm listening on 127.0.0.1:1234 (services)`.
fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    let rest = line.strip_prefix("clm listening on ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_servers_log_goes_to_its_file_and_is_quoted_when_it_fails() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let executable = dir.path().join("fake-clm");
        std::fs::write(
            &executable,
            "#!/bin/sh\necho 'WARN slow statement: elapsed=2s' >&2\nexit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(&executable, std::fs::Permissions::from_mode(0o755)).unwrap();
        let spec = ServerSpec {
            executable,
            data_dir: dir.path().join("data"),
            database_url: "sqlite://unused.db".into(),
            redis_url: None,
            services: &["identity"],
            env: Vec::new(),
        };
        let Err(err) = ServerProcess::start("a", &spec).await else {
            panic!("the fake server cannot start");
        };
        let log = std::fs::read_to_string(dir.path().join("data/server-a.log")).unwrap();
        assert!(
            log.contains("slow statement"),
            "the log file holds it: {log:?}"
        );
        assert!(format!("{err:#}").contains("slow statement"), "{err:#}");
    }

    #[test]
    fn the_listening_line_gives_the_address() {
        assert_eq!(
            parse_listening_line(
                "clm listening on 127.0.0.1:41234 (clm.identity.v1.CustomerService)"
            ),
            Some(SocketAddr::from(([127, 0, 0, 1], 41234)))
        );
        assert_eq!(
            parse_listening_line("try: grpcurl -plaintext 127.0.0.1:1 list"),
            None
        );
    }
}
