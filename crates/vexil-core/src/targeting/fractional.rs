//! flagd's `fractional` operator: deterministic weighted bucketing by MurmurHash3 (x86_32, seed 0).
//!
//! `{"fractional": [<bucketing value>?, [variant, weight?], …]}`. Without a bucketing value the
//! flag key and the context's `targetingKey` are hashed. Three generations of the spec exist and all
//! three are served, selected per snapshot by [`FractionalMode`]:
//!
//! - **v1** (flagd ≤ 0.14): the string `bucketBy`, `bucket = |i32(hash)| / i32::MAX * 100`, weights
//!   as percentages of their total;
//! - **v2** (flagd 0.15–0.16): the same string, `bucket = (u64(hash) * total) >> 32` over integer
//!   weights;
//! - **v3** (the default; testbed 3.9+, current providers): the hash input is the deterministic CBOR
//!   of the bucketing value (any JSON type but array and null), or of `[flagKey, targetingKey]`;
//!   v2 bucketing.
//!
//! Every malformed input yields `null`, so an enclosing `if` falls through to the default variant
//! (flagd#1874).

use std::cell::RefCell;
use std::io::{Cursor, Read};

use datalogic_rs::bumpalo::Bump;
use datalogic_rs::datavalue::NumberValue;
use datalogic_rs::operator::EvalContext;
use datalogic_rs::{ArenaExt, CustomOperator, DataValue};

use super::cbor;

/// Which generation of the `fractional` spec to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FractionalMode {
    /// Legacy float percentages over the string hash (flagd ≤ 0.14, Rust provider ≤ 0.2).
    V1,
    /// Integer bucketing over the string hash (flagd 0.15–0.16, JS flagd-core 4).
    V2,
    /// Integer bucketing over the deterministic CBOR of the bucketing value (current spec).
    #[default]
    V3,
}

impl FractionalMode {
    /// Parses `v1`, `v2` or `v3`.
    pub fn parse(s: &str) -> Option<FractionalMode> {
        match s {
            "v1" | "V1" | "1" => Some(FractionalMode::V1),
            "v2" | "V2" | "2" => Some(FractionalMode::V2),
            "v3" | "V3" | "3" => Some(FractionalMode::V3),
            _ => None,
        }
    }

    /// `"v1"`, `"v2"` or `"v3"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FractionalMode::V1 => "v1",
            FractionalMode::V2 => "v2",
            FractionalMode::V3 => "v3",
        }
    }
}

/// The largest total (and single) weight v2/v3 accept.
const MAX_WEIGHT: u64 = i32::MAX as u64;

thread_local! {
    /// Scratch buffer for the CBOR hash input, reused across evaluations on a thread.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// MurmurHash3 x86_32 with seed 0 over the concatenation `a ++ b`, without building it.
fn murmur_concat(a: &[u8], b: &[u8]) -> u32 {
    murmur3::murmur3_32(&mut Cursor::new(a).chain(Cursor::new(b)), 0).expect("reading from memory cannot fail")
}

/// MurmurHash3 x86_32 with seed 0 of one byte string.
pub(crate) fn murmur_bytes(bytes: &[u8]) -> u32 {
    murmur3::murmur3_32(&mut Cursor::new(bytes), 0).expect("reading from memory cannot fail")
}

/// The `fractional` custom operator for one [`FractionalMode`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fractional(pub(crate) FractionalMode);

impl CustomOperator for Fractional {
    fn evaluate<'a>(
        &self,
        args: &[&'a DataValue<'a>],
        ctx: &mut EvalContext<'_, 'a>,
        arena: &'a Bump,
    ) -> datalogic_rs::Result<&'a DataValue<'a>> {
        let root = ctx.root_input();
        let result = match self.0 {
            FractionalMode::V1 => v1(args, root),
            FractionalMode::V2 => v2(args, root),
            FractionalMode::V3 => v3(args, root),
        };
        Ok(result.unwrap_or_else(|| arena.null()))
    }
}

fn flag_key<'a>(root: &'a DataValue<'a>) -> &'a str {
    root.get("$flagd")
        .and_then(|p| p.get("flagKey"))
        .and_then(|k| k.as_str())
        .unwrap_or("")
}

/// The context's `targetingKey` when it is a non-empty string.
fn targeting_key<'a>(root: &'a DataValue<'a>) -> Option<&'a str> {
    root.get("targetingKey")
        .and_then(|k| k.as_str())
        .filter(|k| !k.is_empty())
}

