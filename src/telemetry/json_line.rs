//! The JSON log line (`LOG_FORMAT=json`, the default off a terminal), written straight into
//! the line buffer: `{"timestamp":..,"level":..,<the event's fields in order>}`.
//!
//! Invariant: **every line is byte for byte what tracing-subscriber's own JSON format
//! (`json().flatten_event(true)`, no target) writes**, so the decision line's fields, and
//! every reader of them (Envoy access-log joins, the tests), stay as they were. The stock
//! formatter goes through serde: a `Serializer` over an `io::Write` adaptor over the line
//! buffer, and every `%`/`?` field is formatted through `collect_str`'s escaping adaptor, at
//! about twice the instructions of the whole text line. Here each value is escaped as it is
//! written, with the same escapes as serde_json ([`escape_into`]), and the tests compare the
//! two formatters on every kind of value and every character.
//!
//! An event inside a span this log shows (none of the sidecar's: they are the export's, see
//! [`crate::tracing_export`]; a dependency's at `LOG_LEVEL=debug` or `trace`) also carries
//! `span` and `spans` keys: such an event goes to the stock formatter.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter of the JSON log: [`JsonLine::format_event`] writes a line outside any
/// shown span itself and hands the rest to `stock`, the layer's own JSON format.
pub struct JsonLine<T> {
    /// The same clock `stock` was given.
    timer: T,
    stock: Format<Json, T>,
}

impl<T> JsonLine<T> {
    /// `stock`: the layer's JSON format (flattened, no target) using `timer`.
    pub fn new(timer: T, stock: Format<Json, T>) -> Self {
        Self { timer, stock }
    }
}

