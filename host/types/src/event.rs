//! CloudEvents 1.0 envelopes: parsing and validation of what the wire gives us.
//!
//! Structured JSON mode (the whole event is the payload) and Kafka binary
//! mode (`ce_` headers + the payload as `data`) are both accepted. Anything
//! that is not a usable event becomes a [`Rejection`], which the pipeline
//! turns into a dead letter: bad input is never dropped silently.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Identifies one entity: its type (the CloudEvents extension `entitytype`)
/// and its id (the CloudEvents `subject`).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct EntityKey {
    /// Entity type, owned by one plugin.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
}

impl EntityKey {
    /// Build a key.
    pub fn new(entity_type: impl Into<String>, entity_id: impl Into<String>) -> Self {
        EntityKey {
            entity_type: entity_type.into(),
            entity_id: entity_id.into(),
        }
    }
}

impl std::fmt::Display for EntityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.entity_type, self.entity_id)
    }
}

/// JSON text exactly as it was received: the bytes are kept, not a parsed
/// and re-serialised value, so big integers, number spellings and key order
/// survive storage and reach the plugin unchanged. Always valid JSON.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RawJson(std::sync::Arc<str>);

impl RawJson {
    /// JSON `null`.
    pub fn null() -> Self {
        RawJson(std::sync::Arc::from("null"))
    }

    /// Wrap text after checking that it is one JSON value.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str::<&serde_json::value::RawValue>(text)?;
        Ok(RawJson(std::sync::Arc::from(text)))
    }

    /// Wrap text already known to be valid JSON (a slice the parser gave us).
    fn trusted(text: &str) -> Self {
        RawJson(std::sync::Arc::from(text))
    }

    /// The JSON of a value.
    pub fn from_value(v: &Value) -> Self {
        RawJson(std::sync::Arc::from(v.to_string()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether it is `null`.
    pub fn is_null(&self) -> bool {
        self.0.trim() == "null"
    }

    /// Parsed, for callers that inspect it (numbers beyond f64 lose precision
    /// here, which is why storage and plugins get the text instead).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(&self.0).unwrap_or(Value::Null)
    }
}

impl std::fmt::Debug for RawJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for RawJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Default for RawJson {
    fn default() -> Self {
        RawJson::null()
    }
}

/// Any JSON value, in the API's description: the text is whatever was sent.
impl utoipa::PartialSchema for RawJson {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::Object::builder()
            .schema_type(utoipa::openapi::schema::SchemaType::AnyValue)
            .description(Some("any JSON value, as it was received"))
            .into()
    }
}

impl utoipa::ToSchema for RawJson {}

impl Serialize for RawJson {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match serde_json::from_str::<&serde_json::value::RawValue>(&self.0) {
            Ok(raw) => raw.serialize(s),
            Err(_) => s.serialize_unit(),
        }
    }
}

impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through `Value` when the deserializer is not serde_json's own
        // (RawValue needs it); text from serde_json is kept as is.
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        Ok(RawJson::trusted(raw.get()))
    }
}

/// A validated event, before the host assigned it a position.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// CloudEvents `id`.
    pub id: String,
    /// CloudEvents `source` (empty when absent).
    pub source: String,
    /// CloudEvents `type`.
    pub event_type: String,
    /// The entity this event belongs to.
    pub key: EntityKey,
    /// CloudEvents `time`.
    pub time: Option<String>,
    /// CloudEvents `data` as received (`null` when absent; the decoded
    /// bytes of `data_base64`).
    pub data: RawJson,
    /// The whole record as received: the structured-mode payload verbatim,
    /// or for binary mode an object of its `ce_` headers, key and payload.
    pub record: RawJson,
    /// sha256 of `record`: what tells a re-delivery (same bytes) from a
    /// conflicting event that reuses an identity.
    pub digest: String,
}

