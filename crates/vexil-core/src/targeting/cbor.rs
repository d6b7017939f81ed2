//! Deterministic CBOR (RFC 8949 §4.2.1) of a JSON-shaped value: the hash input of `fractional` v3.
//!
//! The rules of flagd's "non-string randomization units" ADR, checked against the testbed vectors:
//! - integers in the shortest head; floats that hold an integer in `[-2^63, 2^64)` are encoded as
//!   that integer (`1.0` ≡ `1`, `-0.0` ≡ `0`);
//! - other floats in the shortest of half, single and double precision that keeps the value;
//! - map entries sorted bytewise by their encoded key; definite lengths everywhere.
//!
//! No library is used: none of the Rust CBOR crates applies the integral-float rule, and sorting
//! by encoded key needs the key bytes anyway. The encoder is small and fully tested here.

use datalogic_rs::DataValue;
use datalogic_rs::datavalue::NumberValue;

const UINT: u8 = 0;
const NEGINT: u8 = 1;
const TEXT: u8 = 3;
const ARRAY: u8 = 4;
const MAP: u8 = 5;

/// 2^64 as an `f64`: floats below it (and at or above -2^63) that are integral encode as integers.
const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;
const MINUS_TWO_POW_63: f64 = -9_223_372_036_854_775_808.0;

/// Appends the deterministic CBOR encoding of `value` to `out`.
pub(crate) fn encode(value: &DataValue<'_>, out: &mut Vec<u8>) {
    match value {
        DataValue::Null => out.push(0xf6),
        DataValue::Bool(false) => out.push(0xf4),
        DataValue::Bool(true) => out.push(0xf5),
        DataValue::Number(NumberValue::Integer(i)) => encode_i128(i128::from(*i), out),
        DataValue::Number(NumberValue::Float(f)) => encode_f64(*f, out),
        DataValue::String(s) => encode_text(s, out),
        DataValue::Array(items) => {
            head(ARRAY, items.len() as u64, out);
            for item in *items {
                encode(item, out);
            }
        }
        DataValue::Object(entries) => encode_map(entries, out),
        #[allow(unreachable_patterns)]
        _ => out.push(0xf6),
    }
}

