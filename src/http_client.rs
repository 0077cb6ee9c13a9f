//! Outbound HTTP: the one way this crate builds a reqwest client (pooled, timeouts, a user
//! agent) and the one-line description of a transport failure that operators read
//! ("connection refused", "timed out after 500ms", "HTTP 404 Not Found").

use std::error::Error as _;
use std::time::Duration;

pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("authz-sidecar/", env!("CARGO_PKG_VERSION")))
        .build()
        // Only fails when the TLS backend cannot initialise: nothing to run without.
        .expect("HTTP client (TLS backend) failed to initialise")
}

/// A short cause: the innermost I/O error kind where there is one, not reqwest's whole chain.
pub fn describe(err: &reqwest::Error, timeout: Duration) -> String {
    if err.is_timeout() {
        return format!("timed out after {}", humantime::format_duration(timeout));
    }
    if let Some(status) = err.status() {
        return format!("HTTP {status}");
    }
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::ConnectionReset => "connection reset".into(),
                std::io::ErrorKind::TimedOut => {
                    format!("timed out after {}", humantime::format_duration(timeout))
                }
                _ => io.to_string(),
            };
        }
        if e.source().is_none() {
            let text = e.to_string();
            if text.contains("dns error") || text.contains("failed to lookup") {
                return format!("cannot resolve host: {text}");
            }
            return text;
        }
        source = e.source();
    }
    if err.is_decode() {
        return format!("unreadable response: {err}");
    }
    err.to_string()
}
