//! `authz-sidecar token inspect`: what a bearer token says, without `base64 -d | jq`.
//!
//! Decoding is for display only and trusts nothing: header and claims are shown as written,
//! the signature only by its length (it is the one part that could be replayed into a forged
//! token elsewhere, and nobody debugs by reading it). Verification is never done here by hand:
//! with `--config` the token goes through the same [`JwtVerifier`], key source and principal
//! admission the server uses, so the failure printed is the one a request would get.

use std::io::{IsTerminal, Read};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use crate::authn::jwks::{JwksKeySource, KeySource};
use crate::authn::jwt::JwtVerifier;
use crate::authn::principals::Principals;
use crate::clock::{now_secs, system_clock};
use crate::config::{Config, KeySourceConfig};
use crate::console::say;

/// More than any token a header could carry; stdin is read no further.
const MAX_STDIN_BYTES: u64 = 1024 * 1024;

/// The time claims shown as dates, in the order a reader wants them.
const TIME_CLAIMS: [&str; 4] = ["iat", "auth_time", "nbf", "exp"];

/// A token split into its parts; nothing in it is verified.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
    /// Length of the signature segment as sent (base64url characters).
    pub signature_chars: usize,
    /// Its decoded length, when it is base64url at all.
    pub signature_bytes: Option<usize>,
}

/// Why a token cannot even be decoded. One line each, naming the part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("no token given")]
    Empty,
    #[error(
        "expected 3 dot-separated parts (header.payload.signature), got {got}{jwe}",
        jwe = if *.got == 5 { ": an encrypted token (JWE) cannot be inspected" } else { "" }
    )]
    Parts { got: usize },
    #[error("{part} is not base64url: {why}")]
    Base64 { part: &'static str, why: String },
    #[error("{part} is not JSON: {why}")]
    Json { part: &'static str, why: String },
    #[error("{part} is JSON but not an object")]
    NotObject { part: &'static str },
}

fn base64_why(e: base64::DecodeError) -> String {
    match e {
        base64::DecodeError::InvalidByte(at, b) => {
            format!("invalid character {:?} at offset {at}", b as char)
        }
        base64::DecodeError::InvalidLength(n) => format!("impossible length {n}"),
        base64::DecodeError::InvalidLastSymbol(at, b) => {
            format!("invalid last character {:?} at offset {at}", b as char)
        }
        base64::DecodeError::InvalidPadding => "invalid padding".into(),
    }
}

fn b64(part: &'static str, text: &str) -> Result<Vec<u8>, DecodeError> {
    // The verifier tolerates trailing padding; so does the display, or the two would disagree.
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|e| DecodeError::Base64 {
            part,
            why: base64_why(e),
        })
}

fn json_object(part: &'static str, text: &str) -> Result<Map<String, Value>, DecodeError> {
    let bytes = b64(part, text)?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(DecodeError::NotObject { part }),
        Err(e) => Err(DecodeError::Json {
            part,
            why: e.to_string(),
        }),
    }
}

/// Splits and decodes a compact JWS. No key, no clock: for display only.
pub fn decode(token: &str) -> Result<Decoded, DecodeError> {
    if token.is_empty() {
        return Err(DecodeError::Empty);
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(DecodeError::Parts { got: parts.len() });
    }
    Ok(Decoded {
        header: json_object("header", parts[0])?,
        claims: json_object("payload", parts[1])?,
        signature_chars: parts[2].len(),
        signature_bytes: b64("signature", parts[2]).ok().map(|s| s.len()),
    })
}

/// The token as given on the command line or stdin: trimmed, a leading `Bearer ` dropped
/// (so a header value copied from a log or curl works as is).
pub fn normalize(raw: &str) -> &str {
    let t = raw.trim();
    match t.split_once(char::is_whitespace) {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => t,
    }
}

/// `4m 10s`, `3h 2m`, `2d 5h`: the two largest units, which is what a reader compares.
pub fn short_duration(secs: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut parts = Vec::new();
    let mut rest = secs;
    for (size, name) in UNITS {
        if rest >= size || (parts.is_empty() && size == 1) {
            parts.push(format!("{}{name}", rest / size));
            rest %= size;
        } else if !parts.is_empty() {
            // A zero middle unit ends the figure: "2h" rather than "2h 0m".
            break;
        }
        if parts.len() == 2 {
            break;
        }
    }
    parts.join(" ")
}

