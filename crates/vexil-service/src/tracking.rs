//! Tracking: the events clients send (exposures, conversions, custom events) and the exposures the
//! server records itself when it evaluates an experiment flag, validated, scrubbed, rate limited
//! and stored through one group-committing writer.
//!
//! [`Tracker::track`] takes one client call: the batch is refused whole when it is over
//! [`MAX_BATCH`] or over the caller's rate limit ([`RateLimit`], charged one cell per event, keyed
//! by the API key or the environment); otherwise every event is validated on its own (a rejected
//! event says why, the good ones of the batch are kept), its properties are scrubbed by the
//! environment's [`TrackingPolicy`], and the survivors are queued for the writer.
//!
//! The writer is one task: it takes everything queued (up to
//! [`TrackerConfig::max_rows_per_transaction`] rows, waiting at most [`TrackerConfig::linger`] for
//! more), stores it with one [`EventStore::insert_events`] (one transaction) and then answers each
//! caller with its own events' [`Inserted`]s. So calls arriving while a commit runs share the next
//! one. Nothing is acknowledged before its commit: when the store fails, every caller of that
//! transaction gets [`TrackError::Unavailable`] and may retry (inserts are idempotent by event
//! id, so a retry of events that were in fact stored answers [`EventOutcome::Duplicate`]). The
//! queue is bounded: when it is full a call fails at once with [`TrackError::Unavailable`] rather
//! than holding memory.
//!
//! [`Tracker::record_exposure`] is for the evaluation hot path: it never blocks on I/O nor awaits.
//! It remembers which `(environment, experiment, unit)` it recorded in a bounded in-memory set
//! (two generations swapped when the current one is full, so memory stays bounded and recently
//! seen units stay remembered), and hands new exposures to a bounded channel (dropped and counted
//! when full). A background task batches them into the same writer, with the deterministic event
//! id `exposure:<experiment>:<unit>`: other replicas and restarts dedupe in the database too.
//!
//! Status mapping (for the server's error table): [`TrackError::TooMany`] and
//! [`TrackError::OverBurst`] → gRPC `INVALID_ARGUMENT`, HTTP 413; [`TrackError::RateLimited`] →
//! `RESOURCE_EXHAUSTED`, HTTP 429 with `Retry-After` (seconds, rounded up);
//! [`TrackError::Unavailable`] → `UNAVAILABLE`, HTTP 503. Rejected events are not errors: the call
//! succeeds (gRPC `OK`, HTTP 200) and lists each event's outcome.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{InsufficientCapacity, Quota, RateLimiter};
use serde_json::{Map, Number, Value};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use vexil_store::{EventKind, EventStore, Inserted, NewEvent};

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

/// Most events in one [`Tracker::track`] call; a larger batch is refused whole
/// ([`TrackError::TooMany`]).
pub const MAX_BATCH: usize = 1000;

/// Longest event id, in bytes (UTF-8).
pub const MAX_EVENT_ID_BYTES: usize = 128;

/// Longest unit (the context's `targetingKey`), in bytes.
pub const MAX_UNIT_BYTES: usize = 256;

/// Longest flag, experiment, variant and metric key, in bytes: the store's longest flag key.
pub const MAX_KEY_BYTES: usize = 256;

/// Longest property name (and key inside an object property), in bytes.
pub const MAX_PROPERTY_NAME_BYTES: usize = 128;

/// Most properties one event may carry: an event with more is rejected. (A policy keeps at most
/// [`TrackingPolicy::max_properties`] of them, which is capped by this.)
pub const MAX_PROPERTIES: usize = 64;

/// Upper bound of [`TrackingPolicy::max_value_bytes`]: no string property value is stored longer.
pub const MAX_PROPERTY_VALUE_BYTES: usize = 1024;

/// How deep property values nest: a property is a scalar (string, number, boolean, null) or an
/// array or object of scalars (depth 2). Arrays and objects nested deeper are dropped, not
/// flattened: flattened keys would escape the allowlist and the key-name rules.
pub const MAX_PROPERTY_DEPTH: usize = 2;

/// Most elements of an array, or entries of an object, kept inside one property; the rest are
/// dropped.
pub const MAX_NESTED_ITEMS: usize = 32;

/// How far an event's `client_time_ms` may be from the server's clock, either way: one year.
/// Further off, the client's clock is broken and the event is rejected.
pub const MAX_CLIENT_CLOCK_SKEW: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// [`TrackingPolicy::max_properties`] by default.
pub const DEFAULT_MAX_PROPERTIES: usize = 32;

/// [`TrackingPolicy::max_value_bytes`] by default.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 256;

/// Shortest run of hex or base64 characters taken for a secret token.
pub const MIN_SECRET_TOKEN_CHARS: usize = 32;

/// What a string property value that looks like a secret is replaced by.
pub const REDACTED: &str = "[redacted]";

/// What an email address inside a string property value is replaced by (when
/// [`TrackingPolicy::scrub_emails`]).
pub const EMAIL_REPLACEMENT: &str = "[email]";

/// [`TrackerConfig::max_rows_per_transaction`] by default.
pub const DEFAULT_MAX_ROWS_PER_TRANSACTION: usize = 2000;

/// [`TrackerConfig::queue_capacity`] by default.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;

/// [`TrackerConfig::exposure_queue_capacity`] by default: a burst of new units while the database
/// is slow (or briefly away: failed batches are retried for about 20 s) waits here rather than
/// being dropped; about 300 bytes each, some 30 MB when full.
pub const DEFAULT_EXPOSURE_QUEUE_CAPACITY: usize = 100_000;

/// [`TrackerConfig::exposure_dedupe_capacity`] by default.
pub const DEFAULT_EXPOSURE_DEDUPE_CAPACITY: usize = 1 << 18;

/// The limiter forgets idle keys (those whose bucket is full again) every this many checks.
const LIMITER_HOUSEKEEPING_EVERY: u64 = 4096;

/// Shards of the exposure dedupe set (each behind its own lock).
const DEDUPE_SHARDS: usize = 16;

// ---------------------------------------------------------------------------------------------
// Input
// ---------------------------------------------------------------------------------------------

/// One event a client sends, decoded from the wire by the server.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackEvent {
    /// The client's id for the event (a UUID, say): a retry with the same id is stored once.
    pub event_id: String,
    /// What it records.
    pub kind: EventKind,
    /// The unit (user, device, account…): the context's `targetingKey`.
    pub unit: String,
    /// The flag evaluated (exposures; optional).
    pub flag: Option<String>,
    /// The experiment (required on exposures; optional on conversions).
    pub experiment: Option<String>,
    /// The variant the unit got (required on exposures).
    pub variant: Option<String>,
    /// The metric (required on conversions and custom events).
    pub metric: Option<String>,
    /// The metric's value (a conversion without one counts 1); must be finite.
    pub value: Option<f64>,
    /// Free-form properties, scrubbed before they are stored (see [`TrackingPolicy`]).
    pub properties: Map<String, Value>,
    /// When the client says it happened (ms since the epoch).
    pub client_time_ms: Option<i64>,
}

impl TrackEvent {
    /// An event of `kind` for `unit`, with no keys, value, properties nor client time yet.
    pub fn new(event_id: impl Into<String>, kind: EventKind, unit: impl Into<String>) -> TrackEvent {
        TrackEvent {
            event_id: event_id.into(),
            kind,
            unit: unit.into(),
            flag: None,
            experiment: None,
            variant: None,
            metric: None,
            value: None,
            properties: Map::new(),
            client_time_ms: None,
        }
    }
}

/// Checks one event against the limits (not its property values: those are scrubbed, not
/// rejected); `now_ms` is the server's clock. The reason, when it is rejected.
pub fn validate_event(event: &TrackEvent, now_ms: i64) -> Result<(), String> {
    if event.event_id.is_empty() {
        return Err("event_id is empty".into());
    }
    if event.event_id.len() > MAX_EVENT_ID_BYTES {
        return Err(format!(
            "event_id is {} bytes, more than {MAX_EVENT_ID_BYTES}",
            event.event_id.len()
        ));
    }
    if event.event_id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("event_id has a control or whitespace character (it must be printable)".into());
    }
    if event.unit.is_empty() {
        return Err("unit is empty".into());
    }
    if event.unit.len() > MAX_UNIT_BYTES {
        return Err(format!(
            "unit is {} bytes, more than {MAX_UNIT_BYTES}",
            event.unit.len()
        ));
    }
    if event.unit.chars().any(char::is_control) {
        return Err("unit has a control character".into());
    }
    for (name, key) in [
        ("flag", &event.flag),
        ("experiment", &event.experiment),
        ("variant", &event.variant),
        ("metric", &event.metric),
    ] {
        if let Some(key) = key {
            check_key(name, key)?;
        }
    }
    match event.kind {
        EventKind::Exposure => {
            if event.experiment.is_none() {
                return Err("an exposure needs an experiment".into());
            }
            if event.variant.is_none() {
                return Err("an exposure needs a variant".into());
            }
        }
        EventKind::Conversion | EventKind::Custom => {
            if event.metric.is_none() {
                return Err(format!("a {} event needs a metric", event.kind.as_str()));
            }
        }
    }
    if let Some(value) = event.value
        && !value.is_finite()
    {
        return Err(format!("value {value} is not a finite number"));
    }
    if event.properties.len() > MAX_PROPERTIES {
        return Err(format!(
            "{} properties, more than {MAX_PROPERTIES}",
            event.properties.len()
        ));
    }
    for name in event.properties.keys() {
        if name.is_empty() {
            return Err("a property name is empty".into());
        }
        if name.len() > MAX_PROPERTY_NAME_BYTES {
            return Err(format!(
                "property name {:?}… is {} bytes, more than {MAX_PROPERTY_NAME_BYTES}",
                truncated(name, 32),
                name.len()
            ));
        }
    }
    if let Some(client) = event.client_time_ms {
        let skew = u64::try_from(MAX_CLIENT_CLOCK_SKEW.as_millis()).unwrap_or(u64::MAX);
        if client.abs_diff(now_ms) > skew {
            return Err(format!(
                "client_time_ms {client} is more than {} days from the server's clock ({now_ms})",
                MAX_CLIENT_CLOCK_SKEW.as_secs() / 86_400
            ));
        }
    }
    Ok(())
}

