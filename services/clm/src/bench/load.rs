//! Drives load at a server: opens the HTTP/2 connections, runs concurrent
//! clients for a bounded time (or until their ids run out) and measures
//! every request with a monotonic clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clm_proto::feedback::RecordResponsesRequest;
use clm_proto::feedback::survey_service_client::SurveyServiceClient;
use clm_proto::identity::customer_service_client::CustomerServiceClient;
use clm_proto::identity::{CreateCustomerRequest, Customer, GetCustomerRequest};
use clm_proto::touchpoint::RecordTouchpointRequest;
use clm_proto::touchpoint::touchpoint_service_client::TouchpointServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long one request may take before it counts as an error; keeps every
/// phase bounded even when the server stops answering.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long each slice of two alternating phases lasts.
pub const ALTERNATION_SLICE: Duration = Duration::from_secs(1);

/// Opens `count` separate HTTP/2 connections to `address` (`host:port`).
pub async fn connect_channels(address: &str, count: usize) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .context("invalid server address")?
        .connect_timeout(Duration::from_secs(5))
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        // Each `connect` opens its own connection; clones of one channel
        // would share a single one.
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {address}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Asks grpc.health.v1 whether the whole server ("") is SERVING.
pub async fn is_serving(channel: Channel) -> Result<bool, tonic::Status> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status == ServingStatus::Serving as i32)
}

/// What the clients of one phase send.
#[derive(Clone)]
pub enum Workload {
    /// grpc.health.v1 Check for "": the no-op through the same middleware.
    HealthCheck,
    /// GetCustomer of every id once, in order, shared by all clients: each
    /// request is the first read of its id. Ends when the ids run out.
    ReadEachOnce {
        /// The customers to read.
        customer_ids: Arc<[String]>,
        /// The next index to read, shared by the clients.
        next_index: Arc<AtomicUsize>,
    },
    /// GetCustomer of the same ids over and over.
    ReadRepeatedly {
        /// The hot customers.
        customer_ids: Arc<[String]>,
    },
    /// RecordTouchpoint of a new touchpoint each time, for the customers in
    /// turn.
    RecordTouchpoint {
        /// The customers the touchpoints are about.
        customer_ids: Arc<[String]>,
        /// Makes the event ids of this run unique.
        run_id: Arc<str>,
        /// The next event number, shared by the clients.
        next_event: Arc<AtomicUsize>,
    },
    /// RecordResponse of a new response each time (a fresh response id),
    /// for the customers in turn.
    RecordResponse {
        /// The survey answered.
        survey_id: Arc<str>,
        /// The customers who respond.
        customer_ids: Arc<[String]>,
        /// Makes the response ids of this run unique.
        run_id: Arc<str>,
        /// The next response number, shared by the clients.
        next_response: Arc<AtomicUsize>,
        /// Responses per call: 1 sends RecordResponse, more send
        /// RecordResponses batches of this many.
        batch: usize,
    },
    /// GetSurveySummary of one survey: over random windows inside
    /// `within`, or over the default window (the whole survey) when `None`.
    SurveySummary {
        /// The survey.
        survey_id: Arc<str>,
        /// Where the random windows lie.
        within: Option<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)>,
        /// The next request number, shared by the clients (seeds the
        /// window).
        next_request: Arc<AtomicUsize>,
    },
}

