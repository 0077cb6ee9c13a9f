//! The edge in: turns Envoy's `CheckRequest` into a [`CheckInput`], the plain request the
//! pipeline works on (method, normalised path, query, host, lower-case headers, body).
//!
//! Normalising here, once, is what keeps rules honest: `/public/../admin`, `//admin` and
//! `/%61dmin` all reach the rules as `/admin`.

use std::collections::HashMap;

use bytes::Bytes;

use crate::proto::pb::envoy::service::auth::v3 as auth;

/// Why a request could not be read. Each is answered with a 400 deny, never a panic.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("check request has no HTTP attributes (is this an HTTP ext_authz filter?)")]
    NoHttpAttributes,
    #[error("malformed path {0:?}: {1}")]
    BadPath(String, &'static str),
    #[error("header {0} is not valid UTF-8")]
    HeaderNotUtf8(String),
    #[error("header {0} appears more than once")]
    DuplicateHeader(String),
}

/// One header value as received: Envoy's `raw_value` may hold any bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderValue(Bytes);

impl HeaderValue {
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

/// Request headers, names lower-cased, every occurrence kept in order.
#[derive(Debug, Clone, Default)]
pub struct Headers {
    map: HashMap<String, Vec<HeaderValue>>,
}

impl Headers {
    pub fn insert(&mut self, name: &str, value: impl Into<Bytes>) {
        self.map
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push(HeaderValue(value.into()));
    }

    /// The header's only value, as text. Two values, or bytes that are not UTF-8, are errors:
    /// credentials must never be picked from an ambiguous header.
    pub fn single(&self, name: &str) -> Result<Option<&str>, RequestError> {
        match self.map.get(name).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([one]) => one
                .as_str()
                .map(Some)
                .ok_or_else(|| RequestError::HeaderNotUtf8(name.to_string())),
            Some(_) => Err(RequestError::DuplicateHeader(name.to_string())),
        }
    }

    /// The first value that is text, for headers where leniency is harmless (Origin, ids).
    pub fn first(&self, name: &str) -> Option<&str> {
        self.map.get(name)?.iter().find_map(HeaderValue::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }
}

/// The HTTP request as the pipeline sees it.
#[derive(Debug, Clone, Default)]
pub struct CheckInput {
    pub request_id: String,
    /// Upper-case method.
    pub method: String,
    /// Normalised path without query or fragment.
    pub path: String,
    /// Decoded query parameters in order.
    pub query: Vec<(String, String)>,
    /// The query as received (after `?`, before `#`), for rules that must read a parameter
    /// strictly (one occurrence, valid percent-encoding): see `authz::rules`.
    pub query_raw: String,
    /// Lower-case host without port.
    pub host: String,
    pub scheme: String,
    pub headers: Headers,
    pub body: Option<Bytes>,
    /// Peer address, for the log.
    pub peer: Option<String>,
    pub context_extensions: HashMap<String, String>,
}

impl CheckInput {
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A request with just a method and a path (for tests, doctor and benchmarks).
    pub fn http(method: &str, path_and_query: &str) -> Result<Self, RequestError> {
        let (path, query) = split_path(path_and_query)?;
        Ok(Self {
            method: method.to_ascii_uppercase(),
            path,
            query,
            query_raw: query_part(path_and_query).to_string(),
            host: "localhost".into(),
            scheme: "http".into(),
            ..Self::default()
        })
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .insert(name, Bytes::copy_from_slice(value.as_bytes()));
        self
    }

