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
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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

/// A validated event, before the host assigned it a position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// CloudEvents `id`.
    pub id: String,
    /// CloudEvents `source`.
    pub source: String,
    /// CloudEvents `type`.
    pub event_type: String,
    /// The entity this event belongs to.
    pub key: EntityKey,
    /// CloudEvents `time`.
    pub time: Option<String>,
    /// CloudEvents `data` (JSON; `null` when absent).
    pub data: Value,
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
    #[error("attribute `{0}` must be a non-empty string")]
    NotAString(&'static str),
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
}

impl Rejection {
    /// Short machine-readable code, for listing and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::MalformedJson(_) => "malformed_json",
            Rejection::NotAnObject => "not_an_object",
            Rejection::Missing(_) => "missing_attribute",
            Rejection::NotAString(_) => "invalid_attribute",
            Rejection::SpecVersion(_) => "unsupported_specversion",
            Rejection::UnknownEntityType(_) => "unknown_entity_type",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::DataNotJson(_) => "data_not_json",
        }
    }
}

/// Longest id/type/subject accepted: they end up in keys and URLs.
const MAX_ATTRIBUTE: usize = 1024;

/// Parse a structured-mode CloudEvent (the whole event is `payload`).
pub fn parse_structured(payload: &[u8], max_bytes: usize) -> Result<Envelope, Rejection> {
    if payload.len() > max_bytes {
        return Err(Rejection::TooLarge {
            size: payload.len(),
            max: max_bytes,
        });
    }
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| Rejection::MalformedJson(e.to_string()))?;
    let Value::Object(mut obj) = value else {
        return Err(Rejection::NotAnObject);
    };
    if let Some(v) = obj.get("specversion") {
        match v.as_str() {
            Some("1.0") => {}
            Some(other) => return Err(Rejection::SpecVersion(other.to_string())),
            None => return Err(Rejection::NotAString("specversion")),
        }
    }
    let attr =
        |obj: &serde_json::Map<String, Value>, name: &'static str| -> Result<String, Rejection> {
            match obj.get(name) {
                None | Some(Value::Null) => Err(Rejection::Missing(name)),
                Some(Value::String(s)) if s.is_empty() => Err(Rejection::Missing(name)),
                Some(Value::String(s)) if s.len() <= MAX_ATTRIBUTE => Ok(s.clone()),
                Some(_) => Err(Rejection::NotAString(name)),
            }
        };
    let id = attr(&obj, "id")?;
    let event_type = attr(&obj, "type")?;
    let entity_id = attr(&obj, "subject")?;
    let entity_type = attr(&obj, "entitytype")?;
    let source = attr(&obj, "source").unwrap_or_default();
    let time = obj.get("time").and_then(Value::as_str).map(str::to_owned);
    let data = match (obj.remove("data"), obj.get("data_base64")) {
        (Some(d), _) => d,
        (None, Some(Value::String(b64))) => decode_base64_json(b64)?,
        (None, _) => Value::Null,
    };
    Ok(Envelope {
        id,
        source,
        event_type,
        key: EntityKey::new(entity_type, entity_id),
        time,
        data,
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
    let header = |name: &'static str| -> Option<String> {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .filter(|s| !s.is_empty())
    };
    if let Some(v) = header("ce_specversion").filter(|v| v != "1.0") {
        return Err(Rejection::SpecVersion(v));
    }
    let req =
        |name: &'static str, short: &'static str| header(name).ok_or(Rejection::Missing(short));
    let id = req("ce_id", "id")?;
    let event_type = req("ce_type", "type")?;
    let entity_id = header("ce_subject")
        .or_else(|| key.filter(|k| !k.is_empty()).map(str::to_owned))
        .ok_or(Rejection::Missing("subject"))?;
    let entity_type = req("ce_entitytype", "entitytype")?;
    for (name, v) in [
        ("id", &id),
        ("type", &event_type),
        ("subject", &entity_id),
        ("entitytype", &entity_type),
    ] {
        if v.len() > MAX_ATTRIBUTE {
            return Err(Rejection::NotAString(name));
        }
    }
    let data = if payload.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(payload).map_err(|e| Rejection::DataNotJson(e.to_string()))?
    };
    Ok(Envelope {
        id,
        source: header("ce_source").unwrap_or_default(),
        event_type,
        key: EntityKey::new(entity_type, entity_id),
        time: header("ce_time"),
        data,
    })
}

/// Is this record in binary mode (has a `ce_specversion` or `ce_id` header)?
pub fn is_binary_mode(headers: &[(String, Vec<u8>)]) -> bool {
    headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("ce_specversion") || k.eq_ignore_ascii_case("ce_id"))
}

fn decode_base64_json(b64: &str) -> Result<Value, Rejection> {
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
    serde_json::from_slice(&out).map_err(|e| Rejection::DataNotJson(e.to_string()))
}

/// Serialize an envelope back to a structured-mode CloudEvent (for export,
/// fixtures and `refold produce`).
pub fn to_structured(e: &Envelope) -> Value {
    let mut obj = serde_json::json!({
        "specversion": "1.0",
        "id": e.id,
        "source": e.source,
        "type": e.event_type,
        "subject": e.key.entity_id,
        "entitytype": e.key.entity_type,
        "data": e.data,
    });
    if let Some(t) = &e.time {
        obj["time"] = Value::String(t.clone());
    }
    obj
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
        assert_eq!(e.data["owner"], "ann");
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
        assert_eq!(e.data, serde_json::json!({"a": 1}));
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
        assert_eq!(e.data["amount"], 5);
        assert_eq!(
            parse_binary(&headers[..2], Some("k"), b"", MAX),
            Err(Rejection::Missing("type"))
        );
    }
}
