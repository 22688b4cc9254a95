//! `clm rescore`: starts (or follows) a rescore on a running scoring service
//! and shows its progress: a bar redrawn in place on a terminal, a line
//! every few seconds otherwise; exits non-zero unless it succeeded.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use clm_proto::scoring as pb;
use clm_proto::scoring::lifecycle_service_client::LifecycleServiceClient;
use tonic::transport::Endpoint;

/// Arguments of `clm rescore`.
#[derive(Debug, Args)]
pub struct RescoreArgs {
    /// The scoring service.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    address: String,
    /// Follow this rescore instead of starting one (a rescore already
    /// running is followed rather than doubled anyway).
    #[arg(long)]
    id: Option<String>,
    /// How often progress is read, in milliseconds.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    interval_ms: u64,
}

/// Runs `clm rescore`.
pub async fn run(args: RescoreArgs) -> anyhow::Result<()> {
    let channel = Endpoint::from_shared(args.address.clone())
        .with_context(|| format!("--address {:?} is not a valid URL", args.address))?
        .connect()
        .await
        .with_context(|| format!("cannot reach the scoring service at {}", args.address))?;
    let mut client = LifecycleServiceClient::new(channel);
    let id = match args.id {
        Some(id) => id,
        None => {
            let started = client
                .start_rescore(pb::StartRescoreRequest {})
                .await
                .map_err(|status| anyhow::anyhow!("StartRescore failed: {}", status.message()))?
                .into_inner();
            let rescore = started
                .rescore
                .context("StartRescore returned no rescore")?;
            if started.started {
                println!(
                    "started rescore {} with model {}",
                    rescore.id, rescore.model_version
                );
            } else {
                println!("following rescore {} already under way", rescore.id);
            }
            rescore.id
        }
    };
    let terminal = std::io::stdout().is_terminal();
    let began = Instant::now();
    let mut last_line = Instant::now();
    loop {
        let rescore = client
            .get_rescore(pb::GetRescoreRequest {
                rescore_id: id.clone(),
            })
            .await
            .map_err(|status| anyhow::anyhow!("GetRescore failed: {}", status.message()))?
            .into_inner()
            .rescore
            .context("GetRescore returned no rescore")?;
        let state = pb::RescoreState::try_from(rescore.state).unwrap_or_default();
        let finished = !matches!(state, pb::RescoreState::Pending | pb::RescoreState::Running);
        if terminal {
            print!("\r{}\x1b[K", progress_line(&rescore, 30));
            let _ = std::io::stdout().flush();
        } else if finished || last_line.elapsed() >= Duration::from_secs(5) {
            println!("{}", progress_line(&rescore, 30));
            last_line = Instant::now();
        }
        if finished {
            if terminal {
                println!();
            }
            let summary = format!(
                "rescore {} {}: {}/{} customers evaluated, {} changed, in {:.1} s",
                rescore.id,
                state_name(state),
                rescore.done_count,
                rescore.total_count.max(rescore.done_count),
                rescore.changed_count,
                began.elapsed().as_secs_f64()
            );
            println!("{summary}");
            if state != pb::RescoreState::Succeeded {
                if rescore.error.is_empty() {
                    bail!("the rescore did not succeed");
                }
                bail!("the rescore did not succeed: {}", rescore.error);
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
}

fn state_name(state: pb::RescoreState) -> &'static str {
    match state {
        pb::RescoreState::Unspecified => "unknown",
        pb::RescoreState::Pending => "pending",
        pb::RescoreState::Running => "running",
        pb::RescoreState::Succeeded => "succeeded",
        pb::RescoreState::Failed => "failed",
        pb::RescoreState::Cancelled => "cancelled",
    }
}

/// `[#######.......]  45%  450000/1000000  12345/s  ETA 44s  running`.
fn progress_line(rescore: &pb::Rescore, width: usize) -> String {
    let total = rescore.total_count.max(rescore.done_count).max(0);
    let fraction = if total == 0 {
        1.0
    } else {
        rescore.done_count as f64 / total as f64
    };
    let filled = ((fraction * width as f64).floor() as usize).min(width);
    let eta = match (&rescore.estimated_end_time, rescore.rate_per_second > 0.0) {
        (Some(end), true) => {
            let seconds = (end.seconds - chrono::Utc::now().timestamp()).max(0);
            format!("  ETA {seconds}s")
        }
        _ => String::new(),
    };
    let state = pb::RescoreState::try_from(rescore.state).unwrap_or_default();
    format!(
        "[{}{}] {:>3.0}%  {}/{}  {:.0}/s{}  {}",
        "#".repeat(filled),
        ".".repeat(width - filled),
        fraction * 100.0,
        rescore.done_count,
        total,
        rescore.rate_per_second,
        eta,
        state_name(state)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_progress() {
        let rescore = pb::Rescore {
            done_count: 450,
            total_count: 1000,
            rate_per_second: 12.5,
            state: pb::RescoreState::Running as i32,
            ..Default::default()
        };
        let line = progress_line(&rescore, 10);
        assert!(
            line.starts_with("[####......]  45%  450/1000  12/s"),
            "{line}"
        );
        assert!(line.ends_with("running"), "{line}");
        let done = pb::Rescore {
            state: pb::RescoreState::Succeeded as i32,
            ..Default::default()
        };
        assert!(progress_line(&done, 4).starts_with("[####] 100%  0/0"));
    }
}
