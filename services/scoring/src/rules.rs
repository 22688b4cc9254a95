//! CEL rule conditions: compiled and checked once per model, evaluated many
//! times against a customer's feature map.
//!
//! Conditions run on the `cel` crate's interpreter with its standard library
//! and no optional features (no regular expressions, timestamps or
//! durations: the feature map has none). Because that interpreter does not
//! type-check, every condition is compiled through [`clm_cel`], which
//! checks it against the feature map's types.

use cel::{Context, Program, Value};
use clm_cel::{ConditionErrorKind, compile_checked, position_of};

use crate::feature_map::{Feature, FeatureSet};
use crate::literal_keys::unknown_literal_keys;
use crate::validation::ViolationReason;

/// The longest condition accepted, in characters.
pub const MAX_CONDITION_CHARS: usize = 4096;

/// Where a condition is used, which decides the features it may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleKind {
    /// A stage rule.
    Stage,
    /// A health rule.
    Health,
    /// A profile-fit rule of the lead score, which may not use `lead_score`.
    Fit,
}

/// How one rule came out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleOutcome {
    /// The condition was true.
    Matched,
    /// The condition was false.
    NotMatched,
    /// The condition failed at run time (counted as false), with the error.
    Error(String),
}

impl RuleOutcome {
    /// True for [`RuleOutcome::Matched`].
    pub fn matched(&self) -> bool {
        matches!(self, RuleOutcome::Matched)
    }
}

/// A condition that compiled, type-checked and yields a bool.
#[derive(Debug)]
pub struct CompiledCondition {
    program: Program,
    references: FeatureSet,
}

/// Compiles and checks one condition; on failure, the reason and a
/// description with the position in the expression.
pub fn compile_condition(
    source: &str,
    kind: RuleKind,
) -> Result<CompiledCondition, (ViolationReason, String)> {
    let resolve_feature = |name: &str| match Feature::from_name(name) {
        Some(Feature::LeadScore) if kind == RuleKind::Fit => {
            Err("'lead_score' is not available to fit rules, which compute it".to_owned())
        }
        Some(feature) => Ok(feature.cel_type()),
        None => Err(format!("unknown feature '{name}'")),
    };
    let program = compile_checked(source, &resolve_feature).map_err(|error| {
        let reason = match error.kind {
            ConditionErrorKind::Syntax => ViolationReason::SyntaxError,
            ConditionErrorKind::UnknownReference => ViolationReason::UnknownFeature,
            ConditionErrorKind::WrongType => ViolationReason::WrongType,
        };
        (reason, error.description)
    })?;
    if let Some(key) = unknown_literal_keys(program.expression())
        .into_iter()
        .next()
    {
        return Err((
            ViolationReason::UnknownKey,
            format!(
                "{}{}",
                position_of(&program, source, key.expr_id),
                key.message
            ),
        ));
    }
    let mut references = FeatureSet::default();
    for name in program.references().variables() {
        if let Some(feature) = Feature::from_name(name) {
            references.insert(feature);
        }
    }
    Ok(CompiledCondition {
        program,
        references,
    })
}

impl CompiledCondition {
    /// The features the condition references.
    pub fn references(&self) -> FeatureSet {
        self.references
    }

    /// The parsed expression, for time analysis.
    pub(crate) fn expression(&self) -> &cel::IdedExpr {
        self.program.expression()
    }

    /// Evaluates the condition with the variables bound in `context`.
    pub fn evaluate(&self, context: &Context<'_, '_>) -> RuleOutcome {
        match self.program.execute(context) {
            Ok(Value::Bool(true)) => RuleOutcome::Matched,
            Ok(Value::Bool(false)) => RuleOutcome::NotMatched,
            Ok(other) => RuleOutcome::Error(format!(
                "the condition yielded {:?}, not a bool",
                other.type_of()
            )),
            Err(error) => RuleOutcome::Error(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_bad_conditions() {
        let reason = |source: &str, kind| compile_condition(source, kind).unwrap_err().0;
        assert_eq!(
            reason("count['purchase']['all'] >=", RuleKind::Stage),
            ViolationReason::SyntaxError
        );
        assert_eq!(
            reason("purchases > 1", RuleKind::Stage),
            ViolationReason::UnknownFeature
        );
        assert_eq!(
            reason("lead_score > 1.0", RuleKind::Fit),
            ViolationReason::UnknownFeature
        );
        assert_eq!(
            reason("days_since_last_touch", RuleKind::Health),
            ViolationReason::WrongType
        );
        assert_eq!(
            reason("company > 1", RuleKind::Fit),
            ViolationReason::WrongType
        );

        let (_, description) = compile_condition("nps > 1 && bogus", RuleKind::Stage).unwrap_err();
        assert_eq!(description, "<input>:1:12: unknown feature 'bogus'");
        assert_eq!(
            reason("count['purchse']['all'] >= 1", RuleKind::Stage),
            ViolationReason::UnknownKey
        );
        let (_, description) =
            compile_condition("count['purchase']['13d'] >= 1", RuleKind::Stage).unwrap_err();
        assert!(description.starts_with("<input>:1:"), "{description}");
        assert!(description.contains("'13d'"), "{description}");
    }

    #[test]
    fn parse_errors_read_as_messages_with_a_position() {
        let deep = format!("{}1{} > 0", "(".repeat(400), ")".repeat(400));
        let garbage =
            "a ] b ] c ] d ] e ] f ] g ] h ] i ] j ] k ] l ] m ] n ] o ] p ] q ]".repeat(8);
        for source in [
            "count['purchase']['all'] >=",
            "nps >> 1",
            "\n  lead_score > )",
            deep.as_str(),
            garbage.as_str(),
        ] {
            let (reason, description) = compile_condition(source, RuleKind::Stage).unwrap_err();
            assert_eq!(reason, ViolationReason::SyntaxError, "{source}");
            assert!(
                description.starts_with("does not parse: <input>:")
                    || description == "does not parse: the expression could not be parsed",
                "{source}: {description}"
            );
            for debug_text in ["Error(", "ParseError", "Some(", "msg:"] {
                assert!(!description.contains(debug_text), "{source}: {description}");
            }
        }
        let (_, description) =
            compile_condition("\n  lead_score > )", RuleKind::Stage).unwrap_err();
        assert!(
            description.starts_with("does not parse: <input>:2:"),
            "{description}"
        );
        let (_, description) = compile_condition(&deep, RuleKind::Stage).unwrap_err();
        assert!(
            description.ends_with("nested too deeply (at most 96 levels)"),
            "{description}"
        );
    }

    #[test]
    fn records_referenced_features() {
        let compiled = compile_condition(
            "count.exists(t, count[t]['7d'] > 0) && nps >= 9",
            RuleKind::Stage,
        )
        .unwrap();
        let features: Vec<_> = compiled.references().iter().collect();
        assert_eq!(features, vec![Feature::Count, Feature::Nps]);
    }

    #[test]
    fn compiled_rules_are_shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CompiledCondition>();
        assert_send_sync::<cel::Env>();
    }
}