impl<S, N, T> FormatEvent<S, N> for JsonLine<T>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    T: FormatTime,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // The stock formatter's own test for the span keys.
        let in_span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current())
            .is_some();
        if in_span {
            return self.stock.format_event(ctx, writer, event);
        }
        // The timestamp is digits, `-`, `:`, `.`, `T` and `Z`: nothing to escape.
        writer.write_str("{\"timestamp\":\"")?;
        self.timer.format_time(&mut writer)?;
        writer.write_str("\",\"level\":\"")?;
        writer.write_str(event.metadata().level().as_str())?;
        writer.write_char('"')?;
        let mut fields = JsonFields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`, as tracing-serde's map visitor serialises it: text
/// and `%`/`?` values as JSON strings, integers and booleans bare, a float as serde_json
/// writes it. 128-bit integers, errors and byte slices take `Visit`'s defaults (through
/// `record_debug`), as they do there.
struct JsonFields<'w, 'b> {
    out: &'w mut Writer<'b>,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    /// `,"name":` and the value `value` writes.
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = (|| {
                self.out.write_str(",\"")?;
                escape_into(self.out, field.name())?;
                self.out.write_str("\":")?;
                value(self.out)
            })();
        }
    }

    /// `,"name":"..."`, the inside written (escaped) by `inside`.
    fn string_entry(&mut self, field: &Field, inside: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = (|| {
                self.out.write_str(",\"")?;
                escape_into(self.out, field.name())?;
                self.out.write_str("\":\"")?;
                inside(self.out)?;
                self.out.write_char('"')
            })();
        }
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.string_entry(field, |out| escape_into(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.string_entry(field, |out| write!(Escaping(out), "{value:?}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    /// Rare in a log line; serde_json's own digits (and `null` for NaN and infinities).
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, |out| {
            out.write_str(&serde_json::to_string(&value).map_err(|_| fmt::Error)?)
        });
    }
}

/// A `fmt::Write` that escapes everything written through it ([`escape_into`]), so a
/// `Display` or `Debug` value goes into the line without a `String` in between.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s)
    }
}

/// The inside of a JSON string, as serde_json escapes it: `"` and `\` with a backslash, the
/// controls below U+0020 as `\b \t \n \f \r` or `\u00XX` (lowercase hex); everything else,
/// non-ASCII included, as is. Runs with nothing to escape are written whole.
fn escape_into(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    // Nearly every value (ids, paths, rule names) has nothing to escape. Said from the bytes
    // in one pass without an early exit, which the compiler turns into vector compares.
    let plain = s.bytes().fold(true, |plain, b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        return out.write_str(s);
    }
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // Every byte matched above is ASCII, so `i` and `i + 1` are char boundaries.
        out.write_str(&s[start..i])?;
        if escape.is_empty() {
            write!(out, "\\u{b:04x}")?;
        } else {
            out.write_str(escape)?;
        }
        start = i + 1;
    }
    out.write_str(&s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Capture;

    /// One clock for both formatters, so their lines can be compared whole.
    #[derive(Clone, Copy)]
    struct Fixed;

    impl FormatTime for Fixed {
        fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
            w.write_str("2026-11-27T11:00:00.123456Z")
        }
    }

    #[derive(Debug)]
    struct Odd;

    impl fmt::Display for Odd {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("dis\"play\u{7}\u{2028}")
        }
    }

    impl std::error::Error for Odd {}

    /// The events a test writes through both formatters: every kind of field value, the
    /// decision line's shape, an event in a span the log shows.
    fn events(all_chars: &str) {
        let relations = vec!["tool:a#executor".to_string(), "q\"uote\n".to_string()];
        tracing::info!(
            decision = "allow",
            decision_id = %"00ff00ff00ff00ff",
            path = %all_chars,
            subject = all_chars,
            relations = ?relations,
            empty = ?Vec::<String>::new(),
            latency_us = 42_u64,
            negative = -7_i64,
            yes = true,
            ratio = 0.25_f64,
            whole = 1.0_f64,
            nan = f64::NAN,
            big = u128::MAX,
            error = &Odd as &(dyn std::error::Error + 'static),
            r#type = "raw",
            "check"
        );
        tracing::warn!("message with {all_chars} inside");
        tracing::error!(count = 3, "no quotes \\ here");
        let span = tracing::info_span!("shown", id = 7, text = %"a\"b");
        span.in_scope(|| {
            tracing::info!(inner = "x", "inside a span");
            let child = tracing::debug_span!("child", depth = 2);
            child.in_scope(|| tracing::info!("two spans deep"));
        });
        tracing::trace!("filtered out");
    }

    /// What a JSON log layer over `stock` (or over [`JsonLine`] wrapping it) writes for
    /// [`events`].
    fn lines(ours: bool, all_chars: &str) -> String {
        use tracing_subscriber::layer::SubscriberExt as _;
        crate::tracing_export::per_thread_subscribers();
        let capture = Capture::default();
        let writer = capture.clone();
        let stock = tracing_subscriber::fmt::layer()
            .with_writer(move || writer.clone())
            .with_target(false)
            .with_timer(Fixed)
            .json()
            .flatten_event(true);
        let filter = tracing_subscriber::filter::LevelFilter::DEBUG;
        let registry = tracing_subscriber::registry().with(filter);
        if ours {
            let layer = stock.map_event_format(|f| JsonLine::new(Fixed, f));
            tracing::subscriber::with_default(registry.with(layer), || events(all_chars));
        } else {
            tracing::subscriber::with_default(registry.with(stock), || events(all_chars));
        }
        String::from_utf8(capture.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_are_byte_for_byte_the_stock_json_formatters() {
        let all_chars: String = (0..=0x10_ffff_u32).filter_map(char::from_u32).collect();
        let ours = lines(true, &all_chars);
        let stock = lines(false, &all_chars);
        assert_eq!(ours.lines().count(), 5, "one line per event shown");
        assert!(ours.contains("\"spans\":["), "the span case is exercised");
        for (a, b) in ours.lines().zip(stock.lines()) {
            assert!(a == b, "ours:  {:.300}\nstock: {:.300}", a, b);
        }
        assert_eq!(ours, stock);
    }

    #[test]
    fn escapes_are_serde_jsons_for_every_character() {
        for c in (0..=0x10_ffff_u32).filter_map(char::from_u32) {
            let value = format!("a{c}b");
            let mut ours = String::from("\"");
            escape_into(&mut ours, &value).unwrap();
            ours.push('"');
            assert_eq!(ours, serde_json::to_string(&value).unwrap(), "{c:?}");
        }
    }
}