/// Why a record is not a usable event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The payload is not JSON.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// The payload is JSON but not an object.
    #[error("event is not a JSON object")]
    NotAnObject,
    /// A required attribute is missing or empty.
    #[error("missing required attribute `{0}`")]
    Missing(&'static str),
    /// An attribute has the wrong type.
    #[error("attribute `{0}` must be a string")]
    NotAString(&'static str),
    /// An attribute is longer than its limit.
    #[error("attribute `{name}` is {len} bytes; the limit is {max} bytes")]
    AttributeTooLong {
        /// The attribute.
        name: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The record says two things at once: a key given twice, or both
    /// `data` and `data_base64`.
    #[error("ambiguous event: {0}")]
    Ambiguous(String),
    /// `specversion` is present and not 1.0.
    #[error("unsupported specversion {0:?} (expected \"1.0\")")]
    SpecVersion(String),
    /// No plugin owns this entity type.
    #[error("no plugin for entity type `{0}`")]
    UnknownEntityType(String),
    /// The event is larger than the limit.
    #[error("event of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size of the payload.
        size: usize,
        /// Allowed size.
        max: usize,
    },
    /// `data_base64` or the payload of a binary-mode event is not JSON.
    #[error("data is not JSON: {0}")]
    DataNotJson(String),
    /// An event with this identity (entity type, entity id, event id) is
    /// stored with other content.
    #[error(
        "event {id} of {entity} was already received with other content (stored sha256 {stored}, this one sha256 {received})"
    )]
    ConflictingDuplicate {
        /// The entity.
        entity: String,
        /// The event id.
        id: String,
        /// Digest of the event kept.
        stored: String,
        /// Digest of this record.
        received: String,
    },
}

impl Rejection {
    /// Short machine-readable code, for listing and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::MalformedJson(_) => "malformed_json",
            Rejection::NotAnObject => "not_an_object",
            Rejection::Missing(_) => "missing_attribute",
            Rejection::NotAString(_) => "invalid_attribute",
            Rejection::AttributeTooLong { .. } => "attribute_too_long",
            Rejection::Ambiguous(_) => "ambiguous",
            Rejection::SpecVersion(_) => "unsupported_specversion",
            Rejection::UnknownEntityType(_) => "unknown_entity_type",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::DataNotJson(_) => "data_not_json",
            Rejection::ConflictingDuplicate { .. } => "conflicting_duplicate",
        }
    }
}

/// Longest id/type/subject/entitytype accepted: they end up in keys and URLs.
pub const MAX_ATTRIBUTE: usize = 1024;
/// Largest record accepted by default (`[engine] max_record_bytes`).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1 << 20;
/// Longest `source` accepted (a URI-reference).
pub const MAX_SOURCE: usize = 4096;
/// Longest `time` accepted (an RFC 3339 timestamp is about 35 bytes).
pub const MAX_TIME: usize = 64;

