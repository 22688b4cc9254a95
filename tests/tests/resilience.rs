//! How the binary behaves when things go wrong around it: Redis freezing
//! mid-test, SIGTERM with calls in flight, a bad configuration variable.

#![allow(missing_docs)]

use std::time::{Duration, Instant};

use clm_proto::identity::customer_service_client::CustomerServiceClient;
use clm_proto::identity::{self as pb, Customer};
use clm_tests::{ClmServer, RedisServer};
use tonic::transport::Channel;

async fn get(client: &mut CustomerServiceClient<tonic::transport::Channel>, id: &str) -> Customer {
    client
        .get_customer(pb::GetCustomerRequest {
            customer_id: id.to_owned(),
        })
        .await
        .expect("get succeeds")
        .into_inner()
        .customer
        .unwrap()
}

async fn rename(
    client: &mut CustomerServiceClient<tonic::transport::Channel>,
    id: &str,
    name: &str,
) {
    client
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(Customer {
                id: id.to_owned(),
                given_name: name.to_owned(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["given_name".into()],
            }),
            expected_version: 0,
        })
        .await
        .expect("update succeeds");
}

/// Identity on a fresh PostgreSQL database with a Redis of its own, and one
/// customer named "Before" whose profile Redis already holds. `None` where
/// the servers may be missing (outside CI).
async fn identity_on_own_redis(
    label: &str,
) -> Option<(
    RedisServer,
    ClmServer,
    CustomerServiceClient<Channel>,
    Customer,
)> {
    let redis = RedisServer::start().await?;
    let database = clm_tests::fresh_postgres_database("e2e").await?;
    let server = ClmServer::start(
        &["serve", "identity"],
        &[
            ("CLM_DATABASE_URL", database.expose().to_owned()),
            ("CLM_REDIS_URL", redis.url.clone()),
        ],
    )
    .await
    .unwrap();
    let mut client = CustomerServiceClient::new(server.channel().await);
    let created = client
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(Customer {
                given_name: "Before".into(),
                emails: vec![format!("{label}@example.com")],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    // Warm: Redis now holds the profile as "Before".
    assert_eq!(get(&mut client, &created.id).await.given_name, "Before");
    Some((redis, server, client, created))
}

#[tokio::test]
async fn a_frozen_redis_slows_nothing_down_and_leaves_nothing_stale() {
    let Some((redis, server, mut client, created)) = identity_on_own_redis("frozen").await else {
        return;
    };

    redis.pause();
    let started = Instant::now();
    assert_eq!(get(&mut client, &created.id).await.given_name, "Before");
    rename(&mut client, &created.id, "During").await;
    assert_eq!(get(&mut client, &created.id).await.given_name, "During");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "calls answered from the database"
    );

    // Redis comes back with the old profile still in it: it must not be served.
    redis.resume();
    for _ in 0..5 {
        assert_eq!(get(&mut client, &created.id).await.given_name, "During");
    }
    rename(&mut client, &created.id, "After").await;
    assert_eq!(get(&mut client, &created.id).await.given_name, "After");
    assert!(
        server.log().contains("cache unavailable"),
        "the outage is logged"
    );
}

#[tokio::test]
async fn a_redis_that_refuses_connections_costs_calls_at_most_the_bound() {
    let Some((mut redis, server, mut client, created)) = identity_on_own_redis("refused").await
    else {
        return;
    };

    // Redis goes away: its port refuses every connection. Calls with a
    // one-second deadline once failed half the time (each call waited out
    // the Redis client's reconnection, 1 to 1.5 s).
    redis.stop();
    for round in 0..10 {
        let mut request = tonic::Request::new(pb::GetCustomerRequest {
            customer_id: created.id.clone(),
        });
        request.set_timeout(Duration::from_secs(1));
        client
            .get_customer(request)
            .await
            .unwrap_or_else(|status| panic!("GetCustomer {round}: {status:?}"));
        let mut request = tonic::Request::new(pb::UpdateCustomerRequest {
            customer: Some(Customer {
                id: created.id.clone(),
                given_name: format!("During {round}"),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["given_name".into()],
            }),
            expected_version: 0,
        });
        request.set_timeout(Duration::from_secs(1));
        client
            .update_customer(request)
            .await
            .unwrap_or_else(|status| panic!("UpdateCustomer {round}: {status:?}"));
    }
    assert_eq!(get(&mut client, &created.id).await.given_name, "During 9");
    assert!(
        server.log().contains("cache unavailable"),
        "the outage is logged"
    );
}

/// Forwards a loopback port to a server until stopped: then the port refuses
/// connections and every forwarded connection is cut, as when the server's
/// host goes away.
struct Proxy {
    port: u16,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let registry = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let forward = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                registry.lock().unwrap().push(forward);
            }
        });
        tasks.lock().unwrap().push(accept);
        Self { port, tasks }
    }

    fn stop(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

#[tokio::test]
async fn a_database_that_goes_away_is_answered_unavailable_within_the_deadline() {
    let Some(database) = clm_tests::fresh_postgres_database("e2e").await else {
        return;
    };
    // postgres://user@host:port/name, with host:port replaced by the proxy.
    let url = database.expose().to_owned();
    let (scheme_user, rest) = url.rsplit_once('@').expect("a user in the URL");
    let (host_port, name) = rest.split_once('/').expect("a database in the URL");
    let proxy = Proxy::start(host_port.to_owned()).await;
    let proxied = format!("{scheme_user}@127.0.0.1:{}/{name}", proxy.port);
    let server = ClmServer::start(&["serve", "identity"], &[("CLM_DATABASE_URL", proxied)])
        .await
        .unwrap();
    let mut client = CustomerServiceClient::new(server.channel().await);
    client
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(Customer {
                emails: vec!["db-down@example.com".into()],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect("the database answers");

    proxy.stop();
    // Calls that need the database, each with a one-second deadline, once
    // waited out the pool (5 s) and saw only DEADLINE_EXCEEDED.
    let mut unavailable = 0;
    for _ in 0..8 {
        let mut request = tonic::Request::new(pb::GetCustomerRequest {
            customer_id: uuid::Uuid::now_v7().to_string(),
        });
        request.set_timeout(Duration::from_secs(1));
        let started = Instant::now();
        let status = client.get_customer(request).await.expect_err("no database");
        if status.code() == tonic::Code::Unavailable {
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "within the deadline"
            );
            assert_eq!(
                clm_tests::details(&status).1.as_deref(),
                Some("DEPENDENCY_UNAVAILABLE")
            );
            unavailable += 1;
        } else {
            // The client gave up at its deadline: the outage was not noticed
            // yet (the databases are probed every second).
            assert!(
                matches!(
                    status.code(),
                    tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                ),
                "{status:?}"
            );
            assert_eq!(
                unavailable, 0,
                "once noticed, the outage is answered every time"
            );
        }
    }
    assert!(
        unavailable >= 5,
        "{unavailable} of 8 calls were answered UNAVAILABLE"
    );
    assert!(
        server.log().contains("call answered UNAVAILABLE"),
        "counted in the log"
    );
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let mut server = ClmServer::start(&["serve"], &[]).await.unwrap();
    let mut client = CustomerServiceClient::new(server.channel().await);
    // A live tail never ends by itself; shutdown must end it.
    let mut stream = client
        .stream_customer_events(pb::StreamCustomerEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits within the grace period");
    assert!(status.success(), "exit status {status:?}");
    let ended = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap();
    assert!(matches!(ended, Ok(None) | Err(_)));
    let log = server.log();
    assert!(log.contains("NOT_SERVING"), "{log}");
}

#[tokio::test]
async fn after_sigterm_the_server_keeps_answering_while_not_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

    let delay = Duration::from_secs(3);
    let mut server = ClmServer::start(
        &["serve", "identity"],
        &[("CLM_SHUTDOWN_DELAY_SECONDS", delay.as_secs().to_string())],
    )
    .await
    .unwrap();
    let signalled = Instant::now();
    server.signal("TERM");
    // Probers see NOT_SERVING on new connections while calls still succeed.
    let mut saw_not_serving = false;
    while signalled.elapsed() < delay - Duration::from_millis(1500) {
        let channel = server.channel().await;
        let health = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health answers during the delay")
            .into_inner();
        saw_not_serving |= health.status == ServingStatus::NotServing as i32;
        CustomerServiceClient::new(channel)
            .list_customers(pb::ListCustomersRequest::default())
            .await
            .expect("calls are served during the delay");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_not_serving, "health turned NOT_SERVING at once");
    let status = server
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits after the delay and the drain");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        signalled.elapsed() >= delay,
        "the listener stayed open for the delay"
    );
}

#[tokio::test]
async fn misspelled_variables_are_warned_about_and_logs_have_no_colours() {
    let mut server = ClmServer::start(
        &["serve", "identity"],
        &[
            ("CLM_LOG_FROMAT", "json".to_owned()),
            ("CLM_SCORING_SWEEP_POLL_MS", "1000".to_owned()),
        ],
    )
    .await
    .unwrap();
    server.signal("TERM");
    server.wait_exit(Duration::from_secs(15)).await;
    let log = server.log();
    assert!(
        log.contains("unknown configuration variable") && log.contains("CLM_LOG_FROMAT"),
        "{log}"
    );
    assert!(
        log.contains("CLM_LOG_FORMAT"),
        "a suggestion is made: {log}"
    );
    assert!(
        !log.contains("CLM_SCORING_SWEEP_POLL_MS"),
        "a variable of a service not run here is known: {log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "no ANSI escapes in a log file: {log}"
    );
}

#[tokio::test]
async fn a_bad_variable_is_named_at_start() {
    let output = std::process::Command::new(clm_tests::clm_binary())
        .args(["serve"])
        .env("CLM_MAX_PAGE_SIZE", "lots")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("CLM_MAX_PAGE_SIZE"), "{stderr}");

    let output = std::process::Command::new(clm_tests::clm_binary())
        .args(["serve", "identity"])
        .env("CLM_PHONE_DEFAULT_REGION", "Atlantis")
        .env("CLM_DATA_DIR", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("CLM_PHONE_DEFAULT_REGION"));

    let output = std::process::Command::new(clm_tests::clm_binary())
        .args(["serve", "identity"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "not-a-url")
        .env("CLM_DATA_DIR", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("OTEL_EXPORTER_OTLP_ENDPOINT"));
}

#[tokio::test]
async fn migrate_then_serve_without_migrating() {
    let data = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/identity.db", data.path().display());
    let unmigrated = std::process::Command::new(clm_tests::clm_binary())
        .args(["serve", "identity"])
        .env("CLM_IDENTITY_DATABASE_URL", &url)
        .env("CLM_MIGRATE_ON_START", "false")
        .env("CLM_LISTEN_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!unmigrated.status.success());
    assert!(String::from_utf8_lossy(&unmigrated.stderr).contains("clm migrate identity"));

    for _ in 0..2 {
        let migrate = std::process::Command::new(clm_tests::clm_binary())
            .args(["migrate", "identity"])
            .env("CLM_IDENTITY_DATABASE_URL", &url)
            .output()
            .unwrap();
        assert!(
            migrate.status.success(),
            "{}",
            String::from_utf8_lossy(&migrate.stderr)
        );
    }
    let server = ClmServer::start(
        &["serve", "identity"],
        &[
            ("CLM_IDENTITY_DATABASE_URL", url.clone()),
            ("CLM_MIGRATE_ON_START", "false".into()),
        ],
    )
    .await
    .unwrap();
    let mut client = CustomerServiceClient::new(server.channel().await);
    client
        .list_customers(pb::ListCustomersRequest::default())
        .await
        .expect("serves after a separate migration");
}

#[tokio::test]
async fn trace_export_to_an_absent_collector_does_not_disturb_serving() {
    let server = ClmServer::start(
        &["serve"],
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{}", clm_tests::free_port()),
            ),
            ("OTEL_SERVICE_NAME", "clm-e2e".to_owned()),
        ],
    )
    .await;
    let mut server = server.expect("serves with trace export on");
    let mut client = CustomerServiceClient::new(server.channel().await);
    for _ in 0..3 {
        client
            .list_customers(pb::ListCustomersRequest::default())
            .await
            .expect("calls succeed while spans cannot be exported");
    }
    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits");
    assert!(status.success());
}

