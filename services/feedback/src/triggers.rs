//! Survey triggers: CEL conditions over one event of a log (`event`) and
//! the customer's latest lifecycle snapshot (`lifecycle`), compiled and
//! type-checked through `clm_cel` when a survey is stored, exactly as the
//! scoring service checks its rules. Both variables are records: reading a
//! key they do not have, by field or by literal index, is refused with its
//! position.

use cel::{Context, Program, Value};
use clm_cel::{CelType, ConditionErrorKind, compile_checked};

use crate::model::TriggerSource;

/// The longest condition accepted, in characters.
pub const MAX_CONDITION_CHARS: usize = 4096;

/// The keys of `event` for a source, with their types.
pub fn event_keys(source: TriggerSource) -> &'static [(&'static str, CelType)] {
    const TRANSITION: &[(&str, CelType)] = &[
        ("from_stage", CelType::String),
        ("to_stage", CelType::String),
        ("from_acquisition_status", CelType::String),
        ("to_acquisition_status", CelType::String),
        ("from_health", CelType::String),
        ("to_health", CelType::String),
        ("stage_rule", CelType::String),
        ("health_rule", CelType::String),
        ("cause", CelType::String),
        ("model_version", CelType::String),
    ];
    const TOUCHPOINT: &[(&str, CelType)] = &[
        ("type", CelType::String),
        ("channel", CelType::String),
        ("campaign", CelType::String),
        ("utm_source", CelType::String),
        ("utm_medium", CelType::String),
        ("currency", CelType::String),
        ("revenue", CelType::Double),
    ];
    match source {
        TriggerSource::Transition => TRANSITION,
        TriggerSource::Touchpoint => TOUCHPOINT,
    }
}

/// The keys of `lifecycle`, with their types.
pub const LIFECYCLE_KEYS: &[(&str, CelType)] = &[
    ("stage", CelType::String),
    ("acquisition_status", CelType::String),
    ("health", CelType::String),
    ("engagement_score", CelType::Double),
    ("lead_score", CelType::Double),
    ("health_score", CelType::Double),
];

/// Why a condition was refused: a reason for the field violation and the
/// description with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionRefused {
    /// `SYNTAX_ERROR`, `UNKNOWN_REFERENCE`, `UNKNOWN_KEY` or `WRONG_TYPE`.
    pub reason: &'static str,
    /// What and where.
    pub description: String,
}

/// A checked trigger condition, ready to evaluate.
#[derive(Debug)]
pub struct CompiledTrigger {
    program: Program,
}

/// Compiles and checks a condition for `source`.
pub fn compile(
    source: TriggerSource,
    condition: &str,
) -> Result<CompiledTrigger, ConditionRefused> {
    let event = CelType::record(event_keys(source));
    let lifecycle = CelType::record(LIFECYCLE_KEYS);
    let resolve = |name: &str| match name {
        "event" => Ok(event.clone()),
        "lifecycle" => Ok(lifecycle.clone()),
        other => Err(format!(
            "unknown variable '{other}': a trigger sees 'event' and 'lifecycle'"
        )),
    };
    let program = compile_checked(condition, &resolve).map_err(|error| ConditionRefused {
        reason: match error.kind {
            ConditionErrorKind::Syntax => "SYNTAX_ERROR",
            ConditionErrorKind::UnknownReference if error.description.contains("no key") => {
                "UNKNOWN_KEY"
            }
            ConditionErrorKind::UnknownReference => "UNKNOWN_REFERENCE",
            ConditionErrorKind::WrongType => "WRONG_TYPE",
        },
        description: error.description,
    })?;
    Ok(CompiledTrigger { program })
}

/// A value of `event` or `lifecycle`.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    /// A string.
    Text(String),
    /// A double.
    Number(f64),
}

