//! Route rules: which rule governs a request (host, path pattern, method, predicates on query,
//! headers and JSON body) and what it demands (public, roles, scopes, relationship checks
//! built from templates).
//!
//! Rules compile once per policy (at startup; a reload builds a new one); every mistake in
//! them (an unknown path parameter in a template, a bad predicate, an empty check) is a config
//! error naming its key.
//!
//! Routing ([`RuleSet::route`]) reads request values strictly: a body, query parameter or
//! header that the app's parser could read differently from ours is a [`Refusal`] (400),
//! never a reason to skip a rule and fall through to a weaker one. A body that is a JSON
//! array is a JSON-RPC batch, routed element by element.

use std::sync::OnceLock;

use serde_json::Value;

use super::RelationRef;
use super::TupleKey;
use super::trace::{Event, Trace, record};
use crate::authn::Principal;
use crate::config::{
    Config, ConfigError, Consistency, Match, OnBackendError, OpenFgaConfig, RelationCheckConfig,
    RoutesConfig, RuleConfig, RuleMode, Unmatched,
};
use crate::failure::FailureKind;
use crate::request::{CheckInput, RequestError};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Lit(String),
    Param(String),
    /// `*`: one segment.
    Star,
    /// `**`: the rest, possibly nothing (last segment only).
    Rest,
}

#[derive(Debug, Clone)]
pub struct PathPattern {
    raw: String,
    segments: Vec<Segment>,
}

impl PathPattern {
    pub fn parse(key: &str, raw: &str) -> Result<Self, ConfigError> {
        if !raw.starts_with('/') {
            return Err(ConfigError::invalid(
                key,
                format!("{raw:?} must start with /"),
            ));
        }
        let parts: Vec<&str> = raw[1..].split('/').collect();
        let mut segments = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let seg = match *p {
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => {
                    return Err(ConfigError::invalid(
                        key,
                        "** is only allowed as the last segment",
                    ));
                }
                "*" => Segment::Star,
                p if p.starts_with('{') && p.ends_with('}') => {
                    let name = &p[1..p.len() - 1];
                    if name.is_empty()
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(ConfigError::invalid(
                            key,
                            format!("{p}: a parameter name is letters, digits and _"),
                        ));
                    }
                    Segment::Param(name.to_string())
                }
                p if p.contains(['{', '}', '*']) => {
                    return Err(ConfigError::invalid(
                        key,
                        format!("{p:?}: a segment is literal, *, ** or {{name}}, not a mix"),
                    ));
                }
                p => Segment::Lit(p.to_string()),
            };
            segments.push(seg);
        }
        Ok(Self {
            raw: raw.to_string(),
            segments,
        })
    }

    fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// Matches a normalised path; returns the captured parameters. The path's segments are
    /// read as they are split (every rule is tried against the path until one matches: no
    /// list of them per rule).
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let mut parts = path[1.min(path.len())..].split('/');
        let mut params = Vec::new();
        for seg in &self.segments {
            if let Segment::Rest = seg {
                return Some(params);
            }
            let part = parts.next()?;
            match seg {
                Segment::Lit(l) if l == part => {}
                Segment::Star if !part.is_empty() => {}
                Segment::Param(n) if !part.is_empty() => {
                    params.push((n.clone(), part.to_string()));
                }
                _ => return None,
            }
        }
        // Every segment matched: the path matches when it has no more.
        parts.next().is_none().then_some(params)
    }
}

/// Where a value comes from: a path parameter, the query, a header, the JSON body, Envoy's
/// context extensions, or the principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Param(String),
    Query(String),
    Header(String),
    Body(String),
    Context(String),
    Subject,
    PrincipalId,
    PrincipalType,
}

impl Source {
    fn parse(raw: &str) -> Result<Self, String> {
        let (kind, arg) = raw.split_once(':').unwrap_or(("param", raw));
        let need = |a: &str| {
            if a.is_empty() {
                Err(format!("{raw:?}: {kind}: needs a name"))
            } else {
                Ok(a.to_string())
            }
        };
        Ok(match kind {
            "param" | "path" => Self::Param(need(arg)?),
            "query" => Self::Query(need(arg)?),
            "header" => Self::Header(need(arg)?.to_ascii_lowercase()),
            "context" => Self::Context(need(arg)?),
            "body" if arg.starts_with('/') || arg.is_empty() => Self::Body(arg.to_string()),
            "body" => {
                return Err(format!(
                    "{raw:?}: body: takes a JSON pointer like /params/name"
                ));
            }
            "principal" => match arg {
                "subject" => Self::Subject,
                "id" => Self::PrincipalId,
                "type" => Self::PrincipalType,
                _ => return Err(format!("{raw:?}: principal: is subject, id or type")),
            },
            _ if raw == "subject" => Self::Subject,
            _ => {
                return Err(format!(
                    "{raw:?}: unknown source (param, query:, header:, body:/pointer, context:, principal:)"
                ));
            }
        })
    }

    fn describe(&self) -> String {
        match self {
            Self::Param(n) => format!("path parameter {n}"),
            Self::Query(n) => format!("query parameter {n}"),
            Self::Header(n) => format!("header {n}"),
            Self::Body(p) => format!("body field {p}"),
            Self::Context(n) => format!("context extension {n}"),
            Self::Subject => "principal subject".into(),
            Self::PrincipalId => "principal id".into(),
            Self::PrincipalType => "principal type".into(),
        }
    }
}

/// The header Envoy sets on a check request when it buffered the body: `true` when the body
/// was cut at `max_request_bytes` (`allow_partial_message: true`). Envoy drops a copy sent by
/// the client.
pub const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";

/// Why a value a rule reads cannot be read one way only. The app behind the sidecar parses
/// the same request with its own parsers; where they could read it differently, the request is
/// refused (400 `invalid_request`) instead of being routed on a guess, and never falls through
/// to a weaker rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ambiguity {
    #[error("request body was cut at Envoy's max_request_bytes ({PARTIAL_BODY_HEADER}: true)")]
    BodyPartial,
    #[error(
        "request body was not sent to the authorizer ({0}): Envoy's ext_authz needs with_request_body"
    )]
    BodyNotSent(String),
    #[error(
        "no request body reached the authorizer (none was sent, or Envoy's ext_authz lacks with_request_body)"
    )]
    BodyEmpty,
    #[error("request body is {got} bytes but content-length says {declared}")]
    BodyLength { got: usize, declared: u64 },
    #[error("request body is content-encoded ({0}): the authorizer cannot read it")]
    BodyEncoded(String),
    #[error("request body is not UTF-8")]
    BodyNotUtf8,
    #[error("request body starts with a byte order mark, which JSON forbids (RFC 8259 8.1)")]
    BodyBom,
    #[error("request body is not strict JSON: {0}")]
    BodyJson(String),
    #[error("JSON-RPC batch is empty")]
    EmptyBatch,
    #[error("JSON-RPC batch element {0} is not an object")]
    BatchElement(usize),
    #[error(
        "body field {0} is a fractional or out-of-range number, which parsers render differently"
    )]
    BodyFloat(String),
    #[error("query parameter {0} appears more than once")]
    QueryRepeated(String),
    #[error("query has bad percent-encoding in {0:?}")]
    QueryEncoding(String),
    #[error("query contains ';', which some servers read as a separator")]
    QuerySemicolon,
    #[error("header {0} appears more than once")]
    HeaderRepeated(String),
    #[error("header {0} holds a ',': Envoy joins a repeated header with ','")]
    HeaderComma(String),
    #[error("header {0} is not valid UTF-8")]
    HeaderNotUtf8(String),
}

