//! `clm bench feedback`: the feedback service under load, on a fresh
//! PostgreSQL database with every service of this binary in one `clm serve`
//! process on this machine. Three phases, one per target:
//!
//! - A, transition to dispatch: customers are created beforehand (so that
//!   identity's creation of customers is not what is measured), then an NPS
//!   survey with a TRANSITION trigger (`event.to_stage == 'ACQUISITION'`, no
//!   delay, no fatigue limits) while the first page view of one of those
//!   customers, named by id, streams in at `--rate` per second: each makes
//!   scoring log a transition into ACQUISITION (a known contact seen on the
//!   pricing page), which the feedback service matches and schedules, and
//!   its sweep releases. `--probes` times per second a probe records the
//!   page view of another such customer and polls ListDispatches for that
//!   customer every 10 ms (every 100 ms once a second has passed); a sample
//!   is the
//!   time from RecordTouchpoint's return to the first poll that lists the
//!   dispatch (any state), and to the first that lists it DISPATCHED.
//! - B, RecordResponse: fresh response ids from many concurrent clients
//!   over several HTTP/2 connections, as unary RecordResponse calls and as
//!   RecordResponses batches of `--batch-size`, alternating in 1 s slices
//!   with the health Check of the same server.
//! - C, GetSurveySummary: a survey created a year ago holds `--responses`
//!   responses submitted over that year, stored from this process through
//!   the feedback store (`record_responses`, so the rollups are built the
//!   way the service builds them); then summaries over random windows and
//!   over the default window (the whole survey) from a few clients,
//!   alternating in 1 s slices.
//!
//! Between the phases the benchmark waits until no log consumer has moved
//! its cursor for a while, so that one phase's backlog does not load the
//! next.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, TimeDelta, Utc};
use clap::Args;
use clm_feedback::model::{
    Answer, AnswerValue, FatiguePolicy, Question, QuestionType, Response, Sentiment, Survey,
    SurveyDefinition, SurveyKind, SurveyState,
};
use clm_feedback::store::{NewResponse, Recorded};
use clm_feedback::summary::Tally;
use clm_platform::Secret;
use clm_proto::common::{CustomerReference, customer_reference};
use clm_proto::feedback as fb;
use clm_proto::feedback::survey_service_client::SurveyServiceClient;
use clm_proto::touchpoint as tp;
use clm_proto::touchpoint::touchpoint_service_client::TouchpointServiceClient;
use serde_json::{Value, json};
use sqlx::Connection as _;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use super::database::TemporaryDatabase;
use super::load::{self, PhaseMeasurement, Workload};
use super::server_process::{ServerProcess, ServerSpec};

/// Touchpoints per background RecordTouchpoints call.
const BATCH: usize = 50;
/// How often a probe polls ListDispatches in its first [`FAST_POLLS_FOR`]
/// (the resolution of a sample up to the target).
const POLL: Duration = Duration::from_millis(10);
/// How long a probe polls every [`POLL`]; after that every [`SLOW_POLL`],
/// so that probes whose dispatch is late do not add up to a load of their
/// own (20 probes/s waiting 30 s each, polling every 10 ms, would ask
/// 60,000 ListDispatches/s).
const FAST_POLLS_FOR: Duration = Duration::from_secs(1);
/// How often a probe polls once [`FAST_POLLS_FOR`] has passed.
const SLOW_POLL: Duration = Duration::from_millis(100);
/// The longest a probe waits for its dispatch to be released.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Background load before the first probe, so every consumer is live.
const WARM_UP: Duration = Duration::from_secs(5);
/// The feedback sweep's poll interval given to the server
/// (`CLM_FEEDBACK_SWEEP_MS`).
const SWEEP_MS: u64 = 50;
/// The pipeline counts as idle when no log cursor moved for this long.
const QUIET: Duration = Duration::from_secs(2);
/// The longest the benchmark waits for the pipeline to go idle.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);
/// Concurrent writers (and their database connections) seeding phase C.
const SEEDERS: usize = 16;
/// How far back the seeded responses go.
const SEEDED_SPAN: TimeDelta = TimeDelta::days(365);
/// Responses per transaction when phase C seeds its survey.
const SEED_BATCH: usize = 200;

/// One in this many phase B responses carries free text.
const TEXT_EVERY: usize = 4;
/// Short free-text answers, positive, negative and neutral.
const TEXTS: [&str; 4] = [
    "Great service, the team was quick and friendly.",
    "Delivery was late and support never answered my e-mails.",
    "It does what it says, nothing special.",
    "Love the new dashboard, so easy to use!",
];

/// The targets of the issue.
const DISPATCH_P99_TARGET: Duration = Duration::from_secs(1);
const RESPONSE_RATE_TARGET: f64 = 5_000.0;
const SUMMARY_P99_TARGET_MS: f64 = 20.0;

