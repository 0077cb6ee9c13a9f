//! The two text formats `/metrics` serves: OpenMetrics (what prometheus-client writes, and
//! what Prometheus asks for first) and the Prometheus text format 0.0.4 (what `curl`, older
//! scrapers and `promtool check metrics` read), chosen by the request's `Accept` header.
//!
//! Invariant: both carry the same series with the same values; only the framing differs.
//! In 0.0.4 a counter family is named with its `_total` suffix (OpenMetrics names the family
//! without it and only its sample with it), an info family is a gauge named `_info`, and
//! OpenMetrics' `# UNIT` and `# EOF` lines do not exist.

use std::fmt::Write as _;

/// The `Content-Type` of [`to_prometheus_text`]'s output.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The `Content-Type` of OpenMetrics text.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether a scraper's `Accept` header asks for OpenMetrics (Prometheus lists it first);
/// anything else, no header included, gets the 0.0.4 text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|accept| {
        accept.split(',').any(|range| {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or_default();
            let refused = params.any(|p| p.replace(' ', "") == "q=0");
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
    })
}

/// OpenMetrics text, as prometheus-client writes it, in the Prometheus text format 0.0.4.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // prometheus-client writes HELP before TYPE; the name HELP carries depends on the type.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, help.take());
            help = Some(rest);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.rsplit_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{family}_total"), "counter"),
                "info" => (format!("{family}_info"), "gauge"),
                other => (family.to_string(), other),
            };
            if let Some(help) = help.take() {
                let text = help.split_once(' ').map_or("", |(_, text)| text);
                let _ = writeln!(out, "# HELP {name} {text}");
            }
            let _ = writeln!(out, "# TYPE {name} {kind}");
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            flush_help(&mut out, help.take());
            out.push_str(line);
            out.push('\n');
        }
    }
    flush_help(&mut out, help);
    out
}

/// A HELP line no TYPE followed: kept as it was.
fn flush_help(out: &mut String, help: Option<&str>) {
    if let Some(help) = help {
        let _ = writeln!(out, "# HELP {help}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_and_openmetrics_lines_go() {
        let openmetrics = concat!(
            "# HELP app_decisions Check decisions.\n",
            "# TYPE app_decisions counter\n",
            "app_decisions_total{decision=\"allow\"} 3\n",
            "# HELP app_check_duration_seconds Time to decide.\n",
            "# TYPE app_check_duration_seconds histogram\n",
            "# UNIT app_check_duration_seconds seconds\n",
            "app_check_duration_seconds_sum 0.5\n",
            "app_check_duration_seconds_count 3\n",
            "app_check_duration_seconds_bucket{le=\"+Inf\"} 3\n",
            "# HELP app_build Build.\n",
            "# TYPE app_build info\n",
            "app_build_info{version=\"1\"} 1\n",
            "# HELP app_ready Ready.\n",
            "# TYPE app_ready gauge\n",
            "app_ready 1\n",
            "# EOF\n",
        );
        assert_eq!(
            to_prometheus_text(openmetrics),
            concat!(
                "# HELP app_decisions_total Check decisions.\n",
                "# TYPE app_decisions_total counter\n",
                "app_decisions_total{decision=\"allow\"} 3\n",
                "# HELP app_check_duration_seconds Time to decide.\n",
                "# TYPE app_check_duration_seconds histogram\n",
                "app_check_duration_seconds_sum 0.5\n",
                "app_check_duration_seconds_count 3\n",
                "app_check_duration_seconds_bucket{le=\"+Inf\"} 3\n",
                "# HELP app_build_info Build.\n",
                "# TYPE app_build_info gauge\n",
                "app_build_info{version=\"1\"} 1\n",
                "# HELP app_ready Ready.\n",
                "# TYPE app_ready gauge\n",
                "app_ready 1\n",
            )
        );
    }

    #[test]
    fn openmetrics_only_for_a_scraper_that_asks_for_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(wants_openmetrics(Some("application/openmetrics-text")));
        assert!(!wants_openmetrics(None), "curl sends none");
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text; q=0, text/plain"
        )));
    }
}
