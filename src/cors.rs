//! CORS: preflights from allowed origins are answered without credentials (browsers never
//! send them on a preflight) by the sidecar itself, so a preflight never reaches the app;
//! preflights from other origins are refused, and answers to an allowed origin carry
//! `Access-Control-Allow-Origin` so the browser lets the page read a 401 body.

use std::collections::HashSet;

use crate::config::CorsConfig;
use crate::request::CheckInput;

#[derive(Debug, Clone, Default)]
pub struct Cors {
    origins: HashSet<String>,
    methods: String,
    headers: String,
    max_age: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Preflight {
    /// Not a preflight: authenticate as usual.
    No,
    /// Answer it here (never forwarded) with these headers.
    Allowed(Vec<(String, String)>),
    Refused(String),
}

/// [`Cors::consult`]'s answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Consulted {
    /// An allowed preflight: answered here with these headers, never forwarded.
    Preflight(Vec<(String, String)>),
    /// A preflight from this origin, which is not allowed.
    Refused(String),
    /// Not a preflight: these headers go on the answer, allow or deny.
    Headers(Vec<(String, String)>),
}

impl Cors {
    pub fn new(cfg: &CorsConfig) -> Self {
        Self {
            origins: cfg.allowed_origins.iter().cloned().collect(),
            methods: cfg.allowed_methods.join(", "),
            headers: cfg.allowed_headers.join(", "),
            max_age: cfg.max_age.to_string(),
        }
    }

    pub fn preflight(&self, input: &CheckInput) -> Preflight {
        if input.method != "OPTIONS" || !input.headers.contains("access-control-request-method") {
            return Preflight::No;
        }
        let Some(origin) = input.headers.first("origin") else {
            return Preflight::No;
        };
        if !self.origins.contains(origin) {
            return Preflight::Refused(origin.chars().take(200).collect());
        }
        let mut h = self.origin_headers(origin);
        h.push(("access-control-allow-methods".into(), self.methods.clone()));
        h.push(("access-control-allow-headers".into(), self.headers.clone()));
        h.push(("access-control-max-age".into(), self.max_age.clone()));
        Preflight::Allowed(h)
    }

    /// What CORS says about one check, read once: answer a preflight here, refuse it, or
    /// carry these headers (empty for no or another origin) on whatever the check answers.
    pub fn consult(&self, input: &CheckInput) -> Consulted {
        match self.preflight(input) {
            Preflight::Allowed(headers) => Consulted::Preflight(headers),
            Preflight::Refused(origin) => Consulted::Refused(origin),
            Preflight::No => Consulted::Headers(self.response_headers(input)),
        }
    }

    /// Headers for any answer to an allowed origin.
    pub fn response_headers(&self, input: &CheckInput) -> Vec<(String, String)> {
        match input.headers.first("origin") {
            Some(o) if self.origins.contains(o) => self.origin_headers(o),
            _ => Vec::new(),
        }
    }

    fn origin_headers(&self, origin: &str) -> Vec<(String, String)> {
        vec![
            ("access-control-allow-origin".into(), origin.to_string()),
            ("access-control-allow-credentials".into(), "true".into()),
            ("vary".into(), "Origin".into()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors() -> Cors {
        Cors::new(&CorsConfig {
            allowed_origins: vec!["http://localhost:3000".into()],
            allowed_methods: vec!["GET".into(), "POST".into()],
            allowed_headers: vec!["authorization".into()],
            max_age: 600,
        })
    }

    #[test]
    fn preflights() {
        let pre = |origin: &str| {
            CheckInput::http("OPTIONS", "/api/x")
                .unwrap()
                .with_header("origin", origin)
                .with_header("access-control-request-method", "POST")
        };
        match cors().preflight(&pre("http://localhost:3000")) {
            Preflight::Allowed(h) => {
                assert!(h.contains(&(
                    "access-control-allow-origin".into(),
                    "http://localhost:3000".into()
                )))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            cors().preflight(&pre("https://evil.example")),
            Preflight::Refused("https://evil.example".into())
        );
        let plain = CheckInput::http("OPTIONS", "/api/x").unwrap();
        assert_eq!(cors().preflight(&plain), Preflight::No);
    }
}
