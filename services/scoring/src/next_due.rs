//! When an evaluation would change because time passes and nothing else
//! happens: the time the sweep should evaluate the customer again.
//!
//! The result of an ordered rule list is decided by the rules up to and
//! including the one that matched (all of them when none did): it changes
//! only when one of those rules changes its outcome. For each such rule the
//! condition is walked to find the earliest time its value could change:
//!
//! - `days_since_* OP literal` (and `days_in_*`): exactly when the day count
//!   crosses the literal (day counts step up every 24 hours after their
//!   anchor time, and never change when the anchor is unknown);
//! - other uses of a day count: when it next steps;
//! - `count` and `channel_count`: when a touchpoint next leaves a rolling
//!   window used (any window, when the keys are not literals);
//! - `a && b` with one side false for good (or `a || b` with one side true
//!   for good): never;
//! - scores (`engagement_score`, `lead_score`, `health_score`) decay
//!   continuously: the conservative answer, now plus the model's sweep
//!   interval;
//! - everything else (profile, feedback, counts over all time, thresholds,
//!   the state): never, as time alone does not change it.
//!
//! The answer may be early (then the sweep finds nothing changed and
//! computes the next time) but is never late for the cases above.

use cel::common::ast::{Expr, IdedExpr, LiteralValue, operators};
use cel::{Context, Value};
use chrono::{DateTime, Duration, Utc};

use crate::activity::ActivityHistory;
use crate::feature_map::{Feature, FeatureContext, TimeBehaviour, WINDOWS};
use crate::rules::CompiledCondition;
use crate::vocabulary::CHANNELS;

/// What the analysis of one condition needs.
pub(crate) struct TimeAnalysis<'a, 'c> {
    /// The features, at the evaluation time, with the state after it.
    pub features: &'a FeatureContext<'a>,
    /// The same, bound for CEL, to evaluate sub-expressions.
    pub cel: &'a Context<'c, 'c>,
    /// The conservative answer for what cannot be predicted.
    pub fallback: DateTime<Utc>,
}

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `anchor` plus whole days; `None` past the end of time.
fn days_after(anchor: DateTime<Utc>, days: i64) -> Option<DateTime<Utc>> {
    anchor.checked_add_signed(Duration::try_days(days)?)
}

impl TimeAnalysis<'_, '_> {
    /// The earliest time at which any of `rules[..=matched]` (all rules when
    /// none matched) could change its outcome; `None` for never.
    pub fn rule_list(
        &self,
        rules: &[CompiledCondition],
        matched: Option<usize>,
    ) -> Option<DateTime<Utc>> {
        let relevant = matched.map_or(rules.len(), |index| index + 1);
        rules[..relevant]
            .iter()
            .map(|rule| self.expression(rule.expression()))
            .fold(None, earliest)
    }

    fn now(&self) -> DateTime<Utc> {
        self.features.now
    }

    /// The value of a sub-expression now, if it evaluates to a bool.
    fn bool_value(&self, expr: &IdedExpr) -> Option<bool> {
        match Value::resolve(expr, self.cel) {
            Ok(Value::Bool(value)) => Some(value),
            _ => None,
        }
    }

    fn expression(&self, expr: &IdedExpr) -> Option<DateTime<Utc>> {
        match &expr.expr {
            Expr::Unspecified | Expr::Literal(_) | Expr::Struct(_) => None,
            Expr::Ident(name) => match Feature::from_name(name) {
                Some(feature) => self.feature(feature),
                None => None,
            },
            Expr::Select(select) => self
                .windowed(expr)
                .unwrap_or_else(|| self.expression(&select.operand)),
            Expr::List(list) => list
                .elements
                .iter()
                .map(|element| self.expression(element))
                .fold(None, earliest),
            Expr::Map(map) => map
                .entries
                .iter()
                .map(|entry| match &entry.expr {
                    cel::common::ast::EntryExpr::MapEntry(entry) => {
                        earliest(self.expression(&entry.key), self.expression(&entry.value))
                    }
                    cel::common::ast::EntryExpr::StructField(field) => {
                        self.expression(&field.value)
                    }
                })
                .fold(None, earliest),
            Expr::Comprehension(comprehension) => [
                &comprehension.iter_range,
                &comprehension.accu_init,
                &comprehension.loop_cond,
                &comprehension.loop_step,
                &comprehension.result,
            ]
            .into_iter()
            .map(|part| self.expression(part))
            .fold(None, earliest),
            Expr::Call(call) => {
                if let Some(windowed) = self.windowed(expr) {
                    return windowed;
                }
                match (call.func_name.as_str(), call.args.as_slice()) {
                    (operators::LOGICAL_AND | operators::LOGICAL_OR, [left, right]) => {
                        // a side that keeps the value that decides the result
                        // decides it for good
                        let deciding = call.func_name == operators::LOGICAL_OR;
                        let left_change = self.expression(left);
                        if left_change.is_none() && self.bool_value(left) == Some(deciding) {
                            return None;
                        }
                        let right_change = self.expression(right);
                        if right_change.is_none() && self.bool_value(right) == Some(deciding) {
                            return None;
                        }
                        earliest(left_change, right_change)
                    }
                    (
                        operators::LESS
                        | operators::LESS_EQUALS
                        | operators::GREATER
                        | operators::GREATER_EQUALS
                        | operators::EQUALS
                        | operators::NOT_EQUALS,
                        [left, right],
                    ) => self
                        .threshold_crossing(&call.func_name, left, right)
                        .unwrap_or_else(|| earliest(self.expression(left), self.expression(right))),
                    _ => call
                        .target
                        .iter()
                        .map(|target| self.expression(target))
                        .chain(call.args.iter().map(|arg| self.expression(arg)))
                        .fold(None, earliest),
                }
            }
        }
    }

