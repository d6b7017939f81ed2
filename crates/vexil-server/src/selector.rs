//! The one selector parser of every protocol: flagd's `Flagd-Selector` header, or a body field
//! where the protocol still has one (flagd.sync.v1's deprecated `selector`).

use http::{HeaderMap, HeaderName};
use vexil_core::Selector;

/// The request's selector: the `Flagd-Selector` header when present, else `fallback` (empty: every
/// flag). The error says what is wrong, for the protocol to report as an invalid argument.
pub fn from_headers(headers: &HeaderMap, fallback: &str) -> Result<Selector, String> {
    // A static name: looked up without parsing the name on every request.
    static FLAGD_SELECTOR: HeaderName = HeaderName::from_static("flagd-selector");
    let text = match headers.get(&FLAGD_SELECTOR) {
        Some(v) => v
            .to_str()
            .map_err(|_| "the Flagd-Selector header is not valid text".to_owned())?,
        None => fallback,
    };
    Selector::parse(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_wins_over_the_fallback() {
        let mut headers = HeaderMap::new();
        assert_eq!(from_headers(&headers, ""), Ok(Selector::All));
        assert_eq!(
            from_headers(&headers, "source=a.json"),
            Ok(Selector::Source("a.json".into()))
        );
        headers.insert("flagd-selector", "flagSetId=x".parse().unwrap());
        assert_eq!(
            from_headers(&headers, "source=a.json"),
            Ok(Selector::FlagSet(Some("x".into())))
        );
        headers.insert("flagd-selector", http::HeaderValue::from_bytes(b"\xff").unwrap());
        assert!(from_headers(&headers, "").unwrap_err().contains("not valid text"));
        headers.insert("flagd-selector", "nonsense=1".parse().unwrap());
        assert!(!from_headers(&headers, "").unwrap_err().is_empty());
    }
}
