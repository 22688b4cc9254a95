//! A static type checker for conditions.
//!
//! The `cel` crate parses and interprets but does not type-check, so this
//! module walks a parsed expression with the types of the variables its
//! caller declares (scoring's feature map, a survey trigger's event) and
//! reports, before a model or survey is accepted, what would otherwise only
//! fail (or silently yield false) at run time: an unknown variable or
//! function, an operator applied to the wrong types, a condition that is not
//! a bool.
//!
//! It supports what the interpreter runs without optional crate features: the
//! operators, the macros (`has`, `all`, `exists`, `exists_one`, `map`,
//! `filter`), `size`, `contains`, `startsWith`, `endsWith` and the type
//! conversions. Where a type cannot be known statically (`dyn`, mixed list
//! literals), it is `dyn` and accepted, as CEL checkers do.

use std::fmt;

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue, operators};

/// The static type of an expression.
#[derive(Clone, Debug, PartialEq)]
pub enum CelType {
    /// `bool`.
    Bool,
    /// `int`.
    Int,
    /// `uint`.
    Uint,
    /// `double`.
    Double,
    /// `string`.
    String,
    /// `bytes`.
    Bytes,
    /// `null_type`.
    Null,
    /// `list(T)`.
    List(Box<CelType>),
    /// `map(K, V)`.
    Map(Box<CelType>, Box<CelType>),
    /// A map with string keys, each of which is known with its own value
    /// type, e.g. an event: reading a key it does not have is refused.
    Record(Vec<(String, CelType)>),
    /// A type value such as `int`.
    Type,
    /// Not known statically.
    Dyn,
}

impl CelType {
    /// `map(K, V)`.
    pub fn map(key: CelType, value: CelType) -> Self {
        Self::Map(Box::new(key), Box::new(value))
    }

    /// A record with these keys and value types.
    pub fn record(fields: &[(&str, CelType)]) -> Self {
        Self::Record(
            fields
                .iter()
                .map(|(name, kind)| ((*name).to_owned(), kind.clone()))
                .collect(),
        )
    }

    /// A record as the map it is at run time, `map(string, dyn)`; other
    /// types as they are.
    fn widened(&self) -> CelType {
        match self {
            Self::Record(_) => Self::map(Self::String, Self::Dyn),
            other => other.clone(),
        }
    }

    fn is_numeric(&self) -> bool {
        matches!(self, Self::Int | Self::Uint | Self::Double)
    }
}

impl fmt::Display for CelType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bool => f.write_str("bool"),
            Self::Int => f.write_str("int"),
            Self::Uint => f.write_str("uint"),
            Self::Double => f.write_str("double"),
            Self::String => f.write_str("string"),
            Self::Bytes => f.write_str("bytes"),
            Self::Null => f.write_str("null_type"),
            Self::List(element) => write!(f, "list({element})"),
            Self::Map(key, value) => write!(f, "map({key}, {value})"),
            Self::Record(_) => f.write_str("map(string, dyn)"),
            Self::Type => f.write_str("type"),
            Self::Dyn => f.write_str("dyn"),
        }
    }
}

/// What kind of problem a condition has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TypeErrorKind {
    /// It references a feature or function that does not exist.
    UnknownReference,
    /// It does not type-check, or does not yield a bool.
    WrongType,
}

/// A problem found in a condition, at the expression with id `expr_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeError {
    /// What kind of problem.
    pub kind: TypeErrorKind,
    /// A lower-case explanation.
    pub message: String,
    /// The id of the offending expression, for its position.
    pub expr_id: u64,
}

/// Checks that `expr` is a bool over the features `resolve_feature` knows:
/// it returns a feature's type, or why the name is not available.
pub fn check_condition(
    expr: &IdedExpr,
    resolve_feature: &dyn Fn(&str) -> Result<CelType, String>,
) -> Result<(), TypeError> {
    let mut checker = Checker {
        resolve_feature,
        scopes: Vec::new(),
    };
    match checker.check(expr)? {
        CelType::Bool | CelType::Dyn => Ok(()),
        other => Err(wrong_type(
            expr,
            format!("the condition yields {other}, not bool"),
        )),
    }
}