    /// When a feature used as a whole next changes.
    fn feature(&self, feature: Feature) -> Option<DateTime<Utc>> {
        match feature.time_behaviour() {
            TimeBehaviour::Constant => None,
            TimeBehaviour::Continuous => Some(self.fallback),
            TimeBehaviour::DaysSince => {
                let anchor = self.features.anchor(feature)?;
                let days = self.features.int(feature).unwrap_or(0).max(0);
                days_after(anchor, days + 1)
            }
            TimeBehaviour::Windowed => {
                let histories: Vec<Option<&ActivityHistory>> = match feature {
                    Feature::Count => self
                        .features
                        .features
                        .type_histories()
                        .map(|(_, history)| Some(history))
                        .collect(),
                    _ => CHANNELS
                        .iter()
                        .map(|channel| self.features.features.channel_history(channel))
                        .collect(),
                };
                histories
                    .into_iter()
                    .map(|history| self.history_change(history, None))
                    .fold(None, earliest)
            }
        }
    }

    /// When a rolling-window count next drops; `window` `None`: any window.
    fn history_change(
        &self,
        history: Option<&ActivityHistory>,
        window: Option<&str>,
    ) -> Option<DateTime<Utc>> {
        let history = history?;
        WINDOWS
            .iter()
            .filter(|(name, _)| window.is_none_or(|window| window == *name))
            .filter_map(|(_, days)| *days)
            .map(|days| history.next_window_change(days, self.now()))
            .fold(None, earliest)
    }

    /// For `count[key][window]`, `count.key.window` and their prefixes, when
    /// the value next changes; `None` when `expr` is not such an access.
    fn windowed(&self, expr: &IdedExpr) -> Option<Option<DateTime<Utc>>> {
        let mut keys = Vec::new();
        let mut current = expr;
        loop {
            match &current.expr {
                Expr::Select(select) if !select.test => {
                    keys.push(select.field.as_str());
                    current = &select.operand;
                }
                Expr::Call(call) if call.func_name == operators::INDEX && call.args.len() == 2 => {
                    let Expr::Literal(LiteralValue::String(key)) = &call.args[1].expr else {
                        return None;
                    };
                    keys.push(key.inner());
                    current = &call.args[0];
                }
                Expr::Ident(name) => {
                    let feature = Feature::from_name(name)?;
                    if keys.is_empty() || feature.time_behaviour() != TimeBehaviour::Windowed {
                        return None;
                    }
                    keys.reverse();
                    let history = match feature {
                        Feature::Count => self.features.features.type_history(keys[0]),
                        _ => self.features.features.channel_history(keys[0]),
                    };
                    return Some(self.history_change(history, keys.get(1).copied()));
                }
                _ => return None,
            }
        }
    }

    /// For a day count compared with a number literal, the exact time the
    /// comparison next changes its value (`Some(None)`: never); `None` when
    /// the comparison is not of that shape.
    fn threshold_crossing(
        &self,
        function: &str,
        left: &IdedExpr,
        right: &IdedExpr,
    ) -> Option<Option<DateTime<Utc>>> {
        let day_feature = |expr: &IdedExpr| match &expr.expr {
            Expr::Ident(name) => Feature::from_name(name)
                .filter(|feature| feature.time_behaviour() == TimeBehaviour::DaysSince),
            _ => None,
        };
        let number = |expr: &IdedExpr| match &expr.expr {
            Expr::Literal(LiteralValue::Int(value)) => Some(*value.inner() as f64),
            Expr::Literal(LiteralValue::UInt(value)) => Some(*value.inner() as f64),
            Expr::Literal(LiteralValue::Double(value)) => Some(*value.inner()),
            _ => None,
        };
        // normalise to `feature OP literal`
        let (feature, operator, literal) = match (day_feature(left), number(right)) {
            (Some(feature), Some(literal)) => (feature, function, literal),
            _ => {
                let (feature, literal) = (day_feature(right)?, number(left)?);
                let mirrored = match function {
                    operators::LESS => operators::GREATER,
                    operators::LESS_EQUALS => operators::GREATER_EQUALS,
                    operators::GREATER => operators::LESS,
                    operators::GREATER_EQUALS => operators::LESS_EQUALS,
                    other => other,
                };
                (feature, mirrored, literal)
            }
        };
        let Some(anchor) = self.features.anchor(feature) else {
            // never happened: the count stays -1
            return Some(None);
        };
        let now_days = self.features.int(feature).unwrap_or(0);
        let holds = |days: i64| {
            let days = days as f64;
            match operator {
                operators::LESS => days < literal,
                operators::LESS_EQUALS => days <= literal,
                operators::GREATER => days > literal,
                operators::GREATER_EQUALS => days >= literal,
                operators::EQUALS => days == literal,
                _ => days != literal,
            }
        };
        // the candidates where the comparison can change: around the literal
        let base = literal.floor() as i64;
        let flip = [base, base.saturating_add(1), base.saturating_add(2)]
            .into_iter()
            .filter(|days| *days > now_days)
            .find(|days| holds(*days) != holds(now_days));
        Some(flip.and_then(|days| days_after(anchor, days)))
    }
}
