//! The `event-batch` encoding of `wit/plugin.wit`: a batch of stored events as
//! one byte buffer plus one array of fixed-size headers.
//!
//! Lowering a `list<record-with-strings>` costs one guest allocation (a call
//! into the guest's `cabi_realloc`) and one copy per string per event; this
//! encoding costs two of each per batch, whatever its size. Offsets go into
//! the guest, never come back out of it: plugin errors name an event by index,
//! which the sandbox clamps.

use crate::bindings::{EventBatch, EventHeader, Span};
use refold_types::StoredEvent;

/// Why a batch cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// Spans are 32-bit: a batch's bytes must stay below 4 GiB.
    #[error("event batch of more than {} bytes", u32::MAX)]
    TooLarge,
}

/// An empty batch whose buffers can be reused by [`encode_into`].
pub fn empty() -> EventBatch {
    EventBatch {
        bytes: Vec::new(),
        events: Vec::new(),
    }
}

/// Encode `events` into `batch`, replacing its contents but keeping its
/// allocations, so that a sandbox encodes batch after batch without
/// allocating once its buffers have grown.
pub fn encode_into(batch: &mut EventBatch, events: &[StoredEvent]) -> Result<(), EncodeError> {
    batch.bytes.clear();
    batch.events.clear();
    batch.events.reserve(events.len());
    for e in events {
        let id = push(&mut batch.bytes, e.id.as_bytes())?;
        let event_type = push(&mut batch.bytes, e.event_type.as_bytes())?;
        let source = push(&mut batch.bytes, e.source.as_bytes())?;
        let time = match &e.time {
            Some(t) => Some(push(&mut batch.bytes, t.as_bytes())?),
            None => None,
        };
        // The data's text as received: the plugin sees the producer's bytes
        // (big integers, key order), and nothing is re-serialised per event.
        let data = push(&mut batch.bytes, e.data.as_str().as_bytes())?;
        batch.events.push(EventHeader {
            id,
            event_type,
            source,
            time,
            data,
            position: e.position,
        });
    }
    Ok(())
}

fn push(bytes: &mut Vec<u8>, field: &[u8]) -> Result<Span, EncodeError> {
    let start = bytes.len();
    bytes.extend_from_slice(field);
    span(start, bytes.len())
}

fn span(start: usize, end: usize) -> Result<Span, EncodeError> {
    let offset = u32::try_from(start).map_err(|_| EncodeError::TooLarge)?;
    let end = u32::try_from(end).map_err(|_| EncodeError::TooLarge)?;
    Ok(Span {
        offset,
        len: end - offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use refold_types::EntityKey;
    use serde_json::json;

    fn ev(id: &str, time: Option<&str>, data: serde_json::Value, position: u64) -> StoredEvent {
        StoredEvent {
            key: EntityKey::new("t", "e"),
            position,
            id: id.into(),
            source: "/s".into(),
            event_type: "ty".into(),
            time: time.map(Into::into),
            data: refold_types::RawJson::from_value(&data),
            origin: None,
            record: None,
            digest: None,
        }
    }

    fn pair(s: Span) -> (u32, u32) {
        (s.offset, s.len)
    }

    fn field(b: &EventBatch, s: Span) -> &str {
        std::str::from_utf8(&b.bytes[s.offset as usize..(s.offset + s.len) as usize]).unwrap()
    }

    #[test]
    fn encodes_the_documented_layout() {
        let mut b = empty();
        encode_into(
            &mut b,
            &[
                ev("e1", None, json!({"n": 1}), 7),
                ev(
                    "é2",
                    Some("2025-01-01T00:00:00Z"),
                    serde_json::Value::Null,
                    8,
                ),
            ],
        )
        .unwrap();
        assert_eq!(b.events.len(), 2);
        let h = &b.events[0];
        assert_eq!(
            (
                pair(h.id),
                pair(h.event_type),
                pair(h.source),
                h.time.map(pair),
                pair(h.data),
                h.position
            ),
            ((0, 2), (2, 2), (4, 2), None, (6, 7), 7)
        );
        assert_eq!(&b.bytes[..13], br#"e1ty/s{"n":1}"#);
        assert_eq!(field(&b, h.data), r#"{"n":1}"#);
        let h = &b.events[1];
        assert_eq!(field(&b, h.id), "é2");
        assert_eq!(field(&b, h.time.unwrap()), "2025-01-01T00:00:00Z");
        assert_eq!(field(&b, h.data), "null");
        assert_eq!(h.data.offset + h.data.len, b.bytes.len() as u32);
    }

    #[test]
    fn reuses_its_buffers_and_replaces_the_contents() {
        let mut b = empty();
        encode_into(
            &mut b,
            &[ev("a", None, json!(1), 1), ev("b", None, json!(2), 2)],
        )
        .unwrap();
        let cap = b.bytes.capacity();
        encode_into(&mut b, &[ev("c", None, json!(3), 3)]).unwrap();
        assert_eq!(b.events.len(), 1);
        assert_eq!(field(&b, b.events[0].id), "c");
        assert_eq!(b.bytes.capacity(), cap);
        encode_into(&mut b, &[]).unwrap();
        assert!(b.bytes.is_empty() && b.events.is_empty());
    }

    #[test]
    fn spans_past_four_gib_are_refused() {
        assert!(matches!(
            span(0, u32::MAX as usize + 1),
            Err(EncodeError::TooLarge)
        ));
        assert!(matches!(
            span(u32::MAX as usize + 1, u32::MAX as usize + 2),
            Err(EncodeError::TooLarge)
        ));
        assert_eq!(span(3, 5).map(pair), Ok((3, 2)));
    }
}