fn check_key(name: &str, key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err(format!("{name} is empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!("{name} is {} bytes, more than {MAX_KEY_BYTES}", key.len()));
    }
    if key.chars().any(char::is_control) {
        return Err(format!("{name} has a control character"));
    }
    Ok(())
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Property policy and scrubbing
// ---------------------------------------------------------------------------------------------

/// What an environment keeps of events' properties. Scrubbing never rejects an event: what does
/// not pass is dropped or replaced, and counted ([`ScrubReport`]).
///
/// In order, for each top-level property: a name not in `allowed_properties` is dropped; a name
/// that looks like a secret (its words, split at `_`, `-`, `.`, spaces and camelCase, include
/// `password`, `passwd`, `pwd`, `secret`, `token`, `auth`, `authorization`, `cookie`, `session`,
/// `ssn`, `api key`, `credit card`, `card number`, `private key`…, case-insensitively) is dropped;
/// past `max_properties` kept, the rest are dropped. Then values: arrays and objects nested deeper
/// than [`MAX_PROPERTY_DEPTH`] are dropped and at most [`MAX_NESTED_ITEMS`] items of each are kept
/// (keys inside objects pass the same secret-name rule); a string that looks like a secret (a
/// JWT, `Bearer <token>`, a run of at least [`MIN_SECRET_TOKEN_CHARS`] hex digits, or of base64
/// characters mixing upper case, lower case and digits, an AWS access key id `AKIA…`/`ASIA…`, a
/// 13–19 digit card number starting with 2–6 that passes Luhn) becomes [`REDACTED`], and so does a
/// number that looks like a card number; email addresses inside strings become
/// [`EMAIL_REPLACEMENT`] when `scrub_emails`; strings longer than `max_value_bytes` are cut (on a
/// character boundary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackingPolicy {
    /// The property names kept (`None`: any name).
    pub allowed_properties: Option<BTreeSet<String>>,
    /// Most properties kept per event (capped by [`MAX_PROPERTIES`]).
    pub max_properties: usize,
    /// Longest string value kept, in bytes (capped by [`MAX_PROPERTY_VALUE_BYTES`]).
    pub max_value_bytes: usize,
    /// Replace email addresses inside string values by [`EMAIL_REPLACEMENT`].
    pub scrub_emails: bool,
}

impl Default for TrackingPolicy {
    /// Any property name, [`DEFAULT_MAX_PROPERTIES`], [`DEFAULT_MAX_VALUE_BYTES`], emails scrubbed.
    fn default() -> TrackingPolicy {
        TrackingPolicy {
            allowed_properties: None,
            max_properties: DEFAULT_MAX_PROPERTIES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            scrub_emails: true,
        }
    }
}

/// What scrubbing dropped or changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Properties dropped because the allowlist does not name them.
    pub not_allowed: u64,
    /// Properties (or nested keys) dropped because their name looks like a secret.
    pub secret_keys: u64,
    /// Properties or nested items dropped for a limit: past `max_properties` or
    /// [`MAX_NESTED_ITEMS`], nested deeper than [`MAX_PROPERTY_DEPTH`], a nested key longer than
    /// [`MAX_PROPERTY_NAME_BYTES`].
    pub over_limit: u64,
    /// Values replaced by [`REDACTED`].
    pub redacted: u64,
    /// Email addresses replaced by [`EMAIL_REPLACEMENT`].
    pub emails: u64,
    /// Strings cut to `max_value_bytes`.
    pub truncated: u64,
}

impl ScrubReport {
    /// Everything dropped (not allowed, secret names, over a limit).
    pub fn dropped(&self) -> u64 {
        self.not_allowed + self.secret_keys + self.over_limit
    }

    fn add(&mut self, other: &ScrubReport) {
        self.not_allowed += other.not_allowed;
        self.secret_keys += other.secret_keys;
        self.over_limit += other.over_limit;
        self.redacted += other.redacted;
        self.emails += other.emails;
        self.truncated += other.truncated;
    }
}

impl TrackingPolicy {
    /// The properties to store, and what was dropped or changed (added to `report`).
    pub fn scrub(&self, properties: Map<String, Value>, report: &mut ScrubReport) -> Map<String, Value> {
        let max_properties = self.max_properties.min(MAX_PROPERTIES);
        let mut kept = Map::new();
        for (name, value) in properties {
            if let Some(allowed) = &self.allowed_properties
                && !allowed.contains(&name)
            {
                report.not_allowed += 1;
                continue;
            }
            if is_secret_key(&name) {
                report.secret_keys += 1;
                continue;
            }
            if kept.len() >= max_properties {
                report.over_limit += 1;
                continue;
            }
            if let Some(value) = self.scrub_value(value, 1, report) {
                kept.insert(name, value);
            }
        }
        kept
    }

    /// A value at `depth` (1: a property's own value), or `None` when it is dropped.
    fn scrub_value(&self, value: Value, depth: usize, report: &mut ScrubReport) -> Option<Value> {
        match value {
            Value::Null | Value::Bool(_) => Some(value),
            Value::Number(n) => Some(self.scrub_number(n, report)),
            Value::String(s) => Some(Value::String(self.scrub_string(s, report))),
            Value::Array(items) => {
                if depth >= MAX_PROPERTY_DEPTH {
                    report.over_limit += 1;
                    return None;
                }
                let over = items.len().saturating_sub(MAX_NESTED_ITEMS);
                report.over_limit += over as u64;
                let items = items
                    .into_iter()
                    .take(MAX_NESTED_ITEMS)
                    .filter_map(|item| self.scrub_value(item, depth + 1, report))
                    .collect();
                Some(Value::Array(items))
            }
            Value::Object(entries) => {
                if depth >= MAX_PROPERTY_DEPTH {
                    report.over_limit += 1;
                    return None;
                }
                let mut kept = Map::new();
                for (key, value) in entries {
                    if is_secret_key(&key) {
                        report.secret_keys += 1;
                    } else if key.is_empty() || key.len() > MAX_PROPERTY_NAME_BYTES || kept.len() >= MAX_NESTED_ITEMS {
                        report.over_limit += 1;
                    } else if let Some(value) = self.scrub_value(value, depth + 1, report) {
                        kept.insert(key, value);
                    }
                }
                Some(Value::Object(kept))
            }
        }
    }

    fn scrub_number(&self, n: Number, report: &mut ScrubReport) -> Value {
        if let Some(u) = n.as_u64() {
            let digits: Vec<u8> = u.to_string().bytes().map(|b| b - b'0').collect();
            if is_card_number(&digits) {
                report.redacted += 1;
                return Value::String(REDACTED.into());
            }
        }
        Value::Number(n)
    }

    fn scrub_string(&self, s: String, report: &mut ScrubReport) -> String {
        if looks_secret(&s) {
            report.redacted += 1;
            return REDACTED.into();
        }
        let mut s = s;
        if self.scrub_emails
            && let Some((replaced, count)) = replace_emails(&s)
        {
            report.emails += count;
            s = replaced;
        }
        let max = self.max_value_bytes.min(MAX_PROPERTY_VALUE_BYTES);
        if s.len() > max {
            let end = truncated(&s, max).len();
            s.truncate(end);
            report.truncated += 1;
        }
        s
    }
}

/// Words (and pairs of adjacent words, joined) that make a property name a secret's.
const SECRET_WORDS: &[&str] = &[
    "password",
    "passwords",
    "passwd",
    "pwd",
    "passphrase",
    "secret",
    "secrets",
    "token",
    "auth",
    "authorization",
    "cookie",
    "cookies",
    "session",
    "ssn",
    "apikey",
    "accesskey",
    "secretkey",
    "privatekey",
    "accesstoken",
    "refreshtoken",
    "authtoken",
    "sessionid",
    "creditcard",
    "cardnumber",
    "ccnumber",
    "cvv",
    "cvc",
    "credential",
    "credentials",
];

/// Whether a property name looks like it names a secret (see [`TrackingPolicy`]).
pub fn is_secret_key(name: &str) -> bool {
    let words = key_words(name);
    words.iter().any(|w| SECRET_WORDS.contains(&w.as_str()))
        || words.windows(2).any(|pair| {
            let joined = format!("{}{}", pair[0], pair[1]);
            SECRET_WORDS.contains(&joined.as_str())
        })
}

/// A name's words, lower-cased: split at anything not alphanumeric and at camelCase boundaries
/// (`userAPIKey` → `user`, `api`, `key`).
fn key_words(name: &str) -> Vec<String> {
    let chars: Vec<char> = name.chars().collect();
    let mut words = Vec::new();
    let mut word = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if !c.is_alphanumeric() {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            continue;
        }
        if c.is_uppercase() && !word.is_empty() {
            let prev = chars[i - 1];
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            if prev.is_lowercase() || prev.is_numeric() || (prev.is_uppercase() && next_lower) {
                words.push(std::mem::take(&mut word));
            }
        }
        word.extend(c.to_lowercase());
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Whether a string value looks like (or holds) a secret (see [`TrackingPolicy`]).
pub fn looks_secret(s: &str) -> bool {
    has_bearer(s)
        || s.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            .any(is_jwt)
        || s.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+')))
            .any(is_long_token)
        || has_aws_key(s)
        || has_card_number(s)
}

/// `Bearer <token>`: the word `bearer` (any case, possibly after `Authorization:`) followed by a
/// token of at least 8 characters with a digit or punctuation in it.
fn has_bearer(s: &str) -> bool {
    let mut words = s.split_whitespace().peekable();
    while let Some(word) = words.next() {
        let tail = word.rsplit(|c: char| !c.is_ascii_alphabetic()).next().unwrap_or(word);
        if tail.eq_ignore_ascii_case("bearer")
            && let Some(token) = words.peek()
            && token.len() >= 8
            && token
                .chars()
                .any(|c| c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '~' | '+' | '/'))
        {
            return true;
        }
    }
    false
}

/// `eyJ….….…`: three base64url segments, the first a JSON header.
fn is_jwt(token: &str) -> bool {
    if !token.starts_with("eyJ") {
        return false;
    }
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3 && parts[0].len() >= 10 && !parts[1].is_empty()
}

/// A run of at least [`MIN_SECRET_TOKEN_CHARS`] hex digits (with a digit in it), or of base64(url)
/// characters with upper case, lower case and digits in it. (UUIDs are neither: their hex runs are
/// short and they are single-case.)
fn is_long_token(token: &str) -> bool {
    if token.len() < MIN_SECRET_TOKEN_CHARS {
        return false;
    }
    let bytes = token.as_bytes();
    let digit = bytes.iter().any(u8::is_ascii_digit);
    if digit && bytes.iter().all(u8::is_ascii_hexdigit) {
        return true;
    }
    digit && bytes.iter().any(u8::is_ascii_lowercase) && bytes.iter().any(u8::is_ascii_uppercase)
}

/// An AWS access key id: `AKIA` or `ASIA` and 16 upper-case letters or digits.
fn has_aws_key(s: &str) -> bool {
    s.as_bytes().windows(20).any(|w| {
        (w.starts_with(b"AKIA") || w.starts_with(b"ASIA"))
            && w[4..].iter().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    })
}

/// A card number inside text: 13–19 digits, possibly grouped by single spaces or hyphens, not
/// glued to letters or other digits, starting with 2–6 and passing Luhn.
fn has_card_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() || (i > 0 && b[i - 1].is_ascii_alphanumeric()) {
            i += 1;
            continue;
        }
        let mut digits = Vec::new();
        let mut j = i;
        loop {
            if j < b.len() && b[j].is_ascii_digit() {
                digits.push(b[j] - b'0');
                j += 1;
            } else if j + 1 < b.len() && matches!(b[j], b' ' | b'-') && b[j + 1].is_ascii_digit() {
                j += 1;
            } else {
                break;
            }
        }
        let glued = j < b.len() && b[j].is_ascii_alphanumeric();
        if !glued && is_card_number(&digits) {
            return true;
        }
        i = j;
    }
    false
}