impl Workload {
    /// Reads each of `customer_ids` once.
    pub fn read_each_once(customer_ids: Arc<[String]>) -> Self {
        Self::ReadEachOnce {
            customer_ids,
            next_index: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// How many ids a read-each-once workload has handed out (capped at its
    /// length); 0 for the others.
    pub fn ids_consumed(&self) -> usize {
        match self {
            Self::ReadEachOnce {
                customer_ids,
                next_index,
            } => next_index.load(Ordering::Relaxed).min(customer_ids.len()),
            _ => 0,
        }
    }
}

/// The errors of a phase, by gRPC code.
#[derive(Debug, Default, Clone)]
pub struct ErrorTally {
    /// Per code name: how many, and the first message seen.
    pub by_code: BTreeMap<String, (u64, String)>,
}

impl ErrorTally {
    fn record(&mut self, status: &tonic::Status) {
        let entry = self
            .by_code
            .entry(format!("{:?}", status.code()))
            .or_insert_with(|| (0, status.message().to_owned()));
        entry.0 += 1;
    }

    fn merge(&mut self, other: Self) {
        for (code, (count, message)) in other.by_code {
            self.by_code.entry(code).or_insert((0, message)).0 += count;
        }
    }

    /// All errors of every code.
    pub fn total(&self) -> u64 {
        self.by_code.values().map(|(count, _)| count).sum()
    }
}

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct PhaseMeasurement {
    /// Successful requests.
    pub requests: u64,
    /// Failed requests, by code.
    pub errors: ErrorTally,
    /// From the start of the phase until its last client finished.
    pub elapsed: Duration,
    /// The latency of every successful request in microseconds, sorted.
    pub latencies_micros: Vec<u32>,
}

impl PhaseMeasurement {
    fn empty() -> Self {
        Self {
            requests: 0,
            errors: ErrorTally::default(),
            elapsed: Duration::ZERO,
            latencies_micros: Vec::new(),
        }
    }

    /// Adds another slice of the same phase; latencies are left unsorted.
    fn absorb(&mut self, slice: Self) {
        self.requests += slice.requests;
        self.errors.merge(slice.errors);
        self.elapsed += slice.elapsed;
        self.latencies_micros.extend(slice.latencies_micros);
    }

    /// Successful requests per second of wall time.
    pub fn requests_per_second(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.requests as f64 / seconds
        } else {
            0.0
        }
    }

    /// The latency at `percent` (nearest rank) in milliseconds, `None`
    /// without successful requests.
    pub fn percentile_ms(&self, percent: f64) -> Option<f64> {
        let count = self.latencies_micros.len();
        if count == 0 {
            return None;
        }
        let rank = ((percent / 100.0) * count as f64).ceil() as usize;
        let index = rank.clamp(1, count) - 1;
        Some(f64::from(self.latencies_micros[index]) / 1000.0)
    }
}

/// Runs `concurrency` clients spread round-robin over `channels`, each
/// sending `workload` requests back to back until `duration` has passed (or
/// the workload's ids run out).
pub async fn measure(
    channels: &[Channel],
    concurrency: usize,
    duration: Duration,
    workload: &Workload,
) -> anyhow::Result<PhaseMeasurement> {
    anyhow::ensure!(!channels.is_empty(), "no channel to send requests on");
    let started = Instant::now();
    let deadline = started + duration;
    let mut clients = Vec::with_capacity(concurrency);
    for client_index in 0..concurrency {
        let channel = channels[client_index % channels.len()].clone();
        let workload = workload.clone();
        clients.push(tokio::spawn(run_client(
            channel,
            workload,
            client_index,
            deadline,
        )));
    }
    let mut measurement = PhaseMeasurement::empty();
    for client in clients {
        let (latencies, errors) = client.await.context("a benchmark client panicked")?;
        measurement.requests += latencies.len() as u64;
        measurement.latencies_micros.extend(latencies);
        measurement.errors.merge(errors);
    }
    measurement.elapsed = started.elapsed();
    measurement.latencies_micros.sort_unstable();
    Ok(measurement)
}

/// Measures workloads for `duration` each, alternating in slices of about
/// [`ALTERNATION_SLICE`] in ABBA order (forwards, then backwards), so that
/// all see the same background load and drift of a shared machine.
pub async fn measure_alternating<const N: usize>(
    channels: &[Channel],
    concurrency: usize,
    duration: Duration,
    workloads: [&Workload; N],
) -> anyhow::Result<[PhaseMeasurement; N]> {
    let slices = (duration.as_secs_f64() / ALTERNATION_SLICE.as_secs_f64())
        .round()
        .max(1.0) as u32;
    let slice = duration / slices;
    let mut measurements: [PhaseMeasurement; N] =
        std::array::from_fn(|_| PhaseMeasurement::empty());
    for round in 0..slices {
        let mut order: Vec<usize> = (0..N).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for index in order {
            let measured = measure(channels, concurrency, slice, workloads[index]).await?;
            measurements[index].absorb(measured);
        }
    }
    for measurement in &mut measurements {
        measurement.latencies_micros.sort_unstable();
    }
    Ok(measurements)
}

async fn run_client(
    channel: Channel,
    workload: Workload,
    client_index: usize,
    deadline: Instant,
) -> (Vec<u32>, ErrorTally) {
    let mut health = HealthClient::new(channel.clone());
    let mut touchpoints = TouchpointServiceClient::new(channel.clone());
    let mut surveys = SurveyServiceClient::new(channel.clone());
    let mut customers = CustomerServiceClient::new(channel);
    let mut latencies = Vec::with_capacity(16 * 1024);
    let mut errors = ErrorTally::default();
    // Clients start at different places of the hot set so that they do not
    // all ask for the same id at the same moment.
    let mut hot_position = client_index.wrapping_mul(7919);
    while Instant::now() < deadline {
        let request_started = Instant::now();
        let outcome = match &workload {
            Workload::HealthCheck => {
                let request = HealthCheckRequest {
                    service: String::new(),
                };
                match health.check(request).await {
                    Ok(response) if response.get_ref().status == ServingStatus::Serving as i32 => {
                        Ok(())
                    }
                    Ok(_) => Err(tonic::Status::unavailable("health is not SERVING")),
                    Err(status) => Err(status),
                }
            }
            Workload::ReadEachOnce {
                customer_ids,
                next_index,
            } => {
                let index = next_index.fetch_add(1, Ordering::Relaxed);
                let Some(customer_id) = customer_ids.get(index) else {
                    break;
                };
                get_customer(&mut customers, customer_id).await
            }
            Workload::ReadRepeatedly { customer_ids } => {
                if customer_ids.is_empty() {
                    break;
                }
                hot_position = (hot_position + 1) % customer_ids.len();
                get_customer(&mut customers, &customer_ids[hot_position]).await
            }
            Workload::RecordTouchpoint {
                customer_ids,
                run_id,
                next_event,
            } => {
                if customer_ids.is_empty() {
                    break;
                }
                let event = next_event.fetch_add(1, Ordering::Relaxed);
                let touchpoint = super::ingest::touchpoint(
                    run_id,
                    event,
                    &customer_ids[event % customer_ids.len()],
                );
                let request = RecordTouchpointRequest {
                    touchpoint: Some(touchpoint),
                };
                match touchpoints.record_touchpoint(request).await {
                    Ok(response) if !response.get_ref().duplicate => Ok(()),
                    Ok(_) => Err(tonic::Status::already_exists(
                        "a new event was reported as a duplicate",
                    )),
                    Err(status) => Err(status),
                }
            }
            Workload::RecordResponse {
                survey_id,
                customer_ids,
                run_id,
                next_response,
                batch,
            } => {
                if customer_ids.is_empty() {
                    break;
                }
                let first = next_response.fetch_add(*batch, Ordering::Relaxed);
                let request = |number: usize| {
                    super::feedback::response_request(
                        survey_id,
                        &customer_ids[number % customer_ids.len()],
                        run_id,
                        number,
                    )
                };
                if *batch == 1 {
                    match surveys.record_response(request(first)).await {
                        Ok(response) if !response.get_ref().duplicate => Ok(()),
                        Ok(_) => Err(tonic::Status::already_exists(
                            "a new response was reported as a duplicate",
                        )),
                        Err(status) => Err(status),
                    }
                } else {
                    let responses = (first..first + batch)
                        .filter_map(|number| request(number).response)
                        .collect();
                    match surveys
                        .record_responses(RecordResponsesRequest { responses })
                        .await
                    {
                        Ok(reply) if reply.get_ref().stored_count as usize == *batch => Ok(()),
                        Ok(reply) => Err(tonic::Status::failed_precondition(format!(
                            "{} of {batch} new responses were stored",
                            reply.get_ref().stored_count
                        ))),
                        Err(status) => Err(status),
                    }
                }
            }
            Workload::SurveySummary {
                survey_id,
                within,
                next_request,
            } => {
                let number = next_request.fetch_add(1, Ordering::Relaxed);
                let request = super::feedback::summary_request(survey_id, *within, number);
                surveys.get_survey_summary(request).await.map(drop)
            }
        };
        let micros = u32::try_from(request_started.elapsed().as_micros()).unwrap_or(u32::MAX);
        match outcome {
            Ok(()) => latencies.push(micros),
            Err(status) => errors.record(&status),
        }
    }
    (latencies, errors)
}

async fn get_customer(
    customers: &mut CustomerServiceClient<Channel>,
    customer_id: &str,
) -> Result<(), tonic::Status> {
    let request = GetCustomerRequest {
        customer_id: customer_id.to_owned(),
    };
    let response = customers.get_customer(request).await?.into_inner();
    match response.customer {
        Some(customer) if customer.id == customer_id => Ok(()),
        _ => Err(tonic::Status::internal(
            "GetCustomer returned another customer or none",
        )),
    }
}

/// Customers created by [`seed_customers`] and the errors seen doing it.
pub struct SeededCustomers {
    /// The ids of the created customers, in no particular order.
    pub customer_ids: Vec<String>,
    /// Failed creates, by code.
    pub errors: ErrorTally,
}

/// Creates `count` customers with CreateCustomer, `concurrency` at a time;
/// their e-mails are unique to `run_id`.
pub async fn seed_customers(
    channels: &[Channel],
    concurrency: usize,
    count: usize,
    run_id: &str,
) -> anyhow::Result<SeededCustomers> {
    anyhow::ensure!(!channels.is_empty(), "no channel to send requests on");
    let next_number = Arc::new(AtomicUsize::new(0));
    let mut creators = Vec::with_capacity(concurrency);
    for creator_index in 0..concurrency {
        let mut customers =
            CustomerServiceClient::new(channels[creator_index % channels.len()].clone());
        let next_number = next_number.clone();
        let run_id = run_id.to_owned();
        creators.push(tokio::spawn(async move {
            let mut created = Vec::new();
            let mut errors = ErrorTally::default();
            loop {
                let number = next_number.fetch_add(1, Ordering::Relaxed);
                if number >= count {
                    break;
                }
                let request = CreateCustomerRequest {
                    customer: Some(Customer {
                        given_name: "Bench".to_owned(),
                        family_name: format!("Customer {number}"),
                        emails: vec![format!("bench-{number}-{run_id}@example.com")],
                        company: "Benchmark Ltd".to_owned(),
                        job_title: "Load generator".to_owned(),
                        ..Customer::default()
                    }),
                    request_id: String::new(),
                };
                match customers.create_customer(request).await {
                    Ok(response) => match response.into_inner().customer {
                        Some(customer) => created.push(customer.id),
                        None => errors.record(&tonic::Status::internal(
                            "CreateCustomer returned no customer",
                        )),
                    },
                    Err(status) => errors.record(&status),
                }
            }
            (created, errors)
        }));
    }
    let mut seeded = SeededCustomers {
        customer_ids: Vec::with_capacity(count),
        errors: ErrorTally::default(),
    };
    for creator in creators {
        let (created, errors) = creator.await.context("a seeding client panicked")?;
        seeded.customer_ids.extend(created);
        seeded.errors.merge(errors);
    }
    Ok(seeded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement(latencies_micros: Vec<u32>) -> PhaseMeasurement {
        PhaseMeasurement {
            requests: latencies_micros.len() as u64,
            errors: ErrorTally::default(),
            elapsed: Duration::from_secs(2),
            latencies_micros,
        }
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let phase = measurement((1..=100).map(|ms| ms * 1000).collect());
        assert_eq!(phase.percentile_ms(50.0), Some(50.0));
        assert_eq!(phase.percentile_ms(99.0), Some(99.0));
        assert_eq!(phase.percentile_ms(100.0), Some(100.0));
        assert_eq!(measurement(vec![1500]).percentile_ms(99.0), Some(1.5));
        assert_eq!(measurement(Vec::new()).percentile_ms(50.0), None);
    }

    #[test]
    fn slices_add_up() {
        let mut phase = measurement(vec![3000, 1000]);
        phase.absorb(measurement(vec![2000]));
        assert_eq!(phase.requests, 3);
        assert_eq!(phase.elapsed, Duration::from_secs(4));
        phase.latencies_micros.sort_unstable();
        assert_eq!(phase.percentile_ms(50.0), Some(2.0));
    }

    #[test]
    fn the_rate_is_per_second_of_wall_time() {
        let phase = measurement(vec![1; 10]);
        assert!((phase.requests_per_second() - 5.0).abs() < f64::EPSILON);
    }

    #[test]
    fn errors_are_counted_per_code_keeping_the_first_message() {
        let mut tally = ErrorTally::default();
        tally.record(&tonic::Status::unavailable("first"));
        let mut other = ErrorTally::default();
        other.record(&tonic::Status::unavailable("second"));
        other.record(&tonic::Status::not_found("gone"));
        tally.merge(other);
        assert_eq!(tally.total(), 3);
        assert_eq!(tally.by_code["Unavailable"], (2, "first".to_owned()));
    }
}
