//! The benchmark's figures as an aligned text table or one JSON object.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::load::PhaseMeasurement;

/// The ratio to the health baseline that a cache hit must reach.
pub const TARGET_RATIO: f64 = 0.70;

/// Which phase of a server is the no-op baseline the others compare to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseRole {
    /// The health Check.
    Baseline,
    /// A GetCustomer phase.
    Measured,
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct PhaseRow {
    /// The server the phase ran against, e.g. `A (in-process cache)`.
    pub server: String,
    /// What was measured.
    pub phase: &'static str,
    /// Baseline or not.
    pub role: PhaseRole,
    /// The figures, or why there are none.
    pub measurement: Result<PhaseMeasurement, String>,
}

/// The comparison the issue sets a target for.
#[derive(Debug, Clone)]
pub struct TargetCheck {
    /// e.g. `Redis-hit / health`.
    pub label: &'static str,
    /// The server both phases ran against.
    pub server: String,
    /// The phase compared to the baseline.
    pub phase: &'static str,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// How the load was generated, one line.
    pub setup: String,
    /// The same, as JSON fields.
    pub setup_json: Value,
    /// The phases in the order they ran.
    pub rows: Vec<PhaseRow>,
    /// The target comparison, if this run has one.
    pub target: Option<TargetCheck>,
    /// Remarks worth reading next to the figures.
    pub notes: Vec<String>,
}

impl Report {
    fn baseline_rate(&self, server: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|row| row.server == server && row.role == PhaseRole::Baseline)
            .and_then(|row| row.measurement.as_ref().ok())
            .map(PhaseMeasurement::requests_per_second)
            .filter(|rate| *rate > 0.0)
    }

    /// The row's rate divided by the health rate of the same server.
    pub fn ratio_to_health(&self, row: &PhaseRow) -> Option<f64> {
        let rate = row.measurement.as_ref().ok()?.requests_per_second();
        Some(rate / self.baseline_rate(&row.server)?)
    }

    /// The target's ratio, or why it was not measured.
    pub fn target_ratio(&self) -> Option<Result<f64, String>> {
        let target = self.target.as_ref()?;
        let Some(row) = self
            .rows
            .iter()
            .find(|row| row.server == target.server && row.phase == target.phase)
        else {
            return Some(Err("the phase did not run".to_owned()));
        };
        Some(match &row.measurement {
            Err(reason) => Err(reason.clone()),
            Ok(_) => self
                .ratio_to_health(row)
                .ok_or_else(|| "no health baseline for the same server".to_owned()),
        })
    }

    /// The aligned text table, the target line and the notes.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(text, "{}", self.setup);
        let server_width = self
            .rows
            .iter()
            .map(|row| row.server.len())
            .chain(["server".len()])
            .max()
            .unwrap_or(0);
        let phase_width = self
            .rows
            .iter()
            .map(|row| row.phase.len())
            .chain(["phase".len()])
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            text,
            "{:<server_width$}  {:<phase_width$}  {:>9}  {:>6}  {:>9}  {:>8}  {:>8}  {:>8}",
            "server", "phase", "requests", "errors", "req/s", "p50 ms", "p99 ms", "x health"
        );
        for row in &self.rows {
            match &row.measurement {
                Ok(measured) => {
                    let _ = writeln!(
                        text,
                        "{:<server_width$}  {:<phase_width$}  {:>9}  {:>6}  {:>9.0}  {:>8}  {:>8}  {:>8}",
                        row.server,
                        row.phase,
                        measured.requests,
                        measured.errors.total(),
                        measured.requests_per_second(),
                        format_ms(measured.percentile_ms(50.0)),
                        format_ms(measured.percentile_ms(99.0)),
                        self.ratio_to_health(row)
                            .map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.2}")),
                    );
                }
                Err(reason) => {
                    let _ = writeln!(
                        text,
                        "{:<server_width$}  {:<phase_width$}  not measured: {reason}",
                        row.server, row.phase
                    );
                }
            }
        }
        for row in &self.rows {
            if let Ok(measured) = &row.measurement {
                for (code, (count, first_message)) in &measured.errors.by_code {
                    let _ = writeln!(
                        text,
                        "errors in {} / {}: {count} x {code} (first: {first_message})",
                        row.server, row.phase
                    );
                }
            }
        }
        if let (Some(target), Some(ratio)) = (&self.target, self.target_ratio()) {
            match ratio {
                Ok(ratio) => {
                    let verdict = if ratio >= TARGET_RATIO {
                        "MET"
                    } else {
                        "NOT MET"
                    };
                    let _ = writeln!(
                        text,
                        "{}: {ratio:.2} (target >= {TARGET_RATIO:.2}): {verdict}",
                        target.label
                    );
                }
                Err(reason) => {
                    let _ = writeln!(text, "{}: not measured: {reason}", target.label);
                }
            }
        }
        for note in &self.notes {
            let _ = writeln!(text, "note: {note}");
        }
        text
    }

    /// The same figures as one JSON object.
    pub fn to_json(&self) -> Value {
        let phases: Vec<Value> = self
            .rows
            .iter()
            .map(|row| match &row.measurement {
                Ok(measured) => json!({
                    "server": row.server,
                    "phase": row.phase,
                    "baseline": row.role == PhaseRole::Baseline,
                    "requests": measured.requests,
                    "errors": measured.errors.total(),
                    "errors_by_code": measured.errors.by_code.iter().map(|(code, (count, first_message))| {
                        (code.clone(), json!({ "count": count, "first_message": first_message }))
                    }).collect::<serde_json::Map<String, Value>>(),
                    "seconds": measured.elapsed.as_secs_f64(),
                    "requests_per_second": measured.requests_per_second(),
                    "p50_ms": measured.percentile_ms(50.0),
                    "p99_ms": measured.percentile_ms(99.0),
                    "ratio_to_health": self.ratio_to_health(row),
                }),
                Err(reason) => json!({
                    "server": row.server,
                    "phase": row.phase,
                    "baseline": row.role == PhaseRole::Baseline,
                    "not_measured": reason,
                }),
            })
            .collect();
        let target = match (&self.target, self.target_ratio()) {
            (Some(target), Some(Ok(ratio))) => json!({
                "label": target.label,
                "ratio": ratio,
                "target": TARGET_RATIO,
                "met": ratio >= TARGET_RATIO,
            }),
            (Some(target), Some(Err(reason))) => json!({
                "label": target.label,
                "target": TARGET_RATIO,
                "not_measured": reason,
            }),
            _ => Value::Null,
        };
        json!({
            "setup": self.setup_json,
            "phases": phases,
            "target": target,
            "notes": self.notes,
        })
    }
}