    pub fn with_body(mut self, body: &[u8]) -> Self {
        self.body = Some(Bytes::copy_from_slice(body));
        self
    }
}

/// Converts Envoy's check request. A request id is taken from Envoy (`x-request-id`) so the
/// decision line joins Envoy's access log.
pub fn from_proto(req: auth::CheckRequest) -> Result<CheckInput, RequestError> {
    let attrs = req.attributes.unwrap_or_default();
    let peer = attrs
        .source
        .as_ref()
        .and_then(|p| p.address.as_ref())
        .and_then(|a| a.address.as_ref())
        .map(|a| {
            use crate::proto::pb::envoy::config::core::v3::address::Address;
            match a {
                Address::SocketAddress(s) => s.address.to_string(),
                Address::Pipe(p) => p.path.clone(),
                #[allow(unreachable_patterns)]
                _ => String::new(),
            }
        })
        .filter(|s| !s.is_empty());
    let http = attrs
        .request
        .and_then(|r| r.http)
        .ok_or(RequestError::NoHttpAttributes)?;

    let mut headers = Headers::default();
    match http.header_map {
        // Envoy sends `header_map` (every occurrence, raw bytes) when `encode_raw_headers` is on.
        Some(map) if !map.headers.is_empty() => {
            for h in map.headers {
                let value = if h.raw_value.is_empty() {
                    Bytes::from(h.value.into_bytes())
                } else {
                    Bytes::from(h.raw_value)
                };
                headers.insert(&h.key, value);
            }
        }
        _ => {
            for (k, v) in http.headers {
                headers.insert(&k, Bytes::from(v.into_bytes()));
            }
        }
    }

    let (path, mut query) = split_path(&http.path)?;
    let mut query_raw = query_part(&http.path).to_string();
    if query.is_empty() && !http.query.is_empty() {
        query = parse_query(&http.query);
        query_raw = http.query.clone();
    }
    let host = if http.host.is_empty() {
        headers.first(":authority").unwrap_or_default().to_string()
    } else {
        http.host
    };
    let request_id = if http.id.is_empty() {
        headers
            .first("x-request-id")
            .map(str::to_string)
            .unwrap_or_else(new_request_id)
    } else {
        http.id
    };
    let body = if !http.raw_body.is_empty() {
        Some(Bytes::from(http.raw_body))
    } else if !http.body.is_empty() {
        Some(Bytes::from(http.body.into_bytes()))
    } else {
        None
    };
    let method = if http.method.is_empty() {
        headers
            .first(":method")
            .unwrap_or("GET")
            .to_ascii_uppercase()
    } else {
        http.method.to_ascii_uppercase()
    };

    Ok(CheckInput {
        request_id,
        method,
        path,
        query,
        query_raw,
        host: strip_port(&host).to_ascii_lowercase(),
        scheme: http.scheme,
        headers,
        body,
        peer,
        context_extensions: attrs.context_extensions.into_iter().collect(),
    })
}

pub fn new_request_id() -> String {
    let bytes: [u8; 12] = rand::random();
    hex::encode(bytes)
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [::1]:8080
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

/// Splits `path?query#fragment`, normalises the path and decodes the query.
pub fn split_path(raw: &str) -> Result<(String, Vec<(String, String)>), RequestError> {
    let raw_no_fragment = raw.split('#').next().unwrap_or_default();
    let (path, query) = raw_no_fragment
        .split_once('?')
        .unwrap_or((raw_no_fragment, ""));
    Ok((normalize_path(path)?, parse_query(query)))
}

/// The raw query of `path?query#fragment` (empty without one).
pub fn query_part(raw: &str) -> &str {
    let no_fragment = raw.split('#').next().unwrap_or_default();
    no_fragment.split_once('?').map_or("", |(_, q)| q)
}

/// Percent-decodes (keeping `%2F` encoded so it cannot create segments), removes dot
/// segments and merges slashes, as RFC 3986 §5.2.4 does.
pub fn normalize_path(raw: &str) -> Result<String, RequestError> {
    let bad = |why| RequestError::BadPath(raw.chars().take(200).collect(), why);
    if raw.is_empty() {
        return Ok("/".into());
    }
    if !raw.starts_with('/') {
        return Err(bad("must start with /"));
    }
    if raw.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(bad("contains control characters or spaces"));
    }
    let decoded = percent_decode(raw, true).ok_or_else(|| bad("bad percent-encoding"))?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad("not UTF-8 after decoding"))?;
    if decoded.contains('\\') {
        return Err(bad("contains a backslash"));
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if path.is_empty() || (decoded.ends_with('/') && !out.is_empty()) {
        path.push('/');
    }
    Ok(path)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `keep_slash`: leave `%2F` as is (an encoded slash is data, not a separator).
fn percent_decode(s: &str, keep_slash: bool) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = hex_val(*bytes.get(i + 1)?)?;
            let lo = hex_val(*bytes.get(i + 2)?)?;
            let v = hi << 4 | lo;
            if keep_slash && (v == b'/' || v == b'\\') {
                out.extend_from_slice(&bytes[i..i + 3]);
            } else {
                out.push(v);
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        percent_decode(&s, false)
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or(s)
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise() {
        for (raw, want) in [
            ("/", "/"),
            ("", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//admin", "/admin"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/a/./b", "/a/b"),
            ("/../../etc", "/etc"),
            ("/a%2Fb", "/a%2Fb"),
        ] {
            assert_eq!(normalize_path(raw).unwrap(), want, "{raw}");
        }
        for bad in [
            "admin",
            "/a%zz",
            "/a%",
            "/a b",
            "/a%00b\\",
            "/%ff%fe",
            "/a\\..\\b",
        ] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn query_and_fragment() {
        let (p, q) = split_path("/search?q=a%20b&x=1&flag#frag").unwrap();
        assert_eq!(p, "/search");
        assert_eq!(
            q,
            vec![
                ("q".into(), "a b".into()),
                ("x".into(), "1".into()),
                ("flag".into(), String::new())
            ]
        );
    }

    #[test]
    fn headers_single_rejects_duplicates_and_bytes() {
        let mut h = Headers::default();
        h.insert("Authorization", "Bearer a");
        assert_eq!(h.single("authorization").unwrap(), Some("Bearer a"));
        h.insert("authorization", "Bearer b");
        assert_eq!(
            h.single("authorization"),
            Err(RequestError::DuplicateHeader("authorization".into()))
        );
        h.insert("x-api-key", Bytes::from_static(&[0xff, 0xfe]));
        assert_eq!(
            h.single("x-api-key"),
            Err(RequestError::HeaderNotUtf8("x-api-key".into()))
        );
    }

    #[test]
    fn host_port_stripped() {
        assert_eq!(strip_port("api.example.com:8443"), "api.example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("plain"), "plain");
    }
}
