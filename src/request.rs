//! The edge in: turns Envoy's `CheckRequest` into a [`CheckInput`], the plain request the
//! pipeline works on (method, path, query, canonical host, lower-case headers, body).
//!
//! Invariant: the pipeline decides on the path and the host the app receives, or the request
//! is refused here with a 400 naming the problem. Nothing is resolved into a form the app never
//! sees: `/public/../admin` is refused, not turned into `/admin`, because the app behind may
//! resolve it differently (or not at all). [`read_path`] lists what is refused and the one
//! decoding allowed; [`read_host`] the host's canonical form.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::Bytes;

pub use crate::config::PathPolicy;
use crate::failure::FailureKind;
use crate::proto::pb::envoy::service::auth::v3 as auth;

/// Why a request could not be read. Each is answered with a 400 deny, never a panic; except
/// `NoHttpAttributes` (not an HTTP check at all), which the gRPC adapter answers with
/// `INVALID_ARGUMENT` instead of a deny.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("check request has no HTTP attributes (is this an HTTP ext_authz filter?)")]
    NoHttpAttributes,
    #[error("path {0:?} refused: {1}")]
    BadPath(String, PathProblem),
    #[error("host {0:?} refused: {1}")]
    BadHost(String, HostProblem),
    #[error("the path attribute {0:?} and the :path header {1:?} differ: the app may read either")]
    PathsDisagree(String, String),
    #[error(
        "the host {0:?} and the {1} header {2:?} name different hosts: the app may read either"
    )]
    HostsDisagree(String, &'static str, String),
    #[error("header {0} is not valid UTF-8")]
    HeaderNotUtf8(String),
    #[error("header {0} appears more than once")]
    DuplicateHeader(String),
}

impl RequestError {
    /// Every request that cannot be read is a bad request (400).
    pub fn kind(&self) -> FailureKind {
        FailureKind::BadRequest
    }
}

/// A path an app could read differently from the sidecar. Strict policy refuses all of them;
/// `opaque_encoded_slashes` accepts `%2F` and `%5C` as data.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum PathProblem {
    #[error("empty path")]
    Empty,
    #[error("not an origin-form path starting with / (`*` and absolute URLs are not routed)")]
    NotOriginForm,
    #[error("fragment (#) in the request target: never sent by a client, read differently by apps")]
    Fragment,
    #[error("bad percent-encoding (want % and two hex digits; %uXXXX is not HTTP)")]
    BadEscape,
    #[error("not UTF-8 after percent-decoding (invalid or overlong bytes such as %c0%ae)")]
    NotUtf8,
    #[error("control character or space, raw or encoded (%00, %0A, ...)")]
    Control,
    #[error(
        "dot segment (. or .., raw or encoded): apps and proxies resolve it differently; send the resolved path"
    )]
    DotSegment,
    #[error("empty segment (//): some apps merge slashes, others do not")]
    EmptySegment,
    #[error("backslash: some servers read \\ as /")]
    Backslash,
    #[error(
        "encoded slash (%2F): some apps decode it into a separator (request.path_policy opaque_encoded_slashes keeps it as data)"
    )]
    EncodedSlash,
    #[error(
        "encoded backslash (%5C): some apps decode it into a separator (request.path_policy opaque_encoded_slashes keeps it as data)"
    )]
    EncodedBackslash,
    #[error(
        "; path parameter (raw or %3B): servlet containers cut `;...` off a segment, so /admin;x/y is /admin/y and /a/..;/b is /b there"
    )]
    PathParameter,
    #[error("encoded ? or # (%3F, %23): an app that decodes before splitting reads another path")]
    EncodedDelimiter,
    #[error(
        "double percent-encoding (%25 followed by two hex digits): an app that decodes twice reads another path"
    )]
    DoubleEncoding,
}

