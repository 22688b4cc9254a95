//! CEL conditions as clm uses them: parsed once with the `cel` crate's
//! standard library, statically type-checked against the variables a caller
//! declares ([`check`]), with errors a user can act on: what is wrong and
//! where (`<input>:line:column: …`).
//!
//! The scoring service's model rules and the feedback service's survey
//! triggers both compile through [`compile_checked`]; what a variable is,
//! and which extra checks apply (literal keys of documented maps), stays
//! with each service.

use std::sync::{Arc, OnceLock};

use cel::{Env, Program};

pub mod check;

pub use check::{CelType, TypeError, TypeErrorKind, check_condition};

/// Why a condition was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionErrorKind {
    /// It does not parse.
    Syntax,
    /// It references a variable or function that does not exist.
    UnknownReference,
    /// It does not type-check, or does not yield a bool.
    WrongType,
}

/// A refused condition: the kind and a lower-case description that starts
/// with the position, e.g. `<input>:1:12: unknown feature 'bogus'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionError {
    /// Why.
    pub kind: ConditionErrorKind,
    /// What and where, for the user.
    pub description: String,
}

/// The CEL environment of every rule: the standard library, without the
/// optional-value syntax.
pub fn rule_env() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib().with_optional_support(false)))
        .clone()
}

/// Parses `source` and checks that it is a bool over the variables
/// `resolve` knows (it returns a variable's type, or why the name is not
/// available).
pub fn compile_checked(
    source: &str,
    resolve: &dyn Fn(&str) -> Result<CelType, String>,
) -> Result<Program, ConditionError> {
    let program = rule_env()
        .compile(source)
        .map_err(|errors| ConditionError {
            kind: ConditionErrorKind::Syntax,
            description: format!("does not parse: {}", parse_error_message(source, &errors)),
        })?;
    check_condition(program.expression(), resolve).map_err(|error| ConditionError {
        kind: match error.kind {
            TypeErrorKind::UnknownReference => ConditionErrorKind::UnknownReference,
            TypeErrorKind::WrongType => ConditionErrorKind::WrongType,
        },
        description: format!(
            "{}{}",
            position_of(&program, source, error.expr_id),
            error.message
        ),
    })?;
    Ok(program)
}

/// `<input>:line:column: ` of the expression `expr_id`, or nothing when the
/// parser did not record where it was written.
pub fn position_of(program: &Program, source: &str, expr_id: u64) -> String {
    program
        .source_info()
        .offset_for(expr_id)
        .map(|(start, _)| line_and_column(source, start as usize))
        .map_or(String::new(), |(line, column)| {
            format!("<input>:{line}:{column}: ")
        })
}

/// The first parse error as a user reads it: `<input>:line:column: what`.
/// The parser wraps some errors (a recursion limit, too many syntax errors)
/// in its own error type, whose text is Rust debug output; those are
/// unwrapped to the error inside.
fn parse_error_message(source: &str, errors: &cel::ParseErrors) -> String {
    let Some(first) = errors.errors.first() else {
        return "the expression could not be parsed".to_owned();
    };
    let mut line_column = (first.pos.0 > 0).then_some((first.pos.0, first.pos.1));
    let mut message = first.msg.clone();
    if let Some(cause) = first.source.as_deref() {
        let mut innermost: &(dyn std::error::Error + 'static) = cause;
        while let Some(next) = innermost.source() {
            innermost = next;
        }
        if let Some(inner) = innermost.downcast_ref::<cel::ParseError>() {
            // Inner positions are character offsets of the offending tokens.
            let (line, column) = line_and_column(source, inner.pos.0.max(0) as usize);
            line_column = Some((line as isize, column as isize));
            message = inner.msg.clone();
        } else if std::ptr::addr_eq(innermost, cause) {
            // No inner error: the parser gave up without saying where.
            message = "the expression could not be parsed".to_owned();
        } else {
            message = innermost.to_string();
        }
    }
    // The parser's error listener writes a wrapped error as its debug text,
    // `OtherError(ParseError { …, msg: "Recursion limit of 96 exceeded", … })`:
    // only the quoted message is for the user.
    if message.contains("Error(") {
        message = message
            .split_once("msg: \"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map_or_else(
                || "the expression could not be parsed".to_owned(),
                |(inner, _)| match inner.strip_prefix("Recursion limit of ") {
                    Some(rest) => format!(
                        "the expression is nested too deeply (at most {} levels)",
                        rest.trim_end_matches(" exceeded")
                    ),
                    None => inner.to_owned(),
                },
            );
    }
    let message = lowercase_first(message.strip_prefix("Syntax error: ").unwrap_or(&message));
    match line_column {
        Some((line, column)) => format!("<input>:{line}:{column}: {message}"),
        None => message,
    }
}

/// `text` with its first letter in lower case, as every clm message.
fn lowercase_first(text: &str) -> String {
    let mut characters = text.chars();
    match characters.next() {
        Some(first) => first.to_lowercase().chain(characters).collect(),
        None => String::new(),
    }
}

/// The 1-based line and column of a character offset.
fn line_and_column(source: &str, offset: usize) -> (usize, usize) {
    let mut line = 1;
    let mut column = 1;
    for character in source.chars().take(offset) {
        if character == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two declared variables: `score` (int) and `stage` (string).
    fn resolve(name: &str) -> Result<CelType, String> {
        match name {
            "score" => Ok(CelType::Int),
            "stage" => Ok(CelType::String),
            other => Err(format!("unknown variable '{other}'")),
        }
    }

    fn refused(source: &str) -> ConditionError {
        compile_checked(source, &resolve).unwrap_err()
    }

    #[test]
    fn a_condition_over_declared_variables_compiles() {
        let program = compile_checked("score >= 9 && stage == 'CONVERSION'", &resolve).unwrap();
        let references = program.references();
        let mut names: Vec<&str> = references.variables().into_iter().collect();
        names.sort_unstable();
        assert_eq!(names, ["score", "stage"]);
    }

    #[test]
    fn each_refusal_says_why_and_where() {
        let unknown = refused("score > 1 && bogus");
        assert_eq!(unknown.kind, ConditionErrorKind::UnknownReference);
        assert_eq!(
            unknown.description,
            "<input>:1:14: unknown variable 'bogus'"
        );
        let wrong = refused("stage > 1");
        assert_eq!(wrong.kind, ConditionErrorKind::WrongType);
        assert!(wrong.description.starts_with("<input>:1:"), "{wrong:?}");
        let not_bool = refused("score + 1");
        assert_eq!(not_bool.kind, ConditionErrorKind::WrongType);
        assert!(not_bool.description.contains("not bool"), "{not_bool:?}");
        let syntax = refused("\n  score > )");
        assert_eq!(syntax.kind, ConditionErrorKind::Syntax);
        assert!(
            syntax.description.starts_with("does not parse: <input>:2:"),
            "{syntax:?}"
        );
    }
}