/// Type names usable as values, e.g. in `type(x) == int`.
const TYPE_NAMES: &[&str] = &[
    "bool",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
];

struct Checker<'a> {
    resolve_feature: &'a dyn Fn(&str) -> Result<CelType, String>,
    /// Comprehension variables in scope, innermost last.
    scopes: Vec<(String, CelType)>,
}

fn wrong_type(expr: &IdedExpr, message: String) -> TypeError {
    TypeError {
        kind: TypeErrorKind::WrongType,
        message,
        expr_id: expr.id,
    }
}

fn unknown(expr: &IdedExpr, message: String) -> TypeError {
    TypeError {
        kind: TypeErrorKind::UnknownReference,
        message,
        expr_id: expr.id,
    }
}

/// The type of a record's field `name`, or an error at `expr` naming the
/// fields there are.
fn field_of(
    expr: &IdedExpr,
    fields: &[(String, CelType)],
    name: &str,
) -> Result<CelType, TypeError> {
    match fields.iter().find(|(field, _)| field == name) {
        Some((_, kind)) => Ok(kind.clone()),
        None => Err(unknown(
            expr,
            format!(
                "no key '{name}' here: the keys are {}",
                fields
                    .iter()
                    .map(|(field, _)| format!("'{field}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The common type of two expressions that may yield either.
fn join(a: &CelType, b: &CelType) -> CelType {
    if a == b {
        return a.clone();
    }
    let (a, b) = (&a.widened(), &b.widened());
    match (a, b) {
        _ if a == b => a.clone(),
        (CelType::List(x), CelType::List(y)) => CelType::List(Box::new(join(x, y))),
        (CelType::Map(k1, v1), CelType::Map(k2, v2)) => CelType::map(join(k1, k2), join(v1, v2)),
        _ => CelType::Dyn,
    }
}

/// Whether `==` between the two can ever be true.
fn comparable(a: &CelType, b: &CelType) -> bool {
    let (a, b) = (&a.widened(), &b.widened());
    match (a, b) {
        (CelType::Dyn, _) | (_, CelType::Dyn) | (CelType::Null, _) | (_, CelType::Null) => true,
        _ if a.is_numeric() && b.is_numeric() => true,
        (CelType::List(x), CelType::List(y)) => comparable(x, y),
        (CelType::Map(k1, v1), CelType::Map(k2, v2)) => comparable(k1, k2) && comparable(v1, v2),
        _ => std::mem::discriminant(a) == std::mem::discriminant(b),
    }
}

/// Whether `<` and friends apply to the two.
fn orderable(a: &CelType, b: &CelType) -> bool {
    match (a, b) {
        (CelType::Dyn, _) | (_, CelType::Dyn) => true,
        _ if a.is_numeric() && b.is_numeric() => true,
        (CelType::String, CelType::String)
        | (CelType::Bytes, CelType::Bytes)
        | (CelType::Bool, CelType::Bool) => true,
        _ => false,
    }
}

fn operator_symbol(function: &str) -> &str {
    function.trim_matches('_').trim_start_matches('@')
}

impl Checker<'_> {
    fn check(&mut self, expr: &IdedExpr) -> Result<CelType, TypeError> {
        match &expr.expr {
            Expr::Unspecified => Err(wrong_type(expr, "incomplete expression".into())),
            Expr::Literal(literal) => Ok(match literal {
                LiteralValue::Boolean(_) => CelType::Bool,
                LiteralValue::Bytes(_) => CelType::Bytes,
                LiteralValue::Double(_) => CelType::Double,
                LiteralValue::Int(_) => CelType::Int,
                LiteralValue::Null => CelType::Null,
                LiteralValue::String(_) => CelType::String,
                LiteralValue::UInt(_) => CelType::Uint,
            }),
            Expr::Ident(name) => self.ident(expr, name),
            Expr::Select(select) => {
                let operand = self.check(&select.operand)?;
                let value = match &operand {
                    CelType::Record(fields) => field_of(expr, fields, &select.field)?,
                    CelType::Map(key, value) if matches!(**key, CelType::String | CelType::Dyn) => {
                        (**value).clone()
                    }
                    CelType::Dyn => CelType::Dyn,
                    other => {
                        return Err(wrong_type(
                            expr,
                            format!("{other} has no field '{}'", select.field),
                        ));
                    }
                };
                Ok(if select.test { CelType::Bool } else { value })
            }
            Expr::List(list) => {
                let mut element: Option<CelType> = None;
                for item in &list.elements {
                    let item = self.check(item)?;
                    element = Some(match element {
                        None => item,
                        Some(previous) => join(&previous, &item),
                    });
                }
                Ok(CelType::List(Box::new(element.unwrap_or(CelType::Dyn))))
            }
            Expr::Map(map) => {
                let mut types: Option<(CelType, CelType)> = None;
                for entry in &map.entries {
                    let EntryExpr::MapEntry(entry) = &entry.expr else {
                        return Err(wrong_type(expr, "a map literal has a field entry".into()));
                    };
                    let key = self.check(&entry.key)?;
                    if !matches!(
                        key,
                        CelType::String
                            | CelType::Int
                            | CelType::Uint
                            | CelType::Bool
                            | CelType::Dyn
                    ) {
                        return Err(wrong_type(&entry.key, format!("{key} cannot be a map key")));
                    }
                    let value = self.check(&entry.value)?;
                    types = Some(match types {
                        None => (key, value),
                        Some((k, v)) => (join(&k, &key), join(&v, &value)),
                    });
                }
                let (key, value) = types.unwrap_or((CelType::Dyn, CelType::Dyn));
                Ok(CelType::map(key, value))
            }
            Expr::Struct(message) => Err(unknown(
                expr,
                format!("message type '{}' does not exist", message.type_name),
            )),
            Expr::Comprehension(comprehension) => {
                let range = self.check(&comprehension.iter_range)?;
                let (first, second) = match &range {
                    CelType::List(element) => {
                        if comprehension.iter_var2.is_some() {
                            (CelType::Int, (**element).clone())
                        } else {
                            ((**element).clone(), CelType::Dyn)
                        }
                    }
                    CelType::Map(key, value) => ((**key).clone(), (**value).clone()),
                    CelType::Record(_) => (CelType::String, CelType::Dyn),
                    CelType::Dyn => (CelType::Dyn, CelType::Dyn),
                    other => {
                        return Err(wrong_type(
                            &comprehension.iter_range,
                            format!("cannot iterate over {other}"),
                        ));
                    }
                };
                let accumulator = self.check(&comprehension.accu_init)?;
                let depth = self.scopes.len();
                self.scopes
                    .push((comprehension.accu_var.clone(), accumulator.clone()));
                self.scopes.push((comprehension.iter_var.clone(), first));
                if let Some(second_var) = &comprehension.iter_var2 {
                    self.scopes.push((second_var.clone(), second));
                }
                let checked = (|| {
                    let condition = self.check(&comprehension.loop_cond)?;
                    if !matches!(condition, CelType::Bool | CelType::Dyn) {
                        return Err(wrong_type(
                            &comprehension.loop_cond,
                            format!("a loop condition yields {condition}, not bool"),
                        ));
                    }
                    let step = self.check(&comprehension.loop_step)?;
                    let accumulated = join(&accumulator, &step);
                    self.scopes.truncate(depth);
                    self.scopes
                        .push((comprehension.accu_var.clone(), accumulated));
                    self.check(&comprehension.result)
                })();
                self.scopes.truncate(depth);
                checked
            }
            Expr::Call(call) => {
                let target = match &call.target {
                    Some(target) => Some(self.check(target)?),
                    None => None,
                };
                let mut args = Vec::with_capacity(call.args.len());
                for arg in &call.args {
                    args.push(self.check(arg)?);
                }
                // A record read with a literal key is read like a field.
                if call.func_name == operators::INDEX
                    && let (Some(CelType::Record(fields)), Some(key)) =
                        (args.first(), call.args.get(1))
                    && let Expr::Literal(LiteralValue::String(name)) = &key.expr
                {
                    return field_of(key, fields, name);
                }
                let args: Vec<CelType> = args.iter().map(CelType::widened).collect();
                let target = target.map(|target| target.widened());
                self.call(expr, &call.func_name, target, &args)
            }
        }
    }

    fn ident(&self, expr: &IdedExpr, name: &str) -> Result<CelType, TypeError> {
        if let Some((_, kind)) = self.scopes.iter().rev().find(|(var, _)| var == name) {
            return Ok(kind.clone());
        }
        if TYPE_NAMES.contains(&name) {
            return Ok(CelType::Type);
        }
        (self.resolve_feature)(name).map_err(|message| unknown(expr, message))
    }

    fn call(
        &self,
        expr: &IdedExpr,
        function: &str,
        target: Option<CelType>,
        args: &[CelType],
    ) -> Result<CelType, TypeError> {
        use CelType as T;
        let mismatch = || {
            let mut types: Vec<String> = target.iter().map(ToString::to_string).collect();
            types.extend(args.iter().map(ToString::to_string));
            let shown = if function.starts_with('_')
                || function.starts_with('@')
                || function.starts_with('!')
                || function.starts_with('-')
            {
                format!("'{}'", operator_symbol(function))
            } else {
                format!("{function}()")
            };
            wrong_type(
                expr,
                format!("{shown} does not apply to ({})", types.join(", ")),
            )
        };
        let is_bool = |t: &T| matches!(t, T::Bool | T::Dyn);
        match (function, &target, args) {
            (operators::LOGICAL_AND | operators::LOGICAL_OR, None, [a, b]) => {
                if is_bool(a) && is_bool(b) {
                    Ok(T::Bool)
                } else {
                    Err(mismatch())
                }
            }
            (operators::LOGICAL_NOT | operators::NOT_STRICTLY_FALSE, None, [a]) => {
                if is_bool(a) {
                    Ok(T::Bool)
                } else {
                    Err(mismatch())
                }
            }
            (operators::CONDITIONAL, None, [condition, a, b]) => {
                if is_bool(condition) {
                    Ok(join(a, b))
                } else {
                    Err(mismatch())
                }
            }
            (operators::EQUALS | operators::NOT_EQUALS, None, [a, b]) => {
                if comparable(a, b) {
                    Ok(T::Bool)
                } else {
                    Err(wrong_type(
                        expr,
                        format!("comparing {a} with {b} is never true"),
                    ))
                }
            }
            (
                operators::LESS
                | operators::LESS_EQUALS
                | operators::GREATER
                | operators::GREATER_EQUALS,
                None,
                [a, b],
            ) => {
                if orderable(a, b) {
                    Ok(T::Bool)
                } else {
                    Err(mismatch())
                }
            }
            (operators::ADD, None, [a, b]) => match (a, b) {
                (T::Dyn, _) | (_, T::Dyn) => Ok(T::Dyn),
                (T::List(x), T::List(y)) => Ok(T::List(Box::new(join(x, y)))),
                (T::Int | T::Uint | T::Double | T::String | T::Bytes, _) if a == b => Ok(a.clone()),
                _ => Err(mismatch()),
            },
            (operators::SUBSTRACT | operators::MULTIPLY | operators::DIVIDE, None, [a, b]) => {
                match (a, b) {
                    (T::Dyn, _) | (_, T::Dyn) => Ok(T::Dyn),
                    _ if a.is_numeric() && a == b => Ok(a.clone()),
                    _ => Err(mismatch()),
                }
            }
            (operators::MODULO, None, [a, b]) => match (a, b) {
                (T::Dyn, _) | (_, T::Dyn) => Ok(T::Dyn),
                (T::Int, T::Int) | (T::Uint, T::Uint) => Ok(a.clone()),
                _ => Err(mismatch()),
            },
            (operators::NEGATE, None, [a]) => match a {
                T::Int | T::Double | T::Dyn => Ok(a.clone()),
                _ => Err(mismatch()),
            },
            (operators::INDEX, None, [container, index]) => match container {
                T::List(element) if matches!(index, T::Int | T::Uint | T::Dyn) => {
                    Ok((**element).clone())
                }
                T::Map(key, value) if comparable(key, index) => Ok((**value).clone()),
                T::Dyn => Ok(T::Dyn),
                _ => Err(mismatch()),
            },
            (operators::IN, None, [element, container]) => match container {
                T::List(item) if comparable(element, item) => Ok(T::Bool),
                T::Map(key, _) if comparable(element, key) => Ok(T::Bool),
                T::Dyn => Ok(T::Bool),
                _ => Err(mismatch()),
            },
            ("size", None, [a]) | ("size", Some(a), []) => match a {
                T::String | T::Bytes | T::List(_) | T::Map(..) | T::Dyn => Ok(T::Int),
                _ => Err(mismatch()),
            },
            ("contains" | "startsWith" | "endsWith", Some(a), [b]) => match (a, b) {
                (T::String | T::Dyn, T::String | T::Dyn) => Ok(T::Bool),
                _ => Err(mismatch()),
            },
            ("int" | "uint", None, [a]) => match a {
                T::Int | T::Uint | T::Double | T::String | T::Dyn => {
                    Ok(if function == "int" { T::Int } else { T::Uint })
                }
                _ => Err(mismatch()),
            },
            ("double", None, [a]) => match a {
                T::Int | T::Uint | T::Double | T::String | T::Dyn => Ok(T::Double),
                _ => Err(mismatch()),
            },
            ("string", None, [a]) => match a {
                T::Int | T::Uint | T::Double | T::String | T::Bool | T::Bytes | T::Dyn => {
                    Ok(T::String)
                }
                _ => Err(mismatch()),
            },
            ("bool", None, [a]) => match a {
                T::Bool | T::String | T::Dyn => Ok(T::Bool),
                _ => Err(mismatch()),
            },
            ("bytes", None, [a]) => match a {
                T::String | T::Bytes | T::Dyn => Ok(T::Bytes),
                _ => Err(mismatch()),
            },
            ("dyn", None, [_]) => Ok(T::Dyn),
            ("type", None, [_]) => Ok(T::Type),
            (
                operators::LOGICAL_AND
                | operators::LOGICAL_OR
                | operators::LOGICAL_NOT
                | operators::NOT_STRICTLY_FALSE
                | operators::CONDITIONAL
                | operators::EQUALS
                | operators::NOT_EQUALS
                | operators::LESS
                | operators::LESS_EQUALS
                | operators::GREATER
                | operators::GREATER_EQUALS
                | operators::ADD
                | operators::SUBSTRACT
                | operators::MULTIPLY
                | operators::DIVIDE
                | operators::MODULO
                | operators::NEGATE
                | operators::INDEX
                | operators::IN
                | "size"
                | "contains"
                | "startsWith"
                | "endsWith"
                | "int"
                | "uint"
                | "double"
                | "string"
                | "bool"
                | "bytes"
                | "dyn"
                | "type",
                _,
                _,
            ) => Err(mismatch()),
            _ => Err(unknown(
                expr,
                format!("function '{function}' does not exist"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(name: &str) -> Result<CelType, String> {
        match name {
            "count" => Ok(CelType::map(
                CelType::String,
                CelType::map(CelType::String, CelType::Int),
            )),
            "revenue" => Ok(CelType::map(CelType::String, CelType::Double)),
            "nps" => Ok(CelType::Int),
            "lead_score" => Ok(CelType::Double),
            "industry" => Ok(CelType::String),
            "identified" => Ok(CelType::Bool),
            "event" => Ok(CelType::record(&[
                ("to_stage", CelType::String),
                ("revenue", CelType::Double),
            ])),
            _ => Err(format!("unknown feature '{name}'")),
        }
    }

    #[test]
    fn records_know_their_keys_and_the_type_of_each() {
        for source in [
            "event.to_stage == 'CONVERSION' && event.revenue > 10.0",
            "event['to_stage'].startsWith('CONV')",
            "'to_stage' in event && size(event) == 2",
            "event.exists(k, k == 'revenue')",
            "has(event.revenue)",
            "event == {'to_stage': 'REACH', 'revenue': 0.0}",
        ] {
            assert_eq!(check(source), Ok(()), "{source}");
        }
        let (kind, message) = check("event.to_stge == 'CONVERSION'").unwrap_err();
        assert_eq!(kind, TypeErrorKind::UnknownReference);
        assert_eq!(
            message,
            "no key 'to_stge' here: the keys are 'to_stage', 'revenue'"
        );
        let (kind, _) = check("event['revenu'] > 1.0").unwrap_err();
        assert_eq!(kind, TypeErrorKind::UnknownReference);
        let (kind, _) = check("event.to_stage > 1").unwrap_err();
        assert_eq!(kind, TypeErrorKind::WrongType);
        let (kind, _) = check("event.revenue").unwrap_err();
        assert_eq!(kind, TypeErrorKind::WrongType);
    }

    fn check(source: &str) -> Result<(), (TypeErrorKind, String)> {
        let program = cel::Env::stdlib().compile(source).expect("parses");
        check_condition(program.expression(), &features).map_err(|e| (e.kind, e.message))
    }

    #[test]
    fn accepts_well_typed_conditions() {
        for source in [
            "count['purchase']['all'] >= 1",
            "count.purchase.all + count['renewal']['30d'] > 2 && nps >= 9",
            "revenue['EUR'] > 1000",
            "lead_score >= 40.0 || identified",
            "industry in ['software', 'fintech']",
            "'custom.webinar' in count && count['custom.webinar']['all'] > 0",
            "count.exists(t, t.startsWith('custom.') && count[t]['7d'] > 0)",
            "count.all(t, count[t].all >= 0)",
            "[1, 2].map(x, x * 2).exists(y, y > 3)",
            "size(revenue) > 0 && revenue.size() < 10",
            "has(revenue.EUR)",
            "double(nps) / 2.0 > 1.0",
            "type(nps) == int",
            "nps == 10.0",
            "dyn(nps) + 1 > 1",
            "true ? nps > 1 : false",
        ] {
            assert_eq!(check(source), Ok(()), "{source}");
        }
    }

    #[test]
    fn rejects_unknown_references() {
        for source in [
            "foo > 1",
            "max(nps, 1) > 1",
            "industry.matches('x')",
            "[1].exists(x, y > 1)",
        ] {
            let (kind, message) = check(source).unwrap_err();
            assert_eq!(kind, TypeErrorKind::UnknownReference, "{source}: {message}");
        }
    }

    #[test]
    fn rejects_wrong_types() {
        for source in [
            "nps",
            "lead_score + 1",
            "industry > 3",
            "nps + 1.5 > 2.0",
            "industry == 1",
            "count['purchase'] > 1",
            "identified && nps",
            "nps.size() > 1",
            "[1, 2].exists(x, x)",
            "count[1]['all'] > 0",
        ] {
            let (kind, message) = check(source).unwrap_err();
            assert_eq!(kind, TypeErrorKind::WrongType, "{source}: {message}");
        }
    }
}