/// A `Host` / `:authority` that has no single canonical form.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum HostProblem {
    #[error("empty host name")]
    Empty,
    #[error("userinfo (user@) before the host: parsers disagree on which side of @ is the host")]
    Userinfo,
    #[error("malformed port (want 1 to 5 digits, at most 65535)")]
    BadPort,
    #[error("more than one : outside brackets (an IPv6 address goes in [ ])")]
    TwoColons,
    #[error("malformed [IPv6] literal")]
    BadBrackets,
    #[error("empty label (.., a leading dot or more than one trailing dot)")]
    EmptyLabel,
    #[error(
        "character outside letters, digits, - _ . (an internationalised name goes as punycode xn--)"
    )]
    BadChar,
}

/// One header value as received: Envoy's `raw_value` may hold any bytes. The decoded
/// message's own buffer, moved: a `Bytes` made from it would cost an allocation for every
/// value shorter than 8 bytes (`GET`, `http`, `*/*`), whose buffer has spare capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderValue(Vec<u8>);

impl HeaderValue {
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

/// Request headers, names lower-cased, every occurrence kept in order.
///
/// A list searched from the front rather than a map: a request has a few dozen headers (Envoy
/// refuses more than 100 by default), a check asks about a handful, and comparing a name costs
/// less than hashing it (SipHash of the names, and a `Vec` per name, were ~6% of a check's
/// instructions).
#[derive(Debug, Clone, Default)]
pub struct Headers {
    list: Vec<(String, HeaderValue)>,
}

impl Headers {
    pub fn insert(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        self.push(name.to_string(), value.into());
    }

    /// As [`insert`](Self::insert), taking the name: lower-cased in place, not copied.
    fn push(&mut self, mut name: String, value: Vec<u8>) {
        name.make_ascii_lowercase();
        self.list.push((name, HeaderValue(value)));
    }

    fn values<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a HeaderValue> {
        self.list
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// The header's only value, as text. Two values, or bytes that are not UTF-8, are errors:
    /// credentials must never be picked from an ambiguous header.
    pub fn single(&self, name: &str) -> Result<Option<&str>, RequestError> {
        let mut values = self.values(name);
        match (values.next(), values.next()) {
            (None, _) => Ok(None),
            (Some(one), None) => one
                .as_str()
                .map(Some)
                .ok_or_else(|| RequestError::HeaderNotUtf8(name.to_string())),
            (Some(_), Some(_)) => Err(RequestError::DuplicateHeader(name.to_string())),
        }
    }

    /// The first value that is text, for headers where leniency is harmless (Origin, ids).
    pub fn first(&self, name: &str) -> Option<&str> {
        self.values(name).find_map(HeaderValue::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.values(name).next().is_some()
    }

    /// Each name once, in the order first received.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.list
            .iter()
            .enumerate()
            .filter(|(i, (n, _))| !self.list[..*i].iter().any(|(m, _)| m == n))
            .map(|(_, (n, _))| n.as_str())
    }
}

/// The HTTP request as the pipeline sees it.
#[derive(Debug, Clone, Default)]
pub struct CheckInput {
    pub request_id: String,
    /// Upper-case method.
    pub method: String,
    /// The path the app receives, without query, percent-decoded inside its segments (see
    /// [`read_path`]; under `opaque_encoded_slashes` a `%2F` / `%5C` stays encoded).
    pub path: String,
    /// Decoded query parameters in order.
    pub query: Vec<(String, String)>,
    /// The query as received (after `?`), for rules that must read a parameter strictly (one
    /// occurrence, valid percent-encoding): see `authz::rules`.
    pub query_raw: String,
    /// Canonical host (see [`read_host`]): lower case, no port, no trailing dot.
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

    /// A request with just a method and a path, read under the strict path policy (for tests
    /// and doctor).
    pub fn http(method: &str, path_and_query: &str) -> Result<Self, RequestError> {
        Self::http_with(method, path_and_query, PathPolicy::Strict)
    }

