//! A service's notion of "now" for what no event dates: scoring's sweep,
//! Evaluate and rescores, feedback's dispatch and expiry sweeps.
//!
//! It is the system clock, unless the service's `CLM_<NAME>_CLOCK_FILE`
//! names a file: then "now" is the RFC 3339 instant written in that file,
//! read on every use. That is a testing aid (a journey test moves time
//! forward by 120 days without waiting); never set it in production.

use std::path::PathBuf;

use chrono::{DateTime, Utc};

/// Where "now" comes from.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// The instant written in a file.
    File(PathBuf),
}

impl Clock {
    /// The clock a service's settings name: `CLM_<NAME>_CLOCK_FILE`, else
    /// the system clock.
    pub fn from_env(env: &crate::Env, service: &str) -> Self {
        let variable = format!("CLM_{}_CLOCK_FILE", service.to_ascii_uppercase());
        match env.string(&variable) {
            Some(path) => Self::File(PathBuf::from(path)),
            None => Self::System,
        }
    }

    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::File(path) => match std::fs::read_to_string(path) {
                Ok(text) => match DateTime::parse_from_rfc3339(text.trim()) {
                    Ok(at) => at.with_timezone(&Utc),
                    Err(err) => {
                        tracing::warn!(path = %path.display(), error = %err, "the clock file holds no RFC 3339 time; using the system clock");
                        Utc::now()
                    }
                },
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "cannot read the clock file; using the system clock");
                    Utc::now()
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_clock_reads_the_instant_each_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("now");
        std::fs::write(&path, "2030-01-02T03:04:05Z\n").expect("write");
        let clock = Clock::File(path.clone());
        assert_eq!(clock.now().to_rfc3339(), "2030-01-02T03:04:05+00:00");
        std::fs::write(&path, "2031-01-01T00:00:00+02:00").expect("write");
        assert_eq!(clock.now().to_rfc3339(), "2030-12-31T22:00:00+00:00");
    }
}
