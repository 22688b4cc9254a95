//! Configuration from the environment (12-factor): defaults that make the
//! embedded mode work, then `CLM_*` variables, validated at start-up with an
//! error that names the bad variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::secret::Secret;

/// A configuration variable that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid {variable}: {reason}")]
pub struct ConfigError {
    /// The environment variable, e.g. `CLM_LISTEN_ADDR`.
    pub variable: String,
    /// Why its value is not usable.
    pub reason: String,
}

impl ConfigError {
    /// An error about `variable`.
    pub fn new(variable: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            variable: variable.into(),
            reason: reason.into(),
        }
    }
}

/// Looks up one variable.
type Lookup = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;
/// Lists the names of the variables that are set.
type Names = Box<dyn Fn() -> Vec<String> + Send + Sync>;

/// Reads variables from the process environment or, in tests, from a map.
/// It remembers every name asked for, so that a misspelled `CLM_*` variable,
/// which nothing asks for, can be pointed out ([`Env::unknown_clm_variables`]).
pub struct Env {
    lookup: Lookup,
    names: Names,
    asked: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Env {
    /// The process environment.
    pub fn process() -> Self {
        Self {
            lookup: Box::new(|name| std::env::var(name).ok()),
            names: Box::new(|| {
                std::env::vars_os()
                    .filter_map(|(name, _)| name.into_string().ok())
                    .collect()
            }),
            asked: Default::default(),
        }
    }

    /// A fixed set of variables, for tests.
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let map: std::sync::Arc<std::collections::HashMap<String, String>> = std::sync::Arc::new(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        let names = map.clone();
        Self {
            lookup: Box::new(move |name| map.get(name).cloned()),
            names: Box::new(move || names.keys().cloned().collect()),
            asked: Default::default(),
        }
    }

    /// The variable's value; unset and empty are the same.
    pub fn string(&self, name: &str) -> Option<String> {
        if let Ok(mut asked) = self.asked.lock()
            && !asked.contains(name)
        {
            asked.insert(name.to_owned());
        }
        (self.lookup)(name).filter(|value| !value.trim().is_empty())
    }

    /// The `CLM_*` variables that are set but that no configuration asked
    /// for, each with the known name it most likely means. Ask once every
    /// configuration has been read.
    pub fn unknown_clm_variables(&self) -> Vec<(String, Option<String>)> {
        let asked = self
            .asked
            .lock()
            .map(|asked| asked.clone())
            .unwrap_or_default();
        let mut unknown: Vec<(String, Option<String>)> = (self.names)()
            .into_iter()
            .filter(|name| name.starts_with("CLM_") && !asked.contains(name))
            .map(|name| {
                let suggestion = asked
                    .iter()
                    .filter(|known| known.starts_with("CLM_"))
                    .map(|known| (edit_distance(&name, known), known))
                    .filter(|(distance, _)| *distance <= 3)
                    .min()
                    .map(|(_, known)| known.clone());
                (name, suggestion)
            })
            .collect();
        unknown.sort();
        unknown
    }

    /// Logs a warning for each of [`Env::unknown_clm_variables`].
    pub fn warn_about_unknown_variables(&self) {
        for (name, suggestion) in self.unknown_clm_variables() {
            match suggestion {
                Some(known) => tracing::warn!(
                    variable = %name,
                    did_you_mean = %known,
                    "unknown configuration variable, ignored"
                ),
                None => tracing::warn!(variable = %name, "unknown configuration variable, ignored"),
            }
        }
    }

    /// The variable parsed as `T`, or `default` when unset.
    pub fn parse_or<T>(&self, name: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        match self.string(name) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|err| ConfigError::new(name, format!("{raw:?} is not valid: {err}"))),
        }
    }

    /// A boolean variable: true/false, 1/0, yes/no, on/off.
    pub fn bool_or(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.string(name) {
            None => Ok(default),
            Some(raw) => match raw.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(ConfigError::new(
                    name,
                    format!("{raw:?} is not a boolean (use true or false)"),
                )),
            },
        }
    }

    /// A whole number within `min..=max`, or `default` when unset.
    pub fn bounded_or(
        &self,
        name: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let value = self.parse_or(name, default)?;
        if !(min..=max).contains(&value) {
            return Err(ConfigError::new(
                name,
                format!("{value} is out of range ({min} to {max})"),
            ));
        }
        Ok(value)
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?} (use text or json)")),
        }
    }
}