    /// As [`CheckInput::http`], under `policy`.
    pub fn http_with(
        method: &str,
        path_and_query: &str,
        policy: PathPolicy,
    ) -> Result<Self, RequestError> {
        let (path, query) = split_path(path_and_query, policy)?;
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

/// Converts Envoy's check request, reading the path under `policy`. A request id is taken
/// from Envoy (`x-request-id`) so the decision line joins Envoy's access log.
pub fn from_proto(req: auth::CheckRequest, policy: PathPolicy) -> Result<CheckInput, RequestError> {
    let attrs = req.attributes.unwrap_or_default();
    let peer = attrs
        .source
        .and_then(|p| p.address)
        .and_then(|a| a.address)
        .map(|a| {
            use crate::proto::pb::envoy::config::core::v3::address::Address;
            match a {
                Address::SocketAddress(s) => s.address,
                Address::Pipe(p) => p.path,
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
            headers.list.reserve(map.headers.len());
            for h in map.headers {
                let value = if h.raw_value.is_empty() {
                    h.value.into_bytes()
                } else {
                    h.raw_value
                };
                headers.push(h.key, value);
            }
        }
        _ => {
            headers.list.reserve(http.headers.len());
            for (k, v) in http.headers {
                headers.push(k, v.into_bytes());
            }
        }
    }

    // Envoy fills the path attribute from `:path`; should both be present they must agree,
    // or the sidecar would decide on one and the app receive the other.
    let pseudo_path = headers.single(":path")?;
    let raw_path = match (http.path.as_str(), pseudo_path) {
        ("", Some(p)) => p,
        (attr, Some(p)) if attr != p => {
            return Err(RequestError::PathsDisagree(excerpt(attr), excerpt(p)));
        }
        (attr, _) => attr,
    };
    let (path, mut query) = split_path(raw_path, policy)?;
    let mut query_raw = query_part(raw_path).to_string();
    if query.is_empty() && !http.query.is_empty() {
        query = parse_query(&http.query);
        query_raw = http.query.clone();
    }
    let host = canonical_host(&http.host, &headers)?;
    // Envoy's `x-request-id` first: it is what Envoy's access log, the app and the client
    // see. `http.id` is Envoy's internal stream id, which nothing else shows.
    let request_id = match headers.first("x-request-id") {
        Some(id) if !id.is_empty() => id.to_string(),
        _ if !http.id.is_empty() => http.id,
        _ => new_request_id(),
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
        let mut method = http.method;
        method.make_ascii_uppercase();
        method
    };

    Ok(CheckInput {
        request_id,
        method,
        path,
        query,
        query_raw,
        host,
        scheme: http.scheme,
        headers,
        body,
        peer,
        context_extensions: attrs.context_extensions,
    })
}

/// A request given as plain values (`authz-sidecar check`), read as [`from_proto`] reads
/// Envoy's: the path under `policy`, the host in canonical form (from `host`, else the
/// `host` header; both must agree), the method upper case.
pub fn from_parts(
    method: &str,
    path_and_query: &str,
    host: &str,
    headers: Headers,
    body: Option<Bytes>,
    policy: PathPolicy,
) -> Result<CheckInput, RequestError> {
    let (path, query) = split_path(path_and_query, policy)?;
    let host = canonical_host(host, &headers)?;
    Ok(CheckInput {
        request_id: new_request_id(),
        method: method.to_ascii_uppercase(),
        path,
        query,
        query_raw: query_part(path_and_query).to_string(),
        host,
        scheme: "http".into(),
        headers,
        body,
        peer: None,
        context_extensions: Default::default(),
    })
}

pub fn new_request_id() -> String {
    let bytes: [u8; 12] = rand::random();
    hex::encode(bytes)
}

/// At most 200 characters of client input, for a reason text.
fn excerpt(raw: &str) -> String {
    raw.chars().take(200).collect()
}

/// The host the rules see. Envoy's host attribute is `:authority` (HTTP/1 `Host`); a `host`
/// header next to `:authority` (HTTP/2 allows both) reaches an HTTP/1 app as its `Host`, so
/// every copy present must name the same canonical host, or the request is refused.
fn canonical_host(attr: &str, headers: &Headers) -> Result<String, RequestError> {
    let authority = headers.single(":authority")?;
    let host_header = headers.single("host")?;
    let present = [Some(attr), authority, host_header];
    let Some(raw) = present.into_iter().flatten().find(|h| !h.is_empty()) else {
        // No host at all. Envoy never sends that (HTTP/1.1 without Host gets Envoy's own 400,
        // HTTP/2 needs :authority), so this is a direct gRPC call, as in the README's
        // walkthrough; only rules without `hosts:` can match it.
        return Ok(String::new());
    };
    let host = read_host(raw).map_err(|p| RequestError::BadHost(excerpt(raw), p))?;
    for (name, copy) in [(":authority", authority), ("host", host_header)] {
        // The same text as `raw` reads the same (most requests: `:authority` is the attribute).
        if let Some(copy) = copy
            && copy != raw
            && read_host(copy).as_ref() != Ok(&host)
        {
            return Err(RequestError::HostsDisagree(
                excerpt(raw),
                name,
                excerpt(copy),
            ));
        }
    }
    Ok(host)
}

/// The raw query of `path?query` (empty without one).
pub fn query_part(raw: &str) -> &str {
    raw.split_once('?').map_or("", |(_, q)| q)
}

/// The canonical form of a `Host` / `:authority` value: lower case, the port split off once,
/// one trailing dot removed (`Admin.Example.com.:443` is `admin.example.com`). Refused:
/// userinfo (`x@host`), a malformed port (empty, not digits, over 65535, a second `:` outside
/// brackets), empty labels and characters no host name has. What remains is a host every HTTP
/// stack and DNS resolver reads the same way, so a `hosts:` rule cannot be stepped around.
pub fn read_host(raw: &str) -> Result<String, HostProblem> {
    if raw.is_empty() {
        return Err(HostProblem::Empty);
    }
    if raw.contains('@') {
        return Err(HostProblem::Userinfo);
    }
    let (name, port) = if let Some(rest) = raw.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or(HostProblem::BadBrackets)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(HostProblem::BadPort)?),
        };
        if inside.is_empty()
            || !inside.contains(':')
            || !inside
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(HostProblem::BadBrackets);
        }
        return check_port(port).map(|()| format!("[{}]", inside.to_ascii_lowercase()));
    } else {
        match raw.split_once(':') {
            None => (raw, None),
            Some((_, p)) if p.contains(':') => return Err(HostProblem::TwoColons),
            Some((n, p)) => (n, Some(p)),
        }
    };
    check_port(port)?;
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(HostProblem::Empty);
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostProblem::EmptyLabel);
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(HostProblem::BadChar);
        }
    }
    Ok(name.to_ascii_lowercase())
}

