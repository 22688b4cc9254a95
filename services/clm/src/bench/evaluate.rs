//! `clm bench evaluate`: the CPU time of one lifecycle evaluation (scores,
//! stage and health rules) of a typical customer with the default model,
//! excluding any I/O.

use chrono::Utc;
use clap::Args;
use clm_scoring::{CompiledModel, default_model};
use serde_json::json;

/// Arguments of `clm bench evaluate`.
#[derive(Debug, Args)]
pub struct EvaluateBenchArgs {
    /// Touchpoints of the typical customer.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    touchpoints: u32,
    /// Timed samples; the median and p90 are over these.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    samples: u32,
    /// Evaluations per sample.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    evaluations: u32,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs the evaluation benchmark.
pub fn run(args: &EvaluateBenchArgs) -> anyhow::Result<()> {
    let model = CompiledModel::compile(default_model()).map_err(|violations| {
        anyhow::anyhow!("the default model does not compile: {violations:?}")
    })?;
    let now = Utc::now();
    let features = clm_scoring::bench::typical_customer(7, args.touchpoints as usize, now);
    let timing = clm_scoring::bench::time_evaluation(
        &model,
        &features,
        now,
        args.samples as usize,
        args.evaluations as usize,
    );
    let clock = if timing.cpu_time {
        "thread CPU time"
    } else {
        "wall-clock time"
    };
    let median_us = timing.median.as_secs_f64() * 1e6;
    let p90_us = timing.p90.as_secs_f64() * 1e6;
    if args.json {
        println!(
            "{}",
            json!({"touchpoints": args.touchpoints, "clock": clock, "median_us": median_us, "p90_us": p90_us,
                   "samples": timing.samples, "evaluations_per_sample": timing.evaluations_per_sample})
        );
    } else {
        println!(
            "clm bench evaluate: default model, a customer with {} touchpoints, {} samples of {} evaluations ({clock})\n\
             median {median_us:.1} µs, p90 {p90_us:.1} µs per evaluation (target median <= 100 µs): {}",
            args.touchpoints,
            timing.samples,
            timing.evaluations_per_sample,
            if median_us <= 100.0 { "MET" } else { "NOT MET" }
        );
    }
    Ok(())
}