/// A NumericDate as UTC seconds (`2025-06-01T12:00:00Z`), or why it is not one.
pub fn utc(secs: i64) -> String {
    // humantime formats years 1970..=9999 only.
    const YEAR_10000: i64 = 253_402_300_800;
    if secs < 0 {
        return format!("{secs} (before 1970)");
    }
    if secs >= YEAR_10000 {
        return format!("{secs} (after year 9999)");
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs as u64)).to_string()
}

/// How a time claim relates to `now`, in the claim's own terms.
fn relation(claim: &str, at: i64, now: i64) -> String {
    let past = now >= at;
    let d = short_duration(at.abs_diff(now));
    match (claim, past) {
        ("exp", true) => format!("expired {d} ago"),
        ("exp", false) => format!("expires in {d}"),
        ("nbf", true) => format!("valid since {d} ago"),
        ("nbf", false) => format!("not valid for another {d}"),
        ("iat", true) => format!("issued {d} ago"),
        ("iat", false) => format!("issued {d} in the future (clock skew?)"),
        (_, true) => format!("authenticated {d} ago"),
        (_, false) => format!("authenticated {d} in the future (clock skew?)"),
    }
}

fn numeric_date(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite())
            .map(|f| f.floor() as i64)
    })
}

fn pretty(m: &Map<String, Value>) -> String {
    serde_json::to_string_pretty(m).unwrap_or_else(|_| format!("{m:?}"))
}

/// The human-readable view of a decoded token at `now` (seconds since the epoch).
pub fn render(d: &Decoded, now: u64) -> String {
    let mut out = String::new();
    out.push_str("header\n");
    out.push_str(&pretty(&d.header));
    out.push_str("\nclaims\n");
    out.push_str(&pretty(&d.claims));
    out.push('\n');
    let sig = match (d.signature_chars, d.signature_bytes) {
        (0, _) => "none: the token is unsigned".to_string(),
        (n, Some(b)) => format!("{n} base64url characters ({b} bytes), not shown"),
        (n, None) => format!("{n} characters, not base64url, not shown"),
    };
    out.push_str(&format!("signature  {sig}\n"));
    let times: Vec<_> = TIME_CLAIMS
        .iter()
        .filter_map(|c| d.claims.get(*c).map(|v| (*c, v)))
        .collect();
    if !times.is_empty() {
        let now_i = i64::try_from(now).unwrap_or(i64::MAX);
        out.push_str(&format!("times (now {})\n", utc(now_i)));
        for (claim, v) in times {
            let line = match numeric_date(v) {
                Some(at) => format!("{}  {}", utc(at), relation(claim, at, now_i)),
                None => format!("not a NumericDate: {v}"),
            };
            out.push_str(&format!("  {claim:<10} {line}\n"));
        }
    }
    out
}