/// The top level of a structured event: every key with its raw value, in
/// order, refusing a key given twice (serde_json's maps keep the last one,
/// which would let a second `subject` send the event elsewhere).
struct TopLevel<'a>(Vec<(std::borrow::Cow<'a, str>, &'a serde_json::value::RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for TopLevel<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = TopLevel<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Self::Value, M::Error> {
                let mut out: Vec<(std::borrow::Cow<'a, str>, &'a serde_json::value::RawValue)> =
                    Vec::new();
                while let Some(k) = m.next_key::<std::borrow::Cow<'a, str>>()? {
                    if out.iter().any(|(have, _)| *have == k) {
                        return Err(serde::de::Error::custom(format!("{DUPLICATE}{k}")));
                    }
                    let v = m.next_value::<&'a serde_json::value::RawValue>()?;
                    out.push((k, v));
                }
                Ok(TopLevel(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Marks the duplicate-key error inside serde's message.
const DUPLICATE: &str = "\u{0}duplicate key ";

/// A string attribute: `Ok(None)` when absent or null.
fn string_attr(
    raw: Option<&serde_json::value::RawValue>,
    name: &'static str,
    max: usize,
) -> Result<Option<String>, Rejection> {
    let Some(raw) = raw else { return Ok(None) };
    if raw.get() == "null" {
        return Ok(None);
    }
    let s: String = serde_json::from_str(raw.get()).map_err(|_| Rejection::NotAString(name))?;
    if s.len() > max {
        return Err(Rejection::AttributeTooLong {
            name,
            len: s.len(),
            max,
        });
    }
    Ok(Some(s))
}

fn required(
    raw: Option<&serde_json::value::RawValue>,
    name: &'static str,
    max: usize,
) -> Result<String, Rejection> {
    match string_attr(raw, name, max)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(Rejection::Missing(name)),
    }
}

/// Parse a structured-mode CloudEvent (the whole event is `payload`).
pub fn parse_structured(payload: &[u8], max_bytes: usize) -> Result<Envelope, Rejection> {
    if payload.len() > max_bytes {
        return Err(Rejection::TooLarge {
            size: payload.len(),
            max: max_bytes,
        });
    }
    let text = std::str::from_utf8(payload)
        .map_err(|e| Rejection::MalformedJson(format!("not UTF-8: {e}")))?;
    let top: TopLevel<'_> = match serde_json::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            let msg = e.to_string();
            if let Some(at) = msg.find(DUPLICATE) {
                let rest = &msg[at + DUPLICATE.len()..];
                let key = rest.split(" at line").next().unwrap_or(rest);
                return Err(Rejection::Ambiguous(format!(
                    "attribute `{key}` is given more than once"
                )));
            }
            if e.classify() == serde_json::error::Category::Data {
                return Err(Rejection::NotAnObject);
            }
            return Err(Rejection::MalformedJson(msg));
        }
    };
    let get = |name: &str| top.0.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
    if let Some(v) = string_attr(get("specversion"), "specversion", MAX_ATTRIBUTE)?
        && v != "1.0"
    {
        return Err(Rejection::SpecVersion(v));
    }
    let id = required(get("id"), "id", MAX_ATTRIBUTE)?;
    let event_type = required(get("type"), "type", MAX_ATTRIBUTE)?;
    let entity_id = required(get("subject"), "subject", MAX_ATTRIBUTE)?;
    let entity_type = required(get("entitytype"), "entitytype", MAX_ATTRIBUTE)?;
    let source = string_attr(get("source"), "source", MAX_SOURCE)?.unwrap_or_default();
    let time = string_attr(get("time"), "time", MAX_TIME)?;
    let data = match (get("data"), get("data_base64")) {
        (Some(_), Some(_)) => {
            return Err(Rejection::Ambiguous(
                "both `data` and `data_base64` are present".into(),
            ));
        }
        (Some(d), None) => RawJson::trusted(d.get()),
        (None, Some(b)) => match string_attr(Some(b), "data_base64", usize::MAX)? {
            Some(b64) => decode_base64_json(&b64)?,
            None => RawJson::null(),
        },
        (None, None) => RawJson::null(),
    };
    Ok(Envelope {
        id,
        source,
        event_type,
        key: EntityKey::new(entity_type, entity_id),
        time,
        data,
        record: RawJson::trusted(text),
        digest: crate::digest::digest_of(payload),
    })
}