/// Encodes a map with entries sorted by encoded key; a repeated key keeps its last value (as a
/// JSON parser would).
fn encode_map(entries: &[(&str, DataValue<'_>)], out: &mut Vec<u8>) {
    let mut keyed: Vec<(Vec<u8>, &DataValue<'_>)> = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let mut encoded = Vec::with_capacity(key.len() + 9);
        encode_text(key, &mut encoded);
        match keyed.iter_mut().find(|(k, _)| *k == encoded) {
            Some(slot) => slot.1 = value,
            None => keyed.push((encoded, value)),
        }
    }
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    head(MAP, keyed.len() as u64, out);
    for (key, value) in keyed {
        out.extend_from_slice(&key);
        encode(value, out);
    }
}

pub(crate) fn encode_text(s: &str, out: &mut Vec<u8>) {
    head(TEXT, s.len() as u64, out);
    out.extend_from_slice(s.as_bytes());
}

fn encode_i128(i: i128, out: &mut Vec<u8>) {
    if i >= 0 {
        head(UINT, i as u64, out);
    } else {
        head(NEGINT, (-1 - i) as u64, out);
    }
}

fn encode_f64(f: f64, out: &mut Vec<u8>) {
    if f.fract() == 0.0 && (MINUS_TWO_POW_63..TWO_POW_64).contains(&f) {
        // Exact: every integral f64 in this range fits an i128.
        encode_i128(f as i128, out);
    } else if let Some(half) = f16_bits(f) {
        out.push(0xf9);
        out.extend_from_slice(&half.to_be_bytes());
    } else if f.is_nan() {
        out.extend_from_slice(&[0xf9, 0x7e, 0x00]);
    } else if (f as f32) as f64 == f {
        out.push(0xfa);
        out.extend_from_slice(&(f as f32).to_bits().to_be_bytes());
    } else {
        out.push(0xfb);
        out.extend_from_slice(&f.to_bits().to_be_bytes());
    }
}

/// The IEEE 754 half-precision bits of `f` when `f` is exactly representable in half precision.
fn f16_bits(f: f64) -> Option<u16> {
    let bits = f.to_bits();
    let sign = ((bits >> 63) as u16) << 15;
    let exp = ((bits >> 52) & 0x7ff) as i32;
    let mantissa = bits & ((1u64 << 52) - 1);
    if exp == 0x7ff {
        // Infinities keep their sign; NaN is handled by the caller.
        return (mantissa == 0).then_some(sign | 0x7c00);
    }
    if exp == 0 {
        // Zero (f64 subnormals are far below half precision's range).
        return (mantissa == 0).then_some(sign);
    }
    let e = exp - 1023;
    if (-14..=15).contains(&e) {
        // Normal half: 10 mantissa bits, the low 42 must be zero.
        if mantissa & ((1u64 << 42) - 1) != 0 {
            return None;
        }
        return Some(sign | (((e + 15) as u16) << 10) | (mantissa >> 42) as u16);
    }
    if (-24..-14).contains(&e) {
        // Subnormal half: value = m * 2^-24 with m < 1024.
        let full = (1u64 << 52) | mantissa;
        let shift = (52 - (e + 24)) as u32;
        if full & ((1u64 << shift) - 1) != 0 {
            return None;
        }
        return Some(sign | (full >> shift) as u16);
    }
    None
}

/// Writes a CBOR head (major type and argument) in its shortest form.
fn head(major: u8, n: u64, out: &mut Vec<u8>) {
    let (bytes, len) = head_bytes(major, n);
    out.extend_from_slice(&bytes[..len]);
}

/// The head of a text string of `len` bytes (what [`encode_text`] writes before the bytes).
pub(crate) fn text_head(len: usize) -> ([u8; 9], usize) {
    head_bytes(TEXT, len as u64)
}

/// A data item's head: the major type and its argument, in the shortest form (1 to 9 bytes).
fn head_bytes(major: u8, n: u64) -> ([u8; 9], usize) {
    let m = major << 5;
    let mut out = [0u8; 9];
    let len = if n < 24 {
        out[0] = m | n as u8;
        1
    } else if n <= u64::from(u8::MAX) {
        out[..2].copy_from_slice(&[m | 24, n as u8]);
        2
    } else if n <= u64::from(u16::MAX) {
        out[0] = m | 25;
        out[1..3].copy_from_slice(&(n as u16).to_be_bytes());
        3
    } else if n <= u64::from(u32::MAX) {
        out[0] = m | 26;
        out[1..5].copy_from_slice(&(n as u32).to_be_bytes());
        5
    } else {
        out[0] = m | 27;
        out[1..9].copy_from_slice(&n.to_be_bytes());
        9
    };
    (out, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor(v: DataValue<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&v, &mut out);
        out
    }

    fn num(f: f64) -> DataValue<'static> {
        DataValue::Number(NumberValue::Float(f))
    }

    // Examples from RFC 8949 Appendix A.
    #[test]
    fn integers_use_the_shortest_head() {
        assert_eq!(cbor(DataValue::Number(NumberValue::Integer(0))), [0x00]);
        assert_eq!(cbor(DataValue::Number(NumberValue::Integer(23))), [0x17]);
        assert_eq!(cbor(DataValue::Number(NumberValue::Integer(24))), [0x18, 0x18]);
        assert_eq!(cbor(DataValue::Number(NumberValue::Integer(1000))), [0x19, 0x03, 0xe8]);
        assert_eq!(cbor(DataValue::Number(NumberValue::Integer(-1))), [0x20]);
        assert_eq!(cbor(DataValue::Number(NumberValue::Integer(-1000))), [0x39, 0x03, 0xe7]);
        assert_eq!(
            cbor(DataValue::Number(NumberValue::Integer(1_000_000_000_000))),
            [0x1b, 0x00, 0x00, 0x00, 0xe8, 0xd4, 0xa5, 0x10, 0x00]
        );
    }

    #[test]
    fn integral_floats_are_integers() {
        assert_eq!(cbor(num(1.0)), [0x01]);
        assert_eq!(cbor(num(-0.0)), [0x00]);
        assert_eq!(cbor(num(-2.0)), [0x21]);
        // 2^64 - 2048, the largest double below 2^64, is still an unsigned integer.
        assert_eq!(cbor(num(18_446_744_073_709_549_568.0))[0], 0x1b);
        // 2^64 is not: it becomes a float.
        assert_eq!(cbor(num(TWO_POW_64))[0], 0xfa);
    }

    #[test]
    fn floats_use_the_shortest_exact_precision() {
        assert_eq!(cbor(num(1.5)), [0xf9, 0x3e, 0x00]);
        assert_eq!(cbor(num(65504.5)), [0xfa, 0x47, 0x7f, 0xe0, 0x80]);
        assert_eq!(cbor(num(5.960464477539063e-8)), [0xf9, 0x00, 0x01]);
        assert_eq!(cbor(num(0.00006103515625)), [0xf9, 0x04, 0x00]);
        assert_eq!(cbor(num(100000.5)), [0xfa, 0x47, 0xc3, 0x50, 0x40]);
        assert_eq!(cbor(num(1.1)), [0xfb, 0x3f, 0xf1, 0x99, 0x99, 0x99, 0x99, 0x99, 0x9a]);
        assert_eq!(cbor(num(f64::INFINITY)), [0xf9, 0x7c, 0x00]);
        assert_eq!(cbor(num(f64::NEG_INFINITY)), [0xf9, 0xfc, 0x00]);
    }

    #[test]
    fn map_keys_sort_by_encoded_bytes() {
        let entries = [
            ("aa", DataValue::Number(NumberValue::Integer(2))),
            ("z", DataValue::Number(NumberValue::Integer(1))),
        ];
        // "z" (0x61 0x7a) sorts before "aa" (0x62 0x61 0x61): shorter keys first.
        assert_eq!(
            cbor(DataValue::Object(&entries)),
            [0xa2, 0x61, b'z', 0x01, 0x62, b'a', b'a', 0x02]
        );
    }

    #[test]
    fn repeated_keys_keep_the_last_value() {
        let entries = [("c", DataValue::Null), ("c", DataValue::Bool(true))];
        assert_eq!(cbor(DataValue::Object(&entries)), [0xa1, 0x61, b'c', 0xf5]);
    }

    #[test]
    fn text_and_arrays() {
        assert_eq!(cbor(DataValue::String("IETF")), [0x64, 0x49, 0x45, 0x54, 0x46]);
        let items = [DataValue::Number(NumberValue::Integer(1)), DataValue::Null];
        assert_eq!(cbor(DataValue::Array(&items)), [0x82, 0x01, 0xf6]);
    }
}
