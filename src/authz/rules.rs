//! Route rules: which rule governs a request (host, path pattern, method, predicates on query,
//! headers and JSON body) and what it demands (public, roles, scopes, relationship checks
//! built from templates).
//!
//! Rules compile once at startup; every mistake in them (an unknown path parameter in a
//! template, a bad predicate, an empty check) is a config error naming its key.

use std::sync::OnceLock;

use serde_json::Value;

use super::RelationRef;
use super::TupleKey;
use crate::authn::Principal;
use crate::config::{
    ConfigError, Consistency, Match, OnBackendError, OpenFgaConfig, RelationCheckConfig,
    RoutesConfig, RuleConfig, Unmatched,
};
use crate::request::CheckInput;

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

    /// Matches a normalised path; returns the captured parameters.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let parts: Vec<&str> = path[1.min(path.len())..].split('/').collect();
        let mut params = Vec::new();
        for (i, seg) in self.segments.iter().enumerate() {
            match seg {
                Segment::Rest => return Some(params),
                _ if i >= parts.len() => return None,
                Segment::Lit(l) if l == parts[i] => {}
                Segment::Lit(_) => return None,
                Segment::Star if !parts[i].is_empty() => {}
                Segment::Param(n) if !parts[i].is_empty() => {
                    params.push((n.clone(), parts[i].to_string()));
                }
                _ => return None,
            }
        }
        (parts.len() == self.segments.len()).then_some(params)
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

/// Per-request values the sources read; the JSON body is parsed at most once.
pub struct EvalContext<'a> {
    pub input: &'a CheckInput,
    pub params: Vec<(String, String)>,
    body: OnceLock<Option<Value>>,
}

impl<'a> EvalContext<'a> {
    pub fn new(input: &'a CheckInput) -> Self {
        Self {
            input,
            params: Vec::new(),
            body: OnceLock::new(),
        }
    }

    fn body(&self) -> Option<&Value> {
        self.body
            .get_or_init(|| {
                self.input
                    .body
                    .as_ref()
                    .and_then(|b| serde_json::from_slice(b).ok())
            })
            .as_ref()
    }

    fn value(&self, src: &Source, principal: Option<&Principal>) -> Option<String> {
        match src {
            Source::Param(n) => self
                .params
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone()),
            Source::Query(n) => self.input.query_param(n).map(String::from),
            Source::Header(n) => self.input.headers.first(n).map(String::from),
            Source::Context(n) => self.input.context_extensions.get(n).cloned(),
            Source::Body(p) => match self.body()?.pointer(p)? {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                _ => None,
            },
            Source::Subject => principal.map(|p| p.subject.clone()),
            Source::PrincipalId => principal.map(|p| p.id.clone()),
            Source::PrincipalType => principal.map(|p| p.kind.as_str().to_string()),
        }
    }
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
        })
    }

    fn holds(&self, ctx: &EvalContext<'_>) -> bool {
        let v = ctx.value(&self.source, None);
        match &self.op {
            Op::Eq(want) => v.as_deref() == Some(want),
            Op::Ne(want) => v.as_deref() != Some(want),
            Op::Exists => v.is_some(),
        }
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
                    let v = ctx
                        .value(src, principal)
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| {
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
}

impl Rule {
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

/// The ordered rules; the first match wins.
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<Rule>,
    pub unmatched: Unmatched,
}

impl RuleSet {
    pub fn compile(
        cfg: &RoutesConfig,
        openfga: Option<&OpenFgaConfig>,
    ) -> Result<Self, ConfigError> {
        let default_consistency = openfga.map(|o| o.consistency).unwrap_or_default();
        let mut rules = Vec::with_capacity(cfg.rules.len());
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
            rules.push(rule);
        }
        Ok(Self {
            rules,
            unmatched: cfg.unmatched,
        })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The first rule that matches, with the path parameters it captured in `ctx`.
    pub fn find<'r>(&'r self, ctx: &mut EvalContext<'_>) -> Option<&'r Rule> {
        let input = ctx.input;
        for rule in &self.rules {
            if !rule.host_matches(&input.host) {
                continue;
            }
            if !rule.methods.is_empty() && !rule.methods.contains(&input.method) {
                continue;
            }
            let Some(params) = rule.path.matches(&input.path) else {
                continue;
            };
            ctx.params = params;
            if rule.when.iter().all(|p| p.holds(ctx)) {
                return Some(rule);
            }
        }
        ctx.params.clear();
        None
    }

    /// Every relationship a rule may ask about, for validation against the OpenFGA model.
    pub fn relation_refs(&self) -> Vec<RelationRef> {
        let mut out = Vec::new();
        for rule in &self.rules {
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
        self.rules.iter().any(|r| r.check.is_some())
    }
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
            },
            Some(&test_openfga()),
        )
    }

    fn test_openfga() -> OpenFgaConfig {
        let env: std::collections::BTreeMap<String, String> = [
            ("OPENFGA_API_URL", "http://127.0.0.1:1"),
            ("OPENFGA_STORE_ID", "s"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        crate::config::Config::from_yaml("jwt: { jwks_file: k }", std::path::Path::new("/"), &env)
            .unwrap()
            .openfga
            .unwrap()
    }

    fn find<'r>(rs: &'r RuleSet, input: &CheckInput) -> Option<(&'r str, Vec<(String, String)>)> {
        let mut ctx = EvalContext::new(input);
        let r = rs.find(&mut ctx)?;
        Some((r.name.as_str(), ctx.params))
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
        assert_eq!(find(&rs, &garbage).unwrap().0, "msg");
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
        let mut ctx = EvalContext::new(&input);
        let rule = rs.find(&mut ctx).unwrap();
        let checks = &rule.check.as_ref().unwrap().checks;
        let t = checks[0].render(&alice, &ctx).unwrap();
        assert_eq!(t.to_string(), "user:alice executor tool:chat");
        assert_eq!(
            checks[1].render(&alice, &ctx).unwrap().object,
            "conversation:t1"
        );

        let input = CheckInput::http("POST", "/message")
            .unwrap()
            .with_body(br#"{"params":{}}"#);
        let mut ctx = EvalContext::new(&input);
        let rule = rs.find(&mut ctx).unwrap();
        let e = rule.check.as_ref().unwrap().checks[0]
            .render(&alice, &ctx)
            .unwrap_err();
        assert_eq!(
            e,
            "cannot build tool:{body:/params/name}: body field /params/name missing"
        );
        let input = CheckInput::http("POST", "/message")
            .unwrap()
            .with_body(br#"{"params":{"name":"a#b"}}"#);
        let mut ctx = EvalContext::new(&input);
        let rule = rs.find(&mut ctx).unwrap();
        assert!(
            rule.check.as_ref().unwrap().checks[0]
                .render(&alice, &ctx)
                .is_err()
        );
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