/// Parse a binary-mode CloudEvent: attributes in `ce_*` headers, `data` in
/// the payload. `key` (the Kafka message key) stands in for a missing subject.
pub fn parse_binary(
    headers: &[(String, Vec<u8>)],
    key: Option<&str>,
    payload: &[u8],
    max_bytes: usize,
) -> Result<Envelope, Rejection> {
    if payload.len() > max_bytes {
        return Err(Rejection::TooLarge {
            size: payload.len(),
            max: max_bytes,
        });
    }
    let mut ce: Vec<(String, String)> = Vec::new();
    for (k, v) in headers {
        let name = k.to_ascii_lowercase();
        if !name.starts_with("ce_") {
            continue;
        }
        let value = std::str::from_utf8(v)
            .map_err(|_| Rejection::Ambiguous(format!("header `{k}` is not UTF-8")))?;
        if ce.iter().any(|(n, _)| *n == name) {
            return Err(Rejection::Ambiguous(format!(
                "header `{name}` is given more than once"
            )));
        }
        ce.push((name, value.to_string()));
    }
    let header =
        |name: &str, short: &'static str, max: usize| -> Result<Option<String>, Rejection> {
            match ce.iter().find(|(n, _)| n == name) {
                None => Ok(None),
                Some((_, v)) if v.is_empty() => Ok(None),
                Some((_, v)) if v.len() > max => Err(Rejection::AttributeTooLong {
                    name: short,
                    len: v.len(),
                    max,
                }),
                Some((_, v)) => Ok(Some(v.clone())),
            }
        };
    if let Some(v) = header("ce_specversion", "specversion", MAX_ATTRIBUTE)?.filter(|v| v != "1.0")
    {
        return Err(Rejection::SpecVersion(v));
    }
    let req = |name: &str, short: &'static str| {
        header(name, short, MAX_ATTRIBUTE)?.ok_or(Rejection::Missing(short))
    };
    let id = req("ce_id", "id")?;
    let event_type = req("ce_type", "type")?;
    let entity_type = req("ce_entitytype", "entitytype")?;
    let entity_id = match header("ce_subject", "subject", MAX_ATTRIBUTE)? {
        Some(s) => s,
        None => match key.filter(|k| !k.is_empty()) {
            Some(k) if k.len() > MAX_ATTRIBUTE => {
                return Err(Rejection::AttributeTooLong {
                    name: "subject",
                    len: k.len(),
                    max: MAX_ATTRIBUTE,
                });
            }
            Some(k) => k.to_string(),
            None => return Err(Rejection::Missing("subject")),
        },
    };
    let data = if payload.is_empty() {
        RawJson::null()
    } else {
        let text = std::str::from_utf8(payload)
            .map_err(|e| Rejection::DataNotJson(format!("not UTF-8: {e}")))?;
        RawJson::parse(text).map_err(|e| Rejection::DataNotJson(e.to_string()))?
    };
    // The record as one JSON text, so binary and structured events are kept
    // and compared alike: headers in the order received, key, payload.
    let mut record = String::with_capacity(payload.len() + 256);
    record.push_str("{\"headers\":{");
    for (i, (n, v)) in ce.iter().enumerate() {
        if i > 0 {
            record.push(',');
        }
        record.push_str(&Value::String(n.clone()).to_string());
        record.push(':');
        record.push_str(&Value::String(v.clone()).to_string());
    }
    record.push_str("},\"key\":");
    record.push_str(
        &key.map(|k| Value::String(k.to_string()))
            .unwrap_or(Value::Null)
            .to_string(),
    );
    record.push_str(",\"data\":");
    record.push_str(data.as_str());
    record.push('}');
    Ok(Envelope {
        id,
        source: header("ce_source", "source", MAX_SOURCE)?.unwrap_or_default(),
        event_type,
        key: EntityKey::new(entity_type, entity_id),
        time: header("ce_time", "time", MAX_TIME)?,
        digest: crate::digest::digest_of(record.as_bytes()),
        record: RawJson::trusted(&record),
        data,
    })
}

/// Is this record in binary mode (has a `ce_specversion` or `ce_id` header)?
pub fn is_binary_mode(headers: &[(String, Vec<u8>)]) -> bool {
    headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("ce_specversion") || k.eq_ignore_ascii_case("ce_id"))
}