/// A request refused because a rule that could have matched it reads a value that cannot be
/// read unambiguously.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem} (rule {rule} reads {reads})")]
pub struct Refusal {
    pub rule: String,
    /// What the rule reads: `body field /method`, `query parameter thread`.
    pub reads: String,
    pub problem: Ambiguity,
}

impl Refusal {
    /// A value read two ways is a bad request (400), never a weaker rule.
    pub fn kind(&self) -> FailureKind {
        FailureKind::BadRequest
    }
}

/// Why a source could not give a value.
#[derive(Debug)]
enum Unreadable {
    Ambiguous(Ambiguity),
    /// The body is a JSON array: a JSON-RPC batch, routed element by element.
    Batch,
}

impl From<Ambiguity> for Unreadable {
    fn from(a: Ambiguity) -> Self {
        Self::Ambiguous(a)
    }
}

enum Body {
    /// The request body, parsed on first read.
    Whole(OnceLock<Result<Value, Ambiguity>>),
    /// One element of a JSON-RPC batch, read as if it were the body.
    Element(Value),
}

/// Per-request values the sources read; the JSON body is parsed at most once.
pub struct EvalContext<'a> {
    pub input: &'a CheckInput,
    pub params: Vec<(String, String)>,
    body: Body,
}

impl<'a> EvalContext<'a> {
    pub fn new(input: &'a CheckInput) -> Self {
        Self {
            input,
            params: Vec::new(),
            body: Body::Whole(OnceLock::new()),
        }
    }

    /// Values for one element of a JSON-RPC batch: `body:` sources read `element`.
    fn element(input: &'a CheckInput, element: Value) -> Self {
        Self {
            input,
            params: Vec::new(),
            body: Body::Element(element),
        }
    }

    /// Whether this context reads one element of a JSON-RPC batch.
    pub fn is_batch_element(&self) -> bool {
        matches!(self.body, Body::Element(_))
    }

    fn body(&self) -> Result<&Value, Unreadable> {
        match &self.body {
            Body::Element(v) => Ok(v),
            Body::Whole(cell) => match cell.get_or_init(|| read_body(self.input)) {
                Err(a) => Err(a.clone().into()),
                Ok(Value::Array(_)) => Err(Unreadable::Batch),
                Ok(v) => Ok(v),
            },
        }
    }

    /// The elements of a batch body, once [`Self::body`] said it is one.
    fn batch_elements(&self) -> Vec<Value> {
        match &self.body {
            Body::Whole(cell) => match cell.get() {
                Some(Ok(Value::Array(items))) => items.clone(),
                _ => Vec::new(),
            },
            Body::Element(_) => Vec::new(),
        }
    }

    /// The value of a source, `None` when absent. A value that two parsers could read
    /// differently is an error, never a guess.
    fn read(
        &self,
        src: &Source,
        principal: Option<&Principal>,
    ) -> Result<Option<String>, Unreadable> {
        Ok(match src {
            Source::Param(n) => self
                .params
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone()),
            Source::Query(n) => query_value(&self.input.query_raw, n)?,
            Source::Header(n) => match self.input.headers.single(n) {
                Ok(Some(v)) if v.contains(',') => {
                    return Err(Ambiguity::HeaderComma(n.clone()).into());
                }
                Ok(v) => v.map(String::from),
                Err(RequestError::DuplicateHeader(_)) => {
                    return Err(Ambiguity::HeaderRepeated(n.clone()).into());
                }
                Err(_) => return Err(Ambiguity::HeaderNotUtf8(n.clone()).into()),
            },
            Source::Context(n) => self.input.context_extensions.get(n).cloned(),
            Source::Body(p) => match self.body()?.pointer(p) {
                Some(Value::String(s)) => Some(s.clone()),
                // 1.0, 1e2 and 12345678901234567890123 are read differently by different
                // parsers (float, int, bignum); integers that fit 64 bits are not.
                Some(Value::Number(n)) if n.is_f64() => {
                    return Err(Ambiguity::BodyFloat(p.clone()).into());
                }
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(Value::Bool(b)) => Some(b.to_string()),
                // null, objects and arrays have no scalar value to compare or fill in.
                _ => None,
            },
            Source::Subject => principal.map(|p| p.subject.clone()),
            Source::PrincipalId => principal.map(|p| p.id.clone()),
            Source::PrincipalType => principal.map(|p| p.kind.as_str().to_string()),
        })
    }
}

/// The body as JSON, exactly as the app would have to read it, or why it cannot be.
fn read_body(input: &CheckInput) -> Result<Value, Ambiguity> {
    if input
        .headers
        .first(PARTIAL_BODY_HEADER)
        .is_some_and(|v| !v.eq_ignore_ascii_case("false"))
    {
        return Err(Ambiguity::BodyPartial);
    }
    let body = input.body.as_deref().unwrap_or_default();
    let declared = input
        .headers
        .first("content-length")
        .and_then(|v| v.trim().parse::<u64>().ok());
    if body.is_empty() {
        return Err(if let Some(n) = declared.filter(|n| *n > 0) {
            Ambiguity::BodyNotSent(format!("content-length {n}"))
        } else if input.headers.contains("transfer-encoding") {
            Ambiguity::BodyNotSent("transfer-encoding".into())
        } else {
            Ambiguity::BodyEmpty
        });
    }
    if let Some(declared) = declared
        && declared != body.len() as u64
    {
        return Err(Ambiguity::BodyLength {
            got: body.len(),
            declared,
        });
    }
    if let Some(enc) = input
        .headers
        .first("content-encoding")
        .filter(|e| !e.trim().eq_ignore_ascii_case("identity"))
    {
        return Err(Ambiguity::BodyEncoded(enc.chars().take(40).collect()));
    }
    let text = std::str::from_utf8(body).map_err(|_| Ambiguity::BodyNotUtf8)?;
    // Python's json.loads(bytes) skips a BOM, Go's encoding/json and JSON.parse refuse it:
    // refused here, as RFC 8259 says senders must not add one.
    if text.starts_with('\u{feff}') {
        return Err(Ambiguity::BodyBom);
    }
    super::strict_json::parse(text).map_err(|e| Ambiguity::BodyJson(e.to_string()))
}

/// One query parameter, strictly: absent, or present once with valid percent-encoding.
/// `+` is a space, as in every form decoder.
fn query_value(raw: &str, name: &str) -> Result<Option<String>, Ambiguity> {
    // Python before 3.9.2 (and some frameworks) split on ';' too: `a=1;a=2` is one
    // parameter here and two there.
    if raw.contains(';') {
        return Err(Ambiguity::QuerySemicolon);
    }
    let decode = |s: &str| {
        percent_decode_query(s)
            .ok_or_else(|| Ambiguity::QueryEncoding(s.chars().take(100).collect()))
    };
    let mut found = None;
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        // A key that cannot be decoded could be `name` to a lenient parser.
        if decode(k)? != name {
            continue;
        }
        if found.is_some() {
            return Err(Ambiguity::QueryRepeated(name.to_string()));
        }
        found = Some(decode(v)?);
    }
    Ok(found)
}

