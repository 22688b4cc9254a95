//! `count` and `channel_count` as lazy CEL maps.
//!
//! Both features are maps of about thirty keys to maps of five windows.
//! Building them eagerly costs more than the rest of an evaluation, while a
//! rule reads a handful of entries; so the outer map computes an entry's
//! window counts when it is read. It behaves like any CEL map: indexing,
//! `in`, `size`, comprehensions over its keys and equality (which builds the
//! whole map).

use std::collections::HashMap;

use cel::ExecutionError;
use cel::common::traits::{self, Container, Indexer, Iterable, Sizer};
use cel::common::types::{CelInt, CelMap, CelMapKey, CelString, MAP_TYPE, Type};
use cel::common::value::{CowVal, Val};

use crate::feature_map::{FeatureContext, WINDOWS};
use crate::vocabulary::{CHANNELS, KNOWN_TYPES};

/// What a window-count map is keyed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CountedBy {
    /// Touchpoint types (`count`).
    Type,
    /// Channel names (`channel_count`).
    Channel,
}

/// A map from touchpoint type (or channel) to its counts per window,
/// computed when read.
#[derive(Clone, Debug)]
pub struct WindowCountMap<'a> {
    context: FeatureContext<'a>,
    counted_by: CountedBy,
    keys: Vec<CelString<'a>>,
}

impl<'a> WindowCountMap<'a> {
    /// The map of a customer's features.
    pub fn new(context: FeatureContext<'a>, counted_by: CountedBy) -> Self {
        let keys = match counted_by {
            CountedBy::Type => context.count_keys().map(CelString::from).collect(),
            CountedBy::Channel => CHANNELS
                .iter()
                .map(|channel| CelString::from(*channel))
                .collect(),
        };
        Self {
            context,
            counted_by,
            keys,
        }
    }

    fn has(&self, key: &str) -> bool {
        match self.counted_by {
            CountedBy::Type => {
                KNOWN_TYPES.contains(&key) || self.context.features.type_history(key).is_some()
            }
            CountedBy::Channel => CHANNELS.contains(&key),
        }
    }

    /// The window counts of one key, as a CEL map.
    fn row(&self, key: &str) -> CelMap<'static> {
        let history = match self.counted_by {
            CountedBy::Type => self.context.features.type_history(key),
            CountedBy::Channel => self.context.features.channel_history(key),
        };
        window_row(self.context.window_counts(history))
    }

    /// The whole map, built.
    fn build(&self) -> CelMap<'a> {
        let keys: Vec<&'a str> = match self.counted_by {
            CountedBy::Type => self.context.count_keys().collect(),
            CountedBy::Channel => CHANNELS.to_vec(),
        };
        let map: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = keys
            .into_iter()
            .map(|key| {
                let row: Box<dyn Val + 'a> = Box::new(self.row(key));
                (CelMapKey::from(key), row)
            })
            .collect();
        CelMap::from(map)
    }
}

/// `{'7d': .., '30d': .., '90d': .., '365d': .., 'all': ..}`.
pub fn window_row(counts: [i64; 5]) -> CelMap<'static> {
    let map: HashMap<CelMapKey<'static>, Box<dyn Val>> = WINDOWS
        .iter()
        .zip(counts)
        .map(|((window, _), count)| {
            (
                CelMapKey::from(*window),
                Box::new(CelInt::from(count)) as Box<dyn Val>,
            )
        })
        .collect();
    CelMap::from(map)
}

fn string_key(key: &dyn Val) -> Option<&str> {
    key.downcast_ref::<CelString>().map(CelString::inner)
}