/// Reads the token: the argument, or stdin for `-` (or no argument when stdin is piped).
fn read_token(arg: Option<&str>) -> Result<String, String> {
    match arg {
        Some("-") => {}
        Some(t) => return Ok(normalize(t).to_string()),
        None if std::io::stdin().is_terminal() => {
            return Err("give the token as an argument, or - to read it from stdin".into());
        }
        None => {}
    }
    let mut text = String::new();
    std::io::stdin()
        .take(MAX_STDIN_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the token from stdin: {e}"))?;
    Ok(normalize(&text).to_string())
}

/// `token inspect`: 0 decoded (and valid, with a config), 1 malformed or invalid, 2 bad config.
pub async fn run(token: Option<String>, config: Option<&Path>) -> ExitCode {
    let token = match read_token(token.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("authz-sidecar: {e}");
            return ExitCode::from(1);
        }
    };
    let decoded = match decode(&token) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("authz-sidecar: malformed token: {e}");
            return ExitCode::from(1);
        }
    };
    say(render(&decoded, now_secs()).trim_end());
    let Some(path) = config else {
        return ExitCode::SUCCESS;
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("authz-sidecar: config error: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(source) = JwksKeySource::new(&config.jwt) else {
        eprintln!(
            "authz-sidecar: config error: {} has no JWT key source: bearer tokens are refused",
            path.display()
        );
        return ExitCode::from(2);
    };
    let source: Arc<dyn KeySource> = Arc::new(source);
    // An unreachable Keycloak is not fatal: the verifier reports it as the token's failure,
    // exactly as a request would get it. An unreadable local file is a bad config, as in
    // `serve`.
    if let Err(e) = source.refresh().await
        && matches!(config.jwt.source, KeySourceConfig::File(_))
    {
        eprintln!("authz-sidecar: config error: jwt.jwks_file: {e}");
        return ExitCode::from(2);
    }
    say(format!(
        "verify     config {}, keys from {}",
        path.display(),
        source.describe()
    ));
    let verifier = JwtVerifier::new(&config.jwt, source, system_clock());
    let verdict = verifier
        .authenticate(&token)
        .await
        .and_then(|p| Principals::new(&config.principals).admit(p));
    match verdict {
        Ok(p) => {
            say(format!(
                "valid      {} ({}), roles [{}], scopes [{}], kid {}",
                p.subject,
                p.kind.as_str(),
                p.roles.join(", "),
                p.scopes.join(" "),
                p.key_id
            ));
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(format!("invalid    {e}"));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn enc(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn token(claims: &Value) -> String {
        format!(
            "{}.{}.c2lnbmF0dXJl",
            enc(&json!({"alg": "RS256", "kid": "k1"})),
            enc(claims)
        )
    }

    #[test]
    fn durations_keep_the_two_largest_units() {
        assert_eq!(short_duration(0), "0s");
        assert_eq!(short_duration(45), "45s");
        assert_eq!(short_duration(250), "4m 10s");
        assert_eq!(short_duration(3 * 3600 + 2 * 60 + 9), "3h 2m");
        assert_eq!(short_duration(2 * 3600 + 5), "2h");
        assert_eq!(short_duration(2 * 86_400 + 5 * 3600 + 7), "2d 5h");
    }

    #[test]
    fn times_read_relative_to_now() {
        let now = 1_750_000_000;
        let t = token(&json!({"iat": now - 250, "exp": now + 250, "nbf": now - 250}));
        let text = render(&decode(&t).unwrap(), now as u64);
        assert!(text.contains("expires in 4m 10s"), "{text}");
        assert!(text.contains("issued 4m 10s ago"), "{text}");
        assert!(text.contains("valid since 4m 10s ago"), "{text}");
        assert!(
            text.contains(&format!("times (now {})", utc(now))),
            "{text}"
        );
        let t = token(&json!({"exp": now - (3 * 3600 + 2 * 60), "auth_time": "yesterday"}));
        let text = render(&decode(&t).unwrap(), now as u64);
        assert!(text.contains("expired 3h 2m ago"), "{text}");
        assert!(
            text.contains("auth_time  not a NumericDate: \"yesterday\""),
            "{text}"
        );
    }

    #[test]
    fn dates_are_utc_and_never_panic() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_750_000_000), "2025-06-15T15:06:40Z");
        assert!(utc(-5).contains("before 1970"));
        assert!(utc(i64::MAX).contains("after year 9999"));
        let t = token(&json!({"exp": 1e300, "iat": -1.5}));
        let text = render(&decode(&t).unwrap(), 0);
        assert!(text.contains("after year 9999"), "{text}");
    }

    #[test]
    fn the_signature_is_only_measured() {
        let t = token(&json!({"sub": "a"}));
        let text = render(&decode(&t).unwrap(), 0);
        assert!(!text.contains("c2lnbmF0dXJl"), "{text}");
        assert!(
            text.contains("signature  12 base64url characters (9 bytes), not shown"),
            "{text}"
        );
    }

    #[test]
    fn malformed_tokens_name_the_part() {
        let h = enc(&json!({"alg": "RS256"}));
        let p = enc(&json!({"sub": "a"}));
        assert_eq!(decode("a.b").unwrap_err(), DecodeError::Parts { got: 2 });
        assert!(decode("a.b.c.d.e").unwrap_err().to_string().contains("JWE"));
        assert_eq!(
            decode(&format!("{h}.{p}!.s")).unwrap_err().to_string(),
            format!(
                "payload is not base64url: invalid character '!' at offset {}",
                p.len()
            )
        );
        let not_json = URL_SAFE_NO_PAD.encode("{nope");
        assert!(
            decode(&format!("{not_json}.{p}.s"))
                .unwrap_err()
                .to_string()
                .starts_with("header is not JSON: ")
        );
        let array = enc(&json!([1]));
        assert_eq!(
            decode(&format!("{h}.{array}.s")).unwrap_err(),
            DecodeError::NotObject { part: "payload" }
        );
        assert_eq!(decode("").unwrap_err(), DecodeError::Empty);
    }

    #[test]
    fn bearer_prefix_and_whitespace_are_dropped() {
        assert_eq!(normalize("  abc.def.ghi\n"), "abc.def.ghi");
        assert_eq!(normalize("Bearer abc.def.ghi\n"), "abc.def.ghi");
        assert_eq!(normalize("bearer\tabc"), "abc");
        assert_eq!(normalize("Basic abc"), "Basic abc");
    }
}
