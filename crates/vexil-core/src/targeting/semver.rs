//! flagd's `sem_ver` operator: `{"sem_ver": [version, op, target]}`.
//!
//! flagd (Go) formats both operands with `%v`, makes sure they start with a lowercase `v`, and
//! checks them with `golang.org/x/mod/semver`: `v1` and `v1.2` are shorthand for `v1.0.0` and
//! `v1.2.0` (without prerelease or build), leading zeros are invalid, build metadata is ignored in
//! comparisons. Operators: `=`, `!=`, `<`, `<=`, `>`, `>=` (precedence), `~` (same major and minor),
//! `^` (same major). Anything malformed yields `null`.

use std::borrow::Cow;
use std::cmp::Ordering;

use datalogic_rs::bumpalo::Bump;
use datalogic_rs::datavalue::NumberValue;
use datalogic_rs::operator::EvalContext;
use datalogic_rs::{ArenaExt, CustomOperator, DataValue};
use semver::Version;

/// The `sem_ver` custom operator.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SemVer;

impl CustomOperator for SemVer {
    fn evaluate<'a>(
        &self,
        args: &[&'a DataValue<'a>],
        _ctx: &mut EvalContext<'_, 'a>,
        arena: &'a Bump,
    ) -> datalogic_rs::Result<&'a DataValue<'a>> {
        Ok(match compare(args) {
            Some(b) => arena.bool(b),
            None => arena.null(),
        })
    }
}

fn compare(args: &[&DataValue<'_>]) -> Option<bool> {
    let [version, op, target] = args else {
        return None;
    };
    let op = op.as_str()?;
    let version = parse(&go_format(version)?)?;
    let target = parse(&go_format(target)?)?;
    let ord = version.cmp_precedence(&target);
    Some(match op {
        "=" => ord == Ordering::Equal,
        "!=" => ord != Ordering::Equal,
        "<" => ord == Ordering::Less,
        "<=" => ord != Ordering::Greater,
        ">" => ord == Ordering::Greater,
        ">=" => ord != Ordering::Less,
        "~" => version.major == target.major && version.minor == target.minor,
        "^" => version.major == target.major,
        _ => return None,
    })
}

/// Go's `fmt.Sprintf("%v", x)` of a JSON value, for the values that can be valid versions: strings
/// as they are, numbers as float64 (`2` → `"2"`, `1.2` → `"1.2"`; Go switches to exponent form from
/// 1e6 up and below 1e-4, which is never a valid version).
fn go_format<'v>(value: &DataValue<'v>) -> Option<Cow<'v, str>> {
    match value {
        DataValue::String(s) => Some(Cow::Borrowed(s)),
        DataValue::Number(n) => {
            let f = match *n {
                NumberValue::Integer(i) => i as f64,
                NumberValue::Float(f) => f,
            };
            let magnitude = f.abs();
            (magnitude < 1e6 && (magnitude >= 1e-4 || f == 0.0)).then(|| Cow::Owned(format!("{f}")))
        }
        _ => None,
    }
}

/// Parses a version the way `golang.org/x/mod/semver` does after flagd's `v` normalisation.
fn parse(raw: &str) -> Option<Version> {
    let body = raw.strip_prefix(['v', 'V']).unwrap_or(raw);
    // x/mod/semver shorthand: `1` and `1.2` (digits and dots only) mean `1.0.0` and `1.2.0`.
    let is_shorthand = !body.is_empty()
        && body.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && body.split('.').count() < 3
        && body.split('.').all(|part| !part.is_empty());
    let padded;
    let text = if is_shorthand {
        padded = match body.split('.').count() {
            1 => format!("{body}.0.0"),
            _ => format!("{body}.0"),
        };
        &padded
    } else {
        body
    };
    Version::parse(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> DataValue<'_> {
        DataValue::String(v)
    }

    fn check(version: &str, op: &str, target: &str) -> Option<bool> {
        compare(&[&s(version), &s(op), &s(target)])
    }

    #[test]
    fn comparisons_follow_semver_precedence() {
        assert_eq!(check("2.0.0", "=", "2.0.0"), Some(true));
        assert_eq!(check("2.0.0-alpha", "<", "2.0.0"), Some(true));
        assert_eq!(check("1.0.0-alpha.1", "<", "1.0.0-alpha.beta"), Some(true));
        assert_eq!(check("1.0.0+build.1", "=", "1.0.0+build.2"), Some(true));
        assert_eq!(check("1.10.0", ">", "1.9.0"), Some(true));
        assert_eq!(check("1.0.0", "!=", "1.0.1"), Some(true));
        assert_eq!(check("1.0.0", ">=", "1.0.0"), Some(true));
        assert_eq!(check("1.0.0", "<=", "0.9.9"), Some(false));
    }

    #[test]
    fn tilde_and_caret_compare_major_and_minor() {
        assert_eq!(check("3.0.1", "~", "3.0.0"), Some(true));
        assert_eq!(check("3.1.0", "~", "3.0.0"), Some(false));
        assert_eq!(check("3.1.0", "^", "3.0.0"), Some(true));
        assert_eq!(check("0.2.0", "^", "0.1.0"), Some(true), "no npm special case for 0.x");
        assert_eq!(check("4.0.0", "^", "3.0.0"), Some(false));
    }

    #[test]
    fn prefixes_and_shorthand_are_normalised() {
        assert_eq!(check("v1.0.0", "=", "1.0.0"), Some(true));
        assert_eq!(check("V1.0.0", "=", "v1.0.0"), Some(true));
        assert_eq!(check("1", "=", "1.0.0"), Some(true));
        assert_eq!(check("1.2", "=", "v1.2.0"), Some(true));
        assert_eq!(check("v2.3.1+build.5", ">=", "2.3.0"), Some(true));
    }

    #[test]
    fn malformed_input_is_null() {
        assert_eq!(check("2.0.0.0", "=", "2.0.0"), None);
        assert_eq!(check("not-a-version", "=", "1.0.0"), None);
        assert_eq!(check("1.0.0", "===", "1.0.0"), None);
        assert_eq!(check("01.0.0", "=", "1.0.0"), None);
        assert_eq!(check("1.0-beta", "=", "1.0.0"), None, "no shorthand with a prerelease");
        assert_eq!(check("vv1.0.0", "=", "1.0.0"), None);
        assert_eq!(check("", "=", "1.0.0"), None);
        assert_eq!(compare(&[&s("1.0.0"), &s("=")]), None);
        assert_eq!(compare(&[&DataValue::Null, &s("="), &s("1.0.0")]), None);
    }

    #[test]
    fn numbers_are_formatted_like_go() {
        let one_one = DataValue::Number(NumberValue::Float(1.1));
        assert_eq!(compare(&[&s("1.2.0"), &s(">"), &one_one]), Some(true));
        let two = DataValue::Number(NumberValue::Integer(2));
        assert_eq!(compare(&[&two, &s("="), &s("2.0.0")]), Some(true));
        let million = DataValue::Number(NumberValue::Integer(1_000_000));
        assert_eq!(compare(&[&million, &s(">"), &s("1.0.0")]), None, "Go prints 1e+06");
    }
}
