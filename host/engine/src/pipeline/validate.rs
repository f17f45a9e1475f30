//! Step 1 of a batch: parse each record's envelope and hold it to the size
//! limits; whatever fails becomes a dead letter with its reason.

use serde_json::Value;

use refold_source::SourceRecord;
use refold_store::DeadLetter;
use refold_types::clock::now_rfc3339;
use refold_types::event::{self, Envelope, Rejection};

use crate::registry::Active;

/// A record whose envelope parsed and whose entity type has a plugin.
pub(crate) type Valid<'r> = (Envelope, &'r SourceRecord);

/// Parse `records` (binary or structured mode), refusing a record over
/// `max_record_bytes`, of an entity type no plugin owns, or over its
/// plugin's `max_event_bytes`. Returns the valid ones in arrival order and
/// the dead letters of the others.
pub(crate) fn validate<'r>(
    records: &'r [SourceRecord],
    plugins: &Active,
    max_record_bytes: usize,
) -> (Vec<Valid<'r>>, Vec<DeadLetter>) {
    let mut valid = Vec::with_capacity(records.len());
    let mut dead = Vec::new();
    for r in records {
        let parsed = if event::is_binary_mode(&r.headers) {
            event::parse_binary(&r.headers, r.key.as_deref(), &r.payload, max_record_bytes)
        } else {
            event::parse_structured(&r.payload, max_record_bytes)
        };
        let checked = parsed.and_then(|e| match plugins.get(&e.key.entity_type) {
            None => Err(Rejection::UnknownEntityType(e.key.entity_type.clone())),
            Some(p) => {
                let size = r.payload.len();
                let max = p.limits.max_event_bytes as usize;
                if size > max {
                    Err(Rejection::TooLarge { size, max })
                } else {
                    Ok(e)
                }
            }
        });
        match checked {
            Ok(e) => valid.push((e, r)),
            Err(why) => dead.push(dead_letter(r, &why)),
        }
    }
    (valid, dead)
}

/// The rejection of a record whose identity is known with other bytes.
pub(crate) fn conflict(e: &Envelope, stored: &str) -> Rejection {
    Rejection::ConflictingDuplicate {
        entity: e.key.to_string(),
        id: e.id.clone(),
        stored: stored.to_string(),
        received: e.digest.clone(),
    }
}

/// The dead letter of a refused record: its payload (capped), its reason,
/// and whatever of its identity can be read.
pub(crate) fn dead_letter(r: &SourceRecord, why: &Rejection) -> DeadLetter {
    let peek: Option<Value> = serde_json::from_slice(&r.payload).ok();
    let attr = |name: &str| {
        peek.as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let header = |name: &str| {
        r.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let mut payload = String::from_utf8_lossy(&r.payload).into_owned();
    if payload.len() > 64 << 10 {
        // Keep the dead letter listable; the head of the record shows what it was.
        payload.truncate(payload.floor_char_boundary(64 << 10));
        payload.push_str("…(truncated)");
    }
    DeadLetter {
        // Derived from the origin, so re-reading the record after a crash
        // yields the same id; hashed, so it is safe in a URL.
        id: format!(
            "dl-{}",
            &refold_runtime::digest_of(
                format!(
                    "{}\u{0}{}\u{0}{}",
                    r.origin.source, r.origin.partition, r.origin.offset
                )
                .as_bytes()
            )[..20]
        ),
        code: why.code().to_string(),
        reason: why.to_string(),
        payload,
        origin: Some(r.origin.clone()),
        event_id: attr("id").or_else(|| header("ce_id")),
        entity_type: attr("entitytype").or_else(|| header("ce_entitytype")),
        recorded_at: now_rfc3339(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::testing::{bank_host, deposit, record};

    #[test]
    fn valid_records_pass_in_order_and_the_others_become_dead_letters_with_their_reason() {
        let host = bank_host();
        let plugins = host.registry.snapshot();
        let records = [
            deposit(0, "a", "1", 10),
            record(1, "not json".into()),
            record(
                2,
                r#"{"specversion":"1.0","id":"1","source":"/t","type":"x","subject":"a","entitytype":"order","data":{}}"#.into(),
            ),
            deposit(3, "b", "1", 5),
            record(4, format!(r#"{{"pad":"{}"}}"#, "x".repeat(400))),
        ];
        let (valid, dead) = validate(&records, &plugins, 256);
        let kept: Vec<(String, i64)> = valid
            .iter()
            .map(|(e, r)| (e.key.entity_id.clone(), r.origin.offset))
            .collect();
        assert_eq!(kept, [("a".to_string(), 0), ("b".to_string(), 3)]);
        let codes: Vec<&str> = dead.iter().map(|d| d.code.as_str()).collect();
        assert_eq!(codes.len(), 3, "{codes:?}");
        assert_eq!(codes[1], "unknown_entity_type");
        assert_eq!(codes[2], Rejection::TooLarge { size: 0, max: 0 }.code());
        assert_eq!(dead[1].entity_type.as_deref(), Some("order"));
        assert_eq!(dead[1].event_id.as_deref(), Some("1"));
        assert_eq!(dead[0].origin.as_ref().map(|o| o.offset), Some(1));
    }

    #[test]
    fn an_event_over_its_plugins_max_event_bytes_is_refused_naming_the_limit() {
        let host = bank_host();
        let mut plugins = (*host.registry.snapshot()).clone();
        let bank = plugins["account"].clone();
        let mut limits = bank.limits;
        limits.max_event_bytes = 64;
        plugins.insert("account".into(), bank.with_limits(limits));
        let r = deposit(0, "a", "1", 10);
        let (valid, dead) = validate(std::slice::from_ref(&r), &plugins, 1 << 20);
        assert!(valid.is_empty());
        assert_eq!(
            dead[0].reason,
            Rejection::TooLarge {
                size: r.payload.len(),
                max: 64
            }
            .to_string()
        );
    }

    #[test]
    fn a_dead_letter_id_comes_from_the_origin_and_a_long_payload_is_cut() {
        let long = record(7, "x".repeat(70 << 10));
        let why = Rejection::UnknownEntityType("x".into());
        let a = dead_letter(&long, &why);
        let b = dead_letter(&long, &why);
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, dead_letter(&record(8, "x".into()), &why).id);
        assert!(a.payload.ends_with("…(truncated)"));
        assert!(a.payload.len() < 65 << 10);
    }
}