/// `+` as space, `%XX` as a byte; the result must be UTF-8. None on a bad escape or bytes.
fn percent_decode_query(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[derive(Debug, Clone)]
enum Op {
    Eq(String),
    Ne(String),
    Exists,
}

/// `body:/method == tools/call`, `query:dry_run != true`, `header:x-tenant exists`.
#[derive(Debug, Clone)]
pub struct Predicate {
    source: Source,
    op: Op,
    /// As written, for explanations.
    raw: String,
}

impl Predicate {
    fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        let (src, op) = if let Some((s, v)) = raw.split_once("==") {
            (s, Op::Eq(v.trim().trim_matches('"').to_string()))
        } else if let Some((s, v)) = raw.split_once("!=") {
            (s, Op::Ne(v.trim().trim_matches('"').to_string()))
        } else if let Some(s) = raw.strip_suffix(" exists") {
            (s, Op::Exists)
        } else {
            return Err(format!(
                "{raw:?}: want SOURCE == VALUE, SOURCE != VALUE or SOURCE exists"
            ));
        };
        Ok(Self {
            source: Source::parse(src.trim())?,
            op,
            raw: raw.to_string(),
        })
    }

    /// Why this predicate does not hold, for an explanation: what it asks and what was read.
    fn why_not(&self, ctx: &EvalContext<'_>) -> String {
        let read = match ctx.read(&self.source, None) {
            Ok(Some(v)) => format!("{} is {v:?}", self.source.describe()),
            Ok(None) => format!("{} is absent", self.source.describe()),
            Err(_) => format!("{} cannot be read", self.source.describe()),
        };
        format!("when {:?} does not hold: {read}", self.raw)
    }

    fn holds(&self, ctx: &EvalContext<'_>) -> Result<bool, Unreadable> {
        let v = ctx.read(&self.source, None)?;
        Ok(match &self.op {
            Op::Eq(want) => v.as_deref() == Some(want),
            Op::Ne(want) => v.as_deref() != Some(want),
            Op::Exists => v.is_some(),
        })
    }
}

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Var(Source),
}

/// `tool:{tool}`, `conversation:{query:thread_id}`, `tool:{body:/params/name}`.
#[derive(Debug, Clone)]
pub struct Template {
    raw: String,
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = raw;
        while let Some(start) = rest.find('{') {
            if start > 0 {
                parts.push(Part::Lit(rest[..start].to_string()));
            }
            let end = rest[start..]
                .find('}')
                .ok_or_else(|| format!("{raw:?}: unclosed {{"))?;
            parts.push(Part::Var(Source::parse(&rest[start + 1..start + end])?));
            rest = &rest[start + end + 1..];
        }
        if rest.contains('}') {
            return Err(format!("{raw:?}: stray }}"));
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(Self {
            raw: raw.to_string(),
            parts,
        })
    }

    /// The literal type prefix (`tool` of `tool:{tool}`), for validation against the model.
    pub fn type_prefix(&self) -> Option<String> {
        match self.parts.first() {
            Some(Part::Lit(l)) => l.split_once(':').map(|(t, _)| t.to_string()),
            _ => None,
        }
    }

    fn sources(&self) -> impl Iterator<Item = &Source> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(s) => Some(s),
            Part::Lit(_) => None,
        })
    }

    /// Fills the template. A missing or unsafe value is an error naming it: a check on `tool:`
    /// would ask OpenFGA the wrong question.
    pub fn render(
        &self,
        ctx: &EvalContext<'_>,
        principal: Option<&Principal>,
    ) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Var(src) => {
                    // Routing already read every source of the matched rule's templates, so
                    // an unreadable one cannot reach here; say so if it does.
                    let v = match ctx.read(src, principal) {
                        Ok(v) => v,
                        Err(Unreadable::Ambiguous(a)) => {
                            return Err(format!("cannot build {}: {a}", self.raw));
                        }
                        Err(Unreadable::Batch) => {
                            return Err(format!(
                                "cannot build {}: the body is a JSON-RPC batch",
                                self.raw
                            ));
                        }
                    };
                    let v = v.filter(|v| !v.is_empty()).ok_or_else(|| {
                        format!("cannot build {}: {} missing", self.raw, src.describe())
                    })?;
                    let subject_like = matches!(src, Source::Subject);
                    if v.len() > 256
                        || v.chars()
                            .any(|c| c.is_whitespace() || c.is_control() || c == '#')
                        || (!subject_like && v.contains(':') && self.parts.len() > 1)
                    {
                        return Err(format!(
                            "cannot build {}: {} has characters not allowed in an object id",
                            self.raw,
                            src.describe()
                        ));
                    }
                    out.push_str(&v);
                }
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Clone)]
pub struct RelationTemplate {
    pub relation: String,
    pub object: Template,
    pub user: Option<Template>,
    pub key: String,
}