/// Bounds on what one request may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest request message the server decodes, in bytes
    /// (`CLM_MAX_MESSAGE_BYTES`, default 16 MiB: a batch of the most items
    /// allowed, 10,000 touchpoints with properties of about 1 KiB each).
    /// Above it, calls fail with RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
    /// The largest page a List call returns (`CLM_MAX_PAGE_SIZE`, default 1000).
    pub max_page_size: u32,
    /// The page size used when a request leaves it at 0 (100).
    pub default_page_size: u32,
    /// The most items one batch call may carry (`CLM_MAX_BATCH_SIZE`, default 10000).
    pub max_batch_size: u32,
    /// Concurrent requests served per connection (`CLM_MAX_CONCURRENT_REQUESTS`, default 1024).
    pub max_concurrent_requests: usize,
    /// How far ahead of the server's clock a time stated in a request may
    /// be (`CLM_MAX_CLOCK_SKEW_SECONDS`, default 300): when a touchpoint
    /// happened, a consent was recorded, a lifecycle was evaluated.
    pub max_clock_skew: std::time::Duration,
    /// How long a call may wait on a database that does not answer before
    /// it is answered UNAVAILABLE (`CLM_DATABASE_WAIT_MS`, default 5000);
    /// a call whose deadline comes sooner is answered before its deadline.
    pub max_database_wait: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 * 1024 * 1024,
            max_page_size: 1000,
            default_page_size: 100,
            max_batch_size: 10_000,
            max_concurrent_requests: 1024,
            max_clock_skew: Duration::from_secs(300),
            max_database_wait: Duration::from_secs(5),
        }
    }
}

/// Where traces go when OpenTelemetry export is on.
#[derive(Debug, Clone)]
pub struct OtelConfig {
    /// The OTLP/gRPC collector endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub endpoint: String,
    /// The service name reported (`OTEL_SERVICE_NAME`, default `clm`).
    pub service_name: String,
}

/// The settings every clm process shares.
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// Where the gRPC server listens (`CLM_LISTEN_ADDR`, default 127.0.0.1:50051).
    pub listen_addr: SocketAddr,
    /// Where SQLite files live when no database URL is given (`CLM_DATA_DIR`, default ./data).
    pub data_dir: PathBuf,
    /// The database for every service without its own URL (`CLM_DATABASE_URL`).
    pub database_url: Option<Secret>,
    /// The Redis server for hot objects (`CLM_REDIS_URL`; unset: in-process cache).
    pub redis_url: Option<Secret>,
    /// Run migrations when a service starts (`CLM_MIGRATE_ON_START`, default true).
    pub migrate_on_start: bool,
    /// Log line format (`CLM_LOG_FORMAT`, default text).
    pub log_format: LogFormat,
    /// Log filter in `tracing` syntax (`CLM_LOG`, default `info`).
    pub log_filter: String,
    /// How long in-flight calls may drain after SIGTERM (`CLM_SHUTDOWN_GRACE_SECONDS`, default 20).
    pub shutdown_grace: Duration,
    /// How long the server keeps accepting calls after SIGTERM while health
    /// says NOT_SERVING, so that load balancers and probes notice before the
    /// listener closes (`CLM_SHUTDOWN_DELAY_SECONDS`, default 10: the chart's
    /// readiness probe, every 5 s with 2 failures to notice). Ctrl-C skips it.
    pub shutdown_delay: Duration,
    /// How long a hot object stays cached (`CLM_CACHE_TTL_SECONDS`, default 300; ±10% jitter).
    pub cache_ttl: Duration,
    /// How many entries the in-process cache holds (`CLM_CACHE_CAPACITY`, default 100000).
    pub cache_capacity: u64,
    /// Keep hot Redis entries in process too, invalidated by Redis
    /// (`CLM_REDIS_CLIENT_CACHE`, default true; needs Redis 6 or later).
    pub redis_client_cache: bool,
    /// Request bounds.
    pub limits: Limits,
    /// OpenTelemetry export, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otel: Option<OtelConfig>,
}