/// Arguments of `clm bench feedback`.
#[derive(Debug, Args)]
pub struct FeedbackBenchArgs {
    /// First page views of customers per second in phase A (each makes one
    /// transition into ACQUISITION).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    rate: u32,
    /// Seconds of each measurement: phase A's probes (after a 5 s warm-up),
    /// phase B's RecordResponse, RecordResponses and health Check each,
    /// phase C's two window
    /// kinds each.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Probes (first page views of customers, timed to their dispatch) per
    /// second in phase A.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    probes: u32,
    /// Concurrent RecordResponse (and health Check) clients in phase B.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: u32,
    /// Responses per RecordResponses batch in phase B.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(2..=1_000))]
    batch_size: u32,
    /// HTTP/2 connections the clients are spread over, round-robin.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=1_000))]
    channels: u32,
    /// Responses the phase C survey holds, submitted over the past year.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    responses: u32,
    /// Concurrent GetSurveySummary clients in phase C.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    summary_clients: u32,
    /// A PostgreSQL server on which the benchmark creates (and drops) a
    /// fresh database; the URL names the database to connect to for that.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    admin_database_url: String,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs the benchmark.
pub async fn run(args: FeedbackBenchArgs) -> anyhow::Result<()> {
    let database = TemporaryDatabase::create(&args.admin_database_url, "feedback").await?;
    let outcome = measure(&args, &database.url).await;
    let dropped = database.drop().await;
    let report = outcome?;
    dropped?;
    if args.json {
        println!("{}", report.to_json(&args));
    } else {
        print!("{}", report.to_text(&args));
    }
    Ok(())
}

fn progress(message: &str) {
    eprintln!("clm bench: {message}");
}

/// A splitmix64 step: the benchmark's deterministic randomness.
fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn by_id(customer_id: &str) -> Option<CustomerReference> {
    Some(CustomerReference {
        reference: Some(customer_reference::Reference::CustomerId(
            customer_id.to_owned(),
        )),
    })
}

/// A pricing-page view by the customer `customer_id`.
fn page_view(event_id: String, customer_id: &str) -> tp::Touchpoint {
    tp::Touchpoint {
        event_id,
        customer: by_id(customer_id),
        channel: tp::Channel::Web as i32,
        r#type: "page_view".to_owned(),
        properties: [("path".to_owned(), "/pricing".to_owned())].into(),
        ..Default::default()
    }
}

fn nps_questions() -> Vec<fb::Question> {
    vec![
        fb::Question {
            id: "recommend".into(),
            text: "How likely are you to recommend us?".into(),
            r#type: fb::QuestionType::Nps as i32,
            required: true,
            ..Default::default()
        },
        fb::Question {
            id: "why".into(),
            text: "Why?".into(),
            r#type: fb::QuestionType::FreeText as i32,
            ..Default::default()
        },
    ]
}

/// Phase B's RecordResponse number `number`: a fresh response id, an NPS
/// score and, for one in [`TEXT_EVERY`], a short text.
pub(super) fn response_request(
    survey_id: &str,
    customer_id: &str,
    run_id: &str,
    number: usize,
) -> fb::RecordResponseRequest {
    let random = mix(number as u64);
    let mut answers = vec![fb::Answer {
        question_id: "recommend".into(),
        value: Some(fb::answer::Value::Score((random % 11) as i32)),
        ..Default::default()
    }];
    if number.is_multiple_of(TEXT_EVERY) {
        answers.push(fb::Answer {
            question_id: "why".into(),
            value: Some(fb::answer::Value::Text(
                TEXTS[(random >> 8) as usize % TEXTS.len()].to_owned(),
            )),
            ..Default::default()
        });
    }
    fb::RecordResponseRequest {
        response: Some(fb::SurveyResponse {
            response_id: format!("{run_id}-response-{number}"),
            survey_id: survey_id.to_owned(),
            customer: by_id(customer_id),
            answers,
            ..Default::default()
        }),
    }
}

/// Phase C's GetSurveySummary number `number`: the default window when
/// `within` is `None`, else a window from and to arbitrary minutes inside
/// it.
pub(super) fn summary_request(
    survey_id: &str,
    within: Option<(DateTime<Utc>, DateTime<Utc>)>,
    number: usize,
) -> fb::GetSurveySummaryRequest {
    let Some((from, to)) = within else {
        return fb::GetSurveySummaryRequest {
            survey_id: survey_id.to_owned(),
            ..Default::default()
        };
    };
    let minutes = (to - from).num_minutes().max(2) as u64;
    let random = mix(number as u64 ^ 0x5eed);
    let start = random % (minutes - 1);
    let end = start + 1 + mix(random) % (minutes - start - 1).max(1);
    let at =
        |minute: u64| clm_platform::time::to_timestamp(from + TimeDelta::minutes(minute as i64));
    fb::GetSurveySummaryRequest {
        survey_id: survey_id.to_owned(),
        start_time: Some(at(start)),
        end_time: Some(at(end)),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// What phase A measured.
struct DispatchFigures {
    /// How long the probes were sent for.
    sent_for: Duration,
    /// Background touchpoints stored per second meanwhile.
    ingest_rate: f64,
    /// Transitions scoring logged per second meanwhile.
    transition_rate: f64,
    /// Dispatches of the survey the feedback service scheduled per second
    /// meanwhile.
    dispatch_rate: f64,
    /// Per probe that saw one: until the dispatch was listed at all.
    listed: Vec<Duration>,
    /// Per probe that saw one: until it was listed DISPATCHED.
    released: Vec<Duration>,
    /// Probes whose dispatch was not DISPATCHED within [`PROBE_TIMEOUT`].
    timed_out: usize,
    /// Probes whose touchpoint or polls failed, with the first error.
    failed: (usize, Option<String>),
    /// Every probe.
    probes: usize,
    /// The dispatches of the survey at the end, by state.
    states: Vec<(String, i64)>,
    /// Touchpoints stored during the whole phase (warm-up included).
    stored_total: u64,
}

/// What phase C's seeding did.
struct Seeding {
    stored: u64,
    failed: (u64, Option<String>),
    elapsed: Duration,
    /// Rollup periods folded into one row each after seeding, and how long
    /// that took.
    folded: (usize, Duration),
}

struct FeedbackReport {
    dispatch: DispatchFigures,
    responses: PhaseMeasurement,
    batches: PhaseMeasurement,
    health: PhaseMeasurement,
    response_customers: usize,
    seeding: Seeding,
    random_windows: PhaseMeasurement,
    whole_survey: PhaseMeasurement,
    summary_count: i64,
    summary_nps: f64,
    notes: Vec<String>,
}

async fn measure(args: &FeedbackBenchArgs, database_url: &str) -> anyhow::Result<FeedbackReport> {
    let run_id = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let data_dir = tempfile::tempdir()?;
    let mut spec = ServerSpec::this_binary(data_dir.path(), database_url, &[])?;
    spec.env
        .push(("CLM_FEEDBACK_SWEEP_MS".to_owned(), SWEEP_MS.to_string()));
    progress("starting every service (clm serve) on a fresh PostgreSQL database");
    let mut server = ServerProcess::start("all", &spec).await?;
    let address = server.address().to_string();
    let channels = load::connect_channels(&address, args.channels as usize).await?;
    let mut notes = Vec::new();

    // A. Transition -> dispatch, for customers created beforehand: a page
    // view each during the warm-up and the measurement, a few seconds'
    // worth to spare.
    let background_count =
        ((u64::from(args.rate) * (WARM_UP.as_secs() + args.seconds + 5)) as usize).max(1_000);
    let probe_count = (u64::from(args.probes) * args.seconds) as usize;
    progress(&format!(
        "phase A: creating {background_count} background and {probe_count} probe customers"
    ));
    let seeded =
        load::seed_customers(&channels, 32, background_count + probe_count, &run_id).await?;
    anyhow::ensure!(
        seeded.errors.total() == 0,
        "creating customers failed: {:?}",
        seeded.errors.by_code
    );
    let mut customer_ids = seeded.customer_ids;
    let probe_customers: Arc<[String]> = customer_ids.split_off(background_count).into();
    let background_customers: Arc<[String]> = customer_ids.into();
    settle(database_url, "creating the customers", &mut notes).await?;
    let mut surveys = SurveyServiceClient::new(channels[0].clone());
    let survey = surveys
        .create_survey(fb::CreateSurveyRequest {
            survey: Some(fb::Survey {
                display_name: "Bench: welcome".into(),
                kind: fb::SurveyKind::Nps as i32,
                questions: nps_questions(),
                triggers: vec![fb::Trigger {
                    name: "reached".into(),
                    source: fb::TriggerSource::Transition as i32,
                    condition: "event.to_stage == 'ACQUISITION'".into(),
                    delay: None,
                }],
                fatigue: Some(fb::FatiguePolicy {
                    // "0s": no limit.
                    min_interval: Some(Default::default()),
                    repeat_interval: Some(Default::default()),
                }),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .context("CreateSurvey failed")?
        .into_inner()
        .survey
        .context("CreateSurvey returned no survey")?;
    let dispatch = measure_dispatch(
        args,
        &channels,
        database_url,
        &survey.id,
        &run_id,
        (background_customers.clone(), probe_customers),
    )
    .await?;
    server.ensure_running("phase A")?;
    settle(database_url, "phase A", &mut notes).await?;

    // B. RecordResponse next to the health Check.
    let response_customers = background_customers;
    progress(&format!(
        "phase B: RecordResponse, RecordResponses of {} and the health Check, {} clients over {} connections, {} s each, alternating every {} s",
        args.batch_size,
        args.concurrency,
        args.channels,
        args.seconds,
        load::ALTERNATION_SLICE.as_secs()
    ));
    let record = Workload::RecordResponse {
        survey_id: survey.id.as_str().into(),
        customer_ids: response_customers.clone(),
        run_id: run_id.as_str().into(),
        next_response: Arc::new(AtomicUsize::new(0)),
        batch: 1,
    };
    let record_batches = Workload::RecordResponse {
        survey_id: survey.id.as_str().into(),
        customer_ids: response_customers.clone(),
        run_id: format!("{run_id}-batch").into(),
        next_response: Arc::new(AtomicUsize::new(0)),
        batch: args.batch_size as usize,
    };
    let [responses, batches, health] = load::measure_alternating(
        &channels,
        args.concurrency as usize,
        Duration::from_secs(args.seconds),
        [&record, &record_batches, &Workload::HealthCheck],
    )
    .await?;
    server.ensure_running("phase B")?;
    settle(database_url, "phase B", &mut notes).await?;

    // C. GetSurveySummary over a year of responses.
    let now = Utc::now();
    let year_start = now - SEEDED_SPAN;
    let (survey_c, seeding) = seed_year(
        args,
        database_url,
        &response_customers,
        year_start,
        now,
        &run_id,
    )
    .await?;
    server.ensure_running("seeding phase C")?;
    {
        let mut connection = sqlx::PgConnection::connect(database_url).await?;
        sqlx::query("VACUUM (ANALYZE) feedback.responses, feedback.survey_rollups")
            .execute(&mut connection)
            .await?;
    }
    notes.push(format!(
        "phase C folded the rollup slots of {} closed periods in {:.1} s and ran VACUUM (ANALYZE) \
         on feedback.responses and feedback.survey_rollups after seeding, as the service's \
         compaction (every {} s) and autovacuum would have by then on a survey a year old",
        seeding.folded.0,
        seeding.folded.1.as_secs_f64(),
        clm_feedback::compaction::EVERY.as_secs()
    ));
    settle(database_url, "seeding phase C", &mut notes).await?;
    let whole = SurveyServiceClient::new(channels[0].clone())
        .get_survey_summary(summary_request(&survey_c, None, 0))
        .await
        .context("GetSurveySummary failed")?
        .into_inner();
    if whole.response_count != seeding.stored as i64 {
        notes.push(format!(
            "the whole-survey summary counts {} responses, {} were seeded",
            whole.response_count, seeding.stored
        ));
    }
    progress(&format!(
        "phase C: GetSurveySummary over {} responses, {} clients, random windows and the whole survey, {} s each, alternating every {} s",
        whole.response_count,
        args.summary_clients,
        args.seconds,
        load::ALTERNATION_SLICE.as_secs()
    ));
    let survey_c: Arc<str> = survey_c.as_str().into();
    let random = Workload::SurveySummary {
        survey_id: survey_c.clone(),
        within: Some((year_start, now)),
        next_request: Arc::new(AtomicUsize::new(1)),
    };
    let default_window = Workload::SurveySummary {
        survey_id: survey_c,
        within: None,
        next_request: Arc::new(AtomicUsize::new(0)),
    };
    let [random_windows, whole_survey] = load::measure_alternating(
        &channels,
        args.summary_clients as usize,
        Duration::from_secs(args.seconds),
        [&random, &default_window],
    )
    .await?;
    server.ensure_running("phase C")?;
    drop(channels);
    server.stop().await?;
    Ok(FeedbackReport {
        dispatch,
        responses,
        batches,
        health,
        response_customers: response_customers.len(),
        seeding,
        random_windows,
        whole_survey,
        summary_count: whole.response_count,
        summary_nps: whole.nps.map_or(0.0, |nps| nps.score),
        notes,
    })
}

/// Sends background batches of page views, one per customer of
/// `customers` in turn, paced to `rate` per second until `stop` (or until
/// every customer had one); counts the touchpoints stored in `stored`.
async fn background(
    channel: Channel,
    rate: u32,
    run_id: String,
    customers: Arc<[String]>,
    stored: Arc<AtomicU64>,
    stop: Arc<tokio::sync::Notify>,
) -> anyhow::Result<()> {
    if rate == 0 {
        stop.notified().await;
        return Ok(());
    }
    let interval = Duration::from_secs_f64(BATCH as f64 / f64::from(rate));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let in_flight = Arc::new(Semaphore::new(32));
    let stopped = stop.notified();
    tokio::pin!(stopped);
    for (batch_index, batch) in customers.chunks(BATCH).enumerate() {
        tokio::select! {
            () = &mut stopped => return Ok(()),
            _ = ticker.tick() => {}
        }
        let permit = in_flight.clone().acquire_owned().await?;
        let mut client = TouchpointServiceClient::new(channel.clone());
        let touchpoints = batch
            .iter()
            .enumerate()
            .map(|(n, customer_id)| {
                page_view(
                    format!("{run_id}-bg-{}", batch_index * BATCH + n),
                    customer_id,
                )
            })
            .collect();
        let stored = stored.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match client
                .record_touchpoints(tp::RecordTouchpointsRequest { touchpoints })
                .await
            {
                Ok(response) => {
                    stored.fetch_add(response.into_inner().stored_count as u64, Ordering::Relaxed);
                }
                Err(status) => tracing::warn!(error = %status, "a background batch failed"),
            }
        });
    }
    tracing::warn!("phase A ran out of background customers");
    stopped.await;
    Ok(())
}

/// What one probe saw: until listed, until DISPATCHED (`None`: not within
/// [`PROBE_TIMEOUT`]).
type ProbeOutcome = (Option<Duration>, Option<Duration>);

/// Records the first page view of `customer_id` and polls ListDispatches
/// until that customer's dispatch of `survey_id` is DISPATCHED.
async fn probe(
    channel: Channel,
    survey_id: String,
    run_id: String,
    index: usize,
    customer_id: String,
) -> anyhow::Result<ProbeOutcome> {
    let mut touchpoints = TouchpointServiceClient::new(channel.clone());
    let mut surveys = SurveyServiceClient::new(channel);
    let customer_id = touchpoints
        .record_touchpoint(tp::RecordTouchpointRequest {
            touchpoint: Some(page_view(format!("{run_id}-probe-{index}"), &customer_id)),
        })
        .await
        .context("the probe's RecordTouchpoint failed")?
        .into_inner()
        .touchpoint
        .map(|touchpoint| touchpoint.customer_id)
        .unwrap_or_default();
    anyhow::ensure!(
        !customer_id.is_empty(),
        "RecordTouchpoint returned no customer"
    );
    let returned = Instant::now();
    let mut listed = None;
    loop {
        let dispatches = surveys
            .list_dispatches(fb::ListDispatchesRequest {
                page_size: 10,
                page_token: String::new(),
                filter: Some(fb::DispatchFilter {
                    survey_id: survey_id.clone(),
                    customer_id: customer_id.clone(),
                    ..Default::default()
                }),
            })
            .await
            .context("ListDispatches failed")?
            .into_inner()
            .dispatches;
        let seen = returned.elapsed();
        if !dispatches.is_empty() && listed.is_none() {
            listed = Some(seen);
        }
        if dispatches
            .iter()
            .any(|d| d.state == fb::DispatchState::Dispatched as i32)
        {
            return Ok((listed, Some(seen)));
        }
        if seen >= PROBE_TIMEOUT {
            return Ok((listed, None));
        }
        tokio::time::sleep(if seen < FAST_POLLS_FOR {
            POLL
        } else {
            SLOW_POLL
        })
        .await;
    }
}

/// Phase A, with page views of `customers` (background, probes).
async fn measure_dispatch(
    args: &FeedbackBenchArgs,
    channels: &[Channel],
    database_url: &str,
    survey_id: &str,
    run_id: &str,
    (background_customers, probe_customers): (Arc<[String]>, Arc<[String]>),
) -> anyhow::Result<DispatchFigures> {
    let stored = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let load = tokio::spawn(background(
        channels[0].clone(),
        args.rate,
        run_id.to_owned(),
        background_customers,
        stored.clone(),
        stop.clone(),
    ));
    progress(&format!(
        "phase A: warming up for {} s at {} first page views/s",
        WARM_UP.as_secs(),
        args.rate
    ));
    tokio::time::sleep(WARM_UP).await;
    progress(&format!(
        "phase A: measuring for {} s, {} probes/s",
        args.seconds, args.probes
    ));
    let stored_before = stored.load(Ordering::Relaxed);
    let window_start = Utc::now();
    let measuring = Instant::now();
    let probes_total = (u64::from(args.probes) * args.seconds) as usize;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.probes)));
    let mut probes = Vec::with_capacity(probes_total);
    for index in 0..probes_total {
        ticker.tick().await;
        probes.push(tokio::spawn(probe(
            channels[1 + index % (channels.len() - 1)].clone(),
            survey_id.to_owned(),
            run_id.to_owned(),
            index,
            probe_customers[index % probe_customers.len()].clone(),
        )));
    }
    let sent_for = measuring.elapsed();
    let window_end = Utc::now();
    let stored_during = stored.load(Ordering::Relaxed) - stored_before;
    let mut listed = Vec::new();
    let mut released = Vec::new();
    let (mut timed_out, mut failed, mut first_failure) = (0, 0, None);
    for probe in probes {
        match probe.await.context("a probe panicked")? {
            Ok((seen, dispatched)) => {
                listed.extend(seen);
                match dispatched {
                    Some(latency) => released.push(latency),
                    None => timed_out += 1,
                }
            }
            Err(err) => {
                failed += 1;
                first_failure.get_or_insert_with(|| format!("{err:#}"));
            }
        }
    }
    stop.notify_one();
    load.await.context("the load generator panicked")??;
    listed.sort();
    released.sort();
    let window = (window_end - window_start)
        .to_std()
        .unwrap_or(sent_for)
        .as_secs_f64();
    let mut connection = sqlx::PgConnection::connect(database_url).await?;
    let transitions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM scoring.transition_log \
         WHERE kind = 'lifecycle.transition' AND recorded_at >= $1 AND recorded_at < $2",
    )
    .bind(window_start)
    .bind(window_end)
    .fetch_one(&mut connection)
    .await?;
    let survey_uuid: uuid::Uuid = survey_id.parse()?;
    let scheduled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM feedback.dispatches \
         WHERE survey_id = $1 AND created_at >= $2 AND created_at < $3",
    )
    .bind(survey_uuid)
    .bind(window_start)
    .bind(window_end)
    .fetch_one(&mut connection)
    .await?;
    let states: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM feedback.dispatches WHERE survey_id = $1 \
         GROUP BY state ORDER BY state",
    )
    .bind(survey_uuid)
    .fetch_all(&mut connection)
    .await?;
    Ok(DispatchFigures {
        sent_for,
        ingest_rate: stored_during as f64 / sent_for.as_secs_f64(),
        transition_rate: transitions as f64 / window,
        dispatch_rate: scheduled as f64 / window,
        listed,
        released,
        timed_out,
        failed: (failed, first_failure),
        probes: probes_total,
        states,
        stored_total: stored.load(Ordering::Relaxed),
    })
}