impl RelationTemplate {
    pub fn render(&self, principal: &Principal, ctx: &EvalContext<'_>) -> Result<TupleKey, String> {
        let user = match &self.user {
            Some(t) => t.render(ctx, Some(principal))?,
            None => principal.subject.clone(),
        };
        Ok(TupleKey {
            user,
            relation: self.relation.clone(),
            object: self.object.render(ctx, Some(principal))?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct CompiledCheck {
    pub checks: Vec<RelationTemplate>,
    /// `all` (every check must hold) or `any`.
    pub all: bool,
    pub consistency: Consistency,
    pub on_backend_error: OnBackendError,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    hosts: Vec<String>,
    pub path: PathPattern,
    methods: Vec<String>,
    when: Vec<Predicate>,
    pub public: bool,
    pub roles: Vec<String>,
    pub roles_match: Match,
    pub scopes: Vec<String>,
    pub check: Option<CompiledCheck>,
    /// `mode: shadow`: evaluated and logged, never deciding ([`RuleSet::shadow_rules`]).
    pub shadow: bool,
}

impl Rule {
    /// Why this rule's host, method or path does not fit the request (`None`: they do), for
    /// an explanation: the tests [`find`] makes, in its order.
    fn why_not(&self, input: &CheckInput) -> Option<String> {
        if !self.host_matches(&input.host) {
            return Some(format!(
                "host {:?} is not one of [{}]",
                input.host,
                self.hosts.join(", ")
            ));
        }
        if !self.methods.is_empty() && !self.methods.contains(&input.method) {
            return Some(format!(
                "method {} is not one of [{}]",
                input.method,
                self.methods.join(", ")
            ));
        }
        if self.path.matches(&input.path).is_none() {
            return Some(format!(
                "path {} does not match {}",
                input.path, self.path.raw
            ));
        }
        None
    }

    /// Every source the rule's check templates read.
    fn template_sources(&self) -> impl Iterator<Item = &Source> {
        self.check.iter().flat_map(|c| &c.checks).flat_map(|c| {
            c.object
                .sources()
                .chain(c.user.iter().flat_map(Template::sources))
        })
    }

    fn host_matches(&self, host: &str) -> bool {
        self.hosts.is_empty()
            || self.hosts.iter().any(|h| {
                h == "*"
                    || h == host
                    || h.strip_prefix("*.").is_some_and(|suffix| {
                        host.len() > suffix.len() + 1
                            && host.ends_with(suffix)
                            && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                    })
            })
    }
}

/// Why [`RuleSet::find`] stopped: a rule that could match reads a source it cannot read.
struct Stop<'r> {
    rule: &'r Rule,
    source: Source,
    why: Unreadable,
}

/// One part of a routed request (the request, or one element of a JSON-RPC batch): the rule
/// that governs it, if any, and the values it was matched on.
pub struct Routed<'r, 'a> {
    pub ctx: EvalContext<'a>,
    pub rule: Option<&'r Rule>,
}

/// A routed request. Every part must be allowed for the request to be.
pub struct Route<'r, 'a> {
    pub parts: Vec<Routed<'r, 'a>>,
    /// The body is a JSON-RPC batch: one part per element, in order.
    pub batch: bool,
}

/// The ordered rules; the first match wins. Shadow rules are kept apart: routing for the
/// answer never sees them ([`RuleSet::route_shadow`] tries each on its own).
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<Rule>,
    shadow: Vec<Rule>,
    pub unmatched: Unmatched,
    /// `routes.dry_run`: the pipeline answers 401/403 policy denies with an allow.
    pub dry_run: bool,
}

impl RuleSet {
    /// The rules of a loaded config, compiled: the one function `serve`, `check-config` and
    /// `doctor` compile rules with (the server builds every policy through it). A bad
    /// rule is an error naming its key.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        Self::compile(&config.routes, config.openfga.as_ref())
    }

    pub fn compile(
        cfg: &RoutesConfig,
        openfga: Option<&OpenFgaConfig>,
    ) -> Result<Self, ConfigError> {
        let default_consistency = openfga.map(|o| o.consistency).unwrap_or_default();
        let mut rules = Vec::with_capacity(cfg.rules.len());
        let mut shadow = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, rc) in cfg.rules.iter().enumerate() {
            let key = format!("routes.rules[{i}]");
            let rule = compile_rule(&key, rc, default_consistency, openfga.is_some())?;
            if !names.insert(rule.name.clone()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("{:?} is used by an earlier rule", rule.name),
                ));
            }
            if rule.shadow {
                shadow.push(rule);
            } else {
                rules.push(rule);
            }
        }
        Ok(Self {
            rules,
            shadow,
            unmatched: cfg.unmatched,
            dry_run: cfg.dry_run,
        })
    }

    /// The enforcing rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The shadow rules (`mode: shadow`), in order: never consulted for the answer.
    pub fn shadow_rules(&self) -> &[Rule] {
        &self.shadow
    }

    /// Routes a request: the first rule that matches it, with the values it was matched on.
    /// A body that is a JSON array is a JSON-RPC batch: each element is routed as if it were
    /// the body, and is one part of the answer. Shadow rules take no part.
    ///
    /// Refused (with the batch element it concerns, if any): a request that a rule which
    /// could have matched (host, method and path do) can only be matched or checked by
    /// reading an ambiguous value, an empty batch, and a batch element that is not an object.
    pub fn route<'r, 'a>(
        &'r self,
        input: &'a CheckInput,
    ) -> Result<Route<'r, 'a>, (Option<usize>, Refusal)> {
        route_in(&self.rules, input, None)
    }

    /// [`Self::route`], recording in `trace` each rule tried and why it did not match (and
    /// the shadow rules as passed over).
    pub fn route_traced<'r, 'a>(
        &'r self,
        input: &'a CheckInput,
        mut trace: Option<&mut Trace>,
    ) -> Result<Route<'r, 'a>, (Option<usize>, Refusal)> {
        for rule in &self.shadow {
            record(&mut trace, || Event::ShadowIgnored {
                rule: rule.name.clone(),
            });
        }
        route_in(&self.rules, input, trace)
    }

    /// Routes a request as if the shadow rule `rule` were the only rule: the parts it governs
    /// (a part it does not match has no rule), or the refusal it would give.
    pub fn route_shadow<'r, 'a>(
        rule: &'r Rule,
        input: &'a CheckInput,
        trace: Option<&mut Trace>,
    ) -> Result<Route<'r, 'a>, (Option<usize>, Refusal)> {
        route_in(std::slice::from_ref(rule), input, trace)
    }

    /// Every relationship a rule may ask about, for validation against the OpenFGA model.
    pub fn relation_refs(&self) -> Vec<RelationRef> {
        let mut out = Vec::new();
        for rule in self.rules.iter().chain(&self.shadow) {
            for c in rule.check.iter().flat_map(|c| &c.checks) {
                out.push(RelationRef {
                    rule: rule.name.clone(),
                    key: c.key.clone(),
                    relation: c.relation.clone(),
                    object_type: c.object.type_prefix(),
                    user_type: c.user.as_ref().and_then(Template::type_prefix),
                });
            }
        }
        out
    }

    pub fn needs_relationships(&self) -> bool {
        self.rules
            .iter()
            .chain(&self.shadow)
            .any(|r| r.check.is_some())
    }
}

/// [`RuleSet::route`] over `rules` (the enforcing rules, or one shadow rule).
fn route_in<'r, 'a>(
    rules: &'r [Rule],
    input: &'a CheckInput,
    mut trace: Option<&mut Trace>,
) -> Result<Route<'r, 'a>, (Option<usize>, Refusal)> {
    let mut ctx = EvalContext::new(input);
    let stop = match find(rules, &mut ctx, &mut trace) {
        Ok(rule) => {
            return Ok(Route {
                parts: vec![Routed { ctx, rule }],
                batch: false,
            });
        }
        Err(stop) => stop,
    };
    let refuse = |stop: &Stop<'_>, problem| Refusal {
        rule: stop.rule.name.clone(),
        reads: stop.source.describe(),
        problem,
    };
    if let Unreadable::Ambiguous(a) = &stop.why {
        return Err((None, refuse(&stop, a.clone())));
    }
    let elements = ctx.batch_elements();
    if elements.is_empty() {
        return Err((None, refuse(&stop, Ambiguity::EmptyBatch)));
    }
    record(&mut trace, || Event::Batch {
        elements: elements.len(),
    });
    let mut parts = Vec::with_capacity(elements.len());
    for (i, element) in elements.into_iter().enumerate() {
        // JSON-RPC 2.0: a batch holds request objects; anything else is not a call the
        // app could run, and reading it as one would be a guess.
        if !element.is_object() {
            return Err((None, refuse(&stop, Ambiguity::BatchElement(i))));
        }
        record(&mut trace, || Event::Element { index: i });
        let mut ctx = EvalContext::element(input, element);
        match find(rules, &mut ctx, &mut trace) {
            Ok(rule) => parts.push(Routed { ctx, rule }),
            Err(s) => {
                let problem = match &s.why {
                    Unreadable::Ambiguous(a) => a.clone(),
                    // An element is an object, never a batch of its own.
                    Unreadable::Batch => Ambiguity::BatchElement(i),
                };
                return Err((Some(i), refuse(&s, problem)));
            }
        }
    }
    Ok(Route { parts, batch: true })
}