fn decode_base64_json(b64: &str) -> Result<RawJson, Rejection> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(b64.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in b64
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c)
            .ok_or_else(|| Rejection::DataNotJson("data_base64 is not base64".into()))?
            as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    let text = String::from_utf8(out)
        .map_err(|e| Rejection::DataNotJson(format!("data_base64 is not UTF-8: {e}")))?;
    RawJson::parse(&text).map_err(|e| Rejection::DataNotJson(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn parses_a_structured_event() {
        let e = parse_structured(
            br#"{"specversion":"1.0","id":"e1","source":"/t","type":"account.opened","subject":"a1","entitytype":"account","time":"2026-01-01T00:00:00Z","data":{"owner":"ann"}}"#,
            MAX,
        )
        .unwrap();
        assert_eq!(e.id, "e1");
        assert_eq!(e.key, EntityKey::new("account", "a1"));
        assert_eq!(e.data.as_str(), r#"{"owner":"ann"}"#);
        assert_eq!(e.time.as_deref(), Some("2026-01-01T00:00:00Z"));
    }

    #[test]
    fn rejects_each_kind_of_bad_input() {
        assert!(matches!(
            parse_structured(b"{not json", MAX),
            Err(Rejection::MalformedJson(_))
        ));
        assert_eq!(parse_structured(b"[1]", MAX), Err(Rejection::NotAnObject));
        assert_eq!(
            parse_structured(br#"{"type":"t","subject":"s","entitytype":"x"}"#, MAX),
            Err(Rejection::Missing("id"))
        );
        assert_eq!(
            parse_structured(br#"{"id":"1","subject":"s","entitytype":"x"}"#, MAX),
            Err(Rejection::Missing("type"))
        );
        assert_eq!(
            parse_structured(br#"{"id":"1","type":"t","entitytype":"x"}"#, MAX),
            Err(Rejection::Missing("subject"))
        );
        assert_eq!(
            parse_structured(br#"{"id":"1","type":"t","subject":"s"}"#, MAX),
            Err(Rejection::Missing("entitytype"))
        );
        assert_eq!(
            parse_structured(
                br#"{"id":7,"type":"t","subject":"s","entitytype":"x"}"#,
                MAX
            ),
            Err(Rejection::NotAString("id"))
        );
        assert_eq!(
            parse_structured(b"\"just a string\"", MAX),
            Err(Rejection::NotAnObject)
        );
        assert_eq!(
            parse_structured(
                br#"{"specversion":"0.3","id":"1","type":"t","subject":"s","entitytype":"x"}"#,
                MAX
            ),
            Err(Rejection::SpecVersion("0.3".into()))
        );
        assert!(matches!(
            parse_structured(&[b' '; 100], 10),
            Err(Rejection::TooLarge { size: 100, max: 10 })
        ));
    }

    #[test]
    fn decodes_data_base64() {
        let e = parse_structured(
            br#"{"id":"1","type":"t","subject":"s","entitytype":"x","data_base64":"eyJhIjoxfQ=="}"#,
            MAX,
        )
        .unwrap();
        assert_eq!(e.data.as_str(), r#"{"a":1}"#);
    }

    #[test]
    fn parses_binary_mode_with_key_as_subject() {
        let h = |k: &str, v: &str| (k.to_string(), v.as_bytes().to_vec());
        let headers = vec![
            h("ce_specversion", "1.0"),
            h("ce_id", "e9"),
            h("ce_type", "account.deposited"),
            h("ce_entitytype", "account"),
        ];
        assert!(is_binary_mode(&headers));
        let e = parse_binary(&headers, Some("acc-7"), br#"{"amount":5}"#, MAX).unwrap();
        assert_eq!(e.key, EntityKey::new("account", "acc-7"));
        assert_eq!(e.data.as_str(), r#"{"amount":5}"#);
        assert_eq!(
            parse_binary(&headers[..2], Some("k"), b"", MAX),
            Err(Rejection::Missing("type"))
        );
    }

    const OK: &str = r#""type":"t","subject":"s","entitytype":"x""#;

    fn with(extra: &str) -> Result<Envelope, Rejection> {
        parse_structured(format!(r#"{{"id":"1",{OK}{extra}}}"#).as_bytes(), MAX)
    }

    #[test]
    fn a_key_given_twice_is_ambiguous() {
        let e = parse_structured(
            br#"{"id":"1","type":"t","subject":"a","entitytype":"x","subject":"b"}"#,
            MAX,
        )
        .unwrap_err();
        assert_eq!(e.code(), "ambiguous");
        assert!(e.to_string().contains("`subject`"), "{e}");
        assert_eq!(
            with(r#","data":1,"data_base64":"MQ==""#)
                .unwrap_err()
                .code(),
            "ambiguous"
        );
        let h = |k: &str, v: &str| (k.to_string(), v.as_bytes().to_vec());
        let headers = vec![
            h("ce_id", "1"),
            h("ce_type", "t"),
            h("ce_entitytype", "x"),
            h("ce_subject", "a"),
            h("ce_subject", "b"),
        ];
        assert_eq!(
            parse_binary(&headers, None, b"{}", MAX).unwrap_err().code(),
            "ambiguous"
        );
    }

    #[test]
    fn oversized_and_mistyped_attributes_say_which_and_why() {
        let long = "x".repeat(10_240);
        let e = parse_structured(format!(r#"{{"id":"{long}",{OK}}}"#).as_bytes(), MAX).unwrap_err();
        assert_eq!(
            e,
            Rejection::AttributeTooLong {
                name: "id",
                len: 10_240,
                max: MAX_ATTRIBUTE
            }
        );
        assert_eq!(
            e.to_string(),
            "attribute `id` is 10240 bytes; the limit is 1024 bytes"
        );
        let e = with(&format!(r#","source":"{long}""#)).unwrap_err();
        assert!(
            matches!(e, Rejection::AttributeTooLong { name: "source", .. }),
            "{e}"
        );
        assert_eq!(
            with(r#","time":1767225600"#),
            Err(Rejection::NotAString("time"))
        );
        assert_eq!(
            with(r#","data_base64":{"a":1}"#),
            Err(Rejection::NotAString("data_base64"))
        );
        assert_eq!(with(r#","source":7"#), Err(Rejection::NotAString("source")));
    }

    #[test]
    fn data_and_the_record_keep_their_text() {
        let text = format!(
            r#"{{"id":"1",{OK},"ext":"kept","data":{{"n":123456789012345678901234567890,"z":1,"a":2}}}}"#
        );
        let e = parse_structured(text.as_bytes(), MAX).unwrap();
        assert_eq!(
            e.data.as_str(),
            r#"{"n":123456789012345678901234567890,"z":1,"a":2}"#
        );
        assert_eq!(e.record.as_str(), text);
        assert_eq!(e.digest, crate::digest::digest_of(text.as_bytes()));
        // Serialised as the same text, not as a re-parsed value.
        assert_eq!(serde_json::to_string(&e.data).unwrap(), e.data.as_str());
        let back: RawJson = serde_json::from_str(e.data.as_str()).unwrap();
        assert_eq!(back, e.data);
    }

    #[test]
    fn binary_records_have_a_stable_digest() {
        let h = |k: &str, v: &str| (k.to_string(), v.as_bytes().to_vec());
        let headers = vec![h("ce_id", "1"), h("ce_type", "t"), h("ce_entitytype", "x")];
        let a = parse_binary(&headers, Some("k"), br#"{"n":1}"#, MAX).unwrap();
        let b = parse_binary(&headers, Some("k"), br#"{"n":1}"#, MAX).unwrap();
        let c = parse_binary(&headers, Some("k"), br#"{"n":2}"#, MAX).unwrap();
        assert_eq!(a.digest, b.digest);
        assert_ne!(a.digest, c.digest);
        let r: Value = serde_json::from_str(a.record.as_str()).unwrap();
        assert_eq!(r["headers"]["ce_id"], "1");
        assert_eq!(r["data"]["n"], 1);
    }
}