impl Val for WindowCountMap<'_> {
    fn get_type(&self) -> &Type {
        &MAP_TYPE
    }

    fn cel_type() -> &'static Type
    where
        Self: Sized,
    {
        &MAP_TYPE
    }

    fn as_container(&self) -> Option<&dyn Container> {
        Some(self)
    }

    fn as_indexer<'b, 'v>(&'b self) -> Option<&'b (dyn Indexer + 'v)>
    where
        Self: 'v,
    {
        Some(self)
    }

    fn as_iterable<'b, 'v>(&'b self) -> Option<&'b (dyn Iterable + 'v)>
    where
        Self: 'v,
    {
        Some(self)
    }

    fn as_sizer(&self) -> Option<&dyn Sizer> {
        Some(self)
    }

    fn equals(&self, other: &dyn Val) -> bool {
        self.build().equals(other)
    }

    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v>
    where
        Self: 'v,
    {
        Box::new(self.clone())
    }
}

impl WindowCountMap<'_> {
    /// The entry of `key`, or the error of a missing or mistyped key.
    fn entry(&self, key: &dyn Val) -> Result<CelMap<'static>, ExecutionError> {
        match string_key(key) {
            Some(key) if self.has(key) => Ok(self.row(key)),
            Some(key) => Err(ExecutionError::no_such_key(key)),
            None => Err(ExecutionError::UnexpectedType {
                got: key.get_type().name().to_owned(),
                want: "string".to_owned(),
            }),
        }
    }
}

impl Indexer for WindowCountMap<'_> {
    fn get<'b, 'v>(&'b self, key: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.entry(key).map(CowVal::owned)
    }

    fn steal<'v>(self: Box<Self>, key: &dyn Val) -> Result<Box<dyn Val + 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.entry(key)
            .map(|row| Box::new(row) as Box<dyn Val + 'v>)
    }
}

impl Container for WindowCountMap<'_> {
    fn contains(&self, key: &dyn Val) -> Result<bool, ExecutionError> {
        Ok(string_key(key).is_some_and(|key| self.has(key)))
    }
}

impl Sizer for WindowCountMap<'_> {
    fn size(&self) -> CelInt {
        CelInt::from(self.keys.len() as i64)
    }
}

impl Iterable for WindowCountMap<'_> {
    fn iter<'b, 'v>(&'b self) -> Box<dyn traits::Iterator<'b, 'v> + 'b>
    where
        Self: 'v,
    {
        Box::new(Keys(self.keys.iter()))
    }
}

struct Keys<'b, 'a>(std::slice::Iter<'b, CelString<'a>>);

impl<'b, 'a: 'v, 'v> traits::Iterator<'b, 'v> for Keys<'b, 'a> {
    fn next(&mut self) -> Option<&'b (dyn Val + 'v)> {
        self.0.next().map(|key| key as &(dyn Val + 'v))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{TimeZone, Utc};
    use clm_proto::touchpoint::Channel;

    use super::*;
    use crate::features::{CustomerFeatures, TouchpointFacts};
    use crate::lifecycle::LifecycleState;
    use crate::scores::Scores;

    #[test]
    fn behaves_like_a_cel_map() {
        let now = Utc.with_ymd_and_hms(2024, 6, 1, 12, 0, 0).unwrap();
        let mut features = CustomerFeatures::new();
        for kind in ["purchase", "purchase", "custom.webinar"] {
            features.apply(&TouchpointFacts {
                touchpoint_type: kind,
                channel: Channel::InPerson,
                occurred_at: now,
                revenue: None,
            });
        }
        let context = FeatureContext {
            features: &features,
            now,
            state: LifecycleState::new(),
            scores: Scores::default(),
            mql_threshold: 0.0,
            sql_threshold: 0.0,
        };
        let env = Arc::new(cel::Env::stdlib());
        let mut cel = cel::Context::with_env(env.clone());
        cel.add_variable_as_val(
            "count",
            Box::new(WindowCountMap::new(context, CountedBy::Type)),
        );
        cel.add_variable_as_val(
            "channel_count",
            Box::new(WindowCountMap::new(context, CountedBy::Channel)),
        );
        for source in [
            "count['purchase']['all'] == 2 && count.purchase['7d'] == 2",
            "count['page_view']['30d'] == 0",
            "'custom.webinar' in count && !('custom.other' in count)",
            "size(count) == 28 && count.size() == 28",
            "count.exists(t, t.startsWith('custom.') && count[t].all > 0)",
            "count.filter(t, count[t].all > 0).size() == 2",
            "has(count.purchase) && !has(count.nothing)",
            "channel_count.in_person['90d'] == 3 && size(channel_count) == 12",
            "count['purchase'] == {'7d': 2, '30d': 2, '90d': 2, '365d': 2, 'all': 2}",
        ] {
            let program = env.compile(source).unwrap();
            assert_eq!(
                program.execute(&cel),
                Ok(cel::Value::Bool(true)),
                "{source}"
            );
        }
        let missing = env.compile("count['custom.other']['all'] > 0").unwrap();
        assert!(missing.execute(&cel).is_err());
    }
}