/// The first of `rules` that matches, with the path parameters it captured in `ctx`. With a
/// trace, each rule passed over is recorded with the reason (built only then).
fn find<'r>(
    rules: &'r [Rule],
    ctx: &mut EvalContext<'_>,
    trace: &mut Option<&mut Trace>,
) -> Result<Option<&'r Rule>, Stop<'r>> {
    let input = ctx.input;
    for rule in rules {
        let skipped = |trace: &mut Option<&mut Trace>, why: &dyn Fn() -> String| {
            record(trace, || Event::RuleSkipped {
                rule: rule.name.clone(),
                shadow: rule.shadow,
                why: why(),
            });
        };
        if !rule.host_matches(&input.host) {
            skipped(trace, &|| rule.why_not(input).unwrap_or_default());
            continue;
        }
        if !rule.methods.is_empty() && !rule.methods.contains(&input.method) {
            skipped(trace, &|| rule.why_not(input).unwrap_or_default());
            continue;
        }
        let Some(params) = rule.path.matches(&input.path) else {
            skipped(trace, &|| rule.why_not(input).unwrap_or_default());
            continue;
        };
        ctx.params = params;
        let stop = |source: &Source, why| Stop {
            rule,
            source: source.clone(),
            why,
        };
        // Every predicate is read, not only up to the first false one: whether a request
        // is refused must not depend on the order a rule lists its predicates in.
        let mut holds = true;
        let mut first_false = None;
        for p in &rule.when {
            let h = p.holds(ctx).map_err(|why| stop(&p.source, why))?;
            if !h && first_false.is_none() {
                first_false = Some(p);
            }
            holds &= h;
        }
        if !holds {
            if let Some(p) = first_false {
                skipped(trace, &|| p.why_not(ctx));
            }
            continue;
        }
        // The check will read these: refuse now rather than check on a guess.
        for src in rule.template_sources() {
            ctx.read(src, None).map_err(|why| stop(src, why))?;
        }
        record(trace, || Event::RuleMatched {
            rule: rule.name.clone(),
            shadow: rule.shadow,
            params: ctx.params.clone(),
        });
        return Ok(Some(rule));
    }
    ctx.params.clear();
    Ok(None)
}

fn compile_rule(
    key: &str,
    rc: &RuleConfig,
    default_consistency: Consistency,
    has_openfga: bool,
) -> Result<Rule, ConfigError> {
    let path = PathPattern::parse(&format!("{key}.path"), &rc.path)?;
    let name = rc.name.clone().unwrap_or_else(|| {
        let m = if rc.methods.is_empty() {
            "*".to_string()
        } else {
            rc.methods.join(",")
        };
        format!("{m} {}", rc.path)
    });
    let mut methods = Vec::new();
    for (j, m) in rc.methods.iter().enumerate() {
        let up = m.to_ascii_uppercase();
        if up.is_empty() || !up.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ConfigError::invalid(
                format!("{key}.methods[{j}]"),
                format!("{m:?} is not an HTTP method"),
            ));
        }
        methods.push(up);
    }
    let mut when = Vec::new();
    for (j, w) in rc.when.iter().enumerate() {
        let p =
            Predicate::parse(w).map_err(|m| ConfigError::invalid(format!("{key}.when[{j}]"), m))?;
        check_params(
            &format!("{key}.when[{j}]"),
            std::iter::once(&p.source),
            &path,
        )?;
        when.push(p);
    }
    if rc.public && (!rc.roles.is_empty() || !rc.scopes.is_empty() || rc.check.is_some()) {
        return Err(ConfigError::invalid(
            format!("{key}.public"),
            "a public rule cannot also require roles, scopes or checks",
        ));
    }
    let check = match &rc.check {
        None => None,
        Some(c) => {
            let (list, all, list_key) = match (c.all.is_empty(), c.any.is_empty()) {
                (false, true) => (&c.all, true, "all"),
                (true, false) => (&c.any, false, "any"),
                (true, true) => {
                    return Err(ConfigError::invalid(
                        format!("{key}.check"),
                        "needs a non-empty all: or any: list",
                    ));
                }
                (false, false) => {
                    return Err(ConfigError::invalid(
                        format!("{key}.check"),
                        "use all: or any:, not both",
                    ));
                }
            };
            if !has_openfga {
                return Err(ConfigError::invalid(
                    format!("{key}.check"),
                    "relationship checks need OpenFGA: set OPENFGA_API_URL and OPENFGA_STORE_ID (or an openfga: section)",
                ));
            }
            let mut checks = Vec::new();
            for (j, rel) in list.iter().enumerate() {
                let ck = format!("{key}.check.{list_key}[{j}]");
                checks.push(compile_relation(&ck, rel, &path)?);
            }
            Some(CompiledCheck {
                checks,
                all,
                consistency: c.consistency.unwrap_or(default_consistency),
                on_backend_error: c.on_backend_error,
            })
        }
    };
    Ok(Rule {
        name,
        hosts: rc.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        path,
        methods,
        when,
        public: rc.public,
        roles: rc.roles.clone(),
        roles_match: rc.roles_match,
        scopes: rc.scopes.clone(),
        check,
        shadow: rc.mode == RuleMode::Shadow,
    })
}

fn compile_relation(
    key: &str,
    rel: &RelationCheckConfig,
    path: &PathPattern,
) -> Result<RelationTemplate, ConfigError> {
    if rel.relation.is_empty()
        || !rel
            .relation
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(ConfigError::invalid(
            format!("{key}.relation"),
            format!("{:?} is not a relation name", rel.relation),
        ));
    }
    let object = Template::parse(&rel.object)
        .map_err(|m| ConfigError::invalid(format!("{key}.object"), m))?;
    if object.type_prefix().is_none() {
        return Err(ConfigError::invalid(
            format!("{key}.object"),
            format!(
                "{:?} must start with a type, like tool:{{tool}}",
                rel.object
            ),
        ));
    }
    check_params(&format!("{key}.object"), object.sources(), path)?;
    let user = match &rel.user {
        None => None,
        Some(u) => {
            let t =
                Template::parse(u).map_err(|m| ConfigError::invalid(format!("{key}.user"), m))?;
            check_params(&format!("{key}.user"), t.sources(), path)?;
            Some(t)
        }
    };
    Ok(RelationTemplate {
        relation: rel.relation.clone(),
        object,
        user,
        key: key.to_string(),
    })
}