#[tokio::test]
async fn two_replicas_sharing_redis_see_each_others_writes() {
    let Some(database) = clm_tests::fresh_postgres_database("e2e").await else {
        return;
    };
    let Some(redis) = clm_tests::redis_url().await else {
        return;
    };
    let env = [
        ("CLM_DATABASE_URL", database.expose().to_owned()),
        ("CLM_REDIS_URL", redis.expose().to_owned()),
    ];
    let first = ClmServer::start(&["serve", "identity"], &env)
        .await
        .unwrap();
    let second = ClmServer::start(&["serve", "identity"], &env)
        .await
        .unwrap();
    let mut one = CustomerServiceClient::new(first.channel().await);
    let mut two = CustomerServiceClient::new(second.channel().await);
    let created = one
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(Customer {
                given_name: "v0".into(),
                emails: vec!["replicas@example.com".into()],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    for round in 1..=5 {
        // Both replicas hold the profile hot.
        get(&mut one, &created.id).await;
        get(&mut two, &created.id).await;
        let name = format!("v{round}");
        let (writer, reader) = if round % 2 == 0 {
            (&mut one, &mut two)
        } else {
            (&mut two, &mut one)
        };
        rename(writer, &created.id, &name).await;
        // The writer itself never reads its old data.
        assert_eq!(get(writer, &created.id).await.given_name, name);
        // The other replica is told by Redis and drops its copy promptly.
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            if get(reader, &created.id).await.given_name == name {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the other replica kept serving the old profile"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