fn format_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.3}"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bench::load::ErrorTally;

    fn measured(requests: u64) -> Result<PhaseMeasurement, String> {
        Ok(PhaseMeasurement {
            requests,
            errors: ErrorTally::default(),
            elapsed: Duration::from_secs(1),
            latencies_micros: vec![1000; requests as usize],
        })
    }

    fn report(redis_hit: Result<PhaseMeasurement, String>) -> Report {
        Report {
            setup: "setup".to_owned(),
            setup_json: Value::Null,
            rows: vec![
                PhaseRow {
                    server: "B".to_owned(),
                    phase: "hit",
                    role: PhaseRole::Measured,
                    measurement: redis_hit,
                },
                PhaseRow {
                    server: "B".to_owned(),
                    phase: "health",
                    role: PhaseRole::Baseline,
                    measurement: measured(100),
                },
            ],
            target: Some(TargetCheck {
                label: "Redis-hit / health",
                server: "B".to_owned(),
                phase: "hit",
            }),
            notes: Vec::new(),
        }
    }

    #[test]
    fn ratios_compare_to_the_health_rate_of_the_same_server() {
        let report = report(measured(75));
        assert_eq!(report.ratio_to_health(&report.rows[0]), Some(0.75));
        let text = report.to_text();
        assert!(
            text.contains("Redis-hit / health: 0.75 (target >= 0.70): MET"),
            "{text}"
        );
        assert_eq!(report.to_json()["target"]["met"], json!(true));
    }

    #[test]
    fn a_phase_not_measured_says_why() {
        let report = report(Err("redis unreachable".to_owned()));
        let text = report.to_text();
        assert!(text.contains("not measured: redis unreachable"), "{text}");
        assert!(
            text.contains("Redis-hit / health: not measured: redis unreachable"),
            "{text}"
        );
    }
}
