//! Touchpoints as the service reasons about them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// An amount in micros of a currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Money {
    /// ISO 4217 code.
    pub currency: String,
    /// Millionths of the major unit, >= 0.
    pub micros: i64,
}

impl Money {
    /// Money from its two nullable columns: present only when both are.
    pub fn from_columns(currency: Option<String>, micros: Option<i64>) -> Option<Self> {
        Some(Self {
            currency: currency?,
            micros: micros?,
        })
    }
}

/// A validated touchpoint whose customer is resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Touchpoint {
    /// The server's id (UUIDv7).
    pub id: Uuid,
    /// The caller's event id (idempotency key).
    pub event_id: String,
    /// The customer it belongs to.
    pub customer_id: Uuid,
    /// `clm.touchpoint.v1.Channel` number.
    pub channel: i16,
    /// The type.
    pub kind: String,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// When the server stored it.
    pub recorded_at: DateTime<Utc>,
    /// Campaign.
    pub campaign: String,
    /// UTM source.
    pub utm_source: String,
    /// UTM medium.
    pub utm_medium: String,
    /// Free properties; `None` when there are none or they were stripped.
    pub properties: Option<BTreeMap<String, String>>,
    /// Revenue.
    pub revenue: Option<Money>,
    /// Acquisition cost.
    pub cost: Option<Money>,
}

/// What storing one touchpoint did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Stored now.
    New {
        /// Its id.
        id: Uuid,
        /// Its customer (the survivor, if the given one was merged).
        customer_id: Uuid,
    },
    /// A touchpoint with the same event id was stored before.
    Duplicate {
        /// The earlier touchpoint's id.
        id: Uuid,
        /// The earlier touchpoint's customer.
        customer_id: Uuid,
    },
}

/// A merge seen on the identity log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    /// The identity merge id.
    pub merge_id: Uuid,
    /// The customer merged away.
    pub merged_id: Uuid,
    /// The survivor.
    pub survivor_id: Uuid,
    /// When.
    pub merged_at: DateTime<Utc>,
}

/// A change of a customer that this service reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerChange {
    /// One customer was merged into another: move its touchpoints.
    Merged(Merge),
    /// A customer was erased: strip its touchpoints' properties.
    Erased {
        /// The customer.
        customer_id: Uuid,
        /// When.
        erased_at: DateTime<Utc>,
    },
}

/// What ListTouchpoints filters by.
#[derive(Debug, Clone, Default)]
pub struct TimelineQuery {
    /// The customer.
    pub customer_id: Uuid,
    /// Only these types (empty: all).
    pub types: Vec<String>,
    /// Only these channels (empty: all).
    pub channels: Vec<i16>,
    /// Occurred at or after.
    pub start: Option<DateTime<Utc>>,
    /// Occurred before.
    pub end: Option<DateTime<Utc>>,
    /// Continue after this (occurred_at, id), newest first.
    pub after: Option<(DateTime<Utc>, Uuid)>,
    /// At most this many.
    pub limit: u32,
}

/// A count of one type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeCount {
    /// The type.
    pub kind: String,
    /// How many.
    pub count: i64,
    /// The latest occurrence.
    pub last_occurred_at: DateTime<Utc>,
}

/// One entry of the touchpoint log.
#[derive(Debug, Clone, PartialEq)]
pub enum LogEntry {
    /// A touchpoint was recorded (its properties are not carried).
    Recorded(Box<Touchpoint>),
    /// Another kind of entry, already encoded (`TouchpointLogEntry` without
    /// cursor), for the customer it concerns.
    Change {
        /// Its id.
        event_id: Uuid,
        /// The customer concerned.
        customer_id: Uuid,
        /// When it was committed.
        recorded_at: DateTime<Utc>,
        /// The encoded `clm.touchpoint.v1.TouchpointLogEntry`.
        payload: Vec<u8>,
    },
}