fn check_port(port: Option<&str>) -> Result<(), HostProblem> {
    match port {
        None => Ok(()),
        Some(p)
            if (1..=5).contains(&p.len())
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u32>().is_ok_and(|n| n <= 65535) =>
        {
            Ok(())
        }
        Some(_) => Err(HostProblem::BadPort),
    }
}

/// Splits `path?query`, reads the path ([`read_path`]) and decodes the query. A fragment is
/// refused: clients never send one, and apps disagree on whether it ends the path.
pub fn split_path(
    raw: &str,
    policy: PathPolicy,
) -> Result<(String, Vec<(String, String)>), RequestError> {
    let bad = |p| RequestError::BadPath(excerpt(raw), p);
    if raw.contains('#') {
        return Err(bad(PathProblem::Fragment));
    }
    let (path, query) = raw.split_once('?').unwrap_or((raw, ""));
    Ok((read_path(path, policy).map_err(bad)?, parse_query(query)))
}

/// The path the rules see: exactly the received path, or a refusal.
///
/// Refused, raw or percent-encoded in any case, because some app reads them differently from
/// another: dot segments (`.`, `..`, `%2e%2e`), `;` path parameters (`/admin;x/y`, `..;`),
/// empty segments (`//`; a trailing `/` is fine), backslashes, `%2F` / `%5C` (strict policy),
/// control characters and spaces (`%00`, `%0A`, `\t`), `%3F` / `%23`, double encoding (`%25`
/// followed by two hex digits), bytes that are not UTF-8 once decoded (`%c0%ae`), malformed
/// escapes (`%zz`, `%u002e`), and anything not starting with `/` (`*`, `http://host/path`).
///
/// The one change allowed: each segment is percent-decoded (`/a%20b` is `/a b`, `/%61dmin` is
/// `/admin`). After the refusals above no decoded character is a separator, a delimiter, a
/// control, the start of another escape or part of a dot segment, so the decoded path has
/// exactly the segments of the received one in every app, decoding or not: an app that
/// decodes routes on the same string, one that does not routes on a spelling the rules treat
/// as this one. Under `opaque_encoded_slashes`, `%2F` and `%5C` stay encoded (upper case)
/// inside their segment and are never decoded; dot segments between them are still refused.
pub fn read_path(raw: &str, policy: PathPolicy) -> Result<String, PathProblem> {
    if raw.is_empty() {
        return Err(PathProblem::Empty);
    }
    let Some(rest) = raw.strip_prefix('/') else {
        return Err(PathProblem::NotOriginForm);
    };
    let mut segments = rest.split('/').peekable();
    let mut path = String::with_capacity(raw.len());
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        path.push('/');
        path.push_str(&read_segment(seg, last, policy)?);
    }
    Ok(path)
}