impl PlatformConfig {
    /// Reads and validates the configuration.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let defaults = Limits::default();
        let limits = Limits {
            max_message_bytes: env.bounded_or(
                "CLM_MAX_MESSAGE_BYTES",
                defaults.max_message_bytes as u64,
                64 * 1024,
                64 * 1024 * 1024,
            )? as usize,
            max_page_size: env.bounded_or(
                "CLM_MAX_PAGE_SIZE",
                defaults.max_page_size.into(),
                1,
                10_000,
            )? as u32,
            default_page_size: defaults.default_page_size,
            max_batch_size: env.bounded_or(
                "CLM_MAX_BATCH_SIZE",
                defaults.max_batch_size.into(),
                1,
                100_000,
            )? as u32,
            max_concurrent_requests: env.bounded_or(
                "CLM_MAX_CONCURRENT_REQUESTS",
                defaults.max_concurrent_requests as u64,
                1,
                1_000_000,
            )? as usize,
            max_clock_skew: Duration::from_secs(env.bounded_or(
                "CLM_MAX_CLOCK_SKEW_SECONDS",
                defaults.max_clock_skew.as_secs(),
                0,
                86_400,
            )?),
            max_database_wait: Duration::from_millis(env.bounded_or(
                "CLM_DATABASE_WAIT_MS",
                defaults.max_database_wait.as_millis() as u64,
                50,
                600_000,
            )?),
        };
        let mut limits = limits;
        limits.default_page_size = limits.default_page_size.min(limits.max_page_size);

        let database_url = env.string("CLM_DATABASE_URL").map(Secret::new);
        if let Some(url) = &database_url {
            crate::db::DatabaseKind::of_url(url.expose())
                .map_err(|reason| ConfigError::new("CLM_DATABASE_URL", reason))?;
        }
        let redis_url = env.string("CLM_REDIS_URL").map(Secret::new);
        if let Some(url) = &redis_url {
            let raw = url.expose();
            if !(raw.starts_with("redis://")
                || raw.starts_with("rediss://")
                || raw.starts_with("redis+unix://")
                || raw.starts_with("unix://"))
            {
                return Err(ConfigError::new(
                    "CLM_REDIS_URL",
                    "must start with redis://, rediss:// or unix://",
                ));
            }
        }
        let otel = match env.string("OTEL_EXPORTER_OTLP_ENDPOINT") {
            None => None,
            Some(endpoint) => Some(OtelConfig {
                endpoint: otlp_endpoint(&endpoint)
                    .map_err(|reason| ConfigError::new("OTEL_EXPORTER_OTLP_ENDPOINT", reason))?,
                service_name: env
                    .string("OTEL_SERVICE_NAME")
                    .unwrap_or_else(|| "clm".to_owned()),
            }),
        };

        Ok(Self {
            listen_addr: env
                .parse_or("CLM_LISTEN_ADDR", SocketAddr::from(([127, 0, 0, 1], 50051)))?,
            data_dir: env
                .string("CLM_DATA_DIR")
                .map_or_else(|| PathBuf::from("data"), PathBuf::from),
            database_url,
            redis_url,
            migrate_on_start: env.bool_or("CLM_MIGRATE_ON_START", true)?,
            log_format: env.parse_or("CLM_LOG_FORMAT", LogFormat::Text)?,
            log_filter: env.string("CLM_LOG").unwrap_or_else(|| "info".to_owned()),
            shutdown_grace: Duration::from_secs(env.bounded_or(
                "CLM_SHUTDOWN_GRACE_SECONDS",
                20,
                0,
                3600,
            )?),
            shutdown_delay: Duration::from_secs(env.bounded_or(
                "CLM_SHUTDOWN_DELAY_SECONDS",
                10,
                0,
                600,
            )?),
            cache_ttl: Duration::from_secs(env.bounded_or(
                "CLM_CACHE_TTL_SECONDS",
                300,
                1,
                86_400,
            )?),
            cache_capacity: env.bounded_or("CLM_CACHE_CAPACITY", 100_000, 1, 100_000_000)?,
            redis_client_cache: env.bool_or("CLM_REDIS_CLIENT_CACHE", true)?,
            limits,
            otel,
        })
    }

    /// The database URL of one service: `CLM_<SERVICE>_DATABASE_URL`, else
    /// `CLM_DATABASE_URL`, else a SQLite file `<data dir>/<service>.db`.
    pub fn database_url_for(&self, env: &Env, service: &str) -> Result<Secret, ConfigError> {
        let variable = format!("CLM_{}_DATABASE_URL", service.to_ascii_uppercase());
        if let Some(url) = env.string(&variable) {
            crate::db::DatabaseKind::of_url(&url)
                .map_err(|reason| ConfigError::new(&variable, reason))?;
            return Ok(Secret::new(url));
        }
        if let Some(url) = &self.database_url {
            return Ok(url.clone());
        }
        let path = self.data_dir.join(format!("{service}.db"));
        Ok(Secret::new(format!("sqlite://{}", path.display())))
    }
}