/// 13–19 digits starting with 2–6 (the card networks' ranges; so millisecond timestamps, which
/// start with 1, are not taken for cards) with a valid Luhn check digit.
fn is_card_number(digits: &[u8]) -> bool {
    (13..=19).contains(&digits.len()) && (2..=6).contains(&digits[0]) && luhn(digits)
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// `s` with each email address replaced, and how many there were (`None`: none).
fn replace_emails(s: &str) -> Option<(String, u64)> {
    fn local(b: u8) -> bool {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
    }
    fn domain(b: u8) -> bool {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')
    }
    fn valid_domain(d: &str) -> bool {
        let labels: Vec<&str> = d.split('.').collect();
        labels.len() >= 2
            && labels.iter().all(|l| !l.is_empty())
            && labels
                .last()
                .is_some_and(|tld| tld.len() >= 2 && tld.bytes().all(|b| b.is_ascii_alphabetic()))
    }

    if !s.contains('@') {
        return None;
    }
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut copied = 0;
    let mut count = 0;
    let mut from = 0;
    while let Some(offset) = s[from..].find('@') {
        let at = from + offset;
        let mut start = at;
        while start > copied && local(b[start - 1]) {
            start -= 1;
        }
        let mut end = at + 1;
        while end < b.len() && domain(b[end]) {
            end += 1;
        }
        while end > at + 1 && matches!(b[end - 1], b'.' | b'-') {
            end -= 1;
        }
        if start < at && valid_domain(&s[at + 1..end]) {
            out.push_str(&s[copied..start]);
            out.push_str(EMAIL_REPLACEMENT);
            copied = end;
            count += 1;
            from = end;
        } else {
            from = at + 1;
        }
    }
    if count == 0 {
        return None;
    }
    out.push_str(&s[copied..]);
    Some((out, count))
}

// ---------------------------------------------------------------------------------------------
// Rate limiting
// ---------------------------------------------------------------------------------------------

/// A rate limit on tracked events, per limiter key (an API key, or the environment when auth is
/// off): `per_second` events replenished each second, up to `burst` at once. A call is charged
/// its number of events, rejected ones included. Zeros count as 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained events per second.
    pub per_second: u32,
    /// Most events at once (the bucket's size): a batch larger than this can never pass.
    pub burst: u32,
}

/// A keyed GCRA limiter on `C` (the real clock, or a fake one in tests).
struct Limiter<C: Clock = DefaultClock> {
    inner: RateLimiter<String, DefaultKeyedStateStore<String>, C, NoOpMiddleware<C::Instant>>,
    burst: u32,
    checks: AtomicU64,
}

impl<C: Clock> fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("burst", &self.burst)
            .field("keys", &self.inner.len())
            .finish()
    }
}