fn check_params<'s>(
    key: &str,
    sources: impl Iterator<Item = &'s Source>,
    path: &PathPattern,
) -> Result<(), ConfigError> {
    for s in sources {
        if let Source::Param(n) = s
            && !path.params().any(|p| p == n)
        {
            return Err(ConfigError::invalid(
                key,
                format!("{{{n}}} is not a parameter of path {}", path.raw),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::{AuthMethod, PrincipalKind};

    fn rules(yaml: &str) -> Result<RuleSet, ConfigError> {
        let cfg: crate::config::RawRoutes = serde_yaml_ng::from_str(yaml).unwrap();
        RuleSet::compile(
            &RoutesConfig {
                unmatched: Unmatched::Deny,
                rules: cfg.rules,
                dry_run: false,
            },
            Some(&crate::config::test_openfga_config()),
        )
    }

    fn find<'r>(rs: &'r RuleSet, input: &CheckInput) -> Option<(&'r str, Vec<(String, String)>)> {
        let part = routed(rs, input);
        Some((part.rule?.name.as_str(), part.ctx.params))
    }

    /// The one part of a request that is not a batch.
    fn routed<'r, 'a>(rs: &'r RuleSet, input: &'a CheckInput) -> Routed<'r, 'a> {
        let route = rs.route(input).unwrap_or_else(|e| panic!("refused: {e:?}"));
        assert!(!route.batch);
        route.parts.into_iter().next().unwrap()
    }

    /// The rule names the parts of a request were routed to, or the refusal's text.
    fn outcome(rs: &RuleSet, input: &CheckInput) -> Result<Vec<String>, String> {
        match rs.route(input) {
            Ok(route) => Ok(route
                .parts
                .iter()
                .map(|p| p.rule.map_or("-".to_string(), |r| r.name.clone()))
                .collect()),
            Err((None, refusal)) => Err(refusal.to_string()),
            Err((Some(i), refusal)) => Err(format!("element {i}: {refusal}")),
        }
    }

    #[test]
    fn path_patterns() {
        let p = PathPattern::parse("k", "/tools/{tool}/execute").unwrap();
        assert_eq!(
            p.matches("/tools/chat/execute"),
            Some(vec![("tool".into(), "chat".into())])
        );
        assert_eq!(p.matches("/tools//execute"), None);
        assert_eq!(p.matches("/tools/chat/execute/x"), None);
        assert_eq!(p.matches("/tools/chat"), None);
        let p = PathPattern::parse("k", "/a/*/{b}").unwrap();
        assert_eq!(p.matches("/a/x/y"), Some(vec![("b".into(), "y".into())]));
        assert_eq!(p.matches("/a//y"), None);
        assert_eq!(p.matches("/a/x/"), None);
        let p = PathPattern::parse("k", "/").unwrap();
        assert!(p.matches("/").is_some() && p.matches("/a").is_none());
        let p = PathPattern::parse("k", "/public/**").unwrap();
        assert!(p.matches("/public").is_some());
        assert!(p.matches("/public/a/b").is_some());
        assert!(p.matches("/publicity").is_none());
        let p = PathPattern::parse("k", "/exact").unwrap();
        assert!(p.matches("/exact").is_some() && p.matches("/exact/").is_none());
        for bad in ["nope", "/a/**/b", "/a{b}", "/{}", "/{a-b}"] {
            assert!(PathPattern::parse("k", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn first_match_with_methods_hosts_and_body() {
        let rs = rules(
            r#"
rules:
  - { name: call, path: /message, methods: [POST], when: ["body:/method == tools/call"] }
  - { name: msg, path: /message, methods: [post] }
  - { name: host, path: /x, hosts: ["*.example.com"] }
  - { name: any, path: /** }
"#,
        )
        .unwrap();
        let call = CheckInput::http("POST", "/message")
            .unwrap()
            .with_body(br#"{"method":"tools/call","params":{"name":"x"}}"#);
        assert_eq!(find(&rs, &call).unwrap().0, "call");
        let list = CheckInput::http("POST", "/message")
            .unwrap()
            .with_body(br#"{"method":"tools/list"}"#);
        assert_eq!(find(&rs, &list).unwrap().0, "msg");
        let garbage = CheckInput::http("POST", "/message")
            .unwrap()
            .with_body(b"{not json");
        assert!(
            outcome(&rs, &garbage)
                .unwrap_err()
                .starts_with("request body is not strict JSON: key must be a string")
        );
        let mut h = CheckInput::http("GET", "/x").unwrap();
        h.host = "api.example.com".into();
        assert_eq!(find(&rs, &h).unwrap().0, "host");
        h.host = "example.com".into();
        assert_eq!(find(&rs, &h).unwrap().0, "any");
    }

    #[test]
    fn templates_render_and_refuse_missing_parts() {
        let rs = rules(
            r#"
rules:
  - name: exec
    path: /tools/{tool}/execute
    check: { all: [ { relation: executor, object: "tool:{tool}" }, { relation: viewer, object: "conversation:{query:thread}" } ] }
  - name: mcp
    path: /message
    check: { any: [ { relation: executor, object: "tool:{body:/params/name}" } ] }
"#,
        )
        .unwrap();
        let alice = Principal::new(PrincipalKind::User, "alice", AuthMethod::Jwt);
        let input = CheckInput::http("POST", "/tools/chat/execute?thread=t1").unwrap();
        let Routed { ctx, rule } = routed(&rs, &input);
        let checks = &rule.unwrap().check.as_ref().unwrap().checks;
        let t = checks[0].render(&alice, &ctx).unwrap();
        assert_eq!(t.to_string(), "user:alice executor tool:chat");
        assert_eq!(
            checks[1].render(&alice, &ctx).unwrap().object,
            "conversation:t1"
        );

        let input = CheckInput::http("POST", "/message")
            .unwrap()
            .with_body(br#"{"params":{}}"#);
        let Routed { ctx, rule } = routed(&rs, &input);
        let e = rule.unwrap().check.as_ref().unwrap().checks[0]
            .render(&alice, &ctx)
            .unwrap_err();
        assert_eq!(
            e,
            "cannot build tool:{body:/params/name}: body field /params/name missing"
        );
        let input = CheckInput::http("POST", "/message")
            .unwrap()
            .with_body(br#"{"params":{"name":"a#b"}}"#);
        let Routed { ctx, rule } = routed(&rs, &input);
        assert!(
            rule.unwrap().check.as_ref().unwrap().checks[0]
                .render(&alice, &ctx)
                .is_err()
        );
    }

    /// The MCP rules of deploy/local/sidecar-openfga.yaml, and a catch-all that only
    /// authenticates: the weaker rule a refused body must never fall through to.
    const MCP: &str = r#"
rules:
  - name: mcp-tools-call
    path: /message
    methods: [POST]
    when: ["body:/method == tools/call"]
    check: { all: [ { relation: executor, object: "tool:{body:/params/name}" } ] }
  - { name: mcp-other, path: /message, methods: [POST] }
  - { name: api, path: "/**" }
"#;

    fn post(body: &[u8]) -> CheckInput {
        CheckInput::http("POST", "/message")
            .unwrap()
            .with_body(body)
    }

    #[test]
    fn a_body_rule_refuses_a_body_it_cannot_read_strictly() {
        let rs = rules(MCP).unwrap();
        let call =
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"agent_chat"}}"#;
        let with_bom = [b"\xef\xbb\xbf".as_slice(), call].concat();
        let deep = format!(
            r#"{{"method":"tools/call","params":{{"name":"agent_chat"}},"x":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let reads_method = "(rule mcp-tools-call reads body field /method)";
        for (what, input, want) in [
            (
                "a tools/call goes to the rule that checks the tool",
                post(call),
                Ok("mcp-tools-call"),
            ),
            (
                "another method goes to the next rule",
                post(br#"{"method":"tools/list"}"#),
                Ok("mcp-other"),
            ),
            (
                "a side field may hold any finite number",
                post(br#"{"method":"ping","x":1.5e300}"#),
                Ok("mcp-other"),
            ),
            (
                "a GET never reads the body",
                CheckInput::http("GET", "/message").unwrap(),
                Ok("api"),
            ),
            (
                "a byte order mark is refused",
                post(&with_bom),
                Err("request body starts with a byte order mark"),
            ),
            (
                "NaN is refused",
                post(br#"{"method":"tools/call","params":{"name":"agent_chat"},"x":NaN}"#),
                Err("request body is not strict JSON: expected value"),
            ),
            (
                "1e400 is refused",
                post(br#"{"method":"tools/call","params":{"name":"agent_chat"},"x":1e400}"#),
                Err("request body is not strict JSON: number out of range"),
            ),
            (
                "nesting deeper than 128 is refused",
                post(deep.as_bytes()),
                Err("request body is not strict JSON: recursion limit exceeded"),
            ),
            (
                "a duplicate key is refused",
                post(br#"{"method":"ping","method":"tools/call","params":{"name":"agent_chat"}}"#),
                Err("request body is not strict JSON: duplicate key \"method\""),
            ),
            (
                "an escaped duplicate key is refused",
                post(br#"{"method":"ping","m\u0065thod":"tools/call"}"#),
                Err(
                    "request body is not strict JSON: duplicate key \"method\" at line 1 column 30",
                ),
            ),
            (
                "trailing text is refused",
                post(br#"{"method":"ping"} {"method":"tools/call"}"#),
                Err("request body is not strict JSON: trailing characters"),
            ),
            (
                "bytes that are not UTF-8 are refused",
                post(b"{\"method\":\"tools/call\",\"x\":\"\xff\"}"),
                Err("request body is not UTF-8"),
            ),
            (
                "no body is refused",
                CheckInput::http("POST", "/message").unwrap(),
                Err("no request body reached the authorizer"),
            ),
            (
                "a body Envoy did not send is refused",
                CheckInput::http("POST", "/message")
                    .unwrap()
                    .with_header("content-length", "120"),
                Err(
                    "request body was not sent to the authorizer (content-length 120): Envoy's ext_authz needs with_request_body",
                ),
            ),
            (
                "a chunked body Envoy did not send is refused",
                CheckInput::http("POST", "/message")
                    .unwrap()
                    .with_header("transfer-encoding", "chunked"),
                Err("request body was not sent to the authorizer (transfer-encoding)"),
            ),
            (
                "a body Envoy cut is refused",
                post(call).with_header(PARTIAL_BODY_HEADER, "true"),
                Err(
                    "request body was cut at Envoy's max_request_bytes (x-envoy-auth-partial-body: true)",
                ),
            ),
            (
                "a whole body Envoy says so of is read",
                post(call).with_header(PARTIAL_BODY_HEADER, "false"),
                Ok("mcp-tools-call"),
            ),
            (
                "a body shorter than its content-length is refused",
                post(call).with_header("content-length", "4096"),
                Err("request body is 77 bytes but content-length says 4096"),
            ),
            (
                "a compressed body is refused",
                post(call).with_header("content-encoding", "gzip"),
                Err("request body is content-encoded (gzip)"),
            ),
            (
                "a fractional number the check reads is refused",
                post(br#"{"method":"tools/call","params":{"name":1.0}}"#),
                Err("body field /params/name is a fractional or out-of-range number"),
            ),
            (
                "an integer the check reads is read",
                post(br#"{"method":"tools/call","params":{"name":42}}"#),
                Ok("mcp-tools-call"),
            ),
        ] {
            let got = outcome(&rs, &input);
            match want {
                Ok(rule) => assert_eq!(got, Ok(vec![rule.to_string()]), "{what}"),
                Err(text) => {
                    let e = got.expect_err(what);
                    assert!(e.starts_with(text), "{what}: {e}");
                    assert!(
                        e.ends_with(reads_method)
                            || e.ends_with("(rule mcp-tools-call reads body field /params/name)"),
                        "{what}: the refusal names the rule and what it reads: {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_batch_is_routed_element_by_element() {
        let rs = rules(MCP).unwrap();
        for (what, body, want) in [
            (
                "each element goes to its own rule",
                r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"agent_chat"}},{"jsonrpc":"2.0","id":2,"method":"tools/list"}]"#,
                Ok(vec!["mcp-tools-call", "mcp-other"]),
            ),
            (
                "a batch of one is a batch",
                r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"agent_chat"}}]"#,
                Ok(vec!["mcp-tools-call"]),
            ),
            (
                "an empty batch is refused",
                "[]",
                Err("JSON-RPC batch is empty (rule mcp-tools-call reads body field /method)"),
            ),
            (
                "an element that is not an object is refused",
                r#"[{"method":"tools/list"},"tools/call"]"#,
                Err("JSON-RPC batch element 1 is not an object"),
            ),
            (
                "a nested batch is refused",
                r#"[[{"method":"tools/call"}]]"#,
                Err("JSON-RPC batch element 0 is not an object"),
            ),
            (
                "an element the check cannot read is refused, naming it",
                r#"[{"method":"tools/list"},{"method":"tools/call","params":{"name":2.5}}]"#,
                Err("element 1: body field /params/name is a fractional or out-of-range number"),
            ),
            (
                "a duplicate key inside an element is refused",
                r#"[{"method":"tools/list"},{"method":"ping","method":"tools/call"}]"#,
                Err("request body is not strict JSON: duplicate key \"method\""),
            ),
        ] {
            let input = post(body.as_bytes());
            match (want, outcome(&rs, &input)) {
                (Ok(want), Ok(got)) => {
                    assert_eq!(got, want, "{what}");
                    assert!(rs.route(&input).ok().unwrap().batch, "{what}");
                }
                (Err(want), Err(got)) => assert!(got.starts_with(want), "{what}: {got}"),
                (want, got) => panic!("{what}: want {want:?}, got {got:?}"),
            }
        }
        // Elements are read as the body: the check of element 0 names its own tool.
        let input = post(br#"[{"method":"tools/call","params":{"name":"a"}},{"method":"tools/call","params":{"name":"b"}}]"#);
        let route = rs.route(&input).ok().unwrap();
        let alice = Principal::new(PrincipalKind::User, "alice", AuthMethod::Jwt);
        let tools: Vec<String> = route
            .parts
            .iter()
            .map(|p| {
                p.rule.unwrap().check.as_ref().unwrap().checks[0]
                    .render(&alice, &p.ctx)
                    .unwrap()
                    .object
            })
            .collect();
        assert_eq!(tools, ["tool:a", "tool:b"]);
        assert!(route.parts.iter().all(|p| p.ctx.is_batch_element()));
    }

    #[test]
    fn a_query_or_header_a_rule_reads_must_be_there_once() {
        let rs = rules(
            r#"
rules:
  - name: by-query
    path: /search
    check: { all: [ { relation: viewer, object: "conversation:{query:thread}" } ] }
  - { name: by-header, path: /org, when: ["header:x-tenant == acme"] }
  - { name: api, path: "/**" }
"#,
        )
        .unwrap();
        let get = |pq: &str| CheckInput::http("GET", pq).unwrap();
        let org = |values: &[&[u8]]| {
            let mut input = get("/org");
            for v in values {
                input
                    .headers
                    .insert("x-tenant", bytes::Bytes::copy_from_slice(v));
            }
            input
        };
        for (what, input, want) in [
            (
                "a parameter given once is read",
                get("/search?thread=c1"),
                Ok("by-query"),
            ),
            (
                "an absent parameter is not ambiguous",
                get("/search"),
                Ok("by-query"),
            ),
            (
                "other parameters may repeat",
                get("/search?thread=c1&tag=a&tag=b"),
                Ok("by-query"),
            ),
            (
                "another parameter's bad encoding is not read",
                get("/search?q=%zz&thread=c1"),
                Ok("by-query"),
            ),
            (
                "a repeated parameter is refused",
                get("/search?thread=c1&thread=c2"),
                Err(
                    "query parameter thread appears more than once (rule by-query reads query parameter thread)",
                ),
            ),
            (
                "an encoded repeat is a repeat",
                get("/search?thread=c1&th%72ead=c2"),
                Err("query parameter thread appears more than once"),
            ),
            (
                "a bad escape in the value is refused",
                get("/search?thread=c1%zz"),
                Err("query has bad percent-encoding in \"c1%zz\""),
            ),
            (
                "a value that is not UTF-8 is refused",
                get("/search?thread=%ff"),
                Err("query has bad percent-encoding in \"%ff\""),
            ),
            (
                "a bad escape in any key is refused",
                get("/search?thr%zzead=c1&thread=c2"),
                Err("query has bad percent-encoding in \"thr%zzead\""),
            ),
            (
                "a ';' separator is refused",
                get("/search?thread=c1;thread=c2"),
                Err("query contains ';'"),
            ),
            (
                "a header given once is read",
                org(&[b"acme"]),
                Ok("by-header"),
            ),
            ("another value falls through", org(&[b"other"]), Ok("api")),
            ("an absent header falls through", org(&[]), Ok("api")),
            (
                "a repeated header is refused",
                org(&[b"other", b"acme"]),
                Err(
                    "header x-tenant appears more than once (rule by-header reads header x-tenant)",
                ),
            ),
            (
                "a header Envoy joined is refused",
                org(&[b"other,acme"]),
                Err("header x-tenant holds a ','"),
            ),
            (
                "a header that is not UTF-8 is refused",
                org(&[b"acme\xff"]),
                Err("header x-tenant is not valid UTF-8"),
            ),
        ] {
            match (want, outcome(&rs, &input)) {
                (Ok(want), Ok(got)) => assert_eq!(got, [want], "{what}"),
                (Err(want), Err(got)) => assert!(got.starts_with(want), "{what}: {got}"),
                (want, got) => panic!("{what}: want {want:?}, got {got:?}"),
            }
        }
        let input = get("/search?thread=a+b%2Bc");
        let Routed { ctx, .. } = routed(&rs, &input);
        assert_eq!(
            ctx.read(&Source::Query("thread".into()), None)
                .ok()
                .flatten()
                .as_deref(),
            Some("a b+c")
        );
    }

    #[test]
    fn every_predicate_of_a_rule_that_could_match_is_read() {
        // The header predicate is false, but whether a request is refused must not depend
        // on which predicate is listed first.
        let rs = rules(
            r#"
rules:
  - { name: rpc, path: /rpc, when: ["header:x-kind == rpc", "body:/method == tools/call"] }
  - { name: api, path: "/**" }
"#,
        )
        .unwrap();
        let e = outcome(&rs, &CheckInput::http("POST", "/rpc").unwrap()).unwrap_err();
        assert_eq!(
            e,
            "no request body reached the authorizer (none was sent, or Envoy's ext_authz lacks with_request_body) (rule rpc reads body field /method)"
        );
        let input = CheckInput::http("POST", "/rpc")
            .unwrap()
            .with_body(br#"{"method":"tools/call"}"#);
        assert_eq!(outcome(&rs, &input), Ok(vec!["api".to_string()]));
    }

    #[test]
    fn a_shadow_rule_is_never_routed_to_but_is_tried_on_its_own_and_checked_like_any_rule() {
        let rs = rules(
            r#"
rules:
  - name: tools-by-relation
    mode: shadow
    path: "/tools/{tool}"
    check: { all: [ { relation: executor, object: "tool:{tool}" } ] }
  - { name: tools, path: "/tools/{tool}", mode: enforce }
"#,
        )
        .unwrap();
        let input = CheckInput::http("GET", "/tools/shell").unwrap();
        assert_eq!(outcome(&rs, &input), Ok(vec!["tools".to_string()]));
        let shadow = &rs.shadow_rules()[0];
        let route = RuleSet::route_shadow(shadow, &input, None).ok().unwrap();
        assert_eq!(
            route.parts[0].rule.map(|r| r.name.as_str()),
            Some("tools-by-relation")
        );
        assert_eq!(route.parts[0].ctx.params, [("tool".into(), "shell".into())]);
        let elsewhere = CheckInput::http("GET", "/admin").unwrap();
        let route = RuleSet::route_shadow(shadow, &elsewhere, None)
            .ok()
            .unwrap();
        assert!(route.parts[0].rule.is_none(), "no match is no part");
        // Validated against the model like any rule, and names are shared across modes.
        assert_eq!(rs.relation_refs()[0].rule, "tools-by-relation");
        let e = rules("rules: [ { name: x, path: /a, mode: shadow }, { name: x, path: /b } ]")
            .unwrap_err();
        assert!(e.to_string().contains("routes.rules[1].name"), "{e}");
    }

    #[test]
    fn config_errors_name_the_key() {
        for (yaml, want) in [
            (
                "rules: [ { path: '/t/{tool}', check: { all: [ { relation: r, object: 'tool:{tol}' } ] } } ]",
                "routes.rules[0].check.all[0].object",
            ),
            (
                "rules: [ { path: /t, check: {} } ]",
                "routes.rules[0].check",
            ),
            (
                "rules: [ { path: /t, when: ['body:/a ~ b'] } ]",
                "routes.rules[0].when[0]",
            ),
            (
                "rules: [ { path: /t, public: true, roles: [admin] } ]",
                "routes.rules[0].public",
            ),
            ("rules: [ { path: t } ]", "routes.rules[0].path"),
            (
                "rules: [ { path: /a, name: x }, { path: /b, name: x } ]",
                "routes.rules[1].name",
            ),
            (
                "rules: [ { path: /t, check: { all: [ { relation: r, object: '{tool}' } ] } } ]",
                "must start with a type",
            ),
        ] {
            let e = rules(yaml).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should contain {want}");
        }
    }
}
