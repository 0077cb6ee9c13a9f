//! Strict JSON for request bodies that rules read: one text, one reading.
//!
//! The app behind the sidecar parses the same bytes with its own parser (Python's `json`,
//! a JS or Go parser). Wherever two parsers may read a text differently, this one refuses it
//! instead of guessing, so a rule never decides on a value the app does not see:
//! - duplicate keys (`{"method":"ping","method":"tools/call"}`: first-wins and last-wins
//!   parsers disagree), compared after unescaping (`"m\u0065thod"` is `"method"`);
//! - what serde_json already refuses: `NaN`/`Infinity`, numbers out of range (`1e400`),
//!   trailing text, lone surrogates, nesting deeper than 128.
//!
//! A byte order mark and non-UTF-8 bytes are refused before parsing, by the caller.

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Parses `text` as exactly one JSON value, refusing duplicate keys. The error names the
/// problem and its position (`duplicate key "method" at line 1 column 31`).
pub fn parse(text: &str) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Strict.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Builds a [`Value`] like serde_json's own, but refuses a key seen twice in one object.
struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        // serde_json never produces a non-finite number, but say so rather than panic.
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number is not finite"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Strict)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate key {:?}",
                    key.chars().take(64).collect::<String>()
                )));
            }
            let v = map.next_value_seed(Strict)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_text_one_reading() {
        for (text, want) in [
            (r#"{"a":1,"b":[true,null,"x"]}"#, Ok(())),
            (r#"  {"a":{"b":{"c":1.5}}}  "#, Ok(())),
            (
                r#"{"method":"ping","method":"tools/call"}"#,
                Err("duplicate key \"method\""),
            ),
            (
                r#"{"m\u0065thod":"ping","method":"tools/call"}"#,
                Err("duplicate key \"method\""),
            ),
            (r#"{"p":{"a":1,"a":2}}"#, Err("duplicate key \"a\"")),
            (r#"{"x":NaN}"#, Err("expected value")),
            (r#"{"x":Infinity}"#, Err("expected value")),
            (r#"{"x":1e400}"#, Err("number out of range")),
            (r#"{"x":1} {"y":2}"#, Err("trailing characters")),
            (r#"{"x":"\ud800x"}"#, Err("hex escape")),
            (r#"{"x":1,}"#, Err("trailing comma")),
            ("", Err("EOF while parsing")),
        ] {
            let got = parse(text).map(|_| ()).map_err(|e| e.to_string());
            match (want, got) {
                (Ok(()), Ok(())) => {}
                (Err(w), Err(g)) => assert!(g.contains(w), "{text}: {g} should say {w}"),
                (w, g) => panic!("{text}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn nesting_deeper_than_128_is_refused() {
        let ok = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(parse(&ok).is_ok());
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(
            parse(&deep)
                .unwrap_err()
                .to_string()
                .contains("recursion limit exceeded")
        );
    }

    #[test]
    fn duplicate_key_error_says_where() {
        let e = parse(r#"{"method":"ping","method":"tools/call"}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "duplicate key \"method\" at line 1 column 25"
        );
    }
}