/// Waits until no log consumer of any service has moved its cursor for
/// [`QUIET`], at most [`SETTLE_LIMIT`]; notes how long that took.
async fn settle(database_url: &str, after: &str, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let mut connection = sqlx::PgConnection::connect(database_url).await?;
    let schemas: Vec<String> = sqlx::query_scalar(
        "SELECT table_schema::text FROM information_schema.tables \
         WHERE table_name = 'log_cursors' ORDER BY 1",
    )
    .fetch_all(&mut connection)
    .await?;
    if schemas.is_empty() {
        return Ok(());
    }
    let moved = schemas
        .iter()
        .map(|schema| format!("SELECT max(updated_at) AS at FROM \"{schema}\".log_cursors"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let query = format!(
        "SELECT COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - max(at)), 1e9)::float8 FROM ({moved}) m"
    );
    progress(&format!(
        "waiting until the log consumers are idle after {after}"
    ));
    let started = Instant::now();
    loop {
        let quiet_for: f64 = sqlx::query_scalar(&query)
            .fetch_one(&mut connection)
            .await?;
        if quiet_for >= QUIET.as_secs_f64() {
            break;
        }
        if started.elapsed() >= SETTLE_LIMIT {
            notes.push(format!(
                "the log consumers were still busy {} s after {after}; the next phase ran anyway",
                SETTLE_LIMIT.as_secs()
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if started.elapsed() > QUIET * 2 {
        notes.push(format!(
            "the log consumers took {:.0} s to go idle after {after}",
            started.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

/// Creates phase C's survey (a year old) through the feedback store and
/// stores `--responses` responses submitted over the year from
/// `year_start` to `now`. Returns the survey's id.
async fn seed_year(
    args: &FeedbackBenchArgs,
    database_url: &str,
    customer_ids: &[String],
    year_start: DateTime<Utc>,
    now: DateTime<Utc>,
    run_id: &str,
) -> anyhow::Result<(String, Seeding)> {
    let pools = clm_platform::db::connect(&Secret::new(database_url), "feedback", SEEDERS as u32)
        .await
        .context("cannot open the feedback database")?;
    let store = clm_feedback::store::open(pools);
    let questions = vec![
        Question {
            id: "recommend".into(),
            text: "How likely are you to recommend us?".into(),
            kind: QuestionType::Nps,
            required: true,
        },
        Question {
            id: "why".into(),
            text: "Why?".into(),
            kind: QuestionType::FreeText,
            required: false,
        },
    ];
    let created_at = year_start - TimeDelta::minutes(90);
    let survey = Survey {
        id: uuid::Uuid::now_v7(),
        kind: SurveyKind::Nps,
        definition: SurveyDefinition {
            display_name: "Bench: relationship NPS".into(),
            description: "A year of responses".into(),
            questions: questions.clone(),
            triggers: Vec::new(),
            fatigue: FatiguePolicy::default(),
            response_window: clm_feedback::model::DEFAULT_RESPONSE_WINDOW,
            consent_purpose: None,
            sampling_percent: 100,
        },
        state: SurveyState::Active,
        version: 1,
        questions_version: 1,
        created_at,
        updated_at: created_at,
        archived_at: None,
    };
    store
        .create_survey(&survey, None)
        .await
        .context("cannot create the phase C survey")?;
    let customers: Arc<[uuid::Uuid]> = customer_ids
        .iter()
        .filter_map(|id| id.parse().ok())
        .collect::<Vec<_>>()
        .into();
    anyhow::ensure!(!customers.is_empty(), "no customer to seed responses for");
    let sentiments: Arc<[Sentiment]> = TEXTS
        .iter()
        .map(|text| clm_feedback::sentiment::analyse(text))
        .collect::<Vec<_>>()
        .into();
    let total = args.responses as usize;
    let span_micros = (now - year_start - TimeDelta::minutes(1))
        .num_microseconds()
        .unwrap_or(i64::MAX) as u64;
    progress(&format!(
        "phase C: seeding {total} responses over {} days with {SEEDERS} writers through the feedback store",
        SEEDED_SPAN.num_days()
    ));
    let next = Arc::new(AtomicUsize::new(0));
    let stored = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let reporter = {
        let stored = stored.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(10));
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let done = stored.load(Ordering::Relaxed);
                progress(&format!(
                    "seeded {done} of {total} responses ({:.0}/s)",
                    done as f64 / started.elapsed().as_secs_f64()
                ));
            }
        })
    };
    let mut writers = Vec::with_capacity(SEEDERS);
    for _ in 0..SEEDERS {
        let (store, next, stored) = (store.clone(), next.clone(), stored.clone());
        let (customers, sentiments, questions) =
            (customers.clone(), sentiments.clone(), questions.clone());
        let (survey_id, run_id) = (survey.id, run_id.to_owned());
        writers.push(tokio::spawn(async move {
            let (mut failed, mut first) = (0_u64, None);
            loop {
                let from = next.fetch_add(SEED_BATCH, Ordering::Relaxed);
                if from >= total {
                    break;
                }
                let batch: Vec<NewResponse> = (from..(from + SEED_BATCH).min(total))
                    .map(|number| {
                        let random = mix(number as u64 ^ 0xc0ffee);
                        let mut answers = vec![Answer {
                            question_id: "recommend".into(),
                            value: AnswerValue::Score((random % 11) as i32),
                            sentiment: None,
                        }];
                        let mut sentiment = None;
                        if number.is_multiple_of(TEXT_EVERY) {
                            let text = (random >> 8) as usize % TEXTS.len();
                            sentiment = Some(sentiments[text]);
                            answers.push(Answer {
                                question_id: "why".into(),
                                value: AnswerValue::Text(Some(TEXTS[text].to_owned())),
                                sentiment,
                            });
                        }
                        let offset = mix(random) % span_micros;
                        let response = Response {
                            id: uuid::Uuid::now_v7(),
                            response_id: format!("{run_id}-seed-{number}"),
                            survey_id,
                            survey_version: 1,
                            dispatch_id: None,
                            customer_id: customers[(random >> 16) as usize % customers.len()],
                            answers,
                            submitted_at: year_start + TimeDelta::microseconds(offset as i64),
                            sentiment,
                            recorded_at: Utc::now(),
                        };
                        NewResponse {
                            tally: Tally::of_response(&response, &questions),
                            response,
                            log: Vec::new(),
                        }
                    })
                    .collect();
                match store.record_responses(&batch).await {
                    Ok(recorded) => {
                        for outcome in recorded {
                            if matches!(outcome, Recorded::New(_)) {
                                stored.fetch_add(1, Ordering::Relaxed);
                            } else {
                                failed += 1;
                                first.get_or_insert_with(|| format!("not stored: {outcome:?}"));
                            }
                        }
                    }
                    Err(err) => {
                        failed += batch.len() as u64;
                        first.get_or_insert_with(|| err.to_string());
                    }
                }
            }
            (failed, first)
        }));
    }
    let mut failed = (0, None);
    for writer in writers {
        let (count, first) = writer.await.context("a seeding writer panicked")?;
        failed.0 += count;
        if failed.1.is_none() {
            failed.1 = first;
        }
    }
    reporter.abort();
    let elapsed = started.elapsed();
    progress(&format!(
        "seeded {} responses in {:.0} s ({:.0}/s)",
        stored.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        stored.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
    ));
    // The service folds the slots of closed periods every minute; a year
    // of them is folded here at once, as it would have been by now.
    let folding = Instant::now();
    let folded = clm_feedback::compaction::compact_all(
        store.as_ref(),
        Utc::now() - clm_feedback::compaction::MARGIN,
    )
    .await
    .context("cannot fold the rollups of phase C")?;
    let seeding = Seeding {
        stored: stored.load(Ordering::Relaxed),
        failed,
        elapsed,
        folded: (folded, folding.elapsed()),
    };
    anyhow::ensure!(
        seeding.stored > 0,
        "no response could be seeded: {}",
        seeding.failed.1.clone().unwrap_or_default()
    );
    Ok((survey.id.to_string(), seeding))
}

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "NOT MET" }
}

fn format_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.3}"))
}

fn errors_text(measured: &PhaseMeasurement) -> String {
    measured
        .errors
        .by_code
        .iter()
        .map(|(code, (count, first))| format!("{count} x {code} (first: {first})"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn phase_json(measured: &PhaseMeasurement) -> Value {
    json!({
        "requests": measured.requests,
        "errors": measured.errors.total(),
        "seconds": measured.elapsed.as_secs_f64(),
        "requests_per_second": measured.requests_per_second(),
        "p50_ms": measured.percentile_ms(50.0),
        "p90_ms": measured.percentile_ms(90.0),
        "p99_ms": measured.percentile_ms(99.0),
        "max_ms": measured.percentile_ms(100.0),
    })
}

impl FeedbackReport {
    fn dispatch_met(&self, args: &FeedbackBenchArgs) -> bool {
        let d = &self.dispatch;
        d.timed_out == 0
            && d.failed.0 == 0
            && !d.released.is_empty()
            && percentile(&d.released, 99.0) <= DISPATCH_P99_TARGET
            && d.transition_rate >= f64::from(args.rate) * 0.95
    }

    fn response_ratio(&self) -> Option<f64> {
        let health = self.health.requests_per_second();
        (health > 0.0).then(|| self.responses.requests_per_second() / health)
    }

    /// Responses per second stored by the RecordResponses batches.
    fn batched_response_rate(&self, args: &FeedbackBenchArgs) -> f64 {
        self.batches.requests_per_second() * f64::from(args.batch_size)
    }

    /// The better of the two ways in: the target allows batches or
    /// concurrent calls.
    fn response_rate(&self, args: &FeedbackBenchArgs) -> f64 {
        self.responses
            .requests_per_second()
            .max(self.batched_response_rate(args))
    }

    fn response_met(&self, args: &FeedbackBenchArgs) -> bool {
        self.responses.errors.total() == 0
            && self.batches.errors.total() == 0
            && self.response_rate(args) >= RESPONSE_RATE_TARGET
    }

    fn summary_met(&self) -> bool {
        [&self.random_windows, &self.whole_survey].iter().all(|m| {
            m.errors.total() == 0
                && m.percentile_ms(99.0)
                    .is_some_and(|p99| p99 <= SUMMARY_P99_TARGET_MS)
        })
    }

    fn to_text(&self, args: &FeedbackBenchArgs) -> String {
        use std::fmt::Write as _;
        let mut text = String::new();
        let d = &self.dispatch;
        let _ = writeln!(
            text,
            "clm bench feedback: every service in one `clm serve` on a fresh PostgreSQL database, this machine; feedback sweep every {SWEEP_MS} ms"
        );
        let _ = writeln!(
            text,
            "A. transition -> dispatch, zero delay: {} customers/s (created beforehand; their first page view each, a transition into ACQUISITION each), {} probes/s for {:.1} s, each polling ListDispatches every 10 ms (100 ms after the first second)",
            args.rate,
            args.probes,
            d.sent_for.as_secs_f64()
        );
        let _ = writeln!(
            text,
            "   ingest {:.0} touchpoints/s; scoring logged {:.0} transitions/s; feedback scheduled {:.0} dispatches/s of the survey",
            d.ingest_rate, d.transition_rate, d.dispatch_rate
        );
        let line = |label: &str, sorted: &[Duration]| {
            format!(
                "   {label}: {} probes, p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                sorted.len(),
                ms(percentile(sorted, 50.0)),
                ms(percentile(sorted, 90.0)),
                ms(percentile(sorted, 99.0)),
                ms(sorted.last().copied().unwrap_or_default()),
            )
        };
        let _ = writeln!(
            text,
            "{}",
            line(
                "RecordTouchpoint returned -> listed by ListDispatches (any state)",
                &d.listed
            )
        );
        let _ = writeln!(
            text,
            "{}",
            line(
                "RecordTouchpoint returned -> listed DISPATCHED",
                &d.released
            )
        );
        let _ = writeln!(
            text,
            "   {} of {} probes not DISPATCHED within {} s, {} failed{}",
            d.timed_out,
            d.probes,
            PROBE_TIMEOUT.as_secs(),
            d.failed.0,
            d.failed
                .1
                .as_ref()
                .map_or_else(String::new, |first| format!(" (first: {first})"))
        );
        let _ = writeln!(
            text,
            "   dispatches of the survey at the end: {} (for {} touchpoints stored in all)",
            d.states
                .iter()
                .map(|(state, count)| format!("{count} {state}"))
                .collect::<Vec<_>>()
                .join(", "),
            d.stored_total + d.probes as u64
        );
        let _ = writeln!(
            text,
            "   target p99 <= 1000 ms (DISPATCHED) at {} transitions/s: {}",
            args.rate,
            verdict(self.dispatch_met(args))
        );
        let _ = writeln!(
            text,
            "B. RecordResponse unary and RecordResponses in batches of {} (fresh response ids, an NPS score, free text in 1 of {TEXT_EVERY}, {} customers by id), {} clients over {} connections, alternating with the health Check every {} s, {} s each",
            args.batch_size,
            self.response_customers,
            args.concurrency,
            args.channels,
            load::ALTERNATION_SLICE.as_secs(),
            args.seconds
        );
        let _ = writeln!(
            text,
            "   {:<26}  {:>9}  {:>6}  {:>9}  {:>11}  {:>8}  {:>8}  {:>8}",
            "phase", "requests", "errors", "req/s", "responses/s", "p50 ms", "p99 ms", "x health"
        );
        let batch_label = format!("RecordResponses ({})", args.batch_size);
        for (label, measured, per_call, ratio) in [
            (
                "RecordResponse",
                &self.responses,
                Some(1.0),
                self.response_ratio(),
            ),
            (
                batch_label.as_str(),
                &self.batches,
                Some(f64::from(args.batch_size)),
                None,
            ),
            ("health Check (baseline)", &self.health, None, None),
        ] {
            let _ = writeln!(
                text,
                "   {:<26}  {:>9}  {:>6}  {:>9.0}  {:>11}  {:>8}  {:>8}  {:>8}",
                label,
                measured.requests,
                measured.errors.total(),
                measured.requests_per_second(),
                per_call.map_or_else(
                    || "-".to_owned(),
                    |per_call| format!("{:.0}", measured.requests_per_second() * per_call)
                ),
                format_ms(measured.percentile_ms(50.0)),
                format_ms(measured.percentile_ms(99.0)),
                ratio.map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.2}")),
            );
            if measured.errors.total() > 0 {
                let _ = writeln!(text, "   errors in {label}: {}", errors_text(measured));
            }
        }
        let _ = writeln!(
            text,
            "   target >= 5,000 responses/s (batches or concurrent calls): {:.0}/s: {}",
            self.response_rate(args),
            verdict(self.response_met(args))
        );
        let s = &self.seeding;
        let _ = writeln!(
            text,
            "C. GetSurveySummary of a survey with {} responses over {} days (seeded through the feedback store by {SEEDERS} writers: {} in {:.0} s, {:.0}/s{}); the whole survey counts {} responses, NPS {:.1}; {} clients, alternating every {} s, {} s each",
            s.stored,
            SEEDED_SPAN.num_days(),
            s.stored,
            s.elapsed.as_secs_f64(),
            s.stored as f64 / s.elapsed.as_secs_f64(),
            if s.failed.0 > 0 {
                format!(
                    ", {} failed: {}",
                    s.failed.0,
                    s.failed.1.clone().unwrap_or_default()
                )
            } else {
                String::new()
            },
            self.summary_count,
            self.summary_nps,
            args.summary_clients,
            load::ALTERNATION_SLICE.as_secs(),
            args.seconds
        );
        let _ = writeln!(
            text,
            "   {:<36}  {:>9}  {:>6}  {:>7}  {:>8}  {:>8}  {:>8}  {:>8}",
            "window", "requests", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        for (label, measured) in [
            (
                "random (arbitrary minutes in the year)",
                &self.random_windows,
            ),
            ("default (the whole survey)", &self.whole_survey),
        ] {
            let _ = writeln!(
                text,
                "   {:<36}  {:>9}  {:>6}  {:>7.0}  {:>8}  {:>8}  {:>8}  {:>8}",
                label,
                measured.requests,
                measured.errors.total(),
                measured.requests_per_second(),
                format_ms(measured.percentile_ms(50.0)),
                format_ms(measured.percentile_ms(90.0)),
                format_ms(measured.percentile_ms(99.0)),
                format_ms(measured.percentile_ms(100.0)),
            );
            if measured.errors.total() > 0 {
                let _ = writeln!(text, "   errors in {label}: {}", errors_text(measured));
            }
        }
        let _ = writeln!(
            text,
            "   target p99 <= 20 ms over {} responses: {}",
            self.summary_count,
            verdict(self.summary_met())
        );
        for note in &self.notes {
            let _ = writeln!(text, "note: {note}");
        }
        text
    }

    fn to_json(&self, args: &FeedbackBenchArgs) -> Value {
        let d = &self.dispatch;
        let latencies = |sorted: &[Duration]| {
            json!({
                "probes": sorted.len(),
                "p50_ms": ms(percentile(sorted, 50.0)),
                "p90_ms": ms(percentile(sorted, 90.0)),
                "p99_ms": ms(percentile(sorted, 99.0)),
                "max_ms": ms(sorted.last().copied().unwrap_or_default()),
            })
        };
        json!({
            "setup": {
                "rate": args.rate,
                "seconds": args.seconds,
                "probes_per_second": args.probes,
                "concurrency": args.concurrency,
                "channels": args.channels,
                "responses": args.responses,
                "summary_clients": args.summary_clients,
                "sweep_ms": SWEEP_MS,
            },
            "dispatch": {
                "seconds": d.sent_for.as_secs_f64(),
                "ingest_rate": d.ingest_rate,
                "transition_rate": d.transition_rate,
                "dispatch_rate": d.dispatch_rate,
                "listed": latencies(&d.listed),
                "dispatched": latencies(&d.released),
                "probes": d.probes,
                "timed_out": d.timed_out,
                "failed": d.failed.0,
                "states": d.states.iter().map(|(state, count)| (state.clone(), json!(count))).collect::<serde_json::Map<_, _>>(),
                "target_met": self.dispatch_met(args),
            },
            "record_response": {
                "responses": phase_json(&self.responses),
                "batches": phase_json(&self.batches),
                "batch_size": args.batch_size,
                "batched_responses_per_second": self.batched_response_rate(args),
                "health": phase_json(&self.health),
                "ratio_to_health": self.response_ratio(),
                "target_met": self.response_met(args),
            },
            "summary": {
                "seeded": self.seeding.stored,
                "seed_seconds": self.seeding.elapsed.as_secs_f64(),
                "seed_failed": self.seeding.failed.0,
                "folded_periods": self.seeding.folded.0,
                "fold_seconds": self.seeding.folded.1.as_secs_f64(),
                "response_count": self.summary_count,
                "random_windows": phase_json(&self.random_windows),
                "whole_survey": phase_json(&self.whole_survey),
                "target_met": self.summary_met(),
            },
            "notes": self.notes,
        })
    }
}
