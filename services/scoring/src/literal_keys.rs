//! Literal keys into the documented maps of the feature map, checked when a
//! condition is compiled: `count['purchse']['all']` or
//! `count['purchase']['13d']` type-check (every key of a `map(string, …)` is
//! a string) but fail on every evaluation, so the rule never fires. The keys
//! these maps can have are documented (touchpoint types, windows, channels,
//! currencies), so a literal outside them is refused like an unknown weight
//! key is.

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue, operators};

use crate::feature_map::WINDOWS;
use crate::vocabulary::{CHANNELS, is_touchpoint_type};

/// A literal key that its map never has, at the expression `expr_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    /// The id of the key's expression, for its position.
    pub expr_id: u64,
    /// A lower-case explanation naming the key and what was expected.
    pub message: String,
}

/// The level of a documented map an expression stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MapLevel {
    /// `count`: keys are touchpoint types.
    CountTypes,
    /// `channel_count`: keys are channels.
    Channels,
    /// `count[type]` or `channel_count[channel]`: keys are windows.
    Windows,
    /// `revenue`: keys are currencies.
    Currencies,
}

impl MapLevel {
    /// The level one key further in.
    fn inner(self) -> Option<MapLevel> {
        match self {
            MapLevel::CountTypes | MapLevel::Channels => Some(MapLevel::Windows),
            MapLevel::Windows | MapLevel::Currencies => None,
        }
    }

    /// Why `key` is not a key of this level, if it is not.
    fn problem(self, key: &str) -> Option<String> {
        match self {
            MapLevel::CountTypes if !is_touchpoint_type(key) => Some(format!(
                "count has no key '{key}': keys are the documented touchpoint types and custom.<name>"
            )),
            MapLevel::Channels if !CHANNELS.contains(&key) => Some(format!(
                "channel_count has no key '{key}': keys are the channels {}",
                CHANNELS.join(", ")
            )),
            MapLevel::Windows if !WINDOWS.iter().any(|(window, _)| *window == key) => {
                Some(format!(
                    "no window '{key}': windows are {}",
                    WINDOWS
                        .iter()
                        .map(|(window, _)| format!("'{window}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
            MapLevel::Currencies if !clm_proto::vocabulary::is_currency(key) => Some(format!(
                "revenue has no key '{key}': keys are ISO 4217 currency codes such as 'EUR'"
            )),
            _ => None,
        }
    }
}

/// Every literal key of `expr` that its documented map never has.
pub fn unknown_literal_keys(expr: &IdedExpr) -> Vec<UnknownKey> {
    let mut walker = Walker {
        bound: Vec::new(),
        found: Vec::new(),
    };
    walker.walk(expr);
    walker.found
}

struct Walker {
    /// Comprehension variables in scope: they hide features of their name.
    bound: Vec<String>,
    found: Vec<UnknownKey>,
}

impl Walker {
    /// The documented map level `expr` stands for, if any.
    fn level(&self, expr: &IdedExpr) -> Option<MapLevel> {
        match &expr.expr {
            Expr::Ident(name) if !self.bound.contains(name) => match name.as_str() {
                "count" => Some(MapLevel::CountTypes),
                "channel_count" => Some(MapLevel::Channels),
                "revenue" => Some(MapLevel::Currencies),
                _ => None,
            },
            Expr::Select(select) if !select.test => self.level(&select.operand)?.inner(),
            Expr::Call(call) if call.func_name == operators::INDEX && call.args.len() == 2 => {
                self.level(&call.args[0])?.inner()
            }
            _ => None,
        }
    }

    fn check_key(&mut self, container: &IdedExpr, key_id: u64, key: &str) {
        if let Some(problem) = self.level(container).and_then(|level| level.problem(key)) {
            self.found.push(UnknownKey {
                expr_id: key_id,
                message: problem,
            });
        }
    }

    fn walk(&mut self, expr: &IdedExpr) {
        match &expr.expr {
            Expr::Unspecified | Expr::Literal(_) | Expr::Ident(_) => {}
            Expr::Select(select) => {
                self.check_key(&select.operand, expr.id, &select.field);
                self.walk(&select.operand);
            }
            Expr::List(list) => list.elements.iter().for_each(|item| self.walk(item)),
            Expr::Map(map) => {
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(entry) = &entry.expr {
                        self.walk(&entry.key);
                        self.walk(&entry.value);
                    }
                }
            }
            Expr::Struct(message) => {
                for entry in &message.entries {
                    if let EntryExpr::StructField(field) = &entry.expr {
                        self.walk(&field.value);
                    }
                }
            }
            Expr::Comprehension(comprehension) => {
                self.walk(&comprehension.iter_range);
                self.walk(&comprehension.accu_init);
                let depth = self.bound.len();
                self.bound.push(comprehension.accu_var.clone());
                self.bound.push(comprehension.iter_var.clone());
                if let Some(second) = &comprehension.iter_var2 {
                    self.bound.push(second.clone());
                }
                self.walk(&comprehension.loop_cond);
                self.walk(&comprehension.loop_step);
                self.walk(&comprehension.result);
                self.bound.truncate(depth);
            }
            Expr::Call(call) => {
                let literal = |arg: &IdedExpr| match &arg.expr {
                    Expr::Literal(LiteralValue::String(key)) => Some((arg.id, key.to_string())),
                    _ => None,
                };
                match (call.func_name.as_str(), call.args.as_slice()) {
                    (operators::INDEX, [container, key]) => {
                        if let Some((id, key)) = literal(key) {
                            self.check_key(container, id, &key);
                        }
                    }
                    (operators::IN, [key, container]) => {
                        if let Some((id, key)) = literal(key) {
                            self.check_key(container, id, &key);
                        }
                    }
                    _ => {}
                }
                if let Some(target) = &call.target {
                    self.walk(target);
                }
                call.args.iter().for_each(|arg| self.walk(arg));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown(source: &str) -> Vec<String> {
        let program = clm_cel::rule_env().compile(source).unwrap();
        unknown_literal_keys(program.expression())
            .into_iter()
            .map(|key| key.message)
            .collect()
    }

    #[test]
    fn documented_keys_pass() {
        for source in [
            "count['purchase']['all'] >= 1",
            "count.purchase['30d'] > 0 && channel_count['web']['7d'] > 2",
            "'custom.webinar' in count && count['custom.webinar']['all'] > 0",
            "revenue['EUR'] > 1000.0 || has(revenue.USD)",
            "count.exists(t, count[t]['all'] > 3)",
            "[1, 2].exists(count, count > 1)",
        ] {
            assert_eq!(unknown(source), Vec::<String>::new(), "{source}");
        }
    }

    #[test]
    fn misspelled_keys_are_found() {
        assert_eq!(unknown("count['purchse']['all'] >= 1").len(), 1);
        assert!(unknown("count['purchase']['13d'] >= 1")[0].contains("no window '13d'"));
        assert_eq!(unknown("count.purchse.all > 0").len(), 1);
        assert_eq!(unknown("channel_count['webb']['7d'] > 0").len(), 1);
        assert_eq!(unknown("revenue['EURO'] > 1.0").len(), 1);
        assert_eq!(unknown("'purchse' in count").len(), 1);
        assert_eq!(unknown("has(count.purchse)").len(), 1);
    }
}