/// The Levenshtein distance of two names, in bytes (names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, &x) in a.iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, &y) in b.iter().enumerate() {
            current[j + 1] = (previous[j] + usize::from(x != y))
                .min(previous[j + 1] + 1)
                .min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// An OTLP/gRPC collector endpoint: an `http://` or `https://` URL with a
/// host, e.g. `http://otel-collector:4317`.
fn otlp_endpoint(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    let uri: http::Uri = raw
        .parse()
        .map_err(|err| format!("{raw:?} is not a URL: {err}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(format!(
                "{raw:?} must start with http:// or https:// (e.g. http://otel-collector:4317)"
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{raw:?} has no host"));
    }
    Ok(raw.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misspelled_variables_are_pointed_out() {
        let env = Env::from_pairs([
            ("CLM_LOG_FROMAT", "json"),
            ("CLM_LISTEN_ADDR", "127.0.0.1:0"),
            ("CLM_NOTHING_LIKE_IT_AT_ALL", "1"),
            ("PATH", "/bin"),
        ]);
        PlatformConfig::from_env(&env).unwrap();
        assert_eq!(
            env.unknown_clm_variables(),
            [
                (
                    "CLM_LOG_FROMAT".to_owned(),
                    Some("CLM_LOG_FORMAT".to_owned())
                ),
                ("CLM_NOTHING_LIKE_IT_AT_ALL".to_owned(), None),
            ]
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn the_otlp_endpoint_must_be_a_url() {
        for bad in [
            "not-a-url",
            "otel-collector:4317",
            "ftp://collector:4317",
            "http://",
        ] {
            let env = Env::from_pairs([("OTEL_EXPORTER_OTLP_ENDPOINT", bad)]);
            let err = PlatformConfig::from_env(&env).unwrap_err();
            assert_eq!(err.variable, "OTEL_EXPORTER_OTLP_ENDPOINT", "{bad}");
        }
        let env = Env::from_pairs([("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")]);
        let config = PlatformConfig::from_env(&env).unwrap();
        assert_eq!(config.otel.unwrap().endpoint, "http://127.0.0.1:4317");
    }

    #[test]
    fn defaults_make_the_embedded_mode_work() {
        let config = PlatformConfig::from_env(&Env::from_pairs::<_, &str, &str>([])).unwrap();
        assert_eq!(config.listen_addr.to_string(), "127.0.0.1:50051");
        assert!(config.redis_url.is_none());
        let env = Env::from_pairs::<_, &str, &str>([]);
        assert_eq!(
            config.database_url_for(&env, "identity").unwrap().expose(),
            "sqlite://data/identity.db"
        );
    }

    #[test]
    fn a_bad_variable_is_named() {
        let env = Env::from_pairs([("CLM_LISTEN_ADDR", "not-an-address")]);
        let err = PlatformConfig::from_env(&env).unwrap_err();
        assert_eq!(err.variable, "CLM_LISTEN_ADDR");

        let env = Env::from_pairs([("CLM_MAX_PAGE_SIZE", "0")]);
        assert_eq!(
            PlatformConfig::from_env(&env).unwrap_err().variable,
            "CLM_MAX_PAGE_SIZE"
        );

        let env = Env::from_pairs([("CLM_DATABASE_URL", "mysql://x")]);
        assert_eq!(
            PlatformConfig::from_env(&env).unwrap_err().variable,
            "CLM_DATABASE_URL"
        );

        let env = Env::from_pairs([("CLM_MIGRATE_ON_START", "maybe")]);
        assert_eq!(
            PlatformConfig::from_env(&env).unwrap_err().variable,
            "CLM_MIGRATE_ON_START"
        );
    }

    #[test]
    fn a_service_url_overrides_the_shared_one() {
        let env = Env::from_pairs([
            ("CLM_DATABASE_URL", "postgres://db/shared"),
            ("CLM_IDENTITY_DATABASE_URL", "postgres://db/identity"),
        ]);
        let config = PlatformConfig::from_env(&env).unwrap();
        assert_eq!(
            config.database_url_for(&env, "identity").unwrap().expose(),
            "postgres://db/identity"
        );
        assert_eq!(
            config.database_url_for(&env, "scoring").unwrap().expose(),
            "postgres://db/shared"
        );
    }
}