impl CompiledTrigger {
    /// Whether the condition holds for `event` and `lifecycle` (their keys
    /// as [`event_keys`] and [`LIFECYCLE_KEYS`] list them). An evaluation
    /// error is a non-match, with the error.
    pub fn matches(
        &self,
        event: &[(&'static str, Field)],
        lifecycle: &[(&'static str, Field)],
    ) -> Result<bool, String> {
        let mut context = Context::default();
        context.add_variable_from_value("event", to_map(event));
        context.add_variable_from_value("lifecycle", to_map(lifecycle));
        match self.program.execute(&context) {
            Ok(Value::Bool(matched)) => Ok(matched),
            Ok(other) => Err(format!(
                "the condition yielded {:?}, not a bool",
                other.type_of()
            )),
            Err(error) => Err(error.to_string()),
        }
    }
}

fn to_map(fields: &[(&'static str, Field)]) -> Value {
    let map: std::collections::HashMap<String, Value> = fields
        .iter()
        .map(|(key, value)| {
            let value = match value {
                Field::Text(text) => Value::String(text.clone().into()),
                Field::Number(number) => Value::Float(*number),
            };
            ((*key).to_owned(), value)
        })
        .collect();
    Value::from(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_conditions_are_refused_with_their_reason() {
        let reason = |source, condition| compile(source, condition).unwrap_err().reason;
        assert_eq!(
            reason(TriggerSource::Transition, "event.to_stage =="),
            "SYNTAX_ERROR"
        );
        assert_eq!(
            reason(TriggerSource::Transition, "stage == 'CONVERSION'"),
            "UNKNOWN_REFERENCE"
        );
        assert_eq!(
            reason(TriggerSource::Transition, "event.to_stag == 'CONVERSION'"),
            "UNKNOWN_KEY"
        );
        assert_eq!(
            reason(TriggerSource::Transition, "event['revenue'] > 1.0"),
            "UNKNOWN_KEY"
        );
        assert_eq!(
            reason(TriggerSource::Touchpoint, "event.revenue == 'high'"),
            "WRONG_TYPE"
        );
        assert_eq!(
            reason(TriggerSource::Touchpoint, "event.type"),
            "WRONG_TYPE"
        );
        let refused = compile(
            TriggerSource::Transition,
            "event.to_stage == 'X' && event.bogus",
        )
        .unwrap_err();
        assert!(
            refused.description.starts_with("<input>:1:"),
            "{}",
            refused.description
        );
        assert!(
            refused.description.contains("bogus"),
            "{}",
            refused.description
        );
    }

    #[test]
    fn a_condition_matches_the_event_it_describes() {
        let trigger = compile(
            TriggerSource::Transition,
            "event.to_stage == 'CONVERSION' && event.from_stage != 'CONVERSION' \
             && lifecycle.health_score >= 50.0",
        )
        .unwrap();
        let event = |from: &str, to: &str| {
            event_keys(TriggerSource::Transition)
                .iter()
                .map(|(key, _)| {
                    let value = match *key {
                        "from_stage" => from,
                        "to_stage" => to,
                        _ => "",
                    };
                    (*key, Field::Text(value.to_owned()))
                })
                .collect::<Vec<_>>()
        };
        let lifecycle = |health: f64| {
            LIFECYCLE_KEYS
                .iter()
                .map(|(key, _)| match *key {
                    "health_score" => (*key, Field::Number(health)),
                    "engagement_score" | "lead_score" => (*key, Field::Number(0.0)),
                    _ => (*key, Field::Text(String::new())),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            trigger.matches(&event("ACQUISITION", "CONVERSION"), &lifecycle(80.0)),
            Ok(true)
        );
        assert_eq!(
            trigger.matches(&event("CONVERSION", "CONVERSION"), &lifecycle(80.0)),
            Ok(false)
        );
        assert_eq!(
            trigger.matches(&event("ACQUISITION", "CONVERSION"), &lifecycle(10.0)),
            Ok(false)
        );
    }
}