/// One segment of [`read_path`], decoded; borrowed when there is nothing to decode (no `%`:
/// most segments), so only an encoded segment costs a copy.
fn read_segment(raw: &str, last: bool, policy: PathPolicy) -> Result<Cow<'_, str>, PathProblem> {
    let mut encoded = false;
    for b in raw.bytes() {
        match b {
            b'\\' => return Err(PathProblem::Backslash),
            b';' => return Err(PathProblem::PathParameter),
            b' ' => return Err(PathProblem::Control),
            b if b.is_ascii_control() => return Err(PathProblem::Control),
            b'%' => encoded = true,
            _ => {}
        }
    }
    let text = if encoded {
        let decoded = percent_decode(raw, false).ok_or(PathProblem::BadEscape)?;
        Cow::Owned(String::from_utf8(decoded).map_err(|_| PathProblem::NotUtf8)?)
    } else {
        Cow::Borrowed(raw)
    };
    let opaque = policy == PathPolicy::OpaqueEncodedSlashes;
    let bytes = text.as_bytes();
    for (i, c) in text.char_indices() {
        match c {
            '/' if !opaque => return Err(PathProblem::EncodedSlash),
            '\\' if !opaque => return Err(PathProblem::EncodedBackslash),
            ';' => return Err(PathProblem::PathParameter),
            '?' | '#' => return Err(PathProblem::EncodedDelimiter),
            '%' if bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit) =>
            {
                return Err(PathProblem::DoubleEncoding);
            }
            c if c.is_control() => return Err(PathProblem::Control),
            _ => {}
        }
    }
    // Split on the encoded separators too: `..%2F` is a dot segment to any app that decodes.
    if text.split(['/', '\\']).any(|p| p == "." || p == "..") {
        return Err(PathProblem::DotSegment);
    }
    if text.is_empty() && !last {
        return Err(PathProblem::EmptySegment);
    }
    Ok(if opaque {
        Cow::Owned(text.replace('/', "%2F").replace('\\', "%5C"))
    } else {
        text
    })
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
    use PathProblem as P;

    fn strict(raw: &str) -> Result<String, PathProblem> {
        read_path(raw, PathPolicy::Strict)
    }

    fn opaque(raw: &str) -> Result<String, PathProblem> {
        read_path(raw, PathPolicy::OpaqueEncodedSlashes)
    }

    #[test]
    fn ordinary_paths_are_decided_on_as_received() {
        for (raw, want) in [
            ("/", "/"),
            ("/api/agents", "/api/agents"),
            // A trailing slash is the app's business (a route of its own), not an ambiguity.
            ("/api/agents/", "/api/agents/"),
            (
                "/.well-known/openid-configuration",
                "/.well-known/openid-configuration",
            ),
            ("/files/report.v2.pdf", "/files/report.v2.pdf"),
            ("/files/...", "/files/..."),
            ("/a+b/x:y/@z/~u", "/a+b/x:y/@z/~u"),
            // Percent-decoding inside a segment cannot change which segments exist.
            ("/a%20b", "/a b"),
            ("/%61dmin/x", "/admin/x"),
            ("/tools/caf%C3%A9/execute", "/tools/café/execute"),
            ("/files/%2Ejs", "/files/.js"),
            ("/search/100%25", "/search/100%"),
        ] {
            assert_eq!(strict(raw), Ok(want.to_string()), "{raw}");
            assert_eq!(opaque(raw), Ok(want.to_string()), "{raw}");
        }
    }

    #[test]
    fn paths_an_app_could_read_differently_are_refused() {
        for (raw, why) in [
            // Dot segments, raw and encoded in any case: these used to be resolved
            // (`/public/../admin` was decided on as `/admin`), while the app may resolve
            // them differently or not at all.
            ("/public/../admin", P::DotSegment),
            ("/admin/../public/x", P::DotSegment),
            ("/public/%2e%2e/admin", P::DotSegment),
            ("/public/%2E%2e/admin", P::DotSegment),
            ("/public/.%2E/admin", P::DotSegment),
            ("/a/./b", P::DotSegment),
            ("/admin/.", P::DotSegment),
            ("/admin/..", P::DotSegment),
            ("/../../etc", P::DotSegment),
            // Servlet path parameters: /admin;x/y is /admin/y to Tomcat and Jetty.
            ("/public/%2e%2e;/admin/x", P::PathParameter),
            ("/public/..;/admin/x", P::PathParameter),
            ("/public/..%3b/admin/x", P::PathParameter),
            ("/admin;jsessionid=0123/y", P::PathParameter),
            ("/admin;x/y", P::PathParameter),
            // Encoded separators.
            ("/public/..%2fadmin/x", P::EncodedSlash),
            ("/public/..%2Fadmin/x", P::EncodedSlash),
            ("/a%2Fb", P::EncodedSlash),
            ("/public/..%5cadmin/x", P::EncodedBackslash),
            ("/public/..\\admin/x", P::Backslash),
            ("/a\\b", P::Backslash),
            // Empty segments: merged by some apps, kept by others. RFC 3986 resolves
            // /admin//../public/x to /admin/public/x; the old normaliser made it /public/x.
            ("//admin/x", P::EmptySegment),
            ("/admin//x", P::EmptySegment),
            ("/admin//../public/x", P::EmptySegment),
            // Odd and overlong encodings.
            ("/%c0%ae%c0%ae/admin", P::NotUtf8),
            ("/%ff%fe", P::NotUtf8),
            ("/%u002e%u002e/admin", P::BadEscape),
            ("/a%zz", P::BadEscape),
            ("/a%", P::BadEscape),
            ("/a%2", P::BadEscape),
            ("/public/%252e%252e/admin", P::DoubleEncoding),
            ("/a%25%32%65", P::DoubleEncoding),
            ("/admin%3Fx=1", P::EncodedDelimiter),
            ("/a%23b", P::EncodedDelimiter),
            // Controls, NUL and spaces, raw or encoded.
            ("/a%00b", P::Control),
            ("/a\0b", P::Control),
            ("/a%0d%0aX-Injected:%201", P::Control),
            ("/a\tb", P::Control),
            ("/a b", P::Control),
            ("/a%7f", P::Control),
            ("/a%c2%85", P::Control),
            // Not a path.
            ("", P::Empty),
            ("*", P::NotOriginForm),
            ("admin", P::NotOriginForm),
            ("http://admin.example.com/admin", P::NotOriginForm),
        ] {
            assert_eq!(strict(raw), Err(why), "{raw}");
        }
    }

    #[test]
    fn opaque_encoded_slashes_keeps_them_as_data_and_nothing_else() {
        for (raw, want) in [
            ("/files/a%2Fb", "/files/a%2Fb"),
            ("/files/a%2fb", "/files/a%2Fb"),
            ("/files/a%5Cb", "/files/a%5Cb"),
            ("/files/%2F%2F", "/files/%2F%2F"),
        ] {
            assert_eq!(opaque(raw), Ok(want.to_string()), "{raw}");
        }
        for (raw, why) in [
            ("/public/..%2fadmin/x", P::DotSegment),
            ("/public/x%2F..", P::DotSegment),
            ("/public/%2e%2e%5Cadmin", P::DotSegment),
            ("/files/a%252Fb", P::DoubleEncoding),
            ("/a\\b", P::Backslash),
            ("/a/../b", P::DotSegment),
            ("/admin;x/y", P::PathParameter),
            ("//admin", P::EmptySegment),
        ] {
            assert_eq!(opaque(raw), Err(why), "{raw}");
        }
    }

    #[test]
    fn query_and_fragment() {
        let (p, q) = split_path("/search?q=a%20b&x=1&flag", PathPolicy::Strict).unwrap();
        assert_eq!(p, "/search");
        assert_eq!(
            q,
            vec![
                ("q".into(), "a b".into()),
                ("x".into(), "1".into()),
                ("flag".into(), String::new())
            ]
        );
        // Only the path is read strictly: `..` and `//` in the query are data.
        let (p, _) = split_path("/search?next=/a/../b//c", PathPolicy::Strict).unwrap();
        assert_eq!(p, "/search");
        // A fragment used to be cut off; the app may not cut it where the sidecar did.
        assert_eq!(
            split_path("/public/x#/../../admin", PathPolicy::Strict).unwrap_err(),
            RequestError::BadPath("/public/x#/../../admin".into(), P::Fragment)
        );
    }

    #[test]
    fn a_refused_path_names_itself_and_the_problem() {
        let e = CheckInput::http("GET", "/public/%2e%2e;/admin/x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "path \"/public/%2e%2e;/admin/x\" refused: ; path parameter (raw or %3B): servlet \
             containers cut `;...` off a segment, so /admin;x/y is /admin/y and /a/..;/b is /b there"
        );
        let e = CheckInput::http("GET", "/api/%zz").unwrap_err();
        assert!(e.to_string().contains("bad percent-encoding"), "{e}");
    }

    #[test]
    fn hosts_have_one_canonical_form() {
        for (raw, want) in [
            ("admin.example.com", "admin.example.com"),
            ("ADMIN.Example.COM", "admin.example.com"),
            ("admin.example.com.", "admin.example.com"),
            ("admin.example.com:8443", "admin.example.com"),
            ("Admin.Example.com.:443", "admin.example.com"),
            ("localhost", "localhost"),
            ("my_host.internal", "my_host.internal"),
            ("127.0.0.1:80", "127.0.0.1"),
            ("[::1]:8080", "[::1]"),
            ("[FE80::1]", "[fe80::1]"),
        ] {
            assert_eq!(read_host(raw), Ok(want.to_string()), "{raw}");
        }
        use HostProblem as H;
        for (raw, why) in [
            ("", H::Empty),
            (".", H::Empty),
            (":80", H::Empty),
            ("x@admin.example.com", H::Userinfo),
            ("admin.example.com@evil.example", H::Userinfo),
            ("admin.example.com:", H::BadPort),
            ("admin.example.com:abc", H::BadPort),
            ("admin.example.com:+80", H::BadPort),
            ("admin.example.com:99999", H::BadPort),
            ("admin.example.com:000080", H::BadPort),
            ("admin.example.com:80:80", H::TwoColons),
            ("::1", H::TwoColons),
            ("[::1", H::BadBrackets),
            ("[::1]x", H::BadPort),
            ("[admin.example.com]", H::BadBrackets),
            ("admin.example.com..", H::EmptyLabel),
            (".admin.example.com", H::EmptyLabel),
            ("admin..example.com", H::EmptyLabel),
            ("admin example.com", H::BadChar),
            ("admin.example.com/x", H::BadChar),
            ("admin%2eexample.com", H::BadChar),
            ("ädmin.example.com", H::BadChar),
            ("*.example.com", H::BadChar),
        ] {
            assert_eq!(read_host(raw), Err(why), "{raw}");
        }
    }

    fn check_request(path: &str, host: &str, headers: &[(&str, &str)]) -> auth::CheckRequest {
        use crate::proto::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
        auth::CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(attribute_context::HttpRequest {
                        method: "GET".into(),
                        path: path.into(),
                        host: host.into(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_request_id_is_envoys_x_request_id_so_the_decision_line_joins_the_access_log() {
        let mut req = check_request("/x", "h", &[("x-request-id", "6c1f-uuid")]);
        let http = |r: &mut auth::CheckRequest| {
            r.attributes
                .as_mut()
                .unwrap()
                .request
                .as_mut()
                .unwrap()
                .http
                .as_mut()
                .unwrap()
                .id = "1074468394509502465".into();
        };
        http(&mut req);
        let input = from_proto(req, PathPolicy::Strict).unwrap();
        assert_eq!(input.request_id, "6c1f-uuid");
        let mut no_header = check_request("/x", "h", &[]);
        http(&mut no_header);
        let input = from_proto(no_header, PathPolicy::Strict).unwrap();
        assert_eq!(
            input.request_id, "1074468394509502465",
            "the stream id, failing the header"
        );
    }

    #[test]
    fn from_proto_reads_path_and_host_under_the_policy() {
        fn read(
            path: &str,
            host: &str,
            headers: &[(&str, &str)],
            policy: PathPolicy,
        ) -> Result<CheckInput, RequestError> {
            from_proto(check_request(path, host, headers), policy)
        }
        let input = read(
            "/files/a%2fb?x=1",
            "Admin.Example.com.:443",
            &[(":authority", "Admin.Example.com.:443")],
            PathPolicy::OpaqueEncodedSlashes,
        )
        .unwrap();
        assert_eq!(input.path, "/files/a%2Fb");
        assert_eq!(input.host, "admin.example.com");
        assert_eq!(input.query_param("x"), Some("1"));
        assert_eq!(
            read("/files/a%2fb", "h", &[], PathPolicy::Strict).unwrap_err(),
            RequestError::BadPath("/files/a%2fb".into(), P::EncodedSlash)
        );
        assert_eq!(
            read("/x", "x@admin.example.com", &[], PathPolicy::Strict).unwrap_err(),
            RequestError::BadHost("x@admin.example.com".into(), HostProblem::Userinfo)
        );
        // Every copy of the host must name the same host.
        assert!(matches!(
            read(
                "/x",
                "public.example.com",
                &[("host", "admin.example.com")],
                PathPolicy::Strict
            )
            .unwrap_err(),
            RequestError::HostsDisagree(_, "host", _)
        ));
        assert!(
            read(
                "/x",
                "admin.example.com",
                &[("host", "ADMIN.example.com.:80")],
                PathPolicy::Strict
            )
            .is_ok()
        );
        // No host anywhere: only rules without hosts: match (Envoy always sends one).
        assert_eq!(read("/x", "", &[], PathPolicy::Strict).unwrap().host, "");
        // An empty copy next to a host is a second reading.
        assert!(matches!(
            read("/x", "a.example", &[("host", "")], PathPolicy::Strict).unwrap_err(),
            RequestError::HostsDisagree(_, "host", _)
        ));
        // The host attribute empty: :authority is the host.
        let input = read("/x", "", &[(":authority", "A.example")], PathPolicy::Strict).unwrap();
        assert_eq!(input.host, "a.example");
        // The path attribute and :path must agree.
        assert!(matches!(
            read(
                "/public/x",
                "h",
                &[(":path", "/admin/x")],
                PathPolicy::Strict
            )
            .unwrap_err(),
            RequestError::PathsDisagree(..)
        ));
        let input = read("", "h", &[(":path", "/public/x")], PathPolicy::Strict).unwrap();
        assert_eq!(input.path, "/public/x");
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
        h.insert("X-API-Key", "k");
        assert_eq!(
            h.first("x-api-key"),
            Some("k"),
            "the first value that is text"
        );
        assert!(h.contains("x-api-key") && !h.contains("x-api"));
        assert_eq!(h.single("origin"), Ok(None));
        assert_eq!(
            h.names().collect::<Vec<_>>(),
            vec!["authorization", "x-api-key"]
        );
    }
}