fn v1<'a>(args: &[&'a DataValue<'a>], root: &'a DataValue<'a>) -> Option<&'a DataValue<'a>> {
    // flagd ≤ 0.14 wanted at least two arguments, whatever they were.
    if args.len() < 2 {
        return None;
    }
    let (hash, buckets) = match args[0] {
        DataValue::String(s) => (murmur_bytes(s.as_bytes()), &args[1..]),
        first => {
            let buckets = if first.is_null() { &args[1..] } else { args };
            // v1 took any string targeting key, even an empty one.
            let key = root.get("targetingKey").and_then(|k| k.as_str())?;
            (murmur_concat(flag_key(root).as_bytes(), key.as_bytes()), buckets)
        }
    };
    let mut weights = Vec::with_capacity(buckets.len());
    for bucket in buckets {
        let items = bucket.as_array().filter(|b| !b.is_empty())?;
        let variant = &items[0];
        if !variant.is_string() {
            return None;
        }
        let weight = match items.get(1) {
            Some(DataValue::Number(n)) => n.as_f64().trunc() as i64,
            _ => 1,
        };
        weights.push((variant, weight));
    }
    // flagd ≤ 0.14 summed Go `int`s, which wrap on overflow: so does this sum (found by fuzzing).
    let total = weights.iter().fold(0_i64, |sum, (_, w)| sum.wrapping_add(*w));
    let bucket = f64::from((hash as i32).unsigned_abs()) / f64::from(i32::MAX) * 100.0;
    let mut range_end = 0.0;
    for (variant, weight) in weights {
        if total != 0 {
            range_end += 100.0 * weight as f64 / total as f64;
        }
        if bucket < range_end {
            return Some(variant);
        }
    }
    // flagd ≤ 0.14 returned "" here, which is no variant: an error, as null is a default.
    None
}

fn v2<'a>(args: &[&'a DataValue<'a>], root: &'a DataValue<'a>) -> Option<&'a DataValue<'a>> {
    let first = args.first()?;
    let (hash, buckets) = match first {
        DataValue::String(s) => (murmur_bytes(s.as_bytes()), &args[1..]),
        _ => {
            let buckets = if first.is_null() { &args[1..] } else { args };
            let key = targeting_key(root)?;
            (murmur_concat(flag_key(root).as_bytes(), key.as_bytes()), buckets)
        }
    };
    pick(hash, buckets)
}

fn v3<'a>(args: &[&'a DataValue<'a>], root: &'a DataValue<'a>) -> Option<&'a DataValue<'a>> {
    let first = args.first()?;
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        buf.clear();
        let buckets = match first {
            DataValue::Null => return None,
            DataValue::Array(_) => {
                let key = targeting_key(root)?;
                buf.push(0x82);
                cbor::encode_text(flag_key(root), &mut buf);
                cbor::encode_text(key, &mut buf);
                args
            }
            value => {
                cbor::encode(value, &mut buf);
                &args[1..]
            }
        };
        pick(murmur_bytes(&buf), buckets)
    })
}

/// v2/v3 bucketing: integer weights (negative clamped to 0), `(hash * total) >> 32`.
fn pick<'a>(hash: u32, buckets: &[&'a DataValue<'a>]) -> Option<&'a DataValue<'a>> {
    if buckets.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    for bucket in buckets {
        let (_, weight) = parse_bucket(bucket)?;
        total += weight;
        if total > MAX_WEIGHT {
            return None;
        }
    }
    if total == 0 {
        return None;
    }
    let point = (u64::from(hash) * total) >> 32;
    let mut range_end = 0;
    for bucket in buckets {
        let (variant, weight) = parse_bucket(bucket)?;
        range_end += weight;
        if point < range_end {
            return Some(variant);
        }
    }
    None
}

/// `[variant, weight?]`: the variant must be a scalar (string, boolean, number or null), the weight
/// an integer (default 1, negative taken as 0, at most `i32::MAX`).
fn parse_bucket<'a>(bucket: &'a DataValue<'a>) -> Option<(&'a DataValue<'a>, u64)> {
    let items = bucket.as_array()?;
    let variant = items.first()?;
    if variant.is_array() || variant.is_object() {
        return None;
    }
    let weight = match items.get(1) {
        None => 1,
        Some(DataValue::Number(n)) => integer_weight(n)?,
        Some(_) => return None,
    };
    Some((variant, weight))
}

fn integer_weight(n: &NumberValue) -> Option<u64> {
    let w = match *n {
        NumberValue::Integer(i) => i,
        NumberValue::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => f as i64,
        NumberValue::Float(_) => return None,
    };
    let w = w.max(0) as u64;
    (w <= MAX_WEIGHT).then_some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur_matches_reference_vectors() {
        // Reference values from the C implementation (PyPI mmh3), see docs/crates.md.
        assert_eq!(murmur_bytes(b""), 0);
        assert_eq!(murmur_bytes(b"hello"), 0x248b_fa47);
        assert_eq!(murmur_bytes(b"flagd"), 0xc870_9593);
        assert_eq!(murmur_bytes(b"flag-user"), 2_410_693_464);
        assert_eq!(murmur_concat(b"flag-", b"user"), 2_410_693_464);
    }

    #[test]
    fn v1_bucket_of_the_reference_vector() {
        // murmur("flag-user") = 2410693464 → i32 -1884273832 → 87.74…% (rust-sdk-contrib test vector).
        let h = 2_410_693_464u32 as i32;
        let bucket = f64::from(h.unsigned_abs()) / f64::from(i32::MAX) * 100.0;
        assert!((bucket - 87.74).abs() < 0.01, "{bucket}");
    }

    #[test]
    fn modes_parse_and_print() {
        for mode in [FractionalMode::V1, FractionalMode::V2, FractionalMode::V3] {
            assert_eq!(FractionalMode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(FractionalMode::parse("v4"), None);
        assert_eq!(FractionalMode::default(), FractionalMode::V3);
    }
}
