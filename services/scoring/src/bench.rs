//! Measuring evaluation cost, for `clm bench` and the crate's tests: a
//! generator of typical customers and the CPU time of one evaluation.
//!
//! CPU time is the calling thread's CPU clock (`CLOCK_THREAD_CPUTIME_ID`),
//! so other processes on a busy machine do not inflate it; where there is no
//! such clock it falls back to wall-clock time. Evaluations are timed in
//! batches so that reading the clock does not weigh in.

use std::time::{Duration, Instant};

use chrono::{DateTime, Duration as TimeDelta, Utc};
use clm_proto::touchpoint::Channel;

use crate::compiled_model::CompiledModel;
use crate::features::{CustomerFeatures, Money, ProfileFacts, TouchpointFacts};
use crate::lifecycle::LifecycleState;

/// A customer with `touchpoints` touchpoints spread over the year before
/// `now`: browsing, a form, e-mails, a purchase or two, support. The same
/// `seed` gives the same customer.
pub fn typical_customer(seed: u64, touchpoints: usize, now: DateTime<Utc>) -> CustomerFeatures {
    const JOURNEY: &[(&str, Channel)] = &[
        ("page_view", Channel::Web),
        ("ad_click", Channel::Ads),
        ("page_view", Channel::Web),
        ("content_view", Channel::Web),
        ("form_submit", Channel::Web),
        ("email_open", Channel::Email),
        ("email_click", Channel::Email),
        ("content_download", Channel::Web),
        ("pricing_view", Channel::Web),
        ("purchase", Channel::Web),
        ("product_usage", Channel::Product),
        ("support_ticket_opened", Channel::Support),
        ("support_ticket_resolved", Channel::Support),
        ("email_open", Channel::Email),
        ("purchase", Channel::Web),
        ("page_view", Channel::Web),
        ("product_usage", Channel::Product),
        ("nps_response", Channel::Email),
        ("page_view", Channel::Web),
        ("renewal", Channel::Email),
    ];
    let mut state = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    let start = now - TimeDelta::days(365);
    let mut features = CustomerFeatures::new();
    for index in 0..touchpoints {
        let (kind, channel) = JOURNEY[index % JOURNEY.len()];
        // spread over the year, in order, with jitter
        let offset = (365 * 86_400 * index / touchpoints.max(1)) as i64 + (next() % 86_400) as i64;
        let revenue = matches!(kind, "purchase" | "renewal").then_some(Money {
            currency_code: "EUR",
            amount_micros: 10_000_000 + (next() % 90_000_000) as i64,
        });
        features.apply(&TouchpointFacts {
            touchpoint_type: kind,
            channel,
            occurred_at: start + TimeDelta::seconds(offset),
            revenue,
        });
    }
    features.record_nps((next() % 11) as i64, start + TimeDelta::days(300));
    features.set_profile(ProfileFacts {
        identified: true,
        company: "Example Ltd".to_owned(),
        industry: "software".to_owned(),
        ..ProfileFacts::default()
    });
    features
}

/// The CPU time of evaluations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvaluationTiming {
    /// The median over samples of the time per evaluation.
    pub median: Duration,
    /// The 90th percentile over samples.
    pub p90: Duration,
    /// How many samples (batches) were timed.
    pub samples: usize,
    /// Evaluations per sample.
    pub evaluations_per_sample: usize,
    /// True when the time is thread CPU time, false for wall-clock time.
    pub cpu_time: bool,
}

/// The calling thread's CPU time so far, if the platform tells.
#[cfg(unix)]
fn thread_cpu_time() -> Option<Duration> {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Some(Duration::new(
        u64::try_from(now.tv_sec).ok()?,
        u32::try_from(now.tv_nsec).ok()?,
    ))
}

/// The calling thread's CPU time so far, if the platform tells.
#[cfg(not(unix))]
fn thread_cpu_time() -> Option<Duration> {
    None
}

/// Times `evaluations_per_sample` evaluations of `features` with `model`,
/// `samples` times, and reports the time per evaluation.
pub fn time_evaluation(
    model: &CompiledModel,
    features: &CustomerFeatures,
    now: DateTime<Utc>,
    samples: usize,
    evaluations_per_sample: usize,
) -> EvaluationTiming {
    let state = model
        .evaluate(features, &LifecycleState::new(), now)
        .snapshot
        .state;
    let cpu_time = thread_cpu_time().is_some();
    let per_sample = evaluations_per_sample.max(1);
    let mut times: Vec<Duration> = (0..samples.max(1))
        .map(|_| {
            let (cpu_start, wall_start) = (thread_cpu_time(), Instant::now());
            for _ in 0..per_sample {
                std::hint::black_box(model.evaluate(std::hint::black_box(features), &state, now));
            }
            let elapsed = match (cpu_start, thread_cpu_time()) {
                (Some(start), Some(end)) if cpu_time => end.saturating_sub(start),
                _ => wall_start.elapsed(),
            };
            elapsed / per_sample as u32
        })
        .collect();
    times.sort();
    EvaluationTiming {
        median: times[times.len() / 2],
        p90: times[(times.len() * 9 / 10).min(times.len() - 1)],
        samples: times.len(),
        evaluations_per_sample: per_sample,
        cpu_time,
    }
}
