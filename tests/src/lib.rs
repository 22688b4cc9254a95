//! Harness for end-to-end tests: starts the real `clm` binary (and, when a
//! test needs one it can stop, a throwaway Redis server) and connects
//! generated gRPC clients to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

pub use clm_platform::testing::{fresh_postgres_database, redis_url};

/// The `clm` binary under test: `CLM_BIN`, else the one Cargo built beside
/// this test executable.
pub fn clm_binary() -> PathBuf {
    if let Ok(path) = std::env::var("CLM_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/clm
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    profile_dir.join("clm")
}

fn truthy(name: &str) -> bool {
    std::env::var(name)
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// True when missing tools and servers must fail tests rather than skip them.
pub fn servers_required() -> bool {
    truthy("CI") || truthy("CLM_TEST_REQUIRE_SERVERS")
}

/// A running `clm` process.
pub struct ClmServer {
    child: Child,
    /// Where it serves gRPC.
    pub address: SocketAddr,
    data_dir: tempfile::TempDir,
    log_path: PathBuf,
}

impl ClmServer {
    /// Starts `clm <args>` with `env` on a free loopback port, its data in a
    /// fresh folder, and waits until health says SERVING.
    pub async fn start(args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Self> {
        let data_dir = tempfile::tempdir()?;
        let log_path = data_dir.path().join("clm.log");
        let log = std::fs::File::create(&log_path)?;
        let binary = clm_binary();
        if !binary.exists() {
            bail!(
                "{} does not exist: build it with `cargo build -p clm`",
                binary.display()
            );
        }
        let mut command = Command::new(&binary);
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CLM_LISTEN_ADDR", "127.0.0.1:0")
            .env("CLM_DATA_DIR", data_dir.path())
            .env("CLM_LOG", "info")
            .env("CLM_SHUTDOWN_GRACE_SECONDS", "5")
            // Tests stop servers often; the one that checks the delay sets it.
            .env("CLM_SHUTDOWN_DELAY_SECONDS", "0")
            // Many servers run side by side against one PostgreSQL server
            // that allows 100 connections (CI's default); four pools of 16
            // each per server ran it out, and calls failed as UNAVAILABLE.
            .env("CLM_IDENTITY_DB_CONNECTIONS", "5")
            .env("CLM_TOUCHPOINTS_DB_CONNECTIONS", "5")
            .env("CLM_SCORING_DB_CONNECTIONS", "5")
            .env("CLM_FEEDBACK_DB_CONNECTIONS", "5")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
        let address = match first {
            Ok(Ok(Some(line))) => line
                .strip_prefix("clm listening on ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|addr| addr.parse().ok())
                .with_context(|| format!("unexpected first line {line:?}"))?,
            _ => {
                let _ = child.kill().await;
                bail!(
                    "clm did not start: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
        };
        // Keep reading stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let server = Self {
            child,
            address,
            data_dir,
            log_path,
        };
        server.wait_serving().await?;
        Ok(server)
    }

    async fn wait_serving(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(channel) = Channel::from_shared(self.endpoint())?.connect().await {
                let answer = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if answer.is_ok_and(|a| a.into_inner().status == ServingStatus::Serving as i32) {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("clm never became SERVING: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://<address>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A connected channel.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint())
            .expect("valid endpoint")
            .connect()
            .await
            .expect("connect to clm")
    }

    /// The data folder (SQLite files).
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or_default()
    }

    /// Sends a signal (`TERM`, `KILL`, …) to the process.
    pub fn signal(&self, name: &str) {
        send_signal(self.pid(), name);
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

/// Sends a signal through `kill`, which every system has.
pub fn send_signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// A throwaway Redis server this test may stop, pause and resume.
pub struct RedisServer {
    child: std::process::Child,
    /// Its `redis://` URL.
    pub url: String,
}

impl RedisServer {
    /// Starts `redis-server` on a free port without persistence. `None` only
    /// outside CI when redis-server is not installed.
    pub async fn start() -> Option<Self> {
        let port = free_port();
        let spawned = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(err) if !servers_required() => {
                eprintln!("NOT RUN: redis-server is not installed ({err})");
                return None;
            }
            Err(err) => panic!("redis-server is required (apt-get install redis-server): {err}"),
        };
        let url = format!("redis://127.0.0.1:{port}/");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Some(Self { child, url });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not start on port {port}");
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        send_signal(self.child.id(), "STOP");
    }

    /// Thaws the server (SIGCONT), with its data as it was.
    pub fn resume(&self) {
        send_signal(self.child.id(), "CONT");
    }

    /// Stops the server for good: its port refuses connections.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

/// The `google.rpc` details of a status: (field violations, error reason).
pub fn details(status: &tonic::Status) -> (Vec<(String, String)>, Option<String>) {
    use tonic_types::StatusExt as _;
    let details = status.get_error_details();
    let violations = details
        .bad_request()
        .map(|bad| {
            bad.field_violations
                .iter()
                .map(|v| (v.field.clone(), v.description.clone()))
                .collect()
        })
        .unwrap_or_default();
    let reason = details.error_info().map(|info| info.reason.clone());
    (violations, reason)
}

/// The (field, reason) of each BadRequest field violation of a status.
pub fn violation_reasons(status: &tonic::Status) -> Vec<(String, String)> {
    use tonic_types::StatusExt as _;
    status
        .get_error_details()
        .bad_request()
        .map(|bad| {
            bad.field_violations
                .iter()
                .map(|v| (v.field.clone(), v.reason.clone()))
                .collect()
        })
        .unwrap_or_default()
}