impl<C: Clock> Limiter<C> {
    fn new(limit: RateLimit, clock: C) -> Limiter<C> {
        let per_second = NonZeroU32::new(limit.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
        Limiter {
            inner: RateLimiter::dashmap_with_clock(Quota::per_second(per_second).allow_burst(burst), clock),
            burst: burst.get(),
            checks: AtomicU64::new(0),
        }
    }

    /// Charges `key` `events` cells, all or nothing.
    fn check(&self, key: &str, events: usize) -> Result<(), TrackError> {
        let Some(cells) = u32::try_from(events).ok().and_then(NonZeroU32::new) else {
            return if events == 0 {
                Ok(())
            } else {
                Err(TrackError::OverBurst {
                    events,
                    burst: self.burst,
                })
            };
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % LIMITER_HOUSEKEEPING_EVERY == LIMITER_HOUSEKEEPING_EVERY - 1 {
            self.inner.retain_recent();
            self.inner.shrink_to_fit();
        }
        match self.inner.check_key_n(&key.to_owned(), cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(TrackError::RateLimited {
                retry_after: not_until.wait_time_from(self.inner.clock().now()),
            }),
            Err(InsufficientCapacity(_)) => Err(TrackError::OverBurst {
                events,
                burst: self.burst,
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Outcome and errors
// ---------------------------------------------------------------------------------------------

/// What became of one event of a [`Tracker::track`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    /// Stored now (committed).
    New,
    /// An event with this id was stored before (a retry): nothing was written.
    Duplicate,
    /// Not valid: not stored, and retrying it will not help.
    Rejected {
        /// Why.
        reason: String,
    },
}

/// The answer to a [`Tracker::track`] call: one outcome per event, in order (the index of an
/// outcome is the index of its event in the call).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrackOutcome {
    /// Each event's outcome.
    pub events: Vec<EventOutcome>,
    /// What scrubbing dropped or changed in the accepted events' properties.
    pub scrubbed: ScrubReport,
}

impl TrackOutcome {
    /// Events stored now.
    pub fn accepted(&self) -> usize {
        self.events.iter().filter(|e| **e == EventOutcome::New).count()
    }

    /// Events stored before (retries).
    pub fn duplicates(&self) -> usize {
        self.events.iter().filter(|e| **e == EventOutcome::Duplicate).count()
    }

    /// The rejected events: their index in the call and why.
    pub fn rejected(&self) -> impl Iterator<Item = (usize, &str)> {
        self.events.iter().enumerate().filter_map(|(i, e)| match e {
            EventOutcome::Rejected { reason } => Some((i, reason.as_str())),
            _ => None,
        })
    }
}

/// A [`Tracker::track`] call that failed whole: nothing of it was acknowledged. Each variant
/// says the status the server answers with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrackError {
    /// More events than [`MAX_BATCH`] in one call. gRPC `INVALID_ARGUMENT`, HTTP 413: split the
    /// batch.
    #[error("a call tracks at most {max} events, this one has {events}")]
    TooMany {
        /// [`MAX_BATCH`].
        max: usize,
        /// The call's events.
        events: usize,
    },
    /// More events in one call than the rate limit's burst: it could never pass. gRPC
    /// `INVALID_ARGUMENT`, HTTP 413: split the batch.
    #[error("a call tracks at most {burst} events under this rate limit, this one has {events}")]
    OverBurst {
        /// The call's events.
        events: usize,
        /// The rate limit's burst.
        burst: u32,
    },
    /// Over the caller's rate limit; nothing was charged. gRPC `RESOURCE_EXHAUSTED`, HTTP 429
    /// with `Retry-After` (whole seconds, rounded up).
    #[error("rate limited: retry in {} ms", retry_after.as_millis())]
    RateLimited {
        /// When the same call would pass (if nothing else is charged meanwhile).
        retry_after: Duration,
    },
    /// The events could not be stored now: the store failed (nothing of the transaction was
    /// committed), the queue is full, or the tracker is shutting down. gRPC `UNAVAILABLE`, HTTP
    /// 503: retrying the same events is safe (inserts are idempotent by event id).
    #[error("tracking unavailable: {0}")]
    Unavailable(String),
}

// ---------------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------------

/// A snapshot of a tracker's counters (since it started), for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrackerStats {
    /// Client events stored new.
    pub events_accepted: u64,
    /// Client events that were duplicates (retries).
    pub events_duplicate: u64,
    /// Client events rejected by validation.
    pub events_rejected: u64,
    /// Calls refused by the rate limiter (over the rate or over the burst).
    pub calls_rate_limited: u64,
    /// Calls refused because the writer's queue was full.
    pub calls_overloaded: u64,
    /// Properties (or nested items) dropped by scrubbing.
    pub properties_dropped: u64,
    /// Values redacted (secrets) or with emails replaced.
    pub values_redacted: u64,
    /// String values truncated.
    pub values_truncated: u64,
    /// Server-side exposures queued for writing (new for this process).
    pub exposures_recorded: u64,
    /// Server-side exposures skipped: already recorded by this process.
    pub exposures_deduplicated: u64,
    /// Server-side exposures dropped: queue full, tracker closed, or a key over the limits.
    pub exposures_dropped: u64,
    /// Server-side exposures stored new (not already in the database).
    pub exposures_written: u64,
    /// Server-side exposures lost to a failed write (forgotten, so recorded again next time).
    pub exposures_failed: u64,
    /// Transactions committed by the writer.
    pub batches_written: u64,
    /// Rows in those transactions.
    pub rows_written: u64,
    /// Transactions that failed.
    pub write_errors: u64,
    /// Server-side exposures whose batch failed and was tried again.
    pub exposures_retried: u64,
    /// Server-side exposures waiting in their queue now (a level, not a count since start).
    pub exposures_queued: u64,
    /// How many exposures their queue holds ([`TrackerConfig::exposure_queue_capacity`]).
    pub exposure_queue_capacity: u64,
    /// Calls (a client's events, a batch of exposures) waiting for the writer now (a level).
    pub calls_queued: u64,
    /// How many calls the writer's queue holds ([`TrackerConfig::queue_capacity`]).
    pub call_queue_capacity: u64,
}

#[derive(Debug, Default)]
struct Counters {
    events_accepted: AtomicU64,
    events_duplicate: AtomicU64,
    events_rejected: AtomicU64,
    calls_rate_limited: AtomicU64,
    calls_overloaded: AtomicU64,
    properties_dropped: AtomicU64,
    values_redacted: AtomicU64,
    values_truncated: AtomicU64,
    exposures_recorded: AtomicU64,
    exposures_deduplicated: AtomicU64,
    exposures_dropped: AtomicU64,
    exposures_written: AtomicU64,
    exposures_failed: AtomicU64,
    batches_written: AtomicU64,
    rows_written: AtomicU64,
    write_errors: AtomicU64,
    exposures_retried: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    if by > 0 {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

impl Counters {
    fn snapshot(&self) -> TrackerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TrackerStats {
            events_accepted: get(&self.events_accepted),
            events_duplicate: get(&self.events_duplicate),
            events_rejected: get(&self.events_rejected),
            calls_rate_limited: get(&self.calls_rate_limited),
            calls_overloaded: get(&self.calls_overloaded),
            properties_dropped: get(&self.properties_dropped),
            values_redacted: get(&self.values_redacted),
            values_truncated: get(&self.values_truncated),
            exposures_recorded: get(&self.exposures_recorded),
            exposures_deduplicated: get(&self.exposures_deduplicated),
            exposures_dropped: get(&self.exposures_dropped),
            exposures_written: get(&self.exposures_written),
            exposures_failed: get(&self.exposures_failed),
            batches_written: get(&self.batches_written),
            rows_written: get(&self.rows_written),
            write_errors: get(&self.write_errors),
            exposures_retried: get(&self.exposures_retried),
            ..TrackerStats::default()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Exposure dedupe
// ---------------------------------------------------------------------------------------------

/// The `(environment, experiment, unit)`s recorded lately, as 64-bit hashes (a collision, about
/// one in 2^64 per pair, would skip one exposure), in shards of two generations: when a shard's
/// current generation is full it becomes the previous one and the old previous one is forgotten.
/// A hit in the previous generation moves the key back to the current one, so units that keep
/// coming stay remembered. At most twice the capacity is held.
#[derive(Debug)]
struct Seen {
    hasher: RandomState,
    per_shard: usize,
    shards: Box<[Mutex<Generations>]>,
}

#[derive(Debug, Default)]
struct Generations {
    current: HashSet<u64>,
    previous: HashSet<u64>,
}

impl Seen {
    fn new(capacity: usize) -> Seen {
        Seen {
            hasher: RandomState::new(),
            per_shard: (capacity / DEDUPE_SHARDS).max(1),
            shards: (0..DEDUPE_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn key(&self, environment: &str, experiment: &str, unit: &str) -> u64 {
        self.hasher.hash_one((environment, experiment, unit))
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Generations> {
        let index = usize::try_from(key >> 32).unwrap_or(0) % self.shards.len();
        self.shards[index].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks `key` seen; whether it was new.
    fn insert(&self, key: u64) -> bool {
        let mut shard = self.shard(key);
        if shard.current.contains(&key) {
            return false;
        }
        let new = !shard.previous.remove(&key);
        if shard.current.len() >= self.per_shard {
            let Generations { current, previous } = &mut *shard;
            std::mem::swap(current, previous);
            current.clear();
        }
        shard.current.insert(key);
        new
    }

    /// Forgets `key` (its exposure was not stored).
    fn forget(&self, key: u64) {
        let mut shard = self.shard(key);
        shard.current.remove(&key);
        shard.previous.remove(&key);
    }
}

/// A server-side exposure waiting for the batcher.
#[derive(Debug)]
struct Exposure {
    key: u64,
    event: NewEvent,
}

/// The deterministic event id of a server-side exposure: `exposure:<experiment>:<unit>`, with `%`
/// and `:` in the experiment key written `%25` and `%3A` (so the first `:` after the prefix ends
/// the experiment, and two different pairs never share an id). Every replica and every restart
/// gives the same id, so the database stores a unit's exposure to an experiment once. At most
/// `9 + 3 × MAX_KEY_BYTES + 1 + MAX_UNIT_BYTES` bytes (usually far less): longer than
/// [`MAX_EVENT_ID_BYTES`], which only bounds the ids clients send.
pub fn exposure_event_id(experiment: &str, unit: &str) -> String {
    let mut id = String::with_capacity("exposure:".len() + experiment.len() + 1 + unit.len());
    id.push_str("exposure:");
    for c in experiment.chars() {
        match c {
            '%' => id.push_str("%25"),
            ':' => id.push_str("%3A"),
            c => id.push(c),
        }
    }
    id.push(':');
    id.push_str(unit);
    id
}

// ---------------------------------------------------------------------------------------------
// The tracker
// ---------------------------------------------------------------------------------------------

/// How a [`Tracker`] runs.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackerConfig {
    /// The rate limit per limiter key (`None`: unlimited).
    pub rate_limit: Option<RateLimit>,
    /// The policy of environments without their own.
    pub default_policy: TrackingPolicy,
    /// Policies by environment key (change them later with [`Tracker::set_policy`]).
    pub policies: HashMap<String, TrackingPolicy>,
    /// Most rows per transaction: the writer stops taking queued calls there (a single call
    /// larger than this is still written whole, alone).
    pub max_rows_per_transaction: usize,
    /// How long the writer waits for more calls once it has one (zero: it writes whatever piled
    /// up while the previous transaction ran, and no more).
    pub linger: Duration,
    /// Calls queued for the writer at most; more fail with [`TrackError::Unavailable`].
    pub queue_capacity: usize,
    /// Server-side exposures queued at most; more are dropped (and counted).
    pub exposure_queue_capacity: usize,
    /// `(environment, experiment, unit)`s remembered per generation for the exposure dedupe (two
    /// generations are kept).
    pub exposure_dedupe_capacity: usize,
}

impl Default for TrackerConfig {
    /// Unlimited, the default policy everywhere, and the `DEFAULT_…` sizes with no linger.
    fn default() -> TrackerConfig {
        TrackerConfig {
            rate_limit: None,
            default_policy: TrackingPolicy::default(),
            policies: HashMap::new(),
            max_rows_per_transaction: DEFAULT_MAX_ROWS_PER_TRANSACTION,
            linger: Duration::ZERO,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            exposure_queue_capacity: DEFAULT_EXPOSURE_QUEUE_CAPACITY,
            exposure_dedupe_capacity: DEFAULT_EXPOSURE_DEDUPE_CAPACITY,
        }
    }
}

/// The writer's answer to one queued call: its events' results in order, or why none was stored.
type Answer = Result<Vec<Inserted>, String>;

/// One call's events for the writer.
#[derive(Debug)]
struct Job {
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Answer>,
}

/// The tracking use case: validates, scrubs, rate limits and group-commits events (see the
/// module's documentation). Create it inside a Tokio runtime: it spawns its writer and exposure
/// batcher. [`Tracker::close`] flushes what is queued and stops them; dropping the tracker lets
/// them flush and stop in the background.
pub struct Tracker {
    writer: mpsc::Sender<Job>,
    exposures: mpsc::Sender<Exposure>,
    limiter: Option<Limiter>,
    default_policy: Arc<TrackingPolicy>,
    policies: RwLock<HashMap<String, Arc<TrackingPolicy>>>,
    seen: Arc<Seen>,
    counters: Arc<Counters>,
    closed: AtomicBool,
    stop_exposures: Arc<Notify>,
    stop_writer: Arc<Notify>,
    tasks: Mutex<Option<(JoinHandle<()>, JoinHandle<()>)>>,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("limiter", &self.limiter)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Tracker {
    /// A tracker storing into `store`; spawns its writer and exposure batcher on the current
    /// Tokio runtime.
    pub fn new(store: Arc<dyn EventStore>, config: TrackerConfig) -> Tracker {
        let counters = Arc::new(Counters::default());
        let seen = Arc::new(Seen::new(config.exposure_dedupe_capacity));
        let max_rows = config.max_rows_per_transaction.max(1);
        let (writer, jobs) = mpsc::channel(config.queue_capacity.max(1));
        let (exposures, exposure_rx) = mpsc::channel(config.exposure_queue_capacity.max(1));
        let stop_writer = Arc::new(Notify::new());
        let stop_exposures = Arc::new(Notify::new());
        let writer_task = tokio::spawn(write_loop(
            store,
            jobs,
            stop_writer.clone(),
            max_rows,
            config.linger,
            counters.clone(),
        ));
        let exposure_task = tokio::spawn(exposure_loop(
            exposure_rx,
            writer.clone(),
            seen.clone(),
            stop_exposures.clone(),
            max_rows,
            counters.clone(),
        ));
        Tracker {
            writer,
            exposures,
            limiter: config
                .rate_limit
                .map(|limit| Limiter::new(limit, DefaultClock::default())),
            default_policy: Arc::new(config.default_policy),
            policies: RwLock::new(config.policies.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()),
            seen,
            counters,
            closed: AtomicBool::new(false),
            stop_exposures,
            stop_writer,
            tasks: Mutex::new(Some((writer_task, exposure_task))),
        }
    }

    /// Sets `environment`'s policy (`None`: back to the default one).
    pub fn set_policy(&self, environment: &str, policy: Option<TrackingPolicy>) {
        let mut policies = self.policies.write().unwrap_or_else(PoisonError::into_inner);
        match policy {
            Some(policy) => policies.insert(environment.to_owned(), Arc::new(policy)),
            None => policies.remove(environment),
        };
    }

    /// The policy `environment`'s events are scrubbed by.
    pub fn policy(&self, environment: &str) -> Arc<TrackingPolicy> {
        let policies = self.policies.read().unwrap_or_else(PoisonError::into_inner);
        policies
            .get(environment)
            .cloned()
            .unwrap_or_else(|| self.default_policy.clone())
    }

    /// The counters so far, and the queues now.
    pub fn stats(&self) -> TrackerStats {
        let queued = |capacity: usize, free: usize| capacity.saturating_sub(free) as u64;
        TrackerStats {
            exposures_queued: queued(self.exposures.max_capacity(), self.exposures.capacity()),
            exposure_queue_capacity: self.exposures.max_capacity() as u64,
            calls_queued: queued(self.writer.max_capacity(), self.writer.capacity()),
            call_queue_capacity: self.writer.max_capacity() as u64,
            ..self.counters.snapshot()
        }
    }

    /// Tracks a client's `events` for `environment`, charging `limiter_key`'s rate limit: each
    /// event is validated and scrubbed, the valid ones are stored (in the next group commit) and
    /// the answer lists every event's outcome. Fails whole, with nothing stored, when the batch
    /// is too large or rate limited (then nothing is charged either) and when the events cannot
    /// be stored (then the rate limit was charged). Cancelling the call after its events were
    /// queued does not unqueue them: they are stored, and a retry answers
    /// [`EventOutcome::Duplicate`].
    pub async fn track(
        &self,
        environment: &str,
        limiter_key: &str,
        events: Vec<TrackEvent>,
    ) -> Result<TrackOutcome, TrackError> {
        if events.len() > MAX_BATCH {
            return Err(TrackError::TooMany {
                max: MAX_BATCH,
                events: events.len(),
            });
        }
        if events.is_empty() {
            return Ok(TrackOutcome::default());
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(TrackError::Unavailable("the tracker is shutting down".into()));
        }
        if let Some(limiter) = &self.limiter
            && let Err(e) = limiter.check(limiter_key, events.len())
        {
            bump(&self.counters.calls_rate_limited, 1);
            return Err(e);
        }

        let policy = self.policy(environment);
        let now = now_ms();
        let mut outcome = TrackOutcome {
            events: Vec::with_capacity(events.len()),
            scrubbed: ScrubReport::default(),
        };
        let mut accepted = Vec::with_capacity(events.len());
        let mut positions = Vec::with_capacity(events.len());
        for (index, event) in events.into_iter().enumerate() {
            if let Err(reason) = validate_event(&event, now) {
                outcome.events.push(EventOutcome::Rejected { reason });
                continue;
            }
            let mut report = ScrubReport::default();
            let properties = policy.scrub(event.properties, &mut report);
            outcome.scrubbed.add(&report);
            accepted.push(NewEvent {
                environment: environment.to_owned(),
                event_id: event.event_id,
                kind: event.kind,
                unit: event.unit,
                flag: event.flag,
                experiment: event.experiment,
                variant: event.variant,
                metric: event.metric,
                value: event.value,
                properties,
                client_time_ms: event.client_time_ms,
                server_time_ms: now,
            });
            positions.push(index);
            // A placeholder, replaced by the store's answer below.
            outcome.events.push(EventOutcome::Duplicate);
        }
        let rejected = outcome.events.len() - accepted.len();
        bump(&self.counters.events_rejected, rejected as u64);
        if accepted.is_empty() {
            return Ok(outcome);
        }

        let (reply, answer) = oneshot::channel();
        match self.writer.try_send(Job {
            events: accepted,
            reply,
        }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                bump(&self.counters.calls_overloaded, 1);
                return Err(TrackError::Unavailable("the tracking queue is full".into()));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(TrackError::Unavailable("the tracker is shutting down".into()));
            }
        }
        let inserted = match answer.await {
            Ok(Ok(inserted)) => inserted,
            Ok(Err(message)) => return Err(TrackError::Unavailable(message)),
            Err(_) => return Err(TrackError::Unavailable("the tracking writer stopped".into())),
        };
        let report = &outcome.scrubbed;
        bump(&self.counters.properties_dropped, report.dropped());
        bump(&self.counters.values_redacted, report.redacted + report.emails);
        bump(&self.counters.values_truncated, report.truncated);
        for (position, inserted) in positions.into_iter().zip(inserted) {
            outcome.events[position] = match inserted {
                Inserted::New => {
                    bump(&self.counters.events_accepted, 1);
                    EventOutcome::New
                }
                Inserted::Duplicate => {
                    bump(&self.counters.events_duplicate, 1);
                    EventOutcome::Duplicate
                }
            };
        }
        Ok(outcome)
    }

    /// Records that `unit` was served `variant` of `experiment` (through `flag`) in
    /// `environment`, for the evaluation hot path: never blocks on I/O nor awaits. The first time
    /// this process sees `(environment, experiment, unit)` (lately: see
    /// [`TrackerConfig::exposure_dedupe_capacity`]) it queues an exposure with the event id
    /// [`exposure_event_id`] for the background batcher; later calls are counted as
    /// deduplicated. When the queue is full the exposure is dropped and counted (and forgotten,
    /// so a later evaluation records it). Keys over the limits are dropped too.
    pub fn record_exposure(&self, environment: &str, experiment: &str, flag: &str, variant: &str, unit: &str) {
        let valid = [experiment, flag, variant].iter().all(|k| check_key("key", k).is_ok())
            && !unit.is_empty()
            && unit.len() <= MAX_UNIT_BYTES;
        if !valid {
            bump(&self.counters.exposures_dropped, 1);
            return;
        }
        let key = self.seen.key(environment, experiment, unit);
        if !self.seen.insert(key) {
            bump(&self.counters.exposures_deduplicated, 1);
            return;
        }
        let event = NewEvent {
            environment: environment.to_owned(),
            event_id: exposure_event_id(experiment, unit),
            kind: EventKind::Exposure,
            unit: unit.to_owned(),
            flag: Some(flag.to_owned()),
            experiment: Some(experiment.to_owned()),
            variant: Some(variant.to_owned()),
            metric: None,
            value: None,
            properties: Map::new(),
            client_time_ms: None,
            server_time_ms: now_ms(),
        };
        match self.exposures.try_send(Exposure { key, event }) {
            Ok(()) => bump(&self.counters.exposures_recorded, 1),
            Err(_) => {
                self.seen.forget(key);
                bump(&self.counters.exposures_dropped, 1);
            }
        }
    }

    /// Stops taking events and flushes: the exposures queued are written, then every queued
    /// call; returns once the writer has answered them all and stopped. Calls after this fail
    /// with [`TrackError::Unavailable`]; exposures recorded after it are dropped. Closing twice is
    /// harmless.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some((writer, exposures)) = tasks else {
            return;
        };
        self.stop_exposures.notify_one();
        if let Err(error) = exposures.await {
            tracing::warn!(%error, "the exposure batcher failed");
        }
        self.stop_writer.notify_one();
        if let Err(error) = writer.await {
            tracing::warn!(%error, "the tracking writer failed");
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The writer: takes what is queued, up to `max_rows` (waiting at most `linger` for more), stores
/// it in one transaction and answers each call. Once told to stop it closes its queue, writes
/// what is left in it and returns; it also returns when every sender is gone and the queue is
/// empty.
async fn write_loop(
    store: Arc<dyn EventStore>,
    mut jobs: mpsc::Receiver<Job>,
    stop: Arc<Notify>,
    max_rows: usize,
    linger: Duration,
    counters: Arc<Counters>,
) {
    let mut carried: Option<Job> = None;
    let mut stopping = false;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => {
                let next = if stopping {
                    jobs.recv().await
                } else {
                    tokio::select! {
                        job = jobs.recv() => job,
                        () = stop.notified() => {
                            stopping = true;
                            jobs.close();
                            continue;
                        }
                    }
                };
                match next {
                    Some(job) => job,
                    None => return,
                }
            }
        };
        let mut rows = first.events.len();
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while rows < max_rows {
            let next = match jobs.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) if linger.is_zero() => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(deadline, jobs.recv()).await.ok().flatten()
                }
            };
            let Some(job) = next else {
                break;
            };
            if rows + job.events.len() > max_rows {
                carried = Some(job);
                break;
            }
            rows += job.events.len();
            batch.push(job);
        }
        commit(store.as_ref(), batch, rows, &counters).await;
    }
}

/// Stores `batch` (of `rows` events) in one transaction and answers each of its calls.
async fn commit(store: &dyn EventStore, batch: Vec<Job>, rows: usize, counters: &Counters) {
    let mut events = Vec::with_capacity(rows);
    let mut replies = Vec::with_capacity(batch.len());
    for job in batch {
        replies.push((job.events.len(), job.reply));
        events.extend(job.events);
    }
    let error = match crate::io::store(crate::io::StoreCall::InsertEvents, store.insert_events(events)).await {
        Ok(inserted) if inserted.len() == rows => {
            bump(&counters.batches_written, 1);
            bump(&counters.rows_written, rows as u64);
            let mut inserted = inserted.into_iter();
            for (count, reply) in replies {
                // A caller that went away (its request was cancelled) is not waiting: its events
                // are stored all the same, and a retry answers Duplicate.
                let _ = reply.send(Ok(inserted.by_ref().take(count).collect()));
            }
            return;
        }
        Ok(inserted) => format!("the event store answered {} results for {rows} events", inserted.len()),
        Err(error) => error.to_string(),
    };
    bump(&counters.write_errors, 1);
    tracing::warn!(%error, rows, calls = replies.len(), "cannot store tracked events");
    for (_, reply) in replies {
        let _ = reply.send(Err(error.clone()));
    }
}

/// The exposure batcher: takes the queued exposures (up to `max_rows`), hands them to the writer
/// as one call and waits for its answer (meanwhile more pile up for the next call). Exposures of a
/// failed write are forgotten by the dedupe set, so they are recorded again. Once told to stop it
/// closes its queue, hands over what is left and returns.
/// How many times a batch of server-side exposures is retried before it is given up.
const EXPOSURE_RETRIES: u32 = 8;

/// The wait before retry `attempt` (1, 2, …): 100 ms doubling, at most 5 s (about 20 s in all).
fn retry_delay(attempt: u32) -> Duration {
    (Duration::from_millis(100) * 2u32.saturating_pow(attempt.saturating_sub(1))).min(Duration::from_secs(5))
}

async fn exposure_loop(
    mut queue: mpsc::Receiver<Exposure>,
    writer: mpsc::Sender<Job>,
    seen: Arc<Seen>,
    stop: Arc<Notify>,
    max_rows: usize,
    counters: Arc<Counters>,
) {
    let mut stopping = false;
    loop {
        let first = if stopping {
            queue.recv().await
        } else {
            tokio::select! {
                exposure = queue.recv() => exposure,
                () = stop.notified() => {
                    stopping = true;
                    queue.close();
                    continue;
                }
            }
        };
        let Some(first) = first else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max_rows {
            match queue.try_recv() {
                Ok(exposure) => batch.push(exposure),
                Err(_) => break,
            }
        }
        let keys: Vec<u64> = batch.iter().map(|e| e.key).collect();
        let events: Vec<NewEvent> = batch.into_iter().map(|e| e.event).collect();
        // Exposures are stored idempotently (deterministic ids), so a failed batch is retried
        // with backoff: a unit may never be evaluated again, and a lost exposure biases results.
        let mut attempt = 0;
        let result = loop {
            let (reply, answer) = oneshot::channel();
            let result = match writer
                .send(Job {
                    events: events.clone(),
                    reply,
                })
                .await
            {
                Ok(()) => answer
                    .await
                    .unwrap_or_else(|_| Err("the tracking writer stopped".into())),
                Err(_) => Err("the tracking writer stopped".into()),
            };
            match result {
                Err(error) if attempt < EXPOSURE_RETRIES && !stopping && !writer.is_closed() => {
                    attempt += 1;
                    bump(&counters.exposures_retried, keys.len() as u64);
                    tracing::debug!(%error, attempt, exposures = keys.len(), "server-side exposures not stored yet; retrying");
                    tokio::time::sleep(retry_delay(attempt)).await;
                }
                other => break other,
            }
        };
        match result {
            Ok(inserted) => {
                let new = inserted.iter().filter(|i| **i == Inserted::New).count();
                bump(&counters.exposures_written, new as u64);
            }
            Err(error) => {
                tracing::warn!(%error, exposures = keys.len(), "server-side exposures not stored after retrying: lost");
                for key in &keys {
                    seen.forget(*key);
                }
                bump(&counters.exposures_failed, keys.len() as u64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use futures::future::BoxFuture;
    use governor::clock::FakeRelativeClock;
    use serde_json::json;
    use vexil_store::{ExposureCount, MetricQuery, StoreError, VariantTotals};

    use super::*;

    // --- an in-memory event store --------------------------------------------------------------

    #[derive(Debug, Default)]
    struct MemoryState {
        ids: HashSet<(String, String)>,
        rows: Vec<NewEvent>,
        calls: usize,
        call_sizes: Vec<usize>,
        fail: bool,
        delay: Duration,
    }

    /// Stores events in memory, idempotently; optionally slow (`delay` per call, in Tokio time)
    /// or failing (storing nothing).
    #[derive(Debug, Default)]
    struct MemoryEvents {
        state: Mutex<MemoryState>,
    }

    impl MemoryEvents {
        fn new() -> Arc<MemoryEvents> {
            Arc::new(MemoryEvents::default())
        }

        fn slow(delay: Duration) -> Arc<MemoryEvents> {
            let store = MemoryEvents::new();
            store.state.lock().unwrap().delay = delay;
            store
        }

        fn set_fail(&self, fail: bool) {
            self.state.lock().unwrap().fail = fail;
        }

        fn rows(&self) -> Vec<NewEvent> {
            self.state.lock().unwrap().rows.clone()
        }

        fn calls(&self) -> usize {
            self.state.lock().unwrap().calls
        }
    }

    fn unsupported<T: Send + 'static>() -> BoxFuture<'static, vexil_store::Result<T>> {
        Box::pin(async { Err(StoreError::Internal("not in the in-memory store".into())) })
    }

    impl EventStore for MemoryEvents {
        fn insert_events(&self, events: Vec<NewEvent>) -> BoxFuture<'_, vexil_store::Result<Vec<Inserted>>> {
            Box::pin(async move {
                let delay = self.state.lock().unwrap().delay;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let mut state = self.state.lock().unwrap();
                state.calls += 1;
                state.call_sizes.push(events.len());
                if state.fail {
                    return Err(StoreError::Unavailable("the database is down".into()));
                }
                let mut answers = Vec::with_capacity(events.len());
                for event in events {
                    if state.ids.insert((event.environment.clone(), event.event_id.clone())) {
                        state.rows.push(event);
                        answers.push(Inserted::New);
                    } else {
                        answers.push(Inserted::Duplicate);
                    }
                }
                Ok(answers)
            })
        }

        fn exposure_counts(
            &self,
            _environment: String,
            _experiment: String,
            _from_ms: Option<i64>,
            _until_ms: Option<i64>,
        ) -> BoxFuture<'_, vexil_store::Result<Vec<ExposureCount>>> {
            unsupported()
        }

        fn metric_totals(&self, _query: MetricQuery) -> BoxFuture<'_, vexil_store::Result<Vec<VariantTotals>>> {
            unsupported()
        }

        fn prune_event_ids(&self, _older_than: Duration) -> BoxFuture<'_, vexil_store::Result<u64>> {
            unsupported()
        }

        fn delete_events_before(&self, _before_ms: i64) -> BoxFuture<'_, vexil_store::Result<u64>> {
            unsupported()
        }
    }

    // --- helpers -----------------------------------------------------------------------------

    fn conversion(id: &str) -> TrackEvent {
        let mut event = TrackEvent::new(id, EventKind::Conversion, "user-1");
        event.metric = Some("checkout".into());
        event
    }

    fn exposure(id: &str) -> TrackEvent {
        let mut event = TrackEvent::new(id, EventKind::Exposure, "user-1");
        event.experiment = Some("exp".into());
        event.variant = Some("on".into());
        event
    }

    fn reason(event: &TrackEvent) -> String {
        validate_event(event, now_ms()).unwrap_err()
    }

    fn scrub(policy: &TrackingPolicy, properties: Value) -> (Value, ScrubReport) {
        let Value::Object(map) = properties else {
            panic!("not an object")
        };
        let mut report = ScrubReport::default();
        let kept = policy.scrub(map, &mut report);
        (Value::Object(kept), report)
    }

    fn scrub_one(value: Value) -> Value {
        let (kept, _) = scrub(&TrackingPolicy::default(), json!({ "v": value }));
        kept["v"].clone()
    }

    fn tracker(store: &Arc<MemoryEvents>, config: TrackerConfig) -> Tracker {
        Tracker::new(store.clone(), config)
    }

    #[test]
    fn the_tracker_is_shareable() {
        fn shareable<T: Send + Sync + fmt::Debug + 'static>() {}
        shareable::<Tracker>();
    }

    // --- validation --------------------------------------------------------------------------

    #[test]
    fn valid_events_pass() {
        assert_eq!(validate_event(&conversion("e1"), now_ms()), Ok(()));
        assert_eq!(validate_event(&exposure("e2"), now_ms()), Ok(()));
        let mut custom = TrackEvent::new("e3", EventKind::Custom, "u");
        custom.metric = Some("clicks".into());
        custom.value = Some(2.5);
        custom.client_time_ms = Some(now_ms() - 1000);
        assert_eq!(validate_event(&custom, now_ms()), Ok(()));
    }

    #[test]
    fn event_id_rules() {
        assert_eq!(reason(&conversion("")), "event_id is empty");
        assert!(reason(&conversion(&"x".repeat(129))).contains("more than 128"));
        assert_eq!(validate_event(&conversion(&"x".repeat(128)), now_ms()), Ok(()));
        assert!(reason(&conversion("a b")).contains("printable"));
        assert!(reason(&conversion("a\u{7}b")).contains("printable"));
    }

    #[test]
    fn unit_rules() {
        let mut event = conversion("e");
        event.unit = String::new();
        assert_eq!(reason(&event), "unit is empty");
        event.unit = "u".repeat(257);
        assert!(reason(&event).contains("more than 256"));
        event.unit = "u".repeat(256);
        assert_eq!(validate_event(&event, now_ms()), Ok(()));
    }

    #[test]
    fn kind_requirements() {
        let mut event = exposure("e");
        event.experiment = None;
        assert_eq!(reason(&event), "an exposure needs an experiment");
        let mut event = exposure("e");
        event.variant = None;
        assert_eq!(reason(&event), "an exposure needs a variant");
        let mut event = conversion("e");
        event.metric = None;
        assert_eq!(reason(&event), "a conversion event needs a metric");
        let event = TrackEvent::new("e", EventKind::Custom, "u");
        assert_eq!(reason(&event), "a custom event needs a metric");
    }

    #[test]
    fn key_rules() {
        let mut event = exposure("e");
        event.experiment = Some("x".repeat(257));
        assert!(reason(&event).starts_with("experiment is 257 bytes"));
        event.experiment = Some("x".repeat(256));
        assert_eq!(validate_event(&event, now_ms()), Ok(()));
        let mut event = exposure("e");
        event.variant = Some(String::new());
        assert_eq!(reason(&event), "variant is empty");
        let mut event = conversion("e");
        event.flag = Some("f\n".into());
        assert_eq!(reason(&event), "flag has a control character");
    }

    #[test]
    fn value_and_clock_rules() {
        let mut event = conversion("e");
        event.value = Some(f64::NAN);
        assert!(reason(&event).contains("not a finite number"));
        event.value = Some(f64::INFINITY);
        assert!(reason(&event).contains("not a finite number"));
        let year_ms = i64::try_from(MAX_CLIENT_CLOCK_SKEW.as_millis()).unwrap();
        let now = now_ms();
        let mut event = conversion("e");
        event.client_time_ms = Some(now - year_ms - 60_000);
        assert!(validate_event(&event, now).unwrap_err().contains("365 days"));
        event.client_time_ms = Some(now + year_ms + 60_000);
        assert!(validate_event(&event, now).is_err());
        event.client_time_ms = Some(0);
        assert!(validate_event(&event, now).is_err());
        event.client_time_ms = Some(now + 60_000);
        assert_eq!(validate_event(&event, now), Ok(()));
    }

    #[test]
    fn property_limits() {
        let mut event = conversion("e");
        for i in 0..=MAX_PROPERTIES {
            event.properties.insert(format!("p{i}"), json!(i));
        }
        assert!(reason(&event).contains("65 properties, more than 64"));
        let mut event = conversion("e");
        event.properties.insert("k".repeat(129), json!(1));
        assert!(reason(&event).contains("more than 128"));
        let mut event = conversion("e");
        event.properties.insert("k".repeat(128), json!(1));
        assert_eq!(validate_event(&event, now_ms()), Ok(()));
        let mut event = conversion("e");
        event.properties.insert(String::new(), json!(1));
        assert_eq!(reason(&event), "a property name is empty");
    }

    // --- scrubbing ---------------------------------------------------------------------------

    #[test]
    fn secret_key_names_are_dropped() {
        for name in [
            "password",
            "user_password",
            "Passwd",
            "client-secret",
            "access_token",
            "X-Auth-Token",
            "api_key",
            "apiKey",
            "APIKey",
            "x-api-key",
            "apikey",
            "Authorization",
            "auth",
            "Set-Cookie",
            "session_id",
            "sessionId",
            "credit_card",
            "creditCardNumber",
            "card_number",
            "SSN",
            "user.ssn",
        ] {
            assert!(is_secret_key(name), "{name} should be a secret's name");
        }
        for name in [
            "plan",
            "author",
            "tokens_used",
            "classname",
            "lessons",
            "country",
            "page",
            "card_color",
            "api_version",
        ] {
            assert!(!is_secret_key(name), "{name} is not a secret's name");
        }
        let (kept, report) = scrub(
            &TrackingPolicy::default(),
            json!({ "plan": "pro", "password": "hunter2", "nested": { "apiKey": "k", "ok": 1 } }),
        );
        assert_eq!(kept, json!({ "plan": "pro", "nested": { "ok": 1 } }));
        assert_eq!(report.secret_keys, 2);
    }

    #[test]
    fn jwt_is_redacted() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl";
        assert_eq!(scrub_one(json!(jwt)), json!(REDACTED));
        assert_eq!(scrub_one(json!(format!("token={jwt}; path=/"))), json!(REDACTED));
        assert_eq!(scrub_one(json!("eyJ.not.a.jwt")), json!("eyJ.not.a.jwt"));
    }

    #[test]
    fn bearer_is_redacted() {
        assert_eq!(scrub_one(json!("Bearer abc123def456")), json!(REDACTED));
        assert_eq!(scrub_one(json!("Authorization:Bearer x-y_z.12345")), json!(REDACTED));
        assert_eq!(scrub_one(json!("bearer 0123456789")), json!(REDACTED));
        assert_eq!(scrub_one(json!("the bearer of news")), json!("the bearer of news"));
        assert_eq!(scrub_one(json!("bearer instrument")), json!("bearer instrument"));
    }

    #[test]
    fn long_tokens_are_redacted() {
        let hex = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert_eq!(scrub_one(json!(hex)), json!(REDACTED));
        assert_eq!(scrub_one(json!(format!("sha {hex}"))), json!(REDACTED));
        let base64 = "dGhpcyBpcyBhIHNlY3JldCB0b2tlbiB2YWx1ZQ2";
        assert_eq!(scrub_one(json!(base64)), json!(REDACTED));
        assert_eq!(scrub_one(json!("sk_live_4eC39HqLyjWDarjtT1zdp7dc")), json!(REDACTED));
        // Not secrets: UUIDs, short hex, long single-case words, URLs with paths.
        for kept in [
            "550e8400-e29b-41d4-a716-446655440000",
            "550E8400-E29B-41D4-A716-446655440000",
            "deadbeef1234",
            "this_is_a_very_long_snake_case_identifier_v2",
            "https://example.com/products/category/item-details/2024/summer",
        ] {
            assert_eq!(scrub_one(json!(kept)), json!(kept), "{kept}");
        }
    }

    #[test]
    fn aws_keys_are_redacted() {
        assert_eq!(scrub_one(json!("AKIAIOSFODNN7EXAMPLE")), json!(REDACTED));
        assert_eq!(scrub_one(json!("key=ASIAIOSFODNN7EXAMPLE,")), json!(REDACTED));
        assert_eq!(scrub_one(json!("AKIA is a prefix")), json!("AKIA is a prefix"));
    }

    #[test]
    fn card_numbers_are_redacted() {
        for card in [
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "paid with 5500 0000 0000 0004.",
            "378282246310005",
        ] {
            assert_eq!(scrub_one(json!(card)), json!(REDACTED), "{card}");
        }
        assert_eq!(scrub_one(json!(4_111_111_111_111_111_u64)), json!(REDACTED));
        // Luhn fails; millisecond timestamps start with 1; glued to letters; too short.
        for kept in [
            "4111111111111112",
            "1700000000000",
            "order4111111111111111",
            "411111111111",
        ] {
            assert_eq!(scrub_one(json!(kept)), json!(kept), "{kept}");
        }
        assert_eq!(scrub_one(json!(1_700_000_000_000_i64)), json!(1_700_000_000_000_i64));
        assert_eq!(scrub_one(json!(42)), json!(42));
    }

    #[test]
    fn emails_are_replaced_when_asked() {
        let policy = TrackingPolicy::default();
        let (kept, report) = scrub(
            &policy,
            json!({ "note": "mail a.b+c@example.co.uk or x@y.io, not foo@bar or @x.com" }),
        );
        assert_eq!(
            kept,
            json!({ "note": "mail [email] or [email], not foo@bar or @x.com" })
        );
        assert_eq!(report.emails, 2);
        let keep_emails = TrackingPolicy {
            scrub_emails: false,
            ..TrackingPolicy::default()
        };
        let (kept, _) = scrub(&keep_emails, json!({ "email": "ann@example.com" }));
        assert_eq!(kept, json!({ "email": "ann@example.com" }));
    }

    #[test]
    fn long_strings_are_cut_on_a_char_boundary() {
        let policy = TrackingPolicy {
            max_value_bytes: 5,
            ..TrackingPolicy::default()
        };
        let (kept, report) = scrub(&policy, json!({ "a": "abcdefgh", "b": "abcdé", "c": "abc" }));
        assert_eq!(kept, json!({ "a": "abcde", "b": "abcd", "c": "abc" }));
        assert_eq!(report.truncated, 2);
        // The policy cannot raise the cap.
        let policy = TrackingPolicy {
            max_value_bytes: usize::MAX,
            ..TrackingPolicy::default()
        };
        let (kept, _) = scrub(&policy, json!({ "a": "x".repeat(MAX_PROPERTY_VALUE_BYTES + 10) }));
        assert_eq!(kept["a"].as_str().unwrap().len(), MAX_PROPERTY_VALUE_BYTES);
    }

    #[test]
    fn nesting_is_limited() {
        let items: Vec<u32> = (0..40).collect();
        let (kept, report) = scrub(
            &TrackingPolicy::default(),
            json!({
                "tags": ["a", "b", ["deep"], { "deep": 1 }],
                "obj": { "x": 1, "y": { "z": 2 }, "mail": "a@b.cd" },
                "many": items,
            }),
        );
        assert_eq!(kept["tags"], json!(["a", "b"]));
        assert_eq!(kept["obj"], json!({ "x": 1, "mail": "[email]" }));
        assert_eq!(kept["many"].as_array().unwrap().len(), MAX_NESTED_ITEMS);
        assert_eq!(report.over_limit, 3 + 8);
    }

    #[test]
    fn allowlist_and_max_properties() {
        let policy = TrackingPolicy {
            allowed_properties: Some(["plan".to_owned(), "country".to_owned(), "password".to_owned()].into()),
            ..TrackingPolicy::default()
        };
        let (kept, report) = scrub(
            &policy,
            json!({ "plan": "pro", "country": "NL", "email": "a@b.cd", "password": "x" }),
        );
        assert_eq!(kept, json!({ "plan": "pro", "country": "NL" }));
        assert_eq!(report.not_allowed, 1);
        assert_eq!(report.secret_keys, 1, "an allowed secret's name is still dropped");

        let policy = TrackingPolicy {
            max_properties: 2,
            ..TrackingPolicy::default()
        };
        let (kept, report) = scrub(&policy, json!({ "a": 1, "b": 2, "c": 3 }));
        assert_eq!(kept.as_object().unwrap().len(), 2);
        assert_eq!(report.over_limit, 1);
    }

    // --- rate limiting -----------------------------------------------------------------------

    #[test]
    fn limiter_charges_events_and_says_when_to_retry() {
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::new(
            RateLimit {
                per_second: 10,
                burst: 5,
            },
            clock.clone(),
        );
        assert_eq!(limiter.check("key", 5), Ok(()));
        assert_eq!(
            limiter.check("key", 1),
            Err(TrackError::RateLimited {
                retry_after: Duration::from_millis(100)
            })
        );
        assert_eq!(
            limiter.check("key", 3),
            Err(TrackError::RateLimited {
                retry_after: Duration::from_millis(300)
            })
        );
        assert_eq!(limiter.check("other", 5), Ok(()), "keys are limited apart");
        clock.advance(Duration::from_millis(100));
        assert_eq!(limiter.check("key", 1), Ok(()));
        assert_eq!(
            limiter.check("key", 6),
            Err(TrackError::OverBurst { events: 6, burst: 5 })
        );
        assert_eq!(limiter.check("key", 0), Ok(()));
    }

    #[tokio::test]
    async fn track_is_rate_limited_per_key() {
        let store = MemoryEvents::new();
        let config = TrackerConfig {
            rate_limit: Some(RateLimit {
                per_second: 1,
                burst: 3,
            }),
            ..TrackerConfig::default()
        };
        let tracker = tracker(&store, config);
        let batch = |p: &str| (0..3).map(|i| conversion(&format!("{p}{i}"))).collect::<Vec<_>>();
        tracker.track("prod", "key-a", batch("a")).await.unwrap();
        match tracker.track("prod", "key-a", vec![conversion("late")]).await {
            Err(TrackError::RateLimited { retry_after }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
            }
            other => panic!("expected RateLimited, got {other:?}"),
        }
        tracker.track("prod", "key-b", batch("b")).await.unwrap();
        assert_eq!(
            tracker
                .track("prod", "key-c", batch("c").into_iter().chain(batch("d")).collect())
                .await,
            Err(TrackError::OverBurst { events: 6, burst: 3 })
        );
        assert_eq!(tracker.stats().calls_rate_limited, 2);
        assert_eq!(store.rows().len(), 6);
    }

    // --- track -------------------------------------------------------------------------------

    #[tokio::test]
    async fn too_many_events_fail_whole() {
        let store = MemoryEvents::new();
        let tracker = tracker(&store, TrackerConfig::default());
        let events = (0..=MAX_BATCH).map(|i| conversion(&format!("e{i}"))).collect();
        assert_eq!(
            tracker.track("prod", "k", events).await,
            Err(TrackError::TooMany {
                max: MAX_BATCH,
                events: MAX_BATCH + 1
            })
        );
        assert_eq!(store.calls(), 0);
        assert_eq!(
            tracker.track("prod", "k", Vec::new()).await,
            Ok(TrackOutcome::default())
        );
    }

    #[tokio::test]
    async fn good_events_are_kept_beside_rejected_ones() {
        let store = MemoryEvents::new();
        let tracker = tracker(&store, TrackerConfig::default());
        let mut with_props = conversion("e3");
        with_props.properties = json!({ "plan": "pro", "password": "x", "note": "ann@example.com" })
            .as_object()
            .unwrap()
            .clone();
        let outcome = tracker
            .track("prod", "k", vec![conversion("e1"), conversion(""), with_props])
            .await
            .unwrap();
        assert_eq!(
            outcome.events,
            vec![
                EventOutcome::New,
                EventOutcome::Rejected {
                    reason: "event_id is empty".into()
                },
                EventOutcome::New,
            ]
        );
        assert_eq!(outcome.rejected().collect::<Vec<_>>(), vec![(1, "event_id is empty")]);
        assert_eq!(outcome.scrubbed.secret_keys, 1);
        assert_eq!(outcome.scrubbed.emails, 1);
        let rows = store.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].environment, "prod");
        assert_eq!(
            Value::Object(rows[1].properties.clone()),
            json!({ "plan": "pro", "note": "[email]" })
        );
        assert!(rows[1].server_time_ms > 0);
        let stats = tracker.stats();
        assert_eq!((stats.events_accepted, stats.events_rejected), (2, 1));
        assert_eq!(stats.properties_dropped, 1);
    }

    #[tokio::test]
    async fn environment_policies_apply() {
        let store = MemoryEvents::new();
        let strict = TrackingPolicy {
            allowed_properties: Some(["plan".to_owned()].into()),
            ..TrackingPolicy::default()
        };
        let config = TrackerConfig {
            policies: [("prod".to_owned(), strict)].into(),
            ..TrackerConfig::default()
        };
        let tracker = tracker(&store, config);
        let event = |id: &str| {
            let mut e = conversion(id);
            e.properties = json!({ "plan": "pro", "page": "/home" }).as_object().unwrap().clone();
            e
        };
        tracker.track("prod", "k", vec![event("a")]).await.unwrap();
        tracker.track("dev", "k", vec![event("b")]).await.unwrap();
        tracker.set_policy(
            "dev",
            Some(TrackingPolicy {
                max_properties: 0,
                ..TrackingPolicy::default()
            }),
        );
        tracker.track("dev", "k", vec![event("c")]).await.unwrap();
        tracker.set_policy("prod", None);
        tracker.track("prod", "k", vec![event("d")]).await.unwrap();
        let props: Vec<usize> = store.rows().iter().map(|r| r.properties.len()).collect();
        assert_eq!(props, vec![1, 2, 0, 2]);
    }

    #[tokio::test]
    async fn a_retry_is_a_duplicate() {
        let store = MemoryEvents::new();
        let tracker = tracker(&store, TrackerConfig::default());
        let batch = vec![conversion("e1"), conversion("e2")];
        let first = tracker.track("prod", "k", batch.clone()).await.unwrap();
        assert_eq!(first.accepted(), 2);
        let retry = tracker.track("prod", "k", batch.clone()).await.unwrap();
        assert_eq!(retry.events, vec![EventOutcome::Duplicate, EventOutcome::Duplicate]);
        assert_eq!(retry.duplicates(), 2);
        // Same ids in another environment are other events.
        let elsewhere = tracker.track("dev", "k", batch).await.unwrap();
        assert_eq!(elsewhere.accepted(), 2);
        assert_eq!(store.rows().len(), 4);
        assert_eq!(tracker.stats().events_duplicate, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_calls_share_transactions() {
        let store = MemoryEvents::slow(Duration::from_millis(10));
        let tracker = Arc::new(tracker(&store, TrackerConfig::default()));
        tracker.track("prod", "k", vec![conversion("old")]).await.unwrap();
        let callers = 50;
        let handles: Vec<_> = (0..callers)
            .map(|i| {
                let tracker = tracker.clone();
                tokio::spawn(async move {
                    // Odd callers retry an event stored before: it must come back Duplicate to
                    // them, and only to them.
                    let second = if i % 2 == 1 { "old".to_owned() } else { format!("b{i}") };
                    let outcome = tracker
                        .track("prod", "k", vec![conversion(&format!("a{i}")), conversion(&second)])
                        .await
                        .unwrap();
                    (i, outcome)
                })
            })
            .collect();
        for handle in handles {
            let (i, outcome) = handle.await.unwrap();
            let expected = if i % 2 == 1 {
                vec![EventOutcome::New, EventOutcome::Duplicate]
            } else {
                vec![EventOutcome::New, EventOutcome::New]
            };
            assert_eq!(outcome.events, expected, "caller {i}");
        }
        let calls = store.calls() - 1;
        assert!(calls < callers / 2, "{calls} transactions for {callers} callers");
        assert_eq!(store.rows().len(), 1 + callers + callers / 2);
        let stats = tracker.stats();
        assert_eq!(stats.batches_written, u64::try_from(calls).unwrap() + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn transactions_respect_max_rows() {
        let store = MemoryEvents::slow(Duration::from_millis(10));
        let config = TrackerConfig {
            max_rows_per_transaction: 4,
            ..TrackerConfig::default()
        };
        let tracker = Arc::new(tracker(&store, config));
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let tracker = tracker.clone();
                tokio::spawn(async move {
                    let events = vec![conversion(&format!("a{i}")), conversion(&format!("b{i}"))];
                    tracker.track("prod", "k", events).await.unwrap().accepted()
                })
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.await.unwrap(), 2);
        }
        let sizes = store.state.lock().unwrap().call_sizes.clone();
        assert!(sizes.iter().all(|&n| n <= 4), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn linger_waits_for_more() {
        let store = MemoryEvents::new();
        let config = TrackerConfig {
            linger: Duration::from_millis(5),
            ..TrackerConfig::default()
        };
        let tracker = Arc::new(tracker(&store, config));
        let handles: Vec<_> = (0..5)
            .map(|i| {
                let tracker = tracker.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(i)).await;
                    tracker
                        .track("prod", "k", vec![conversion(&format!("e{i}"))])
                        .await
                        .unwrap()
                })
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.await.unwrap().accepted(), 1);
        }
        assert_eq!(store.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_store_fails_every_caller_of_the_batch() {
        let store = MemoryEvents::slow(Duration::from_millis(10));
        store.set_fail(true);
        let tracker = Arc::new(tracker(&store, TrackerConfig::default()));
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let tracker = tracker.clone();
                tokio::spawn(async move { tracker.track("prod", "k", vec![conversion(&format!("e{i}"))]).await })
            })
            .collect();
        for handle in handles {
            match handle.await.unwrap() {
                Err(TrackError::Unavailable(message)) => assert!(message.contains("the database is down")),
                other => panic!("expected Unavailable, got {other:?}"),
            }
        }
        assert!(store.rows().is_empty());
        let stats = tracker.stats();
        assert_eq!(stats.events_accepted, 0);
        assert_eq!(stats.write_errors, u64::try_from(store.calls()).unwrap());
        assert!(store.calls() < 10);
        // Once the store is back, the same events are stored.
        store.set_fail(false);
        let outcome = tracker.track("prod", "k", vec![conversion("e1")]).await.unwrap();
        assert_eq!(outcome.events, vec![EventOutcome::New]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_is_unavailable() {
        let store = MemoryEvents::slow(Duration::from_secs(1));
        let config = TrackerConfig {
            queue_capacity: 1,
            ..TrackerConfig::default()
        };
        let tracker = Arc::new(tracker(&store, config));
        // The first call is taken by the writer (which then sleeps in the store), the second
        // waits in the queue, the third finds it full.
        let first = tokio::spawn({
            let tracker = tracker.clone();
            async move { tracker.track("prod", "k", vec![conversion("e1")]).await }
        });
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        let second = tokio::spawn({
            let tracker = tracker.clone();
            async move { tracker.track("prod", "k", vec![conversion("e2")]).await }
        });
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        match tracker.track("prod", "k", vec![conversion("e3")]).await {
            Err(TrackError::Unavailable(message)) => assert!(message.contains("full")),
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(first.await.unwrap().is_ok());
        assert!(second.await.unwrap().is_ok());
        assert_eq!(tracker.stats().calls_overloaded, 1);
    }

    // --- server-side exposures ---------------------------------------------------------------

    #[tokio::test]
    async fn exposures_are_deduplicated_and_have_deterministic_ids() {
        let store = MemoryEvents::new();
        let tracker = tracker(&store, TrackerConfig::default());
        tracker.record_exposure("prod", "exp", "flag", "on", "user-1");
        tracker.record_exposure("prod", "exp", "flag", "on", "user-1");
        tracker.record_exposure("prod", "exp", "flag", "off", "user-1");
        tracker.record_exposure("prod", "exp", "flag", "on", "user-2");
        tracker.record_exposure("dev", "exp", "flag", "on", "user-1");
        tracker.record_exposure("prod", "other", "flag", "on", "user-1");
        tracker.record_exposure("prod", "", "flag", "on", "user-1");
        tracker.close().await;
        let mut ids: Vec<(String, String)> = store
            .rows()
            .iter()
            .map(|r| (r.environment.clone(), r.event_id.clone()))
            .collect();
        ids.sort();
        assert_eq!(
            ids,
            vec![
                ("dev".into(), "exposure:exp:user-1".into()),
                ("prod".into(), "exposure:exp:user-1".into()),
                ("prod".into(), "exposure:exp:user-2".into()),
                ("prod".into(), "exposure:other:user-1".into()),
            ]
        );
        let row = store.rows().into_iter().find(|r| r.unit == "user-2").unwrap();
        assert_eq!(row.kind, EventKind::Exposure);
        assert_eq!(row.flag.as_deref(), Some("flag"));
        assert_eq!(row.experiment.as_deref(), Some("exp"));
        assert_eq!(row.variant.as_deref(), Some("on"));
        let stats = tracker.stats();
        assert_eq!(stats.exposures_recorded, 4);
        assert_eq!(stats.exposures_deduplicated, 2);
        assert_eq!(stats.exposures_dropped, 1);
        assert_eq!(stats.exposures_written, 4);
    }

    #[test]
    fn exposure_ids_are_unambiguous() {
        assert_eq!(exposure_event_id("exp", "user-1"), "exposure:exp:user-1");
        assert_eq!(exposure_event_id("a:b", "c"), "exposure:a%3Ab:c");
        assert_eq!(exposure_event_id("a%3Ab", "c"), "exposure:a%253Ab:c");
        assert_ne!(exposure_event_id("a:b", "c"), exposure_event_id("a", "b:c"));
    }

    #[tokio::test]
    async fn exposures_dedupe_in_the_database_across_trackers() {
        let store = MemoryEvents::new();
        for _ in 0..2 {
            // Another replica, or this one after a restart.
            let tracker = tracker(&store, TrackerConfig::default());
            tracker.record_exposure("prod", "exp", "flag", "on", "user-1");
            tracker.close().await;
        }
        assert_eq!(store.rows().len(), 1);
    }

    #[test]
    fn the_dedupe_set_is_bounded_and_keeps_hot_keys() {
        let seen = Seen::new(DEDUPE_SHARDS * 4);
        let hot = seen.key("prod", "exp", "hot");
        assert!(seen.insert(hot));
        for i in 0..1000 {
            assert!(seen.insert(seen.key("prod", "exp", &format!("u{i}"))));
            // The hot key keeps being seen, so it is never forgotten.
            assert!(!seen.insert(hot));
        }
        for shard in seen.shards.iter() {
            let shard = shard.lock().unwrap();
            assert!(shard.current.len() <= 4 && shard.previous.len() <= 4);
        }
        // Cold keys eventually go: seen again, they count as new.
        assert!(seen.insert(seen.key("prod", "exp", "u0")));
        seen.forget(hot);
        assert!(seen.insert(hot));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_exposures_are_forgotten() {
        let store = MemoryEvents::new();
        store.set_fail(true);
        let tracker = tracker(&store, TrackerConfig::default());
        tracker.record_exposure("prod", "exp", "flag", "on", "user-1");
        // Retried with backoff for about 20 s, then given up and forgotten.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let stats = tracker.stats();
        assert_eq!(
            (stats.exposures_failed, stats.exposures_retried),
            (1, u64::from(EXPOSURE_RETRIES))
        );
        store.set_fail(false);
        tracker.record_exposure("prod", "exp", "flag", "on", "user-1");
        tracker.close().await;
        assert_eq!(store.rows().len(), 1);
        assert_eq!(tracker.stats().exposures_recorded, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_exposure_batch_is_retried_until_it_is_stored() {
        let store = MemoryEvents::new();
        store.set_fail(true);
        let tracker = tracker(&store, TrackerConfig::default());
        for i in 0..3 {
            tracker.record_exposure("prod", "exp", "flag", "on", &format!("user-{i}"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(tracker.stats().exposures_retried >= 3, "{:?}", tracker.stats());
        assert!(store.rows().is_empty());
        // The database is back before the retries run out: nothing is lost.
        store.set_fail(false);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let stats = tracker.stats();
        assert_eq!((stats.exposures_written, stats.exposures_failed), (3, 0));
        assert_eq!(store.rows().len(), 3);
        tracker.close().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_exposure_queue_drops() {
        let store = MemoryEvents::slow(Duration::from_secs(1));
        let config = TrackerConfig {
            exposure_queue_capacity: 2,
            ..TrackerConfig::default()
        };
        let tracker = tracker(&store, config);
        for i in 0..5 {
            tracker.record_exposure("prod", "exp", "flag", "on", &format!("u{i}"));
        }
        let stats = tracker.stats();
        assert_eq!(stats.exposures_recorded, 2);
        assert_eq!(stats.exposures_dropped, 3);
        // Nothing taken yet (the batcher has not run): the queue is full.
        assert_eq!((stats.exposures_queued, stats.exposure_queue_capacity), (2, 2));
        tracker.close().await;
        assert_eq!(tracker.stats().exposures_queued, 0);
        assert_eq!(store.rows().len(), 2);
        // Dropped ones were forgotten: recorded on a later evaluation (here: after close, dropped).
        tracker.record_exposure("prod", "exp", "flag", "on", "u4");
        assert_eq!(tracker.stats().exposures_dropped, 4);
    }

    // --- shutdown ----------------------------------------------------------------------------

    #[tokio::test(start_paused = true)]
    async fn close_flushes_what_is_queued() {
        let store = MemoryEvents::slow(Duration::from_millis(50));
        let tracker = Arc::new(tracker(&store, TrackerConfig::default()));
        let calls: Vec<_> = (0..5)
            .map(|i| {
                let tracker = tracker.clone();
                tokio::spawn(async move { tracker.track("prod", "k", vec![conversion(&format!("e{i}"))]).await })
            })
            .collect();
        for i in 0..3 {
            tracker.record_exposure("prod", "exp", "flag", "on", &format!("u{i}"));
        }
        // Let the calls queue up, then close while the first transaction is still running.
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        tracker.close().await;
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap().events, vec![EventOutcome::New]);
        }
        assert_eq!(store.rows().len(), 8);
        assert_eq!(
            tracker.track("prod", "k", vec![conversion("late")]).await,
            Err(TrackError::Unavailable("the tracker is shutting down".into()))
        );
        tracker.close().await;
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_tracker_flushes_in_the_background() {
        let store = MemoryEvents::slow(Duration::from_millis(50));
        let tracker = tracker(&store, TrackerConfig::default());
        for i in 0..3 {
            tracker.record_exposure("prod", "exp", "flag", "on", &format!("u{i}"));
        }
        drop(tracker);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(store.rows().len(), 3);
    }
}
