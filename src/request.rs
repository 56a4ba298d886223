//! Reading parts of incoming HTTP requests: the `Host` header, header
//! tokens, query parameters, cookies, percent-encoding.

use hyper::Version;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

/// What is wrong with a request's `Host` header (RFC 9112 §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// An HTTP/1.1 request without one.
    #[error("missing Host header")]
    Missing,
    /// More than one field line.
    #[error("more than one Host header")]
    Duplicate,
    /// A value that is not a host and an optional port.
    #[error("invalid Host header")]
    Invalid,
}

/// The request's `Host`, checked as RFC 9112 §3.2 asks of every server: an
/// HTTP/1.1 request carries exactly one, whose value is a host and an
/// optional port. A request that breaks this is answered 400, as nginx
/// does, and never passed on: the gateway, the upstream and anything in
/// between could each take a different one for the target. HTTP/1.0 may
/// go without (`None`).
pub fn host(version: Version, headers: &HeaderMap) -> Result<Option<&HeaderValue>, HostError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) if is_host_and_port(host.as_bytes()) => Ok(Some(host)),
        (Some(_), None) => Err(HostError::Invalid),
        (Some(_), Some(_)) => Err(HostError::Duplicate),
        (None, _) if version <= Version::HTTP_10 => Ok(None),
        (None, _) => Err(HostError::Missing),
    }
}

/// `uri-host [ ":" port ]` (RFC 3986 §3.2.2, §3.2.3): a bracketed IP
/// literal, or a non-empty registered name or IPv4 address, and an
/// optional port of at most 65535. No user information, which `Host`
/// never carries.
pub fn is_host_and_port(value: &[u8]) -> bool {
    let (host, port) = match value.iter().rposition(|&b| b == b':') {
        // A colon inside brackets belongs to the IP literal.
        Some(colon) if !value[colon..].contains(&b']') => {
            (&value[..colon], Some(&value[colon + 1..]))
        }
        _ => (value, None),
    };
    let host_ok = match host {
        [b'[', literal @ .., b']'] => {
            !literal.is_empty()
                && literal
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        _ => !host.is_empty() && is_reg_name(host),
    };
    host_ok && port.is_none_or(is_port)
}

/// The bytes a registered name holds as they are (RFC 3986 unreserved
/// characters and sub-delimiters), by value: one load per byte, as every
/// proxied request's `Host` is checked.
const REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < table.len() {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || matches!(
                b,
                b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
            );
        i += 1;
    }
    table
};

/// Unreserved characters, sub-delimiters and percent-encoded octets.
fn is_reg_name(name: &[u8]) -> bool {
    if name.iter().all(|&b| REG_NAME[usize::from(b)]) {
        return true;
    }
    let mut i = 0;
    while i < name.len() {
        match name[i] {
            b'%' if name.len() > i + 2
                && name[i + 1].is_ascii_hexdigit()
                && name[i + 2].is_ascii_hexdigit() =>
            {
                i += 3;
                continue;
            }
            b if REG_NAME[usize::from(b)] => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

/// Digits, at most 65535; empty is allowed, as RFC 3986 allows it.
fn is_port(port: &[u8]) -> bool {
    port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
        && port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= u32::from(u16::MAX)
}

/// Whether a comma-separated header contains `token` (case-insensitive).
pub fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A query parameter's value, percent-decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
        .filter(|v| !v.is_empty())
}

/// A cookie's value from every `Cookie` header.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// Decodes `%XX` escapes and `+` (a space in a query string); invalid
/// escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tokens_in_query_and_cookie() {
        assert_eq!(
            query_param("a=1&token=abc%2Edef&b=2", "token").as_deref(),
            Some("abc.def")
        );
        assert_eq!(query_param("a=1", "token"), None);
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "x=1; session=tok.en; y=2".parse().expect("header"),
        );
        assert_eq!(cookie(&h, "session").as_deref(), Some("tok.en"));
        assert_eq!(cookie(&h, "missing"), None);
    }

    #[test]
    fn host_must_be_one_host_and_port() {
        let with = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for value in values {
                h.append(header::HOST, HeaderValue::from_static(value));
            }
            h
        };
        for good in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "my_host.internal",
            "xn--caf-dma.example",
            "ex%41mple.com",
            "example.com:",
        ] {
            assert!(
                matches!(host(Version::HTTP_11, &with(&[good])), Ok(Some(_))),
                "{good}"
            );
        }
        for bad in [
            "",
            "user@example.com",
            "example.com/path",
            "a b",
            "example.com:http",
            "example.com:65536",
            "[::1",
            "[]",
            "[::1]x",
            "ex%4",
            ":80",
        ] {
            assert_eq!(
                host(Version::HTTP_11, &with(&[bad])),
                Err(HostError::Invalid),
                "{bad}"
            );
        }
        assert_eq!(
            host(Version::HTTP_11, &with(&["a.test", "b.test"])),
            Err(HostError::Duplicate)
        );
        assert_eq!(
            host(Version::HTTP_11, &HeaderMap::new()),
            Err(HostError::Missing)
        );
        assert_eq!(host(Version::HTTP_10, &HeaderMap::new()), Ok(None));
        assert_eq!(
            host(Version::HTTP_10, &with(&["a.test", "a.test"])),
            Err(HostError::Duplicate)
        );
    }

    #[test]
    fn percent_decoding_tolerates_garbage() {
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
        assert_eq!(percent_decode("%41+b"), "A b");
        assert_eq!(percent_decode("%41"), "A");
    }
}
